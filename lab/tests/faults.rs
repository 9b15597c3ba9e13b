//! Fault injection against QEMU's real NVMe and PIIX4 ACPI hotplug models:
//! - surprise removal right before *every* device access of a bring-up, in both flavours
//!   (QEMU's zero reads and real PCIe's all-ones), driven directly through the engine and the
//!   lab platform, with the FreeBSD-rules model judging each teardown;
//! - the same sweep through the runner (the kernel's real path: GPE, Notify 1, hotplug state
//!   machine, driver attach);
//! - seeded random removal points under write load, announced and surprise;
//! - notify storms, an eject request for an empty slot, and an eject refused while a node is
//!   open, then retried after close;
//! - and that each of those checks can fail.

mod common;

use std::time::Duration;

use common::spec;
use kpimodel::DriverEvents;
use nvme_hotplug::nvme::{Controller, Health, NvmeError};
use nvmehp_lab::access_faults::RemovalReads;
use nvmehp_lab::driver::lab_config;
use nvmehp_lab::machine::Machine;
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::runner::Runner;
use nvmehp_lab::scenario::Scenario;
use nvmehp_lab::skip::qemu_or_skip;

const SLOT: u8 = 6;

/// One bring-up of a fresh controller in `SLOT`, with a surprise removal armed before access
/// `at` (or none). Returns (bring-up result, accesses made, whether the removal fired).
/// Afterwards the controller is torn down the way the driver does (fail everything, shut
/// down, free) with the FreeBSD model watching, and the slot is emptied.
fn one_bring_up(m: &mut Machine, model: &mut DriverEvents, gen: u64, at: Option<u64>) -> (Result<(), NvmeError>, u64, bool) {
    let id = format!("c{gen}");
    let dma0 = m.guest().live_dma_bytes();
    m.hot_add(&spec(&id, SLOT, &[(1, 4, 512)])).expect("hot-add");
    // The GPE of the hot-add is the harness's business here: the test plays the driver.
    let _ = common::wait_notify(m);
    let f = m.probe(SLOT).expect("probe").expect("function present after hot-add");
    if let Some(n) = at {
        m.arm_removal(SLOT, n);
    }
    let mut c = Controller::new(m.platform(&f), lab_config());
    let r = c.bring_up();
    let accesses = c.platform().faults().accesses();
    let fired = c.platform().faults().fired();
    if r.is_ok() {
        model.controller_attached(&id, SLOT);
        model.node_created(&id, 1);
        // A removal after the last read of bring-up is noticed by the watchdog's next look.
        if fired {
            assert_ne!(c.check_health(), Health::Healthy, "gen {gen}: removal before access {at:?} never noticed");
        }
        model.detach_started(&id, fired, 0);
        model.node_destroyed(&id, 1);
    }
    let mut completed = 0;
    c.fail_all(NvmeError::Gone, &mut |_| completed += 1);
    assert_eq!(completed, 0, "no I/O was submitted");
    let _ = c.shutdown();
    drop(c);
    if r.is_ok() {
        model.controller_freed(&id);
    }
    assert_eq!(m.guest().live_dma_bytes(), dma0, "gen {gen}, removal before access {at:?}: DMA memory leaked");
    if fired {
        m.sync_injected_removals();
    } else {
        m.eject(SLOT).expect("eject");
    }
    assert!(!m.slot_present(SLOT).unwrap(), "slot empty after the removal");
    m.reap(Duration::from_secs(2)).expect("reap");
    (r, accesses, fired)
}

fn sweep(reads: RemovalReads) {
    let mut m = Machine::start(MachineKind::Pc, &[]).expect("QEMU starts");
    m.set_removal_reads(reads);
    let mut model = DriverEvents::new();
    let mut gen = 0;
    // Count the device accesses of one clean bring-up through the lab platform.
    let (r, count, fired) = one_bring_up(&mut m, &mut model, gen, None);
    assert_eq!(r, Ok(()), "clean bring-up");
    assert!(!fired);
    assert!(count >= 10, "a bring-up reads CAP, VS, CSTS and rings doorbells: only {count} accesses?");
    // Then remove the device before each access in turn. The count can differ slightly from
    // run to run (the ready wait polls CSTS), so go on until a bring-up finishes untouched.
    let (mut errors, mut late) = (0, 0);
    let mut n = 0;
    loop {
        gen += 1;
        let (r, accesses, fired) = one_bring_up(&mut m, &mut model, gen, Some(n));
        if !fired {
            assert_eq!(r, Ok(()), "{reads:?}: no removal, yet bring-up failed");
            assert!(n >= accesses, "{reads:?}: the removal before access {n} did not fire in {accesses} accesses");
            break;
        }
        match r {
            Err(e) => {
                assert!(
                    matches!(e, NvmeError::Gone | NvmeError::Timeout | NvmeError::BadDevice(_) | NvmeError::NotReady),
                    "{reads:?}: removal before access {n}: unexpected error {e:?}"
                );
                errors += 1;
            }
            // Removed after the last read: the watchdog noticed (asserted above).
            Ok(()) => late += 1,
        }
        n += 1;
        assert!(n < 10_000, "{reads:?}: bring-up never finished before the removal point");
    }
    assert!(errors >= count / 2, "{reads:?}: most removal points must fail bring-up ({errors} of {n})");
    eprintln!("{reads:?}: bring-up = {count} device accesses; removal before each of {n}: {errors} errors, {late} noticed after");
    model.module_unloaded();
    let rep = model.report();
    assert!(rep.is_clean(), "FreeBSD model: {}", rep.to_json());
    assert_eq!(m.guest().fault(), None);
}

