//! Build script: bindgen over `src/layouts.h` with the FreeBSD 15 amd64 kernel flags the kld
//! itself is built with (the root build.rs), so every struct the loader decodes out of the .ko
//! (`struct sysinit`, `struct mod_metadata`, `moduledata_t`, `struct mod_depend`,
//! `struct mod_version`, `struct sysctl_oid`, `struct driver_module_data`, `struct malloc_type`)
//! has the layout of the headers, not a hand-written guess. bindgen's layout tests assert the
//! sizes and field offsets.
//!
//! Header roots: `$NVMEHP_FBSD_INCLUDE` (default `.cache/freebsd-include` at the repository
//! root, fetched by scripts/freebsd-headers.sh, which `make` and `make test` run first) behind
//! the project's stand-ins in `kmod/include/`.

use std::env;
use std::fs;
use std::path::PathBuf;

/// 15.0-RELEASE, as in the root build.rs (the ziglang header set carries no `__FreeBSD_version`).
const FREEBSD_VERSION: &str = "1500068";

const TYPES: &[&str] = &[
    "sysinit", "sysinit_sub_id", "sysinit_elem_order", "mod_metadata", "moduledata",
    "moduledata_t", "mod_depend", "mod_version", "modeventtype", "sysctl_oid",
    "driver_module_data", "malloc_type", "malloc_type_internal", "kobj_class", "task",
    "timeout_task", "bintime", "cdev", "cdevsw", "make_dev_args",
    // newbus, PCI resources, disk(9), sysctl(9) contexts (the device attach path)
    "kobj_ops", "kobj_method", "kobjop_desc", "resource", "disk", "bio", "sysctl_ctx_list",
    "device_state", "mtx",
    // busdma(9) on amd64 (the tag's method table the inline map operations call) and bioq
    "bus_dma_tag_common", "bus_dma_impl", "bus_dma_segment", "bio_queue_head",
];

const CONSTANTS: &[&str] = &[
    "MDT_STRUCT_VERSION", "MDT_DEPEND", "MDT_MODULE", "MDT_VERSION", "MDT_PNP_INFO",
    "MDT_SETNAME", "M_VERSION", "CTLTYPE", "CTLTYPE_.*", "CTLFLAG_.*", "OID_AUTO",
    "M_NOWAIT", "M_WAITOK", "M_ZERO", "EBUSY", "EINVAL", "ENOMEM", "EOPNOTSUPP", "EWOULDBLOCK", "TASK_ENQUEUED",
    "EEXIST", "ENAMETOOLONG", "MAKEDEV_.*", "SI_ETERNAL", "SI_NAMED", "SPECNAMELEN",
    "ENXIO", "ENOENT", "ENODEV", "KOBJ_CACHE_SIZE", "DS_.*", "DF_.*", "BUS_PROBE_.*", "SYS_RES_.*", "RF_ACTIVE",
    "X86_BUS_SPACE_MEM", "CTLFLAG_TUN", "DISK_VERSION", "DISK_VERSION_.*", "BIO_READ", "BIO_WRITE", "BIO_ERROR", "BIO_DONE",
    "BUS_DMA_NOWAIT", "BUS_DMA_WAITOK", "BUS_DMASYNC_.*", "BIO_UNMAPPED", "BIO_VLIST", "EFBIG", "EFAULT",
    "BIO_GETATTR", "ENOIOCTL", "DISKFLAG_CANDELETE", "DISKFLAG_UNMAPPED_BIO",
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("kldhost/ lives in the repository").to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let kmod = root.join("kmod");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/layouts.h");
    println!("cargo:rerun-if-env-changed=NVMEHP_FBSD_INCLUDE");

    let inc = env::var_os("NVMEHP_FBSD_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/freebsd-include"));
    let roots = [kmod.join("include"), inc.join("x86_64-freebsd-none"), inc.join("generic-freebsd")];
    for dir in &roots {
        if !dir.is_dir() {
            panic!(
                "FreeBSD header directory {} is missing: run scripts/freebsd-headers.sh \
                 (make and make test do) or set NVMEHP_FBSD_INCLUDE",
                dir.display()
            );
        }
    }
    let mut args: Vec<String> = [
        "-target", "x86_64-unknown-freebsd15.0", "-nostdinc", "-ffreestanding", "-mcmodel=kernel",
        "-mno-red-zone", "-mno-mmx", "-mno-sse", "-mno-avx", "-msoft-float", "-D_KERNEL",
        "-DKLD_MODULE", "-D__SSP_FORTIFY_LEVEL=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("-D__FreeBSD_version={FREEBSD_VERSION}"));
    args.push(format!("-I{}", kmod.display()));
    for dir in &roots {
        args.push(format!("-I{}", dir.display()));
    }
    args.extend(["-include".to_string(), "opt_global.h".to_string()]);

    let mut b = bindgen::Builder::default()
        .header(manifest.join("src/layouts.h").display().to_string())
        .clang_args(&args)
        .layout_tests(true)
        .derive_default(true)
        .derive_debug(true)
        .prepend_enum_name(false)
        .generate_comments(false)
        .default_macro_constant_type(bindgen::MacroTypeVariation::Signed)
        .formatter(bindgen::Formatter::None);
    for t in TYPES {
        b = b.allowlist_type(format!("^{t}$"));
    }
    for c in CONSTANTS {
        b = b.allowlist_var(format!("^{c}$"));
    }
    let bindings = b.generate().expect("bindgen failed on kldhost/src/layouts.h");
    fs::write(out.join("layouts.rs"), bindings.to_string()).expect("write layouts.rs");
}
