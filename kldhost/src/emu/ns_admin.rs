//! The firmware-like side of `run --qemu --namespace ACTION:NSID`: a second host in the NVMe
//! subsystem of the module's controller, changing which namespaces that controller has.
//!
//! QEMU 10 sends a controller the Asynchronous Event "Notice: Namespace Attribute Changed"
//! (and sets the namespace's bit in its Changed Namespace List log) when a Namespace
//! Attachment admin command (opcode 15h) attaches a namespace of its subsystem to it or
//! detaches one from it: hw/nvme/ctrl.c `nvme_ns_attachment` does that for each controller of
//! the command's controller list, whichever controller the command came to. QEMU cannot
//! hot-plug an `nvme-ns` into a live controller (`device_add nvme-ns` answers "Bus '...' does
//! not support hotplugging"), so this is how a namespace comes and goes on the lab's machine.
//!
//! The machine ([`super::machine::Machine::start_with_subsystem`]) has the module's
//! controller and a lab-private one in one `nvme-subsys`, with shared namespaces. The private
//! controller is not on the emulated pci0 (its config space reads all-ones to the kernel), so
//! neither the module nor the nvme(4) stand-in claims it. This client drives it over qtest, as
//! minimal firmware would: CC.EN = 0, an admin queue pair of [`QSIZE`] entries in guest RAM at
//! [`ADMIN_RAM`] (below the module's contigmalloc pool and above the MSI-X mailboxes, so no
//! memory of the module's), CC.EN = 1, CSTS.RDY, then one command at a time: the entry, the
//! SQ tail doorbell, the completion polled in the CQ (phase tag), the CQ head doorbell. No
//! interrupts (INTx Disable set, MSI-X off): the polling is the whole completion path.
//!
//! The target's CNTLID is learnt, not assumed: Identify Controller (CNS 01h) gives the private
//! controller's own CNTLID, Identify CNS 13h the subsystem's controller list; the target is
//! the one other controller in it.

use nvmehp_lab::firmware::{self, Bdf, PciFunction};

use super::machine::Machine;

/// Guest-physical base of the client's memory: the admin SQ, then the CQ, then a data page.
pub const ADMIN_RAM: u64 = 8 << 20;
/// Entries per admin queue.
pub const QSIZE: u16 = 4;
const ASQ: u64 = ADMIN_RAM;
const ACQ: u64 = ADMIN_RAM + 0x1000;
const DATA: u64 = ADMIN_RAM + 0x2000;

/// How long a register wait or a command may take.
const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The lab-private controller and its admin queue state.
#[derive(Debug)]
pub struct PrivateCtrl {
    f: PciFunction,
    up: bool,
    dstrd: u32,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    cid: u16,
    /// Its own CNTLID and the module's controller's, once learnt.
    own: Option<u16>,
    target: Option<u16>,
}

/// One completion: DW0 and the status field (SCT/SC, without the phase tag).
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub dw0: u32,
    pub status: u16,
}

impl PrivateCtrl {
    pub fn new(f: PciFunction) -> PrivateCtrl {
        PrivateCtrl { f, up: false, dstrd: 0, sq_tail: 0, cq_head: 0, phase: true, cid: 0, own: None, target: None }
    }

    pub fn bdf(&self) -> Bdf {
        self.f.bdf
    }
}

fn q<T>(m: &Machine, f: impl FnOnce(&mut nvmehp_lab::qtest::Qtest) -> nvmehp_lab::qtest::QtestResult<T>) -> Result<T, String> {
    m.qtest(f).map_err(|e| format!("qtest: {e}"))
}

