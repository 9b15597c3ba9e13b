//! Host unit tests of the KPI wrappers against [`fake_kernel`](super::fake_kernel): the flags
//! they pass and the order of calls their ownership rules promise.

use super::acpi::{AcpiHandle, AcpiStatus, NotifyHandler, NotifyRegistration, NotifyValue};
use super::bindings;
use super::bio::{Bio, BioCmd};
use super::callout::{Callout, CalloutHandler};
use super::cdev::{Cdev, CdevSw, NodePerms};
use super::device::Device;
use super::disk::{Disk, DiskParams, GoneDisk};
use super::fake_kernel::{self as fk, Knobs};
use super::intr::{Interrupt, InterruptHandler, IrqResource};
use super::mutex::Mutex;
use super::resource::MemResource;
use super::taskqueue::{TaskHandler, TaskQueue};
use crate::platform::RegisterIo;
use core::ffi::c_void;
use core::sync::atomic::{AtomicU32, Ordering};
use std::boxed::Box;
use std::string::String;
use std::vec::Vec;

fn dev() -> Device {
    // SAFETY: the fakes never dereference the device.
    unsafe { Device::from_raw(fk::fake_device()) }.unwrap()
}

fn index_of(log: &[String], prefix: &str) -> usize {
    log.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in {log:#?}"))
}

fn count(log: &[String], prefix: &str) -> usize {
    log.iter().filter(|l| l.starts_with(prefix)).count()
}

/// Records its own drop, so tests can see when the wrapper freed it.
struct DropProbe(&'static str);
impl Drop for DropProbe {
    fn drop(&mut self) {
        fk::record(std::format!("dropped {}", self.0));
    }
}

// --- cdev ---------------------------------------------------------------------------------

static TEST_CDEVSW: CdevSw = CdevSw::new(bindings::cdevsw {
    d_version: bindings::D_VERSION,
    d_name: c"nvmehptest".as_ptr(),
    // SAFETY: an all-zero cdevsw is valid (no methods).
    ..unsafe { core::mem::zeroed() }
});

#[test]
fn cdev_is_created_checkname_waitok_never_eternal_with_drv1_in_args() {
    fk::reset(Knobs::default());
    let mut softc = 7u32;
    let drv1 = (&raw mut softc).cast::<c_void>();
    let node = Cdev::create(&TEST_CDEVSW, 3, NodePerms::DISK, drv1, format_args!("nvme{}ns{}", 0, 1)).unwrap();
    let log = fk::log();
    let line = &log[index_of(&log, "make_dev_s")];
    let flags = bindings::MAKEDEV_CHECKNAME | bindings::MAKEDEV_WAITOK;
    assert!(line.contains(&std::format!("flags={flags:#x}")), "{line}");
    assert_eq!(flags & 0x10, 0, "MAKEDEV_ETERNAL is 0x10");
    assert!(line.contains(&std::format!("drv1={drv1:p}")), "{line}");
    assert!(line.contains("unit=3 mode=640"), "{line}");
    assert!(line.ends_with("name=nvme0ns1"), "{line}");
    assert!(index_of(&log, "make_dev_args_init") < index_of(&log, "make_dev_s"));
    assert!(!node.in_use());
    drop(node);
    assert_eq!(count(&fk::log(), "destroy_dev "), 1, "dropping the node destroys it exactly once");
}

#[test]
fn cdev_create_errors_are_returned_and_nothing_is_destroyed() {
    fk::reset(Knobs { make_dev_s_error: bindings::EEXIST, ..Knobs::default() });
    let r = Cdev::create(&TEST_CDEVSW, 0, NodePerms::DISK, core::ptr::null_mut(), format_args!("dup"));
    assert_eq!(r.err(), Some(bindings::EEXIST));
    assert_eq!(count(&fk::log(), "destroy_dev"), 0);
}

#[test]
fn cdev_name_too_long_never_reaches_make_dev() {
    fk::reset(Knobs::default());
    let long = "x".repeat(bindings::SPECNAMELEN as usize + 1);
    let r = Cdev::create(&TEST_CDEVSW, 0, NodePerms::DISK, core::ptr::null_mut(), format_args!("{long}"));
    assert_eq!(r.err(), Some(bindings::ENAMETOOLONG));
    assert_eq!(count(&fk::log(), "make_dev_s"), 0);
}

unsafe extern "C" fn record_cb(arg: *mut c_void) {
    fk::record(std::format!("destroy callback arg={arg:p}"));
}

#[test]
fn deferred_destroy_uses_sched_cb_and_not_destroy_dev() {
    fk::reset(Knobs::default());
    let node = Cdev::create(&TEST_CDEVSW, 0, NodePerms::DISK, core::ptr::null_mut(), format_args!("n")).unwrap();
    // SAFETY: record_cb only logs.
    unsafe { node.destroy_deferred(Some(record_cb), 0x42 as *mut c_void) };
    let log = fk::log();
    assert_eq!(count(&log, "destroy_dev_sched_cb"), 1);
    assert_eq!(count(&log, "destroy_dev "), 0, "the handle was consumed: no second destroy");
    assert!(index_of(&log, "destroy_dev_sched_cb") < index_of(&log, "destroy callback arg=0x42"));
}

// --- ACPI notify --------------------------------------------------------------------------

struct Recorder {
    got: AtomicU32,
    _probe: DropProbe,
}
impl NotifyHandler for Recorder {
    fn notify(&self, _h: AcpiHandle, v: NotifyValue) {
        if v == NotifyValue::EjectRequest {
            self.got.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn slot() -> AcpiHandle {
    // SAFETY: the fakes never dereference the handle.
    unsafe { AcpiHandle::from_raw(0x5107 as bindings::ACPI_HANDLE) }.unwrap()
}

#[test]
fn notify_handler_is_removed_before_its_context_is_freed() {
    fk::reset(Knobs::default());
    let reg = NotifyRegistration::install(slot(), Box::new(Recorder { got: AtomicU32::new(0), _probe: DropProbe("notify ctx") }))
        .map_err(|e| e.0)
        .unwrap();
    fk::deliver_notify(3);
    assert_eq!(reg.handler().got.load(Ordering::Relaxed), 1, "value 3 is an eject request");
    drop(reg);
    let log = fk::log();
    assert!(log[index_of(&log, "AcpiInstallNotifyHandler")].ends_with("type=1"), "system notify");
    assert!(log[index_of(&log, "AcpiRemoveNotifyHandler")].contains("same_handler=true"));
    assert!(index_of(&log, "AcpiRemoveNotifyHandler") < index_of(&log, "dropped notify ctx"));
}

/// Records every call into the fake kernel's log, so a test sees whether it ran before or after
/// its context was dropped.
struct LogRecorder {
    _probe: DropProbe,
}
impl NotifyHandler for LogRecorder {
    fn notify(&self, _h: AcpiHandle, v: NotifyValue) {
        fk::record(std::format!("handler ran {v:?}"));
    }
}

/// A notify ACPICA queued before the unlink (with the handler list as it was then) is
/// dispatched after AcpiRemoveNotifyHandler returned: every removal, by `remove` and by drop,
/// is followed by AcpiOsWaitEventsComplete, which lets that dispatch run while the context is
/// still alive; only then is the context freed. A failed removal frees nothing and needs no
/// wait.
#[test]
fn every_removal_waits_for_queued_notifies_before_the_context_is_freed() {
    for by_drop in [false, true] {
        fk::reset(Knobs::default());
        let reg = NotifyRegistration::install(slot(), Box::new(LogRecorder { _probe: DropProbe("notify ctx") }))
            .map_err(|e| e.0)
            .unwrap();
        fk::queue_notify_dispatch(3);
        if by_drop {
            drop(reg);
        } else {
            assert!(reg.remove().is_ok());
        }
        let log = fk::log();
        let order = [
            index_of(&log, "AcpiRemoveNotifyHandler"),
            index_of(&log, "AcpiOsWaitEventsComplete"),
            index_of(&log, "handler ran EjectRequest"),
            index_of(&log, "dropped notify ctx"),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "by_drop={by_drop}: {order:?} {log:#?}");
        assert_eq!(count(&log, "AcpiOsWaitEventsComplete"), 1);
    }
    fk::reset(Knobs { acpi_remove_status: bindings::NVMEHP_AE_NOT_FOUND, ..Knobs::default() });
    let reg = NotifyRegistration::install(slot(), Box::new(LogRecorder { _probe: DropProbe("notify ctx") }))
        .map_err(|e| e.0)
        .unwrap();
    let (st, reg) = reg.remove().unwrap_err();
    assert_eq!(st, AcpiStatus::NOT_FOUND);
    core::mem::forget(reg); // still installed as far as the fake knows: keep its context
    assert_eq!(count(&fk::log(), "AcpiOsWaitEventsComplete"), 0);
}

#[test]
fn notify_context_is_leaked_when_removal_fails() {
    fk::reset(Knobs { acpi_remove_status: bindings::NVMEHP_AE_NOT_FOUND, ..Knobs::default() });
    let reg = NotifyRegistration::install(slot(), Box::new(Recorder { got: AtomicU32::new(0), _probe: DropProbe("notify ctx") }))
        .map_err(|e| e.0)
        .unwrap();
    drop(reg);
    let log = fk::log();
    assert_eq!(count(&log, "dropped notify ctx"), 0, "a possibly live handler keeps its context");
    assert_eq!(count(&log, "printf nvme_hotplug: AcpiRemoveNotifyHandler(\\_SB_.S18_) failed: AE_NOT_FOUND"), 1, "{log:#?}");
}

// --- registers ----------------------------------------------------------------------------

#[test]
fn bar_accesses_outside_the_resource_never_reach_the_bus() {
    fk::reset(Knobs { rman_size: 0x4000, ..Knobs::default() });
    let bar = MemResource::alloc(dev(), 0x10).unwrap();
    assert_eq!(bar.read32(0x1000), 0x1000_1000);
    assert_eq!(bar.read32(0x3ffc), 0x1000_3ffc);
    assert_eq!(bar.read32(0x4000), u32::MAX, "past the end");
    assert_eq!(bar.read32(0x0002), u32::MAX, "misaligned");
    bar.write32(0x4000, 1);
    bar.write32(0x1008, 5);
    drop(bar);
    let log = fk::log();
    assert_eq!(count(&log, "bus_read_4"), 2);
    assert_eq!(count(&log, "bus_write_4"), 1);
    assert!(log.iter().any(|l| l == "bus_write_4 0x1008 0x5"));
    assert!(log[0].starts_with(&std::format!("bus_alloc_resource type={} rid=0x10", bindings::SYS_RES_MEMORY)));
    assert_eq!(count(&log, "bus_release_resource"), 1);
}

// --- interrupts ---------------------------------------------------------------------------

struct Counter {
    n: AtomicU32,
    _probe: DropProbe,
}
impl InterruptHandler for Counter {
    fn handle(&self) {
        self.n.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn interrupt_teardown_precedes_context_free_and_irq_release() {
    fk::reset(Knobs::default());
    let irq = IrqResource::alloc(dev(), 0).unwrap();
    let intr = Interrupt::setup(irq, Box::new(Counter { n: AtomicU32::new(0), _probe: DropProbe("intr ctx") }))
        .map_err(|e| e.0)
        .unwrap();
    fk::fire_interrupt();
    assert_eq!(intr.handler().n.load(Ordering::Relaxed), 1);
    drop(intr);
    let log = fk::log();
    let shareable = bindings::RF_ACTIVE | bindings::RF_SHAREABLE;
    assert!(log[0].ends_with(&std::format!("rid=0x0 flags={shareable:#x}")), "{}", log[0]);
    let want = (bindings::INTR_TYPE_BIO | bindings::INTR_MPSAFE) as i32;
    assert!(log[index_of(&log, "bus_setup_intr")].ends_with(&std::format!("flags={want:#x} filter=false")));
    let teardown = index_of(&log, "bus_teardown_intr");
    assert!(teardown < index_of(&log, "dropped intr ctx"));
    assert!(index_of(&log, "dropped intr ctx") < index_of(&log, "bus_release_resource"));
}

#[test]
fn failed_teardown_keeps_handler_and_irq() {
    fk::reset(Knobs { teardown_intr_error: bindings::EBUSY, ..Knobs::default() });
    let irq = IrqResource::alloc(dev(), 1).unwrap();
    let intr = Interrupt::setup(irq, Box::new(Counter { n: AtomicU32::new(0), _probe: DropProbe("intr ctx") }))
        .map_err(|e| e.0)
        .unwrap();
    drop(intr);
    let log = fk::log();
    assert_eq!(count(&log, "dropped intr ctx"), 0);
    assert_eq!(count(&log, "bus_release_resource"), 0);
    assert!(log[0].ends_with(&std::format!("rid=0x1 flags={:#x}", bindings::RF_ACTIVE)), "MSI-X vectors are not shared");
}

// --- taskqueue ----------------------------------------------------------------------------

struct Work {
    runs: AtomicU32,
    _probe: DropProbe,
}
impl TaskHandler for Work {
    fn run(&self, pending: u32) {
        self.runs.fetch_add(pending, Ordering::Relaxed);
    }
}

#[test]
fn tasks_coalesce_and_are_drained_before_they_are_freed() {
    fk::reset(Knobs::default());
    let q = TaskQueue::new(c"nvmehp_test").unwrap();
    let t = q.task(0, Work { runs: AtomicU32::new(0), _probe: DropProbe("task ctx") }).unwrap();
    t.enqueue();
    t.enqueue();
    fk::run_task(t.raw_for_tests());
    assert_eq!(t.handler().runs.load(Ordering::Relaxed), 2, "two enqueues, one run with pending=2");
    drop(t);
    drop(q);
    let log = fk::log();
    assert!(log[index_of(&log, "taskqueue_create")].contains(&std::format!("mflags={}", bindings::M_WAITOK)));
    assert!(log[index_of(&log, "taskqueue_start_threads")].contains(&std::format!("pri={}", bindings::PWAIT)));
    assert!(index_of(&log, "taskqueue_drain") < index_of(&log, "dropped task ctx"));
    assert!(index_of(&log, "dropped task ctx") < index_of(&log, "taskqueue_free"));
}

#[test]
fn timeout_tasks_use_the_delay_and_are_drained_before_they_are_freed() {
    fk::reset(Knobs::default());
    let q = TaskQueue::new(c"nvmehp_test").unwrap();
    let t = q.timeout_task(0, Work { runs: AtomicU32::new(0), _probe: DropProbe("timeout ctx") }).unwrap();
    t.enqueue_after(250_000);
    fk::run_task(t.raw_task_for_tests());
    assert_eq!(t.handler().runs.load(Ordering::Relaxed), 1);
    drop(t);
    drop(q);
    let log = fk::log();
    let line = &log[index_of(&log, "taskqueue_enqueue_timeout")];
    assert!(line.starts_with(&std::format!("taskqueue_enqueue_timeout sbt={} ", super::clock::us_to_sbt(250_000))), "{line}");
    assert!(index_of(&log, "taskqueue_drain_timeout") < index_of(&log, "dropped timeout ctx"));
    assert!(index_of(&log, "dropped timeout ctx") < index_of(&log, "taskqueue_free"));
}

// --- mutex and callout --------------------------------------------------------------------

struct Tick {
    _probe: DropProbe,
}
impl CalloutHandler<u32> for Tick {
    fn fire(&self, data: &mut u32) -> Option<u64> {
        *data += 1;
        None
    }
}

#[test]
fn mutex_guards_and_callout_runs_locked_and_is_drained_before_free() {
    fk::reset(Knobs::default());
    let m = Mutex::new_boxed(c"nvmehp test", 0u32).unwrap();
    let c = Callout::new(&m, Tick { _probe: DropProbe("callout ctx") }).unwrap();
    {
        let g = m.lock();
        c.as_ref().reset(&g, 1_000);
    }
    fk::fire_callout();
    assert_eq!(*m.lock(), 1, "the handler saw the mutex's data");
    drop(c);
    drop(m);
    let log = fk::log();
    let reset_line = &log[index_of(&log, "callout_reset")];
    assert!(reset_line.starts_with(&std::format!("callout_reset sbt={} ", super::clock::us_to_sbt(1_000))));
    let drain = log.iter().position(|l| *l == std::format!("callout_stop flags={}", bindings::CS_DRAIN)).unwrap();
    assert!(drain < index_of(&log, "dropped callout ctx"));
    assert!(index_of(&log, "dropped callout ctx") < index_of(&log, "mtx_destroy"));
    assert_eq!(count(&log, "mtx_lock"), count(&log, "mtx_unlock"));
}

// --- disk and bio -------------------------------------------------------------------------

unsafe extern "C" fn strategy(_bp: *mut bindings::bio) {}
unsafe extern "C" fn gone(_dp: *mut bindings::disk) {}

#[test]
fn disk_lifecycle_is_create_gone_destroy_in_that_order() {
    fk::reset(Knobs::default());
    let mut ctx = 0u8;
    let p = DiskParams {
        name: c"nvmehpd",
        unit: 2,
        sector_size: 512,
        media_size: 1 << 30,
        max_io: 128 * 1024,
        flags: 0,
        ident: &[b'S', b'E', b'R', b'I', b'A', b'L', 0, b'1', b'2', b'3'],
        descr: b"QEMU NVMe Ctrl",
        attachment: b"nvmehp0",
        hba: Default::default(),
        non_rotating: true,
        getattr: None,
        strategy,
        gone,
        open: None,
        close: None,
        drv1: (&raw mut ctx).cast(),
    };
    let d = Disk::create(&p);
    let raw = d.as_raw();
    let _given_up: GoneDisk = d.gone(); // GEOM owns it now; the token does nothing on drop
    // SAFETY: as GEOM would call d_gone with this disk.
    let g = unsafe { GoneDisk::in_d_gone(raw) }.unwrap();
    assert_eq!(g.drv1(), (&raw mut ctx).cast());
    g.destroy_in_d_gone();
    let log = fk::log();
    let create = &log[index_of(&log, "disk_create")];
    assert!(create.contains(&std::format!("version={:#x}", bindings::DISK_VERSION)));
    assert!(create.contains("name=nvmehpd unit=2 sector=512 media=1073741824 maxsize=131072"));
    assert!(create.contains("ident=SERIAL 123"), "NUL in the serial must not cut it: {create}");
    let order: Vec<usize> = ["disk_alloc", "disk_create", "disk_gone", "disk_destroy"].iter().map(|e| index_of(&log, e)).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{log:#?}");
}

#[test]
fn a_dropped_disk_is_given_up_exactly_once() {
    fk::reset(Knobs::default());
    let p = DiskParams {
        name: c"nvmehpd",
        unit: 0,
        sector_size: 4096,
        media_size: 1 << 20,
        max_io: 4096,
        flags: 0,
        ident: b"",
        descr: b"",
        attachment: b"",
        hba: Default::default(),
        non_rotating: false,
        getattr: None,
        strategy,
        gone,
        open: None,
        close: None,
        drv1: core::ptr::null_mut(),
    };
    drop(Disk::create(&p));
    let _token = Disk::create(&p).gone();
    assert_eq!(count(&fk::log(), "disk_gone"), 2, "one per disk, never twice for one");
    assert_eq!(count(&fk::log(), "disk_destroy"), 0, "destroy belongs to d_gone");
}

#[test]
fn failed_bio_reports_error_and_full_residual() {
    fk::reset(Knobs::default());
    let bp = fk::new_bio(bindings::BIO_WRITE as u16, 4096, 8192);
    // SAFETY: a fake bio as d_strategy would receive it.
    let b = unsafe { Bio::from_strategy(bp) }.unwrap();
    assert_eq!(b.cmd(), BioCmd::Write);
    assert_eq!((b.offset(), b.len()), (4096, 8192));
    b.fail(bindings::ENXIO);
    let log = fk::log();
    assert_eq!(log, [std::format!("biodone error={} flags={:#x} resid=8192", bindings::ENXIO, bindings::BIO_ERROR)]);
}

#[test]
fn a_bio_dropped_without_completion_is_failed_once_with_eio() {
    fk::reset(Knobs::default());
    let bp = fk::new_bio(bindings::BIO_READ as u16, 0, 512);
    // SAFETY: a fake bio as d_strategy would receive it.
    drop(unsafe { Bio::from_strategy(bp) }.unwrap());
    let bp2 = fk::new_bio(bindings::BIO_READ as u16, 0, 512);
    // SAFETY: as above.
    unsafe { Bio::from_strategy(bp2) }.unwrap().done();
    let done: Vec<String> = fk::log().into_iter().filter(|l| l.starts_with("biodone")).collect();
    assert_eq!(
        done,
        [std::format!("biodone error={} flags={:#x} resid=512", bindings::EIO, bindings::BIO_ERROR), "biodone error=0 flags=0x0 resid=0".into()],
        "the dropped bio is failed once, a completed one is not completed again"
    );
}
