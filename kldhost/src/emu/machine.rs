//! The machine under the emulated kernel: QEMU as the lab drives it
//! ([`nvmehp_lab::machine::Machine`]: the process, qtest, QMP, the PIIX4 hotplug block, the
//! NVMe controllers plugged into slots with their image files), plus what only a kernel running
//! *on* it needs: the pci(4) view of the functions, the contigmalloc pool, and the removal
//! behaviour of a function's BAR once the function is gone.
//!
//! `kldhost run --qemu` starts it with one controller in slot 4, plus `--multifunction`'s
//! controllers at functions of their slots ([`Machine::start_with_multifunction`]);
//! `kldhost scenario` with the scenario's controllers ([`Machine::start_scenario`]), so a
//! scenario gets the same slots, images, hot-adds, unplug requests, ejects and GPE polling in
//! kld mode as in engine mode.
//!
//! - **Guest RAM is shared**: the lab's `SharedRam` (a memfd QEMU runs the machine on and this
//!   process maps too), so memory the module gets from `contigmalloc(9)` is memory QEMU's NVMe
//!   model can DMA to, at physical address = offset in the file (`pmap_kextract`). The module's
//!   pool is [`DMA_POOL_START`]..[`BIO_POOL_START`]; above it, the pages bios carry (the
//!   scenario runner's buffers, which are not the module's memory).
//! - **Config space** goes through qtest (configuration mechanism #1, the lab's `firmware`); an
//!   empty slot answers all-ones, as QEMU's does.
//! - **BARs** are not mapped: the module's register access is `bus_read_4`/`bus_write_4`, which
//!   amd64's <machine/bus.h> (x86/bus.h `bus_space_read_4`) inlines into the glue as a plain
//!   load from `r_bushandle + offset`. The handle points at an inaccessible window of this
//!   process, and [`super::mmio`] turns each faulting access into qtest at the BAR's physical
//!   address — unless the function was removed since the window was mapped: then reads return
//!   what the scenario's `removal_reads` says (0 as QEMU's unassigned memory reads, or all-ones
//!   as a PCIe master abort completes) and writes go nowhere, imposed here so a stale window
//!   never reaches a controller later plugged at the same address.
//!
//! The firmware role (what SeaBIOS and pci(4) do before a driver runs): the memory BARs
//! programmed (BAR0, and BAR4 with `--msix-exclusive-bar`), memory decode on. Bus mastering is left **off**: the driver's `pci_enable_busmaster` must turn it
//! on, or QEMU's NVMe model drops every DMA.

use nvmehp_lab::access_faults::RemovalReads;
use nvmehp_lab::firmware::{self, Bdf, PciFunction};
use nvmehp_lab::machine::{Machine as LabMachine, MsixPlacement};
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::qtest::{Qtest, QtestError};
use nvmehp_lab::scenario::{ControllerSpec, NamespaceSpec};
use nvmehp_lab::shared_ram::{RamAccess, SharedRam};
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

/// Guest RAM size (the lab's machine: the 32-bit PCI hole starts right after it).
pub const RAM_MIB: u32 = nvmehp_lab::machine::GUEST_RAM_MIB;
/// First guest-physical byte contigmalloc hands out.
pub const DMA_POOL_START: u64 = 16 << 20;
/// First guest-physical byte of the bio data pool (scenario I/O buffers); the module's
/// contigmalloc pool ends here.
pub const BIO_POOL_START: u64 = 160 << 20;
/// The slot `run --qemu`'s controller sits in (pc: 00:04.0).
pub const NVME_SLOT: u8 = 4;
/// Its scenario id (`run --qemu`'s QMP messages name it).
pub const NVME_ID: &str = "nvme0";

/// The slot of the lab-private controller of `run --qemu --namespace` (pc: 00:06.0).
pub const PRIVATE_SLOT: u8 = 6;

/// Image size of `run --qemu`'s controller's namespace.
pub const IMAGE_BYTES: u64 = 16 << 20;

/// Per slot: BAR accesses of the function plugged there, and a removal armed at one of them.
#[derive(Default, Clone, Copy)]
struct Trap {
    accesses: u64,
    eject_before: Option<u64>,
    fired: bool,
}

