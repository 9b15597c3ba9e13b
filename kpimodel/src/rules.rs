//! The FreeBSD rules the model enforces. Each names the kernel source it mirrors and what the
//! real kernel does when the rule is broken (panic, deadlock, use-after-free).

use std::fmt;

/// One rule of the FreeBSD KPI (docs/freebsd-kpi.md names the source of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// destroy_dev on a node made with MAKEDEV_ETERNAL.
    DestroyEternal,
    /// destroy_dev called by a thread that is itself inside one of the node's methods.
    DestroyFromOwnMethod,
    /// destroy_dev with a thread inside a method that waits for I/O nobody will complete.
    DestroyWaitsForever,
    /// destroy_dev twice on one node (the second touches a freed or dead cdev).
    DoubleDestroy,
    /// si_drv1 read through a destroyed node.
    DrvThroughDestroyedNode,
    /// Read or write of freed driver memory.
    UseAfterFree,
    /// Calling a callback whose pointer is stored in freed memory.
    CallThroughFreedPointer,
    /// Freeing memory a still-armed interrupt/timer/task uses as its argument.
    FreeWhileCallbackArmed,
    /// free(9) twice.
    DoubleFree,
    /// Freeing memory that a live node's si_drv1 points to: the node is an orphan.
    OrphanNode,
    /// A node of the controller is left after its detach.
    NodeLeftAfterDetach,
    /// Memory of our malloc type still allocated when the module unloads.
    Leak,
    /// make_dev without MAKEDEV_CHECKNAME on a name that exists.
    DuplicateName,
    /// Invalid make_dev flags (WAITOK together with NOWAIT, or alias flags).
    BadMakeDevFlags,
    /// A sleeping call with a non-sleepable mutex held.
    SleepWithMutex,
    /// A disk's d_drv1 freed, or the disk destroyed, before GEOM called d_gone.
    DiskFreedBeforeGone,
    /// disk_destroy or disk_gone twice.
    DiskDoubleRelease,
    /// AcpiRemoveNotifyHandler from an ACPI task thread.
    RemoveNotifyFromAcpiTask,
    /// taskqueue_drain from a task of the same queue.
    DrainFromOwnTask,
    /// Module unloaded while nodes of its cdevsw or d_gone callbacks remain.
    UnloadWithLiveCallbacks,
    /// Waiting for d_gone of a disk that is still open: sleeps until somebody closes it.
    WaitForeverForGone,
    /// Two handlers detached the same device (e.g. ours and acpi_pci's).
    DoubleDetach,
    /// A detach was asked for a slot without a device_t.
    DetachWithoutDevice,
    /// `_EJ0` evaluated twice for one insertion, or on an empty slot.
    DoubleEject,
    /// `_EJ0` evaluated while the device was still attached (not detached first).
    EjectAttached,
}

impl Rule {
    /// Every rule, in declaration order (kldhost's emulated kernel checks each of them: its
    /// `emu::rules::ALL` says where).
    pub const ALL: [Rule; 25] = [
        Rule::DestroyEternal,
        Rule::DestroyFromOwnMethod,
        Rule::DestroyWaitsForever,
        Rule::DoubleDestroy,
        Rule::DrvThroughDestroyedNode,
        Rule::UseAfterFree,
        Rule::CallThroughFreedPointer,
        Rule::FreeWhileCallbackArmed,
        Rule::DoubleFree,
        Rule::OrphanNode,
        Rule::NodeLeftAfterDetach,
        Rule::Leak,
        Rule::DuplicateName,
        Rule::BadMakeDevFlags,
        Rule::SleepWithMutex,
        Rule::DiskFreedBeforeGone,
        Rule::DiskDoubleRelease,
        Rule::RemoveNotifyFromAcpiTask,
        Rule::DrainFromOwnTask,
        Rule::UnloadWithLiveCallbacks,
        Rule::WaitForeverForGone,
        Rule::DoubleDetach,
        Rule::DetachWithoutDevice,
        Rule::DoubleEject,
        Rule::EjectAttached,
    ];

