//! A pci bus (`pciN`) and config-space access to its slots, including slots with no device.
//!
//! Hotplug needs to ask "does anything answer in slot 3?" before newbus has a `device_t` for it
//! (after an insertion) and after the `device_t` is gone (after a removal). That question goes
//! to the bus's bridge (`PCIB_READ_CONFIG`), the same path `pci_rescan` uses.

use super::bindings;
use super::device::Device;
use super::outside_rescan::PciLoc;
use core::ffi::c_int;

/// The vendor ID an empty slot (or a removed device) reads as.
pub const VENDOR_NONE: u16 = 0xffff;

/// A newbus device of devclass "pci" (a PCI bus, child of a bridge).
#[derive(Clone, Copy, Debug)]
pub struct PciBus {
    bus: Device,
}

impl PciBus {
    /// Wraps a pci bus device (e.g. the parent of a PCI function, or `pci0` found below the
    /// host bridge). Passing another kind of device gives all-ones reads, not memory errors:
    /// kobj answers unknown methods with its error method.
    pub fn new(bus: Device) -> Self {
        PciBus { bus }
    }

    /// The bus device.
    pub fn device(&self) -> Device {
        self.bus
    }

    /// PCI domain (segment) number.
    pub fn domain(&self) -> u32 {
        // SAFETY: ivar read answered by the bus's parent bridge.
        unsafe { bindings::nvmehp_pcib_get_domain(self.bus.as_raw()) }
    }

    /// Bus number.
    pub fn number(&self) -> u32 {
        // SAFETY: ivar read answered by the bus's parent bridge.
        unsafe { bindings::nvmehp_pcib_get_bus(self.bus.as_raw()) }
    }

    /// Reads `width` (1, 2 or 4) bytes at `reg` of `slot`.`func`'s config space through the
    /// bridge, whether or not a device_t exists. Out-of-range arguments read as all-ones.
    pub fn read_config(&self, slot: u8, func: u8, reg: u32, width: c_int) -> u32 {
        let valid = u32::from(slot) <= bindings::PCI_SLOTMAX as u32
            && u32::from(func) <= bindings::PCI_FUNCMAX as u32
            && matches!(width, 1 | 2 | 4)
            && reg.is_multiple_of(width as u32)
            && reg + width as u32 <= 4096;
        let Some(pcib) = self.bus.parent() else { return u32::MAX };
        if !valid {
            return u32::MAX;
        }
        // SAFETY: PCIB_READ_CONFIG on the bus's bridge with a validated address and width.
        unsafe {
            bindings::nvmehp_pcib_read_config(
                pcib.as_raw(),
                self.number(),
                u32::from(slot),
                u32::from(func),
                reg,
                width,
            )
        }
    }

    /// Vendor ID of `slot`.`func` from config space; [`VENDOR_NONE`] when nothing answers.
    pub fn vendor_id(&self, slot: u8, func: u8) -> u16 {
        self.read_config(slot, func, bindings::PCIR_VENDOR as u32, 2) as u16
    }

    /// Header type byte of `slot`.`func` (`PCIR_HDRTYPE`): the layout in its low 7 bits
    /// (`PCIM_HDRTYPE`), the multi-function flag in bit 7 (`PCIM_MFDEV`, meaningful on
    /// function 0). 0xff when nothing answers.
    pub fn header_type(&self, slot: u8, func: u8) -> u8 {
        self.read_config(slot, func, bindings::PCIR_HDRTYPE as u32, 1) as u8
    }

    /// `PCIB_MAXFUNCS` of the bus's bridge: the highest function number a multi-function
    /// device may use, `PCI_FUNCMAX` (7) unless ARI is enabled below the bridge (then the
    /// slot field is part of the function number and only slot 0 exists). `None` without a
    /// bridge.
    pub fn max_funcs(&self) -> Option<c_int> {
        let pcib = self.bus.parent()?;
        // SAFETY: a kobj method call on the bus's live bridge; it only reads bridge state.
        Some(unsafe { bindings::nvmehp_pcib_maxfuncs(pcib.as_raw()) })
    }

    /// Function 0 of `slot` answers config reads.
    pub fn slot_present(&self, slot: u8) -> bool {
        self.vendor_id(slot, 0) != VENDOR_NONE
    }

    /// The newbus device pci has at a PCI location, if any (`pci_find_dbsf`). Only stable
    /// while the caller holds the topology lock.
    pub fn function_at(loc: PciLoc) -> Option<Device> {
        // SAFETY: pci_find_dbsf only searches pci's device list.
        unsafe { Device::from_raw(bindings::pci_find_dbsf(loc.domain, loc.bus, loc.slot, loc.func)) }
    }

    /// Where the PCI function `dev`, a child of this bus, is.
    pub fn location_of(&self, dev: Device) -> Option<PciLoc> {
        Some(PciLoc { domain: self.domain(), bus: u8::try_from(self.number()).ok()?, slot: dev.pci_slot(), func: dev.pci_function() })
    }

    /// The newbus device for `slot`.`func`, if pci has one. Only stable while the caller holds
    /// the topology lock ([`TopoLock`](super::bus_topo::TopoLock)).
    pub fn child_at(&self, slot: u8, func: u8) -> Option<Device> {
        let (domain, bus) = (self.domain(), self.number());
        let bus = u8::try_from(bus).ok()?;
        // SAFETY: pci_find_dbsf only searches pci's device list.
        unsafe { Device::from_raw(bindings::pci_find_dbsf(domain, bus, slot, func)) }
    }
}
