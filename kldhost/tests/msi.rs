//! `kldhost run --qemu --msi-instead-of-msix` / `--msi-with-msix`: pci(4) offers an emulated
//! MSI capability with one message over QEMU's NVMe function (src/emu/msi.rs), whose INTx
//! assertions stand in for the messages. The shipped module must choose MSI as nvme(4) does
//! (MSI-X, else MSI, else INTx), allocate it before its bring-up enables the controller, take
//! its completions on the message, and give it back in pci(4)'s order. Needs QEMU (SKIP
//! without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, kldhost_run_with, completed_by, per_bio, assert_both_bios_completed_by_the_watchdog};

fn run_real(test: &str, args: &[&str]) -> Option<(Option<i32>, String)> {
    if !nvmehp_lab::skip::qemu_or_skip(test) || common::real_ko(test).is_none() {
        return None;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let mut all = vec!["--qemu"];
    all.extend_from_slice(args);
    Some(kldhost_run_with(&ko, &all))
}

/// A message (one handler run) on the emulated MSI.
const MSI_DELIVERED: &str = "nvmehp0: interrupt (IRQ rid 1, MSI message 0, stood in for by INTx on GSI 11";

/// Every bio of the run completed by a fresh MSI message (not a re-delivery of one whose line
/// stayed high: a real MSI function would not have sent that one), and no message after the
/// handler was torn down.
fn assert_bios_completed_by_messages(out: &str) {
    let bios = per_bio(out);
    assert_eq!(bios.len(), 2, "{out}");
    for b in &bios {
        assert!(b.contains(&format!("{MSI_DELIVERED})")), "a bio completed without a fresh MSI message:\n{b}");
        assert!(!b.contains("re-delivered"), "a bio needed a re-delivered message:\n{b}");
        assert_eq!(completed_by(b), "interrupt", "a bio not completed by the MSI handler:\n{b}");
    }
    let teardown = out.find("bus_teardown_intr(nvmehp0, irq rid 1) = 0").expect("teardown logged");
    assert!(!out[teardown..].contains(MSI_DELIVERED), "a message after bus_teardown_intr:\n{out}");
    // The stand-in never touched the rid 0 line or INTx Disable, and nothing used MSI-X.
    assert!(!out.contains("irq rid 0"), "an INTx handler:\n{out}");
    assert!(!out.contains("MSI-X table entry"), "an MSI-X message:\n{out}");
}

/// The detach of an MSI function in pci(4)'s order: the handler (MSI disabled with it), the
/// IRQ resource, then the message; the unload clean.
const DETACH_AND_UNLOAD: [&str; 9] = [
    "nvmehp0: device_detach_desc ->",
    "bus_teardown_intr(nvmehp0, irq rid 1) = 0",
    "bus_release_resource(nvmehp0, type 1, rid 0x1) = 0",
    "pci_release_msi(nvmehp0) = 0 (MSI message given back)",
    "nvmehp0: device_detach_desc = 0",
    "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
    "io data in the backing file and read back: ok",
    "unloaded: true",
    "findings: 0",
];

#[test]
fn with_msi_instead_of_msix_the_real_module_allocates_msi_before_the_bring_up_and_its_handler_completes_every_bio() {
    let Some((code, out)) = run_real("msi_real", &["--msi-instead-of-msix"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci: 0:4.0: an emulated MSI capability, 1 message; QEMU's MSI-X capability not offered (--msi-instead-of-msix)",
            // nvme(4)'s order: no MSI-X vector offered, so MSI, one message.
            "pci_msix_count(nvmehp0) = 0",
            "pci_msi_count(nvmehp0) = 1",
            "pci_alloc_msi(nvmehp0, 1) = 0, 1 message",
            // rid 1, RF_ACTIVE only: a message is not shareable.
            "bus_alloc_resource(nvmehp0, type 1, rid 0x1, 0x0, 0xffffffffffffffff, 1, flags 0x2) = ",
            // Allocated before the bring-up enables the controller (CC.EN = 1) and creates its
            // completion queues, as nvme_pci_attach does; the handler set up after it.
            "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460001)",
            "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 0 (MSI message 0, MSI enabled; stood in for by INTx on GSI 11",
            "device_printf(\"nvmehp0: interrupt: MSI\\n\")",
            "nvmehp0: device_attach_desc = 0",
            "g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes)",
            MSI_DELIVERED,
            "biodone(",
            "g_down: d_strategy(nvmehpd0, BIO_READ, offset 8192, 4096 bytes)",
            MSI_DELIVERED,
            "biodone(",
            "at 8192: the written data; read back: the written data",
        ],
    );
    assert_in_order(&out, &DETACH_AND_UNLOAD);
    assert_in_order(&out, &["console:", "nvmehp0: interrupt: MSI"]);
    assert!(!out.contains("pci_alloc_msix(nvmehp0"), "MSI-X was asked for though none is offered:\n{out}");
    assert!(!out.contains("bus_alloc_resource(nvmehp0, type 1, rid 0x0"), "the INTx line was allocated:\n{out}");
    assert_bios_completed_by_messages(&out);
}

/// The negative control: the same run with the messages never delivered completes its I/O
/// only through the module's 1 s watchdog poll, and no handler runs; so the test above can
/// fail.
#[test]
fn with_the_msi_messages_undelivered_only_the_watchdog_poll_completes_the_bios() {
    let Some((code, out)) = run_real("msi_undelivered", &["--msi-instead-of-msix", "--msi-undelivered"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci_alloc_msi(nvmehp0, 1) = 0, 1 message",
            "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 0 (MSI message 0, MSI enabled; never delivered (--msi-undelivered))",
            "device_printf(\"nvmehp0: interrupt: MSI\\n\")",
        ],
    );
    assert_in_order(&out, &DETACH_AND_UNLOAD);
    assert!(!out.contains(": interrupt (IRQ rid"), "a handler ran:\n{out}");
    assert_both_bios_completed_by_the_watchdog(&out);
}

/// A function with both capabilities (QEMU's MSI-X and the emulated MSI) whose MSI-X
/// allocation fails: the module falls back to MSI, not to the shared INTx line, and runs on it.
#[test]
fn msix_refused_falls_back_to_msi_not_to_intx() {
    let Some((code, out)) = run_real("msi_fallback", &["--msi-with-msix", "--fail", "pci_alloc_msix"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci: 0:4.0: an emulated MSI capability, 1 message, besides QEMU's MSI-X (--msi-with-msix)",
            "pci_msix_count(nvmehp0) = 65",
            "kldhost: injected ENXIO into pci_alloc_msix (call 1)",
            "pci_msi_count(nvmehp0) = 1",
            "pci_alloc_msi(nvmehp0, 1) = 0, 1 message",
            "bus_alloc_resource(nvmehp0, type 1, rid 0x1, 0x0, 0xffffffffffffffff, 1, flags 0x2) = ",
            "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460001)",
            "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 0 (MSI message 0, MSI enabled;",
            "device_printf(\"nvmehp0: interrupt: MSI\\n\")",
            "at 8192: the written data; read back: the written data",
        ],
    );
    assert_in_order(&out, &DETACH_AND_UNLOAD);
    assert!(!out.contains("bus_alloc_resource(nvmehp0, type 1, rid 0x0"), "the INTx line was allocated:\n{out}");
    assert_bios_completed_by_messages(&out);
}

/// pci_release_msi refuses (EBUSY) while a handler is still set up on the message: a handler
/// whose `bus_teardown_intr` failed stays installed, so pci(4)'s clean-up after the detach
/// (pci_child_detached) cannot take the message back, and the module keeps itself loaded.
#[test]
fn a_handler_that_cannot_be_torn_down_keeps_its_msi_message() {
    let Some((code, out)) = run_real("msi_stuck", &["--msi-instead-of-msix", "--fail", "bus_teardown_intr", "--kldunload-retries", "1"]) else { return };
    assert_eq!(code, Some(1), "the module must stay loaded:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci_alloc_msi(nvmehp0, 1) = 0, 1 message",
            "bus_teardown_intr(nvmehp0, irq rid 1) = 22 (handler still installed and called, MSI still enabled)",
            "nvmehp0: the handler on irq rid 1 stays installed after its bus_teardown_intr failed (22)",
            "printf(\"pci0:0:4:0: Device leaked MSI vectors\\n\")",
            "pci_release_msi(nvmehp0) = EBUSY (MSI message: a handler is still set up on it)",
            "still loaded: ",
            "findings: 0",
        ],
    );
    assert!(!out.contains("pci_release_msi(nvmehp0) = 0"), "the message was given back under its handler:\n{out}");
}

