//! ACPI PCI hotplug slots at run time: discovery, notify handlers, the hotplug task and the
//! FreeBSD [`SlotOps`], wired to the OS-neutral state machine in `crate::hotplug`.
//!
//! Contexts (the contract in `crate::hotplug`):
//! - **Notify handler** (an `acpi_task` thread, [`SlotNotify`]): under the pending mutex,
//!   `PendingEvents::notify`; enqueue our task if that made work appear. Nothing else.
//! - **Hotplug task** (our own taskqueue, one thread, [`HotplugTask`]): the first runs discover
//!   the slots under `\_SB_.PCI0`, on pci0 and behind its PCI-PCI bridges
//!   ([`super::slot_discovery`]; retried each second while a PCI bus is not attached yet, as
//!   when the module is loaded from loader.conf), decide ownership per slot
//!   (`hotplug::mode::resolve`) and install our handlers on owned slots. Later runs take the
//!   pending bits and run `SlotMachine::run` with [`FreeBsdSlots`], whose every action takes
//!   `bus_topo_lock()` itself.
//! - **Fallback callout** (`hw.nvme_hotplug.rescan_interval_ms`): `FallbackRescan::tick` under
//!   the pending mutex, enqueue the task.
//! - **Controllers** ([`controller_lost`], [`namespace_changed`]), from their interrupt or
//!   watchdog: record a quiet check or a namespace change for their slot and enqueue the task;
//!   a namespace change of a controller outside the discovered slots waits by its PCI location
//!   ([`super::outside_rescan`]) for [`OutsideNsTask`], on the same queue.
//!
//! Single-slot rescan: FreeBSD exports no "rescan this slot" KPI, and acpi_pci answers a device
//! check with `BUS_RESCAN` of the whole bus (acpi_pci.c acpi_pci_device_notify_handler), which also
//! deletes every child of
//! *other* slots whose function stopped answering. `rescan_slot` instead walks the one slot
//! under the topology lock ([`super::slot_rescan`]: what pci_rescan_method does for a slot,
//! through the global `pci_read_device`/`pci_add_child`), adding and attaching only that
//! slot's new functions. When the walk cannot be done (ARI below the bridge, a function that
//! could not be added) the check fails (`_OST` non-specific failure) and says so; it does not
//! fall back to `BUS_RESCAN`: pci_rescan_method (sys/dev/pci/pci.c) deletes every child whose
//! function stopped answering, whatever its driver, and an nvme(4) controller's detach sleeps
//! until its disks are unmounted (nvd.c nvd_controller_fail), which our task, drained at
//! unload, must never wait for.

use super::acpi::{AcpiHandle, NotifyHandler, NotifyRegistration, NotifyValue};
use super::alloc::box_waitok;
use super::bus_topo::TopoLock;
use super::callout::{Callout, CalloutHandler};
use super::device::Device;
use super::kernel::{OwnedQueue, Timer};
use super::mutex::Mutex;
use super::outside_rescan::{Added, OutsideRescans, WAITING_MAX};
use super::pci_bus::PciBus;
use super::slot_discovery::{self, BusPath, Found};
use super::taskqueue::{Task, TaskHandler, TimeoutTask};
use super::tunables::{self, Stat};
use crate::fallible::{push_within_capacity, try_collect, try_vec_with_capacity};
use crate::hotplug::fallback::FallbackRescan;
use crate::hotplug::machine::{HotplugConfig, SlotMachine};
use crate::hotplug::mode::{self, AcpiMode, InTreeHandler, Role};
use crate::hotplug::ost::OstStatus;
use crate::hotplug::pending::{PendingEvents, PendingSnapshot};
use crate::hotplug::slot_ops::{DetachError, DetachReason, LeftAlone, OpFailed, SlotIndex, SlotOps};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU8, Ordering};

/// The ACPI object of the PCI root bus (QEMU i440fx and q35, bhyve, EC2 Nitro).
const ROOT_BUS_PATH: &core::ffi::CStr = c"\\_SB_.PCI0";
/// Discovery retries (one per second) while a PCI bus is not attached yet.
const DISCOVERY_TRIES: u32 = 120;

/// The pending events and whether the module is stopping (no more enqueues or re-arms).
pub struct PendingState {
    events: PendingEvents,
    stopping: bool,
}

/// The state only the hotplug task touches.
struct MachineState {
    machine: SlotMachine,
    snapshot: PendingSnapshot,
}

/// One hotplug slot: a device number on one pci bus (the same number on two buses is two
/// slots).
struct SlotInfo {
    handle: AcpiHandle,
    /// How to find the bus the slot's functions are children of (pci0, or a bridge's
    /// secondary bus), again at each action ([`FreeBsdSlots::bus`]).
    path: BusPath,
    /// That bus's `device_t` when it was last found: compared with a controller's parent by
    /// [`Hotplug::slot_of`], never dereferenced (it may have been freed since).
    bus_seen: AtomicPtr<c_void>,
    pci_slot: u8,
    /// acpi_pci's handler is on this slot (it drives `bus`).
    in_tree: InTreeHandler,
    role: Role,
}

/// What discovery found; immutable after it, except through its mutexes and the task cell.
struct Discovered {
    slots: Vec<SlotInfo>,
    pending: Pin<Box<Mutex<PendingState>>>,
    /// Only the hotplug task's thread uses it (see [`HotplugTask`]).
    machine: UnsafeCell<MachineState>,
    /// Our notify handlers, taken out (under the lock) and dropped (outside it) at unload.
    notify: Pin<Box<Mutex<Vec<NotifyRegistration<SlotNotify>>>>>,
    /// The fallback callout, taken out at unload.
    fallback: Pin<Box<Mutex<Option<Timer>>>>,
}

// SAFETY: the cell is used by the hotplug task thread alone; everything else is behind
// mutexes or immutable after discovery.
unsafe impl Sync for Discovered {}
// SAFETY: as above.
unsafe impl Send for Discovered {}

