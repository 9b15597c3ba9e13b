//! Newbus (sys/kern/subr_bus.c) and kobj method dispatch (sys/kern/subr_kobj.c), enough for a
//! driver on a pci bus to be probed, attached and detached.
//!
//! **Devices.** A `device_t` is a host object whose first field is the kobj ops pointer, the
//! only field the module reads itself (its inline `KOBJOPLOOKUP`, <sys/kobj.h>); every other
//! property is reached through emulated functions and lives in [`Dev`]. The tree: `pcib0`
//! (host bridge) → `pci0` → one child per PCI function the machine has; on q35 also a
//! `pcibN` → `pciN` per root port ([`super::pcib`]), with the functions behind the port as
//! `pciN`'s children.
//!
//! **kobj.** A class's ops hold a 256-entry method cache indexed by the descriptor id, every
//! slot starting at a NULL method; on a miss the module calls `kobj_lookup_method(cls, cep,
//! desc)`, which finds the method, stores it in the slot and returns it. Classes of the
//! emulated kernel (`pci`, `pcib`) answer from [`super::pci`]; a method they lack is a kernel
//! panic naming it (never a silent default). The driver's class (the `driver_t`
//! DRIVER_MODULE names) is looked up in its own method table, as kobj_lookup_method_class
//! does, falling back to the descriptor's default.
//!
//! **Rules kept from subr_bus.c (FreeBSD 15):**
//! - `device_probe_child`: each driver of the bus devclass (only the one named by a fixed
//!   devclass) gets the device with a zeroed softc of `driver->size` and its DEVICE_PROBE; a
//!   positive result is a refusal; `BUS_PROBE_NOWILDCARD` or lower counts only when the
//!   devclass was fixed (`devctl set driver -f`, [`set_devclass_fixed`]); the best bid wins.
//! - `device_attach`: the parent prints the child, state DS_ATTACHING during DEVICE_ATTACH; a
//!   failed attach frees the softc and leaves the device DS_NOTPRESENT.
//! - `device_detach`: EBUSY for a busy device, EBUSY (with the kernel's message) for one still
//!   attaching, 0 for one not attached; then DEVICE_DETACH, "detached", BUS_CHILD_DETACHED
//!   (pci(4)'s resource leak check, [`super::pci::child_detached`]), the softc freed.
//! - `device_busy`/`device_unbusy`: a count; the first busy busies the parent, the last unbusy
//!   unbusies it.
//! - `devclass_delete_driver` (driver_module_handler's MOD_UNLOAD) detaches every device the
//!   driver has; the first error stops the unload.

use super::kern::{cstr, format};
use super::rules::Rule;
use super::{finding, kernel_panic, log, with};
use crate::freebsd15;
use crate::kpi::KpiTable;
use crate::layouts;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};

/// The head of every emulated `struct _device`: KOBJ_FIELDS.
#[repr(C)]
pub struct DeviceObj {
    pub ops: *mut layouts::kobj_ops,
}

/// What kind of class a device's ops point to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostClass {
    Pcib,
    Pci,
}

#[derive(Default)]
pub struct Dev {
    pub parent: u64,
    pub children: Vec<u64>,
    /// Devclass name and unit; `None` while the device has no devclass.
    pub devclass: Option<String>,
    pub unit: i32,
    pub nameunit: Option<CString>,
    pub fixed: bool,
    pub state: u32,
    pub busy: i32,
    /// The driver_t attached or probing (0: none).
    pub driver: u64,
    pub softc: u64,
    pub softc_size: usize,
    pub desc: Option<String>,
    pub sysctl_tree: u64,
    /// The PCI function of a pci child (index into the machine's functions).
    pub pci: Option<super::pci::PciChild>,
    pub ops: u64,
    /// The printed "no driver attached" once (DF_DONENOMATCH).
    pub nomatch_done: bool,
}

#[derive(Default)]
pub struct Newbus {
    pub devices: BTreeMap<u64, Dev>,
    /// Devclass name to its token (what devclass_find returns) and unit table.
    pub devclasses: BTreeMap<String, (u64, Vec<u64>)>,
    /// Driver name to its driver_t, with the bus it was added to.
    pub drivers: BTreeMap<String, (String, u64)>,
    /// Host classes by their kobj_class address.
    pub host_classes: BTreeMap<u64, HostClass>,
    /// Method entries handed out for host classes: (class, descriptor) to the entry.
    pub host_methods: BTreeMap<(u64, u64), u64>,
    pub null_method: u64,
    pub pci0: u64,
    /// Each class's compiled ops (kobj_class_compile).
    pub class_ops: BTreeMap<u64, u64>,
    /// Devclass names as C strings for device_get_name (alive as long as the emulation).
    pub class_names: BTreeMap<String, CString>,
    /// device_t's freed by device_delete_child (their memory poisoned and kept).
    pub deleted: std::collections::BTreeSet<u64>,
    /// Devinfos pci_read_device handed out and pci_add_child has not taken yet.
    pub devinfos: BTreeMap<u64, nvmehp_lab::firmware::Bdf>,
    /// The pci buses below PCI-PCI bridges (q35's root ports) and their bus numbers.
    pub buses: BTreeMap<u64, u8>,
}

fn null_method() -> u64 {
    with(|e| {
        if e.newbus.null_method == 0 {
            e.newbus.null_method = Box::into_raw(Box::<layouts::kobj_method>::default()) as u64;
        }
        e.newbus.null_method
    })
}

/// The ops of class `cls`, compiled once per class as kobj_class_compile does (every cache slot
/// at the NULL method); every object of the class points to them (kobj_init).
pub(super) fn new_ops(cls: u64) -> u64 {
    if let Some(o) = with(|e| e.newbus.class_ops.get(&cls).copied()) {
        return o;
    }
    let null = null_method() as *mut layouts::kobj_method;
    let mut ops = Box::<layouts::kobj_ops>::default();
    for c in ops.cache.iter_mut() {
        *c = null;
    }
    ops.cls = cls as *mut layouts::kobj_class;
    let o = Box::into_raw(ops) as u64;
    with(|e| e.newbus.class_ops.insert(cls, o));
    o
}

fn host_class(kind: HostClass, name: &'static std::ffi::CStr) -> u64 {
    let cls = Box::new(layouts::kobj_class { name: name.as_ptr(), ..Default::default() });
    let p = Box::into_raw(cls) as u64;
    with(|e| e.newbus.host_classes.insert(p, kind));
    p
}

