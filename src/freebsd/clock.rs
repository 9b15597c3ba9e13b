//! Time for the engine: `sbinuptime(9)`, `DELAY(9)` and `pause_sbt(9)`.

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

/// Microseconds to sbintime_t (32.32 fixed-point seconds), rounded up so a non-zero delay
/// never becomes 0, and capped at 2^31 - 1 seconds so it cannot overflow.
pub fn us_to_sbt(us: u64) -> i64 {
    let secs = (us / 1_000_000).min(i32::MAX as u64);
    let rem = us % 1_000_000;
    ((secs << 32) + (rem << 32).div_ceil(1_000_000)) as i64
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

/// `pause(9)` for `ms` milliseconds: sleeps (never with a mutex held). `wmesg` is the wait
/// channel name shown by `ps`/`procstat -k`.
pub fn sleep_ms(wmesg: &'static core::ffi::CStr, ms: u32) {
    // SAFETY: pause_sbt only sleeps; the message is a 'static NUL-terminated string.
    unsafe { bindings::nvmehp_pause_ms(wmesg.as_ptr(), ms.min(i32::MAX as u32) as i32) }
}

/// `pause_sbt(9)` for `us` microseconds, with half of it as slack (as nvme(4)'s
/// nvme_ctrlr_wait_for_ready sleeps). Never with a mutex held. While asleep the thread holds
/// no Giant: sys/kern/kern_synch.c `_sleep` does DROP_GIANT before it sleeps and PICKUP_GIANT
/// after. While the system is cold (thread0 during autoconfiguration), pause_sbt busy-waits
/// with DELAY by itself, so this is right at boot too.
pub fn sleep_us(wmesg: &'static core::ffi::CStr, us: u32) {
    // SAFETY: pause_sbt only sleeps; the message is a 'static NUL-terminated string.
    unsafe { bindings::nvmehp_pause_us(wmesg.as_ptr(), us.clamp(1, i32::MAX as u32) as i32) }
}

#[cfg(test)]
mod tests {
    use super::{sbt_to_us, us_to_sbt};

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

    #[test]
    fn converts_and_rounds_up() {
        assert_eq!(us_to_sbt(0), 0);
        assert_eq!(us_to_sbt(1_000_000), 1 << 32);
        assert_eq!(us_to_sbt(500_000), 1 << 31);
        assert!(us_to_sbt(1) > 0, "1 us must not round to 0");
        assert_eq!(us_to_sbt(1), 4295); // ceil(2^32 / 10^6)
    }

    #[test]
    fn huge_delays_saturate() {
        assert_eq!(us_to_sbt(u64::MAX) >> 32, i64::from(i32::MAX));
        assert!(us_to_sbt(u64::MAX) > 0);
    }
}