/// The module's hotplug state, from MOD_LOAD to MOD_UNLOAD.
pub struct Hotplug {
    mode: AcpiMode,
    interval_ms: u32,
    stopping: AtomicBool,
    /// [`RUNNING`], [`PAUSED`] (MOD_QUIESCE until the unload ends) or [`RESUMING`] (an
    /// unload was refused: the task reinstalls our handlers and runs again).
    run_state: AtomicU8,
    tries: AtomicU32,
    /// Set once by discovery; freed at unload.
    disc: AtomicPtr<Discovered>,
    task: AtomicPtr<Task<'static, HotplugTask>>,
    rerun: AtomicPtr<TimeoutTask<'static, HotplugTask>>,
    /// Controllers outside the discovered slots whose namespaces changed ([`namespace_changed`]).
    outside: Pin<Box<Mutex<OutsideRescans>>>,
    /// Their rescans, on the hotplug task's queue ([`OutsideNsTask`]).
    outside_task: AtomicPtr<Task<'static, OutsideNsTask>>,
}

/// The one instance, for the controllers' callbacks. Null before MOD_LOAD and after unload.
static HOTPLUG: AtomicPtr<Hotplug> = AtomicPtr::new(core::ptr::null_mut());

fn hotplug() -> Option<&'static Hotplug> {
    // SAFETY: set at MOD_LOAD to a leaked Hotplug; cleared and freed at MOD_UNLOAD only after
    // every controller detached and every handler, callout and task was drained, so no
    // reader remains.
    unsafe { HOTPLUG.load(Ordering::Acquire).as_ref() }
}

impl Hotplug {
    fn disc(&self) -> Option<&Discovered> {
        // SAFETY: published once (Release) by discovery, freed only at unload (see hotplug()).
        unsafe { self.disc.load(Ordering::Acquire).as_ref() }
    }

    fn enqueue(&self) {
        // SAFETY: the task lives in the module's queue until unload, which first drains it.
        if let Some(t) = unsafe { self.task.load(Ordering::Acquire).as_ref() } {
            t.enqueue();
        }
    }

    fn enqueue_outside(&self) {
        // SAFETY: as enqueue.
        if let Some(t) = unsafe { self.outside_task.load(Ordering::Acquire).as_ref() } {
            t.enqueue();
        }
    }

    fn rerun_after(&self, us: u64) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: as enqueue.
        if let Some(t) = unsafe { self.rerun.load(Ordering::Acquire).as_ref() } {
            t.enqueue_after(us);
        }
    }

    /// The slot index of a PCI function: the slot with its device number on *its* parent bus.
    fn slot_of(&self, dev: Device) -> Option<(&Discovered, SlotIndex)> {
        let d = self.disc()?;
        let bus = dev.parent()?;
        let s = dev.pci_slot();
        let bus = bus.as_raw().cast::<c_void>();
        d.slots.iter().position(|x| x.bus_seen.load(Ordering::Acquire) == bus && x.pci_slot == s).map(|i| (d, i))
    }
}

/// The module's share of the hotplug machinery, kept by `module.rs` from load to unload.
pub struct HotplugModule {
    hp: NonNull<Hotplug>,
    /// Our task queue with the hotplug task and its timeout twin.
    pub queue: Option<OwnedQueue>,
}

// SAFETY: only the module event handler (serialised by the kld lock) uses it.
unsafe impl Send for HotplugModule {}

/// MOD_LOAD: reads the tunables, creates our task queue and starts discovery on it. Sleeps.
pub fn load() -> Result<HotplugModule, core::ffi::c_int> {
    let mode = match tunables::acpi_mode() {
        Ok(m) => m,
        Err(raw) => {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            kprintf!(
                "nvme_hotplug: hw.nvme_hotplug.acpi_mode=\"{}\" is not auto, own or off; using auto\n",
                core::str::from_utf8(&raw[..end]).unwrap_or("?")
            );
            AcpiMode::Auto
        }
    };
    super::claim::announce(tunables::claim());
    // M_WAITOK, as the Hotplug itself: a failed allocation here would fail MOD_LOAD, where
    // discovery's allocations only disable ACPI hotplug.
    let outside = Mutex::new_boxed_waitok(c"nvmehp outside", OutsideRescans::default());
    let hp = NonNull::from(Box::leak(box_waitok(Hotplug {
        mode,
        interval_ms: tunables::rescan_interval_ms(),
        stopping: AtomicBool::new(false),
        run_state: AtomicU8::new(RUNNING),
        tries: AtomicU32::new(0),
        disc: AtomicPtr::new(core::ptr::null_mut()),
        task: AtomicPtr::new(core::ptr::null_mut()),
        rerun: AtomicPtr::new(core::ptr::null_mut()),
        outside,
        outside_task: AtomicPtr::new(core::ptr::null_mut()),
    })));
    let mut m = HotplugModule { hp, queue: None };
    // A failure from here on frees what was made (`finish`: the queue's thread is stopped by
    // taskqueue_free) before returning: MOD_LOAD's error never reaches the kernel linker
    // (driver_module_handler overwrites it, see module.rs), so nothing may stay behind.
    let q = match OwnedQueue::new(c"nvmehp_hotplug") {
        Ok(q) => m.queue.insert(q),
        Err(e) => {
            m.finish();
            return Err(e);
        }
    };
    let r = HpRef(hp);
    let (Some(task), Some(rerun), Some(outside)) = (q.add_task(0, HotplugTask(r)), q.add_timeout_task(0, HotplugTask(r)), q.add_task(0, OutsideNsTask(r))) else {
        m.finish();
        return Err(super::bindings::ENOMEM);
    };
    // SAFETY: `hp` is the leaked Hotplug, alive until unload.
    let h = unsafe { hp.as_ref() };
    h.task.store(task.as_ptr(), Ordering::Release);
    h.rerun.store(rerun.as_ptr(), Ordering::Release);
    h.outside_task.store(outside.as_ptr(), Ordering::Release);
    HOTPLUG.store(hp.as_ptr(), Ordering::Release);
    h.enqueue(); // first run: discovery
    Ok(m)
}

