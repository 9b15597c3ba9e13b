//! ACPICA and acpi(4) as the module sees them.
//!
//! Without `--acpi` (and without a machine): a machine without an ACPI namespace. Every lookup
//! answers AE_NOT_FOUND (ACPICA acexcep.h: EXCEP_ENV 0x0005), a namespace walk visits nothing.
//!
//! With `--qemu --acpi`: the part of QEMU's `pc` DSDT the module reads, for the PIIX4 root bus
//! (QEMU hw/i386/acpi-build.c and hw/acpi/pcihp.c build it; the lab's `acpi_hotplug` plays its
//! AML for the engine-only runs):
//! - `\_SB_` and `\_SB_.PCI0`, whose acpi(4) device is `pcib0` (`acpi_get_device`);
//! - one Device `S<nn>_` per slot 0..31 of bus 0, each with `_ADR` = slot << 16, and `_EJ0` on
//!   the slots the hotplug block's PCIRMV register marks removable (read from QEMU when the
//!   namespace is built: the AML declares `_EJ0` exactly on the hotpluggable slots). No `_STA`
//!   and no `_OST` on these objects, as in QEMU's PIIX4 DSDT: `acpi_GetInteger(_STA)` answers
//!   AE_NOT_FOUND, which the module reads as "present" (ACPI spec's default).
//! - **No in-tree handler**: `pcib0` answers no `ACPI_IVAR_HANDLE` for `pci0`, so
//!   `acpi_get_handle(pci0)` is NULL, as for a pci bus acpi_pci(4) did not attach to; the
//!   module then owns every slot (hw.nvme_hotplug.acpi_mode, src/hotplug/mode.rs) and installs
//!   its notify handlers. The stock-FreeBSD variant (`--acpi-pci`): acpi_pci's handler is
//!   installed on every `_EJ0` slot first and acts as acpi_pci.c's does ([`acpi_pci_notify`]).
//! - `AcpiInstallNotifyHandler`/`AcpiRemoveNotifyHandler` keep a list of system handlers per
//!   object, as ACPICA's (sys/contrib/dev/acpica/components/events/evxface.c) does: a second
//!   install of the same handler function on the object is AE_ALREADY_EXISTS, another function
//!   is added next to it, and removing a function not installed there is AE_NOT_EXIST. A handler still installed after unload is a finding: ACPICA would
//!   call into unloaded code on the next Notify.
//! - `AcpiOsWaitEventsComplete` (sys/dev/acpica/Osd/OsdSchedule.c) returns at once: notifies are
//!   dispatched synchronously by [`run_gpe`], so none is ever left queued. Called from a notify
//!   handler (directly or through `AcpiRemoveNotifyHandler`, evxface.c) it would drain the
//!   acpi_task running the caller: a deadlock, reported as RemoveNotifyFromAcpiTask.
//! - `_EJ0` of a slot whose device still has a driver is EjectAttached, of a slot whose function
//!   0 reads all-ones DoubleEject ([`eject_checks`]).

use super::kern::cstr;
use super::rules::Rule;
use super::{log, with};
use crate::kpi::KpiTable;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};

const AE_OK: u32 = 0;
const AE_NOT_FOUND: u32 = 0x0005;
const AE_NOT_EXIST: u32 = 0x0006;
const AE_ALREADY_EXISTS: u32 = 0x0007;
const AE_BUFFER_OVERFLOW: u32 = 0x000B;
const AE_BAD_PARAMETER: u32 = 0x1001;
/// ACPICA's walk-control codes (acexcep.h): a callback returning one ends the walk with AE_OK.
const AE_CTRL_TERMINATE: u32 = 0x4004;
const AE_CTRL_DEPTH: u32 = 0x4006;
/// actypes.h: ACPI_TYPE_DEVICE; ACPI_SYSTEM_NOTIFY.
const ACPI_TYPE_DEVICE: u32 = 6;
const ACPI_SYSTEM_NOTIFY: u32 = 1;

/// actypes.h `ACPI_BUFFER` on a 64-bit kernel (`ACPI_SIZE` is `UINT64`).
#[repr(C)]
struct AcpiBuffer {
    length: u64,
    pointer: *mut c_void,
}

