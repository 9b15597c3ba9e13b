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
//! Unload (kern_kldunload -> linker_file_unload): MOD_QUIESCE to every module of the file,
//! EOPNOTSUPP or EINVAL counting as agreement, stopping at the first veto (`kldunload -f`,
//! LINKER_UNLOAD_FORCE: a veto is ignored and the unload goes on, [`Options::kldunload_force`]); then
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
use nvmehp_lab::machine::MsixPlacement;
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
    /// With `unmapped_bios`: the unmapped write's and read's errors, and whether the data went
    /// from the write's pages to the medium and from the medium into the read's pages.
    pub unmapped_io: Option<(c_int, c_int, bool)>,
    /// With `eject`: the notifies delivered, as (slot, value, handlers called), and whether the
    /// function left pci0 and QEMU reported DEVICE_DELETED.
    pub notifies: Vec<(u8, u32, usize)>,
    /// With `namespace`: each namespace step's outcome ([`Step::Namespace`]).
    pub namespaces: Vec<NsStep>,
    pub ejected: bool,
    /// With `hot_add`: whether the hot-added function got attached, and its write and read.
    pub hot_added: bool,
    pub hot_added_io_ok: bool,
    /// With `surprise`: whether the function left pci0 after the surprise removal.
    pub surprise_detected: bool,
    /// With a surprise removal that had writes in flight: each one's bio_error (-1: never
    /// done), and how many of those done without error are not in the image file.
    pub in_flight: Vec<c_int>,
    pub in_flight_lost: usize,
    /// With `read_in_flight`: the read's bio_error once the module finished with it (-1: never
    /// done, the module kept it).
    pub read_in_flight: Option<c_int>,
    /// With `bad_bios`: each hostile bio ([`BAD_BIOS`]) and its end: bio_error and bio_resid
    /// (error -1: not done within 2 s).
    pub bad_bios: Vec<(String, c_int, i64)>,
    /// The disk the I/O steps use and QEMU's image file behind it: the first controller's
    /// after attach, the hot-added one's after a hot-add.
    pub target: Option<Target>,
    /// With `shutdown`: each attached function's DEVICE_SHUTDOWN, as (location, name,
    /// result), and the write sent to the target disk afterwards: its bio_error (-1: never
    /// done) and whether its data reached the image file.
    pub shutdown: Vec<(String, String, c_int)>,
    pub after_shutdown_write: Option<(c_int, bool)>,
    /// The unload was refused: the malloc(9) allocations (count, bytes) still held then. The
    /// module stays loaded with them, as FreeBSD keeps a module whose unload it refused: they
    /// are not leaks (the leak check is one of the unload's end-of-life checks).
    pub kept_loaded: Option<(usize, usize)>,
}

/// What one [`Step::Namespace`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsStep {
    pub op: Option<super::ns_admin::NsOp>,
    pub nsid: u32,
    /// QEMU completed the Namespace Attachment command without error.
    pub sent: bool,
    /// The module rescanned (its `namespaces changed:` line; not a failed or refused rescan).
    pub rescanned: bool,
    /// Disks created and gone (withered or destroyed) during the step.
    pub disks_added: Vec<String>,
    pub disks_gone: Vec<String>,
    /// `detach+read`: the bio_error of the read sent to the namespace's disk after the detach,
    /// before the module's threads ran (-1: never done).
    pub early_read: Option<c_int>,
    /// After an attach or a reformat: a read of the new disk gave the data on the medium.
    pub read_ok: Option<bool>,
}

/// A disk and the image file QEMU keeps its namespace in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub disk: String,
    pub image: std::path::PathBuf,
}

/// The created disks, by name (a disk that went away is not one), in unit order: the first
/// is the first attached controller's (`nvmehpd0` before `nvmehpd1`), whatever the order of
/// their host addresses.
fn created_disks() -> Vec<String> {
    let mut d: Vec<String> = with(|e| e.disks.values().filter(|d| d.state == super::geom::DiskState::Created).map(|d| d.name.clone()).collect());
    d.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    d
}

/// Offset and size of the test I/O.
pub const IO_OFFSET: i64 = 8192;
pub const IO_BYTES: usize = 4096;

/// The test write's data, [`IO_PATTERN`]: no two neighbouring bytes alike, so a shifted,
/// partial or zeroed copy cannot pass for it.
pub fn io_pattern() -> Vec<u8> {
    (0..IO_BYTES).map(|i| (i as u8).wrapping_mul(7) ^ 0x5a).collect()
}

/// [`io_pattern`] in words.
pub const IO_PATTERN: &str = "byte i = (7 * i mod 256) XOR 0x5a";

