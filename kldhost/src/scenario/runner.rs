//! The kld-mode runner: a scenario's steps with the loaded module as the driver.
//!
//! Boot: the lab machine with the scenario's cold controllers (the firmware programs their
//! BARs), pci0 enumerates them (on q35: pci0 has a pcib per root port, and each port's pciN the
//! controller behind it), the ACPI namespace of QEMU's pc or q35 DSDT is there with no
//! acpi_pci(4) handler (the module owns the slots), then `kldload` with
//! `hw.nvme_hotplug.claim=1` (its probe bids BUS_PROBE_HOOVER, so newbus gives it every NVMe
//! function at MOD_LOAD and on every later rescan, as the engine mode's driver takes them).
//!
//! [`Session::tick`] is one round of what a kernel does concurrently: the SCI's `_E01` work
//! (the lab machine's GPE poll) and each Notify from the acpi_task to the handlers the module
//! installed; the taskqueue, interrupt (MSI-X mailboxes), GEOM event and devfs destroy threads;
//! softclock for callouts and timeout tasks whose deadline passed; then every GEOM consumer
//! collects its finished bios and sends new ones. The emulated kernel is single-threaded and
//! cooperative, so nothing of the module runs except from here (and from within its own calls).
//!
//! **Time.** The module's watchdog is a 1 s callout: it is what finds a surprise removal. A
//! runner waiting for something (a removal, I/O) that sees no progress for [`JUMP_AFTER`] lets
//! the emulated clock jump to the next armed deadline instead of sleeping until it
//! ([`crate::emu::sched::advance_clock`]): `binuptime` and the deadlines are on that clock,
//! QEMU's is real, so only waits in which nothing happens get shorter. This keeps a 1,000-cycle
//! surprise-removal scenario from spending 1,000 real seconds in the watchdog's period.
//!
//! The end is `kldunload`: what the scenario left open is closed (a violation), the jobs
//! drain, MOD_QUIESCE and MOD_UNLOAD are sent (both must succeed: the module detaches every
//! controller itself), then the report is made ([`super::report`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nvmehp_lab::access_faults::RemovalReads;
use nvmehp_lab::ledger::{splitmix64, Ledger};
use nvmehp_lab::machine::Image;
use nvmehp_lab::report::{Report, StepRecord};
use nvmehp_lab::scenario::{parse_target, ControllerSpec, DetachMode, IoKind, NamespaceSpec, OstExpect, Refusal, Scenario, Step, SweepReads, WaitUntil};
use nvmehp_lab::workload::{IoJob, JobTarget};

use super::bio::BioJob;
use super::devices;
use crate::emu::{self, acpi, machine, sched};
use crate::{layouts, LoadedKo};

/// Longest an attach or detach step waits for the machine and the module.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a wait for idle (and the final drain) waits without progress.
const IDLE_STALL: Duration = Duration::from_secs(20);
/// No progress for this long while waiting: time jumps to the next timer deadline.
const JUMP_AFTER: Duration = Duration::from_millis(50);
/// The call log kept (last lines) in a scenario run.
const LOG_LINES: usize = 20_000;

/// What the run does besides the scenario.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Tell the story as it happens.
    pub verbose: bool,
    /// Negative control: at the end, before the images are checked, one block of an
    /// acknowledged write is zeroed in its image file (as a device that lost it would).
    pub lose_a_write: bool,
    /// Negative control: notifications are not delivered to the module (the GPE is still
    /// acknowledged), so it learns of no hot-add or eject request.
    pub drop_notifies: bool,
    /// Extra loader tunables (`name=value`), after the runner's own.
    pub tunables: Vec<(String, String)>,
    /// Negative control of the parent's panic handling: the emulated kernel panics before
    /// top-level step N (1-based).
    pub panic_before_step: Option<usize>,
}

/// A controller the scenario plugged (cold or hot-added), by its scenario id.
struct Ctrl {
    slot: u8,
    /// qdev id of this plug (names its NGUIDs, and its serial).
    qdev: String,
    serial: String,
    images: BTreeMap<u32, Image>,
}

/// A holder of an `open` step.
enum Holder {
    /// A GEOM consumer of the namespace's disk (`refuse = "in-use"`: the module's eject
    /// policy sees the disk open).
    Disk(String),
    /// A devfs user of the namespace's node (`refuse = "busy"`: the node is in use, the
    /// module's detach returns EBUSY).
    Node(u64),
}

/// A run in progress.
pub struct Session<'a> {
    ko: &'a LoadedKo,
    modules: Vec<String>,
    ledger: Ledger,
    jobs: Vec<BioJob>,
    ctrls: BTreeMap<String, Ctrl>,
    report: Report,
    seed: u64,
    rng: u64,
    removing: Vec<(String, u8)>,
    opened: BTreeMap<(String, u32), Vec<Holder>>,
    opts: Options,
    /// Last time anything happened (a task ran, a bio finished, a notify came).
    progress_at: Instant,
}

