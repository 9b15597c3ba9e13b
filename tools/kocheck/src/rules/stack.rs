//! Stack frames. A FreeBSD amd64 kernel thread has a fixed stack of KSTACK_PAGES (4 pages,
//! 16 KiB) shared by the whole call chain, the interrupt frames that land on it, and
//! everything the KPI calls below us use. A function that reserves kilobytes (Rust
//! happily puts large structs and arrays on the stack) makes a double fault a matter of
//! call depth. The largest frame is reported even when within the limit.

use crate::report::Verdict;

pub const RULE: &str = "stack-frames";

/// A frame found by the code scan: where, and how many bytes it reserves.
pub struct Frame {
    pub at: String,
    pub bytes: u64,
}

pub fn check(frames: &[Frame], max: u64) -> Verdict {
    let largest = frames.iter().max_by_key(|f| f.bytes);
    let findings: Vec<String> = frames
        .iter()
        .filter(|f| f.bytes > max)
        .map(|f| format!("{}: reserves {} bytes of stack (limit {max})", f.at, f.bytes))
        .collect();
    let ok = match largest {
        Some(f) => format!("{} frames, largest {} bytes at {} (limit {max})", frames.len(), f.bytes, f.at),
        None => format!("no stack reservations (limit {max})"),
    };
    Verdict::from_findings(RULE, ok, "stack frames over the limit", findings)
}
