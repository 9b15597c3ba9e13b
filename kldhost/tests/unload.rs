//! `kldunload -f` of the real module (`kldhost run --kldunload-force`): linker_file_unload
//! with LINKER_UNLOAD_FORCE (sys/kern/kern_linker.c) ignores a MOD_QUIESCE veto and sends
//! MOD_UNLOAD anyway, so the module's MOD_UNLOAD and its detach must hold the line that
//! MOD_QUIESCE normally holds: nothing torn down under an open disk, no handler left that
//! may still call the module's code. Each test then lets a plain retry unload the module and
//! checks the end is clean (no finding: nothing leaked, no node, disk or handler left).
//!
//! Then the refusals that come after a MOD_QUIESCE that succeeded, with another thread acting
//! inside a sleep of the unload (`--in-sleep`, src/emu/interleave.rs): a detach refused by the
//! module ending the unload and undoing the quiesce, a controller attached behind
//! MOD_UNLOAD's detach walk, an attach refused while the quiesce stands.
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

/// A detach refused after MOD_QUIESCE succeeded ends the unload with no further module event,
/// and that refusing detach undoes the quiesce. On the .ko the refusal comes as it can in the
/// kernel: `devctl delete` of nvmehp0 (4.0) is in its DEVICE_DETACH, asleep in the stop
/// (`--device-fault admin-latency=30`; its second `nvmehpst` sleep, after GEOM's d_gone of
/// the disk, so nothing is open) when kldunload comes (`--in-sleep nvmehpst:2=kldunload`).
/// MOD_QUIESCE agrees (the 30 handlers removed, the module unloading), then
/// driver_module_handler's detach walk reaches nvmehp0 first (unit 0), which newbus still
/// calls DS_ATTACHED, and the module's DEVICE_DETACH refuses (its detach is in progress): the
/// walk ends, the module's MOD_UNLOAD is never called, and the refusing detach itself says
/// "unload abandoned" and has the hotplug task resume, which reinstalls the 30 handlers. The
/// reinstalled handlers work: the platform's eject request for slot 6 (`--eject-slot 6`)
/// reaches the task, which detaches nvmehp1 and runs `_EJ0`; the final unload is clean.
/// Fails if the refusing detach leaves the module unloading (no "unload abandoned", no
/// handler reinstalled: the eject's Notify reaches no handler and nvmehp1 stays), or if
/// anything of the module is torn down by the refused unload. Replaces the fake kernel's
/// `a_detach_refused_after_quiesce_restores_the_module` (whose open node stood in for a
/// refusal; on the .ko the unloading flag refuses opens, and an eject that goes through shows
/// the handler works where the fake's was refused for the open node).
#[test]
fn a_detach_refused_after_a_quiesce_ends_the_unload_and_restores_the_module() {
    let Some(ko) = real_ko("unload_detach_refused") else { return };
    let (code, out) = kldhost_run_with(
        &ko,
        &[
            "--qemu",
            "--acpi",
            "--multifunction",
            "6=0",
            "--device-fault",
            "admin-latency=30",
            "--devctl-delete",
            "4.0",
            "--in-sleep",
            "nvmehpst:2=kldunload",
            "--eject-slot",
            "6",
        ],
    );
    assert_in_order(
        &out,
        &[
            "nvmehp0: device_detach_desc ->",
            "kldhost: in sleep 2 on nvmehpst, another thread: kldunload",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0",
            "driver_module_handler(nvmehp on pci, MOD_UNLOAD)",
            "nvmehp0: device_detach_desc ->",
            "nvmehp0: detach refused: Detach in progress",
            "nvme_hotplug: a controller refused to detach: unload abandoned",
            "devclass_delete_driver(pci, nvmehp) = 16",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 16",
            "kldhost: in sleep 2 on nvmehpst, another thread: kldunload: pci/nvme_hotplug refused MOD_UNLOAD: error 16",
            "nvmehp0: device_detach_desc = 0",
            "nvme_hotplug: unload refused: ACPI hotplug resumed (30 notify handlers reinstalled)",
            "step DevctlDelete { slot: 4, func: 0 }: done",
            "acpi_task: Notify(\\_SB_.PCI0.S06_, 3) to 1 handler(s)",
            "nvmehp1: device_detach_desc = 0",
            "acpi_SetInteger(\\_SB_.PCI0.S06_, \"_EJ0\", 1)",
            "step EjectSlot { slot: 6 }: done",
        ],
    );
    let quiesce = between(&out, "another thread: kldunload", "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0");
    assert_eq!(quiesce.matches("  AcpiRemoveNotifyHandler(").count(), 30, "{quiesce}");
    // Nothing after the refusal: the module's MOD_UNLOAD was not called, nothing torn down.
    let refused = between(&out, "driver_module_handler(nvmehp on pci, MOD_UNLOAD)", "refused MOD_UNLOAD: error 16");
    for never in ["MOD_UNLOAD without a standing MOD_QUIESCE", "nvmehp1: device_detach_desc", "destroy_dev_drain", "taskqueue_free(", "not unloading"] {
        assert!(!refused.contains(never), "{never} in the unload a refused detach ended:\n{refused}");
    }
    assert_eq!(out.matches("  AcpiInstallNotifyHandler(").count(), 60, "30 at discovery, 30 reinstalled:\n{out}");
    assert_in_order(
        console(&out),
        &[
            "nvmehp0: detach refused: Detach in progress",
            "nvme_hotplug: a controller refused to detach: unload abandoned",
            "nvmehp0: detached",
            "nvme_hotplug: unload refused: ACPI hotplug resumed (30 notify handlers reinstalled)",
            "nvmehp1: detached",
            "nvme_hotplug: hotplug run: 0 rescans, 1 detaches (0 stale), 1 ejected, 0 refused, 0 failures, 0 left alone",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    assert_clean_unload(code, &out);
}

/// The run MOD_UNLOAD's detach walk sleeps in: nvmehp0 (4.0) and nvmehp1 (6.0) attached;
/// the final `devctl detach` detaches nvmehp0 (unit 0 stays in devclass nvmehp, fixed) and
/// is refused for nvmehp1, whose disk a process holds open until the first kldunload returned;
/// that kldunload is refused in MOD_QUIESCE (busy), and the retry's MOD_QUIESCE agrees, so its
/// MOD_UNLOAD walk detaches nvmehp1 (unit 1) with the quiesce standing, asleep in the stop
/// (`admin-latency=30`), where `in_sleep` runs (`--in-sleep nvmehpst@unload=...`: the first
/// such sleep inside a kldunload's module events).
fn run_with_the_walk_asleep_in_nvmehp1(ko: &std::path::Path, retries: &str, in_sleep: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["--qemu", "--acpi", "--multifunction", "6=0", "--device-fault", "admin-latency=30", "--hold-open", "nvmehpd1", "--kldunload-retries", retries];
    for a in in_sleep {
        args.extend(["--in-sleep", a]);
    }
    let (code, out) = kldhost_run_with(ko, &args);
    assert_in_order(
        &out,
        &[
            "nvmehp1: in use (a node or disk is open): detach refused, close it first",
            "kldunload: pci/nvme_hotplug refused MOD_QUIESCE: error 16",
            "kldunload again (retry 1)",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0",
            "driver_module_handler(nvmehp on pci, MOD_UNLOAD)",
            "nvmehp1: device_detach_desc ->",
            "kldhost: in sleep 1 on nvmehpst, another thread:",
        ],
    );
    (code, out)
}

/// A detach refused while MOD_UNLOAD's detach walk runs (a second `devctl detach` of
/// nvmehp1, whose walk detach sleeps: the module's DEVICE_DETACH refuses it) undoes the
/// standing MOD_QUIESCE, so attaches are allowed again, and `devctl attach nvmehp0` in that
/// window (`--in-sleep nvmehpst@unload=attach:4`) attaches a controller at unit 0, which the
/// walk (devclass_driver_deleted: unit by unit, now at unit 1) does not visit again. The walk
/// then succeeds and the module's MOD_UNLOAD, finding no standing quiesce, quiesces again
/// and refuses: "1 controllers still attached: not unloading", nothing torn down, the 30
/// handlers reinstalled; the module stays loaded and usable, and the next kldunload detaches
/// nvmehp0 and unloads clean. Fails if MOD_UNLOAD takes "newbus detached every device" on
/// trust (tried: with the module's attached-controller check removed, the refusal comes only
/// from its later check of disks GEOM still holds, nvmehp0's live disk counted as one, "1
/// disks still held by GEOM"; a controller with no namespace would not be caught by that).
/// Also fails if the refused detach does not undo the quiesce (the attach is refused: "module
/// unloading: not attaching"). Replaces the fake kernel's
/// `mod_unload_refuses_while_a_controller_is_attached`.
#[test]
fn mod_unload_refuses_while_a_controller_attached_behind_the_detach_walk() {
    let Some(ko) = real_ko("unload_attached_behind_the_walk") else { return };
    let (code, out) = run_with_the_walk_asleep_in_nvmehp1(&ko, "2", &["nvmehpst@unload=detach", "nvmehpst@unload=attach:4"]);
    assert_in_order(
        &out,
        &[
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl detach nvmehp1",
            "nvmehp1: detach refused: Detach in progress",
            "nvme_hotplug: a controller refused to detach: unload abandoned",
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl detach nvmehp1 = 16",
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl attach nvmehp0",
            "nvmehp0: device_attach_desc = 0",
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl attach nvmehp0 = 0",
            "nvmehp1: device_detach_desc = 0",
            "devclass_delete_driver(pci, nvmehp) = 0",
            "nvme_hotplug: MOD_UNLOAD without a standing MOD_QUIESCE: quiescing now",
            "nvme_hotplug: 1 controllers still attached: not unloading",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 16",
            "kldunload: pci/nvme_hotplug refused MOD_UNLOAD: error 16",
            "nvme_hotplug: unload refused: ACPI hotplug resumed (30 notify handlers reinstalled)",
            "kldunload again (retry 2)",
            "nvmehp0: device_detach_desc = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
        ],
    );
    // The walk did not visit nvmehp0 again: between the attach and the refusal only nvmehp1's
    // detach finished; the refusing MOD_UNLOAD tore nothing down.
    let walk = between(&out, "another thread: devctl attach nvmehp0 = 0", "devclass_delete_driver(pci, nvmehp) = 0");
    assert!(!walk.contains("nvmehp0: device_detach_desc"), "the walk visited nvmehp0 again:\n{walk}");
    let refused = between(&out, "nvme_hotplug: MOD_UNLOAD without a standing MOD_QUIESCE", "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 16");
    for never in ["destroy_dev", "disk_gone(", "bus_teardown_intr(", "taskqueue_free(", "callout_drain"] {
        assert!(!refused.contains(never), "{never} in a MOD_UNLOAD that refused:\n{refused}");
    }
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: a controller refused to detach: unload abandoned",
            "nvmehp0: attached: /dev/nvmehp0",
            "nvmehp1: detached",
            "nvme_hotplug: 1 controllers still attached: not unloading",
            "nvme_hotplug: unload refused: ACPI hotplug resumed (30 notify handlers reinstalled)",
            "nvmehp0: detached",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
        ],
    );
    assert_clean_unload(code, &out);
}

