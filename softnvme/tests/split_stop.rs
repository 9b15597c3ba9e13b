//! The removal split for callers behind a shared lock (the kld's engine mutex): the fast half
//! (`fail_fast`, `begin_shutdown`) completes every request once and touches no register; the
//! slow half (`DeviceStop::run`) does every wait on the device, and frees or leaks the rings
//! according to whether the device stopped.

mod common;

use common::{poll_all, req, up};
use nvme_hotplug::nvme::{Completion, Controller, Health, IoOp, NvmeError};
use softnvme::{SoftConfig, SoftNvme, SoftRegion};

fn with_outstanding(n: u64) -> (SoftNvme, Controller<SoftNvme>, Vec<SoftRegion>) {
    let (dev, mut c) = up(SoftConfig::default());
    dev.faults(|f| f.hold_io = true);
    let mut bufs = Vec::new();
    for t in 0..n {
        let b = dev.buffer(4096 * 64);
        // Single and split requests (MDTS 128 KiB: 256 KiB is 2 commands).
        let blocks = if t % 2 == 0 { 8 } else { 512 };
        c.submit(req(t, IoOp::Write, 1, t * 1024, blocks, &b, 512))
            .unwrap();
        bufs.push(b);
    }
    (dev, c, bufs)
}

fn once_each(done: &[Completion], n: u64, err: NvmeError) {
    let mut seen = vec![0; n as usize];
    for d in done {
        seen[d.tag as usize] += 1;
        assert_eq!(d.result, Err(err));
    }
    assert!(seen.iter().all(|&k| k == 1), "each request completed exactly once: {seen:?}");
}

#[test]
fn fail_fast_completes_every_request_once_and_touches_no_register_until_the_stop_runs() {
    let (dev, mut c, bufs) = with_outstanding(12);
    let before = dev.register_accesses();
    let mut done = Vec::new();
    c.fail_fast(NvmeError::Aborted, &mut |x| done.push(x));
    once_each(&done, 12, NvmeError::Aborted);
    assert_eq!(c.outstanding(), 0);
    assert!(c.is_dead());
    assert!(c.stop_in_progress());
    assert!(!c.dma_stopped(), "the device may still run: buffers must be held");

    // Everything a lock holder may do meanwhile fails fast without reaching the device.
    let mut again = Vec::new();
    c.fail_fast(NvmeError::Gone, &mut |x| again.push(x));
    assert!(again.is_empty(), "nothing is completed twice");
    dev.release_held(); // late completions land in rings the engine no longer owns
    let (io, _) = poll_all(&mut c);
    assert!(io.is_empty());
    assert_eq!(c.submit(req(99, IoOp::Read, 1, 0, 1, &bufs[0], 512)), Err(NvmeError::Gone));
    assert_eq!(c.check_health(), Health::Gone);
    assert_eq!(c.rescan_namespaces().err(), Some(NvmeError::Gone));
    assert_eq!(c.begin_shutdown(), Ok(()));
    assert_eq!(dev.register_accesses(), before, "no register access while dead");

    let stop = c.take_stop().expect("the slow half is the caller's");
    assert!(c.take_stop().is_none(), "there is one stop");
    assert!(stop.touches_device());
    let outcome = stop.run(c.platform());
    assert!(dev.register_accesses() > before, "the stop is what talks to the device");
    assert!(outcome.dma_stopped());
    assert_eq!(outcome.leaked_regions(), 0);
    assert_eq!(dev.stats().shutdowns, 1, "the write cache is flushed by the shutdown notification");
    assert_eq!(c.finish_stop(outcome), Ok(()));
    assert!(!c.stop_in_progress());
    assert!(c.dma_stopped(), "now the failed requests' buffers may be freed");
    assert_eq!(c.stats().leaked_regions, 0);
}

#[test]
fn the_stop_of_a_device_that_ignores_shutdown_and_disable_leaks_its_memory() {
    let (dev, mut c, _bufs) = with_outstanding(4);
    dev.faults(|f| {
        f.never_disable = true;
        f.shutdown_never_completes = true;
    });
    let mut n = 0;
    c.fail_fast(NvmeError::Gone, &mut |_| n += 1);
    assert_eq!(n, 4);
    let stop = c.take_stop().unwrap();
    let t0 = dev.now();
    let outcome = stop.run(c.platform());
    assert!(dev.now() > t0, "the stop waited for the device (bounded)");
    assert!(!outcome.dma_stopped());
    assert!(outcome.leaked_regions() > 0, "rings of a running device are leaked");
    assert_eq!(outcome.result(), Err(NvmeError::Timeout), "the shutdown never completed");
    let _ = c.finish_stop(outcome);
    assert!(!c.dma_stopped(), "the failed requests' buffers must be leaked too");
    assert!(c.stats().leaked_regions > 0);
}

