//! Build script.
//!
//! Host builds (no `kld` feature): nothing to generate.
//!
//! Kernel builds (`--features kld`): runs bindgen over `kmod/kpi.h` with the flags bsd.kmod.mk
//! would use for an amd64 module, and writes
//! - `$OUT_DIR/kpi.rs`: the bindings, included by `src/freebsd/bindings.rs`;
//! - `$OUT_DIR/kpi-symbols.txt`: every kernel function and variable bindgen declared, one per
//!   line. That is the KPI the module is allowed to import: `scripts/build-kld.sh` copies it to
//!   `target/kld/kpi-symbols.txt`, checks the C glue against it, and the .ko checker
//!   (tools/kocheck) uses it as the allowlist of undefined symbols.
//!
//! Header roots:
//! - FreeBSD: `$SYSDIR` (default `/usr/src/sys`) and `$NVMEHP_KMOD_OBJDIR`, the bsd.kmod.mk object
//!   directory that holds the generated `*_if.h`, `opt_global.h` and the `machine`/`x86` links
//!   (kmod/Makefile sets it).
//! - Anywhere else (a Linux cross-build): the FreeBSD 15 headers from the ziglang wheel
//!   (`$NVMEHP_FBSD_INCLUDE`, default `.cache/freebsd-include`, fetched by
//!   scripts/freebsd-headers.sh) behind the project's stand-ins in `kmod/include/`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "kld")]
    kld::generate();
}

#[cfg(feature = "kld")]
mod kld {
    use std::env;
    use std::fs;
    use std::path::{Path, PathBuf};

    /// 15.0-RELEASE. zig strips `__FreeBSD_version` from its headers; its own value (1500500)
    /// would make DECLARE_MODULE's kernel dependency exclude 15.0 itself.
    const FREEBSD_VERSION: &str = "1500068";

    /// Kernel functions the Rust side or the C glue calls (the glue's through macros).
    const KPI_FUNCTIONS: &[&str] = &[
        // malloc(9), contigmalloc(9)
        "malloc", "malloc_aligned", "free", "contigmalloc",
        // kernel messages and panic(9)
        "printf", "panic", "device_printf",
        // newbus
        "device_get_softc", "device_get_nameunit", "device_get_parent", "device_set_desc",
        "device_get_name", "device_get_unit", "device_is_alive", "devclass_find", "devclass_get_maxunit",
        "devclass_get_device",
        // newbus device state and busy references (kldunload walk, sleeping operations)
        "device_is_attached", "device_get_state", "device_busy", "device_unbusy",
        "device_delete_child", "bus_alloc_resource", "bus_release_resource", "rman_get_size",
        // memory helpers LLVM may call for copies (kernel exports: sys/libkern/memcpy.c etc.)
        "memcpy", "memmove", "memset", "memcmp",
        // time and pmap (binuptime: the glue's sbinuptime(), inline in <sys/time.h>, calls it)
        "DELAY", "binuptime", "pmap_kextract", "pause_sbt",
        // the glue's sysctls and counters
        "strlcpy",
        // CStr::from_ptr (libkern strlen, a kernel export)
        "strlen",
        // taskqueue(9)
        "taskqueue_create", "taskqueue_start_threads", "taskqueue_thread_enqueue",
        "taskqueue_enqueue", "taskqueue_drain", "taskqueue_drain_all", "taskqueue_free",
        "_timeout_task_init", "taskqueue_enqueue_timeout_sbt",
        "taskqueue_drain_timeout",
        // interrupts, callout(9)
        "bus_setup_intr", "bus_teardown_intr",
        "_callout_init_lock", "callout_reset_sbt_on", "_callout_stop_safe",
        // disk(9)
        "disk_alloc", "disk_create", "disk_gone", "disk_destroy", "biodone",
        // bioq: bios waiting for a free tracker (functions of sys/kern/subr_disk.c, declared
        // in <sys/bio.h>)
        "bioq_init", "bioq_insert_tail", "bioq_insert_head", "bioq_takefirst",
        // busdma(9): the payload tag and loading a bio (the map operations are inline on
        // amd64: the glue wraps them)
        "bus_get_dma_tag", "bus_dma_tag_create", "bus_dma_tag_destroy", "bus_dmamap_load_bio",
        // newbus topology changes (under bus_topo_lock)
        "bus_topo_lock", "bus_topo_unlock", "device_detach", "device_find_child", "pci_find_dbsf",
        // single-slot rescan (pci_private.h): what pci_rescan_method does for one new function
        "pci_read_device", "pci_add_child", "device_probe_and_attach",
        // ACPICA and the FreeBSD ACPI driver
        "AcpiGetHandle", "AcpiGetName", "AcpiWalkNamespace", "AcpiEvaluateObject",
        "AcpiInstallNotifyHandler", "AcpiRemoveNotifyHandler", "AcpiOsWaitEventsComplete",
        "acpi_get_device", "acpi_GetInteger", "acpi_SetInteger",
        // make_dev(9)/destroy_dev(9)
        "make_dev_s", "make_dev_args_init_impl", "destroy_dev", "destroy_dev_sched_cb",
        "destroy_dev_drain",
        // behind the glue's macros: mtx(9), module and driver declarations, kobj, sysctl(9)
        "_mtx_init", "_mtx_destroy", "__mtx_lock_flags", "__mtx_unlock_flags",
        "driver_module_handler", "module_register_init", "malloc_init", "malloc_uninit",
        "kobj_lookup_method", "sysctl_handle_int", "sysctl_handle_64", "sysctl_handle_string",
        "sysctl_ctx_init", "sysctl_ctx_free", "sysctl_add_oid", "device_get_sysctl_tree",
        // -fstack-protector in the glue
        "__stack_chk_fail",
    ];

