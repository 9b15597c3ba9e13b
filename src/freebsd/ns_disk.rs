//! A namespace as a GEOM disk (`/dev/nvmehpd<N>`): `d_strategy`, `d_open`/`d_close`, `d_gone`.
//!
//! **Why a per-disk context, not the softc, is `d_drv1`.** After `disk_gone` GEOM keeps the
//! `struct disk` (and calls into us) until the last consumer closes, which may be long after
//! the controller was detached and its memory freed (a mounted file system on a pulled disk).
//! So `d_drv1` points to a small [`DiskCtx`] that lives until `d_gone`
//! (`hotplug::teardown::on_disk_gone`). It holds a [`DiskLink`] behind its own mutex:
//! - while the controller is attached, the link names the controller ([`CtrlRef`]);
//! - the teardown's `disk_gone` step first *severs* the link under that mutex, then calls
//!   `disk_gone(9)`. A `d_strategy` running at that moment holds the link mutex, so the sever
//!   waits for it; every later one finds no controller and finishes the bio with ENXIO.
//!
//! So no reference count is needed: the link mutex is the drain for `d_strategy`, and the
//! controller memory is freed only after every link to it was severed.

use super::bindings;
use super::bio::Bio;
use super::ctrl::CtrlRef;
use super::disk::{DiskParams, GoneDisk};
use super::kernel::{FreeBsdKernel, KDisk};
use super::mutex::Mutex;
use alloc::boxed::Box;
use core::ffi::c_int;
use core::pin::Pin;

/// What `d_strategy` needs for one namespace, and whether the disk is open.
pub struct DiskLink {
    /// The controller; `None` once the teardown gave the disk up.
    ctrl: Option<CtrlRef>,
    nsid: u32,
    lba_shift: u32,
    /// GEOM has the provider open (between `d_open` and `d_close`).
    opened: bool,
}

/// The memory `d_drv1` points to (allocated by `Kernel::malloc(DISK_CTX_SIZE)`, freed after
/// `d_gone`). Only a pointer to the link, whose mutex must be initialised in place.
#[repr(C)]
pub struct DiskCtx {
    link: *mut Mutex<DiskLink>,
}

const _: () = assert!(core::mem::size_of::<DiskCtx>() <= crate::hotplug::teardown::DISK_CTX_SIZE);

/// Everything needed to create one namespace's disk, staged in the [`FreeBsdKernel`] before
/// `Live::add_namespace` asks it for the disk.
#[derive(Clone)]
pub struct DiskSpec {
    /// The controller.
    pub ctrl: CtrlRef,
    /// Namespace ID.
    pub nsid: u32,
    /// log2 of the LBA size.
    pub lba_shift: u32,
    /// Capacity in bytes.
    pub media_size: u64,
    /// Largest I/O in bytes.
    pub max_io: u32,
    /// DISKFLAG_CANFLUSHCACHE when the controller has a volatile write cache.
    pub flags: u32,
    /// Serial number (d_ident).
    pub ident: [u8; 20],
    /// Model (d_descr).
    pub descr: [u8; 40],
}

/// `d_name` of our disks; must match `hotplug::node_name::DISK_NAME`.
const DISK_NAME: &core::ffi::CStr = c"nvmehpd";
const _: () = assert!(DISK_NAME.to_bytes().len() == crate::hotplug::node_name::DISK_NAME.len());

