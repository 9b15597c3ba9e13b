//! The `nvmehp` newbus driver on the pci bus: probe, attach, detach.
//!
//! The method table and DRIVER_MODULE are in kmod/nvme_hotplug_glue.c; these are the functions
//! it points to.
//!
//! **Who gets the controller.** nvme(4) is the system's NVMe driver and we never take a
//! controller from it by default:
//! - `hw.nvme_hotplug.claim=0` (default): probe bids `BUS_PROBE_NOWILDCARD`, which newbus
//!   (device_probe_child) turns into ENXIO unless the device's devclass was fixed explicitly
//!   (DF_FIXEDCLASS), i.e. after `devctl set driver -f nvme0 nvmehp`. Nothing attaches on its
//!   own, and a controller nvme(4) has attached is never probed again anyway.
//! - `hw.nvme_hotplug.claim=1`: probe bids `BUS_PROBE_HOOVER`, so nvmehp attaches to NVMe
//!   controllers only where nvme(4) is not loaded: nvme(4) bids BUS_PROBE_DEFAULT (-20) for the
//!   controllers it knows by ID and BUS_PROBE_GENERIC (-100) for any other of this class
//!   (sys/dev/nvme/nvme_pci.c), both above HOOVER. Not BUS_PROBE_LOW_PRIORITY: that is -40,
//!   which beats GENERIC and would take every controller nvme(4) does not know by ID (EC2's
//!   EBS volumes, the root disk included) away from it.
//!
//! **Attach**: BAR0, bus mastering, the engine's bring-up (synchronous, polled), then the
//! run-time pieces in the order their teardown undoes them: shared state, task queue with the
//! watchdog task, watchdog callout, interrupt (MSI-X, else INTx), and through the typestate
//! `Live` the controller node and per namespace a node and a disk.
//!
//! **Detach** is `hotplug::teardown::teardown`, nothing else: mark gone, refuse new I/O, fail
//! everything with ENXIO (after a bounded quiesce when the device still answers), drain
//! interrupt, callout and task, destroy every node, free. A controller that still answers and
//! has an open node or disk refuses with EBUSY (an eject is then not performed, facts §1.2).
//!
//! **The `Live` value** of a controller lives in the softc and is only touched under
//! `bus_topo_lock()`: newbus holds it around attach and detach, and the hotplug task's
//! actions take it ([`TopoLock`]).

use super::alloc::box_waitok;
use super::bindings::{self, device_t};
use super::bus_topo::TopoLock;
use super::callout::Callout;
use super::ctrl::{CtrlRef, CtrlShared, EngineGate, IntrHandler, WatchdogFire, WatchdogTask, WATCHDOG_US};
use super::device::Device;
use super::intr::{Interrupt, IrqResource};
use super::kernel::{next_disk_unit, CtrlIntr, FreeBsdKernel, KMem, OwnedQueue, Timer};
use super::node::NodeCtx;
use super::ns_disk::DiskSpec;
use super::platform::KernelPlatform;
use super::resource::MemResource;
use super::tunables::{self, Stat};
use crate::hotplug::errno::Errno;
use crate::hotplug::kernel::Kernel;
use crate::hotplug::teardown::{teardown, Live, Removal};
use crate::nvme::{Controller, ControllerInfo, Namespace};
use crate::platform::RegisterIo;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::c_int;

/// NVMe register offsets (NVMe base specification, "Controller Registers").
const REG_CAP: u32 = 0x00;
const REG_VS: u32 = 0x08;
/// Largest single I/O we hand to a disk (`d_maxsize`; also bounded by MDTS, which sizes the
/// busdma payload tag).
const MAX_IO: u32 = 128 * 1024;

/// PCI class 01h (mass storage), subclass 08h (NVM), interface 02h (NVMe I/O controller).
fn is_nvme_controller(dev: &Device) -> bool {
    i32::from(dev.pci_class()) == bindings::PCIC_STORAGE
        && i32::from(dev.pci_subclass()) == bindings::PCIS_STORAGE_NVM
        && i32::from(dev.pci_progif()) == bindings::PCIP_STORAGE_NVM_ENTERPRISE_NVMHCI_1_0
}

type LiveCtrl = Live<FreeBsdKernel, EngineGate>;

