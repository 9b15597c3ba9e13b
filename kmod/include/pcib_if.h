/*
 * Stand-in for the generated pcib_if.h (FreeBSD sys/dev/pci/pcib_if.m, run through
 * makeobjops.awk at kernel build time). Declares only PCIB_READ_CONFIG and PCIB_MAXFUNCS,
 * dispatched like the generated header does: config reads of a slot that has no device_t (yet, or
 * any more), and the highest function number below the bridge (PCI_FUNCMAX, or more with ARI).
 * Used only for Linux cross-builds; a native FreeBSD build uses the generated header.
 */
#ifndef _NVMEHP_PCIB_IF_H_
#define _NVMEHP_PCIB_IF_H_

extern struct kobjop_desc pcib_read_config_desc;
typedef u_int32_t pcib_read_config_t(device_t dev, u_int bus, u_int slot, u_int func,
    u_int reg, int width);
static __inline u_int32_t
PCIB_READ_CONFIG(device_t dev, u_int bus, u_int slot, u_int func, u_int reg, int width)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pcib_read_config);
	return (((pcib_read_config_t *)_m)(dev, bus, slot, func, reg, width));
}

extern struct kobjop_desc pcib_maxfuncs_desc;
typedef int pcib_maxfuncs_t(device_t dev);
static __inline int
PCIB_MAXFUNCS(device_t dev)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pcib_maxfuncs);
	return (((pcib_maxfuncs_t *)_m)(dev));
}

#endif
