//! Stopping a controller, split so that the slow half runs without the caller's lock.
//!
//! Giving a controller up has a fast part and a slow part. The fast part is bookkeeping: mark
//! the controller dead, refuse new requests, complete every request once. The slow part talks
//! to the device and waits for it: the shutdown notification (CSTS.SHST, up to 5 s or CAP.TO),
//! the disable (CSTS.RDY, up to CAP.TO), and for an announced shutdown the deletion of the I/O
//! queues (up to a command timeout each). A broken but present device makes every one of
//! those waits run to its bound.
//!
//! The kld keeps the engine behind an MTX_DEF mutex that GEOM's g_down thread and the
//! interrupt thread also take, so the slow part must not run under it. The engine therefore
//! does the fast part itself ([`Controller::fail_fast`], [`Controller::begin_shutdown`]) and
//! hands the slow part out as a [`DeviceStop`]: a value that owns everything stopping needs
//! (CAP, the command timeout, and every DMA region the device may still write: rings, the
//! identify and log pages, the PRP list pages). The caller drops its lock, runs
//! [`DeviceStop::run`] from a context that may sleep, with a register handle of its own, and
//! gives the [`StopOutcome`] back to [`Controller::finish_stop`] under the lock.
//!
//! While a stop is out the engine owns no ring, touches no register, and reports
//! [`Controller::dma_stopped`] = false, so memory the failed requests lent the device is held
//! until the outcome says whether the device stopped. The stop either frees the DMA regions
//! (device disabled, or gone) or leaks them on purpose (a present device that ignored the
//! disable may still write them; a leak costs memory, a free would let it scribble on memory
//! the system has reused).
//!
//! [`Controller`]: super::Controller
//! [`Controller::fail_fast`]: super::Controller::fail_fast
//! [`Controller::begin_shutdown`]: super::Controller::begin_shutdown
//! [`Controller::finish_stop`]: super::Controller::finish_stop
//! [`Controller::dma_stopped`]: super::Controller::dma_stopped

use alloc::vec::Vec;

use super::admin;
use super::cmd::Sqe;
use super::controller::{AdminOwner, IoPart};
use super::ctrlr;
use super::error::NvmeError;
use super::health::{self, Health};
use super::qpair::QueuePair;
use super::regs::Cap;
use super::status::Status;
use crate::platform::{Clock, DmaRegion, PciPresence, RegisterIo};

/// Poll interval of the stop's waits. 1 ms is the granularity of a sleeping delay
/// (pause_sbt(9) at hz=1000), and short against the bounds (CAP.TO is at least 500 ms).
pub const STOP_POLL_US: u32 = 1000;

/// How often (in polls) a queue-deletion wait asks config space whether the device left.
const PRESENCE_EVERY_POLLS: u64 = 10;

/// The slow half of stopping a controller: everything it needs, owned, so it can run
/// without the engine (and without the lock the engine lives behind).
///
/// Created by the engine only; run it exactly once with [`DeviceStop::run`] and give the
/// outcome back with [`Controller::finish_stop`](super::Controller::finish_stop). A stop that
/// is dropped without being run leaks its DMA regions (nobody knows whether the device
/// stopped), and the engine keeps saying `dma_stopped() == false`.
#[must_use = "run it (outside the engine's lock) and hand the outcome to finish_stop"]
pub struct DeviceStop<R: DmaRegion> {
    /// CAP, for the CAP.TO bound (None: never read, so never enabled).
    cap: Option<Cap>,
    /// The device was enabled when the stop was taken: it may be doing DMA.
    running: bool,
    /// Send the normal shutdown notification first (not sent yet in this life).
    notify: bool,
    /// Announced shutdown: delete the I/O queues first (SQ, then its CQ, last queue first).
    delete_queues: bool,
    /// Bound of each queue-deletion command.
    cmd_timeout_us: u64,
    admin: Option<QueuePair<R, AdminOwner>>,
    io: Vec<QueuePair<R, IoPart>>,
    pages: [Option<R>; 2],
    prp_pool: Vec<R>,
}

/// What [`DeviceStop::run`] achieved; give it to
/// [`Controller::finish_stop`](super::Controller::finish_stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "hand it to Controller::finish_stop"]
pub struct StopOutcome {
    dma_stopped: bool,
    bus_mastering_off: bool,
    leaked_regions: u64,
    result: Result<(), NvmeError>,
}

impl StopOutcome {
    /// The device can no longer access host memory: it was disabled (CSTS.RDY seen clear),
    /// was never enabled, is gone, or ignored the disable but lost bus mastering
    /// ([`StopOutcome::bus_mastering_off`]). False: its DMA regions were leaked, and so must
    /// be any buffer lent to it by a request that was completed by hand.
    pub fn dma_stopped(&self) -> bool {
        self.dma_stopped
    }
    /// The device ignored the disable and DMA stopped only because its bus mastering was
    /// turned off ([`PciPresence::stop_bus_mastering`]).
    pub fn bus_mastering_off(&self) -> bool {
        self.bus_mastering_off
    }
    /// DMA regions leaked because the device could not be stopped.
    pub fn leaked_regions(&self) -> u64 {
        self.leaked_regions
    }
    /// The first error of the queue deletion or the shutdown notification (`Gone` when the
    /// device left), `Ok` otherwise. A failed disable shows in [`StopOutcome::dma_stopped`].
    pub fn result(&self) -> Result<(), NvmeError> {
        self.result
    }
}

