//! Asynchronous events: namespace attach/detach at run time, other notices, re-arming.

mod common;

use common::{pattern, poll_all, req, up};
use nvme_hotplug::nvme::{Event, IoOp, NsChanges};
use nvme_hotplug::platform::DmaRegion;
use softnvme::SoftConfig;

#[test]
fn namespace_attach_and_detach_are_reported_and_rescanned() {
    let (dev, mut c) = up(SoftConfig::default());
    assert_eq!(c.namespaces().len(), 1);
    dev.attach_namespace(2, 12, 256);
    let (io, ev) = poll_all(&mut c);
    assert!(io.is_empty());
    assert_eq!(ev, vec![Event::NamespacesChanged]);
    let ch = c.rescan_namespaces().unwrap();
    assert_eq!(
        ch,
        NsChanges {
            added: vec![2],
            removed: vec![],
            replaced: vec![]
        }
    );
    let ns2 = c
        .namespaces()
        .iter()
        .find(|n| n.nsid == 2)
        .copied()
        .unwrap();
    assert_eq!((ns2.lba_bytes, ns2.blocks), (4096, 256));

    // The new namespace takes I/O.
    let b = dev.buffer(4096);
    b.write(0, &pattern(4096, 8));
    c.io_sync(req(1, IoOp::Write, 2, 255, 1, &b, 4096)).unwrap();
    assert_eq!(dev.media_read(2, 255, 1).unwrap(), pattern(4096, 8));

    // The event was re-armed (AER resubmitted, log page read): a second change is seen.
    dev.detach_namespace(1);
    let (_, ev) = poll_all(&mut c);
    assert!(
        ev.is_empty(),
        "poll looks at the admin queue at most every 5 ms when idle"
    );
    dev.advance(5_000);
    let (_, ev) = poll_all(&mut c);
    assert_eq!(ev, vec![Event::NamespacesChanged]);
    let ch = c.rescan_namespaces().unwrap();
    assert_eq!(ch.removed, vec![1]);
    assert_eq!(
        c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>(),
        vec![2]
    );
    assert!(c.rescan_namespaces().unwrap().is_empty());
}

#[test]
fn other_events_are_reported_and_rearmed() {
    let (dev, mut c) = up(SoftConfig::default());
    let smart = 0x0002_0001; // SMART/health, log page 02h
    dev.raise_event(smart);
    let (_, ev) = poll_all(&mut c);
    assert_eq!(
        ev,
        vec![Event::AsyncNotice {
            kind: 1,
            info: 0,
            log_page: 2
        }]
    );
    dev.raise_event(smart);
    dev.advance(5_000);
    let (_, ev) = poll_all(&mut c);
    assert_eq!(
        ev,
        vec![Event::AsyncNotice {
            kind: 1,
            info: 0,
            log_page: 2
        }]
    );
    assert_eq!(c.stats().async_events, 2);
    // The AER is exempt from timeouts: a long idle period does not give the controller up.
    dev.advance(3_600_000_000);
    let (_, ev) = poll_all(&mut c);
    assert!(ev.is_empty(), "{ev:?}");
    assert!(c.is_ready());
}
