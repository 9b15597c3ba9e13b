//! The NVMe engine: bring-up, admin and I/O queue pairs, namespaces, I/O, removal.
//!
//! Hardware- and OS-neutral safe Rust, generic over [`Platform`](crate::platform::Platform).
//! The engine is single-threaded by design: the caller (the kld's per-controller mutex, or a
//! test) serialises every call. It never sleeps except through [`Clock::delay_us`] inside
//! bounded waits, and the long ones (shutdown notification, disable) are split out into a
//! [`DeviceStop`] that the caller runs without its lock (see [`controller`]'s lock rule).
//! It never trusts a value read from the device: every register, identify
//! field and completion entry is validated, and a bad one becomes [`NvmeError::BadDevice`] or a
//! counted [`Event::BadCompletion`], never a panic, an out-of-bounds access or an endless loop.
//!
//! One concept per file:
//! - [`regs`]: register offsets and the CAP/CC/CSTS bit fields;
//! - [`cmd`]: submission/completion entry layout and opcodes;
//! - [`status`]: completion status decoding into typed errors;
//! - [`identify`]: parsing and validating Identify Controller / Namespace data;
//! - [`qpair`]: one SQ/CQ ring pair: phase tag, doorbells with DSTRD, CID tracker table;
//! - [`ctrlr`]: reset, enable, disable and shutdown sequences bounded by CAP.TO;
//! - [`admin`]: synchronous admin commands used by bring-up and rescan;
//! - [`ns`]: namespaces and namespace rescans;
//! - [`io`]: request validation and MDTS splitting;
//! - [`prp`]: data as DMA segments, PRP entries from them, the preallocated PRP lists;
//! - [`aer`]: Asynchronous Event Requests and the Get Log Page that clears them;
//! - [`health`]: removal and failure detection;
//! - [`stop`]: the slow half of stopping a controller, run without the caller's lock;
//! - [`controller`]: the [`Controller`] that ties them together;
//! - [`error`]: the error, completion and event types of the public API.
//!
//! [`Clock::delay_us`]: crate::platform::Clock::delay_us

pub mod admin;
pub mod aer;
pub mod cmd;
pub mod controller;
pub mod ctrlr;
pub mod error;
pub mod health;
pub mod identify;
pub mod io;
pub mod ns;
pub mod prp;
pub mod qpair;
pub mod regs;
pub mod status;
pub mod stop;

pub use controller::{Controller, NsScan, Stats};
pub use error::{Completion, Event, NvmeError};
pub use health::Health;
pub use identify::ControllerInfo;
pub use io::{DataBuf, IoOp, IoRequest};
pub use ns::{Namespace, NsChanges, NsUid};
pub use prp::DmaSeg;
pub use status::{Status, StatusCode};
pub use stop::{DeviceStop, StopOutcome};

/// Engine tunables. The kld exposes them as loader tunables; tests set them directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Admin queue entries requested (capped by CAP.MQES+1 and 4096, at least 2).
    pub admin_entries: u16,
    /// Entries per I/O queue requested (capped by CAP.MQES+1, at least 2).
    pub io_entries: u16,
    /// I/O queue pairs requested (the controller may grant fewer; at least 1).
    pub io_queues: u16,
    /// Per-command timeout in microseconds (at least [`MIN_CMD_TIMEOUT_US`]). An overdue
    /// command makes the engine check the controller's health and, since the device may
    /// still own the data buffer, stop it.
    pub cmd_timeout_us: u64,
    /// The most namespaces we accept, whatever NN claims (bounds memory per controller).
    pub max_namespaces: u32,
}

/// Shortest command timeout the engine accepts: a zero timeout would give up every
/// controller on its first command.
pub const MIN_CMD_TIMEOUT_US: u64 = 1_000;

impl Config {
    /// The configuration with out-of-range values brought into range (what the engine uses).
    pub fn sanitized(self) -> Config {
        Config {
            admin_entries: self.admin_entries.max(2),
            io_entries: self.io_entries.max(2),
            io_queues: self.io_queues.max(1),
            cmd_timeout_us: self.cmd_timeout_us.max(MIN_CMD_TIMEOUT_US),
            max_namespaces: self.max_namespaces,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            admin_entries: 32,
            io_entries: 256,
            io_queues: 1,
            cmd_timeout_us: 30_000_000,
            max_namespaces: 256,
        }
    }
}
