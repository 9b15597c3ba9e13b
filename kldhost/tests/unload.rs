//! `kldunload -f` of the real module (`kldhost run --kldunload-force`): linker_file_unload
//! with LINKER_UNLOAD_FORCE (sys/kern/kern_linker.c) ignores a MOD_QUIESCE veto and sends
//! MOD_UNLOAD anyway, so the module's MOD_UNLOAD and its detach must hold the line that
//! MOD_QUIESCE normally holds: nothing torn down under an open disk, no handler left that
//! may still call the module's code. Each test then lets a plain retry unload the module and
//! checks the end is clean (no finding: nothing leaked, no node, disk or handler left).
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, console, kldhost_run_with, real_ko_on_qemu as real_ko, between, assert_clean_unload};

/// A disk held open across `kldunload -f`: MOD_QUIESCE refuses (busy), the force sends
/// MOD_UNLOAD anyway, driver_module_handler's detach of the open controller refuses, and the
/// module stays as it was: nothing destroyed, the hotplug machinery resumed. Once the holder
/// closed the disk, the retry unloads it with every ACPI handler removed. Fails if the force
/// is ignored (no MOD_UNLOAD in the first attempt) or if MOD_UNLOAD tears anything down.
#[test]
fn a_forced_unload_of_an_open_controller_is_refused_by_its_detach() {
    let Some(ko) = real_ko("unload_force_open") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--hold-disks-open", "--kldunload-force", "--kldunload-retries", "1"]);
    assert_in_order(
        &out,
        &[
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 16",
            "kldunload -f: pci/nvme_hotplug refused MOD_QUIESCE: error 16, ignored (LINKER_UNLOAD_FORCE)",
            "driver_module_handler(nvmehp on pci, MOD_UNLOAD)",
            "nvmehp0: in use (a node or disk is open): detach refused, close it first",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 16",
            "g_disk_access(nvmehpd0, close) (the holding consumer) -> d_close = 0",
            "kldunload again (retry 1)",
        ],
    );
    let forced = between(&out, "kldunload -f: pci/nvme_hotplug refused MOD_QUIESCE", "kldunload again (retry 1)");
    for never in ["destroy_dev", "disk_gone(", "bus_teardown_intr(", "taskqueue_free(", "AcpiRemoveNotifyHandler("] {
        assert!(!forced.contains(never), "{never} in a forced unload refused by the detach:\n{forced}");
    }
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: busy (a node or disk is open): not unloading",
            "nvmehp0: in use (a node or disk is open): detach refused, close it first",
            "nvme_hotplug: unload refused: ACPI hotplug resumed",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    assert_clean_unload(code, &out);
}

/// `kldunload -f` when MOD_QUIESCE refused for a reason no detach sees (an ACPI notify
/// handler whose removal failed): our MOD_UNLOAD, finding no standing MOD_QUIESCE, runs the
/// quiesce steps itself before it frees anything. Here the removal fails once (call 2): the
/// redo removes the kept handler and the module unloads in that one forced attempt, with
/// nothing left (a handler left would be a finding).
#[test]
fn a_forced_unload_redoes_the_quiesce_in_mod_unload() {
    let Some(ko) = real_ko("unload_force_redo") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "AcpiRemoveNotifyHandler:2", "--kldunload-force"]);
    assert_in_order(
        &out,
        &[
            "kldhost: injected AE_NOT_EXIST into AcpiRemoveNotifyHandler (call 2)",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 16",
            "kldunload -f: pci/nvme_hotplug refused MOD_QUIESCE: error 16, ignored (LINKER_UNLOAD_FORCE)",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD)",
            "MOD_UNLOAD without a standing MOD_QUIESCE: quiescing now",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
        ],
    );
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: 1 ACPI notify handlers still installed: not unloading",
            "nvme_hotplug: MOD_UNLOAD without a standing MOD_QUIESCE: quiescing now",
            "nvme_hotplug: unloaded (1 ACPI notify handlers removed)",
        ],
    );
    // The quiesce redone in MOD_UNLOAD comes before anything is freed.
    let unload = between(&out, "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD)", "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0");
    let redo = unload.find("MOD_UNLOAD without a standing MOD_QUIESCE").expect("the redo");
    assert!(!unload[..redo].contains("taskqueue_free("), "freed before the redo:\n{unload}");
    assert!(out.contains("MOD_QUIESCE: Some(16), MOD_UNLOAD: Some(0), unloaded: true"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "{out}");
    assert_eq!(code, Some(0), "{out}");
}

