//! `kldhost run --qemu --acpi`: the ACPI namespace of QEMU's pc DSDT for the root bus
//! (`\_SB_.PCI0`, slot objects with `_ADR` and `_EJ0`), so the real module's hotplug discovery
//! finds the slots, owns them (no acpi_pci handler: pcib0 answers no ACPI handle for pci0) and
//! installs, then at unload removes, its notify handlers. Needs QEMU (the lab's rule: SKIP
//! without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko or clang-19.

mod common;

use common::{assert_in_order, kldhost_run_with};


#[test]
fn the_real_module_finds_the_slots_owns_them_and_removes_its_handlers_at_unload() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_real") || common::real_ko("acpi_real").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --acpi failed:\n{out}");
    // QEMU's PIIX4 hotplug block marks every slot but 0 (host bridge) and 1 (PIIX4) removable.
    assert!(out.contains("_EJ0 on PCIRMV 0xfffffffc"), "{out}");
    assert_in_order(
        &out,
        &[
            // The hotplug task's discovery: the root bus object, its acpi(4) device (pcib0) and
            // that bridge's pci child, the walk of its Device objects, _EJ0 and _ADR per slot.
            "AcpiGetHandle(0x0, \"\\\\_SB_.PCI0\") = AE_OK",
            "acpi_get_device(",
            "AcpiWalkNamespace(type 6,",
            "visits 32 objects",
            "\"_EJ0\") = AE_OK (\\_SB_.PCI0.S02_._EJ0)",
            "\"_ADR\") = AE_OK (0x20000)",
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S02_, type 1,",
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S1F_, type 1,",
            // The controller in slot 4 is still attached and does I/O.
            "at 8192: the written data; read back: the written data",
            // Unload: each handler removed, then ACPI's queued events waited for.
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S02_, type 1,",
            "AcpiOsWaitEventsComplete()",
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S1F_, type 1,",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "console:",
            "nvme_hotplug: 30 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 30 owned (30 handlers), 0 observed",
            "nvme_hotplug: unloaded (30 ACPI notify handlers removed)",
            "findings: 0",
        ],
    );
    // Slots 0 and 1 have no _EJ0: not hotplug slots, no handler.
    assert!(!out.contains("AcpiInstallNotifyHandler(\\_SB_.PCI0.S00_") && !out.contains("AcpiInstallNotifyHandler(\\_SB_.PCI0.S01_"), "{out}");
    assert_eq!(out.matches("AcpiInstallNotifyHandler(").count(), 30, "{out}");
    assert_eq!(out.matches("AcpiRemoveNotifyHandler(").count(), 30, "{out}");

    // Control: without --acpi the machine has no namespace, and no handler is installed.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("AcpiGetHandle(0x0, \"\\\\_SB_.PCI0\") = AE_NOT_FOUND"), "{out}");
    assert!(!out.contains("AcpiInstallNotifyHandler("), "{out}");
}

fn fixture(test: &str, define: Option<&str>) -> Option<std::path::PathBuf> {
    common::fixture_object(test, "acpi_notify", define)
}

