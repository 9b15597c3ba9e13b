//! Negative controls for the FreeBSD rules the emulated kernel enforces (src/emu/rules.rs):
//! each a fixture module (tests/fixtures/*.c, built with the FreeBSD 15 headers) that breaks
//! one rule, run by `kldhost run`, which must report it under the rule's id (a finding, exit 1,
//! or a panic, exit 70), next to the correct variant of the same fixture, which must not.
//!
//! And the list itself: every rule kpimodel names is either checked here (with a test in this
//! repository that exists) or marked not applicable with a reason.

mod common;

use common::{assert_in_order, compile, kernel_header_flags, kldhost_run_with, temp_object};
use kldhost::emu::rules::{Coverage, Rule, ALL};
use kldhost::emu::PANIC_EXIT;
use std::path::PathBuf;

/// `tests/fixtures/<source>.c` built with `defines` into a temporary object for `kldhost run`.
fn fixture(test: &str, source: &str, defines: &[&str]) -> Option<PathBuf> {
    let mut flags = kernel_header_flags();
    flags.extend(defines.iter().map(|d| d.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    compile(test, source, &flags).map(|o| temp_object(test, &o))
}

/// Runs a fixture: (exit code, output).
fn run(test: &str, source: &str, defines: &[&str], args: &[&str]) -> Option<(Option<i32>, String)> {
    fixture(test, source, defines).map(|p| kldhost_run_with(&p, args))
}

#[test]
fn every_kpimodel_rule_is_checked_by_kldhost_or_marked_with_a_reason() {
    let root = common::repo_root().join("kldhost");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("kldhost/README.md");
    let mut seen = std::collections::HashSet::new();
    // kldhost's rules are kpimodel's type; Rule::ALL lists every variant (kpimodel's own test).
    for r in Rule::ALL {
        let c = ALL.iter().find(|c| c.rule == r).unwrap_or_else(|| panic!("{r} is not in kldhost::emu::rules::ALL"));
        assert!(c.source.contains("sys/") || c.source.contains("ACPI") || c.source.contains("QEMU"), "{r}: no FreeBSD source named: {}", c.source);
        assert!(readme.contains(&format!("| {r} |")), "{r} has no row in kldhost/README.md's rule table");
        match c.coverage {
            Coverage::Checked { at, test } => {
                // Each `file function` of the check exists.
                for part in at.split("; ") {
                    let mut words = part.split_whitespace();
                    let file = words.next().expect("a file");
                    let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{r}: {file}: {e}"));
                    for f in words.take_while(|w| !w.starts_with('(')) {
                        let f = f.trim_end_matches(',');
                        assert!(text.contains(&format!("fn {f}(")), "{r}: {file} has no fn {f}");
                    }
                }
                // The negative control exists.
                let (file, func) = test.split_once(' ').expect("`file function`");
                let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{r}: {file}: {e}"));
                assert!(text.contains(&format!("fn {func}()")), "{r}: {file} has no test {func}");
            }
            Coverage::NotApplicable(why) => assert!(why.len() > 40, "{r}: say why it cannot apply"),
        }
        assert!(seen.insert(r), "{r} twice in kldhost::emu::rules::ALL");
    }
    assert_eq!(seen.len(), ALL.len(), "kldhost::emu::rules::ALL lists a rule twice");
}

// --- devfs: make_dev_s and destroy_dev ----------------------------------------------------------

#[test]
fn destroying_an_eternal_node_panics() {
    let Some((code, out)) = run("devfs_ok", "devfs_rules", &[], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["make_dev_s(\"kldhost_fixture0\"", "si_drv1 magic 0x4b4c44", "destroy_dev(kldhost_fixture0)", "findings: 0"]);

    let Some((code, out)) = run("devfs_eternal", "devfs_rules", &["-DKLDHOST_ETERNAL"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(&out, &["flags 0x18", "panic: [DestroyEternal] WARNING: Driver mistake: destroy_dev on eternal 0 (kldhost_fixture0)", "kern_conf.c destroy_devl"]);
}

#[test]
fn destroying_a_node_twice_panics() {
    let Some((code, out)) = run("devfs_twice", "devfs_rules", &["-DKLDHOST_DESTROY_TWICE"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(&out, &["destroy_dev(kldhost_fixture0)", "panic: [DoubleDestroy] WARNING: Driver mistake: destroy_dev on 0", "kern_conf.c destroy_devl"]);
}

#[test]
fn a_duplicate_node_name_without_checkname_panics() {
    // Control: with MAKEDEV_CHECKNAME the second make_dev_s returns EEXIST (17).
    let Some((code, out)) = run("devfs_dup_checked", "devfs_rules", &["-DKLDHOST_DUPLICATE", "-DKLDHOST_CHECKNAME"], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["second make_dev_s returned 17", "findings: 0"]);

    let Some((code, out)) = run("devfs_dup", "devfs_rules", &["-DKLDHOST_DUPLICATE"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(&out, &["panic: [DuplicateName] make_dev_sv: bad si_name (error=17, si_name=kldhost_fixture0)", "kern_conf.c make_dev_sv"]);
}

#[test]
fn make_dev_with_waitok_and_nowait_panics() {
    let Some((code, out)) = run("devfs_both", "devfs_rules", &["-DKLDHOST_BOTH_WAIT"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(&out, &["panic: [BadMakeDevFlags] make_dev_sv: both WAITOK and NOWAIT specified", "kern_conf.c make_dev_sv"]);
}

#[test]
fn si_drv1_read_after_destroy_dev_is_null_and_its_use_a_page_fault() {
    let Some((code, out)) = run("devfs_drv1", "devfs_rules", &["-DKLDHOST_DRV1_AFTER"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &[
            "destroy_dev(kldhost_fixture0)",
            "si_drv1 after destroy_dev 0x0",
            "Fatal trap 12: page fault while in kernel mode",
            "fault virtual address\t= 0x0",
            "panic: [DrvThroughDestroyedNode] page fault",
            "destroy_dev(kldhost_fixture0) left si_drv1",
        ],
    );
}

#[test]
fn a_node_left_at_unload_is_a_live_callback() {
    let Some((code, out)) = run("devfs_left", "devfs_rules", &["-DKLDHOST_NO_DESTROY"], &[]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["unloaded: true", "findings: 1", "[UnloadWithLiveCallbacks] after unload: device node kldhost_fixture0 never destroyed"]);
}

#[test]
fn destroy_dev_from_the_nodes_own_d_close_never_returns() {
    // Control: d_close schedules the destruction (destroy_dev_sched_cb), the unload drains it.
    let Some((code, out)) = run("devfs_close_sched", "devfs_rules", &["-DKLDHOST_CLOSE_DESTROYS", "-DKLDHOST_SCHED"], &["--open-nodes"]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["devfs: d_close(kldhost_fixture0)", "destroy_dev_sched_cb(", "destroy_dev(kldhost_fixture0)", "destroy_dev_drain(", "findings: 0"]);

    let Some((code, out)) = run("devfs_close_destroys", "devfs_rules", &["-DKLDHOST_CLOSE_DESTROYS"], &["--open-nodes"]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(&out, &["devfs: d_open(kldhost_fixture0) = 0", "devfs: d_close(kldhost_fixture0)", "panic: [DestroyFromOwnMethod] deadlock: destroy_dev(kldhost_fixture0)", "devdrn"]);
}

// --- freed memory: the poison, traps, armed callbacks --------------------------------------------

#[test]
fn a_callback_through_freed_memory_is_a_fatal_trap_on_the_poison() {
    // Control: the struct is freed only after the task ran (the unload drains first).
    let Some((code, out)) = run("cb_ok", "callback_freed", &[], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["taskqueue kldhost_fixture: run task", "kldhost_fixture: callback with 0x", "findings: 0"]);

    let Some((code, out)) = run("cb_freed", "callback_freed", &["-DKLDHOST_CALL_AFTER_FREE"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &[
            "poisoned with 0xdeadc0de",
            "taskqueue kldhost_fixture: run task",
            "Fatal trap 9: general protection fault while in kernel mode",
            "panic: [CallThroughFreedPointer] general protection fault: call through 0xdeadc0dedeadc0de",
            "uma_dbg.c trash_dtor",
        ],
    );
    assert!(!out.contains("callback with"), "{out}");
}

#[test]
fn a_pointer_read_from_freed_memory_faults_on_the_poison() {
    // Control: the struct freed after the task read through it.
    let Some((code, out)) = run("deref_ok", "callback_freed", &["-DKLDHOST_DEREF"], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["taskqueue kldhost_fixture: run task", "kldhost_fixture: value 42", "findings: 0"]);

    let Some((code, out)) = run("deref_freed", "callback_freed", &["-DKLDHOST_DEREF_AFTER_FREE"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &["taskqueue kldhost_fixture: run task", "Fatal trap 9: general protection fault", "panic: [UseAfterFree] general protection fault: access through 0xdeadc0dedeadc0de", "uma_dbg.c trash_dtor"],
    );
}

#[test]
fn freeing_an_armed_callout_is_a_finding() {
    let Some((code, out)) = run("armed_drained", "callback_freed", &["-DKLDHOST_FREE_ARMED", "-DKLDHOST_DRAIN_FIRST"], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["callout_reset_sbt_on(", "callout_stop_safe(", "(was armed: true)", "free(0x", "findings: 0"]);

    let Some((code, out)) = run("armed_freed", "callback_freed", &["-DKLDHOST_FREE_ARMED"], &[]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["callout_reset_sbt_on(", "free(0x", "findings: 2", "[FreeWhileCallbackArmed] free(0x", "is still armed on this memory", "kern_timeout.c", "[UnloadWithLiveCallbacks] after unload: 1 callouts still armed"]);
}

// --- disk(9) --------------------------------------------------------------------------------------

#[test]
fn a_disk_destroyed_before_d_gone_is_a_finding() {
    // Control: disk_gone, sleep until GEOM's event thread called d_gone, then destroy and free.
    let Some((code, out)) = run("disk_ok", "disk_rules", &[], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["disk_create(kldhostd0", "disk_gone(kldhostd0)", "g_event: d_gone(kldhostd0)", "disk_destroy(kldhostd0) (was GoneDone)", "findings: 0"]);

    let Some((code, out)) = run("disk_destroy_early", "disk_rules", &["-DKLDHOST_DESTROY_BEFORE_GONE"], &[]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["disk_gone(kldhostd0)", "disk_destroy(kldhostd0) (was Gone)", "findings: 1", "[DiskFreedBeforeGone] disk_destroy(kldhostd0) before GEOM called its d_gone", "geom_disk.c"]);

    let Some((code, out)) = run("disk_free_early", "disk_rules", &["-DKLDHOST_FREE_BEFORE_GONE"], &[]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["disk_gone(kldhostd0)", "free(0x", "[DiskFreedBeforeGone] free(0x", "d_drv1 of disk kldhostd0 (Gone: d_gone has not run) is in this memory"]);
}

#[test]
fn disk_gone_twice_is_a_finding() {
    let Some((code, out)) = run("disk_gone_twice", "disk_rules", &["-DKLDHOST_GONE_TWICE"], &[]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["disk_gone(kldhostd0)", "findings: 1", "[DiskDoubleRelease] disk_gone(kldhostd0) on a disk in state Gone"]);
}

// --- taskqueue(9) ----------------------------------------------------------------------------------

#[test]
fn draining_a_task_from_itself_never_returns() {
    // Control: the unloading thread drains it.
    let Some((code, out)) = run("drain_ok", "taskqueue_self", &[], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["kldhost_fixture: task runs", "taskqueue_drain(", "taskqueue_free(kldhost_fixture)", "findings: 0"]);

    for (test, define, call) in [("drain_self", "-DKLDHOST_DRAIN_SELF", "taskqueue_drain(0x"), ("drain_all_self", "-DKLDHOST_DRAIN_ALL", "taskqueue_drain_all on")] {
        let Some((code, out)) = run(test, "taskqueue_self", &[define], &[]) else { return };
        assert_eq!(code, Some(PANIC_EXIT), "{out}");
        assert_in_order(&out, &["taskqueue kldhost_fixture: run task", "panic: [DrainFromOwnTask] deadlock: ", call, "from its own task", "subr_taskqueue.c taskqueue_drain"]);
    }
}

// --- newbus and ACPI hotplug (QEMU: the lab's rule, SKIP without it) -------------------------------

#[test]
fn a_node_left_after_detach_is_a_finding_and_an_orphan() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_pci_node") {
        return;
    }
    // Control: the detach destroys the node its attach made.
    let Some((code, out)) = run("pci_node_ok", "pci_node", &[], &["--qemu"]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["make_dev_s(\"kldhostfx0\"", "destroy_dev(kldhostfx0)", "kldhostfx0: detached", "findings: 0"]);

    let Some((code, out)) = run("pci_node_kept", "pci_node", &["-DKLDHOST_KEEP_NODE"], &["--qemu"]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "make_dev_s(\"kldhostfx0\"",
            "kldhostfx0: detached",
            "findings: 3",
            "[NodeLeftAfterDetach] device_detach(kldhostfx0) returned 0 with node kldhostfx0, made by its attach, still published",
            "[OrphanNode] device_detach(kldhostfx0) frees the softc",
            "node kldhostfx0 is still published with si_drv1",
            "[UnloadWithLiveCallbacks] after unload: device node kldhostfx0 never destroyed",
        ],
    );
}

#[test]
fn detaching_a_deleted_device_t_is_a_use_after_free() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_pci_delete") {
        return;
    }
    // Control: the delete alone.
    let Some((code, out)) = run("pci_delete_ok", "pci_delete", &[], &["--qemu"]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["pci_find_dbsf(0, 0, 4, 0) = 0x", "device_delete_child(pci0, pci0:0:4:0) = 0", "findings: 0"]);

    let Some((code, out)) = run("pci_delete_detach", "pci_delete", &["-DKLDHOST_DETACH_AFTER"], &["--qemu"]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(&out, &["device_delete_child(pci0, pci0:0:4:0) = 0", "panic: [DetachWithoutDevice] device_detach(0x", "use after free of a deleted device_t", "subr_bus.c"]);
}

#[test]
fn removing_a_notify_handler_from_the_acpi_task_never_returns() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_acpi_remove") {
        return;
    }
    // Control: the handler queues the detach and _EJ0; the unload removes it.
    let Some((code, out)) = run("acpi_eject_ok", "acpi_eject", &[], &["--qemu", "--acpi", "--eject"]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "acpi_task: Notify(\\_SB_.PCI0.S04_, 3) to 1 handler(s)",
            "device_delete_child(pci0, pci0:0:4:0) = 0",
            "acpi_SetInteger(\\_SB_.PCI0.S04_, \"_EJ0\", 1) = 0x0",
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S04_",
            "ejected (deleted from pci0, DEVICE_DELETED): true",
            "findings: 0",
        ],
    );

    let Some((code, out)) = run("acpi_remove_in_handler", "acpi_eject", &["-DKLDHOST_REMOVE_IN_HANDLER"], &["--qemu", "--acpi", "--eject"]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &["acpi_task: Notify(\\_SB_.PCI0.S04_, 3)", "panic: [RemoveNotifyFromAcpiTask] deadlock: AcpiRemoveNotifyHandler from a notify handler on the acpi_task thread", "OsdSchedule.c"],
    );
}

#[test]
fn ej0_on_an_attached_device_and_on_an_empty_slot_are_findings() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_acpi_ej0") {
        return;
    }
    let Some((code, out)) = run("acpi_ej0_attached", "acpi_eject", &["-DKLDHOST_EJECT_ATTACHED"], &["--qemu", "--acpi"]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["kldhostfx0: <kldhost fixture>", "acpi_SetInteger(\\_SB_.PCI0.S04_, \"_EJ0\", 1)", "findings: 1", "[EjectAttached] _EJ0 of \\_SB_.PCI0.S04_ while kldhostfx0 is still attached"]);

    let Some((code, out)) = run("acpi_ej0_twice", "acpi_eject", &["-DKLDHOST_EJECT_TWICE"], &["--qemu", "--acpi"]) else { return };
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &["device_delete_child(pci0, pci0:0:4:0) = 0", "kldhost_fixture: _EJ0 0", "kldhost_fixture: _EJ0 again 0", "findings: 1", "[DoubleEject] _EJ0 of \\_SB_.PCI0.S04_, a slot with no device"],
    );
}

/// The real module against the same checks, its nodes opened and closed too: no finding (the
/// negative controls above are only worth something if the shipped `.ko` passes them).
#[test]
fn the_real_modules_nodes_open_and_close_and_it_breaks_no_rule() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_real_open") || common::real_ko("rules_real_open").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--open-nodes"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "make_dev_s(\"nvmehp0ns1\"",
            "devfs: d_open(nvmehp0ns1) = 0",
            "devfs: d_close(nvmehp0ns1) = 0",
            "destroy_dev(nvmehp0ns1)",
            "unloaded: true",
            "findings: 0",
        ],
    );
    assert!(!out.contains("panic:"), "{out}");
}

// --- GEOM: d_gone only after the last close ---------------------------------------------------------

#[test]
fn sleeping_until_d_gone_while_a_consumer_holds_the_disk_open_never_ends() {
    // Control: nobody holds the disk open: d_gone runs during the module's first sleep.
    let Some((code, out)) = run("gone_wait_ok", "disk_rules", &["-DKLDHOST_WAIT_FOREVER"], &[]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["disk_gone(kldhostd0)", "pause_sbt(kldhost", "g_event: d_gone(kldhostd0)", "disk_destroy(kldhostd0) (was GoneDone)", "findings: 0"]);

    let Some((code, out)) = run("gone_wait_held", "disk_rules", &["-DKLDHOST_WAIT_FOREVER"], &["--hold-disks-open"]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &[
            "g_disk_access(kldhostd0, open) -> d_open = 0",
            "disk_gone(kldhostd0)",
            "panic: [WaitForeverForGone] deadlock: the module slept 501 times in a row while d_gone of kldhostd0 is held back",
            "geom_disk.c",
        ],
    );
    assert!(!out.contains("g_event: d_gone(kldhostd0)"), "{out}");
}

/// The real module with its disk held open across the detach: its detach refuses (EBUSY, as
/// nvme_hotplug.4 says) instead of waiting for a d_gone that cannot come.
#[test]
fn the_real_module_refuses_the_detach_of_a_disk_held_open_instead_of_waiting_for_d_gone() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_real_held") || common::real_ko("rules_real_held").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--hold-disks-open"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "g_disk_access(nvmehpd0, open) -> d_open = 0",
            "g_disk_access(nvmehpd0, close): still open 1 times, no d_close",
            "nvmehp0: in use (a node or disk is open): detach refused",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 16",
            "g_disk_access(nvmehpd0, close) (the holding consumer) -> d_close = 0",
            "detach device 4.0 (nvmehp0): 16",
            "unloaded: false",
            "findings: 0",
        ],
    );
    assert!(!out.contains("panic:"), "{out}");
}

