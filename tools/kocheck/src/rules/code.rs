//! Machine-code rules, checked by disassembling every executable section.
//!
//! Kernel code on amd64 must not touch FPU/SIMD state: the kernel does not save the user's
//! x87/SSE/AVX registers on entry (only `fpu_kern_enter` does), so one stray `movaps` corrupts
//! a user process. It must not use the red zone: interrupts and exceptions run on the same
//! kernel stack and write just below `%rsp`. It must not use `%fs` (user TLS base; nothing
//! sensible in the kernel) nor, by default, `%gs` (the per-CPU base: only the kernel's own
//! `PCPU_*`/`curthread` sequences belong there, and Rust code should reach them via KPI calls).

use crate::ko::{Ko, Section};
use crate::report::Verdict;
use crate::rules::stack::Frame;
use iced_x86::{
    CpuidFeature, Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, InstructionInfoFactory, Mnemonic,
    OpKind, Register,
};

pub struct Options {
    /// Accept `%gs:`-relative memory operands (per-CPU data). Never `%fs`, never `swapgs`/`wrgsbase`.
    pub allow_gs_pcpu: bool,
    /// Largest stack reservation accepted in one function, in bytes.
    pub max_frame: u64,
}

#[derive(Default)]
struct Findings {
    undecodable: Vec<String>,
    simd: Vec<String>,
    x87: Vec<String>,
    red_zone: Vec<String>,
    seg: Vec<String>,
    frames: Vec<Frame>,
    instructions: usize,
    bytes: usize,
}

/// Registers whose contents belong to the FPU/SIMD state the kernel does not preserve:
/// mm (MMX), xmm/ymm/zmm (SSE/AVX), k (AVX-512 masks), tmm (AMX), st (x87).
fn is_fpu_state_register(r: Register) -> bool {
    r.is_mm() || r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_k() || r.is_tmm() || r.is_st()
}

/// Instructions that read or write FPU/SIMD state without naming a vector register.
const FPU_STATE_MNEMONICS: [Mnemonic; 16] = [
    Mnemonic::Emms,
    Mnemonic::Femms,
    Mnemonic::Ldmxcsr,
    Mnemonic::Stmxcsr,
    Mnemonic::Vldmxcsr,
    Mnemonic::Vstmxcsr,
    Mnemonic::Fxsave,
    Mnemonic::Fxsave64,
    Mnemonic::Fxrstor,
    Mnemonic::Fxrstor64,
    Mnemonic::Xsave,
    Mnemonic::Xsave64,
    Mnemonic::Xrstor,
    Mnemonic::Xrstor64,
    Mnemonic::Vzeroupper,
    Mnemonic::Vzeroall,
];

const X87_FEATURES: [CpuidFeature; 5] = [
    CpuidFeature::FPU,
    CpuidFeature::FPU287,
    CpuidFeature::FPU287XL_ONLY,
    CpuidFeature::FPU387,
    CpuidFeature::FPU387SL_ONLY,
];

const SEG_BASE_MNEMONICS: [Mnemonic; 5] =
    [Mnemonic::Rdfsbase, Mnemonic::Rdgsbase, Mnemonic::Wrfsbase, Mnemonic::Wrgsbase, Mnemonic::Swapgs];

fn has_memory_operand(ins: &Instruction) -> bool {
    ins.op_kinds().any(|k| k == OpKind::Memory)
}

fn register_operands(ins: &Instruction) -> impl Iterator<Item = Register> + '_ {
    (0..ins.op_count()).filter(|&i| ins.op_kind(i) == OpKind::Register).map(|i| ins.op_register(i))
}

fn scan_section(ko: &Ko, sec: &Section, opts: &Options, f: &mut Findings) {
    let mut decoder = Decoder::with_ip(64, &sec.data, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut fmt = GasFormatter::new();
    let mut ins = Instruction::default();
    let mut frames = FrameTracker::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut ins);
        f.instructions += 1;
        let at = || ko.describe(sec.index, ins.ip());
        let text = |fmt: &mut GasFormatter, ins: &Instruction| {
            let mut s = String::new();
            fmt.format(ins, &mut s);
            s
        };
        if ins.is_invalid() {
            f.undecodable.push(format!("{}: bytes do not decode as x86-64", at()));
            continue;
        }

        let simd_reg = register_operands(&ins)
            .chain(info.info(&ins).used_registers().iter().map(|u| u.register()))
            .chain([ins.memory_index()])
            .any(|r| is_fpu_state_register(r) && !r.is_st());
        let x87 = ins.cpuid_features().iter().any(|c| X87_FEATURES.contains(c))
            || info.info(&ins).used_registers().iter().any(|u| u.register().is_st());
        if x87 {
            f.x87.push(format!("{}: {}", at(), text(&mut fmt, &ins)));
        } else if simd_reg || FPU_STATE_MNEMONICS.contains(&ins.mnemonic()) {
            f.simd.push(format!("{}: {}", at(), text(&mut fmt, &ins)));
        }

        // Only explicit memory operands: push/call write below %rsp by design, after moving it.
        // An index register does not make a negative displacement safe: compilers address
        // red-zone arrays as -N(%rsp,%idx,4).
        let is_access = has_memory_operand(&ins) && !matches!(ins.mnemonic(), Mnemonic::Lea | Mnemonic::Nop);
        if is_access
            && matches!(ins.memory_base(), Register::RSP | Register::ESP)
            && (ins.memory_displacement64() as i64) < 0
        {
            f.red_zone.push(format!("{}: {}", at(), text(&mut fmt, &ins)));
        }

        if let Some(bytes) = frames.step(&ins) {
            f.frames.push(Frame { at: at(), bytes });
        }

        let prefix = ins.segment_prefix();
        let seg_mem = has_memory_operand(&ins)
            && (prefix == Register::FS || (prefix == Register::GS && !opts.allow_gs_pcpu));
        let seg_reg = register_operands(&ins).any(|r| r == Register::FS || r == Register::GS);
        if seg_mem || seg_reg || SEG_BASE_MNEMONICS.contains(&ins.mnemonic()) {
            f.seg.push(format!("{}: {}", at(), text(&mut fmt, &ins)));
        }
    }
    f.bytes += sec.data.len();
}

