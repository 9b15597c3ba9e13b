//! Console, panic, malloc(9), libkern, and the module/driver registration the kernel linker and
//! newbus do around a module's event handler.

use super::rules::Rule;
use super::{finding, kernel_panic, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use std::alloc::Layout;
use std::ffi::{c_char, c_int, c_void, CStr};

/// A C string from the module, for messages.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
pub unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return "(null)".into();
    }
    // SAFETY: per the caller, NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// printf(9) formatting of the conversions the module uses (`%s %d %i %u %x %X %o %c %p %%`,
/// the `-`, `0` and `#` flags, width, precision, and the `h hh l ll j z t q` length modifiers) over the integer
/// arguments the caller passed in registers. A conversion without an argument prints `<?>`.
///
/// # Safety
/// `fmt` is a NUL-terminated format, and every `%s` argument is NULL or a C string.
pub unsafe fn format(fmt: *const c_char, args: &[u64]) -> String {
    // SAFETY: per the caller.
    let f = unsafe { cstr(fmt) }.into_bytes();
    let mut out = String::new();
    let mut args = args.iter().copied();
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'%' {
            let start = i;
            while i < f.len() && f[i] != b'%' {
                i += 1;
            }
            out.push_str(&String::from_utf8_lossy(&f[start..i]));
            continue;
        }
        i += 1;
        let mut left = false;
        let mut zero = false;
        let mut alt = false;
        while i < f.len() && b"-+ #0".contains(&f[i]) {
            left |= f[i] == b'-';
            zero |= f[i] == b'0';
            alt |= f[i] == b'#';
            i += 1;
        }
        let mut width = 0usize;
        while i < f.len() && f[i].is_ascii_digit() {
            width = width * 10 + usize::from(f[i] - b'0');
            i += 1;
        }
        let mut prec: Option<usize> = None;
        if i < f.len() && f[i] == b'.' {
            i += 1;
            let mut p = 0;
            while i < f.len() && f[i].is_ascii_digit() {
                p = p * 10 + usize::from(f[i] - b'0');
                i += 1;
            }
            prec = Some(p);
        }
        let mut long = false;
        let mut short = 0;
        while i < f.len() && b"hljztq".contains(&f[i]) {
            if f[i] == b'h' {
                short += 1;
            } else {
                long = true;
            }
            i += 1;
        }
        let Some(&conv) = f.get(i) else { break };
        i += 1;
        if conv == b'%' {
            out.push('%');
            continue;
        }
        let Some(a) = args.next() else {
            out.push_str("<?>");
            continue;
        };
        let narrow = |v: u64| -> u64 {
            if long {
                v
            } else if short == 1 {
                v & 0xffff
            } else if short >= 2 {
                v & 0xff
            } else {
                v & 0xffff_ffff
            }
        };
        let signed = |v: u64| -> i64 {
            if long {
                v as i64
            } else if short == 1 {
                i64::from(v as i16)
            } else if short >= 2 {
                i64::from(v as i8)
            } else {
                i64::from(v as i32)
            }
        };
        let s = match conv {
            b'd' | b'i' => signed(a).to_string(),
            b'u' => narrow(a).to_string(),
            b'x' if alt && narrow(a) != 0 => format!("{:#x}", narrow(a)),
            b'x' => format!("{:x}", narrow(a)),
            b'X' if alt && narrow(a) != 0 => format!("0X{:X}", narrow(a)),
            b'X' => format!("{:X}", narrow(a)),
            b'o' => format!("{:o}", narrow(a)),
            b'c' => char::from(a as u8).to_string(),
            b'p' => format!("{a:#x}"),
            // SAFETY: per the caller, a %s argument is NULL or a C string.
            b's' => {
                let mut s = unsafe { cstr(a as *const c_char) };
                if let Some(p) = prec {
                    s = s.chars().take(p).collect();
                }
                s
            }
            other => format!("<%{}>", char::from(other)),
        };
        let pad = width.saturating_sub(s.chars().count());
        if left {
            out.push_str(&s);
            out.push_str(&" ".repeat(pad));
        } else {
            out.push_str(&(if zero && conv != b's' { "0" } else { " " }).repeat(pad));
            out.push_str(&s);
        }
    }
    out
}

