//! GEOM access counts of the module's disks, as the scenario's consumers hold them.
//!
//! g_disk_access (sys/geom/geom_disk.c) calls the driver's `d_open` when a provider's access
//! counts go from all zero to non-zero, and `d_close` when they drop back to zero: the driver
//! sees the first open and the last close, not each consumer's. The emulated disk(9)
//! ([`crate::emu::geom::open`], [`crate::emu::geom::close`]) calls the driver every time, so
//! the consumers here (bio jobs, `open` steps) go through these counts.

use std::collections::BTreeMap;
use std::sync::Mutex;

static COUNTS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// A consumer opens `disk`: `d_open` on the first access. Returns its error (0: opened).
pub fn open(disk: &str) -> i32 {
    let first = COUNTS.lock().unwrap_or_else(|p| p.into_inner()).get(disk).copied().unwrap_or(0) == 0;
    let r = if first { crate::emu::geom::open(disk) } else { 0 };
    if r == 0 {
        *COUNTS.lock().unwrap_or_else(|p| p.into_inner()).entry(disk.to_string()).or_default() += 1;
    }
    r
}

/// A consumer closes `disk`: `d_close` on the last close.
pub fn close(disk: &str) {
    let last = {
        let mut c = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(disk.to_string()).or_default();
        *n = n.saturating_sub(1);
        let last = *n == 0;
        if last {
            c.remove(disk);
        }
        last
    };
    if last {
        crate::emu::geom::close(disk);
    }
}
