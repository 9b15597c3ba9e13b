//! Host tests of attach and detach through the real entry points (`nvmehp_attach`,
//! `nvmehp_detach`) against the fake kernel and its NVMe model: bring-up waits that sleep and
//! are bounded, the interrupt chosen as nvme(4) chooses it (MSI-X with its table and PBA BARs
//! allocated first, else INTx) and given back in order.
//!
//! The slow-ready and never-ready bring-ups (a wait that sleeps, one bounded by CAP.TO), the
//! admin commands of a bring-up sharing one budget (admin commands answered slowly), and the
//! controller that cannot be stopped (bus mastering turned off before its memory or a parked
//! read is decided, the read held when the bit reads back on) run on the shipped .ko now,
//! against QEMU's controller through kldhost's device-fault layer (kldhost/tests/
//! device_faults.rs: rdy-slow, rdy-never, admin-latency, no-stop, busmaster-stuck, io-stall),
//! and are no longer here; so does an MSI-X interrupt that cannot be torn down (vector and
//! memory kept, every unload refused), through kldhost's `--fail bus_teardown_intr`
//! (kldhost/tests/failures.rs), with its table in BAR0 as QEMU has it by default; and MSI (a
//! function with no MSI-X, or whose MSI-X is refused: MSI, allocated before CC.EN, rid 1, given
//! back after the teardown), through kldhost's emulated MSI function (`--msi-instead-of-msix`,
//! `--msi-with-msix`: kldhost/tests/msi.rs). MSI-X with its table and PBA in BAR4 (QEMU's
//! `msix-exclusive-bar=on`, `kldhost run --msix-exclusive-bar`) runs on the .ko too
//! (kldhost/tests/msix_table_bar.rs): BAR4 allocated active before pci_alloc_msix and released
//! after the vector, before BAR0, at detach, after a failed bring-up and after an attach
//! failing past the bring-up. What stays needs what QEMU's controller cannot have, or what
//! kldhost does not look at: a PBA in another BAR than its table (QEMU puts both in BAR0, or
//! both in BAR4), and the interrupt vector and IEN of Create I/O Completion Queue as the
//! controller received them (the fake NVMe model records them; kldhost does not decode the
//! admin commands QEMU executes).

use super::bindings;
use super::fake_kernel::{self as fk, Knobs};
use super::fake_nvme::FakeNvme;
use super::glue_tests::SERIAL;
use super::pci_driver::{nvmehp_attach, nvmehp_detach};
use std::format;
use std::string::String;
use std::vec::Vec;

fn positions(log: &[String], prefix: &str) -> Vec<usize> {
    log.iter().enumerate().filter(|(_, l)| l.starts_with(prefix)).map(|(i, _)| i).collect()
}

fn first(log: &[String], prefix: &str) -> usize {
    *positions(log, prefix).first().unwrap_or_else(|| panic!("no `{prefix}` in {log:#?}"))
}

/// A present NVMe function (vendor 0x1b36) with a 16 KiB BAR0 and the given MSI knobs.
fn knobs(msi: Knobs) -> Knobs {
    Knobs { rman_size: 0x4000, pci_vendor: 0x1b36, d_gone_at_once: true, ..msi }
}

fn attach() -> i32 {
    // A kldunload of another test (one process, one set of module statics) leaves the
    // unloading flag set, which refuses attaches: back to "loaded".
    super::module::reset_for_tests();
    // SAFETY: the fake device; the fakes never dereference it.
    unsafe { nvmehp_attach(fk::fake_device()) }
}

fn detach() -> i32 {
    // SAFETY: as above.
    unsafe { nvmehp_detach(fk::fake_device()) }
}

/// MSI-X table in BAR0 (held by the engine already) and PBA in BAR2: only BAR2 is allocated,
/// BAR0 is not allocated a second time. Before the change: ENXIO, INTx. Stays here: QEMU's
/// `nvme` puts its PBA in the table's BAR (BAR0, or BAR4 with `msix-exclusive-bar=on`), so a
/// PBA allocated on its own while the table's BAR is held is shown nowhere on the .ko
/// (kldhost/tests/msix_table_bar.rs `msix_allocates_only_the_bars_not_already_held` shows the
/// table and PBA in held BAR0, none allocated, and both in BAR4, allocated once).
#[test]
fn msix_allocates_only_the_bars_not_already_held() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(knobs(Knobs { msix_count: 2, msix_table_rid: 0x10, msix_pba_rid: 0x18, ..Knobs::default() }));
    fk::install_nvme(FakeNvme::new(false, false));

    assert_eq!(attach(), 0, "{:#?}", fk::log());
    let log = fk::log();
    assert_eq!(positions(&log, "bus_alloc_resource type=3 rid=0x10").len(), 1, "BAR0 once, for the registers");
    assert!(first(&log, "bus_alloc_resource type=3 rid=0x18") < first(&log, "pci_alloc_msix want=1 got=1"));
    assert!(log.iter().any(|l| l == "device_printf interrupt: MSI-X\n"), "{log:#?}");
    assert_eq!(detach(), 0);
    assert_eq!(fk::active_memory_rids(), Vec::<i32>::new());
}

/// MSI-X present but refused by pci(4) (ENXIO, e.g. blacklisted): its table and PBA BARs
/// (BAR4, BAR5 here) are given back at once, then, without MSI, the shared INTx line (rid 0,
/// RF_SHAREABLE) with nothing held for MSI-X. Before the change MSI was never tried. The MSI
/// half (MSI-X refused, MSI offered: MSI, rid 1) runs on the shipped .ko
/// (kldhost/tests/msi.rs `msix_refused_falls_back_to_msi_not_to_intx`), and so does a table
/// BAR4 given back before the INTx fallback (kldhost/tests/msix_table_bar.rs
/// `msix_refused_gives_back_its_table_bar_before_falling_back_to_a_shared_intx`); what stays
/// here is the PBA's own BAR5 given back too, which QEMU's controller cannot have.
#[test]
fn msix_refused_gives_back_its_table_bars_and_falls_back_to_a_shared_intx() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(knobs(Knobs {
        msix_count: 1,
        msix_table_rid: 0x20,
        msix_pba_rid: 0x24,
        msix_alloc_error: bindings::ENXIO,
        msi_count: 0,
        ..Knobs::default()
    }));
    fk::install_nvme(FakeNvme::new(false, false));

    assert_eq!(attach(), 0, "{:#?}", fk::log());
    let log = fk::log();
    let refused = first(&log, "pci_alloc_msix want=1 = error");
    let bars_gone = log.iter().rposition(|l| l.ends_with("memory rid=0x24") || l.ends_with("memory rid=0x20")).expect("MSI-X BARs released");
    assert!(refused < bars_gone, "{log:#?}");
    let irq = first(&log, "bus_alloc_resource type=1");
    assert!(bars_gone < irq, "MSI-X BARs given back before the fallback: {log:#?}");
    let shareable = bindings::RF_ACTIVE | bindings::RF_SHAREABLE;
    assert_eq!(log[irq], format!("bus_alloc_resource type=1 rid=0x0 flags={shareable:#x}"));
    assert!(log.iter().any(|l| l == "device_printf interrupt: INTx\n"), "{log:#?}");
    assert!(log.iter().any(|l| l == "sysctl_add_string interrupt=INTx"), "{log:#?}");
    assert_eq!(fk::active_memory_rids(), std::vec![0x10], "only BAR0 held");
    assert_eq!(detach(), 0);
    assert_eq!(fk::active_memory_rids(), Vec::<i32>::new());
}
