//! The controller model: registers, queues and command execution.
//!
//! Deliberately written from the NVMe specification without reusing the engine's encoders,
//! so a layout mistake on one side is not mirrored on the other. Commands run synchronously
//! when their SQ tail doorbell is written; completions go to the CQ at once (or wait in an
//! overflow list while the CQ is full, or in the held list when `Faults::hold_io` is on).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use crate::bus::Bus;
use crate::faults::{CqeMutation, Faults, Vanish};
use crate::media::SoftNs;

/// Geometry and identity of a software controller.
#[derive(Debug, Clone)]
pub struct SoftConfig {
    /// Maximum queue entries (CAP.MQES + 1).
    pub max_entries: u32,
    /// CAP.DSTRD.
    pub dstrd: u8,
    /// CAP.TO (500 ms units).
    pub to: u8,
    /// CAP.MPSMIN.
    pub mpsmin: u8,
    /// CAP.CSS.
    pub css: u8,
    /// MDTS (power of two of 4 KiB pages; 0 = unlimited).
    pub mdts: u8,
    /// Identify NN.
    pub nn: u32,
    /// I/O queue pairs the controller supports.
    pub max_io_queues: u16,
    /// AERL (0-based).
    pub aerl: u8,
    /// Namespaces: (nsid, lbads, blocks).
    pub namespaces: Vec<(u32, u8, u64)>,
    /// VS register.
    pub vs: u32,
    /// Whether the controller supports CNS 02h (NVMe 1.1+).
    pub active_list: bool,
}

impl Default for SoftConfig {
    fn default() -> Self {
        SoftConfig {
            max_entries: 1024,
            dstrd: 0,
            to: 20,
            mpsmin: 0,
            css: 1,
            mdts: 5, // 128 KiB: large requests get split
            nn: 16,
            max_io_queues: 4,
            aerl: 3,
            namespaces: vec![(1, 9, 1 << 21)], // 1 GiB of 512-byte blocks, sparse
            vs: 0x0001_0400,
            active_list: true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

#[derive(Debug, Clone)]
struct Cq {
    base: u64,
    size: u16,
    tail: u16,
    head: u16,
    phase: bool,
    overflow: VecDeque<Cqe>,
}

/// A completion entry as the device builds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Dword 0.
    pub dw0: u32,
    /// SQ head.
    pub sqhd: u16,
    /// SQ id.
    pub sqid: u16,
    /// CID.
    pub cid: u16,
    /// Status without phase.
    pub status: u16,
}

/// Counters of what the device did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevStats {
    /// Commands fetched from any SQ.
    pub commands: u64,
    /// Completions posted.
    pub completions: u64,
    /// Write commands that stored data.
    pub writes: u64,
    /// Read commands that returned data.
    pub reads: u64,
    /// DMA attempts outside live memory.
    pub dma_faults: u64,
    /// Shutdown notifications received.
    pub shutdowns: u64,
}

const fn st(sct: u16, sc: u16, dnr: bool) -> u16 {
    (sc << 1) | (sct << 9) | if dnr { 1 << 15 } else { 0 }
}
const OK: u16 = 0;
const INVALID_OPCODE: u16 = st(0, 0x01, true);
const INVALID_FIELD: u16 = st(0, 0x02, true);
const DATA_XFER_ERROR: u16 = st(0, 0x04, false);
const INVALID_NS: u16 = st(0, 0x0b, true);
const INVALID_PRP_OFFSET: u16 = st(0, 0x13, true);
const LBA_OUT_OF_RANGE: u16 = st(0, 0x80, true);
const INVALID_QID: u16 = st(1, 0x01, true);
const INVALID_QSIZE: u16 = st(1, 0x02, true);
const AER_LIMIT: u16 = st(1, 0x05, true);
const INVALID_QUEUE_DELETION: u16 = st(1, 0x0c, true);

const PAGE: u64 = 4096;

/// The controller state.
pub struct Device {
    pub(crate) bus: Rc<RefCell<Bus>>,
    pub(crate) cfg: SoftConfig,
    pub(crate) faults: Faults,
    pub(crate) namespaces: BTreeMap<u32, SoftNs>,
    pub(crate) stats: DevStats,
    pub(crate) accesses: u64,
    pub(crate) vanished: Option<Vanish>,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    granted_queues: u16,
    aer_cids: VecDeque<u16>,
    pending_events: VecDeque<u32>,
    ns_events_masked: bool,
    changed_ns: Vec<u32>,
    aec: u32,
    held: Vec<(u16, Cqe)>,
    /// Virtual time, as `SoftNvme::advance` last set it.
    now_us: u64,
    /// Admin completions held back by `Faults::admin_latency_us`: (due, sqid, cqid, cid, dw0,
    /// status).
    slow_admin: VecDeque<(u64, u16, u16, u16, u32, u16)>,
}

impl Device {
    /// A controller with `cfg`, disabled.
    pub fn new(bus: Rc<RefCell<Bus>>, cfg: SoftConfig) -> Device {
        let namespaces = cfg
            .namespaces
            .iter()
            .map(|&(id, lbads, blocks)| (id, SoftNs::new(id, lbads, blocks)))
            .collect();
        let nq = cfg.max_io_queues as usize + 1;
        Device {
            bus,
            cfg,
            faults: Faults::default(),
            namespaces,
            stats: DevStats::default(),
            accesses: 0,
            vanished: None,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: vec![None; nq],
            cqs: vec![None; nq],
            granted_queues: 0,
            aer_cids: VecDeque::new(),
            pending_events: VecDeque::new(),
            now_us: 0,
            slow_admin: VecDeque::new(),
            ns_events_masked: false,
            changed_ns: Vec::new(),
            aec: 0,
            held: Vec::new(),
        }
    }

