//! The harness is the firmware: nothing programs the machine when no BIOS runs, so this file does
//! what SeaBIOS and the OS's PCI layer would do for the devices the lab uses.
//!
//! - PCI configuration mechanism #1 (ports 0xcf8/0xcfc), the only config path the pc machine has.
//! - The memory BARs of each NVMe function, sized and placed at a fixed window per slot inside
//!   the pc machine's 32-bit PCI hole (which starts right after the 256 MiB of RAM and ends at
//!   the I/O APIC), so two controllers never overlap and a re-added slot gets the same
//!   addresses: BAR0 (64-bit) at the start of the function's share of the window, any other
//!   (BAR4 of an `nvme` with `msix-exclusive-bar=on`, its MSI-X table and PBA) after it.
//! - Command register: memory decode + bus master (without bus master, QEMU's NVMe model drops
//!   every DMA, and nothing completes).
//! - PIIX3 PIRQ routing (config 0x60–0x63 of 00:01.0) so INTx reaches the I/O APIC, as SeaBIOS
//!   does, so INTx reaches the I/O APIC (and qtest's interception) at the GSI [`intx_gsi`]
//!   computes; [`crate::interrupts`] uses it when a controller runs interrupt-driven.
//! - On q35: the ICH9 PM I/O base and ACPI enable (LPC config 0x40/0x44), without which the
//!   GPE block is not decoded, and each `pcie-root-port`'s bus numbers and memory window, so
//!   config cycles and MMIO reach the device behind it.
//!
//! The GPE enable itself belongs to the ACPI layer (`acpi_hotplug`).

use crate::qtest::{Qtest, QtestResult};

/// Config address port.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// Config data port.
const CONFIG_DATA: u16 = 0xcfc;

/// PCI config offsets used here.
pub mod cfg {
    /// Vendor ID (16 bit).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bit).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bit).
    pub const COMMAND: u16 = 0x04;
    /// Class code, subclass, prog-if, revision (32 bit at 0x08).
    pub const CLASS_REV: u16 = 0x08;
    /// BAR0 (low dword of the 64-bit BAR).
    pub const BAR0: u16 = 0x10;
    /// BAR1 (high dword of the 64-bit BAR0).
    pub const BAR1: u16 = 0x14;
    /// BAR5, the last BAR of a type 0 header.
    pub const BAR5: u16 = 0x24;
    /// Header type (8 bit): the layout in bits 0..6, PCIM_MFDEV in bit 7.
    pub const HEADER_TYPE: u16 = 0x0e;
    /// Header type: a multi-function device (meaningful on function 0).
    pub const HEADER_MFDEV: u8 = 0x80;
    /// Capabilities pointer (8 bit).
    pub const CAP_PTR: u16 = 0x34;
    /// Interrupt pin (8 bit): 1..=4 for INTA..INTD, 0 for none.
    pub const INT_PIN: u16 = 0x3d;
    /// Capability ID of MSI-X.
    pub const CAP_ID_MSIX: u8 = 0x11;
    /// Command register: memory space enable.
    pub const CMD_MEM: u16 = 1 << 1;
    /// Command register: bus master enable.
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
}

/// Bus/device/function of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..32.
    pub dev: u8,
    /// Function number, 0..8.
    pub func: u8,
}

impl Bdf {
    /// Function 0 of `slot` on bus 0.
    pub fn slot(slot: u8) -> Self {
        Bdf { bus: 0, dev: slot, func: 0 }
    }

    fn address(self, reg: u16) -> u32 {
        0x8000_0000 | (self.bus as u32) << 16 | (self.dev as u32 & 31) << 11 | (self.func as u32 & 7) << 8 | (reg as u32 & 0xfc)
    }
}

/// Reads a config dword.
pub fn cfg_read32(q: &mut Qtest, bdf: Bdf, reg: u16) -> QtestResult<u32> {
    q.outl(CONFIG_ADDRESS, bdf.address(reg))?;
    q.inl(CONFIG_DATA)
}

/// Reads a config word (reg must be 2-aligned).
pub fn cfg_read16(q: &mut Qtest, bdf: Bdf, reg: u16) -> QtestResult<u16> {
    q.outl(CONFIG_ADDRESS, bdf.address(reg))?;
    q.inw(CONFIG_DATA + (reg & 2))
}

/// Reads a config byte.
pub fn cfg_read8(q: &mut Qtest, bdf: Bdf, reg: u16) -> QtestResult<u8> {
    q.outl(CONFIG_ADDRESS, bdf.address(reg))?;
    q.inb(CONFIG_DATA + (reg & 3))
}

/// Writes a config dword.
pub fn cfg_write32(q: &mut Qtest, bdf: Bdf, reg: u16, v: u32) -> QtestResult<()> {
    q.outl(CONFIG_ADDRESS, bdf.address(reg))?;
    q.outl(CONFIG_DATA, v)
}

/// Writes a config word.
pub fn cfg_write16(q: &mut Qtest, bdf: Bdf, reg: u16, v: u16) -> QtestResult<()> {
    q.outl(CONFIG_ADDRESS, bdf.address(reg))?;
    q.outw(CONFIG_DATA + (reg & 2), v)
}

