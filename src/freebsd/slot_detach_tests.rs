//! Host tests of the hotplug task's slot detach (`slots.rs`, `SlotOps::detach_slot`) against
//! the fake kernel's pci0 and newbus model: a `device_t` is looked up again after the detach
//! that slept (another thread may have deleted it, or attached a driver to it, meanwhile). A
//! multi-function slot refused whole, and an eject that detaches function 1 when function 0 has
//! no device_t, are asserted of the shipped .ko on QEMU's functions in
//! kldhost/tests/multifunction.rs; a namespace change on function 1 rescanning function 1 in
//! kldhost/tests/namespaces.rs.

use super::fake_kernel::{self as fk, Knobs};
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
