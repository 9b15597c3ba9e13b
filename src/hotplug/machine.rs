//! The task half of the hotplug state machine: turns pending events into slot actions.
//!
//! [`SlotMachine::run`] runs on our own taskqueue (never in the ACPI notify context), takes a
//! snapshot of pending bits and, slot by slot, reads the slot's real state through
//! [`SlotOps`] and performs at most one eject, one check and one namespace rescan.
//!
//! Per slot the order is fixed: finish a running eject, then a new eject request, then a
//! device check, then the namespace rescan. Checks are state-based (present? `device_t`?), so
//! the order of a "3 then 1" or "1 then 3" burst does not matter: after the eject, the check
//! sees whatever is really in the slot.
//!
//! Eject, when we own the slot (like Linux acpi_device_hotplug, drivers/acpi/scan.c, and
//! acpiphp's disable_slot, drivers/pci/hotplug/acpiphp_glue.c; unlike FreeBSD's
//! acpi_pci_device_notify_handler, sys/dev/acpica/acpi_pci.c):
//! 1. nothing present and no `device_t`: `_OST` non-specific failure, no detach, no `_EJ0`;
//! 2. `_OST` eject-in-progress;
//! 3. detach + delete the child (only if a `device_t` exists); Busy / InUse / Failed are
//!    reported with `_OST` and stop here: `_EJ0` is never evaluated on a device still in use;
//! 4. if the device is already gone (surprise removal): `_OST` success, no `_EJ0`;
//! 5. `_EJ0`; then confirm absence, re-checking after a delay if needed; `_OST` success, or
//!    non-specific failure when the device never went away.

use super::ost::{OstStatus, SOURCE_BUS_CHECK, SOURCE_DEVICE_CHECK, SOURCE_EJECT_REQUEST};
use super::pending::{Pending, PendingEvents, PendingSnapshot};
use super::mode::Role;
use super::slot::{Slot, SlotState};
use super::slot_ops::{DetachError, DetachReason, LeftAlone, SlotIndex, SlotOps};
use crate::fallible::{try_vec_filled, AllocError};
use alloc::vec::Vec;

/// `_STA` bit 0: the device is present.
const STA_PRESENT: u32 = 1 << 0;

/// Tunables of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugConfig {
    /// How many times to re-check that an ejected device vanished before reporting failure.
    pub eject_confirm_tries: u16,
    /// Delay between those re-checks, for the glue's timeout task.
    pub eject_confirm_delay_us: u32,
}

impl Default for HotplugConfig {
    fn default() -> Self {
        // 50 x 10 ms: acpi_pci's EC2 quirk waits 10 ms once (acpi_pci.c,
        // ACPI_Q_DELAY_BEFORE_EJECT_RESCAN); we wait up to 0.5 s without holding any thread,
        // since each re-check is a new task run.
        HotplugConfig { eject_confirm_tries: 50, eject_confirm_delay_us: 10_000 }
    }
}

/// What one run did, for counters, `device_printf` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunReport {
    /// Slot rescans performed (a check found a function answering in a slot without a
    /// `device_t`).
    pub rescans: u32,
    /// Walks of a slot that already had a `device_t`, on an ACPI device or bus check: they add
    /// only functions newbus does not know (one hot-added beside a live function, or one an
    /// administrator `devctl delete`d). Counted apart from [`RunReport::rescans`]: a notify storm
    /// after an attach makes one rescan and any number of these, most of which add nothing.
    pub rewalks: u32,
    /// Detaches performed (eject or stale sweep).
    pub detaches: u32,
    /// Of those, stale devices swept (config space gone, `device_t` still there).
    pub swept: u32,
    /// `_EJ0` evaluations.
    pub ejects: u32,
    /// Ejects refused because the device was busy or in use.
    pub refused: u32,
    /// Ejects that completed (device confirmed absent).
    pub ejected: u32,
    /// Failures (rescan, detach, `_EJ0`, eject never completed, eject of an empty slot).
    pub failures: u32,
    /// Changes a check found and left alone: stale or new devices on slots we only observe,
    /// and stale devices of other drivers.
    pub left_alone: u32,
    /// ACPI events ignored because we only observe the slot.
    pub ignored: u32,
    /// Namespace rescans.
    pub ns_rescans: u32,
    /// When set, run again after this many microseconds even if no event arrives
    /// (an eject is waiting for the device to vanish).
    pub rerun_after_us: Option<u32>,
}

