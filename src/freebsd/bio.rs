//! One I/O request (`struct bio`) handed to a disk's `d_strategy`.
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
    /// the driver refuses), so the data slices below can never be larger than the request.
    pub fn len(&self) -> usize {
        usize::try_from(self.get().bio_bcount).unwrap_or(0)
    }

    /// True for a zero-length request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kernel virtual address of the data (mapped bios only: the driver does not set
    /// DISKFLAG_UNMAPPED_BIO).
    pub fn data(&self) -> *mut c_void {
        self.get().bio_data.cast()
    }

    /// The data as bytes (a write's source). Empty when the bio carries no data.
    pub fn data_bytes(&self) -> &[u8] {
        let (p, n) = (self.data().cast::<u8>(), self.len());
        if p.is_null() || n == 0 {
            return &[];
        }
        // SAFETY: a mapped bio (the driver does not set DISKFLAG_UNMAPPED_BIO) has `bio_bcount`
        // bytes at `bio_data`, owned by the request until biodone, which consumes `self`.
        unsafe { core::slice::from_raw_parts(p, n) }
    }

    /// The data as writable bytes (a read's destination).
    pub fn data_bytes_mut(&mut self) -> &mut [u8] {
        let (p, n) = (self.data().cast::<u8>(), self.len());
        if p.is_null() || n == 0 {
            return &mut [];
        }
        // SAFETY: as data_bytes; `&mut self` makes this the only view until biodone.
        unsafe { core::slice::from_raw_parts_mut(p, n) }
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
