//! `mtx(9)` (MTX_DEF) owning the data it protects.
//!
//! Why mtx(9) and not a spin lock: an MTX_DEF mutex is adaptive (spins while the owner runs,
//! then blocks on a turnstile with priority propagation), may be taken from interrupt threads,
//! and is known to WITNESS. A busy-wait lock the scheduler cannot see is wrong for any data an
//! interrupt thread also touches. MTX_DEF must not be taken in an interrupt *filter*.
//!
//! The lock word must not move once initialised (WITNESS and the turnstile code key on its
//! address), so a [`Mutex`] only exists pinned in kernel memory: [`Mutex::new_boxed`].
//! Holding it, do not sleep: no `M_WAITOK`, no `box_waitok`, no `taskqueue_drain`.

use super::alloc::box_waitok;
use crate::fallible::try_box_uninit;
use super::bindings;
use alloc::boxed::Box;
use core::cell::UnsafeCell;
use core::ffi::CStr;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::pin::Pin;

/// A kernel mutex protecting a `T`.
pub struct Mutex<T> {
    mtx: UnsafeCell<bindings::mtx>,
    data: UnsafeCell<T>,
}

// SAFETY: the mutex hands out access to `T` to one thread at a time, so it may be shared and
// sent between threads exactly when `T` may be sent.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Mutex<T> {}

impl<T> Mutex<T> {
    /// Allocates (without sleeping) and initialises a mutex named `name` (as shown by WITNESS
    /// and `procstat -k`). `None` when memory is short.
    pub fn new_boxed(name: &'static CStr, data: T) -> Option<Pin<Box<Self>>> {
        // Room first, then the mutex in it: a `Mutex` built on the stack and then dropped by a
        // failed allocation would mtx_destroy a lock word that was never initialised.
        let mut room = try_box_uninit::<Self>().ok()?;
        room.write(Mutex { mtx: UnsafeCell::new(bindings::mtx::default()), data: UnsafeCell::new(data) });
        // SAFETY: written just above.
        let boxed = unsafe { room.assume_init() };
        // SAFETY: the lock word is zeroed, not yet initialised, at its final address (the box is
        // pinned right after and never moved); the name is 'static as mtx_init requires.
        unsafe { bindings::nvmehp_mtx_init(boxed.mtx.get(), name.as_ptr()) };
        Some(Box::into_pin(boxed))
    }

    /// As [`Mutex::new_boxed`], but sleeps until memory is available (`M_WAITOK`), so it never
    /// fails: for a sleepable caller holding no mutex (attach) that cannot afford to lose
    /// `data` to a failed allocation.
    pub fn new_boxed_waitok(name: &'static CStr, data: T) -> Pin<Box<Self>> {
        let boxed = box_waitok(Mutex {
            mtx: UnsafeCell::new(bindings::mtx::default()),
            data: UnsafeCell::new(data),
        });
        // SAFETY: as in new_boxed: zeroed lock word at its final address, 'static name.
        unsafe { bindings::nvmehp_mtx_init(boxed.mtx.get(), name.as_ptr()) };
        Box::into_pin(boxed)
    }

    /// The lock object, for KPIs that take a lock by reference (callout_init_mtx).
    pub(crate) fn lock_object(&self) -> *mut bindings::lock_object {
        // SAFETY: only the address of a field is computed; the mutex lives at this address.
        unsafe { &raw mut (*self.mtx.get()).lock_object }
    }

    /// The data, for code the kernel calls with this mutex already held (a callout bound with
    /// callout_init_mtx).
    ///
    /// # Safety
    /// The calling thread must hold the mutex, and no other reference to the data may exist
    /// for the lifetime of the returned one.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn data_while_held(&self) -> &mut T {
        // SAFETY: per this function's contract.
        unsafe { &mut *self.data.get() }
    }

    /// Blocks until the mutex is ours; unlocked when the guard is dropped.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        // SAFETY: the mutex was initialised in new_boxed and is destroyed only in Drop, which
        // cannot run while `self` is borrowed.
        unsafe { bindings::nvmehp_mtx_lock(self.mtx.get()) };
        MutexGuard { mutex: self, _not_send: PhantomData }
    }
}

impl<T> Drop for Mutex<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self` proves nobody holds or waits for the lock; it was initialised.
        unsafe { bindings::nvmehp_mtx_destroy(self.mtx.get()) };
    }
}

/// Proof that the mutex is held. Not `Send`: mtx(9) must be released by its owner thread.
pub struct MutexGuard<'a, T> {
    mutex: &'a Mutex<T>,
    _not_send: PhantomData<*const ()>,
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock is held for the guard's lifetime, so no other reference exists.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref; `&mut self` makes this the only access through the guard.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this thread locked it in Mutex::lock and still holds it.
        unsafe { bindings::nvmehp_mtx_unlock(self.mutex.mtx.get()) };
    }
}