fn devclass_token(name: &str) -> u64 {
    with(|e| {
        if let Some((t, _)) = e.newbus.devclasses.get(name) {
            return *t;
        }
        let t = Box::into_raw(Box::new(0u64)) as u64;
        e.newbus.devclasses.insert(name.to_string(), (t, Vec::new()));
        t
    })
}

/// make_device: a device with `ops`, optionally in devclass `name` (fixed).
pub(super) fn make_device(parent: u64, ops: u64, class: Option<&str>, unit: i32) -> u64 {
    let obj = Box::into_raw(Box::new(DeviceObj { ops: ops as *mut layouts::kobj_ops })) as u64;
    with(|e| {
        e.newbus.devices.insert(obj, Dev { parent, unit, state: layouts::DS_NOTPRESENT, ops, ..Default::default() });
        if let Some(p) = e.newbus.devices.get_mut(&parent) {
            p.children.push(obj);
        }
    });
    if let Some(c) = class {
        add_to_devclass(obj, c, unit);
        with(|e| e.newbus.devices.get_mut(&obj).map(|d| d.fixed = true));
    }
    obj
}

/// devclass_add_device: a unit (the wired one if free, else the first free) and nameunit.
fn add_to_devclass(dev: u64, class: &str, want: i32) {
    devclass_token(class);
    with(|e| {
        let units = &mut e.newbus.devclasses.get_mut(class).expect("devclass").1;
        let mut unit = if want >= 0 { want as usize } else { 0 };
        while units.get(unit).is_some_and(|d| *d != 0) {
            unit += 1;
        }
        if units.len() <= unit {
            units.resize(unit + 1, 0);
        }
        units[unit] = dev;
        let d = e.newbus.devices.get_mut(&dev).expect("device");
        d.devclass = Some(class.to_string());
        d.unit = unit as i32;
        d.nameunit = Some(CString::new(format!("{class}{unit}")).expect("name"));
    });
}

/// devclass_delete_device.
fn remove_from_devclass(dev: u64) {
    with(|e| {
        let Some(d) = e.newbus.devices.get_mut(&dev) else { return };
        let Some(class) = d.devclass.take() else { return };
        let unit = d.unit as usize;
        d.nameunit = None;
        d.unit = -1;
        if let Some((_, units)) = e.newbus.devclasses.get_mut(&class) {
            if units.get(unit) == Some(&dev) {
                units[unit] = 0;
            }
        }
    });
}

/// Builds pcib0 and pci0, on q35 a pcib and (unless `bridge_buses_late`) a pci bus per root
/// port (in slot order), and a child per function of the machine on the bus its address names
/// (pci(4)'s enumeration: each child's BARs sized and listed; a late bus enumerates its own,
/// [`super::pcib::attach_bus`]). Called once the machine runs.
pub fn build_tree(functions: &[nvmehp_lab::firmware::PciFunction], bridge_buses_late: bool) {
    let pcib_cls = host_class(HostClass::Pcib, c"pcib");
    let pci_cls = host_class(HostClass::Pci, c"pci");
    let pcib0 = make_device(0, new_ops(pcib_cls), Some("pcib"), 0);
    let pci0 = make_device(pcib0, new_ops(pci_cls), Some("pci"), 0);
    with(|e| {
        e.newbus.pci0 = pci0;
        for d in [pcib0, pci0] {
            e.newbus.devices.get_mut(&d).expect("dev").state = layouts::DS_ATTACHED;
        }
    });
    let ports: Vec<u8> = super::machine::with_machine(|m| m.root_ports()).into_iter().map(|(s, _)| s).collect();
    super::pcib::attach_root_ports(pci0, &ports, new_ops(pcib_cls), new_ops(pci_cls), bridge_buses_late);
    for f in functions {
        let Some(bus) = super::pcib::bus_by_number(f.bdf.bus) else {
            log(format!("{:02x}:{:02x}.{}: no pci bus {} in the tree; function left out", f.bdf.bus, f.bdf.dev, f.bdf.func, f.bdf.bus));
            continue;
        };
        let child = make_device(bus, new_ops(null_class()), None, -1);
        let pc = super::pci::enumerate(f);
        log(format!("{}: {:02x}:{:02x}.{} vendor {:#06x} device {:#06x} class {:06x}", nameunit(bus), f.bdf.bus, f.bdf.dev, f.bdf.func, f.vendor, f.device, f.class));
        with(|e| e.newbus.devices.get_mut(&child).expect("dev").pci = Some(pc));
    }
}

/// The class of a device with no driver (null_class: no methods).
fn null_class() -> u64 {
    static NULL_CLASS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NULL_CLASS.get_or_init(|| Box::into_raw(Box::new(layouts::kobj_class { name: c"null".as_ptr(), ..Default::default() })) as u64)
}

pub fn pci0() -> u64 {
    with(|e| e.newbus.pci0)
}

/// The pci children of pci0 (on q35 the root ports' pcibs among them).
pub fn pci_children() -> Vec<u64> {
    children_of(pci0())
}

/// The children of `bus`.
pub fn children_of(bus: u64) -> Vec<u64> {
    with(|e| e.newbus.devices.get(&bus).map(|d| d.children.clone()).unwrap_or_default())
}

/// Every PCI function a driver could take: the children of every pci bus but the bridges.
pub fn pci_functions() -> Vec<u64> {
    super::pcib::buses()
        .into_iter()
        .flat_map(children_of)
        .filter(|&c| with(|e| e.newbus.devices.get(&c).and_then(|d| d.pci.as_ref()).is_some_and(|p| !p.bridge)))
        .collect()
}

/// The parent of `dev` (0 for none).
pub fn parent_of(dev: u64) -> u64 {
    with(|e| e.newbus.devices.get(&dev).map_or(0, |d| d.parent))
}

pub fn nameunit(dev: u64) -> String {
    with(|e| {
        e.newbus.devices.get(&dev).and_then(|d| d.nameunit.as_ref().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "unknown".into())
    })
}

/// The PCI address of a pci child, or None for a device that is not one.
pub fn pci_bdf(dev: u64) -> Option<nvmehp_lab::firmware::Bdf> {
    with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref().map(|p| p.bdf)))
}

/// device_set_desc for a driver of the emulated kernel's own (the stock nvme(4) stand-in).
pub fn set_desc(dev: u64, desc: &str) {
    with(|e| e.newbus.devices.get_mut(&dev).map(|d| d.desc = Some(desc.to_string())));
}

