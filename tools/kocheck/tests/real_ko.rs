//! kocheck on the real module, when `make` has built it. Without it this test says SKIP
//! loudly (it is counted as skipped, not passed); `make test` builds the module first and
//! also runs scripts/check-ko.sh, which fails outright when the module is missing.

mod common;

use std::io::Write;
use std::path::Path;

#[test]
fn real_nvme_hotplug_ko_passes_every_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root");
    let ko = root.join("nvme_hotplug.ko");
    let kpi = root.join("target/kld/kpi-symbols.txt");
    if !ko.exists() {
        // Straight to fd 2: libtest captures eprintln!, and this line must reach the log.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP kocheck real_nvme_hotplug_ko_passes_every_rule: {} not built (run `make`)",
            ko.display()
        );
        return;
    }
    assert!(kpi.exists(), "{} exists but {} does not: rebuild with `make`", ko.display(), kpi.display());
    // The same requirements as scripts/check-ko.sh: the defaults plus acpi (issue 4).
    let run = common::kocheck(&ko, &["--kpi", kpi.to_str().unwrap(), "--also-depend", "acpi"]);
    run.assert_only_fail(&[]);
    run.rule("module-depend-acpi");
}
