//! `kldhost run --qemu` with pci(4)'s message interrupts switched off
//! (`hw.pci.enable_msix=0`, `hw.pci.enable_msi=0`): the driver falls back to the legacy INTx
//! line, and the emulation delivers that level-triggered line to its ithread handler
//! (src/emu/intx.rs). Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and,
//! for the real module, the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, kldhost_run_with, completed_by, per_bio, assert_both_bios_completed_by_the_watchdog};
use kldhost::emu::pci_tunables::INTX_ONLY_TUNABLES;

/// `--tunable name=value` for each of [`INTX_ONLY_TUNABLES`].
fn intx_only_args() -> Vec<String> {
    INTX_ONLY_TUNABLES.iter().flat_map(|(n, v)| ["--tunable".to_string(), format!("{n}={v}")]).collect()
}

fn run_real(extra: &[&str]) -> Option<(Option<i32>, String)> {
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let mut args: Vec<String> = vec!["--qemu".into()];
    args.extend(intx_only_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Some(kldhost_run_with(&ko, &args))
}

const INTX_DELIVERED: &str = "nvmehp0: interrupt (IRQ rid 0, INTx on GSI 11)";

#[test]
fn with_msi_and_msix_off_the_real_module_uses_intx_and_its_handler_completes_every_bio() {
    if !nvmehp_lab::skip::qemu_or_skip("intx_real") || common::real_ko("intx_real").is_none() {
        return;
    }
    let Some((code, out)) = run_real(&[]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci: hw.pci.enable_msix=0 hw.pci.enable_msi=0 (loader tunables)",
            // pci.c's answers with the tunables at 0: no MSI-X, no MSI, so the driver goes on
            // to the legacy line (nvme(4)'s order) without asking for messages.
            "pci_msix_count(nvmehp0) = 0 (hw.pci.enable_msix=0)",
            "pci_msi_count(nvmehp0) = 0 (hw.pci.enable_msi=0)",
            // rid 0, RF_ACTIVE | RF_SHAREABLE; slot 4's INTA# through PIRQD is GSI 11.
            "pci_assign_interrupt(nvmehp0): INTx pin routed to GSI 11",
            "bus_alloc_resource(nvmehp0, type 1, rid 0x0, 0x0, 0xffffffffffffffff, 1, flags 0x6) = ",
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx on GSI 11, level-triggered)",
            "device_printf(\"nvmehp0: interrupt: INTx\\n\")",
            "nvmehp0: device_attach_desc = 0",
            "g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes)",
            INTX_DELIVERED,
            "biodone(",
            "g_down: d_strategy(nvmehpd0, BIO_READ, offset 8192, 4096 bytes)",
            INTX_DELIVERED,
            "biodone(",
            "at 8192: the written data; read back: the written data",
            // Detach: the handler goes, then its IRQ; nothing left for pci(4) to reclaim.
            "nvmehp0: device_detach_desc ->",
            "bus_teardown_intr(nvmehp0, irq rid 0) = 0",
            "bus_release_resource(nvmehp0, type 1, rid 0x0) = 0",
            "nvmehp0: device_detach_desc = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "console:",
            "nvmehp0: interrupt: INTx",
            "io data in the backing file and read back: ok",
            "detach device 4.0 (nvmehp0): 0",
            "unloaded: true",
            "findings: 0",
        ],
    );
    assert!(!out.contains("pci_alloc_msix(nvmehp0"), "no MSI-X allocation was tried:\n{out}");
    // Every bio was completed by the INTx handler (not by the watchdog's poll).
    let bios = per_bio(&out);
    assert_eq!(bios.len(), 2, "{out}");
    for b in &bios {
        assert!(b.contains(INTX_DELIVERED), "a bio completed without an INTx interrupt:\n{b}");
        assert_eq!(completed_by(b), "interrupt", "a bio not completed by the interrupt handler:\n{b}");
    }
    // The line was lowered by each handler run (no re-delivery storm), and nothing is
    // delivered once bus_teardown_intr returned.
    let teardown = out.find("bus_teardown_intr(nvmehp0, irq rid 0) = 0").expect("teardown logged");
    assert!(!out[teardown..].contains(INTX_DELIVERED), "an interrupt after bus_teardown_intr:\n{out}");
    assert!(!out.contains("interrupt storm"), "{out}");
}

/// The negative control: the same run with the line never delivered completes its I/O only
/// through the module's watchdog poll, with no interrupt at all; so the test above can fail.
#[test]
fn with_the_intx_line_undelivered_only_the_watchdog_poll_completes_the_bios() {
    if !nvmehp_lab::skip::qemu_or_skip("intx_undelivered") || common::real_ko("intx_undelivered").is_none() {
        return;
    }
    let Some((code, out)) = run_real(&["--intx-undelivered"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx on GSI 11: never delivered (--intx-undelivered))",
            "io data in the backing file and read back: ok",
            "unloaded: true",
            "findings: 0",
        ],
    );
    assert!(!out.contains("interrupt (IRQ rid 0"), "an INTx interrupt was delivered:\n{out}");
    assert_both_bios_completed_by_the_watchdog(&out);
}