#[test]
fn surprise_removal_at_every_bring_up_access_zero_reads() {
    if qemu_or_skip("surprise_removal_at_every_bring_up_access_zero_reads") {
        sweep(RemovalReads::Zeros);
    }
}

#[test]
fn surprise_removal_at_every_bring_up_access_all_ones_reads() {
    if qemu_or_skip("surprise_removal_at_every_bring_up_access_all_ones_reads") {
        sweep(RemovalReads::AllOnes);
    }
}

/// The all-ones wrapper really answers all-ones: a removed controller's CSTS and vendor ID.
#[test]
fn all_ones_flavour_reads_all_ones_and_zero_flavour_reads_zero() {
    if !qemu_or_skip("all_ones_flavour_reads_all_ones_and_zero_flavour_reads_zero") {
        return;
    }
    use nvme_hotplug::platform::{PciPresence, RegisterIo};
    for (reads, csts) in [(RemovalReads::Zeros, 0u32), (RemovalReads::AllOnes, 0xffff_ffff)] {
        let mut m = Machine::start(MachineKind::Pc, &[spec("c0", 4, &[(1, 4, 512)])]).unwrap();
        m.set_removal_reads(reads);
        let (_, f) = m.scan().unwrap().remove(0);
        let p = m.platform(&f);
        assert_eq!(p.read32(0x08), 0x0001_0400, "VS of QEMU's NVMe 1.4 while present");
        m.eject(4).unwrap();
        assert_eq!(p.read32(0x1c), csts, "{reads:?}: CSTS after removal");
        assert_eq!(p.vendor_id(), 0xffff, "{reads:?}: config space after removal");
    }
}

fn run(text: &str) -> nvmehp_lab::report::Report {
    let r = Runner::new(Scenario::parse(text).expect("scenario parses")).run();
    eprintln!("{}", r.summary());
    r
}

fn assert_clean(r: &nvmehp_lab::report::Report) {
    assert!(r.ok, "{}", r.summary());
    assert_eq!(r.lost_writes + r.hung_ops + r.panics + r.leaked_bytes, 0);
    assert_eq!(r.nodes_left, 0);
    let k = r.kernel.as_ref().expect("FreeBSD model");
    assert!(k.violations.is_empty() && k.nodes_left.is_empty() && k.leaked_bytes == 0, "{k:?}");
}

#[test]
fn bring_up_sweep_through_the_kernel_path() {
    if !qemu_or_skip("bring_up_sweep_through_the_kernel_path") {
        return;
    }
    let r = run("name = 'sweep'\n[[step]]\nop = 'bringup-removal-sweep'\nslot = 6\nreads = 'both'\n");
    assert_clean(&r);
    assert!(r.removals.during_bring_up >= 20, "{:?}", r.removals);
    assert!(r.hotplug.failures >= r.removals.during_bring_up / 2, "failed rescans were reported: {:?}", r.hotplug);
}

/// Seeded random removal points under write load, both kinds of removal.
#[test]
fn seeded_random_removals_under_write_load() {
    if !qemu_or_skip("seeded_random_removals_under_write_load") {
        return;
    }
    for (seed, reads) in [(1u64, "zeros"), (2, "all-ones"), (3, "zeros")] {
        let r = run(&format!(
            "name = 'random-{seed}'\nseed = {seed}\nremoval_reads = '{reads}'\n\
             [[step]]\nop = 'repeat'\ntimes = 12\nsteps = [\n\
             {{ op = 'attach', id = 'r', slot = 6, namespaces = [{{ nsid = 1, size_mib = 8, lba = 512 }}] }},\n\
             {{ op = 'io', target = 'r/1', kind = 'write-verify', ops = 300, depth = 16, block = 4096, background = true }},\n\
             {{ op = 'detach', id = 'r', mode = 'random', during_io = true, jitter_ms = 10 }} ]\n"
        ));
        assert_clean(&r);
        assert_eq!(r.removals.announced + r.removals.surprise, 12);
        assert!(r.removals.announced > 0 && r.removals.surprise > 0, "seed {seed}: both kinds: {:?}", r.removals);
        assert_eq!(r.removals.with_io_in_flight, 12, "every removal interrupted I/O: {:?}", r.removals);
        assert!(r.acked_writes > 0);
    }
}

