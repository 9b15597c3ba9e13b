//! Driver lifecycle events (attach, node created, I/O start/finish, detach, node destroyed,
//! controller freed) replayed onto the model, for a harness that plays the kernel itself.
//!
//! The QEMU lab reports exactly these moments through its `Observer` trait
//! (lab/src/observer.rs); the method names and arguments here match it one to one, so the lab
//! plugs the model in with a delegating `impl Observer for DriverEvents`. Each event becomes
//! the kernel calls the FreeBSD driver makes at that moment, and the model's rules judge them:
//!
//! | event | kernel calls |
//! |---|---|
//! | controller_attached | malloc softc, make_dev `nvmehp<U>` (CHECKNAME) |
//! | node_created | make_dev `nvmehp<U>ns<N>`, malloc disk context, disk_create |
//! | io_started | a thread enters d_strategy of the node and sleeps on the request |
//! | io_finished | the request completes (callback reads the softc), the thread leaves |
//! | node_opened / node_closed | a GEOM consumer (mount, dd) opens / closes the namespace's disk |
//! | detach_started | disk_gone on every disk of the controller |
//! | node_destroyed | destroy_dev of the namespace node |
//! | controller_freed | destroy_dev `nvmehp<U>`, free softc, d_gone callbacks, leak check |
//!
//! A disk still open when its controller is freed keeps its context until the consumer's last
//! close: d_gone runs then (geom_disk.c), and only then is the context checked for a leak.

use crate::memory::M_NVMEHP;
use crate::model::{DiskRef, IoRef, MemRef, Model, NodeRef, ThreadId, ThreadKind};
use crate::report::Report;
use crate::rules::Rule;
use nvme_hotplug::hotplug::kernel::Kernel;
use nvme_hotplug::hotplug::node_name::NodeName;
use nvme_hotplug::hotplug::teardown::DISK_CTX_SIZE;
use std::collections::BTreeMap;

#[derive(Debug)]
struct Ns {
    node: NodeRef,
    disk: Option<DiskRef>,
    /// The disk, kept after disk_gone for the consumers that still hold it open.
    disk_ref: DiskRef,
    ctx: MemRef,
}

#[derive(Debug)]
struct Ctrl {
    unit: u32,
    softc: MemRef,
    node: Option<NodeRef>,
    ns: BTreeMap<u32, Ns>,
    freed: bool,
}

/// The model, fed by driver lifecycle events.
#[derive(Debug, Default)]
pub struct DriverEvents {
    model: Model,
    ctrls: BTreeMap<String, Ctrl>,
    io: BTreeMap<(String, u32, u64), (ThreadId, IoRef, NodeRef)>,
    notifies: u64,
    /// Disks a consumer holds open, per (controller, nsid), with their d_gone context.
    opens: BTreeMap<(String, u32), Vec<(DiskRef, MemRef)>>,
}

impl DriverEvents {
    /// A fresh model.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model (for tests that want to look closer).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// ACPI notifies seen.
    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    /// The platform sent `Notify(slot, code)`.
    pub fn notify(&mut self, _slot: u8, _code: u32) {
        self.notifies += 1;
    }

    /// A controller finished bring-up.
    pub fn controller_attached(&mut self, ctrl: &str, _slot: u8) {
        if self.ctrls.get(ctrl).is_some_and(|c| !c.freed) {
            self.model.violate(Rule::DuplicateName, format!("controller {ctrl} attached twice"));
            return;
        }
        let unit = self.model.next_unit();
        let softc = Model::malloc(&mut self.model, M_NVMEHP, crate::controller::SOFTC_SIZE, true);
        let node = Kernel::make_node(&mut self.model, &NodeName::controller(unit), softc).ok();
        self.ctrls.insert(ctrl.to_string(), Ctrl { unit, softc, node, ns: BTreeMap::new(), freed: false });
    }

    /// A namespace node was created.
    pub fn node_created(&mut self, ctrl: &str, nsid: u32) {
        let Some(c) = self.ctrls.get_mut(ctrl).filter(|c| !c.freed) else {
            self.model.violate(Rule::UseAfterFree, format!("node {ctrl}/{nsid} created for a controller not attached"));
            return;
        };
        let (unit, softc) = (c.unit, c.softc);
        let Ok(node) = Kernel::make_node(&mut self.model, &NodeName::namespace(unit, nsid), softc) else {
            // EEXIST with CHECKNAME: the harness created it twice. Not a panic, but a bug.
            self.model.violate(Rule::DuplicateName, format!("node {ctrl}/{nsid} created twice (EEXIST)"));
            return;
        };
        let ctx = Model::malloc(&mut self.model, M_NVMEHP, DISK_CTX_SIZE, true);
        let d = Model::disk_create(&mut self.model, unit * 1000 + nsid, ctx);
        if let Some(c) = self.ctrls.get_mut(ctrl) {
            c.ns.insert(nsid, Ns { node, disk: Some(d), disk_ref: d, ctx });
        }
    }

    /// A request entered the driver through a namespace node.
    pub fn io_started(&mut self, ctrl: &str, nsid: u32, tag: u64) {
        let Some(node) = self.ctrls.get(ctrl).and_then(|c| c.ns.get(&nsid)).map(|n| n.node) else {
            // dev_refthread would have returned ENXIO: the request never reaches the driver.
            return;
        };
        let t = self.model.spawn_thread(ThreadKind::Kernel);
        let io = self.model.new_io();
        if self.model.on_thread(t, |m| m.enter_method(node, Some(io))).is_ok() {
            self.io.insert((ctrl.to_string(), nsid, tag), (t, io, node));
        }
    }

