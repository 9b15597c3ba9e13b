//! Device faults: `--device-fault KIND[=ARG]` rewrites what the module sees of QEMU's NVMe
//! controller, for the controller behaviour QEMU will not produce (a CSTS.RDY that never
//! rises, a controller that ignores the disable, hostile identify data, a stale CID, admin
//! commands answered late, an I/O command that never completes, a bus-master bit that cannot
//! be cleared, a header type byte saying a layout the OS does not know).
//!
//! The layer sits between the module and QEMU, where kldhost already is: every register
//! access of the module is trapped ([`super::mmio`]) and forwarded over qtest, so a register
//! value can be changed on its way back ([`on_read`]) and a write held back ([`on_write`]);
//! DMA memory is guest RAM this process maps too, so data QEMU wrote can be changed after
//! QEMU completed the command and before the module can look at the completion
//! ([`after_write`]: the module is stopped in the trap of its doorbell write meanwhile).
//! QEMU's controller itself is never changed: what it does is what an NVMe controller does;
//! only the module's view of it is hostile. Every fault says so in the call log
//! (`kldhost: injected device fault KIND: ...`, and each rewritten access names its fault), so
//! a test can tell an injected fault from the driver's own doing.
//!
//! Config space has two hooks too: [`on_config_write`], called by `machine::cfg_write`, which
//! every config write of the module goes through (pci_write_config, pci_enable_busmaster and
//! pci_disable_busmaster): there the layer changes the value before QEMU gets it, so what the
//! function does afterwards (and reads back) is QEMU's own answer to the changed write; and
//! [`on_config_read`], called by `machine::cfg_read`, which every config read of the emulated
//! kernel goes through (the module's and pci(4)'s; not the lab firmware's boot scan, which
//! reads QEMU directly), for `header-layout`.
//!
//! The armed faults are process-global, as the emulated kernel is, and apply to every NVMe
//! BAR0 window; per controller (BAR address) the layer keeps what it needs to know: whether
//! the module has set CC.EN and when, where its admin queues are, and the admin doorbell
//! writes it holds back (`admin-latency`, [`release_due`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

// NVMe 1.4 §3.1 register offsets in BAR0.
const CAP: u64 = 0x00;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;
/// The admin submission queue's tail doorbell (queue 0: at 0x1000 whatever CAP.DSTRD says).
const ADMIN_SQ_TAIL: u64 = 0x1000;
/// The doorbells: SQ y's tail at 0x1000 + (2y) * (4 << CAP.DSTRD), CQ y's head after it.
const DOORBELLS: u64 = 0x1000;

/// Config space (PCI Local Bus 3.0, sys/dev/pci/pcireg.h): the command register and its
/// bus-master enable bit, and the class code an NVMe function has (01h/08h/02h).
const PCIR_COMMAND: u16 = 0x04;
const PCIM_CMD_BUSMASTEREN: u32 = 0x4;
/// The header type byte: layout in bits 0..6, PCIM_MFDEV in bit 7.
const PCIR_HDRTYPE: u16 = 0x0e;
pub const CLASS_NVME: u32 = 0x01_08_02;

const CC_EN: u64 = 1;
const CC_SHN_MASK: u64 = 3 << 14;
const CSTS_RDY: u64 = 1;
const CSTS_CFS: u64 = 1 << 1;

/// How long the layer waits for QEMU to complete a command whose data or completion it
/// rewrites. QEMU answers an Identify in well under a millisecond; a miss is logged.
const COMPLETION_WAIT: Duration = Duration::from_secs(2);

/// Which identify field `identify-garbage` corrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Garbage {
    /// Identify Controller NN = 0xffffffff.
    Nn,
    /// Identify Controller MDTS = 0xff (2^255 pages).
    Mdts,
    /// Identify Namespace FLBAS selecting a format beyond NLBAF.
    Flbas,
    /// The in-use LBA format's LBADS = 0 (1-byte blocks).
    Lbads0,
    /// The in-use LBA format's LBADS = 63.
    Lbads63,
    /// NSZE = 0 with NCAP left non-zero.
    Nsze0,
    /// NCAP = NSZE + 1.
    NcapAboveNsze,
}

const GARBAGE: &[(&str, Garbage)] = &[
    ("nn", Garbage::Nn),
    ("mdts", Garbage::Mdts),
    ("flbas", Garbage::Flbas),
    ("lbads0", Garbage::Lbads0),
    ("lbads63", Garbage::Lbads63),
    ("nsze0", Garbage::Nsze0),
    ("ncap", Garbage::NcapAboveNsze),
];

impl Garbage {
    fn name(self) -> &'static str {
        GARBAGE.iter().find(|(_, g)| *g == self).map_or("?", |(n, _)| n)
    }
    /// Identify Controller (CNS 01h) or Identify Namespace (CNS 00h).
    fn cns(self) -> u8 {
        match self {
            Garbage::Nn | Garbage::Mdts => 1,
            _ => 0,
        }
    }
}

