//! The FreeBSD-rules model (`kpimodel`) plugged in as the lab's observer: the default for every
//! run, the CLI's included.
//!
//! The runner plays the kernel around the engine; [`FreeBsdRules`] turns each moment it reports
//! into the kernel calls the FreeBSD driver makes at that moment (make_dev, disk_create, a thread
//! in d_strategy, disk_gone, destroy_dev, free, d_gone; see `kpimodel::driver_events`), and the
//! model judges them against the KPI's rules (docs/freebsd-kpi.md, sections 5 and 6). So the
//! report's `nodes_left`,
//! `violations` and `leaked_bytes` say what a FreeBSD kernel would have been left with, each
//! violation naming the rule and the FreeBSD source it mirrors.
//!
//! The lab's own [`NodeRules`] run beside the model: they check the runner's ordering, so a
//! bug in the harness's teardown order is not mistaken for (or hidden by) a model finding.

use kpimodel::DriverEvents;

use crate::observer::{NodeId, NodeRules, Observer};
use crate::report::{KernelReport, KernelViolation};

/// NodeRules + the FreeBSD model.
#[derive(Debug, Default)]
pub struct FreeBsdRules {
    rules: NodeRules,
    model: DriverEvents,
    unloaded: bool,
}

impl FreeBsdRules {
    /// A fresh model (nothing attached, no node, no byte allocated).
    pub fn new() -> Self {
        Self::default()
    }

    /// The model, for tests that look closer.
    pub fn model(&self) -> &DriverEvents {
        &self.model
    }
}

impl Observer for FreeBsdRules {
    fn notify(&mut self, slot: u8, code: u32) {
        self.rules.notify(slot, code);
        self.model.notify(slot, code);
    }
    fn controller_attached(&mut self, ctrl: &str, slot: u8) {
        self.rules.controller_attached(ctrl, slot);
        self.model.controller_attached(ctrl, slot);
    }
    fn node_created(&mut self, n: &NodeId) {
        self.rules.node_created(n);
        self.model.node_created(&n.ctrl, n.nsid);
    }
    fn io_started(&mut self, n: &NodeId, tag: u64) {
        self.rules.io_started(n, tag);
        self.model.io_started(&n.ctrl, n.nsid, tag);
    }
    fn io_finished(&mut self, n: &NodeId, tag: u64, ok: bool) {
        self.rules.io_finished(n, tag, ok);
        self.model.io_finished(&n.ctrl, n.nsid, tag, ok);
    }
    fn node_opened(&mut self, n: &NodeId) {
        self.model.node_opened(&n.ctrl, n.nsid);
    }
    fn node_closed(&mut self, n: &NodeId) {
        self.model.node_closed(&n.ctrl, n.nsid);
    }
    fn detach_started(&mut self, ctrl: &str, surprise: bool, outstanding: usize) {
        self.rules.detach_started(ctrl, surprise, outstanding);
        self.model.detach_started(ctrl, surprise, outstanding);
    }
    fn node_destroyed(&mut self, n: &NodeId) {
        self.rules.node_destroyed(n);
        self.model.node_destroyed(&n.ctrl, n.nsid);
    }
    fn controller_freed(&mut self, ctrl: &str) {
        self.rules.controller_freed(ctrl);
        self.model.controller_freed(ctrl);
    }
    fn module_unloaded(&mut self) {
        if !self.unloaded {
            self.unloaded = true;
            self.model.module_unloaded();
        }
    }
    fn nodes_alive(&self) -> usize {
        // The model's count (published `nvmehp<U>ns<N>` nodes), and never fewer than the
        // harness's own count: a disagreement must not hide a node.
        self.model.nodes_alive().max(self.rules.nodes_alive())
    }
    fn violations(&self) -> Vec<String> {
        let mut v: Vec<String> = self.rules.violations().into_iter().map(|l| format!("lab rules: {l}")).collect();
        v.extend(self.model.violations().into_iter().map(|l| format!("kpimodel: {l}")));
        v
    }
    fn kernel_report(&self) -> Option<KernelReport> {
        let r = self.model.report();
        Some(KernelReport {
            model: "kpimodel (FreeBSD devfs, destroy_dev(9), disk(9), malloc(9) rules)".into(),
            nodes_left: r.nodes_left,
            violations: r
                .violations
                .iter()
                .map(|v| KernelViolation {
                    rule: format!("{:?}", v.rule),
                    detail: v.detail.clone(),
                    source: v.rule.source().to_string(),
                })
                .collect(),
            leaked_bytes: r.leaked_bytes as u64,
            notifies: self.model.notifies(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(c: &str, ns: u32) -> NodeId {
        NodeId { ctrl: c.into(), nsid: ns }
    }

    #[test]
    fn clean_lifecycle_leaves_nothing() {
        let mut o = FreeBsdRules::new();
        o.controller_attached("c1", 6);
        o.node_created(&n("c1", 1));
        o.io_started(&n("c1", 1), 7);
        o.io_finished(&n("c1", 1), 7, true);
        o.detach_started("c1", false, 0);
        o.node_destroyed(&n("c1", 1));
        o.controller_freed("c1");
        o.module_unloaded();
        assert_eq!(o.violations(), Vec::<String>::new());
        let k = o.kernel_report().unwrap();
        assert!(k.nodes_left.is_empty() && k.violations.is_empty() && k.leaked_bytes == 0, "{k:?}");
    }

    #[test]
    fn open_disk_outlives_its_controller_until_the_last_close() {
        let mut o = FreeBsdRules::new();
        o.controller_attached("c1", 6);
        o.node_created(&n("c1", 1));
        o.node_opened(&n("c1", 1));
        o.detach_started("c1", true, 0);
        o.node_destroyed(&n("c1", 1));
        o.controller_freed("c1");
        // Mounted: d_gone has not run, its context is still allocated.
        assert!(o.kernel_report().unwrap().leaked_bytes > 0);
        o.node_closed(&n("c1", 1));
        o.module_unloaded();
        let k = o.kernel_report().unwrap();
        assert!(k.violations.is_empty() && k.leaked_bytes == 0, "{k:?}");
    }

    #[test]
    fn unload_with_a_disk_still_open_is_a_violation() {
        let mut o = FreeBsdRules::new();
        o.controller_attached("c1", 6);
        o.node_created(&n("c1", 1));
        o.node_opened(&n("c1", 1));
        o.detach_started("c1", true, 0);
        o.node_destroyed(&n("c1", 1));
        o.controller_freed("c1");
        o.module_unloaded();
        let k = o.kernel_report().unwrap();
        assert!(!k.violations.is_empty(), "{k:?}");
    }

    #[test]
    fn orphan_node_is_named_by_the_model_with_its_freebsd_rule() {
        let mut o = FreeBsdRules::new();
        o.controller_attached("c1", 6);
        o.node_created(&n("c1", 1));
        o.controller_freed("c1"); // node never destroyed: orphan
        o.module_unloaded();
        let k = o.kernel_report().unwrap();
        assert!(!k.violations.is_empty(), "{k:?}");
        assert!(k.violations.iter().all(|v| !v.source.is_empty()), "{k:?}");
        assert_eq!(o.nodes_alive(), 1);
        assert!(o.violations().iter().any(|v| v.starts_with("kpimodel: ")), "{:?}", o.violations());
    }
}
