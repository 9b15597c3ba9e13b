//! ACPI namespace access for PCI hotplug: slot objects, their notifications, and the
//! `_STA`/`_EJ0`/`_OST` methods.
//!
//! Facts this module encodes (docs/freebsd-kpi.md sections 1 and 4):
//! - Hotplug slots are the Device objects under the PCI bus's ACPI object that have an `_EJ0`
//!   method (acpi_pci.c finds them the same way, one level deep).
//! - Notify handlers run on the ACPI task queue (`acpi_task`, 3 threads shared with GPE, EC,
//!   thermal and button events): a handler should record the event and hand the work to the
//!   driver's own taskqueue, not do it inline.
//! - `AcpiRemoveNotifyHandler` waits for every queued ACPI task to finish, so removing a handler
//!   from an ACPI task thread (e.g. from inside a notify handler) deadlocks. [`NotifyRegistration`]
//!   removes its handler when dropped: never drop one from a notify handler.
//! - That wait is not the last word: a notify queued before the unlink can still call the handler
//!   after `AcpiRemoveNotifyHandler` returned (see [`wait_events_complete`]), so every removal is
//!   followed by `AcpiOsWaitEventsComplete()` before the context is freed.

use super::bindings;
use super::cstr_buf::StackCStr;
use super::device::Device;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::{c_void, CStr};
use core::fmt;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

/// An ACPICA status code (`ACPI_STATUS`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AcpiStatus(pub u32);

impl AcpiStatus {
    /// AE_OK
    pub const OK: AcpiStatus = AcpiStatus(bindings::NVMEHP_AE_OK);
    /// AE_NO_MEMORY
    pub const NO_MEMORY: AcpiStatus = AcpiStatus(bindings::NVMEHP_AE_NO_MEMORY);
    /// AE_NOT_FOUND: no such object (e.g. the method does not exist).
    pub const NOT_FOUND: AcpiStatus = AcpiStatus(bindings::NVMEHP_AE_NOT_FOUND);
    /// AE_ALREADY_EXISTS: e.g. this handler is already installed on the object.
    pub const ALREADY_EXISTS: AcpiStatus = AcpiStatus(bindings::NVMEHP_AE_ALREADY_EXISTS);

    fn result(raw: bindings::ACPI_STATUS) -> Result<(), AcpiStatus> {
        if raw == bindings::NVMEHP_AE_OK { Ok(()) } else { Err(AcpiStatus(raw)) }
    }
}

impl fmt::Debug for AcpiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AE_{:#06x}", self.0)
    }
}

impl fmt::Display for AcpiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            AcpiStatus::OK => "AE_OK",
            AcpiStatus::NO_MEMORY => "AE_NO_MEMORY",
            AcpiStatus::NOT_FOUND => "AE_NOT_FOUND",
            AcpiStatus::ALREADY_EXISTS => "AE_ALREADY_EXISTS",
            _ => return write!(f, "ACPI status {:#06x}", self.0),
        };
        f.write_str(name)
    }
}

/// Standard notify values (ACPI spec "Device Object Notification Values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyValue {
    /// 0: re-enumerate the bus below this object.
    BusCheck,
    /// 1: something was inserted (or removed) at this object.
    DeviceCheck,
    /// 3: the platform asks to eject the device.
    EjectRequest,
    /// Anything else (device-specific or unhandled).
    Other(u32),
}

impl From<u32> for NotifyValue {
    fn from(v: u32) -> Self {
        match v {
            x if x == bindings::NVMEHP_ACPI_NOTIFY_BUS_CHECK => NotifyValue::BusCheck,
            x if x == bindings::NVMEHP_ACPI_NOTIFY_DEVICE_CHECK => NotifyValue::DeviceCheck,
            x if x == bindings::NVMEHP_ACPI_NOTIFY_EJECT_REQUEST => NotifyValue::EjectRequest,
            x => NotifyValue::Other(x),
        }
    }
}

/// `_STA` value when the object has no `_STA`: present, enabled, shown, functioning (ACPI spec).
pub const STA_DEFAULT: u32 = 0x0f;
/// `_STA` bit 0: present.
pub const STA_PRESENT: u32 = 0x01;

/// An object in the ACPI namespace. Namespace nodes of the static tables (DSDT/SSDT), which is
/// where PCI slots live, are never freed, so the handle stays valid.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct AcpiHandle(NonNull<c_void>);