    /// CAP as the device reports it.
    pub fn cap(&self) -> u64 {
        let c = &self.cfg;
        ((c.max_entries.clamp(1, 65536) - 1) as u64)
            | 1 << 16 // CQR
            | (c.to as u64) << 24
            | ((c.dstrd & 0xf) as u64) << 32
            | (c.css as u64) << 37
            | ((c.mpsmin & 0xf) as u64) << 48
    }

    /// Virtual time moved to `now`: answers the slow admin commands that are due.
    pub fn set_time(&mut self, now: u64) {
        self.now_us = now;
        while self.slow_admin.front().is_some_and(|c| c.0 <= now) {
            if let Some((_, sqid, cqid, cid, dw0, status)) = self.slow_admin.pop_front() {
                if self.vanished.is_none() && self.csts & 1 != 0 {
                    self.complete(sqid, cqid, cid, dw0, status);
                }
            }
        }
    }

    fn tick(&mut self) {
        self.accesses += 1;
        if self.vanished.is_none()
            && self
                .faults
                .vanish_at_access
                .is_some_and(|n| self.accesses >= n)
        {
            self.vanished = Some(self.faults.vanish_style);
        }
    }

    /// Register read.
    pub fn read32(&mut self, off: u32) -> u32 {
        self.tick();
        if let Some(v) = self.vanished {
            return if v == Vanish::AllOnes { u32::MAX } else { 0 };
        }
        let cap = self.cap();
        match off {
            0x00 => cap as u32,
            0x04 => (cap >> 32) as u32,
            0x08 => self.cfg.vs,
            0x14 => self.cc,
            0x1c => self.csts,
            0x24 => self.aqa,
            0x28 => self.asq as u32,
            0x2c => (self.asq >> 32) as u32,
            0x30 => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// Register write.
    pub fn write32(&mut self, off: u32, val: u32) {
        self.tick();
        if self.vanished.is_some() {
            return;
        }
        match off {
            0x14 => self.write_cc(val),
            0x24 => self.aqa = val,
            0x28 => self.asq = (self.asq & !0xffff_ffff) | val as u64,
            0x2c => self.asq = (self.asq & 0xffff_ffff) | (val as u64) << 32,
            0x30 => self.acq = (self.acq & !0xffff_ffff) | val as u64,
            0x34 => self.acq = (self.acq & 0xffff_ffff) | (val as u64) << 32,
            o if o >= 0x1000 => self.doorbell(o, val),
            _ => {}
        }
    }

    /// Sets CSTS bits from the test side (CFS).
    pub fn set_csts_bits(&mut self, bits: u32) {
        self.csts |= bits;
    }

    fn fatal(&mut self) {
        self.csts |= 2;
    }

    fn write_cc(&mut self, val: u32) {
        let was = self.cc & 1 != 0;
        let now = val & 1 != 0;
        let shn = (val >> 14) & 3;
        self.cc = val;
        if !was && now {
            self.enable();
        } else if was && !now {
            self.reset();
        }
        if shn != 0 && (self.csts >> 2) & 3 == 0 {
            self.stats.shutdowns += 1;
            let shst = if self.faults.shutdown_never_completes {
                1
            } else {
                2
            };
            self.csts = (self.csts & !0xc) | shst << 2;
        }
    }

    fn enable(&mut self) {
        let iosqes = (self.cc >> 16) & 0xf;
        let iocqes = (self.cc >> 20) & 0xf;
        let mps = (self.cc >> 7) & 0xf;
        let asqs = (self.aqa & 0xfff) as u16 + 1;
        let acqs = ((self.aqa >> 16) & 0xfff) as u16 + 1;
        if iosqes != 6
            || iocqes != 4
            || mps != 0
            || self.asq == 0
            || self.acq == 0
            || !self.asq.is_multiple_of(PAGE)
            || !self.acq.is_multiple_of(PAGE)
            || asqs < 2
            || acqs < 2
        {
            self.fatal();
            return;
        }
        self.sqs[0] = Some(Sq {
            base: self.asq,
            size: asqs,
            head: 0,
            tail: 0,
            cqid: 0,
        });
        self.cqs[0] = Some(Cq {
            base: self.acq,
            size: acqs,
            tail: 0,
            head: 0,
            phase: true,
            overflow: VecDeque::new(),
        });
        if !self.faults.never_ready {
            self.csts |= 1;
        }
    }

    fn reset(&mut self) {
        for q in self.sqs.iter_mut() {
            *q = None;
        }
        for q in self.cqs.iter_mut() {
            *q = None;
        }
        self.aer_cids.clear();
        self.held.clear();
        self.slow_admin.clear();
        self.granted_queues = 0;
        if !self.faults.never_disable {
            self.csts &= !(1 | 0xc);
        }
    }

    fn doorbell(&mut self, off: u32, val: u32) {
        let stride = 4u32 << self.cfg.dstrd;
        let rel = off - 0x1000;
        if !rel.is_multiple_of(stride) {
            return;
        }
        let idx = rel / stride;
        let qid = (idx / 2) as usize;
        if self.csts & 1 == 0 || self.csts & 2 != 0 {
            return;
        }
        if idx.is_multiple_of(2) {
            let Some(Some(sq)) = self.sqs.get_mut(qid) else {
                return;
            };
            if val >= sq.size as u32 {
                return; // invalid doorbell write: a real device posts an async error
            }
            sq.tail = val as u16;
            self.process_sq(qid as u16);
        } else {
            let Some(Some(cq)) = self.cqs.get_mut(qid) else {
                return;
            };
            if val >= cq.size as u32 {
                return;
            }
            cq.head = val as u16;
            self.flush_overflow(qid as u16);
        }
    }

    fn process_sq(&mut self, qid: u16) {
        // Bounded by the queue size: the tail cannot be more than size-1 ahead.
        for _ in 0..65536 {
            let Some(Some(sq)) = self.sqs.get(qid as usize).map(|s| s.as_ref().copied()) else {
                return;
            };
            if sq.head == sq.tail || self.vanished.is_some() || self.csts & 2 != 0 {
                return;
            }
            let mut raw = [0u8; 64];
            let addr = sq.base + sq.head as u64 * 64;
            if self.bus.borrow().dma_read(addr, &mut raw).is_err() {
                self.stats.dma_faults += 1;
                self.fatal();
                return;
            }
            if let Some(Some(s)) = self.sqs.get_mut(qid as usize) {
                s.head = (s.head + 1) % s.size;
            }
            self.stats.commands += 1;
            let cmd = Cmd::parse(&raw);
            let result = if qid == 0 {
                self.admin(&cmd)
            } else {
                self.io(&cmd)
            };
            let slow = qid == 0 && cmd.opcode != 0x0c && self.faults.admin_latency_us > 0;
            match result {
                Some((dw0, status)) if slow => {
                    let due = self.now_us.saturating_add(self.faults.admin_latency_us);
                    self.slow_admin.push_back((due, qid, sq.cqid, cmd.cid, dw0, status));
                }
                Some((dw0, status)) => self.complete(qid, sq.cqid, cmd.cid, dw0, status),
                None => {}
            }
        }
    }

    /// Posts the completion of `cid` from SQ `sqid` to CQ `cqid`.
    fn complete(&mut self, sqid: u16, cqid: u16, cid: u16, dw0: u32, status: u16) {
        let sqhd = match self.sqs.get(sqid as usize) {
            Some(Some(s)) => s.head,
            _ => 0,
        };
        let mut cqe = Cqe {
            dw0,
            sqhd,
            sqid,
            cid,
            status,
        };
        let admin = sqid == 0;
        let mut dup = false;
        if self
            .faults
            .cqe_mutations
            .front()
            .is_some_and(|m| m.admin == admin)
        {
            let m: CqeMutation = self.faults.cqe_mutations.pop_front().unwrap_or_default();
            cqe.cid = m.cid.unwrap_or(cqe.cid);
            cqe.sqid = m.sqid.unwrap_or(cqe.sqid);
            cqe.sqhd = m.sqhd.unwrap_or(cqe.sqhd);
            cqe.status = m.status.unwrap_or(cqe.status);
            dup = m.duplicate;
        }
        if !admin && self.faults.hold_io {
            self.held.push((cqid, cqe));
            if dup {
                self.held.push((cqid, cqe));
            }
            return;
        }
        self.post(cqid, cqe);
        if dup {
            self.post(cqid, cqe);
        }
    }

    fn post(&mut self, cqid: u16, cqe: Cqe) {
        let Some(Some(cq)) = self.cqs.get_mut(cqid as usize) else {
            return;
        };
        cq.overflow.push_back(cqe);
        self.flush_overflow(cqid);
    }

    fn flush_overflow(&mut self, cqid: u16) {
        let bus = self.bus.clone();
        let Some(Some(cq)) = self.cqs.get_mut(cqid as usize) else {
            return;
        };
        while (cq.tail + 1) % cq.size != cq.head {
            let Some(e) = cq.overflow.pop_front() else {
                break;
            };
            let mut b = [0u8; 16];
            b[0..4].copy_from_slice(&e.dw0.to_le_bytes());
            b[8..10].copy_from_slice(&e.sqhd.to_le_bytes());
            b[10..12].copy_from_slice(&e.sqid.to_le_bytes());
            b[12..14].copy_from_slice(&e.cid.to_le_bytes());
            let status = (e.status & !1) | cq.phase as u16;
            b[14..16].copy_from_slice(&status.to_le_bytes());
            if bus
                .borrow_mut()
                .dma_write(cq.base + cq.tail as u64 * 16, &b)
                .is_err()
            {
                self.stats.dma_faults += 1;
                self.csts |= 2;
                return;
            }
            self.stats.completions += 1;
            cq.tail += 1;
            if cq.tail == cq.size {
                cq.tail = 0;
                cq.phase = !cq.phase;
            }
        }
    }

    /// Posts an arbitrary completion entry to CQ `cqid` (fuzzing: the device invents it).
    pub fn inject(&mut self, cqid: u16, cqe: Cqe) {
        self.post(cqid, cqe);
    }

    /// Posts every held I/O completion.
    pub fn release_held(&mut self) {
        for (cqid, cqe) in std::mem::take(&mut self.held) {
            self.post(cqid, cqe);
        }
    }

    /// Number of held completions.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    // ---- DMA helpers -------------------------------------------------------------------

    /// The (address, length) segments a PRP pair describes for `len` bytes, or a status.
    fn prp_segments(&self, prp1: u64, prp2: u64, len: usize) -> Result<Vec<(u64, usize)>, u16> {
        if prp1 & 3 != 0 {
            return Err(INVALID_PRP_OFFSET);
        }
        let mut segs = Vec::new();
        let first = ((PAGE - prp1 % PAGE) as usize).min(len);
        segs.push((prp1, first));
        let mut rest = len - first;
        if rest == 0 {
            return Ok(segs);
        }
        if rest <= PAGE as usize {
            if !prp2.is_multiple_of(PAGE) {
                return Err(INVALID_PRP_OFFSET);
            }
            segs.push((prp2, rest));
            return Ok(segs);
        }
        // A PRP list; the engine never needs chaining (1 MiB max), but follow it anyway.
        let mut list = prp2;
        if list & 7 != 0 {
            return Err(INVALID_PRP_OFFSET);
        }
        while rest > 0 {
            let entries_left_in_page = ((PAGE - list % PAGE) / 8) as usize;
            let mut i = 0;
            while i < entries_left_in_page && rest > 0 {
                let mut e = [0u8; 8];
                if self
                    .bus
                    .borrow()
                    .dma_read(list + i as u64 * 8, &mut e)
                    .is_err()
                {
                    return Err(DATA_XFER_ERROR);
                }
                let entry = u64::from_le_bytes(e);
                let last_slot = i == entries_left_in_page - 1;
                if last_slot && rest > PAGE as usize {
                    list = entry; // chain pointer
                    if list & 7 != 0 {
                        return Err(INVALID_PRP_OFFSET);
                    }
                    break;
                }
                if entry % PAGE != 0 {
                    return Err(INVALID_PRP_OFFSET);
                }
                let n = rest.min(PAGE as usize);
                segs.push((entry, n));
                rest -= n;
                i += 1;
            }
        }
        Ok(segs)
    }

    fn dma_out(&mut self, segs: &[(u64, usize)], data: &[u8]) -> u16 {
        let mut off = 0;
        for &(a, n) in segs {
            if self
                .bus
                .borrow_mut()
                .dma_write(a, &data[off..off + n])
                .is_err()
            {
                self.stats.dma_faults += 1;
                return DATA_XFER_ERROR;
            }
            off += n;
        }
        OK
    }

    fn dma_in(&mut self, segs: &[(u64, usize)], data: &mut [u8]) -> u16 {
        let mut off = 0;
        for &(a, n) in segs {
            if self
                .bus
                .borrow()
                .dma_read(a, &mut data[off..off + n])
                .is_err()
            {
                self.stats.dma_faults += 1;
                return DATA_XFER_ERROR;
            }
            off += n;
        }
        OK
    }

    fn send_page(&mut self, cmd: &Cmd, page: &[u8], len: usize) -> u16 {
        let mut data = vec![0u8; len];
        let n = page.len().min(len);
        data[..n].copy_from_slice(&page[..n]);
        match self.prp_segments(cmd.prp1, cmd.prp2, len) {
            Ok(segs) => self.dma_out(&segs, &data),
            Err(s) => s,
        }
    }

    // ---- admin commands ----------------------------------------------------------------

    fn admin(&mut self, c: &Cmd) -> Option<(u32, u16)> {
        if c.opcode != 0x0c && self.faults.swallow_admin > 0 {
            self.faults.swallow_admin -= 1;
            return None;
        }
        let r = match c.opcode {
            0x06 => self.identify(c),
            0x09 => self.set_features(c),
            0x05 => self.create_cq(c),
            0x01 => self.create_sq(c),
            0x00 => self.delete_sq(c),
            0x04 => self.delete_cq(c),
            0x02 => self.get_log_page(c),
            0x08 => (1, OK), // Abort: "command not aborted"
            0x0c => return self.async_event(c),
            _ => (0, INVALID_OPCODE),
        };
        Some(r)
    }

    fn identify_ctrl_page(&self) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        d[2..4].copy_from_slice(&0x1af4u16.to_le_bytes());
        let pad = |s: &str, n: usize| {
            let mut v = s.as_bytes().to_vec();
            v.resize(n, b' ');
            v
        };
        d[4..24].copy_from_slice(&pad("SOFT0001", 20));
        d[24..64].copy_from_slice(&pad("softnvme in-process controller", 40));
        d[64..72].copy_from_slice(&pad("1.0", 8));
        d[77] = self.cfg.mdts;
        d[78..80].copy_from_slice(&1u16.to_le_bytes());
        d[80..84].copy_from_slice(&self.cfg.vs.to_le_bytes());
        d[259] = self.cfg.aerl;
        d[512] = 0x66;
        d[513] = 0x44;
        d[516..520].copy_from_slice(&self.cfg.nn.to_le_bytes());
        d[525] = 1;
        d
    }

    fn identify_ns_page(&self, ns: &SoftNs) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[0..8].copy_from_slice(&ns.blocks.to_le_bytes());
        d[8..16].copy_from_slice(&ns.blocks.to_le_bytes());
        d[16..24].copy_from_slice(&ns.blocks.to_le_bytes());
        d[25] = 1; // two formats: 512 and 4096
        d[26] = if ns.lbads == 9 { 0 } else { 1 };
        d[128 + 2] = 9;
        d[132 + 2] = 12;
        if ns.lbads != 9 && ns.lbads != 12 {
            d[132 + 2] = ns.lbads;
        }
        d
    }

