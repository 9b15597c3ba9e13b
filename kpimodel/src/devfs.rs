//! devfs: make_dev_s(9), make_dev_alias_p(9), destroy_dev(9), destroy_dev_sched(9),
//! destroy_dev_drain(9), and the thread counting of dev_refthread (sys/kern/kern_conf.c).

use crate::model::{IoRef, MemRef, Model, Node, NodeRef};
use crate::rules::Rule;
use nvme_hotplug::hotplug::errno::Errno;

/// make_dev flags (sys/sys/conf.h).
pub mod flags {
    /// MAKEDEV_REF.
    pub const REF: u32 = 0x01;
    /// MAKEDEV_WHTOUT.
    pub const WHTOUT: u32 = 0x02;
    /// MAKEDEV_NOWAIT.
    pub const NOWAIT: u32 = 0x04;
    /// MAKEDEV_WAITOK.
    pub const WAITOK: u32 = 0x08;
    /// MAKEDEV_ETERNAL.
    pub const ETERNAL: u32 = 0x10;
    /// MAKEDEV_CHECKNAME.
    pub const CHECKNAME: u32 = 0x20;
}

/// SPECNAMELEN (sys/sys/param.h).
const SPECNAMELEN: usize = 255;

/// The fields of `struct make_dev_args` the model looks at.
#[derive(Debug, Clone, Copy)]
pub struct MakeDevArgs<'a> {
    /// Node name (what the format expands to).
    pub name: &'a str,
    /// `mda_flags`.
    pub flags: u32,
    /// `mda_si_drv1`.
    pub drv1: Option<MemRef>,
}

