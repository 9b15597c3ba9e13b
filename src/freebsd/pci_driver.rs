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
//! **Attach**: BAR0, bus mastering, the interrupt's resources (MSI-X, else MSI, else INTx:
//! allocated before the bring-up creates the completion queues, as nvme(4) does, see
//! irq_source.rs), the engine's bring-up (synchronous, polled), then the run-time pieces in the
//! order their teardown undoes them: shared state, task queue with the watchdog task, watchdog
//! callout, the interrupt handler on the resources allocated before, and through the
//! typestate `Live` the controller node and per namespace a node and a disk.
//!
//! **Detach** is `hotplug::teardown::teardown`, nothing else: mark gone, refuse new I/O, fail
//! everything with ENXIO (after a bounded quiesce when the device still answers), drain
//! interrupt, callout and task, destroy every node, free. A controller that still answers and
//! has an open node or disk refuses with EBUSY (an eject is then not performed: acpi_pci's
//! acpi_pci_device_notify_handler skips _EJ0 when device_detach fails, sys/dev/acpica/acpi_pci.c).
//!
//! **The `Live` value** of a controller lives in the softc and is only touched under
//! `bus_topo_lock()`: newbus holds it around attach and detach, and the hotplug task's
//! actions take it ([`TopoLock`]). bus_topo_lock is Giant, which every sleep drops, so an
//! operation that sleeps never keeps a reference into the softc across a sleep: it takes the
//! `Live` out ([`Lease`]), holds the device busy so that newbus refuses to detach it
//! meanwhile, and puts it back after re-validating the softc.
//!
//! **Only an attached device has our softc.** MOD_QUIESCE and the eject policy walk every
//! device of devclass `nvmehp`, and that includes devices with no driver: a device whose
//! devclass was fixed (`devctl set driver -f nvme0 nvmehp`) stays in the devclass after a
//! failed attach or a detach, and newbus has then freed its softc (device_get_softc is NULL),
//! or, once probed again, handed it a fresh zeroed one (sys/kern/subr_bus.c device_attach,
//! device_detach, device_set_driver). [`attached`] therefore looks at a softc only when
//! device_is_attached says so, and never through NULL.

use super::alloc::box_waitok;
use super::bindings::{self, device_t};
use super::bus_topo::{BusyRef, TopoLock};
use super::callout::Callout;
use super::ctrl::{CtrlRef, CtrlShared, EngineGate, IntrHandler, WatchdogFire, WatchdogTask, WATCHDOG_US};
use super::device::Device;
use super::disk::HbaIds;
use super::intr::Interrupt;
use super::irq_source::IrqAlloc;
use super::kernel::{next_disk_unit, CtrlIntr, FreeBsdKernel, KMem, OwnedQueue, Timer};
use super::node::NodeCtx;
use super::ns_disk::DiskSpec;
use super::platform::KernelPlatform;
use super::resource::MemResource;
use super::tunables::{self, Stat};
use crate::fallible::{push_within_capacity, try_collect, try_vec_with_capacity};
use crate::hotplug::errno::Errno;
use crate::hotplug::kernel::Kernel;
use crate::hotplug::teardown::{teardown, Live, Removal};
use crate::nvme::{Controller, ControllerInfo, Namespace, NvmeError};
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

/// What holds a controller's `Live` out of the softc while it sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// DEVICE_DETACH's teardown: the `Live` never comes back.
    Detach,
    /// The hotplug task's namespace rescan ([`rescan_namespaces`]).
    NamespaceRescan,
    /// DEVICE_SHUTDOWN's quiesce and stop.
    Shutdown,
}

/// Per-controller state, owned through the softc pointer from attach to the end of detach.
struct Attached {
    /// The typestate; `None` while `lent_to` has it. Those operations sleep, and
    /// bus_topo_lock (Giant) is dropped while they sleep: whatever arrives meanwhile finds
    /// `None` and keeps its hands off (a second detach, e.g. an ACPI eject racing a sweep or
    /// `devctl detach`, is refused with EBUSY instead of letting newbus free the device under
    /// the first).
    live: Option<LiveCtrl>,
    /// Who has `live`, if anyone.
    lent_to: Option<Op>,
    ctrl: CtrlRef,
}

