//! The guest as the harness sees it: one qtest connection, the guest-RAM allocator, and the first
//! harness fault. Shared (`Rc`) by the machine, the firmware code and every controller's
//! platform: the lab is single-threaded, so `RefCell` is enough, and no borrow is ever held
//! across a call into the engine.
//!
//! Why faults are recorded instead of returned: the platform traits are infallible (a kernel's
//! bus_space read cannot fail either). If QEMU itself dies or the qtest socket breaks, reads
//! return 0 — which looks like a vanished device, the engine's problem to handle — and the
//! runner reports the recorded fault as a harness failure rather than blaming the engine.
//!
//! Guest RAM is reached one of two ways ([`RamAccess`]): qtest commands, or the RAM file
//! mapped in the lab ([`SharedRam`]). The `ram_*` methods hide which; a refused direct access
//! (outside RAM) is recorded like a broken qtest socket, and reads then return zeros. A 32/64-bit
//! access at an address that is not a multiple of its size (the engine makes none) is copied
//! byte by byte instead of atomically, as a misaligned access would not be one bus cycle either.

use std::cell::{Cell, RefCell};

use crate::dma::GuestRam;
use crate::qtest::{Qtest, QtestError};
use crate::shared_ram::{RamAccess, RamError, SharedRam};

/// Shared guest state.
pub struct Guest {
    qtest: RefCell<Qtest>,
    ram: RefCell<GuestRam>,
    /// The lab's mapping of guest RAM, when QEMU's RAM is the shared file.
    shared: Option<SharedRam>,
    fault: RefCell<Option<String>>,
    /// Fault injection: register reads left before one of them panics (inside the engine).
    panic_in: Cell<Option<u64>>,
}

impl Guest {
    /// Wraps a connected qtest session and the RAM pool the DMA allocator may use; guest RAM
    /// is reached through qtest.
    pub fn new(qtest: Qtest, ram: GuestRam) -> Self {
        Guest {
            qtest: RefCell::new(qtest),
            ram: RefCell::new(ram),
            shared: None,
            fault: RefCell::new(None),
            panic_in: Cell::new(None),
        }
    }

    /// Like [`Guest::new`], with guest RAM reached through `shared`, the mapping of the file
    /// QEMU runs the machine on.
    pub fn with_shared_ram(qtest: Qtest, ram: GuestRam, shared: SharedRam) -> Self {
        Guest { shared: Some(shared), ..Guest::new(qtest, ram) }
    }

    /// How guest RAM is reached.
    pub fn ram_access(&self) -> RamAccess {
        if self.shared.is_some() {
            RamAccess::Shared
        } else {
            RamAccess::Qtest
        }
    }

    /// The lab's mapping of guest RAM (`None` when RAM is reached through qtest).
    pub fn shared_ram(&self) -> Option<&SharedRam> {
        self.shared.as_ref()
    }

    fn shared_or<T>(&self, default: T, r: Result<T, RamError>) -> T {
        r.unwrap_or_else(|e| {
            self.record_fault(e.to_string());
            default
        })
    }

    /// Copies guest RAM at `gpa` into `buf` (zeros on a fault, which is recorded).
    pub fn ram_read(&self, gpa: u64, buf: &mut [u8]) {
        let ok = match &self.shared {
            Some(s) => self.shared_or(false, s.read(gpa, buf).map(|()| true)),
            None => self.qtest(|q| q.read(gpa, buf)).is_ok(),
        };
        if !ok {
            buf.fill(0);
        }
    }

    /// Copies `data` into guest RAM at `gpa`.
    pub fn ram_write(&self, gpa: u64, data: &[u8]) {
        match &self.shared {
            Some(s) => self.shared_or((), s.write(gpa, data)),
            None => self.qtest_or((), |q| q.write(gpa, data)),
        }
    }

    /// Sets `len` bytes of guest RAM at `gpa` to `byte`.
    pub fn ram_fill(&self, gpa: u64, len: usize, byte: u8) {
        match &self.shared {
            Some(s) => self.shared_or((), s.fill(gpa, len, byte)),
            None => self.qtest_or((), |q| q.memset(gpa, len, byte)),
        }
    }

    /// Reads the u32 at `gpa` (an acquire load when shared and aligned; 0 on a fault).
    pub fn ram_read_u32(&self, gpa: u64) -> u32 {
        match &self.shared {
            Some(_) if !gpa.is_multiple_of(4) => {
                let mut b = [0u8; 4];
                self.ram_read(gpa, &mut b);
                u32::from_le_bytes(b)
            }
            Some(s) => self.shared_or(0, s.load_u32(gpa)),
            None => self.qtest_or(0, |q| q.readl(gpa)),
        }
    }

    /// Writes the u32 at `gpa`.
    pub fn ram_write_u32(&self, gpa: u64, v: u32) {
        match &self.shared {
            Some(_) if !gpa.is_multiple_of(4) => self.ram_write(gpa, &v.to_le_bytes()),
            Some(s) => self.shared_or((), s.store_u32(gpa, v)),
            None => self.qtest_or((), |q| q.writel(gpa, v)),
        }
    }

    /// Reads the u64 at `gpa` (an acquire load when shared and aligned; 0 on a fault).
    pub fn ram_read_u64(&self, gpa: u64) -> u64 {
        match &self.shared {
            Some(_) if !gpa.is_multiple_of(8) => {
                let mut b = [0u8; 8];
                self.ram_read(gpa, &mut b);
                u64::from_le_bytes(b)
            }
            Some(s) => self.shared_or(0, s.load_u64(gpa)),
            None => self.qtest_or(0, |q| q.readq(gpa)),
        }
    }

    /// Writes the u64 at `gpa`.
    pub fn ram_write_u64(&self, gpa: u64, v: u64) {
        match &self.shared {
            Some(_) if !gpa.is_multiple_of(8) => self.ram_write(gpa, &v.to_le_bytes()),
            Some(s) => self.shared_or((), s.store_u64(gpa, v)),
            None => self.qtest_or((), |q| q.writeq(gpa, v)),
        }
    }

    /// Reads the u32 at `gpa` and clears it. Shared: one atomic swap, so a device write in
    /// between cannot be lost. qtest: a read then a write (two commands; a write landing in
    /// between is lost, which callers must tolerate, see [`crate::interrupts`]).
    pub fn ram_take_u32(&self, gpa: u64) -> Result<u32, String> {
        match &self.shared {
            Some(s) => s.swap_u32(gpa, 0).map_err(|e| {
                self.record_fault(e.to_string());
                e.to_string()
            }),
            None => self
                .qtest(|q| {
                    let v = q.readl(gpa)?;
                    if v != 0 {
                        q.writel(gpa, 0)?;
                    }
                    Ok(v)
                })
                .map_err(|e| e.to_string()),
        }
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
