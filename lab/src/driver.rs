//! The kernel's side of one controller: what the FreeBSD driver does around the engine.
//!
//! - attach (after a Notify 1 or at boot): probe the slot, bring the engine up, check the
//!   namespaces against what was plugged, create one node per namespace;
//! - normal operation: poll completions and route them to the I/O job that owns the tag; a
//!   watchdog asks the engine for the controller's health (the only way a surprise removal is
//!   noticed: QEMU raises nothing and returns zeros);
//! - announced detach (Notify 3, through the hotplug state machine, see `slot_ops`): stop new
//!   I/O, let in-flight I/O finish (the device is still there), fail whatever is left, destroy
//!   the nodes, shut the controller down, free it; the state machine then calls `_EJ0`;
//! - lost controller (surprise removal, engine gave up): fail everything at once, destroy
//!   nodes, free.
//!
//! Ordering rules (checked by the observer): nodes are destroyed only when no request through
//! them is in flight, and the controller is freed only after its nodes are gone. Every call into
//! the engine goes through [`guard`]: a panic inside it is caught, counted, and the controller
//! is treated as lost, so one engine bug cannot take the lab down.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use nvme_hotplug::hotplug::ost::OstStatus;
use nvme_hotplug::hotplug::slot_ops::DetachError;
use nvme_hotplug::nvme::{Completion, Config, Controller, Event, Health, NvmeError};

use crate::interrupts::{Interrupt, InterruptMode, MSI_DATA};
use crate::ledger::Ledger;
use crate::machine::{Image, Machine};
use crate::observer::{NodeId, Observer};
use crate::platform::LabPlatform;
use crate::report::Report;
use crate::workload::{IoJob, StopReason};

/// Everything a driver needs besides itself (split from the drivers so both can be borrowed).
pub struct World {
    /// The QEMU machine.
    pub machine: Machine,
    /// The kernel model watching.
    pub observer: Box<dyn Observer>,
    /// Acked writes.
    pub ledger: Ledger,
    /// I/O jobs, indexed by job id.
    pub jobs: Vec<IoJob>,
    /// The report being built.
    pub report: Report,
    /// Print the story as it happens.
    pub verbose: bool,
    /// `_OST(source, status)` evaluations per slot, in order (steps that check them clear it).
    pub ost_log: Vec<(u8, u32, OstStatus)>,
    /// `_EJ0` evaluations, by slot (steps that check them clear it).
    pub ej0_log: Vec<u8>,
    /// How drivers learn of completions (the scenario's `interrupts`).
    pub interrupts: InterruptMode,
}

impl World {
    /// Prints a story line when verbose.
    pub fn say(&self, msg: impl AsRef<str>) {
        if self.verbose {
            println!("  {}", msg.as_ref());
        }
    }

    /// Records a violation (bounded list).
    pub fn violation(&mut self, msg: impl Into<String>) {
        let m = msg.into();
        if self.verbose {
            println!("  VIOLATION: {m}");
        }
        if self.report.violations.len() < 200 {
            self.report.violations.push(m);
        }
    }

    /// Routes one completion to its job, the ledger and the observer.
    pub fn deliver(&mut self, ctrl: &str, c: Completion) {
        let job_id = (c.tag >> 32) as usize;
        let Some(job) = self.jobs.get_mut(job_id) else {
            self.violation(format!("{ctrl}: completion for unknown tag {:#x}", c.tag));
            return;
        };
        let nsid = job.target.nsid;
        if !job.complete(c, &mut self.ledger) {
            self.violation(format!("{ctrl}: completion for tag {:#x} that is not in flight (duplicate?)", c.tag));
            return;
        }
        if c.result.is_err() {
            self.report.failed_ops += 1;
        }
        self.observer.io_finished(&NodeId { ctrl: ctrl.to_string(), nsid }, c.tag, c.result.is_ok());
    }
}

