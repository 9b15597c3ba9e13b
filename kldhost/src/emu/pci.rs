//! pci(4) under the module: the methods of the `pci0` bus (and its `pcib0` bridge) that the
//! module's inline kobj dispatch reaches, bus resources and interrupts of a pci child, all over
//! QEMU (super::machine).
//!
//! - Config space: `pci_read_config`/`pci_write_config` and the ivars (vendor, device, class,
//!   slot, function) read the function's config space through qtest.
//! - Bus mastering: the command register's bit, read-modify-write (sys/dev/pci/pci.c
//!   pci_enable_busmaster_method).
//! - BARs are sized at enumeration as pci(4)'s pci_add_map does (all-ones written with decode
//!   off, the mask read back, the address restored). `bus_alloc_resource(SYS_RES_MEMORY, rid)`
//!   of a BAR gives a `struct resource` whose bus tag is X86_BUS_SPACE_MEM and whose handle is
//!   a trapping window (super::mmio); a BAR can be allocated once at a time (rman).
//! - MSI-X: the vector count, the table's and the PBA's BAR (Table BIR, PBA BIR: BAR0 on
//!   QEMU's default `nvme`, BAR4 with `--msix-exclusive-bar`) and offsets from the capability;
//!   `pci_alloc_msix` refuses (ENXIO) unless the driver holds the table's BAR, and the PBA's,
//!   allocated and active, then grants what is asked (up to the count) and enables MSI-X with
//!   every vector masked, as pci_alloc_msix_method does; it keeps the table BAR's resource
//!   (`msix_table_res`), through which every table entry is written from then on, so a driver
//!   that released it while MSI-X is allocated is found ([`release_resource`]) and a table write
//!   through it after that is the page fault it is on FreeBSD;
//!   `bus_setup_intr` on IRQ rid k programs table entry k-1 with an address in guest RAM (a
//!   mailbox below the DMA pool) and data k, and unmasks it. The interrupt thread is
//!   [`run_interrupts`]: a non-zero mailbox word is cleared and the handler runs (filter first,
//!   if any). It runs when the module sleeps (pause_sbt, DELAY) and when taskqueue threads
//!   run.
//! - pci(4)'s tunables `hw.pci.enable_msix`/`hw.pci.enable_msi` (super::pci_tunables): 0 makes
//!   the counts 0, the table/PBA BARs -1 and the allocations ENODEV, as in pci.c.
//! - MSI: QEMU's NVMe model has no MSI capability; with `--msi-instead-of-msix` or
//!   `--msi-with-msix` pci(4) offers an emulated one with one message (super::msi), allocated,
//!   enabled at `bus_setup_intr`, disabled at the last `bus_teardown_intr` and released as
//!   pci.c does; its handler runs on the function's INTx assertions (super::msi::run_messages).
//! - INTx (rid 0): allocated as pci.c does (refused once MSI or MSI-X messages are allocated,
//!   and they while it is), routed to the function's GSI (super::intx::assign);
//!   `bus_setup_intr` clears the command register's INTx Disable bit (pci_setup_intr) and the
//!   handler runs while the line is high (super::intx, level-triggered).
//! - BUS_CHILD_DETACHED is pci_child_detached: a driver that detached with memory or IRQ
//!   resources or MSI vectors still allocated gets pci(4)'s "Device leaked ..." message, and
//!   here a finding; they are released as pci(4) does. A handler whose bus_teardown_intr failed
//!   (`--fail bus_teardown_intr`) stays installed and called, its vector stays allocated
//!   (pci_release_msi refuses it), and what the driver kept for it is not counted as a leak
//!   ([`child_detached`]); [`deliver_msix_messages`] sends it a late message.

use super::machine::{self, cfg_read, cfg_write};
use super::newbus::{self, HostClass};
use super::{finding, kernel_panic, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use nvmehp_lab::firmware::{Bdf, PciFunction};
use std::ffi::{c_int, c_void};

/// Guest-physical base of the MSI-X mailboxes (4 bytes per vector), below the DMA pool.
pub const MSIX_MAILBOX: u64 = 0x10_0000;

/// The mailbox of MSI-X vector `rid - 1` of the function at `bdf`: one 1 KiB block per
/// function, eight per scenario slot, from [`MSIX_MAILBOX`] (the slot's device number on pc,
/// its root port's on q35, where every function is device 0 of its own bus), so the messages
/// of several controllers, or of several functions of one slot, never share a word.
pub fn mailbox(bdf: Bdf, rid: c_int) -> u64 {
    MSIX_MAILBOX + 0x2000 * u64::from(machine::slot_of(bdf)) + 0x400 * u64::from(bdf.func & 7) + 4 * rid as u64
}
/// PCI capability ids and registers used here (PCI Local Bus 3.0, sys/dev/pci/pcireg.h).
const PCIY_MSIX: u8 = 0x11;
const PCIY_MSI: u8 = 0x05;
const PCIR_COMMAND: u16 = 0x04;
const PCIM_CMD_BUSMASTEREN: u32 = 0x4;
const PCIM_MSIXCTRL_ENABLE: u32 = 0x8000;
const PCIM_MSIXCTRL_FUNCTION_MASK: u32 = 0x4000;
const PCIM_CMD_INTXDIS: u32 = 0x400;

/// A BAR of a pci child: its rid (config offset), physical address and size.
#[derive(Clone, Debug)]
pub struct Bar {
    pub rid: c_int,
    pub phys: u64,
    pub size: u64,
    /// The resource allocated on it, if any.
    pub allocated: u64,
}

#[derive(Clone, Debug)]
pub struct Msix {
    pub cap: u16,
    pub count: u32,
    pub table_rid: c_int,
    pub table_off: u64,
    pub pba_rid: c_int,
    pub allocated: u32,
    /// The table BAR's resource `pci_alloc_msix` found allocated and active (pci.c
    /// `msix_table_res`); pci(4) writes the table through it. 0 before.
    pub table_res: u64,
}

/// The pci(4) state of one child (its `struct pci_devinfo`, in part).
#[derive(Clone, Debug)]
pub struct PciChild {
    pub bdf: Bdf,
    pub bars: Vec<Bar>,
    pub msix: Option<Msix>,
    /// MSI vectors the capability offers (0: no MSI capability).
    pub msi: u32,
    /// The MSI capability is kldhost's, not QEMU's (super::msi).
    pub msi_emulated: bool,
    /// MSI messages allocated (pci.c `msi_alloc`).
    pub msi_alloc: u32,
    /// MSI Enable in the capability's control register: set by `pci_setup_intr` with the
    /// first handler, cleared by `pci_teardown_intr` with the last (pci.c `pci_enable_msi`,
    /// `pci_disable_msi`).
    pub msi_enabled: bool,
    /// A PCI-PCI bridge (q35's root port, [`super::pcib`]): no driver of the module's, its
    /// BARs not listed.
    pub bridge: bool,
}

/// A `struct resource` handed out, with its owner.
pub struct Res {
    pub dev: u64,
    pub kind: c_int,
    pub rid: c_int,
    pub size: u64,
    pub window: u64,
    /// Allocated with RF_ACTIVE (its mapping set up): what pci_alloc_msix_method checks of the
    /// table and PBA BARs (`rman_get_flags(rle->res) & RF_ACTIVE`).
    pub active: bool,
}

/// An interrupt handler set up on an IRQ resource.
pub struct Intr {
    pub dev: u64,
    pub res: u64,
    pub rid: c_int,
    pub filter: u64,
    pub handler: u64,
    pub arg: u64,
    /// A `bus_teardown_intr` of it failed with this errno (`--fail bus_teardown_intr`): it is
    /// still installed and still called, and the driver could not have removed it, so what
    /// it keeps for it after its detach is not its leak ([`child_detached`]).
    pub teardown_failed: Option<c_int>,
}

#[derive(Default)]
pub struct PciState {
    pub resources: std::collections::BTreeMap<u64, Res>,
    /// Cookie to handler.
    pub intrs: std::collections::BTreeMap<u64, Intr>,
    /// Functions (by nameunit) whose pci_disable_busmaster left PCIM_CMD_BUSMASTEREN reading
    /// back on: they may still DMA into memory they were given ([`super::kern::dma_hold_reported`]).
    pub(crate) dma_unstoppable: Vec<String>,
}

fn find_cap(bdf: Bdf, id: u8) -> Option<u16> {
    let mut at = cfg_read(bdf, 0x34, 1) as u16 & 0xfc;
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        let hdr = cfg_read(bdf, at, 2);
        if hdr as u8 == id {
            return Some(at);
        }
        at = (hdr >> 8) as u16 & 0xfc;
    }
    None
}

