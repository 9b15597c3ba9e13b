//! bioq(9): the bio queue functions of sys/kern/subr_disk.c (`bioq_init`, `bioq_insert_head`,
//! `bioq_insert_tail`, `bioq_takefirst`, and the `bioq_remove` it uses), over the layouts
//! bindgen gives `struct bio_queue_head` (a `TAILQ_HEAD` and the disksort bookkeeping:
//! `last_offset`, `insert_point`, `total`, `batched`) and `struct bio` (its `bio_queue`
//! `TAILQ_ENTRY`). Functions in the kernel, not inlines, so the module calls them; the
//! bookkeeping is kept exactly as subr_disk.c keeps it, since a driver may read it.
//!
//! Checked (a panic, as an INVARIANTS kernel's queue(3) checks would be): inserting a bio that
//! is already on this queue.

use super::{kernel_panic, log};
use crate::kpi::KpiTable;
use crate::layouts::{bio, bio_queue_head};
use std::ptr::null_mut;

/// TAILQ_INIT.
extern "C" fn emu_bioq_init(head: *mut bio_queue_head) {
    // SAFETY: the driver's queue head.
    let h = unsafe { &mut *head };
    h.queue.tqh_first = null_mut();
    h.queue.tqh_last = &raw mut h.queue.tqh_first;
    h.last_offset = 0;
    h.insert_point = null_mut();
    h.total = 0;
    h.batched = 0;
    log(format!("bioq_init({head:p})"));
}

/// Whether `bp` is on the queue (for the double-insert check).
fn on_queue(h: &bio_queue_head, bp: *mut bio) -> bool {
    let mut p = h.queue.tqh_first;
    while !p.is_null() {
        if p == bp {
            return true;
        }
        // SAFETY: a bio linked on the queue.
        p = unsafe { (*p).bio_queue.tqe_next };
    }
    false
}

extern "C" fn emu_bioq_insert_head(head: *mut bio_queue_head, bp: *mut bio) {
    // SAFETY: the driver's initialised queue head and a bio it owns.
    let (h, b) = unsafe { (&mut *head, &mut *bp) };
    if on_queue(h, bp) {
        kernel_panic(&format!("bioq_insert_head({head:p}, {bp:p}): the bio is already on the queue"));
    }
    if h.insert_point.is_null() {
        h.last_offset = b.bio_offset;
    }
    // TAILQ_INSERT_HEAD
    b.bio_queue.tqe_next = h.queue.tqh_first;
    if b.bio_queue.tqe_next.is_null() {
        h.queue.tqh_last = &raw mut b.bio_queue.tqe_next;
    } else {
        // SAFETY: the old first bio of the queue.
        unsafe { (*b.bio_queue.tqe_next).bio_queue.tqe_prev = &raw mut b.bio_queue.tqe_next };
    }
    h.queue.tqh_first = bp;
    b.bio_queue.tqe_prev = &raw mut h.queue.tqh_first;
    h.total += 1;
    h.batched = 0;
    log(format!("bioq_insert_head({head:p}, {bp:p}): {} queued", h.total));
}

extern "C" fn emu_bioq_insert_tail(head: *mut bio_queue_head, bp: *mut bio) {
    // SAFETY: as insert_head.
    let (h, b) = unsafe { (&mut *head, &mut *bp) };
    if on_queue(h, bp) {
        kernel_panic(&format!("bioq_insert_tail({head:p}, {bp:p}): the bio is already on the queue"));
    }
    // TAILQ_INSERT_TAIL
    b.bio_queue.tqe_next = null_mut();
    b.bio_queue.tqe_prev = h.queue.tqh_last;
    // SAFETY: tqh_last points at the head's first pointer or the last bio's next pointer.
    unsafe { *h.queue.tqh_last = bp };
    h.queue.tqh_last = &raw mut b.bio_queue.tqe_next;
    h.total += 1;
    h.batched = 0;
    h.insert_point = bp;
    h.last_offset = b.bio_offset;
    log(format!("bioq_insert_tail({head:p}, {bp:p}): {} queued", h.total));
}

/// bioq_remove of the first bio (all bioq_takefirst needs).
fn remove(h: &mut bio_queue_head, bp: *mut bio) {
    // SAFETY: a bio on the queue.
    let b = unsafe { &mut *bp };
    if h.insert_point.is_null() {
        if bp == h.queue.tqh_first {
            h.last_offset = b.bio_offset + b.bio_length;
        }
    } else if bp == h.insert_point {
        h.insert_point = null_mut();
    }
    // TAILQ_REMOVE
    if b.bio_queue.tqe_next.is_null() {
        h.queue.tqh_last = b.bio_queue.tqe_prev;
    } else {
        // SAFETY: the next bio on the queue.
        unsafe { (*b.bio_queue.tqe_next).bio_queue.tqe_prev = b.bio_queue.tqe_prev };
    }
    // SAFETY: tqe_prev points at the pointer that points at bp.
    unsafe { *b.bio_queue.tqe_prev = b.bio_queue.tqe_next };
    h.total -= 1;
}

extern "C" fn emu_bioq_takefirst(head: *mut bio_queue_head) -> *mut bio {
    // SAFETY: the driver's initialised queue head.
    let h = unsafe { &mut *head };
    let bp = h.queue.tqh_first;
    if !bp.is_null() {
        remove(h, bp);
    }
    log(format!("bioq_takefirst({head:p}) = {bp:p}: {} queued", h.total));
    bp
}

pub fn register(t: &mut KpiTable) {
    t.function("bioq_init", emu_bioq_init as extern "C" fn(_) as usize);
    t.function("bioq_insert_head", emu_bioq_insert_head as extern "C" fn(_, _) as usize);
    t.function("bioq_insert_tail", emu_bioq_insert_tail as extern "C" fn(_, _) as usize);
    t.function("bioq_takefirst", emu_bioq_takefirst as extern "C" fn(_) -> _ as usize);
}
