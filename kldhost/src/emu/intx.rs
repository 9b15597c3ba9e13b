//! The legacy INTx line of a pci child, delivered to the module's handler as FreeBSD's x86
//! interrupt code delivers a level-triggered I/O APIC input.
//!
//! - **Routing** ([`assign`]): the IRQ resource of rid 0 is the function's INTx pin routed to
//!   a GSI, as pci(4) assigns it on the first allocation (sys/dev/pci/pci.c
//!   `pci_alloc_multi_resource` → `pci_assign_interrupt`). On this machine the routing is
//!   the PIIX3's (i440fx swizzle, then the PIRQ route register the lab's firmware programmed:
//!   `nvmehp_lab::firmware::intx_gsi`, which the lab's own INTx mode uses too): slot 4's INTA#
//!   is GSI 11.
//! - **The line** is QEMU's I/O APIC input, intercepted for the whole machine by the lab
//!   (qtest `irq_intercept_in ioapic`, once per machine; QEMU reports `IRQ raise`/`IRQ lower`
//!   and [`nvmehp_lab::qtest::Qtest`] keeps the levels). Only levels are read here, never the
//!   edge list, so the SCI (GSI 9), which the ACPI hotplug path ([`super::acpi::run_gpe`])
//!   checks on the same connection, is untouched.
//! - **Delivery** ([`run_lines`], one of the kernel's threads, [`super::sched::run_kernel_threads`]:
//!   when the module sleeps, when taskqueue threads run, while a bio waits): while the line of
//!   a GSI with handlers is high, one interrupt: sys/kern/kern_intr.c `intr_event_handle` runs
//!   every filter, and if a handler has no filter or a filter returned
//!   FILTER_SCHEDULE_THREAD, masks the source (`pre_ithread`, x86's `intr_disable_src`:
//!   sys/x86/x86/intr_machdep.c `intr_register_source`) and schedules the ithread, which
//!   runs every handler of the event (`ithread_execute_handlers`) and then unmasks it
//!   (`post_ithread`, the PIC's `pic_enable_source`). A level source still asserted at the
//!   unmask interrupts again: here the line is read again after the handlers and the event
//!   repeats while it stays high.
//! - **Storms**: kern_intr.c counts back-to-back ithread passes (`ie_count`, reset when the
//!   ithread goes idle) and at `hw.intr_storm_threshold` prints `interrupt storm detected on
//!   "irq11:"; throttling interrupt source` and throttles the event to one pass per tick. Here
//!   the bound is [`STORM_THRESHOLD`] passes in a row with the line high (the default in the
//!   kern_intr.c read for this; whether FreeBSD 15 still defaults to it, or to 0 = detection
//!   off, was not verified); reaching it prints the same message, is a finding (a handler that
//!   never lowers its line) when a function with a handler on the GSI asserts it (its PCI
//!   status says so; the line may also be held by a device QEMU kept after its eject, which no
//!   handler can lower: logged, not a finding), and throttles that GSI to one pass per delivery
//!   round until it is seen low. A throttled pass is not counted as work done, so the callers' loops, which run
//!   the kernel's threads until none has anything to do, still end.
//! - **Teardown**: `bus_teardown_intr` removes the handler from pci0's list
//!   (super::pci::emu_bus_teardown_intr); every pass checks that list right before calling a
//!   handler, so none runs once the teardown returned (intr_event_remove_handler's
//!   guarantee).
//! - `kldhost run --intx-undelivered` ([`set_delivered`]) is the negative control: the line
//!   is never delivered (as a machine whose interrupt controller lost the input), so only the
//!   driver's own polling can complete its I/O.

use super::machine;
use super::newbus;
use super::{finding, log, with};
use nvmehp_lab::firmware::{self, Bdf};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_int, c_void};
use std::sync::Mutex;

/// Back-to-back passes with the line still high before the event counts as storming
/// (kern_intr.c `intr_storm_threshold`, see the module doc).
pub const STORM_THRESHOLD: u32 = 1000;

/// sys/sys/bus.h: a filter's answer asking for the ithread.
const FILTER_SCHEDULE_THREAD: c_int = 0x04;

