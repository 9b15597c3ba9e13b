//! 4 KiB write + read round trips through the engine, against a bare-ring baseline that does
//! the same SQ/CQ ring handling (SQE write, tail doorbell, phase poll, head doorbell) with no
//! engine logic, on the same software controller in the same run. Prints figures and the
//! ratio; asserts nothing about time.
//!
//! Run: `cargo bench -p softnvme` (iterations: `SOFTNVME_BENCH_ITERS`, default 20000).
//!
//! Instruction counts (steadier than time on a shared machine): when `valgrind` is installed
//! the bench re-runs itself under `valgrind --tool=callgrind` per variant
//! (`SOFTNVME_BENCH_ONLY=bare|engine|sync`) at two iteration counts, and divides the
//! difference in collected instructions by the difference in iterations, which cancels the
//! set-up cost. Without valgrind it says so and prints the time figures only.

use std::hint::black_box;
use std::time::Instant;

use nvme_hotplug::nvme::{Config, Controller, DataBuf, IoOp, IoRequest};
use nvme_hotplug::platform::{DmaAllocator, DmaRegion, RegisterIo};
use softnvme::{SoftConfig, SoftNvme, SoftRegion};

fn rounds() -> usize {
    if std::env::var("SOFTNVME_BENCH_ONLY").is_ok() {
        1
    } else {
        7
    }
}

fn enabled(which: &str) -> bool {
    std::env::var("SOFTNVME_BENCH_ONLY").map_or(true, |v| v == which)
}

fn device() -> SoftNvme {
    SoftNvme::new(SoftConfig {
        namespaces: vec![(1, 12, 1 << 16)],
        ..SoftConfig::default()
    })
}

/// The minimum a driver must do per command, hand-rolled.
struct BareRing {
    dev: SoftNvme,
    sq: SoftRegion,
    cq: SoftRegion,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
    sq_db: u32,
    cq_db: u32,
}

impl BareRing {
    fn sqe(op: u8, cid: u16, nsid: u32, prp1: u64, cdw10: u32, cdw11: u32, cdw12: u32) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = op;
        b[2..4].copy_from_slice(&cid.to_le_bytes());
        b[4..8].copy_from_slice(&nsid.to_le_bytes());
        b[24..32].copy_from_slice(&prp1.to_le_bytes());
        b[40..44].copy_from_slice(&cdw10.to_le_bytes());
        b[44..48].copy_from_slice(&cdw11.to_le_bytes());
        b[48..52].copy_from_slice(&cdw12.to_le_bytes());
        b
    }

    /// Submits one entry and spins for its completion; returns the status field.
    fn run(&mut self, sqe: &[u8; 64]) -> u16 {
        self.sq.write(self.tail as usize * 64, sqe);
        self.tail = (self.tail + 1) % self.entries;
        self.dev.write32(self.sq_db, self.tail as u32);
        loop {
            let off = self.head as usize * 16;
            let dw3 = self.cq.read_u32(off + 12);
            if (dw3 >> 16) & 1 == self.phase as u32 {
                self.head += 1;
                if self.head == self.entries {
                    self.head = 0;
                    self.phase = !self.phase;
                }
                self.dev.write32(self.cq_db, self.head as u32);
                return (dw3 >> 16) as u16;
            }
        }
    }

    /// Raw bring-up: admin queue, enable, one I/O queue pair. No validation at all.
    fn new(dev: SoftNvme, entries: u16) -> (BareRing, BareRing) {
        let asq = dev.alloc_dma(64 * 32, 4096).unwrap();
        let acq = dev.alloc_dma(16 * 32, 4096).unwrap();
        dev.write32(0x14, 0);
        dev.write32(0x24, 31 << 16 | 31);
        dev.write64(0x28, asq.bus_addr());
        dev.write64(0x30, acq.bus_addr());
        dev.write32(0x14, 1 | 6 << 16 | 4 << 20);
        let mut admin = BareRing {
            dev: dev.clone(),
            sq: asq,
            cq: acq,
            entries: 32,
            tail: 0,
            head: 0,
            phase: true,
            sq_db: 0x1000,
            cq_db: 0x1004,
        };
        let q = entries as u32 - 1;
        assert_eq!(admin.run(&Self::sqe(0x09, 1, 0, 0, 7, 0, 0)) >> 1, 0);
        let sq = dev.alloc_dma(64 * entries as usize, 4096).unwrap();
        let cq = dev.alloc_dma(16 * entries as usize, 4096).unwrap();
        assert_eq!(
            admin.run(&Self::sqe(0x05, 2, 0, cq.bus_addr(), q << 16 | 1, 1, 0)) >> 1,
            0
        );
        assert_eq!(
            admin.run(&Self::sqe(
                0x01,
                3,
                0,
                sq.bus_addr(),
                q << 16 | 1,
                1 << 16 | 1,
                0
            )) >> 1,
            0
        );
        let io = BareRing {
            dev,
            sq,
            cq,
            entries,
            tail: 0,
            head: 0,
            phase: true,
            sq_db: 0x1008,
            cq_db: 0x100c,
        };
        (admin, io)
    }
}

