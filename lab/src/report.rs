//! The JSON report of a scenario run, and the rule that decides `ok`.

use serde::Serialize;

/// Time spent in one top-level step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The step's `op`.
    pub op: String,
    /// Wall-clock milliseconds.
    pub ms: f64,
    /// A short human note (what happened).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Counters about QEMU itself (informational: they never decide `ok`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QemuFigures {
    /// qtest commands sent.
    pub qtest_commands: u64,
    /// QMP commands sent.
    pub qmp_commands: u64,
    /// ACPI GPEs handled (SCI with the hotplug bit).
    pub gpes: u64,
    /// Devices QEMU did not finish deleting after eject (a known QEMU behaviour when ejected
    /// with commands in flight in its backend; not a driver failure).
    pub devices_not_deleted: usize,
    /// QEMU resident set size at the end, KiB.
    pub rss_kib: u64,
}

/// I/O totals over every job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IoFigures {
    /// Requests submitted.
    pub submitted: u64,
    /// Reads checked against the ledger and found right.
    pub reads_verified: u64,
    /// Reads that returned wrong data.
    pub read_mismatches: u64,
    /// Bytes moved successfully.
    pub bytes: u64,
    /// Submissions refused by the engine (other than a full queue).
    pub refused: u64,
}

/// What the hotplug state machine did (sums of its run reports).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HotplugFigures {
    /// ACPI notifications delivered to it.
    pub notifies: u64,
    /// Slot rescans (device checks that attached something).
    pub rescans: u64,
    /// Detaches it asked for.
    pub detaches: u64,
    /// `_EJ0` evaluations.
    pub ejects: u64,
    /// Ejects confirmed complete.
    pub ejected: u64,
    /// Ejects refused (device busy / in use).
    pub refused: u64,
    /// Failures it reported (each is also a violation).
    pub failures: u64,
}

/// How completions were noticed (the scenario's `interrupts` mode).
#[derive(Debug, Clone, Default, Serialize)]
pub struct InterruptFigures {
    /// `poll`, `msix` or `intx`.
    pub mode: String,
    /// Interrupts taken (each followed by a poll).
    pub taken: u64,
    /// I/O completions reaped by a poll that followed an interrupt.
    pub reaped_by_irq: u64,
    /// I/O completions reaped by the once-a-second watchdog poll (missed interrupts, or
    /// completions that raced the check); in `poll` mode, every completion.
    pub reaped_by_watchdog: u64,
}

/// Removals the scenario caused, and what was in flight at the moment of removal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemovalFigures {
    /// Announced removals (`device_del` -> Notify 3 -> detach -> `_EJ0`).
    pub announced: u64,
    /// Surprise removals (eject with no notification).
    pub surprise: u64,
    /// Eject requests refused because a node was open.
    pub refused: u64,
    /// Removals that happened with at least one request in flight.
    pub with_io_in_flight: u64,
    /// Requests in flight at those moments, summed.
    pub requests_in_flight: u64,
    /// Removals injected at a device access of a bring-up (`bringup-removal-sweep`).
    pub during_bring_up: u64,
}

/// One rule a kernel model saw broken.
#[derive(Debug, Clone, Serialize)]
pub struct KernelViolation {
    /// The rule (e.g. `OrphanNode`).
    pub rule: String,
    /// What happened.
    pub detail: String,
    /// The FreeBSD source the rule mirrors.
    pub source: String,
}

/// What the kernel model was left with at module unload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelReport {
    /// Which model.
    pub model: String,
    /// Our device nodes still published.
    pub nodes_left: Vec<String>,
    /// Every broken rule, with its FreeBSD source.
    pub violations: Vec<KernelViolation>,
    /// Bytes of the driver's malloc type still allocated.
    pub leaked_bytes: u64,
    /// ACPI notifies the model saw.
    pub notifies: u64,
}