// SAFETY: an ACPI_HANDLE is an opaque namespace node pointer that ACPICA accepts from any
// thread (it takes its own namespace lock).
unsafe impl Send for AcpiHandle {}
// SAFETY: as above.
unsafe impl Sync for AcpiHandle {}

impl fmt::Debug for AcpiHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path();
        f.write_str(core::str::from_utf8(path.as_bytes()).unwrap_or("<acpi>"))
    }
}

impl AcpiHandle {
    /// Wraps a handle ACPICA gave us.
    ///
    /// # Safety
    /// `raw` must be NULL or a namespace node that stays valid while the handle is used.
    pub unsafe fn from_raw(raw: bindings::ACPI_HANDLE) -> Option<Self> {
        NonNull::new(raw).map(AcpiHandle)
    }

    /// The raw handle for KPI calls.
    pub fn as_raw(self) -> bindings::ACPI_HANDLE {
        self.0.as_ptr()
    }

    /// The object at absolute path `path` (e.g. `c"\\_SB.PCI0"`).
    pub fn lookup(path: &CStr) -> Result<Self, AcpiStatus> {
        let mut out: bindings::ACPI_HANDLE = core::ptr::null_mut();
        // SAFETY: absolute lookup (NULL parent) with a NUL-terminated path and a valid out
        // pointer; the node returned is a static namespace node.
        AcpiStatus::result(unsafe { bindings::AcpiGetHandle(core::ptr::null_mut(), path.as_ptr(), &mut out) })?;
        // SAFETY: as above.
        unsafe { AcpiHandle::from_raw(out) }.ok_or(AcpiStatus::NOT_FOUND)
    }

    /// The child object `name` (e.g. `c"_EJ0"`) of this one.
    pub fn child(&self, name: &CStr) -> Result<Self, AcpiStatus> {
        let mut out: bindings::ACPI_HANDLE = core::ptr::null_mut();
        // SAFETY: relative lookup under a valid node; `out` is a valid out pointer.
        AcpiStatus::result(unsafe { bindings::AcpiGetHandle(self.as_raw(), name.as_ptr(), &mut out) })?;
        // SAFETY: as above.
        unsafe { AcpiHandle::from_raw(out) }.ok_or(AcpiStatus::NOT_FOUND)
    }

    /// True when the object has a child (method) named `name`.
    pub fn has(&self, name: &CStr) -> bool {
        self.child(name).is_ok()
    }

    /// The ACPI object of a newbus device whose parent bus is ACPI-aware (`acpi_pci`), e.g. the
    /// `\_SB.PCI0` node of `pci0`'s bridge.
    pub fn of_device(dev: &Device) -> Option<Self> {
        // SAFETY: an ivar read on a live device; a bus without ACPI ivars leaves NULL.
        unsafe { AcpiHandle::from_raw(bindings::nvmehp_acpi_get_handle(dev.as_raw())) }
    }

    /// The newbus device the ACPI driver associated with this object, if any.
    pub fn device(&self) -> Option<Device> {
        // SAFETY: acpi_get_device only looks the handle up; the device it returns is alive
        // while the caller holds bus_topo_lock (see bus_topo), which callers that act on it do.
        unsafe { Device::from_raw(bindings::acpi_get_device(self.as_raw())) }
    }

    /// Full path, e.g. `\_SB_.PCI0.S18_`, for messages (cut to fit; never allocates).
    pub fn path(&self) -> StackCStr<64> {
        let mut out = StackCStr::<64>::new();
        let mut buf = [0u8; 64];
        let mut abuf = bindings::ACPI_BUFFER { Length: buf.len() as u64, Pointer: buf.as_mut_ptr().cast() };
        // SAFETY: a caller-provided buffer of `Length` bytes; ACPICA writes a NUL-terminated
        // path into it or fails with AE_BUFFER_OVERFLOW.
        let st = unsafe { bindings::AcpiGetName(self.as_raw(), bindings::ACPI_FULL_PATHNAME as u32, &mut abuf) };
        let text = if st == bindings::NVMEHP_AE_OK {
            CStr::from_bytes_until_nul(&buf).ok().and_then(|c| c.to_str().ok()).unwrap_or("<acpi>")
        } else {
            "<acpi>"
        };
        let _ = fmt::Write::write_str(&mut out, text);
        out
    }

