//! An MSI function over QEMU's NVMe controller, which has none: `kldhost run --qemu
//! --msi-instead-of-msix` (pci(4) offers an MSI capability and no MSI-X) or `--msi-with-msix`
//! (both: QEMU's MSI-X capability and the MSI one).
//!
//! **What pci(4) sees** (super::pci): an MSI capability with one message (Multiple Message
//! Capable 0), so `pci_msi_count` is 1; with `--msi-instead-of-msix` no MSI-X capability
//! (`pci_msix_count` 0, the table and PBA BAR methods -1, `pci_alloc_msix` ENODEV).
//! `pci_alloc_msi`, `bus_setup_intr`, `bus_teardown_intr` and `pci_release_msi` keep
//! sys/dev/pci/pci.c's state: `msi_alloc` set by `pci_alloc_msi_method` (with its refusals,
//! in its order), MSI Enable set by `pci_setup_intr` when the first handler is set up
//! (`pci_enable_msi`) and cleared by `pci_teardown_intr` when the last goes
//! (`pci_disable_msi`), `pci_release_msi_method` refusing (EBUSY) while `msi_handlers` > 0 or a
//! message's IRQ resource is allocated. The capability is emulated: it is not in QEMU's
//! config space, and its control register lives here, not in the device.
//!
//! **Where the messages come from.** QEMU's NVMe model sends no MSI. With MSI-X disabled it
//! signals a completion queue with entries on its INTx pin instead (hw/nvme/ctrl.c
//! `nvme_irq_assert` → `nvme_irq_check`: the pin is asserted while an unmasked vector has a
//! CQ with entries, and lowered when the CQ head doorbell catches up). So a message is stood
//! in for by the function's INTx assertion: at each delivery round (one of the kernel's
//! threads, [`run_messages`], where the INTx and MSI-X interrupt threads run), if MSI is
//! enabled, a handler is set up, the function's line is high (the I/O APIC input QEMU
//! reports, super::intx) and the function itself asserts it (PCI status Interrupt Status,
//! so a line shared with another function is not taken for this one's), one message: the
//! filter, then the ithread handler, as sys/kern/kern_intr.c `intr_event_handle` runs them.
//! pci(4) sets INTx Disable in the command register when it enables MSI (`pci_setup_intr`);
//! here QEMU's device keeps INTx enabled, since that bit would stop the assertions the
//! messages are read from (the setup's log line says so).
//!
//! **The approximation, and why it is safe.** A real MSI function sends one message per
//! completion it posts (per interrupt it would have asserted); here there is one per round in
//! which the line is seen high. The differences:
//! - Completions posted while the line is already high make no new edge: they are covered by
//!   the same message, as several messages arriving before the ithread runs are covered by one
//!   pass of the handler on FreeBSD (the ithread's `it_need` coalesces them), and the handler
//!   reaps the whole CQ each time.
//! - A line still high at the next round with no rising edge since the last message (QEMU
//!   reports each `IRQ raise`, counted per line) means entries the handler left in a CQ (QEMU
//!   lowers the line only once the head doorbell caught up), or new ones posted before it
//!   lowered. A real function signals the new ones and not the old ones; this cannot tell
//!   them apart, so it errs towards delivering: one more message per round, logged as a
//!   re-delivery and not counted as work done, so that the kernel threads' loop ends and a
//!   handler that does not lower the line (one that finds its engine stopping, say) is not run
//!   back to back as a level source would be. A missed message would leave a completion to
//!   the driver's 1 s watchdog and look like a handler fault that is not there; an extra one is
//!   a spurious interrupt, which an MSI handler must tolerate anyway (a message can arrive
//!   after the handler already reaped its entry). What this cannot show is a handler that
//!   leaves entries behind and counts on a message a real function would not send: the tests
//!   check in the log that the I/O's messages were all fresh ones.
//! - A rising edge on a line shared with another function counts as fresh for each function
//!   asserting it; on the machines here the NVMe function is alone on its GSI.
//!
//! `--msi-undelivered` ([`set_delivered`]) is the negative control: no message at all, so
//! only the driver's polling can complete its I/O.
//!
//! Only on QEMU's `pc` machine: the line read is the PIIX3-routed GSI (super::intx::route),
//! and q35's routing is not emulated.

use super::machine;
use super::newbus;
use super::{log, with};
use nvmehp_lab::firmware::Bdf;
use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::sync::Mutex;

/// What pci(4) offers for message interrupts on a function of QEMU's machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// QEMU's capabilities as they are (its NVMe model: MSI-X only).
    #[default]
    Off,
    /// `--msi-instead-of-msix`: an emulated MSI capability with one message, no MSI-X.
    InsteadOfMsix,
    /// `--msi-with-msix`: QEMU's MSI-X capability and an emulated MSI one with one message.
    WithMsix,
}