pub fn state(dev: u64) -> u32 {
    with(|e| e.newbus.devices.get(&dev).map_or(0, |d| d.state))
}

// --- kobj -------------------------------------------------------------------------------------

/// The function of the driver class's method for descriptor `name`, or None.
fn driver_method(driver: u64, name: &str) -> Option<u64> {
    let want = freebsd15::KOBJOP_DESCS.iter().position(|d| *d == name).map(freebsd15::desc_id)?;
    // SAFETY: driver is the module's driver_t (a kobj_class) with a NULL-terminated method table.
    unsafe {
        let cls = &*(driver as *const layouts::kobj_class);
        let mut m = cls.methods;
        while !m.is_null() && !(*m).desc.is_null() {
            if (*(*m).desc).id == want {
                return (*m).func.map(|f| f as usize as u64);
            }
            m = m.add(1);
        }
    }
    None
}

extern "C" fn emu_kobj_lookup_method(cls: *mut layouts::kobj_class, cep: *mut *mut layouts::kobj_method, desc: *mut layouts::kobjop_desc) -> *mut layouts::kobj_method {
    // SAFETY: the module passes a descriptor it imports (placed by the loader).
    let id = unsafe { (*desc).id };
    let name = freebsd15::desc_name(id).unwrap_or("?");
    let host = with(|e| e.newbus.host_classes.get(&(cls as u64)).copied());
    let entry: *mut layouts::kobj_method = match host {
        Some(kind) => {
            let cached = with(|e| e.newbus.host_methods.get(&(cls as u64, desc as u64)).copied());
            match cached {
                Some(m) => m as *mut _,
                None => {
                    let Some(f) = super::pci::method(kind, name) else {
                        // SAFETY: a host class's name is a static C string.
                        let cn = unsafe { cstr((*cls).name) };
                        kernel_panic(&format!("kobj_lookup_method: class {cn} has no method {name} (kldhost does not emulate it)"));
                    };
                    // SAFETY: kobjop_t is a plain function pointer; `f` is an extern "C" fn of the
                    // method's signature (super::pci::method).
                    let func = unsafe { std::mem::transmute::<usize, layouts::kobjop_t>(f) };
                    let m = Box::into_raw(Box::new(layouts::kobj_method { desc, func }));
                    with(|e| e.newbus.host_methods.insert((cls as u64, desc as u64), m as u64));
                    m
                }
            }
        }
        None => {
            // kobj_lookup_method_class: the class's own table, then the descriptor's default.
            // SAFETY: a module class with a NULL-terminated table.
            unsafe {
                let mut m = (*cls).methods;
                while !m.is_null() && !(*m).desc.is_null() && (*m).desc != desc {
                    m = m.add(1);
                }
                if !m.is_null() && (*m).desc == desc {
                    m.cast_mut()
                } else {
                    &raw mut (*desc).deflt
                }
            }
        }
    };
    if !cep.is_null() {
        // SAFETY: the cache slot of the caller's ops.
        unsafe { *cep = entry };
    }
    log(format!("kobj_lookup_method({name})"));
    entry
}

type DevMethod = unsafe extern "C" fn(*mut c_void) -> c_int;

/// DEVICE_PROBE/ATTACH/DETACH/SHUTDOWN of `dev`'s driver; None when the driver lacks it, or
/// when `dev` has no module driver (the emulated kernel's own buses: a root port's `pciN`
/// detached with its bridge).
fn call_device_method(dev: u64, name: &str) -> Option<c_int> {
    let driver = with(|e| e.newbus.devices.get(&dev).map_or(0, |d| d.driver));
    if driver == 0 {
        return None;
    }
    let f = driver_method(driver, name)?;
    log(format!("{}: {name} ->", nameunit(dev)));
    // SAFETY: a device_method_t of the driver's table; device methods take the device_t.
    let f: DevMethod = unsafe { std::mem::transmute::<u64, DevMethod>(f) };
    // SAFETY: as above; no emulation lock is held.
    let r = unsafe { f(dev as *mut c_void) };
    log(format!("{}: {name} = {r}", nameunit(dev)));
    Some(r)
}

// --- drivers ----------------------------------------------------------------------------------

/// devclass_add_driver: the driver joins the bus devclass; its own devclass is created; the
/// bus's unattached children are offered to it (BUS_DRIVER_ADDED, pci_driver_added).
pub fn add_driver(bus: &str, driver: u64) {
    // SAFETY: the module's driver_t.
    let name = unsafe { cstr((*(driver as *const layouts::kobj_class)).name) };
    devclass_token(&name);
    with(|e| e.newbus.drivers.insert(name.clone(), (bus.to_string(), driver)));
    if bus == "pci" {
        // BUS_DRIVER_ADDED on every bus of the devclass: pci0 and the bridges' buses.
        for child in pci_functions() {
            if state(child) == layouts::DS_NOTPRESENT {
                log(format!("pci_driver_added({name}): probing {}", pci_location(child)));
                // Newbus changes the tree under the topology lock (bus_topo_assert in
                // device_probe_and_attach); it is not held while the module's chained event
                // handler runs, which takes it itself.
                super::sched::topo_lock();
                let _ = probe_and_attach(child);
                super::sched::topo_unlock();
            }
        }
    }
}

/// devclass_delete_driver: every device attached with the driver is detached first; the
/// first error is returned and the driver stays. As `devclass_driver_deleted`
/// (sys/kern/subr_bus.c) walks it: the driver's devclass unit by unit, each unit looked at
/// once, when the walk reaches it (`dc->devices[i]`, its driver compared then). A detach that
/// sleeps drops Giant, so a device attached meanwhile at a unit the walk already passed is
/// not visited (one at a unit above is).
pub fn delete_driver(driver: u64) -> c_int {
    // SAFETY: the module's driver_t.
    let name = unsafe { cstr((*(driver as *const layouts::kobj_class)).name) };
    let mut unit = 0;
    loop {
        let Some(at) = with(|e| e.newbus.devclasses.get(&name).map(|(_, units)| units.get(unit).copied())) else { break };
        let Some(d) = at else { break };
        unit += 1;
        if d == 0 || with(|e| e.newbus.devices.get(&d).map_or(true, |x| x.driver != driver)) {
            continue;
        }
        super::sched::topo_lock();
        let r = device_detach(d);
        if r == 0 {
            set_driver(d, 0);
        }
        super::sched::topo_unlock();
        if r != 0 {
            return r;
        }
    }
    with(|e| e.newbus.drivers.remove(&name));
    0
}

