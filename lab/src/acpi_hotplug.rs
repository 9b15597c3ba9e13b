//! ACPI PCI hotplug (QEMU's `acpi-pcihp`), with the harness playing the part of the DSDT's AML.
//!
//! QEMU exposes a small I/O block that its generated DSDT reads from the `\_GPE._E01` handler:
//! PCIU (slots that came up; clear-on-read), PCID (slots asked to go down), an eject register
//! written by each slot's `_EJ0`, PCIRMV (removable slots), and a bus-select register (BNUM)
//! that says which hotpluggable bus the other registers currently show. On real firmware (and
//! EC2 Nitro) the AML turns those bits into `Notify(\_SB.PCI0.Sxx_, 1)` (device check: rescan
//! the slot) and `Notify(..., 3)` (eject request: detach, then call `_EJ0`).
//! [`AcpiHotplug::poll`] does exactly that translation, so everything above it sees the same
//! events the FreeBSD driver sees from ACPI.
//!
//! Two layouts ([`HotplugLayout`]):
//! - `pc` (PIIX4): block at 0xae00, GPE0 at 0xafe0; the root bus is hotpluggable and a PCIU/PCID
//!   bit is a slot on bus 0.
//! - `q35` (ICH9): block at 0x0cc0, GPE0 at PMBASE+0x20. The root bus is not hotpluggable; each
//!   `pcie-root-port` has its own bus, selected by its BSEL number (which the AML hard-codes per
//!   bridge and the harness reads from QEMU), and the device sits in slot 0 of that bus. The
//!   harness names the event after the root port's slot, so the scenario's `slot` means the same
//!   thing on both machines.
//!
//! A surprise removal is an eject write with no `device_del` first: the function vanishes, no
//! GPE/SCI fires, and the driver can only learn of it from what it reads.

use std::collections::BTreeMap;

use crate::qtest::{Qtest, QtestResult};

/// Offsets inside the hotplug block.
mod reg {
    /// PCIU: bit n set = slot n of the selected bus was plugged (clear-on-read).
    pub const PCIU: u16 = 0x00;
    /// PCID: bit n set = removal of slot n was requested.
    pub const PCID: u16 = 0x04;
    /// Eject: writing bit n ejects slot n of the selected bus (`_EJ0`).
    pub const PCEJ: u16 = 0x08;
    /// PCIRMV: removable slots mask.
    pub const PCIRMV: u16 = 0x0c;
    /// BNUM: bus select.
    pub const BNUM: u16 = 0x10;
}

/// GPE bit used by PCI hotplug (`_E01`).
pub const GPE_PCI_HOTPLUG: u16 = 1 << 1;
/// The SCI's GSI (9 on both pc and q35).
pub const SCI_IRQ: u8 = 9;
/// ICH9 PM I/O base the harness programs on q35 (LPC config 0x40).
pub const Q35_PMBASE: u16 = 0x600;

/// One hotpluggable bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugBus {
    /// Its BSEL number.
    pub bsel: u32,
    /// `None`: the root bus, bit n is slot n. `Some(s)`: the bus behind the root port in slot
    /// `s`; its device is in slot 0 and events are reported as slot `s`.
    pub port_slot: Option<u8>,
}

/// Where the hotplug registers are and which buses they cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugLayout {
    /// I/O base of the acpi-pcihp block.
    pub base: u16,
    /// GPE0 status register (write-1-to-clear).
    pub gpe_sts: u16,
    /// GPE0 enable register.
    pub gpe_en: u16,
    /// Hotpluggable buses.
    pub buses: Vec<HotplugBus>,
}

impl HotplugLayout {
    /// PIIX4 on `-M pc`.
    pub fn pc() -> Self {
        HotplugLayout { base: 0xae00, gpe_sts: 0xafe0, gpe_en: 0xafe2, buses: vec![HotplugBus { bsel: 0, port_slot: None }] }
    }

    /// ICH9 on `-M q35`, with `(bsel, root port slot)` pairs.
    pub fn q35(ports: &[(u32, u8)]) -> Self {
        HotplugLayout {
            base: 0x0cc0,
            gpe_sts: Q35_PMBASE + 0x20,
            gpe_en: Q35_PMBASE + 0x28,
            buses: ports.iter().map(|&(bsel, s)| HotplugBus { bsel, port_slot: Some(s) }).collect(),
        }
    }

    /// The bus and bit that hold the scenario's `slot`.
    fn locate(&self, slot: u8) -> Option<(u32, u8)> {
        self.buses.iter().find_map(|b| match b.port_slot {
            None => Some((b.bsel, slot)),
            Some(s) if s == slot => Some((b.bsel, 0)),
            Some(_) => None,
        })
    }
}

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

