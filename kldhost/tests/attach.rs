//! `kldhost run --qemu`: the module's driver probes, attaches and detaches QEMU's NVMe
//! controller behind the emulated pci0. Needs QEMU (the lab's rule: SKIP without it, a failure
//! with NVMEHP_REQUIRE_QEMU=1) and, for the real module, the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, kldhost_run_with};


#[test]
fn the_real_module_brings_up_qemus_controller_and_tears_it_down_clean() {
    if !nvmehp_lab::skip::qemu_or_skip("attach_real") || common::real_ko("attach_real").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu"]);
    assert_eq!(code, Some(0), "kldhost run --qemu failed:\n{out}");
    assert_in_order(
        &out,
        &[
            // MOD_LOAD offers the function to the driver: claim=0 bids BUS_PROBE_NOWILDCARD,
            // which counts only on a fixed devclass.
            "devclass_add_driver(pci, nvmehp",
            "nvmehp: probe bid -2000000000 (BUS_PROBE_NOWILDCARD or lower) on a device whose devclass is not fixed: ENXIO",
            "devctl set driver -f: device 4.0 is now nvmehp0",
            "nvmehp0: device_probe_desc = -2000000000",
            "nvmehp0: device_attach_desc ->",
            "bus_alloc_resource(nvmehp0, type 3, rid 0x10",
            // Registers through the trapped loads and stores: CAP, VS.
            "bus_read_4(nvmehp0 BAR 0x10 + 0x0)",
            "bus_read_4(nvmehp0 BAR 0x10 + 0x8) = 0x10400",
            // The firmware left bus mastering off; the driver turns it on.
            "pci_enable_busmaster(nvmehp0) (command 0x2 -> 0x6)",
            // The interrupt is allocated before any completion queue exists (QEMU marks a
            // vector used only for queues created while MSI-X is on), then the admin queues in
            // guest RAM and the controller enabled; the handler comes once the engine is behind
            // its mutex.
            "pci_alloc_msix(nvmehp0, 1) = 0, 1 vectors",
            "contigmalloc(",
            "bus_write_4(nvmehp0 BAR 0x10 + 0x14",
            "bus_setup_intr(nvmehp0, irq rid 1",
            "make_dev_s(\"nvmehp0\"",
            "make_dev_s(\"nvmehp0ns1\"",
            "disk_create(nvmehpd0: 16777216 bytes, 512-byte sectors, d_gone set)",
            "nvmehp0: device_attach_desc = 0",
            // A consumer opens the disk, writes 4 KiB at 8 KiB through d_strategy and reads it
            // back; the driver completes each bio with biodone.
            "g_disk_access(nvmehpd0, open) -> d_open = 0",
            "g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes)",
            "bus_write_4(nvmehp0 BAR 0x10 + 0x1008, 0x1)",
            // QEMU signals the completion: MSI-X message, the module's interrupt handler runs.
            "nvmehp0: interrupt (IRQ rid 1, MSI-X table entry 0)",
            "biodone(",
            "done: error 0, resid 0",
            "g_down: d_strategy(nvmehpd0, BIO_READ, offset 8192, 4096 bytes)",
            "biodone(",
            "done: error 0, resid 0",
            "g_disk_access(nvmehpd0, close) -> d_close = 0",
            "at 8192: the written data; read back: the written data",
            // devctl detach: the interrupt, the nodes, the BAR, bus mastering off.
            "nvmehp0: device_detach_desc ->",
            "disk_gone(nvmehpd0)",
            "bus_teardown_intr(nvmehp0, irq rid 1) = 0",
            "pci_release_msi(nvmehp0) = 0",
            "destroy_dev(nvmehp0ns1)",
            "destroy_dev(nvmehp0)",
            "bus_release_resource(nvmehp0, type 3, rid 0x10) = 0",
            "pci_disable_busmaster(nvmehp0)",
            "nvmehp0: device_detach_desc = 0",
            "nvmehp0: softc",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "malloc_uninit(nvme_hotplug)",
            // The console as FreeBSD prints it.
            "console:",
            "pci0: <mass storage, NVM> at device 4.0 (no driver attached)",
            "nvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0400000-0xc0403fff at device 4.0 on pci0",
            // The lab machine names the serial after the plug (NVMEHP + qdev id nvme0-g1).
            "nvmehp0: NVMe 1.4.0 \"QEMU NVMe Ctrl\" serial \"NVMEHPnvme0-g1\"",
            "nvmehp0: attached: /dev/nvmehp0 and 1 namespace node(s)",
            "nvmehp0: detached (announced)",
            "nvmehp0: detached",
            "attach device 4.0 (nvmehp0): 0",
            "nodes after attach: [\"nvmehp0\", \"nvmehp0ns1\"]; disks: [\"nvmehpd0\"]",
            "io BIO_WRITE nvmehpd0 8192 4096: 0",
            "io BIO_READ nvmehpd0 8192 4096: 0",
            "io data in the backing file and read back: ok",
            "detach device 4.0 (nvmehp0): 0",
            "unloaded: true",
            "findings: 0",
        ],
    );
    // GEOM's d_gone comes from its event thread, whenever that runs after disk_gone (during a
    // sleep of the detach, or after it), and the module's unload waits for it.
    assert_in_order(
        &out,
        &["disk_gone(nvmehpd0)", "g_event: d_gone(nvmehpd0)", "disk_destroy(nvmehpd0) (was GoneDone)", "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0"],
    );
    // `devctl detach` leaves the device in devclass nvmehp (fixed by `devctl set driver`) with
    // its softc freed (device_get_softc answers NULL): the unload's busy walk still visits it
    // and must not read its state through that NULL (a fatal trap here, a panic in a kernel).
    // Replaces the fake kernel's `the_unload_walk_skips_devices_that_are_not_attached`.
    let quiesce = common::between(&out, "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE)", "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0");
    let visited = quiesce.lines().find(|l| l.contains("devclass_get_device(")).unwrap_or_else(|| panic!("the walk looked at no device:\n{quiesce}"));
    assert!(!visited.ends_with(" = 0x0"), "the walk did not find the detached device:\n{quiesce}");
    // Every malloc'd and contigmalloc'd block was freed before malloc_uninit.
    let allocs = out.matches("  malloc(").count() + out.matches("  malloc_aligned(").count() + out.matches("  contigmalloc(").count();
    let frees = out.matches("  free(0x").count();
    assert!(out.matches("  contigmalloc(").count() > 0);
    assert_eq!(allocs, frees, "{out}");
}

