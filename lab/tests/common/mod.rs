//! Shared helpers of the lab tests: a QEMU machine with controllers brought up by the engine.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nvme_hotplug::nvme::{Controller, DataBuf, IoOp, IoRequest, NvmeError};
use nvme_hotplug::platform::{DmaAllocator, DmaRegion};
use nvmehp_lab::acpi_hotplug::{Notify, NotifyCode};
use nvmehp_lab::dma::GuestDma;
use nvmehp_lab::driver::lab_config;
use nvmehp_lab::machine::Machine;
use nvmehp_lab::platform::LabPlatform;
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::scenario::{ControllerSpec, NamespaceSpec};

pub type Ctrl = Controller<LabPlatform>;

pub fn spec(id: &str, slot: u8, nss: &[(u32, u32, u32)]) -> ControllerSpec {
    ControllerSpec {
        id: id.into(),
        slot,
        namespaces: nss.iter().map(|&(nsid, size_mib, lba)| NamespaceSpec { nsid, size_mib, lba }).collect(),
    }
}

/// Starts a pc machine with `cold` controllers and brings each up with the engine.
pub fn boot(cold: &[ControllerSpec]) -> (Machine, Vec<Ctrl>) {
    let mut m = Machine::start(MachineKind::Pc, cold).expect("QEMU starts");
    let found = m.scan().expect("bus scan");
    assert_eq!(found.len(), cold.len(), "every cold controller is found: {found:?}");
    let mut ctrls = Vec::new();
    for (_, f) in found {
        let mut c = Controller::new(m.platform(&f), lab_config());
        c.bring_up().expect("bring-up");
        ctrls.push(c);
    }
    (m, ctrls)
}

/// Image path of namespace `nsid` of the controller in `slot`.
pub fn image(m: &Machine, slot: u8, nsid: u32) -> PathBuf {
    m.plugged(slot).unwrap().images.iter().find(|i| i.nsid == nsid).unwrap().path.clone()
}

/// Polls ACPI until a notification arrives (bounded).
pub fn wait_notify(m: &mut Machine) -> Vec<Notify> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let n = m.poll_notifies().unwrap();
        if !n.is_empty() {
            return n;
        }
    }
    Vec::new()
}

pub fn expect_notify(m: &mut Machine, slot: u8, code: NotifyCode) {
    assert_eq!(wait_notify(m), vec![Notify { slot, code }]);
}

/// A DMA buffer of `len` bytes filled with a pattern derived from `seed`.
pub fn pattern_buf(c: &Ctrl, len: usize, seed: u8) -> (GuestDma, Vec<u8>) {
    let buf = c.platform().alloc_dma(len, 4096).expect("DMA memory");
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect();
    buf.write(0, &data);
    (buf, data)
}

pub fn req(op: IoOp, nsid: u32, lba: u64, blocks: u32, buf: &GuestDma, tag: u64) -> IoRequest {
    IoRequest { tag, nsid, op, lba, blocks, data: DataBuf { bus_addr: buf.bus_addr(), len: buf.len() } }
}

pub fn io(c: &mut Ctrl, op: IoOp, nsid: u32, lba: u64, buf: &GuestDma) -> Result<(), NvmeError> {
    let lb = c.namespaces().iter().find(|n| n.nsid == nsid).map(|n| n.lba_bytes).unwrap_or(512) as usize;
    c.io_sync(req(op, nsid, lba, (buf.len() / lb) as u32, buf, 1))
}

/// Reads `len` bytes at byte offset `off` of a raw image, straight from the host file.
pub fn read_image(path: &PathBuf, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(path).unwrap().read_exact_at(&mut v, off).unwrap();
    v
}
