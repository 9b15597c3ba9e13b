//! Sections a kld must not carry. The kernel linker has no notion of user-space constructors
//! (`.init_array`, `.ctors`), thread-local storage (`.tbss`, `.tdata`), a GOT or PLT, and
//! `.eh_frame` is dead weight (the kernel never unwinds): their presence means the object was
//! built with user-space assumptions.

use crate::ko::Ko;
use crate::report::Verdict;
use object::elf;

pub const RULE: &str = "forbidden-sections";

pub const FORBIDDEN: [&str; 10] = [
    ".init_array", ".fini_array", ".ctors", ".dtors", ".tbss", ".tdata", ".got", ".got.plt", ".plt", ".eh_frame",
];

/// `.init_array.100`, `.rela.init_array` and the like count as the section they belong to.
fn forbidden_name(name: &str) -> Option<&'static str> {
    let base = name.strip_prefix(".rela").or_else(|| name.strip_prefix(".rel")).unwrap_or(name);
    FORBIDDEN
        .iter()
        .copied()
        .filter(|f| base == *f || base.strip_prefix(f).is_some_and(|rest| rest.starts_with('.')))
        .max_by_key(|f| f.len())
}

pub fn check(ko: &Ko) -> Verdict {
    let mut findings = Vec::new();
    for s in &ko.sections {
        let by_type = [elf::SHT_INIT_ARRAY.0, elf::SHT_FINI_ARRAY.0, elf::SHT_PREINIT_ARRAY.0].contains(&s.sh_type);
        let tls = s.flags & elf::SHF_TLS.0 != 0;
        if let Some(f) = forbidden_name(&s.name) {
            findings.push(format!("section {} ({f})", s.name));
        } else if by_type {
            findings.push(format!("section {} has a constructor/destructor array type", s.name));
        } else if tls {
            findings.push(format!("section {} is thread-local (SHF_TLS)", s.name));
        }
    }
    let ok = format!("{} sections, none of {}", ko.sections.len(), FORBIDDEN.join(" "));
    Verdict::from_findings(RULE, ok, "forbidden sections", findings)
}

#[cfg(test)]
mod tests {
    use super::forbidden_name;

    #[test]
    fn names_match_whole_components() {
        assert_eq!(forbidden_name(".init_array.65535"), Some(".init_array"));
        assert_eq!(forbidden_name(".rela.eh_frame"), Some(".eh_frame"));
        assert_eq!(forbidden_name(".got"), Some(".got"));
        assert_eq!(forbidden_name(".got.plt"), Some(".got.plt"));
        assert_eq!(forbidden_name(".gotcha"), None);
        assert_eq!(forbidden_name(".text"), None);
        assert_eq!(forbidden_name(".rela.text"), None);
    }
}