fn fixture(test: &str, define: Option<&str>) -> Option<std::path::PathBuf> {
    common::fixture_object(test, "pci_bar", define)
}

#[test]
fn a_bar_left_allocated_at_detach_is_reported_as_pci_does() {
    if !nvmehp_lab::skip::qemu_or_skip("attach_leak") {
        return;
    }
    // Control: the driver releases its BAR; the register read went to QEMU.
    let Some(good) = fixture("pci_bar_ok", None) else { return };
    let (code, out) = kldhost_run_with(&good, &["--qemu"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &["kldhostfx0: NVMe version 0x10400", "kldhostfx0: detached", "detach device 4.0 (kldhostfx0): 0", "findings: 0"],
    );
    assert!(!out.contains("leaked"), "{out}");

    let Some(bad) = fixture("pci_bar_leak", Some("-DKLDHOST_LEAK_BAR")) else { return };
    let (code, out) = kldhost_run_with(&bad, &["--qemu"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "kldhostfx0: detached",
            "pci0:0:4:0: Device leaked memory resources",
            "findings: 1",
            "kldhostfx0: detached with 1 memory resources still allocated",
        ],
    );
}

#[test]
fn a_busy_device_is_not_detached_and_its_driver_not_unloaded() {
    if !nvmehp_lab::skip::qemu_or_skip("attach_busy") {
        return;
    }
    let Some(busy) = fixture("pci_bar_busy", Some("-DKLDHOST_BUSY")) else { return };
    let (code, out) = kldhost_run_with(&busy, &["--qemu"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "device_busy(kldhostfx0) -> 1",
            "device_busy(pci0) -> 1",
            "device_detach(kldhostfx0) = EBUSY (busy 1)",
            // kldunload: devclass_delete_driver fails, so does MOD_UNLOAD: the file stays.
            "devclass_delete_driver(pci, kldhostfx) = 16",
            "kldunload: pci/kldhostfx refused MOD_UNLOAD: error 16",
            "detach device 4.0 (kldhostfx0): 16",
            "unloaded: false",
        ],
    );
}

#[test]
fn an_msix_vector_set_up_before_the_queues_interrupts_and_one_set_up_after_does_not() {
    if !nvmehp_lab::skip::qemu_or_skip("attach_msix") {
        return;
    }
    // MSI-X first, then the controller: the Identify's completion arrives as a message in the
    // guest-RAM mailbox and the interrupt thread runs the handler.
    let Some(first) = fixture_named("pci_msix_first", "pci_msix", None) else { return };
    let (code, out) = kldhost_run_with(&first, &["--qemu"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "pci_alloc_msix(kldhostfx0, 1) = 0, 1 vectors",
            "bus_setup_intr(kldhostfx0, irq rid 1",
            "bus_write_4(kldhostfx0 BAR 0x10 + 0x14, 0x460001)",
            "bus_write_4(kldhostfx0 BAR 0x10 + 0x1000, 0x1)",
            "kldhostfx0: interrupt (IRQ rid 1, MSI-X table entry 0)",
            "kldhostfx0: interrupts 1, completion status 0x1",
            "bus_teardown_intr(kldhostfx0, irq rid 1) = 0",
            "pci_release_msi(kldhostfx0) = 0",
            "findings: 0",
        ],
    );
    // The controller first (nvme_hotplug.ko's order for its I/O queue): QEMU's NVMe model never
    // marks the vector used, the command completes (status: phase 1, success) but no message
    // comes.
    let Some(after) = fixture_named("pci_msix_after", "pci_msix", Some("-DKLDHOST_MSIX_AFTER_QUEUES")) else { return };
    let (code, out) = kldhost_run_with(&after, &["--qemu"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["kldhostfx0: interrupts 0, completion status 0x1", "findings: 0"]);
    assert!(!out.contains("kldhostfx0: interrupt ("), "{out}");
}

fn fixture_named(test: &str, name: &str, define: Option<&str>) -> Option<std::path::PathBuf> {
    common::fixture_object(test, name, define)
}

#[test]
fn with_the_claim_tunable_the_driver_takes_the_controller_at_load_with_a_hoover_bid() {
    if !nvmehp_lab::skip::qemu_or_skip("attach_claim") || common::real_ko("attach_claim").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "tunable hw.nvme_hotplug.claim=1 loaded",
            "devclass_add_driver(pci, nvmehp",
            "pci_driver_added(nvmehp): probing device 4.0",
            // BUS_PROBE_HOOVER: accepted without a fixed devclass.
            "nvmehp0: device_probe_desc = -1000000",
            "nvmehp0: device_attach_desc = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0",
            "device 4.0 nvmehp0: attached at MOD_LOAD; devctl set driver not needed",
            "io data in the backing file and read back: ok",
            "detach device 4.0 (nvmehp0): 0",
            "unloaded: true",
            "findings: 0",
        ],
    );
    assert!(!out.contains("no driver attached"), "{out}");
    assert!(!out.contains("devctl set driver -f"), "{out}");
}

