/*
 * Stand-in for the generated bus_if.h (FreeBSD sys/kern/bus_if.m, run through makeobjops.awk at
 * kernel build time). Declares only the methods nvme_hotplug calls: READ_IVAR/WRITE_IVAR (behind
 * the pci_get_*() accessors). The inline dispatchers do what the generated ones do:
 * look the method up in the object's kobj ops cache and call it.
 * Used only for Linux cross-builds; a native FreeBSD build uses the generated header.
 */
#ifndef _NVMEHP_BUS_IF_H_
#define _NVMEHP_BUS_IF_H_

extern struct kobjop_desc bus_read_ivar_desc;
typedef int bus_read_ivar_t(device_t _dev, device_t _child, int _index, uintptr_t *_result);
static __inline int
BUS_READ_IVAR(device_t _dev, device_t _child, int _index, uintptr_t *_result)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)_dev)->ops, bus_read_ivar);
	return (((bus_read_ivar_t *)_m)(_dev, _child, _index, _result));
}

extern struct kobjop_desc bus_write_ivar_desc;
typedef int bus_write_ivar_t(device_t _dev, device_t _child, int _indx, uintptr_t _value);
static __inline int
BUS_WRITE_IVAR(device_t _dev, device_t _child, int _indx, uintptr_t _value)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)_dev)->ops, bus_write_ivar);
	return (((bus_write_ivar_t *)_m)(_dev, _child, _indx, _value));
}

#endif
