//! Property tests: random identify data, random completion entries and random operation
//! sequences never panic, never hang, complete every accepted request exactly once, and never
//! acknowledge a write that is not on the media.

mod common;

use std::collections::HashMap;

use common::{pattern, req};
use nvme_hotplug::nvme::identify::{parse_controller, parse_namespace, parse_ns_list};
use nvme_hotplug::nvme::regs::Version;
use nvme_hotplug::nvme::{Config, Controller, Event, IoOp, NvmeError};
use nvme_hotplug::platform::DmaRegion;
use proptest::prelude::*;
use softnvme::{Cqe, SoftConfig, SoftNvme, SoftRegion, Vanish};

proptest! {
    #[test]
    fn identify_parsers_never_panic(d in proptest::collection::vec(any::<u8>(), 0..5000),
                                    nsid in any::<u32>(), after in any::<u32>(),
                                    nn in any::<u32>(), mdts in any::<u32>()) {
        if let Ok(info) = parse_controller(&d, Version::decode(0)) {
            prop_assert!(info.mdts_bytes >= 4096 && info.mdts_bytes <= 1 << 20);
        }
        if let Ok(Some(ns)) = parse_namespace(nsid, &d, mdts) {
            prop_assert!((9..=16).contains(&ns.lba_shift));
            prop_assert!(ns.blocks > 0 && ns.lba_bytes <= mdts);
            prop_assert_eq!(ns.capacity, ns.blocks << ns.lba_shift);
        }
        if let Ok((ids, _)) = parse_ns_list(&d, after, nn, 100) {
            prop_assert!(ids.len() <= 100);
            prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(ids.iter().all(|&i| i > after && i <= nn));
        }
    }

    #[test]
    fn random_identify_controller_bring_up(mut page in proptest::collection::vec(any::<u8>(), 4096),
                                          fix_sizes in any::<bool>()) {
        if fix_sizes {
            page[512] = 0x66;
            page[513] = 0x44;
        }
        let dev = SoftNvme::new(SoftConfig::default());
        dev.faults(|f| f.identify_ctrl = Some(page));
        let mut c = Controller::new(dev.clone(), Config::default());
        match c.bring_up() {
            Ok(()) => {
                let i = c.info().unwrap();
                prop_assert!(i.mdts_bytes >= 4096 && i.mdts_bytes <= 1 << 20);
                prop_assert!(c.namespaces().len() <= 256);
                // Whatever identify said, I/O is either accepted and completed or refused.
                if let Some(ns) = c.namespaces().first().copied() {
                    let b = dev.buffer(ns.lba_bytes as usize);
                    let _ = c.io_sync(req(1, IoOp::Read, ns.nsid, 0, 1, &b, ns.lba_bytes as usize));
                    prop_assert_eq!(c.outstanding(), 0);
                }
            }
            Err(NvmeError::BadDevice(_)) => {}
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
        drop(c);
        prop_assert_eq!(dev.dma_bytes(), 0);
    }

    #[test]
    fn random_identify_namespace_bring_up(nsze in prop_oneof![Just(0u64), 1u64..100, any::<u64>()],
                                         ncap in prop_oneof![Just(0u64), 1u64..100, any::<u64>()],
                                         nuse in 0u64..100, nlbaf in any::<u8>(), flbas in any::<u8>(),
                                         lbaf in proptest::collection::vec(any::<u32>(), 64)) {
        let mut page = vec![0u8; 4096];
        page[0..8].copy_from_slice(&nsze.to_le_bytes());
        page[8..16].copy_from_slice(&ncap.to_le_bytes());
        page[16..24].copy_from_slice(&nuse.to_le_bytes());
        page[25] = nlbaf;
        page[26] = flbas;
        for (i, f) in lbaf.iter().enumerate() {
            page[128 + 4 * i..132 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        let dev = SoftNvme::new(SoftConfig::default());
        dev.faults(|f| { f.identify_ns.insert(1, page); });
        let mut c = Controller::new(dev.clone(), Config::default());
        prop_assert_eq!(c.bring_up(), Ok(()));
        prop_assert!(c.namespaces().len() + c.rejected_namespaces().len() == 1);
        for ns in c.namespaces() {
            prop_assert!(ns.blocks > 0 && (9..=16).contains(&ns.lba_shift));
        }
    }

    /// Random completion entries (any CID, SQID, SQ head, status, dword 0, on any queue)
    /// mixed into a real workload.
    #[test]
    fn random_cqes_never_break_exactly_once(
        n in 1usize..24,
        junk in proptest::collection::vec((0u16..3, any::<u16>(), any::<u16>(), any::<u16>(),
                                           any::<u16>(), any::<u32>(), any::<bool>()), 0..40),
    ) {
        let dev = SoftNvme::new(SoftConfig::default());
        let mut c = Controller::new(dev.clone(), Config { io_queues: 2, ..Config::default() });
        c.bring_up().unwrap();
        dev.faults(|f| f.hold_io = true); // every command executes now, completes later
        let mut bufs = Vec::new();
        for t in 0..n as u64 {
            let b = dev.buffer(1024);
            b.write(0, &pattern(1024, t));
            c.submit(req(t, IoOp::Write, 1, t * 2, 2, &b, 512)).unwrap();
            bufs.push(b);
        }
        let mut results: HashMap<u64, Vec<Result<(), NvmeError>>> = HashMap::new();
        let mut on = |e: Event| if let Event::Io(x) = e { results.entry(x.tag).or_default().push(x.result) };
        for (i, &(cq, cid, sqid, sqhd, status, dw0, small)) in junk.iter().enumerate() {
            // Half the time use plausible values so the deeper checks are reached.
            let (cid, sqid, sqhd) = if small { (cid % 32, sqid % 3, sqhd % 8) } else { (cid, sqid, sqhd) };
            dev.inject_cqe(cq, Cqe { dw0, sqhd, sqid, cid, status });
            if i % 7 == 0 {
                c.poll(&mut on);
            }
        }
        dev.release_held();
        for _ in 0..4 {
            c.poll(&mut on);
        }
        dev.advance(61_000_000);
        c.poll(&mut on);
        prop_assert_eq!(c.outstanding(), 0);
        for t in 0..n as u64 {
            let r = results.get(&t).map(|v| v.len()).unwrap_or(0);
            prop_assert_eq!(r, 1, "tag {} completed {} times", t, r);
            if results[&t][0].is_ok() {
                prop_assert_eq!(dev.media_read(1, t * 2, 2).unwrap(), pattern(1024, t));
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random request geometry (block size, MDTS, length, buffer offset, LBA): what is
    /// written is what the media holds and what is read back. Every PRP the engine builds is
    /// checked by the device against live memory, so a wrong PRP fails the transfer.
    #[test]
    fn random_geometry_round_trips(lbads in prop_oneof![Just(9u8), Just(12u8)],
                                   mdts in 0u8..6, blocks in 1u32..700,
                                   offset_dwords in 0usize..1024, lba_frac in 0.0f64..1.0,
                                   queues in 1u16..4) {
        let ns_blocks = 4096u64;
        let cfg = SoftConfig { namespaces: vec![(1, lbads, ns_blocks)], mdts, ..SoftConfig::default() };
        let dev = SoftNvme::new(cfg);
        let mut c = Controller::new(dev.clone(), Config { io_queues: queues, ..Config::default() });
        c.bring_up().unwrap();
        let bs = 1usize << lbads;
        let mdts_bytes = c.info().unwrap().mdts_bytes as usize;
        let blocks = blocks.min(((255 * mdts_bytes) / bs) as u32).min(ns_blocks as u32);
        let lba = ((ns_blocks - blocks as u64) as f64 * lba_frac) as u64;
        let len = blocks as usize * bs;
        let off = offset_dwords * 4;
        let data = pattern(len, blocks as u64 ^ lba);
        let (wbuf, waddr) = dev.buffer_at_offset(len, off);
        wbuf.write(off, &data);
        let mut w = req(1, IoOp::Write, 1, lba, blocks, &wbuf, bs);
        w.data.bus_addr = waddr;
        prop_assert_eq!(c.io_sync(w), Ok(()));
        prop_assert_eq!(dev.media_read(1, lba, blocks as u64).unwrap(), data.clone());
        let (rbuf, raddr) = dev.buffer_at_offset(len, off);
        let mut r = req(2, IoOp::Read, 1, lba, blocks, &rbuf, bs);
        r.data.bus_addr = raddr;
        prop_assert_eq!(c.io_sync(r), Ok(()));
        prop_assert_eq!(&rbuf.to_vec()[off..], &data[..]);
        prop_assert_eq!(dev.stats().dma_faults, 0);
    }
}

proptest! {
    // Each case runs up to 60 operations with buffers up to 150 KiB: fewer cases keep the
    // debug-build test time reasonable.
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random operation sequences: submits of random sizes, polls, clock jumps, swallowed
    /// commands, removal in either flavour, fail_all.
    #[test]
    fn random_operation_sequences(ops in proptest::collection::vec(0u8..10, 1..60),
                                  sizes in proptest::collection::vec(1u32..300, 60)) {
        let dev = SoftNvme::new(SoftConfig::default());
        let mut c = Controller::new(dev.clone(), Config::default());
        c.bring_up().unwrap();
        let mut accepted: HashMap<u64, (u64, u32)> = HashMap::new();
        let mut done: HashMap<u64, Vec<Result<(), NvmeError>>> = HashMap::new();
        let mut bufs: Vec<SoftRegion> = Vec::new();
        let mut next_lba = 0u64;
        let mut tag = 0u64;
        for (i, op) in ops.iter().enumerate() {
            let mut on = |e: Event| if let Event::Io(x) = e { done.entry(x.tag).or_default().push(x.result) };
            match op {
                0..=3 => {
                    let blocks = sizes[i];
                    let b = dev.buffer(blocks as usize * 512);
                    b.write(0, &pattern(blocks as usize * 512, tag));
                    let op = if *op == 3 { IoOp::Read } else { IoOp::Write };
                    if c.submit(req(tag, op, 1, next_lba, blocks, &b, 512)).is_ok() {
                        let what = if op == IoOp::Write { (next_lba, blocks) } else { (u64::MAX, 0) };
                        accepted.insert(tag, what);
                    }
                    next_lba += blocks as u64;
                    tag += 1;
                    bufs.push(b);
                }
                4 | 5 => { c.poll(&mut on); }
                6 => dev.faults(|f| f.swallow_io += 1),
                7 => dev.advance(20_000_000),
                8 => {
                    dev.vanish(if i % 2 == 0 { Vanish::AllOnes } else { Vanish::Zeros });
                    c.fail_all(NvmeError::Gone, &mut |x| on(Event::Io(x)));
                }
                _ => dev.faults(|f| f.hold_io = !f.hold_io),
            }
        }
        // Drain: release, poll, let everything time out, poll again.
        let mut on = |e: Event| if let Event::Io(x) = e { done.entry(x.tag).or_default().push(x.result) };
        dev.release_held();
        c.poll(&mut on);
        dev.advance(61_000_000);
        c.poll(&mut on);
        c.fail_all(NvmeError::Aborted, &mut |x| on(Event::Io(x)));
        prop_assert_eq!(c.outstanding(), 0);
        for (t, &(lba, blocks)) in &accepted {
            let n = done.get(t).map(|v| v.len()).unwrap_or(0);
            prop_assert_eq!(n, 1, "tag {} completed {} times", t, n);
            if lba != u64::MAX && done[t][0].is_ok() {
                prop_assert_eq!(dev.media_read(1, lba, blocks as u64).unwrap(),
                                pattern(blocks as usize * 512, *t));
            }
        }
        for t in done.keys() {
            prop_assert!(accepted.contains_key(t), "completion for a tag never accepted: {}", t);
        }
    }
}
