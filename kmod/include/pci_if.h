/*
 * Stand-in for the generated pci_if.h (FreeBSD sys/dev/pci/pci_if.m, run through
 * makeobjops.awk at kernel build time). Declares only the methods behind pci_read_config(),
 * pci_write_config(), pci_enable_busmaster()/pci_disable_busmaster() and the MSI-X/MSI calls
 * nvme_hotplug uses, dispatched
 * like the generated header does.
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

extern struct kobjop_desc pci_enable_busmaster_desc;
typedef int pci_enable_busmaster_t(device_t dev, device_t child);
static __inline int
PCI_ENABLE_BUSMASTER(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_enable_busmaster);
	return (((pci_enable_busmaster_t *)_m)(dev, child));
}

extern struct kobjop_desc pci_alloc_msix_desc;
typedef int pci_alloc_msix_t(device_t dev, device_t child, int *count);
static __inline int
PCI_ALLOC_MSIX(device_t dev, device_t child, int *count)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_alloc_msix);
	return (((pci_alloc_msix_t *)_m)(dev, child, count));
}

extern struct kobjop_desc pci_release_msi_desc;
typedef int pci_release_msi_t(device_t dev, device_t child);
static __inline int
PCI_RELEASE_MSI(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_release_msi);
	return (((pci_release_msi_t *)_m)(dev, child));
}

extern struct kobjop_desc pci_msix_count_desc;
typedef int pci_msix_count_t(device_t dev, device_t child);
static __inline int
PCI_MSIX_COUNT(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_msix_count);
	return (((pci_msix_count_t *)_m)(dev, child));
}

extern struct kobjop_desc pci_disable_busmaster_desc;
typedef int pci_disable_busmaster_t(device_t dev, device_t child);
static __inline int
PCI_DISABLE_BUSMASTER(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_disable_busmaster);
	return (((pci_disable_busmaster_t *)_m)(dev, child));
}

extern struct kobjop_desc pci_alloc_msi_desc;
typedef int pci_alloc_msi_t(device_t dev, device_t child, int *count);
static __inline int
PCI_ALLOC_MSI(device_t dev, device_t child, int *count)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_alloc_msi);
	return (((pci_alloc_msi_t *)_m)(dev, child, count));
}

extern struct kobjop_desc pci_msi_count_desc;
typedef int pci_msi_count_t(device_t dev, device_t child);
static __inline int
PCI_MSI_COUNT(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_msi_count);
	return (((pci_msi_count_t *)_m)(dev, child));
}

extern struct kobjop_desc pci_msix_table_bar_desc;
typedef int pci_msix_table_bar_t(device_t dev, device_t child);
static __inline int
PCI_MSIX_TABLE_BAR(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_msix_table_bar);
	return (((pci_msix_table_bar_t *)_m)(dev, child));
}

extern struct kobjop_desc pci_msix_pba_bar_desc;
typedef int pci_msix_pba_bar_t(device_t dev, device_t child);
static __inline int
PCI_MSIX_PBA_BAR(device_t dev, device_t child)
{
	kobjop_t _m;

	KOBJOPLOOKUP(((kobj_t)dev)->ops, pci_msix_pba_bar);
	return (((pci_msix_pba_bar_t *)_m)(dev, child));
}

#endif
