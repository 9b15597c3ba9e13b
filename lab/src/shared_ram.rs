//! Guest RAM shared with QEMU: the lab creates the memory, QEMU uses it as the machine's RAM,
//! and the lab reads and writes it directly instead of through qtest `read`/`write` commands.
//!
//! How the memory is shared (QEMU 10.0):
//! - The lab creates a memfd (`memfd_create(2)`, close-on-exec) of the RAM size and maps it
//!   `MAP_SHARED`. The spawned QEMU (and only it: the flag is cleared in the forked child, see
//!   [`crate::qemu`]) inherits the descriptor and opens it again as
//!   `memory-backend-file,mem-path=/proc/self/fd/N,share=on`, the machine's RAM through
//!   `-machine memory-backend=`. `memory-backend-memfd` would make QEMU create a memfd of its
//!   own that the lab cannot reach; a memfd leaves no file in /dev/shm when a test is killed.
//! - Both processes then map the same pages: what QEMU's NVMe model DMAs (pci_dma_write) is
//!   in the lab's mapping, and what the lab stores is what the device reads.
//!
//! Address translation: guest-physical address = offset in the file, for the whole RAM,
//! because every lab machine has at most [`MAX_LOW_RAM`] of RAM, all of it mapped below the
//! PCI hole (QEMU hw/i386/pc_q35.c `pc_q35_init` and hw/i386/pc_piix.c `pc_init1` split RAM at
//! 2 GiB at the lowest, putting the rest above 4 GiB). One window is refused although it is RAM
//! in the file: 0xa0000..0x100000, where the chipset decodes VGA and the BIOS/option-ROM
//! shadow (PAM), so a bus master does not reach RAM there. Any range that is not entirely
//! inside guest RAM outside that window is an error, never an out-of-bounds access.
//!
//! Concurrency: QEMU's device model writes this memory while the lab reads it (completion
//! entries, MSI-X mailboxes). No Rust reference to the mapping is ever made; bytes are copied
//! with volatile accesses, and the 32/64-bit accessors are atomics: [`SharedRam::load_u32`]
//! is an acquire load (the engine reads the completion entry's phase dword first and the rest
//! only after it, see `nvme_hotplug::nvme::qpair`), stores are release stores, and every
//! write path ends with a full fence so the stores are complete before the lab's next qtest
//! command (the doorbell that tells QEMU to read them) is even issued.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// How the lab reaches guest RAM (the scenario's `ram_access` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RamAccess {
    /// qtest `read`/`write`/`readl`/`writel` commands: one socket round trip per access.
    Qtest,
    /// The RAM file mapped in the lab ([`SharedRam`]): plain memory accesses.
    #[default]
    Shared,
}

/// Largest RAM the direct path accepts: all of it below the 32-bit PCI hole on pc and q35.
pub const MAX_LOW_RAM: u64 = 2 << 30;

/// The legacy window a bus master does not reach as RAM (VGA 0xa0000, ROM shadow up to 1 MiB).
pub const LEGACY_HOLE: std::ops::Range<u64> = 0xa_0000..0x10_0000;

/// The QOM id of the memory backend object.
pub const BACKEND_ID: &str = "nvmehp-ram";

/// Why a direct access was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamError {
    /// The range is not entirely inside guest RAM.
    OutOfRange { gpa: u64, len: u64, ram: u64 },
    /// The range touches the legacy VGA/ROM window ([`LEGACY_HOLE`]).
    LegacyWindow { gpa: u64, len: u64 },
    /// A 32/64-bit access at an address that is not a multiple of its size.
    Unaligned { gpa: u64, size: u64 },
}

impl fmt::Display for RamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RamError::OutOfRange { gpa, len, ram } => {
                write!(f, "guest RAM access {gpa:#x}+{len:#x} outside RAM of {ram:#x} bytes")
            }
            RamError::LegacyWindow { gpa, len } => {
                write!(f, "guest RAM access {gpa:#x}+{len:#x} touches the legacy VGA/ROM window")
            }
            RamError::Unaligned { gpa, size } => write!(f, "{size}-byte guest RAM access at unaligned {gpa:#x}"),
        }
    }
}

impl std::error::Error for RamError {}

/// The guest RAM file and the lab's mapping of it. Unmapped and closed on drop (QEMU keeps
/// its own descriptor and mapping until it exits).
pub struct SharedRam {
    fd: OwnedFd,
    base: NonNull<u8>,
    size: u64,
}

