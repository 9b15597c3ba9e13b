//! A request's data as DMA segments, the PRP entries that describe it, and the PRP list
//! memory preallocated for every command slot.
//!
//! **Segments.** The kld hands the engine a bio's data as busdma(9) gives it: a list of
//! (bus address, length) segments from a tag made as nvme(4) makes its payload tag
//! (sys/dev/nvme/nvme_qpair.c, `nvme_qpair_construct`: alignment 4, boundary and maximum
//! segment size `PAGE_SIZE`), so every segment lies inside one page. The lab and softnvme
//! hand it one physically contiguous buffer ([`DataBuf`]), which is the one-segment case.
//!
//! **PRP entries** (NVMe 1.4 §4.3): the first entry may start anywhere dword aligned and covers
//! the rest of its page; every further entry is a page address and covers that page (the last
//! one possibly less). A segment list can be described that way only if every segment but the
//! first starts on a page boundary and every segment but the last ends on one; nvme(4)'s
//! `nvme_payload_map` relies on its tag for that and copies one segment per entry. The engine
//! does not rely on the caller: [`check_segments`] refuses any other shape with an error, and
//! [`entries`] walks the segments page by page, so a segment spanning several pages (a
//! contiguous buffer) gives one entry per page.
//!
//! **PRP lists** are preallocated at bring-up, one per command slot of every I/O queue, packed
//! into pages as nvme(4) packs them (`prpsz = 8 * btoc(max_xfer_size)`, never crossing a page):
//! [`PrpLists`]. Submitting a command therefore never allocates DMA memory.
//!
//! [`DataBuf`]: super::io::DataBuf

use alloc::vec::Vec;

use super::error::NvmeError;
use super::regs::PAGE_SIZE;
use crate::platform::{DmaAllocator, DmaRegion};

const PAGE: u64 = PAGE_SIZE as u64;

/// One piece of a request's data, as the device sees it (`bus_dma_segment_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSeg {
    /// Bus address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Checks that `segs` describe exactly `total` bytes in a shape PRP entries can express:
/// no empty segment, no address wrap, the first dword aligned, every later one starting on a
/// page boundary, every earlier one ending on one.
pub fn check_segments(segs: &[DmaSeg], total: usize) -> Result<(), NvmeError> {
    let Some(first) = segs.first() else {
        return Err(NvmeError::InvalidRequest("no data segments"));
    };
    if first.addr & 3 != 0 {
        return Err(NvmeError::InvalidRequest("buffer not dword aligned"));
    }
    let last = segs.len() - 1;
    let mut sum = 0usize;
    for (i, s) in segs.iter().enumerate() {
        if s.len == 0 {
            return Err(NvmeError::InvalidRequest("empty data segment"));
        }
        let Some(end) = s.addr.checked_add(s.len as u64) else {
            return Err(NvmeError::InvalidRequest("buffer wraps the bus address space"));
        };
        if i > 0 && s.addr % PAGE != 0 {
            return Err(NvmeError::InvalidRequest("data segment after the first does not start on a page"));
        }
        if i < last && end % PAGE != 0 {
            return Err(NvmeError::InvalidRequest("data segment before the last does not end on a page"));
        }
        sum = sum.checked_add(s.len).ok_or(NvmeError::InvalidRequest("segment lengths overflow"))?;
    }
    if sum != total {
        return Err(NvmeError::InvalidRequest("segments do not add up to the request length"));
    }
    Ok(())
}

/// The PRP entries of bytes `off..off + len` of a payload that passed [`check_segments`]:
/// the address of byte `off`, then the address of each following page. Ends early (yields
/// fewer entries) if the segments end before the range does; never reads outside `segs`.
pub fn entries(segs: &[DmaSeg], off: usize, len: usize) -> Entries<'_> {
    let mut e = Entries { segs, seg: 0, pos: 0, left: len };
    let mut skip = off;
    while let Some(s) = e.segs.get(e.seg) {
        if skip < s.len {
            e.pos = skip;
            return e;
        }
        skip -= s.len;
        e.seg += 1;
    }
    e.left = 0;
    e
}

/// Iterator of [`entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    segs: &'a [DmaSeg],
    seg: usize,
    /// Offset inside `segs[seg]`.
    pos: usize,
    /// Bytes of the range not yet covered.
    left: usize,
}

