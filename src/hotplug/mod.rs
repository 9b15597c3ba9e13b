//! Hotplug: the per-slot ACPI hotplug state machine and the node/teardown lifecycle.
//!
//! OS-neutral safe Rust against small traits; `src/freebsd/` implements them over the KPI and
//! `kpimodel/` implements them as a model that enforces FreeBSD's rules.
//!
//! - [`notify`], [`ost`]: the ACPI values we receive and answer with.
//! - [`pending`]: the cheap notify-context half (record a bit, say whether to enqueue).
//! - [`machine`]: the taskqueue half (rescan one slot, safe detach + `_EJ0`, `_OST`, sweeps).
//! - [`slot`], [`slot_ops`]: per-slot state and the actions the machine asks for.
//! - [`mode`]: `acpi_mode` = auto | own | off, coexistence with acpi_pci's handler.
//! - [`fallback`]: the optional periodic rescan.
//! - [`kernel`], [`node_name`], [`teardown`], [`unload`]: the one teardown order and its
//!   kernel services; kldunload policy.

//!
//! # How the kernel glue wires it (contract for `src/freebsd/`)
//!
//! - **Load / bus attach.** For every ACPI slot object with `_EJ0` under the PCI bus, find out
//!   whether acpi_pci's handler is there and removable ([`mode::InTreeHandler`]), call
//!   [`mode::resolve`] with `hw.nvme_hotplug.acpi_mode`, remove acpi_pci's handler when told,
//!   install ours when told. Build one [`pending::PendingEvents`] (kept under an MTX_DEF mtx(9))
//!   and one [`machine::SlotMachine`] (owned by the hotplug task) with the per-slot roles.
//! - **Notify handler** (acpi_task thread): take the mtx, `if pending.notify(slot, value)`,
//!   enqueue the hotplug task, drop the mtx. Nothing else: no AML, no newbus, no sleep.
//! - **Hotplug task** (our taskqueue): under the mtx `pending.take(&mut snapshot)`; without it,
//!   `machine.run(&snapshot, &mut ops)`. If the report has `rerun_after_us`, enqueue the task
//!   again with `taskqueue_enqueue_timeout`.
//! - **[`slot_ops::SlotOps`]**: each action takes `bus_topo_lock()` itself; `detach_slot`
//!   re-checks the `device_t` under that lock (NoDevice otherwise) and, for
//!   [`slot_ops::DetachReason::Eject`], returns [`slot_ops::DetachError::InUse`] (`_OST` 0x81)
//!   while [`teardown::Live::in_use`] (an open node or disk); `Busy` (0x82) is for a driver
//!   that refuses for another, transient reason; [`slot_ops::DetachError::NotOurs`] (0x80)
//!   when a function of the slot belongs to another driver, which is never detached. The
//!   state machine asks only on slots it owns (observer rule, [`machine::SlotMachine`]).
//! - **`device_detach`** of our driver: [`teardown::teardown`] with
//!   [`teardown::Removal::Announced`] when the device still answers, `Surprise` otherwise.
//!   When acpi_pci (observer role) asks to detach a controller that is in use, returning
//!   EBUSY makes acpi_pci skip `_EJ0` (acpi_pci.c acpi_pci_device_notify_handler), which is the
//!   same safe outcome.
//! - **Fallback callout** (`hw.nvme_hotplug.rescan_interval_ms`, 0 = off):
//!   [`fallback::FallbackRescan::tick`] under the mtx, enqueue the task when it says so.
//! - **Namespace attribute changed** (NVMe AER): `pending.namespace_changed(slot)`; the task's
//!   `rescan_namespaces` applies the engine's list with [`teardown::Live::sync_namespaces`].
//! - **[`kernel::Kernel`]**: `make_node` passes exactly `MAKEDEV_CHECKNAME | MAKEDEV_WAITOK`
//!   (asserted); `d_gone` is a trampoline to [`teardown::on_disk_gone`].
//! - **MOD_UNLOAD**: [`unload::unload`]; EBUSY while any node or disk is open.

pub mod errno;
pub mod fallback;
pub mod kernel;
pub mod machine;
pub mod mode;
pub mod node_name;
pub mod notify;
pub mod ost;
pub mod pending;
pub mod slot;
pub mod slot_ops;
pub mod teardown;
pub mod unload;

#[cfg(test)]
mod tests;
