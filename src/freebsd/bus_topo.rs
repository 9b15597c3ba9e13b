//! Newbus topology changes: detach, delete, add a PCI function, probe+attach, all under
//! `bus_topo_lock()`.
//!
//! The newbus tree (devices, their children, drivers) may only change under the topology lock
//! (Giant in disguise). A [`TopoLock`] guard is the proof the functions here require, so a
//! caller cannot forget it. Everything here sleeps: call from a taskqueue thread or another
//! sleepable context with no mutex held.

use super::bindings;
use super::device::Device;
use super::pci_bus::PciBus;
use core::ffi::{c_int, CStr};
use core::marker::PhantomData;

/// `bus_topo_lock()` held; unlocked on drop.
pub struct TopoLock {
    _not_send: PhantomData<*const ()>,
}

impl TopoLock {
    /// Takes the topology lock (sleeps until it is ours).
    pub fn lock() -> Self {
        // SAFETY: bus_topo_lock takes a sleepable lock; the guard releases it on this thread.
        unsafe { bindings::bus_topo_lock() };
        TopoLock { _not_send: PhantomData }
    }

    /// Adds the newbus child for `slot`.`func` of `bus`, as pci's own rescan does for a
    /// function it did not know (its `pci_identify_function`): `pci_read_device` through the
    /// bus's bridge, then `pci_add_child` on the bus. The child is added, not probed (see
    /// [`TopoLock::probe_and_attach`]). `Ok(None)`: the function stopped answering between the
    /// caller's presence check and this read. `Err`: the child did not appear in pci's device
    /// list (the bus has no bridge, or its number does not fit pci_find_dbsf's u8).
    /// The caller must have checked that no child exists for this function: a second devinfo
    /// for one function would shadow the first in pci's list.
    pub fn add_pci_function(&self, bus: &PciBus, slot: u8, func: u8) -> Result<Option<Device>, c_int> {
        let pcib = bus.device().parent().ok_or(bindings::ENXIO)?;
        let (domain, number) = (bus.domain(), bus.number());
        let (Ok(d), Ok(b)) = (c_int::try_from(domain), u8::try_from(number)) else {
            return Err(bindings::EINVAL);
        };
        // SAFETY: pcib is the live bridge of the live pci bus `bus`; under the topology lock,
        // as pci_rescan_method runs. pci_read_device allocates with M_WAITOK (we may sleep).
        let dinfo = unsafe {
            bindings::pci_read_device(pcib.as_raw(), bus.device().as_raw(), d, c_int::from(b), c_int::from(slot), c_int::from(func))
        };
        if dinfo.is_null() {
            return Ok(None);
        }
        // SAFETY: the devinfo pci_read_device just returned for a child of `bus`; pci_add_child
        // takes it over (it becomes the new device's ivars).
        unsafe { bindings::pci_add_child(bus.device().as_raw(), dinfo) };
        bus.child_at(slot, func).map(Some).ok_or(bindings::ENXIO)
    }

    /// `device_probe_and_attach(9)`: finds the best driver for a new child and attaches it.
    /// An error (no driver wants it, or attach failed) leaves the child in the tree, unattached,
    /// as pci's rescan does.
    pub fn probe_and_attach(&self, dev: Device) -> Result<(), c_int> {
        // SAFETY: a live device, under the topology lock; may sleep (we are in a task).
        errno(unsafe { bindings::device_probe_and_attach(dev.as_raw()) })
    }

    /// `device_detach(9)`: runs the driver's detach; the device stays in the tree.
    pub fn detach(&self, dev: Device) -> Result<(), c_int> {
        // SAFETY: a live device, under the topology lock.
        errno(unsafe { bindings::device_detach(dev.as_raw()) })
    }

    /// `device_delete_child(9)`: detaches (if needed) and removes `child` from `parent`.
    /// `child` must not be used afterwards (the handle is consumed).
    pub fn delete_child(&self, parent: Device, child: Device) -> Result<(), c_int> {
        // SAFETY: both live, `child` a child of `parent`, under the topology lock.
        errno(unsafe { bindings::device_delete_child(parent.as_raw(), child.as_raw()) })
    }

    /// The child of `parent` in devclass `class` with `unit` (-1: the first one).
    pub fn find_child(&self, parent: Device, class: &CStr, unit: c_int) -> Option<Device> {
        // SAFETY: lookup in a live device's child list, under the topology lock.
        unsafe { Device::from_raw(bindings::device_find_child(parent.as_raw(), class.as_ptr(), unit)) }
    }
}

impl TopoLock {
    /// Every device of devclass `class` (e.g. all attached `nvmehp` units), lowest unit first.
    pub fn devices_of_class(&self, class: &CStr) -> impl Iterator<Item = Device> + '_ {
        // SAFETY: devclass lookups walk newbus lists, stable under the topology lock.
        let dc = unsafe { bindings::devclass_find(class.as_ptr()) };
        // SAFETY: as above; devclass_get_maxunit accepts NULL (returns -1).
        let max = if dc.is_null() { 0 } else { unsafe { bindings::devclass_get_maxunit(dc) }.max(0) };
        (0..max).filter_map(move |unit| {
            // SAFETY: as above; the device returned is alive while the lock is held.
            unsafe { Device::from_raw(bindings::devclass_get_device(dc, unit)) }
        })
    }
}

impl TopoLock {
    /// `device_busy(9)`: holds `dev` busy until the returned reference is dropped. In
    /// FreeBSD 15, device_detach refuses a device whose busy count is not zero with EBUSY,
    /// before it calls DEVICE_DETACH (sys/kern/subr_bus.c device_detach; device_quiesce and
    /// so MOD_QUIESCE refuse it too), so neither acpi_pci's eject, `devctl detach`, a slot
    /// detach nor kldunload can detach the device, and newbus cannot free its softc, while
    /// the reference is held. Taken under the topology lock, on an attached device: the
    /// caller has looked it up and checked it under the same lock.
    pub fn busy(&self, dev: Device) -> BusyRef {
        // SAFETY: a live device, under the topology lock (it cannot be deleted meanwhile).
        unsafe { bindings::device_busy(dev.as_raw()) };
        BusyRef { dev }
    }
}

/// A busy reference on a device ([`TopoLock::busy`]); `device_unbusy(9)` on drop. The device
/// cannot be detached, hence not deleted, while it is held, so the handle stays valid.
#[must_use = "the device is busy only while the reference is held"]
pub struct BusyRef {
    dev: Device,
}

impl BusyRef {
    /// The busy device.
    pub fn device(&self) -> Device {
        self.dev
    }
}

impl Drop for BusyRef {
    fn drop(&mut self) {
        // SAFETY: the device is alive (a busy device is never detached or deleted) and this
        // reference holds one of its busy counts; device_unbusy is a refcount release.
        unsafe { bindings::device_unbusy(self.dev.as_raw()) };
    }
}

impl Drop for TopoLock {
    fn drop(&mut self) {
        // SAFETY: this thread took the lock in TopoLock::lock.
        unsafe { bindings::bus_topo_unlock() };
    }
}

fn errno(e: c_int) -> Result<(), c_int> {
    if e == 0 { Ok(()) } else { Err(e) }
}
