//! kldhost: FreeBSD's kernel linker, for one amd64 kld, in a Linux process.
//!
//! [`link::load`] maps an ELF relocatable `.ko` into the low 2 GiB of the process, resolves its
//! undefined symbols against an emulated KPI table ([`kpi::KpiTable`]) and applies its
//! relocations the way sys/kern/link_elf_obj.c and sys/amd64/amd64/elf_machdep.c do;
//! [`sets`] then reads its linker sets (module metadata, SYSINITs, SYSUNINITs, sysctl OIDs)
//! with the struct layouts bindgen derives from the FreeBSD 15 headers ([`layouts`]).

// The module's code runs in this process: an amd64 host, and MAP_32BIT as Linux defines it.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("kldhost loads and runs amd64 kernel code: it builds on x86-64 Linux only");

pub mod demo;
pub mod elf;
pub mod emu;
pub mod error;
pub mod freebsd15;
pub mod kpi;
pub mod layouts;
pub mod link;
pub mod mapping;
pub mod reloc;
pub mod scenario;
pub mod sets;

pub use error::LoadError;
pub use link::{load, LoadedKo};