/// One armed fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// CAP.TO (bits 31:24, 500 ms units) reads as this value.
    CapTo(u8),
    /// CSTS.RDY never reads 1 while the module has CC.EN set.
    RdyNever,
    /// CSTS.RDY reads 1 only this many ms after the module set CC.EN.
    RdySlow(u64),
    /// Once the controller was enabled, a CC write that clears EN or sets SHN is not passed on:
    /// CSTS.RDY stays 1 and CSTS.SHST never says complete.
    NoStop,
    /// CSTS.CFS reads 1 while the module has CC.EN set.
    CstsCfs,
    /// The data of the first Identify of the kind the field belongs to is corrupted after
    /// QEMU completed it.
    IdentifyGarbage(Garbage),
    /// The completion of the N-th admin command (1-based) carries CID 0xffff instead of its own.
    CqeCid(u64),
    /// Every admin SQ tail doorbell write reaches QEMU this many ms (emulation clock) after the
    /// module made it: each admin command is answered that much later.
    AdminLatency(u64),
    /// Config space: once PCIM_CMD_BUSMASTEREN is set in an NVMe function's PCIR_COMMAND, a
    /// write clearing it leaves it set (the rest of the write is passed on), so the bit reads
    /// back on and QEMU's function keeps mastering the bus.
    BusmasterStuck,
    /// I/O queues: after the first N tail doorbell writes of I/O submission queues (queue
    /// ids 1 and up) since the controller was enabled, every later one is not passed on, so
    /// QEMU never sees those commands and they never complete. The admin queue is untouched.
    IoStall(u64),
    /// Config space: an NVMe function's header type byte (PCIR_HDRTYPE) reads with this
    /// layout (bits 0..6) instead of QEMU's type 0, its PCIM_MFDEV bit kept: a function with a
    /// header layout the OS does not know (above PCI_MAXHDRTYPE), whose slot pci(4) skips.
    HeaderLayout(u8),
}

impl std::fmt::Display for Fault {
    /// The option's own spelling, which [`parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::CapTo(n) => write!(f, "cap-to={n}"),
            Fault::RdyNever => write!(f, "rdy-never"),
            Fault::RdySlow(ms) => write!(f, "rdy-slow={ms}"),
            Fault::NoStop => write!(f, "no-stop"),
            Fault::CstsCfs => write!(f, "csts-cfs"),
            Fault::IdentifyGarbage(g) => write!(f, "identify-garbage={}", g.name()),
            Fault::CqeCid(n) => write!(f, "cqe-cid={n}"),
            Fault::AdminLatency(ms) => write!(f, "admin-latency={ms}"),
            Fault::BusmasterStuck => write!(f, "busmaster-stuck"),
            Fault::IoStall(n) => write!(f, "io-stall={n}"),
            Fault::HeaderLayout(n) => write!(f, "header-layout={n}"),
        }
    }
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::CapTo(_) => "cap-to",
            Fault::RdyNever => "rdy-never",
            Fault::RdySlow(_) => "rdy-slow",
            Fault::NoStop => "no-stop",
            Fault::CstsCfs => "csts-cfs",
            Fault::IdentifyGarbage(_) => "identify-garbage",
            Fault::CqeCid(_) => "cqe-cid",
            Fault::AdminLatency(_) => "admin-latency",
            Fault::BusmasterStuck => "busmaster-stuck",
            Fault::IoStall(_) => "io-stall",
            Fault::HeaderLayout(_) => "header-layout",
        }
    }
}

/// What `--device-fault` accepts, for the usage error.
pub const USAGE: &str = "cap-to=N (0..255, 500 ms units), rdy-never, rdy-slow=MS, no-stop, csts-cfs, \
identify-garbage=nn|mdts|flbas|lbads0|lbads63|nsze0|ncap, cqe-cid[=N] (the N-th admin command, default 1), \
admin-latency=MS, busmaster-stuck, io-stall[=N] (I/O SQ doorbells after the first N, default 0, held back), \
header-layout=N (0..127: PCIR_HDRTYPE's layout)";

