//! Submission and completion queue entry layout and opcodes (NVMe 1.4 §4.2, §4.6).

/// Size of a submission queue entry in bytes.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry in bytes.
pub const CQE_SIZE: usize = 16;

/// Admin command opcodes the engine uses.
pub mod admin_op {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
}

/// NVM command set I/O opcodes the engine uses.
pub mod io_op {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace data structure for NSID.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list (NSIDs greater than NSID).
    pub const ACTIVE_NS_LIST: u32 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    /// Number of Queues.
    pub const NUM_QUEUES: u32 = 0x07;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u32 = 0x0b;
}

/// Log page identifiers.
pub mod log_page {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Changed Namespace List.
    pub const CHANGED_NS_LIST: u8 = 0x04;
}

/// A submission queue entry under construction: sixteen little-endian dwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sqe {
    /// The dwords, CDW0 first.
    pub dw: [u32; 16],
}

impl Sqe {
    /// A command with `opcode` and command identifier `cid` (CDW0: opcode 7:0, FUSE 9:8 = 0,
    /// PSDT 15:14 = 0 meaning PRPs, CID 31:16).
    pub fn new(opcode: u8, nsid: u32) -> Sqe {
        let mut s = Sqe::default();
        s.dw[0] = opcode as u32;
        s.dw[1] = nsid;
        s
    }
    /// Opcode.
    pub fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }
    /// Sets the command identifier (done by the queue pair at submission).
    pub fn set_cid(&mut self, cid: u16) {
        self.dw[0] = (self.dw[0] & 0xffff) | ((cid as u32) << 16);
    }
    /// Command identifier.
    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }
    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        self.dw[1]
    }
    /// Sets PRP entry 1 and 2 (DPTR, dwords 6..10).
    pub fn set_prp(&mut self, prp1: u64, prp2: u64) {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
    }
    /// PRP entry 1.
    pub fn prp1(&self) -> u64 {
        self.dw[6] as u64 | (self.dw[7] as u64) << 32
    }
    /// PRP entry 2.
    pub fn prp2(&self) -> u64 {
        self.dw[8] as u64 | (self.dw[9] as u64) << 32
    }
    /// Sets command dword `n` (10..=15).
    pub fn cdw(mut self, n: usize, v: u32) -> Sqe {
        if (10..=15).contains(&n) {
            self.dw[n] = v;
        }
        self
    }
    /// The 64 bytes as the device reads them.
    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        for (i, d) in self.dw.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
    /// Parses 64 bytes (used by the software controller).
    pub fn from_bytes(b: &[u8; SQE_SIZE]) -> Sqe {
        let mut s = Sqe::default();
        for (i, d) in s.dw.iter_mut().enumerate() {
            *d = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        s
    }
}

/// A completion queue entry as read from the ring. Nothing in it is trusted until
/// [`qpair`](super::qpair) has checked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Dword 1 (reserved).
    pub dw1: u32,
    /// Submission queue head pointer at the time of completion.
    pub sqhd: u16,
    /// Submission queue the command came from.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status field with the phase tag in bit 0.
    pub status: u16,
}

impl Cqe {
    /// Parses 16 bytes.
    pub fn from_bytes(b: &[u8; CQE_SIZE]) -> Cqe {
        let dw = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let dw2 = dw(8);
        let dw3 = dw(12);
        Cqe {
            dw0: dw(0),
            dw1: dw(4),
            sqhd: dw2 as u16,
            sqid: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            status: (dw3 >> 16) as u16,
        }
    }
    /// The 16 bytes as the device writes them.
    pub fn to_bytes(&self) -> [u8; CQE_SIZE] {
        let mut b = [0u8; CQE_SIZE];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_le_bytes());
        b
    }
    /// Phase tag.
    pub fn phase(&self) -> bool {
        self.status & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_round_trip() {
        let mut s = Sqe::new(io_op::WRITE, 7).cdw(10, 0x1234).cdw(12, 3);
        s.set_cid(0xbeef);
        s.set_prp(0x1_0000_1000, 0x2_0000_2000);
        let b = s.to_bytes();
        assert_eq!(b[0], 0x01);
        assert_eq!(&b[2..4], &0xbeefu16.to_le_bytes());
        let p = Sqe::from_bytes(&b);
        assert_eq!(p, s);
        assert_eq!(p.cid(), 0xbeef);
        assert_eq!(p.nsid(), 7);
        assert_eq!(p.prp1(), 0x1_0000_1000);
        assert_eq!(p.prp2(), 0x2_0000_2000);
    }

    #[test]
    fn cqe_round_trip() {
        let c = Cqe {
            dw0: 1,
            dw1: 2,
            sqhd: 3,
            sqid: 4,
            cid: 5,
            status: 0x8101,
        };
        let p = Cqe::from_bytes(&c.to_bytes());
        assert_eq!(p, c);
        assert!(p.phase());
    }
}
