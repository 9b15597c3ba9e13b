/*
 * The interface between the C glue (nvme_hotplug_glue.c) and the Rust side.
 *
 * The glue exists only for what C macros must do: linker-set declarations (DRIVER_MODULE,
 * MODULE_VERSION, MODULE_DEPEND, MALLOC_DEFINE, SYSCTL_*), the kobj method table, and one-line
 * wrappers for KPI entry points that are macros or static inline functions and therefore have no
 * symbol Rust could call. Everything declared here is defined in the glue, except the functions
 * under "Implemented in Rust", which the glue calls.
 */
#ifndef _NVMEHP_GLUE_H_
#define _NVMEHP_GLUE_H_

/* The driver's malloc(9) type: every allocation of the module is accounted to it (vmstat -m). */
MALLOC_DECLARE(M_NVMEHP);

/*
 * Constants bindgen cannot evaluate: function-like macros and the cast expressions ACPICA uses
 * (`(ACPI_STATUS) 0x0005`). As enumerators they keep their header-derived values.
 */
enum {
	NVMEHP_PCIR_BAR0 = PCIR_BAR(0),
	NVMEHP_AE_OK = AE_OK,
	NVMEHP_AE_NO_MEMORY = AE_NO_MEMORY,
	NVMEHP_AE_NOT_FOUND = AE_NOT_FOUND,
	NVMEHP_AE_ALREADY_EXISTS = AE_ALREADY_EXISTS,
	NVMEHP_ACPI_NOTIFY_BUS_CHECK = ACPI_NOTIFY_BUS_CHECK,
	NVMEHP_ACPI_NOTIFY_DEVICE_CHECK = ACPI_NOTIFY_DEVICE_CHECK,
	NVMEHP_ACPI_NOTIFY_EJECT_REQUEST = ACPI_NOTIFY_EJECT_REQUEST,
};

/* Newbus softc: one pointer to the Rust-owned per-device state (NULL until attach succeeds). */
struct nvmehp_softc {
	void	*nvmehp_state;
};

/* hw.nvme_hotplug.claim: see nvme_hotplug(4). Read atomically. */
int	nvmehp_tunable_claim(void);

/*
 * hw.nvme_hotplug.acpi_mode (loader tunable, "auto" | "own" | "off"): copies the NUL-terminated
 * value into buf (at most len bytes, always terminated).
 */
void	nvmehp_tunable_acpi_mode(char *buf, int len);
/* hw.nvme_hotplug.rescan_interval_ms (loader tunable; 0 = no periodic rescan). */
u_int	nvmehp_tunable_rescan_interval_ms(void);
/* Engine tunables, read at each attach: io_queues, io_entries, cmd_timeout_ms. */
u_int	nvmehp_tunable_io_queues(void);
u_int	nvmehp_tunable_io_entries(void);
u_int	nvmehp_tunable_cmd_timeout_ms(void);

/*
 * Read-only counters under hw.nvme_hotplug (sysctl -a hw.nvme_hotplug). Rust adds to them with
 * nvmehp_stat_add(); CONTROLLERS is a gauge (attached controllers), the others only grow.
 */
enum nvmehp_stat {
	NVMEHP_STAT_CONTROLLERS,
	NVMEHP_STAT_ATTACHES,
	NVMEHP_STAT_DETACHES,
	NVMEHP_STAT_SURPRISE_REMOVALS,
	NVMEHP_STAT_FAILED_REQUESTS,
	NVMEHP_STAT_NOTIFIES,
	NVMEHP_STAT_RESCANS,
	NVMEHP_STAT_EJECTS,
	NVMEHP_STAT_EJECTS_REFUSED,
	NVMEHP_STAT_HOTPLUG_FAILURES,
	NVMEHP_STAT_LEAKED_BUFFERS,
	NVMEHP_STAT_COUNT
};
void	nvmehp_stat_add(int which, int64_t delta);

/*
 * The variadic KPI, called with a fixed "%s" format: the Rust side formats its text itself and
 * never makes a variadic call or passes a format string it built.
 */
void	nvmehp_print(const char *msg);
void	nvmehp_device_print(device_t dev, const char *msg);
void	nvmehp_panic(const char *msg) __dead2;
int	nvmehp_make_dev_s(struct make_dev_args *args, struct cdev **cdev, const char *name);
int	nvmehp_taskqueue_start_threads(struct taskqueue **tqp, int pri, const char *name);

/* mtx(9) with MTX_DEF; the lock/unlock wrappers call the out-of-line _mtx_*_flags entry points. */
void	nvmehp_mtx_init(struct mtx *m, const char *name);
void	nvmehp_mtx_destroy(struct mtx *m);
void	nvmehp_mtx_lock(struct mtx *m);
void	nvmehp_mtx_unlock(struct mtx *m);

/* TASK_INIT(9) */
void	nvmehp_task_init(struct task *t, int priority, task_fn_t *func, void *context);

/* make_dev_args_init(9) */
void	nvmehp_make_dev_args_init(struct make_dev_args *args);

/* bus_read_4(9)/bus_write_4(9) on a resource from bus_alloc_resource(9). */
uint32_t nvmehp_bus_read_4(struct resource *r, bus_size_t off);
void	nvmehp_bus_write_4(struct resource *r, bus_size_t off, uint32_t val);

