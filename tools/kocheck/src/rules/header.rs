//! The ELF header: the kernel linker's `link_elf_obj` loads only ELF64 x86-64 relocatable
//! objects branded FreeBSD; a shared object or executable goes to a different loader path.

use crate::ko::Header;
use crate::report::Verdict;
use object::elf;

pub const RULE: &str = "elf-header";

pub fn check(h: &Header) -> Verdict {
    let mut bad = Vec::new();
    if !h.class64 {
        bad.push("not ELFCLASS64".to_string());
    }
    if !h.little_endian {
        bad.push("not little-endian".to_string());
    }
    if h.e_type != elf::ET_REL.0 {
        bad.push(format!("e_type {} (want ET_REL=1)", h.e_type));
    }
    if h.machine != elf::EM_X86_64.0 {
        bad.push(format!("e_machine {} (want EM_X86_64=62)", h.machine));
    }
    if h.os_abi != elf::ELFOSABI_FREEBSD.0 {
        bad.push(format!("OSABI {} (want FreeBSD=9)", h.os_abi));
    }
    if bad.is_empty() {
        Verdict::pass(RULE, "ELF64 ET_REL EM_X86_64 OSABI FreeBSD")
    } else {
        Verdict::fail(RULE, bad.join(", "))
    }
}
