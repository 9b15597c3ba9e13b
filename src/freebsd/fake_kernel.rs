//! A fake of the kernel entry points the wrappers call, for host unit tests (`cargo test
//! --features kld --lib freebsd::`). Each fake records what it was called with in a per-thread
//! log, and a few can be told to fail, so the tests in `kpi_tests.rs` can check the flags the
//! wrappers pass and, above all, the *order* of calls their ownership rules promise (teardown
//! before free, drain before free, destroy exactly once).
//!
//! libc's own `malloc`/`free` stand in for malloc(9)/free(9) (the extra malloc-type and flags
//! arguments are ignored by the x86-64 calling convention); no libc symbol is redefined here.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use super::bindings::{self, *};
use core::ffi::{c_char, c_int, c_void, CStr};
use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

/// Failure knobs: what the next calls return.
#[derive(Default, Clone, Copy)]
pub struct Knobs {
    pub make_dev_s_error: c_int,
    pub acpi_remove_status: u32,
    pub teardown_intr_error: c_int,
    pub rman_size: u64,
    /// What config space returns for the vendor ID (0 = a device answers; 0xffff = gone).
    pub pci_vendor: u32,
    /// disk_gone calls d_gone at once (GEOM with no consumer left), instead of the test
    /// calling `geom_disk_gone` later.
    pub d_gone_at_once: bool,
    /// PCI class, subclass and programming interface of the fake device.
    pub pci_class: [u8; 3],
    /// `hw.nvme_hotplug.claim`.
    pub claim: c_int,
    /// What taskqueue_start_threads returns.
    pub start_threads_error: c_int,
    /// MSI-X vectors the function offers (0: no MSI-X capability).
    pub msix_count: c_int,
    /// `PCIR_BAR(n)` of the MSI-X table and of the PBA (meaningful with `msix_count` > 0).
    pub msix_table_rid: c_int,
    pub msix_pba_rid: c_int,
    /// MSI messages the function offers (0: no MSI capability).
    pub msi_count: c_int,
    /// What pci_alloc_msix returns even with its BARs active (0: success), e.g. ENXIO for a
    /// system where MSI-X is blacklisted.
    pub msix_alloc_error: c_int,
    /// `hw.nvme_hotplug.cmd_timeout_ms` (0: the default, 30000).
    pub cmd_timeout_ms: u32,
    /// The function ignores writes of PCIM_CMD_BUSMASTEREN (bus mastering stays on).
    pub busmaster_stuck: bool,
    /// Which hotplug slots the fake `\_SB_.PCI0` has ([`Layout`]).
    pub layout: Layout,
}

/// The fake ACPI namespace below `\_SB_.PCI0` and the newbus tree it describes.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// i440fx: one `_EJ0` slot `S18_` on pci0 (slot 3).
    #[default]
    I440fx,
    /// q35: no slot on pci0; a PCIe root port `S20_` (pci0 slot 4, no `_EJ0`, device `pcib1`)
    /// whose secondary bus `pci1` (bus number 4) has the one slot `S20_.S00_` (`_ADR` 0);
    /// and the LPC bridge `SF8_` (pci0 slot 31), whose child has no `_EJ0`.
    Q35,
    /// Both: `S18_` on pci0 and the root port's `S20_.S00_` on pci1.
    Both,
}

/// An ACPI notify handler as ACPICA calls it.
type NotifyFn = unsafe extern "C" fn(ACPI_HANDLE, u32, *mut c_void);

std::thread_local! {
    static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static KNOBS: Cell<Knobs> = Cell::new(Knobs::default());
    /// The installed notify handlers, one per object (a second install on an object replaces
    /// the first), in install order.
    static NOTIFY: RefCell<Vec<(usize, NotifyFn, *mut c_void)>> = const { RefCell::new(Vec::new()) };
    static INTR: Cell<Option<(unsafe extern "C" fn(*mut c_void), *mut c_void)>> = const { Cell::new(None) };
    static CALLOUT: Cell<Option<(unsafe extern "C" fn(*mut c_void), *mut c_void)>> = const { Cell::new(None) };
    /// Addresses of the mutexes this thread holds (0: the one softclock holds for a callout).
    static MTX_HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static CDEVS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static DISKS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static QUEUED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// The functions that answer config reads, or have a device_t (see [`FakeFn`]), by (bus
    /// number, slot, function): pci0's slot 3 is the ACPI slot `S18_`, pci1 (bus 4) slot 0 the
    /// root port's `S20_.S00_`.
    static FUNCS: RefCell<std::collections::BTreeMap<(u8, u8, u8), FakeFn>> = const { RefCell::new(std::collections::BTreeMap::new()) };
    /// Every config read through the bridge since `reset`: (slot, function, register).
    static CONFIG_READS: RefCell<Vec<(u8, u8, u32)>> = const { RefCell::new(Vec::new()) };
    /// What PCIB_MAXFUNCS of pcib0 answers (7; more would mean ARI).
    static MAX_FUNCS: Cell<c_int> = const { Cell::new(7) };
    static SOFTC: Cell<usize> = const { Cell::new(0) };
    /// The device behind the BAR, if a test installed one ([`install_nvme`]).
    static NVME: RefCell<Option<super::fake_nvme::FakeNvme>> = const { RefCell::new(None) };
    static ON_PAUSE: Cell<Option<fn()>> = const { Cell::new(None) };
    /// What other threads do while a device_detach has given up the topology lock ([`on_detached`]).
    static ON_DETACHED: Cell<Option<fn(device_t)>> = const { Cell::new(None) };
    /// What other threads do while a device_probe_and_attach sleeps ([`on_probed`]).
    static ON_PROBED: Cell<Option<fn(device_t)>> = const { Cell::new(None) };
    static DELAYS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// The driver of a pci0 function's device_t when it is not nvmehp ([`set_function_driver`]):
    /// `Some(name)` another driver's, `None` no driver (DS_NOTPRESENT).
    static DRIVERS: RefCell<std::collections::BTreeMap<(u8, u8, u8), Option<&'static CStr>>> = const { RefCell::new(std::collections::BTreeMap::new()) };
    /// Notify dispatches ACPICA queued with the handler list as it was then (see
    /// [`queue_notify_dispatch`]); `AcpiOsWaitEventsComplete` runs them.
    static DISPATCHES: RefCell<Vec<(NotifyFn, usize, u32)>> = const { RefCell::new(Vec::new()) };
    /// The devices of devclass `nvmehp` the newbus model knows ([`newbus_add`]), unit order.
    static NEWBUS: RefCell<Vec<(usize, FakeDev)>> = const { RefCell::new(Vec::new()) };
    /// The fake uptime in microseconds, if a test made the clock advance ([`start_clock`]):
    /// DELAY(9) and pause(9) move it by what they wait. `None`: sbinuptime reads 0 for ever.
    static CLOCK_US: Cell<Option<u64>> = const { Cell::new(None) };
    /// Active SYS_RES_MEMORY resources: (resource, rid).
    static MEM_RES: RefCell<Vec<(usize, c_int)>> = const { RefCell::new(Vec::new()) };
    /// The function's PCIR_COMMAND register (bus mastering set and cleared by the pci_*_busmaster
    /// methods).
    static COMMAND: Cell<u16> = const { Cell::new(0) };
}

/// Makes the fake uptime start at 0 and advance by every DELAY(9) and pause(9) (until the
/// next [`reset`]), so waits bounded by the clock end by time, as in the kernel.
pub fn start_clock() {
    CLOCK_US.with(|c| c.set(Some(0)));
}

/// The fake uptime in microseconds (0 unless [`start_clock`] was called).
pub fn clock_us() -> u64 {
    CLOCK_US.with(|c| c.get().unwrap_or(0))
}

fn advance_clock(us: u64) {
    CLOCK_US.with(|c| {
        if let Some(t) = c.get() {
            c.set(Some(t + us));
        }
    });
}

/// The rids of the memory BARs currently allocated.
pub fn active_memory_rids() -> Vec<c_int> {
    MEM_RES.with(|m| m.borrow().iter().map(|&(_, rid)| rid).collect())
}

/// Puts an NVMe device model behind `bus_read_4`/`bus_write_4` (until the next `reset`).
pub fn install_nvme(dev: super::fake_nvme::FakeNvme) {
    NVME.with(|n| *n.borrow_mut() = Some(dev));
}

/// Runs `f` on the installed device model.
pub fn with_nvme<R>(f: impl FnOnce(&mut super::fake_nvme::FakeNvme) -> R) -> R {
    let _fake = FakeWork::begin(); // the model's allocations are not the driver's
    NVME.with(|n| f(n.borrow_mut().as_mut().expect("no NVMe model installed")))
}

/// Starts a test: empty log, default knobs.
pub fn reset(knobs: Knobs) {
    LOG.with(|l| l.borrow_mut().clear());
    ON_PAUSE.with(|c| c.set(None));
    ON_DETACHED.with(|c| c.set(None));
    ON_PROBED.with(|c| c.set(None));
    DELAYS.with(|c| c.set((0, 0)));
    CLOCK_US.with(|c| c.set(None));
    MEM_RES.with(|m| m.borrow_mut().clear());
    COMMAND.with(|c| c.set(0));
    QUEUED.with(|l| l.borrow_mut().clear());
    FUNCS.with(|f| f.borrow_mut().clear());
    CONFIG_READS.with(|r| r.borrow_mut().clear());
    MAX_FUNCS.with(|m| m.set(7));
    CDEVS.with(|l| l.borrow_mut().clear());
    DISKS.with(|l| l.borrow_mut().clear());
    KNOBS.with(|k| k.set(knobs));
    NVME.with(|n| *n.borrow_mut() = None);
    NEWBUS.with(|n| n.borrow_mut().clear());
    DISPATCHES.with(|d| d.borrow_mut().clear());
    DRIVERS.with(|d| d.borrow_mut().clear());
    NOTIFY.with(|n| n.borrow_mut().clear());
    if knobs.layout != Layout::I440fx {
        // The root port itself: a bridge function of pci0 that pcib(4) drives.
        set_function(RP_SLOT, 0, FakeFn { vendor: 0x1b36, hdrtype: 0x01, child: true });
        set_function_driver(RP_SLOT, 0, Some(c"pcib"));
    }
}

