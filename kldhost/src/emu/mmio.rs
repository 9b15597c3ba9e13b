//! Memory-mapped register access of the module, forwarded to QEMU.
//!
//! amd64's bus_space(9) is inline (x86/bus.h): `bus_read_4(r, off)` on a memory resource is
//! `*(volatile uint32_t *)(r->r_bushandle + off)`, compiled into the module (the glue's
//! `nvmehp_bus_read_4`/`nvmehp_bus_write_4` are exactly one such load or store). There is no
//! KPI call to emulate, so a BAR resource's handle is the address of a window of this process
//! mapped with no access: each register access faults, and the SIGSEGV handler here
//! - checks the fault address lies in a registered window (anything else: the default action,
//!   a crash, as before),
//! - decodes the faulting instruction, accepting only `mov r32/r64, m` (8B),
//!   `mov m, r32/r64` (89) and `mov m, imm32` (C7 /0) with an optional REX prefix — what the
//!   compiler emits for a volatile load or store (the immediate form when the value is a
//!   constant); anything else aborts naming the bytes,
//! - does the access through qtest at the BAR's physical address, puts a load's value in the
//!   destination register (a 32-bit load zero-extends, as the CPU does) and steps past the
//!   instruction.
//!
//! The handler takes the machine's lock and allocates (qtest I/O, the call log). That is sound
//! here because the fault is synchronous in module code, which holds no host lock: the
//! emulation's state lock is never held while module code runs, and the machine lock only
//! inside emulated functions (a `try_lock` failure aborts instead of deadlocking).
//!
//! The handler replaces the Rust runtime's SIGSEGV handler for the whole process (installed at
//! the first BAR mapping): a stack overflow then ends in a plain SIGSEGV instead of Rust's
//! "has overflowed its stack" message.

use super::{device_fault, log};
use super::machine::MACHINE;
use std::ffi::c_void;
use std::sync::Mutex;

/// One trapping window: `len` bytes at host `base` stand for the BAR at guest-physical `phys`.
#[derive(Clone, Debug)]
struct Window {
    base: u64,
    len: u64,
    phys: u64,
    name: String,
    /// The slot of the function whose BAR this is, and its ejects when the window was mapped
    /// (a later eject means the function is gone: see [`super::machine::Machine::bar_access`]).
    slot: Option<(u8, u64)>,
}

static WINDOWS: Mutex<Vec<Window>> = Mutex::new(Vec::new());

/// Reserves a no-access window of `len` bytes standing for the BAR at `phys`; returns its
/// address (the resource's bus_space handle).
pub fn map_bar(phys: u64, len: u64, name: &str) -> u64 {
    install_handler();
    // SAFETY: a fresh anonymous reservation with no access; unmapped by unmap_bar.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    assert!(p != libc::MAP_FAILED, "kldhost: cannot reserve a BAR window");
    let base = p as u64;
    let slot = super::machine::has_machine().then(|| super::machine::with_machine(|m| m.slot_of_bar(phys).map(|s| (s, m.ejects(s))))).flatten();
    WINDOWS.lock().unwrap_or_else(|e| e.into_inner()).push(Window { base, len, phys, name: name.to_string(), slot });
    base
}

/// Gives the window back (bus_release_resource): a later access is a plain crash.
pub fn unmap_bar(base: u64) {
    let mut w = WINDOWS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = w.iter().position(|x| x.base == base) {
        let x = w.remove(i);
        // SAFETY: the reservation map_bar made.
        unsafe { libc::munmap(x.base as *mut c_void, x.len as usize) };
    }
}

/// Installs the SIGSEGV handler (once): BAR windows here, other faults to [`super::trap`].
pub(crate) fn install_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a SA_SIGINFO handler of the right signature; sigaction is given a zeroed,
        // then filled, struct.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fault as extern "C" fn(_, _, _) as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
        }
    });
}

/// A decoded `mov` between a register (or an immediate) and memory.
#[derive(Debug, PartialEq, Eq)]
pub struct Access {
    pub store: bool,
    /// 4 or 8 bytes.
    pub width: u8,
    /// The register operand (0 = rax ... 15 = r15, the encoding's numbering).
    pub reg: u8,
    /// A store's immediate (C7 /0; sign-extended to 64 bits for a 64-bit store).
    pub imm: Option<u64>,
    /// Instruction length.
    pub len: usize,
}

