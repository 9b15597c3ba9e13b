//! Unit tests of the state machine against a small recording fake of one PCI bus with ACPI
//! slots. The richer model (newbus, acpi_pci's own handler, FreeBSD KPI rules) and the
//! property tests live in `kpimodel/tests/`.

use super::machine::{Hotplug, HotplugConfig};
use super::mode::Role;
use super::ost::OstStatus;
use super::slot::SlotState;
use super::slot_ops::{DetachError, DetachReason, LeftAlone, OpFailed, SlotIndex, SlotOps};
use alloc::vec;
use alloc::vec::Vec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Rescan(usize),
    Detach(usize, DetachReason),
    Ej0(usize),
    Ost(usize, u32, OstStatus),
    NsRescan(usize),
    LeftAlone(usize, LeftAlone),
}

#[derive(Default)]
struct FakeBus {
    present: Vec<bool>,
    child: Vec<bool>,
    busy: Vec<bool>,
    /// The slot's device is attached to another driver (nvme(4)): detach says NotOurs.
    foreign: Vec<bool>,
    sta: Vec<Option<u32>>,
    /// `_EJ0` removes the device at once (QEMU PIIX4 behaviour) unless this is set.
    ej0_lags: bool,
    calls: Vec<Call>,
}

impl FakeBus {
    fn new(n: usize) -> Self {
        FakeBus {
            present: vec![false; n],
            child: vec![false; n],
            busy: vec![false; n],
            foreign: vec![false; n],
            sta: vec![None; n],
            ..Default::default()
        }
    }
    fn count(&self, f: impl Fn(&Call) -> bool) -> usize {
        self.calls.iter().filter(|c| f(c)).count()
    }
    fn osts(&self, slot: usize) -> Vec<(u32, OstStatus)> {
        self.calls
            .iter()
            .filter_map(|c| match *c {
                Call::Ost(s, src, st) if s == slot => Some((src, st)),
                _ => None,
            })
            .collect()
    }
}

impl SlotOps for FakeBus {
    fn present(&mut self, slot: SlotIndex) -> bool {
        self.present[slot]
    }
    fn sta(&mut self, slot: SlotIndex) -> Option<u32> {
        self.sta[slot]
    }
    fn has_child(&mut self, slot: SlotIndex) -> bool {
        self.child[slot]
    }
    fn rescan_slot(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.calls.push(Call::Rescan(slot));
        if self.present[slot] {
            self.child[slot] = true;
        }
        Ok(())
    }
    fn detach_slot(&mut self, slot: SlotIndex, why: DetachReason) -> Result<(), DetachError> {
        self.calls.push(Call::Detach(slot, why));
        if !self.child[slot] {
            return Err(DetachError::NoDevice);
        }
        if self.foreign[slot] {
            return Err(DetachError::NotOurs);
        }
        if self.busy[slot] && why == DetachReason::Eject {
            return Err(DetachError::Busy);
        }
        self.child[slot] = false;
        Ok(())
    }
    fn eject(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.calls.push(Call::Ej0(slot));
        if !self.ej0_lags {
            self.present[slot] = false;
        }
        Ok(())
    }
    fn ost(&mut self, slot: SlotIndex, source: u32, status: OstStatus) {
        self.calls.push(Call::Ost(slot, source, status));
    }
    fn rescan_namespaces(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.calls.push(Call::NsRescan(slot));
        Ok(())
    }
    fn left_alone(&mut self, slot: SlotIndex, what: LeftAlone) {
        self.calls.push(Call::LeftAlone(slot, what));
    }
}

fn owner(n: usize) -> Hotplug {
    Hotplug::new(vec![Role::Owner; n], HotplugConfig::default())
}

#[test]
fn hundred_device_checks_make_one_rescan() {
    let mut hp = owner(4);
    let mut bus = FakeBus::new(4);
    bus.present[2] = true;
    let enqueued = (0..100).filter(|_| hp.notify(2, 1)).count();
    assert_eq!(enqueued, 1, "the task is enqueued once per batch");
    let r = hp.run_pending(&mut bus);
    assert_eq!(r.rescans, 1);
    assert_eq!(bus.calls, vec![Call::Rescan(2), Call::Ost(2, 1, OstStatus::Success)]);
    // A second storm on an attached slot: one walk of the occupied slot (it may hold a new
    // function beside the live one), counted apart, not a rescan of an empty slot.
    bus.calls.clear();
    for _ in 0..100 {
        hp.notify(2, 1);
    }
    let r = hp.run_pending(&mut bus);
    assert_eq!((r.rescans, r.rewalks), (0, 1));
    assert_eq!(bus.calls, vec![Call::Rescan(2), Call::Ost(2, 1, OstStatus::Success)]);
}

