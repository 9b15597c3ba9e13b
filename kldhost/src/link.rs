//! Loading a kld: the steps of link_elf_load_file (sys/kern/link_elf_obj.c, read at
//! freebsd-src commit f121d450) in its order.
//!
//! 1. Size the module: every loaded section (non-empty PROGBITS/NOBITS/X86_64_UNWIND with
//!    SHF_ALLOC), in section-table order, each at its `sh_addralign`.
//! 2. Map it (low 2 GiB, see mapping.rs), copy PROGBITS, leave NOBITS zero, add each symbol's
//!    section address to its value.
//! 3. link_elf_fix_link_set: an undefined `__start_<sec>` / `__stop_<sec>` is the start / end of
//!    the loaded section named `<sec>` when the module has one (its linker sets); otherwise it
//!    stays undefined and resolves like any import (e.g. `__start_set_pcpu`, the kernel's).
//! 4. link_elf_reloc_local: relocations against STB_LOCAL symbols.
//! 5. relocate_file: the others. Their symbols are looked up (elf_obj_lookup): a defined one
//!    has its own value; an undefined global or weak one is looked up in the KPI table; a weak
//!    one that is not found is 0; a global one that is not found fails the load with
//!    "link_elf_obj: symbol %s undefined".
//!
//! Stricter than the kernel: link_elf_reloc_local ignores a failed local relocation and
//! relocate_file skips an entry whose symbol index is out of range; both are errors here.
//! Per-CPU (`set_pcpu`) and VNET (`set_vnet`) sections, which the kernel moves to their own
//! areas, are refused, as are sections aligned beyond a page and GNU ifuncs.

use crate::elf::{ElfRel, Symbol};
use crate::error::LoadError;
use crate::kpi::{jump_trampoline, trap_trampoline, Import, KpiTable, TRAMPOLINE_SIZE};
use crate::mapping::{page_size, LowMapping};
use crate::reloc::{self, Site};
use object::elf;
use std::collections::BTreeMap;
use std::ffi::CString;

/// A loaded section (an entry of link_elf_obj's `progtab`).
#[derive(Clone, Debug)]
pub struct Placed {
    pub index: usize,
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub flags: u64,
}

/// An undefined symbol the KPI table resolved.
#[derive(Clone, Debug)]
pub struct ResolvedImport {
    pub name: String,
    pub kind: &'static str,
    pub addr: u64,
}