/// The softc's Attached of one of our devices; `None` for a device that is not attached (no
/// softc, or a fresh zeroed one: see the module doc) or is not ours.
///
/// # Safety
/// The caller holds `bus_topo_lock()` (newbus does around attach/detach), which serialises
/// every access to the softc's state, and does not keep the reference across a sleep.
unsafe fn attached<'a>(dev: Device) -> Option<&'a mut Attached> {
    if !is_ours(dev) || !dev.is_attached() {
        return None;
    }
    let sc = dev.softc();
    if sc.is_null() {
        return None;
    }
    // SAFETY: an attached nvmehp device: the softc is ours, and its state pointer is null or
    // our Box from attach, freed only by detach (which the caller's lock excludes).
    unsafe { (*sc).nvmehp_state.cast::<Attached>().as_mut() }
}

/// A controller's `Live`, taken out of the softc for an operation that sleeps, with the
/// device held busy: device_detach refuses a busy device with EBUSY before it calls our
/// DEVICE_DETACH (sys/kern/subr_bus.c device_detach, FreeBSD 15), so the controller cannot be
/// torn down and freed under the operation, whoever asks (acpi_pci's eject, `devctl detach`,
/// a slot detach from our task, kldunload). Given back with [`Lease::give_back`].
struct Lease {
    live: LiveCtrl,
    ctrl: CtrlRef,
    op: Op,
    busy: BusyRef,
}

/// Takes the `Live` of `dev` for `op`. `Err(Some(other))`: another operation has it;
/// `Err(None)`: not an attached controller of ours.
fn lend(dev: Device, topo: &TopoLock, op: Op) -> Result<Lease, Option<Op>> {
    // SAFETY: under the topology lock (proof argument); the reference ends in this function.
    let a = unsafe { attached(dev) }.ok_or(None)?;
    if let Some(other) = a.lent_to {
        return Err(Some(other));
    }
    let live = a.live.take().ok_or(None)?;
    a.lent_to = Some(op);
    Ok(Lease { live, ctrl: a.ctrl, op, busy: topo.busy(dev) })
}

impl Lease {
    /// Puts the `Live` back, after the operation's sleeps: the softc is looked up again
    /// (nothing from before the sleeps is trusted), then the device is unbusied.
    fn give_back(self, _topo: &TopoLock) {
        let Lease { live, ctrl, op, busy } = self;
        let dev = busy.device();
        // SAFETY: under the topology lock (proof argument); the reference ends here.
        match unsafe { attached(dev) } {
            Some(a) if a.lent_to == Some(op) && a.live.is_none() && core::ptr::eq(&*a.ctrl, &*ctrl) => {
                a.live = Some(live);
                a.lent_to = None;
            }
            // Newbus never detaches a busy device, so this does not happen; should it, the
            // controller is torn down here rather than leaked or put into a stranger's softc.
            _ => {
                dev_printf!(&dev, "softc changed during {:?}; tearing the controller down\n", op);
                let _ = teardown(live, &mut FreeBsdKernel::new(), Removal::Announced);
            }
        }
        drop(busy);
    }
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
    // SAFETY: under the topology lock (proof argument).
    match unsafe { attached(dev) } {
        Some(Attached { live: Some(l), .. }) => l.in_use(&k),
        // A rescan or shutdown holds it busy: it cannot be detached now either.
        Some(Attached { lent_to: Some(Op::NamespaceRescan | Op::Shutdown), .. }) => true,
        _ => false,
    }
}

/// Whether any attached controller is in use (MOD_QUIESCE).
pub fn any_in_use(topo: &TopoLock) -> bool {
    topo.devices_of_class(c"nvmehp").any(|d| in_use(d, topo))
}

/// Disks of attached controllers (one per namespace node).
pub fn live_disks(topo: &TopoLock) -> usize {
    topo.devices_of_class(c"nvmehp")
        // SAFETY: under the topology lock (proof argument).
        .map(|d| unsafe { attached(d) }.and_then(|a| a.live.as_ref()).map_or(0, |l| l.namespaces().count()))
        .sum()
}

/// What every disk of one controller reports about the controller itself.
struct DiskHost {
    hba: HbaIds,
    attachment: [u8; 32],
}

