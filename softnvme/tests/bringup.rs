//! Bring-up and identify against a well-behaved software controller.

mod common;

use nvme_hotplug::nvme::{Config, Controller, NvmeError};
use softnvme::{SoftConfig, SoftNvme};

#[test]
fn bring_up_reports_identify_and_namespaces() {
    let cfg = SoftConfig {
        namespaces: vec![(1, 9, 1 << 21), (3, 12, 1000)],
        max_io_queues: 2,
        ..SoftConfig::default()
    };
    let dev = SoftNvme::new(cfg);
    let mut c = Controller::new(
        dev.clone(),
        Config {
            io_queues: 4,
            ..Config::default()
        },
    );
    assert!(c.info().is_none());
    assert_eq!(dev.register_accesses(), 0, "new() must not touch registers");
    c.bring_up().unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.vid, 0x1b36);
    assert_eq!(info.serial, "SOFT0001");
    assert_eq!(info.model, "softnvme in-process controller");
    assert_eq!(info.mdts_bytes, 128 * 1024);
    assert_eq!(info.nn, 16);
    assert_eq!(
        info.io_queues, 2,
        "granted queues are capped by the controller"
    );
    assert_eq!((info.version.major, info.version.minor), (1, 4));
    let ns = c.namespaces();
    assert_eq!(ns.len(), 2);
    assert_eq!(
        (ns[0].nsid, ns[0].lba_bytes, ns[0].blocks),
        (1, 512, 1 << 21)
    );
    assert_eq!(
        (ns[1].nsid, ns[1].lba_bytes, ns[1].blocks, ns[1].capacity),
        (3, 4096, 1000, 4096 * 1000)
    );
    assert!(c.is_ready());
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn bring_up_twice_recovers() {
    let (dev, mut c) = common::up(SoftConfig::default());
    let before = dev.dma_bytes();
    c.bring_up().unwrap();
    assert!(c.is_ready());
    assert_eq!(
        dev.dma_bytes(),
        before,
        "a second bring-up must not leak DMA memory"
    );
}

#[test]
fn shutdown_is_clean_and_frees_memory() {
    let (dev, mut c) = common::up(SoftConfig::default());
    c.shutdown().unwrap();
    assert_eq!(dev.stats().shutdowns, 1);
    assert_eq!(
        dev.dma_bytes(),
        0,
        "after shutdown every DMA region is freed"
    );
    assert_eq!(
        c.submit(common::req(
            1,
            nvme_hotplug::nvme::IoOp::Flush,
            1,
            0,
            0,
            &dev.buffer(4096),
            512
        )),
        Err(NvmeError::NotReady)
    );
}

#[test]
fn pre_1_1_controller_without_active_list() {
    let cfg = SoftConfig {
        active_list: false,
        nn: 4,
        namespaces: vec![(2, 9, 100)],
        ..SoftConfig::default()
    };
    let (_dev, c) = common::up(cfg);
    assert_eq!(
        c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>(),
        vec![2]
    );
}

#[test]
fn drop_disables_and_frees() {
    let (dev, c) = common::up(SoftConfig::default());
    drop(c);
    assert_eq!(dev.dma_bytes(), 0);
    assert_eq!(
        nvme_hotplug::platform::RegisterIo::read32(&dev, 0x1c) & 1,
        0
    );
}

#[test]
fn zero_config_values_are_sanitized() {
    let dev = SoftNvme::new(SoftConfig::default());
    let cfg = Config {
        admin_entries: 0,
        io_entries: 0,
        io_queues: 0,
        cmd_timeout_us: 0,
        max_namespaces: 1,
    };
    let mut c = Controller::new(dev.clone(), cfg);
    c.bring_up().unwrap();
    assert_eq!(
        c.config().cmd_timeout_us,
        nvme_hotplug::nvme::MIN_CMD_TIMEOUT_US
    );
    assert_eq!(c.info().unwrap().io_queues, 1);
    assert_eq!(c.info().unwrap().io_entries, 2);
    let b = dev.buffer(512);
    c.io_sync(common::req(
        1,
        nvme_hotplug::nvme::IoOp::Write,
        1,
        0,
        1,
        &b,
        512,
    ))
    .unwrap();
}

/// A bring-up of a controller with a request in flight fails that request into the event
/// ring first; the bring-up's own new ring must carry it over, so the next poll reports it
/// (a completion lost there is a bio never completed).
#[test]
fn bring_up_with_a_request_in_flight_reports_it_once() {
    let (dev, mut c) = common::up(SoftConfig::default());
    let buf = dev.buffer(4096);
    c.submit(common::req(7, nvme_hotplug::nvme::IoOp::Flush, 1, 0, 0, &buf, 512)).unwrap();
    c.bring_up().unwrap();
    let (io, _) = common::poll_all(&mut c);
    assert_eq!(io.iter().filter(|x| x.tag == 7).count(), 1, "{io:?}");
    assert_eq!(c.stats().events_dropped, 0);
}