/// A pointer to the module's [`Hotplug`], for handlers and tasks (all drained before it is
/// freed).
#[derive(Clone, Copy)]
struct HpRef(NonNull<Hotplug>);
// SAFETY: Hotplug is Sync (atomics, mutexes, the task-only cell).
unsafe impl Send for HpRef {}
// SAFETY: as above.
unsafe impl Sync for HpRef {}
impl core::ops::Deref for HpRef {
    type Target = Hotplug;
    fn deref(&self) -> &Hotplug {
        // SAFETY: alive until unload, which drains every holder first.
        unsafe { self.0.as_ref() }
    }
}

// --- notify handler -------------------------------------------------------------------------

/// Our ACPI notify handler for one owned slot.
pub struct SlotNotify {
    hp: HpRef,
    index: SlotIndex,
}

fn notify_value(v: NotifyValue) -> u32 {
    match v {
        NotifyValue::BusCheck => 0,
        NotifyValue::DeviceCheck => 1,
        NotifyValue::EjectRequest => 3,
        NotifyValue::Other(x) => x,
    }
}

impl NotifyHandler for SlotNotify {
    /// ACPI task thread: record, enqueue, return. No AML, no newbus, no sleep.
    fn notify(&self, _handle: AcpiHandle, value: NotifyValue) {
        Stat::Notifies.add(1);
        let Some(d) = self.hp.disc() else { return };
        let enqueue = {
            let mut p = d.pending.lock();
            !p.stopping && p.events.notify(self.index, notify_value(value))
        };
        if enqueue {
            self.hp.enqueue();
        }
    }
}

// --- fallback callout -----------------------------------------------------------------------

/// The periodic quiet check of every slot.
struct FallbackTick {
    hp: HpRef,
    rescan: FallbackRescan,
}

impl CalloutHandler<PendingState> for FallbackTick {
    fn fire(&self, p: &mut PendingState) -> Option<u64> {
        if p.stopping {
            return None;
        }
        if self.rescan.tick(&mut p.events) {
            self.hp.enqueue();
        }
        self.rescan.interval_ms().map(|ms| u64::from(ms) * 1000)
    }
}

// --- controllers ----------------------------------------------------------------------------

/// A controller's watchdog or interrupt found it gone or dead: ask the hotplug task to check
/// the slots (a stale device is then detached with `DetachReason::Gone`). Never sleeps.
pub fn controller_lost(dev: Device) {
    if !check_slots_quietly(dev) {
        dev_printf!(
            &dev,
            "not in a known hotplug slot: detach it with `devctl detach {}` or `devctl rescan` its bus\n",
            core::str::from_utf8(dev.nameunit().to_bytes()).unwrap_or("?")
        );
    }
}

/// Our attach of `dev` failed and its function no longer answers config reads: it vanished
/// during the bring-up (a surprise removal). newbus keeps a child whose attach failed,
/// driverless (device_probe_and_attach, sys/kern/subr_bus.c), and a rescan never probes a
/// child it already has (pci_rescan_method and our single-slot walk skip known functions), so
/// the next controller hot-added into that slot would never be attached. The quiet check the
/// watchdog path asks for deletes it (a driverless child whose function is gone is stale:
/// `detach_slot` with `DetachReason::Gone`). Outside a known hotplug slot nothing is said:
/// `devctl rescan` of its bus deletes it, as for any function that left. Never sleeps.
pub fn function_vanished_during_attach(dev: Device) {
    let _ = check_slots_quietly(dev);
}

/// Records a quiet check of every slot and wakes the task; `false` when `dev` is not in one
/// of our discovered slots (nothing recorded).
fn check_slots_quietly(dev: Device) -> bool {
    let Some(hp) = hotplug() else { return true };
    let Some((d, _)) = hp.slot_of(dev) else { return false };
    let enqueue = {
        let mut p = d.pending.lock();
        !p.stopping && p.events.check_all_quietly()
    };
    if enqueue {
        hp.enqueue();
    }
    true
}

/// A controller reported a namespace attribute change: rescan its namespaces from the
/// hotplug task's thread, through its slot's pending bits when it is in a discovered slot,
/// else by its PCI location ([`super::outside_rescan`]). Never sleeps.
pub fn namespace_changed(dev: Device) {
    let Some(hp) = hotplug() else { return };
    if let Some((d, i)) = hp.slot_of(dev) {
        let enqueue = {
            let mut p = d.pending.lock();
            !p.stopping && p.events.namespace_changed(i)
        };
        if enqueue {
            hp.enqueue();
        }
        return;
    }
    if hp.stopping.load(Ordering::Acquire) {
        return; // unloading: the controller is about to be detached anyway
    }
    let Some(loc) = dev.parent().and_then(|bus| PciBus::new(bus).location_of(dev)) else { return };
    let added = hp.outside.lock().add(loc);
    match added {
        Added::New => hp.enqueue_outside(),
        Added::AlreadyWaiting => {}
        Added::Full => dev_printf!(&dev, "namespace change not rescanned: {} other controllers are waiting for theirs\n", WAITING_MAX),
    }
}

/// The namespace rescans of controllers outside the discovered slots (on the hotplug task's
/// queue: one thread, so never at the same time as a [`HotplugTask`] run).
pub struct OutsideNsTask(HpRef);