/// Runs an engine call, catching a panic. `None` means it panicked (already counted).
pub fn guard<R>(report: &mut Report, what: &str, f: impl FnOnce() -> R) -> Option<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(p) => {
            report.panics += 1;
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            if report.violations.len() < 200 {
                report.violations.push(format!("engine panicked in {what}: {msg}"));
            }
            None
        }
    }
}

/// The engine configuration the lab uses: defaults, with a command timeout short enough that
/// a controller that swallowed commands is given up within a scenario.
pub fn lab_config() -> Config {
    Config { cmd_timeout_us: 5_000_000, ..Config::default() }
}

/// Driver state of one controller.
pub struct Driver {
    /// Scenario id.
    pub id: String,
    /// Slot.
    pub slot: u8,
    ctrl: Option<Controller<LabPlatform>>,
    nodes: Vec<NodeId>,
    /// Images by nsid (what was plugged).
    pub images: BTreeMap<u32, Image>,
    detaching: bool,
    /// A removal the scenario caused (a loss is then expected, not a violation).
    pub expect_removal: bool,
    last_health: Instant,
    /// The controller's interrupt when the scenario runs interrupt-driven (dropped, which
    /// turns MSI-X off and frees the mailbox, only after the controller is freed).
    irq: Option<Interrupt>,
    /// When the watchdog last polled (interrupt-driven mode only).
    last_watchdog_poll: Instant,
    /// Nodes held open (`open` step), by nsid: an eject request is refused while any is.
    pub open: BTreeMap<u32, u32>,
    /// How an eject request is refused while a node is open.
    pub refusal: DetachError,
    /// Device accesses the bring-up made.
    pub bringup_accesses: u64,
}

/// How often the watchdog asks for the controller's health.
pub const HEALTH_PERIOD: Duration = Duration::from_millis(10);

/// Interrupt-driven mode: how often the watchdog polls anyway (the kld's `WATCHDOG_US`), which
/// also expires overdue commands and recovers a missed interrupt.
pub const WATCHDOG_POLL_PERIOD: Duration = Duration::from_secs(1);

