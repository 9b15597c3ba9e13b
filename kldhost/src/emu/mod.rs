//! A first emulated FreeBSD kernel for running a loaded kld's module events in this process.
//!
//! One module per process: the emulated functions are plain `extern "C"` functions the module
//! calls through its import trampolines, so their state is global ([`with`]). Every call is
//! logged, in order. The state lock is never held while module code runs (a task or an event
//! handler may call back into the emulation).
//!
//! What the emulated kernel is: a machine with no ACPI namespace (ACPICA lookups answer
//! AE_NOT_FOUND; with `--qemu --acpi`, QEMU's root-bus namespace and its hotplug events,
//! [`acpi`]), whose taskqueue threads run only when [`run`] lets them, and whose callouts
//! and timeout tasks never fire during a run. Without `--qemu` it has no PCI bus; with it,
//! QEMU's pc machine with one NVMe controller ([`machine`]) behind an emulated `pci0`
//! ([`newbus`], [`pci`], with pci(4)'s MSI tunables [`pci_tunables`] and the INTx line
//! delivered to the driver's ithread [`intx`]), its registers reached through trapped loads
//! and stores ([`mmio`], where [`device_fault`] can rewrite what the module sees),
//! its DMA memory in shared guest RAM ([`dma`], [`busdma`]), bio queues ([`bioq`]), and disk(9) ([`geom`]) and run-time
//! sysctl(9) contexts ([`sysctl`]) recorded; with `--stock-nvme`, nvme(4) of a GENERIC kernel
//! on pci, as far as newbus sees it ([`stock_nvme`]); with `--msi-instead-of-msix`, an MSI
//! function over QEMU's ([`msi`]); with `--in-sleep`, another kernel thread acting inside a
//! chosen sleep of the module ([`interleave`]).
//! A kernel panic ends the process with [`PANIC_EXIT`], as a panic ends the kernel; so does a
//! fault in the module's code ([`trap`]), as the kernel's fatal trap. The FreeBSD rules each
//! emulated function checks are named by [`rules`] (kpimodel's names, with their sources).

pub mod acpi;
pub mod bioq;
pub mod busdma;
pub mod devfs;
pub mod device_fault;
pub mod dma;
pub mod fail;
pub mod geom;
pub mod interleave;
pub mod intx;
pub mod kern;
pub mod machine;
pub mod mmio;
pub mod msi;
pub mod newbus;
pub mod ns_admin;
pub mod pci;
pub mod pcib;
pub mod rules;
pub mod pci_tunables;
pub mod run;
pub mod sched;
pub mod stock_nvme;
pub mod sysctl;
pub mod trap;
pub mod unmapped;

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Exit status of a process whose emulated kernel panicked.
pub const PANIC_EXIT: i32 = 70;

#[derive(Default)]
pub struct Emu {
    /// Every emulated call and kernel-linker step, in order.
    pub log: Vec<String>,
    /// Rule violations the emulation noticed (sleeping with a mutex held, leaks, ...).
    pub findings: Vec<String>,
    /// Console output (printf, device_printf).
    pub console: String,
    /// The console's length when each line of `log` was made: `console[..console_at[i]]` was
    /// printed before `log[i]` (so an observer can tell both in the order they happened).
    pub console_at: Vec<usize>,
    pub(crate) blocks: BTreeMap<u64, kern::Block>,
    pub(crate) malloc_types: Vec<u64>,
    pub(crate) modules: Vec<kern::Module>,
    pub(crate) drivers: Vec<(String, String)>,
    pub(crate) queues: BTreeMap<u64, sched::Queue>,
    pub(crate) mutexes: BTreeMap<u64, sched::Mtx>,
    pub(crate) topo_locked: bool,
    pub(crate) armed_timeouts: BTreeMap<u64, u64>,
    /// Armed callouts: callout to (function, argument).
    pub(crate) armed_callouts: BTreeMap<u64, (u64, u64)>,
    /// The mutex each callout was initialised with (callout_init_mtx).
    pub(crate) callout_locks: BTreeMap<u64, u64>,
    /// The emulated devfs: node name to struct cdev.
    pub(crate) devs: BTreeMap<String, u64>,
    /// destroy_dev_sched_cb requests the devfs destroy thread has not run: (cdev, cb, arg).
    pub(crate) deferred_destroys: std::collections::VecDeque<(u64, u64, u64)>,
    /// Newbus: devices, devclasses, drivers, kobj classes.
    pub newbus: newbus::Newbus,
    /// pci(4): resources and interrupt handlers handed out.
    pub(crate) pci: pci::PciState,
    /// disk(9): every disk by its struct disk, and GEOM's pending d_gone events.
    pub(crate) disks: BTreeMap<u64, geom::DiskRec>,
    pub(crate) geom_events: std::collections::VecDeque<u64>,
    /// GEOM's event thread runs nothing (`run --geom-stalled`, [`geom::set_stalled`]): queued
    /// d_gone callbacks wait.
    pub(crate) geom_stalled: bool,
    /// The module's sleeps since GEOM's event thread stalled ([`geom::stalled_sleep`]).
    pub(crate) geom_stalled_sleeps: u32,
    /// sysctl contexts to the OIDs added to them.
    pub(crate) sysctl_ctxs: BTreeMap<u64, Vec<(String, u64)>>,
    /// ACPI: the emulated namespace (`--acpi`) and the notify handlers installed on it.
    pub(crate) acpi: acpi::AcpiState,
    /// What the rule checks of [`rules`] remember between calls.
    pub(crate) rule_state: rules::State,
}

