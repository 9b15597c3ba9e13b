//! `kldhost run --qemu --msix-exclusive-bar`: QEMU's NVMe controller with its MSI-X table and
//! PBA in a BAR of their own, BAR4 (rid 0x20), as on bhyve, instead of BAR0. pci(4) answers
//! `pci_msix_table_bar`/`pci_msix_pba_bar` from the capability's BIRs and refuses
//! `pci_alloc_msix` (ENXIO) unless the driver holds that BAR allocated and active
//! (sys/dev/pci/pci.c pci_alloc_msix_method); it then writes the table through it, and a
//! driver releasing it while MSI-X is allocated is a finding (src/emu/pci.rs). The shipped
//! module must allocate BAR4 before pci_alloc_msix, hold it until its vector is given back,
//! and release it then, before BAR0, on every path: detach, a failed bring-up, an attach
//! failing after the bring-up; and keep it with the vector for a handler it could not tear
//! down. Needs QEMU (SKIP without it, a failure with
//! NVMEHP_REQUIRE_QEMU=1) and the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_clean_unload, assert_in_order, completed_by, console, kldhost_run_with, per_bio, real_ko_on_qemu};

/// BAR4 allocated RF_ACTIVE (flags 0x2), by the driver's attach.
const BAR4_ALLOCATED: &str = "bus_alloc_resource(nvmehp0, type 3, rid 0x20, 0x0, 0xffffffffffffffff, 1, flags 0x2) = ";
const BAR4_RELEASED: &str = "bus_release_resource(nvmehp0, type 3, rid 0x20) = 0";
const BAR0_RELEASED: &str = "bus_release_resource(nvmehp0, type 3, rid 0x10) = 0";
const MSIX_GRANTED: &str = "pci_alloc_msix(nvmehp0, 1) = 0, 1 vectors";
/// The vector's IRQ resource: rid 1, RF_ACTIVE only (a message is not shareable).
const VECTOR_IRQ_ALLOCATED: &str = "bus_alloc_resource(nvmehp0, type 1, rid 0x1, 0x0, 0xffffffffffffffff, 1, flags 0x2) = ";
const VECTOR_IRQ_RELEASED: &str = "bus_release_resource(nvmehp0, type 1, rid 0x1) = 0";
const VECTOR_RELEASED: &str = "pci_release_msi(nvmehp0) = 0";
/// CC.EN = 1: the bring-up enabling the controller.
const CC_ENABLE: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460001)";

fn run(test: &str, extra: &[&str]) -> Option<(Option<i32>, String)> {
    let ko = real_ko_on_qemu(test)?;
    let mut args = vec!["--qemu", "--msix-exclusive-bar"];
    args.extend_from_slice(extra);
    Some(kldhost_run_with(&ko, &args))
}

/// How many times `out` has `what`.
fn count(out: &str, what: &str) -> usize {
    out.matches(what).count()
}

/// BAR4 asked for from the capability, allocated and active before pci_alloc_msix, the vector's
/// IRQ rid 1 (not shareable), every bio completed by the MSI-X handler (so the table in BAR4
/// was programmed), and at detach the handler torn down, its IRQ released and the vector given
/// back before BAR4 goes, BAR4 before BAR0; nothing left. Fails if the driver stops allocating
/// BAR4 (pci_alloc_msix is refused, INTx is used), or releases it before the vector (the
/// release order, and pci(4)'s finding that the table BAR went under allocated vectors).
#[test]
fn msix_in_bar4_has_its_table_bar_allocated_first_and_released_last() {
    let Some((code, out)) = run("msix_bar4", &[]) else { return };
    assert_in_order(
        &out,
        &[
            "nvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0400000-0xc0401fff,0xc0402000-0xc0402fff at device 4.0 on pci0",
            "pci_msix_table_bar(nvmehp0) = 0x20",
            "pci_msix_pba_bar(nvmehp0) = 0x20",
            BAR4_ALLOCATED,
            MSIX_GRANTED,
            VECTOR_IRQ_ALLOCATED,
            CC_ENABLE,
            "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 0 (MSI-X to a guest-RAM mailbox)",
            "device_printf(\"nvmehp0: interrupt: MSI-X\\n\")",
            "nvmehp0: device_attach_desc = 0",
            "nvmehp0: device_detach_desc ->",
            "bus_teardown_intr(nvmehp0, irq rid 1) = 0",
            VECTOR_IRQ_RELEASED,
            VECTOR_RELEASED,
            BAR4_RELEASED,
            BAR0_RELEASED,
            "nvmehp0: device_detach_desc = 0",
        ],
    );
    assert!(!out.contains("pci_alloc_msi(nvmehp0"), "MSI was tried though MSI-X worked:\n{out}");
    let bios = per_bio(&out);
    assert_eq!(bios.len(), 2, "{out}");
    for b in &bios {
        assert!(b.contains("nvmehp0: interrupt (IRQ rid 1, MSI-X table entry 0)"), "a bio without an MSI-X message:\n{b}");
        assert_eq!(completed_by(b), "interrupt", "a bio not completed by the MSI-X handler:\n{b}");
    }
    assert!(console(&out).contains("nvmehp0: interrupt: MSI-X"), "{out}");
    assert!(out.contains("at 8192: the written data; read back: the written data"), "{out}");
    assert_clean_unload(code, &out);
}