/// Per-controller state, owned through the softc pointer from attach to the end of detach.
struct Attached {
    /// The typestate; `None` while detach runs its teardown. Detach may sleep, and
    /// bus_topo_lock (Giant) is dropped while it sleeps: a second detach arriving then (an
    /// ACPI eject racing a sweep or `devctl detach`) finds `None` and is refused with EBUSY
    /// instead of letting newbus free the device under the first.
    live: Option<LiveCtrl>,
    ctrl: CtrlRef,
}

/// The softc's Attached of one of our devices.
///
/// # Safety
/// `dev` is an nvmehp device and the caller holds `bus_topo_lock()` (newbus does around
/// attach/detach), which serialises every access to the softc's state.
unsafe fn attached<'a>(dev: Device) -> Option<&'a mut Attached> {
    // SAFETY: per the contract; the pointer is null or our Box from attach.
    unsafe { (*dev.softc()).nvmehp_state.cast::<Attached>().as_mut() }
}

fn is_ours(dev: Device) -> bool {
    dev.class_name() == c"nvmehp"
}

/// A node or disk of this controller is open (eject and unload policy). False for devices
/// that are not ours.
pub fn in_use(dev: Device, _topo: &TopoLock) -> bool {
    if !is_ours(dev) {
        return false;
    }
    let k = FreeBsdKernel::new();
    // SAFETY: ours, under the topology lock (proof argument).
    unsafe { attached(dev) }.and_then(|a| a.live.as_ref()).is_some_and(|l| l.in_use(&k))
}

/// Whether any attached controller is in use (MOD_QUIESCE).
pub fn any_in_use(topo: &TopoLock) -> bool {
    topo.devices_of_class(c"nvmehp").any(|d| in_use(d, topo))
}

/// Disks of attached controllers (one per namespace node).
pub fn live_disks(topo: &TopoLock) -> usize {
    topo.devices_of_class(c"nvmehp")
        .filter(|d| is_ours(*d))
        // SAFETY: ours, under the topology lock (proof argument).
        .map(|d| unsafe { attached(d) }.and_then(|a| a.live.as_ref()).map_or(0, |l| l.namespaces().count()))
        .sum()
}

/// The disk parameters of one namespace.
fn disk_spec(ctrl: CtrlRef, info: &ControllerInfo, ns: &Namespace) -> DiskSpec {
    let mut ident = [0u8; 20];
    let mut descr = [0u8; 40];
    for (d, s) in ident.iter_mut().zip(info.serial.bytes()) {
        *d = s;
    }
    for (d, s) in descr.iter_mut().zip(info.model.bytes()) {
        *d = s;
    }
    let mdts = if info.mdts_bytes == 0 { MAX_IO } else { info.mdts_bytes.min(MAX_IO) };
    DiskSpec {
        ctrl,
        nsid: ns.nsid,
        lba_shift: ns.lba_shift,
        media_size: ns.capacity,
        max_io: mdts.max(ns.lba_bytes),
        flags: if info.vwc { bindings::DISKFLAG_CANFLUSHCACHE as u32 } else { 0 },
        ident,
        descr,
    }
}

/// Brings the namespace nodes and disks in line with the engine's list (attach, and after a
/// namespace attribute change). Every allocation here is fallible (ENOMEM), never a panic.
fn sync_namespaces(a: &mut Attached, k: &mut FreeBsdKernel, rescan: bool) -> Result<(u32, u32), Errno> {
    let ctrl = a.ctrl;
    let Some(live) = a.live.as_mut() else { return Err(Errno::ENXIO) }; // being detached
    let have: Vec<u32> = {
        let mut v = Vec::new();
        v.try_reserve(live.namespaces().count()).map_err(|_| Errno::ENOMEM)?;
        v.extend(live.namespaces());
        v
    };
    let mut present: Vec<u32> = Vec::new();
    let mut new: Vec<DiskSpec> = Vec::new();
    if rescan {
        // Sleeps between the admin commands, with the controller mutex released.
        if let Err(e) = ctrl.rescan_namespaces() {
            dev_printf!(&ctrl.device(), "namespace rescan failed: {}\n", e);
            return Err(Errno::ENXIO);
        }
    }
    {
        let st = ctrl.state().lock();
        let engine = st.engine();
        let info = engine.info().ok_or(Errno::ENXIO)?;
        let nss = engine.namespaces();
        present.try_reserve(nss.len()).map_err(|_| Errno::ENOMEM)?;
        new.try_reserve(nss.len()).map_err(|_| Errno::ENOMEM)?;
        for ns in nss {
            present.push(ns.nsid);
            if !have.contains(&ns.nsid) {
                new.push(disk_spec(ctrl, info, ns));
            }
        }
    }
    let mut units: Vec<(u32, u32)> = Vec::new();
    units.try_reserve(new.len()).map_err(|_| Errno::ENOMEM)?;
    for spec in new {
        let (nsid, unit) = (spec.nsid, next_disk_unit());
        k.stage_disk(unit, spec)?;
        units.push((nsid, unit));
    }
    let unit_of = |nsid: u32| units.iter().find(|(n, _)| *n == nsid).map_or(u32::MAX, |(_, u)| *u);
    live.sync_namespaces(k, &present, unit_of)
}