/// Decodes the instruction at the start of `code`, if it is a plain `mov` to or from memory.
pub fn decode(code: &[u8]) -> Option<Access> {
    let mut i = 0;
    let mut rex = 0u8;
    if (0x40..=0x4f).contains(code.first()?) {
        rex = code[0];
        i = 1;
    }
    let op = *code.get(i)?;
    let store = match op {
        0x8b => false,
        0x89 | 0xc7 => true,
        _ => return None,
    };
    let modrm = *code.get(i + 1)?;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 || (op == 0xc7 && reg != 0) {
        return None; // register to register, or not a mov
    }
    let mut len = i + 2;
    if rm == 4 {
        len += 1; // SIB
        let sib = *code.get(i + 2)?;
        if md == 0 && sib & 7 == 5 {
            len += 4; // no base, disp32
        }
    } else if md == 0 && rm == 5 {
        return None; // RIP-relative: never a register window
    }
    len += match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    let mut imm = None;
    if op == 0xc7 {
        let b = code.get(len..len + 4)?;
        imm = Some(i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])) as u64);
        len += 4;
    }
    Some(Access { store, width: if rex & 8 != 0 { 8 } else { 4 }, reg: reg | ((rex & 4) << 1), imm, len })
}

/// The ucontext gregs index of an encoded register number (Linux <sys/ucontext.h> order).
fn greg(reg: u8) -> usize {
    const MAP: [i32; 16] = [
        libc::REG_RAX, libc::REG_RCX, libc::REG_RDX, libc::REG_RBX, libc::REG_RSP, libc::REG_RBP, libc::REG_RSI, libc::REG_RDI,
        libc::REG_R8, libc::REG_R9, libc::REG_R10, libc::REG_R11, libc::REG_R12, libc::REG_R13, libc::REG_R14, libc::REG_R15,
    ];
    MAP[reg as usize & 15] as usize
}

fn die(msg: &str) -> ! {
    eprintln!("kldhost: {msg}");
    std::process::abort()
}

extern "C" fn on_fault(sig: i32, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSEGV.
    let addr = unsafe { (*info).si_addr() } as u64;
    let win = WINDOWS.lock().ok().and_then(|w| w.iter().find(|x| addr >= x.base && addr < x.base + x.len).cloned());
    let Some(win) = win else {
        // A fault in module code is the kernel's fatal trap (which ends the process).
        // SAFETY: SA_SIGINFO passes the interrupted context as a ucontext_t.
        super::trap::fatal_trap(info, unsafe { &*ctx.cast::<libc::ucontext_t>() });
        // Not ours: the default action on return (the access faults again).
        // SAFETY: resetting a signal's disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
        return;
    };
    // SAFETY: SA_SIGINFO passes the interrupted context as a ucontext_t.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    // SAFETY: the faulting instruction is in the module's mapped text; 16 bytes is the longest
    // x86 instruction.
    let code = unsafe { std::slice::from_raw_parts(rip as *const u8, 16) };
    let Some(a) = decode(code) else {
        die(&format!("register access at {rip:#x} by an instruction kldhost does not emulate: {:02x?}", &code[..8]));
    };
    let off = addr - win.base;
    let phys = win.phys + off;
    let Ok(mut g) = MACHINE.try_lock() else {
        die("register access while the machine is in use (a fault inside the emulation)");
    };
    let Some(m) = g.as_mut() else { die("register access with no machine") };
    let r = greg(a.reg);
    // A function removed since the window was mapped: reads complete with what the machine's
    // removal_reads says, writes go nowhere (see super::machine).
    let gone = win.slot.is_some_and(|(s, at)| m.bar_access(s, at));
    if gone {
        let ones = m.removal_reads == nvmehp_lab::access_faults::RemovalReads::AllOnes;
        drop(g);
        if a.store {
            log(format!("bus_write_{}({} + {off:#x}): the function is gone, dropped", a.width, win.name));
        } else {
            let v = match (ones, a.width) {
                (false, _) => 0,
                (true, 8) => u64::MAX,
                (true, _) => u64::from(u32::MAX),
            };
            uc.uc_mcontext.gregs[r] = v as i64;
            log(format!("bus_read_{}({} + {off:#x}) = {v:#x} (the function is gone)", a.width, win.name));
        }
    } else if a.store {
        // Held doorbell writes that fell due reach QEMU before this access (device_fault::release_due).
        let due = if device_fault::armed() { device_fault::release_due(m, device_fault::At::RegisterAccess) } else { Vec::new() };
        let v = a.imm.unwrap_or(uc.uc_mcontext.gregs[r] as u64);
        // The device-fault layer may hold the write back, or rewrite what QEMU answers to it.
        let fault = device_fault::armed().then(|| device_fault::on_write(win.phys, off, v, a.width, win.slot, m.ram()));
        let res = match &fault {
            Some(w) if !w.forward => Ok(()),
            _ => m.qtest(|q| if a.width == 8 { q.writeq(phys, v) } else { q.writel(phys, v as u32) }),
        };
        let mut notes = Vec::new();
        if let Some(w) = fault {
            notes = w.notes;
            if let (Ok(()), Some(watch)) = (&res, w.watch) {
                notes.extend(device_fault::after_write(watch, m.ram()));
            }
        }
        drop(g);
        if let Err(e) = res {
            die(&format!("qtest write of {} + {off:#x}: {e}", win.name));
        }
        due.into_iter().for_each(log);
        log(format!("bus_write_{}({} + {off:#x}, {v:#x})", a.width, win.name));
        notes.into_iter().for_each(log);
    } else {
        let due = if device_fault::armed() { device_fault::release_due(m, device_fault::At::RegisterAccess) } else { Vec::new() };
        let res = m.qtest(|q| if a.width == 8 { q.readq(phys) } else { q.readl(phys).map(u64::from) });
        drop(g);
        due.into_iter().for_each(log);
        let v = match res {
            Ok(v) => v,
            Err(e) => die(&format!("qtest read of {} + {off:#x}: {e}", win.name)),
        };
        let (v, notes) = if device_fault::armed() { device_fault::on_read(win.phys, off, a.width, v) } else { (v, Vec::new()) };
        uc.uc_mcontext.gregs[r] = v as i64;
        log(format!("bus_read_{}({} + {off:#x}) = {v:#x}", a.width, win.name));
        notes.into_iter().for_each(log);
    }
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] = (rip + a.len as u64) as i64;
}

