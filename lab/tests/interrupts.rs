//! The engine run interrupt-driven against QEMU's real NVMe, as the kld's ithread runs it:
//! MSI-X vector 0 written into guest RAM, or INTx intercepted at the I/O APIC; wait for the
//! interrupt (bounded), then poll. Includes negative controls (an MSI-X vector masked in its
//! vector control, INTx masked in INTMS) showing that no interrupt is then observed and that the
//! "completed by interrupts" checks can fail.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use nvme_hotplug::nvme::{Completion, Controller, Health, IoOp, NvmeError};
use nvme_hotplug::platform::DmaRegion;
use nvmehp_lab::acpi_hotplug::NotifyCode;
use nvmehp_lab::dma::GuestDma;
use nvmehp_lab::driver::lab_config;
use nvmehp_lab::interrupts::Interrupt;
use nvmehp_lab::irq_driven::{IrqDriven, IrqLoopError};
use nvmehp_lab::machine::Machine;
use nvmehp_lab::qemu::MachineKind;
use nvmehp_lab::skip::qemu_or_skip;

/// The data value of our MSI-X message: distinct from anything else that might land there.
const MSI_DATA: u32 = 0x4e56_4d45;
/// Long enough that a healthy controller on a loaded 2-core machine always completes first.
const WAIT: Duration = Duration::from_secs(5);
const SLOT: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Msix,
    Intx,
}

/// A pc machine with one controller in `SLOT`, its interrupt set up *before* bring-up (as
/// pci_alloc_msix(9) comes before the driver enables the controller: QEMU's NVMe binds a
/// completion queue to an MSI-X vector when the queue is created), then brought up.
fn setup(mode: Mode) -> (Machine, Ctrl, Interrupt) {
    let mut m = Machine::start(MachineKind::Pc, &[spec("c0", SLOT, &[(1, 8, 512)])]).expect("QEMU starts");
    let (_, f) = m.scan().expect("bus scan").into_iter().next().expect("controller found");
    let p = m.platform(&f);
    let irq = match mode {
        Mode::Msix => Interrupt::msix_to_ram(&p, MSI_DATA).expect("MSI-X set up"),
        Mode::Intx => Interrupt::intx(&p).expect("INTx set up"),
    };
    let mut c = Controller::new(p, lab_config());
    c.bring_up().expect("bring-up");
    // Bring-up's admin completions interrupted too: start from a quiet line.
    let mut n = 0;
    while irq.take().unwrap() {
        c.poll(&mut |_| {});
        n += 1;
        assert!(n < 100, "{mode:?}: interrupt never quietens after bring-up");
    }
    (m, c, irq)
}

fn collect(done: &mut Vec<Completion>) -> impl FnMut(Completion) + '_ {
    move |c| done.push(c)
}

#[test]
fn msix_to_ram_signals_an_io_completion() {
    if !qemu_or_skip("msix_to_ram_signals_an_io_completion") {
        return;
    }
    let (m, mut c, irq) = setup(Mode::Msix);
    assert_eq!(irq.gsi(), None);
    let (buf, data) = pattern_buf(&c, 4096, 7);
    c.submit(req(IoOp::Write, 1, 40, 8, &buf, 77)).unwrap();
    assert!(irq.wait(WAIT).unwrap(), "no MSI-X message in the mailbox after a write");
    assert_eq!(irq.stray(), 0, "the mailbox held exactly our data value");
    let mut done = Vec::new();
    assert_eq!(c.poll(&mut |e| if let nvme_hotplug::nvme::Event::Io(x) = e { done.push(x) }), 1);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].tag, done[0].result), (77, Ok(())));
    assert_eq!(read_image(&image(&m, SLOT, 1), 40 * 512, 4096), data);
    // The mailbox was cleared: nothing more until the next completion.
    assert!(!irq.take().unwrap());
    drop(irq);
    c.shutdown().unwrap();
}

#[test]
fn intx_signals_an_io_completion_and_the_sci_still_works() {
    if !qemu_or_skip("intx_signals_an_io_completion_and_the_sci_still_works") {
        return;
    }
    let (mut m, mut c, irq) = setup(Mode::Intx);
    // Slot 4, INTA: PIRQ (4 - 1 + 0) & 3 = D, which the firmware routes to 11.
    assert_eq!(irq.gsi(), Some(11));
    assert!(!irq.take().unwrap(), "INTx low while nothing is pending");
    let (buf, data) = pattern_buf(&c, 4096, 9);
    c.submit(req(IoOp::Write, 1, 80, 8, &buf, 5)).unwrap();
    assert!(irq.wait(WAIT).unwrap(), "INTx never raised after a write");
    // Level-triggered: still up until the engine's poll moves the CQ head doorbell.
    assert!(irq.take().unwrap(), "INTx dropped before the completion was reaped");
    let mut done = Vec::new();
    let mut lp = IrqDriven::new(irq, WAIT);
    lp.service(&mut c, &mut collect(&mut done)).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].tag, done[0].result), (5, Ok(())));
    assert!(!lp.interrupt().take().unwrap(), "INTx lowered by the CQ head doorbell");
    assert_eq!(read_image(&image(&m, SLOT, 1), 80 * 512, 4096), data);
    // The ACPI path shares the interception: a hot-add still raises the SCI (GSI 9).
    m.hot_add(&spec("c1", 6, &[(1, 8, 512)])).unwrap();
    expect_notify(&mut m, 6, NotifyCode::DeviceCheck);
    c.shutdown().unwrap();
}

