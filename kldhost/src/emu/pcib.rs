//! PCI-PCI bridges below pci0: q35's `pcie-root-port`s, each a `pcibN` on pci0 with its own
//! pci bus `pciN` (sys/dev/pci/pci_pci.c, sys/dev/acpica/acpi_pcib_pci.c).
//!
//! - **Not a driver the module can take.** FreeBSD's pcib driver attached each bridge at boot,
//!   before any module loaded, so `pcibN` is DS_ATTACHED when the module's driver is added and
//!   is never offered to it (`pci_driver_added` offers unattached children only). Its class is
//!   the emulated kernel's (`pcib`, the same host class as pcib0), not a module driver, so
//!   nothing is left "with a driver" after the unload.
//! - **Its pci bus.** `pcib_attach_common` reads the secondary bus number from the bridge's
//!   config space (`PCIR_SECBUS_1`, which the lab's firmware programs as the port's slot
//!   number) and `pcib_attach_child` adds a `pci` child with the next free unit: `pciN`.
//!   `pcib_read_ivar` answers that bus number for `PCIB_IVAR_BUS` (what `pcib_get_bus(pciN)`
//!   asks), 0 for `PCIB_IVAR_DOMAIN`.
//! - **ACPI.** acpi_pcib_pci.c `acpi_pcib_read_ivar` answers `ACPI_IVAR_HANDLE` with the
//!   bridge's own handle (`\_SB_.PCI0.Snn_`), so `acpi_get_handle(pciN)` is the port's object
//!   and acpi_pci(4) attaches to pciN as to pci0. That driver only exists in the stock-FreeBSD
//!   variant (`--acpi-pci`: acpi_pci drives pci0, so it gave the bridge its handle and
//!   acpi_pcib_pci took it); otherwise pci_pci's `pcib_read_ivar` has no such ivar (ENOENT).
//! - **A bus that comes and goes.** Loaded from loader.conf, the module may run before a
//!   bridge's bus is attached ([`attach_root_ports`] with `buses_late`, then [`attach_bus`]);
//!   `devctl detach pcibN` deletes the bus and `devctl attach pcibN` makes a new one
//!   ([`devctl_detach`], [`attach_bus`]), so a `pciN` device_t kept across them is freed memory.
//! - **Config space** of the functions behind a port: `PCIB_READ_CONFIG` of any bridge ends at
//!   the host bridge (pci_pci.c `pcib_read_config` forwards to its grandparent), i.e.
//!   configuration mechanism #1 with bus = the secondary bus; QEMU routes the type 1 cycle
//!   through the port. The bridge's own BARs are not listed: the module never allocates them.

use super::machine::cfg_read;
use super::newbus;
use super::{log, with};
use crate::layouts;
use nvmehp_lab::firmware::Bdf;
use std::ffi::c_int;

/// pcireg.h: header type register, its layout mask, the PCI-PCI bridge layout; the secondary
/// bus number of a type 1 header; class/subclass of a PCI-PCI bridge.
const PCIR_HDRTYPE: u16 = 0x0e;
const PCIM_HDRTYPE: u32 = 0x7f;
const PCIM_HDRTYPE_BRIDGE: u32 = 0x01;
const PCIR_SECBUS_1: u16 = 0x19;
const CLASS_BRIDGE_PCI: u32 = 0x0604;

/// enum pcib_device_ivars (sys/dev/pci/pcib_private.h) and acpivar.h's ACPI_IVAR_HANDLE.
const PCIB_IVAR_DOMAIN: c_int = 0;
const PCIB_IVAR_BUS: c_int = 1;
pub const ACPI_IVAR_HANDLE: c_int = 0x100;

