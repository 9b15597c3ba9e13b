//! Running a loaded module's life as kldload(8) and kldunload(8) drive it.
//!
//! Load (sys/kern/kern_linker.c linker_load_file, after the file is linked):
//! 1. linker_file_register_modules: module_register for each MDT_MODULE record
//!    (sys/kern/kern_module.c: name, event handler, argument; no event yet);
//! 2. linker_file_register_sysctls: the OIDs of `set_sysctl_set`;
//! 3. linker_file_sysinit: the SYSINITs in (subsystem, order) order, SI_SUB_DUMMY skipped;
//!    DECLARE_MODULE's is module_register_init, which sends MOD_LOAD.
//!
//! Then the taskqueue threads get to run what MOD_LOAD queued, and (optionally) time passes:
//! armed timeout tasks expire until none re-arms.
//!
//! Unload (kern_kldunload -> linker_file_unload, not forced): MOD_QUIESCE to every module of
//! the file, EOPNOTSUPP or EINVAL counting as agreement, stopping at the first veto; then
//! MOD_UNLOAD to each, stopping at a refusal; a refusal leaves the file loaded. That is FreeBSD
//! 15's order as docs/teardown.md describes it; the older kern_linker.c/kern_module.c read for
//! this (commits 2e696f27, 0373a290) send both events per module in module_unload, which is the
//! same sequence for a file with one module, as nvme_hotplug.ko is. Then linker_file_sysuninit
//! (reverse order) and the sysctls are unregistered.

use super::kern::{event_name, mod_event, Module};
use super::{log, with};
use crate::layouts;
use crate::sets::{self, ModRecord};
use crate::{LoadError, LoadedKo};
use std::ffi::{c_int, c_void};

#[derive(Debug, Default)]
pub struct Report {
    /// Every emulated call and linker step, in order.
    pub log: Vec<String>,
    pub findings: Vec<String>,
    pub console: String,
    /// MOD_QUIESCE's and MOD_UNLOAD's results per module (None: not sent).
    pub quiesce: Option<c_int>,
    pub unload: Option<c_int>,
    /// Whether the file was unloaded (every module agreed).
    pub unloaded: bool,
    /// With a machine: device_probe_and_attach and device_detach of each PCI function, by
    /// its location ("device 4.0"), with the device's name and the result.
    pub attach: Vec<(String, String, c_int)>,
    pub detach: Vec<(String, String, c_int)>,
    /// Device nodes and disks present once attach was done.
    pub nodes_attached: Vec<String>,
    pub disks_attached: Vec<String>,
    /// With a machine: the I/O through the first disk's d_strategy, each with its bio_error
    /// (-1: never done), and whether the data landed in the controller's backing file and
    /// came back from it.
    pub io: Vec<(String, c_int)>,
    pub io_data_ok: bool,
    /// With `eject`: the notifies delivered, as (slot, value, handlers called), and whether the
    /// function left pci0 and QEMU reported DEVICE_DELETED.
    pub notifies: Vec<(u8, u32, usize)>,
    pub ejected: bool,
    /// With `hot_add`: whether the hot-added function got attached, and its write and read.
    pub hot_added: bool,
    pub hot_added_io_ok: bool,
    /// With `surprise`: whether the function left pci0 after the surprise removal.
    pub surprise_detected: bool,
}

/// Offset and size of the test I/O.
const IO_OFFSET: i64 = 8192;
const IO_BYTES: usize = 4096;

