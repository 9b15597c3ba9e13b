//! Figures for the hotplug path (printed, never asserted):
//! - the cost of `notify()` in the ACPI notify context (what a storm costs the acpi_task thread);
//! - one task run over 32 idle slots (the fallback rescan's fixed cost, without config reads);
//! - attach + full teardown of a controller with 4 namespaces against the model (the model's
//!   own cost, which grows with history since handles are never reused: it bounds how long a
//!   lab run with the model plugged in can be).
//!
//! `cargo bench -p kpimodel`

use std::hint::black_box;
use std::time::Instant;

use kpimodel::controller::attach;
use kpimodel::{Model, SlotWorld};
use nvme_hotplug::hotplug::machine::{Hotplug, HotplugConfig};
use nvme_hotplug::hotplug::mode::Role;
use nvme_hotplug::hotplug::pending::PendingEvents;
use nvme_hotplug::hotplug::teardown::{teardown, Removal};

fn per_op(label: &str, n: u64, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{label:<48} {ns:>10.1} ns/op  ({n} ops)");
}

fn main() {
    let n = 10_000_000u64;
    let mut p = PendingEvents::new(32).unwrap();
    per_op("notify() storm, one slot (coalesced)", n, || {
        for i in 0..n {
            black_box(p.notify(black_box(6), black_box(1 + 2 * (i & 1) as u32)));
        }
    });
    println!("{:<48} {:>10}", "  task queued after the storm (bool)", p.is_queued());

    let mut hp = Hotplug::new(vec![Role::Owner; 32], HotplugConfig::default());
    let mut w = SlotWorld::new(32);
    let runs = 1_000_000u64;
    per_op("run_pending(), 32 idle slots", runs, || {
        for _ in 0..runs {
            black_box(hp.run_pending(&mut w));
        }
    });

    let cycles = 2_000u64;
    let mut m = Model::new();
    per_op("model attach + teardown, 4 ns (model cost)", cycles, || {
        for _ in 0..cycles {
            let live = attach(&mut m, &[1, 2, 3, 4]).expect("attach");
            black_box(teardown(live, &mut m, Removal::Surprise));
            m.run_geom_events();
        }
    });
    let r = m.module_unloaded();
    println!("{:<48} {:>10}", "  model violations after all cycles", r.violations.len());
    println!("{:<48} {:>10}", "  leaked bytes after all cycles", r.leaked_bytes);
}
