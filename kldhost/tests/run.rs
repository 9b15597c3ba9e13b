//! `kldhost run`: a module's life (SYSINITs with MOD_LOAD, taskqueues, MOD_QUIESCE,
//! MOD_UNLOAD, SYSUNINITs) against the emulated kernel, in a child process each, since an
//! emulated panic ends the process as a kernel panic ends the kernel.

mod common;

use common::{assert_in_order, compile, kernel_header_flags, kldhost_run, temp_object};


#[test]
fn the_real_module_loads_attaches_its_driver_runs_its_task_and_unloads_clean() {
    if common::real_ko("run_real").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run(&ko);
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "module_register(pci/nvme_hotplug, evhand driver_module_handler",
            "sysctl_register_oid(hw.nvme_hotplug.claim)",
            // SI_SUB_KMEM before SI_SUB_DRIVERS.
            "malloc_init(nvme_hotplug)",
            "module_register_init(pci/nvme_hotplug)",
            // driver_module_handler: the chained handler, then the driver joins the devclass.
            "driver_module_handler(nvmehp on pci, MOD_LOAD)",
            "taskqueue_create(nvmehp_hotplug",
            "taskqueue_enqueue(",
            "printf(\"nvme_hotplug: loaded",
            "devclass_add_driver(pci, nvmehp",
            "MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0",
            // The discovery task, on a machine without an ACPI namespace.
            "taskqueue nvmehp_hotplug: run task",
            "AcpiGetHandle(",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 0",
            // Newbus removes the driver before the module's own unload runs.
            "devclass_delete_driver(pci, nvmehp)",
            "taskqueue_free(nvmehp_hotplug)",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "malloc_uninit(nvme_hotplug)",
            "sysctl_unregister_oid(hw.nvme_hotplug.claim)",
            "unloaded: true",
            "findings: 0",
        ],
    );
    // Every allocation was freed (and poisoned) before malloc_uninit.
    let mallocs = out.matches("  malloc(").count();
    let frees = out.matches("  free(0x").count();
    assert!(mallocs > 0);
    assert_eq!(mallocs, frees, "{out}");
}

#[test]
fn malloc_init_refuses_a_malloc_type_of_another_layout_version_with_a_panic() {
    let flags = kernel_header_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let Some(good) = compile("malloc_ok", "malloc_type", &flags) else { return };
    let mut old = flags.clone();
    old.push("-DKLDHOST_OLD_MALLOC_VERSION");
    let Some(bad) = compile("malloc_old", "malloc_type", &old) else { return };

    // Control: the same module with FreeBSD 15's M_VERSION loads and unloads.
    let (code, out) = kldhost_run(&temp_object("malloc_ok", &good));
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["malloc_init(kldhost_fixture)", "malloc_uninit(kldhost_fixture)", "findings: 0"]);

    let (code, out) = kldhost_run(&temp_object("malloc_old", &bad));
    assert_eq!(code, Some(kldhost::emu::PANIC_EXIT), "{out}");
    assert!(out.contains("panic: malloc_init: type kldhost_fixture with unsupported version 2020110501"), "{out}");
    assert!(!out.contains("malloc_uninit"), "{out}");
}

#[test]
fn memory_a_module_never_frees_is_reported_at_unload() {
    let mut flags = kernel_header_flags();
    flags.push("-DKLDHOST_LEAK".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let Some(obj) = compile("leak", "malloc_type", &flags) else { return };
    let (code, out) = kldhost_run(&temp_object("leak", &obj));
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "malloc_init(kldhost_fixture)",
            "malloc(100, flags 0x2)",
            "malloc_uninit(kldhost_fixture)",
            "findings: 2",
            "[Leak] malloc type kldhost_fixture destroyed with 1 allocations (100 bytes) never freed",
            "[Leak] after unload: 1 malloc(9) allocations (100 bytes) never freed",
        ],
    );
}

