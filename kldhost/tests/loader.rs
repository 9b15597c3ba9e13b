//! The loader against small fixture objects: a positive control that runs the loaded code
//! through its relocations, and negative controls for each failure kldload reports.

mod common;

use common::{compile, KERNEL_FLAGS};
use kldhost::kpi::{Import, KpiTable};
use kldhost::mapping::LOW_LIMIT;
use kldhost::LoadError;
use object::elf;

extern "C" fn host_kpi_function(x: i32) -> i32 {
    x * 10
}

/// The table the fixture needs: a host function and a data object holding 37.
fn fixture_table() -> KpiTable {
    let mut t = KpiTable::new();
    t.function("kpi_function", host_kpi_function as extern "C" fn(i32) -> i32 as usize);
    t.insert("kpi_data", Import::Data { bytes: 37i64.to_le_bytes().to_vec(), align: 8 });
    t
}

#[test]
fn fixture_loads_and_its_code_runs_through_every_relocation() {
    let Some(obj) = compile("fixture_runs", "kpi_user", KERNEL_FLAGS) else { return };
    let ko = kldhost::load(&obj, &fixture_table()).expect("the fixture loads");
    // The module and its imports are in the low 2 GiB.
    assert!(ko.base() + ko.module_size < LOW_LIMIT);
    let data = ko.import("kpi_data").expect("kpi_data imported");
    assert!(data < LOW_LIMIT);
    // Relocation types the kernel flags produce for this source.
    for t in ["R_X86_64_PLT32", "R_X86_64_64"] {
        assert!(ko.reloc_counts.contains_key(t), "no {t} applied: {:?}", ko.reloc_counts);
    }

    let call: extern "C" fn(i32) -> i32 = sym(&ko, "fixture_call");
    let load: extern "C" fn() -> i64 = sym(&ko, "fixture_load");
    let addr: extern "C" fn() -> i64 = sym(&ko, "fixture_addr");
    // PLT32 to the trampoline, the trampoline to the host function.
    assert_eq!(call(4), 41);
    // The imported object (37) plus the module's own initialised local (5).
    assert_eq!(load(), 42);
    // The 32-bit absolute address is the imported object's address, sign-extension included.
    assert_eq!(addr() as u64, data);
    // R_X86_64_64 in .data: the stored pointer.
    assert_eq!(ko.read_u64(ko.symbol("fixture_data_ptr").expect("defined")).unwrap(), data);
}

/// The fixture's code at `name`, as a function pointer.
fn sym<F: Copy>(ko: &kldhost::LoadedKo, name: &str) -> F {
    let a = ko.symbol(name).unwrap_or_else(|| panic!("{name} not defined"));
    assert_eq!(std::mem::size_of::<F>(), 8);
    // SAFETY: `a` is the address of a function of the fixture, which is mapped executable
    // and relocated; F is its C signature (see tests/fixtures/kpi_user.c).
    unsafe { std::mem::transmute_copy::<u64, F>(&a) }
}

#[test]
fn an_import_the_table_lacks_fails_like_kldload() {
    let Some(obj) = compile("undefined", "kpi_user", KERNEL_FLAGS) else { return };
    let mut t = fixture_table();
    t.remove("kpi_function");
    let e = kldhost::load(&obj, &t).err().expect("must not load");
    assert_eq!(e, LoadError::Undefined { symbols: vec!["kpi_function".into()] });
    assert_eq!(e.to_string(), "link_elf_obj: symbol kpi_function undefined");
}

#[test]
fn a_32_bit_field_that_cannot_reach_an_import_is_an_error_not_a_truncation() {
    let Some(obj) = compile("overflow", "kpi_user", KERNEL_FLAGS) else { return };
    // kpi_data lives in host memory above 2 GiB: the 64-bit pointer could reach it, the
    // 32-bit fields the kernel code model uses for its address cannot.
    let far = Box::leak(Box::new(0i64)) as *mut i64 as u64;
    assert!(far >= LOW_LIMIT, "host heap at {far:#x} is below 2 GiB: pick another address");
    let mut t = fixture_table();
    t.insert("kpi_data", Import::HostData(far));
    match kldhost::load(&obj, &t) {
        Err(LoadError::Overflow { symbol, type_name, value, .. }) => {
            assert_eq!(symbol, "kpi_data");
            assert!(type_name == "R_X86_64_PC32" || type_name == "R_X86_64_32S", "{type_name}");
            assert!(value > i128::from(i32::MAX) || value < i128::from(i32::MIN));
        }
        other => panic!("expected an overflow error, got {:?}", other.err()),
    }
}

#[test]
fn r_x86_64_32_from_the_small_code_model_is_refused_as_the_amd64_kernel_linker_does() {
    // -mcmodel=small takes the address of kpi_data as a zero-extended 32-bit immediate:
    // R_X86_64_32, which elf_reloc_internal does not handle.
    let flags: Vec<&str> = KERNEL_FLAGS.iter().map(|f| if *f == "-mcmodel=kernel" { "-mcmodel=small" } else { f }).collect();
    let Some(obj) = compile("reloc32", "kpi_user", &flags) else { return };
    match kldhost::load(&obj, &fixture_table()) {
        Err(e @ LoadError::UnsupportedReloc { .. }) => {
            let LoadError::UnsupportedReloc { r_type, ref symbol, .. } = e else { unreachable!() };
            assert_eq!(r_type, elf::R_X86_64_32.0);
            assert_eq!(symbol, "kpi_data");
            assert!(e.to_string().starts_with("kldload: unexpected relocation type 10 (R_X86_64_32) at .text+"), "{e}");
        }
        other => panic!("expected R_X86_64_32 to be refused, got {:?}", other.err()),
    }
}

#[test]
fn got_relative_relocations_of_pic_code_are_refused() {
    let flags: Vec<&str> = KERNEL_FLAGS.iter().map(|f| if *f == "-fno-pic" { "-fPIC" } else { f }).collect();
    let Some(obj) = compile("pic", "kpi_user", &flags) else { return };
    match kldhost::load(&obj, &fixture_table()) {
        Err(LoadError::UnsupportedReloc { r_type, .. }) => assert!(
            [elf::R_X86_64_GOTPCREL.0, elf::R_X86_64_GOTPCRELX.0, elf::R_X86_64_REX_GOTPCRELX.0].contains(&r_type),
            "refused for type {r_type}, expected a GOT-relative type"
        ),
        other => panic!("expected a GOT relocation to be refused, got {:?}", other.err()),
    }
}

#[test]
fn an_object_that_is_not_a_relocatable_amd64_elf_is_refused() {
    assert_eq!(kldhost::load(b"not an ELF file at all, but long enough to be read as a header.....", &KpiTable::new()).err(),
        Some(LoadError::Format("not an ELF file".into())));
    let Some(mut obj) = compile("machine", "kpi_user", KERNEL_FLAGS) else { return };
    obj[18] = elf::EM_AARCH64.0 as u8; // e_machine, little-endian
    obj[19] = 0;
    assert_eq!(kldhost::load(&obj, &fixture_table()).err(), Some(LoadError::Format("Unsupported machine".into())));
}
