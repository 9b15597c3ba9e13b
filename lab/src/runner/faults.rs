//! The fault-injection steps of a run: an eject request that must be refused (a node held
//! open), notify storms, nodes held open and closed, and surprise removal at every device
//! access of a bring-up. Same [`Session`] as the other steps; split out so that the runner's
//! main loop stays readable.

use std::time::Duration;

use nvme_hotplug::hotplug::ost::OstStatus;
use nvme_hotplug::hotplug::slot_ops::DetachError;

use super::{Session, STEP_TIMEOUT};
use crate::access_faults::RemovalReads;
use crate::observer::NodeId;
use crate::scenario::{parse_target, ControllerSpec, DetachMode, IoKind, NamespaceSpec, OstExpect, Refusal, SweepReads};

impl Session {
    /// An eject request the driver must refuse (a node is open): `device_del`, then wait for the
    /// state machine's final `_OST` for the slot; it must be 0x81/0x82, with no `_EJ0`, and the
    /// controller must still be attached and working.
    pub(super) fn detach_refused(&mut self, id: &str, slot: u8, during_io: bool) -> String {
        if during_io && self.drivers.get(id).map_or(0, |d| d.outstanding()) == 0 {
            let first_ns = self.drivers.get(id).and_then(|d| d.images.keys().next().copied()).unwrap_or(1);
            self.start_job(&format!("{id}/{first_ns}"), IoKind::Mixed, 64, 16, 4096);
            self.tick();
        }
        let in_flight = self.drivers.get(id).map_or(0, |d| d.outstanding());
        self.w.ost_log.clear();
        self.w.ej0_log.clear();
        self.w.say(format!("{id}: QMP device_del with a node open ({in_flight} in flight): must be refused"));
        if let Err(e) = self.w.machine.request_unplug(slot) {
            self.w.violation(format!("detach {id}: device_del: {e}"));
            return "qemu refused".into();
        }
        let answered = self.tick_until(STEP_TIMEOUT, |s| final_ost(&s.w.ost_log, slot, 3).is_some());
        let status = final_ost(&self.w.ost_log, slot, 3);
        if !answered {
            self.w.violation(format!("detach {id}: the eject request was never answered with _OST"));
        }
        if !matches!(status, Some(OstStatus::DeviceInUse | OstStatus::DeviceBusy)) {
            self.w.violation(format!("detach {id}: eject request with an open node answered {status:?}, not in-use/busy"));
        }
        if self.w.ej0_log.contains(&slot) {
            self.w.violation(format!("detach {id}: _EJ0 evaluated on a device in use"));
        }
        if !self.drivers.get(id).is_some_and(|d| d.is_live()) {
            self.w.violation(format!("detach {id}: the controller did not stay attached after refusing the eject"));
        }
        self.w.report.removals.refused += 1;
        format!("refused with {status:?}, {in_flight} in flight, no _EJ0")
    }

