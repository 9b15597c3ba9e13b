//! Runs a [`Scenario`] against QEMU and produces a [`Report`].
//!
//! Single-threaded: one loop, [`Session::tick`], does everything a kernel does concurrently —
//! the ACPI `_E01` handler (SCI → Notify), completion polling, the health watchdog, and feeding
//! I/O jobs. Background `io` steps are simply jobs that later steps keep ticking, so a detach
//! really happens with requests in flight.
//!
//! The end of a run is the module unload: every remaining controller is detached (drain,
//! nodes destroyed, shutdown, freed), every job's buffers are released, and then the report
//! counts what is left: DMA bytes (`leaked_bytes`), nodes (`nodes_left`), requests never
//! completed (`hung_ops`), and acked writes missing from the raw image files (`lost_writes`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use nvme_hotplug::hotplug::machine::Hotplug;

use crate::driver::{Driver, World};
use crate::ledger::Ledger;
use crate::machine::Machine;
use crate::freebsd_model::FreeBsdRules;
use crate::observer::{NodeId, Observer};
use crate::report::{Report, StepRecord};
use crate::slot_ops::{lab_hotplug, LabSlotOps};
use crate::ledger::splitmix64;
use crate::scenario::{parse_target, ControllerSpec, DetachMode, IoKind, Scenario, Step, WaitUntil};

mod faults;
use crate::workload::{IoJob, JobTarget, StopReason};

/// Longest an attach or detach step waits for the machine and the driver.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a `wait until = "idle"` (and the final drain) waits without progress.
const IDLE_STALL: Duration = Duration::from_secs(20);

/// Configures and runs scenarios.
pub struct Runner {
    scenario: Scenario,
    observer: Box<dyn Observer>,
    verbose: bool,
    progress: bool,
    panic_after_reads: Option<u64>,
    lose_a_write: bool,
}

impl Runner {
    /// A runner judged by the FreeBSD-rules model ([`FreeBsdRules`]: the lab's node rules plus
    /// `kpimodel`).
    pub fn new(scenario: Scenario) -> Self {
        Runner { scenario, observer: Box::new(FreeBsdRules::new()), verbose: false, progress: false, panic_after_reads: None, lose_a_write: false }
    }

