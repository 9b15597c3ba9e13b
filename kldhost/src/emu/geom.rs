//! disk(9) as GEOM presents it to a disk driver (sys/geom/geom_disk.c), recorded.
//!
//! - `disk_alloc` may sleep (M_WAITOK) and returns a zeroed `struct disk`.
//! - `disk_create` refuses a disk of another `DISK_VERSION` with the kernel's warning (a
//!   finding here) and publishes the disk (no provider is tasted, nothing opens it).
//! - `disk_gone` withers the disk; once nothing has it open (the last [`close`]), GEOM's event
//!   thread calls the driver's `d_gone` ([`run_events`], run when the module sleeps and when
//!   taskqueue threads run, never inside `disk_gone` itself). A second `disk_gone` is a finding.
//! - `disk_destroy` ends the disk (cancelling a pending `d_gone`, as `g_cancel_event` does);
//!   the struct is poisoned and kept. After unload every disk must have been destroyed.
//! - Consumers: `d_open` on the first open, `d_close` on the last close (g_disk_access's
//!   access counts), also after `disk_gone` while the disk is not destroyed; `run
//!   --hold-disks-open` is a process that keeps every disk open until the unload returned
//!   ([`hold_all_open`], [`release_held`]).
//! - I/O as GEOM's g_down thread sends it ([`open`], [`io`], [`start_burst`]/[`finish_burst`], [`close`]): `d_open` first (a
//!   consumer gained access), then a `struct bio` (command, offset, length, data, disk) to
//!   `d_strategy`; the caller waits, letting interrupt and taskqueue threads run, until the
//!   driver's `biodone` (bounded); after 50 ms without it, time passes for the driver's
//!   callouts (its watchdog polls the controller). `biodone` marks the bio BIO_DONE; a second
//!   one panics.

use super::kern::cstr;
use super::rules::Rule;
use super::{finding, kernel_panic, log, with};
use crate::kpi::KpiTable;
use crate::layouts;
use std::ffi::c_int;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskState {
    Allocated,
    Created,
    /// disk_gone called, d_gone not yet.
    Gone,
    /// d_gone has run.
    GoneDone,
    Destroyed,
}

pub struct DiskRec {
    pub name: String,
    pub state: DiskState,
    /// Consumers that have it open ([`open`] without its [`close`] yet).
    pub opens: u32,
}

fn name_of(dp: *mut layouts::disk) -> String {
    // SAFETY: the driver's disk: d_name is a C string it set before disk_create.
    unsafe { format!("{}{}", cstr((*dp).d_name), (*dp).d_unit) }
}

extern "C" fn emu_disk_alloc() -> *mut layouts::disk {
    super::sched::may_sleep("disk_alloc");
    let p = Box::into_raw(Box::<layouts::disk>::default());
    with(|e| e.disks.insert(p as u64, DiskRec { name: String::new(), state: DiskState::Allocated, opens: 0 }));
    log(format!("disk_alloc() = {p:p}"));
    p
}

extern "C" fn emu_disk_create(dp: *mut layouts::disk, version: c_int) {
    let name = name_of(dp);
    if version != layouts::DISK_VERSION {
        super::kern::console_line(&format!("WARNING: Attempt to add disk {name} using incompatible ABI version of disk(9)\n"));
        finding(format!("disk_create({name}) with disk(9) version {version:#x}, the kernel's is {:#x}", layouts::DISK_VERSION));
        return;
    }
    let st = with(|e| e.disks.get(&(dp as u64)).map(|d| d.state));
    if st != Some(DiskState::Allocated) {
        kernel_panic(&format!("disk_create({name}): not a disk from disk_alloc, or created twice"));
    }
    // SAFETY: the driver's filled-in disk.
    let (ss, size, has_gone, has_strategy) = unsafe { ((*dp).d_sectorsize, (*dp).d_mediasize, (*dp).d_gone.is_some(), (*dp).d_strategy.is_some()) };
    if !has_strategy {
        kernel_panic(&format!("disk_create({name}): no d_strategy"));
    }
    with(|e| {
        let d = e.disks.get_mut(&(dp as u64)).expect("disk");
        d.name = name.clone();
        d.state = DiskState::Created;
    });
    log(format!("disk_create({name}: {size} bytes, {ss}-byte sectors, d_gone {})", if has_gone { "set" } else { "NULL" }));
    // sys/geom/geom_disk.h DISKFLAG_UNMAPPED_BIO: GEOM may then hand the driver bios whose
    // pages have no kernel mapping (`bio_ma`). This GEOM sends mapped bios only, which such a
    // driver must take too; the flag is told, not acted on.
    const DISKFLAG_UNMAPPED_BIO: u32 = 0x0010;
    // SAFETY: as above.
    let flags = unsafe { (*dp).d_flags };
    log(format!("disk(9) {name}: d_flags {flags:#x}{}", if flags & DISKFLAG_UNMAPPED_BIO != 0 { " (DISKFLAG_UNMAPPED_BIO)" } else { "" }));
}