/// Gives the device_t of pci0's `slot`.`func` another driver (`Some(c"nvme")`) or none
/// (`None`: probed, no driver took it); without this every device is nvmehp's.
pub fn set_function_driver(slot: u8, func: u8, driver: Option<&'static CStr>) {
    set_function_driver_on(0, slot, func, driver);
}

/// [`set_function_driver`] for `slot`.`func` of the pci bus numbered `bus`.
pub fn set_function_driver_on(bus: u8, slot: u8, func: u8, driver: Option<&'static CStr>) {
    DRIVERS.with(|d| d.borrow_mut().insert((bus, slot, func), driver));
}

fn driver_entry(dev: device_t) -> Option<Option<&'static CStr>> {
    function_of(dev).and_then(|k| DRIVERS.with(|d| d.borrow().get(&k).copied()))
}

#[no_mangle]
pub unsafe extern "C" fn device_is_alive(dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    match driver_entry(dev) {
        Some(driver) => c_int::from(driver.is_some()),
        // In the newbus model: probed (DS_ALIVE) or later; otherwise an attached nvmehp device.
        None => newbus_dev(dev).map_or(1, |d| c_int::from(d.state != DevState::NotPresent)),
    }
}

/// Changes the failure knobs in the middle of a test (the log and fakes are kept).
pub fn set_knobs(knobs: Knobs) {
    KNOBS.with(|k| k.set(knobs));
}

/// Everything recorded since `reset`, in order.
pub fn log() -> Vec<String> {
    LOG.with(|l| l.borrow().clone())
}

/// Records an event (tests use it to mark when their own values are dropped).
pub fn record(s: impl ToString) {
    let _fake = FakeWork::begin();
    LOG.with(|l| l.borrow_mut().push(s.to_string()));
}

fn knobs() -> Knobs {
    KNOBS.with(|k| k.get())
}

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return "(null)".into();
    }
    // SAFETY: the wrappers pass NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn leak<T>() -> *mut T {
    // SAFETY: the kernel structs are plain C data for which all-zero is a valid value.
    Box::into_raw(Box::new(unsafe { core::mem::zeroed::<T>() }))
}

/// Simulates the ACPI task thread delivering notification `value` to the handler installed
/// last.
pub fn deliver_notify(value: u32) {
    let (_, f, ctx) = NOTIFY.with(|n| n.borrow().last().copied()).expect("no notify handler installed");
    // SAFETY: the handler and context the wrapper installed.
    unsafe { f(0x5107 as ACPI_HANDLE, value, ctx) }
}

/// Simulates the ACPI task thread delivering notification `value` sent to the object `handle`
/// (e.g. [`RP_SLOT_ACPI`]) to the handler installed there.
pub fn deliver_notify_to(handle: usize, value: u32) {
    let (h, f, ctx) = NOTIFY
        .with(|n| n.borrow().iter().find(|(h, _, _)| *h == handle).copied())
        .unwrap_or_else(|| panic!("no notify handler on {handle:#x}"));
    // SAFETY: the handler and context the wrapper installed on that object.
    unsafe { f(h as ACPI_HANDLE, value, ctx) }
}

/// The objects that have a notify handler installed, in install order.
pub fn notify_objects() -> Vec<usize> {
    NOTIFY.with(|n| n.borrow().iter().map(|(h, _, _)| *h).collect())
}

/// Simulates the interrupt thread running the handler.
pub fn fire_interrupt() {
    let (f, arg) = INTR.with(|n| n.get()).expect("no interrupt handler set up");
    // SAFETY: the handler and argument the wrapper set up.
    unsafe { f(arg) }
}

/// Simulates softclock running an armed callout with its mutex held.
pub fn fire_callout() {
    let (f, arg) = CALLOUT.with(|n| n.get()).expect("no callout armed");
    MTX_HELD.with(|h| h.borrow_mut().push(0));
    // SAFETY: the function and argument the wrapper armed.
    unsafe { f(arg) }
    MTX_HELD.with(|h| h.borrow_mut().pop());
}

// SAFETY: malloc_type is plain C data for which all-zero is a valid value.
#[no_mangle]
pub static mut M_NVMEHP: [malloc_type; 1] = [unsafe { core::mem::zeroed() }];

extern "C" {
    fn aligned_alloc(align: usize, size: usize) -> *mut c_void;
}

#[no_mangle]
pub unsafe extern "C" fn malloc_aligned(size: usize, align: usize, _t: *mut malloc_type, _f: c_int) -> *mut c_void {
    let _fake = FakeWork::begin();
    count_allocation();
    // SAFETY: libc; size rounded up to a multiple of align as aligned_alloc requires.
    unsafe { aligned_alloc(align, size.div_ceil(align) * align) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_print(msg: *const c_char) {
    let _fake = FakeWork::begin();
    record(format!("printf {}", cstr(msg)));
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_device_print(_dev: device_t, msg: *const c_char) {
    let _fake = FakeWork::begin();
    record(format!("device_printf {}", cstr(msg)));
}

// --- cdev ---------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn nvmehp_make_dev_args_init(args: *mut make_dev_args) {
    let _fake = FakeWork::begin();
    // SAFETY: a valid args struct (wrapper's local).
    unsafe {
        *args = core::mem::zeroed();
        (*args).mda_size = core::mem::size_of::<make_dev_args>();
    }
    record("make_dev_args_init");
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_make_dev_s(args: *mut make_dev_args, out: *mut *mut cdev, name: *const c_char) -> c_int {
    let _fake = FakeWork::begin();
    // SAFETY: the wrapper passes initialised args and a valid out pointer.
    let a = unsafe { &*args };
    record(format!(
        "make_dev_s size={} flags={:#x} unit={} mode={:o} drv1={:p} devsw={:p} name={}",
        a.mda_size, a.mda_flags, a.mda_unit, a.mda_mode, a.mda_si_drv1, a.mda_devsw, cstr(name)
    ));
    let err = knobs().make_dev_s_error;
    if err == 0 {
        let c = leak::<cdev>();
        CDEVS.with(|l| l.borrow_mut().push(c as usize));
        // SAFETY: fresh fake cdev.
        unsafe {
            (*c).si_drv1 = a.mda_si_drv1;
            *out = c;
        }
    }
    err
}

#[no_mangle]
pub unsafe extern "C" fn destroy_dev(dev: *mut cdev) {
    let _fake = FakeWork::begin();
    record(format!("destroy_dev {dev:p}"));
}

#[no_mangle]
pub unsafe extern "C" fn destroy_dev_sched_cb(dev: *mut cdev, cb: Option<unsafe extern "C" fn(*mut c_void)>, arg: *mut c_void) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("destroy_dev_sched_cb {dev:p} cb={}", cb.is_some()));
    if let Some(cb) = cb {
        // SAFETY: the callback the wrapper's caller vouched for.
        unsafe { cb(arg) };
    }
    0
}

// --- ACPI ---------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn AcpiInstallNotifyHandler(dev: ACPI_HANDLE, ty: u32, h: ACPI_NOTIFY_HANDLER, ctx: *mut c_void) -> u32 {
    let _fake = FakeWork::begin();
    record(format!("AcpiInstallNotifyHandler {dev:p} type={ty}"));
    NOTIFY.with(|n| {
        let mut n = n.borrow_mut();
        n.retain(|(o, _, _)| *o != dev as usize);
        if let Some(f) = h {
            n.push((dev as usize, f, ctx));
        }
    });
    NVMEHP_AE_OK
}

#[no_mangle]
pub unsafe extern "C" fn AcpiRemoveNotifyHandler(dev: ACPI_HANDLE, ty: u32, h: ACPI_NOTIFY_HANDLER) -> u32 {
    let _fake = FakeWork::begin();
    // Identity of the function, as ACPICA compares it when removing.
    let installed = NOTIFY.with(|n| n.borrow().iter().find(|(o, _, _)| *o == dev as usize).map(|(_, f, _)| *f as usize));
    let same = installed.is_some_and(|f| Some(f) == h.map(|h| h as usize));
    record(format!("AcpiRemoveNotifyHandler {dev:p} type={ty} same_handler={same}"));
    let st = knobs().acpi_remove_status;
    if st == NVMEHP_AE_OK {
        NOTIFY.with(|n| n.borrow_mut().retain(|(o, _, _)| *o != dev as usize));
    }
    st
}

/// Simulates ACPICA queueing notify `value` now (`AcpiEvQueueNotifyRequest` keeps the handler
/// list as it is at this moment, without a reference) for an `acpi_task` thread that has not run
/// it yet: the dispatch calls the handler installed now, with its context, when
/// `AcpiOsWaitEventsComplete` drains the queue, even if the handler was removed in between.
pub fn queue_notify_dispatch(value: u32) {
    let (_, f, ctx) = NOTIFY.with(|n| n.borrow().last().copied()).expect("no notify handler installed");
    DISPATCHES.with(|d| d.borrow_mut().push((f, ctx as usize, value)));
}

#[no_mangle]
pub unsafe extern "C" fn AcpiOsWaitEventsComplete() {
    let _fake = FakeWork::begin();
    record("AcpiOsWaitEventsComplete");
    let queued = DISPATCHES.with(|d| core::mem::take(&mut *d.borrow_mut()));
    for (f, ctx, value) in queued {
        // SAFETY: the handler and context that were installed when the notify was queued; the
        // test checks they are still alive, which is what the wrapper must guarantee.
        unsafe { f(0x5107 as ACPI_HANDLE, value, ctx as *mut c_void) };
    }
}

#[no_mangle]
pub unsafe extern "C" fn AcpiGetName(h: ACPI_HANDLE, _ty: u32, buf: *mut ACPI_BUFFER) -> u32 {
    let _fake = FakeWork::begin();
    let name: &[u8] = match h as usize {
        PCI0_ACPI => b"\\_SB_.PCI0\0",
        ROOT_PORT_ACPI => b"\\_SB_.PCI0.S20_\0",
        RP_SLOT_ACPI => b"\\_SB_.PCI0.S20_.S00_\0",
        _ => b"\\_SB_.S18_\0",
    };
    // SAFETY: the wrapper passes a caller-provided buffer of `Length` bytes.
    unsafe {
        let b = &mut *buf;
        if (b.Length as usize) < name.len() {
            return 0x000b; // AE_BUFFER_OVERFLOW
        }
        core::ptr::copy_nonoverlapping(name.as_ptr(), b.Pointer.cast::<u8>(), name.len());
    }
    NVMEHP_AE_OK
}

