//! `--fail FUNC[:N][=ERR]` on the real module: each injected KPI failure makes its attach or
//! load fail or degrade exactly as the driver says it does (its device_printf / printf lines,
//! src/freebsd/*.rs), and the run still ends clean: no finding (which covers every
//! allocation never freed, a node or disk left, a resource or interrupt a detached driver left,
//! a taskqueue or mutex left), the module unloaded, or EBUSY where that is its contract.
//!
//! Each test also asserts the call log's `kldhost: injected ...` line and the console line
//! only the failure path prints, so an ignored injection fails it. Needs QEMU (SKIP without it,
//! a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, console, kldhost_run_with, real_ko_on_qemu as real_ko, between, assert_clean_unload};


/// What MOD_LOAD did (up to the taskqueue threads' first run).
fn mod_load(out: &str) -> &str {
    between(out, "MOD_EVENT(pci/nvme_hotplug, MOD_LOAD)", "taskqueue threads ran")
}

/// A failed start of the hotplug machinery at MOD_LOAD: the module loads anyway (MOD_LOAD
/// cannot fail the load), says so, and leaves no queue, thread, callout or task of it behind;
/// the driver still works and the module unloads with nothing left (the hotplug state freed:
/// a leak would be a finding). Replaces the fake kernel's `a_failed_load_leaves_nothing_behind`.
fn assert_loaded_without_hotplug(code: Option<i32>, out: &str) {
    let load = mod_load(out);
    assert!(load.contains("MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0"), "{load}");
    let made = load.lines().filter(|l| l.contains("taskqueue_create(") && !l.ends_with(") = NULL")).count();
    assert_eq!(load.matches("taskqueue_free(").count(), made, "every queue made at MOD_LOAD is freed again:\n{load}");
    for never in ["callout_reset_sbt_on(", "taskqueue_enqueue(", "taskqueue_enqueue_timeout_sbt("] {
        assert!(!load.contains(never), "{never} at a failed MOD_LOAD:\n{load}");
    }
    assert_in_order(
        console(out),
        &["nvme_hotplug: cannot start the hotplug task queue (12): ACPI hotplug disabled", "nvmehp0: attached: /dev/nvmehp0", "nvme_hotplug: unloaded (no hotplug machinery)"],
    );
    // No discovery: not one ACPI handler installed although the namespace has 30 slots.
    assert!(!out.contains("AcpiInstallNotifyHandler("), "{out}");
    assert_attached_with_io(out);
    assert_clean_unload(code, out);
}

/// The attach failed with `errno` and left nothing: no node, no disk.
fn assert_attach_failed(out: &str, errno: i32) {
    assert!(console(out).contains(&format!("device_attach: nvmehp0 attach returned {errno}")), "attach did not fail with {errno}:\n{out}");
    assert!(out.contains(&format!("attach device 4.0 (nvmehp0): {errno}")), "{out}");
    assert!(out.contains("nodes after attach: []; disks: []"), "a node or disk made by the failed attach:\n{out}");
    assert!(!console(out).contains("attached: /dev/nvmehp0"), "{out}");
}

/// The attach succeeded and the disk's write and read went through.
fn assert_attached_with_io(out: &str) {
    assert!(console(out).contains("nvmehp0: attached: /dev/nvmehp0 and 1 namespace node(s) with disks nvmehpd*"), "{out}");
    assert!(out.contains("io data in the backing file and read back: ok"), "the I/O failed:\n{out}");
}

#[test]
fn make_dev_s_failing_for_the_controller_node_fails_the_attach_with_its_error() {
    let Some(ko) = real_ko("fail_make_dev_s") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "make_dev_s:1=EEXIST"]);
    assert_in_order(
        &out,
        &[
            "kldhost: injected EEXIST into make_dev_s (call 1)",
            "make_dev_s(\"nvmehp0\") = 17",
            // Nothing else is made; what was (interrupt, callout, queue, engine) is torn down.
            "bus_teardown_intr(nvmehp0, irq rid 1) = 0",
        ],
    );
    assert!(!out.contains("make_dev_s(\"nvmehp0ns1\""), "a namespace node after the controller's failed:\n{out}");
    assert_in_order(console(&out), &["nvmehp0: interrupt: MSI-X", "nvmehp0: attach failed (errno 17); tearing down what was set up", "device_attach: nvmehp0 attach returned 17"]);
    assert_attach_failed(&out, 17);
    assert_clean_unload(code, &out);
}

