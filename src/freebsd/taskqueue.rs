//! `taskqueue(9)`: a private queue with its own thread, and tasks that cannot outlive it.
//!
//! Ordering rules, enforced by types:
//! - A [`Task`] borrows its [`TaskQueue`], so the queue outlives every task built on it.
//! - The same holds for a [`TimeoutTask`] (a task run after a delay).
//! - Dropping a `Task` first drains it (`taskqueue_drain(9)`): waits until it is neither queued
//!   nor running. Only then is its memory (and the context it owns) freed. This is the
//!   "drain, don't refcount" rule for callback contexts.
//! - Dropping the `TaskQueue` frees it with `taskqueue_free(9)`, which stops the thread.
//!
//! Both drops sleep: they must run in a sleepable context without a mutex held, and never on the
//! queue's own thread (a task cannot drain itself).

use super::alloc::{box_waitok, try_box_with};
use super::bindings;
use alloc::boxed::Box;
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void, CStr};
use core::marker::PhantomPinned;
use core::pin::Pin;

/// A taskqueue with one kernel thread at `PWAIT` priority.
pub struct TaskQueue {
    /// The queue pointer, boxed: taskqueue_thread_enqueue's context is the *address* of the
    /// pointer (`&tq`), which must not move while the queue exists.
    slot: Box<*mut bindings::taskqueue>,
}

// SAFETY: taskqueue(9) functions are thread-safe; the queue is only freed in Drop.
unsafe impl Send for TaskQueue {}
// SAFETY: as above.
unsafe impl Sync for TaskQueue {}

impl TaskQueue {
    /// Creates the queue and starts its thread, named `name` in `procstat -t`. Sleeps
    /// (M_WAITOK): only from a sleepable context.
    pub fn new(name: &'static CStr) -> Result<Self, c_int> {
        let mut slot = box_waitok(core::ptr::null_mut::<bindings::taskqueue>());
        let ctx = (&raw mut *slot).cast::<c_void>();
        // SAFETY: M_WAITOK creation with the standard thread enqueue function, whose context is
        // the boxed slot; the box lives in the returned TaskQueue until after taskqueue_free.
        let tq = unsafe {
            bindings::taskqueue_create(
                name.as_ptr(),
                bindings::M_WAITOK,
                Some(bindings::taskqueue_thread_enqueue),
                ctx,
            )
        };
        if tq.is_null() {
            return Err(bindings::ENOMEM);
        }
        *slot = tq;
        // SAFETY: the slot holds the queue just created; the name is NUL-terminated and 'static.
        let err = unsafe { bindings::nvmehp_taskqueue_start_threads(&raw mut *slot, bindings::PWAIT, name.as_ptr()) };
        if err != 0 {
            // SAFETY: nothing was ever enqueued; the queue is ours to free.
            unsafe { bindings::taskqueue_free(tq) };
            return Err(err);
        }
        Ok(TaskQueue { slot })
    }

    fn raw(&self) -> *mut bindings::taskqueue {
        *self.slot
    }

    /// Makes a task that runs `handler.run()` on this queue's thread.
    /// Allocates without sleeping; `None` when memory is short.
    pub fn task<H: TaskHandler>(&self, priority: u8, handler: H) -> Option<Pin<Box<Task<'_, H>>>> {
        let task = try_box_with(|| Task {
            raw: UnsafeCell::new(bindings::task::default()),
            queue: self,
            handler,
            _pinned: PhantomPinned,
        })?;
        let raw = task.raw.get();
        // SAFETY: TASK_INIT on a task at its final address (boxed, pinned below and never
        // moved); the context is the Task itself, which outlives every run (Drop drains).
        unsafe {
            bindings::nvmehp_task_init(
                raw,
                c_int::from(priority),
                Some(trampoline::<H>),
                (&raw const *task).cast_mut().cast::<c_void>(),
            )
        };
        Some(Box::into_pin(task))
    }
}

impl TaskQueue {
    /// `taskqueue_drain_all(9)`: waits until every task enqueued so far has run. Sleeps; not
    /// from the queue's own thread.
    pub fn drain_all(&self) {
        // SAFETY: a live queue; the caller is not on its thread (documented).
        unsafe { bindings::taskqueue_drain_all(self.raw()) }
    }
}

impl Drop for TaskQueue {
    fn drop(&mut self) {
        // SAFETY: every Task borrowing this queue has been dropped (and so drained) already;
        // taskqueue_free stops the thread and frees the queue. The slot is freed after it.
        unsafe { bindings::taskqueue_free(self.raw()) };
    }
}

/// What a task does when it runs. `pending` is how many enqueues were coalesced into this run
/// (taskqueue(9) runs a task once however often it was enqueued meanwhile).
pub trait TaskHandler: Sync {
    /// Runs on the queue's thread: may sleep, may take mutexes.
    fn run(&self, pending: u32);
}

/// A `struct task` bound to its queue and handler. Pinned: the kernel links it into the queue.
pub struct Task<'q, H: TaskHandler> {
    raw: UnsafeCell<bindings::task>,
    queue: &'q TaskQueue,
    handler: H,
    _pinned: PhantomPinned,
}