/// One running machine. [`MACHINE`] serialises its users (emulated config-space accessors and
/// the MMIO trap).
pub struct Machine {
    pub lab: LabMachine,
    /// What the firmware found in each populated slot (and pci_add_child placed later).
    pub functions: Vec<PciFunction>,
    /// The image of the controller plugged last (`run --qemu` checks its I/O there).
    pub image: PathBuf,
    /// Bump pointer of the contigmalloc pool (guest-physical). Freed memory is poisoned and
    /// kept, as malloc'd memory is (super::kern), so it is not handed out again until the pool
    /// is used up ([`Machine::reclaim`]).
    pub next_free: u64,
    /// Pool ranges the module freed, given back once the bump pointer reached the end:
    /// guest-physical (start, end), sorted, coalesced.
    reclaimed: Vec<(u64, u64)>,
    /// What reads of a removed function's BAR return.
    pub removal_reads: RemovalReads,
    /// Ejects per slot so far: a BAR window mapped before the last one is a removed function's.
    ejects: BTreeMap<u8, u64>,
    traps: BTreeMap<u8, Trap>,
    /// `run --qemu --namespace`: the lab-private controller of the first controller's NVMe
    /// subsystem ([`super::ns_admin`]). Not on pci0: config space at its address reads
    /// all-ones and takes no writes for the emulated kernel (the module, pci(4), ACPI, nvme(4)
    /// all see an empty slot), so nothing in the kernel claims it.
    pub private: Option<super::ns_admin::PrivateCtrl>,
}

// SAFETY: the lab machine holds `Rc`s and `RefCell`s (its guest), which are not Send because
// their counts are not atomic. kldhost runs the emulated kernel on one host thread: the machine
// is created, used (also from the SIGSEGV handler, which runs on the faulting thread) and
// dropped there; MACHINE only makes the access exclusive, no other thread ever takes it.
unsafe impl Send for Machine {}

pub static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);

fn to_io(e: QtestError) -> io::Error {
    io::Error::other(e.to_string())
}

impl Machine {
    /// `run --qemu`'s machine: `kind` (pc, or q35 with `--q35`: root ports in slots 4 and 5),
    /// 256 MiB of shared RAM, an NVMe controller in slot [`NVME_SLOT`] with a 16 MiB zeroed
    /// namespace, plus a cold multi-function slot per `(slot, functions)` of `multifunction`
    /// (pc): an NVMe controller with a 16 MiB zeroed namespace at each listed function
    /// (scenario id [`function_id`]), function 0 plugged with `multifunction=on`. Every
    /// controller, hot-added ones too, has its MSI-X table where `msix` says
    /// (`--msix-exclusive-bar`: BAR4).
    pub fn start_with_multifunction(kind: MachineKind, multifunction: &[(u8, Vec<u8>)], msix: MsixPlacement) -> io::Result<Machine> {
        let mut cold = vec![(controller(NVME_ID, NVME_SLOT), 0)];
        for (slot, funcs) in multifunction {
            cold.extend(funcs.iter().map(|&f| (controller(&function_id(*slot, f), *slot), f)));
        }
        Self::start_functions_with(kind, &cold, &[5], RemovalReads::Zeros, None, msix)
    }

    /// A scenario's machine: `cold` controllers present at power-on, `hot_slots` the slots
    /// hot-adds will use; the firmware's boot scan programs each cold function's BAR0, leaving
    /// bus mastering to the driver.
    pub fn start_scenario(kind: MachineKind, cold: &[ControllerSpec], hot_slots: &[u8], removal_reads: RemovalReads) -> io::Result<Machine> {
        let cold: Vec<(ControllerSpec, u8)> = cold.iter().map(|c| (c.clone(), 0)).collect();
        Self::start_functions_with(kind, &cold, hot_slots, removal_reads, None, MsixPlacement::Bar0)
    }

