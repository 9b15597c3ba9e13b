//! The cheap half of the hotplug state machine: recording events in the notify context.
//!
//! An ACPI notify handler runs on one of only three `acpi_task` threads shared with GPE, EC,
//! thermal and button events (sys/dev/acpica/Osd/OsdSchedule.c AcpiOsExecute), and when ACPICA's
//! task pool is full events
//! are dropped. So the handler does nothing but set a bit here (under a short mtx(9) in the
//! kernel; no allocation, no sleep) and enqueue our own task if this call made work appear.
//! Repeated or stormy notifies for a slot collapse into one bit: 100 device checks in a row
//! cause one rescan, because the task reads the state of the slot, not a history of events.

use super::notify::Notify;
use super::slot_ops::SlotIndex;
use crate::fallible::{try_vec_filled, AllocError};
use alloc::vec::Vec;

/// Pending-work bits for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending(u8);

impl Pending {
    /// An ACPI eject request (notify 3).
    pub const EJECT: u8 = 1 << 0;
    /// An ACPI device check (notify 1): answered with `_OST` source 1.
    pub const CHECK: u8 = 1 << 1;
    /// An ACPI bus check on the slot (notify 0): the same work, answered with `_OST` source 0.
    pub const BUS_CHECK: u8 = 1 << 5;
    /// A check from the fallback timer: same work, no `_OST` (firmware asked nothing).
    pub const QUIET_CHECK: u8 = 1 << 2;
    /// A namespace attribute changed (NVMe async event): rescan the namespaces.
    pub const NS_CHANGE: u8 = 1 << 3;
    /// A notify value we do not handle: answer `_OST` "unrecognized".
    pub const UNRECOGNIZED: u8 = 1 << 4;

    /// No work.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// True if any of `bits` is set.
    pub const fn has(self, bits: u8) -> bool {
        self.0 & bits != 0
    }
    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// Per-slot pending events plus the "task already queued" flag.
#[derive(Debug, Clone)]
pub struct PendingEvents {
    slots: Vec<Pending>,
    unrecognized: Vec<u32>,
    queued: bool,
    /// Notifies for slot indices we do not know (counted, never acted on).
    pub out_of_range: u32,
    /// Events recorded in total, and events that found their bit already set (coalesced).
    pub recorded: u64,
    /// See `recorded`.
    pub coalesced: u64,
}

/// A copy of the pending bits taken by the task; preallocated so that taking it under the
/// lock does not allocate.
#[derive(Debug, Clone)]
pub struct PendingSnapshot {
    pub(crate) slots: Vec<Pending>,
    pub(crate) unrecognized: Vec<u32>,
}

impl PendingSnapshot {
    /// Bits for `slot`.
    pub fn get(&self, slot: SlotIndex) -> Pending {
        self.slots.get(slot).copied().unwrap_or_default()
    }
}

impl PendingEvents {
    /// Room for `nslots` slots. Allocates here, at attach time, never later; fails when memory
    /// is short.
    pub fn new(nslots: usize) -> Result<Self, AllocError> {
        Ok(PendingEvents {
            slots: try_vec_filled(Pending::default(), nslots)?,
            unrecognized: try_vec_filled(0, nslots)?,
            queued: false,
            out_of_range: 0,
            recorded: 0,
            coalesced: 0,
        })
    }

    /// A snapshot buffer of the right size; fails when memory is short.
    pub fn snapshot_buffer(&self) -> Result<PendingSnapshot, AllocError> {
        Ok(PendingSnapshot {
            slots: try_vec_filled(Pending::default(), self.slots.len())?,
            unrecognized: try_vec_filled(0, self.slots.len())?,
        })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when built for zero slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn set(&mut self, slot: SlotIndex, bit: u8) -> bool {
        let Some(p) = self.slots.get_mut(slot) else {
            self.out_of_range = self.out_of_range.saturating_add(1);
            return false;
        };
        self.recorded = self.recorded.wrapping_add(1);
        if p.0 & bit != 0 {
            self.coalesced = self.coalesced.wrapping_add(1);
        }
        p.0 |= bit;
        self.arm()
    }

    /// Returns true exactly once per batch: when the caller must enqueue the task.
    fn arm(&mut self) -> bool {
        let enqueue = !self.queued;
        self.queued = true;
        enqueue
    }

    /// Records an ACPI notify for `slot`. Returns true when the caller must enqueue the
    /// hotplug task (it was not queued already).
    pub fn notify(&mut self, slot: SlotIndex, value: u32) -> bool {
        match Notify::from_value(value) {
            Notify::EjectRequest => self.set(slot, Pending::EJECT),
            Notify::DeviceCheck => self.set(slot, Pending::CHECK),
            Notify::BusCheck => self.set(slot, Pending::BUS_CHECK),
            Notify::Other(v) => {
                if let Some(u) = self.unrecognized.get_mut(slot) {
                    *u = v;
                }
                self.set(slot, Pending::UNRECOGNIZED)
            }
        }
    }

    /// Records a namespace-attribute-changed event for the controller in `slot`.
    pub fn namespace_changed(&mut self, slot: SlotIndex) -> bool {
        self.set(slot, Pending::NS_CHANGE)
    }

    /// Records a fallback check of every slot (the periodic rescan).
    pub fn check_all_quietly(&mut self) -> bool {
        for p in self.slots.iter_mut() {
            p.0 |= Pending::QUIET_CHECK;
        }
        !self.slots.is_empty() && self.arm()
    }

    /// Moves the pending bits into `out` and clears them, and clears the queued flag so that
    /// the next notify (even one arriving while the task runs) enqueues the task again.
    pub fn take(&mut self, out: &mut PendingSnapshot) {
        for (i, p) in self.slots.iter_mut().enumerate() {
            if let Some(o) = out.slots.get_mut(i) {
                *o = core::mem::take(p);
            }
            if let (Some(o), Some(u)) = (out.unrecognized.get_mut(i), self.unrecognized.get(i)) {
                *o = *u;
            }
        }
        self.queued = false;
    }

    /// Whether the task is queued (for tests and sysctl).
    pub fn is_queued(&self) -> bool {
        self.queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storm_enqueues_once_and_keeps_one_bit() {
        let mut p = PendingEvents::new(4).unwrap();
        let enqueues = (0..100).filter(|_| p.notify(2, 1)).count();
        assert_eq!(enqueues, 1);
        assert_eq!(p.coalesced, 99);
        let mut s = p.snapshot_buffer().unwrap();
        p.take(&mut s);
        assert_eq!(s.get(2).bits(), Pending::CHECK);
        assert!(s.get(1).is_empty());
        // After the task took the batch, the next notify must enqueue again.
        assert!(p.notify(2, 3));
    }

    #[test]
    fn unknown_slot_is_counted_not_acted_on() {
        let mut p = PendingEvents::new(1).unwrap();
        assert!(!p.notify(7, 1));
        assert_eq!(p.out_of_range, 1);
        assert!(!p.is_queued());
    }

    #[test]
    fn unrecognized_value_is_kept_for_ost() {
        let mut p = PendingEvents::new(1).unwrap();
        assert!(p.notify(0, 0x80));
        let mut s = p.snapshot_buffer().unwrap();
        p.take(&mut s);
        assert!(s.get(0).has(Pending::UNRECOGNIZED));
        assert_eq!(s.unrecognized[0], 0x80);
    }
}
