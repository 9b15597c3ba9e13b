//! The hotplug [`Kernel`] and [`AcpiNotify`] traits over the real KPI: what the OS-neutral
//! teardown typestate (`crate::hotplug::teardown`) and unload order (`crate::hotplug::unload`)
//! call to create and destroy nodes and disks, drain callbacks and free memory.
//!
//! Every method may sleep (see the trait). The types are the owning wrappers of this
//! directory, so each "destroy" is also the end of a Rust value:
//! - `Node` = [`Cdev`] (make_dev_s with [`NODE_FLAGS`], never eternal; destroy_dev);
//! - `Disk` = [`KDisk`] (a live [`Disk`] or the [`GoneDisk`] GEOM hands back in `d_gone`);
//! - `Mem` = [`KMem`] (malloc(9) M_WAITOK|M_ZERO of our type);
//! - `Intr` = [`CtrlIntr`], `Timer` = [`Timer`], `TaskQueue` = [`OwnedQueue`].

use super::acpi::NotifyRegistration;
use super::alloc::alloc_waitok;
use super::cdev::{Cdev, NodePerms, NODE_FLAGS};
use super::clock::sleep_ms;
use super::ctrl::IntrHandler;
use super::device::Device;
use super::disk::{Disk, GoneDisk};
use super::intr::Interrupt;
use super::irq_source::IrqSource;
use super::node::NODE_CDEVSW;
use super::ns_disk::{DiskCtx, DiskSpec};
use super::slots::SlotNotify;
use super::taskqueue::{Task, TaskHandler, TaskQueue, TimeoutTask};
use super::{alloc::box_waitok, bindings};
use crate::fallible::{push_within_capacity, try_push};
use crate::hotplug::errno::Errno;
use crate::hotplug::kernel::{AcpiNotify, Kernel};
use crate::hotplug::node_name::NodeName;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ffi::{c_int, c_void, CStr};
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicU32, AtomicUsize, Ordering};

/// The node flags are exactly what the `Kernel` contract promises, and never eternal
/// (`cdev::NODE_FLAGS` asserts the latter too).
const _: () = assert!(NODE_FLAGS == bindings::MAKEDEV_CHECKNAME | bindings::MAKEDEV_WAITOK);

/// Disks created and not yet destroyed from `d_gone`: module unload must wait for them, since
/// their `d_gone` runs our code.
static DISKS_LIVE: AtomicUsize = AtomicUsize::new(0);
/// Disk units in use, a bit each (units 0..256). A unit is taken when a namespace's disk is
/// staged and given back by that disk's `d_gone` ([`give_back_disk_unit`]), so the lowest free
/// unit is reused, as nvd(4) reuses it (sys/dev/nvd/nvd.c: nvd_new_disk takes the lowest unit
/// not in its disk list, nvd_gonecb takes the disk off the list). A disk of a detached
/// controller that is still open keeps its unit until GEOM calls `d_gone` after its last close
/// (sys/geom/geom_disk.c g_disk_providergone), and by then its provider and /dev node are gone:
/// two live disks never share a name. A unit staged for a disk that was never created is not
/// given back (a number lost, never a name shared).
static DISK_UNITS: [AtomicU64; DISK_UNIT_WORDS] = [const { AtomicU64::new(0) }; DISK_UNIT_WORDS];
const DISK_UNIT_WORDS: usize = 4;
/// Past 256 disks alive at once: numbers above the bitmap, never reused.
static OVERFLOW_UNIT: AtomicU32 = AtomicU32::new(DISK_UNIT_WORDS as u32 * 64);

/// The lowest disk unit number no live disk has.
pub fn next_disk_unit() -> u32 {
    for (w, word) in DISK_UNITS.iter().enumerate() {
        let mut cur = word.load(Ordering::Relaxed);
        while cur != u64::MAX {
            let bit = (!cur).trailing_zeros();
            match word.compare_exchange_weak(cur, cur | 1 << bit, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return w as u32 * 64 + bit,
                Err(now) => cur = now,
            }
        }
    }
    OVERFLOW_UNIT.fetch_add(1, Ordering::Relaxed)
}

/// The disk of `unit` is gone (its `d_gone` ran and destroyed it): the unit may be reused.
pub fn give_back_disk_unit(unit: u32) {
    if let Some(word) = DISK_UNITS.get(unit as usize / 64) {
        word.fetch_and(!(1u64 << (unit % 64)), Ordering::AcqRel);
    }
}

/// The last thing a `d_gone` callback does: from here on module unload may proceed, so no
/// more of this module's code may run on the GEOM thread than the callback's return.
pub fn d_gone_returning() {
    DISKS_LIVE.fetch_sub(1, Ordering::AcqRel);
}

