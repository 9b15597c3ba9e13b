//! make_dev(9) and destroy_dev(9), with the argument checks of sys/kern/kern_conf.c
//! (make_dev_sv, prep_devname, destroy_devl).
//!
//! - `make_dev_args_init_impl(args, sz)`: zeroes `sz` bytes and sets `mda_size = sz`.
//! - `make_dev_s`: a `struct make_dev_args` larger than the kernel's (`mda_size` above its
//!   size, a module built against other headers) is refused with EINVAL before anything else;
//!   a smaller one is read up to its size. WAITOK with NOWAIT is a KASSERT. A bad name (empty,
//!   too long, whitespace or `"`, a trailing `/`, a `.` or `..` component) or an existing one
//!   returns its error with MAKEDEV_CHECKNAME and panics without it.
//! - `destroy_dev`: may sleep (it waits for threads in the device); the node must be named (a
//!   second destroy_dev of it panics: DoubleDestroy) and must not be MAKEDEV_ETERNAL
//!   (DestroyEternal); called from inside one of the node's own methods it waits for itself
//!   (DestroyFromOwnMethod); `si_drv1`/`si_drv2` are cleared. A node made while a device was
//!   attaching belongs to it (newbus.rs checks it is gone when the detach returns).
//!
//! The emulated devfs holds the nodes by name; destroyed nodes' structs are kept. A node is
//! opened and closed only by `run --open-nodes` ([`open_and_close_all`]).