    /// Plugs in another kernel model (see [`crate::observer`]).
    pub fn with_observer(mut self, observer: Box<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Prints the story (attach, nodes, removals) as it happens.
    pub fn verbose(mut self, on: bool) -> Self {
        self.verbose = on;
        self
    }

    /// Shows a progress bar for foreground I/O steps.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Fault injection (tests of the lab): after boot, the `n`-th controller register read
    /// panics inside the engine call that made it.
    pub fn inject_panic_after_register_reads(mut self, n: u64) -> Self {
        self.panic_after_reads = Some(n);
        self
    }

    /// Fault injection (tests of the lab): at the end, before the images are checked, one block
    /// of an acknowledged write is zeroed in its image file, as if the device had lost it.
    pub fn inject_lost_write(mut self) -> Self {
        self.lose_a_write = true;
        self
    }

    /// Runs the scenario. Never panics on engine bugs (they are counted); a harness failure
    /// (QEMU missing or dying) is reported as a violation with `ok = false`.
    pub fn run(self) -> Report {
        let start = Instant::now();
        let sc = self.scenario;
        let mut report = Report {
            name: sc.name.clone(),
            seed: sc.seed,
            machine: sc.machine.qemu_name().to_string(),
            driver: crate::scenario::DriverKind::Engine.name().to_string(),
            removal_reads: match sc.removal_reads {
                crate::access_faults::RemovalReads::Zeros => "zeros".into(),
                crate::access_faults::RemovalReads::AllOnes => "all-ones".into(),
            },
            ..Report::default()
        };
        report.interrupts.mode = format!("{:?}", sc.interrupts).to_lowercase();
        report.ram_access = format!("{:?}", sc.ram_access).to_lowercase();
        if sc.interrupts == crate::interrupts::InterruptMode::Intx && sc.machine != crate::qemu::MachineKind::Pc {
            report.violations.push("scenario: `interrupts = \"intx\"` needs the pc machine (PIIX3 PIRQ routing)".into());
            report.total_ms = start.elapsed().as_secs_f64() * 1e3;
            report.decide();
            return report;
        }
        let machine = match Machine::start_with(sc.machine, &sc.controllers, &sc.slots(), sc.ram_access) {
            Ok(mut m) => {
                m.set_removal_reads(sc.removal_reads);
                m
            }
            Err(e) => {
                report.violations.push(format!("harness: cannot start QEMU: {e}"));
                report.total_ms = start.elapsed().as_secs_f64() * 1e3;
                report.decide();
                return report;
            }
        };
        let world = World {
            machine,
            observer: self.observer,
            ledger: Ledger::new(),
            jobs: Vec::new(),
            report,
            verbose: self.verbose,
            ost_log: Vec::new(),
            ej0_log: Vec::new(),
            interrupts: sc.interrupts,
        };
        let mut s = Session {
            w: world,
            drivers: BTreeMap::new(),
            hotplug: lab_hotplug(),
            rerun_at: None,
            seed: sc.seed,
            rng: sc.seed ^ 0x6a09_e667_f3bc_c909,
            allow_failures: false,
            removing: Vec::new(),
            opened: BTreeMap::new(),
            progress: self.progress,
        };
        s.boot();
        if let Some(n) = self.panic_after_reads {
            s.w.machine.guest().inject_register_read_panic(n);
        }
        for step in &sc.steps {
            let t = Instant::now();
            let note = s.step(step);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            s.w.report.steps.push(StepRecord { op: step.op_name().to_string(), ms, note });
            if s.w.machine.guest().fault().is_some() {
                break;
            }
        }
        let mut report = s.finish(self.lose_a_write);
        report.total_ms = start.elapsed().as_secs_f64() * 1e3;
        report.decide();
        report
    }
}

/// A run in progress.
pub struct Session {
    w: World,
    drivers: BTreeMap<String, Driver>,
    /// The project's hotplug state machine (notify half + task half).
    hotplug: Hotplug,
    /// When the state machine asked to run again (an eject waiting for the device to vanish).
    rerun_at: Option<Instant>,
    seed: u64,
    /// Seeded generator for the scenario's random choices (removal mode and timing).
    rng: u64,
    /// The hotplug state machine's failures are expected right now (a removal injected into a
    /// bring-up, an eject request for an empty slot); they are counted but not violations.
    allow_failures: bool,
    /// Removals started by `detach` with `wait = false`: (id, slot).
    removing: Vec<(String, u8)>,
    /// Nodes held open by `open` steps, by (controller, nsid); outlives a removed controller.
    opened: BTreeMap<(String, u32), u32>,
    progress: bool,
}

impl Session {
    /// Boot: scan the bus and attach what is there (the cold-plugged controllers).
    fn boot(&mut self) {
        match self.w.machine.scan() {
            Ok(found) => {
                for (slot, _) in found {
                    if let Some(d) = Driver::attach(&mut self.w, slot) {
                        self.drivers.insert(d.id.clone(), d);
                    }
                }
            }
            Err(e) => self.w.violation(format!("harness: bus scan: {e}")),
        }
    }

