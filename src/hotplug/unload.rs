//! kldunload policy and order.
//!
//! **Policy: refuse with EBUSY while any controller has an open node or disk; otherwise tear
//! everything down.** Tearing down under an open file system would turn a typo'd kldunload
//! into lost writes; the owner can unmount and retry. (A hot-removed controller is different:
//! the device is already gone, so its teardown never waits for users, see
//! [`super::slot_ops::DetachReason::Gone`].)
//!
//! The busy check and the teardown are not one atomic step: an open that slips in between
//! would find a dying node (ENXIO from dead_cdevsw: safe) or, for a disk, make step 5 wait for
//! its close. The glue closes that window by setting its "unloading" flag, checked by d_open and
//! the GEOM access method under the same lock as its open counts, before calling [`unload`].
//!
//! Order, once allowed, and why:
//! 1. remove our ACPI notify handlers, from the kldunload thread (the FreeBSD glue does it in
//!    MOD_QUIESCE, so that a handler that cannot be removed refuses the unload before newbus
//!    detaches anything, and MOD_UNLOAD only redoes it after `kldunload -f`; never from an ACPI
//!    task thread: AcpiRemoveNotifyHandler drains the ACPI task queue, Osd/OsdSchedule.c), each
//!    followed by AcpiOsWaitEventsComplete for the notifies queued just before its unlink
//!    (evmisc.c AcpiEvQueueNotifyRequest keeps the old handler list); afterwards no handler of
//!    ours runs or can enqueue work;
//! 2. drain the fallback callout, then our hotplug taskqueue: no hotplug task is running;
//! 3. tear down every controller ([`super::teardown::teardown`]);
//! 4. destroy_dev_drain: no scheduled destroy of our cdevsw is pending (kern_conf.c
//!    destroy_dev_drain);
//! 5. wait for every `d_gone`: they call our code, which must still be loaded (geom_disk.c
//!    g_disk_providergone);
//! 6. free the hotplug taskqueue.

use super::errno::Errno;
use super::kernel::{AcpiNotify, IoGate, Kernel};
use super::teardown::{teardown, Freed, Live, Removal};
use alloc::vec::Vec;

/// What unload returns when it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unloaded {
    /// One receipt per controller.
    pub controllers: Vec<Freed>,
}

/// Refused: nothing was touched; the controllers are handed back.
pub struct Refused<K: Kernel, C: IoGate> {
    /// Always EBUSY.
    pub errno: Errno,
    /// The untouched controllers.
    pub controllers: Vec<Live<K, C>>,
}

/// MOD_UNLOAD: either refuses with EBUSY (nothing changed) or tears everything down in the
/// order documented above.
pub fn unload<K: Kernel + AcpiNotify, C: IoGate>(
    k: &mut K,
    controllers: Vec<Live<K, C>>,
    fallback_timer: Option<&mut K::Timer>,
    hotplug_tq: Option<K::TaskQueue>,
) -> Result<Unloaded, Refused<K, C>> {
    if controllers.iter().any(|c| c.in_use(k)) {
        return Err(Refused { errno: Errno::EBUSY, controllers });
    }
    k.remove_notify_handlers();
    if let Some(t) = fallback_timer {
        k.callout_drain(t);
    }
    let mut hotplug_tq = hotplug_tq;
    if let Some(tq) = hotplug_tq.as_mut() {
        k.taskqueue_drain_all(tq);
    }
    // Every controller is torn down whatever memory there is; only its receipt is lost when
    // there is no room to keep it.
    let mut receipts = crate::fallible::try_vec_with_capacity(controllers.len()).unwrap_or_default();
    for c in controllers {
        let r = teardown(c, k, Removal::Announced);
        let _ = crate::fallible::push_within_capacity(&mut receipts, r);
    }
    k.drain_sched_destroys();
    k.wait_disks_gone();
    if let Some(tq) = hotplug_tq {
        k.taskqueue_free(tq);
    }
    Ok(Unloaded { controllers: receipts })
}