/// pci(4)'s enumeration of one function: BARs sized, MSI-X and MSI capabilities read.
pub fn enumerate(f: &PciFunction) -> PciChild {
    let bdf = f.bdf;
    let cmd = cfg_read(bdf, PCIR_COMMAND, 2);
    cfg_write(bdf, PCIR_COMMAND, cmd & !0x3, 2);
    let mut bars = Vec::new();
    let mut i = 0u16;
    while i < 6 {
        let reg = 0x10 + 4 * i;
        let lo = cfg_read(bdf, reg, 4);
        let is64 = lo & 1 == 0 && (lo >> 1) & 3 == 2;
        cfg_write(bdf, reg, u32::MAX, 4);
        let mask = cfg_read(bdf, reg, 4);
        cfg_write(bdf, reg, lo, 4);
        let mut hi = 0;
        if is64 {
            hi = cfg_read(bdf, reg + 4, 4);
        }
        if lo & 1 == 0 && mask & !0xf != 0 {
            let size = u64::from(!(mask & !0xf)) + 1;
            let phys = u64::from(lo & !0xf) | u64::from(hi) << 32;
            bars.push(Bar { rid: c_int::from(reg), phys, size, allocated: 0 });
        }
        i += if is64 { 2 } else { 1 };
    }
    cfg_write(bdf, PCIR_COMMAND, cmd, 2);
    let msix = find_cap(bdf, PCIY_MSIX).map(|cap| {
        let ctrl = cfg_read(bdf, cap + 2, 2);
        let table = cfg_read(bdf, cap + 4, 4);
        let pba = cfg_read(bdf, cap + 8, 4);
        Msix {
            cap,
            count: (ctrl & 0x7ff) + 1,
            table_rid: 0x10 + 4 * (table & 7) as c_int,
            table_off: u64::from(table & !7),
            pba_rid: 0x10 + 4 * (pba & 7) as c_int,
            allocated: 0,
            table_res: 0,
        }
    });
    // Multiple Message Capable: log2 of the vector count (PCI 3.0, 6.8.1.3).
    let mut msi = find_cap(bdf, PCIY_MSI).map_or(0, |cap| 1 << ((cfg_read(bdf, cap + 2, 2) >> 1) & 7));
    // `--msi-instead-of-msix` / `--msi-with-msix`: an MSI capability with one message over a
    // function that has none (super::msi), and no MSI-X with the first.
    let mut msix = msix;
    let emulate = super::msi::mode() != super::msi::Mode::Off && msi == 0;
    if emulate {
        msi = 1;
        if super::msi::mode() == super::msi::Mode::InsteadOfMsix {
            msix = None;
        }
        log(format!(
            "pci: {}:{}.{}: an emulated MSI capability, 1 message{} (--msi-{}): QEMU's INTx assertions stand in for its messages",
            bdf.bus,
            bdf.dev,
            bdf.func,
            if msix.is_some() { ", besides QEMU's MSI-X" } else { "; QEMU's MSI-X capability not offered" },
            if msix.is_some() { "with-msix" } else { "instead-of-msix" }
        ));
    }
    PciChild { bdf, bars, msix, msi, msi_emulated: emulate, msi_alloc: 0, msi_enabled: false, bridge: false }
}

fn child_of(child: *mut c_void) -> PciChild {
    let c = with(|e| e.newbus.devices.get(&(child as u64)).and_then(|d| d.pci.clone()));
    c.unwrap_or_else(|| kernel_panic(&format!("pci: {child:p} is not a child of pci0")))
}

fn update_child(child: u64, f: impl FnOnce(&mut PciChild)) {
    with(|e| {
        if let Some(p) = e.newbus.devices.get_mut(&child).and_then(|d| d.pci.as_mut()) {
            f(p)
        }
    })
}

// --- pci0's methods (pci_if.m, bus_if.m) ------------------------------------------------------

extern "C" fn pci_read_ivar(_dev: *mut c_void, child: *mut c_void, which: c_int, result: *mut usize) -> c_int {
    let c = child_of(child);
    let b = c.bdf;
    // acpi_pci.c `acpi_pci_read_ivar`: the ACPI object acpi_pci bound to the child by its
    // `_ADR` (stock variant only; pci.c itself has no such ivar).
    if which == super::pcib::ACPI_IVAR_HANDLE {
        let Some(h) = super::acpi::pci_child_handle(b) else { return layouts::ENOENT };
        // SAFETY: the caller's uintptr_t.
        unsafe { *result = h };
        return 0;
    }
    // The order of enum pci_device_ivars (sys/dev/pci/pcivar.h).
    let v = match which {
        0 => cfg_read(b, 0x2c, 2) as usize,
        1 => cfg_read(b, 0x2e, 2) as usize,
        2 => cfg_read(b, 0x00, 2) as usize,
        3 => cfg_read(b, 0x02, 2) as usize,
        4 => cfg_read(b, 0x00, 4) as usize,
        5 => cfg_read(b, 0x0b, 1) as usize,
        6 => cfg_read(b, 0x0a, 1) as usize,
        7 => cfg_read(b, 0x09, 1) as usize,
        8 => cfg_read(b, 0x08, 1) as usize,
        9 => cfg_read(b, 0x3d, 1) as usize,
        10 => cfg_read(b, 0x3c, 1) as usize,
        11 => 0,
        12 => usize::from(b.bus),
        13 => usize::from(b.dev),
        14 => usize::from(b.func),
        _ => {
            log(format!("BUS_READ_IVAR(pci0, ivar {which}) = ENOENT"));
            return layouts::ENOENT;
        }
    };
    // SAFETY: the caller's uintptr_t.
    unsafe { *result = v };
    0
}