/// A BAR the driver holds already is not allocated a second time: with the table and the PBA
/// both in BAR0 (QEMU's default) BAR0 is allocated once, for the registers, and no other BAR;
/// with both in BAR4 BAR4 is allocated once. Either way MSI-X is granted. Fails if the driver
/// allocates the table's BAR without looking at BAR0 or the PBA's without looking at the
/// table's: the second bus_alloc_resource of a held BAR returns NULL, and the driver gives up
/// MSI-X for INTx.
#[test]
fn msix_allocates_only_the_bars_not_already_held() {
    let Some(ko) = real_ko_on_qemu("msix_bars_held") else { return };
    for (placement, extra, table, bar4_allocations) in [("BAR0", &[][..], "0x10", 0), ("BAR4", &["--msix-exclusive-bar"][..], "0x20", 1)] {
        let mut args = vec!["--qemu"];
        args.extend_from_slice(extra);
        let (code, out) = kldhost_run_with(&ko, &args);
        assert_in_order(&out, &[&format!("pci_msix_table_bar(nvmehp0) = {table}"), &format!("pci_msix_pba_bar(nvmehp0) = {table}"), MSIX_GRANTED]);
        assert_eq!(count(&out, "bus_alloc_resource(nvmehp0, type 3, rid 0x10,"), 1, "table in {placement}: BAR0 allocated once:\n{out}");
        assert_eq!(count(&out, "bus_alloc_resource(nvmehp0, type 3, rid 0x20,"), bar4_allocations, "table in {placement}: BAR4 allocations:\n{out}");
        assert_eq!(count(&out, "bus_alloc_resource(nvmehp0, type 3, "), 1 + bar4_allocations, "table in {placement}: no other BAR:\n{out}");
        assert!(!out.contains("= NULL (already allocated)"), "table in {placement}: a held BAR asked for again:\n{out}");
        assert!(console(&out).contains("nvmehp0: interrupt: MSI-X"), "table in {placement}:\n{out}");
        assert_clean_unload(code, &out);
    }
}

/// A bring-up that fails (CSTS.RDY never rises: `--device-fault rdy-never`, CAP.TO 500 ms)
/// gives back the MSI-X interrupt it allocated before it: after the disable, the IRQ resource,
/// then the vector, then BAR4, and only then BAR0 with the engine; no handler was ever set up;
/// attach ENXIO, nothing left. Fails if the failed attach keeps BAR4 (pci(4)'s "Device leaked
/// memory resources", a finding), releases it before the vector, or after BAR0.
#[test]
fn a_failed_bring_up_releases_the_interrupt_and_its_table_bar() {
    let Some((code, out)) = run("msix_bar4_bring_up_failed", &["--device-fault", "cap-to=1", "--device-fault", "rdy-never"]) else { return };
    assert_in_order(
        &out,
        &[
            BAR4_ALLOCATED,
            MSIX_GRANTED,
            VECTOR_IRQ_ALLOCATED,
            CC_ENABLE,
            "kldhost: injected device fault rdy-never: CSTS.RDY hidden while CC.EN is set",
            "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460000)",
            "device_printf(\"nvmehp0: bring-up failed: timed out",
            VECTOR_IRQ_RELEASED,
            VECTOR_RELEASED,
            BAR4_RELEASED,
            BAR0_RELEASED,
            "nvmehp0: device_attach_desc = 6",
        ],
    );
    assert!(!out.contains("bus_setup_intr("), "a handler set up for a controller that never came up:\n{out}");
    assert!(!out.contains("Device leaked"), "{out}");
    assert!(out.contains("attach device 4.0 (nvmehp0): 6"), "{out}");
    assert_clean_unload(code, &out);
}