extern "C" fn emu_disk_gone(dp: *mut layouts::disk) {
    let st = with(|e| e.disks.get(&(dp as u64)).map(|d| (d.state, d.name.clone())));
    match st {
        Some((DiskState::Created, name)) => {
            with(|e| {
                e.disks.get_mut(&(dp as u64)).expect("disk").state = DiskState::Gone;
                e.geom_events.push_back(dp as u64);
            });
            log(format!("disk_gone({name}) (d_gone runs from the GEOM event thread)"));
        }
        Some((s, name)) => super::rules::finding(Rule::DiskDoubleRelease, &format!("disk_gone({name}) on a disk in state {s:?}")),
        None => kernel_panic(&format!("disk_gone({dp:p}): not a disk")),
    }
}

extern "C" fn emu_disk_destroy(dp: *mut layouts::disk) {
    let st = with(|e| e.disks.get(&(dp as u64)).map(|d| (d.state, d.name.clone())));
    let Some((s, name)) = st else { kernel_panic(&format!("disk_destroy({dp:p}): not a disk")) };
    if s == DiskState::Destroyed {
        super::rules::panic(Rule::DiskDoubleRelease, &format!("disk_destroy({name}): destroyed twice"));
    }
    if s == DiskState::Gone {
        // disk_gone was called and GEOM has not called d_gone yet: it still may.
        super::rules::finding(Rule::DiskFreedBeforeGone, &format!("disk_destroy({name}) before GEOM called its d_gone"));
    }
    // geom_disk.c disk_destroy: g_cancel_event(dp) first, so a d_gone not yet delivered never
    // is (the struct is about to be poisoned).
    with(|e| {
        e.disks.get_mut(&(dp as u64)).expect("disk").state = DiskState::Destroyed;
        e.geom_events.retain(|&d| d != dp as u64);
    });
    // SAFETY: the disk struct disk_alloc made; poisoned and kept.
    unsafe {
        let w = dp.cast::<u32>();
        for i in 0..std::mem::size_of::<layouts::disk>() / 4 {
            w.add(i).write_unaligned(super::kern::FREE_POISON);
        }
    }
    log(format!("disk_destroy({name}) (was {s:?})"));
}

/// How many consumers have `dp` open (g_disk_access's access count).
fn opens(dp: u64) -> u32 {
    with(|e| e.disks.get(&dp).map_or(0, |d| d.opens))
}

/// GEOM's event thread: d_gone of every withered disk nothing has open. Returns how many ran.
///
/// One still open keeps its event until its last [`close`]: GEOM destroys a withered provider,
/// and g_disk_providergone calls d_gone, only once no consumer is attached, and a consumer
/// detaches only with its access counts at zero (sys/geom/geom_subr.c `g_wither_washer`,
/// `g_detach`; sys/geom/geom_disk.c `g_disk_providergone`).
pub fn run_events() -> usize {
    if with(|e| e.geom_stalled) {
        return 0;
    }
    let mut n = 0;
    let mut held = Vec::new();
    while let Some(dp) = with(|e| e.geom_events.pop_front()) {
        if opens(dp) > 0 {
            held.push(dp);
            continue;
        }
        // SAFETY: a disk disk_gone withered; its d_gone was set by the driver.
        let f = unsafe { (*(dp as *mut layouts::disk)).d_gone };
        let name = with(|e| e.disks.get(&dp).map(|d| d.name.clone()).unwrap_or_default());
        with(|e| e.disks.get_mut(&dp).map(|d| d.state = DiskState::GoneDone));
        if let Some(f) = f {
            log(format!("g_event: d_gone({name})"));
            // SAFETY: the driver's d_gone with its disk; no emulation lock held.
            unsafe { f(dp as *mut layouts::disk) };
        }
        n += 1;
    }
    with(|e| e.geom_events.extend(held));
    n
}