/// A handler that can never be removed: the forced unload's MOD_UNLOAD redoes the quiesce,
/// fails the same way and refuses: the module stays loaded (its handlers may still call it),
/// resumed, the 30 handlers still installed; so does the forced retry. The exit status says
/// the module was not unloaded.
#[test]
fn a_forced_unload_refuses_while_a_handler_cannot_be_removed() {
    let Some(ko) = real_ko("unload_force_stuck") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "AcpiRemoveNotifyHandler", "--kldunload-force", "--kldunload-retries", "1"]);
    assert_in_order(
        &out,
        &[
            "kldunload -f: pci/nvme_hotplug refused MOD_QUIESCE: error 16, ignored (LINKER_UNLOAD_FORCE)",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 16",
            "kldunload: pci/nvme_hotplug refused MOD_UNLOAD: error 16",
            "kldunload again (retry 1)",
            "kldunload -f: pci/nvme_hotplug refused MOD_QUIESCE: error 16, ignored (LINKER_UNLOAD_FORCE)",
            "kldunload: pci/nvme_hotplug refused MOD_UNLOAD: error 16",
        ],
    );
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: 30 ACPI notify handlers still installed: not unloading",
            "nvme_hotplug: MOD_UNLOAD without a standing MOD_QUIESCE: quiescing now",
            "nvme_hotplug: 30 ACPI notify handlers still installed: not unloading",
            "nvme_hotplug: unload refused: ACPI hotplug resumed",
        ],
    );
    assert!(!console(&out).contains("nvme_hotplug: unloaded"), "{out}");
    assert!(out.contains("MOD_QUIESCE: Some(16), MOD_UNLOAD: Some(16), unloaded: false"), "{out}");
    assert!(!out.contains("panic:"), "{out}");
    assert_eq!(code, Some(1), "{out}");
}

/// A plain kldunload with a disk held open: MOD_QUIESCE refuses (busy) before anything is
/// detached, torn down or removed, and no MOD_UNLOAD follows; the module resumes as it was.
/// Once the holder closed the disk, the retry unloads in the order MOD_QUIESCE (the 30
/// handlers removed, so no notify can reach a controller being torn down), then
/// MOD_UNLOAD's detach (disk_gone, the nodes destroyed), and MOD_UNLOAD returns only after
/// the disk's d_gone, with nothing left. Fails if the busy check comes after the handlers'
/// removal, or if the refusal tears anything down. Replaces the fake kernel's
/// `unload_refuses_with_ebusy_while_a_node_is_open_then_removes_handlers_first` (its open
/// node is a disk here: the module's busy check is one for both).
#[test]
fn a_busy_unload_is_refused_in_quiesce_and_changes_nothing() {
    let Some(ko) = real_ko("unload_busy") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--hold-disks-open", "--kldunload-retries", "1"]);
    let refused = between(&out, "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE)", "kldunload again (retry 1)");
    assert!(refused.contains("MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 16"), "{refused}");
    for never in ["MOD_UNLOAD", "device_detach", "destroy_dev", "disk_gone(", "AcpiRemoveNotifyHandler(", "taskqueue_free("] {
        assert!(!refused.contains(never), "{never} in an unload refused by MOD_QUIESCE:\n{refused}");
    }
    let retry = &out[out.find("kldunload again (retry 1)").expect("a retry")..];
    assert_in_order(
        retry,
        &[
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE)",
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S1F_",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0",
            "driver_module_handler(nvmehp on pci, MOD_UNLOAD)",
            "nvmehp0: device_detach_desc ->",
            "disk_gone(nvmehpd0)",
            "destroy_dev",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
        ],
    );
    // MOD_UNLOAD returns only after GEOM's d_gone destroyed the disk: no module code may run on
    // the GEOM thread once the file is gone. GEOM's event thread may run d_gone as soon as the
    // disk is gone and closed, while the detach sleeps (before or after the node's
    // destroy_dev), so only this order is the module's to keep.
    assert_in_order(retry, &["disk_gone(nvmehpd0)", "g_event: d_gone(nvmehpd0)", "disk_destroy(nvmehpd0)", "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0"]);
    assert_eq!(retry.matches("  AcpiRemoveNotifyHandler(").count(), 30, "{retry}");
    // Each removal names the handler installed (ACPICA answers AE_NOT_EXIST for another).
    assert_eq!(retry.lines().filter(|l| l.trim_start().starts_with("AcpiRemoveNotifyHandler(") && l.ends_with(") = 0x0")).count(), 30, "{retry}");
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: busy (a node or disk is open): not unloading",
            "nvme_hotplug: unload refused: ACPI hotplug resumed",
            "nvmehp0: detached",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    assert_clean_unload(code, &out);
}
