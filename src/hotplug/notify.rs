//! The ACPI notify values a hotplug slot object receives, and what each asks of the OS.
//!
//! Values from ACPI 6.5 §5.6.6 ("Device Object Notifications") and ACPICA actypes.h
//! (`ACPI_NOTIFY_BUS_CHECK` = 0, `ACPI_NOTIFY_DEVICE_CHECK` = 1, `ACPI_NOTIFY_EJECT_REQUEST` = 3).
//! QEMU's PIIX4 hotplug AML and EC2 Nitro send 1 after an insertion and 3 before a removal.

/// One notify value, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// 0: re-enumerate the device and everything below it. On a slot object we treat it like a
    /// device check of that slot (acpi_pci.c ignores it on slots; ACPI allows either reading).
    BusCheck,
    /// 1: something was inserted or removed at this slot; re-check it.
    DeviceCheck,
    /// 3: the platform asks us to release the device so that it can be ejected.
    EjectRequest,
    /// Anything else (2 device wake, 0x80+ device specific, ...): answered with _OST
    /// "unrecognized notify" when we own the slot, otherwise ignored.
    Other(u32),
}

impl Notify {
    /// Classifies a raw notify value as passed to an ACPI notify handler.
    pub const fn from_value(value: u32) -> Self {
        match value {
            0 => Notify::BusCheck,
            1 => Notify::DeviceCheck,
            3 => Notify::EjectRequest,
            v => Notify::Other(v),
        }
    }

    /// The raw value, which is also the `_OST` source event code answering this notify.
    pub const fn value(self) -> u32 {
        match self {
            Notify::BusCheck => 0,
            Notify::DeviceCheck => 1,
            Notify::EjectRequest => 3,
            Notify::Other(v) => v,
        }
    }
}
