//! Controller register offsets and the CAP, CC and CSTS bit fields (NVMe 1.4 §3.1).
//!
//! Only decoding lives here; what a value *means* for removal or failure is decided in
//! [`health`](super::health), and the enable/disable sequences are in [`ctrlr`](super::ctrlr).

use bitflags::bitflags;

/// Controller Capabilities (64-bit).
pub const CAP: u32 = 0x00;
/// Version.
pub const VS: u32 = 0x08;
/// Interrupt Mask Set.
pub const INTMS: u32 = 0x0c;
/// Interrupt Mask Clear.
pub const INTMC: u32 = 0x10;
/// Controller Configuration.
pub const CC: u32 = 0x14;
/// Controller Status.
pub const CSTS: u32 = 0x1c;
/// Admin Queue Attributes.
pub const AQA: u32 = 0x24;
/// Admin Submission Queue base (64-bit).
pub const ASQ: u32 = 0x28;
/// Admin Completion Queue base (64-bit).
pub const ACQ: u32 = 0x30;
/// First doorbell register (SQ 0 tail).
pub const DOORBELL_BASE: u32 = 0x1000;

/// Every NVMe BAR0 is at least 16 KiB: MLBAR bits 13:4 are reserved (read as zero), so the
/// smallest window a controller can decode is 16 KiB. The engine never touches a register
/// beyond this, whatever CAP.DSTRD claims, because a write past the real mapping would fault
/// in the kernel.
pub const MIN_BAR0_LEN: u32 = 0x4000;

/// The host memory page size the engine programs (CC.MPS = 0). PRP entries and queue memory
/// are laid out in these pages.
pub const PAGE_SIZE: usize = 4096;

/// Decoded Controller Capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Raw register value.
    pub raw: u64,
    /// Maximum Queue Entries Supported, as a count (MQES + 1).
    pub max_entries: u32,
    /// Contiguous Queues Required.
    pub cqr: bool,
    /// Worst-case time for CSTS.RDY to change after CC.EN changes, in milliseconds
    /// (CAP.TO is in 500 ms units; 0 is treated as 500 ms so a wait is never zero-length).
    pub timeout_ms: u32,
    /// Doorbell stride in bytes (4 << DSTRD).
    pub doorbell_stride: u32,
    /// Command Sets Supported bit field (bit 0: NVM command set).
    pub css: u8,
    /// Memory Page Size Minimum as log2 bytes (12 + MPSMIN).
    pub mps_min_shift: u32,
    /// Memory Page Size Maximum as log2 bytes (12 + MPSMAX).
    pub mps_max_shift: u32,
}

impl Cap {
    /// Decodes a CAP value. Pure decoding: validity is judged by [`ctrlr`](super::ctrlr).
    pub fn decode(raw: u64) -> Cap {
        let to = ((raw >> 24) & 0xff) as u32;
        Cap {
            raw,
            max_entries: (raw & 0xffff) as u32 + 1,
            cqr: raw & (1 << 16) != 0,
            timeout_ms: to.max(1) * 500,
            doorbell_stride: 4u32 << ((raw >> 32) & 0xf),
            css: ((raw >> 37) & 0xff) as u8,
            mps_min_shift: 12 + ((raw >> 48) & 0xf) as u32,
            mps_max_shift: 12 + ((raw >> 52) & 0xf) as u32,
        }
    }

    /// Byte offset of the submission queue `qid` tail doorbell, or `None` when it would lie
    /// outside the 16 KiB every BAR0 is guaranteed to have.
    pub fn sq_tail_doorbell(&self, qid: u16) -> Option<u32> {
        self.doorbell(2 * qid as u32)
    }

    /// Byte offset of the completion queue `qid` head doorbell (see [`Cap::sq_tail_doorbell`]).
    pub fn cq_head_doorbell(&self, qid: u16) -> Option<u32> {
        self.doorbell(2 * qid as u32 + 1)
    }

