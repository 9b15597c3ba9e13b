//! disk(9) as GEOM presents it to a disk driver (sys/geom/geom_disk.c), recorded.
//!
//! - `disk_alloc` may sleep (M_WAITOK) and returns a zeroed `struct disk`.
//! - `disk_create` refuses a disk of another `DISK_VERSION` with the kernel's warning (a
//!   finding here) and publishes the disk (no provider is tasted, nothing opens it).
//! - `disk_gone` withers the disk; since nothing has it open, GEOM's event thread then calls
//!   the driver's `d_gone` ([`run_events`], run when the module sleeps and when taskqueue
//!   threads run, never inside `disk_gone` itself). A second `disk_gone` is a finding.
//! - `disk_destroy` ends the disk; the struct is poisoned and kept. After unload every disk
//!   must have been destroyed.

use super::kern::cstr;
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
}

fn name_of(dp: *mut layouts::disk) -> String {
    // SAFETY: the driver's disk: d_name is a C string it set before disk_create.
    unsafe { format!("{}{}", cstr((*dp).d_name), (*dp).d_unit) }
}

extern "C" fn emu_disk_alloc() -> *mut layouts::disk {
    super::sched::may_sleep("disk_alloc");
    let p = Box::into_raw(Box::<layouts::disk>::default());
    with(|e| e.disks.insert(p as u64, DiskRec { name: String::new(), state: DiskState::Allocated }));
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
        Some((s, name)) => finding(format!("disk_gone({name}) on a disk in state {s:?}")),
        None => kernel_panic(&format!("disk_gone({dp:p}): not a disk")),
    }
}

extern "C" fn emu_disk_destroy(dp: *mut layouts::disk) {
    let st = with(|e| e.disks.get(&(dp as u64)).map(|d| (d.state, d.name.clone())));
    let Some((s, name)) = st else { kernel_panic(&format!("disk_destroy({dp:p}): not a disk")) };
    if s == DiskState::Destroyed {
        kernel_panic(&format!("disk_destroy({name}): destroyed twice"));
    }
    with(|e| e.disks.get_mut(&(dp as u64)).expect("disk").state = DiskState::Destroyed);
    // SAFETY: the disk struct disk_alloc made; poisoned and kept.
    unsafe {
        let w = dp.cast::<u32>();
        for i in 0..std::mem::size_of::<layouts::disk>() / 4 {
            w.add(i).write_unaligned(super::kern::FREE_POISON);
        }
    }
    log(format!("disk_destroy({name}) (was {s:?})"));
}

type DGone = unsafe extern "C" fn(*mut layouts::disk);

/// GEOM's event thread: d_gone of every withered disk. Returns how many ran.
pub fn run_events() -> usize {
    let mut n = 0;
    while let Some(dp) = with(|e| e.geom_events.pop_front()) {
        // SAFETY: a disk disk_gone withered; its d_gone was set by the driver.
        let f = unsafe { (*(dp as *mut layouts::disk)).d_gone };
        let name = with(|e| e.disks.get(&dp).map(|d| d.name.clone()).unwrap_or_default());
        with(|e| e.disks.get_mut(&dp).map(|d| d.state = DiskState::GoneDone));
        if let Some(f) = f {
            log(format!("g_event: d_gone({name})"));
            // SAFETY: the driver's d_gone with its disk; no emulation lock held.
            unsafe { std::mem::transmute::<DGone, DGone>(f)(dp as *mut layouts::disk) };
        }
        n += 1;
    }
    n
}

/// Disks not destroyed (after unload).
pub fn end_of_life_checks() {
    let left: Vec<(String, DiskState)> = with(|e| e.disks.values().filter(|d| d.state != DiskState::Destroyed).map(|d| (d.name.clone(), d.state)).collect());
    for (n, s) in left {
        finding(format!("after unload: disk {n} never destroyed (state {s:?})"));
    }
}

pub fn register(t: &mut KpiTable) {
    t.function("disk_alloc", emu_disk_alloc as extern "C" fn() -> _ as usize);
    t.function("disk_create", emu_disk_create as extern "C" fn(_, _) as usize);
    t.function("disk_gone", emu_disk_gone as extern "C" fn(_) as usize);
    t.function("disk_destroy", emu_disk_destroy as extern "C" fn(_) as usize);
}
