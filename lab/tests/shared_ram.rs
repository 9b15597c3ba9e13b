//! Guest RAM shared with QEMU (`ram_access = "shared"`): the lab's mapping and QEMU's RAM are
//! the same bytes. Checked three ways: bytes written through the mapping are read back by
//! qtest `read` and the other way round (pc and q35); a real NVMe DMA (an Identify the test
//! submits by hand, queues in the mapping) lands in the mapping; an address outside guest RAM
//! is refused. Then the same hotplug cycles run through both RAM paths, and only the qtest
//! path spends qtest commands on RAM.

use std::time::{Duration, Instant};

use nvme_hotplug::platform::{DmaAllocator, DmaRegion, RegisterIo};
use nvmehp_lab::bench::hotplug_cycles;
use nvmehp_lab::dma::DMA_POOL_START;
use nvmehp_lab::machine::{Machine, GUEST_RAM_MIB};
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::scenario::{ControllerSpec, NamespaceSpec};
use nvmehp_lab::shared_ram::{RamAccess, RamError};
use nvmehp_lab::skip::qemu_or_skip;

const RAM_END: u64 = (GUEST_RAM_MIB as u64) << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

fn round_trips(kind: MachineKind) {
    let m = Machine::start_with(kind, &[], &[], RamAccess::Shared).expect("QEMU starts on the shared RAM file");
    let g = m.guest();
    assert_eq!(g.ram_access(), RamAccess::Shared);
    let shared = g.shared_ram().expect("the lab maps guest RAM");
    assert_eq!(shared.size(), RAM_END);
    // Low RAM under the legacy window, the DMA pool, and the last bytes of RAM.
    for (i, gpa) in [0x1000, DMA_POOL_START + 0x123, RAM_END - 64].into_iter().enumerate() {
        let a = pattern(64, i as u8);
        shared.write(gpa, &a).unwrap();
        let mut seen = vec![0u8; 64];
        g.qtest(|q| q.read(gpa, &mut seen)).unwrap();
        assert_eq!(seen, a, "{kind:?}: qtest reads what the mapping wrote at {gpa:#x}");

        let b = pattern(64, 0x80 + i as u8);
        g.qtest(|q| q.write(gpa, &b)).unwrap();
        shared.read(gpa, &mut seen).unwrap();
        assert_eq!(seen, b, "{kind:?}: the mapping reads what qtest wrote at {gpa:#x}");
        let dword = gpa & !3;
        g.qtest(|q| q.writel(dword, 0xdead_beef)).unwrap();
        assert_eq!(shared.load_u32(dword).unwrap(), 0xdead_beef, "{kind:?}: a 32-bit qtest store at {dword:#x}");
    }
    assert_eq!(g.fault(), None);
}

#[test]
fn mapping_and_qtest_see_the_same_bytes_pc() {
    if qemu_or_skip("mapping_and_qtest_see_the_same_bytes_pc") {
        round_trips(MachineKind::Pc);
    }
}

#[test]
fn mapping_and_qtest_see_the_same_bytes_q35() {
    if qemu_or_skip("mapping_and_qtest_see_the_same_bytes_q35") {
        round_trips(MachineKind::Q35);
    }
}