#[test]
fn a_notify_handler_left_installed_at_unload_is_a_finding() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_handler_leak") {
        return;
    }
    // Control: installed once (a second identical install is AE_ALREADY_EXISTS, as ACPICA's
    // AcpiInstallNotifyHandler answers), removed at unload: no finding.
    let Some(good) = fixture("acpi_notify_ok", None) else { return };
    let (code, out) = kldhost_run_with(&good, &["--qemu", "--acpi"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["kldhost_fixture: install 0", "kldhost_fixture: install again 0x7", "kldhost_fixture: remove 0", "findings: 0"]);

    let Some(bad) = fixture("acpi_notify_keep", Some("-DKLDHOST_KEEP_HANDLER")) else { return };
    let (code, out) = kldhost_run_with(&bad, &["--qemu", "--acpi"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["kldhost_fixture: install 0", "findings: 1", "after unload: ACPI notify handler still installed on \\_SB_.PCI0.S05_"]);
}

#[test]
fn an_eject_request_reaches_the_modules_handler_which_detaches_deletes_and_ejects() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_eject") || common::real_ko("acpi_eject").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--eject", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --acpi --eject failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S04_, type 1,",
            "at 8192: the written data; read back: the written data",
            // QEMU's device_del sets PCID and raises the GPE; _E01's AML notifies the slot, the
            // acpi_task thread calls the module's handler, which hands the work to its task.
            "QMP device_del nvme0: ok",
            "acpi_task: Notify(\\_SB_.PCI0.S04_, 3) to 1 handler(s)",
            "taskqueue nvmehp_hotplug: run task",
            // The task finds the function, detaches it (disk_gone, the BAR released), deletes
            // it from pci0, then evaluates _EJ0, which QEMU's AML turns into the PCEJ write.
            "pci_find_dbsf(0, 0, 4, 0) = 0x",
            "nvmehp0: device_detach_desc ->",
            "disk_gone(nvmehpd0)",
            "bus_release_resource(nvmehp0, type 3, rid 0x10) = 0",
            "nvmehp0: device_detach_desc = 0",
            "device_delete_child(pci0, pci0:0:4:0) = 0 (device_t",
            "acpi_SetInteger(\\_SB_.PCI0.S04_, \"_EJ0\", 1) = 0x0",
            "after the eject request: device 4.0 deleted from pci0",
            "QMP: DEVICE_DELETED nvme0: received",
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S04_, type 1,",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "console:",
            "nvmehp0: detached",
            "nvme_hotplug: hotplug run: 0 rescans, 1 detaches (0 stale), 1 ejected, 0 refused, 0 failures, 0 left alone",
            "notify slot 4 value 3: 1 handler(s)",
            "ejected (deleted from pci0, DEVICE_DELETED): true",
            "findings: 0",
        ],
    );
    // The _EJ0 comes after the delete: nothing may touch the function once QEMU removed it.
    let del = out.find("device_delete_child(pci0, pci0:0:4:0)").expect("delete");
    let ej0 = out.find("acpi_SetInteger(\\_SB_.PCI0.S04_, \"_EJ0\"").expect("_EJ0");
    assert!(del < ej0, "{out}");

    // Control: with hw.nvme_hotplug.acpi_mode=off the module installs no handler: the notify
    // reaches nobody, the controller stays attached, QEMU keeps it (no _EJ0), and devctl
    // detach takes it down as usual.
    let (code, out) =
        kldhost_run_with(&ko, &["--qemu", "--acpi", "--eject", "--tunable", "hw.nvme_hotplug.claim=1", "--tunable", "hw.nvme_hotplug.acpi_mode=off"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("AcpiInstallNotifyHandler("), "{out}");
    assert!(!out.contains("acpi_SetInteger("), "{out}");
    assert_in_order(
        &out,
        &[
            "acpi_task: Notify(\\_SB_.PCI0.S04_, 3) to 0 handler(s)",
            "after the eject request: device 4.0 still on pci0",
            "QMP: DEVICE_DELETED nvme0: not received",
            "ejected (deleted from pci0, DEVICE_DELETED): false",
            "detach device 4.0 (nvmehp0): 0",
            "findings: 0",
        ],
    );
}