/* pci(9) accessors (kobj dispatch to the parent bus). */
uint32_t nvmehp_pci_read_config(device_t dev, int reg, int width);
uint16_t nvmehp_pci_get_vendor(device_t dev);
uint16_t nvmehp_pci_get_device(device_t dev);
uint16_t nvmehp_pci_get_subvendor(device_t dev);
uint16_t nvmehp_pci_get_subdevice(device_t dev);
uint8_t	nvmehp_pci_get_class(device_t dev);
uint8_t	nvmehp_pci_get_subclass(device_t dev);
uint8_t	nvmehp_pci_get_progif(device_t dev);
uint8_t	nvmehp_pci_get_slot(device_t dev);
uint8_t	nvmehp_pci_get_function(device_t dev);

/* pci(9) bus mastering and MSI-X (kobj dispatch to the parent bus). */
int	nvmehp_pci_enable_busmaster(device_t dev);
int	nvmehp_pci_msix_count(device_t dev);
int	nvmehp_pci_alloc_msix(device_t dev, int *count);
int	nvmehp_pci_release_msi(device_t dev);

/*
 * Turns bus mastering off (PCIM_CMD_BUSMASTEREN): a still-present device can no longer start
 * DMA. For a controller that could not be stopped, and at the end of a detach (as
 * nvme_pci_detach does).
 */
int	nvmehp_pci_disable_busmaster(device_t dev);

/*
 * Where the MSI-X table and PBA live (PCIR_BAR(n), or -1 without MSI-X): pci_alloc_msix()
 * fails unless both BARs are allocated and active (pci.c pci_alloc_msix_method). MSI messages
 * as the fallback.
 */
int	nvmehp_pci_msix_table_bar(device_t dev);
int	nvmehp_pci_msix_pba_bar(device_t dev);
int	nvmehp_pci_msi_count(device_t dev);
int	nvmehp_pci_alloc_msi(device_t dev, int *count);

/* A pci bus's domain and bus number (ivars of its bridge), and PCIB_READ_CONFIG on a bridge. */
uint32_t nvmehp_pcib_get_domain(device_t pci_bus);
uint32_t nvmehp_pcib_get_bus(device_t pci_bus);
uint32_t nvmehp_pcib_read_config(device_t pcib, u_int bus, u_int slot, u_int func, u_int reg,
	    int width);
/* PCIB_MAXFUNCS on a bridge: PCI_FUNCMAX, or more when ARI is enabled below it. */
int	nvmehp_pcib_maxfuncs(device_t pcib);


/* The ACPI handle of a device whose parent bus is ACPI-aware (acpi_pci), or NULL. */
ACPI_HANDLE nvmehp_acpi_get_handle(device_t dev);

/*
 * Per-device read-only counters (dev.nvmehp.N.*) in a sysctl context of the driver's own, so that
 * detach can remove them (sysctl_ctx_free waits for running handlers) before the counters' memory
 * is freed; newbus frees the device's own context only after the softc.
 */
struct sysctl_ctx_list *nvmehp_sysctl_ctx_create(void);
void	nvmehp_sysctl_ctx_destroy(struct sysctl_ctx_list *ctx);
int	nvmehp_dev_sysctl_u64(struct sysctl_ctx_list *ctx, device_t dev, const char *name,
	    uint64_t *ptr, const char *descr);
/* A read-only string, `value` constant for as long as the oid exists. */
int	nvmehp_dev_sysctl_string(struct sysctl_ctx_list *ctx, device_t dev, const char *name,
	    const char *value, const char *descr);

/*
 * Gives back one contigmalloc(9) region of the module (queues, identify and PRP list pages) with
 * free(9), which takes contigmalloc memory on FreeBSD 15 (contigfree(9) is deprecated there).
 * One function so that every return of DMA memory is a single, visible call: the host tests'
 * fake kernel records it to prove that memory a running device may still use is never freed.
 */
void	nvmehp_contig_free(void *va);

/* pause(9) for `ms` milliseconds: sleeps; never with a mutex held. */
void	nvmehp_pause_ms(const char *wmesg, int ms);

/*
 * pause(9) for `us` microseconds with half of it as slack (C_PREL(1)), as nvme(4)'s
 * nvme_ctrlr_wait_for_ready sleeps. Sleeps (dropping Giant meanwhile); busy-waits by itself
 * while the system is cold (pause_sbt). Never with a mutex held.
 */
void	nvmehp_pause_us(const char *wmesg, int us);

/* sbinuptime(9): static inline in <sys/time.h>. */
sbintime_t nvmehp_sbinuptime(void);

/*
 * busdma(9) map operations: static inline on amd64 (<x86/bus_dma.h>, WANT_INLINE_DMAMAP), where
 * they dispatch through the tag's implementation. The I/O path's data moves through them
 * (src/freebsd/busdma.rs).
 */
int	nvmehp_bus_dmamap_create(bus_dma_tag_t tag, int flags, bus_dmamap_t *mapp);
int	nvmehp_bus_dmamap_destroy(bus_dma_tag_t tag, bus_dmamap_t map);
void	nvmehp_bus_dmamap_sync(bus_dma_tag_t tag, bus_dmamap_t map, int op);
void	nvmehp_bus_dmamap_unload(bus_dma_tag_t tag, bus_dmamap_t map);

/*
 * Emitted by the compiler for -fstack-protector in the glue, defined by the kernel in
 * sys/kern/stack_protector.c. Declared so they appear in the KPI symbol list.
 */
extern long __stack_chk_guard[];
void	__stack_chk_fail(void);

#ifdef NVMEHP_GLUE_RUST_ENTRY_POINTS
/* Implemented in Rust (src/freebsd/pci_driver.rs, src/freebsd/module.rs); called by the glue. */
int	nvmehp_probe(device_t dev);
int	nvmehp_attach(device_t dev);
int	nvmehp_detach(device_t dev);
int	nvmehp_shutdown(device_t dev);
int	nvmehp_modevent(module_t mod, int what, void *arg);
#endif

#endif
