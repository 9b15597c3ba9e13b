//! One `io` step: a seeded generator of read/write requests against one namespace, and the
//! checker of what comes back.
//!
//! The namespace is cut into *units* of `block` bytes; a request reserves its blocks in the
//! [`Ledger`] first, so no two requests — of this job or of any other job on the same
//! namespace — have a block in flight at once, and the expected contents of every block are
//! always well defined (the completion order of concurrent commands is not deterministic in
//! QEMU, see the lab notes, so the checks must hold for every order). Each data buffer is a guest-RAM DMA region owned by the job
//! until its request's one completion arrives — the same contract the kernel's bio has.
//! Read buffers are poisoned before submission, so a read reported complete that transferred
//! nothing cannot pass by matching stale data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;

use nvme_hotplug::nvme::{Completion, DataBuf, IoOp, IoRequest, NvmeError};
use nvme_hotplug::platform::DmaRegion;

use crate::dma::GuestDma;
use crate::guest::Guest;
use crate::ledger::{fill_block, splitmix64, Ledger};
use crate::scenario::IoKind;

/// Byte written into read buffers before a read is submitted.
pub const READ_POISON: u8 = 0xe5;

/// What a job is doing with one in-flight request.
#[derive(Debug, Clone)]
struct InFlight {
    op: IoOp,
    unit: u64,
    lba: u64,
    blocks: u64,
    buf: usize,
    stamp: u64,
    /// For reads: the stamps the blocks must carry, if known.
    expect: Option<Vec<u64>>,
    /// This read is the second half of a write-verify operation.
    verify_of_write: bool,
}

/// Counters of one job (summed into the report).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct JobStats {
    /// Operations finished (successfully or not).
    pub ops_done: u64,
    /// Requests submitted.
    pub submitted: u64,
    /// Write requests acknowledged.
    pub writes_acked: u64,
    /// Reads whose data was checked and matched.
    pub reads_verified: u64,
    /// Reads whose data did not match the ledger (data corruption).
    pub read_mismatches: u64,
    /// Requests completed with an error.
    pub failed: u64,
    /// Submissions refused by the engine for a reason other than a full queue.
    pub refused: u64,
    /// Bytes moved successfully.
    pub bytes: u64,
}

/// Where a job sends its requests.
#[derive(Debug, Clone)]
pub struct JobTarget {
    /// Controller id.
    pub ctrl: String,
    /// Namespace.
    pub nsid: u32,
    /// Backing image on the host.
    pub image: PathBuf,
    /// Logical block size.
    pub lba_bytes: u32,
    /// Namespace size in blocks.
    pub ns_blocks: u64,
}

/// Why a job stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The controller went away (the expected end of I/O in a removal scenario).
    ControllerGone,
    /// The job could not even start (no DMA memory, bad parameters).
    Setup(String),
}

/// One running `io` step.
pub struct IoJob {
    /// Index used in request tags (tag = id << 32 | sequence).
    pub id: u32,
    /// Target namespace.
    pub target: JobTarget,
    kind: IoKind,
    ops: u64,
    depth: usize,
    block: u32,
    rng: u64,
    seq: u32,
    units: u64,
    bufs: Vec<GuestDma>,
    free_bufs: Vec<usize>,
    inflight: BTreeMap<u64, InFlight>,
    /// Reads to issue after an acked write (write-verify), by unit.
    verify_queue: Vec<(u64, usize, u64)>,
    ops_started: u64,
    /// Counters.
    pub stats: JobStats,
    /// Set when the job stopped before finishing its ops.
    pub stopped: Option<StopReason>,
    /// Mismatch descriptions (bounded).
    pub mismatches: Vec<String>,
    /// Some request was abandoned without a completion: its buffer may still be DMA'd into.
    tainted: bool,
}