/// A controller hot-added into slot 5 gets its own emulated MSI, stood in for by its own line
/// (INTA# through PIRQA: GSI 10, not the first one's 11), and its bios complete through it.
#[test]
fn a_hot_added_controller_gets_its_own_msi_and_completes_through_it() {
    let Some((code, out)) = run_real("msi_hot_add", &["--msi-instead-of-msix", "--tunable", "hw.nvme_hotplug.claim=1", "--acpi", "--eject", "--hot-add"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "pci_alloc_msi(nvmehp0, 1) = 0, 1 message (emulated MSI, stood in for by INTx on GSI 11;",
            "bus_teardown_intr(nvmehp0, irq rid 1) = 0",
            "pci_release_msi(nvmehp0) = 0 (MSI message given back)",
            "QMP device_add nvme1 at slot 5: ok",
            "pci_alloc_msi(nvmehp0, 1) = 0, 1 message (emulated MSI, stood in for by INTx on GSI 10;",
            "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 0 (MSI message 0, MSI enabled; stood in for by INTx on GSI 10",
            "hot-added and attached: true; its write and read: ok",
            "findings: 0",
        ],
    );
    let hot_add = out.find("QMP device_add nvme1 at slot 5: ok").expect("the hot-add");
    let bios = per_bio(&out[hot_add..]);
    assert_eq!(bios.len(), 2, "{out}");
    for b in &bios {
        assert!(b.contains("nvmehp0: interrupt (IRQ rid 1, MSI message 0, stood in for by INTx on GSI 10)"), "a bio completed without a fresh MSI message:\n{b}");
        assert_eq!(completed_by(b), "interrupt", "a bio not completed by the MSI handler:\n{b}");
    }
}

