//! The hotplug state machine on the modelled PCI bus with ACPI slots and acpi_pci's own
//! handler: notify storms, empty-slot and busy ejects, the acpi_mode invariant, and random
//! sequences (proptest).

use kpimodel::{Actor, Rule, SlotEvent, SlotWorld};
use nvme_hotplug::hotplug::machine::{Hotplug, HotplugConfig};
use nvme_hotplug::hotplug::mode::{resolve, AcpiMode, InTreeHandler, Role};
use nvme_hotplug::hotplug::ost::OstStatus;
use proptest::prelude::*;

/// Runs our task until it has nothing left to do (including eject re-checks), bounded.
fn settle(hp: &mut Hotplug, w: &mut SlotWorld) {
    for _ in 0..100 {
        if hp.run_pending(w).rerun_after_us.is_none() && !hp.pending_mut().is_queued() {
            return;
        }
    }
    panic!("hotplug task never settled");
}

fn setup(n: usize, mode: AcpiMode, in_tree: InTreeHandler) -> (Hotplug, SlotWorld) {
    let mut w = SlotWorld::new(n);
    let mut roles = Vec::new();
    for i in 0..n {
        let r = resolve(mode, in_tree);
        let in_tree_active = nvme_hotplug::hotplug::mode::in_tree_active(in_tree, r);
        w.set_handlers(i, in_tree_active, r.install_ours);
        roles.push(r.role);
    }
    (Hotplug::new(roles, HotplugConfig::default()), w)
}

fn clean(w: &SlotWorld) {
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
}

#[test]
fn hundred_device_checks_are_one_rescan() {
    let (mut hp, mut w) = setup(4, AcpiMode::Own, InTreeHandler::Absent);
    w.insert(1);
    let enqueues = (0..100).filter(|_| w.firmware_notify(1, 1, &mut hp)).count();
    assert_eq!(enqueues, 1);
    settle(&mut hp, &mut w);
    assert_eq!(w.count(|e| matches!(e, SlotEvent::Attach { .. })), 1);
    assert_eq!(w.osts(1), vec![(1, OstStatus::Success)]);
    assert!(w.is_attached(1));
    clean(&w);
}

#[test]
fn eject_request_for_an_empty_slot() {
    let (mut hp, mut w) = setup(2, AcpiMode::Own, InTreeHandler::Absent);
    w.firmware_notify(0, 3, &mut hp);
    settle(&mut hp, &mut w);
    assert_eq!(w.osts(0), vec![(3, OstStatus::NonSpecificFailure)]);
    assert_eq!(w.count(|e| matches!(e, SlotEvent::Detach { .. } | SlotEvent::Ej0 { .. })), 0);
    clean(&w);
}

#[test]
fn eject_of_a_busy_controller() {
    let (mut hp, mut w) = setup(2, AcpiMode::Own, InTreeHandler::Absent);
    w.insert(0);
    w.firmware_notify(0, 1, &mut hp);
    settle(&mut hp, &mut w);
    w.set_busy(0, true);
    w.firmware_notify(0, 3, &mut hp);
    settle(&mut hp, &mut w);
    assert_eq!(w.osts(0)[1..], [(3, OstStatus::EjectInProgress), (3, OstStatus::DeviceBusy)]);
    assert_eq!(w.count(|e| matches!(e, SlotEvent::Ej0 { .. })), 0);
    assert!(w.is_attached(0) && w.is_present(0));
    // Once released, the platform's retry succeeds.
    w.set_busy(0, false);
    w.firmware_notify(0, 3, &mut hp);
    settle(&mut hp, &mut w);
    assert_eq!(w.osts(0).last(), Some(&(3, OstStatus::Success)));
    assert!(!w.is_present(0) && !w.is_attached(0));
    clean(&w);
}

#[test]
fn with_sta_and_a_slow_eject() {
    let (mut hp, mut w) = setup(1, AcpiMode::Auto, InTreeHandler::Absent);
    w.set_has_sta(0, true);
    w.set_ej0_lags(0, true);
    w.insert(0);
    w.firmware_notify(0, 1, &mut hp);
    settle(&mut hp, &mut w);
    w.firmware_notify(0, 3, &mut hp);
    let r = hp.run_pending(&mut w);
    assert!(r.rerun_after_us.is_some());
    w.firmware_notify(0, 3, &mut hp); // platform impatient
    hp.run_pending(&mut w);
    w.complete_eject(0);
    settle(&mut hp, &mut w);
    assert_eq!(w.count(|e| matches!(e, SlotEvent::Ej0 { .. })), 1);
    assert_eq!(w.osts(0).last(), Some(&(3, OstStatus::Success)));
    clean(&w);
}

