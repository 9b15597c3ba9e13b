//! One I/O request (`struct bio`) handed to a disk's `d_strategy`, and [`BioQueue`], the bios
//! waiting for a free tracker.
//!
//! A [`Bio`] is the driver's obligation to complete the request exactly once: it can only be
//! consumed by [`Bio::done`] or [`Bio::fail`], which call `biodone(9)`. Dropping one any other
//! way would be a driver bug that leaves its consumer waiting for ever; the `Drop` safety net
//! completes it with EIO instead (and says so).

use super::bindings;
use core::ffi::{c_int, c_void};
use core::ptr::NonNull;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BioCmd {
    /// BIO_READ
    Read,
    /// BIO_WRITE
    Write,
    /// BIO_DELETE (deallocate / TRIM)
    Delete,
    /// BIO_FLUSH
    Flush,
    /// Anything else (answered with EOPNOTSUPP by the driver).
    Other(u16),
}

/// A request owned by the driver until completed.
pub struct Bio {
    raw: NonNull<bindings::bio>,
}

// SAFETY: a bio may be completed from any thread (biodone is thread-safe).
unsafe impl Send for Bio {}

impl Bio {
    /// Takes ownership of the bio GEOM passed to `d_strategy`.
    ///
    /// # Safety
    /// `bp` is the pointer passed to this driver's `d_strategy`, taken once.
    pub unsafe fn from_strategy(bp: *mut bindings::bio) -> Option<Bio> {
        NonNull::new(bp).map(|raw| Bio { raw })
    }

    fn get(&self) -> &bindings::bio {
        // SAFETY: GEOM keeps the bio alive until biodone, and only we touch it until then.
        unsafe { self.raw.as_ref() }
    }

    /// The operation.
    pub fn cmd(&self) -> BioCmd {
        let c = self.get().bio_cmd;
        match i32::from(c) {
            bindings::BIO_READ => BioCmd::Read,
            bindings::BIO_WRITE => BioCmd::Write,
            bindings::BIO_DELETE => BioCmd::Delete,
            bindings::BIO_FLUSH => BioCmd::Flush,
            _ => BioCmd::Other(c),
        }
    }

    /// Byte offset on the disk, as GEOM set it (an `off_t`: validate before use).
    pub fn offset(&self) -> i64 {
        self.get().bio_offset
    }

    /// `bio_bcount` as GEOM set it (a `long`: validate before use).
    pub fn bcount(&self) -> i64 {
        self.get().bio_bcount
    }

    /// Length of the data in bytes; 0 for a negative `bio_bcount` (which GEOM never sends and
    /// the driver refuses).
    pub fn len(&self) -> usize {
        usize::try_from(self.get().bio_bcount).unwrap_or(0)
    }

    /// True for a zero-length request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw bio, for busdma(9) (`bus_dmamap_load_bio` maps its data, mapped or not).
    pub fn as_raw(&self) -> *mut bindings::bio {
        self.raw.as_ptr()
    }

    /// Records the namespace ID in `bio_driver2` ("private use by the provider", sys/sys/bio.h;
    /// geom_disk.c's `g_disk_start` hands d_strategy a clone, so the field is ours), for a bio
    /// that may wait in a [`BioQueue`] and be started later.
    pub fn set_nsid(&mut self, nsid: u32) {
        // SAFETY: our bio until biodone; bio_driver2 is the driver's to use.
        unsafe { (*self.raw.as_ptr()).bio_driver2 = nsid as usize as *mut c_void };
    }

    /// The namespace ID [`Bio::set_nsid`] recorded.
    pub fn nsid(&self) -> u32 {
        self.get().bio_driver2 as usize as u32
    }

    /// The disk's `d_drv1`.
    pub fn disk_drv1(&self) -> *mut c_void {
        let d = self.get().bio_disk;
        if d.is_null() {
            return core::ptr::null_mut();
        }
        // SAFETY: the disk outlives its in-flight bios (GEOM withers before d_gone).
        unsafe { (*d).d_drv1 }
    }

