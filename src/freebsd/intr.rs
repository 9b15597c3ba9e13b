//! Interrupts: an IRQ resource (INTx or one MSI-X vector) and an ithread handler on it.
//!
//! Ordering rule, enforced by ownership: an [`Interrupt`] owns its [`IrqResource`] and its
//! handler context. Dropping it first calls `bus_teardown_intr(9)`, which returns only once the
//! handler is not running and will not run again; then the context is freed and the IRQ
//! released. The handler runs in an interrupt thread: it may take an MTX_DEF [`Mutex`], never
//! sleep.
//!
//! [`Mutex`]: super::mutex::Mutex

use super::bindings;
use super::device::Device;
use alloc::boxed::Box;
use core::ffi::{c_int, c_void};
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

/// An active `SYS_RES_IRQ` resource, released when dropped.
pub struct IrqResource {
    dev: Device,
    rid: c_int,
    res: NonNull<bindings::resource>,
}

// SAFETY: the resource handle is used only for bus_* calls, which are thread-safe.
unsafe impl Send for IrqResource {}
// SAFETY: as above.
unsafe impl Sync for IrqResource {}

impl IrqResource {
    /// rid 0: the legacy INTx line (shareable). rid 1..=n: MSI/MSI-X vectors after
    /// [`Device::alloc_msix`].
    pub fn alloc(dev: Device, rid: c_int) -> Option<Self> {
        let mut rid_io = rid;
        let mut flags = bindings::RF_ACTIVE as u32;
        if rid == 0 {
            flags |= bindings::RF_SHAREABLE as u32;
        }
        // SAFETY: bus_alloc_resource_any() spelled out; `rid_io` is a valid in/out int.
        let res = unsafe {
            bindings::bus_alloc_resource(dev.as_raw(), bindings::SYS_RES_IRQ, &mut rid_io, 0, !0, 1, flags)
        };
        NonNull::new(res).map(|res| IrqResource { dev, rid: rid_io, res })
    }

    /// The resource ID.
    pub fn rid(&self) -> c_int {
        self.rid
    }
}

impl Drop for IrqResource {
    fn drop(&mut self) {
        // SAFETY: allocated for `dev`, released once; no handler is set up on it any more
        // (Interrupt tears down before it drops the resource).
        let err = unsafe { bindings::bus_release_resource(self.dev.as_raw(), self.res.as_ptr()) };
        if err != 0 {
            crate::dev_printf!(&self.dev, "bus_release_resource(irq rid {}) failed: {}\n", self.rid, err);
        }
    }
}

/// What runs when the interrupt fires (in an interrupt thread).
pub trait InterruptHandler: Sync + Send {
    /// Handle the interrupt: typically lock the controller and poll its completion queues.
    fn handle(&self);
}

/// An interrupt handler set up on an IRQ; torn down when dropped (see module docs).
pub struct Interrupt<H: InterruptHandler> {
    dev: Device,
    cookie: *mut c_void,
    /// Freed only after bus_teardown_intr succeeded; leaked otherwise.
    context: ManuallyDrop<Box<H>>,
    irq: ManuallyDrop<IrqResource>,
}

// SAFETY: the cookie is only passed back to bus_teardown_intr; H is Send + Sync.
unsafe impl<H: InterruptHandler> Send for Interrupt<H> {}
// SAFETY: &Interrupt exposes only &H.
unsafe impl<H: InterruptHandler> Sync for Interrupt<H> {}

impl<H: InterruptHandler> Interrupt<H> {
    /// `bus_setup_intr(9)` with an ithread handler (no filter), `INTR_TYPE_BIO | INTR_MPSAFE`.
    /// On failure the IRQ and the handler are given back with the error.
    pub fn setup(irq: IrqResource, handler: Box<H>) -> Result<Self, (c_int, IrqResource, Box<H>)> {
        let dev = irq.dev;
        let mut cookie: *mut c_void = core::ptr::null_mut();
        let ctx = (&raw const *handler).cast_mut().cast::<c_void>();
        // SAFETY: the IRQ is active and ours; the context is the boxed handler, which lives
        // until after bus_teardown_intr (Drop); the trampoline matches driver_intr_t.
        let err = unsafe {
            bindings::bus_setup_intr(
                dev.as_raw(),
                irq.res.as_ptr(),
                (bindings::INTR_TYPE_BIO | bindings::INTR_MPSAFE) as c_int,
                None,
                Some(intr_trampoline::<H>),
                ctx,
                &mut cookie,
            )
        };
        if err != 0 {
            return Err((err, irq, handler));
        }
        Ok(Interrupt { dev, cookie, context: ManuallyDrop::new(handler), irq: ManuallyDrop::new(irq) })
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.context
    }
}

impl<H: InterruptHandler> Interrupt<H> {
    /// `bus_teardown_intr(9)`, then frees the context and releases the IRQ. `Err(errno)` when
    /// the teardown failed: the handler may still run, so its context and the IRQ are kept
    /// for ever, and so must be everything the handler reaches (the caller's business: with
    /// plain `drop` that is easy to forget, hence this method).
    pub fn teardown(self) -> Result<(), c_int> {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the teardown runs exactly once, here.
        unsafe { this.teardown_once() }
    }

    /// # Safety
    /// At most once per Interrupt (Drop and `teardown` each call it once and never both).
    unsafe fn teardown_once(&mut self) -> Result<(), c_int> {
        // SAFETY: the cookie came from bus_setup_intr on this IRQ; teardown waits for a running
        // handler to return and guarantees no new invocation.
        let err = unsafe { bindings::bus_teardown_intr(self.dev.as_raw(), self.irq.res.as_ptr(), self.cookie) };
        if err != 0 {
            // The handler may still be live: keep its context and the IRQ forever.
            crate::dev_printf!(&self.dev, "bus_teardown_intr failed: {}; leaking the handler\n", err);
            return Err(err);
        }
        // SAFETY: the handler can no longer run; context and IRQ are dropped exactly once (the
        // caller's contract).
        unsafe {
            ManuallyDrop::drop(&mut self.context);
            ManuallyDrop::drop(&mut self.irq);
        }
        Ok(())
    }
}

impl<H: InterruptHandler> Drop for Interrupt<H> {
    fn drop(&mut self) {
        // SAFETY: Drop runs once, and only for an Interrupt that `teardown` did not consume.
        let _ = unsafe { self.teardown_once() };
    }
}

unsafe extern "C" fn intr_trampoline<H: InterruptHandler>(arg: *mut c_void) {
    // SAFETY: `arg` is the boxed handler registered in setup, alive until teardown returned.
    let handler = unsafe { &*arg.cast::<H>() };
    handler.handle();
}
