//! The [`Controller`]: one NVMe controller driven through a [`Platform`].
//!
//! Life cycle: [`Controller::new`] touches nothing; [`Controller::bring_up`] resets and
//! enables the controller, identifies it, creates the I/O queues, scans namespaces and arms
//! an Asynchronous Event Request; then [`submit`](Controller::submit) (a contiguous buffer) or
//! [`submit_segments`](Controller::submit_segments) (busdma segments) and
//! [`poll`](Controller::poll) move I/O, without allocating: request slots and PRP lists are
//! sized at bring-up. The controller ends by [`shutdown`](Controller::shutdown)
//! (announced removal) or by [`fail_all`](Controller::fail_all) (surprise removal or a dead
//! device), and may be brought up again afterwards.
//!
//! Memory rule: DMA memory the device knows about (rings, identify page, PRP lists) is only
//! given back after the controller is disabled or known to be gone. If a disable times out
//! on a device that is still present, the engine leaks that memory on purpose rather than
//! let the device write into memory that has been reused.
//!
//! **Lock rule: the lock the engine lives behind is never held across a wait on the device
//! that a broken device can stretch to seconds.** The engine is single-threaded; a kernel
//! serialises it with a mutex that the interrupt thread and the I/O path (GEOM's g_down
//! thread, shared by every disk) also take, and such a mutex may be held only briefly. So
//! the removal paths are split ([`stop`](super::stop)): under the lock,
//! [`fail_fast`](Controller::fail_fast) (or [`begin_shutdown`](Controller::begin_shutdown))
//! marks the controller dead, completes every request once and gives up the rings; the
//! [`DeviceStop`] it leaves ([`take_stop`](Controller::take_stop)) does the shutdown
//! notification, the disable and their bounded waits without the lock, from a context that
//! may sleep; [`finish_stop`](Controller::finish_stop) records the outcome under the lock.
//! Meanwhile the dead engine touches no register and no ring, so the interrupt and I/O paths
//! that take the lock fail fast. [`fail_all`](Controller::fail_all) and
//! [`shutdown`](Controller::shutdown) do both halves in one call, for callers without such a
//! lock (the lab, tests). Namespace rescans are split the same way:
//! [`rescan_begin`](Controller::rescan_begin) and [`rescan_step`](Controller::rescan_step) send
//! and reap one admin command at a time without waiting, and the caller sleeps between steps
//! with its lock released; [`rescan_namespaces`](Controller::rescan_namespaces) waits in place.
//! Bring-up waits in place too: it runs before the controller is shared.

use crate::fallible::{push_within_capacity, try_collect, try_vec_filled, try_vec_with_capacity, Ring};
use alloc::vec::Vec;

use super::admin;
use super::aer::{self, AsyncEvent};
use super::cmd::{log_page, Cqe, Sqe};
use super::ctrlr;
use super::error::{Completion, Event, NvmeError};
use super::health::{self, Health};
use super::identify::{self, ControllerInfo, IDENTIFY_LEN};
use super::io::{IoOp, IoRequest, Plan};
use super::ns::{Namespace, NsChanges};
use super::prp::{DmaSeg, PrpLists};
use super::qpair::QueuePair;
use super::regs::{self, Cap, Version};
use super::status::Status;
use super::stop::{DeviceStop, StopOutcome};
use super::Config;
use crate::platform::{DmaRegion, Platform};

mod scan;
pub use scan::NsScan;

/// Longest sleep between completion checks in the synchronous paths (they start at 1 us
/// and double, so a fast device is not slowed down and a slow one is not spun on).
const SYNC_POLL_MAX_US: u32 = 1000;

/// How often a synchronous wait checks whether the device is still there, so a removal
/// during bring-up or `io_sync` is noticed in about this time rather than a command timeout.
const SYNC_HEALTH_US: u64 = 100_000;

/// How often `poll` looks at the admin completion queue when only the Asynchronous Event
/// Request is outstanding there. Events are rare and not urgent; skipping the check on most
/// polls halves the memory reads of an idle poll (each one is a round trip in the lab).
const ADMIN_POLL_US: u64 = 5_000;

/// The shortest time all admin commands of one bring-up may take together (see
/// [`Controller::bring_up`]): the budget is the command timeout, but never less than this, so a
/// short command timeout (tests, a tunable set to its minimum) still leaves room for the
/// handful of commands a bring-up sends.
pub const BRING_UP_ADMIN_MIN_US: u64 = 5_000_000;

/// A bounded wait: a clock deadline plus an iteration bound, so a stuck clock cannot make
/// it endless, with exponential back-off and a periodic presence check.
struct SyncWait {
    start: u64,
    bound_us: u64,
    iters_left: u64,
    delay: u32,
    next_health: u64,
}

impl SyncWait {
    fn new(now: u64, bound_us: u64) -> SyncWait {
        SyncWait {
            start: now,
            bound_us,
            iters_left: bound_us / SYNC_POLL_MAX_US as u64 + 32,
            delay: 1,
            next_health: now.saturating_add(SYNC_HEALTH_US),
        }
    }

    /// Sleeps before the next check. Returns `Err` when the wait is over: `Timeout`, or
    /// `Gone` if the periodic check found the device gone.
    fn pause<P: Platform>(&mut self, p: &P, enabled: bool) -> Result<(), NvmeError> {
        let now = p.now_us();
        if self.iters_left == 0 || now.saturating_sub(self.start) >= self.bound_us {
            return Err(NvmeError::Timeout);
        }
        if now >= self.next_health {
            self.next_health = now.saturating_add(SYNC_HEALTH_US);
            if health::assess(p, enabled) == Health::Gone {
                return Err(NvmeError::Gone);
            }
        }
        self.iters_left -= 1;
        p.delay_us(self.delay);
        self.delay = (self.delay * 2).min(SYNC_POLL_MAX_US);
        Ok(())
    }
}

/// Counters for sysctl(8) and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// I/O requests accepted by `submit`.
    pub requests: u64,
    /// Requests that needed more than one command (MDTS / NLB splitting).
    pub split_requests: u64,
    /// Commands written to any submission queue (admin included).
    pub commands: u64,
    /// Completion entries that failed validation and were dropped.
    pub bad_completions: u64,
    /// Times a command became overdue and the controller was given up.
    pub timeouts: u64,
    /// Requests completed with an error by `fail_all` (or a timeout).
    pub failed_requests: u64,
    /// Asynchronous events received.
    pub async_events: u64,
    /// DMA regions deliberately leaked because the device could not be stopped.
    pub leaked_regions: u64,
    /// Events (bad completions, asynchronous notices) dropped because the event ring sized at
    /// bring-up was full: the engine never allocates after bring-up.
    pub events_dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not brought up (new, after shutdown, or after a failed bring-up).
    Down,
    /// Brought up: I/O accepted.
    Ready,
    /// Failed or gone: every submit is refused with `Gone` until the next bring-up.
    Dead,
}

