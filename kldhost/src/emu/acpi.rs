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
//!
//! On q35 (ICH9) the namespace is the one QEMU builds for a root bus without hotplug and
//! `pcie-root-port`s with ACPI hotplug (hw/acpi/pcihp.c `build_append_pci_bus_devices` and
//! `build_append_pcihp_slots`, hw/acpi/pci-bridge.c `build_pci_bridge_aml`):
//! - one Device `S<devfn>_` under `\_SB_.PCI0` per populated function of bus 0 (read from
//!   config space when the namespace is built: the host bridge `S00_`, the ports, the ICH9
//!   functions `SF8_`..), `_ADR` = slot << 16 | function, no `_EJ0` (cold-plugged bridges and
//!   the root bus are not hotpluggable);
//! - in each root port's object (slot s: `S<s*8>_`, e.g. slot 4 is `S20_`) its `BSEL` (the
//!   number QEMU gave its bus) and the hotplug slot `S00_` of its secondary bus: `_ADR` 0,
//!   `_SUN` 0, `_EJ0`, whose body is QEMU's `PCEJ(BSEL, _SUN)`: BNUM = the port's BSEL, then
//!   bit 0 into the eject register (the lab's `AcpiHotplug::eject`, which knows the layout);
//! - `acpi_get_device(S<s*8>_)` is the port's `pcibN` (super::pcib) in the stock variant only
//!   (acpi_pci makes that binding; without it a driver finds the bridge by `_ADR`); notifies
//!   from the GPE go to the `S00_` of the port the lab names; in the stock variant acpi_pci's handler is on
//!   every port's `S00_` (acpi_pci attaches to each `pciN`, whose bridge answers the port's
//!   handle) and acts on that port's bus.

use super::kern::cstr;
use super::rules::Rule;
use super::{log, with};
use crate::kpi::KpiTable;
use nvmehp_lab::qemu::MachineKind;
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
    /// pc: the slot object of bus 0's slot s, its `_ADR` and `_EJ0`.
    Slot(u8),
    Adr(u8),
    Ej0(u8),
    /// q35: the Device of bus 0's function at devfn d, and its `_ADR`.
    Dev(u8),
    DevAdr(u8),
    /// q35, by the root port's slot s: the hotplug slot `S00_` on its bus, that slot's `_ADR`,
    /// `_SUN` and `_EJ0`, and the port's `BSEL`.
    PortSlot(u8),
    PortAdr(u8),
    PortSun(u8),
    PortEj0(u8),
    Bsel(u8),
}

/// Where each kind of node starts in [`HANDLES`] and how many there are of it.
const LAYOUT: [(usize, usize); 10] = [(4, 32), (36, 32), (68, 32), (100, 256), (356, 256), (612, 32), (644, 32), (676, 32), (708, 32), (740, 32)];
const HANDLE_COUNT: usize = 772;

/// Handles are addresses inside this array (never dereferenced by anyone, stable, non-NULL).
static HANDLES: [u8; HANDLE_COUNT] = [0; HANDLE_COUNT];

impl Node {
    /// The kind's row in [`LAYOUT`] and the node's number within it (None: Sb, Pci0).
    fn kind(self) -> Option<(usize, u8)> {
        Some(match self {
            Node::Sb | Node::Pci0 => return None,
            Node::Slot(s) => (0, s),
            Node::Adr(s) => (1, s),
            Node::Ej0(s) => (2, s),
            Node::Dev(d) => (3, d),
            Node::DevAdr(d) => (4, d),
            Node::PortSlot(s) => (5, s),
            Node::PortAdr(s) => (6, s),
            Node::PortSun(s) => (7, s),
            Node::PortEj0(s) => (8, s),
            Node::Bsel(s) => (9, s),
        })
    }