    fn doorbell(&self, index: u32) -> Option<u32> {
        let off = index
            .checked_mul(self.doorbell_stride)?
            .checked_add(DOORBELL_BASE)?;
        if off.checked_add(4)? <= MIN_BAR0_LEN {
            Some(off)
        } else {
            None
        }
    }
}

bitflags! {
    /// Controller Configuration single-bit fields; multi-bit fields use the helpers below.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CcFlags: u32 {
        /// Enable.
        const EN = 1 << 0;
    }
}

/// CC.SHN field mask (bits 15:14).
pub const CC_SHN_MASK: u32 = 0b11 << 14;
/// CC.SHN = 01b: normal shutdown notification.
pub const CC_SHN_NORMAL: u32 = 0b01 << 14;

/// Builds the CC value the engine enables the controller with: NVM command set, 4 KiB pages,
/// round-robin arbitration, 64-byte SQEs and 16-byte CQEs.
pub fn cc_enable_value() -> u32 {
    const IOSQES: u32 = 6 << 16; // 2^6 = 64-byte submission entries
    const IOCQES: u32 = 4 << 20; // 2^4 = 16-byte completion entries
                                 // CSS = 000b (NVM), MPS = 0 (4 KiB), AMS = 000b (round robin).
    CcFlags::EN.bits() | IOSQES | IOCQES
}

bitflags! {
    /// Controller Status single-bit fields.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CstsFlags: u32 {
        /// Ready.
        const RDY = 1 << 0;
        /// Controller Fatal Status.
        const CFS = 1 << 1;
        /// NVM Subsystem Reset Occurred.
        const NSSRO = 1 << 4;
        /// Processing Paused.
        const PP = 1 << 5;
    }
}

/// CSTS.SHST field mask (bits 3:2).
pub const CSTS_SHST_MASK: u32 = 0b11 << 2;
/// CSTS.SHST = 10b: shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;

/// What a CSTS read of all-ones means: the function no longer answers (PCIe master abort).
pub const ALL_ONES: u32 = 0xffff_ffff;

/// Decoded Version register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Major version (e.g. 1).
    pub major: u16,
    /// Minor version (e.g. 4).
    pub minor: u8,
    /// Tertiary version.
    pub tertiary: u8,
}

impl Version {
    /// Decodes VS.
    pub fn decode(raw: u32) -> Version {
        Version {
            major: (raw >> 16) as u16,
            minor: (raw >> 8) as u8,
            tertiary: raw as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_cap_decodes() {
        let cap = Cap::decode(0x0040_0820_0f01_07ff);
        assert_eq!(cap.max_entries, 2048);
        assert!(cap.cqr);
        assert_eq!(cap.timeout_ms, 7500);
        assert_eq!(cap.doorbell_stride, 4);
        assert_eq!(cap.css & 1, 1);
        assert_eq!(cap.mps_min_shift, 12);
        assert_eq!(cap.sq_tail_doorbell(0), Some(0x1000));
        assert_eq!(cap.cq_head_doorbell(1), Some(0x100c));
    }

    #[test]
    fn zero_timeout_is_not_zero_wait() {
        assert_eq!(Cap::decode(0).timeout_ms, 500);
    }

    #[test]
    fn doorbells_stay_inside_bar0() {
        // DSTRD = 15: stride 128 KiB, even SQ 0's doorbell is fine but CQ 0's is not.
        let cap = Cap::decode(0xf_0000_0000);
        assert_eq!(cap.sq_tail_doorbell(0), Some(0x1000));
        assert_eq!(cap.cq_head_doorbell(0), None);
        let cap = Cap::decode(0);
        // 0x1000 + 3071 * 4 + 4 == 16 KiB: queue 1535 is the last that fits with DSTRD 0.
        assert!(cap.cq_head_doorbell(1535).is_some());
        assert!(cap.sq_tail_doorbell(1536).is_none());
        assert!(cap.cq_head_doorbell(u16::MAX).is_none());
    }
}