extern "C" fn pci_read_config_m(_dev: *mut c_void, child: *mut c_void, reg: c_int, width: c_int) -> u32 {
    let c = child_of(child);
    let v = cfg_read(c.bdf, reg as u16, width);
    log(format!("pci_read_config({}, {reg:#x}, {width}) = {v:#x}", newbus::nameunit(child as u64)));
    v
}

extern "C" fn pci_write_config_m(_dev: *mut c_void, child: *mut c_void, reg: c_int, val: u32, width: c_int) {
    let c = child_of(child);
    cfg_write(c.bdf, reg as u16, val, width);
    log(format!("pci_write_config({}, {reg:#x}, {val:#x}, {width})", newbus::nameunit(child as u64)));
}

fn set_busmaster(child: *mut c_void, on: bool) -> c_int {
    let c = child_of(child);
    let cmd = cfg_read(c.bdf, PCIR_COMMAND, 2);
    let new = if on { cmd | PCIM_CMD_BUSMASTEREN } else { cmd & !PCIM_CMD_BUSMASTEREN };
    cfg_write(c.bdf, PCIR_COMMAND, new, 2);
    let name = newbus::nameunit(child as u64);
    log(format!("pci_{}_busmaster({name}) (command {cmd:#x} -> {new:#x})", if on { "enable" } else { "disable" }));
    if !on {
        // Read back, as nothing else in pci(4) would notice a function that ignored the write
        // (device-fault busmaster-stuck): it may still master the bus.
        let back = cfg_read(c.bdf, PCIR_COMMAND, 2);
        if back != 0xffff && back & PCIM_CMD_BUSMASTEREN != 0 {
            log(format!("{name}: PCIR_COMMAND reads back {back:#x}: bus mastering is still on, the function may still DMA"));
            with(|e| {
                if !e.pci.dma_unstoppable.contains(&name) {
                    e.pci.dma_unstoppable.push(name);
                }
            });
        }
    }
    0
}

extern "C" fn pci_enable_busmaster_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    set_busmaster(child, true)
}

extern "C" fn pci_disable_busmaster_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    set_busmaster(child, false)
}

/// The MSI-X capability as pci(4) offers it: none with `hw.pci.enable_msix=0` (pci.c's
/// `pci_do_msix` test in the count, table-BAR and PBA-BAR methods).
fn offered_msix(child: *mut c_void) -> Option<Msix> {
    child_of(child).msix.filter(|_| super::pci_tunables::msix_enabled())
}

/// Interrupt handlers run so far (MSI-X messages and INTx assertions).
static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times an interrupt handler of a device ran (MSI-X or INTx).
pub fn interrupts_taken() -> u64 {
    TAKEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// One run of a device's interrupt handler (the INTx ithread counts its runs here too).
pub(crate) fn note_taken() {
    TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

extern "C" fn pci_msix_count_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    let n = offered_msix(child).map_or(0, |m| m.count as c_int);
    let off = if super::pci_tunables::msix_enabled() { "" } else { " (hw.pci.enable_msix=0)" };
    log(format!("pci_msix_count({}) = {n}{off}", newbus::nameunit(child as u64)));
    n
}

/// 0 with `hw.pci.enable_msi=0` (pci.c pci_msi_count_method tests `pci_do_msi`).
extern "C" fn pci_msi_count_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    let n = if super::pci_tunables::msi_enabled() { child_of(child).msi as c_int } else { 0 };
    let off = if super::pci_tunables::msi_enabled() { "" } else { " (hw.pci.enable_msi=0)" };
    log(format!("pci_msi_count({}) = {n}{off}", newbus::nameunit(child as u64)));
    n
}

/// The rid of the MSI-X table's BAR, from the capability's Table BIR (pci.c
/// pci_msix_table_bar_method: `PCIR_BAR(bir)`), -1 without MSI-X.
extern "C" fn pci_msix_table_bar_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    let rid = offered_msix(child).map_or(-1, |m| m.table_rid);
    log(format!("pci_msix_table_bar({}) = {rid:#x}", newbus::nameunit(child as u64)));
    rid
}

/// The rid of the PBA's BAR, from the capability's PBA BIR; -1 without MSI-X.
extern "C" fn pci_msix_pba_bar_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    let rid = offered_msix(child).map_or(-1, |m| m.pba_rid);
    log(format!("pci_msix_pba_bar({}) = {rid:#x}", newbus::nameunit(child as u64)));
    rid
}

/// The resource `child` holds on its BAR `rid`, if it is allocated and active.
fn active_bar(c: &PciChild, rid: c_int) -> Option<u64> {
    let r = c.bars.iter().find(|b| b.rid == rid).map(|b| b.allocated).filter(|&r| r != 0)?;
    with(|e| e.pci.resources.get(&r).is_some_and(|x| x.active)).then_some(r)
}

/// Whether `child`'s legacy IRQ (rid 0) is allocated: pci.c's alloc methods then refuse
/// messages with ENXIO ("If rid 0 is allocated, then fail").
fn intx_allocated(child: *mut c_void) -> bool {
    with(|e| e.pci.resources.values().any(|r| r.dev == child as u64 && r.kind == layouts::SYS_RES_IRQ && r.rid == 0))
}

/// Writes MSI-X table entry `i` of `c` (address, data, vector control) through the table
/// BAR's resource pci_alloc_msix kept (at its address, over qtest). A resource the driver
/// released since is unmapped on FreeBSD: pci(4)'s write (pci_mask_msix, pci_enable_msix)
/// faults, the kernel's fatal trap.
fn msix_entry(c: &PciChild, i: u32, addr: u64, data: u32, masked: bool) {
    let Some(m) = &c.msix else { return };
    let Some(bar) = c.bars.iter().find(|b| b.rid == m.table_rid && b.allocated == m.table_res && m.table_res != 0) else {
        kernel_panic(&format!(
            "fatal trap 12: page fault in pci(4) writing MSI-X table entry {i} of pci0:{}:{}:{}: the table's BAR (rid {:#x}) was released while MSI-X is allocated",
            c.bdf.bus, c.bdf.dev, c.bdf.func, m.table_rid
        ));
    };
    let at = bar.phys + m.table_off + 16 * u64::from(i);
    machine::with_machine(|mc| {
        let _ = mc.qtest(|q| {
            q.writel(at, addr as u32)?;
            q.writel(at + 4, (addr >> 32) as u32)?;
            q.writel(at + 8, data)?;
            q.writel(at + 12, u32::from(masked))
        });
    });
}