const TWO: &str = "name = 'busy'\n[[controller]]\nid = 'c0'\nslot = 4\nnamespaces = [{ nsid = 1, size_mib = 8 }]\n";

/// An eject request with the node open and I/O in flight is refused (no `_EJ0`), the
/// controller keeps working, and the platform's retry after close ejects it.
#[test]
fn eject_refused_while_open_then_retry_succeeds() {
    if !qemu_or_skip("eject_refused_while_open_then_retry_succeeds") {
        return;
    }
    for (refuse, ost) in [("in-use", "in-use"), ("busy", "busy")] {
        let r = run(&format!(
            "{TWO}[[step]]\nop = 'open'\ntarget = 'c0/1'\nrefuse = '{refuse}'\n\
             [[step]]\nop = 'io'\ntarget = 'c0/1'\nkind = 'mixed'\nops = 400\ndepth = 16\nbackground = true\n\
             [[step]]\nop = 'detach'\nid = 'c0'\nmode = 'announced'\nduring_io = true\nrefused = true\n\
             [[step]]\nop = 'notify'\nslot = 4\ncode = 3\ntimes = 10\nexpect_ost = '{ost}'\n\
             [[step]]\nop = 'io'\ntarget = 'c0/1'\nkind = 'write-verify'\nops = 50\n\
             [[step]]\nop = 'close'\ntarget = 'c0/1'\n\
             [[step]]\nop = 'notify'\nslot = 4\ncode = 3\nexpect_ost = 'success'\n\
             [[step]]\nop = 'expect'\ncontrollers = 0\nnodes = 0\n"
        ));
        assert_clean(&r);
        assert_eq!(r.hotplug.refused, 2, "{:?}", r.hotplug);
        assert_eq!(r.hotplug.ejects, 1, "one _EJ0, after the close: {:?}", r.hotplug);
    }
}

/// The refusal check can fail: with nothing open the eject goes ahead, and a step that
/// expected a refusal reports it.
#[test]
fn expected_refusal_without_an_open_node_fails_the_run() {
    if !qemu_or_skip("expected_refusal_without_an_open_node_fails_the_run") {
        return;
    }
    let r = run(&format!("{TWO}[[step]]\nop = 'detach'\nid = 'c0'\nmode = 'announced'\nrefused = true\n"));
    assert!(!r.ok);
    assert!(r.violations.iter().any(|v| v.contains("not in-use/busy")), "{:?}", r.violations);
    assert!(r.violations.iter().any(|v| v.contains("_EJ0 evaluated")), "{:?}", r.violations);
}

/// Notify 3 for an empty slot: one `_OST` failure, nothing detached, no `_EJ0`; 100 Notify 1
/// for a freshly plugged device: one rescan.
#[test]
fn notify_storms_are_coalesced() {
    if !qemu_or_skip("notify_storms_are_coalesced") {
        return;
    }
    let r = run(&format!(
        "{TWO}[[step]]\nop = 'notify'\nslot = 9\ncode = 3\ntimes = 100\nexpect_ost = 'failure'\n\
         [[step]]\nop = 'attach'\nid = 'c1'\nslot = 6\nnamespaces = [{{ nsid = 1, size_mib = 4 }}]\nwait = false\n\
         [[step]]\nop = 'notify'\nslot = 6\ncode = 1\ntimes = 100\nexpect_ost = 'success'\nexpect_rescans = 1\n\
         [[step]]\nop = 'expect'\ncontrollers = 2\nnodes = 2\n"
    ));
    assert_clean(&r);
    assert_eq!(r.hotplug.rescans, 1);
    assert_eq!(r.hotplug.ejects, 0);
    assert_eq!(r.hotplug.detaches, 0);
    assert!(r.hotplug.notifies >= 200);
}

/// The coalescing check can fail: an empty-slot eject request answered "success" is wrong.
#[test]
fn wrong_ost_expectation_fails_the_run() {
    if !qemu_or_skip("wrong_ost_expectation_fails_the_run") {
        return;
    }
    let r = run(&format!("{TWO}[[step]]\nop = 'notify'\nslot = 9\ncode = 3\nexpect_ost = 'success'\n"));
    assert!(!r.ok);
    assert!(r.violations.iter().any(|v| v.contains("NonSpecificFailure")), "{:?}", r.violations);
}