    /// Completes the request successfully: everything was transferred.
    pub fn done(self) {
        let bp = core::mem::ManuallyDrop::new(self).raw.as_ptr();
        // SAFETY: our bio, completed once (consumed, and Drop will not run).
        unsafe {
            (*bp).bio_resid = 0;
            bindings::biodone(bp);
        }
    }

    /// Completes the request with `errno`; nothing counts as transferred.
    pub fn fail(self, errno: c_int) {
        let bp = core::mem::ManuallyDrop::new(self).raw.as_ptr();
        // SAFETY: as in done.
        unsafe { complete_with_error(bp, errno) }
    }
}

/// Sets the error fields and calls biodone.
///
/// # Safety
/// `bp` is a bio owned by the driver and not yet completed; it is completed here.
unsafe fn complete_with_error(bp: *mut bindings::bio, errno: c_int) {
    // SAFETY: per the contract.
    unsafe {
        (*bp).bio_error = errno;
        (*bp).bio_flags |= bindings::BIO_ERROR as u16;
        (*bp).bio_resid = (*bp).bio_bcount;
        bindings::biodone(bp);
    }
}

impl Drop for Bio {
    /// Only reached if a code path forgot to complete the bio (done and fail skip it).
    fn drop(&mut self) {
        crate::kprintf!("nvme_hotplug: bug: a bio was dropped without completion; failing it with EIO\n");
        // SAFETY: the bio is still ours (neither done nor fail consumed it) and is completed once.
        unsafe { complete_with_error(self.raw.as_ptr(), bindings::EIO) }
    }
}

/// A FIFO of bios waiting for a free tracker: `struct bio_queue_head` with the bioq functions of
/// sys/kern/subr_disk.c (`bioq_init`, `bioq_insert_tail`, `bioq_insert_head`,
/// `bioq_takefirst`: functions, not inlines, in <sys/bio.h>). The queue links the bios
/// through their own `bio_queue` field, so queueing never allocates.
///
/// The head is boxed: `bioq_init` makes its `TAILQ_HEAD` point into itself, so it must not
/// move after that.
pub struct BioQueue {
    head: alloc::boxed::Box<bindings::bio_queue_head>,
    len: usize,
}

// SAFETY: the queue is only used under the controller mutex; bios may be completed from any
// thread.
unsafe impl Send for BioQueue {}

impl BioQueue {
    /// An empty queue. Sleeps (M_WAITOK): attach only.
    pub fn new_waitok() -> BioQueue {
        // SAFETY: bio_queue_head is plain C data for which all-zero is a valid value.
        let mut head = super::alloc::box_waitok(unsafe { core::mem::zeroed::<bindings::bio_queue_head>() });
        // SAFETY: a boxed head that never moves again; initialised once.
        unsafe { bindings::bioq_init(&mut *head) };
        BioQueue { head, len: 0 }
    }

    /// Bios waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bio waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bio`; the queue owns it until [`BioQueue::pop`].
    pub fn push_back(&mut self, bio: Bio) {
        let bp = core::mem::ManuallyDrop::new(bio).raw.as_ptr();
        // SAFETY: an initialised head; our bio, in no other queue.
        unsafe { bindings::bioq_insert_tail(&mut *self.head, bp) };
        self.len += 1;
    }

    /// Puts `bio` back first in line (it was taken and could not be started).
    pub fn push_front(&mut self, bio: Bio) {
        let bp = core::mem::ManuallyDrop::new(bio).raw.as_ptr();
        // SAFETY: as push_back.
        unsafe { bindings::bioq_insert_head(&mut *self.head, bp) };
        self.len += 1;
    }

    /// Takes the oldest bio.
    pub fn pop(&mut self) -> Option<Bio> {
        if self.len == 0 {
            return None;
        }
        // SAFETY: an initialised head whose bios were all put there by push_*.
        let bp = unsafe { bindings::bioq_takefirst(&mut *self.head) };
        let bio = NonNull::new(bp).map(|raw| Bio { raw })?;
        self.len -= 1;
        Some(bio)
    }
}

impl Drop for BioQueue {
    /// Only reached with bios left if a teardown path forgot to fail them: complete each once.
    fn drop(&mut self) {
        while let Some(b) = self.pop() {
            b.fail(bindings::ENXIO);
        }
    }
}
