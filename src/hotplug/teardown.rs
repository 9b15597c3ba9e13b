//! The one teardown order for a controller, as a typestate that cannot be run out of order.
//!
//! ```text
//! Live --mark_gone--> Gone --fail_outstanding--> Failed --drain--> Drained
//!      --destroy_nodes--> NodesDestroyed --free--> Freed
//! ```
//!
//! Each state is a distinct type whose only method consumes it and returns the next, so
//! skipping or reordering a step is a compile error. Why each step sits where it does
//! (docs/teardown.md has the long form with the FreeBSD sources):
//!
//! 1. **Gone** (mark gone, refuse new I/O): the engine's gone flag makes every new request
//!    fail with ENXIO; `disk_gone` withers each provider so GEOM consumers get ENXIO too. Done
//!    first so that nothing new enters while we empty the pipes.
//! 2. **Failed** (fail everything at once): every queued and outstanding request completes with
//!    ENXIO now (after an announced removal, [`Gone::quiesce`] first lets the requests already
//!    in flight finish on the still-present device, bounded). A removed device never answers, so waiting for a timeout would only delay, and
//!    a thread sleeping in a node method on such a request would make step 4's destroy_dev wait
//!    forever (destroy_dev drains threads, kern_conf.c destroy_devl).
//! 3. **Drained** (interrupts, timers, tasks): bus_teardown_intr, callout_drain,
//!    taskqueue_drain_all, in that order: interrupts schedule tasks and timers re-arm, and the
//!    gone flag stops each from re-arming the others, so after the last drain no callback of
//!    ours is running or queued. They touch the softc, which step 5 frees.
//! 4. **NodesDestroyed** (sleepable context, never d_close): destroy_dev on every namespace
//!    node, then the controller node. destroy_dev returns only when no thread is inside a
//!    method, after which nothing reaches the softc through `si_drv1`.
//! 5. **Freed**: the task queue, the engine (its queue memory), the softc, last, after every
//!    drain and callback returned. Disks are not freed here: GEOM owns them after `disk_gone`
//!    and frees them in `d_gone` ([`on_disk_gone`]), as nvd(4) does (nvd.c nvd_gonecb).
//!
//! ```
//! // The one order, spelled out (this compiles; the two below do not).
//! use nvme_hotplug::hotplug::teardown::{Freed, Live};
//! use nvme_hotplug::hotplug::kernel::{IoGate, Kernel};
//! fn right<K: Kernel, C: IoGate>(live: Live<K, C>, k: &mut K) -> Freed {
//!     live.mark_gone(k).fail_outstanding().drain(k).destroy_nodes(k).free(k)
//! }
//! ```
//!
//! ```compile_fail
//! // Destroying nodes before outstanding I/O was failed does not compile.
//! use nvme_hotplug::hotplug::teardown::Live;
//! use nvme_hotplug::hotplug::kernel::{IoGate, Kernel};
//! fn wrong<K: Kernel, C: IoGate>(live: Live<K, C>, k: &mut K) {
//!     let gone = live.mark_gone(k);
//!     gone.destroy_nodes(k);
//! }
//! ```
//!
//! ```compile_fail
//! // Freeing before the drain does not compile either.
//! use nvme_hotplug::hotplug::teardown::Live;
//! use nvme_hotplug::hotplug::kernel::{IoGate, Kernel};
//! fn wrong<K: Kernel, C: IoGate>(live: Live<K, C>, k: &mut K) {
//!     live.mark_gone(k).fail_outstanding().free(k);
//! }
//! ```

use super::errno::Errno;
use crate::fallible::{push_within_capacity, try_collect};
use super::kernel::{IoGate, Kernel};
use super::node_name::NodeName;
use alloc::vec::Vec;

/// Bytes of the per-disk context handed to GEOM as `d_drv1`. It holds only what `d_strategy`
/// needs after the controller is gone (a gone flag); it never points into the softc.
pub const DISK_CTX_SIZE: usize = 64;

/// One namespace's kernel objects.
struct NsParts<K: Kernel> {
    nsid: u32,
    node: Option<K::Node>,
    disk: Option<K::Disk>,
}

/// Everything one attached controller owns.
struct Parts<K: Kernel, C: IoGate> {
    unit: u32,
    io: C,
    softc: K::Mem,
    intr: Option<K::Intr>,
    timer: Option<K::Timer>,
    taskq: Option<K::TaskQueue>,
    ctrl_node: Option<K::Node>,
    namespaces: Vec<NsParts<K>>,
    failed_requests: usize,
    nodes_destroyed: u32,
    disks_gone: u32,
}

/// An attached controller in normal operation.
pub struct Live<K: Kernel, C: IoGate>(Parts<K, C>);
/// Marked gone: new I/O is refused, disks are withered.
pub struct Gone<K: Kernel, C: IoGate>(Parts<K, C>);
/// Every queued and outstanding request has completed with ENXIO.
pub struct Failed<K: Kernel, C: IoGate>(Parts<K, C>);
/// No interrupt, timer or task of ours is running or queued.
pub struct Drained<K: Kernel, C: IoGate>(Parts<K, C>);
/// Every node is destroyed; no thread is inside any node method.
pub struct NodesDestroyed<K: Kernel, C: IoGate>(Parts<K, C>);