    fn index(self) -> usize {
        match (self, self.kind()) {
            (Node::Sb, _) => 1,
            (Node::Pci0, _) => 2,
            (_, Some((k, n))) => LAYOUT[k].0 + usize::from(n) % LAYOUT[k].1,
            (_, None) => 0,
        }
    }

    pub fn handle(self) -> *mut c_void {
        HANDLES[self.index()..].as_ptr().cast_mut().cast()
    }

    fn of(h: *mut c_void) -> Option<Node> {
        let off = (h as usize).checked_sub(HANDLES.as_ptr() as usize)?;
        match off {
            1 => return Some(Node::Sb),
            2 => return Some(Node::Pci0),
            _ => {}
        }
        let k = LAYOUT.iter().position(|&(start, n)| (start..start + n).contains(&off))?;
        let n = (off - LAYOUT[k].0) as u8;
        Some([Node::Slot, Node::Adr, Node::Ej0, Node::Dev, Node::DevAdr, Node::PortSlot, Node::PortAdr, Node::PortSun, Node::PortEj0, Node::Bsel][k](n))
    }

    /// ACPICA's full path (4-character segments, `_`-padded).
    fn path(self) -> String {
        // QEMU names a function's object after its devfn (`S%.02X`): a root port in slot s is
        // S<s*8>.
        let port = |s: u8| format!("\\_SB_.PCI0.S{:02X}_", u16::from(s) * 8);
        match self {
            Node::Sb => "\\_SB_".into(),
            Node::Pci0 => "\\_SB_.PCI0".into(),
            Node::Slot(s) => format!("\\_SB_.PCI0.S{s:02X}_"),
            Node::Adr(s) => format!("\\_SB_.PCI0.S{s:02X}_._ADR"),
            Node::Ej0(s) => format!("\\_SB_.PCI0.S{s:02X}_._EJ0"),
            Node::Dev(d) => format!("\\_SB_.PCI0.S{d:02X}_"),
            Node::DevAdr(d) => format!("\\_SB_.PCI0.S{d:02X}_._ADR"),
            Node::PortSlot(s) => format!("{}.S00_", port(s)),
            Node::PortAdr(s) => format!("{}.S00_._ADR", port(s)),
            Node::PortSun(s) => format!("{}.S00_._SUN", port(s)),
            Node::PortEj0(s) => format!("{}.S00_._EJ0", port(s)),
            Node::Bsel(s) => format!("{}.BSEL", port(s)),
        }
    }
}

/// q35's part of the namespace (see the module doc).
#[derive(Default, Clone)]
pub struct Q35Namespace {
    /// The populated functions of bus 0 by devfn: each has a Device `S<devfn>_`.
    pub devfns: Vec<u8>,
    /// Root port slot to the BSEL of its bus.
    pub ports: BTreeMap<u8, u32>,
}

