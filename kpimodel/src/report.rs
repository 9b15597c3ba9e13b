//! The end-of-run summary the lab puts in its JSON report, and the module unload checks.

use crate::memory::M_NVMEHP;
use crate::model::Model;
use crate::node_prefix;
use crate::rules::{Rule, Violation};

/// What a run left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Our nodes still published (`nvmehp*`).
    pub nodes_left: Vec<String>,
    /// Every broken rule.
    pub violations: Vec<Violation>,
    /// Bytes of our malloc type still allocated.
    pub leaked_bytes: usize,
}

impl Report {
    /// Nothing left, nothing broken.
    pub fn is_clean(&self) -> bool {
        self.nodes_left.is_empty() && self.violations.is_empty() && self.leaked_bytes == 0
    }

    /// The report as a JSON object (`{"nodes_left":[..],"violations":[..],"leaked_bytes":N}`),
    /// without a JSON dependency: the lab embeds it in its own report.
    pub fn to_json(&self) -> String {
        fn esc(s: &str) -> String {
            let mut o = String::with_capacity(s.len() + 2);
            o.push('"');
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
        let nodes: Vec<String> = self.nodes_left.iter().map(|n| esc(n)).collect();
        let viol: Vec<String> = self
            .violations
            .iter()
            .map(|v| format!("{{\"rule\":{},\"detail\":{},\"source\":{}}}", esc(&format!("{:?}", v.rule)), esc(&v.detail), esc(v.rule.source())))
            .collect();
        format!(
            "{{\"nodes_left\":[{}],\"violations\":[{}],\"leaked_bytes\":{}}}",
            nodes.join(","),
            viol.join(","),
            self.leaked_bytes
        )
    }
}

impl Model {
    /// The summary so far.
    pub fn report(&self) -> Report {
        Report {
            nodes_left: self.live_nodes().into_iter().filter(|n| n.starts_with(node_prefix())).collect(),
            violations: self.violations.clone(),
            leaked_bytes: self.allocated_bytes(M_NVMEHP),
        }
    }

    /// MOD_UNLOAD has returned: the module's text and cdevsw are about to disappear.
    /// Records what would then call into freed text, and the leak warning malloc_uninit
    /// prints. Returns the final report.
    pub fn module_unloaded(&mut self) -> Report {
        let nodes: Vec<String> = self.live_nodes().into_iter().filter(|n| n.starts_with(node_prefix())).collect();
        for n in &nodes {
            self.violate(Rule::UnloadWithLiveCallbacks, format!("/dev/{n} outlives the module's cdevsw"));
        }
        let pending = self.disks_awaiting_gone();
        if pending > 0 {
            self.violate(Rule::UnloadWithLiveCallbacks, format!("{pending} d_gone callback(s) still to run"));
        }
        if self.notify_handlers() > 0 {
            self.violate(Rule::UnloadWithLiveCallbacks, format!("{} ACPI notify handler(s) still installed", self.notify_handlers()));
        }
        let armed = self.callbacks.iter().filter(|c| c.armed && c.kind != crate::model::CbKind::Pointer).count();
        if armed > 0 {
            self.violate(Rule::UnloadWithLiveCallbacks, format!("{armed} interrupt/callout/task callback(s) still armed"));
        }
        let leaked = self.allocated_bytes(M_NVMEHP);
        if leaked > 0 {
            self.violate(Rule::Leak, format!("memory type {M_NVMEHP} leaked {leaked} bytes on destroy"));
        }
        self.report()
    }
}
