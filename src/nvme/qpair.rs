//! One submission/completion ring pair: phase tag, doorbells (with CAP.DSTRD) and the command
//! identifier (CID) tracker table.
//!
//! The CID is the index of the command's tracker slot, so a completion is matched in O(1) and
//! a CID the device makes up is caught by a bounds check plus an "is it outstanding" check.
//! There are `entries - 1` slots: a ring of N entries holds at most N-1 commands. That alone
//! keeps the SQ from overflowing: the controller fetches entries in order, so the entries it
//! has not fetched yet are a subset of the outstanding commands, at most N-1, and the slot at
//! the tail is always free. The SQ head reported in completions is therefore only checked
//! and recorded (a stale or nonsensical one is counted), never needed for flow control.

use alloc::vec::Vec;

use super::cmd::{Cqe, Sqe, CQE_SIZE, SQE_SIZE};
use super::error::NvmeError;
use crate::fallible::{push_within_capacity, try_collect};
use super::regs::Cap;
use crate::platform::{DmaAllocator, DmaRegion, RegisterIo};

/// What the engine remembers about one outstanding command.
#[derive(Debug)]
pub struct Tracker<T> {
    /// Who the command belongs to.
    pub owner: T,
    /// Clock time after which the command is overdue (`u64::MAX`: never, e.g. an AER).
    pub deadline_us: u64,
}

/// Why a completion entry was rejected.
pub type BadCqe = &'static str;

/// A submission queue and the completion queue it posts to (same queue ID).
pub struct QueuePair<R: DmaRegion, T> {
    qid: u16,
    entries: u16,
    sq: R,
    cq: R,
    sq_db: u32,
    cq_db: u32,
    sq_tail: u16,
    /// Last SQ head the device reported.
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    /// Entries pushed since the last doorbell write.
    unrung: bool,
    slots: Vec<Option<Tracker<T>>>,
    free: Vec<u16>,
    ignored_sqhd: u64,
}

