//! DMA memory for the lab: a first-fit allocator over guest RAM, and the region type the engine
//! sees through [`nvme_hotplug::platform::DmaRegion`].
//!
//! Guest RAM is the only memory QEMU's NVMe model can DMA to, and no guest OS owns it, so the
//! harness hands it out: everything from [`DMA_POOL_START`] to the end of RAM. Allocations are
//! rounded to 4 KiB pages (the trait's alignment limit is a page, and NVMe PRPs want
//! page-aligned buffers anyway). The allocator counts live bytes so the report can show what the
//! engine leaked after every controller is gone.

use std::collections::BTreeMap;
use std::rc::Rc;

use nvme_hotplug::platform::{AllocError, DmaRegion};

use crate::guest::Guest;

/// First byte of guest RAM handed out for DMA (below it: nothing uses it, kept clear of the
/// real-mode area and of anything a future firmware stub might want).
pub const DMA_POOL_START: u64 = 16 << 20;
/// Allocation granule.
pub const PAGE: u64 = 4096;

/// First-fit allocator over a range of guest-physical memory.
#[derive(Debug)]
pub struct GuestRam {
    /// Free extents: start -> length, never adjacent (coalesced on free).
    free: BTreeMap<u64, u64>,
    /// Allocated extents: start -> length.
    used: BTreeMap<u64, u64>,
    live: u64,
    peak: u64,
}

impl GuestRam {
    /// A pool covering `start..end` (both page-aligned).
    pub fn new(start: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        GuestRam { free, used: BTreeMap::new(), live: 0, peak: 0 }
    }

    /// Allocates `len` bytes (rounded up to pages), page-aligned.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<u64, AllocError> {
        if len == 0 || !align.is_power_of_two() || align as u64 > PAGE {
            return Err(AllocError::Invalid);
        }
        let size = (len as u64).div_ceil(PAGE) * PAGE;
        let (&start, &avail) = self.free.iter().find(|(_, &l)| l >= size).ok_or(AllocError::NoMemory)?;
        self.free.remove(&start);
        if avail > size {
            self.free.insert(start + size, avail - size);
        }
        self.used.insert(start, size);
        self.live += size;
        self.peak = self.peak.max(self.live);
        Ok(start)
    }

    /// Returns the extent starting at `start`. Freeing an unknown address is a harness bug and
    /// is ignored (never corrupts the free list).
    pub fn free(&mut self, start: u64) {
        let Some(size) = self.used.remove(&start) else { return };
        self.live -= size;
        let mut s = start;
        let mut l = size;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + size)) {
            self.free.remove(&(start + size));
            l += nl;
        }
        self.free.insert(s, l);
    }

    /// Bytes currently allocated.
    pub fn live_bytes(&self) -> u64 {
        self.live
    }

    /// Most bytes ever allocated at once.
    pub fn peak_bytes(&self) -> u64 {
        self.peak
    }

    /// Number of live allocations.
    pub fn live_regions(&self) -> usize {
        self.used.len()
    }
}

/// A DMA region in guest RAM; reads and writes go through the guest's RAM path (the shared
/// mapping or qtest, see [`Guest`]). Freed on drop.
pub struct GuestDma {
    guest: Rc<Guest>,
    addr: u64,
    len: usize,
}

impl GuestDma {
    /// Allocates and zeroes a region.
    pub fn alloc(guest: &Rc<Guest>, len: usize, align: usize) -> Result<GuestDma, AllocError> {
        let addr = guest.ram().alloc(len, align)?;
        let region = GuestDma { guest: guest.clone(), addr, len };
        // Zeroed memory is part of the allocator contract (queues start with phase 0).
        guest.ram_fill(addr, len, 0);
        Ok(region)
    }
}

impl GuestDma {
    /// Fills the whole region with `byte` (used to poison read buffers).
    pub fn fill(&self, byte: u8) {
        self.guest.ram_fill(self.addr, self.len, byte);
    }

