//! Asynchronous Event Requests (NVMe 1.4 §5.2) and the log pages that re-arm them.
//!
//! An AER is an admin command the controller completes only when something happens, so it is
//! exempt from command timeouts. After an event the controller masks that event type until
//! the host reads the associated log page; the engine reads it (or, for Namespace Attribute
//! Changed, leaves it to [`rescan_namespaces`](super::Controller::rescan_namespaces), which
//! reads the Changed Namespace List) and submits a new AER.

use super::cmd::{admin_op, feature, log_page, Sqe};

/// Asynchronous Event Type: notice.
pub const TYPE_NOTICE: u8 = 2;
/// Notice information: Namespace Attribute Changed.
pub const NOTICE_NS_ATTR_CHANGED: u8 = 0;

/// A decoded AER completion (dword 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Event type (bits 2:0).
    pub kind: u8,
    /// Event information (bits 15:8).
    pub info: u8,
    /// Log page to read (bits 23:16).
    pub log_page: u8,
}

impl AsyncEvent {
    /// Decodes dword 0 of an AER completion.
    pub fn decode(dw0: u32) -> AsyncEvent {
        AsyncEvent {
            kind: (dw0 & 7) as u8,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }
    /// Namespace Attribute Changed.
    pub fn is_ns_changed(&self) -> bool {
        self.kind == TYPE_NOTICE && self.info == NOTICE_NS_ATTR_CHANGED
    }
    /// Encodes (used by the software controller).
    pub fn encode(&self) -> u32 {
        (self.kind as u32 & 7) | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }
}

/// The AER command itself.
pub fn request() -> Sqe {
    Sqe::new(admin_op::ASYNC_EVENT, 0)
}

/// Set Features / Asynchronous Event Configuration: enable Namespace Attribute Notices
/// (bit 8) and the SMART critical warnings (bits 7:0).
pub fn enable_notices() -> Sqe {
    Sqe::new(admin_op::SET_FEATURES, 0)
        .cdw(10, feature::ASYNC_EVENT_CONFIG)
        .cdw(11, 0x1ff)
}

/// Get Log Page for `lid`, `bytes` long (a multiple of 4, at most 4096), into PRP1 `addr`
/// (one page). RAE = 0, so reading it re-arms the event.
pub fn get_log_page(lid: u8, bytes: usize, addr: u64) -> Sqe {
    let numd = (bytes / 4).clamp(1, 1024) as u32 - 1;
    let mut s = Sqe::new(admin_op::GET_LOG_PAGE, 0xffff_ffff)
        .cdw(10, lid as u32 | (numd & 0xffff) << 16)
        .cdw(11, numd >> 16);
    s.set_prp(addr, 0);
    s
}

/// Get Log Page for the Changed Namespace List (a full page: 1024 NSIDs).
pub fn changed_ns_list(addr: u64) -> Sqe {
    get_log_page(log_page::CHANGED_NS_LIST, 4096, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_ns_changed() {
        let e = AsyncEvent::decode(0x0004_0002);
        assert!(e.is_ns_changed());
        assert_eq!(e.log_page, 4);
        assert_eq!(AsyncEvent::decode(e.encode()), e);
    }

    #[test]
    fn log_page_dwords() {
        let s = changed_ns_list(0x1000);
        assert_eq!(s.dw[10], 4 | (1023 << 16));
        assert_eq!(s.prp1(), 0x1000);
    }
}
