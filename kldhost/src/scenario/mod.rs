//! `kldhost scenario FILE.toml`: a lab scenario (`docs/scenarios.md`) with the shipped
//! `nvme_hotplug.ko` as the driver (`driver = "kld"`).
//!
//! The machine is the lab's ([`crate::emu::machine`]), so the scenario gets the same
//! controllers, slots, images, hot-adds, unplug requests and ejects as in engine mode; the
//! module is loaded into the emulated kernel and does everything a driver does: the runner
//! only plays what a FreeBSD kernel and its users would (ACPI's GPE handler and acpi_task,
//! the taskqueue, interrupt, GEOM and softclock threads, GEOM consumers sending bios, devfs
//! users opening nodes) and reports with the engine mode's keys ([`report`]).
//!
//! - [`access`]: GEOM's access counts (the driver sees the first open and the last close);
//! - [`runner`]: the steps and the loop that plays the kernel's concurrent threads;
//! - [`bio`]: `io` steps as GEOM consumers: the lab's request generator and ledger, each
//!   request a `struct bio` to the disk's `d_strategy`, done when the module's `biodone` says;
//! - [`devfs_open`]: a devfs user holding one of the module's nodes open;
//! - [`devices`]: which pci0 child, disks and nodes of the module belong to a scenario
//!   controller;
//! - [`report`]: the emulation's findings, leaks and nodes as report keys;
//! - [`child`]: the run in a child process, so an emulated kernel panic (which ends the
//!   process, as it ends a kernel) still gives a report (`panics = 1`).

pub mod bio;
pub mod child;
pub mod devfs_open;
pub mod devices;
pub mod report;
pub mod runner;

use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::scenario::Scenario;

/// Exit status of `kldhost scenario` for a scenario the emulation cannot run yet (the
/// automake/ctest convention for a skipped test).
pub const SKIP_EXIT: i32 = 77;

/// Why kldhost cannot run `sc` yet, if it cannot: said loudly, never counted as a pass.
pub fn unsupported(sc: &Scenario) -> Option<String> {
    if sc.machine == MachineKind::Q35 && sc.interrupts == nvmehp_lab::interrupts::InterruptMode::Intx {
        return Some("machine = \"q35\" with interrupts = \"intx\": kldhost routes INTx through PIIX3's PIRQ registers only; ICH9's routing behind a root port is not emulated".into());
    }
    None
}
