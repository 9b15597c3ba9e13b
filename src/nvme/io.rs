//! I/O requests: validation and MDTS splitting.
//!
//! The engine never touches the data buffer: it only computes PRP entries ([`super::prp`])
//! from the bus addresses the caller gives, one contiguous [`DataBuf`] or a list of
//! [`DmaSeg`]s. The caller keeps that memory alive (and device-visible) until the request's
//! tag completes. Requests larger than one command may carry (MDTS, or the 16-bit block
//! count) are split into parts; the request completes once, when every part has.

use super::cmd::{io_op, Sqe};
use super::error::NvmeError;
use super::ns::Namespace;
use super::prp::{self, DmaSeg, Entries};

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read blocks into the buffer.
    Read,
    /// Write blocks from the buffer.
    Write,
    /// Flush the volatile write cache (no data; `lba`, `blocks` and `data` are ignored).
    Flush,
}

/// A physically contiguous, device-visible data buffer owned by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataBuf {
    /// Bus address of the first byte (must be 4-byte aligned: PRP entries are dword aligned).
    pub bus_addr: u64,
    /// Length in bytes: exactly `blocks * lba_bytes` for Read and Write.
    pub len: usize,
}

/// One I/O request as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    /// Caller's identifier, returned in the [`Completion`](super::Completion).
    pub tag: u64,
    /// Namespace ID.
    pub nsid: u32,
    /// Operation.
    pub op: IoOp,
    /// First block.
    pub lba: u64,
    /// Number of blocks (at least 1 for Read and Write).
    pub blocks: u32,
    /// Data buffer.
    pub data: DataBuf,
}

/// Most blocks one NVMe Read/Write can carry: NLB is a 16-bit 0-based count.
const MAX_NLB: u64 = 1 << 16;

/// A validated request, ready to be cut into commands.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    req: IoRequest,
    /// The data (empty for a flush).
    segs: &'a [DmaSeg],
    lba_shift: u32,
    blocks_per_part: u64,
    /// Number of commands the request becomes.
    pub parts: u32,
}

/// One command's worth of a request.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// The command, without CID and PRPs.
    pub sqe: Sqe,
    /// Byte offset of the part's data in the request's data.
    pub off: usize,
    /// Bytes of data (0 for a flush).
    pub len: usize,
}