/// A write and a read of the first disk, as a consumer opening it would do them, and the
/// data checked in QEMU's backing file. The bios' data live in guest RAM, as a kernel buffer
/// a bio carries is memory the device can reach by DMA (busdma translates it page by page);
/// with `outside_guest_ram` they are host memory instead, which busdma must refuse.
fn disk_io(report: &mut Report, outside_guest_ram: bool) {
    let Some(disk) = report.disks_attached.first().cloned() else { return };
    let pattern: Vec<u8> = (0..IO_BYTES).map(|i| (i as u8).wrapping_mul(7) ^ 0x5a).collect();
    let timeout = std::time::Duration::from_secs(10);
    report.io.push((format!("d_open {disk}"), super::geom::open(&disk)));
    let (mut host_w, mut host_r) = (vec![0u8; IO_BYTES], vec![0u8; IO_BYTES]);
    let (w, r): (&mut [u8], &mut [u8]) = if outside_guest_ram {
        (&mut host_w, &mut host_r)
    } else {
        // Two pages from the machine's DMA pool (never handed out again, never freed: it is
        // not the module's memory, so it is not counted as the module's allocations).
        let p = super::machine::with_machine(|m| m.contig_alloc(2 * IO_BYTES as u64, 0, u64::MAX, 4096, 0));
        let Some(p) = p else {
            report.io.push(("guest RAM for the bios".to_string(), layouts::ENOMEM));
            return;
        };
        // SAFETY: 2 * IO_BYTES bytes of the shared guest RAM mapping, handed out to nobody
        // else, alive until the machine stops (after this function).
        let both = unsafe { std::slice::from_raw_parts_mut(p, 2 * IO_BYTES) };
        both.split_at_mut(IO_BYTES)
    };
    log(format!("bio data: write at {:p}, read at {:p} ({})", w.as_ptr(), r.as_ptr(), if outside_guest_ram { "host memory, outside guest RAM" } else { "guest RAM" }));
    w.copy_from_slice(&pattern);
    r.fill(0);
    report.io.push((format!("BIO_WRITE {disk} {IO_OFFSET} {IO_BYTES}"), super::geom::io(&disk, layouts::BIO_WRITE as u32, IO_OFFSET, w, timeout)));
    report.io.push((format!("BIO_READ {disk} {IO_OFFSET} {IO_BYTES}"), super::geom::io(&disk, layouts::BIO_READ as u32, IO_OFFSET, r, timeout)));
    report.io.push((format!("d_close {disk}"), super::geom::close(&disk)));
    let image = super::machine::with_machine(|m| m.image.clone());
    let on_disk = std::fs::read(&image).ok().map(|b| b[IO_OFFSET as usize..IO_OFFSET as usize + IO_BYTES].to_vec());
    report.io_data_ok = *r == pattern[..] && on_disk.as_deref() == Some(&pattern[..]);
    let zeroes = on_disk.as_deref().is_some_and(|d| d.iter().all(|&b| b == 0));
    log(format!(
        "backing file {} at {IO_OFFSET}: {}; read back: {}",
        image.display(),
        if on_disk.as_deref() == Some(&pattern[..]) { "the written data" } else if zeroes { "NOT the written data (still zeroes)" } else { "NOT the written data" },
        if *r == pattern[..] { "the written data" } else { "NOT the written data" }
    ));
}

/// `n` 4 KiB writes from guest RAM sent to the first disk at once, page `i` at offset
/// `BURST_OFFSET + i * 4096` filled with a pattern of `i`; then the backing file checked.
fn burst_io(report: &mut Report, n: usize) {
    let Some(disk) = report.disks_attached.first().cloned() else { return };
    let image_len = super::machine::IMAGE_BYTES as usize;
    if BURST_OFFSET as usize + n * IO_BYTES > image_len {
        report.io.push((format!("burst of {n}: larger than the disk"), layouts::EINVAL));
        return;
    }
    let p = super::machine::with_machine(|m| m.contig_alloc((n * IO_BYTES) as u64, 0, u64::MAX, 4096, 0));
    let Some(p) = p else {
        report.io.push((format!("guest RAM for a burst of {n}"), layouts::ENOMEM));
        return;
    };
    // SAFETY: n * IO_BYTES bytes of the shared guest RAM mapping, handed out to nobody else,
    // alive until the machine stops (after this function).
    let all = unsafe { std::slice::from_raw_parts_mut(p, n * IO_BYTES) };
    let pattern = |i: usize, j: usize| (i as u8) ^ (j as u8).wrapping_mul(13) ^ 0xa5;
    let mut bufs: Vec<(i64, &mut [u8])> = all
        .chunks_mut(IO_BYTES)
        .enumerate()
        .map(|(i, c)| {
            for (j, b) in c.iter_mut().enumerate() {
                *b = pattern(i, j);
            }
            (BURST_OFFSET + (i * IO_BYTES) as i64, c)
        })
        .collect();
    let d = super::geom::open(&disk);
    let errors = super::geom::io_burst(&disk, layouts::BIO_WRITE as u32, &mut bufs, std::time::Duration::from_secs(30));
    super::geom::close(&disk);
    let failed = errors.iter().filter(|&&e| e != 0).count();
    report.io.push((format!("burst d_open {disk}"), d));
    report.io.push((format!("burst of {n} BIO_WRITE {disk}: bios not done without error"), failed as c_int));
    let image = super::machine::with_machine(|m| m.image.clone());
    let on_disk = std::fs::read(&image).unwrap_or_default();
    let wrong = (0..n)
        .filter(|&i| {
            let at = BURST_OFFSET as usize + i * IO_BYTES;
            on_disk.get(at..at + IO_BYTES).is_none_or(|d| d.iter().enumerate().any(|(j, &b)| b != pattern(i, j)))
        })
        .count();
    report.io.push((format!("burst of {n}: pages not on the medium"), wrong as c_int));
    log(format!("burst: {n} writes, {failed} failed, {wrong} pages not in the backing file"));
}