fn wait_csts_rdy(p: &impl RegisterIo, ready: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while (p.read32(0x1c) & 1 != 0) != ready {
        assert!(Instant::now() < deadline, "CSTS.RDY never became {ready}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An Identify Controller whose submission entry is written through the mapping and whose
/// completion entry and data QEMU's NVMe model DMAs into guest RAM: both are read back from the
/// mapping (and the data from qtest too). Nothing here goes through the engine.
#[test]
fn nvme_identify_dma_lands_in_the_mapping() {
    if !qemu_or_skip("nvme_identify_dma_lands_in_the_mapping") {
        return;
    }
    let spec = ControllerSpec { id: "c0".into(), slot: 4, namespaces: vec![NamespaceSpec { nsid: 1, size_mib: 4, lba: 512 }] };
    let mut m = Machine::start_with(MachineKind::Pc, &[spec], &[], RamAccess::Shared).expect("QEMU starts");
    let (_, f) = m.scan().unwrap().into_iter().next().expect("controller found");
    let p = m.platform(&f);
    let g = m.guest().clone();
    let shared = g.shared_ram().expect("shared RAM");
    let (asq, acq, data) = (p.alloc_dma(4096, 4096).unwrap(), p.alloc_dma(4096, 4096).unwrap(), p.alloc_dma(4096, 4096).unwrap());
    shared.fill(data.bus_addr(), 4096, 0xa5).unwrap();

    p.write32(0x14, 0); // CC.EN = 0
    wait_csts_rdy(&p, false);
    p.write32(0x24, (15 << 16) | 15); // AQA: 16-entry admin queues
    p.write64(0x28, asq.bus_addr());
    p.write64(0x30, acq.bus_addr());
    p.write32(0x14, (4 << 20) | (6 << 16) | 1); // IOCQES 16 B, IOSQES 64 B, EN
    wait_csts_rdy(&p, true);

    // Identify (opcode 06h), CID 0x1234, PRP1 = data, CDW10.CNS = 1 (controller).
    let mut sqe = [0u8; 64];
    sqe[0..4].copy_from_slice(&(0x06u32 | (0x1234 << 16)).to_le_bytes());
    sqe[24..32].copy_from_slice(&data.bus_addr().to_le_bytes());
    sqe[40..44].copy_from_slice(&1u32.to_le_bytes());
    shared.write(asq.bus_addr(), &sqe).unwrap();
    p.write32(0x1000, 1); // SQ 0 tail doorbell

    let deadline = Instant::now() + Duration::from_secs(5);
    let dw3 = loop {
        let dw3 = shared.load_u32(acq.bus_addr() + 12).unwrap();
        if dw3 & (1 << 16) != 0 {
            break dw3;
        }
        assert!(Instant::now() < deadline, "no completion entry appeared in the mapping");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((dw3 & 0xffff, dw3 >> 17), (0x1234, 0), "CID and status of the Identify completion");

    let mut page = vec![0u8; 4096];
    shared.read(data.bus_addr(), &mut page).unwrap();
    assert_eq!(u16::from_le_bytes([page[0], page[1]]), 0x1b36, "Identify VID (QEMU's PCI vendor)");
    assert!(page[4..24].starts_with(b"NVMEHPc0-g1"), "serial number: {:?}", String::from_utf8_lossy(&page[4..24]));
    let mut via_qtest = vec![0u8; 4096];
    g.qtest(|q| q.read(data.bus_addr(), &mut via_qtest)).unwrap();
    assert_eq!(via_qtest, page, "qtest sees the same Identify data");
    // The region type reads it through the mapping too.
    let mut via_region = vec![0u8; 24];
    data.read(0, &mut via_region);
    assert_eq!(via_region, page[..24]);

    p.write32(0x14, 0);
    wait_csts_rdy(&p, false);
    assert_eq!(g.fault(), None);
}

/// Negative control: an address past the end of guest RAM (or straddling it, or in the legacy
/// VGA/ROM window) is refused by the mapping; through the guest's RAM path it reads as zeros
/// and is recorded as a harness fault instead of touching memory outside the mapping.
#[test]
fn an_address_outside_guest_ram_is_refused() {
    if !qemu_or_skip("an_address_outside_guest_ram_is_refused") {
        return;
    }
    let m = Machine::start_with(MachineKind::Pc, &[], &[], RamAccess::Shared).expect("QEMU starts");
    let g = m.guest();
    let shared = g.shared_ram().expect("shared RAM");
    let mut b = [0xffu8; 8];
    assert_eq!(shared.read(RAM_END, &mut b), Err(RamError::OutOfRange { gpa: RAM_END, len: 8, ram: RAM_END }));
    assert!(matches!(shared.write(RAM_END - 4, &b), Err(RamError::OutOfRange { .. })), "straddles the end");
    assert!(matches!(shared.load_u64(0xfee0_0000), Err(RamError::OutOfRange { .. })), "LAPIC, not RAM");
    assert!(matches!(shared.load_u32(0xb_8000), Err(RamError::LegacyWindow { .. })), "VGA window");
    assert_eq!(b, [0xff; 8], "a refused read leaves the buffer alone");
    assert_eq!(g.fault(), None, "refusals by the mapping itself are not harness faults");

    g.ram_read(RAM_END + 0x1000, &mut b);
    assert_eq!(b, [0; 8], "refused read returns zeros");
    let fault = g.fault().expect("the refused access is recorded");
    assert!(fault.contains("outside RAM"), "{fault}");
}

/// The same hotplug cycles (hot-add, bring-up, 4 KiB write + read + verify, announced removal)
/// pass through both RAM paths; only the qtest path spends qtest commands on guest RAM.
#[test]
fn both_ram_paths_run_the_same_cycles() {
    if !qemu_or_skip("both_ram_paths_run_the_same_cycles") {
        return;
    }
    let qtest = hotplug_cycles(3, RamAccess::Qtest).expect("cycles through qtest");
    let shared = hotplug_cycles(3, RamAccess::Shared).expect("cycles through the mapping");
    eprintln!("qtest commands per cycle: qtest RAM {:.0}, shared RAM {:.0}", qtest.qtest_per_cycle, shared.qtest_per_cycle);
    assert_eq!((qtest.cycles, shared.cycles), (3, 3));
    assert_eq!((qtest.leaked_bytes, shared.leaked_bytes), (0, 0));
    assert!(
        shared.qtest_per_cycle < qtest.qtest_per_cycle,
        "shared RAM must save the RAM commands: {} vs {}",
        shared.qtest_per_cycle,
        qtest.qtest_per_cycle
    );
}