/// A write and a read of the target disk, as a consumer opening it would do them, and the
/// data checked in QEMU's backing file. The bios' data live in guest RAM, as a kernel buffer
/// a bio carries is memory the device can reach by DMA (busdma translates it page by page);
/// with `outside_guest_ram` they are host memory instead, which busdma must refuse.
fn disk_io(report: &mut Report, outside_guest_ram: bool) {
    let Some(Target { disk, image }) = report.target.clone() else { return };
    let pattern = io_pattern();
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

/// Where the write after a shutdown goes (away from the test I/O's and the bursts' blocks).
pub const SHUTDOWN_WRITE_OFFSET: i64 = 12 * 4096;

/// reboot(8) as far as drivers see it: kern_reboot's `shutdown_post_sync` handlers run
/// bus_generic_shutdown from the root (sys/kern/subr_bus.c), which calls device_shutdown on
/// each child in order: DEVICE_SHUTDOWN of every attached function, without the topology
/// lock. Then, as a consumer still holding the disk would, a 4 KiB write is sent to the
/// target disk: a driver that shut its controller down must fail it, and its data must not
/// reach the medium.
fn shutdown(report: &mut Report) {
    log("reboot: shutdown_post_sync: bus_generic_shutdown(root0)".to_string());
    for child in super::newbus::pci_functions() {
        if super::newbus::state(child) < layouts::DS_ATTACHED {
            continue;
        }
        let r = super::newbus::device_shutdown(child);
        report.shutdown.push((location(child), super::newbus::nameunit(child), r));
    }
    super::sched::run_kernel_threads();
    let Some(Target { disk, image }) = report.target.clone() else { return };
    let Some(p) = super::machine::with_machine(|m| m.contig_alloc(IO_BYTES as u64, 0, u64::MAX, 4096, 0)) else {
        report.after_shutdown_write = Some((layouts::ENOMEM, false));
        return;
    };
    // SAFETY: IO_BYTES bytes of the shared guest RAM mapping, handed out to nobody else,
    // alive until the machine stops.
    let w = unsafe { std::slice::from_raw_parts_mut(p, IO_BYTES) };
    let pattern: Vec<u8> = io_pattern().iter().map(|b| !b).collect();
    w.copy_from_slice(&pattern);
    let opened = super::geom::open(&disk);
    let e = super::geom::io(&disk, layouts::BIO_WRITE as u32, SHUTDOWN_WRITE_OFFSET, w, std::time::Duration::from_secs(5));
    if opened == 0 {
        super::geom::close(&disk);
    }
    let at = SHUTDOWN_WRITE_OFFSET as usize;
    let landed = std::fs::read(&image).ok().is_some_and(|b| b.get(at..at + IO_BYTES) == Some(&pattern[..]));
    log(format!("write to {disk} after the shutdown (d_open {opened}): bio_error {e}; in the backing file: {}", if landed { "yes" } else { "no" }));
    report.after_shutdown_write = Some((e, landed));
}

/// Page `i` of a burst: byte `j`.
fn burst_pattern(i: usize, j: usize) -> u8 {
    (i as u8) ^ (j as u8).wrapping_mul(13) ^ 0xa5
}

/// Bios' data: (disk offset, buffer) each.
type Pages = Vec<(i64, &'static mut [u8])>;

/// `n` 4 KiB buffers in guest RAM (never handed out again, never freed), page `i` filled with
/// [`burst_pattern`] of `i` and bound for offset `BURST_OFFSET + i * 4096`. An error is the
/// report's I/O entry saying why not.
fn burst_buffers(n: usize) -> Result<Pages, (String, c_int)> {
    if BURST_OFFSET as usize + n * IO_BYTES > super::machine::IMAGE_BYTES as usize {
        return Err((format!("burst of {n}: larger than the disk"), layouts::EINVAL));
    }
    let p = super::machine::with_machine(|m| m.contig_alloc((n * IO_BYTES) as u64, 0, u64::MAX, 4096, 0));
    let Some(p) = p else { return Err((format!("guest RAM for a burst of {n}"), layouts::ENOMEM)) };
    // SAFETY: n * IO_BYTES bytes of the shared guest RAM mapping, handed out to nobody else,
    // alive until the machine stops (after the run's last step).
    let all = unsafe { std::slice::from_raw_parts_mut(p, n * IO_BYTES) };
    Ok(all
        .chunks_mut(IO_BYTES)
        .enumerate()
        .map(|(i, c)| {
            for (j, b) in c.iter_mut().enumerate() {
                *b = burst_pattern(i, j);
            }
            (BURST_OFFSET + (i * IO_BYTES) as i64, c)
        })
        .collect())
}

/// How many of the burst's pages `which` do not hold their pattern in `image`.
fn burst_pages_wrong(image: &std::path::Path, which: impl Iterator<Item = usize>) -> usize {
    let on_disk = std::fs::read(image).unwrap_or_default();
    which
        .filter(|&i| {
            let at = BURST_OFFSET as usize + i * IO_BYTES;
            on_disk.get(at..at + IO_BYTES).is_none_or(|d| d.iter().enumerate().any(|(j, &b)| b != burst_pattern(i, j)))
        })
        .count()
}

/// `n` 4 KiB writes from guest RAM sent to the target disk at once ([`burst_buffers`]); then
/// the backing file checked.
fn burst_io(report: &mut Report, n: usize) {
    let Some(Target { disk, image }) = report.target.clone() else { return };
    let mut bufs = match burst_buffers(n) {
        Ok(b) => b,
        Err(e) => return report.io.push(e),
    };
    let mut bufs: Vec<(i64, &mut [u8])> = bufs.iter_mut().map(|(o, b)| (*o, &mut **b)).collect();
    let d = super::geom::open(&disk);
    let writes = super::geom::start_burst(&disk, layouts::BIO_WRITE as u32, &mut bufs);
    // A cache flush right behind the writes, as a filesystem sends BIO_FLUSH after its
    // writes: with every tracker busy it waits in the driver's bio queue like them, and has no
    // data of its own.
    // SAFETY: a flush has no data (length 0, no pointer used).
    let flush = unsafe { super::geom::submit_any(&disk, BIO_FLUSH, 0, 0, std::ptr::null_mut()) };
    let errors = writes.map_or_else(|| vec![layouts::ENXIO; n], |w| super::geom::finish_burst(w, std::time::Duration::from_secs(30)));
    let flushed = match flush {
        Ok(bp) => wait_bio(bp, std::time::Duration::from_secs(10)).map_or(-1, |(e, _)| e),
        Err(e) => e,
    };
    log(format!("burst: the BIO_FLUSH behind the writes: {}", if flushed < 0 { "not done".to_string() } else { format!("error {flushed}") }));
    super::geom::close(&disk);
    let failed = errors.iter().filter(|&&e| e != 0).count();
    report.io.push((format!("burst d_open {disk}"), d));
    report.io.push((format!("burst of {n} BIO_WRITE {disk}: bios not done without error"), failed as c_int));
    report.io.push((format!("burst's BIO_FLUSH {disk}"), flushed));
    let wrong = burst_pages_wrong(&image, 0..n);
    report.io.push((format!("burst of {n}: pages not on the medium"), wrong as c_int));
    log(format!("burst: {n} writes, {failed} failed, {wrong} pages not in the backing file"));
}

/// sys/sys/bio.h BIO_FLUSH.
const BIO_FLUSH: u16 = 0x05;

/// Waits up to `timeout` for `bp` (from [`super::geom::submit_any`]) to be done, letting the
/// kernel's threads run meanwhile; its (bio_error, bio_resid), or None if it is still the
/// driver's (then not freed: the driver may complete it later).
fn wait_bio(bp: *mut layouts::bio, timeout: std::time::Duration) -> Option<(c_int, i64)> {
    let start = std::time::Instant::now();
    loop {
        // SAFETY: `bp` from submit_any, not yet returned as done; its resid is read before
        // bio_done frees it.
        let resid = unsafe { (*bp).bio_resid };
        // SAFETY: as above.
        if let Some(e) = unsafe { super::geom::bio_done(bp) } {
            return Some((e, resid));
        }
        if start.elapsed() > timeout {
            return None;
        }
        if super::sched::run_queues(1000) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
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
    /// With `eject` or `surprise`: then a controller hot-added to slot 5, empty since boot (QMP `device_add`): the GPE
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
    /// With `surprise`: this many 4 KiB writes sent to the disk just before the removal and
    /// not waited for ([`Step::Surprise`]).
    pub in_flight: usize,
    /// With `surprise`: before it, one 4 KiB read sent to the disk and left in flight while
    /// time passes ([`Step::ReadInFlight`]).
    pub read_in_flight: bool,
    /// With `qemu`: after the I/O, the bios of [`BAD_BIOS`] sent to the disk one by one
    /// ([`Step::BadBios`]).
    pub bad_bios: bool,
    /// With `qemu`: after the I/O, an unmapped write and read ([`Step::UnmappedIo`]).
    pub unmapped_bios: bool,
    /// With `qemu`: the steps to run instead of those the flags above describe
    /// ([`Options::effective_plan`]).
    pub plan: Option<Plan>,
    /// After MOD_LOAD (and with `qemu` after the attach step), a process opens and closes every
    /// device node: d_open and d_close run with the thread counted in the node
    /// ([`super::devfs::open_and_close_all`]).
    pub open_nodes: bool,
    /// After MOD_LOAD (and with `qemu` after the attach step), a consumer opens every disk and
    /// keeps it open until the unload returned (a process holding /dev/<disk> open across a
    /// removal): GEOM holds each withered disk's d_gone back until then.
    pub hold_disks_open: bool,
    /// After MOD_LOAD, a process reads every node that has a d_read, each on its own thread,
    /// and stays inside until d_read returns ([`super::devfs::park_readers`]).
    pub park_readers: bool,
    /// With `qemu`: INTx lines are never delivered to their handlers (a negative control for
    /// a driver on INTx, e.g. with [`super::pci_tunables::INTX_ONLY_TUNABLES`]: only its own
    /// polling can complete its I/O).
    pub intx_undelivered: bool,
    /// After a refused kldunload (EBUSY), the kernel's threads run (the module's own work, e.g.
    /// its hotplug task resuming) and kldunload is tried again, at most this many times, as an
    /// administrator repeats it.
    pub kldunload_retries: usize,
    /// `kldunload -f` (sys/kern/kern_linker.c linker_file_unload with LINKER_UNLOAD_FORCE):
    /// a module's MOD_QUIESCE veto is logged and ignored, and MOD_UNLOAD is sent anyway (whose
    /// own refusal, e.g. a detach that refuses in driver_module_handler, still keeps the file).
    /// Retries are forced too.
    pub kldunload_force: bool,
    /// With `qemu`: nvme(4) is in the kernel, as in GENERIC ([`super::stock_nvme`]): its
    /// driver is on pci before the module loads and takes the boot-time controller.
    pub stock_nvme: bool,
    /// With `qemu`: before the final detach, reboot(8)'s DEVICE_SHUTDOWN of every attached
    /// function and a write after it ([`Step::Shutdown`]).
    pub shutdown: bool,
    /// With `qemu` and `acpi`: after the removal and hot-add steps, the firmware's
    /// `Notify(Sxx_, value)` on each (slot, value), with no change in the machine.
    pub notify: Vec<(u8, u32)>,
    /// With `qemu`: after the last step, one MSI-X message on every vector that still has a
    /// handler set up and is unmasked, as the function's late message would come
    /// ([`super::pci::deliver_msix_messages`]), and the interrupt threads run: a handler a
    /// failed `bus_teardown_intr` left installed must still be safe to run then.
    pub late_msix: bool,
    /// With `qemu`: QEMU's q35 (ICH9) instead of pc: the controller sits behind the
    /// `pcie-root-port` in slot 4 (00:04.0, a pcib with its own pci bus; the controller is
    /// device 0.0 on that bus), `hot_add` plugs behind slot 5's port, and with `acpi` the
    /// namespace is q35's ([`super::acpi`]): the notifies go to the ports' `S00_`.
    pub q35: bool,
    /// With `q35`: the module loads before the root ports' pci buses attach (from
    /// loader.conf, before newbus's configure pass reached them): each port's pcib is there,
    /// its bus is added and enumerated ([`super::pcib::attach_bus`]) once the taskqueue threads
    /// ran what MOD_LOAD queued, and then one timeout task expiry is let pass.
    pub bridge_buses_late: bool,
    /// With `q35`: after the I/O, for each root port slot: `devctl detach` of its pcib (its
    /// bus and the functions on it deleted, [`Step::DetachBridge`]), the firmware's device
    /// check and eject request on its `S00_` while the bus is gone (`Notify` 1, then 3, with
    /// nothing changed in the machine), and `devctl attach` of the pcib ([`Step::AttachBridge`]).
    pub bridge_detached: Vec<u8>,
    /// With `qemu`: pci(4) offers an emulated MSI capability (one message) over QEMU's NVMe
    /// function, instead of or besides its MSI-X one ([`super::msi`]).
    pub msi: super::msi::Mode,
    /// With `qemu`: every controller plugged with `msix-exclusive-bar=on`, its MSI-X table and
    /// PBA in BAR4 instead of BAR0, as on bhyve ([`nvmehp_lab::machine::MsixPlacement`]).
    pub msix_exclusive_bar: bool,
    /// With `msi`: the emulated messages are never delivered (a negative control: only the
    /// driver's polling can complete its I/O).
    pub msi_undelivered: bool,
    /// With `qemu` (pc): the controller is in an NVMe subsystem with two namespaces and a
    /// lab-private second controller ([`super::ns_admin`]); after the I/O, each (op, nsid) in
    /// order is done to the module's controller's namespace ([`Step::Namespace`]),
    /// each followed by the I/O step on the first disk.
    pub namespace: Vec<(super::ns_admin::NsOp, u32)>,
    /// With `qemu`: after the I/O, these attributes asked of every disk ([`Step::Getattr`]).
    pub getattr: Vec<(String, usize)>,
    /// With `namespace`: where the NVMe subsystem's controller is, as (slot, function); `None`
    /// is the controller's slot 4, function 0. Another place must be a function of a
    /// `multifunction` slot.
    pub subsystem_at: Option<(u8, u8)>,
    /// nvme(4)'s stand-in ([`super::stock_nvme`]) in the kernel, bidding only for these
    /// functions (as (slot, function)): the others were given to the module (`devctl set
    /// driver`). Empty: as `stock_nvme` says.
    pub stock_nvme_at: Vec<(u8, u8)>,
    /// With `qemu` (pc): cold multi-function slots, as (slot, functions): an NVMe controller
    /// at each function, function 0 plugged with `multifunction=on`.
    pub multifunction: Vec<(u8, Vec<u8>)>,
    /// With `qemu`: after the attach step, a consumer opens each of these disks and keeps it
    /// open until the unload returned (as `hold_disks_open`, for the named disks only).
    pub hold_open: Vec<String>,
    /// GEOM's event thread stalled from the first kldunload until one that reached MOD_UNLOAD
    /// returned, or for [`super::geom::STALL_SLEEPS`] sleeps of the module
    /// ([`super::geom::set_stalled`]): the d_gone callbacks of the disks the unload's own
    /// detaches gave up are still queued when MOD_UNLOAD checks them.
    pub geom_stalled: bool,
    /// With `qemu`: after the attach and I/O steps, `devctl delete` of the function at each
    /// (slot, function) ([`Step::DevctlDelete`]).
    pub devctl_delete: Vec<(u8, u8)>,
    /// With `acpi` (pc): after the removal and hot-add steps, QMP `device_add` of a
    /// controller at each (slot, function), in order ([`Step::HotAddFunction`]).
    pub hot_add_functions: Vec<(u8, u8)>,
    /// With `acpi`: then the platform's removal request for each slot, whatever functions it
    /// holds ([`Step::EjectSlot`]).
    pub eject_slots: Vec<u8>,
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
    for child in super::newbus::pci_functions() {
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
    for child in super::newbus::pci_functions() {
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

/// Whether newbus has a function in scenario slot `slot` (pc: on pci0 at device `slot`; q35:
/// behind the root port in `slot`, on its pciN).
fn in_slot(slot: u8) -> bool {
    super::newbus::pci_functions().into_iter().any(|c| slot_of_child(c) == Some(slot))
}

fn slot_of_child(dev: u64) -> Option<u8> {
    with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).map(|p| super::machine::slot_of(p.bdf)))
}

/// Where the function of scenario slot `slot` is, as the log names it: (its location on its
/// bus, that bus): pc `device 4.0` on `pci0`; q35 `device 0.0` on the root port's `pciN`.
fn place(slot: u8) -> (String, String) {
    let q35 = super::machine::with_machine(|m| m.kind() == nvmehp_lab::qemu::MachineKind::Q35);
    match super::pcib::bridge_at(slot).and_then(super::pcib::bus_below).filter(|_| q35) {
        Some(bus) => ("device 0.0".into(), super::newbus::nameunit(bus)),
        None => (format!("device {slot}.0"), "pci0".into()),
    }
}

/// QMP `device_del` of the controller `id` in `slot`, then the SCI's work and the module's
/// tasks until the function is gone from pci0 (at most 5 s), then QEMU's `DEVICE_DELETED`
/// awaited (2 s).
fn eject_request(report: &mut Report, slot: u8, id: &str) {
    use super::machine::with_machine;
    let r = with_machine(|m| m.request_unplug(slot));
    log(format!("QMP device_del {id}: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    if r.is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while in_slot(slot) && std::time::Instant::now() < deadline {
        for (slot, value, n) in super::acpi::run_gpe() {
            report.notifies.push((slot, value, n));
        }
        super::sched::run_queues(1000);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let gone = !in_slot(slot);
    let (at, bus) = place(slot);
    log(format!("after the eject request: {at} {} {bus}", if gone { "deleted from" } else { "still on" }));
    let deleted = with_machine(|m| m.deleted(id, std::time::Duration::from_secs(2)) && !m.slot_present(slot));
    log(format!("QMP: DEVICE_DELETED {id}: {}", if deleted { "received" } else { "not received" }));
    report.ejected = gone && deleted;
}

/// The lab's surprise removal of controller `id` in `slot`: `_EJ0`'s register write with no
/// `device_del` first (QEMU removes the function at once, no SCI), then time passes in steps
/// of one callout period (at most 30), the taskqueues running after each, until the function
/// left pci0. QEMU's `DEVICE_DELETED` is then looked for, 0.5 s at most, and told, not
/// required: after this eject write it came within 3 s in only about half of the runs tried
/// here, with or without writes in flight (nvmehp_lab::qmp `wait_deleted` notes that QEMU
/// leaks a device whose backend still has requests).
///
/// With `in_flight` > 0, that many 4 KiB writes ([`burst_buffers`]) are sent to the target
/// disk just before, not waited for, and no thread of the driver runs between them and the
/// removal: those the controller had not completed can only end by the driver's own
/// detection (ENXIO). Afterwards each one's end is recorded, and a write done without error
/// must be in the image file.
fn surprise_removal(report: &mut Report, slot: u8, id: &str, in_flight: usize) {
    use super::machine::with_machine;
    let mut sent = None;
    if in_flight > 0 {
        let Some(Target { disk, image }) = report.target.clone() else {
            report.io.push(("writes in flight at the surprise removal: no disk".to_string(), layouts::ENXIO));
            return;
        };
        match burst_buffers(in_flight) {
            Ok(mut bufs) => {
                // The consumer keeps the disk open until its writes have ended; GEOM calls
                // d_gone only after that close. The pages are guest RAM, kept until the machine
                // stops: dropping `bufs` at the end of this block frees nothing the bios use.
                report.io.push((format!("in-flight d_open {disk}"), super::geom::open(&disk)));
                let mut b: Vec<(i64, &mut [u8])> = bufs.iter_mut().map(|(o, b)| (*o, &mut **b)).collect();
                sent = super::geom::start_burst(&disk, layouts::BIO_WRITE as u32, &mut b).map(|f| (f, disk, image));
            }
            Err(e) => return report.io.push(e),
        }
    }
    let (at, bus) = place(slot);
    let r = with_machine(|m| m.eject(slot).map_err(|e| e.to_string()));
    let bit = if bus == "pci0" { format!("PCEJ bit {slot}") } else { format!("PCEJ bit 0 (with the BSEL of slot {slot}'s root port)") };
    log(format!("surprise removal: {bit} written with no device_del: {r:?}"));
    let mut steps = 0;
    while in_slot(slot) && steps < 30 {
        steps += 1;
        let fired = super::sched::fire_callouts();
        super::sched::run_queues(1000);
        for n in super::acpi::run_gpe() {
            report.notifies.push(n);
        }
        if fired == 0 && in_slot(slot) {
            break; // nothing armed: time passing changes nothing
        }
    }
    let gone = !in_slot(slot);
    log(format!("after the surprise removal: {at} {} {bus} after {steps} callout periods", if gone { "deleted from" } else { "still on" }));
    report.surprise_detected = gone;
    let deleted = with_machine(|m| m.deleted(id, std::time::Duration::from_millis(500)));
    log(format!("QMP: DEVICE_DELETED {id}: {}", if deleted { "received" } else { "not received within 0.5 s (not required)" }));
    if let Some((bios, disk, image)) = sent {
        let errors = super::geom::finish_burst(bios, std::time::Duration::from_secs(10));
        // The consumer, its writes ended (and the provider orphaned), closes; then GEOM can
        // destroy the provider and call d_gone.
        report.io.push((format!("in-flight d_close {disk}"), super::geom::close(&disk)));
        super::sched::run_queues(1000);
        let ok: Vec<usize> = errors.iter().enumerate().filter(|(_, &e)| e == 0).map(|(i, _)| i).collect();
        report.in_flight_lost = burst_pages_wrong(&image, ok.iter().copied());
        log(format!(
            "in flight at the surprise removal: {} writes, {} done without error ({} of them not in the backing file), {} failed with ENXIO, {} other errors, {} never done",
            errors.len(),
            ok.len(),
            report.in_flight_lost,
            errors.iter().filter(|&&e| e == layouts::ENXIO).count(),
            errors.iter().filter(|&&e| e > 0 && e != layouts::ENXIO).count(),
            errors.iter().filter(|&&e| e < 0).count()
        ));
        report.in_flight = errors;
    }
}

/// How long [`read_in_flight`] lets time pass at most: the module's command timeout (the
/// test sets it short) and a stop of a controller ignoring the disable (shutdown bound 5 s +
/// CAP.TO) fit in it.
const READ_IN_FLIGHT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// One 4 KiB read of the target disk sent by a consumer that keeps the disk open, not waited
/// for; then time passes (every armed callout fires once per 100 ms, the taskqueues run in
/// between) until the read is done or no callout is armed any more: the module's watchdog
/// stops re-arming once it gave the controller up, and the stop it then runs (in its task,
/// within [`super::sched::run_queues`]) decided the read's fate. A read the module keeps is
/// left with it (never freed here: the driver may still complete it), and the consumer then
/// closes the disk as a process would never do while its read waits in biowait, so that GEOM
/// can finish with the disk after the removal that follows. The data is guest RAM, as a
/// kernel buffer is memory the device can reach, and never freed.
fn read_in_flight(report: &mut Report) -> bool {
    let Some(Target { disk, .. }) = report.target.clone() else {
        report.io.push(("a read in flight: no disk".to_string(), layouts::ENXIO));
        return false;
    };
    let Some(p) = super::machine::with_machine(|m| m.contig_alloc(IO_BYTES as u64, 0, u64::MAX, 4096, 0)) else {
        report.io.push(("guest RAM for the read in flight".to_string(), layouts::ENOMEM));
        return false;
    };
    report.io.push((format!("read-in-flight d_open {disk}"), super::geom::open(&disk)));
    // SAFETY: IO_BYTES of guest RAM handed out to nobody else and never freed, so it stays
    // valid for as long as the driver might complete the bio.
    let bp = match unsafe { super::geom::submit(&disk, layouts::BIO_READ as u32, BURST_OFFSET, p, IO_BYTES) } {
        Ok(bp) => bp,
        Err(e) => {
            report.io.push((format!("read in flight to {disk}"), e));
            return false;
        }
    };
    let start = std::time::Instant::now();
    let mut last_fire = start;
    let mut periods = 0;
    let result = loop {
        super::sched::run_queues(1000);
        // SAFETY: `bp` came from submit and is returned as done at most once (we stop here).
        if let Some(e) = unsafe { super::geom::bio_done(bp) } {
            break e;
        }
        if start.elapsed() > READ_IN_FLIGHT_MAX {
            break -1;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        if last_fire.elapsed() >= std::time::Duration::from_millis(100) {
            last_fire = std::time::Instant::now();
            periods += 1;
            if super::sched::fire_callouts() == 0 {
                super::sched::run_queues(1000);
                // SAFETY: as above.
                break unsafe { super::geom::bio_done(bp) }.unwrap_or(-1);
            }
        }
    };
    log(format!(
        "the read in flight after {periods} callout periods: {}",
        if result < 0 { "never done: the module keeps it".to_string() } else { format!("done, error {result}") }
    ));
    report.read_in_flight = Some(result);
    if result < 0 {
        log(format!("the consumer closes {disk} although its read never ended (a process would stay in biowait)"));
    }
    report.io.push((format!("read-in-flight d_close {disk}"), super::geom::close(&disk)));
    super::sched::run_queues(1000);
    true
}

/// Bios no GEOM consumer should send and a driver must refuse itself, without allocating or
/// touching the device (GEOM's own `g_io_check` stops most, but a driver is called by other
/// paths too, and its arithmetic must not wrap): (command, offset, length). The lengths
/// are against the 16 MiB, 512-byte-sector namespace and a `d_maxsize` of QEMU's 512 KiB
/// MDTS; the negative lengths and offsets are on purpose.
pub const BAD_BIOS: &[(u16, i64, i64)] = &[
    (layouts::BIO_READ as u16, 0, -512),
    (layouts::BIO_WRITE as u16, -4096, 4096),
    (layouts::BIO_READ as u16, 100, 512),
    (layouts::BIO_READ as u16, 0, 1 << 20),
    (layouts::BIO_READ as u16, IMAGE_BYTES_I64, 512),
    (layouts::BIO_READ as u16, IMAGE_BYTES_I64 - 512, 1024),
    (layouts::BIO_READ as u16, i64::MAX & !511, 512),
    (0x03, 0, 512), // BIO_DELETE: the disk does not advertise DISKFLAG_CANDELETE
    (layouts::BIO_READ as u16, 0, 0),
];
const IMAGE_BYTES_I64: i64 = super::machine::IMAGE_BYTES as i64;

/// Sends each bio of [`BAD_BIOS`] to the target disk (a consumer holding it open), with one
/// guest-RAM page as its data whatever its length, and waits up to 2 s for it to end. Done
/// when every one ended; what each ended with is the report's and the test's to judge.
fn bad_bios(report: &mut Report) -> bool {
    let Some(Target { disk, .. }) = report.target.clone() else { return false };
    let Some(page) = super::machine::with_machine(|m| m.contig_alloc(IO_BYTES as u64, 0, u64::MAX, 4096, 0)) else {
        report.io.push(("guest RAM for the bad bios".to_string(), layouts::ENOMEM));
        return false;
    };
    report.io.push((format!("bad-bios d_open {disk}"), super::geom::open(&disk)));
    let mut all = true;
    for &(cmd, offset, length) in BAD_BIOS {
        let what = format!("{} offset {offset} length {length}", super::geom::bio_cmd_name(cmd));
        // SAFETY: `page` is IO_BYTES of guest RAM nobody else uses, never freed; a driver that
        // used more of it than that would read or write the DMA pool after it, still guest RAM.
        let bp = match unsafe { super::geom::submit_any(&disk, cmd, offset, length, page) } {
            Ok(bp) => bp,
            Err(e) => {
                report.bad_bios.push((what, e, 0));
                all = false;
                continue;
            }
        };
        let end = wait_bio(bp, std::time::Duration::from_secs(2));
        log(format!("bad bio {what}: {}", end.map_or("not done within 2 s".to_string(), |(e, r)| format!("error {e}, resid {r}"))));
        let (e, r) = end.unwrap_or((-1, 0));
        all &= end.is_some();
        report.bad_bios.push((what, e, r));
    }
    report.io.push((format!("bad-bios d_close {disk}"), super::geom::close(&disk)));
    all
}

/// Where the unmapped write and read go (past the single write and read, before the bursts).
pub const UNMAPPED_OFFSET: i64 = 16 * 1024;
/// Their length: two pages' worth, spread over three pages by the offset into the first.
const UNMAPPED_BYTES: usize = 2 * 4096;
/// Where the data starts in the first page.
const UNMAPPED_MA_OFFSET: usize = 512;

/// [`Step::UnmappedIo`]: as GEOM passes a consumer's pages to a disk that accepts unmapped
/// bios (src/emu/unmapped.rs), a write of [`UNMAPPED_BYTES`] at [`UNMAPPED_OFFSET`] from guest
/// pages 4, 2 and 0 of a fresh six-page block (in that order: neither adjacent nor ascending),
/// starting [`UNMAPPED_MA_OFFSET`] into the first, then a read into pages 5, 3 and 1 the same
/// way; each waited for (10 s). Done when both ended without error, the medium holds the
/// written bytes and the read's pages hold them at the same places.
fn unmapped_io(report: &mut Report) -> bool {
    let Some(Target { disk, image }) = report.target.clone() else { return false };
    let Some(block) = super::machine::with_machine(|m| m.contig_alloc(6 * 4096, 0, u64::MAX, 4096, 0)) else {
        report.io.push(("guest RAM for the unmapped bios".to_string(), layouts::ENOMEM));
        return false;
    };
    let Some(base) = super::machine::with_machine(|m| m.phys_of(block as u64)) else { return false };
    // SAFETY: six pages of the shared guest RAM mapping, handed out to nobody else, alive until
    // the machine stops (after this run).
    let mem = unsafe { std::slice::from_raw_parts_mut(block, 6 * 4096) };
    mem.fill(0);
    let pattern: Vec<u8> = (0..UNMAPPED_BYTES).map(|i| (i as u8).wrapping_mul(13) ^ 0xa5).collect();
    // Where each byte of the payload sits in the block: (offset in the block, payload offset, length).
    let spans = |pages: [usize; 3]| -> Vec<(usize, usize, usize)> {
        let (mut at, mut off, mut out) = (0, UNMAPPED_MA_OFFSET, Vec::new());
        for p in pages {
            let n = (4096 - off).min(UNMAPPED_BYTES - at);
            out.push((p * 4096 + off, at, n));
            at += n;
            off = 0;
        }
        out
    };
    let (wpages, rpages) = ([4, 2, 0], [5, 3, 1]);
    for (m, at, n) in spans(wpages) {
        mem[m..m + n].copy_from_slice(&pattern[at..at + n]);
    }
    report.io.push((format!("unmapped d_open {disk}"), super::geom::open(&disk)));
    let phys = |pages: [usize; 3]| -> Vec<u64> { pages.iter().map(|&p| base + p as u64 * 4096).collect() };
    let mut errors = [0; 2];
    for (i, (cmd, pages)) in [(layouts::BIO_WRITE, wpages), (layouts::BIO_READ, rpages)].into_iter().enumerate() {
        // SAFETY: the pages are this function's block of guest RAM, untouched until the bio ends.
        let bp = match unsafe { super::unmapped::submit(&disk, cmd as u16, UNMAPPED_OFFSET, UNMAPPED_BYTES, &phys(pages), UNMAPPED_MA_OFFSET) } {
            Ok(bp) => bp,
            Err(e) => {
                errors[i] = e;
                continue;
            }
        };
        let start = std::time::Instant::now();
        errors[i] = loop {
            // SAFETY: from unmapped::submit, not yet returned as done.
            if let Some(e) = unsafe { super::unmapped::done(bp) } {
                break e;
            }
            if start.elapsed() > std::time::Duration::from_secs(10) {
                log(format!("unmapped bio {bp:p} not done after 10 s"));
                break -1;
            }
            if super::sched::run_queues(1000) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
    }
    report.io.push((format!("unmapped d_close {disk}"), super::geom::close(&disk)));
    let start = UNMAPPED_OFFSET as usize;
    let on_disk = std::fs::read(&image).ok().map(|b| b[start..start + UNMAPPED_BYTES].to_vec());
    let medium_ok = on_disk.as_deref() == Some(&pattern[..]);
    let read_ok = spans(rpages).into_iter().all(|(m, at, n)| mem[m..m + n] == pattern[at..at + n]);
    let ok = errors == [0, 0] && medium_ok && read_ok;
    log(format!(
        "unmapped bios: write error {}, read error {}; backing file {} at {start}: {}; read pages: {}",
        errors[0],
        errors[1],
        image.display(),
        if medium_ok { "the written data" } else { "NOT the written data" },
        if read_ok { "the written data" } else { "NOT the written data" }
    ));
    report.unmapped_io = Some((errors[0], errors[1], medium_ok && read_ok));
    ok
}

/// QMP `blockdev-add` of a new zeroed image and `device_add` of controller `id` into `slot`
/// (the lab's plug), then the SCI's work and the module's tasks until a function in that slot
/// is attached (at most 5 s). On success the new disk (the created one that was not there
/// before) becomes the I/O steps' target, on the new image: only the new controller's write
/// can put the data there.
fn hot_add(report: &mut Report, slot: u8, id: &str) {
    use super::machine::with_machine;
    report.target = None;
    let before = created_disks();
    let spec = nvmehp_lab::scenario::ControllerSpec {
        id: id.to_string(),
        slot,
        namespaces: vec![nvmehp_lab::scenario::NamespaceSpec { nsid: 1, size_mib: (super::machine::IMAGE_BYTES >> 20) as u32, lba: 512 }],
    };
    // The lab's plug: a new zeroed image (QMP blockdev-add), then device_add.
    let r = with_machine(|m| m.hot_add(&spec));
    let image = with_machine(|m| m.image.clone());
    log(format!("QMP blockdev-add of {} ({} bytes of zeroes)", image.display(), super::machine::IMAGE_BYTES));
    log(format!("QMP device_add {id} at slot {slot}: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    if r.is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let attached = || super::newbus::pci_functions().into_iter().any(|c| slot_of_child(c) == Some(slot) && super::newbus::state(c) >= layouts::DS_ATTACHED);
    while !attached() && std::time::Instant::now() < deadline {
        for n in super::acpi::run_gpe() {
            report.notifies.push(n);
        }
        super::sched::run_queues(1000);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ok = attached();
    let (at, bus) = place(slot);
    log(format!("after the hot-add: {at} {}", if ok { format!("attached on {bus}") } else { "not attached".to_string() }));
    with(|e| report.nodes_attached = e.devs.keys().cloned().collect());
    report.disks_attached = created_disks();
    report.hot_added = ok;
    if !ok {
        return;
    }
    report.target = report.disks_attached.iter().find(|d| !before.contains(d)).map(|disk| Target { disk: disk.clone(), image });
}

/// Console lines that end a namespace rescan of the module (`pci_driver.rs`
/// `rescan_namespaces`, `slots.rs` `namespace_changed`).
const RESCAN_ENDS: &[&str] = &["namespaces changed:", "namespace rescan failed", "not rescanned"];

fn rescan_ends() -> usize {
    with(|e| RESCAN_ENDS.iter().map(|w| e.console.matches(w).count()).sum())
}

/// Rescans the module carried out (its `namespaces changed:` lines).
fn rescans_done() -> usize {
    with(|e| e.console.matches(RESCAN_ENDS[0]).count())
}

/// Disks by state, as (record, name): (created, withered or destroyed). A unit number may be
/// given again once its disk is destroyed, so disks are told apart by their record.
fn disks_by_state() -> (Vec<(u64, String)>, Vec<(u64, String)>) {
    with(|e| {
        let created = e.disks.iter().filter(|(_, d)| d.state == super::geom::DiskState::Created).map(|(k, d)| (*k, d.name.clone())).collect();
        let gone = e.disks.iter().filter(|(_, d)| d.state != super::geom::DiskState::Created).map(|(k, d)| (*k, d.name.clone())).collect();
        (created, gone)
    })
}

/// Writes [`io_pattern`] at [`IO_OFFSET`] of `image` (what another host left on the medium).
fn leave_data(nsid: u32, image: &std::path::Path) {
    let ok = std::fs::OpenOptions::new().write(true).open(image).and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &io_pattern(), IO_OFFSET as u64));
    log(format!("  | subsystem: {IO_BYTES} bytes of the test pattern written at {IO_OFFSET} of namespace {nsid}'s image {}: {}", image.display(), ok.map_or_else(|e| e.to_string(), |()| "ok".into())));
}

/// [`Step::Namespace`].
fn namespace_step(op: super::ns_admin::NsOp, nsid: u32) -> NsStep {
    use super::machine::{with_machine, NVME_SLOT};
    use super::ns_admin::NsOp;
    let mut r = NsStep { op: Some(op), nsid, ..NsStep::default() };
    let image = with_machine(|m| m.lab.plugged(NVME_SLOT).and_then(|d| d.images.iter().find(|i| i.nsid == nsid)).map(|i| i.path.clone()));
    if let (NsOp::Attach, Some(image)) = (op, &image) {
        leave_data(nsid, image);
    }
    let (created_before, gone_before) = disks_by_state();
    let ends = rescan_ends();
    let done = rescans_done();
    let lines = super::ns_admin::run(op, nsid);
    r.sent = lines.is_ok();
    for l in lines.unwrap_or_else(|l| l) {
        log(format!("  | {l}"));
    }
    if !r.sent {
        return r;
    }
    if let (NsOp::Reformat, Some(image)) = (op, &image) {
        // Format NVM zeroed the namespace; the data another host writes after it.
        leave_data(nsid, image);
    }
    if op == NsOp::DetachRead {
        // The namespace's disk as the module made it at attach (namespace N's is the N-th
        // created on this machine): a consumer reads it now, before the module has seen the
        // notice, so the read reaches a controller that no longer has the namespace. The
        // module's threads run while it waits (its interrupt, its tasks).
        let disk = created_before.get(nsid as usize - 1).map(|d| d.1.clone());
        if let Some(disk) = disk {
            r.early_read = Some(early_read(&disk));
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rescan_ends() == ends && std::time::Instant::now() < deadline {
        super::sched::run_queues(1000);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let ran = super::sched::run_queues(1000);
    r.rescanned = rescans_done() > done;
    let said = if r.rescanned {
        "ended"
    } else if rescan_ends() > ends {
        "did NOT happen or failed (the console says why)"
    } else {
        "did NOT end in 5 s"
    };
    log(format!("after the namespace {}: the module's rescan {said}; threads ran {ran} times", op.name()));
    let (created, gone) = disks_by_state();
    r.disks_added = created.iter().filter(|d| !created_before.contains(d)).map(|d| d.1.clone()).collect();
    r.disks_gone = gone.iter().filter(|d| !gone_before.contains(d)).map(|d| d.1.clone()).collect();
    if matches!(op, NsOp::Attach | NsOp::Reformat) {
        // The disk of the namespace now: the new one, else (a reformat the module missed) the
        // one it kept: on this machine namespace 1's disk is nvmehpd0 (made first at attach),
        // so the other created disk.
        let disk = r.disks_added.first().cloned().or_else(|| {
            with(|e| e.disks.values().find(|d| d.state == super::geom::DiskState::Created && d.name != "nvmehpd0").map(|d| d.name.clone()))
        });
        if let (Some(disk), Some(image)) = (disk, image) {
            r.read_ok = Some(read_back(&disk, &image));
        }
    }
    r
}

/// [`NsOp::DetachRead`]'s read: [`IO_BYTES`] at [`IO_OFFSET`] of `disk`, its bio_error.
fn early_read(disk: &str) -> c_int {
    let p = super::machine::with_machine(|m| m.contig_alloc(IO_BYTES as u64, 0, u64::MAX, 4096, 0));
    let Some(p) = p else { return layouts::ENOMEM };
    // SAFETY: IO_BYTES bytes of the shared guest RAM mapping, handed out to nobody else, alive
    // until the machine stops.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, IO_BYTES) };
    let o = super::geom::open(disk);
    let e = super::geom::io(disk, layouts::BIO_READ as u32, IO_OFFSET, buf, std::time::Duration::from_secs(10));
    let c = super::geom::close(disk);
    log(format!("read of {disk} at {IO_OFFSET} after its namespace's detach, before the module's rescan: d_open {o}, BIO_READ {e}, d_close {c}"));
    e
}

/// Reads [`IO_BYTES`] at [`IO_OFFSET`] of `disk` through d_strategy (bio data in guest RAM)
/// and compares them with [`io_pattern`] and with the image file.
fn read_back(disk: &str, image: &std::path::Path) -> bool {
    let p = super::machine::with_machine(|m| m.contig_alloc(IO_BYTES as u64, 0, u64::MAX, 4096, 0));
    let Some(p) = p else { return false };
    // SAFETY: IO_BYTES bytes of the shared guest RAM mapping, handed out to nobody else, alive
    // until the machine stops.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, IO_BYTES) };
    buf.fill(0);
    let timeout = std::time::Duration::from_secs(10);
    let o = super::geom::open(disk);
    let e = super::geom::io(disk, layouts::BIO_READ as u32, IO_OFFSET, buf, timeout);
    let c = super::geom::close(disk);
    let at = IO_OFFSET as usize;
    let on_disk = std::fs::read(image).ok().map(|b| b[at..at + IO_BYTES].to_vec());
    let ok = o == 0 && e == 0 && c == 0 && *buf == io_pattern()[..] && on_disk.as_deref() == Some(&io_pattern()[..]);
    log(format!("read of {disk} at {IO_OFFSET}: d_open {o}, BIO_READ {e}, d_close {c}; {}", if ok { "the data on the medium" } else { "NOT the data on the medium" }));
    ok
}

/// The functions newbus has in scenario slot `slot` (pc: pci0's children at device `slot`).
fn functions_in_slot(slot: u8) -> Vec<u64> {
    super::newbus::pci_functions().into_iter().filter(|&c| slot_of_child(c) == Some(slot)).collect()
}

/// [`Step::Getattr`]: every (attribute, size) of `attrs` asked of every created disk.
fn getattrs(attrs: &[(String, usize)]) -> bool {
    let mut disks: Vec<String> = super::geom::created_disks().into_iter().map(|d| d.0).collect();
    disks.sort();
    for disk in &disks {
        for (attr, len) in attrs {
            let (e, value) = super::geom::getattr(disk, attr, *len);
            log(format!("getattr {disk} {attr} ({len} bytes): error {e}, value \"{value}\""));
        }
    }
    !disks.is_empty()
}

/// `devctl delete pci0:0:SLOT:FUNC` ([`Step::DevctlDelete`]).
fn devctl_delete(slot: u8, func: u8) -> bool {
    let Some(child) = super::newbus::pci_child_at(slot, func) else {
        log(format!("devctl delete {slot}.{func}: no such device"));
        return false;
    };
    super::sched::topo_lock();
    let r = super::newbus::device_delete_child(super::newbus::pci0(), child);
    super::sched::topo_unlock();
    super::sched::run_queues(1000);
    log(format!("devctl delete {slot}.{func}: {r}"));
    r == 0
}

/// [`Step::DetachBridge`] (`detach`) and [`Step::AttachBridge`] of the root port in `slot`,
/// under the topology lock as devctl2_ioctl takes it; then the kernel's threads run.
fn devctl_bridge(slot: u8, detach: bool) -> bool {
    let Some(pcib) = super::pcib::bridge_at(slot) else {
        log(format!("devctl {} of the bridge in slot {slot}: no such device", if detach { "detach" } else { "attach" }));
        return false;
    };
    super::sched::topo_lock();
    let ok = if detach { super::pcib::devctl_detach(pcib) == 0 } else { super::pcib::attach_bus(pcib).is_some() };
    super::sched::topo_unlock();
    super::sched::run_queues(1000);
    ok
}

/// [`Step::HotAddFunction`]: the lab's plug of a controller at `slot`.`func` (a new zeroed
/// image), then the SCI's work and the module's tasks: until every function QEMU shows in
/// the slot (function 0's, and the others only if its PCIM_MFDEV says so) has an attached
/// device, at most 5 s; with none showing, 2 s of the same (the GPE and its Notify are still
/// delivered and acted on).
fn hot_add_function(report: &mut Report, slot: u8, func: u8, multifunction: bool) -> bool {
    use super::machine::with_machine;
    let id = super::machine::function_id(slot, func);
    let spec = super::machine::controller(&id, slot);
    let r = with_machine(|m| m.hot_add_function(&spec, func, multifunction));
    let mf = if multifunction { ", multifunction=on" } else { "" };
    log(format!("QMP device_add {id} at {slot}.{func}{mf}: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    if r.is_err() {
        return false;
    }
    // What QEMU shows (past the device-fault layer: the runner looks, not the kernel).
    let read = |bdf, reg, width| with_machine(|m| m.qemu_cfg_read(bdf, reg, width));
    let showing = || -> Vec<u8> {
        let f0 = nvmehp_lab::firmware::Bdf::slot(slot);
        if read(f0, 0, 2) == 0xffff {
            return Vec::new();
        }
        let last = if read(f0, 0x0e, 1) & 0x80 != 0 { 7 } else { 0 };
        (0..=last).filter(|&f| read(nvmehp_lab::firmware::Bdf { func: f, ..f0 }, 0, 2) != 0xffff).collect()
    };
    let attached = |f: u8| super::newbus::pci_child_at(slot, f).is_some_and(|c| super::newbus::state(c) >= layouts::DS_ATTACHED);
    let start = std::time::Instant::now();
    loop {
        for n in super::acpi::run_gpe() {
            report.notifies.push(n);
        }
        super::sched::run_queues(1000);
        let shown = showing();
        let limit = if shown.is_empty() { 2 } else { 5 };
        if (!shown.is_empty() && shown.iter().all(|&f| attached(f))) || start.elapsed() > std::time::Duration::from_secs(limit) {
            let what: Vec<String> = shown.iter().map(|&f| format!("{slot}.{f} {}", if attached(f) { "attached" } else { "not attached" })).collect();
            log(format!("after the device_add of {slot}.{func}: functions answering in slot {slot}: [{}]", what.join(", ")));
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// [`Step::EjectSlot`]: QMP `device_del` of the slot's lowest function (PCID is per slot),
/// the SCI's work and the module's tasks until no function of the slot is in newbus (at most
/// 5 s), then QEMU's `DEVICE_DELETED` of each of the slot's devices (2 s).
fn eject_slot(report: &mut Report, slot: u8) -> bool {
    use super::machine::with_machine;
    let ids: Vec<String> = with_machine(|m| (0..8).filter_map(|f| m.lab.plugged_function(slot, f).map(|d| d.id.clone())).collect());
    let r = with_machine(|m| m.request_unplug(slot));
    log(format!("QMP device_del of slot {slot} ({}): {}", ids.join(", "), r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())));
    if r.is_err() {
        return false;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !functions_in_slot(slot).is_empty() && std::time::Instant::now() < deadline {
        for n in super::acpi::run_gpe() {
            report.notifies.push(n);
        }
        super::sched::run_queues(1000);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let left: Vec<String> = functions_in_slot(slot).into_iter().map(location).collect();
    log(format!("after the eject request of slot {slot}: {}", if left.is_empty() { "no function left on pci0".to_string() } else { format!("still on pci0: {}", left.join(", ")) }));
    let deleted = ids.iter().all(|id| with_machine(|m| m.deleted(id, std::time::Duration::from_secs(2)))) && !with_machine(|m| m.slot_present(slot));
    log(format!("QMP: DEVICE_DELETED of slot {slot}'s devices: {}", if deleted { "received" } else { "not received" }));
    left.is_empty() && deleted
}

/// One thing a run does to the machine after MOD_LOAD, in the order a plan lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// devctl(8) set driver -f, probe and attach, on every function no driver took at
    /// MOD_LOAD; the first disk then is the I/O target, on the machine's image.
    Attach,
    /// A write and a read of the target disk, checked in its image file.
    Io,
    /// The bios of [`BAD_BIOS`], each sent to the target disk and waited for ([`bad_bios`]).
    BadBios,
    /// An unmapped write and read of the target disk ([`unmapped_io`]).
    UnmappedIo,
    /// This many 4 KiB writes sent at once to the target disk, waited for, checked.
    Burst(usize),
    /// The platform's removal request for controller `id` in `slot` (QMP `device_del`,
    /// `Notify(Sxx_, 3)`), expected to end with the function deleted and `DEVICE_DELETED`.
    Eject { slot: u8, id: String },
    /// The lab's surprise removal of controller `id` in `slot`, with `in_flight` writes sent
    /// just before.
    Surprise { slot: u8, id: String, in_flight: usize },
    /// One read sent to the target disk and left in flight while time passes, until it is
    /// done or the module's watchdog stopped re-arming ([`read_in_flight`]).
    ReadInFlight,
    /// QMP `device_add` of controller `id` into `slot` (`Notify(Sxx_, 1)`), expected to be
    /// rescanned and attached; its disk becomes the I/O target.
    HotAdd { slot: u8, id: String },
    /// The firmware's `Notify(Sxx_, value)` on `slot` with no change in the machine (what
    /// firmware does after a device check it decided on by itself), from acpi_task, then the
    /// taskqueue threads run what the handlers queued. Done when a handler got it.
    Notify { slot: u8, value: u32 },
    /// reboot(8): DEVICE_SHUTDOWN of every attached function, then a write to the target
    /// disk, expected to fail without reaching the medium ([`shutdown`]).
    Shutdown,
    /// The subsystem's other host attaches, detaches or reformats namespace `nsid` of the
    /// module's controller (Namespace Attachment, and for a reformat Format NVM, through the
    /// lab-private controller, [`super::ns_admin`]); QEMU sends the module's controller a
    /// Namespace Attribute Changed notice; the interrupt and taskqueue threads run until the
    /// module said how its rescan ended (5 s at most). Before an attach or after a reformat's
    /// format, the namespace's image gets [`io_pattern`] at [`IO_OFFSET`] (data another host
    /// left on the medium), which the new disk must read back. Done when the module rescanned,
    /// and a disk went (detach), came and read the data (attach), or was replaced by one that
    /// reads the data (reformat).
    Namespace { op: super::ns_admin::NsOp, nsid: u32 },
    /// A BIO_GETATTR of each (attribute, buffer size) to every created disk, in name order, as
    /// g_disk_start handles it ([`super::geom::getattr`]); each answer is logged. Done when
    /// there was a disk to ask.
    Getattr(Vec<(String, usize)>),
    /// devctl(8) delete of the function at `slot`.`func` (sys/kern/subr_bus.c devctl2_ioctl
    /// DEV_DELETE: device_delete_child under the topology lock, its driver detached first):
    /// QEMU keeps the function, newbus forgets it. Done when it was deleted.
    DevctlDelete { slot: u8, func: u8 },
    /// QMP `device_add` of a controller at `slot`.`func` (`multifunction`: function 0 with
    /// `multifunction=on`), then the SCI's work and the module's tasks until every function
    /// QEMU shows in the slot is attached, or 2 s with none to attach ([`hot_add_function`]).
    /// Done when QEMU took the device.
    HotAddFunction { slot: u8, func: u8, multifunction: bool },
    /// The platform's removal request for `slot` (QMP `device_del` of its lowest function;
    /// PCID is per slot), expected to end with no function of the slot left in newbus or in
    /// QEMU ([`eject_slot`]).
    EjectSlot { slot: u8 },
    /// devctl(8) detach of the pcib of the root port in `slot` (q35; pci_pci.c `pcib_detach`:
    /// the functions on its bus detached, the bus deleted, [`super::pcib::devctl_detach`]).
    /// Done when the bridge was detached.
    DetachBridge { slot: u8 },
    /// devctl(8) attach of that pcib: a new pci bus, enumerated, its functions probed and
    /// attached ([`super::pcib::attach_bus`]). Done when the bus is back.
    AttachBridge { slot: u8 },
    /// devctl(8) detach of every attached function.
    Detach,
}

impl Step {
    /// Runs the step; whether it did what it is expected to (a refusal the platform made
    /// when the module did nothing wrong counts as not done).
    fn run(&self, report: &mut Report, driver: &str, outside_guest_ram: bool) -> bool {
        match self {
            Step::Attach => {
                devctl_set_driver_and_attach(driver, report);
                let ran = super::sched::run_queues(1000);
                log(format!("after attach: taskqueue and kernel threads ran {ran} times"));
                with(|e| report.nodes_attached = e.devs.keys().cloned().collect());
                report.disks_attached = created_disks();
                let image = super::machine::with_machine(|m| m.image.clone());
                report.target = report.disks_attached.first().map(|disk| Target { disk: disk.clone(), image });
                !report.attach.is_empty() && report.attach.iter().all(|a| a.2 == 0)
            }
            Step::Io => {
                let before = report.io.len();
                disk_io(report, outside_guest_ram);
                let ok = report.io.len() > before && report.io[before..].iter().all(|(_, e)| *e == 0) && report.io_data_ok;
                if report.hot_added {
                    report.hot_added_io_ok = ok;
                }
                ok
            }
            Step::BadBios => bad_bios(report),
            Step::UnmappedIo => unmapped_io(report),
            Step::Burst(n) => {
                let before = report.io.len();
                burst_io(report, *n);
                report.io.len() > before && report.io[before..].iter().all(|(_, e)| *e == 0)
            }
            Step::Eject { slot, id } => {
                eject_request(report, *slot, id);
                report.ejected
            }
            Step::Surprise { slot, id, in_flight } => {
                surprise_removal(report, *slot, id, *in_flight);
                // Every write in flight ended: without error (and on the medium) or with ENXIO.
                let ended = report.in_flight.len() == *in_flight
                    && report.in_flight.iter().all(|&e| e == 0 || e == layouts::ENXIO)
                    && report.in_flight_lost == 0;
                report.surprise_detected && ended
            }
            Step::ReadInFlight => read_in_flight(report),
            Step::HotAdd { slot, id } => {
                hot_add(report, *slot, id);
                report.hot_added && report.target.is_some()
            }
            Step::Notify { slot, value } => {
                let n = super::acpi::notify(*slot, *value);
                report.notifies.push((*slot, *value, n));
                let ran = super::sched::run_queues(1000);
                log(format!("after Notify(slot {slot}, {value}): taskqueue and kernel threads ran {ran} times"));
                n > 0
            }
            Step::Namespace { op, nsid } => {
                use super::ns_admin::NsOp;
                let r = namespace_step(*op, *nsid);
                let read = r.read_ok == Some(true);
                let ok = r.sent
                    && r.rescanned
                    && match op {
                        NsOp::Attach => read && r.disks_added.len() == 1,
                        NsOp::Detach => r.disks_gone.len() == 1,
                        NsOp::DetachRead => r.disks_gone.len() == 1 && r.early_read.is_some_and(|e| e != 0),
                        NsOp::Reformat => read && r.disks_added.len() == 1 && r.disks_gone.len() == 1,
                    };
                report.namespaces.push(r);
                ok
            }
            Step::Getattr(attrs) => getattrs(attrs),
            Step::DevctlDelete { slot, func } => devctl_delete(*slot, *func),
            Step::HotAddFunction { slot, func, multifunction } => hot_add_function(report, *slot, *func, *multifunction),
            Step::EjectSlot { slot } => eject_slot(report, *slot),
            Step::DetachBridge { slot } => devctl_bridge(*slot, true),
            Step::AttachBridge { slot } => devctl_bridge(*slot, false),
            Step::Shutdown => {
                shutdown(report);
                !report.shutdown.is_empty()
                    && report.shutdown.iter().all(|s| s.2 == 0)
                    && report.after_shutdown_write.is_some_and(|(e, landed)| e > 0 && !landed)
            }
            Step::Detach => {
                let before = report.detach.len();
                devctl_detach(report);
                let ran = super::sched::run_queues(1000);
                log(format!("after detach: taskqueue and kernel threads ran {ran} times"));
                report.detach[before..].iter().all(|d| d.2 == 0)
            }
        }
    }
}

/// The order in which a run's steps happen, and what a failed one means for the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// After a step that did not do what it should, skip every later step but a Detach (which
    /// still runs, so that the unload's checks judge what the module left, not what the
    /// skipped steps would have cleaned up).
    pub stop_at_failure: bool,
}

impl Options {
    /// The plan to run: `plan` if given, else the one `kldhost run`'s flags describe: attach,
    /// I/O, then `--burst`, `--eject` or `--surprise`, `--hot-add` (a new controller, after
    /// either removal) and its I/O, `--notify`, `--shutdown`, then detach. Every step of that one runs; its hot-add
    /// finds the drive still taken when the eject failed, and its I/O then has no disk.
    pub fn effective_plan(&self) -> Plan {
        use super::machine::{NVME_ID, NVME_SLOT};
        if let Some(p) = &self.plan {
            return p.clone();
        }
        let mut steps = vec![Step::Attach, Step::Io];
        if self.bad_bios {
            steps.push(Step::BadBios);
        }
        if self.unmapped_bios {
            steps.push(Step::UnmappedIo);
        }
        if !self.getattr.is_empty() {
            steps.push(Step::Getattr(self.getattr.clone()));
        }
        if self.burst > 0 {
            steps.push(Step::Burst(self.burst));
        }
        for &(slot, func) in &self.devctl_delete {
            steps.push(Step::DevctlDelete { slot, func });
        }
        for &slot in &self.bridge_detached {
            steps.push(Step::DetachBridge { slot });
            steps.push(Step::Notify { slot, value: 1 });
            steps.push(Step::Notify { slot, value: 3 });
            steps.push(Step::AttachBridge { slot });
        }
        if self.eject {
            steps.push(Step::Eject { slot: NVME_SLOT, id: NVME_ID.to_string() });
        }
        if self.surprise && self.read_in_flight {
            steps.push(Step::ReadInFlight);
        }
        if self.surprise {
            steps.push(Step::Surprise { slot: NVME_SLOT, id: NVME_ID.to_string(), in_flight: self.in_flight });
        }
        if (self.eject || self.surprise) && self.hot_add {
            steps.push(Step::HotAdd { slot: HOT_ADD_SLOT, id: "nvme1".to_string() });
            steps.push(Step::Io);
        }
        for &(slot, func) in &self.hot_add_functions {
            // Function 0 of a slot given another function too: multifunction=on.
            let multifunction = func == 0 && self.hot_add_functions.iter().any(|&(s, f)| s == slot && f != 0);
            steps.push(Step::HotAddFunction { slot, func, multifunction });
        }
        for &slot in &self.eject_slots {
            steps.push(Step::EjectSlot { slot });
        }
        for &(slot, value) in &self.notify {
            steps.push(Step::Notify { slot, value });
        }
        for &(op, nsid) in &self.namespace {
            steps.push(Step::Namespace { op, nsid });
            steps.push(Step::Io);
        }
        if self.shutdown {
            steps.push(Step::Shutdown);
        }
        steps.push(Step::Detach);
        Plan { steps, stop_at_failure: false }
    }
}

/// The slot `--hot-add` plugs into: empty since boot (its slot object has `_EJ0`, no function).
pub const HOT_ADD_SLOT: u8 = 5;

/// Where a run is, for an observer (the demo) that tells the story as it happens.
pub enum Moment<'a> {
    /// MOD_LOAD was sent and the taskqueue threads ran what it queued.
    Loaded,
    /// A step is about to run.
    Before(&'a Step),
    /// A step ran; whether it did what it should.
    After(&'a Step, bool),
    /// A step skipped because an earlier one failed.
    Skipped(&'a Step),
    /// The steps are over; MOD_QUIESCE is about to be sent.
    Unloading,
    /// MOD_QUIESCE and MOD_UNLOAD were sent (see the report) and, if unloaded, the unload's
    /// checks ran.
    Unloaded,
}

fn location(dev: u64) -> String {
    with(|e| e.newbus.devices.get(&dev).and_then(|d| d.pci.as_ref()).map(|p| format!("device {}.{}", p.bdf.dev, p.bdf.func)).unwrap_or_default())
}

/// Loads, runs and unloads the module per `opts` (see [`load_and_unload`] and [`Options`]).
pub fn run(ko: &LoadedKo, opts: &Options) -> Result<Report, LoadError> {
    run_observed(ko, opts, &mut |_, _| {})
}

/// [`run`], telling `observe` where the run is at each [`Moment`] (the report so far with it;
/// the call log, findings and console are still in the emulation's state then).
pub fn run_observed(ko: &LoadedKo, opts: &Options, observe: &mut dyn FnMut(Moment, &Report)) -> Result<Report, LoadError> {
    // A fault in the module's code is the kernel's fatal trap, not a crash of this process.
    super::trap::install(ko.base(), ko.module_size);
    // Boot: pci(4) reads its tunables from the kernel environment before any module loads.
    super::pci_tunables::load(&opts.tunables);
    super::intx::set_delivered(!opts.intx_undelivered);
    super::msi::set_mode(opts.msi);
    super::msi::set_delivered(!opts.msi_undelivered);
    if opts.qemu {
        let kind = if opts.q35 { nvmehp_lab::qemu::MachineKind::Q35 } else { nvmehp_lab::qemu::MachineKind::Pc };
        let subsystem = opts.effective_plan().steps.iter().any(|s| matches!(s, Step::Namespace { .. }));
        let at = opts.subsystem_at.unwrap_or((super::machine::NVME_SLOT, 0));
        if subsystem && opts.q35 {
            return Err(LoadError::Bad("--namespace: the NVMe subsystem machine is pc".to_string()));
        }
        if subsystem && at != (super::machine::NVME_SLOT, 0) && !opts.multifunction.iter().any(|(s, fs)| *s == at.0 && fs.contains(&at.1)) {
            return Err(LoadError::Bad(format!("--subsystem-at {}.{}: not a function of a --multifunction slot", at.0, at.1)));
        }
        let msix = if opts.msix_exclusive_bar { MsixPlacement::ExclusiveBar } else { MsixPlacement::Bar0 };
        let started = if subsystem { super::machine::start_with_subsystem(at, &opts.multifunction, msix) } else { super::machine::start(kind, &opts.multifunction, msix) };
        started.map_err(|e| LoadError::Bad(format!("starting QEMU: {e}")))?;
        let functions = super::machine::with_machine(|m| m.functions.clone());
        super::newbus::build_tree(&functions, opts.bridge_buses_late);
        if opts.acpi {
            let pci0 = super::newbus::pci0();
            let pcib0 = with(|e| e.newbus.devices.get(&pci0).map_or(0, |d| d.parent));
            super::acpi::enable_with(pcib0, opts.acpi_pci);
        }
        if opts.stock_nvme || !opts.stock_nvme_at.is_empty() {
            // devclass_add_driver takes the topology lock itself for each probe.
            super::stock_nvme::boot(&opts.stock_nvme_at);
        }
    }
    let r = run_module(ko, opts, observe);
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

fn run_module(ko: &LoadedKo, opts: &Options, observe: &mut dyn FnMut(Moment, &Report)) -> Result<Report, LoadError> {
    let timeout_expiries = opts.timeouts;
    let names = kldload(ko, &opts.tunables)?;
    let ran = super::sched::run_queues(1000);
    log(format!("taskqueue threads ran {ran} tasks"));
    if opts.bridge_buses_late {
        // newbus's configure pass reaches the root ports now; the module's discovery retries
        // when its timeout task expires.
        super::sched::topo_lock();
        for pcib in super::newbus::pci_children() {
            super::pcib::attach_bus(pcib);
        }
        super::sched::topo_unlock();
        let fired = super::sched::fire_timeouts(1);
        log(format!("the root ports' buses attached; {fired} timeout task expiries"));
    }
    if timeout_expiries > 0 {
        let fired = super::sched::fire_timeouts(timeout_expiries);
        log(format!("{fired} timeout task expiries"));
    }
    if opts.open_nodes {
        open_nodes();
    }
    if opts.park_readers {
        super::devfs::park_readers();
    }
    let mut held = Vec::new();
    if opts.hold_disks_open && !opts.qemu {
        held = super::geom::hold_all_open();
    }

    let mut report = Report::default();
    observe(Moment::Loaded, &report);
    if opts.qemu {
        // The driver DRIVER_MODULE registered (the only one on pci).
        let driver = with(|e| e.newbus.drivers.iter().find(|(_, (bus, _))| bus == "pci").map(|(n, _)| n.clone()));
        if let Some(driver) = driver {
            let plan = opts.effective_plan();
            let mut failed = false;
            for step in &plan.steps {
                if failed && *step != Step::Detach {
                    observe(Moment::Skipped(step), &report);
                    continue;
                }
                observe(Moment::Before(step), &report);
                let ok = step.run(&mut report, &driver, opts.bio_outside_guest_ram);
                log(format!("step {step:?}: {}", if ok { "done" } else { "NOT done" }));
                observe(Moment::After(step, ok), &report);
                if *step == Step::Attach {
                    if opts.open_nodes {
                        open_nodes();
                    }
                    if opts.hold_disks_open {
                        held = super::geom::hold_all_open();
                    }
                    held.extend(super::geom::hold_open(&opts.hold_open));
                }
                failed |= !ok && plan.stop_at_failure;
            }
        }
    }
    if opts.qemu && opts.late_msix {
        let ran = super::pci::deliver_msix_messages();
        log(format!("late MSI-X messages: {ran} interrupt handlers ran"));
    }
    observe(Moment::Unloading, &report);
    if opts.geom_stalled {
        super::geom::set_stalled(true);
    }
    kldunload(ko, &names, &mut report, &held, opts.kldunload_force)?;
    unstall_after_mod_unload(opts, &report);
    // The holding consumers closed when the first kldunload returned; a retry must not close
    // them again (a second last close would call d_close twice).
    held.clear();
    for attempt in 0..opts.kldunload_retries {
        if report.unloaded {
            break;
        }
        let ran = super::sched::run_queues(1000);
        log(format!("kldunload refused; taskqueue threads ran {ran} tasks; kldunload again (retry {})", attempt + 1));
        kldunload(ko, &names, &mut report, &held, opts.kldunload_force)?;
        unstall_after_mod_unload(opts, &report);
    }
    if !report.unloaded {
        let kept = with(|e| e.blocks.values().filter(|b| !b.freed).fold((0, 0), |(n, bytes), b| (n + 1, bytes + b.size)));
        log(format!("the module stays loaded: {} malloc(9) allocations ({} bytes) stay with it (not leaks)", kept.0, kept.1));
        report.kept_loaded = Some(kept);
    }
    observe(Moment::Unloaded, &report);
    with(|e| {
        report.log = std::mem::take(&mut e.log);
        e.console_at.clear();
        report.findings = std::mem::take(&mut e.findings);
        report.console = std::mem::take(&mut e.console);
    });
    Ok(report)
}

/// `--geom-stalled`: GEOM's event thread runs again once a kldunload got as far as MOD_UNLOAD.
fn unstall_after_mod_unload(opts: &Options, report: &Report) {
    if opts.geom_stalled && report.unload.is_some() && with(|e| e.geom_stalled) {
        super::geom::set_stalled(false);
    }
}

/// kldunload of a file whose modules are `names` (see the module doc): MOD_QUIESCE to every
/// live module, the first veto ending the unload unless `force` (`kldunload -f`, the veto
/// logged and ignored, as linker_file_unload does); MOD_UNLOAD to each, the first
/// refusal ending it; then the SYSUNINITs, the consumers holding `held` disks open close, the
/// sysctls unregistered and the end-of-life checks. Sets `report`'s quiesce, unload and
/// unloaded.
pub fn kldunload(ko: &LoadedKo, names: &[String], report: &mut Report, held: &[u64], force: bool) -> Result<(), LoadError> {
    let mut refused = false;
    // A module whose MOD_LOAD failed was released by module_register_init: the file stays
    // loaded without it and the unload sends it nothing.
    let live: Vec<&String> = names.iter().filter(|n| with(|e| e.modules.iter().any(|m| m.name == **n))).collect();
    // The module events' sleeps count for `--in-sleep WMESG@unload`.
    super::interleave::unload_events(true);
    // Every module is asked first (MOD_QUIESCE; EOPNOTSUPP and EINVAL count as agreement) and
    // the first veto ends the unload; only then is MOD_UNLOAD sent to each.
    for name in &live {
        let mut q = mod_event(name, layouts::MOD_QUIESCE as c_int).unwrap_or(0);
        report.quiesce = Some(q);
        if q == layouts::EOPNOTSUPP || q == layouts::EINVAL {
            q = 0;
        }
        if q != 0 && force {
            log(format!("kldunload -f: {name} refused {}: error {q}, ignored (LINKER_UNLOAD_FORCE)", event_name(layouts::MOD_QUIESCE as c_int)));
        } else if q != 0 {
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
    super::interleave::unload_events(false);
    if !refused {
        run_sysinits(ko, &sets::sysuninits(ko)?, "sysuninit");
    }
    // The holding consumer closes only now, after kldunload returned.
    super::geom::release_held(held);
    for (n, r) in super::devfs::join_readers() {
        log(format!("reader of {n} returned {r}"));
    }
    if !refused {
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

/// `open(2)` and `close(2)` of every node, then the kernel threads (the devfs destroy thread)
/// run what the methods scheduled.
fn open_nodes() {
    for (n, o, c) in super::devfs::open_and_close_all() {
        log(format!("open and close {n}: d_open {o}, d_close {c}"));
    }
    super::sched::run_queues(1000);
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

/// What an unloaded module must not leave behind. What would still call into its unloaded
/// text (a taskqueue's thread, an armed callout or timeout task, a registered driver) is
/// UnloadWithLiveCallbacks; memory never freed is a Leak; the rest has no kpimodel rule.
pub(crate) fn end_of_life_checks() {
    use super::rules::Rule;
    let left = with(|e| {
        let mut f: Vec<(Option<Rule>, String)> = Vec::new();
        let holder = super::kern::dma_hold_reported(e);
        let (kept, live): (Vec<_>, Vec<_>) = e.blocks.iter().filter(|(_, b)| !b.freed).partition(|(_, b)| b.dma && holder.is_some());
        let note = holder.filter(|_| !kept.is_empty()).map(|dev| {
            format!(
                "after unload: {} contigmalloc'd blocks ({} bytes) kept, not a leak: {dev} may still DMA into them (bus mastering on) and the module said so",
                kept.len(),
                kept.iter().map(|(_, b)| b.size).sum::<usize>()
            )
        });
        if !live.is_empty() {
            f.push((Some(Rule::Leak), format!("{} malloc(9) allocations ({} bytes) never freed", live.len(), live.iter().map(|(_, b)| b.size).sum::<usize>())));
        }
        for q in e.queues.values() {
            f.push((Some(Rule::UnloadWithLiveCallbacks), format!("taskqueue {} never freed", q.name)));
        }
        for m in e.mutexes.values() {
            f.push((None, format!("mutex {} never destroyed{}", m.name, if m.held { " (held)" } else { "" })));
        }
        if !e.armed_callouts.is_empty() {
            f.push((Some(Rule::UnloadWithLiveCallbacks), format!("{} callouts still armed", e.armed_callouts.len())));
        }
        if !e.armed_timeouts.is_empty() {
            f.push((Some(Rule::UnloadWithLiveCallbacks), format!("{} timeout tasks still armed", e.armed_timeouts.len())));
        }
        if !e.drivers.is_empty() {
            f.push((Some(Rule::UnloadWithLiveCallbacks), format!("drivers still registered: {:?}", e.drivers)));
        }
        if e.topo_locked {
            f.push((None, "the newbus topology lock is still held".to_string()));
        }
        (f, note)
    });
    let (left, note) = left;
    note.into_iter().for_each(log);
    for (rule, l) in left {
        match rule {
            Some(r) => super::rules::finding(r, &format!("after unload: {l}")),
            None => super::finding(format!("after unload: {l}")),
        }
    }
    // A node still published after unload: devfs would call the unloaded cdevsw.
    for n in with(|e| e.devs.keys().cloned().collect::<Vec<_>>()) {
        super::rules::finding(super::rules::Rule::UnloadWithLiveCallbacks, &format!("after unload: device node {n} never destroyed (still published, its cdevsw in the unloaded module)"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_plan_keeps_the_order_kldhost_run_always_had() {
        let eject = Step::Eject { slot: 4, id: "nvme0".to_string() };
        let hot_add = Step::HotAdd { slot: 5, id: "nvme1".to_string() };
        let opts = Options { qemu: true, acpi: true, burst: 3, eject: true, hot_add: true, ..Options::default() };
        assert_eq!(
            opts.effective_plan(),
            Plan { steps: vec![Step::Attach, Step::Io, Step::Burst(3), eject, hot_add, Step::Io, Step::Detach], stop_at_failure: false }
        );
        let opts = Options { qemu: true, acpi: true, surprise: true, in_flight: 24, ..Options::default() };
        assert_eq!(
            opts.effective_plan().steps,
            vec![Step::Attach, Step::Io, Step::Surprise { slot: 4, id: "nvme0".to_string(), in_flight: 24 }, Step::Detach]
        );
        assert_eq!(Options { qemu: true, ..Options::default() }.effective_plan().steps, vec![Step::Attach, Step::Io, Step::Detach]);
        // A plan given is the plan run.
        let given = Plan { steps: vec![Step::Detach], stop_at_failure: true };
        assert_eq!(Options { qemu: true, eject: true, plan: Some(given.clone()), ..Options::default() }.effective_plan(), given);
    }
}