/// Where the burst writes start (past the single write and read).
const BURST_OFFSET: i64 = 1 << 20;

/// What a run does besides loading and unloading.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Timeout task expiries to allow after MOD_LOAD (0: time does not pass).
    pub timeouts: usize,
    /// Start QEMU with one NVMe controller behind pci0, attach the module's driver to it
    /// (`devctl set driver -f` then probe and attach; a function the driver took by itself at
    /// MOD_LOAD is left as it is), write and read its first disk through d_strategy, detach it
    /// (`devctl detach`), then unload.
    pub qemu: bool,
    /// With `qemu`: the bios' data are host memory outside guest RAM (a negative control:
    /// busdma must refuse them, never translate them to a wrong address).
    pub bio_outside_guest_ram: bool,
    /// With `qemu`: after the single write and read, this many 4 KiB writes sent at once
    /// (more than the driver's trackers exercises its bio queue), their data then checked in
    /// the backing file.
    pub burst: usize,
    /// Loader tunables (kenv) as (name, value): a CTLFLAG_TUN sysctl of the module with that
    /// name takes the value when it is registered.
    pub tunables: Vec<(String, String)>,
    /// With `qemu`: the ACPI namespace of QEMU's pc DSDT for the root bus (`\_SB_.PCI0` and
    /// its slot objects, [`super::acpi`]) instead of none, so the module's hotplug discovery
    /// finds the slots and installs its notify handlers.
    pub acpi: bool,
    /// With `acpi`: after the I/O, the controller's removal as the platform asks for it: QMP
    /// `device_del`, QEMU raises the hotplug GPE, the emulated acpi_task delivers
    /// `Notify(S04_, 3)` to the module's handler ([`super::acpi::run_gpe`]), and the module's
    /// hotplug task is expected to detach and delete the function and evaluate `_EJ0`, after
    /// which QEMU reports `DEVICE_DELETED`.
    pub eject: bool,
    /// With `eject`: then a controller hot-added to slot 5, empty since boot (QMP `device_add`): the GPE
    /// becomes `Notify(S05_, 1)`, and the module's task is expected to rescan that slot
    /// (`pci_read_device`, `pci_add_child`, `device_probe_and_attach`); the new disk is then
    /// written and read as the first was, and detached with devctl before the unload.
    pub hot_add: bool,
    /// With `acpi`: after the I/O, a surprise removal: the slot ejected behind everyone's back
    /// (the PCEJ write with no `device_del`, so no GPE and no notify); then time passes (every
    /// armed callout fires once per step, the taskqueues run) until the function left pci0,
    /// which only the module's own detection (its watchdog) can make happen.
    pub surprise: bool,
    /// With `acpi`: stock FreeBSD's ACPI, acpi_pci(4) on pci0 with its handler on every slot
    /// before the module loads (the module then observes: hw.nvme_hotplug.acpi_mode).
    pub acpi_pci: bool,
}

type SysinitFn = extern "C" fn(*const c_void);

pub(crate) fn run_sysinits(ko: &LoadedKo, list: &[sets::Sysinit], what: &str) {
    for s in list {
        if s.subsystem == layouts::SI_SUB_DUMMY {
            continue;
        }
        log(format!("{what}: subsystem {:#x} order {:#x}: {}({})", s.subsystem, s.order, ko.describe(s.func), ko.describe(s.udata)));
        // SAFETY: a SYSINIT's func is a sysinit_cfunc_t taking its udata; the module is loaded
        // and relocated, its imports point at the emulation.
        let f: SysinitFn = unsafe { std::mem::transmute::<u64, SysinitFn>(s.func) };
        f(s.udata as *const c_void);
    }
}