/// Devices attached with `driver` (devclass_quiesce_driver's walk).
pub fn attached_with(driver: u64) -> Vec<u64> {
    with(|e| e.newbus.devices.iter().filter(|(_, d)| d.driver == driver && d.state >= layouts::DS_ATTACHED).map(|(a, _)| *a).collect())
}

// --- probe, attach, detach --------------------------------------------------------------------

/// device_set_driver: the old softc is freed (poisoned), a new zeroed one of the driver's size
/// allocated; the device's ops become the driver's class.
fn set_driver(dev: u64, driver: u64) {
    let (old, size) = with(|e| {
        let d = e.newbus.devices.get_mut(&dev).expect("device");
        let old = (d.softc, d.softc_size);
        d.softc = 0;
        d.softc_size = 0;
        d.driver = driver;
        old
    });
    if old != 0 {
        // SAFETY: the softc allocated below, given back once; it is poisoned and kept, so a
        // read through a stale softc pointer sees 0xdeadc0de.
        unsafe {
            let w = old as *mut u32;
            for i in 0..size / 4 {
                w.add(i).write_unaligned(super::kern::FREE_POISON);
            }
        }
        log(format!("{}: softc {old:#x} freed", nameunit(dev)));
    }
    let cls = if driver == 0 { null_class() } else { driver };
    let ops = new_ops(cls);
    // SAFETY: the device object's ops field.
    unsafe { (*(dev as *mut DeviceObj)).ops = ops as *mut _ };
    if driver != 0 {
        // SAFETY: the module's driver_t.
        let size = unsafe { (*(driver as *const layouts::kobj_class)).size };
        let softc = vec![0u8; size.max(1)].leak().as_mut_ptr() as u64;
        with(|e| {
            let d = e.newbus.devices.get_mut(&dev).expect("device");
            d.softc = softc;
            d.softc_size = size;
            d.ops = ops;
        });
    }
}

fn pci_location(dev: u64) -> String {
    with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).map(|p| format!("device {}.{}", p.bdf.dev, p.bdf.func)).unwrap_or_default())
}

/// device_set_devclass_fixed (what `devctl set driver -f dev driver` does under the topology
/// lock after taking the device out of its old devclass).
pub fn set_devclass_fixed(dev: u64, class: &str) {
    remove_from_devclass(dev);
    add_to_devclass(dev, class, -1);
    with(|e| e.newbus.devices.get_mut(&dev).map(|d| d.fixed = true));
    log(format!("devctl set driver -f: {} is now {}", pci_location(dev), nameunit(dev)));
}

/// device_probe_child. Ok(()) leaves the device DS_ALIVE with the best driver.
fn probe(dev: u64) -> c_int {
    let (class, fixed) = with(|e| e.newbus.devices.get(&dev).map(|d| (d.devclass.clone(), d.fixed)).unwrap_or_default());
    let drivers: Vec<(String, u64)> = with(|e| {
        e.newbus.drivers.iter().filter(|(n, (bus, _))| bus == "pci" && class.as_ref().is_none_or(|c| c == *n)).map(|(n, (_, d))| (n.clone(), *d)).collect()
    });
    let mut best: Option<(c_int, u64, String)> = None;
    for (name, driver) in drivers {
        if class.is_none() {
            add_to_devclass(dev, &name, -1);
        }
        set_driver(dev, driver);
        let mut r = call_device_method(dev, "device_probe_desc").unwrap_or(layouts::ENXIO);
        if r <= layouts::BUS_PROBE_NOWILDCARD && !fixed {
            log(format!("{name}: probe bid {r} (BUS_PROBE_NOWILDCARD or lower) on a device whose devclass is not fixed: ENXIO"));
            r = layouts::ENXIO;
        }
        if class.is_none() {
            remove_from_devclass(dev);
        }
        if r > 0 {
            set_driver(dev, 0);
            continue;
        }
        if best.as_ref().is_none_or(|(p, _, _)| r > *p) {
            best = Some((r, driver, name));
        }
    }
    let Some((_, driver, name)) = best else {
        return layouts::ENXIO;
    };
    if class.is_none() {
        add_to_devclass(dev, &name, -1);
    }
    let current = with(|e| e.newbus.devices.get(&dev).map_or(0, |d| d.driver));
    if current != driver {
        set_driver(dev, driver);
        let _ = call_device_method(dev, "device_probe_desc");
    }
    with(|e| e.newbus.devices.get_mut(&dev).expect("device").state = layouts::DS_ALIVE);
    0
}

/// device_attach.
fn attach(dev: u64) -> c_int {
    super::pci::print_child(dev);
    with(|e| e.newbus.devices.get_mut(&dev).expect("device").state = layouts::DS_ATTACHING);
    let r = call_device_method(dev, "device_attach_desc").unwrap_or(0);
    if r != 0 {
        let (drv, unit) = with(|e| e.newbus.devices.get(&dev).map(|d| (d.driver, d.unit)).unwrap_or_default());
        // SAFETY: the module's driver_t.
        let dn = unsafe { cstr((*(drv as *const layouts::kobj_class)).name) };
        super::kern::console_line(&format!("device_attach: {dn}{unit} attach returned {r}\n"));
        super::pci::child_detached(dev);
        let fixed = with(|e| e.newbus.devices.get(&dev).is_some_and(|d| d.fixed));
        if !fixed {
            remove_from_devclass(dev);
        }
        set_driver(dev, 0);
        with(|e| e.newbus.devices.get_mut(&dev).expect("device").state = layouts::DS_NOTPRESENT);
        return r;
    }
    with(|e| {
        e.newbus.devices.get_mut(&dev).expect("device").state = layouts::DS_ATTACHED;
        e.rule_state.acpi_pci_detached.remove(&dev);
    });
    0
}

/// device_probe_and_attach.
pub fn probe_and_attach(dev: u64) -> c_int {
    if state(dev) >= layouts::DS_ALIVE {
        return 0;
    }
    let r = probe(dev);
    if r != 0 {
        let done = with(|e| e.newbus.devices.get_mut(&dev).map(|d| std::mem::replace(&mut d.nomatch_done, true)).unwrap_or(true));
        if !done {
            super::pci::probe_nomatch(dev);
        }
        return r;
    }
    attach(dev)
}

