//! One relocation, applied as sys/amd64/amd64/elf_machdep.c elf_reloc_internal does (read at
//! freebsd-src commit e6f528b2, the version that handles R_X86_64_PLT32).
//!
//! Types and formulas (S = symbol value, A = addend, P = the patched place, B = the base of
//! the patched section, which link_elf_obj passes as `relocbase`):
//! - `R_X86_64_NONE`: nothing.
//! - `R_X86_64_64`: S + A, 64 bits.
//! - `R_X86_64_PC32`, `R_X86_64_PLT32`: S + A - P, 32 bits (the kernel has no PLT: "L ... which
//!   we treat as S").
//! - `R_X86_64_32S`: S + A, 32 bits, sign-extended by the CPU.
//! - `R_X86_64_GLOB_DAT`, `R_X86_64_JUMP_SLOT`: S, 64 bits (the addend is ignored).
//! - `R_X86_64_RELATIVE`: B + A, 64 bits.
//! - `R_X86_64_COPY`: refused ("kldload: unexpected R_COPY relocation").
//! - anything else, `R_X86_64_32` included: refused ("kldload: unexpected relocation type %ld").
//!
//! For `SHT_REL` tables the addend is read from the place: 32 bits for PC32, 32S and PLT32,
//! 64 bits otherwise. The kernel reads the 32 bits zero-extended (`*(Elf32_Addr *)where`) and
//! truncates the result to 32 bits, which equals the sign-extended reading modulo 2^32; this
//! reads them sign-extended, the addend the assembler meant (`call` stores -4), so the overflow
//! check below sees the true value.
//!
//! Two deliberate differences, both stricter: elf_reloc_internal truncates a 32-bit value
//! (`val32 = (Elf32_Addr)...`), which is harmless in the kernel because modules and the kernel
//! share the top 2 GiB; here a value that does not fit is an error, since it would mean the
//! module or an import was placed where the code model cannot reach it. And
//! `R_X86_64_IRELATIVE` (which would run module code while relocating) is refused.

use crate::error::LoadError;
use object::elf;

pub fn type_name(r_type: u32) -> String {
    elf::machine_names(elf::EM_X86_64)
        .r
        .name(elf::RelocationType(r_type))
        .map_or_else(|| format!("type {r_type}"), str::to_string)
}

/// Everything one relocation needs, resolved by the caller.
pub struct Site<'a> {
    pub r_type: u32,
    /// Symbol value; `None` if the symbol has no address (resolved lazily: only types that
    /// look the symbol up fail on it).
    pub s: Option<u64>,
    pub addend: Option<i64>,
    /// Address of the patched place and of its section.
    pub p: u64,
    pub section_base: u64,
    /// Room left in the section from the place on.
    pub room: u64,
    /// For messages.
    pub place: String,
    pub symbol: &'a str,
}

/// Bytes a relocation type writes, or `None` when elf_reloc_internal (or kldhost) refuses it.
fn width(r_type: u32) -> Option<usize> {
    match r_type {
        t if t == elf::R_X86_64_NONE.0 => Some(0),
        t if t == elf::R_X86_64_64.0
            || t == elf::R_X86_64_GLOB_DAT.0
            || t == elf::R_X86_64_JUMP_SLOT.0
            || t == elf::R_X86_64_RELATIVE.0 =>
        {
            Some(8)
        }
        t if t == elf::R_X86_64_PC32.0 || t == elf::R_X86_64_PLT32.0 || t == elf::R_X86_64_32S.0 => Some(4),
        _ => None,
    }
}

