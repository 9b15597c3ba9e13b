//! `cargo bench -p nvmehp-lab`: lab hotplug cycles per second, and how long the engine takes to
//! complete every request after a surprise removal with 1, 64 and 1,024 in flight (QEMU's
//! NVMe model, one I/O queue deep enough for all of them; figures printed, never asserted).
//! Teardown with commands that never complete is in `cargo bench -p softnvme --bench teardown`.
//! Cycles: NVMEHP_BENCH_CYCLES (default 200).

fn main() {
    if !nvmehp_lab::qemu::qemu_available() {
        println!("SKIP: hotplug_cycles bench: qemu-system-x86_64 not found (run scripts/bootstrap-debian.sh lab)");
        return;
    }
    let cycles = std::env::var("NVMEHP_BENCH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    match nvmehp_lab::bench::hotplug_cycles(cycles) {
        Ok(r) => println!("{}", r.describe()),
        Err(e) => {
            eprintln!("hotplug_cycles bench failed: {e}");
            std::process::exit(1);
        }
    }
    for n in [1, 64, 1024] {
        match nvmehp_lab::bench::surprise_removal(n) {
            Ok(r) => println!("{}", r.describe()),
            Err(e) => {
                eprintln!("surprise_removal bench failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