/// Parses `KIND[=ARG]` (`KIND:ARG` too).
pub fn parse(spec: &str) -> Result<Fault, String> {
    let (kind, arg) = match spec.split_once(['=', ':']) {
        Some((k, a)) => (k, Some(a)),
        None => (spec, None),
    };
    let bad = || format!("{spec}: not a device fault; one of: {USAGE}");
    let num = |a: Option<&str>| a.and_then(|a| a.parse::<u64>().ok()).ok_or_else(bad);
    Ok(match (kind, arg) {
        ("cap-to", a) => Fault::CapTo(u8::try_from(num(a)?).map_err(|_| bad())?),
        ("rdy-never", None) => Fault::RdyNever,
        ("rdy-slow", a) => Fault::RdySlow(num(a)?),
        ("no-stop", None) => Fault::NoStop,
        ("csts-cfs", None) => Fault::CstsCfs,
        ("identify-garbage", Some(a)) => Fault::IdentifyGarbage(GARBAGE.iter().find(|(n, _)| *n == a).map(|(_, g)| *g).ok_or_else(bad)?),
        ("cqe-cid", None) => Fault::CqeCid(1),
        ("cqe-cid", a) => Fault::CqeCid(num(a)?.max(1)),
        ("admin-latency", a) => Fault::AdminLatency(num(a)?),
        ("busmaster-stuck", None) => Fault::BusmasterStuck,
        ("io-stall", None) => Fault::IoStall(0),
        ("io-stall", a) => Fault::IoStall(num(a)?),
        ("header-layout", a) => Fault::HeaderLayout(u8::try_from(num(a)?).ok().filter(|&n| n < 0x80).ok_or_else(bad)?),
        _ => return Err(bad()),
    })
}

/// What the layer knows of one controller (by BAR0's guest-physical address).
#[derive(Default)]
struct Ctrl {
    /// The module's last CC write had EN set, and when it set it.
    enabled_at: Option<Instant>,
    /// The controller was enabled (a CC.EN = 1 write reached QEMU).
    running: bool,
    aqa: u32,
    asq: u64,
    acq: u64,
    /// The admin SQ tail the module last wrote (the layer's copy, to find new entries).
    admin_tail: u32,
    /// Admin commands seen since the controller was enabled (for `cqe-cid=N`).
    admin_cmds: u64,
    /// One-shot faults already done for this controller (identify-garbage, cqe-cid).
    done: Vec<Fault>,
    /// Admin SQ tail doorbell writes held back (admin-latency), oldest first.
    held: VecDeque<Held>,
    /// CAP.DSTRD as the module read it (the doorbell stride is 4 << DSTRD bytes).
    dstrd: u32,
    /// I/O SQ tail doorbell writes passed on since the controller was enabled (`io-stall`).
    io_doorbells: u64,
}

/// An admin SQ tail doorbell write the layer holds back (`admin-latency`) until [`release_due`]
/// forwards it.
struct Held {
    /// When the module made the write and when it is due at QEMU, on the emulation's clock
    /// ([`super::sched::clock_ns`], what binuptime(9) answers the module).
    rung_ns: u64,
    due_ns: u64,
    value: u64,
    width: u8,
    /// The slot of the function and its ejects when the module made the write: a later eject
    /// means the function is gone, and the write must reach nothing (a controller plugged
    /// into the slot since has the same BAR address).
    gen: Option<(u8, u64)>,
    /// The completions to rewrite once it reached QEMU (another fault on the same command).
    watch: Option<Watch>,
}

#[derive(Default)]
struct State {
    faults: Vec<Fault>,
    ctrls: BTreeMap<u64, Ctrl>,
    /// Kinds whose first use was announced in the log.
    announced: Vec<&'static str>,
}

static STATE: Mutex<State> = Mutex::new(State { faults: Vec::new(), ctrls: BTreeMap::new(), announced: Vec::new() });

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether any fault is armed, without the lock: every register access asks.
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Doorbell writes held, over all controllers, without the lock: every sleep and spin of the
/// module asks ([`time_passes`]).
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Arms the faults for the rest of the process (replacing any armed before).
pub fn arm(list: Vec<Fault>) {
    let mut s = state();
    ARMED.store(!list.is_empty(), std::sync::atomic::Ordering::Relaxed);
    s.faults = list;
    s.ctrls.clear();
    s.announced.clear();
    HELD.store(0, Ordering::Relaxed);
}

/// Whether any fault is armed (the trap does no bookkeeping otherwise).
pub fn armed() -> bool {
    ARMED.load(std::sync::atomic::Ordering::Relaxed)
}

impl State {
    fn has(&self, f: impl Fn(&Fault) -> bool) -> Option<Fault> {
        self.faults.iter().copied().find(|x| f(x))
    }
    /// The one-time `kldhost: injected device fault ...` line of a fault's first effect.
    fn announce(&mut self, f: Fault, what: &str, notes: &mut Vec<String>) {
        if !self.announced.contains(&f.kind()) {
            self.announced.push(f.kind());
            notes.push(format!("kldhost: injected device fault {f}: {what}"));
        }
    }
}

