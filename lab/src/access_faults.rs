//! Device-access fault injection: a removal at an exact register/config access, and what reads
//! return once a device is gone.
//!
//! Every controller's [`crate::platform::LabPlatform`] carries one [`SlotFaults`] and calls
//! [`SlotFaults::before_access`] before each device access the engine makes through it (BAR0
//! register reads and writes, config-space presence reads; DMA memory is not a device access).
//! That gives two tools:
//! - **removal at access N**: armed with [`SlotFaults::arm`], the hotplug block's eject
//!   register is written right *before* access number N (0-based), exactly as a surprise
//!   removal would land between two instructions of the driver. Sweeping N over every access of
//!   a bring-up proves that no point of it can panic, hang or leak;
//! - **the removal flavour**: QEMU's old BAR reads return 0 after an eject, real PCIe returns
//!   all-ones (a master abort). With [`RemovalReads::AllOnes`], once the slot is ejected the
//!   platform returns `0xffff_ffff` for MMIO reads and `0xffff` for config reads and drops
//!   writes, so the engine is also tested against what hardware does.

use std::cell::Cell;

use serde::{Deserialize, Serialize};

use crate::guest::Guest;

/// What a removed device's reads return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemovalReads {
    /// QEMU's behaviour: the old BAR reads 0 (config space reads all-ones either way).
    #[default]
    Zeros,
    /// Real PCIe: every read of the vanished function completes with all-ones.
    AllOnes,
}

/// The port writes that eject a slot (what `_EJ0` does): optional bus select, then the eject
/// register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectWrite {
    /// `(port, value)` selecting the hotplug bus (q35 bridges), if needed.
    pub select: Option<(u16, u32)>,
    /// The eject register.
    pub port: u16,
    /// The slot's bit.
    pub value: u32,
}

/// Per-controller fault state (one per probe of a slot; shared by the clones of its platform).
#[derive(Debug)]
pub struct SlotFaults {
    slot: u8,
    eject: Option<EjectWrite>,
    reads: RemovalReads,
    accesses: Cell<u64>,
    eject_before: Cell<Option<u64>>,
    fired: Cell<bool>,
    removed: Cell<bool>,
}

impl SlotFaults {
    /// Fault state for the controller in `slot`; `eject` is how to remove it.
    pub fn new(slot: u8, eject: Option<EjectWrite>, reads: RemovalReads) -> Self {
        SlotFaults {
            slot,
            eject,
            reads,
            accesses: Cell::new(0),
            eject_before: Cell::new(None),
            fired: Cell::new(false),
            removed: Cell::new(false),
        }
    }

    /// The slot.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// Ejects the slot right before device access number `n` (0-based, counted from the
    /// platform's creation). Fires once.
    pub fn arm(&self, n: u64) {
        self.eject_before.set(Some(n));
    }

    /// Device accesses made so far.
    pub fn accesses(&self) -> u64 {
        self.accesses.get()
    }

    /// True once the armed eject was performed.
    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// True while an eject is armed for a later access and has not been performed yet.
    pub fn pending(&self) -> bool {
        self.eject_before.get().is_some() && !self.fired.get()
    }

    /// True once the slot was ejected (armed fault or [`SlotFaults::mark_removed`]).
    pub fn removed(&self) -> bool {
        self.removed.get()
    }

    /// The slot was ejected by the machine (a scenario's surprise removal, or `_EJ0`).
    pub fn mark_removed(&self) {
        self.removed.set(true);
    }

    /// Called before every device access. Performs the armed eject when it is due, and returns
    /// true when the access must be answered as real PCIe would for a vanished function
    /// (all-ones reads, writes dropped) instead of reaching QEMU.
    pub fn before_access(&self, guest: &Guest) -> bool {
        let n = self.accesses.get();
        self.accesses.set(n + 1);
        if self.eject_before.get() == Some(n) && !self.fired.get() {
            self.eject_before.set(None);
            self.fired.set(true);
            self.removed.set(true);
            if let Some(e) = self.eject {
                // A broken harness is recorded by `qtest` as a fault and fails the run.
                let _ = guest.qtest(|q| {
                    if let Some((port, v)) = e.select {
                        q.outl(port, v)?;
                    }
                    q.outl(e.port, e.value)
                });
            }
        }
        self.removed.get() && self.reads == RemovalReads::AllOnes
    }
}
