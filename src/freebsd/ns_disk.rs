//! A namespace as a GEOM disk (`/dev/nvmehpd<N>`): `d_strategy`, `d_open`/`d_close`,
//! `d_getattr`, `d_gone`.
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
//!
//! **Every bio is checked** against the disk's geometry ([`Geometry::check`]) before any
//! memory is allocated for it, although GEOM's `g_io_check` already filters what consumers
//! send: a bio that slipped past it (negative, misaligned, beyond the media, larger than
//! `d_maxsize`) must end as EINVAL or EIO, never as an oversized allocation, a wrapped LBA,
//! or an ENOMEM that GEOM would retry for ever.

use super::bindings;
use super::bio::{Bio, BioCmd};
use super::ctrl::CtrlRef;
use super::disk::{DiskParams, GoneDisk, HbaIds};
use super::disk_attr::{AttrQuery, NOT_MINE};
use super::kernel::{FreeBsdKernel, KDisk};
use super::mutex::Mutex;
use crate::nvme::ns::{NsUid, NS_UID_HEX_MAX};
use crate::nvme::IoOp;
use alloc::boxed::Box;
use core::ffi::c_int;
use core::pin::Pin;

/// The shape of one namespace's disk, as published to GEOM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the sector (LBA) size.
    pub lba_shift: u32,
    /// Capacity in sectors (`d_mediasize >> lba_shift`).
    pub blocks: u64,
    /// `d_maxsize`: the largest transfer accepted, in bytes.
    pub max_io: u32,
}

/// A bio that passed [`Geometry::check`]: what to ask the engine for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Xfer {
    /// Read, write or flush.
    pub op: IoOp,
    /// First sector (0 for a flush).
    pub lba: u64,
    /// Sectors (0 for a flush).
    pub blocks: u32,
    /// Bytes of data (0 for a flush), at most `max_io`.
    pub len: usize,
}

/// What [`Geometry::check`] decided for a bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the controller.
    Submit(Xfer),
    /// Nothing to transfer (zero length): complete it successfully, as GEOM itself does.
    Done,
    /// Complete it with this errno.
    Fail(c_int),
}

impl Geometry {
    /// Validates a bio (command, `bio_offset`, `bio_bcount`) with the rules of GEOM's
    /// `g_io_check`: misaligned or negative → EINVAL; starting or ending beyond the media →
    /// EIO; zero length → done. Larger than `d_maxsize` → EINVAL (GEOM splits at it, so only
    /// a broken caller gets there, and the payload tag would refuse it). BIO_DELETE
    /// and anything else → EOPNOTSUPP (the disk does not advertise them). No arithmetic here
    /// can overflow: every sum is checked.
    pub fn check(&self, cmd: BioCmd, offset: i64, bcount: i64) -> Verdict {
        let op = match cmd {
            BioCmd::Read => IoOp::Read,
            BioCmd::Write => IoOp::Write,
            BioCmd::Flush => return Verdict::Submit(Xfer { op: IoOp::Flush, lba: 0, blocks: 0, len: 0 }),
            BioCmd::Delete | BioCmd::Other(_) => return Verdict::Fail(bindings::EOPNOTSUPP),
        };
        let (Ok(offset), Ok(len)) = (u64::try_from(offset), u64::try_from(bcount)) else {
            return Verdict::Fail(bindings::EINVAL);
        };
        let sector_mask = (1u64 << self.lba_shift) - 1;
        if offset & sector_mask != 0 || len & sector_mask != 0 {
            return Verdict::Fail(bindings::EINVAL);
        }
        let (lba, blocks) = (offset >> self.lba_shift, len >> self.lba_shift);
        if lba.checked_add(blocks).is_none_or(|end| end > self.blocks) {
            return Verdict::Fail(bindings::EIO);
        }
        if len == 0 {
            return Verdict::Done;
        }
        if len > u64::from(self.max_io) {
            return Verdict::Fail(bindings::EINVAL);
        }
        // len <= max_io (a u32), so both conversions are lossless.
        Verdict::Submit(Xfer { op, lba, blocks: blocks as u32, len: len as usize })
    }
}

/// What `d_strategy` needs for one namespace, and whether the disk is open.
pub struct DiskLink {
    /// The controller; `None` once the teardown gave the disk up.
    ctrl: Option<CtrlRef>,
    nsid: u32,
    geometry: Geometry,
    /// The namespace's NGUID or EUI64, for `GEOM::lunid`.
    uid: NsUid,
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
    /// The namespace's unique ID (GEOM::lunid).
    pub uid: NsUid,
    /// The controller's PCI IDs (GEOM::hba_*).
    pub hba: HbaIds,
    /// The controller's device name, NUL-padded (GEOM::attachment).
    pub attachment: [u8; 32],
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
            DiskLink {
                ctrl: Some(spec.ctrl),
                nsid: spec.nsid,
                geometry: Geometry { lba_shift: spec.lba_shift, blocks: spec.media_size >> spec.lba_shift, max_io: spec.max_io },
                uid: spec.uid,
                opened: false,
            },
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
            // d_strategy never touches bio_data: the data moves through bus_dmamap_load_bio,
            // which maps unmapped bios (bio_ma pages) too, as nvd(4) relies on (nvd_new_disk).
            // GEOM then need not map the pages into KVA for us.
            flags: spec.flags | bindings::DISKFLAG_UNMAPPED_BIO as u32,
            ident: until_nul(&spec.ident),
            descr: until_nul(&spec.descr),
            attachment: until_nul(&spec.attachment),
            hba: spec.hba,
            non_rotating: true,
            getattr: Some(disk_getattr),
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
    let Some(ctrl) = link.ctrl else { return bio.fail(bindings::ENXIO) };
    match link.geometry.check(bio.cmd(), bio.offset(), bio.bcount()) {
        // The link mutex stays held while the bio is handed over, so a concurrent sever (and
        // the controller's free after it) waits until the controller no longer needs `ctrl`.
        Verdict::Submit(x) => ctrl.start_bio(bio, link.nsid, x),
        Verdict::Done => bio.done(),
        Verdict::Fail(errno) => bio.fail(errno),
    }
}

