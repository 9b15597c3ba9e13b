//! Load errors. Where FreeBSD's kernel linker prints a message for the same failure, the
//! `Display` text starts with that message (sys/kern/link_elf_obj.c, sys/amd64/amd64/elf_machdep.c)
//! so a reader can match a kldhost failure with what `kldload` would have printed.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The file is not an amd64 ELF relocatable object the kernel linker accepts
    /// (link_elf_load_file's header and section-table checks).
    Format(String),
    /// Undefined global symbols the KPI table does not provide, in relocation order: the first is
    /// the one relocate_file reports ("link_elf_obj: symbol %s undefined", ENOENT).
    Undefined { symbols: Vec<String> },
    /// A relocation type elf_reloc_internal does not apply ("kldload: unexpected relocation
    /// type %ld"), or one kldhost does not (R_X86_64_IRELATIVE, GNU ifuncs).
    UnsupportedReloc { r_type: u32, type_name: String, place: String, symbol: String },
    /// A 32-bit relocation whose value does not fit its field.
    Overflow { type_name: String, place: String, symbol: String, value: i128 },
    /// A relocation or symbol that points outside what was loaded.
    Bad(String),
    /// The low mapping could not be made.
    Map(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Format(m) => write!(f, "kldload: {m}"),
            LoadError::Undefined { symbols } => {
                write!(f, "link_elf_obj: symbol {} undefined", symbols.first().map_or("?", |s| s.as_str()))?;
                if symbols.len() > 1 {
                    write!(f, " (and {} more: {})", symbols.len() - 1, symbols[1..].join(", "))?;
                }
                Ok(())
            }
            LoadError::UnsupportedReloc { r_type, type_name, place, symbol } => write!(
                f,
                "kldload: unexpected relocation type {r_type} ({type_name}) at {place} against {symbol}"
            ),
            LoadError::Overflow { type_name, place, symbol, value } => write!(
                f,
                "kldhost: {type_name} at {place} against {symbol}: value {value:#x} does not fit its 32-bit field"
            ),
            LoadError::Bad(m) => write!(f, "kldhost: {m}"),
            LoadError::Map(m) => write!(f, "kldhost: cannot map the module: {m}"),
        }
    }
}

impl std::error::Error for LoadError {}
