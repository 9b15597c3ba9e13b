//! Unmapped bios: data given as pages (`bio_ma`, an array of `vm_page_t`) with no kernel
//! mapping, as GEOM passes them to a disk that set DISKFLAG_UNMAPPED_BIO (sys/geom/geom_disk.c
//! sets G_PF_ACCEPT_UNMAPPED on its provider; g_io_request then need not map the pages).
//!
//! - The bio carries BIO_UNMAPPED, `bio_ma`/`bio_ma_n`/`bio_ma_offset`, and `bio_data` =
//!   `unmapped_buf`: an address that is not the data and must never be dereferenced
//!   (sys/kern/vfs_bio.c). Here it is a page mapped with no access at all, so a driver that
//!   reads or writes through `bio_data` faults in its own code: the kernel's fatal trap.
//! - `vm_page_t` is opaque to a driver; only busdma looks inside (`VM_PAGE_TO_PHYS` in
//!   `_bus_dmamap_load_ma`). The pages here are the emulation's own records of guest-RAM pages
//!   ([`page_for`]); busdma ([`chunks`]) takes each page's physical address from them and
//!   refuses an array entry that is not one of them.
//! - A disk without DISKFLAG_UNMAPPED_BIO is never sent one: GEOM maps the pages first.

use super::log;
use crate::layouts;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_int;
use std::sync::Mutex;

/// The emulation's `struct vm_page`: only its physical address (what `VM_PAGE_TO_PHYS` reads).
struct Page {
    phys: u64,
}

/// Pages handed out (their records' addresses), and each unmapped bio's page array, kept
/// until the bio is done.
struct State {
    pages: BTreeSet<u64>,
    arrays: BTreeMap<u64, Vec<*mut layouts::vm_page>>,
}

// SAFETY: the raw pointers are addresses of records this module owns; they are only compared
// and read under the mutex.
unsafe impl Send for State {}

static STATE: Mutex<State> = Mutex::new(State { pages: BTreeSet::new(), arrays: BTreeMap::new() });

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `vm_page_t` of the guest-RAM page at physical address `phys` (page aligned).
pub fn page_for(phys: u64) -> *mut layouts::vm_page {
    let p = Box::into_raw(Box::new(Page { phys })) as u64;
    state().pages.insert(p);
    p as *mut layouts::vm_page
}

/// `unmapped_buf`: one page mapped PROT_NONE, made once.
fn unmapped_buf() -> *mut libc::c_void {
    static BUF: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUF.get_or_init(|| {
        // SAFETY: a fresh anonymous private mapping of one page, never unmapped.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert!(p != libc::MAP_FAILED, "mmap of unmapped_buf failed");
        p as usize
    }) as *mut libc::c_void
}

/// Sends `disk` an unmapped `cmd` bio of `len` bytes at `offset` over the guest-RAM pages at
/// `phys` (in that order, starting `ma_offset` bytes into the first), as g_disk_start would.
/// EOPNOTSUPP (nothing sent) when the disk did not set DISKFLAG_UNMAPPED_BIO.
///
/// # Safety
/// The pages must stay guest RAM nobody else uses until the bio is done ([`done`]).
pub unsafe fn submit(name: &str, cmd: u16, offset: i64, len: usize, phys: &[u64], ma_offset: usize) -> Result<*mut layouts::bio, c_int> {
    let Some(dp) = super::geom::created_disk(name) else { return Err(layouts::ENXIO) };
    // SAFETY: a created disk of the driver.
    let flags = unsafe { (*dp).d_flags };
    if flags & layouts::DISKFLAG_UNMAPPED_BIO as u32 == 0 {
        log(format!("g_down: {name} has no DISKFLAG_UNMAPPED_BIO: GEOM would map the pages first; no unmapped bio sent"));
        return Err(layouts::EOPNOTSUPP);
    }
    let ma: Vec<*mut layouts::vm_page> = phys.iter().map(|&p| page_for(p)).collect();
    let mut bp = Box::<layouts::bio>::default();
    bp.bio_cmd = cmd;
    bp.bio_offset = offset;
    bp.bio_length = len as i64;
    bp.bio_bcount = len as _;
    bp.bio_flags = layouts::BIO_UNMAPPED as u16;
    bp.bio_data = unmapped_buf().cast();
    bp.bio_ma = ma.as_ptr() as *mut _;
    bp.bio_ma_n = ma.len() as c_int;
    bp.bio_ma_offset = ma_offset as c_int;
    bp.bio_disk = dp;
    let bp = Box::into_raw(bp);
    let text: Vec<String> = phys.iter().map(|p| format!("{p:#x}")).collect();
    state().arrays.insert(bp as u64, ma);
    // SAFETY: a created disk of the driver: d_strategy is set (disk_create checks it).
    let strategy = unsafe { (*dp).d_strategy }.expect("d_strategy");
    log(format!(
        "g_down: d_strategy({name}, {} unmapped, offset {offset}, {len} bytes) bio {bp:p}: pages [{}] from {ma_offset} bytes into the first",
        super::geom::bio_cmd_name(cmd),
        text.join(", ")
    ));
    // SAFETY: the driver's strategy with a bio it owns until biodone; no emulation lock held.
    unsafe { strategy(bp) };
    Ok(bp)
}