/// The rest of nvme(4)'s order: MSI-X and MSI both refused, the shared INTx line (rid 0,
/// RF_SHAREABLE), with no message held.
#[test]
fn msix_and_msi_refused_fall_back_to_a_shared_intx() {
    let Some((code, out)) = run_real("msi_both_refused", &["--msi-with-msix", "--fail", "pci_alloc_msix", "--fail", "pci_alloc_msi"]) else { return };
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "kldhost: injected ENXIO into pci_alloc_msix (call 1)",
            "pci_msi_count(nvmehp0) = 1",
            "kldhost: injected ENXIO into pci_alloc_msi (call 1)",
            "pci_alloc_msi(nvmehp0, 1) = 6 (no message allocated)",
            "pci_assign_interrupt(nvmehp0): INTx pin routed to GSI 11",
            // RF_ACTIVE | RF_SHAREABLE.
            "bus_alloc_resource(nvmehp0, type 1, rid 0x0, 0x0, 0xffffffffffffffff, 1, flags 0x6) = ",
            "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460001)",
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx on GSI 11, level-triggered)",
            "device_printf(\"nvmehp0: interrupt: INTx\\n\")",
            "at 8192: the written data; read back: the written data",
            "bus_teardown_intr(nvmehp0, irq rid 0) = 0",
            "bus_release_resource(nvmehp0, type 1, rid 0x0) = 0",
            "unloaded: true",
            "findings: 0",
        ],
    );
    assert!(!out.contains("pci_release_msi(nvmehp0) = 0"), "a message was given back though none was allocated:\n{out}");
    assert!(!out.contains("rid 0x1,"), "a message's IRQ resource:\n{out}");
}