/// The namespace's node refused (`make_dev_s` call 2, after the controller node was made):
/// the attach fails with that error, and the node already made is destroyed with the rest
/// (no orphan node: every `make_dev_s` that succeeded has its `destroy_dev`), no disk is
/// created. With `nomem.rs` (every allocation failing in turn) this is the `.ko`'s side of the
/// fake kernel's `a_failed_attach_tears_down_what_was_made_and_leaves_no_node`, whose refusals
/// inside the Rust glue (a duplicate namespace, a disk never staged) stay there.
#[test]
fn make_dev_s_failing_for_the_namespace_node_destroys_the_controller_node_too() {
    let Some(ko) = real_ko("fail_make_dev_s_ns") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "make_dev_s:2=EEXIST"]);
    assert_in_order(
        &out,
        &["make_dev_s(\"nvmehp0\", ", ") = 0", "kldhost: injected EEXIST into make_dev_s (call 2)", "make_dev_s(\"nvmehp0ns1\") = 17", "destroy_dev(nvmehp0)"],
    );
    let made = out.lines().filter(|l| l.trim_start().starts_with("make_dev_s(") && l.ends_with(") = 0")).count();
    assert_eq!(made, 1, "{out}");
    assert_eq!(out.lines().filter(|l| l.trim_start().starts_with("destroy_dev(")).count(), made, "a node made and never destroyed:\n{out}");
    assert!(!out.contains("disk_create("), "a disk for a namespace without its node:\n{out}");
    assert_in_order(console(&out), &["nvmehp0: attach failed (errno 17); tearing down what was set up", "device_attach: nvmehp0 attach returned 17"]);
    assert_attach_failed(&out, 17);
    assert_clean_unload(code, &out);
}

#[test]
fn bus_setup_intr_failing_fails_the_attach_and_releases_the_vector() {
    let Some(ko) = real_ko("fail_bus_setup_intr") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "bus_setup_intr"]);
    assert_in_order(&out, &["kldhost: injected EINVAL into bus_setup_intr (call 1)", "bus_setup_intr(nvmehp0, irq rid 1, flags 0x202) = 22 (no handler)", "pci_release_msi(nvmehp0)"]);
    assert!(!console(&out).contains("interrupt: MSI-X"), "{out}");
    assert_in_order(
        console(&out),
        &["nvmehp0: cannot set up an interrupt: 22", "nvmehp0: attach failed (errno 6); tearing down what was set up", "device_attach: nvmehp0 attach returned 6"],
    );
    assert_attach_failed(&out, 6);
    assert_clean_unload(code, &out);
}

#[test]
fn bar0_not_allocated_fails_the_attach_before_touching_the_controller() {
    let Some(ko) = real_ko("fail_bus_alloc_resource") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "bus_alloc_resource:1"]);
    assert_in_order(&out, &["kldhost: injected NULL into bus_alloc_resource (call 1)", "bus_alloc_resource(nvmehp0, type 3, rid 0x10) = NULL (nothing allocated)"]);
    // No register read, bus mastering never turned on, no interrupt asked for.
    for never in ["bus_read_4(nvmehp0", "pci_enable_busmaster(nvmehp0)", "pci_alloc_msix(nvmehp0"] {
        assert!(!out.contains(never), "{never} after BAR0 was refused:\n{out}");
    }
    assert_in_order(console(&out), &["nvmehp0: cannot allocate BAR0 (memory resource rid 0x10)", "device_attach: nvmehp0 attach returned 6"]);
    assert_attach_failed(&out, 6);
    assert_clean_unload(code, &out);
}

#[test]
fn pci_alloc_msix_failing_makes_the_driver_fall_back_to_intx_and_its_io_works() {
    let Some(ko) = real_ko("fail_pci_alloc_msix") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "pci_alloc_msix"]);
    assert_in_order(
        &out,
        &[
            "kldhost: injected ENXIO into pci_alloc_msix (call 1)",
            "pci_alloc_msix(nvmehp0, 1) = 6 (MSI-X not enabled)",
            "bus_setup_intr(nvmehp0, irq rid 0, flags 0x202) = 0 (INTx on GSI 11, level-triggered)",
            // The bios complete through the INTx handler.
            "nvmehp0: interrupt (IRQ rid 0, INTx on GSI 11)",
        ],
    );
    assert!(console(&out).contains("nvmehp0: interrupt: INTx"), "{out}");
    assert_attached_with_io(&out);
    assert_clean_unload(code, &out);
}

