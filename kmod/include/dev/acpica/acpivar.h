/*
 * Stand-in for FreeBSD sys/dev/acpica/acpivar.h, which the ziglang header set does not ship.
 * Declares only what nvme_hotplug uses: the ACPI handle ivar of a device (acpi_get_handle(),
 * the same BUS_READ_IVAR the real header's accessor performs), the handle-to-device lookup and
 * the integer evaluation helpers of sys/dev/acpica/acpi.c.
 * Used only for Linux cross-builds; a native FreeBSD build uses the real header.
 */
#ifndef _NVMEHP_ACPIVAR_H_
#define _NVMEHP_ACPIVAR_H_

#define	ACPI_IVAR_HANDLE	0x100

static __inline ACPI_HANDLE
acpi_get_handle(device_t dev)
{
	uintptr_t v = 0;

	BUS_READ_IVAR(device_get_parent(dev), dev, ACPI_IVAR_HANDLE, &v);
	return ((ACPI_HANDLE)v);
}

device_t	acpi_get_device(ACPI_HANDLE handle);
ACPI_STATUS	acpi_GetInteger(ACPI_HANDLE handle, const char *path, UINT32 *number);
ACPI_STATUS	acpi_SetInteger(ACPI_HANDLE handle, const char *path, UINT32 number);

#endif