/// An attach failing after a successful bring-up, before a handler runs, gives the allocated
/// interrupt back, the IRQ resource, the vector, then BAR4, before the engine lets BAR0 go:
/// when busdma for the I/O path cannot be set up (`--fail bus_dma_tag_create`: ENOMEM), when
/// the controller's task queue cannot be created (`--fail taskqueue_create:2`, call 1 being
/// MOD_LOAD's hotplug queue: ENOMEM), and when bus_setup_intr fails (`--fail bus_setup_intr`:
/// ENXIO, nothing to tear down). Fails if any of these paths keeps BAR4, or releases it before
/// the vector or after BAR0.
#[test]
fn an_attach_failing_after_bring_up_releases_the_unused_interrupt_and_its_table_bar_before_bar0() {
    let Some(ko) = real_ko_on_qemu("msix_bar4_attach_failed") else { return };
    for (fail, injected, errno) in [
        ("bus_dma_tag_create", "kldhost: injected ENOMEM into bus_dma_tag_create (call 1)", 12),
        ("taskqueue_create:2", "kldhost: injected NULL into taskqueue_create (call 2)", 12),
        ("bus_setup_intr", "kldhost: injected EINVAL into bus_setup_intr (call 1)", 6),
    ] {
        let (code, out) = kldhost_run_with(&ko, &["--qemu", "--msix-exclusive-bar", "--fail", fail]);
        assert_in_order(
            &out,
            &[
                BAR4_ALLOCATED,
                MSIX_GRANTED,
                VECTOR_IRQ_ALLOCATED,
                CC_ENABLE,
                // The bring-up done: the controller identified, its I/O queues created.
                "device_printf(\"nvmehp0: NVMe ",
                injected,
                VECTOR_IRQ_RELEASED,
                VECTOR_RELEASED,
                BAR4_RELEASED,
                BAR0_RELEASED,
                &format!("nvmehp0: device_attach_desc = {errno}"),
            ],
        );
        if fail == "bus_setup_intr" {
            assert!(!out.contains("bus_teardown_intr("), "--fail {fail}: nothing was installed to tear down:\n{out}");
        } else {
            assert!(!out.contains("bus_setup_intr("), "--fail {fail}: no handler:\n{out}");
        }
        assert!(!out.contains("Device leaked"), "--fail {fail}:\n{out}");
        assert_clean_unload(code, &out);
    }
}

/// A handler whose bus_teardown_intr failed (`--fail bus_teardown_intr`) stays installed and
/// may still run, so pci(4) still needs the table its vector is programmed in: the driver keeps
/// the vector, its IRQ and BAR4 (and BAR0 with the controller's memory) through DEVICE_DETACH,
/// pci(4)'s pci_child_detached cannot release the vector (EBUSY) and takes both BARs back,
/// counted as kept for the handler, not leaked; a late MSI-X message still runs the handler;
/// every unload is refused. Fails if the driver lets BAR4 go with the handler still installed
/// (its release during the detach, and pci(4)'s finding that the table BAR went under an
/// allocated vector).
#[test]
fn an_interrupt_that_cannot_be_torn_down_keeps_its_vector_and_table_bar() {
    let Some((code, out)) = run("msix_bar4_stuck", &["--fail", "bus_teardown_intr", "--late-msix", "--kldunload-retries", "1"]) else { return };
    assert_eq!(code, Some(1), "the module must stay loaded:\n{out}");
    assert_in_order(&out, &[BAR4_ALLOCATED, MSIX_GRANTED, "bus_teardown_intr(nvmehp0, irq rid 1) = 22 (handler still installed and called, MSI-X vector still unmasked)"]);
    let detach = common::between(&out, "kldhost: injected EINVAL into bus_teardown_intr", "nvmehp0: device_detach_desc = 0");
    for never in [VECTOR_RELEASED, VECTOR_IRQ_RELEASED, BAR4_RELEASED, BAR0_RELEASED] {
        assert!(!detach.contains(never), "{never} with the handler still installed:\n{detach}");
    }
    assert_in_order(
        &out,
        &[
            "nvmehp0: device_detach_desc = 0",
            "nvmehp0: the handler on irq rid 1 stays installed after its bus_teardown_intr failed (22)",
            "pci_release_msi(nvmehp0) = EBUSY",
            "nvmehp0: 2 memory resources kept by the driver for the handler its failed bus_teardown_intr left installed: not a leak of the driver's",
            "nvmehp0: its BARs are unmapped now (pci(4) took them back)",
            "nvmehp0: MSI-X message on table entry 0",
            "nvmehp0: interrupt (IRQ rid 1, MSI-X table entry 0)",
            "late MSI-X messages: 1 interrupt handlers ran",
            "still loaded: ",
            "findings: 0",
        ],
    );
    // pci(4) takes both BARs back (in no particular order), the driver neither.
    let taken_back = common::between(&out, "nvmehp0: 2 memory resources kept by the driver", "nvmehp0: its BARs are unmapped now");
    for bar in [BAR0_RELEASED, BAR4_RELEASED] {
        assert!(taken_back.contains(bar), "{bar} by pci_child_detached:\n{out}");
    }
}