/// A register read the module made: the value it sees (QEMU's `v`, or the fault's), and the
/// log lines to add.
pub fn on_read(bar: u64, off: u64, width: u8, v: u64) -> (u64, Vec<String>) {
    let mut notes = Vec::new();
    let mut s = state();
    let mut out = v;
    if off == CAP && width == 8 {
        s.ctrls.entry(bar).or_default().dstrd = ((v >> 32) & 0xf) as u32;
    } else if off == CAP + 4 {
        s.ctrls.entry(bar).or_default().dstrd = (v & 0xf) as u32;
    }
    if off == CAP {
        if let Some(f @ Fault::CapTo(n)) = s.has(|f| matches!(f, Fault::CapTo(_))) {
            out = (v & !(0xff << 24)) | (u64::from(n) << 24);
            s.announce(f, &format!("CAP.TO reads {n} ({} ms) instead of {}", u64::from(n) * 500, (v >> 24) & 0xff), &mut notes);
        }
    } else if off == CSTS && width == 4 {
        let en = s.ctrls.get(&bar).and_then(|c| c.enabled_at);
        if let Some(at) = en {
            if out & CSTS_RDY != 0 {
                if let Some(f) = s.has(|f| *f == Fault::RdyNever) {
                    out &= !CSTS_RDY;
                    s.announce(f, "CSTS.RDY hidden while CC.EN is set", &mut notes);
                } else if let Some(f @ Fault::RdySlow(ms)) = s.has(|f| matches!(f, Fault::RdySlow(_))) {
                    if at.elapsed() < Duration::from_millis(ms) {
                        out &= !CSTS_RDY;
                        s.announce(f, &format!("CSTS.RDY hidden for {ms} ms after CC.EN = 1"), &mut notes);
                    }
                }
            }
            if let Some(f) = s.has(|f| *f == Fault::CstsCfs) {
                out |= CSTS_CFS;
                s.announce(f, "CSTS.CFS set while CC.EN is set", &mut notes);
            }
        }
    }
    if out != v {
        notes.push(format!("device fault: the module read {out:#x} where QEMU's register holds {v:#x}"));
    }
    (out, notes)
}

/// What to do with a register write of the module.
pub struct Write {
    /// Pass it on to QEMU (false: the write is dropped, as a controller ignoring it).
    pub forward: bool,
    /// After forwarding: wait for the completion of these admin SQ entries and rewrite them
    /// ([`after_write`]).
    pub watch: Option<Watch>,
    pub notes: Vec<String>,
}

/// Admin commands whose completion the layer waits for.
pub struct Watch {
    acq: u64,
    entries: u32,
    /// (CID, the fault to apply, the command's PRP1 and NSID).
    cmds: Vec<(u16, Fault, u64, u32)>,
    /// The admin CQ before the doorbell, so a new entry is told from an old one.
    before: Vec<u8>,
}