    fn identify(&mut self, c: &Cmd) -> (u32, u16) {
        let page = match c.cdw10 & 0xff {
            0x01 => self
                .faults
                .identify_ctrl
                .clone()
                .unwrap_or_else(|| self.identify_ctrl_page()),
            0x00 => {
                if c.nsid == 0 || c.nsid > self.cfg.nn {
                    return (0, INVALID_NS);
                }
                if let Some(p) = self.faults.identify_ns.get(&c.nsid) {
                    p.clone()
                } else {
                    match self.namespaces.get(&c.nsid) {
                        Some(ns) => self.identify_ns_page(ns),
                        None => vec![0u8; 4096], // allocated-but-inactive looks all zero
                    }
                }
            }
            0x02 if self.cfg.active_list => {
                if let Some(p) = &self.faults.active_list {
                    p.clone()
                } else {
                    let mut d = vec![0u8; 4096];
                    for (i, id) in self
                        .namespaces
                        .keys()
                        .filter(|&&id| id > c.nsid)
                        .take(1024)
                        .enumerate()
                    {
                        d[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                    }
                    d
                }
            }
            _ => return (0, INVALID_FIELD),
        };
        (0, self.send_page(c, &page, 4096))
    }

    fn set_features(&mut self, c: &Cmd) -> (u32, u16) {
        match c.cdw10 & 0xff {
            0x07 => {
                let want_sq = (c.cdw11 & 0xffff) + 1;
                let want_cq = (c.cdw11 >> 16) + 1;
                if want_sq == 0x10000 || want_cq == 0x10000 {
                    return (0, INVALID_FIELD);
                }
                let max = self.cfg.max_io_queues as u32;
                let n = want_sq.min(want_cq).min(max).max(1);
                self.granted_queues = n as u16;
                let dw0 = self
                    .faults
                    .grant_queues
                    .unwrap_or((max - 1) | (max - 1) << 16);
                (dw0, OK)
            }
            0x0b => {
                self.aec = c.cdw11;
                (0, OK)
            }
            _ => (0, INVALID_FIELD),
        }
    }

    fn create_cq(&mut self, c: &Cmd) -> (u32, u16) {
        let qid = (c.cdw10 & 0xffff) as usize;
        let size = (c.cdw10 >> 16) + 1;
        if qid == 0
            || qid > self.granted_queues as usize
            || qid >= self.cqs.len()
            || self.cqs[qid].is_some()
        {
            return (0, INVALID_QID);
        }
        if size < 2 || size > self.cfg.max_entries {
            return (0, INVALID_QSIZE);
        }
        if c.cdw11 & 1 == 0 || !c.prp1.is_multiple_of(PAGE) {
            return (0, INVALID_FIELD);
        }
        self.cqs[qid] = Some(Cq {
            base: c.prp1,
            size: size as u16,
            tail: 0,
            head: 0,
            phase: true,
            overflow: VecDeque::new(),
        });
        (0, OK)
    }

    fn create_sq(&mut self, c: &Cmd) -> (u32, u16) {
        let qid = (c.cdw10 & 0xffff) as usize;
        let size = (c.cdw10 >> 16) + 1;
        let cqid = (c.cdw11 >> 16) as usize;
        if qid == 0
            || qid > self.granted_queues as usize
            || qid >= self.sqs.len()
            || self.sqs[qid].is_some()
        {
            return (0, INVALID_QID);
        }
        if cqid == 0 || cqid >= self.cqs.len() || self.cqs[cqid].is_none() {
            return (0, st(1, 0x00, true)); // Completion Queue Invalid
        }
        if size < 2 || size > self.cfg.max_entries {
            return (0, INVALID_QSIZE);
        }
        if c.cdw11 & 1 == 0 || !c.prp1.is_multiple_of(PAGE) {
            return (0, INVALID_FIELD);
        }
        self.sqs[qid] = Some(Sq {
            base: c.prp1,
            size: size as u16,
            head: 0,
            tail: 0,
            cqid: cqid as u16,
        });
        (0, OK)
    }

    fn delete_sq(&mut self, c: &Cmd) -> (u32, u16) {
        let qid = (c.cdw10 & 0xffff) as usize;
        if qid == 0 || qid >= self.sqs.len() || self.sqs[qid].is_none() {
            return (0, INVALID_QID);
        }
        self.sqs[qid] = None;
        self.held.retain(|(_, e)| e.sqid as usize != qid);
        (0, OK)
    }

    fn delete_cq(&mut self, c: &Cmd) -> (u32, u16) {
        let qid = (c.cdw10 & 0xffff) as usize;
        if qid == 0 || qid >= self.cqs.len() || self.cqs[qid].is_none() {
            return (0, INVALID_QID);
        }
        if self.sqs.iter().flatten().any(|s| s.cqid as usize == qid) {
            return (0, INVALID_QUEUE_DELETION);
        }
        self.cqs[qid] = None;
        (0, OK)
    }

    fn get_log_page(&mut self, c: &Cmd) -> (u32, u16) {
        let lid = c.cdw10 & 0xff;
        let numd = ((c.cdw10 >> 16) | (c.cdw11 & 0xffff) << 16) as usize + 1;
        let len = numd * 4;
        if len > 4096 {
            return (0, INVALID_FIELD);
        }
        let page = match lid {
            0x01 | 0x02 => vec![0u8; 4096],
            0x04 => {
                let mut d = vec![0u8; 4096];
                if self.changed_ns.len() > 1024 {
                    d[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
                } else {
                    for (i, id) in self.changed_ns.iter().enumerate() {
                        d[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                    }
                }
                if (c.cdw10 >> 15) & 1 == 0 {
                    self.changed_ns.clear();
                    self.ns_events_masked = false;
                }
                d
            }
            _ => return (0, INVALID_FIELD),
        };
        (0, self.send_page(c, &page, len))
    }

    fn async_event(&mut self, c: &Cmd) -> Option<(u32, u16)> {
        if self.aer_cids.len() > self.cfg.aerl as usize {
            return Some((0, AER_LIMIT));
        }
        if let Some(ev) = self.pending_events.pop_front() {
            return Some((ev, OK));
        }
        self.aer_cids.push_back(c.cid);
        None
    }

    /// Raises an asynchronous event (completes an outstanding AER, or queues the event).
    pub fn raise_event(&mut self, dw0: u32) {
        match self.aer_cids.pop_front() {
            Some(cid) => self.complete(0, 0, cid, dw0, OK),
            None => self.pending_events.push_back(dw0),
        }
    }

    /// Attaches a namespace and raises Namespace Attribute Changed (if enabled and unmasked).
    pub fn attach_namespace(&mut self, ns: SoftNs) {
        let id = ns.nsid;
        self.namespaces.insert(id, ns);
        self.ns_changed(id);
    }

    /// Detaches a namespace (see [`Device::attach_namespace`]).
    pub fn detach_namespace(&mut self, nsid: u32) {
        if self.namespaces.remove(&nsid).is_some() {
            self.ns_changed(nsid);
        }
    }

    fn ns_changed(&mut self, nsid: u32) {
        if !self.changed_ns.contains(&nsid) {
            self.changed_ns.push(nsid);
        }
        if self.aec & (1 << 8) != 0 && !self.ns_events_masked {
            self.ns_events_masked = true;
            self.raise_event(0x0004_0002); // notice, NS attribute changed, log page 04h
        }
    }

    // ---- I/O commands ------------------------------------------------------------------

    fn io(&mut self, c: &Cmd) -> Option<(u32, u16)> {
        if self.faults.swallow_io > 0 {
            self.faults.swallow_io -= 1;
            return None;
        }
        let Some(ns) = self.namespaces.get(&c.nsid) else {
            return Some((0, INVALID_NS));
        };
        let (lbads, nsze) = (ns.lbads, ns.blocks);
        let status = match c.opcode {
            0x00 => OK,
            0x01 | 0x02 => {
                let slba = c.cdw10 as u64 | (c.cdw11 as u64) << 32;
                let nlb = (c.cdw12 & 0xffff) as u64 + 1;
                let len = (nlb << lbads) as usize;
                let mdts_bytes = if self.cfg.mdts == 0 {
                    usize::MAX
                } else {
                    (PAGE as usize) << self.cfg.mdts
                };
                if len > mdts_bytes {
                    INVALID_FIELD
                } else if slba.checked_add(nlb).is_none_or(|end| end > nsze) {
                    LBA_OUT_OF_RANGE
                } else {
                    match self.prp_segments(c.prp1, c.prp2, len) {
                        Err(s) => s,
                        Ok(segs) => {
                            let mut data = vec![0u8; len];
                            if c.opcode == 0x01 {
                                let s = self.dma_in(&segs, &mut data);
                                if s == OK && !self.faults.drop_writes {
                                    if let Some(ns) = self.namespaces.get_mut(&c.nsid) {
                                        ns.write(slba, &data);
                                    }
                                }
                                self.stats.writes += (s == OK) as u64;
                                s
                            } else {
                                if let Some(ns) = self.namespaces.get(&c.nsid) {
                                    ns.read(slba, &mut data);
                                }
                                let s = self.dma_out(&segs, &data);
                                self.stats.reads += (s == OK) as u64;
                                s
                            }
                        }
                    }
                }
            }
            _ => INVALID_OPCODE,
        };
        Some((0, status))
    }
}

/// The fields of a submission entry the device uses.
struct Cmd {
    opcode: u8,
    cid: u16,
    nsid: u32,
    prp1: u64,
    prp2: u64,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
}

impl Cmd {
    fn parse(b: &[u8; 64]) -> Cmd {
        let dw =
            |i: usize| u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        Cmd {
            opcode: b[0],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: dw(1),
            prp1: dw(6) as u64 | (dw(7) as u64) << 32,
            prp2: dw(8) as u64 | (dw(9) as u64) << 32,
            cdw10: dw(10),
            cdw11: dw(11),
            cdw12: dw(12),
        }
    }
}
