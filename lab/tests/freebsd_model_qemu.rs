//! The real thing, minus the kernel: QEMU's PIIX4 ACPI hotplug and NVMe models (through the
//! lab), the NVMe engine, the hotplug state machine and the typestate teardown, with the
//! FreeBSD model as the kernel. Notifies come from QEMU's GPE, `_EJ0` is QEMU's eject register,
//! presence is QEMU's config space. Without QEMU the tests print the lab's loud SKIP line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kpimodel::controller::SOFTC_SIZE;
use kpimodel::memory::M_NVMEHP;
use kpimodel::Model;
use nvme_hotplug::hotplug::fallback::FallbackRescan;
use nvme_hotplug::hotplug::kernel::IoGate;
use nvme_hotplug::hotplug::machine::{Hotplug, HotplugConfig, RunReport};
use nvme_hotplug::hotplug::mode::Role;
use nvme_hotplug::hotplug::ost::OstStatus;
use nvme_hotplug::hotplug::slot_ops::{DetachError, DetachReason, OpFailed, SlotIndex, SlotOps};
use nvme_hotplug::hotplug::teardown::{teardown, Freed, Live, Removal};
use nvme_hotplug::nvme::{Controller, DataBuf, IoOp, IoRequest, NvmeError};
use nvme_hotplug::platform::{DmaAllocator, DmaRegion};
use nvmehp_lab::driver::lab_config;
use nvmehp_lab::machine::Machine;
use nvmehp_lab::platform::LabPlatform;
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::scenario::{ControllerSpec, NamespaceSpec};
use nvmehp_lab::skip::qemu_or_skip;

/// The engine as teardown sees it.
struct EngineIo {
    ctrl: Controller<LabPlatform>,
    gone: bool,
}

impl IoGate for EngineIo {
    fn mark_gone(&mut self) {
        self.gone = true;
    }
    fn quiesce(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ctrl.outstanding() > 0 && Instant::now() < deadline {
            self.ctrl.poll(&mut |_| {});
        }
    }
    fn fail_all(&mut self) -> usize {
        let mut n = 0;
        self.ctrl.fail_all(NvmeError::Gone, &mut |_| n += 1);
        n
    }
    fn fail_namespace(&mut self, _nsid: u32) -> usize {
        0
    }
}

/// The glue: newbus + ACPI over the QEMU lab machine.
struct Qemu {
    m: Machine,
    model: Model,
    slots: Vec<u8>,
    ctrls: BTreeMap<SlotIndex, Live<Model, EngineIo>>,
    osts: Vec<(SlotIndex, u32, OstStatus)>,
    freed: Vec<Freed>,
    attaches: usize,
}

impl Qemu {
    fn new(cold: &[ControllerSpec], slots: &[u8]) -> Self {
        let m = Machine::start(MachineKind::Pc, cold).expect("QEMU starts");
        Qemu { m, model: Model::new(), slots: slots.to_vec(), ctrls: BTreeMap::new(), osts: Vec::new(), freed: Vec::new(), attaches: 0 }
    }