    /// One round of everything a kernel does concurrently.
    fn tick(&mut self) {
        // 1. The SCI handler: Notify(slot, 1|3) into the state machine's notify half; its
        //    task half runs when told to (or when a re-check is due).
        let mut run = self.rerun_at.is_some_and(|t| Instant::now() >= t);
        match self.w.machine.poll_notifies() {
            Ok(notifies) => {
                for n in notifies {
                    self.w.observer.notify(n.slot, n.code as u32);
                    self.w.report.hotplug.notifies += 1;
                    self.w.say(format!("slot {}: Notify {} ({:?})", n.slot, n.code as u32, n.code));
                    run |= self.hotplug.notify(n.slot as usize, n.code as u32);
                }
            }
            Err(e) => self.w.violation(format!("harness: ACPI poll: {e}")),
        }
        if run {
            self.run_hotplug();
        }
        // 2. Completions and the watchdog.
        let ids: Vec<String> = self.drivers.keys().cloned().collect();
        for id in &ids {
            let Some(mut d) = self.drivers.remove(id) else { continue };
            let mut lost = d.poll(&mut self.w);
            if lost.is_none() {
                lost = d.watchdog(&mut self.w);
            }
            match lost {
                Some(h) => d.teardown_lost(&mut self.w, h),
                None => {
                    self.drivers.insert(id.clone(), d);
                }
            }
        }
        // 3. Feed the jobs.
        for job in self.w.jobs.iter_mut() {
            if job.finished() || job.stopped.is_some() {
                continue;
            }
            match self.drivers.get_mut(&job.target.ctrl) {
                Some(d) => d.feed(&mut self.w.report, self.w.observer.as_mut(), &mut self.w.ledger, job),
                None => job.stop(StopReason::ControllerGone, &mut self.w.ledger),
            }
        }
    }

    /// The hotplug task: runs the state machine over the pending events with the lab's ops.
    fn run_hotplug(&mut self) {
        let mut ops = LabSlotOps { w: &mut self.w, drivers: &mut self.drivers };
        let r = self.hotplug.run_pending(&mut ops);
        let h = &mut self.w.report.hotplug;
        h.rescans += r.rescans as u64;
        h.detaches += r.detaches as u64;
        h.ejects += r.ejects as u64;
        h.ejected += r.ejected as u64;
        h.refused += r.refused as u64;
        h.failures += r.failures as u64;
        if r.failures > 0 && !self.allow_failures {
            self.w.violation(format!("hotplug state machine reported {} failure(s): {r:?}", r.failures));
        }
        self.rerun_at = r.rerun_after_us.map(|us| Instant::now() + Duration::from_micros(us as u64));
    }

    /// Ticks until `done` or `timeout`; returns whether `done` became true.
    fn tick_until(&mut self, timeout: Duration, mut done: impl FnMut(&mut Session) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline || self.w.machine.guest().fault().is_some() {
                return false;
            }
            self.tick();
        }
    }

    fn step(&mut self, step: &Step) -> String {
        match step {
            Step::Attach { id, slot, namespaces, wait } => {
                let spec = ControllerSpec { id: id.clone(), slot: *slot, namespaces: namespaces.clone() };
                if *wait {
                    self.attach(&spec)
                } else {
                    self.plug(&spec)
                }
            }
            Step::Notify { slot, code, times, expect_ost, expect_rescans } => {
                self.notify(*slot, *code, *times, *expect_ost, *expect_rescans)
            }
            Step::Open { target, refuse } => self.open(target, *refuse),
            Step::Close { target } => self.close(target),
            Step::BringupRemovalSweep { slot, namespaces, reads, stride } => {
                self.bringup_removal_sweep(*slot, namespaces, *reads, *stride)
            }
            Step::Io { target, kind, ops, depth, block, background } => {
                self.io(target, *kind, *ops, *depth, *block, *background)
            }
            Step::Detach { id, mode, during_io, jitter_ms, refused, wait } => {
                self.detach(id, *mode, *during_io, *jitter_ms, *refused, *wait)
            }
            Step::Wait { ms, until } => match (ms, until) {
                (Some(ms), _) => {
                    self.tick_until(Duration::from_millis(*ms), |_| false);
                    String::new()
                }
                (None, Some(WaitUntil::Idle)) => self.wait_idle(),
                (None, Some(WaitUntil::Attached)) => self.wait_attached(),
                (None, Some(WaitUntil::Removed)) => self.wait_removed(),
                (None, None) => String::new(),
            },
            Step::Repeat { times, steps } => {
                for _ in 0..*times {
                    for s in steps {
                        self.step(s);
                    }
                    if self.w.machine.guest().fault().is_some() {
                        break;
                    }
                }
                format!("{times} times")
            }
            Step::Expect { controllers, namespaces, nodes } => {
                let live: Vec<&Driver> = self.drivers.values().filter(|d| d.is_live()).collect();
                let got_c = live.len();
                let got_n: usize = live.iter().map(|d| d.node_count()).sum();
                let got_nodes = self.w.observer.nodes_alive();
                let mut notes = Vec::new();
                for (what, want, got) in [
                    ("controllers", controllers, got_c),
                    ("namespaces", namespaces, got_n),
                    ("nodes", nodes, got_nodes),
                ] {
                    if let Some(want) = want {
                        if *want != got {
                            self.w.violation(format!("expect: {what} = {want}, found {got}"));
                        }
                        notes.push(format!("{what}={got}"));
                    }
                }
                notes.join(" ")
            }
        }
    }

