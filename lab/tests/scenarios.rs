//! Every scenario shipped in `scenarios/` runs with `ok = true`, and the runner can fail: an
//! unmet expectation, a violation reported by a plugged-in observer, and a bad scenario file
//! each make the run fail, and so does a finding of the FreeBSD-rules model.

use std::path::PathBuf;

use nvmehp_lab::observer::{NodeId, NodeRules, Observer};
use nvmehp_lab::runner::Runner;
use nvmehp_lab::scenario::Scenario;
use nvmehp_lab::skip::qemu_or_skip;

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn run_file(name: &str) -> nvmehp_lab::report::Report {
    let sc = Scenario::load(&scenarios_dir().join(name)).expect("scenario parses");
    let r = Runner::new(sc).run();
    eprintln!("{}", r.summary());
    assert!(r.ok, "{}", r.summary());
    assert_eq!(r.lost_writes + r.hung_ops + r.panics + r.leaked_bytes, 0);
    // Judged by the FreeBSD-rules model: it saw the run and was left with nothing.
    let k = r.kernel.as_ref().expect("the FreeBSD model is the default observer");
    assert!(k.nodes_left.is_empty() && k.violations.is_empty() && k.leaked_bytes == 0, "{k:?}");
    assert!(k.notifies > 0 || name == "smoke.toml", "the model saw the ACPI notifies");
    assert!(r.acked_writes > 0, "the scenario really wrote");
    assert!(r.io.reads_verified > 0, "and really verified reads");
    r
}

/// Removal under write, interrupt-driven: the whole hotplug path with completions noticed only
/// through interrupts. Most completions must be reaped after an interrupt; the watchdog's
/// once-a-second poll may catch a few that raced the interrupt check, never the bulk (with the
/// interrupt broken, everything would wait for the watchdog and this fails).
fn run_interrupt_driven(name: &str, mode: &str) {
    let r = run_file(name);
    let i = &r.interrupts;
    assert_eq!(i.mode, mode);
    assert!(i.taken > 0, "{i:?}");
    assert!(i.reaped_by_irq > 0 && i.reaped_by_watchdog * 10 < i.reaped_by_irq, "{i:?}");
}

#[test]
fn scenario_interrupts_msix() {
    if qemu_or_skip("scenario_interrupts_msix") {
        run_interrupt_driven("interrupts-msix.toml", "msix");
    }
}

#[test]
fn scenario_interrupts_intx() {
    if qemu_or_skip("scenario_interrupts_intx") {
        run_interrupt_driven("interrupts-intx.toml", "intx");
    }
}

#[test]
fn polled_scenarios_take_no_interrupts() {
    if qemu_or_skip("polled_scenarios_take_no_interrupts") {
        let r = run_file("smoke.toml");
        assert_eq!((r.interrupts.mode.as_str(), r.interrupts.taken, r.interrupts.reaped_by_irq), ("poll", 0, 0));
    }
}

#[test]
fn scenario_smoke() {
    if qemu_or_skip("scenario_smoke") {
        run_file("smoke.toml");
    }
}

#[test]
fn scenario_hotplug_cycles() {
    if qemu_or_skip("scenario_hotplug_cycles") {
        run_file("hotplug-cycles.toml");
    }
}

#[test]
fn scenario_remove_under_write() {
    if qemu_or_skip("scenario_remove_under_write") {
        run_file("remove-under-write.toml");
    }
}

#[test]
fn scenario_q35_smoke() {
    if qemu_or_skip("scenario_q35_smoke") {
        run_file("q35-smoke.toml");
    }
}

#[test]
fn scenario_many_slots() {
    if qemu_or_skip("scenario_many_slots") {
        run_file("many-slots.toml");
    }
}

#[test]
fn every_shipped_scenario_parses() {
    let mut n = 0;
    for e in std::fs::read_dir(scenarios_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 12, "found {n} scenarios");
}

