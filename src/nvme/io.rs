//! I/O requests: validation, MDTS splitting and PRP building.
//!
//! The engine never touches the data buffer: it only computes PRP entries from the bus address
//! the caller gives. The caller keeps that memory alive (and device-visible) until the
//! request's tag completes. Requests larger than one command may carry (MDTS, or the 16-bit
//! block count) are split into parts; the request completes once, when every part has.

use super::cmd::{io_op, Sqe};
use super::error::NvmeError;
use super::ns::Namespace;
use super::regs::PAGE_SIZE;

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
pub struct Plan {
    req: IoRequest,
    lba_shift: u32,
    blocks_per_part: u64,
    /// Number of commands the request becomes.
    pub parts: u32,
}

/// Where a part's second PRP entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prp2 {
    /// The transfer fits in the page PRP1 points into.
    None,
    /// The transfer ends in the next page: PRP2 is that page's address.
    Page(u64),
    /// PRP2 must point to a list of `count` page addresses starting at `first` and
    /// increasing by one page each.
    List {
        /// First page address.
        first: u64,
        /// Number of entries (at most 512: one list page, see `MAX_TRANSFER_BYTES`).
        count: usize,
    },
}

/// One command's worth of a request.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// The command, without CID and PRP2.
    pub sqe: Sqe,
    /// PRP1 is already in `sqe`; this says what PRP2 must be.
    pub prp2: Prp2,
}

impl Plan {
    /// Validates `req` against namespace `ns` and the controller's `mdts_bytes`.
    /// `max_parts` is the most commands one request may occupy (a queue's capacity).
    pub fn new(
        req: IoRequest,
        ns: &Namespace,
        mdts_bytes: u32,
        max_parts: u32,
    ) -> Result<Plan, NvmeError> {
        if req.op == IoOp::Flush {
            return Ok(Plan {
                req,
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
        if req.data.bus_addr & 3 != 0 {
            return Err(NvmeError::InvalidRequest("buffer not dword aligned"));
        }
        if req.data.bus_addr.checked_add(bytes).is_none() {
            return Err(NvmeError::InvalidRequest(
                "buffer wraps the bus address space",
            ));
        }
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
                prp2: Prp2::None,
            };
        }
        let first = i as u64 * self.blocks_per_part;
        let blocks = (r.blocks as u64 - first).min(self.blocks_per_part);
        let lba = r.lba + first;
        let addr = r.data.bus_addr + (first << self.lba_shift);
        let len = (blocks << self.lba_shift) as usize;
        let opcode = if r.op == IoOp::Write {
            io_op::WRITE
        } else {
            io_op::READ
        };
        let mut sqe = Sqe::new(opcode, r.nsid)
            .cdw(10, lba as u32)
            .cdw(11, (lba >> 32) as u32)
            .cdw(12, (blocks - 1) as u32);
        let prp2 = prp2_for(addr, len);
        sqe.set_prp(addr, 0);
        Part { sqe, prp2 }
    }

    /// Number of parts that need a PRP list page.
    pub fn list_pages_needed(&self) -> usize {
        (0..self.parts)
            .filter(|&i| matches!(self.part(i).prp2, Prp2::List { .. }))
            .count()
    }
}

/// Computes PRP2 for a transfer of `len` (> 0) bytes starting at `addr` (NVMe 1.4 §4.3):
/// PRP1 covers up to the end of its page; the rest is one more page or a list of pages.
pub fn prp2_for(addr: u64, len: usize) -> Prp2 {
    let page = PAGE_SIZE as u64;
    let first_len = page - (addr % page);
    let len = len as u64;
    if len <= first_len {
        return Prp2::None;
    }
    let next = addr - (addr % page) + page;
    let rest = len - first_len;
    if rest <= page {
        Prp2::Page(next)
    } else {
        Prp2::List {
            first: next,
            count: rest.div_ceil(page) as usize,
        }
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

    #[test]
    fn prp_shapes() {
        assert_eq!(prp2_for(0x1000, 4096), Prp2::None);
        assert_eq!(prp2_for(0x1200, 4096), Prp2::Page(0x2000));
        assert_eq!(prp2_for(0x1000, 8192), Prp2::Page(0x2000));
        assert_eq!(
            prp2_for(0x1000, 12288),
            Prp2::List {
                first: 0x2000,
                count: 2
            }
        );
        assert_eq!(
            prp2_for(0x1004, 1 << 20),
            Prp2::List {
                first: 0x2000,
                count: 256
            }
        );
    }

    #[test]
    fn split_above_mdts() {
        let p = Plan::new(req(300, 9, 0x10000), &ns(9), 64 * 1024, 100).unwrap();
        assert_eq!(p.parts, 3); // 128 + 128 + 44 blocks
        let last = p.part(2).sqe;
        assert_eq!(last.dw[10], 356);
        assert_eq!(last.dw[12], 43);
        assert_eq!(last.prp1(), 0x10000 + 256 * 512);
    }

    #[test]
    fn rejects_bad_requests() {
        let n = ns(12);
        assert!(Plan::new(req(0, 12, 0), &n, 4096, 10).is_err());
        assert!(Plan::new(req(1, 12, 2), &n, 4096, 10).is_err());
        let mut r = req(1, 12, 0);
        r.data.len = 100;
        assert!(Plan::new(r, &n, 4096, 10).is_err());
        assert!(Plan::new(req(11, 12, 0), &n, 4096, 10).is_err()); // 11 parts > 10
        assert!(Plan::new(req(1, 12, u64::MAX - 3), &n, 4096, 10).is_err());
        let mut r = req(2, 12, 0);
        r.lba = u64::MAX;
        assert!(Plan::new(r, &n, 1 << 20, 10).is_err());
    }
}