/// From a standing MOD_QUIESCE on, the module's DEVICE_ATTACH refuses to start, before it
/// touches the device: `devctl attach nvmehp0` while MOD_UNLOAD's walk sleeps in nvmehp1's
/// detach (`--in-sleep nvmehpst@unload=attach:4`) gets "module unloading: not attaching"
/// (ENXIO, newbus prints `attach returned 6`) with no bus_alloc_resource, no register or
/// config access; the walk and MOD_UNLOAD then go on and the module unloads clean. Fails if
/// the attach is let in (it would attach under an unload that goes on: MOD_UNLOAD's
/// attached-controller check would refuse, or with that gone the module would be freed under
/// it). The other half of the fake kernel's `attaches_and_the_unload_exclude_each_other`
/// (MOD_QUIESCE refusing while an attach sleeps) is tests/interleave.rs
/// `a_kldunload_during_an_attach_is_refused_in_mod_quiesce`; together they replace it.
#[test]
fn an_attach_is_refused_from_a_standing_quiesce_before_it_touches_the_device() {
    let Some(ko) = real_ko("unload_attach_refused") else { return };
    let (code, out) = run_with_the_walk_asleep_in_nvmehp1(&ko, "1", &["nvmehpst@unload=attach:4"]);
    assert_in_order(
        &out,
        &[
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl attach nvmehp0",
            "nvmehp0: device_attach_desc ->",
            "nvmehp0: module unloading: not attaching",
            "nvmehp0: device_attach_desc = 6",
            "device_attach: nvmehp0 attach returned 6",
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl attach nvmehp0 = 6",
            "nvmehp1: device_detach_desc = 0",
            "devclass_delete_driver(pci, nvmehp) = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
        ],
    );
    let action = between(&out, "another thread: devctl attach nvmehp0", "another thread: devctl attach nvmehp0 = 6");
    let attach = between(action, "nvmehp0: device_attach_desc ->", "nvmehp0: device_attach_desc = 6");
    for never in ["bus_alloc_resource(", "pci_read_config(", "pci_enable_busmaster(", "malloc("] {
        assert!(!attach.contains(never), "{never} in an attach refused from a standing quiesce:\n{attach}");
    }
    assert!(!out.contains("MOD_UNLOAD without a standing MOD_QUIESCE"), "{out}");
    assert_in_order(console(&out), &["nvmehp0: module unloading: not attaching", "nvmehp1: detached", "nvme_hotplug: unloaded (30 ACPI notify handlers removed)"]);
    assert_clean_unload(code, &out);
}