/// A namespace node: what its handle points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    Sb,
    Pci0,
    Slot(u8),
    Adr(u8),
    Ej0(u8),
}

/// Handles are addresses inside this array (never dereferenced by anyone, stable, non-NULL).
static HANDLES: [u8; 4 + 3 * 32] = [0; 4 + 3 * 32];

impl Node {
    fn index(self) -> usize {
        match self {
            Node::Sb => 1,
            Node::Pci0 => 2,
            Node::Slot(s) => 4 + usize::from(s),
            Node::Adr(s) => 4 + 32 + usize::from(s),
            Node::Ej0(s) => 4 + 64 + usize::from(s),
        }
    }

    pub fn handle(self) -> *mut c_void {
        HANDLES[self.index()..].as_ptr().cast_mut().cast()
    }

    fn of(h: *mut c_void) -> Option<Node> {
        let off = (h as usize).checked_sub(HANDLES.as_ptr() as usize)?;
        Some(match off {
            1 => Node::Sb,
            2 => Node::Pci0,
            o @ 4..36 => Node::Slot((o - 4) as u8),
            o @ 36..68 => Node::Adr((o - 36) as u8),
            o @ 68..100 => Node::Ej0((o - 68) as u8),
            _ => return None,
        })
    }

    /// ACPICA's full path (4-character segments, `_`-padded).
    fn path(self) -> String {
        match self {
            Node::Sb => "\\_SB_".into(),
            Node::Pci0 => "\\_SB_.PCI0".into(),
            Node::Slot(s) => format!("\\_SB_.PCI0.S{s:02X}_"),
            Node::Adr(s) => format!("\\_SB_.PCI0.S{s:02X}_._ADR"),
            Node::Ej0(s) => format!("\\_SB_.PCI0.S{s:02X}_._EJ0"),
        }
    }
}

/// The emulated namespace and the notify handlers installed on it.
#[derive(Default)]
pub struct AcpiState {
    /// Whether the namespace exists (`--acpi`).
    pub enabled: bool,
    /// PCIRMV of bus 0: the slots with `_EJ0`.
    pub removable: u32,
    /// pcib0, the acpi(4) device of `\_SB_.PCI0`.
    pub pcib0: u64,
    /// System notify handlers: object to its (handler, context) list, in install order.
    pub handlers: BTreeMap<Node, Vec<(u64, u64)>>,
    /// Stock FreeBSD (`--acpi-pci`): acpi_pci(4) drives pci0 (its bridge answers an ACPI handle
    /// for it) and its handler is installed on every `_EJ0` slot before the module loads.
    pub acpi_pci: bool,
}

/// Builds the namespace of the running machine (`--qemu --acpi`): reads PCIRMV from QEMU's
/// hotplug block.
pub fn enable(pcib0: u64) {
    enable_with(pcib0, false);
}

/// acpi_pci(4)'s notify handler, sys/dev/acpica/acpi_pci.c `acpi_pci_device_notify_handler`,
/// run on the acpi_task thread like every handler ([`run_gpe`]): a device check (1) is
/// `BUS_RESCAN(pci0)` under the topology lock; an eject request (3) detaches the slot's device
/// (`acpi_get_device(h)`; an error ends it with the kernel's message and no `_EJ0`), evaluates
/// `_EJ0`, then `BUS_RESCAN(pci0)`, which deletes the function that left.
extern "C" fn acpi_pci_notify(h: *mut c_void, value: u32, _ctx: *mut c_void) {
    let path = Node::of(h).map_or("?".into(), Node::path);
    log(format!("acpi_pci: Notify({path}, {value})"));
    let Some(Node::Slot(s)) = Node::of(h) else { return };
    match value {
        1 => {
            super::sched::topo_lock();
            super::newbus::rescan_pci0();
            super::sched::topo_unlock();
        }
        3 => {
            let Some(child) = super::newbus::pci_child_at(s, 0) else {
                super::kern::console_line(&format!("pci0: no device to eject for {path}\n"));
                return;
            };
            let name = super::newbus::nameunit(child);
            super::sched::topo_lock();
            let r = super::newbus::device_detach(child);
            if r != 0 {
                super::sched::topo_unlock();
                super::kern::console_line(&format!("pci0: failed to detach {name}: {r}\n"));
                return;
            }
            with(|e| e.rule_state.acpi_pci_detached.insert(child));
            let st = emu_acpi_set_integer(h, c"_EJ0".as_ptr(), 1);
            if st != AE_OK {
                super::sched::topo_unlock();
                super::kern::console_line(&format!("pci0: failed to eject {path}: {st:#x}\n"));
                return;
            }
            super::newbus::rescan_pci0();
            super::sched::topo_unlock();
        }
        _ => super::kern::console_line(&format!("pci0: unknown notify {value:#x} for {path}\n")),
    }
}

