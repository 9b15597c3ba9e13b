//! `kldhost demo`: the shipped module's hotplug story on one QEMU machine, its console in
//! order. Needs QEMU (the lab's rule: SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1)
//! and the built .ko (SKIP, or a failure with NVMEHP_REQUIRE_KO=1) or clang-19 for the
//! negative control.

mod common;

use common::assert_in_order;
use std::path::Path;
use std::process::Command;

fn kldhost_demo(ko: &Path) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kldhost")).args(["demo", "--ko"]).arg(ko).output().expect("run kldhost demo");
    let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code(), out)
}

#[test]
fn the_demo_tells_load_attach_io_surprise_hot_add_eject_and_unload_in_order() {
    if !nvmehp_lab::skip::qemu_or_skip("demo_real") || common::real_ko("demo_real").is_none() {
        return;
    }
    let (code, out) = kldhost_demo(&common::repo_root().join("nvme_hotplug.ko"));
    assert_eq!(code, Some(0), "kldhost demo failed:\n{out}");
    assert_in_order(
        &out,
        &[
            // kldload: the module's load messages; pci0 offers it the controller in slot 4.
            "==> kldload nvme_hotplug.ko (loader tunables: hw.nvme_hotplug.claim=1 hw.nvme_hotplug.io_entries=16)",
            "\nnvme_hotplug: loaded (claim=1,",
            "    | pci_driver_added(nvmehp): probing device 4.0",
            // claim=1: the module bids BUS_PROBE_HOOVER for an NVMe controller.
            "    | DEVICE_PROBE(nvmehp0) = -1000000 (BUS_PROBE_HOOVER)",
            "\nnvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0400000-0xc0403fff at device 4.0 on pci0\n",
            "\nnvmehp0: NVMe 1.4.0 \"QEMU NVMe Ctrl\" serial \"NVMEHPnvme0-g1\"",
            "    | disk_create(nvmehpd0: 16777216 bytes, 512-byte sectors, d_gone set): 16MB (32768 512 byte sectors)",
            "\nnvmehp0: attached: /dev/nvmehp0 and 1 namespace node(s) with disks nvmehpd*\n",
            "    | MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0",
            "\nnvme_hotplug: 30 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 30 owned (30 handlers)",
            // The write and the read, and QEMU's image file holding the data.
            "==> write 4096 bytes (byte i = (7 * i mod 256) XOR 0x5a) at offset 8192 of nvmehpd0 through d_strategy, read them back; check QEMU's image file nvme0-g1-ns1.raw",
            "    | g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes)",
            "    | g_down: d_strategy(nvmehpd0, BIO_READ, offset 8192, 4096 bytes)",
            "/nvme0-g1-ns1.raw at 8192: the written data; read back: the written data",
            // Surprise removal with writes in flight: no notify; the watchdog finds the
            // controller gone and fails what it had not completed with ENXIO; the function is
            // detached and deleted, its nodes destroyed, its disk gone.
            "==> 24 writes of 4 KiB sent to nvmehpd0 without waiting, then surprise removal of slot 4",
            "    | g_down: 24 bios to d_strategy(nvmehpd0) without waiting",
            "    | surprise removal: PCEJ bit 4 written with no device_del: Ok(())",
            "    | time passes: a callout fires",
            "    | biodone: error 6 (ENXIO)",
            "\nnvmehp0: controller lost (controller gone, health Gone): ",
            "    | disk_gone(nvmehpd0)",
            "    | destroy_dev(nvmehp0ns1)",
            "    | destroy_dev(nvmehp0)",
            "\nnvmehp0: detached (device gone): ",
            "\nnvmehp0: detached\n",
            "    | device_delete_child(pci0, pci0:0:4:0) = 0",
            "    | after the surprise removal: device 4.0 deleted from pci0",
            // Told either way: QEMU does not always send it after the eject write.
            "    | QMP: DEVICE_DELETED nvme0: ",
            "    | g_up: 24 of 24 bios done",
            // The consumer closes once its writes ended; only then does GEOM call d_gone.
            "    | g_disk_access(nvmehpd0, close) -> d_close = 0",
            "    | g_event: d_gone(nvmehpd0)",
            "failed with ENXIO, 0 other errors, 0 never done",
            // Hot-add into slot 5: Notify 1, the module's rescan, attach, its own write and read.
            "==> hot-add: controller nvme1 plugged into slot 5",
            "    | QMP device_add nvme1 at slot 5: ok",
            "    | acpi_task: Notify(\\_SB_.PCI0.S05_, 1) to 1 handler(s)",
            "    | pci_read_device(0, 0, 5, 0) = ",
            "    | pci_add_child(pci0, 00:05.0) = device_t",
            "\nnvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0500000-0xc0503fff at device 5.0 on pci0\n",
            // The surprise-removed disk's d_gone ran (its consumer closed): unit 0 is free
            // again and the new disk reuses it, as nvd(4) reuses units.
            "    | disk_create(nvmehpd0: 16777216 bytes",
            "\nnvme_hotplug: slot \\_SB_.PCI0.S05_: 1 new functions, 1 attached\n",
            "==> write 4096 bytes (byte i = (7 * i mod 256) XOR 0x5a) at offset 8192 of nvmehpd0 through d_strategy, read them back; check QEMU's image file nvme1-g2-ns1.raw",
            "/nvme1-g2-ns1.raw at 8192: the written data; read back: the written data",
            // Its announced eject: device_del, Notify 3, detach, delete, _EJ0, DEVICE_DELETED.
            "==> eject of slot 5 announced: QMP device_del nvme1",
            "    | acpi_task: Notify(\\_SB_.PCI0.S05_, 3) to 1 handler(s)",
            "    | disk_gone(nvmehpd0)",
            "\nnvmehp0: detached (announced): ",
            "\nnvmehp0: detached\n",
            "    | device_delete_child(pci0, pci0:0:5:0) = 0",
            "    | acpi_SetInteger(\\_SB_.PCI0.S05_, \"_EJ0\", 1) = 0x0",
            "    | QMP: DEVICE_DELETED nvme1: received",
            // kldunload and the summary.
            "==> kldunload nvme_hotplug (MOD_QUIESCE, then MOD_UNLOAD)",
            "    | MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0",
            "\nnvme_hotplug: unloaded (30 ACPI notify handlers removed)\n",
            "    | MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "    | steps done: 7 of 7",
            "    | device nodes left: 0, disks left: 0, ACPI notify handlers left: 0",
            "    | findings: 0",
            "kldhost demo: ok",
        ],
    );
    // Every allocation freed.
    let line = out.lines().find(|l| l.starts_with("    | allocations (malloc(9), contigmalloc(9)): ")).expect("allocations line");
    let n: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    assert!(n.len() == 4 && n[2] > 0 && n[2] == n[3], "{line}");
    // The writes in flight: every one ended, at least the 9 beyond the 15 trackers with ENXIO,
    // as many as the module says it failed (when it found the controller lost, and at detach).
    let line = out.lines().find(|l| l.contains("in flight at the surprise removal: 24 writes, ")).expect("in-flight line");
    let enxio: usize = line.split(", ").find_map(|p| p.strip_suffix(" failed with ENXIO")).and_then(|n| n.parse().ok()).expect("ENXIO count");
    assert!(enxio >= 9, "{line}");
    let count_after = |tag: &str| out.lines().find_map(|l| l.split_once(tag).and_then(|(_, r)| r.split(' ').next()?.parse::<usize>().ok()));
    let lost = count_after("nvmehp0: controller lost (controller gone, health Gone): ").expect("controller lost line");
    let at_detach = count_after("nvmehp0: detached (device gone): ").expect("detached line");
    assert_eq!(lost + at_detach, enxio, "{out}");
    // No notify reached slot 4: the surprise removal is found by the module alone.
    assert!(!out.contains("Notify(\\_SB_.PCI0.S04_"), "{out}");
}

#[test]
fn a_step_that_fails_is_named_and_the_demo_exits_1() {
    if !nvmehp_lab::skip::qemu_or_skip("demo_fails") {
        return;
    }
    // A pci driver with no disk (the pci_bar fixture): it attaches, but the write and read
    // have nothing to go to; the rest of the story is skipped, the unload still happens.
    let Some(ko) = common::fixture_object("demo_fails", "pci_bar", None) else { return };
    let (code, out) = kldhost_demo(&ko);
    let _ = std::fs::remove_file(&ko);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "==> write 4096 bytes (byte i = (7 * i mod 256) XOR 0x5a) at offset 8192 of (no disk)",
            "==> FAILED: write and read",
            "==> skipped after the failure: surprise removal of slot 4",
            "==> skipped after the failure: announced eject of nvme1 in slot 5",
            "==> devctl detach of every function still attached",
            "==> kldunload",
            "    | steps done: 2 of 7",
            "kldhost demo: FAILED at the step: write and read",
        ],
    );
}
