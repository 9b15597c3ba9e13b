//! ACPICA and acpi(4) for a machine without an ACPI namespace: every lookup answers
//! AE_NOT_FOUND (ACPICA acexcep.h: EXCEP_ENV 0x0005), a namespace walk visits nothing.

use super::kern::cstr;
use super::log;
use crate::kpi::KpiTable;
use std::ffi::{c_char, c_void};

const AE_OK: u32 = 0;
const AE_NOT_FOUND: u32 = 0x0005;

extern "C" fn emu_acpi_get_handle(parent: *mut c_void, path: *const c_char, ret: *mut *mut c_void) -> u32 {
    // SAFETY: a C string per AcpiGetHandle.
    let p = unsafe { cstr(path) };
    if !ret.is_null() {
        // SAFETY: the caller's ACPI_HANDLE.
        unsafe { *ret = std::ptr::null_mut() };
    }
    log(format!("AcpiGetHandle({parent:p}, {p:?}) = AE_NOT_FOUND"));
    AE_NOT_FOUND
}

extern "C" fn emu_acpi_walk_namespace(ty: u32, start: *mut c_void, depth: u32, _d: *mut c_void, _a: *mut c_void, _ctx: *mut c_void, _ret: *mut c_void) -> u32 {
    log(format!("AcpiWalkNamespace(type {ty}, {start:p}, depth {depth}) = AE_OK (empty namespace)"));
    AE_OK
}

extern "C" fn emu_acpi_get_name(obj: *mut c_void, ty: u32, _buf: *mut c_void) -> u32 {
    log(format!("AcpiGetName({obj:p}, {ty}) = AE_NOT_FOUND"));
    AE_NOT_FOUND
}

extern "C" fn emu_acpi_evaluate_object(obj: *mut c_void, path: *const c_char, _params: *mut c_void, _ret: *mut c_void) -> u32 {
    // SAFETY: NULL or a C string per AcpiEvaluateObject.
    let p = unsafe { cstr(path) };
    log(format!("AcpiEvaluateObject({obj:p}, {p:?}) = AE_NOT_FOUND"));
    AE_NOT_FOUND
}

extern "C" fn emu_acpi_get_integer(obj: *mut c_void, path: *const c_char, _v: *mut u32) -> u32 {
    // SAFETY: as above.
    let p = unsafe { cstr(path) };
    log(format!("acpi_GetInteger({obj:p}, {p:?}) = AE_NOT_FOUND"));
    AE_NOT_FOUND
}

extern "C" fn emu_acpi_get_device(h: *mut c_void) -> *mut c_void {
    log(format!("acpi_get_device({h:p}) = NULL"));
    std::ptr::null_mut()
}

pub fn register(t: &mut KpiTable) {
    t.function("AcpiGetHandle", emu_acpi_get_handle as extern "C" fn(_, _, _) -> _ as usize);
    t.function("AcpiWalkNamespace", emu_acpi_walk_namespace as extern "C" fn(_, _, _, _, _, _, _) -> _ as usize);
    t.function("AcpiGetName", emu_acpi_get_name as extern "C" fn(_, _, _) -> _ as usize);
    t.function("AcpiEvaluateObject", emu_acpi_evaluate_object as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("acpi_GetInteger", emu_acpi_get_integer as extern "C" fn(_, _, _) -> _ as usize);
    t.function("acpi_get_device", emu_acpi_get_device as extern "C" fn(_) -> _ as usize);
}
