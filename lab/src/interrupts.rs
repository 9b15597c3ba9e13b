//! A controller's interrupt as the lab sees it: MSI-X vector 0 written into guest RAM, or the
//! INTx line intercepted at the I/O APIC.
//!
//! The engine creates every completion queue with interrupts enabled on vector 0 (admin and
//! I/O), exactly what the kld's ithread relies on. No guest CPU runs here, so the lab stands in
//! for the interrupt controller:
//! - **MSI-X to RAM**: the firmware side of `pci_alloc_msix(9)` — find the capability, point
//!   table entry 0 at a guest-RAM *mailbox* (not 0xfee…, so no LAPIC is involved) with a
//!   distinct data value, unmask it, enable MSI-X. QEMU's NVMe then delivers each message as a
//!   plain DMA write of that value into the mailbox; the lab reads and clears it.
//! - **INTx**: with MSI-X off, the device asserts its pin; PIIX3 routes it to a GSI
//!   ([`firmware::intx_gsi`]) and qtest's `irq_intercept_in ioapic` (done once per machine)
//!   reports `IRQ raise/lower` lines, tracked as levels by [`Qtest`](crate::qtest::Qtest).
//!   Levels, not edges, because INTx is level-triggered (it stays up until the CQ head doorbell
//!   catches up) and because the ACPI layer discards the edge list on every SCI check; the SCI
//!   (GSI 9) is untouched by this module.
//!
//! Ordering rule for the mailbox: it is cleared *before* the caller polls. With shared guest
//! RAM the read and the clear are one atomic swap. Through qtest they are two commands, and a
//! message that lands between them is overwritten; it was sent after its completion entries
//! were written, so the poll that follows reaps them. One that lands after the clear stays in
//! the mailbox and makes the next wait return at once (at worst a poll that finds nothing).
//! Never lost.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nvme_hotplug::platform::{DmaAllocator, DmaRegion};
use serde::{Deserialize, Serialize};

use crate::dma::GuestDma;
use crate::firmware::{self, cfg, Bdf};
use crate::guest::Guest;
use crate::platform::LabPlatform;
use crate::qtest::{QtestError, QtestResult};

/// How a scenario's driver learns of completions (the scenario's `interrupts` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptMode {
    /// The lab polls the queues continuously (no interrupt set up).
    #[default]
    Poll,
    /// MSI-X vector 0 written to a guest-RAM mailbox ([`Interrupt::msix_to_ram`]).
    Msix,
    /// The INTx line at its routed GSI ([`Interrupt::intx`]); pc machine only.
    Intx,
}

/// The data value the lab's MSI-X messages carry ("NVME"): distinct from anything else that
/// could land in a mailbox.
pub const MSI_DATA: u32 = 0x4e56_4d45;

/// MSI-X capability layout (PCI 3.0 §6.8.2).
mod msix {
    /// Message control (16 bit, at cap + 2).
    pub const CONTROL: u16 = 2;
    /// Table offset / BIR (32 bit, at cap + 4).
    pub const TABLE: u16 = 4;
    /// PBA offset / BIR (32 bit, at cap + 8).
    pub const PBA: u16 = 8;
    /// Message control: MSI-X enable.
    pub const CTRL_ENABLE: u16 = 1 << 15;
    /// Message control: function mask.
    pub const CTRL_FUNCTION_MASK: u16 = 1 << 14;
    /// Table entry: message address low, high, data, vector control (16 bytes).
    pub const ENTRY_ADDR_LO: u64 = 0;
    pub const ENTRY_ADDR_HI: u64 = 4;
    pub const ENTRY_DATA: u64 = 8;
    pub const ENTRY_VECTOR_CONTROL: u64 = 12;
    /// Vector control: masked.
    pub const VECTOR_MASKED: u32 = 1;
}