/// The receipt of a finished teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freed {
    /// Unit number that was torn down.
    pub unit: u32,
    /// Requests completed with ENXIO by the fail step.
    pub failed_requests: usize,
    /// Nodes destroyed (namespace nodes and the controller node).
    pub nodes_destroyed: u32,
    /// Disks handed to `disk_gone` (their `d_gone` frees them, possibly later).
    pub disks_gone: u32,
}

impl<K: Kernel, C: IoGate> Live<K, C> {
    /// Takes ownership of an attached controller's resources. Creates nothing yet; call
    /// [`Live::create_controller_node`] and [`Live::add_namespace`]. If either fails, run the
    /// full teardown: it copes with any subset of created objects.
    pub fn new(
        unit: u32,
        io: C,
        softc: K::Mem,
        intr: Option<K::Intr>,
        timer: Option<K::Timer>,
        taskq: Option<K::TaskQueue>,
    ) -> Self {
        Live(Parts {
            unit,
            io,
            softc,
            intr,
            timer,
            taskq,
            ctrl_node: None,
            namespaces: Vec::new(),
            failed_requests: 0,
            nodes_destroyed: 0,
            disks_gone: 0,
        })
    }

    /// Unit number.
    pub fn unit(&self) -> u32 {
        self.0.unit
    }

    /// The engine, for I/O while live.
    pub fn io(&mut self) -> &mut C {
        &mut self.0.io
    }

    /// Creates `nvmehp<U>` with `si_drv1` = softc.
    pub fn create_controller_node(&mut self, k: &mut K) -> Result<(), Errno> {
        if self.0.ctrl_node.is_some() {
            return Err(Errno::EEXIST);
        }
        let node = k.make_node(&NodeName::controller(self.0.unit), self.0.softc)?;
        self.0.ctrl_node = Some(node);
        Ok(())
    }

    /// Creates `nvmehp<U>ns<N>` (si_drv1 = softc) and its disk (d_drv1 = a fresh disk
    /// context). `disk_unit` is the global disk unit number.
    pub fn add_namespace(&mut self, k: &mut K, nsid: u32, disk_unit: u32) -> Result<(), Errno> {
        if self.0.namespaces.iter().any(|n| n.nsid == nsid) {
            return Err(Errno::EEXIST);
        }
        // Room in the table first, so that the node, once made, is always kept there and a
        // later failure still destroys it.
        if self.0.namespaces.len() == self.0.namespaces.capacity() {
            self.0.namespaces.try_reserve(1).map_err(|_| Errno::ENOMEM)?;
        }
        let node = k.make_node(&NodeName::namespace(self.0.unit, nsid), self.0.softc)?;
        if let Err(parts) = push_within_capacity(&mut self.0.namespaces, NsParts { nsid, node: Some(node), disk: None }) {
            // Not reached (room was made above); should it be, the node is not leaked.
            if let Some(node) = parts.node {
                k.destroy_node(node);
            }
            return Err(Errno::ENOMEM);
        }
        let ctx = k.malloc(DISK_CTX_SIZE)?;
        match k.disk_create(disk_unit, ctx) {
            Ok(disk) => {
                if let Some(ns) = self.0.namespaces.last_mut() {
                    ns.disk = Some(disk);
                }
                Ok(())
            }
            Err(e) => {
                k.free(ctx);
                Err(e)
            }
        }
    }

    /// Removes one namespace (deleted on the controller): the same order as the full
    /// teardown, for one namespace: disk_gone, fail its I/O, destroy its node.
    pub fn remove_namespace(&mut self, k: &mut K, nsid: u32) -> Result<(), Errno> {
        let pos = self.0.namespaces.iter().position(|n| n.nsid == nsid).ok_or(Errno::ENXIO)?;
        let mut ns = self.0.namespaces.remove(pos);
        if let Some(disk) = ns.disk.take() {
            k.disk_gone(disk);
            self.0.disks_gone += 1;
        }
        self.0.failed_requests += self.0.io.fail_namespace(nsid);
        if let Some(node) = ns.node.take() {
            k.destroy_node(node);
            self.0.nodes_destroyed += 1;
        }
        Ok(())
    }

    /// Brings the namespace nodes in line with `present` (the controller's namespace list after
    /// a namespace-attribute-changed event): removes the nodes of vanished namespaces first
    /// ([`Live::remove_namespace`] order), then creates nodes and disks for new ones.
    /// Returns (added, removed). Stops at the first creation error; what was made stays owned
    /// and is torn down with the controller.
    pub fn sync_namespaces(
        &mut self,
        k: &mut K,
        present: &[u32],
        mut disk_unit: impl FnMut(u32) -> u32,
    ) -> Result<(u32, u32), Errno> {
        let gone: Vec<u32> = try_collect(self.0.namespaces.iter().map(|n| n.nsid).filter(|id| !present.contains(id)))
            .map_err(|_| Errno::ENOMEM)?;
        for &nsid in &gone {
            self.remove_namespace(k, nsid)?;
        }
        let mut added = 0;
        for &nsid in present {
            if !self.0.namespaces.iter().any(|n| n.nsid == nsid) {
                self.add_namespace(k, nsid, disk_unit(nsid))?;
                added += 1;
            }
        }
        Ok((added, gone.len() as u32))
    }

