//! The module event handler, chained behind `driver_module_handler` by DRIVER_MODULE.
//!
//! What newbus does around it (sys/kern/subr_bus.c driver_module_handler):
//! - **MOD_LOAD**: our handler runs *before* the nvmehp driver is added to the pci devclass.
//!   We start the hotplug machinery (`slots::load`): our task queue, whose first run discovers
//!   the ACPI slots and installs our notify handlers where we own the slot.
//! - **MOD_QUIESCE** (kldunload without -f): newbus asks every device, then us. **EBUSY policy**
//!   (`hotplug::unload`): refuse while any node or disk is open, or while GEOM still holds a
//!   disk of an already removed controller (its `d_gone` would call into unloaded code). We set
//!   the "unloading" flag *before* checking, so a `d_open` racing with the check is either seen
//!   by it (counted in the node's thread count) or refused by the flag.
//! - **MOD_UNLOAD**: newbus first detaches every nvmehp device (each runs the teardown
//!   typestate; one that is in use refuses with EBUSY and the unload stops), then calls us. We
//!   remove our ACPI handlers (from this thread, never an ACPI task thread) and refuse with
//!   EBUSY if one cannot be removed (it could still call into this module's code), then run
//!   `hotplug::unload::unload`: drain the fallback callout and our task queue,
//!   destroy_dev_drain, wait for every `d_gone`, free the queue. No controller is left for its
//!   teardown step.

use super::bindings::{self, module_t};
use super::bus_topo::TopoLock;
use super::ctrl::EngineGate;
use super::kernel::{disks_live, FreeBsdKernel};
use super::slots::{self, HotplugModule};
use crate::hotplug::unload::unload;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// Set from MOD_QUIESCE/MOD_UNLOAD on: node and disk opens are refused with ENXIO.
static UNLOADING: AtomicBool = AtomicBool::new(false);
/// The hotplug machinery between MOD_LOAD and MOD_UNLOAD (module events are serialised by
/// the kernel linker lock).
static HOTPLUG_MODULE: AtomicPtr<HotplugModule> = AtomicPtr::new(core::ptr::null_mut());

/// The module is being unloaded: refuse new opens.
pub fn unloading() -> bool {
    UNLOADING.load(Ordering::Acquire)
}

/// A detach refused with EBUSY ends an unload attempt (kldunload fails and the module
/// stays): accept opens again.
pub fn unload_refused() {
    UNLOADING.store(false, Ordering::Release);
}

/// Whether unloading must be refused: a controller's node or disk is open, or GEOM still holds
/// a disk whose `d_gone` has not run.
fn busy() -> bool {
    let topo = TopoLock::lock();
    super::pci_driver::any_in_use(&topo) || disks_live() > super::pci_driver::live_disks(&topo)
}

fn load() -> c_int {
    UNLOADING.store(false, Ordering::Release);
    match slots::load() {
        Ok(m) => {
            let b = super::alloc::box_waitok(m);
            HOTPLUG_MODULE.store(alloc::boxed::Box::into_raw(b), Ordering::Release);
            kprintf!(
                "nvme_hotplug: loaded (claim={}, acpi_mode and rescan_interval_ms under hw.nvme_hotplug)\n",
                u8::from(super::tunables::claim())
            );
            0
        }
        Err(e) => {
            // Not fatal (and driver_module_handler would ignore an error here anyway): the
            // controllers still attach and detach through newbus.
            kprintf!("nvme_hotplug: cannot start the hotplug task queue ({}): ACPI hotplug disabled\n", e);
            0
        }
    }
}

fn quiesce() -> c_int {
    if super::ctrl::stuck_interrupts() > 0 {
        kprintf!("nvme_hotplug: {} interrupt handlers could not be torn down: not unloading\n", super::ctrl::stuck_interrupts());
        return bindings::EBUSY;
    }
    UNLOADING.store(true, Ordering::Release);
    if busy() {
        UNLOADING.store(false, Ordering::Release);
        kprintf!("nvme_hotplug: busy (a node or disk is open): not unloading\n");
        return bindings::EBUSY;
    }
    0
}

