//! The `nvmehp` newbus driver on the pci bus: probe, attach, detach.
//!
//! The method table and DRIVER_MODULE are in kmod/nvme_hotplug_glue.c; these are the functions
//! it points to.
//!
//! **Who gets the controller.** nvme(4) is the system's NVMe driver and we never take a
//! controller from it by default:
//! - `hw.nvme_hotplug.claim=0` (default): probe bids `BUS_PROBE_NOWILDCARD`, which newbus only
//!   honours when the device's driver was named explicitly, i.e. after
//!   `devctl set driver -f nvme0 nvmehp`. Nothing attaches on its own.
//! - `hw.nvme_hotplug.claim=1`: probe bids `BUS_PROBE_LOW_PRIORITY`, so nvmehp attaches to NVMe
//!   controllers only where nvme(4) is not loaded (nvme(4) bids BUS_PROBE_DEFAULT).

use super::alloc::box_waitok;
use super::bindings::{self, device_t};
use super::device::Device;
use super::platform::KernelPlatform;
use super::resource::MemResource;
use crate::platform::RegisterIo;
use alloc::boxed::Box;
use core::ffi::c_int;

/// NVMe register offsets (NVMe base specification, "Controller Registers").
const REG_CAP: u32 = 0x00;
const REG_VS: u32 = 0x08;

/// PCI class 01h (mass storage), subclass 08h (NVM), interface 02h (NVMe I/O controller).
fn is_nvme_controller(dev: &Device) -> bool {
    i32::from(dev.pci_class()) == bindings::PCIC_STORAGE
        && i32::from(dev.pci_subclass()) == bindings::PCIS_STORAGE_NVM
        && i32::from(dev.pci_progif()) == bindings::PCIP_STORAGE_NVM_ENTERPRISE_NVMHCI_1_0
}

/// `hw.nvme_hotplug.claim`, read at every probe so `sysctl` changes apply to the next probe.
fn claim_enabled() -> bool {
    // SAFETY: an atomic load of an int owned by the glue.
    unsafe { bindings::nvmehp_tunable_claim() != 0 }
}

/// Per-controller state, owned through the softc pointer from attach to detach.
struct Attached {
    platform: KernelPlatform,
}

/// DEVICE_PROBE: an NVMe controller, at a priority that never beats nvme(4).
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_probe(dev: device_t) -> c_int {
    // SAFETY: the caller (newbus) passes the live device being probed.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return bindings::ENXIO;
    };
    if !is_nvme_controller(&dev) {
        return bindings::ENXIO;
    }
    dev.set_desc(c"NVMe controller (nvme_hotplug)");
    if claim_enabled() {
        bindings::BUS_PROBE_LOW_PRIORITY
    } else {
        bindings::BUS_PROBE_NOWILDCARD
    }
}

/// DEVICE_ATTACH: map BAR0, report CAP and VS. Sleepable context.
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_attach(dev: device_t) -> c_int {
    // SAFETY: newbus passes the live device being attached.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return bindings::ENXIO;
    };
    let Some(bar) = MemResource::alloc(dev, bindings::NVMEHP_PCIR_BAR0 as c_int) else {
        dev_printf!(&dev, "cannot allocate BAR0 (memory resource rid {:#x})\n", bindings::NVMEHP_PCIR_BAR0);
        return bindings::ENXIO;
    };
    let cap = bar.read64(REG_CAP);
    let vs = bar.read32(REG_VS);
    if cap == u64::MAX || vs == u32::MAX {
        dev_printf!(&dev, "controller does not answer (registers read all-ones); not attaching\n");
        return bindings::ENXIO; // `bar` is released on return
    }
    dev_printf!(
        &dev,
        "NVMe {}.{}.{}, CAP {:#018x} (MQES {}, DSTRD {}, TO {} ms), BAR0 {} KiB\n",
        vs >> 16,
        (vs >> 8) & 0xff,
        vs & 0xff,
        cap,
        (cap & 0xffff) + 1,
        (cap >> 32) & 0xf,
        ((cap >> 24) & 0xff) * 500,
        bar.size() / 1024,
    );
    let state = box_waitok(Attached { platform: KernelPlatform::new(dev, bar) });
    // SAFETY: the softc is newbus-allocated for this nvmehp device and zeroed; only attach and
    // detach touch it, and newbus serialises them.
    unsafe { (*dev.softc()).nvmehp_state = Box::into_raw(state).cast() };
    0
}

/// DEVICE_DETACH: release everything attach took. Sleepable context.
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_detach(dev: device_t) -> c_int {
    // SAFETY: newbus passes the live device being detached.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return 0;
    };
    // SAFETY: see attach; the pointer is taken out of the softc before it is freed.
    let state = unsafe {
        let softc = dev.softc();
        core::mem::replace(&mut (*softc).nvmehp_state, core::ptr::null_mut())
    };
    if !state.is_null() {
        // SAFETY: `state` came from Box::into_raw in attach and is freed exactly once.
        let state = unsafe { Box::from_raw(state.cast::<Attached>()) };
        let rid = state.platform.bar().rid();
        drop(state); // releases BAR0
        dev_printf!(&dev, "detached, BAR0 (rid {:#x}) released\n", rid);
    }
    0
}
