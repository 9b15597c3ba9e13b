//! The model as an implementation of nvme_hotplug's [`Kernel`] and [`AcpiNotify`] traits:
//! exactly the calls the FreeBSD glue makes, so the real teardown code runs against it.

use crate::devfs::{flags, MakeDevArgs};
use crate::memory::M_NVMEHP;
use crate::model::{CbRef, DiskRef, MemRef, Model, NodeRef, TqRef};
use nvme_hotplug::hotplug::errno::Errno;
use nvme_hotplug::hotplug::kernel::{AcpiNotify, Kernel};
use nvme_hotplug::hotplug::node_name::NodeName;

impl Kernel for Model {
    type Node = NodeRef;
    type Disk = DiskRef;
    type Mem = MemRef;
    type Intr = CbRef;
    type Timer = CbRef;
    type TaskQueue = TqRef;

    fn malloc(&mut self, size: usize) -> Result<MemRef, Errno> {
        Ok(Model::malloc(self, M_NVMEHP, size, true))
    }
    fn free(&mut self, mem: MemRef) {
        Model::free(self, mem)
    }
    fn make_node(&mut self, name: &NodeName, drv1: MemRef) -> Result<NodeRef, Errno> {
        // The same flags the FreeBSD glue passes (and asserts): never MAKEDEV_ETERNAL.
        self.make_dev_s(MakeDevArgs { name: name.as_str(), flags: flags::CHECKNAME | flags::WAITOK, drv1: Some(drv1) })
    }
    fn destroy_node(&mut self, node: NodeRef) {
        self.destroy_dev(node)
    }
    fn destroy_node_sched(&mut self, node: NodeRef) {
        self.destroy_dev_sched(node)
    }
    fn drain_sched_destroys(&mut self) {
        self.destroy_dev_drain()
    }
    fn node_in_use(&self, node: &NodeRef) -> bool {
        self.node_busy(*node)
    }
    fn disk_create(&mut self, unit: u32, ctx: MemRef) -> Result<DiskRef, Errno> {
        Ok(Model::disk_create(self, unit, ctx))
    }
    fn disk_gone(&mut self, disk: DiskRef) {
        Model::disk_gone(self, disk)
    }
    fn disk_ctx(&self, disk: &DiskRef) -> MemRef {
        self.disks[disk.0].ctx
    }
    fn disk_destroy(&mut self, disk: DiskRef) {
        Model::disk_destroy(self, disk)
    }
    fn disk_in_use(&self, disk: &DiskRef) -> bool {
        self.disk_busy(*disk)
    }
    fn wait_disks_gone(&mut self) {
        self.wait_all_gone()
    }
    fn teardown_intr(&mut self, intr: CbRef) {
        Model::teardown_intr(self, intr)
    }
    fn callout_drain(&mut self, timer: &mut CbRef) {
        Model::callout_drain(self, *timer)
    }
    fn taskqueue_drain_all(&mut self, tq: &mut TqRef) {
        Model::taskqueue_drain_all(self, *tq)
    }
    fn taskqueue_free(&mut self, tq: TqRef) {
        Model::taskqueue_free(self, tq)
    }
}

impl AcpiNotify for Model {
    fn remove_notify_handlers(&mut self) {
        Model::remove_notify_handlers(self)
    }
}