extern "C" fn pci_alloc_msix_m(_dev: *mut c_void, child: *mut c_void, count: *mut c_int) -> c_int {
    let c = child_of(child);
    // SAFETY: the caller's int.
    let want = unsafe { *count };
    if let Some(err) = super::fail::errno("pci_alloc_msix") {
        log(format!("pci_alloc_msix({}, {want}) = {err} (MSI-X not enabled)", newbus::nameunit(child as u64)));
        return err;
    }
    // pci.c pci_alloc_msix_method's order: rid 0 allocated, messages already allocated
    // (ENXIO), then no capability or `hw.pci.enable_msix=0` (ENODEV).
    if intx_allocated(child) || c.msix.as_ref().is_some_and(|m| m.allocated > 0) || c.msi_alloc > 0 {
        log(format!("pci_alloc_msix({}, {want}) = ENXIO", newbus::nameunit(child as u64)));
        return layouts::ENXIO;
    }
    let Some(m) = c.msix.clone().filter(|_| super::pci_tunables::msix_enabled()) else {
        log(format!("pci_alloc_msix({}, {want}) = ENODEV{}", newbus::nameunit(child as u64), if c.msix.is_some() { " (hw.pci.enable_msix=0)" } else { "" }));
        return layouts::ENODEV;
    };
    // "Make sure the appropriate BARs are mapped": the table's, kept to write the table
    // through, then the PBA's if another.
    let unmapped = |what: &str, rid: c_int| {
        log(format!("pci_alloc_msix({}, {want}) = ENXIO (the MSI-X {what}'s BAR, rid {rid:#x}, is not allocated and active)", newbus::nameunit(child as u64)));
        layouts::ENXIO
    };
    let Some(table_res) = active_bar(&c, m.table_rid) else { return unmapped("table", m.table_rid) };
    if active_bar(&c, m.pba_rid).is_none() {
        return unmapped("PBA", m.pba_rid);
    }
    if want < 1 {
        return layouts::ENXIO;
    }
    update_child(child as u64, |p| p.msix.as_mut().expect("msix").table_res = table_res);
    let c = child_of(child);
    let n = (want as u32).min(m.count);
    for i in 0..m.count {
        msix_entry(&c, i, 0, 0, true);
    }
    let ctrl = cfg_read(c.bdf, m.cap + 2, 2);
    cfg_write(c.bdf, m.cap + 2, (ctrl | PCIM_MSIXCTRL_ENABLE) & !PCIM_MSIXCTRL_FUNCTION_MASK, 2);
    update_child(child as u64, |p| p.msix.as_mut().expect("msix").allocated = n);
    // SAFETY: as above.
    unsafe { *count = n as c_int };
    log(format!("pci_alloc_msix({}, {want}) = 0, {n} vectors", newbus::nameunit(child as u64)));
    0
}

/// pci.c pci_alloc_msi_method, in its order: `*count` 0 is EINVAL; rid 0 allocated, or MSI or
/// MSI-X messages already allocated, ENXIO; no MSI capability or `hw.pci.enable_msi=0`,
/// ENODEV; then at most the capability's count, a power of two. On QEMU's machine the only MSI
/// capability is the emulated one (super::msi), whose message is stood in for by the
/// function's INTx line: without a routed line it is refused (ENXIO, as PCIB_ALLOC_MSI's
/// failure), never granted without a way to deliver it. MSI stays disabled until
/// `bus_setup_intr` (pci_setup_intr enables it with the first handler).
extern "C" fn pci_alloc_msi_m(_dev: *mut c_void, child: *mut c_void, count: *mut c_int) -> c_int {
    let name = newbus::nameunit(child as u64);
    let c = child_of(child);
    // SAFETY: the caller's int.
    let want = unsafe { *count };
    if let Some(err) = super::fail::errno("pci_alloc_msi") {
        log(format!("pci_alloc_msi({name}, {want}) = {err} (no message allocated)"));
        return err;
    }
    if want == 0 {
        log(format!("pci_alloc_msi({name}, {want}) = EINVAL"));
        return layouts::EINVAL;
    }
    if intx_allocated(child) || c.msi_alloc > 0 || c.msix.as_ref().is_some_and(|m| m.allocated > 0) {
        log(format!("pci_alloc_msi({name}, {want}) = ENXIO (rid 0 or messages already allocated)"));
        return layouts::ENXIO;
    }
    if c.msi == 0 || !super::pci_tunables::msi_enabled() {
        let why = if c.msi == 0 { "no MSI capability" } else { "hw.pci.enable_msi=0" };
        log(format!("pci_alloc_msi({name}, {want}) = ENODEV ({why})"));
        return layouts::ENODEV;
    }
    let actual = (want.max(0) as u32).min(c.msi).min(32);
    if !actual.is_power_of_two() {
        log(format!("pci_alloc_msi({name}, {want}) = EINVAL ({actual} messages: not a power of two)"));
        return layouts::EINVAL;
    }
    if !c.msi_emulated {
        log(format!("pci_alloc_msi({name}, {want}) = ENXIO (an MSI capability of QEMU's: its messages are not emulated)"));
        return layouts::ENXIO;
    }
    let Some(gsi) = super::msi::bind_line(c.bdf) else {
        log(format!("pci_alloc_msi({name}, {want}) = ENXIO (no INTx line to stand in for the emulated MSI message)"));
        return layouts::ENXIO;
    };
    update_child(child as u64, |p| p.msi_alloc = actual);
    // SAFETY: as above.
    unsafe { *count = actual as c_int };
    log(format!("pci_alloc_msi({name}, {want}) = 0, {actual} message (emulated MSI, stood in for by INTx on GSI {gsi}; MSI not enabled until bus_setup_intr)"));
    0
}

/// pci_release_msi_method: MSI-X off, vectors given back; ENODEV if none were allocated. It
/// refuses (EBUSY) while a vector still has a handler (pci.c pci_release_msix: `mte_handlers >
/// 0`) or an IRQ resource of a vector is still allocated.
fn release_msi(child: u64) -> c_int {
    let c = child_of(child as *mut c_void);
    let Some(m) = c.msix.clone().filter(|m| m.allocated > 0) else { return release_msi_messages(child, &c) };
    let busy = with(|e| {
        e.pci.intrs.values().any(|i| i.dev == child && i.rid > 0)
            || e.pci.resources.values().any(|r| r.dev == child && r.kind == layouts::SYS_RES_IRQ && r.rid > 0)
    });
    if busy {
        log(format!("pci_release_msi({}) = EBUSY (a vector still has a handler or its IRQ resource)", newbus::nameunit(child)));
        return layouts::EBUSY;
    }
    let ctrl = cfg_read(c.bdf, m.cap + 2, 2);
    cfg_write(c.bdf, m.cap + 2, ctrl & !PCIM_MSIXCTRL_ENABLE, 2);
    update_child(child, |p| p.msix.as_mut().expect("msix").allocated = 0);
    log(format!("pci_release_msi({}) = 0", newbus::nameunit(child)));
    0
}