/// Per-slot state for the task side.
#[derive(Debug, Clone)]
pub struct SlotMachine {
    slots: Vec<Slot>,
    roles: Vec<Role>,
    config: HotplugConfig,
}

impl SlotMachine {
    /// One entry per slot, with the role [`super::mode::resolve`] gave each slot; fails when
    /// memory is short.
    pub fn new(roles: Vec<Role>, config: HotplugConfig) -> Result<Self, AllocError> {
        Ok(SlotMachine { slots: try_vec_filled(Slot::default(), roles.len())?, roles, config })
    }

    /// The state of `slot`, for tests and sysctl.
    pub fn state(&self, slot: SlotIndex) -> Option<SlotState> {
        self.slots.get(slot).map(|s| s.state)
    }

    /// The role of `slot`.
    pub fn role(&self, slot: SlotIndex) -> Option<Role> {
        self.roles.get(slot).copied()
    }

    /// Processes one snapshot. Sleeps only inside `ops`.
    pub fn run<O: SlotOps>(&mut self, snap: &PendingSnapshot, ops: &mut O) -> RunReport {
        let mut report = RunReport::default();
        for i in 0..self.slots.len() {
            let bits = snap.get(i).bits();
            let unrecognized = snap.unrecognized.get(i).copied().unwrap_or(0);
            self.run_slot(i, bits, unrecognized, ops, &mut report);
        }
        report
    }

    fn run_slot<O: SlotOps>(&mut self, i: SlotIndex, bits: u8, unrecognized: u32, ops: &mut O, r: &mut RunReport) {
        let owner = self.roles[i] == Role::Owner;
        let mut bits = bits;
        if !owner {
            // Observer: ACPI events belong to acpi_pci (or nobody). Acting on them could
            // duplicate its detach or `_EJ0`, so they are dropped here whatever the glue did.
            let acpi = Pending::EJECT | Pending::CHECK | Pending::BUS_CHECK | Pending::UNRECOGNIZED;
            if bits & acpi != 0 {
                r.ignored += 1;
            }
            bits &= !acpi;
        }

        if let SlotState::EjectWait { tries } = self.slots[i].state {
            // Duplicated eject requests are absorbed; anything else waits for the outcome.
            self.slots[i].deferred |= bits & !Pending::EJECT;
            self.continue_eject(i, tries, ops, r);
            if self.slots[i].state != SlotState::Idle {
                return;
            }
            bits = core::mem::take(&mut self.slots[i].deferred) & !Pending::EJECT;
        }

        if bits & Pending::EJECT != 0 {
            self.start_eject(i, ops, r);
            if self.slots[i].state != SlotState::Idle {
                self.slots[i].deferred |= bits & !Pending::EJECT;
                return;
            }
        }
        if bits & (Pending::CHECK | Pending::BUS_CHECK | Pending::QUIET_CHECK) != 0 {
            let asked = bits & (Pending::CHECK | Pending::BUS_CHECK) != 0;
            let status = if self.check(i, asked, ops, r) { OstStatus::Success } else { OstStatus::NonSpecificFailure };
            // One check answers every ACPI notify that asked for it, each with its own source.
            if bits & Pending::BUS_CHECK != 0 {
                ops.ost(i, SOURCE_BUS_CHECK, status);
            }
            if bits & Pending::CHECK != 0 {
                ops.ost(i, SOURCE_DEVICE_CHECK, status);
            }
        }
        if bits & Pending::NS_CHANGE != 0 && ops.has_child(i) {
            r.ns_rescans += 1;
            if ops.rescan_namespaces(i).is_err() {
                r.failures += 1;
            }
        }
        if bits & Pending::UNRECOGNIZED != 0 {
            ops.ost(i, unrecognized, OstStatus::UnrecognizedNotify);
        }
    }

    /// The device is there if config space answers *or* `_STA` says present, as Linux's
    /// trim_stale_devices decides (drivers/pci/hotplug/acpiphp_glue.c): a device is only declared
    /// gone (and torn down without asking) when every source agrees, so a lagging `_STA` or a
    /// config read racing a
    /// link retrain cannot tear down a working disk.
    fn alive<O: SlotOps>(i: SlotIndex, ops: &mut O) -> bool {
        ops.present(i) || ops.sta(i).is_some_and(|sta| sta & STA_PRESENT != 0)
    }

