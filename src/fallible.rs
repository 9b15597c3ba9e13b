//! Allocation that reports failure instead of aborting.
//!
//! In the kernel the global allocator is `malloc(9)` with `M_NOWAIT` (`freebsd::alloc`), so any
//! allocation can fail, and the infallible `alloc` APIs (`Box::new`, `Vec::push`, `vec!`,
//! `collect`, `format!`, `VecDeque::push_back`, ...) turn a failure into Rust's
//! allocation-error handler, which in a kld is `panic(9)`. Code that runs in the kernel uses
//! these helpers instead and turns [`AllocError`] into `ENOMEM` (or a degraded mode) at the
//! caller. The shipped `.ko` is checked for it: kocheck's `no-alloc-error-handler` rule fails
//! when the module still contains the allocation-error path.
//!
//! Pushing goes through the spare capacity rather than `Vec::push`, because `push` keeps its
//! growth path (and with it the error handler) in the binary even where the capacity was
//! reserved just before.

use alloc::boxed::Box;
use alloc::collections::TryReserveError;
use alloc::vec::Vec;
use core::alloc::Layout;

/// Memory was short: nothing was allocated and the caller's data is as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError;

impl From<TryReserveError> for AllocError {
    fn from(_: TryReserveError) -> Self {
        AllocError
    }
}

impl core::fmt::Display for AllocError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("out of memory")
    }
}

/// Moves `value` to the heap, or gives it back dropped with `AllocError` when memory is short.
pub fn try_box<T>(value: T) -> Result<Box<T>, AllocError> {
    let mut b = try_box_uninit::<T>()?;
    b.write(value);
    // SAFETY: the value was written just above.
    Ok(unsafe { b.assume_init() })
}

/// Heap room for a `T`, not yet initialised: for a value that must be built at its final
/// address (a mutex whose lock word may not move).
pub fn try_box_uninit<T>() -> Result<Box<core::mem::MaybeUninit<T>>, AllocError> {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        // SAFETY: a dangling, aligned pointer is a valid Box of a zero-sized type; Box never
        // frees it.
        return Ok(unsafe { Box::from_raw(core::ptr::NonNull::<core::mem::MaybeUninit<T>>::dangling().as_ptr()) });
    }
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc::alloc::alloc(layout) }.cast::<core::mem::MaybeUninit<T>>();
    if p.is_null() {
        return Err(AllocError);
    }
    // SAFETY: `p` is a fresh block of the global allocator with `T`'s layout, which is what
    // Box frees; `MaybeUninit` needs no initialisation.
    Ok(unsafe { Box::from_raw(p) })
}

/// An empty vector with room for exactly `n` elements.
pub fn try_vec_with_capacity<T>(n: usize) -> Result<Vec<T>, AllocError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    Ok(v)
}

/// `vec![value; n]` that fails instead of aborting.
pub fn try_vec_filled<T: Clone>(value: T, n: usize) -> Result<Vec<T>, AllocError> {
    let mut v = try_vec_with_capacity(n)?;
    for _ in 0..n {
        push_within_capacity(&mut v, value.clone()).map_err(|_| AllocError)?;
    }
    Ok(v)
}

/// Appends `value` if the vector has room left, without ever growing it; gives `value` back
/// otherwise. For vectors sized once (at attach) and used where allocating is not allowed.
pub fn push_within_capacity<T>(v: &mut Vec<T>, value: T) -> Result<(), T> {
    let len = v.len();
    match v.spare_capacity_mut().first_mut() {
        Some(slot) => {
            slot.write(value);
            // SAFETY: the element at `len` (the first spare slot) was initialised just above
            // and `len + 1 <= capacity`.
            unsafe { v.set_len(len + 1) };
            Ok(())
        }
        None => Err(value),
    }
}

/// `Vec::push` that fails instead of aborting (`value` is dropped on failure).
pub fn try_push<T>(v: &mut Vec<T>, value: T) -> Result<(), AllocError> {
    if v.len() == v.capacity() {
        v.try_reserve(1)?;
    }
    push_within_capacity(v, value).map_err(|_| AllocError)
}

/// `Vec::extend_from_slice` that fails instead of aborting (nothing appended on failure).
pub fn try_extend_from_slice<T: Clone>(v: &mut Vec<T>, items: &[T]) -> Result<(), AllocError> {
    v.try_reserve(items.len())?;
    for x in items {
        push_within_capacity(v, x.clone()).map_err(|_| AllocError)?;
    }
    Ok(())
}

