//! The real module's `d_strategy` against bios it must refuse by itself (`kldhost run --qemu
//! --bad-bios`, src/emu/run.rs `BAD_BIOS`): a negative length, a negative or misaligned
//! offset, more than `d_maxsize`, a start or an end past the namespace, an offset whose end
//! would wrap, BIO_DELETE on a disk that does not advertise it, and an empty read. Each ends
//! at once inside `d_strategy` with the error GEOM's `g_io_check` would give (EINVAL, EIO,
//! EOPNOTSUPP; the empty read done), its whole length as resid, and nothing allocated, loaded
//! or rung for it (never ENOMEM, which GEOM retries for ever).
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_clean_unload, kldhost_run_with, real_ko_on_qemu as real_ko};

/// (what the run prints for the bio, its d_strategy line, error, BIO_* flags after biodone,
/// resid). The namespace is 16 MiB of 512-byte sectors; `d_maxsize` is QEMU's 512 KiB MDTS.
const EXPECTED: &[(&str, &str, i32, u32, i64)] = &[
    ("BIO_READ offset 0 length -512", "BIO_READ, offset 0, -512 bytes", 22, 0x3, -512),
    ("BIO_WRITE offset -4096 length 4096", "BIO_WRITE, offset -4096, 4096 bytes", 22, 0x3, 4096),
    ("BIO_READ offset 100 length 512", "BIO_READ, offset 100, 512 bytes", 22, 0x3, 512),
    ("BIO_READ offset 0 length 1048576", "BIO_READ, offset 0, 1048576 bytes", 22, 0x3, 1048576),
    ("BIO_READ offset 16777216 length 512", "BIO_READ, offset 16777216, 512 bytes", 5, 0x3, 512),
    ("BIO_READ offset 16776704 length 1024", "BIO_READ, offset 16776704, 1024 bytes", 5, 0x3, 1024),
    ("BIO_READ offset 9223372036854775296 length 512", "BIO_READ, offset 9223372036854775296, 512 bytes", 5, 0x3, 512),
    ("BIO_DELETE offset 0 length 512", "BIO_DELETE, offset 0, 512 bytes", 45, 0x3, 512),
    ("BIO_READ offset 0 length 0", "BIO_READ, offset 0, 0 bytes", 0, 0x2, 0),
];

/// Replaces the fake kernel's `strategy_refuses_bad_bios_before_allocating`. Fails with the
/// alignment check removed from src/freebsd/ns_disk.rs `Geometry::check` (the misaligned read
/// then reaches the controller).
#[test]
fn strategy_refuses_bad_bios_at_once_without_allocating_or_touching_the_controller() {
    let Some(ko) = real_ko("strategy_bad_bios") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--bad-bios"]);
    let mut from = out.find("step Io: done").unwrap_or_else(|| panic!("the run's I/O did not work:\n{out}"));
    for &(what, strategy, error, flags, resid) in EXPECTED {
        let start = from + out[from..].find(&format!("g_down: d_strategy(nvmehpd0, {strategy})")).unwrap_or_else(|| panic!("{strategy} never sent:\n{out}"));
        let end_line = format!("bad bio {what}: ");
        let end = start + out[start..].find(&end_line).unwrap_or_else(|| panic!("{what} not ended:\n{}", &out[start..]));
        let bio = &out[start..end];
        let done: Vec<&str> = bio.lines().filter(|l| l.trim_start().starts_with("biodone(")).collect();
        assert_eq!(done.len(), 1, "{what}: not completed exactly once, inside d_strategy:\n{bio}");
        assert!(done[0].ends_with(&format!("): error {error}, flags {flags:#x}, resid {resid}")), "{what}: {}", done[0]);
        for never in ["bus_dmamap_load_bio(", "  malloc(", "contigmalloc(", "bus_write_4(", "bioq_insert_tail("] {
            assert!(!bio.contains(never), "{what}: {never} for a bio refused:\n{bio}");
        }
        assert!(out.contains(&format!("\nbad bio {what}: error {error}, resid {resid}\n")), "{what}:\n{out}");
        from = end;
    }
    assert_clean_unload(code, &out);
}