/// A live occupied slot is walked again only when the platform asks (Notify 0 or 1): the
/// periodic quiet check leaves it alone, so an administrator's `devctl delete` of one function
/// is not undone every interval. Fails when the quiet check walks live slots, or a device check
/// of an occupied slot does nothing (a function hot-added beside a live one never attaches).
#[test]
fn only_a_platform_check_walks_an_occupied_slot() {
    let mut hp = owner(2);
    let mut bus = FakeBus::new(2);
    bus.present[1] = true;
    bus.child[1] = true;
    assert!(hp.pending_mut().check_all_quietly());
    let r = hp.run_pending(&mut bus);
    assert_eq!((r.rescans, r.rewalks, r.detaches), (0, 0, 0));
    assert!(bus.calls.is_empty(), "{:?}", bus.calls);
    for code in [0, 1] {
        hp.notify(1, code);
        let r = hp.run_pending(&mut bus);
        assert_eq!((r.rescans, r.rewalks, r.failures), (0, 1, 0), "Notify {code}");
        assert_eq!(bus.calls, vec![Call::Rescan(1), Call::Ost(1, code, OstStatus::Success)], "Notify {code}");
        bus.calls.clear();
    }
}

#[test]
fn device_check_rescans_only_that_slot() {
    let mut hp = owner(8);
    let mut bus = FakeBus::new(8);
    bus.present[3] = true;
    bus.present[5] = true; // present, not notified: must not be touched
    hp.notify(3, 1);
    hp.run_pending(&mut bus);
    assert_eq!(bus.count(|c| matches!(c, Call::Rescan(_))), 1);
    assert!(bus.child[3] && !bus.child[5]);
}

#[test]
fn eject_of_empty_slot_fails_without_detach_or_ej0() {
    let mut hp = owner(2);
    let mut bus = FakeBus::new(2);
    hp.notify(1, 3);
    let r = hp.run_pending(&mut bus);
    assert_eq!(bus.osts(1), vec![(3, OstStatus::NonSpecificFailure)]);
    assert_eq!(bus.count(|c| matches!(c, Call::Detach(..) | Call::Ej0(_))), 0);
    assert_eq!(r.failures, 1);
}

#[test]
fn eject_of_busy_controller_reports_busy_and_keeps_device() {
    let mut hp = owner(2);
    let mut bus = FakeBus::new(2);
    bus.present[0] = true;
    bus.child[0] = true;
    bus.busy[0] = true;
    hp.notify(0, 3);
    let r = hp.run_pending(&mut bus);
    assert_eq!(bus.osts(0), vec![(3, OstStatus::EjectInProgress), (3, OstStatus::DeviceBusy)]);
    assert_eq!(bus.count(|c| matches!(c, Call::Ej0(_))), 0);
    assert!(bus.present[0] && bus.child[0]);
    assert_eq!(r.refused, 1);
}

#[test]
fn eject_detaches_then_ej0_then_success() {
    let mut hp = owner(1);
    let mut bus = FakeBus::new(1);
    bus.present[0] = true;
    bus.child[0] = true;
    hp.notify(0, 3);
    hp.notify(0, 3);
    hp.run_pending(&mut bus);
    assert_eq!(
        bus.calls,
        vec![
            Call::Ost(0, 3, OstStatus::EjectInProgress),
            Call::Detach(0, DetachReason::Eject),
            Call::Ej0(0),
            Call::Ost(0, 3, OstStatus::Success),
        ]
    );
}

