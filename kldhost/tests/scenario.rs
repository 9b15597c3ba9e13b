//! `kldhost scenario`: a lab scenario with the shipped .ko as the driver (driver = "kld"), and
//! the negative controls that prove its report can fail: a lost write the ledger sees, an
//! announced removal the module never hears of, an emulated kernel panic, and a scenario the
//! emulation cannot run (q35 with INTx: exit 77, never a pass); the small scenario on q35; INTx
//! delivery. Needs QEMU (the lab's rule: SKIP without it,
//! a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// One cold controller with two namespaces written and read, a hot-added controller written
/// and read, its announced removal, and the counts checked on the way.
const SMALL: &str = r#"
name = "kld-small"
machine = "pc"
seed = 3
[[controller]]
id = "c0"
slot = 4
namespaces = [{ nsid = 1, size_mib = 8, lba = 512 }, { nsid = 2, size_mib = 8, lba = 4096 }]
[[step]]
op = "expect"
controllers = 1
namespaces = 2
nodes = 2
[[step]]
op = "io"
target = "c0/1"
kind = "write-verify"
ops = 64
depth = 8
[[step]]
op = "io"
target = "c0/2"
kind = "mixed"
ops = 64
depth = 4
block = 8192
[[step]]
op = "attach"
id = "c1"
slot = 6
namespaces = [{ nsid = 1, size_mib = 4, lba = 512 }]
[[step]]
op = "io"
target = "c1/1"
kind = "write-verify"
ops = 32
depth = 4
[[step]]
op = "expect"
controllers = 2
namespaces = 3
nodes = 3
[[step]]
op = "detach"
id = "c1"
mode = "announced"
[[step]]
op = "expect"
controllers = 1
nodes = 2
"#;

fn scenario_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kldhost-scenario-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("write scenario");
    p
}

/// Runs `kldhost scenario FILE --json OUT [extra]`; returns the exit code, the output and the
/// report as JSON.
fn run(file: &Path, extra: &[&str]) -> (Option<i32>, String, serde_json::Value) {
    let json = file.with_extension(format!("{}.json", extra.join("").replace('-', "")));
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let o = Command::new(env!("CARGO_BIN_EXE_kldhost"))
        .arg("scenario")
        .arg(file)
        .arg("--ko")
        .arg(&ko)
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .expect("run kldhost scenario");
    let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(serde_json::Value::Null);
    (o.status.code(), out, report)
}

fn ready(test: &str) -> bool {
    nvmehp_lab::skip::qemu_or_skip(test) && common::real_ko(test).is_some()
}

fn n(r: &serde_json::Value, k: &str) -> u64 {
    r.pointer(k).and_then(|v| v.as_u64()).unwrap_or(u64::MAX)
}

#[test]
fn a_small_scenario_passes_with_the_modules_disks_written_and_read_and_its_nodes_gone() {
    if !ready("scenario_small") {
        return;
    }
    let f = scenario_file("small", SMALL);
    let (code, out, r) = run(&f, &[]);
    assert_small_passed(code, &out, &r);
}

/// What [`SMALL`] must report on either machine.
fn assert_small_passed(code: Option<i32>, out: &str, r: &serde_json::Value) {
    assert_eq!(code, Some(0), "{out}\n{r:#}");
    assert_eq!(r["driver"], "kld", "{r:#}");
    assert_eq!(r["ok"], true, "{r:#}");
    // Every write acknowledged by a biodone with no error is in the images, every read
    // matched the ledger.
    assert!(n(r, "/acked_writes") >= 64 + 32, "{r:#}");
    assert!(n(r, "/io/reads_verified") >= 64 + 32, "{r:#}");
    assert_eq!(n(r, "/lost_writes"), 0, "{r:#}");
    assert_eq!(n(r, "/io/read_mismatches"), 0, "{r:#}");
    assert_eq!(n(r, "/hung_ops"), 0, "{r:#}");
    // The hot-added controller came through Notify 1 and the module's rescan, and left
    // through Notify 3, its detach and _EJ0 (the module's own counters).
    assert_eq!(n(r, "/cycles"), 1, "{r:#}");
    assert_eq!(n(r, "/hotplug/rescans"), 1, "{r:#}");
    assert_eq!(n(r, "/hotplug/ejects"), 1, "{r:#}");
    // After kldunload: no node, no byte of the module's memory, no finding.
    assert_eq!(n(r, "/nodes_left"), 0, "{r:#}");
    assert_eq!(n(r, "/leaked_bytes"), 0, "{r:#}");
    assert_eq!(r["violations"].as_array().map(|v| v.len()), Some(0), "{r:#}");
}

