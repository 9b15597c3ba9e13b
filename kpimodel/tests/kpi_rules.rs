//! Each model check catches a deliberately wrong teardown. Every test first does the wrong
//! thing and asserts the model saw it (the test fails if the model misses the bug), then, where
//! it makes sense, does the right thing on a fresh model and asserts silence.

use kpimodel::devfs::{flags, MakeDevArgs};
use kpimodel::memory::{M_NVMEHP, POISON};
use kpimodel::{Model, Rule, ThreadKind};

fn node(m: &mut Model, name: &str, fl: u32, drv1: Option<kpimodel::MemRef>) -> kpimodel::NodeRef {
    m.make_dev_s(MakeDevArgs { name, flags: fl, drv1 }).expect("make_dev_s")
}

fn only(m: &Model, rule: Rule) {
    assert!(m.broke(rule), "model missed {rule:?}; saw {:?}", m.violations());
}

/// Bug 1: namespace nodes created MAKEDEV_ETERNAL, later destroyed on hot-unplug.
#[test]
fn bug1_eternal_namespace_node_destroyed() {
    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let ns = node(&mut m, "nvmehp0ns1", flags::ETERNAL | flags::WAITOK, Some(softc));
    m.destroy_dev(ns);
    only(&m, Rule::DestroyEternal);
}

/// Bug 1, second face: an eternal node cannot be destroyed, so it is left behind and
/// points to the freed softc.
#[test]
fn bug1_eternal_namespace_node_left_behind() {
    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let _ns = node(&mut m, "nvmehp0ns1", flags::ETERNAL | flags::WAITOK, Some(softc));
    m.free(softc);
    only(&m, Rule::OrphanNode);
    assert_eq!(m.check_detached(0), 1);
    only(&m, Rule::NodeLeftAfterDetach);
}

/// Bug 2: teardown freed a structure and then called a function pointer inside it.
#[test]
fn bug2_free_then_call_function_pointer() {
    let mut m = Model::new();
    let req = m.malloc(M_NVMEHP, 128, true);
    let cb = m.store_fn_pointer(req, "req->cb_fn", None);
    assert!(m.call_fn_pointer(cb), "calling before free is fine");
    assert!(m.violations().is_empty());
    m.free(req);
    assert!(!m.call_fn_pointer(cb));
    only(&m, Rule::CallThroughFreedPointer);
    assert_eq!(m.read_u32(req, 0), POISON, "freed memory reads as 0xdeadc0de");
    only(&m, Rule::UseAfterFree);
}

/// Bug 3: an unfinished removal path: a second, independent node (an "alias" made with
/// make_dev instead of make_dev_alias) is never destroyed and points at the freed softc.
#[test]
fn bug3_orphan_alias_node() {
    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let main = node(&mut m, "nvmehp0n1", flags::CHECKNAME | flags::WAITOK, Some(softc));
    let _alias = node(&mut m, "nvmehp0ns1", flags::CHECKNAME | flags::WAITOK, Some(softc));
    m.destroy_dev(main);
    m.free(softc);
    only(&m, Rule::OrphanNode);
    assert_eq!(m.check_detached(0), 1);
    assert_eq!(m.report().nodes_left, vec!["nvmehp0ns1".to_string()]);
}

