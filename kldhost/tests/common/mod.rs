//! Finding the real nvme_hotplug.ko and compiling fixture objects.
//!
//! Without the kld toolchain (clang-19) or the built .ko a test prints a line starting with
//! `SKIP` and returns, which scripts/test.sh counts as skipped; with NVMEHP_REQUIRE_KO=1 (set
//! by scripts/test.sh, which builds the .ko first) a missing .ko or compiler is a failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("kldhost/ is in the repository").to_path_buf()
}

fn required() -> bool {
    std::env::var("NVMEHP_REQUIRE_KO").is_ok_and(|v| v == "1")
}

/// Either panics (required) or prints the SKIP line and returns None.
fn unavailable<T>(test: &str, why: &str) -> Option<T> {
    if required() {
        panic!("{test}: {why} (NVMEHP_REQUIRE_KO=1)");
    }
    // To the real stderr, not through the harness's captured eprintln!: scripts/test.sh counts
    // lines starting with SKIP in the log. The leading newline starts the line even after a
    // `test name ... ` prefix.
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("\nSKIP: {test}: {why}\n").as_bytes());
    None
}

/// The .ko at the repository root; with NVMEHP_REQUIRE_KO=1 it is built if missing.
pub fn real_ko(test: &str) -> Option<Vec<u8>> {
    let ko = repo_root().join("nvme_hotplug.ko");
    // One build at a time: the tests of a binary run in parallel threads.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !ko.exists() && required() {
        let st = Command::new("sh")
            .arg(repo_root().join("scripts/build-kld.sh"))
            .env("NVMEHP_SKIP_BOOTSTRAP", "1")
            .current_dir(repo_root())
            .status()
            .expect("run scripts/build-kld.sh");
        assert!(st.success(), "{test}: scripts/build-kld.sh failed");
    }
    match std::fs::read(&ko) {
        Ok(b) => Some(b),
        Err(e) => unavailable(test, &format!("{}: {e}; build it with NVMEHP_SKIP_BOOTSTRAP=1 sh scripts/build-kld.sh", ko.display())),
    }
}

/// The flags scripts/build-kld.sh compiles the kld's C with (code generation only).
pub const KERNEL_FLAGS: &[&str] = &[
    "--target=x86_64-unknown-freebsd15.0", "-O2", "-ffreestanding", "-fno-common",
    "-mcmodel=kernel", "-fno-pic", "-mno-red-zone", "-mno-mmx", "-mno-sse", "-msoft-float",
    "-fno-asynchronous-unwind-tables",
];

/// Compiles `tests/fixtures/<name>.c` with `flags` into an object file and returns its bytes.
pub fn compile(test: &str, name: &str, flags: &[&str]) -> Option<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.c"));
    let out = std::env::temp_dir().join(format!("kldhost-{}-{test}-{name}.o", std::process::id()));
    let r = Command::new("clang-19").args(flags).arg("-c").arg(&src).arg("-o").arg(&out).output();
    let o = match r {
        Ok(o) => o,
        Err(e) => return unavailable(test, &format!("clang-19: {e} (scripts/bootstrap-debian.sh build installs it)")),
    };
    assert!(o.status.success(), "{test}: clang-19 failed on {}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
    let b = std::fs::read(&out).expect("read the fixture object");
    let _ = std::fs::remove_file(&out);
    Some(b)
}

/// KERNEL_FLAGS plus the FreeBSD 15 headers and defines scripts/build-kld.sh compiles the glue
/// with, for fixtures that use kernel macros.
pub fn kernel_header_flags() -> Vec<String> {
    let root = repo_root();
    let inc = std::env::var("NVMEHP_FBSD_INCLUDE").map(PathBuf::from).unwrap_or_else(|_| root.join(".cache/freebsd-include"));
    let mut v: Vec<String> = KERNEL_FLAGS.iter().map(|s| s.to_string()).collect();
    v.extend(
        [
            "-nostdinc".to_string(),
            "-D_KERNEL".into(),
            "-DKLD_MODULE".into(),
            "-D__FreeBSD_version=1500068".into(),
            format!("-I{}", root.join("kmod").display()),
            format!("-I{}", root.join("kmod/include").display()),
            format!("-I{}", inc.join("x86_64-freebsd-none").display()),
            format!("-I{}", inc.join("generic-freebsd").display()),
            "-include".into(),
            "opt_global.h".into(),
        ],
    );
    v
}

/// The name prefix of the files [`temp_object`] writes: only those are removed after a run.
fn temp_prefix() -> String {
    format!("kldhost-{}-", std::process::id())
}

/// Writes `bytes` to a temporary file for the CLI and returns its path.
pub fn temp_object(test: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("{}{test}.ko", temp_prefix()));
    std::fs::write(&p, bytes).expect("write the fixture");
    p
}

/// Whether `path` is a file [`temp_object`] wrote. Not merely "under the temporary directory":
/// a checkout may live there too (CI clones into one), and its real nvme_hotplug.ko must
/// survive the run.
fn is_temp_object(path: &Path) -> bool {
    path.parent() == Some(std::env::temp_dir().as_path())
        && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&temp_prefix()))
}

/// Runs `kldhost run <path>`: (exit code, stdout and stderr). A temporary fixture file
/// (see temp_object) is removed afterwards.
pub fn kldhost_run(path: &Path) -> (Option<i32>, String) {
    kldhost_run_with(path, &[])
}

