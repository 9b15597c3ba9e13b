//! No allocation-error path. A kld's global allocator is malloc(9) with `M_NOWAIT` (the kernel
//! cannot sleep everywhere), so every Rust allocation can fail, and an *infallible* one
//! (`Box::new`, `Vec::push`, `vec!`, `collect`, `format!`, `VecDeque::push_back`, ...) that
//! fails calls `alloc::alloc::handle_alloc_error`, whose default handler
//! (`__rust_alloc_error_handler` -> `__rdl_alloc_error_handler`, "memory allocation of N bytes
//! failed") panics: in a kld, panic(9). rustc keeps that path in the binary exactly while some
//! code can reach it (with LTO the allocator shim's handler goes too once nothing calls it), so
//! its absence from the symbol table proves that no allocation in the module can end in a
//! kernel panic. Matched on the mangled names (v0 `18handle_alloc_error`, legacy
//! `_ZN5alloc5alloc18handle_alloc_error17h..E`), defined or undefined.

use crate::ko::Ko;
use crate::report::Verdict;

pub const RULE: &str = "no-alloc-error-handler";

/// Pieces of the symbol names of the allocation-error path, as they appear in both Rust
/// manglings: `alloc::alloc::handle_alloc_error`, `alloc::raw_vec::handle_error` (a failed
/// infallible grow), `alloc::raw_vec::capacity_overflow`, the allocator shim's
/// `__rust_alloc_error_handler` / `__rdl_alloc_error_handler` / `__rg_alloc_error_handler`,
/// and the older `__rust_oom` / `__rdl_oom` / `__rg_oom`.
const MARKERS: [&str; 9] = [
    "handle_alloc_error",
    "7raw_vec12handle_error",
    "7raw_vec17capacity_overflow",
    "__rust_alloc_error_handler",
    "__rdl_alloc_error_handler",
    "__rg_alloc_error_handler",
    "__rust_oom",
    "__rdl_oom",
    "__rg_oom",
];

pub fn check(ko: &Ko) -> Verdict {
    let findings: Vec<String> = ko
        .symbols
        .iter()
        .filter(|s| !s.name.is_empty() && MARKERS.iter().any(|m| s.name.contains(m)))
        .map(|s| match s.section {
            Some(sec) if !s.undefined => format!("defined {} ({})", s.name, ko.describe(sec, s.value)),
            _ => format!("undefined {}", s.name),
        })
        .collect();
    let ok = format!("{} symbols, none of Rust's allocation-error path (handle_alloc_error, raw_vec::handle_error, __rust_alloc_error_handler)", ko.symbols.len());
    Verdict::from_findings(
        RULE,
        ok,
        "symbols of Rust's allocation-error path (an infallible allocation that fails would panic the kernel)",
        findings,
    )
}