/// Runs `sc` with the module `ko` (linked into this process) and returns the report. One
/// run per process: the emulated kernel is the process's.
pub fn run(ko: &LoadedKo, sc: &Scenario, opts: &Options) -> Report {
    let start = Instant::now();
    emu::set_log_limit(LOG_LINES);
    // A fault in the module's code is the kernel's fatal trap (a panic: the child's report
    // says panics = 1), not a crash of this process.
    emu::trap::install(ko.base(), ko.module_size);
    let mut report = Report {
        name: sc.name.clone(),
        seed: sc.seed,
        machine: sc.machine.qemu_name().to_string(),
        driver: "kld".into(),
        removal_reads: match sc.removal_reads {
            RemovalReads::Zeros => "zeros".into(),
            RemovalReads::AllOnes => "all-ones".into(),
        },
        ram_access: "shared".into(),
        ..Report::default()
    };
    let m = match machine::Machine::start_scenario(sc.machine, &sc.controllers, &sc.slots(), sc.removal_reads) {
        Ok(m) => m,
        Err(e) => {
            report.violations.push(format!("harness: cannot start QEMU: {e}"));
            report.total_ms = start.elapsed().as_secs_f64() * 1e3;
            report.decide();
            return report;
        }
    };
    // interrupts = "intx": pci(4) offers no MSI-X or MSI (its loader tunables
    // hw.pci.enable_msix=0 and hw.pci.enable_msi=0), so the module falls back to its INTx
    // line by itself, as it would on such a kernel.
    let intx = sc.interrupts == nvmehp_lab::interrupts::InterruptMode::Intx;
    report.interrupts.mode = if intx { "intx" } else { "msix" }.into();
    let mut opts = opts.clone();
    if intx {
        opts.tunables.extend(emu::pci_tunables::intx_only());
    }
    let opts = &opts;
    emu::pci_tunables::load(&opts.tunables);
    let functions = m.functions.clone();
    let mut ctrls = BTreeMap::new();
    for c in &sc.controllers {
        if let Some(d) = m.lab.plugged(c.slot) {
            ctrls.insert(c.id.clone(), Ctrl { slot: c.slot, qdev: d.qdev.clone(), serial: devices::serial_of(&d.qdev), images: d.images.iter().map(|i| (i.nsid, i.clone())).collect() });
        }
    }
    machine::install(m);
    emu::newbus::build_tree(&functions, false);
    let pcib0 = emu::with(|e| e.newbus.devices.get(&e.newbus.pci0).map_or(0, |d| d.parent));
    acpi::enable_with(pcib0, false);
    let mut s = Session {
        ko,
        modules: Vec::new(),
        ledger: Ledger::new(),
        jobs: Vec::new(),
        ctrls,
        report,
        seed: sc.seed,
        rng: sc.seed ^ 0x6a09_e667_f3bc_c909,
        removing: Vec::new(),
        opened: BTreeMap::new(),
        opts: opts.clone(),
        progress_at: Instant::now(),
    };
    for c in s.ctrls.values() {
        for img in c.images.values() {
            s.ledger.add_image(&img.path, img.lba_bytes);
        }
    }
    if s.boot() {
        for (i, step) in sc.steps.iter().enumerate() {
            if opts.panic_before_step == Some(i + 1) {
                emu::kernel_panic(&format!("injected before step {} (--panic-before-step)", i + 1));
            }
            let t = Instant::now();
            let note = s.step(step);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            s.report.steps.push(StepRecord { op: step.op_name().to_string(), ms, note });
        }
    }
    let mut report = s.finish();
    machine::stop();
    report.total_ms = start.elapsed().as_secs_f64() * 1e3;
    report.decide();
    report
}

