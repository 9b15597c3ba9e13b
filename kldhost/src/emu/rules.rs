//! The FreeBSD rules kldhost's emulated kernel enforces, by a stable id.
//!
//! The rules are kpimodel's `Rule` (kpimodel/src/rules.rs), so a finding here and a violation
//! there name the same rule. A broken rule is reported where FreeBSD would
//! notice it, on the KPI call itself, as a finding (`[Id] what happened (FreeBSD source)`) or,
//! where FreeBSD panics or a thread never wakes up again, as an emulated panic with the same
//! prefix ([`panic`], the process exits with [`super::PANIC_EXIT`]).
//!
//! [`ALL`] lists every kpimodel rule with where kldhost checks it and the negative-control test
//! that proves the check fires, or why it cannot apply to a kld run here.

/// One rule: kpimodel's own type, so a finding here and a violation there name the same rule.
pub use kpimodel::Rule;

/// How kldhost covers a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Checked on the KPI call: `at` is the file and function of the check, `test` the
    /// negative-control test (tests/<file>.rs, function) that fails if the check does not fire.
    Checked { at: &'static str, test: &'static str },
    /// Not checked; why it cannot happen (or cannot be observed) in a kld run here.
    NotApplicable(&'static str),
}

/// A rule, the FreeBSD source that decides it, and how kldhost covers it.
#[derive(Debug, Clone, Copy)]
pub struct RuleCheck {
    pub rule: Rule,
    pub source: &'static str,
    pub coverage: Coverage,
}

use Coverage::Checked;

