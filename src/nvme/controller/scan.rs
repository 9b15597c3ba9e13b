//! Namespace scans as a resumable sequence of admin commands, so a caller behind a shared lock
//! can release it while the controller works.
//!
//! A scan is the Changed Namespace List log page (on a rescan: reading it re-arms the
//! Namespace Attribute Changed event), the Active Namespace ID list pages (CNS 02h), and an
//! Identify Namespace per ID; on an NVMe 1.0 controller without CNS 02h, every NSID up to
//! the limit is probed instead. Each [`Controller::rescan_step`] looks for the completion of
//! the command in flight, acts on it and sends the next one, and never waits: the kld calls
//! it under its mutex and sleeps between calls with the mutex released (the lock rule in the
//! [`controller`](super) documentation). The interrupt thread may reap the command's
//! completion meanwhile; the engine keeps it for the scan ([`Stepped`]).
//!
//! Every command is bounded by the command timeout on the clock and, should the clock stop,
//! by a number of steps ([`STEPS_PER_COMMAND`] + timeout / 1 ms), and the number of commands
//! by the namespace limit, so a scan always ends, also when the caller steps in a tight loop.

use alloc::vec::Vec;

use super::{Controller, State, SyncWait, SYNC_HEALTH_US};
use crate::fallible::{try_collect, try_extend_from_slice, try_push};
use crate::nvme::admin;
use crate::nvme::aer;
use crate::nvme::cmd::{Cqe, Sqe};
use crate::nvme::error::NvmeError;
use crate::nvme::health::{self, Health};
use crate::nvme::identify;
use crate::nvme::ns::{Namespace, NsChanges};
use crate::platform::Platform;

/// Steps a command may stay pending beyond one per millisecond of its timeout.
const STEPS_PER_COMMAND: u64 = 32;

/// Commands sent and completions handled in one step at most, to keep a locked section short
/// when the controller answers at once.
const COMMANDS_PER_STEP: u32 = 8;

/// The scan's command in flight, as the engine keeps it between steps: its completion may be
/// reaped by `poll` (the interrupt thread) before the scan looks.
pub(super) struct Stepped {
    pub(super) seq: u32,
    pub(super) result: Option<Result<Cqe, NvmeError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ChangedLog,
    List { after: u32 },
    Identify { next: usize },
    Done,
}

struct InFlight {
    seq: u32,
    sent_us: u64,
    steps_left: u64,
    next_health_us: u64,
}

/// A namespace scan in progress; see [`Controller::rescan_begin`].
pub struct NsScan {
    phase: Phase,
    nn: u32,
    mdts: u32,
    limit: usize,
    list_pages_left: usize,
    have_list: bool,
    ids: Vec<u32>,
    found: Vec<Namespace>,
    rejected: Vec<(u32, &'static str)>,
    inflight: Option<InFlight>,
    /// Commands that completed (for callers that restart a wait on progress).
    completed: u32,
}

impl<P: Platform> Controller<P> {
    /// Starts a scan; nothing is sent until the first step.
    pub(super) fn scan_begin(&mut self, changed_log: bool) -> Result<NsScan, NvmeError> {
        let (nn, mdts) = match &self.info {
            Some(i) => (i.nn, i.mdts_bytes),
            None => return Err(NvmeError::NotReady),
        };
        if self.stepped.as_ref().is_some_and(|s| s.result.is_none()) {
            // A scan's command is still with the device, and it writes the scratch page.
            return Err(NvmeError::InvalidRequest("a namespace scan is in progress"));
        }
        self.stepped = None;
        let limit = nn.min(self.cfg.max_namespaces) as usize;
        Ok(NsScan {
            phase: if changed_log { Phase::ChangedLog } else { Phase::List { after: 0 } },
            nn,
            mdts,
            limit,
            // Each page holds 1024 IDs; the bound keeps a lying device from looping us.
            list_pages_left: limit / 1024 + 2,
            have_list: true,
            ids: Vec::new(),
            found: Vec::new(),
            rejected: Vec::new(),
            inflight: None,
            completed: 0,
        })
    }

