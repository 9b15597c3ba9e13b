//! Host tests of a controller's and the module's life through the newbus model of the fake
//! kernel ([`fake_kernel`]'s `newbus_*`, `kldunload`): what the kldunload walk may touch (only
//! attached devices' softcs), and busy references across the sleeps of a namespace rescan and
//! of DEVICE_SHUTDOWN (a detach arriving meanwhile is refused and frees nothing).
//!
//! [`fake_kernel`]: super::fake_kernel

use super::bindings;
use super::bus_topo::TopoLock;
use super::device::Device;
use super::fake_kernel::{self as fk, DevState, Knobs};
use super::fake_nvme::FakeNvme;
use super::glue_tests::SERIAL;
use std::cell::Cell;
use std::string::String;
use std::vec::Vec;

fn positions(log: &[String], prefix: &str) -> Vec<usize> {
    log.iter().enumerate().filter(|(_, l)| l.starts_with(prefix)).map(|(i, _)| i).collect()
}

fn first(log: &[String], prefix: &str) -> usize {
    *positions(log, prefix).first().unwrap_or_else(|| panic!("no `{prefix}` in {log:#?}"))
}

fn ctrl_dev() -> Device {
    // SAFETY: the fakes never dereference the device.
    unsafe { Device::from_raw(fk::fake_device()) }.unwrap()
}

/// A controller that answers, with one namespace; GEOM lets disks go at once.
fn present_knobs() -> Knobs {
    Knobs { rman_size: 0x4000, pci_vendor: 0x1b36, d_gone_at_once: true, ..Knobs::default() }
}

/// The fake controller in slot 3, in devclass nvmehp, attached through our DEVICE_ATTACH.
fn attach_controller() {
    fk::install_nvme(FakeNvme::new(false, false));
    fk::newbus_add(fk::fake_device());
    assert_eq!(fk::newbus_attach(fk::fake_device()), 0, "attach: {:#?}", fk::log());
    assert_eq!(fk::newbus_state(fk::fake_device()), DevState::Attached);
}

// --- 1. the kldunload walk and devices that are not attached --------------------------------

/// MOD_QUIESCE's busy walk visits every device of devclass nvmehp. After `devctl set driver
/// -f nvme0 nvmehp` and `devctl detach`, or a failed attach, the device stays in the devclass
/// (fixed) with no driver and newbus has freed its softc (device_get_softc is NULL); a probed
/// device that is not attached has a fresh zeroed softc. The walk must not read either: before
/// the fix it read `softc->nvmehp_state` through NULL (a panic in the kernel; here SIGSEGV).
#[test]
fn the_unload_walk_skips_devices_that_are_not_attached() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(present_knobs());
    attach_controller();
    let probed = fk::function_device(4, 0);
    fk::newbus_add(probed);
    fk::newbus_probe(probed);
    // SAFETY: our fake device_t's; the model answers device_get_softc.
    unsafe {
        assert!(!bindings::device_get_softc(probed).is_null(), "a probed device has a zeroed softc");
        // `devctl detach nvmehp0`.
        assert_eq!(bindings::device_detach(fk::fake_device()), 0);
        assert!(bindings::device_get_softc(fk::fake_device()).is_null(), "newbus freed the softc");
    }
    assert_eq!(fk::newbus_state(fk::fake_device()), DevState::NotPresent);
    {
        let topo = TopoLock::lock();
        assert_eq!(topo.devices_of_class(c"nvmehp").count(), 2, "both are still in devclass nvmehp");
        assert!(!super::pci_driver::any_in_use(&topo));
        assert_eq!(super::pci_driver::live_disks(&topo), 0);
        assert!(!super::pci_driver::in_use(ctrl_dev(), &topo));
        assert_eq!(super::pci_driver::rescan_namespaces(ctrl_dev(), &topo), Err(crate::hotplug::errno::Errno::ENXIO));
    }
    // The whole unload walks them too.
    assert_eq!(fk::kldunload(false), 0);
}

// --- 2. busy references across sleeps ------------------------------------------------------

std::thread_local! {
    /// What the detach tried from inside a pause returned (None: not tried yet).
    static DETACH_DURING_SLEEP: Cell<Option<i32>> = const { Cell::new(None) };
}

/// The detach that arrives while the rescan or shutdown sleeps (acpi_pci's eject, `devctl
/// detach`): newbus' device_detach on our controller, once.
fn detach_once() {
    if DETACH_DURING_SLEEP.with(|c| c.get()).is_none() {
        // SAFETY: the fake device_detach, as another thread holding Giant would call it.
        let e = unsafe { bindings::device_detach(fk::fake_device()) };
        DETACH_DURING_SLEEP.with(|c| c.set(Some(e)));
        fk::record(format_args!("-- detach during the sleep returned {e} --"));
    }
}

/// Freeing the controller shows up as these calls (teardown steps 3 to 5).
fn teardown_calls(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|l| l.starts_with("destroy_dev ") || l.starts_with("taskqueue_free") || l.starts_with("mtx_destroy") || l.starts_with("bus_teardown_intr"))
        .collect()
}