/// Loads the module's modules and runs MOD_LOAD, lets the taskqueues run and, if
/// `timeout_expiries` > 0, lets time pass until the module's timeout tasks stop re-arming (at
/// most that many expiries), then unloads it (MOD_QUIESCE, MOD_UNLOAD, SYSUNINITs). One
/// module per process: the emulated kernel's state is global.
pub fn load_and_unload(ko: &LoadedKo, timeout_expiries: usize) -> Result<Report, LoadError> {
    run(ko, &Options { timeouts: timeout_expiries, ..Options::default() })
}

/// The devctl(8) steps on every PCI function of the machine, each under the newbus topology
/// lock as devctl's ioctl takes it (sys/kern/subr_bus.c devctl2_ioctl): DEV_SET_DRIVER with
/// force (the devclass fixed to the driver, then probe and attach) and DEV_DETACH.
fn devctl_set_driver_and_attach(driver: &str, report: &mut Report) {
    for child in super::newbus::pci_children() {
        if super::newbus::state(child) >= layouts::DS_ATTACHED {
            log(format!("{} {}: attached at MOD_LOAD; devctl set driver not needed", location(child), super::newbus::nameunit(child)));
            report.attach.push((location(child), super::newbus::nameunit(child), 0));
            continue;
        }
        super::sched::topo_lock();
        super::newbus::set_devclass_fixed(child, driver);
        let r = super::newbus::probe_and_attach(child);
        super::sched::topo_unlock();
        report.attach.push((location(child), super::newbus::nameunit(child), r));
    }
}

fn devctl_detach(report: &mut Report) {
    for child in super::newbus::pci_children() {
        if super::newbus::state(child) < layouts::DS_ATTACHED {
            continue;
        }
        let name = super::newbus::nameunit(child);
        super::sched::topo_lock();
        let r = super::newbus::device_detach(child);
        super::sched::topo_unlock();
        report.detach.push((location(child), name, r));
    }
}

