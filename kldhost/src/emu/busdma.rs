//! busdma(9) as amd64 has it, over the machine's guest RAM.
//!
//! **Where the calls go.** `bus_get_dma_tag`, `bus_dma_tag_create`, `bus_dma_tag_destroy` and
//! `bus_dmamap_load_bio` are kernel functions (sys/kern/subr_bus_dma.c,
//! sys/x86/x86/busdma_machdep.c) and resolve to this file's functions. The map operations are
//! not: <x86/bus_dma.h> inlines `bus_dmamap_create`, `_destroy`, `_sync` and `_unload` into the
//! caller as a call through the tag, which starts with `struct bus_dma_tag_common` whose `impl`
//! points at a `struct bus_dma_impl` (<x86/busdma_impl.h>). So every tag made here is laid out
//! as that struct (bindgen's layout, `layouts::bus_dma_tag_common`), and its `impl` is a method
//! table whose `map_create`, `map_destroy`, `map_sync` and `map_unload` are host functions; any
//! other method panics naming itself (never a silent return). `_sync` and `_unload` of a NULL
//! map are skipped by the inline itself, so maps made here are never NULL.
//!
//! **Tags.** `bus_get_dma_tag(dev)` of a device on pci0 is pci0's tag, which
//! sys/dev/pci/pci.c `pci_attach_common` makes on amd64 (`PCI_DMA_BOUNDARY`: alignment 1,
//! boundary 4 GiB, no address limit). `bus_dma_tag_create` does what
//! sys/x86/x86/busdma_machdep.c `common_bus_dma_tag_create` does with its arguments: a
//! boundary smaller than `maxsegsz` lowers `maxsegsz`; `maxsegsz` 0 is EINVAL; `lowaddr` and
//! `highaddr` are rounded up to the end of their page; a parent's lower `lowaddr`, higher
//! `highaddr` and smaller non-zero boundary apply. Stricter than the kernel: an alignment or
//! boundary that is not a power of two, `nsegments` < 1, `maxsize` 0, or a filter function is
//! EINVAL too (busdma's masks assume powers of two and would misplace segments
//! silently; FreeBSD 15 has no filters to run).
//!
//! **Loads.** `bus_dmamap_load_bio` of a mapped bio walks `bio_data` page by page as
//! sys/x86/x86/busdma_bounce.c `bounce_bus_dmamap_load_buffer` and `_bus_dmamap_addseg` do:
//! each piece is at most the rest of its page and `maxsegsz`, split at the tag's boundary,
//! merged into the previous segment when physically contiguous, within `maxsegsz` and in the
//! same boundary window; more than `nsegments` is EFBIG (and the map is left unloaded). The
//! physical address of each page comes from the machine's memory map: memory outside guest
//! RAM is not memory the device can reach, so the load is refused with EFAULT and a finding,
//! never translated to a wrong address. A page the tag would have to bounce (below its
//! alignment, or inside its `lowaddr`..`highaddr` window) is refused the same way: bounce
//! pages are not emulated. The callback runs before the function returns (no bounce page is
//! ever waited for, so no load is deferred, with or without `BUS_DMA_NOWAIT`), with the
//! segments or the error; as sys/kern/subr_bus_dma.c `bus_dmamap_load_bio` does, the
//! function itself returns 0 whatever the callback was told (only ENOMEM is returned, and it
//! never happens here). Unmapped bios (`BIO_UNMAPPED`, `BIO_VLIST`) are refused with EINVAL
//! and a finding: GEOM here never sends one.
//!
//! **Per-map rules** (findings): a sync of a map with nothing loaded, a POST sync without the
//! PRE sync of the same load, a load into a loaded map, an unload of a map that is not loaded
//! (except right after a failed load: busdma unloads a failed load itself, and a driver
//! unloading again is harmless), a destroy of a loaded map (EBUSY: the device may still use
//! its pages; busdma_bounce.c `bounce_bus_dmamap_destroy` returns EBUSY when the load holds
//! bounce or sync state), a map of another tag. A tag destroyed with maps alive is EBUSY, as
//! `bounce_bus_dma_tag_destroy` returns (`map_count`). After unload, a tag or map the module
//! made and never destroyed is a finding.