/// The namespace rescan sleeps between admin commands (and node creation sleeps); each sleep
/// drops Giant, so a detach can run meanwhile. The rescan holds the device busy: newbus
/// refuses that detach with EBUSY before calling our DEVICE_DETACH, nothing is torn down
/// until the rescan is over, and the same detach afterwards succeeds. Before the fix the
/// rescan held `&mut Attached` across the sleeps with no reference: the detach tore the
/// controller down and freed it under the rescan.
#[test]
fn a_detach_during_a_namespace_rescan_is_refused_and_frees_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(present_knobs());
    attach_controller();
    DETACH_DURING_SLEEP.with(|c| c.set(None));
    fk::with_nvme(|d| d.hold_admin = true);
    fk::on_pause(Some(|| {
        detach_once();
        fk::with_nvme(|d| {
            d.release_admin();
            d.hold_admin = true;
        })
    }));
    fk::record("-- rescan --");
    let r = {
        let topo = TopoLock::lock();
        super::pci_driver::rescan_namespaces(ctrl_dev(), &topo)
    };
    fk::on_pause(None);
    fk::with_nvme(|d| d.hold_admin = false);
    fk::record("-- rescan done --");
    assert_eq!(r, Ok(()));
    assert_eq!(DETACH_DURING_SLEEP.with(|c| c.get()), Some(bindings::EBUSY), "the detach during the rescan is refused");
    let log = fk::log();
    let (s, e) = (first(&log, "-- rescan --"), first(&log, "-- rescan done --"));
    let busy = first(&log[s..], "device_busy") + s;
    let unbusy = first(&log[s..], "device_unbusy") + s;
    let during = first(&log, "-- detach during the sleep");
    assert!(busy < during && during < unbusy && unbusy < e, "busy across the sleeps: {:#?}", &log[s..e]);
    assert!(log[during - 1].contains("refused: busy"), "newbus refused it, before our DEVICE_DETACH: {:#?}", &log[s..e]);
    assert!(teardown_calls(&log[s..e]).is_empty(), "nothing torn down under the rescan: {:#?}", teardown_calls(&log[s..e]));
    assert_eq!(fk::newbus_busy(fk::fake_device()), 0);
    assert_eq!(fk::newbus_state(fk::fake_device()), DevState::Attached);

    // Not busy any more: the detach goes through, and tears the controller down.
    // SAFETY: the fake device_detach.
    assert_eq!(unsafe { bindings::device_detach(fk::fake_device()) }, 0);
    assert!(!teardown_calls(&fk::log()[e..]).is_empty());
    assert_eq!(fk::newbus_state(fk::fake_device()), DevState::NotPresent);
}

/// DEVICE_SHUTDOWN quiesces the controller, sleeping until the I/O in flight finishes, so a
/// detach can arrive meanwhile: it is refused (device busy) and the shutdown finishes on a
/// controller that still exists. Before the fix, shutdown held `&mut Live` across the sleeps
/// with no reference: the detach freed the controller under the quiesce.
#[test]
fn a_detach_during_shutdown_is_refused_and_frees_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(present_knobs());
    attach_controller();
    DETACH_DURING_SLEEP.with(|c| c.set(None));
    // A read the device holds: the quiesce waits for it, sleeping.
    fk::with_nvme(|d| d.hold_io = true);
    let d0 = fk::disks()[0];
    let bp = fk::new_bio(bindings::BIO_READ as u16, 0, 512);
    let mut buf = [0u8; 512];
    // SAFETY: a fake bio addressed to our live disk, with 512 bytes of data.
    unsafe {
        (*bp).bio_disk = d0;
        (*bp).bio_data = buf.as_mut_ptr().cast();
        ((*d0).d_strategy.unwrap())(bp);
    }
    // The detach arrives during the first sleep; then the device answers the read.
    fk::on_pause(Some(|| {
        detach_once();
        fk::with_nvme(|d| {
            d.hold_io = false;
            d.complete_held();
        });
    }));
    fk::record("-- shutdown --");
    // SAFETY: DEVICE_SHUTDOWN on our attached fake device, as newbus calls it.
    assert_eq!(unsafe { super::pci_driver::nvmehp_shutdown(fk::fake_device()) }, 0);
    fk::on_pause(None);
    fk::record("-- shutdown done --");
    assert_eq!(DETACH_DURING_SLEEP.with(|c| c.get()), Some(bindings::EBUSY), "the detach during the shutdown is refused");
    let log = fk::log();
    let (s, e) = (first(&log, "-- shutdown --"), first(&log, "-- shutdown done --"));
    assert!(teardown_calls(&log[s..e]).is_empty(), "nothing torn down under the shutdown: {:#?}", &log[s..e]);
    assert!(fk::with_nvme(|d| d.shutdown_notified), "the shutdown reached the controller");
    assert_eq!(fk::newbus_busy(fk::fake_device()), 0);
    // SAFETY: the fake device_detach.
    assert_eq!(unsafe { bindings::device_detach(fk::fake_device()) }, 0);
}