pub struct LoadedKo {
    pub(crate) map: LowMapping,
    pub elf: ElfRel,
    pub progtab: Vec<Placed>,
    /// The module's own part of the mapping starts at the mapping and is this long; the import
    /// area (trampolines, data objects) follows it.
    pub module_size: u64,
    /// Each symbol's address after loading; `None` when it has none.
    pub symvals: Vec<Option<u64>>,
    pub imports: Vec<ResolvedImport>,
    /// Relocations applied, by type name.
    pub reloc_counts: BTreeMap<String, usize>,
    /// NUL-terminated import names the trap trampolines point to.
    _trap_names: Vec<CString>,
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

enum LinkSetEnd {
    Start(usize),
    Stop(usize),
}

/// Which loaded section a `__start_<sec>`/`__stop_<sec>` symbol names, if any.
fn link_set_symbol(sym: &Symbol, elf: &ElfRel) -> Option<LinkSetEnd> {
    if sym.shndx != elf::SHN_UNDEF.0 {
        return None;
    }
    let (rest, start) = if let Some(r) = sym.name.strip_prefix("__start_") {
        (r, true)
    } else if let Some(r) = sym.name.strip_prefix("__stop_") {
        (r, false)
    } else {
        return None;
    };
    let sec = elf.sections.iter().find(|s| s.is_loaded() && s.name == rest)?;
    Some(if start { LinkSetEnd::Start(sec.index) } else { LinkSetEnd::Stop(sec.index) })
}

pub fn load(data: &[u8], kpi: &KpiTable) -> Result<LoadedKo, LoadError> {
    let elf = ElfRel::parse(data)?;

    // 1. Layout.
    let mut offsets: BTreeMap<usize, u64> = BTreeMap::new();
    let mut size = 0u64;
    for s in elf.sections.iter().filter(|s| s.is_loaded()) {
        let align = s.addralign.max(1);
        if !align.is_power_of_two() {
            return Err(LoadError::Format(format!("section {}: alignment {align} is not a power of two", s.name)));
        }
        if align > page_size() as u64 {
            return Err(LoadError::Bad(format!("section {}: alignment {align} above the page size is not supported", s.name)));
        }
        if s.name == "set_pcpu" || s.name == "set_vnet" {
            return Err(LoadError::Bad(format!("section {}: per-CPU and VNET data are not emulated", s.name)));
        }
        size = align_up(size, align);
        offsets.insert(s.index, size);
        size += s.size;
    }
    let module_size = size;

    // 3 (first half). Link sets and imports, resolved by name before anything is mapped so an
    // undefined symbol is reported without touching memory. Relocation order, so the first
    // missing name is the one relocate_file would report.
    let mut imports: Vec<(String, Import)> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    for tab in elf.reltabs_in_order() {
        for r in &tab.entries {
            let Some(sym) = elf.symbols.get(r.sym as usize) else {
                return Err(LoadError::Bad(format!("{}: relocation symbol index {} out of range", tab.name, r.sym)));
            };
            if r.sym == 0 || sym.is_local() || sym.shndx != elf::SHN_UNDEF.0 || link_set_symbol(sym, &elf).is_some() {
                continue;
            }
            if imports.iter().any(|(n, _)| *n == sym.name) || missing.contains(&sym.name) {
                continue;
            }
            match kpi.get(&sym.name) {
                Some(i) => imports.push((sym.name.clone(), i.clone())),
                None if sym.bind == elf::STB_WEAK.0 => {}
                None => missing.push(sym.name.clone()),
            }
        }
    }
    if !missing.is_empty() {
        return Err(LoadError::Undefined { symbols: missing });
    }

    // Import area layout.
    let area = align_up(module_size, 64);
    let mut cursor = area;
    let mut import_offsets = Vec::with_capacity(imports.len());
    for (_, i) in &imports {
        match i {
            Import::Function(_) | Import::Unemulated => {
                import_offsets.push(Some(cursor));
                cursor += TRAMPOLINE_SIZE as u64;
            }
            Import::Data { bytes, align } => {
                cursor = align_up(cursor, (*align).max(1) as u64);
                import_offsets.push(Some(cursor));
                cursor += bytes.len().max(1) as u64;
            }
            Import::HostData(_) => import_offsets.push(None),
        }
    }

    // 2. Map and copy.
    let mut map = LowMapping::new(cursor as usize)?;
    let base = map.addr();
    let mut progtab = Vec::new();
    for s in elf.sections.iter().filter(|s| s.is_loaded()) {
        let off = offsets[&s.index];
        if s.sh_type != elf::SHT_NOBITS.0 {
            map.bytes_mut()[off as usize..off as usize + s.data.len()].copy_from_slice(&s.data);
        }
        progtab.push(Placed { index: s.index, name: s.name.clone(), addr: base + off, size: s.size, flags: s.flags });
    }
    let mut trap_names = Vec::new();
    let mut resolved = Vec::new();
    let mut import_addr: BTreeMap<&str, u64> = BTreeMap::new();
    for ((name, i), off) in imports.iter().zip(&import_offsets) {
        let addr = match (i, off) {
            (Import::Function(f), Some(off)) => {
                let at = *off as usize;
                map.bytes_mut()[at..at + TRAMPOLINE_SIZE].copy_from_slice(&jump_trampoline(*f as u64));
                base + off
            }
            (Import::Unemulated, Some(off)) => {
                let c = CString::new(name.as_str()).map_err(|_| LoadError::Bad(format!("import name {name:?} has a NUL")))?;
                let at = *off as usize;
                map.bytes_mut()[at..at + TRAMPOLINE_SIZE].copy_from_slice(&trap_trampoline(c.as_ptr()));
                trap_names.push(c);
                base + off
            }
            (Import::Data { bytes, .. }, Some(off)) => {
                let at = *off as usize;
                map.bytes_mut()[at..at + bytes.len()].copy_from_slice(bytes);
                base + off
            }
            (Import::HostData(a), _) => *a,
            (_, None) => unreachable!("every import but host data has a slot"),
        };
        import_addr.insert(name.as_str(), addr);
        resolved.push(ResolvedImport { name: name.clone(), kind: i.kind(), addr });
    }

    // Symbol values.
    let section_addr = |idx: usize| offsets.get(&idx).map(|o| base + o);
    let mut symvals = Vec::with_capacity(elf.symbols.len());
    for (i, sym) in elf.symbols.iter().enumerate() {
        let v = if i == 0 {
            None
        } else if sym.shndx == elf::SHN_UNDEF.0 {
            match link_set_symbol(sym, &elf) {
                Some(LinkSetEnd::Start(sec)) => section_addr(sec),
                Some(LinkSetEnd::Stop(sec)) => {
                    section_addr(sec).map(|a| a + elf.sections[sec].size)
                }
                None if sym.is_local() => None,
                None => Some(import_addr.get(sym.name.as_str()).copied().unwrap_or(0)), // weak, not found: 0
            }
        } else if sym.shndx == elf::SHN_ABS.0 {
            Some(sym.value)
        } else if sym.shndx == elf::SHN_COMMON.0 || sym.kind == elf::STT_GNU_IFUNC.0 {
            None
        } else {
            section_addr(sym.shndx as usize).map(|a| a + sym.value)
        };
        symvals.push(v);
    }

    // 4 and 5. Local relocations, then the others.
    let mut reloc_counts: BTreeMap<String, usize> = BTreeMap::new();
    for local_pass in [true, false] {
        for tab in elf.reltabs_in_order() {
            let sec = &elf.sections[tab.target];
            let Some(sec_base) = section_addr(tab.target) else {
                if tab.entries.is_empty() {
                    continue;
                }
                return Err(LoadError::Format(format!("lost base for relatab {}", tab.name)));
            };
            for r in &tab.entries {
                let sym = &elf.symbols[r.sym as usize];
                if sym.is_local() != local_pass {
                    continue;
                }
                let symbol = if sym.name.is_empty() { "(section)" } else { sym.name.as_str() };
                let p = sec_base.wrapping_add(r.offset);
                let site = Site {
                    r_type: r.r_type,
                    s: symvals[r.sym as usize],
                    addend: r.addend,
                    p,
                    section_base: sec_base,
                    room: sec.size.saturating_sub(r.offset),
                    place: format!("{}+{:#x}", sec.name, r.offset),
                    symbol,
                };
                if sym.kind == elf::STT_GNU_IFUNC.0 {
                    return Err(LoadError::UnsupportedReloc {
                        r_type: r.r_type,
                        type_name: "against a GNU ifunc: kldhost runs no module code while relocating".into(),
                        place: site.place.clone(),
                        symbol: symbol.to_string(),
                    });
                }
                if r.offset >= sec.size {
                    return Err(LoadError::Bad(format!("{}: offset past the end of {}", site.place, sec.name)));
                }
                let at = (p - base) as usize;
                reloc::apply(&site, &mut map.bytes_mut()[at..])?;
                *reloc_counts.entry(reloc::type_name(r.r_type)).or_default() += 1;
            }
        }
    }
    map.make_executable()?;
    Ok(LoadedKo { map, elf, progtab, module_size, symvals, imports: resolved, reloc_counts, _trap_names: trap_names })
}
