//! Host tests of the single-slot rescan ([`super::slot_rescan`]) against the fake pci0 of
//! [`fake_kernel`]: the walk skips functions that already have a child, refuses ARI, and looks
//! each new child up again before probing it. (The module has no
//! way to run a whole-bus `BUS_RESCAN`: it does not bind it, and check-ko's kpi-symbols rule
//! would catch an import of `bus_rescan_desc`.)
//!
//! What the walk does on QEMU's devices is asserted of the shipped .ko in
//! kldhost/tests/multifunction.rs (a check reads and adds only its own slot's functions; an
//! empty, hidden or known slot adds nothing; a single-function slot's functions 1..7 are never
//! read; a multi-function slot's new functions are all added before the first is probed, its
//! known ones neither re-added nor re-probed; a slot whose function 0 says an unknown header
//! layout is skipped).
//!
//! [`fake_kernel`]: super::fake_kernel

use super::bindings;
use super::bus_topo::TopoLock;
use super::fake_kernel::{self as fk, FakeFn, Knobs};
use super::pci_bus::PciBus;
use super::slot_rescan::{rescan_slot, SlotScan, WalkError};
use std::string::String;
use std::vec::Vec;

fn pci0() -> PciBus {
    // SAFETY: the fakes never dereference device pointers.
    PciBus::new(unsafe { super::device::Device::from_raw(fk::PCI0 as bindings::device_t) }.unwrap())
}

const NEW: FakeFn = FakeFn { vendor: 0x1b36, hdrtype: 0, child: false };
const MF_NEW: FakeFn = FakeFn { vendor: 0x1b36, hdrtype: bindings::PCIM_MFDEV as u8, child: false };
const MF_KNOWN: FakeFn = FakeFn { vendor: 0x1b36, hdrtype: bindings::PCIM_MFDEV as u8, child: true };
/// Removed under a device_t: reads all-ones, the stale child is still there.
const STALE: FakeFn = FakeFn { vendor: 0xffff, hdrtype: 0, child: true };

fn matching(log: &[String], prefix: &str) -> Vec<String> {
    log.iter().filter(|l| l.starts_with(prefix)).cloned().collect()
}

fn run(slot: u8) -> (Result<SlotScan, WalkError>, Vec<String>) {
    fk::record("-- rescan --");
    let r = {
        let topo = TopoLock::lock();
        rescan_slot(&topo, &pci0(), slot)
    };
    let log = fk::log();
    let from = log.iter().position(|l| l == "-- rescan --").unwrap();
    (r, log[from..].to_vec())
}

/// ARI below the bridge (PCIB_MAXFUNCS above 7): the slot number does not group functions, so
/// the walk refuses before reading or adding anything.
#[test]
fn ari_below_the_bridge_refuses_the_walk() {
    fk::reset(Knobs::default());
    fk::set_function(3, 0, NEW);
    fk::set_max_funcs(255);
    let (r, log) = run(3);
    assert_eq!(r, Err(WalkError::Ari(255)));
    assert!(fk::config_reads().is_empty() && matching(&log, "pci_").is_empty(), "{log:#?}");
}

