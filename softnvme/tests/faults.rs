//! A hostile or broken controller: bad registers, bad identify data, bad completion entries,
//! commands that never complete. The engine must answer with errors, never panic or hang,
//! and never report a request done that the device did not complete.

mod common;

use common::{pattern, poll_all, req, up};
use nvme_hotplug::nvme::{Config, Controller, Event, Health, IoOp, NvmeError};
use nvme_hotplug::platform::{DmaRegion, RegisterIo};
use softnvme::{CqeMutation, SoftConfig, SoftNvme};

fn bring_up_err(dev: &SoftNvme) -> NvmeError {
    let mut c = Controller::new(dev.clone(), Config::default());
    let e = c.bring_up().unwrap_err();
    assert!(!c.is_ready());
    assert!(c.info().is_none() && c.namespaces().is_empty());
    drop(c);
    assert_eq!(dev.dma_bytes(), 0, "a failed bring-up frees its DMA memory");
    e
}

#[test]
fn bad_cap_values_are_rejected() {
    for cfg in [
        SoftConfig {
            css: 0,
            ..Default::default()
        },
        SoftConfig {
            mpsmin: 1,
            ..Default::default()
        },
        SoftConfig {
            max_entries: 1,
            ..Default::default()
        },
        SoftConfig {
            dstrd: 15,
            ..Default::default()
        },
    ] {
        let dev = SoftNvme::new(cfg.clone());
        assert!(
            matches!(bring_up_err(&dev), NvmeError::BadDevice(_)),
            "{cfg:?}"
        );
    }
}

#[test]
fn zero_cap_timeout_still_waits_a_little() {
    let dev = SoftNvme::new(SoftConfig {
        to: 0,
        ..Default::default()
    });
    dev.faults(|f| f.never_ready = true);
    assert_eq!(bring_up_err(&dev), NvmeError::Timeout);
    assert!(
        dev.now() >= 500_000,
        "CAP.TO = 0 is treated as 500 ms, waited {} us",
        dev.now()
    );
}

#[test]
fn never_ready_times_out_within_cap_to() {
    let dev = SoftNvme::new(SoftConfig {
        to: 20,
        ..Default::default()
    });
    dev.faults(|f| f.never_ready = true);
    assert_eq!(bring_up_err(&dev), NvmeError::Timeout);
    let t = dev.now();
    assert!(
        (10_000_000..=11_000_000).contains(&t),
        "waited {t} us for CAP.TO = 10 s"
    );
}

/// A controller that never became ready gets no shutdown notification on the way out of the
/// failed bring-up (nothing to flush; a real one would make the stop wait out the shutdown
/// bound, max(CAP.TO, 5 s)), only the disable. Fails without the engine's `rdy_seen` rule.
#[test]
fn never_ready_gets_no_shutdown_notification() {
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| {
        f.never_ready = true;
        f.shutdown_never_completes = true;
    });
    assert_eq!(bring_up_err(&dev), NvmeError::Timeout);
    assert_eq!(dev.stats().shutdowns, 0, "CC.SHN sent to a controller that never became ready");
    let cap_to = u64::from(SoftConfig::default().to.max(1)) * 500_000;
    assert!(dev.now() < cap_to + cap_to / 10, "waited {} us: more than the enable's CAP.TO", dev.now());
}

/// The admin commands of one bring-up share one budget, max(command timeout, 5 s): a
/// controller that answers each after 0.9 s, within a 1 s command timeout, fails the bring-up
/// with a timeout once 5 s are spent instead of taking 0.9 s per command for as long as it
/// likes. The same controller a little faster (5 commands' worth fits) comes up. Fails without
/// the budget (the slow bring-up succeeds after about 7 s).
#[test]
fn admin_commands_of_a_bring_up_share_one_budget() {
    use nvme_hotplug::nvme::controller::BRING_UP_ADMIN_MIN_US;
    let cfg = Config { cmd_timeout_us: 1_000_000, ..Config::default() };
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.admin_latency_us = 900_000);
    let mut c = Controller::new(dev.clone(), cfg);
    assert_eq!(c.bring_up(), Err(NvmeError::Timeout));
    let took = dev.now();
    assert!(took <= BRING_UP_ADMIN_MIN_US + 1_000_000, "bring-up took {took} us");

    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.admin_latency_us = 100_000);
    let mut c = Controller::new(dev.clone(), cfg);
    assert_eq!(c.bring_up(), Ok(()), "a slow controller within the budget comes up");
}

