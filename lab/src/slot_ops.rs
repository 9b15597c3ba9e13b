//! The project's hotplug state machine (`nvme_hotplug::hotplug`), run against QEMU.
//!
//! The lab does not decide itself what a Notify means: it feeds every `Notify(slot, value)`
//! that its `_E01` handler produces into the same [`Hotplug`] state machine the kld runs on its
//! taskqueue, and implements that machine's [`SlotOps`] with the lab's firmware and drivers:
//! `present` = a config read through 0xcf8/0xcfc, `rescan_slot` = probe + engine bring-up +
//! nodes ([`Driver::attach`]), `detach_slot` = the driver's announced detach or lost-device
//! teardown, `eject` = the `_EJ0` write. So a scenario exercises the real ordering rules
//! (`_OST` in progress, detach before `_EJ0`, confirm absence, re-check later) against QEMU's
//! real ACPI hotplug model.
//!
//! Slot indices are PCI slot numbers (0..32); the lab owns every slot (`Role::Owner`).
//!
//! [`Hotplug`]: nvme_hotplug::hotplug::machine::Hotplug

use std::collections::BTreeMap;

use nvme_hotplug::hotplug::machine::{Hotplug, HotplugConfig};
use nvme_hotplug::hotplug::mode::Role;
use nvme_hotplug::hotplug::ost::OstStatus;
use nvme_hotplug::hotplug::slot_ops::{DetachError, DetachReason, OpFailed, SlotIndex, SlotOps};
use nvme_hotplug::nvme::Health;

use crate::driver::{Driver, World};

/// Number of slot indices (one per PCI slot number).
pub const SLOTS: usize = 32;

/// A state machine owning every slot, with the default tunables.
pub fn lab_hotplug() -> Hotplug {
    Hotplug::new(vec![Role::Owner; SLOTS], HotplugConfig::default())
}

/// The lab's [`SlotOps`]: borrows the world and the drivers for one run of the state machine.
pub struct LabSlotOps<'a> {
    /// The machine, observer, ledger, jobs and report.
    pub w: &'a mut World,
    /// Attached drivers by scenario id.
    pub drivers: &'a mut BTreeMap<String, Driver>,
}

impl LabSlotOps<'_> {
    fn driver_id(&self, slot: SlotIndex) -> Option<String> {
        self.drivers.values().find(|d| d.slot as usize == slot).map(|d| d.id.clone())
    }
}

impl SlotOps for LabSlotOps<'_> {
    fn present(&mut self, slot: SlotIndex) -> bool {
        match self.w.machine.slot_present(slot as u8) {
            Ok(p) => p,
            Err(e) => {
                self.w.violation(format!("harness: config read of slot {slot}: {e}"));
                false
            }
        }
    }

    fn sta(&mut self, _slot: SlotIndex) -> Option<u32> {
        // QEMU's hotplug slot objects have no `_STA`: presence comes from config space alone.
        None
    }

    fn has_child(&mut self, slot: SlotIndex) -> bool {
        self.driver_id(slot).is_some()
    }

    fn rescan_slot(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        if self.has_child(slot) {
            return Ok(());
        }
        if self.w.machine.plugged(slot as u8).is_none() {
            // Config space answers but the lab plugged nothing there: not ours to attach.
            return Err(OpFailed);
        }
        match Driver::attach(self.w, slot as u8) {
            Some(d) => {
                self.drivers.insert(d.id.clone(), d);
                Ok(())
            }
            None => Err(OpFailed),
        }
    }

    fn detach_slot(&mut self, slot: SlotIndex, why: DetachReason) -> Result<(), DetachError> {
        let id = self.driver_id(slot).ok_or(DetachError::NoDevice)?;
        let mut d = self.drivers.remove(&id).ok_or(DetachError::NoDevice)?;
        if why == DetachReason::Eject && d.open_count() > 0 {
            // Like the kld (src/freebsd/slots.rs): an eject request is refused while a node is
            // open; the device keeps working and `_EJ0` is not evaluated.
            self.w.say(format!("{id}: eject request refused: {} node(s) open ({:?})", d.open_count(), d.refusal));
            let e = d.refusal;
            self.drivers.insert(id, d);
            return Err(e);
        }
        match why {
            DetachReason::Eject => d.detach_announced(self.w),
            DetachReason::Gone => d.teardown_lost(self.w, Health::Gone),
        }
        Ok(())
    }

    fn eject(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.w.say(format!("slot {slot}: _EJ0"));
        self.w.ej0_log.push(slot as u8);
        self.w.machine.eject(slot as u8).map_err(|e| {
            self.w.violation(format!("harness: eject of slot {slot}: {e}"));
            OpFailed
        })
    }

    fn ost(&mut self, slot: SlotIndex, source: u32, status: OstStatus) {
        self.w.say(format!("slot {slot}: _OST(source {source}, {status:?})"));
        if self.w.ost_log.len() >= 100_000 {
            // Bounded over long runs; steps that check `_OST` clear the log first.
            self.w.ost_log.clear();
        }
        self.w.ost_log.push((slot as u8, source, status));
    }

    fn rescan_namespaces(&mut self, _slot: SlotIndex) -> Result<(), OpFailed> {
        // QEMU's controllers here never change namespaces at run time.
        Ok(())
    }
}
