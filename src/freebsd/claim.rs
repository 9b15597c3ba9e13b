//! Which driver a hot-added NVMe controller gets: nvme(4), nvmehp, or none.
//!
//! newbus decides, not this module: when a function appears (acpi_pci's `BUS_RESCAN`, our slot
//! rescan, `devctl rescan`), `device_probe_child` (sys/kern/subr_bus.c) asks every driver of
//! the pci devclass and the highest bid wins; a bid at or below `BUS_PROBE_NOWILDCARD` counts
//! only on a device whose devclass was fixed by hand (`DF_FIXEDCLASS`, `devctl set driver`).
//! The bids:
//! - nvme(4) (`nvme_pci_probe`, sys/dev/nvme/nvme_pci.c): `BUS_PROBE_DEFAULT` for the
//!   controllers in its ID table, `BUS_PROBE_GENERIC` for any other NVMe I/O controller;
//! - nvmehp (`pci_driver::nvmehp_probe`): `BUS_PROBE_NOWILDCARD` with
//!   `hw.nvme_hotplug.claim=0`, `BUS_PROBE_HOOVER` (below both of nvme(4)'s) with `claim=1`.
//!
//! So, for a controller nobody fixed by hand:
//!
//! | `claim` | nvme(4) loaded | nvme(4) not loaded                                  |
//! |---------|----------------|-----------------------------------------------------|
//! | 0       | nvme(4)        | no driver (until nvme(4) is loaded, or `devctl set driver -f <dev> nvmehp`) |
//! | 1       | nvme(4)        | nvmehp                                              |
//!
//! Loading nvme(4) later re-probes only children without a driver (`pci_driver_added`,
//! sys/dev/pci/pci.c): a controller nvmehp attached stays with nvmehp. `devctl set driver -f`
//! fixes the devclass, and then nvmehp's bid counts whatever `claim` says.
//!
//! Whether nvme(4) is there is asked newbus: registering its driver (DRIVER_MODULE →
//! `devclass_add_driver`, sys/kern/subr_bus.c) creates the devclass "nvme", so
//! `devclass_find("nvme")` finds it when nvme(4) is compiled in (GENERIC) or was loaded as
//! nvme.ko. Devclasses are never freed: after `kldunload nvme` it still answers yes, and the
//! load message then names nvme(4) for controllers that will get no driver.

use super::bindings;

/// The driver a hot-added NVMe I/O controller attaches to when nobody fixed its devclass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotAddDriver {
    /// nvme(4): it outbids nvmehp in every `claim` mode.
    Nvme4,
    /// nvmehp (`claim=1`, nvme(4) not loaded).
    Nvmehp,
    /// None: the function stays a driverless child of the pci bus (`claim=0`, no nvme(4)).
    None,
}

/// The table of the module documentation.
pub const fn hot_added_driver(claim: bool, nvme4_loaded: bool) -> HotAddDriver {
    match (claim, nvme4_loaded) {
        (_, true) => HotAddDriver::Nvme4,
        (true, false) => HotAddDriver::Nvmehp,
        (false, false) => HotAddDriver::None,
    }
}

/// Whether nvme(4) is in the kernel (its devclass exists; see the module documentation).
pub fn nvme4_loaded() -> bool {
    // SAFETY: looks a devclass up by its NUL-terminated name; creates nothing.
    !unsafe { bindings::devclass_find(c"nvme".as_ptr()) }.is_null()
}

/// Says at load, plainly, where hot-added NVMe controllers will go (nothing is handed to
/// nvme(4), or left without a driver, silently).
pub fn announce(claim: bool) {
    let loaded = nvme4_loaded();
    let (to, how) = match hot_added_driver(claim, loaded) {
        HotAddDriver::Nvme4 => (
            "nvme(4)",
            if claim {
                "nvme(4) outbids claim=1; `devctl set driver -f <dev> nvmehp` hands one over"
            } else {
                "`devctl set driver -f <dev> nvmehp` hands one over"
            },
        ),
        HotAddDriver::Nvmehp => ("nvmehp", "nvme(4) is not loaded; loading it later takes none away"),
        HotAddDriver::None => (
            "no driver",
            "claim=0 and nvme(4) is not loaded; `devctl set driver -f <dev> nvmehp` or claim=1 hands them to nvmehp",
        ),
    };
    kprintf!("nvme_hotplug: hot-added NVMe controllers attach to {} (claim={}): {}\n", to, u8::from(claim), how);
}