use super::{finding, kernel_panic, log};
use crate::kpi::KpiTable;
use crate::layouts;
use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::sync::Mutex;

/// amd64's page size (PAGE_SIZE).
const PAGE: u64 = 4096;
/// BUS_SPACE_MAXADDR and BUS_SPACE_MAXSIZE on amd64 (<x86/bus.h>).
const MAXADDR: u64 = u64::MAX;
/// sys/dev/pci/pci.c: `PCI_DMA_BOUNDARY` where `BUS_SPACE_MAXADDR` exceeds 32 bits.
const PCI_DMA_BOUNDARY: u64 = 1 << 32;

/// What a map holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MapState {
    /// Created, or unloaded.
    Idle,
    /// The last load failed (busdma left it unloaded).
    LoadFailed,
    /// Loaded with these segments; whether a PRE sync followed the load.
    Loaded { segs: Vec<(u64, u64)>, pre_synced: bool },
}

struct TagRec {
    /// Made by the module (pci0's tag is the bus's).
    owned: bool,
    maps: usize,
    /// Segment array handed to load callbacks (the tag's, as busdma_bounce.c keeps it).
    segs: Vec<layouts::bus_dma_segment>,
}

struct MapRec {
    tag: u64,
    state: MapState,
}

#[derive(Default)]
struct BusDma {
    /// The method table every tag points at (leaked: tags live as long as the process).
    impl_table: u64,
    pci0_tag: u64,
    tags: BTreeMap<u64, TagRec>,
    maps: BTreeMap<u64, MapRec>,
}

static STATE: Mutex<Option<BusDma>> = Mutex::new(None);

/// Runs `f` on the busdma state. Never held while module code (a load callback) runs.
fn with_dma<R>(f: impl FnOnce(&mut BusDma) -> R) -> R {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(BusDma::default))
}

/// A copy of a live tag's `struct bus_dma_tag_common`.
fn common(tag: u64) -> layouts::bus_dma_tag_common {
    if !with_dma(|d| d.tags.contains_key(&tag)) {
        kernel_panic(&format!("busdma: {tag:#x} is not a live busdma tag"));
    }
    // SAFETY: a tag new_tag made (a leaked box, never freed) and not destroyed.
    unsafe { *(tag as *const layouts::bus_dma_tag_common) }
}

/// The method table: every slot a trap naming the method, the four inline map operations
/// emulated.
fn impl_table() -> u64 {
    with_dma(|d| {
        if d.impl_table == 0 {
            let mut t = Box::<layouts::bus_dma_impl>::default();
            t.map_create = Some(impl_map_create);
            t.map_destroy = Some(impl_map_destroy);
            t.map_unload = Some(impl_map_unload);
            t.map_sync = Some(impl_map_sync);
            let p = Box::into_raw(t);
            let traps: [(usize, extern "C" fn() -> !); 11] = [
                (std::mem::offset_of!(layouts::bus_dma_impl, tag_create), trap_tag_create),
                (std::mem::offset_of!(layouts::bus_dma_impl, tag_destroy), trap_tag_destroy),
                (std::mem::offset_of!(layouts::bus_dma_impl, tag_set_domain), trap_tag_set_domain),
                (std::mem::offset_of!(layouts::bus_dma_impl, id_mapped), trap_id_mapped),
                (std::mem::offset_of!(layouts::bus_dma_impl, mem_alloc), trap_mem_alloc),
                (std::mem::offset_of!(layouts::bus_dma_impl, mem_free), trap_mem_free),
                (std::mem::offset_of!(layouts::bus_dma_impl, load_ma), trap_load_ma),
                (std::mem::offset_of!(layouts::bus_dma_impl, load_phys), trap_load_phys),
                (std::mem::offset_of!(layouts::bus_dma_impl, load_buffer), trap_load_buffer),
                (std::mem::offset_of!(layouts::bus_dma_impl, map_waitok), trap_map_waitok),
                (std::mem::offset_of!(layouts::bus_dma_impl, map_complete), trap_map_complete),
            ];
            for (off, trap) in traps {
                // SAFETY: `off` is a field of the table, a nullable code pointer (`Option<unsafe
                // extern "C" fn ..>`); a trap's address is a valid non-null value for it. The
                // trap never returns and reads no argument, so its signature cannot mismatch
                // the caller's in any way that matters.
                unsafe { p.cast::<u8>().add(off).cast::<usize>().write(trap as usize) };
            }
            d.impl_table = p as u64;
        }
        d.impl_table
    })
}