    /// Reads the u32 at `off` and clears it, as one atomic swap when guest RAM is shared (see
    /// [`Guest::ram_take_u32`]): an MSI-X mailbox.
    pub fn take_u32(&self, off: usize) -> Result<u32, String> {
        if off.checked_add(4).is_none_or(|e| e > self.len) {
            let msg = format!("DMA take_u32 at {off} outside region of {}", self.len);
            self.guest.record_fault(msg.clone());
            return Err(msg);
        }
        self.guest.ram_take_u32(self.addr + off as u64)
    }
}

impl DmaRegion for GuestDma {
    fn bus_addr(&self) -> u64 {
        self.addr
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        if off.checked_add(buf.len()).is_none_or(|e| e > self.len) {
            self.guest.record_fault(format!("DMA read {off}+{} outside region of {}", buf.len(), self.len));
            buf.fill(0);
            return;
        }
        self.guest.ram_read(self.addr + off as u64, buf);
    }

    fn write(&self, off: usize, buf: &[u8]) {
        if off.checked_add(buf.len()).is_none_or(|e| e > self.len) {
            self.guest.record_fault(format!("DMA write {off}+{} outside region of {}", buf.len(), self.len));
            return;
        }
        self.guest.ram_write(self.addr + off as u64, buf);
    }

    fn read_u32(&self, off: usize) -> u32 {
        if off.checked_add(4).is_none_or(|e| e > self.len) {
            self.guest.record_fault(format!("DMA read_u32 at {off} outside region of {}", self.len));
            return 0;
        }
        self.guest.ram_read_u32(self.addr + off as u64)
    }

    fn write_u32(&self, off: usize, v: u32) {
        if off.checked_add(4).is_none_or(|e| e > self.len) {
            self.guest.record_fault(format!("DMA write_u32 at {off} outside region of {}", self.len));
            return;
        }
        self.guest.ram_write_u32(self.addr + off as u64, v);
    }

    fn read_u64(&self, off: usize) -> u64 {
        if off.checked_add(8).is_none_or(|e| e > self.len) {
            self.guest.record_fault(format!("DMA read_u64 at {off} outside region of {}", self.len));
            return 0;
        }
        self.guest.ram_read_u64(self.addr + off as u64)
    }

    fn write_u64(&self, off: usize, v: u64) {
        if off.checked_add(8).is_none_or(|e| e > self.len) {
            self.guest.record_fault(format!("DMA write_u64 at {off} outside region of {}", self.len));
            return;
        }
        self.guest.ram_write_u64(self.addr + off as u64, v);
    }
}

impl Drop for GuestDma {
    fn drop(&mut self) {
        self.guest.ram().free(self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesces_and_counts() {
        let mut r = GuestRam::new(0x0100_0000, 0x0101_0000);
        let a = r.alloc(100, 8).unwrap();
        let b = r.alloc(4096, 4096).unwrap();
        let c = r.alloc(8192, 64).unwrap();
        assert_eq!(r.live_bytes(), 4 * 4096);
        assert_eq!(b, a + 4096);
        assert_eq!(c, b + 4096);
        r.free(b);
        assert_eq!(r.live_bytes(), 3 * 4096);
        // The hole of one page is reused first-fit.
        assert_eq!(r.alloc(1, 1).unwrap(), b);
        r.free(a);
        r.free(b);
        r.free(c);
        assert_eq!(r.live_bytes(), 0);
        // Fully coalesced: the whole 64 KiB is one extent again.
        assert_eq!(r.alloc(0x10_000, 4096).unwrap(), 0x0100_0000);
        assert_eq!(r.alloc(1, 1), Err(AllocError::NoMemory));
    }

    #[test]
    fn rejects_bad_requests() {
        let mut r = GuestRam::new(0, 0x10000);
        assert_eq!(r.alloc(0, 8), Err(AllocError::Invalid));
        assert_eq!(r.alloc(8, 3), Err(AllocError::Invalid));
        assert_eq!(r.alloc(8, 8192), Err(AllocError::Invalid));
        r.free(0x5000); // unknown: ignored
        assert_eq!(r.live_bytes(), 0);
    }
}