    /// Namespaces with nodes, in creation order.
    pub fn namespaces(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.namespaces.iter().map(|n| n.nsid)
    }

    /// A node is open or a disk's provider is open: what makes an eject "busy" and
    /// kldunload refuse (see [`super::unload`]).
    pub fn in_use(&self, k: &K) -> bool {
        self.0.ctrl_node.as_ref().is_some_and(|n| k.node_in_use(n))
            || self.0.namespaces.iter().any(|ns| {
                ns.node.as_ref().is_some_and(|n| k.node_in_use(n))
                    || ns.disk.as_ref().is_some_and(|d| k.disk_in_use(d))
            })
    }

    /// Step 1: mark gone, refuse new I/O, wither the disks.
    pub fn mark_gone(mut self, k: &mut K) -> Gone<K, C> {
        self.0.io.mark_gone();
        for ns in self.0.namespaces.iter_mut() {
            if let Some(disk) = ns.disk.take() {
                k.disk_gone(disk);
                self.0.disks_gone += 1;
            }
        }
        Gone(self.0)
    }
}

impl<K: Kernel, C: IoGate> Gone<K, C> {
    /// Optional, announced removal only: let in-flight requests finish on the still-present
    /// device (bounded), before step 2 fails the rest. Never used for a vanished device:
    /// nothing would answer.
    pub fn quiesce(mut self) -> Gone<K, C> {
        self.0.io.quiesce();
        self
    }

    /// Step 2: complete every queued and outstanding request with ENXIO, now.
    pub fn fail_outstanding(mut self) -> Failed<K, C> {
        self.0.failed_requests += self.0.io.fail_all();
        Failed(self.0)
    }
}

impl<K: Kernel, C: IoGate> Failed<K, C> {
    /// Step 3: interrupts, then timers, then tasks.
    pub fn drain(mut self, k: &mut K) -> Drained<K, C> {
        if let Some(intr) = self.0.intr.take() {
            k.teardown_intr(intr);
        }
        if let Some(timer) = self.0.timer.as_mut() {
            k.callout_drain(timer);
        }
        if let Some(tq) = self.0.taskq.as_mut() {
            k.taskqueue_drain_all(tq);
        }
        Drained(self.0)
    }
}

impl<K: Kernel, C: IoGate> Drained<K, C> {
    /// Step 4: destroy every namespace node (newest first), then the controller node.
    pub fn destroy_nodes(mut self, k: &mut K) -> NodesDestroyed<K, C> {
        while let Some(mut ns) = self.0.namespaces.pop() {
            if let Some(node) = ns.node.take() {
                k.destroy_node(node);
                self.0.nodes_destroyed += 1;
            }
        }
        if let Some(node) = self.0.ctrl_node.take() {
            k.destroy_node(node);
            self.0.nodes_destroyed += 1;
        }
        NodesDestroyed(self.0)
    }
}

impl<K: Kernel, C: IoGate> NodesDestroyed<K, C> {
    /// Step 5: free the task queue, the engine (queue memory) and, last, the softc.
    pub fn free(self, k: &mut K) -> Freed {
        let p = self.0;
        if let Some(tq) = p.taskq {
            k.taskqueue_free(tq);
        }
        drop(p.timer);
        drop(p.io);
        k.free(p.softc);
        Freed {
            unit: p.unit,
            failed_requests: p.failed_requests,
            nodes_destroyed: p.nodes_destroyed,
            disks_gone: p.disks_gone,
        }
    }
}

/// How the controller is leaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Eject request or kldunload: the device still answers, so in-flight requests may finish
    /// (bounded) before the rest is failed.
    Announced,
    /// Surprise removal or a dead controller: fail everything at once.
    Surprise,
}

/// The whole order in one call: what `device_detach` runs.
pub fn teardown<K: Kernel, C: IoGate>(live: Live<K, C>, k: &mut K, how: Removal) -> Freed {
    let gone = live.mark_gone(k);
    let gone = match how {
        Removal::Announced => gone.quiesce(),
        Removal::Surprise => gone,
    };
    gone.fail_outstanding().drain(k).destroy_nodes(k).free(k)
}

/// The `d_gone` callback: GEOM's last call for this disk (geom_disk.c g_disk_providergone). Only
/// here is the disk
/// destroyed and its context freed, as nvd_gonecb does (sys/dev/nvd/nvd.c). Reads `d_drv1` first,
/// since the disk is gone after disk_destroy.
pub fn on_disk_gone<K: Kernel>(k: &mut K, disk: K::Disk) {
    let ctx = k.disk_ctx(&disk);
    k.disk_destroy(disk);
    k.free(ctx);
}