#[test]
fn a_controller_hot_added_to_an_empty_slot_is_rescanned_attached_and_does_io() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_hot_add") || common::real_ko("acpi_hot_add").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--eject", "--hot-add", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --acpi --eject --hot-add failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "QMP: DEVICE_DELETED nvme0: received",
            // QEMU's device_add sets PCIU and raises the GPE; _E01's AML sends a device check.
            "QMP device_add nvme1 at slot 5: ok",
            "acpi_task: Notify(\\_SB_.PCI0.S05_, 1) to 1 handler(s)",
            "taskqueue nvmehp_hotplug: run task",
            // The module's single-slot rescan: the function read, added to pci0, probed and
            // attached by nvmehp (claim=1's hoover bid), with new nodes and a new disk.
            "pci_read_device(0, 0, 5, 0) = 0x",
            "pci_add_child(pci0, 00:05.0) = device_t 0x",
            "nvmehp0: device_attach_desc ->",
            "make_dev_s(\"nvmehp0\"",
            // The first disk's d_gone ran after its eject: its unit is free again (as nvd(4)
            // reuses units), so the hot-added controller's disk is nvmehpd0 again.
            "disk_create(nvmehpd0:",
            "nvmehp0: device_attach_desc = 0",
            "after the hot-add: device 5.0 attached",
            "g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes)",
            // A new zeroed image: only the new controller's write can put the data there.
            "nvme1-g2-ns1.raw at 8192: the written data; read back: the written data",
            // devctl detach of the new one, then the unload.
            "nvmehp0: device_detach_desc = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "console:",
            "nvme_hotplug: slot \\_SB_.PCI0.S05_: 1 new functions, 1 attached",
            "notify slot 4 value 3: 1 handler(s)",
            "notify slot 5 value 1: 1 handler(s)",
            "ejected (deleted from pci0, DEVICE_DELETED): true",
            "hot-added and attached: true; its write and read: ok",
            "findings: 0",
        ],
    );
}

#[test]
fn a_surprise_removal_is_found_by_the_watchdog_and_torn_down_without_ej0() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_surprise") || common::real_ko("acpi_surprise").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--surprise", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --acpi --surprise failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "at 8192: the written data; read back: the written data",
            // The slot is ejected with no device_del: no GPE, no notify.
            "surprise removal: PCEJ bit 4 written with no device_del: Ok(())",
            // Time passes: the watchdog callout finds the controller gone and asks the hotplug
            // task, which detaches the stale function and deletes it.
            "time passes: callout",
            "taskqueue nvmehp_hotplug: run task",
            "nvmehp0: device_detach_desc ->",
            "disk_gone(nvmehpd0)",
            "nvmehp0: device_detach_desc = 0",
            "device_delete_child(pci0, pci0:0:4:0) = 0",
            "after the surprise removal: device 4.0 deleted from pci0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "console:",
            "nvmehp0: controller lost (controller gone, health Gone)",
            "nvmehp0: detached (device gone)",
            "nvme_hotplug: hotplug run: 0 rescans, 1 detaches (1 stale), 0 ejected, 0 refused, 0 failures, 0 left alone",
            "surprise removal: the function left pci0",
            "findings: 0",
        ],
    );
    // No notify came, and nothing evaluates _EJ0 on a slot that is already empty, nor looks
    // _OST up (nobody asked for an eject; the eject path does, `an_eject_request_during_...`).
    assert!(!out.contains("acpi_task: Notify("), "{out}");
    assert!(!out.contains("acpi_SetInteger("), "{out}");
    assert!(!out.contains("\"_OST\")"), "{out}");
}

#[test]
fn with_acpi_pci_on_the_bus_stock_freebsd_the_module_observes_the_slots() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_stock") || common::real_ko("acpi_stock").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--acpi-pci", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --acpi --acpi-pci failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "acpi_pci: pci0 has ACPI handle \\_SB_.PCI0; its notify handler installed on 30 slots",
            "MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0",
            "console:",
            // acpi_get_handle(pci0) is non-NULL: acpi_pci's unremovable handler is there, so
            // acpi_mode=auto observes every slot and installs nothing.
            "nvme_hotplug: acpi_pci handles these slots (its handler cannot be removed)",
            "nvme_hotplug: 30 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 0 owned (0 handlers), 30 observed",
            "nvme_hotplug: unloaded (0 ACPI notify handlers removed)",
            // acpi_pci's handlers are the kernel's: not a leak of the module's.
            "findings: 0",
        ],
    );
    assert!(!out.contains("AcpiInstallNotifyHandler("), "{out}");
}

