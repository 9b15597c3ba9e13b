//! The engine's platform traits implemented over qtest: what `src/freebsd/` does with
//! bus_space(9), pci_read_config(9), DELAY(9) and contigmalloc(9), the lab does with qtest
//! MMIO to the firmware-programmed BAR0, config cycles through 0xcf8/0xcfc, the host's monotonic
//! clock and guest RAM.
//!
//! One [`LabPlatform`] per controller; all of them share the machine's [`Guest`].

use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nvme_hotplug::platform::{AllocError, Clock, DmaAllocator, PciPresence, RegisterIo};

use crate::access_faults::SlotFaults;
use crate::dma::GuestDma;
use crate::firmware::{self, Bdf};
use crate::guest::Guest;

/// A controller's view of the machine.
#[derive(Clone)]
pub struct LabPlatform {
    guest: Rc<Guest>,
    bdf: Bdf,
    bar0: u64,
    faults: Rc<SlotFaults>,
}

impl LabPlatform {
    /// The platform for the function at `bdf` whose BAR0 the firmware put at `bar0`; every
    /// device access goes through `faults` first (see [`crate::access_faults`]).
    pub fn new(guest: Rc<Guest>, bdf: Bdf, bar0: u64, faults: Rc<SlotFaults>) -> Self {
        LabPlatform { guest, bdf, bar0, faults }
    }

    /// The fault state of this controller (access count, injected removal).
    pub fn faults(&self) -> &Rc<SlotFaults> {
        &self.faults
    }

    /// The shared guest.
    pub fn guest(&self) -> &Rc<Guest> {
        &self.guest
    }

    /// Where the function is.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Where the firmware put BAR0 (the MSI-X table lives in it).
    pub fn bar0(&self) -> u64 {
        self.bar0
    }
}

impl RegisterIo for LabPlatform {
    fn read32(&self, off: u32) -> u32 {
        if self.faults.before_access(&self.guest) {
            return 0xffff_ffff;
        }
        self.guest.register_read_hook();
        self.guest.qtest_or(0, |q| q.readl(self.bar0 + off as u64))
    }

    fn write32(&self, off: u32, val: u32) {
        if self.faults.before_access(&self.guest) {
            return;
        }
        self.guest.qtest_or((), |q| q.writel(self.bar0 + off as u64, val));
    }
}

impl PciPresence for LabPlatform {
    fn vendor_id(&self) -> u16 {
        if self.faults.before_access(&self.guest) {
            return 0xffff;
        }
        // A broken harness reads as "gone": the engine fails I/O, the runner reports the fault.
        self.guest.qtest_or(0xffff, |q| firmware::cfg_read16(q, self.bdf, firmware::cfg::VENDOR_ID))
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Clock for LabPlatform {
    fn now_us(&self) -> u64 {
        epoch().elapsed().as_micros() as u64
    }

    fn delay_us(&self, us: u32) {
        // QEMU's device model runs in its own process: real time passing is what advances it.
        std::thread::sleep(Duration::from_micros(us as u64));
    }
}

impl DmaAllocator for LabPlatform {
    type Region = GuestDma;

    fn alloc_dma(&self, len: usize, align: usize) -> Result<GuestDma, AllocError> {
        GuestDma::alloc(&self.guest, len, align)
    }
}