/// The bytes before the first NUL (identify strings are zero-padded into fixed arrays).
fn until_nul(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

impl DiskCtx {
    /// Fills freshly allocated context memory `mem` and returns the disk parameters for
    /// `disk_create`. `None` when memory for the link is short.
    ///
    /// # Safety
    /// `mem` points to at least `size_of::<DiskCtx>()` writable bytes, suitably aligned, that
    /// stay allocated until [`DiskCtx::release`] ran.
    pub unsafe fn init(mem: *mut DiskCtx, unit: u32, spec: &DiskSpec) -> Option<DiskParams<'_>> {
        let link = Mutex::new_boxed(
            c"nvmehp disk",
            DiskLink { ctrl: Some(spec.ctrl), nsid: spec.nsid, lba_shift: spec.lba_shift, opened: false },
        )?;
        // SAFETY: the link is pinned and never moved: only its address is kept, and it is
        // turned back into a box only in `release`.
        let link = Box::into_raw(unsafe { Pin::into_inner_unchecked(link) });
        // SAFETY: per this function's contract.
        unsafe { mem.write(DiskCtx { link }) };
        Some(DiskParams {
            name: DISK_NAME,
            unit,
            sector_size: 1 << spec.lba_shift,
            media_size: spec.media_size,
            max_io: spec.max_io,
            flags: spec.flags,
            ident: until_nul(&spec.ident),
            descr: until_nul(&spec.descr),
            strategy: disk_strategy,
            gone: disk_gone_cb,
            open: Some(disk_open),
            close: Some(disk_close),
            drv1: mem.cast(),
        })
    }

    fn link(&self) -> &Mutex<DiskLink> {
        // SAFETY: set in init and valid until release, which runs in d_gone after GEOM's last
        // call for this disk.
        unsafe { &*self.link }
    }

    /// Severs the link to the controller (teardown step 1). Waits for a running `d_strategy`.
    pub fn sever(&self) {
        self.link().lock().ctrl = None;
    }

    /// GEOM has the disk open.
    pub fn opened(&self) -> bool {
        self.link().lock().opened
    }

    /// Frees the link (from `d_gone`, before the context memory itself is freed).
    ///
    /// # Safety
    /// Only once, from `d_gone`: GEOM makes no further call for this disk.
    pub unsafe fn release(&self) {
        // SAFETY: created by Box::into_raw in init, released once (contract).
        drop(unsafe { Box::from_raw(self.link) });
    }
}

/// The context of a disk, from the `d_drv1` GEOM passes back.
///
/// # Safety
/// `dp` is one of our disks, before its `d_gone` finished.
unsafe fn ctx_of<'a>(dp: *mut bindings::disk) -> Option<&'a DiskCtx> {
    // SAFETY: per the contract, d_drv1 is our DiskCtx, alive until d_gone.
    unsafe { dp.as_ref().and_then(|d| d.d_drv1.cast::<DiskCtx>().as_ref()) }
}

unsafe extern "C" fn disk_strategy(bp: *mut bindings::bio) {
    // SAFETY: GEOM passes each bio to d_strategy once; we own it until biodone.
    let Some(bio) = (unsafe { Bio::from_strategy(bp) }) else { return };
    // SAFETY: the bio's disk is ours and not yet gone (GEOM calls strategy before d_gone).
    let Some(ctx) = (unsafe { bio.disk_drv1().cast::<DiskCtx>().as_ref() }) else {
        return bio.fail(bindings::ENXIO);
    };
    let link = ctx.link().lock();
    match link.ctrl {
        // The link mutex stays held while the bio is handed over, so a concurrent sever (and
        // the controller's free after it) waits until the controller no longer needs `ctrl`.
        Some(ctrl) => ctrl.start_bio(bio, link.nsid, link.lba_shift),
        None => bio.fail(bindings::ENXIO),
    }
}

unsafe extern "C" fn disk_open(dp: *mut bindings::disk) -> c_int {
    // SAFETY: GEOM calls d_open for our disk before d_gone.
    let Some(ctx) = (unsafe { ctx_of(dp) }) else { return bindings::ENXIO };
    let mut link = ctx.link().lock();
    if link.ctrl.is_none() || super::module::unloading() {
        return bindings::ENXIO;
    }
    link.opened = true;
    0
}

unsafe extern "C" fn disk_close(dp: *mut bindings::disk) -> c_int {
    // SAFETY: as disk_open.
    if let Some(ctx) = unsafe { ctx_of(dp) } {
        ctx.link().lock().opened = false;
    }
    0
}

unsafe extern "C" fn disk_gone_cb(dp: *mut bindings::disk) {
    // SAFETY: GEOM calls d_gone once for our disk, after disk_gone, as its last call.
    let Some(gone) = (unsafe { GoneDisk::in_d_gone(dp) }) else { return };
    let mut k = FreeBsdKernel::new();
    crate::hotplug::teardown::on_disk_gone(&mut k, KDisk::Gone(gone));
}
