//! The FreeBSD 15 KPI nvme_hotplug.ko links against, as a [`KpiTable`].
//!
//! Every name is one the kld may import (build.rs KPI_FUNCTIONS / KPI_VARIABLES at the root of
//! the repository, which bindgen checks against the FreeBSD headers), written out here rather
//! than read from the .ko, so the load test really checks the module's imports against an
//! independent list. Here every function gets a trap trampoline that names it and aborts if the
//! module calls it; `emu::table()` replaces the ones the emulated kernel implements. Data
//! objects are zeroed and sized from the bindgen'd layouts.

use crate::kpi::{Import, KpiTable};
use crate::layouts;
use std::mem::{align_of, size_of};

/// KPI functions the module may call.
pub const FUNCTIONS: &[&str] = &[
    // malloc(9), contigmalloc(9)
    "malloc", "malloc_aligned", "free", "contigmalloc", "malloc_init", "malloc_uninit",
    // console, panic(9)
    "printf", "device_printf", "panic",
    // libkern
    "memcpy", "memmove", "memset", "memcmp", "strlcpy", "strlen", "__stack_chk_fail",
    // newbus
    "device_get_softc", "device_get_nameunit", "device_get_parent", "device_set_desc",
    "device_get_name", "device_get_unit", "devclass_find", "devclass_get_maxunit",
    "devclass_get_device", "device_is_attached", "device_is_alive", "device_get_state", "device_busy",
    "device_unbusy", "device_delete_child", "bus_alloc_resource", "bus_release_resource",
    "rman_get_size", "bus_setup_intr", "bus_teardown_intr", "bus_topo_lock", "bus_topo_unlock",
    "device_detach", "device_find_child", "device_probe_and_attach", "device_get_sysctl_tree",
    "driver_module_handler", "module_register_init", "kobj_lookup_method",
    // pci(4)
    "pci_find_dbsf", "pci_read_device", "pci_add_child",
    // time, pmap
    "DELAY", "binuptime", "getbinuptime", "pmap_kextract", "pause_sbt",
    // taskqueue(9), callout(9)
    "taskqueue_create", "taskqueue_start_threads", "taskqueue_thread_enqueue", "taskqueue_enqueue",
    "taskqueue_drain", "taskqueue_drain_all", "taskqueue_free", "_timeout_task_init",
    "taskqueue_enqueue_timeout_sbt", "taskqueue_cancel_timeout", "taskqueue_drain_timeout",
    "_callout_init_lock", "callout_reset_sbt_on", "_callout_stop_safe",
    // mtx(9)
    "_mtx_init", "_mtx_destroy", "__mtx_lock_flags", "__mtx_unlock_flags",
    // disk(9), bio, bioq
    "disk_alloc", "disk_create", "disk_gone", "disk_destroy", "biodone", "bioq_init",
    "bioq_insert_head", "bioq_insert_tail", "bioq_takefirst",
    // busdma(9): the map operations are inline on amd64 (x86/bus_dma.h), through the tag
    "bus_get_dma_tag", "bus_dma_tag_create", "bus_dma_tag_destroy", "bus_dmamap_load_bio",
    // make_dev(9), destroy_dev(9)
    "make_dev_s", "make_dev_args_init_impl", "destroy_dev", "destroy_dev_sched_cb", "destroy_dev_drain",
    // sysctl(9)
    "sysctl_handle_int", "sysctl_handle_64", "sysctl_handle_string", "sysctl_ctx_init",
    "sysctl_ctx_free", "sysctl_add_oid",
    // ACPICA and acpi(4)
    "AcpiGetHandle", "AcpiGetName", "AcpiWalkNamespace", "AcpiEvaluateObject",
    "AcpiInstallNotifyHandler", "AcpiRemoveNotifyHandler", "acpi_get_device", "acpi_GetInteger",
    "acpi_SetInteger", "AcpiOsWaitEventsComplete",
];

/// kobj method descriptors (`struct kobjop_desc`) the driver's method table names.
pub const KOBJOP_DESCS: &[&str] = &[
    "device_probe_desc", "device_attach_desc", "device_detach_desc", "device_shutdown_desc",
    "bus_read_ivar_desc", "bus_write_ivar_desc", "bus_rescan_desc", "pci_read_config_desc",
    "pci_write_config_desc", "pcib_read_config_desc", "pcib_maxfuncs_desc",
    "pci_enable_busmaster_desc", "pci_alloc_msix_desc", "pci_release_msi_desc", "pci_msix_count_desc",
    "pci_disable_busmaster_desc", "pci_msix_table_bar_desc", "pci_msix_pba_bar_desc",
    "pci_msi_count_desc", "pci_alloc_msi_desc",
];

/// The table with every name above.
pub fn table() -> KpiTable {
    let mut t = KpiTable::new();
    for f in FUNCTIONS {
        t.unemulated(f);
    }
    for (i, d) in KOBJOP_DESCS.iter().enumerate() {
        // Each descriptor gets its unique id as kobj_register_method gives one when a class
        // using it is compiled (sys/kern/subr_kobj.c: ids count from 1, so no descriptor
        // matches the NULL method every cache slot starts with). The module's inline
        // KOBJOPLOOKUP indexes the method cache with it; the default method stays NULL.
        let mut bytes = vec![0u8; size_of::<layouts::kobjop_desc>()];
        bytes[..4].copy_from_slice(&desc_id(i).to_le_bytes());
        t.insert(d, Import::Data { bytes, align: align_of::<layouts::kobjop_desc>() });
    }
    // The `hw` sysctl root node the module's hw.nvme_hotplug node hangs from.
    t.data("sysctl___hw", size_of::<layouts::sysctl_oid>(), align_of::<layouts::sysctl_oid>());
    // The kernel's per-CPU set bounds (<sys/pcpu.h> references them in every module).
    t.data("__start_set_pcpu", 8, 8);
    t.data("__stop_set_pcpu", 8, 8);
    // -fstack-protector's guard.
    t.data("__stack_chk_guard", 8, 8);
    t
}

/// The id the emulated kernel gives `KOBJOP_DESCS[index]`.
pub fn desc_id(index: usize) -> u32 {
    index as u32 + 1
}

/// The descriptor name of a kobj method id, if it is one of [`KOBJOP_DESCS`].
pub fn desc_name(id: u32) -> Option<&'static str> {
    KOBJOP_DESCS.get((id as usize).checked_sub(1)?).copied()
}