/// The whole path: a Device Check notification on the slot reaches the hotplug task, whose
/// rescan adds and attaches the new controller in slot 3 alone (slot 5's new function stays
/// unknown); with ARI the walk cannot be done and the check fails (`_OST` 0x1) and says that
/// `devctl rescan` would do it, adding nothing.
#[test]
fn a_device_check_notification_rescans_the_slot_not_the_bus() {
    use super::module::nvmehp_modevent;
    let _serial = super::glue_tests::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for ari in [false, true] {
        fk::reset(Knobs::default());
        let (null, arg) = (core::ptr::null_mut(), core::ptr::null_mut());
        assert_eq!(nvmehp_modevent(null, bindings::MOD_LOAD as i32, arg), 0);
        fk::run_queued(); // discovery
        fk::set_function(3, 0, NEW); // the platform inserted a controller
        fk::set_function(5, 0, NEW); // and something newbus does not know sits in slot 5
        if ari {
            fk::set_max_funcs(255);
        }
        fk::record("-- device check --");
        fk::deliver_notify(1);
        fk::run_queued();
        let log = fk::log();
        let from = log.iter().position(|l| l == "-- device check --").unwrap();
        let log = &log[from..];
        if ari {
            assert!(matching(log, "pci_add_child").is_empty(), "{log:#?}");
            assert!(log.iter().any(|l| l.contains("ARI is enabled") && l.contains("`devctl rescan pci0` does")), "{log:#?}");
            let slot = fk::SLOT3 as *const u8;
            assert!(log.iter().any(|l| l == &std::format!("AcpiEvaluateObject {slot:p} _OST(0x1, 0x1)")), "{log:#?}");
        } else {
            assert_eq!(matching(log, "device_probe_and_attach"), ["device_probe_and_attach 3.0"], "{log:#?}");
            assert!(log.iter().any(|l| l.contains("1 new functions, 1 attached")), "{log:#?}");
            assert!(!fk::function(5, 0).child);
        }
        assert_eq!(nvmehp_modevent(null, bindings::MOD_QUIESCE as i32, arg), 0);
        assert_eq!(nvmehp_modevent(null, bindings::MOD_UNLOAD as i32, arg), 0);
    }
}

/// The new children are probed one after the other, and each probe_and_attach sleeps (the
/// driver's attach brings the controller up) and so gives up the topology lock: another thread
/// (`devctl delete`, or the platform's surprise removal handled by someone else) deleted
/// function 3 while function 1 attached. The walk must not probe function 3's freed
/// device_t; it looks each function up again. Before the fix it probed the device_t it had
/// kept from the add.
#[test]
fn a_new_child_deleted_while_another_attaches_is_not_probed() {
    fk::reset(Knobs::default());
    fk::set_function(3, 0, MF_KNOWN);
    fk::set_function(3, 1, MF_NEW);
    fk::set_function(3, 3, NEW);
    fk::on_probed(Some(|dev| {
        if dev == fk::function_device(3, 1) {
            fk::delete_function_child(3, 3);
        }
    }));
    let (r, log) = run(3);
    fk::on_probed(None);
    assert!(matching(&log, "device_probe_and_attach 3.3").is_empty(), "a freed device_t was probed: {log:#?}");
    assert_eq!(matching(&log, "device_probe_and_attach"), ["device_probe_and_attach 3.1"], "{log:#?}");
    assert_eq!(r, Ok(SlotScan { present: 3, added: 2, attached: 1 }), "{log:#?}");
}

/// A surprise removal in the middle of a hot-added controller's bring-up: its attach fails
/// (the function reads all-ones) and device_attach keeps the child, driverless. The walk
/// deletes that child again, so the controller plugged into the slot next is added and
/// attached by the next device check. Before the fix the stale child stayed, and the next
/// check skipped the new controller (kldhost's bringup-removal-sweep in kld mode found it).
#[test]
fn a_child_whose_function_left_during_its_attach_is_deleted_so_the_next_controller_attaches() {
    fk::reset(Knobs::default());
    fk::set_function(6, 0, NEW);
    fk::on_probed(Some(|dev| {
        if dev == fk::function_device(6, 0) {
            // The platform ejects the slot while the driver brings the controller up.
            fk::set_function(6, 0, STALE);
        }
    }));
    let (r, log) = run(6);
    fk::on_probed(None);
    assert_eq!(r, Ok(SlotScan { present: 1, added: 1, attached: 0 }), "{log:#?}");
    assert_eq!(matching(&log, "device_delete_child").len(), 1, "the failed child was not deleted: {log:#?}");
    assert!(!fk::function(6, 0).child, "{log:#?}");
    // The next controller in that slot (the log from the second check's marker on).
    fk::set_function(6, 0, NEW);
    let (r, log) = run(6);
    let log = log[log.iter().rposition(|l| l == "-- rescan --").unwrap()..].to_vec();
    assert_eq!(r, Ok(SlotScan { present: 1, added: 1, attached: 1 }), "{log:#?}");
    assert_eq!(matching(&log, "pci_add_child").len(), 1, "{log:#?}");
    assert_eq!(matching(&log, "device_probe_and_attach"), ["device_probe_and_attach 6.0"], "{log:#?}");
}
