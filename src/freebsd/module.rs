//! The module event handler, chained behind `driver_module_handler` by DRIVER_MODULE.
//!
//! MOD_LOAD runs before the nvmehp driver is added to the pci bus, so it may prepare global
//! state the driver relies on. MOD_UNLOAD runs only after every nvmehp device has detached
//! (newbus refuses the unload with EBUSY otherwise), so it may tear that state down.

use super::bindings::{self, module_t};
use core::ffi::{c_int, c_void};

#[no_mangle]
pub extern "C" fn nvmehp_modevent(_module: module_t, what: c_int, _arg: *mut c_void) -> c_int {
    match what as bindings::modeventtype {
        bindings::MOD_LOAD => {
            // SAFETY: an atomic load of an int owned by the glue.
            let claim = unsafe { bindings::nvmehp_tunable_claim() };
            kprintf!("nvme_hotplug: loaded, hw.nvme_hotplug.claim={}\n", claim);
            0
        }
        bindings::MOD_UNLOAD => {
            kprintf!("nvme_hotplug: unloaded\n");
            0
        }
        bindings::MOD_QUIESCE | bindings::MOD_SHUTDOWN => 0,
        _ => bindings::EOPNOTSUPP,
    }
}
