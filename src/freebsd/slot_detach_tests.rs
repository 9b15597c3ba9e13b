//! Host tests of the hotplug task's slot detach (`slots.rs`, `SlotOps::detach_slot`) against
//! the fake kernel's pci0 and newbus model: a `device_t` is looked up again after the detach
//! that slept (another thread may have deleted it, or attached a driver to it, meanwhile), and
//! a multi-function slot is refused whole, before anything is detached.

use super::fake_kernel::{self as fk, DevState, FakeFn, Knobs};
use super::fake_nvme::FakeNvme;
use super::glue_tests::SERIAL;
use std::string::String;
use std::vec::Vec;

fn positions(log: &[String], what: &str) -> Vec<usize> {
    log.iter().enumerate().filter(|(_, l)| l.contains(what)).map(|(i, _)| i).collect()
}

fn from(log: &[String], mark: &str) -> usize {
    *positions(log, mark).last().unwrap_or_else(|| panic!("no `{mark}` in {log:#?}"))
}

/// The module loaded on the fake `\_SB_.PCI0` (slot 3 ours: pci0 is not acpi_pci's), and
/// our controller in slot 3 function 0, attached through DEVICE_ATTACH in the newbus model.
fn loaded_with_controller() {
    fk::reset(Knobs { rman_size: 0x4000, pci_vendor: 0x1b36, d_gone_at_once: true, ..Knobs::default() });
    super::module::reset_for_tests();
    fk::insert_slot3(0x1b36);
    assert_eq!(fk::kldload(), 0);
    fk::run_queued(); // discovery
    assert_eq!(positions(&fk::log(), "AcpiInstallNotifyHandler").len(), 1);
    fk::install_nvme(FakeNvme::new(false, false));
    fk::newbus_add(fk::fake_device());
    assert_eq!(fk::newbus_attach(fk::fake_device()), 0, "attach: {:#?}", fk::log());
}

/// An eject request acted on by the task; returns the log from `mark` on.
fn eject(mark: &str) -> Vec<String> {
    fk::record(mark);
    fk::deliver_notify(3);
    fk::run_queued();
    let log = fk::log();
    log[from(&log, mark)..].to_vec()
}

fn ej0(log: &[String]) -> usize {
    positions(log, &std::format!("acpi_SetInteger {:p} _EJ0(1)", fk::SLOT3 as *const u8)).len()
}

/// Our detach sleeps, and a sleeping thread gives up the topology lock: `devctl delete` (or a
/// rescan) deleted the device meanwhile. The task must not delete the device_t again (newbus
/// freed it); it goes on with the eject. Before the fix it called device_delete_child with the
/// freed device_t.
#[test]
fn a_device_deleted_while_its_detach_slept_is_not_deleted_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    loaded_with_controller();
    fk::on_detached(Some(|dev| {
        if dev == fk::function_device(3, 0) {
            fk::delete_function_child(3, 0);
        }
    }));
    let log = eject("-- eject, deleted meanwhile --");
    fk::on_detached(None);
    assert_eq!(positions(&log, "device_detach").len(), 1, "{log:#?}");
    assert!(positions(&log, "freed device_t").is_empty(), "device_delete_child of a freed device_t: {log:#?}");
    assert!(positions(&log, "device_delete_child 0x").is_empty(), "{log:#?}");
    assert_eq!(ej0(&log), 1, "the slot is empty: the eject goes on: {log:#?}");
    assert!(!fk::function(3, 0).child);
    assert_eq!(fk::kldunload(false), 0);
}

/// While our detach slept, another driver was attached to the function (`devctl attach`, or
/// a driver loaded meanwhile probes every device with no driver). The task must not delete it:
/// device_delete_child would run that driver's detach (nvme(4)'s sleeps until its disks are
/// unmounted). The eject is not performed. Before the fix the task deleted it.
#[test]
fn a_device_attached_again_while_its_detach_slept_is_left_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    loaded_with_controller();
    fk::on_detached(Some(|dev| {
        if dev == fk::function_device(3, 0) {
            fk::record("(another thread) nvme(4) attaches 3.0");
            fk::set_function_driver(3, 0, Some(c"nvme"));
        }
    }));
    let log = eject("-- eject, attached meanwhile --");
    fk::on_detached(None);
    assert_eq!(positions(&log, "device_detach").len(), 1, "{log:#?}");
    assert!(positions(&log, "device_delete_child").is_empty(), "another driver's device deleted: {log:#?}");
    assert_eq!(ej0(&log), 0, "no _EJ0 under another driver's device: {log:#?}");
    assert!(fk::function(3, 0).child);
    fk::set_function_driver(3, 0, None);
    assert_eq!(fk::kldunload(false), 0);
}