#[test]
fn slow_eject_is_rechecked_and_duplicates_are_absorbed() {
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig { eject_confirm_tries: 3, eject_confirm_delay_us: 10 });
    let mut bus = FakeBus::new(1);
    bus.present[0] = true;
    bus.child[0] = true;
    bus.ej0_lags = true;
    hp.notify(0, 3);
    let r = hp.run_pending(&mut bus);
    assert_eq!(r.rerun_after_us, Some(10));
    assert_eq!(hp.machine().state(0), Some(SlotState::EjectWait { tries: 1 }));
    // The platform repeats its request and sends a device check while we wait.
    hp.notify(0, 3);
    hp.notify(0, 1);
    hp.run_pending(&mut bus);
    assert_eq!(bus.count(|c| matches!(c, Call::Ej0(_))), 1, "no second _EJ0");
    assert_eq!(bus.count(|c| matches!(c, Call::Rescan(_))), 0, "a leaving device is not re-attached");
    bus.present[0] = false;
    let r = hp.run_pending(&mut bus);
    assert_eq!(r.ejected, 1);
    assert_eq!(hp.machine().state(0), Some(SlotState::Idle));
    assert_eq!(bus.osts(0).last(), Some(&(1, OstStatus::Success)), "the deferred check ran afterwards");
}

#[test]
fn eject_that_never_completes_reports_failure() {
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig { eject_confirm_tries: 2, eject_confirm_delay_us: 1 });
    let mut bus = FakeBus::new(1);
    bus.present[0] = true;
    bus.child[0] = true;
    bus.ej0_lags = true;
    hp.notify(0, 3);
    let mut runs = 0;
    while hp.run_pending(&mut bus).rerun_after_us.is_some() {
        runs += 1;
        assert!(runs < 10, "re-checks must be bounded");
    }
    assert_eq!(bus.osts(0).last(), Some(&(3, OstStatus::NonSpecificFailure)));
    assert_eq!(hp.machine().state(0), Some(SlotState::Idle));
}

#[test]
fn surprise_removed_device_is_swept_without_ej0() {
    let mut hp = owner(1);
    let mut bus = FakeBus::new(1);
    bus.child[0] = true; // device_t still there, config space gone
    hp.notify(0, 3);
    hp.run_pending(&mut bus);
    assert_eq!(bus.count(|c| matches!(c, Call::Detach(0, DetachReason::Gone))), 1);
    assert_eq!(bus.count(|c| matches!(c, Call::Ej0(_))), 0);
    assert_eq!(bus.osts(0).last(), Some(&(3, OstStatus::Success)));
}

#[test]
fn fallback_check_sweeps_stale_devices_quietly() {
    let mut hp = owner(3);
    let mut bus = FakeBus::new(3);
    bus.child[1] = true;
    bus.present[2] = true;
    assert!(super::fallback::FallbackRescan::new(1000).tick(hp.pending_mut()));
    assert!(!super::fallback::FallbackRescan::new(0).tick(hp.pending_mut()), "disabled by default");
    let r = hp.run_pending(&mut bus);
    assert_eq!((r.swept, r.rescans), (1, 1));
    assert_eq!(bus.count(|c| matches!(c, Call::Ost(..) | Call::Ej0(_))), 0);
}

#[test]
fn observer_never_acts_on_acpi_events() {
    let mut hp = Hotplug::new(vec![Role::Observer; 2], HotplugConfig::default());
    let mut bus = FakeBus::new(2);
    bus.present[0] = true;
    bus.child[0] = true;
    hp.notify(0, 3);
    hp.notify(1, 1);
    hp.notify(0, 0x80);
    let r = hp.run_pending(&mut bus);
    assert!(bus.calls.is_empty(), "{:?}", bus.calls);
    assert_eq!(r.ignored, 2);
    // Namespace changes come from the controller, not ACPI: they still run.
    hp.namespace_changed(0);
    hp.run_pending(&mut bus);
    assert_eq!(bus.calls, vec![Call::NsRescan(0)]);
}

#[test]
fn bus_and_device_check_share_one_rescan_and_each_get_an_answer() {
    let mut hp = owner(1);
    let mut bus = FakeBus::new(1);
    bus.present[0] = true;
    hp.notify(0, 0);
    hp.notify(0, 1);
    hp.run_pending(&mut bus);
    assert_eq!(
        bus.calls,
        vec![Call::Rescan(0), Call::Ost(0, 0, OstStatus::Success), Call::Ost(0, 1, OstStatus::Success)]
    );
}

