//! The module event handler, chained behind `driver_module_handler` by DRIVER_MODULE.
//!
//! What the kernel does around it (sys/kern/subr_bus.c driver_module_handler,
//! sys/kern/kern_linker.c linker_file_unload, sys/kern/kern_module.c module_quiesce and
//! module_unload, which hold Giant, i.e. bus_topo_lock, around each event):
//! - **MOD_LOAD**: our handler runs first, then newbus adds the nvmehp driver to the pci
//!   devclass, and driver_module_handler returns *devclass_add_driver's* result: whatever our
//!   handler returns is overwritten. A failed load therefore never makes the kernel linker
//!   unload the module; the module stays, with the driver registered. So a failure here must
//!   leave nothing running and nothing allocated (`slots::load` frees what it made), say that
//!   ACPI hotplug is off, and leave a state MOD_QUIESCE and MOD_UNLOAD handle (no hotplug
//!   machinery). Controllers still attach and detach through newbus.
//! - **MOD_QUIESCE** (kldunload): newbus first asks every nvmehp device (device_quiesce, which
//!   refuses a busy one with EBUSY), then us. **Every refusal of ours is made here**, before
//!   anything is torn down: a stuck interrupt handler, a controller whose attach is asleep, an
//!   open node or disk (or a disk GEOM still holds), an ACPI notify handler that cannot be
//!   removed. On the way we set the "unloading" flag (opens and attaches refused), pause the
//!   hotplug task (the run in progress finishes; it runs no more rescans or detaches) and remove
//!   our ACPI notify handlers, from this thread (never an ACPI task thread). A refusal undoes
//!   all of it: flag cleared, task resumed, handlers reinstalled ([`slots::request_resume`]).
//! - **MOD_UNLOAD**: newbus first detaches every nvmehp device (devclass_delete_driver; each
//!   detach runs the teardown typestate) and calls us only if all of them detached: a refusal
//!   from us now would come after every controller was already gone. A detach that refuses
//!   (EBUSY) ends the unload *without* an event to us, so that detach itself undoes MOD_QUIESCE
//!   ([`detach_refused`]). Because such a refusal may also race an unload that goes on (and
//!   re-allows attaches), MOD_UNLOAD checks that no nvmehp device is attached before anything
//!   else is freed. If nothing refused, we stop the hotplug machinery for good and run
//!   the unload order (`hotplug::unload::unload`): drain the fallback callout and our task
//!   queue, destroy_dev_drain, wait for every `d_gone`, free the queue.
//! - **kldunload -f** (LINKER_UNLOAD_FORCE): MOD_QUIESCE still runs, but linker_file_unload
//!   ignores its veto. MOD_UNLOAD then still guarantees everything: the detaches refuse a
//!   controller that is in use, and our MOD_UNLOAD redoes the quiesce steps (task paused,
//!   handlers removed) before it frees anything, refusing if one fails. Only the refusals
//!   that can arise after the detaches remain in MOD_UNLOAD (an interrupt handler the detaches
//!   could not tear down, GEOM not letting go of a disk): the module then stays loaded with
//!   its controllers detached, the flag cleared and ACPI hotplug resumed.

use super::bindings::{self, module_t};
use super::bus_topo::TopoLock;
use super::ctrl::EngineGate;
use super::kernel::{disks_live, FreeBsdKernel};
use super::slots::{self, HotplugModule};
use crate::hotplug::unload::unload;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

/// Set from MOD_QUIESCE on: node and disk opens and controller attaches are refused.
static UNLOADING: AtomicBool = AtomicBool::new(false);
/// MOD_QUIESCE succeeded and nothing has undone it yet (task paused, handlers removed).
static QUIESCED: AtomicBool = AtomicBool::new(false);
/// ACPI notify handlers the standing MOD_QUIESCE removed (for the unload message).
static HANDLERS_REMOVED: AtomicU32 = AtomicU32::new(0);
/// The hotplug machinery between MOD_LOAD and MOD_UNLOAD (module events are serialised by
/// the kernel linker lock).
static HOTPLUG_MODULE: AtomicPtr<HotplugModule> = AtomicPtr::new(core::ptr::null_mut());

/// The module is being unloaded: refuse new opens and attaches.
pub fn unloading() -> bool {
    UNLOADING.load(Ordering::Acquire)
}