impl TaskHandler for OutsideNsTask {
    fn run(&self, _pending: u32) {
        let hp = &*self.0;
        // Paused for MOD_QUIESCE: a rescan's lease would make the unload's detach refuse. The
        // locations keep waiting; the resume wakes this task again.
        if hp.stopping.load(Ordering::Acquire) || hp.run_state.load(Ordering::Acquire) != RUNNING {
            return;
        }
        loop {
            let Some(loc) = hp.outside.lock().take() else { break };
            let topo = TopoLock::lock();
            // Found again by location under the lock: the notice's device_t may be gone.
            let Some(dev) = PciBus::function_at(loc).filter(|&d| driver_of(d) == Driver::Ours) else { continue };
            // Errors are said by the rescan itself; a detach in progress refuses the lease.
            let _ = super::pci_driver::rescan_namespaces(dev, &topo);
        }
    }
}

// --- the task -------------------------------------------------------------------------------

/// The hotplug task (and its timeout twin, on the same one-thread queue, so the two never
/// run at the same time).
pub struct HotplugTask(HpRef);

impl TaskHandler for HotplugTask {
    fn run(&self, _pending: u32) {
        let hp = &*self.0;
        if hp.stopping.load(Ordering::Acquire) {
            return;
        }
        match hp.run_state.load(Ordering::Acquire) {
            PAUSED => return, // MOD_QUIESCE: the unload may still be refused
            RESUMING => resume(self.0),
            _ => {}
        }
        if hp.run_state.load(Ordering::Acquire) != RUNNING {
            return; // paused again meanwhile
        }
        let Some(d) = hp.disc() else {
            discover(self.0);
            return;
        };
        // SAFETY: only this task's thread reaches the machine: both tasks that run this code
        // are on one queue with one thread, so no two runs overlap.
        let ms = unsafe { &mut *d.machine.get() };
        d.pending.lock().events.take(&mut ms.snapshot);
        let mut ops = FreeBsdSlots { d };
        let r = ms.machine.run(&ms.snapshot, &mut ops);
        Stat::Rescans.add(i64::from(r.rescans));
        Stat::Ejects.add(i64::from(r.ejects));
        Stat::EjectsRefused.add(i64::from(r.refused));
        Stat::HotplugFailures.add(i64::from(r.failures));
        if r.detaches + r.ejected + r.refused + r.failures > 0 {
            kprintf!(
                "nvme_hotplug: hotplug run: {} rescans, {} detaches ({} stale), {} ejected, {} refused, {} failures, {} left alone\n",
                r.rescans,
                r.detaches,
                r.swept,
                r.ejected,
                r.refused,
                r.failures,
                r.left_alone
            );
        }
        if let Some(us) = r.rerun_after_us {
            hp.rerun_after(u64::from(us));
        }
    }
}

/// Finds the hotplug slots, decides ownership and installs our handlers. Runs on our task.
fn discover(hp: HpRef) {
    let tries = hp.tries.fetch_add(1, Ordering::AcqRel) + 1;
    let Ok(root) = AcpiHandle::lookup(ROOT_BUS_PATH) else {
        // Loaded from loader.conf, the ACPI namespace may not be loaded yet: retry.
        if tries < DISCOVERY_TRIES {
            hp.rerun_after(1_000_000);
        } else {
            kprintf!("nvme_hotplug: no ACPI \\_SB_.PCI0; ACPI hotplug disabled (controllers still work)\n");
        }
        return;
    };
    let bus = {
        let topo = TopoLock::lock();
        root.device().and_then(|pcib| topo.find_child(pcib, c"pci", -1))
    };
    let Some(bus) = bus else {
        if tries < DISCOVERY_TRIES {
            hp.rerun_after(1_000_000); // PCI not attached yet (loaded from loader.conf)
        } else {
            kprintf!("nvme_hotplug: {:?} has no pci bus after {} s; ACPI hotplug disabled\n", root, tries);
        }
        return;
    };
    let found: Found = match slot_discovery::find_slots(root, PciBus::new(bus)) {
        Ok(f) => f,
        Err(e) => {
            kprintf!("nvme_hotplug: walking {:?} failed: {}; ACPI hotplug disabled\n", root, e);
            return;
        }
    };
    if !found.missing.is_empty() {
        if tries < DISCOVERY_TRIES {
            hp.rerun_after(1_000_000); // a bridge or its bus not attached yet
            return;
        }
        for b in &found.missing {
            kprintf!("nvme_hotplug: {:?} has hotplug slots but no pci bus below it after {} s; not serving them\n", b, tries);
        }
    }
    let buses = found.buses();
    // Everything the hotplug machinery needs is allocated here, once; a failure disables ACPI
    // hotplug (controllers attached by `devctl` or claim still work) instead of panicking.
    let nomem = |what: &str| {
        kprintf!("nvme_hotplug: out of memory for the {} of {} hotplug slots; ACPI hotplug disabled\n", what, found.slots.len());
    };
    let Ok(mut slots) = try_vec_with_capacity::<SlotInfo>(found.slots.len()) else {
        return nomem("slot table");
    };
    let (mut owned, mut downgraded) = (0u32, 0u32);
    for f in found.slots.iter() {
        let res = mode::resolve(hp.mode, f.in_tree);
        owned += u32::from(res.role == Role::Owner);
        downgraded += u32::from(res.downgraded);
        // Within the capacity reserved above: cannot fail.
        let _ = push_within_capacity(
            &mut slots,
            SlotInfo {
                handle: f.handle,
                path: f.path,
                bus_seen: AtomicPtr::new(f.bus.device().as_raw().cast()),
                pci_slot: f.pci_slot,
                in_tree: f.in_tree,
                role: res.role,
            },
        );
    }
    // acpi_pci's handler is on every slot of the buses it drives (slot_discovery): on stock
    // FreeBSD, all of them.
    let all_in_tree = slots.iter().all(|s| s.in_tree == InTreeHandler::Fixed);
    let Ok(roles) = try_collect(slots.iter().map(|s| s.role)) else {
        return nomem("slot roles");
    };
    let Ok(events) = PendingEvents::new(slots.len()) else {
        return nomem("pending events");
    };
    let Ok(snapshot) = events.snapshot_buffer() else {
        return nomem("pending-event snapshot");
    };
    let Ok(machine) = SlotMachine::new(roles, HotplugConfig::default()) else {
        return nomem("slot state machines");
    };
    let Ok(notify_regs) = try_vec_with_capacity(slots.len()) else {
        return nomem("notify handler registrations");
    };
    let (Some(pending), Some(notify), Some(fallback)) = (
        Mutex::new_boxed(c"nvmehp pending", PendingState { events, stopping: false }),
        Mutex::new_boxed(c"nvmehp notify", notify_regs),
        Mutex::new_boxed(c"nvmehp fallback", None),
    ) else {
        return nomem("locks");
    };
    let d = Box::leak(box_waitok(Discovered {
        slots,
        pending,
        machine: UnsafeCell::new(MachineState { machine, snapshot }),
        notify,
        fallback,
    }));
    hp.disc.store(d, Ordering::Release);
    let installed = install_notify_handlers(hp, d);
    if downgraded > 0 {
        kprintf!(
            "nvme_hotplug: acpi_mode=own: acpi_pci's notify handler cannot be removed from {} slots; observing them\n",
            downgraded
        );
    }
    if all_in_tree && owned == 0 && !d.slots.is_empty() {
        // Stock FreeBSD: say plainly what runs and what does not (nvme_hotplug.4, "STOCK
        // FREEBSD"). acpi_pci's handler is a static function of acpi_pci.c, so a module cannot
        // remove it, and two acting handlers would detach and _EJ0 twice (mode.rs).
        kprintf!(
            "nvme_hotplug: acpi_pci handles these slots (its handler cannot be removed): it rescans the bus on a device check and detaches + _EJ0s on an eject request\n"
        );
        kprintf!(
            "nvme_hotplug: running: safe detach of nvmehp controllers, eject refused (EBUSY, no _EJ0) while a node or disk is open, namespace rescans; not running: _OST, slot-only rescans, stale-device sweeps\n"
        );
    }
    let rescan = FallbackRescan::new(hp.interval_ms);
    if let Some(ms) = rescan.interval_ms() {
        // SAFETY: the pending mutex lives in the leaked Discovered until unload, which drops
        // this callout (after draining it) before freeing the Discovered.
        let pend: &'static Mutex<PendingState> = unsafe { &*(&*d.pending as *const Mutex<PendingState>) };
        if let Some(c) = Callout::new(pend, FallbackTick { hp, rescan }) {
            c.as_ref().reset(&pend.lock(), u64::from(ms) * 1000);
            *d.fallback.lock() = Some(Timer(c));
        }
    }
    kprintf!(
        "nvme_hotplug: {} hotplug slots under {:?} (acpi_mode={}): {} owned ({} handlers), {} observed, on {} pci buses; fallback rescan {}\n",
        d.slots.len(),
        root,
        hp.mode.as_str(),
        owned,
        installed,
        d.slots.len() as u32 - owned,
        buses,
        if rescan.is_enabled() { "on" } else { "off" }
    );
}

