//! One attached controller at run time: the NVMe engine behind its mtx(9), the I/O in flight,
//! and the three callbacks that touch it (interrupt, watchdog callout, watchdog task).
//!
//! **Locking.** Everything mutable sits in [`CtrlState`] behind one MTX_DEF [`Mutex`]: the
//! engine (single-threaded by design), the table of bios in flight and the gone/lost flags.
//! It is taken by `d_strategy` (GEOM's g_down thread), the interrupt thread, the watchdog
//! callout (softclock, bound to this mutex) and task, and the teardown. MTX_DEF, never a spin
//! lock: the holders are threads that may block on it. Nothing sleeps with it held. Lock order:
//! a disk's link mutex ([`super::ns_disk`]) before this one; the hotplug pending-event mutex
//! after it.
//!
//! **The mutex is never held across a wait on the device.** An MTX_DEF may be held only
//! briefly: GEOM's one g_down thread (serving every disk in the system) and our interrupt
//! thread block on it. Stopping a broken controller waits up to ~5 s + CAP.TO (shutdown
//! notification, disable), so it is split ([`crate::nvme::stop`]): under the mutex the engine
//! only marks itself dead, completes every request once ([`Controller::fail_fast`]) and gives
//! up its rings into a [`DeviceStop`]; the stop then runs without the mutex, in a thread that
//! may sleep (the teardown's [`IoGate::fail_all`], or the watchdog task after the interrupt
//! thread's poll or the health check gave the controller up), polling with pause_sbt(9)
//! ([`StopAccess`]), and its outcome is recorded under the mutex again. Meanwhile `d_strategy`
//! and the interrupt thread find a dead engine and fail fast (ENXIO) without touching the
//! device. The trackers of the requests failed by hand stay parked (bio not completed, map
//! still loaded) until that outcome says whether the device stopped. A namespace rescan
//! ([`CtrlShared::rescan_namespaces`]) likewise sends each admin command under the mutex and sleeps, mutex released, until the
//! controller answered. Bring-up's waits happen before the engine is behind the mutex.
//!
//! **Completion under the lock.** bios are finished with `biodone(9)` while the mutex is held:
//! without DISKFLAG_DIRECT_COMPLETION, GEOM only queues the bio for its g_up thread, so no
//! consumer code runs under our lock.
//!
//! **Lifetime.** [`CtrlShared`] is allocated at attach and freed when the teardown drops the
//! [`EngineGate`], the typestate's last step before the softc: after the interrupt was torn
//! down, the callout and task drained and every node destroyed. The callbacks therefore hold a
//! plain [`CtrlRef`] pointer, no reference count (drain, don't refcount).
//!
//! **The I/O path allocates nothing.** A bio's data moves through busdma(9), straight from its
//! own pages (no bounce copy; UNMAPPED_BIO bios too): `d_strategy` takes a preallocated
//! tracker ([`super::tracker`]) and loads its map with `BUS_DMA_NOWAIT` under the mutex, and
//! the engine's PRP lists were allocated at bring-up. With every tracker busy the bio waits
//! in a [`BioQueue`] and is started when a completion frees one; a full queue is never an
//! error to GEOM. Removal fails the waiting bios with ENXIO, once, at teardown step 2.
//!
//! **Pages the device may still touch are never given back.** A bio is completed, and its map
//! unloaded, only after the device's own completion, or once the engine says DMA has stopped
//! ([`Controller::dma_stopped`]); the bio of a controller that could not be stopped is held
//! for ever (`hw.nvme_hotplug.leaked_buffers`), as the engine keeps its rings. Likewise, if
//! the interrupt cannot be torn down, this whole structure is kept, since the handler reaches
//! it.

use super::alloc::box_waitok;
use super::bio::{Bio, BioCmd, BioQueue};
use super::bindings;
use super::busdma::Dir;
use super::callout::CalloutHandler;
use super::clock::sleep_ms;
use super::dev_sysctl::DevSysctls;
use super::device::Device;
use super::dma::ContigRegion;
use super::intr::InterruptHandler;
use super::irq_source::IrqKind;
use super::mutex::Mutex;
use super::ns_disk::Xfer;
use super::platform::{KernelPlatform, StopAccess};
use super::taskqueue::{Task, TaskHandler};
use super::tracker::Trackers;
use super::tunables::Stat;
use crate::hotplug::kernel::IoGate;
use crate::nvme::{Completion, Controller, DataBuf, DeviceStop, Event, Health, IoOp, IoRequest, NvmeError};
use crate::platform::{Clock, PciPresence, RegisterIo};
use alloc::boxed::Box;
use core::ffi::{c_int, CStr};
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};

/// How often the watchdog looks at the controller: reads CSTS and config space (removal
/// detection: all-ones on hardware, zeros in QEMU; the engine decides) and polls, which also
/// expires overdue commands.
pub const WATCHDOG_US: u64 = 1_000_000;

/// Longest an announced removal waits for in-flight requests before failing them.
const QUIESCE_MAX_US: u64 = 10_000_000;

/// Longest the teardown waits (sleeping) for a stop the watchdog task is running. The stop is
/// bounded by itself (the shutdown bound, CAP.TO up to 127.5 s, twice); this only keeps the
/// loop finite if that reasoning were ever wrong.
const STOP_WAIT_MAX_MS: u32 = 300_000;