/// Who an admin command belongs to.
#[derive(Debug)]
pub(super) enum AdminOwner {
    /// A synchronous command; the number tells a stale completion (of a command whose
    /// waiter timed out) from the one being waited for.
    Sync(u32),
    /// The Asynchronous Event Request.
    Aer,
    /// The Get Log Page that re-arms an asynchronous event.
    AerLog,
}

/// One command of an I/O request.
pub(super) struct IoPart {
    /// Index into the request table.
    req: u32,
    /// The PRP list slot ([`PrpLists`]), if the command needed one.
    prp: Option<u32>,
}

struct ReqState {
    tag: u64,
    parts_left: u32,
    err: Option<NvmeError>,
}

/// An NVMe controller and everything the engine keeps for it.
pub struct Controller<P: Platform> {
    p: P,
    cfg: Config,
    state: State,
    /// CC.EN set by us and RDY seen: the device may be doing DMA.
    enabled: bool,
    /// A present device could not be disabled and its memory was leaked (`stop_and_release`):
    /// it may still be doing DMA although `enabled` was cleared. Cleared only by a disable
    /// that succeeds (the next bring-up's).
    runaway: bool,
    /// The shutdown notification was sent since the last enable (send it once).
    shutdown_sent: bool,
    /// CSTS.RDY was seen set since the last enable: the controller became operational, so a
    /// stop sends it the shutdown notification. One that never became ready has no write
    /// cache to flush and never reports the shutdown complete: notifying it would only make a
    /// failed bring-up wait out the shutdown bound (max(CAP.TO, 5 s)) for nothing.
    rdy_seen: bool,
    /// Clock time by which the admin commands of the bring-up in progress must be done
    /// (`u64::MAX`: no bring-up in progress, each command has only its own timeout).
    admin_deadline_us: u64,
    /// The slow half of a stop, made by `fail_fast`/`begin_shutdown` and not yet taken.
    pending_stop: Option<DeviceStop<P::Region>>,
    /// A stop was made and its outcome not yet given to `finish_stop`: the device may
    /// still be running, and the engine owns no ring.
    stop_out: bool,
    cap: Option<Cap>,
    info: Option<ControllerInfo>,
    namespaces: Vec<Namespace>,
    rejected: Vec<(u32, &'static str)>,
    admin: Option<QueuePair<P::Region, AdminOwner>>,
    io: Vec<QueuePair<P::Region, IoPart>>,
    /// One page for synchronous admin data (identify, log pages).
    scratch: Option<P::Region>,
    /// One page for the log page read that re-arms an asynchronous event.
    aer_page: Option<P::Region>,
    aer_log_busy: bool,
    /// An Asynchronous Event Request is outstanding.
    aer_armed: bool,
    /// Clock time of the next admin queue check in `poll` (when only the AER is there).
    next_admin_poll_us: u64,
    /// One PRP list per I/O command slot, allocated at bring-up: submit never allocates.
    prp_lists: PrpLists<P::Region>,
    requests: Vec<Option<ReqState>>,
    free_reqs: Vec<u32>,
    live: usize,
    /// Events for the next poll; sized at bring-up, never grown.
    deferred: Ring<Event>,
    /// Where `fail_all` holds completions until the device is stopped; sized at bring-up.
    fail_buf: Vec<Completion>,
    sync_seq: u32,
    /// The command of a stepped namespace scan, and its result if `poll` reaped it first.
    stepped: Option<scan::Stepped>,
    /// Clock time at which outstanding commands must next be checked for being overdue.
    next_check_us: u64,
    next_queue: usize,
    stats: Stats,
}

fn status_result(cqe: &Cqe) -> Result<(), NvmeError> {
    match Status::from_cqe_status(cqe.status) {
        None => Ok(()),
        Some(s) => Err(NvmeError::Status(s)),
    }
}

/// Records one finished part of request `idx`; returns the request's completion when it was
/// the last part.
fn finish_part(
    requests: &mut [Option<ReqState>],
    free: &mut Vec<u32>,
    live: &mut usize,
    idx: u32,
    res: Result<(), NvmeError>,
) -> Option<Completion> {
    let slot = requests.get_mut(idx as usize)?;
    let st = slot.as_mut()?;
    if let Err(e) = res {
        st.err.get_or_insert(e);
    }
    st.parts_left = st.parts_left.saturating_sub(1);
    if st.parts_left > 0 {
        return None;
    }
    let st = slot.take()?;
    let _ = push_within_capacity(free, idx); // sized for every slot at bring-up
    *live -= 1;
    Some(Completion {
        tag: st.tag,
        result: st.err.map_or(Ok(()), Err),
    })
}

/// Queues an event for the next poll; counted and dropped when the ring sized at bring-up is
/// full (the engine never allocates after bring-up).
fn defer(ring: &mut Ring<Event>, stats: &mut Stats, e: Event) {
    if ring.push_back(e).is_err() {
        stats.events_dropped += 1;
    }
}

impl<P: Platform> Controller<P> {
    /// Wraps a platform. Touches no register and allocates nothing.
    pub fn new(platform: P, config: Config) -> Self {
        Controller {
            p: platform,
            cfg: config.sanitized(),
            state: State::Down,
            enabled: false,
            runaway: false,
            shutdown_sent: false,
            rdy_seen: false,
            admin_deadline_us: u64::MAX,
            pending_stop: None,
            stop_out: false,
            cap: None,
            info: None,
            namespaces: Vec::new(),
            rejected: Vec::new(),
            admin: None,
            io: Vec::new(),
            scratch: None,
            aer_page: None,
            aer_log_busy: false,
            aer_armed: false,
            next_admin_poll_us: 0,
            prp_lists: PrpLists::empty(),
            requests: Vec::new(),
            free_reqs: Vec::new(),
            live: 0,
            deferred: Ring::new(),
            fail_buf: Vec::new(),
            sync_seq: 0,
            stepped: None,
            next_check_us: u64::MAX,
            next_queue: 0,
            stats: Stats::default(),
        }
    }