/// Writes then reads back `ops` 4 KiB blocks, keeping `depth` in flight, reaping only through
/// the interrupt loop; returns the loop's figures.
fn depth_run(mode: Mode, ops: u64, depth: usize) -> nvmehp_lab::irq_driven::IrqStats {
    let (m, mut c, irq) = setup(mode);
    let mut lp = IrqDriven::new(irq, WAIT);
    let bufs: Vec<GuestDma> = (0..depth).map(|k| pattern_buf(&c, 4096, k as u8).0).collect();
    let pattern = |i: u64| -> Vec<u8> { (0..4096u64).map(|b| (b.wrapping_mul(7) ^ i.wrapping_mul(13)) as u8).collect() };
    for op in [IoOp::Write, IoOp::Read] {
        let mut next = 0u64;
        let mut busy: BTreeMap<u64, usize> = BTreeMap::new(); // tag (= block index) -> buffer
        let mut free: Vec<usize> = (0..depth).collect();
        let mut finished = 0u64;
        while finished < ops {
            while next < ops {
                let Some(b) = free.pop() else { break };
                if op == IoOp::Write {
                    bufs[b].write(0, &pattern(next));
                } else {
                    bufs[b].fill(0xee);
                }
                c.submit(req(op, 1, next * 8, 8, &bufs[b], next)).expect("submit");
                busy.insert(next, b);
                next += 1;
            }
            let mut done = Vec::new();
            let lost = lp.service(&mut c, &mut collect(&mut done)).expect("harness");
            assert_eq!(lost, None, "{mode:?}: controller lost during a healthy run");
            for d in done {
                assert_eq!(d.result, Ok(()), "{mode:?} {op:?} tag {}", d.tag);
                let b = busy.remove(&d.tag).expect("completed once, and only what was submitted");
                if op == IoOp::Read {
                    let mut back = vec![0u8; 4096];
                    bufs[b].read(0, &mut back);
                    assert!(back == pattern(d.tag), "{mode:?}: block {} read back intact", d.tag);
                }
                free.push(b);
                finished += 1;
            }
        }
        assert!(busy.is_empty());
    }
    let img = read_image(&image(&m, SLOT, 1), 0, (ops * 4096) as usize);
    for i in 0..ops {
        assert!(img[(i * 4096) as usize..][..4096] == pattern(i)[..], "{mode:?}: block {i} on the image");
    }
    assert_eq!(lp.interrupt().stray(), 0);
    let stats = lp.stats();
    drop(lp);
    c.shutdown().unwrap();
    stats
}

#[test]
fn write_read_verify_depth_8_driven_only_by_interrupts() {
    if !qemu_or_skip("write_read_verify_depth_8_driven_only_by_interrupts") {
        return;
    }
    for mode in [Mode::Msix, Mode::Intx] {
        let s = depth_run(mode, 160, 8);
        eprintln!("{mode:?}: {s:?}");
        // 320 operations, every one reaped by a poll that an interrupt triggered.
        assert_eq!(s.reaped_by_irq, 320, "{mode:?}: {s:?}");
        assert_eq!(s.reaped_without_irq, 0, "{mode:?}: {s:?}");
        assert!(s.interrupts > 0 && s.interrupts <= 320 + s.empty_polls, "{mode:?}: {s:?}");
    }
}