/// `iter.collect::<Vec<_>>()` that fails instead of aborting.
pub fn try_collect<T, I: IntoIterator<Item = T>>(iter: I) -> Result<Vec<T>, AllocError> {
    let iter = iter.into_iter();
    let mut v = try_vec_with_capacity(iter.size_hint().0)?;
    for x in iter {
        try_push(&mut v, x)?;
    }
    Ok(v)
}


/// A double-ended queue of fixed capacity, sized once where allocating is allowed (bring-up)
/// and never grown: a push into a full ring gives the value back instead of allocating, so
/// code that must not fail (an interrupt's completion path) decides what to drop and counts it.
#[derive(Debug)]
pub struct Ring<T> {
    buf: Vec<Option<T>>,
    head: usize,
    len: usize,
}

impl<T> Default for Ring<T> {
    fn default() -> Self {
        Ring::new()
    }
}

impl<T> Ring<T> {
    /// A ring with no room (allocates nothing).
    pub const fn new() -> Self {
        Ring { buf: Vec::new(), head: 0, len: 0 }
    }

    /// A ring with room for `n` values.
    pub fn with_capacity(n: usize) -> Result<Self, AllocError> {
        let mut buf = try_vec_with_capacity(n)?;
        for _ in 0..n {
            let _ = push_within_capacity(&mut buf, None);
        }
        Ok(Ring { buf, head: 0, len: 0 })
    }

    /// How many values it can hold.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `x`, or gives it back when the ring is full.
    pub fn push_back(&mut self, x: T) -> Result<(), T> {
        let cap = self.buf.len();
        if self.len == cap {
            return Err(x);
        }
        let i = (self.head + self.len) % cap;
        self.buf[i] = Some(x);
        self.len += 1;
        Ok(())
    }

    /// Puts `x` first, or gives it back when the ring is full.
    pub fn push_front(&mut self, x: T) -> Result<(), T> {
        let cap = self.buf.len();
        if self.len == cap {
            return Err(x);
        }
        self.head = (self.head + cap - 1) % cap;
        self.buf[self.head] = Some(x);
        self.len += 1;
        Ok(())
    }

    /// Takes the first value.
    pub fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let x = self.buf[self.head].take();
        self.head = (self.head + 1) % self.buf.len();
        self.len -= 1;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_behave_as_their_infallible_twins() {
        let mut v = try_vec_with_capacity::<u32>(2).unwrap();
        assert_eq!(v.capacity(), 2);
        push_within_capacity(&mut v, 1).unwrap();
        push_within_capacity(&mut v, 2).unwrap();
        assert_eq!(push_within_capacity(&mut v, 3), Err(3));
        try_push(&mut v, 3).unwrap();
        try_extend_from_slice(&mut v, &[4, 5]).unwrap();
        assert_eq!(v, [1, 2, 3, 4, 5]);
        assert_eq!(try_vec_filled(7u8, 3).unwrap(), [7, 7, 7]);
        assert_eq!(try_collect((0..4).rev()).unwrap(), [3, 2, 1, 0]);
        assert_eq!(*try_box(5u64).unwrap(), 5);
        let _zst: Box<()> = try_box(()).unwrap();
    }

    #[test]
    fn a_full_ring_gives_the_value_back_and_keeps_its_order() {
        let mut r = Ring::with_capacity(3).unwrap();
        assert_eq!(Ring::<u8>::new().push_back(1), Err(1));
        r.push_back(2).unwrap();
        r.push_back(3).unwrap();
        r.push_front(1).unwrap();
        assert_eq!(r.push_back(4), Err(4));
        assert_eq!(r.push_front(0), Err(0));
        assert_eq!((r.pop_front(), r.len()), (Some(1), 2));
        r.push_back(4).unwrap();
        assert_eq!([r.pop_front(), r.pop_front(), r.pop_front(), r.pop_front()], [Some(2), Some(3), Some(4), None]);
        assert!(r.is_empty());
    }

    #[test]
    fn an_impossible_request_is_an_error_not_an_abort() {
        assert_eq!(try_vec_with_capacity::<u64>(usize::MAX / 4).unwrap_err(), AllocError);
        let mut v: Vec<u8> = Vec::new();
        assert!(try_extend_from_slice(&mut v, &[1]).is_ok());
    }
}
