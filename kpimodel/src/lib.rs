//! kpimodel: a host model of the FreeBSD kernel services nvme_hotplug uses, which enforces
//! their rules and records every violation instead of panicking or hanging.
//!
//! It implements nvme_hotplug's [`Kernel`](nvme_hotplug::hotplug::kernel::Kernel) trait
//! (devfs, disk(9), malloc(9), interrupts, callouts, taskqueues) and
//! [`SlotOps`](nvme_hotplug::hotplug::slot_ops::SlotOps) (an i440fx/PIIX4 PCI bus with ACPI
//! hotplug slots and, optionally, acpi_pci.c's own notify handler), so the driver's real
//! teardown and hotplug code runs against it in unit tests and in the QEMU lab.
//!
//! Each check is a [`Rule`] naming the FreeBSD source it mirrors. The rules come from
//! docs/freebsd-kpi.md, sections 5-6 (devfs, GEOM), 1 (acpi_pci) and 7 (nvme/nvd), each with
//! its FreeBSD source file and function.

pub mod acpi_slots;
pub mod controller;
pub mod devfs;
pub mod driver_events;
pub mod geom;
pub mod kernel_impl;
pub mod memory;
pub mod model;
pub mod report;
pub mod rules;
pub mod sched;

pub use driver_events::DriverEvents;
pub use acpi_slots::{Actor, SlotEvent, SlotWorld};
pub use model::{CbKind, CbRef, DiskRef, IoBoard, IoRef, LockId, MemRef, Model, NodeRef, ThreadId, ThreadKind, TqRef};
pub use report::Report;
pub use rules::{Rule, Violation};

/// The prefix of every node the driver creates.
pub fn node_prefix() -> &'static str {
    nvme_hotplug::hotplug::node_name::PREFIX
}