/// Every mode, with and without acpi_pci's handler on the slot: an insert + device check and
/// an eject request produce exactly one attach, one detach and one `_EJ0`.
#[test]
fn no_double_detach_or_ej0_in_any_mode() {
    for mode in [AcpiMode::Auto, AcpiMode::Own, AcpiMode::Off] {
        for in_tree in [InTreeHandler::Absent, InTreeHandler::Removable, InTreeHandler::Fixed] {
            let (mut hp, mut w) = setup(2, mode, in_tree);
            let r = resolve(mode, in_tree);
            let someone_handles = r.role == Role::Owner || in_tree != InTreeHandler::Absent;
            w.insert(1);
            w.firmware_notify(1, 1, &mut hp);
            settle(&mut hp, &mut w);
            w.firmware_notify(1, 3, &mut hp);
            w.firmware_notify(1, 3, &mut hp);
            settle(&mut hp, &mut w);
            let ctx = format!("{mode:?}/{in_tree:?}: {:?}", w.log);
            assert!(w.violations.is_empty(), "{ctx}: {:?}", w.violations);
            let detaches = w.count(|e| matches!(e, SlotEvent::Detach { by: Actor::Ours | Actor::InTree, .. }));
            let ej0s = w.count(|e| matches!(e, SlotEvent::Ej0 { .. }));
            if someone_handles {
                assert_eq!((detaches, ej0s), (1, 1), "{ctx}");
                assert!(!w.is_present(1), "{ctx}");
            } else {
                // mode=off without acpi_pci: nobody listens; the device stays (documented).
                assert_eq!((detaches, ej0s), (0, 0), "{ctx}");
            }
            let ours = w.count(|e| matches!(e, SlotEvent::Ej0 { by: Actor::Ours, .. }));
            assert_eq!(ours > 0, r.role == Role::Owner && someone_handles, "{ctx}");
        }
    }
}

/// Negative control: ignore the mode resolution and let both handlers loose. The model must
/// catch the double detach / double `_EJ0` (if it did not, the test above proves nothing).
#[test]
fn both_handlers_active_is_caught() {
    let mut w = SlotWorld::new(1);
    w.set_handlers(0, true, true);
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig::default());
    w.insert(0);
    w.firmware_notify(0, 1, &mut hp);
    settle(&mut hp, &mut w);
    w.set_ej0_lags(0, true); // like real hardware: _EJ0 takes a moment
    w.firmware_notify(0, 3, &mut hp);
    settle(&mut hp, &mut w);
    assert!(
        w.violations.iter().any(|v| matches!(v.rule, Rule::DoubleEject | Rule::DoubleDetach | Rule::DetachWithoutDevice)),
        "{:?} / {:?}",
        w.violations,
        w.log
    );
}

#[derive(Debug, Clone)]
enum Op {
    Insert(usize),
    SurpriseRemove(usize),
    Notify(usize, u32),
    Storm(usize, u32, u8),
    Busy(usize, bool),
    Run,
    Fallback,
    NsChange(usize),
    CompleteEject(usize),
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    let notify = prop_oneof![Just(0u32), Just(1), Just(3), Just(3), Just(2), Just(0x80)];
    prop_oneof![
        (0..n).prop_map(Op::Insert),
        (0..n).prop_map(Op::SurpriseRemove),
        ((0..n), notify.clone()).prop_map(|(s, v)| Op::Notify(s, v)),
        ((0..n), notify, 2u8..50).prop_map(|(s, v, k)| Op::Storm(s, v, k)),
        ((0..n), any::<bool>()).prop_map(|(s, b)| Op::Busy(s, b)),
        Just(Op::Run),
        Just(Op::Run),
        Just(Op::Fallback),
        (0..n).prop_map(Op::NsChange),
        (0..n).prop_map(Op::CompleteEject),
    ]
}

