//! Teardown time after a surprise removal with 1, 64 and 1,024 commands outstanding, on the
//! software controller: the device fetched every command and will never complete any
//! (`Faults::swallow_io`), then vanishes (all-ones reads like real PCIe, or zeros like QEMU).
//! Measured: the watchdog's health check that notices, `fail_all` completing every request,
//! `shutdown` and freeing the controller (DMA memory back), i.e. the driver's whole teardown
//! minus the kernel's node/disk calls. Figures printed, never asserted.
//!
//! Run: `cargo bench -p softnvme --bench teardown` (rounds: `SOFTNVME_TEARDOWN_ROUNDS`, default 30).

use std::time::Instant;

use nvme_hotplug::nvme::{Config, Controller, DataBuf, Health, IoOp, IoRequest, NvmeError};
use nvme_hotplug::platform::DmaRegion;
use softnvme::{SoftConfig, SoftNvme, Vanish};

/// One teardown of `n` never-completed requests; returns microseconds.
fn once(n: usize, style: Vanish) -> f64 {
    // 2,048-entry queues so that 1,024 requests fit in one I/O queue pair.
    let dev = SoftNvme::new(SoftConfig { max_entries: 2048, max_io_queues: 1, ..SoftConfig::default() });
    let mut c = Controller::new(dev.clone(), Config { io_entries: 2048, io_queues: 1, ..Config::default() });
    c.bring_up().expect("bring-up");
    dev.faults(|f| f.swallow_io = n as u32);
    let bufs: Vec<_> = (0..n).map(|_| dev.buffer(4096)).collect();
    for (t, b) in bufs.iter().enumerate() {
        let req = IoRequest {
            tag: t as u64,
            nsid: 1,
            op: IoOp::Write,
            lba: t as u64 * 8,
            blocks: 8,
            data: DataBuf { bus_addr: b.bus_addr(), len: 4096 },
        };
        c.submit(req).expect("accepted");
    }
    assert_eq!(c.outstanding(), n, "every request outstanding");
    dev.vanish(style);
    let t0 = Instant::now();
    assert_eq!(c.check_health(), Health::Gone);
    let mut done = 0;
    c.fail_all(NvmeError::Gone, &mut |_| done += 1);
    let _ = c.shutdown();
    drop(c);
    let us = t0.elapsed().as_secs_f64() * 1e6;
    assert_eq!(done, n, "every request completed once");
    drop(bufs);
    assert_eq!(dev.dma_bytes(), 0, "every DMA byte returned");
    us
}

fn main() {
    let rounds: usize = std::env::var("SOFTNVME_TEARDOWN_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    println!(
        "teardown after surprise removal, softnvme with commands that never complete (fetched, never answered); \
         health check + fail_all + shutdown + free, {rounds} rounds (min / median)"
    );
    for style in [Vanish::AllOnes, Vanish::Zeros] {
        for n in [1usize, 64, 1024] {
            let mut t: Vec<f64> = (0..rounds).map(|_| once(n, style)).collect();
            t.sort_by(f64::total_cmp);
            let (min, med) = (t[0], t[t.len() / 2]);
            println!(
                "  {:<9} {n:>5} outstanding: {min:>9.1} / {med:>9.1} us   ({:.0} ns per request, median)",
                format!("{style:?}"),
                med * 1e3 / n as f64
            );
        }
    }
}