// The four map methods with the table's C signatures (<x86/busdma_impl.h>).
unsafe extern "C" fn impl_map_create(tag: layouts::bus_dma_tag_t, flags: c_int, mapp: *mut layouts::bus_dmamap_t) -> c_int {
    emu_map_create(tag as u64, flags, mapp.cast())
}
unsafe extern "C" fn impl_map_destroy(tag: layouts::bus_dma_tag_t, map: layouts::bus_dmamap_t) -> c_int {
    emu_map_destroy(tag as u64, map as u64)
}
unsafe extern "C" fn impl_map_unload(tag: layouts::bus_dma_tag_t, map: layouts::bus_dmamap_t) {
    emu_map_unload(tag as u64, map as u64)
}
unsafe extern "C" fn impl_map_sync(tag: layouts::bus_dma_tag_t, map: layouts::bus_dmamap_t, op: layouts::bus_dmasync_op_t) {
    emu_map_sync(tag as u64, map as u64, op)
}

macro_rules! traps {
    ($($f:ident => $m:literal),* $(,)?) => {$(
        extern "C" fn $f() -> ! {
            kernel_panic(concat!("busdma: the module called the tag's ", $m, " method, which kldhost does not emulate"))
        }
    )*};
}
traps!(
    trap_tag_create => "tag_create", trap_tag_destroy => "tag_destroy",
    trap_tag_set_domain => "tag_set_domain", trap_id_mapped => "id_mapped",
    trap_mem_alloc => "mem_alloc", trap_mem_free => "mem_free", trap_load_ma => "load_ma",
    trap_load_phys => "load_phys", trap_load_buffer => "load_buffer",
    trap_map_waitok => "map_waitok", trap_map_complete => "map_complete",
);

/// Limits of a new tag, after the parent's apply (common_bus_dma_tag_create).
struct Limits {
    alignment: u64,
    boundary: u64,
    lowaddr: u64,
    highaddr: u64,
    maxsize: u64,
    nsegments: u32,
    maxsegsz: u64,
    flags: c_int,
}

fn end_of_page(a: u64) -> u64 {
    (a & !(PAGE - 1)) | (PAGE - 1)
}

fn new_tag(parent: u64, l: Limits, owned: bool) -> u64 {
    let impl_ = impl_table();
    let mut c = Box::<layouts::bus_dma_tag_common>::default();
    c.impl_ = impl_ as *mut layouts::bus_dma_impl;
    c.alignment = l.alignment;
    c.boundary = l.boundary;
    c.lowaddr = end_of_page(l.lowaddr);
    c.highaddr = end_of_page(l.highaddr);
    c.maxsize = l.maxsize;
    c.nsegments = l.nsegments;
    c.maxsegsz = l.maxsegsz;
    c.flags = l.flags;
    if parent != 0 {
        let p = common(parent);
        c.lowaddr = c.lowaddr.min(p.lowaddr);
        c.highaddr = c.highaddr.max(p.highaddr);
        if c.boundary == 0 {
            c.boundary = p.boundary;
        } else if p.boundary != 0 {
            c.boundary = c.boundary.min(p.boundary);
        }
    }
    let p = Box::into_raw(c) as u64;
    with_dma(|d| d.tags.insert(p, TagRec { owned, maps: 0, segs: Vec::new() }));
    p
}

/// pci0's tag (pci_attach_common on amd64), made on first use.
fn pci0_tag() -> u64 {
    let t = with_dma(|d| d.pci0_tag);
    if t != 0 {
        return t;
    }
    let l = Limits {
        alignment: 1,
        boundary: PCI_DMA_BOUNDARY,
        lowaddr: MAXADDR,
        highaddr: MAXADDR,
        maxsize: MAXADDR,
        nsegments: i32::MAX as u32, // BUS_SPACE_UNRESTRICTED
        maxsegsz: MAXADDR,
        flags: 0,
    };
    let t = new_tag(0, l, false);
    with_dma(|d| d.pci0_tag = t);
    log(format!("pci0: DMA tag {t:#x} (alignment 1, boundary {PCI_DMA_BOUNDARY:#x}, no address limit)"));
    t
}

