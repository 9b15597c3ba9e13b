//! A minimal NVMe controller behind the fake kernel's `bus_read_4`/`bus_write_4`, so host tests
//! can bring the real engine up inside the real glue (`CtrlShared`, `d_strategy`, teardown) and
//! keep I/O in flight. DMA addresses are host pointers (the fake `pmap_kextract` is the
//! identity), so the model reads commands and writes data and completions in place.
//!
//! Only what bring-up and one I/O queue need: CAP/VS/CC/CSTS, the admin queue (Identify
//! controller, active list and namespace; Set Features; create/delete queues; an AER that is
//! held), and I/O commands that are either completed at once or held as in flight. Reads and
//! writes move data through their PRP1/PRP2/PRP list (each entry after the first checked to be
//! page aligned) to and from a media whose unwritten blocks read as [`FakeNvme::fill`]. `stuck` makes it a present device that ignores
//! the shutdown notification and the disable, i.e. one that may still DMA after being failed.
//!
//! What a stop does to the device goes into the fake kernel's log, in order, among the
//! `mtx_lock`/`pause` entries: `nvme delete_sq qid=N status=S`, `nvme delete_cq ...`,
//! `nvme cc shn` (normal shutdown notification) and `nvme cc disable` (CC.EN 1 -> 0). Like a
//! real controller, the model refuses to delete a CQ while its SQ exists (Invalid Queue
//! Deletion) and a queue that does not exist (Invalid Queue Identifier).

use std::format;
use std::vec::Vec;

const CC: u32 = 0x14;
const CSTS: u32 = 0x1c;
const AQA: u32 = 0x24;
const ASQ: u32 = 0x28;
const ACQ: u32 = 0x30;
/// One namespace of 2048 blocks of 512 bytes.
pub const NS_BLOCKS: u64 = 2048;

/// One queue as the device sees it.
#[derive(Default, Clone, Copy)]
struct Ring {
    sq: u64,
    cq: u64,
    entries: u16,
    sq_head: u16,
    cq_tail: u16,
    phase: bool,
}

/// The device model.
pub struct FakeNvme {
    /// Ignores CC.SHN and CC.EN = 0: CSTS.RDY stays set, SHST never completes.
    pub stuck: bool,
    /// Hold I/O commands instead of completing them.
    pub hold_io: bool,
    /// The byte a completed read fills its buffer with.
    pub fill: u8,
    /// I/O commands accepted and not completed: (CID, PRP1).
    pub held: Vec<(u16, u64)>,
    /// A normal shutdown notification (CC.SHN = 01b) arrived while the device was enabled.
    pub shutdown_notified: bool,
    /// Admin commands taken from the ring since the model was made.
    pub admin_commands: u32,
    /// How long after CC.EN = 1 CSTS.RDY rises, in the fake kernel's clock
    /// ([`start_clock`](super::fake_kernel::start_clock)): `None` at once, `Some(u64::MAX)`
    /// never (a controller that never becomes ready).
    pub ready_after_us: Option<u64>,
    /// When CSTS.RDY rises (clock time), while an enable is pending.
    rdy_at: Option<u64>,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    admin: Ring,
    io: Ring,
    /// I/O queue 1's SQ and CQ exist (created, not deleted).
    io_sq_live: bool,
    io_cq_live: bool,
    /// Blocks written (by LBA); the others read as `fill`.
    media: std::collections::BTreeMap<u64, [u8; 512]>,
    /// I/O commands completed so far.
    pub io_completed: u64,
    /// The held commands themselves, for [`FakeNvme::release_held`].
    held_sqes: Vec<[u8; 64]>,
}

/// Status field values (SCT << 8 | SC) the model answers queue deletions with.
const SC_INVALID_QID: u16 = 1 << 8 | 0x01;
const SC_INVALID_QUEUE_DELETION: u16 = 1 << 8 | 0x0c;

fn read_mem(addr: u64, buf: &mut [u8]) {
    // SAFETY: `addr` is a bus address the engine gave the device: a live host allocation from
    // the fake contigmalloc (identity pmap_kextract) of at least the length the command names.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) }
}

