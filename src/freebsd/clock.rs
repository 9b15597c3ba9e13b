//! Time for the engine: `sbinuptime(9)` and `DELAY(9)`.

use super::bindings;
use crate::platform::Clock;

/// The kernel's monotonic uptime clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelClock;

/// sbintime_t (32.32 fixed-point seconds) to microseconds, without overflowing for any uptime
/// (the same split as the kernel's sbttous()).
pub fn sbt_to_us(sbt: i64) -> u64 {
    let sbt = sbt.max(0) as u64;
    (sbt >> 32) * 1_000_000 + (((sbt & 0xffff_ffff) * 1_000_000) >> 32)
}

impl Clock for KernelClock {
    fn now_us(&self) -> u64 {
        // SAFETY: sbinuptime reads the timecounter; callable from any context.
        sbt_to_us(unsafe { bindings::nvmehp_sbinuptime() })
    }

    /// Busy-waits (DELAY(9) spins, it does not sleep), so it is safe with a mutex held; the
    /// engine keeps these short and uses the taskqueue for long waits.
    fn delay_us(&self, us: u32) {
        let us = i32::try_from(us).unwrap_or(i32::MAX);
        // SAFETY: DELAY(9) only spins.
        unsafe { bindings::DELAY(us) }
    }
}

#[cfg(test)]
mod tests {
    use super::sbt_to_us;

    #[test]
    fn converts_whole_and_fractional_seconds() {
        assert_eq!(sbt_to_us(0), 0);
        assert_eq!(sbt_to_us(1 << 32), 1_000_000);
        assert_eq!(sbt_to_us(1 << 31), 500_000);
        assert_eq!(sbt_to_us(-5), 0);
    }

    #[test]
    fn no_overflow_after_long_uptimes() {
        // 10 years of uptime: a naive `sbt * 1_000_000 >> 32` overflows after ~71 minutes.
        let secs: i64 = 10 * 365 * 24 * 3600;
        assert_eq!(sbt_to_us(secs << 32), secs as u64 * 1_000_000);
    }
}