    fn start_eject<O: SlotOps>(&mut self, i: SlotIndex, ops: &mut O, r: &mut RunReport) {
        let present = Self::alive(i, ops);
        let child = ops.has_child(i);
        if !present && !child {
            r.failures += 1;
            ops.ost(i, SOURCE_EJECT_REQUEST, OstStatus::NonSpecificFailure);
            return;
        }
        ops.ost(i, SOURCE_EJECT_REQUEST, OstStatus::EjectInProgress);
        if child {
            let why = if present { DetachReason::Eject } else { DetachReason::Gone };
            match ops.detach_slot(i, why) {
                Ok(()) => r.detaches += 1,
                // Someone removed it under the lock before us: nothing to detach, go on.
                Err(DetachError::NoDevice) => {}
                Err(e) => {
                    let status = match e {
                        DetachError::Busy => OstStatus::DeviceBusy,
                        DetachError::InUse => OstStatus::DeviceInUse,
                        DetachError::NotOurs => OstStatus::EjectNotSupported,
                        _ => OstStatus::NonSpecificFailure,
                    };
                    if status == OstStatus::NonSpecificFailure {
                        r.failures += 1;
                    } else {
                        r.refused += 1;
                    }
                    ops.ost(i, SOURCE_EJECT_REQUEST, status);
                    return;
                }
            }
        }
        if !present || !Self::alive(i, ops) {
            // Surprise-removed before we got here: there is nothing left to eject.
            r.ejected += 1;
            ops.ost(i, SOURCE_EJECT_REQUEST, OstStatus::Success);
            return;
        }
        r.ejects += 1;
        if ops.eject(i).is_err() {
            r.failures += 1;
            ops.ost(i, SOURCE_EJECT_REQUEST, OstStatus::NonSpecificFailure);
            return;
        }
        self.continue_eject(i, 0, ops, r);
    }

    fn continue_eject<O: SlotOps>(&mut self, i: SlotIndex, tries: u16, ops: &mut O, r: &mut RunReport) {
        if !Self::alive(i, ops) {
            self.slots[i].state = SlotState::Idle;
            r.ejected += 1;
            ops.ost(i, SOURCE_EJECT_REQUEST, OstStatus::Success);
        } else if tries >= self.config.eject_confirm_tries {
            // The device ignored `_EJ0`. Its `device_t` is already deleted; a later device
            // check re-attaches it, which is better than a driverless ghost.
            self.slots[i].state = SlotState::Idle;
            r.failures += 1;
            ops.ost(i, SOURCE_EJECT_REQUEST, OstStatus::NonSpecificFailure);
        } else {
            self.slots[i].state = SlotState::EjectWait { tries: tries + 1 };
            r.rerun_after_us = Some(self.config.eject_confirm_delay_us);
        }
    }

