//! The memory a module is loaded into: one anonymous mapping in the low 2 GiB of the address
//! space.
//!
//! Why low: a kld is compiled for the kernel code model (`-mcmodel=kernel`), where every
//! absolute address the code embeds is an `R_X86_64_32S` field, a 32-bit value sign-extended to
//! 64 bits. The kernel satisfies that by mapping modules above KERNBASE, in the top 2 GiB
//! (link_elf_load_file: `mapbase = KERNBASE` before vm_map_find). A Linux process cannot map
//! there, but the bottom 2 GiB (0 .. 2^31) are the other range a sign-extended 32-bit value can
//! reach, and `MAP_32BIT` asks for exactly that. The imports' trampolines and data objects
//! live in the same mapping, so every PC-relative call or load from the module reaches them.

use crate::error::LoadError;

/// The highest address (exclusive) a sign-extended 32-bit field can hold as a positive value.
pub const LOW_LIMIT: u64 = 1 << 31;

pub struct LowMapping {
    base: *mut u8,
    len: usize,
}

impl LowMapping {
    /// `len` bytes, zeroed, readable and writable, entirely below [`LOW_LIMIT`].
    pub fn new(len: usize) -> Result<LowMapping, LoadError> {
        let len = len.max(1).next_multiple_of(page_size());
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
        // existing memory is touched. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(LoadError::Map(format!("mmap(MAP_32BIT, {len} bytes): {}", std::io::Error::last_os_error())));
        }
        let m = LowMapping { base: p.cast(), len };
        if m.addr() + len as u64 > LOW_LIMIT {
            return Err(LoadError::Map(format!("mmap(MAP_32BIT) returned {:#x}+{len:#x}, above 2 GiB", m.addr())));
        }
        Ok(m)
    }

    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.addr() && addr.checked_add(size).is_some_and(|end| end <= self.addr() + self.len as u64)
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: base..base+len is our mapping, readable for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in bytes(); &mut self gives exclusive access from Rust.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    /// Makes the mapping executable (and keeps it writable: the module's .data and .bss share
    /// pages with nothing else, but sections are packed at their own alignment, not page
    /// aligned, so one protection for the whole mapping is the honest choice).
    pub fn make_executable(&self) -> Result<(), LoadError> {
        // SAFETY: changes protections of our own mapping only.
        let r = unsafe { libc::mprotect(self.base.cast(), self.len, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) };
        if r != 0 {
            return Err(LoadError::Map(format!("mprotect(PROT_EXEC): {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }
}

impl Drop for LowMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping new() made; nothing borrows it any more.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}