fn mode() -> impl Strategy<Value = (AcpiMode, InTreeHandler)> {
    (
        prop_oneof![Just(AcpiMode::Auto), Just(AcpiMode::Own), Just(AcpiMode::Off)],
        prop_oneof![Just(InTreeHandler::Absent), Just(InTreeHandler::Removable), Just(InTreeHandler::Fixed)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random notifies, insertions, surprise removals and busy flags, in every mode: never a
    /// double `_EJ0`, a double detach, a detach without device, an `_EJ0` of an attached
    /// device, or a panic; every `_EJ0` of ours was preceded by "in progress" and followed by
    /// a final `_OST`.
    #[test]
    fn random_sequences_keep_the_invariants(
        (m, t) in mode(),
        sta in any::<bool>(),
        lag in any::<bool>(),
        ops in proptest::collection::vec(op(3), 1..60),
    ) {
        let (mut hp, mut w) = setup(3, m, t);
        for i in 0..3 {
            w.set_has_sta(i, sta);
            // A slow _EJ0 only where we own the slot: acpi_pci itself re-ejects a ghost left by a
            // slow _EJ0 (its rescan keeps the detached device_t), which is the kernel's problem.
            w.set_ej0_lags(i, lag && hp.machine().role(i) == Some(Role::Owner));
        }
        let fallback = nvme_hotplug::hotplug::fallback::FallbackRescan::new(1000);
        for o in ops {
            match o {
                Op::Insert(s) => { w.insert(s); }
                Op::SurpriseRemove(s) => w.surprise_remove(s),
                Op::Notify(s, v) => { w.firmware_notify(s, v, &mut hp); }
                Op::Storm(s, v, k) => for _ in 0..k { w.firmware_notify(s, v, &mut hp); },
                Op::Busy(s, b) => w.set_busy(s, b),
                Op::Run => { hp.run_pending(&mut w); }
                Op::Fallback => { fallback.tick(hp.pending_mut()); }
                Op::NsChange(s) => { hp.namespace_changed(s); }
                Op::CompleteEject(s) => w.complete_eject(s),
            }
            prop_assert!(w.violations.is_empty(), "{:?}\nlog: {:?}", w.violations, w.log);
        }
        for s in 0..3 { w.complete_eject(s); }
        settle(&mut hp, &mut w);
        prop_assert!(w.violations.is_empty(), "{:?}\nlog: {:?}", w.violations, w.log);
        // _OST discipline for our ejects.
        for s in 0..3 {
            let osts: Vec<_> = w.osts(s).into_iter().filter(|(src, _)| *src == 3).collect();
            let mut open = false;
            for (_, st) in osts {
                if st == OstStatus::EjectInProgress {
                    prop_assert!(!open, "two 'in progress' without a final status on slot {}", s);
                    open = true;
                } else {
                    open = false;
                }
            }
            prop_assert!(!open, "eject on slot {} never got a final _OST", s);
        }
        // After a quiet fallback check, on a slot we own every present device has a device_t and
        // no stale one is left; a slot we only observe is left exactly as it was (the observer
        // rule: acpi_pci, or nobody with acpi_mode=off, changes its topology, never our task).
        let observed: Vec<(usize, bool)> =
            (0..3).filter(|&s| hp.machine().role(s) != Some(Role::Owner)).map(|s| (s, w.is_attached(s))).collect();
        fallback.tick(hp.pending_mut());
        settle(&mut hp, &mut w);
        for s in 0..3 {
            if hp.machine().role(s) == Some(Role::Owner) {
                prop_assert_eq!(w.is_present(s), w.is_attached(s), "slot {} after a fallback check: {:?}", s, w.log);
            }
        }
        for (s, attached) in observed {
            prop_assert_eq!(w.is_attached(s), attached, "observed slot {} changed by a fallback check: {:?}", s, w.log);
        }
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
    }
}

/// The bus model's own checks, each provoked directly through `SlotOps`.
#[test]
fn bus_model_checks_each_fire() {
    use nvme_hotplug::hotplug::slot_ops::{DetachReason, SlotOps};
    // Detach of a slot without device_t.
    let mut w = SlotWorld::new(1);
    let _ = w.detach_slot(0, DetachReason::Eject);
    assert!(w.violations.iter().any(|v| v.rule == Rule::DetachWithoutDevice));
    // _EJ0 with the driver still attached.
    let mut w = SlotWorld::new(1);
    w.insert(0);
    w.rescan_slot(0).unwrap();
    w.eject(0).unwrap();
    assert!(w.violations.iter().any(|v| v.rule == Rule::EjectAttached));
    // _EJ0 twice for one insertion (slow eject).
    let mut w = SlotWorld::new(1);
    w.set_ej0_lags(0, true);
    w.insert(0);
    w.eject(0).unwrap();
    w.eject(0).unwrap();
    assert!(w.violations.iter().any(|v| v.rule == Rule::DoubleEject));
    // Ours on an empty slot.
    let mut w = SlotWorld::new(1);
    w.eject(0).unwrap();
    assert!(w.violations.iter().any(|v| v.rule == Rule::DoubleEject));
    // A device detached by acpi_pci, then by us.
    let mut w = SlotWorld::new(1);
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig::default());
    w.set_handlers(0, true, false);
    w.set_ej0_lags(0, true);
    w.insert(0);
    w.bus_rescan();
    w.firmware_notify(0, 3, &mut hp); // acpi_pci: detach, _EJ0 (slow), rescan keeps the ghost
    let _ = w.detach_slot(0, DetachReason::Eject);
    assert!(w.violations.iter().any(|v| v.rule == Rule::DoubleDetach), "{:?}", w.violations);
}