/// pci_release_msi_method after pci_release_msix found no MSI-X vector: ENODEV without MSI
/// messages; EBUSY while a handler is set up on one (`msi_handlers` > 0) or a message's IRQ
/// resource is allocated; else the messages go back (MSI is already disabled: the last
/// `bus_teardown_intr` disabled it).
fn release_msi_messages(child: u64, c: &PciChild) -> c_int {
    let name = newbus::nameunit(child);
    if c.msi_alloc == 0 {
        log(format!("pci_release_msi({name}) = ENODEV"));
        return layouts::ENODEV;
    }
    let handlers = with(|e| e.pci.intrs.values().any(|i| i.dev == child && i.rid > 0));
    let resources = with(|e| e.pci.resources.values().any(|r| r.dev == child && r.kind == layouts::SYS_RES_IRQ && r.rid > 0));
    if handlers || resources {
        let what = if handlers { "a handler is still set up on it" } else { "its IRQ resource is still allocated" };
        log(format!("pci_release_msi({name}) = EBUSY (MSI message: {what})"));
        return layouts::EBUSY;
    }
    update_child(child, |p| {
        p.msi_alloc = 0;
        p.msi_enabled = false;
    });
    super::msi::forget(child);
    log(format!("pci_release_msi({name}) = 0 (MSI message given back)"));
    0
}

extern "C" fn pci_release_msi_m(_dev: *mut c_void, child: *mut c_void) -> c_int {
    release_msi(child as u64)
}

// --- pcib0's methods (pcib_if.m) --------------------------------------------------------------

extern "C" fn pcib_read_ivar(dev: *mut c_void, _child: *mut c_void, which: c_int, result: *mut usize) -> c_int {
    // A root port's pcib (q35): its own ivars (super::pcib).
    let pcib0 = with(|e| e.newbus.devices.get(&e.newbus.pci0).map_or(0, |d| d.parent));
    if dev as u64 != pcib0 {
        let Some(v) = super::pcib::read_ivar(dev as u64, which) else { return layouts::ENOENT };
        // SAFETY: the caller's uintptr_t.
        unsafe { *result = v };
        return 0;
    }
    // ACPI_IVAR_HANDLE (dev/acpica/acpivar.h), asked by acpi_get_handle(pci0): answered only
    // in the stock-FreeBSD ACPI variant (super::acpi::pcib_acpi_handle).
    if which == 0x100 {
        if let Some(h) = super::acpi::pcib_acpi_handle() {
            // SAFETY: the caller's uintptr_t.
            unsafe { *result = h };
            return 0;
        }
    }
    // enum pcib_device_ivars: PCIB_IVAR_DOMAIN, PCIB_IVAR_BUS; both 0 on this machine.
    if !(0..=1).contains(&which) {
        return layouts::ENOENT;
    }
    // SAFETY: the caller's uintptr_t.
    unsafe { *result = 0 };
    0
}

/// PCIB_READ_CONFIG: the module's reads of functions it has no device_t for (its slot walk).
/// Each is logged as `PCIB_READ_CONFIG(b:s.f, reg, width) = value`, so a test can tell which
/// functions a rescan looked at.
extern "C" fn pcib_read_config_m(_dev: *mut c_void, bus: u32, slot: u32, func: u32, reg: u32, width: c_int) -> u32 {
    let bdf = Bdf { bus: bus as u8, dev: slot as u8, func: func as u8 };
    let v = cfg_read(bdf, reg as u16, width);
    log(format!("PCIB_READ_CONFIG({bus}:{slot}.{func}, {reg:#x}, {width}) = {v:#x}"));
    v
}

extern "C" fn pcib_maxfuncs_m(_dev: *mut c_void) -> c_int {
    7 // PCI_FUNCMAX
}

/// The host function for method `name` of a host class, or None (the lookup then panics).
pub fn method(kind: HostClass, name: &str) -> Option<usize> {
    Some(match (kind, name) {
        (HostClass::Pci, "bus_read_ivar_desc") => pci_read_ivar as extern "C" fn(_, _, _, _) -> _ as usize,
        (HostClass::Pci, "pci_read_config_desc") => pci_read_config_m as extern "C" fn(_, _, _, _) -> _ as usize,
        (HostClass::Pci, "pci_write_config_desc") => pci_write_config_m as extern "C" fn(_, _, _, _, _) as usize,
        (HostClass::Pci, "pci_enable_busmaster_desc") => pci_enable_busmaster_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pci, "pci_disable_busmaster_desc") => pci_disable_busmaster_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pci, "pci_msix_count_desc") => pci_msix_count_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pci, "pci_msi_count_desc") => pci_msi_count_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pci, "pci_msix_table_bar_desc") => pci_msix_table_bar_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pci, "pci_msix_pba_bar_desc") => pci_msix_pba_bar_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pci, "pci_alloc_msix_desc") => pci_alloc_msix_m as extern "C" fn(_, _, _) -> _ as usize,
        (HostClass::Pci, "pci_alloc_msi_desc") => pci_alloc_msi_m as extern "C" fn(_, _, _) -> _ as usize,
        (HostClass::Pci, "pci_release_msi_desc") => pci_release_msi_m as extern "C" fn(_, _) -> _ as usize,
        (HostClass::Pcib, "bus_read_ivar_desc") => pcib_read_ivar as extern "C" fn(_, _, _, _) -> _ as usize,
        (HostClass::Pcib, "pcib_read_config_desc") => pcib_read_config_m as extern "C" fn(_, _, _, _, _, _) -> _ as usize,
        (HostClass::Pcib, "pcib_maxfuncs_desc") => pcib_maxfuncs_m as extern "C" fn(_) -> _ as usize,
        _ => return None,
    })
}

// --- resources --------------------------------------------------------------------------------