/// A surprise removal of a mounted namespace tears down at once; the disk's context lives
/// until the consumer's last close (d_gone), and a node left open at the end fails the run.
#[test]
fn surprise_removal_of_an_open_node_then_last_close() {
    if !qemu_or_skip("surprise_removal_of_an_open_node_then_last_close") {
        return;
    }
    let body = format!(
        "{TWO}[[step]]\nop = 'open'\ntarget = 'c0/1'\n\
         [[step]]\nop = 'io'\ntarget = 'c0/1'\nkind = 'write-verify'\nops = 400\ndepth = 16\nbackground = true\n\
         [[step]]\nop = 'detach'\nid = 'c0'\nmode = 'surprise'\nduring_io = true\n\
         [[step]]\nop = 'expect'\ncontrollers = 0\nnodes = 0\n"
    );
    let r = run(&format!("{body}[[step]]\nop = 'close'\ntarget = 'c0/1'\n"));
    assert_clean(&r);
    let r = run(&body);
    assert!(!r.ok, "a node still open at unload must fail the run");
    assert!(r.violations.iter().any(|v| v.contains("still open at the end")), "{:?}", r.violations);
}

/// Surprise removal right before every device access of an *announced* detach with writes in
/// flight (the device vanishes while the driver is draining, shutting it down, disabling it):
/// every request completes exactly once, every write reported done is in the image file, and
/// all DMA memory comes back. Both removal flavours.
#[test]
fn surprise_removal_at_every_access_of_an_announced_detach() {
    if !qemu_or_skip("surprise_removal_at_every_access_of_an_announced_detach") {
        return;
    }
    use common::{image, pattern_buf, read_image, req};
    use nvme_hotplug::nvme::{Event, IoOp};
    const WRITES: u64 = 8;
    for reads in [RemovalReads::Zeros, RemovalReads::AllOnes] {
        let mut m = Machine::start(MachineKind::Pc, &[]).expect("QEMU starts");
        m.set_removal_reads(reads);
        let mut n = 0u64;
        let mut removed_at = 0;
        loop {
            let dma0 = m.guest().live_dma_bytes();
            m.hot_add(&spec(&format!("d{n}"), SLOT, &[(1, 4, 512)])).expect("hot-add");
            let _ = common::wait_notify(&mut m);
            let f = m.probe(SLOT).unwrap().expect("present");
            let img = image(&m, SLOT, 1);
            let mut c = Controller::new(m.platform(&f), lab_config());
            c.bring_up().expect("bring-up");
            let mut bufs = Vec::new();
            for tag in 0..WRITES {
                let (buf, data) = pattern_buf(&c, 4096, (n as u8).wrapping_mul(7).wrapping_add(tag as u8));
                c.submit(req(IoOp::Write, 1, tag * 8, 8, &buf, tag)).expect("accepted");
                bufs.push((buf, data));
            }
            // The removal lands before access n of the detach (counted from here).
            let faults = c.platform().faults().clone();
            faults.arm(faults.accesses() + n);
            // The driver's announced detach: drain (bounded), fail the rest, shut down, free.
            let mut done = vec![None; WRITES as usize];
            let mut record = |tag: u64, ok: bool| {
                assert!(done[tag as usize].is_none(), "{reads:?} n={n}: request {tag} completed twice");
                done[tag as usize] = Some(ok);
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut lost = false;
            while c.outstanding() > 0 && !lost && std::time::Instant::now() < deadline {
                c.poll(&mut |e| match e {
                    Event::Io(x) => record(x.tag, x.result.is_ok()),
                    Event::ControllerLost { .. } => lost = true,
                    _ => {}
                });
            }
            c.fail_all(NvmeError::Aborted, &mut |x| record(x.tag, x.result.is_ok()));
            let shut = c.shutdown();
            drop(c);
            let fired = faults.fired();
            if !fired {
                assert_eq!(shut, Ok(()), "{reads:?}: shutdown of a present controller");
            }
            assert!(done.iter().all(|d| d.is_some()), "{reads:?} n={n}: a request never completed: {done:?}");
            for (tag, (_, data)) in bufs.iter().enumerate() {
                if done[tag] == Some(true) {
                    assert_eq!(&read_image(&img, tag as u64 * 8 * 512, 4096), data, "{reads:?} n={n}: acked write {tag} not on the media");
                }
            }
            drop(bufs);
            assert_eq!(m.guest().live_dma_bytes(), dma0, "{reads:?} n={n}: DMA memory leaked");
            if fired {
                removed_at += 1;
                m.sync_injected_removals();
            } else {
                m.eject(SLOT).unwrap();
            }
            m.reap(Duration::from_secs(2)).unwrap();
            if !fired {
                break;
            }
            n += 1;
            assert!(n < 10_000, "the detach never finished before the removal point");
        }
        assert!(removed_at >= 5, "{reads:?}: a detach makes more than {removed_at} device accesses");
        eprintln!("{reads:?}: removal before each of the {removed_at} device accesses of an announced detach");
        assert_eq!(m.guest().fault(), None);
    }
}