use super::kern::format;
use super::rules::Rule;
use super::{kernel_panic, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use std::ffi::{c_char, c_int, c_void};

extern "C" fn emu_make_dev_args_init_impl(args: *mut layouts::make_dev_args, sz: usize) {
    // SAFETY: the caller's struct make_dev_args of `sz` bytes (make_dev_args_init passes
    // sizeof).
    unsafe {
        std::ptr::write_bytes(args.cast::<u8>(), 0, sz);
        (*args).mda_size = sz;
    }
    log(format!("make_dev_args_init({args:p}, {sz})"));
}

/// prep_devname's checks on a formatted name.
fn name_error(name: &str, exists: bool) -> Option<c_int> {
    if name.len() > layouts::SPECNAMELEN as usize {
        return Some(layouts::ENAMETOOLONG);
    }
    let bad_char = name.bytes().any(|b| b.is_ascii_whitespace() || b == b'"');
    let bad_component = name.split('/').any(|c| c == "." || c == "..");
    if name.is_empty() || bad_char || name.ends_with('/') || bad_component {
        return Some(layouts::EINVAL);
    }
    exists.then_some(layouts::EEXIST)
}

extern "C" fn emu_make_dev_s(args1: *const layouts::make_dev_args, dres: *mut *mut layouts::cdev, fmt: *const c_char, a1: u64, a2: u64, a3: u64) -> c_int {
    let kernel_size = std::mem::size_of::<layouts::make_dev_args>();
    // SAFETY: the caller's struct make_dev_args; mda_size is its first field.
    let size = unsafe { (*args1).mda_size };
    if size > kernel_size {
        log(format!("make_dev_s: mda_size {size} > sizeof(struct make_dev_args) {kernel_size}: EINVAL"));
        return layouts::EINVAL;
    }
    let mut args = layouts::make_dev_args::default();
    // SAFETY: copies the caller's first `size` bytes (at most the struct) into a zeroed one.
    unsafe { std::ptr::copy_nonoverlapping(args1.cast::<u8>(), (&raw mut args).cast::<u8>(), size) };
    let waitok = args.mda_flags & layouts::MAKEDEV_WAITOK != 0;
    if waitok && args.mda_flags & layouts::MAKEDEV_NOWAIT != 0 {
        super::rules::panic(Rule::BadMakeDevFlags, "make_dev_sv: both WAITOK and NOWAIT specified");
    }
    if waitok {
        super::sched::may_sleep("make_dev_s(MAKEDEV_WAITOK)");
    }
    // SAFETY: a printf(9) format and its arguments, per make_dev(9).
    let name = unsafe { format(fmt, &[a1, a2, a3]) };
    let exists = with(|e| e.devs.contains_key(&name));
    // An injected failure is one of the name errors (fail.rs), answered as a real one is.
    if let Some(err) = super::fail::errno("make_dev_s").or_else(|| name_error(&name, exists)) {
        if args.mda_flags & layouts::MAKEDEV_CHECKNAME == 0 {
            let rule = if err == layouts::EEXIST { Rule::DuplicateName } else { Rule::BadMakeDevFlags };
            super::rules::panic(rule, &format!("make_dev_sv: bad si_name (error={err}, si_name={name})"));
        }
        log(format!("make_dev_s({name:?}) = {err}"));
        return err;
    }
    let mut dev = Box::<layouts::cdev>::default();
    dev.si_flags = layouts::SI_NAMED as u32;
    if args.mda_flags & layouts::MAKEDEV_ETERNAL != 0 {
        dev.si_flags |= layouts::SI_ETERNAL as u32;
    }
    dev.si_uid = args.mda_uid;
    dev.si_gid = args.mda_gid;
    dev.si_mode = args.mda_mode as u16;
    dev.si_drv0 = args.mda_unit;
    dev.si_drv1 = args.mda_si_drv1;
    dev.si_drv2 = args.mda_si_drv2;
    dev.si_devsw = args.mda_devsw;
    for (d, s) in dev.si_name.iter_mut().zip(name.bytes()) {
        *d = s as c_char;
    }
    let p = Box::into_raw(dev);
    with(|e| e.devs.insert(name.clone(), p as u64));
    // The device being attached, if any, owns the node: its detach must destroy it.
    if let Some(owner) = super::newbus::attaching() {
        with(|e| e.rule_state.node_owner.insert(p as u64, owner));
    }
    // SAFETY: the caller's struct cdev pointer.
    unsafe { *dres = p };
    log(format!(
        "make_dev_s({name:?}, uid {}, gid {}, mode {:o}, flags {:#x}, si_drv1 {:p}) = 0",
        args.mda_uid, args.mda_gid, args.mda_mode, args.mda_flags, args.mda_si_drv1
    ));
    0
}

extern "C" fn emu_destroy_dev(dev: *mut layouts::cdev) {
    super::sched::may_sleep("destroy_dev");
    let name = with(|e| e.devs.iter().find(|(_, a)| **a == dev as u64).map(|(n, _)| n.clone()));
    let Some(name) = name else {
        // The struct of a destroyed node is kept, so its unit is still readable: the
        // kernel's KASSERT on SI_NAMED (kern_conf.c destroy_devl) is what fires.
        if let Some(old) = with(|e| e.rule_state.destroyed_nodes.get(&(dev as u64)).cloned()) {
            // SAFETY: a struct cdev make_dev_s made, kept after its destroy_dev.
            let unit = unsafe { (*dev).si_drv0 };
            super::rules::panic(Rule::DoubleDestroy, &format!("WARNING: Driver mistake: destroy_dev on {unit} ({old}, already destroyed)"));
        }
        kernel_panic(&format!("destroy_dev({dev:p}): not a device node of the emulated devfs"));
    };
    // SAFETY: a node make_dev_s created and still lists.
    let d = unsafe { &mut *dev };
    if d.si_flags & layouts::SI_ETERNAL as u32 != 0 {
        super::rules::panic(Rule::DestroyEternal, &format!("WARNING: Driver mistake: destroy_dev on eternal {} ({name})", d.si_drv0));
    }
    let me = std::thread::current().id();
    let inside = threads_inside(dev as u64);
    if inside.contains(&me) {
        super::rules::panic(
            Rule::DestroyFromOwnMethod,
            &format!("deadlock: destroy_dev({name}) from inside the node's own method: sleeps on \"devdrn\" until si_threadcount ({}, this thread among them) is 0", inside.len()),
        );
    }
    if !inside.is_empty() {
        wait_for_threads(d, &name);
    }
    d.si_flags &= !(layouts::SI_NAMED as u32);
    let had_drv1 = !d.si_drv1.is_null();
    d.si_drv1 = std::ptr::null_mut();
    d.si_drv2 = std::ptr::null_mut();
    with(|e| {
        e.devs.remove(&name);
        e.rule_state.destroyed_nodes.insert(dev as u64, name.clone());
        e.rule_state.node_owner.remove(&(dev as u64));
        if had_drv1 {
            e.rule_state.zeroed_drv1 = Some(name.clone());
        }
    });
    // The struct stays allocated, as the kernel keeps it while references remain.
    log(format!("destroy_dev({name})"));
}

type DestroyCb = unsafe extern "C" fn(*mut c_void);

/// destroy_dev_sched_cb(9): the node is destroyed later by the kernel's destroy thread, which
/// then calls `cb(arg)` ([`run_deferred`]). It never sleeps and always succeeds.
extern "C" fn emu_destroy_dev_sched_cb(dev: *mut layouts::cdev, cb: Option<DestroyCb>, arg: *mut c_void) {
    let known = with(|e| e.devs.values().any(|a| *a == dev as u64));
    if !known {
        kernel_panic(&format!("destroy_dev_sched_cb({dev:p}): not a device node of the emulated devfs"));
    }
    with(|e| e.deferred_destroys.push_back((dev as u64, cb.map_or(0, |f| f as usize as u64), arg as u64)));
    log(format!("destroy_dev_sched_cb({dev:p}) (the destroy thread runs it later)"));
}

/// The devfs destroy thread (destroy_dev_tq): every scheduled node destroyed, then its
/// callback. Returns how many ran.
pub fn run_deferred() -> usize {
    let mut n = 0;
    while let Some((dev, cb, arg)) = with(|e| e.deferred_destroys.pop_front()) {
        emu_destroy_dev(dev as *mut layouts::cdev);
        if cb != 0 {
            // SAFETY: the callback and argument the module scheduled; no emulation lock held.
            unsafe { std::mem::transmute::<u64, DestroyCb>(cb)(arg as *mut c_void) };
        }
        n += 1;
    }
    n
}

/// Live nodes made while `dev` was attaching: (name, si_drv1).
pub(crate) fn nodes_owned_by(dev: u64) -> Vec<(String, u64)> {
    with(|e| {
        let owned: Vec<u64> = e.rule_state.node_owner.iter().filter(|(_, o)| **o == dev).map(|(c, _)| *c).collect();
        e.devs.iter().filter(|(_, c)| owned.contains(c)).map(|(n, c)| (n.clone(), drv1_of(*c))).collect()
    })
}

/// Live nodes whose si_drv1 points into `[start, start + len)`: (name, si_drv1).
pub(crate) fn nodes_pointing_into(start: u64, len: u64) -> Vec<(String, u64)> {
    if start == 0 {
        return Vec::new();
    }
    with(|e| e.devs.iter().map(|(n, c)| (n.clone(), drv1_of(*c))).filter(|(_, d)| *d >= start && *d < start + len.max(1)).collect())
}

fn drv1_of(cdev: u64) -> u64 {
    // SAFETY: a live node's struct cdev, made by make_dev_s and never freed.
    unsafe { (*(cdev as *const layouts::cdev)).si_drv1 as u64 }
}

/// The node whose non-NULL si_drv1 destroy_dev zeroed last (for [`super::trap`]).
pub fn last_zeroed_drv1() -> Option<String> {
    with(|e| e.rule_state.zeroed_drv1.clone())
}

/// <sys/fcntl.h> FREAD and <sys/stat.h> S_IFCHR: what devfs_open passes as oflags and devtype.
const FREAD: c_int = 0x0001;
const S_IFCHR: c_int = 0o020000;

fn threads_inside(dev: u64) -> Vec<std::thread::ThreadId> {
    with(|e| e.rule_state.threads_in.get(&dev).cloned().unwrap_or_default())
}

fn enter(dev: u64) {
    let me = std::thread::current().id();
    with(|e| e.rule_state.threads_in.entry(dev).or_default().push(me));
}

fn leave(dev: u64) {
    let me = std::thread::current().id();
    with(|e| {
        if let Some(v) = e.rule_state.threads_in.get_mut(&dev) {
            if let Some(i) = v.iter().position(|t| *t == me) {
                v.remove(i);
            }
        }
    });
}

/// destroy_devl with other threads inside the node's methods (sys/kern/kern_conf.c): while
/// the cdevsw has d_purge and threads remain, d_purge then a 100 ms sleep ("devprg", "Still N
/// threads in X"); then sleeps on "devdrn" until si_threadcount is 0. Here the wait is bounded
/// (2 s of sleeps, the other threads running meanwhile); threads still inside then are
/// waiting for something nobody will do: DestroyWaitsForever.
fn wait_for_threads(d: &layouts::cdev, name: &str) {
    let csw = d.si_devsw;
    // SAFETY: the module's struct cdevsw of a live node.
    let purge = if csw.is_null() { None } else { unsafe { (*csw).d_purge } };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let dev = d as *const layouts::cdev as u64;
    loop {
        let n = threads_inside(dev).len();
        if n == 0 {
            log(format!("destroy_dev({name}): the threads in its methods left"));
            return;
        }
        if std::time::Instant::now() > deadline {
            super::rules::panic(
                Rule::DestroyWaitsForever,
                &format!("deadlock: destroy_dev({name}) sleeps on \"devdrn\" while {n} thread(s) stay in its methods{}", if purge.is_some() { " after d_purge" } else { " (no d_purge to wake them)" }),
            );
        }
        if let Some(p) = purge {
            log(format!("destroy_dev({name}): d_purge ({n} threads inside)"));
            // SAFETY: the module's d_purge for its live node; no emulation lock held.
            unsafe { p(dev as *mut layouts::cdev) };
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        super::sched::run_kernel_threads();
        if purge.is_some() && !threads_inside(dev).is_empty() {
            super::kern::console_line(&format!("Still {} threads in {name}\n", threads_inside(dev).len()));
        }
    }
}

/// Readers parked by [`park_readers`]: (node, thread).
static READERS: std::sync::Mutex<Vec<(String, std::thread::JoinHandle<c_int>)>> = std::sync::Mutex::new(Vec::new());

/// A process reads every node that has a d_read, each on its own thread (`read(2)` that may
/// block: `run --park-readers`): devfs_read_f calls d_read with the thread counted in the
/// node, and an empty uio (no iovec, uio_resid 0). The thread stays in the module until d_read
/// returns; the unload's destroy_dev has to wait for it.
pub fn park_readers() {
    let nodes: Vec<(String, u64)> = with(|e| e.devs.iter().map(|(n, d)| (n.clone(), *d)).collect());
    for (name, dev) in nodes {
        // SAFETY: a live node make_dev_s made; si_devsw is the module's cdevsw.
        let csw = unsafe { (*(dev as *mut layouts::cdev)).si_devsw };
        // SAFETY: the module's struct cdevsw.
        let Some(read) = (if csw.is_null() { None } else { unsafe { (*csw).d_read } }) else { continue };
        let (tx, rx) = std::sync::mpsc::channel();
        let n = name.clone();
        let h = std::thread::spawn(move || {
            // Logged and counted before the main thread goes on, so the log's order is the
            // order of events.
            log(format!("devfs: d_read({n}) on a reader thread"));
            enter(dev);
            let _ = tx.send(());
            // A zeroed struct uio (48 bytes on amd64; 64 here): uio_iov NULL, uio_iovcnt 0,
            // uio_resid 0, UIO_USERSPACE, UIO_READ, uio_td NULL.
            let mut uio = [0u64; 8];
            // SAFETY: the module's d_read for its live node with an empty uio; no emulation
            // lock held; the node stays (destroy_dev waits for this thread).
            let r = unsafe { read(dev as *mut layouts::cdev, uio.as_mut_ptr().cast(), 0) };
            log(format!("devfs: d_read({n}) = {r} (the reader thread leaves)"));
            leave(dev);
            r
        });
        // The reader is counted in the node before the unload can start.
        let _ = rx.recv();
        READERS.lock().unwrap_or_else(|p| p.into_inner()).push((name, h));
    }
}

/// The parked readers that returned, joined: (node, d_read's result). Ones still inside stay.
pub fn join_readers() -> Vec<(String, c_int)> {
    let mut v = READERS.lock().unwrap_or_else(|p| p.into_inner());
    let (done, running): (Vec<_>, Vec<_>) = v.drain(..).partition(|(_, h)| h.is_finished());
    *v = running;
    done.into_iter().map(|(n, h)| (n, h.join().unwrap_or(-1))).collect()
}

/// A process opens and closes every node (`open(2)`, `close(2)`): devfs_open and devfs_close
/// (sys/fs/devfs/devfs_vnops.c) call the cdevsw's d_open and d_close with the thread counted
/// in si_threadcount (dev_refthread) while it is inside the method. Returns each node's
/// (d_open, d_close) results.
pub fn open_and_close_all() -> Vec<(String, c_int, c_int)> {
    let nodes: Vec<(String, u64)> = with(|e| e.devs.iter().map(|(n, d)| (n.clone(), *d)).collect());
    let mut out = Vec::new();
    for (name, dev) in nodes {
        // SAFETY: a live node make_dev_s made; si_devsw is the module's cdevsw.
        let csw = unsafe { (*(dev as *mut layouts::cdev)).si_devsw };
        if csw.is_null() {
            continue;
        }
        // SAFETY: the module's struct cdevsw.
        let (d_open, d_close) = unsafe { ((*csw).d_open, (*csw).d_close) };
        let call = |f: layouts::d_open_t, what: &str| -> c_int {
            let Some(f) = f else { return 0 };
            enter(dev);
            log(format!("devfs: {what}({name})"));
            // SAFETY: the module's method for its live node, FREAD, S_IFCHR, no thread struct
            // (the emulation has none); no emulation lock held.
            let r = unsafe { f(dev as *mut layouts::cdev, FREAD, S_IFCHR, std::ptr::null_mut()) };
            leave(dev);
            log(format!("devfs: {what}({name}) = {r}"));
            r
        };
        // d_close_t has d_open_t's signature (dev, fflag, devtype, td).
        let o = call(d_open, "d_open");
        let c = if o == 0 { call(d_close, "d_close") } else { 0 };
        out.push((name, o, c));
    }
    out
}

pub fn register(t: &mut KpiTable) {
    t.function("destroy_dev_sched_cb", emu_destroy_dev_sched_cb as extern "C" fn(_, _, _) as usize);
    t.function("make_dev_args_init_impl", emu_make_dev_args_init_impl as extern "C" fn(_, _) as usize);
    t.function("make_dev_s", emu_make_dev_s as extern "C" fn(_, _, _, _, _, _) -> _ as usize);
    t.function("destroy_dev", emu_destroy_dev as extern "C" fn(_) as usize);
}