/// The examples in docs/scenarios.md are valid scenarios (the doc must not drift from the code).
#[test]
fn every_example_in_the_docs_parses() {
    let doc = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/scenarios.md")).unwrap();
    let mut n = 0;
    for block in doc.split("```toml\n").skip(1) {
        let text = block.split("```").next().unwrap();
        Scenario::parse(text).unwrap_or_else(|e| panic!("docs/scenarios.md example {}: {e}", n + 1));
        n += 1;
    }
    assert!(n >= 2, "found {n} examples");
}

const SMALL: &str = r#"
name = "small"
[[controller]]
id = "c0"
slot = 4
namespaces = [{ nsid = 1, size_mib = 4 }]
[[step]]
op = "io"
target = "c0/1"
kind = "write-verify"
ops = 20
"#;

#[test]
fn unmet_expectation_fails_the_run() {
    if !qemu_or_skip("unmet_expectation_fails_the_run") {
        return;
    }
    let sc = Scenario::parse(&format!("{SMALL}[[step]]\nop = \"expect\"\ncontrollers = 2\n")).unwrap();
    let r = Runner::new(sc).run();
    assert!(!r.ok);
    assert_eq!(r.violations, vec!["expect: controllers = 2, found 1".to_string()]);
    assert_eq!(r.acked_writes, 20);
}

/// An observer that objects to every node destruction: its violations must reach the report.
struct Strict(NodeRules);

impl Observer for Strict {
    fn node_created(&mut self, n: &NodeId) {
        self.0.node_created(n)
    }
    fn node_destroyed(&mut self, n: &NodeId) {
        self.0.node_destroyed(n)
    }
    fn nodes_alive(&self) -> usize {
        self.0.nodes_alive()
    }
    fn violations(&self) -> Vec<String> {
        vec!["strict: nothing may ever be destroyed".into()]
    }
}

#[test]
fn observer_violations_fail_the_run() {
    if !qemu_or_skip("observer_violations_fail_the_run") {
        return;
    }
    let sc = Scenario::parse(SMALL).unwrap();
    let r = Runner::new(sc).with_observer(Box::new(Strict(NodeRules::new()))).run();
    assert!(!r.ok);
    assert!(r.violations.iter().any(|v| v.contains("strict")), "{:?}", r.violations);
    assert_eq!(r.nodes_left, 0, "unload destroyed the node");
}

#[test]
fn io_to_a_missing_controller_is_a_violation() {
    if !qemu_or_skip("io_to_a_missing_controller_is_a_violation") {
        return;
    }
    let sc = Scenario::parse(&format!("{SMALL}[[step]]\nop = \"io\"\ntarget = \"c9/1\"\nkind = \"read\"\nops = 1\n")).unwrap();
    let r = Runner::new(sc).run();
    assert!(!r.ok);
    assert!(r.violations[0].contains("c9"), "{:?}", r.violations);
}

#[test]
fn a_panic_inside_the_engine_is_caught_and_counted() {
    if !qemu_or_skip("a_panic_inside_the_engine_is_caught_and_counted") {
        return;
    }
    let sc = Scenario::parse(&format!("{SMALL}[[step]]\nop = \"expect\"\ncontrollers = 1\n")).unwrap();
    let r = Runner::new(sc).inject_panic_after_register_reads(2).run();
    assert_eq!(r.panics, 1, "{}", r.summary());
    assert!(!r.ok);
    assert!(r.violations.iter().any(|v| v.contains("engine panicked") && v.contains("injected fault")), "{:?}", r.violations);
    // The lab went on: the controller was treated as lost and torn down, the run ended.
    assert_eq!(r.nodes_left, 0);
    assert_eq!(r.hung_ops, 0, "every accepted request completed once, even after the panic");
}

#[test]
fn a_lost_acknowledged_write_is_found_in_the_image() {
    if !qemu_or_skip("a_lost_acknowledged_write_is_found_in_the_image") {
        return;
    }
    let r = Runner::new(Scenario::parse(SMALL).unwrap()).inject_lost_write().run();
    assert_eq!(r.lost_writes, 1, "{}", r.summary());
    assert!(!r.ok);
    assert!(r.violations.iter().any(|v| v.contains("not found in the image")), "{:?}", r.violations);
}
