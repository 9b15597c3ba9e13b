//! kocheck: static checks of a FreeBSD amd64 kernel module (`.ko`), i.e. the things the kernel
//! linker or the running kernel would otherwise report only at `kldload` time, or as a panic.
//!
//! Prints one `PASS rule: detail` / `FAIL rule: detail` line per rule (findings indented
//! below a FAIL) and exits 1 if any rule failed, 2 if the file could not be read at all.

mod ko;
mod modmetadata;
mod pointers;
mod report;
mod rules;

use clap::Parser;
use report::Verdict;
use rules::module::DependSpec;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Static checks of a FreeBSD amd64 kernel module (.ko)")]
struct Cli {
    /// The module to check (an ELF relocatable object, as kmod.mk's `ld -r` makes it).
    ko: PathBuf,

    /// Allowlist of kernel exports, one name per line: target/kld/kpi-symbols.txt from the kld build.
    #[arg(long, value_name = "FILE")]
    kpi: Option<PathBuf>,

    /// Module that must be declared (DECLARE_MODULE/DRIVER_MODULE) and carry a MODULE_VERSION.
    #[arg(long, default_value = "nvme_hotplug")]
    module: String,

    /// Required MODULE_DEPEND, `NAME` or `NAME=MIN..MAX` (declared min..max must lie inside).
    /// Repeatable; replaces the defaults.
    #[arg(long = "depend", value_name = "SPEC", default_values = ["kernel=1500000..1599999", "pci"])]
    depends: Vec<DependSpec>,

    /// Further required MODULE_DEPENDs, added to --depend's list (e.g. `--also-depend acpi`).
    #[arg(long = "also-depend", value_name = "SPEC")]
    also_depends: Vec<DependSpec>,

    /// Accept %gs-relative memory operands (FreeBSD per-CPU data); %fs is never accepted.
    #[arg(long)]
    allow_gs_pcpu: bool,

    /// Largest stack frame (bytes reserved by one function) accepted; kernel stacks are 16 KiB.
    #[arg(long, value_name = "BYTES", default_value_t = 2048)]
    max_frame: u64,

    /// Defined symbol allowed to stay global (exported to other modules); repeatable.
    #[arg(long = "export", value_name = "SYMBOL")]
    exports: Vec<String>,

    /// Print every finding under a FAIL line, not only the first few.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data = match std::fs::read(&cli.ko) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kocheck: cannot read {}: {e}", cli.ko.display());
            return ExitCode::from(2);
        }
    };

    let mut verdicts = Vec::new();
    match ko::sniff_header(&data) {
        Ok(h) => verdicts.push(rules::header::check(&h)),
        Err(e) => verdicts.push(Verdict::fail(rules::header::RULE, e)),
    }
    match ko::Ko::parse(&data) {
        Ok(ko) => {
            let depends: Vec<_> = cli.depends.iter().chain(&cli.also_depends).cloned().collect();
            verdicts.extend(rules::module::check(&ko, &cli.module, &depends));
            verdicts.push(rules::module::check_sysinit(&ko));
            verdicts.push(rules::relocations::check(&ko));
            verdicts.push(rules::sections::check(&ko));
            let code = rules::code::Options { allow_gs_pcpu: cli.allow_gs_pcpu, max_frame: cli.max_frame };
            verdicts.extend(rules::code::check(&ko, &code));
            verdicts.push(rules::exports::check(&ko, &cli.exports));
            verdicts.push(rules::kpi::check(&ko, cli.kpi.as_deref()));
            verdicts.push(rules::alloc_error::check(&ko));
        }
        Err(e) => verdicts.push(Verdict::fail("elf-parse", format!("{}: {e}", cli.ko.display()))),
    }

    for v in &verdicts {
        v.print(cli.verbose);
    }
    let failed = verdicts.iter().filter(|v| !v.pass).count();
    println!("kocheck {}: {} rules, {failed} failed", cli.ko.display(), verdicts.len());
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