/// Adds, under pci0, a `pcibN` for each root port in `slots` (in slot order, as pci(4)'s
/// enumeration meets them), DS_ATTACHED as after boot, and, unless `buses_late`, its `pciN`.
/// With `buses_late` the module loads before the bridges' buses attach (from loader.conf,
/// before newbus's configure pass reaches them): [`attach_bus`] adds each one later. A slot
/// whose function 0 is not a PCI-PCI bridge is skipped with a log line.
pub(super) fn attach_root_ports(pci0: u64, slots: &[u8], pcib_ops: u64, pci_ops: u64, buses_late: bool) {
    for &s in slots {
        let bdf = Bdf { bus: 0, dev: s, func: 0 };
        let hdr = cfg_read(bdf, PCIR_HDRTYPE, 1) & PCIM_HDRTYPE;
        let class = cfg_read(bdf, 0x08, 4) >> 16;
        if hdr != PCIM_HDRTYPE_BRIDGE || class != CLASS_BRIDGE_PCI {
            log(format!("pci0: 00:{s:02x}.0 is not a PCI-PCI bridge (header {hdr:#x}, class {class:#06x}): no pcib"));
            continue;
        }
        let pcib = newbus::make_device(pci0, pcib_ops, Some("pcib"), -1);
        with(|e| {
            let d = e.newbus.devices.get_mut(&pcib).expect("pcib");
            d.state = layouts::DS_ATTACHED;
            d.desc = Some("PCI-PCI bridge".into());
            d.pci = Some(super::pci::PciChild { bdf, bars: Vec::new(), msix: None, msi: 0, msi_emulated: false, msi_alloc: 0, msi_enabled: false, bridge: true });
        });
        if buses_late {
            log(format!("{}: <PCI-PCI bridge> at device {s}.0 on pci0; its pci bus not attached yet", newbus::nameunit(pcib)));
        } else {
            let bus = add_bus(pcib, pci_ops);
            log(format!("{}: <PCI-PCI bridge> at device {s}.0 on pci0; {}", newbus::nameunit(pcib), bus_line(pcib, bus)));
        }
    }
}

/// pci_pci.c `pcib_attach_common` reads the secondary bus number from the bridge's config
/// space (`PCIR_SECBUS_1`, which the lab's firmware programs as the port's slot number) and
/// `pcib_attach_child` adds a `pci` child with the next free unit: that bus, DS_ATTACHED.
fn add_bus(pcib: u64, pci_ops: u64) -> u64 {
    let bdf = with(|e| e.newbus.devices.get(&pcib).and_then(|d| d.pci.as_ref()).map(|p| p.bdf)).expect("a pcib has its function");
    let sec = cfg_read(bdf, PCIR_SECBUS_1, 1) as u8;
    let bus = newbus::make_device(pcib, pci_ops, Some("pci"), -1);
    with(|e| {
        e.newbus.devices.get_mut(&bus).expect("pci").state = layouts::DS_ATTACHED;
        e.newbus.buses.insert(bus, sec);
    });
    bus
}

fn bus_line(pcib: u64, bus: u64) -> String {
    let sec = bus_number(bus).unwrap_or_default();
    format!("{}: <PCI bus> on {} (secondary bus {sec})", newbus::nameunit(bus), newbus::nameunit(pcib))
}

/// `pcib_attach_child` for a bridge that has no pci bus (after [`attach_root_ports`] with
/// `buses_late`, or after [`devctl_detach`]): a new `pciN` (the next free unit, so usually
/// the old name; a new device_t), which pci_attach enumerates (`pci_add_children`: a child
/// per function that answers) and `bus_generic_attach` probes and attaches: on an empty bus
/// what [`newbus::rescan_bus`] does. The bridge becomes DS_ATTACHED. None (nothing done) for
/// a device that is no bridge or a bridge that has its bus. Topology lock held.
pub fn attach_bus(pcib: u64) -> Option<u64> {
    let bridge = with(|e| e.newbus.devices.get(&pcib).and_then(|d| d.pci.as_ref()).is_some_and(|p| p.bridge));
    if !bridge || bus_below(pcib).is_some() {
        return None;
    }
    let pci_ops = with(|e| e.newbus.devices.get(&e.newbus.pci0).map(|d| d.ops)).expect("pci0");
    let bus = add_bus(pcib, pci_ops);
    with(|e| e.newbus.devices.get_mut(&pcib).expect("pcib").state = layouts::DS_ATTACHED);
    log(format!("pcib_attach_child({}): {}", newbus::nameunit(pcib), bus_line(pcib, bus)));
    newbus::rescan_bus(bus);
    Some(bus)
}