    /// A storm of `Notify(slot, code)`: every notification (and whatever QEMU raised meanwhile)
    /// reaches the state machine's notify half before its task runs once.
    pub(super) fn notify(&mut self, slot: u8, code: u32, times: u32, expect_ost: Option<OstExpect>, expect_rescans: Option<u64>) -> String {
        self.w.ost_log.clear();
        self.w.ej0_log.clear();
        let rescans0 = self.w.report.hotplug.rescans;
        let mut run = false;
        match self.w.machine.poll_notifies() {
            Ok(ns) => {
                for n in ns {
                    self.w.observer.notify(n.slot, n.code as u32);
                    self.w.report.hotplug.notifies += 1;
                    run |= self.hotplug.notify(n.slot as usize, n.code as u32);
                }
            }
            Err(e) => self.w.violation(format!("harness: ACPI poll: {e}")),
        }
        for _ in 0..times {
            self.w.observer.notify(slot, code);
            self.w.report.hotplug.notifies += 1;
            run |= self.hotplug.notify(slot as usize, code);
        }
        self.w.say(format!("slot {slot}: {times} x Notify {code} before the hotplug task runs"));
        self.allow_failures = expect_ost == Some(OstExpect::Failure);
        if run {
            self.run_hotplug();
        }
        // An eject waits for the device to vanish (re-runs); then one more round for the rest.
        if !self.tick_until(STEP_TIMEOUT, |s| s.rerun_at.is_none()) {
            self.w.violation(format!("notify slot {slot}: the hotplug task did not settle within {STEP_TIMEOUT:?}"));
        }
        self.tick();
        self.allow_failures = false;
        let source = match code {
            0 => Some(0),
            1 => Some(1),
            3 => Some(3),
            _ => None,
        };
        let answers: Vec<OstStatus> = self
            .w
            .ost_log
            .iter()
            .filter(|(s, src, st)| *s == slot && source.is_none_or(|x| x == *src) && st.is_final())
            .map(|(_, _, st)| *st)
            .collect();
        let rescans = self.w.report.hotplug.rescans - rescans0;
        if let Some(want) = expect_ost {
            let want = match want {
                OstExpect::Success => OstStatus::Success,
                OstExpect::Failure => OstStatus::NonSpecificFailure,
                OstExpect::Unrecognized => OstStatus::UnrecognizedNotify,
                OstExpect::InUse => OstStatus::DeviceInUse,
                OstExpect::Busy => OstStatus::DeviceBusy,
            };
            if answers != [want] {
                self.w.violation(format!(
                    "notify slot {slot}: {times} x Notify {code} answered {answers:?}, expected exactly one {want:?} (coalesced)"
                ));
            }
        }
        if let Some(want) = expect_rescans {
            if rescans != want {
                self.w.violation(format!("notify slot {slot}: {times} x Notify {code} caused {rescans} rescan(s), expected {want}"));
            }
        }
        if self.w.ej0_log.contains(&slot) || !self.w.machine.retiring().is_empty() {
            // An eject request the platform sent directly (or retried): an announced removal.
            let ejected = u64::from(self.w.ej0_log.contains(&slot));
            self.w.report.cycles += ejected;
            self.w.report.removals.announced += ejected;
            let _ = self.w.machine.reap(Duration::from_secs(1));
        }
        format!("{times} x Notify {code}: {rescans} rescan(s), _OST {answers:?}, _EJ0 {}", self.w.ej0_log.len())
    }

    pub(super) fn open(&mut self, target: &str, refuse: Refusal) -> String {
        let (ctrl, nsid) = match parse_target(target) {
            Ok(t) => t,
            Err(e) => {
                self.w.violation(format!("open: {e}"));
                return "bad target".into();
            }
        };
        match self.drivers.get_mut(&ctrl).filter(|d| d.is_live() && d.images.contains_key(&nsid)) {
            Some(d) => {
                *d.open.entry(nsid).or_default() += 1;
                *self.opened.entry((ctrl.clone(), nsid)).or_default() += 1;
                self.w.observer.node_opened(&NodeId { ctrl: ctrl.clone(), nsid });
                d.refusal = match refuse {
                    Refusal::InUse => DetachError::InUse,
                    Refusal::Busy => DetachError::Busy,
                };
                self.w.say(format!("{target}: node opened"));
                format!("open ({refuse:?})")
            }
            None => {
                self.w.violation(format!("open {target}: no such live node"));
                "no node".into()
            }
        }
    }