fn acpi_pci_fn() -> u64 {
    acpi_pci_notify as extern "C" fn(_, _, _) as usize as u64
}

/// pcib0's `ACPI_IVAR_HANDLE` for pci0 (acpi_pcib_acpi.c `acpi_pcib_read_ivar` answers the
/// bridge's handle, which is what makes acpi_pci(4) probe the bus): only in the stock variant.
pub fn pcib_acpi_handle() -> Option<usize> {
    with(|e| (e.acpi.enabled && e.acpi.acpi_pci).then(|| Node::Pci0.handle() as usize))
}

/// [`enable`], and with `acpi_pci` the stock-FreeBSD variant: acpi_pci(4) attached to pci0 and
/// installed its handler on every `_EJ0` slot (acpi_pci.c `acpi_pci_attach` walks the bus's
/// children), before any module loads.
pub fn enable_with(pcib0: u64, acpi_pci: bool) {
    // The machine enabled the hotplug GPE at start (the OS does when it loads the DSDT's _E01
    // handler); the AML's part (`\_GPE._E01`, `_EJ0`) is the lab's PIIX4 hotplug block driver.
    let removable = super::machine::with_machine(|m| m.lab.removable_slots(0).unwrap_or(0));
    log(format!("ACPI namespace: \\_SB_.PCI0 (pcib0), slots S00_..S1F_ with _ADR, _EJ0 on PCIRMV {removable:#010x}"));
    let mut handlers = BTreeMap::new();
    if acpi_pci {
        for s in (0..32u8).filter(|s| removable & (1 << s) != 0) {
            handlers.insert(Node::Slot(s), vec![(acpi_pci_fn(), 0)]);
        }
        log(format!("acpi_pci: pci0 has ACPI handle \\_SB_.PCI0; its notify handler installed on {} slots", handlers.len()));
    }
    with(|e| e.acpi = AcpiState { enabled: true, removable, pcib0, handlers, acpi_pci });
}

/// Resolves `path` relative to `parent` (NULL: absolute) in the emulated namespace.
fn resolve(parent: Option<Node>, path: &str) -> Option<Node> {
    let (ena, removable) = with(|e| (e.acpi.enabled, e.acpi.removable));
    if !ena {
        return None;
    }
    // ACPICA accepts segments shorter than 4 characters and pads them with '_'.
    let pad = |s: &str| format!("{s:_<4}");
    let mut node = match (path.strip_prefix('\\'), parent) {
        (Some(_), _) | (None, None) => None,
        (None, Some(p)) => Some(p),
    };
    let rest = path.strip_prefix('\\').unwrap_or(path);
    if rest.is_empty() {
        return None; // the root itself is not a node here
    }
    for seg in rest.split('.') {
        let seg = pad(seg);
        node = match (node, seg.as_str()) {
            (None, "_SB_") => Some(Node::Sb),
            (Some(Node::Sb), "PCI0") => Some(Node::Pci0),
            (Some(Node::Pci0), s) if s.len() == 4 && s.starts_with('S') && s.ends_with('_') => {
                let n = u8::from_str_radix(&s[1..3], 16).ok().filter(|&n| n < 32)?;
                Some(Node::Slot(n))
            }
            (Some(Node::Slot(s)), "_ADR") => Some(Node::Adr(s)),
            (Some(Node::Slot(s)), "_EJ0") if removable & (1 << s) != 0 => Some(Node::Ej0(s)),
            _ => return None,
        };
    }
    node
}

fn node_of(h: *mut c_void) -> Option<Node> {
    if with(|e| e.acpi.enabled) { Node::of(h) } else { None }
}

