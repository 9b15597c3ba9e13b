//! The ELF relocatable object (`ld -r` output) read into plain tables, with the header and
//! section-table checks link_elf_load_file (sys/kern/link_elf_obj.c) makes before it maps
//! anything.

use crate::error::LoadError;
use object::elf;
use object::read::elf::{FileHeader, Rel as _, Rela as _, SectionHeader as _, Sym as _};
use object::LittleEndian as LE;

pub struct Section {
    pub index: usize,
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    pub addralign: u64,
    pub size: u64,
    /// The file bytes; empty for `SHT_NOBITS`.
    pub data: Vec<u8>,
}

impl Section {
    /// What link_elf_load_file maps: non-empty PROGBITS, NOBITS and (amd64) X86_64_UNWIND
    /// sections with SHF_ALLOC, in section-table order.
    pub fn is_loaded(&self) -> bool {
        self.size != 0
            && (self.sh_type == elf::SHT_PROGBITS.0
                || self.sh_type == elf::SHT_NOBITS.0
                || self.sh_type == elf::SHT_X86_64_UNWIND.0)
            && self.flags & elf::SHF_ALLOC.0 != 0
    }
}

pub struct Symbol {
    pub name: String,
    pub value: u64,
    pub shndx: u16,
    pub bind: u8,
    pub kind: u8,
}

impl Symbol {
    pub fn is_local(&self) -> bool {
        self.bind == elf::STB_LOCAL.0
    }
}

pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    pub sym: u32,
    /// `r_addend` of an `SHT_RELA` entry; `None` for `SHT_REL` (the addend is in the place).
    pub addend: Option<i64>,
}

pub struct RelocTable {
    pub name: String,
    /// The section the entries patch (`sh_info`).
    pub target: usize,
    /// `SHT_RELA` (else `SHT_REL`): relocate_file does every REL table before any RELA one.
    pub rela: bool,
    pub entries: Vec<Reloc>,
}

impl ElfRel {
    /// The relocation tables in the order relocate_file walks them: REL, then RELA.
    pub fn reltabs_in_order(&self) -> impl Iterator<Item = &RelocTable> {
        self.reltabs.iter().filter(|t| !t.rela).chain(self.reltabs.iter().filter(|t| t.rela))
    }
}

pub struct ElfRel {
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
    pub reltabs: Vec<RelocTable>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fmt_err(m: &str) -> LoadError {
    LoadError::Format(m.to_string())
}

impl ElfRel {
    pub fn parse(data: &[u8]) -> Result<ElfRel, LoadError> {
        // e_ident: magic, then EI_CLASS (4), EI_DATA (5), EI_VERSION (6).
        if data.len() < 64 || data[..4] != elf::ELFMAG {
            return Err(fmt_err("not an ELF file"));
        }
        // The order of link_elf_load_file's checks, with its messages.
        if data[4] != elf::ELFCLASS64.0 || data[5] != elf::ELFDATA2LSB.0 {
            return Err(fmt_err("Unsupported file layout"));
        }
        let e = LE;
        let fh = elf::FileHeader64::<LE>::parse(data).map_err(|err| LoadError::Format(format!("ELF header: {err}")))?;
        if data[6] != elf::EV_CURRENT.0 || fh.e_version(e) != u32::from(elf::EV_CURRENT.0) {
            return Err(fmt_err("Unsupported file version"));
        }
        if fh.e_type(e) != elf::ET_REL {
            // The kernel returns ENOSYS here so that link_elf.c can try the file as a shared
            // object; a kld built by kmod.mk is always ET_REL.
            return Err(fmt_err("not an ELF relocatable object (ET_REL): link_elf_obj does not load it"));
        }
        if fh.e_machine(e) != elf::EM_X86_64 {
            return Err(fmt_err("Unsupported machine"));
        }
        let table = fh.sections(e, data).map_err(|err| LoadError::Format(format!("section table: {err}")))?;

        let mut sections = Vec::new();
        let mut nsym = 0;
        for (index, sh) in table.enumerate() {
            let name = table.section_name(e, sh).map(text).unwrap_or_default();
            let sh_type = sh.sh_type(e).0;
            if sh_type == elf::SHT_SYMTAB.0 {
                nsym += 1;
            }
            let bytes = if sh_type == elf::SHT_NOBITS.0 {
                Vec::new()
            } else {
                sh.data(e, data).map_err(|err| LoadError::Format(format!("section {name}: {err}")))?.to_vec()
            };
            sections.push(Section {
                index: index.0,
                name,
                sh_type,
                flags: sh.sh_flags(e).0,
                addralign: sh.sh_addralign(e),
                size: sh.sh_size(e),
                data: bytes,
            });
        }
        if !sections.iter().any(Section::is_loaded) {
            return Err(fmt_err("file has no contents"));
        }
        if nsym != 1 {
            return Err(fmt_err("file must have exactly one symbol table"));
        }

        let symtab = table
            .symbols(e, data, elf::SHT_SYMTAB)
            .map_err(|err| LoadError::Format(format!("file has invalid symbol strings: {err}")))?;
        let mut symbols = Vec::new();
        for sym in symtab.symbols().iter() {
            let shndx = sym.st_shndx(e).0;
            if shndx == elf::SHN_XINDEX.0 {
                return Err(fmt_err("extended section indices (SHN_XINDEX) are not supported"));
            }
            symbols.push(Symbol {
                name: symtab.symbol_name(e, sym).map(text).unwrap_or_default(),
                value: sym.st_value(e),
                shndx,
                bind: sym.st_bind().0,
                kind: sym.st_type().0,
            });
        }

        let mut reltabs = Vec::new();
        for (index, sh) in table.enumerate() {
            let name = sections[index.0].name.clone();
            let target = sh.sh_info(e) as usize;
            let mut entries = Vec::new();
            let rela = sh.sh_type(e) == elf::SHT_RELA;
            if let Some((rela, _)) = sh.rela(e, data).map_err(|err| LoadError::Format(format!("{name}: {err}")))? {
                for r in rela {
                    entries.push(Reloc {
                        offset: r.r_offset(e),
                        r_type: r.r_type(e, false).0,
                        sym: r.r_sym(e, false),
                        addend: Some(r.r_addend(e)),
                    });
                }
            } else if let Some((rel, _)) = sh.rel(e, data).map_err(|err| LoadError::Format(format!("{name}: {err}")))? {
                for r in rel {
                    entries.push(Reloc { offset: r.r_offset(e), r_type: r.r_type(e).0, sym: r.r_sym(e), addend: None });
                }
            } else {
                continue;
            }
            let Some(t) = sections.get(target) else {
                return Err(LoadError::Format(format!("{name}: sh_info {target} is not a section")));
            };
            // link_elf_load_file ignores relocation tables of sections it does not load.
            if t.flags & elf::SHF_ALLOC.0 == 0 {
                continue;
            }
            reltabs.push(RelocTable { name, target, rela, entries });
        }
        Ok(ElfRel { sections, symbols, reltabs })
    }
}
