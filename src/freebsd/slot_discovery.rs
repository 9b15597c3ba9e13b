//! Where the ACPI PCI hotplug slots are: a walk of the root bus's ACPI object
//! (`\_SB_.PCI0`) into a list of (slot object, pci bus, slot number, in-tree handler).
//!
//! Two layouts are served, both as QEMU builds them (and bhyve, EC2 Nitro for the first):
//! - **On the root bus** (i440fx): each Device child of `\_SB_.PCI0` with an `_EJ0` method is
//!   a slot of `pci0`, its number the device field of its `_ADR`.
//! - **Behind a PCI-PCI bridge** (q35's PCIe root ports, a cold-plugged `pci-bridge`): the
//!   bridge's Device object (e.g. `S20_` for the root port in slot 4) has a PCI `_ADR` and no
//!   `_EJ0` (a cold-plugged bridge cannot be ejected); its own Device children with `_EJ0` are
//!   the slots of the bridge's secondary bus (a root port's one slot is `S00_`, `_ADR` 0), and
//!   the platform's Notify for them arrives on those child objects. The slot number is the
//!   child's `_ADR` on the secondary bus, so two slots may share a number on two buses: a slot
//!   is always (bus, number), never a number alone.
//!
//! One level of bridges, as acpi_pci looks at one level below each bus it drives
//! (acpi_pci.c acpi_pci_attach walks its bus object's children, depth 1).
//!
//! Who else handles a slot is decided per bus: acpi_pci attaches to exactly the pci buses
//! that have an ACPI handle (acpi_pci.c acpi_pci_probe), and on a bus it drives its notify
//! handler sits on every `_EJ0` child. A secondary bus has one when its bridge is
//! acpi_pcib_pci's, which answers `ACPI_IVAR_HANDLE` with the bridge's object
//! (acpi_pcib_pci.c acpi_pcib_read_ivar), and acpi_pcib_pci takes only a bridge that has an
//! object itself (acpi_pcib_pci_probe), i.e. one on a bus acpi_pci drives.

use super::acpi::{AcpiHandle, AcpiStatus};
use super::bus_topo::TopoLock;
use super::device::Device;
use super::pci_bus::PciBus;
use crate::hotplug::mode::InTreeHandler;
use alloc::vec::Vec;

/// How to find a slot's pci bus in newbus: pci0 (the root object's device's `pci` child), or
/// the secondary bus of the bridge whose object and `_ADR` it keeps ([`secondary_bus`]).
///
/// A slot keeps this path, not the bus's `device_t`: a bridge's secondary bus is deleted with
/// the bridge's detach (`devctl detach pcib1`; pci_pci.c pcib_detach deletes its children) and
/// a new one is made at its next attach, so a kept `device_t` could be freed memory. Each slot
/// action resolves the path again under the topology lock. Within one action the bus stays:
/// while the action sleeps (an attach, a detach or a namespace rescan of our controller on that
/// bus) the bus's detach would have to detach that controller first, which newbus refuses for
/// a device that is attaching (subr_bus.c device_detach) and our driver refuses while it
/// detaches or rescans. One window is left: the single-slot rescan's `pci_read_device`
/// allocates with M_WAITOK before the new function has a child, and a bridge detached during
/// that sleep would free the bus under it (an administrator's `devctl detach` racing a device
/// check; pci0 is never deleted).
#[derive(Clone, Copy)]
pub struct BusPath {
    root: AcpiHandle,
    bridge: Option<(AcpiHandle, (u8, u16))>,
}

impl BusPath {
    /// The root bus's path (`root`: `\_SB_.PCI0`).
    pub fn root(root: AcpiHandle) -> Self {
        BusPath { root, bridge: None }
    }

    /// The pci bus now, if newbus has it. Under the topology lock; the bus is valid while it
    /// is held.
    pub fn resolve(&self, topo: &TopoLock) -> Option<PciBus> {
        let root_bus = PciBus::new(self.root.device().and_then(|pcib| topo.find_child(pcib, c"pci", -1))?);
        match self.bridge {
            None => Some(root_bus),
            Some((bridge, adr)) => secondary_bus(topo, &root_bus, bridge, adr),
        }
    }
}