#[derive(Default)]
struct State {
    /// The GSI each function's INTx pin is routed to, by (bus, slot, function).
    routes: BTreeMap<(u8, u8, u8), u8>,
    /// GSIs throttled after a storm, until their line is seen low.
    storming: BTreeSet<u8>,
    /// `--intx-undelivered`.
    undelivered: bool,
    /// Handler runs so far, per device.
    delivered: BTreeMap<u64, u64>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(State::default))
}

fn key(b: Bdf) -> (u8, u8, u8) {
    (b.bus, b.dev, b.func)
}

/// Whether INTx lines are delivered (default) or not (`--intx-undelivered`).
pub fn set_delivered(on: bool) {
    state(|s| s.undelivered = !on);
}

pub fn delivered() -> bool {
    state(|s| !s.undelivered)
}

/// pci_assign_interrupt for `bdf`: the GSI its INTx pin reaches, or None (no pin, or its PIRQ
/// not routed), read from the machine now, so a function plugged later into the slot gets
/// its own pin's route. On q35 always None: the route is PIIX3's (the lab's firmware), and
/// ICH9's PIRQ routing behind a root port is not emulated, so no line is handed out rather
/// than a wrong one.
pub fn assign(bdf: Bdf) -> Option<u8> {
    let gsi = route(bdf);
    state(|s| match gsi {
        Some(g) => s.routes.insert(key(bdf), g),
        None => s.routes.remove(&key(bdf)),
    });
    gsi
}

/// The GSI `bdf`'s INTx pin reaches now (see [`assign`]), without assigning it: the emulated
/// MSI messages (super::msi) read this line.
pub fn route(bdf: Bdf) -> Option<u8> {
    machine::with_machine(|m| {
        if m.kind() == nvmehp_lab::qemu::MachineKind::Q35 {
            return None;
        }
        m.qtest(|q| firmware::intx_gsi(q, bdf)).ok().flatten()
    })
}

/// The GSI [`assign`] gave `bdf`.
pub fn gsi_of(bdf: Bdf) -> Option<u8> {
    state(|s| s.routes.get(&key(bdf)).copied())
}

/// Handler runs on INTx so far for `dev` (a device_t).
pub fn delivered_to(dev: u64) -> u64 {
    state(|s| s.delivered.get(&dev).copied().unwrap_or(0))
}

/// One INTx handler set up: its cookie (the key of pci0's handler list) and what it runs.
struct Handler {
    cookie: u64,
    dev: u64,
    filter: u64,
    handler: u64,
    arg: u64,
}

type Filter = unsafe extern "C" fn(*mut c_void) -> c_int;
type IthreadHandler = unsafe extern "C" fn(*mut c_void);

/// Still set up: `bus_teardown_intr` has not removed it.
fn set_up(cookie: u64) -> bool {
    with(|e| e.pci.intrs.contains_key(&cookie))
}

/// The line's level as QEMU last reported it, after a round trip that delivers any
/// `IRQ raise`/`IRQ lower` QEMU queued since the last reply.
fn line_high(gsi: u8) -> bool {
    line(gsi).0
}

/// The line's level and how many times QEMU reported it raised so far (rising edges), after
/// the same round trip as [`line_high`].
pub(crate) fn line(gsi: u8) -> (bool, u64) {
    machine::with_machine(|m| m.qtest(|q| q.sync().map(|()| (q.irq_level(gsi), q.irq_raises(gsi)))).unwrap_or((false, 0)))
}

/// PCI's status register: the function drives its INTx pin (PCIM_STATUS_INTxSTATE,
/// sys/dev/pci/pcireg.h); a function gone (all-ones) does not.
pub(crate) fn function_asserts(bdf: Bdf) -> bool {
    const PCIR_STATUS: u16 = 0x06;
    const PCIM_STATUS_INTXSTATE: u32 = 0x0008;
    let status = machine::cfg_read(bdf, PCIR_STATUS, 2);
    status != 0xffff && status & PCIM_STATUS_INTXSTATE != 0
}

/// The devices of `hs` still on the bus whose function asserts INTx: PCI's status register
/// has its interrupt status bit (PCIM_STATUS_INTxSTATE, sys/dev/pci/pcireg.h) set while the
/// function drives its pin. A line high with none of them asserting is held by something no
/// handler here can lower: on QEMU, a device ejected with requests in its backend, which QEMU
/// keeps (and its pin) although it left the bus.
fn asserting(hs: &[Handler]) -> Vec<String> {
    let mut out = Vec::new();
    for h in hs {
        let Some(bdf) = with(|e| e.newbus.devices.get(&h.dev).and_then(|d| d.pci.as_ref()).map(|p| p.bdf)) else { continue };
        if function_asserts(bdf) {
            out.push(newbus::nameunit(h.dev));
        }
    }
    out
}