impl Model {
    fn name_taken(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.named && n.name == name)
    }

    fn check_name(&mut self, name: &str, flags: u32) -> Result<(), Errno> {
        let bad = if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == "." || c == "..") {
            Some(Errno::EINVAL)
        } else if name.len() > SPECNAMELEN {
            Some(Errno::ENAMETOOLONG)
        } else if self.name_taken(name) {
            Some(Errno::EEXIST)
        } else {
            None
        };
        match bad {
            None => Ok(()),
            Some(e) if flags & flags::CHECKNAME != 0 => Err(e),
            Some(e) => {
                self.violate(Rule::DuplicateName, format!("make_dev(\"{name}\") without MAKEDEV_CHECKNAME: errno {} -> panic", e.0));
                Err(e)
            }
        }
    }

    /// make_dev_s(9).
    pub fn make_dev_s(&mut self, args: MakeDevArgs<'_>) -> Result<NodeRef, Errno> {
        if args.flags & flags::WAITOK != 0 && args.flags & flags::NOWAIT != 0 {
            self.violate(Rule::BadMakeDevFlags, format!("make_dev_s(\"{}\") with WAITOK|NOWAIT", args.name));
            return Err(Errno::EINVAL);
        }
        if args.flags & flags::NOWAIT == 0 {
            self.might_sleep("make_dev_s(MAKEDEV_WAITOK)");
        }
        self.check_name(args.name, args.flags)?;
        if let Some(m) = args.drv1 {
            if self.is_freed(m) {
                self.violate(Rule::UseAfterFree, format!("make_dev_s(\"{}\") with freed si_drv1", args.name));
            }
        }
        self.nodes.push(Node {
            name: args.name.to_string(),
            flags: args.flags,
            drv1: args.drv1,
            parent: None,
            named: true,
            destroyed: false,
            sched: false,
            threads: Vec::new(),
            opens: 0,
        });
        Ok(NodeRef(self.nodes.len() - 1))
    }

    /// make_dev_alias_p(9): a child of `parent` (dev_depends), destroyed with it.
    pub fn make_dev_alias(&mut self, parent: NodeRef, name: &str, flags: u32) -> Result<NodeRef, Errno> {
        if flags & !(flags::WAITOK | flags::NOWAIT | flags::CHECKNAME) != 0 {
            self.violate(Rule::BadMakeDevFlags, format!("make_dev_alias_p(\"{name}\") flags {flags:#x}"));
            return Err(Errno::EINVAL);
        }
        if flags & flags::NOWAIT == 0 {
            self.might_sleep("make_dev_alias_p(MAKEDEV_WAITOK)");
        }
        self.check_name(name, flags)?;
        let drv1 = self.nodes.get(parent.0).and_then(|p| p.drv1);
        self.nodes.push(Node {
            name: name.to_string(),
            flags,
            drv1,
            parent: Some(parent),
            named: true,
            destroyed: false,
            sched: false,
            threads: Vec::new(),
            opens: 0,
        });
        Ok(NodeRef(self.nodes.len() - 1))
    }

    /// destroy_dev(9): sleepable context; waits for the threads inside the methods.
    pub fn destroy_dev(&mut self, node: NodeRef) {
        self.might_sleep("destroy_dev");
        let me = self.current;
        let Some(n) = self.nodes.get(node.0) else { return };
        if n.destroyed {
            self.violate(Rule::DoubleDestroy, format!("destroy_dev(\"{}\") twice", n.name));
            return;
        }
        if n.threads.iter().any(|(t, _)| *t == me) {
            let name = n.name.clone();
            self.violate(Rule::DestroyFromOwnMethod, format!("destroy_dev(\"{name}\") from inside its own method"));
            return;
        }
        self.destroy_devl(node);
    }

    /// The common part of destroy_dev and the deferred destroy.
    fn destroy_devl(&mut self, node: NodeRef) {
        let n = &self.nodes[node.0];
        let name = n.name.clone();
        if n.flags & flags::ETERNAL != 0 {
            self.violate(Rule::DestroyEternal, format!("destroy_dev(\"{name}\") on a MAKEDEV_ETERNAL node"));
        }
        // Children first (aliases made with make_dev_alias depend on their parent).
        let children: Vec<NodeRef> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].parent == Some(node) && !self.nodes[i].destroyed)
            .map(NodeRef)
            .collect();
        for c in children {
            self.destroy_devl(c);
        }
        let stuck: Vec<IoRef> = self.nodes[node.0]
            .threads
            .iter()
            .filter_map(|(_, io)| *io)
            .filter(|io| !self.ios.is_done(*io))
            .collect();
        if !stuck.is_empty() {
            self.violate(
                Rule::DestroyWaitsForever,
                format!("destroy_dev(\"{name}\"): {} thread(s) sleep on I/O never completed", stuck.len()),
            );
        }
        let n = &mut self.nodes[node.0];
        // The counted threads have drained (or, above, never would).
        n.threads.clear();
        n.named = false;
        n.destroyed = true;
        n.drv1 = None;
    }

    /// destroy_dev_sched(9): allowed from a node's own methods; the destroy runs later.
    pub fn destroy_dev_sched(&mut self, node: NodeRef) {
        let Some(n) = self.nodes.get_mut(node.0) else { return };
        if n.destroyed || n.sched {
            let name = n.name.clone();
            self.violate(Rule::DoubleDestroy, format!("destroy_dev_sched(\"{name}\") on a destroyed node"));
            return;
        }
        n.sched = true;
    }

    /// destroy_dev_drain(9): runs every scheduled destroy, as taskqueue_swi_giant would,
    /// after the threads that scheduled them have left their methods.
    pub fn destroy_dev_drain(&mut self) {
        self.might_sleep("destroy_dev_drain");
        let pending: Vec<NodeRef> =
            (0..self.nodes.len()).filter(|&i| self.nodes[i].sched && !self.nodes[i].destroyed).map(NodeRef).collect();
        for node in pending {
            self.destroy_devl(node);
        }
    }

    /// A thread enters a method of the node (dev_refthread). ENXIO once the node is being
    /// destroyed. `waits_on`: the I/O the thread will sleep on inside the method.
    /// Eternal nodes are not counted, as in dev_refthread.
    pub fn enter_method(&mut self, node: NodeRef, waits_on: Option<IoRef>) -> Result<(), Errno> {
        let me = self.current;
        let n = self.nodes.get_mut(node.0).ok_or(Errno::ENXIO)?;
        if n.destroyed || n.sched {
            return Err(Errno::ENXIO);
        }
        if n.flags & flags::ETERNAL == 0 {
            n.threads.push((me, waits_on));
        }
        Ok(())
    }

    /// The current thread leaves a method (dev_relthread).
    pub fn leave_method(&mut self, node: NodeRef) {
        let me = self.current;
        if let Some(n) = self.nodes.get_mut(node.0) {
            if let Some(pos) = n.threads.iter().position(|(t, _)| *t == me) {
                n.threads.remove(pos);
            }
        }
    }

    /// open(2) on the node: d_open runs and returns; the node stays open.
    pub fn open(&mut self, node: NodeRef) -> Result<(), Errno> {
        self.enter_method(node, None)?;
        self.leave_method(node);
        self.nodes[node.0].opens += 1;
        Ok(())
    }

    /// The last close(2): d_close runs on the current thread. `in_close` runs inside it
    /// (where a wrong driver calls destroy_dev).
    pub fn close(&mut self, node: NodeRef, in_close: impl FnOnce(&mut Model)) {
        if let Some(n) = self.nodes.get_mut(node.0) {
            n.opens = n.opens.saturating_sub(1);
        }
        let entered = self.enter_method(node, None).is_ok();
        in_close(self);
        if entered {
            self.leave_method(node);
        }
    }

    /// si_drv1 as a driver method reads it. Reading it through a destroyed node is a bug:
    /// destroy_devl zeroed it.
    pub fn si_drv1(&mut self, node: NodeRef) -> Option<MemRef> {
        let n = self.nodes.get(node.0)?;
        if n.destroyed {
            let name = n.name.clone();
            self.violate(Rule::DrvThroughDestroyedNode, format!("si_drv1 of destroyed \"{name}\""));
            return None;
        }
        n.drv1
    }

    /// The node is open or a thread is inside it.
    pub fn node_busy(&self, node: NodeRef) -> bool {
        self.nodes.get(node.0).is_some_and(|n| !n.destroyed && (n.opens > 0 || !n.threads.is_empty()))
    }

    /// The published node called `name`.
    pub fn find_node(&self, name: &str) -> Option<NodeRef> {
        self.nodes.iter().position(|n| n.named && n.name == name).map(NodeRef)
    }

    /// The node was destroyed.
    pub fn node_destroyed(&self, node: NodeRef) -> bool {
        self.nodes.get(node.0).is_none_or(|n| n.destroyed)
    }

    /// Names of every node still published.
    pub fn live_nodes(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.named).map(|n| n.name.clone()).collect()
    }

    /// After detach of controller `unit`: records a violation per node of that controller
    /// still published (`nvmehp<U>`, `nvmehp<U>ns<N>` and anything else starting with
    /// `nvmehp<U>`, e.g. aliases). Returns how many were left.
    pub fn check_detached(&mut self, unit: u32) -> usize {
        let ctrl = format!("nvmehp{unit}");
        let left: Vec<String> = self
            .live_nodes()
            .into_iter()
            .filter(|n| *n == ctrl || n.strip_prefix(&ctrl).is_some_and(|rest| rest.starts_with("ns") || rest.starts_with('n')))
            .collect();
        for name in &left {
            self.violate(Rule::NodeLeftAfterDetach, format!("/dev/{name} left after detach of unit {unit}"));
        }
        left.len()
    }
}