/// A slot with two functions of ours, the open one at function 0: the eject is refused (`_OST`
/// 0x81) before anything is detached, so function 1 is not left detached in a slot that stays.
/// Before the fix function 1 (detached first, last function first) was detached and deleted,
/// then function 0 refused the eject.
#[test]
fn a_multi_function_slot_is_refused_whole_when_one_function_is_open() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    loaded_with_controller();
    fk::set_function(3, 0, FakeFn { vendor: 0x1b36, hdrtype: 0x80, child: true });
    fk::set_function(3, 1, FakeFn { vendor: 0x1b36, hdrtype: 0, child: true });
    let node = fk::cdevs()[1];
    // SAFETY: our fake cdev, made by the attach: devfs would count the open here.
    unsafe { (*node).si_usecount = 1 };
    let log = eject("-- eject, function 0 open --");
    let slot = fk::SLOT3 as *const u8;
    assert!(positions(&log, "device_detach").is_empty(), "{log:#?}");
    assert!(positions(&log, "device_delete_child").is_empty(), "{log:#?}");
    assert_eq!(positions(&log, &std::format!("AcpiEvaluateObject {slot:p} _OST(0x3, 0x81)")).len(), 1, "{log:#?}");
    assert_eq!(ej0(&log), 0);
    assert!(fk::function(3, 1).child, "function 1 is still there");
    assert_eq!(fk::newbus_state(fk::fake_device()), DevState::Attached);

    // Closed: both functions go, last first, and the slot is ejected.
    // SAFETY: as above.
    unsafe { (*node).si_usecount = 0 };
    let log = eject("-- eject, closed --");
    let d1 = positions(&log, &std::format!("device_detach {:p}", fk::function_device(3, 1)));
    let d0 = positions(&log, &std::format!("device_detach {:p}", fk::function_device(3, 0)));
    assert!(d1.len() == 1 && d0.len() == 1 && d1[0] < d0[0], "{log:#?}");
    assert_eq!(positions(&log, "device_delete_child").len(), 2, "{log:#?}");
    assert_eq!(ej0(&log), 1, "{log:#?}");
    assert!(!fk::function(3, 0).child && !fk::function(3, 1).child);
    assert_eq!(fk::kldunload(false), 0);
}

/// A slot whose function 0 has no `device_t` (deleted by hand, `devctl delete`) while function
/// 1 still has one: an eject request must detach function 1 before `_EJ0`, not find "no
/// device" by looking at function 0 alone and power the slot off under function 1's driver.
/// Before the fix has_child and detach_slot looked at function 0 only, and `_EJ0` ran with
/// function 1 still attached.
#[test]
fn an_eject_detaches_function_1_when_function_0_has_no_device() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(Knobs::default());
    super::module::reset_for_tests();
    fk::set_function(3, 0, FakeFn { vendor: 0x1b36, hdrtype: 0x80, child: false });
    fk::set_function(3, 1, FakeFn { vendor: 0x1b36, hdrtype: 0, child: true });
    assert_eq!(fk::kldload(), 0);
    fk::run_queued(); // discovery
    let log = eject("-- eject, only function 1 has a device_t --");
    let f1 = fk::function_device(3, 1);
    let detach = positions(&log, &std::format!("device_detach {f1:p}"));
    let delete = positions(&log, &std::format!("device_delete_child {f1:p}"));
    let ej0_at = positions(&log, &std::format!("acpi_SetInteger {:p} _EJ0(1)", fk::SLOT3 as *const u8));
    assert!(detach.len() == 1 && delete.len() == 1 && ej0_at.len() == 1, "{log:#?}");
    assert!(detach[0] < delete[0] && delete[0] < ej0_at[0], "{log:#?}");
    assert!(!fk::function(3, 1).child);
    assert_eq!(fk::kldunload(false), 0);
}

/// A namespace change reported by our controller on function 1 of a slot whose function 0 is
/// another driver's: the task rescans function 1's namespaces. Before the fix the slot's
/// namespace rescan went to function 0 only (not ours: ENXIO), and the change was never
/// applied.
#[test]
fn a_namespace_change_on_function_1_rescans_function_1() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(Knobs { rman_size: 0x4000, pci_vendor: 0x1b36, d_gone_at_once: true, ..Knobs::default() });
    super::module::reset_for_tests();
    fk::set_function(3, 0, FakeFn { vendor: 0x1b36, hdrtype: 0x80, child: true });
    fk::set_function_driver(3, 0, Some(c"nvme"));
    fk::set_function(3, 1, FakeFn { vendor: 0x1b36, hdrtype: 0, child: true });
    assert_eq!(fk::kldload(), 0);
    fk::run_queued(); // discovery
    let f1 = fk::function_device(3, 1);
    fk::install_nvme(FakeNvme::new(false, false));
    fk::newbus_add(f1);
    assert_eq!(fk::newbus_attach(f1), 0, "attach: {:#?}", fk::log());
    fk::record("-- namespace change on 3.1 --");
    // SAFETY: the fakes never dereference the device.
    super::slots::namespace_changed(unsafe { super::device::Device::from_raw(f1) }.unwrap());
    fk::run_queued();
    let log = fk::log();
    let log = &log[from(&log, "-- namespace change on 3.1 --")..];
    assert_eq!(positions(log, &std::format!("device_busy {f1:p}")).len(), 1, "function 1 leased for the rescan: {log:#?}");
    assert!(positions(log, "namespaces changed: 0 added, 0 removed").len() == 1, "{log:#?}");
    assert!(positions(log, "hotplug run").iter().all(|&i| log[i].contains(" 0 failures")), "{log:#?}");
    fk::set_function_driver(3, 0, None);
    assert_eq!(fk::kldunload(false), 0);
}
