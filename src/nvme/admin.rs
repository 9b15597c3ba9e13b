//! Builders for the admin commands bring-up, rescan and shutdown use.

use super::cmd::{admin_op, cns, feature, Sqe};

/// Identify with `cns` for `nsid` into the page at `addr`.
pub fn identify(cns: u32, nsid: u32, addr: u64) -> Sqe {
    let mut s = Sqe::new(admin_op::IDENTIFY, nsid).cdw(10, cns);
    s.set_prp(addr, 0);
    s
}

/// Identify Controller.
pub fn identify_controller(addr: u64) -> Sqe {
    identify(cns::CONTROLLER, 0, addr)
}

/// Identify Namespace `nsid`.
pub fn identify_namespace(nsid: u32, addr: u64) -> Sqe {
    identify(cns::NAMESPACE, nsid, addr)
}

/// Active Namespace ID list: NSIDs greater than `after`.
pub fn active_ns_list(after: u32, addr: u64) -> Sqe {
    identify(cns::ACTIVE_NS_LIST, after, addr)
}

/// Set Features / Number of Queues: ask for `n` (>= 1) submission and completion queues.
/// Completion dword 0 holds what was granted (0-based, SQs in 15:0, CQs in 31:16).
pub fn set_num_queues(n: u16) -> Sqe {
    let v = (n.max(1) - 1) as u32;
    Sqe::new(admin_op::SET_FEATURES, 0)
        .cdw(10, feature::NUM_QUEUES)
        .cdw(11, v | v << 16)
}

/// Create I/O Completion Queue `qid` with `entries` at `addr`, physically contiguous,
/// interrupts enabled on vector `iv` (the engine polls; interrupts are the platform's
/// business and harmless when unused).
pub fn create_cq(qid: u16, entries: u16, addr: u64, iv: u16) -> Sqe {
    let mut s = Sqe::new(admin_op::CREATE_CQ, 0)
        .cdw(10, (entries as u32 - 1) << 16 | qid as u32)
        .cdw(11, (iv as u32) << 16 | 0b11);
    s.set_prp(addr, 0);
    s
}

/// Create I/O Submission Queue `qid` with `entries` at `addr`, posting to CQ `cqid`,
/// physically contiguous, medium priority bits 0 (ignored under round robin).
pub fn create_sq(qid: u16, entries: u16, addr: u64, cqid: u16) -> Sqe {
    let mut s = Sqe::new(admin_op::CREATE_SQ, 0)
        .cdw(10, (entries as u32 - 1) << 16 | qid as u32)
        .cdw(11, (cqid as u32) << 16 | 0b1);
    s.set_prp(addr, 0);
    s
}

/// Delete I/O Submission Queue `qid` (outstanding commands on it are aborted by the device).
pub fn delete_sq(qid: u16) -> Sqe {
    Sqe::new(admin_op::DELETE_SQ, 0).cdw(10, qid as u32)
}

/// Delete I/O Completion Queue `qid` (its SQs must be deleted first).
pub fn delete_cq(qid: u16) -> Sqe {
    Sqe::new(admin_op::DELETE_CQ, 0).cdw(10, qid as u32)
}
