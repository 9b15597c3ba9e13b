//! `disk(9)`: a GEOM disk, and the one order its teardown may take (the nvd(4) model).
//!
//! 1. [`Disk::create`]: `disk_alloc` + fields + `disk_create(DISK_VERSION)`. GEOM tastes it,
//!    `/dev/nvdXnsY`-style providers appear. `d_drv1` points to driver memory.
//! 2. [`Disk::gone`]: `disk_gone(9)` withers the provider; every consumer now gets ENXIO. The
//!    disk then belongs to GEOM: the handle is consumed and only a [`GoneDisk`] token is left.
//! 3. When the last consumer has closed, GEOM calls the driver's `d_gone` on its event thread.
//!    Only there, [`GoneDisk::destroy_in_d_gone`] calls `disk_destroy(9)`; after it returns the
//!    driver may free `d_drv1`'s memory: no more calls will come.
//!
//! Freeing `d_drv1` any earlier is the use-after-free the project exists to prevent.
//! Everything here sleeps (M_WAITOK events): call from a sleepable context.

use super::bindings;
use core::ffi::{c_int, c_void, CStr};
use core::ptr::NonNull;

/// `d_strategy`: receives every I/O request.
pub type StrategyFn = unsafe extern "C" fn(*mut bindings::bio);
/// `d_gone`: called once, after the last close following [`Disk::gone`].
pub type GoneFn = unsafe extern "C" fn(*mut bindings::disk);
/// `d_open` / `d_close`: first open and last close of the provider (GEOM access counts going
/// from zero / back to zero). `d_open` may refuse with an errno.
pub type OpenCloseFn = unsafe extern "C" fn(*mut bindings::disk) -> c_int;
/// `d_getattr`: a BIO_GETATTR question, answered or left to GEOM (see `disk_attr`).
pub type GetattrFn = unsafe extern "C" fn(*mut bindings::bio) -> c_int;

/// The PCI IDs of the controller a disk sits on (`d_hba_*`: GEOM::hba_vendor and friends,
/// which camcontrol(8) and smartd read), as nvd_new_disk fills them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HbaIds {
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// PCI subsystem vendor ID.
    pub subvendor: u16,
    /// PCI subsystem ID.
    pub subdevice: u16,
}

/// What a disk is made of.
pub struct DiskParams<'a> {
    /// Device name without unit (the `d_name` of every disk of this driver).
    pub name: &'static CStr,
    /// Unit number.
    pub unit: u32,
    /// Logical block size in bytes.
    pub sector_size: u32,
    /// Capacity in bytes.
    pub media_size: u64,
    /// Largest single I/O the driver accepts, in bytes.
    pub max_io: u32,
    /// `DISKFLAG_*` (e.g. CANFLUSHCACHE, CANDELETE, UNMAPPED_BIO only if supported).
    pub flags: u32,
    /// Serial number for `d_ident` (cut to fit).
    pub ident: &'a [u8],
    /// Model for `d_descr` (cut to fit).
    pub descr: &'a [u8],
    /// The controller's device name for `d_attachment` (GEOM::attachment), cut to fit.
    pub attachment: &'a [u8],
    /// The controller's PCI IDs.
    pub hba: HbaIds,
    /// Solid state: `d_rotation_rate` DISK_RR_NON_ROTATING rather than "unknown" (ZFS's
    /// vdev_geom marks a vdev non-rotating only on that answer, and then spreads its reads and
    /// TRIMs accordingly).
    pub non_rotating: bool,
    /// Attribute questions the driver answers itself, if any.
    pub getattr: Option<GetattrFn>,
    /// The I/O entry point.
    pub strategy: StrategyFn,
    /// The last-close callback; see module docs.
    pub gone: GoneFn,
    /// First open (may refuse), if the driver tracks opens.
    pub open: Option<OpenCloseFn>,
    /// Last close, if the driver tracks opens.
    pub close: Option<OpenCloseFn>,
    /// Driver memory for the callbacks (`d_drv1`). Must stay valid until `d_gone` has run.
    pub drv1: *mut c_void,
}

/// A live disk created by us. Dropping it gives it up like [`Disk::gone`] (a disk is never
/// left published behind the driver's back); keep the `d_gone` callback ready either way.
pub struct Disk {
    raw: NonNull<bindings::disk>,
}

// SAFETY: disk(9) functions are thread-safe (they post GEOM events).
unsafe impl Send for Disk {}
// SAFETY: &Disk only exposes the raw pointer.
unsafe impl Sync for Disk {}

