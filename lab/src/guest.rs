//! The guest as the harness sees it: one qtest connection, the guest-RAM allocator, and the first
//! harness fault. Shared (`Rc`) by the machine, the firmware code and every controller's
//! platform: the lab is single-threaded, so `RefCell` is enough, and no borrow is ever held
//! across a call into the engine.
//!
//! Why faults are recorded instead of returned: the platform traits are infallible (a kernel's
//! bus_space read cannot fail either). If QEMU itself dies or the qtest socket breaks, reads
//! return 0 — which looks like a vanished device, the engine's problem to handle — and the
//! runner reports the recorded fault as a harness failure rather than blaming the engine.

use std::cell::{Cell, RefCell};

use crate::dma::GuestRam;
use crate::qtest::{Qtest, QtestError};

/// Shared guest state.
pub struct Guest {
    qtest: RefCell<Qtest>,
    ram: RefCell<GuestRam>,
    fault: RefCell<Option<String>>,
    /// Fault injection: register reads left before one of them panics (inside the engine).
    panic_in: Cell<Option<u64>>,
}

impl Guest {
    /// Wraps a connected qtest session and the RAM pool the DMA allocator may use.
    pub fn new(qtest: Qtest, ram: GuestRam) -> Self {
        Guest { qtest: RefCell::new(qtest), ram: RefCell::new(ram), fault: RefCell::new(None), panic_in: Cell::new(None) }
    }

    /// Runs `f` with the qtest connection, returning its result (harness code that wants errors).
    pub fn qtest<T>(&self, f: impl FnOnce(&mut Qtest) -> Result<T, QtestError>) -> Result<T, QtestError> {
        let r = f(&mut self.qtest.borrow_mut());
        if let Err(e) = &r {
            self.record_fault(e.to_string());
        }
        r
    }

    /// Runs `f` for the platform traits: on error records the fault and returns `default`.
    pub fn qtest_or<T>(&self, default: T, f: impl FnOnce(&mut Qtest) -> Result<T, QtestError>) -> T {
        self.qtest(f).unwrap_or(default)
    }

    /// The allocator.
    pub fn ram(&self) -> std::cell::RefMut<'_, GuestRam> {
        self.ram.borrow_mut()
    }

    /// Bytes of DMA memory currently allocated.
    pub fn live_dma_bytes(&self) -> u64 {
        self.ram.borrow().live_bytes()
    }

    /// Records a harness fault (the first one wins).
    pub fn record_fault(&self, msg: String) {
        let mut f = self.fault.borrow_mut();
        if f.is_none() {
            *f = Some(msg);
        }
    }

    /// The first harness fault, if any.
    pub fn fault(&self) -> Option<String> {
        self.fault.borrow().clone()
    }

    /// Fault injection for tests of the lab itself: the `n`-th register read from now panics,
    /// as an engine bug would, inside whatever engine call made it. Fires once.
    pub fn inject_register_read_panic(&self, n: u64) {
        self.panic_in.set(Some(n));
    }

    /// Called by the platform on every register read; panics when the injected fault is due.
    pub fn register_read_hook(&self) {
        if let Some(left) = self.panic_in.get() {
            if left <= 1 {
                self.panic_in.set(None);
                panic!("injected fault: register read panicked");
            }
            self.panic_in.set(Some(left - 1));
        }
    }

    /// qtest commands sent so far.
    pub fn qtest_commands(&self) -> u64 {
        self.qtest.borrow().commands()
    }
}