/// The report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Seed used.
    pub seed: u64,
    /// Machine model.
    pub machine: String,
    /// Who drove the controllers: `engine` (the lab's kernel around the engine) or `kld` (the
    /// shipped .ko in kldhost).
    pub driver: String,
    /// What a removed controller's reads returned (`zeros` as in QEMU, `all-ones` as on PCIe).
    pub removal_reads: String,
    /// How the lab reached guest RAM (`shared` or `qtest`).
    pub ram_access: String,
    /// True if nothing below went wrong.
    pub ok: bool,
    /// Hot-remove cycles completed (a controller attached, then removed and torn down).
    pub cycles: u64,
    /// Write requests the engine reported complete.
    pub acked_writes: u64,
    /// Acked writes whose data is not in the image file at the end.
    pub lost_writes: u64,
    /// Requests completed with an error (expected around removals).
    pub failed_ops: u64,
    /// Requests never completed by the engine.
    pub hung_ops: u64,
    /// Panics caught inside the engine.
    pub panics: u64,
    /// Bytes still allocated after every controller and job is gone: DMA memory (guest RAM,
    /// `dma_leaked_bytes`) plus the kernel model's malloc(9) bytes (`kernel.leaked_bytes`).
    pub leaked_bytes: u64,
    /// DMA bytes (guest RAM) still allocated at the end.
    pub dma_leaked_bytes: u64,
    /// Device nodes alive at the end (after every controller was torn down), as the kernel
    /// model counts them.
    pub nodes_left: usize,
    /// Everything that broke a rule or an expectation (the kernel model's lines start with
    /// `observer: kpimodel:` and name the FreeBSD rule and source).
    pub violations: Vec<String>,
    /// The kernel model's own summary (absent only with an observer that has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelReport>,
    /// Per top-level step timing.
    pub steps: Vec<StepRecord>,
    /// I/O totals.
    pub io: IoFigures,
    /// The hotplug state machine's counters.
    pub hotplug: HotplugFigures,
    /// Removals and what they interrupted.
    pub removals: RemovalFigures,
    /// Interrupts and what they reaped.
    pub interrupts: InterruptFigures,
    /// QEMU figures.
    pub qemu: QemuFigures,
    /// Total wall-clock milliseconds.
    pub total_ms: f64,
}

impl Report {
    /// Applies the `ok` rule: no lost write, no hung request, no panic, no leak, no node left,
    /// no corrupt read, no violation (unmet expectations are violations).
    pub fn decide(&mut self) {
        self.ok = self.lost_writes == 0
            && self.hung_ops == 0
            && self.panics == 0
            && self.leaked_bytes == 0
            && self.nodes_left == 0
            && self.io.read_mismatches == 0
            && self.violations.is_empty();
    }

    /// A few human lines.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} ({}): {} — cycles {}, acked writes {}, lost {}, failed ops {}, hung {}, panics {}, leaked {} B, nodes left {}, {} violation(s), {:.0} ms",
            self.name,
            if self.driver.is_empty() { "engine" } else { &self.driver },
            if self.ok { "OK" } else { "FAILED" },
            self.cycles,
            self.acked_writes,
            self.lost_writes,
            self.failed_ops,
            self.hung_ops,
            self.panics,
            self.leaked_bytes,
            self.nodes_left,
            self.violations.len(),
            self.total_ms
        );
        if self.interrupts.mode != "poll" && !self.interrupts.mode.is_empty() {
            let i = &self.interrupts;
            s.push_str(&format!(
                "\n  interrupts ({}): {} taken, {} completions reaped after one, {} by the watchdog poll",
                i.mode, i.taken, i.reaped_by_irq, i.reaped_by_watchdog
            ));
        }
        for v in self.violations.iter().take(20) {
            s.push_str("\n  violation: ");
            s.push_str(v);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_bad_counter_fails_the_run() {
        let mut r = Report::default();
        r.decide();
        assert!(r.ok);
        for f in [
            |r: &mut Report| r.lost_writes = 1,
            |r: &mut Report| r.hung_ops = 1,
            |r: &mut Report| r.panics = 1,
            |r: &mut Report| r.leaked_bytes = 4096,
            |r: &mut Report| r.nodes_left = 1,
            |r: &mut Report| r.io.read_mismatches = 1,
            |r: &mut Report| r.violations.push("x".into()),
        ] {
            let mut r = Report::default();
            f(&mut r);
            r.decide();
            assert!(!r.ok);
        }
    }
}