/// Writes a config byte.
pub fn cfg_write8(q: &mut Qtest, bdf: Bdf, reg: u16, v: u8) -> QtestResult<()> {
    q.outl(CONFIG_ADDRESS, bdf.address(reg))?;
    q.outb(CONFIG_DATA + (reg & 3), v)
}

/// Base of the BAR windows: inside the 32-bit PCI hole of a 256 MiB pc machine.
pub const BAR_WINDOW_BASE: u64 = 0xc000_0000;
/// Size of each slot's window (the NVMe BAR0 is 16 KiB; 1 MiB keeps addresses readable).
pub const BAR_WINDOW_SIZE: u64 = 0x10_0000;

/// The BAR0 address the firmware gives `slot` (its function 0).
pub fn bar0_for_slot(slot: u8) -> u64 {
    bar0_for_function(slot, 0)
}

/// Each function's share of its slot's window: 8 functions fill the 1 MiB.
pub const FUNCTION_BAR_STRIDE: u64 = BAR_WINDOW_SIZE / 8;

/// The BAR0 address the firmware gives function `func` of `slot` (a multi-function slot's
/// functions each get an eighth of the slot's window).
pub fn bar0_for_function(slot: u8, func: u8) -> u64 {
    BAR_WINDOW_BASE + slot as u64 * BAR_WINDOW_SIZE + u64::from(func & 7) * FUNCTION_BAR_STRIDE
}

/// The (slot, function) whose BAR0 window holds `phys`, if any.
pub fn function_of_bar(phys: u64) -> Option<(u8, u8)> {
    let off = phys.checked_sub(BAR_WINDOW_BASE)?;
    let slot = off / BAR_WINDOW_SIZE;
    (slot < 32).then(|| (slot as u8, ((off % BAR_WINDOW_SIZE) / FUNCTION_BAR_STRIDE) as u8))
}

/// What the firmware found and programmed in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code << 8 | prog-if (0x010802 for NVMe).
    pub class: u32,
    /// The programmed BAR0 address.
    pub bar0: u64,
}

/// Class code of an NVMe controller (mass storage / NVM / NVMe).
pub const CLASS_NVME: u32 = 0x01_08_02;

/// Probes `bdf`; if an NVMe function is there, places its memory BARs from `bar0` on
/// ([`place_memory_bars`]) and enables memory decode and bus mastering. Returns `None` for an
/// empty slot or a non-NVMe function.
pub fn probe_and_program(q: &mut Qtest, bdf: Bdf, bar0: u64) -> QtestResult<Option<PciFunction>> {
    let id = cfg_read32(q, bdf, cfg::VENDOR_ID)?;
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return Ok(None);
    }
    let class = cfg_read32(q, bdf, cfg::CLASS_REV)? >> 8;
    if class != CLASS_NVME {
        return Ok(None);
    }
    // Disable decode while the BARs move, as every PCI layer does.
    let cmd = cfg_read16(q, bdf, cfg::COMMAND)?;
    cfg_write16(q, bdf, cfg::COMMAND, cmd & !(cfg::CMD_MEM | cfg::CMD_BUS_MASTER))?;
    place_memory_bars(q, bdf, bar0)?;
    cfg_write16(q, bdf, cfg::COMMAND, cmd | cfg::CMD_MEM | cfg::CMD_BUS_MASTER)?;
    Ok(Some(PciFunction { bdf, vendor, device: (id >> 16) as u16, class, bar0 }))
}

/// Sizes each memory BAR of `bdf` (all-ones written, the mask read back) and places them in
/// BAR order from `base`, each aligned to its size, as a BIOS does, within the function's
/// [`FUNCTION_BAR_STRIDE`]: BAR0 lands at `base` (a window is aligned to more than any BAR0
/// the lab's controllers have). Unimplemented BARs (mask 0) and I/O BARs are left alone.
/// Memory decode must be off.
fn place_memory_bars(q: &mut Qtest, bdf: Bdf, base: u64) -> QtestResult<()> {
    let mut next = base;
    let mut reg = cfg::BAR0;
    while reg <= cfg::BAR5 {
        let lo = cfg_read32(q, bdf, reg)?;
        // Bit 0: I/O space; bits 2:1 = 10b: a 64-bit memory BAR, which takes the next register.
        let is64 = lo & 0x7 == 0x4;
        let step = if is64 { 8 } else { 4 };
        if lo & 1 != 0 {
            reg += step;
            continue;
        }
        cfg_write32(q, bdf, reg, u32::MAX)?;
        let mask = cfg_read32(q, bdf, reg)? & !0xf;
        if mask == 0 {
            cfg_write32(q, bdf, reg, lo)?;
            reg += step;
            continue;
        }
        let size = u64::from(!mask) + 1;
        let at = next.div_ceil(size) * size;
        if at + size > base + FUNCTION_BAR_STRIDE {
            return Err(crate::qtest::QtestError::Protocol(format!(
                "{bdf:?}: BAR at {reg:#x} ({size:#x} bytes) does not fit in the function's {FUNCTION_BAR_STRIDE:#x}-byte window at {base:#x}"
            )));
        }
        cfg_write32(q, bdf, reg, at as u32)?;
        if is64 {
            cfg_write32(q, bdf, reg + 4, (at >> 32) as u32)?;
        }
        next = at + size;
        reg += step;
    }
    Ok(())
}