// --- SlotOps --------------------------------------------------------------------------------

/// Who drives a PCI function's `device_t`, for the rule that the hotplug task detaches and
/// deletes only what is its own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Driver {
    /// nvmehp: our detach never waits for users of a gone device (the disk is freed from
    /// `d_gone` later), and refuses with EBUSY for an eject while a node or disk is open.
    Ours,
    /// No driver took it (`DS_NOTPRESENT`): deleting it runs no driver code.
    None,
    /// Another driver (nvme(4), or anything else): never touched.
    Other,
}

fn driver_of(dev: Device) -> Driver {
    if !dev.is_alive() {
        Driver::None
    } else if dev.class_name() == c"nvmehp" {
        Driver::Ours
    } else {
        Driver::Other
    }
}

/// The state machine's actions on FreeBSD. Each takes `bus_topo_lock()` itself.
pub struct FreeBsdSlots<'a> {
    d: &'a Discovered,
}

impl FreeBsdSlots<'_> {
    fn slot(&self, i: SlotIndex) -> Option<&SlotInfo> {
        self.d.slots.get(i)
    }

    /// The slot's pci bus now (see [`BusPath`] for why it is found again at each action, and
    /// why it then stays for the action). `None`: newbus has no such bus now (its bridge was
    /// detached), so the slot has no device either.
    fn bus(&self, topo: &TopoLock, s: &SlotInfo) -> Option<PciBus> {
        let bus = s.path.resolve(topo)?;
        s.bus_seen.store(bus.device().as_raw().cast(), Ordering::Release);
        Some(bus)
    }

    /// Some function of the slot has a `device_t` (any function: function 0's may have been
    /// deleted by hand while another's is still attached). Under the topology lock.
    fn any_child(&self, topo: &TopoLock, s: &SlotInfo) -> bool {
        let Some(bus) = self.bus(topo, s) else { return false };
        (0..=super::bindings::PCI_FUNCMAX as u8).any(|f| bus.child_at(s.pci_slot, f).is_some())
    }

    /// Detaches and deletes function `f` of slot `s`, if it has a `device_t`, for
    /// [`SlotOps::detach_slot`], which has checked the slot's functions.
    ///
    /// **The `device_t` is looked up again after the detach.** device_detach runs our
    /// DEVICE_DETACH, whose teardown sleeps (pause, taskqueue and callout drains,
    /// destroy_dev), and a sleeping thread gives up Giant, which is what `bus_topo_lock` takes
    /// (sys/kern/subr_bus.c). `topo` is held again when the detach returns, but meanwhile
    /// another thread may have deleted the device (`devctl delete`, a `BUS_RESCAN` by hand):
    /// device_delete_child frees the `device_t` (kobj_delete in sys/kern/subr_bus.c). (While
    /// our teardown sleeps, a second detach is refused by the softc's state, see pci_driver.rs
    /// `Attached`; but device_detach goes on after DEVICE_DETACH returned, with steps that may
    /// sleep too, such as device_sysctl_fini taking the sysctl lock, and then our softc state
    /// is gone.) Nothing
    /// in newbus keeps a `device_t` alive for us across the sleep: it has no reference count,
    /// and a device_busy reference, which makes device_detach and so device_delete_child
    /// (which detaches first) fail with EBUSY, would make our own device_detach fail just the
    /// same. Or a driver may have been attached to the device meanwhile (`devctl attach`, a
    /// driver loaded meanwhile probes every device without one): deleting it would run that
    /// driver's detach, which for nvme(4) sleeps until its disks are unmounted. So after the
    /// detach the function is found again (`pci_find_dbsf`, under the lock) and only a device
    /// that is there and has no driver is deleted; that runs no driver code, whichever
    /// `device_t` it is.
    fn detach_function(&self, topo: &TopoLock, s: &SlotInfo, f: u8, why: DetachReason) -> Result<(), DetachError> {
        let Some(bus) = self.bus(topo, s) else { return Ok(()) }; // gone with its bus
        let Some(child) = bus.child_at(s.pci_slot, f) else { return Ok(()) };
        let child = match driver_of(child) {
            Driver::None => child, // not attached: device_delete_child alone, no sleep before it
            Driver::Other => return Err(DetachError::NotOurs),
            Driver::Ours => {
                // Checked for every function before the first detach; again here because an
                // earlier function's detach slept, and a node may have been opened meanwhile.
                if why == DetachReason::Eject && super::pci_driver::in_use(child, topo) {
                    dev_printf!(&child, "eject request refused: a node or disk is open\n");
                    return Err(DetachError::InUse);
                }
                match topo.detach(child) {
                    Ok(()) => {}
                    Err(e) if e == super::bindings::EBUSY => return Err(DetachError::Busy),
                    Err(e) => {
                        dev_printf!(&child, "detach for {:?} failed: {}\n", why, e);
                        return Err(DetachError::Failed);
                    }
                }
                // `child` may be freed now: look the function up again (see above).
                match bus.child_at(s.pci_slot, f) {
                    None => return Ok(()), // deleted meanwhile: what we were doing
                    Some(c) if driver_of(c) == Driver::None => c,
                    Some(c) => {
                        dev_printf!(&c, "slot {:?}: a driver attached it while its detach slept; not deleting it\n", s.handle);
                        return Err(DetachError::Failed);
                    }
                }
            }
        };
        topo.delete_child(bus.device(), child).map_err(|e| {
            kprintf!("nvme_hotplug: device_delete_child in slot {:?} failed: {}\n", s.handle, e);
            DetachError::Failed
        })
    }
}