impl SharedRam {
    /// Creates `size` bytes of zeroed, shareable memory and maps it. `size` must be a non-zero
    /// multiple of 2 MiB and at most [`MAX_LOW_RAM`].
    pub fn create(size: u64) -> io::Result<SharedRam> {
        if size == 0 || !size.is_multiple_of(2 << 20) || size > MAX_LOW_RAM {
            return Err(io::Error::other(format!(
                "shared guest RAM of {size:#x} bytes: must be a multiple of 2 MiB, at most {MAX_LOW_RAM:#x}"
            )));
        }
        // SAFETY: the name is a NUL-terminated literal; memfd_create has no other input.
        let raw = unsafe { libc::memfd_create(c"nvmehp-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor memfd_create just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on the descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of the whole file; the kernel picks the address, so no
        // existing mapping is replaced. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(SharedRam { fd, base, size })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The descriptor QEMU must inherit (close-on-exec is set: see [`crate::qemu`]).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The QEMU arguments that make this file the machine's RAM: the backend object, and the
    /// `memory-backend=` machine property to append to `-M <machine>`.
    pub fn qemu_object(&self) -> String {
        format!(
            "memory-backend-file,id={BACKEND_ID},size={},mem-path=/proc/self/fd/{},share=on",
            self.size,
            self.fd()
        )
    }

    /// The offset of `gpa..gpa+len` in the mapping, if the whole range may be accessed.
    fn offset(&self, gpa: u64, len: u64) -> Result<usize, RamError> {
        let end = gpa.checked_add(len).ok_or(RamError::OutOfRange { gpa, len, ram: self.size })?;
        if end > self.size {
            return Err(RamError::OutOfRange { gpa, len, ram: self.size });
        }
        if len > 0 && gpa < LEGACY_HOLE.end && end > LEGACY_HOLE.start {
            return Err(RamError::LegacyWindow { gpa, len });
        }
        // end <= size, and size fits the mapping (a usize), so the offset does too.
        Ok(gpa as usize)
    }

    fn aligned(&self, gpa: u64, size: u64) -> Result<usize, RamError> {
        if !gpa.is_multiple_of(size) {
            return Err(RamError::Unaligned { gpa, size });
        }
        self.offset(gpa, size)
    }

    /// Where `gpa..gpa+len` is in the lab's address space: for code that must hand out host
    /// pointers to guest RAM (a loader running the kld against this machine, whose
    /// contigmalloc(9) memory must have real guest-physical addresses). Dereferencing it is the
    /// caller's `unsafe`, under the same rules as this module (QEMU may write it concurrently).
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<NonNull<u8>, RamError> {
        let off = self.offset(gpa, len)?;
        // SAFETY: off <= size (checked by `offset`), so the result is inside the mapping or one
        // past its end, and not null because `base` is not.
        Ok(unsafe { NonNull::new_unchecked(self.base.as_ptr().add(off)) })
    }

    /// The guest-physical address of the host pointer `p`, if `p..p+len` lies in guest RAM (the
    /// reverse of [`SharedRam::host_ptr`]: what pmap_kextract(9) answers for such memory).
    pub fn gpa_of(&self, p: *const u8, len: u64) -> Option<u64> {
        let off = (p as usize).checked_sub(self.base.as_ptr() as usize)? as u64;
        self.offset(off, len).ok().map(|_| off)
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let off = self.offset(gpa, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: off + i < off + buf.len() <= size, checked by `offset`; the mapping lives
            // as long as `self`; a volatile byte load is valid whatever QEMU writes meanwhile.
            *b = unsafe { self.base.as_ptr().add(off + i).read_volatile() };
        }
        // Nothing read above may be satisfied after what the caller does next.
        fence(Ordering::Acquire);
        Ok(())
    }

    /// Copies `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        let off = self.offset(gpa, data.len() as u64)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds as in `read`; a volatile byte store.
            unsafe { self.base.as_ptr().add(off + i).write_volatile(*b) };
        }
        // The stores are globally visible before the lab's next qtest command (a doorbell).
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Sets `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), RamError> {
        let off = self.offset(gpa, len as u64)?;
        for i in 0..len {
            // SAFETY: in bounds as in `read`; a volatile byte store.
            unsafe { self.base.as_ptr().add(off + i).write_volatile(byte) };
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32, RamError> {
        let off = self.aligned(gpa, 4)?;
        // SAFETY: in bounds (`aligned`) and 4-byte aligned (the mapping is page-aligned, gpa is
        // a multiple of 4); the reference lives no longer than `self`, hence the mapping, and
        // the memory is only ever accessed atomically or with volatile bytes by the lab.
        Ok(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast::<u32>()) })
    }

    fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64, RamError> {
        let off = self.aligned(gpa, 8)?;
        // SAFETY: as in `atomic_u32`, with 8-byte alignment.
        Ok(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast::<u64>()) })
    }

    /// Acquire load of the little-endian u32 at `gpa` (4-byte aligned).
    pub fn load_u32(&self, gpa: u64) -> Result<u32, RamError> {
        Ok(u32::from_le(self.atomic_u32(gpa)?.load(Ordering::Acquire)))
    }

    /// Acquire load of the little-endian u64 at `gpa` (8-byte aligned).
    pub fn load_u64(&self, gpa: u64) -> Result<u64, RamError> {
        Ok(u64::from_le(self.atomic_u64(gpa)?.load(Ordering::Acquire)))
    }

    /// Store of the little-endian u32 at `gpa` (4-byte aligned), complete before what follows.
    pub fn store_u32(&self, gpa: u64, v: u32) -> Result<(), RamError> {
        self.atomic_u32(gpa)?.store(v.to_le(), Ordering::SeqCst);
        Ok(())
    }

    /// Store of the little-endian u64 at `gpa` (8-byte aligned), complete before what follows.
    pub fn store_u64(&self, gpa: u64, v: u64) -> Result<(), RamError> {
        self.atomic_u64(gpa)?.store(v.to_le(), Ordering::SeqCst);
        Ok(())
    }

    /// Atomically replaces the u32 at `gpa` with `v` and returns the old value: a device write
    /// between the read and the clear of a mailbox cannot be lost.
    pub fn swap_u32(&self, gpa: u64, v: u32) -> Result<u32, RamError> {
        Ok(u32::from_le(self.atomic_u32(gpa)?.swap(v.to_le(), Ordering::SeqCst)))
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are the mapping `create` made; no reference into it outlives
        // `self` (the atomic accessors borrow `self`). The descriptor is closed by OwnedFd.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size as usize) };
    }
}

impl fmt::Debug for SharedRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRam").field("fd", &self.fd()).field("size", &self.size).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_window_are_refused_not_accessed() {
        let r = SharedRam::create(2 << 20).unwrap();
        let end = r.size();
        assert_eq!(r.write(end - 4, &[1, 2, 3, 4]), Ok(()));
        let mut b = [0u8; 4];
        assert_eq!(r.read(end - 4, &mut b), Ok(()));
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(r.read(end - 3, &mut b), Err(RamError::OutOfRange { gpa: end - 3, len: 4, ram: end }));
        assert!(matches!(r.load_u32(end), Err(RamError::OutOfRange { .. })));
        assert!(matches!(r.read(u64::MAX - 1, &mut b), Err(RamError::OutOfRange { .. })));
        assert!(matches!(r.fill(0x9_fffc, 8, 0), Err(RamError::LegacyWindow { .. })));
        assert!(matches!(r.store_u32(0xf_fffc, 0), Err(RamError::LegacyWindow { .. })));
        assert_eq!(r.store_u32(0x9_fffc, 7), Ok(()), "last dword below the window is RAM");
        assert_eq!(r.load_u32(0x10_0000), Ok(0), "first dword above the window is RAM");
        assert_eq!(r.load_u32(0x10_0002), Err(RamError::Unaligned { gpa: 0x10_0002, size: 4 }));
    }

    #[test]
    fn atomics_are_little_endian_and_swap_returns_the_old_value() {
        let r = SharedRam::create(2 << 20).unwrap();
        r.store_u64(0x10_0000, 0x1122_3344_5566_7788).unwrap();
        let mut b = [0u8; 8];
        r.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(r.load_u32(0x10_0004).unwrap(), 0x1122_3344);
        assert_eq!(r.swap_u32(0x10_0000, 0).unwrap(), 0x5566_7788);
        assert_eq!(r.load_u64(0x10_0000).unwrap(), 0x1122_3344_0000_0000);
    }

    #[test]
    fn host_pointers_translate_both_ways_inside_ram_only() {
        let r = SharedRam::create(2 << 20).unwrap();
        let p = r.host_ptr(0x10_0040, 16).unwrap();
        assert_eq!(r.gpa_of(p.as_ptr(), 16), Some(0x10_0040));
        r.store_u32(0x10_0040, 0x0102_0304).unwrap();
        // SAFETY: p points at 4 bytes inside the mapping, aligned, nobody else writes them.
        assert_eq!(unsafe { p.as_ptr().cast::<u32>().read_volatile() }, 0x0102_0304u32.to_le());
        assert!(matches!(r.host_ptr(r.size() - 8, 16), Err(RamError::OutOfRange { .. })));
        assert!(matches!(r.host_ptr(0xa_0000, 1), Err(RamError::LegacyWindow { .. })));
        assert_eq!(r.gpa_of(p.as_ptr().wrapping_sub(0x20_0000), 1), None, "below the mapping");
        assert_eq!(r.gpa_of(p.as_ptr().wrapping_add(0x20_0000), 1), None, "past its end");
        assert_eq!(r.gpa_of(p.as_ptr(), 0x10_0000), None, "runs past the end");
    }

    #[test]
    fn sizes_qemu_cannot_map_low_are_refused() {
        assert!(SharedRam::create(0).is_err());
        assert!(SharedRam::create(3 << 20).is_err());
        assert!(SharedRam::create(MAX_LOW_RAM + (2 << 20)).is_err());
    }
}
