//! taskqueue(9), mtx(9), callout(9), the newbus topology lock, devclass lookups, time, sleeps.
//!
//! Taskqueue threads run only when [`run_queues`] is called (the runner does after MOD_LOAD,
//! as the kernel's threads would once the loading thread returns) and when the module drains
//! a queue, which waits for everything queued so far: here the caller's thread runs it.
//! Callouts and timeout tasks are recorded, never fired. Sleeping calls made with a mutex held
//! are findings (mtx(9): a mutex may not be held across a sleep). A task that drains itself or
//! its own queue waits for itself: a deadlock, reported as DrainFromOwnTask.

use super::kern::cstr;
use super::{finding, kernel_panic, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};

pub struct Queue {
    pub name: String,
    pub tasks: VecDeque<u64>,
    pub threads: i32,
}

pub struct Mtx {
    pub name: String,
    pub held: bool,
}

/// A sleeping KPI call: a finding if any mutex is held.
pub(crate) fn may_sleep(what: &str) {
    let held: Vec<String> = with(|e| e.mutexes.values().filter(|m| m.held).map(|m| m.name.clone()).collect());
    if !held.is_empty() {
        super::rules::finding(super::rules::Rule::SleepWithMutex, &format!("{what} may sleep, called with mutex {} held", held.join(", ")));
    }
}

/// Runs one queued task as taskqueue threads do: the pending count (<sys/_task.h>
/// `ta_pending`, "count times queued") goes to the handler and is cleared first.
fn run_task(queue: u64, task: *mut layouts::task) {
    // SAFETY: `task` was enqueued by the module and stays valid until drained (taskqueue(9)).
    let (func, ctx, pending) = unsafe {
        let t = &mut *task;
        let pending = t.ta_pending;
        t.ta_pending = 0;
        t.ta_flags &= !(layouts::TASK_ENQUEUED as u8);
        (t.ta_func, t.ta_context, pending)
    };
    let name = with(|e| e.queues.get(&queue).map(|q| q.name.clone()).unwrap_or_default());
    log(format!("taskqueue {name}: run task {task:p} (pending {pending})"));
    RUNNING.with(|r| r.borrow_mut().push((queue, task as u64)));
    match func {
        // SAFETY: the module's task handler with its own context.
        Some(f) => unsafe { f(ctx, c_int::from(pending)) },
        None => kernel_panic(&format!("taskqueue {name}: task {task:p} has no handler")),
    }
    RUNNING.with(|r| r.borrow_mut().pop());
}

