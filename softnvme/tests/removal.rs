//! Surprise removal: registers read all-ones (real PCIe) or zeros (QEMU), config space reads
//! 0xffff. In-flight I/O must be failed at once and exactly once, and nothing may hang.

mod common;

use common::{pattern, poll_all, req, up};
use nvme_hotplug::nvme::{Completion, Config, Controller, Event, Health, IoOp, NvmeError};
use nvme_hotplug::platform::DmaRegion;
use softnvme::{SoftConfig, SoftNvme, Vanish};

fn with_outstanding(n: u64) -> (SoftNvme, Controller<SoftNvme>, Vec<softnvme::SoftRegion>) {
    let (dev, mut c) = up(SoftConfig::default());
    dev.faults(|f| f.hold_io = true);
    let mut bufs = Vec::new();
    for t in 0..n {
        let b = dev.buffer(4096 * 64);
        // Mix of single and split requests (MDTS 128 KiB: 256 KiB -> 2 parts).
        let blocks = if t % 2 == 0 { 8 } else { 512 };
        c.submit(req(t, IoOp::Write, 1, t * 1024, blocks, &b, 512))
            .unwrap();
        bufs.push(b);
    }
    assert_eq!(c.outstanding(), n as usize);
    (dev, c, bufs)
}

fn exactly_once(done: &[Completion], n: u64, err: NvmeError) {
    let mut seen = vec![0; n as usize];
    for d in done {
        seen[d.tag as usize] += 1;
        assert_eq!(d.result, Err(err));
    }
    assert!(
        seen.iter().all(|&k| k == 1),
        "each request completed exactly once: {seen:?}"
    );
}

fn removal(style: Vanish) {
    let (dev, mut c, _bufs) = with_outstanding(20);
    dev.vanish(style);
    assert_eq!(c.check_health(), Health::Gone);
    let mut done = Vec::new();
    c.fail_all(NvmeError::Gone, &mut |x| done.push(x));
    exactly_once(&done, 20, NvmeError::Gone);
    assert_eq!(c.outstanding(), 0);
    assert!(c.is_dead());
    // Nothing more is delivered, later completions included.
    dev.release_held();
    let (io, _) = poll_all(&mut c);
    assert!(io.is_empty());
    let mut again = Vec::new();
    c.fail_all(NvmeError::Gone, &mut |x| again.push(x));
    assert!(
        again.is_empty(),
        "a second fail_all has nothing left to complete"
    );
    let b = dev.buffer(512);
    assert_eq!(
        c.submit(req(99, IoOp::Read, 1, 0, 1, &b, 512)),
        Err(NvmeError::Gone)
    );
    // Shutdown of a dead controller touches no register.
    let before = dev.register_accesses();
    c.shutdown().unwrap();
    assert_eq!(dev.register_accesses(), before);
    drop(c);
    drop(b);
    drop(_bufs);
    assert_eq!(
        dev.dma_bytes(),
        0,
        "a gone device cannot DMA: all memory is freed"
    );
}

#[test]
fn removal_all_ones() {
    removal(Vanish::AllOnes);
}

#[test]
fn removal_reads_zero_like_qemu() {
    removal(Vanish::Zeros);
}

#[test]
fn removal_zero_flavour_is_detected_by_poll_timeout() {
    // No one calls fail_all: the overdue check notices, the health check says Gone.
    for style in [Vanish::AllOnes, Vanish::Zeros] {
        let (dev, mut c, _bufs) = with_outstanding(3);
        dev.vanish(style);
        dev.advance(31_000_000);
        let (io, other) = poll_all(&mut c);
        exactly_once(&io, 3, NvmeError::Gone);
        assert_eq!(
            other,
            vec![Event::ControllerLost {
                reason: NvmeError::Gone,
                health: Health::Gone
            }]
        );
    }
}

#[test]
fn fail_all_keeps_real_results_already_reaped() {
    // io_sync stashes other completions for the next poll; fail_all must deliver those with
    // their real result, not fail them a second time.
    let (dev, mut c) = up(SoftConfig::default());
    let a = dev.buffer(512);
    a.write(0, &pattern(512, 1));
    dev.faults(|f| f.hold_io = true);
    c.submit(req(1, IoOp::Write, 1, 0, 1, &a, 512)).unwrap();
    dev.release_held();
    dev.faults(|f| f.hold_io = false);
    let b = dev.buffer(512);
    c.io_sync(req(2, IoOp::Write, 1, 1, 1, &b, 512)).unwrap(); // reaps tag 1 too, stashes it
    dev.faults(|f| f.hold_io = true);
    c.submit(req(3, IoOp::Write, 1, 2, 1, &b, 512)).unwrap();
    dev.vanish(Vanish::Zeros);
    let mut done = Vec::new();
    c.fail_all(NvmeError::Gone, &mut |x| done.push(x));
    done.sort_by_key(|x| x.tag);
    assert_eq!(
        done,
        vec![
            Completion {
                tag: 1,
                result: Ok(())
            },
            Completion {
                tag: 3,
                result: Err(NvmeError::Gone)
            }
        ]
    );
    assert_eq!(dev.media_read(1, 0, 1).unwrap(), pattern(512, 1));
}

#[test]
fn vanish_during_io_sync_is_bounded() {
    let (dev, mut c) = up(SoftConfig::default());
    let b = dev.buffer(512);
    let at = dev.register_accesses() + 2;
    dev.faults(|f| {
        f.swallow_io = 1;
        f.vanish_at_access = Some(at);
        f.vanish_style = Vanish::Zeros;
    });
    assert_eq!(
        c.io_sync(req(1, IoOp::Read, 1, 0, 1, &b, 512)),
        Err(NvmeError::Gone)
    );
    assert!(c.is_dead());
}