/// One interrupt on `gsi`: intr_event_handle's filters, then the ithread's handlers.
/// Returns how many handlers ran. No emulation lock is held while module code runs.
fn one_pass(gsi: u8, hs: &[Handler]) -> usize {
    let mut thread = false;
    for h in hs.iter().filter(|h| set_up(h.cookie)) {
        if h.filter == 0 {
            thread = true;
            continue;
        }
        log(format!("{}: interrupt filter (IRQ rid 0, INTx on GSI {gsi})", newbus::nameunit(h.dev)));
        // SAFETY: the filter and argument the module set up with bus_setup_intr, still set
        // up (checked just above, on this thread, which is the only one that tears down).
        let r = unsafe { std::mem::transmute::<u64, Filter>(h.filter)(h.arg as *mut c_void) };
        thread |= r & FILTER_SCHEDULE_THREAD != 0;
    }
    if !thread {
        return 0;
    }
    let mut ran = 0;
    for h in hs.iter().filter(|h| h.handler != 0) {
        if !set_up(h.cookie) {
            continue;
        }
        log(format!("{}: interrupt (IRQ rid 0, INTx on GSI {gsi})", newbus::nameunit(h.dev)));
        state(|s| *s.delivered.entry(h.dev).or_default() += 1);
        super::pci::note_taken();
        // SAFETY: as for the filter: the module's ithread handler, still set up.
        unsafe { std::mem::transmute::<u64, IthreadHandler>(h.handler)(h.arg as *mut c_void) };
        ran += 1;
    }
    ran
}

/// The interrupt threads of the INTx lines: for each GSI with a handler set up, interrupts
/// while its line is high (level-triggered, see the module doc). Returns how many handler
/// runs there were.
pub fn run_lines() -> usize {
    if !machine::has_machine() || !delivered() {
        return 0;
    }
    let mut by_gsi: BTreeMap<u8, Vec<Handler>> = BTreeMap::new();
    let hs: Vec<(u64, u64, Option<Bdf>, u64, u64, u64)> = with(|e| {
        e.pci
            .intrs
            .iter()
            .filter(|(_, i)| i.rid == 0)
            .map(|(c, i)| (*c, i.dev, e.newbus.devices.get(&i.dev).and_then(|d| d.pci.as_ref()).map(|p| p.bdf), i.filter, i.handler, i.arg))
            .collect()
    });
    for (cookie, dev, bdf, filter, handler, arg) in hs {
        if let Some(gsi) = bdf.and_then(gsi_of) {
            by_gsi.entry(gsi).or_default().push(Handler { cookie, dev, filter, handler, arg });
        }
    }
    let mut n = 0;
    for (gsi, hs) in by_gsi {
        let mut passes = 0u32;
        while line_high(gsi) {
            if state(|s| s.storming.contains(&gsi)) {
                // Throttled: one pass per round while it storms, not counted as progress, so
                // the kernel threads' loop (run_kernel_threads) does not spin on it.
                one_pass(gsi, &hs);
                passes += 1;
                break;
            }
            if passes >= STORM_THRESHOLD {
                state(|s| s.storming.insert(gsi));
                super::kern::console_line(&format!("interrupt storm detected on \"irq{gsi}:\"; throttling interrupt source\n"));
                let holders = asserting(&hs);
                if holders.is_empty() {
                    log(format!(
                        "interrupt storm on GSI {gsi}: no function with a handler on it asserts INTx (PCIR_STATUS interrupt status clear on each): the line is held by a function that left pci0 (QEMU keeps a device ejected with requests in its backend); throttled, not a handler's fault"
                    ));
                } else {
                    finding(format!(
                        "interrupt storm on GSI {gsi}: the line stayed high through {STORM_THRESHOLD} passes of its handlers, asserted by {} (a handler that does not lower it)",
                        holders.join(", ")
                    ));
                }
                break;
            }
            n += one_pass(gsi, &hs);
            passes += 1;
        }
        if passes == 0 {
            state(|s| s.storming.remove(&gsi));
        }
    }
    n
}