/// `run --geom-stalled`: GEOM's event thread is busy elsewhere (a slow taste of another
/// provider, a stuck orphan method: everything on the one g_event thread waits behind it), so
/// d_gone callbacks queued meanwhile do not run, however long the module sleeps, until
/// `stalled` is cleared.
pub fn set_stalled(stalled: bool) {
    with(|e| {
        e.geom_stalled = stalled;
        e.geom_stalled_sleeps = 0;
    });
    log(format!("GEOM's event thread {}", if stalled { "stalled: queued events (d_gone) wait" } else { "runs again" }));
}

/// A sleep of the module while GEOM's event thread is stalled: a stall ends some time, so
/// after [`STALL_SLEEPS`] sleeps of the module it does (logged), and a module that waits for
/// d_gone by sleeping gets it late rather than never (the emulation's stall must not turn
/// into a deadlock of its own making).
pub fn stalled_sleep() {
    let lifted = with(|e| {
        if !e.geom_stalled {
            return false;
        }
        e.geom_stalled_sleeps += 1;
        e.geom_stalled_sleeps >= STALL_SLEEPS
    });
    if lifted {
        log(format!("GEOM's event thread: the stall ends after {STALL_SLEEPS} sleeps of the module"));
        set_stalled(false);
    }
}

/// How many of the module's sleeps a `--geom-stalled` stall outlasts at most.
pub const STALL_SLEEPS: u32 = 200;

/// A sleep of the module (pause_sbt): while a withered disk is held open, its d_gone cannot run
/// until the consumer closes it. Here that consumer is the runner, which gets to close only
/// when the module's call returns: a module that sleeps until d_gone waits forever
/// (WaitForeverForGone; geom_disk.c, nvd_controller_fail's msleep). A bounded number of such
/// sleeps in a row is allowed (the module may be sleeping for something else); past it, the
/// wait is reported as the deadlock it is.
pub fn sleep_while_gone_held() {
    const LIMIT: u32 = 500;
    let held: Vec<String> = with(|e| {
        let names: Vec<String> = e
            .geom_events
            .iter()
            .filter(|dp| e.disks.get(dp).is_some_and(|d| d.opens > 0))
            .filter_map(|dp| e.disks.get(dp).map(|d| d.name.clone()))
            .collect();
        e.rule_state.sleeps_waiting_for_gone = if names.is_empty() { 0 } else { e.rule_state.sleeps_waiting_for_gone + 1 };
        names
    });
    let n = with(|e| e.rule_state.sleeps_waiting_for_gone);
    if n > LIMIT {
        super::rules::panic(
            Rule::WaitForeverForGone,
            &format!("deadlock: the module slept {n} times in a row while d_gone of {} is held back by a consumer that has it open and can close it only after this call returns", held.join(", ")),
        );
    }
}

/// A consumer (a process with /dev/<disk> open) opens every created disk and keeps it open:
/// `run --hold-disks-open`. Returns the disks opened.
pub fn hold_all_open() -> Vec<u64> {
    let names: Vec<String> = with(|e| e.disks.values().filter(|d| d.state == DiskState::Created).map(|d| d.name.clone()).collect());
    let mut out = Vec::new();
    for name in names {
        let Some(dp) = disk_by_name(&name) else { continue };
        if open(&name) == 0 {
            out.push(dp);
        }
    }
    out
}

/// A consumer opens each disk of `names` (those created) and keeps it open, as
/// [`hold_all_open`] does for all; returns those it holds.
pub fn hold_open(names: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    for name in names {
        let Some(dp) = disk_by_name(name) else {
            super::log(format!("hold open {name}: no such disk"));
            continue;
        };
        if open(name) == 0 {
            out.push(dp);
        }
    }
    out
}

/// The consumer of [`hold_all_open`] closes: d_close of each disk not destroyed, and a withered
/// disk's d_gone may now run.
pub fn release_held(disks: &[u64]) {
    for &dp in disks {
        let Some(name) = with(|e| e.disks.get(&dp).map(|d| d.name.clone())) else { continue };
        last_close(dp, &name, " (the holding consumer)");
    }
    super::sched::run_queues(1000);
}

/// The created (not gone) disk named `name`.
pub fn created_disk(name: &str) -> Option<*mut layouts::disk> {
    disk_by_name(name).map(|p| p as *mut layouts::disk)
}

fn disk_by_name(name: &str) -> Option<u64> {
    with(|e| e.disks.iter().find(|(_, d)| d.name == name && d.state == DiskState::Created).map(|(p, _)| *p))
}