fn write_mem(addr: u64, buf: &[u8]) {
    // SAFETY: as read_mem.
    unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, buf.len()) }
}

fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
}

impl FakeNvme {
    /// A healthy device that holds I/O (`hold_io`) or completes it.
    pub fn new(stuck: bool, hold_io: bool) -> FakeNvme {
        FakeNvme {
            stuck,
            hold_io,
            fill: 0xab,
            held: Vec::new(),
            shutdown_notified: false,
            admin_commands: 0,
            ready_after_us: None,
            rdy_at: None,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            admin: Ring::default(),
            io: Ring::default(),
            io_sq_live: false,
            io_cq_live: false,
            media: std::collections::BTreeMap::new(),
            io_completed: 0,
            held_sqes: Vec::new(),
        }
    }

    /// The bus addresses of the `len` bytes a command's PRP1/PRP2 describe, page by page
    /// (NVMe 1.4 §4.3): PRP1 to the end of its page; then PRP2 as a page, or as a pointer to
    /// a list of page addresses. Entries after the first must be page aligned, or the model
    /// panics (the test fails): a wrong PRP is a driver bug.
    fn prp_pages(prp1: u64, prp2: u64, len: usize) -> Vec<(u64, usize)> {
        let first = (4096 - (prp1 % 4096) as usize).min(len);
        let mut out = std::vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return out;
        }
        let entries: Vec<u64> = if left <= 4096 {
            std::vec![prp2]
        } else {
            let n = left.div_ceil(4096);
            let mut list = std::vec![0u8; n * 8];
            read_mem(prp2, &mut list);
            list.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
        };
        for a in entries {
            assert_eq!(a % 4096, 0, "PRP entry {a:#x} after the first is not page aligned");
            let n = left.min(4096);
            out.push((a, n));
            left -= n;
        }
        out
    }

    /// What the media holds at `lba`.
    pub fn media_block(&self, lba: u64) -> [u8; 512] {
        self.media.get(&lba).copied().unwrap_or([self.fill; 512])
    }

    /// A 32-bit register read.
    pub fn read32(&self, off: u32) -> u32 {
        match off {
            0x00 => 63 | 1 << 24, // MQES 63, TO 500 ms
            0x04 => 1 << 5,       // CSS: NVM
            0x08 => 0x0001_0400,  // 1.4
            CC => self.cc,
            CSTS => self.csts | u32::from(self.rdy_at.is_some_and(|t| super::fake_kernel::clock_us() >= t)),
            AQA => self.aqa,
            _ => 0,
        }
    }

    /// A 32-bit register write.
    pub fn write32(&mut self, off: u32, val: u32) {
        match off {
            CC => self.set_cc(val),
            AQA => self.aqa = val,
            ASQ => self.asq = (self.asq & !0xffff_ffff) | u64::from(val),
            0x2c => self.asq = (self.asq & 0xffff_ffff) | u64::from(val) << 32,
            ACQ => self.acq = (self.acq & !0xffff_ffff) | u64::from(val),
            0x34 => self.acq = (self.acq & 0xffff_ffff) | u64::from(val) << 32,
            0x1000 => {
                self.run_admin(val as u16);
            }
            0x1008 => self.run_io(val as u16),
            // Interrupt Mask Set: recorded (the model raises no pin-based interrupt).
            0x0c => super::fake_kernel::record(format!("nvme intms {val:#x}")),
            _ => {}
        }
    }

    fn set_cc(&mut self, val: u32) {
        let was = self.cc & 1 != 0;
        self.cc = val;
        if was && val & (3 << 14) == 1 << 14 {
            self.shutdown_notified = true;
            super::fake_kernel::record("nvme cc shn");
        }
        if was && val & 1 == 0 {
            super::fake_kernel::record("nvme cc disable");
        }
        if self.stuck && was {
            return; // neither disable nor shutdown takes effect
        }
        if val & (3 << 14) != 0 {
            self.csts = (self.csts & !(3 << 2)) | (2 << 2); // SHST: complete
        }
        match (was, val & 1 != 0) {
            (false, true) => {
                // The admin queues come into being here (the admin CQ on vector 0).
                super::fake_kernel::record("nvme cc enable");
                let n = (self.aqa & 0xfff) as u16 + 1;
                self.admin = Ring { sq: self.asq, cq: self.acq, entries: n, phase: true, ..Ring::default() };
                self.io = Ring::default();
                (self.io_sq_live, self.io_cq_live) = (false, false);
                match self.ready_after_us {
                    None => self.csts = 1,
                    Some(d) => {
                        self.csts = 0;
                        self.rdy_at = Some(super::fake_kernel::clock_us().saturating_add(d));
                    }
                }
            }
            (true, false) => {
                self.csts &= !1;
                self.rdy_at = None;
            }
            _ => {}
        }
    }

    fn post(ring: &mut Ring, qid: u16, cid: u16, dw0: u32, status: u16) {
        let mut e = [0u8; 16];
        e[0..4].copy_from_slice(&dw0.to_le_bytes());
        e[8..10].copy_from_slice(&ring.sq_head.to_le_bytes());
        e[10..12].copy_from_slice(&qid.to_le_bytes());
        e[12..14].copy_from_slice(&cid.to_le_bytes());
        e[14..16].copy_from_slice(&((status << 1) | u16::from(ring.phase)).to_le_bytes());
        write_mem(ring.cq + u64::from(ring.cq_tail) * 16, &e);
        ring.cq_tail += 1;
        if ring.cq_tail == ring.entries {
            ring.cq_tail = 0;
            ring.phase = !ring.phase;
        }
    }

    fn next_sqe(ring: &mut Ring, tail: u16) -> Option<[u8; 64]> {
        if ring.entries == 0 || ring.sq_head == tail {
            return None;
        }
        let mut sqe = [0u8; 64];
        read_mem(ring.sq + u64::from(ring.sq_head) * 64, &mut sqe);
        ring.sq_head = (ring.sq_head + 1) % ring.entries;
        Some(sqe)
    }

    fn run_admin(&mut self, tail: u16) {
        while let Some(sqe) = Self::next_sqe(&mut self.admin, tail) {
            self.admin_commands += 1;
            let (op, cid) = (sqe[0], le32(&sqe, 0) >> 16);
            let (nsid, prp1, cdw10) = (le32(&sqe, 1), u64::from(le32(&sqe, 6)) | u64::from(le32(&sqe, 7)) << 32, le32(&sqe, 10));
            let mut dw0 = 0;
            let mut status = 0;
            match op {
                0x06 => {
                    let mut page = [0u8; 4096];
                    match cdw10 & 0xff {
                        1 => {
                            page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                            page[4..24].copy_from_slice(b"FAKE0001            ");
                            page[24..64].copy_from_slice(&[b'f'; 40]);
                            page[77] = 5; // MDTS: 128 KiB
                            page[512] = 0x66;
                            page[513] = 0x44;
                            page[516..520].copy_from_slice(&1u32.to_le_bytes());
                        }
                        2 if nsid < 1 => page[0..4].copy_from_slice(&1u32.to_le_bytes()),
                        2 => {}
                        _ if nsid == 1 => {
                            for o in [0, 8, 16] {
                                page[o..o + 8].copy_from_slice(&NS_BLOCKS.to_le_bytes());
                            }
                            page[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                        }
                        _ => {}
                    }
                    write_mem(prp1, &page);
                }
                0x05 => {
                    // Recorded so that tests can order it against the interrupt's allocation
                    // (a controller may bind the CQ's vector to the mode in force now).
                    let cdw11 = le32(&sqe, 11);
                    super::fake_kernel::record(format!("nvme create_cq qid={} iv={} ien={}", cdw10 & 0xffff, cdw11 >> 16, cdw11 >> 1 & 1));
                    self.io.cq = prp1;
                    self.io.entries = (cdw10 >> 16) as u16 + 1;
                    self.io.phase = true;
                    self.io_cq_live = true;
                }
                0x01 => {
                    self.io.sq = prp1;
                    self.io_sq_live = true;
                }
                0x00 => {
                    let qid = cdw10 & 0xffff;
                    status = if qid != 1 || !self.io_sq_live { SC_INVALID_QID } else { 0 };
                    self.io_sq_live &= status != 0;
                    super::fake_kernel::record(format!("nvme delete_sq qid={qid} status={status:#x}"));
                }
                0x04 => {
                    let qid = cdw10 & 0xffff;
                    status = match (qid == 1 && self.io_cq_live, self.io_sq_live) {
                        (false, _) => SC_INVALID_QID,
                        (true, true) => SC_INVALID_QUEUE_DELETION,
                        (true, false) => 0,
                    };
                    self.io_cq_live &= status != 0;
                    super::fake_kernel::record(format!("nvme delete_cq qid={qid} status={status:#x}"));
                }
                0x0c => continue, // AER: held until an event (never, here)
                _ => {}
            }
            if op == 0x09 && cdw10 & 0xff == 0x07 {
                dw0 = 0; // one SQ and one CQ
            }
            Self::post(&mut self.admin, 0, cid as u16, dw0, status);
        }
    }

    fn run_io(&mut self, tail: u16) {
        while let Some(sqe) = Self::next_sqe(&mut self.io, tail) {
            if self.hold_io {
                let cid = (le32(&sqe, 0) >> 16) as u16;
                let prp1 = u64::from(le32(&sqe, 6)) | u64::from(le32(&sqe, 7)) << 32;
                self.held.push((cid, prp1));
                self.held_sqes.push(sqe);
                continue;
            }
            self.execute(&sqe);
        }
    }

    /// Completes every held I/O command now (data moved as for any other), in order.
    pub fn release_held(&mut self) {
        self.held.clear();
        for sqe in core::mem::take(&mut self.held_sqes) {
            self.execute(&sqe);
        }
    }

    /// Runs one I/O command and posts its completion.
    fn execute(&mut self, sqe: &[u8; 64]) {
        let (op, cid) = (sqe[0], (le32(sqe, 0) >> 16) as u16);
        let prp1 = u64::from(le32(sqe, 6)) | u64::from(le32(sqe, 7)) << 32;
        if op == 0x01 || op == 0x02 {
            // Read and write move real data through the PRPs, to and from the media.
            let prp2 = u64::from(le32(sqe, 8)) | u64::from(le32(sqe, 9)) << 32;
            let lba = u64::from(le32(sqe, 10)) | u64::from(le32(sqe, 11)) << 32;
            let blocks = (le32(sqe, 12) & 0xffff) as usize + 1;
            let mut bytes = std::vec![0u8; blocks * 512];
            if op == 0x02 {
                for b in 0..blocks {
                    bytes[b * 512..b * 512 + 512].copy_from_slice(&self.media_block(lba + b as u64));
                }
            }
            let mut at = 0;
            for (addr, n) in Self::prp_pages(prp1, prp2, bytes.len()) {
                if op == 0x02 {
                    write_mem(addr, &bytes[at..at + n]);
                } else {
                    read_mem(addr, &mut bytes[at..at + n]);
                }
                at += n;
            }
            if op == 0x01 {
                for b in 0..blocks {
                    let mut blk = [0u8; 512];
                    blk.copy_from_slice(&bytes[b * 512..b * 512 + 512]);
                    self.media.insert(lba + b as u64, blk);
                }
            }
        }
        self.io_completed += 1;
        Self::post(&mut self.io, 1, cid, 0, 0);
    }

    /// The device finally does what it still owes: writes `fill` into the buffer of every held
    /// command with data (512 bytes at PRP1), as a runaway DMA engine would.
    pub fn dma_into_held(&self) {
        for &(_, prp1) in self.held.iter().filter(|&&(_, prp1)| prp1 != 0) {
            write_mem(prp1, &[self.fill; 512]);
        }
    }
}
