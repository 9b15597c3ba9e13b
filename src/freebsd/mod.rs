//! The only part of the crate that touches the FreeBSD kernel (feature `kld`).
//!
//! Everything here is a thin, safe wrapper over one piece of the KPI, one concept per file;
//! every `unsafe` block says why it is sound. The engine (`crate::nvme`) and the hotplug logic
//! (`crate::hotplug`) never call the kernel directly: they see [`platform::KernelPlatform`] through
//! the traits of `crate::platform`.
//!
//! - [`bindings`]: the bindgen'd KPI (build.rs over kmod/kpi.h).
//! - [`cstr_buf`]: fixed-size, no-allocation message formatting.
//! - [`log`]: `printf(9)`/`device_printf(9)` with Rust formatting.
//! - [`panic`]: the panic handler, which ends in `panic(9)`.
//! - [`alloc`]: the global allocator over `malloc(9)` (never sleeps) and the sleeping path.
//! - [`mutex`]: `mtx(9)` (MTX_DEF) owning the data it protects.
//! - [`taskqueue`]: `taskqueue(9)` with tasks that are drained before they are freed.
//! - [`callout`]: `callout(9)` timers bound to a [`mutex::Mutex`], drained before freed.
//! - [`intr`]: IRQ resources and interrupt handlers, torn down before freed.
//! - [`irq_source`]: which interrupt a controller gets (MSI-X with its table and PBA BARs,
//!   MSI, INTx) and the order it is given back in.
//! - [`device`]: newbus `device_t` and its PCI accessors.
//! - [`resource`]: a memory BAR from `bus_alloc_resource(9)`, as register I/O.
//! - [`clock`], [`dma`], [`platform`]: the `crate::platform` traits in the kernel.
//! - [`busdma`]: busdma(9) payload tag and per-tracker maps: bios' data straight to the device.
//! - [`acpi`]: ACPI slot objects, notify handlers, `_STA`/`_EJ0`/`_OST`.
//! - [`bus_topo`]: newbus rescan/detach/delete under `bus_topo_lock()`.
//! - [`pci_bus`]: a pci bus and config reads of its slots, with or without a device.
//! - [`slot_rescan`]: add and attach the new functions of one slot (not a whole-bus rescan).
//! - [`slot_discovery`]: which ACPI objects are hotplug slots, on pci0 and behind its bridges.
//! - [`cdev`]: device nodes that are never eternal and always destroyed.
//! - [`disk`], [`bio`]: GEOM disks with the nvd(4) teardown order, and their I/O requests
//!   (and the bioq of bios waiting for a tracker).
//! - [`tracker`]: the preallocated per-controller trackers (busdma map + bio in flight).
//! - [`tunables`]: `hw.nvme_hotplug.*` tunables and counters.
//! - [`dev_sysctl`]: per-device `dev.nvmehp.N.*` counters, removed before their memory.
//! - [`ctrl`]: one controller at run time: engine under its mutex, bios in flight, interrupt
//!   and watchdog, and the teardown's `IoGate`.
//! - [`ns_disk`]: a namespace as a GEOM disk (strategy, open/close, `d_gone`).
//! - [`node`]: the `nvmehp<U>` / `nvmehp<U>ns<N>` device nodes.
//! - [`kernel`]: the hotplug `Kernel` and `AcpiNotify` traits over the KPI.
//! - [`slots`]: ACPI slot discovery, notify handlers, the hotplug task and `SlotOps`.
//! - [`pci_driver`]: the `nvmehp` driver's probe/attach/detach.
//! - [`claim`]: which driver a hot-added NVMe controller gets, said at load.
//! - [`module`]: the module event handler (load, quiesce/EBUSY, unload).

pub mod bindings;
pub mod cstr_buf;
#[macro_use]
pub mod log;
pub mod alloc;
// Only in the kernel build (kmod/x86_64-freebsd-kld.json has os "none"); host builds of this
// module (its unit tests, clippy) use std's panic machinery.
#[cfg(target_os = "none")]
pub mod panic;
pub mod mutex;
pub mod taskqueue;
pub mod callout;
pub mod intr;
pub mod irq_source;
pub mod device;
pub mod resource;
pub mod clock;
pub mod dma;
pub mod busdma;
pub mod platform;
pub mod acpi;
pub mod bus_topo;
pub mod pci_bus;
pub mod slot_rescan;
pub mod slot_discovery;
pub mod cdev;
pub mod disk;
pub mod disk_attr;
pub mod bio;
pub mod tracker;
pub mod tunables;
pub mod dev_sysctl;
pub mod ctrl;
pub mod ns_disk;
pub mod node;
pub mod kernel;
pub mod outside_rescan;
pub mod slots;
pub mod pci_driver;
pub mod claim;
pub mod module;

#[cfg(test)]
mod fake_kernel;
#[cfg(test)]
mod fake_nvme;
#[cfg(test)]
mod kpi_tests;
#[cfg(test)]
mod glue_tests;
#[cfg(test)]
mod slot_rescan_tests;
#[cfg(test)]
mod slot_detach_tests;
#[cfg(test)]
mod slot_bridge_tests;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod bringup_tests;
#[cfg(test)]
mod io_path_tests;