/// A refusal that can only come after the unload's own detaches: the controller is still
/// attached at kldunload (its disk held open, so the final `devctl detach` was refused, until
/// the first kldunload returned), and GEOM's event thread is stalled (`--geom-stalled`, as
/// behind another provider's slow taste). The retry's MOD_QUIESCE agrees, newbus's walk (in
/// driver_module_handler's MOD_UNLOAD, before the module's own) detaches the controller and
/// its disk goes to GEOM, but its d_gone cannot run: the module's MOD_UNLOAD
/// gives GEOM's event thread its last chance (a 100 ms sleep, `nvmehpdg`), then refuses with
/// "1 disks still held by GEOM", tears nothing down (no `destroy_dev_drain`, no
/// `taskqueue_free` of the hotplug queue), clears the unloading flag and resumes the hotplug
/// task, which reinstalls the 30 notify handlers MOD_QUIESCE removed. Once d_gone ran, the
/// next kldunload unloads clean. Fails when MOD_UNLOAD takes "newbus detached everything" for
/// "nothing calls us any more" (the module's code would be freed under GEOM's pending d_gone)
/// or leaves the hotplug task paused. (Replaces the fake kernel's
/// `a_refusal_in_mod_unload_restores_the_flag_and_the_task`, lifecycle_tests.rs.)
#[test]
fn a_disk_whose_d_gone_is_pending_makes_mod_unload_refuse_and_resume() {
    let Some(ko) = real_ko("unload_d_gone_pending") else { return };
    let args = ["--qemu", "--acpi", "--tunable", "hw.nvme_hotplug.claim=1", "--geom-stalled", "--hold-open", "nvmehpd0", "--kldunload-retries", "2"];
    let (code, out) = kldhost_run_with(&ko, &args);
    let refused = between(&out, "kldunload again (retry 1)", "GEOM's event thread runs again");
    assert_in_order(
        refused,
        &[
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0",
            // driver_module_handler's MOD_UNLOAD: newbus's detach walk, then the module's own.
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD)",
            "nvmehp0: device_detach_desc ->",
            "disk_gone(nvmehpd0)",
            "nvmehp0: device_detach_desc = 0",
            "pause_sbt(nvmehpdg, 100.000 ms)",
            "printf(\"nvme_hotplug: 1 disks still held by GEOM: not unloading\\n\")",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 16",
            "printf(\"nvme_hotplug: unload refused: ACPI hotplug resumed (30 notify handlers reinstalled)\\n\")",
        ],
    );
    for never in ["d_gone(nvmehpd0)", "destroy_dev_drain(", "taskqueue_free(nvmehp_hotplug)", "nvme_hotplug: unloaded"] {
        assert!(!refused.contains(never), "{never} in the refused unload:\n{refused}");
    }
    assert_eq!(refused.matches("AcpiInstallNotifyHandler(").count(), 30, "{refused}");
    assert_in_order(&out, &["GEOM's event thread runs again", "g_event: d_gone(nvmehpd0)", "kldunload again (retry 2)", "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0"]);
    assert!(console(&out).contains("nvme_hotplug: unloaded (30 ACPI notify handlers removed)"), "{out}");
    assert_clean_unload(code, &out);
}