impl Iterator for Entries<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        let s = self.segs.get(self.seg)?;
        let addr = s.addr + self.pos as u64;
        // This entry covers the rest of its page, or of its segment if that ends first (only
        // the last segment can: check_segments).
        let covered = ((PAGE - addr % PAGE) as usize).min(s.len - self.pos);
        self.left = self.left.saturating_sub(covered);
        self.pos += covered;
        if self.pos >= s.len {
            self.seg += 1;
            self.pos = 0;
        }
        Some(addr)
    }
}

/// The PRP list slots of one controller life: `count` lists of `entries` entries each,
/// packed into whole pages (a list never crosses a page: its size is a power of two that
/// divides the page), allocated once at bring-up. A slot is taken per command that needs a
/// list and given back when the command completes or is failed.
pub struct PrpLists<R> {
    pages: Vec<R>,
    /// Entries per list.
    entries: usize,
    /// Bytes per list (a power of two, at most a page).
    stride: usize,
    per_page: usize,
    free: Vec<u32>,
}

impl<R: DmaRegion> PrpLists<R> {
    /// No lists (before bring-up).
    pub fn empty() -> Self {
        PrpLists { pages: Vec::new(), entries: 0, stride: 0, per_page: 0, free: Vec::new() }
    }

    /// Allocates `count` lists for commands of at most `max_bytes` each. A command touches
    /// at most `max_bytes / PAGE + 1` pages, the first of which is PRP1: its list holds
    /// `max_bytes / PAGE` entries (nvme(4): `btoc(max_xfer_size)`).
    pub fn allocate<A: DmaAllocator<Region = R>>(alloc: &A, count: usize, max_bytes: u32) -> Result<Self, NvmeError> {
        let entries = (max_bytes as usize / PAGE_SIZE).max(2);
        let stride = (entries * 8).next_power_of_two();
        if stride > PAGE_SIZE || count > u32::MAX as usize {
            return Err(NvmeError::InvalidRequest("PRP list larger than a page"));
        }
        let per_page = PAGE_SIZE / stride;
        let npages = count.div_ceil(per_page);
        let mut pages = Vec::new();
        pages.try_reserve_exact(npages).map_err(|_| NvmeError::OutOfMemory("the PRP list table"))?;
        let mut free = Vec::new();
        free.try_reserve_exact(count).map_err(|_| NvmeError::OutOfMemory("the PRP list table"))?;
        let mut lists = PrpLists { pages, entries, stride, per_page, free };
        for _ in 0..npages {
            // On an error the pages allocated so far are dropped with `lists`: the device was
            // never told about them.
            let r = alloc.alloc_dma(PAGE_SIZE, PAGE_SIZE).map_err(|_| NvmeError::NoMemory)?;
            if r.len() < PAGE_SIZE || r.bus_addr() % PAGE != 0 {
                return Err(NvmeError::NoMemory);
            }
            // Within the room reserved above.
            let _ = crate::fallible::push_within_capacity(&mut lists.pages, r);
        }
        for i in (0..count as u32).rev() {
            let _ = crate::fallible::push_within_capacity(&mut lists.free, i);
        }
        Ok(lists)
    }

    /// Lists not in use.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// True when no page is held.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Takes a free list slot.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives slot `i` back (the command that used it completed or was failed). The vector has
    /// room for every slot (reserved at allocation), so this never allocates.
    pub fn put(&mut self, i: u32) {
        let _ = crate::fallible::push_within_capacity(&mut self.free, i); // sized at creation
    }

    fn place(&self, i: u32) -> Option<(&R, usize)> {
        if self.per_page == 0 {
            return None;
        }
        let i = i as usize;
        let page = self.pages.get(i / self.per_page)?;
        Some((page, (i % self.per_page) * self.stride))
    }

    /// Writes `list` (the entries after PRP1) into slot `i` and returns the slot's bus address
    /// for PRP2. Error if the slot does not exist or the entries do not fit.
    pub fn write(&self, i: u32, list: impl Iterator<Item = u64>) -> Result<u64, NvmeError> {
        let (page, base) = self.place(i).ok_or(NvmeError::InvalidRequest("no such PRP list"))?;
        // In chunks, so the stack buffer stays small and a list costs few region writes (each
        // one is a round trip in the lab).
        const CHUNK: usize = 64;
        let mut buf = [0u8; CHUNK * 8];
        let (mut n, mut written) = (0usize, 0usize);
        for addr in list {
            if written + n >= self.entries {
                return Err(NvmeError::InvalidRequest("more PRP entries than a list holds"));
            }
            buf[n * 8..n * 8 + 8].copy_from_slice(&addr.to_le_bytes());
            n += 1;
            if n == CHUNK {
                page.write(base + written * 8, &buf);
                written += n;
                n = 0;
            }
        }
        page.write(base + written * 8, &buf[..n * 8]);
        Ok(page.bus_addr() + base as u64)
    }

