//! Which of the module's objects belong to a scenario controller.
//!
//! A controller is the pci function in its scenario slot (a pci0 child on pc, the child of the
//! root port's pciN on q35: `emu::machine::slot_of`); it is *attached* when that child has a driver
//! (`nvmehp<U>`, state DS_ATTACHED or more). Its disks are the created disks whose `d_ident`
//! is the controller's serial number (the module copies the Identify Controller serial, which
//! the lab sets per plug: `NVMEHP<qdev>`), in `d_unit` order, which is the order the module
//! creates them: its namespaces in ascending nsid. Its nodes are the devfs nodes
//! `nvmehp<U>ns<N>`.

use crate::emu::{self, newbus};
use crate::layouts;

/// The pci function in `slot` that has a driver, if any.
pub fn attached(slot: u8) -> Option<u64> {
    newbus::pci_functions().into_iter().find(|&c| slot_of(c) == Some(slot) && newbus::state(c) >= layouts::DS_ATTACHED)
}

/// Whether newbus has any function in `slot` (with or without a driver).
pub fn in_newbus(slot: u8) -> bool {
    newbus::pci_functions().into_iter().any(|c| slot_of(c) == Some(slot))
}

fn slot_of(dev: u64) -> Option<u8> {
    emu::with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).map(|p| emu::machine::slot_of(p.bdf)))
}

/// Controllers with a driver: the pci functions in state DS_ATTACHED or more (never a root
/// port's pcib: it is no function a driver of the module's takes).
pub fn attached_count() -> usize {
    newbus::pci_functions().into_iter().filter(|&c| newbus::state(c) >= layouts::DS_ATTACHED).count()
}

/// The serial number QEMU gives the controller plugged as `qdev` (the lab's device
/// properties: `NVMEHP` + the qdev id, at most 20 characters, NVMe's SN length).
pub fn serial_of(qdev: &str) -> String {
    format!("NVMEHP{qdev}").chars().take(20).collect()
}

/// The disks of the controller with serial `serial`, in d_unit order.
pub fn disks_of(serial: &str) -> Vec<String> {
    let mut d: Vec<(u32, String)> = emu::geom::created_disks().into_iter().filter(|(_, ident, _, _)| ident.trim() == serial).map(|(n, _, u, _)| (u, n)).collect();
    d.sort();
    d.into_iter().map(|(_, n)| n).collect()
}

/// The module's disk for namespace `nsid` of the controller plugged as `qdev` with
/// `namespaces` namespaces, found as glabel finds a volume: by its GEOM::lunid (asked through
/// the driver's d_getattr), which must be the NGUID the lab gave that namespace
/// (`nvmehp_lab::machine::nguid`), whatever unit the disk got. A controller whose only
/// namespace is QEMU's built-in one has no NGUID; its one disk is the namespace's.
pub fn disk_of(qdev: &str, nsid: u32, namespaces: usize) -> Option<String> {
    let disks = disks_of(&serial_of(qdev));
    if namespaces == 1 && nsid == 1 {
        return disks.into_iter().next();
    }
    let want = nvmehp_lab::machine::nguid(qdev, nsid);
    disks.into_iter().find(|d| emu::geom::getattr(d, "GEOM::lunid", 64) == (0, want.clone()))
}

/// Disks published now (created, not gone).
pub fn disk_count() -> usize {
    emu::geom::created_disks().len()
}

/// The module's namespace nodes alive in devfs (`nvmehp<U>ns<N>`; the controller node
/// `nvmehp<U>` is not a namespace node, as the engine mode's node count has none).
pub fn ns_nodes() -> Vec<String> {
    emu::with(|e| e.devs.keys().filter(|n| is_ns_node(n)).cloned().collect())
}

fn is_ns_node(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvmehp") else { return false };
    let Some((u, n)) = rest.split_once("ns") else { return false };
    !u.is_empty() && !n.is_empty() && u.bytes().all(|b| b.is_ascii_digit()) && n.bytes().all(|b| b.is_ascii_digit())
}

/// The devfs node of namespace `nsid` of the controller attached in `slot`.
pub fn ns_node(slot: u8, nsid: u32) -> Option<(String, u64)> {
    let dev = attached(slot)?;
    let name = format!("{}ns{nsid}", newbus::nameunit(dev));
    emu::with(|e| e.devs.get(&name).map(|c| (name.clone(), *c)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespace_nodes_are_told_from_controller_nodes() {
        assert!(super::is_ns_node("nvmehp0ns1"));
        assert!(super::is_ns_node("nvmehp12ns256"));
        assert!(!super::is_ns_node("nvmehp0"));
        assert!(!super::is_ns_node("nvmehpns1"));
        assert!(!super::is_ns_node("nvme0ns1"));
    }

    #[test]
    fn serials_are_cut_to_the_nvme_length() {
        assert_eq!(super::serial_of("c1-g2"), "NVMEHPc1-g2");
        assert_eq!(super::serial_of("ebs-g1000").len(), 15);
        assert_eq!(super::serial_of("abcdefghijkl-g1000"), "NVMEHPabcdefghijkl-g");
    }
}