    /// `run --qemu --namespace ...`'s machine (pc): a controller with two shared namespaces (1
    /// and 2, 16 MiB each) of an NVMe subsystem, whose second, lab-private controller sits in
    /// [`PRIVATE_SLOT`], hidden from the emulated kernel ([`Machine::private`]). The subsystem's
    /// controller is at `at`: [`Machine::start`]'s controller ([`NVME_SLOT`], function 0), or
    /// one function of a `multifunction` slot, whose other functions get plain controllers
    /// (and slot 4 its own then).
    pub fn start_with_subsystem(at: (u8, u8), multifunction: &[(u8, Vec<u8>)], msix: MsixPlacement) -> io::Result<Machine> {
        let size_mib = (IMAGE_BYTES >> 20) as u32;
        let (slot, func) = at;
        let main = at == (NVME_SLOT, 0);
        let spec = ControllerSpec {
            id: if main { NVME_ID.into() } else { function_id(slot, func) },
            slot,
            namespaces: vec![NamespaceSpec { nsid: 1, size_mib, lba: 512 }, NamespaceSpec { nsid: 2, size_mib, lba: 512 }],
        };
        // The subsystem's controller first: the lab puts the first cold controller in it.
        let mut cold = vec![(spec, func)];
        if !main {
            cold.push((controller(NVME_ID, NVME_SLOT), 0));
        }
        for (s, funcs) in multifunction {
            cold.extend(funcs.iter().filter(|&&f| (*s, f) != at).map(|&f| (controller(&function_id(*s, f), *s), f)));
        }
        let sub = nvmehp_lab::machine::SubsystemSpec { private_slot: PRIVATE_SLOT, detached: Vec::new() };
        Self::start_functions_with(MachineKind::Pc, &cold, &[5], RemovalReads::Zeros, Some(&sub), msix)
    }

    /// The machine with each cold controller at a function of its slot, `subsys` for the first
    /// one, the MSI-X tables where `msix` says.
    fn start_functions_with(
        kind: MachineKind,
        cold: &[(ControllerSpec, u8)],
        hot_slots: &[u8],
        removal_reads: RemovalReads,
        subsys: Option<&nvmehp_lab::machine::SubsystemSpec>,
        msix: MsixPlacement,
    ) -> io::Result<Machine> {
        let mut lab = LabMachine::start_full(kind, cold, hot_slots, RamAccess::Shared, subsys, msix)?;
        lab.set_removal_reads(removal_reads);
        // The lab's guest-RAM allocator hands out the bio data pool only (the scenario's I/O
        // buffers); below it is the module's contigmalloc pool.
        *lab.guest().ram() = nvmehp_lab::dma::GuestRam::new(BIO_POOL_START, u64::from(RAM_MIB) << 20);
        let found = lab.scan()?;
        let mut functions = Vec::new();
        let mut private = None;
        for (slot, f) in found {
            lab.guest().qtest(|q| clear_bus_master(q, f.bdf)).map_err(to_io)?;
            if subsys.is_some_and(|s| s.private_slot == slot) {
                private = Some(super::ns_admin::PrivateCtrl::new(f));
                continue;
            }
            functions.push(f);
        }
        let image = cold.first().and_then(|(c, f)| lab.plugged_function(c.slot, *f)).and_then(|d| d.images.first()).map(|i| i.path.clone()).unwrap_or_default();
        Ok(Machine { lab, functions, image, next_free: DMA_POOL_START, reclaimed: Vec::new(), removal_reads, ejects: BTreeMap::new(), traps: BTreeMap::new(), private })
    }

    /// Runs `f` with the qtest connection.
    pub fn qtest<T>(&self, f: impl FnOnce(&mut Qtest) -> Result<T, QtestError>) -> Result<T, QtestError> {
        self.lab.guest().qtest(f)
    }

    /// Guest RAM as this process maps it.
    pub fn ram(&self) -> &SharedRam {
        self.lab.guest().shared_ram().expect("kldhost machines share guest RAM")
    }

    /// The guest-physical address of `va` if it lies in guest RAM.
    pub fn phys_of(&self, va: u64) -> Option<u64> {
        self.ram().gpa_of(va as *const u8, 1)
    }