/// `kldhost run <extra...> <path>`.
pub fn kldhost_run_with(path: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kldhost")).arg("run").args(extra).arg(path).output().expect("run kldhost");
    if is_temp_object(path) {
        let _ = std::fs::remove_file(path);
    }
    let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code(), out)
}

/// Panics unless `out` contains every one of `wanted`, in that order.
#[allow(dead_code)] // each test binary compiles this module; not all use every helper
pub fn assert_in_order(out: &str, wanted: &[&str]) {
    let mut from = 0;
    for w in wanted {
        match out[from..].find(w) {
            Some(i) => from += i + w.len(),
            None => panic!("{w:?} missing or out of order in:\n{out}"),
        }
    }
}

/// Compiles the fixture driver `tests/fixtures/<source>.c` with the FreeBSD 15 headers (and
/// `define`, e.g. `-DKLDHOST_LEAK_BAR`) into a temporary object for `kldhost run`.
#[allow(dead_code)]
pub fn fixture_object(test: &str, source: &str, define: Option<&str>) -> Option<PathBuf> {
    let mut flags = kernel_header_flags();
    flags.extend(define.map(str::to_string));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    compile(test, source, &flags).map(|o| temp_object(test, &o))
}

/// The real module for a test that also needs QEMU, or None (a SKIP line printed) without
/// either (a failure with NVMEHP_REQUIRE_QEMU=1 / NVMEHP_REQUIRE_KO=1).
pub fn real_ko_on_qemu(test: &str) -> Option<PathBuf> {
    if !nvmehp_lab::skip::qemu_or_skip(test) || real_ko(test).is_none() {
        return None;
    }
    Some(repo_root().join("nvme_hotplug.ko"))
}

/// The emulated console of a `kldhost run` output (what FreeBSD's console would show).
pub fn console(out: &str) -> &str {
    let from = out.find("\nconsole:\n").unwrap_or_else(|| panic!("no console in:\n{out}"));
    let rest = &out[from..];
    let to = rest.find("\nMOD_QUIESCE:").unwrap_or(rest.len());
    &rest[..to]
}

/// The call log from the first `from` up to the next `to` after it (both must be there, in
/// that order).
#[allow(dead_code)]
pub fn between<'a>(out: &'a str, from: &str, to: &str) -> &'a str {
    let a = out.find(from).unwrap_or_else(|| panic!("{from:?} missing in:\n{out}"));
    let b = out[a..].find(to).unwrap_or_else(|| panic!("{to:?} missing after {from:?} in:\n{out}"));
    &out[a..a + b]
}

/// A run that ended clean: the module unloaded, no finding, no emulated panic, exit status 0.
#[allow(dead_code)]
pub fn assert_clean_unload(code: Option<i32>, out: &str) {
    assert!(out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true"), "the module did not unload:\n{out}");
    assert!(out.contains("\nfindings: 0\n"), "findings:\n{out}");
    assert!(!out.contains("panic:"), "{out}");
    assert_eq!(code, Some(0), "kldhost run failed:\n{out}");
}

/// The watchdog's callout firing, in the call log.
#[allow(dead_code)]
pub const WATCHDOG_POLL: &str = "time passes: callout";

/// Which thread ran the code that called `biodone` in one bio's log: the last interrupt
/// delivery (`interrupt (`), callout (`time passes`) or task (`: run task`) before it.
/// A loaded machine may let the watchdog's callout fire while a bio waits (50 ms without
/// progress); what matters is who completed it.
#[allow(dead_code)]
pub fn completed_by(bio: &str) -> &'static str {
    let done = bio.find("biodone(").unwrap_or_else(|| panic!("no biodone in:\n{bio}"));
    let before = &bio[..done];
    let last = |m: &str| before.rfind(m).map_or(-1, |i| i as i64);
    let (intr, callout, task) = (last(": interrupt ("), last(WATCHDOG_POLL), last(": run task"));
    if intr > callout && intr > task {
        "interrupt"
    } else if task > callout {
        "task"
    } else if callout >= 0 {
        "callout"
    } else {
        "d_strategy"
    }
}

/// The calls logged for each bio of disk `nvmehpd0`, from its `d_strategy` to its `g_up`, in
/// order.
#[allow(dead_code)]
pub fn per_bio(out: &str) -> Vec<&str> {
    let strategy = "g_down: d_strategy(nvmehpd0";
    let mut v = Vec::new();
    let mut from = 0;
    while let Some(i) = out[from..].find(strategy) {
        let start = from + i;
        let end = out[start..].find("g_up: bio").map(|j| start + j).unwrap_or(out.len());
        v.push(&out[start..end]);
        from = end;
    }
    v
}

/// The negative control of an interrupt that is never delivered: the run's two bios were both
/// completed by the watchdog's poll (its callout, then its task), none by a handler.
#[allow(dead_code)]
pub fn assert_both_bios_completed_by_the_watchdog(out: &str) {
    let bios = per_bio(out);
    assert_eq!(bios.len(), 2, "{out}");
    for b in &bios {
        assert!(b.contains(WATCHDOG_POLL), "a bio completed without the watchdog's poll:\n{b}");
        assert_eq!(completed_by(b), "task", "a bio not completed by the watchdog task:\n{b}");
    }
}

/// The values the module wrote to CC (BAR0 + 0x14) in `log`, in order.
#[allow(dead_code)]
pub fn cc_writes(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x"))
        .filter_map(|v| u32::from_str_radix(v.trim_end_matches(')'), 16).ok())
        .collect()
}