impl DiskHost {
    fn of(dev: &Device) -> DiskHost {
        let mut attachment = [0u8; 32];
        // Cut to leave a NUL; a newbus name is far shorter.
        for (d, s) in attachment[..31].iter_mut().zip(dev.nameunit().to_bytes()) {
            *d = *s;
        }
        let hba = HbaIds { vendor: dev.pci_vendor(), device: dev.pci_device(), subvendor: dev.pci_subvendor(), subdevice: dev.pci_subdevice() };
        DiskHost { hba, attachment }
    }
}

/// The disk parameters of one namespace.
fn disk_spec(ctrl: CtrlRef, info: &ControllerInfo, ns: &Namespace, host: &DiskHost) -> DiskSpec {
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
        uid: ns.uid,
        hba: host.hba,
        attachment: host.attachment,
    }
}

/// What a namespace sync did: namespaces added and removed, and those replaced (the same ID
/// with another size or block size: old node and disk gone, new ones made).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Synced {
    added: u32,
    removed: u32,
    replaced: u32,
}

/// Brings the namespace nodes and disks of `live` in line with the engine's list (attach, and
/// after a namespace attribute change). A namespace still there under the same ID whose size
/// or block size changed (another host formatted or resized it) is replaced: its disk has the
/// old geometry, so it goes as a removed namespace's does (withered, its requests failed, the
/// node destroyed) and a new node and disk with the new geometry are made. Every allocation
/// here is fallible (ENOMEM), never a panic. Sleeps: `live` is not in the softc meanwhile
/// (attach has not published it yet, or a [`Lease`] holds it).
fn sync_namespaces(live: &mut LiveCtrl, ctrl: CtrlRef, k: &mut FreeBsdKernel, rescan: bool) -> Result<Synced, Errno> {
    let nomem = |what: &str| {
        dev_printf!(&ctrl.device(), "out of memory for the {}\n", what);
        Errno::ENOMEM
    };
    let have: Vec<u32> = try_collect(live.namespaces()).map_err(|_| nomem("list of namespace nodes"))?;
    let (present, new): (Vec<u32>, Vec<DiskSpec>);
    // Namespaces with a node whose size or block size the rescan found changed.
    let mut replaced: Vec<u32> = Vec::new();
    if rescan {
        // Sleeps between the admin commands, with the controller mutex released.
        match ctrl.rescan_namespaces() {
            Ok(changes) => replaced = changes.replaced,
            Err(e) => {
                dev_printf!(&ctrl.device(), "namespace rescan failed: {}\n", e);
                return Err(Errno::ENXIO);
            }
        }
        replaced.retain(|n| have.contains(n));
    }
    // Read before the mutex: ivars go through the pci bus's methods.
    let host = DiskHost::of(&ctrl.device());
    {
        let st = ctrl.state().lock();
        let engine = st.engine();
        let info = engine.info().ok_or(Errno::ENXIO)?;
        let nss = engine.namespaces();
        present = try_collect(nss.iter().map(|ns| ns.nsid)).map_err(|_| nomem("namespace list"))?;
        new = try_collect(
            nss.iter().filter(|ns| !have.contains(&ns.nsid) || replaced.contains(&ns.nsid)).map(|ns| disk_spec(ctrl, info, ns, &host)),
        )
        .map_err(|_| nomem("disk parameters"))?;
    }
    let mut units: Vec<(u32, u32)> = try_vec_with_capacity(new.len()).map_err(|_| nomem("disk units"))?;
    for spec in new {
        let (nsid, unit) = (spec.nsid, next_disk_unit());
        k.stage_disk(unit, spec).map_err(|e| if e == Errno::ENOMEM { nomem("staged disk parameters") } else { e })?;
        let _ = push_within_capacity(&mut units, (nsid, unit)); // sized above
    }
    let unit_of = |nsid: u32| units.iter().find(|(n, _)| *n == nsid).map_or(u32::MAX, |(_, u)| *u);
    let oom = |e: Errno| {
        if e == Errno::ENOMEM {
            dev_printf!(&ctrl.device(), "out of memory for a namespace node or its disk\n");
        }
    };
    let mut out = Synced::default();
    if !replaced.is_empty() {
        // First without the replaced ones: their old nodes and disks go (and new namespaces
        // come); the sync below then makes them again with the new geometry.
        let kept: Vec<u32> = try_collect(present.iter().copied().filter(|n| !replaced.contains(n))).map_err(|_| nomem("namespace list"))?;
        let (added, removed) = live.sync_namespaces(k, &kept, unit_of).inspect_err(|&e| oom(e))?;
        out.added = added;
        out.removed = removed.saturating_sub(replaced.len() as u32); // each replaced one was removed here
    }
    let (added, removed) = live.sync_namespaces(k, &present, unit_of).inspect_err(|&e| oom(e))?;
    out.replaced = replaced.len() as u32;
    out.added += added.saturating_sub(out.replaced); // each replaced one was added here
    out.removed += removed;
    Ok(out)
}