/// A DEVICE_DETACH refused with EBUSY. If it was one of MOD_UNLOAD's detaches, the unload ends
/// here and no module event follows (driver_module_handler calls our MOD_UNLOAD only if every
/// detach succeeded): undo MOD_QUIESCE, so opens work again and ACPI hotplug resumes. Never
/// sleeps (the resume runs on the hotplug task). A refused detach outside an unload changes
/// nothing. One that races an unload which then goes on (a second detach of a controller
/// whose first detach sleeps) re-allows attaches until MOD_UNLOAD, which redoes the quiesce
/// steps and refuses if a controller was attached meanwhile (`mod_unload`).
pub fn detach_refused() {
    if QUIESCED.swap(false, Ordering::AcqRel) {
        UNLOADING.store(false, Ordering::Release);
        slots::request_resume();
        kprintf!("nvme_hotplug: a controller refused to detach: unload abandoned\n");
    }
}

/// The hotplug machinery, if MOD_LOAD started it.
fn hotplug_module() -> Option<&'static HotplugModule> {
    // SAFETY: stored by load() from Box::into_raw; freed only by MOD_UNLOAD, which takes it
    // out of the static first. Module events are serialised, and only they call this.
    unsafe { HOTPLUG_MODULE.load(Ordering::Acquire).as_ref() }
}

/// Whether unloading must be refused: a controller's node or disk is open (or a rescan holds
/// it), or GEOM still holds a disk whose `d_gone` has not run.
fn busy() -> bool {
    let topo = TopoLock::lock();
    super::pci_driver::any_in_use(&topo) || disks_live() > super::pci_driver::live_disks(&topo)
}

/// How many nvmehp controllers are attached (MOD_UNLOAD: there must be none).
fn attached_count() -> usize {
    let topo = TopoLock::lock();
    let n = topo.devices_of_class(c"nvmehp").filter(|d| d.is_attached()).count();
    n
}

/// A controller's DEVICE_ATTACH is asleep: newbus would refuse to detach it ("device in
/// attaching state", sys/kern/subr_bus.c device_detach) without telling us.
fn attaching() -> bool {
    let topo = TopoLock::lock();
    let any = topo.devices_of_class(c"nvmehp").any(|d| d.is_attaching());
    any
}

/// Undoes what a quiesce did so far: opens work again, ACPI hotplug resumes.
fn refuse(why: core::fmt::Arguments<'_>) -> c_int {
    UNLOADING.store(false, Ordering::Release);
    slots::request_resume();
    kprintf!("nvme_hotplug: {}: not unloading\n", why);
    bindings::EBUSY
}

fn load() -> c_int {
    UNLOADING.store(false, Ordering::Release);
    QUIESCED.store(false, Ordering::Release);
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
            // Nothing of the hotplug machinery is left (no thread, no allocation). The error
            // could not fail the load anyway (driver_module_handler overwrites it with
            // devclass_add_driver's): the driver works without ACPI hotplug.
            kprintf!("nvme_hotplug: cannot start the hotplug task queue ({}): ACPI hotplug disabled\n", e);
            0
        }
    }
}

/// The quiesce steps (MOD_QUIESCE, and MOD_UNLOAD when they were skipped or undone). On
/// refusal everything is undone and EBUSY returned; on success, how many ACPI notify handlers
/// were removed.
fn quiesce() -> Result<u32, c_int> {
    // An interrupt handler that could not be torn down may still run our code.
    let stuck = super::ctrl::stuck_interrupts();
    if stuck > 0 {
        kprintf!("nvme_hotplug: {} interrupt handlers could not be torn down: not unloading\n", stuck);
        return Err(bindings::EBUSY);
    }
    if attaching() {
        kprintf!("nvme_hotplug: a controller is attaching: not unloading, try again\n");
        return Err(bindings::EBUSY);
    }
    // Before the busy check: an open racing with it is either counted by it or refused.
    UNLOADING.store(true, Ordering::Release);
    let m = hotplug_module();
    // The task's run in progress (which may be detaching or rescanning) finishes first.
    if let Some(m) = m {
        m.pause();
    }
    if busy() {
        return Err(refuse(format_args!("busy (a node or disk is open)")));
    }
    let Some(m) = m else { return Ok(0) };
    // Our ACPI handlers, from this (unload) thread, never an ACPI task thread
    // (AcpiRemoveNotifyHandler waits for the ACPI task queue). One that cannot be removed may
    // still be called: its context and this module's code must stay.
    let (mut stuck, mut removed) = (Vec::new(), 0u32);
    for reg in m.take_notify_handlers() {
        match reg.remove() {
            Ok(()) => removed += 1,
            Err((st, reg)) => {
            kprintf!("nvme_hotplug: AcpiRemoveNotifyHandler({:?}) failed: {}\n", reg.handle(), st);
                let room = stuck.len() < stuck.capacity() || stuck.try_reserve(1).is_ok();
                if let Err(reg) = if room { crate::fallible::push_within_capacity(&mut stuck, reg) } else { Err(reg) } {
                    drop(reg); // tries once more; leaks its context if that fails too
                }
            }
        }
    }
    if !stuck.is_empty() {
        let n = stuck.len();
        m.keep_notify_handlers(stuck);
        return Err(refuse(format_args!("{} ACPI notify handlers still installed", n)));
    }
    Ok(removed)
}

