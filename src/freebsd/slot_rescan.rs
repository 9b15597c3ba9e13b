//! Rescan of one PCI slot: adds and attaches the functions of that slot that newbus does not
//! know yet, and touches nothing else.
//!
//! FreeBSD has no "rescan this slot" KPI. `BUS_RESCAN` of a pci bus (`pci_rescan_method`,
//! sys/dev/pci/pci.c) walks *every* slot: it deletes each child whose function stopped
//! answering, adds each function it did not know and probes every new child. A device check on
//! one slot must not do that to the others (a half-removed device in another slot would be
//! deleted under its own hotplug handling). What pci_rescan_method does for *one* slot is made
//! of global functions that derived pci buses built as modules call too (vmd(4)):
//!
//! 1. function 0's vendor ID reads 0xffff: the slot is empty, nothing to do;
//! 2. function 0's header type (`PCIR_HDRTYPE`) has a layout above `PCI_MAXHDRTYPE`: the slot
//!    is skipped; with `PCIM_MFDEV` set, functions 1..`PCIB_MAXFUNCS(pcib)` are looked at too,
//!    otherwise function 0 only;
//! 3. each function that answers and has no child yet (pci_rescan matches children by slot and
//!    function; `pci_find_dbsf` answers the same from pci's device list) is added by its static
//!    `pci_identify_function`: `pci_read_device(pcib, bus, domain, busno, slot, func)` and, if
//!    that returned a devinfo, `pci_add_child(bus, dinfo)`;
//! 4. after the walk, `device_probe_and_attach` runs on the new children only; children that
//!    existed before are neither re-probed nor deleted. Each child is looked up again before
//!    its probe: the adds and the probes before it may have slept, and with them given up the
//!    topology lock to a thread that deleted it. A new child whose attach failed because its
//!    function left meanwhile (vendor ID all-ones after the attach) is deleted again: nothing
//!    else would ever delete it, and it would hide the slot's next controller from step 3.
//!
//! Calling pci_add_child rather than rebuilding its steps keeps everything pci does for a new
//! child, including the bus's own `PCI_CHILD_ADDED` hook (acpi_pci binds the child to its ACPI
//! object there) and the `pci_add_device` event; the devinfo stays opaque to this module.
//!
//! ARI: pci_rescan does not check for ARI on a rescan, it only asks `PCIB_MAXFUNCS`. With ARI
//! enabled below the bridge (more than `PCI_FUNCMAX` functions) the slot field is part of the
//! function number, so an ACPI slot (`_ADR` device number) does not name a set of functions:
//! the walk refuses ([`WalkError::Ari`]) and the caller reports the check as failed. The
//! legacy root bus (i440fx QEMU/bhyve/EC2 Nitro) has no ARI. Below a PCIe root port (q35) pci
//! enables it only at the bus's attach, when the function at 0.0 then has the ARI capability and
//! the port supports it (pci.c pci_add_children, pci_pci.c pcib_try_enable_ari): not for a slot
//! that was empty at boot.
//!
//! Functions of the slot that stopped answering are left alone here: removing devices is the
//! hotplug state machine's detach (`SlotOps::detach_slot`), never a side effect of an add.
//! Everything runs under the topology lock, as pci_rescan_method does, and may sleep.

use super::bindings;
use super::bus_topo::TopoLock;
use super::pci_bus::{PciBus, VENDOR_NONE};
use core::ffi::c_int;
use core::fmt;

/// Function numbers of a conventional (non-ARI) slot: 0..=PCI_FUNCMAX.
const FUNCS: usize = bindings::PCI_FUNCMAX as usize + 1;

/// What a slot walk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SlotScan {
    /// Functions that answer config reads (function 0 first).
    pub present: u8,
    /// New children added (functions that answered and had no child).
    pub added: u8,
    /// Of those, how many a driver attached to.
    pub attached: u8,
}

