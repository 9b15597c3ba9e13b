/*
 * C glue for nvme_hotplug: only what needs C macros. The driver itself is Rust (src/freebsd/).
 *
 * - the newbus driver "nvmehp" on the pci bus, whose kobj methods are Rust functions;
 * - the module metadata: version, dependencies on pci and acpi (the kernel dependency comes
 *   from DECLARE_MODULE via __FreeBSD_version);
 * - the malloc(9) type and the hw.nvme_hotplug sysctl tree;
 * - one-line wrappers for KPI macros and static inline functions.
 */
#define	NVMEHP_GLUE_RUST_ENTRY_POINTS
#include "kpi.h"

MALLOC_DEFINE(M_NVMEHP, "nvme_hotplug", "nvme_hotplug driver state and queues");

/* --- hw.nvme_hotplug sysctl tree and tunables ----------------------------------------------- */

SYSCTL_NODE(_hw, OID_AUTO, nvme_hotplug, CTLFLAG_RD | CTLFLAG_MPSAFE, 0,
    "NVMe hot-attach and hot-detach (nvme_hotplug(4))");

/*
 * 0 (default): never bid for a controller; attach only where devctl(8) "set driver" names nvmehp.
 * 1: bid at BUS_PROBE_HOOVER, below nvme(4)'s DEFAULT and GENERIC bids, so nvme(4) still wins
 *    wherever it is loaded.
 */
static int nvmehp_claim = 0;
SYSCTL_INT(_hw_nvme_hotplug, OID_AUTO, claim, CTLFLAG_RWTUN, &nvmehp_claim, 0,
    "Bid for NVMe controllers (1) or attach only when devctl set driver asks (0)");

int
nvmehp_tunable_claim(void)
{
	return (atomic_load_int(&nvmehp_claim));
}

/*
 * Who answers ACPI hotplug notifies (src/hotplug/mode.rs): "auto" owns only slots acpi_pci does
 * not handle, "own" takes every slot where acpi_pci's handler can be removed, "off" never installs
 * a notify handler. Read once, at module load.
 */
static char nvmehp_acpi_mode[8] = "auto";
SYSCTL_STRING(_hw_nvme_hotplug, OID_AUTO, acpi_mode, CTLFLAG_RDTUN, nvmehp_acpi_mode,
    sizeof(nvmehp_acpi_mode), "ACPI hotplug notify ownership: auto, own or off (loader tunable)");

void
nvmehp_tunable_acpi_mode(char *buf, int len)
{
	if (len <= 0)
		return;
	strlcpy(buf, nvmehp_acpi_mode, len);
}

/* Fallback periodic slot check for platforms whose notifies never arrive; 0 = off. */
static u_int nvmehp_rescan_interval_ms = 0;
SYSCTL_UINT(_hw_nvme_hotplug, OID_AUTO, rescan_interval_ms, CTLFLAG_RDTUN,
    &nvmehp_rescan_interval_ms, 0,
    "Periodic hotplug slot check interval in ms, 0 = off (loader tunable)");

u_int
nvmehp_tunable_rescan_interval_ms(void)
{
	return (atomic_load_int(&nvmehp_rescan_interval_ms));
}

/* NVMe engine settings (src/nvme Config), read at each attach; the engine clamps them. */
static u_int nvmehp_io_queues = 1;
SYSCTL_UINT(_hw_nvme_hotplug, OID_AUTO, io_queues, CTLFLAG_RWTUN, &nvmehp_io_queues, 0,
    "I/O queue pairs requested per controller (applies at the next attach)");
static u_int nvmehp_io_entries = 256;
SYSCTL_UINT(_hw_nvme_hotplug, OID_AUTO, io_entries, CTLFLAG_RWTUN, &nvmehp_io_entries, 0,
    "Entries per I/O queue requested (applies at the next attach)");
static u_int nvmehp_cmd_timeout_ms = 30000;
SYSCTL_UINT(_hw_nvme_hotplug, OID_AUTO, cmd_timeout_ms, CTLFLAG_RWTUN, &nvmehp_cmd_timeout_ms, 0,
    "Command timeout in ms; an overdue command gives the controller up (applies at the next attach)");

u_int
nvmehp_tunable_io_queues(void)
{
	return (atomic_load_int(&nvmehp_io_queues));
}

u_int
nvmehp_tunable_io_entries(void)
{
	return (atomic_load_int(&nvmehp_io_entries));
}

u_int
nvmehp_tunable_cmd_timeout_ms(void)
{
	return (atomic_load_int(&nvmehp_cmd_timeout_ms));
}