#[test]
fn a_lost_write_is_seen_by_the_ledger() {
    if !ready("scenario_lost_write") {
        return;
    }
    let f = scenario_file("lost", SMALL);
    let (code, out, r) = run(&f, &["--lose-a-write"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(r["ok"], false, "{r:#}");
    assert_eq!(n(&r, "/lost_writes"), 1, "{r:#}");
}

#[test]
fn an_eject_request_the_module_never_hears_of_is_a_violation() {
    if !ready("scenario_no_notify") {
        return;
    }
    // The notifies are acknowledged but not delivered: the hot-add is never attached by the
    // module's rescan, and nothing would ever detach it.
    let f = scenario_file("deaf", SMALL);
    let (code, out, r) = run(&f, &["--drop-notifies"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(r["ok"], false, "{r:#}");
    let v = r["violations"].to_string();
    assert!(v.contains("attach c1: the module did not attach it"), "{r:#}");
    assert_eq!(n(&r, "/cycles"), 0, "{r:#}");
}

#[test]
fn an_emulated_kernel_panic_is_reported_as_one_panic() {
    if !ready("scenario_panic") {
        return;
    }
    let f = scenario_file("panic", SMALL);
    let (code, out, r) = run(&f, &["--panic-before-step", "3"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("panic: injected before step 3"), "{out}");
    // The child died with the kernel; the parent still wrote the report.
    assert_eq!(r["ok"], false, "{r:#}");
    assert_eq!(n(&r, "/panics"), 1, "{r:#}");
    assert_eq!(r["driver"], "kld", "{r:#}");
}

#[test]
fn the_small_scenario_passes_on_q35_with_the_controllers_behind_root_ports() {
    if !ready("scenario_q35") {
        return;
    }
    // The same story on ICH9: each controller behind the pcie-root-port in its slot, the
    // module's hotplug slots the ports' S00_ objects, Notify 1/3 for the port's bus.
    let q35 = SMALL.replace("machine = \"pc\"", "machine = \"q35\"");
    assert!(q35.contains("machine = \"q35\""));
    let f = scenario_file("small-q35", &q35);
    let (code, out, r) = run(&f, &[]);
    assert_eq!(r["machine"], "q35", "{r:#}");
    assert_small_passed(code, &out, &r);
    // Control: with the notifies acknowledged but not delivered, the hot-add behind slot 6's
    // port is never attached.
    let (code, out, r) = run(&f, &["--drop-notifies"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(r["violations"].to_string().contains("attach c1: the module did not attach it"), "{r:#}");
}

#[test]
fn a_q35_scenario_with_intx_is_refused_with_77_never_passed() {
    if !ready("scenario_unsupported") {
        return;
    }
    let f = scenario_file("q35-intx", "name = \"q35-intx\"\nmachine = \"q35\"\ninterrupts = \"intx\"\n");
    let (code, out, _) = run(&f, &[]);
    assert_eq!(code, Some(77), "{out}");
    assert!(out.contains("SKIP scenario q35-intx (kld): machine = \"q35\" with interrupts = \"intx\""), "{out}");
}

/// A disk held open by an `open` step stays open for the module while another consumer (an
/// `io` job) opens and closes it: GEOM calls d_open on the first open and d_close on the last
/// close only, so the announced removal must still be refused.
const HELD: &str = r#"
name = "kld-held"
machine = "pc"
seed = 4
[[controller]]
id = "c0"
slot = 4
namespaces = [{ nsid = 1, size_mib = 8, lba = 512 }]
[[controller]]
id = "c1"
slot = 6
namespaces = [{ nsid = 1, size_mib = 8, lba = 512 }]
[[step]]
op = "open"
target = "c1/1"
[[step]]
op = "io"
target = "c1/1"
kind = "write-verify"
ops = 16
depth = 4
[[step]]
op = "detach"
id = "c1"
mode = "announced"
refused = true
[[step]]
op = "expect"
controllers = 2
[[step]]
op = "close"
target = "c1/1"
[[step]]
op = "notify"
slot = 6
code = 3
expect_ost = "success"
[[step]]
op = "expect"
controllers = 1
nodes = 1
"#;

#[test]
fn a_disk_held_open_stays_open_when_another_consumer_closes_it() {
    if !ready("scenario_held") {
        return;
    }
    let f = scenario_file("held", HELD);
    let (code, out, r) = run(&f, &[]);
    assert_eq!(code, Some(0), "{out}\n{r:#}");
    assert_eq!(n(&r, "/removals/refused"), 1, "{r:#}");
    assert_eq!(n(&r, "/hotplug/refused"), 1, "{r:#}");
    assert_eq!(n(&r, "/hotplug/ejects"), 1, "{r:#}");
}

/// `interrupts = "intx"`: pci(4) offers no MSI-X or MSI, the module falls back to its INTx
/// line, and the line QEMU asserts (at the GSI the PIIX3 routes the pin to) runs its handler:
/// the I/O completes through interrupts, a hot-added controller's too.
const INTX: &str = r#"
name = "kld-intx"
machine = "pc"
seed = 5
interrupts = "intx"
[[controller]]
id = "c0"
slot = 4
namespaces = [{ nsid = 1, size_mib = 8, lba = 512 }]
[[step]]
op = "io"
target = "c0/1"
kind = "write-verify"
ops = 64
depth = 8
[[step]]
op = "attach"
id = "c1"
slot = 6
namespaces = [{ nsid = 1, size_mib = 4, lba = 512 }]
[[step]]
op = "io"
target = "c1/1"
kind = "mixed"
ops = 64
depth = 8
[[step]]
op = "detach"
id = "c1"
mode = "surprise"
"#;

#[test]
fn with_intx_the_modules_line_interrupts_complete_the_io() {
    if !ready("scenario_intx") {
        return;
    }
    let f = scenario_file("intx-run", INTX);
    let (code, out, r) = run(&f, &[]);
    assert_eq!(code, Some(0), "{out}\n{r:#}");
    assert_eq!(r["interrupts"]["mode"], "intx", "{r:#}");
    assert!(n(&r, "/interrupts/taken") > 0, "{r:#}");
    assert!(n(&r, "/io/reads_verified") >= 64, "{r:#}");
    assert_eq!(n(&r, "/cycles"), 1, "{r:#}");
}