/// A disk given up with `disk_gone`: GEOM owns it until `d_gone`. Not `Clone`: it can be
/// destroyed once.
pub struct GoneDisk {
    raw: NonNull<bindings::disk>,
}

// SAFETY: as Disk.
unsafe impl Send for GoneDisk {}

fn copy_ident(dst: &mut [core::ffi::c_char], src: &[u8]) {
    let n = src.len().min(dst.len() - 1);
    for (d, s) in dst.iter_mut().zip(&src[..n]) {
        *d = if *s == 0 { b' ' as core::ffi::c_char } else { *s as core::ffi::c_char };
    }
    dst[n] = 0;
}

impl Disk {
    /// Allocates, fills and publishes a disk. Sleeps.
    pub fn create(p: &DiskParams<'_>) -> Disk {
        // SAFETY: disk_alloc is M_WAITOK | M_ZERO and never returns NULL.
        let raw = unsafe { bindings::disk_alloc() };
        let raw = NonNull::new(raw).expect("disk_alloc returned NULL");
        // SAFETY: a fresh, zeroed, unpublished disk that only we reference yet.
        let d = unsafe { &mut *raw.as_ptr() };
        d.d_name = p.name.as_ptr();
        d.d_unit = p.unit;
        d.d_sectorsize = p.sector_size;
        d.d_mediasize = p.media_size as i64;
        d.d_maxsize = p.max_io;
        d.d_flags = p.flags;
        d.d_strategy = Some(p.strategy);
        d.d_gone = Some(p.gone);
        d.d_open = p.open;
        d.d_close = p.close;
        d.d_drv1 = p.drv1;
        d.d_getattr = p.getattr;
        copy_ident(&mut d.d_ident, p.ident);
        copy_ident(&mut d.d_descr, p.descr);
        copy_ident(&mut d.d_attachment, p.attachment);
        d.d_hba_vendor = p.hba.vendor;
        d.d_hba_device = p.hba.device;
        d.d_hba_subvendor = p.hba.subvendor;
        d.d_hba_subdevice = p.hba.subdevice;
        if p.non_rotating {
            d.d_rotation_rate = bindings::DISK_RR_NON_ROTATING as u16;
        }
        // SAFETY: fully initialised disk of the version our headers describe.
        unsafe { bindings::disk_create(raw.as_ptr(), bindings::DISK_VERSION as c_int) };
        Disk { raw }
    }

    /// The `struct disk *`.
    pub fn as_raw(&self) -> *mut bindings::disk {
        self.raw.as_ptr()
    }

    /// `disk_gone(9)`: withers the provider (consumers get ENXIO); GEOM calls `d_gone` after
    /// the last close. The disk's memory now belongs to GEOM.
    pub fn gone(self) -> GoneDisk {
        let raw = self.raw;
        core::mem::forget(self); // Drop would call disk_gone a second time
        // SAFETY: our published disk, given up once (the handle is consumed).
        unsafe { bindings::disk_gone(raw.as_ptr()) };
        GoneDisk { raw }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // SAFETY: our published disk, given up once: `gone` forgets the handle instead.
        unsafe { bindings::disk_gone(self.raw.as_ptr()) };
    }
}

impl GoneDisk {
    /// The token for the disk GEOM passes to `d_gone`.
    ///
    /// # Safety
    /// Only inside this driver's `d_gone` callback, with the pointer GEOM passed, for a disk
    /// this driver created and gave up with [`Disk::gone`].
    pub unsafe fn in_d_gone(dp: *mut bindings::disk) -> Option<GoneDisk> {
        NonNull::new(dp).map(|raw| GoneDisk { raw })
    }

    /// `d_drv1` of the disk (the driver memory passed at creation).
    pub fn drv1(&self) -> *mut c_void {
        // SAFETY: GEOM keeps the disk allocated until disk_destroy.
        unsafe { (*self.raw.as_ptr()).d_drv1 }
    }

    /// `disk_destroy(9)`, from `d_gone` only (see [`GoneDisk::in_d_gone`]). After it returns
    /// GEOM makes no more calls for this disk: `drv1` may be freed.
    pub fn destroy_in_d_gone(self) {
        // SAFETY: the disk was gone and GEOM has called d_gone (constructor contract); it is
        // destroyed once (the token is consumed).
        unsafe { bindings::disk_destroy(self.raw.as_ptr()) }
    }
}
