//! Threads, mutexes, sleeping, I/O waits, taskqueues, interrupt handlers and callouts.
//!
//! The model is single-threaded: "threads" are contexts the test switches between, which is
//! enough to know *who* calls destroy_dev, whether a mutex is held when something sleeps, and
//! whether a callback could still run on memory that is about to be freed.

use crate::model::{Callback, CbKind, CbRef, IoRef, Lock, LockId, MemRef, Model, TaskQueue, Thread, ThreadId, ThreadKind, TqRef};
use crate::rules::Rule;

impl Model {
    /// A new thread context.
    pub fn spawn_thread(&mut self, kind: ThreadKind) -> ThreadId {
        self.threads.push(Thread { kind, locks: Vec::new() });
        ThreadId(self.threads.len() - 1)
    }

    /// Makes `t` the current thread; returns the previous one.
    pub fn switch_to(&mut self, t: ThreadId) -> ThreadId {
        std::mem::replace(&mut self.current, t)
    }

    /// The current thread.
    pub fn current_thread(&self) -> ThreadId {
        self.current
    }

    /// Runs `f` on thread `t`, then switches back.
    pub fn on_thread<R>(&mut self, t: ThreadId, f: impl FnOnce(&mut Model) -> R) -> R {
        let prev = self.switch_to(t);
        let r = f(self);
        self.switch_to(prev);
        r
    }

    /// mtx_init(MTX_DEF).
    pub fn mtx_init(&mut self, name: &str) -> LockId {
        self.locks.push(Lock { name: name.into(), owner: None });
        LockId(self.locks.len() - 1)
    }

    /// mtx_lock.
    pub fn mtx_lock(&mut self, l: LockId) {
        self.locks[l.0].owner = Some(self.current);
        self.threads[self.current.0].locks.push(l);
    }

    /// mtx_unlock.
    pub fn mtx_unlock(&mut self, l: LockId) {
        self.locks[l.0].owner = None;
        self.threads[self.current.0].locks.retain(|x| *x != l);
    }

    /// WITNESS_WARN(WARN_SLEEPOK): `op` may sleep.
    pub fn might_sleep(&mut self, op: &str) {
        let held: Vec<String> =
            self.threads[self.current.0].locks.iter().map(|l| self.locks[l.0].name.clone()).collect();
        if !held.is_empty() {
            self.violate(Rule::SleepWithMutex, format!("{op} may sleep with mutex {} held", held.join(",")));
        }
    }

    /// A new I/O request, not yet completed.
    pub fn new_io(&mut self) -> IoRef {
        self.ios.submit()
    }

    /// The shared completion board (for a fake controller's `fail_all`).
    pub fn io_board(&self) -> crate::model::IoBoard {
        self.ios.clone()
    }

    /// Completes a request (normally or with ENXIO).
    pub fn complete_io(&mut self, io: IoRef) {
        self.ios.complete(io)
    }

    /// Whether a request completed.
    pub fn io_done(&self, io: IoRef) -> bool {
        self.ios.is_done(io)
    }

    fn add_callback(&mut self, name: &str, kind: CbKind, arg: Option<MemRef>) -> CbRef {
        self.callbacks.push(Callback { name: name.into(), kind, arg, stored_in: None, armed: true });
        CbRef(self.callbacks.len() - 1)
    }

    /// bus_setup_intr with `arg`.
    pub fn setup_intr(&mut self, arg: MemRef) -> CbRef {
        self.add_callback("interrupt handler", CbKind::Intr, Some(arg))
    }

    /// callout_reset with `arg`.
    pub fn callout_reset(&mut self, arg: MemRef) -> CbRef {
        self.add_callback("callout", CbKind::Callout, Some(arg))
    }

    /// taskqueue_create + taskqueue_start_threads.
    pub fn taskqueue_create(&mut self, name: &str) -> TqRef {
        let tq = TqRef(self.taskqueues.len());
        let thread = self.spawn_thread(ThreadKind::TaskQueue(tq));
        self.taskqueues.push(TaskQueue { name: name.into(), thread, freed: false });
        tq
    }

    /// The thread of a taskqueue (to run code "inside a task").
    pub fn taskqueue_thread(&self, tq: TqRef) -> ThreadId {
        self.taskqueues[tq.0].thread
    }

    /// taskqueue_enqueue of a task running on `arg`.
    pub fn task_enqueue(&mut self, tq: TqRef, arg: MemRef) -> CbRef {
        if self.taskqueues[tq.0].freed {
            self.violate(Rule::UseAfterFree, "taskqueue_enqueue on a freed taskqueue");
        }
        self.add_callback("task", CbKind::Task(tq), Some(arg))
    }

    /// Fires a callback as the kernel would (interrupt arrives, callout expires, task runs).
    /// Disarmed callbacks do not run. Returns whether it ran cleanly.
    pub fn fire(&mut self, cb: CbRef) -> bool {
        let c = &self.callbacks[cb.0];
        if !c.armed {
            return false;
        }
        let (name, arg, kind) = (c.name.clone(), c.arg, c.kind);
        if let Some(a) = arg {
            if self.is_freed(a) {
                self.violate(Rule::UseAfterFree, format!("{name} ran on freed {a:?}"));
                return false;
            }
        }
        if !matches!(kind, CbKind::Task(_) | CbKind::Callout) {
            return true;
        }
        // One-shot: a task or callout that ran is no longer pending.
        self.callbacks[cb.0].armed = false;
        true
    }

    /// bus_teardown_intr: returns after the handler finished; it never runs again.
    pub fn teardown_intr(&mut self, cb: CbRef) {
        self.might_sleep("bus_teardown_intr");
        self.callbacks[cb.0].armed = false;
    }

    /// callout_drain.
    pub fn callout_drain(&mut self, cb: CbRef) {
        self.might_sleep("callout_drain");
        self.callbacks[cb.0].armed = false;
    }

    /// taskqueue_drain_all: every queued task of `tq` has run (or was cancelled).
    pub fn taskqueue_drain_all(&mut self, tq: TqRef) {
        self.might_sleep("taskqueue_drain_all");
        if self.threads[self.current.0].kind == ThreadKind::TaskQueue(tq) {
            let name = self.taskqueues[tq.0].name.clone();
            self.violate(Rule::DrainFromOwnTask, format!("taskqueue_drain_all({name}) from its own task"));
            return;
        }
        for c in self.callbacks.iter_mut() {
            if c.kind == CbKind::Task(tq) {
                c.armed = false;
            }
        }
    }

    /// taskqueue_free: drains, then frees.
    pub fn taskqueue_free(&mut self, tq: TqRef) {
        self.taskqueue_drain_all(tq);
        self.taskqueues[tq.0].freed = true;
    }

    /// AcpiInstallNotifyHandler.
    pub fn install_notify_handler(&mut self) {
        self.notify_handlers += 1;
    }

    /// AcpiRemoveNotifyHandler on every handler of ours: waits for running handlers, so it
    /// deadlocks on an acpi_task thread.
    pub fn remove_notify_handlers(&mut self) {
        self.might_sleep("AcpiRemoveNotifyHandler");
        if self.threads[self.current.0].kind == ThreadKind::AcpiTask {
            self.violate(Rule::RemoveNotifyFromAcpiTask, "AcpiRemoveNotifyHandler called on an acpi_task thread");
            return;
        }
        self.notify_handlers = 0;
    }

    /// Notify handlers of ours still installed.
    pub fn notify_handlers(&self) -> u32 {
        self.notify_handlers
    }
}