    /// The Device objects directly below this one.
    pub fn child_devices(&self) -> Result<Vec<AcpiHandle>, AcpiStatus> {
        let mut found: Vec<AcpiHandle> = Vec::new();
        // SAFETY: depth-1 walk of Device objects; the callback gets `&mut found` as context,
        // which outlives the (synchronous) walk.
        let st = unsafe {
            bindings::AcpiWalkNamespace(
                bindings::ACPI_TYPE_DEVICE as u32,
                self.as_raw(),
                1,
                Some(collect_child),
                None,
                (&raw mut found).cast(),
                core::ptr::null_mut(),
            )
        };
        AcpiStatus::result(st)?;
        Ok(found)
    }

    /// The hotplug slots below this (bus) object: child devices with an `_EJ0` method.
    pub fn hotplug_slots(&self) -> Result<Vec<AcpiHandle>, AcpiStatus> {
        let mut slots = self.child_devices()?;
        slots.retain(|s| s.has(c"_EJ0"));
        Ok(slots)
    }

    /// Evaluates `_ADR`: for a PCI slot object, `(device << 16) | function` (function 0xffff:
    /// all functions). Returned as `(slot, function)`.
    pub fn pci_address(&self) -> Result<(u8, u16), AcpiStatus> {
        let mut adr: u32 = 0;
        // SAFETY: acpi_GetInteger evaluates a name returning an Integer into `adr`.
        AcpiStatus::result(unsafe { bindings::acpi_GetInteger(self.as_raw(), c"_ADR".as_ptr(), &mut adr) })?;
        let slot = (adr >> 16) as u16;
        if slot > bindings::PCI_SLOTMAX as u16 {
            return Err(AcpiStatus::NOT_FOUND); // not a PCI device address
        }
        Ok((slot as u8, adr as u16))
    }

    /// Evaluates `_STA`; an object without `_STA` is present and functioning (ACPI spec).
    pub fn status(&self) -> Result<u32, AcpiStatus> {
        let mut sta: u32 = 0;
        // SAFETY: acpi_GetInteger evaluates a method returning an Integer into `sta`.
        match AcpiStatus::result(unsafe { bindings::acpi_GetInteger(self.as_raw(), c"_STA".as_ptr(), &mut sta) }) {
            Ok(()) => Ok(sta),
            Err(AcpiStatus::NOT_FOUND) => Ok(STA_DEFAULT),
            Err(e) => Err(e),
        }
    }

    /// Evaluates `_EJ0(1)`: tells the platform the device is ready to be removed. Only after
    /// the device has been detached (nothing may touch it afterwards).
    pub fn eject(&self) -> Result<(), AcpiStatus> {
        // SAFETY: acpi_SetInteger calls the method with one Integer argument.
        AcpiStatus::result(unsafe { bindings::acpi_SetInteger(self.as_raw(), c"_EJ0".as_ptr(), 1) })
    }

    /// Evaluates `_OST(source_event, status, {})` to tell the firmware how an event ended.
    /// `Ok(false)` when the object has no `_OST` (optional in the spec; FreeBSD never calls it).
    pub fn ost(&self, source_event: u32, status: u32) -> Result<bool, AcpiStatus> {
        if !self.has(c"_OST") {
            return Ok(false);
        }
        // SAFETY: zeroed ACPI_OBJECTs are valid (Type 0); the fields written below are the
        // union members their Type selects.
        let mut args: [bindings::ACPI_OBJECT; 3] = unsafe { core::mem::zeroed() };
        args[0].Integer.Type = bindings::ACPI_TYPE_INTEGER as u32;
        args[0].Integer.Value = u64::from(source_event);
        args[1].Integer.Type = bindings::ACPI_TYPE_INTEGER as u32;
        args[1].Integer.Value = u64::from(status);
        args[2].Buffer.Type = bindings::ACPI_TYPE_BUFFER as u32;
        args[2].Buffer.Length = 0;
        args[2].Buffer.Pointer = core::ptr::null_mut();
        let mut list = bindings::ACPI_OBJECT_LIST { Count: 3, Pointer: args.as_mut_ptr() };
        // SAFETY: the argument list points to 3 initialised objects that live across the call;
        // no return buffer is requested.
        let st = unsafe {
            bindings::AcpiEvaluateObject(self.as_raw(), c"_OST".as_ptr().cast_mut(), &mut list, core::ptr::null_mut())
        };
        AcpiStatus::result(st).map(|()| true)
    }
}