    /// Starts a namespace rescan (after [`Event::NamespacesChanged`](crate::nvme::Event), or
    /// on demand) for callers that must not wait inside the engine: drive it with
    /// [`rescan_step`](Controller::rescan_step). One scan at a time.
    pub fn rescan_begin(&mut self) -> Result<NsScan, NvmeError> {
        match self.state {
            State::Dead => return Err(NvmeError::Gone),
            State::Down => return Err(NvmeError::NotReady),
            State::Ready => {}
        }
        self.scan_begin(true)
    }

    /// Advances a rescan without waiting: `None` while a command is with the controller (call
    /// again later, after releasing any lock the interrupt path takes), else the outcome. On
    /// `Ok` the engine's namespace list is updated and the changes are returned. Fails with
    /// `Gone`/`NotReady` if the controller was given up or shut down meanwhile; a command that
    /// never completes ends the scan with `Timeout` (and the next poll gives the controller up).
    pub fn rescan_step(&mut self, scan: &mut NsScan) -> Option<Result<NsChanges, NvmeError>> {
        match self.state {
            State::Dead => return Some(Err(NvmeError::Gone)),
            State::Down => return Some(Err(NvmeError::NotReady)),
            State::Ready => {}
        }
        match self.scan_step(scan)? {
            Ok(()) => Some(self.apply_scan(scan)),
            Err(e) => Some(Err(e)),
        }
    }

    /// Makes a finished scan's result the engine's namespace list (even when the list of
    /// changes cannot be allocated: the engine's list is what the driver syncs its nodes to).
    pub(super) fn apply_scan(&mut self, scan: &mut NsScan) -> Result<NsChanges, NvmeError> {
        let list = core::mem::take(&mut scan.found);
        let changes = NsChanges::between(&self.namespaces, &list);
        self.namespaces = list;
        self.rejected = core::mem::take(&mut scan.rejected);
        changes.map_err(|_| NvmeError::OutOfMemory("the namespace changes"))
    }

    /// Runs a scan to its end in place, waiting with bounded busy-waits (bring-up, and
    /// `rescan_namespaces` for callers without a shared lock).
    pub(super) fn drive_scan(&mut self, scan: &mut NsScan) -> Result<(), NvmeError> {
        let mut done = scan.completed;
        let now = self.p.now_us();
        let mut wait = SyncWait::new(now, self.sync_bound(now));
        loop {
            if let Some(r) = self.scan_step(scan) {
                return r;
            }
            if scan.completed != done {
                done = scan.completed;
                let now = self.p.now_us();
                wait = SyncWait::new(now, self.sync_bound(now));
            }
            if let Err(e) = wait.pause(&self.p, self.enabled) {
                self.stepped = None;
                scan.inflight = None;
                if e == NvmeError::Gone || health::assess(&self.p, self.enabled) == Health::Gone {
                    return Err(NvmeError::Gone);
                }
                return Err(NvmeError::Timeout);
            }
        }
    }

    /// One step: handles the completion of the command in flight if it is there, sends the
    /// next command; repeats while the controller answers at once (bounded). `None`: a
    /// command is pending.
    fn scan_step(&mut self, scan: &mut NsScan) -> Option<Result<(), NvmeError>> {
        for _ in 0..COMMANDS_PER_STEP {
            if let Some(inf) = scan.inflight.as_mut() {
                let seq = inf.seq;
                let kept = self.stepped.as_mut().filter(|s| s.seq == seq).and_then(|s| s.result.take());
                let res = match kept.or_else(|| self.reap_admin(Some(seq))) {
                    Some(r) => r,
                    None => {
                        let now = self.p.now_us();
                        let over = inf.steps_left == 0 || now.saturating_sub(inf.sent_us) >= self.cfg.cmd_timeout_us;
                        let gone = (over || now >= inf.next_health_us)
                            && health::assess(&self.p, self.enabled) == Health::Gone;
                        if over || gone {
                            // The command stays tracked: the next poll gives the controller up.
                            scan.inflight = None;
                            self.stepped = None;
                            return Some(Err(if gone { NvmeError::Gone } else { NvmeError::Timeout }));
                        }
                        if now >= inf.next_health_us {
                            inf.next_health_us = now.saturating_add(SYNC_HEALTH_US);
                        }
                        inf.steps_left -= 1;
                        return None;
                    }
                };
                scan.inflight = None;
                self.stepped = None;
                scan.completed = scan.completed.wrapping_add(1);
                if let Err(e) = self.scan_handle(scan, res) {
                    return Some(Err(e));
                }
            }
            let sqe = match self.scan_next_command(scan) {
                Ok(Some(sqe)) => sqe,
                Ok(None) => return Some(Ok(())),
                Err(e) => return Some(Err(e)),
            };
            let (seq, sent_us) = match self.admin_submit(sqe) {
                Ok(x) => x,
                Err(e) => return Some(Err(e)),
            };
            self.stepped = Some(Stepped { seq, result: None });
            scan.inflight = Some(InFlight {
                seq,
                sent_us,
                steps_left: self.cfg.cmd_timeout_us / 1000 + STEPS_PER_COMMAND,
                next_health_us: sent_us.saturating_add(SYNC_HEALTH_US),
            });
        }
        None
    }

