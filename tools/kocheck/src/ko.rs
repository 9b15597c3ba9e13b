//! A `.ko` read once into plain tables (sections, symbols, relocations) so every rule works on
//! the same simple model instead of re-walking the ELF structures.
//!
//! A FreeBSD amd64 kld is an ELF *relocatable* object (`ld -r`): sections have no addresses,
//! symbol values are offsets inside their section, and every pointer stored in data is left
//! as a relocation for the kernel linker (`link_elf_obj.c`) to fill in at `kldload` time.

use object::elf;
use object::read::elf::{FileHeader, Rel as _, Rela as _, SectionHeader as _, Sym as _};
use object::{LittleEndian as LE, SymbolIndex};

/// One section header and, unless it is `SHT_NOBITS`, its bytes.
pub struct Section {
    pub index: usize,
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    pub size: u64,
    pub data: Vec<u8>,
}

impl Section {
    pub fn is_exec(&self) -> bool {
        self.flags & elf::SHF_EXECINSTR.0 != 0
    }
}

/// One symbol table entry. `section` is `None` for undefined, absolute and common symbols.
pub struct Symbol {
    pub name: String,
    pub section: Option<usize>,
    pub undefined: bool,
    pub value: u64,
    pub kind: u8,
    pub bind: u8,
}

/// One relocation entry, from an `SHT_RELA` or `SHT_REL` section.
pub struct Reloc {
    /// Section the relocation patches (`sh_info` of its relocation section).
    pub target: usize,
    /// Name of the relocation section it came from, for messages.
    pub from: String,
    pub offset: u64,
    pub r_type: u32,
    pub symbol: usize,
    /// `r_addend`; for `SHT_REL` the addend stored at the patched place (read on demand).
    pub addend: Option<i64>,
}

/// The identification and type fields of the ELF header.
pub struct Header {
    pub class64: bool,
    pub little_endian: bool,
    pub os_abi: u8,
    pub e_type: u16,
    pub machine: u16,
}

pub struct Ko {
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
    pub relocs: Vec<Reloc>,
    /// Relocation sections of a format the kernel linker does not read (CREL, RELR, Android).
    pub foreign_reloc_sections: Vec<String>,
}

/// Reads the fixed part of `e_ident` even when the rest is not ELF64 little-endian, so the
/// header rule can say *what* the file is instead of only "cannot parse".
pub fn sniff_header(data: &[u8]) -> Result<Header, String> {
    if data.len() < 20 || data[..4] != elf::ELFMAG {
        return Err("not an ELF file (bad magic)".into());
    }
    let little_endian = data[5] == elf::ELFDATA2LSB.0;
    let rd16 = |o: usize| {
        let b = [data[o], data[o + 1]];
        if little_endian { u16::from_le_bytes(b) } else { u16::from_be_bytes(b) }
    };
    Ok(Header {
        class64: data[4] == elf::ELFCLASS64.0,
        little_endian,
        os_abi: data[7],
        e_type: rd16(16),
        machine: rd16(18),
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Ko {
    /// Parses an ELF64 little-endian object. Anything else is an error: the header rule has
    /// already explained why.
    pub fn parse(data: &[u8]) -> Result<Ko, String> {
        let header = sniff_header(data)?;
        if !header.class64 || !header.little_endian {
            return Err("not ELF64 little-endian".into());
        }
        let e = LE;
        let fh = elf::FileHeader64::<LE>::parse(data).map_err(|err| format!("ELF header: {err}"))?;
        let table = fh.sections(e, data).map_err(|err| format!("section table: {err}"))?;

        let mut sections = Vec::new();
        for (index, sh) in table.enumerate() {
            let name = table.section_name(e, sh).map(text).unwrap_or_default();
            let sh_type = sh.sh_type(e).0;
            let bytes = if sh_type == elf::SHT_NOBITS.0 {
                Vec::new()
            } else {
                sh.data(e, data).map_err(|err| format!("section {name}: {err}"))?.to_vec()
            };
            sections.push(Section {
                index: index.0,
                name,
                sh_type,
                flags: sh.sh_flags(e).0,
                size: sh.sh_size(e),
                data: bytes,
            });
        }

        let symtab = table
            .symbols(e, data, elf::SHT_SYMTAB)
            .map_err(|err| format!("symbol table: {err}"))?;
        let mut symbols = Vec::new();
        for (i, sym) in symtab.symbols().iter().enumerate() {
            let section = symtab
                .symbol_section(e, sym, SymbolIndex(i))
                .map_err(|err| format!("symbol {i}: {err}"))?
                .map(|s| s.0);
            symbols.push(Symbol {
                name: symtab.symbol_name(e, sym).map(text).unwrap_or_default(),
                section,
                undefined: i != 0 && sym.st_shndx(e) == elf::SHN_UNDEF,
                value: sym.st_value(e),
                kind: sym.st_type().0,
                bind: sym.st_bind().0,
            });
        }

        let mut relocs = Vec::new();
        let mut foreign_reloc_sections = Vec::new();
        for (index, sh) in table.enumerate() {
            let from = sections[index.0].name.clone();
            let target = sh.sh_info(e) as usize;
            if let Some((rela, _)) = sh.rela(e, data).map_err(|err| format!("{from}: {err}"))? {
                for r in rela {
                    relocs.push(Reloc {
                        target,
                        from: from.clone(),
                        offset: r.r_offset(e),
                        r_type: r.r_type(e, false).0,
                        symbol: r.r_sym(e, false) as usize,
                        addend: Some(r.r_addend(e)),
                    });
                }
            } else if let Some((rel, _)) = sh.rel(e, data).map_err(|err| format!("{from}: {err}"))? {
                for r in rel {
                    relocs.push(Reloc {
                        target,
                        from: from.clone(),
                        offset: r.r_offset(e),
                        r_type: r.r_type(e).0,
                        symbol: r.r_sym(e) as usize,
                        addend: None,
                    });
                }
            } else if is_foreign_reloc_type(sh.sh_type(e)) {
                foreign_reloc_sections.push(from);
            }
        }

        Ok(Ko { sections, symbols, relocs, foreign_reloc_sections })
    }

    pub fn sections_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Section> + 'a {
        self.sections.iter().filter(move |s| s.name == name)
    }

    /// The relocation that patches `section` at exactly `offset`, if any.
    pub fn reloc_at(&self, section: usize, offset: u64) -> Option<&Reloc> {
        self.relocs.iter().find(|r| r.target == section && r.offset == offset)
    }

    /// `section+0xoff <symbol+0xdelta>` for messages: the nearest defined function or object
    /// symbol at or before `offset` in `section`.
    pub fn describe(&self, section: usize, offset: u64) -> String {
        let sec_name = self.sections.get(section).map_or("?", |s| s.name.as_str());
        let best = self
            .symbols
            .iter()
            .filter(|s| {
                s.section == Some(section)
                    && s.value <= offset
                    && !s.name.is_empty()
                    && (s.kind == elf::STT_FUNC.0 || s.kind == elf::STT_OBJECT.0 || s.kind == elf::STT_NOTYPE.0)
            })
            .max_by_key(|s| s.value);
        match best {
            Some(s) => format!("{sec_name}+{offset:#x} <{}+{:#x}>", s.name, offset - s.value),
            None => format!("{sec_name}+{offset:#x}"),
        }
    }
}

fn is_foreign_reloc_type(t: elf::SectionType) -> bool {
    t == elf::SHT_CREL || t == elf::SHT_RELR || t == elf::SHT_ANDROID_REL || t == elf::SHT_ANDROID_RELA
        || t == elf::SHT_ANDROID_RELR
}