#[test]
fn writes_in_flight_at_a_surprise_removal_end_on_the_medium_or_with_enxio() {
    if !nvmehp_lab::skip::qemu_or_skip("acpi_in_flight") || common::real_ko("acpi_in_flight").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    // A 16-entry I/O queue: 15 trackers, so of 24 writes sent at once 9 wait in the driver's
    // bio queue, which the controller never sees before it vanishes.
    let (code, out) = kldhost_run_with(
        &ko,
        &["--qemu", "--acpi", "--surprise", "--in-flight", "24", "--tunable", "hw.nvme_hotplug.claim=1", "--tunable", "hw.nvme_hotplug.io_entries=16"],
    );
    assert_eq!(code, Some(0), "kldhost run --qemu --acpi --surprise --in-flight 24 failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "g_down: 24 bios to d_strategy(nvmehpd0) without waiting",
            "surprise removal: PCEJ bit 4 written with no device_del: Ok(())",
            "time passes: callout",
            // The watchdog finds the controller gone: what it had not completed fails.
            "biodone(",
            "error 6, flags 0x3",
            "after the surprise removal: device 4.0 deleted from pci0",
            "g_up: 24 of 24 bios done",
            // The consumer closes once its writes ended; only then does GEOM call d_gone.
            "g_disk_access(nvmehpd0, close) -> d_close = 0",
            "g_event: d_gone(nvmehpd0)",
            "console:",
            "1 I/O queue(s) x 16 entries",
            "nvmehp0: controller lost (controller gone, health Gone): ",
            "nvmehp0: detached (device gone)",
            "writes in flight at the surprise removal: ",
            "findings: 0",
        ],
    );
    let line = out.lines().find(|l| l.starts_with("writes in flight at the surprise removal: ")).expect("the in-flight line");
    let nums: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    let [done, lost, enxio, other, never] = nums[..] else { panic!("{line}") };
    assert_eq!((done + enxio, lost, other, never), (24, 0, 0, 0), "{line}");
    // At least the bio queue's 9 can only have ended by the driver's detection.
    assert!(enxio >= 9, "{line}");
    // As many as the module says it failed: when it found the controller lost, and at detach.
    let count_after = |tag: &str| out.lines().find_map(|l| l.split_once(tag).and_then(|(_, r)| r.split(' ').next()?.parse::<usize>().ok()));
    let lost = count_after("nvmehp0: controller lost (controller gone, health Gone): ").expect("controller lost line");
    let at_detach = count_after("nvmehp0: detached (device gone): ").expect("detached line");
    assert_eq!(lost + at_detach, enxio, "{out}");
    // Each ended exactly once, and every ENXIO came before the detach tore the interrupt
    // down (the teardown fails what waits before it drains anything). With the fake kernel's
    // `teardown_fails_queued_bios_with_enxio_exactly_once`, which this replaces.
    let after = &out[out.find("surprise removal: PCEJ bit 4 written").expect("the removal")..];
    let done: Vec<&str> = after.lines().filter_map(|l| l.trim().strip_prefix("biodone(")).collect();
    let mut bios: Vec<&str> = done.iter().map(|d| d.split(')').next().unwrap_or_default()).collect();
    let failed = done.iter().filter(|d| d.contains("): error 6, ")).count();
    assert_eq!(failed, enxio, "{after}");
    bios.sort_unstable();
    let n = bios.len();
    bios.dedup();
    assert_eq!(bios.len(), n, "a bio completed twice:\n{after}");
    let teardown = after.find("bus_teardown_intr(nvmehp0").expect("the detach's interrupt teardown");
    assert!(!after[teardown..].contains("): error 6, "), "a bio failed after the interrupt was torn down:\n{after}");
}

