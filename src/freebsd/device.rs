//! A newbus device (`device_t`) and the PCI accessors the driver needs.

use super::bindings;
use core::ffi::{c_int, CStr};
use core::ptr::NonNull;

/// A `device_t` the kernel handed to one of our methods.
///
/// Invariant: the device exists for as long as this handle is used. Newbus guarantees that from
/// probe until detach returns; the driver keeps no handle past its detach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Device(NonNull<bindings::_device>);

// SAFETY: a device_t may be used from any thread; the accessors used here take the kernel's own
// locks or read fields fixed at device creation.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Device {
    /// Wraps a `device_t` passed in by the kernel.
    ///
    /// # Safety
    /// `raw` must be NULL or a device that stays alive while the handle is used.
    pub unsafe fn from_raw(raw: bindings::device_t) -> Option<Self> {
        NonNull::new(raw).map(Device)
    }

    /// The `device_t` for KPI calls.
    pub fn as_raw(self) -> bindings::device_t {
        self.0.as_ptr()
    }

    /// "nvmehp0", or "" before the device has a unit.
    pub fn nameunit(&self) -> &CStr {
        // SAFETY: device_get_nameunit returns a NUL-terminated string owned by the device, or
        // NULL; the borrow ends with `self`'s use, while the device is alive.
        unsafe {
            let p = bindings::device_get_nameunit(self.as_raw());
            if p.is_null() { c"" } else { CStr::from_ptr(p) }
        }
    }

    /// Unit number ("nvmehp3" → 3); -1 before one is assigned.
    pub fn unit(&self) -> c_int {
        // SAFETY: reads a field of a live device.
        unsafe { bindings::device_get_unit(self.as_raw()) }
    }

    /// Name of the device's devclass ("nvmehp"), or "" when it has none (no driver).
    pub fn class_name(&self) -> &CStr {
        // SAFETY: device_get_name returns the devclass name (static for the driver's life) or
        // NULL.
        unsafe {
            let p = bindings::device_get_name(self.as_raw());
            if p.is_null() { c"" } else { CStr::from_ptr(p) }
        }
    }

    /// Whether a driver's probe won for this device (`device_is_alive(9)`: state `DS_ALIVE` or
    /// later). False for a child the bus added that no driver took (`DS_NOTPRESENT`).
    pub fn is_alive(&self) -> bool {
        // SAFETY: reads the state of a live device.
        unsafe { bindings::device_is_alive(self.as_raw()) != 0 }
    }

    /// Sets the description shown by `devinfo` and at attach. The kernel keeps the pointer.
    pub fn set_desc(&self, desc: &'static CStr) {
        // SAFETY: the string is 'static, as device_set_desc (which does not copy) requires.
        unsafe { bindings::device_set_desc(self.as_raw(), desc.as_ptr()) }
    }

    /// The parent bus.
    pub fn parent(&self) -> Option<Device> {
        // SAFETY: a live device's parent pointer is a live device (or NULL for root).
        unsafe { Device::from_raw(bindings::device_get_parent(self.as_raw())) }
    }

    /// `device_is_attached(9)`: a driver is attached (DEVICE_ATTACH returned 0 and
    /// DEVICE_DETACH has not completed). Only then is the softc our driver's and set up: newbus
    /// frees it when the driver is cleared (device_set_driver(dev, NULL) after a failed attach
    /// or a detach, sys/kern/subr_bus.c) and hands a fresh zeroed one to a probed device.
    pub fn is_attached(&self) -> bool {
        // SAFETY: reads the state of a live device.
        unsafe { bindings::device_is_attached(self.as_raw()) != 0 }
    }

    /// DEVICE_ATTACH is running for this device (DS_ATTACHING): its attach may be asleep.
    pub fn is_attaching(&self) -> bool {
        // SAFETY: reads the state of a live device.
        unsafe { bindings::device_get_state(self.as_raw()) == bindings::DS_ATTACHING }
    }

    /// The softc the glue declared (`struct nvmehp_softc`), allocated and zeroed by newbus.
    /// Only meaningful for a device whose driver is nvmehp; NULL when it has no driver.
    pub fn softc(&self) -> *mut bindings::nvmehp_softc {
        // SAFETY: device_get_softc only reads the device.
        unsafe { bindings::device_get_softc(self.as_raw()).cast() }
    }

    /// Reads `width` (1, 2 or 4) bytes of config space at `reg`; all-ones once the function is
    /// gone.
    pub fn pci_read_config(&self, reg: c_int, width: c_int) -> u32 {
        // SAFETY: pci_read_config(9) on a device whose parent is a pci bus (only PCI devices
        // reach the nvmehp methods); `width` is 1, 2 or 4 at every call site.
        unsafe { bindings::nvmehp_pci_read_config(self.as_raw(), reg, width) }
    }

    /// Cached class code (byte 0x0b of config space).
    pub fn pci_class(&self) -> u8 {
        // SAFETY: ivar read on a PCI child, as above.
        unsafe { bindings::nvmehp_pci_get_class(self.as_raw()) }
    }

    /// Cached subclass (byte 0x0a).
    pub fn pci_subclass(&self) -> u8 {
        // SAFETY: as above.
        unsafe { bindings::nvmehp_pci_get_subclass(self.as_raw()) }
    }

    /// Cached programming interface (byte 0x09).
    pub fn pci_progif(&self) -> u8 {
        // SAFETY: as above.
        unsafe { bindings::nvmehp_pci_get_progif(self.as_raw()) }
    }

    /// PCI slot (device number) on its bus.
    pub fn pci_slot(&self) -> u8 {
        // SAFETY: ivar read on a PCI child, as above.
        unsafe { bindings::nvmehp_pci_get_slot(self.as_raw()) }
    }

    /// PCI function number.
    pub fn pci_function(&self) -> u8 {
        // SAFETY: ivar read on a PCI child, as above.
        unsafe { bindings::nvmehp_pci_get_function(self.as_raw()) }
    }

    /// Enables bus mastering (DMA) in the command register.
    pub fn enable_busmaster(&self) -> Result<(), c_int> {
        // SAFETY: kobj call to the parent pci bus.
        match unsafe { bindings::nvmehp_pci_enable_busmaster(self.as_raw()) } {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// How many MSI-X vectors the function offers (0: none).
    pub fn msix_count(&self) -> c_int {
        // SAFETY: kobj call to the parent pci bus.
        unsafe { bindings::nvmehp_pci_msix_count(self.as_raw()) }
    }

    /// Allocates up to `want` MSI-X vectors; returns how many were granted. They become IRQ
    /// resources with rid 1..=n. Release with [`Device::release_msi`] after every IRQ
    /// resource is released.
    pub fn alloc_msix(&self, want: c_int) -> Result<c_int, c_int> {
        let mut count = want;
        // SAFETY: kobj call to the parent pci bus; `count` is a valid in/out int.
        match unsafe { bindings::nvmehp_pci_alloc_msix(self.as_raw(), &mut count) } {
            0 => Ok(count),
            e => Err(e),
        }
    }

    /// Gives back MSI/MSI-X vectors.
    pub fn release_msi(&self) -> Result<(), c_int> {
        // SAFETY: kobj call to the parent pci bus.
        match unsafe { bindings::nvmehp_pci_release_msi(self.as_raw()) } {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Turns bus mastering off in the command register (pci.c pci_disable_busmaster_method
    /// clears PCIM_CMD_BUSMASTEREN): a function that is still there can no longer start DMA.
    pub fn disable_busmaster(&self) -> Result<(), c_int> {
        // SAFETY: kobj call to the parent pci bus.
        match unsafe { bindings::nvmehp_pci_disable_busmaster(self.as_raw()) } {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// The memory BAR (`PCIR_BAR(n)`, a resource ID) holding the MSI-X table; `None` without
    /// MSI-X.
    pub fn msix_table_bar(&self) -> Option<c_int> {
        // SAFETY: kobj call to the parent pci bus.
        let rid = unsafe { bindings::nvmehp_pci_msix_table_bar(self.as_raw()) };
        (rid >= 0).then_some(rid)
    }

    /// The memory BAR holding the MSI-X Pending Bit Array (may be the table's); `None`
    /// without MSI-X.
    pub fn msix_pba_bar(&self) -> Option<c_int> {
        // SAFETY: kobj call to the parent pci bus.
        let rid = unsafe { bindings::nvmehp_pci_msix_pba_bar(self.as_raw()) };
        (rid >= 0).then_some(rid)
    }

    /// How many MSI messages the function offers (0: none).
    pub fn msi_count(&self) -> c_int {
        // SAFETY: kobj call to the parent pci bus.
        unsafe { bindings::nvmehp_pci_msi_count(self.as_raw()) }
    }

    /// Allocates up to `want` MSI messages; returns how many were granted (IRQ resources with
    /// rid 1..=n). Release with [`Device::release_msi`] after every IRQ resource is released.
    pub fn alloc_msi(&self, want: c_int) -> Result<c_int, c_int> {
        let mut count = want;
        // SAFETY: kobj call to the parent pci bus; `count` is a valid in/out int.
        match unsafe { bindings::nvmehp_pci_alloc_msi(self.as_raw(), &mut count) } {
            0 => Ok(count),
            e => Err(e),
        }
    }

    /// Cached vendor ID.
    pub fn pci_vendor(&self) -> u16 {
        // SAFETY: as above.
        unsafe { bindings::nvmehp_pci_get_vendor(self.as_raw()) }
    }

    /// Cached device ID.
    pub fn pci_device(&self) -> u16 {
        // SAFETY: as above.
        unsafe { bindings::nvmehp_pci_get_device(self.as_raw()) }
    }

    /// Cached subsystem vendor ID.
    pub fn pci_subvendor(&self) -> u16 {
        // SAFETY: as above.
        unsafe { bindings::nvmehp_pci_get_subvendor(self.as_raw()) }
    }

    /// Cached subsystem device ID.
    pub fn pci_subdevice(&self) -> u16 {
        // SAFETY: as above.
        unsafe { bindings::nvmehp_pci_get_subdevice(self.as_raw()) }
    }
}