/// Disks whose `d_gone` has not run yet.
pub fn disks_live() -> usize {
    DISKS_LIVE.load(Ordering::Acquire)
}

/// A block from [`Kernel::malloc`].
#[derive(Clone, Copy, Debug)]
pub struct KMem {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: a plain pointer to kernel memory; whoever dereferences it says why it is valid.
unsafe impl Send for KMem {}

impl KMem {
    /// The address, e.g. for `si_drv1`.
    pub fn as_ptr(self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }
}

/// A disk as the teardown sees it: live (ours) or given up and handed back by `d_gone`.
pub enum KDisk {
    /// Created and published.
    Live(Disk),
    /// Handed back by GEOM in `d_gone`.
    Gone(GoneDisk),
}

/// An interrupt of one controller, plus its MSI-X vector allocation.
pub struct CtrlIntr {
    /// The handler (torn down first).
    pub intr: Interrupt<IntrHandler>,
    /// The device, to give the MSI-X vector or MSI message back.
    pub dev: Device,
    /// The messages and MSI-X BARs behind the IRQ, given back after the IRQ resource is gone
    /// ([`IrqSource::release`]).
    pub source: IrqSource,
}

/// A callout that can be drained, whatever its data and handler.
pub trait DrainTimer: Send {
    /// `callout_drain(9)`.
    fn drain(self: Pin<&Self>);
}

impl<T: Send, H: super::callout::CalloutHandler<T>> DrainTimer for super::callout::Callout<'static, T, H> {
    fn drain(self: Pin<&Self>) {
        super::callout::Callout::drain(self)
    }
}

/// A callout owned by the teardown or the unload order.
pub struct Timer(pub Pin<Box<dyn DrainTimer>>);

/// Something that drains on drop (a task of an [`OwnedQueue`]).
trait QueuedTask {}
impl<H: TaskHandler> QueuedTask for Task<'static, H> {}
impl<H: TaskHandler> QueuedTask for TimeoutTask<'static, H> {}

/// A task queue together with every task built on it: the tasks are dropped (each drains)
/// before the queue is freed, which a `Task<'q>` borrowing a sibling field could not express.
pub struct OwnedQueue {
    tasks: Vec<Pin<Box<dyn QueuedTask>>>,
    /// Leaked box, reclaimed in Drop after every task is gone.
    queue: NonNull<TaskQueue>,
}

// SAFETY: taskqueue(9) and the tasks are thread-safe (Task is Sync; its handler is Sync); the
// owner only drains and frees them.
unsafe impl Send for OwnedQueue {}

impl OwnedQueue {
    /// Creates the queue and its thread. Sleeps.
    pub fn new(name: &'static CStr) -> Result<Self, c_int> {
        let q = box_waitok(TaskQueue::new(name)?);
        Ok(OwnedQueue { tasks: Vec::new(), queue: NonNull::from(Box::leak(q)) })
    }

    fn queue(&self) -> &'static TaskQueue {
        // SAFETY: the queue lives until this OwnedQueue is dropped, and everything that borrows
        // it for 'static is a task stored in `self.tasks`, which Drop frees first.
        unsafe { &*self.queue.as_ptr() }
    }

    /// Adds a task; the pointer stays valid until the queue is dropped. `None` when memory is
    /// short.
    pub fn add_task<H: TaskHandler + 'static>(&mut self, priority: u8, h: H) -> Option<NonNull<Task<'static, H>>> {
        self.tasks.try_reserve(1).ok()?;
        let t = self.queue().task(priority, h)?;
        let p = NonNull::from(&*t);
        push_within_capacity(&mut self.tasks, t).ok()?; // reserved above
        Some(p)
    }

    /// Adds a timeout task, as [`OwnedQueue::add_task`].
    pub fn add_timeout_task<H: TaskHandler + 'static>(&mut self, priority: u8, h: H) -> Option<NonNull<TimeoutTask<'static, H>>> {
        self.tasks.try_reserve(1).ok()?;
        let t = self.queue().timeout_task(priority, h)?;
        let p = NonNull::from(&*t);
        push_within_capacity(&mut self.tasks, t).ok()?; // reserved above
        Some(p)
    }

    /// `taskqueue_drain_all(9)`.
    pub fn drain_all(&self) {
        self.queue().drain_all()
    }
}

impl Drop for OwnedQueue {
    fn drop(&mut self) {
        self.tasks.clear(); // each task drains before it is freed
        // SAFETY: leaked in `new`, reclaimed once, after every task borrowing it was dropped.
        drop(unsafe { Box::from_raw(self.queue.as_ptr()) }); // taskqueue_free
    }
}