/// device_shutdown (sys/kern/subr_bus.c): DEVICE_SHUTDOWN of an attached device, 0 for one
/// that is not (or whose driver has no method).
pub fn device_shutdown(dev: u64) -> c_int {
    if state(dev) < layouts::DS_ATTACHED {
        return 0;
    }
    call_device_method(dev, "device_shutdown_desc").unwrap_or(0)
}

/// device_detach.
pub fn device_detach(dev: u64) -> c_int {
    let (st, busy) = with(|e| e.newbus.devices.get(&dev).map(|d| (d.state, d.busy)).unwrap_or_default());
    if busy > 0 {
        log(format!("device_detach({}) = EBUSY (busy {busy})", nameunit(dev)));
        return layouts::EBUSY;
    }
    if st == layouts::DS_ATTACHING {
        device_print(dev, "device in attaching state! Deferring detach.\n");
        return layouts::EBUSY;
    }
    if st != layouts::DS_ATTACHED {
        return 0;
    }
    let r = call_device_method(dev, "device_detach_desc").unwrap_or(0);
    if r != 0 {
        log(format!("device_detach({}) = {r}", nameunit(dev)));
        return r;
    }
    device_print(dev, "detached\n");
    nodes_left_at_detach(dev);
    super::pci::child_detached(dev);
    let fixed = with(|e| e.newbus.devices.get(&dev).is_some_and(|d| d.fixed));
    if !fixed {
        remove_from_devclass(dev);
    }
    with(|e| e.newbus.devices.get_mut(&dev).expect("device").state = layouts::DS_NOTPRESENT);
    set_driver(dev, 0);
    0
}

/// The child of pci bus `bus` at slot `s`, function `f` (acpi_get_device of a slot object:
/// acpi_pci.c `acpi_pci_save_handle` pairs them).
pub fn child_at(bus: u64, s: u8, f: u8) -> Option<u64> {
    let n = super::pcib::bus_number(bus)?;
    children_of(bus).into_iter().find(|&c| with(|e| e.newbus.devices.get(&c).and_then(|d| d.pci.as_ref()).is_some_and(|p| p.bdf.bus == n && p.bdf.dev == s && p.bdf.func == f)))
}

/// The pci0 child at slot `s`, function `f`.
pub fn pci_child_at(s: u8, f: u8) -> Option<u64> {
    child_at(pci0(), s, f)
}

/// BUS_RESCAN of pci bus `bus`, as sys/dev/pci/pci.c `pci_rescan_method` does it: a child
/// whose function reads all-ones is deleted (device_delete_child); each NVMe function that
/// answers and has no child gets one (pci_read_device, pci_add_child), and once the walk is
/// over the new children are probed and attached. Every slot is walked, also below a PCIe
/// root port (amd64's `pcib_maxslots` is PCI_SLOTMAX for every bridge; only slot 0 answers
/// there); functions 1..PCIB_MAXFUNCS of a slot only when function 0's header type has
/// PCIM_MFDEV (a single-function device may answer at every function number), and no function
/// of a slot whose function 0 has a header layout above PCI_MAXHDRTYPE. (Only NVMe
/// functions are added: the lab firmware places BARs for them only; a bridge never leaves.)
/// Called with the topology lock held.
pub fn rescan_bus(bus: u64) {
    let Some(n) = super::pcib::bus_number(bus) else { return };
    let name = nameunit(bus);
    for child in children_of(bus) {
        let Some(bdf) = with(|e| e.newbus.devices.get(&child).and_then(|d| d.pci.as_ref()).filter(|p| !p.bridge).map(|p| p.bdf)) else { continue };
        if super::machine::cfg_read(bdf, 0, 2) == 0xffff {
            let r = device_delete_child(bus, child);
            log(format!("BUS_RESCAN({name}): {:02x}:{:02x}.{} is gone: device_delete_child = {r}", bdf.bus, bdf.dev, bdf.func));
        }
    }
    let mut added = Vec::new();
    for s in 0..32u8 {
        let f0 = nvmehp_lab::firmware::Bdf { bus: n, dev: s, func: 0 };
        if super::machine::cfg_read(f0, 0, 2) == 0xffff {
            continue;
        }
        // A header layout above PCI_MAXHDRTYPE: the slot is skipped, as pci_rescan_method does.
        let hdrtype = super::machine::cfg_read(f0, 0x0e, 1);
        if hdrtype & 0x7f > 2 {
            continue;
        }
        let last = if hdrtype & 0x80 != 0 { 7 } else { 0 };
        for f in 0..=last {
            let bdf = nvmehp_lab::firmware::Bdf { func: f, ..f0 };
            if child_at(bus, s, f).is_some() || super::machine::cfg_read(bdf, 0, 2) == 0xffff {
                continue;
            }
            if super::machine::cfg_read(bdf, 0x08, 4) >> 8 != 0x01_08_02 {
                continue;
            }
            let dinfo = emu_pci_read_device(std::ptr::null_mut(), std::ptr::null_mut(), 0, c_int::from(n), c_int::from(s), c_int::from(f));
            if dinfo.is_null() {
                continue;
            }
            emu_pci_add_child(bus as *mut c_void, dinfo);
            added.push((s, f));
        }
    }
    for (s, f) in added {
        if let Some(child) = child_at(bus, s, f) {
            let r = probe_and_attach(child);
            log(format!("BUS_RESCAN({name}): added {n:02x}:{s:02x}.{f}: device_probe_and_attach = {r}"));
        }
    }
}

/// A newbus call of the module with a device_t acpi_pci's eject handler already detached: the
/// second handler's detach of the same device (DoubleDetach).
fn detached_by_acpi_pci(dev: u64, what: &str) {
    if with(|e| e.rule_state.acpi_pci_detached.contains(&dev)) {
        super::rules::finding(Rule::DoubleDetach, &format!("{what}({}) of a device acpi_pci's eject handler already detached", nameunit(dev)));
    }
}

/// The device whose DEVICE_ATTACH is running (DS_ATTACHING), if any: what a node made now
/// belongs to.
pub fn attaching() -> Option<u64> {
    with(|e| e.newbus.devices.iter().find(|(_, d)| d.state == layouts::DS_ATTACHING).map(|(a, _)| *a))
}

