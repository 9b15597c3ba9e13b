//! Faults QEMU cannot produce, run through the driver's whole teardown (what lab/src/driver.rs
//! and the kld do): the watchdog or a poll notices, `fail_all` completes every request exactly
//! once, `shutdown`, drop; then every byte of DMA memory is back.
//! - controller fatal status (CSTS.CFS) with requests outstanding;
//! - commands the device fetched and never completes, then a timeout (device present) or a
//!   surprise removal (both removal flavours).

mod common;

use common::{poll_all, req, up};
use nvme_hotplug::nvme::{Completion, Controller, Event, Health, IoOp, NvmeError};
use softnvme::{SoftConfig, SoftNvme, SoftRegion, Vanish};

/// `n` 4 KiB writes submitted and outstanding; the device holds (`hold`) or swallows them.
fn outstanding(n: u64, swallow: bool) -> (SoftNvme, Controller<SoftNvme>, Vec<SoftRegion>) {
    let (dev, mut c) = up(SoftConfig::default());
    if swallow {
        dev.faults(|f| f.swallow_io = n as u32);
    } else {
        dev.faults(|f| f.hold_io = true);
    }
    let mut bufs = Vec::new();
    for t in 0..n {
        let b = dev.buffer(4096);
        c.submit(req(t, IoOp::Write, 1, t * 8, 8, &b, 512)).expect("accepted");
        bufs.push(b);
    }
    let (io, _) = poll_all(&mut c);
    assert!(io.is_empty(), "nothing completes by itself");
    assert_eq!(c.outstanding(), n as usize);
    (dev, c, bufs)
}

/// The driver's teardown once the controller is judged lost; returns every completion.
fn teardown(dev: &SoftNvme, mut c: Controller<SoftNvme>, bufs: Vec<SoftRegion>, mut done: Vec<Completion>) -> Vec<Completion> {
    c.fail_all(NvmeError::Gone, &mut |x| done.push(x));
    assert_eq!(c.outstanding(), 0);
    assert_eq!(c.shutdown(), Ok(()), "shutdown of a failed controller only releases memory");
    drop(c);
    drop(bufs);
    assert_eq!(dev.dma_bytes(), 0, "every DMA byte returned");
    done
}

fn exactly_once(done: &[Completion], n: u64) {
    let mut seen = vec![0u32; n as usize];
    for d in done {
        seen[d.tag as usize] += 1;
        assert!(d.result.is_err(), "request {} reported done on a failed controller", d.tag);
    }
    assert!(seen.iter().all(|&k| k == 1), "each request completed exactly once: {seen:?}");
}

#[test]
fn fatal_status_with_requests_outstanding_tears_down_cleanly() {
    for n in [1u64, 17, 200] {
        let (dev, mut c, bufs) = outstanding(n, false);
        dev.set_fatal();
        // The watchdog's look.
        assert!(matches!(c.check_health(), Health::Failed { csts } if csts & 2 != 0));
        // A poll may already give the controller up (and fail the requests); fail_all then
        // completes the rest: either way every request exactly once.
        let (done, _) = poll_all(&mut c);
        let done = teardown(&dev, c, bufs, done);
        exactly_once(&done, n);
    }
}

#[test]
fn never_completed_commands_time_out_exactly_once_then_tear_down() {
    let n = 24;
    let (dev, mut c, bufs) = outstanding(n, true);
    dev.advance(c.config().cmd_timeout_us + 1_000_000);
    let mut done = Vec::new();
    let mut lost = None;
    c.poll(&mut |e| match e {
        Event::Io(x) => done.push(x),
        Event::ControllerLost { health, .. } => lost = Some(health),
        _ => {}
    });
    assert!(lost.is_some(), "an overdue command makes the engine give the controller up");
    assert!(done.iter().all(|d| d.result == Err(NvmeError::Timeout)), "{done:?}");
    let done = teardown(&dev, c, bufs, done);
    exactly_once(&done, n);
}

#[test]
fn never_completed_commands_then_surprise_removal_both_flavours() {
    for style in [Vanish::Zeros, Vanish::AllOnes] {
        for n in [1u64, 64, 255] {
            let (dev, mut c, bufs) = outstanding(n, true);
            dev.vanish(style);
            // Zeros look healthy to CSTS; config space says gone.
            assert_eq!(c.check_health(), Health::Gone, "{style:?}");
            let done = teardown(&dev, c, bufs, Vec::new());
            exactly_once(&done, n);
            assert!(done.iter().all(|d| d.result == Err(NvmeError::Gone)), "{style:?}");
        }
    }
}

/// The leak check can fail: a buffer kept alive past teardown is counted.
#[test]
fn dma_accounting_sees_a_kept_buffer() {
    let (dev, mut c, mut bufs) = outstanding(2, true);
    dev.vanish(Vanish::AllOnes);
    let kept = bufs.pop().unwrap();
    c.fail_all(NvmeError::Gone, &mut |_| {});
    drop(c);
    drop(bufs);
    assert_eq!(dev.dma_bytes(), 4096);
    drop(kept);
    assert_eq!(dev.dma_bytes(), 0);
}
