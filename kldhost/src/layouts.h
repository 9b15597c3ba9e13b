/*
 * The FreeBSD 15 structures the kernel linker reads out of a loaded .ko, for bindgen
 * (kldhost/build.rs). The same headers, flags and stand-ins as kmod/kpi.h, so the layouts are
 * the ones nvme_hotplug.ko was compiled against.
 */
#include <sys/param.h>
#include <sys/systm.h>
#include <sys/kernel.h>
#include <sys/module.h>
#include <sys/linker_set.h>
#include <sys/bus.h>
#include <sys/malloc.h>
#include <sys/sysctl.h>
#include <sys/errno.h>
#include <sys/time.h>
#include <sys/taskqueue.h>
#include <sys/conf.h>
#include <sys/lock.h>
#include <sys/mutex.h>
#include <sys/kobj.h>
#include <sys/bio.h>
#include <sys/rman.h>
#include <machine/bus.h>
#include <machine/bus_dma.h>
#include <x86/busdma_impl.h>
#include <machine/resource.h>
#include <geom/geom_disk.h>