extern "C" fn emu_bus_get_dma_tag(dev: u64) -> u64 {
    let t = pci0_tag();
    log(format!("bus_get_dma_tag({}) = pci0's tag {t:#x}", super::newbus::nameunit(dev)));
    t
}

#[allow(clippy::too_many_arguments)]
extern "C" fn emu_bus_dma_tag_create(
    parent: u64,
    alignment: u64,
    boundary: u64,
    lowaddr: u64,
    highaddr: u64,
    filter: u64,
    _filterarg: u64,
    maxsize: u64,
    nsegments: c_int,
    maxsegsz: u64,
    flags: c_int,
    _lockfunc: u64,
    _lockfuncarg: u64,
    dmat: *mut u64,
) -> c_int {
    let what = format!(
        "bus_dma_tag_create(parent {parent:#x}, alignment {alignment:#x}, boundary {boundary:#x}, lowaddr {lowaddr:#x}, highaddr {highaddr:#x}, maxsize {maxsize:#x}, nsegments {nsegments}, maxsegsz {maxsegsz:#x}, flags {flags:#x})"
    );
    if parent != 0 && !with_dma(|d| d.tags.contains_key(&parent)) {
        kernel_panic(&format!("{what}: parent {parent:#x} is not a busdma tag"));
    }
    if let Some(err) = super::fail::errno("bus_dma_tag_create") {
        // common_bus_dma_tag_create: "Return a NULL tag on failure", set before anything.
        // SAFETY: the caller's out-parameter.
        unsafe { *dmat = 0 };
        log(format!("{what} = {err} (*dmat = NULL)"));
        return err;
    }
    // common_bus_dma_tag_create: the boundary caps the segment size.
    let maxsegsz = if boundary != 0 && boundary < maxsegsz { boundary } else { maxsegsz };
    let refusal = if maxsegsz == 0 {
        Some("maxsegsz 0")
    } else if alignment == 0 || !alignment.is_power_of_two() {
        Some("alignment not a power of two")
    } else if boundary != 0 && !boundary.is_power_of_two() {
        Some("boundary neither 0 nor a power of two")
    } else if nsegments < 1 {
        Some("nsegments < 1")
    } else if maxsize == 0 {
        Some("maxsize 0")
    } else if filter != 0 {
        Some("a filter function")
    } else {
        None
    };
    if let Some(why) = refusal {
        log(format!("{what} = EINVAL ({why})"));
        return layouts::EINVAL;
    }
    let l = Limits { alignment, boundary, lowaddr, highaddr, maxsize, nsegments: nsegments as u32, maxsegsz, flags };
    let t = new_tag(parent, l, true);
    let c = common(t);
    log(format!("{what} = 0: tag {t:#x} (boundary {:#x}, maxsegsz {:#x}, lowaddr {:#x})", c.boundary, c.maxsegsz, c.lowaddr));
    // SAFETY: the caller's out-parameter.
    unsafe { *dmat = t };
    0
}

extern "C" fn emu_bus_dma_tag_destroy(tag: u64) -> c_int {
    let r = with_dma(|d| {
        let pci0 = d.pci0_tag;
        match d.tags.get(&tag) {
            None => Err(format!("bus_dma_tag_destroy({tag:#x}): not a busdma tag")),
            Some(_) if tag == pci0 => Err(format!("bus_dma_tag_destroy({tag:#x}): pci0's tag, not the driver's")),
            Some(t) if t.maps > 0 => Ok(Some(t.maps)),
            Some(_) => {
                d.tags.remove(&tag);
                Ok(None)
            }
        }
    });
    match r {
        Err(msg) => kernel_panic(&msg),
        Ok(Some(maps)) => {
            log(format!("bus_dma_tag_destroy({tag:#x}) = EBUSY ({maps} maps alive)"));
            layouts::EBUSY
        }
        Ok(None) => {
            // The struct stays allocated and zeroed: a use after destroy calls through a NULL
            // `impl` and faults, as it would on freed memory, instead of reaching a live table.
            // SAFETY: the tag new_tag made (a leaked box), no longer in `tags`.
            unsafe { *(tag as *mut layouts::bus_dma_tag_common) = layouts::bus_dma_tag_common::default() };
            log(format!("bus_dma_tag_destroy({tag:#x}) = 0"));
            0
        }
    }
}

