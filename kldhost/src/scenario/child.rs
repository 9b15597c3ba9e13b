//! `kldhost scenario`: the run in a child process.
//!
//! An emulated kernel panic ends the process (as a panic ends the kernel: nothing after it
//! runs, [`crate::emu::kernel_panic`]), so the parent runs the scenario in a child (this same
//! executable with `--child-report FILE`) and reports for it: the child's own JSON report when
//! it wrote one, else `panics = 1` with the panic message when it exited with
//! [`crate::emu::PANIC_EXIT`], else a violation naming how it ended.

use nvmehp_lab::report::Report;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the parent was asked to do.
pub struct Args {
    pub scenario: PathBuf,
    pub ko: PathBuf,
    pub json: Option<PathBuf>,
    pub verbose: bool,
    pub seed: Option<u64>,
    /// Extra child arguments (negative controls, e.g. `--lose-a-write`).
    pub extra: Vec<String>,
}

/// Runs the scenario in a child and returns its report and the report's JSON (the child's own
/// when it wrote one).
pub fn run(a: &Args, name: &str, seed: u64, machine: &str) -> (Report, String) {
    let r = run_child(a, name, seed, machine);
    match r {
        (r, Some(json)) => (r, json),
        (r, None) => {
            let json = serde_json::to_string_pretty(&r).unwrap_or_default();
            (r, json)
        }
    }
}

fn run_child(a: &Args, name: &str, seed: u64, machine: &str) -> (Report, Option<String>) {
    let start = std::time::Instant::now();
    let dir = match tempfile::Builder::new().prefix("kldhost-scenario-").tempdir() {
        Ok(d) => d,
        Err(e) => return (harness_failure(name, seed, machine, &format!("temporary directory: {e}"), start), None),
    };
    let out = dir.path().join("report.json");
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return (harness_failure(name, seed, machine, &format!("own executable: {e}"), start), None),
    };
    let mut cmd = Command::new(exe);
    cmd.arg("scenario").arg(&a.scenario).arg("--ko").arg(&a.ko).arg("--child-report").arg(&out);
    if a.verbose {
        cmd.arg("-v");
    }
    if let Some(s) = a.seed {
        cmd.arg("--seed").arg(s.to_string());
    }
    cmd.args(&a.extra);
    cmd.stderr(std::process::Stdio::piped());
    let output = match cmd.spawn().and_then(|c| c.wait_with_output()) {
        Ok(o) => o,
        Err(e) => return (harness_failure(name, seed, machine, &format!("starting the child: {e}"), start), None),
    };
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprint!("{stderr}");
    if let Some(r) = read_report(&out) {
        return (r, std::fs::read_to_string(&out).ok());
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match output.status.code() {
        Some(c) if c == crate::emu::PANIC_EXIT => {
            let msg = stderr.lines().rev().find_map(|l| l.strip_prefix("kldhost: the emulated kernel panicked: ")).unwrap_or("(no message)");
            (super::report::panicked(name, seed, machine, msg, ms), None)
        }
        _ => {
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            (harness_failure(name, seed, machine, &format!("the child ended with {} and no report: {last}", output.status), start), None)
        }
    }
}

fn read_report(p: &Path) -> Option<Report> {
    let text = std::fs::read_to_string(p).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| report_from_json(&v))
}

/// The lab's Report is Serialize only: the parent takes the child's JSON back field by field
/// for what it prints and decides, and keeps the JSON itself for the file.
fn report_from_json(v: &serde_json::Value) -> Option<Report> {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut r = Report {
        name: s("name"),
        seed: n("seed"),
        machine: s("machine"),
        driver: s("driver"),
        removal_reads: s("removal_reads"),
        ram_access: s("ram_access"),
        ok: v.get("ok").and_then(|x| x.as_bool())?,
        cycles: n("cycles"),
        acked_writes: n("acked_writes"),
        lost_writes: n("lost_writes"),
        failed_ops: n("failed_ops"),
        hung_ops: n("hung_ops"),
        panics: n("panics"),
        leaked_bytes: n("leaked_bytes"),
        dma_leaked_bytes: n("dma_leaked_bytes"),
        nodes_left: n("nodes_left") as usize,
        total_ms: v.get("total_ms").and_then(|x| x.as_f64()).unwrap_or(0.0),
        ..Report::default()
    };
    r.violations = v.get("violations").and_then(|x| x.as_array()).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
    r.io.read_mismatches = v.pointer("/io/read_mismatches").and_then(|x| x.as_u64()).unwrap_or(0);
    Some(r)
}

fn harness_failure(name: &str, seed: u64, machine: &str, what: &str, start: std::time::Instant) -> Report {
    let mut r = Report { name: name.to_string(), seed, machine: machine.to_string(), driver: "kld".into(), total_ms: start.elapsed().as_secs_f64() * 1e3, ..Report::default() };
    r.violations.push(format!("harness: {what}"));
    r.decide();
    r
}
