//! Every kocheck rule shown able to fail: each fixture differs from a passing kld-shaped
//! object by one defect, and the test demands that exactly the guarding rule fails (and says
//! where). The passing fixture shows the rules do not fail on correct input.

mod common;

use common::*;

#[test]
fn kld_shaped_fixture_passes_every_rule() {
    let ko = link_ko("good", &[kld_object("good", &[])]);
    let kpi = kpi_file();
    let run = kocheck(&ko, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&[]);
    let meta = &run.rule("modmetadata").detail;
    assert!(meta.contains("module nvme_hotplug"), "{meta}");
    assert!(meta.contains("depend kernel 1500068..1599999"), "{meta}");
    assert!(run.rule("sysinit-set").detail.contains("1 entries"), "{}", run.stdout);
    assert!(run.rule("kpi-symbols").detail.starts_with("3 undefined symbols: 3 in"), "{}", run.stdout);
}

#[test]
fn userland_build_fails_header_simd_x87_red_zone() {
    // SSE on, red zone on, OSABI none, .eh_frame, no module metadata: what a kld must not be.
    let obj = compile("userland", "userland.c", &["-target", "x86_64-linux-gnu", "-O2"]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_fails("elf-header", &["OSABI 0"]);
    run.assert_fails("no-simd", &["%xmm", "<copy_big+", "<scale+"]);
    run.assert_fails("no-x87", &["fldt", "<wide+"]);
    run.assert_fails("no-red-zone", &["-4(%rsp)", "<leaf_fixed+", "(%rsp,%rax,4)"]);
    run.assert_fails("forbidden-sections", &[".eh_frame"]);
    run.assert_fails("modmetadata", &["no set_modmetadata_set"]);
    run.assert_fails("sysinit-set", &["no set_sysinit_set"]);
    run.assert_fails("no-exports", &["global definition copy_big"]);
    for ok in ["relocation-types", "code-decodes", "no-fs-gs", "stack-frames", "kpi-symbols"] {
        assert!(run.rule(ok).pass, "{ok} should pass:\n{}", run.stdout);
    }
}

#[test]
fn pic_build_fails_on_got_relocation() {
    let obj = compile("pic", "kld.c", &[&KERNEL_CFLAGS[..], &["-fPIC"]].concat());
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["relocation-types"]);
    run.assert_fails("relocation-types", &["GOTPCREL", "against ticks", "<evhand+"]);
}

#[test]
fn allocation_error_path_fails_no_alloc_error_handler() {
    let obj = link_ko("alloc_error", &[kld_object("alloc_error", &["-DALLOC_ERROR_PATH"])]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["no-alloc-error-handler"]);
    run.assert_fails("no-alloc-error-handler", &["defined _RNvNtCs460uEUzrvaB_5alloc5alloc18handle_alloc_error", "(.text+"]);
}

#[test]
fn constructor_fails_forbidden_sections() {
    let obj = kld_object("ctor", &["-DWITH_CTOR"]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["forbidden-sections"]);
    run.assert_fails("forbidden-sections", &[".init_array"]);
}

#[test]
fn thread_local_fails_forbidden_sections_and_fs() {
    let obj = compile("tls", "tls.c", &KERNEL_CFLAGS);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_fails("forbidden-sections", &[".tbss"]);
    run.assert_fails("no-fs-gs", &["%fs:"]);
}

#[test]
fn fs_segment_fails_even_with_allow_gs() {
    let obj = kld_object("fs", &["-DUSE_FS"]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap(), "--allow-gs-pcpu"]);
    run.assert_only_fail(&["no-fs-gs"]);
    run.assert_fails("no-fs-gs", &["%fs:0", "<evhand+"]);
}

#[test]
fn gs_segment_fails_unless_per_cpu_allowed() {
    let obj = kld_object("gs", &["-DUSE_GS"]);
    let kpi = kpi_file();
    let strict = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    strict.assert_only_fail(&["no-fs-gs"]);
    strict.assert_fails("no-fs-gs", &["%gs:0"]);
    kocheck(&obj, &["--kpi", kpi.to_str().unwrap(), "--allow-gs-pcpu"]).assert_only_fail(&[]);
}

#[test]
fn undefined_symbol_outside_allowlist_fails() {
    let obj = kld_object("puts", &["-DCALL_PUTS"]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["kpi-symbols"]);
    run.assert_fails("kpi-symbols", &["undefined puts"]);
}

