/*
 * Stand-in for the generated device_if.h (FreeBSD sys/kern/device_if.m, run through
 * makeobjops.awk at kernel build time; the header itself is not installed anywhere).
 * Declares only the methods nvme_hotplug implements: probe, attach, detach, shutdown.
 * Used only for Linux cross-builds; a native FreeBSD build uses the generated header.
 */
#ifndef _NVMEHP_DEVICE_IF_H_
#define _NVMEHP_DEVICE_IF_H_

/* The method descriptors live in the kernel (device_if.c); DEVMETHOD() takes their address. */
extern struct kobjop_desc device_probe_desc;
typedef int device_probe_t(device_t dev);
extern struct kobjop_desc device_attach_desc;
typedef int device_attach_t(device_t dev);
extern struct kobjop_desc device_detach_desc;
typedef int device_detach_t(device_t dev);
extern struct kobjop_desc device_shutdown_desc;
typedef int device_shutdown_t(device_t dev);

#endif
