//! `_OST` (OSPM Status Indication, ACPI 6.5 §6.3.5): how the OS tells firmware what became of
//! a notify. acpi_pci.c never evaluates it; Linux always does (drivers/acpi/scan.c
//! acpi_device_hotplug), and a hypervisor that waits for it (e.g. to finish a volume detach)
//! needs it.
//!
//! Codes verified against Linux include/linux/acpi.h (`ACPI_OST_SC_*`), which follows the spec.

/// `_OST` source event for an eject request (Arg0), the notify value itself.
pub const SOURCE_EJECT_REQUEST: u32 = 3;
/// `_OST` source event for a bus check.
pub const SOURCE_BUS_CHECK: u32 = 0;
/// `_OST` source event for a device check.
pub const SOURCE_DEVICE_CHECK: u32 = 1;

/// `_OST` status code (Arg1).
///
/// 0..=2 are general codes valid for any source event; 0x80.. are specific to the eject
/// request source event (3, or 0x103 for an OSPM-initiated eject).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum OstStatus {
    /// The notify was handled (for an eject: the device is gone).
    Success = 0x0,
    /// The notify could not be handled, for a reason none of the codes below names.
    NonSpecificFailure = 0x1,
    /// The notify value means nothing to us.
    UnrecognizedNotify = 0x2,
    /// Eject: this device cannot be ejected.
    EjectNotSupported = 0x80,
    /// Eject: the device is in use (e.g. a mounted file system) and was not released.
    DeviceInUse = 0x81,
    /// Eject: the device is busy right now; the platform may retry.
    DeviceBusy = 0x82,
    /// Eject: a device that depends on this one is busy.
    EjectDependencyBusy = 0x83,
    /// Eject: accepted and in progress; a final status follows.
    EjectInProgress = 0x84,
}

impl OstStatus {
    /// The numeric code passed as `_OST` Arg1.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// True for a final answer (everything except "in progress").
    pub const fn is_final(self) -> bool {
        !matches!(self, OstStatus::EjectInProgress)
    }
}