impl SlotOps for FreeBsdSlots<'_> {
    fn present(&mut self, i: SlotIndex) -> bool {
        let Some(s) = self.slot(i) else { return false };
        let topo = TopoLock::lock();
        self.bus(&topo, s).is_some_and(|bus| bus.slot_present(s.pci_slot))
    }

    fn sta(&mut self, i: SlotIndex) -> Option<u32> {
        let s = self.slot(i)?;
        if !s.handle.has(c"_STA") {
            return None;
        }
        s.handle.status().ok()
    }

    fn has_child(&mut self, i: SlotIndex) -> bool {
        let Some(s) = self.slot(i) else { return false };
        let topo = TopoLock::lock();
        self.any_child(&topo, s)
    }

    fn rescan_slot(&mut self, i: SlotIndex) -> Result<(), OpFailed> {
        let Some(s) = self.slot(i) else { return Err(OpFailed) };
        let topo = TopoLock::lock();
        let Some(bus) = self.bus(&topo, s) else {
            kprintf!("nvme_hotplug: slot {:?}: its pci bus is gone (bridge detached); not rescanned\n", s.handle);
            return Err(OpFailed);
        };
        match super::slot_rescan::rescan_slot(&topo, &bus, s.pci_slot) {
            Ok(scan) => {
                if scan.added > 0 {
                    kprintf!(
                        "nvme_hotplug: slot {:?}: {} new functions, {} attached\n",
                        s.handle,
                        scan.added,
                        scan.attached
                    );
                }
                Ok(())
            }
            // No whole-bus fallback (module doc): it would detach other drivers' devices.
            Err(e) => {
                let dev = bus.device();
                kprintf!(
                    "nvme_hotplug: slot {:?}: {}; not rescanning the whole bus from the hotplug task: `devctl rescan {}` does\n",
                    s.handle,
                    e,
                    core::str::from_utf8(dev.nameunit().to_bytes()).unwrap_or("pci")
                );
                Err(OpFailed)
            }
        }
    }

    /// Detaches and deletes the slot's functions, only on a slot we own and only if every
    /// function is ours or driverless and, for an eject, none is open: all are checked before
    /// the first is detached (a slot is refused whole, never half detached).
    ///
    /// - **Never another driver's device.** nvme(4)'s detach sleeps until every disk of the
    ///   controller has been closed (`nvd_controller_fail`, sys/dev/nvd/nvd.c): a mounted file
    ///   system would hold this task, and with it kldunload, which drains the task. So a slot
    ///   with any function of another driver is refused as a whole ([`DetachError::NotOurs`])
    ///   before anything is detached; the administrator can `devctl detach` it.
    /// - **Driverless children** (no driver took them) are deleted: `device_delete_child` of a
    ///   device that is not attached runs no driver code and waits for nobody, which is what
    ///   `pci_rescan_method` (sys/dev/pci/pci.c) does to a function that stopped answering. That
    ///   is safe only because no rescan of the bus can run concurrently: slots we own are on a
    ///   bus acpi_pci does not drive (`acpi_pci_probe` takes only buses with an ACPI handle), so
    ///   no notify handler rescans it. (`devctl rescan` by hand is the administrator's race.)
    /// - **Never on an observed slot.** The state machine does not ask (its observer rule); the
    ///   role is checked again here so that no caller can get around it.
    fn detach_slot(&mut self, i: SlotIndex, why: DetachReason) -> Result<(), DetachError> {
        let Some(s) = self.slot(i) else { return Err(DetachError::Failed) };
        if s.role != Role::Owner {
            kprintf!("nvme_hotplug: slot {:?} is only observed: not detaching it\n", s.handle);
            return Err(DetachError::Failed);
        }
        let topo = TopoLock::lock();
        let Some(bus) = self.bus(&topo, s) else {
            kprintf!("nvme_hotplug: slot {:?}: its pci bus is gone (bridge detached); not detaching\n", s.handle);
            return Err(DetachError::Failed);
        };
        // Re-checked under the lock: someone else (acpi_pci, devctl) may have removed it. Every
        // function: an eject must not find "no device" at function 0 and power the slot off
        // under another function's driver.
        if !self.any_child(&topo, s) {
            return Err(DetachError::NoDevice);
        }
        // Every function first: a slot is refused whole, never half detached. An eject of a
        // slot whose function 0 is open would otherwise detach function 1 and then be refused,
        // leaving a slot that stays with a function nobody drives.
        for f in 0..=super::bindings::PCI_FUNCMAX as u8 {
            let Some(child) = bus.child_at(s.pci_slot, f) else { continue };
            if driver_of(child) == Driver::Other {
                // A sweep's NotOurs is reported by left_alone (once, not at every tick).
                if why == DetachReason::Eject {
                    dev_printf!(
                        &child,
                        "slot {:?}: eject request refused: it is another driver's device (devctl detach it first)\n",
                        s.handle
                    );
                }
                return Err(DetachError::NotOurs);
            }
            if why == DetachReason::Eject && super::pci_driver::in_use(child, &topo) {
                dev_printf!(&child, "eject request refused: a node or disk is open\n");
                return Err(DetachError::InUse);
            }
        }
        // Functions last first, as Linux's disable_slot does (drivers/pci/hotplug/acpiphp_glue.c).
        for f in (0..=super::bindings::PCI_FUNCMAX as u8).rev() {
            self.detach_function(&topo, s, f, why)?;
        }
        Ok(())
    }

    fn eject(&mut self, i: SlotIndex) -> Result<(), OpFailed> {
        let Some(s) = self.slot(i) else { return Err(OpFailed) };
        s.handle.eject().map_err(|e| {
            kprintf!("nvme_hotplug: _EJ0 on {:?} failed: {}\n", s.handle, e);
            OpFailed
        })
    }

    fn ost(&mut self, i: SlotIndex, source: u32, status: OstStatus) {
        let Some(s) = self.slot(i) else { return };
        if let Err(e) = s.handle.ost(source, status.code()) {
            kprintf!("nvme_hotplug: _OST({:#x}, {:#x}) on {:?} failed: {}\n", source, status.code(), s.handle, e);
        }
    }

    /// Rescans the namespaces of every controller of ours in the slot: the pending bit says
    /// which slot reported a change, not which function, and a multi-function slot may hold
    /// our controller at any function (function 0 may be another driver's). Each function is
    /// looked up when its turn comes, since the rescan before it slept.
    fn rescan_namespaces(&mut self, i: SlotIndex) -> Result<(), OpFailed> {
        let Some(s) = self.slot(i) else { return Err(OpFailed) };
        let topo = TopoLock::lock();
        let (mut ours, mut failed) = (0u32, 0u32);
        for f in 0..=super::bindings::PCI_FUNCMAX as u8 {
            // Found again for each function: the rescan before it slept.
            let Some(child) = self.bus(&topo, s).and_then(|b| b.child_at(s.pci_slot, f)) else { continue };
            if driver_of(child) != Driver::Ours {
                continue;
            }
            ours += 1;
            failed += u32::from(super::pci_driver::rescan_namespaces(child, &topo).is_err());
        }
        if ours == 0 || failed > 0 { Err(OpFailed) } else { Ok(()) }
    }

    fn left_alone(&mut self, i: SlotIndex, what: LeftAlone) {
        let Some(s) = self.slot(i) else { return };
        let topo = TopoLock::lock();
        let dev = self.bus(&topo, s).map(|b| b.device());
        let bus = dev.as_ref().and_then(|d| core::str::from_utf8(d.nameunit().to_bytes()).ok()).unwrap_or("pci");
        let who = if s.in_tree == InTreeHandler::Absent { "acpi_mode=off" } else { "acpi_pci handles this slot" };
        let (what, who) = match what {
            LeftAlone::Stale => ("its device is gone", who),
            LeftAlone::New => ("a new function answers", who),
            LeftAlone::OtherDriver => ("its device is gone", "another driver's device: `devctl detach` it first"),
        };
        kprintf!("nvme_hotplug: slot {:?}: {}; left alone ({}): `devctl rescan {}` updates the bus\n", s.handle, what, who, bus);
    }
}