fn console(text: &str) {
    with(|e| e.console.push_str(text));
}

// Variadic KPI functions are declared with their fixed arguments plus five integer ones: in the
// SysV AMD64 ABI (FreeBSD's and Linux's) the first six integer arguments of a variadic call
// travel in the same registers as a normal call's, so the callee reads them the same way.

extern "C" fn emu_printf(fmt: *const c_char, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> c_int {
    // SAFETY: the module passes a printf(9) format and matching arguments.
    let s = unsafe { format(fmt, &[a1, a2, a3, a4, a5]) };
    log(format!("printf({s:?})"));
    console(&s);
    s.len() as c_int
}

extern "C" fn emu_panic(fmt: *const c_char, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> ! {
    // SAFETY: as for printf.
    let s = unsafe { format(fmt, &[a1, a2, a3, a4, a5]) };
    kernel_panic(&s)
}

extern "C" fn emu_stack_chk_fail() -> ! {
    kernel_panic("stack overflow detected; backtrace may be corrupted")
}

// --- malloc(9) --------------------------------------------------------------------------------

/// One allocation. Freed blocks stay allocated, filled with the free pattern, so a
/// use-after-free reads 0xdeadc0de instead of someone else's data (as INVARIANTS kernels trash
/// freed memory).
pub struct Block {
    pub size: usize,
    pub mtp: u64,
    pub freed: bool,
    /// contigmalloc'd: guest RAM, memory a device can reach by DMA.
    pub dma: bool,
}

/// The device that may still DMA into the module's memory, and says so: a function whose
/// pci_disable_busmaster(9) left PCIM_CMD_BUSMASTEREN reading back on (pci.rs records it) and
/// of which the module printed a console line saying its bus mastering is still on (the .ko's
/// `controller ignored the disable and still has bus mastering on ...: its memory and requests
/// are held`). FreeBSD's rule is that memory a device may still write must not be freed, so
/// keeping its DMA memory (contigmalloc'd blocks, loaded busdma maps and their tags) is right
/// for such a module, and the leak checks tell it as kept, not as a leak. A module that keeps
/// memory without saying so, or keeps memory no device can reach, still gets the finding.
pub(crate) fn dma_hold_reported(e: &super::Emu) -> Option<String> {
    e.pci.dma_unstoppable.iter().find(|d| e.console.lines().any(|l| l.starts_with(&format!("{d}: ")) && l.contains("bus mastering on"))).cloned()
}

/// The pattern freed memory is filled with.
pub const FREE_POISON: u32 = 0xdeadc0de;

fn alloc(size: usize, align: usize, mtp: *mut layouts::malloc_type, flags: c_int, what: &'static str) -> *mut c_void {
    let known = with(|e| e.malloc_types.contains(&(mtp as u64)));
    if !known {
        finding(format!("{what}({size}) with malloc type {mtp:p}, which malloc_init has not registered"));
    }
    if flags & layouts::M_NOWAIT != 0 && super::fail::null(what) {
        log(format!("{what}({size}, flags {flags:#x}) = NULL"));
        return std::ptr::null_mut();
    }
    let Ok(layout) = Layout::from_size_align(size.max(1), align.max(16)) else {
        log(format!("{what}({size}, align {align}) = NULL (bad size or alignment)"));
        return std::ptr::null_mut();
    };
    // SAFETY: layout has a non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        if flags & layouts::M_WAITOK != 0 {
            kernel_panic(&format!("{what}({size}, M_WAITOK): out of memory"));
        }
        return std::ptr::null_mut();
    }
    if flags & layouts::M_ZERO != 0 {
        // SAFETY: p is a fresh allocation of at least size bytes.
        unsafe { std::ptr::write_bytes(p, 0, size) };
    }
    with(|e| e.blocks.insert(p as u64, Block { size, mtp: mtp as u64, freed: false, dma: false }));
    log(format!("{what}({size}, flags {flags:#x}) = {p:p}"));
    p.cast()
}

