//! Kernel memory for Rust: the `#[global_allocator]` over `malloc(9)`, and the sleeping path.
//!
//! **The global allocator never sleeps** (`M_NOWAIT`). `Box::new`, `Vec::push` and friends can
//! therefore be used anywhere, including with an `mtx(9)` held or in a taskqueue callback, and
//! they can fail. An infallible allocation (`Box::new`, `Vec::push`, `vec!`, `collect`,
//! `format!`, `VecDeque::push_back`, `Arc::new`, ...) that fails ends in Rust's
//! allocation-error handler, i.e. `panic(9)`, so **the module contains none**: it uses
//! [`crate::fallible`] (`try_box`, `try_vec_with_capacity`, `try_push`, `try_collect`, ...)
//! and [`try_box_with`] and turns failure into `ENOMEM` with a message (attach), a skipped
//! slot or namespace, or a degraded mode (hotplug disabled). Structures filled at run time where
//! nothing may fail are sized once at attach or load and never grow. kocheck's
//! `no-alloc-error-handler` rule proves it on the built `.ko` (no `handle_alloc_error`, no
//! `__rust_alloc_error_handler`), and `kldhost/tests/nomem.rs` fails every `M_NOWAIT` malloc of
//! a whole attach/I/O/detach run, one at a time.
//!
//! **Sleeping allocations are explicit**: [`alloc_waitok`] and [`box_waitok`] use `M_WAITOK`,
//! cannot fail for a valid request, and may only be called where sleeping is allowed (attach,
//! detach, MOD_LOAD/MOD_UNLOAD, taskqueue threads) with no non-sleepable lock held. WITNESS
//! reports a violation on debug kernels.
//!
//! **Alignment**: `malloc(9)` returns memory aligned to at least 8 bytes for every size on amd64
//! (its smallest zone is 16 bytes), `malloc_aligned(9)` up to a page; a larger alignment cannot be
//! served from malloc(9) at all, so the allocator fails instead of returning misaligned memory.
//!
//! Everything is accounted to the module's own malloc type `M_NVMEHP` (`vmstat -m`), defined in
//! the C glue, so a leak is visible and kld unload with outstanding memory is diagnosable.

use super::bindings;
use alloc::boxed::Box;
use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_int, c_void};
use core::ptr::NonNull;

/// Alignment `malloc(9)` guarantees without asking.
const MALLOC_MIN_ALIGN: usize = 8;
/// Largest alignment `malloc_aligned(9)` accepts.
const MAX_ALIGN: usize = bindings::PAGE_SIZE as usize;

/// The `struct malloc_type *` of this module.
pub fn malloc_type() -> *mut bindings::malloc_type {
    // Only the address of the extern static is taken (no access, so no `unsafe`); M_NVMEHP is
    // defined by MALLOC_DEFINE in the glue and lives as long as the module.
    (&raw mut bindings::M_NVMEHP).cast()
}

/// malloc(9) for `layout` with `flags`; NULL on failure or impossible alignment.
fn kmalloc(layout: Layout, flags: c_int) -> *mut u8 {
    let size = layout.size();
    let align = layout.align();
    if align <= MALLOC_MIN_ALIGN {
        // SAFETY: plain malloc(9); the size is non-zero (callers) and the type is ours.
        unsafe { bindings::malloc(size, malloc_type(), flags).cast() }
    } else if align <= MAX_ALIGN {
        // SAFETY: `align` is a power of two (Layout invariant) no larger than a page, which is
        // what malloc_aligned(9) asserts.
        unsafe { bindings::malloc_aligned(size, align, malloc_type(), flags).cast() }
    } else {
        core::ptr::null_mut()
    }
}

/// The global allocator: `malloc(9)`/`free(9)` with `M_NOWAIT`. See the module documentation.
pub struct KernelAllocator;

// SAFETY: kmalloc returns either NULL or a fresh block of at least `layout.size()` bytes aligned
// to `layout.align()`; dealloc hands back to free(9) exactly the blocks malloc(9)/malloc_aligned(9)
// returned, with the same malloc type. malloc(9) is thread-safe.
unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        kmalloc(layout, bindings::M_NOWAIT)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        kmalloc(layout, bindings::M_NOWAIT | bindings::M_ZERO)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: per the GlobalAlloc contract `ptr` came from this allocator (or from
        // box_waitok, which uses the same malloc(9) type) and is freed once.
        unsafe { bindings::free(ptr.cast::<c_void>(), malloc_type()) }
    }
}

// Only in the kernel build (kmod/x86_64-freebsd-kld.json has os "none"); host builds of this
// module (its unit tests, clippy) use std's allocator.
#[cfg(target_os = "none")]
#[global_allocator]
static ALLOCATOR: KernelAllocator = KernelAllocator;

/// Builds the value `make` returns directly in fresh kernel memory, without sleeping; `None`
/// (and `make` not called) when memory is short.
///
/// Room first, value second: a value whose `Drop` undoes a kernel initialisation (a task's
/// drain, a callout's drain, a mutex's destroy) must never be dropped by a failed allocation
/// before that initialisation happened, which `try_box(Value { .. })` would do.
pub fn try_box_with<T>(make: impl FnOnce() -> T) -> Option<Box<T>> {
    let mut room = crate::fallible::try_box_uninit::<T>().ok()?;
    room.write(make());
    // SAFETY: initialised just above.
    Some(unsafe { room.assume_init() })
}

/// Allocates `layout` with `M_WAITOK`: sleeps until memory is available instead of failing.
///
/// Only from a sleepable context with no mutex held: attach/detach, module load/unload,
/// taskqueue threads. `None` only for requests malloc(9) can never satisfy (zero size,
/// alignment above a page). Free the block through the global allocator
/// (`alloc::alloc::dealloc`) or by handing it to a `Box` of the same layout.
pub fn alloc_waitok(layout: Layout) -> Option<NonNull<u8>> {
    if layout.size() == 0 || layout.align() > MAX_ALIGN {
        return None;
    }
    let p = kmalloc(layout, bindings::M_WAITOK);
    // M_WAITOK never returns NULL for a valid request; if the kernel ever did, that is a bug
    // worth a panic(9) rather than a NULL dereference later.
    assert!(!p.is_null(), "malloc(M_WAITOK) returned NULL");
    NonNull::new(p)
}

/// Moves `value` into kernel memory, sleeping until memory is available (`M_WAITOK`).
///
/// Same context rules as [`alloc_waitok`]. Never fails. Types aligned above a page are
/// rejected at compile time.
pub fn box_waitok<T>(value: T) -> Box<T> {
    const { assert!(core::mem::align_of::<T>() <= MAX_ALIGN, "malloc(9) cannot align above a page") };
    let layout = Layout::new::<T>();
    // Zero-sized (the only `None` left after the assertion above): a dangling, aligned pointer
    // is its Box, which never frees it.
    let p = alloc_waitok(layout).map_or(NonNull::<T>::dangling().as_ptr(), |p| p.as_ptr().cast::<T>());
    // SAFETY: `p` is a fresh, suitably aligned block of `size_of::<T>()` bytes from the global
    // allocator's own malloc type (or dangling for a zero-sized T), so Box may own it and free it
    // through KernelAllocator.
    unsafe {
        p.write(value);
        Box::from_raw(p)
    }
}
