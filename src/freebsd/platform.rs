//! The `crate::platform` traits implemented by the kernel, for one attached controller.
//!
//! Each trait is served by the wrapper that owns the corresponding kernel object: registers by
//! the BAR ([`MemResource`]), presence by config space through the [`Device`], time by
//! [`KernelClock`], DMA memory by [`ContigDma`]. The engine sees only `P: Platform`.

use super::clock::{sleep_ms, sleep_us, KernelClock};
use super::device::Device;
use super::dma::{ContigDma, ContigRegion};
use super::resource::{MemResource, RegWindow};
use crate::platform::{AllocError, Clock, DmaAllocator, PciPresence, RegisterIo};
use core::ffi::c_int;
use core::sync::atomic::{AtomicBool, Ordering};

/// Waits shorter than this are spun (DELAY(9)) even where waits may sleep. They are the first
/// steps of the engine's back-off, which starts at 1 us, and an admin command usually
/// completes within them; sleeping instead would cost a context switch each for nothing. A
/// spin before the first sleep is at most 1 + 2 + 4 + 8 us.
pub const SPIN_BELOW_US: u32 = 16;

/// Everything the engine needs from the kernel for one controller.
pub struct KernelPlatform {
    dev: Device,
    bar: MemResource,
    clock: KernelClock,
    dma: ContigDma,
    /// The engine's waits ([`Clock::delay_us`]) may sleep: from attach until the engine is put
    /// behind the controller mutex ([`KernelPlatform::forbid_sleep`]), and again once it is
    /// taken out of it to be freed ([`KernelPlatform::allow_sleep`]).
    may_sleep: AtomicBool,
}

impl KernelPlatform {
    /// Takes ownership of the controller's register BAR. Waits may sleep: the engine is new
    /// and owned by the attaching thread, which may sleep (DEVICE_ATTACH).
    pub fn new(dev: Device, bar: MemResource) -> Self {
        KernelPlatform { dev, bar, clock: KernelClock, dma: ContigDma, may_sleep: AtomicBool::new(true) }
    }

    /// From now on the engine's waits spin (DELAY(9)): it is about to live behind the
    /// controller's MTX_DEF mutex, and a sleep with that held is forbidden. (The lock rule
    /// keeps the waits off the mutex anyway: every wait on the device runs through a
    /// [`StopAccess`] or a rescan step with the mutex released.)
    pub fn forbid_sleep(&self) {
        self.may_sleep.store(false, Ordering::Release);
    }

    /// From now on the engine's waits sleep again: the engine is no longer shared (its owner
    /// is freeing it from a sleepable thread, without the mutex).
    pub fn allow_sleep(&self) {
        self.may_sleep.store(true, Ordering::Release);
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

    fn stop_bus_mastering(&self) -> bool {
        stop_bus_mastering(&self.dev)
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

/// [`PciPresence::stop_bus_mastering`] for a controller of ours: pci_disable_busmaster(9),
/// then PCIR_COMMAND read back (config space still answers when CC.EN does not: it is the
/// function's PCI interface, not its firmware). Says on the console which way it went: it
/// decides whether the controller's memory and the requests it held are given back.
fn stop_bus_mastering(dev: &Device) -> bool {
    use super::bindings::{PCIM_CMD_BUSMASTEREN, PCIR_COMMAND};
    if let Err(e) = dev.disable_busmaster() {
        dev_printf!(dev, "controller ignored the disable; turning bus mastering off failed ({}): its memory and requests are held\n", e);
        return false;
    }
    let cmd = dev.pci_read_config(PCIR_COMMAND as c_int, 2) as u16;
    let off = cmd != 0xffff && cmd & PCIM_CMD_BUSMASTEREN as u16 == 0;
    if off {
        dev_printf!(dev, "controller ignored the disable: bus mastering turned off; its requests fail and its memory is freed\n");
    } else {
        dev_printf!(dev, "controller ignored the disable and still has bus mastering on (command {:#06x}): its memory and requests are held\n", cmd);
    }
    off
}

impl PciPresence for KernelPlatform {
    /// Reads config space, not the cached ivar: the cache still says "present" after a
    /// surprise removal, config space reads 0xffff.
    fn vendor_id(&self) -> u16 {
        self.dev.pci_read_config(super::bindings::PCIR_VENDOR, VENDOR_WIDTH) as u16
    }
    /// The same last resort as the stop of a given-up controller (a bring-up that fails on a
    /// controller ignoring the disable ends its stop here).
    fn stop_bus_mastering(&self) -> bool {
        stop_bus_mastering(&self.dev)
    }
}

impl Clock for KernelPlatform {
    fn now_us(&self) -> u64 {
        self.clock.now_us()
    }
    /// Sleeps (pause_sbt) while waits may sleep, except for the first microseconds of a
    /// back-off ([`SPIN_BELOW_US`]); spins otherwise. Bring-up runs here with bus_topo_lock
    /// (Giant) held by newbus, and so does nvme(4)'s: after boot, config_intrhook_establish
    /// (sys/kern/subr_autoconf.c) runs nvme_ctrlr_start_config_hook at once in the attaching
    /// thread, whose waits sleep in pause_sbt (nvme_ctrlr_wait_for_ready,
    /// nvme_completion_poll). A sleep gives Giant up until it wakes; a DELAY spin would keep
    /// every other Giant holder (newbus, the rest of the device tree) waiting for up to CAP.TO.
    /// Meanwhile the device is DS_ATTACHING, which sys/kern/subr_bus.c `device_detach` refuses
    /// with EBUSY: no detach runs under a sleeping bring-up.
    fn delay_us(&self, us: u32) {
        if self.may_sleep.load(Ordering::Acquire) && us >= SPIN_BELOW_US {
            sleep_us(c"nvmehpbu", us);
        } else {
            self.clock.delay_us(us)
        }
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