/// The errno a request finishes with for an engine error. ENXIO means "the device is gone".
/// A full queue is never an errno: the bio waits in the controller's [`BioQueue`]
/// (`CtrlState::submit_on`); `QueueFull` maps to EIO only for a request that can never fit.
pub fn errno_of(e: NvmeError) -> c_int {
    match e {
        NvmeError::Gone | NvmeError::NotReady => bindings::ENXIO,
        NvmeError::NoMemory | NvmeError::OutOfMemory(_) => bindings::ENOMEM,
        NvmeError::QueueFull => bindings::EIO,
        NvmeError::InvalidRequest(_) => bindings::EINVAL,
        NvmeError::Timeout | NvmeError::Status(_) | NvmeError::BadDevice(_) | NvmeError::Aborted => bindings::EIO,
    }
}

/// What [`CtrlState::submit_on`] did with a bio it did not fail.
enum Started {
    /// The engine has it, on its tracker.
    OnTracker,
    /// Back first in the queue: the engine had no room.
    Requeued,
}

/// What a locked section saw that must be acted on after it (prints, hotplug requests).
#[derive(Default)]
#[must_use]
pub struct Outcome {
    /// Requests completed with ENXIO.
    failed: u64,
    /// The engine gave up on the controller, with this reason.
    lost: Option<(NvmeError, Health)>,
    /// When `lost`: requests whose fate waits for the stop the engine left (failed once the
    /// device is known stopped, held if it cannot be), so not yet in `failed`.
    awaiting_stop: usize,
    /// The controller reported a namespace attribute change.
    ns_changed: bool,
    /// Completion entries that failed validation.
    bad: u64,
    /// Bios held for ever because the device could not be stopped.
    leaked: u64,
}

/// The mutable per-controller state, always behind [`CtrlShared`]'s mutex.
pub struct CtrlState {
    engine: Box<Controller<KernelPlatform>>,
    /// Teardown has begun ([`IoGate::mark_gone`]): no new I/O, no watchdog re-arm.
    gone: bool,
    /// The engine gave up on the controller (reported once).
    lost: bool,
    /// Bios in flight, one tracker each (the request tag is the tracker's index).
    io: Trackers,
    /// Bios waiting for a free tracker (FIFO).
    queued: BioQueue,
    /// `dev.nvmehp.N.*`; taken out and dropped (which sleeps) outside the lock at teardown.
    sysctls: Option<DevSysctls>,
}

/// One engine completion: the bio is completed now if the device itself finished it (its
/// completion entry came after its last access to the pages); with an error, its tracker is
/// parked until the engine call returns (see [`CtrlState::release_parked`]).
fn finish(io: &mut Trackers, c: Completion, out: &mut Outcome) {
    let Ok(t) = u32::try_from(c.tag) else {
        out.bad += 1;
        return;
    };
    match c.result {
        Ok(()) => match io.complete(t) {
            Some(bio) => bio.done(),
            None => out.bad += 1, // the engine never reports a tag twice; count it rather than trust it
        },
        Err(e) => {
            if e == NvmeError::Gone {
                out.failed += 1;
            }
            if !io.park(t, errno_of(e)) {
                out.bad += 1;
            }
        }
    }
}

/// What to ask the engine for a bio taken from the queue: derived again from the bio (it was
/// checked against the disk's geometry by `d_strategy`) and the namespace's block size.
fn queued_xfer(bio: &Bio, lba_shift: u32) -> Option<Xfer> {
    let op = match bio.cmd() {
        BioCmd::Read => IoOp::Read,
        BioCmd::Write => IoOp::Write,
        BioCmd::Flush => return Some(Xfer { op: IoOp::Flush, lba: 0, blocks: 0, len: 0 }),
        BioCmd::Delete | BioCmd::Other(_) => return None,
    };
    let (offset, len) = (u64::try_from(bio.offset()).ok()?, u64::try_from(bio.bcount()).ok()?);
    let blocks = u32::try_from(len >> lba_shift).ok()?;
    Some(Xfer { op, lba: offset >> lba_shift, blocks, len: usize::try_from(len).ok()? })
}

impl CtrlState {
    /// The engine, read-only (its namespace list, identify data). Read-only on purpose: the
    /// engine methods that wait on the device must not run with the mutex held, and the ones
    /// that may are called from this file only (rescans: [`CtrlShared::rescan_namespaces`]).
    pub fn engine(&self) -> &Controller<KernelPlatform> {
        &self.engine
    }

    /// `d_strategy`'s locked part: start `bio` on a free tracker, or queue it behind the bios
    /// already waiting (FIFO: a new bio never overtakes them). On error the bio is given back
    /// with its errno, to be failed after the unlock.
    fn start_or_queue(&mut self, bio: Bio, x: Xfer) -> Result<(), (Bio, c_int)> {
        // A controller given up (dead, or stopping) never completes anything again: nothing
        // may wait for it.
        if self.gone || !self.engine.is_ready() {
            return Err((bio, bindings::ENXIO));
        }
        if !self.queued.is_empty() {
            self.queued.push_back(bio);
            return Ok(());
        }
        match self.io.take() {
            Some(t) => self.submit_on(t, bio, x).map(|_| ()),
            None => {
                self.queued.push_back(bio);
                Ok(())
            }
        }
    }