/// DEVICE_DETACH returned 0: subr_bus.c device_detach frees the softc next
/// (device_set_driver(dev, NULL)), so a node the attach made must be gone by now
/// (NodeLeftAfterDetach), and no live node may point into the softc (OrphanNode).
fn nodes_left_at_detach(dev: u64) {
    let (softc, size) = with(|e| e.newbus.devices.get(&dev).map(|d| (d.softc, d.softc_size as u64)).unwrap_or_default());
    let name = nameunit(dev);
    for (node, _) in super::devfs::nodes_owned_by(dev) {
        super::rules::finding(Rule::NodeLeftAfterDetach, &format!("device_detach({name}) returned 0 with node {node}, made by its attach, still published"));
    }
    // The softc is freed next: every other check on freed memory applies to it (a node's
    // si_drv1 in it is an orphan, a callout in it still armed runs on freed memory).
    super::kern::freed_memory_checks(softc, size, &format!("device_detach({name}) frees the softc {softc:#x}"));
}

/// The kernel's device_printf (newbus's own messages).
fn device_print(dev: u64, msg: &str) {
    super::kern::console_line(&device_line(dev, msg));
}

/// "name: msg", or "unknown: msg" for a device without a devclass (device_printf).
fn device_line(dev: u64, msg: &str) -> String {
    let name = with(|e| e.newbus.devices.get(&dev).and_then(|d| d.nameunit.as_ref().map(|n| n.to_string_lossy().into_owned())));
    format!("{}: {msg}", name.as_deref().unwrap_or("unknown"))
}

/// Whether every device's softc and state are back to nothing for `driver` (after unload).
pub fn devices_with_driver() -> Vec<String> {
    with(|e| e.newbus.devices.iter().filter(|(_, d)| d.driver != 0).map(|(_, d)| d.nameunit.as_ref().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect())
}

// --- the KPI ----------------------------------------------------------------------------------

fn dev_of(dev: *mut c_void, what: &str) -> u64 {
    let ok = with(|e| e.newbus.devices.contains_key(&(dev as u64)));
    if !ok && with(|e| e.newbus.deleted.contains(&(dev as u64))) {
        // A detach (or delete) of a device that is gone is its own rule; any other call with
        // the freed device_t is a plain use after free.
        let rule = if with(|e| e.rule_state.acpi_pci_detached.contains(&(dev as u64))) {
            // acpi_pci's handler detached it and its rescan deleted it: this is the second
            // handler acting on the same removal.
            Rule::DoubleDetach
        } else if matches!(what, "device_detach" | "device_delete_child") {
            Rule::DetachWithoutDevice
        } else {
            Rule::UseAfterFree
        };
        super::rules::finding(rule, &format!("use after free: {what}({dev:p}) of a device_t device_delete_child freed"));
        super::rules::panic(rule, &format!("{what}({dev:p}): use after free of a deleted device_t"));
    }
    if !ok {
        kernel_panic(&format!("{what}({dev:p}): not a device"));
    }
    dev as u64
}

extern "C" fn emu_device_get_softc(dev: *mut c_void) -> *mut c_void {
    let d = dev_of(dev, "device_get_softc");
    with(|e| e.newbus.devices[&d].softc) as *mut c_void
}

extern "C" fn emu_device_get_parent(dev: *mut c_void) -> *mut c_void {
    let d = dev_of(dev, "device_get_parent");
    with(|e| e.newbus.devices[&d].parent) as *mut c_void
}

extern "C" fn emu_device_get_nameunit(dev: *mut c_void) -> *const c_char {
    let d = dev_of(dev, "device_get_nameunit");
    with(|e| e.newbus.devices[&d].nameunit.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()))
}

extern "C" fn emu_device_get_name(dev: *mut c_void) -> *const c_char {
    let d = dev_of(dev, "device_get_name");
    let class = with(|e| e.newbus.devices[&d].devclass.clone());
    match class {
        // The devclass name, a C string that lives as long as the devclass (never freed here).
        Some(c) => with(|e| e.newbus.class_names.entry(c.clone()).or_insert_with(|| CString::new(c).expect("name")).as_ptr()),
        None => std::ptr::null(),
    }
}

extern "C" fn emu_device_get_unit(dev: *mut c_void) -> c_int {
    let d = dev_of(dev, "device_get_unit");
    with(|e| e.newbus.devices[&d].unit)
}

extern "C" fn emu_device_get_state(dev: *mut c_void) -> c_int {
    state(dev_of(dev, "device_get_state")) as c_int
}

extern "C" fn emu_device_is_attached(dev: *mut c_void) -> c_int {
    c_int::from(state(dev_of(dev, "device_is_attached")) >= layouts::DS_ATTACHED)
}

extern "C" fn emu_device_is_alive(dev: *mut c_void) -> c_int {
    c_int::from(state(dev_of(dev, "device_is_alive")) >= layouts::DS_ALIVE)
}

fn busy(dev: u64, delta: i32) {
    let mut d = dev;
    while d != 0 {
        let (old, parent) = with(|e| {
            let x = e.newbus.devices.get_mut(&d).expect("device");
            let old = x.busy;
            x.busy += delta;
            (old, x.parent)
        });
        if old + delta < 0 {
            kernel_panic(&format!("device_unbusy: called for non-busy device {}", nameunit(d)));
        }
        log(format!("device_{}busy({}) -> {}", if delta > 0 { "" } else { "un" }, nameunit(d), old + delta));
        // Only the first busy (last unbusy) propagates to the parent.
        if !((delta > 0 && old == 0) || (delta < 0 && old == 1)) {
            break;
        }
        d = parent;
    }
}

extern "C" fn emu_device_busy(dev: *mut c_void) {
    busy(dev_of(dev, "device_busy"), 1);
}

extern "C" fn emu_device_unbusy(dev: *mut c_void) {
    busy(dev_of(dev, "device_unbusy"), -1);
}

extern "C" fn emu_device_set_desc(dev: *mut c_void, desc: *const c_char) {
    let d = dev_of(dev, "device_set_desc");
    // SAFETY: NULL or a C string that outlives the device (device_set_desc does not copy).
    let s = (!desc.is_null()).then(|| unsafe { cstr(desc) });
    with(|e| e.newbus.devices.get_mut(&d).expect("device").desc = s);
}

extern "C" fn emu_device_get_sysctl_tree(dev: *mut c_void) -> *mut layouts::sysctl_oid {
    let d = dev_of(dev, "device_get_sysctl_tree");
    let t = with(|e| e.newbus.devices[&d].sysctl_tree);
    if t != 0 {
        return t as *mut _;
    }
    let oid = Box::into_raw(Box::<layouts::sysctl_oid>::default()) as u64;
    with(|e| e.newbus.devices.get_mut(&d).expect("device").sysctl_tree = oid);
    oid as *mut _
}