extern "C" fn emu_malloc(size: usize, mtp: *mut layouts::malloc_type, flags: c_int) -> *mut c_void {
    alloc(size, 16, mtp, flags, "malloc")
}

extern "C" fn emu_malloc_aligned(size: usize, align: usize, mtp: *mut layouts::malloc_type, flags: c_int) -> *mut c_void {
    alloc(size, align, mtp, flags, "malloc_aligned")
}

extern "C" fn emu_free(addr: *mut c_void, mtp: *mut layouts::malloc_type) {
    if addr.is_null() {
        log("free(NULL)".into());
        return;
    }
    let r = with(|e| match e.blocks.get_mut(&(addr as u64)) {
        None => Err("was not returned by malloc"),
        Some(b) if b.freed => Err("is already free"),
        Some(b) => {
            b.freed = true;
            Ok((b.size, b.mtp))
        }
    });
    match r {
        Err(why @ "is already free") => super::rules::panic(Rule::DoubleFree, &format!("free({addr:p}): the address {why}")),
        Err(why) => kernel_panic(&format!("free({addr:p}): the address {why}")),
        Ok((size, owner)) => {
            if owner != mtp as u64 {
                finding(format!("free({addr:p}) with malloc type {mtp:p}, allocated with {owner:#x}"));
            }
            freed_memory_checks(addr as u64, size as u64, &format!("free({addr:p})"));
            let words = size / 4;
            // SAFETY: the block is `size` bytes we allocated; it stays allocated (quarantined).
            unsafe {
                let w = addr.cast::<u32>();
                for i in 0..words {
                    w.add(i).write_unaligned(FREE_POISON);
                }
                std::ptr::write_bytes(addr.cast::<u8>().add(words * 4), 0xde, size - words * 4);
            }
            log(format!("free({addr:p}) ({size} bytes poisoned with {FREE_POISON:#x})"));
        }
    }
}

/// What must not point into memory being freed (`what` says which free): an armed callout or
/// timeout task or a queued task in it or with its argument in it (FreeWhileCallbackArmed:
/// softclock or the taskqueue thread would run it on freed memory), a live node's si_drv1
/// (OrphanNode: devfs hands it to the next open), a disk's d_drv1 before its d_gone ran
/// (DiskFreedBeforeGone: GEOM may still call the driver with it).
pub(crate) fn freed_memory_checks(start: u64, len: u64, what: &str) {
    let inside = |p: u64| p >= start && p < start + len.max(1);
    let (callouts, tasks, timeouts, disks) = with(|e| {
        let callouts: Vec<(u64, u64)> = e.armed_callouts.iter().filter(|(c, (_, arg))| inside(**c) || inside(*arg)).map(|(c, (_, a))| (*c, *a)).collect();
        let tasks: Vec<(String, u64)> =
            e.queues.values().flat_map(|q| q.tasks.iter().map(move |t| (q.name.clone(), *t))).collect();
        let timeouts: Vec<u64> = e.armed_timeouts.keys().copied().filter(|t| inside(*t)).collect();
        let disks: Vec<(String, u64, super::geom::DiskState)> = e
            .disks
            .iter()
            .filter(|(_, d)| matches!(d.state, super::geom::DiskState::Created | super::geom::DiskState::Gone))
            .map(|(p, d)| (d.name.clone(), *p, d.state))
            .collect();
        (callouts, tasks, timeouts, disks)
    });
    for (c, arg) in callouts {
        super::rules::finding(Rule::FreeWhileCallbackArmed, &format!("{what}: callout {c:#x} (argument {arg:#x}) is still armed on this memory; callout_drain first"));
    }
    for (q, t) in tasks {
        // SAFETY: a task still queued: the module's struct task, alive while queued.
        let ctx = unsafe { (*(t as *const layouts::task)).ta_context } as u64;
        if inside(t) || inside(ctx) {
            super::rules::finding(Rule::FreeWhileCallbackArmed, &format!("{what}: task {t:#x} (context {ctx:#x}) is still queued on {q}; taskqueue_drain first"));
        }
    }
    for t in timeouts {
        super::rules::finding(Rule::FreeWhileCallbackArmed, &format!("{what}: timeout task {t:#x} is still armed; taskqueue_drain_timeout first"));
    }
    for (node, drv1) in super::devfs::nodes_pointing_into(start, len) {
        super::rules::finding(Rule::OrphanNode, &format!("{what}: node {node} is still published with si_drv1 {drv1:#x} in this memory"));
    }
    for (name, dp, state) in disks {
        // SAFETY: a disk disk_alloc made and disk_destroy has not poisoned (state checked).
        let drv1 = unsafe { (*(dp as *const layouts::disk)).d_drv1 } as u64;
        if drv1 != 0 && inside(drv1) {
            super::rules::finding(Rule::DiskFreedBeforeGone, &format!("{what}: d_drv1 of disk {name} ({state:?}: d_gone has not run) is in this memory"));
        }
    }
}

