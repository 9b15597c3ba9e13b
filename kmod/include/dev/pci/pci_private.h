/*
 * Stand-in for FreeBSD sys/dev/pci/pci_private.h (the pci bus's interface to the buses derived
 * from it), which the ziglang header set does not ship. Declares only the two functions the
 * single-slot rescan uses, with their FreeBSD 15 signatures:
 *   - pci_read_device(pcib, bus, domain, busno, slot, func): reads the function's config header
 *     through the bridge `pcib`, allocates its devinfo with PCI_ALLOC_DEVINFO(bus) (M_WAITOK) and
 *     links it into the global pci device list; NULL when the vendor ID reads 0xffff;
 *   - pci_add_child(bus, dinfo): creates the newbus child of the pci bus `bus` for that devinfo
 *     (device_add_child, ivars, config save/restore, BAR and interrupt resources, PCI_CHILD_ADDED,
 *     the pci_add_device event).
 * Both are global kernel functions that pci(4)'s rescan (pci_rescan_method through its static
 * helper pci_identify_function) and derived buses built as modules (vmd(4)) call. The devinfo
 * stays opaque here: nvme_hotplug finds the new device_t with pci_find_dbsf().
 * Used only for Linux cross-builds; a native FreeBSD build uses the real header.
 */
#ifndef _NVMEHP_PCI_PRIVATE_H_
#define _NVMEHP_PCI_PRIVATE_H_

struct pci_devinfo;

struct pci_devinfo *pci_read_device(device_t pcib, device_t bus, int d, int b, int s, int f);
void	pci_add_child(device_t bus, struct pci_devinfo *dinfo);

#endif
