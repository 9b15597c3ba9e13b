/*
 * Stand-in for the generated pci_if.h (FreeBSD sys/dev/pci/pci_if.m, run through
 * makeobjops.awk at kernel build time). Declares only the methods behind pci_read_config() and
 * pci_write_config(), dispatched like the generated header does.
 * Used only for Linux cross-builds; a native FreeBSD build uses the generated header.
 */
#ifndef _NVMEHP_PCI_IF_H_
#define _NVMEHP_PCI_IF_H_

extern struct kobjop_desc pci_read_config_desc;
typedef uint32_t pci_read_config_t(device_t dev, device_t child, int reg, int width);
static __inline uint32_t
PCI_READ_CONFIG(device_t dev, device_t child, int reg, int width)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_read_config);
	return (((pci_read_config_t *)_m)(dev, child, reg, width));
}

extern struct kobjop_desc pci_write_config_desc;
typedef void pci_write_config_t(device_t dev, device_t child, int reg, uint32_t val, int width);
static __inline void
PCI_WRITE_CONFIG(device_t dev, device_t child, int reg, uint32_t val, int width)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_write_config);
	((pci_write_config_t *)_m)(dev, child, reg, val, width);
}

#endif