/// SlotOps::rescan_namespaces for the controller `dev` (hotplug task, topology lock held).
pub fn rescan_namespaces(dev: Device, _topo: &TopoLock) -> Result<(), Errno> {
    if !is_ours(dev) {
        return Err(Errno::ENXIO);
    }
    // SAFETY: ours, under the topology lock (proof argument).
    let Some(a) = (unsafe { attached(dev) }) else { return Err(Errno::ENXIO) };
    let mut k = FreeBsdKernel::new();
    let (added, removed) = sync_namespaces(a, &mut k, true)?;
    dev_printf!(&dev, "namespaces changed: {} added, {} removed\n", added, removed);
    Ok(())
}

/// DEVICE_PROBE: an NVMe controller, at a priority that never beats nvme(4).
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_probe(dev: device_t) -> c_int {
    // SAFETY: the caller (newbus) passes the live device being probed.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return bindings::ENXIO;
    };
    if !is_nvme_controller(&dev) {
        return bindings::ENXIO;
    }
    dev.set_desc(c"NVMe controller (nvme_hotplug)");
    if tunables::claim() {
        bindings::BUS_PROBE_HOOVER
    } else {
        bindings::BUS_PROBE_NOWILDCARD
    }
}

/// The interrupt: one MSI-X vector (every queue uses vector 0) or the shared INTx line.
fn setup_interrupt(dev: Device, ctrl: CtrlRef) -> Result<CtrlIntr, c_int> {
    let msix = dev.msix_count() >= 1 && dev.alloc_msix(1) == Ok(1);
    let rid = if msix { 1 } else { 0 };
    let Some(irq) = IrqResource::alloc(dev, rid) else {
        if msix {
            let _ = dev.release_msi();
        }
        return Err(bindings::ENXIO);
    };
    let handler = box_waitok(IntrHandler(ctrl));
    match Interrupt::setup(irq, handler) {
        Ok(intr) => Ok(CtrlIntr { intr, dev, msix }),
        Err((e, irq, _h)) => {
            drop(irq);
            if msix {
                let _ = dev.release_msi();
            }
            Err(e)
        }
    }
}