impl Session<'_> {
    fn say(&self, s: String) {
        if self.opts.verbose {
            println!("  {s}");
        }
    }

    fn violation(&mut self, v: String) {
        self.say(format!("VIOLATION: {v}"));
        if self.report.violations.len() < 200 {
            self.report.violations.push(v);
        }
    }

    /// kldload with the tunables an engine run corresponds to, then the module's start-up
    /// tasks (ACPI slot discovery) and the attach of the cold controllers.
    fn boot(&mut self) -> bool {
        let mut tunables = vec![("hw.nvme_hotplug.claim".to_string(), "1".to_string())];
        tunables.extend(self.opts.tunables.iter().cloned());
        match crate::emu::run::kldload(self.ko, &tunables) {
            Ok(names) => self.modules = names,
            Err(e) => {
                self.violation(format!("kldload: {e}"));
                return false;
            }
        }
        let cold: Vec<u8> = self.ctrls.values().map(|c| c.slot).collect();
        // Loaded means: the cold controllers attached with their disks, and the module's slot
        // discovery (its taskqueue, after MOD_LOAD) installed its notify handlers; a Notify
        // before that would reach no handler, as on a real machine during the load.
        let ok = self.tick_until(STEP_TIMEOUT, |s| cold.iter().all(|&slot| s.ready(slot)) && !acpi::installed_handlers().is_empty());
        if !ok {
            let missing: Vec<u8> = cold.into_iter().filter(|&s| !self.ready(s)).collect();
            self.violation(format!(
                "boot: within {STEP_TIMEOUT:?}, the controllers in slots {missing:?} were not attached with all their disks, or no ACPI notify handler was installed ({})",
                acpi::installed_handlers().len()
            ));
        }
        self.settle();
        self.say(format!("kldload: {} controllers attached, disks {:?}", devices::attached_count(), emu::geom::created_disks().iter().map(|d| d.0.clone()).collect::<Vec<_>>()));
        true
    }

    /// The controller plugged in `slot` is attached and every namespace has its disk.
    fn ready(&self, slot: u8) -> bool {
        let Some(c) = self.ctrls.values().find(|c| c.slot == slot) else { return false };
        devices::attached(slot).is_some() && devices::disks_of(&c.serial).len() == c.images.len()
    }

    /// One round of everything a kernel does concurrently. Returns whether anything happened.
    fn tick(&mut self) -> bool {
        let mut happened = 0;
        if self.opts.drop_notifies {
            let n = machine::with_machine(|m| m.lab.poll_notifies()).map(|v| v.len()).unwrap_or(0);
            self.report.hotplug.notifies += n as u64;
        } else {
            let delivered = acpi::run_gpe();
            self.report.hotplug.notifies += delivered.len() as u64;
            happened += delivered.len();
        }
        happened += sched::run_queues(1000);
        happened += sched::fire_due();
        happened += sched::run_queues(1000);
        for j in &mut self.jobs {
            happened += j.reap(&mut self.ledger);
            happened += j.feed(&mut self.ledger);
        }
        if happened > 0 {
            self.progress_at = Instant::now();
        }
        happened > 0
    }

    /// Ticks until `done` or `timeout`; returns whether `done` became true. With nothing
    /// happening for [`JUMP_AFTER`], time jumps to the next timer deadline.
    fn tick_until(&mut self, timeout: Duration, done: impl FnMut(&mut Session) -> bool) -> bool {
        self.tick_until_with(timeout, false, done)
    }

    /// [`Session::tick_until`] for a wait only a timer can end (a surprise removal, which the
    /// module's watchdog finds): every [`JUMP_AFTER`] without `done`, time jumps to the next
    /// deadline even while other I/O keeps progressing. A live controller's command would
    /// have to stay outstanding for 30 such jumps to reach the module's 30 s command timeout.
    fn tick_until_timer(&mut self, timeout: Duration, done: impl FnMut(&mut Session) -> bool) -> bool {
        self.tick_until_with(timeout, true, done)
    }

    fn tick_until_with(&mut self, timeout: Duration, timer: bool, mut done: impl FnMut(&mut Session) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut jumped = Instant::now();
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if !self.tick() {
                self.idle();
            }
            if timer && jumped.elapsed() >= JUMP_AFTER {
                if let Some(ns) = sched::next_deadline_in().filter(|&ns| ns > 0) {
                    sched::advance_clock(ns);
                }
                jumped = Instant::now();
            }
        }
    }

    /// Nothing happened this round: QEMU gets the CPU for a moment, and after [`JUMP_AFTER`]
    /// without progress the emulated clock jumps to the next deadline.
    fn idle(&mut self) {
        std::thread::sleep(Duration::from_micros(200));
        if self.progress_at.elapsed() >= JUMP_AFTER {
            if let Some(ns) = sched::next_deadline_in() {
                if ns > 0 {
                    sched::advance_clock(ns);
                }
            }
            self.progress_at = Instant::now();
        }
    }

    fn random(&mut self) -> u64 {
        splitmix64(&mut self.rng)
    }

    fn step(&mut self, step: &Step) -> String {
        match step {
            Step::Attach { id, slot, namespaces, wait } => self.attach(id, *slot, namespaces, *wait),
            Step::Io { target, kind, ops, depth, block, background } => self.io(target, *kind, *ops, *depth, *block, *background),
            Step::Detach { id, mode, during_io, jitter_ms, refused, wait } => self.detach(id, *mode, *during_io, *jitter_ms, *refused, *wait),
            Step::Wait { ms: Some(ms), .. } => {
                self.tick_until(Duration::from_millis(*ms), |_| false);
                String::new()
            }
            Step::Wait { until: Some(WaitUntil::Idle), .. } => self.wait_idle(),
            Step::Wait { until: Some(WaitUntil::Attached), .. } => self.wait_attached(),
            Step::Wait { until: Some(WaitUntil::Removed), .. } => self.wait_removed(),
            Step::Wait { .. } => String::new(),
            Step::Repeat { times, steps } => {
                for _ in 0..*times {
                    for s in steps {
                        self.step(s);
                    }
                }
                format!("{times} times")
            }
            Step::Expect { controllers, namespaces, nodes } => self.expect(*controllers, *namespaces, *nodes),
            Step::Notify { slot, code, times, expect_ost, expect_rescans } => self.notify(*slot, *code, *times, *expect_ost, *expect_rescans),
            Step::Open { target, refuse } => self.open(target, *refuse),
            Step::Close { target } => self.close(target),
            Step::BringupRemovalSweep { slot, namespaces, reads, stride } => self.sweep(*slot, namespaces, *reads, *stride),
        }
    }

    /// The module's counter `hw.nvme_hotplug.<name>` (a read-only u64 sysctl).
    fn counter(&self, name: &str) -> u64 {
        let path = format!("hw.nvme_hotplug.{name}");
        let Ok(oids) = crate::sets::sysctls(self.ko) else { return 0 };
        let Some(o) = oids.into_iter().find(|o| o.path == path) else { return 0 };
        // SAFETY: the module's struct sysctl_oid (from its linker set); a u64 OID's arg1 is
        // the module's counter, read as sysctl(8) would.
        unsafe {
            let oid = &*(o.at as *const layouts::sysctl_oid);
            if oid.oid_arg1.is_null() {
                0
            } else {
                std::ptr::read_volatile(oid.oid_arg1 as *const u64)
            }
        }
    }

    // --- attach --------------------------------------------------------------------------------

    fn plug(&mut self, id: &str, slot: u8, namespaces: &[NamespaceSpec]) -> bool {
        let spec = ControllerSpec { id: id.to_string(), slot, namespaces: namespaces.to_vec() };
        self.say(format!("hot-add {id} at slot {slot} (QMP blockdev-add + device_add)"));
        let r = machine::with_machine(|m| m.hot_add(&spec).map(|()| m.lab.plugged(slot).cloned()));
        match r {
            Ok(Some(d)) => {
                for img in &d.images {
                    self.ledger.add_image(&img.path, img.lba_bytes);
                }
                self.ctrls.insert(id.to_string(), Ctrl { slot, qdev: d.qdev.clone(), serial: devices::serial_of(&d.qdev), images: d.images.iter().map(|i| (i.nsid, i.clone())).collect() });
                true
            }
            Ok(None) => {
                self.violation(format!("attach {id}: QEMU has no device in slot {slot} after device_add"));
                false
            }
            Err(e) => {
                self.violation(format!("attach {id}: QEMU refused: {e}"));
                false
            }
        }
    }

    fn attach(&mut self, id: &str, slot: u8, namespaces: &[NamespaceSpec], wait: bool) -> String {
        if self.ctrls.contains_key(id) {
            self.violation(format!("attach {id}: a controller with that id is plugged already"));
            return "refused".into();
        }
        if !self.plug(id, slot, namespaces) {
            return "qemu refused".into();
        }
        if !wait {
            return "plugged".into();
        }
        if !self.tick_until(STEP_TIMEOUT, |s| s.ready(slot)) {
            self.violation(format!("attach {id}: the module did not attach it (with its disks) within {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        let dev = devices::attached(slot).map(emu::newbus::nameunit).unwrap_or_default();
        self.say(format!("{id}: attached as {dev}"));
        dev
    }

    fn wait_attached(&mut self) -> String {
        let slots: Vec<u8> = self.ctrls.values().map(|c| c.slot).collect();
        if !self.tick_until(STEP_TIMEOUT, |s| slots.iter().all(|&sl| s.ready(sl))) {
            let missing: Vec<u8> = slots.into_iter().filter(|&sl| !self.ready(sl)).collect();
            self.violation(format!("wait attached: slot(s) {missing:?} still without the module's driver after {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        format!("{} attached", devices::attached_count())
    }

    // --- I/O -----------------------------------------------------------------------------------

    fn start_job(&mut self, target: &str, kind: IoKind, ops: u64, depth: u32, block: u32) -> Option<usize> {
        let (ctrl, nsid) = match parse_target(target) {
            Ok(t) => t,
            Err(e) => {
                self.violation(format!("io: {e}"));
                return None;
            }
        };
        let Some(c) = self.ctrls.get(&ctrl).filter(|c| devices::attached(c.slot).is_some()) else {
            self.violation(format!("io {target}: controller {ctrl} is not attached"));
            return None;
        };
        let Some(img) = c.images.get(&nsid).cloned() else {
            self.violation(format!("io {target}: controller {ctrl} has no namespace {nsid}"));
            return None;
        };
        let Some(disk) = devices::disk_of(&c.qdev, nsid, c.images.len()) else {
            self.violation(format!("io {target}: the module has no disk for it"));
            return None;
        };
        let t = JobTarget { ctrl, nsid, image: img.path.clone(), lba_bytes: img.lba_bytes, ns_blocks: img.bytes / u64::from(img.lba_bytes) };
        let id = self.jobs.len() as u32;
        let seed = self.seed.wrapping_add(u64::from(id));
        let guest = machine::with_machine(|m| m.lab.guest().clone());
        let job = IoJob::new(id, &guest, t, kind, ops, depth, block, seed);
        if let Some(nvmehp_lab::workload::StopReason::Setup(why)) = &job.stopped {
            self.violation(format!("io {target}: {why}"));
        }
        let (j, r) = BioJob::start(job, disk.clone());
        if r != 0 {
            self.violation(format!("io {target}: d_open of {disk} = {r}"));
        }
        self.jobs.push(j);
        Some(id as usize)
    }

    fn io(&mut self, target: &str, kind: IoKind, ops: u64, depth: u32, block: u32, background: bool) -> String {
        let Some(j) = self.start_job(target, kind, ops, depth, block) else { return "not started".into() };
        if background {
            return "background".into();
        }
        let mut last = u64::MAX;
        let mut since = Instant::now();
        while !self.jobs[j].job.finished() {
            let done = self.jobs[j].job.stats.ops_done;
            if done != last {
                last = done;
                since = Instant::now();
            } else if since.elapsed() > IDLE_STALL {
                self.violation(format!("io {target}: no progress for {IDLE_STALL:?}"));
                break;
            }
            if !self.tick() {
                self.idle();
            }
        }
        let st = self.jobs[j].job.stats;
        self.say(format!("io {target}: {} ops, {} reads verified, {} failed", st.ops_done, st.reads_verified, st.failed));
        format!("{} ops, {} verified reads, {} failed", st.ops_done, st.reads_verified, st.failed)
    }

    fn busy(&self) -> bool {
        self.jobs.iter().any(|j| !j.job.finished() || j.in_flight() > 0)
    }

    fn wait_idle(&mut self) -> String {
        let mut last = u64::MAX;
        let mut since = Instant::now();
        while self.busy() {
            let done: u64 = self.jobs.iter().map(|j| j.job.stats.ops_done).sum();
            if done != last {
                last = done;
                since = Instant::now();
            } else if since.elapsed() > IDLE_STALL {
                self.violation(format!("wait idle: no progress for {IDLE_STALL:?}"));
                return "stalled".into();
            }
            if !self.tick() {
                self.idle();
            }
        }
        String::new()
    }

    // --- removal -------------------------------------------------------------------------------

    /// The controller left: the module's device is off its bus's attached children and QEMU's
    /// slot is empty.
    fn removed(&self, slot: u8) -> bool {
        devices::attached(slot).is_none() && !machine::with_machine(|m| m.slot_present(slot))
    }

    fn in_flight_on(&self, id: &str) -> usize {
        self.jobs.iter().filter(|j| j.job.target.ctrl == id).map(|j| j.in_flight()).sum()
    }

    fn detach(&mut self, id: &str, mode: DetachMode, during_io: bool, jitter_ms: u64, refused: bool, wait: bool) -> String {
        let Some(slot) = self.ctrls.get(id).map(|c| c.slot).filter(|&s| devices::attached(s).is_some()) else {
            self.violation(format!("detach {id}: not attached"));
            return "not attached".into();
        };
        let mode = match mode {
            DetachMode::Random if self.random() & 1 == 0 => DetachMode::Announced,
            DetachMode::Random => DetachMode::Surprise,
            m => m,
        };
        if jitter_ms > 0 {
            let ms = self.random() % (jitter_ms + 1);
            self.tick_until(Duration::from_millis(ms), |_| false);
            if devices::attached(slot).is_none() {
                self.violation(format!("detach {id}: the controller went away by itself"));
                return "gone before removal".into();
            }
        }
        if during_io && self.in_flight_on(id) == 0 {
            // Make sure bios are really in flight at the moment of removal.
            let first = self.ctrls.get(id).and_then(|c| c.images.iter().next().map(|(n, i)| (*n, i.lba_bytes.max(4096)))).unwrap_or((1, 4096));
            self.start_job(&format!("{id}/{}", first.0), IoKind::Mixed, 64, 16, first.1);
            self.tick();
        } else if !during_io {
            let cid = id.to_string();
            let idle = self.tick_until(IDLE_STALL, |s| s.jobs.iter().filter(|j| j.job.target.ctrl == cid).all(|j| j.job.finished() && j.in_flight() == 0));
            if !idle {
                self.violation(format!("detach {id}: I/O did not finish before an idle detach"));
            }
        }
        if refused {
            // The jobs' consumers let go, as for any announced removal: what must keep the
            // controller is the `open` step's holder alone.
            for j in self.jobs.iter_mut().filter(|j| j.job.target.ctrl == id) {
                j.close();
            }
            return self.detach_refused(id, slot);
        }
        let in_flight = self.in_flight_on(id);
        let rf = &mut self.report.removals;
        match mode {
            DetachMode::Announced => rf.announced += 1,
            _ => rf.surprise += 1,
        }
        if in_flight > 0 {
            rf.with_io_in_flight += 1;
            rf.requests_in_flight += in_flight as u64;
        }
        match mode {
            DetachMode::Announced => {
                // The consumers let go (an open disk is what the module refuses to eject);
                // their bios in flight stay in flight.
                for j in self.jobs.iter_mut().filter(|j| j.job.target.ctrl == id) {
                    j.close();
                }
                self.say(format!("{id}: QMP device_del (announced removal, {in_flight} bios in flight)"));
                if let Err(e) = machine::with_machine(|m| m.request_unplug(slot)) {
                    self.violation(format!("detach {id}: device_del: {e}"));
                    return "qemu refused".into();
                }
            }
            DetachMode::Surprise | DetachMode::Random => {
                self.say(format!("{id}: surprise removal (eject with no device_del, {in_flight} bios in flight)"));
                if let Err(e) = machine::with_machine(|m| m.eject(slot)) {
                    self.violation(format!("harness: surprise eject of slot {slot}: {e}"));
                }
            }
        }
        if !wait {
            self.removing.push((id.to_string(), slot));
            return format!("{mode:?} started, {in_flight} in flight");
        }
        if !self.tick_until_timer(STEP_TIMEOUT, |s| s.removed(slot)) {
            self.violation(format!("detach {id}: not detached and ejected within {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        self.ctrls.remove(id);
        self.report.cycles += 1;
        let wait = if mode == DetachMode::Surprise { Duration::from_millis(20) } else { Duration::from_secs(1) };
        machine::with_machine(|m| m.reap(wait));
        format!("{mode:?}, {in_flight} in flight")
    }

    fn wait_removed(&mut self) -> String {
        let pending = std::mem::take(&mut self.removing);
        let p2 = pending.clone();
        if !self.tick_until_timer(STEP_TIMEOUT, move |s| p2.iter().all(|(_, slot)| s.removed(*slot))) {
            let left: Vec<&String> = pending.iter().filter(|(_, slot)| !self.removed(*slot)).map(|(id, _)| id).collect();
            self.violation(format!("wait removed: {left:?} not detached and ejected within {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        for (id, _) in &pending {
            self.ctrls.remove(id);
        }
        self.report.cycles += pending.len() as u64;
        machine::with_machine(|m| m.reap(Duration::from_secs(1)));
        format!("{} removed", pending.len())
    }

    /// An announced removal the module must refuse (a holder from `open`): the eject request
    /// is answered (its `ejects_refused` counter moves or the hotplug task settles), no `_EJ0`,
    /// the controller stays.
    fn detach_refused(&mut self, id: &str, slot: u8) -> String {
        let (refused0, ejects0) = (self.counter("ejects_refused"), self.counter("ejects"));
        self.report.removals.announced += 1;
        self.say(format!("{id}: QMP device_del with a node or disk held open: must be refused"));
        if let Err(e) = machine::with_machine(|m| m.request_unplug(slot)) {
            self.violation(format!("detach {id}: device_del: {e}"));
            return "qemu refused".into();
        }
        let notifies0 = self.counter("notifies");
        self.tick_until(STEP_TIMEOUT, |s| s.counter("notifies") > notifies0);
        self.settle();
        let (refused, ejects) = (self.counter("ejects_refused") - refused0, self.counter("ejects") - ejects0);
        if ejects > 0 {
            self.violation(format!("detach {id}: _EJ0 evaluated on a device in use"));
        }
        if devices::attached(slot).is_none() {
            self.violation(format!("detach {id}: the controller did not stay attached after refusing the eject"));
        }
        self.report.removals.refused += 1;
        format!("refused ({refused} counted by the module), no _EJ0")
    }

    /// Ticks until the taskqueues have nothing left and a short quiet period passed.
    fn settle(&mut self) {
        let mut quiet = Instant::now();
        let end = Instant::now() + STEP_TIMEOUT;
        while quiet.elapsed() < Duration::from_millis(30) && Instant::now() < end {
            if self.tick() {
                quiet = Instant::now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    // --- notify, open, close -------------------------------------------------------------------

    /// A storm of `Notify(slot, code)`: all delivered from the acpi_task before the module's
    /// hotplug task runs. `_OST` is not observable on this machine (QEMU's pc DSDT has none on
    /// its slot objects, and the module evaluates it only where it exists), so `expect_ost` is
    /// checked by its consequence: success of an eject request = the slot emptied; in-use or
    /// busy = the controller stayed; failure or unrecognized = nothing changed.
    fn notify(&mut self, slot: u8, code: u32, times: u32, expect_ost: Option<OstExpect>, expect_rescans: Option<u64>) -> String {
        // What QEMU raised before the storm arrives first.
        self.report.hotplug.notifies += acpi::run_gpe().len() as u64;
        let rescans0 = self.counter("rescans");
        let attached0 = devices::attached(slot).is_some();
        for _ in 0..times {
            acpi::notify(slot, code);
        }
        self.report.hotplug.notifies += u64::from(times);
        self.say(format!("slot {slot}: {times} x Notify {code} before the hotplug task runs"));
        if code == 3 && expect_ost == Some(OstExpect::Success) {
            if !self.tick_until(STEP_TIMEOUT, |s| s.removed(slot)) {
                self.violation(format!("notify slot {slot}: {times} x Notify 3 did not eject the controller within {STEP_TIMEOUT:?}"));
            } else {
                if let Some(id) = self.ctrls.iter().find(|(_, c)| c.slot == slot).map(|(id, _)| id.clone()) {
                    self.ctrls.remove(&id);
                }
                machine::with_machine(|m| m.reap(Duration::from_secs(1)));
            }
        } else if code == 1 && expect_ost == Some(OstExpect::Success) && !self.tick_until(STEP_TIMEOUT, |s| s.ready(slot)) {
            self.violation(format!("notify slot {slot}: {times} x Notify 1 did not attach the controller within {STEP_TIMEOUT:?}"));
        }
        self.settle();
        let rescans = self.counter("rescans") - rescans0;
        let attached = devices::attached(slot).is_some();
        match expect_ost {
            Some(OstExpect::InUse | OstExpect::Busy) if !attached => {
                self.violation(format!("notify slot {slot}: the eject of a controller in use was not refused (it left)"));
            }
            Some(OstExpect::Failure | OstExpect::Unrecognized) if attached != attached0 => {
                self.violation(format!("notify slot {slot}: {times} x Notify {code} changed the slot (attached {attached0} -> {attached})"));
            }
            _ => {}
        }
        if let Some(want) = expect_rescans {
            if rescans != want {
                self.violation(format!("notify slot {slot}: {times} x Notify {code} caused {rescans} rescans, expected {want}"));
            }
        }
        format!("{rescans} rescans, attached {attached}")
    }

    fn open(&mut self, target: &str, refuse: Refusal) -> String {
        let Ok((ctrl, nsid)) = parse_target(target) else {
            self.violation(format!("open {target}: bad target"));
            return "bad target".into();
        };
        let Some(c) = self.ctrls.get(&ctrl) else {
            self.violation(format!("open {target}: no such controller"));
            return "no controller".into();
        };
        let slot = c.slot;
        let holder = match refuse {
            Refusal::InUse => {
                let disk = c.images.contains_key(&nsid).then(|| devices::disk_of(&c.qdev, nsid, c.images.len())).flatten();
                let Some(disk) = disk else {
                    self.violation(format!("open {target}: no such disk"));
                    return "no disk".into();
                };
                let r = crate::emu::geom::open(&disk);
                if r != 0 {
                    self.violation(format!("open {target}: d_open of {disk} = {r}"));
                    return "refused".into();
                }
                Holder::Disk(disk)
            }
            Refusal::Busy => {
                let Some((name, cdev)) = devices::ns_node(slot, nsid) else {
                    self.violation(format!("open {target}: no such node"));
                    return "no node".into();
                };
                let r = super::devfs_open::open(cdev);
                if r != 0 {
                    self.violation(format!("open {target}: open of /dev/{name} = {r}"));
                    return "refused".into();
                }
                Holder::Node(cdev)
            }
        };
        self.opened.entry((ctrl, nsid)).or_default().push(holder);
        format!("open ({refuse:?})")
    }

    fn close(&mut self, target: &str) -> String {
        let Ok(key) = parse_target(target) else {
            self.violation(format!("close {target}: bad target"));
            return "bad target".into();
        };
        let Some(h) = self.opened.get_mut(&key).and_then(|v| v.pop()) else {
            self.violation(format!("close {target}: not open"));
            return "not open".into();
        };
        if self.opened.get(&key).is_some_and(|v| v.is_empty()) {
            self.opened.remove(&key);
        }
        close_holder(h);
        self.tick();
        "closed".into()
    }

    // --- bring-up removal sweep ----------------------------------------------------------------

    /// For N = 0, stride, 2 * stride, ...: a fresh controller hot-added to `slot` and ejected
    /// right before the module's BAR access N of it, until a bring-up completes before access
    /// N (the device attaches; it is then removed announced). Each run must end with the
    /// module's device gone and the slot empty (bounded), no finding.
    fn sweep(&mut self, slot: u8, namespaces: &[NamespaceSpec], reads: SweepReads, stride: u64) -> String {
        let flavours: &[RemovalReads] = match reads {
            SweepReads::Zeros => &[RemovalReads::Zeros],
            SweepReads::AllOnes => &[RemovalReads::AllOnes],
            SweepReads::Both => &[RemovalReads::Zeros, RemovalReads::AllOnes],
        };
        let saved = machine::with_machine(|m| m.removal_reads);
        let mut notes = Vec::new();
        for &flavour in flavours {
            machine::with_machine(|m| m.removal_reads = flavour);
            let mut n = 0u64;
            let mut runs = 0u64;
            loop {
                let id = format!("sweep{runs}");
                machine::with_machine(|m| m.arm_removal(slot, n));
                if !self.plug(&id, slot, namespaces) {
                    break;
                }
                runs += 1;
                // Either the armed removal fires and the module lets the function go, or the
                // bring-up finished before access n.
                let ok = self.tick_until_timer(STEP_TIMEOUT, |s| {
                    let (_, fired) = machine::with_machine(|m| m.trap_state(slot));
                    (fired && s.removed(slot)) || (!fired && s.ready(slot))
                });
                let (accesses, fired) = machine::with_machine(|m| m.trap_state(slot));
                if !ok {
                    let stale = !fired && accesses == 0 && devices::in_newbus(slot) && devices::attached(slot).is_none();
                    let why = if stale {
                        " — the new controller was never probed: its pci bus still has the driverless child the failed bring-up left in this slot, the module's slot rescan adds only functions that have no child, and nothing deletes that one".to_string()
                    } else {
                        String::new()
                    };
                    self.violation(format!("sweep slot {slot}: removal before access {n} ({flavour:?}): not settled within {STEP_TIMEOUT:?} ({accesses} accesses, fired {fired}){why}"));
                    break;
                }
                if !fired {
                    // The bring-up is done before access n: every earlier point was swept.
                    self.settle();
                    machine::with_machine(|m| m.arm_removal(slot, u64::MAX));
                    if let Err(e) = machine::with_machine(|m| m.request_unplug(slot)) {
                        self.violation(format!("sweep slot {slot}: device_del: {e}"));
                    }
                    if !self.tick_until(STEP_TIMEOUT, |s| s.removed(slot)) {
                        self.violation(format!("sweep slot {slot}: the completed bring-up was not ejected"));
                    }
                    self.ctrls.remove(&id);
                    machine::with_machine(|m| m.reap(Duration::from_secs(1)));
                    break;
                }
                self.report.removals.during_bring_up += 1;
                self.settle();
                self.ctrls.remove(&id);
                machine::with_machine(|m| m.reap(Duration::from_millis(100)));
                n += stride;
                if runs > 2000 {
                    self.violation(format!("sweep slot {slot}: more than 2000 runs without a completed bring-up"));
                    break;
                }
            }
            notes.push(format!("{flavour:?}: {runs} runs, bring-up takes {n} accesses"));
        }
        machine::with_machine(|m| m.removal_reads = saved);
        notes.join("; ")
    }

    // --- expect --------------------------------------------------------------------------------

    fn expect(&mut self, controllers: Option<usize>, namespaces: Option<usize>, nodes: Option<usize>) -> String {
        let got = [("controllers", controllers, devices::attached_count()), ("namespaces", namespaces, devices::disk_count()), ("nodes", nodes, devices::ns_nodes().len())];
        let mut notes = Vec::new();
        for (what, want, got) in got {
            if let Some(want) = want {
                if want != got {
                    self.violation(format!("expect: {what} = {want}, found {got}"));
                }
                notes.push(format!("{what}={got}"));
            }
        }
        notes.join(" ")
    }

    // --- the end: kldunload --------------------------------------------------------------------

    fn finish(mut self) -> Report {
        if !self.removing.is_empty() {
            self.wait_removed();
        }
        for ((ctrl, nsid), holders) in std::mem::take(&mut self.opened) {
            self.violation(format!("{ctrl}/{nsid}: still open at the end (MOD_UNLOAD would refuse with EBUSY)"));
            for h in holders {
                close_holder(h);
            }
        }
        if self.busy() {
            self.wait_idle();
        }
        for j in &mut self.jobs {
            j.close();
        }
        self.settle();
        // The hotplug figures are the module's own counters (hw.nvme_hotplug.*), read before
        // the unload; notifies are what the acpi_task delivered.
        let (rescans, detaches, ejects, refused, failures) =
            (self.counter("rescans"), self.counter("detaches"), self.counter("ejects"), self.counter("ejects_refused"), self.counter("hotplug_failures"));
        let h = &mut self.report.hotplug;
        (h.rescans, h.detaches, h.ejects, h.refused, h.failures) = (rescans, detaches, ejects, refused, failures);
        let mut unload = crate::emu::run::Report::default();
        if let Err(e) = crate::emu::run::kldunload(self.ko, &self.modules, &mut unload, &[], false) {
            self.violation(format!("kldunload: {e}"));
        }
        if !unload.unloaded {
            self.violation(format!("kldunload: the module refused to unload (MOD_QUIESCE {:?}, MOD_UNLOAD {:?})", unload.quiesce, unload.unload));
        }
        // Bios the module never finished (their controllers are gone with the module).
        for j in &mut self.jobs {
            j.reap(&mut self.ledger);
        }
        let mut hung = 0;
        for j in &mut self.jobs {
            hung += j.abandon(&mut self.ledger);
        }
        if hung > 0 {
            self.violation(format!("{hung} bio(s) never biodone'd"));
        }
        self.report.hung_ops += hung;
        for j in &mut self.jobs {
            j.job.release_buffers();
            let st = j.job.stats;
            let io = &mut self.report.io;
            io.submitted += st.submitted;
            io.reads_verified += st.reads_verified;
            io.read_mismatches += st.read_mismatches;
            io.bytes += st.bytes;
            io.refused += st.refused;
            self.report.failed_ops += st.failed;
            for m in j.job.mismatches.clone() {
                if self.report.violations.len() < 200 {
                    self.report.violations.push(m);
                }
            }
        }
        self.jobs.clear();
        self.report.dma_leaked_bytes = machine::with_machine(|m| m.lab.guest().live_dma_bytes());
        let module_bytes = super::report::module_bytes_allocated();
        self.report.leaked_bytes = self.report.dma_leaked_bytes + module_bytes;
        self.report.acked_writes = self.ledger.acked_writes();
        if self.opts.lose_a_write {
            if let Some((path, off, len)) = self.ledger.some_acked_block() {
                use std::os::unix::fs::FileExt;
                let zeroed = std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.write_all_at(&vec![0; len], off));
                if let Err(e) = zeroed {
                    self.violation(format!("harness: fault injection on {}: {e}", path.display()));
                }
            }
        }
        match self.ledger.verify_images() {
            Ok(lost) => {
                self.report.lost_writes = lost.len() as u64;
                if !lost.is_empty() {
                    self.violation(format!("{} acknowledged write(s) not found in the image files", lost.len()));
                }
            }
            Err(e) => self.violation(format!("harness: reading images: {e}")),
        }
        self.report.nodes_left = super::report::nodes_alive();
        super::report::take_findings(&mut self.report);
        self.report.interrupts.taken = emu::pci::interrupts_taken();
        let figures = machine::with_machine(|m| (m.lab.guest().qtest_commands(), m.lab.qmp_commands(), m.lab.gpes(), m.lab.retiring().len(), m.lab.process().rss_kib()));
        let q = &mut self.report.qemu;
        (q.qtest_commands, q.qmp_commands, q.gpes, q.devices_not_deleted, q.rss_kib) = figures;
        std::mem::take(&mut self.report)
    }
}

fn close_holder(h: Holder) {
    match h {
        Holder::Disk(d) => {
            let _ = crate::emu::geom::close(&d);
        }
        Holder::Node(cdev) => super::devfs_open::close(cdev),
    }
}