/// QMP `device_del` of the controller, then the SCI's work and the module's tasks until the
/// function is gone from pci0 (at most 5 s), then QEMU's `DEVICE_DELETED` awaited (2 s).
fn eject_request(report: &mut Report) {
    use super::machine::{with_machine, NVME_ID, NVME_SLOT};
    let r = with_machine(|m| m.request_unplug(NVME_SLOT));
    log(format!("QMP device_del {NVME_ID}: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    if r.is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let present = || super::newbus::pci_children().iter().any(|&c| location(c) == format!("device {NVME_SLOT}.0"));
    while present() && std::time::Instant::now() < deadline {
        for (slot, value, n) in super::acpi::run_gpe() {
            report.notifies.push((slot, value, n));
        }
        super::sched::run_queues(1000);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let gone = !present();
    log(format!("after the eject request: device {NVME_SLOT}.0 {}", if gone { "deleted from pci0" } else { "still on pci0" }));
    let deleted = with_machine(|m| m.reap(std::time::Duration::from_secs(2)) && !m.slot_present(NVME_SLOT));
    log(format!("QMP: DEVICE_DELETED {NVME_ID}: {}", if deleted { "received" } else { "not received" }));
    report.ejected = gone && deleted;
}

/// The lab's surprise removal: `_EJ0`'s register write with no `device_del` first (QEMU
/// removes the function at once, no SCI), then time passes in steps of one callout period
/// (at most 30), the taskqueues running after each, until 00:04.0 left pci0.
fn surprise_removal(report: &mut Report) {
    use super::machine::{with_machine, NVME_SLOT};
    let r = with_machine(|m| m.eject(NVME_SLOT).map_err(|e| e.to_string()));
    log(format!("surprise removal: PCEJ bit {NVME_SLOT} written with no device_del: {r:?}"));
    let present = || super::newbus::pci_children().iter().any(|&c| location(c) == format!("device {NVME_SLOT}.0"));
    let mut steps = 0;
    while present() && steps < 30 {
        steps += 1;
        let fired = super::sched::fire_callouts();
        super::sched::run_queues(1000);
        for n in super::acpi::run_gpe() {
            report.notifies.push(n);
        }
        if fired == 0 && present() {
            break; // nothing armed: time passing changes nothing
        }
    }
    let gone = !present();
    log(format!("after the surprise removal: device {NVME_SLOT}.0 {} after {steps} callout periods", if gone { "deleted from pci0" } else { "still on pci0" }));
    report.surprise_detected = gone;
}

/// Zeroes the test I/O's range in the controller's backing file (QEMU's raw driver reads it
/// back through the host page cache, so the zeroes are what the device sees next).
fn zero_io_range() {
    use std::io::{Seek, SeekFrom, Write};
    let image = super::machine::with_machine(|m| m.image.clone());
    let r = std::fs::OpenOptions::new().write(true).open(&image).and_then(|mut f| {
        f.seek(SeekFrom::Start(IO_OFFSET as u64))?;
        f.write_all(&[0u8; IO_BYTES])?;
        f.sync_data()
    });
    log(format!("backing file {} at {IO_OFFSET}: zeroed before the hot-added controller's I/O ({r:?})", image.display()));
}

/// The slot `--hot-add` plugs into: empty since boot (its slot object has `_EJ0`, no function).
const HOT_ADD_SLOT: u8 = 5;

/// QMP `device_add` of a controller in [`HOT_ADD_SLOT`] (the same backing image, whose first
/// controller is gone), then the SCI's work and the module's tasks until a function in that
/// slot is attached (at most 5 s).
fn hot_add(report: &mut Report) {
    use super::machine::with_machine;
    const NVME_SLOT: u8 = HOT_ADD_SLOT;
    let spec = nvmehp_lab::scenario::ControllerSpec {
        id: "nvme1".into(),
        slot: NVME_SLOT,
        namespaces: vec![nvmehp_lab::scenario::NamespaceSpec { nsid: 1, size_mib: (super::machine::IMAGE_BYTES >> 20) as u32, lba: 512 }],
    };
    let r = with_machine(|m| m.hot_add(&spec));
    log(format!("QMP device_add nvme1 at slot {NVME_SLOT}: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    if r.is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let attached = || {
        super::newbus::pci_children().iter().any(|&c| location(c) == format!("device {NVME_SLOT}.0") && super::newbus::state(c) >= layouts::DS_ATTACHED)
    };
    while !attached() && std::time::Instant::now() < deadline {
        for n in super::acpi::run_gpe() {
            report.notifies.push(n);
        }
        super::sched::run_queues(1000);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ok = attached();
    log(format!("after the hot-add: device {NVME_SLOT}.0 {}", if ok { "attached" } else { "not attached" }));
    with(|e| {
        report.nodes_attached = e.devs.keys().cloned().collect();
        report.disks_attached = e.disks.values().filter(|d| d.state == super::geom::DiskState::Created).map(|d| d.name.clone()).collect();
    });
    report.hot_added = ok;
}

fn location(dev: u64) -> String {
    with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).map(|p| format!("device {}.{}", p.bdf.dev, p.bdf.func)).unwrap_or_default())
}

/// Loads, runs and unloads the module per `opts` (see [`load_and_unload`] and [`Options`]).
pub fn run(ko: &LoadedKo, opts: &Options) -> Result<Report, LoadError> {
    if opts.qemu {
        super::machine::start().map_err(|e| LoadError::Bad(format!("starting QEMU: {e}")))?;
        let functions = super::machine::with_machine(|m| m.functions.clone());
        super::newbus::build_tree(&functions);
        if opts.acpi {
            let pci0 = super::newbus::pci0();
            let pcib0 = with(|e| e.newbus.devices.get(&pci0).map_or(0, |d| d.parent));
            super::acpi::enable_with(pcib0, opts.acpi_pci);
        }
    }
    let r = run_module(ko, opts);
    super::machine::stop();
    r
}

/// kldload's part once the file is linked (see the module doc): module_register for each
/// MDT_MODULE record, the sysctls registered (a CTLFLAG_TUN one takes its value from
/// `tunables`), the SYSINITs run (MOD_LOAD). Returns the modules' names.
pub fn kldload(ko: &LoadedKo, tunables: &[(String, String)]) -> Result<Vec<String>, LoadError> {
    let records = sets::modmetadata(ko)?;
    let mut names = Vec::new();
    for r in &records {
        if let ModRecord::Module { name, evhand, priv_, .. } = r {
            let dup = with(|e| e.modules.iter().any(|m| m.name == *name));
            if dup {
                return Err(LoadError::Bad(format!("module_register: module {name} already exists!")));
            }
            log(format!("module_register({name}, evhand {}, arg {})", ko.describe(*evhand), ko.describe(*priv_)));
            if *evhand == 0 {
                return Err(LoadError::Bad(format!("module {name} has no event handler: modevent_nop is not emulated")));
            }
            with(|e| e.modules.push(Module { name: name.clone(), handler: *evhand, arg: *priv_, id: Box::new(0) }));
            names.push(name.clone());
        }
    }
    for o in sets::sysctls(ko)? {
        log(format!("sysctl_register_oid({})", o.path));
        if let Some((_, v)) = tunables.iter().find(|(n, _)| *n == o.path) {
            load_tunable(&o, v)?;
        }
    }
    run_sysinits(ko, &sets::sysinits(ko)?, "sysinit");
    Ok(names)
}

fn run_module(ko: &LoadedKo, opts: &Options) -> Result<Report, LoadError> {
    let timeout_expiries = opts.timeouts;
    let names = kldload(ko, &opts.tunables)?;
    let ran = super::sched::run_queues(1000);
    log(format!("taskqueue threads ran {ran} tasks"));
    if timeout_expiries > 0 {
        let fired = super::sched::fire_timeouts(timeout_expiries);
        log(format!("{fired} timeout task expiries"));
    }

    let mut report = Report::default();
    if opts.qemu {
        // The driver DRIVER_MODULE registered (the only one on pci).
        let driver = with(|e| e.newbus.drivers.iter().find(|(_, (bus, _))| bus == "pci").map(|(n, _)| n.clone()));
        if let Some(driver) = driver {
            devctl_set_driver_and_attach(&driver, &mut report);
            let ran = super::sched::run_queues(1000);
            log(format!("after attach: taskqueue and kernel threads ran {ran} times"));
            with(|e| {
                report.nodes_attached = e.devs.keys().cloned().collect();
                report.disks_attached = e.disks.values().filter(|d| d.state == super::geom::DiskState::Created).map(|d| d.name.clone()).collect();
            });
            disk_io(&mut report, opts.bio_outside_guest_ram);
            if opts.burst > 0 {
                burst_io(&mut report, opts.burst);
            }
            if opts.eject {
                eject_request(&mut report);
            }
            if opts.surprise {
                surprise_removal(&mut report);
            }
            if opts.eject && opts.hot_add && report.ejected {
                hot_add(&mut report);
                // The first write left the pattern in the image: zero it, so that only the new
                // controller's write can put it back.
                zero_io_range();
                let io_before = report.io.len();
                disk_io(&mut report, false);
                report.hot_added_io_ok = report.io.len() > io_before && report.io_data_ok;
            }
            devctl_detach(&mut report);
            let ran = super::sched::run_queues(1000);
            log(format!("after detach: taskqueue and kernel threads ran {ran} times"));
        }
    }
    kldunload(ko, &names, &mut report)?;
    with(|e| {
        report.log = std::mem::take(&mut e.log);
        report.findings = std::mem::take(&mut e.findings);
        report.console = std::mem::take(&mut e.console);
    });
    Ok(report)
}

/// kldunload (not forced) of a file whose modules are `names` (see the module doc): MOD_QUIESCE
/// to every live module, the first veto ending the unload; MOD_UNLOAD to each, the first
/// refusal ending it; then the SYSUNINITs, the sysctls unregistered and the end-of-life checks.
/// Sets `report`'s quiesce, unload and unloaded.
pub fn kldunload(ko: &LoadedKo, names: &[String], report: &mut Report) -> Result<(), LoadError> {
    let mut refused = false;
    // A module whose MOD_LOAD failed was released by module_register_init: the file stays
    // loaded without it and the unload sends it nothing.
    let live: Vec<&String> = names.iter().filter(|n| with(|e| e.modules.iter().any(|m| m.name == **n))).collect();
    // Every module is asked first (MOD_QUIESCE; EOPNOTSUPP and EINVAL count as agreement) and
    // the first veto ends the unload; only then is MOD_UNLOAD sent to each.
    for name in &live {
        let mut q = mod_event(name, layouts::MOD_QUIESCE as c_int).unwrap_or(0);
        report.quiesce = Some(q);
        if q == layouts::EOPNOTSUPP || q == layouts::EINVAL {
            q = 0;
        }
        if q != 0 {
            log(format!("kldunload: {name} refused {}: error {q}", event_name(layouts::MOD_QUIESCE as c_int)));
            refused = true;
            break;
        }
    }
    if !refused {
        for name in &live {
            let u = mod_event(name, layouts::MOD_UNLOAD as c_int).unwrap_or(0);
            report.unload = Some(u);
            if u != 0 {
                log(format!("kldunload: {name} refused MOD_UNLOAD: error {u}"));
                refused = true;
                break;
            }
            with(|e| e.modules.retain(|m| m.name != **name));
        }
    }
    if !refused {
        run_sysinits(ko, &sets::sysuninits(ko)?, "sysuninit");
        for o in sets::sysctls(ko)? {
            log(format!("sysctl_unregister_oid({})", o.path));
        }
        report.unloaded = true;
        end_of_life_checks();
        super::newbus::end_of_life_checks();
        super::geom::end_of_life_checks();
        super::sysctl::end_of_life_checks();
        super::busdma::end_of_life_checks();
        super::acpi::end_of_life_checks();
    }
    Ok(())
}

/// sysctl_load_tunable_by_oid_locked (sys/kern/kern_sysctl.c): a CTLFLAG_TUN OID registered
/// while the kernel environment names it takes the value: an int or u_int is parsed (decimal,
/// or hex with 0x), a string copied up to the buffer's size (arg2) with its NUL.
pub(crate) fn load_tunable(o: &sets::SysctlOid, value: &str) -> Result<(), LoadError> {
    if o.kind & layouts::CTLFLAG_TUN as u32 == 0 {
        return Err(LoadError::Bad(format!("tunable {}: the sysctl is not CTLFLAG_TUN", o.path)));
    }
    // SAFETY: `at` is the module's struct sysctl_oid (from the linker set).
    let oid = unsafe { &*(o.at as *const layouts::sysctl_oid) };
    let bad = || LoadError::Bad(format!("tunable {}={value}: not a number", o.path));
    match o.ctl_type() {
        t if t == layouts::CTLTYPE_INT as u32 || t == layouts::CTLTYPE_UINT as u32 => {
            let v = match value.strip_prefix("0x") {
                Some(h) => i64::from_str_radix(h, 16).map_err(|_| bad())?,
                None => value.parse::<i64>().map_err(|_| bad())?,
            };
            // SAFETY: an int sysctl's arg1 is the module's int.
            unsafe { *(oid.oid_arg1 as *mut i32) = v as i32 };
        }
        t if t == layouts::CTLTYPE_STRING as u32 => {
            let size = oid.oid_arg2 as usize;
            if value.len() + 1 > size {
                return Err(LoadError::Bad(format!("tunable {}: longer than its {size}-byte buffer", o.path)));
            }
            // SAFETY: a string sysctl's arg1 is the module's buffer of arg2 bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(value.as_ptr(), oid.oid_arg1 as *mut u8, value.len());
                *(oid.oid_arg1 as *mut u8).add(value.len()) = 0;
            }
        }
        _ => return Err(LoadError::Bad(format!("tunable {}: type not supported here", o.path))),
    }
    log(format!("tunable {}={value} loaded", o.path));
    Ok(())
}

/// What an unloaded module must not leave behind.
pub(crate) fn end_of_life_checks() {
    let left = with(|e| {
        let mut f = Vec::new();
        let live: Vec<_> = e.blocks.iter().filter(|(_, b)| !b.freed).collect();
        if !live.is_empty() {
            f.push(format!("{} malloc(9) allocations ({} bytes) never freed", live.len(), live.iter().map(|(_, b)| b.size).sum::<usize>()));
        }
        for q in e.queues.values() {
            f.push(format!("taskqueue {} never freed", q.name));
        }
        for m in e.mutexes.values() {
            f.push(format!("mutex {} never destroyed{}", m.name, if m.held { " (held)" } else { "" }));
        }
        if !e.armed_callouts.is_empty() {
            f.push(format!("{} callouts still armed", e.armed_callouts.len()));
        }
        if !e.armed_timeouts.is_empty() {
            f.push(format!("{} timeout tasks still armed", e.armed_timeouts.len()));
        }
        if !e.drivers.is_empty() {
            f.push(format!("drivers still registered: {:?}", e.drivers));
        }
        for n in e.devs.keys() {
            f.push(format!("device node {n} never destroyed"));
        }
        if e.topo_locked {
            f.push("the newbus topology lock is still held".to_string());
        }
        f
    });
    for l in left {
        super::finding(format!("after unload: {l}"));
    }
}