#[test]
fn a_task_queued_in_freed_memory_is_found_at_the_free_and_traps_when_the_kernel_runs_it() {
    let Some((code, out)) = run("task_freed", "callback_freed", &["-DKLDHOST_FREE_QUEUED"], &[]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &[
            "taskqueue_enqueue(",
            "free(0x",
            "taskqueue kldhost_fixture: run task",
            "Fatal trap 9: general protection fault while in kernel mode",
            "finding before the panic: [FreeWhileCallbackArmed] free(0x",
            "is still queued on kldhost_fixture",
            "panic: [CallThroughFreedPointer] general protection fault: the kernel called the module through 0xdeadc0dedeadc0de",
        ],
    );
}

// --- stock FreeBSD: acpi_pci's own eject handler on the slot ------------------------------------

/// With acpi_pci on pci0 (`--acpi-pci`) its handler does the eject: detach, `_EJ0`, rescan.
/// The real module only observes, and its detach is the one acpi_pci calls.
#[test]
fn with_acpi_pci_on_the_bus_its_eject_detaches_the_real_module_which_tears_down_clean() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_acpi_pci_eject") || common::real_ko("rules_acpi_pci_eject").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--acpi-pci", "--eject"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "acpi_task: Notify(\\_SB_.PCI0.S04_, 3) to 1 handler(s)",
            "acpi_pci: Notify(\\_SB_.PCI0.S04_, 3)",
            "nvmehp0: detached (announced)",
            "acpi_SetInteger(\\_SB_.PCI0.S04_, \"_EJ0\", 1) = 0x0",
            "BUS_RESCAN(pci0): 00:04.0 is gone: device_delete_child = 0",
            "ejected (deleted from pci0, DEVICE_DELETED): true",
            "unloaded: true",
            "findings: 0",
        ],
    );
}