#[test]
fn sleeping_with_a_mutex_held_is_a_finding() {
    let flags = kernel_header_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut control = flags.clone();
    control.push("-DKLDHOST_UNLOCK_FIRST");
    let Some(bad) = compile("sleep_locked", "sleep_locked", &flags) else { return };
    let Some(good) = compile("sleep_unlocked", "sleep_locked", &control) else { return };

    let (code, out) = kldhost_run(&temp_object("sleep_unlocked", &good));
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["mtx_lock(kldhost_fixture)", "mtx_unlock(kldhost_fixture)", "pause_sbt(kldhost", "findings: 0"]);

    let (code, out) = kldhost_run(&temp_object("sleep_locked", &bad));
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &["mtx_lock(kldhost_fixture)", "pause_sbt(kldhost", "mtx_unlock(kldhost_fixture)", "findings: 1", "[SleepWithMutex] pause_sbt may sleep, called with mutex kldhost_fixture held", "subr_witness.c"],
    );
}

#[test]
fn make_dev_s_refuses_a_make_dev_args_larger_than_the_kernels_with_einval() {
    let flags = kernel_header_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut big = flags.clone();
    big.push("-DKLDHOST_BIG_ARGS");
    let Some(good) = compile("make_dev_ok", "make_dev", &flags) else { return };
    let Some(bad) = compile("make_dev_big", "make_dev", &big) else { return };

    // Control: the node is created with the caller's attributes and destroyed at unload.
    let (code, out) = kldhost_run(&temp_object("make_dev_ok", &good));
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "make_dev_args_init(",
            "make_dev_s(\"kldhost_fixture0\", uid 0, gid 5, mode 640",
            "kldhost_fixture: make_dev_s returned 0",
            "destroy_dev(kldhost_fixture0)",
            "findings: 0",
        ],
    );

    // EINVAL is 22 on FreeBSD; no node exists, so the SYSUNINIT destroys nothing.
    let (code, out) = kldhost_run(&temp_object("make_dev_big", &bad));
    assert_eq!(code, Some(0), "{out}");
    let size = std::mem::size_of::<kldhost::layouts::make_dev_args>();
    let msg = format!("make_dev_s: mda_size {} > sizeof(struct make_dev_args) {size}: EINVAL", size + 8);
    assert!(out.contains(&msg), "{out}");
    assert!(out.contains("kldhost_fixture: make_dev_s returned 22"), "{out}");
    assert!(!out.contains("destroy_dev("), "{out}");
}

/// The modevent fixture built with extra `-D` flags.
fn modevent(test: &str, defines: &[&str]) -> Option<std::path::PathBuf> {
    let mut flags = kernel_header_flags();
    flags.extend(defines.iter().map(|d| d.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    compile(test, "modevent", &flags).map(|o| temp_object(test, &o))
}

#[test]
fn module_events_follow_kern_module_c_load_quiesce_unload() {
    let Some(ko) = modevent("modevent_ok", &[]) else { return };
    let (code, out) = kldhost_run(&ko);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "module_register(kldhost_fixture, evhand kldhost_fixture_modevent",
            "module_register_init(kldhost_fixture)",
            "MOD_EVENT(kldhost_fixture, MOD_LOAD) = 0",
            "MOD_EVENT(kldhost_fixture, MOD_QUIESCE) = 0",
            "MOD_EVENT(kldhost_fixture, MOD_UNLOAD) = 0",
            "unloaded: true",
        ],
    );
}

#[test]
fn a_failed_mod_load_is_followed_by_mod_unload_and_the_kernels_message() {
    // ENXIO is 6 on FreeBSD.
    let Some(ko) = modevent("modevent_load_err", &["-DKLDHOST_LOAD_ERROR=ENXIO"]) else { return };
    let (code, out) = kldhost_run(&ko);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "MOD_EVENT(kldhost_fixture, MOD_LOAD) = 6",
            "MOD_EVENT(kldhost_fixture, MOD_UNLOAD) = 0",
            "module_register_init: MOD_LOAD (kldhost_fixture, 0x",
            ") error 6",
            "unloaded: true",
        ],
    );
    // Released: the unload sends it nothing more.
    assert!(!out.contains("MOD_EVENT(kldhost_fixture, MOD_QUIESCE)"), "{out}");
}

