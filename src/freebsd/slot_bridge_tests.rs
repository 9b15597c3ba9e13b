//! Host tests of hotplug slots behind a PCI-PCI bridge (`slot_discovery.rs`, `slots.rs`): the
//! fake kernel's q35 layout, where `\_SB_.PCI0` has no `_EJ0` child and the PCIe root port
//! `S20_` (pci0 slot 4, device pcib1) holds the slot `S20_.S00_`, slot 0 of its secondary bus
//! pci1 (bus number 4). Every action on that slot must go to pci1, and pci0's slot 0 is another
//! slot altogether. The other bridge cases run on the .ko (kldhost tests/q35.rs); why these two
//! cannot yet is in kldhost/README.md, "One emulated kernel".

use super::device::Device;
use super::fake_kernel::{self as fk, FakeFn, Knobs, Layout, PCI1_BUS};
use super::glue_tests::SERIAL;
use std::format;
use std::string::String;
use std::vec::Vec;

const PRESENT: FakeFn = FakeFn { vendor: 0x1b36, hdrtype: 0, child: true };
const GONE: FakeFn = FakeFn { vendor: 0xffff, hdrtype: 0, child: true };

fn matching<'a>(log: &'a [String], what: &str) -> Vec<&'a String> {
    log.iter().filter(|l| l.contains(what)).collect()
}

/// The log from the last `mark` on.
fn since(mark: &str) -> Vec<String> {
    let log = fk::log();
    let at = log.iter().rposition(|l| l == mark).unwrap_or_else(|| panic!("no `{mark}` in {log:#?}"));
    log[at..].to_vec()
}

fn p(addr: usize) -> *const u8 {
    addr as *const u8
}

fn dev(d: super::bindings::device_t) -> Device {
    // SAFETY: a fake device_t of the fake pci buses.
    unsafe { Device::from_raw(d) }.unwrap()
}

/// Loads the module on `layout` and runs discovery.
fn load(knobs: Knobs) {
    fk::reset(knobs);
    super::module::reset_for_tests();
    assert_eq!(fk::kldload(), 0);
    fk::run_queued(); // discovery
}

fn unload() {
    assert_eq!(fk::kldunload(false), 0, "{:#?}", fk::log());
}

fn q35() -> Knobs {
    Knobs { layout: Layout::Q35, ..Knobs::default() }
}

/// A controller that lost its device at slot 0 of pci0 is in no hotplug slot (q35's pci0 has
/// none): it is told so, and nothing is checked. The one at slot 0 of pci1 is in `S00_`: the
/// quiet check it asks for finds its function gone and deletes it.
#[test]
fn a_device_in_slot_0_of_pci0_is_not_taken_for_slot_0_of_pci1() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    load(q35());
    fk::set_function(0, 0, GONE);
    fk::set_function_driver(0, 0, None);
    fk::set_function_on(PCI1_BUS, 0, 0, GONE);
    fk::set_function_driver_on(PCI1_BUS, 0, 0, None);

    fk::record("-- pci0 slot 0 lost --");
    super::slots::controller_lost(dev(fk::function_device(0, 0)));
    fk::run_queued();
    let log = since("-- pci0 slot 0 lost --");
    assert_eq!(matching(&log, "not in a known hotplug slot").len(), 1, "{log:#?}");
    assert!(matching(&log, "taskqueue_enqueue").is_empty(), "{log:#?}");
    assert!(matching(&log, "device_delete_child").is_empty(), "{log:#?}");

    fk::record("-- pci1 slot 0 lost --");
    super::slots::controller_lost(dev(fk::function_device_on(PCI1_BUS, 0, 0)));
    fk::run_queued();
    let log = since("-- pci1 slot 0 lost --");
    assert!(matching(&log, "not in a known hotplug slot").is_empty(), "{log:#?}");
    let rp_fn = fk::function_device_on(PCI1_BUS, 0, 0);
    assert_eq!(matching(&log, "device_delete_child"), [&format!("device_delete_child {rp_fn:p}")], "{log:#?}");
    assert!(fk::function(0, 0).child);
    unload();
}

/// pci0's `S18_` and the root port's `S00_` together (i440fx with a bridge): two slots on two
/// buses, one handler each; an eject request on `S18_` acts on pci0's slot 3 alone.
#[test]
fn slots_on_pci0_and_behind_a_bridge_are_served_together() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    load(Knobs { layout: Layout::Both, ..Knobs::default() });
    let log = fk::log();
    assert_eq!(fk::notify_objects(), [fk::SLOT3, fk::RP_SLOT_ACPI], "{log:#?}");
    assert_eq!(matching(&log, "2 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 2 owned (2 handlers), 0 observed, on 2 pci buses").len(), 1, "{log:#?}");
    fk::set_function(3, 0, PRESENT);
    fk::set_function_driver(3, 0, None);
    fk::set_function_on(PCI1_BUS, 0, 0, PRESENT);
    fk::set_function_driver_on(PCI1_BUS, 0, 0, None);
    fk::record("-- eject S18_ --");
    fk::deliver_notify_to(fk::SLOT3, 3);
    fk::run_queued();
    let log = since("-- eject S18_ --");
    assert_eq!(matching(&log, "device_delete_child"), [&format!("device_delete_child {:p}", fk::function_device(3, 0))], "{log:#?}");
    assert_eq!(matching(&log, "_EJ0"), [&format!("acpi_SetInteger {:p} _EJ0(1)", p(fk::SLOT3))], "{log:#?}");
    assert!(fk::function_on(PCI1_BUS, 0, 0).child);
    unload();
}