static EMU: Mutex<Option<Emu>> = Mutex::new(None);
static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Print every log line as it is made (the CLI does: a trap or a panic ends the process
/// before a report could be printed).
pub fn set_trace(on: bool) {
    TRACE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Runs `f` on the emulated kernel's state (created on first use).
pub fn with<R>(f: impl FnOnce(&mut Emu) -> R) -> R {
    let mut g = EMU.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Emu::default))
}

/// Appends a line to the call log.
pub fn log(line: String) {
    if TRACE.load(std::sync::atomic::Ordering::Relaxed) {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "  {line}");
    }
    let keep = LOG_KEEP.load(std::sync::atomic::Ordering::Relaxed);
    with(|e| {
        e.console_at.push(e.console.len());
        e.log.push(line);
        // A bounded log keeps the last `keep` lines: dropped in halves, so pushing stays O(1)
        // amortised; the count of dropped lines is kept. `console_at` goes with its lines.
        if keep > 0 && e.log.len() >= 2 * keep {
            let drop_n = e.log.len() - keep;
            e.log.drain(..drop_n);
            e.console_at.drain(..drop_n.min(e.console_at.len()));
            LOG_DROPPED.fetch_add(drop_n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
}

static LOG_KEEP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static LOG_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bounds the call log to (about) its last `lines` lines (0: unbounded, the default), for long
/// runs such as a 1,000-cycle scenario.
pub fn set_log_limit(lines: usize) {
    LOG_KEEP.store(lines, std::sync::atomic::Ordering::Relaxed);
}

/// Log lines dropped so far by the bound of [`set_log_limit`].
pub fn log_lines_dropped() -> u64 {
    LOG_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn finding(line: String) {
    with(|e| e.findings.push(line));
}

/// The emulated kernel panics: say why and end the process.
pub fn kernel_panic(msg: &str) -> ! {
    use std::io::Write;
    // What was found before the panic would otherwise be lost with the process.
    for f in with(|e| e.findings.clone()) {
        let _ = writeln!(std::io::stdout(), "finding before the panic: {f}");
    }
    log(format!("panic: {msg}"));
    let _ = writeln!(std::io::stdout(), "panic: {msg}");
    let _ = std::io::stdout().flush();
    let _ = writeln!(std::io::stderr(), "kldhost: the emulated kernel panicked: {msg}");
    std::process::exit(PANIC_EXIT)
}

/// The KPI table with every emulated function in place of its trap (freebsd15::table lists
/// the names; the rest still trap when called).
pub fn table() -> crate::kpi::KpiTable {
    let mut t = crate::freebsd15::table();
    kern::register(&mut t);
    sched::register(&mut t);
    acpi::register(&mut t);
    devfs::register(&mut t);
    newbus::register(&mut t);
    pci::register(&mut t);
    dma::register(&mut t);
    geom::register(&mut t);
    sysctl::register(&mut t);
    busdma::register(&mut t);
    bioq::register(&mut t);
    t
}