    /// The request completed: its completion runs on the softc, its thread leaves.
    pub fn io_finished(&mut self, ctrl: &str, nsid: u32, tag: u64, _ok: bool) {
        if let Some(c) = self.ctrls.get(ctrl) {
            let softc = c.softc;
            // The completion path reads the controller's state.
            let _ = self.model.read_u32(softc, 0);
        }
        if let Some((t, io, node)) = self.io.remove(&(ctrl.to_string(), nsid, tag)) {
            self.model.complete_io(io);
            self.model.on_thread(t, |m| m.leave_method(node));
        }
    }

    /// A consumer opened the namespace's disk (a mount). Refused (nothing recorded) on a disk
    /// that is gone, as GEOM refuses opens of a withered provider.
    pub fn node_opened(&mut self, ctrl: &str, nsid: u32) {
        let Some(ns) = self.ctrls.get(ctrl).filter(|c| !c.freed).and_then(|c| c.ns.get(&nsid)) else {
            return;
        };
        let (d, ctx) = (ns.disk_ref, ns.ctx);
        if Model::disk_open(&mut self.model, d) {
            self.opens.entry((ctrl.to_string(), nsid)).or_default().push((d, ctx));
        }
    }

    /// The consumer closed it. After a removal, the last close lets d_gone run, which frees
    /// the disk context; that is checked here.
    pub fn node_closed(&mut self, ctrl: &str, nsid: u32) {
        let key = (ctrl.to_string(), nsid);
        let Some((d, ctx)) = self.opens.get_mut(&key).and_then(|v| v.pop()) else {
            return;
        };
        if self.opens.get(&key).is_some_and(|v| v.is_empty()) {
            self.opens.remove(&key);
        }
        Model::disk_close(&mut self.model, d);
        self.model.run_geom_events();
        let freed = self.ctrls.get(ctrl).is_some_and(|c| c.freed);
        if freed && !self.opens.values().flatten().any(|(_, m)| *m == ctx) && !self.model.is_freed(ctx) {
            self.model.violate(Rule::Leak, format!("{ctrl}/{nsid}: disk context not freed after the last close"));
        }
    }

    /// Detach began: the disks are withered.
    pub fn detach_started(&mut self, ctrl: &str, _surprise: bool, _outstanding: usize) {
        let disks: Vec<DiskRef> = match self.ctrls.get_mut(ctrl) {
            Some(c) => c.ns.values_mut().filter_map(|n| n.disk.take()).collect(),
            None => return,
        };
        for d in disks {
            Model::disk_gone(&mut self.model, d);
        }
    }

    /// A namespace node was destroyed.
    pub fn node_destroyed(&mut self, ctrl: &str, nsid: u32) {
        let Some(ns) = self.ctrls.get_mut(ctrl).and_then(|c| c.ns.remove(&nsid)) else {
            self.model.violate(Rule::DoubleDestroy, format!("node {ctrl}/{nsid} destroyed but never created"));
            return;
        };
        if let Some(d) = ns.disk {
            // Destroyed without a detach (namespace removal): wither the disk now.
            Model::disk_gone(&mut self.model, d);
        }
        self.model.destroy_dev(ns.node);
        // Keep the disk context: d_gone frees it.
        let _ = ns.ctx;
    }

    /// The controller's memory was freed.
    pub fn controller_freed(&mut self, ctrl: &str) {
        let Some(c) = self.ctrls.get_mut(ctrl) else { return };
        if c.freed {
            self.model.violate(Rule::DoubleFree, format!("controller {ctrl} freed twice"));
            return;
        }
        c.freed = true;
        let (unit, softc, node) = (c.unit, c.softc, c.node.take());
        let ctxs: Vec<MemRef> = c.ns.values().map(|n| n.ctx).collect();
        // Contexts of disks a consumer still holds open are freed by d_gone after the last
        // close (checked in node_closed), not now.
        let held: Vec<MemRef> = self.opens.iter().filter(|((c, _), _)| c == ctrl).flat_map(|(_, v)| v.iter().map(|(_, m)| *m)).collect();
        if let Some(n) = node {
            self.model.destroy_dev(n);
        }
        // Any namespace node still present becomes an orphan here (OrphanNode in free).
        Model::free(&mut self.model, softc);
        self.model.check_detached(unit);
        self.model.run_geom_events();
        for m in ctxs.into_iter().filter(|m| !held.contains(m)) {
            if !self.model.is_freed(m) {
                self.model.violate(Rule::Leak, format!("controller {ctrl}: disk context {m:?} never freed"));
            }
        }
    }

    /// Namespace nodes alive (what the lab's `nodes` expectation counts).
    pub fn nodes_alive(&self) -> usize {
        self.model.live_nodes().iter().filter(|n| n.starts_with(crate::node_prefix()) && n.contains("ns")).count()
    }

    /// Violations as text lines (`Rule: detail [FreeBSD source]`).
    pub fn violations(&self) -> Vec<String> {
        self.model.violations().iter().map(|v| v.to_string()).collect()
    }

    /// MOD_UNLOAD returned (the end of a lab run): records what would outlive the module's
    /// text (nodes, pending d_gone, armed callbacks) and the malloc_uninit leak warning.
    pub fn module_unloaded(&mut self) -> Report {
        self.model.module_unloaded()
    }

    /// nodes_left / violations / leaked_bytes of the model.
    pub fn report(&self) -> Report {
        self.model.report()
    }
}
