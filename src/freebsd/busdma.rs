//! busdma(9) for the I/O path: the payload tag of a controller and one map per tracker.
//!
//! **The tag** is made as nvme(4) makes its payload tag (sys/dev/nvme/nvme_qpair.c,
//! `nvme_qpair_construct`): parent `bus_get_dma_tag(dev)` (so a DMAR/IOMMU or a bounce
//! constraint of the parent bus applies), alignment 4 (PRP entries are dword aligned),
//! boundary and maximum segment size `PAGE_SIZE` (every segment lies in one page, which is
//! what PRP entries describe), no address limit (`BUS_SPACE_MAXADDR`: NVMe is 64-bit), `maxsize`
//! the largest transfer, `nsegments` one per page plus one for an unaligned start. On amd64
//! without an IOMMU such a tag never bounces: the segments are the bio's own pages.
//!
//! **A map** is created per tracker at attach (`bus_dmamap_create` may allocate: never on the
//! I/O path). [`DmaMap::load_bio`] runs under the controller mutex with `BUS_DMA_NOWAIT`: the
//! load then never defers and never sleeps; the callback runs before it returns, with the
//! segments or an error (sys/kern/subr_bus_dma.c, `bus_dmamap_load_bio`), and ENOMEM is
//! returned when resources (bounce pages) are short. The segments are copied into the
//! tracker's own vector, whose capacity was reserved at attach.
//!
//! **Order.** PRE sync after the load and before the command is submitted; POST sync and
//! unload after the device's completion, before `biodone`. A map is unloaded, and the bio
//! completed, only once the device can no longer touch the pages (see `ctrl.rs`). Maps are
//! destroyed, then the tag, at teardown after the device stopped; a map still loaded for a
//! device that could not be stopped is never unloaded or destroyed, and then neither is the tag.

use super::bindings;
use super::bio::Bio;
use super::device::Device;
use crate::nvme::DmaSeg;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void};

/// Direction of a transfer, for the syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The device writes memory (a read).
    ToMemory,
    /// The device reads memory (a write).
    ToDevice,
}

impl Dir {
    fn pre(self) -> c_int {
        match self {
            Dir::ToMemory => bindings::BUS_DMASYNC_PREREAD,
            Dir::ToDevice => bindings::BUS_DMASYNC_PREWRITE,
        }
    }

    fn post(self) -> c_int {
        match self {
            Dir::ToMemory => bindings::BUS_DMASYNC_POSTREAD,
            Dir::ToDevice => bindings::BUS_DMASYNC_POSTWRITE,
        }
    }
}

/// A controller's payload tag. Destroyed when dropped; its maps must be destroyed first
/// (they borrow it).
pub struct DmaTag {
    raw: bindings::bus_dma_tag_t,
    /// Most segments one load can give (`nsegments`).
    nsegs: usize,
}

// SAFETY: a tag is an immutable kernel object after creation; busdma(9) may be called on it from
// any thread.
unsafe impl Send for DmaTag {}
// SAFETY: as above.
unsafe impl Sync for DmaTag {}

impl DmaTag {
    /// The payload tag for transfers of at most `max_bytes` (see the module documentation).
    /// Sleeps (attach only). The errno of `bus_dma_tag_create` on failure.
    pub fn for_payload(dev: Device, max_bytes: u32) -> Result<DmaTag, c_int> {
        let page = bindings::PAGE_SIZE as u64;
        let nsegs = u64::from(max_bytes).div_ceil(page) + 1;
        let mut raw: bindings::bus_dma_tag_t = core::ptr::null_mut();
        // SAFETY: the parent tag of a live device; no filter, no lock function (the tag is
        // only loaded with NOWAIT, so busdma never calls back later); `raw` receives the tag.
        let err = unsafe {
            bindings::bus_dma_tag_create(
                bindings::bus_get_dma_tag(dev.as_raw()),
                4,
                page,
                bindings::BUS_SPACE_MAXADDR as u64,
                bindings::BUS_SPACE_MAXADDR as u64,
                None,
                core::ptr::null_mut(),
                u64::from(max_bytes),
                nsegs as c_int,
                page,
                0,
                None,
                core::ptr::null_mut(),
                &mut raw,
            )
        };
        if err != 0 || raw.is_null() {
            return Err(if err != 0 { err } else { bindings::ENOMEM });
        }
        Ok(DmaTag { raw, nsegs: nsegs as usize })
    }

    /// A map for one tracker, with room for this tag's segments. Attach only (allocates).
    pub fn create_map(&self) -> Result<DmaMap, c_int> {
        let mut segs = Vec::new();
        segs.try_reserve_exact(self.nsegs).map_err(|_| bindings::ENOMEM)?;
        let mut raw: bindings::bus_dmamap_t = core::ptr::null_mut();
        // SAFETY: a live tag; `raw` receives the map (which may legitimately be NULL: a tag that
        // never bounces needs no per-map state on some implementations).
        let err = unsafe { bindings::nvmehp_bus_dmamap_create(self.raw, 0, &mut raw) };
        if err != 0 {
            return Err(err);
        }
        Ok(DmaMap { raw, segs, loaded: None })
    }