/// One hotplug slot: its ACPI object and where its functions live in newbus.
pub struct FoundSlot {
    /// The slot object (`_EJ0`, `_OST`, `_STA`; notifications arrive here).
    pub handle: AcpiHandle,
    /// How to find `bus` again.
    pub path: BusPath,
    /// The pci bus the slot's functions are children of, at discovery.
    pub bus: PciBus,
    /// The device number on `bus` (`_ADR` >> 16).
    pub pci_slot: u8,
    /// Whether acpi_pci drives `bus`, and so has its handler on this slot.
    pub in_tree: InTreeHandler,
}

/// What the walk found.
pub struct Found {
    /// Every slot whose bus is in newbus.
    pub slots: Vec<FoundSlot>,
    /// Bridge objects that have slots but whose device or secondary pci bus newbus does not
    /// have (yet: loaded from loader.conf, PCI may still be attaching).
    pub missing: Vec<AcpiHandle>,
}

impl Found {
    /// How many distinct pci buses the slots are on.
    pub fn buses(&self) -> usize {
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if !self.slots[..i].iter().any(|t| t.bus.device() == s.bus.device()) {
                n += 1;
            }
        }
        n
    }
}

/// Whether acpi_pci drives `bus` (module doc): its `acpi_get_handle` is not NULL.
fn in_tree_of(bus: &PciBus) -> InTreeHandler {
    if AcpiHandle::of_device(&bus.device()).is_some() { InTreeHandler::Fixed } else { InTreeHandler::Absent }
}

/// Walks `root` (the root bus's object, whose pci bus is `root_bus`) for hotplug slots, on the
/// root bus and one bridge level below it. Sleeps (AML, the topology lock).
pub fn find_slots(root: AcpiHandle, root_bus: PciBus) -> Result<Found, AcpiStatus> {
    let mut found = Found { slots: Vec::new(), missing: Vec::new() };
    let root_in_tree = in_tree_of(&root_bus);
    for c in root.child_devices()? {
        if c.has(c"_EJ0") {
            if let Ok((pci_slot, _)) = c.pci_address() {
                let path = BusPath::root(root);
                push(&mut found.slots, FoundSlot { handle: c, path, bus: root_bus, pci_slot, in_tree: root_in_tree })?;
            }
            continue;
        }
        let Ok(adr) = c.pci_address() else { continue }; // not a PCI device: no bridge
        let slots = c.hotplug_slots()?;
        if slots.is_empty() {
            continue; // an ordinary device, or a bridge without hotplug slots
        }
        let bus = {
            let topo = TopoLock::lock();
            secondary_bus(&topo, &root_bus, c, adr).map(|b| (b, in_tree_of(&b)))
        };
        let Some((bus, in_tree)) = bus else {
            push(&mut found.missing, c)?;
            continue;
        };
        let path = BusPath { root, bridge: Some((c, adr)) };
        for s in slots {
            if let Ok((pci_slot, _)) = s.pci_address() {
                push(&mut found.slots, FoundSlot { handle: s, path, bus, pci_slot, in_tree })?;
            }
        }
    }
    Ok(found)
}

fn push<T>(v: &mut Vec<T>, x: T) -> Result<(), AcpiStatus> {
    crate::fallible::try_push(v, x).map_err(|_| AcpiStatus::NO_MEMORY)
}

/// The pci bus below the bridge whose ACPI object is `bridge` (`adr`: its `_ADR` on
/// `parent`).
///
/// The bridge's device_t is the ACPI object's own device first (`acpi_get_device`): nothing
/// in the namespace names the secondary bus, whose number is what the bridge's registers say
/// at the time (firmware or FreeBSD may number it; `_ADR` only places the bridge on its parent
/// bus), while acpi_pci binds each Device object to the device_t of the function at its
/// `_ADR` when it adds its bus's children (acpi_pci.c acpi_pci_save_handle,
/// acpi_pci_update_device). On a parent bus acpi_pci does not drive nobody made that
/// binding, so the function at `adr` on `parent` is looked up instead. Its secondary bus is
/// its `pci` child (pci_pci.c pcib_attach_child adds it). `None` while either is missing.
fn secondary_bus(topo: &TopoLock, parent: &PciBus, bridge: AcpiHandle, adr: (u8, u16)) -> Option<PciBus> {
    let func = u8::try_from(adr.1).ok().filter(|&f| u32::from(f) <= super::bindings::PCI_FUNCMAX as u32);
    let by_adr: Option<Device> = func.and_then(|f| parent.child_at(adr.0, f));
    [bridge.device(), by_adr]
        .into_iter()
        .flatten()
        .find_map(|dev| topo.find_child(dev, c"pci", -1))
        .map(PciBus::new)
}