/// The kernel services of the teardown and unload orders.
#[derive(Default)]
pub struct FreeBsdKernel {
    /// Disk parameters staged by unit, consumed by `disk_create`.
    staged: Vec<(u32, DiskSpec)>,
    /// Our ACPI notify handlers (only the module's instance has any).
    notify: Vec<NotifyRegistration<SlotNotify>>,
}

impl FreeBsdKernel {
    /// No staged disks, no handlers.
    pub fn new() -> Self {
        FreeBsdKernel { staged: Vec::new(), notify: Vec::new() }
    }

    /// Stages what `disk_create(unit, ..)` will need (the trait passes only unit and context).
    pub fn stage_disk(&mut self, unit: u32, spec: DiskSpec) -> Result<(), Errno> {
        try_push(&mut self.staged, (unit, spec)).map_err(|_| Errno::ENOMEM)
    }

    /// Keeps a notify handler, removed by [`AcpiNotify::remove_notify_handlers`].
    pub fn keep_notify(&mut self, reg: NotifyRegistration<SlotNotify>) -> Result<(), NotifyRegistration<SlotNotify>> {
        if self.notify.len() == self.notify.capacity() && self.notify.try_reserve(1).is_err() {
            return Err(reg);
        }
        push_within_capacity(&mut self.notify, reg)
    }

    /// Number of notify handlers held.
    pub fn notify_handlers(&self) -> usize {
        self.notify.len()
    }
}

fn errno(e: c_int) -> Errno {
    Errno(e)
}

fn disk_ctx_of(d: &KDisk) -> Option<&DiskCtx> {
    let drv1 = match d {
        // SAFETY: our live disk; reading a field GEOM never changes.
        KDisk::Live(d) => unsafe { (*d.as_raw()).d_drv1 },
        KDisk::Gone(g) => g.drv1(),
    };
    // SAFETY: d_drv1 of our disks is the DiskCtx set at creation, alive until after d_gone.
    unsafe { drv1.cast::<DiskCtx>().as_ref() }
}

impl Kernel for FreeBsdKernel {
    type Node = Cdev;
    type Disk = KDisk;
    type Mem = KMem;
    type Intr = CtrlIntr;
    type Timer = Timer;
    type TaskQueue = OwnedQueue;

    fn malloc(&mut self, size: usize) -> Result<KMem, Errno> {
        let layout = Layout::from_size_align(size.max(1), 16).map_err(|_| Errno::EINVAL)?;
        let ptr = alloc_waitok(layout).ok_or(Errno::EINVAL)?;
        // SAFETY: a fresh block of `layout.size()` bytes (M_ZERO semantics of the contract).
        unsafe { ptr.as_ptr().write_bytes(0, layout.size()) };
        Ok(KMem { ptr, size: layout.size() })
    }

    fn free(&mut self, mem: KMem) {
        if mem.size == 0 {
            return; // the "no memory" KMem of disk_ctx for a disk without context
        }
        // SAFETY: allocated by `malloc` above through the global allocator's malloc type with
        // this layout; the caller guarantees no user is left.
        unsafe { alloc::alloc::dealloc(mem.ptr.as_ptr(), Layout::from_size_align_unchecked(mem.size, 16)) }
    }

    fn make_node(&mut self, name: &NodeName, drv1: KMem) -> Result<Cdev, Errno> {
        let perms = NodePerms { uid: bindings::UID_ROOT as u32, gid: bindings::GID_OPERATOR as u32, mode: 0o600 };
        Cdev::create(&NODE_CDEVSW, 0, perms, drv1.as_ptr(), format_args!("{name}")).map_err(errno)
    }

    fn destroy_node(&mut self, node: Cdev) {
        node.destroy()
    }

    fn destroy_node_sched(&mut self, node: Cdev) {
        // SAFETY: no callback.
        unsafe { node.destroy_deferred(None, core::ptr::null_mut()) }
    }

    fn drain_sched_destroys(&mut self) {
        NODE_CDEVSW.drain()
    }

    fn node_in_use(&self, node: &Cdev) -> bool {
        node.in_use()
    }

