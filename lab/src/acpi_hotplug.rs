//! PIIX4 ACPI PCI hotplug, with the harness playing the part of the DSDT's AML.
//!
//! QEMU's pc machine exposes a small I/O block at 0xae00 that its generated DSDT reads from the
//! `\_GPE._E01` handler: PCIU (slots that came up; clear-on-read), PCID (slots asked to go down),
//! an eject register written by each slot's `_EJ0`, and PCIRMV (removable slots). On real
//! firmware (and EC2 Nitro) the AML turns those bits into `Notify(\_SB.PCI0.Sxx_, 1)` (device
//! check: rescan the slot) and `Notify(..., 3)` (eject request: detach, then call `_EJ0`).
//! [`AcpiHotplug::poll`] does exactly that translation, so everything above it sees the same
//! events the FreeBSD driver sees from ACPI.
//!
//! A surprise removal is an eject write with no `device_del` first: the function vanishes, no
//! GPE/SCI fires, and the driver can only learn of it from what it reads.

use crate::qtest::{Qtest, QtestResult};

/// PCIU: bit n set = slot n was plugged (clear-on-read).
pub const PCIU: u16 = 0xae00;
/// PCID: bit n set = removal of slot n was requested.
pub const PCID: u16 = 0xae04;
/// Eject: writing bit n ejects slot n (`_EJ0`).
pub const PCEJ: u16 = 0xae08;
/// PCIRMV: removable slots mask.
pub const PCIRMV: u16 = 0xae0c;
/// GPE0 status block (write-1-to-clear).
pub const GPE0_STS: u16 = 0xafe0;
/// GPE0 enable block.
pub const GPE0_EN: u16 = 0xafe2;
/// GPE bit used by PCI hotplug (`_E01`).
pub const GPE_PCI_HOTPLUG: u16 = 1 << 1;
/// The SCI's GSI on pc.
pub const SCI_IRQ: u8 = 9;

/// ACPI Notify codes the DSDT sends to slot objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyCode {
    /// 1: device check — something appeared in the slot.
    DeviceCheck = 1,
    /// 3: eject request — the platform wants the device gone (detach, then `_EJ0`).
    EjectRequest = 3,
}

/// One `Notify(slot, code)` as the AML would have delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    /// PCI slot (device number on bus 0).
    pub slot: u8,
    /// What happened.
    pub code: NotifyCode,
}

/// Enables the PCI-hotplug GPE so plug/unplug requests raise the SCI.
pub fn enable_gpe(q: &mut Qtest) -> QtestResult<()> {
    q.outw(GPE0_EN, GPE_PCI_HOTPLUG)
}

/// `_EJ0` of `slot`: the device is removed at once (and config reads return all-ones after).
/// Also the surprise-removal trigger when no `device_del` came first.
pub fn eject(q: &mut Qtest, slot: u8) -> QtestResult<()> {
    q.outl(PCEJ, 1u32 << slot)
}

/// The slots QEMU reports as removable.
pub fn removable_slots(q: &mut Qtest) -> QtestResult<u32> {
    q.inl(PCIRMV)
}

/// The `_E01` handler: runs when the SCI is asserted, acknowledges the GPE, and turns the
/// PCIU/PCID bits into notifications (device checks first, like the AML's `PCNT`).
#[derive(Debug, Default)]
pub struct AcpiHotplug {
    /// Slots whose eject request was already delivered; PCID stays set until the eject, and the
    /// AML would re-notify on every GPE — the harness reports each request once.
    pending_eject: u32,
    /// Total GPEs handled (for reports).
    pub gpes: u64,
}

impl AcpiHotplug {
    /// Creates the handler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the SCI (after a qtest round trip, so IRQ lines queued by QMP commands arrive)
    /// and, if it is raised, performs the `_E01` work. Returns the notifications in order.
    pub fn poll(&mut self, q: &mut Qtest) -> QtestResult<Vec<Notify>> {
        q.sync()?;
        let _ = q.take_irq_events();
        if !q.irq_level(SCI_IRQ) {
            return Ok(Vec::new());
        }
        self.handle_gpe(q)
    }

    /// The body of `_E01`, usable without the SCI check (e.g. when IRQ interception is off).
    pub fn handle_gpe(&mut self, q: &mut Qtest) -> QtestResult<Vec<Notify>> {
        let sts = q.inw(GPE0_STS)?;
        if sts & GPE_PCI_HOTPLUG == 0 {
            return Ok(Vec::new());
        }
        self.gpes += 1;
        // Acknowledge first: a new plug event that races with this handler sets the bit again
        // and raises a fresh SCI instead of being lost.
        q.outw(GPE0_STS, GPE_PCI_HOTPLUG)?;
        let up = q.inl(PCIU)?;
        let down = q.inl(PCID)?;
        let mut out = Vec::new();
        for slot in 0..32u8 {
            if up & (1 << slot) != 0 {
                out.push(Notify { slot, code: NotifyCode::DeviceCheck });
            }
        }
        let new_down = down & !self.pending_eject;
        for slot in 0..32u8 {
            if new_down & (1 << slot) != 0 {
                out.push(Notify { slot, code: NotifyCode::EjectRequest });
            }
        }
        self.pending_eject = down;
        Ok(out)
    }

    /// Forgets a delivered eject request once the slot was ejected.
    pub fn ejected(&mut self, slot: u8) {
        self.pending_eject &= !(1 << slot);
    }
}