fn per_op_ns(iters: u64, f: &mut dyn FnMut(u64)) -> (f64, f64) {
    let mut samples = Vec::new();
    for _ in 0..rounds() {
        let t = Instant::now();
        for i in 0..iters {
            f(i);
        }
        samples.push(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[0], samples[samples.len() / 2])
}

/// Instructions one variant executes at `iters` iterations, under callgrind.
fn callgrind_instructions(which: &str, iters: u64) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(exe)
        .env("SOFTNVME_BENCH_ONLY", which)
        .env("SOFTNVME_BENCH_ITERS", iters.to_string())
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("Collected :"))?;
    line.rsplit(':')
        .next()?
        .trim()
        .replace(',', "")
        .parse()
        .ok()
}

fn instruction_counts() {
    let (a, b) = (1000u64, 3000u64);
    let mut per = Vec::new();
    for which in ["bare", "engine", "sync"] {
        match (
            callgrind_instructions(which, a),
            callgrind_instructions(which, b),
        ) {
            (Some(x), Some(y)) if y > x => per.push((which, (y - x) as f64 / (b - a) as f64)),
            _ => {
                println!(
                    "SKIP instruction counts: valgrind --tool=callgrind not available or failed"
                );
                return;
            }
        }
    }
    println!("instructions per 4 KiB write+read round trip (callgrind, {a} vs {b} iterations):");
    let base = per[0].1;
    for (which, n) in &per {
        if *which == "bare" {
            println!("  {which:<8} {n:>9.0}");
        } else {
            println!("  {which:<8} {n:>9.0}   ratio {:.3}x  engine overhead {:.0} instructions ({:.0} per command)",
                     n / base, n - base, (n - base) / 2.0);
        }
    }
}

fn main() {
    let iters: u64 = std::env::var("SOFTNVME_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let lbas = 1u64 << 16;

    let mut out = Vec::new();
    if enabled("bare") {
        // Bare ring.
        let dev = device();
        let (_admin, mut ring) = BareRing::new(dev.clone(), 256);
        let buf = dev.buffer(4096);
        buf.write(0, &[0x5a; 4096]);
        let addr = buf.bus_addr();
        let (bare_min, bare_med) = per_op_ns(iters, &mut |i| {
            let lba = i % lbas;
            let cid = (i % 200) as u16;
            let w = BareRing::sqe(0x01, cid, 1, addr, lba as u32, (lba >> 32) as u32, 0);
            black_box(ring.run(&w));
            let r = BareRing::sqe(0x02, cid, 1, addr, lba as u32, (lba >> 32) as u32, 0);
            black_box(ring.run(&r));
        });
        out.push(("bare ring (no engine logic)", bare_min, bare_med));
    }

    let dev = device();
    let mut c = Controller::new(dev.clone(), Config::default());
    c.bring_up().unwrap();
    let buf = dev.buffer(4096);
    buf.write(0, &[0xa5; 4096]);
    let data = DataBuf {
        bus_addr: buf.bus_addr(),
        len: 4096,
    };
    let mut completions = 0u64;
    if enabled("engine") {
        let (eng_min, eng_med) = per_op_ns(iters, &mut |i| {
            let lba = i % lbas;
            for op in [IoOp::Write, IoOp::Read] {
                c.submit(IoRequest {
                    tag: i,
                    nsid: 1,
                    op,
                    lba,
                    blocks: 1,
                    data,
                })
                .unwrap();
                c.poll(&mut |e| {
                    if let nvme_hotplug::nvme::Event::Io(x) = e {
                        assert!(x.result.is_ok());
                        completions += 1;
                    }
                });
            }
        });
        assert_eq!(
            completions,
            2 * iters * rounds() as u64,
            "every request completed"
        );
        out.push(("engine submit + poll", eng_min, eng_med));
    }
    if enabled("sync") {
        let (sync_min, sync_med) = per_op_ns(iters, &mut |i| {
            let lba = i % lbas;
            c.io_sync(IoRequest {
                tag: i,
                nsid: 1,
                op: IoOp::Write,
                lba,
                blocks: 1,
                data,
            })
            .unwrap();
            c.io_sync(IoRequest {
                tag: i,
                nsid: 1,
                op: IoOp::Read,
                lba,
                blocks: 1,
                data,
            })
            .unwrap();
        });
        out.push(("engine io_sync", sync_min, sync_med));
    }

    println!("softnvme 4 KiB write+read round trip, {iters} iterations x {} rounds (min / median ns per round trip)", rounds());
    let base = out.iter().find(|o| o.0.starts_with("bare")).map(|o| o.1);
    for (name, min, med) in &out {
        match base {
            Some(b) if !name.starts_with("bare") => println!(
                "  {name:<30} {min:>9.0} / {med:>9.0}   ratio {:.2}x (min)  engine overhead {:.0} ns",
                min / b, min - b),
            _ => println!("  {name:<30} {min:>9.0} / {med:>9.0}"),
        }
    }
    println!(
        "  (all include the software controller's own work: fetch, PRP walk, 4 KiB copy, CQE post)"
    );
    if std::env::var("SOFTNVME_BENCH_ONLY").is_err() {
        instruction_counts();
    }
}
