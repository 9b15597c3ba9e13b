//! Host tests of the I/O path (`d_strategy` → busdma → engine → interrupt → `biodone`) against
//! the recording fake kernel and the fake NVMe model: nothing is allocated per bio (nor under
//! queue pressure).
//!
//! On the shipped .ko now: nvme(4)'s payload tag, the loads under the controller mutex,
//! DISKFLAG_UNMAPPED_BIO, a full queue queueing bios (a cache flush among them) and restarting
//! them on completion, a failed load giving its tracker back, unmapped bios moving their
//! scattered pages' data (kldhost/tests/busdma.rs), and the
//! queued bios failed with
//! ENXIO exactly once before the interrupt's teardown (kldhost/tests/acpi.rs, `--in-flight`).

use super::bindings;
use super::ctrl::CtrlRef;
use super::fake_kernel::{self as fk, Knobs};
use super::fake_nvme::FakeNvme;
use super::glue_tests::{attached_with, positions, SERIAL};
use super::kernel::FreeBsdKernel;
use crate::hotplug::teardown::{teardown, Removal};
use std::vec::Vec;

/// A bio for our first disk, with `buf` as its data, not yet started.
fn bio_for(cmd: u32, offset: i64, buf: &mut [u8]) -> *mut bindings::bio {
    let bp = fk::new_bio(cmd as u16, offset, buf.len() as i64);
    // SAFETY: a fresh fake bio; the disk is our live disk; `buf` outlives the bio's use.
    unsafe {
        (*bp).bio_disk = fk::disks()[0];
        (*bp).bio_data = buf.as_mut_ptr().cast();
    }
    bp
}

/// Calls `d_strategy` of the bio's disk (without allocating: the tests count allocations).
fn start(bp: *mut bindings::bio) {
    // SAFETY: a bio of our live disk, handed over once.
    unsafe { ((*(*bp).bio_disk).d_strategy.unwrap())(bp) }
}

fn error_of(bp: *mut bindings::bio) -> i32 {
    // SAFETY: a fake bio, leaked for the test's duration.
    unsafe { (*bp).bio_error }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(131)) as u8).collect()
}

/// How many requests the controller's I/O queues hold at once (a ring of N entries holds
/// N-1 commands): one tracker each.
fn queue_depth(ctrl: CtrlRef) -> usize {
    let st = ctrl.state().lock();
    let i = st.engine().info().expect("brought up");
    (usize::from(i.io_entries) - 1) * usize::from(i.io_queues)
}

/// After attach, reads and writes of every size up to 128 KiB, at buffer offsets that give
/// PRP1 an offset and need a PRP list, go through d_strategy → busdma → engine → interrupt →
/// biodone without a single allocation (Rust heap, malloc, contigmalloc, busdma map or tag);
/// every bio is completed once, writes are on the media and reads return them. Before the
/// busdma path, every bio contigmalloc'ed a bounce buffer (and freed it).
#[test]
fn steady_state_io_allocates_nothing_per_bio() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(Knobs { rman_size: 0x4000, pci_vendor: 0x1b36, d_gone_at_once: true, ..Knobs::default() });
    fk::install_nvme(FakeNvme::new(false, false));
    let mut k = FreeBsdKernel::new();
    let (live, _ctrl) = attached_with(&mut k, &[1], true);

    // Everything the test itself needs is allocated before the measurement.
    let sizes = [512usize, 4096, 4096 + 512, 3 * 4096, 64 * 1024, 128 * 1024 - 512, 128 * 1024];
    let offsets = [0usize, 512, 4096 - 512, 1024];
    let mut cases = Vec::new();
    let mut lba = 0i64;
    for (i, &n) in sizes.iter().enumerate() {
        let off = offsets[i % offsets.len()];
        let mut w = std::vec![0u8; off + n];
        w[off..].copy_from_slice(&pattern(i, n));
        let r = std::vec![0u8; off + n];
        cases.push((lba, off, n, w, r));
        lba += (n / 512) as i64 + 8;
    }
    let mut bios = Vec::new();
    for (lba, off, n, w, r) in cases.iter_mut() {
        let wb = bio_for(bindings::BIO_WRITE as u32, *lba * 512, &mut w[*off..*off + *n]);
        let rb = bio_for(bindings::BIO_READ as u32, *lba * 512, &mut r[*off..*off + *n]);
        bios.push((wb, rb));
    }

    let before = fk::allocations();
    for &(wb, rb) in &bios {
        start(wb);
        fk::fire_interrupt();
        start(rb);
        fk::fire_interrupt();
    }
    let allocated = fk::allocations() - before;
    assert_eq!(allocated, 0, "allocations on the I/O path for {} bios", bios.len() * 2);

    for (i, ((lba, off, n, w, r), &(wb, rb))) in cases.iter().zip(&bios).enumerate() {
        assert_eq!((fk::biodone_count(wb), error_of(wb)), (1, 0), "write {i}");
        assert_eq!((fk::biodone_count(rb), error_of(rb)), (1, 0), "read {i}");
        assert_eq!(&r[*off..], &w[*off..], "read {i} returns what write {i} wrote");
        let first_block = fk::with_nvme(|d| d.media_block(*lba as u64));
        assert_eq!(&first_block[..], &w[*off..*off + 512], "write {i} is on the media");
        let _ = n;
    }
    let log = fk::log();
    assert!(positions(&log, "bus_dmamap_load_bio").len() >= bios.len() * 2);
    assert!(log.iter().filter(|l| l.starts_with("bus_dmamap_load_bio")).all(|l| l.contains("error=0")));
    let _ = teardown(live, &mut k, Removal::Surprise);
}

