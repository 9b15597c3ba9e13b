/*
 * Stand-in for FreeBSD sys/dev/pci/pcivar.h, which the ziglang header set does not ship.
 * Declares only what nvme_hotplug uses: the ivar accessors for IDs (subsystem IDs too), class codes and the
 * slot/function address, pci_read_config()/pci_write_config(), bus mastering (on and off) and MSI-X/MSI
 * allocation with the MSI-X table and PBA BARs, the bus and domain ivars of a
 * pci bus (read from its bridge), and pci_find_dbsf(). The ivar numbers are positions in the
 * real `enum pci_device_ivars` / `enum pcib_device_ivars` of FreeBSD 15.
 * Used only for Linux cross-builds; a native FreeBSD build uses the real header.
 */
#ifndef _NVMEHP_PCIVAR_H_
#define _NVMEHP_PCIVAR_H_

#include "pci_if.h"

enum pci_device_ivars {
	PCI_IVAR_SUBVENDOR,
	PCI_IVAR_SUBDEVICE,
	PCI_IVAR_VENDOR,
	PCI_IVAR_DEVICE,
	PCI_IVAR_DEVID,
	PCI_IVAR_CLASS,
	PCI_IVAR_SUBCLASS,
	PCI_IVAR_PROGIF,
	PCI_IVAR_REVID,
	PCI_IVAR_INTPIN,
	PCI_IVAR_IRQ,
	PCI_IVAR_DOMAIN,
	PCI_IVAR_BUS,
	PCI_IVAR_SLOT,
	PCI_IVAR_FUNCTION,
};

#define	PCI_ACCESSOR(var, ivar, type)	__BUS_ACCESSOR(pci, var, PCI, ivar, type)
PCI_ACCESSOR(subvendor,	SUBVENDOR,	uint16_t)
PCI_ACCESSOR(subdevice,	SUBDEVICE,	uint16_t)
PCI_ACCESSOR(vendor,	VENDOR,		uint16_t)
PCI_ACCESSOR(device,	DEVICE,		uint16_t)
PCI_ACCESSOR(class,	CLASS,		uint8_t)
PCI_ACCESSOR(subclass,	SUBCLASS,	uint8_t)
PCI_ACCESSOR(progif,	PROGIF,		uint8_t)
PCI_ACCESSOR(slot,	SLOT,		uint8_t)
PCI_ACCESSOR(function,	FUNCTION,	uint8_t)
#undef PCI_ACCESSOR

static __inline uint32_t
pci_read_config(device_t dev, int reg, int width)
{
	return (PCI_READ_CONFIG(device_get_parent(dev), dev, reg, width));
}

static __inline void
pci_write_config(device_t dev, int reg, uint32_t val, int width)
{
	PCI_WRITE_CONFIG(device_get_parent(dev), dev, reg, val, width);
}

static __inline int
pci_enable_busmaster(device_t dev)
{
	return (PCI_ENABLE_BUSMASTER(device_get_parent(dev), dev));
}

static __inline int
pci_alloc_msix(device_t dev, int *count)
{
	return (PCI_ALLOC_MSIX(device_get_parent(dev), dev, count));
}

static __inline int
pci_release_msi(device_t dev)
{
	return (PCI_RELEASE_MSI(device_get_parent(dev), dev));
}

static __inline int
pci_msix_count(device_t dev)
{
	return (PCI_MSIX_COUNT(device_get_parent(dev), dev));
}

static __inline int
pci_disable_busmaster(device_t dev)
{
	return (PCI_DISABLE_BUSMASTER(device_get_parent(dev), dev));
}

static __inline int
pci_alloc_msi(device_t dev, int *count)
{
	return (PCI_ALLOC_MSI(device_get_parent(dev), dev, count));
}

static __inline int
pci_msi_count(device_t dev)
{
	return (PCI_MSI_COUNT(device_get_parent(dev), dev));
}

static __inline int
pci_msix_table_bar(device_t dev)
{
	return (PCI_MSIX_TABLE_BAR(device_get_parent(dev), dev));
}

static __inline int
pci_msix_pba_bar(device_t dev)
{
	return (PCI_MSIX_PBA_BAR(device_get_parent(dev), dev));
}

/* Ivars of a pci bus, answered by its parent bridge. */
enum pcib_device_ivars {
	PCIB_IVAR_DOMAIN,
	PCIB_IVAR_BUS
};

#define	PCIB_ACCESSOR(var, ivar, type)	__BUS_ACCESSOR(pcib, var, PCIB, ivar, type)
PCIB_ACCESSOR(domain,	DOMAIN,		uint32_t)
PCIB_ACCESSOR(bus,	BUS,		uint32_t)
#undef PCIB_ACCESSOR

device_t	pci_find_dbsf(uint32_t domain, uint8_t bus, uint8_t slot, uint8_t func);

#endif
