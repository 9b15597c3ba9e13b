//! `nvmehp-lab kld demo`: the lab's CLI runs the shipped .ko's story through the `kldhost`
//! binary next to it. Needs that binary (built by `cargo build --release --workspace` or
//! `cargo test --workspace`), the .ko at the repository root (`make`) and QEMU: without one of
//! them a loud SKIP line, or a failure when NVMEHP_REQUIRE_KO=1 or NVMEHP_REQUIRE_QEMU=1
//! demands the full run.

use std::path::{Path, PathBuf};
use std::process::Command;

const LAB: &str = env!("CARGO_BIN_EXE_nvmehp-lab");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("lab/ is in the repository").to_path_buf()
}

fn required() -> bool {
    ["NVMEHP_REQUIRE_KO", "NVMEHP_REQUIRE_QEMU"].iter().any(|v| std::env::var(v).is_ok_and(|x| x == "1"))
}

/// Whether `path` exists; if not, SKIP (to the real stderr, which scripts/test.sh counts) or,
/// when required, fail.
fn present_or_skip(test: &str, path: &Path, how: &str) -> bool {
    if path.is_file() {
        return true;
    }
    if required() {
        panic!("{test}: {} not found ({how}); NVMEHP_REQUIRE_KO/NVMEHP_REQUIRE_QEMU demand it", path.display());
    }
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("\nSKIP: {test}: {} not found ({how})\n", path.display()).as_bytes());
    false
}

fn run(args: &[&str], dir: &Path, exe: &Path) -> (Option<i32>, String) {
    let o = Command::new(exe).args(args).current_dir(dir).output().expect("run nvmehp-lab");
    let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code(), out)
}

fn assert_in_order(out: &str, wanted: &[&str]) {
    let mut from = 0;
    for w in wanted {
        match out[from..].find(w) {
            Some(i) => from += i + w.len(),
            None => panic!("{w:?} missing or out of order in:\n{out}"),
        }
    }
}

#[test]
fn kld_demo_runs_the_shipped_module_through_kldhost_and_tells_its_story() {
    let kldhost = Path::new(LAB).with_file_name("kldhost");
    if !present_or_skip("kld_demo", &kldhost, "cargo build --release -p kldhost")
        || !present_or_skip("kld_demo", &repo_root().join("nvme_hotplug.ko"), "make")
        || !nvmehp_lab::skip::qemu_or_skip("kld_demo")
    {
        return;
    }
    // From a subdirectory, with no --ko: the module is found at the repository root.
    let (code, out) = run(&["kld", "demo"], &repo_root().join("lab"), Path::new(LAB));
    assert_eq!(code, Some(0), "nvmehp-lab kld demo failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "==> kldload nvme_hotplug.ko",
            "\nnvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0400000-0xc0403fff at device 4.0 on pci0\n",
            "    | disk_create(nvmehpd0: 16777216 bytes",
            "/nvme0-g1-ns1.raw at 8192: the written data; read back: the written data",
            "surprise removal of slot 4",
            "    | biodone: error 6 (ENXIO)",
            "\nnvmehp0: controller lost (controller gone, health Gone): ",
            "\nnvmehp0: detached (device gone): ",
            "    | acpi_task: Notify(\\_SB_.PCI0.S05_, 1) to 1 handler(s)",
            "\nnvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0500000-0xc0503fff at device 5.0 on pci0\n",
            "/nvme1-g2-ns1.raw at 8192: the written data; read back: the written data",
            "    | acpi_task: Notify(\\_SB_.PCI0.S05_, 3) to 1 handler(s)",
            "    | acpi_SetInteger(\\_SB_.PCI0.S05_, \"_EJ0\", 1) = 0x0",
            "    | QMP: DEVICE_DELETED nvme1: received",
            "    | MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "    | findings: 0",
            "kldhost demo: ok",
        ],
    );
}

#[test]
fn kld_demo_says_how_to_build_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No module: named, with `make`.
    let (code, out) = run(&["kld", "demo", "--ko", "no-such.ko"], dir.path(), Path::new(LAB));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no-such.ko not found") && out.contains("`make`"), "{out}");
    // No repository above the current directory, no --ko.
    let (code, out) = run(&["kld", "demo"], dir.path(), Path::new(LAB));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no nvme_hotplug repository") && out.contains("--ko PATH"), "{out}");
    // An nvmehp-lab with no kldhost next to it: named, with the cargo command.
    let alone = dir.path().join("nvmehp-lab");
    std::fs::copy(LAB, &alone).expect("copy nvmehp-lab");
    let ko = dir.path().join("some.ko");
    std::fs::write(&ko, b"").expect("a module file");
    let (code, out) = run(&["kld", "demo", "--ko", ko.to_str().expect("utf-8 path")], dir.path(), &alone);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&format!("{} not found (kldhost is looked for next to this program)", dir.path().join("kldhost").display())), "{out}");
    assert!(out.contains("cargo build --release -p kldhost"), "{out}");
}