    /// Loads `bio` into tracker `t`'s map and hands the request to the engine. On error the
    /// tracker is free again and the bio given back with its errno. An engine without room
    /// (cannot happen: there are no more trackers than request slots, and a bio of at most
    /// MDTS is one command) puts it back first in the queue while requests are in flight, whose
    /// completions restart it: [`Started::Requeued`].
    fn submit_on(&mut self, t: u32, bio: Bio, x: Xfer) -> Result<Started, (Bio, c_int)> {
        let dir = match x.op {
            IoOp::Read => Some(Dir::ToMemory),
            IoOp::Write => Some(Dir::ToDevice),
            IoOp::Flush => None,
        };
        let segs = match dir {
            Some(d) => match self.io.load(t, &bio, d) {
                Ok(segs) => segs,
                Err(errno) => {
                    // ENOMEM: busdma is short of resources (bounce pages; never on amd64
                    // without an IOMMU for this tag), which GEOM retries. Anything else means
                    // this bio cannot be mapped: an I/O error, as nvme(4) fails a tracker whose
                    // load failed (DATA_TRANSFER_ERROR, _nvme_qpair_submit_request).
                    self.io.give_back(t);
                    let errno = if errno == bindings::ENOMEM { errno } else { bindings::EIO };
                    return Err((bio, errno));
                }
            },
            None => &[],
        };
        let req = IoRequest {
            tag: u64::from(t),
            nsid: bio.nsid(),
            op: x.op,
            lba: x.lba,
            blocks: x.blocks,
            data: DataBuf { bus_addr: segs.first().map_or(0, |s| s.addr), len: x.len },
        };
        match self.engine.submit_segments(req, segs) {
            Ok(()) => self.io.attach(t, bio).map(|()| Started::OnTracker).map_err(|bio| (bio, bindings::EIO)),
            Err(e) => {
                self.io.give_back(t);
                if e == NvmeError::QueueFull && self.engine.outstanding() > 0 {
                    self.queued.push_front(bio);
                    return Ok(Started::Requeued);
                }
                Err((bio, errno_of(e)))
            }
        }
    }

    /// Starts waiting bios on the trackers completions freed; fails every waiting bio with
    /// ENXIO once the engine no longer runs (given up, or stopping). Completing under the
    /// mutex is fine (see the module documentation).
    fn restart_queued(&mut self, out: &mut Outcome) {
        if !self.engine.is_ready() {
            while let Some(bio) = self.queued.pop() {
                out.failed += 1;
                bio.fail(bindings::ENXIO);
            }
            return;
        }
        while self.io.has_free() {
            let Some(bio) = self.queued.pop() else { return };
            let nsid = bio.nsid();
            let shift = self.engine.namespaces().iter().find(|n| n.nsid == nsid).map(|n| n.lba_shift);
            let Some(x) = shift.and_then(|s| queued_xfer(&bio, s)) else {
                bio.fail(bindings::ENXIO); // the namespace went away while the bio waited
                continue;
            };
            let Some(t) = self.io.take() else {
                self.queued.push_front(bio);
                return;
            };
            match self.submit_on(t, bio, x) {
                Ok(Started::OnTracker) => {}
                // The engine is full: the next completion tries again (looping here would
                // take the same bio for ever).
                Ok(Started::Requeued) => return,
                Err((bio, errno)) => bio.fail(errno),
            }
        }
    }

    /// Completes, or holds, the trackers [`finish`] parked during the engine call that just
    /// returned, then restarts (or fails) the waiting bios.
    ///
    /// A controller that is still running only reports completions the device wrote, so it
    /// is done with their pages, errors included. A controller that was given up (by
    /// `fail_all`, directly or from a timeout in `poll`) completed its outstanding requests
    /// by hand; if it could not be stopped (a present device that ignored the shutdown and
    /// the disable, [`Controller::dma_stopped`]), it may still write a read's pages or read
    /// a write's. Those bios are held, never completed and their maps never unloaded: the same
    /// rule the engine applies to its own rings. Holding costs a consumer that waits for
    /// ever; completing would let a device scribble on pages the kernel has given back.
    /// A stop whose device ignored the disable but then lost bus mastering counts as stopped
    /// ([`crate::nvme::StopOutcome::bus_mastering_off`]): those bios fail with ENXIO, as
    /// nvme(4)'s `nvme_qpair_fail` fails every tracker.
    ///
    /// While the engine's stop is still out (made by `fail_fast`, run without the mutex), it is
    /// not known yet: the trackers stay parked until [`CtrlState::finish_stop`].
    fn release_parked(&mut self, out: &mut Outcome) {
        if self.io.has_parked() && !self.engine.stop_in_progress() {
            let stopped = self.engine.is_ready() || self.engine.dma_stopped();
            out.leaked += self.io.release_parked(stopped);
        }
        self.restart_queued(out);
    }

    /// Reaps completions and events.
    fn reap(&mut self, out: &mut Outcome) {
        let CtrlState { engine, io, .. } = self;
        engine.poll(&mut |e| match e {
            Event::Io(c) => finish(io, c, out),
            Event::NamespacesChanged => out.ns_changed = true,
            Event::ControllerLost { reason, health } => out.lost = Some((reason, health)),
            Event::BadCompletion { .. } => out.bad += 1,
            Event::AsyncNotice { .. } => {}
        });
        if out.lost.is_some() {
            self.lost = true;
        }
        self.release_parked(out);
        if out.lost.is_some() {
            out.awaiting_stop = self.io.parked_count();
        }
    }