    /// Allocates `size` bytes of guest RAM aligned to `align` within `[low, high]`
    /// (contigmalloc's constraints; `boundary` 0 only). Returns the host address.
    pub fn contig_alloc(&mut self, size: u64, low: u64, high: u64, align: u64, boundary: u64) -> Option<*mut u8> {
        let align = align.max(4096);
        if !align.is_power_of_two() || boundary != 0 || size == 0 {
            return None;
        }
        let start = self.next_free.max(low).div_ceil(align) * align;
        let end = start.checked_add(size)?;
        if end - 1 <= high && end <= BIO_POOL_START {
            let p = self.ram().host_ptr(start, size).ok()?.as_ptr();
            self.next_free = end.div_ceil(4096) * 4096;
            return Some(p);
        }
        // First fit in what the module freed (only once the bump pointer reached the end).
        let a = first_fit(&mut self.reclaimed, size.div_ceil(4096) * 4096, low, high, align)?;
        Some(self.ram().host_ptr(a, size).ok()?.as_ptr())
    }

    /// Whether the bump pointer reached the end of the contigmalloc pool.
    pub fn pool_exhausted(&self, size: u64) -> bool {
        self.next_free + size > BIO_POOL_START
    }

    /// Gives freed blocks (host address, size) of the pool back to it, for [`Machine::contig_alloc`]
    /// once the bump pointer reached the end. Returns how many lay in the pool.
    pub fn reclaim(&mut self, blocks: &[(u64, u64)]) -> usize {
        let mut n = 0;
        for &(va, size) in blocks {
            let Some(pa) = self.phys_of(va) else { continue };
            if pa < DMA_POOL_START || pa + size > BIO_POOL_START {
                continue;
            }
            self.reclaimed.push((pa, pa + size.div_ceil(4096) * 4096));
            n += 1;
        }
        coalesce(&mut self.reclaimed);
        n
    }

    /// QMP `device_del` of the controller in `slot`: QEMU sets PCID and raises the GPE.
    pub fn request_unplug(&mut self, slot: u8) -> io::Result<()> {
        self.lab.request_unplug(slot)
    }

    /// QMP `blockdev-add` + `device_add` of a controller (fresh zeroed images); QEMU sets PCIU
    /// and raises the GPE. Its image becomes [`Machine::image`].
    pub fn hot_add(&mut self, spec: &ControllerSpec) -> io::Result<()> {
        self.hot_add_function(spec, 0, false)
    }

    /// [`Machine::hot_add`] at function `func` of the slot (`multifunction`: function 0 with
    /// `multifunction=on`); see the lab's `hot_add_function` for what QEMU does with it.
    pub fn hot_add_function(&mut self, spec: &ControllerSpec, func: u8, multifunction: bool) -> io::Result<()> {
        self.lab.hot_add_function(spec, func, multifunction)?;
        // A new function: its accesses are counted from 0; a removal armed for it stays armed.
        let armed = self.traps.get(&spec.slot).and_then(|t| t.eject_before);
        self.traps.insert(spec.slot, Trap { eject_before: armed, ..Trap::default() });
        if let Some(i) = self.lab.plugged_function(spec.slot, func).and_then(|d| d.images.first()) {
            self.image = i.path.clone();
        }
        Ok(())
    }

    /// The PCEJ write of `slot` (`_EJ0`'s body; a surprise removal when no `device_del` came
    /// first): QEMU removes the function at once.
    pub fn eject(&mut self, slot: u8) -> io::Result<()> {
        let r = self.lab.eject(slot);
        *self.ejects.entry(slot).or_default() += 1;
        // Every function of the slot: the eject removes them all.
        self.functions.retain(|f| slot_of(f.bdf) != slot);
        r
    }

    /// The machine model (pc or q35).
    pub fn kind(&self) -> MachineKind {
        self.lab.kind()
    }

    /// q35: each `pcie-root-port` as (its slot on bus 0, the BSEL QEMU gave its secondary bus),
    /// in slot order; empty on pc, whose root bus is the hotpluggable one.
    pub fn root_ports(&self) -> Vec<(u8, u32)> {
        let mut v: Vec<(u8, u32)> = self.lab.hotplug_layout().buses.iter().filter_map(|b| b.port_slot.map(|s| (s, b.bsel))).collect();
        v.sort_unstable();
        v
    }