    /// The platform (for the lab and tests).
    pub fn platform(&self) -> &P {
        &self.p
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Identify data and queue geometry, once brought up.
    pub fn info(&self) -> Option<&ControllerInfo> {
        self.info.as_ref()
    }
    /// Usable namespaces, sorted by NSID.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// Active namespaces the engine refused, with the reason (bad identify data, metadata
    /// formats, a failed Identify).
    pub fn rejected_namespaces(&self) -> &[(u32, &'static str)] {
        &self.rejected
    }
    /// I/O requests accepted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.live
    }
    /// True once the controller was failed or found gone (until the next bring-up).
    pub fn is_dead(&self) -> bool {
        self.state == State::Dead
    }
    /// True when brought up and accepting I/O.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }
    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// Completions whose SQ head pointer was outside the valid window and was ignored
    /// (summed over the queues that exist now).
    pub fn ignored_sq_heads(&self) -> u64 {
        self.io.iter().map(|q| q.ignored_sqhd()).sum::<u64>()
            + self.admin.as_ref().map_or(0, |a| a.ignored_sqhd())
    }

    /// Resets and enables the controller and prepares it for I/O:
    /// CAP/VS, disable and wait for !RDY (bounded by CAP.TO), admin queue, enable and wait
    /// for RDY, Identify Controller, Set Features (Number of Queues), I/O CQ/SQ pairs,
    /// namespace scan (active list + Identify Namespace each), Asynchronous Event Request.
    ///
    /// May be called again to recover after a failure; anything outstanding must have been
    /// completed (with [`Controller::fail_all`]) first, or it is failed with `Aborted` and
    /// reported by the next [`Controller::poll`].
    ///
    /// **Bounded in total.** Each CSTS wait is bounded by CAP.TO (the settle of a controller
    /// found enabled but not ready, the disable, the enable), and all admin commands together
    /// by one budget, max(command timeout, [`BRING_UP_ADMIN_MIN_US`]), besides each command's
    /// own timeout: at most 3 x CAP.TO + that budget. A failure adds the stop: the disable
    /// (CAP.TO), and for a controller that had become ready the shutdown notification first
    /// (max(CAP.TO, 5 s)). Every wait goes through [`Clock::delay_us`](crate::platform::Clock),
    /// which may sleep.
    pub fn bring_up(&mut self) -> Result<(), NvmeError> {
        if self.stop_out && self.pending_stop.is_none() {
            // A stop taken by a caller still owns the device and its memory.
            return Err(NvmeError::NotReady);
        }
        if self.live > 0 {
            // Completions go to the event ring, taken out meanwhile (fail_all would otherwise
            // deliver what it holds): at most one per live request, which bring-up sized it for.
            let mut ring = core::mem::take(&mut self.deferred);
            let mut dropped = 0u64;
            self.fail_all(NvmeError::Aborted, &mut |c| dropped += u64::from(ring.push_back(Event::Io(c)).is_err()));
            self.deferred = ring;
            self.stats.events_dropped += dropped;
        }
        self.stop_and_release();
        self.state = State::Down;
        // Nothing from a previous life may be reported as current if this bring-up fails.
        self.info = None;
        self.cap = None;
        self.namespaces.clear();
        self.rejected.clear();
        let steps = self.bring_up_steps();
        self.admin_deadline_us = u64::MAX;
        match steps {
            Ok(()) => {
                self.state = State::Ready;
                Ok(())
            }
            Err(e) => {
                self.stop_and_release();
                self.info = None;
                self.namespaces.clear();
                self.state = if e == NvmeError::Gone {
                    State::Dead
                } else {
                    State::Down
                };
                Err(e)
            }
        }
    }

    fn bring_up_steps(&mut self) -> Result<(), NvmeError> {
        let cap = ctrlr::read_cap(&self.p)?;
        self.cap = Some(cap);
        let vs = self.p.read32(regs::VS);
        // Whatever state firmware or a previous driver left: stop it before handing it memory.
        ctrlr::settle(&self.p, &cap)?;
        ctrlr::disable(&self.p, &cap, ctrlr::POLL_US)?;
        // CSTS.RDY is clear: whatever a previous life left running has stopped.
        self.runaway = false;

        let admin_entries = self
            .cfg
            .admin_entries
            .clamp(2, cap.max_entries.min(4096) as u16);
        let admin = QueuePair::new(&self.p, &cap, 0, admin_entries)?;
        let aqa = (admin_entries as u32 - 1) << 16 | (admin_entries as u32 - 1);
        self.p.write32(regs::AQA, aqa);
        self.p.write64(regs::ASQ, admin.sq_addr());
        self.p.write64(regs::ACQ, admin.cq_addr());
        self.admin = Some(admin);
        self.scratch = Some(self.alloc_page()?);
        self.aer_page = Some(self.alloc_page()?);

        // From here on the device may DMA: `enabled` makes every exit path disable it.
        self.enabled = true;
        self.shutdown_sent = false;
        self.rdy_seen = false;
        ctrlr::enable(&self.p, &cap)?;
        self.rdy_seen = true;
        let budget = self.cfg.cmd_timeout_us.max(BRING_UP_ADMIN_MIN_US);
        self.admin_deadline_us = self.p.now_us().saturating_add(budget);

        let page_addr = self.scratch_addr()?;
        self.admin_sync(admin::identify_controller(page_addr))?;
        let page = self.read_scratch()?;
        let mut info = identify::parse_controller(&page, Version::decode(vs))?;

        // Ask only for queues whose doorbells lie inside BAR0.
        let mut want = self.cfg.io_queues.max(1);
        while want > 1 && cap.cq_head_doorbell(want).is_none() {
            want -= 1;
        }
        if cap.cq_head_doorbell(1).is_none() {
            return Err(NvmeError::BadDevice(
                "CAP.DSTRD leaves no room for an I/O doorbell",
            ));
        }
        let granted = self.admin_sync(admin::set_num_queues(want))?.dw0;
        let nsqa = (granted & 0xffff) + 1;
        let ncqa = (granted >> 16) + 1;
        let nq = (want as u32).min(nsqa).min(ncqa) as u16;
        let io_entries = self
            .cfg
            .io_entries
            .clamp(2, cap.max_entries.min(65535) as u16);
        // Room for every pair first: a pair whose CQ exists on the device must be kept.
        self.io.try_reserve_exact(usize::from(nq)).map_err(|_| NvmeError::OutOfMemory("the I/O queue table"))?;
        for qid in 1..=nq {
            let q = QueuePair::new(&self.p, &cap, qid, io_entries)?;
            self.admin_sync(admin::create_cq(qid, io_entries, q.cq_addr(), 0))?;
            let sq = admin::create_sq(qid, io_entries, q.sq_addr(), qid);
            // Keep the pair even if SQ creation fails: its CQ exists on the device, and its
            // memory must live until the controller is disabled.
            let sq_res = self.admin_sync(sq);
            // Within the room reserved above.
            push_within_capacity(&mut self.io, q).map_err(|_| NvmeError::OutOfMemory("the I/O queue table"))?;
            sq_res?;
        }
        info.io_queues = nq;
        info.io_entries = io_entries;
        let mdts_bytes = info.mdts_bytes;
        self.info = Some(info);

        // Every request needs at least one command slot, and every command at most one PRP
        // list: sizing the tables and allocating the lists once here means the I/O path never
        // allocates, neither bookkeeping nor DMA memory (nvme(4) likewise gives each tracker
        // its list at nvme_qpair_construct).
        let slots: usize = self.io.iter().map(|q| q.capacity()).sum();
        self.requests = try_collect((0..slots).map(|_| None)).map_err(|_| NvmeError::OutOfMemory("the request table"))?;
        self.free_reqs = try_collect((0..slots as u32).rev()).map_err(|_| NvmeError::OutOfMemory("the request table"))?;
        self.prp_lists = PrpLists::allocate(&self.p, slots, mdts_bytes)?;
        // Events still queued (a bring-up of a controller with live requests failed them into
        // the ring first) move to the new ring, which has room for them besides its own.
        let mut ring = Ring::with_capacity(slots + 8 + self.deferred.len()).map_err(|_| NvmeError::OutOfMemory("the event ring"))?;
        while let Some(e) = self.deferred.pop_front() {
            let _ = ring.push_back(e); // room for each, reserved just above
        }
        self.deferred = ring;
        self.fail_buf = try_vec_with_capacity(slots + self.deferred.capacity()).map_err(|_| NvmeError::OutOfMemory("the failed-request buffer"))?;

        let mut scan = self.scan_begin(false)?;
        self.drive_scan(&mut scan)?;
        let _ = self.apply_scan(&mut scan);

        // Older controllers may refuse the configuration; the AER works regardless.
        match self.admin_sync(aer::enable_notices()) {
            Ok(_) | Err(NvmeError::Status(_)) => {}
            Err(e) => return Err(e),
        }
        self.arm_aer();
        Ok(())
    }

    fn alloc_page(&self) -> Result<P::Region, NvmeError> {
        let r = self
            .p
            .alloc_dma(IDENTIFY_LEN, 4096)
            .map_err(|_| NvmeError::NoMemory)?;
        if r.len() < IDENTIFY_LEN {
            return Err(NvmeError::NoMemory);
        }
        Ok(r)
    }

    fn scratch_addr(&self) -> Result<u64, NvmeError> {
        self.scratch
            .as_ref()
            .map(|r| r.bus_addr())
            .ok_or(NvmeError::NotReady)
    }

    fn read_scratch(&self) -> Result<Vec<u8>, NvmeError> {
        let r = self.scratch.as_ref().ok_or(NvmeError::NotReady)?;
        let mut page = try_vec_filled(0u8, IDENTIFY_LEN).map_err(|_| NvmeError::OutOfMemory("identify data"))?;
        r.read(0, &mut page);
        Ok(page)
    }

    /// Sends one admin command owned by a synchronous waiter; returns its sequence number and
    /// the time it was sent. Its deadline makes `poll` give the controller up if it is never
    /// answered.
    fn admin_submit(&mut self, sqe: Sqe) -> Result<(u32, u64), NvmeError> {
        self.sync_seq = self.sync_seq.wrapping_add(1);
        let seq = self.sync_seq;
        let start = self.p.now_us();
        let deadline = start.saturating_add(self.cfg.cmd_timeout_us);
        let admin = self.admin.as_mut().ok_or(NvmeError::NotReady)?;
        admin.push(sqe, AdminOwner::Sync(seq), deadline)?;
        admin.ring(&self.p);
        self.stats.commands += 1;
        self.next_check_us = self.next_check_us.min(deadline);
        Ok((seq, start))
    }

    /// How long a synchronous admin command sent at `start` may be waited for: its timeout,
    /// cut short by what is left of the bring-up's admin budget.
    pub(super) fn sync_bound(&self, start: u64) -> u64 {
        self.cfg.cmd_timeout_us.min(self.admin_deadline_us.saturating_sub(start))
    }

    /// Runs one admin command to completion, bounded by `cmd_timeout_us` (and during
    /// bring-up by its admin budget).
    fn admin_sync(&mut self, sqe: Sqe) -> Result<Cqe, NvmeError> {
        let (seq, start) = self.admin_submit(sqe)?;
        let mut wait = SyncWait::new(start, self.sync_bound(start));
        loop {
            if let Some(res) = self.reap_admin(Some(seq)) {
                return res;
            }
            if let Err(e) = wait.pause(&self.p, self.enabled) {
                // The command stays tracked (its deadline passes): the next poll gives the
                // controller up unless the caller does first.
                if e == NvmeError::Gone || health::assess(&self.p, self.enabled) == Health::Gone {
                    return Err(NvmeError::Gone);
                }
                return Err(NvmeError::Timeout);
            }
        }
    }

    /// Reaps the admin completion queue. Returns the result of synchronous command `want`
    /// if it completed; asynchronous events go to `deferred`.
    fn reap_admin(&mut self, want: Option<u32>) -> Option<Result<Cqe, NvmeError>> {
        let admin = self.admin.as_mut()?;
        let mut found = None;
        let mut consumed = false;
        let mut rearm = false;
        let mut read_log = None;
        for _ in 0..admin.entries() {
            let Some(r) = admin.next_completion() else {
                break;
            };
            consumed = true;
            match r {
                Err(what) => {
                    self.stats.bad_completions += 1;
                    defer(&mut self.deferred, &mut self.stats, Event::BadCompletion { qid: 0, what });
                }
                Ok((cqe, t)) => match t.owner {
                    AdminOwner::Sync(s) => {
                        let res = status_result(&cqe).map(|_| cqe);
                        if Some(s) == want {
                            found = Some(res);
                        } else if let Some(st) = self.stepped.as_mut().filter(|st| st.seq == s) {
                            // A stepped scan's command, reaped by poll: keep it for the scan.
                            st.result = Some(res);
                        }
                    }
                    AdminOwner::Aer => {
                        self.aer_armed = false;
                        if status_result(&cqe).is_ok() {
                            self.stats.async_events += 1;
                            let ev = AsyncEvent::decode(cqe.dw0);
                            if ev.is_ns_changed() {
                                defer(&mut self.deferred, &mut self.stats, Event::NamespacesChanged);
                            } else {
                                defer(&mut self.deferred, &mut self.stats, Event::AsyncNotice {
                                    kind: ev.kind,
                                    info: ev.info,
                                    log_page: ev.log_page,
                                });
                                read_log = Some(ev.log_page);
                            }
                            rearm = true;
                        }
                        // An AER that fails (limit exceeded, aborted) is not resubmitted:
                        // retrying would only loop on the same error.
                    }
                    AdminOwner::AerLog => self.aer_log_busy = false,
                },
            }
        }
        admin.finish_reap(&self.p, consumed);
        if let Some(lid) = read_log {
            self.read_event_log(lid);
        }
        if rearm {
            self.arm_aer();
        }
        found
    }

    fn arm_aer(&mut self) {
        if self.aer_armed {
            return;
        }
        if let Some(admin) = self.admin.as_mut() {
            if admin
                .push(aer::request(), AdminOwner::Aer, u64::MAX)
                .is_ok()
            {
                admin.ring(&self.p);
                self.aer_armed = true;
                self.stats.commands += 1;
            }
        }
    }

    /// Reads the log page an event points at, which is what re-enables that event type.
    fn read_event_log(&mut self, lid: u8) {
        if self.aer_log_busy {
            return;
        }
        let Some(addr) = self.aer_page.as_ref().map(|r| r.bus_addr()) else {
            return;
        };
        let bytes = match lid {
            log_page::ERROR => 64,
            log_page::SMART => 512,
            _ => 4096,
        };
        let deadline = self.p.now_us().saturating_add(self.cfg.cmd_timeout_us);
        if let Some(admin) = self.admin.as_mut() {
            if admin
                .push(
                    aer::get_log_page(lid, bytes, addr),
                    AdminOwner::AerLog,
                    deadline,
                )
                .is_ok()
            {
                admin.ring(&self.p);
                self.aer_log_busy = true;
                self.stats.commands += 1;
                self.next_check_us = self.next_check_us.min(deadline);
            }
        }
    }

    /// Queues an I/O request whose data is the contiguous buffer `req.data`. On `Ok` the
    /// request is the engine's until its one [`Completion`] is delivered by
    /// [`Controller::poll`] or [`Controller::fail_all`]; on `Err` nothing was sent and nothing
    /// will be delivered.
    pub fn submit(&mut self, req: IoRequest) -> Result<(), NvmeError> {
        let seg = [DmaSeg { addr: req.data.bus_addr, len: req.data.len }];
        let segs: &[DmaSeg] = if req.op == IoOp::Flush { &[] } else { &seg };
        self.submit_segments(req, segs)
    }

    /// Queues an I/O request whose data is `segs`, as busdma(9) gives them (see
    /// [`super::prp`]): `req.data.len` is the request's length, which the segments must add
    /// up to; `req.data.bus_addr` is not used. Segments that PRP entries cannot express are
    /// refused with `InvalidRequest`. Same contract as [`submit`](Controller::submit).
    ///
    /// Allocates nothing: the request slot, the command slots and the PRP lists were all
    /// reserved at bring-up. Every slot in use is `QueueFull`.
    pub fn submit_segments(&mut self, req: IoRequest, segs: &[DmaSeg]) -> Result<(), NvmeError> {
        match self.state {
            State::Dead => return Err(NvmeError::Gone),
            State::Down => return Err(NvmeError::NotReady),
            State::Ready => {}
        }
        let mdts = self.info.as_ref().ok_or(NvmeError::NotReady)?.mdts_bytes;
        let ns = self
            .namespaces
            .iter()
            .find(|n| n.nsid == req.nsid)
            .ok_or(NvmeError::InvalidRequest("unknown namespace"))?;
        let per_queue = self
            .io
            .first()
            .map(|q| q.capacity())
            .ok_or(NvmeError::NotReady)?;
        let plan = Plan::new(req, segs, ns, mdts, per_queue as u32)?;
        let parts = plan.parts as usize;

        let nq = self.io.len();
        let qi = (0..nq)
            .map(|k| (self.next_queue + k) % nq)
            .find(|&qi| self.io[qi].has_room(parts))
            .ok_or(NvmeError::QueueFull)?;
        // Lists are one per command slot, so a queue with room has lists for it; checked
        // anyway, before anything is sent, so the request is never half submitted.
        if self.prp_lists.available() < parts {
            return Err(NvmeError::QueueFull);
        }
        self.next_queue = (qi + 1) % nq;
        let idx = self.free_reqs.pop().ok_or(NvmeError::QueueFull)?;

        let deadline = self.p.now_us().saturating_add(self.cfg.cmd_timeout_us);
        let q = &mut self.io[qi];
        let mut sent = 0;
        let mut err = None;
        for i in 0..plan.parts {
            let part = plan.part(i);
            let mut sqe = part.sqe;
            let mut prp = None;
            if req.op != IoOp::Flush {
                let mut e = plan.entries(&part);
                let prp1 = e.next().unwrap_or(0);
                let rest = e.clone().count();
                let prp2 = match rest {
                    0 => Ok(0),
                    1 => Ok(e.next().unwrap_or(0)),
                    _ => match self.prp_lists.take() {
                        Some(slot) => {
                            prp = Some(slot);
                            self.prp_lists.write(slot, e)
                        }
                        None => Err(NvmeError::QueueFull),
                    },
                };
                match prp2 {
                    Ok(a) => sqe.set_prp(prp1, a),
                    Err(e) => {
                        prp.take().into_iter().for_each(|s| self.prp_lists.put(s));
                        err = Some(e);
                        break;
                    }
                }
            }
            if q.push(sqe, IoPart { req: idx, prp }, deadline).is_err() {
                prp.into_iter().for_each(|s| self.prp_lists.put(s));
                err = Some(NvmeError::QueueFull);
                break;
            }
            sent += 1;
            self.stats.commands += 1;
        }
        if sent == 0 {
            // Nothing reached the device: the request was never accepted.
            let _ = push_within_capacity(&mut self.free_reqs, idx); // sized for every slot
            return Err(err.unwrap_or(NvmeError::QueueFull));
        }
        // Cannot fail after the first part (the room and the lists were checked, the
        // segments validated); if it does, the request must still complete exactly once:
        // with the error, once the parts already queued finish.
        self.requests[idx as usize] = Some(ReqState {
            tag: plan.tag(),
            parts_left: sent,
            err,
        });
        self.live += 1;
        q.ring(&self.p);
        self.stats.requests += 1;
        if plan.parts > 1 {
            self.stats.split_requests += 1;
        }
        self.next_check_us = self.next_check_us.min(deadline);
        Ok(())
    }

    /// Reaps every completion queue and reports what happened. Each accepted request is
    /// reported exactly once as [`Event::Io`]. Completion entries are validated (CID in range
    /// and outstanding, SQID, SQ head); a bad one is counted and reported, never trusted.
    /// Overdue commands make the engine check the controller's health and give it up
    /// ([`Event::ControllerLost`]): the fast half only, as [`fail_fast`](Controller::fail_fast)
    /// does, since poll is called under the caller's lock; the caller then runs the stop
    /// ([`take_stop`](Controller::take_stop)), or lets [`fail_all`](Controller::fail_all),
    /// [`shutdown`](Controller::shutdown) or drop run it. Returns the number of I/O completions
    /// reported.
    pub fn poll(&mut self, on: &mut dyn FnMut(Event)) -> usize {
        let mut n = 0;
        if self.state == State::Ready {
            let armed = usize::from(self.aer_armed);
            let busy = self.admin.as_ref().is_some_and(|a| a.outstanding() > armed);
            let now = if busy { 0 } else { self.p.now_us() };
            if busy || now >= self.next_admin_poll_us {
                self.next_admin_poll_us = now.saturating_add(ADMIN_POLL_US);
                let _ = self.reap_admin(None);
            }
        }
        while let Some(e) = self.deferred.pop_front() {
            if matches!(e, Event::Io(_)) {
                n += 1;
            }
            on(e);
        }
        if self.state != State::Ready {
            return n;
        }
        n += self.reap_io(true, on);
        n + self.check_deadlines(on)
    }

    /// Reaps every I/O completion queue (memory reads only) and reports each entry. `ring`:
    /// tell the device how far we consumed (the CQ head doorbell); [`fail_fast`] passes false
    /// because it touches no register. Returns the number of I/O completions reported.
    ///
    /// [`fail_fast`]: Controller::fail_fast
    fn reap_io(&mut self, ring: bool, on: &mut dyn FnMut(Event)) -> usize {
        let mut n = 0;
        for q in self.io.iter_mut() {
            let mut consumed = false;
            for _ in 0..q.entries() {
                let Some(r) = q.next_completion() else { break };
                consumed = true;
                match r {
                    Err(what) => {
                        self.stats.bad_completions += 1;
                        on(Event::BadCompletion { qid: q.qid(), what });
                    }
                    Ok((cqe, t)) => {
                        if let Some(slot) = t.owner.prp {
                            self.prp_lists.put(slot);
                        }
                        let res = status_result(&cqe);
                        if let Some(c) = finish_part(
                            &mut self.requests,
                            &mut self.free_reqs,
                            &mut self.live,
                            t.owner.req,
                            res,
                        ) {
                            n += 1;
                            on(Event::Io(c));
                        }
                    }
                }
            }
            if ring {
                q.finish_reap(&self.p, consumed);
            }
        }
        n
    }

    /// Gives the controller up if any command is overdue. Returns I/O completions reported.
    fn check_deadlines(&mut self, on: &mut dyn FnMut(Event)) -> usize {
        if self.next_check_us == u64::MAX {
            return 0;
        }
        let now = self.p.now_us();
        if now < self.next_check_us {
            return 0;
        }
        let io_min = self
            .io
            .iter()
            .map(|q| q.earliest_deadline())
            .min()
            .unwrap_or(u64::MAX);
        let admin_min = self
            .admin
            .as_ref()
            .map_or(u64::MAX, |a| a.earliest_deadline());
        let earliest = io_min.min(admin_min);
        if earliest > now {
            self.next_check_us = earliest;
            return 0;
        }
        self.stats.timeouts += 1;
        let health = health::assess(&self.p, self.enabled);
        let reason = if health == Health::Gone {
            NvmeError::Gone
        } else {
            NvmeError::Timeout
        };
        let mut n = 0;
        // Only the fast half: poll runs under the caller's lock (the kld's interrupt thread).
        // The stop is left pending for the caller (see `take_stop`).
        self.fail_fast(reason, &mut |c| {
            n += 1;
            on(Event::Io(c))
        });
        on(Event::ControllerLost { reason, health });
        n
    }

    /// True when the device cannot be accessing host memory: it was never enabled, or it was
    /// disabled (CSTS.RDY seen clear), or it is gone (CSTS all-ones or config space absent).
    ///
    /// False while the controller runs; while a [`DeviceStop`] is out (made by
    /// [`fail_fast`](Controller::fail_fast) or [`begin_shutdown`](Controller::begin_shutdown),
    /// its outcome not yet given to [`finish_stop`](Controller::finish_stop)); and, the case a
    /// caller must handle, after a stop could not stop a device that is still present. In the
    /// last two cases the requests completed with an error by hand (by `fail_fast`, `fail_all`,
    /// a timeout in [`poll`](Controller::poll), or [`io_sync`](Controller::io_sync)) may still
    /// have their data buffers read or written by the device: their owner must hold them until
    /// the stop finished, then free them only if this says true, else leak them, as the engine
    /// leaks its own rings ([`Stats::leaked_regions`]). A completion with `Ok` always means the
    /// device is done with its buffer, whatever this says.
    pub fn dma_stopped(&self) -> bool {
        !self.enabled && !self.runaway && !self.stop_out
    }

    /// True while a [`DeviceStop`] made by the engine waits to be taken
    /// ([`take_stop`](Controller::take_stop)).
    pub fn stop_pending(&self) -> bool {
        self.pending_stop.is_some()
    }

    /// True while a [`DeviceStop`] made by the engine has not been finished
    /// ([`finish_stop`](Controller::finish_stop)): pending here or taken by a caller.
    pub fn stop_in_progress(&self) -> bool {
        self.stop_out
    }

    /// Classifies the controller from CSTS and config space (see [`health`]). A dead
    /// controller is not touched (its stop may be running without the engine's lock): it is
    /// reported [`Health::Gone`], gone as far as the engine is concerned.
    pub fn check_health(&mut self) -> Health {
        if self.state == State::Dead {
            return Health::Gone;
        }
        health::assess(&self.p, self.enabled && self.state == State::Ready)
    }

    /// Marks the controller dead and completes every accepted request exactly once, now:
    /// completions already reaped but not yet reported keep their real result, everything
    /// else gets `Err(err)`. Later submits fail with [`NvmeError::Gone`]. If the device could
    /// not be stopped, [`Controller::dma_stopped`] says so afterwards: the buffers of the
    /// requests completed with an error must then be leaked, not reused.
    ///
    /// Unless the device is already gone, it is shut down (normal shutdown notification, so
    /// its write cache is flushed) and disabled, each step bounded, before any completion is
    /// delivered, because completing a read hands its buffer back to the caller, and a
    /// controller that is still running could DMA into it afterwards. A gone device is not
    /// waited for.
    ///
    /// This is [`fail_fast`](Controller::fail_fast) plus the stop, run in place: it waits up to
    /// ~5 s + CAP.TO on a broken device. A caller whose lock is shared with an interrupt or I/O
    /// path must use the two halves instead (see the module documentation).
    pub fn fail_all(&mut self, err: NvmeError, done: &mut dyn FnMut(Completion)) {
        // Held back until the device is stopped, in the buffer bring-up sized for every
        // completion fail_fast can produce (each request slot, each deferred event): no
        // allocation here. Should it ever be short, the rest is delivered at once rather than lost.
        let mut failed = core::mem::take(&mut self.fail_buf);
        failed.clear();
        self.fail_fast(err, &mut |c| {
            if let Err(c) = push_within_capacity(&mut failed, c) {
                done(c);
            }
        });
        let _ = self.run_pending_stop();
        for c in failed.drain(..) {
            done(c);
        }
        self.fail_buf = failed;
    }

    /// The fast half of giving the controller up, fit to run under a lock that interrupt
    /// and I/O paths take: no register access, no wait, no allocation.
    ///
    /// Marks the controller dead (later submits fail with [`NvmeError::Gone`]), completes every
    /// accepted request exactly once through `done` (completions the device already posted, or
    /// reaped but not yet reported, keep their real result; everything else gets `Err(err)`),
    /// and gives up its
    /// rings and pages into a [`DeviceStop`], kept until [`take_stop`](Controller::take_stop).
    /// The device may still be running until that stop has run: hold the buffers of the
    /// requests completed here with an error until [`finish_stop`](Controller::finish_stop),
    /// then free them only if [`dma_stopped`](Controller::dma_stopped). Calling it again
    /// completes nothing twice and makes no second stop.
    pub fn fail_fast(&mut self, err: NvmeError, done: &mut dyn FnMut(Completion)) {
        // Entries the device posted before it was lost are real results, written to host
        // memory: report them as they are (a completed write is on the device) instead of
        // failing those requests too. Bad entries are counted in `stats` and dropped.
        if self.state == State::Ready {
            self.reap_io(false, &mut |e| {
                if let Event::Io(c) = e {
                    done(c)
                }
            });
        }
        self.state = State::Dead;
        // Events other than completions stay queued, in order, for the next poll (popping and
        // pushing back within the same capacity allocates nothing).
        for _ in 0..self.deferred.len() {
            match self.deferred.pop_front() {
                Some(Event::Io(c)) => done(c),
                // Into the entry just popped: cannot be full.
                Some(other) => defer(&mut self.deferred, &mut self.stats, other),
                None => break,
            }
        }
        let lists = &mut self.prp_lists;
        for q in self.io.iter_mut() {
            q.take_each(|t| {
                if let Some(slot) = t.owner.prp {
                    lists.put(slot);
                }
            });
        }
        if let Some(a) = self.admin.as_mut() {
            a.take_each(drop);
        }
        for (idx, slot) in self.requests.iter_mut().enumerate() {
            if let Some(st) = slot.take() {
                let _ = push_within_capacity(&mut self.free_reqs, idx as u32); // sized for every slot
                self.stats.failed_requests += 1;
                done(Completion {
                    tag: st.tag,
                    result: Err(err),
                });
            }
        }
        self.live = 0;
        if self.pending_stop.is_none() && self.owns_device_state() {
            let stop = self.make_stop(false);
            self.pending_stop = Some(stop);
        }
    }

    /// Hands out the slow half left by [`fail_fast`](Controller::fail_fast) or
    /// [`begin_shutdown`](Controller::begin_shutdown) (also by a timeout in
    /// [`poll`](Controller::poll)): run it with [`DeviceStop::run`] without the engine's lock,
    /// then give the outcome to [`finish_stop`](Controller::finish_stop). `None`: nothing to
    /// stop, or already taken.
    pub fn take_stop(&mut self) -> Option<DeviceStop<P::Region>> {
        self.pending_stop.take()
    }

    /// Records what a [`DeviceStop`] achieved: whether DMA stopped (if not, the controller is
    /// a runaway: [`dma_stopped`](Controller::dma_stopped) stays false until a later bring-up
    /// disables it) and the regions it leaked. Returns the stop's result; a stop that found the
    /// device gone leaves the controller dead.
    pub fn finish_stop(&mut self, outcome: StopOutcome) -> Result<(), NvmeError> {
        self.stop_out = false;
        if !outcome.dma_stopped() {
            self.runaway = true;
        }
        self.stats.leaked_regions += outcome.leaked_regions();
        if outcome.result() == Err(NvmeError::Gone) {
            self.state = State::Dead;
        }
        outcome.result()
    }

    /// Runs the pending stop, if any, in place (single-threaded callers).
    fn run_pending_stop(&mut self) -> Result<(), NvmeError> {
        match self.pending_stop.take() {
            Some(stop) => {
                let outcome = stop.run(&self.p);
                self.finish_stop(outcome)
            }
            None => Ok(()),
        }
    }

    /// The device may be running, or the engine still holds memory lent to it.
    fn owns_device_state(&self) -> bool {
        self.enabled
            || self.admin.is_some()
            || !self.io.is_empty()
            || self.scratch.is_some()
            || self.aer_page.is_some()
            || !self.prp_lists.is_empty()
    }

    /// Gives up everything the device may use into a [`DeviceStop`]; the engine keeps no ring
    /// and no page, so nothing it does afterwards can reach the device or that memory. Moves
    /// only (no allocation).
    fn make_stop(&mut self, delete_queues: bool) -> DeviceStop<P::Region> {
        let running = self.enabled;
        // Send the notification once per life: it makes the controller flush its volatile
        // write cache, and the slot may lose power right after (an eject follows an
        // announced detach), which would otherwise lose writes already reported done.
        let notify = running && self.rdy_seen && !self.shutdown_sent;
        self.shutdown_sent |= notify;
        self.enabled = false;
        self.stop_out = true;
        self.stepped = None;
        self.aer_armed = false;
        self.aer_log_busy = false;
        self.next_check_us = u64::MAX;
        DeviceStop::new(
            self.cap,
            running,
            notify,
            delete_queues,
            self.cfg.cmd_timeout_us,
            self.admin.take(),
            core::mem::take(&mut self.io),
            [self.scratch.take(), self.aer_page.take()],
            self.prp_lists.take_pages(),
        )
    }

    /// Stops the device if needed and releases every DMA region, leaking those the device
    /// might still use; in place, waiting as long as the device needs (bring-up, drop). Does
    /// nothing while a stop taken by a caller is still running: that stop owns the device.
    fn stop_and_release(&mut self) {
        if self.stop_out && self.pending_stop.is_none() {
            return;
        }
        if self.pending_stop.is_none() && self.owns_device_state() {
            let stop = self.make_stop(false);
            self.pending_stop = Some(stop);
        }
        let _ = self.run_pending_stop();
    }

    /// Announced removal: deletes the I/O queues, sends the normal shutdown notification,
    /// waits for it to complete (bounded), and disables the controller. Requests must have
    /// been drained (poll until [`Controller::outstanding`] is 0) or failed first. A dead
    /// controller is only stopped if its stop is still pending, and its memory released.
    ///
    /// This is [`begin_shutdown`](Controller::begin_shutdown) plus the stop, run in place; a
    /// caller with a shared lock uses the two halves.
    pub fn shutdown(&mut self) -> Result<(), NvmeError> {
        let was_dead = self.state == State::Dead;
        self.begin_shutdown()?;
        let r = self.run_pending_stop();
        if was_dead {
            self.stop_and_release();
            return Ok(());
        }
        r
    }

    /// The fast half of [`shutdown`](Controller::shutdown), fit to run under a lock: refuses
    /// with `InvalidRequest` while I/O is outstanding; otherwise stops accepting I/O (submits
    /// fail with `NotReady`) and leaves a [`DeviceStop`] that deletes the I/O queues, sends the
    /// shutdown notification and disables the controller ([`take_stop`](Controller::take_stop)).
    /// Nothing to do for a controller that is down; a dead one keeps its pending stop.
    pub fn begin_shutdown(&mut self) -> Result<(), NvmeError> {
        match self.state {
            State::Dead | State::Down => return Ok(()),
            State::Ready => {}
        }
        if self.live > 0 {
            return Err(NvmeError::InvalidRequest(
                "I/O outstanding: drain with poll() or fail_all() first",
            ));
        }
        self.state = State::Down;
        if let Some(a) = self.admin.as_mut() {
            // A synchronous command whose waiter timed out, and the AER: nobody waits for them.
            a.take_each(drop);
        }
        if self.pending_stop.is_none() {
            let stop = self.make_stop(true);
            self.pending_stop = Some(stop);
        }
        Ok(())
    }

    /// Re-reads the namespace list (after [`Event::NamespacesChanged`], or on demand) and
    /// reports what changed. Reading the Changed Namespace List log page first re-arms the
    /// Namespace Attribute Changed event.
    ///
    /// Waits for each admin command in place (bounded busy-waits); a caller behind a lock
    /// that the interrupt or I/O path takes uses [`rescan_begin`](Controller::rescan_begin)
    /// and [`rescan_step`](Controller::rescan_step) instead, releasing it between steps.
    pub fn rescan_namespaces(&mut self) -> Result<NsChanges, NvmeError> {
        let mut scan = self.rescan_begin()?;
        self.drive_scan(&mut scan)?;
        self.apply_scan(&mut scan)
    }

    /// Submits `req` and polls until it completes; never hangs: the wait is bounded by the
    /// command timeout (after which the controller is given up, as in `poll`). Other events
    /// seen meanwhile are kept for the next [`Controller::poll`].
    pub fn io_sync(&mut self, req: IoRequest) -> Result<(), NvmeError> {
        let tag = req.tag;
        self.submit(req)?;
        let bound = self.cfg.cmd_timeout_us.saturating_mul(2);
        let mut wait = SyncWait::new(self.p.now_us(), bound);
        let mut result = None;
        let mut others = Vec::new();
        let mut gave_up = None;
        loop {
            self.poll(&mut |e| match e {
                Event::Io(c) if c.tag == tag && result.is_none() => result = Some(c.result),
                other => others.push(other),
            });
            if result.is_some() {
                break;
            }
            if let Err(e) = wait.pause(&self.p, self.enabled) {
                gave_up = Some(e);
                break;
            }
        }
        if let (None, Some(reason)) = (result, gave_up) {
            // Gone (noticed by the presence check), or poll should already have given the
            // controller up: stop it and fail everything, ours included.
            if reason == NvmeError::Timeout {
                self.stats.timeouts += 1;
            }
            self.fail_all(reason, &mut |c| {
                if c.tag == tag && result.is_none() {
                    result = Some(c.result);
                } else {
                    others.push(Event::Io(c));
                }
            });
        }
        for e in others.into_iter().rev() {
            if self.deferred.push_front(e).is_err() {
                self.stats.events_dropped += 1;
            }
        }
        result.unwrap_or(Err(NvmeError::Timeout))
    }
}

impl<P: Platform> Drop for Controller<P> {
    /// Stops the controller before its queue memory is freed (or leaks the memory if it
    /// cannot be stopped): dropping a running controller must not leave it DMA-ing into
    /// freed pages. Drop has no way to report completions: the owner calls
    /// [`Controller::fail_all`] (or drains) first, so no request is silently forgotten.
    fn drop(&mut self) {
        self.stop_and_release();
    }
}

#[cfg(test)]
mod tests {
    //! [`Controller::dma_stopped`] against a minimal register model (no softnvme): a device that
    //! enables but never answers an admin command, and that can be told to ignore a disable.
    use super::*;
    use crate::nvme::MIN_CMD_TIMEOUT_US;
    use alloc::vec;
    use crate::platform::{AllocError, Clock, DmaAllocator, PciPresence, RegisterIo};
    use core::cell::{Cell, RefCell};