/// A disk's unit comes back only with its d_gone, as nvd(4)'s does (nvd_gonecb takes the disk
/// off the list nvd_new_disk picks the lowest free unit from): a surprise-removed controller's
/// disk that a process still holds open keeps nvmehpd0 (GEOM keeps its provider until the last
/// close), so the controller hot-added meanwhile gets nvmehpd1, never a second nvmehpd0; the
/// held one's d_gone runs after the holder's close, when the first kldunload (refused: busy)
/// returned, and the retry unloads clean. The hot-add test above is the other half: once
/// d_gone ran, the next disk is nvmehpd0 again. Replaces the fake kernel's
/// `a_disk_unit_is_reused_only_after_its_d_gone`. Fails with the unit given back at
/// disk_gone (src/freebsd/kernel.rs `disk_gone`) instead of in d_gone.
#[test]
fn a_disk_held_open_keeps_its_unit_until_its_d_gone() {
    let Some(ko) = common::real_ko_on_qemu("acpi_unit_held") else { return };
    let (code, out) = kldhost_run_with(
        &ko,
        &["--qemu", "--acpi", "--surprise", "--hot-add", "--hold-disks-open", "--kldunload-retries", "1", "--tunable", "hw.nvme_hotplug.claim=1"],
    );
    assert_in_order(
        &out,
        &[
            "disk_create(nvmehpd0:",
            "surprise removal: PCEJ bit 4 written with no device_del",
            "disk_gone(nvmehpd0)",
            "after the surprise removal: device 4.0 deleted from pci0",
            "QMP device_add nvme1 at slot 5: ok",
            "disk_create(nvmehpd1:",
            "nvme1-g2-ns1.raw at 8192: the written data; read back: the written data",
            "kldunload: pci/nvme_hotplug refused MOD_QUIESCE: error 16",
            "g_disk_access(nvmehpd0, close) (the holding consumer) -> d_close = 0",
            "g_event: d_gone(nvmehpd0)",
            "kldunload again (retry 1)",
        ],
    );
    assert_eq!(out.matches("disk_create(").count(), 2, "{out}");
    assert_eq!(out.matches("g_event: d_gone(nvmehpd0)").count(), 1, "{out}");
    assert_in_order(
        common::console(&out),
        &["nvmehp0: detached (device gone)", "nvme_hotplug: slot \\_SB_.PCI0.S05_: 1 new functions, 1 attached", "nvme_hotplug: busy (a node or disk is open): not unloading", "nvme_hotplug: unloaded"],
    );
    common::assert_clean_unload(code, &out);
}

