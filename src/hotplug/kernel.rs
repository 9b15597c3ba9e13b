//! The kernel services the node/disk lifecycle needs, as one trait.
//!
//! Two implementations: `src/freebsd/` (make_dev_s(9), destroy_dev(9), disk(9), malloc(9),
//! bus_teardown_intr(9), callout(9), taskqueue(9)) and `kpimodel/`, a host model that enforces
//! the FreeBSD rules (docs/freebsd-kpi.md section 5) and records every violation.
//!
//! What the trait deliberately cannot express:
//! - **No eternal nodes.** [`Kernel::make_node`] has no flags argument. The FreeBSD
//!   implementation passes exactly `MAKEDEV_CHECKNAME | MAKEDEV_WAITOK` and asserts it;
//!   `MAKEDEV_ETERNAL` nodes may never be destroyed (kern_conf.c destroy_devl), which was bug 1.
//! - **No free-form names.** Names come only from [`NodeName`].
//! - **No early disk free.** A disk is given up to the kernel by [`Kernel::disk_gone`]; only
//!   the kernel's `d_gone` callback, [`super::teardown::on_disk_gone`], destroys and frees it.

use super::errno::Errno;
use super::node_name::NodeName;

/// Kernel services for nodes, disks, memory and callback contexts.
///
/// Every method may sleep unless stated otherwise: call them only from a sleepable context
/// with no mutex held (detach, our taskqueue, MOD_UNLOAD), never from a node's own methods.
pub trait Kernel {
    /// A device node (`struct cdev *`).
    type Node;
    /// A disk (`struct disk *`).
    type Disk;
    /// Driver memory (a softc pointer): what `si_drv1` and `d_drv1` point to.
    type Mem: Copy;
    /// An installed interrupt handler (`bus_setup_intr` cookie + IRQ resource).
    type Intr;
    /// A callout (timer).
    type Timer;
    /// A taskqueue.
    type TaskQueue;

    /// malloc(9) `M_WAITOK | M_ZERO` of our malloc type.
    fn malloc(&mut self, size: usize) -> Result<Self::Mem, Errno>;
    /// free(9). The memory must have no user left: no node, disk, callback or thread.
    fn free(&mut self, mem: Self::Mem);

    /// make_dev_s(9) with `MAKEDEV_CHECKNAME | MAKEDEV_WAITOK` and `si_drv1 = drv1`
    /// (set before the node is published, kern_conf.c make_dev_sv). Duplicate name: `EEXIST`.
    fn make_node(&mut self, name: &NodeName, drv1: Self::Mem) -> Result<Self::Node, Errno>;
    /// destroy_dev(9): removes the name, then waits until no thread is inside any method of
    /// the node (kern_conf.c destroy_devl). Never from the node's own methods: the caller would
    /// wait for
    /// itself (kern_conf.c destroy_devl counts it in si_threadcount).
    fn destroy_node(&mut self, node: Self::Node);
    /// destroy_dev_sched(9): for method context (d_close, cdevpriv destructors).
    fn destroy_node_sched(&mut self, node: Self::Node);
    /// destroy_dev_drain(9): waits for every scheduled destroy of our cdevsw.
    fn drain_sched_destroys(&mut self);
    /// A thread is inside the node or it is open (`si_usecount` / `si_threadcount`).
    fn node_in_use(&self, node: &Self::Node) -> bool;

    /// disk_alloc + disk_create(9), `d_name` = [`super::node_name::DISK_NAME`], `d_drv1 = ctx`,
    /// and `d_gone` wired to [`super::teardown::on_disk_gone`].
    fn disk_create(&mut self, unit: u32, ctx: Self::Mem) -> Result<Self::Disk, Errno>;
    /// disk_gone(9): wither the provider so every consumer gets ENXIO. The disk now belongs
    /// to GEOM until it calls `d_gone`.
    fn disk_gone(&mut self, disk: Self::Disk);
    /// `d_drv1` of a disk (read inside `d_gone`).
    fn disk_ctx(&self, disk: &Self::Disk) -> Self::Mem;
    /// disk_destroy(9): only from `d_gone`.
    fn disk_destroy(&mut self, disk: Self::Disk);
    /// The disk's provider is open (GEOM access counts non-zero).
    fn disk_in_use(&self, disk: &Self::Disk) -> bool;
    /// Sleeps until every disk given to `disk_gone` has had its `d_gone` called.
    fn wait_disks_gone(&mut self);

    /// bus_teardown_intr(9) + bus_release_resource: returns after the handler finished.
    fn teardown_intr(&mut self, intr: Self::Intr);
    /// callout_drain(9).
    fn callout_drain(&mut self, timer: &mut Self::Timer);
    /// taskqueue_drain_all(9).
    fn taskqueue_drain_all(&mut self, tq: &mut Self::TaskQueue);
    /// taskqueue_free(9).
    fn taskqueue_free(&mut self, tq: Self::TaskQueue);
}

/// The controller's I/O side as teardown sees it (the NVMe engine, through the glue).
pub trait IoGate {
    /// Marks the controller gone. From now on every new request completes with ENXIO at once,
    /// without touching the device.
    fn mark_gone(&mut self);
    /// Announced removal only (the device still answers): give the requests already in flight
    /// a bounded chance to complete normally, so that an eject of an idle-ish disk loses no
    /// acknowledged write. Bounded by the engine's own command timeout budget; returns at once
    /// when the device stops answering. Whatever is left is failed by [`IoGate::fail_all`].
    fn quiesce(&mut self);
    /// Completes every queued and outstanding request with ENXIO now (never by waiting for a
    /// command timeout: the device will not answer). Returns how many were failed.
    fn fail_all(&mut self) -> usize;
    /// Completes every request of one namespace with ENXIO (namespace deleted).
    fn fail_namespace(&mut self, nsid: u32) -> usize;
}

/// ACPI notify handler registration, for module unload.
pub trait AcpiNotify {
    /// AcpiRemoveNotifyHandler(9) on every slot we installed a handler on. Waits for running
    /// handlers (Osd/OsdSchedule.c AcpiOsWaitEventsComplete), so never call it from an ACPI task
    /// thread.
    fn remove_notify_handlers(&mut self);
}