unsafe extern "C" fn collect_child(
    object: bindings::ACPI_HANDLE,
    _level: u32,
    context: *mut c_void,
    _ret: *mut *mut c_void,
) -> bindings::ACPI_STATUS {
    // SAFETY: `context` is the `&mut Vec` passed by child_devices, exclusively ours during the
    // synchronous walk.
    let found = unsafe { &mut *context.cast::<Vec<AcpiHandle>>() };
    // SAFETY: ACPICA passes a valid node of the static namespace.
    let Some(h) = (unsafe { AcpiHandle::from_raw(object) }) else {
        return bindings::NVMEHP_AE_OK;
    };
    match crate::fallible::try_push(found, h) {
        Ok(()) => bindings::NVMEHP_AE_OK,
        Err(_) => bindings::NVMEHP_AE_NO_MEMORY, // aborts the walk; child_devices reports it
    }
}

/// `AcpiOsWaitEventsComplete()`: returns once every ACPI task queued at the time of the call
/// (GPE and notify dispatches) has run. Sleeps; never call it from an ACPI task thread (it would
/// drain the task it runs in) or with a mutex held.
///
/// Why a removal needs it again although `AcpiRemoveNotifyHandler` calls it itself
/// (sys/contrib/dev/acpica/components/events/evxface.c): ACPICA queues a notify with a pointer
/// to the object's handler list *as it was then* and takes no reference on it
/// (`AcpiEvQueueNotifyRequest`, .../events/evmisc.c); `AcpiEvNotifyDispatch` walks that list
/// later on an `acpi_task` thread. FreeBSD's `AcpiOsWaitEventsComplete`
/// (sys/dev/acpica/Osd/OsdSchedule.c) drains only the task slots it finds enqueued while it
/// walks the pool once, so a dispatch of a notify raised just before the unlink and enqueued
/// just after that walk passed its slot is not waited for, and still reaches our handler and its
/// context. A second wait, started after the removal returned, drains every dispatch enqueued
/// by then; only then may the context (and, at unload, the module's code) go. What remains is a
/// queueing thread preempted across both walks, a window no ACPICA caller can close (ACPICA
/// frees its own handler object in it too).
pub fn wait_events_complete() {
    // SAFETY: no arguments; it sleeps, and its callers (NotifyRegistration::remove and Drop)
    // run on a sleepable, non-ACPI thread without a mutex held, as their contracts say.
    unsafe { bindings::AcpiOsWaitEventsComplete() }
}

/// What to do with a notification. Runs on an ACPI task thread: record, enqueue, return.
pub trait NotifyHandler: Sync + Send {
    /// `handle` is the object the notification was sent to.
    fn notify(&self, handle: AcpiHandle, value: NotifyValue);
}

/// A system notify handler installed on one object; removed (and its context freed) on drop.
///
/// Drop calls `AcpiRemoveNotifyHandler`, then [`wait_events_complete`]: after both, no call of
/// the handler is running or still queued, and the context may be freed. Both sleep, and they
/// deadlock if run on an ACPI task thread.
pub struct NotifyRegistration<H: NotifyHandler> {
    handle: AcpiHandle,
    /// Freed in Drop only once the handler is known to be removed; leaked otherwise.
    context: ManuallyDrop<Box<H>>,
}

impl<H: NotifyHandler> NotifyRegistration<H> {
    /// Installs `handler` for system notifications (0x00-0x7f) on `handle`. On failure the
    /// handler is given back. AE_ALREADY_EXISTS means this handler type is already installed
    /// there (installing one *more* handler next to acpi_pci's is allowed by ACPICA).
    pub fn install(handle: AcpiHandle, handler: Box<H>) -> Result<Self, (AcpiStatus, Box<H>)> {
        let ctx = (&raw const *handler).cast_mut().cast::<c_void>();
        // SAFETY: the context is the boxed handler, which stays at this address until after
        // the handler is removed (Drop); the trampoline matches ACPI_NOTIFY_HANDLER.
        let st = unsafe {
            bindings::AcpiInstallNotifyHandler(
                handle.as_raw(),
                bindings::ACPI_SYSTEM_NOTIFY as u32,
                Some(notify_trampoline::<H>),
                ctx,
            )
        };
        match AcpiStatus::result(st) {
            Ok(()) => Ok(NotifyRegistration { handle, context: ManuallyDrop::new(handler) }),
            Err(e) => Err((e, handler)),
        }
    }