#[test]
fn garbage_identify_controller() {
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.identify_ctrl = Some(vec![0u8; 4096]));
    assert!(matches!(bring_up_err(&dev), NvmeError::BadDevice(_)));
    let dev = SoftNvme::new(SoftConfig::default());
    let mut page = pattern(4096, 9);
    page[512] = 0x22; // SQES cannot hold 64-byte entries
    dev.faults(|f| f.identify_ctrl = Some(page));
    assert!(matches!(bring_up_err(&dev), NvmeError::BadDevice(_)));
}

#[test]
fn garbage_identify_namespace_rejects_only_that_namespace() {
    let dev = SoftNvme::new(SoftConfig {
        namespaces: vec![(1, 9, 100), (2, 9, 100)],
        ..Default::default()
    });
    let mut bad = vec![0u8; 4096];
    bad[0] = 10; // NSZE 10
    bad[8] = 20; // NCAP 20 > NSZE
    dev.faults(|f| {
        f.identify_ns.insert(2, bad);
    });
    let mut c = Controller::new(dev.clone(), Config::default());
    c.bring_up().unwrap();
    assert_eq!(
        c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(c.rejected_namespaces(), &[(2, "NCAP larger than NSZE")]);
    let buf = dev.buffer(512);
    assert!(matches!(
        c.submit(req(1, IoOp::Read, 2, 0, 1, &buf, 512)),
        Err(NvmeError::InvalidRequest(_))
    ));
}

#[test]
fn garbage_active_namespace_list() {
    let mut list = vec![0u8; 4096];
    list[0..4].copy_from_slice(&3u32.to_le_bytes());
    list[4..8].copy_from_slice(&2u32.to_le_bytes()); // descending
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.active_list = Some(list));
    assert!(matches!(bring_up_err(&dev), NvmeError::BadDevice(_)));
    let mut list = vec![0u8; 4096];
    list[0..4].copy_from_slice(&1000u32.to_le_bytes()); // above NN = 16
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.active_list = Some(list));
    assert!(matches!(bring_up_err(&dev), NvmeError::BadDevice(_)));
}