/// SlotOps::rescan_namespaces for the controller `dev` (hotplug task, topology lock held).
/// The rescan sleeps between admin commands and node creation sleeps (both drop Giant), so
/// it runs on a [`Lease`]: the device is busy and cannot be detached until it is done.
pub fn rescan_namespaces(dev: Device, topo: &TopoLock) -> Result<(), Errno> {
    let mut lease = match lend(dev, topo, Op::NamespaceRescan) {
        Ok(l) => l,
        Err(Some(Op::NamespaceRescan | Op::Shutdown)) => return Err(Errno::EBUSY),
        Err(Some(Op::Detach) | None) => return Err(Errno::ENXIO), // going away, or not ours
    };
    let mut k = FreeBsdKernel::new();
    let r = sync_namespaces(&mut lease.live, lease.ctrl, &mut k, true);
    lease.give_back(topo);
    let Synced { added, removed, replaced } = r?;
    if replaced > 0 {
        dev_printf!(&dev, "namespaces changed: {} added, {} removed, {} replaced (size, block size or unique ID changed)\n", added, removed, replaced);
    } else {
        dev_printf!(&dev, "namespaces changed: {} added, {} removed\n", added, removed);
    }
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

/// The interrupt handler (every queue completes on it), on the resources [`start_engine`]
/// allocated before the bring-up: `bus_setup_intr` needs the shared state the handler locks,
/// which exists only once the engine is behind its mutex. Says which kind it got. BAR0, which
/// the MSI-X table may share, is held by the engine for longer than the interrupt lives.
fn setup_interrupt(dev: Device, ctrl: CtrlRef, alloc: IrqAlloc) -> Result<CtrlIntr, c_int> {
    let (source, irq) = alloc.into_parts();
    let handler = box_waitok(IntrHandler(ctrl));
    match Interrupt::setup(irq, handler) {
        Ok(intr) => {
            dev_printf!(&dev, "interrupt: {}\n", source.kind());
            ctrl.set_interrupt_kind(source.kind());
            Ok(CtrlIntr { intr, dev, source })
        }
        Err((e, irq, _h)) => {
            drop(irq);
            source.release(dev);
            Err(e)
        }
    }
}

/// Attach, part 1: BAR0, bus mastering, the interrupt's resources, the engine's bring-up
/// (synchronous, polled; no handler yet), then the shared run-time state. Kept out of line so
/// that the engine value never sits in the same stack frame as the rest of attach.
///
/// The interrupt is allocated before the bring-up creates any completion queue (MSI-X is
/// then enabled, its vector masked until `bus_setup_intr`): a controller may bind a queue's
/// vector to the interrupt mode in force at Create I/O Completion Queue, and QEMU's NVMe
/// model does (irq_source.rs). nvme(4) orders it the same way (sys/dev/nvme/nvme_pci.c
/// `nvme_pci_attach`: `nvme_ctrlr_setup_interrupts` before `nvme_attach`; the queues are
/// created later, in sys/dev/nvme/nvme_ctrlr.c `nvme_ctrlr_start`). On a failure the
/// interrupt is released before the engine, which lets BAR0 go (the MSI-X table may be there).
#[inline(never)]
fn start_engine(dev: Device, unit: u32) -> Result<(CtrlRef, EngineGate, IrqAlloc), c_int> {
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
    // Controller::new touches nothing; it takes BAR0 along (released when it is dropped).
    let mut engine = box_waitok(Controller::new(KernelPlatform::new(dev, bar), tunables::engine_config()));
    let Some(irq) = IrqAlloc::alloc(dev, bindings::NVMEHP_PCIR_BAR0 as c_int) else {
        dev_printf!(&dev, "cannot allocate an interrupt (MSI-X, MSI or INTx); not attaching\n");
        return Err(bindings::ENXIO);
    };
    if let Err(e) = engine.bring_up() {
        dev_printf!(&dev, "bring-up failed: {}\n", e);
        // Entries dropped during the bring-up are otherwise reported by the interrupt path,
        // which a failed bring-up never reaches: a controller answering with command ids it
        // was never given explains a timeout, so say so here.
        let bad = engine.stats().bad_completions;
        if bad > 0 {
            dev_printf!(&dev, "bring-up: dropped {} invalid completion entries (unknown command id or queue)\n", bad);
        }
        // The failed bring-up has stopped the controller. Then the interrupt (IRQ resource,
        // messages, MSI-X BARs), then the engine with BAR0.
        drop(irq);
        drop(engine);
        // Memory (DMA or kernel) that could not be had is ENOMEM; the device's fault ENXIO.
        return Err(if matches!(e, NvmeError::NoMemory | NvmeError::OutOfMemory(_)) { bindings::ENOMEM } else { bindings::ENXIO });
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
    // A namespace count above what the engine scans is bounded, not trusted (a hostile or
    // broken controller may say 2^32 - 1): say which part is looked at.
    if let Some(i) = engine.info().filter(|i| i.nn > engine.config().max_namespaces) {
        dev_printf!(&dev, "reports {} namespaces; only IDs up to {} are scanned\n", i.nn, engine.config().max_namespaces);
    }
    for (nsid, why) in engine.rejected_namespaces() {
        dev_printf!(&dev, "namespace {} not exposed: {}\n", nsid, why);
    }
    match CtrlShared::create(dev, unit, engine) {
        Ok((ctrl, gate)) => Ok((ctrl, gate, irq)),
        Err(engine) => {
            // The interrupt first, then the engine (it stops the controller, then lets BAR0 go).
            drop(irq);
            drop(engine);
            Err(bindings::ENOMEM)
        }
    }
}

/// Attach, part 2: watchdog (a task on our queue, enqueued by a callout bound to the
/// controller mutex), the interrupt handler on `irq`, the nodes' context, and the typestate
/// `Live` with the controller node and every namespace's node and disk. On any failure the
/// typestate tears down whatever subset was made; an `irq` that got no handler is released
/// before it, and so before the engine lets BAR0 go.
#[inline(never)]
fn build(dev: Device, unit: u32, ctrl: CtrlRef, gate: EngineGate, irq: IrqAlloc) -> Result<Box<Attached>, c_int> {
    let mut k = FreeBsdKernel::new();
    let mut queue = match OwnedQueue::new(c"nvmehp_ctrl") {
        Ok(q) => q,
        Err(e) => {
            dev_printf!(&dev, "cannot create the controller's task queue (error {}); not attaching\n", e);
            drop(irq);
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
    // Why attach cannot go on, if it cannot: the errno attach returns.
    let mut failed = Errno::ENXIO;
    let intr = if timer.is_some() {
        match setup_interrupt(dev, ctrl, irq) {
            Ok(i) => Some(i),
            Err(e) => {
                dev_printf!(&dev, "cannot set up an interrupt: {}\n", e);
                failed = if e == bindings::ENOMEM { Errno::ENOMEM } else { Errno::ENXIO };
                None
            }
        }
    } else {
        dev_printf!(&dev, "out of memory for the watchdog (task and callout); not attaching\n");
        failed = Errno::ENOMEM;
        drop(irq); // no handler on it: released now, before the typestate's teardown below
        None
    };
    let softc: KMem = match k.malloc(core::mem::size_of::<NodeCtx>()) {
        Ok(m) => m,
        Err(_) => {
            dev_printf!(&dev, "out of memory for the device nodes' context; not attaching\n");
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
    let mut a = box_waitok(Attached { live: Some(Live::new(unit, gate, softc, intr, timer, Some(queue))), lent_to: None, ctrl });
    let made = match (ok, a.live.as_mut()) {
        (true, Some(live)) => live.create_controller_node(&mut k).and_then(|()| sync_namespaces(live, ctrl, &mut k, false).map(|_| ())),
        _ => Err(failed),
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
    // Refused from MOD_QUIESCE on: an attach asleep when MOD_UNLOAD's detaches run would make
    // newbus refuse the unload without telling us ("device in attaching state",
    // sys/kern/subr_bus.c device_detach). `devctl attach` or a rescan attaches it later.
    if super::module::unloading() {
        dev_printf!(&dev, "module unloading: not attaching\n");
        return bindings::ENXIO;
    }
    let unit = dev.unit().max(0) as u32;
    let a = match start_engine(dev, unit).and_then(|(ctrl, gate, irq)| build(dev, unit, ctrl, gate, irq)) {
        Ok(a) => a,
        Err(e) => {
            // Everything made is gone: the engine stopped the controller, or leaked the memory
            // of one that ignored the disable. Such a device must not keep DMA on; nor does a
            // function no driver drives (nvme_pci.c nvme_pci_detach turns it off too).
            let _ = dev.disable_busmaster();
            if dev.pci_read_config(bindings::PCIR_VENDOR, 2) as u16 == 0xffff {
                super::slots::function_vanished_during_attach(dev);
            }
            return e;
        }
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

/// How long DEVICE_SHUTDOWN waits for a namespace rescan to give the controller back (the
/// rescan's admin commands are bounded by the engine's command timeout).
const SHUTDOWN_WAIT_MS: u32 = 30_000;

/// DEVICE_SHUTDOWN: shut the controller down cleanly before the system halts or reboots
/// ([`EngineGate::shutdown`]: flushes its write cache). Sleeps briefly at most (a bounded
/// quiesce; pause(9) busy-waits by itself after a panic). The quiesce sleeps, so it runs on a
/// [`Lease`] (device busy: no detach frees the controller under it); a namespace rescan that
/// has the controller is waited for, bounded; a detach that has it stops the controller itself.
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
    let topo = TopoLock::lock();
    let mut waited = 0u32;
    let mut lease = loop {
        match lend(dev, &topo, Op::Shutdown) {
            Ok(l) => break l,
            Err(Some(Op::NamespaceRescan)) if waited < SHUTDOWN_WAIT_MS => {
                super::clock::sleep_ms(c"nvmehpsd", 10); // drops Giant: the rescan can finish
                waited += 10;
            }
            Err(Some(op)) => {
                dev_printf!(&dev, "shutdown: {:?} has the controller; not stopping it here\n", op);
                return 0;
            }
            Err(None) => return 0,
        }
    };
    lease.live.io().shutdown();
    lease.give_back(&topo);
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
    if let Some(op) = a.lent_to {
        // Not reached for a rescan or shutdown (they hold the device busy, and newbus refuses
        // to detach a busy device before calling us); a second detach gets here.
        dev_printf!(&dev, "detach refused: {:?} in progress\n", op);
        super::module::detach_refused();
        return bindings::EBUSY;
    }
    let Some(live) = a.live.as_ref() else { return bindings::EBUSY };
    if present && live.in_use(&k) {
        dev_printf!(&dev, "in use (a node or disk is open): detach refused, close it first\n");
        super::module::detach_refused();
        return bindings::EBUSY;
    }
    let Some(live) = a.live.take() else { return bindings::EBUSY };
    a.lent_to = Some(Op::Detach);
    let how = if present { Removal::Announced } else { Removal::Surprise };
    if !present {
        Stat::SurpriseRemovals.add(1);
    }
    // May sleep (and so drop Giant): the softc keeps `live: None` meanwhile (see Attached).
    let r = teardown(live, &mut k, how);
    if present {
        // As nvme_pci.c nvme_pci_detach does after nvme_detach: the function stays on the bus
        // with nobody driving it, so it may not master the bus any more. After the teardown:
        // the controller was stopped (or, if it ignored that, already cut off by the stop's
        // outcome, see CtrlShared::run_stop) and its interrupt and messages released.
        let _ = dev.disable_busmaster();
    }
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