#[test]
fn a_second_handler_acting_on_a_device_acpi_pci_already_ejected_is_a_double_detach() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_double_detach") {
        return;
    }
    // Control: the fixture's handler runs after acpi_pci's too, but its detach method forgot
    // the device, so its task finds nothing left to do.
    let args = ["--qemu", "--acpi", "--acpi-pci", "--eject"];
    let Some((code, out)) = run("double_detach_ok", "acpi_eject", &[], &args) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["acpi_pci: Notify(\\_SB_.PCI0.S04_, 3)", "kldhostfx0: detached", "BUS_RESCAN(pci0): 00:04.0 is gone", "notify slot 4 value 3: 2 handler(s)", "findings: 0"]);

    let Some((code, out)) = run("double_detach", "acpi_eject", &["-DKLDHOST_STALE_DEV"], &args) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &[
            "acpi_pci: Notify(\\_SB_.PCI0.S04_, 3)",
            "BUS_RESCAN(pci0): 00:04.0 is gone",
            "taskqueue kldhost_fixture: run task",
            "panic: [DoubleDetach] device_get_parent(0x",
            "acpi_pci.c acpi_pci_device_notify_handler",
        ],
    );
}

#[test]
fn destroy_dev_with_a_reader_nobody_wakes_never_returns() {
    // Control: the cdevsw's d_purge wakes the reader, destroy_dev waits for it to leave.
    let Some((code, out)) = run("devfs_reader_purged", "devfs_rules", &["-DKLDHOST_PURGE"], &["--park-readers"]) else { return };
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "devfs: d_read(kldhost_fixture0) on a reader thread",
            "destroy_dev(kldhost_fixture0): d_purge (1 threads inside)",
            "devfs: d_read(kldhost_fixture0) = 0 (the reader thread leaves)",
            "destroy_dev(kldhost_fixture0): the threads in its methods left",
            "destroy_dev(kldhost_fixture0)",
            "findings: 0",
        ],
    );

    let Some((code, out)) = run("devfs_reader_stuck", "devfs_rules", &[], &["--park-readers"]) else { return };
    assert_eq!(code, Some(PANIC_EXIT), "{out}");
    assert_in_order(
        &out,
        &[
            "devfs: d_read(kldhost_fixture0) on a reader thread",
            "panic: [DestroyWaitsForever] deadlock: destroy_dev(kldhost_fixture0) sleeps on \"devdrn\" while 1 thread(s) stay in its methods (no d_purge to wake them)",
            "kern_conf.c destroy_devl",
        ],
    );
}

/// The same with a hot-add after the eject: acpi_pci's device check rescans pci0, which adds,
/// probes and attaches the new controller (the module's hoover bid with claim=1 wins, no
/// nvme(4) here), and its disk does I/O.
#[test]
fn with_acpi_pci_on_the_bus_its_rescan_attaches_a_hot_added_controller_to_the_real_module() {
    if !nvmehp_lab::skip::qemu_or_skip("rules_acpi_pci_hot_add") || common::real_ko("rules_acpi_pci_hot_add").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--acpi-pci", "--eject", "--hot-add", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "acpi_pci: Notify(\\_SB_.PCI0.S04_, 3)",
            "BUS_RESCAN(pci0): 00:04.0 is gone: device_delete_child = 0",
            "acpi_pci: Notify(\\_SB_.PCI0.S05_, 1)",
            "BUS_RESCAN(pci0): added 00:05.0: device_probe_and_attach = 0",
            "hot-added and attached: true; its write and read: ok",
            "unloaded: true",
            "findings: 0",
        ],
    );
}
