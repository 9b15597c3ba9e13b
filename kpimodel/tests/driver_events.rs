//! The lab-facing event adapter without QEMU: the lab's teardown order is clean, and the
//! wrong orders the lab's own observer looks for are caught by the FreeBSD rules too.

use kpimodel::{DriverEvents, Rule};

fn attach(e: &mut DriverEvents, c: &str) {
    e.controller_attached(c, 6);
    e.node_created(c, 1);
    e.node_created(c, 2);
}

#[test]
fn the_lab_order_is_clean() {
    let mut e = DriverEvents::new();
    attach(&mut e, "ebs");
    assert_eq!(e.nodes_alive(), 2);
    e.io_started("ebs", 1, 7);
    e.io_started("ebs", 2, 8);
    e.io_finished("ebs", 1, 7, true);
    e.detach_started("ebs", true, 1);
    e.io_finished("ebs", 2, 8, false); // failed with ENXIO by fail_all
    e.node_destroyed("ebs", 1);
    e.node_destroyed("ebs", 2);
    e.controller_freed("ebs");
    assert_eq!(e.nodes_alive(), 0);
    let r = e.report();
    assert!(r.is_clean(), "{r:?}");
    // The same id can attach again (hotplug cycles).
    attach(&mut e, "ebs");
    assert!(e.violations().is_empty());
}

#[test]
fn destroying_a_node_with_io_in_flight_is_caught() {
    let mut e = DriverEvents::new();
    attach(&mut e, "c");
    e.io_started("c", 1, 1);
    e.detach_started("c", true, 1);
    e.node_destroyed("c", 1);
    assert!(e.model().broke(Rule::DestroyWaitsForever), "{:?}", e.violations());
}

#[test]
fn freeing_with_a_node_left_is_caught() {
    let mut e = DriverEvents::new();
    attach(&mut e, "c");
    e.detach_started("c", false, 0);
    e.node_destroyed("c", 1);
    e.controller_freed("c");
    assert!(e.model().broke(Rule::OrphanNode));
    assert!(e.model().broke(Rule::NodeLeftAfterDetach));
    assert_eq!(e.report().nodes_left, ["nvmehp0ns2"]);
}

#[test]
fn completion_after_free_is_caught() {
    let mut e = DriverEvents::new();
    attach(&mut e, "c");
    e.io_started("c", 1, 1);
    e.detach_started("c", true, 1);
    e.controller_freed("c");
    e.io_finished("c", 1, 1, false);
    assert!(e.model().broke(Rule::UseAfterFree));
}