    /// The object the handler is installed on.
    pub fn handle(&self) -> AcpiHandle {
        self.handle
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.context
    }
}

impl<H: NotifyHandler> NotifyRegistration<H> {
    /// `AcpiRemoveNotifyHandler` for exactly the (object, type, function) of `install`; when it
    /// succeeded, then [`wait_events_complete`] for the dispatches it does not wait for. On
    /// success the context is unused afterwards.
    fn remove_raw(&self) -> u32 {
        // SAFETY: removes exactly the (object, type, function) installed in `install`.
        let st = unsafe {
            bindings::AcpiRemoveNotifyHandler(
                self.handle.as_raw(),
                bindings::ACPI_SYSTEM_NOTIFY as u32,
                Some(notify_trampoline::<H>),
            )
        };
        if st == bindings::NVMEHP_AE_OK {
            // Unlinked: no *new* dispatch can find the handler. One queued before the unlink
            // may still be on its way to it (see wait_events_complete): wait for it before the
            // caller frees the context.
            wait_events_complete();
        }
        st
    }

    /// Removes the handler and frees its context. On failure the registration is given back:
    /// the handler may still be installed, so neither its context nor the code it calls (the
    /// module) may go away; module unload must then be refused.
    pub fn remove(self) -> Result<(), (AcpiStatus, Self)> {
        let st = self.remove_raw();
        if st != bindings::NVMEHP_AE_OK {
            return Err((AcpiStatus(st), self));
        }
        let mut this = ManuallyDrop::new(self);
        // SAFETY: the handler is removed and no call is running: the context is unused, and it
        // is dropped exactly once (`this` is never dropped).
        unsafe { ManuallyDrop::drop(&mut this.context) };
        Ok(())
    }
}

impl<H: NotifyHandler> Drop for NotifyRegistration<H> {
    /// Last resort when [`NotifyRegistration::remove`] was not used: on failure the context is
    /// leaked (the owner must then keep the module loaded).
    fn drop(&mut self) {
        let st = self.remove_raw();
        if st == bindings::NVMEHP_AE_OK {
            // SAFETY: the handler is removed and no call is running: the context is unused,
            // and it is dropped exactly once.
            unsafe { ManuallyDrop::drop(&mut self.context) };
        } else {
            // The handler may still be installed and could run: its context must live on.
            kprintf!(
                "nvme_hotplug: AcpiRemoveNotifyHandler({:?}) failed: {}; leaking its context\n",
                self.handle,
                AcpiStatus(st)
            );
        }
    }
}

unsafe extern "C" fn notify_trampoline<H: NotifyHandler>(
    device: bindings::ACPI_HANDLE,
    value: u32,
    context: *mut c_void,
) {
    // SAFETY: `context` is the boxed handler registered in install, alive until the handler
    // has been removed (Drop).
    let handler = unsafe { &*context.cast::<H>() };
    // SAFETY: ACPICA passes the node the notification was sent to.
    if let Some(handle) = unsafe { AcpiHandle::from_raw(device) } {
        handler.notify(handle, NotifyValue::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::{AcpiStatus, NotifyValue};
    use alloc::format;

    #[test]
    fn notify_values_follow_the_acpi_spec() {
        assert_eq!(NotifyValue::from(0), NotifyValue::BusCheck);
        assert_eq!(NotifyValue::from(1), NotifyValue::DeviceCheck);
        assert_eq!(NotifyValue::from(3), NotifyValue::EjectRequest);
        assert_eq!(NotifyValue::from(2), NotifyValue::Other(2));
        assert_eq!(NotifyValue::from(0x80), NotifyValue::Other(0x80));
    }

    #[test]
    fn status_codes_match_acexcep() {
        assert_eq!(AcpiStatus::OK.0, 0);
        assert_eq!(AcpiStatus::NO_MEMORY.0, 4);
        assert_eq!(AcpiStatus::NOT_FOUND.0, 5);
        assert_eq!(AcpiStatus::ALREADY_EXISTS.0, 7);
        assert_eq!(format!("{}", AcpiStatus::NOT_FOUND), "AE_NOT_FOUND");
        assert_eq!(format!("{}", AcpiStatus(0x1001)), "ACPI status 0x1001");
    }
}
