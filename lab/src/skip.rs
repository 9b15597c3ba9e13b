//! What a lab test does when QEMU is missing: say so loudly and count as skipped — or, when the
//! caller demands QEMU (`NVMEHP_REQUIRE_QEMU=1`, set by `make test` after it installed QEMU),
//! fail. A lab test must never pass silently without having run.

use crate::qemu::{qemu_available, QEMU_BIN};

/// Environment variable that turns a missing QEMU from a skip into a failure.
pub const REQUIRE_ENV: &str = "NVMEHP_REQUIRE_QEMU";

/// Returns true if the test can run. Otherwise prints the SKIP line (and returns false), or
/// panics when QEMU is required.
pub fn qemu_or_skip(test: &str) -> bool {
    if qemu_available() {
        return true;
    }
    let required = std::env::var(REQUIRE_ENV).map(|v| v == "1").unwrap_or(false);
    if required {
        panic!("{test}: {QEMU_BIN} not found but {REQUIRE_ENV}=1 (run scripts/bootstrap-debian.sh lab)");
    }
    // Written to the real stderr, not through `eprintln!`, which the test harness captures:
    // the line must reach the log (scripts/test.sh counts lines starting with SKIP). The
    // leading newline keeps it at the start of a line even when it lands after a
    // `test name ... ` prefix of the harness.
    use std::io::Write;
    let line = format!("\nSKIP: {test}: {QEMU_BIN} not found (run scripts/bootstrap-debian.sh lab)\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    false
}