    /// Gives the pages up (into a [`DeviceStop`](super::stop::DeviceStop): the device may still
    /// read a list until it is stopped); no slot is free afterwards.
    pub fn take_pages(&mut self) -> Vec<R> {
        self.free.clear();
        core::mem::take(&mut self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn seg(addr: u64, len: usize) -> DmaSeg {
        DmaSeg { addr, len }
    }

    #[test]
    fn shapes_that_prps_cannot_express_are_refused() {
        let ok = [seg(0x1200, 0xe00), seg(0x8000, 0x1000), seg(0x3000, 0x10)];
        assert_eq!(check_segments(&ok, 0xe00 + 0x1000 + 0x10), Ok(()));
        assert!(check_segments(&ok, 0x1000).is_err(), "length mismatch");
        assert!(check_segments(&[], 0).is_err());
        assert!(check_segments(&[seg(0x1002, 4)], 4).is_err(), "not dword aligned");
        assert!(check_segments(&[seg(0x1000, 0x800), seg(0x3000, 0x800)], 0x1000).is_err(), "first ends mid-page");
        assert!(check_segments(&[seg(0x1000, 0x1000), seg(0x3200, 0x100)], 0x1100).is_err(), "second starts mid-page");
        assert!(check_segments(&[seg(0x1000, 0)], 0).is_err(), "empty segment");
        assert!(check_segments(&[seg(u64::MAX - 3, 8)], 8).is_err(), "wraps");
    }

    #[test]
    fn entries_walk_pages_within_and_across_segments() {
        // One contiguous buffer over three pages, starting at an offset.
        let c = [seg(0x1200, 0x2000)];
        assert_eq!(entries(&c, 0, 0x2000).collect::<Vec<_>>(), vec![0x1200, 0x2000, 0x3000]);
        // The same bytes scattered, one page-bounded segment each (busdma's shape).
        let s = [seg(0x9200, 0xe00), seg(0x5000, 0x1000), seg(0x7000, 0x200)];
        assert_eq!(entries(&s, 0, 0x2000).collect::<Vec<_>>(), vec![0x9200, 0x5000, 0x7000]);
        // A part starting inside the second segment.
        assert_eq!(entries(&s, 0xe00 + 0x800, 0xa00).collect::<Vec<_>>(), vec![0x5800, 0x7000]);
        // A range beyond the segments yields nothing.
        assert_eq!(entries(&s, 0x5000, 0x200).count(), 0);
    }

    /// A payload of `len` bytes starting `start` bytes into its first page, whose pages are
    /// the bus pages `pages` (distinct), as busdma maps a virtually contiguous bio: one
    /// segment per page, split at page boundaries.
    fn busdma_like(start: usize, len: usize, pages: &[u64]) -> Vec<DmaSeg> {
        let mut segs = Vec::new();
        let (mut off, mut i) = (start, 0);
        let mut left = len;
        while left > 0 {
            let n = (PAGE_SIZE - off).min(left);
            segs.push(seg(pages[i] * PAGE + off as u64, n));
            left -= n;
            off = 0;
            i += 1;
        }
        segs
    }

    /// The bus address of every byte, as the device reads the PRP entries (NVMe 1.4 §4.3):
    /// from the first entry to the end of its page, then a page per entry.
    fn device_view(prps: &[u64], len: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for (k, &a) in prps.iter().enumerate() {
            if k > 0 {
                assert_eq!(a % PAGE, 0, "entry {k} is not page aligned");
            }
            let n = (PAGE - a % PAGE) as usize;
            for b in 0..n {
                if out.len() == len {
                    break;
                }
                out.push(a + b as u64);
            }
        }
        out
    }

    /// Page-sized regions at increasing bus addresses, recording every write.
    struct Pages(core::cell::Cell<u64>);
    struct Page(u64, core::cell::RefCell<Vec<u8>>);
    impl DmaRegion for Page {
        fn bus_addr(&self) -> u64 {
            self.0
        }
        fn len(&self) -> usize {
            self.1.borrow().len()
        }
        fn read(&self, off: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.1.borrow()[off..off + buf.len()]);
        }
        fn write(&self, off: usize, buf: &[u8]) {
            self.1.borrow_mut()[off..off + buf.len()].copy_from_slice(buf);
        }
    }
    impl DmaAllocator for Pages {
        type Region = Page;
        fn alloc_dma(&self, len: usize, _align: usize) -> Result<Page, crate::platform::AllocError> {
            let a = self.0.get();
            self.0.set(a + 0x10_0000);
            Ok(Page(a, core::cell::RefCell::new(vec![0; len])))
        }
    }

    #[test]
    fn lists_are_packed_within_pages_and_bounded() {
        // 128 KiB commands: 32 entries, 256 bytes per list, 16 lists per page.
        let mut l = PrpLists::allocate(&Pages(core::cell::Cell::new(0x10_0000)), 40, 128 * 1024).unwrap();
        assert_eq!(l.pages.len(), 3);
        let mut addrs = Vec::new();
        while let Some(i) = l.take() {
            let a = l.write(i, (0..32u64).map(|k| k * PAGE)).unwrap();
            assert_eq!(a % 8, 0);
            assert_eq!(a / PAGE, (a + 32 * 8 - 1) / PAGE, "list {i} crosses a page");
            addrs.push(a);
        }
        assert_eq!(addrs.len(), 40);
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 40, "every list has its own memory");
        // One entry too many is an error, not an overflow into the next list.
        l.put(0);
        assert!(l.write(0, (0..33u64).map(|k| k * PAGE)).is_err());
        assert_eq!(l.available(), 1);
        assert_eq!(l.take_pages().len(), 3);
        assert!(l.take().is_none(), "no slot without pages");
    }