#[test]
fn surprise_removal_while_waiting_for_interrupts_completes_everything_once() {
    if !qemu_or_skip("surprise_removal_while_waiting_for_interrupts_completes_everything_once") {
        return;
    }
    for mode in [Mode::Msix, Mode::Intx] {
        let (mut m, mut c, irq) = setup(mode);
        // Short waits: a removed device never interrupts, the timeout is what notices.
        let mut lp = IrqDriven::new(irq, Duration::from_millis(300));
        let bufs: Vec<GuestDma> = (0..8).map(|k| pattern_buf(&c, 4096, k).0).collect();
        // The first submit shows how many device accesses a submit makes; the slot's eject
        // register is then pulled (no device_del: a surprise) right before the fifth submit's
        // first access, so four requests reached the device and the rest sit in the SQ with no
        // doorbell: in flight for the driver, never to be completed by the device.
        let faults = c.platform().faults().clone();
        let before = faults.accesses();
        c.submit(req(IoOp::Write, 1, 0, 8, &bufs[0], 0)).unwrap();
        let per_submit = faults.accesses() - before;
        assert!(per_submit > 0, "a submit touches the device (doorbell)");
        faults.arm(faults.accesses() + 3 * per_submit);
        let mut accepted = vec![0u64];
        for (t, b) in bufs.iter().enumerate().skip(1) {
            match c.submit(req(IoOp::Write, 1, t as u64 * 8, 8, b, t as u64)) {
                Ok(()) => accepted.push(t as u64),
                Err(e) => assert!(matches!(e, NvmeError::Gone), "{mode:?}: submit after removal: {e:?}"),
            }
        }
        assert!(faults.fired(), "{mode:?}: the removal happened during the submits");
        m.sync_injected_removals();
        let mut done = Vec::new();
        let r = lp.run_until_idle(&mut c, &mut collect(&mut done));
        assert!(matches!(r, Err(IrqLoopError::Lost(Health::Gone))), "{mode:?}: {r:?}");
        assert_eq!(c.outstanding(), 0, "{mode:?}: nothing left in the engine");
        let mut seen = BTreeMap::new();
        for d in &done {
            *seen.entry(d.tag).or_insert(0) += 1;
            assert!(matches!(d.result, Ok(()) | Err(NvmeError::Gone)), "{mode:?}: {d:?}");
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), accepted, "{mode:?}: every accepted request, nothing else");
        assert!(seen.values().all(|&n| n == 1), "{mode:?}: each exactly once: {seen:?}");
        let failed = done.iter().filter(|d| d.result.is_err()).count();
        assert!(failed > 0, "{mode:?}: requests were in flight at the removal and failed with Gone");
        assert!(lp.stats().timeouts >= 1, "{mode:?}: the removal was noticed by the bounded wait");
        eprintln!("{mode:?}: {:?}, {} accepted, {failed} failed", lp.stats(), accepted.len());
        drop(lp);
        drop(bufs);
    }
}

/// Negative control: with vector 0 masked the device holds its message back (pending bit), so
/// no interrupt is observed and the loop's figures show the completion came from the fallback
/// poll — the assertion the depth test makes would fail. Unmasking delivers the held message.
#[test]
fn masked_msix_vector_delivers_nothing_and_the_loop_notices() {
    if !qemu_or_skip("masked_msix_vector_delivers_nothing_and_the_loop_notices") {
        return;
    }
    let (_m, mut c, irq) = setup(Mode::Msix);
    irq.set_masked(true).unwrap();
    let (buf, _) = pattern_buf(&c, 4096, 3);
    c.submit(req(IoOp::Write, 1, 0, 8, &buf, 1)).unwrap();
    assert!(!irq.wait(Duration::from_millis(300)).unwrap(), "a masked vector wrote the mailbox");
    assert!(irq.pending().unwrap(), "the device did try: vector 0's pending bit is set");
    let mut lp = IrqDriven::new(irq, Duration::from_millis(300));
    let mut done = Vec::new();
    assert_eq!(lp.service(&mut c, &mut collect(&mut done)).unwrap(), None);
    let s = lp.stats();
    assert_eq!((s.interrupts, s.timeouts, s.reaped_by_irq, s.reaped_without_irq), (0, 1, 0, 1), "{s:?}");
    assert_eq!(done.len(), 1);
    // The same interrupt, unmasked: the held message arrives.
    lp.interrupt().set_masked(false).unwrap();
    assert!(lp.interrupt().wait(WAIT).unwrap(), "unmasking delivers the pending message");
    assert!(!lp.interrupt().pending().unwrap());
    drop(lp);
    c.shutdown().unwrap();
}

/// Negative control for INTx: with vector 0 masked in the controller's INTMS register (NVMe
/// 3.1.3/3.1.4, INTx and MSI only), the line never rises and the wait times out; clearing the
/// mask (INTMC) raises it for the completion that is still pending.
#[test]
fn intx_masked_by_intms_is_not_observed() {
    if !qemu_or_skip("intx_masked_by_intms_is_not_observed") {
        return;
    }
    use nvme_hotplug::platform::RegisterIo;
    const INTMS: u32 = 0x0c;
    const INTMC: u32 = 0x10;
    let (_m, mut c, irq) = setup(Mode::Intx);
    c.platform().write32(INTMS, 1);
    let (buf, _) = pattern_buf(&c, 4096, 4);
    c.submit(req(IoOp::Write, 1, 0, 8, &buf, 1)).unwrap();
    assert!(!irq.wait(Duration::from_millis(300)).unwrap(), "INTx rose while masked");
    c.platform().write32(INTMC, 1);
    assert!(irq.wait(WAIT).unwrap(), "unmasking raises INTx for the pending completion");
    let mut lp = IrqDriven::new(irq, WAIT);
    let mut done = Vec::new();
    assert_eq!(lp.service(&mut c, &mut collect(&mut done)).unwrap(), None);
    assert_eq!((done.len(), lp.stats().reaped_by_irq), (1, 1));
    c.shutdown().unwrap();
}