impl<'a> Plan<'a> {
    /// Validates `req` against namespace `ns` and the controller's `mdts_bytes`, with its data
    /// in `segs` (checked with [`prp::check_segments`]: `req.data.len` bytes, in a shape PRP
    /// entries can express). `max_parts` is the most commands one request may occupy (a
    /// queue's capacity).
    pub fn new(
        req: IoRequest,
        segs: &'a [DmaSeg],
        ns: &Namespace,
        mdts_bytes: u32,
        max_parts: u32,
    ) -> Result<Plan<'a>, NvmeError> {
        if req.op == IoOp::Flush {
            return Ok(Plan {
                req,
                segs: &[],
                lba_shift: ns.lba_shift,
                blocks_per_part: 1,
                parts: 1,
            });
        }
        if req.blocks == 0 {
            return Err(NvmeError::InvalidRequest("zero blocks"));
        }
        let bytes = (req.blocks as u64) << ns.lba_shift;
        if req.data.len as u64 != bytes {
            return Err(NvmeError::InvalidRequest(
                "buffer length is not blocks x block size",
            ));
        }
        prp::check_segments(segs, req.data.len)?;
        if req.lba.checked_add(req.blocks as u64).is_none() {
            return Err(NvmeError::InvalidRequest("LBA range wraps"));
        }
        // The device checks the range against the namespace size (it is the authority: a
        // namespace may have been resized); we only make sure the arithmetic is sound.
        let blocks_per_part = ((mdts_bytes as u64) >> ns.lba_shift).clamp(1, MAX_NLB);
        let parts = (req.blocks as u64).div_ceil(blocks_per_part);
        if parts > max_parts as u64 {
            return Err(NvmeError::InvalidRequest(
                "request larger than a queue can carry",
            ));
        }
        Ok(Plan {
            req,
            segs,
            lba_shift: ns.lba_shift,
            blocks_per_part,
            parts: parts as u32,
        })
    }

    /// The caller's tag.
    pub fn tag(&self) -> u64 {
        self.req.tag
    }

    /// Builds part `i` (`i < parts`).
    pub fn part(&self, i: u32) -> Part {
        let r = &self.req;
        if r.op == IoOp::Flush {
            return Part {
                sqe: Sqe::new(io_op::FLUSH, r.nsid),
                off: 0,
                len: 0,
            };
        }
        let first = i as u64 * self.blocks_per_part;
        let blocks = (r.blocks as u64 - first).min(self.blocks_per_part);
        let lba = r.lba + first;
        let opcode = if r.op == IoOp::Write {
            io_op::WRITE
        } else {
            io_op::READ
        };
        let sqe = Sqe::new(opcode, r.nsid)
            .cdw(10, lba as u32)
            .cdw(11, (lba >> 32) as u32)
            .cdw(12, (blocks - 1) as u32);
        Part {
            sqe,
            off: (first << self.lba_shift) as usize,
            len: (blocks << self.lba_shift) as usize,
        }
    }

    /// The PRP entries of `part`'s data: PRP1 first, then one per following page.
    pub fn entries(&self, part: &Part) -> Entries<'a> {
        prp::entries(self.segs, part.off, part.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(shift: u32) -> Namespace {
        Namespace {
            nsid: 1,
            lba_shift: shift,
            lba_bytes: 1 << shift,
            blocks: 1 << 20,
            capacity: 1 << (20 + shift),
            uid: crate::nvme::ns::NsUid::None,
        }
    }

    fn req(blocks: u32, shift: u32, addr: u64) -> IoRequest {
        IoRequest {
            tag: 9,
            nsid: 1,
            op: IoOp::Write,
            lba: 100,
            blocks,
            data: DataBuf {
                bus_addr: addr,
                len: (blocks as usize) << shift,
            },
        }
    }

    fn one(r: &IoRequest) -> [DmaSeg; 1] {
        [DmaSeg {
            addr: r.data.bus_addr,
            len: r.data.len,
        }]
    }

    #[test]
    fn prp_entries_of_a_part() {
        let r = req(24, 9, 0x1200); // 12 KiB from an offset: four pages
        let segs = one(&r);
        let p = Plan::new(r, &segs, &ns(9), 1 << 20, 10).unwrap();
        let part = p.part(0);
        let e: alloc::vec::Vec<u64> = p.entries(&part).collect();
        assert_eq!(e, [0x1200, 0x2000, 0x3000, 0x4000]);
    }

    #[test]
    fn split_above_mdts() {
        let r = req(300, 9, 0x10000);
        let segs = one(&r);
        let p = Plan::new(r, &segs, &ns(9), 64 * 1024, 100).unwrap();
        assert_eq!(p.parts, 3); // 128 + 128 + 44 blocks
        let last = p.part(2);
        assert_eq!(last.sqe.dw[10], 356);
        assert_eq!(last.sqe.dw[12], 43);
        assert_eq!(p.entries(&last).next(), Some(0x10000 + 256 * 512));
    }

    #[test]
    fn rejects_bad_requests() {
        let n = ns(12);
        let plan = |r: IoRequest, mdts: u32| Plan::new(r, &one(&r), &n, mdts, 10).map(|p| p.parts);
        assert!(plan(req(0, 12, 0), 4096).is_err());
        assert!(plan(req(1, 12, 2), 4096).is_err());
        let mut r = req(1, 12, 0);
        r.data.len = 100;
        assert!(plan(r, 4096).is_err());
        assert!(plan(req(11, 12, 0), 4096).is_err()); // 11 parts > 10
        assert!(plan(req(1, 12, u64::MAX - 3), 4096).is_err());
        let mut r = req(2, 12, 0);
        r.lba = u64::MAX;
        assert!(plan(r, 1 << 20).is_err());
        // Segments that do not add up to the request, or that PRPs cannot express.
        let r = req(2, 12, 0x1000);
        let short = [DmaSeg { addr: 0x1000, len: 4096 }];
        assert!(Plan::new(r, &short, &n, 1 << 20, 10).is_err());
        let holed = [DmaSeg { addr: 0x1000, len: 2048 }, DmaSeg { addr: 0x5000, len: 6144 }];
        assert!(Plan::new(r, &holed, &n, 1 << 20, 10).is_err());
    }
}