/// Why the slot walk could not be done; the caller fails the check (never a `BUS_RESCAN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The bus has no bridge (not a pci bus).
    NoBridge,
    /// `PCIB_MAXFUNCS` is above `PCI_FUNCMAX`: ARI, slots do not group functions.
    Ari(c_int),
    /// Adding a function failed (errno); the children added before it were still attached.
    AddFailed { func: u8, error: c_int },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NoBridge => f.write_str("the bus has no bridge"),
            WalkError::Ari(n) => write!(f, "ARI is enabled below the bridge ({n} functions per device)"),
            WalkError::AddFailed { func, error } => write!(f, "adding function {func} failed: {error}"),
        }
    }
}

/// Adds and attaches the new functions of `slot` on `bus` (see the module doc for the rules).
/// The topology lock guard is the proof the caller holds it.
pub fn rescan_slot(topo: &TopoLock, bus: &PciBus, slot: u8) -> Result<SlotScan, WalkError> {
    let max_funcs = bus.max_funcs().ok_or(WalkError::NoBridge)?;
    if max_funcs > bindings::PCI_FUNCMAX as c_int || max_funcs < 0 {
        return Err(WalkError::Ari(max_funcs));
    }
    let mut scan = SlotScan::default();
    if bus.vendor_id(slot, 0) == VENDOR_NONE {
        return Ok(scan);
    }
    let hdrtype = bus.header_type(slot, 0);
    if u32::from(hdrtype) & bindings::PCIM_HDRTYPE as u32 > bindings::PCI_MAXHDRTYPE as u32 {
        return Ok(scan);
    }
    let high = if u32::from(hdrtype) & bindings::PCIM_MFDEV as u32 != 0 { max_funcs as u8 } else { 0 };
    // The functions whose children this walk added, attached after it (pci_rescan's order: add
    // all, then probe the new ones), so that a multi-function driver finds its siblings in the
    // tree. Function numbers, not device_t's: see the probe loop.
    let mut added = [false; FUNCS];
    let mut failure = None;
    for func in 0..=high {
        if bus.vendor_id(slot, func) == VENDOR_NONE {
            continue;
        }
        scan.present += 1;
        if bus.child_at(slot, func).is_some() {
            continue; // known: not re-added, not re-probed
        }
        match topo.add_pci_function(bus, slot, func) {
            Ok(Some(_)) => {
                added[usize::from(func)] = true;
                scan.added += 1;
            }
            Ok(None) => scan.present -= 1, // stopped answering between the two reads
            Err(error) => {
                failure = Some(WalkError::AddFailed { func, error });
                break;
            }
        }
    }
    for func in (0..FUNCS as u8).filter(|&f| added[usize::from(f)]) {
        // Looked up again: every probe_and_attach before this one slept (DEVICE_ATTACH brings
        // a controller up), and so may pci_read_device (M_WAITOK), giving up Giant, the
        // topology lock; meanwhile another thread may have deleted the child and newbus freed
        // its device_t (device_delete_child, sys/kern/subr_bus.c). A function whose child is
        // gone is skipped; a child someone else already probed is not probed again
        // (device_probe_and_attach returns at once for a device that has a driver).
        let Some(dev) = bus.child_at(slot, func) else { continue };
        match topo.probe_and_attach(dev) {
            Ok(()) => scan.attached += 1,
            // The function left during its own attach (a surprise removal in the middle of the
            // bring-up: the driver read all-ones or zeros and failed). device_attach keeps a
            // child whose attach failed, driverless (sys/kern/subr_bus.c), and this one is
            // stale at once; left on the bus it would keep the controller plugged into the
            // slot next from ever being added (step 3 skips a function that has a child, and
            // no check deletes a child whose function answers again). Deleted as the stale
            // sweep deletes a child no driver took: no driver code runs.
            Err(_) if bus.vendor_id(slot, func) == VENDOR_NONE => {
                if let Some(dev) = bus.child_at(slot, func) {
                    let _ = topo.delete_child(bus.device(), dev);
                }
            }
            Err(_) => {}
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(scan),
    }
}