/// The right way for bug 3: a real alias depends on its parent and goes with it.
#[test]
fn alias_made_with_make_dev_alias_goes_with_its_parent() {
    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let main = node(&mut m, "nvmehp0n1", flags::CHECKNAME | flags::WAITOK, Some(softc));
    m.make_dev_alias(main, "nvmehp0ns1", flags::CHECKNAME | flags::WAITOK).unwrap();
    m.destroy_dev(main);
    m.free(softc);
    assert_eq!(m.check_detached(0), 0);
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn destroy_from_d_close_deadlocks_but_sched_does_not() {
    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0", flags::CHECKNAME, None);
    m.open(n).unwrap();
    m.close(n, |m| m.destroy_dev(n));
    only(&m, Rule::DestroyFromOwnMethod);

    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0", flags::CHECKNAME, None);
    m.open(n).unwrap();
    m.close(n, |m| m.destroy_dev_sched(n));
    m.destroy_dev_drain();
    assert!(m.violations().is_empty(), "{:?}", m.violations());
    assert!(m.node_destroyed(n));
}

/// destroy_dev waits for the threads inside; a thread asleep on I/O that was never failed
/// keeps it waiting forever: fail outstanding I/O *before* destroying nodes.
#[test]
fn destroy_with_thread_waiting_for_unfailed_io() {
    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0ns1", flags::CHECKNAME, None);
    let io = m.new_io();
    let reader = m.spawn_thread(ThreadKind::Kernel);
    m.on_thread(reader, |m| m.enter_method(n, Some(io))).unwrap();
    m.destroy_dev(n);
    only(&m, Rule::DestroyWaitsForever);

    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0ns1", flags::CHECKNAME, None);
    let io = m.new_io();
    let reader = m.spawn_thread(ThreadKind::Kernel);
    m.on_thread(reader, |m| m.enter_method(n, Some(io))).unwrap();
    m.complete_io(io);
    m.destroy_dev(n);
    assert!(m.violations().is_empty());
    assert_eq!(m.enter_method(n, None), Err(nvme_hotplug::hotplug::errno::Errno::ENXIO), "dead node answers ENXIO");
}

#[test]
fn si_drv1_through_destroyed_node() {
    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let n = node(&mut m, "nvmehp0", flags::CHECKNAME, Some(softc));
    assert_eq!(m.si_drv1(n), Some(softc));
    m.destroy_dev(n);
    assert_eq!(m.si_drv1(n), None);
    only(&m, Rule::DrvThroughDestroyedNode);
}

#[test]
fn free_softc_with_interrupt_still_armed() {
    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let intr = m.setup_intr(softc);
    m.free(softc);
    only(&m, Rule::FreeWhileCallbackArmed);
    assert!(!m.fire(intr));
    only(&m, Rule::UseAfterFree);

    let mut m = Model::new();
    let softc = m.malloc(M_NVMEHP, 64, true);
    let intr = m.setup_intr(softc);
    let co = m.callout_reset(softc);
    let tq = m.taskqueue_create("t");
    let task = m.task_enqueue(tq, softc);
    m.teardown_intr(intr);
    m.callout_drain(co);
    m.taskqueue_free(tq);
    m.free(softc);
    assert!(!m.fire(intr) && !m.fire(co) && !m.fire(task), "drained callbacks never run");
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn leaked_bytes_are_counted_and_reported_at_unload() {
    let mut m = Model::new();
    let a = m.malloc(M_NVMEHP, 100, true);
    let _b = m.malloc(M_NVMEHP, 28, true);
    m.free(a);
    assert_eq!(m.report().leaked_bytes, 28);
    m.module_unloaded();
    only(&m, Rule::Leak);
}

#[test]
fn double_free() {
    let mut m = Model::new();
    let a = m.malloc(M_NVMEHP, 8, true);
    m.free(a);
    m.free(a);
    only(&m, Rule::DoubleFree);
}

#[test]
fn duplicate_name_without_checkname_panics() {
    let mut m = Model::new();
    node(&mut m, "nvmehp0", flags::WAITOK, None);
    assert!(m.make_dev_s(MakeDevArgs { name: "nvmehp0", flags: flags::WAITOK, drv1: None }).is_err());
    only(&m, Rule::DuplicateName);

    let mut m = Model::new();
    node(&mut m, "nvmehp0", flags::CHECKNAME, None);
    let e = m.make_dev_s(MakeDevArgs { name: "nvmehp0", flags: flags::CHECKNAME, drv1: None });
    assert_eq!(e, Err(nvme_hotplug::hotplug::errno::Errno::EEXIST));
    assert!(m.violations().is_empty());
}

#[test]
fn bad_make_dev_flags() {
    let mut m = Model::new();
    let _ = m.make_dev_s(MakeDevArgs { name: "x", flags: flags::WAITOK | flags::NOWAIT, drv1: None });
    only(&m, Rule::BadMakeDevFlags);
}

#[test]
fn sleeping_under_a_mutex() {
    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0", flags::CHECKNAME, None);
    let mtx = m.mtx_init("nvmehp ctrlr");
    m.mtx_lock(mtx);
    m.destroy_dev(n);
    only(&m, Rule::SleepWithMutex);
    m.take_violations();
    let _ = m.malloc(M_NVMEHP, 8, false); // M_NOWAIT is fine under a mutex
    assert!(m.violations().is_empty());
    m.mtx_unlock(mtx);
    let _ = m.malloc(M_NVMEHP, 8, true);
    assert!(m.violations().is_empty());
}

#[test]
fn disk_context_freed_before_d_gone() {
    let mut m = Model::new();
    let ctx = m.malloc(M_NVMEHP, 64, true);
    let d = m.disk_create(0, ctx);
    m.disk_gone(d);
    m.free(ctx); // wrong: GEOM may still call d_strategy/d_gone with it
    only(&m, Rule::DiskFreedBeforeGone);

    let mut m = Model::new();
    let ctx = m.malloc(M_NVMEHP, 64, true);
    let d = m.disk_create(0, ctx);
    m.disk_destroy(d); // wrong: destroy outside d_gone
    only(&m, Rule::DiskFreedBeforeGone);
}

#[test]
fn d_gone_waits_for_the_last_close() {
    let mut m = Model::new();
    let ctx = m.malloc(M_NVMEHP, 64, true);
    let d = m.disk_create(0, ctx);
    assert!(m.disk_open(d));
    m.disk_gone(d);
    assert!(!m.disk_open(d), "a withered provider refuses new opens");
    m.run_geom_events();
    assert_eq!(m.disks_awaiting_gone(), 1, "d_gone must not run while open");
    m.disk_close(d);
    m.run_geom_events();
    assert_eq!(m.disks_alive(), 0);
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn waiting_for_d_gone_of_an_open_disk_never_returns() {
    let mut m = Model::new();
    let ctx = m.malloc(M_NVMEHP, 64, true);
    let d = m.disk_create(0, ctx);
    m.disk_open(d);
    m.disk_gone(d);
    m.wait_all_gone();
    only(&m, Rule::WaitForeverForGone);
}

#[test]
fn acpi_remove_notify_handler_from_acpi_task() {
    let mut m = Model::new();
    m.install_notify_handler();
    let acpi = m.spawn_thread(ThreadKind::AcpiTask);
    m.on_thread(acpi, |m| m.remove_notify_handlers());
    only(&m, Rule::RemoveNotifyFromAcpiTask);
    assert_eq!(m.notify_handlers(), 1);
    m.remove_notify_handlers();
    assert_eq!(m.notify_handlers(), 0);
}

#[test]
fn taskqueue_drain_from_its_own_task() {
    let mut m = Model::new();
    let tq = m.taskqueue_create("nvmehp hotplug");
    let t = m.taskqueue_thread(tq);
    m.on_thread(t, |m| m.taskqueue_drain_all(tq));
    only(&m, Rule::DrainFromOwnTask);
}

#[test]
fn unload_with_nodes_or_pending_d_gone() {
    let mut m = Model::new();
    node(&mut m, "nvmehp0", flags::CHECKNAME, None);
    let ctx = m.malloc(M_NVMEHP, 8, true);
    let d = m.disk_create(0, ctx);
    m.disk_gone(d);
    let r = m.module_unloaded();
    assert!(r.violations.iter().filter(|v| v.rule == Rule::UnloadWithLiveCallbacks).count() >= 2, "{r:?}");
    assert!(r.to_json().contains("\"nodes_left\":[\"nvmehp0\"]"), "{}", r.to_json());
}

#[test]
fn destroy_twice() {
    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0", flags::CHECKNAME, None);
    m.destroy_dev(n);
    m.destroy_dev(n);
    only(&m, Rule::DoubleDestroy);
}

#[test]
fn disk_released_twice() {
    let mut m = Model::new();
    let ctx = m.malloc(M_NVMEHP, 8, true);
    let d = m.disk_create(0, ctx);
    m.disk_gone(d);
    m.disk_gone(d);
    only(&m, Rule::DiskDoubleRelease);
}

#[test]
fn alias_with_foreign_flags() {
    let mut m = Model::new();
    let n = node(&mut m, "nvmehp0n1", flags::CHECKNAME, None);
    assert!(m.make_dev_alias(n, "nvmehp0ns1", flags::ETERNAL).is_err());
    only(&m, Rule::BadMakeDevFlags);
}