extern "C" fn emu_bus_alloc_resource(dev: *mut c_void, kind: c_int, rid: *mut c_int, start: u64, end: u64, count: u64, flags: u32) -> *mut layouts::resource {
    let c = child_of(dev);
    // SAFETY: the caller's int.
    let r = unsafe { *rid };
    let name = newbus::nameunit(dev as u64);
    if super::fail::null("bus_alloc_resource") {
        log(format!("bus_alloc_resource({name}, type {kind}, rid {r:#x}) = NULL (nothing allocated)"));
        return std::ptr::null_mut();
    }
    let mut res = Box::<layouts::resource>::default();
    let (size, window) = match kind {
        layouts::SYS_RES_MEMORY => {
            let Some(bar) = c.bars.iter().find(|b| b.rid == r) else {
                log(format!("bus_alloc_resource({name}, SYS_RES_MEMORY, rid {r:#x}) = NULL (no such BAR)"));
                return std::ptr::null_mut();
            };
            if bar.allocated != 0 {
                log(format!("bus_alloc_resource({name}, SYS_RES_MEMORY, rid {r:#x}) = NULL (already allocated)"));
                return std::ptr::null_mut();
            }
            let w = super::mmio::map_bar(bar.phys, bar.size, &format!("{name} BAR {r:#x}"));
            res.r_bustag = layouts::X86_BUS_SPACE_MEM as u64;
            res.r_bushandle = w;
            (bar.size, w)
        }
        layouts::SYS_RES_IRQ => {
            let vectors = (c.msix.as_ref().map_or(0, |m| m.allocated) + c.msi_alloc) as c_int;
            let taken = with(|e| e.pci.resources.values().any(|x| x.dev == dev as u64 && x.kind == kind && x.rid == r));
            if (r > 0 && r > vectors) || taken {
                log(format!("bus_alloc_resource({name}, SYS_RES_IRQ, rid {r}) = NULL"));
                return std::ptr::null_mut();
            }
            if r == 0 {
                // pci.c pci_alloc_multi_resource: no legacy interrupt once messages are
                // allocated; else the pin is routed (pci_assign_interrupt), or there is none.
                if vectors > 0 {
                    log(format!("bus_alloc_resource({name}, SYS_RES_IRQ, rid 0) = NULL (MSI or MSI-X messages allocated)"));
                    return std::ptr::null_mut();
                }
                let Some(gsi) = super::intx::assign(c.bdf) else {
                    log(format!("bus_alloc_resource({name}, SYS_RES_IRQ, rid 0) = NULL (no INTx pin routed)"));
                    return std::ptr::null_mut();
                };
                log(format!("pci_assign_interrupt({name}): INTx pin routed to GSI {gsi}"));
            }
            res.r_bushandle = r as u64;
            (1, 0)
        }
        _ => {
            log(format!("bus_alloc_resource({name}, type {kind}, rid {r}) = NULL (type not emulated)"));
            return std::ptr::null_mut();
        }
    };
    let p = Box::into_raw(res) as u64;
    if kind == layouts::SYS_RES_MEMORY {
        update_child(dev as u64, |pc| {
            if let Some(b) = pc.bars.iter_mut().find(|b| b.rid == r) {
                b.allocated = p;
            }
        });
    }
    let active = flags & layouts::RF_ACTIVE as u32 != 0;
    with(|e| e.pci.resources.insert(p, Res { dev: dev as u64, kind, rid: r, size, window, active }));
    log(format!("bus_alloc_resource({name}, type {kind}, rid {r:#x}, {start:#x}, {end:#x}, {count}, flags {flags:#x}) = {p:#x}"));
    p as *mut _
}

extern "C" fn emu_bus_release_resource(dev: *mut c_void, r: *mut layouts::resource) -> c_int {
    release_resource(dev, r, false)
}

/// bus_release_resource of `r`, by the driver or (`by_pci`) by pci(4)'s pci_child_detached,
/// which releases an IRQ resource under a handler a failed bus_teardown_intr left: that is
/// pci(4)'s doing, not the driver's, so it is no finding then.
fn release_resource(dev: *mut c_void, r: *mut layouts::resource, by_pci: bool) -> c_int {
    let res = with(|e| {
        let ok = e.pci.resources.get(&(r as u64)).is_some_and(|x| x.dev == dev as u64);
        if ok { e.pci.resources.remove(&(r as u64)) } else { None }
    });
    let Some(res) = res else {
        log(format!("bus_release_resource({dev:p}, {r:p}) = EINVAL"));
        return layouts::EINVAL;
    };
    let has_intr = with(|e| e.pci.intrs.values().any(|i| i.res == r as u64));
    if has_intr && !by_pci {
        finding(format!("bus_release_resource({}, irq rid {}) with an interrupt handler still set up", newbus::nameunit(dev as u64), res.rid));
    }
    // pci(4) writes the MSI-X table through the resource pci_alloc_msix kept until the
    // vectors are released (pci_teardown_intr's pci_mask_msix, pci_resume_msix): a driver
    // must hold it until after pci_release_msi. pci_child_detached releases the vectors first.
    let table_of = |pc: &PciChild| pc.msix.as_ref().is_some_and(|m| m.allocated > 0 && m.table_res == r as u64);
    if !by_pci && with(|e| e.newbus.devices.get(&(dev as u64)).and_then(|d| d.pci.as_ref()).is_some_and(table_of)) {
        finding(format!("bus_release_resource({}, memory rid {:#x}): the MSI-X table's BAR released while MSI-X vectors are allocated (pci(4) still writes the table through it)", newbus::nameunit(dev as u64), res.rid));
    }
    if res.window != 0 {
        super::mmio::unmap_bar(res.window);
        update_child(dev as u64, |pc| {
            if let Some(b) = pc.bars.iter_mut().find(|b| b.allocated == r as u64) {
                b.allocated = 0;
            }
        });
    }
    log(format!("bus_release_resource({}, type {}, rid {:#x}) = 0", newbus::nameunit(dev as u64), res.kind, res.rid));
    // The struct stays allocated (a stale pointer reads the old values, not someone else's).
    0
}

extern "C" fn emu_rman_get_size(r: *mut layouts::resource) -> u64 {
    with(|e| e.pci.resources.get(&(r as u64)).map(|x| x.size)).unwrap_or_else(|| kernel_panic(&format!("rman_get_size({r:p}): not an allocated resource")))
}