    /// Destroys `map` (unloaded: see [`DmaMap::unload`]). A loaded map is kept (leaked): the
    /// device may still use its pages. Returns false if the map could not be destroyed.
    pub fn destroy_map(&self, map: DmaMap) -> bool {
        if map.loaded.is_some() {
            // Only the busdma map itself stays (loaded, never destroyed: its pages stay the
            // device's). The segment array is this driver's bookkeeping, memory no device
            // reaches: keeping it would only leak it past kldunload.
            drop(map.segs);
            return false;
        }
        // SAFETY: a map of this tag, unloaded, destroyed once (consumed).
        unsafe { bindings::nvmehp_bus_dmamap_destroy(self.raw, map.raw) == 0 }
    }
}

impl Drop for DmaTag {
    fn drop(&mut self) {
        // SAFETY: created by bus_dma_tag_create and destroyed once; its owner destroyed every
        // map first, or leaks the tag with `mem::forget` (a map of a runaway device).
        unsafe { bindings::bus_dma_tag_destroy(self.raw) };
    }
}

/// One tracker's map and the segments of its current load.
pub struct DmaMap {
    raw: bindings::bus_dmamap_t,
    /// Capacity reserved at creation: the load callback never allocates.
    segs: Vec<DmaSeg>,
    /// The direction of the current load (None: not loaded).
    loaded: Option<Dir>,
}

// SAFETY: the map is only used under the controller mutex by its tracker.
unsafe impl Send for DmaMap {}

/// The callback's view of one load.
struct LoadCtx<'a> {
    segs: &'a mut Vec<DmaSeg>,
    error: c_int,
}

unsafe extern "C" fn load_cb(arg: *mut c_void, segs: *mut bindings::bus_dma_segment_t, nseg: c_int, error: c_int) {
    // SAFETY: `arg` is the LoadCtx that load_bio passed, alive for the whole call (NOWAIT: the
    // callback runs before bus_dmamap_load_bio returns).
    let ctx = unsafe { &mut *arg.cast::<LoadCtx<'_>>() };
    ctx.segs.clear();
    ctx.error = error;
    if error != 0 {
        return;
    }
    let n = usize::try_from(nseg).unwrap_or(0);
    if n > ctx.segs.capacity() || segs.is_null() {
        ctx.error = bindings::EFBIG; // more than the tag allows: refuse rather than allocate
        return;
    }
    // SAFETY: busdma passes `nseg` segments at `segs`, valid during the callback.
    let given = unsafe { core::slice::from_raw_parts(segs, n) };
    for s in given {
        if crate::fallible::push_within_capacity(ctx.segs, DmaSeg { addr: s.ds_addr, len: s.ds_len as usize }).is_err() {
            ctx.error = bindings::EFBIG; // never grown here: refuse rather than allocate
            return;
        }
    }
}

impl DmaMap {
    /// Loads `bio`'s data (mapped or unmapped) with `BUS_DMA_NOWAIT` and syncs it for the
    /// device (PRE). Returns the segments, or the errno (ENOMEM: busdma is short of
    /// resources now; anything else: this bio cannot be mapped). Never sleeps; allocates
    /// nothing of ours. Call with the map unloaded.
    pub fn load_bio(&mut self, tag: &DmaTag, bio: &Bio, dir: Dir) -> Result<&[DmaSeg], c_int> {
        if self.loaded.is_some() {
            return Err(bindings::EBUSY);
        }
        let mut ctx = LoadCtx { segs: &mut self.segs, error: 0 };
        // SAFETY: a live tag and map of it, unloaded; the bio is ours until biodone; the
        // callback and its argument outlive the call (NOWAIT: no deferral).
        let err = unsafe {
            bindings::bus_dmamap_load_bio(tag.raw, self.raw, bio.as_raw(), Some(load_cb), (&raw mut ctx).cast(), bindings::BUS_DMA_NOWAIT)
        };
        let err = if err != 0 { err } else { ctx.error };
        if err != 0 {
            self.segs.clear();
            // Whatever part of the load happened (our callback refuses a load busdma made):
            // give it back. Unloading a map that holds nothing is harmless.
            // SAFETY: a map of this tag, no longer used for this bio.
            unsafe { bindings::nvmehp_bus_dmamap_unload(tag.raw, self.raw) };
            return Err(err);
        }
        self.loaded = Some(dir);
        // SAFETY: the map was just loaded by this tag.
        unsafe { bindings::nvmehp_bus_dmamap_sync(tag.raw, self.raw, dir.pre()) };
        Ok(&self.segs)
    }

    /// After the device's last access (its completion, or a stop that disabled it): POST sync
    /// and unload. Does nothing for a map that is not loaded.
    pub fn unload(&mut self, tag: &DmaTag) {
        let Some(dir) = self.loaded.take() else { return };
        // SAFETY: a loaded map of this tag; the device is done with the pages (caller).
        unsafe {
            bindings::nvmehp_bus_dmamap_sync(tag.raw, self.raw, dir.post());
            bindings::nvmehp_bus_dmamap_unload(tag.raw, self.raw);
        }
        self.segs.clear();
    }

    /// True while loaded: the device was given pages through this map.
    pub fn is_loaded(&self) -> bool {
        self.loaded.is_some()
    }
}