/// A register write of the module (`width` bytes), before it reaches QEMU. `ram` reads guest
/// RAM (the admin submission queue entries, the completion queue); `gen` is the function's
/// slot and its ejects when the BAR window was mapped (a held write checks it is still the
/// same function when it is forwarded).
pub fn on_write(bar: u64, off: u64, v: u64, width: u8, gen: Option<(u8, u64)>, ram: &nvmehp_lab::shared_ram::SharedRam) -> Write {
    let mut w = Write { forward: true, watch: None, notes: Vec::new() };
    let mut s = state();
    if s.faults.is_empty() {
        return w;
    }
    let faults = s.faults.clone();
    let no_stop = s.has(|f| *f == Fault::NoStop);
    let latency = s.has(|f| matches!(f, Fault::AdminLatency(_)));
    let c = s.ctrls.entry(bar).or_default();
    let mut ignored = None;
    let mut delayed = None;
    let mut stalled = None;
    let stride = 4u64 << c.dstrd;
    match off {
        CC => {
            let en = v & CC_EN != 0;
            let stop = !en || v & CC_SHN_MASK != 0;
            c.enabled_at = if en { c.enabled_at.or(Some(Instant::now())) } else { None };
            if en && v & CC_SHN_MASK == 0 && !c.running {
                // A fresh enable: QEMU starts its admin queues from entry 0, and so does the
                // layer's copy.
                c.running = true;
                c.admin_tail = 0;
                c.admin_cmds = 0;
                c.io_doorbells = 0;
            }
            if let (Some(f), true, true) = (no_stop, stop, c.running) {
                w.forward = false;
                w.notes.push(format!("device fault {f}: the write above ({v:#x}) was not passed on: the controller ignores it"));
                ignored = Some(f);
            } else if !en {
                c.running = false;
                // A reset: the controller abandons what it has not fetched, so the commands of
                // doorbell writes still held never reach it (and cannot DMA into memory the
                // module frees once the controller is disabled).
                if !c.held.is_empty() {
                    let tails: Vec<String> = c.held.iter().map(|h| format!("{:#x}", h.value)).collect();
                    HELD.fetch_sub(c.held.len(), Ordering::Relaxed);
                    c.held.clear();
                    let f = latency.map_or(String::new(), |f| format!(" {f}"));
                    w.notes.push(format!(
                        "device fault{f}: the held admin SQ tail doorbell write(s) {} dropped: the controller is reset (CC.EN = 0) before it fetched their commands",
                        tails.join(", ")
                    ));
                }
            }
        }
        AQA => c.aqa = v as u32,
        ASQ => c.asq = (c.asq & !0xffff_ffff) | (v & 0xffff_ffff),
        o if o == ASQ + 4 => c.asq = (c.asq & 0xffff_ffff) | (v << 32),
        ACQ => c.acq = (c.acq & !0xffff_ffff) | (v & 0xffff_ffff),
        o if o == ACQ + 4 => c.acq = (c.acq & 0xffff_ffff) | (v << 32),
        ADMIN_SQ_TAIL => {
            let sq_entries = (c.aqa & 0xfff) + 1;
            let cq_entries = ((c.aqa >> 16) & 0xfff) + 1;
            let new_tail = (v as u32) % sq_entries;
            let mut cmds = Vec::new();
            let mut i = c.admin_tail % sq_entries;
            while i != new_tail {
                c.admin_cmds += 1;
                let mut sqe = [0u8; 64];
                if ram.read(c.asq + u64::from(i) * 64, &mut sqe).is_ok() {
                    let cid = u16::from_le_bytes([sqe[2], sqe[3]]);
                    let nsid = u32::from_le_bytes([sqe[4], sqe[5], sqe[6], sqe[7]]);
                    let prp1 = u64::from_le_bytes([sqe[24], sqe[25], sqe[26], sqe[27], sqe[28], sqe[29], sqe[30], sqe[31]]);
                    // Identify (opcode 06h), CNS in CDW10 bits 7:0.
                    let identify = (sqe[0] == 0x06).then_some(sqe[40]);
                    for &f in &faults {
                        if c.done.contains(&f) {
                            continue;
                        }
                        let hit = match f {
                            Fault::IdentifyGarbage(g) => identify == Some(g.cns()),
                            Fault::CqeCid(n) => c.admin_cmds == n,
                            _ => false,
                        };
                        if hit {
                            c.done.push(f);
                            cmds.push((cid, f, prp1, nsid));
                        }
                    }
                }
                i = (i + 1) % sq_entries;
            }
            c.admin_tail = new_tail;
            if !cmds.is_empty() {
                let mut before = vec![0u8; cq_entries as usize * 16];
                let _ = ram.read(c.acq, &mut before);
                w.watch = Some(Watch { acq: c.acq, entries: cq_entries, cmds, before });
            }
            // Held only while the controller runs: a disabled one ignores the write anyway, and
            // a write held across its next enable would name entries of a queue that no longer
            // exists.
            if let (Some(f @ Fault::AdminLatency(ms)), true) = (latency, c.running) {
                let now = super::sched::clock_ns();
                c.held.push_back(Held { rung_ns: now, due_ns: now.saturating_add(ms.saturating_mul(1_000_000)), value: v, width, gen, watch: w.watch.take() });
                HELD.fetch_add(1, Ordering::Relaxed);
                w.forward = false;
                w.notes.push(format!("device fault {f}: the write above ({v:#x}) is held: QEMU gets it {ms} ms after the module made it"));
                delayed = Some((f, ms));
            }
        }
        // An I/O submission queue's tail doorbell (queue y >= 1, the even doorbells).
        o if o >= DOORBELLS + 2 * stride && (o - DOORBELLS).is_multiple_of(stride) && ((o - DOORBELLS) / stride).is_multiple_of(2) => {
            let qid = (o - DOORBELLS) / stride / 2;
            match faults.iter().find_map(|f| if let Fault::IoStall(n) = f { Some((*f, *n)) } else { None }) {
                Some((f, n)) if c.io_doorbells >= n => {
                    w.forward = false;
                    w.notes.push(format!("device fault {f}: the write above (SQ {qid} tail {v}) was not passed on: QEMU never sees the command"));
                    stalled = Some((f, n));
                }
                _ => c.io_doorbells += 1,
            }
        }
        _ => {}
    }
    if let Some(f) = ignored {
        s.announce(f, "the controller ignores CC.EN = 0 and CC.SHN once enabled", &mut w.notes);
    }
    if let Some((f, ms)) = delayed {
        s.announce(f, &format!("every admin SQ tail doorbell write reaches QEMU {ms} ms after the module made it (emulation clock): each admin command is answered that much later"), &mut w.notes);
    }
    if let Some((f, n)) = stalled {
        s.announce(f, &format!("I/O submission queue doorbells after the first {n} are held back: those commands never complete"), &mut w.notes);
    }
    w
}