extern "C" fn emu_device_printf(dev: *mut c_void, fmt: *const c_char, a1: u64, a2: u64, a3: u64, a4: u64) -> c_int {
    let d = dev_of(dev, "device_printf");
    // SAFETY: a printf(9) format and its arguments.
    let s = unsafe { format(fmt, &[a1, a2, a3, a4]) };
    let line = device_line(d, &s);
    log(format!("device_printf({line:?})"));
    super::kern::console_text(&line);
    line.len() as c_int
}

extern "C" fn emu_device_probe_and_attach(dev: *mut c_void) -> c_int {
    let d = dev_of(dev, "device_probe_and_attach");
    super::sched::require_topo("device_probe_and_attach");
    probe_and_attach(d)
}

extern "C" fn emu_device_detach(dev: *mut c_void) -> c_int {
    let d = dev_of(dev, "device_detach");
    detached_by_acpi_pci(d, "device_detach");
    super::sched::require_topo("device_detach");
    device_detach(d)
}

extern "C" fn emu_devclass_find(name: *const c_char) -> *mut c_void {
    // SAFETY: a C string per devclass_find(9).
    let name = unsafe { cstr(name) };
    let r = with(|e| e.newbus.devclasses.get(&name).map_or(0, |(t, _)| *t));
    log(format!("devclass_find({name}) = {r:#x}"));
    r as *mut c_void
}

fn class_of_token(dc: *mut c_void) -> Option<Vec<u64>> {
    with(|e| e.newbus.devclasses.values().find(|(t, _)| *t == dc as u64).map(|(_, u)| u.clone()))
}

extern "C" fn emu_devclass_get_maxunit(dc: *mut c_void) -> c_int {
    let r = if dc.is_null() { -1 } else { class_of_token(dc).map_or(-1, |u| u.len() as c_int) };
    log(format!("devclass_get_maxunit({dc:p}) = {r}"));
    r
}

extern "C" fn emu_devclass_get_device(dc: *mut c_void, unit: c_int) -> *mut c_void {
    let r = class_of_token(dc).and_then(|u| usize::try_from(unit).ok().and_then(|i| u.get(i).copied())).unwrap_or(0);
    log(format!("devclass_get_device({dc:p}, {unit}) = {r:#x}"));
    r as *mut c_void
}

extern "C" fn emu_device_find_child(dev: *mut c_void, class: *const c_char, unit: c_int) -> *mut c_void {
    // SAFETY: a C string.
    let class = unsafe { cstr(class) };
    // sys/kern/subr_bus.c device_find_child: unit -1 is the child of that class with the
    // lowest unit (the hotplug discovery looks up pcib0's "pci" child so).
    let r = with(|e| {
        let (_, units) = e.newbus.devclasses.get(&class)?;
        let mine = |c: &u64| *c != 0 && e.newbus.devices.get(c).is_some_and(|d| d.parent == dev as u64);
        if unit == -1 {
            return units.iter().copied().find(mine);
        }
        let c = *units.get(usize::try_from(unit).ok()?)?;
        mine(&c).then_some(c)
    });
    r.unwrap_or(0) as *mut c_void
}

/// pci_find_dbsf (sys/dev/pci/pci.c): the pci child at domain/bus/slot/function, or NULL.
extern "C" fn emu_pci_find_dbsf(domain: u32, bus: u8, slot: u8, func: u8) -> *mut c_void {
    let r = with(|e| {
        e.newbus.devices.iter().find_map(|(&d, dev)| {
            let b = dev.pci.as_ref()?.bdf;
            (domain == 0 && b.bus == bus && b.dev == slot && b.func == func).then_some(d)
        })
    });
    log(format!("pci_find_dbsf({domain}, {bus}, {slot}, {func}) = {:#x}", r.unwrap_or(0)));
    r.unwrap_or(0) as *mut c_void
}

/// device_delete_child (sys/kern/subr_bus.c): the child's children first, then device_detach
/// (an error, e.g. EBUSY, ends it and the child stays), then it leaves its devclass and its
/// parent's list and is freed. Here the freed device_t's memory is poisoned and kept, so a
/// later use reads the poison, and a later KPI call with it is a finding (and a panic).
pub fn device_delete_child(parent: u64, child: u64) -> c_int {
    let grandchildren = with(|e| e.newbus.devices.get(&child).map(|d| d.children.clone()).unwrap_or_default());
    for g in grandchildren {
        let r = device_delete_child(child, g);
        if r != 0 {
            return r;
        }
    }
    // Named by its PCI location (pci0:b:s:f, as pci(4) prints it): a device detached by its
    // driver and not of a fixed devclass has no name any more.
    let name = with(|e| e.newbus.devices.get(&child).and_then(|d| d.pci.as_ref()).map(|p| format!("pci0:{}:{}:{}", p.bdf.bus, p.bdf.dev, p.bdf.func)))
        .unwrap_or_else(|| nameunit(child));
    let r = device_detach(child);
    if r != 0 {
        log(format!("device_delete_child({}, {name}) = {r}", nameunit(parent)));
        return r;
    }
    remove_from_devclass(child);
    with(|e| {
        if let Some(p) = e.newbus.devices.get_mut(&parent) {
            p.children.retain(|&c| c != child);
        }
        e.newbus.devices.remove(&child);
        e.newbus.deleted.insert(child);
    });
    // SAFETY: the DeviceObj make_device leaked for this device; nothing in the emulation uses
    // it any more (the record is gone), and it is never freed, so the write is in bounds.
    unsafe { std::ptr::write_bytes(child as *mut u8, 0xde, std::mem::size_of::<DeviceObj>()) };
    log(format!("device_delete_child({}, {name}) = 0 (device_t {child:#x} freed, poisoned)", nameunit(parent)));
    0
}

extern "C" fn emu_device_delete_child(parent: *mut c_void, child: *mut c_void) -> c_int {
    let p = dev_of(parent, "device_delete_child");
    let c = dev_of(child, "device_delete_child");
    detached_by_acpi_pci(c, "device_delete_child");
    super::sched::require_topo("device_delete_child");
    device_delete_child(p, c)
}