    /// The fast half of giving the controller up: completes every request now with `err`
    /// (their trackers are parked), fails the waiting bios with ENXIO, without touching the
    /// device or waiting. The device is stopped by the stop this leaves
    /// ([`CtrlState::take_stop`]), run without the mutex.
    fn fail_fast(&mut self, err: NvmeError, out: &mut Outcome) -> usize {
        let CtrlState { engine, io, .. } = self;
        let mut n = 0;
        engine.fail_fast(err, &mut |c| {
            n += 1;
            finish(io, c, out)
        });
        let waiting = self.queued.len();
        self.release_parked(out);
        n + waiting
    }

    /// The fast half of an orderly stop, for a controller that finished every request on its
    /// own and is still present: the engine stops accepting I/O and leaves a stop that deletes
    /// the I/O queues (SQ, then CQ), sends the normal shutdown notification and disables, as
    /// NVMe recommends and nvme(4) does for a device that is not gone (nvme_ctrlr.c
    /// nvme_ctrlr_destruct). False, with
    /// nothing changed, when a request is still outstanding, the controller is not running or
    /// the device left: the caller then gives it up with [`CtrlState::fail_fast`].
    fn begin_orderly_stop(&mut self) -> bool {
        self.engine.is_ready()
            && self.engine.outstanding() == 0
            && self.engine.platform().present()
            && self.engine.begin_shutdown().is_ok()
            && self.engine.stop_pending()
    }

    /// The engine's pending stop, with what running it needs; `None` if there is none (or
    /// another thread took it). Run it with [`CtrlShared::run_stop`], without the mutex.
    fn take_stop(&mut self) -> Option<(DeviceStop<ContigRegion>, StopAccess)> {
        let stop = self.engine.take_stop()?;
        // SAFETY: the engine owns the BAR and lives in this CtrlShared until the EngineGate is
        // dropped (teardown step 5). The access is used only by run_stop, called by the gate's
        // fail_all (which borrows the gate) or by the watchdog task (drained at step 3).
        let access = unsafe { self.engine.platform().stop_access() };
        Some((stop, access))
    }

    /// Records the outcome of a stop and completes, or holds, the trackers parked meanwhile.
    fn finish_stop(&mut self, outcome: crate::nvme::StopOutcome, out: &mut Outcome) {
        let _ = self.engine.finish_stop(outcome);
        self.release_parked(out);
    }
}

impl Drop for CtrlState {
    fn drop(&mut self) {
        // The teardown failed every request before this point (step 2). Should that invariant
        // ever break, no bio is dropped without biodone, and none is completed while the device
        // may still use its pages: the trackers complete them with ENXIO only if DMA is known
        // to have stopped, else hold them; their maps are destroyed, then the tag (teardown
        // step 5, after the device stopped). Waiting bios were never given to the device: the
        // queue fails them on drop.
        let held = self.io.destroy(self.engine.dma_stopped());
        if held > 0 {
            Stat::LeakedBuffers.add(held as i64);
        }
    }
}

/// What the watchdog callout, the interrupt and the nodes share for one controller.
pub struct CtrlShared {
    dev: Device,
    unit: u32,
    /// Mirror of [`CtrlState::gone`] readable without the lock (node `d_open`).
    gone: AtomicBool,
    state: Pin<Box<Mutex<CtrlState>>>,
    /// The watchdog task, enqueued by the callout; set once at attach.
    watchdog_task: AtomicPtr<Task<'static, WatchdogTask>>,
    /// What `dev.nvmehp.N.*` shows, refreshed by the watchdog once a second.
    counters: Counters,
    /// Invalid completion entries seen, for rate-limited messages.
    bad_total: AtomicU64,
    /// Bios held for a device that could not be stopped (said once, counted always).
    leaked_total: AtomicU64,
    /// The interrupt kind set up at attach (`IrqKind as u8`, 0 before), for
    /// `dev.nvmehp.N.interrupt`.
    interrupt: AtomicU8,
    /// bus_teardown_intr failed: the interrupt handler may still run and reach this memory,
    /// so the [`EngineGate`] must not free it ([`CtrlShared::keep_for_stuck_interrupt`]).
    intr_stuck: AtomicBool,
}

/// Interrupt handlers that could not be torn down: they may still run this module's code, so
/// module unload is refused for as long as the system runs.
static STUCK_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// Interrupt handlers of ours that may still run (see `CtrlShared::keep_for_stuck_interrupt`).
pub fn stuck_interrupts() -> u64 {
    STUCK_INTERRUPTS.load(Ordering::Acquire)
}

/// Host tests: forget the stuck handlers a test provoked (the process-wide count would make
/// every later unload test refuse).
#[cfg(test)]
pub fn forget_stuck_interrupts_for_tests() {
    STUCK_INTERRUPTS.store(0, Ordering::Release);
}

/// The per-controller sysctl values (engine counters, copied out of the lock).
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    timeouts: AtomicU64,
    bad_completions: AtomicU64,
    async_events: AtomicU64,
    in_flight: AtomicU64,
}

/// A pointer to a live [`CtrlShared`]. Valid from [`CtrlShared::create`] until the teardown
/// drops the one [`EngineGate`] made for it, which happens only after every holder of a
/// `CtrlRef` (interrupt, callout, task, node and disk links) was drained or severed.
#[derive(Clone, Copy)]
pub struct CtrlRef(NonNull<CtrlShared>);

// SAFETY: CtrlShared is only accessed through its atomics and its mutex.
unsafe impl Send for CtrlRef {}
// SAFETY: as above.
unsafe impl Sync for CtrlRef {}