#[test]
fn huge_nn_is_capped_by_config() {
    let dev = SoftNvme::new(SoftConfig {
        nn: u32::MAX,
        active_list: false,
        namespaces: vec![(1, 9, 8), (7, 9, 8)],
        ..Default::default()
    });
    let mut c = Controller::new(
        dev.clone(),
        Config {
            max_namespaces: 4,
            ..Config::default()
        },
    );
    c.bring_up().unwrap();
    // Without an active list the engine probes NSIDs 1..=4 only.
    assert_eq!(
        c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn absurd_queue_grant_is_capped() {
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.grant_queues = Some(u32::MAX));
    let mut c = Controller::new(
        dev.clone(),
        Config {
            io_queues: 2,
            ..Config::default()
        },
    );
    c.bring_up().unwrap();
    assert_eq!(c.info().unwrap().io_queues, 2);
}

fn one_write_with(mutation: CqeMutation) -> (SoftNvme, Controller<SoftNvme>, Vec<Event>) {
    let (dev, mut c) = up(SoftConfig::default());
    let buf = dev.buffer(512);
    buf.write(0, &pattern(512, 5));
    dev.faults(|f| f.cqe_mutations.push_back(mutation));
    c.submit(req(1, IoOp::Write, 1, 3, 1, &buf, 512)).unwrap();
    let mut ev = Vec::new();
    c.poll(&mut |e| ev.push(e));
    (dev, c, ev)
}

#[test]
fn out_of_range_cid_is_reported_and_never_completes_the_request() {
    let (dev, mut c, ev) = one_write_with(CqeMutation {
        cid: Some(0xfff0),
        ..Default::default()
    });
    assert_eq!(
        ev,
        vec![Event::BadCompletion {
            qid: 1,
            what: "CID out of range"
        }]
    );
    assert_eq!(c.stats().bad_completions, 1);
    assert_eq!(
        c.outstanding(),
        1,
        "the request is not completed by a bad entry"
    );
    // The command is overdue eventually: the controller is given up and the request fails.
    dev.advance(31_000_000);
    let (io, other) = poll_all(&mut c);
    assert_eq!(io.len(), 1);
    assert_eq!(io[0].result, Err(NvmeError::Timeout));
    assert!(matches!(
        other[..],
        [Event::ControllerLost {
            reason: NvmeError::Timeout,
            health: Health::Healthy
        }]
    ));
    assert!(c.is_dead());
    // poll runs under the kld's mutex: it only does the fast half. The device is not touched
    // yet, and the engine says its buffers may not be reused until the stop has run.
    assert_eq!(dev.read32(0x1c) & 1, 1, "poll does not wait for a disable");
    assert!(!c.dma_stopped(), "buffers are held while the stop is pending");
    let stop = c.take_stop().expect("the slow half is left for the caller");
    let outcome = stop.run(c.platform());
    assert!(outcome.dma_stopped());
    assert_eq!(c.finish_stop(outcome), Ok(()));
    assert_eq!(dev.read32(0x1c) & 1, 0, "the stop disabled the controller");
    assert!(c.dma_stopped());
}

#[test]
fn duplicate_completion_is_dropped() {
    let (_dev, c, ev) = one_write_with(CqeMutation {
        duplicate: true,
        ..Default::default()
    });
    assert_eq!(ev.len(), 2);
    assert!(matches!(ev[0], Event::Io(x) if x.tag == 1 && x.result.is_ok()));
    assert!(matches!(ev[1], Event::BadCompletion { what, .. } if what.contains("not outstanding")));
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn wrong_sqid_and_sqhd_are_rejected() {
    let (_d, c, ev) = one_write_with(CqeMutation {
        sqid: Some(3),
        ..Default::default()
    });
    assert!(matches!(ev[..], [Event::BadCompletion { .. }]));
    assert_eq!(c.outstanding(), 1);
    let (_d, c, ev) = one_write_with(CqeMutation {
        sqhd: Some(5000),
        ..Default::default()
    });
    assert!(matches!(
        ev[..],
        [Event::BadCompletion {
            what: "SQ head beyond the queue size",
            ..
        }]
    ));
    assert_eq!(c.outstanding(), 1);
    // An in-range head outside the valid window is ignored; the completion itself stands.
    let (_d, c, ev) = one_write_with(CqeMutation {
        sqhd: Some(100),
        ..Default::default()
    });
    assert!(matches!(ev[..], [Event::Io(x)] if x.result.is_ok()));
    assert_eq!(c.ignored_sq_heads(), 1);
}

#[test]
fn injected_error_status_is_typed() {
    let status = nvme_hotplug::nvme::Status::field(2, 0x80, true); // media: write fault
    let (_d, _c, ev) = one_write_with(CqeMutation {
        status: Some(status),
        ..Default::default()
    });
    assert!(matches!(ev[..], [Event::Io(x)] if matches!(x.result,
        Err(NvmeError::Status(s)) if s.code == nvme_hotplug::nvme::StatusCode::WriteFault)));
}

#[test]
fn never_completing_command_times_out_and_io_sync_does_not_hang() {
    let (dev, mut c) = up(SoftConfig::default());
    dev.faults(|f| f.swallow_io = 1);
    let buf = dev.buffer(512);
    let t0 = dev.now();
    assert_eq!(
        c.io_sync(req(1, IoOp::Write, 1, 0, 1, &buf, 512)),
        Err(NvmeError::Timeout)
    );
    let waited = dev.now() - t0;
    assert!(
        (30_000_000..61_000_000).contains(&waited),
        "waited {waited} us"
    );
    assert!(c.is_dead());
    assert_eq!(
        c.submit(req(2, IoOp::Write, 1, 0, 1, &buf, 512)),
        Err(NvmeError::Gone)
    );
    let (_, other) = poll_all(&mut c);
    assert!(other
        .iter()
        .any(|e| matches!(e, Event::ControllerLost { .. })));
    // Recovery: bring it up again.
    c.bring_up().unwrap();
    c.io_sync(req(3, IoOp::Write, 1, 0, 1, &buf, 512)).unwrap();
}

#[test]
fn swallowed_admin_command_fails_bring_up_bounded() {
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| f.swallow_admin = 1);
    assert_eq!(bring_up_err(&dev), NvmeError::Timeout);
}

#[test]
fn bad_admin_completion_during_bring_up() {
    let dev = SoftNvme::new(SoftConfig::default());
    dev.faults(|f| {
        f.cqe_mutations.push_back(CqeMutation {
            admin: true,
            cid: Some(999),
            ..Default::default()
        })
    });
    assert_eq!(bring_up_err(&dev), NvmeError::Timeout);
}

#[test]
fn fatal_status_is_failed_health() {
    let (dev, mut c) = up(SoftConfig::default());
    dev.set_fatal();
    assert!(matches!(c.check_health(), Health::Failed { csts } if csts & 2 != 0));
    let buf = dev.buffer(512);
    c.submit(req(1, IoOp::Write, 1, 0, 1, &buf, 512)).unwrap(); // the device ignores it
    dev.advance(31_000_000);
    let (io, other) = poll_all(&mut c);
    assert_eq!(io[0].result, Err(NvmeError::Timeout));
    assert!(matches!(
        other[..],
        [Event::ControllerLost {
            health: Health::Failed { .. },
            ..
        }]
    ));
}

#[test]
fn device_that_cannot_be_disabled_leaks_instead_of_freeing() {
    let (dev, mut c) = up(SoftConfig::default());
    dev.faults(|f| f.never_disable = true);
    c.fail_all(NvmeError::Aborted, &mut |_| {});
    c.shutdown().unwrap(); // dead: releases what it may
    assert!(
        c.stats().leaked_regions > 0,
        "memory the device may still write is not freed"
    );
    assert!(dev.dma_bytes() > 0);
}

#[test]
fn controller_left_enabled_but_not_ready_is_settled_then_reset() {
    // Firmware left CC.EN = 1 and the controller never came ready: bring-up waits (bounded)
    // for it to settle, disables it, and starts over.
    let dev = SoftNvme::new(SoftConfig {
        to: 2,
        ..Default::default()
    });
    dev.faults(|f| f.never_ready = true);
    dev.write32(0x24, 0x001f_001f);
    let scratch = dev.buffer(8192);
    dev.write64(0x28, scratch.bus_addr());
    dev.write64(0x30, scratch.bus_addr() + 4096);
    dev.write32(0x14, 1 | 6 << 16 | 4 << 20);
    assert_eq!(dev.read32(0x1c) & 1, 0);
    dev.faults(|f| f.never_ready = false);
    let t0 = dev.now();
    let mut c = Controller::new(dev.clone(), Config::default());
    c.bring_up().unwrap();
    assert!(
        dev.now() - t0 >= 1_000_000,
        "waited for RDY before clearing EN"
    );
}

#[test]
fn a_device_that_never_updates_sq_head_keeps_working() {
    let (dev, mut c) = up(SoftConfig::default());
    let buf = dev.buffer(512);
    dev.faults(|f| {
        for _ in 0..1000 {
            f.cqe_mutations.push_back(CqeMutation {
                sqhd: Some(5),
                ..Default::default()
            });
        }
    });
    for t in 0..1000 {
        c.io_sync(req(t, IoOp::Write, 1, t, 1, &buf, 512)).unwrap();
    }
    assert!(c.ignored_sq_heads() > 0);
}