impl<R: DmaRegion, T> QueuePair<R, T> {
    /// Allocates the rings of queue `qid` with `entries` (2..=65536 is the caller's job;
    /// checked again here) entries each.
    pub fn new<A>(alloc: &A, cap: &Cap, qid: u16, entries: u16) -> Result<Self, NvmeError>
    where
        A: DmaAllocator<Region = R>,
    {
        if entries < 2 {
            return Err(NvmeError::InvalidRequest(
                "a queue needs at least 2 entries",
            ));
        }
        let sq_db = cap.sq_tail_doorbell(qid).ok_or(NvmeError::BadDevice(
            "CAP.DSTRD puts a doorbell outside BAR0",
        ))?;
        let cq_db = cap.cq_head_doorbell(qid).ok_or(NvmeError::BadDevice(
            "CAP.DSTRD puts a doorbell outside BAR0",
        ))?;
        let n = entries as usize;
        let sq = alloc
            .alloc_dma(n * SQE_SIZE, 4096)
            .map_err(|_| NvmeError::NoMemory)?;
        let cq = alloc
            .alloc_dma(n * CQE_SIZE, 4096)
            .map_err(|_| NvmeError::NoMemory)?;
        if sq.len() < n * SQE_SIZE || cq.len() < n * CQE_SIZE {
            return Err(NvmeError::NoMemory);
        }
        let slots = try_collect((0..n - 1).map(|_| None)).map_err(|_| NvmeError::OutOfMemory("a queue's command table"))?;
        // Hand out low CIDs first (pop from the end).
        let free = try_collect((0..entries - 1).rev()).map_err(|_| NvmeError::OutOfMemory("a queue's command table"))?;
        Ok(QueuePair {
            qid,
            entries,
            sq,
            cq,
            sq_db,
            cq_db,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            unrung: false,
            slots,
            free,
            ignored_sqhd: 0,
        })
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Ring size.
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// Most commands that can be outstanding at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
    /// Bus address of the submission ring.
    pub fn sq_addr(&self) -> u64 {
        self.sq.bus_addr()
    }
    /// Bus address of the completion ring.
    pub fn cq_addr(&self) -> u64 {
        self.cq.bus_addr()
    }
    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn sq_used(&self) -> u16 {
        ((self.sq_tail as u32 + self.entries as u32 - self.sq_head as u32) % self.entries as u32)
            as u16
    }

    /// True when `n` more commands fit (see the module comment for why free CIDs suffice).
    pub fn has_room(&self, n: usize) -> bool {
        self.free.len() >= n
    }

    /// Writes `sqe` into the ring with a fresh CID. Call [`QueuePair::ring`] afterwards; the
    /// device sees nothing before the doorbell.
    pub fn push(&mut self, mut sqe: Sqe, owner: T, deadline_us: u64) -> Result<u16, NvmeError> {
        if !self.has_room(1) {
            return Err(NvmeError::QueueFull);
        }
        let cid = self.free.pop().ok_or(NvmeError::QueueFull)?;
        sqe.set_cid(cid);
        self.sq
            .write(self.sq_tail as usize * SQE_SIZE, &sqe.to_bytes());
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        self.slots[cid as usize] = Some(Tracker { owner, deadline_us });
        self.unrung = true;
        Ok(cid)
    }

    /// Publishes pushed entries with one tail doorbell write.
    pub fn ring<P: RegisterIo>(&mut self, regs: &P) {
        if self.unrung {
            self.unrung = false;
            regs.write32(self.sq_db, self.sq_tail as u32);
        }
    }

    /// Takes the next completion entry if the device has posted one (phase tag matches).
    ///
    /// `Some(Ok(..))` is a validated completion whose tracker is released; `Some(Err(..))` is
    /// an entry that failed validation: it is consumed (so the ring moves on) but no tracker
    /// is touched. `None`: nothing new. Call [`QueuePair::finish_reap`] after the last one.
    pub fn next_completion(&mut self) -> Option<Result<(Cqe, Tracker<T>), BadCqe>> {
        let off = self.cq_head as usize * CQE_SIZE;
        // Read the dword holding the phase tag first, the rest only once it says "new": the
        // device writes the entry before it flips the phase.
        let dw3 = self.cq.read_u32(off + 12);
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        let mut b = [0u8; CQE_SIZE];
        self.cq.read(off, &mut b);
        let mut cqe = Cqe::from_bytes(&b);
        cqe.cid = dw3 as u16;
        cqe.status = (dw3 >> 16) as u16;
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(self.validate(&cqe).map(|t| (cqe, t)))
    }

    fn validate(&mut self, cqe: &Cqe) -> Result<Tracker<T>, BadCqe> {
        if cqe.sqid != self.qid {
            return Err("completion names another submission queue");
        }
        if cqe.sqhd >= self.entries {
            return Err("SQ head beyond the queue size");
        }
        let slot = self
            .slots
            .get_mut(cqe.cid as usize)
            .ok_or("CID out of range")?;
        let tracker = slot
            .take()
            .ok_or("CID not outstanding (duplicate or invented)")?;
        let _ = push_within_capacity(&mut self.free, cqe.cid); // room for every CID
        // The head may only move forward, and not past the tail. A value outside that window
        // (a stale head, or nonsense) is not recorded, but it does not void an otherwise
        // valid completion: flow control does not depend on it (the CID count bounds the
        // queue), while rejecting the entry would turn a quirk into a timeout and a lost
        // controller.
        let advance =
            (cqe.sqhd as u32 + self.entries as u32 - self.sq_head as u32) % self.entries as u32;
        if advance <= self.sq_used() as u32 {
            self.sq_head = cqe.sqhd;
        } else {
            self.ignored_sqhd += 1;
        }
        Ok(tracker)
    }

    /// Completions whose SQ head was outside the valid window (and so was not used).
    pub fn ignored_sqhd(&self) -> u64 {
        self.ignored_sqhd
    }

    /// Tells the device how far we have consumed the completion ring.
    pub fn finish_reap<P: RegisterIo>(&mut self, regs: &P, consumed: bool) {
        if consumed {
            regs.write32(self.cq_db, self.cq_head as u32);
        }
    }

    /// Removes every outstanding tracker (after the controller was stopped or lost). Tests only:
    /// the driver uses [`QueuePair::take_each`], which allocates nothing.
    #[cfg(test)]
    pub fn take_all(&mut self) -> Vec<Tracker<T>> {
        let mut out = Vec::new();
        self.take_each(|t| out.push(t));
        out
    }

    /// Removes every outstanding tracker, handing each to `f`. Allocates nothing (the free
    /// list has room for every CID), so it may run under a lock that forbids sleeping.
    pub fn take_each(&mut self, mut f: impl FnMut(Tracker<T>)) {
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            if let Some(t) = slot.take() {
                f(t);
                let _ = push_within_capacity(&mut self.free, cid as u16); // room for every CID
            }
        }
    }