impl core::ops::Deref for CtrlRef {
    type Target = CtrlShared;
    fn deref(&self) -> &CtrlShared {
        // SAFETY: valid for as long as any CtrlRef is used (type invariant).
        unsafe { self.0.as_ref() }
    }
}

impl CtrlRef {
    /// A `'static` borrow for wrappers that tie a lifetime to the mutex (the watchdog callout).
    ///
    /// # Safety
    /// The borrower must be dropped before the [`EngineGate`] of this controller is.
    pub unsafe fn as_static(self) -> &'static CtrlShared {
        // SAFETY: per this function's contract.
        unsafe { &*self.0.as_ptr() }
    }
}

impl CtrlShared {
    /// Wraps a brought-up engine. Sleeps (M_WAITOK). When the I/O path's busdma cannot be set
    /// up, the engine is given back untouched, so that attach can release the interrupt it
    /// allocated before the engine lets BAR0 go (the MSI-X table may live there; see
    /// irq_source.rs).
    #[inline(never)]
    pub fn create(dev: Device, unit: u32, engine: Box<Controller<KernelPlatform>>) -> Result<(CtrlRef, EngineGate), Box<Controller<KernelPlatform>>> {
        // One tracker per request the engine can hold (a ring of N entries holds N-1 commands,
        // and a bio, at most d_maxsize <= MDTS, is one command), each with its busdma map, for
        // transfers of up to MDTS: everything the I/O path needs, allocated now.
        let (slots, max_bytes) = engine
            .info()
            .map_or((0, 0), |i| (usize::from(i.io_entries).saturating_sub(1) * usize::from(i.io_queues), i.mdts_bytes));
        let io = match Trackers::create(dev, slots.clamp(1, 65_536), max_bytes.max(bindings::PAGE_SIZE as u32)) {
            Ok(io) => io,
            Err(e) if e == bindings::ENOMEM => {
                dev_printf!(&dev, "out of memory for the {} I/O trackers (busdma tag and maps); not attaching\n", slots.clamp(1, 65_536));
                return Err(engine);
            }
            Err(e) => {
                dev_printf!(&dev, "cannot set up busdma for I/O (error {})\n", e);
                return Err(engine);
            }
        };
        let state = Mutex::new_boxed_waitok(c"nvmehp ctrl", CtrlState { engine, gone: false, lost: false, io, queued: BioQueue::new_waitok(), sysctls: None });
        // Behind the mutex from here on: the engine's waits must not sleep any more (set
        // before any other thread can reach it).
        state.lock().engine.platform().forbid_sleep();
        let shared = box_waitok(CtrlShared {
            dev,
            unit,
            gone: AtomicBool::new(false),
            state,
            watchdog_task: AtomicPtr::new(core::ptr::null_mut()),
            counters: Counters::default(),
            bad_total: AtomicU64::new(0),
            leaked_total: AtomicU64::new(0),
            interrupt: AtomicU8::new(0),
            intr_stuck: AtomicBool::new(false),
        });
        let r = CtrlRef(NonNull::from(Box::leak(shared)));
        Ok((r, EngineGate { ctrl: r, idle_after_quiesce: false }))
    }