    /// Plugs a controller without waiting for the driver (`attach` with `wait = false`).
    fn plug(&mut self, spec: &ControllerSpec) -> String {
        self.w.say(format!("hot-add {} at slot {} (not waiting for the driver)", spec.id, spec.slot));
        match self.w.machine.hot_add(spec) {
            Ok(()) => "plugged".into(),
            Err(e) => {
                self.w.violation(format!("attach {}: QEMU refused: {e}", spec.id));
                "qemu refused".into()
            }
        }
    }

    fn attach(&mut self, spec: &ControllerSpec) -> String {
        if self.drivers.contains_key(&spec.id) {
            self.w.violation(format!("attach {}: a controller with that id is attached already", spec.id));
            return "refused".into();
        }
        self.w.say(format!("hot-add {} at slot {} (QMP blockdev-add + device_add)", spec.id, spec.slot));
        if let Err(e) = self.w.machine.hot_add(spec) {
            self.w.violation(format!("attach {}: QEMU refused: {e}", spec.id));
            return "qemu refused".into();
        }
        let id = spec.id.clone();
        if !self.tick_until(STEP_TIMEOUT, |s| s.drivers.contains_key(&id)) {
            self.w.violation(format!("attach {}: no controller came up within {:?}", spec.id, STEP_TIMEOUT));
            return "timeout".into();
        }
        String::new()
    }

    fn io(&mut self, target: &str, kind: IoKind, ops: u64, depth: u32, block: u32, background: bool) -> String {
        let Some(job_id) = self.start_job(target, kind, ops, depth, block) else {
            return "not started".into();
        };
        if background {
            return "background".into();
        }
        let bar = if self.progress {
            let pb = ProgressBar::new(ops);
            if let Ok(style) = ProgressStyle::with_template("  {bar:40} {pos}/{len} ops {per_sec} {msg}") {
                pb.set_style(style);
            }
            Some(pb)
        } else {
            None
        };
        let mut last = 0;
        let mut last_progress = Instant::now();
        loop {
            let job = &self.w.jobs[job_id];
            if job.finished() {
                break;
            }
            let done = job.stats.ops_done;
            if done != last {
                last = done;
                last_progress = Instant::now();
                if let Some(b) = &bar {
                    b.set_position(done);
                }
            } else if last_progress.elapsed() > IDLE_STALL || self.w.machine.guest().fault().is_some() {
                self.w.violation(format!("io {target}: no progress for {IDLE_STALL:?}"));
                break;
            }
            self.tick();
        }
        let st = self.w.jobs[job_id].stats;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        self.w.say(format!(
            "io {target}: {} ops done, {} KiB moved, {} reads verified, {} failed",
            st.ops_done,
            st.bytes >> 10,
            st.reads_verified,
            st.failed
        ));
        format!("{} ops, {} verified reads, {} failed", st.ops_done, st.reads_verified, st.failed)
    }