/// g_disk_access: the first open of the provider calls d_open (if the driver has one); a
/// later one only counts.
pub fn open(name: &str) -> c_int {
    let Some(dp) = disk_by_name(name) else { return layouts::ENXIO };
    if opens(dp) > 0 {
        // Already open: only the access count changes (g_disk_access calls d_open on the
        // first open only).
        let n = with(|e| e.disks.get_mut(&dp).map_or(0, |d| {
            d.opens += 1;
            d.opens
        }));
        log(format!("g_disk_access({name}, open): open {n} times, no d_open"));
        return 0;
    }
    // SAFETY: a created disk of the driver.
    let f = unsafe { (*(dp as *mut layouts::disk)).d_open };
    // SAFETY: the driver's d_open with its disk; no emulation lock held.
    let r = f.map_or(0, |f| unsafe { f(dp as *mut layouts::disk) });
    if r == 0 {
        with(|e| e.disks.get_mut(&dp).map(|d| d.opens += 1));
    }
    log(format!("g_disk_access({name}, open) -> d_open = {r}"));
    r
}

/// The last close of the provider calls d_close, also once the disk is gone (disk_gone) as
/// long as it is not destroyed: d_gone waits for it ([`run_events`]). On a destroyed disk the
/// close only lowers the count (g_disk_access). ENXIO if `name` is not open.
pub fn close(name: &str) -> c_int {
    let found = with(|e| e.disks.iter().find(|(_, d)| d.name == name && d.opens > 0).map(|(p, _)| *p));
    let Some(dp) = found else { return layouts::ENXIO };
    last_close(dp, name, "")
}

/// A consumer closes `dp`: d_close only when it was the last open (g_disk_access), and not on
/// a destroyed disk (the count only goes down).
fn last_close(dp: u64, name: &str, who: &str) -> c_int {
    let (left, state) = with(|e| {
        e.disks.get_mut(&dp).map_or((0, DiskState::Destroyed), |d| {
            d.opens = d.opens.saturating_sub(1);
            (d.opens, d.state)
        })
    });
    if left > 0 || state == DiskState::Destroyed {
        if left > 0 {
            log(format!("g_disk_access({name}, close){who}: still open {left} times, no d_close"));
        } else {
            log(format!("g_disk_access({name}, close){who}: destroyed, d_close not called"));
        }
        return 0;
    }
    // SAFETY: a disk of the driver, not destroyed: its d_close is the driver's.
    let f = unsafe { (*(dp as *mut layouts::disk)).d_close };
    // SAFETY: the driver's d_close with its disk; no emulation lock held.
    let r = f.map_or(0, |f| unsafe { f(dp as *mut layouts::disk) });
    log(format!("g_disk_access({name}, close){who} -> d_close = {r}"));
    r
}

/// One bio of `cmd` (BIO_READ or BIO_WRITE) at `offset` over `buf` through the disk's
/// d_strategy; waits at most `timeout` for biodone. Returns bio_error (ETIMEDOUT-like -1 if
/// biodone never came: the bio then stays allocated, as the driver may still complete it).
pub fn io(name: &str, cmd: u32, offset: i64, buf: &mut [u8], timeout: std::time::Duration) -> c_int {
    let Some(dp) = disk_by_name(name) else { return layouts::ENXIO };
    let mut bp = Box::<layouts::bio>::default();
    bp.bio_cmd = cmd as u16;
    bp.bio_offset = offset;
    bp.bio_length = buf.len() as i64;
    bp.bio_bcount = buf.len() as _;
    bp.bio_data = buf.as_mut_ptr().cast();
    bp.bio_disk = dp as *mut layouts::disk;
    let bp = Box::into_raw(bp);
    // SAFETY: a created disk of the driver: d_strategy is set (disk_create checks it).
    let strategy = unsafe { (*(dp as *mut layouts::disk)).d_strategy }.expect("d_strategy");
    let what = if cmd == layouts::BIO_READ as u32 { "BIO_READ" } else { "BIO_WRITE" };
    log(format!("g_down: d_strategy({name}, {what}, offset {offset}, {} bytes) bio {bp:p}", buf.len()));
    // SAFETY: the driver's strategy with a bio it owns until biodone; no emulation lock held.
    unsafe { strategy(bp) };
    let start = std::time::Instant::now();
    let mut idle = start;
    loop {
        // SAFETY: our bio; the driver only sets its fields.
        if unsafe { (*bp).bio_flags } & layouts::BIO_DONE as u16 != 0 {
            break;
        }
        if start.elapsed() > timeout {
            log(format!("g_down: bio {bp:p} not done after {timeout:?}"));
            return -1;
        }
        if super::sched::run_queues(1000) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // No interrupt for 50 ms: let the driver's timers run (its watchdog polls).
        if idle.elapsed() > std::time::Duration::from_millis(50) {
            super::sched::fire_callouts();
            idle = std::time::Instant::now();
        }
    }
    // SAFETY: done: the driver no longer touches it.
    let b = unsafe { Box::from_raw(bp) };
    log(format!("g_up: bio {bp:p} done: error {}, resid {}", b.bio_error, b.bio_resid));
    if b.bio_flags & layouts::BIO_ERROR as u16 != 0 { b.bio_error.max(1) } else { 0 }
}