// --- unload ---------------------------------------------------------------------------------

impl HotplugModule {
    /// First half of MOD_UNLOAD: no new work from now on (notifies, fallback ticks, reruns,
    /// discovery), and the running task has finished. Sleeps.
    pub fn stop(&mut self) {
        // SAFETY: alive until `finish`.
        let hp = unsafe { self.hp.as_ref() };
        hp.stopping.store(true, Ordering::Release);
        if let Some(d) = hp.disc() {
            d.pending.lock().stopping = true;
        }
        if let Some(q) = self.queue.as_ref() {
            q.drain_all();
        }
    }

    /// Our notify handlers, taken out so that dropping them (AcpiRemoveNotifyHandler, which
    /// waits) happens without a lock held. From the unload thread only.
    pub fn take_notify_handlers(&self) -> Vec<NotifyRegistration<SlotNotify>> {
        // SAFETY: alive until `finish`.
        let hp = unsafe { self.hp.as_ref() };
        hp.disc().map(|d| core::mem::take(&mut *d.notify.lock())).unwrap_or_default()
    }

    /// Gives back handlers that could not be removed (unload refused): they stay with the
    /// module, whose memory and code they need, and are tried again at the next unload.
    pub fn keep_notify_handlers(&self, regs: Vec<NotifyRegistration<SlotNotify>>) {
        // SAFETY: alive until `finish`.
        let hp = unsafe { self.hp.as_ref() };
        let Some(d) = hp.disc() else { return };
        let mut regs = regs;
        let mut v = d.notify.lock();
        if v.is_empty() {
            // The usual case (nothing was installed since they were taken): no allocation.
            core::mem::swap(&mut *v, &mut regs);
        } else if v.try_reserve(regs.len()).is_ok() {
            while let Some(r) = regs.pop() {
                if let Err(r) = push_within_capacity(&mut v, r) {
                    let _ = push_within_capacity(&mut regs, r); // room it just left
                    break;
                }
            }
        }
        drop(v);
        // What could not be kept (no memory): dropping tries the removal once more and leaks each
        // context whose handler stays installed (the module stays loaded either way).
        drop(regs);
    }