/// `d_getattr`. Called by g_disk_start on the g_down thread for a consumer's BIO_GETATTR, and
/// by g_disk_dumpconf (`kern.geom.confxml`, `geom disk list`) on the GEOM event thread with
/// the topology lock held, asking GEOM::ident, GEOM::lunid and GEOM::lunname; both only while
/// the provider exists, so before `d_gone` (g_disk_providergone). Nothing here sleeps (the
/// link mutex is an mtx(9)). Answers `GEOM::lunid` with the namespace's NGUID, else EUI64, in
/// hex, as nvd_getattr does: it tells two namespaces of one controller apart, which
/// GEOM::ident (the controller's serial number, and so glabel's `/dev/diskid` name) cannot.
/// Everything else, and a namespace with neither ID, is left to GEOM, which answers from the
/// disk's fields (ident, descr, rotation rate, attachment, HBA IDs).
unsafe extern "C" fn disk_getattr(bp: *mut bindings::bio) -> c_int {
    // SAFETY: GEOM passes d_getattr a bio for the length of the call.
    let Some(mut q) = (unsafe { AttrQuery::from_d_getattr(bp) }) else { return NOT_MINE };
    if !q.is(c"GEOM::lunid") {
        return NOT_MINE;
    }
    // SAFETY: the question is about one of our disks while its provider exists, so before its
    // d_gone, which frees the context only after GEOM's last call (see above).
    let Some(ctx) = (unsafe { q.disk_drv1().cast::<DiskCtx>().as_ref() }) else { return NOT_MINE };
    let uid = ctx.link().lock().uid;
    let mut hex = [0u8; NS_UID_HEX_MAX];
    match uid.hex(&mut hex) {
        Some(h) => q.answer_str(h),
        None => NOT_MINE,
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
    // SAFETY: our disk, alive until on_disk_gone destroys it below.
    let unit = unsafe { (*dp).d_unit };
    {
        let mut k = FreeBsdKernel::new();
        crate::hotplug::teardown::on_disk_gone(&mut k, KDisk::Gone(gone));
    }
    // Destroyed: its name (provider, /dev node) is gone, the unit may be reused (nvd_gonecb).
    super::kernel::give_back_disk_unit(unit);
    // Last: MOD_UNLOAD waits for this count to reach zero before the module's code goes away,
    // so everything above (disk_destroy, freeing the context) must be finished first. Only
    // the return from this function is left after it (d_gone gives no stronger drain).
    super::kernel::d_gone_returning();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 512-byte sectors, 1 MiB, d_maxsize 128 KiB.
    const G: Geometry = Geometry { lba_shift: 9, blocks: 2048, max_io: 128 * 1024 };

    fn read(offset: i64, bcount: i64) -> Verdict {
        G.check(BioCmd::Read, offset, bcount)
    }

    #[test]
    fn a_valid_read_becomes_sectors() {
        assert_eq!(read(4096, 8192), Verdict::Submit(Xfer { op: IoOp::Read, lba: 8, blocks: 16, len: 8192 }));
        // The very last sector.
        assert_eq!(read((2048 - 1) * 512, 512), Verdict::Submit(Xfer { op: IoOp::Read, lba: 2047, blocks: 1, len: 512 }));
    }

    #[test]
    fn misaligned_or_negative_is_einval() {
        for (o, c) in [(1, 512), (512, 1), (0, 511), (-512, 512), (0, -512), (i64::MIN, 512), (0, i64::MIN)] {
            assert_eq!(read(o, c), Verdict::Fail(bindings::EINVAL), "offset {o} bcount {c}");
        }
    }

    #[test]
    fn beyond_the_media_is_eio_without_overflow() {
        assert_eq!(read(2048 * 512, 512), Verdict::Fail(bindings::EIO), "starts at the end");
        assert_eq!(read(2047 * 512, 1024), Verdict::Fail(bindings::EIO), "ends past it");
        let huge = i64::MAX & !511;
        assert_eq!(read(huge, 512), Verdict::Fail(bindings::EIO));
        assert_eq!(read(512, huge), Verdict::Fail(bindings::EIO));
    }

    #[test]
    fn zero_length_is_done_and_oversized_is_refused() {
        assert_eq!(read(0, 0), Verdict::Done);
        assert_eq!(read(2048 * 512, 0), Verdict::Done, "zero bytes at the end, as GEOM allows");
        assert_eq!(read(0, 128 * 1024 + 512), Verdict::Fail(bindings::EINVAL));
    }

    #[test]
    fn flush_delete_and_others() {
        assert_eq!(G.check(BioCmd::Flush, 0, 0), Verdict::Submit(Xfer { op: IoOp::Flush, lba: 0, blocks: 0, len: 0 }));
        assert_eq!(G.check(BioCmd::Delete, 0, 512), Verdict::Fail(bindings::EOPNOTSUPP));
        assert_eq!(G.check(BioCmd::Other(9), 0, 512), Verdict::Fail(bindings::EOPNOTSUPP));
        assert_eq!(G.check(BioCmd::Write, 512, 512), Verdict::Submit(Xfer { op: IoOp::Write, lba: 1, blocks: 1, len: 512 }));
    }
}