// --- resources and interrupts -------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn bus_alloc_resource(_dev: device_t, ty: c_int, rid: *mut c_int, _s: u64, _e: u64, _c: u64, flags: u32) -> *mut resource {
    let _fake = FakeWork::begin();
    // SAFETY: valid in/out rid from the wrapper.
    let r = unsafe { *rid };
    record(format!("bus_alloc_resource type={ty} rid={r:#x} flags={flags:#x}"));
    let res = leak::<resource>();
    if ty == bindings::SYS_RES_MEMORY {
        MEM_RES.with(|m| m.borrow_mut().push((res as usize, r)));
    }
    res
}

#[no_mangle]
pub unsafe extern "C" fn bus_release_resource(_dev: device_t, r: *mut resource) -> c_int {
    let _fake = FakeWork::begin();
    let mem = MEM_RES.with(|m| {
        let mut m = m.borrow_mut();
        let i = m.iter().position(|&(p, _)| p == r as usize)?;
        Some(m.remove(i).1)
    });
    match mem {
        Some(rid) => record(format!("bus_release_resource {r:p} memory rid={rid:#x}")),
        None => record(format!("bus_release_resource {r:p}")),
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn rman_get_size(_r: *const resource) -> u64 {
    let _fake = FakeWork::begin();
    knobs().rman_size
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_bus_read_4(_r: *mut resource, off: u64) -> u32 {
    let _fake = FakeWork::begin();
    if let Some(v) = NVME.with(|n| n.borrow().as_ref().map(|d| d.read32(off as u32))) {
        return v; // not recorded: bring-up polls CSTS thousands of times
    }
    record(format!("bus_read_4 {off:#x}"));
    0x1000_0000 | off as u32
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_bus_write_4(_r: *mut resource, off: u64, val: u32) {
    let _fake = FakeWork::begin();
    if NVME.with(|n| n.borrow_mut().as_mut().map(|d| d.write32(off as u32, val)).is_some()) {
        return;
    }
    record(format!("bus_write_4 {off:#x} {val:#x}"));
}

#[no_mangle]
pub unsafe extern "C" fn bus_setup_intr(
    _dev: device_t,
    _r: *mut resource,
    flags: c_int,
    filter: driver_filter_t,
    handler: driver_intr_t,
    arg: *mut c_void,
    cookie: *mut *mut c_void,
) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("bus_setup_intr flags={flags:#x} filter={}", filter.is_some()));
    INTR.with(|i| i.set(handler.map(|h| (h, arg))));
    // SAFETY: valid out pointer.
    unsafe { *cookie = 0xc00c1e as *mut c_void };
    0
}

#[no_mangle]
pub unsafe extern "C" fn bus_teardown_intr(_dev: device_t, _r: *mut resource, cookie: *mut c_void) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("bus_teardown_intr cookie={cookie:p}"));
    let err = knobs().teardown_intr_error;
    if err == 0 {
        INTR.with(|i| i.set(None));
    }
    err
}

