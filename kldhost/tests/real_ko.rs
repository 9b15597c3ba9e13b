//! The shipped nvme_hotplug.ko, loaded as the kernel linker would load it, against the
//! emulated FreeBSD 15 KPI table.

mod common;

use kldhost::layouts;
use kldhost::sets::{self, ModRecord};
use kldhost::LoadedKo;
use object::elf;

fn load(test: &str) -> Option<LoadedKo> {
    let data = common::real_ko(test)?;
    Some(kldhost::load(&data, &kldhost::freebsd15::table()).unwrap_or_else(|e| panic!("nvme_hotplug.ko: {e}")))
}

#[test]
fn every_import_resolves_against_the_emulated_kpi_and_each_is_needed() {
    let Some(ko) = load("imports") else { return };
    let data = common::real_ko("imports").expect("read above");
    // The module's own linker-set bounds are its sections, not imports (link_elf_fix_link_set).
    let (start, _) = ko.lookup_set("sysinit_set").expect("set_sysinit_set loaded");
    assert!(ko.import("__start_set_sysinit_set").is_none());
    let sym = ko.elf.symbols.iter().position(|s| s.name == "__start_set_sysinit_set").expect("referenced");
    assert_eq!(ko.symvals[sym], Some(start));
    // Data imports live in the low mapping next to the module.
    let hw = ko.imports.iter().find(|i| i.name == "sysctl___hw").expect("sysctl___hw imported");
    assert_eq!(hw.kind, "data");
    assert!(hw.addr > ko.base() && hw.addr < kldhost::mapping::LOW_LIMIT);
    assert!(ko.imports.len() > 90, "only {} imports", ko.imports.len());
    // The table is really consulted: without any one of the imports the load fails naming it.
    for name in ["taskqueue_create", "driver_module_handler", "sysctl___hw", "device_probe_desc"] {
        let mut t = kldhost::freebsd15::table();
        t.remove(name);
        let e = kldhost::load(&data, &t).err().unwrap_or_else(|| panic!("loaded without {name}"));
        assert_eq!(e.to_string(), format!("link_elf_obj: symbol {name} undefined"));
    }
}

#[test]
fn relocated_code_calls_imports_through_their_trampolines_and_addresses_its_data() {
    let Some(ko) = load("relocated") else { return };
    let text = ko.progtab.iter().find(|p| p.name == ".text").expect(".text loaded").clone();
    let rodata = ko.progtab.iter().find(|p| p.name == ".rodata").expect(".rodata loaded").clone();
    let mut checked_call = 0;
    let mut checked_abs = 0;
    for tab in ko.elf.reltabs.iter().filter(|t| t.target == text.index) {
        for r in &tab.entries {
            let sym = &ko.elf.symbols[r.sym as usize];
            let place = text.addr + r.offset;
            let field = i64::from(ko.read::<i32>(place).unwrap());
            if r.r_type == elf::R_X86_64_PLT32.0 && sym.name == "printf" {
                // The field holds S + A - P: S must be the printf trampoline.
                let s = place as i64 + field - r.addend.unwrap();
                assert_eq!(s as u64, ko.import("printf").unwrap());
                checked_call += 1;
            }
            if r.r_type == elf::R_X86_64_32S.0 && sym.shndx as usize == rodata.index && sym.kind == elf::STT_SECTION.0 {
                // A sign-extended absolute address inside .rodata.
                assert_eq!(field as u64, rodata.addr + sym.value + r.addend.unwrap() as u64);
                checked_abs += 1;
            }
        }
    }
    assert!(checked_call > 0 && checked_abs > 0, "calls {checked_call}, 32S {checked_abs}");
}