fn mod_quiesce() -> c_int {
    match quiesce() {
        Ok(removed) => {
            HANDLERS_REMOVED.store(removed, Ordering::Release);
            QUIESCED.store(true, Ordering::Release);
            0
        }
        Err(e) => e,
    }
}

fn mod_unload() -> c_int {
    // Newbus calls us only once every nvmehp device it walked has detached (checked below).
    if !QUIESCED.swap(false, Ordering::AcqRel) {
        // kldunload -f after a vetoed MOD_QUIESCE, or a refused detach undid it meanwhile.
        kprintf!("nvme_hotplug: MOD_UNLOAD without a standing MOD_QUIESCE: quiescing now\n");
        match quiesce() {
            Ok(removed) => HANDLERS_REMOVED.store(removed, Ordering::Release),
            Err(e) => return e,
        }
    }
    // Checked, not taken on trust: a detach refused while newbus's detaches ran (a second
    // detach of a controller whose first one sleeps) undid the standing MOD_QUIESCE through
    // detach_refused, attaches were allowed again meanwhile, and the walk
    // (devclass_delete_driver, sys/kern/subr_bus.c) visits each unit once, so a controller
    // attached behind it is still attached now. Its interrupt, callout and nodes call our code.
    let n = attached_count();
    if n > 0 {
        return refuse(format_args!("{} controllers still attached", n));
    }
    // Left from the detaches just done: a handler they could not tear down may still run our
    // code; GEOM's d_gone calls our code.
    let stuck = super::ctrl::stuck_interrupts();
    if stuck > 0 {
        return refuse(format_args!("{} interrupt handlers could not be torn down", stuck));
    }
    if disks_live() > 0 {
        // A last chance for GEOM's event thread to run the d_gone callbacks just queued.
        super::clock::sleep_ms(c"nvmehpdg", 100);
        if disks_live() > 0 {
            return refuse(format_args!("{} disks still held by GEOM", disks_live()));
        }
    }
    let p = HOTPLUG_MODULE.swap(core::ptr::null_mut(), Ordering::AcqRel);
    let removed = HANDLERS_REMOVED.swap(0, Ordering::AcqRel);
    if p.is_null() {
        kprintf!("nvme_hotplug: unloaded (no hotplug machinery)\n");
        return 0;
    }
    // SAFETY: stored by load() from Box::into_raw, taken out once.
    let mut m = *unsafe { alloc::boxed::Box::from_raw(p) };
    // For good now: no enqueues, re-arms or discovery; the running task finished.
    m.stop();
    let mut k = FreeBsdKernel::new();
    let mut fallback = m.take_fallback();
    let queue = m.queue.take();
    // Our handlers were removed by the quiesce (k holds none); no controller is left.
    if let Err(r) = unload::<FreeBsdKernel, EngineGate>(&mut k, Vec::new(), fallback.as_mut(), queue) {
        // Cannot happen without controllers; nothing was touched.
        return r.errno.0;
    }
    drop(fallback);
    m.finish();
    kprintf!("nvme_hotplug: unloaded ({} ACPI notify handlers removed)\n", removed);
    0
}

#[no_mangle]
pub extern "C" fn nvmehp_modevent(_module: module_t, what: c_int, _arg: *mut c_void) -> c_int {
    match what as bindings::modeventtype {
        bindings::MOD_LOAD => load(),
        bindings::MOD_QUIESCE => mod_quiesce(),
        bindings::MOD_UNLOAD => mod_unload(),
        bindings::MOD_SHUTDOWN => 0,
        _ => bindings::EOPNOTSUPP,
    }
}

/// Host tests: back to "loaded, not unloading" after a test that left an unload refused.
#[cfg(test)]
pub fn reset_for_tests() {
    UNLOADING.store(false, Ordering::Release);
    QUIESCED.store(false, Ordering::Release);
}