/// The tag's map, or why not.
fn check_map(what: &str, tag: u64, map: u64) -> Result<(), String> {
    with_dma(|d| match d.maps.get(&map) {
        None => Err(format!("{what}: {map:#x} is not a busdma map")),
        Some(m) if m.tag != tag => Err(format!("{what}: map {map:#x} belongs to tag {:#x}, not {tag:#x}", m.tag)),
        Some(_) => Ok(()),
    })
}

fn emu_map_create(tag: u64, flags: c_int, mapp: *mut u64) -> c_int {
    if !with_dma(|d| d.tags.contains_key(&tag)) {
        kernel_panic(&format!("bus_dmamap_create({tag:#x}): not a busdma tag"));
    }
    // Non-NULL and distinct: the inline sync and unload skip a NULL map.
    let map = Box::into_raw(Box::new(0u64)) as u64;
    with_dma(|d| {
        d.maps.insert(map, MapRec { tag, state: MapState::Idle });
        d.tags.get_mut(&tag).expect("tag").maps += 1;
    });
    log(format!("bus_dmamap_create(tag {tag:#x}, flags {flags:#x}) = 0: map {map:#x}"));
    // SAFETY: the caller's out-parameter.
    unsafe { *mapp = map };
    0
}

fn emu_map_destroy(tag: u64, map: u64) -> c_int {
    let what = format!("bus_dmamap_destroy(tag {tag:#x}, map {map:#x})");
    if let Err(e) = check_map(&what, tag, map) {
        kernel_panic(&e);
    }
    let loaded = with_dma(|d| matches!(d.maps[&map].state, MapState::Loaded { .. }));
    if loaded {
        finding(format!("{what}: the map is loaded (the device may still use its pages)"));
        log(format!("{what} = EBUSY (loaded)"));
        return layouts::EBUSY;
    }
    with_dma(|d| {
        d.maps.remove(&map);
        d.tags.get_mut(&tag).expect("tag").maps -= 1;
    });
    log(format!("{what} = 0"));
    0
}

fn emu_map_unload(tag: u64, map: u64) {
    let what = format!("bus_dmamap_unload(tag {tag:#x}, map {map:#x})");
    if let Err(e) = check_map(&what, tag, map) {
        kernel_panic(&e);
    }
    let before = with_dma(|d| std::mem::replace(&mut d.maps.get_mut(&map).expect("map").state, MapState::Idle));
    match before {
        MapState::Loaded { .. } => log(what),
        MapState::LoadFailed => log(format!("{what} (after a failed load: nothing held)")),
        MapState::Idle => {
            finding(format!("{what}: the map is not loaded"));
            log(format!("{what}: not loaded"));
        }
    }
}

fn sync_name(op: c_int) -> String {
    let mut v = Vec::new();
    for (bit, n) in [
        (layouts::BUS_DMASYNC_PREREAD, "PREREAD"),
        (layouts::BUS_DMASYNC_POSTREAD, "POSTREAD"),
        (layouts::BUS_DMASYNC_PREWRITE, "PREWRITE"),
        (layouts::BUS_DMASYNC_POSTWRITE, "POSTWRITE"),
    ] {
        if op & bit != 0 {
            v.push(n);
        }
    }
    v.join("|")
}

