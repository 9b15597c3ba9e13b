//! Following pointers inside a relocatable object.
//!
//! In an `ET_REL` file a stored pointer is not a value: the bytes are (usually) zero and an
//! `R_X86_64_64` relocation says "symbol + addend". Resolving a pointer therefore means finding
//! the relocation at that exact place and turning symbol + addend into section + offset.

use crate::ko::Ko;
use object::elf;

/// Where a stored pointer points.
pub enum Pointee<'a> {
    /// No relocation and zero bytes: a NULL pointer.
    Null,
    /// Into a section of this file.
    Defined { section: usize, offset: u64 },
    /// To a symbol the kernel must provide (the addend is not interesting here).
    Undefined(&'a str),
}

pub fn read_bytes(ko: &Ko, section: usize, offset: u64, len: usize) -> Result<&[u8], String> {
    let sec = ko.sections.get(section).ok_or_else(|| format!("section index {section} out of range"))?;
    let start = usize::try_from(offset).map_err(|_| "offset overflow".to_string())?;
    sec.data
        .get(start..start.saturating_add(len))
        .ok_or_else(|| format!("{}+{offset:#x}: {len} bytes past the end of the section data", sec.name))
}

pub fn read_i32(ko: &Ko, section: usize, offset: u64) -> Result<i32, String> {
    let b = read_bytes(ko, section, offset, 4)?;
    Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_u64(ko: &Ko, section: usize, offset: u64) -> Result<u64, String> {
    let b = read_bytes(ko, section, offset, 8)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// A NUL-terminated string (C `const char *`) starting at `offset`.
pub fn read_cstr(ko: &Ko, section: usize, offset: u64) -> Result<String, String> {
    let sec = ko.sections.get(section).ok_or_else(|| format!("section index {section} out of range"))?;
    let rest = usize::try_from(offset).ok().and_then(|o| sec.data.get(o..)).unwrap_or(&[]);
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| format!("{}+{offset:#x}: string not NUL-terminated", sec.name))?;
    String::from_utf8(rest[..end].to_vec()).map_err(|_| format!("{}+{offset:#x}: string not UTF-8", sec.name))
}

/// Resolves the 8-byte pointer stored at `section+offset`.
pub fn pointer_at(ko: &Ko, section: usize, offset: u64) -> Result<Pointee<'_>, String> {
    let stored = read_u64(ko, section, offset)?;
    let Some(rel) = ko.reloc_at(section, offset) else {
        return if stored == 0 {
            Ok(Pointee::Null)
        } else {
            Err(format!("{}: pointer {stored:#x} has no relocation", ko.describe(section, offset)))
        };
    };
    if rel.r_type != elf::R_X86_64_64.0 {
        return Err(format!(
            "{}: pointer relocated by type {} (expected R_X86_64_64)",
            ko.describe(section, offset),
            crate::rules::relocations::type_name(rel.r_type)
        ));
    }
    // SHT_REL keeps the addend in the patched bytes; SHT_RELA ignores them.
    let addend = rel.addend.unwrap_or(stored as i64);
    let sym = ko
        .symbols
        .get(rel.symbol)
        .ok_or_else(|| format!("{}: relocation symbol {} out of range", ko.describe(section, offset), rel.symbol))?;
    if sym.undefined {
        return Ok(Pointee::Undefined(&sym.name));
    }
    let target = sym
        .section
        .ok_or_else(|| format!("{}: pointer to absolute/common symbol {}", ko.describe(section, offset), sym.name))?;
    let off = (sym.value as i64).checked_add(addend).filter(|o| *o >= 0).ok_or_else(|| {
        format!("{}: {}{addend:+} lies before its section", ko.describe(section, offset), sym.name)
    })?;
    Ok(Pointee::Defined { section: target, offset: off as u64 })
}

/// The entries of a FreeBSD linker set (`set_<name>` section: an array of pointers), or
/// `None` when the file has no such section. Every entry must resolve into this file.
pub fn linker_set(ko: &Ko, set: &str) -> Option<Result<Vec<(usize, u64)>, String>> {
    let secs: Vec<_> = ko.sections_named(set).collect();
    if secs.is_empty() {
        return None;
    }
    let mut entries = Vec::new();
    for sec in secs {
        if sec.size % 8 != 0 {
            return Some(Err(format!("{set}: size {} is not a multiple of 8", sec.size)));
        }
        for slot in (0..sec.size).step_by(8) {
            match pointer_at(ko, sec.index, slot) {
                Ok(Pointee::Defined { section, offset }) => entries.push((section, offset)),
                Ok(Pointee::Null) => return Some(Err(format!("{set}+{slot:#x}: NULL entry"))),
                Ok(Pointee::Undefined(name)) => {
                    return Some(Err(format!("{set}+{slot:#x}: entry points outside the module ({name})")))
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
    Some(Ok(entries))
}