fn unload_module() -> c_int {
    UNLOADING.store(true, Ordering::Release);
    // An interrupt handler that could not be torn down may still run our code.
    if super::ctrl::stuck_interrupts() > 0 {
        kprintf!("nvme_hotplug: {} interrupt handlers could not be torn down: not unloading\n", super::ctrl::stuck_interrupts());
        UNLOADING.store(false, Ordering::Release);
        return bindings::EBUSY;
    }
    // Every controller is detached by now; only disks GEOM still holds may remain. Their
    // d_gone runs our code: refuse rather than unload under them.
    if disks_live() > 0 {
        // A last chance for GEOM's event thread to run the d_gone callbacks just queued.
        super::clock::sleep_ms(c"nvmehpdg", 100);
        if disks_live() > 0 {
            kprintf!("nvme_hotplug: {} disks still open in GEOM: not unloading\n", disks_live());
            UNLOADING.store(false, Ordering::Release); // the module stays: opens work again
            return bindings::EBUSY;
        }
    }
    let p = HOTPLUG_MODULE.swap(core::ptr::null_mut(), Ordering::AcqRel);
    if p.is_null() {
        return 0;
    }
    // SAFETY: stored by load() from Box::into_raw, taken out once.
    let mut m = *unsafe { alloc::boxed::Box::from_raw(p) };
    // Nothing new from here: no enqueues, re-arms or discovery; the running task finished.
    m.stop();
    // Our ACPI handlers go first, from this (unload) thread, never an ACPI task thread. One
    // that cannot be removed may still be called: its context and the module's code must stay,
    // so the unload is refused before anything else is torn down (the hotplug machinery stays
    // stopped; the next kldunload retries).
    let mut handlers = 0u32;
    let mut stuck = Vec::new();
    for reg in m.take_notify_handlers() {
        match reg.remove() {
            Ok(()) => handlers += 1,
            Err((st, reg)) => {
                kprintf!("nvme_hotplug: AcpiRemoveNotifyHandler({:?}) failed: {}\n", reg.handle(), st);
                if stuck.try_reserve(1).is_ok() {
                    stuck.push(reg);
                } else {
                    drop(reg); // tries once more; leaks its context if that fails too
                }
            }
        }
    }
    if !stuck.is_empty() {
        kprintf!("nvme_hotplug: {} ACPI notify handlers still installed: not unloading (ACPI hotplug stopped)\n", stuck.len());
        m.keep_notify_handlers(stuck);
        HOTPLUG_MODULE.store(alloc::boxed::Box::into_raw(super::alloc::box_waitok(m)), Ordering::Release);
        UNLOADING.store(false, Ordering::Release);
        return bindings::EBUSY;
    }
    let mut k = FreeBsdKernel::new();
    let mut fallback = m.take_fallback();
    let queue = m.queue.take();
    match unload::<FreeBsdKernel, EngineGate>(&mut k, Vec::new(), fallback.as_mut(), queue) {
        Ok(_) => {}
        Err(r) => {
            // Cannot happen without controllers; nothing was touched.
            return r.errno.0;
        }
    }
    drop(fallback);
    m.finish();
    kprintf!("nvme_hotplug: unloaded ({} ACPI notify handlers removed)\n", handlers);
    0
}

#[no_mangle]
pub extern "C" fn nvmehp_modevent(_module: module_t, what: c_int, _arg: *mut c_void) -> c_int {
    match what as bindings::modeventtype {
        bindings::MOD_LOAD => load(),
        bindings::MOD_QUIESCE => quiesce(),
        bindings::MOD_UNLOAD => unload_module(),
        bindings::MOD_SHUTDOWN => 0,
        _ => bindings::EOPNOTSUPP,
    }
}
