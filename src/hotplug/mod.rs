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
