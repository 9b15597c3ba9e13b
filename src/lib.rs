//! nvme_hotplug: NVMe hot-attach and hot-detach for FreeBSD, as a kld written in Rust.
//!
//! The crate is `no_std`. Everything outside [`freebsd`] is hardware- and OS-neutral safe Rust
//! written against the small traits in [`platform`]; the same code runs in the kernel (over the
//! bindgen'd KPI in `src/freebsd/`) and on the host, in the QEMU lab (`lab/`) and in unit tests.
//!
//! - [`fallible`]: allocation that reports failure instead of aborting (the kernel's
//!   allocator is `M_NOWAIT`).
//! - [`platform`]: what the engine needs from its surroundings (registers, DMA memory, time,
//!   PCI presence).
//! - [`nvme`]: the NVMe engine: bring-up, queues, namespaces, I/O, removal.
//! - [`hotplug`]: the per-slot ACPI hotplug state machine and the node/teardown lifecycle.
//! - `freebsd` (feature `kld`): the only module that touches the kernel.
#![no_std]
#![cfg_attr(feature = "kld", no_builtins)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod platform;
pub mod fallible;
pub mod nvme;
pub mod hotplug;

#[cfg(feature = "kld")]
pub mod freebsd;