    /// Kernel variables referenced by the glue (kobj method descriptors, the sysctl parent
    /// node, the stack guard) or by every module (the pcpu linker set bounds of <sys/pcpu.h>).
    const KPI_VARIABLES: &[&str] = &[
        "device_probe_desc", "device_attach_desc", "device_detach_desc", "device_shutdown_desc",
        "bus_read_ivar_desc", "bus_write_ivar_desc",
        "pci_read_config_desc", "pci_write_config_desc", "pcib_read_config_desc", "pcib_maxfuncs_desc",
        "pci_enable_busmaster_desc", "pci_alloc_msix_desc", "pci_release_msi_desc",
        "pci_msix_count_desc",
        "pci_disable_busmaster_desc", "pci_alloc_msi_desc", "pci_msi_count_desc",
        "pci_msix_table_bar_desc", "pci_msix_pba_bar_desc",
        "sysctl___hw", "__stack_chk_guard", "__start_set_pcpu", "__stop_set_pcpu",
    ];

    /// Macro constants the Rust side uses.
    const KPI_CONSTANTS: &[&str] = &[
        "M_NOWAIT", "M_WAITOK", "M_ZERO", "PAGE_SIZE", "PWAIT", "MTX_DEF",
        "ENXIO", "ENOMEM", "EBUSY", "EFAULT", "EFBIG", "EINVAL", "EIO", "ENOTTY", "EOPNOTSUPP", "EEXIST", "ENAMETOOLONG", "SPECNAMELEN",
        "SYS_RES_MEMORY", "RF_ACTIVE", "BUS_PROBE_LOW_PRIORITY", "BUS_PROBE_NOWILDCARD",
        "BUS_PROBE_DEFAULT", "BUS_PROBE_GENERIC", "BUS_PROBE_HOOVER",
        "PCIR_VENDOR", "PCIR_COMMAND", "PCIM_CMD_BUSMASTEREN", "PCIR_HDRTYPE", "PCIM_HDRTYPE", "PCI_MAXHDRTYPE", "PCIM_MFDEV", "PCI_FUNCMAX", "PCI_SLOTMAX", "PCIC_STORAGE", "PCIS_STORAGE_NVM", "PCIP_STORAGE_NVM_ENTERPRISE_NVMHCI_1_0",
        "MAKEDEV_WAITOK", "MAKEDEV_NOWAIT", "MAKEDEV_CHECKNAME", "UID_ROOT", "GID_OPERATOR", "D_VERSION", "BUS_SPACE_MAXADDR",
        "ACPI_SYSTEM_NOTIFY", "ACPI_TYPE_DEVICE", "ACPI_TYPE_INTEGER", "ACPI_TYPE_BUFFER",
        "ACPI_FULL_PATHNAME", "SYS_RES_IRQ", "RF_SHAREABLE", "CS_DRAIN", "DISK_VERSION", "DISK_RR_NON_ROTATING",
        "DISKFLAG_.*", "BIO_READ", "BIO_WRITE", "BIO_FLUSH", "BIO_DELETE", "BIO_ERROR", "BIO_UNMAPPED",
        "BUS_DMA_NOWAIT", "BUS_DMASYNC_PREREAD", "BUS_DMASYNC_PREWRITE", "BUS_DMASYNC_POSTREAD",
        "BUS_DMASYNC_POSTWRITE",
    ];