#[test]
fn a_stop_dropped_without_running_leaks_and_says_the_device_may_run() {
    let (dev, mut c, _bufs) = with_outstanding(2);
    c.fail_fast(NvmeError::Gone, &mut |_| {});
    let before = dev.register_accesses();
    drop(c.take_stop().unwrap());
    assert_eq!(dev.register_accesses(), before);
    assert!(!c.dma_stopped(), "nobody knows whether the device stopped");
    drop(c); // must not touch the memory it gave away
}

#[test]
fn begin_shutdown_leaves_every_wait_to_the_stop() {
    let (dev, mut c) = up(SoftConfig::default());
    let before = dev.register_accesses();
    assert_eq!(c.begin_shutdown(), Ok(()));
    assert_eq!(dev.register_accesses(), before);
    let b = dev.buffer(512);
    assert_eq!(c.submit(req(1, IoOp::Read, 1, 0, 1, &b, 512)), Err(NvmeError::NotReady));
    let stop = c.take_stop().unwrap();
    let outcome = stop.run(c.platform());
    assert_eq!(c.finish_stop(outcome), Ok(()));
    assert!(c.dma_stopped());
    assert_eq!(dev.stats().shutdowns, 1);
    assert!(!c.is_dead());
    // The controller can come back afterwards.
    c.bring_up().unwrap();
    assert!(c.is_ready());
}

#[test]
fn begin_shutdown_refuses_while_io_is_outstanding() {
    let (dev, mut c, _bufs) = with_outstanding(1);
    let before = dev.register_accesses();
    assert!(matches!(c.begin_shutdown(), Err(NvmeError::InvalidRequest(_))));
    assert!(c.take_stop().is_none());
    assert!(c.is_ready());
    assert_eq!(dev.register_accesses(), before);
}

/// A namespace rescan driven step by step, as the kld does with its mutex released between
/// steps: a step never waits (the device clock does not move inside one), and a completion
/// the interrupt path's `poll` reaps between two steps still reaches the scan.
#[test]
fn a_stepped_rescan_never_waits_and_survives_polls_between_steps() {
    let (dev, mut c) = up(SoftConfig::default());
    for nsid in 2..=12 {
        dev.attach_namespace(nsid, 9, 4096);
    }
    let mut scan = c.rescan_begin().unwrap();
    let mut steps = 0;
    let changes = loop {
        let t = dev.now();
        let r = c.rescan_step(&mut scan);
        assert_eq!(dev.now(), t, "a step does not wait");
        if let Some(r) = r {
            break r.expect("rescan");
        }
        steps += 1;
        assert!(steps < 100, "the scan lost a completion that poll reaped");
        // What the interrupt thread does while the hotplug thread sleeps.
        let _ = poll_all(&mut c);
    };
    assert!(steps > 0, "13 commands take more than one step");
    assert_eq!(changes.added, (2..=12).collect::<Vec<u32>>());
    assert_eq!(c.namespaces().len(), 12);
}

/// A rescan command the controller never answers ends the scan with `Timeout` once the
/// command timeout passed on the clock, each step returning at once meanwhile.
#[test]
fn a_stepped_rescan_of_a_silent_controller_times_out() {
    let (dev, mut c) = up(SoftConfig::default());
    dev.faults(|f| f.swallow_admin = 1);
    let mut scan = c.rescan_begin().unwrap();
    for _ in 0..3 {
        assert!(c.rescan_step(&mut scan).is_none());
    }
    assert!(
        matches!(c.rescan_begin(), Err(NvmeError::InvalidRequest(_))),
        "one scan at a time while its command is with the device"
    );
    dev.advance(c.config().cmd_timeout_us);
    assert_eq!(c.rescan_step(&mut scan).map(|r| r.err()), Some(Some(NvmeError::Timeout)));
}
