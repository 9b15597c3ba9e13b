//! The emulated KPI a module's undefined symbols resolve against: a table from name to what
//! stands in for the kernel's symbol, the way linker_file_lookup_symbol finds it in the kernel
//! file for a kld (sys/kern/kern_linker.c).
//!
//! Calls from the module to the kernel are `call rel32` (`R_X86_64_PLT32`/`PC32`), which reach
//! only ±2 GiB, and host code lives far away, so every imported function gets a trampoline in
//! the module's low mapping (`jmp *0(%rip); .quad target`). Imported data objects (malloc types,
//! kobj method descriptors, the sysctl root nodes) are placed in the low mapping too, because
//! the module addresses them with PC-relative or 32S fields.

use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub enum Import {
    /// A host `extern "C"` function at this address (an emulated KPI function).
    Function(usize),
    /// A KPI function kldhost declares but does not emulate yet: its trampoline calls a trap
    /// that names the function and aborts the process (as an unimplemented kernel function
    /// would be a panic, never a silent return).
    Unemulated,
    /// A data object placed in the low mapping, initialised with these bytes.
    Data { bytes: Vec<u8>, align: usize },
    /// A host object at a fixed address outside the low mapping. Only a 64-bit relocation can
    /// reach it; a 32-bit one fails to load with an overflow error.
    HostData(u64),
}

impl Import {
    pub fn kind(&self) -> &'static str {
        match self {
            Import::Function(_) => "function",
            Import::Unemulated => "function (not emulated)",
            Import::Data { .. } => "data",
            Import::HostData(_) => "host data",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct KpiTable {
    entries: BTreeMap<String, Import>,
}

impl KpiTable {
    pub fn new() -> KpiTable {
        KpiTable::default()
    }

    pub fn insert(&mut self, name: &str, import: Import) -> &mut Self {
        self.entries.insert(name.to_string(), import);
        self
    }

    pub fn function(&mut self, name: &str, f: usize) -> &mut Self {
        self.insert(name, Import::Function(f))
    }

    pub fn unemulated(&mut self, name: &str) -> &mut Self {
        self.insert(name, Import::Unemulated)
    }

    /// A zero-initialised data object of `size` bytes.
    pub fn data(&mut self, name: &str, size: usize, align: usize) -> &mut Self {
        self.insert(name, Import::Data { bytes: vec![0; size], align })
    }

    pub fn remove(&mut self, name: &str) -> Option<Import> {
        self.entries.remove(name)
    }

    pub fn get(&self, name: &str) -> Option<&Import> {
        self.entries.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// Size of one trampoline slot in the low mapping.
pub const TRAMPOLINE_SIZE: usize = 32;

/// `jmp *0(%rip)` followed by the 64-bit target.
pub fn jump_trampoline(target: u64) -> [u8; TRAMPOLINE_SIZE] {
    let mut t = [0xcc; TRAMPOLINE_SIZE]; // int3 padding
    t[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    t[6..14].copy_from_slice(&target.to_le_bytes());
    t
}

/// `movabs $name, %r11; jmp *0(%rip); .quad trap`: %r11 is a scratch register no argument
/// uses, so the trap learns which unemulated function was called without disturbing the call.
pub fn trap_trampoline(name: *const std::ffi::c_char) -> [u8; TRAMPOLINE_SIZE] {
    let mut t = [0xcc; TRAMPOLINE_SIZE];
    t[0] = 0x49; // REX.W + B
    t[1] = 0xbb; // mov imm64, %r11
    t[2..10].copy_from_slice(&(name as u64).to_le_bytes());
    t[10..16].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    t[16..24].copy_from_slice(&(kldhost_unemulated_entry as unsafe extern "C" fn() as usize as u64).to_le_bytes());
    t
}

extern "C" {
    /// Never called from Rust: only its address goes into trap trampolines.
    fn kldhost_unemulated_entry();
}

// The trap's entry: the name pointer the trampoline left in %r11 becomes the first argument;
// the stack is realigned to 16 bytes for the Rust function, which never returns.
std::arch::global_asm!(
    ".globl kldhost_unemulated_entry",
    "kldhost_unemulated_entry:",
    "mov %r11, %rdi",
    "and $-16, %rsp",
    "call {trap}",
    "ud2",
    trap = sym unemulated_called,
    options(att_syntax)
);

extern "C" fn unemulated_called(name: *const std::ffi::c_char) -> ! {
    // SAFETY: the trampoline passes a pointer to a NUL-terminated name owned by the loaded
    // module's import list, alive while the module is mapped.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    eprintln!("kldhost: the module called {name}, which kldhost does not emulate: aborting");
    std::process::abort()
}