extern "C" fn emu_acpi_get_handle(parent: *mut c_void, path: *const c_char, ret: *mut *mut c_void) -> u32 {
    // SAFETY: a C string per AcpiGetHandle.
    let p = unsafe { cstr(path) };
    if ret.is_null() || path.is_null() {
        return AE_BAD_PARAMETER;
    }
    let found = resolve(if parent.is_null() { None } else { node_of(parent) }, &p);
    // SAFETY: the caller's ACPI_HANDLE.
    unsafe { *ret = found.map_or(std::ptr::null_mut(), Node::handle) };
    match found {
        Some(n) => {
            log(format!("AcpiGetHandle({parent:p}, {p:?}) = AE_OK ({})", n.path()));
            AE_OK
        }
        None => {
            log(format!("AcpiGetHandle({parent:p}, {p:?}) = AE_NOT_FOUND"));
            AE_NOT_FOUND
        }
    }
}

type WalkCallback = extern "C" fn(*mut c_void, u32, *mut c_void, *mut *mut c_void) -> u32;

extern "C" fn emu_acpi_walk_namespace(
    ty: u32,
    start: *mut c_void,
    depth: u32,
    descending: Option<WalkCallback>,
    _ascending: Option<WalkCallback>,
    ctx: *mut c_void,
    _ret: *mut c_void,
) -> u32 {
    // Only what the module walks: the Device objects directly below \_SB_.PCI0.
    let children: Vec<Node> = match (node_of(start), ty) {
        (Some(Node::Pci0), ACPI_TYPE_DEVICE) if depth >= 1 => (0..32).map(Node::Slot).collect(),
        _ => Vec::new(),
    };
    log(format!("AcpiWalkNamespace(type {ty}, {start:p}, depth {depth}) visits {} objects", children.len()));
    let Some(cb) = descending else { return AE_OK };
    for n in children {
        // Module code, called with no emulation lock held.
        match cb(n.handle(), 1, ctx, std::ptr::null_mut()) {
            AE_OK | AE_CTRL_DEPTH => {}
            AE_CTRL_TERMINATE => return AE_OK,
            st => return st,
        }
    }
    AE_OK
}

extern "C" fn emu_acpi_get_name(obj: *mut c_void, ty: u32, buf: *mut c_void) -> u32 {
    let Some(n) = node_of(obj) else {
        log(format!("AcpiGetName({obj:p}, {ty}) = AE_NOT_FOUND"));
        return AE_NOT_FOUND;
    };
    if ty != 0 || buf.is_null() {
        return AE_BAD_PARAMETER; // only ACPI_FULL_PATHNAME into a caller's buffer
    }
    // SAFETY: the caller's ACPI_BUFFER.
    let b = unsafe { &mut *buf.cast::<AcpiBuffer>() };
    let path = n.path();
    if (b.length as usize) < path.len() + 1 || b.pointer.is_null() {
        return AE_BUFFER_OVERFLOW;
    }
    // SAFETY: `length` bytes at `pointer` are the caller's, and the path with its NUL fits.
    unsafe {
        std::ptr::copy_nonoverlapping(path.as_ptr(), b.pointer.cast::<u8>(), path.len());
        *b.pointer.cast::<u8>().add(path.len()) = 0;
    }
    AE_OK
}

extern "C" fn emu_acpi_evaluate_object(obj: *mut c_void, path: *const c_char, _params: *mut c_void, _ret: *mut c_void) -> u32 {
    // SAFETY: NULL or a C string per AcpiEvaluateObject.
    let p = unsafe { cstr(path) };
    log(format!("AcpiEvaluateObject({obj:p}, {p:?}) = AE_NOT_FOUND"));
    AE_NOT_FOUND
}

extern "C" fn emu_acpi_get_integer(obj: *mut c_void, path: *const c_char, v: *mut u32) -> u32 {
    // SAFETY: as above.
    let p = unsafe { cstr(path) };
    let n = node_of(obj).and_then(|o| resolve(Some(o), &p));
    match n {
        Some(Node::Adr(s)) if !v.is_null() => {
            // SAFETY: the caller's UINT32.
            unsafe { *v = u32::from(s) << 16 };
            log(format!("acpi_GetInteger({obj:p}, {p:?}) = AE_OK ({:#x})", u32::from(s) << 16));
            AE_OK
        }
        _ => {
            log(format!("acpi_GetInteger({obj:p}, {p:?}) = AE_NOT_FOUND"));
            AE_NOT_FOUND
        }
    }
}

