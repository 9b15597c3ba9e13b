//! A legacy PCI bus with ACPI hotplug slots (QEMU PIIX4 / EC2 Nitro style), newbus children,
//! and acpi_pci.c's own slot notify handler, as the world the hotplug state machine acts on.
//!
//! The in-tree handler follows sys/dev/acpica/acpi_pci.c (acpi_pci_device_notify_handler): notify 1
//! rescans the
//! whole bus; notify 3 finds the child, `device_detach`es it (a refusal stops everything),
//! evaluates `_EJ0`, then rescans, which deletes children whose config space is gone.
//! pci_rescan_method (sys/dev/pci/pci.c) adds new functions and deletes vanished ones.
//!
//! Checked here: a device detached by two parties ([`Rule::DoubleDetach`]), a detach asked for
//! a slot without `device_t` ([`Rule::DetachWithoutDevice`]), `_EJ0` twice for one insertion or
//! on an empty slot ([`Rule::DoubleEject`]), `_EJ0` on a device still attached
//! ([`Rule::EjectAttached`]).

use crate::rules::{Rule, Violation};
use nvme_hotplug::hotplug::machine::Hotplug;
use nvme_hotplug::hotplug::ost::OstStatus;
use nvme_hotplug::hotplug::slot_ops::{DetachError, DetachReason, OpFailed, SlotIndex, SlotOps};

/// Who did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// Our hotplug state machine (through [`SlotOps`]).
    Ours,
    /// acpi_pci.c's notify handler.
    InTree,
    /// pci_rescan_method deleting a vanished child.
    Rescan,
}

/// What happened on the bus, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotEvent {
    /// A `device_t` was added and attached.
    Attach { slot: SlotIndex, by: Actor },
    /// A driver detach ran.
    Detach { slot: SlotIndex, by: Actor },
    /// A detach was refused (busy).
    DetachRefused { slot: SlotIndex, by: Actor },
    /// `_EJ0` was evaluated.
    Ej0 { slot: SlotIndex, by: Actor },
    /// `_OST` was evaluated.
    Ost { slot: SlotIndex, source: u32, status: OstStatus },
    /// Namespaces were rescanned.
    NsRescan { slot: SlotIndex },
}

#[derive(Debug, Clone, Copy)]
struct Child {
    /// Insertion generation of the hardware this device_t was made for.
    generation: u64,
    attached: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct WSlot {
    present: bool,
    generation: u64,
    child: Option<Child>,
    busy: bool,
    ej0_generation: Option<u64>,
    has_sta: bool,
    in_tree: bool,
    ours: bool,
    ej0_lags: bool,
}

/// The bus.
#[derive(Debug, Clone, Default)]
pub struct SlotWorld {
    slots: Vec<WSlot>,
    /// Broken rules.
    pub violations: Vec<Violation>,
    /// Everything that happened.
    pub log: Vec<SlotEvent>,
}

impl SlotWorld {
    /// `n` empty slots, no handlers installed.
    pub fn new(n: usize) -> Self {
        SlotWorld { slots: vec![WSlot::default(); n], ..Default::default() }
    }

    /// Installs handlers on `slot`: acpi_pci's (`in_tree`) and/or ours.
    pub fn set_handlers(&mut self, slot: SlotIndex, in_tree: bool, ours: bool) {
        self.slots[slot].in_tree = in_tree;
        self.slots[slot].ours = ours;
    }

    /// Gives `slot` a `_STA` method.
    pub fn set_has_sta(&mut self, slot: SlotIndex, yes: bool) {
        self.slots[slot].has_sta = yes;
    }

    /// `_EJ0` does not remove the device at once (it vanishes on [`SlotWorld::complete_eject`]).
    pub fn set_ej0_lags(&mut self, slot: SlotIndex, yes: bool) {
        self.slots[slot].ej0_lags = yes;
    }

    /// The controller in `slot` refuses detach for an eject (open, mounted).
    pub fn set_busy(&mut self, slot: SlotIndex, busy: bool) {
        self.slots[slot].busy = busy;
    }

    /// Hardware is plugged in (QMP device_add). Returns false if the slot was occupied.
    pub fn insert(&mut self, slot: SlotIndex) -> bool {
        let s = &mut self.slots[slot];
        if s.present {
            return false;
        }
        s.present = true;
        s.generation += 1;
        true
    }

    /// Hardware vanishes without an eject (surprise removal).
    pub fn surprise_remove(&mut self, slot: SlotIndex) {
        self.slots[slot].present = false;
    }

    /// A lagging `_EJ0` finally takes effect.
    pub fn complete_eject(&mut self, slot: SlotIndex) {
        if self.slots[slot].ej0_generation == Some(self.slots[slot].generation) {
            self.slots[slot].present = false;
        }
    }

    /// Hardware present.
    pub fn is_present(&self, slot: SlotIndex) -> bool {
        self.slots[slot].present
    }