#[cfg(test)]
mod tests {
    use super::{decode, Access};

    #[test]
    fn decodes_the_glue_accessors() {
        // nvmehp_bus_read_4: movl (%rsi),%eax; nvmehp_bus_write_4: movl %edx,(%rsi).
        assert_eq!(decode(&[0x8b, 0x06]), Some(Access { store: false, width: 4, reg: 0, imm: None, len: 2 }));
        assert_eq!(decode(&[0x89, 0x16]), Some(Access { store: true, width: 4, reg: 2, imm: None, len: 2 }));
        // movq 0x10(%rdi),%r9 (REX.WR, disp8), movl %eax,(%rdi,%rsi) (SIB).
        assert_eq!(decode(&[0x4c, 0x8b, 0x4f, 0x10]), Some(Access { store: false, width: 8, reg: 9, imm: None, len: 4 }));
        assert_eq!(decode(&[0x89, 0x04, 0x37]), Some(Access { store: true, width: 4, reg: 0, imm: None, len: 3 }));
        // A constant stored: movl $0x10001,0x24(%r15) (REX.B, disp8, imm32) and
        // movl $0x10001,0x24(%r12) (REX.B, SIB, disp8, imm32).
        assert_eq!(decode(&[0x41, 0xc7, 0x47, 0x24, 0x01, 0x00, 0x01, 0x00]), Some(Access { store: true, width: 4, reg: 0, imm: Some(0x10001), len: 8 }));
        assert_eq!(
            decode(&[0x41, 0xc7, 0x44, 0x24, 0x24, 0x01, 0x00, 0x01, 0x00]),
            Some(Access { store: true, width: 4, reg: 0, imm: Some(0x10001), len: 9 })
        );
        // C7 with a /1..7 reg field is not a mov.
        assert_eq!(decode(&[0xc7, 0x4f, 0x24, 0, 0, 0, 0]), None);
        // Not emulated: inl, register moves, RIP-relative operands.
        assert_eq!(decode(&[0xed]), None);
        assert_eq!(decode(&[0x89, 0xc0]), None);
        assert_eq!(decode(&[0x8b, 0x05, 0, 0, 0, 0]), None);
    }
}
