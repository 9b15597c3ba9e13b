//! Simulated DMA memory: one arena addressed by bus addresses above 4 GiB (so a 32-bit
//! truncation in the engine shows up as a DMA error), with live allocations tracked so the
//! device can refuse DMA to memory nobody owns, like an IOMMU would.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use nvme_hotplug::platform::{AllocError, DmaRegion};

/// First bus address handed out.
pub const BUS_BASE: u64 = 0x1_0000_0000;

/// The memory behind every region and every device DMA.
#[derive(Default)]
pub struct Bus {
    arena: Vec<u8>,
    /// Live allocations: start -> length.
    live: BTreeMap<u64, usize>,
    /// Freed blocks available for reuse: (start, length).
    free: Vec<(u64, usize)>,
    /// Bytes currently allocated.
    pub allocated: usize,
}

/// Why a device DMA failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault;

impl Bus {
    /// Allocates `len` zeroed bytes aligned to `align`.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<u64, AllocError> {
        if len == 0 || !align.is_power_of_two() || align > 4096 {
            return Err(AllocError::Invalid);
        }
        if let Some(i) = self
            .free
            .iter()
            .position(|&(a, l)| l == len && a % align as u64 == 0)
        {
            let (addr, _) = self.free.swap_remove(i);
            let off = (addr - BUS_BASE) as usize;
            self.arena[off..off + len].fill(0);
            self.live.insert(addr, len);
            self.allocated += len;
            return Ok(addr);
        }
        let start = self.arena.len().div_ceil(align) * align;
        self.arena.resize(start + len, 0);
        let addr = BUS_BASE + start as u64;
        self.live.insert(addr, len);
        self.allocated += len;
        Ok(addr)
    }

    /// Frees the allocation at `addr`.
    pub fn free(&mut self, addr: u64) {
        if let Some(len) = self.live.remove(&addr) {
            self.allocated -= len;
            self.free.push((addr, len));
        }
    }

    /// The arena offset of `addr..addr+len` if it lies inside one live allocation.
    fn check(&self, addr: u64, len: usize) -> Result<usize, DmaFault> {
        let (&start, &alen) = self.live.range(..=addr).next_back().ok_or(DmaFault)?;
        let end = addr.checked_add(len as u64).ok_or(DmaFault)?;
        if end > start + alen as u64 {
            return Err(DmaFault);
        }
        Ok((addr - BUS_BASE) as usize)
    }

    /// Device-side read.
    pub fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let off = self.check(addr, buf.len())?;
        buf.copy_from_slice(&self.arena[off..off + buf.len()]);
        Ok(())
    }

    /// Device-side write.
    pub fn dma_write(&mut self, addr: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let off = self.check(addr, buf.len())?;
        self.arena[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

/// A region of [`Bus`] memory, freed on drop.
pub struct SoftRegion {
    bus: Rc<RefCell<Bus>>,
    addr: u64,
    len: usize,
}

impl SoftRegion {
    pub(crate) fn new(
        bus: Rc<RefCell<Bus>>,
        len: usize,
        align: usize,
    ) -> Result<SoftRegion, AllocError> {
        let addr = bus.borrow_mut().alloc(len, align)?;
        Ok(SoftRegion { bus, addr, len })
    }

    fn range(&self, off: usize, n: usize) -> usize {
        // The engine promises never to pass a range outside the region; a test that
        // breaks the promise must fail loudly, so this is an assertion, not a clamp.
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len),
            "DMA region access {off}+{n} outside length {}",
            self.len
        );
        (self.addr - BUS_BASE) as usize + off
    }

    /// Convenience for tests: the whole region as a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.read(0, &mut v);
        v
    }
}

impl DmaRegion for SoftRegion {
    fn bus_addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        let o = self.range(off, buf.len());
        buf.copy_from_slice(&self.bus.borrow().arena[o..o + buf.len()]);
    }
    fn write(&self, off: usize, buf: &[u8]) {
        let o = self.range(off, buf.len());
        self.bus.borrow_mut().arena[o..o + buf.len()].copy_from_slice(buf);
    }
}

impl Drop for SoftRegion {
    fn drop(&mut self) {
        self.bus.borrow_mut().free(self.addr);
    }
}
