//! Host tests of a controller's and the module's life through the newbus model of the fake
//! kernel ([`fake_kernel`]'s `newbus_*`, `kldload`, `kldunload`): what the kldunload walk may
//! touch (only attached devices' softcs), busy references across the sleeps of a namespace
//! rescan and of DEVICE_SHUTDOWN (a detach arriving meanwhile is refused and frees nothing).
//!
//! `kldunload -f` and a busy unload run on the shipped .ko now (kldhost/tests/unload.rs: a
//! forced unload of an open controller refused by its detach, the quiesce redone in
//! MOD_UNLOAD, a plain unload refused in MOD_QUIESCE while a disk is open, a detach refused
//! after MOD_QUIESCE ending the unload and restoring the module, MOD_UNLOAD refusing while a
//! controller attached behind its detach walk is attached, an attach refused from a standing
//! MOD_QUIESCE, MOD_UNLOAD refusing while GEOM has not run a disk's d_gone yet and resuming
//! the hotplug task; MOD_QUIESCE refusing while an attach sleeps is kldhost/tests/interleave.rs),
//! and so does a
//! detach arriving while DEVICE_SHUTDOWN sleeps (kldhost/tests/interleave.rs, `--in-sleep`);
//! they are no longer here; nor are a failed MOD_LOAD leaving nothing (kldhost/tests/failures.rs,
//! `--fail taskqueue_create`/`taskqueue_start_threads`) and the unload walking a detached
//! device (kldhost/tests/attach.rs).
//!
//! [`fake_kernel`]: super::fake_kernel

use super::bindings;
use super::bus_topo::TopoLock;
use super::device::Device;
use super::fake_kernel::{self as fk, DevState, Knobs};
use super::fake_nvme::FakeNvme;
use super::glue_tests::SERIAL;



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

/// After `devctl set driver -f nvme0 nvmehp` and `devctl detach`, or a failed attach, the
/// device stays in devclass nvmehp (fixed) with no driver and newbus has freed its softc
/// (device_get_softc is NULL); a probed device that is not attached has a fresh zeroed softc.
/// The glue's per-device answers must read neither: before the fix MOD_QUIESCE's walk read
/// `softc->nvmehp_state` through NULL (a panic in the kernel). The unload walking such a
/// device runs on the shipped .ko (kldhost/tests/attach.rs, after `devctl detach`; an
/// attaching one: kldhost/tests/interleave.rs); the answers of the functions no .ko path
/// reaches with such a device (the namespace rescan's ENXIO) stay checked here.
#[test]
fn the_glue_answers_nothing_for_devices_that_are_not_attached() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(present_knobs());
    super::module::reset_for_tests();
    attach_controller();
    let probed = fk::function_device(4, 0);
    fk::newbus_add(probed);
    fk::newbus_probe(probed);
    // SAFETY: the fakes never dereference the device.
    let probed_dev = unsafe { Device::from_raw(probed) }.unwrap();
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
        assert_eq!(super::pci_driver::rescan_namespaces(probed_dev, &topo), Err(crate::hotplug::errno::Errno::ENXIO));
        assert!(!super::pci_driver::in_use(probed_dev, &topo));
    }
}

// --- 2. busy references across sleeps ------------------------------------------------------

// A detach while a namespace rescan sleeps is refused by newbus (the rescan's lease holds the
// device busy) and frees nothing: moved to the shipped .ko on QEMU, kldhost/tests/namespaces.rs
// `a_detach_inside_the_namespace_rescans_sleep_is_refused_and_frees_nothing`.