    /// Device, bus or quiet fallback check; returns whether it succeeded (for `_OST`).
    /// `asked` is set when the platform asked (ACPI Notify 0 or 1), not only our fallback.
    ///
    /// **Occupied slots.** A slot with a live `device_t` is walked again only when the platform
    /// asked: a function may have been hot-added beside a live one, or `devctl delete`d by an
    /// administrator, and FreeBSD's acpi_pci (`BUS_RESCAN`) and Linux's acpiphp
    /// (`acpiphp_rescan_slot`, drivers/pci/hotplug/acpiphp_glue.c) both add it back on such a
    /// notify. The quiet check (periodic fallback, a lost controller) never does: it would undo
    /// an administrator's `devctl delete` every interval, and it exists to catch arrivals in
    /// empty slots and departures, which need no walk of a live slot.
    ///
    /// **Observer rule.** On a slot we do not own (acpi_pci's handler is installed there, or
    /// `acpi_mode=off`) the check changes nothing: no slot rescan, no detach, no delete; it only
    /// reports ([`SlotOps::left_alone`]). acpi_pci acts on that slot from an ACPI task under
    /// `bus_topo_lock` (`acpi_pci_device_notify_handler`, sys/dev/acpica/acpi_pci.c), and its
    /// `BUS_RESCAN` (`pci_rescan_method`, sys/dev/pci/pci.c) keeps a list of the bus's children
    /// across sleeps (detach, attach, `M_WAITOK` devinfo allocations) during which Giant, the
    /// topology lock, is given up: a child we deleted meanwhile would be deleted again from its
    /// stale list, a function we added could be added twice, and a detach of ours racing its
    /// eject makes its `device_detach` fail, so it skips `_EJ0` and the eject is lost. Only
    /// namespace rescans (inside our own driver) run on such slots.
    fn check<O: SlotOps>(&mut self, i: SlotIndex, asked: bool, ops: &mut O, r: &mut RunReport) -> bool {
        let child = ops.has_child(i);
        // Attaching needs config space; declaring a device stale needs every source to agree.
        let (attachable, alive) = if child { (false, Self::alive(i, ops)) } else { (ops.present(i), false) };
        if self.roles[i] != Role::Owner {
            let what = match (attachable, child, alive) {
                (true, false, _) => Some(LeftAlone::New),
                (_, true, false) => Some(LeftAlone::Stale),
                _ => None,
            };
            self.note_left_alone(i, what, ops, r);
            return true;
        }
        let mut left = None;
        let ok = match (attachable, child, alive) {
            (true, false, _) => {
                r.rescans += 1;
                ops.rescan_slot(i).is_ok()
            }
            (_, true, false) => match ops.detach_slot(i, DetachReason::Gone) {
                Ok(()) => {
                    r.detaches += 1;
                    r.swept += 1;
                    true
                }
                Err(DetachError::NoDevice) => true,
                // Another driver's device: left alone on purpose, not a failure of the check.
                Err(DetachError::NotOurs) => {
                    left = Some(LeftAlone::OtherDriver);
                    true
                }
                Err(_) => false,
            },
            (_, true, true) if asked => {
                r.rewalks += 1;
                ops.rescan_slot(i).is_ok()
            }
            // Already attached and only our fallback asking, or nothing there.
            _ => true,
        };
        self.note_left_alone(i, left, ops, r);
        if !ok {
            r.failures += 1;
        }
        ok
    }

    /// Counts what a check left alone and reports it when the finding changed (a periodic
    /// check that finds the same stale device again is counted, not reported again).
    fn note_left_alone<O: SlotOps>(&mut self, i: SlotIndex, what: Option<LeftAlone>, ops: &mut O, r: &mut RunReport) {
        if what.is_some() {
            r.left_alone += 1;
        }
        let slot = &mut self.slots[i];
        if let (Some(w), true) = (what, what != slot.left_alone) {
            ops.left_alone(i, w);
        }
        slot.left_alone = what;
    }
}

/// Both halves together for single-owner callers (the lab, tests). The kernel glue keeps
/// [`PendingEvents`] under its mtx(9) and the [`SlotMachine`] in the task instead.
#[derive(Debug, Clone)]
pub struct Hotplug {
    pending: PendingEvents,
    snapshot: PendingSnapshot,
    machine: SlotMachine,
}

impl Hotplug {
    /// One slot per entry of `roles`. Host-only (the lab, tests): panics when memory is short,
    /// which the kernel glue never may (it builds the halves itself and handles the error).
    pub fn new(roles: Vec<Role>, config: HotplugConfig) -> Self {
        let pending = PendingEvents::new(roles.len()).expect("host allocation");
        let snapshot = pending.snapshot_buffer().expect("host allocation");
        Hotplug { pending, snapshot, machine: SlotMachine::new(roles, config).expect("host allocation") }
    }
    /// The notify handler's work: returns true when the task must be enqueued.
    pub fn notify(&mut self, slot: SlotIndex, value: u32) -> bool {
        self.pending.notify(slot, value)
    }
    /// A namespace attribute changed event.
    pub fn namespace_changed(&mut self, slot: SlotIndex) -> bool {
        self.pending.namespace_changed(slot)
    }
    /// The pending-event half, e.g. for [`super::fallback::FallbackRescan::tick`].
    pub fn pending_mut(&mut self) -> &mut PendingEvents {
        &mut self.pending
    }
    /// The task half, read-only.
    pub fn machine(&self) -> &SlotMachine {
        &self.machine
    }
    /// The task's work.
    pub fn run_pending<O: SlotOps>(&mut self, ops: &mut O) -> RunReport {
        self.pending.take(&mut self.snapshot);
        self.machine.run(&self.snapshot, ops)
    }
}
