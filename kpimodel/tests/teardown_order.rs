//! The teardown order of src/hotplug/teardown.rs, run against the model: zero violations,
//! nothing left, nothing leaked. Also the kldunload policy of src/hotplug/unload.rs.

use kpimodel::controller::{attach, ModelIo};
use kpimodel::{Model, Rule, ThreadKind};
use nvme_hotplug::hotplug::errno::Errno;
use nvme_hotplug::hotplug::kernel::Kernel;
use nvme_hotplug::hotplug::teardown::{teardown, Live, Removal};
use nvme_hotplug::hotplug::unload::unload;

fn nodes_of(m: &Model) -> Vec<String> {
    m.report().nodes_left
}

#[test]
fn attach_creates_non_eternal_nodes_with_the_right_names() {
    let mut m = Model::new();
    let live = attach(&mut m, &[1, 2]).unwrap();
    let mut names = nodes_of(&m);
    names.sort();
    assert_eq!(names, ["nvmehp0", "nvmehp0ns1", "nvmehp0ns2"]);
    let f = teardown(live, &mut m, Removal::Surprise);
    m.run_geom_events();
    assert_eq!((f.nodes_destroyed, f.disks_gone), (3, 2));
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

/// Surprise removal with I/O in flight: a reader asleep in d_strategy and an ioctl asleep on an
/// admin command, with the interrupt and watchdog callout armed.
#[test]
fn teardown_with_io_in_flight_is_clean() {
    let mut m = Model::new();
    let mut live = attach(&mut m, &[1, 2]).unwrap();
    let unit = live.unit();

    // Threads inside node methods, each asleep on an outstanding request.
    let io1 = live.io().submit(1).unwrap();
    let io2 = live.io().submit(0).unwrap();
    let reader = m.spawn_thread(ThreadKind::Kernel);
    let ioctl = m.spawn_thread(ThreadKind::Kernel);
    let ns_node = find_node(&m, "nvmehp0ns1");
    let ctrl_node = find_node(&m, "nvmehp0");
    m.on_thread(reader, |m| m.enter_method(ns_node, Some(io1))).unwrap();
    m.on_thread(ioctl, |m| m.enter_method(ctrl_node, Some(io2))).unwrap();
    assert!(live.in_use(&m), "threads inside nodes make the controller busy");

    let freed = teardown(live, &mut m, Removal::Surprise);
    assert_eq!(freed.failed_requests, 2);
    assert!(m.io_done(io1) && m.io_done(io2), "outstanding I/O failed at once, not timed out");
    assert_eq!(m.check_detached(unit), 0);
    // The threads wake with ENXIO and leave; late callers get ENXIO from the dead node.
    m.on_thread(reader, |m| m.leave_method(ns_node));
    assert_eq!(m.enter_method(ns_node, None), Err(Errno::ENXIO));
    m.run_geom_events();
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

fn find_node(m: &Model, name: &str) -> kpimodel::NodeRef {
    m.find_node(name).unwrap_or_else(|| panic!("no node {name}"))
}

/// An announced removal lets the requests in flight finish on the still-present device.
#[test]
fn announced_removal_lets_in_flight_io_finish() {
    let mut m = Model::new();
    let mut live = attach(&mut m, &[1]).unwrap();
    let io = live.io().submit(1).unwrap();
    let freed = teardown(live, &mut m, Removal::Announced);
    assert!(m.io_done(io));
    assert_eq!(freed.failed_requests, 0, "nothing had to be failed");
    m.run_geom_events();
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn mounted_disk_is_freed_only_after_its_last_close() {
    let mut m = Model::new();
    let live = attach(&mut m, &[1]).unwrap();
    let disk = m.find_disk(1).unwrap();
    assert!(m.disk_open(disk));
    let _ = teardown(live, &mut m, Removal::Surprise);
    m.run_geom_events();
    assert_eq!(m.disks_awaiting_gone(), 1, "GEOM holds the disk while mounted");
    assert_eq!(m.report().leaked_bytes, kpimodel::controller::DISK_CTX_BYTES);
    m.disk_close(disk);
    m.run_geom_events();
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn namespace_removal_destroys_only_that_namespace() {
    let mut m = Model::new();
    let mut live = attach(&mut m, &[1, 2]).unwrap();
    let io = live.io().submit(2).unwrap();
    live.remove_namespace(&mut m, 2).unwrap();
    assert!(m.io_done(io));
    let mut names = nodes_of(&m);
    names.sort();
    assert_eq!(names, ["nvmehp0", "nvmehp0ns1"]);
    assert_eq!(live.remove_namespace(&mut m, 2), Err(Errno::ENXIO));
    let _ = teardown(live, &mut m, Removal::Surprise);
    m.run_geom_events();
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn namespace_list_changes_add_and_remove_nodes() {
    let mut m = Model::new();
    let mut live = attach(&mut m, &[1, 2]).unwrap();
    let io = live.io().submit(1).unwrap();
    assert_eq!(live.sync_namespaces(&mut m, &[2, 3, 4], |ns| 100 + ns), Ok((2, 1)));
    assert!(m.io_done(io), "I/O of the deleted namespace failed");
    let mut names = nodes_of(&m);
    names.sort();
    assert_eq!(names, ["nvmehp0", "nvmehp0ns2", "nvmehp0ns3", "nvmehp0ns4"]);
    assert_eq!(live.sync_namespaces(&mut m, &[2, 3, 4], |ns| 100 + ns), Ok((0, 0)), "idempotent");
    let _ = teardown(live, &mut m, Removal::Surprise);
    m.run_geom_events();
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

/// The model sees the teardown's sleeping calls: run it with a mutex held and it complains.
/// (Guards against a model that checks nothing.)
#[test]
fn teardown_under_a_mutex_is_caught() {
    let mut m = Model::new();
    let live = attach(&mut m, &[1]).unwrap();
    let mtx = m.mtx_init("wrong");
    m.mtx_lock(mtx);
    let _ = teardown(live, &mut m, Removal::Surprise);
    assert!(m.broke(Rule::SleepWithMutex));
}

/// A failed attach (duplicate namespace node name) still tears down cleanly.
#[test]
fn partial_attach_tears_down_cleanly() {
    let mut m = Model::new();
    let mut live = attach(&mut m, &[1]).unwrap();
    assert_eq!(live.add_namespace(&mut m, 1, 99), Err(Errno::EEXIST));
    // Someone else holds the name we want next: make_node returns EEXIST (CHECKNAME), no panic.
    let other = m.malloc(kpimodel::memory::M_NVMEHP, 8, true);
    let squatter = Kernel::make_node(&mut m, &nvme_hotplug::hotplug::node_name::NodeName::namespace(0, 3), other).unwrap();
    assert_eq!(live.add_namespace(&mut m, 3, 3), Err(Errno::EEXIST));
    assert!(m.violations().is_empty(), "{:?}", m.violations());
    let _ = teardown(live, &mut m, Removal::Surprise);
    m.destroy_dev(squatter);
    m.free(other);
    m.run_geom_events();
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn kldunload_refuses_with_ebusy_while_a_node_is_open() {
    let mut m = Model::new();
    m.install_notify_handler();
    let hp_tq = m.taskqueue_create("nvmehp hotplug");
    let a: Live<Model, ModelIo> = attach(&mut m, &[1]).unwrap();
    let b = attach(&mut m, &[1]).unwrap();
    let node = find_node(&m, "nvmehp1ns1");
    m.open(node).unwrap();
    let refused = match unload(&mut m, vec![a, b], None, Some(hp_tq)) {
        Err(r) => r,
        Ok(_) => panic!("unload must refuse while nvmehp1ns1 is open"),
    };
    assert_eq!(refused.errno, Errno::EBUSY);
    assert_eq!(nodes_of(&m).len(), 4, "refusal touches nothing");
    assert_eq!(m.notify_handlers(), 1);
    m.close(node, |_| {});
    let done = unload(&mut m, refused.controllers, None, Some(hp_tq)).ok().expect("unload after close");
    assert_eq!(done.controllers.len(), 2);
    assert!(m.module_unloaded().is_clean(), "{:?}", m.report());
}

#[test]
fn kldunload_refuses_while_a_disk_is_mounted() {
    let mut m = Model::new();
    let a = attach(&mut m, &[1]).unwrap();
    let disk = m.find_disk(1).unwrap();
    m.disk_open(disk);
    assert!(unload(&mut m, vec![a], None, None).is_err());
    assert!(m.violations().is_empty());
}

#[test]
fn kldunload_from_an_acpi_task_thread_is_caught() {
    let mut m = Model::new();
    m.install_notify_handler();
    let a = attach(&mut m, &[1]).unwrap();
    let acpi = m.spawn_thread(ThreadKind::AcpiTask);
    let _ = m.on_thread(acpi, |m| unload(m, vec![a], None, None).is_ok());
    assert!(m.broke(Rule::RemoveNotifyFromAcpiTask));
}