    /// The command the scan needs next, `None` when it is complete.
    fn scan_next_command(&mut self, scan: &mut NsScan) -> Result<Option<Sqe>, NvmeError> {
        let addr = self.scratch_addr()?;
        loop {
            match scan.phase {
                Phase::ChangedLog => return Ok(Some(aer::changed_ns_list(addr))),
                Phase::List { after } => {
                    if scan.ids.len() >= scan.limit || scan.list_pages_left == 0 {
                        scan.phase = Phase::Identify { next: 0 };
                        continue;
                    }
                    scan.list_pages_left -= 1;
                    return Ok(Some(admin::active_ns_list(after, addr)));
                }
                Phase::Identify { next } => match scan.ids.get(next) {
                    Some(&id) => return Ok(Some(admin::identify_namespace(id, addr))),
                    None => scan.phase = Phase::Done,
                },
                Phase::Done => return Ok(None),
            }
        }
    }

    /// Acts on the completion of the scan's command in flight.
    fn scan_handle(&mut self, scan: &mut NsScan, res: Result<Cqe, NvmeError>) -> Result<(), NvmeError> {
        match scan.phase {
            Phase::ChangedLog => {
                match res {
                    Ok(_) | Err(NvmeError::Status(_)) => {}
                    Err(e) => return Err(e),
                }
                scan.phase = Phase::List { after: 0 };
            }
            Phase::List { after } => {
                match res {
                    Ok(_) => {}
                    Err(NvmeError::Status(_)) if after == 0 => {
                        // NVMe 1.0 controller: no CNS 02h. Probe every NSID instead.
                        scan.have_list = false;
                        scan.ids = try_collect(1..=scan.limit as u32).map_err(|_| NvmeError::OutOfMemory("the namespace list"))?;
                        scan.phase = Phase::Identify { next: 0 };
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
                let page = self.read_scratch()?;
                let room = scan.limit - scan.ids.len();
                let (got, full) = identify::parse_ns_list(&page, after, scan.nn, room)?;
                match got.last() {
                    Some(&last) if full => {
                        try_extend_from_slice(&mut scan.ids, &got).map_err(|_| NvmeError::OutOfMemory("the namespace list"))?;
                        scan.phase = Phase::List { after: last };
                    }
                    _ => {
                        try_extend_from_slice(&mut scan.ids, &got).map_err(|_| NvmeError::OutOfMemory("the namespace list"))?;
                        scan.phase = Phase::Identify { next: 0 };
                    }
                }
            }
            Phase::Identify { next } => {
                let id = scan.ids.get(next).copied().unwrap_or(0);
                scan.phase = Phase::Identify { next: next + 1 };
                match res {
                    Ok(_) => {}
                    Err(NvmeError::Status(_)) => {
                        try_push(&mut scan.rejected, (id, "Identify Namespace failed")).map_err(|_| NvmeError::OutOfMemory("the namespace list"))?;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
                let page = self.read_scratch()?;
                let kept = match identify::parse_namespace(id, &page, scan.mdts) {
                    Ok(Some(ns)) => try_push(&mut scan.found, ns),
                    Ok(None) if !scan.have_list => Ok(()), // probing: inactive NSID
                    Ok(None) => try_push(&mut scan.rejected, (id, "active namespace reports zero size")),
                    Err(why) => try_push(&mut scan.rejected, (id, why)),
                };
                kept.map_err(|_| NvmeError::OutOfMemory("the namespace list"))?;
            }
            Phase::Done => {}
        }
        Ok(())
    }
}