/// Every kpimodel rule (tests/rules.rs checks the list is complete).
pub const ALL: &[RuleCheck] = &[
    RuleCheck {
        rule: Rule::DestroyEternal,
        source: "sys/kern/kern_conf.c destroy_devl: KASSERT((si_flags & SI_ETERNAL) == 0, \"WARNING: Driver mistake: destroy_dev on eternal %d\")",
        coverage: Checked { at: "src/emu/devfs.rs emu_destroy_dev", test: "tests/rules.rs destroying_an_eternal_node_panics" },
    },
    RuleCheck {
        rule: Rule::DestroyFromOwnMethod,
        source: "sys/kern/kern_conf.c destroy_devl: msleep(\"devdrn\") until si_threadcount == 0, and the caller is one of the threads counted (make_dev(9): destroy_dev_sched from a method)",
        coverage: Checked { at: "src/emu/devfs.rs emu_destroy_dev (si_threadcount of devfs::open_and_close_all)", test: "tests/rules.rs destroy_dev_from_the_nodes_own_d_close_never_returns" },
    },
    RuleCheck {
        rule: Rule::DestroyWaitsForever,
        source: "sys/kern/kern_conf.c destroy_devl: waits for every thread in the node's methods; one blocked on I/O nobody completes keeps it waiting forever",
        coverage: Checked { at: "src/emu/devfs.rs emu_destroy_dev, wait_for_threads (readers parked in d_read by `run --park-readers`, d_purge called, a bounded wait)", test: "tests/rules.rs destroy_dev_with_a_reader_nobody_wakes_never_returns" },
    },
    RuleCheck {
        rule: Rule::DoubleDestroy,
        source: "sys/kern/kern_conf.c destroy_devl: KASSERT(si_flags & SI_NAMED, \"WARNING: Driver mistake: destroy_dev on %d\"); without INVARIANTS the cdev may already be freed (dev_free_devlocked)",
        coverage: Checked { at: "src/emu/devfs.rs emu_destroy_dev", test: "tests/rules.rs destroying_a_node_twice_panics" },
    },
    RuleCheck {
        rule: Rule::DrvThroughDestroyedNode,
        source: "sys/kern/kern_conf.c destroy_devl: si_drv1 = si_drv2 = 0; a pointer read from them afterwards is NULL (sys/amd64/amd64/trap.c trap_fatal: page fault)",
        coverage: Checked { at: "src/emu/trap.rs fatal_trap (a fault in the NULL page after destroy_dev zeroed a non-NULL si_drv1)", test: "tests/rules.rs si_drv1_read_after_destroy_dev_is_null_and_its_use_a_page_fault" },
    },
    RuleCheck {
        rule: Rule::UseAfterFree,
        source: "sys/vm/uma_dbg.c trash_dtor (INVARIANTS): freed memory is filled with 0xdeadc0de; a pointer read from it is non-canonical (sys/amd64/amd64/trap.c trap_fatal: general protection fault)",
        coverage: Checked { at: "src/emu/trap.rs fatal_trap; src/emu/newbus.rs dev_of (a deleted device_t)", test: "tests/rules.rs a_pointer_read_from_freed_memory_faults_on_the_poison" },
    },
    RuleCheck {
        rule: Rule::CallThroughFreedPointer,
        source: "sys/vm/uma_dbg.c trash_dtor: a function pointer read from freed memory is 0xdeadc0dedeadc0de, a non-canonical address (sys/amd64/amd64/trap.c trap_fatal: general protection fault)",
        coverage: Checked { at: "src/emu/trap.rs fatal_trap", test: "tests/rules.rs a_callback_through_freed_memory_is_a_fatal_trap_on_the_poison" },
    },
    RuleCheck {
        rule: Rule::FreeWhileCallbackArmed,
        source: "callout(9) callout_drain, taskqueue(9) taskqueue_drain: the callout or task (and its argument) must not be freed before they return (sys/kern/kern_timeout.c softclock_call_cc, sys/kern/subr_taskqueue.c taskqueue_run_locked use them)",
        coverage: Checked { at: "src/emu/kern.rs emu_free, freed_memory_checks (armed callouts, queued tasks, armed timeout tasks in the block or with their argument in it, and the softc device_detach frees)", test: "tests/rules.rs freeing_an_armed_callout_is_a_finding" },
    },
    RuleCheck {
        rule: Rule::DoubleFree,
        source: "sys/kern/kern_malloc.c free / sys/vm/uma_dbg.c: \"Duplicate free\" panic under INVARIANTS",
        coverage: Checked { at: "src/emu/kern.rs emu_free", test: "tests/run.rs freed_memory_reads_as_the_poison_and_a_double_free_panics" },
    },
    RuleCheck {
        rule: Rule::OrphanNode,
        source: "sys/fs/devfs/devfs_vnops.c devfs_open -> d_open with si_drv1: a node still published whose si_drv1 points at freed memory is a use-after-free on the next open or ioctl",
        coverage: Checked { at: "src/emu/kern.rs freed_memory_checks; src/emu/newbus.rs device_detach, nodes_left_at_detach (the softc freed after DEVICE_DETACH)", test: "tests/rules.rs a_node_left_after_detach_is_a_finding_and_an_orphan" },
    },
    RuleCheck {
        rule: Rule::NodeLeftAfterDetach,
        source: "sys/kern/subr_bus.c device_detach: the softc is freed once DEVICE_DETACH returned 0, so every node attach created must be destroyed by then",
        coverage: Checked { at: "src/emu/newbus.rs device_detach, nodes_left_at_detach (nodes made while the device was attaching)", test: "tests/rules.rs a_node_left_after_detach_is_a_finding_and_an_orphan" },
    },
    RuleCheck {
        rule: Rule::Leak,
        source: "sys/kern/kern_malloc.c malloc_uninit: \"Warning: memory type %s leaked memory on destroy\"",
        coverage: Checked { at: "src/emu/kern.rs emu_malloc_uninit", test: "tests/run.rs memory_a_module_never_frees_is_reported_at_unload" },
    },
    RuleCheck {
        rule: Rule::DuplicateName,
        source: "sys/kern/kern_conf.c make_dev_sv: without MAKEDEV_CHECKNAME a bad or duplicate name panics (\"make_dev_sv: bad si_name (error=%d, si_name=%s)\")",
        coverage: Checked { at: "src/emu/devfs.rs emu_make_dev_s", test: "tests/rules.rs a_duplicate_node_name_without_checkname_panics" },
    },
    RuleCheck {
        rule: Rule::BadMakeDevFlags,
        source: "sys/kern/kern_conf.c make_dev_sv: KASSERT((flags & (MAKEDEV_WAITOK | MAKEDEV_NOWAIT)) != both, \"make_dev_sv: both WAITOK and NOWAIT specified\")",
        coverage: Checked { at: "src/emu/devfs.rs emu_make_dev_s", test: "tests/rules.rs make_dev_with_waitok_and_nowait_panics" },
    },
    RuleCheck {
        rule: Rule::SleepWithMutex,
        source: "sys/kern/subr_witness.c WITNESS_WARN(WARN_SLEEPOK) / sys/kern/subr_sleepqueue.c: sleeping with a non-sleepable lock held",
        coverage: Checked { at: "src/emu/sched.rs may_sleep", test: "tests/run.rs sleeping_with_a_mutex_held_is_a_finding" },
    },
    RuleCheck {
        rule: Rule::DiskFreedBeforeGone,
        source: "sys/geom/geom_disk.c g_disk_providergone: GEOM may call the driver through the disk until d_gone; nvd(4) frees its disk only in nvd_gonecb",
        coverage: Checked { at: "src/emu/geom.rs emu_disk_destroy; src/emu/kern.rs freed_memory_checks (d_drv1 of a disk whose d_gone has not run)", test: "tests/rules.rs a_disk_destroyed_before_d_gone_is_a_finding" },
    },
    RuleCheck {
        rule: Rule::DiskDoubleRelease,
        source: "sys/geom/geom_disk.c disk_gone/disk_destroy on a struct disk already released: use after free",
        coverage: Checked { at: "src/emu/geom.rs emu_disk_gone, emu_disk_destroy", test: "tests/rules.rs disk_gone_twice_is_a_finding" },
    },
    RuleCheck {
        rule: Rule::RemoveNotifyFromAcpiTask,
        source: "sys/contrib/dev/acpica/components/events/evxface.c AcpiRemoveNotifyHandler -> AcpiOsWaitEventsComplete; sys/dev/acpica/Osd/OsdSchedule.c waits for the acpi_task queue, which runs the caller: deadlock",
        coverage: Checked { at: "src/emu/acpi.rs emu_acpi_os_wait_events_complete, emu_acpi_remove_notify_handler, wait_events_from_acpi_task (on the acpi_task thread of run_gpe)", test: "tests/rules.rs removing_a_notify_handler_from_the_acpi_task_never_returns" },
    },
    RuleCheck {
        rule: Rule::DrainFromOwnTask,
        source: "sys/kern/subr_taskqueue.c taskqueue_drain: sleeps while the task is pending or running, i.e. until it returns: for the task itself, forever",
        coverage: Checked { at: "src/emu/sched.rs emu_taskqueue_drain, emu_taskqueue_drain_all, drain_from_own_task", test: "tests/rules.rs draining_a_task_from_itself_never_returns" },
    },
    RuleCheck {
        rule: Rule::UnloadWithLiveCallbacks,
        source: "sys/kern/kern_linker.c linker_file_unload frees the module's text; sys/kern/kern_conf.c: a live node of its cdevsw, a disk whose d_gone has not run, or an ACPI notify handler still installed calls into it",
        coverage: Checked { at: "src/emu/run.rs end_of_life_checks; src/emu/geom.rs end_of_life_checks; src/emu/acpi.rs end_of_life_checks", test: "tests/rules.rs a_node_left_at_unload_is_a_live_callback" },
    },
    RuleCheck {
        rule: Rule::WaitForeverForGone,
        source: "sys/geom/geom_disk.c: d_gone runs only after the last consumer closed; a driver sleeping for it while a consumer holds the disk open waits forever",
        coverage: Checked { at: "src/emu/geom.rs run_events, sleep_while_gone_held (d_gone held back while `run --hold-disks-open` keeps the disk open, and a module that keeps sleeping meanwhile)", test: "tests/rules.rs sleeping_until_d_gone_while_a_consumer_holds_the_disk_open_never_ends" },
    },
    RuleCheck {
        rule: Rule::DoubleDetach,
        source: "sys/dev/acpica/acpi_pci.c acpi_pci_device_notify_handler + sys/kern/subr_bus.c: two notify handlers on one slot both detach the child (evmisc.c AcpiEvNotifyDispatch calls each)",
        coverage: Checked { at: "src/emu/acpi.rs acpi_pci_notify (acpi_pci's eject: detach, _EJ0, rescan); src/emu/newbus.rs detached_by_acpi_pci, dev_of (a call with a device_t it detached or deleted)", test: "tests/rules.rs a_second_handler_acting_on_a_device_acpi_pci_already_ejected_is_a_double_detach" },
    },
    RuleCheck {
        rule: Rule::DetachWithoutDevice,
        source: "sys/kern/subr_bus.c device_detach/device_delete_child: the device_t of a deleted child is freed memory (device_delete_child -> kobj_delete, free)",
        coverage: Checked { at: "src/emu/newbus.rs dev_of", test: "tests/rules.rs detaching_a_deleted_device_t_is_a_use_after_free" },
    },
    RuleCheck {
        rule: Rule::DoubleEject,
        source: "QEMU hw/acpi/pcihp.c / sys/dev/acpica/acpi_pci.c: _EJ0 on a slot already ejected (or empty) may eject the next device put into it",
        coverage: Checked { at: "src/emu/acpi.rs emu_acpi_set_integer, eject_checks", test: "tests/rules.rs ej0_on_an_attached_device_and_on_an_empty_slot_are_findings" },
    },
    RuleCheck {
        rule: Rule::EjectAttached,
        source: "ACPI 6.5 section 6.3.3 _EJx: the OS releases the device before evaluating _EJ0 (sys/dev/acpica/acpi_pci.c acpi_pci_device_notify_handler detaches, then _EJ0)",
        coverage: Checked { at: "src/emu/acpi.rs emu_acpi_set_integer, eject_checks", test: "tests/rules.rs ej0_on_an_attached_device_and_on_an_empty_slot_are_findings" },
    },
];