    pub(super) fn close(&mut self, target: &str) -> String {
        let Ok((ctrl, nsid)) = parse_target(target) else {
            self.w.violation(format!("close {target}: bad target"));
            return "bad target".into();
        };
        let key = (ctrl.clone(), nsid);
        match self.opened.get_mut(&key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.opened.remove(&key);
                }
            }
            _ => {
                self.w.violation(format!("close {target}: not open"));
                return "not open".into();
            }
        }
        // The consumer's close reaches the kernel whether or not the controller is still
        // there: after a removal, the last close is what lets GEOM call d_gone.
        self.w.observer.node_closed(&NodeId { ctrl: ctrl.clone(), nsid });
        self.w.say(format!("{target}: node closed"));
        match self.drivers.get_mut(&ctrl) {
            Some(d) => {
                if let Some(n) = d.open.get_mut(&nsid) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        d.open.remove(&nsid);
                    }
                }
                "closed".into()
            }
            None => "closed (controller already removed)".into(),
        }
    }

    /// See [`Step::BringupRemovalSweep`].
    pub(super) fn bringup_removal_sweep(&mut self, slot: u8, namespaces: &[NamespaceSpec], reads: SweepReads, stride: u64) -> String {
        if self.w.machine.plugged(slot).is_some() {
            self.w.violation(format!("bringup-removal-sweep: slot {slot} is occupied"));
            return "slot occupied".into();
        }
        let flavours: &[RemovalReads] = match reads {
            SweepReads::Zeros => &[RemovalReads::Zeros],
            SweepReads::AllOnes => &[RemovalReads::AllOnes],
            SweepReads::Both => &[RemovalReads::Zeros, RemovalReads::AllOnes],
        };
        let saved = self.w.machine.removal_reads();
        let spec = ControllerSpec { id: "sweep".into(), slot, namespaces: namespaces.to_vec() };
        let mut notes = Vec::new();
        for &flavour in flavours {
            self.w.machine.set_removal_reads(flavour);
            let (mut failed, mut late, mut total) = (0u64, 0u64, None);
            // Hot-add to torn-down, per removal point (a figure for the report, not a check).
            let mut worst_ms = 0f64;
            let mut n = 0u64;
            loop {
                let dma0 = self.w.machine.guest().live_dma_bytes();
                let t0 = std::time::Instant::now();
                let nodes0 = self.w.observer.nodes_alive();
                if let Err(e) = self.w.machine.hot_add(&spec) {
                    self.w.violation(format!("sweep {flavour:?} access {n}: QEMU refused the hot-add: {e}"));
                    break;
                }
                self.w.machine.arm_removal(slot, n);
                self.allow_failures = true;
                let came = self.tick_until(STEP_TIMEOUT, |s| s.drivers.contains_key("sweep") || s.w.machine.removal_fired(slot));
                let fired = self.w.machine.removal_fired(slot);
                if !came {
                    self.allow_failures = false;
                    self.w.violation(format!("sweep {flavour:?} access {n}: neither attached nor removed within {STEP_TIMEOUT:?}"));
                    break;
                }
                if !fired {
                    // Bring-up finished before access n: every access has been swept.
                    self.allow_failures = false;
                    total = self.drivers.get("sweep").map(|d| d.bringup_accesses);
                    self.detach("sweep", DetachMode::Surprise, false, 0, false, true);
                    break;
                }
                if self.drivers.contains_key("sweep") {
                    // Removed before the last access but bring-up had nothing left to read: the
                    // watchdog must notice and tear down.
                    late += 1;
                    if !self.tick_until(STEP_TIMEOUT, |s| !s.drivers.contains_key("sweep")) {
                        self.w.violation(format!("sweep {flavour:?} access {n}: removal after bring-up never noticed"));
                    }
                } else {
                    failed += 1;
                }
                self.allow_failures = false;
                self.w.report.cycles += 1;
                self.w.report.removals.during_bring_up += 1;
                self.w.machine.sync_injected_removals();
                let _ = self.w.machine.reap(Duration::from_secs(2));
                let dma = self.w.machine.guest().live_dma_bytes();
                if dma != dma0 {
                    self.w.violation(format!("sweep {flavour:?} access {n}: DMA live bytes {dma0} before, {dma} after teardown"));
                }
                let nodes = self.w.observer.nodes_alive();
                if nodes != nodes0 {
                    self.w.violation(format!("sweep {flavour:?} access {n}: {nodes0} node(s) before, {nodes} after"));
                }
                if self.w.machine.guest().fault().is_some() || self.w.report.violations.len() >= 200 {
                    break;
                }
                worst_ms = worst_ms.max(t0.elapsed().as_secs_f64() * 1e3);
                n += stride;
                if n > 100_000 {
                    self.w.violation("sweep: bring-up never completed without reaching the removal".to_string());
                    break;
                }
            }
            match total {
                Some(t) => notes.push(format!(
                    "{flavour:?}: bring-up = {t} device accesses; removed at {} of them: {failed} bring-up errors, \
                     {late} noticed by the watchdog; slowest removal point {worst_ms:.1} ms from hot-add to torn down",
                    failed + late
                )),
                None => notes.push(format!("{flavour:?}: incomplete after {} removals", failed + late)),
            }
            self.w.say(notes.last().cloned().unwrap_or_default());
        }
        self.w.machine.set_removal_reads(saved);
        notes.join("; ")
    }
}

/// The last final `_OST` answer for `slot` and `source` in `log`.
fn final_ost(log: &[(u8, u32, OstStatus)], slot: u8, source: u32) -> Option<OstStatus> {
    log.iter().rev().find(|(s, src, st)| *s == slot && *src == source && st.is_final()).map(|(_, _, st)| *st)
}