/// malloc_init (sys/kern/kern_malloc.c): refuses a struct malloc_type of another layout
/// version with a panic, then registers the type.
extern "C" fn emu_malloc_init(data: *mut c_void) {
    let mtp = data.cast::<layouts::malloc_type>();
    // SAFETY: MALLOC_DEFINE's SYSINIT passes the module's struct malloc_type.
    let mt = unsafe { mtp.read() };
    // SAFETY: ks_shortdesc is MALLOC_DEFINE's string.
    let name = unsafe { cstr(mt.ks_shortdesc) };
    log(format!("malloc_init({name})"));
    if mt.ks_version != layouts::M_VERSION as u64 {
        kernel_panic(&format!("malloc_init: type {name} with unsupported version {}", mt.ks_version));
    }
    with(|e| e.malloc_types.push(mtp as u64));
}

/// malloc_uninit: unregisters the type; memory of the type still allocated is a leak.
extern "C" fn emu_malloc_uninit(data: *mut c_void) {
    // SAFETY: as for malloc_init.
    let name = unsafe { cstr((*data.cast::<layouts::malloc_type>()).ks_shortdesc) };
    log(format!("malloc_uninit({name})"));
    let (n, bytes, kept) = with(|e| {
        e.malloc_types.retain(|m| *m != data as u64);
        let holder = dma_hold_reported(e);
        let live: Vec<_> = e.blocks.values().filter(|b| !b.freed && b.mtp == data as u64).collect();
        let (kept, leaked): (Vec<_>, Vec<_>) = live.into_iter().partition(|b| b.dma && holder.is_some());
        let kept = holder.map(|d| (d, kept.len(), kept.iter().map(|b| b.size).sum::<usize>())).filter(|k| k.1 > 0);
        (leaked.len(), leaked.iter().map(|b| b.size).sum::<usize>(), kept)
    });
    if let Some((dev, k, kb)) = kept {
        log(format!("malloc type {name}: {k} contigmalloc'd blocks ({kb} bytes) kept, not a leak: {dev} may still DMA into them (bus mastering on) and the module said so"));
    }
    if n > 0 {
        super::rules::finding(Rule::Leak, &format!("malloc type {name} destroyed with {n} allocations ({bytes} bytes) never freed"));
    }
}

// --- libkern ----------------------------------------------------------------------------------

extern "C" fn emu_strlcpy(dst: *mut c_char, src: *const c_char, size: usize) -> usize {
    // SAFETY: strlcpy's contract: src is a C string, dst has room for size bytes.
    unsafe {
        let len = libc::strlen(src);
        if size > 0 {
            let n = len.min(size - 1);
            std::ptr::copy_nonoverlapping(src, dst, n);
            *dst.add(n) = 0;
        }
        len
    }
}

// --- modules (sys/kern/kern_module.c) and drivers (sys/kern/subr_bus.c) -------------------------

/// What module_register keeps: name, handler, argument.
pub struct Module {
    pub name: String,
    pub handler: u64,
    pub arg: u64,
    /// The `module_t` the handler receives: this record's address, stable while registered.
    pub id: Box<u64>,
}