#[test]
fn bus_dma_tag_create_failing_fails_the_attach_with_enomem() {
    let Some(ko) = real_ko("fail_bus_dma_tag_create") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "bus_dma_tag_create"]);
    assert_in_order(&out, &["kldhost: injected ENOMEM into bus_dma_tag_create (call 1)", "= 12 (*dmat = NULL)"]);
    assert_in_order(
        console(&out),
        &["nvmehp0: out of memory for the 255 I/O trackers (busdma tag and maps); not attaching", "device_attach: nvmehp0 attach returned 12"],
    );
    assert_attach_failed(&out, 12);
    assert_clean_unload(code, &out);
}

#[test]
fn the_hotplug_taskqueue_not_created_leaves_a_module_without_acpi_hotplug_whose_driver_works() {
    let Some(ko) = real_ko("fail_taskqueue_create") else { return };
    // Call 1 is MOD_LOAD's hotplug queue.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "taskqueue_create:1"]);
    assert_in_order(mod_load(&out), &["kldhost: injected NULL into taskqueue_create (call 1)", "taskqueue_create(nvmehp_hotplug, ", ") = NULL"]);
    assert_loaded_without_hotplug(code, &out);
}

#[test]
fn the_hotplug_taskqueue_without_its_thread_is_freed_and_the_module_runs_without_acpi_hotplug() {
    let Some(ko) = real_ko("fail_taskqueue_start_threads_load") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "taskqueue_start_threads:1"]);
    assert_in_order(
        mod_load(&out),
        &["kldhost: injected ENOMEM into taskqueue_start_threads (call 1)", "\"nvmehp_hotplug\") = 12 (no thread)", "taskqueue_free(nvmehp_hotplug)"],
    );
    assert!(console(&out).contains("_taskqueue_start_threads: no memory for nvmehp_hotplug threads"), "{out}");
    assert_loaded_without_hotplug(code, &out);
}

#[test]
fn the_controllers_taskqueue_without_its_thread_fails_the_attach_and_is_freed() {
    let Some(ko) = real_ko("fail_taskqueue_start_threads") else { return };
    // Call 1 is MOD_LOAD's hotplug queue, call 2 the controller's.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "taskqueue_start_threads:2"]);
    assert_in_order(
        &out,
        &["kldhost: injected ENOMEM into taskqueue_start_threads (call 2)", "\"nvmehp_ctrl\") = 12 (no thread)", "taskqueue_free("],
    );
    // FreeBSD's own message, the driver's, then newbus's.
    assert_in_order(
        console(&out),
        &[
            "_taskqueue_start_threads: no memory for nvmehp_ctrl threads",
            "nvmehp0: cannot create the controller's task queue (error 12); not attaching",
            "device_attach: nvmehp0 attach returned 12",
        ],
    );
    assert_attach_failed(&out, 12);
    assert_clean_unload(code, &out);
}

#[test]
fn a_notify_handler_not_installed_leaves_its_slot_out_and_the_rest_served() {
    let Some(ko) = real_ko("fail_acpi_install") else { return };
    // Call 3: slot S04_ (S00_ and S01_ have no _EJ0; S02_, S03_ come first).
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "AcpiInstallNotifyHandler:3"]);
    assert!(out.contains("kldhost: injected AE_NO_MEMORY into AcpiInstallNotifyHandler (call 3)"), "{out}");
    assert_in_order(
        console(&out),
        &[
            "nvme_hotplug: cannot install notify handler on \\_SB_.PCI0.S04_: AE_NO_MEMORY",
            "nvme_hotplug: 30 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 30 owned (29 handlers), 0 observed",
            "nvme_hotplug: unloaded (29 ACPI notify handlers removed)",
        ],
    );
    assert_attached_with_io(&out);
    assert_clean_unload(code, &out);
}