    fn disk_create(&mut self, unit: u32, ctx: KMem) -> Result<KDisk, Errno> {
        let pos = self.staged.iter().position(|(u, _)| *u == unit).ok_or(Errno::EINVAL)?;
        let (_, spec) = self.staged.swap_remove(pos);
        if ctx.size < core::mem::size_of::<DiskCtx>() {
            return Err(Errno::EINVAL);
        }
        // SAFETY: `ctx` is a fresh, 16-byte aligned block large enough for a DiskCtx; the
        // teardown frees it only after d_gone released the link (on_disk_gone).
        let Some(params) = (unsafe { DiskCtx::init(ctx.as_ptr().cast(), unit, &spec) }) else {
            dev_printf!(&spec.ctrl.device(), "out of memory for the disk of namespace {}\n", spec.nsid);
            return Err(Errno::ENOMEM);
        };
        DISKS_LIVE.fetch_add(1, Ordering::AcqRel);
        Ok(KDisk::Live(Disk::create(&params)))
    }

    fn disk_gone(&mut self, disk: KDisk) {
        if let Some(ctx) = disk_ctx_of(&disk) {
            ctx.sever(); // no d_strategy reaches the controller after this returns
        }
        match disk {
            KDisk::Live(d) => {
                let _given_up = d.gone(); // GEOM owns it until d_gone; the token does nothing
            }
            KDisk::Gone(_) => {}              // already given up
        }
    }

    fn disk_ctx(&self, disk: &KDisk) -> KMem {
        let p = disk_ctx_of(disk).map(|c| NonNull::from(c).cast::<u8>());
        match p {
            Some(ptr) => KMem { ptr, size: crate::hotplug::teardown::DISK_CTX_SIZE.max(core::mem::size_of::<DiskCtx>()) },
            // Never for our disks (d_drv1 is set at creation); `free` ignores a zero size.
            None => KMem { ptr: NonNull::dangling(), size: 0 },
        }
    }

    fn disk_destroy(&mut self, disk: KDisk) {
        match disk {
            KDisk::Gone(g) => {
                // SAFETY: d_drv1 of our disk is its DiskCtx (see disk_ctx_of).
                if let Some(ctx) = unsafe { g.drv1().cast::<DiskCtx>().as_ref() } {
                    // SAFETY: we are in d_gone (the only place a Gone KDisk is made): GEOM
                    // makes no further call for this disk.
                    unsafe { ctx.release() };
                }
                g.destroy_in_d_gone();
                // DISKS_LIVE is decremented by the d_gone callback itself, as its very last
                // action (`d_gone_returning`), not here: the context is freed after this.
            }
            KDisk::Live(d) => {
                // Not from d_gone: the contract was broken. Give the disk up instead of
                // destroying it under GEOM; d_gone will come and destroy it.
                kprintf!("nvme_hotplug: disk_destroy of a live disk refused; giving it up\n");
                let _given_up = d.gone();
            }
        }
    }

    fn disk_in_use(&self, disk: &KDisk) -> bool {
        disk_ctx_of(disk).is_some_and(|c| c.opened())
    }

    fn wait_disks_gone(&mut self) {
        let mut waited = 0u32;
        while disks_live() > 0 {
            if waited.is_multiple_of(5000) {
                kprintf!("nvme_hotplug: waiting for GEOM to release {} disks\n", disks_live());
            }
            sleep_ms(c"nvmehpdg", 10);
            waited = waited.wrapping_add(10);
        }
    }

    fn teardown_intr(&mut self, intr: CtrlIntr) {
        let CtrlIntr { intr, dev, source } = intr;
        let ctrl = intr.handler().0;
        // bus_teardown_intr, then the IRQ resource is released.
        if intr.teardown().is_err() {
            // The handler may still run (a shared INTx line calls it for every interrupt on
            // the line) and it reaches the controller's state: that must never be freed now,
            // nor the module's code unloaded. The vector or message stays allocated with its
            // IRQ, and so do the MSI-X table and PBA BARs pci(4) still programs it through.
            ctrl.keep_for_stuck_interrupt();
            core::mem::forget(source);
            return;
        }
        // The IRQ resource is released: the messages, then the MSI-X BARs.
        source.release(dev);
    }

    fn callout_drain(&mut self, timer: &mut Timer) {
        timer.0.as_ref().drain()
    }

    fn taskqueue_drain_all(&mut self, tq: &mut OwnedQueue) {
        tq.drain_all()
    }

    fn taskqueue_free(&mut self, tq: OwnedQueue) {
        drop(tq)
    }
}

impl AcpiNotify for FreeBsdKernel {
    /// Removes every handler we installed (each drop calls AcpiRemoveNotifyHandler, which
    /// waits for a running handler). Only from the module unload thread, never from an ACPI
    /// task thread (Osd/OsdSchedule.c AcpiOsWaitEventsComplete).
    fn remove_notify_handlers(&mut self) {
        self.notify.clear();
    }
}