/// The FreeBSD source that decides `rule`, as kldhost checks it ([`ALL`]; kpimodel's
/// `Rule::source` says how its model mirrors it).
pub fn source_of(rule: Rule) -> &'static str {
    ALL.iter().find(|c| c.rule == rule).map_or("", |c| c.source)
}

/// `[Id] detail (source)`: the text of a finding or panic for `rule`.
pub fn text(rule: Rule, detail: &str) -> String {
    format!("[{rule}] {detail} ({})", source_of(rule))
}

/// A broken rule the kernel survives (or only warns about): a finding.
pub fn finding(rule: Rule, detail: &str) {
    super::finding(text(rule, detail));
}

/// A broken rule the kernel does not survive: a panic, or a thread that never wakes up (a
/// deadlock ends the run as a panic does; the message says which).
pub fn panic(rule: Rule, detail: &str) -> ! {
    super::kernel_panic(&text(rule, detail))
}

/// What the checks remember between KPI calls.
#[derive(Default)]
pub struct State {
    /// Nodes destroy_dev destroyed (the struct cdev is kept, not reused): cdev to its name.
    pub destroyed_nodes: std::collections::BTreeMap<u64, String>,
    /// The last node whose non-NULL si_drv1 destroy_dev zeroed.
    pub zeroed_drv1: Option<String>,
    /// The device_t that was attaching when each node was made: cdev to device_t.
    pub node_owner: std::collections::BTreeMap<u64, u64>,
    /// Threads inside each node's methods (si_threadcount, with who they are), by cdev.
    pub threads_in: std::collections::BTreeMap<u64, Vec<std::thread::ThreadId>>,
    /// Sleeps in a row taken while a withered disk's d_gone was held back by an open.
    pub sleeps_waiting_for_gone: u32,
    /// device_t's acpi_pci's eject handler detached (and its rescan may have deleted), until
    /// they attach again: another handler's detach of one of them is the second detach.
    pub acpi_pci_detached: std::collections::BTreeSet<u64>,
}
