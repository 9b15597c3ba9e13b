//! nvme(4) in the kernel, as far as newbus and the module can see it: `run --stock-nvme`.
//!
//! A GENERIC kernel has nvme(4) compiled in; on EC2 it is what takes every NVMe controller at
//! boot and, unless told otherwise, every hot-added one. The module must live with it: its
//! probe bid must lose to nvme(4)'s in every `hw.nvme_hotplug.claim` mode, its load message
//! must say where hot-added controllers will go (it asks `devclass_find("nvme")`), and its
//! hotplug task must never detach or delete a device of nvme(4)'s (an eject request on such a
//! slot is refused with `_OST`, never `_EJ0`).
//!
//! This is a stand-in for that driver, registered on pci at boot (before the module loads,
//! so its devclass exists and it takes the boot-time controller as nvme0): a driver class
//! named "nvme" whose DEVICE_PROBE bids as `nvme_pci_probe` does (sys/dev/nvme/nvme_pci.c:
//! BUS_PROBE_DEFAULT for a device in its ID table, BUS_PROBE_GENERIC for any other NVMe I/O
//! controller, class 01h/08h/02h; ENXIO otherwise) and whose DEVICE_ATTACH and DEVICE_DETACH
//! succeed without touching the device. It does not drive the controller: nvme(4)'s own
//! behaviour is not what is under test, only who gets which device.

use super::{log, newbus};
use crate::freebsd15;
use crate::layouts;
use std::ffi::{c_int, c_void};

/// The entries of nvme(4)'s ID table that match on the device ID alone (sys/dev/nvme/nvme_pci.c
/// `pci_ids`, devid = device << 16 | vendor), with their descriptions. QEMU's NVMe model
/// (1b36:0010) is not among them, so it gets BUS_PROBE_GENERIC, as an EC2 EBS volume
/// (1d0f:8061) does.
const KNOWN_IDS: &[(u32, &str)] = &[
    (0x0111_8086, "NVMe Controller"),
    // IDT32_PCI_ID and IDT8_PCI_ID (sys/dev/nvme/nvme_private.h).
    (0x80d0_111d, "IDT NVMe Controller (32 channel)"),
    (0x80d2_111d, "IDT NVMe Controller (8 channel)"),
    (0x0953_8086, "Intel DC PC3500"),
    (0x0a53_8086, "Intel DC PC3520"),
    (0x0a54_8086, "Intel DC PC4500"),
    (0x0a55_8086, "Dell Intel P4600"),
    (0x0003_1c58, "HGST SN100"),
    (0x0023_1c58, "WDC SN200"),
    (0x0540_1c5f, "Memblaze Pblaze4"),
    (0xa821_144d, "Samsung PM1725"),
    (0xa822_144d, "Samsung PM1725a"),
    (0x07f0_15ad, "VMware NVMe Controller"),
    (0x2003_106b, "Apple S3X NVMe Controller"),
];

/// The PCI class code of an NVMe I/O controller (NVM Express, programming interface 02h).
const NVME_IO_CLASS: u32 = 0x01_08_02;

/// The functions the stand-in may take, as (slot, function); empty: every one it matches.
static ONLY_AT: std::sync::Mutex<Vec<(u8, u8)>> = std::sync::Mutex::new(Vec::new());

extern "C" fn nvme_probe(dev: *mut c_void) -> c_int {
    let d = dev as u64;
    let Some(bdf) = newbus::pci_bdf(d) else { return layouts::ENXIO };
    let only = ONLY_AT.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if !only.is_empty() && !only.contains(&(bdf.dev, bdf.func)) {
        log(format!("stock nvme(4): nvme_pci_probe({:02x}:{:02x}.{}) = ENXIO (given to another driver)", bdf.bus, bdf.dev, bdf.func));
        return layouts::ENXIO;
    }
    let id = super::machine::cfg_read(bdf, 0x00, 4);
    let class = super::machine::cfg_read(bdf, 0x08, 4) >> 8;
    let (bid, desc) = match KNOWN_IDS.iter().find(|(known, _)| *known == id) {
        Some((_, desc)) => (layouts::BUS_PROBE_DEFAULT, *desc),
        None if class == NVME_IO_CLASS => (layouts::BUS_PROBE_GENERIC, "Generic NVMe Device"),
        None => (layouts::ENXIO, ""),
    };
    log(format!("stock nvme(4): nvme_pci_probe({:02x}:{:02x}.{}, id {id:#010x}, class {class:06x}) = {bid}", bdf.bus, bdf.dev, bdf.func));
    if bid <= 0 {
        newbus::set_desc(d, desc);
    }
    bid
}

extern "C" fn nvme_attach(dev: *mut c_void) -> c_int {
    log(format!("stock nvme(4): nvme_attach({}) = 0 (the stand-in does not drive the controller)", newbus::nameunit(dev as u64)));
    0
}

extern "C" fn nvme_detach(dev: *mut c_void) -> c_int {
    log(format!("stock nvme(4): nvme_detach({}) = 0", newbus::nameunit(dev as u64)));
    0
}

/// The method descriptor with the id the emulated kernel gives `name` (what a class compiled
/// by kobj_class_compile would point to; newbus matches descriptors by id).
fn desc(name: &str) -> *mut layouts::kobjop_desc {
    let i = freebsd15::KOBJOP_DESCS.iter().position(|d| *d == name).expect("a known descriptor");
    let d = Box::new(layouts::kobjop_desc { id: freebsd15::desc_id(i), ..Default::default() });
    Box::into_raw(d)
}

fn method(name: &str, f: extern "C" fn(*mut c_void) -> c_int) -> layouts::kobj_method {
    // SAFETY: kobjop_t is a plain function pointer; device methods take the device_t and
    // return an int, which newbus calls them as.
    let func = unsafe { std::mem::transmute::<usize, layouts::kobjop_t>(f as usize) };
    layouts::kobj_method { desc: desc(name), func }
}

/// Boot: nvme(4)'s DRIVER_MODULE runs, devclass_add_driver puts "nvme" on pci and offers it
/// every function no driver has (the boot-time controller becomes nvme0). Lives as long as
/// the process, as a compiled-in driver does.
/// Registers the stand-in on pci (it probes every child), taking only the functions of
/// `only_at` when that is not empty: the administrator gave the others to the module.
pub fn boot(only_at: &[(u8, u8)]) {
    *ONLY_AT.lock().unwrap_or_else(|e| e.into_inner()) = only_at.to_vec();
    let methods = vec![
        method("device_probe_desc", nvme_probe),
        method("device_attach_desc", nvme_attach),
        method("device_detach_desc", nvme_detach),
        layouts::kobj_method { desc: std::ptr::null_mut(), func: None },
    ];
    let methods = methods.leak().as_ptr();
    let cls = Box::new(layouts::kobj_class { name: c"nvme".as_ptr(), methods, size: 0, ..Default::default() });
    let driver = Box::into_raw(cls) as u64;
    log("stock nvme(4): DRIVER_MODULE(nvme, pci): devclass_add_driver".to_string());
    newbus::add_driver("pci", driver);
}