/// A second eject request for slot 4 arriving while the module's task is in the middle of the
/// first (`--in-sleep nvmehpst=notify:4:3`: acpi_task's Notify while the eject's stop sleeps
/// on its 30 ms Delete I/O SQ): the handler, on acpi_task, only records the request and queues
/// the task (its own mutex, `taskqueue_enqueue`; no newbus, ACPI or device call); the first
/// run detaches, deletes and evaluates `_EJ0` once; the task's second run finds the slot empty
/// and, as the eject state machine's first rule says (src/hotplug/machine.rs), counts a failure
/// without a detach or `_EJ0` (a second `_EJ0` on the empty slot would be a DoubleEject
/// finding); at unload each handler is removed and acpi_task's queued work waited for
/// (`AcpiOsWaitEventsComplete`) before any node is drained or the task queue freed. With
/// `an_eject_request_reaches_...` above this replaces the fake kernel's
/// `module_load_eject_and_unload_through_the_freebsd_glue`, but for its `_OST` order, which
/// QEMU's slots (no `_OST`) cannot show. Fails with the empty-slot rule dropped (the second
/// run then evaluates `_EJ0` again).
#[test]
fn an_eject_request_during_the_eject_is_only_queued_and_ejects_nothing_more() {
    let Some(ko) = common::real_ko_on_qemu("acpi_eject_twice") else { return };
    let (code, out) = kldhost_run_with(
        &ko,
        &["--qemu", "--acpi", "--eject", "--device-fault", "admin-latency=30", "--in-sleep", "nvmehpst=notify:4:3", "--tunable", "hw.nvme_hotplug.claim=1"],
    );
    let in_handler = common::between(
        &out,
        "kldhost: in sleep 1 on nvmehpst, another thread: acpi_task: Notify(slot 4, 3)",
        "kldhost: in sleep 1 on nvmehpst, another thread: the notify reached 1 handler(s)",
    );
    let calls: Vec<&str> = in_handler.lines().skip(1).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("mtx_lock(nvmehp pending)") && !l.starts_with("mtx_unlock(nvmehp pending)")).collect();
    assert_eq!(calls.len(), 2, "the handler did more than record and queue:\n{in_handler}");
    assert!(calls[0].starts_with("acpi_task: Notify(\\_SB_.PCI0.S04_, 3) to 1 handler(s)") && calls[1].starts_with("taskqueue_enqueue("), "{in_handler}");
    assert_in_order(
        &out,
        &[
            "acpi_task: Notify(\\_SB_.PCI0.S04_, 3) to 1 handler(s)",
            "nvmehp0: device_detach_desc ->",
            "kldhost: in sleep 1 on nvmehpst, another thread: the notify reached 1 handler(s)",
            "nvmehp0: device_detach_desc = 0",
            "device_delete_child(pci0, pci0:0:4:0) = 0",
            "acpi_SetInteger(\\_SB_.PCI0.S04_, \"_EJ0\", 1) = 0x0",
            "taskqueue nvmehp_hotplug: run task",
            "after the eject request: device 4.0 deleted from pci0",
            "console:",
            "nvme_hotplug: hotplug run: 0 rescans, 1 detaches (0 stale), 1 ejected, 0 refused, 0 failures, 0 left alone",
            "nvme_hotplug: hotplug run: 0 rescans, 0 detaches (0 stale), 0 ejected, 0 refused, 1 failures, 0 left alone",
        ],
    );
    assert_eq!(out.matches("acpi_SetInteger(").count(), 1, "{out}");
    assert_eq!(out.matches("device_delete_child(").count(), 1, "{out}");
    // The eject path looks _OST up (QEMU's slots have none): the sweep below must not.
    assert!(out.contains("\"_OST\") = AE_NOT_FOUND"), "{out}");
    let unload = common::between(&out, "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE)", "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0");
    let waited = unload.rfind("AcpiOsWaitEventsComplete()").expect("acpi_task's work waited for");
    let removed = unload.rfind("AcpiRemoveNotifyHandler(").expect("the handlers removed");
    assert!(removed < waited, "{unload}");
    for later in ["destroy_dev_drain(", "taskqueue_free(nvmehp_hotplug)"] {
        let at = unload.find(later).unwrap_or_else(|| panic!("no {later} in the unload:\n{unload}"));
        assert!(waited < at, "{later} before acpi_task's work was waited for:\n{unload}");
    }
    common::assert_clean_unload(code, &out);
}