static uint64_t nvmehp_stats[NVMEHP_STAT_COUNT];
#define	NVMEHP_STAT_SYSCTL(idx, name, descr)					\
	SYSCTL_U64(_hw_nvme_hotplug, OID_AUTO, name, CTLFLAG_RD, &nvmehp_stats[idx], 0, descr)
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_CONTROLLERS, controllers, "NVMe controllers attached now");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_ATTACHES, attaches, "Controller attaches");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_DETACHES, detaches, "Controller detaches");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_SURPRISE_REMOVALS, surprise_removals,
    "Controllers found gone (registers or config space stopped answering)");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_FAILED_REQUESTS, failed_requests,
    "I/O requests completed with ENXIO because their controller went away");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_NOTIFIES, notifies, "ACPI hotplug notifications received");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_RESCANS, rescans, "Slot rescans performed");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_EJECTS, ejects, "_EJ0 evaluations");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_EJECTS_REFUSED, ejects_refused,
    "Eject requests refused because the disk was in use");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_HOTPLUG_FAILURES, hotplug_failures,
    "Failed hotplug actions (rescan, detach, _EJ0, eject never completed)");
NVMEHP_STAT_SYSCTL(NVMEHP_STAT_LEAKED_BUFFERS, leaked_buffers,
    "I/O requests held (never completed, their pages never given back) because a controller that could not be stopped may still DMA into them");

void
nvmehp_stat_add(int which, int64_t delta)
{
	if (which >= 0 && which < NVMEHP_STAT_COUNT)
		atomic_add_64(&nvmehp_stats[which], (uint64_t)delta);
}

void
nvmehp_contig_free(void *va)
{
	free(va, M_NVMEHP);
}

struct sysctl_ctx_list *
nvmehp_sysctl_ctx_create(void)
{
	struct sysctl_ctx_list *ctx;

	ctx = malloc(sizeof(*ctx), M_NVMEHP, M_WAITOK | M_ZERO);
	sysctl_ctx_init(ctx);
	return (ctx);
}

void
nvmehp_sysctl_ctx_destroy(struct sysctl_ctx_list *ctx)
{
	sysctl_ctx_free(ctx);
	free(ctx, M_NVMEHP);
}

int
nvmehp_dev_sysctl_u64(struct sysctl_ctx_list *ctx, device_t dev, const char *name,
    uint64_t *ptr, const char *descr)
{
	struct sysctl_oid *oid;

	oid = SYSCTL_ADD_U64(ctx, SYSCTL_CHILDREN(device_get_sysctl_tree(dev)), OID_AUTO, name,
	    CTLFLAG_RD, ptr, 0, descr);
	return (oid == NULL ? ENOMEM : 0);
}

int
nvmehp_dev_sysctl_string(struct sysctl_ctx_list *ctx, device_t dev, const char *name,
    const char *value, const char *descr)
{
	struct sysctl_oid *oid;

	oid = SYSCTL_ADD_STRING(ctx, SYSCTL_CHILDREN(device_get_sysctl_tree(dev)), OID_AUTO,
	    name, CTLFLAG_RD, __DECONST(char *, value), 0, descr);
	return (oid == NULL ? ENOMEM : 0);
}

/* --- newbus driver -------------------------------------------------------------------------- */

static device_method_t nvmehp_methods[] = {
	DEVMETHOD(device_probe,		nvmehp_probe),
	DEVMETHOD(device_attach,	nvmehp_attach),
	DEVMETHOD(device_detach,	nvmehp_detach),
	DEVMETHOD(device_shutdown,	nvmehp_shutdown),
	DEVMETHOD_END
};

static driver_t nvmehp_driver = {
	"nvmehp",
	nvmehp_methods,
	sizeof(struct nvmehp_softc),
};

/*
 * nvmehp_modevent is chained by driver_module_handler(): it runs before the driver is added to
 * the pci devclass on MOD_LOAD, and after every nvmehp device has detached on MOD_UNLOAD.
 */
DRIVER_MODULE(nvme_hotplug, pci, nvmehp_driver, nvmehp_modevent, NULL);
MODULE_VERSION(nvme_hotplug, 1);
MODULE_DEPEND(nvme_hotplug, pci, 1, 1, 1);
MODULE_DEPEND(nvme_hotplug, acpi, 1, 1, 1);

/* --- wrappers for KPI macros and variadic functions ------------------------------------------ */

void
nvmehp_print(const char *msg)
{
	printf("%s", msg);
}

void
nvmehp_device_print(device_t dev, const char *msg)
{
	device_printf(dev, "%s", msg);
}

void
nvmehp_panic(const char *msg)
{
	panic("%s", msg);
}

int
nvmehp_make_dev_s(struct make_dev_args *args, struct cdev **cdev, const char *name)
{
	return (make_dev_s(args, cdev, "%s", name));
}

int
nvmehp_taskqueue_start_threads(struct taskqueue **tqp, int pri, const char *name)
{
	return (taskqueue_start_threads(tqp, 1, pri, "%s", name));
}

void
nvmehp_mtx_init(struct mtx *m, const char *name)
{
	mtx_init(m, name, NULL, MTX_DEF);
}

void
nvmehp_mtx_destroy(struct mtx *m)
{
	mtx_destroy(m);
}

/*
 * The out-of-line entry points, as a LOCK_DEBUG kernel uses: they do not bake the kernel's
 * struct thread layout (curthread) or the lock word protocol into the module.
 */