/// Forwards to QEMU every held admin doorbell write (`admin-latency`) whose time has come on the
/// emulation's clock, oldest first; returns the log lines. `m` is the machine, its lock held by
/// the caller; `at` says where the emulation is (the log line names it).
///
/// When this runs is what makes the latency sound. The module waits for an admin command by
/// polling its completion queue in memory, sleeping in pause_sbt(9) (or spinning in DELAY(9) for
/// the first microseconds of its back-off) between the polls, and reading a register only now and
/// then (its health check). So the forwarding is hooked where the emulation gets control while
/// time passes for the module: [`time_passes`], from every pause_sbt after its sleep, every
/// DELAY after its spin and [`super::sched::run_kernel_threads`] (the runner's and the
/// taskqueues' turns), and this function itself from every trapped register access, before the
/// access reaches QEMU. The trap alone would not do: a poll that touches no register between
/// the health checks (100 ms apart) would see the completion up to that much later than due.
/// The sleeps alone would not do either: a write falling due while the module runs without
/// sleeping must still reach QEMU before the module's next register access, so the order QEMU
/// sees is the order of a controller that fetched the command at its time (a CC.EN = 0 made
/// after a write fell due comes after it, and does not drop it). A write reaches QEMU at its
/// time or up to one sleep later (the module's sleeps in its poll are at most 1 ms), never
/// earlier.
pub fn release_due(m: &super::machine::Machine, at: At) -> Vec<String> {
    let mut notes = Vec::new();
    if HELD.load(Ordering::Relaxed) == 0 {
        return notes;
    }
    let now = super::sched::clock_ns();
    let (fault, due) = {
        let mut s = state();
        let fault = s.has(|f| matches!(f, Fault::AdminLatency(_)));
        let mut due = Vec::new();
        for (&bar, c) in s.ctrls.iter_mut() {
            while c.held.front().is_some_and(|h| h.due_ns <= now) {
                if let Some(h) = c.held.pop_front() {
                    due.push((bar, h));
                }
            }
        }
        HELD.fetch_sub(due.len(), Ordering::Relaxed);
        (fault, due)
    };
    let name = fault.map_or(String::new(), |f| format!(" {f}"));
    for (bar, h) in due {
        if h.gen.is_some_and(|(slot, ejects_then)| m.ejects(slot) != ejects_then) {
            notes.push(format!("device fault{name}: the held admin SQ tail doorbell write ({:#x}) of BAR {bar:#x} dropped: the function is gone", h.value));
            continue;
        }
        let phys = bar + ADMIN_SQ_TAIL;
        let res = m.qtest(|q| if h.width == 8 { q.writeq(phys, h.value) } else { q.writel(phys, h.value as u32) });
        let after_ms = super::sched::clock_ns().saturating_sub(h.rung_ns) as f64 / 1e6;
        match res {
            Ok(()) => {
                notes.push(format!("device fault{name}: the admin SQ tail doorbell write ({:#x}) of BAR {bar:#x} reaches QEMU {after_ms:.1} ms after the module made it, {}", h.value, at.what()));
                if let Some(watch) = h.watch {
                    notes.extend(after_write(watch, m.ram()));
                }
            }
            Err(e) => notes.push(format!("kldhost: device fault{name}: the held admin SQ tail doorbell write ({:#x}) of BAR {bar:#x} could not be forwarded: {e}", h.value)),
        }
    }
    notes
}

/// Where the emulation is when it forwards a held write ([`release_due`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// At the end of the module's pause_sbt(9).
    Sleep,
    /// At the end of the module's DELAY(9).
    Spin,
    /// The kernel's threads run (taskqueues, interrupt threads, the runner's turn).
    KernelThreads,
    /// Before a register access of the module reaches QEMU.
    RegisterAccess,
}

impl At {
    fn what(self) -> &'static str {
        match self {
            At::Sleep => "while the module sleeps (pause_sbt)",
            At::Spin => "while the module spins (DELAY)",
            At::KernelThreads => "while the kernel's threads run",
            At::RegisterAccess => "before the module's register access below",
        }
    }
}

/// Time passes for the module (it sleeps or spins, or the kernel's threads run): held doorbell
/// writes that fell due reach QEMU ([`release_due`]), logged. Nothing to do (no lock taken)
/// while none is held. Skipped when the machine is in use (a user on another thread; the next
/// sleep or register access forwards the write instead).
pub fn time_passes(at: At) {
    if HELD.load(Ordering::Relaxed) == 0 {
        return;
    }
    let notes = {
        let Ok(g) = super::machine::MACHINE.try_lock() else { return };
        match g.as_ref() {
            Some(m) => release_due(m, at),
            None => Vec::new(),
        }
    };
    notes.into_iter().for_each(super::log);
}

