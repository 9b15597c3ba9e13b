//! Who gets a hot-added NVMe controller, on the real module: nvme(4), nvmehp or no driver,
//! per `hw.nvme_hotplug.claim` and whether nvme(4) is in the kernel (src/freebsd/claim.rs has
//! the table). `--stock-nvme` puts a stand-in for GENERIC's nvme(4) on pci before the module
//! loads (src/emu/stock_nvme.rs: its probe bids as nvme_pci_probe does), newbus picks the
//! highest bid as device_probe_child does, and the module's load message must name the
//! outcome the run then shows. The fourth cell (claim=1, no nvme(4): nvmehp) is
//! tests/acpi.rs's hot-add.
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, console, kldhost_run_with, real_ko_on_qemu as real_ko, between};

/// nvme(4) in the kernel, hot-added controllers go to it whatever `claim` says: the boot-time
/// controller is nvme0 before the module loads; the module says where hot-added ones go; an
/// eject request on nvme0's slot is refused (another driver's device: no detach, no `_EJ0`);
/// the controller hot-added into slot 5 is probed by both drivers after the module's rescan
/// and nvme(4)'s BUS_PROBE_GENERIC outbids nvmehp's bid, so it becomes nvme1 and the module
/// makes no node or disk. Fails if nvmehp's bid wins (e.g. claim=1 bidding above
/// BUS_PROBE_GENERIC) or if the module acts on nvme(4)'s device.
fn with_nvme4(claim: u8, said: &str) {
    let Some(ko) = real_ko(&format!("claim_{claim}_nvme4")) else { return };
    let tunable = format!("hw.nvme_hotplug.claim={claim}");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--stock-nvme", "--eject", "--hot-add", "--tunable", &tunable]);
    assert!(!out.contains("panic:"), "{out}");
    assert_in_order(
        console(&out),
        &[
            "nvme0: <Generic NVMe Device> mem ",
            " at device 4.0 on pci0",
            &format!("nvme_hotplug: hot-added NVMe controllers attach to nvme(4) (claim={claim}): {said}"),
            "nvme0: slot \\_SB_.PCI0.S04_: eject request refused: it is another driver's device",
            "nvme1: <Generic NVMe Device> mem ",
            " at device 5.0 on pci0",
            "nvme_hotplug: slot \\_SB_.PCI0.S05_: 1 new functions, 1 attached",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    // The eject request: nvme(4)'s device is neither detached nor deleted, nor ejected.
    let eject = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S04_, 3)", "after the eject request");
    for never in ["device_detach(", "device_delete_child(", "acpi_SetInteger("] {
        assert!(!eject.contains(never), "{never} on nvme(4)'s slot:\n{eject}");
    }
    assert!(out.contains("after the eject request: device 4.0 still on pci0"), "{out}");
    // The hot-add: both drivers bid, nvme(4)'s wins.
    let hot_add = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S05_, 1)", "after the hot-add");
    assert_in_order(hot_add, &["stock nvme(4): nvme_pci_probe(00:05.0, id 0x00101b36, class 010802) = -100", "nvmehp0: device_probe_desc = "]);
    assert!(hot_add.contains("stock nvme(4): nvme_attach(nvme1) = 0"), "{hot_add}");
    assert!(!out.contains("nvmehp0: attached"), "{out}");
    assert!(out.contains("nodes after attach: []; disks: []"), "{out}");
    assert!(out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "{out}");
    // No disk of the module's, so its write and read cannot be done: the run says so.
    assert!(out.contains("hot-added and attached: true; its write and read: WRONG"), "{out}");
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn with_nvme4_and_claim_1_a_hot_added_controller_still_goes_to_nvme4() {
    with_nvme4(1, "nvme(4) outbids claim=1; `devctl set driver -f <dev> nvmehp` hands one over");
}

#[test]
fn with_nvme4_and_claim_0_a_hot_added_controller_goes_to_nvme4() {
    with_nvme4(0, "`devctl set driver -f <dev> nvmehp` hands one over");
}

/// claim=0 and no nvme(4): nvmehp bids BUS_PROBE_NOWILDCARD, which counts only on a device
/// whose devclass was fixed by hand, so the controller hot-added into slot 5 gets no driver
/// (pci(4)'s "no driver attached" line) and no node or disk, as the load message said. The
/// boot-time controller, given to nvmehp by `devctl set driver -f`, is its as usual and its
/// eject works. Fails if the bid counts without `devctl` (claim=0 bidding above NOWILDCARD).
#[test]
fn with_claim_0_and_no_nvme4_a_hot_added_controller_gets_no_driver() {
    let Some(ko) = real_ko("claim_0_alone") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--eject", "--hot-add", "--tunable", "hw.nvme_hotplug.claim=0"]);
    assert!(!out.contains("panic:"), "{out}");
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: hot-added NVMe controllers attach to no driver (claim=0): claim=0 and nvme(4) is not loaded",
            "nvmehp0: attached: /dev/nvmehp0",
            "pci0: <mass storage, NVM> at device 5.0 (no driver attached)",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    assert!(out.contains("ejected (deleted from pci0, DEVICE_DELETED): true"), "{out}");
    let hot_add = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S05_, 1)", "after the hot-add");
    assert!(hot_add.contains("(BUS_PROBE_NOWILDCARD or lower) on a device whose devclass is not fixed: ENXIO"), "{hot_add}");
    assert!(out.contains("after the hot-add: device 5.0 not attached"), "{out}");
    assert!(out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "{out}");
    assert_eq!(code, Some(0), "{out}");
}

/// nvme(4)'s controller vanishes (the lab's surprise removal: the slot's PCEJ bit written with
/// no notify), then the firmware sends a device check on its slot: the module's task sees the
/// function gone but the device another driver's, and leaves it alone with its message (its
/// detach could sleep until that driver's disks are unmounted, holding the hotplug task and
/// kldunload): no device_detach, no delete. Fails if the module treats it as its own stale
/// controller.
#[test]
fn a_device_check_on_a_vanished_nvme4_controller_leaves_it_alone() {
    let Some(ko) = real_ko("claim_stale_nvme4") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--stock-nvme", "--surprise", "--notify", "4=1"]);
    assert!(!out.contains("panic:"), "{out}");
    let check = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S04_, 1)", "after Notify(slot 4, 1)");
    for never in ["device_detach(", "device_delete_child(", "acpi_SetInteger("] {
        assert!(!check.contains(never), "{never} on nvme(4)'s stale device:\n{check}");
    }
    assert_in_order(
        console(&out),
        &[
            "nvme0: <Generic NVMe Device> mem ",
            "nvme_hotplug: slot \\_SB_.PCI0.S04_: its device is gone; left alone (another driver's device: `devctl detach` it first)",
            "nvme0: detached",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    assert!(out.contains("notify slot 4 value 1: 1 handler(s)"), "{out}");
    assert!(out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "{out}");
    // No disk of the module's, so no I/O was tried; the status judges the unload.
    assert_eq!(code, Some(0), "{out}");
}
