//! The whole removal path on the model: ACPI notify -> hotplug state machine -> newbus detach
//! -> the driver's teardown -> FreeBSD rules. "Busy" comes from really open nodes, and the
//! final report must show no node left, no violation, no leaked byte.

use kpimodel::controller::{attach, ModelIo};
use kpimodel::{Model, SlotEvent, SlotWorld, ThreadKind};
use nvme_hotplug::hotplug::fallback::FallbackRescan;
use nvme_hotplug::hotplug::machine::{Hotplug, HotplugConfig};
use nvme_hotplug::hotplug::mode::Role;
use nvme_hotplug::hotplug::ost::OstStatus;
use nvme_hotplug::hotplug::slot_ops::{DetachError, DetachReason, OpFailed, SlotIndex, SlotOps};
use nvme_hotplug::hotplug::teardown::{teardown, Live, Removal};

/// The glue: newbus children of the bus are our controllers.
struct Stack {
    world: SlotWorld,
    model: Model,
    ctrls: Vec<Option<Live<Model, ModelIo>>>,
}

impl Stack {
    fn new(n: usize) -> Self {
        let mut world = SlotWorld::new(n);
        for i in 0..n {
            world.set_handlers(i, false, true);
        }
        Stack { world, model: Model::new(), ctrls: (0..n).map(|_| None).collect() }
    }
}

impl SlotOps for Stack {
    fn present(&mut self, slot: SlotIndex) -> bool {
        self.world.present(slot)
    }
    fn sta(&mut self, slot: SlotIndex) -> Option<u32> {
        self.world.sta(slot)
    }
    fn has_child(&mut self, slot: SlotIndex) -> bool {
        self.world.has_child(slot)
    }
    fn rescan_slot(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.world.rescan_slot(slot)?;
        if self.world.is_attached(slot) && self.ctrls[slot].is_none() {
            // DEVICE_ATTACH of our driver.
            self.ctrls[slot] = Some(attach(&mut self.model, &[1, 2]).map_err(|_| OpFailed)?);
        }
        Ok(())
    }
    fn detach_slot(&mut self, slot: SlotIndex, why: DetachReason) -> Result<(), DetachError> {
        // DEVICE_DETACH of our driver: refuses an eject while a node or disk is open.
        if why == DetachReason::Eject && self.ctrls[slot].as_ref().is_some_and(|c| c.in_use(&self.model)) {
            return Err(DetachError::Busy);
        }
        self.world.detach_slot(slot, why)?;
        if let Some(live) = self.ctrls[slot].take() {
            let unit = live.unit();
            let how = if why == DetachReason::Eject { Removal::Announced } else { Removal::Surprise };
            teardown(live, &mut self.model, how);
            self.model.check_detached(unit);
        }
        Ok(())
    }
    fn eject(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.world.eject(slot)
    }
    fn ost(&mut self, slot: SlotIndex, source: u32, status: OstStatus) {
        self.world.ost(slot, source, status)
    }
    fn rescan_namespaces(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.world.rescan_namespaces(slot)
    }
}

fn notify(hp: &mut Hotplug, st: &mut Stack, slot: SlotIndex, v: u32) {
    st.world.firmware_notify(slot, v, hp);
    hp.run_pending(st);
}

#[test]
fn attach_busy_eject_release_eject() {
    let mut hp = Hotplug::new(vec![Role::Owner; 2], HotplugConfig::default());
    let mut st = Stack::new(2);
    st.world.insert(0);
    notify(&mut hp, &mut st, 0, 1);
    let mut nodes = st.model.report().nodes_left;
    nodes.sort();
    assert_eq!(nodes, ["nvmehp0", "nvmehp0ns1", "nvmehp0ns2"]);

    // nvmecontrol has the controller node open: the eject is refused, nothing is torn down.
    let n = st.model.find_node("nvmehp0").unwrap();
    st.model.open(n).unwrap();
    notify(&mut hp, &mut st, 0, 3);
    assert_eq!(st.world.osts(0).last(), Some(&(3, OstStatus::DeviceBusy)));
    assert_eq!(st.model.report().nodes_left.len(), 3);
    assert_eq!(st.world.count(|e| matches!(e, SlotEvent::Ej0 { .. })), 0);

    st.model.close(n, |_| {});
    notify(&mut hp, &mut st, 0, 3);
    assert_eq!(st.world.osts(0).last(), Some(&(3, OstStatus::Success)));
    st.model.run_geom_events();
    let r = st.model.module_unloaded();
    assert!(r.is_clean(), "{r:?}");
    assert!(st.world.violations.is_empty(), "{:?}", st.world.violations);
}

#[test]
fn surprise_removal_with_io_in_flight_is_swept_by_the_fallback_rescan() {
    let mut hp = Hotplug::new(vec![Role::Owner; 2], HotplugConfig::default());
    let mut st = Stack::new(2);
    st.world.insert(1);
    notify(&mut hp, &mut st, 1, 1);
    let io = st.ctrls[1].as_mut().unwrap().io().submit(1).unwrap();
    let reader = st.model.spawn_thread(ThreadKind::Kernel);
    let ns = st.model.find_node("nvmehp0ns1").unwrap();
    st.model.on_thread(reader, |m| m.enter_method(ns, Some(io))).unwrap();
    let disk = st.model.find_disk(1).unwrap();
    assert!(st.model.disk_open(disk), "a file system is mounted");

    // The device vanishes; no notify arrives.
    st.world.surprise_remove(1);
    let before = st.world.log.len();
    assert!(FallbackRescan::new(1000).tick(hp.pending_mut()));
    let rep = hp.run_pending(&mut st);
    assert_eq!(rep.swept, 1);
    assert!(st.model.io_done(io), "in-flight read failed with ENXIO at once");
    assert!(st.model.report().nodes_left.is_empty());
    let quiet = st.world.log[before..].iter().all(|e| !matches!(e, SlotEvent::Ej0 { .. } | SlotEvent::Ost { .. }));
    assert!(quiet, "a fallback sweep never evaluates _EJ0 or _OST: {:?}", &st.world.log[before..]);

    // umount: the last close lets GEOM call d_gone, which frees the disk.
    st.model.on_thread(reader, |m| m.leave_method(ns));
    st.model.disk_close(disk);
    st.model.run_geom_events();
    let r = st.model.module_unloaded();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn repeated_attach_detach_cycles_leave_nothing() {
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig::default());
    let mut st = Stack::new(1);
    for cycle in 0..20 {
        assert!(st.world.insert(0));
        for _ in 0..10 {
            st.world.firmware_notify(0, 1, &mut hp);
        }
        hp.run_pending(&mut st);
        assert!(st.ctrls[0].is_some(), "cycle {cycle}: attached");
        notify(&mut hp, &mut st, 0, 3);
        assert!(st.ctrls[0].is_none(), "cycle {cycle}: detached");
        st.model.run_geom_events();
        assert!(st.model.report().is_clean(), "cycle {cycle}: {:?}", st.model.report());
    }
    assert!(st.model.module_unloaded().is_clean());
    assert!(st.world.violations.is_empty());
}
