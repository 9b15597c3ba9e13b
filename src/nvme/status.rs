//! Completion status decoding (NVMe 1.4 §4.6.1.2) into a typed [`Status`].
//!
//! The raw SCT/SC pair is kept so nothing is lost; [`StatusCode`] names the ones a caller may
//! want to act on (an LBA range error is the caller's bug, a media error is the disk's).

/// A non-success completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status Code Type (0 generic, 1 command specific, 2 media/data integrity, 3 path, 7 vendor).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Do Not Retry: the same command will fail again.
    pub dnr: bool,
    /// More: the Error Information log page has more.
    pub more: bool,
    /// The named meaning of `sct`/`sc`.
    pub code: StatusCode,
}

/// Named status codes; anything else is [`StatusCode::Other`] (see `sct`/`sc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    /// Generic 01h.
    InvalidOpcode,
    /// Generic 02h.
    InvalidField,
    /// Generic 04h.
    DataTransferError,
    /// Generic 06h.
    InternalError,
    /// Generic 07h: command aborted by an Abort command.
    AbortRequested,
    /// Generic 08h: command aborted because its SQ was deleted.
    AbortSqDeleted,
    /// Generic 0Bh.
    InvalidNamespace,
    /// Generic 13h: invalid PRP offset.
    InvalidPrpOffset,
    /// Generic 80h.
    LbaOutOfRange,
    /// Generic 81h.
    CapacityExceeded,
    /// Generic 82h.
    NamespaceNotReady,
    /// Command specific 01h.
    InvalidQueueId,
    /// Command specific 02h.
    InvalidQueueSize,
    /// Command specific 05h.
    AsyncEventLimitExceeded,
    /// Media 80h.
    WriteFault,
    /// Media 81h.
    UnrecoveredReadError,
    /// Media 86h.
    AccessDenied,
    /// Anything not named above.
    Other,
}

impl Status {
    /// Decodes the 16-bit status field of a CQE (phase tag in bit 0). Returns `None` for
    /// success (SCT 0, SC 0), whatever DNR/M say.
    pub fn from_cqe_status(field: u16) -> Option<Status> {
        let sc = (field >> 1) as u8;
        let sct = ((field >> 9) & 0x7) as u8;
        if sc == 0 && sct == 0 {
            return None;
        }
        Some(Status {
            sct,
            sc,
            more: field & (1 << 14) != 0,
            dnr: field & (1 << 15) != 0,
            code: StatusCode::name(sct, sc),
        })
    }

    /// Builds the 16-bit status field (phase bit left 0); used by the software controller.
    pub fn field(sct: u8, sc: u8, dnr: bool) -> u16 {
        ((sc as u16) << 1) | (((sct & 7) as u16) << 9) | if dnr { 1 << 15 } else { 0 }
    }
}

impl StatusCode {
    fn name(sct: u8, sc: u8) -> StatusCode {
        match (sct, sc) {
            (0, 0x01) => StatusCode::InvalidOpcode,
            (0, 0x02) => StatusCode::InvalidField,
            (0, 0x04) => StatusCode::DataTransferError,
            (0, 0x06) => StatusCode::InternalError,
            (0, 0x07) => StatusCode::AbortRequested,
            (0, 0x08) => StatusCode::AbortSqDeleted,
            (0, 0x0b) => StatusCode::InvalidNamespace,
            (0, 0x13) => StatusCode::InvalidPrpOffset,
            (0, 0x80) => StatusCode::LbaOutOfRange,
            (0, 0x81) => StatusCode::CapacityExceeded,
            (0, 0x82) => StatusCode::NamespaceNotReady,
            (1, 0x01) => StatusCode::InvalidQueueId,
            (1, 0x02) => StatusCode::InvalidQueueSize,
            (1, 0x05) => StatusCode::AsyncEventLimitExceeded,
            (2, 0x80) => StatusCode::WriteFault,
            (2, 0x81) => StatusCode::UnrecoveredReadError,
            (2, 0x86) => StatusCode::AccessDenied,
            _ => StatusCode::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_is_none_even_with_phase() {
        assert_eq!(Status::from_cqe_status(0), None);
        assert_eq!(Status::from_cqe_status(1), None);
    }

    #[test]
    fn qemu_lba_out_of_range_with_dnr() {
        // QEMU reports 0x80 with DNR for an LBA beyond the namespace.
        let s = Status::from_cqe_status(Status::field(0, 0x80, true) | 1).unwrap();
        assert_eq!(s.code, StatusCode::LbaOutOfRange);
        assert!(s.dnr);
        assert!(!s.more);
        assert_eq!((s.sct, s.sc), (0, 0x80));
    }

    #[test]
    fn unknown_is_other_and_keeps_raw() {
        let s = Status::from_cqe_status(Status::field(7, 0xc3, false)).unwrap();
        assert_eq!(s.code, StatusCode::Other);
        assert_eq!((s.sct, s.sc, s.dnr), (7, 0xc3, false));
    }
}