impl Driver {
    /// Attach: probe `slot`, bring the engine up, check namespaces, create nodes.
    pub fn attach(w: &mut World, slot: u8) -> Option<Driver> {
        let Some(dev) = w.machine.plugged(slot).cloned() else {
            w.say(format!("slot {slot}: device check, but nothing was plugged there"));
            return None;
        };
        let func = match w.machine.probe(slot) {
            Ok(Some(f)) => f,
            Ok(None) => {
                w.violation(format!("{}: slot {slot} has no NVMe function after device check", dev.id));
                return None;
            }
            Err(e) => {
                w.violation(format!("harness: probing slot {slot}: {e}"));
                return None;
            }
        };
        w.say(format!(
            "slot {slot}: NVMe {:04x}:{:04x} found, BAR0 at {:#x}; bringing up {}",
            func.vendor, func.device, func.bar0, dev.id
        ));
        let platform = w.machine.platform(&func);
        // The interrupt is set up before bring-up, as pci_alloc_msix(9) comes before the
        // driver enables the controller (QEMU binds a queue to its MSI-X vector at creation).
        let irq = match w.interrupts {
            InterruptMode::Poll => Ok(None),
            InterruptMode::Msix => Interrupt::msix_to_ram(&platform, MSI_DATA).map(Some),
            InterruptMode::Intx => Interrupt::intx(&platform).map(Some),
        };
        let irq = match irq {
            Ok(irq) => irq,
            Err(e) => {
                w.violation(format!("harness: {}: interrupt setup: {e}", dev.id));
                return None;
            }
        };
        let mut ctrl = Controller::new(platform, lab_config());
        let up = guard(&mut w.report, "bring_up", || ctrl.bring_up());
        // A removal injected at a device access of this bring-up (access_faults) is expected
        // to make it fail: that is the point of the exercise, not a violation.
        let injected = ctrl.platform().faults().fired();
        // An eject armed for an access after bring-up's last (the watchdog's first read).
        let armed_later = ctrl.platform().faults().pending();
        match up {
            Some(Ok(())) => {}
            Some(Err(e)) if injected => {
                w.say(format!(
                    "{}: bring-up failed as it should ({e}) after a removal before access {}",
                    dev.id,
                    ctrl.platform().faults().accesses().saturating_sub(1)
                ));
                let _ = guard(&mut w.report, "drop", move || drop(ctrl));
                return None;
            }
            Some(Err(e)) => {
                w.violation(format!("{}: bring-up failed: {e}", dev.id));
                let _ = guard(&mut w.report, "drop", move || drop(ctrl));
                return None;
            }
            None => {
                let _ = guard(&mut w.report, "drop", move || drop(ctrl));
                return None;
            }
        }
        let nss = ctrl.namespaces().to_vec();
        if let Some(info) = ctrl.info() {
            w.say(format!(
                "{}: \"{}\" serial {} fw {}, MDTS {} KiB, {} I/O queue(s) x {}, {} namespace(s)",
                dev.id,
                info.model,
                info.serial,
                info.firmware,
                info.mdts_bytes / 1024,
                info.io_queues,
                info.io_entries,
                nss.len()
            ));
        }
        for img in &dev.images {
            match nss.iter().find(|n| n.nsid == img.nsid) {
                None => w.violation(format!("{}: namespace {} not found by the engine", dev.id, img.nsid)),
                Some(n) if n.lba_bytes != img.lba_bytes || n.capacity != img.bytes => w.violation(format!(
                    "{}: namespace {} is {} B x {} blocks, expected {} B blocks, {} bytes",
                    dev.id, n.nsid, n.lba_bytes, n.blocks, img.lba_bytes, img.bytes
                )),
                Some(_) => {}
            }
        }
        for n in &nss {
            if !dev.images.iter().any(|i| i.nsid == n.nsid) {
                w.violation(format!("{}: engine reports namespace {} that was never plugged", dev.id, n.nsid));
            }
        }
        w.observer.controller_attached(&dev.id, slot);
        let mut nodes = Vec::new();
        for n in &nss {
            let node = NodeId { ctrl: dev.id.clone(), nsid: n.nsid };
            w.observer.node_created(&node);
            w.say(format!(
                "{}: node {}ns{} created ({} MiB, {} B blocks)",
                dev.id,
                dev.id,
                n.nsid,
                n.capacity >> 20,
                n.lba_bytes
            ));
            nodes.push(node);
        }
        for img in &dev.images {
            w.ledger.add_image(&img.path, img.lba_bytes);
        }
        let bringup_accesses = ctrl.platform().faults().accesses();
        Some(Driver {
            id: dev.id.clone(),
            slot,
            ctrl: Some(ctrl),
            nodes,
            images: dev.images.iter().map(|i| (i.nsid, i.clone())).collect(),
            detaching: false,
            // Removed at the very end of bring-up (after its last read), or armed for an access
            // after it (the watchdog's first read, which may come within the same tick as the
            // attach on a loaded machine): the watchdog will notice, and that loss is expected.
            expect_removal: injected || armed_later,
            last_health: Instant::now(),
            irq,
            last_watchdog_poll: Instant::now(),
            open: BTreeMap::new(),
            refusal: DetachError::InUse,
            bringup_accesses,
        })
    }

    /// True while I/O may be submitted.
    pub fn is_live(&self) -> bool {
        self.ctrl.is_some() && !self.detaching
    }

    /// The engine (for direct tests and the bench).
    pub fn controller(&mut self) -> Option<&mut Controller<LabPlatform>> {
        self.ctrl.as_mut()
    }

    /// Nodes held open.
    pub fn open_count(&self) -> u32 {
        self.open.values().sum()
    }

    /// Namespaces with a node.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Requests outstanding in the engine.
    pub fn outstanding(&self) -> usize {
        self.ctrl.as_ref().map_or(0, |c| c.outstanding())
    }

