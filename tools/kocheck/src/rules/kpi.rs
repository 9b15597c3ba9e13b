//! Undefined symbols must be kernel exports. The allowlist is not typed by hand: the kld build
//! writes every function and variable bindgen declared from the FreeBSD headers (and the
//! project's stand-in headers) to target/kld/kpi-symbols.txt. A name outside it is something
//! the compiler invented (`puts`, `bcmp`, `__udivti3`, ...) or a typo the kernel linker would
//! only report at `kldload` time.
//!
//! One family is resolved by the kernel linker itself, not from kernel exports:
//! `__start_X`/`__stop_X` bound the module's own section `X` (link_elf_obj.c,
//! `link_elf_fix_link_set`), the way `SET_FOREACH` walks a linker set. They are accepted only
//! when section `X` exists, otherwise the kernel would resolve them to garbage or fail.

use crate::ko::Ko;
use crate::report::Verdict;
use std::collections::BTreeSet;
use std::path::Path;

pub const RULE: &str = "kpi-symbols";

/// One name per line; blank lines and `#` comments ignored.
pub fn read_allowlist(path: &Path) -> Result<BTreeSet<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e} (written by scripts/build-kld.sh)", path.display()))?;
    let names: BTreeSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(names)
}

pub fn check(ko: &Ko, kpi: Option<&Path>) -> Verdict {
    let undefined: BTreeSet<&str> =
        ko.symbols.iter().filter(|s| s.undefined && !s.name.is_empty()).map(|s| s.name.as_str()).collect();
    let Some(path) = kpi else {
        return Verdict::fail(RULE, format!("{} undefined symbols and no allowlist (--kpi FILE)", undefined.len()));
    };
    let allow = match read_allowlist(path) {
        Ok(a) => a,
        Err(e) => return Verdict::fail(RULE, e),
    };
    let mut unknown = Vec::new();
    let mut bounds = 0;
    for name in &undefined {
        if allow.contains(*name) {
            continue;
        }
        match set_bound_section(name) {
            Some(sec) if ko.sections_named(sec).next().is_some() => bounds += 1,
            Some(sec) => unknown.push(format!("undefined {name}: the module has no section {sec} to bound")),
            None => unknown.push(format!("undefined {name}: not in {}", path.display())),
        }
    }
    let ok = format!(
        "{} undefined symbols: {} in {} ({} names), {bounds} section bounds",
        undefined.len(),
        undefined.len() - bounds,
        path.display(),
        allow.len()
    );
    Verdict::from_findings(RULE, ok, "undefined symbols are not kernel exports", unknown)
}

/// `__start_set_foo` -> `set_foo`: the section whose bounds the kernel linker supplies.
fn set_bound_section(name: &str) -> Option<&str> {
    name.strip_prefix("__start_").or_else(|| name.strip_prefix("__stop_")).filter(|s| !s.is_empty())
}