    /// Feeds every notify QEMU raised into the state machine (bounded wait for the first one),
    /// then runs the task. Returns how many notifies arrived.
    fn pump(&mut self, hp: &mut Hotplug) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut n = 0;
        while n == 0 && Instant::now() < deadline {
            for x in self.m.poll_notifies().expect("poll notifies") {
                if let Some(i) = self.slots.iter().position(|&s| s == x.slot) {
                    hp.notify(i, x.code as u32);
                    n += 1;
                }
            }
        }
        self.settle(hp);
        n
    }

    fn settle(&mut self, hp: &mut Hotplug) -> RunReport {
        let mut total = RunReport::default();
        for _ in 0..100 {
            let r = hp.run_pending(self);
            total.rescans += r.rescans;
            total.detaches += r.detaches;
            total.swept += r.swept;
            total.ejects += r.ejects;
            total.refused += r.refused;
            if r.rerun_after_us.is_none() && !hp.pending_mut().is_queued() {
                return total;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("hotplug task never settled");
    }

    fn last_ost(&self, slot: SlotIndex) -> Option<OstStatus> {
        self.osts.iter().rev().find(|(s, src, _)| *s == slot && *src == 3).map(|x| x.2)
    }
}

impl SlotOps for Qemu {
    fn present(&mut self, slot: SlotIndex) -> bool {
        self.m.slot_present(self.slots[slot]).unwrap_or(false)
    }
    fn sta(&mut self, _slot: SlotIndex) -> Option<u32> {
        None // QEMU's PIIX4 slots have no _STA
    }
    fn has_child(&mut self, slot: SlotIndex) -> bool {
        self.ctrls.contains_key(&slot)
    }
    fn rescan_slot(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        let f = self.m.probe(self.slots[slot]).map_err(|_| OpFailed)?.ok_or(OpFailed)?;
        let mut ctrl = Controller::new(self.m.platform(&f), lab_config());
        ctrl.bring_up().map_err(|_| OpFailed)?;
        let nsids: Vec<u32> = ctrl.namespaces().iter().map(|n| n.nsid).collect();
        let unit = self.model.next_unit();
        let softc = self.model.malloc(M_NVMEHP, SOFTC_SIZE, true);
        let intr = self.model.setup_intr(softc);
        let timer = self.model.callout_reset(softc);
        let tq = self.model.taskqueue_create("nvmehp taskq");
        let mut live = Live::new(unit, EngineIo { ctrl, gone: false }, softc, Some(intr), Some(timer), Some(tq));
        let made = live.create_controller_node(&mut self.model).is_ok()
            && nsids.iter().all(|&ns| live.add_namespace(&mut self.model, ns, unit * 1000 + ns).is_ok());
        if !made {
            self.freed.push(teardown(live, &mut self.model, Removal::Announced));
            return Err(OpFailed);
        }
        self.ctrls.insert(slot, live);
        self.attaches += 1;
        Ok(())
    }
    fn detach_slot(&mut self, slot: SlotIndex, why: DetachReason) -> Result<(), DetachError> {
        let live = self.ctrls.get(&slot).ok_or(DetachError::NoDevice)?;
        if why == DetachReason::Eject && live.in_use(&self.model) {
            return Err(DetachError::Busy);
        }
        let live = self.ctrls.remove(&slot).ok_or(DetachError::NoDevice)?;
        let unit = live.unit();
        let how = if why == DetachReason::Eject { Removal::Announced } else { Removal::Surprise };
        self.freed.push(teardown(live, &mut self.model, how));
        self.model.check_detached(unit);
        Ok(())
    }
    fn eject(&mut self, slot: SlotIndex) -> Result<(), OpFailed> {
        self.m.eject(self.slots[slot]).map_err(|_| OpFailed)
    }
    fn ost(&mut self, slot: SlotIndex, source: u32, status: OstStatus) {
        self.osts.push((slot, source, status));
    }
    fn rescan_namespaces(&mut self, _slot: SlotIndex) -> Result<(), OpFailed> {
        Ok(())
    }
}

fn spec(id: &str, slot: u8) -> ControllerSpec {
    ControllerSpec { id: id.into(), slot, namespaces: vec![NamespaceSpec { nsid: 1, size_mib: 4, lba: 512 }] }
}

fn write(ctrl: &mut Controller<LabPlatform>, tag: u64, lba: u64) -> (nvmehp_lab::dma::GuestDma, Result<(), NvmeError>) {
    let buf = ctrl.platform().alloc_dma(4096, 4096).expect("DMA memory");
    buf.write(0, &[0xa5; 4096]);
    let req = IoRequest { tag, nsid: 1, op: IoOp::Write, lba, blocks: 8, data: DataBuf { bus_addr: buf.bus_addr(), len: buf.len() } };
    let r = ctrl.io_sync(req);
    (buf, r)
}

#[test]
fn qemu_storm_attach_busy_eject_then_eject() {
    if !qemu_or_skip("qemu_storm_attach_busy_eject_then_eject") {
        return;
    }
    let mut q = Qemu::new(&[], &[6]);
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig::default());

    q.m.hot_add(&spec("ebs", 6)).unwrap();
    for _ in 0..99 {
        hp.notify(0, 1); // a storm on top of QEMU's own device check
    }
    assert!(q.pump(&mut hp) >= 1, "QEMU raised the device check");
    assert_eq!(q.attaches, 1, "100+ device checks, one attach");
    let mut names = q.model.report().nodes_left;
    names.sort();
    assert_eq!(names, ["nvmehp0", "nvmehp0ns1"]);
    let (buf, r) = write(&mut q.ctrls.get_mut(&0).unwrap().io().ctrl, 1, 0);
    r.expect("write on the new controller");
    drop(buf);

    // A process holds /dev/nvmehp0ns1 open: the eject request is refused with _OST busy.
    let node = q.model.find_node("nvmehp0ns1").unwrap();
    q.model.open(node).unwrap();
    q.m.request_unplug(6).unwrap();
    assert!(q.pump(&mut hp) >= 1, "QEMU raised the eject request");
    assert_eq!(q.last_ost(0), Some(OstStatus::DeviceBusy));
    assert!(q.m.slot_present(6).unwrap(), "no _EJ0 while busy");
    let (buf, r) = write(&mut q.ctrls.get_mut(&0).unwrap().io().ctrl, 2, 8);
    r.expect("the controller still works after a refused eject");
    drop(buf);

    // Closed; the platform asks again.
    q.model.close(node, |_| {});
    hp.notify(0, 3);
    q.settle(&mut hp);
    assert_eq!(q.last_ost(0), Some(OstStatus::Success));
    assert!(!q.m.slot_present(6).unwrap(), "_EJ0 removed the function");
    assert!(q.ctrls.is_empty());
    q.model.run_geom_events();
    let rep = q.model.module_unloaded();
    assert!(rep.is_clean(), "{}", rep.to_json());
    assert_eq!(q.m.guest().live_dma_bytes(), 0, "all queue memory returned");
    assert_eq!(q.m.reap(Duration::from_secs(5)).unwrap(), 0, "QEMU deleted the device");
}

