//! An `io` step in kld mode: a GEOM consumer of one of the module's disks.
//!
//! The requests are the lab's ([`nvmehp_lab::workload::IoJob`]: seeded offsets, `depth` in
//! flight, write-verify/read/mixed, data stamped with [`nvmehp_lab::ledger::fill_block`], the
//! [`Ledger`] told of every outcome), so lost writes and read mismatches are counted exactly as
//! in engine mode. Each request becomes a `struct bio` sent to the disk's `d_strategy` as
//! GEOM's g_down thread sends it ([`crate::emu::geom::submit`]), its data in guest RAM (the
//! job's buffers come from the machine's bio pool: memory a device can reach, as a kernel
//! buffer is); it is done when the module's `biodone` marks it: error 0 acknowledges a write in
//! the ledger, an error makes it uncertain (old or new contents both fine).
//!
//! The consumer opens the disk first (`d_open`, GEOM's first access) and closes it when it is
//! done — or when an announced removal of its controller begins (the runner closes it then, as
//! a consumer that is told to let go does; its bios in flight stay in flight), since the module
//! refuses to eject a disk that is open, which is what a held-open node (`open`) tests.

use nvme_hotplug::nvme::{Completion, IoOp, NvmeError};
use nvmehp_lab::ledger::Ledger;
use nvmehp_lab::workload::{IoJob, PendingSubmit, StopReason};
use std::collections::BTreeMap;

use crate::emu::{geom, machine};
use crate::layouts;

/// One consumer: the lab's job, its disk, and its bios in flight by the job's tag.
pub struct BioJob {
    pub job: IoJob,
    pub disk: String,
    /// Whether the consumer holds the disk open.
    pub opened: bool,
    inflight: BTreeMap<u64, *mut layouts::bio>,
}

impl BioJob {
    /// A consumer of `disk` running `job`: opens the disk (d_open). A refused open stops the
    /// job before its first request (its error is returned).
    pub fn start(job: IoJob, disk: String) -> (BioJob, i32) {
        let setup_failed = job.stopped.is_some();
        let r = if setup_failed { 0 } else { crate::emu::geom::open(&disk) };
        let mut j = BioJob { job, disk, opened: !setup_failed && r == 0, inflight: BTreeMap::new() };
        if r != 0 {
            j.job.stopped = Some(StopReason::ControllerGone);
        }
        (j, r)
    }

    /// Bios in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Lets go of the disk (d_close on GEOM's last close) without waiting for the bios.
    pub fn close(&mut self) {
        if self.opened {
            self.opened = false;
            let _ = crate::emu::geom::close(&self.disk);
        }
    }

    /// Collects the bios the module finished; returns how many.
    pub fn reap(&mut self, ledger: &mut Ledger) -> usize {
        let mut done = Vec::new();
        for (&tag, &bp) in &self.inflight {
            // SAFETY: a bio geom::submit returned and that has not been reported done.
            if let Some(err) = unsafe { geom::bio_done(bp) } {
                done.push((tag, err));
            }
        }
        for (tag, err) in &done {
            self.inflight.remove(tag);
            let result = if *err == 0 { Ok(()) } else { Err(NvmeError::Gone) };
            self.job.complete(Completion { tag: *tag, result }, ledger);
        }
        if self.job.finished() {
            self.close();
        }
        done.len()
    }

    /// Sends new bios up to the job's depth; returns how many.
    pub fn feed(&mut self, ledger: &mut Ledger) -> usize {
        let mut n = 0;
        while let Some((req, pending)) = self.job.next_request(ledger) {
            self.submit(req, pending, ledger);
            n += 1;
        }
        if self.job.finished() {
            self.close();
        }
        n
    }

    fn submit(&mut self, req: nvme_hotplug::nvme::IoRequest, pending: PendingSubmit, ledger: &mut Ledger) {
        let lba_bytes = u64::from(self.job.target.lba_bytes);
        let cmd = if req.op == IoOp::Write { layouts::BIO_WRITE } else { layouts::BIO_READ } as u32;
        let ptr = machine::with_machine(|m| m.ram().host_ptr(req.data.bus_addr, req.data.len as u64).ok());
        let Some(ptr) = ptr else {
            self.job.refused(pending, NvmeError::InvalidRequest("bio data outside guest RAM"), ledger);
            return;
        };
        // SAFETY: the job's buffer in guest RAM stays allocated while its request is in flight
        // (IoJob keeps it until completion, and leaks it if the request never completes).
        match unsafe { geom::submit(&self.disk, cmd, (req.lba * lba_bytes) as i64, ptr.as_ptr(), req.data.len) } {
            Ok(bp) => {
                self.job.submitted(pending);
                self.inflight.insert(req.tag, bp);
            }
            // The disk is gone: GEOM would not even have a provider to send to.
            Err(_) => self.job.refused(pending, NvmeError::Gone, ledger),
        }
    }

    /// Ends the job: bios never done are counted (hung) and their writes made uncertain.
    pub fn abandon(&mut self, ledger: &mut Ledger) -> u64 {
        self.close();
        let n = self.job.abandon(ledger);
        // Their bios stay allocated: the driver might still complete them.
        self.inflight.clear();
        n
    }
}