#[test]
fn mod_quiesce_refusing_stops_the_unload_and_eopnotsupp_does_not() {
    // EBUSY (16): kldunload fails, MOD_UNLOAD is never sent, the SYSUNINITs do not run.
    let Some(ko) = modevent("modevent_busy", &["-DKLDHOST_QUIESCE_ERROR=EBUSY"]) else { return };
    let (code, out) = kldhost_run(&ko);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(&out, &["MOD_EVENT(kldhost_fixture, MOD_QUIESCE) = 16", "refused MOD_QUIESCE: error 16", "unloaded: false"]);
    assert!(!out.contains("MOD_EVENT(kldhost_fixture, MOD_UNLOAD)"), "{out}");

    // EOPNOTSUPP from MOD_QUIESCE counts as agreement (module_unload).
    let Some(ko) = modevent("modevent_eopnotsupp", &["-DKLDHOST_QUIESCE_ERROR=EOPNOTSUPP"]) else { return };
    let (code, out) = kldhost_run(&ko);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["MOD_EVENT(kldhost_fixture, MOD_QUIESCE) = 45", "MOD_EVENT(kldhost_fixture, MOD_UNLOAD) = 0", "unloaded: true"]);
}

#[test]
fn without_an_acpi_pci_root_the_real_module_retries_discovery_a_bounded_number_of_times() {
    if common::real_ko("run_timeouts").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = common::kldhost_run_with(&ko, &["--timeouts", "1000"]);
    assert_eq!(code, Some(0), "{out}");
    // One lookup at load, then one per expiry of the one-second rerun timeout, until the
    // module gives up (src/freebsd/slots.rs DISCOVERY_TRIES) and re-arms no more.
    let lookups = out.matches("AcpiGetHandle(0x0, \"\\\\_SB_.PCI0\") = AE_NOT_FOUND").count();
    assert_eq!(lookups, 120, "{out}");
    assert_in_order(
        &out,
        &[
            "printf(\"nvme_hotplug: no ACPI",
            "119 timeout task expiries",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "console:",
            "nvme_hotplug: no ACPI \\_SB_.PCI0; ACPI hotplug disabled (controllers still work)",
            "findings: 0",
        ],
    );
}

#[test]
fn a_timeout_task_that_re_arms_forever_is_a_finding() {
    let flags = kernel_header_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut once = flags.clone();
    once.push("-DKLDHOST_ONCE");
    let Some(forever) = compile("rearm_forever", "rearm", &flags) else { return };
    let Some(once) = compile("rearm_once", "rearm", &once) else { return };

    let (code, out) = common::kldhost_run_with(&temp_object("rearm_once", &once), &["--timeouts", "50"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(&out, &["expires", "1 timeout task expiries", "taskqueue_free(kldhost_fixture)", "findings: 0"]);

    let (code, out) = common::kldhost_run_with(&temp_object("rearm_forever", &forever), &["--timeouts", "50"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.matches("expires").count(), 50, "{out}");
    assert_in_order(&out, &["50 timeout task expiries", "findings: 1", "1 timeout tasks still re-arming after 50 expiries"]);
}

#[test]
fn freed_memory_reads_as_the_poison_and_a_double_free_panics() {
    let flags = kernel_header_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut twice = flags.clone();
    twice.push("-DKLDHOST_DOUBLE_FREE");
    let Some(once) = compile("uaf", "use_after_free", &flags) else { return };
    let Some(twice) = compile("double_free", "use_after_free", &twice) else { return };

    let (code, out) = kldhost_run(&temp_object("uaf", &once));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("kldhost_fixture: after free 0xdeadc0de"), "{out}");

    let (code, out) = kldhost_run(&temp_object("double_free", &twice));
    assert_eq!(code, Some(kldhost::emu::PANIC_EXIT), "{out}");
    assert_in_order(&out, &["kldhost_fixture: after free 0xdeadc0de", "panic: [DoubleFree] free(0x", "): the address is already free", "uma_dbg.c"]);
}