#[derive(Default)]
struct State {
    mode: Mode,
    /// `--msi-undelivered`.
    undelivered: bool,
    /// The GSI of each function's INTx pin, read when its MSI was allocated.
    lines: BTreeMap<(u8, u8, u8), u8>,
    /// Per function (device_t): the line's rising-edge count when its last message was
    /// delivered; the next message with the same count is a re-delivery.
    delivered_at: BTreeMap<u64, u64>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(State::default))
}

/// Chosen once per run, before pci(4) enumerates (`Options::msi`).
pub fn set_mode(mode: Mode) {
    state(|s| {
        *s = State {
            mode,
            ..State::default()
        }
    });
}

pub fn mode() -> Mode {
    state(|s| s.mode)
}

/// Whether messages are delivered (default) or not (`--msi-undelivered`).
pub fn set_delivered(on: bool) {
    state(|s| s.undelivered = !on);
}

pub fn delivered() -> bool {
    state(|s| !s.undelivered)
}

/// At `pci_alloc_msi`: the GSI whose level stands in for `bdf`'s messages, or None (no
/// routed pin: then MSI cannot be emulated and pci_alloc_msi refuses).
pub fn bind_line(bdf: Bdf) -> Option<u8> {
    let gsi = super::intx::route(bdf)?;
    state(|s| s.lines.insert((bdf.bus, bdf.dev, bdf.func), gsi));
    Some(gsi)
}

/// At `pci_release_msi`: `dev`'s message is gone; a device_t reused later starts afresh.
pub fn forget(dev: u64) {
    state(|s| s.delivered_at.remove(&dev));
}

/// The GSI [`bind_line`] gave `bdf`.
pub fn line_of(bdf: Bdf) -> Option<u8> {
    state(|s| s.lines.get(&(bdf.bus, bdf.dev, bdf.func)).copied())
}

type Filter = unsafe extern "C" fn(*mut c_void) -> c_int;
type IthreadHandler = unsafe extern "C" fn(*mut c_void);

/// sys/sys/bus.h: a filter's answer asking for the ithread.
const FILTER_SCHEDULE_THREAD: c_int = 0x04;

/// Still set up: `bus_teardown_intr` has not removed it (checked right before each call, so
/// none runs once the teardown returned, intr_event_remove_handler's guarantee).
fn set_up(cookie: u64) -> bool {
    with(|e| e.pci.intrs.contains_key(&cookie))
}

/// The interrupt thread of the emulated MSI messages (see the module doc): one message per
/// function whose line is high and asserted by it, MSI enabled and a handler set up. Returns
/// how many messages count as work done (re-deliveries do not).
pub fn run_messages() -> usize {
    if !machine::has_machine() || mode() == Mode::Off || !delivered() {
        return 0;
    }
    // (cookie, dev, filter, handler, arg) of every handler on an MSI message.
    let hs: Vec<(u64, u64, Bdf, u64, u64, u64)> = with(|e| {
        e.pci
            .intrs
            .iter()
            .filter(|(_, i)| i.rid > 0)
            .filter_map(|(c, i)| {
                let p = e.newbus.devices.get(&i.dev)?.pci.as_ref()?;
                (p.msi_alloc > 0 && p.msi_enabled)
                    .then_some((*c, i.dev, p.bdf, i.filter, i.handler, i.arg))
            })
            .collect()
    });
    let mut work = 0;
    for (cookie, dev, bdf, filter, handler, arg) in hs {
        let Some(gsi) = line_of(bdf) else { continue };
        let (high, raises) = super::intx::line(gsi);
        if !(high && super::intx::function_asserts(bdf)) {
            continue;
        }
        // A rising edge since the last message is a new assertion (a CQ that was empty got an
        // entry); none is the line left high since then.
        let again = state(|s| s.delivered_at.insert(dev, raises) == Some(raises));
        let name = newbus::nameunit(dev);
        let how = if again {
            ", re-delivered: the line stayed high since the last one"
        } else {
            ""
        };
        let mut thread = filter == 0;
        if filter != 0 && set_up(cookie) {
            log(format!("{name}: interrupt filter (IRQ rid 1, MSI message 0, stood in for by INTx on GSI {gsi}{how})"));
            // SAFETY: the filter and argument the module set up with bus_setup_intr, still set
            // up (checked just above, on this thread, the only one that tears down).
            let r = unsafe { std::mem::transmute::<u64, Filter>(filter)(arg as *mut c_void) };
            thread = r & FILTER_SCHEDULE_THREAD != 0;
        }
        if thread && handler != 0 && set_up(cookie) {
            log(format!("{name}: interrupt (IRQ rid 1, MSI message 0, stood in for by INTx on GSI {gsi}{how})"));
            super::pci::note_taken();
            // SAFETY: as for the filter: the module's ithread handler, still set up.
            unsafe { std::mem::transmute::<u64, IthreadHandler>(handler)(arg as *mut c_void) };
        }
        if !again {
            work += 1;
        }
    }
    work
}
