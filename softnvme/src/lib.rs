//! softnvme: a software NVMe controller that implements the nvme_hotplug platform traits
//! in-process, so the engine can be tested and fuzzed on the host without QEMU.
//!
//! [`SoftNvme`] is a cheap handle (clone it: one clone goes into the engine's `Controller`,
//! the test keeps another to turn fault knobs and inspect the media). Time is virtual:
//! `delay_us` advances it, so timeouts are tested instantly and deterministically.
//!
//! - [`bus`]: the simulated DMA memory;
//! - [`device`]: registers, queues and commands;
//! - [`media`]: RAM-backed namespaces;
//! - [`faults`]: the knobs that make the device hostile, broken or gone.

pub mod bus;
pub mod device;
pub mod faults;
pub mod media;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use nvme_hotplug::platform::{AllocError, Clock, DmaAllocator, PciPresence, RegisterIo};

pub use bus::SoftRegion;
pub use device::{Cqe, DevStats, Device, SoftConfig};
pub use faults::{CqeMutation, Faults, Vanish};
pub use media::SoftNs;

/// PCI vendor ID the software controller reports (QEMU's, like the lab's device).
pub const VENDOR_ID: u16 = 0x1b36;

/// A handle to one software controller and its memory and clock.
#[derive(Clone)]
pub struct SoftNvme {
    dev: Rc<RefCell<Device>>,
    bus: Rc<RefCell<bus::Bus>>,
    clock: Rc<Cell<u64>>,
}

impl SoftNvme {
    /// A controller with `cfg`.
    pub fn new(cfg: SoftConfig) -> SoftNvme {
        let bus = Rc::new(RefCell::new(bus::Bus::default()));
        let dev = Rc::new(RefCell::new(Device::new(bus.clone(), cfg)));
        SoftNvme {
            dev,
            bus,
            clock: Rc::new(Cell::new(0)),
        }
    }

    /// Changes fault knobs.
    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.dev.borrow_mut().faults);
    }

    /// Makes the device vanish now (surprise removal).
    pub fn vanish(&self, style: Vanish) {
        self.dev.borrow_mut().vanished = Some(style);
    }

    /// True once the device vanished.
    pub fn is_vanished(&self) -> bool {
        self.dev.borrow().vanished.is_some()
    }

    /// Sets CSTS.CFS (controller fatal status).
    pub fn set_fatal(&self) {
        // CSTS is not writable by the host; go through a tiny internal path.
        let mut d = self.dev.borrow_mut();
        d.set_csts_bits(2);
    }

    /// Posts completions held by `Faults::hold_io`.
    pub fn release_held(&self) {
        self.dev.borrow_mut().release_held();
    }

    /// Posts an invented completion entry to CQ `cqid` with the right phase tag.
    pub fn inject_cqe(&self, cqid: u16, cqe: device::Cqe) {
        self.dev.borrow_mut().inject(cqid, cqe);
    }

    /// Completions currently held.
    pub fn held(&self) -> usize {
        self.dev.borrow().held()
    }

    /// Register accesses so far (what `Faults::vanish_at_access` counts).
    pub fn register_accesses(&self) -> u64 {
        self.dev.borrow().accesses
    }

    /// What the device did.
    pub fn stats(&self) -> DevStats {
        self.dev.borrow().stats
    }

    /// Allocates a data buffer in the device-visible memory (what a test hands the engine).
    pub fn buffer(&self, len: usize) -> SoftRegion {
        SoftRegion::new(self.bus.clone(), len, 4096).expect("test buffer allocation")
    }

    /// Allocates a buffer at `offset` bytes past a page boundary (to exercise PRP offsets).
    pub fn buffer_at_offset(&self, len: usize, offset: usize) -> (SoftRegion, u64) {
        let r = self.buffer(len + offset);
        let addr = nvme_hotplug::platform::DmaRegion::bus_addr(&r) + offset as u64;
        (r, addr)
    }

    /// Bytes of DMA memory currently allocated (leak checks).
    pub fn dma_bytes(&self) -> usize {
        self.bus.borrow().allocated
    }

    /// Reads blocks straight from the media (what is really "on the disk").
    pub fn media_read(&self, nsid: u32, lba: u64, blocks: u64) -> Option<Vec<u8>> {
        let d = self.dev.borrow();
        let ns = d.namespaces.get(&nsid)?;
        let mut v = vec![0u8; (blocks as usize) << ns.lbads];
        ns.read(lba, &mut v);
        Some(v)
    }

    /// Attaches a namespace at run time (raises Namespace Attribute Changed).
    pub fn attach_namespace(&self, nsid: u32, lbads: u8, blocks: u64) {
        self.dev
            .borrow_mut()
            .attach_namespace(SoftNs::new(nsid, lbads, blocks));
    }

    /// Detaches a namespace at run time.
    pub fn detach_namespace(&self, nsid: u32) {
        self.dev.borrow_mut().detach_namespace(nsid);
    }

    /// Raises an arbitrary asynchronous event (completion dword 0).
    pub fn raise_event(&self, dw0: u32) {
        self.dev.borrow_mut().raise_event(dw0);
    }

    /// Virtual time in microseconds.
    pub fn now(&self) -> u64 {
        self.clock.get()
    }

    /// Advances virtual time.
    pub fn advance(&self, us: u64) {
        self.clock.set(self.clock.get() + us);
        self.dev.borrow_mut().set_time(self.clock.get());
    }
}

impl RegisterIo for SoftNvme {
    fn read32(&self, off: u32) -> u32 {
        self.dev.borrow_mut().read32(off)
    }
    fn write32(&self, off: u32, val: u32) {
        self.dev.borrow_mut().write32(off, val)
    }
}

impl PciPresence for SoftNvme {
    fn vendor_id(&self) -> u16 {
        if self.dev.borrow().vanished.is_some() {
            0xffff
        } else {
            VENDOR_ID
        }
    }
}

impl Clock for SoftNvme {
    fn now_us(&self) -> u64 {
        self.clock.get()
    }
    fn delay_us(&self, us: u32) {
        self.advance(us as u64);
    }
}

impl DmaAllocator for SoftNvme {
    type Region = SoftRegion;
    fn alloc_dma(&self, len: usize, align: usize) -> Result<SoftRegion, AllocError> {
        SoftRegion::new(self.bus.clone(), len, align)
    }
}
