//! The platform side of the lab on its own (no engine): QEMU starts, the firmware finds and
//! programs the controller, the ACPI block turns plug/unplug into Notify 1/3, eject removes the
//! function, a surprise eject raises nothing. These pin down the QEMU facts the runner relies on.

use std::time::Duration;

use nvme_hotplug::platform::{PciPresence, RegisterIo};
use nvmehp_lab::acpi_hotplug::{Notify, NotifyCode};
use nvmehp_lab::firmware::{self, Bdf};
use nvmehp_lab::machine::{Machine, MsixPlacement};
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::shared_ram::RamAccess;
use nvmehp_lab::scenario::{ControllerSpec, NamespaceSpec};
use nvmehp_lab::skip::qemu_or_skip;

fn spec(id: &str, slot: u8) -> ControllerSpec {
    ControllerSpec { id: id.into(), slot, namespaces: vec![NamespaceSpec { nsid: 1, size_mib: 4, lba: 512 }] }
}

fn wait_notifies(m: &mut Machine) -> Vec<Notify> {
    for _ in 0..500 {
        let n = m.poll_notifies().unwrap();
        if !n.is_empty() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Vec::new()
}

#[test]
fn firmware_finds_cold_controller_and_registers_answer() {
    if !qemu_or_skip("firmware_finds_cold_controller_and_registers_answer") {
        return;
    }
    let mut m = Machine::start(MachineKind::Pc, &[spec("c0", 4)]).unwrap();
    let found = m.scan().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let (slot, f) = found[0];
    assert_eq!((slot, f.bdf.dev), (4, 4));
    assert_eq!((f.vendor, f.device), (0x1b36, 0x0010));
    let p = m.platform(&f);
    assert!(p.present());
    let cap = p.read64(0);
    assert_eq!(cap & 0xffff, 0x7ff, "CAP.MQES {cap:#x}");
    assert_eq!(p.read32(8), 0x0001_0400, "VS");
}

/// `msix-exclusive-bar=on`: the boot scan sizes and places BAR4 (the MSI-X table and PBA, per
/// the capability's BIRs) after BAR0 in the function's window, and a table entry written there
/// reads back; without it BAR4 is not implemented and the table is in BAR0. Fails if the
/// firmware places BAR0 only (BAR4 stays at 0, and reads there do not reach the table).
#[test]
fn the_firmware_places_an_exclusive_msix_bar_after_bar0() {
    if !qemu_or_skip("the_firmware_places_an_exclusive_msix_bar_after_bar0") {
        return;
    }
    for (msix, bir, bar4) in [(MsixPlacement::Bar0, 0, None), (MsixPlacement::ExclusiveBar, 4, Some(firmware::bar0_for_slot(4) + 0x2000))] {
        let cold = [(spec("c0", 4), 0)];
        let mut m = Machine::start_full(MachineKind::Pc, &cold, &[], RamAccess::Qtest, None, msix).unwrap();
        let found = m.scan().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let bdf = Bdf::slot(4);
        let (cap, table, pba, bar4_reg) = m
            .guest()
            .qtest(|q| {
                let cap = firmware::find_capability(q, bdf, firmware::cfg::CAP_ID_MSIX)?.expect("an MSI-X capability");
                Ok((cap, firmware::cfg_read32(q, bdf, cap + 4)?, firmware::cfg_read32(q, bdf, cap + 8)?, firmware::cfg_read32(q, bdf, 0x20)?))
            })
            .unwrap();
        assert!(cap >= 0x40);
        assert_eq!((table & 7, pba & 7), (bir, bir), "{msix:?}: Table BIR, PBA BIR");
        assert_eq!(bar4.map(|b| b as u32), (bar4_reg != 0).then_some(bar4_reg & !0xf), "{msix:?}: BAR4 {bar4_reg:#x}");
        if let Some(base) = bar4 {
            // Table entry 0's Message Data, written and read back through BAR4's address.
            let at = base + u64::from(table & !7) + 8;
            let back = m.guest().qtest(|q| {
                q.writel(at, 0x5a5a)?;
                q.readl(at)
            });
            assert_eq!(back.unwrap(), 0x5a5a, "the table is not at BAR4's address");
        }
    }
}

#[test]
fn hot_add_announced_removal_and_surprise_removal() {
    if qemu_or_skip("hot_add_announced_removal_and_surprise_removal") {
        hotplug_sequence(MachineKind::Pc);
    }
}

#[test]
fn q35_root_ports_hot_add_announced_removal_and_surprise_removal() {
    if qemu_or_skip("q35_root_ports_hot_add_announced_removal_and_surprise_removal") {
        hotplug_sequence(MachineKind::Q35);
    }
}

fn hotplug_sequence(kind: MachineKind) {
    let mut m = Machine::start(kind, &[spec("c0", 4)]).unwrap();
    let found = m.scan().unwrap();
    assert_eq!(found.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4], "boot-time controller found");
    assert!(m.poll_notifies().unwrap().is_empty());

    assert_ne!(m.removable_slots(6).unwrap() & (1 << if kind == MachineKind::Pc { 6 } else { 0 }), 0, "slot removable");
    m.hot_add(&spec("c1", 6)).unwrap();
    assert_eq!(wait_notifies(&mut m), vec![Notify { slot: 6, code: NotifyCode::DeviceCheck }]);
    let f = m.probe(6).unwrap().expect("function in slot 6");
    let p = m.platform(&f);
    assert_eq!(p.read32(8), 0x0001_0400);

    m.request_unplug(6).unwrap();
    assert_eq!(wait_notifies(&mut m), vec![Notify { slot: 6, code: NotifyCode::EjectRequest }]);
    assert!(m.slot_present(6).unwrap(), "device stays until ejected");
    m.eject(6).unwrap();
    assert!(!m.slot_present(6).unwrap());
    assert_eq!(m.reap(Duration::from_secs(5)).unwrap(), 0, "DEVICE_DELETED and blockdev-del");

    // Surprise: eject with no device_del. Nothing is announced; reads of the old BAR return 0.
    let c0 = m.probe(4).unwrap().unwrap();
    let p0 = m.platform(&c0);
    m.eject(4).unwrap();
    assert!(m.poll_notifies().unwrap().is_empty());
    assert!(!p0.present());
    assert_eq!(p0.read32(0x1c), 0, "CSTS after removal reads 0 in QEMU");
    assert_eq!(m.reap(Duration::from_secs(5)).unwrap(), 0);
    assert_eq!(m.guest().fault(), None);
}