extern "C" fn emu_bus_setup_intr(dev: *mut c_void, r: *mut layouts::resource, flags: c_int, filter: u64, handler: u64, arg: u64, cookiep: *mut *mut c_void) -> c_int {
    let Some(rid) = with(|e| e.pci.resources.get(&(r as u64)).filter(|x| x.kind == layouts::SYS_RES_IRQ).map(|x| x.rid)) else {
        return layouts::EINVAL;
    };
    if filter == 0 && handler == 0 {
        return layouts::EINVAL;
    }
    if let Some(err) = super::fail::errno("bus_setup_intr") {
        log(format!("bus_setup_intr({}, irq rid {rid}, flags {flags:#x}) = {err} (no handler)", newbus::nameunit(dev as u64)));
        return err;
    }
    let cookie = Box::into_raw(Box::new(0u64)) as u64;
    with(|e| e.pci.intrs.insert(cookie, Intr { dev: dev as u64, res: r as u64, rid, filter, handler, arg, teardown_failed: None }));
    let c = child_of(dev);
    let how = if rid > 0 && c.msi_alloc > 0 {
        // pci_setup_intr: the first handler enables MSI (pci_enable_msi). It would also set
        // INTx Disable, which on QEMU's device would stop the assertions that stand in for
        // the messages (super::msi): not set.
        update_child(dev as u64, |p| p.msi_enabled = true);
        let gsi = super::msi::line_of(c.bdf).map_or("?".to_string(), |g| g.to_string());
        if super::msi::delivered() {
            format!("MSI message 0, MSI enabled; stood in for by INTx on GSI {gsi}, whose INTx Disable stays clear on QEMU's device")
        } else {
            "MSI message 0, MSI enabled; never delivered (--msi-undelivered)".to_string()
        }
    } else if rid > 0 {
        msix_entry(&c, rid as u32 - 1, mailbox(c.bdf, rid), rid as u32, false);
        "MSI-X to a guest-RAM mailbox".to_string()
    } else {
        // pci_setup_intr: "Make sure that INTx is enabled" (the command register's bit).
        let cmd = cfg_read(c.bdf, PCIR_COMMAND, 2);
        if cmd & PCIM_CMD_INTXDIS != 0 {
            cfg_write(c.bdf, PCIR_COMMAND, cmd & !PCIM_CMD_INTXDIS, 2);
        }
        let gsi = super::intx::gsi_of(c.bdf).map_or("?".to_string(), |g| g.to_string());
        if super::intx::delivered() {
            format!("INTx on GSI {gsi}, level-triggered")
        } else {
            format!("INTx on GSI {gsi}: never delivered (--intx-undelivered)")
        }
    };
    // SAFETY: the caller's cookie pointer.
    unsafe { *cookiep = cookie as *mut c_void };
    log(format!("bus_setup_intr({}, irq rid {rid}, flags {flags:#x}) = 0 ({how})", newbus::nameunit(dev as u64)));
    0
}

extern "C" fn emu_bus_teardown_intr(dev: *mut c_void, _r: *mut layouts::resource, cookie: *mut c_void) -> c_int {
    super::sched::may_sleep("bus_teardown_intr");
    let Some(rid) = with(|e| e.pci.intrs.get(&(cookie as u64)).map(|i| i.rid)) else {
        return layouts::EINVAL;
    };
    // pci.c pci_teardown_intr's EINVAL comes before it masks anything and before
    // intr_event_remove_handler: the handler stays on the interrupt event, the vector stays
    // unmasked, so run_interrupts (MSI-X) and super::intx (INTx) still call it.
    if let Some(err) = super::fail::errno("bus_teardown_intr") {
        with(|e| {
            if let Some(i) = e.pci.intrs.get_mut(&(cookie as u64)) {
                i.teardown_failed = Some(err);
            }
        });
        let msi = child_of(dev).msi_alloc > 0;
        let kept = if rid > 0 && msi { "MSI still enabled" } else if rid > 0 { "MSI-X vector still unmasked" } else { "INTx still enabled" };
        log(format!("bus_teardown_intr({}, irq rid {rid}) = {err} (handler still installed and called, {kept})", newbus::nameunit(dev as u64)));
        return err;
    }
    let Some(i) = with(|e| e.pci.intrs.remove(&(cookie as u64))) else {
        return layouts::EINVAL;
    };
    let c = child_of(dev);
    if i.rid > 0 && c.msi_alloc > 0 {
        // pci_teardown_intr: the last handler gone disables MSI (pci_disable_msi).
        let left = with(|e| e.pci.intrs.values().any(|x| x.dev == dev as u64 && x.rid > 0));
        if !left {
            update_child(dev as u64, |p| p.msi_enabled = false);
        }
    } else if i.rid > 0 {
        msix_entry(&c, i.rid as u32 - 1, 0, 0, true);
    }
    log(format!("bus_teardown_intr({}, irq rid {}) = 0", newbus::nameunit(dev as u64), i.rid));
    0
}

type Filter = unsafe extern "C" fn(*mut c_void) -> c_int;
type Handler = unsafe extern "C" fn(*mut c_void);

/// The interrupt threads: every MSI-X vector whose mailbox QEMU wrote runs its handler once.
/// Returns how many ran.
pub fn run_interrupts() -> usize {
    if !machine::has_machine() {
        return 0;
    }
    // MSI messages are super::msi's (no mailbox).
    let msi = |e: &super::Emu, dev: u64| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).is_some_and(|p| p.msi_alloc > 0);
    let intrs: Vec<(u64, c_int, u64, u64, u64)> = with(|e| e.pci.intrs.values().filter(|i| i.rid > 0 && !msi(e, i.dev)).map(|i| (i.dev, i.rid, i.filter, i.handler, i.arg)).collect());
    let bdf_of = |dev: u64| with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).map(|p| p.bdf));
    let mut n = 0;
    for (dev, rid, filter, handler, arg) in intrs {
        // Read and cleared in one atomic swap: a message QEMU writes meanwhile is not lost.
        let Some(bdf) = bdf_of(dev) else { continue };
        let fired = machine::with_machine(|m| m.ram().swap_u32(mailbox(bdf, rid), 0).is_ok_and(|v| v != 0));
        if !fired {
            continue;
        }
        log(format!("{}: interrupt (IRQ rid {rid}, MSI-X table entry {})", newbus::nameunit(dev), rid - 1));
        TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the handler and argument the module set up with bus_setup_intr, not torn
        // down (still listed); no emulation lock is held.
        unsafe {
            if filter != 0 {
                std::mem::transmute::<u64, Filter>(filter)(arg as *mut c_void);
            }
            if handler != 0 {
                std::mem::transmute::<u64, Handler>(handler)(arg as *mut c_void);
            }
        }
        n += 1;
    }
    n
}


// --- what pci(4) prints and checks ------------------------------------------------------------

/// bus_print_child for a pci child: "nvmehp0: <desc> mem a-b at device 4.0 on pci0".
pub fn print_child(dev: u64) {
    let (desc, pc) = with(|e| e.newbus.devices.get(&dev).map(|d| (d.desc.clone(), d.pci.clone())).unwrap_or_default());
    let Some(pc) = pc else { return };
    let mems: Vec<String> = pc.bars.iter().map(|b| format!("{:#x}-{:#x}", b.phys, b.phys + b.size - 1)).collect();
    let desc = desc.map(|d| format!(" <{d}>")).unwrap_or_default();
    let mem = if mems.is_empty() { String::new() } else { format!(" mem {}", mems.join(",")) };
    let bus = newbus::nameunit(newbus::parent_of(dev));
    super::kern::console_line(&format!("{}:{desc}{mem} at device {}.{} on {bus}\n", newbus::nameunit(dev), pc.bdf.dev, pc.bdf.func));
}

/// pci_probe_nomatch: the function no driver took.
pub fn probe_nomatch(dev: u64) {
    let pc = with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.clone()));
    let Some(pc) = pc else { return };
    let class = cfg_read(pc.bdf, 0x08, 4) >> 8;
    let what = if class == 0x01_08_02 { "mass storage, NVM" } else { "unknown" };
    let bus = newbus::nameunit(newbus::parent_of(dev));
    super::kern::console_line(&format!("{bus}: <{what}> at device {}.{} (no driver attached)\n", pc.bdf.dev, pc.bdf.func));
}

