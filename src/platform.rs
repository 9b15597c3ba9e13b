//! The platform traits: everything the NVMe engine and the hotplug logic need from the machine.
//!
//! They are deliberately small so that each has exactly two implementations that a reviewer can
//! read side by side: the kernel's (`src/freebsd/`, over bus_space(9), contigmalloc(9),
//! DELAY(9)/pause_sbt(9)/sbinuptime(9) and pci_read_config(9)) and the lab's (`lab/`, over
//! QEMU's qtest protocol and guest RAM shared with QEMU, where guest RAM is DMA memory and MMIO
//! goes to QEMU's real NVMe model).
//!
//! Why DMA memory is accessed through methods and not through a slice: in the lab it lives in
//! the guest's RAM inside another process, and in the kernel the device writes it behind the
//! compiler's back, so every access must be a volatile copy anyway. The trait makes both honest.

/// Access to the controller's register window (BAR0).
///
/// After a surprise removal the reads return all-ones on real hardware and zero in QEMU; the
/// engine, not the implementation, decides what a value means. Writes to a vanished device are
/// dropped silently by both.
pub trait RegisterIo {
    /// Reads the 32-bit register at byte offset `off` of BAR0.
    fn read32(&self, off: u32) -> u32;
    /// Writes the 32-bit register at byte offset `off` of BAR0.
    fn write32(&self, off: u32, val: u32);
    /// Reads a 64-bit register as two 32-bit accesses, low dword first (NVMe 1.4 §3.1.4 allows
    /// this for CAP, ASQ and ACQ).
    fn read64(&self, off: u32) -> u64 {
        let lo = self.read32(off) as u64;
        let hi = self.read32(off + 4) as u64;
        lo | (hi << 32)
    }
    /// Writes a 64-bit register as two 32-bit accesses, low dword first.
    fn write64(&self, off: u32, val: u64) {
        self.write32(off, val as u32);
        self.write32(off + 4, (val >> 32) as u32);
    }
}

/// Whether the PCI function is still there, from config space (not from BAR reads, which lie
/// after a QEMU removal).
pub trait PciPresence {
    /// Reads the vendor ID from config space: 0xffff means the function is gone.
    fn vendor_id(&self) -> u16;
    /// True while config space still answers.
    fn present(&self) -> bool {
        self.vendor_id() != 0xffff
    }
    /// The last step of stopping a present function that ignored CC.EN = 0: clear its Bus
    /// Master Enable and read the command register back. True only if the bit reads back
    /// clear: the function can then no longer start DMA (PCI Local Bus Specification, Command
    /// register), and the read's completion has flushed the writes it posted before (PCIe
    /// ordering: a completion does not pass posted requests), so its memory may be freed.
    /// The default cannot do it and says false (the memory stays leaked).
    fn stop_bus_mastering(&self) -> bool {
        false
    }
}

/// Monotonic time and short busy-waits.
pub trait Clock {
    /// Microseconds since an arbitrary fixed point; never goes backwards.
    fn now_us(&self) -> u64;
    /// Waits about `us` microseconds. In the kernel this is DELAY(9) or pause_sbt(9);
    /// in the lab it may also advance the device model.
    fn delay_us(&self, us: u32);
}

/// Why a DMA allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// No memory (M_NOWAIT failed, or the lab's guest RAM pool is exhausted).
    NoMemory,
    /// The request cannot be satisfied at all (alignment above a page, zero length, ...).
    Invalid,
}

/// A physically contiguous, device-visible memory region, freed when dropped.
///
/// Invariant of every implementation: the bytes `bus_addr()..bus_addr()+len()` are owned by this
/// region alone until it is dropped, and the region is not dropped while the device may still
/// DMA into it (the engine guarantees that by disabling or losing the controller first).
pub trait DmaRegion {
    /// The address the device uses for the first byte.
    fn bus_addr(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Copies `buf.len()` bytes starting at `off` out of the region.
    /// Panics-free contract: implementations clamp nothing; the engine never passes a range
    /// outside `0..len()` (it checks first and returns an error).
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copies `buf` into the region at `off`.
    fn write(&self, off: usize, buf: &[u8]);

    /// Reads a little-endian u32 at `off`.
    fn read_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    /// Writes a little-endian u32 at `off`.
    fn write_u32(&self, off: usize, v: u32) {
        self.write(off, &v.to_le_bytes());
    }
    /// Reads a little-endian u64 at `off`.
    fn read_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read(off, &mut b);
        u64::from_le_bytes(b)
    }
    /// Writes a little-endian u64 at `off`.
    fn write_u64(&self, off: usize, v: u64) {
        self.write(off, &v.to_le_bytes());
    }
    /// True when the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Allocates DMA memory.
pub trait DmaAllocator {
    /// The region type this allocator hands out.
    type Region: DmaRegion;
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two, at most 4096).
    /// Must not sleep: the engine may call it with its lock held.
    fn alloc_dma(&self, len: usize, align: usize) -> Result<Self::Region, AllocError>;
}

/// Everything the NVMe engine needs, bundled so it can be named as one type parameter.
pub trait Platform: RegisterIo + PciPresence + Clock + DmaAllocator {}
impl<T: RegisterIo + PciPresence + Clock + DmaAllocator> Platform for T {}
