//! Hotplug with the engine: a hot-add + announced-removal cycle, and a surprise removal with
//! I/O in flight where every request must complete exactly once, with an error if the device
//! never finished it, and none may hang.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use nvme_hotplug::nvme::{Controller, Event, Health, IoOp, NvmeError};
use nvmehp_lab::acpi_hotplug::NotifyCode;
use nvmehp_lab::driver::lab_config;
use nvmehp_lab::machine::Machine;
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::skip::qemu_or_skip;

#[test]
fn hot_add_then_announced_removal_cycle() {
    if !qemu_or_skip("hot_add_then_announced_removal_cycle") {
        return;
    }
    let mut m = Machine::start(MachineKind::Pc, &[]).unwrap();
    assert!(m.scan().unwrap().is_empty());
    for cycle in 0..3u8 {
        m.hot_add(&spec("c1", 6, &[(1, 4, 512)])).unwrap();
        expect_notify(&mut m, 6, NotifyCode::DeviceCheck);
        let f = m.probe(6).unwrap().expect("function after device check");
        let mut c = Controller::new(m.platform(&f), lab_config());
        c.bring_up().unwrap();
        let (buf, data) = pattern_buf(&c, 4096, cycle);
        io(&mut c, IoOp::Write, 1, 8, &buf).unwrap();
        assert_eq!(read_image(&image(&m, 6, 1), 8 * 512, 4096), data);

        m.request_unplug(6).unwrap();
        expect_notify(&mut m, 6, NotifyCode::EjectRequest);
        // Still fully alive until the driver lets go and calls _EJ0.
        io(&mut c, IoOp::Read, 1, 8, &buf).unwrap();
        c.shutdown().unwrap();
        drop(buf);
        drop(c);
        assert_eq!(m.guest().live_dma_bytes(), 0, "cycle {cycle}: all DMA memory returned");
        m.eject(6).unwrap();
        assert!(!m.slot_present(6).unwrap());
        assert_eq!(m.reap(Duration::from_secs(5)).unwrap(), 0, "DEVICE_DELETED + blockdev-del");
    }
}

#[test]
fn surprise_removal_with_io_in_flight_completes_everything_once() {
    if !qemu_or_skip("surprise_removal_with_io_in_flight_completes_everything_once") {
        return;
    }
    let (mut m, mut ctrls) = boot(&[spec("c0", 4, &[(1, 16, 512)])]);
    let mut c = ctrls.remove(0);
    let n = 48u64;
    let mut bufs = Vec::new();
    for tag in 0..n {
        let (buf, data) = pattern_buf(&c, 16384, tag as u8);
        c.submit(req(IoOp::Write, 1, tag * 64, 32, &buf, tag)).expect("accepted");
        bufs.push((buf, data));
    }
    assert_eq!(c.outstanding(), n as usize);

    m.eject(4).unwrap(); // no device_del: nothing is announced
    assert!(m.poll_notifies().unwrap().is_empty());

    let mut results: BTreeMap<u64, Vec<Result<(), NvmeError>>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lost = false;
    while c.outstanding() > 0 && Instant::now() < deadline {
        c.poll(&mut |e| match e {
            Event::Io(done) => results.entry(done.tag).or_default().push(done.result),
            Event::ControllerLost { .. } => lost = true,
            _ => {}
        });
        if c.outstanding() > 0 && c.check_health() == Health::Gone {
            c.fail_all(NvmeError::Gone, &mut |done| results.entry(done.tag).or_default().push(done.result));
            lost = true;
        }
    }
    assert!(lost || c.outstanding() == 0);
    assert_eq!(c.outstanding(), 0, "no request hung");
    assert_eq!(results.len() as u64, n, "every request completed");
    for (tag, r) in &results {
        assert_eq!(r.len(), 1, "tag {tag} completed exactly once: {r:?}");
    }
    let failed = results.values().filter(|r| r[0].is_err()).count();
    for r in results.values() {
        if let Err(e) = r[0] {
            assert_eq!(e, NvmeError::Gone, "failed with Gone");
        }
    }
    // Writes reported complete must be in the image.
    let img = image_of_removed(&m);
    for (tag, r) in &results {
        if r[0].is_ok() {
            let (_, data) = &bufs[*tag as usize];
            assert_eq!(&read_image(&img, tag * 64 * 512, 16384), data, "acked write {tag} on media");
        }
    }
    eprintln!("surprise removal: {failed} of {n} failed with Gone, {} acked", n as usize - failed);
    // However many requests the device finished before it vanished, the health check must now
    // see that it is gone (QEMU answers zeros, config space all-ones), and once the driver
    // fails the controller no new request is accepted.
    assert_eq!(c.check_health(), Health::Gone);
    let mut late = 0;
    c.fail_all(NvmeError::Gone, &mut |_| late += 1);
    assert_eq!(late, 0, "nothing left to fail");
    assert_eq!(c.submit(req(IoOp::Read, 1, 0, 32, &bufs[0].0, 999)), Err(NvmeError::Gone));
    c.shutdown().unwrap();
    drop(c);
    drop(bufs);
    assert_eq!(m.guest().live_dma_bytes(), 0);
}

fn image_of_removed(m: &Machine) -> std::path::PathBuf {
    m.retiring()
        .iter()
        .find(|d| d.slot == 4)
        .map(|d| d.images[0].path.clone())
        .expect("the ejected device is retiring")
}