    /// Where the function of scenario slot `slot` lives (pc: 00:slot.0; q35: slot 0 of the bus
    /// behind the root port in `slot`).
    pub fn bdf(&self, slot: u8) -> Bdf {
        self.lab.bdf(slot)
    }

    /// Waits up to `wait` for QEMU to finish deleting ejected devices; true if none is left.
    pub fn reap(&mut self, wait: std::time::Duration) -> bool {
        self.lab.reap(wait).is_ok_and(|n| n == 0)
    }

    /// Waits up to `wait` for QEMU's `DEVICE_DELETED` of the controller `id` (the scenario id
    /// it was plugged with); true once QEMU deleted it. Other devices still being deleted do
    /// not count: QEMU may never finish one ejected with requests in its backend.
    pub fn deleted(&mut self, id: &str, wait: std::time::Duration) -> bool {
        let _ = self.lab.reap(wait);
        !self.lab.retiring().iter().any(|d| d.id == id) && self.lab.plugged_by_id(id).is_none()
    }

    /// The slot whose window holds a function's BAR0 at `phys` (the lab's firmware gives each
    /// slot a window, each function of it an eighth).
    pub fn slot_of_bar(&self, phys: u64) -> Option<u8> {
        firmware::function_of_bar(phys).map(|(s, _)| s)
    }

    /// Ejects of `slot` so far.
    pub fn ejects(&self, slot: u8) -> u64 {
        self.ejects.get(&slot).copied().unwrap_or(0)
    }

    /// One BAR access of the function in `slot` through a window mapped after `ejects_at_map`
    /// ejects. Counts it, performs a removal armed for it, and says whether the function is
    /// gone (the access must then not reach QEMU).
    pub fn bar_access(&mut self, slot: u8, ejects_at_map: u64) -> bool {
        if self.ejects(slot) != ejects_at_map {
            return true;
        }
        let t = self.traps.entry(slot).or_default();
        let n = t.accesses;
        t.accesses += 1;
        if t.eject_before == Some(n) && !t.fired {
            t.fired = true;
            t.eject_before = None;
            let _ = self.eject(slot);
            return true;
        }
        false
    }

    /// Arms a surprise removal of `slot` right before BAR access `n` (0-based) of the function
    /// plugged there next.
    pub fn arm_removal(&mut self, slot: u8, n: u64) {
        self.traps.insert(slot, Trap { accesses: 0, eject_before: Some(n), fired: false });
    }

    /// BAR accesses made to the function in `slot`, and whether its armed removal fired.
    pub fn trap_state(&self, slot: u8) -> (u64, bool) {
        self.traps.get(&slot).map_or((0, false), |t| (t.accesses, t.fired))
    }

    /// True while config space of `slot` answers.
    pub fn slot_present(&mut self, slot: u8) -> bool {
        self.lab.slot_present(slot).unwrap_or(false)
    }

    /// What QEMU's function at `bdf` answers to a config read (width 1, 2 or 4; all-ones if
    /// QEMU is gone), past the device-fault layer: for the runner's own looking, never the
    /// emulated kernel's ([`cfg_read`]).
    pub fn qemu_cfg_read(&self, bdf: Bdf, reg: u16, width: i32) -> u32 {
        let r = self.qtest(|q| match width {
            1 => firmware::cfg_read8(q, bdf, reg).map(u32::from),
            2 => firmware::cfg_read16(q, bdf, reg).map(u32::from),
            _ => firmware::cfg_read32(q, bdf, reg),
        });
        r.unwrap_or(u32::MAX)
    }

    /// QEMU's stderr so far (for error messages).
    pub fn qemu_stderr(&self) -> String {
        self.lab.process().stderr_text()
    }
}

