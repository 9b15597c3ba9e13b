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

#[cfg(test)]
mod tests {
    use super::*;

    fn bio_at(offset: i64, length: i64) -> *mut bio {
        let mut b = Box::<bio>::default();
        b.bio_offset = offset;
        b.bio_length = length;
        Box::into_raw(b)
    }

    #[test]
    fn the_queue_is_fifo_with_head_insertions_and_keeps_subr_disks_bookkeeping() {
        let h = Box::into_raw(Box::<bio_queue_head>::default());
        emu_bioq_init(h);
        assert!(emu_bioq_takefirst(h).is_null());
        let (a, b, c) = (bio_at(0, 512), bio_at(4096, 512), bio_at(8192, 1024));
        emu_bioq_insert_tail(h, a);
        emu_bioq_insert_tail(h, b);
        // SAFETY (test): the head and bios are live boxes.
        let hd = || unsafe { &*h };
        assert_eq!((hd().total, hd().insert_point, hd().last_offset), (2, b, 4096));
        // A head insertion with an insert point set leaves last_offset alone.
        emu_bioq_insert_head(h, c);
        assert_eq!((hd().total, hd().last_offset), (3, 4096));
        assert_eq!(emu_bioq_takefirst(h), c);
        assert_eq!(emu_bioq_takefirst(h), a);
        assert_eq!(hd().insert_point, b);
        // Taking the insert point clears it.
        assert_eq!(emu_bioq_takefirst(h), b);
        assert_eq!((hd().total, hd().insert_point), (0, null_mut()));
        assert!(emu_bioq_takefirst(h).is_null());
        // Empty again: the tail pointer is back at the head, so a tail insertion is first.
        assert_eq!(hd().queue.tqh_last, &raw const hd().queue.tqh_first as *mut _);
        // Without an insert point, a head insertion sets last_offset to the bio's offset and
        // taking the first bio moves it past the bio.
        // SAFETY (test): a live bio.
        unsafe { (*a).bio_offset = 100 };
        emu_bioq_insert_head(h, a);
        assert_eq!(hd().last_offset, 100);
        emu_bioq_insert_tail(h, b);
        assert_eq!(emu_bioq_takefirst(h), a);
        assert_eq!(emu_bioq_takefirst(h), b);
        assert!(emu_bioq_takefirst(h).is_null());
        // SAFETY (test): the boxes made above, off every queue.
        unsafe {
            for p in [a, b, c] {
                drop(Box::from_raw(p));
            }
            drop(Box::from_raw(h));
        }
    }
}
