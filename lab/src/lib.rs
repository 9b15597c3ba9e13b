//! nvmehp-lab: the nvme_hotplug engine run against QEMU's real NVMe controller and PIIX4 ACPI
//! PCI hotplug models, with no guest OS.
//!
//! QEMU runs with a halt BIOS; the lab drives it through qtest (MMIO, port I/O), reaches guest
//! RAM through a shared mapping of it (or qtest, see [`shared_ram::RamAccess`]), and uses
//! QMP (block nodes, `device_add`/`device_del`). The lab plays three parts a real machine has:
//! - the **firmware** ([`firmware`]): BARs, command registers, PIRQ routing, GPE enables;
//! - the **ACPI AML** ([`acpi_hotplug`]): PCIU/PCID + SCI become `Notify(slot, 1|3)`, `_EJ0`
//!   is an eject write;
//! - the **kernel** around the engine ([`runner`], [`driver`], [`slot_ops`]): every Notify goes
//!   into the project's own hotplug state machine (`nvme_hotplug::hotplug`), which decides;
//!   the lab's `SlotOps` act: on a device check probe and bring up, create a node per
//!   namespace; on an eject request stop I/O, drain or fail what is in flight, destroy nodes,
//!   free, then `_EJ0`. A surprise removal is noticed by the driver's health watchdog.
//!
//! The engine itself (`nvme_hotplug::nvme::Controller`) sees only [`platform::LabPlatform`],
//! the lab's implementation of the same traits the kld implements over bus_space(9).
//!
//! Modules, one concept each:
//! - [`qemu`]: spawning and always reaping QEMU; the halt BIOS.
//! - [`qtest`]: the qtest protocol client (with asynchronous IRQ lines).
//! - [`qmp`]: block nodes and devices over QMP (`qapi` crate).
//! - [`guest`]: the shared qtest connection + DMA pool + guest-RAM path + first harness fault.
//! - [`shared_ram`]: guest RAM as a file QEMU and the lab both map (the direct RAM path).
//! - [`dma`]: guest-RAM allocator and the DMA region type.
//! - [`platform`]: the engine's platform traits over qtest.
//! - [`access_faults`]: removal at a chosen device access; zeros vs all-ones after removal.
//! - [`firmware`]: PCI config, BAR programming, PIRQ, GPE enable.
//! - [`acpi_hotplug`]: the PIIX4 hotplug block and the `_E01` logic.
//! - [`interrupts`]: a controller's vector 0 as MSI-X written to guest RAM, or intercepted INTx.
//! - [`irq_driven`]: the kld ithread's loop (wait for the interrupt, bounded, then poll).
//! - [`machine`]: one QEMU machine with its plugged devices and images.
//! - [`scenario`]: the TOML scenario format (see `docs/scenarios.md`).
//! - [`ledger`]: acked writes and the end-of-run check of the raw images.
//! - [`workload`]: an `io` step's request generator and verifier.
//! - [`observer`]: **the hook for kernel models** (nodes, rule violations).
//! - [`freebsd_model`]: the FreeBSD-rules model (`kpimodel`) as the default observer.
//! - [`driver`]: the kernel's side of one controller (attach, poll, watchdog, detach).
//! - [`slot_ops`]: the project's hotplug state machine run against QEMU (its `SlotOps`).
//! - [`bench`]: the hotplug-cycle benchmark.
//! - [`runner`]: runs a scenario and produces a [`report::Report`] (its fault-injection steps
//!   in `runner/faults.rs`).
//! - [`report`]: the JSON report.
//! - [`skip`]: the loud SKIP / `NVMEHP_REQUIRE_QEMU` policy for tests.
//! - [`kldhost_bin`]: the `kldhost` binary next to this one and the shipped `.ko` it runs.
//!
//! # The kernel model
//! Every run is judged by [`freebsd_model::FreeBsdRules`]: the lab's own ordering rules plus
//! the FreeBSD-rules model (`kpimodel`). To plug in another, implement [`observer::Observer`] (every method has a default) and pass it to
//! [`runner::Runner::with_observer`]. The runner reports node creation after bring-up, every
//! I/O start and finish per node, the start of a detach, node destruction and the controller
//! being freed, then the module unload; the report's `nodes_left` is
//! [`observer::Observer::nodes_alive`] at the end, `violations` includes
//! [`observer::Observer::violations`], and `kernel` is [`observer::Observer::kernel_report`]
//! (whose leaked bytes are added to `leaked_bytes`). Any violation makes `ok = false`.

pub mod access_faults;
pub mod acpi_hotplug;
pub mod bench;
pub mod dma;
pub mod driver;
pub mod firmware;
pub mod freebsd_model;
pub mod guest;
pub mod interrupts;
pub mod irq_driven;
pub mod kldhost_bin;
pub mod ledger;
pub mod machine;
pub mod observer;
pub mod platform;
pub mod qemu;
pub mod qmp;
pub mod qtest;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod shared_ram;
pub mod skip;
pub mod slot_ops;
pub mod workload;