/// How the interrupt reaches the lab.
enum Line {
    Msix {
        /// Guest RAM written by the device's MSI-X message.
        mailbox: GuestDma,
        /// The data value programmed into entry 0.
        data: u32,
        /// Guest-physical address of table entry 0 (in BAR0).
        entry: u64,
        /// Guest-physical address of the pending bit array's first qword.
        pba: u64,
    },
    Intx {
        gsi: u8,
    },
}

/// One controller's vector 0, set up by the lab playing firmware and interrupt controller.
pub struct Interrupt {
    guest: Rc<Guest>,
    bdf: Bdf,
    line: Line,
    /// Mailbox reads that found a value other than the programmed data (a misdirected or
    /// corrupted message): counted, never taken for our interrupt.
    stray: Cell<u64>,
}

fn protocol(msg: String) -> QtestError {
    QtestError::Protocol(msg)
}

impl Interrupt {
    /// Programs MSI-X vector 0 of the controller behind `p` to write `data` (non-zero) into a
    /// freshly allocated guest-RAM mailbox, unmasked, and enables MSI-X.
    pub fn msix_to_ram(p: &LabPlatform, data: u32) -> QtestResult<Interrupt> {
        if data == 0 {
            return Err(protocol("MSI-X mailbox data must be non-zero (zero means empty)".into()));
        }
        let guest = p.guest().clone();
        let bdf = p.bdf();
        let bar0 = p.bar0();
        let mailbox = p.alloc_dma(4096, 4096).map_err(|e| protocol(format!("mailbox: {e:?}")))?;
        let mbox = mailbox.bus_addr();
        let (entry, pba) = guest.qtest(|q| {
            let cap = firmware::find_capability(q, bdf, cfg::CAP_ID_MSIX)?
                .ok_or_else(|| protocol(format!("{bdf:?}: no MSI-X capability")))?;
            let table = firmware::cfg_read32(q, bdf, cap + msix::TABLE)?;
            let pba = firmware::cfg_read32(q, bdf, cap + msix::PBA)?;
            if table & 7 != 0 || pba & 7 != 0 {
                return Err(protocol(format!("{bdf:?}: MSI-X table/PBA not in BAR0 ({table:#x}/{pba:#x})")));
            }
            let entry = bar0 + (table & !7) as u64;
            let pba = bar0 + (pba & !7) as u64;
            // Masked while it is written, as pci_alloc_msix(9) does; then unmasked.
            q.writel(entry + msix::ENTRY_VECTOR_CONTROL, msix::VECTOR_MASKED)?;
            q.writel(entry + msix::ENTRY_ADDR_LO, mbox as u32)?;
            q.writel(entry + msix::ENTRY_ADDR_HI, (mbox >> 32) as u32)?;
            q.writel(entry + msix::ENTRY_DATA, data)?;
            q.writel(entry + msix::ENTRY_VECTOR_CONTROL, 0)?;
            let ctl = firmware::cfg_read16(q, bdf, cap + msix::CONTROL)?;
            firmware::cfg_write16(q, bdf, cap + msix::CONTROL, (ctl | msix::CTRL_ENABLE) & !msix::CTRL_FUNCTION_MASK)?;
            Ok((entry, pba))
        })?;
        Ok(Interrupt { guest, bdf, line: Line::Msix { mailbox, data, entry, pba }, stray: Cell::new(0) })
    }

    /// Uses the INTx pin: MSI-X is disabled (if the function has it) and the GSI found from
    /// the PIRQ routing. The machine must intercept I/O APIC inputs (every lab machine does).
    pub fn intx(p: &LabPlatform) -> QtestResult<Interrupt> {
        let guest = p.guest().clone();
        let bdf = p.bdf();
        let gsi = guest.qtest(|q| {
            if let Some(cap) = firmware::find_capability(q, bdf, cfg::CAP_ID_MSIX)? {
                let ctl = firmware::cfg_read16(q, bdf, cap + msix::CONTROL)?;
                firmware::cfg_write16(q, bdf, cap + msix::CONTROL, ctl & !msix::CTRL_ENABLE)?;
            }
            firmware::intx_gsi(q, bdf)?.ok_or_else(|| protocol(format!("{bdf:?}: INTx pin not routed")))
        })?;
        Ok(Interrupt { guest, bdf, line: Line::Intx { gsi }, stray: Cell::new(0) })
    }

