//! sysctl(9) contexts and OIDs added at run time (sys/kern/kern_sysctl.c sysctl_ctx_init,
//! sysctl_add_oid, sysctl_ctx_free), recorded by context: the OIDs are not reachable by
//! name here, only counted, and every context must be freed before the module unloads.

use super::kern::cstr;
use super::{finding, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use std::ffi::{c_char, c_int, c_void};

extern "C" fn emu_sysctl_ctx_init(ctx: *mut layouts::sysctl_ctx_list) -> c_int {
    // SAFETY: the caller's context: TAILQ_INIT.
    unsafe {
        (*ctx).tqh_first = std::ptr::null_mut();
        (*ctx).tqh_last = &raw mut (*ctx).tqh_first;
    }
    with(|e| e.sysctl_ctxs.insert(ctx as u64, Vec::new()));
    log(format!("sysctl_ctx_init({ctx:p})"));
    0
}

#[allow(clippy::too_many_arguments)]
extern "C" fn emu_sysctl_add_oid(ctx: *mut layouts::sysctl_ctx_list, _parent: *mut c_void, nbr: c_int, name: *const c_char, kind: c_int, _a1: *mut c_void, _a2: i64, _handler: *mut c_void, _fmt: *const c_char, _descr: *const c_char, _label: *const c_char) -> *mut layouts::sysctl_oid {
    // SAFETY: a C string.
    let name = unsafe { cstr(name) };
    let oid = Box::into_raw(Box::<layouts::sysctl_oid>::default());
    let known = with(|e| e.sysctl_ctxs.get_mut(&(ctx as u64)).map(|v| v.push((name.clone(), oid as u64))).is_some());
    if !ctx.is_null() && !known {
        finding(format!("sysctl_add_oid({name}) with context {ctx:p}, which sysctl_ctx_init has not set up"));
    }
    log(format!("sysctl_add_oid({name}, nbr {nbr}, kind {kind:#x}) = {oid:p}"));
    oid
}

extern "C" fn emu_sysctl_ctx_free(ctx: *mut layouts::sysctl_ctx_list) -> c_int {
    super::sched::may_sleep("sysctl_ctx_free");
    let oids = with(|e| e.sysctl_ctxs.remove(&(ctx as u64)));
    match oids {
        None => {
            finding(format!("sysctl_ctx_free({ctx:p}): not an initialised context"));
            layouts::EINVAL
        }
        Some(v) => {
            log(format!("sysctl_ctx_free({ctx:p}): {} oids removed", v.len()));
            0
        }
    }
}

pub fn end_of_life_checks() {
    let left: Vec<usize> = with(|e| e.sysctl_ctxs.values().map(Vec::len).collect());
    for n in left {
        finding(format!("after unload: a sysctl context with {n} oids never freed"));
    }
}

pub fn register(t: &mut KpiTable) {
    t.function("sysctl_ctx_init", emu_sysctl_ctx_init as extern "C" fn(_) -> _ as usize);
    t.function("sysctl_add_oid", emu_sysctl_add_oid as extern "C" fn(_, _, _, _, _, _, _, _, _, _, _) -> _ as usize);
    t.function("sysctl_ctx_free", emu_sysctl_ctx_free as extern "C" fn(_) -> _ as usize);
}