#[test]
fn modmetadata_names_the_module_its_version_and_its_dependencies() {
    let Some(ko) = load("modmetadata") else { return };
    let recs = sets::modmetadata(&ko).unwrap();
    let depends: Vec<(String, i32, i32)> = recs
        .iter()
        .filter_map(|r| match r {
            ModRecord::Depend { cval, min, max, .. } => Some((cval.clone(), *min, *max)),
            _ => None,
        })
        .collect();
    assert_eq!(
        depends,
        vec![("kernel".into(), 1500068, 1599999), ("pci".into(), 1, 1), ("acpi".into(), 1, 1)]
    );
    assert!(recs.contains(&ModRecord::Version { cval: "nvme_hotplug".into(), version: 1 }));
    let modules: Vec<_> = recs.iter().filter(|r| matches!(r, ModRecord::Module { .. })).collect();
    assert_eq!(modules.len(), 1);
    let ModRecord::Module { cval, name, evhand, priv_, data } = modules[0].clone() else { unreachable!() };
    // DRIVER_MODULE(nvme_hotplug, pci, ...) in FreeBSD 15 <sys/bus.h>: module "pci/nvme_hotplug".
    assert_eq!(cval, "nvme_hotplug_pci");
    assert_eq!(name, "pci/nvme_hotplug");
    assert_eq!(Some(data), ko.symbol("nvme_hotplug_pci_mod"));
    // Its event handler is the kernel's driver_module_handler, with the driver_module_data as
    // argument; that names the bus, the driver class "nvmehp" and the chained handler.
    assert_eq!(Some(evhand), ko.import("driver_module_handler"));
    let dmd: layouts::driver_module_data = ko.read(priv_).unwrap();
    assert_eq!(ko.read_cstr(dmd.dmd_busname as u64).unwrap(), "pci");
    let class: layouts::kobj_class = ko.read(dmd.dmd_driver as u64).unwrap();
    assert_eq!(ko.read_cstr(class.name as u64).unwrap(), "nvmehp");
    assert_eq!(dmd.dmd_chainevh.map(|f| f as usize as u64), ko.symbol("nvmehp_modevent"));
}

#[test]
fn sysinits_run_malloc_init_before_module_registration_and_sysctls_hang_under_hw() {
    let Some(ko) = load("sysinits") else { return };
    let si = sets::sysinits(&ko).unwrap();
    let funcs: Vec<_> = si.iter().map(|s| ko.describe(s.func)).collect();
    assert_eq!(funcs, ["malloc_init (function (not emulated))", "module_register_init (function (not emulated))"]);
    assert_eq!((si[0].subsystem, si[1].subsystem), (layouts::SI_SUB_KMEM, layouts::SI_SUB_DRIVERS));
    // MALLOC_DEFINE's struct malloc_type, with the version malloc_init checks.
    let mt: layouts::malloc_type = ko.read(si[0].udata).unwrap();
    assert_eq!(mt.ks_version, layouts::M_VERSION as u64);
    assert_eq!(ko.read_cstr(mt.ks_shortdesc as u64).unwrap(), "nvme_hotplug");
    assert_eq!(Some(si[1].udata), ko.symbol("nvme_hotplug_pci_mod"));
    let su = sets::sysuninits(&ko).unwrap();
    assert_eq!(su.len(), 1);
    assert_eq!(su[0].func, ko.import("malloc_uninit").unwrap());
    assert_eq!(su[0].udata, si[0].udata);

    let oids = sets::sysctls(&ko).unwrap();
    let paths: Vec<&str> = oids.iter().map(|o| o.path.as_str()).collect();
    for p in ["hw.nvme_hotplug", "hw.nvme_hotplug.claim", "hw.nvme_hotplug.acpi_mode", "hw.nvme_hotplug.leaked_buffers"] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    let node = oids.iter().find(|o| o.path == "hw.nvme_hotplug").unwrap();
    assert_eq!(node.ctl_type(), layouts::CTLTYPE_NODE as u32);
    let claim = oids.iter().find(|o| o.path == "hw.nvme_hotplug.claim").unwrap();
    assert_eq!(claim.ctl_type(), layouts::CTLTYPE_INT as u32);
    assert_ne!(claim.kind & layouts::CTLFLAG_TUN as u32, 0, "claim is a loader tunable (CTLFLAG_RWTUN)");
}