    fn start_job(&mut self, target: &str, kind: IoKind, ops: u64, depth: u32, block: u32) -> Option<usize> {
        let (ctrl, nsid) = match parse_target(target) {
            Ok(t) => t,
            Err(e) => {
                self.w.violation(format!("io: {e}"));
                return None;
            }
        };
        let Some(d) = self.drivers.get(&ctrl).filter(|d| d.is_live()) else {
            self.w.violation(format!("io {target}: controller {ctrl} is not attached"));
            return None;
        };
        let Some(img) = d.images.get(&nsid) else {
            self.w.violation(format!("io {target}: controller {ctrl} has no namespace {nsid}"));
            return None;
        };
        let t = JobTarget {
            ctrl,
            nsid,
            image: img.path.clone(),
            lba_bytes: img.lba_bytes,
            ns_blocks: img.bytes / img.lba_bytes as u64,
        };
        let id = self.w.jobs.len() as u32;
        let seed = self.seed.wrapping_add(id as u64);
        let job = IoJob::new(id, self.w.machine.guest(), t, kind, ops, depth, block, seed);
        if let Some(StopReason::Setup(why)) = &job.stopped {
            self.w.violation(format!("io {target}: {why}"));
        }
        self.w.jobs.push(job);
        Some(id as usize)
    }

    fn random(&mut self) -> u64 {
        splitmix64(&mut self.rng)
    }