    /// The fallback callout, if armed, for the unload order to drain.
    pub fn take_fallback(&self) -> Option<Timer> {
        // SAFETY: alive until `finish`.
        let hp = unsafe { self.hp.as_ref() };
        hp.disc().and_then(|d| d.fallback.lock().take())
    }

    /// Last step: frees the hotplug state. Every handler, callout and task referring to it
    /// must have been removed or drained (the unload order did).
    pub fn finish(self) {
        HOTPLUG.store(core::ptr::null_mut(), Ordering::Release);
        let HotplugModule { hp, queue } = self;
        drop(queue);
        // SAFETY: leaked in load/discover, reclaimed once here, after every user was drained.
        unsafe {
            let h = Box::from_raw(hp.as_ptr());
            let d = h.disc.load(Ordering::Acquire);
            if !d.is_null() {
                drop(Box::from_raw(d));
            }
        }
    }
}

// --- pausing for MOD_QUIESCE, resuming after a refused unload ------------------------------

/// The hotplug task acts on events.
const RUNNING: u8 = 0;
/// MOD_QUIESCE paused it: runs return at once; events stay pending.
const PAUSED: u8 = 1;
/// An unload was refused after MOD_QUIESCE: the next run reinstalls our handlers, then acts.
const RESUMING: u8 = 2;

/// Asks the hotplug task to resume after a refused unload: it reinstalls our notify handlers
/// (removed at MOD_QUIESCE), checks every slot once for what it missed, and acts on events
/// again. Never sleeps, so a refusing DEVICE_DETACH may call it from any thread; the work is
/// done on the task's own thread. A pause that comes first wins (the unload goes on).
pub fn request_resume() {
    let Some(hp) = hotplug() else { return };
    if hp.run_state.compare_exchange(PAUSED, RESUMING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
        hp.enqueue();
    }
}

/// Installs our notify handler on every slot we own that has none of ours yet (discovery: none
/// has; a resume after a refused unload: those whose removal failed were kept). Returns how many
/// were installed. On the task's thread, never an ACPI thread, so a registration that cannot be
/// kept may be removed at once.
fn install_notify_handlers(hp: HpRef, d: &Discovered) -> u32 {
    let mut installed = 0u32;
    for (i, s) in d.slots.iter().enumerate().filter(|(_, s)| s.role == Role::Owner) {
        if d.notify.lock().iter().any(|r| r.handle() == s.handle) {
            continue; // kept: its removal failed
        }
        let Some(h) = super::alloc::try_box_with(|| SlotNotify { hp, index: i }) else {
            kprintf!("nvme_hotplug: out of memory for the notify handler of {:?}; slot not served\n", s.handle);
            continue;
        };
        match NotifyRegistration::install(s.handle, h) {
            Ok(reg) => {
                let mut v = d.notify.lock();
                let room = v.len() < v.capacity() || v.try_reserve(1).is_ok();
                match if room { push_within_capacity(&mut v, reg) } else { Err(reg) } {
                    Ok(()) => installed += 1,
                    Err(reg) => {
                        drop(v);
                        kprintf!("nvme_hotplug: out of memory keeping the notify handler of {:?}; slot not served\n", s.handle);
                        drop(reg); // cannot keep it: remove it now (not an ACPI thread)
                    }
                }
            }
            Err((st, _)) => kprintf!("nvme_hotplug: cannot install notify handler on {:?}: {}\n", s.handle, st),
        }
    }
    installed
}

/// On the task's thread: the resume [`request_resume`] asked for.
fn resume(hp: HpRef) {
    let mut installed = 0u32;
    if let Some(d) = hp.disc() {
        installed = install_notify_handlers(hp, d);
        // Notifications that came while our handlers were removed are lost: look at every
        // slot once.
        d.pending.lock().events.check_all_quietly();
    }
    if hp.run_state.compare_exchange(RESUMING, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
        kprintf!("nvme_hotplug: unload refused: ACPI hotplug resumed ({} notify handlers reinstalled)\n", installed);
        if hp.outside.lock().any() {
            hp.enqueue_outside(); // namespace changes that came while paused
        }
    }
}

impl HotplugModule {
    /// MOD_QUIESCE: the hotplug task acts on nothing from now on (runs return at once; our
    /// handlers and the fallback callout still record events) and the run in progress, if
    /// any, has finished. Undone by [`request_resume`]. Sleeps; not from the task's thread.
    pub fn pause(&self) {
        // SAFETY: alive until `finish`.
        let hp = unsafe { self.hp.as_ref() };
        hp.run_state.store(PAUSED, Ordering::Release);
        if let Some(q) = self.queue.as_ref() {
            q.drain_all();
        }
    }
}