/// Applies one relocation to `place`, the mapping's bytes starting at `site.p`.
pub fn apply(site: &Site<'_>, place: &mut [u8]) -> Result<(), LoadError> {
    let t = site.r_type;
    let Some(w) = width(t) else {
        let type_name = if t == elf::R_X86_64_COPY.0 {
            "R_X86_64_COPY: there are no copy relocations in kernel objects".to_string()
        } else if t == elf::R_X86_64_IRELATIVE.0 {
            "R_X86_64_IRELATIVE: kldhost runs no module code while relocating".to_string()
        } else {
            type_name(t)
        };
        return Err(LoadError::UnsupportedReloc {
            r_type: t,
            type_name,
            place: site.place.clone(),
            symbol: site.symbol.to_string(),
        });
    };
    if (w as u64) > site.room || place.len() < w {
        return Err(LoadError::Bad(format!("{}: {} bytes past the end of the section", site.place, w)));
    }
    if w == 0 {
        return Ok(());
    }
    let addend: i128 = match site.addend {
        Some(a) => a.into(),
        None if w == 4 => i32::from_le_bytes(place[..4].try_into().expect("4 bytes")).into(),
        None => u64::from_le_bytes(place[..8].try_into().expect("8 bytes")).into(),
    };
    let sym = || {
        site.s.map(i128::from).ok_or_else(|| {
            LoadError::Bad(format!("{}: symbol {} has no address (undefined local, common, or in a section that is not loaded)", site.place, site.symbol))
        })
    };
    let value: i128 = if t == elf::R_X86_64_64.0 {
        sym()? + addend
    } else if t == elf::R_X86_64_PC32.0 || t == elf::R_X86_64_PLT32.0 {
        sym()? + addend - i128::from(site.p)
    } else if t == elf::R_X86_64_32S.0 {
        sym()? + addend
    } else if t == elf::R_X86_64_GLOB_DAT.0 || t == elf::R_X86_64_JUMP_SLOT.0 {
        sym()?
    } else {
        // R_X86_64_RELATIVE
        i128::from(site.section_base) + addend
    };
    if w == 4 {
        let v = i32::try_from(value).map_err(|_| LoadError::Overflow {
            type_name: type_name(t),
            place: site.place.clone(),
            symbol: site.symbol.to_string(),
            value,
        })?;
        place[..4].copy_from_slice(&v.to_le_bytes());
    } else {
        // 64-bit arithmetic wraps, as in the kernel.
        place[..8].copy_from_slice(&(value as u64).to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{apply, Site};
    use crate::error::LoadError;
    use object::elf;

    fn site(r_type: u32, s: u64, addend: Option<i64>, p: u64) -> Site<'static> {
        Site { r_type, s: Some(s), addend, p, section_base: 0x4000_0000, room: 8, place: ".text+0x10".into(), symbol: "sym" }
    }

    fn field32(b: &[u8]) -> i32 {
        i32::from_le_bytes(b[..4].try_into().unwrap())
    }

    #[test]
    fn pc32_is_s_plus_a_minus_p_for_rela_and_for_rel_with_the_addend_in_place() {
        let mut b = [0u8; 8];
        apply(&site(elf::R_X86_64_PC32.0, 0x4000_0000, Some(-4), 0x4000_1000), &mut b).unwrap();
        assert_eq!(field32(&b), -0x1004);
        // SHT_REL: the assembler left -4 in the field.
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&(-4i32).to_le_bytes());
        apply(&site(elf::R_X86_64_PLT32.0, 0x4000_0000, None, 0x4000_1000), &mut b).unwrap();
        assert_eq!(field32(&b), -0x1004);
    }

    #[test]
    fn r32s_must_fit_a_sign_extended_field() {
        let mut b = [0u8; 8];
        apply(&site(elf::R_X86_64_32S.0, 0x7fff_fff0, Some(0xf), 0), &mut b).unwrap();
        assert_eq!(field32(&b), 0x7fff_ffff);
        let e = apply(&site(elf::R_X86_64_32S.0, 0x7fff_fff0, Some(0x10), 0), &mut b).unwrap_err();
        assert!(matches!(e, LoadError::Overflow { value: 0x8000_0000, .. }), "{e:?}");
    }

    #[test]
    fn sixty_four_bit_types() {
        let mut b = [0u8; 8];
        apply(&site(elf::R_X86_64_64.0, 0x1000, Some(-0x10), 0), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xff0);
        apply(&site(elf::R_X86_64_GLOB_DAT.0, 0x1000, Some(0x55), 0), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1000, "GLOB_DAT ignores the addend");
        apply(&site(elf::R_X86_64_RELATIVE.0, 0, Some(0x20), 0), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x4000_0020, "RELATIVE is the section base plus the addend");
    }

    #[test]
    fn types_the_amd64_kernel_linker_does_not_apply_are_refused() {
        let mut b = [0u8; 8];
        for t in [elf::R_X86_64_32.0, elf::R_X86_64_COPY.0, elf::R_X86_64_GOTPCREL.0, elf::R_X86_64_IRELATIVE.0] {
            let e = apply(&site(t, 0x1000, Some(0), 0), &mut b).unwrap_err();
            assert!(matches!(e, LoadError::UnsupportedReloc { r_type, .. } if r_type == t), "{e:?}");
        }
        assert_eq!(b, [0u8; 8], "nothing written");
    }

    #[test]
    fn a_place_past_the_end_of_its_section_is_an_error() {
        let mut b = [0u8; 8];
        let mut s = site(elf::R_X86_64_64.0, 0x1000, Some(0), 0);
        s.room = 4;
        assert!(matches!(apply(&s, &mut b), Err(LoadError::Bad(_))));
    }
}
