//! No exported symbols. kmod.mk links with `EXPORT_SYMS=NO` by default: every symbol the
//! module defines is made local, because the kernel linker puts a module's globals into the
//! namespace every later module is resolved against. A global `memcpy` or `rust_begin_unwind`
//! from one module would silently become another module's `memcpy`.

use crate::ko::Ko;
use crate::report::Verdict;
use object::elf;

pub const RULE: &str = "no-exports";

pub fn check(ko: &Ko, allowed: &[String]) -> Verdict {
    let defined = ko.symbols.iter().filter(|s| s.section.is_some() && !s.undefined).count();
    let findings: Vec<String> = ko
        .symbols
        .iter()
        .filter(|s| s.section.is_some() && s.bind != elf::STB_LOCAL.0 && !allowed.contains(&s.name))
        .map(|s| {
            let how = if s.bind == elf::STB_WEAK.0 { "weak" } else { "global" };
            format!("{how} definition {} ({})", s.name, ko.describe(s.section.unwrap_or(0), s.value))
        })
        .collect();
    let ok = format!("{defined} defined symbols, all local (EXPORT_SYMS=NO)");
    Verdict::from_findings(RULE, ok, "symbols exported to other modules", findings)
}