#[test]
fn a_notify_handler_that_will_not_go_refuses_the_unload_with_ebusy_and_a_second_kldunload_succeeds() {
    let Some(ko) = real_ko("fail_acpi_remove") else { return };
    let refusal = [
        "nvme_hotplug: AcpiRemoveNotifyHandler(\\_SB_.PCI0.S03_) failed: ACPI status 0x0006",
        "nvme_hotplug: 1 ACPI notify handlers still installed: not unloading",
        "nvme_hotplug: unload refused: ACPI hotplug resumed (29 notify handlers reinstalled)",
    ];
    // The module's contract: MOD_QUIESCE answers EBUSY, the file stays loaded (exit status 1).
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "AcpiRemoveNotifyHandler:2"]);
    assert!(out.contains("kldhost: injected AE_NOT_EXIST into AcpiRemoveNotifyHandler (call 2)"), "{out}");
    assert_in_order(console(&out), &refusal);
    assert!(out.contains("MOD_QUIESCE: Some(16), MOD_UNLOAD: None, unloaded: false"), "{out}");
    assert_eq!(code, Some(1), "{out}");
    // kldunload again: the kept handler and the 29 reinstalled all go, and nothing is left.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "AcpiRemoveNotifyHandler:2", "--kldunload-retries", "1"]);
    assert_in_order(&out, &["kldunload: pci/nvme_hotplug refused MOD_QUIESCE: error 16", "kldunload again (retry 1)"]);
    // The refused unload tore nothing down: the module's queue and nodes stay until the retry.
    let refused = between(&out, "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE)", "kldunload again (retry 1)");
    for never in ["taskqueue_free(", "destroy_dev_drain(", "MOD_UNLOAD"] {
        assert!(!refused.contains(never), "{never} in a refused unload:\n{refused}");
    }
    assert_eq!(refused.matches("  AcpiRemoveNotifyHandler(").count(), 30, "each handler's removal tried once:\n{refused}");
    let mut wanted = refusal.to_vec();
    wanted.push("nvme_hotplug: unloaded (30 ACPI notify handlers removed)");
    assert_in_order(console(&out), &wanted);
    assert_clean_unload(code, &out);
}

/// A handler bus_teardown_intr could not remove stays installed and may still run: the driver
/// keeps what it reaches (the controller's memory, its MSI-X vector, BAR0 with the table: it
/// releases neither) and refuses every kldunload, since the handler is its code. pci(4) then
/// takes the IRQ resource and BAR0 back at BUS_CHILD_DETACHED (its "Device leaked" lines), not
/// the vector (pci_release_msi refuses while the handler is counted). A late MSI-X message
/// after the detach runs the handler on the kept memory: no fault, no finding. The module stays
/// loaded with its memory, which is no leak.
#[test]
fn an_interrupt_that_cannot_be_torn_down_keeps_its_vector_and_memory_and_refuses_every_unload() {
    let Some(ko) = real_ko("fail_bus_teardown_intr") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "bus_teardown_intr", "--late-msix", "--kldunload-retries", "1"]);
    assert_in_order(
        &out,
        &[
            "kldhost: injected EINVAL into bus_teardown_intr (call 1)",
            "bus_teardown_intr(nvmehp0, irq rid 1) = 22 (handler still installed and called, MSI-X vector still unmasked)",
        ],
    );
    // From the failed teardown to the end of DEVICE_DETACH the driver gives back none of it.
    let detach = between(&out, "kldhost: injected EINVAL into bus_teardown_intr", "nvmehp0: device_detach_desc = 0");
    for never in ["pci_release_msi(nvmehp0)", "bus_release_resource(nvmehp0, type 1", "bus_release_resource(nvmehp0, type 3, rid 0x10)", "bus_teardown_intr(nvmehp0, irq rid 1) = 0"] {
        assert!(!detach.contains(never), "{never} after the failed teardown:\n{detach}");
    }
    // The nodes go all the same: only what the handler can reach is kept.
    assert_in_order(detach, &["destroy_dev(nvmehp0ns1)", "destroy_dev(nvmehp0)"]);
    assert!(out.contains("detach device 4.0 (nvmehp0): 0"), "{out}");
    // pci(4)'s pci_child_detached: the vector stays (the handler is still counted).
    assert_in_order(
        &out,
        &[
            "nvmehp0: device_detach_desc = 0",
            "nvmehp0: the handler on irq rid 1 stays installed after its bus_teardown_intr failed (22)",
            "pci_release_msi(nvmehp0) = EBUSY",
            "bus_release_resource(nvmehp0, type 3, rid 0x10) = 0",
        ],
    );
    // The late message runs the handler, which locks the kept controller state and returns.
    let late = between(&out, "nvmehp0: MSI-X message on table entry 0", "late MSI-X messages: 1 interrupt handlers ran");
    assert_in_order(late, &["nvmehp0: interrupt (IRQ rid 1, MSI-X table entry 0)", "mtx_lock(nvmehp ctrl)", "mtx_unlock(nvmehp ctrl)"]);
    assert_in_order(
        console(&out),
        &[
            "nvmehp0: interrupt: MSI-X",
            "nvmehp0: bus_teardown_intr failed: 22; leaking the handler",
            "nvmehp0: interrupt handler still installed: keeping the controller's memory",
            "pci0:0:4:0: Device leaked IRQ resources",
            "pci0:0:4:0: Device leaked MSI vectors",
            "pci0:0:4:0: Device leaked memory resources",
            // Both kldunloads, the first and the retry, are refused.
            "nvme_hotplug: 1 interrupt handlers could not be torn down: not unloading",
            "nvme_hotplug: 1 interrupt handlers could not be torn down: not unloading",
        ],
    );
    assert_in_order(&out, &["kldunload: pci/nvme_hotplug refused MOD_QUIESCE: error 16", "kldunload again (retry 1)", "kldunload: pci/nvme_hotplug refused MOD_QUIESCE: error 16"]);
    assert!(out.contains("MOD_QUIESCE: Some(16), MOD_UNLOAD: None, unloaded: false"), "{out}");
    assert!(out.contains("\nstill loaded: ") && out.contains("stay with the module, not leaks"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "findings:\n{out}");
    assert!(!out.contains("panic"), "{out}");
    // Not unloaded: exit status 1 (an emulated panic would be 70).
    assert_eq!(code, Some(1), "{out}");
}