/// The interrupt is allocated before the bring-up enables the controller (CC.EN = 1, which
/// creates the admin completion queue, before Create I/O Completion Queue), whichever kind
/// pci(4) offers: QEMU's NVMe model binds a completion queue to its MSI-X vector only if MSI-X
/// was enabled when the queue was created (hw/nvme/ctrl.c `nvme_init_cq` asks
/// `msix_enabled`), so a vector allocated after the bring-up leaves every I/O to the 1 s
/// watchdog. The handler is set up only after the bring-up, and each bio is completed by it.
/// Run twice: MSI-X (vector rid 1, not shareable), and with `hw.pci.enable_msix=0
/// hw.pci.enable_msi=0` the shared INTx line (rid 0, RF_SHAREABLE). Fails when the interrupt
/// is allocated after CC.EN (the MSI-X run's bios then wait for the watchdog) or the handler
/// before the bring-up. (Replaces the fake kernel's
/// `the_interrupt_is_allocated_before_the_completion_queues_are_created`; MSI's case is
/// tests/msi.rs.)
#[test]
fn the_interrupt_is_allocated_before_the_bring_up_enables_the_controller() {
    let Some(ko) = common::real_ko_on_qemu("attach_irq_first") else { return };
    let cc_en = "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460001)";
    for (args, allocated, handler) in [
        (
            &["--qemu"][..],
            "bus_alloc_resource(nvmehp0, type 1, rid 0x1, 0x0, 0xffffffffffffffff, 1, flags 0x2) = ",
            "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 0 (MSI-X",
        ),
        (
            &["--qemu", "--tunable", "hw.pci.enable_msix=0", "--tunable", "hw.pci.enable_msi=0"][..],
            "bus_alloc_resource(nvmehp0, type 1, rid 0x0, 0x0, 0xffffffffffffffff, 1, flags 0x6) = ",
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx",
        ),
    ] {
        let (code, out) = kldhost_run_with(&ko, args);
        assert_in_order(&out, &[allocated, cc_en, handler, "nvmehp0: device_attach_desc = 0"]);
        assert_eq!(out.matches("bus_alloc_resource(nvmehp0, type 1,").count(), 1, "one IRQ resource ({args:?}):\n{out}");
        let bios = common::per_bio(&out);
        assert_eq!(bios.len(), 2, "{out}");
        for b in &bios {
            assert_eq!(common::completed_by(b), "interrupt", "a bio not completed by the interrupt ({args:?}):\n{b}");
        }
        common::assert_clean_unload(code, &out);
    }
}