/// A config-space write of the module to the function at `class` (its class code, 24 bits):
/// the value QEMU is to get instead of `v`, and the log lines to add. `reg`/`width` as
/// pci_write_config(9) takes them; `cmd` is the function's PCIR_COMMAND before the write.
pub fn on_config_write(class: u32, reg: u16, v: u32, width: i32, cmd: u32) -> (u32, Vec<String>) {
    let mut notes = Vec::new();
    let mut s = state();
    let Some(f) = s.has(|f| *f == Fault::BusmasterStuck) else { return (v, notes) };
    // The byte at PCIR_COMMAND holds the bit; a write of width `width` at `reg` covers it
    // if reg <= 0x04 < reg + width.
    let covers = reg <= PCIR_COMMAND && u32::from(PCIR_COMMAND) < u32::from(reg) + width.max(1) as u32;
    if class != CLASS_NVME || !covers || cmd & PCIM_CMD_BUSMASTEREN == 0 {
        return (v, notes);
    }
    let bit = PCIM_CMD_BUSMASTEREN << (8 * u32::from(PCIR_COMMAND - reg));
    if v & bit != 0 {
        return (v, notes);
    }
    let out = v | bit;
    notes.push(format!("device fault {f}: config write of {v:#x} at {reg:#x} passed on as {out:#x}: PCIM_CMD_BUSMASTEREN stays set"));
    s.announce(f, "the function ignores clearing PCIM_CMD_BUSMASTEREN: PCIR_COMMAND reads it back on", &mut notes);
    (out, notes)
}

/// A config-space read through the emulated kernel of the function at `class` (its class
/// code, 24 bits): the value it is given instead of QEMU's `v`, and the log lines to add.
/// Only `header-layout` changes reads: the byte at PCIR_HDRTYPE, in a read of any width
/// covering it.
pub fn on_config_read(class: u32, reg: u16, width: i32, v: u32) -> (u32, Vec<String>) {
    let mut notes = Vec::new();
    let mut s = state();
    let Some(f @ Fault::HeaderLayout(layout)) = s.has(|f| matches!(f, Fault::HeaderLayout(_))) else { return (v, notes) };
    let covers = reg <= PCIR_HDRTYPE && u32::from(PCIR_HDRTYPE) < u32::from(reg) + width.max(1) as u32;
    if class != CLASS_NVME || !covers {
        return (v, notes);
    }
    let shift = 8 * u32::from(PCIR_HDRTYPE - reg);
    let byte = (v >> shift) & 0xff;
    let out = (v & !(0x7f << shift)) | (u32::from(layout) << shift);
    notes.push(format!("device fault {f}: PCIR_HDRTYPE {byte:#x} reads as {:#x}", (out >> shift) & 0xff));
    s.announce(f, "the function's header type byte says a layout the OS does not know", &mut notes);
    (out, notes)
}

/// Whether a config read of `width` bytes at `reg` may concern the layer (so the caller reads
/// the class code only then).
pub fn wants_config_read(reg: u16, width: i32) -> bool {
    armed() && reg <= PCIR_HDRTYPE && u32::from(PCIR_HDRTYPE) < u32::from(reg) + width.max(1) as u32 && state().has(|f| matches!(f, Fault::HeaderLayout(_))).is_some()
}

/// Whether a config write of `width` bytes at `reg` may concern the layer (so the caller reads
/// the class code and command register only then).
pub fn wants_config_write(reg: u16, width: i32) -> bool {
    armed() && reg <= PCIR_COMMAND && u32::from(PCIR_COMMAND) < u32::from(reg) + width.max(1) as u32 && state().has(|f| *f == Fault::BusmasterStuck).is_some()
}

/// After a watched doorbell write reached QEMU: waits (bounded) for each watched command's
/// completion to appear in the admin CQ, then applies its fault, before the module (stopped
/// in the trap of this very write) can see the completion. Returns the log lines.
pub fn after_write(watch: Watch, ram: &nvmehp_lab::shared_ram::SharedRam) -> Vec<String> {
    let mut notes = Vec::new();
    let start = Instant::now();
    let mut left = watch.cmds;
    while !left.is_empty() {
        let mut now = vec![0u8; watch.entries as usize * 16];
        if ram.read(watch.acq, &mut now).is_err() {
            break;
        }
        left.retain(|&(cid, f, prp1, nsid)| {
            // A new entry for this CID: a CQ slot that changed and names it (SQ 0).
            let slot = (0..watch.entries as usize).find(|&e| {
                let (a, b) = (&now[e * 16..e * 16 + 16], &watch.before[e * 16..e * 16 + 16]);
                a != b && u16::from_le_bytes([a[12], a[13]]) == cid && u16::from_le_bytes([a[10], a[11]]) == 0
            });
            let Some(e) = slot else { return true };
            let cqe = watch.acq + e as u64 * 16;
            match f {
                Fault::IdentifyGarbage(g) => notes.push(corrupt_identify(g, prp1, nsid, ram)),
                Fault::CqeCid(_) => {
                    let _ = ram.write(cqe + 12, &0xffffu16.to_le_bytes());
                    notes.push(format!("kldhost: injected device fault {f}: the completion of admin command CID {cid} carries CID 0xffff"));
                }
                _ => {}
            }
            false
        });
        if start.elapsed() > COMPLETION_WAIT {
            for (cid, f, _, _) in &left {
                notes.push(format!("kldhost: device fault {f}: QEMU did not complete admin command CID {cid} within {COMPLETION_WAIT:?}; not applied"));
            }
            break;
        }
        if !left.is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    notes
}

fn le64(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3], d[o + 4], d[o + 5], d[o + 6], d[o + 7]])
}

