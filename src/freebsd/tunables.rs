//! The module's loader tunables and read-only counters (`hw.nvme_hotplug.*`, nvme_hotplug(4)).
//!
//! The sysctl nodes themselves are declared in the C glue (SYSCTL_* are linker-set macros);
//! this file is the Rust side's only way to read and bump them.

use super::bindings;
use crate::hotplug::mode::AcpiMode;

/// `hw.nvme_hotplug.claim`, read at every probe so `sysctl` changes apply to the next probe.
pub fn claim() -> bool {
    // SAFETY: an atomic load of an int owned by the glue.
    unsafe { bindings::nvmehp_tunable_claim() != 0 }
}

/// `hw.nvme_hotplug.acpi_mode`. `Err` carries the text that is not a valid mode (the caller
/// prints it and uses the default).
pub fn acpi_mode() -> Result<AcpiMode, [u8; 8]> {
    let mut buf = [0u8; 8];
    // SAFETY: the glue writes at most `len` bytes, NUL-terminated, into our buffer.
    unsafe { bindings::nvmehp_tunable_acpi_mode(buf.as_mut_ptr().cast(), buf.len() as i32) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    core::str::from_utf8(&buf[..end]).ok().and_then(AcpiMode::parse).ok_or(buf)
}

/// `hw.nvme_hotplug.rescan_interval_ms` (0: no periodic rescan).
pub fn rescan_interval_ms() -> u32 {
    // SAFETY: an atomic load of an int owned by the glue.
    unsafe { bindings::nvmehp_tunable_rescan_interval_ms() }
}

/// The engine configuration from `hw.nvme_hotplug.{io_queues,io_entries,cmd_timeout_ms}`
/// (read at each attach; the engine brings out-of-range values into range).
pub fn engine_config() -> crate::nvme::Config {
    // SAFETY: atomic loads of ints owned by the glue.
    let (q, e, t) = unsafe {
        (
            bindings::nvmehp_tunable_io_queues(),
            bindings::nvmehp_tunable_io_entries(),
            bindings::nvmehp_tunable_cmd_timeout_ms(),
        )
    };
    crate::nvme::Config {
        io_queues: u16::try_from(q).unwrap_or(u16::MAX),
        io_entries: u16::try_from(e).unwrap_or(u16::MAX),
        cmd_timeout_us: u64::from(t) * 1000,
        ..crate::nvme::Config::default()
    }
}

/// A counter under `hw.nvme_hotplug`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Attached controllers (a gauge: +1 on attach, -1 on detach).
    Controllers,
    /// Controller attaches.
    Attaches,
    /// Controller detaches.
    Detaches,
    /// Controllers found gone by the watchdog or at detach.
    SurpriseRemovals,
    /// Requests completed with ENXIO because the controller went away.
    FailedRequests,
    /// ACPI notifications received.
    Notifies,
    /// Slot rescans.
    Rescans,
    /// `_EJ0` evaluations.
    Ejects,
    /// Ejects refused (disk in use).
    EjectsRefused,
    /// Failed hotplug actions.
    HotplugFailures,
    /// Bios held for ever (never completed, their pages never given back) because their
    /// controller could not be stopped and may still DMA into them.
    LeakedBuffers,
}

impl Stat {
    fn index(self) -> u32 {
        match self {
            Stat::Controllers => bindings::NVMEHP_STAT_CONTROLLERS,
            Stat::Attaches => bindings::NVMEHP_STAT_ATTACHES,
            Stat::Detaches => bindings::NVMEHP_STAT_DETACHES,
            Stat::SurpriseRemovals => bindings::NVMEHP_STAT_SURPRISE_REMOVALS,
            Stat::FailedRequests => bindings::NVMEHP_STAT_FAILED_REQUESTS,
            Stat::Notifies => bindings::NVMEHP_STAT_NOTIFIES,
            Stat::Rescans => bindings::NVMEHP_STAT_RESCANS,
            Stat::Ejects => bindings::NVMEHP_STAT_EJECTS,
            Stat::EjectsRefused => bindings::NVMEHP_STAT_EJECTS_REFUSED,
            Stat::HotplugFailures => bindings::NVMEHP_STAT_HOTPLUG_FAILURES,
            Stat::LeakedBuffers => bindings::NVMEHP_STAT_LEAKED_BUFFERS,
        }
    }

    /// Adds `delta` (atomic; callable from any context, also with a mutex held).
    pub fn add(self, delta: i64) {
        if delta != 0 {
            // SAFETY: an atomic add on the glue's counter array; the index is in range.
            unsafe { bindings::nvmehp_stat_add(self.index() as i32, delta) }
        }
    }
}
