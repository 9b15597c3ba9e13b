//! DMA memory for the engine: `contigmalloc(9)` regions and their physical addresses.
//!
//! Only the engine's own memory comes from here: queue rings, the identify and log pages, the
//! PRP list pages, all allocated at bring-up. I/O data never does: it moves through busdma(9)
//! straight from the bio's pages ([`super::busdma`]). Why contigmalloc and not busdma for
//! this memory yet: the EC2/bhyve/QEMU targets have no IOMMU in front of the controller, so
//! the physical address is the bus address; a bus_dmamem_alloc per ring (needed with DMAR) is
//! the planned replacement behind the same trait.
//!
//! The memory is shared with the device, which writes it behind the compiler's back: every
//! access is volatile, and 32/64-bit accesses at aligned offsets are single loads and stores, so
//! a completion entry's phase bit is never read torn.

use super::alloc::malloc_type;
use super::bindings;
use crate::platform::{AllocError, DmaAllocator, DmaRegion};
use core::ptr::NonNull;

/// Allocates physically contiguous, zeroed, never-sleeping DMA memory for the module.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContigDma;

/// One contigmalloc(9) region (whole pages, so page-aligned whatever `align` was), freed with
/// free(9) when dropped (contigfree(9) is deprecated in FreeBSD 15, where free(9) handles
/// contigmalloc memory), through the glue's `nvmehp_contig_free`. A region a running device
/// may still access is never dropped: its owner leaks it with `mem::forget` instead.
pub struct ContigRegion {
    va: NonNull<u8>,
    len: usize,
    pa: u64,
}

// SAFETY: the region is exclusively owned kernel memory; accesses are volatile copies.
unsafe impl Send for ContigRegion {}
// SAFETY: &self methods only perform volatile accesses; data races with the device are
// inherent to DMA and resolved by the NVMe protocol (phase bits, doorbells).
unsafe impl Sync for ContigRegion {}

impl DmaAllocator for ContigDma {
    type Region = ContigRegion;

    fn alloc_dma(&self, len: usize, align: usize) -> Result<ContigRegion, AllocError> {
        if len == 0 || !align.is_power_of_two() || align > bindings::PAGE_SIZE as usize {
            return Err(AllocError::Invalid);
        }
        // SAFETY: M_NOWAIT|M_ZERO contigmalloc anywhere in physical memory, `align`-aligned,
        // no boundary constraint; the result is checked for NULL.
        let va = unsafe {
            bindings::contigmalloc(
                len as u64,
                malloc_type(),
                bindings::M_NOWAIT | bindings::M_ZERO,
                0,
                bindings::BUS_SPACE_MAXADDR as u64,
                align as u64,
                0,
            )
        };
        let va = NonNull::new(va.cast::<u8>()).ok_or(AllocError::NoMemory)?;
        // SAFETY: vtophys(): `va` is a wired kernel mapping just returned by contigmalloc, and
        // the region is physically contiguous, so the first page's address covers it all.
        let pa = unsafe { bindings::pmap_kextract(va.as_ptr() as u64) };
        Ok(ContigRegion { va, len, pa })
    }
}

impl ContigRegion {
    fn fits(&self, off: usize, n: usize) -> bool {
        off.checked_add(n).is_some_and(|end| end <= self.len)
    }
}

impl DmaRegion for ContigRegion {
    fn bus_addr(&self) -> u64 {
        self.pa
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Out of range: `buf` is filled with 0xff (what a vanished device reads as).
    fn read(&self, off: usize, buf: &mut [u8]) {
        if !self.fits(off, buf.len()) {
            buf.fill(0xff);
            return;
        }
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `off + i < len`, inside the live region.
            *b = unsafe { self.va.as_ptr().add(off + i).read_volatile() };
        }
    }

    /// Out of range: nothing is written.
    fn write(&self, off: usize, buf: &[u8]) {
        if !self.fits(off, buf.len()) {
            return;
        }
        for (i, b) in buf.iter().enumerate() {
            // SAFETY: `off + i < len`, inside the live region.
            unsafe { self.va.as_ptr().add(off + i).write_volatile(*b) };
        }
    }

    fn read_u32(&self, off: usize) -> u32 {
        if !off.is_multiple_of(4) || !self.fits(off, 4) {
            let mut b = [0u8; 4];
            self.read(off, &mut b);
            return u32::from_le_bytes(b);
        }
        // SAFETY: aligned (the region starts on a page) and in range.
        u32::from_le(unsafe { self.va.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    fn write_u32(&self, off: usize, v: u32) {
        if !off.is_multiple_of(4) || !self.fits(off, 4) {
            self.write(off, &v.to_le_bytes());
            return;
        }
        // SAFETY: aligned and in range.
        unsafe { self.va.as_ptr().add(off).cast::<u32>().write_volatile(v.to_le()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        if !off.is_multiple_of(8) || !self.fits(off, 8) {
            let mut b = [0u8; 8];
            self.read(off, &mut b);
            return u64::from_le_bytes(b);
        }
        // SAFETY: aligned (the region starts on a page) and in range.
        u64::from_le(unsafe { self.va.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    fn write_u64(&self, off: usize, v: u64) {
        if !off.is_multiple_of(8) || !self.fits(off, 8) {
            self.write(off, &v.to_le_bytes());
            return;
        }
        // SAFETY: aligned and in range.
        unsafe { self.va.as_ptr().add(off).cast::<u64>().write_volatile(v.to_le()) }
    }
}

impl Drop for ContigRegion {
    fn drop(&mut self) {
        // SAFETY: the region came from contigmalloc with our malloc type and is freed once;
        // the engine drops regions only after the device can no longer DMA into them
        // (DmaRegion invariant).
        unsafe { bindings::nvmehp_contig_free(self.va.as_ptr().cast()) }
    }
}