#[test]
fn qemu_surprise_removal_with_io_in_flight_is_swept() {
    if !qemu_or_skip("qemu_surprise_removal_with_io_in_flight_is_swept") {
        return;
    }
    let mut q = Qemu::new(&[spec("root", 4)], &[4]);
    let mut hp = Hotplug::new(vec![Role::Owner], HotplugConfig::default());
    let fallback = FallbackRescan::new(1000);

    // Boot: the first quiet check attaches the cold-plugged controller through the same path.
    assert!(fallback.tick(hp.pending_mut()));
    q.settle(&mut hp);
    assert_eq!(q.attaches, 1);

    // 16 writes in flight, never polled.
    let mut bufs = Vec::new();
    {
        let ctrl = &mut q.ctrls.get_mut(&0).unwrap().io().ctrl;
        for tag in 0..16u64 {
            let buf = ctrl.platform().alloc_dma(4096, 4096).unwrap();
            let req = IoRequest { tag, nsid: 1, op: IoOp::Write, lba: tag * 8, blocks: 8, data: DataBuf { bus_addr: buf.bus_addr(), len: buf.len() } };
            ctrl.submit(req).expect("accepted");
            bufs.push(buf);
        }
    }

    // The function vanishes with no notify (QEMU's eject register, no device_del).
    q.m.eject(4).unwrap();
    assert!(q.m.poll_notifies().unwrap().is_empty());
    assert!(fallback.tick(hp.pending_mut()));
    let r = q.settle(&mut hp);
    assert_eq!(r.swept, 1);
    assert!(q.osts.is_empty(), "a sweep answers nobody");
    let f = q.freed.last().copied().expect("torn down");
    assert!(f.failed_requests <= 16 && f.nodes_destroyed == 2, "{f:?}");
    drop(bufs);
    q.model.run_geom_events();
    let rep = q.model.module_unloaded();
    assert!(rep.is_clean(), "{}", rep.to_json());
    assert_eq!(q.m.guest().live_dma_bytes(), 0);
}
