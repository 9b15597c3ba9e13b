/*
 * Stand-in for ACPICA's acpi.h as shipped in FreeBSD sys/contrib/dev/acpica/include/ (the
 * types of actypes.h, the status codes of acexcep.h, the entry points of acpixf.h and the OS
 * services of acpiosxf.h), which the ziglang header set does not ship. Declares only what nvme_hotplug uses, with the 64-bit
 * (ACPI_MACHINE_WIDTH 64) definitions and the same spelling, casts included, as the real headers.
 * Used only for Linux cross-builds; a native FreeBSD build uses the real headers.
 */
#ifndef _NVMEHP_ACPI_H_
#define _NVMEHP_ACPI_H_

/* actypes.h */
typedef unsigned char		UINT8;
typedef unsigned short		UINT16;
typedef unsigned int		UINT32;
typedef unsigned long long	UINT64;
typedef UINT64			ACPI_SIZE;
typedef UINT64			ACPI_IO_ADDRESS;
typedef UINT32			ACPI_STATUS;
typedef UINT32			ACPI_OBJECT_TYPE;
typedef char *			ACPI_STRING;
typedef void *			ACPI_HANDLE;

#define	ACPI_TYPE_INTEGER		0x01
#define	ACPI_TYPE_BUFFER		0x03
#define	ACPI_TYPE_DEVICE		0x06

#define	ACPI_SYSTEM_NOTIFY		0x1

#define	ACPI_NOTIFY_BUS_CHECK		(UINT8) 0x00
#define	ACPI_NOTIFY_DEVICE_CHECK	(UINT8) 0x01
#define	ACPI_NOTIFY_EJECT_REQUEST	(UINT8) 0x03

#define	ACPI_FULL_PATHNAME		0

typedef union acpi_object {
	ACPI_OBJECT_TYPE	Type;
	struct {
		ACPI_OBJECT_TYPE	Type;
		UINT64			Value;
	} Integer;
	struct {
		ACPI_OBJECT_TYPE	Type;
		UINT32			Length;
		char			*Pointer;
	} String;
	struct {
		ACPI_OBJECT_TYPE	Type;
		UINT32			Length;
		UINT8			*Pointer;
	} Buffer;
	struct {
		ACPI_OBJECT_TYPE	Type;
		UINT32			Count;
		union acpi_object	*Elements;
	} Package;
	struct {
		ACPI_OBJECT_TYPE	Type;
		ACPI_OBJECT_TYPE	ActualType;
		ACPI_HANDLE		Handle;
	} Reference;
	struct {
		ACPI_OBJECT_TYPE	Type;
		UINT32			ProcId;
		ACPI_IO_ADDRESS		PblkAddress;
		UINT32			PblkLength;
	} Processor;
	struct {
		ACPI_OBJECT_TYPE	Type;
		UINT32			SystemLevel;
		UINT32			ResourceOrder;
	} PowerResource;
} ACPI_OBJECT;

typedef struct acpi_object_list {
	UINT32			Count;
	ACPI_OBJECT		*Pointer;
} ACPI_OBJECT_LIST;

typedef struct acpi_buffer {
	ACPI_SIZE		Length;
	void			*Pointer;
} ACPI_BUFFER;

typedef void (*ACPI_NOTIFY_HANDLER)(ACPI_HANDLE Device, UINT32 Value, void *Context);
typedef ACPI_STATUS (*ACPI_WALK_CALLBACK)(ACPI_HANDLE Object, UINT32 NestingLevel,
    void *Context, void **ReturnValue);

/* acexcep.h */
#define	AE_CODE_ENVIRONMENTAL		0x0000
#define	EXCEP_ENV(code)			((ACPI_STATUS) (code | AE_CODE_ENVIRONMENTAL))
#define	AE_OK				(ACPI_STATUS) 0x0000
#define	AE_NO_MEMORY			EXCEP_ENV (0x0004)
#define	AE_NOT_FOUND			EXCEP_ENV (0x0005)
#define	AE_ALREADY_EXISTS		EXCEP_ENV (0x0007)
#define	ACPI_SUCCESS(a)			(!(a))
#define	ACPI_FAILURE(a)			(a)

/* acpixf.h */
ACPI_STATUS AcpiGetHandle(ACPI_HANDLE Parent, const char *Pathname, ACPI_HANDLE *RetHandle);
ACPI_STATUS AcpiGetName(ACPI_HANDLE Object, UINT32 NameType, ACPI_BUFFER *RetPathPtr);
ACPI_STATUS AcpiWalkNamespace(ACPI_OBJECT_TYPE Type, ACPI_HANDLE StartObject, UINT32 MaxDepth,
    ACPI_WALK_CALLBACK DescendingCallback, ACPI_WALK_CALLBACK AscendingCallback, void *Context,
    void **ReturnValue);
ACPI_STATUS AcpiEvaluateObject(ACPI_HANDLE Object, ACPI_STRING Pathname,
    ACPI_OBJECT_LIST *ParameterObjects, ACPI_BUFFER *ReturnObjectBuffer);
ACPI_STATUS AcpiInstallNotifyHandler(ACPI_HANDLE Device, UINT32 HandlerType,
    ACPI_NOTIFY_HANDLER Handler, void *Context);
ACPI_STATUS AcpiRemoveNotifyHandler(ACPI_HANDLE Device, UINT32 HandlerType,
    ACPI_NOTIFY_HANDLER Handler);

/* acpiosxf.h (FreeBSD implements it in sys/dev/acpica/Osd/OsdSchedule.c) */
void AcpiOsWaitEventsComplete(void);

#endif
