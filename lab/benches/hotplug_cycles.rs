//! `cargo bench -p nvmehp-lab`: lab hotplug cycles per second (engine only, and through the
//! whole kernel path: GPE, Notify, hotplug state machine, FreeBSD model), and how long the
//! engine takes to complete every request after a surprise removal with 1, 64 and 1,024 in
//! flight (QEMU's NVMe model, one I/O queue deep enough for all of them; figures printed,
//! never asserted).
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
    for surprise in [false, true] {
        match nvmehp_lab::bench::kernel_path_cycles(cycles.min(500), surprise) {
            Ok((rate, r)) => println!(
                "kernel path ({}, hotplug state machine + FreeBSD model): {} cycles at {rate:.1} cycles/s ({:.2} ms/cycle)",
                if surprise { "surprise removal" } else { "announced removal" },
                r.cycles,
                1e3 / rate
            ),
            Err(e) => {
                eprintln!("kernel_path_cycles bench failed: {e}");
                std::process::exit(1);
            }
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