/// A seeded mix of reads and writes of 512 B to 128 KiB at buffer offsets, submitted while
/// the device holds commands and completes them in bursts, so the queue fills, bios wait and
/// restart: every bio completes exactly once and successfully, every write is on the media,
/// every read returns the media, and the whole run allocates nothing.
#[test]
fn a_random_mix_under_queue_pressure_completes_every_bio_once_without_allocating() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fk::reset(Knobs { rman_size: 0x4000, pci_vendor: 0x1b36, d_gone_at_once: true, ..Knobs::default() });
    fk::install_nvme(FakeNvme::new(false, true));
    let mut k = FreeBsdKernel::new();
    let (live, ctrl) = attached_with(&mut k, &[1], true);
    let depth = queue_depth(ctrl);

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Each bio has its own 128 KiB region of the media: writes never overlap, reads target
    // regions nobody writes (the media's fill byte) or regions written before the run.
    let count = 3 * depth;
    let mut plan = Vec::new();
    for i in 0..count {
        let write = next(3) != 0;
        let blocks = 1 + next(256) as usize;
        let off = 512 * next(8) as usize;
        plan.push((write, (i * 256) as i64, blocks * 512, off));
    }
    let mut bufs: Vec<Vec<u8>> = plan.iter().enumerate().map(|(i, &(w, _, n, off))| {
        let mut b = std::vec![0u8; off + n];
        if w {
            b[off..].copy_from_slice(&pattern(i + 100, n));
        }
        b
    }).collect();
    let bios: Vec<_> = bufs
        .iter_mut()
        .zip(&plan)
        .map(|(b, &(w, lba, n, off))| {
            let cmd = if w { bindings::BIO_WRITE } else { bindings::BIO_READ };
            bio_for(cmd as u32, lba * 512, &mut b[off..off + n])
        })
        .collect();
    // Phases of pressure (no completions until more bios than trackers were sent) alternate
    // with phases of churn (completions in random bursts).
    let phase = depth + 7;
    let bursts: Vec<bool> = (0..count).map(|i| i % phase == phase - 1 || ((i / phase) % 2 == 1 && next(6) == 0)).collect();

    let t = fk::log().len();
    let before = fk::allocations();
    for (&bp, &burst) in bios.iter().zip(&bursts) {
        start(bp);
        if burst {
            fk::with_nvme(|d| d.release_held());
            fk::fire_interrupt();
        }
    }
    for _ in 0..count {
        if bios.iter().all(|&bp| fk::biodone_count(bp) == 1) {
            break;
        }
        fk::with_nvme(|d| d.release_held());
        fk::fire_interrupt();
    }
    assert_eq!(fk::allocations() - before, 0, "allocations during the run");
    assert!(!positions(&fk::log()[t..], "bioq_insert_tail").is_empty(), "the queue filled at least once");

    for (i, (&bp, &(w, lba, n, off))) in bios.iter().zip(&plan).enumerate() {
        assert_eq!((fk::biodone_count(bp), error_of(bp)), (1, 0), "bio {i}");
        for b in (0..n / 512).step_by(37).chain([n / 512 - 1]) {
            let block = fk::with_nvme(|d| d.media_block(lba as u64 + b as u64));
            let got = &bufs[i][off + b * 512..off + b * 512 + 512];
            if w {
                assert_eq!(&block[..], got, "write {i} block {b} on the media");
            } else {
                assert!(got.iter().all(|&x| x == 0xab), "read {i} block {b} returned the media");
            }
        }
    }
    let _ = teardown(live, &mut k, Removal::Surprise);
}