/// Vanishing at every possible register access of a bring-up, and of a bring-up followed by
/// I/O and shutdown: the engine returns an error (or finishes), never panics or hangs.
#[test]
fn vanish_at_every_access_of_a_lifecycle() {
    // A clean run: how many register accesses, and how many before shutdown starts.
    let dev = SoftNvme::new(SoftConfig::default());
    let mut before_shutdown = 0;
    lifecycle(&dev, &mut before_shutdown).unwrap();
    let count = dev.register_accesses();
    assert!(
        count > 20 && before_shutdown < count,
        "{before_shutdown} / {count} accesses"
    );
    for style in [Vanish::AllOnes, Vanish::Zeros] {
        for n in 1..=count + 1 {
            let dev = SoftNvme::new(SoftConfig::default());
            dev.faults(|f| {
                f.vanish_at_access = Some(n);
                f.vanish_style = style;
            });
            let r = lifecycle(&dev, &mut 0);
            if n <= before_shutdown {
                // Gone before or during bring-up/I/O: some later access must notice.
                assert!(
                    r.is_err(),
                    "vanish at access {n} ({style:?}) went unnoticed"
                );
            } else if n > count {
                assert_eq!(r, Ok(()));
            }
            // Inside shutdown either answer is acceptable (zeros read like "disabled").
            assert!(
                dev.now() < 200_000_000,
                "vanish at {n} ({style:?}) took {} us",
                dev.now()
            );
        }
    }
}

fn lifecycle(dev: &SoftNvme, before_shutdown: &mut u64) -> Result<(), NvmeError> {
    let mut c = Controller::new(dev.clone(), Config::default());
    c.bring_up()?;
    let b = dev.buffer(8192);
    c.io_sync(req(1, IoOp::Write, 1, 0, 16, &b, 512))?;
    c.io_sync(req(2, IoOp::Read, 1, 0, 16, &b, 512))?;
    *before_shutdown = dev.register_accesses();
    c.shutdown()
}

#[test]
fn vanish_during_bring_up_reports_gone() {
    for style in [Vanish::AllOnes, Vanish::Zeros] {
        let dev = SoftNvme::new(SoftConfig::default());
        dev.faults(|f| {
            f.vanish_at_access = Some(12); // after enable, during identify
            f.vanish_style = style;
        });
        let mut c = Controller::new(dev.clone(), Config::default());
        assert_eq!(c.bring_up(), Err(NvmeError::Gone), "{style:?}");
        assert!(c.is_dead());
    }
}

#[test]
fn fail_all_on_a_present_controller_shuts_it_down_first() {
    // Announced detach with stuck I/O: the write cache must be flushed (shutdown
    // notification) before the controller is disabled and the slot ejected.
    let (dev, mut c, _bufs) = with_outstanding(2);
    let mut done = Vec::new();
    c.fail_all(NvmeError::Aborted, &mut |x| done.push(x));
    exactly_once(&done, 2, NvmeError::Aborted);
    assert_eq!(dev.stats().shutdowns, 1);
    c.shutdown().unwrap();
    drop(c);
    assert_eq!(dev.stats().shutdowns, 1, "sent once");
    // A gone controller gets no notification at all.
    let (dev, mut c, _bufs) = with_outstanding(2);
    dev.vanish(Vanish::AllOnes);
    c.fail_all(NvmeError::Gone, &mut |_| {});
    assert_eq!(dev.stats().shutdowns, 0);
}

/// QEMU's flavour of removal during enable: CSTS reads 0, which looks like "not ready yet".
/// The wait must notice the missing function (config space) within a few milliseconds instead
/// of spending the whole CAP.TO (here 10 s): found by the lab's bring-up removal sweep.
#[test]
fn zero_reads_while_waiting_for_ready_are_noticed_long_before_cap_to() {
    let dev = SoftNvme::new(SoftConfig { to: 20, ..Default::default() });
    dev.faults(|f| {
        f.never_ready = true;
        f.vanish_at_access = Some(40); // well inside the wait for CSTS.RDY
        f.vanish_style = Vanish::Zeros;
    });
    let mut c = Controller::new(dev.clone(), Config::default());
    assert_eq!(c.bring_up(), Err(NvmeError::Gone));
    assert!(dev.now() < 100_000, "noticed after {} us (CAP.TO is 10 s)", dev.now());
}

#[test]
fn fail_all_reports_completions_posted_before_the_removal() {
    // The device finished tag 1 and posted its entry to host memory, then vanished before
    // anyone polled. That entry is a real result: fail_all must report it as done (its data is
    // on the media), and fail only what the device never answered.
    for style in [Vanish::AllOnes, Vanish::Zeros] {
        let (dev, mut c) = up(SoftConfig::default());
        let a = dev.buffer(512);
        a.write(0, &pattern(512, 7));
        c.submit(req(1, IoOp::Write, 1, 0, 1, &a, 512)).unwrap();
        dev.faults(|f| f.hold_io = true);
        let b = dev.buffer(512);
        c.submit(req(2, IoOp::Write, 1, 1, 1, &b, 512)).unwrap();
        dev.vanish(style);
        let mut done = Vec::new();
        c.fail_all(NvmeError::Gone, &mut |x| done.push(x));
        done.sort_by_key(|x| x.tag);
        assert_eq!(
            done,
            vec![
                Completion { tag: 1, result: Ok(()) },
                Completion { tag: 2, result: Err(NvmeError::Gone) },
            ],
            "{style:?}"
        );
        assert_eq!(dev.media_read(1, 0, 1).unwrap(), pattern(512, 7));
    }
}