    fn segment_view(segs: &[DmaSeg]) -> Vec<u64> {
        segs.iter().flat_map(|s| (0..s.len as u64).map(move |b| s.addr + b)).collect()
    }

    fn pages_strategy() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::hash_set(1u64..100_000, 300).prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        /// Every byte of every part (MDTS splits at any page-or-block multiple) reaches the
        /// device at the address busdma gave for it, and every entry after the first is a page.
        #[test]
        fn prp_entries_describe_exactly_the_segments(
            start in (0usize..1024).prop_map(|d| d * 4),
            len in 1usize..(256 * 4096),
            part in prop_oneof![Just(4096usize), Just(8192), Just(65536), Just(128 * 1024), Just(1 << 20)],
            pages in pages_strategy(),
        ) {
            let segs = busdma_like(start, len, &pages);
            prop_assert_eq!(check_segments(&segs, len), Ok(()));
            let all = segment_view(&segs);
            let mut off = 0;
            while off < len {
                let n = part.min(len - off);
                let prps: Vec<u64> = entries(&segs, off, n).collect();
                prop_assert!(prps.len() <= n.div_ceil(PAGE_SIZE) + 1);
                prop_assert!(prps.len() - 1 <= part / PAGE_SIZE, "fits a list sized for the part");
                prop_assert_eq!(&device_view(&prps, n)[..], &all[off..off + n]);
                off += n;
            }
        }

        /// A contiguous buffer is the one-segment case and maps the same way.
        #[test]
        fn a_contiguous_buffer_maps_page_by_page(addr in (0u64..1 << 40).prop_map(|a| a * 4), len in 1usize..(1 << 20)) {
            let segs = [seg(addr, len)];
            prop_assert_eq!(check_segments(&segs, len), Ok(()));
            let prps: Vec<u64> = entries(&segs, 0, len).collect();
            prop_assert_eq!(device_view(&prps, len), segment_view(&segs));
        }

        /// Arbitrary segment lists never panic: either refused, or every byte maps exactly.
        #[test]
        fn arbitrary_segments_are_refused_or_exact(
            raw in proptest::collection::vec((0u64..1 << 20, 0usize..9000), 0..6),
            extra in 0usize..3,
        ) {
            let segs: Vec<DmaSeg> = raw.iter().map(|&(a, l)| seg(a, l)).collect();
            let total: usize = segs.iter().map(|s| s.len).sum::<usize>() + extra;
            match check_segments(&segs, total) {
                Err(_) => {}
                Ok(()) => {
                    let prps: Vec<u64> = entries(&segs, 0, total).collect();
                    prop_assert_eq!(device_view(&prps, total), segment_view(&segs));
                }
            }
            // A range outside the payload yields nothing and reads nothing out of bounds.
            prop_assert_eq!(entries(&segs, total + 1, 4096).count(), 0);
        }
    }
}
