//! I/O through the engine: write, read back, verify against the media; MDTS splitting;
//! PRP shapes; typed errors.

mod common;

use common::{pattern, poll_all, req, up};
use nvme_hotplug::nvme::{DmaSeg, IoOp, NvmeError, StatusCode};
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

/// A payload scattered over separate pages, as busdma(9) maps a bio (one segment per page,
/// the first at an offset, the last partial): `len` bytes starting `start` bytes into the
/// first page. Returns the pages (kept alive by the caller) and the segments.
fn scattered(dev: &softnvme::SoftNvme, start: usize, len: usize) -> (Vec<softnvme::SoftRegion>, Vec<DmaSeg>) {
    let (mut pages, mut segs) = (Vec::new(), Vec::new());
    let (mut off, mut left) = (start, len);
    while left > 0 {
        // A spare page between the buffers, so neighbouring segments are never contiguous.
        let _gap = dev.buffer(4096);
        let p = dev.buffer(4096);
        let n = (4096 - off).min(left);
        segs.push(DmaSeg { addr: p.bus_addr() + off as u64, len: n });
        pages.push(p);
        pages.push(_gap);
        left -= n;
        off = 0;
    }
    (pages, segs)
}

/// Writes `data` into the scattered pages behind `segs`, or reads them back.
fn fill(pages: &[softnvme::SoftRegion], segs: &[DmaSeg], data: &[u8]) {
    let mut at = 0;
    for (s, p) in segs.iter().zip(pages.iter().step_by(2)) {
        p.write((s.addr - p.bus_addr()) as usize, &data[at..at + s.len]);
        at += s.len;
    }
}

fn gather(pages: &[softnvme::SoftRegion], segs: &[DmaSeg]) -> Vec<u8> {
    let mut out = Vec::new();
    for (s, p) in segs.iter().zip(pages.iter().step_by(2)) {
        let mut b = vec![0u8; s.len];
        p.read((s.addr - p.bus_addr()) as usize, &mut b);
        out.extend(b);
    }
    out
}

/// A request given as busdma-shaped segments (scattered pages, PRP1 at an offset, split at
/// MDTS so that parts start inside pages and need PRP lists) writes and reads exactly the
/// bytes of those pages: every PRP the engine builds is checked by the device against live
/// memory.
#[test]
fn scattered_segments_write_and_read_back_across_mdts_parts() {
    let (dev, mut c) = up(SoftConfig::default()); // MDTS 128 KiB
    let len = 300 * 1024;
    let data = pattern(len, 9);
    let (wpages, wsegs) = scattered(&dev, 512, len);
    fill(&wpages, &wsegs, &data);
    let mut r = req(7, IoOp::Write, 1, 64, (len / 512) as u32, &wpages[0], 512);
    r.data.len = len;
    c.submit_segments(r, &wsegs).unwrap();
    let (io, _) = poll_all(&mut c);
    assert_eq!(io.len(), 1);
    assert_eq!(io[0].result, Ok(()));
    assert_eq!(dev.media_read(1, 64, (len / 512) as u64).unwrap(), data);

    let (rpages, rsegs) = scattered(&dev, 4, len);
    let mut r = req(8, IoOp::Read, 1, 64, (len / 512) as u32, &rpages[0], 512);
    r.data.len = len;
    c.submit_segments(r, &rsegs).unwrap();
    let (io, _) = poll_all(&mut c);
    assert_eq!(io[0].result, Ok(()));
    assert_eq!(gather(&rpages, &rsegs), data);
}

/// Segments PRP entries cannot express (a hole in a middle page) are refused before anything
/// reaches the device, and the request is not outstanding.
#[test]
fn segments_with_a_hole_are_refused_without_a_command() {
    let (dev, mut c) = up(SoftConfig::default());
    let (pages, mut segs) = scattered(&dev, 0, 3 * 4096);
    segs[1].len -= 512; // the middle page ends early
    let mut r = req(1, IoOp::Write, 1, 0, 23, &pages[0], 512);
    r.data.len = 23 * 512;
    let before = dev.stats().commands;
    assert!(matches!(c.submit_segments(r, &segs), Err(NvmeError::InvalidRequest(_))));
    assert_eq!(dev.stats().commands, before);
    assert_eq!(c.outstanding(), 0);
}

/// The I/O path allocates no DMA memory: PRP lists were allocated at bring-up for every
/// command slot, so a queue full of requests that each need one allocates nothing.
#[test]
fn submitting_requests_that_need_prp_lists_allocates_no_dma_memory() {
    let (dev, mut c) = up(SoftConfig::default());
    let len = 64 * 1024; // 16 pages: a PRP list each
    let bufs: Vec<_> = (0..32).map(|_| dev.buffer(len)).collect();
    let before = dev.dma_bytes();
    for (i, b) in bufs.iter().enumerate() {
        c.submit(req(i as u64, IoOp::Write, 1, (i * 128) as u64, 128, b, 512)).unwrap();
    }
    assert_eq!(dev.dma_bytes(), before, "submit allocated DMA memory");
    let (io, _) = poll_all(&mut c);
    assert_eq!(io.len(), 32);
    assert!(io.iter().all(|x| x.result.is_ok()));
    assert_eq!(dev.dma_bytes(), before);
}