    /// The GSI of an INTx interrupt (`None` for MSI-X).
    pub fn gsi(&self) -> Option<u8> {
        match self.line {
            Line::Intx { gsi } => Some(gsi),
            Line::Msix { .. } => None,
        }
    }

    /// Where the function is.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Mailbox reads that held a value other than ours.
    pub fn stray(&self) -> u64 {
        self.stray.get()
    }

    /// Masks or unmasks MSI-X vector 0 (vector control bit). A masked vector's messages are
    /// held by the device as a pending bit instead of being sent. No effect on INTx.
    pub fn set_masked(&self, masked: bool) -> QtestResult<()> {
        let Line::Msix { entry, .. } = self.line else { return Ok(()) };
        let v = if masked { msix::VECTOR_MASKED } else { 0 };
        self.guest.qtest(|q| q.writel(entry + msix::ENTRY_VECTOR_CONTROL, v))
    }

    /// The pending bit of MSI-X vector 0 (a message the device held back because the vector
    /// was masked). Always false for INTx.
    pub fn pending(&self) -> QtestResult<bool> {
        let Line::Msix { pba, .. } = self.line else { return Ok(false) };
        self.guest.qtest(|q| q.readl(pba)).map(|v| v & 1 != 0)
    }

    /// Non-blocking check: true if the interrupt is asserted (INTx) or a message arrived
    /// (MSI-X; the mailbox is then cleared, see the module's ordering rule).
    pub fn take(&self) -> QtestResult<bool> {
        match &self.line {
            Line::Msix { mailbox, data, .. } => {
                let v = mailbox.take_u32(0).map_err(protocol)?;
                if v == 0 {
                    return Ok(false);
                }
                if v != *data {
                    self.stray.set(self.stray.get() + 1);
                    return Ok(false);
                }
                Ok(true)
            }
            Line::Intx { gsi } => {
                // The round trip delivers IRQ lines QEMU queued since the last reply.
                let gsi = *gsi;
                self.guest.qtest(|q| q.sync().map(|()| q.irq_level(gsi)))
            }
        }
    }

    /// Waits for the interrupt, at most `timeout`. Returns false on timeout (a removed device
    /// never interrupts again: the caller must not wait longer than that).
    pub fn wait(&self, timeout: Duration) -> QtestResult<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.take()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // A check is a qtest round trip (~40 µs), or a load from the shared mapping; a
            // short nap keeps QEMU's main loop (which runs the device) from being starved by
            // our commands, and the lab from spinning on a core QEMU needs.
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for Interrupt {
    /// Turns MSI-X off before the mailbox goes back to the allocator, so a device that is still
    /// there cannot write into memory someone else owns next (free after the last user, as
    /// pci_release_msi(9) before the memory is reused). On a removed device the config writes
    /// are dropped, which is harmless.
    fn drop(&mut self) {
        if !matches!(self.line, Line::Msix { .. }) {
            return;
        }
        let bdf = self.bdf;
        self.guest.qtest_or((), |q| {
            if firmware::cfg_read16(q, bdf, cfg::VENDOR_ID)? == 0xffff {
                return Ok(()); // gone: nothing to turn off
            }
            if let Some(cap) = firmware::find_capability(q, bdf, cfg::CAP_ID_MSIX)? {
                let ctl = firmware::cfg_read16(q, bdf, cap + msix::CONTROL)?;
                firmware::cfg_write16(q, bdf, cap + msix::CONTROL, ctl & !msix::CTRL_ENABLE)?;
            }
            Ok(())
        });
    }
}