/// pci_read_device (sys/dev/pci/pci.c): a devinfo for the function if it answers (vendor not
/// all-ones), else NULL. Opaque to the module: here a host allocation naming the function.
extern "C" fn emu_pci_read_device(_pcib: *mut c_void, _bus: *mut c_void, d: c_int, b: c_int, s: c_int, f: c_int) -> *mut c_void {
    let bdf = nvmehp_lab::firmware::Bdf { bus: b as u8, dev: s as u8, func: f as u8 };
    let vendor = super::machine::cfg_read(bdf, 0, 2);
    if d != 0 || vendor == 0xffff {
        log(format!("pci_read_device({d}, {b}, {s}, {f}) = NULL (vendor {vendor:#x})"));
        return std::ptr::null_mut();
    }
    let dinfo = Box::into_raw(Box::new([0u64; 8])) as u64;
    with(|e| e.newbus.devinfos.insert(dinfo, bdf));
    log(format!("pci_read_device({d}, {b}, {s}, {f}) = {dinfo:#x} (vendor {vendor:#x})"));
    dinfo as *mut c_void
}

/// pci_add_child (sys/dev/pci/pci.c): the new child of the pci bus for a devinfo, its
/// resources reserved (`pci_add_resources`: here the lab firmware's BAR placement for the slot,
/// memory decode on, bus mastering left to the driver, as at boot), no driver yet.
extern "C" fn emu_pci_add_child(bus: *mut c_void, dinfo: *mut c_void) {
    let bus = dev_of(bus, "pci_add_child");
    let Some(bdf) = with(|e| e.newbus.devinfos.remove(&(dinfo as u64))) else {
        kernel_panic(&format!("pci_add_child({dinfo:p}): not a devinfo pci_read_device returned"));
    };
    // SAFETY: the Box emu_pci_read_device leaked for this devinfo, taken over here once.
    drop(unsafe { Box::from_raw(dinfo.cast::<[u64; 8]>()) });
    let f = super::machine::program_function(bdf);
    let Some(f) = f else {
        log(format!("pci_add_child({}, {:02x}:{:02x}.{}): not an NVMe function this machine places; no child", nameunit(bus), bdf.bus, bdf.dev, bdf.func));
        return;
    };
    let child = make_device(bus, new_ops(null_class()), None, -1);
    let pc = super::pci::enumerate(&f);
    with(|e| e.newbus.devices.get_mut(&child).expect("dev").pci = Some(pc));
    log(format!("pci_add_child({}, {:02x}:{:02x}.{}) = device_t {child:#x}", nameunit(bus), bdf.bus, bdf.dev, bdf.func));
}

pub fn register(t: &mut KpiTable) {
    t.function("pci_read_device", emu_pci_read_device as extern "C" fn(_, _, _, _, _, _) -> _ as usize);
    t.function("pci_add_child", emu_pci_add_child as extern "C" fn(_, _) as usize);
    t.function("pci_find_dbsf", emu_pci_find_dbsf as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("device_delete_child", emu_device_delete_child as extern "C" fn(_, _) -> _ as usize);
    t.function("kobj_lookup_method", emu_kobj_lookup_method as extern "C" fn(_, _, _) -> _ as usize);
    t.function("device_get_softc", emu_device_get_softc as extern "C" fn(_) -> _ as usize);
    t.function("device_get_parent", emu_device_get_parent as extern "C" fn(_) -> _ as usize);
    t.function("device_get_nameunit", emu_device_get_nameunit as extern "C" fn(_) -> _ as usize);
    t.function("device_get_name", emu_device_get_name as extern "C" fn(_) -> _ as usize);
    t.function("device_get_unit", emu_device_get_unit as extern "C" fn(_) -> _ as usize);
    t.function("device_get_state", emu_device_get_state as extern "C" fn(_) -> _ as usize);
    t.function("device_is_attached", emu_device_is_attached as extern "C" fn(_) -> _ as usize);
    t.function("device_is_alive", emu_device_is_alive as extern "C" fn(_) -> _ as usize);
    t.function("device_busy", emu_device_busy as extern "C" fn(_) as usize);
    t.function("device_unbusy", emu_device_unbusy as extern "C" fn(_) as usize);
    t.function("device_set_desc", emu_device_set_desc as extern "C" fn(_, _) as usize);
    t.function("device_get_sysctl_tree", emu_device_get_sysctl_tree as extern "C" fn(_) -> _ as usize);
    t.function("device_printf", emu_device_printf as extern "C" fn(_, _, _, _, _, _) -> _ as usize);
    t.function("device_probe_and_attach", emu_device_probe_and_attach as extern "C" fn(_) -> _ as usize);
    t.function("device_detach", emu_device_detach as extern "C" fn(_) -> _ as usize);
    t.function("device_find_child", emu_device_find_child as extern "C" fn(_, _, _) -> _ as usize);
    t.function("devclass_find", emu_devclass_find as extern "C" fn(_) -> _ as usize);
    t.function("devclass_get_maxunit", emu_devclass_get_maxunit as extern "C" fn(_) -> _ as usize);
    t.function("devclass_get_device", emu_devclass_get_device as extern "C" fn(_, _) -> _ as usize);
}

/// A finding for anything newbus still holds for a driver after its module unloaded.
pub fn end_of_life_checks() {
    for n in devices_with_driver() {
        finding(format!("after unload: device {n} still has a driver"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_delete_child_refuses_a_busy_child_and_frees_and_poisons_a_deleted_one() {
        let parent = make_device(0, 0, None, -1);
        let child = make_device(parent, 0, None, -1);
        let grandchild = make_device(child, 0, None, -1);
        // A busy device refuses its detach (EBUSY), so it stays, and so does its parent.
        with(|e| e.newbus.devices.get_mut(&grandchild).expect("dev").busy = 1);
        assert_eq!(device_delete_child(parent, child), layouts::EBUSY);
        assert!(with(|e| e.newbus.devices.contains_key(&child) && e.newbus.devices.contains_key(&grandchild)));
        // Not busy: children first, then the child; out of the parent's list, freed, poisoned.
        with(|e| e.newbus.devices.get_mut(&grandchild).expect("dev").busy = 0);
        assert_eq!(device_delete_child(parent, child), 0);
        with(|e| {
            assert!(!e.newbus.devices.contains_key(&child) && !e.newbus.devices.contains_key(&grandchild));
            assert!(e.newbus.deleted.contains(&child) && e.newbus.deleted.contains(&grandchild));
            assert!(!e.newbus.devices[&parent].children.contains(&child));
        });
        // SAFETY: the DeviceObj is kept (never freed) after the delete, so it is readable.
        let ops = unsafe { (*(child as *const DeviceObj)).ops } as u64;
        assert_eq!(ops, 0xdede_dede_dede_dede);
    }
}
