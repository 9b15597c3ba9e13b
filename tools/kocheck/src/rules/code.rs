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
use iced_x86::{
    CpuidFeature, Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, InstructionInfoFactory, Mnemonic,
    OpKind, Register,
};

pub struct Options {
    /// Accept `%gs:`-relative memory operands (per-CPU data). Never `%fs`, never `swapgs`/`wrgsbase`.
    pub allow_gs_pcpu: bool,
}

#[derive(Default)]
struct Findings {
    undecodable: Vec<String>,
    simd: Vec<String>,
    x87: Vec<String>,
    red_zone: Vec<String>,
    seg: Vec<String>,
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
    ]
}