    fn detach(&mut self, id: &str, mode: DetachMode, during_io: bool, jitter_ms: u64, refused: bool, wait: bool) -> String {
        let Some(slot) = self.drivers.get(id).map(|d| d.slot) else {
            self.w.violation(format!("detach {id}: not attached"));
            return "not attached".into();
        };
        let mode = match mode {
            DetachMode::Random if self.random() & 1 == 0 => DetachMode::Announced,
            DetachMode::Random => DetachMode::Surprise,
            m => m,
        };
        if jitter_ms > 0 {
            // A random point of the running I/O.
            let ms = self.random() % (jitter_ms + 1);
            self.tick_until(Duration::from_millis(ms), |_| false);
            if !self.drivers.contains_key(id) {
                self.w.violation(format!("detach {id}: the controller went away by itself"));
                return "gone before removal".into();
            }
        }
        if refused {
            return self.detach_refused(id, slot, during_io);
        }
        if during_io {
            // Make sure requests are really in flight at the moment of removal.
            if self.drivers.get(id).map_or(0, |d| d.outstanding()) == 0 {
                let first_ns = self.drivers.get(id).and_then(|d| d.images.keys().next().copied()).unwrap_or(1);
                let block = self.drivers.get(id).and_then(|d| d.images.get(&first_ns)).map_or(4096, |i| i.lba_bytes.max(4096));
                self.start_job(&format!("{id}/{first_ns}"), IoKind::Mixed, 64, 16, block);
                self.tick();
            }
        } else {
            let cid = id.to_string();
            let idle = self.tick_until(IDLE_STALL, |s| {
                s.drivers.get(&cid).is_none_or(|d| d.outstanding() == 0)
                    && s.w.jobs.iter().filter(|j| j.target.ctrl == cid).all(|j| j.finished())
            });
            if !idle {
                self.w.violation(format!("detach {id}: I/O did not finish before an idle detach"));
            }
        }
        let in_flight = self.drivers.get(id).map_or(0, |d| d.outstanding());
        if let Some(d) = self.drivers.get_mut(id) {
            d.expect_removal = true;
        }
        let rf = &mut self.w.report.removals;
        match mode {
            DetachMode::Announced => rf.announced += 1,
            _ => rf.surprise += 1,
        }
        if in_flight > 0 {
            rf.with_io_in_flight += 1;
            rf.requests_in_flight += in_flight as u64;
        }
        let cid = id.to_string();
        match mode {
            DetachMode::Announced => {
                self.w.say(format!("{id}: QMP device_del (announced removal, {in_flight} in flight)"));
                if let Err(e) = self.w.machine.request_unplug(slot) {
                    self.w.violation(format!("detach {id}: device_del: {e}"));
                    return "qemu refused".into();
                }
            }
            DetachMode::Surprise | DetachMode::Random => {
                self.w.say(format!("{id}: surprise removal (eject with no device_del, {in_flight} in flight)"));
                if let Err(e) = self.w.machine.eject(slot) {
                    self.w.violation(format!("harness: surprise eject of slot {slot}: {e}"));
                }
            }
        }
        if !wait {
            self.removing.push((cid, slot));
            return format!("{mode:?} started, {in_flight} in flight");
        }
        let gone = self.tick_until(STEP_TIMEOUT, |s| {
            !s.drivers.contains_key(&cid) && s.rerun_at.is_none() && !s.w.machine.slot_present(slot).unwrap_or(true)
        });
        if !gone {
            self.w.violation(format!("detach {id}: not detached and ejected within {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        self.w.report.cycles += 1;
        self.w.ej0_log.clear();
        // Let QEMU finish deleting the device and free its block nodes. Bounded, and short
        // after a surprise removal: ejected with commands in flight in its backend, QEMU may
        // never finish (it leaks the device; counted in `qemu.devices_not_deleted`); a later
        // reap picks up a late DEVICE_DELETED. The slot itself is reusable at once.
        let wait = match mode {
            DetachMode::Surprise => Duration::from_millis(20),
            _ => Duration::from_secs(1),
        };
        let _ = self.w.machine.reap(wait);
        format!("{mode:?}, {in_flight} in flight")
    }

    fn busy(&self) -> bool {
        self.w.jobs.iter().any(|j| !j.finished()) || self.drivers.values().any(|d| d.outstanding() > 0)
    }

    fn wait_attached(&mut self) -> String {
        let all = |s: &mut Session| {
            s.w.machine.plugged_slots().iter().all(|slot| s.drivers.values().any(|d| d.slot == *slot))
        };
        if !self.tick_until(STEP_TIMEOUT, all) {
            let missing: Vec<u8> = self
                .w
                .machine
                .plugged_slots()
                .into_iter()
                .filter(|slot| !self.drivers.values().any(|d| d.slot == *slot))
                .collect();
            self.w.violation(format!("wait attached: slot(s) {missing:?} still without a driver after {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        format!("{} attached", self.drivers.len())
    }

    fn wait_removed(&mut self) -> String {
        let pending = std::mem::take(&mut self.removing);
        let n = pending.len();
        let p2 = pending.clone();
        let done = self.tick_until(STEP_TIMEOUT, move |s| {
            s.rerun_at.is_none()
                && p2.iter().all(|(id, slot)| !s.drivers.contains_key(id) && !s.w.machine.slot_present(*slot).unwrap_or(true))
        });
        if !done {
            let left: Vec<&String> = pending.iter().filter(|(id, _)| self.drivers.contains_key(id)).map(|(id, _)| id).collect();
            self.w.violation(format!("wait removed: {left:?} not detached and ejected within {STEP_TIMEOUT:?}"));
            return "timeout".into();
        }
        self.w.report.cycles += n as u64;
        let _ = self.w.machine.reap(Duration::from_secs(1));
        format!("{n} removed")
    }

    fn wait_idle(&mut self) -> String {
        let mut last = u64::MAX;
        let mut since = Instant::now();
        while self.busy() {
            let done: u64 = self.w.jobs.iter().map(|j| j.stats.ops_done).sum();
            if done != last {
                last = done;
                since = Instant::now();
            } else if since.elapsed() > IDLE_STALL || self.w.machine.guest().fault().is_some() {
                self.w.violation(format!("wait idle: no progress for {IDLE_STALL:?}"));
                return "stalled".into();
            }
            self.tick();
        }
        String::new()
    }

    /// Module unload and accounting.
    fn finish(mut self, lose_a_write: bool) -> Report {
        if !self.removing.is_empty() && self.w.machine.guest().fault().is_none() {
            self.wait_removed();
        }
        for ((ctrl, nsid), _) in std::mem::take(&mut self.opened) {
            // MOD_UNLOAD refuses with EBUSY while a node is open: a scenario must close first.
            self.w.violation(format!("{ctrl}/{nsid}: still open at the end (MOD_UNLOAD would refuse with EBUSY)"));
            self.w.observer.node_closed(&NodeId { ctrl: ctrl.clone(), nsid });
            if let Some(d) = self.drivers.get_mut(&ctrl) {
                d.open.clear();
            }
        }
        if self.busy() && self.w.machine.guest().fault().is_none() {
            self.wait_idle();
        }
        for (_, mut d) in std::mem::take(&mut self.drivers) {
            d.expect_removal = true;
            d.detach_announced(&mut self.w);
        }
        let mut hung = 0;
        for job in self.w.jobs.iter_mut() {
            hung += job.abandon(&mut self.w.ledger);
        }
        if hung > 0 {
            self.w.report.hung_ops += hung;
            self.w.violation(format!("{hung} request(s) still in flight at the end"));
        }
        let w = &mut self.w;
        for job in w.jobs.iter_mut() {
            job.release_buffers();
            let st = job.stats;
            w.report.io.submitted += st.submitted;
            w.report.io.reads_verified += st.reads_verified;
            w.report.io.read_mismatches += st.read_mismatches;
            w.report.io.bytes += st.bytes;
            w.report.io.refused += st.refused;
            for m in job.mismatches.clone() {
                if w.report.violations.len() < 200 {
                    w.report.violations.push(m);
                }
            }
        }
        w.jobs.clear();
        if w.ledger.reserved_blocks() != 0 {
            let n = w.ledger.reserved_blocks();
            w.violation(format!("harness: {n} block reservation(s) left after every job ended"));
        }
        w.report.dma_leaked_bytes = w.machine.guest().live_dma_bytes();
        if w.report.dma_leaked_bytes > 0 {
            let lb = w.report.dma_leaked_bytes;
            w.violation(format!("{lb} bytes of DMA memory still allocated after teardown"));
        }
        // Bounded: devices QEMU leaked (ejected with backend I/O in flight) never finish.
        let _ = w.machine.reap(Duration::from_millis(500));
        w.report.acked_writes = w.ledger.acked_writes();
        if lose_a_write {
            if let Some((path, off, len)) = w.ledger.some_acked_block() {
                use std::os::unix::fs::FileExt;
                let zeroed = std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.write_all_at(&vec![0; len], off));
                if let Err(e) = zeroed {
                    w.violation(format!("harness: fault injection on {}: {e}", path.display()));
                }
            }
        }
        match w.ledger.verify_images() {
            Ok(lost) => {
                w.report.lost_writes = lost.len() as u64;
                if !lost.is_empty() {
                    let n = lost.len();
                    w.violation(format!("{n} acknowledged write(s) not found in the image files"));
                }
            }
            Err(e) => w.violation(format!("harness: reading images: {e}")),
        }
        // Every controller is detached: the module is unloaded, and the kernel model says what a
        // FreeBSD kernel would have been left with.
        w.observer.module_unloaded();
        w.report.nodes_left = w.observer.nodes_alive();
        for v in w.observer.violations() {
            w.violation(format!("observer: {v}"));
        }
        w.report.kernel = w.observer.kernel_report();
        w.report.leaked_bytes = w.report.dma_leaked_bytes + w.report.kernel.as_ref().map_or(0, |k| k.leaked_bytes);
        if let Some(f) = w.machine.guest().fault() {
            w.violation(format!("harness: {f}"));
        }
        w.report.qemu.qtest_commands = w.machine.guest().qtest_commands();
        w.report.qemu.qmp_commands = w.machine.qmp_commands();
        w.report.qemu.gpes = w.machine.gpes();
        w.report.qemu.devices_not_deleted = w.machine.retiring().len();
        w.report.qemu.rss_kib = w.machine.process().rss_kib();
        std::mem::take(&mut w.report)
    }
}
