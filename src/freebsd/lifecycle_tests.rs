//! Host tests of a controller's and the module's life through the newbus model of the fake
//! kernel ([`fake_kernel`]'s `newbus_*`, `kldunload`): what the kldunload walk may touch (only
//! attached devices' softcs).
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