// SAFETY: the kernel touches `raw` only under the queue's lock; the handler is Sync and only
// shared (&H) between the enqueuer and the queue thread.
unsafe impl<H: TaskHandler> Sync for Task<'_, H> {}

impl<H: TaskHandler> Task<'_, H> {
    /// Queues the task (or bumps its pending count if it is already queued). Never sleeps:
    /// usable with a mutex held and from ACPI notify context.
    pub fn enqueue(&self) {
        // SAFETY: the task was initialised in TaskQueue::task, is pinned, and outlives any run
        // (Drop drains); the queue outlives the task (borrow).
        unsafe { bindings::taskqueue_enqueue(self.queue.raw(), self.raw.get()) };
    }

    /// The raw task, for the fake kernel's queue runner.
    #[cfg(test)]
    pub(crate) fn raw_for_tests(&self) -> *mut bindings::task {
        self.raw.get()
    }

    /// The handler, for the code that enqueues.
    pub fn handler(&self) -> &H {
        &self.handler
    }
}

impl<H: TaskHandler> Drop for Task<'_, H> {
    fn drop(&mut self) {
        // SAFETY: after taskqueue_drain returns the task is neither queued nor running, so its
        // memory and handler may be freed. Drop runs in the owner's (sleepable) context.
        unsafe { bindings::taskqueue_drain(self.queue.raw(), self.raw.get()) };
    }
}

unsafe extern "C" fn trampoline<H: TaskHandler>(context: *mut c_void, pending: c_int) {
    // SAFETY: `context` is the Task registered in TaskQueue::task; it is alive because its Drop
    // drains before freeing it.
    let task = unsafe { &*context.cast::<Task<'_, H>>() };
    task.handler.run(u32::try_from(pending).unwrap_or(0));
}

impl TaskQueue {
    /// Makes a task that runs `handler.run()` on this queue's thread after a delay
    /// (`struct timeout_task`). Allocates without sleeping; `None` when memory is short.
    pub fn timeout_task<H: TaskHandler>(&self, priority: u8, handler: H) -> Option<Pin<Box<TimeoutTask<'_, H>>>> {
        let task = try_box_with(|| TimeoutTask {
            raw: UnsafeCell::new(bindings::timeout_task::default()),
            queue: self,
            handler,
            _pinned: PhantomPinned,
        })?;
        // SAFETY: TIMEOUT_TASK_INIT on a timeout_task at its final (boxed, then pinned) address;
        // it binds the task's callout to this queue's lock. The context is the TimeoutTask,
        // which outlives every run (Drop drains).
        unsafe {
            bindings::_timeout_task_init(
                self.raw(),
                task.raw.get(),
                c_int::from(priority),
                Some(timeout_trampoline::<H>),
                (&raw const *task).cast_mut().cast::<c_void>(),
            )
        };
        Some(Box::into_pin(task))
    }
}

/// A `struct timeout_task`: a task enqueued after a delay. Pinned; drained when dropped.
pub struct TimeoutTask<'q, H: TaskHandler> {
    raw: UnsafeCell<bindings::timeout_task>,
    queue: &'q TaskQueue,
    handler: H,
    _pinned: PhantomPinned,
}

// SAFETY: as Task: the kernel touches `raw` under the queue's lock; the handler is Sync.
unsafe impl<H: TaskHandler> Sync for TimeoutTask<'_, H> {}

impl<H: TaskHandler> TimeoutTask<'_, H> {
    /// Runs the task `delay_us` from now (re-arming moves an armed timer). Never sleeps.
    pub fn enqueue_after(&self, delay_us: u64) {
        // SAFETY: initialised, pinned, drained before freed; the queue outlives it (borrow).
        unsafe {
            bindings::taskqueue_enqueue_timeout_sbt(
                self.queue.raw(),
                self.raw.get(),
                super::clock::us_to_sbt(delay_us),
                0,
                0,
            )
        };
    }

    /// The task inside, for the fake kernel's queue runner.
    #[cfg(test)]
    pub(crate) fn raw_task_for_tests(&self) -> *mut bindings::task {
        // SAFETY: only the address of a field is computed.
        unsafe { &raw mut (*self.raw.get()).t }
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }
}

impl<H: TaskHandler> Drop for TimeoutTask<'_, H> {
    fn drop(&mut self) {
        // SAFETY: taskqueue_drain_timeout stops the timer and waits until the task is neither
        // queued nor running; then its memory may be freed. Sleeps (owner's context).
        unsafe { bindings::taskqueue_drain_timeout(self.queue.raw(), self.raw.get()) };
    }
}

unsafe extern "C" fn timeout_trampoline<H: TaskHandler>(context: *mut c_void, pending: c_int) {
    // SAFETY: `context` is the TimeoutTask registered in timeout_task; alive until drained.
    let task = unsafe { &*context.cast::<TimeoutTask<'_, H>>() };
    task.handler.run(u32::try_from(pending).unwrap_or(0));
}