#[test]
fn an_m_nowait_malloc_failing_at_mod_load_disables_acpi_hotplug_and_nothing_else() {
    let Some(ko) = real_ko("fail_malloc") else { return };
    // Call 1 of the M_NOWAIT mallocs is MOD_LOAD's, after its task queue started: the queue
    // is freed again and the module runs without hotplug machinery.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--fail", "malloc:1"]);
    assert_in_order(mod_load(&out), &["kldhost: injected NULL into malloc (call 1)", "flags 0x1) = NULL", "taskqueue_free("]);
    assert_loaded_without_hotplug(code, &out);
}

/// DMA memory that cannot be had is ENOMEM like any other memory (the device is not at fault).
#[test]
fn contigmalloc_failing_fails_the_bring_up_with_no_dma_memory() {
    let Some(ko) = real_ko("fail_contigmalloc") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--fail", "contigmalloc:1"]);
    assert_in_order(&out, &["kldhost: injected NULL into contigmalloc (call 1)", "contigmalloc(2048) = NULL"]);
    assert_in_order(console(&out), &["nvmehp0: bring-up failed: no DMA memory", "device_attach: nvmehp0 attach returned 12"]);
    assert_attach_failed(&out, 12);
    assert_clean_unload(code, &out);
}

#[test]
fn a_scenario_run_takes_the_injection_too() {
    let Some(ko) = real_ko("fail_scenario") else { return };
    let scenario = common::repo_root().join("scenarios/smoke.toml");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kldhost"))
        .arg("scenario")
        .arg(&scenario)
        .arg("--ko")
        .arg(&ko)
        .args(["--fail", "pci_alloc_msix", "--trace"])
        .output()
        .expect("run kldhost scenario");
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    // Both controllers (the one at boot and the hot-added one) fall back to INTx.
    assert_in_order(
        &out,
        &[
            "kldhost: injected ENXIO into pci_alloc_msix (call 1)",
            "device_printf(\"nvmehp0: interrupt: INTx\\n\")",
            "kldhost: injected ENXIO into pci_alloc_msix (call 2)",
            "device_printf(\"nvmehp1: interrupt: INTx\\n\")",
        ],
    );
    assert!(out.contains("smoke (kld): OK"), "{out}");
    assert!(out.contains("leaked 0 B, nodes left 0, 0 violation(s)"), "{out}");
    assert_eq!(o.status.code(), Some(0), "{out}");
}

/// No QEMU or module needed: the CLI refuses what FreeBSD cannot do, naming what can fail.
#[test]
fn functions_that_cannot_fail_and_errors_freebsd_never_returns_are_usage_errors() {
    let cases = [
        ("disk_alloc", "disk_alloc cannot fail in FreeBSD"),
        ("nvmehp_no_such_function:2", "is not a KPI function kldhost can fail"),
        ("make_dev_s=ENOMEM", "make_dev_s fails in FreeBSD with one of EEXIST, EINVAL, ENAMETOOLONG, not ENOMEM"),
        ("taskqueue_create=ENOMEM", "taskqueue_create returns a pointer: it fails with NULL"),
    ];
    for (spec, wanted) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kldhost")).args(["run", "--fail", spec, "nvme_hotplug.ko"]).output().expect("run kldhost");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--fail {spec} accepted:\n{err}");
        assert!(err.contains(wanted), "--fail {spec}: {wanted:?} missing:\n{err}");
        if spec.starts_with("disk_alloc") || spec.starts_with("nvmehp_") {
            assert!(err.contains("functions that can: make_dev_s, bus_setup_intr, bus_alloc_resource, pci_alloc_msix"), "{err}");
        }
    }
}