/// Takes `size` bytes aligned to `align` within `[low, high]` from the first free range
/// (start, end) that has them, splitting it; ranges stay sorted and disjoint.
fn first_fit(ranges: &mut Vec<(u64, u64)>, size: u64, low: u64, high: u64, align: u64) -> Option<u64> {
    let place = |s: u64| s.max(low).div_ceil(align) * align;
    let i = ranges.iter().position(|&(s, e)| {
        let a = place(s);
        a + size <= e && a + size - 1 <= high
    })?;
    let (s, e) = ranges.remove(i);
    let a = place(s);
    let mut at = i;
    if a > s {
        ranges.insert(at, (s, a));
        at += 1;
    }
    if a + size < e {
        ranges.insert(at, (a + size, e));
    }
    Some(a)
}

/// Sorts free ranges and merges those that touch or overlap.
fn coalesce(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *ranges = merged;
}

fn clear_bus_master(q: &mut Qtest, bdf: Bdf) -> Result<(), QtestError> {
    let cmd = firmware::cfg_read16(q, bdf, firmware::cfg::COMMAND)?;
    firmware::cfg_write16(q, bdf, firmware::cfg::COMMAND, cmd & !firmware::cfg::CMD_BUS_MASTER)
}

/// The scenario slot an endpoint function's address names: on pc its device number on bus 0;
/// on q35 the slot of the root port it sits behind, which is the secondary bus number the lab's
/// firmware gives that port (lab `firmware::init_q35`). Not meant for bus 0's own bridges.
pub fn slot_of(bdf: Bdf) -> u8 {
    if bdf.bus != 0 { bdf.bus } else { bdf.dev }
}

/// The scenario id of the controller `run --qemu --multifunction` plugs at `slot`.`func`.
pub fn function_id(slot: u8, func: u8) -> String {
    format!("mf{slot}f{func}")
}

/// A controller with one 16 MiB namespace ([`IMAGE_BYTES`]) in `slot`.
pub fn controller(id: &str, slot: u8) -> ControllerSpec {
    ControllerSpec { id: id.into(), slot, namespaces: vec![NamespaceSpec { nsid: 1, size_mib: (IMAGE_BYTES >> 20) as u32, lba: 512 }] }
}

/// The firmware's part for a function pci_add_child adds: its memory BARs placed for its slot as
/// pci_add_resources would reserve it (on q35 inside its root port's memory window, which the
/// lab's firmware made that slot's window), memory decode on, bus mastering left to the driver.
pub fn program_function(bdf: Bdf) -> Option<PciFunction> {
    with_machine(|m| {
        let f = m.qtest(|q| firmware::probe_and_program(q, bdf, firmware::bar0_for_function(slot_of(bdf), bdf.func))).ok().flatten()?;
        m.qtest(|q| clear_bus_master(q, bdf)).ok()?;
        m.functions.push(f);
        Some(f)
    })
}

/// Runs `f` on the machine. Panics (an emulation bug, not the module's) when there is none.
pub fn with_machine<R>(f: impl FnOnce(&mut Machine) -> R) -> R {
    let mut g = MACHINE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.as_mut().expect("kldhost: no machine (run without --qemu)"))
}