#[test]
fn section_bounds_resolve_only_to_existing_sections() {
    let kpi = kpi_file();
    let present = kld_object("bounds", &["-DUSE_SET_BOUNDS=set_sysinit_set"]);
    let run = kocheck(&present, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&[]);
    assert!(run.rule("kpi-symbols").detail.contains("2 section bounds"), "{}", run.stdout);
    let absent = kld_object("nobounds", &["-DUSE_SET_BOUNDS=set_missing"]);
    let run = kocheck(&absent, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["kpi-symbols"]);
    run.assert_fails("kpi-symbols", &["__start_set_missing", "no section set_missing"]);
}

#[test]
fn missing_or_empty_allowlist_fails() {
    let obj = kld_object("nokpi", &[]);
    kocheck(&obj, &[]).assert_fails("kpi-symbols", &["--kpi"]);
    kocheck(&obj, &["--kpi", "/nonexistent/kpi-symbols.txt"]).assert_fails("kpi-symbols", &["cannot read"]);
}

#[test]
fn kernel_depend_range_outside_15_fails() {
    let obj = kld_object("fbsd14", &["-DKERNEL_MIN=1400000", "-DKERNEL_MAX=1499999"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_only_fail(&["module-depend-kernel"]);
    run.assert_fails("module-depend-kernel", &["1400000..1499999", "inside 1500000..1599999"]);
}

#[test]
fn empty_kernel_range_fails() {
    // __FreeBSD_version 1500000 would give max 1499999 < min: a module no kernel loads.
    let obj = kld_object("emptyrange", &["-DKERNEL_MIN=1500000", "-DKERNEL_MAX=1499999"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_only_fail(&["module-depend-kernel"]);
}

#[test]
fn missing_module_version_fails() {
    let obj = kld_object("nover", &["-DNO_VERSION"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_only_fail(&["module-version"]);
}

#[test]
fn missing_pci_depend_fails() {
    let obj = kld_object("nopci", &["-DNO_PCI"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_only_fail(&["module-depend-pci"]);
}

#[test]
fn wrong_module_name_fails() {
    let obj = kld_object("othername", &["-DMODNAME=other_module"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_only_fail(&["module-name", "module-version"]);
    run.assert_fails("module-name", &["no module nvme_hotplug", "other_module"]);
    // The name is a flag: the same object passes when asked for its own name.
    kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap(), "--module", "other_module"]).assert_only_fail(&[]);
}

#[test]
fn no_module_metadata_fails() {
    let obj = kld_object("nometa", &["-DNO_MODMETA"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_only_fail(&[
        "modmetadata",
        "module-name",
        "module-version",
        "module-depend-kernel",
        "module-depend-pci",
        "sysinit-set",
    ]);
}

#[test]
fn extra_depend_is_a_flag() {
    // Issue 4 (ACPI hotplug) adds MODULE_DEPEND(nvme_hotplug, acpi): one more flag to kocheck.
    let kpi = kpi_file();
    let without = kld_object("noacpi", &[]);
    let run = kocheck(&without, &["--kpi", kpi.to_str().unwrap(), "--also-depend", "acpi"]);
    run.assert_only_fail(&["module-depend-acpi"]);
    let with = kld_object("acpi", &["-DWITH_ACPI"]);
    kocheck(&with, &["--kpi", kpi.to_str().unwrap(), "--also-depend", "acpi"]).assert_only_fail(&[]);
}

#[test]
fn non_amd64_object_fails_header() {
    let obj = compile("i386", "kld.c", &["-target", "i386-unknown-freebsd15.0", "-O2", "-ffreestanding"]);
    let run = kocheck(&obj, &["--kpi", kpi_file().to_str().unwrap()]);
    run.assert_fails("elf-header", &["not ELFCLASS64", "e_machine 3"]);
}

#[test]
fn big_stack_frame_fails_unless_limit_raised() {
    let obj = kld_object("bigframe", &["-DBIG_FRAME"]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["stack-frames"]);
    run.assert_fails("stack-frames", &["<big_frame+", "limit 2048"]);
    kocheck(&obj, &["--kpi", kpi.to_str().unwrap(), "--max-frame", "8192"]).assert_only_fail(&[]);
}

#[test]
fn global_definition_fails_unless_exported_on_purpose() {
    let obj = kld_object("export", &["-DEXPORT_FN"]);
    let kpi = kpi_file();
    let run = kocheck(&obj, &["--kpi", kpi.to_str().unwrap()]);
    run.assert_only_fail(&["no-exports"]);
    run.assert_fails("no-exports", &["global definition fixture_exported"]);
    kocheck(&obj, &["--kpi", kpi.to_str().unwrap(), "--export", "fixture_exported"]).assert_only_fail(&[]);
}