/// Attach, part 1: BAR0, bus mastering, the engine's bring-up (synchronous, polled; no
/// interrupt yet), then the shared run-time state. Kept out of line so that the engine value
/// never sits in the same stack frame as the rest of attach.
#[inline(never)]
fn start_engine(dev: Device, unit: u32) -> Result<(CtrlRef, EngineGate), c_int> {
    let Some(bar) = MemResource::alloc(dev, bindings::NVMEHP_PCIR_BAR0 as c_int) else {
        dev_printf!(&dev, "cannot allocate BAR0 (memory resource rid {:#x})\n", bindings::NVMEHP_PCIR_BAR0);
        return Err(bindings::ENXIO);
    };
    let cap = bar.read64(REG_CAP);
    let vs = bar.read32(REG_VS);
    if cap == u64::MAX || vs == u32::MAX {
        dev_printf!(&dev, "controller does not answer (registers read all-ones); not attaching\n");
        return Err(bindings::ENXIO); // `bar` is released on return
    }
    if let Err(e) = dev.enable_busmaster() {
        dev_printf!(&dev, "cannot enable bus mastering: {}\n", e);
        return Err(bindings::ENXIO);
    }
    let mut engine = box_waitok(Controller::new(KernelPlatform::new(dev, bar), tunables::engine_config()));
    if let Err(e) = engine.bring_up() {
        dev_printf!(&dev, "bring-up failed: {}\n", e);
        return Err(bindings::ENXIO); // the engine stops the controller and releases BAR0 on drop
    }
    if let Some(i) = engine.info() {
        dev_printf!(
            &dev,
            "NVMe {}.{}.{} \"{}\" serial \"{}\" fw \"{}\": {} I/O queue(s) x {} entries, {} namespace(s)\n",
            i.version.major,
            i.version.minor,
            i.version.tertiary,
            i.model.as_str(),
            i.serial.as_str(),
            i.firmware.as_str(),
            i.io_queues,
            i.io_entries,
            engine.namespaces().len()
        );
    }
    for (nsid, why) in engine.rejected_namespaces() {
        dev_printf!(&dev, "namespace {} not exposed: {}\n", nsid, why);
    }
    CtrlShared::create(dev, unit, engine).ok_or_else(|| {
        dev_printf!(&dev, "out of memory\n");
        bindings::ENOMEM
    })
}

/// Attach, part 2: watchdog (a task on our queue, enqueued by a callout bound to the
/// controller mutex), interrupt, the nodes' context, and the typestate `Live` with the
/// controller node and every namespace's node and disk. On any failure the typestate tears
/// down whatever subset was made.
#[inline(never)]
fn build(dev: Device, unit: u32, ctrl: CtrlRef, gate: EngineGate) -> Result<Box<Attached>, c_int> {
    let mut k = FreeBsdKernel::new();
    let mut queue = match OwnedQueue::new(c"nvmehp_ctrl") {
        Ok(q) => q,
        Err(e) => {
            drop(gate);
            return Err(e);
        }
    };
    let timer = match queue.add_task(0, WatchdogTask(ctrl)) {
        Some(task) => {
            ctrl.set_watchdog_task(task);
            // SAFETY: the callout is owned by the Live below, whose teardown drops it before
            // the EngineGate that frees the mutex (NodesDestroyed::free drops timer, then io).
            let shared = unsafe { ctrl.as_static() };
            Callout::new(shared.state(), WatchdogFire(ctrl)).map(|c| {
                c.as_ref().reset(&shared.state().lock(), WATCHDOG_US);
                Timer(c)
            })
        }
        None => None,
    };
    if timer.is_none() {
        dev_printf!(&dev, "out of memory for the watchdog; not attaching\n");
    }
    let intr = if timer.is_some() {
        match setup_interrupt(dev, ctrl) {
            Ok(i) => Some(i),
            Err(e) => {
                dev_printf!(&dev, "cannot set up an interrupt: {}\n", e);
                None
            }
        }
    } else {
        None
    };
    let softc: KMem = match k.malloc(core::mem::size_of::<NodeCtx>()) {
        Ok(m) => m,
        Err(_) => {
            // The same order as the teardown: interrupt (and its MSI-X vector), callout,
            // tasks, then the engine.
            if let Some(i) = intr {
                k.teardown_intr(i);
            }
            drop(timer);
            drop(queue);
            drop(gate);
            return Err(bindings::ENOMEM);
        }
    };
    // SAFETY: a fresh, zeroed, 16-byte aligned block of at least size_of::<NodeCtx>() bytes.
    unsafe { softc.as_ptr().cast::<NodeCtx>().write(NodeCtx { ctrl }) };
    let ok = intr.is_some() && timer.is_some();
    let mut a = box_waitok(Attached { live: Some(Live::new(unit, gate, softc, intr, timer, Some(queue))), ctrl });
    let made = match (ok, a.live.as_mut()) {
        (true, Some(live)) => live.create_controller_node(&mut k).and_then(|()| sync_namespaces(&mut a, &mut k, false)),
        _ => Err(Errno::ENXIO),
    };
    if let Err(e) = made {
        dev_printf!(&dev, "attach failed (errno {}); tearing down what was set up\n", e.0);
        if let Some(live) = a.live.take() {
            let _ = teardown(live, &mut k, Removal::Announced);
        }
        return Err(if e.0 == 0 { bindings::ENXIO } else { e.0 });
    }
    Ok(a)
}

