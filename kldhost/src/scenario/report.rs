//! The emulated kernel's state at the end of a kld-mode run, as the engine mode's report keys.
//!
//! - `leaked_bytes`: malloc(9) and contigmalloc(9) memory of the module not freed after
//!   MOD_UNLOAD (both are malloc blocks here: FreeBSD 15's free(9) releases contigmalloc'd
//!   memory too), plus the bio data buffers a never-completed bio kept (`dma_leaked_bytes`);
//! - `nodes_left`: devfs nodes of the module after the unload;
//! - `violations`: every finding of the emulation (a broken FreeBSD rule: sleeping with a mutex
//!   held, a leak, a node or handler left, busdma misuse, ...), prefixed `kldhost:`.

use crate::emu;
use nvmehp_lab::report::Report;

/// Module memory (malloc and contigmalloc) still allocated, in bytes.
pub fn module_bytes_allocated() -> u64 {
    emu::with(|e| e.blocks.values().filter(|b| !b.freed).map(|b| b.size as u64).sum())
}

/// Devfs nodes alive (any of the module's).
pub fn nodes_alive() -> usize {
    emu::with(|e| e.devs.len())
}

/// Moves the emulation's findings into the report's violations (each once).
pub fn take_findings(r: &mut Report) {
    let f = emu::with(|e| std::mem::take(&mut e.findings));
    for l in f {
        r.violations.push(format!("kldhost: {l}"));
    }
}

/// The report of a run whose emulated kernel panicked (the child process ended with
/// [`emu::PANIC_EXIT`]): `panics = 1`, `ok = false`, the panic message as a violation.
pub fn panicked(name: &str, seed: u64, machine: &str, msg: &str, total_ms: f64) -> Report {
    let mut r = Report { name: name.to_string(), seed, machine: machine.to_string(), driver: "kld".into(), panics: 1, total_ms, ..Report::default() };
    r.violations.push(format!("the emulated kernel panicked: {msg}"));
    r.decide();
    r
}