    /// A `device_t` exists with a driver attached.
    pub fn is_attached(&self, slot: SlotIndex) -> bool {
        self.slots[slot].child.is_some_and(|c| c.attached)
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True without slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Count of log events matching `f`.
    pub fn count(&self, f: impl Fn(&SlotEvent) -> bool) -> usize {
        self.log.iter().filter(|e| f(e)).count()
    }

    /// `_OST` calls on `slot`, in order.
    pub fn osts(&self, slot: SlotIndex) -> Vec<(u32, OstStatus)> {
        self.log
            .iter()
            .filter_map(|e| match *e {
                SlotEvent::Ost { slot: s, source, status } if s == slot => Some((source, status)),
                _ => None,
            })
            .collect()
    }

    fn violate(&mut self, rule: Rule, detail: String) {
        self.violations.push(Violation { rule, detail });
    }

    /// Firmware executes `Notify(slot, value)`: ACPICA calls every handler installed on the
    /// object, ours (which only records, see [`Hotplug::notify`]) and acpi_pci's (which acts
    /// at once in the acpi_task thread). Returns true when our task must be enqueued.
    pub fn firmware_notify(&mut self, slot: SlotIndex, value: u32, hp: &mut Hotplug) -> bool {
        let enqueue = self.slots[slot].ours && hp.notify(slot, value);
        if self.slots[slot].in_tree {
            self.in_tree_handler(slot, value);
        }
        enqueue
    }

    /// acpi_pci_device_notify_handler (sys/dev/acpica/acpi_pci.c).
    fn in_tree_handler(&mut self, slot: SlotIndex, value: u32) {
        match value {
            1 => self.bus_rescan(),
            3 => {
                let Some(child) = self.slots[slot].child else { return };
                if self.slots[slot].busy && child.attached {
                    self.log.push(SlotEvent::DetachRefused { slot, by: Actor::InTree });
                    return;
                }
                if child.attached {
                    if let Some(c) = self.slots[slot].child.as_mut() {
                        c.attached = false;
                    }
                    self.log.push(SlotEvent::Detach { slot, by: Actor::InTree });
                }
                self.ej0(slot, Actor::InTree);
                self.bus_rescan();
            }
            _ => {}
        }
    }

    /// pci_rescan_method over the whole bus.
    pub fn bus_rescan(&mut self) {
        for i in 0..self.slots.len() {
            let s = self.slots[i];
            match (s.present, s.child) {
                (true, None) => {
                    self.slots[i].child = Some(Child { generation: s.generation, attached: true });
                    self.log.push(SlotEvent::Attach { slot: i, by: Actor::Rescan });
                }
                (false, Some(c)) => {
                    if c.attached {
                        self.log.push(SlotEvent::Detach { slot: i, by: Actor::Rescan });
                    }
                    self.slots[i].child = None;
                }
                _ => {}
            }
        }
    }

    fn ej0(&mut self, slot: SlotIndex, by: Actor) {
        self.log.push(SlotEvent::Ej0 { slot, by });
        let s = self.slots[slot];
        if s.child.is_some_and(|c| c.attached) {
            self.violate(Rule::EjectAttached, format!("_EJ0 on slot {slot} by {by:?} with the driver attached"));
        }
        if s.ej0_generation == Some(s.generation) {
            self.violate(Rule::DoubleEject, format!("second _EJ0 for insertion {} of slot {slot} by {by:?}", s.generation));
            return;
        }
        if !s.present {
            // acpi_pci.c evaluates _EJ0 without looking (after a surprise removal); that is the
            // kernel's behaviour and harmless once. Ours must never eject an empty slot.
            if by == Actor::Ours {
                self.violate(Rule::DoubleEject, format!("_EJ0 on empty slot {slot} by {by:?}"));
            }
            return;
        }
        self.slots[slot].ej0_generation = Some(s.generation);
        if !s.ej0_lags {
            self.slots[slot].present = false;
        }
    }
}

impl SlotOps for SlotWorld {
    fn present(&mut self, slot: SlotIndex) -> bool {
        self.slots[slot].present
    }
    fn sta(&mut self, slot: SlotIndex) -> Option<u32> {
        let s = self.slots[slot];
        s.has_sta.then_some(if s.present { 0xf } else { 0 })
    }
    fn has_child(&mut self, slot: SlotIndex) -> bool {
        self.slots[slot].child.is_some()
    }
    fn rescan_slot(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        let s = self.slots[slot];
        if s.present && s.child.is_none() {
            self.slots[slot].child = Some(Child { generation: s.generation, attached: true });
            self.log.push(SlotEvent::Attach { slot, by: Actor::Ours });
        }
        Ok(())
    }
    fn detach_slot(&mut self, slot: SlotIndex, why: DetachReason) -> Result<(), DetachError> {
        let Some(child) = self.slots[slot].child else {
            self.violate(Rule::DetachWithoutDevice, format!("detach of slot {slot} without device_t ({why:?})"));
            return Err(DetachError::NoDevice);
        };
        if !child.attached {
            self.violate(Rule::DoubleDetach, format!("slot {slot}: device already detached by another handler"));
            self.slots[slot].child = None;
            return Ok(());
        }
        if why == DetachReason::Eject && self.slots[slot].busy {
            self.log.push(SlotEvent::DetachRefused { slot, by: Actor::Ours });
            return Err(DetachError::Busy);
        }
        let _ = child.generation;
        self.slots[slot].child = None;
        self.log.push(SlotEvent::Detach { slot, by: Actor::Ours });
        Ok(())
    }
    fn eject(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.ej0(slot, Actor::Ours);
        Ok(())
    }
    fn ost(&mut self, slot: SlotIndex, source: u32, status: OstStatus) {
        self.log.push(SlotEvent::Ost { slot, source, status });
    }
    fn rescan_namespaces(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.log.push(SlotEvent::NsRescan { slot });
        Ok(())
    }
}
