//! contigmalloc(9) and pmap_kextract (vtophys) over the machine's guest RAM.
//!
//! The only memory QEMU's NVMe model can reach by DMA is guest RAM, which this process maps
//! shared (super::machine), so contigmalloc hands out guest RAM above the machine's DMA pool
//! start, honouring `low`, `high` and `alignment` (a non-zero `boundary` is refused). The
//! blocks are malloc(9) blocks of the caller's type, because FreeBSD 15's free(9) releases
//! contigmalloc'd memory too (the module frees its rings and buffers with free): a leak is
//! found at malloc_uninit, a use after free reads the poison, a double free panics.
//! `pmap_kextract` of an address outside guest RAM is a finding: memory the device could not
//! reach was about to be given to it.

use super::kern::Block;
use super::{finding, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use std::ffi::{c_int, c_void};

extern "C" fn emu_contigmalloc(size: u64, mtp: *mut layouts::malloc_type, flags: c_int, low: u64, high: u64, align: u64, boundary: u64) -> *mut c_void {
    if flags & layouts::M_WAITOK != 0 {
        super::sched::may_sleep("contigmalloc(M_WAITOK)");
    }
    let known = with(|e| e.malloc_types.contains(&(mtp as u64)));
    if !known {
        finding(format!("contigmalloc({size}) with malloc type {mtp:p}, which malloc_init has not registered"));
    }
    if super::fail::null("contigmalloc") {
        log(format!("contigmalloc({size}) = NULL"));
        return std::ptr::null_mut();
    }
    if !super::machine::has_machine() {
        log(format!("contigmalloc({size}) = NULL (no machine: no memory a device can reach)"));
        return std::ptr::null_mut();
    }
    let mut p = super::machine::with_machine(|m| m.contig_alloc(size, low, high, align, boundary));
    if p.is_none() && super::machine::with_machine(|m| m.pool_exhausted(size)) {
        // The pool is used up (a long run: every attach takes fresh rings): the guest RAM of
        // the module's freed contigmalloc blocks goes back into it. Their poison stays until
        // they are handed out again, so a device write into freed memory is still caught for
        // a whole pool's worth of later allocations, just not for ever.
        let freed: Vec<(u64, u64)> = with(|e| e.blocks.iter().filter(|(_, b)| b.freed).map(|(a, b)| (*a, b.size as u64)).collect());
        let back: Vec<(u64, u64)> = super::machine::with_machine(|m| freed.into_iter().filter(|&(a, _)| m.phys_of(a).is_some()).collect());
        with(|e| {
            for (a, _) in &back {
                e.blocks.remove(a);
            }
        });
        let n = super::machine::with_machine(|m| m.reclaim(&back));
        log(format!("contigmalloc: the pool is used up; {n} freed blocks of guest RAM go back into it"));
        p = super::machine::with_machine(|m| m.contig_alloc(size, low, high, align, boundary));
    }
    let Some(p) = p else {
        log(format!("contigmalloc({size}, low {low:#x}, high {high:#x}, align {align:#x}, boundary {boundary:#x}) = NULL"));
        return std::ptr::null_mut();
    };
    if flags & layouts::M_ZERO != 0 {
        // SAFETY: `size` bytes of guest RAM just handed out.
        unsafe { std::ptr::write_bytes(p, 0, size as usize) };
    }
    with(|e| e.blocks.insert(p as u64, Block { size: size as usize, mtp: mtp as u64, freed: false, dma: true }));
    let pa = super::machine::with_machine(|m| m.phys_of(p as u64)).unwrap_or(0);
    log(format!("contigmalloc({size}, align {align:#x}) = {p:p} (physical {pa:#x})"));
    p.cast()
}

extern "C" fn emu_pmap_kextract(va: u64) -> u64 {
    let pa = super::machine::has_machine().then(|| super::machine::with_machine(|m| m.phys_of(va))).flatten();
    match pa {
        Some(pa) => pa,
        None => {
            finding(format!("pmap_kextract({va:#x}): not guest RAM, so not memory the device can reach (only contigmalloc'd memory is)"));
            0
        }
    }
}

pub fn register(t: &mut KpiTable) {
    t.function("contigmalloc", emu_contigmalloc as extern "C" fn(_, _, _, _, _, _, _) -> _ as usize);
    t.function("pmap_kextract", emu_pmap_kextract as extern "C" fn(_) -> _ as usize);
}
