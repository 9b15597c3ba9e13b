//! Namespace changes of controllers outside the discovered ACPI hotplug slots, waiting for
//! the hotplug task's thread.
//!
//! A controller in a discovered slot has its namespace change recorded in the slot's pending
//! bits (`Pending::NS_CHANGE`). One outside them (a PCIe slot with native hotplug, a machine
//! without `\_SB_.PCI0`, a slot firmware does not describe, or before discovery ended) has no
//! such bits, yet its namespaces change the same way (another host of its NVM subsystem
//! attaches, detaches or formats one). It is remembered here by its PCI location and rescanned
//! on the same one-thread queue, so the two kinds of rescan never overlap.
//!
//! **Why a location, not the `device_t`.** The notice comes from the controller's interrupt or
//! watchdog; by the time the task runs, the controller may have been detached and its
//! `device_t` freed (`device_delete_child`). The task looks the location up again under the
//! topology lock (`pci_find_dbsf`) and rescans only a device of ours found there, on a lease
//! that a detach in progress refuses, exactly as a slot's rescan does.
//!
//! **Why a fixed array.** The notice may come from an interrupt thread, where nothing may
//! sleep: there is no allocation here. A full set (more distinct controllers waiting than
//! [`WAITING_MAX`], which would take a storm of notices from that many controllers inside one
//! task run) refuses the new one, and the caller says so.

/// Where a PCI function is: what `pci_find_dbsf` finds it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciLoc {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number.
    pub slot: u8,
    /// Function number.
    pub func: u8,
}

/// Controllers that may wait at once.
pub const WAITING_MAX: usize = 16;

/// Locations waiting for a namespace rescan, each at most once.
#[derive(Debug, Default)]
pub struct OutsideRescans {
    waiting: [Option<PciLoc>; WAITING_MAX],
}

/// What [`OutsideRescans::add`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// Now waiting: wake the task.
    New,
    /// Was waiting already: the rescan to come reads the namespace list anew, so this change is
    /// covered by it.
    AlreadyWaiting,
    /// No room: not rescanned.
    Full,
}

impl OutsideRescans {
    /// Records that `loc`'s namespaces changed.
    pub fn add(&mut self, loc: PciLoc) -> Added {
        if self.waiting.contains(&Some(loc)) {
            return Added::AlreadyWaiting;
        }
        match self.waiting.iter_mut().find(|w| w.is_none()) {
            Some(free) => {
                *free = Some(loc);
                Added::New
            }
            None => Added::Full,
        }
    }

    /// Takes one waiting location, if any (one at a time: each rescan sleeps, and the lock
    /// must not be held across it).
    pub fn take(&mut self) -> Option<PciLoc> {
        self.waiting.iter_mut().find_map(|w| w.take())
    }

    /// Whether any location is waiting.
    pub fn any(&self) -> bool {
        self.waiting.iter().any(Option::is_some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(slot: u8) -> PciLoc {
        PciLoc { domain: 0, bus: 1, slot, func: 0 }
    }

    /// A location waits once however many notices come, the set refuses beyond its room
    /// without losing what waits, and taking empties it. Fails when a duplicate takes a second
    /// place or a full set overwrites one.
    #[test]
    fn each_controller_waits_once_and_a_full_set_refuses() {
        let mut o = OutsideRescans::default();
        assert!(!o.any());
        assert_eq!(o.add(loc(3)), Added::New);
        assert_eq!(o.add(loc(3)), Added::AlreadyWaiting);
        for s in 4..(3 + WAITING_MAX as u8) {
            assert_eq!(o.add(loc(s)), Added::New, "slot {s}");
        }
        assert_eq!(o.add(loc(31)), Added::Full);
        assert_eq!(o.add(loc(3)), Added::AlreadyWaiting, "still waiting when full");
        let mut taken = alloc::vec::Vec::new();
        while let Some(l) = o.take() {
            taken.push(l.slot);
        }
        assert_eq!(taken, (3..(3 + WAITING_MAX as u8)).collect::<alloc::vec::Vec<_>>());
        assert!(!o.any());
        assert_eq!(o.add(loc(31)), Added::New, "room again");
    }
}