    /// Submits the next requests of `job` (which must target this controller).
    pub fn feed(&mut self, w_report: &mut Report, observer: &mut dyn Observer, ledger: &mut Ledger, job: &mut IoJob) {
        if !self.is_live() {
            job.stop(StopReason::ControllerGone, ledger);
            return;
        }
        let Some(ctrl) = self.ctrl.as_mut() else { return };
        while let Some((req, pending)) = job.next_request(ledger) {
            let tag = pending.tag();
            match guard(w_report, "submit", || ctrl.submit(req)) {
                Some(Ok(())) => {
                    job.submitted(pending);
                    observer.io_started(&NodeId { ctrl: self.id.clone(), nsid: req.nsid }, tag);
                }
                Some(Err(NvmeError::QueueFull)) => {
                    job.refused(pending, NvmeError::QueueFull, ledger);
                    break;
                }
                Some(Err(e)) => {
                    job.refused(pending, e, ledger);
                    if !matches!(e, NvmeError::Gone | NvmeError::NotReady) {
                        w_report.failed_ops += 1;
                    }
                }
                None => {
                    job.refused(pending, NvmeError::Aborted, ledger);
                    self.detaching = true;
                    break;
                }
            }
        }
    }

    /// Reaps completions. Returns `Some(health)` if the engine gave the controller up (or
    /// panicked), in which case the caller must tear it down with [`Driver::teardown_lost`].
    /// Interrupt-driven, it polls only after an interrupt, or when the watchdog's poll is due
    /// (as the kld's ithread and watchdog task do).
    pub fn poll(&mut self, w: &mut World) -> Option<Health> {
        let ctrl = self.ctrl.as_mut()?;
        let by_irq = match &self.irq {
            None => false,
            // A harness error is recorded by `Guest`; the watchdog poll still runs.
            Some(irq) if irq.take().unwrap_or(false) => {
                w.report.interrupts.taken += 1;
                true
            }
            Some(_) if self.last_watchdog_poll.elapsed() >= WATCHDOG_POLL_PERIOD => {
                self.last_watchdog_poll = Instant::now();
                false
            }
            Some(_) => return None,
        };
        let mut events = Vec::new();
        let r = guard(&mut w.report, "poll", || ctrl.poll(&mut |e| events.push(e)));
        let reaped = events.iter().filter(|e| matches!(e, Event::Io(_))).count() as u64;
        if by_irq {
            w.report.interrupts.reaped_by_irq += reaped;
        } else {
            w.report.interrupts.reaped_by_watchdog += reaped;
        }
        let mut lost = None;
        for e in events {
            match e {
                Event::Io(c) => w.deliver(&self.id, c),
                Event::ControllerLost { reason, health } => {
                    w.say(format!("{}: engine gave the controller up ({reason}, {health:?})", self.id));
                    lost = Some(health);
                }
                Event::BadCompletion { qid, what } => {
                    w.violation(format!("{}: bad completion on queue {qid}: {what}", self.id))
                }
                Event::NamespacesChanged | Event::AsyncNotice { .. } => {}
            }
        }
        if r.is_none() {
            lost = Some(Health::Gone);
        }
        lost
    }

    /// The watchdog: every [`HEALTH_PERIOD`], asks the engine for the controller's health.
    pub fn watchdog(&mut self, w: &mut World) -> Option<Health> {
        if self.last_health.elapsed() < HEALTH_PERIOD {
            return None;
        }
        self.last_health = Instant::now();
        let ctrl = self.ctrl.as_mut()?;
        match guard(&mut w.report, "check_health", || ctrl.check_health()) {
            Some(Health::Healthy) => None,
            Some(h) => Some(h),
            None => Some(Health::Gone),
        }
    }

    fn destroy_nodes(&mut self, w: &mut World) {
        for n in self.nodes.drain(..) {
            w.observer.node_destroyed(&n);
            w.say(format!("{}: node {}ns{} destroyed", n.ctrl, n.ctrl, n.nsid));
        }
    }