/// DEVICE_ATTACH. Sleepable context, bus_topo_lock held by newbus.
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_attach(dev: device_t) -> c_int {
    // SAFETY: newbus passes the live device being attached.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return bindings::ENXIO;
    };
    let unit = dev.unit().max(0) as u32;
    let a = match start_engine(dev, unit).and_then(|(ctrl, gate)| build(dev, unit, ctrl, gate)) {
        Ok(a) => a,
        Err(e) => return e,
    };
    a.ctrl.publish_sysctls();
    let nns = a.live.as_ref().map_or(0, |l| l.namespaces().count());
    // SAFETY: the softc is newbus-allocated for this nvmehp device and zeroed; only attach,
    // detach and holders of bus_topo_lock touch it.
    unsafe { (*dev.softc()).nvmehp_state = Box::into_raw(a).cast() };
    Stat::Attaches.add(1);
    Stat::Controllers.add(1);
    dev_printf!(&dev, "attached: /dev/nvmehp{} and {} namespace node(s) with disks nvmehpd*\n", unit, nns);
    0
}

/// DEVICE_SHUTDOWN: shut the controller down cleanly before the system halts or reboots
/// ([`EngineGate::shutdown`]: flushes its write cache). Sleeps briefly at most (a bounded
/// quiesce; pause(9) busy-waits by itself after a panic).
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_shutdown(dev: device_t) -> c_int {
    // SAFETY: newbus passes a live device of ours.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return 0;
    };
    // The softc's state is only touched under the topology lock (see Attached); newbus may not
    // hold it on the shutdown path, and taking it again is allowed (it is recursive).
    let _topo = TopoLock::lock();
    // SAFETY: ours, under the topology lock.
    if let Some(live) = unsafe { attached(dev) }.and_then(|a| a.live.as_mut()) {
        live.io().shutdown();
    }
    0
}

/// DEVICE_DETACH: the teardown typestate. Sleepable context, bus_topo_lock held by newbus.
///
/// # Safety
/// Called by newbus (through the glue's method table) with a live device.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_detach(dev: device_t) -> c_int {
    // SAFETY: newbus passes the live device being detached.
    let Some(dev) = (unsafe { Device::from_raw(dev) }) else {
        return 0;
    };
    let mut k = FreeBsdKernel::new();
    // Config space, not BAR reads: QEMU's BAR reads 0 after a removal, config space 0xffff.
    let present = dev.pci_read_config(bindings::PCIR_VENDOR, 2) as u16 != 0xffff;
    // SAFETY: ours; newbus holds bus_topo_lock around DEVICE_DETACH.
    let Some(a) = (unsafe { attached(dev) }) else { return 0 };
    let Some(live) = a.live.as_ref() else {
        dev_printf!(&dev, "detach already in progress\n");
        return bindings::EBUSY;
    };
    if present && live.in_use(&k) {
        dev_printf!(&dev, "in use (a node or disk is open): detach refused, close it first\n");
        super::module::unload_refused();
        return bindings::EBUSY;
    }
    let Some(live) = a.live.take() else { return bindings::EBUSY };
    let how = if present { Removal::Announced } else { Removal::Surprise };
    if !present {
        Stat::SurpriseRemovals.add(1);
    }
    // May sleep (and so drop Giant): the softc keeps `live: None` meanwhile (see Attached).
    let r = teardown(live, &mut k, how);
    // SAFETY: as above; the pointer is taken out of the softc before it is freed.
    let state = unsafe { core::mem::replace(&mut (*dev.softc()).nvmehp_state, core::ptr::null_mut()) };
    // SAFETY: `state` came from Box::into_raw in attach and is freed exactly once.
    drop(unsafe { Box::from_raw(state.cast::<Attached>()) });
    Stat::Detaches.add(1);
    Stat::Controllers.add(-1);
    dev_printf!(
        &dev,
        "detached ({}): {} requests failed with ENXIO, {} nodes destroyed, {} disks given to GEOM\n",
        if present { "announced" } else { "device gone" },
        r.failed_requests,
        r.nodes_destroyed,
        r.disks_gone
    );
    0
}