    /// The interrupt handler could not be torn down (teardown step 3): this controller's
    /// memory is kept for ever instead of freed at step 5, and module unload is refused.
    pub fn keep_for_stuck_interrupt(&self) {
        if !self.intr_stuck.swap(true, Ordering::AcqRel) {
            STUCK_INTERRUPTS.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The newbus device.
    pub fn device(&self) -> Device {
        self.dev
    }

    /// The unit number.
    pub fn unit(&self) -> u32 {
        self.unit
    }

    /// The mutex, for the watchdog callout and namespace rescans.
    pub fn state(&self) -> &Mutex<CtrlState> {
        &self.state
    }

    /// Teardown has begun: new opens and I/O are refused.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Records the interrupt kind set up (attach, before [`CtrlShared::publish_sysctls`]).
    pub fn set_interrupt_kind(&self, kind: IrqKind) {
        self.interrupt.store(kind as u8, Ordering::Release);
    }

    /// Records the watchdog task the callout enqueues (once, at attach).
    pub fn set_watchdog_task(&self, t: NonNull<Task<'static, WatchdogTask>>) {
        self.watchdog_task.store(t.as_ptr(), Ordering::Release);
    }

    /// Creates `dev.nvmehp.N.*` (attach, sleepable). Failure only costs the counters.
    pub fn publish_sysctls(&self) {
        let Some(s) = DevSysctls::new() else { return };
        let c = &self.counters;
        let list: [(&'static CStr, &AtomicU64, &'static CStr); 6] = [
            (c"requests", &c.requests, c"I/O requests accepted by the controller"),
            (c"failed_requests", &c.failed_requests, c"I/O requests completed with an error by a failure or removal"),
            (c"timeouts", &c.timeouts, c"Commands that became overdue (the controller was then given up)"),
            (c"bad_completions", &c.bad_completions, c"Invalid completion entries dropped"),
            (c"async_events", &c.async_events, c"Asynchronous events received"),
            (c"in_flight", &c.in_flight, c"I/O requests in flight (as of the last watchdog run)"),
        ];
        for (name, v, descr) in list {
            // SAFETY: the counters live in this CtrlShared, which is freed only after the
            // EngineGate dropped the sysctls (see its Drop).
            if !unsafe { s.add_u64(self.dev, name, v, descr) } {
                dev_printf!(&self.dev, "cannot add sysctl dev.nvmehp.{}.{:?}\n", self.unit, name);
            }
        }
        if let Some(kind) = IrqKind::from_code(self.interrupt.load(Ordering::Acquire)) {
            if !s.add_str(self.dev, c"interrupt", kind.name(), c"Interrupt in use: MSI-X, MSI or INTx") {
                dev_printf!(&self.dev, "cannot add sysctl dev.nvmehp.{}.interrupt\n", self.unit);
            }
        }
        // A previous context (never, attach publishes once) would be dropped after the unlock:
        // sysctl_ctx_free sleeps.
        let old = self.state.lock().sysctls.replace(s);
        drop(old);
    }

    /// Copies the engine's counters for sysctl (under the lock, from the watchdog).
    fn refresh_counters(&self, st: &CtrlState) {
        let e = st.engine.stats();
        let c = &self.counters;
        c.requests.store(e.requests, Ordering::Relaxed);
        c.failed_requests.store(e.failed_requests, Ordering::Relaxed);
        c.timeouts.store(e.timeouts, Ordering::Relaxed);
        c.bad_completions.store(e.bad_completions, Ordering::Relaxed);
        c.async_events.store(e.async_events, Ordering::Relaxed);
        c.in_flight.store(st.engine.outstanding() as u64, Ordering::Relaxed);
    }

    /// `d_strategy`'s work for a namespace: start the bio on a tracker (busdma, submit), or
    /// queue it while every tracker is busy; or finish it with an errno. `x` is the bio
    /// already validated against the disk ([`super::ns_disk::Xfer`]): `len` is at most the
    /// disk's `d_maxsize`, which the payload tag's `maxsize` covers. Allocates nothing.
    pub fn start_bio(&self, mut bio: Bio, nsid: u32, x: Xfer) {
        bio.set_nsid(nsid);
        let r = self.state.lock().start_or_queue(bio, x);
        if let Err((bio, errno)) = r {
            bio.fail(errno);
        }
    }

    /// The slow half of giving the controller up: runs `stop` (shutdown notification, disable,
    /// bounded waits that sleep) **without the mutex**, then records the outcome under it.
    /// Sleeps: only from the teardown or our taskqueue thread.
    ///
    /// **A controller that could not be stopped loses bus mastering** inside the stop, before
    /// its memory is decided ([`StopAccess`]'s `stop_bus_mastering`): the stop found it still
    /// there but ignoring CC.SHN and CC.EN = 0, so it may still read and write host memory.
    /// Clearing PCIM_CMD_BUSMASTEREN (sys/dev/pci/pci.c pci_disable_busmaster_method) stops a
    /// function from initiating any DMA; the command register is read back to see that the bit
    /// is really clear. Then the rings are freed and the parked bios fail with ENXIO instead
    /// of being held for ever (a consumer that never gets its bio back is a hang; memory kept
    /// past kldunload is lost for good, its malloc type gone), which is also what nvme(4) and
    /// Linux do after a failed controller (`nvme_qpair_fail`; `nvme_dev_disable` clears bus
    /// mastering before cancelling). If the bit does not read back clear, both are held.
    ///
    /// **On INTx the controller's interrupt is masked first** (INTMS bit 0, the one vector).
    /// The stop's admin commands (queue deletions) complete into the admin CQ, which only the
    /// stop's own poll reaps, between sleeps; the interrupt thread meanwhile finds a dead
    /// engine and returns without touching the device. A pin-based interrupt is level-
    /// triggered: the line stays asserted until the CQ head doorbell catches up, and
    /// sys/kern/kern_intr.c re-runs the ithread each time the source is unmasked after it
    /// (`ithread_execute_handlers`, then `post_ithread`), so for the whole sleep the line
    /// would interrupt back to back, on a line other functions may share (an interrupt storm,
    /// `intr_storm_threshold`). INTMS masks pin-based and MSI interrupts at the controller
    /// (NVMe 1.4 §3.1.3; the spec forbids touching it with MSI-X, whose messages are edges and
    /// need no mask here). CC.EN = 0 at the end of the stop clears the mask with everything
    /// else; nothing after it expects an interrupt.
    fn run_stop(&self, stop: DeviceStop<ContigRegion>, access: StopAccess, out: &mut Outcome) {
        if IrqKind::from_code(self.interrupt.load(Ordering::Acquire)) == Some(IrqKind::Intx) {
            access.write32(crate::nvme::regs::INTMS, 1);
        }
        let outcome = stop.run(&access);
        self.state.lock().finish_stop(outcome, out);
    }

    /// Re-reads the controller's namespace list (hotplug task, after a namespace attribute
    /// change). Each step runs under the mutex and never waits: it handles the completion of
    /// the admin command in flight (the interrupt thread may have reaped it meanwhile; the
    /// engine keeps it for the scan) and sends the next. Between steps this thread sleeps with
    /// the mutex released. The engine bounds every command (command timeout, and a step count
    /// should the clock stop) and the number of commands, so the loop ends. Sleeps.
    pub fn rescan_namespaces(&self) -> Result<crate::nvme::NsChanges, NvmeError> {
        let mut scan = self.state.lock().engine.rescan_begin()?;
        loop {
            if let Some(r) = self.state.lock().engine.rescan_step(&mut scan) {
                return r;
            }
            sleep_ms(c"nvmehpns", 1);
        }
    }

    /// Has the watchdog task run a stop the interrupt thread's poll left (an ithread must not
    /// sleep, so it cannot run it itself). Never sleeps.
    fn kick_watchdog_task(&self) {
        let t = self.watchdog_task.load(Ordering::Acquire);
        // SAFETY: the task lives in this controller's task queue, which is drained and freed
        // only after the interrupt was torn down (teardown step 3, before step 5).
        if let Some(t) = unsafe { t.as_ref() } {
            t.enqueue();
        }
    }

    /// Acts on what a locked section saw. Called without the controller mutex.
    fn after(&self, out: Outcome) {
        if out.failed > 0 {
            Stat::FailedRequests.add(out.failed as i64);
        }
        if out.bad > 0 {
            // A hostile device can send invalid entries on every interrupt: say so when the
            // total reaches 1, 2, 4, 8, ... instead of flooding the console.
            let before = self.bad_total.fetch_add(out.bad, Ordering::Relaxed);
            let after = before + out.bad;
            if before == 0 || (u64::BITS - before.leading_zeros()) != (u64::BITS - after.leading_zeros()) {
                dev_printf!(&self.dev, "dropped invalid completion entries ({} so far)\n", after);
            }
        }
        if out.leaked > 0 {
            Stat::LeakedBuffers.add(out.leaked as i64);
            if self.leaked_total.fetch_add(out.leaked, Ordering::Relaxed) == 0 {
                dev_printf!(
                    &self.dev,
                    "controller could not be stopped: holding the I/O requests whose pages it may still access, never completing them ({} now; hw.nvme_hotplug.leaked_buffers)\n",
                    out.leaked
                );
            }
        }
        if let Some((reason, health)) = out.lost {
            if health == Health::Gone {
                Stat::SurpriseRemovals.add(1);
            }
            // Requests the stop decides are said apart: "0 requests failed" alone would read as
            // nothing affected while a read is still parked on a controller being stopped.
            if out.awaiting_stop > 0 {
                dev_printf!(
                    &self.dev,
                    "controller lost ({}, health {:?}): {} requests failed, {} more once it is stopped; nodes and disks stay until detach\n",
                    reason,
                    health,
                    out.failed,
                    out.awaiting_stop
                );
            } else {
                dev_printf!(
                    &self.dev,
                    "controller lost ({}, health {:?}): {} requests failed; nodes and disks stay until detach\n",
                    reason,
                    health,
                    out.failed
                );
            }
            super::slots::controller_lost(self.dev);
        }
        if out.ns_changed {
            super::slots::namespace_changed(self.dev);
        }
    }
}

/// The [`IoGate`] of the teardown typestate over one controller. Owns the [`CtrlShared`]:
/// dropping it (teardown step 5) frees the engine, its queue memory and the mutex.
pub struct EngineGate {
    ctrl: CtrlRef,
    /// The last [`IoGate::quiesce`] saw every request finish on a present device: the next
    /// [`IoGate::fail_all`] may stop the controller the orderly way (queues deleted first).
    /// Never set for a surprise removal, which skips `quiesce`.
    idle_after_quiesce: bool,
}

impl EngineGate {
    /// The controller.
    pub fn ctrl(&self) -> CtrlRef {
        self.ctrl
    }
}

impl EngineGate {
    /// DEVICE_SHUTDOWN (reboot, halt, power-off): the controller must get the normal shutdown
    /// notification, which makes it flush its volatile write cache, before power goes away;
    /// otherwise writes already reported done could be lost. Requests in flight are given the
    /// bounded time an announced removal gives them, the rest fail with ENXIO, and the engine
    /// then sends CC.SHN and disables the device (its `fail_all`; if nothing was left
    /// outstanding, it deletes the I/O queues first, as nvme(4) does). New I/O and opens are
    /// refused from here on; nodes and disks stay (the system is going down, and a detach may
    /// still follow). The waits run without the controller mutex (see [`IoGate::fail_all`]).
    pub fn shutdown(&mut self) {
        self.mark_gone();
        self.quiesce();
        let _ = self.fail_all();
    }
}

impl IoGate for EngineGate {
    fn mark_gone(&mut self) {
        let mut st = self.ctrl.state.lock();
        st.gone = true;
        self.ctrl.gone.store(true, Ordering::Release);
    }

    fn quiesce(&mut self) {
        self.idle_after_quiesce = false;
        let dev = self.ctrl.dev;
        let start = {
            let st = self.ctrl.state.lock();
            st.engine.platform().now_us()
        };
        loop {
            let mut out = Outcome::default();
            let (left, present, now, bound) = {
                let mut st = self.ctrl.state.lock();
                st.reap(&mut out);
                let p = st.engine.platform();
                (st.engine.outstanding(), p.present(), p.now_us(), st.engine.config().cmd_timeout_us.min(QUIESCE_MAX_US))
            };
            self.ctrl.after(out);
            if left == 0 || !present {
                self.idle_after_quiesce = left == 0 && present;
                return;
            }
            if now.saturating_sub(start) >= bound {
                dev_printf!(&dev, "{} requests still in flight after {} ms; failing them\n", left, bound / 1000);
                return;
            }
            sleep_ms(c"nvmehpq", 1);
        }
    }

    /// Fails every request under the mutex (fast: no device access), then stops the device
    /// without it: the shutdown notification and the disable wait (sleeping) up to ~5 s +
    /// CAP.TO on a broken device, while d_strategy and the interrupt thread, which take the
    /// mutex, find a dead engine and return at once. Returns with the device stopped or given
    /// up as a runaway (its memory and the failed requests' buffers leaked), also when the
    /// watchdog task had taken the stop.
    ///
    /// After a quiesce that left nothing outstanding on a present device (announced removal,
    /// DEVICE_SHUTDOWN) the stop is the orderly one ([`CtrlState::begin_orderly_stop`]): it
    /// also deletes the I/O queues before the notification, each deletion a bounded admin
    /// command waited for without the mutex like the rest. `fail_fast` still runs after it,
    /// to mark the engine dead and report completions already reaped; it fails nothing then.
    fn fail_all(&mut self) -> usize {
        let mut out = Outcome::default();
        let orderly = core::mem::take(&mut self.idle_after_quiesce);
        let (n, stop) = {
            let mut st = self.ctrl.state.lock();
            if orderly {
                let _ = st.begin_orderly_stop();
            }
            let n = st.fail_fast(NvmeError::Gone, &mut out);
            (n, st.take_stop())
        };
        if let Some((stop, access)) = stop {
            self.ctrl.run_stop(stop, access, &mut out);
        }
        // A stop the watchdog task took is running in that task: wait for its outcome.
        let mut waited = 0;
        while self.ctrl.state.lock().engine.stop_in_progress() && waited < STOP_WAIT_MAX_MS {
            sleep_ms(c"nvmehpsw", 1);
            waited += 1;
        }
        let out = Outcome { lost: None, ..out }; // teardown reports its own receipt
        self.ctrl.after(out);
        n
    }

    /// Nothing to fail by hand: a deleted namespace's commands are completed by the (live)
    /// controller with an error status, and pulling their buffers from under a running device
    /// would be the use-after-free this driver exists to avoid.
    fn fail_namespace(&mut self, _nsid: u32) -> usize {
        0
    }
}

impl Drop for EngineGate {
    fn drop(&mut self) {
        // The sysctls read the counters in CtrlShared: remove them first (waits for readers),
        // outside the mutex since that sleeps.
        let sysctls = self.ctrl.state.lock().sysctls.take();
        drop(sysctls);
        if self.ctrl.intr_stuck.load(Ordering::Acquire) {
            // The interrupt handler may still run and lock this state: leak it (engine, queue
            // memory and all). The device is stopped or gone by now (fail_all ran).
            dev_printf!(&self.ctrl.dev, "interrupt handler still installed: keeping the controller's memory\n");
            return;
        }
        // Nobody else reaches the engine any more, and this thread may sleep (attach's error
        // path or teardown step 5, no mutex held): should dropping it still have to stop the
        // device (a gate dropped before any fail_all), that stop sleeps instead of spinning.
        self.ctrl.state.lock().engine.platform().allow_sleep();
        // SAFETY: the pointer came from Box::leak in CtrlShared::create and exactly one
        // EngineGate exists for it; the teardown drops it only after the interrupt, callout and
        // task were drained and every node destroyed and disk link severed, so no CtrlRef is
        // used any more (CtrlRef invariant).
        drop(unsafe { Box::from_raw(self.ctrl.0.as_ptr()) });
    }
}

/// The interrupt handler (ithread): reap completions.
pub struct IntrHandler(pub CtrlRef);

impl InterruptHandler for IntrHandler {
    fn handle(&self) {
        let mut out = Outcome::default();
        let stop_left = {
            let mut st = self.0.state.lock();
            st.reap(&mut out);
            st.engine.stop_pending()
        };
        if stop_left {
            // An overdue command made the engine give the controller up (fast half only):
            // the stop waits and sleeps, which an interrupt thread may not do.
            self.0.kick_watchdog_task();
        }
        self.0.after(out);
    }
}

/// The watchdog callout (softclock, controller mutex held): enqueue the watchdog task, which
/// does the work in a thread where a bounded busy-wait is acceptable, and come back in
/// [`WATCHDOG_US`], until teardown or the controller is lost.
pub struct WatchdogFire(pub CtrlRef);

impl CalloutHandler<CtrlState> for WatchdogFire {
    fn fire(&self, st: &mut CtrlState) -> Option<u64> {
        if st.gone || st.lost {
            return None;
        }
        let t = self.0.watchdog_task.load(Ordering::Acquire);
        // SAFETY: the task lives in this controller's task queue, which is drained and freed
        // only after this callout was drained (teardown step 3 before step 5).
        if let Some(t) = unsafe { t.as_ref() } {
            t.enqueue();
        }
        Some(WATCHDOG_US)
    }
}

/// The watchdog task (our taskqueue thread): health check + poll, and the stop of a controller
/// given up here or by the interrupt thread's poll, run after the mutex is released.
pub struct WatchdogTask(pub CtrlRef);

impl TaskHandler for WatchdogTask {
    fn run(&self, _pending: u32) {
        let mut out = Outcome::default();
        let stop = {
            let mut st = self.0.state.lock();
            if !st.gone && !st.lost {
                st.reap(&mut out);
                self.0.refresh_counters(&st);
                if !st.lost {
                    match st.engine.check_health() {
                        Health::Healthy => {}
                        health => {
                            let reason = if health == Health::Gone { NvmeError::Gone } else { NvmeError::Timeout };
                            st.lost = true;
                            st.fail_fast(reason, &mut out);
                            out.lost = Some((reason, health));
                            out.awaiting_stop = st.io.parked_count();
                        }
                    }
                }
            }
            st.take_stop()
        };
        if let Some((stop, access)) = stop {
            // This thread may sleep, and the mutex is released: the waits cost nobody else.
            self.0.run_stop(stop, access, &mut out);
        }
        self.0.after(out);
    }
}