/// Corrupts the Identify data QEMU wrote at `prp1` (NVMe 1.4 Figures 247 and 249: NN at byte
/// 516, MDTS at 77; NSZE 0, NCAP 8, NLBAF 25, FLBAS 26, LBA formats from 128). Returns the
/// log line.
fn corrupt_identify(g: Garbage, prp1: u64, nsid: u32, ram: &nvmehp_lab::shared_ram::SharedRam) -> String {
    let mut d = vec![0u8; 4096];
    if ram.read(prp1, &mut d).is_err() {
        return format!("kldhost: device fault identify-garbage={}: PRP1 {prp1:#x} is not guest RAM; not applied", g.name());
    }
    let format = (d[26] & 0xf) as usize;
    let what = match g {
        Garbage::Nn => {
            d[516..520].copy_from_slice(&u32::MAX.to_le_bytes());
            "Identify Controller NN = 0xffffffff".to_string()
        }
        Garbage::Mdts => {
            d[77] = 0xff;
            "Identify Controller MDTS = 255".to_string()
        }
        Garbage::Flbas => {
            let nlbaf = d[25];
            d[26] = (d[26] & !0xf) | (nlbaf + 1).min(15);
            format!("Identify Namespace {nsid} FLBAS = {} with NLBAF {nlbaf}", d[26] & 0xf)
        }
        Garbage::Lbads0 | Garbage::Lbads63 => {
            let v = if g == Garbage::Lbads0 { 0 } else { 63 };
            d[128 + 4 * format + 2] = v;
            format!("Identify Namespace {nsid} LBA format {format} LBADS = {v}")
        }
        Garbage::Nsze0 => {
            d[0..8].fill(0);
            format!("Identify Namespace {nsid} NSZE = 0 (NCAP {})", le64(&d, 8))
        }
        Garbage::NcapAboveNsze => {
            let ncap = le64(&d, 0) + 1;
            d[8..16].copy_from_slice(&ncap.to_le_bytes());
            format!("Identify Namespace {nsid} NCAP = {ncap} > NSZE {}", ncap - 1)
        }
    };
    let _ = ram.write(prp1, &d);
    format!("kldhost: injected device fault identify-garbage={}: {what}, after QEMU's completion", g.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints() {
        for s in ["cap-to=1", "rdy-never", "rdy-slow=300", "no-stop", "csts-cfs", "identify-garbage=flbas", "identify-garbage=lbads63", "cqe-cid=3", "admin-latency=900", "busmaster-stuck", "io-stall=2", "header-layout=127"] {
            assert_eq!(parse(s).map(|f| f.to_string()), Ok(s.to_string()));
        }
        assert_eq!(parse("cap-to:2"), Ok(Fault::CapTo(2)));
        assert_eq!(parse("cqe-cid"), Ok(Fault::CqeCid(1)));
        assert_eq!(parse("io-stall"), Ok(Fault::IoStall(0)));
        assert_eq!(parse("admin-latency:50"), Ok(Fault::AdminLatency(50)));
        for bad in ["cap-to", "cap-to=256", "rdy-slow", "identify-garbage", "identify-garbage=x", "rdy-never=1", "admin-latency", "admin-latency=", "admin-latency=-1", "admin-latency=1.5", "nonsense", "busmaster-stuck=1", "io-stall=x", "header-layout", "header-layout=128"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn a_stuck_bus_master_bit_stays_set_only_once_set_and_only_on_nvme() {
        arm(vec![Fault::BusmasterStuck]);
        // pci_disable_busmaster's 16-bit write of the command register, bit set before.
        assert_eq!(on_config_write(CLASS_NVME, 0x04, 0x0002, 2, 0x0006).0, 0x0006);
        // A 32-bit write at 0x04 (command + status) and a byte write of it.
        assert_eq!(on_config_write(CLASS_NVME, 0x04, 0x0010_0002, 4, 0x0006).0, 0x0010_0006);
        assert_eq!(on_config_write(CLASS_NVME, 0x04, 0x02, 1, 0x0006).0, 0x06);
        // Not set before (enumeration turning decoding off): passed on as written.
        assert_eq!(on_config_write(CLASS_NVME, 0x04, 0x0000, 2, 0x0003).0, 0x0000);
        // Another register, another class (a bridge).
        assert_eq!(on_config_write(CLASS_NVME, 0x06, 0x0000, 2, 0x0006).0, 0x0000);
        assert_eq!(on_config_write(0x06_04_00, 0x04, 0x0002, 2, 0x0006).0, 0x0002);
        arm(Vec::new());
        assert_eq!(on_config_write(CLASS_NVME, 0x04, 0x0002, 2, 0x0006).0, 0x0002);
    }
}
