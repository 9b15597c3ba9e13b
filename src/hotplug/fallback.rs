//! The fallback periodic rescan, for platforms whose hotplug notifications never arrive.
//!
//! Off by default (`hw.nvme_hotplug.rescan_interval_ms=0`): with working notifies it would only
//! add config-space reads. When enabled, every interval the glue's callout calls
//! [`FallbackRescan::tick`], which marks every slot for a *quiet* check: a device found present
//! without a `device_t` is attached, a stale one (config space gone) is detached with
//! [`DetachReason::Gone`](super::slot_ops::DetachReason::Gone). It never evaluates `_EJ0` or
//! `_OST`: nobody asked for an eject, and firmware expects `_OST` only in answer to a notify.

use super::pending::PendingEvents;

/// The fallback rescan policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FallbackRescan {
    interval_ms: u32,
}

impl FallbackRescan {
    /// `interval_ms == 0` disables it.
    pub const fn new(interval_ms: u32) -> Self {
        FallbackRescan { interval_ms }
    }
    /// True when the glue should arm its callout.
    pub const fn is_enabled(self) -> bool {
        self.interval_ms != 0
    }
    /// The callout interval, if enabled.
    pub const fn interval_ms(self) -> Option<u32> {
        if self.interval_ms == 0 { None } else { Some(self.interval_ms) }
    }
    /// Called from the callout: records a quiet check of every slot. Returns true when the
    /// hotplug task must be enqueued. Does nothing when disabled.
    pub fn tick(self, pending: &mut PendingEvents) -> bool {
        self.is_enabled() && pending.check_all_quietly()
    }
}