    /// The FreeBSD source and behaviour this rule mirrors.
    pub const fn source(self) -> &'static str {
        match self {
            Rule::DestroyEternal => "sys/kern/kern_conf.c destroy_devl: KASSERT((si_flags & SI_ETERNAL) == 0, \"destroy_dev on eternal\"); without INVARIANTS the unccounted threads race the free",
            Rule::DestroyFromOwnMethod => "sys/kern/kern_conf.c destroy_devl: sleeps on \"devdrn\" until si_threadcount == 0; the caller is counted: self-deadlock (make_dev(9): use destroy_dev_sched from d_close)",
            Rule::DestroyWaitsForever => "sys/kern/kern_conf.c destroy_devl: waits until every thread left the methods; a thread blocked on I/O that is never completed keeps it waiting forever (\"Still N threads\")",
            Rule::DoubleDestroy => "sys/kern/kern_conf.c destroy_dev: the cdev may already be freed (dev_free_devlocked) after the first destroy",
            Rule::DrvThroughDestroyedNode => "sys/kern/kern_conf.c destroy_devl: zeroes si_drv1/si_drv2; read them before destroy_dev",
            Rule::UseAfterFree => "sys/vm/uma_dbg.c trash_dtor (INVARIANTS): freed memory is filled with 0xdeadc0de; later use faults or corrupts",
            Rule::CallThroughFreedPointer => "sys/vm/uma_dbg.c trash_dtor: a function pointer read from freed memory is 0xdeadc0deadc0de: page fault in kernel mode",
            Rule::FreeWhileCallbackArmed => "bus_teardown_intr(9)/callout_drain(9)/taskqueue_drain(9) must return before their argument is freed: the callback would run on freed memory",
            Rule::DoubleFree => "sys/kern/kern_malloc.c free / uma_dbg.c: \"Duplicate free\" panic under INVARIANTS",
            Rule::OrphanNode => "devfs: a node still published whose si_drv1 points at freed memory panics on first open/ioctl",
            Rule::NodeLeftAfterDetach => "newbus detach contract: every node created at attach is destroyed before detach returns (left-overs are orphans)",
            Rule::Leak => "sys/kern/kern_malloc.c malloc_uninit: \"Warning: memory type %s leaked memory on destroy\"",
            Rule::DuplicateName => "sys/kern/kern_conf.c make_dev_sv/prep_devname: without MAKEDEV_CHECKNAME a duplicate name panics (\"make_dev() by driver ... on name ...\")",
            Rule::BadMakeDevFlags => "sys/kern/kern_conf.c make_dev_sv: KASSERT((flags & (MAKEDEV_WAITOK|MAKEDEV_NOWAIT)) != both); make_dev_alias_p accepts only WAITOK|NOWAIT|CHECKNAME",
            Rule::SleepWithMutex => "sys/kern/subr_witness.c WITNESS_WARN(WARN_SLEEPOK) / subr_sleepqueue.c: sleeping with a non-sleepable lock held panics",
            Rule::DiskFreedBeforeGone => "sys/geom/geom_disk.c g_disk_providergone: GEOM may call the driver until d_gone; nvd(4) frees its disk only in nvd_gonecb",
            Rule::DiskDoubleRelease => "sys/geom/geom_disk.c disk_destroy/disk_gone on a released struct disk: use-after-free",
            Rule::RemoveNotifyFromAcpiTask => "acpica evxface.c AcpiRemoveNotifyHandler -> AcpiOsWaitEventsComplete; sys/dev/acpica/Osd/OsdSchedule.c drains acpi_task: deadlock from an acpi_task thread",
            Rule::DrainFromOwnTask => "sys/kern/subr_taskqueue.c taskqueue_drain: waits for the running task, i.e. for itself",
            Rule::UnloadWithLiveCallbacks => "sys/kern/kern_conf.c: cdevsw and module text must stay valid until csw->d_devs is empty (destroy_dev_drain) and every d_gone ran",
            Rule::WaitForeverForGone => "sys/geom/geom_disk.c: d_gone runs only after the last consumer closed; nvd_controller_fail msleeps until then",
            Rule::DoubleDetach => "sys/dev/acpica/acpi_pci.c + sys/kern/subr_bus.c: two notify handlers on one slot both device_detach the child (ACPICA evmisc.c AcpiEvNotifyDispatch calls every handler)",
            Rule::DetachWithoutDevice => "sys/kern/subr_bus.c device_detach/device_delete_child on a device_t that no longer exists: use-after-free",
            Rule::DoubleEject => "acpi_pci.c: _EJ0 evaluated twice for one insertion may eject the next device put into the slot",
            Rule::EjectAttached => "ACPI 6.5 6.3.3: the OS must release the device (detach) before evaluating _EJ0",
        }
    }
}

/// One broken rule, with what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule.
    pub rule: Rule,
    /// What the model saw.
    pub detail: String,
}

/// A rule is shown by its name, the id kldhost's findings carry (`[DestroyEternal] ...`).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {} [{}]", self.rule, self.detail, self.rule.source())
    }
}

#[cfg(test)]
mod all_tests {
    use super::Rule;

    /// `Rule::ALL` names every variant once: a new rule fails to compile here until it is
    /// listed (the match is exhaustive), and a duplicate fails the count.
    #[test]
    fn all_lists_every_rule_once() {
        let index = |r: Rule| match r {
            Rule::DestroyEternal
            | Rule::DestroyFromOwnMethod
            | Rule::DestroyWaitsForever
            | Rule::DoubleDestroy
            | Rule::DrvThroughDestroyedNode
            | Rule::UseAfterFree
            | Rule::CallThroughFreedPointer
            | Rule::FreeWhileCallbackArmed
            | Rule::DoubleFree
            | Rule::OrphanNode
            | Rule::NodeLeftAfterDetach
            | Rule::Leak
            | Rule::DuplicateName
            | Rule::BadMakeDevFlags
            | Rule::SleepWithMutex
            | Rule::DiskFreedBeforeGone
            | Rule::DiskDoubleRelease
            | Rule::RemoveNotifyFromAcpiTask
            | Rule::DrainFromOwnTask
            | Rule::UnloadWithLiveCallbacks
            | Rule::WaitForeverForGone
            | Rule::DoubleDetach
            | Rule::DetachWithoutDevice
            | Rule::DoubleEject
            | Rule::EjectAttached => r as usize,
        };
        let mut seen = std::collections::BTreeSet::new();
        for r in Rule::ALL {
            assert!(seen.insert(index(r)), "{r:?} twice in Rule::ALL");
        }
        assert_eq!(seen.len(), Rule::ALL.len());
        assert_eq!(seen.iter().copied().max(), Some(Rule::ALL.len() - 1), "a variant is missing from Rule::ALL");
    }
}
