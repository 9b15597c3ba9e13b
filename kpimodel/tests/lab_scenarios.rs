//! The shipped lab scenarios (scenarios/*.toml) run against QEMU's real NVMe and PIIX4 ACPI
//! hotplug with this FreeBSD model plugged in as the lab's observer, next to the lab's own
//! NodeRules. The run must be ok and the model must end with no node left, no violation and
//! no leaked byte. Without QEMU the tests print the lab's loud SKIP line.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use kpimodel::DriverEvents;
use nvmehp_lab::observer::{NodeId, NodeRules, Observer};
use nvmehp_lab::runner::Runner;
use nvmehp_lab::scenario::Scenario;
use nvmehp_lab::skip::qemu_or_skip;

/// The lab's own rules plus the FreeBSD model.
struct Both {
    rules: NodeRules,
    model: Rc<RefCell<DriverEvents>>,
}

impl Observer for Both {
    fn notify(&mut self, slot: u8, code: u32) {
        self.rules.notify(slot, code);
        self.model.borrow_mut().notify(slot, code);
    }
    fn controller_attached(&mut self, ctrl: &str, slot: u8) {
        self.rules.controller_attached(ctrl, slot);
        self.model.borrow_mut().controller_attached(ctrl, slot);
    }
    fn node_created(&mut self, n: &NodeId) {
        self.rules.node_created(n);
        self.model.borrow_mut().node_created(&n.ctrl, n.nsid);
    }
    fn io_started(&mut self, n: &NodeId, tag: u64) {
        self.rules.io_started(n, tag);
        self.model.borrow_mut().io_started(&n.ctrl, n.nsid, tag);
    }
    fn io_finished(&mut self, n: &NodeId, tag: u64, ok: bool) {
        self.rules.io_finished(n, tag, ok);
        self.model.borrow_mut().io_finished(&n.ctrl, n.nsid, tag, ok);
    }
    fn detach_started(&mut self, ctrl: &str, surprise: bool, outstanding: usize) {
        self.rules.detach_started(ctrl, surprise, outstanding);
        self.model.borrow_mut().detach_started(ctrl, surprise, outstanding);
    }
    fn node_destroyed(&mut self, n: &NodeId) {
        self.rules.node_destroyed(n);
        self.model.borrow_mut().node_destroyed(&n.ctrl, n.nsid);
    }
    fn controller_freed(&mut self, ctrl: &str) {
        self.rules.controller_freed(ctrl);
        self.model.borrow_mut().controller_freed(ctrl);
    }
    fn nodes_alive(&self) -> usize {
        self.model.borrow().nodes_alive()
    }
    fn violations(&self) -> Vec<String> {
        let mut v = self.rules.violations();
        v.extend(self.model.borrow().violations());
        v
    }
}

fn run(name: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name);
    let sc = Scenario::load(&path).expect("scenario parses");
    let model = Rc::new(RefCell::new(DriverEvents::new()));
    let obs = Both { rules: NodeRules::new(), model: model.clone() };
    let r = Runner::new(sc).with_observer(Box::new(obs)).run();
    eprintln!("{}", r.summary());
    let m = model.borrow();
    let rep = m.report();
    eprintln!("kpimodel: {}", rep.to_json());
    assert!(r.ok, "{}", r.summary());
    assert!(rep.violations.is_empty(), "{}", rep.to_json());
    assert!(m.notifies() > 0 || name == "smoke.toml", "the model saw the ACPI notifies");
    // The lab detaches every controller at the end of a run (the module-unload path), so the
    // model must end empty: no node, no byte of M_NVMEHP, no violation.
    assert!(rep.is_clean(), "{}", rep.to_json());
    assert_eq!(r.nodes_left, 0);
}

#[test]
fn smoke_with_freebsd_model() {
    if qemu_or_skip("smoke_with_freebsd_model") {
        run("smoke.toml");
    }
}

#[test]
fn hotplug_cycles_with_freebsd_model() {
    if qemu_or_skip("hotplug_cycles_with_freebsd_model") {
        run("hotplug-cycles.toml");
    }
}

#[test]
fn remove_under_write_with_freebsd_model() {
    if qemu_or_skip("remove_under_write_with_freebsd_model") {
        run("remove-under-write.toml");
    }
}