/// PIIX3 (00:01.0) PIRQ route control registers, one per PIRQA..D.
const PIIX3_PIRQRC: u16 = 0x60;
/// PIRQ route control: routing disabled.
const PIRQRC_DISABLE: u8 = 0x80;

/// Offset of capability `id` in `bdf`'s config space, walking the list from 0x34. The walk is
/// bounded (48 entries fit in 192 bytes) so a looping list from a broken device cannot hang.
pub fn find_capability(q: &mut Qtest, bdf: Bdf, id: u8) -> QtestResult<Option<u16>> {
    let mut at = cfg_read8(q, bdf, cfg::CAP_PTR)? & 0xfc;
    for _ in 0..48 {
        if at < 0x40 {
            return Ok(None);
        }
        let hdr = cfg_read16(q, bdf, at as u16)?;
        if hdr as u8 == id {
            return Ok(Some(at as u16));
        }
        at = (hdr >> 8) as u8 & 0xfc;
    }
    Ok(None)
}

/// The I/O APIC input (GSI) the INTx pin of `bdf` reaches on pc, as the OS would compute it
/// from the \_PRT: QEMU's i440fx swizzle PIRQ = (slot - 1 + pin - 1) & 3, then the PIIX3 route
/// register of that PIRQ (programmed by [`init_pc`]). `None`: no pin, or the PIRQ is unrouted.
pub fn intx_gsi(q: &mut Qtest, bdf: Bdf) -> QtestResult<Option<u8>> {
    let pin = cfg_read8(q, bdf, cfg::INT_PIN)?;
    if !(1..=4).contains(&pin) {
        return Ok(None);
    }
    // (slot - 1 + pin - 1) mod 4, written as + 2 so slot 0 cannot underflow.
    let pirq = (bdf.dev as u16 + pin as u16 + 2) & 3;
    let route = cfg_read8(q, Bdf { bus: 0, dev: 1, func: 0 }, PIIX3_PIRQRC + pirq)?;
    Ok((route & PIRQRC_DISABLE == 0).then_some(route & 0x0f))
}

/// One-time machine setup on pc: PIRQ routing (A,B → 10; C,D → 11, as SeaBIOS does).
pub fn init_pc(q: &mut Qtest) -> QtestResult<()> {
    let isa = Bdf { bus: 0, dev: 1, func: 0 };
    for (i, irq) in [10u8, 10, 11, 11].into_iter().enumerate() {
        cfg_write8(q, isa, PIIX3_PIRQRC + i as u16, irq)?;
    }
    Ok(())
}

/// ICH9 LPC bridge (00:1f.0): PM I/O base and ACPI control registers.
const ICH9_LPC: Bdf = Bdf { bus: 0, dev: 0x1f, func: 0 };
const ICH9_PMBASE: u16 = 0x40;
const ICH9_ACPI_CTRL: u16 = 0x44;
const ICH9_ACPI_EN: u8 = 0x80;

/// Bridge config offsets (type 1 header).
mod bridge {
    pub const BUS_NUMBERS: u16 = 0x18;
    pub const IO_BASE_LIMIT: u16 = 0x1c;
    pub const MEM_BASE_LIMIT: u16 = 0x20;
    pub const PREF_BASE_LIMIT: u16 = 0x24;
}

/// One-time machine setup on q35: PM I/O base + ACPI enable, then every root port: secondary
/// bus = its slot number (so a device's address is bus `slot`, device 0), and a memory window
/// that is exactly the slot's BAR window.
pub fn init_q35(q: &mut Qtest, port_slots: &[u8]) -> QtestResult<()> {
    cfg_write32(q, ICH9_LPC, ICH9_PMBASE, crate::acpi_hotplug::Q35_PMBASE as u32 | 1)?;
    cfg_write8(q, ICH9_LPC, ICH9_ACPI_CTRL, ICH9_ACPI_EN)?;
    for &s in port_slots {
        let port = Bdf::slot(s);
        cfg_write32(q, port, bridge::BUS_NUMBERS, (s as u32) << 16 | (s as u32) << 8)?;
        // No I/O window (base above limit), no prefetchable window.
        cfg_write16(q, port, bridge::IO_BASE_LIMIT, 0x00f0)?;
        cfg_write32(q, port, bridge::PREF_BASE_LIMIT, 0x0000_fff0)?;
        let base = bar0_for_slot(s);
        let limit = base + BAR_WINDOW_SIZE - 1;
        let window = ((limit >> 16) as u32 & 0xfff0) << 16 | ((base >> 16) as u32 & 0xfff0);
        cfg_write32(q, port, bridge::MEM_BASE_LIMIT, window)?;
        cfg_write16(q, port, cfg::COMMAND, cfg::CMD_MEM | cfg::CMD_BUS_MASTER)?;
    }
    Ok(())
}