thread_local! {
    /// The tasks this thread is running, innermost last, as (queue, task): a taskqueue thread
    /// here is whichever thread runs the queue.
    static RUNNING: std::cell::RefCell<Vec<(u64, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// sys/kern/subr_taskqueue.c taskqueue_drain sleeps while the task is pending or running
/// (task_is_running), taskqueue_drain_all while any task of the queue is; a task of `q` that
/// drains itself, or its whole queue, waits for itself. Draining another task of the same
/// queue it still has queued waits too when the queue has one thread (the caller is it).
fn drain_from_own_task(q: u64, task: Option<u64>, what: &str) {
    let mine: Vec<u64> = RUNNING.with(|r| r.borrow().iter().filter(|(rq, _)| *rq == q).map(|(_, t)| *t).collect());
    let Some(&current) = mine.last() else { return };
    let (name, threads, queued) = with(|e| e.queues.get(&q).map(|x| (x.name.clone(), x.threads, task.is_some_and(|t| x.tasks.contains(&t)))).unwrap_or_default());
    let stuck = match task {
        None => true,
        Some(t) => mine.contains(&t) || (queued && threads <= 1),
    };
    if stuck {
        super::rules::panic(
            super::rules::Rule::DrainFromOwnTask,
            &format!("deadlock: {what} on {name} from its own task {current:#x}: it sleeps until that task returns"),
        );
    }
}

/// Runs what is queued on `queue` now and what those tasks queue in turn, up to `limit` runs.
fn drain(queue: u64, limit: usize) -> usize {
    let mut n = 0;
    while n < limit {
        let Some(t) = with(|e| e.queues.get_mut(&queue).and_then(|q| q.tasks.pop_front())) else { break };
        run_task(queue, t as *mut layouts::task);
        n += 1;
    }
    n
}

/// Lets every taskqueue thread run until the queues are empty (at most `limit` tasks).
pub fn run_queues(limit: usize) -> usize {
    let mut total = 0;
    loop {
        let queues: Vec<u64> = with(|e| e.queues.keys().copied().collect());
        let ran: usize = queues.into_iter().map(|q| drain(q, limit)).sum::<usize>() + run_kernel_threads();
        total += ran;
        if ran == 0 || total >= limit {
            return total;
        }
    }
}

/// Time passes: every armed timeout task expires, which enqueues its task on its queue
/// (taskqueue(9) TIMEOUT_TASK), and the queues run; repeated while tasks re-arm, at most
/// `limit` expiries. Returns how many expired; a timeout still armed at the limit is a finding.
pub fn fire_timeouts(limit: usize) -> usize {
    let mut fired = 0;
    while fired < limit {
        let Some((tt, q)) = with(|e| e.armed_timeouts.pop_first()) else { return fired };
        fired += 1;
        log(format!("time passes: timeout task {tt:#x} expires"));
        // SAFETY: an armed timeout_task of the module, valid until drained or cancelled.
        let task = unsafe { &raw mut (*(tt as *mut layouts::timeout_task)).t };
        enqueue(q, task);
        run_queues(1000);
    }
    let armed = with(|e| e.armed_timeouts.len());
    if armed > 0 {
        finding(format!("{armed} timeout tasks still re-arming after {limit} expiries"));
    }
    fired
}

extern "C" fn emu_taskqueue_create(name: *const c_char, mflags: c_int, enqueue: *mut c_void, context: *mut c_void) -> *mut c_void {
    // SAFETY: a C string per taskqueue_create(9).
    let name = unsafe { cstr(name) };
    if mflags & layouts::M_WAITOK != 0 {
        may_sleep("taskqueue_create(M_WAITOK)");
    }
    if super::fail::null("taskqueue_create") {
        log(format!("taskqueue_create({name}, enqueue {enqueue:p}, context {context:p}) = NULL"));
        return std::ptr::null_mut();
    }
    let id = Box::into_raw(Box::new(0u64)) as u64;
    with(|e| e.queues.insert(id, Queue { name: name.clone(), tasks: VecDeque::new(), threads: 0 }));
    log(format!("taskqueue_create({name}, enqueue {enqueue:p}, context {context:p}) = {id:#x}"));
    id as *mut c_void
}

extern "C" fn emu_taskqueue_start_threads(tqp: *mut *mut c_void, count: c_int, pri: c_int, fmt: *const c_char, a1: u64, a2: u64, a3: u64, a4: u64) -> c_int {
    // SAFETY: tqp points to the queue pointer taskqueue_create returned; fmt is a format.
    let (q, name) = unsafe { (*tqp as u64, super::kern::format(fmt, &[a1, a2, a3, a4])) };
    if with(|e| e.queues.contains_key(&q)) {
        if let Some(err) = super::fail::errno("taskqueue_start_threads") {
            // _taskqueue_start_threads: its thread array's malloc failed; the queue stays.
            super::kern::console_text(&format!("_taskqueue_start_threads: no memory for {name} threads\n"));
            log(format!("taskqueue_start_threads({q:#x}, {count}, pri {pri}, {name:?}) = {err} (no thread)"));
            return err;
        }
    }
    let ok = with(|e| e.queues.get_mut(&q).map(|q| q.threads += count).is_some());
    log(format!("taskqueue_start_threads({q:#x}, {count}, pri {pri}, {name:?})"));
    if !ok {
        kernel_panic(&format!("taskqueue_start_threads: {q:#x} is not a taskqueue"));
    }
    0
}

extern "C" fn emu_taskqueue_thread_enqueue(context: *mut c_void) {
    log(format!("taskqueue_thread_enqueue({context:p})"));
}

fn enqueue(q: u64, task: *mut layouts::task) -> c_int {
    // SAFETY: the module's struct task, initialised by TASK_INIT.
    let t = unsafe { &mut *task };
    let known = with(|e| {
        let Some(queue) = e.queues.get_mut(&q) else { return false };
        if t.ta_pending == 0 {
            queue.tasks.push_back(task as u64);
            t.ta_flags |= layouts::TASK_ENQUEUED as u8;
        }
        true
    });
    if !known {
        kernel_panic(&format!("taskqueue_enqueue: {q:#x} is not a taskqueue"));
    }
    t.ta_pending = t.ta_pending.saturating_add(1);
    log(format!("taskqueue_enqueue({q:#x}, {task:p}) (pending {})", t.ta_pending));
    0
}

extern "C" fn emu_taskqueue_enqueue(q: *mut c_void, task: *mut layouts::task) -> c_int {
    enqueue(q as u64, task)
}

extern "C" fn emu_taskqueue_drain(q: *mut c_void, task: *mut layouts::task) {
    may_sleep("taskqueue_drain");
    drain_from_own_task(q as u64, Some(task as u64), &format!("taskqueue_drain({task:p})"));
    log(format!("taskqueue_drain({q:p}, {task:p})"));
    let queued = with(|e| {
        let Some(queue) = e.queues.get_mut(&(q as u64)) else { return false };
        let before = queue.tasks.len();
        queue.tasks.retain(|t| *t != task as u64);
        before != queue.tasks.len()
    });
    if queued {
        run_task(q as u64, task);
    }
}

extern "C" fn emu_taskqueue_drain_all(q: *mut c_void) {
    may_sleep("taskqueue_drain_all");
    drain_from_own_task(q as u64, None, "taskqueue_drain_all");
    log(format!("taskqueue_drain_all({q:p})"));
    let n = drain(q as u64, 1000);
    log(format!("taskqueue_drain_all({q:p}): {n} tasks ran"));
}

extern "C" fn emu_taskqueue_free(q: *mut c_void) {
    may_sleep("taskqueue_free");
    let left = with(|e| e.queues.remove(&(q as u64)).map(|q| (q.name, q.tasks.len())));
    match left {
        None => kernel_panic(&format!("taskqueue_free: {q:p} is not a taskqueue")),
        Some((name, n)) => {
            log(format!("taskqueue_free({name})"));
            if n > 0 {
                finding(format!("taskqueue_free({name}) with {n} tasks still queued"));
            }
            let armed: Vec<u64> = with(|e| e.armed_timeouts.iter().filter(|(_, tq)| **tq == q as u64).map(|(t, _)| *t).collect());
            if !armed.is_empty() {
                finding(format!("taskqueue_free({name}) with {} armed timeout tasks", armed.len()));
            }
            // SAFETY: the id Box made by taskqueue_create, freed once.
            drop(unsafe { Box::from_raw(q.cast::<u64>()) });
        }
    }
}

extern "C" fn emu_timeout_task_init(q: *mut c_void, tt: *mut layouts::timeout_task, priority: c_int, func: *mut c_void, ctx: *mut c_void) {
    // SAFETY: the module's struct timeout_task; TIMEOUT_TASK_INIT hands it to us to set up.
    unsafe {
        let t = &mut *tt;
        t.q = q.cast();
        t.t.ta_pending = 0;
        t.t.ta_flags = 0;
        t.t.ta_priority = priority as u8;
        t.t.ta_func = std::mem::transmute::<*mut c_void, Option<unsafe extern "C" fn(*mut c_void, c_int)>>(func);
        t.t.ta_context = ctx;
        t.f = 0;
    }
    log(format!("_timeout_task_init({q:p}, {tt:p}, priority {priority}, func {func:p}, ctx {ctx:p})"));
}

extern "C" fn emu_taskqueue_enqueue_timeout_sbt(q: *mut c_void, tt: *mut layouts::timeout_task, sbt: i64, pr: i64, flags: c_int) -> c_int {
    with(|e| e.armed_timeouts.insert(tt as u64, q as u64));
    set_deadline(tt as u64, sbt, flags);
    log(format!("taskqueue_enqueue_timeout_sbt({q:p}, {tt:p}, sbt {sbt:#x}, pr {pr:#x}, flags {flags:#x}) (never fires here)"));
    0
}

extern "C" fn emu_taskqueue_cancel_timeout(q: *mut c_void, tt: *mut layouts::timeout_task, pendp: *mut u32) -> c_int {
    let was = with(|e| e.armed_timeouts.remove(&(tt as u64)).is_some());
    if !pendp.is_null() {
        // SAFETY: the caller's u_int.
        unsafe { *pendp = u32::from(was) };
    }
    log(format!("taskqueue_cancel_timeout({q:p}, {tt:p}) (was armed: {was})"));
    0
}

extern "C" fn emu_taskqueue_drain_timeout(q: *mut c_void, tt: *mut layouts::timeout_task) {
    may_sleep("taskqueue_drain_timeout");
    with(|e| e.armed_timeouts.remove(&(tt as u64)));
    log(format!("taskqueue_drain_timeout({q:p}, {tt:p})"));
    // SAFETY: the embedded task of the module's timeout_task.
    let task = unsafe { &raw mut (*tt).t };
    emu_taskqueue_drain(q, task);
}

// --- mtx(9) -----------------------------------------------------------------------------------

extern "C" fn emu_mtx_init(c: *mut usize, name: *const c_char, ty: *const c_char, opts: c_int) {
    // SAFETY: C strings per mtx_init(9).
    let (name, ty) = unsafe { (cstr(name), cstr(ty)) };
    with(|e| e.mutexes.insert(c as u64, Mtx { name: name.clone(), held: false }));
    log(format!("mtx_init({c:p}, {name}, {ty}, {opts:#x})"));
}

extern "C" fn emu_mtx_destroy(c: *mut usize) {
    let m = with(|e| e.mutexes.remove(&(c as u64)));
    match m {
        None => kernel_panic(&format!("mtx_destroy({c:p}): not an initialised mutex")),
        Some(m) => {
            if m.held {
                finding(format!("mtx_destroy({}) while held", m.name));
            }
            log(format!("mtx_destroy({})", m.name));
        }
    }
}

extern "C" fn emu_mtx_lock_flags(c: *mut usize, _opts: c_int, _file: *const c_char, _line: c_int) {
    let r = with(|e| match e.mutexes.get_mut(&(c as u64)) {
        None => Err(format!("mtx_lock({c:p}): not an initialised mutex")),
        Some(m) if m.held => Err(format!("_mtx_lock_sleep: recursed on non-recursive mutex {}", m.name)),
        Some(m) => {
            m.held = true;
            Ok(m.name.clone())
        }
    });
    match r {
        Ok(n) => log(format!("mtx_lock({n})")),
        Err(m) => kernel_panic(&m),
    }
}

extern "C" fn emu_mtx_unlock_flags(c: *mut usize, _opts: c_int, _file: *const c_char, _line: c_int) {
    let r = with(|e| match e.mutexes.get_mut(&(c as u64)) {
        Some(m) if m.held => {
            m.held = false;
            Ok(m.name.clone())
        }
        Some(m) => Err(format!("mtx_unlock: mutex {} not owned", m.name)),
        None => Err(format!("mtx_unlock({c:p}): not an initialised mutex")),
    });
    match r {
        Ok(n) => log(format!("mtx_unlock({n})")),
        Err(m) => kernel_panic(&m),
    }
}

// --- callout(9) ---------------------------------------------------------------------------------

extern "C" fn emu_callout_init_lock(c: *mut c_void, lock: *mut c_void, flags: c_int) {
    with(|e| e.callout_locks.insert(c as u64, lock as u64));
    log(format!("callout_init_lock({c:p}, {lock:p}, {flags:#x})"));
}

type CalloutFn = unsafe extern "C" fn(*mut c_void);

/// Time passes by one period of every armed callout: each fires once, as softclock runs it
/// (sys/kern/kern_timeout.c softclock_call_cc): disarmed first, its mutex taken around the
/// function (callout_init_mtx; the callout may re-arm itself). Returns how many fired.
pub fn fire_callouts() -> usize {
    let armed: Vec<(u64, (u64, u64))> = with(|e| std::mem::take(&mut e.armed_callouts).into_iter().collect());
    for (c, (f, arg)) in &armed {
        // callout_init_mtx passes &mtx->lock_object (the struct's start); mtx_init, and so the
        // emulated mutexes, use &mtx->mtx_lock.
        let lock = with(|e| e.callout_locks.get(c).copied().unwrap_or(0));
        let lock = if lock == 0 { 0 } else { lock + std::mem::offset_of!(layouts::mtx, mtx_lock) as u64 };
        log(format!("time passes: callout {c:#x} fires"));
        if lock != 0 {
            emu_mtx_lock_flags(lock as *mut usize, 0, std::ptr::null(), 0);
        }
        // SAFETY: the function and argument the module armed the callout with; the callout's
        // mutex is held as softclock holds it.
        unsafe { std::mem::transmute::<u64, CalloutFn>(*f)(*arg as *mut c_void) };
        if lock != 0 {
            emu_mtx_unlock_flags(lock as *mut usize, 0, std::ptr::null(), 0);
        }
    }
    armed.len()
}

extern "C" fn emu_callout_reset_sbt_on(c: *mut c_void, sbt: i64, _pr: i64, f: *mut c_void, arg: *mut c_void, cpu: c_int, flags: c_int) -> c_int {
    let was = with(|e| e.armed_callouts.insert(c as u64, (f as u64, arg as u64)).is_some());
    set_deadline(c as u64, sbt, flags);
    log(format!("callout_reset_sbt_on({c:p}, sbt {sbt:#x}, {f:p}({arg:p}), cpu {cpu}, flags {flags:#x}) (fires when the emulation lets time pass)"));
    c_int::from(was)
}

extern "C" fn emu_callout_stop_safe(c: *mut c_void, flags: c_int) -> c_int {
    if flags != 0 {
        may_sleep("callout_drain");
    }
    let was = with(|e| e.armed_callouts.remove(&(c as u64)).is_some());
    log(format!("callout_stop_safe({c:p}, {flags:#x}) (was armed: {was})"));
    c_int::from(was)
}

// --- newbus -------------------------------------------------------------------------------------

/// bus_topo_lock() taken by the emulated kernel itself (devctl's ioctl).
pub fn topo_lock() {
    emu_bus_topo_lock();
}

pub fn topo_unlock() {
    emu_bus_topo_unlock();
}

extern "C" fn emu_bus_topo_lock() {
    let was = with(|e| std::mem::replace(&mut e.topo_locked, true));
    if was {
        kernel_panic("bus_topo_lock: recursed on the newbus topology lock");
    }
    log("bus_topo_lock()".into());
}

extern "C" fn emu_bus_topo_unlock() {
    let was = with(|e| std::mem::replace(&mut e.topo_locked, false));
    if !was {
        kernel_panic("bus_topo_unlock: not locked");
    }
    log("bus_topo_unlock()".into());
}

// --- time, sleeping -----------------------------------------------------------------------------

fn now(bt: *mut layouts::bintime) {
    let ns = clock_ns();
    // SAFETY: the caller's struct bintime; frac is the fraction of a second in 2^-64 units.
    unsafe {
        (*bt).sec = (ns / 1_000_000_000) as i64;
        (*bt).frac = (u128::from(ns % 1_000_000_000) << 64).div_euclid(1_000_000_000) as u64;
    }
}

extern "C" fn emu_binuptime(bt: *mut layouts::bintime) {
    now(bt);
}

extern "C" fn emu_getbinuptime(bt: *mut layouts::bintime) {
    now(bt);
}

extern "C" fn emu_pause_sbt(wmesg: *const c_char, sbt: i64, _pr: i64, _flags: c_int) -> c_int {
    may_sleep("pause_sbt");
    // SAFETY: a C string per pause(9).
    let w = unsafe { cstr(wmesg) };
    log(format!("pause_sbt({w}, {:.3} ms)", sbt as f64 / (1u64 << 32) as f64 * 1000.0));
    // While this thread sleeps, QEMU runs on and the kernel's other threads run.
    std::thread::sleep(std::time::Duration::from_nanos(((sbt.max(0) as u128 * 1_000_000_000) >> 32).min(10_000_000) as u64));
    // The device's time passes while the module sleeps: admin commands held by the
    // admin-latency device fault reach QEMU when due (also from a sleep inside one of the
    // kernel's threads, where run_kernel_threads does nothing).
    super::device_fault::time_passes(super::device_fault::At::Sleep);
    // Another thread may have been chosen to run in this sleep (`--in-sleep`).
    super::interleave::at_sleep(&w);
    super::geom::stalled_sleep();
    run_kernel_threads();
    super::geom::sleep_while_gone_held();
    // EWOULDBLOCK (FreeBSD's value): the timeout expired (pause(9)).
    layouts::EWOULDBLOCK
}

extern "C" fn emu_delay(usec: c_int) {
    log(format!("DELAY({usec})"));
    std::thread::sleep(std::time::Duration::from_micros(usec.max(0) as u64));
    // The controller's time passes during a spin too: admin commands held by the
    // admin-latency device fault reach QEMU when due.
    super::device_fault::time_passes(super::device_fault::At::Spin);
}

/// destroy_dev_drain(9): waits for the destroy_dev_sched callbacks of a cdevsw: the destroy
/// thread runs what is scheduled (all of it: nodes are not told apart by cdevsw here).
extern "C" fn emu_destroy_dev_drain(csw: *mut c_void) {
    may_sleep("destroy_dev_drain");
    let n = super::devfs::run_deferred();
    log(format!("destroy_dev_drain({csw:p}): {n} scheduled destructions ran"));
}

/// Newbus calls that need the topology lock (bus_topo_assert in subr_bus.c): a finding
/// without it.
pub(crate) fn require_topo(what: &str) {
    if !with(|e| e.topo_locked) {
        finding(format!("{what} without the newbus topology lock (bus_topo_assert)"));
    }
}

thread_local! {
    static IN_KERNEL_THREADS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The kernel's own threads get to run (the caller sleeps, or taskqueue threads run): GEOM's
/// event thread (d_gone), devfs's destroy thread (destroy_dev_sched_cb) and interrupt
/// threads (MSI-X vectors that fired; INTx lines that are high, super::intx). Not re-entered
/// from code those threads run. First the device's time passes: admin doorbell writes the
/// admin-latency device fault holds reach QEMU once due (super::device_fault::time_passes).
pub fn run_kernel_threads() -> usize {
    super::device_fault::time_passes(super::device_fault::At::KernelThreads);
    if IN_KERNEL_THREADS.with(|c| c.replace(true)) {
        return 0;
    }
    let mut n = 0;
    loop {
        let ran = super::pci::run_interrupts() + super::intx::run_lines() + super::msi::run_messages() + super::geom::run_events() + super::devfs::run_deferred();
        if ran == 0 {
            break;
        }
        n += ran;
    }
    IN_KERNEL_THREADS.with(|c| c.set(false));
    n
}

pub fn register(t: &mut KpiTable) {
    t.function("destroy_dev_drain", emu_destroy_dev_drain as extern "C" fn(_) as usize);
    t.function("taskqueue_create", emu_taskqueue_create as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("taskqueue_start_threads", emu_taskqueue_start_threads as extern "C" fn(_, _, _, _, _, _, _, _) -> _ as usize);
    t.function("taskqueue_thread_enqueue", emu_taskqueue_thread_enqueue as extern "C" fn(_) as usize);
    t.function("taskqueue_enqueue", emu_taskqueue_enqueue as extern "C" fn(_, _) -> _ as usize);
    t.function("taskqueue_drain", emu_taskqueue_drain as extern "C" fn(_, _) as usize);
    t.function("taskqueue_drain_all", emu_taskqueue_drain_all as extern "C" fn(_) as usize);
    t.function("taskqueue_free", emu_taskqueue_free as extern "C" fn(_) as usize);
    t.function("_timeout_task_init", emu_timeout_task_init as extern "C" fn(_, _, _, _, _) as usize);
    t.function("taskqueue_enqueue_timeout_sbt", emu_taskqueue_enqueue_timeout_sbt as extern "C" fn(_, _, _, _, _) -> _ as usize);
    t.function("taskqueue_cancel_timeout", emu_taskqueue_cancel_timeout as extern "C" fn(_, _, _) -> _ as usize);
    t.function("taskqueue_drain_timeout", emu_taskqueue_drain_timeout as extern "C" fn(_, _) as usize);
    t.function("_mtx_init", emu_mtx_init as extern "C" fn(_, _, _, _) as usize);
    t.function("_mtx_destroy", emu_mtx_destroy as extern "C" fn(_) as usize);
    t.function("__mtx_lock_flags", emu_mtx_lock_flags as extern "C" fn(_, _, _, _) as usize);
    t.function("__mtx_unlock_flags", emu_mtx_unlock_flags as extern "C" fn(_, _, _, _) as usize);
    t.function("_callout_init_lock", emu_callout_init_lock as extern "C" fn(_, _, _) as usize);
    t.function("callout_reset_sbt_on", emu_callout_reset_sbt_on as extern "C" fn(_, _, _, _, _, _, _) -> _ as usize);
    t.function("_callout_stop_safe", emu_callout_stop_safe as extern "C" fn(_, _) -> _ as usize);
    t.function("bus_topo_lock", emu_bus_topo_lock as extern "C" fn() as usize);
    t.function("bus_topo_unlock", emu_bus_topo_unlock as extern "C" fn() as usize);
    t.function("binuptime", emu_binuptime as extern "C" fn(_) as usize);
    t.function("getbinuptime", emu_getbinuptime as extern "C" fn(_) as usize);
    t.function("pause_sbt", emu_pause_sbt as extern "C" fn(_, _, _, _) -> _ as usize);
    t.function("DELAY", emu_delay as extern "C" fn(_) as usize);
}

// --- the emulated clock -------------------------------------------------------------------------
//
// binuptime(9) is CLOCK_MONOTONIC plus a skew that only grows ([`advance_clock`]): a caller
// with nothing left to do but wait for a timer (the scenario runner waiting for the module's
// 1 s watchdog to find a surprise removal) moves the clock to the next deadline instead of
// sleeping until it. Every callout and timeout task records its deadline on this clock when
// armed (`callout_reset_sbt_on`, `taskqueue_enqueue_timeout_sbt`: `sbt` relative, or absolute
// with C_ABSOLUTE, sys/sys/callout.h); [`fire_due`] runs those whose deadline passed.

/// sys/sys/callout.h: the event time is absolute.
const C_ABSOLUTE: c_int = 0x0200;

static SKEW_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DEADLINES: std::sync::Mutex<std::collections::BTreeMap<u64, u64>> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The emulated uptime in ns: CLOCK_MONOTONIC plus the skew time jumps added.
pub fn clock_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64 + SKEW_NS.load(std::sync::atomic::Ordering::Relaxed)
}

fn sbt_to_ns(sbt: i64) -> u64 {
    ((sbt.max(0) as u128 * 1_000_000_000) >> 32) as u64
}

fn set_deadline(timer: u64, sbt: i64, flags: c_int) {
    let at = if flags & C_ABSOLUTE != 0 { sbt_to_ns(sbt) } else { clock_ns() + sbt_to_ns(sbt) };
    DEADLINES.lock().unwrap_or_else(|p| p.into_inner()).insert(timer, at);
}

fn deadline(timer: u64) -> u64 {
    DEADLINES.lock().unwrap_or_else(|p| p.into_inner()).get(&timer).copied().unwrap_or(0)
}

/// Time jumps forward by `ns` (the emulated clock only; QEMU's runs on).
pub fn advance_clock(ns: u64) {
    SKEW_NS.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    log(format!("time jumps {:.3} ms forward", ns as f64 / 1e6));
}

/// The nearest deadline of an armed callout or timeout task, in ns from now (0: due).
pub fn next_deadline_in() -> Option<u64> {
    let timers: Vec<u64> = with(|e| e.armed_callouts.keys().chain(e.armed_timeouts.keys()).copied().collect());
    let now = clock_ns();
    timers.into_iter().map(|t| deadline(t).saturating_sub(now)).min()
}

/// softclock: every armed callout and timeout task whose deadline passed fires once (a
/// callout with its mutex held, as [`fire_callouts`] runs one; a timeout task's task is
/// enqueued and the queues run). Returns how many fired.
pub fn fire_due() -> usize {
    let now = clock_ns();
    let callouts: Vec<(u64, (u64, u64))> = with(|e| e.armed_callouts.iter().map(|(c, v)| (*c, *v)).collect());
    let mut n = 0;
    for (c, (f, arg)) in callouts {
        if deadline(c) > now {
            continue;
        }
        // Disarmed first, as softclock does; the function may re-arm it.
        if with(|e| e.armed_callouts.remove(&c)).is_none() {
            continue;
        }
        let lock = with(|e| e.callout_locks.get(&c).copied().unwrap_or(0));
        let lock = if lock == 0 { 0 } else { lock + std::mem::offset_of!(layouts::mtx, mtx_lock) as u64 };
        log(format!("softclock: callout {c:#x} fires"));
        if lock != 0 {
            emu_mtx_lock_flags(lock as *mut usize, 0, std::ptr::null(), 0);
        }
        // SAFETY: the function and argument the module armed the callout with; the callout's
        // mutex is held as softclock holds it.
        unsafe { std::mem::transmute::<u64, CalloutFn>(f)(arg as *mut c_void) };
        if lock != 0 {
            emu_mtx_unlock_flags(lock as *mut usize, 0, std::ptr::null(), 0);
        }
        n += 1;
    }
    let timeouts: Vec<(u64, u64)> = with(|e| e.armed_timeouts.iter().map(|(t, q)| (*t, *q)).collect());
    for (tt, q) in timeouts {
        if deadline(tt) > now || with(|e| e.armed_timeouts.remove(&tt)).is_none() {
            continue;
        }
        log(format!("softclock: timeout task {tt:#x} expires"));
        // SAFETY: an armed timeout_task of the module, valid until drained or cancelled.
        let task = unsafe { &raw mut (*(tt as *mut layouts::timeout_task)).t };
        enqueue(q, task);
        n += 1;
    }
    n
}
