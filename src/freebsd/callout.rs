//! `callout(9)` timers bound to a [`Mutex`]: the handler runs with the mutex held.
//!
//! Why bound to the mutex (`callout_init_mtx`): the callout subsystem then takes the lock
//! before calling the handler and `callout_stop` under the lock is final (a handler that lost
//! the race is not called), so there is no window in which a stopped timer still fires.
//! Ordering rules, enforced by types:
//! - a [`Callout`] borrows its [`Mutex`], so the mutex outlives it;
//! - `reset`/`stop` require the [`MutexGuard`] (callout(9) asserts the lock is held);
//! - dropping a `Callout` calls `callout_drain(9)`, which sleeps until the handler is not
//!   running: drop it without the mutex held, from a sleepable context.

use super::alloc::try_box_with;
use super::bindings;
use super::clock::us_to_sbt;
use super::mutex::{Mutex, MutexGuard};
use alloc::boxed::Box;
use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::marker::PhantomPinned;
use core::pin::Pin;

/// What a callout does when it fires. Runs in the callout thread (softclock) with the
/// mutex held; must not sleep, and should be short (it holds up every other callout).
pub trait CalloutHandler<T>: Sync + Send {
    /// `data` is the mutex's data, already locked for the call. Returning `Some(us)` re-arms
    /// the timer to fire again `us` from now (a periodic timer); a handler that may be drained
    /// must stop returning `Some` once a flag in `data` says so.
    fn fire(&self, data: &mut T) -> Option<u64>;
}

/// A callout bound to `mutex`.
pub struct Callout<'m, T, H: CalloutHandler<T>> {
    raw: UnsafeCell<bindings::callout>,
    mutex: &'m Mutex<T>,
    handler: H,
    _pinned: PhantomPinned,
}

// SAFETY: the kernel touches `raw` under the callout lock and the mutex; the handler is Sync.
unsafe impl<T: Send, H: CalloutHandler<T>> Sync for Callout<'_, T, H> {}
// SAFETY: as above.
unsafe impl<T: Send, H: CalloutHandler<T>> Send for Callout<'_, T, H> {}

impl<'m, T, H: CalloutHandler<T>> Callout<'m, T, H> {
    /// Allocates (without sleeping) and initialises a callout bound to `mutex`.
    pub fn new(mutex: &'m Mutex<T>, handler: H) -> Option<Pin<Box<Self>>> {
        let c = try_box_with(|| Callout {
            raw: UnsafeCell::new(bindings::callout::default()),
            mutex,
            handler,
            _pinned: PhantomPinned,
        })?;
        // SAFETY: initialises the zeroed callout at its final (boxed, then pinned) address with
        // the mutex's lock object, which outlives it (borrow).
        unsafe { bindings::_callout_init_lock(c.raw.get(), mutex.lock_object(), 0) };
        Some(Box::into_pin(c))
    }

    /// (Re)arms the timer to fire once, `delay_us` from now. Requires the mutex held.
    pub fn reset(self: Pin<&Self>, _held: &MutexGuard<'_, T>, delay_us: u64) {
        let this = self.get_ref();
        // SAFETY: initialised callout, mutex held (guard); the context is this pinned Callout,
        // which is drained before it is freed.
        unsafe {
            bindings::callout_reset_sbt_on(
                this.raw.get(),
                us_to_sbt(delay_us),
                0,
                Some(callout_trampoline::<T, H>),
                (&raw const *this).cast_mut().cast::<c_void>(),
                -1,
                0,
            )
        };
    }

    /// Cancels a pending timer. With the mutex held this is final: the handler will not run
    /// for the cancelled arming.
    pub fn stop(self: Pin<&Self>, _held: &MutexGuard<'_, T>) {
        // SAFETY: initialised callout, mutex held.
        unsafe { bindings::_callout_stop_safe(self.get_ref().raw.get(), 0) };
    }
}

impl<T, H: CalloutHandler<T>> Callout<'_, T, H> {
    /// `callout_drain(9)`: stops a pending timer and waits until a running handler returned.
    /// Sleeps: without the mutex held, from a sleepable context. A handler that re-arms must
    /// have been told to stop first (a flag in the mutex's data), or it may re-arm afterwards.
    pub fn drain(self: Pin<&Self>) {
        // SAFETY: initialised callout; CS_DRAIN waits for the handler (documented context).
        unsafe { bindings::_callout_stop_safe(self.get_ref().raw.get(), bindings::CS_DRAIN) };
    }
}

impl<T, H: CalloutHandler<T>> Drop for Callout<'_, T, H> {
    fn drop(&mut self) {
        // SAFETY: callout_drain: after it returns the callout is neither pending nor running,
        // so its memory may be freed. Sleeps; the owner drops it without the mutex held.
        unsafe { bindings::_callout_stop_safe(self.raw.get(), bindings::CS_DRAIN) };
    }
}

unsafe extern "C" fn callout_trampoline<T, H: CalloutHandler<T>>(arg: *mut c_void) {
    // SAFETY: `arg` is the pinned Callout registered in reset, alive until drained.
    let this = unsafe { &*arg.cast::<Callout<'_, T, H>>() };
    // SAFETY: the callout subsystem holds the mutex for this call (callout_init_mtx), so this
    // thread has exclusive access to the data, exactly as a MutexGuard would give.
    let data = unsafe { this.mutex.data_while_held() };
    if let Some(delay_us) = this.handler.fire(data) {
        // SAFETY: re-arming from the handler with the callout's mutex held, as callout(9)
        // allows; the context is this pinned Callout, which is drained before it is freed.
        unsafe {
            bindings::callout_reset_sbt_on(
                this.raw.get(),
                us_to_sbt(delay_us),
                0,
                Some(callout_trampoline::<T, H>),
                arg,
                -1,
                0,
            )
        };
    }
}
