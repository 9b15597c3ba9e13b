//! kocheck on broken files: truncated and bit-flipped copies of a valid module must give
//! FAIL lines or a read error, never a panic (exit status 101) or a hang.

mod common;

use common::*;
use std::process::Command;

fn run_raw(bytes: &[u8], name: &str) -> (i32, String, String) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kocheck-hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kocheck"))
        .arg(&path)
        .args(["--kpi", kpi_file().to_str().unwrap()])
        .output()
        .expect("run kocheck");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn truncated_and_corrupted_modules_fail_cleanly() {
    let good = std::fs::read(link_ko("hostile-base", &[kld_object("hostile-base", &[])])).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for len in [0, 3, 16, 63, 64, 200, good.len() / 3, good.len() / 2, good.len() - 1] {
        cases.push((format!("trunc-{len}"), good[..len].to_vec()));
    }
    // Deterministic pseudo-random byte flips (an LCG: no seed to chase when it fails).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for case in 0..60 {
        let mut bytes = good.clone();
        for _ in 0..8 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let at = (x >> 33) as usize % bytes.len();
            bytes[at] ^= (x >> 24) as u8 | 1;
        }
        cases.push((format!("flip-{case}"), bytes));
    }
    for (name, bytes) in cases {
        let (code, stdout, stderr) = run_raw(&bytes, &name);
        assert!(!stderr.contains("panicked"), "{name}: kocheck panicked:\n{stderr}");
        assert!(matches!(code, 0 | 1 | 2), "{name}: exit status {code}\n{stdout}\n{stderr}");
        if code == 1 {
            assert!(stdout.lines().any(|l| l.starts_with("FAIL ")), "{name}: exit 1 without a FAIL line:\n{stdout}");
        }
    }
}