fn wait_for(m: &Machine, bar0: u64, what: &str, ok: impl Fn(u32) -> bool) -> Result<(), String> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = q(m, |q| q.readl(bar0 + 0x1c))?;
        if ok(v) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("CSTS {v:#x}: {what} not reached in {WAIT:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Brings the private controller up (once) and learns the CNTLIDs; returns the log lines.
fn bring_up(m: &mut Machine, c: &mut PrivateCtrl, out: &mut Vec<String>) -> Result<(), String> {
    if c.up {
        return Ok(());
    }
    let (bdf, bar0) = (c.f.bdf, c.f.bar0);
    // Memory decode and bus mastering on (it reads its queues and writes completions), INTx
    // off: its interrupt line is shared with functions the kernel drives.
    q(m, |q| firmware::cfg_write16(q, bdf, firmware::cfg::COMMAND, 0x0002 | firmware::cfg::CMD_BUS_MASTER | 0x0400))?;
    let cap = q(m, |q| q.readq(bar0))?;
    c.dstrd = ((cap >> 32) & 0xf) as u32;
    q(m, |q| q.writel(bar0 + 0x14, 0))?;
    wait_for(m, bar0, "RDY = 0", |v| v & 1 == 0)?;
    m.ram().fill(ADMIN_RAM, 0x3000, 0).map_err(|e| format!("guest RAM: {e:?}"))?;
    let qs = u32::from(QSIZE - 1);
    q(m, |q| {
        q.writel(bar0 + 0x24, qs << 16 | qs)?;
        q.writeq(bar0 + 0x28, ASQ)?;
        q.writeq(bar0 + 0x30, ACQ)?;
        // IOCQES 4, IOSQES 6, MPS 0 (4 KiB), CSS NVM, EN.
        q.writel(bar0 + 0x14, 4 << 20 | 6 << 16 | 1)
    })?;
    wait_for(m, bar0, "RDY = 1", |v| v & 1 == 1)?;
    c.sq_tail = 0;
    c.cq_head = 0;
    c.phase = true;
    c.up = true;
    out.push(format!(
        "subsystem: private controller {:02x}:{:02x}.{} enabled (BAR0 {:#x}, admin SQ {ASQ:#x}, CQ {ACQ:#x}, {QSIZE} entries)",
        bdf.bus, bdf.dev, bdf.func, bar0
    ));
    // Identify Controller: its CNTLID (bytes 78-79).
    let cqe = command(m, c, 0x06, 0, 1, 0)?;
    check(cqe, "Identify Controller")?;
    let mut id = [0u8; 80];
    m.ram().read(DATA, &mut id).map_err(|e| format!("guest RAM: {e:?}"))?;
    let own = u16::from_le_bytes([id[78], id[79]]);
    // Identify CNS 13h: the subsystem's controllers, from CNTID 0.
    let cqe = command(m, c, 0x06, 0, 0x13, 0)?;
    check(cqe, "Identify Controller List (CNS 13h)")?;
    let mut list = [0u8; 2 + 2 * 16];
    m.ram().read(DATA, &mut list).map_err(|e| format!("guest RAM: {e:?}"))?;
    let n = usize::from(u16::from_le_bytes([list[0], list[1]])).min(16);
    let ids: Vec<u16> = (0..n).map(|i| u16::from_le_bytes([list[2 + 2 * i], list[3 + 2 * i]])).collect();
    let others: Vec<u16> = ids.iter().copied().filter(|&i| i != own).collect();
    out.push(format!("subsystem: private controller's CNTLID {own}; Identify CNS 13h lists the subsystem's controllers {ids:?}"));
    let [target] = others[..] else {
        return Err(format!("expected one other controller in the subsystem, found {others:?}"));
    };
    c.own = Some(own);
    c.target = Some(target);
    Ok(())
}

fn check(c: Completion, what: &str) -> Result<(), String> {
    if c.status == 0 {
        Ok(())
    } else {
        Err(format!("{what}: status {:#x} (SCT {}, SC {:#x}{})", c.status, (c.status >> 8) & 7, c.status & 0xff, if c.status & 0x4000 != 0 { ", DNR" } else { "" }))
    }
}

/// One Namespace Attachment of `nsid` for the controller `cntlid` (a list of one).
fn send_attachment(m: &mut Machine, c: &mut PrivateCtrl, attach: bool, nsid: u32, cntlid: u16, out: &mut Vec<String>) -> Result<(), String> {
    let mut data = [0u8; 4];
    data[0..2].copy_from_slice(&1u16.to_le_bytes());
    data[2..4].copy_from_slice(&cntlid.to_le_bytes());
    m.ram().fill(DATA, 4096, 0).map_err(|e| format!("guest RAM: {e:?}"))?;
    m.ram().write(DATA, &data).map_err(|e| format!("guest RAM: {e:?}"))?;
    let what = if attach { "attach" } else { "detach" };
    let whose = if Some(cntlid) == c.own { " (the private controller itself)" } else { "" };
    let cqe = command(m, c, 0x15, nsid, if attach { 0 } else { 1 }, 0)?;
    out.push(format!("subsystem: Namespace Attachment ({what}) of namespace {nsid} for CNTLID {cntlid}{whose}: status {:#x}", cqe.status));
    check(cqe, "Namespace Attachment")
}

/// The namespace's LBA formats from Identify Namespace (CNS 00h) through the private
/// controller: (the format in use, [(LBADS, MS)] per format).
fn lba_formats(m: &mut Machine, c: &mut PrivateCtrl, nsid: u32) -> Result<(usize, Vec<(u8, u16)>), String> {
    let cqe = command(m, c, 0x06, nsid, 0, 0)?;
    check(cqe, "Identify Namespace")?;
    let mut id = [0u8; 192];
    m.ram().read(DATA, &mut id).map_err(|e| format!("guest RAM: {e:?}"))?;
    let nlbaf = usize::from(id[25]) + 1;
    let flbas = usize::from(id[26] & 0xf) | usize::from(id[26] >> 5 & 3) << 4;
    let f = (0..nlbaf.min(16)).map(|i| (id[128 + 4 * i + 2], u16::from_le_bytes([id[128 + 4 * i], id[128 + 4 * i + 1]]))).collect();
    Ok((flbas, f))
}

/// Format NVM (opcode 80h, SES 0) of `nsid` to the other of 512 and 4096-byte blocks, no
/// metadata, through the private controller (which must have the namespace attached).
fn format_other_block_size(m: &mut Machine, c: &mut PrivateCtrl, nsid: u32, out: &mut Vec<String>) -> Result<(), String> {
    let (cur, lbafs) = lba_formats(m, c, nsid)?;
    let now = lbafs.get(cur).map_or(0, |f| f.0);
    let want = if now == 9 { 12 } else { 9 };
    let Some(i) = lbafs.iter().position(|&(lbads, ms)| lbads == want && ms == 0) else {
        return Err(format!("namespace {nsid} has no LBA format of {} bytes without metadata: {lbafs:?}", 1u32 << want));
    };
    let cqe = command(m, c, 0x80, nsid, i as u32 & 0xf | ((i as u32 >> 4) & 3) << 12, 0)?;
    out.push(format!("subsystem: Format NVM of namespace {nsid} to LBA format {i} ({} bytes, was {}): status {:#x}", 1u32 << want, 1u32 << now, cqe.status));
    check(cqe, "Format NVM")
}

/// Identify CNS 12h: the CNTLIDs of the controllers `nsid` is attached to.
fn attached_ctrls(m: &mut Machine, c: &mut PrivateCtrl, nsid: u32) -> Result<Vec<u16>, String> {
    let cqe = command(m, c, 0x06, nsid, 0x12, 0)?;
    check(cqe, "Identify Namespace Attached Controller List (CNS 12h)")?;
    let mut list = [0u8; 2 + 2 * 16];
    m.ram().read(DATA, &mut list).map_err(|e| format!("guest RAM: {e:?}"))?;
    let n = usize::from(u16::from_le_bytes([list[0], list[1]])).min(16);
    Ok((0..n).map(|i| u16::from_le_bytes([list[2 + 2 * i], list[3 + 2 * i]])).collect())
}

/// Sends one admin command (data, if any, in the [`DATA`] page) and polls its completion.
fn command(m: &mut Machine, c: &mut PrivateCtrl, opcode: u8, nsid: u32, cdw10: u32, cdw11: u32) -> Result<Completion, String> {
    let bar0 = c.f.bar0;
    c.cid = c.cid.wrapping_add(1);
    let mut sqe = [0u8; 64];
    sqe[0] = opcode;
    sqe[2..4].copy_from_slice(&c.cid.to_le_bytes());
    sqe[4..8].copy_from_slice(&nsid.to_le_bytes());
    sqe[24..32].copy_from_slice(&DATA.to_le_bytes()); // PRP1
    sqe[40..44].copy_from_slice(&cdw10.to_le_bytes());
    sqe[44..48].copy_from_slice(&cdw11.to_le_bytes());
    let ram = |e| format!("guest RAM: {e:?}");
    m.ram().write(ASQ + u64::from(c.sq_tail) * 64, &sqe).map_err(ram)?;
    c.sq_tail = (c.sq_tail + 1) % QSIZE;
    let tail = u32::from(c.sq_tail);
    q(m, |q| q.writel(bar0 + 0x1000, tail))?;
    let at = ACQ + u64::from(c.cq_head) * 16;
    let deadline = std::time::Instant::now() + WAIT;
    let (dw0, dw3) = loop {
        let dw3 = m.ram().load_u32(at + 12).map_err(ram)?;
        if (dw3 >> 16) & 1 == u32::from(c.phase) {
            break (m.ram().load_u32(at).map_err(ram)?, dw3);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("opcode {opcode:#x}: no completion in {WAIT:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    if dw3 & 0xffff != u32::from(c.cid) {
        return Err(format!("opcode {opcode:#x}: completion of CID {} where {} was sent", dw3 & 0xffff, c.cid));
    }
    c.cq_head = (c.cq_head + 1) % QSIZE;
    if c.cq_head == 0 {
        c.phase = !c.phase;
    }
    let head = u32::from(c.cq_head);
    let db = bar0 + 0x1000 + (1u64 << (2 + c.dstrd));
    q(m, |q| q.writel(db, head))?;
    Ok(Completion { dw0, status: ((dw3 >> 17) & 0x7fff) as u16 })
}

/// Namespace Attachment (opcode 15h) of `nsid` for the module's controller, through the
/// private controller: `attach` SEL 0, else SEL 1 (detach); the data is a controller list of
/// one entry, the module's controller's CNTLID. Returns the host-side log lines (also on
/// failure, with the reason last).
pub fn run(op: NsOp, nsid: u32) -> Result<Vec<String>, Vec<String>> {
    super::machine::with_machine(|m| {
        let mut out = Vec::new();
        let Some(mut c) = m.private.take() else {
            out.push("subsystem: no private controller on this machine (run --qemu --namespace starts one)".to_string());
            return Err(out);
        };
        let r = (|| -> Result<(), String> {
            bring_up(m, &mut c, &mut out)?;
            let target = c.target.expect("learnt by bring_up");
            let own = c.own.expect("learnt by bring_up");
            let before = attached_ctrls(m, &mut c, nsid)?;
            out.push(format!("subsystem: Identify CNS 12h: namespace {nsid} is attached to controllers {before:?}"));
            if op != NsOp::Attach && !before.contains(&target) {
                // QEMU 10.0.2 asserts (the process aborts) on the detach of a namespace the
                // controller does not have (QEMU issue 2976): never sent.
                return Err(format!("namespace {nsid} is not attached to CNTLID {target}: detach not sent"));
            }
            if op != NsOp::Attach {
                send_attachment(m, &mut c, false, nsid, target, &mut out)?;
            }
            if op == NsOp::Reformat {
                format_other_block_size(m, &mut c, nsid, &mut out)?;
            }
            if matches!(op, NsOp::Attach | NsOp::Reformat) {
                if attached_ctrls(m, &mut c, nsid)?.contains(&own) {
                    // QEMU 10.0.2 refuses an attach (Namespace Already Attached) when the
                    // controller the command comes to has the namespace, whichever controller
                    // the list names (hw/nvme/ctrl.c nvme_ns_attachment checks `nvme_ns(n,
                    // nsid)`, not the target's; QEMU issue 2976, fixed after 10.0.2): the
                    // private controller gives it up first.
                    send_attachment(m, &mut c, false, nsid, own, &mut out)?;
                }
                send_attachment(m, &mut c, true, nsid, target, &mut out)?;
            }
            let after = attached_ctrls(m, &mut c, nsid)?;
            out.push(format!("subsystem: Identify CNS 12h: namespace {nsid} is attached to controllers {after:?}"));
            Ok(())
        })();
        m.private = Some(c);
        match r {
            Ok(()) => Ok(out),
            Err(e) => {
                out.push(format!("subsystem: {e}"));
                Err(out)
            }
        }
    })
}

/// What the subsystem's other host does to a namespace of the module's controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsOp {
    /// Namespace Attachment, SEL 0, for the module's controller.
    Attach,
    /// Namespace Attachment, SEL 1, for the module's controller.
    Detach,
    /// [`NsOp::Detach`], then a read of the namespace's disk sent before the module's threads
    /// run: it reaches a controller that no longer has the namespace.
    DetachRead,
    /// Detach it from the module's controller, Format NVM it to the other block size (512 or
    /// 4096 bytes, no metadata) through the private controller, attach it again: one namespace
    /// ID whose attributes changed, as the module's controller sees it.
    Reformat,
}

impl NsOp {
    pub fn name(self) -> &'static str {
        match self {
            NsOp::Attach => "attach",
            NsOp::Detach => "detach",
            NsOp::DetachRead => "detach+read",
            NsOp::Reformat => "reformat",
        }
    }
}

/// `--namespace ACTION:NSID`: `attach:N`, `detach:N`, `detach+read:N` or `reformat:N` (NSID
/// 1..=256).
pub fn parse(s: &str) -> Result<(NsOp, u32), String> {
    let bad = || format!("--namespace {s}: expected attach:NSID, detach:NSID, detach+read:NSID or reformat:NSID (NSID 1..256)");
    let (a, n) = s.split_once(':').ok_or_else(bad)?;
    let op = match a {
        "attach" => NsOp::Attach,
        "detach" => NsOp::Detach,
        "detach+read" => NsOp::DetachRead,
        "reformat" => NsOp::Reformat,
        _ => return Err(bad()),
    };
    let nsid = n.parse::<u32>().ok().filter(|n| (1..=256).contains(n)).ok_or_else(bad)?;
    Ok((op, nsid))
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespace_actions_parse() {
        assert_eq!(super::parse("detach:2"), Ok((super::NsOp::Detach, 2)));
        assert_eq!(super::parse("attach:1"), Ok((super::NsOp::Attach, 1)));
        assert_eq!(super::parse("reformat:2"), Ok((super::NsOp::Reformat, 2)));
        assert_eq!(super::parse("detach+read:2"), Ok((super::NsOp::DetachRead, 2)));
        assert!(super::parse("detach:0").is_err());
        assert!(super::parse("remove:2").is_err());
        assert!(super::parse("attach").is_err());
    }
}