pub type ModEventHand = extern "C" fn(*mut c_void, c_int, *mut c_void) -> c_int;

/// MOD_EVENT(mod, what): calls the handler without holding the emulation's lock.
pub fn mod_event(name: &str, what: c_int) -> Option<c_int> {
    let (handler, arg, id) = with(|e| e.modules.iter().find(|m| m.name == name).map(|m| (m.handler, m.arg, &*m.id as *const u64 as u64)))?;
    log(format!("MOD_EVENT({name}, {})", event_name(what)));
    // SAFETY: handler is the module's moduledata evhand (or driver_module_handler), a
    // modeventhand_t; arg is its moduledata priv.
    let f: ModEventHand = unsafe { std::mem::transmute::<u64, ModEventHand>(handler) };
    let r = f(id as *mut c_void, what, arg as *mut c_void);
    log(format!("MOD_EVENT({name}, {}) = {r}", event_name(what)));
    Some(r)
}

pub fn event_name(what: c_int) -> &'static str {
    match what as u32 {
        layouts::MOD_LOAD => "MOD_LOAD",
        layouts::MOD_UNLOAD => "MOD_UNLOAD",
        layouts::MOD_SHUTDOWN => "MOD_SHUTDOWN",
        layouts::MOD_QUIESCE => "MOD_QUIESCE",
        _ => "?",
    }
}

/// module_register_init: the module must have been registered by the linker (else panic);
/// MOD_LOAD, and on an error MOD_UNLOAD, a release and a console message.
extern "C" fn emu_module_register_init(arg: *const c_void) {
    // SAFETY: DECLARE_MODULE's SYSINIT passes the module's moduledata_t.
    let data = unsafe { arg.cast::<layouts::moduledata>().read() };
    // SAFETY: moduledata.name is a C string.
    let name = unsafe { cstr(data.name) };
    log(format!("module_register_init({name})"));
    let Some(error) = mod_event(&name, layouts::MOD_LOAD as c_int) else {
        kernel_panic(&format!("module_register_init: module named {name} not found"));
    };
    if error != 0 {
        mod_event(&name, layouts::MOD_UNLOAD as c_int);
        with(|e| e.modules.retain(|m| m.name != name));
        let msg = format!(
            "module_register_init: MOD_LOAD ({name}, {:#x}, {:p}) error {error}\n",
            data.evhand.map_or(0, |f| f as usize),
            data.priv_
        );
        log(format!("printf({msg:?}) (the kernel's)"));
        console(&msg);
    }
}

/// driver_module_handler (sys/kern/subr_bus.c): MOD_LOAD runs the chained handler first and
/// then adds the driver to the bus devclass whatever it returned (devclass_add_driver offers
/// the bus's unattached devices to it); MOD_QUIESCE and MOD_UNLOAD quiesce or delete the
/// driver (devclass_delete_driver detaches each device it has, the first failure ending the
/// unload) first and call the chained handler only if that succeeded.
extern "C" fn emu_driver_module_handler(module: *mut c_void, what: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: DRIVER_MODULE passes its struct driver_module_data.
    let dmd = unsafe { arg.cast::<layouts::driver_module_data>().read() };
    // SAFETY: dmd_busname is a C string, dmd_driver the driver's kobj class with its name.
    let (bus, driver) = unsafe { (cstr(dmd.dmd_busname), cstr((*dmd.dmd_driver).name)) };
    let driver_t = dmd.dmd_driver as u64;
    let chain = |what: c_int| match dmd.dmd_chainevh {
        // SAFETY: the module's own event handler with its own argument.
        Some(f) => unsafe { f(module.cast(), what, dmd.dmd_chainarg) },
        None => 0,
    };
    log(format!("driver_module_handler({driver} on {bus}, {})", event_name(what)));
    match what as u32 {
        layouts::MOD_LOAD => {
            let _ = chain(what);
            log(format!("devclass_add_driver({bus}, {driver}, pass {})", dmd.dmd_pass));
            with(|e| e.drivers.push((bus.clone(), driver)));
            super::newbus::add_driver(&bus, driver_t);
            0
        }
        layouts::MOD_QUIESCE => {
            // DEVICE_QUIESCE of each attached device: the driver's table has none, and the
            // default (null_quiesce) agrees.
            let n = super::newbus::attached_with(driver_t).len();
            log(format!("devclass_quiesce_driver({bus}, {driver}) = 0 ({n} devices attached)"));
            chain(what)
        }
        layouts::MOD_UNLOAD => {
            let r = super::newbus::delete_driver(driver_t);
            log(format!("devclass_delete_driver({bus}, {driver}) = {r}"));
            if r != 0 {
                return r;
            }
            with(|e| e.drivers.retain(|(b, d)| !(*b == bus && *d == driver)));
            chain(what)
        }
        _ => layouts::EOPNOTSUPP,
    }
}

