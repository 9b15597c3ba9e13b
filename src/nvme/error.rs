//! The error, completion and event types of the engine's public API.

use super::health::Health;
use super::status::Status;

/// Why an engine operation or an I/O request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvmeError {
    /// The controller is gone (surprise removal, or it was failed with [`fail_all`]).
    ///
    /// [`fail_all`]: super::Controller::fail_all
    Gone,
    /// A command or a register wait did not finish within its bound.
    Timeout,
    /// The device completed the command with an error status.
    Status(Status),
    /// The device returned hostile or broken data; the text says what was wrong.
    BadDevice(&'static str),
    /// DMA memory could not be allocated.
    NoMemory,
    /// Kernel (heap) memory for the named table could not be allocated.
    OutOfMemory(&'static str),
    /// No free command slot on the I/O queues; retry after [`poll`](super::Controller::poll).
    QueueFull,
    /// The request itself is malformed; the text says why. Nothing was sent to the device.
    InvalidRequest(&'static str),
    /// The controller is not brought up (or a bring-up step is missing).
    NotReady,
    /// The command was aborted by the host (e.g. the controller was stopped under it).
    Aborted,
}

impl core::fmt::Display for NvmeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NvmeError::Gone => f.write_str("controller gone"),
            NvmeError::Timeout => f.write_str("timed out"),
            NvmeError::Status(s) => {
                write!(
                    f,
                    "status sct {:#x} sc {:#x} ({:?}){}",
                    s.sct,
                    s.sc,
                    s.code,
                    if s.dnr { " dnr" } else { "" }
                )
            }
            NvmeError::BadDevice(w) => write!(f, "bad device: {w}"),
            NvmeError::NoMemory => f.write_str("no DMA memory"),
            NvmeError::OutOfMemory(what) => write!(f, "out of memory for {what}"),
            NvmeError::QueueFull => f.write_str("queue full"),
            NvmeError::InvalidRequest(w) => write!(f, "invalid request: {w}"),
            NvmeError::NotReady => f.write_str("controller not ready"),
            NvmeError::Aborted => f.write_str("aborted"),
        }
    }
}

/// The one and only completion of an I/O request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The caller's tag from [`IoRequest::tag`](super::IoRequest::tag).
    pub tag: u64,
    /// `Ok` only if the device completed every part of the request successfully.
    pub result: Result<(), NvmeError>,
}

/// What [`Controller::poll`](super::Controller::poll) reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An I/O request finished (exactly once per accepted request).
    Io(Completion),
    /// The controller reported a Namespace Attribute Changed event: call
    /// [`rescan_namespaces`](super::Controller::rescan_namespaces).
    NamespacesChanged,
    /// Another asynchronous event (error, SMART/health, vendor); the engine already read the
    /// associated log page to re-arm it. Fields as in the AER completion dword 0.
    AsyncNotice {
        /// Asynchronous Event Type (0 error, 1 SMART/health, 2 notice, 6 I/O command set, 7 vendor).
        kind: u8,
        /// Asynchronous Event Information.
        info: u8,
        /// Associated log page.
        log_page: u8,
    },
    /// A completion entry failed validation and was dropped (counted in
    /// [`Stats::bad_completions`](super::Stats::bad_completions)).
    BadCompletion {
        /// Queue the entry was found on.
        qid: u16,
        /// What was wrong with it.
        what: &'static str,
    },
    /// The engine gave up on the controller: a command was overdue, so it stopped the
    /// controller (the device may still have owned data buffers) and completed every
    /// outstanding request with `reason`. Bring it up again, or detach.
    ControllerLost {
        /// The error the outstanding requests were completed with (`Gone` or `Timeout`).
        reason: NvmeError,
        /// What the health check said when the engine gave up.
        health: Health,
    },
}