    fn free(&mut self, w: &mut World) {
        if self.ctrl.as_ref().is_some_and(|c| !c.dma_stopped()) {
            // fail_all could not stop a device that is still there: the buffers of the
            // requests it failed may still be DMA targets. Leak them (as the engine leaks its
            // rings) rather than reuse them; the leak is reported, never hidden.
            w.violation(format!("{}: the device could not be stopped; its requests' buffers are leaked", self.id));
            let id = self.id.clone();
            for job in w.jobs.iter_mut().filter(|j| j.target.ctrl == id) {
                job.taint();
            }
        }
        if let Some(ctrl) = self.ctrl.take() {
            let _ = guard(&mut w.report, "drop", move || drop(ctrl));
        }
        // After the controller: the device is stopped or gone, so the mailbox is free to reuse.
        self.irq = None;
        w.observer.controller_freed(&self.id);
        // Requests the engine never completed are hung: abandon them so the run can end.
        let id = self.id.clone();
        let mut hung = 0;
        for job in w.jobs.iter_mut().filter(|j| j.target.ctrl == id) {
            hung += job.abandon(&mut w.ledger);
            job.stop(StopReason::ControllerGone, &mut w.ledger);
        }
        if hung > 0 {
            w.report.hung_ops += hung;
            w.violation(format!("{id}: {hung} request(s) never completed by the engine"));
        }
    }

    fn fail_all(&mut self, w: &mut World, err: NvmeError) {
        let Some(ctrl) = self.ctrl.as_mut() else { return };
        let mut done = Vec::new();
        let _ = guard(&mut w.report, "fail_all", || ctrl.fail_all(err, &mut |c| done.push(c)));
        for c in done {
            w.deliver(&self.id, c);
        }
    }

    /// Announced detach (the state machine's `detach_slot(Eject)` after a Notify 3, or module
    /// unload): drain, fail leftovers, destroy nodes, shut down, free. The `_EJ0` comes after,
    /// from the state machine, once this returned.
    pub fn detach_announced(&mut self, w: &mut World) {
        self.detaching = true;
        let outstanding = self.outstanding();
        w.observer.detach_started(&self.id, false, outstanding);
        w.say(format!("{}: detaching ({} request(s) in flight)", self.id, outstanding));
        // The device is still there: give in-flight requests a bounded chance to finish.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.outstanding() > 0 && Instant::now() < deadline {
            if let Some(h) = self.poll(w) {
                w.say(format!("{}: lost during detach ({h:?})", self.id));
                break;
            }
        }
        if self.outstanding() > 0 {
            w.say(format!("{}: failing {} request(s) still in flight", self.id, self.outstanding()));
            self.fail_all(w, NvmeError::Aborted);
        }
        self.destroy_nodes(w);
        if let Some(ctrl) = self.ctrl.as_mut() {
            match guard(&mut w.report, "shutdown", || ctrl.shutdown()) {
                Some(Ok(())) => w.say(format!("{}: shutdown complete", self.id)),
                Some(Err(e)) => w.violation(format!("{}: shutdown of a present controller failed: {e}", self.id)),
                None => {}
            }
        }
        self.free(w);
    }

    /// The controller is gone or broken: fail everything now, destroy nodes, free.
    pub fn teardown_lost(&mut self, w: &mut World, health: Health) {
        self.detaching = true;
        let outstanding = self.outstanding();
        w.observer.detach_started(&self.id, true, outstanding);
        if !self.expect_removal {
            w.violation(format!("{}: controller lost unexpectedly ({health:?})", self.id));
        }
        w.say(format!(
            "{}: removal detected ({health:?}); failing {outstanding} request(s) in flight",
            self.id
        ));
        self.fail_all(w, NvmeError::Gone);
        self.destroy_nodes(w);
        if let Some(ctrl) = self.ctrl.as_mut() {
            // On a dead controller this only releases memory (the device is not touched).
            let _ = guard(&mut w.report, "shutdown", || ctrl.shutdown());
        }
        self.free(w);
    }
}
