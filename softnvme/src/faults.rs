//! Fault knobs: what a hostile, broken or vanishing controller can do to the engine.

use std::collections::{HashMap, VecDeque};

/// What register reads return after the device vanished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Vanish {
    /// Real PCIe: master abort, all-ones.
    #[default]
    AllOnes,
    /// QEMU after an eject: the old BAR reads zero.
    Zeros,
}

/// Changes applied to the next completion entry the device posts (one mutation per entry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CqeMutation {
    /// Applies to admin completions (queue 0) instead of I/O ones.
    pub admin: bool,
    /// Replace the CID (e.g. out of range, or one not outstanding).
    pub cid: Option<u16>,
    /// Replace the SQ identifier.
    pub sqid: Option<u16>,
    /// Replace the SQ head pointer.
    pub sqhd: Option<u16>,
    /// Replace the status field (phase bit is set by the device).
    pub status: Option<u16>,
    /// Post the entry twice.
    pub duplicate: bool,
}

/// All fault knobs; the default is a well-behaved controller.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Replaces the Identify Controller page (padded/truncated to 4096 bytes).
    pub identify_ctrl: Option<Vec<u8>>,
    /// Replaces the Identify Namespace page for an NSID.
    pub identify_ns: HashMap<u32, Vec<u8>>,
    /// Replaces the Active Namespace ID list page.
    pub active_list: Option<Vec<u8>>,
    /// Overrides Set Features (Number of Queues) completion dword 0.
    pub grant_queues: Option<u32>,
    /// Mutations for the next posted completions.
    pub cqe_mutations: VecDeque<CqeMutation>,
    /// The next N I/O commands are fetched and never completed.
    pub swallow_io: u32,
    /// The next N admin commands (other than AERs) are fetched and never completed.
    pub swallow_admin: u32,
    /// Hold I/O completions until `SoftNvme::release_held`.
    pub hold_io: bool,
    /// Vanish when the register access counter reaches this value.
    pub vanish_at_access: Option<u64>,
    /// What reads return after vanishing.
    pub vanish_style: Vanish,
    /// Admin commands other than AERs are answered only this many microseconds of virtual
    /// time (`SoftNvme::advance`) after they were fetched (0: at once): a slow controller.
    pub admin_latency_us: u64,
    /// CSTS.RDY never rises after CC.EN = 1.
    pub never_ready: bool,
    /// CSTS.RDY never drops after CC.EN = 0.
    pub never_disable: bool,
    /// CSTS.SHST never reaches "complete".
    pub shutdown_never_completes: bool,
    /// Writes are acknowledged but not stored (a lying device; the engine cannot detect
    /// this, tests use it only to prove a check can fail).
    pub drop_writes: bool,
}