/// `devctl detach pcibN` (subr_bus.c device_detach, pci_pci.c `pcib_detach`):
/// `bus_generic_detach` (each function on the bridge's bus detached, the first refusal ends
/// it and is returned, everything stays), then `device_delete_children`: the bus and its
/// children are deleted, their device_t's freed. The bridge stays, DS_NOTPRESENT (its devclass
/// is fixed here, so `devctl attach pcibN` finds it again). Topology lock held.
pub fn devctl_detach(pcib: u64) -> c_int {
    if let Some(bus) = bus_below(pcib) {
        for child in newbus::children_of(bus).into_iter().rev() {
            let r = newbus::device_detach(child);
            if r != 0 {
                log(format!("devctl detach {}: {} refused: {r}", newbus::nameunit(pcib), newbus::nameunit(child)));
                return r;
            }
        }
        let r = newbus::device_delete_child(pcib, bus);
        if r != 0 {
            return r;
        }
        with(|e| e.newbus.buses.remove(&bus));
    }
    with(|e| e.newbus.devices.get_mut(&pcib).expect("pcib").state = layouts::DS_NOTPRESENT);
    log(format!("devctl detach {}: 0 (its pci bus deleted)", newbus::nameunit(pcib)));
    0
}

/// The bus number of pci bus device `bus` (pci0: 0), or None for a device that is no pci bus.
pub fn bus_number(bus: u64) -> Option<u8> {
    with(|e| if bus != 0 && bus == e.newbus.pci0 { Some(0) } else { e.newbus.buses.get(&bus).copied() })
}

/// The pci bus device whose bus number is `n`.
pub fn bus_by_number(n: u8) -> Option<u64> {
    with(|e| if n == 0 { Some(e.newbus.pci0).filter(|&d| d != 0) } else { e.newbus.buses.iter().find(|(_, &b)| b == n).map(|(&d, _)| d) })
}

/// Every pci bus: pci0 first, then the bridges' buses in unit order.
pub fn buses() -> Vec<u64> {
    let mut v = vec![newbus::pci0()];
    let mut others: Vec<u64> = with(|e| e.newbus.buses.keys().copied().collect());
    others.sort_by_key(|&b| with(|e| e.newbus.devices.get(&b).map_or(0, |d| d.unit)));
    v.extend(others);
    v
}

/// The pcib on pci0 at `slot`, if that slot holds a bridge.
pub fn bridge_at(slot: u8) -> Option<u64> {
    newbus::pci_children()
        .into_iter()
        .find(|&c| with(|e| e.newbus.devices.get(&c).and_then(|d| d.pci.as_ref()).is_some_and(|p| p.bridge && p.bdf.dev == slot)))
}

/// The pci bus below bridge `pcib`.
pub fn bus_below(pcib: u64) -> Option<u64> {
    with(|e| e.newbus.devices.get(&pcib).and_then(|d| d.children.iter().copied().find(|c| e.newbus.buses.contains_key(c))))
}

/// `BUS_READ_IVAR(pcibN, pciN, which)`: pci_pci.c `pcib_read_ivar` (domain, secondary bus),
/// preceded in the stock variant by acpi_pcib_pci.c's `ACPI_IVAR_HANDLE`. None: ENOENT.
pub(super) fn read_ivar(pcib: u64, which: c_int) -> Option<usize> {
    let bus = bus_below(pcib)?;
    match which {
        PCIB_IVAR_DOMAIN => Some(0),
        PCIB_IVAR_BUS => bus_number(bus).map(usize::from),
        ACPI_IVAR_HANDLE => {
            let slot = with(|e| e.newbus.devices.get(&pcib).and_then(|d| d.pci.as_ref()).map(|p| p.bdf.dev))?;
            super::acpi::bridge_handle(slot)
        }
        _ => None,
    }
}