    pub fn generate() {
        let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        let kmod = manifest.join("kmod");
        for f in ["kpi.h", "nvme_hotplug_glue.h"] {
            println!("cargo:rerun-if-changed={}", kmod.join(f).display());
        }
        println!("cargo:rerun-if-changed={}", kmod.join("include").display());
        for v in ["SYSDIR", "NVMEHP_KMOD_OBJDIR", "NVMEHP_FBSD_INCLUDE"] {
            println!("cargo:rerun-if-env-changed={v}");
        }

        let mut args: Vec<String> = [
            "-target", "x86_64-unknown-freebsd15.0",
            "-nostdinc", "-ffreestanding", "-mcmodel=kernel", "-mno-red-zone",
            "-mno-mmx", "-mno-sse", "-mno-avx", "-msoft-float",
            "-D_KERNEL", "-DKLD_MODULE", "-D__SSP_FORTIFY_LEVEL=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("-D__FreeBSD_version={FREEBSD_VERSION}"));
        args.push(format!("-I{}", kmod.display()));
        for dir in include_roots(&manifest, &kmod) {
            if !dir.is_dir() {
                panic!(
                    "FreeBSD header directory {} is missing: run scripts/freebsd-headers.sh \
                     (Linux) or set SYSDIR / NVMEHP_KMOD_OBJDIR (FreeBSD)",
                    dir.display()
                );
            }
            args.push(format!("-I{}", dir.display()));
        }
        args.extend(["-include".to_string(), "opt_global.h".to_string()]);

        let mut b = bindgen::Builder::default()
            .header(kmod.join("kpi.h").display().to_string())
            .clang_args(&args)
            .use_core()
            .ctypes_prefix("core::ffi")
            .default_macro_constant_type(bindgen::MacroTypeVariation::Signed)
            .layout_tests(true)
            .derive_default(true)
            .prepend_enum_name(false)
            .merge_extern_blocks(true)
            .generate_comments(false)
            .formatter(bindgen::Formatter::None)
            // Everything the glue header declares (its wrappers, softc, malloc type) ...
            .allowlist_file(".*/nvme_hotplug_glue\\.h")
            .allowlist_type("modeventtype")
            .allowlist_type("module_t")
            .allowlist_type("ACPI_OBJECT")
            .allowlist_type("ACPI_OBJECT_LIST")
            .allowlist_type("ACPI_BUFFER")
            .allowlist_type("intr_type")
            // Only ever passed back to the kernel (pci_read_device -> pci_add_child): its layout
            // is pci(4)'s business, and stays out of the bindings on native builds too.
            .opaque_type("pci_devinfo")
            // ... except the Rust entry points, which the glue calls and Rust defines.
            .blocklist_function("nvmehp_(probe|attach|detach|shutdown|modevent)");
        for f in KPI_FUNCTIONS {
            b = b.allowlist_function(format!("^{f}$"));
        }
        for v in KPI_VARIABLES.iter().chain(KPI_CONSTANTS) {
            b = b.allowlist_var(format!("^{v}$"));
        }
        let bindings = b.generate().expect("bindgen failed on kmod/kpi.h");
        let text = bindings.to_string();
        fs::write(out.join("kpi.rs"), &text).expect("write kpi.rs");

        let mut names = declared_symbols(&text);
        // The glue defines its own wrappers and the malloc type: they are not imports.
        names.retain(|n| !n.starts_with("nvmehp_") && n != "M_NVMEHP");
        names.sort();
        names.dedup();
        let missing: Vec<&&str> = KPI_FUNCTIONS
            .iter()
            .chain(KPI_VARIABLES)
            .filter(|n| !names.iter().any(|m| m == **n))
            .collect();
        if !missing.is_empty() {
            panic!("kpi.h does not declare {missing:?}: the headers changed, fix kmod/kpi.h");
        }
        fs::write(out.join("kpi-symbols.txt"), names.join("\n") + "\n").expect("write kpi-symbols.txt");
    }

    fn include_roots(manifest: &Path, kmod: &Path) -> Vec<PathBuf> {
        let host_is_freebsd = cfg!(target_os = "freebsd");
        if host_is_freebsd && env::var_os("NVMEHP_FBSD_INCLUDE").is_none() {
            let sysdir = PathBuf::from(env::var_os("SYSDIR").unwrap_or_else(|| "/usr/src/sys".into()));
            let objdir = env::var_os("NVMEHP_KMOD_OBJDIR").map(PathBuf::from).unwrap_or_else(|| {
                panic!("NVMEHP_KMOD_OBJDIR is not set: build the kld with `make -C kmod` on FreeBSD")
            });
            vec![objdir, sysdir.clone(), sysdir.join("contrib/ck/include")]
        } else {
            let inc = env::var_os("NVMEHP_FBSD_INCLUDE")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join(".cache/freebsd-include"));
            vec![kmod.join("include"), inc.join("x86_64-freebsd-none"), inc.join("generic-freebsd")]
        }
    }

    /// Names of the functions and statics in the `extern "C"` blocks of the (unformatted)
    /// bindings: exactly the symbols the module may import.
    fn declared_symbols(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("extern \"C\" {") {
            let block = &rest[start + 12..];
            let end = block.find('}').unwrap_or(block.len());
            let body = &block[..end];
            for kw in ["pub fn ", "pub static mut ", "pub static "] {
                let mut s = body;
                while let Some(i) = s.find(kw) {
                    let after = &s[i + kw.len()..];
                    let name: String = after
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "mut" {
                        names.push(name);
                    }
                    s = &after[1.min(after.len())..];
                }
            }
            rest = &block[end..];
        }
        names
    }
}
