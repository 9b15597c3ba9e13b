//! Shared by the kocheck integration tests: build fixture objects with clang-19/lld-19 at test
//! time and run the real `kocheck` binary on them, parsing its `PASS`/`FAIL` lines.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const CLANG: &str = "clang-19";
pub const LLD: &str = "ld.lld-19";

/// Every rule kocheck reports for a readable ELF64 file with the default flags: a passing
/// fixture must show all of them, so a rule that silently stopped running fails a test.
pub const ALL_RULES: [&str; 18] = [
    "elf-header",
    "modmetadata",
    "module-name",
    "module-version",
    "module-depend-kernel",
    "module-depend-pci",
    "sysinit-set",
    "relocation-types",
    "forbidden-sections",
    "code-decodes",
    "no-simd",
    "no-x87",
    "no-red-zone",
    "no-fs-gs",
    "stack-frames",
    "no-exports",
    "kpi-symbols",
    "no-alloc-error-handler",
];

/// The flags kmod.mk uses for amd64 kernel code (the parts that matter to the rules).
pub const KERNEL_CFLAGS: [&str; 11] = [
    "-target",
    "x86_64-unknown-freebsd15.0",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mno-mmx",
    "-mno-sse",
    "-msoft-float",
    "-fno-asynchronous-unwind-tables",
];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kocheck-fixtures");
    std::fs::create_dir_all(&d).expect("create fixture dir");
    d
}

/// Fails (never skips) when the LLVM tools are missing: these tests are how the rules are
/// shown to be able to fail, and `make test` installs the tools.
fn require_tool(tool: &str) {
    let found = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        found,
        "{tool} not found: the kocheck negative tests build their fixtures with it. \
         Install clang-19, lld-19 and llvm-19 (Debian/Ubuntu: `apt-get install clang-19 lld-19 llvm-19`, \
         or `scripts/bootstrap-debian.sh build`; FreeBSD: `pkg install llvm19`)."
    );
}

/// Compiles `fixtures/<src>` into `<name>.o` with `flags`.
pub fn compile(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    require_tool(CLANG);
    let out = work_dir().join(format!("{name}.o"));
    let o = Command::new(CLANG)
        .args(flags)
        .arg("-c")
        .arg(fixtures().join(src))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run clang-19");
    assert!(o.status.success(), "{CLANG} {flags:?} {src} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The kernel-flags build of `fixtures/kld.c` with extra `-D` switches.
pub fn kld_object(name: &str, extra: &[&str]) -> PathBuf {
    let mut flags: Vec<&str> = KERNEL_CFLAGS.to_vec();
    flags.extend_from_slice(extra);
    compile(name, "kld.c", &flags)
}

/// `ld -r` like kmod.mk, so the object has the shape of a real `.ko`.
pub fn link_ko(name: &str, objs: &[PathBuf]) -> PathBuf {
    require_tool(LLD);
    let out = work_dir().join(format!("{name}.ko"));
    let o = Command::new(LLD)
        .args(["-m", "elf_x86_64_fbsd", "-r", "-o"])
        .arg(&out)
        .args(objs)
        .output()
        .expect("run ld.lld-19");
    assert!(o.status.success(), "{LLD} -r failed:\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The kernel functions and variables kld.c uses, as the kld build's kpi-symbols.txt lists them.
/// Written once per test binary, by rename, so parallel tests never read a half-written list.
pub fn kpi_file() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = work_dir().join("kpi-symbols.txt");
        let tmp = work_dir().join(format!("kpi-symbols.txt.{}", std::process::id()));
        std::fs::write(&tmp, "# fixture allowlist\nprintf\nticks\nmodule_register_init\n").expect("write kpi list");
        std::fs::rename(&tmp, &p).expect("rename kpi list");
        p
    })
    .clone()
}

pub struct Rule {
    pub pass: bool,
    pub detail: String,
    pub findings: Vec<String>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub rules: BTreeMap<String, Rule>,
}

impl Run {
    pub fn rule(&self, name: &str) -> &Rule {
        self.rules.get(name).unwrap_or_else(|| panic!("rule {name} not reported:\n{}", self.stdout))
    }

    /// The rule failed and its detail or findings mention every one of `needles`.
    pub fn assert_fails(&self, name: &str, needles: &[&str]) {
        let r = self.rule(name);
        assert!(!r.pass, "rule {name} should FAIL:\n{}", self.stdout);
        let text = format!("{}\n{}", r.detail, r.findings.join("\n"));
        for n in needles {
            assert!(text.contains(n), "rule {name} output lacks {n:?}:\n{}", self.stdout);
        }
        assert_eq!(self.code, 1, "exit status on FAIL:\n{}", self.stdout);
    }

    /// Exactly `failing` fail; every other rule of `ALL_RULES` (and any extra) is reported PASS.
    pub fn assert_only_fail(&self, failing: &[&str]) {
        for name in ALL_RULES {
            self.rule(name);
        }
        for (name, r) in &self.rules {
            assert_eq!(!r.pass, failing.contains(&name.as_str()), "rule {name}: unexpected verdict:\n{}", self.stdout);
        }
        assert_eq!(self.code, if failing.is_empty() { 0 } else { 1 }, "exit status:\n{}", self.stdout);
    }
}

pub fn kocheck(file: &Path, args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_kocheck")).arg(file).args(args).output().expect("run kocheck");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut rules = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in stdout.lines() {
        let verdict = line.strip_prefix("PASS ").map(|r| (true, r)).or_else(|| line.strip_prefix("FAIL ").map(|r| (false, r)));
        if let Some((pass, rest)) = verdict {
            let (name, detail) = rest.split_once(": ").unwrap_or((rest, ""));
            let prev = rules.insert(name.to_string(), Rule { pass, detail: detail.to_string(), findings: Vec::new() });
            assert!(prev.is_none(), "rule {name} reported twice:\n{stdout}");
            last = Some(name.to_string());
        } else if let (Some(f), Some(name)) = (line.strip_prefix("    "), &last) {
            rules.get_mut(name).expect("rule").findings.push(f.to_string());
        }
    }
    Run { code: o.status.code().unwrap_or(-1), stdout, rules }
}