/// Console output without a log line (the caller logged it).
pub fn console_text(s: &str) {
    console(s);
}

/// A line of the kernel's own (printf from kernel code, not the module's).
pub fn console_line(s: &str) {
    log(format!("printf({s:?}) (the kernel's)"));
    console(s);
}

pub fn register(t: &mut KpiTable) {
    t.function("printf", emu_printf as extern "C" fn(_, _, _, _, _, _) -> _ as usize);
    t.function("panic", emu_panic as extern "C" fn(_, _, _, _, _, _) -> ! as usize);
    t.function("__stack_chk_fail", emu_stack_chk_fail as extern "C" fn() -> ! as usize);
    t.function("malloc", emu_malloc as extern "C" fn(_, _, _) -> _ as usize);
    t.function("malloc_aligned", emu_malloc_aligned as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("free", emu_free as extern "C" fn(_, _) as usize);
    t.function("malloc_init", emu_malloc_init as extern "C" fn(_) as usize);
    t.function("malloc_uninit", emu_malloc_uninit as extern "C" fn(_) as usize);
    t.function("memcpy", libc::memcpy as unsafe extern "C" fn(_, _, _) -> _ as usize);
    t.function("memmove", libc::memmove as unsafe extern "C" fn(_, _, _) -> _ as usize);
    t.function("memset", libc::memset as unsafe extern "C" fn(_, _, _) -> _ as usize);
    t.function("memcmp", libc::memcmp as unsafe extern "C" fn(_, _, _) -> _ as usize);
    t.function("strlen", libc::strlen as unsafe extern "C" fn(_) -> _ as usize);
    t.function("strlcpy", emu_strlcpy as extern "C" fn(_, _, _) -> _ as usize);
    t.function("module_register_init", emu_module_register_init as extern "C" fn(_) as usize);
    t.function("driver_module_handler", emu_driver_module_handler as extern "C" fn(_, _, _) -> _ as usize);
}

#[cfg(test)]
mod tests {
    use super::format;
    use std::ffi::CString;

    fn f(fmt: &str, args: &[u64]) -> String {
        let c = CString::new(fmt).unwrap();
        // SAFETY: a C format; %s arguments below are C strings.
        unsafe { format(c.as_ptr(), args) }
    }

    #[test]
    fn printf_conversions_the_module_uses() {
        let s = CString::new("nvme").unwrap();
        assert_eq!(f("%s%d: %u %x %%", &[s.as_ptr() as u64, 1, 7, 255]), "nvme1: 7 ff %");
        // int arguments are 32 bits wide unless a length modifier says otherwise.
        assert_eq!(f("%d %ld %jd", &[0xffff_ffff, u64::MAX, (-2i64) as u64]), "-1 -1 -2");
        assert_eq!(f("%lu %zu %#x %#x %p", &[u64::MAX, 3, 16, 0, 0x1000]), "18446744073709551615 3 0x10 0 0x1000");
        assert_eq!(f("[%5d|%-4s|%04x|%.2s]", &[42, s.as_ptr() as u64, 0xa, s.as_ptr() as u64]), "[   42|nvme|000a|nv]");
        assert_eq!(f("%s", &[0]), "(null)");
        assert_eq!(f("%d %d", &[1]), "1 <?>");
    }
}