fn emu_map_sync(tag: u64, map: u64, op: c_int) {
    let what = format!("bus_dmamap_sync(tag {tag:#x}, map {map:#x}, {})", sync_name(op));
    if let Err(e) = check_map(&what, tag, map) {
        kernel_panic(&e);
    }
    let pre = op & (layouts::BUS_DMASYNC_PREREAD | layouts::BUS_DMASYNC_PREWRITE) != 0;
    let post = op & (layouts::BUS_DMASYNC_POSTREAD | layouts::BUS_DMASYNC_POSTWRITE) != 0;
    let problem = with_dma(|d| match &mut d.maps.get_mut(&map).expect("map").state {
        MapState::Loaded { pre_synced, .. } => {
            let missing_pre = post && !*pre_synced && !pre;
            *pre_synced |= pre;
            missing_pre.then_some("a POST sync without the PRE sync of this load")
        }
        _ => Some(if post { "a POST sync of a map with nothing loaded" } else { "a sync of a map with nothing loaded" }),
    });
    match problem {
        Some(p) => {
            finding(format!("{what}: {p}"));
            log(format!("{what}: {p}"));
        }
        None => log(what),
    }
}

/// The segments of `len` bytes at `va` for the tag (bounce_bus_dmamap_load_buffer and
/// _bus_dmamap_addseg), or the errno and why.
fn segments(c: &layouts::bus_dma_tag_common, va: u64, len: u64) -> Result<Vec<(u64, u64)>, (c_int, String)> {
    let mut chunks = Vec::new();
    let (mut va, mut left) = (va, len);
    while left > 0 {
        let pa = super::machine::has_machine().then(|| super::machine::with_machine(|m| m.phys_of(va))).flatten();
        let Some(pa) = pa else {
            return Err((layouts::EFAULT, format!("data at {va:#x} is not in guest RAM: no physical address the device can reach")));
        };
        let n = (PAGE - (pa & (PAGE - 1))).min(left);
        chunks.push((pa, n));
        va += n;
        left -= n;
    }
    segments_of(c, &chunks)
}

