//! I/O through the engine: write, read back, verify against the media; MDTS splitting;
//! PRP shapes; typed errors.

mod common;

use common::{pattern, poll_all, req, up};
use nvme_hotplug::nvme::{IoOp, NvmeError, StatusCode};
use nvme_hotplug::platform::DmaRegion;
use softnvme::SoftConfig;

#[test]
fn write_read_verify_512() {
    let (dev, mut c) = up(SoftConfig::default());
    let data = pattern(8 * 512, 1);
    let wbuf = dev.buffer(data.len());
    wbuf.write(0, &data);
    c.io_sync(req(1, IoOp::Write, 1, 77, 8, &wbuf, 512))
        .unwrap();
    assert_eq!(
        dev.media_read(1, 77, 8).unwrap(),
        data,
        "acknowledged write is on the media"
    );
    let rbuf = dev.buffer(data.len());
    c.io_sync(req(2, IoOp::Read, 1, 77, 8, &rbuf, 512)).unwrap();
    assert_eq!(rbuf.to_vec(), data);
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn write_read_verify_4096_namespace() {
    let (dev, mut c) = up(SoftConfig {
        namespaces: vec![(5, 12, 4096)],
        ..Default::default()
    });
    let data = pattern(3 * 4096, 2);
    let wbuf = dev.buffer(data.len());
    wbuf.write(0, &data);
    c.io_sync(req(1, IoOp::Write, 5, 4093, 3, &wbuf, 4096))
        .unwrap();
    assert_eq!(dev.media_read(5, 4093, 3).unwrap(), data);
    let rbuf = dev.buffer(data.len());
    c.io_sync(req(2, IoOp::Read, 5, 4093, 3, &rbuf, 4096))
        .unwrap();
    assert_eq!(rbuf.to_vec(), data);
}

#[test]
fn large_request_is_split_at_mdts_and_completes_once() {
    // MDTS 5 = 128 KiB; 1 MiB -> 8 commands, each with a PRP list.
    let (dev, mut c) = up(SoftConfig::default());
    let len = 1 << 20;
    let data = pattern(len, 3);
    let (wbuf, addr) = dev.buffer_at_offset(len, 512); // unaligned start: PRP1 offset
    wbuf.write(512, &data);
    let mut r = req(42, IoOp::Write, 1, 1000, (len / 512) as u32, &wbuf, 512);
    r.data.bus_addr = addr;
    let cmds_before = dev.stats().commands;
    c.submit(r).unwrap();
    assert_eq!(c.outstanding(), 1);
    let (io, other) = poll_all(&mut c);
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(io.len(), 1, "one completion for the whole request");
    assert_eq!(io[0].tag, 42);
    assert_eq!(io[0].result, Ok(()));
    assert_eq!(
        dev.stats().commands - cmds_before,
        8,
        "8 parts of 128 KiB each"
    );
    assert_eq!(c.stats().split_requests, 1);
    assert_eq!(dev.media_read(1, 1000, (len / 512) as u64).unwrap(), data);

    let (rbuf, raddr) = dev.buffer_at_offset(len, 4);
    let mut r = req(43, IoOp::Read, 1, 1000, (len / 512) as u32, &rbuf, 512);
    r.data.bus_addr = raddr;
    c.io_sync(r).unwrap();
    assert_eq!(&rbuf.to_vec()[4..], &data[..]);
}

#[test]
fn unlimited_mdts_is_capped() {
    let (dev, mut c) = up(SoftConfig {
        mdts: 0,
        ..Default::default()
    });
    assert_eq!(c.info().unwrap().mdts_bytes, 1 << 20);
    let len = 2 << 20;
    let data = pattern(len, 4);
    let buf = dev.buffer(len);
    buf.write(0, &data);
    c.io_sync(req(1, IoOp::Write, 1, 0, (len / 512) as u32, &buf, 512))
        .unwrap();
    assert_eq!(dev.media_read(1, 0, (len / 512) as u64).unwrap(), data);
    assert_eq!(c.stats().split_requests, 1);
}

#[test]
fn lba_out_of_range_is_a_typed_status() {
    let (dev, mut c) = up(SoftConfig {
        namespaces: vec![(1, 9, 100)],
        ..Default::default()
    });
    let buf = dev.buffer(4096);
    let err = c
        .io_sync(req(1, IoOp::Write, 1, 96, 8, &buf, 512))
        .unwrap_err();
    match err {
        NvmeError::Status(s) => {
            assert_eq!(s.code, StatusCode::LbaOutOfRange);
            assert_eq!((s.sct, s.sc), (0, 0x80));
            assert!(s.dnr);
        }
        e => panic!("expected a status error, got {e:?}"),
    }
    assert_eq!(dev.stats().writes, 0);
    // The controller is still fine.
    c.io_sync(req(2, IoOp::Write, 1, 92, 8, &buf, 512)).unwrap();
}

#[test]
fn split_request_fails_if_any_part_fails() {
    // 200 blocks of 512 at LBA 0 in a 150-block namespace, MDTS 64 KiB = 128 blocks:
    // the first part succeeds, the second is out of range: the request must fail.
    let (dev, mut c) = up(SoftConfig {
        namespaces: vec![(1, 9, 150)],
        mdts: 4,
        ..Default::default()
    });
    let buf = dev.buffer(200 * 512);
    let err = c
        .io_sync(req(1, IoOp::Write, 1, 0, 200, &buf, 512))
        .unwrap_err();
    assert!(matches!(err, NvmeError::Status(s) if s.code == StatusCode::LbaOutOfRange));
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn request_validation_sends_nothing() {
    let (dev, mut c) = up(SoftConfig::default());
    let buf = dev.buffer(4096);
    let before = dev.stats().commands;
    assert!(matches!(
        c.submit(req(1, IoOp::Read, 9, 0, 1, &buf, 512)),
        Err(NvmeError::InvalidRequest(_))
    ));
    let mut r = req(1, IoOp::Read, 1, 0, 1, &buf, 512);
    r.data.len = 100;
    assert!(matches!(c.submit(r), Err(NvmeError::InvalidRequest(_))));
    assert!(matches!(
        c.submit(req(1, IoOp::Read, 1, 0, 0, &buf, 512)),
        Err(NvmeError::InvalidRequest(_))
    ));
    assert_eq!(dev.stats().commands, before);
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn flush_completes() {
    let (dev, mut c) = up(SoftConfig::default());
    c.io_sync(req(7, IoOp::Flush, 1, 0, 0, &dev.buffer(4096), 512))
        .unwrap();
}

#[test]
fn queue_full_then_drains() {
    let (dev, mut c) = up(SoftConfig {
        max_io_queues: 1,
        ..Default::default()
    });
    dev.faults(|f| f.hold_io = true);
    let buf = dev.buffer(512);
    let cap = c.info().unwrap().io_entries as usize - 1;
    for t in 0..cap as u64 {
        c.submit(req(t, IoOp::Read, 1, t, 1, &buf, 512)).unwrap();
    }
    assert_eq!(
        c.submit(req(999, IoOp::Read, 1, 0, 1, &buf, 512)),
        Err(NvmeError::QueueFull)
    );
    dev.release_held();
    let mut seen = vec![0u32; cap];
    // The CQ holds entries-1 at a time; the device posts the rest as the head moves.
    for _ in 0..4 {
        let (io, _) = poll_all(&mut c);
        for x in io {
            assert_eq!(x.result, Ok(()));
            seen[x.tag as usize] += 1;
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "every request completed exactly once"
    );
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn many_outstanding_across_queues_and_wraps() {
    let (dev, mut c) = up(SoftConfig::default());
    let mut bufs = Vec::new();
    for round in 0..20u64 {
        for i in 0..50u64 {
            let tag = round * 100 + i;
            let b = dev.buffer(4096);
            b.write(0, &pattern(4096, tag));
            c.submit(req(tag, IoOp::Write, 1, tag * 8, 8, &b, 512))
                .unwrap();
            bufs.push(b);
        }
        let (io, other) = poll_all(&mut c);
        assert!(other.is_empty());
        assert_eq!(io.len(), 50);
        assert!(io.iter().all(|x| x.result.is_ok()));
        bufs.clear();
    }
    for tag in [0u64, 1949, 777] {
        if tag % 100 < 50 {
            assert_eq!(dev.media_read(1, tag * 8, 8).unwrap(), pattern(4096, tag));
        }
    }
}