    /// Earliest deadline among outstanding commands (`u64::MAX` when none).
    pub fn earliest_deadline(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .map(|t| t.deadline_us)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Gives the ring memory back (only once the device can no longer use it).
    pub fn into_regions(self) -> (R, R) {
        (self.sq, self.cq)
    }

    /// Iterates over outstanding trackers.
    pub fn trackers(&self) -> impl Iterator<Item = &Tracker<T>> {
        self.slots.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::AllocError;
    use core::cell::{Cell, RefCell};
    use std::rc::Rc;

    struct Mem {
        bytes: Rc<RefCell<Vec<u8>>>,
        addr: u64,
    }
    impl DmaRegion for Mem {
        fn bus_addr(&self) -> u64 {
            self.addr
        }
        fn len(&self) -> usize {
            self.bytes.borrow().len()
        }
        fn read(&self, off: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.bytes.borrow()[off..off + buf.len()]);
        }
        fn write(&self, off: usize, buf: &[u8]) {
            self.bytes.borrow_mut()[off..off + buf.len()].copy_from_slice(buf);
        }
    }

    /// Allocator keeping a handle on every region, so the test can play the device.
    #[derive(Default)]
    struct Host {
        regions: RefCell<Vec<Rc<RefCell<Vec<u8>>>>>,
        doorbells: RefCell<Vec<(u32, u32)>>,
        next: Cell<u64>,
    }
    impl DmaAllocator for Host {
        type Region = Mem;
        fn alloc_dma(&self, len: usize, _align: usize) -> Result<Mem, AllocError> {
            let bytes = Rc::new(RefCell::new(alloc::vec![0u8; len]));
            self.regions.borrow_mut().push(bytes.clone());
            let addr = 0x10_0000 + self.next.get();
            self.next.set(self.next.get() + 0x10_0000);
            Ok(Mem { bytes, addr })
        }
    }
    impl RegisterIo for Host {
        fn read32(&self, _off: u32) -> u32 {
            0
        }
        fn write32(&self, off: u32, val: u32) {
            self.doorbells.borrow_mut().push((off, val));
        }
    }

    fn post(host: &Host, slot: usize, cqe: Cqe, phase: bool) {
        let mut c = cqe;
        c.status = (c.status & !1) | phase as u16;
        let cq = host.regions.borrow()[1].clone();
        cq.borrow_mut()[slot * CQE_SIZE..(slot + 1) * CQE_SIZE].copy_from_slice(&c.to_bytes());
    }

    fn queue(host: &Host, entries: u16) -> QueuePair<Mem, u32> {
        let cap = Cap::decode(0x0040_0820_0f01_07ff);
        QueuePair::new(host, &cap, 1, entries).unwrap()
    }

    #[test]
    fn submit_ring_and_reap() {
        let host = Host::default();
        let mut q = queue(&host, 4);
        assert_eq!(q.capacity(), 3);
        let cid = q.push(Sqe::new(2, 1), 7, 100).unwrap();
        assert!(
            host.doorbells.borrow().is_empty(),
            "nothing is visible before the doorbell"
        );
        q.ring(&host);
        assert_eq!(*host.doorbells.borrow(), [(0x1008, 1)]);
        assert!(
            q.next_completion().is_none(),
            "no entry with the current phase yet"
        );
        post(
            &host,
            0,
            Cqe {
                sqid: 1,
                sqhd: 1,
                cid,
                ..Cqe::default()
            },
            true,
        );
        let (cqe, t) = q.next_completion().unwrap().unwrap();
        assert_eq!((cqe.cid, t.owner), (cid, 7));
        q.finish_reap(&host, true);
        assert_eq!(host.doorbells.borrow()[1], (0x100c, 1));
        assert_eq!(q.outstanding(), 0);
    }

    #[test]
    fn rejects_bad_entries_without_touching_trackers() {
        let host = Host::default();
        let mut q = queue(&host, 8);
        let cid = q.push(Sqe::new(2, 1), 1, 100).unwrap();
        q.ring(&host);
        let bad = [
            (
                Cqe {
                    sqid: 2,
                    sqhd: 1,
                    cid,
                    ..Cqe::default()
                },
                "completion names another submission queue",
            ),
            (
                Cqe {
                    sqid: 1,
                    sqhd: 8,
                    cid,
                    ..Cqe::default()
                },
                "SQ head beyond the queue size",
            ),
            (
                Cqe {
                    sqid: 1,
                    sqhd: 1,
                    cid: 7,
                    ..Cqe::default()
                },
                "CID out of range",
            ),
            (
                Cqe {
                    sqid: 1,
                    sqhd: 1,
                    cid: cid + 1,
                    ..Cqe::default()
                },
                "CID not outstanding (duplicate or invented)",
            ),
        ];
        for (i, (cqe, why)) in bad.iter().enumerate() {
            post(&host, i, *cqe, true);
            assert_eq!(q.next_completion().unwrap().unwrap_err(), *why);
            assert_eq!(q.outstanding(), 1);
        }
        // A head past the tail is not used, but the completion itself is valid.
        post(
            &host,
            4,
            Cqe {
                sqid: 1,
                sqhd: 2,
                cid,
                ..Cqe::default()
            },
            true,
        );
        assert!(q.next_completion().unwrap().is_ok());
        assert_eq!(q.ignored_sqhd(), 1);
        assert!(q.has_room(7), "the CID was freed");
        post(
            &host,
            5,
            Cqe {
                sqid: 1,
                sqhd: 1,
                cid,
                ..Cqe::default()
            },
            true,
        );
        assert!(
            q.next_completion().unwrap().is_err(),
            "a duplicate is rejected"
        );
    }

    #[test]
    fn phase_flips_on_wrap_and_room_is_bounded() {
        let host = Host::default();
        let mut q = queue(&host, 2);
        for round in 0..5u16 {
            assert!(q.has_room(1));
            let cid = q.push(Sqe::new(2, 1), 0, 0).unwrap();
            assert!(!q.has_room(1), "a 2-entry ring holds one command");
            assert_eq!(
                q.push(Sqe::new(2, 1), 0, 0).unwrap_err(),
                NvmeError::QueueFull
            );
            q.ring(&host);
            let slot = (round % 2) as usize;
            let phase = (round / 2) % 2 == 0;
            // A stale entry from the previous lap (old phase) is not new.
            post(
                &host,
                slot,
                Cqe {
                    sqid: 1,
                    sqhd: (round + 1) % 2,
                    cid,
                    ..Cqe::default()
                },
                !phase,
            );
            assert!(q.next_completion().is_none());
            post(
                &host,
                slot,
                Cqe {
                    sqid: 1,
                    sqhd: (round + 1) % 2,
                    cid,
                    ..Cqe::default()
                },
                phase,
            );
            assert!(q.next_completion().unwrap().is_ok(), "round {round}");
        }
    }

    #[test]
    fn take_all_frees_every_slot() {
        let host = Host::default();
        let mut q = queue(&host, 8);
        for i in 0..5 {
            q.push(Sqe::new(2, 1), i, i as u64 + 10).unwrap();
        }
        assert_eq!(q.earliest_deadline(), 10);
        let all = q.take_all();
        assert_eq!(all.len(), 5);
        assert_eq!(q.outstanding(), 0);
        assert_eq!(q.earliest_deadline(), u64::MAX);
    }

    #[test]
    fn doorbell_outside_bar0_is_refused() {
        let host = Host::default();
        let cap = Cap::decode(0xf_0000_0000 | 0x1_07ff | 0x20 << 32);
        assert!(matches!(
            QueuePair::<Mem, u32>::new(&host, &cap, 1, 4),
            Err(NvmeError::BadDevice(_))
        ));
    }
}