impl<R: DmaRegion> DeviceStop<R> {
    /// Assembled by the engine from what it gave up.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cap: Option<Cap>,
        running: bool,
        notify: bool,
        delete_queues: bool,
        cmd_timeout_us: u64,
        admin: Option<QueuePair<R, AdminOwner>>,
        io: Vec<QueuePair<R, IoPart>>,
        pages: [Option<R>; 2],
        prp_pool: Vec<R>,
    ) -> Self {
        DeviceStop { cap, running, notify, delete_queues, cmd_timeout_us, admin, io, pages, prp_pool }
    }

    /// True when running it will access the device (false: it only frees memory).
    pub fn touches_device(&self) -> bool {
        self.running && self.cap.is_some()
    }

    /// Stops the device and releases its DMA memory; may take seconds on a broken device.
    ///
    /// `dev` is the caller's handle on the same device (registers, config space, clock). Run
    /// it without any lock that an interrupt or I/O path takes: every wait is bounded (by
    /// CAP.TO, the shutdown bound or the command timeout, and by an iteration count), polls
    /// every [`STOP_POLL_US`] through [`Clock::delay_us`] (a sleeping delay in the kld), and
    /// checks config space so a device that leaves ends the wait.
    pub fn run<D: RegisterIo + PciPresence + Clock>(mut self, dev: &D) -> StopOutcome {
        let mut result = Ok(());
        let mut stopped = true;
        let mut bus_mastering_off = false;
        if let (true, Some(cap)) = (self.running, self.cap) {
            if health::assess(dev, false) == Health::Gone {
                result = Err(NvmeError::Gone);
            } else {
                if self.delete_queues {
                    result = self.delete_io_queues(dev);
                }
                if self.notify && result != Err(NvmeError::Gone) {
                    if let Err(e) = ctrlr::shutdown_notify(dev, &cap, STOP_POLL_US) {
                        result = result.and(Err(e));
                    }
                }
                stopped = ctrlr::disable(dev, &cap, STOP_POLL_US).is_ok() || !dev.present();
                if !stopped {
                    // Before anything is decided about its memory: with bus mastering off
                    // the function cannot reach host memory whatever its controller does.
                    bus_mastering_off = dev.stop_bus_mastering();
                    stopped = bus_mastering_off;
                }
            }
        }
        let leaked_regions = self.release(stopped);
        StopOutcome { dma_stopped: stopped, bus_mastering_off, leaked_regions, result }
    }

    /// Deletes every I/O queue (last first; each SQ before its CQ, which cannot be deleted
    /// while an SQ is attached). Stops at the first error.
    fn delete_io_queues<D: RegisterIo + PciPresence + Clock>(&mut self, dev: &D) -> Result<(), NvmeError> {
        for i in (0..self.io.len()).rev() {
            let qid = self.io[i].qid();
            let seq = u32::from(qid) * 2;
            self.admin_cmd(dev, admin::delete_sq(qid), seq)?;
            self.admin_cmd(dev, admin::delete_cq(qid), seq + 1)?;
        }
        Ok(())
    }

    /// Runs one admin command on the admin queue this stop owns, bounded by the command
    /// timeout. The engine completed every tracked command before handing the queue over, so
    /// anything else that completes here (the AER, a late answer) is consumed and ignored.
    fn admin_cmd<D: RegisterIo + PciPresence + Clock>(&mut self, dev: &D, sqe: Sqe, seq: u32) -> Result<(), NvmeError> {
        let admin = self.admin.as_mut().ok_or(NvmeError::NotReady)?;
        admin.push(sqe, AdminOwner::Sync(seq), u64::MAX)?;
        admin.ring(dev);
        let start = dev.now_us();
        let polls = self.cmd_timeout_us / u64::from(STOP_POLL_US) + 2;
        for i in 0..polls {
            let mut found = None;
            let mut consumed = false;
            for _ in 0..admin.entries() {
                let Some(r) = admin.next_completion() else { break };
                consumed = true;
                if let Ok((cqe, t)) = r {
                    if matches!(t.owner, AdminOwner::Sync(s) if s == seq) {
                        found = Some(Status::from_cqe_status(cqe.status).map_or(Ok(()), |s| Err(NvmeError::Status(s))));
                    }
                }
            }
            admin.finish_reap(dev, consumed);
            if let Some(r) = found {
                return r;
            }
            if i % PRESENCE_EVERY_POLLS == PRESENCE_EVERY_POLLS - 1 && health::assess(dev, false) == Health::Gone {
                return Err(NvmeError::Gone);
            }
            if dev.now_us().saturating_sub(start) >= self.cmd_timeout_us {
                break;
            }
            dev.delay_us(STOP_POLL_US);
        }
        if health::assess(dev, false) == Health::Gone {
            return Err(NvmeError::Gone);
        }
        Err(NvmeError::Timeout)
    }

    /// Frees every region if the device stopped, leaks it otherwise. Returns the count leaked.
    fn release(&mut self, stopped: bool) -> u64 {
        let mut leaked = 0u64;
        let mut drop_or_leak = |r: R| {
            if stopped {
                drop(r);
            } else {
                leaked += 1;
                core::mem::forget(r);
            }
        };
        if let Some(a) = self.admin.take() {
            let (sq, cq) = a.into_regions();
            drop_or_leak(sq);
            drop_or_leak(cq);
        }
        for mut q in self.io.drain(..) {
            // Normally empty (the engine completed every request first). A PRP list slot
            // names memory in `prp_pool`, released below with the other pages.
            q.take_each(drop);
            let (sq, cq) = q.into_regions();
            drop_or_leak(sq);
            drop_or_leak(cq);
        }
        for r in self.pages.iter_mut().filter_map(Option::take).chain(self.prp_pool.drain(..)) {
            drop_or_leak(r);
        }
        leaked
    }
}

impl<R: DmaRegion> Drop for DeviceStop<R> {
    /// A stop that was never run: nobody knows whether the device stopped, so whatever it
    /// still owns is leaked, never freed.
    fn drop(&mut self) {
        let _ = self.release(!self.running);
    }
}