/// The `_E01` handler: runs when the SCI is asserted, acknowledges the GPE, and turns the
/// PCIU/PCID bits into notifications (device checks first, like the AML's `PCNT`).
#[derive(Debug)]
pub struct AcpiHotplug {
    layout: HotplugLayout,
    /// Per bsel: slots whose eject request was already delivered. PCID stays set until the
    /// eject, and the AML would re-notify on every GPE; the harness reports each request once.
    pending_eject: BTreeMap<u32, u32>,
    /// Total GPEs handled (for reports).
    pub gpes: u64,
}

impl AcpiHotplug {
    /// Creates the handler for a layout.
    pub fn new(layout: HotplugLayout) -> Self {
        AcpiHotplug { layout, pending_eject: BTreeMap::new(), gpes: 0 }
    }

    /// The layout.
    pub fn layout(&self) -> &HotplugLayout {
        &self.layout
    }

    /// Enables the PCI-hotplug GPE so plug/unplug requests raise the SCI.
    pub fn enable_gpe(&self, q: &mut Qtest) -> QtestResult<()> {
        q.outw(self.layout.gpe_en, GPE_PCI_HOTPLUG)
    }

    fn select(&self, q: &mut Qtest, bsel: u32) -> QtestResult<()> {
        q.outl(self.layout.base + reg::BNUM, bsel)
    }

    /// `_EJ0` of `slot`: the device is removed at once (config reads return all-ones after).
    /// Also the surprise-removal trigger when no `device_del` came first.
    pub fn eject(&mut self, q: &mut Qtest, slot: u8) -> QtestResult<()> {
        let Some((bsel, bit)) = self.layout.locate(slot) else {
            return Err(crate::qtest::QtestError::Protocol(format!("slot {slot} is not hotpluggable here")));
        };
        self.select(q, bsel)?;
        q.outl(self.layout.base + reg::PCEJ, 1u32 << bit)?;
        if let Some(p) = self.pending_eject.get_mut(&bsel) {
            *p &= !(1 << bit);
        }
        Ok(())
    }

    /// The port writes [`AcpiHotplug::eject`] makes for `slot` (for a platform that must eject
    /// from inside a device access: see `access_faults`).
    pub fn eject_write(&self, slot: u8) -> Option<crate::access_faults::EjectWrite> {
        let (bsel, bit) = self.layout.locate(slot)?;
        Some(crate::access_faults::EjectWrite {
            select: Some((self.layout.base + reg::BNUM, bsel)),
            port: self.layout.base + reg::PCEJ,
            value: 1u32 << bit,
        })
    }

    /// Forgets a pending eject request of `slot` (it was ejected behind the AML's back).
    pub fn forget_pending(&mut self, slot: u8) {
        if let Some((bsel, bit)) = self.layout.locate(slot) {
            if let Some(p) = self.pending_eject.get_mut(&bsel) {
                *p &= !(1 << bit);
            }
        }
    }

    /// The removable-slots mask of the bus holding `slot`.
    pub fn removable_slots(&self, q: &mut Qtest, slot: u8) -> QtestResult<u32> {
        let (bsel, _) = self.layout.locate(slot).unwrap_or((0, 0));
        self.select(q, bsel)?;
        q.inl(self.layout.base + reg::PCIRMV)
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
        let sts = q.inw(self.layout.gpe_sts)?;
        if sts & GPE_PCI_HOTPLUG == 0 {
            return Ok(Vec::new());
        }
        self.gpes += 1;
        // Acknowledge first: a new plug event that races with this handler sets the bit again
        // and raises a fresh SCI instead of being lost.
        q.outw(self.layout.gpe_sts, GPE_PCI_HOTPLUG)?;
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        for bus in self.layout.buses.clone() {
            self.select(q, bus.bsel)?;
            let up = q.inl(self.layout.base + reg::PCIU)?;
            let down = q.inl(self.layout.base + reg::PCID)?;
            let seen = self.pending_eject.entry(bus.bsel).or_insert(0);
            let new_down = down & !*seen;
            *seen = down;
            let name = |bit: u8| bus.port_slot.unwrap_or(bit);
            for bit in 0..32u8 {
                if up & (1 << bit) != 0 {
                    ups.push(Notify { slot: name(bit), code: NotifyCode::DeviceCheck });
                }
                if new_down & (1 << bit) != 0 {
                    downs.push(Notify { slot: name(bit), code: NotifyCode::EjectRequest });
                }
            }
        }
        ups.extend(downs);
        Ok(ups)
    }
}
