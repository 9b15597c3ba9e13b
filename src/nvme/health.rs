//! Removal and failure detection.
//!
//! Real PCIe returns all-ones for reads of a vanished function, but QEMU returns **zero** for
//! the old BAR after an eject (docs/freebsd-kpi.md section 9, pinned down by lab/tests/machine.rs).
//! So "CSTS == 0xffffffff" alone misses a
//! QEMU removal: a controller we enabled whose CSTS.RDY reads 0 is suspicious, and config
//! space (vendor ID 0xffff) is the tie-breaker, because config reads of a missing function are
//! all-ones on both.

use super::regs::{self, CstsFlags};
use crate::platform::{PciPresence, RegisterIo};

/// The engine's verdict on a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Registers and config space look normal.
    Healthy,
    /// The function is present but broken: CSTS.CFS set, or RDY dropped while we had the
    /// controller enabled. `csts` is the value read.
    Failed {
        /// The CSTS value that showed the failure.
        csts: u32,
    },
    /// The function is gone (CSTS all-ones, or config space no longer answers).
    Gone,
}

/// Reads CSTS (and config space when needed) and classifies the controller. `enabled` says
/// whether the engine has set CC.EN and seen RDY, i.e. whether RDY=0 is abnormal.
pub fn assess<P: RegisterIo + PciPresence>(p: &P, enabled: bool) -> Health {
    let csts = p.read32(regs::CSTS);
    if csts == regs::ALL_ONES {
        return Health::Gone;
    }
    // Config space is authoritative for presence, and cheap compared with what follows a
    // wrong verdict; ask it before trusting any CSTS bit (QEMU's zeros look like "not ready").
    if !p.present() {
        return Health::Gone;
    }
    let flags = CstsFlags::from_bits_truncate(csts);
    if flags.contains(CstsFlags::CFS) || (enabled && !flags.contains(CstsFlags::RDY)) {
        return Health::Failed { csts };
    }
    Health::Healthy
}