/// `acpi_SetInteger(slot, "_EJ0", 1)`: QEMU's `_EJ0` writes the slot's bit to the hotplug
/// block's eject register (PCEJ), and QEMU removes the device at once.
extern "C" fn emu_acpi_set_integer(obj: *mut c_void, path: *const c_char, v: u32) -> u32 {
    // SAFETY: a C string per acpi_SetInteger.
    let p = unsafe { cstr(path) };
    let st = match node_of(obj).and_then(|o| resolve(Some(o), &p)) {
        Some(Node::Ej0(s)) => {
            eject_checks(s);
            let r = super::machine::with_machine(|m| m.eject(s));
            let st = if r.is_ok() { AE_OK } else { AE_BAD_PARAMETER };
            log(format!("acpi_SetInteger({}, {p:?}, {v}) = {st:#x}: PCEJ bit {s} written, QEMU removes slot {s}", Node::Slot(s).path()));
            return st;
        }
        _ => AE_NOT_FOUND,
    };
    log(format!("acpi_SetInteger({obj:p}, {p:?}, {v}) = {st:#x}"));
    st
}

/// Before `_EJ0` of slot `s` (QEMU removes whatever is in it at once): the OS must have
/// released the device (EjectAttached: a pci0 child in the slot still has a driver), and the
/// slot must hold a device at all (DoubleEject: its function 0 answers all-ones, so this is a
/// second `_EJ0` for one insertion, or one on an empty slot, which would eject the next
/// device put in).
fn eject_checks(s: u8) {
    let path = Node::Slot(s).path();
    let attached: Vec<u64> = super::newbus::pci_children()
        .into_iter()
        .filter(|&c| with(|e| e.newbus.devices.get(&c).and_then(|d| d.pci.as_ref()).is_some_and(|p| p.bdf.bus == 0 && p.bdf.dev == s)))
        .filter(|&c| super::newbus::state(c) >= crate::layouts::DS_ATTACHED)
        .collect();
    for c in attached {
        super::rules::finding(Rule::EjectAttached, &format!("_EJ0 of {path} while {} is still attached", super::newbus::nameunit(c)));
    }
    let vendor = super::machine::cfg_read(nvmehp_lab::firmware::Bdf { bus: 0, dev: s, func: 0 }, 0, 2);
    if vendor == 0xffff {
        super::rules::finding(Rule::DoubleEject, &format!("_EJ0 of {path}, a slot with no device (already ejected, or empty)"));
    }
}