/// A controller hot-added into slot 5 (INTA# through PIRQA: GSI 10, not the first one's 11)
/// gets its own route at its rid 0 allocation, and its bios complete through INTx too.
#[test]
fn a_hot_added_controller_on_intx_gets_its_slots_gsi_and_completes_through_its_handler() {
    if !nvmehp_lab::skip::qemu_or_skip("intx_hot_add") || common::real_ko("intx_hot_add").is_none() {
        return;
    }
    let Some((code, out)) = run_real(&["--tunable", "hw.nvme_hotplug.claim=1", "--acpi", "--eject", "--hot-add"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci_assign_interrupt(nvmehp0): INTx pin routed to GSI 11",
            "bus_teardown_intr(nvmehp0, irq rid 0) = 0",
            "QMP device_add nvme1 at slot 5: ok",
            "pci_assign_interrupt(nvmehp0): INTx pin routed to GSI 10",
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx on GSI 10, level-triggered)",
            "hot-added and attached: true; its write and read: ok",
            "findings: 0",
        ],
    );
    // The hot-added disk reuses unit 0 (the first disk's d_gone ran after its eject, as
    // nvd(4) reuses units): its bios are those after the hot-add.
    let hot_add = out.find("QMP device_add nvme1 at slot 5: ok").expect("the hot-add");
    let bios = per_bio(&out[hot_add..]);
    assert_eq!(bios.len(), 2, "{out}");
    for b in &bios {
        assert!(b.contains("nvmehp0: interrupt (IRQ rid 0, INTx on GSI 10)"), "a bio completed without an INTx interrupt:\n{b}");
        assert_eq!(completed_by(b), "interrupt", "a bio not completed by the interrupt handler:\n{b}");
    }
}

fn fixture(test: &str, ack_after: u32) -> Option<std::path::PathBuf> {
    let define = format!("-DKLDHOST_ACK_AFTER={ack_after}");
    common::fixture_object(test, "pci_intx", Some(&define))
}

/// bus_teardown_intr stops delivery before it returns: a fixture that tears its handler down
/// and then makes its controller hold the line high (a second Identify nobody acknowledges)
/// sees no further run of the handler while it sleeps, no storm, no finding. Its first
/// command shows the same handler ran while it was set up.
#[test]
fn a_handler_torn_down_is_not_run_again_though_its_line_stays_high() {
    if !nvmehp_lab::skip::qemu_or_skip("intx_teardown") {
        return;
    }
    let mut flags = common::kernel_header_flags();
    flags.extend(["-DKLDHOST_ACK_AFTER=1".to_string(), "-DKLDHOST_RAISE_AFTER_TEARDOWN".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let Some(obj) = common::compile("intx_teardown", "pci_intx", &flags) else { return };
    let ko = common::temp_object("intx_teardown", &obj);
    let (code, out) = kldhost_run_with(&ko, &["--qemu"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "kldhostfx0: interrupt (IRQ rid 0, INTx on GSI 11)",
            "kldhostfx0: interrupts 1, completion status 0x1",
            "bus_teardown_intr(kldhostfx0, irq rid 0) = 0",
            "bus_write_4(kldhostfx0 BAR 0x10 + 0x1000, 0x0)",
            "pause_sbt(fxdet",
            "kldhostfx0: after teardown: interrupts 1, second completion status 0x1",
            "findings: 0",
        ],
    );
    let teardown = out.find("bus_teardown_intr(kldhostfx0, irq rid 0) = 0").expect("teardown logged");
    assert!(!out[teardown..].contains("kldhostfx0: interrupt ("), "the handler ran after bus_teardown_intr:\n{out}");
}

/// Level-triggered: a handler that leaves its line asserted runs again at once (kern_intr.c
/// unmasks the source after the ithread, and the I/O APIC delivers again). A fixture whose
/// handler lowers the line (CQ head doorbell) on its 3rd run runs exactly 3 times; on its 1st,
/// once; one that never lowers it is an interrupt storm, reported and throttled.
#[test]
fn an_intx_line_left_high_is_delivered_again_until_lowered_and_a_stuck_one_is_a_storm() {
    if !nvmehp_lab::skip::qemu_or_skip("intx_level") {
        return;
    }
    for (ack_after, runs) in [(1, 1), (3, 3)] {
        let Some(ko) = fixture(&format!("intx_ack{ack_after}"), ack_after) else { return };
        let (code, out) = kldhost_run_with(&ko, &["--qemu"]);
        assert_eq!(code, Some(0), "{out}");
        assert_in_order(
            &out,
            &[
                "pci_assign_interrupt(kldhostfx0): INTx pin routed to GSI 11",
                "bus_setup_intr(kldhostfx0, irq rid 0, flags 0x202) = 0 (INTx on GSI 11, level-triggered)",
                "bus_write_4(kldhostfx0 BAR 0x10 + 0x1000, 0x1)",
                "kldhostfx0: interrupt (IRQ rid 0, INTx on GSI 11)",
                "bus_write_4(kldhostfx0 BAR 0x10 + 0x1004, 0x1)",
                &format!("kldhostfx0: interrupts {runs}, completion status 0x1"),
                "bus_teardown_intr(kldhostfx0, irq rid 0) = 0",
                "findings: 0",
            ],
        );
        assert_eq!(out.matches("  kldhostfx0: interrupt (IRQ rid 0").count(), runs as usize, "{out}");
    }
    let Some(ko) = fixture("intx_stuck", 0) else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu"]);
    assert_eq!(code, Some(1), "a storm is a finding:\n{out}");
    assert_in_order(
        &out,
        &[
            "interrupt storm detected on \"irq11:\"; throttling interrupt source",
            "kldhostfx0: interrupts ",
            "findings: 1",
            "interrupt storm on GSI 11: the line stayed high through 1000 passes of its handlers",
        ],
    );
    // The attach saw at least the 1000 back-to-back runs (then throttled ones, one per round).
    let at = out.find("kldhostfx0: interrupts ").expect("the attach's count") + "kldhostfx0: interrupts ".len();
    let n: u32 = out[at..].split(',').next().and_then(|v| v.parse().ok()).expect("a count");
    assert!(n >= 1000, "{n} runs:\n{out}");
}
