//! Fatal traps in module code, as sys/amd64/amd64/trap.c `trap_fatal` reports them.
//!
//! The module's code runs in this process, so a bad access or jump in it is a SIGSEGV here.
//! The SIGSEGV handler ([`super::mmio`]'s, installed for every run by [`install`]) serves the
//! BAR windows first; any other fault comes here. A fault whose instruction pointer is in the
//! module, or is itself the freed-memory poison (a jump to it), is the kernel's fatal trap:
//! the trap_fatal lines, then an emulated panic (exit [`super::PANIC_EXIT`]), never a Rust
//! crash. Anything else (a fault in kldhost's own code) keeps the default action.
//!
//! What the kernel would see, and so the rule named:
//! - freed memory holds 0xdeadc0de (sys/vm/uma_dbg.c trash_dtor, as [`super::kern`]'s `free`
//!   fills it); a pointer read from it is 0xdeadc0dedeadc0de, which is non-canonical on amd64:
//!   a call or jump to it, or a load or store through it, is trap 9, a general protection
//!   fault (Linux: SIGSEGV with si_code SI_KERNEL). The call is CallThroughFreedPointer (the
//!   target is read from the instruction's operand, or is the faulting instruction pointer on
//!   CPUs that report the fetch), the access UseAfterFree (a register holds the poison);
//! - a fault in the NULL page is trap 12, a page fault; after destroy_dev zeroed a non-NULL
//!   `si_drv1` (sys/kern/kern_conf.c destroy_devl) it is reported as DrvThroughDestroyedNode.
//!
//! The handler calls into the emulation (log, panic), which is sound for the same reason as
//! mmio's: the fault is synchronous in module code, which never runs with the emulation's lock
//! held.

use super::rules::{self, Rule};
use super::{kernel_panic, log};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

static MODULE_START: AtomicU64 = AtomicU64::new(0);
static MODULE_END: AtomicU64 = AtomicU64::new(0);

/// The 64-bit value a pointer read from freed memory has.
pub const POISON64: u64 = ((super::kern::FREE_POISON as u64) << 32) | super::kern::FREE_POISON as u64;

/// Linux's si_code for a fault the CPU raised without a page fault (#GP on amd64).
const SI_KERNEL: i32 = 0x80;

/// The module's mapping is `size` bytes at `base`: faults there are the kernel's fatal traps.
pub fn install(base: u64, size: u64) {
    MODULE_START.store(base, Ordering::Relaxed);
    MODULE_END.store(base + size, Ordering::Relaxed);
    super::mmio::install_handler();
}

fn in_module(a: u64) -> bool {
    a >= MODULE_START.load(Ordering::Relaxed) && a < MODULE_END.load(Ordering::Relaxed)
}

/// Whether `v` carries the poison: the whole word, or its upper half (a 64-bit pointer
/// built from a poisoned word and an offset added to it).
fn poisoned(v: u64) -> bool {
    v == POISON64 || (v >> 32) as u32 == super::kern::FREE_POISON
}

/// Reads 8 bytes of this process at `addr` without faulting (None if unmapped).
fn peek(addr: u64) -> Option<u64> {
    let mut v = 0u64;
    let local = libc::iovec { iov_base: (&raw mut v).cast(), iov_len: 8 };
    let remote = libc::iovec { iov_base: addr as *mut c_void, iov_len: 8 };
    // SAFETY: process_vm_readv on this process copies into `v`, and fails (instead of
    // faulting) when `addr` is not mapped.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == 8).then_some(v)
}

/// The target of an indirect `call`/`jmp` (FF /2, FF /4) at `rip`, read as the CPU would.
fn indirect_target(code: &[u8], rip: u64, gregs: &[i64]) -> Option<u64> {
    let mut i = 0;
    let mut rex = 0u8;
    if (0x40..=0x4f).contains(code.first()?) {
        rex = code[0];
        i = 1;
    }
    if *code.get(i)? != 0xff {
        return None;
    }
    let modrm = *code.get(i + 1)?;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if reg != 2 && reg != 4 {
        return None;
    }
    let r = |n: u8| gregs[greg(n)] as u64;
    let rm_full = rm | ((rex & 1) << 3);
    if md == 3 {
        return Some(r(rm_full));
    }
    let mut len = i + 2;
    let mut ea: u64;
    if rm == 4 {
        let sib = *code.get(i + 2)?;
        len += 1;
        let (scale, index, base) = (sib >> 6, ((sib >> 3) & 7) | ((rex & 2) << 2), (sib & 7) | ((rex & 1) << 3));
        ea = if index == 4 { 0 } else { r(index) << scale };
        if md == 0 && base & 7 == 5 {
            let d = code.get(len..len + 4)?;
            ea = ea.wrapping_add(i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]])) as u64);
            len += 4;
        } else {
            ea = ea.wrapping_add(r(base));
        }
    } else if md == 0 && rm == 5 {
        let d = code.get(len..len + 4)?;
        len += 4;
        ea = (rip + len as u64).wrapping_add(i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]])) as u64);
    } else {
        ea = r(rm_full);
    }
    match md {
        1 => ea = ea.wrapping_add(i64::from(*code.get(len)? as i8) as u64),
        2 => {
            let d = code.get(len..len + 4)?;
            ea = ea.wrapping_add(i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]])) as u64);
        }
        _ => {}
    }
    peek(ea)
}