/// A controller the module gives up while it is still present (`io-stall=2` holds the read's
/// doorbell, a 1 s command timeout: `controller lost (timed out, health Healthy)`) asks the
/// hotplug task for the same quiet slot check as a vanished one (the surprise test above);
/// with the function still in config space that check detaches, deletes and ejects nothing,
/// and looks no `_OST` up. (`--read-in-flight` comes with `--surprise`: the slot is emptied
/// afterwards, and since the given-up controller's watchdog no longer runs and the fallback
/// rescan is off, nothing notices until the runner's `devctl detach`, which finds the device
/// gone.) With the surprise test this replaces the fake kernel's
/// `a_vanished_controller_is_swept_without_ej0_or_ost`. Fails with the check taking a
/// present function for stale (src/hotplug/machine.rs `check`).
#[test]
fn a_lost_controller_still_present_is_left_alone_by_the_slot_check() {
    let Some(ko) = common::real_ko_on_qemu("acpi_lost_present") else { return };
    let (code, out) = kldhost_run_with(
        &ko,
        &[
            "--qemu", "--acpi", "--surprise", "--read-in-flight", "--device-fault", "io-stall=2",
            "--tunable", "hw.nvme_hotplug.claim=1", "--tunable", "hw.nvme_hotplug.cmd_timeout_ms=1000",
        ],
    );
    let present = common::between(
        &out,
        "device_printf(\"nvmehp0: controller lost (timed out, health Healthy)",
        "surprise removal: PCEJ bit 4 written with no device_del",
    );
    assert!(present.contains("taskqueue nvmehp_hotplug: run task"), "the lost controller's slot was not checked:\n{present}");
    for never in ["device_detach_desc", "device_delete_child(", "acpi_SetInteger(", "\"_OST\")"] {
        assert!(!present.contains(never), "{never} on a slot whose controller is still present:\n{present}");
    }
    assert!(out.contains("read in flight: done, error 5"), "{out}");
    assert!(out.contains("detach device 4.0 (nvmehp0): 0") && common::console(&out).contains("nvmehp0: detached (device gone)"), "{out}");
    common::assert_clean_unload(code, &out);
}

/// Stock FreeBSD: pci0 is acpi_pci's, whose handler is on every slot, so `acpi_mode=auto`
/// observes them. The module's controller in slot 4 vanishes (`--surprise`); its watchdog finds
/// it lost and asks for a quiet check, and the fallback check (`rescan_interval_ms=100`) runs
/// many more while the runner waits: none detaches or deletes the stale controller, adds a
/// function, evaluates `_EJ0` or `_OST` (acpi_pci's eject or BUS_RESCAN does that, and a delete
/// of ours could race pci_rescan_method's list of children), and the finding is said once, not
/// at every check. The runner's surprise step is then NOT done (nothing swept it) and its
/// final `devctl detach` tears it down. Fails when the observer rule is lost (the check sweeps
/// the slot as on an owned one) or the message repeats. (Replaces the fake kernel's
/// `a_slot_observed_by_acpi_pci_is_not_swept`, glue_tests.rs.)
#[test]
fn a_lost_controller_on_a_slot_acpi_pci_handles_is_left_alone_and_said_once() {
    let Some(ko) = common::real_ko_on_qemu("acpi_observed_lost") else { return };
    let args = ["--qemu", "--acpi", "--acpi-pci", "--tunable", "hw.nvme_hotplug.claim=1", "--tunable", "hw.nvme_hotplug.rescan_interval_ms=100", "--surprise"];
    let (code, out) = kldhost_run_with(&ko, &args);
    assert!(out.contains("(acpi_mode=auto): 0 owned (0 handlers), 30 observed") && out.contains("fallback rescan on"), "{out}");
    assert!(out.contains("running: safe detach of nvmehp controllers") && out.contains("not running: _OST"), "{out}");
    let lost = common::between(&out, "step Io: done", "step Surprise {");
    assert!(lost.contains("nvmehp0: controller lost (controller gone"), "{lost}");
    let runs = lost.matches("taskqueue nvmehp_hotplug: run task").count();
    assert!(runs >= 2, "the hotplug task checked the slots {runs} times:\n{lost}");
    let said = "slot \\\\_SB_.PCI0.S04_: its device is gone; left alone (acpi_pci handles this slot)";
    assert_eq!(lost.matches(&format!("printf(\"nvme_hotplug: {said}")).count(), 1, "said once in {runs} checks:\n{lost}");
    for never in ["device_detach_desc", "device_delete_child(", "pci_read_device(", "pci_add_child(", "acpi_SetInteger(", "\"_OST\""] {
        assert!(!lost.contains(never), "{never} on an observed slot:\n{lost}");
    }
    assert!(out.contains("step Surprise { slot: 4, id: \"nvme0\", in_flight: 0 }: NOT done"), "{out}");
    // The surprise step is NOT done on purpose; `kldhost run`'s status ignores the steps.
    common::assert_clean_unload(code, &out);
}