/// Bios GEOM sent that the caller has not waited for yet (see [`start_burst`]).
pub struct Burst(Vec<*mut layouts::bio>);

impl Burst {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A `cmd` bio per `(offset, buffer)` to the disk's d_strategy, one after the other, none
/// waited for: they are the driver's until its `biodone`, and the caller may let other things
/// happen (a removal) before [`finish_burst`]. The buffers must outlive that wait. None if the
/// disk is not a created one.
pub fn start_burst(name: &str, cmd: u32, bufs: &mut [(i64, &mut [u8])]) -> Option<Burst> {
    let dp = disk_by_name(name)?;
    // SAFETY: a created disk of the driver: d_strategy is set (disk_create checks it).
    let strategy = unsafe { (*(dp as *mut layouts::disk)).d_strategy }.expect("d_strategy");
    let mut bios = Vec::with_capacity(bufs.len());
    for (offset, buf) in bufs.iter_mut() {
        let mut bp = Box::<layouts::bio>::default();
        bp.bio_cmd = cmd as u16;
        bp.bio_offset = *offset;
        bp.bio_length = buf.len() as i64;
        bp.bio_bcount = buf.len() as _;
        bp.bio_data = buf.as_mut_ptr().cast();
        bp.bio_disk = dp as *mut layouts::disk;
        bios.push(Box::into_raw(bp));
    }
    log(format!("g_down: {} bios to d_strategy({name}) without waiting", bios.len()));
    for &bp in &bios {
        // SAFETY: the driver's strategy with a bio it owns until biodone; no emulation lock held.
        unsafe { strategy(bp) };
    }
    Some(Burst(bios))
}

/// Waits (bounded by `timeout`; callouts firing after 50 ms without progress, as [`io`])
/// until every bio of `bios` is done. Returns each bio's error, -1 for one never done (left
/// allocated: the driver may still complete it).
pub fn finish_burst(bios: Burst, timeout: std::time::Duration) -> Vec<c_int> {
    let bios = bios.0;
    // SAFETY: our bios; the driver only sets their fields.
    let done = |bp: *mut layouts::bio| unsafe { (*bp).bio_flags } & layouts::BIO_DONE as u16 != 0;
    let start = std::time::Instant::now();
    let mut idle = start;
    let mut left = bios.iter().filter(|&&b| !done(b)).count();
    while left > 0 && start.elapsed() <= timeout {
        if super::sched::run_queues(1000) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let now = bios.iter().filter(|&&b| !done(b)).count();
        if now < left {
            idle = std::time::Instant::now();
        }
        left = now;
        if idle.elapsed() > std::time::Duration::from_millis(50) {
            super::sched::fire_callouts();
            idle = std::time::Instant::now();
        }
    }
    let mut errors = Vec::with_capacity(bios.len());
    for bp in bios {
        if !done(bp) {
            errors.push(-1);
            continue;
        }
        // SAFETY: done: the driver no longer touches it.
        let b = unsafe { Box::from_raw(bp) };
        errors.push(if b.bio_flags & layouts::BIO_ERROR as u16 != 0 { b.bio_error.max(1) } else { 0 });
    }
    log(format!("g_up: {} of {} bios done", errors.iter().filter(|&&e| e >= 0).count(), errors.len()));
    errors
}

/// An asynchronous bio, as GEOM's g_down thread sends one without waiting: a `cmd` bio
/// (BIO_READ or BIO_WRITE) of `len` bytes at `offset` over `data` to the disk's d_strategy.
/// Returns the bio (poll it with [`bio_done`]) or the error if the disk is not there.
///
/// # Safety
/// `data` must stay valid for `len` bytes until the bio is done (and, if it never is, for as
/// long as the driver might still complete it).
pub unsafe fn submit(name: &str, cmd: u32, offset: i64, data: *mut u8, len: usize) -> Result<*mut layouts::bio, c_int> {
    // SAFETY: as this function's contract.
    unsafe { submit_any(name, cmd as u16, offset, len as i64, data) }
}

/// [`submit`] of any bio GEOM's callers could build, `g_io_check` or not: any command, a
/// negative or oversized length, any offset (`--bad-bios`: the driver must refuse what it
/// cannot do itself). `data` must be valid for `length` bytes if the driver could use them.
///
/// # Safety
/// As [`submit`].
pub unsafe fn submit_any(name: &str, cmd: u16, offset: i64, length: i64, data: *mut u8) -> Result<*mut layouts::bio, c_int> {
    let Some(dp) = disk_by_name(name) else { return Err(layouts::ENXIO) };
    let mut bp = Box::<layouts::bio>::default();
    bp.bio_cmd = cmd;
    bp.bio_offset = offset;
    bp.bio_length = length;
    bp.bio_bcount = length as _;
    bp.bio_data = data.cast();
    bp.bio_disk = dp as *mut layouts::disk;
    let bp = Box::into_raw(bp);
    // SAFETY: a created disk of the driver: d_strategy is set (disk_create checks it).
    let strategy = unsafe { (*(dp as *mut layouts::disk)).d_strategy }.expect("d_strategy");
    let what = bio_cmd_name(cmd);
    log(format!("g_down: d_strategy({name}, {what}, offset {offset}, {length} bytes) bio {bp:p}"));
    // SAFETY: the driver's strategy with a bio it owns until biodone; no emulation lock held.
    unsafe { strategy(bp) };
    Ok(bp)
}

/// If `bp` (from [`submit`]) is done: frees it and returns its error (0: success). `None`
/// while the driver still owns it.
///
/// # Safety
/// `bp` came from [`submit`] and was not yet returned as done.
pub unsafe fn bio_done(bp: *mut layouts::bio) -> Option<c_int> {
    // SAFETY: our bio; the driver only sets its fields.
    if unsafe { (*bp).bio_flags } & layouts::BIO_DONE as u16 == 0 {
        return None;
    }
    // SAFETY: done: the driver no longer touches it; the Box submit made, freed once.
    let b = unsafe { Box::from_raw(bp) };
    Some(if b.bio_flags & layouts::BIO_ERROR as u16 != 0 { b.bio_error.max(1) } else { 0 })
}

/// How an attribute's value is laid out in the caller's buffer (g_handleattr_int, _uint16_t
/// and _str in sys/geom/geom_subr.c).
#[derive(Clone, Copy)]
enum AttrKind {
    Int,
    U16,
    Str,
}

/// The attributes g_disk_start (sys/geom/geom_disk.c, FreeBSD 15) answers from `struct disk`
/// after the driver's `d_getattr` said -1, and how. (GEOM::fwsectors/fwheads, kerneldump,
/// setstate and physpath are left out: no driver of this project sets them.)
const DISK_ATTRS: &[(&str, AttrKind)] = &[
    ("GEOM::candelete", AttrKind::Int),
    ("GEOM::ident", AttrKind::Str),
    ("GEOM::descr", AttrKind::Str),
    ("GEOM::hba_vendor", AttrKind::U16),
    ("GEOM::hba_device", AttrKind::U16),
    ("GEOM::hba_subvendor", AttrKind::U16),
    ("GEOM::hba_subdevice", AttrKind::U16),
    ("GEOM::rotation_rate", AttrKind::U16),
    ("GEOM::attachment", AttrKind::Str),
];

/// The buffer a consumer gives for `attr` when none is named: the exact size of a number
/// (g_getattr of an int or a uint16_t), else 256 bytes (DISK_IDENT_SIZE).
pub fn getattr_default_len(attr: &str) -> usize {
    match DISK_ATTRS.iter().find(|(a, _)| *a == attr) {
        Some((_, AttrKind::Int)) => 4,
        Some((_, AttrKind::U16)) => 2,
        _ => 256,
    }
}

/// `--getattr ATTR[:LEN]`: an attribute name (`GEOM::...`) and its buffer's size.
pub fn parse_getattr(s: &str) -> Result<(String, usize), String> {
    let (attr, len) = match s.rsplit_once(':') {
        Some((a, l)) if !a.ends_with(':') && l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty() => {
            (a, l.parse::<usize>().map_err(|e| format!("{s}: {e}"))?)
        }
        _ => (s, getattr_default_len(s)),
    };
    if !attr.starts_with("GEOM::") || attr.len() <= "GEOM::".len() || attr.contains('\0') {
        return Err(format!("{s}: expected GEOM::NAME[:LEN]"));
    }
    if len == 0 || len > 4096 {
        return Err(format!("{s}: the buffer must be 1..4096 bytes"));
    }
    Ok((attr.to_string(), len))
}

/// A BIO_GETATTR for `attr` with a `len`-byte buffer, sent to disk `name` as g_disk_start
/// handles it on the g_down thread: the driver's `d_getattr` first (bio_disk set), whose
/// return is the bio's error unless it is -1; then the disk's own fields ([`DISK_ATTRS`],
/// each answered as its g_handleattr_* does: an int or a uint16_t into a buffer of exactly its
/// size, a string with its NUL; EFAULT when the buffer does not fit the value); anything else ENOIOCTL. Returns the error and the
/// value read back from the buffer (a string up to its NUL, a number in decimal).
pub fn getattr(name: &str, attr: &str, len: usize) -> (c_int, String) {
    let Some(dp) = disk_by_name(name) else { return (layouts::ENXIO, String::new()) };
    let disk = dp as *mut layouts::disk;
    let cattr = std::ffi::CString::new(attr).expect("an attribute name without NUL");
    let mut buf = vec![0u8; len];
    let mut bp = Box::<layouts::bio>::default();
    bp.bio_cmd = layouts::BIO_GETATTR as u16;
    bp.bio_attribute = cattr.as_ptr();
    bp.bio_data = buf.as_mut_ptr().cast();
    bp.bio_length = len as i64;
    bp.bio_disk = disk;
    // SAFETY: a created disk of the driver.
    let driver = unsafe { (*disk).d_getattr };
    let mut error = -1;
    if let Some(f) = driver {
        // SAFETY: the driver's d_getattr with a bio lent for the call; no emulation lock held.
        error = unsafe { f(&mut *bp) };
        log(format!("g_down: d_getattr({name}, {attr}, {len} bytes) = {error}"));
    }
    let mut kind = AttrKind::Str;
    if error == -1 {
        let known = DISK_ATTRS.iter().find(|(a, _)| *a == attr).map(|&(_, k)| k);
        // SAFETY: a created disk: its fields are the driver's, filled in before disk_create.
        let d = unsafe { &*disk };
        error = match known {
            None => layouts::ENOIOCTL,
            Some(k) => {
                kind = k;
                let text = |a: &[std::ffi::c_char]| a.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect::<Vec<u8>>();
                let value: Vec<u8> = match attr {
                    "GEOM::candelete" => i32::from(d.d_flags & layouts::DISKFLAG_CANDELETE as u32 != 0).to_ne_bytes().to_vec(),
                    "GEOM::ident" => text(&d.d_ident),
                    "GEOM::descr" => text(&d.d_descr),
                    "GEOM::hba_vendor" => d.d_hba_vendor.to_ne_bytes().to_vec(),
                    "GEOM::hba_device" => d.d_hba_device.to_ne_bytes().to_vec(),
                    "GEOM::hba_subvendor" => d.d_hba_subvendor.to_ne_bytes().to_vec(),
                    "GEOM::hba_subdevice" => d.d_hba_subdevice.to_ne_bytes().to_vec(),
                    "GEOM::rotation_rate" => d.d_rotation_rate.to_ne_bytes().to_vec(),
                    _ => text(&d.d_attachment),
                };
                match k {
                    AttrKind::Str if value.len() < len => {
                        buf[..value.len()].copy_from_slice(&value);
                        buf[value.len()] = 0;
                        0
                    }
                    AttrKind::Str => layouts::EFAULT,
                    _ if value.len() == len => {
                        buf.copy_from_slice(&value);
                        0
                    }
                    // g_handleattr: a buffer of another size than the value is EFAULT.
                    _ => layouts::EFAULT,
                }
            }
        };
        log(format!("GEOM: g_disk_start answers {attr} of {name} itself: {error}"));
    }
    let value = match (error, kind) {
        (0, AttrKind::Int) if len == 4 => i32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")).to_string(),
        (0, AttrKind::U16) if len == 2 => u16::from_ne_bytes(buf[..2].try_into().expect("2 bytes")).to_string(),
        (0, _) => String::from_utf8_lossy(&buf[..buf.iter().position(|&c| c == 0).unwrap_or(len)]).into_owned(),
        _ => String::new(),
    };
    (error, value)
}

/// The created disks with their `d_ident` (the controller's serial), `d_unit` and sector size.
pub fn created_disks() -> Vec<(String, String, u32, u32)> {
    let disks: Vec<(u64, String)> = with(|e| e.disks.iter().filter(|(_, d)| d.state == DiskState::Created).map(|(p, d)| (*p, d.name.clone())).collect());
    disks
        .into_iter()
        .map(|(p, name)| {
            // SAFETY: a created disk (not destroyed: its struct is the driver's, filled in).
            let d = unsafe { &*(p as *const layouts::disk) };
            let ident: Vec<u8> = d.d_ident.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            (name, String::from_utf8_lossy(&ident).into_owned(), d.d_unit, d.d_sectorsize)
        })
        .collect()
}

/// biodone(9): the request is finished (flags BIO_DONE); GEOM's g_up would deliver it.
extern "C" fn emu_biodone(bp: *mut layouts::bio) {
    // SAFETY: a bio the driver got from d_strategy.
    let b = unsafe { &mut *bp };
    if b.bio_flags & layouts::BIO_DONE as u16 != 0 {
        kernel_panic(&format!("biodone: bio {bp:p} already done"));
    }
    b.bio_flags |= layouts::BIO_DONE as u16;
    log(format!("biodone({bp:p}): error {}, flags {:#x}, resid {}", b.bio_error, b.bio_flags, b.bio_resid));
}

/// Disks not destroyed (after unload).
pub fn end_of_life_checks() {
    let left: Vec<(String, DiskState)> = with(|e| e.disks.values().filter(|d| d.state != DiskState::Destroyed).map(|d| (d.name.clone(), d.state)).collect());
    for (n, s) in left {
        super::rules::finding(Rule::UnloadWithLiveCallbacks, &format!("after unload: disk {n} never destroyed (state {s:?})"));
    }
}

pub fn register(t: &mut KpiTable) {
    t.function("disk_alloc", emu_disk_alloc as extern "C" fn() -> _ as usize);
    t.function("disk_create", emu_disk_create as extern "C" fn(_, _) as usize);
    t.function("disk_gone", emu_disk_gone as extern "C" fn(_) as usize);
    t.function("disk_destroy", emu_disk_destroy as extern "C" fn(_) as usize);
    t.function("biodone", emu_biodone as extern "C" fn(_) as usize);
}

/// sys/sys/bio.h's name of a bio command.
pub fn bio_cmd_name(cmd: u16) -> &'static str {
    match cmd {
        0x01 => "BIO_READ",
        0x02 => "BIO_WRITE",
        0x03 => "BIO_DELETE",
        0x04 => "BIO_GETATTR",
        0x05 => "BIO_FLUSH",
        _ => "BIO_?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The order of the driver's calls: 1 for d_close, 2 for d_gone, as digits.
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn strategy(_: *mut layouts::bio) {}
    unsafe extern "C" fn d_close(_: *mut layouts::disk) -> c_int {
        CALLS.store(CALLS.load(Ordering::SeqCst) * 10 + 1, Ordering::SeqCst);
        0
    }
    unsafe extern "C" fn d_gone(_: *mut layouts::disk) {
        CALLS.store(CALLS.load(Ordering::SeqCst) * 10 + 2, Ordering::SeqCst);
    }

    #[test]
    fn d_gone_waits_for_the_last_close_which_still_reaches_d_close() {
        let dp = emu_disk_alloc();
        // SAFETY: the zeroed disk emu_disk_alloc made, filled in as a driver does.
        unsafe {
            (*dp).d_name = c"geomtest".as_ptr();
            (*dp).d_unit = 7;
            (*dp).d_strategy = Some(strategy);
            (*dp).d_close = Some(d_close);
            (*dp).d_gone = Some(d_gone);
        }
        emu_disk_create(dp, layouts::DISK_VERSION);
        assert_eq!(open("geomtest7"), 0);
        assert_eq!(open("geomtest7"), 0, "a second consumer");
        emu_disk_gone(dp);
        run_events();
        assert_eq!(CALLS.load(Ordering::SeqCst), 0, "open twice: no d_gone yet");
        assert_eq!(close("geomtest7"), 0);
        run_events();
        assert_eq!(CALLS.load(Ordering::SeqCst), 0, "still open once: no d_close, no d_gone");
        // The last close reaches d_close although the disk is gone; then d_gone runs.
        assert_eq!(close("geomtest7"), 0);
        run_events();
        assert_eq!(CALLS.load(Ordering::SeqCst), 12, "d_close, then d_gone");
        assert_eq!(close("geomtest7"), layouts::ENXIO, "not open any more");
        emu_disk_destroy(dp);
    }
}