    struct Region(RefCell<Vec<u8>>, u64);
    impl DmaRegion for Region {
        fn bus_addr(&self) -> u64 {
            self.1
        }
        fn len(&self) -> usize {
            self.0.borrow().len()
        }
        fn read(&self, off: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.borrow()[off..off + buf.len()]);
        }
        fn write(&self, off: usize, buf: &[u8]) {
            self.0.borrow_mut()[off..off + buf.len()].copy_from_slice(buf);
        }
    }

    /// CC.EN=1 sets CSTS.RDY; CC.EN=0 clears it unless `stuck`. Admin commands are ignored.
    /// `bus_master`: what its bus mastering answers to the stop's last resort (None: the
    /// platform cannot turn it off, the trait's default).
    struct Stuck {
        stuck: bool,
        bus_master: Option<Cell<bool>>,
        cc: Cell<u32>,
        rdy: Cell<bool>,
        now: Cell<u64>,
        next: Cell<u64>,
    }
    impl Stuck {
        fn new(stuck: bool) -> Stuck {
            Stuck {
                stuck,
                bus_master: None,
                cc: Cell::new(0),
                rdy: Cell::new(false),
                now: Cell::new(0),
                next: Cell::new(0x10_0000),
            }
        }
    }
    impl RegisterIo for Stuck {
        fn read32(&self, off: u32) -> u32 {
            // CAP: MQES 63, TO 1 (500 ms), DSTRD 0, CSS NVM.
            match off {
                regs::CAP => 63 | 1 << 24,
                0x04 => 1 << 5,
                regs::CC => self.cc.get(),
                regs::CSTS => u32::from(self.rdy.get()),
                _ => 0,
            }
        }
        fn write32(&self, off: u32, val: u32) {
            if off == regs::CC {
                self.cc.set(val);
                if val & 1 != 0 {
                    self.rdy.set(true);
                } else if !self.stuck {
                    self.rdy.set(false);
                }
            }
        }
    }
    impl PciPresence for Stuck {
        fn vendor_id(&self) -> u16 {
            0x1b36
        }
        fn stop_bus_mastering(&self) -> bool {
            // Turned off, and reads back off, only where the test lets it.
            self.bus_master.as_ref().is_some_and(|on| {
                on.set(false);
                true
            })
        }
    }
    impl Clock for Stuck {
        fn now_us(&self) -> u64 {
            self.now.get()
        }
        fn delay_us(&self, us: u32) {
            self.now.set(self.now.get() + u64::from(us));
        }
    }
    impl DmaAllocator for Stuck {
        type Region = Region;
        fn alloc_dma(&self, len: usize, _align: usize) -> Result<Region, AllocError> {
            let a = self.next.get();
            self.next.set(a + 0x10_0000);
            Ok(Region(RefCell::new(vec![0; len]), a))
        }
    }