/// If the unmapped bio `bp` is done: frees it and its page array and returns its error.
///
/// # Safety
/// `bp` came from [`submit`] and was not yet returned as done.
pub unsafe fn done(bp: *mut layouts::bio) -> Option<c_int> {
    // SAFETY: per the contract, as geom::bio_done's.
    let e = unsafe { super::geom::bio_done(bp) }?;
    // The page records go with the bio, as the pages are unwired when it completes.
    let mut st = state();
    for p in st.arrays.remove(&(bp as u64)).unwrap_or_default() {
        if st.pages.remove(&(p as u64)) {
            // SAFETY: made by page_for with Box::into_raw, freed once (removed just above).
            drop(unsafe { Box::from_raw(p as *mut Page) });
        }
    }
    Some(e)
}

/// The physical chunks of an unmapped bio's data, as `_bus_dmamap_load_ma` walks `bio_ma`
/// from `bio_ma_offset` for `bio_bcount` bytes: (physical address, bytes), page by page.
/// Refused (with why) when an entry is not a page of the emulation, or the array is too short.
pub fn chunks(b: &layouts::bio) -> Result<Vec<(u64, u64)>, String> {
    let n = usize::try_from(b.bio_ma_n).map_err(|_| format!("bio_ma_n {}", b.bio_ma_n))?;
    let mut off = u64::try_from(b.bio_ma_offset).map_err(|_| format!("bio_ma_offset {}", b.bio_ma_offset))?;
    let mut left = u64::try_from(b.bio_bcount).map_err(|_| format!("bio_bcount {}", b.bio_bcount))?;
    if b.bio_ma.is_null() {
        return Err("BIO_UNMAPPED with no bio_ma".to_string());
    }
    let st = state();
    let mut out = Vec::new();
    let mut i = (off / 4096) as usize;
    off %= 4096;
    while left > 0 {
        if i >= n {
            return Err(format!("bio_ma has {n} pages, {left} bytes left past them"));
        }
        // SAFETY: bio_ma holds bio_ma_n entries (GEOM's contract, checked above: i < n).
        let p = unsafe { *b.bio_ma.add(i) } as u64;
        if !st.pages.contains(&p) {
            return Err(format!("bio_ma[{i}] = {p:#x} is not a vm_page of the kernel"));
        }
        // SAFETY: one of page_for's records (checked above), freed only by `done` under this
        // mutex: VM_PAGE_TO_PHYS.
        let phys = unsafe { (*(p as *const Page)).phys };
        let take = (4096 - off).min(left);
        out.push((phys + off, take));
        left -= take;
        off = 0;
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk starts `bio_ma_offset` into the first page, takes whole pages after it and
    /// stops at `bio_bcount`; a page not handed out and a short array are refused. Fails when
    /// the offset is applied to every page or the walk runs past the array.
    #[test]
    fn the_walk_follows_the_pages_from_the_offset() {
        let ma = [page_for(0x4000), page_for(0x2000), page_for(0x0000)];
        let mut b = layouts::bio::default();
        b.bio_ma = ma.as_ptr() as *mut _;
        b.bio_ma_n = 3;
        b.bio_ma_offset = 512;
        b.bio_bcount = 8192;
        assert_eq!(chunks(&b), Ok(vec![(0x4200, 3584), (0x2000, 4096), (0x0000, 512)]));
        b.bio_bcount = 3 * 4096;
        assert!(chunks(&b).unwrap_err().contains("has 3 pages"));
        let stranger = [0x1234usize as *mut layouts::vm_page];
        b.bio_ma = stranger.as_ptr() as *mut _;
        b.bio_ma_n = 1;
        b.bio_bcount = 512;
        assert!(chunks(&b).unwrap_err().contains("is not a vm_page"));
    }
}
