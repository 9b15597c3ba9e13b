//! The hook through which a model of the kernel watches a scenario run.
//!
//! The runner plays the FreeBSD kernel around the engine: it creates a device node per
//! namespace after bring-up, routes I/O through those nodes, and on removal stops new I/O,
//! fails or drains what is in flight, destroys the nodes, and only then frees the controller.
//! Each of those moments is reported to an [`Observer`]. The report's `nodes_left` and
//! `violations` come from the observer, so a stricter model of the kernel's rules (the hotplug
//! helper's `kpimodel`: devfs, destroy_dev(9) draining, malloc poisoning) is plugged in by default
//! ([`crate::freebsd_model::FreeBsdRules`]); another can be given with
//! [`crate::runner::Runner::with_observer`] without touching the runner.
//!
//! [`NodeRules`] is the built-in observer: it checks the ordering rules the runner must obey
//! itself, so a bug in the lab's teardown order shows up as a violation, not as silence.

use std::collections::BTreeMap;

/// A namespace device node, named like nvd(4)/nda(4) would see it: controller id + nsid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeId {
    /// Scenario controller id.
    pub ctrl: String,
    /// Namespace id.
    pub nsid: u32,
}

/// Watches the kernel-side events of a run. Every method has a default so an observer only
/// implements what it models.
pub trait Observer {
    /// The platform sent `Notify(slot, code)` (1 = device check, 3 = eject request).
    fn notify(&mut self, _slot: u8, _code: u32) {}
    /// A controller finished bring-up.
    fn controller_attached(&mut self, _ctrl: &str, _slot: u8) {}
    /// A node was created (after bring-up, one per namespace).
    fn node_created(&mut self, _node: &NodeId) {}
    /// An I/O request was accepted by the engine through `node`.
    fn io_started(&mut self, _node: &NodeId, _tag: u64) {}
    /// The request `tag` completed (successfully or not).
    fn io_finished(&mut self, _node: &NodeId, _tag: u64, _ok: bool) {}
    /// A consumer opened the node (a mount; the `open` step).
    fn node_opened(&mut self, _node: &NodeId) {}
    /// The consumer closed it (possibly after its controller was removed).
    fn node_closed(&mut self, _node: &NodeId) {}
    /// The driver began detaching `ctrl` (announced or surprise); `outstanding` requests were in
    /// flight at that moment.
    fn detach_started(&mut self, _ctrl: &str, _surprise: bool, _outstanding: usize) {}
    /// A node was destroyed.
    fn node_destroyed(&mut self, _node: &NodeId) {}
    /// The controller's memory was freed (the engine object dropped).
    fn controller_freed(&mut self, _ctrl: &str) {}
    /// The run is over and every controller was detached: the module is unloaded.
    fn module_unloaded(&mut self) {}
    /// Nodes that exist now.
    fn nodes_alive(&self) -> usize {
        0
    }
    /// Rule violations seen so far.
    fn violations(&self) -> Vec<String> {
        Vec::new()
    }
    /// A kernel model's own end-of-run summary (nodes, violations with their FreeBSD rule,
    /// leaked bytes), embedded in the JSON report as `kernel`.
    fn kernel_report(&self) -> Option<crate::report::KernelReport> {
        None
    }
}

/// Per-node bookkeeping of [`NodeRules`].
#[derive(Debug, Default)]
struct NodeState {
    alive: bool,
    in_flight: usize,
}

/// The built-in observer: device nodes and the order rules of teardown.
///
/// Rules (each broken rule is one violation line):
/// 1. no I/O starts on a node that does not exist;
/// 2. a node is destroyed only when no request through it is in flight (destroy_dev(9) drains:
///    in-flight I/O must have been completed or failed first);
/// 3. a controller is freed only after all its nodes are destroyed (no orphan nodes);
/// 4. no completion arrives for a controller already freed (use after free);
/// 5. a node is not created twice.
#[derive(Debug, Default)]
pub struct NodeRules {
    nodes: BTreeMap<NodeId, NodeState>,
    freed: BTreeMap<String, bool>,
    violations: Vec<String>,
}

