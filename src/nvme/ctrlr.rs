//! Controller register sequences: capability checks, disable, enable, shutdown notification.
//! Every wait is bounded by CAP.TO (or the shutdown bound) *and* by an iteration count, so a
//! device that never changes state, or a clock that stops, cannot hang the caller.

use super::error::NvmeError;
use super::regs::{self, Cap, CcFlags, CstsFlags, PAGE_SIZE};
use crate::platform::{Clock, PciPresence, RegisterIo};

/// How long each CSTS wait iteration of bring-up waits, through [`Clock::delay_us`]. The kld
/// sleeps it (pause_sbt: bring-up runs with Giant held by newbus, which a sleep gives up and a
/// spin would not); each wait is bounded by CAP.TO whatever the sleeps' granularity.
pub const POLL_US: u32 = 100;
/// How often a CSTS wait also asks config space whether the function is still there. A
/// device that vanished reads CSTS as 0 on some platforms (QEMU after an eject), which looks
/// like "not ready yet": without this, a removal during enable costs the whole CAP.TO.
const PRESENCE_EVERY_US: u64 = 10_000;

/// Reads and validates CAP. All-ones, or zero with config space gone, means the device left.
pub fn read_cap<P: RegisterIo + PciPresence>(p: &P) -> Result<Cap, NvmeError> {
    let raw = p.read64(regs::CAP);
    if raw == u64::MAX || !p.present() {
        return Err(NvmeError::Gone);
    }
    let cap = Cap::decode(raw);
    if raw == 0 {
        return Err(NvmeError::BadDevice("CAP reads zero"));
    }
    if cap.max_entries < 2 {
        return Err(NvmeError::BadDevice("CAP.MQES allows fewer than 2 entries"));
    }
    if cap.css & 1 == 0 {
        return Err(NvmeError::BadDevice("CAP.CSS lacks the NVM command set"));
    }
    if (1usize << cap.mps_min_shift) > PAGE_SIZE {
        return Err(NvmeError::BadDevice("CAP.MPSMIN above the 4 KiB host page"));
    }
    if cap.sq_tail_doorbell(0).is_none() || cap.cq_head_doorbell(0).is_none() {
        return Err(NvmeError::BadDevice(
            "CAP.DSTRD puts the admin doorbells outside BAR0",
        ));
    }
    Ok(cap)
}

/// Polls CSTS every `poll_us` until `done(csts)` holds or `timeout_ms` passes. CSTS all-ones
/// is `Gone`, and so is config space not answering (checked every [`PRESENCE_EVERY_US`] and on
/// timeout); otherwise a timeout is `Timeout`.
pub fn wait_csts<P, F>(p: &P, timeout_ms: u32, poll_us: u32, done: F) -> Result<u32, NvmeError>
where
    P: RegisterIo + PciPresence + Clock,
    F: Fn(u32) -> bool,
{
    let poll_us = poll_us.max(1);
    let timeout_us = timeout_ms as u64 * 1000;
    let start = p.now_us();
    // The iteration bound keeps the loop finite even if the clock does not advance.
    let max_iters = timeout_us / poll_us as u64 + 2;
    let presence_iters = (PRESENCE_EVERY_US / poll_us as u64).max(1);
    for i in 0..max_iters {
        if i > 0 && i % presence_iters == 0 && !p.present() {
            return Err(NvmeError::Gone);
        }
        let csts = p.read32(regs::CSTS);
        if csts == regs::ALL_ONES {
            return Err(NvmeError::Gone);
        }
        if done(csts) {
            return Ok(csts);
        }
        if p.now_us().saturating_sub(start) >= timeout_us {
            break;
        }
        p.delay_us(poll_us);
    }
    if !p.present() {
        return Err(NvmeError::Gone);
    }
    Err(NvmeError::Timeout)
}

/// Brings a controller left enabled-but-not-ready (by firmware or a previous driver) to a
/// settled state before it is disabled: some controllers misbehave when CC.EN is cleared
/// while CSTS.RDY is still rising (FreeBSD's nvme_ctrlr_disable waits the same way). A
/// timeout here is not an error: the disable that follows has its own bound.
pub fn settle<P: RegisterIo + PciPresence + Clock>(p: &P, cap: &Cap) -> Result<(), NvmeError> {
    let cc = p.read32(regs::CC);
    let csts = p.read32(regs::CSTS);
    if cc == regs::ALL_ONES || csts == regs::ALL_ONES {
        return Err(NvmeError::Gone);
    }
    if cc & CcFlags::EN.bits() != 0 && csts & CstsFlags::RDY.bits() == 0 {
        match wait_csts(p, cap.timeout_ms, POLL_US, |c| c & CstsFlags::RDY.bits() != 0) {
            Ok(_) | Err(NvmeError::Timeout) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Clears CC.EN and waits (polling every `poll_us`) for CSTS.RDY to drop. Disabling is what
/// stops all DMA, so every path that gives memory back to the system after the device used it
/// goes through here (or knows the device is gone).
pub fn disable<P: RegisterIo + PciPresence + Clock>(
    p: &P,
    cap: &Cap,
    poll_us: u32,
) -> Result<(), NvmeError> {
    let cc = p.read32(regs::CC);
    if cc != regs::ALL_ONES && cc & CcFlags::EN.bits() != 0 {
        p.write32(regs::CC, cc & !CcFlags::EN.bits() & !regs::CC_SHN_MASK);
    }
    wait_csts(p, cap.timeout_ms, poll_us, |c| c & CstsFlags::RDY.bits() == 0).map(|_| ())
}

/// Sets CC (enable value) and waits for CSTS.RDY. CFS during the wait is a broken device.
pub fn enable<P: RegisterIo + PciPresence + Clock>(p: &P, cap: &Cap) -> Result<(), NvmeError> {
    p.write32(regs::CC, regs::cc_enable_value());
    let csts = wait_csts(p, cap.timeout_ms, POLL_US, |c| {
        c & (CstsFlags::RDY | CstsFlags::CFS).bits() != 0
    })?;
    if csts & CstsFlags::CFS.bits() != 0 {
        return Err(NvmeError::BadDevice(
            "controller fatal status during enable",
        ));
    }
    Ok(())
}

/// Sends the normal shutdown notification (CC.SHN = 01b) and waits (polling every `poll_us`)
/// for CSTS.SHST = complete, so a volatile write cache is flushed before the slot loses power.
pub fn shutdown_notify<P: RegisterIo + PciPresence + Clock>(
    p: &P,
    cap: &Cap,
    poll_us: u32,
) -> Result<(), NvmeError> {
    let cc = p.read32(regs::CC);
    if cc == regs::ALL_ONES {
        return Err(NvmeError::Gone);
    }
    p.write32(regs::CC, (cc & !regs::CC_SHN_MASK) | regs::CC_SHN_NORMAL);
    // CAP.TO bounds enable/disable; shutdown has its own (RTD3E), which may be 0 or absurd;
    // use the larger of CAP.TO and 5 s, as a bounded, conservative choice.
    let bound = cap.timeout_ms.max(5000);
    wait_csts(p, bound, poll_us, |c| {
        c & regs::CSTS_SHST_MASK == regs::CSTS_SHST_COMPLETE
    })
    .map(|_| ())
}