thread_local! {
    /// Whether this thread is the acpi_task thread running a notify handler ([`run_gpe`]).
    static IN_ACPI_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// AcpiOsWaitEventsComplete (sys/dev/acpica/Osd/OsdSchedule.c) taskqueue_drains every
/// enqueued acpi task; called from one (a notify handler), it waits for itself. ACPICA's
/// AcpiRemoveNotifyHandler (evxface.c) calls it first.
fn wait_events_from_acpi_task(what: &str) {
    if IN_ACPI_TASK.with(|c| c.get()) {
        super::rules::panic(Rule::RemoveNotifyFromAcpiTask, &format!("deadlock: {what} from a notify handler on the acpi_task thread: it drains the task running it"));
    }
}

type NotifyFn = extern "C" fn(*mut c_void, u32, *mut c_void);

/// The SCI's work, as acpi(4) does it: the `_E01` GPE handler's AML (the lab's
/// `AcpiHotplug::handle_gpe`: PCIU/PCID turned into `Notify(Sxx_, 1)`/`Notify(Sxx_, 3)`), then
/// each notify dispatched to the handlers installed on the slot object, in install order.
/// ACPICA queues each dispatch (`AcpiEvQueueNotifyRequest`, evmisc.c) and FreeBSD runs it from
/// the acpi_task taskqueue (sys/dev/acpica/Osd/OsdSchedule.c `AcpiOsExecute`); here that
/// thread is the caller's, as the emulation's taskqueue threads are, with no emulation lock
/// held while a handler runs. Returns the notifies delivered as (slot, value, handlers).
pub fn run_gpe() -> Vec<(u8, u32, usize)> {
    if !with(|e| e.acpi.enabled) {
        return Vec::new();
    }
    let notifies = super::machine::with_machine(|m| m.lab.poll_notifies()).unwrap_or_default();
    notifies.into_iter().map(|n| (n.slot, n.code as u32, notify(n.slot, n.code as u32))).collect()
}

/// One `Notify(Sxx_, value)` dispatched from the acpi_task to the handlers installed on the
/// slot object, in install order (what [`run_gpe`] does per notify; a scenario's `notify` step
/// calls it directly, as firmware that notifies with no hardware change would). Returns how
/// many handlers ran.
pub fn notify(slot: u8, value: u32) -> usize {
    let node = Node::Slot(slot);
    let handlers = with(|e| e.acpi.handlers.get(&node).cloned().unwrap_or_default());
    log(format!("acpi_task: Notify({}, {value}) to {} handler(s)", node.path(), handlers.len()));
    for &(f, ctx) in &handlers {
        // SAFETY: an ACPI_NOTIFY_HANDLER the module installed on this object and has not
        // removed (it is in the list), called with the context it gave.
        let f: NotifyFn = unsafe { std::mem::transmute::<u64, NotifyFn>(f) };
        IN_ACPI_TASK.with(|c| c.set(true));
        f(node.handle(), value, ctx as *mut c_void);
        IN_ACPI_TASK.with(|c| c.set(false));
    }
    handlers.len()
}

extern "C" fn emu_acpi_get_device(h: *mut c_void) -> *mut c_void {
    let dev = match node_of(h) {
        Some(Node::Pci0) => with(|e| e.acpi.pcib0),
        _ => 0,
    };
    log(format!("acpi_get_device({h:p}) = {:#x}", dev));
    dev as *mut c_void
}

extern "C" fn emu_acpi_install_notify_handler(obj: *mut c_void, ty: u32, handler: u64, ctx: *mut c_void) -> u32 {
    let st = match node_of(obj) {
        _ if handler == 0 || ty != ACPI_SYSTEM_NOTIFY => AE_BAD_PARAMETER,
        Some(_) if let Some(st) = super::fail::acpi("AcpiInstallNotifyHandler") => st,
        None => AE_BAD_PARAMETER,
        Some(n) => with(|e| {
            let list = e.acpi.handlers.entry(n).or_default();
            if list.iter().any(|&(h, _)| h == handler) {
                AE_ALREADY_EXISTS
            } else {
                list.push((handler, ctx as u64));
                AE_OK
            }
        }),
    };
    log(format!("AcpiInstallNotifyHandler({}, type {ty}, {handler:#x}, {ctx:p}) = {st:#x}", node_of(obj).map_or("?".into(), Node::path)));
    st
}

extern "C" fn emu_acpi_remove_notify_handler(obj: *mut c_void, ty: u32, handler: u64) -> u32 {
    wait_events_from_acpi_task("AcpiRemoveNotifyHandler");
    let st = match node_of(obj) {
        _ if handler == 0 || ty != ACPI_SYSTEM_NOTIFY => AE_BAD_PARAMETER,
        Some(_) if let Some(st) = super::fail::acpi("AcpiRemoveNotifyHandler") => st,
        None => AE_BAD_PARAMETER,
        Some(n) => with(|e| {
            let list = e.acpi.handlers.entry(n).or_default();
            let before = list.len();
            list.retain(|&(h, _)| h != handler);
            let removed = list.len() < before;
            if list.is_empty() {
                e.acpi.handlers.remove(&n);
            }
            if removed { AE_OK } else { AE_NOT_EXIST }
        }),
    };
    log(format!("AcpiRemoveNotifyHandler({}, type {ty}, {handler:#x}) = {st:#x}", node_of(obj).map_or("?".into(), Node::path)));
    st
}

extern "C" fn emu_acpi_os_wait_events_complete() {
    wait_events_from_acpi_task("AcpiOsWaitEventsComplete");
    log("AcpiOsWaitEventsComplete()".to_string());
}

/// After unload: a notify handler left installed would be called in unloaded code.
pub fn end_of_life_checks() {
    for p in installed_handlers() {
        super::rules::finding(super::rules::Rule::UnloadWithLiveCallbacks, &format!("after unload: ACPI notify handler still installed on {p}"));
    }
}

/// The objects that have a notify handler installed now, by path.
pub fn installed_handlers() -> Vec<String> {
    let in_tree = acpi_pci_fn();
    with(|e| e.acpi.handlers.iter().filter(|(_, l)| l.iter().any(|&(f, _)| f != in_tree)).map(|(n, _)| n.path()).collect())
}

pub fn register(t: &mut KpiTable) {
    t.function("AcpiGetHandle", emu_acpi_get_handle as extern "C" fn(_, _, _) -> _ as usize);
    t.function("AcpiWalkNamespace", emu_acpi_walk_namespace as extern "C" fn(_, _, _, _, _, _, _) -> _ as usize);
    t.function("AcpiGetName", emu_acpi_get_name as extern "C" fn(_, _, _) -> _ as usize);
    t.function("AcpiEvaluateObject", emu_acpi_evaluate_object as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("acpi_GetInteger", emu_acpi_get_integer as extern "C" fn(_, _, _) -> _ as usize);
    t.function("acpi_get_device", emu_acpi_get_device as extern "C" fn(_) -> _ as usize);
    t.function("AcpiInstallNotifyHandler", emu_acpi_install_notify_handler as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("AcpiRemoveNotifyHandler", emu_acpi_remove_notify_handler as extern "C" fn(_, _, _) -> _ as usize);
    t.function("acpi_SetInteger", emu_acpi_set_integer as extern "C" fn(_, _, _) -> _ as usize);
    t.function("AcpiOsWaitEventsComplete", emu_acpi_os_wait_events_complete as extern "C" fn() as usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_paths_handlers_and_the_leak_check() {
        with(|e| e.acpi = AcpiState { enabled: true, removable: 1 << 5, pcib0: 0x1234, handlers: BTreeMap::new(), acpi_pci: false });
        assert_eq!(resolve(None, "\\_SB.PCI0"), Some(Node::Pci0));
        assert_eq!(resolve(None, "\\_SB_.PCI0.S05_"), Some(Node::Slot(5)));
        assert_eq!(resolve(Some(Node::Slot(5)), "_EJ0"), Some(Node::Ej0(5)));
        assert_eq!(resolve(Some(Node::Slot(6)), "_EJ0"), None, "no _EJ0 on a slot PCIRMV does not mark");
        assert_eq!(resolve(Some(Node::Slot(5)), "_STA"), None);
        for n in [Node::Sb, Node::Pci0, Node::Slot(31), Node::Adr(0), Node::Ej0(31)] {
            assert_eq!(Node::of(n.handle()), Some(n));
        }
        let mut v = 0u32;
        assert_eq!(emu_acpi_get_integer(Node::Slot(5).handle(), c"_ADR".as_ptr(), &mut v), AE_OK);
        assert_eq!(v, 5 << 16);
        assert_eq!(emu_acpi_get_device(Node::Pci0.handle()) as u64, 0x1234);
        let h = Node::Slot(5).handle();
        assert_eq!(emu_acpi_install_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x42, std::ptr::null_mut()), AE_OK);
        assert_eq!(emu_acpi_install_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x42, std::ptr::null_mut()), AE_ALREADY_EXISTS);
        assert_eq!(emu_acpi_remove_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x43), AE_NOT_EXIST);
        // Another function next to it (acpi_pci's and the module's may share a slot).
        assert_eq!(emu_acpi_install_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x43, std::ptr::null_mut()), AE_OK);
        assert_eq!(emu_acpi_remove_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x43), AE_OK);
        // Left installed: what the unload check reports.
        assert_eq!(installed_handlers(), vec!["\\_SB_.PCI0.S05_".to_string()]);
        // Removed: nothing left.
        assert_eq!(emu_acpi_remove_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x42), AE_OK);
        assert!(installed_handlers().is_empty());
        with(|e| e.acpi = AcpiState::default());
    }
}