/// MSI-X refused by pci(4) (`--fail pci_alloc_msix`: ENXIO, as for a blacklisted system) after
/// BAR4 was allocated for it: BAR4 is given back at once, before the fallback, and, with no MSI
/// capability on QEMU's function, the module takes the shared INTx line (rid 0, RF_ACTIVE |
/// RF_SHAREABLE) with only BAR0 held; its bios complete through INTx and nothing is left. The
/// BAR4 half of bringup_tests.rs `msix_refused_gives_back_its_table_bars_and_falls_back_to_a_shared_intx`
/// (whose PBA has a BAR5 of its own, which QEMU's controller cannot have). Fails if the module
/// keeps BAR4 after the refusal (pci(4)'s "Device leaked memory resources" at the detach, a
/// finding) or releases it only after taking INTx.
#[test]
fn msix_refused_gives_back_its_table_bar_before_falling_back_to_a_shared_intx() {
    let Some((code, out)) = run("msix_bar4_refused", &["--fail", "pci_alloc_msix"]) else { return };
    assert_in_order(
        &out,
        &[
            BAR4_ALLOCATED,
            "kldhost: injected ENXIO into pci_alloc_msix (call 1)",
            BAR4_RELEASED,
            "bus_alloc_resource(nvmehp0, type 1, rid 0x0, 0x0, 0xffffffffffffffff, 1, flags 0x6) = ",
            CC_ENABLE,
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx on GSI 11, level-triggered)",
            "device_printf(\"nvmehp0: interrupt: INTx\\n\")",
            "nvmehp0: interrupt (IRQ rid 0, INTx on GSI 11)",
            "bus_release_resource(nvmehp0, type 1, rid 0x0) = 0",
            BAR0_RELEASED,
        ],
    );
    assert_eq!(count(&out, BAR4_RELEASED), 1, "{out}");
    assert!(!out.contains("pci_release_msi(nvmehp0) = 0"), "a vector given back though none was granted:\n{out}");
    assert!(!out.contains("Device leaked"), "{out}");
    assert_clean_unload(code, &out);
}

/// `--msix-exclusive-bar` with a removal is a usage error, not a run: QEMU 10 aborts unplugging
/// a controller whose MSI-X table has a BAR of its own (hw/nvme/ctrl.c `nvme_exit`), which would
/// look like the module's failure. Fails if the flag is accepted with `--eject`, `--surprise`
/// or `--eject-slot`.
#[test]
fn msix_exclusive_bar_refuses_a_removal() {
    for removal in [&["--acpi", "--eject"][..], &["--acpi", "--surprise"][..], &["--acpi", "--eject-slot", "4"][..]] {
        let mut args = vec!["--qemu", "--msix-exclusive-bar"];
        args.extend_from_slice(removal);
        let (code, out) = kldhost_run_with(std::path::Path::new("nvme_hotplug.ko"), &args);
        assert_eq!(code, Some(2), "{removal:?}:\n{out}");
        assert!(out.contains("the argument '--msix-exclusive-bar' cannot be used with"), "{removal:?}:\n{out}");
    }
}