void
nvmehp_mtx_lock(struct mtx *m)
{
	_mtx_lock_flags(m, 0, __FILE__, __LINE__);
}

void
nvmehp_mtx_unlock(struct mtx *m)
{
	_mtx_unlock_flags(m, 0, __FILE__, __LINE__);
}

void
nvmehp_task_init(struct task *t, int priority, task_fn_t *func, void *context)
{
	TASK_INIT(t, priority, func, context);
}

void
nvmehp_make_dev_args_init(struct make_dev_args *args)
{
	make_dev_args_init(args);
}

int
nvmehp_bus_dmamap_create(bus_dma_tag_t tag, int flags, bus_dmamap_t *mapp)
{
	return (bus_dmamap_create(tag, flags, mapp));
}

int
nvmehp_bus_dmamap_destroy(bus_dma_tag_t tag, bus_dmamap_t map)
{
	return (bus_dmamap_destroy(tag, map));
}

void
nvmehp_bus_dmamap_sync(bus_dma_tag_t tag, bus_dmamap_t map, int op)
{
	bus_dmamap_sync(tag, map, op);
}

void
nvmehp_bus_dmamap_unload(bus_dma_tag_t tag, bus_dmamap_t map)
{
	bus_dmamap_unload(tag, map);
}

uint32_t
nvmehp_bus_read_4(struct resource *r, bus_size_t off)
{
	return (bus_read_4(r, off));
}

void
nvmehp_bus_write_4(struct resource *r, bus_size_t off, uint32_t val)
{
	bus_write_4(r, off, val);
}

uint32_t
nvmehp_pci_read_config(device_t dev, int reg, int width)
{
	return (pci_read_config(dev, reg, width));
}

uint16_t
nvmehp_pci_get_vendor(device_t dev)
{
	return (pci_get_vendor(dev));
}

uint16_t
nvmehp_pci_get_device(device_t dev)
{
	return (pci_get_device(dev));
}

uint16_t
nvmehp_pci_get_subvendor(device_t dev)
{
	return (pci_get_subvendor(dev));
}

uint16_t
nvmehp_pci_get_subdevice(device_t dev)
{
	return (pci_get_subdevice(dev));
}

uint8_t
nvmehp_pci_get_class(device_t dev)
{
	return (pci_get_class(dev));
}

uint8_t
nvmehp_pci_get_subclass(device_t dev)
{
	return (pci_get_subclass(dev));
}

uint8_t
nvmehp_pci_get_progif(device_t dev)
{
	return (pci_get_progif(dev));
}

uint8_t
nvmehp_pci_get_slot(device_t dev)
{
	return (pci_get_slot(dev));
}

uint8_t
nvmehp_pci_get_function(device_t dev)
{
	return (pci_get_function(dev));
}

int
nvmehp_pci_enable_busmaster(device_t dev)
{
	return (pci_enable_busmaster(dev));
}

int
nvmehp_pci_msix_count(device_t dev)
{
	return (pci_msix_count(dev));
}

int
nvmehp_pci_alloc_msix(device_t dev, int *count)
{
	return (pci_alloc_msix(dev, count));
}

int
nvmehp_pci_release_msi(device_t dev)
{
	return (pci_release_msi(dev));
}

int
nvmehp_pci_disable_busmaster(device_t dev)
{
	return (pci_disable_busmaster(dev));
}

int
nvmehp_pci_msix_table_bar(device_t dev)
{
	return (pci_msix_table_bar(dev));
}

int
nvmehp_pci_msix_pba_bar(device_t dev)
{
	return (pci_msix_pba_bar(dev));
}

int
nvmehp_pci_msi_count(device_t dev)
{
	return (pci_msi_count(dev));
}

int
nvmehp_pci_alloc_msi(device_t dev, int *count)
{
	return (pci_alloc_msi(dev, count));
}

uint32_t
nvmehp_pcib_get_domain(device_t pci_bus)
{
	return (pcib_get_domain(pci_bus));
}

uint32_t
nvmehp_pcib_get_bus(device_t pci_bus)
{
	return (pcib_get_bus(pci_bus));
}

uint32_t
nvmehp_pcib_read_config(device_t pcib, u_int bus, u_int slot, u_int func, u_int reg, int width)
{
	return (PCIB_READ_CONFIG(pcib, bus, slot, func, reg, width));
}

int
nvmehp_pcib_maxfuncs(device_t pcib)
{
	return (PCIB_MAXFUNCS(pcib));
}

ACPI_HANDLE
nvmehp_acpi_get_handle(device_t dev)
{
	return (acpi_get_handle(dev));
}

void
nvmehp_pause_ms(const char *wmesg, int ms)
{
	pause_sbt(wmesg, SBT_1MS * ms, 0, 0);
}

void
nvmehp_pause_us(const char *wmesg, int us)
{
	pause_sbt(wmesg, SBT_1US * us, 0, C_PREL(1));
}

sbintime_t
nvmehp_sbinuptime(void)
{
	return (sbinuptime());
}
