//! Newbus topology changes: detach, delete, rescan, all under `bus_topo_lock()`.
//!
//! The newbus tree (devices, their children, drivers) may only change under the topology lock
//! (Giant in disguise). A [`TopoLock`] guard is the proof the functions here require, so a
//! caller cannot forget it. Everything here sleeps: call from a taskqueue thread or another
//! sleepable context with no mutex held.

use super::bindings;
use super::device::Device;
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

    /// `BUS_RESCAN(bus)`: re-enumerates the bus. New functions are probed and attached;
    /// children no longer found (config space reads 0xffff) are deleted.
    pub fn rescan(&self, bus: Device) -> Result<(), c_int> {
        // SAFETY: a live bus device, under the topology lock.
        errno(unsafe { bindings::nvmehp_bus_rescan(bus.as_raw()) })
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

impl Drop for TopoLock {
    fn drop(&mut self) {
        // SAFETY: this thread took the lock in TopoLock::lock.
        unsafe { bindings::bus_topo_unlock() };
    }
}

fn errno(e: c_int) -> Result<(), c_int> {
    if e == 0 { Ok(()) } else { Err(e) }
}
