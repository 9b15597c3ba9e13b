//! `d_getattr`: the attribute questions (BIO_GETATTR) GEOM lets a disk driver answer itself.
//!
//! geom_disk.c `g_disk_start` hands a BIO_GETATTR bio to the disk's `d_getattr` first; the
//! driver returns -1 to let GEOM answer from the `struct disk` fields (`GEOM::ident`,
//! `GEOM::rotation_rate`, `GEOM::attachment`, ...), or an errno, 0 meaning answered. Either
//! way GEOM, not the driver, delivers the bio afterwards, so unlike a [`super::bio::Bio`]
//! an [`AttrQuery`] is borrowed, never completed. g_disk_dumpconf also calls `d_getattr`
//! directly, with a bio it made for the call. It runs on the g_down thread or the GEOM event
//! thread: nothing here sleeps or allocates.

use super::bindings;
use core::ffi::{c_int, c_void, CStr};

/// `d_getattr`'s "not mine": GEOM then answers from the disk's fields.
pub const NOT_MINE: c_int = -1;

/// One BIO_GETATTR question, for the length of a `d_getattr` call.
pub struct AttrQuery<'a> {
    bio: &'a mut bindings::bio,
}

impl AttrQuery<'_> {
    /// The question GEOM passed to `d_getattr`.
    ///
    /// # Safety
    /// `bp` is the pointer passed to this driver's `d_getattr`, used only during that call.
    pub unsafe fn from_d_getattr<'a>(bp: *mut bindings::bio) -> Option<AttrQuery<'a>> {
        // SAFETY: per the contract, a live bio GEOM lends us for the call.
        unsafe { bp.as_mut() }.map(|bio| AttrQuery { bio })
    }

    /// Whether the attribute asked for is `name`.
    pub fn is(&self, name: &CStr) -> bool {
        let a = self.bio.bio_attribute;
        // SAFETY: a non-NULL bio_attribute is the NUL-terminated name g_io_getattr was given,
        // alive until the bio is delivered.
        !a.is_null() && unsafe { CStr::from_ptr(a) } == name
    }

    /// The disk's `d_drv1` (`g_disk_start` sets `bio_disk` before calling `d_getattr`).
    pub fn disk_drv1(&self) -> *mut c_void {
        let d = self.bio.bio_disk;
        if d.is_null() {
            return core::ptr::null_mut();
        }
        // SAFETY: GEOM asks only about a disk it still has, before its d_gone.
        unsafe { (*d).d_drv1 }
    }

    /// Answers with the string `s` and a terminating NUL, as `g_handleattr_str` does: EFAULT
    /// (the caller's buffer is too small; nothing written) or 0 with `bio_completed` set to
    /// the whole buffer, as nvd_getattr reports it.
    pub fn answer_str(&mut self, s: &[u8]) -> c_int {
        let data = self.bio.bio_data.cast::<u8>();
        let Ok(room) = usize::try_from(self.bio.bio_length) else { return bindings::EFAULT };
        if data.is_null() || room <= s.len() {
            return bindings::EFAULT;
        }
        // SAFETY: bio_data is the caller's buffer of bio_length bytes (g_io_getattr); s.len()
        // + 1 of them are written, checked just above; `s` is our own memory, not in it.
        unsafe {
            core::ptr::copy_nonoverlapping(s.as_ptr(), data, s.len());
            *data.add(s.len()) = 0;
        }
        self.bio.bio_completed = self.bio.bio_length;
        0
    }
}