#[test]
fn unrecognized_notify_is_answered() {
    let mut hp = owner(1);
    let mut bus = FakeBus::new(1);
    hp.notify(0, 2);
    hp.run_pending(&mut bus);
    assert_eq!(bus.calls, vec![Call::Ost(0, 2, OstStatus::UnrecognizedNotify)]);
}

#[test]
fn a_device_is_stale_only_when_config_space_and_sta_agree() {
    let mut hp = owner(1);
    let mut bus = FakeBus::new(1);
    bus.child[0] = true;
    bus.sta[0] = Some(0xf); // firmware still says present, config space already gone
    hp.notify(0, 1);
    hp.run_pending(&mut bus);
    assert_eq!(bus.count(|c| matches!(c, Call::Detach(..))), 0, "not torn down on one source");
    bus.sta[0] = Some(0);
    hp.notify(0, 1);
    let r = hp.run_pending(&mut bus);
    assert_eq!(r.swept, 1);
    assert_eq!(bus.count(|c| matches!(c, Call::Detach(0, DetachReason::Gone))), 1);
}

#[test]
fn attaching_needs_config_space() {
    let mut hp = owner(1);
    let mut bus = FakeBus::new(1);
    bus.sta[0] = Some(0xf); // _STA present, but the function does not answer yet
    hp.notify(0, 1);
    hp.run_pending(&mut bus);
    assert_eq!(bus.count(|c| matches!(c, Call::Rescan(_))), 0);
    bus.present[0] = true;
    hp.notify(0, 1);
    hp.run_pending(&mut bus);
    assert!(bus.child[0]);
}

/// On slots we only observe (acpi_pci's handler acts there), a quiet check (fallback rescan, a
/// controller that saw itself vanish) neither sweeps a stale device nor adds a new function: it
/// only reports both. Owned slots in the same run are still swept and rescanned.
#[test]
fn observed_slots_are_never_swept_or_rescanned() {
    let mut hp = Hotplug::new(vec![Role::Observer, Role::Observer, Role::Owner], HotplugConfig::default());
    let mut bus = FakeBus::new(3);
    bus.child[0] = true; // stale: config space gone, no _STA
    bus.present[1] = true; // new function, no device_t
    bus.child[2] = true; // stale on a slot we own
    assert!(hp.pending_mut().check_all_quietly());
    let r = hp.run_pending(&mut bus);
    assert_eq!(
        bus.calls,
        vec![Call::LeftAlone(0, LeftAlone::Stale), Call::LeftAlone(1, LeftAlone::New), Call::Detach(2, DetachReason::Gone)]
    );
    assert_eq!((r.left_alone, r.swept, r.rescans, r.failures), (2, 1, 0, 0));
    assert!(bus.child[0], "the observed slot's stale device_t is still there");
    // The next tick finds the same: counted, not reported again.
    bus.calls.clear();
    hp.pending_mut().check_all_quietly();
    assert_eq!(hp.run_pending(&mut bus).left_alone, 2);
    assert!(bus.calls.is_empty(), "{:?}", bus.calls);
}

/// Another driver's device (nvme(4)) on a slot we own: a sweep leaves it (not a failure) and
/// an eject request is refused with `_OST` 0x80 before `_EJ0`.
#[test]
fn other_drivers_devices_are_neither_swept_nor_ejected() {
    let mut hp = owner(2);
    let mut bus = FakeBus::new(2);
    bus.child[0] = true;
    bus.foreign[0] = true; // stale nvme(4) device
    bus.child[1] = true;
    bus.present[1] = true;
    bus.foreign[1] = true; // live nvme(4) device
    hp.pending_mut().check_all_quietly();
    let r = hp.run_pending(&mut bus);
    assert_eq!((r.left_alone, r.swept, r.failures), (1, 0, 0));
    assert!(bus.child[0]);
    assert_eq!(bus.count(|c| matches!(c, Call::LeftAlone(0, LeftAlone::OtherDriver))), 1);
    hp.notify(1, 3);
    let r = hp.run_pending(&mut bus);
    assert_eq!(r.refused, 1);
    assert_eq!(bus.count(|c| matches!(c, Call::Ej0(_))), 0);
    assert_eq!(bus.osts(1), vec![(3, OstStatus::EjectInProgress), (3, OstStatus::EjectNotSupported)]);
}