/// The ucontext gregs index of an encoded register number (Linux <sys/ucontext.h> order).
fn greg(reg: u8) -> usize {
    const MAP: [i32; 16] = [
        libc::REG_RAX, libc::REG_RCX, libc::REG_RDX, libc::REG_RBX, libc::REG_RSP, libc::REG_RBP, libc::REG_RSI, libc::REG_RDI,
        libc::REG_R8, libc::REG_R9, libc::REG_R10, libc::REG_R11, libc::REG_R12, libc::REG_R13, libc::REG_R14, libc::REG_R15,
    ];
    MAP[reg as usize & 15] as usize
}

/// trap_fatal's report of trap `ty` at `rip` (and the fault address of a page fault).
fn trap_lines(ty: u32, rip: u64, eva: Option<u64>) {
    let msg = if ty == 9 { "general protection fault" } else { "page fault" };
    log(format!("Fatal trap {ty}: {msg} while in kernel mode"));
    if let Some(eva) = eva {
        log(format!("fault virtual address\t= {eva:#x}"));
    }
    log(format!("instruction pointer\t= 0x20:{rip:#x}"));
}

/// A SIGSEGV outside every BAR window. Returns (the caller restores the default action) when
/// the fault is not the module's; otherwise reports the fatal trap and ends the process.
pub(crate) fn fatal_trap(info: *const libc::siginfo_t, uc: &libc::ucontext_t) {
    // SAFETY: the kernel passes a valid siginfo for SIGSEGV.
    let (addr, code) = unsafe { ((*info).si_addr() as u64, (*info).si_code) };
    let gregs = &uc.uc_mcontext.gregs;
    let rip = gregs[libc::REG_RIP as usize] as u64;
    if poisoned(rip) {
        trap_lines(9, rip, None);
        rules::panic(
            Rule::CallThroughFreedPointer,
            &format!("general protection fault: instruction fetch at {rip:#x}, a function pointer read from freed memory"),
        );
    }
    if !in_module(rip) {
        // The emulated kernel's own code calling the module's callback (a task, a callout,
        // d_gone) through a pointer in freed memory: on CPUs that fault on the branch, the
        // instruction pointer is still at the call.
        if code == SI_KERNEL {
            // SAFETY: rip is in this process's own text (it was executing there).
            let insn = unsafe { std::slice::from_raw_parts(rip as *const u8, 16) };
            if let Some(target) = indirect_target(insn, rip, gregs).filter(|t| poisoned(*t)) {
                trap_lines(9, rip, None);
                rules::panic(
                    Rule::CallThroughFreedPointer,
                    &format!("general protection fault: the kernel called the module through {target:#x}, a callback pointer read from freed memory, at {rip:#x}"),
                );
            }
        }
        return;
    }
    // SAFETY: the faulting instruction is in the module's mapped text (checked above); 16 bytes
    // is the longest x86 instruction and the mapping is page-granular.
    let insn = unsafe { std::slice::from_raw_parts(rip as *const u8, 16) };
    let gp = code == SI_KERNEL;
    if gp {
        if let Some(target) = indirect_target(insn, rip, gregs).filter(|t| poisoned(*t)) {
            trap_lines(9, rip, None);
            rules::panic(
                Rule::CallThroughFreedPointer,
                &format!("general protection fault: call through {target:#x}, a function pointer read from freed memory, at {rip:#x}"),
            );
        }
        if let Some(v) = gregs[..16].iter().map(|&g| g as u64).find(|&v| poisoned(v)) {
            trap_lines(9, rip, None);
            rules::panic(Rule::UseAfterFree, &format!("general protection fault: access through {v:#x}, a pointer read from freed memory, at {rip:#x}"));
        }
        trap_lines(9, rip, None);
        kernel_panic(&format!("general protection fault at {rip:#x} in the module: {:02x?}", &insn[..8]));
    }
    trap_lines(12, rip, Some(addr));
    if addr < 4096 {
        if let Some(name) = super::devfs::last_zeroed_drv1() {
            rules::panic(
                Rule::DrvThroughDestroyedNode,
                &format!("page fault: fault virtual address {addr:#x} at {rip:#x}: NULL, as destroy_dev({name}) left si_drv1"),
            );
        }
    }
    if poisoned(addr) || addr as u32 == super::kern::FREE_POISON {
        rules::panic(Rule::UseAfterFree, &format!("page fault: fault virtual address {addr:#x}, a pointer read from freed memory, at {rip:#x}"));
    }
    kernel_panic(&format!("page fault: fault virtual address {addr:#x} at {rip:#x} in the module"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indirect_call_targets_are_read_as_the_cpu_reads_them() {
        let slot: u64 = POISON64;
        let mut gregs = [0i64; 23];
        gregs[greg(3)] = (&raw const slot) as i64 - 8; // rbx
        gregs[greg(0)] = POISON64 as i64; // rax
        // call *0x8(%rbx)
        assert_eq!(indirect_target(&[0xff, 0x53, 0x08], 0, &gregs), Some(POISON64));
        // call *%rax, jmp *%rax
        assert_eq!(indirect_target(&[0xff, 0xd0], 0, &gregs), Some(POISON64));
        assert_eq!(indirect_target(&[0xff, 0xe0], 0, &gregs), Some(POISON64));
        // jmp *0x8(%rbx,%riz) via SIB with no index
        assert_eq!(indirect_target(&[0xff, 0x64, 0x23, 0x08], 0, &gregs), Some(POISON64));
        // inc (%rax) (FF /0) is not a call
        assert_eq!(indirect_target(&[0xff, 0x00], 0, &gregs), None);
        // An unmapped operand is read as nothing, not a fault.
        gregs[greg(3)] = 8;
        assert_eq!(indirect_target(&[0xff, 0x53, 0x08], 0, &gregs), None);
        assert!(poisoned(POISON64 + 0x18) && !poisoned(0xdeadc0de) && !poisoned(0x1234));
    }
}