/// Whether a machine is running.
pub fn has_machine() -> bool {
    MACHINE.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Starts `run --qemu`'s machine ([`Machine::start_with_multifunction`]) for this process's
/// emulated kernel.
pub fn start(kind: MachineKind, multifunction: &[(u8, Vec<u8>)], msix: MsixPlacement) -> io::Result<()> {
    install(Machine::start_with_multifunction(kind, multifunction, msix)?);
    Ok(())
}

/// Starts `run --qemu --namespace`'s machine ([`Machine::start_with_subsystem`]).
pub fn start_with_subsystem(at: (u8, u8), multifunction: &[(u8, Vec<u8>)], msix: MsixPlacement) -> io::Result<()> {
    install(Machine::start_with_subsystem(at, multifunction, msix)?);
    Ok(())
}

/// Whether `bdf` is the lab-private controller, which the emulated kernel does not see.
fn hidden(m: &Machine, bdf: Bdf) -> bool {
    m.private.as_ref().is_some_and(|p| p.bdf() == bdf)
}

/// Makes `m` the machine of this process's emulated kernel.
pub fn install(m: Machine) {
    *MACHINE.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
}

/// Stops QEMU and unmaps guest RAM.
pub fn stop() {
    let m = MACHINE.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(m);
}

/// A config-space read of `bdf` (width 1, 2 or 4) through qtest; all-ones if QEMU is gone.
/// The device-fault layer may change the value on its way back
/// ([`super::device_fault::on_config_read`]).
pub fn cfg_read(bdf: Bdf, reg: u16, width: i32) -> u32 {
    let (v, notes) = with_machine(|m| {
        if hidden(m, bdf) {
            return (if width == 4 { u32::MAX } else { (1u32 << (8 * width)) - 1 }, Vec::new());
        }
        let v = m.qemu_cfg_read(bdf, reg, width);
        if v == u32::MAX || !super::device_fault::wants_config_read(reg, width) {
            return (v, Vec::new());
        }
        let class = m.qtest(|q| firmware::cfg_read32(q, bdf, 0x08)).unwrap_or(u32::MAX) >> 8;
        super::device_fault::on_config_read(class, reg, width, v)
    });
    notes.into_iter().for_each(super::log);
    v
}

/// A config-space write of `bdf` through qtest. The device-fault layer sees it first
/// ([`super::device_fault::on_config_write`]) and may change the value QEMU gets.
pub fn cfg_write(bdf: Bdf, reg: u16, val: u32, width: i32) {
    let notes = with_machine(|m| {
        if hidden(m, bdf) {
            return Vec::new();
        }
        let mut val = val;
        let mut notes = Vec::new();
        if super::device_fault::wants_config_write(reg, width) {
            let class = m.qtest(|q| firmware::cfg_read32(q, bdf, 0x08)).unwrap_or(u32::MAX) >> 8;
            let cmd = m.qtest(|q| firmware::cfg_read16(q, bdf, 0x04)).map_or(0, u32::from);
            (val, notes) = super::device_fault::on_config_write(class, reg, val, width, cmd);
        }
        let _ = m.qtest(|q| match width {
            1 => firmware::cfg_write8(q, bdf, reg, val as u8),
            2 => firmware::cfg_write16(q, bdf, reg, val as u16),
            _ => firmware::cfg_write32(q, bdf, reg, val),
        });
        notes
    });
    notes.into_iter().for_each(super::log);
}

#[cfg(test)]
mod tests {
    use super::{coalesce, first_fit};

    #[test]
    fn freed_ranges_merge_and_are_handed_out_first_fit_aligned() {
        let mut r = vec![(0x30000, 0x31000), (0x10000, 0x12000), (0x12000, 0x13000), (0x20000, 0x28000)];
        coalesce(&mut r);
        assert_eq!(r, vec![(0x10000, 0x13000), (0x20000, 0x28000), (0x30000, 0x31000)]);
        // 8 KiB fits the first range.
        assert_eq!(first_fit(&mut r, 0x2000, 0, u64::MAX, 0x1000), Some(0x10000));
        assert_eq!(r, vec![(0x12000, 0x13000), (0x20000, 0x28000), (0x30000, 0x31000)]);
        // 16 KiB aligned to 16 KiB: not in the first, in the second at its start.
        assert_eq!(first_fit(&mut r, 0x4000, 0, u64::MAX, 0x4000), Some(0x20000));
        assert_eq!(r, vec![(0x12000, 0x13000), (0x24000, 0x28000), (0x30000, 0x31000)]);
        // Alignment inside a range leaves the part before it free.
        let mut r = vec![(0x11000, 0x20000)];
        assert_eq!(first_fit(&mut r, 0x1000, 0, u64::MAX, 0x4000), Some(0x14000));
        assert_eq!(r, vec![(0x11000, 0x14000), (0x15000, 0x20000)]);
        // Above `high` or below `low`: nothing.
        assert_eq!(first_fit(&mut r, 0x1000, 0, 0x10fff, 0x1000), None);
        assert_eq!(first_fit(&mut r, 0x1000, 0x1f000, u64::MAX, 0x1000), Some(0x1f000));
        assert_eq!(r, vec![(0x11000, 0x14000), (0x15000, 0x1f000)]);
        // Too large for any range.
        assert_eq!(first_fit(&mut r, 0x20000, 0, u64::MAX, 0x1000), None);
    }
}