/// The segments of physically contiguous `chunks` (each within one page), split and merged
/// under the tag's rules (maxsegsz, boundary, nsegments), as busdma_bounce.c's
/// `_bus_dmamap_addsegs` does for a mapped buffer (`_bus_dmamap_load_buffer`) and for pages
/// (`_bus_dmamap_load_ma`) alike.
fn segments_of(c: &layouts::bus_dma_tag_common, chunks: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, (c_int, String)> {
    let mut segs: Vec<(u64, u64)> = Vec::new();
    let bmask = if c.boundary > 0 { !(c.boundary - 1) } else { 0 };
    for &(start, len) in chunks {
        let (mut pa, mut left) = (start, len);
        while left > 0 {
            if (pa > c.lowaddr && pa <= c.highaddr) || pa & (c.alignment - 1) != 0 {
                return Err((layouts::EFAULT, format!("physical {pa:#x} would need a bounce page (alignment {:#x}, window {:#x}..{:#x}): not emulated", c.alignment, c.lowaddr, c.highaddr)));
            }
            let mut sg = left.min(c.maxsegsz);
            if c.boundary > 0 {
                let baddr = (pa.wrapping_add(c.boundary)) & bmask;
                sg = sg.min(baddr.wrapping_sub(pa));
            }
            let n = segs.len();
            match segs.last_mut() {
                Some(last) if last.0 + last.1 == pa && last.1 + sg <= c.maxsegsz && (c.boundary == 0 || last.0 & bmask == pa & bmask) => last.1 += sg,
                _ if n as u64 >= u64::from(c.nsegments) => {
                    return Err((layouts::EFBIG, format!("more than the tag's {} segments", c.nsegments)));
                }
                _ => segs.push((pa, sg)),
            }
            pa += sg;
            left -= sg;
        }
    }
    Ok(segs)
}

type Callback = unsafe extern "C" fn(*mut c_void, *mut layouts::bus_dma_segment, c_int, c_int);

extern "C" fn emu_bus_dmamap_load_bio(tag: u64, map: u64, bp: *mut layouts::bio, callback: Option<Callback>, arg: *mut c_void, flags: c_int) -> c_int {
    // SAFETY: the driver's bio, handed to it by d_strategy and not yet completed.
    let b = unsafe { &*bp };
    let (va, len) = (b.bio_data as u64, b.bio_bcount as u64);
    let what = format!("bus_dmamap_load_bio(tag {tag:#x}, map {map:#x}, bio {bp:p}: {len} bytes at {va:#x}, flags {flags:#x})");
    if let Err(e) = check_map(&what, tag, map) {
        kernel_panic(&e);
    }
    let Some(callback) = callback else { kernel_panic(&format!("{what}: no callback")) };
    let loaded = with_dma(|d| matches!(d.maps[&map].state, MapState::Loaded { .. }));
    if loaded {
        finding(format!("{what}: the map is already loaded"));
    }
    let vlist = b.bio_flags as u32 & layouts::BIO_VLIST as u32 != 0;
    let unmapped = b.bio_flags as u32 & layouts::BIO_UNMAPPED as u32 != 0;
    let injected = super::fail::errno("bus_dmamap_load_bio");
    let r = if let Some(err) = injected {
        Err((err, "injected".to_string()))
    } else if vlist {
        Err((layouts::EINVAL, "a BIO_VLIST bio: not emulated".to_string()))
    } else if unmapped {
        // bio_data is unmapped_buf, not the data: the pages are (bus_dmamap_load_bio's
        // _bus_dmamap_load_ma branch, sys/kern/subr_bus_dma.c).
        super::unmapped::chunks(b).map_err(|why| (layouts::EINVAL, why)).and_then(|ch| segments_of(&common(tag), &ch))
    } else {
        segments(&common(tag), va, len)
    };
    match r {
        Ok(segs) => {
            let text: Vec<String> = segs.iter().map(|(a, l)| format!("{a:#x}+{l:#x}")).collect();
            log(format!("{what} = 0: {} segment(s) [{}]", segs.len(), text.join(", ")));
            // The tag's segment array, as busdma_bounce.c hands it to the callback.
            let (p, n) = with_dma(|d| {
                d.maps.get_mut(&map).expect("map").state = MapState::Loaded { segs: segs.clone(), pre_synced: false };
                let t = d.tags.get_mut(&tag).expect("tag");
                t.segs.clear();
                t.segs.extend(segs.iter().map(|&(ds_addr, ds_len)| layouts::bus_dma_segment { ds_addr, ds_len }));
                (t.segs.as_mut_ptr(), segs.len() as c_int)
            });
            // SAFETY: the driver's callback with its argument; the segment array lives in the
            // tag record for the call; no emulation lock is held.
            unsafe { callback(arg, p, n, 0) };
        }
        Err((err, why)) => {
            // Too many segments is the tag's answer to a driver that asked too much (EFBIG,
            // as busdma gives it); memory no device can reach is a finding.
            if err != layouts::EFBIG && injected.is_none() {
                finding(format!("{what}: refused: {why}"));
            }
            log(format!("{what}: callback error {err} ({why})"));
            with_dma(|d| d.maps.get_mut(&map).expect("map").state = MapState::LoadFailed);
            let p = with_dma(|d| d.tags.get_mut(&tag).expect("tag").segs.as_mut_ptr());
            // SAFETY: as above, with no segment.
            unsafe { callback(arg, p, 0, err) };
            // subr_bus_dma.c: ENOMEM is also returned ("so that it can pass it up the stack").
            if err == layouts::ENOMEM {
                return err;
            }
        }
    }
    0
}

/// After unload: tags and maps the module made and never destroyed.
///
/// A map still loaded and the tag it belongs to are kept, not a finding, when a device may
/// still DMA into the map's pages and the module said so ([`super::kern::dma_hold_reported`]):
/// unloading or destroying them would let the pages be reused under the device.
pub fn end_of_life_checks() {
    let holder = super::with(|e| super::kern::dma_hold_reported(e));
    let (tags, maps, kept) = with_dma(|d| {
        let loaded: Vec<(u64, u64)> = d.maps.iter().filter(|(_, m)| matches!(m.state, MapState::Loaded { .. })).map(|(k, m)| (*k, m.tag)).collect();
        let kept: Vec<(u64, u64)> = if holder.is_some() { loaded } else { Vec::new() };
        let tags = d.tags.iter().filter(|(t, r)| r.owned && !kept.iter().any(|(_, kt)| kt == *t)).count();
        (tags, d.maps.len() - kept.len(), kept)
    });
    if let (Some(dev), false) = (&holder, kept.is_empty()) {
        let tags: std::collections::BTreeSet<u64> = kept.iter().map(|k| k.1).collect();
        log(format!("after unload: {} loaded busdma map(s) and {} tag(s) kept, not a finding: {dev} may still DMA into the maps' pages (bus mastering on) and the module said so", kept.len(), tags.len()));
    }
    if tags > 0 {
        finding(format!("after unload: {tags} busdma tag(s) never destroyed"));
    }
    if maps > 0 {
        finding(format!("after unload: {maps} busdma map(s) never destroyed"));
    }
}

pub fn register(t: &mut KpiTable) {
    t.function("bus_get_dma_tag", emu_bus_get_dma_tag as extern "C" fn(_) -> _ as usize);
    t.function("bus_dma_tag_create", emu_bus_dma_tag_create as extern "C" fn(_, _, _, _, _, _, _, _, _, _, _, _, _, _) -> _ as usize);
    t.function("bus_dma_tag_destroy", emu_bus_dma_tag_destroy as extern "C" fn(_) -> _ as usize);
    t.function("bus_dmamap_load_bio", emu_bus_dmamap_load_bio as extern "C" fn(_, _, _, _, _, _) -> _ as usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(parent: u64, alignment: u64, boundary: u64, lowaddr: u64, filter: u64, nsegs: c_int, maxsegsz: u64) -> Result<u64, c_int> {
        let mut t = 0u64;
        let e = emu_bus_dma_tag_create(parent, alignment, boundary, lowaddr, MAXADDR, filter, 0, 1 << 20, nsegs, maxsegsz, 0, 0, 0, &mut t);
        if e == 0 { Ok(t) } else { Err(e) }
    }

    #[test]
    fn tag_create_checks_its_arguments_and_applies_the_parents_limits() {
        let pci0 = pci0_tag();
        assert_eq!(create(pci0, 4, 4096, MAXADDR, 0, 8, 0), Err(layouts::EINVAL), "maxsegsz 0");
        assert_eq!(create(pci0, 3, 4096, MAXADDR, 0, 8, 4096), Err(layouts::EINVAL), "alignment 3");
        assert_eq!(create(pci0, 0, 4096, MAXADDR, 0, 8, 4096), Err(layouts::EINVAL), "alignment 0");
        assert_eq!(create(pci0, 4, 0x3000, MAXADDR, 0, 8, 4096), Err(layouts::EINVAL), "boundary 0x3000");
        assert_eq!(create(pci0, 4, 4096, MAXADDR, 0, 0, 4096), Err(layouts::EINVAL), "nsegments 0");
        assert_eq!(create(pci0, 4, 4096, MAXADDR, 0x1234, 8, 4096), Err(layouts::EINVAL), "a filter");
        // A boundary below maxsegsz lowers it; lowaddr ends its page.
        let t = create(pci0, 4, 4096, 0x12345, 0, 8, 0x10000).expect("tag");
        assert_eq!((common(t).maxsegsz, common(t).lowaddr, common(t).boundary), (4096, 0x12fff, 4096));
        // No boundary of its own: pci0's 4 GiB one applies.
        let u = create(pci0, 1, 0, MAXADDR, 0, 8, 0x10000).expect("tag");
        assert_eq!(common(u).boundary, PCI_DMA_BOUNDARY);
        assert_eq!(emu_bus_dma_tag_destroy(u), 0);
        // Map rules: a tag with a map alive is EBUSY; a sync or unload of an unloaded map is a
        // finding; the map and then the tag go.
        let mut m = 0u64;
        assert_eq!(emu_map_create(t, 0, &mut m), 0);
        assert_ne!(m, 0, "the inline sync and unload skip a NULL map");
        assert_eq!(emu_bus_dma_tag_destroy(t), layouts::EBUSY);
        emu_map_sync(t, m, layouts::BUS_DMASYNC_POSTREAD);
        emu_map_unload(t, m);
        let mine: Vec<String> = super::super::with(|e| e.findings.iter().filter(|f| f.contains(&format!("map {m:#x}"))).cloned().collect());
        assert_eq!(mine.len(), 2, "{mine:?}");
        assert!(mine[0].contains("a POST sync of a map with nothing loaded"), "{mine:?}");
        assert!(mine[1].contains("the map is not loaded"), "{mine:?}");
        assert_eq!(emu_map_destroy(t, m), 0);
        assert_eq!(emu_bus_dma_tag_destroy(t), 0);
    }
}