// --- taskqueue ----------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn taskqueue_create(name: *const c_char, mflags: c_int, enq: taskqueue_enqueue_fn, ctx: *mut c_void) -> *mut taskqueue {
    let _fake = FakeWork::begin();
    record(format!("taskqueue_create {} mflags={mflags} thread_enqueue={} ctx_set={}", cstr(name), enq.is_some(), !ctx.is_null()));
    0x7a5c as *mut taskqueue
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_thread_enqueue(_ctx: *mut c_void) {}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_taskqueue_start_threads(tqp: *mut *mut taskqueue, pri: c_int, name: *const c_char) -> c_int {
    let _fake = FakeWork::begin();
    // SAFETY: valid pointer to the queue slot.
    let q = unsafe { *tqp };
    record(format!("taskqueue_start_threads {q:p} pri={pri} {}", cstr(name)));
    knobs().start_threads_error
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_task_init(t: *mut task, prio: c_int, f: task_fn_t, ctx: *mut c_void) {
    let _fake = FakeWork::begin();
    // SAFETY: the wrapper's task; this is what TASK_INIT does.
    unsafe {
        (*t).ta_pending = 0;
        (*t).ta_priority = prio as u8;
        (*t).ta_func = f;
        (*t).ta_context = ctx;
    }
    record(format!("TASK_INIT prio={prio}"));
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_enqueue(_q: *mut taskqueue, t: *mut task) -> c_int {
    let _fake = FakeWork::begin();
    record("taskqueue_enqueue");
    // SAFETY: the wrapper's initialised task.
    unsafe {
        if (*t).ta_pending == 0 {
            QUEUED.with(|q| q.borrow_mut().push(t as usize));
        }
        (*t).ta_pending += 1;
    }
    0
}

/// Simulates the queue thread: runs every queued task (and what they queue) in order.
pub fn run_queued() {
    for _ in 0..1000 {
        let Some(t) = QUEUED.with(|q| {
            let mut q = q.borrow_mut();
            if q.is_empty() { None } else { Some(q.remove(0)) }
        }) else {
            return;
        };
        run_task(t as *mut task);
    }
    panic!("the task queue never became empty");
}

/// Simulates the queue thread running a queued task (what taskqueue_run_locked does).
pub fn run_task(t: *mut task) {
    // SAFETY: a task enqueued by the wrapper.
    unsafe {
        let pending = (*t).ta_pending;
        (*t).ta_pending = 0;
        if let Some(f) = (*t).ta_func {
            f((*t).ta_context, c_int::from(pending));
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn _timeout_task_init(_q: *mut taskqueue, tt: *mut timeout_task, prio: c_int, f: task_fn_t, ctx: *mut c_void) {
    let _fake = FakeWork::begin();
    // SAFETY: the wrapper's timeout task; this is the task half of what the kernel does.
    unsafe { nvmehp_task_init(&raw mut (*tt).t, prio, f, ctx) };
    record("TIMEOUT_TASK_INIT");
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_enqueue_timeout_sbt(_q: *mut taskqueue, tt: *mut timeout_task, sbt: i64, pr: i64, flags: c_int) -> c_int {
    let _fake = FakeWork::begin();
    // Recorded, never run: time does not pass here (kldhost `--timeouts` lets it).
    record(format!("taskqueue_enqueue_timeout sbt={sbt} pr={pr} flags={flags}"));
    // SAFETY: the wrapper's timeout task.
    unsafe { (*tt).t.ta_pending += 1 };
    0
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_drain_timeout(_q: *mut taskqueue, _tt: *mut timeout_task) {
    let _fake = FakeWork::begin();
    record("taskqueue_drain_timeout");
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_drain(_q: *mut taskqueue, _t: *mut task) {
    let _fake = FakeWork::begin();
    record("taskqueue_drain");
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_drain_all(_q: *mut taskqueue) {
    let _fake = FakeWork::begin();
    record("taskqueue_drain_all");
}

#[no_mangle]
pub unsafe extern "C" fn taskqueue_free(q: *mut taskqueue) {
    let _fake = FakeWork::begin();
    record(format!("taskqueue_free {q:p}"));
}

// --- mtx and callout ----------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn nvmehp_mtx_init(_m: *mut mtx, name: *const c_char) {
    let _fake = FakeWork::begin();
    record(format!("mtx_init {}", cstr(name)));
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_mtx_lock(_m: *mut mtx) {
    let _fake = FakeWork::begin();
    let a = _m as usize;
    assert!(!MTX_HELD.with(|h| h.borrow().contains(&a)), "mtx_lock of a held mutex");
    MTX_HELD.with(|h| h.borrow_mut().push(a));
    record("mtx_lock");
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_mtx_unlock(_m: *mut mtx) {
    let _fake = FakeWork::begin();
    let a = _m as usize;
    let held = MTX_HELD.with(|h| {
        let mut h = h.borrow_mut();
        h.iter().position(|x| *x == a).map(|i| h.remove(i)).is_some()
    });
    assert!(held, "mtx_unlock of a free mutex");
    record("mtx_unlock");
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_mtx_destroy(_m: *mut mtx) {
    let _fake = FakeWork::begin();
    record("mtx_destroy");
}

#[no_mangle]
pub unsafe extern "C" fn _callout_init_lock(_c: *mut callout, lo: *mut lock_object, flags: c_int) {
    let _fake = FakeWork::begin();
    record(format!("callout_init_lock lock_set={} flags={flags}", !lo.is_null()));
}

#[no_mangle]
pub unsafe extern "C" fn callout_reset_sbt_on(
    _c: *mut callout,
    sbt: i64,
    pr: i64,
    f: Option<unsafe extern "C" fn(*mut c_void)>,
    arg: *mut c_void,
    cpu: c_int,
    flags: c_int,
) -> c_int {
    let _fake = FakeWork::begin();
    assert!(MTX_HELD.with(|h| !h.borrow().is_empty()), "callout_reset without the mutex held");
    record(format!("callout_reset sbt={sbt} pr={pr} cpu={cpu} flags={flags}"));
    CALLOUT.with(|c| c.set(f.map(|f| (f, arg))));
    0
}

#[no_mangle]
pub unsafe extern "C" fn _callout_stop_safe(_c: *mut callout, flags: c_int) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("callout_stop flags={flags}"));
    CALLOUT.with(|c| c.set(None));
    0
}

// --- disk and bio -------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn disk_alloc() -> *mut disk {
    let _fake = FakeWork::begin();
    record("disk_alloc");
    let d = leak::<disk>();
    DISKS.with(|l| l.borrow_mut().push(d as usize));
    d
}

/// Every cdev made since `reset`, in creation order.
pub fn cdevs() -> Vec<*mut cdev> {
    CDEVS.with(|l| l.borrow().iter().map(|a| *a as *mut cdev).collect())
}

/// Every disk allocated since `reset`, in creation order.
pub fn disks() -> Vec<*mut disk> {
    DISKS.with(|l| l.borrow().iter().map(|a| *a as *mut disk).collect())
}

/// Simulates GEOM's event thread calling `d_gone` after the last close.
pub fn geom_disk_gone(d: *mut disk) {
    // SAFETY: a fake disk the wrapper created and filled.
    let f = unsafe { (*d).d_gone }.expect("disk without d_gone");
    // SAFETY: as GEOM would call it.
    unsafe { f(d) }
}

// --- more KPI for the glue tests ----------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn nvmehp_stat_add(which: c_int, delta: i64) {
    let _fake = FakeWork::begin();
    record(format!("stat {which} {delta:+}"));
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_read_config(_dev: device_t, reg: c_int, _width: c_int) -> u32 {
    let _fake = FakeWork::begin();
    match reg {
        0 => knobs().pci_vendor,
        // A function that left answers all-ones.
        r if r == PCIR_COMMAND as c_int && knobs().pci_vendor == 0xffff => 0xffff,
        r if r == PCIR_COMMAND as c_int && knobs().busmaster_stuck => u32::from(COMMAND.with(|c| c.get()) | PCIM_CMD_BUSMASTEREN as u16),
        r if r == PCIR_COMMAND as c_int => u32::from(COMMAND.with(|c| c.get())),
        _ => 0,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_sbinuptime() -> i64 {
    let _fake = FakeWork::begin();
    // Exact for whole microseconds (the 32.32 fraction of us / 10^6, floored, read back by
    // sbt_to_us as the same us).
    let us = clock_us();
    (((us / 1_000_000) << 32) + (((us % 1_000_000) << 32).div_ceil(1_000_000))) as i64
}

/// DELAY(9) calls since [`reset`]: `(all, with a mutex held)`. Not logged (bring-up makes
/// thousands); a spin with our controller mutex held is what the lock rule forbids for waits.
pub fn delays() -> (u64, u64) {
    DELAYS.with(|c| c.get())
}

#[no_mangle]
pub unsafe extern "C" fn DELAY(us: c_int) {
    let _fake = FakeWork::begin();
    let us = u64::try_from(us).unwrap_or(0);
    advance_clock(us);
    let held = MTX_HELD.with(|h| !h.borrow().is_empty());
    DELAYS.with(|c| {
        let (all, locked) = c.get();
        c.set((all + 1, locked + u64::from(held)));
    });
}

/// Runs `f` at every pause(9), as another thread would run while this one sleeps (e.g. the
/// device finishing a command); `None` removes it. Cleared by [`reset`].
pub fn on_pause(f: Option<fn()>) {
    ON_PAUSE.with(|c| c.set(f));
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pause_ms(_w: *const c_char, ms: c_int) {
    let _fake = FakeWork::begin();
    record(format!("pause {ms} ms"));
    paused(u64::try_from(ms).unwrap_or(0) * 1000);
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pause_us(w: *const c_char, us: c_int) {
    let _fake = FakeWork::begin();
    record(format!("pause {us} us {}", cstr(w)));
    paused(u64::try_from(us).unwrap_or(0));
}

/// What every fake pause(9) does after recording itself: time passes, other threads run.
fn paused(us: u64) {
    advance_clock(us);
    if let Some(f) = ON_PAUSE.with(|c| c.get()) {
        f();
    }
    // A wait that never ends fails the test instead of hanging it.
    let n = LOG.with(|l| l.borrow().iter().filter(|x| x.starts_with("pause ")).count());
    assert!(n < 10_000, "pause(9) called {n} times: a wait never ended");
}

#[no_mangle]
pub unsafe extern "C" fn contigmalloc(size: u64, _t: *mut malloc_type, _f: c_int, _lo: u64, _hi: u64, align: u64, _b: u64) -> *mut c_void {
    let _fake = FakeWork::begin();
    count_allocation();
    // SAFETY: libc; the size rounded up to the alignment as aligned_alloc requires.
    let p = unsafe { aligned_alloc(align as usize, (size as usize).div_ceil(align as usize) * align as usize) };
    if !p.is_null() {
        // SAFETY: M_ZERO, as every caller asks.
        unsafe { core::ptr::write_bytes(p.cast::<u8>(), 0, size as usize) };
    }
    record(format!("contigmalloc {size} = {p:p}"));
    p
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_contig_free(va: *mut c_void) {
    let _fake = FakeWork::begin();
    record(format!("contig_free {va:p}"));
    // SAFETY: memory from the fake contigmalloc (libc), freed once by the wrapper; libc's
    // free ignores the malloc-type argument.
    unsafe { bindings::free(va, core::ptr::null_mut()) }
}

#[no_mangle]
pub unsafe extern "C" fn pmap_kextract(va: u64) -> u64 {
    let _fake = FakeWork::begin();
    va
}

#[no_mangle]
pub unsafe extern "C" fn destroy_dev_drain(_csw: *mut cdevsw) {
    let _fake = FakeWork::begin();
    record("destroy_dev_drain");
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_release_msi(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    record("pci_release_msi");
    0
}

/// ENODEV of sys/sys/errno.h (the Rust side never returns it, so bindgen does not export it).
const ENODEV: c_int = 19;

/// pci.c pci_alloc_msix_method: ENODEV without the capability, ENXIO unless the memory BARs
/// of the MSI-X table and of the PBA are allocated and active; then at most the vectors the
/// function offers.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_alloc_msix(_dev: device_t, count: *mut c_int) -> c_int {
    let _fake = FakeWork::begin();
    let k = knobs();
    // SAFETY: valid in/out count from the wrapper.
    let want = unsafe { *count };
    if k.msix_count == 0 {
        record(format!("pci_alloc_msix want={want} = ENODEV"));
        return ENODEV;
    }
    if k.msix_alloc_error != 0 {
        record(format!("pci_alloc_msix want={want} = error {}", k.msix_alloc_error));
        return k.msix_alloc_error;
    }
    let active = active_memory_rids();
    if !active.contains(&k.msix_table_rid) || !active.contains(&k.msix_pba_rid) {
        record(format!("pci_alloc_msix want={want} = ENXIO (table/PBA BAR not active)"));
        return bindings::ENXIO;
    }
    let got = want.min(k.msix_count);
    // SAFETY: as above.
    unsafe { *count = got };
    record(format!("pci_alloc_msix want={want} got={got}"));
    0
}

/// pci.c pci_alloc_msi_method: ENODEV without the capability.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_alloc_msi(_dev: device_t, count: *mut c_int) -> c_int {
    let _fake = FakeWork::begin();
    let k = knobs();
    // SAFETY: valid in/out count from the wrapper.
    let want = unsafe { *count };
    if k.msi_count == 0 {
        record(format!("pci_alloc_msi want={want} = ENODEV"));
        return ENODEV;
    }
    let got = want.min(k.msi_count);
    // SAFETY: as above.
    unsafe { *count = got };
    record(format!("pci_alloc_msi want={want} got={got}"));
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_msi_count(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    knobs().msi_count
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_msix_table_bar(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    let k = knobs();
    if k.msix_count > 0 { k.msix_table_rid } else { -1 }
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_msix_pba_bar(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    let k = knobs();
    if k.msix_count > 0 { k.msix_pba_rid } else { -1 }
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_enable_busmaster(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    record("pci_enable_busmaster");
    COMMAND.with(|c| c.set(c.get() | PCIM_CMD_BUSMASTEREN as u16));
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_disable_busmaster(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    record("pci_disable_busmaster");
    if !knobs().busmaster_stuck {
        COMMAND.with(|c| c.set(c.get() & !(PCIM_CMD_BUSMASTEREN as u16)));
    }
    0
}

// --- a fake ACPI PCI bus: \_SB_.PCI0 (pcib0 -> pci0) with one _EJ0 slot S18_ = PCI slot 3 ---
// --- and, in the q35 layouts, a root port S20_ (pcib1 -> pci1) with the slot S20_.S00_ -------

/// pcib0, pci0, the slot object and the PCI0 object.
pub const PCIB0: usize = 0xb0;
pub const PCI0: usize = 0xb1;
pub const SLOT3: usize = 0x5103;
pub const PCI0_ACPI: usize = 0x9c10;
/// The root port's slot on pci0 and the bus number of its secondary bus (the lab's numbering:
/// the bus number is the port's slot).
pub const RP_SLOT: u8 = 4;
pub const PCI1_BUS: u8 = 4;
/// pci1, the root port's secondary bus (the root port, pcib1, is pci0's function 4.0:
/// [`pcib1`]).
pub const PCI1: usize = 0xb3;
/// The root port's object `S20_` (no `_EJ0`) and its hotplug slot `S20_.S00_`.
pub const ROOT_PORT_ACPI: usize = 0x5120;
pub const RP_SLOT_ACPI: usize = 0x5200;
/// The LPC bridge `SF8_` (pci0 slot 31, no `_EJ0`) and its child `SF8_.KBD_` (no `_EJ0`, no
/// `_ADR`), in the q35 layout.
pub const LPC_ACPI: usize = 0x51f8;
pub const KBD_ACPI: usize = 0x5300;

/// The root port's device_t (pcib1): pci0's function `RP_SLOT`.0.
pub fn pcib1() -> device_t {
    function_device(RP_SLOT, 0)
}

fn has_root_port() -> bool {
    knobs().layout != Layout::I440fx
}

/// One PCI function of the fake pci0.
#[derive(Clone, Copy, Debug)]
pub struct FakeFn {
    /// Vendor ID config reads return (0xffff: nothing answers).
    pub vendor: u32,
    /// `PCIR_HDRTYPE` (bit 7: multi-function).
    pub hdrtype: u8,
    /// newbus has a device_t for it.
    pub child: bool,
}

/// Puts a device (vendor `vendor`) into slot 3, with a device_t (as after an attach).
pub fn insert_slot3(vendor: u32) {
    set_function(3, 0, FakeFn { vendor, hdrtype: 0, child: true });
}

/// Sets what `slot`.`func` of pci0 answers and whether it has a device_t.
pub fn set_function(slot: u8, func: u8, f: FakeFn) {
    set_function_on(0, slot, func, f);
}

/// [`set_function`] on the pci bus numbered `bus` (0: pci0, [`PCI1_BUS`]: pci1).
pub fn set_function_on(bus: u8, slot: u8, func: u8, f: FakeFn) {
    FUNCS.with(|m| m.borrow_mut().insert((bus, slot, func), f));
}

/// The state of pci0's `slot`.`func` (absent: nothing answers, no device_t).
pub fn function(slot: u8, func: u8) -> FakeFn {
    function_on(0, slot, func)
}

/// [`function`] on the pci bus numbered `bus`.
pub fn function_on(bus: u8, slot: u8, func: u8) -> FakeFn {
    FUNCS.with(|m| m.borrow().get(&(bus, slot, func)).copied()).unwrap_or(FakeFn { vendor: 0xffff, hdrtype: 0xff, child: false })
}

/// Every config read through pcib0 since `reset`: (slot, function, register).
pub fn config_reads() -> Vec<(u8, u8, u32)> {
    CONFIG_READS.with(|r| r.borrow().clone())
}

/// What PCIB_MAXFUNCS answers from now on (above 7: ARI).
pub fn set_max_funcs(n: c_int) {
    MAX_FUNCS.with(|m| m.set(n));
}

/// The device_t pci0 has for `slot`.`func`: slot 3 function 0 is [`fake_device`] (the
/// controller the other tests attach); the others get an address of their own.
pub fn function_device(slot: u8, func: u8) -> device_t {
    function_device_on(0, slot, func)
}

/// The device_t of `slot`.`func` on the pci bus numbered `bus` (a bus of its own: pci1's
/// slot 0 is not pci0's slot 0).
pub fn function_device_on(bus: u8, slot: u8, func: u8) -> device_t {
    if (bus, slot, func) == (0, 3, 0) {
        fake_device()
    } else {
        (0xd000 + (usize::from(bus) << 8) + (usize::from(slot) << 3) + usize::from(func)) as device_t
    }
}

/// (bus number, slot, function) of a function's device_t.
fn function_of(dev: device_t) -> Option<(u8, u8, u8)> {
    match dev as usize {
        0xde71ce => Some((0, 3, 0)),
        a @ 0xd000..=0xdfff => Some((((a - 0xd000) >> 8) as u8, ((a & 0xff) >> 3) as u8, (a & 7) as u8)),
        _ => None,
    }
}

/// "slot.func" on pci0, "bus:slot.func" elsewhere, for the log.
fn function_name((b, s, f): (u8, u8, u8)) -> String {
    if b == 0 { format!("{s}.{f}") } else { format!("{b}:{s}.{f}") }
}

#[no_mangle]
pub unsafe extern "C" fn device_get_parent(dev: device_t) -> device_t {
    let _fake = FakeWork::begin();
    match (dev as usize, function_of(dev)) {
        (PCI0, _) => PCIB0 as device_t,
        (PCI1, _) => pcib1(),
        (_, Some((0, _, _))) => PCI0 as device_t,
        (_, Some((PCI1_BUS, _, _))) => PCI1 as device_t,
        _ => core::ptr::null_mut(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn device_get_softc(dev: device_t) -> *mut c_void {
    let _fake = FakeWork::begin();
    if let Some(d) = newbus_dev(dev) {
        return d.softc as *mut c_void;
    }
    if SOFTC.with(|s| s.get()) == 0 {
        SOFTC.with(|s| s.set(leak::<nvmehp_softc>() as usize));
    }
    SOFTC.with(|s| s.get()) as *mut c_void
}

#[no_mangle]
pub unsafe extern "C" fn AcpiGetHandle(parent: ACPI_HANDLE, path: *const c_char, out: *mut ACPI_HANDLE) -> u32 {
    let _fake = FakeWork::begin();
    let path = cstr(path);
    let found = match (parent as usize, path.as_str()) {
        (0, "\\_SB_.PCI0") => Some(PCI0_ACPI),
        (SLOT3, "_EJ0") | (SLOT3, "_OST") => Some(SLOT3 + 0x1000),
        (RP_SLOT_ACPI, "_EJ0") | (RP_SLOT_ACPI, "_OST") => Some(RP_SLOT_ACPI + 0x1000),
        _ => None,
    };
    match found {
        Some(h) => {
            // SAFETY: valid out pointer from the wrapper.
            unsafe { *out = h as ACPI_HANDLE };
            NVMEHP_AE_OK
        }
        None => NVMEHP_AE_NOT_FOUND,
    }
}

#[no_mangle]
pub unsafe extern "C" fn AcpiWalkNamespace(
    _ty: u32,
    start: ACPI_HANDLE,
    _depth: u32,
    cb: ACPI_WALK_CALLBACK,
    _asc: ACPI_WALK_CALLBACK,
    ctx: *mut c_void,
    _ret: *mut *mut c_void,
) -> u32 {
    let _fake = FakeWork::begin();
    let children: &[usize] = match (start as usize, knobs().layout) {
        (PCI0_ACPI, Layout::I440fx) => &[SLOT3],
        (PCI0_ACPI, Layout::Q35) => &[ROOT_PORT_ACPI, LPC_ACPI],
        (PCI0_ACPI, Layout::Both) => &[SLOT3, ROOT_PORT_ACPI],
        (ROOT_PORT_ACPI, Layout::Q35 | Layout::Both) => &[RP_SLOT_ACPI],
        (LPC_ACPI, Layout::Q35) => &[KBD_ACPI],
        _ => &[],
    };
    for &c in children {
        // SAFETY: the wrapper's callback and context.
        unsafe { cb.unwrap()(c as ACPI_HANDLE, 1, ctx, core::ptr::null_mut()) };
    }
    NVMEHP_AE_OK
}

#[no_mangle]
pub unsafe extern "C" fn acpi_get_device(h: ACPI_HANDLE) -> device_t {
    let _fake = FakeWork::begin();
    match h as usize {
        PCI0_ACPI => PCIB0 as device_t,
        _ => core::ptr::null_mut(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn device_find_child(dev: device_t, class: *const c_char, _unit: c_int) -> device_t {
    let _fake = FakeWork::begin();
    match (dev, cstr(class).as_str()) {
        (d, "pci") if d as usize == PCIB0 => PCI0 as device_t,
        (d, "pci") if d == pcib1() && has_root_port() => PCI1 as device_t,
        _ => core::ptr::null_mut(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn acpi_GetInteger(h: ACPI_HANDLE, path: *const c_char, out: *mut u32) -> u32 {
    let _fake = FakeWork::begin();
    let adr = match h as usize {
        SLOT3 => 3 << 16,
        ROOT_PORT_ACPI => u32::from(RP_SLOT) << 16,
        RP_SLOT_ACPI => 0,
        LPC_ACPI => 0x1f << 16,
        _ => return NVMEHP_AE_NOT_FOUND,
    };
    if cstr(path) != "_ADR" {
        return NVMEHP_AE_NOT_FOUND;
    }
    // SAFETY: valid out pointer.
    unsafe { *out = adr };
    NVMEHP_AE_OK
}

#[no_mangle]
pub unsafe extern "C" fn acpi_SetInteger(h: ACPI_HANDLE, path: *const c_char, v: u32) -> u32 {
    let _fake = FakeWork::begin();
    record(format!("acpi_SetInteger {h:p} {}({v})", cstr(path)));
    let ejected = match h as usize {
        SLOT3 => Some((0, 3)),
        RP_SLOT_ACPI => Some((PCI1_BUS, 0)),
        _ => None,
    };
    if let (Some((bus, slot)), "_EJ0") = (ejected, cstr(path).as_str()) {
        // The platform removes the device: none of the slot's functions answers any more.
        FUNCS.with(|m| m.borrow_mut().iter_mut().filter(|((b, s, _), _)| (*b, *s) == (bus, slot)).for_each(|(_, f)| f.vendor = 0xffff));
    }
    NVMEHP_AE_OK
}

#[no_mangle]
pub unsafe extern "C" fn AcpiEvaluateObject(h: ACPI_HANDLE, path: ACPI_STRING, args: *mut ACPI_OBJECT_LIST, _ret: *mut ACPI_BUFFER) -> u32 {
    let _fake = FakeWork::begin();
    // SAFETY: the wrapper passes a list of initialised integer objects first.
    let (a0, a1) = unsafe {
        let l = &*args;
        let p = l.Pointer;
        ((*p).Integer.Value, (*p.add(1)).Integer.Value)
    };
    record(format!("AcpiEvaluateObject {h:p} {}({a0:#x}, {a1:#x})", cstr(path)));
    NVMEHP_AE_OK
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_acpi_get_handle(_dev: device_t) -> ACPI_HANDLE {
    let _fake = FakeWork::begin();
    // No bus is acpi_pci's here: nobody else handles the slots (stock FreeBSD, acpi_pci on
    // pci0 and on the ports' buses, runs on the .ko: kldhost --acpi-pci).
    core::ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pcib_get_domain(_bus: device_t) -> u32 {
    let _fake = FakeWork::begin();
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pcib_get_bus(bus: device_t) -> u32 {
    let _fake = FakeWork::begin();
    if bus as usize == PCI1 { u32::from(PCI1_BUS) } else { 0 }
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pcib_read_config(_pcib: device_t, b: u32, slot: u32, func: u32, reg: u32, w: c_int) -> u32 {
    let _fake = FakeWork::begin();
    let (slot, func) = (slot as u8, func as u8);
    CONFIG_READS.with(|r| r.borrow_mut().push((slot, func, reg)));
    let f = function_on(b as u8, slot, func);
    let ones = if w == 4 { u32::MAX } else { (1u32 << (8 * w)) - 1 };
    match reg {
        _ if f.vendor == 0xffff => ones,
        0 => f.vendor,
        0x0e => u32::from(f.hdrtype),
        _ => 0,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pcib_maxfuncs(_pcib: device_t) -> c_int {
    let _fake = FakeWork::begin();
    MAX_FUNCS.with(|m| m.get())
}

#[no_mangle]
pub unsafe extern "C" fn pci_find_dbsf(_d: u32, b: u8, slot: u8, func: u8) -> device_t {
    let _fake = FakeWork::begin();
    if function_on(b, slot, func).child { function_device_on(b, slot, func) } else { core::ptr::null_mut() }
}

/// A devinfo names its function: (bus << 16 | slot << 8 | func) + 1, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn pci_read_device(pcib: device_t, bus: device_t, _d: c_int, b: c_int, s: c_int, f: c_int) -> *mut pci_devinfo {
    let _fake = FakeWork::begin();
    let k = (b as u8, s as u8, f as u8);
    record(format!("pci_read_device pcib={pcib:p} bus={bus:p} {}", function_name(k)));
    if function_on(k.0, k.1, k.2).vendor == 0xffff {
        return core::ptr::null_mut();
    }
    (((b as usize) << 16 | (s as usize) << 8 | f as usize) + 1) as *mut pci_devinfo
}

#[no_mangle]
pub unsafe extern "C" fn pci_add_child(bus: device_t, dinfo: *mut pci_devinfo) {
    let _fake = FakeWork::begin();
    let a = dinfo as usize - 1;
    let k = ((a >> 16) as u8, (a >> 8) as u8, (a & 0xff) as u8);
    record(format!("pci_add_child bus={bus:p} {}", function_name(k)));
    FUNCS.with(|m| {
        m.borrow_mut().entry(k).and_modify(|x| x.child = true);
    });
}

/// Runs `f` (with the device) after every device_probe_and_attach, as the other threads that
/// take the topology lock while it sleeps: a driver's DEVICE_ATTACH sleeps (ours and nvme(4)'s
/// bring the controller up with pause_sbt), and a sleeping thread gives up Giant.
pub fn on_probed(f: Option<fn(device_t)>) {
    ON_PROBED.with(|c| c.set(f));
}

/// Records, besides the call, the probe of a device_t newbus has already freed (`freed
/// device_t`): a use after free in the kernel.
#[no_mangle]
pub unsafe extern "C" fn device_probe_and_attach(dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    let k = function_of(dev).expect("probe of a device no pci bus has");
    let name = function_name(k);
    record(format!("device_probe_and_attach {name}"));
    if !function_on(k.0, k.1, k.2).child {
        record(format!("device_probe_and_attach {name}: freed device_t"));
        return 0;
    }
    if let Some(h) = ON_PROBED.with(|c| c.get()) {
        h(dev);
    }
    // A function that stopped answering during its probe and attach (the hook removed it):
    // the driver's attach read all-ones and failed, as nvmehp_attach does ("bring-up failed:
    // controller gone"); device_attach returns its error and keeps the child, driverless.
    if function_on(k.0, k.1, k.2).vendor == 0xffff {
        record(format!("device_attach {name}: attach returned {}", bindings::ENXIO));
        return bindings::ENXIO as c_int;
    }
    0
}

/// Runs `f` (once per successful device_detach, with the device) as the other threads that
/// take the topology lock while a device_detach sleeps: DEVICE_DETACH (our teardown) sleeps,
/// and a sleeping thread gives up Giant, which is `bus_topo_lock` (sys/kern/subr_bus.c). So
/// when device_detach returns, the device_t may have been deleted (`devctl delete`, a
/// `BUS_RESCAN`) or given a driver again (`devctl attach`, a driver loaded meanwhile).
pub fn on_detached(f: Option<fn(device_t)>) {
    ON_DETACHED.with(|c| c.set(f));
}

#[no_mangle]
pub unsafe extern "C" fn device_detach(dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("device_detach {dev:p}"));
    let e = newbus_detach(dev);
    if e == 0 {
        // A pci0 function outside the newbus model has no driver after a detach
        // (device_detach: DS_NOTPRESENT, device_set_driver(dev, NULL)).
        if let (None, Some(k)) = (newbus_dev(dev), function_of(dev)) {
            DRIVERS.with(|d| d.borrow_mut().insert(k, None));
        }
        if let Some(f) = ON_DETACHED.with(|c| c.get()) {
            f(dev);
        }
    }
    e
}

/// Another thread's `device_delete_child` of pci0's `slot`.`func` (while ours slept): the
/// device_t is freed; a later one for the function starts with no recorded driver.
pub fn delete_function_child(slot: u8, func: u8) {
    record(format!("(another thread) device_delete_child {slot}.{func}"));
    FUNCS.with(|m| {
        m.borrow_mut().entry((0, slot, func)).and_modify(|x| x.child = false);
    });
    DRIVERS.with(|d| d.borrow_mut().remove(&(0, slot, func)));
}

/// Records, besides the call, what would be a bug in the kernel: deleting a device_t newbus
/// has already freed (`freed device_t`), or one another driver has attached (`detaches
/// <driver>`: device_delete_child detaches first, sys/kern/subr_bus.c).
#[no_mangle]
pub unsafe extern "C" fn device_delete_child(_bus: device_t, dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("device_delete_child {dev:p}"));
    if let Some(k) = function_of(dev) {
        if !function_on(k.0, k.1, k.2).child {
            record(format!("device_delete_child {dev:p}: freed device_t"));
            return 0;
        }
        if let Some(Some(name)) = driver_entry(dev) {
            record(format!("device_delete_child {dev:p}: detaches {}", name.to_string_lossy()));
        }
        FUNCS.with(|m| {
            m.borrow_mut().entry(k).and_modify(|x| x.child = false);
        });
        DRIVERS.with(|d| d.borrow_mut().remove(&k));
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_sysctl_ctx_create() -> *mut sysctl_ctx_list {
    let _fake = FakeWork::begin();
    record("sysctl_ctx_create");
    leak::<sysctl_ctx_list>()
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_sysctl_ctx_destroy(_ctx: *mut sysctl_ctx_list) {
    let _fake = FakeWork::begin();
    record("sysctl_ctx_destroy");
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_dev_sysctl_string(_ctx: *mut sysctl_ctx_list, _dev: device_t, name: *const c_char, value: *const c_char, _d: *const c_char) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("sysctl_add_string {}={}", cstr(name), cstr(value)));
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_dev_sysctl_u64(_ctx: *mut sysctl_ctx_list, _dev: device_t, name: *const c_char, _p: *mut u64, _d: *const c_char) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("sysctl_add_u64 {}", cstr(name)));
    0
}

#[no_mangle]
pub unsafe extern "C" fn devclass_find(name: *const c_char) -> devclass_t {
    let _fake = FakeWork::begin();
    let name = cstr(name);
    if name == "nvmehp" && NEWBUS.with(|n| !n.borrow().is_empty()) { NVMEHP_DEVCLASS as devclass_t } else { core::ptr::null_mut() }
}

#[no_mangle]
pub unsafe extern "C" fn devclass_get_maxunit(dc: devclass_t) -> c_int {
    let _fake = FakeWork::begin();
    if dc as usize == NVMEHP_DEVCLASS { NEWBUS.with(|n| n.borrow().len() as c_int) } else { -1 }
}

#[no_mangle]
pub unsafe extern "C" fn devclass_get_device(dc: devclass_t, unit: c_int) -> device_t {
    let _fake = FakeWork::begin();
    if dc as usize != NVMEHP_DEVCLASS || unit < 0 {
        return core::ptr::null_mut();
    }
    NEWBUS.with(|n| n.borrow().get(unit as usize).map_or(core::ptr::null_mut(), |(d, _)| *d as device_t))
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_tunable_acpi_mode(buf: *mut c_char, len: c_int) {
    let _fake = FakeWork::begin();
    let v = b"auto\0";
    // SAFETY: the wrapper passes a buffer of `len` bytes.
    unsafe { core::ptr::copy_nonoverlapping(v.as_ptr().cast(), buf, v.len().min(len as usize)) };
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_tunable_rescan_interval_ms() -> u32 {
    let _fake = FakeWork::begin();
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_tunable_claim() -> c_int {
    let _fake = FakeWork::begin();
    knobs().claim
}

/// `hw.nvme_hotplug.{io_queues,io_entries,cmd_timeout_ms}` (defaults; the last is a knob).
#[no_mangle]
pub unsafe extern "C" fn nvmehp_tunable_io_queues() -> u32 {
    let _fake = FakeWork::begin();
    1
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_tunable_io_entries() -> u32 {
    let _fake = FakeWork::begin();
    64
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_tunable_cmd_timeout_ms() -> u32 {
    let _fake = FakeWork::begin();
    match knobs().cmd_timeout_ms {
        0 => 30_000,
        ms => ms,
    }
}

/// QEMU's NVMe IDs (1b36:0010, subsystem 1af4:1100): what a disk reports as its HBA.
#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_vendor(_dev: device_t) -> u16 {
    0x1b36
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_device(_dev: device_t) -> u16 {
    0x0010
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_subvendor(_dev: device_t) -> u16 {
    0x1af4
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_subdevice(_dev: device_t) -> u16 {
    0x1100
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_class(_dev: device_t) -> u8 {
    let _fake = FakeWork::begin();
    knobs().pci_class[0]
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_subclass(_dev: device_t) -> u8 {
    let _fake = FakeWork::begin();
    knobs().pci_class[1]
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_progif(_dev: device_t) -> u8 {
    let _fake = FakeWork::begin();
    knobs().pci_class[2]
}

#[no_mangle]
pub unsafe extern "C" fn device_set_desc(_dev: device_t, desc: *const c_char) {
    let _fake = FakeWork::begin();
    record(format!("device_set_desc {}", cstr(desc)));
}

#[no_mangle]
pub unsafe extern "C" fn device_get_nameunit(dev: device_t) -> *const c_char {
    let _fake = FakeWork::begin();
    match dev as usize {
        PCI0 => c"pci0".as_ptr(),
        PCI1 => c"pci1".as_ptr(),
        _ => c"nvmehp0".as_ptr(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn device_get_name(dev: device_t) -> *const c_char {
    let _fake = FakeWork::begin();
    match driver_entry(dev) {
        Some(Some(name)) => name.as_ptr(),
        Some(None) => core::ptr::null(),
        None => c"nvmehp".as_ptr(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn device_get_unit(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_slot(dev: device_t) -> u8 {
    let _fake = FakeWork::begin();
    function_of(dev).map_or(3, |(_, s, _)| s)
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_get_function(dev: device_t) -> u8 {
    let _fake = FakeWork::begin();
    function_of(dev).map_or(0, |(_, _, f)| f)
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_pci_msix_count(_dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    knobs().msix_count
}

#[no_mangle]
pub unsafe extern "C" fn bus_topo_lock() {
    let _fake = FakeWork::begin();
    record("bus_topo_lock");
}

#[no_mangle]
pub unsafe extern "C" fn bus_topo_unlock() {
    let _fake = FakeWork::begin();
    record("bus_topo_unlock");
}

#[no_mangle]
pub unsafe extern "C" fn disk_create(d: *mut disk, version: c_int) {
    let _fake = FakeWork::begin();
    // SAFETY: the wrapper's disk.
    let d = unsafe { &*d };
    record(format!(
        "disk_create version={version:#x} name={} unit={} sector={} media={} maxsize={} ident={} descr={} strategy={} gone={}",
        cstr(d.d_name), d.d_unit, d.d_sectorsize, d.d_mediasize, d.d_maxsize,
        cstr(d.d_ident.as_ptr()), cstr(d.d_descr.as_ptr()), d.d_strategy.is_some(), d.d_gone.is_some()
    ));
}

#[no_mangle]
pub unsafe extern "C" fn disk_gone(d: *mut disk) {
    let _fake = FakeWork::begin();
    record("disk_gone");
    if knobs().d_gone_at_once {
        geom_disk_gone(d);
    }
}

#[no_mangle]
pub unsafe extern "C" fn disk_destroy(_d: *mut disk) {
    let _fake = FakeWork::begin();
    // What MOD_UNLOAD would see at this moment (it must still count this disk).
    record(format!("disk_destroy disks_live={}", super::kernel::disks_live()));
}

#[no_mangle]
pub unsafe extern "C" fn biodone(bp: *mut bio) {
    let _fake = FakeWork::begin();
    // SAFETY: the wrapper's bio.
    let b = unsafe { &*bp };
    record(format!("biodone error={} flags={:#x} resid={}", b.bio_error, b.bio_flags, b.bio_resid));
    BIODONES.with(|m| *m.borrow_mut().entry(bp as usize).or_insert(0) += 1);
}

std::thread_local! {
    /// biodone calls per bio (by address) since the bio was made by [`new_bio`].
    static BIODONES: RefCell<std::collections::BTreeMap<usize, u32>> = const { RefCell::new(std::collections::BTreeMap::new()) };
}

/// How many times `bp` was completed since [`new_bio`] made it.
pub fn biodone_count(bp: *mut bio) -> u32 {
    BIODONES.with(|m| m.borrow().get(&(bp as usize)).copied().unwrap_or(0))
}

/// A fresh fake bio.
pub fn new_bio(cmd: u16, offset: i64, bcount: i64) -> *mut bio {
    let b = leak::<bio>();
    BIODONES.with(|m| m.borrow_mut().remove(&(b as usize)));
    // SAFETY: fresh fake bio.
    unsafe {
        (*b).bio_cmd = cmd;
        (*b).bio_offset = offset;
        (*b).bio_bcount = bcount;
    }
    b
}

/// A device_t for wrappers that only pass it through to the fakes.
pub fn fake_device() -> bindings::device_t {
    0xde71ce as bindings::device_t
}

// --- a newbus model for the devices of devclass nvmehp (sys/kern/subr_bus.c) ---------------
//
// Devices added with [`newbus_add`] behave as FreeBSD 15's subr_bus.c makes them; every other
// device_t keeps the simple fakes above (always "attached", one shared softc, detach = 0).
// - The devclass is fixed (`devctl set driver -f nvmeN nvmehp`, DF_FIXEDCLASS): a device stays
//   in devclass nvmehp after a failed attach or a detach, as device_attach and device_detach
//   only delete non-fixed devices from their devclass.
// - device_get_softc is NULL unless a driver is set: device_set_driver frees the softc when
//   the driver is cleared (after a failed attach, after detach) and allocates a zeroed one
//   when a driver is set (probe, attach).
// - device_is_attached: state >= DS_ATTACHED.
// - device_busy/device_unbusy count; device_detach refuses a busy device with EBUSY and a
//   device in DS_ATTACHING with EBUSY, returns 0 without calling DEVICE_DETACH for one that is
//   not attached, and otherwise calls our nvmehp_detach; on success the driver is cleared.

const NVMEHP_DEVCLASS: usize = 0xdc0;

/// The newbus state of one modelled device (`device_state_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevState {
    /// DS_NOTPRESENT: no driver (a failed attach, a detach); softc NULL.
    NotPresent,
    /// DS_ALIVE: probed, driver set, softc allocated and zeroed, not attached.
    Alive,
    /// DS_ATTACHING: DEVICE_ATTACH is running.
    Attaching,
    /// DS_ATTACHED.
    Attached,
}

#[derive(Clone, Copy, Debug)]
struct FakeDev {
    state: DevState,
    /// The softc (0: NULL).
    softc: usize,
    busy: u32,
}

fn newbus_dev(dev: device_t) -> Option<FakeDev> {
    NEWBUS.with(|n| n.borrow().iter().find(|(d, _)| *d == dev as usize).map(|(_, f)| *f))
}

fn newbus_set(dev: device_t, f: impl FnOnce(&mut FakeDev)) {
    NEWBUS.with(|n| {
        let mut n = n.borrow_mut();
        let e = n.iter_mut().find(|(d, _)| *d == dev as usize).expect("device not in the newbus model");
        f(&mut e.1)
    })
}

/// Adds `dev` to devclass nvmehp (the next unit), not attached: as `devctl set driver -f`
/// leaves a device whose attach has not run yet.
pub fn newbus_add(dev: device_t) {
    NEWBUS.with(|n| n.borrow_mut().push((dev as usize, FakeDev { state: DevState::NotPresent, softc: 0, busy: 0 })));
}

/// The modelled state of `dev`.
pub fn newbus_state(dev: device_t) -> DevState {
    newbus_dev(dev).expect("device not in the newbus model").state
}

/// The modelled busy count of `dev`.
pub fn newbus_busy(dev: device_t) -> u32 {
    newbus_dev(dev).expect("device not in the newbus model").busy
}

fn set_driver(dev: device_t, on: bool) {
    newbus_set(dev, |d| {
        if d.softc != 0 {
            // SAFETY: a softc this model allocated with `leak` (Box) and not freed since.
            drop(unsafe { Box::from_raw(d.softc as *mut nvmehp_softc) });
            d.softc = 0;
        }
        if on {
            d.softc = leak::<nvmehp_softc>() as usize;
        }
    });
}

/// device_probe: the driver is set (fresh zeroed softc) and the device is DS_ALIVE.
pub fn newbus_probe(dev: device_t) {
    set_driver(dev, true);
    newbus_set(dev, |d| d.state = DevState::Alive);
}

/// device_attach: DS_ATTACHING, DEVICE_ATTACH (our nvmehp_attach), then DS_ATTACHED, or on
/// failure the driver cleared (softc freed: NULL) and DS_NOTPRESENT.
pub fn newbus_attach(dev: device_t) -> c_int {
    if newbus_state(dev) != DevState::Alive {
        newbus_probe(dev);
    }
    newbus_set(dev, |d| d.state = DevState::Attaching);
    // SAFETY: what newbus does: our DEVICE_ATTACH on a device whose driver is nvmehp.
    let e = unsafe { super::pci_driver::nvmehp_attach(dev) };
    if e == 0 {
        newbus_set(dev, |d| d.state = DevState::Attached);
    } else {
        set_driver(dev, false);
        newbus_set(dev, |d| d.state = DevState::NotPresent);
    }
    e
}

fn newbus_detach(dev: device_t) -> c_int {
    let Some(d) = newbus_dev(dev) else { return 0 };
    if d.busy > 0 {
        record(format!("device_detach {dev:p} refused: busy"));
        return EBUSY;
    }
    if d.state == DevState::Attaching {
        return EBUSY;
    }
    if d.state != DevState::Attached {
        return 0;
    }
    // SAFETY: what newbus does: our DEVICE_DETACH on an attached nvmehp device.
    let e = unsafe { super::pci_driver::nvmehp_detach(dev) };
    if e == 0 {
        newbus_set(dev, |d| d.state = DevState::NotPresent);
        set_driver(dev, false);
    }
    e
}

#[no_mangle]
pub unsafe extern "C" fn device_is_attached(dev: device_t) -> c_int {
    let _fake = FakeWork::begin();
    newbus_dev(dev).map_or(1, |d| c_int::from(d.state == DevState::Attached))
}

#[no_mangle]
pub unsafe extern "C" fn device_get_state(dev: device_t) -> device_state_t {
    let _fake = FakeWork::begin();
    match newbus_dev(dev).map_or(DevState::Attached, |d| d.state) {
        DevState::NotPresent => DS_NOTPRESENT,
        DevState::Alive => DS_ALIVE,
        DevState::Attaching => DS_ATTACHING,
        DevState::Attached => DS_ATTACHED,
    }
}

#[no_mangle]
pub unsafe extern "C" fn device_busy(dev: device_t) {
    let _fake = FakeWork::begin();
    record(format!("device_busy {dev:p}"));
    if newbus_dev(dev).is_some() {
        newbus_set(dev, |d| d.busy += 1);
    }
}

#[no_mangle]
pub unsafe extern "C" fn device_unbusy(dev: device_t) {
    let _fake = FakeWork::begin();
    record(format!("device_unbusy {dev:p}"));
    if newbus_dev(dev).is_some() {
        newbus_set(dev, |d| {
            assert!(d.busy > 0, "device_unbusy of a device that is not busy");
            d.busy -= 1
        });
    }
}

/// What newbus's driver_module_handler (sys/kern/subr_bus.c) and the kernel linker's
/// linker_file_unload (sys/kern/kern_linker.c) do around our module event handler at
/// kldunload, for the devices of the model: MOD_QUIESCE first asks every device
/// (device_quiesce: EBUSY for a busy one), then our handler; a veto ends the unload unless
/// `force` (kldunload -f: the quiesce still runs, its error is ignored). MOD_UNLOAD first
/// detaches every attached device (the first error ends it, and our handler is not called),
/// then calls our handler. Returns what kldunload(2) would.
pub fn kldunload(force: bool) -> c_int {
    use super::module::nvmehp_modevent;
    let (null, arg) = (core::ptr::null_mut(), core::ptr::null_mut());
    let devs: Vec<usize> = NEWBUS.with(|n| n.borrow().iter().map(|(d, _)| *d).collect());
    record("kldunload: MOD_QUIESCE");
    let mut q = devs.iter().find_map(|&d| (newbus_busy(d as device_t) > 0).then_some(EBUSY)).unwrap_or(0);
    if q == 0 {
        q = nvmehp_modevent(null, MOD_QUIESCE as c_int, arg);
    }
    if q != 0 && !force {
        return q;
    }
    record("kldunload: MOD_UNLOAD");
    for &d in &devs {
        // SAFETY: the fake device_detach (records, then the model's detach).
        let e = unsafe { device_detach(d as device_t) };
        if e != 0 {
            return e;
        }
    }
    nvmehp_modevent(null, MOD_UNLOAD as c_int, arg)
}

/// kldload: driver_module_handler calls our MOD_LOAD, then overwrites its result with
/// devclass_add_driver's (0 here): the module is loaded whatever our handler returned.
pub fn kldload() -> c_int {
    let (null, arg) = (core::ptr::null_mut(), core::ptr::null_mut());
    let ours = super::module::nvmehp_modevent(null, MOD_LOAD as c_int, arg);
    record(format!("kldload: our MOD_LOAD returned {ours}"));
    0
}
// --- allocation counter -----------------------------------------------------------------------

std::thread_local! {
    /// Allocations made by this thread: Rust heap (what malloc(9) serves in the kernel),
    /// malloc_aligned, contigmalloc, busdma tag and map creations.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

std::thread_local! {
    /// Depth of fake-kernel bookkeeping on this thread (the log, the device model, the bioq
    /// table): heap allocations made there are the fake's, not the driver's.
    static FAKE_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// While alive, heap allocations of this thread are the fake's own and not counted.
struct FakeWork;

impl FakeWork {
    fn begin() -> FakeWork {
        let _ = FAKE_DEPTH.try_with(|d| d.set(d.get() + 1));
        FakeWork
    }
}

impl Drop for FakeWork {
    fn drop(&mut self) {
        let _ = FAKE_DEPTH.try_with(|d| d.set(d.get().saturating_sub(1)));
    }
}

fn count_heap_allocation() {
    if FAKE_DEPTH.try_with(|d| d.get() == 0).unwrap_or(false) {
        count_allocation();
    }
}

/// Allocations made by this thread so far (see [`ALLOCATIONS`]). Compare two readings around the
/// code under test: other threads' allocations are not counted.
pub fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

/// The test binary's global allocator: the system allocator, counting each allocation made by
/// the current thread. In the kernel the Rust heap is malloc(9) (`alloc.rs`), so this counts
/// what the driver would allocate there. (`kmalloc`'s direct malloc(9) calls, used only by
/// `box_waitok`/`try_box`, reach libc's malloc here and are not counted.)
struct CountingAlloc;

// SAFETY: every method forwards to the system allocator with the same arguments.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_heap_allocation();
        // SAFETY: forwarded.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_heap_allocation();
        // SAFETY: forwarded.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        count_heap_allocation();
        // SAFETY: forwarded.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING_ALLOC: CountingAlloc = CountingAlloc;

// --- busdma(9) ----------------------------------------------------------------------------------

/// What the fake tag was created with.
#[derive(Clone, Copy, Debug)]
pub struct FakeTag {
    pub boundary: u64,
    pub nsegments: c_int,
    pub maxsegsz: u64,
}

struct FakeMap {
    loaded: bool,
}

std::thread_local! {
    /// bioq heads (by address) and their bios, oldest first.
    static BIOQS: RefCell<std::collections::BTreeMap<usize, std::collections::VecDeque<usize>>> = const { RefCell::new(std::collections::BTreeMap::new()) };
}

#[no_mangle]
pub unsafe extern "C" fn bus_get_dma_tag(_dev: device_t) -> bus_dma_tag_t {
    let _fake = FakeWork::begin();
    0x9a7e47 as bus_dma_tag_t
}

#[no_mangle]
pub unsafe extern "C" fn bus_dma_tag_create(
    parent: bus_dma_tag_t,
    alignment: bus_size_t,
    boundary: bus_addr_t,
    lowaddr: bus_addr_t,
    highaddr: bus_addr_t,
    _filt: bus_dma_filter_t,
    _filtarg: *mut c_void,
    maxsize: bus_size_t,
    nsegments: c_int,
    maxsegsz: bus_size_t,
    flags: c_int,
    _lockfunc: bus_dma_lock_t,
    _lockarg: *mut c_void,
    dmat: *mut bus_dma_tag_t,
) -> c_int {
    let _fake = FakeWork::begin();
    count_allocation();
    let t = Box::into_raw(Box::new(FakeTag { boundary, nsegments, maxsegsz }));
    record(format!(
        "bus_dma_tag_create parent={parent:p} align={alignment} boundary={boundary:#x} lowaddr={lowaddr:#x} highaddr={highaddr:#x} maxsize={maxsize} nsegments={nsegments} maxsegsz={maxsegsz:#x} flags={flags:#x} = {t:p}"
    ));
    // SAFETY: the wrapper passes a valid out pointer.
    unsafe { *dmat = t.cast() };
    0
}

#[no_mangle]
pub unsafe extern "C" fn bus_dma_tag_destroy(dmat: bus_dma_tag_t) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("bus_dma_tag_destroy {dmat:p}"));
    // SAFETY: a tag from the fake bus_dma_tag_create, destroyed once by the wrapper.
    drop(unsafe { Box::from_raw(dmat.cast::<FakeTag>()) });
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_bus_dmamap_create(dmat: bus_dma_tag_t, flags: c_int, mapp: *mut bus_dmamap_t) -> c_int {
    let _fake = FakeWork::begin();
    count_allocation();
    let m = Box::into_raw(Box::new(FakeMap { loaded: false }));
    record(format!("bus_dmamap_create tag={dmat:p} flags={flags:#x} = {m:p}"));
    // SAFETY: the wrapper passes a valid out pointer.
    unsafe { *mapp = m.cast() };
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_bus_dmamap_destroy(dmat: bus_dma_tag_t, map: bus_dmamap_t) -> c_int {
    let _fake = FakeWork::begin();
    record(format!("bus_dmamap_destroy tag={dmat:p} map={map:p}"));
    // SAFETY: a map from the fake create.
    if unsafe { (*map.cast::<FakeMap>()).loaded } {
        return bindings::EBUSY; // as busdma: a loaded map cannot be destroyed
    }
    // SAFETY: as above, destroyed once.
    drop(unsafe { Box::from_raw(map.cast::<FakeMap>()) });
    0
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_bus_dmamap_sync(_dmat: bus_dma_tag_t, map: bus_dmamap_t, op: c_int) {
    let _fake = FakeWork::begin();
    record(format!("bus_dmamap_sync map={map:p} op={op}"));
}

#[no_mangle]
pub unsafe extern "C" fn nvmehp_bus_dmamap_unload(_dmat: bus_dma_tag_t, map: bus_dmamap_t) {
    let _fake = FakeWork::begin();
    record(format!("bus_dmamap_unload map={map:p}"));
    // SAFETY: a map from the fake create.
    unsafe { (*map.cast::<FakeMap>()).loaded = false };
}

/// Loads a bio as busdma does for the tag: a mapped bio's virtual range (identity-mapped: the
/// fake pmap_kextract is the identity), or an unmapped bio's `bio_ma` pages, cut at
/// `boundary` and `maxsegsz`; the callback runs before the return (the driver passes
/// BUS_DMA_NOWAIT).
#[no_mangle]
pub unsafe extern "C" fn bus_dmamap_load_bio(
    dmat: bus_dma_tag_t,
    map: bus_dmamap_t,
    bio: *mut bio,
    callback: bus_dmamap_callback_t,
    arg: *mut c_void,
    flags: c_int,
) -> c_int {
    let _fake = FakeWork::begin();
    // SAFETY: a tag from the fake create; the driver's bio.
    let (t, b) = unsafe { (*dmat.cast::<FakeTag>(), &*bio) };
    let fake = FakeWork::begin();
    let held = MTX_HELD.with(|h| h.borrow().len());
    let cb = callback.expect("a load callback");
    let mut segs: Vec<bus_dma_segment> = Vec::new();
    let step = t.boundary.min(t.maxsegsz);
    let mut left = b.bio_bcount.max(0) as u64;
    if b.bio_flags & bindings::BIO_UNMAPPED as u16 != 0 {
        // An unmapped bio: its pages are `bio_ma` (here the fake "vm_page_t" values are the
        // pages' bus addresses), starting `bio_ma_offset` into the first; bio_data is not used.
        let mut off = b.bio_ma_offset.max(0) as u64;
        for i in 0..b.bio_ma_n.max(0) as usize {
            if left == 0 {
                break;
            }
            // SAFETY: the test made bio_ma an array of bio_ma_n entries.
            let page = unsafe { *b.bio_ma.add(i) } as u64;
            let n = (step - off).min(left);
            segs.push(bus_dma_segment { ds_addr: page + off, ds_len: n });
            left -= n;
            off = 0;
        }
    } else {
        let mut va = b.bio_data as u64;
        while left > 0 {
            let n = (step - va % step).min(left);
            segs.push(bus_dma_segment { ds_addr: va, ds_len: n });
            va += n;
            left -= n;
        }
    }
    // A failed load (kldhost's `--fail bus_dmamap_load_bio` fails one on the .ko) is only the
    // tag's own answer here: too many segments.
    let err = if segs.len() > t.nsegments as usize { bindings::EFBIG } else { 0 };
    record(format!("bus_dmamap_load_bio map={map:p} flags={flags:#x} nsegs={} error={err} mutexes_held={held}", segs.len()));
    drop(fake); // the callback is the driver's code
    if err != 0 {
        // SAFETY: the driver's callback and argument.
        unsafe { cb(arg, core::ptr::null_mut(), 0, err) };
        return if err == bindings::ENOMEM { err } else { 0 };
    }
    // SAFETY: a map from the fake create.
    unsafe { (*map.cast::<FakeMap>()).loaded = true };
    // SAFETY: the driver's callback and argument; `segs` lives across the call.
    unsafe { cb(arg, segs.as_mut_ptr(), segs.len() as c_int, 0) };
    0
}

// --- bioq -----------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn bioq_init(head: *mut bio_queue_head) {
    let _fake = FakeWork::begin();
    record("bioq_init");
    BIOQS.with(|q| q.borrow_mut().insert(head as usize, Default::default()));
}

#[no_mangle]
pub unsafe extern "C" fn bioq_insert_tail(head: *mut bio_queue_head, bp: *mut bio) {
    let _fake = FakeWork::begin();
    record("bioq_insert_tail");
    BIOQS.with(|q| q.borrow_mut().get_mut(&(head as usize)).expect("bioq_init first").push_back(bp as usize));
}

#[no_mangle]
pub unsafe extern "C" fn bioq_insert_head(head: *mut bio_queue_head, bp: *mut bio) {
    let _fake = FakeWork::begin();
    record("bioq_insert_head");
    BIOQS.with(|q| q.borrow_mut().get_mut(&(head as usize)).expect("bioq_init first").push_front(bp as usize));
}

#[no_mangle]
pub unsafe extern "C" fn bioq_takefirst(head: *mut bio_queue_head) -> *mut bio {
    let _fake = FakeWork::begin();
    record("bioq_takefirst");
    BIOQS.with(|q| q.borrow_mut().get_mut(&(head as usize)).and_then(|v| v.pop_front()).unwrap_or(0) as *mut bio)
}
