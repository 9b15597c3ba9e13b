//! The state the hotplug task keeps for one slot between runs.
//!
//! Almost everything about a slot is *read* from the platform at the start of each action
//! (is the function present, does a `device_t` exist), so a lost or duplicated notify cannot
//! put our bookkeeping out of step with newbus. The one thing that cannot be read back is that
//! we evaluated `_EJ0` and are waiting for the device to vanish: that is the state kept here.

/// Per-slot state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotState {
    /// Nothing in progress.
    #[default]
    Idle,
    /// `_EJ0` was evaluated and the device still answered; re-check after a delay.
    /// Further eject requests are duplicates of this one; device checks wait until it ends,
    /// so a device that is on its way out is never re-attached.
    EjectWait {
        /// Re-checks done so far.
        tries: u16,
    },
}

/// One slot: its state plus work deferred while an eject is in progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slot {
    /// See [`SlotState`].
    pub state: SlotState,
    /// Pending bits that arrived during [`SlotState::EjectWait`] and run after it ends.
    pub deferred: u8,
    /// What the last check of an observed slot left alone, so that a periodic check reports
    /// a stale or new device once, not at every tick.
    pub left_alone: Option<super::slot_ops::LeftAlone>,
}