impl IoJob {
    /// Sets up a job: validates geometry and allocates `depth` DMA buffers of `block` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u32,
        guest: &Rc<Guest>,
        target: JobTarget,
        kind: IoKind,
        ops: u64,
        depth: u32,
        block: u32,
        seed: u64,
    ) -> IoJob {
        let mut job = IoJob {
            id,
            kind,
            ops,
            depth: depth as usize,
            block,
            rng: seed ^ (id as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
            seq: 0,
            units: 0,
            bufs: Vec::new(),
            free_bufs: Vec::new(),
            inflight: BTreeMap::new(),
            verify_queue: Vec::new(),
            ops_started: 0,
            stats: JobStats::default(),
            stopped: None,
            mismatches: Vec::new(),
            tainted: false,
            target,
        };
        if !block.is_multiple_of(job.target.lba_bytes) {
            job.stopped = Some(StopReason::Setup(format!(
                "block {} is not a multiple of the namespace block size {}",
                block, job.target.lba_bytes
            )));
            return job;
        }
        let ns_bytes = job.target.ns_blocks * job.target.lba_bytes as u64;
        job.units = ns_bytes / block as u64;
        if job.units == 0 {
            job.stopped = Some(StopReason::Setup(format!("block {block} larger than the namespace")));
            return job;
        }
        // Never more in flight than there are units to keep them apart.
        job.depth = job.depth.min(job.units as usize).max(1);
        for i in 0..job.depth {
            match GuestDma::alloc(guest, block as usize, 4096) {
                Ok(b) => {
                    job.bufs.push(b);
                    job.free_bufs.push(i);
                }
                Err(e) => {
                    job.stopped = Some(StopReason::Setup(format!("DMA buffer allocation failed: {e:?}")));
                    job.bufs.clear();
                    job.free_bufs.clear();
                    return job;
                }
            }
        }
        job
    }

    /// True when nothing more will happen: all ops done, or stopped with nothing in flight.
    pub fn finished(&self) -> bool {
        self.inflight.is_empty()
            && self.verify_queue.is_empty()
            && (self.stopped.is_some() || self.stats.ops_done >= self.ops)
    }

    /// Requests accepted by the engine and not completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Total operations this job was asked for.
    pub fn ops_total(&self) -> u64 {
        self.ops
    }

    fn per_unit(&self) -> u64 {
        (self.block / self.target.lba_bytes) as u64
    }

    fn release_unit(&self, ledger: &mut Ledger, unit: u64) {
        let n = self.per_unit();
        ledger.release(&self.target.image, unit * n, n);
    }

    /// Stops issuing new requests (the controller is going away).
    pub fn stop(&mut self, why: StopReason, ledger: &mut Ledger) {
        if self.stopped.is_none() {
            self.stopped = Some(why);
        }
        // Queued verify reads will never be issued: their operations end here.
        for (unit, buf, _) in std::mem::take(&mut self.verify_queue) {
            self.release_unit(ledger, unit);
            self.free_bufs.push(buf);
            self.stats.ops_done += 1;
        }
    }

    fn next_rand(&mut self) -> u64 {
        splitmix64(&mut self.rng)
    }

    /// A random unit whose blocks are free, reserved in the ledger.
    fn pick_unit(&mut self, ledger: &mut Ledger) -> Option<u64> {
        let n = self.per_unit();
        for _ in 0..16 {
            let u = self.next_rand() % self.units;
            if ledger.try_reserve(&self.target.image, u * n, n) {
                return Some(u);
            }
        }
        let image = self.target.image.clone();
        (0..self.units).find(|u| ledger.try_reserve(&image, u * n, n))
    }

    fn tag(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        (self.id as u64) << 32 | self.seq as u64
    }

    /// The next request to submit, if the job wants one now. The caller must then call
    /// [`IoJob::submitted`] or [`IoJob::refused`] with the result.
    pub fn next_request(&mut self, ledger: &mut Ledger) -> Option<(IoRequest, PendingSubmit)> {
        if self.stopped.is_some() || self.inflight.len() >= self.depth {
            return None;
        }
        let per_unit = (self.block / self.target.lba_bytes) as u64;
        // Verify reads first: they finish operations already started.
        if let Some((unit, buf, stamp)) = self.verify_queue.pop() {
            let lba = unit * per_unit;
            let p = self.prepare_read(unit, buf, lba, per_unit, Some(vec![stamp; per_unit as usize]), true);
            return Some(p);
        }
        if self.ops_started >= self.ops || self.free_bufs.is_empty() {
            return None;
        }
        let unit = self.pick_unit(ledger)?;
        let Some(buf) = self.free_bufs.pop() else {
            self.release_unit(ledger, unit);
            return None;
        };
        let lba = unit * per_unit;
        let write = match self.kind {
            IoKind::WriteVerify => true,
            IoKind::Read => false,
            IoKind::Mixed => self.next_rand() & 1 == 0,
        };
        self.ops_started += 1;
        if write {
            let stamp = ledger.new_stamp();
            let lb = self.target.lba_bytes as usize;
            let mut data = vec![0u8; self.block as usize];
            for (i, chunk) in data.chunks_mut(lb).enumerate() {
                fill_block(stamp, lba + i as u64, chunk);
            }
            self.bufs[buf].write(0, &data);
            let tag = self.tag();
            let req = self.request(tag, IoOp::Write, lba, per_unit, buf);
            let f = InFlight { op: IoOp::Write, unit, lba, blocks: per_unit, buf, stamp, expect: None, verify_of_write: false };
            Some((req, PendingSubmit(tag, f)))
        } else {
            let expect = ledger.known(&self.target.image, lba, per_unit);
            Some(self.prepare_read(unit, buf, lba, per_unit, expect, false))
        }
    }

    fn prepare_read(
        &mut self,
        unit: u64,
        buf: usize,
        lba: u64,
        blocks: u64,
        expect: Option<Vec<u64>>,
        verify_of_write: bool,
    ) -> (IoRequest, PendingSubmit) {
        self.bufs[buf].fill(READ_POISON);
        let tag = self.tag();
        let req = self.request(tag, IoOp::Read, lba, blocks, buf);
        let f = InFlight { op: IoOp::Read, unit, lba, blocks, buf, stamp: 0, expect, verify_of_write };
        (req, PendingSubmit(tag, f))
    }

    fn request(&self, tag: u64, op: IoOp, lba: u64, blocks: u64, buf: usize) -> IoRequest {
        IoRequest {
            tag,
            nsid: self.target.nsid,
            op,
            lba,
            blocks: blocks as u32,
            data: DataBuf { bus_addr: self.bufs[buf].bus_addr(), len: self.block as usize },
        }
    }

    /// The engine accepted the request.
    pub fn submitted(&mut self, p: PendingSubmit) {
        self.stats.submitted += 1;
        self.inflight.insert(p.0, p.1);
    }

    /// The engine refused the request: `QueueFull` is retried later; anything else ends the
    /// operation (and `Gone`/`NotReady` stop the job).
    pub fn refused(&mut self, p: PendingSubmit, err: NvmeError, ledger: &mut Ledger) {
        let f = p.1;
        if err == NvmeError::QueueFull {
            if f.op == IoOp::Read && f.verify_of_write {
                let stamp = f.expect.as_ref().and_then(|v| v.first().copied()).unwrap_or(0);
                self.verify_queue.push((f.unit, f.buf, stamp));
            } else {
                self.ops_started -= 1;
                self.release_unit(ledger, f.unit);
                self.free_bufs.push(f.buf);
            }
            return;
        }
        // Nothing was sent: the media is unchanged, the ledger needs no update for a write.
        self.release_unit(ledger, f.unit);
        self.free_bufs.push(f.buf);
        self.stats.refused += 1;
        self.stats.ops_done += 1;
        if matches!(err, NvmeError::Gone | NvmeError::NotReady) {
            self.stop(StopReason::ControllerGone, ledger);
        }
    }

    /// Handles the one completion of request `c.tag`. Returns false for a tag this job does not
    /// know (a duplicate or invented completion: the runner reports it as a violation).
    pub fn complete(&mut self, c: Completion, ledger: &mut Ledger) -> bool {
        let Some(f) = self.inflight.remove(&c.tag) else { return false };
        let bytes = f.blocks * self.target.lba_bytes as u64;
        match (f.op, c.result) {
            (IoOp::Write, Ok(())) => {
                ledger.write_acked(&self.target.image, f.lba, f.blocks, f.stamp);
                self.stats.writes_acked += 1;
                self.stats.bytes += bytes;
                if self.kind == IoKind::WriteVerify && self.stopped.is_none() {
                    // The unit and buffer stay reserved for the read-back.
                    self.verify_queue.push((f.unit, f.buf, f.stamp));
                    return true;
                }
                self.stats.ops_done += 1;
            }
            (IoOp::Write, Err(_)) => {
                ledger.write_uncertain(&self.target.image, f.lba, f.blocks, f.stamp);
                self.stats.failed += 1;
                self.stats.ops_done += 1;
            }
            (IoOp::Read, Ok(())) => {
                self.stats.bytes += bytes;
                if let Some(expect) = &f.expect {
                    let mut got = vec![0u8; self.block as usize];
                    self.bufs[f.buf].read(0, &mut got);
                    let lb = self.target.lba_bytes as usize;
                    let mut want = vec![0u8; lb];
                    let mut bad = None;
                    for (i, chunk) in got.chunks(lb).enumerate() {
                        fill_block(expect[i], f.lba + i as u64, &mut want);
                        if chunk != want.as_slice() {
                            bad = Some(i);
                            break;
                        }
                    }
                    match bad {
                        None => self.stats.reads_verified += 1,
                        Some(i) => {
                            self.stats.read_mismatches += 1;
                            if self.mismatches.len() < 10 {
                                self.mismatches.push(format!(
                                    "{}/{}: read of lba {} returned wrong data (stamp {} expected)",
                                    self.target.ctrl,
                                    self.target.nsid,
                                    f.lba + i as u64,
                                    expect[i]
                                ));
                            }
                        }
                    }
                }
                self.stats.ops_done += 1;
            }
            (IoOp::Read, Err(_)) | (IoOp::Flush, Err(_)) => {
                self.stats.failed += 1;
                self.stats.ops_done += 1;
            }
            (IoOp::Flush, Ok(())) => self.stats.ops_done += 1,
        }
        self.release_unit(ledger, f.unit);
        self.free_bufs.push(f.buf);
        true
    }

    /// Gives up on every request still in flight (the engine never completed them): each is
    /// returned as hung; writes among them become uncertain in the ledger. Returns the count.
    pub fn abandon(&mut self, ledger: &mut Ledger) -> u64 {
        let n = self.inflight.len() as u64;
        self.tainted |= n > 0;
        for (_, f) in std::mem::take(&mut self.inflight) {
            if f.op == IoOp::Write {
                ledger.write_uncertain(&self.target.image, f.lba, f.blocks, f.stamp);
            }
            self.release_unit(ledger, f.unit);
            self.free_bufs.push(f.buf);
            self.stats.ops_done += 1;
        }
        self.stop(StopReason::ControllerGone, ledger);
        n
    }

    /// The device these requests went to could not be stopped (`Controller::dma_stopped` is
    /// false after its requests were failed): it may still read or write any of this job's
    /// buffers, so they are leaked at the end instead of freed (and show as leaked bytes).
    pub fn taint(&mut self) {
        self.tainted = true;
    }

    /// Releases the DMA buffers. Only valid once nothing is in flight (the device might still
    /// write into a buffer of a request that was not completed); otherwise they are leaked on
    /// purpose and show up in `leaked_bytes`.
    pub fn release_buffers(&mut self) {
        if self.inflight.is_empty() && !self.tainted {
            self.bufs.clear();
        } else {
            for b in self.bufs.drain(..) {
                std::mem::forget(b);
            }
        }
    }
}

/// A request handed to the runner for submission (opaque to it).
pub struct PendingSubmit(u64, InFlight);

impl PendingSubmit {
    /// The request's tag.
    pub fn tag(&self) -> u64 {
        self.0
    }
}
