//! `cargo bench -p nvmehp-lab`: lab hotplug cycles per second (engine only, and through the
//! whole kernel path: GPE, Notify, hotplug state machine, FreeBSD model), and how long the
//! engine takes to complete every request after a surprise removal with 1, 64 and 1,024 in
//! flight (QEMU's NVMe model, one I/O queue deep enough for all of them; figures printed,
//! never asserted).
//! Teardown with commands that never complete is in `cargo bench -p softnvme --bench teardown`.
//! Cycles: NVMEHP_BENCH_CYCLES (default 200). Guest RAM path: NVMEHP_BENCH_RAM=shared|qtest
//! (default shared), to compare the two.

fn main() {
    if !nvmehp_lab::qemu::qemu_available() {
        println!("SKIP: hotplug_cycles bench: qemu-system-x86_64 not found (run scripts/bootstrap-debian.sh lab)");
        return;
    }
    let cycles = std::env::var("NVMEHP_BENCH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let ram = match std::env::var("NVMEHP_BENCH_RAM").as_deref() {
        Ok("qtest") => nvmehp_lab::shared_ram::RamAccess::Qtest,
        Ok("shared") | Err(_) => nvmehp_lab::shared_ram::RamAccess::Shared,
        Ok(other) => {
            eprintln!("NVMEHP_BENCH_RAM={other}: use shared or qtest");
            std::process::exit(2);
        }
    };
    if let Err(e) = nvmehp_lab::bench::print_all(cycles, ram) {
        eprintln!("nvmehp-lab bench failed: {e}");
        std::process::exit(1);
    }
}
