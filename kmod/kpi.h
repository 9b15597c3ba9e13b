/*
 * The FreeBSD kernel programming interface nvme_hotplug uses, in one place.
 *
 * build.rs runs bindgen over this file (with allowlists naming each function, variable, type and
 * constant the Rust side uses), and nvme_hotplug_glue.c includes it too, so the Rust bindings and
 * the C glue are compiled against exactly the same declarations. The list of every function and
 * variable bindgen declared is written to target/kld/kpi-symbols.txt: it is the allowlist of
 * undefined symbols the finished .ko may have.
 *
 * Header roots: $SYSDIR (default /usr/src/sys) plus the bsd.kmod.mk object directory on FreeBSD;
 * on Linux the FreeBSD 15 headers from the ziglang wheel (scripts/freebsd-headers.sh) plus the
 * project's stand-ins in kmod/include/ for what that header set lacks.
 */
#ifndef _NVMEHP_KPI_H_
#define _NVMEHP_KPI_H_

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/kernel.h>
#include <sys/module.h>
#include <sys/bus.h>
#include <sys/malloc.h>
#include <sys/lock.h>
#include <sys/mutex.h>
#include <sys/taskqueue.h>
#include <sys/sysctl.h>
#include <sys/conf.h>
#include <sys/callout.h>
#include <sys/bio.h>
#include <sys/rman.h>
#include <sys/time.h>

#include <machine/bus.h>
#include <machine/bus_dma.h>
#include <machine/resource.h>

#include <geom/geom_disk.h>

#include <vm/vm.h>
#include <vm/pmap.h>

#include <dev/pci/pcireg.h>
#include <dev/pci/pcivar.h>
#include <dev/pci/pci_private.h>
#include "pcib_if.h"

#include <contrib/dev/acpica/include/acpi.h>
#include <dev/acpica/acpivar.h>

#include "nvme_hotplug_glue.h"

#endif
