//! The `crate::platform` traits implemented by the kernel, for one attached controller.
//!
//! Each trait is served by the wrapper that owns the corresponding kernel object: registers by
//! the BAR ([`MemResource`]), presence by config space through the [`Device`], time by
//! [`KernelClock`], DMA memory by [`ContigDma`]. The engine sees only `P: Platform`.

use super::clock::{sleep_ms, KernelClock};
use super::device::Device;
use super::dma::{ContigDma, ContigRegion};
use super::resource::{MemResource, RegWindow};
use crate::platform::{AllocError, Clock, DmaAllocator, PciPresence, RegisterIo};
use core::ffi::c_int;

/// Everything the engine needs from the kernel for one controller.
pub struct KernelPlatform {
    dev: Device,
    bar: MemResource,
    clock: KernelClock,
    dma: ContigDma,
}

impl KernelPlatform {
    /// Takes ownership of the controller's register BAR.
    pub fn new(dev: Device, bar: MemResource) -> Self {
        KernelPlatform { dev, bar, clock: KernelClock, dma: ContigDma }
    }

    /// The newbus device.
    pub fn device(&self) -> Device {
        self.dev
    }

    /// The register BAR.
    pub fn bar(&self) -> &MemResource {
        &self.bar
    }
}

impl KernelPlatform {
    /// What the stop of this controller needs once the engine gave it up
    /// ([`crate::nvme::DeviceStop::run`]), usable without the engine and its mutex.
    ///
    /// # Safety
    /// The result must not be used after this platform (the engine owning it) is dropped.
    pub unsafe fn stop_access(&self) -> StopAccess {
        // SAFETY: forwarded to our caller: the window is used only while `self.bar` lives.
        StopAccess { dev: self.dev, regs: unsafe { self.bar.window() } }
    }
}

/// The device as the stop of a given-up controller sees it: the same registers and config
/// space as [`KernelPlatform`], but a clock whose delays **sleep** (pause_sbt(9)) instead of
/// spinning (DELAY(9)): the stop waits up to seconds for a broken device, runs without the
/// controller mutex, and only from contexts that may sleep (the teardown, our taskqueue).
pub struct StopAccess {
    dev: Device,
    regs: RegWindow,
}

impl RegisterIo for StopAccess {
    fn read32(&self, off: u32) -> u32 {
        self.regs.read32(off)
    }
    fn write32(&self, off: u32, val: u32) {
        self.regs.write32(off, val)
    }
}

impl PciPresence for StopAccess {
    fn vendor_id(&self) -> u16 {
        self.dev.pci_read_config(super::bindings::PCIR_VENDOR, VENDOR_WIDTH) as u16
    }
}

impl Clock for StopAccess {
    fn now_us(&self) -> u64 {
        KernelClock.now_us()
    }
    /// Sleeps, rounded up to whole milliseconds (the stop polls every millisecond).
    fn delay_us(&self, us: u32) {
        sleep_ms(c"nvmehpst", us.div_ceil(1000).max(1));
    }
}

impl RegisterIo for KernelPlatform {
    fn read32(&self, off: u32) -> u32 {
        self.bar.read32(off)
    }
    fn write32(&self, off: u32, val: u32) {
        self.bar.write32(off, val)
    }
}

/// `PCIR_VENDOR` is a 16-bit register.
const VENDOR_WIDTH: c_int = 2;

impl PciPresence for KernelPlatform {
    /// Reads config space, not the cached ivar: the cache still says "present" after a
    /// surprise removal, config space reads 0xffff.
    fn vendor_id(&self) -> u16 {
        self.dev.pci_read_config(super::bindings::PCIR_VENDOR, VENDOR_WIDTH) as u16
    }
}

impl Clock for KernelPlatform {
    fn now_us(&self) -> u64 {
        self.clock.now_us()
    }
    fn delay_us(&self, us: u32) {
        self.clock.delay_us(us)
    }
}

impl DmaAllocator for KernelPlatform {
    type Region = ContigRegion;
    fn alloc_dma(&self, len: usize, align: usize) -> Result<ContigRegion, AllocError> {
        self.dma.alloc_dma(len, align)
    }
}

/// Compile-time proof that the engine's bound is met, and that a controller over the kernel
/// platform may live in a [`Mutex`](super::mutex::Mutex) shared with interrupt and taskqueue
/// threads (which needs `Send`).
const _: fn() = || {
    fn engine_platform<P: crate::platform::Platform + Send + Sync>() {}
    engine_platform::<KernelPlatform>();
};