    fn config() -> Config {
        Config {
            cmd_timeout_us: MIN_CMD_TIMEOUT_US,
            ..Config::default()
        }
    }

    #[test]
    fn a_device_that_ignores_the_disable_is_not_reported_stopped() {
        let mut c = Controller::new(Stuck::new(true), config());
        assert!(c.dma_stopped(), "never enabled");
        // Enable succeeds, Identify times out, the disable on the way out times out.
        assert_eq!(c.bring_up(), Err(NvmeError::Timeout));
        assert!(
            c.stats().leaked_regions > 0,
            "rings of a running device are leaked"
        );
        assert!(
            !c.dma_stopped(),
            "the device may still write the leaked memory"
        );
        let mut n = 0;
        c.fail_all(NvmeError::Gone, &mut |_| n += 1);
        assert_eq!(n, 0);
        assert!(!c.dma_stopped(), "fail_all cannot have stopped it either");
    }

    #[test]
    fn a_device_that_ignores_the_disable_but_loses_bus_mastering_is_stopped_and_freed() {
        let mut dev = Stuck::new(true);
        dev.bus_master = Some(Cell::new(true));
        let mut c = Controller::new(dev, config());
        assert_eq!(c.bring_up(), Err(NvmeError::Timeout));
        assert_eq!(c.platform().bus_master.as_ref().map(Cell::get), Some(false), "the last resort was taken");
        assert!(c.platform().rdy.get(), "the controller itself never stopped");
        assert_eq!(c.stats().leaked_regions, 0, "with bus mastering off its memory is freed");
        assert!(c.dma_stopped());
    }

    #[test]
    fn a_device_that_obeys_the_disable_is_reported_stopped() {
        let mut c = Controller::new(Stuck::new(false), config());
        assert_eq!(c.bring_up(), Err(NvmeError::Timeout));
        assert_eq!(c.stats().leaked_regions, 0);
        assert!(c.dma_stopped());
    }
}
