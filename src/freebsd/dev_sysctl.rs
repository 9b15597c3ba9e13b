//! Per-device read-only counters, `dev.nvmehp.N.*`, in a sysctl context the driver owns.
//!
//! Why not the device's own context (`device_get_sysctl_ctx`): newbus frees it only after the
//! softc, so a handler could read freed memory in between. Ours is removed by the driver,
//! before the counters' memory goes: `sysctl_ctx_free(9)` waits for running handlers
//! (sysctl_remove_oid sleeps on `oid_running`), the same drain-before-free rule as every
//! other callback.

use super::bindings;
use super::device::Device;
use core::ffi::CStr;
use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

/// A sysctl context with the oids added to it; removed (waiting for readers) when dropped.
pub struct DevSysctls {
    ctx: NonNull<bindings::sysctl_ctx_list>,
}

// SAFETY: the context is only used by its owner (add at attach, free at detach); the kernel
// locks its own tree.
unsafe impl Send for DevSysctls {}

impl DevSysctls {
    /// An empty context. Sleeps (M_WAITOK).
    pub fn new() -> Option<Self> {
        // SAFETY: plain allocation + sysctl_ctx_init in the glue.
        NonNull::new(unsafe { bindings::nvmehp_sysctl_ctx_create() }).map(|ctx| DevSysctls { ctx })
    }

    /// Adds `dev.<name><unit>.<name>`, read-only, reading `value`.
    ///
    /// # Safety
    /// `value` must stay valid until this context is dropped.
    pub unsafe fn add_u64(&self, dev: Device, name: &'static CStr, value: &AtomicU64, descr: &'static CStr) -> bool {
        // SAFETY: a live context and device; the kernel reads the u64 at `value.as_ptr()` (an
        // aligned 64-bit load, never torn on amd64) until the oid is removed, which happens
        // before `value` goes away (contract). Names are copied by sysctl_add_oid.
        unsafe {
            bindings::nvmehp_dev_sysctl_u64(self.ctx.as_ptr(), dev.as_raw(), name.as_ptr(), value.as_ptr(), descr.as_ptr())
                == 0
        }
    }
}

impl DevSysctls {
    /// Adds `dev.<name><unit>.<name>`, a read-only string that never changes.
    pub fn add_str(&self, dev: Device, name: &'static CStr, value: &'static CStr, descr: &'static CStr) -> bool {
        // SAFETY: a live context and device; `value` is 'static and the kernel only reads it
        // (CTLFLAG_RD). Names are copied by sysctl_add_oid.
        unsafe {
            bindings::nvmehp_dev_sysctl_string(self.ctx.as_ptr(), dev.as_raw(), name.as_ptr(), value.as_ptr(), descr.as_ptr())
                == 0
        }
    }
}

impl Drop for DevSysctls {
    fn drop(&mut self) {
        // SAFETY: our context, freed once; sysctl_ctx_free waits for handlers still running.
        unsafe { bindings::nvmehp_sysctl_ctx_destroy(self.ctx.as_ptr()) }
    }
}