/// Finds stack reservations in an instruction stream: `sub $N,%rsp`, and the inline
/// stack-probe form that computes the frame bottom first (`mov %rsp,%r11; sub $N,%r11`, or
/// `lea -N(%rsp),%r11`) and then walks %rsp down a page at a time.
#[derive(Default)]
struct FrameTracker {
    /// The register that last received a copy of %rsp.
    rsp_copy: Option<Register>,
}

impl FrameTracker {
    /// Bytes reserved by `ins`, if it reserves stack.
    fn step(&mut self, ins: &Instruction) -> Option<u64> {
        let imm = matches!(ins.op1_kind(), OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate32);
        let reserved = match ins.mnemonic() {
            Mnemonic::Sub if ins.op0_kind() == OpKind::Register && imm => {
                let r = ins.op0_register();
                let n = ins.immediate(1) as i64;
                (n > 0 && (r == Register::RSP || Some(r) == self.rsp_copy)).then_some(n as u64)
            }
            Mnemonic::Lea if ins.memory_base() == Register::RSP && ins.memory_index() == Register::None => {
                let d = ins.memory_displacement64() as i64;
                (d < 0).then_some(d.unsigned_abs())
            }
            _ => None,
        };
        let copies_rsp = ins.mnemonic() == Mnemonic::Mov
            && ins.op0_kind() == OpKind::Register
            && ins.op1_kind() == OpKind::Register
            && ins.op1_register() == Register::RSP;
        if copies_rsp {
            self.rsp_copy = Some(ins.op0_register());
        } else if ins.op0_kind() == OpKind::Register && Some(ins.op0_register()) == self.rsp_copy {
            self.rsp_copy = None;
        }
        reserved
    }
}

pub fn check(ko: &Ko, opts: &Options) -> Vec<Verdict> {
    let mut f = Findings::default();
    let exec: Vec<_> = ko.sections.iter().filter(|s| s.is_exec()).collect();
    for sec in &exec {
        scan_section(ko, sec, opts, &mut f);
    }
    let scope = format!("{} instructions in {} executable sections ({} bytes)", f.instructions, exec.len(), f.bytes);
    let gs = if opts.allow_gs_pcpu { "no %fs, %gs only for per-CPU memory" } else { "no %fs/%gs" };
    vec![
        if exec.is_empty() {
            Verdict::fail("code-decodes", "no executable section: nothing to check (is this a kld?)")
        } else {
            Verdict::from_findings("code-decodes", scope.clone(), "undecodable spots in code", f.undecodable)
        },
        Verdict::from_findings(
            "no-simd",
            format!("{scope}: no mm/xmm/ymm/zmm/k/tmm register, no SIMD state instruction"),
            "instructions touch SIMD state",
            f.simd,
        ),
        Verdict::from_findings("no-x87", format!("{scope}: no x87 instruction"), "x87 instructions", f.x87),
        Verdict::from_findings(
            "no-red-zone",
            format!("{scope}: no memory access below %rsp"),
            "memory accesses below %rsp (red zone)",
            f.red_zone,
        ),
        Verdict::from_findings("no-fs-gs", format!("{scope}: {gs}"), "%fs/%gs uses", f.seg),
        crate::rules::stack::check(&f.frames, opts.max_frame),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<u64> {
        let mut d = Decoder::new(64, bytes, DecoderOptions::NONE);
        let mut t = FrameTracker::default();
        d.iter().filter_map(|ins| t.step(&ins)).collect()
    }

    #[test]
    fn plain_sub_rsp_is_a_frame() {
        // sub $0x308,%rsp
        assert_eq!(frames(&[0x48, 0x81, 0xec, 0x08, 0x03, 0x00, 0x00]), [0x308]);
    }

    #[test]
    fn stack_probe_frame_is_seen_through_the_copy() {
        // mov %rsp,%r11 ; sub $0x3000,%r11 ; sub $0x1000,%rsp
        let code = [0x49, 0x89, 0xe3, 0x49, 0x81, 0xeb, 0x00, 0x30, 0x00, 0x00, 0x48, 0x81, 0xec, 0x00, 0x10, 0x00, 0x00];
        assert_eq!(frames(&code), [0x3000, 0x1000]);
    }

    #[test]
    fn unrelated_sub_is_not_a_frame() {
        // mov %rsp,%r11 ; mov %rdi,%r11 ; sub $0x3000,%r11 ; sub $0x10,%rax
        let code = [0x49, 0x89, 0xe3, 0x49, 0x89, 0xfb, 0x49, 0x81, 0xeb, 0x00, 0x30, 0x00, 0x00, 0x48, 0x83, 0xe8, 0x10];
        assert_eq!(frames(&code), Vec::<u64>::new());
    }
}
