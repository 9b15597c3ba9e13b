//! A memory BAR from `bus_alloc_resource(9)`, used as the controller's register window.

use super::bindings;
use super::device::Device;
use crate::platform::RegisterIo;
use core::ffi::c_int;
use core::ptr::NonNull;

/// An active `SYS_RES_MEMORY` resource, released when dropped.
///
/// Every access is bounds-checked against the resource size: an offset outside the BAR reads as
/// all-ones (like a vanished device) and writes are dropped, instead of faulting the kernel.
pub struct MemResource {
    dev: Device,
    rid: c_int,
    res: NonNull<bindings::resource>,
    size: u64,
}

// SAFETY: bus_space accesses are plain loads/stores to device memory, valid from any thread;
// the resource is released only in Drop.
unsafe impl Send for MemResource {}
// SAFETY: as above; the register semantics are the engine's concern.
unsafe impl Sync for MemResource {}

impl MemResource {
    /// Allocates and activates the memory BAR whose config-space register is `rid`
    /// (`PCIR_BAR(n)`). `None` if the bus has no such resource.
    pub fn alloc(dev: Device, rid: c_int) -> Option<Self> {
        let mut rid_io = rid;
        // SAFETY: bus_alloc_resource_any() spelled out (it is static inline): whole range, count
        // 1, active. `rid_io` is a valid in/out int.
        let res = unsafe {
            bindings::bus_alloc_resource(
                dev.as_raw(),
                bindings::SYS_RES_MEMORY,
                &mut rid_io,
                0,
                !0,
                1,
                bindings::RF_ACTIVE as u32,
            )
        };
        let res = NonNull::new(res)?;
        // SAFETY: `res` is the live resource just allocated.
        let size = unsafe { bindings::rman_get_size(res.as_ptr()) };
        Some(MemResource { dev, rid: rid_io, res, size })
    }

    /// The resource ID (config register) this BAR was allocated with.
    pub fn rid(&self) -> c_int {
        self.rid
    }

    /// The BAR's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn in_range(&self, off: u32) -> bool {
        u64::from(off).is_multiple_of(4) && u64::from(off) + 4 <= self.size
    }
}

impl RegisterIo for MemResource {
    fn read32(&self, off: u32) -> u32 {
        if !self.in_range(off) {
            return u32::MAX;
        }
        // SAFETY: aligned 32-bit access inside the active resource.
        unsafe { bindings::nvmehp_bus_read_4(self.res.as_ptr(), u64::from(off)) }
    }

    fn write32(&self, off: u32, val: u32) {
        if !self.in_range(off) {
            return;
        }
        // SAFETY: aligned 32-bit access inside the active resource.
        unsafe { bindings::nvmehp_bus_write_4(self.res.as_ptr(), u64::from(off), val) }
    }
}

impl MemResource {
    /// A copy of the register window that does not own the resource, for the one thing that
    /// must reach the registers without holding the engine (which owns this resource) or its
    /// mutex: the stop that runs after the engine gave the controller up
    /// ([`crate::nvme::DeviceStop`]).
    ///
    /// # Safety
    /// The window must not be used after this resource is dropped.
    pub unsafe fn window(&self) -> RegWindow {
        RegWindow { res: self.res, size: self.size }
    }
}

/// A borrowed view of a [`MemResource`]'s registers, with the same bounds checks; see
/// [`MemResource::window`] for who may hold one and for how long.
#[derive(Clone, Copy)]
pub struct RegWindow {
    res: NonNull<bindings::resource>,
    size: u64,
}

// SAFETY: as for MemResource: bus_space accesses are valid from any thread, and the resource
// outlives every use of the window (MemResource::window's contract).
unsafe impl Send for RegWindow {}
// SAFETY: as above.
unsafe impl Sync for RegWindow {}

impl RegisterIo for RegWindow {
    fn read32(&self, off: u32) -> u32 {
        if !(u64::from(off).is_multiple_of(4) && u64::from(off) + 4 <= self.size) {
            return u32::MAX;
        }
        // SAFETY: aligned 32-bit access inside the resource, which is still active
        // (MemResource::window's contract).
        unsafe { bindings::nvmehp_bus_read_4(self.res.as_ptr(), u64::from(off)) }
    }

    fn write32(&self, off: u32, val: u32) {
        if !(u64::from(off).is_multiple_of(4) && u64::from(off) + 4 <= self.size) {
            return;
        }
        // SAFETY: as in read32.
        unsafe { bindings::nvmehp_bus_write_4(self.res.as_ptr(), u64::from(off), val) }
    }
}

impl Drop for MemResource {
    fn drop(&mut self) {
        // SAFETY: the resource was allocated for `dev` and is released once; nothing uses it
        // after (we own the only handle).
        let err = unsafe { bindings::bus_release_resource(self.dev.as_raw(), self.res.as_ptr()) };
        if err != 0 {
            crate::dev_printf!(&self.dev, "bus_release_resource(rid {:#x}) failed: {}\n", self.rid, err);
        }
    }
}