impl Q35Namespace {
    /// The root port whose Device is `Dev(d)`.
    fn port_of(&self, d: u8) -> Option<u8> {
        (d.is_multiple_of(8) && self.ports.contains_key(&(d / 8))).then_some(d / 8)
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
    /// q35's namespace (None: pc's).
    pub q35: Option<Q35Namespace>,
}

/// Builds the namespace of the running machine (`--qemu --acpi`): reads PCIRMV from QEMU's
/// hotplug block.
pub fn enable(pcib0: u64) {
    enable_with(pcib0, false);
}

/// acpi_pci(4)'s notify handler, sys/dev/acpica/acpi_pci.c `acpi_pci_device_notify_handler`,
/// run on the acpi_task thread like every handler ([`run_gpe`]), for the bus the slot object is
/// on (pci0 for pc's slots, the port's pciN for q35's `S00_`): a device check (1) is
/// `BUS_RESCAN(bus)` under the topology lock; an eject request (3) detaches the slot's device
/// (`acpi_get_device(h)`; an error ends it with the kernel's message and no `_EJ0`), evaluates
/// `_EJ0`, then `BUS_RESCAN(bus)`, which deletes the function that left.
extern "C" fn acpi_pci_notify(h: *mut c_void, value: u32, _ctx: *mut c_void) {
    let path = Node::of(h).map_or("?".into(), Node::path);
    log(format!("acpi_pci: Notify({path}, {value})"));
    let (bus, slot) = match Node::of(h) {
        Some(Node::Slot(s)) => (super::newbus::pci0(), s),
        Some(Node::PortSlot(p)) => match super::pcib::bridge_at(p).and_then(super::pcib::bus_below) {
            Some(b) => (b, 0),
            None => return,
        },
        _ => return,
    };
    let bus_name = super::newbus::nameunit(bus);
    match value {
        1 => {
            super::sched::topo_lock();
            super::newbus::rescan_bus(bus);
            super::sched::topo_unlock();
        }
        3 => {
            let Some(child) = super::newbus::child_at(bus, slot, 0) else {
                super::kern::console_line(&format!("{bus_name}: no device to eject for {path}\n"));
                return;
            };
            let name = super::newbus::nameunit(child);
            super::sched::topo_lock();
            let r = super::newbus::device_detach(child);
            if r != 0 {
                super::sched::topo_unlock();
                super::kern::console_line(&format!("{bus_name}: failed to detach {name}: {r}\n"));
                return;
            }
            with(|e| e.rule_state.acpi_pci_detached.insert(child));
            let st = emu_acpi_set_integer(h, c"_EJ0".as_ptr(), 1);
            if st != AE_OK {
                super::sched::topo_unlock();
                super::kern::console_line(&format!("{bus_name}: failed to eject {path}: {st:#x}\n"));
                return;
            }
            super::newbus::rescan_bus(bus);
            super::sched::topo_unlock();
        }
        _ => super::kern::console_line(&format!("{bus_name}: unknown notify {value:#x} for {path}\n")),
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

/// q35: the root port in `slot`'s `ACPI_IVAR_HANDLE` for its pci bus (acpi_pcib_pci.c
/// `acpi_pcib_read_ivar`: the port's own object `S<slot*8>_`); only in the stock variant,
/// where acpi_pcib_pci is the bridge's driver.
pub fn bridge_handle(slot: u8) -> Option<usize> {
    with(|e| {
        let q = e.acpi.q35.as_ref()?;
        (e.acpi.enabled && e.acpi.acpi_pci && q.ports.contains_key(&slot)).then(|| Node::Dev(slot.wrapping_mul(8)).handle() as usize)
    })
}

/// acpi_pci's `ACPI_IVAR_HANDLE` for a child of one of its buses (acpi_pci.c binds each child
/// to the Device whose `_ADR` is its slot and function): stock variant only. pc: the slot
/// object of function 0; q35: `S<devfn>_` on bus 0, a port's `S00_` for function 0 behind it.
pub fn pci_child_handle(bdf: nvmehp_lab::firmware::Bdf) -> Option<usize> {
    with(|e| {
        if !(e.acpi.enabled && e.acpi.acpi_pci) {
            return None;
        }
        let node = match &e.acpi.q35 {
            None => (bdf.bus == 0 && bdf.func == 0 && bdf.dev < 32).then_some(Node::Slot(bdf.dev)),
            Some(q) if bdf.bus == 0 => {
                let d = bdf.dev << 3 | bdf.func;
                q.devfns.contains(&d).then_some(Node::Dev(d))
            }
            Some(q) => (bdf.dev == 0 && bdf.func == 0 && q.ports.contains_key(&bdf.bus)).then_some(Node::PortSlot(bdf.bus)),
        };
        node.map(|n| n.handle() as usize)
    })
}

/// [`enable`], and with `acpi_pci` the stock-FreeBSD variant: acpi_pci(4) attached to pci0
/// (and on q35 to each port's pciN) and installed its handler on every `_EJ0` slot (acpi_pci.c
/// `acpi_pci_attach` walks the bus's children), before any module loads.
pub fn enable_with(pcib0: u64, acpi_pci: bool) {
    // The machine enabled the hotplug GPE at start (the OS does when it loads the DSDT's _E01
    // handler); the AML's part (`\_GPE._E01`, `_EJ0`) is the lab's hotplug block driver.
    let q35 = super::machine::with_machine(|m| (m.kind() == MachineKind::Q35).then(|| m.root_ports()));
    let mut handlers = BTreeMap::new();
    let (removable, q35) = match q35 {
        None => {
            let removable = super::machine::with_machine(|m| m.lab.removable_slots(0).unwrap_or(0));
            log(format!("ACPI namespace: \\_SB_.PCI0 (pcib0), slots S00_..S1F_ with _ADR, _EJ0 on PCIRMV {removable:#010x}"));
            if acpi_pci {
                for s in (0..32u8).filter(|s| removable & (1 << s) != 0) {
                    handlers.insert(Node::Slot(s), vec![(acpi_pci_fn(), 0)]);
                }
            }
            (removable, None)
        }
        Some(ports) => {
            let ns = Q35Namespace { devfns: root_bus_devfns(), ports: ports.into_iter().collect() };
            let names: Vec<String> = ns.devfns.iter().map(|&d| format!("S{d:02X}_")).collect();
            let slots: Vec<String> = ns.ports.iter().map(|(&s, &b)| format!("{} (BSEL {b})", Node::PortSlot(s).path())).collect();
            log(format!("ACPI namespace (q35): \\_SB_.PCI0 (pcib0) with {}; hotplug slots {}", names.join(" "), slots.join(", ")));
            if acpi_pci {
                for &s in ns.ports.keys() {
                    handlers.insert(Node::PortSlot(s), vec![(acpi_pci_fn(), 0)]);
                }
            }
            (0, Some(ns))
        }
    };
    if acpi_pci {
        log(format!("acpi_pci: pci0 has ACPI handle \\_SB_.PCI0; its notify handler installed on {} slots", handlers.len()));
    }
    with(|e| e.acpi = AcpiState { enabled: true, removable, pcib0, handlers, acpi_pci, q35 });
}

/// The populated functions of bus 0 by devfn (function 0 of each slot, the others of a
/// multi-function device), from config space: QEMU declares a Device for each.
fn root_bus_devfns() -> Vec<u8> {
    let mut v = Vec::new();
    for dev in 0..32u8 {
        let at = |func: u8| nvmehp_lab::firmware::Bdf { bus: 0, dev, func };
        if super::machine::cfg_read(at(0), 0, 2) == 0xffff {
            continue;
        }
        v.push(dev << 3);
        // Header type bit 7: a multi-function device.
        if super::machine::cfg_read(at(0), 0x0e, 1) & 0x80 != 0 {
            v.extend((1..8u8).filter(|&f| super::machine::cfg_read(at(f), 0, 2) != 0xffff).map(|f| dev << 3 | f));
        }
    }
    v
}

/// Resolves `path` relative to `parent` (NULL: absolute) in the emulated namespace.
fn resolve(parent: Option<Node>, path: &str) -> Option<Node> {
    let (ena, removable, q35) = with(|e| (e.acpi.enabled, e.acpi.removable, e.acpi.q35.clone()));
    if !ena {
        return None;
    }
    // ACPICA accepts segments shorter than 4 characters and pads them with '_'.
    let pad = |s: &str| format!("{s:_<4}");
    // `S<hex>_`: QEMU's name of a slot (pc) or function (q35) object.
    let s_name = |s: &str| (s.len() == 4 && s.starts_with('S') && s.ends_with('_')).then(|| u8::from_str_radix(&s[1..3], 16).ok()).flatten();
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
        node = match (node, seg.as_str(), &q35) {
            (None, "_SB_", _) => Some(Node::Sb),
            (Some(Node::Sb), "PCI0", _) => Some(Node::Pci0),
            (Some(Node::Pci0), s, None) => Some(Node::Slot(s_name(s).filter(|&n| n < 32)?)),
            (Some(Node::Slot(s)), "_ADR", None) => Some(Node::Adr(s)),
            (Some(Node::Slot(s)), "_EJ0", None) if removable & (1 << s) != 0 => Some(Node::Ej0(s)),
            (Some(Node::Pci0), s, Some(q)) => Some(Node::Dev(s_name(s).filter(|d| q.devfns.contains(d))?)),
            (Some(Node::Dev(d)), "_ADR", Some(_)) => Some(Node::DevAdr(d)),
            (Some(Node::Dev(d)), "BSEL", Some(q)) => Some(Node::Bsel(q.port_of(d)?)),
            (Some(Node::Dev(d)), "S00_", Some(q)) => Some(Node::PortSlot(q.port_of(d)?)),
            (Some(Node::PortSlot(p)), "_ADR", Some(_)) => Some(Node::PortAdr(p)),
            (Some(Node::PortSlot(p)), "_SUN", Some(_)) => Some(Node::PortSun(p)),
            (Some(Node::PortSlot(p)), "_EJ0", Some(_)) => Some(Node::PortEj0(p)),
            _ => return None,
        };
    }
    node
}

/// The Device objects directly below `n`, in the order the DSDT declares them.
fn device_children(n: Node) -> Vec<Node> {
    let q35 = with(|e| e.acpi.q35.clone());
    match (n, q35) {
        (Node::Sb, _) => vec![Node::Pci0],
        (Node::Pci0, None) => (0..32).map(Node::Slot).collect(),
        (Node::Pci0, Some(q)) => q.devfns.iter().map(|&d| Node::Dev(d)).collect(),
        (Node::Dev(d), Some(q)) => q.port_of(d).map(Node::PortSlot).into_iter().collect(),
        _ => Vec::new(),
    }
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
    // ACPICA's AcpiNsWalkNamespace over the Device objects below `start`, depth first, the
    // descending callback on each with its level (1 = a child of `start`), at most `depth`
    // levels down. AE_CTRL_DEPTH skips the object's children, AE_CTRL_TERMINATE ends the walk
    // (AE_OK), any other error ends it with that status.
    let Some(root) = node_of(start).filter(|_| ty == ACPI_TYPE_DEVICE) else {
        log(format!("AcpiWalkNamespace(type {ty}, {start:p}, depth {depth}) visits 0 objects"));
        return AE_OK;
    };
    let mut order = Vec::new();
    let st = walk(root, 1, depth, descending, ctx, &mut order);
    log(format!("AcpiWalkNamespace(type {ty}, {}, depth {depth}) visits {} objects: {}", root.path(), order.len(), order.join(" ")));
    st
}

/// One level of [`emu_acpi_walk_namespace`]: AE_OK to go on, AE_CTRL_TERMINATE (reported as
/// AE_OK by the caller) or an error to stop.
fn walk(n: Node, level: u32, depth: u32, cb: Option<WalkCallback>, ctx: *mut c_void, order: &mut Vec<String>) -> u32 {
    if level > depth {
        return AE_OK;
    }
    for c in device_children(n) {
        order.push(c.path());
        let st = match cb {
            // Module code, called with no emulation lock held.
            Some(cb) => cb(c.handle(), level, ctx, std::ptr::null_mut()),
            None => AE_OK,
        };
        match st {
            AE_OK => {
                let r = walk(c, level + 1, depth, cb, ctx, order);
                if r != AE_OK {
                    return r;
                }
            }
            AE_CTRL_DEPTH => {}
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
    let value = match n {
        Some(Node::Adr(s)) => Some(u32::from(s) << 16),
        // _ADR of a PCI function: slot << 16 | function.
        Some(Node::DevAdr(d)) => Some(u32::from(d >> 3) << 16 | u32::from(d & 7)),
        // The hotplug slot behind a root port is slot 0 of its bus, and QEMU's _SUN is the slot.
        Some(Node::PortAdr(_)) | Some(Node::PortSun(_)) => Some(0),
        Some(Node::Bsel(s)) => with(|e| e.acpi.q35.as_ref().and_then(|q| q.ports.get(&s).copied())),
        _ => None,
    };
    match value {
        Some(x) if !v.is_null() => {
            // SAFETY: the caller's UINT32.
            unsafe { *v = x };
            log(format!("acpi_GetInteger({obj:p}, {p:?}) = AE_OK ({x:#x})"));
            AE_OK
        }
        _ => {
            log(format!("acpi_GetInteger({obj:p}, {p:?}) = AE_NOT_FOUND"));
            AE_NOT_FOUND
        }
    }
}

/// `acpi_SetInteger(slot, "_EJ0", 1)`: QEMU's `_EJ0` writes the slot's bit to the hotplug
/// block's eject register (PCEJ), and QEMU removes the device at once. On q35 the slot is a
/// root port's `S00_`: `PCEJ(BSEL, _SUN)` selects the port's bus (BNUM) and writes bit 0.
extern "C" fn emu_acpi_set_integer(obj: *mut c_void, path: *const c_char, v: u32) -> u32 {
    // SAFETY: a C string per acpi_SetInteger.
    let p = unsafe { cstr(path) };
    let (slot, obj_path, how) = match node_of(obj).and_then(|o| resolve(Some(o), &p)) {
        Some(Node::Ej0(s)) => (s, Node::Slot(s).path(), format!("PCEJ bit {s} written, QEMU removes slot {s}")),
        Some(Node::PortEj0(s)) => {
            let bsel = with(|e| e.acpi.q35.as_ref().and_then(|q| q.ports.get(&s).copied())).unwrap_or(0);
            (s, Node::PortSlot(s).path(), format!("BNUM {bsel} (the port's BSEL), PCEJ bit 0 written, QEMU removes the function behind the root port in slot {s}"))
        }
        _ => {
            log(format!("acpi_SetInteger({obj:p}, {p:?}, {v}) = {AE_NOT_FOUND:#x}"));
            return AE_NOT_FOUND;
        }
    };
    eject_checks(slot);
    let r = super::machine::with_machine(|m| m.eject(slot));
    let st = if r.is_ok() { AE_OK } else { AE_BAD_PARAMETER };
    log(format!("acpi_SetInteger({obj_path}, {p:?}, {v}) = {st:#x}: {how}"));
    st
}

/// Before `_EJ0` of scenario slot `s` (QEMU removes whatever is in it at once): the OS must
/// have released the device (EjectAttached: a pci child in the slot still has a driver), and
/// the slot must hold a device at all (DoubleEject: its function 0 answers all-ones, so this is
/// a second `_EJ0` for one insertion, or one on an empty slot, which would eject the next
/// device put in).
fn eject_checks(s: u8) {
    let path = with(|e| if e.acpi.q35.is_some() { Node::PortSlot(s) } else { Node::Slot(s) }).path();
    let attached: Vec<u64> = super::newbus::pci_functions()
        .into_iter()
        .filter(|&c| with(|e| e.newbus.devices.get(&c).and_then(|d| d.pci.as_ref()).is_some_and(|p| super::machine::slot_of(p.bdf) == s)))
        .filter(|&c| super::newbus::state(c) >= crate::layouts::DS_ATTACHED)
        .collect();
    for c in attached {
        super::rules::finding(Rule::EjectAttached, &format!("_EJ0 of {path} while {} is still attached", super::newbus::nameunit(c)));
    }
    let bdf = super::machine::with_machine(|m| m.bdf(s));
    let vendor = super::machine::cfg_read(bdf, 0, 2);
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
    // q35: the lab names the event after the root port's slot; the AML notifies its `S00_`.
    let node = with(|e| if e.acpi.q35.is_some() { Node::PortSlot(slot) } else { Node::Slot(slot) });
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
    // acpi(4) attached pcib0 to \_SB_.PCI0. A PCI function's object is bound to its device_t
    // only by acpi_pci, when it adds the bus's children (acpi_pci.c acpi_pci_save_handle,
    // acpi_pci_update_device: AcpiAttachData): so only in the stock variant, and only while
    // the function has a child (q35: a root port's object is its pcibN; the other functions
    // of bus 0 have no newbus device here).
    let stock = with(|e| e.acpi.acpi_pci);
    let dev = match node_of(h) {
        Some(Node::Pci0) => with(|e| e.acpi.pcib0),
        Some(Node::Dev(d)) if stock => super::newbus::pci_child_at(d >> 3, d & 7).unwrap_or(0),
        Some(Node::Slot(s)) if stock => super::newbus::pci_child_at(s, 0).unwrap_or(0),
        Some(Node::PortSlot(p)) if stock => super::pcib::bridge_at(p).and_then(super::pcib::bus_below).and_then(|b| super::newbus::child_at(b, 0, 0)).unwrap_or(0),
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

    /// The tests share the emulation's global ACPI state: one at a time.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn namespace_paths_handlers_and_the_leak_check() {
        let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        with(|e| e.acpi = AcpiState { enabled: true, removable: 1 << 5, pcib0: 0x1234, handlers: BTreeMap::new(), acpi_pci: false, q35: None });
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

    static WALKED: std::sync::Mutex<Vec<(String, u32)>> = std::sync::Mutex::new(Vec::new());

    /// Records each object with its level; skips the children of `\_SB_.PCI0.S28_`.
    extern "C" fn record(h: *mut c_void, level: u32, _ctx: *mut c_void, _ret: *mut *mut c_void) -> u32 {
        let n = Node::of(h).expect("a node");
        WALKED.lock().unwrap_or_else(|p| p.into_inner()).push((n.path(), level));
        if n == Node::Dev(0x28) { AE_CTRL_DEPTH } else { AE_OK }
    }

    fn walk_from(start: Node, depth: u32) -> Vec<(String, u32)> {
        WALKED.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let st = emu_acpi_walk_namespace(ACPI_TYPE_DEVICE, start.handle(), depth, Some(record), None, std::ptr::null_mut(), std::ptr::null_mut());
        assert_eq!(st, AE_OK);
        WALKED.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    #[test]
    fn q35_namespace_has_root_port_objects_with_their_hotplug_slot_behind_them() {
        let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        // Bus 0 as the lab's q35 has it: host bridge, root ports in slots 4 and 5, ICH9 LPC.
        let q = Q35Namespace { devfns: vec![0x00, 0x20, 0x28, 0xf8], ports: [(4u8, 1u32), (5, 0)].into_iter().collect() };
        with(|e| e.acpi = AcpiState { enabled: true, q35: Some(q), ..AcpiState::default() });
        // Objects are named after the devfn: slot 4's port is S20_, its hotplug slot S00_.
        assert_eq!(resolve(None, "\\_SB_.PCI0.S20_"), Some(Node::Dev(0x20)));
        assert_eq!(resolve(None, "\\_SB_.PCI0.S20_.S00_"), Some(Node::PortSlot(4)));
        assert_eq!(resolve(None, "\\_SB_.PCI0.S04_"), None, "no slot-numbered objects on q35");
        assert_eq!(resolve(None, "\\_SB_.PCI0.S00_"), Some(Node::Dev(0)), "the host bridge's object");
        assert_eq!(resolve(Some(Node::Dev(0)), "S00_"), None, "only a root port has a hotplug slot");
        assert_eq!(resolve(Some(Node::Dev(0xf8)), "BSEL"), None);
        // No _EJ0 on bus 0's objects (not hotpluggable), _EJ0 on each port's slot.
        assert_eq!(resolve(Some(Node::Dev(0x20)), "_EJ0"), None);
        assert_eq!(resolve(Some(Node::PortSlot(5)), "_EJ0"), Some(Node::PortEj0(5)));
        assert_eq!(Node::PortEj0(5).path(), "\\_SB_.PCI0.S28_.S00_._EJ0");
        for n in [Node::Dev(0xff), Node::DevAdr(0x20), Node::PortSlot(31), Node::PortAdr(4), Node::PortSun(4), Node::PortEj0(4), Node::Bsel(30), Node::Ej0(31)] {
            assert_eq!(Node::of(n.handle()), Some(n));
        }
        let int = |n: Node, p: &std::ffi::CStr| {
            let mut v = 0xdead_u32;
            let st = emu_acpi_get_integer(n.handle(), p.as_ptr(), &mut v);
            (st == AE_OK).then_some(v)
        };
        assert_eq!(int(Node::Dev(0x20), c"_ADR"), Some(4 << 16));
        assert_eq!(int(Node::Dev(0xf8), c"_ADR"), Some(0x1f << 16));
        assert_eq!(int(Node::PortSlot(4), c"_ADR"), Some(0));
        assert_eq!(int(Node::PortSlot(4), c"_SUN"), Some(0));
        assert_eq!(int(Node::Dev(0x20), c"BSEL"), Some(1));
        assert_eq!(int(Node::Dev(0x28), c"BSEL"), Some(0));
        assert_eq!(int(Node::PortSlot(4), c"_STA"), None);
        // Depth 1 from PCI0: bus 0's objects in devfn order; depth 2 adds each port's slot
        // under it (level 2), except below S28_, whose callback asked to skip its children.
        let names = |v: Vec<(String, u32)>| v.into_iter().map(|(p, l)| format!("{l}:{p}")).collect::<Vec<_>>();
        assert_eq!(names(walk_from(Node::Pci0, 1)), ["1:\\_SB_.PCI0.S00_", "1:\\_SB_.PCI0.S20_", "1:\\_SB_.PCI0.S28_", "1:\\_SB_.PCI0.SF8_"]);
        assert_eq!(
            names(walk_from(Node::Pci0, 2)),
            ["1:\\_SB_.PCI0.S00_", "1:\\_SB_.PCI0.S20_", "2:\\_SB_.PCI0.S20_.S00_", "1:\\_SB_.PCI0.S28_", "1:\\_SB_.PCI0.SF8_"]
        );
        assert_eq!(names(walk_from(Node::Dev(0x28), 1)), ["1:\\_SB_.PCI0.S28_.S00_"]);
        // A notify for the lab's slot 5 goes to the hotplug slot behind that port.
        let h = Node::PortSlot(5).handle();
        assert_eq!(emu_acpi_install_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x42, std::ptr::null_mut()), AE_OK);
        assert_eq!(installed_handlers(), vec!["\\_SB_.PCI0.S28_.S00_".to_string()]);
        assert_eq!(emu_acpi_remove_notify_handler(h, ACPI_SYSTEM_NOTIFY, 0x42), AE_OK);
        // Handles for acpi_pci's ivars only in the stock variant.
        assert_eq!(bridge_handle(4), None);
        with(|e| e.acpi.acpi_pci = true);
        assert_eq!(bridge_handle(4), Some(Node::Dev(0x20).handle() as usize));
        assert_eq!(bridge_handle(6), None, "no port in slot 6");
        let bdf = |bus, dev| nvmehp_lab::firmware::Bdf { bus, dev, func: 0 };
        assert_eq!(pci_child_handle(bdf(4, 0)), Some(Node::PortSlot(4).handle() as usize));
        assert_eq!(pci_child_handle(bdf(0, 4)), Some(Node::Dev(0x20).handle() as usize));
        assert_eq!(pci_child_handle(bdf(0, 7)), None);
        with(|e| e.acpi = AcpiState::default());
    }
}