/// pci_child_detached (sys/dev/pci/pci.c): what a detached driver left is released in pci(4)'s
/// order, IRQ resources, then the MSI/MSI-X vectors, then the memory BARs, each with pci(4)'s
/// "Device leaked" message, and here a finding.
///
/// Except what a driver left because a `bus_teardown_intr` of its failed: that handler is
/// still installed (pci_child_detached does not touch handlers) and may still run, the driver
/// could not release the IRQ resource under it, and pci_release_msi refuses the vector while
/// the handler is counted (EBUSY). Keeping them, and the memory the handler reaches, is the
/// driver's only safe answer and not a leak while its module stays loaded; they are logged,
/// not found. pci(4) still takes the IRQ resource and the BARs back (resource_list_release_active
/// deactivates them), so a BAR the driver kept for such a handler is unmapped from here on:
/// the handler must not touch it (a fatal trap here, as the unmapped page is on FreeBSD).
pub fn child_detached(dev: u64) {
    let pc = with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.clone()));
    let Some(pc) = pc else { return };
    let name = newbus::nameunit(dev);
    let loc = format!("pci0:{}:{}:{}", pc.bdf.bus, pc.bdf.dev, pc.bdf.func);
    let stuck: Vec<(c_int, c_int)> = with(|e| e.pci.intrs.values().filter(|i| i.dev == dev).filter_map(|i| i.teardown_failed.map(|err| (i.rid, err))).collect());
    let never: Vec<u64> = with(|e| e.pci.intrs.iter().filter(|(_, i)| i.dev == dev && i.teardown_failed.is_none()).map(|(c, _)| *c).collect());
    if !never.is_empty() {
        // Never torn down: the driver's bug. Removed here so that the run goes on without a
        // handler running on the softc device_detach is about to free.
        finding(format!("{name}: detached with {} interrupt handlers still set up", never.len()));
        with(|e| e.pci.intrs.retain(|c, _| !never.contains(c)));
    }
    for (rid, err) in &stuck {
        log(format!("{name}: the handler on irq rid {rid} stays installed after its bus_teardown_intr failed ({err}); it may still run"));
    }
    let excused = !stuck.is_empty();
    let leaked = |what: &str, n: usize| {
        if excused {
            log(format!("{name}: {n} {what} kept by the driver for the handler its failed bus_teardown_intr left installed: not a leak of the driver's"));
        } else {
            finding(format!("{name}: detached with {n} {what} still allocated"));
        }
    };
    let of_kind = |kind: c_int| -> Vec<u64> { with(|e| e.pci.resources.iter().filter(|(_, r)| r.dev == dev && r.kind == kind).map(|(p, _)| *p).collect()) };
    let irqs = of_kind(layouts::SYS_RES_IRQ);
    if !irqs.is_empty() {
        super::kern::console_line(&format!("{loc}: Device leaked IRQ resources\n"));
        leaked("IRQ resources", irqs.len());
        for r in irqs {
            release_resource(dev as *mut c_void, r as *mut _, true);
        }
    }
    let msix_left = pc.msix.as_ref().map_or(0, |m| m.allocated as usize);
    if msix_left > 0 || pc.msi_alloc > 0 {
        super::kern::console_line(&format!("{loc}: Device leaked MSI vectors\n"));
        if msix_left > 0 {
            leaked("MSI-X vectors", msix_left);
        } else {
            leaked("MSI messages", pc.msi_alloc as usize);
        }
        if release_msi(dev) != 0 {
            log(format!("{name}: its MSI/MSI-X messages stay allocated (pci_release_msi refused), their handler installed"));
        }
    }
    let mems = of_kind(layouts::SYS_RES_MEMORY);
    if !mems.is_empty() {
        super::kern::console_line(&format!("{loc}: Device leaked memory resources\n"));
        leaked("memory resources", mems.len());
        for r in mems {
            release_resource(dev as *mut c_void, r as *mut _, true);
        }
        if excused {
            log(format!("{name}: its BARs are unmapped now (pci(4) took them back): the handler left installed must not touch them"));
        }
    }
}

/// One MSI-X message on every vector that still has a handler and whose table entry is
/// unmasked: the entry's data written to the entry's address (the mailbox), as the function's
/// message would write them, e.g. a late one after its driver detached; then the interrupt
/// threads run ([`run_interrupts`]). Returns how many handlers ran.
pub fn deliver_msix_messages() -> usize {
    if !machine::has_machine() {
        return 0;
    }
    let vectors: Vec<(u64, c_int)> = with(|e| e.pci.intrs.values().filter(|i| i.rid > 0).map(|i| (i.dev, i.rid)).collect());
    for (dev, rid) in vectors {
        let Some(c) = with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.clone())) else { continue };
        let Some(m) = &c.msix else { continue };
        let Some(bar) = c.bars.iter().find(|b| b.rid == m.table_rid) else { continue };
        let ctrl = cfg_read(c.bdf, m.cap + 2, 2);
        if ctrl & PCIM_MSIXCTRL_ENABLE == 0 || ctrl & PCIM_MSIXCTRL_FUNCTION_MASK != 0 {
            log(format!("{}: MSI-X disabled or masked (control {ctrl:#x}): no message", newbus::nameunit(dev)));
            continue;
        }
        let at = bar.phys + m.table_off + 16 * (rid as u64 - 1);
        let entry = machine::with_machine(|mc| mc.qtest(|q| Ok((q.readl(at)?, q.readl(at + 4)?, q.readl(at + 8)?, q.readl(at + 12)?))).ok());
        let Some((lo, hi, data, ctrl)) = entry else { continue };
        let addr = u64::from(lo) | u64::from(hi) << 32;
        if ctrl & 1 != 0 || addr == 0 {
            log(format!("{}: MSI-X table entry {} masked or not programmed: no message", newbus::nameunit(dev), rid - 1));
            continue;
        }
        let sent = machine::with_machine(|mc| mc.ram().store_u32(addr, data).is_ok());
        log(format!("{}: MSI-X message on table entry {} (data {data:#x} to {addr:#x}){}", newbus::nameunit(dev), rid - 1, if sent { "" } else { ": address outside guest RAM, lost" }));
    }
    run_interrupts()
}

pub fn register(t: &mut KpiTable) {
    t.function("bus_alloc_resource", emu_bus_alloc_resource as extern "C" fn(_, _, _, _, _, _, _) -> _ as usize);
    t.function("bus_release_resource", emu_bus_release_resource as extern "C" fn(_, _) -> _ as usize);
    t.function("rman_get_size", emu_rman_get_size as extern "C" fn(_) -> _ as usize);
    t.function("bus_setup_intr", emu_bus_setup_intr as extern "C" fn(_, _, _, _, _, _, _) -> _ as usize);
    t.function("bus_teardown_intr", emu_bus_teardown_intr as extern "C" fn(_, _, _) -> _ as usize);
}