impl NodeRules {
    /// A fresh observer.
    pub fn new() -> Self {
        Self::default()
    }

    fn violation(&mut self, v: String) {
        // Bounded: a broken run must not produce a gigabyte report.
        if self.violations.len() < 100 {
            self.violations.push(v);
        }
    }
}

impl Observer for NodeRules {
    fn controller_attached(&mut self, ctrl: &str, _slot: u8) {
        self.freed.insert(ctrl.to_string(), false);
    }

    fn node_created(&mut self, node: &NodeId) {
        let st = self.nodes.entry(node.clone()).or_default();
        if st.alive {
            let v = format!("node {}/{} created twice", node.ctrl, node.nsid);
            self.violation(v);
        }
        let st = self.nodes.entry(node.clone()).or_default();
        st.alive = true;
        st.in_flight = 0;
    }

    fn io_started(&mut self, node: &NodeId, tag: u64) {
        let st = self.nodes.entry(node.clone()).or_default();
        st.in_flight += 1;
        if !st.alive {
            let v = format!("I/O {tag:#x} started on node {}/{} that does not exist", node.ctrl, node.nsid);
            self.violation(v);
        }
    }

    fn io_finished(&mut self, node: &NodeId, tag: u64, _ok: bool) {
        if self.freed.get(&node.ctrl).copied().unwrap_or(false) {
            let v = format!("I/O {tag:#x} completed after controller {} was freed", node.ctrl);
            self.violation(v);
        }
        let st = self.nodes.entry(node.clone()).or_default();
        st.in_flight = st.in_flight.saturating_sub(1);
    }

    fn node_destroyed(&mut self, node: &NodeId) {
        let st = self.nodes.entry(node.clone()).or_default();
        let (alive, busy) = (st.alive, st.in_flight);
        st.alive = false;
        if !alive {
            let v = format!("node {}/{} destroyed but not alive", node.ctrl, node.nsid);
            self.violation(v);
        }
        if busy > 0 {
            let v = format!("node {}/{} destroyed with {busy} request(s) in flight", node.ctrl, node.nsid);
            self.violation(v);
        }
    }

    fn controller_freed(&mut self, ctrl: &str) {
        let orphans: Vec<String> = self
            .nodes
            .iter()
            .filter(|(n, s)| n.ctrl == ctrl && s.alive)
            .map(|(n, _)| format!("{}/{}", n.ctrl, n.nsid))
            .collect();
        for o in orphans {
            self.violation(format!("controller {ctrl} freed while node {o} still exists (orphan node)"));
        }
        self.freed.insert(ctrl.to_string(), true);
    }

    fn nodes_alive(&self) -> usize {
        self.nodes.values().filter(|s| s.alive).count()
    }

    fn violations(&self) -> Vec<String> {
        self.violations.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(c: &str, ns: u32) -> NodeId {
        NodeId { ctrl: c.into(), nsid: ns }
    }

    #[test]
    fn clean_lifecycle_has_no_violation() {
        let mut o = NodeRules::new();
        o.controller_attached("c1", 6);
        o.node_created(&n("c1", 1));
        o.io_started(&n("c1", 1), 1);
        o.io_finished(&n("c1", 1), 1, false);
        o.node_destroyed(&n("c1", 1));
        o.controller_freed("c1");
        assert_eq!(o.violations(), Vec::<String>::new());
        assert_eq!(o.nodes_alive(), 0);
    }

    #[test]
    fn each_rule_can_fail() {
        let mut o = NodeRules::new();
        o.controller_attached("c1", 6);
        o.io_started(&n("c1", 1), 1); // rule 1
        o.node_created(&n("c1", 2));
        o.node_created(&n("c1", 2)); // rule 5
        o.io_started(&n("c1", 2), 2);
        o.node_destroyed(&n("c1", 2)); // rule 2
        o.node_created(&n("c1", 3));
        o.controller_freed("c1"); // rule 3
        o.io_finished(&n("c1", 2), 2, false); // rule 4
        let v = o.violations();
        assert_eq!(v.len(), 5, "{v:#?}");
        assert_eq!(o.nodes_alive(), 1);
    }
}
