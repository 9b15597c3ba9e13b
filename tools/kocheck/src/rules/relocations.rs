//! Relocation types: the amd64 kernel linker (sys/amd64/amd64/elf_machdep.c,
//! `elf_reloc_internal`) applies only the types below and fails `kldload` on any other, e.g.
//! the GOT-relative ones a `-fPIC` compiler emits or `R_X86_64_32` from a non-kernel code model.

use crate::ko::Ko;
use crate::report::Verdict;
use object::elf;

pub const RULE: &str = "relocation-types";

pub const ACCEPTED: [u32; 9] = [
    elf::R_X86_64_NONE.0,
    elf::R_X86_64_64.0,
    elf::R_X86_64_PC32.0,
    elf::R_X86_64_PLT32.0,
    elf::R_X86_64_32S.0,
    elf::R_X86_64_GLOB_DAT.0,
    elf::R_X86_64_JUMP_SLOT.0,
    elf::R_X86_64_RELATIVE.0,
    elf::R_X86_64_IRELATIVE.0,
];

pub fn type_name(r_type: u32) -> String {
    object::elf::machine_names(elf::EM_X86_64)
        .r
        .name(elf::RelocationType(r_type))
        .map_or_else(|| format!("type {r_type}"), str::to_string)
}

pub fn check(ko: &Ko) -> Verdict {
    let mut findings: Vec<String> = ko
        .foreign_reloc_sections
        .iter()
        .map(|s| format!("{s}: relocation section format the kernel linker does not read"))
        .collect();
    for r in ko.relocs.iter().filter(|r| !ACCEPTED.contains(&r.r_type)) {
        let sym = ko.symbols.get(r.symbol).map_or("?", |s| s.name.as_str());
        findings.push(format!(
            "{}: {} against {} ({})",
            ko.describe(r.target, r.offset),
            type_name(r.r_type),
            if sym.is_empty() { "section" } else { sym },
            r.from
        ));
    }
    let ok = format!("{} relocations, all of types the amd64 kernel linker applies", ko.relocs.len());
    Verdict::from_findings(RULE, ok, "relocations the amd64 kernel linker rejects", findings)
}
