//! `nvmehp-lab`: run scenarios against QEMU, show the demo, measure hotplug cycles.
//!
//! ```text
//! nvmehp-lab run SCENARIO.toml [--json REPORT.json] [-v] [--seed N] [--driver engine|kld]
//! nvmehp-lab demo
//! nvmehp-lab bench [--cycles N] [--ram-access shared|qtest]
//! nvmehp-lab kld demo [--ko PATH]
//! ```
//! Exit status: 0 when the report says ok, 1 when it does not, 2 on a usage or file error.
//! `kld` and the kld driver run the shipped `.ko` through the `kldhost` binary next to this one
//! and pass its exit status on (70: the emulated kernel panicked; 77: the scenario needs
//! something kldhost does not emulate yet).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nvmehp_lab::qemu::{qemu_available, QEMU_BIN};
use nvmehp_lab::runner::Runner;
use nvmehp_lab::scenario::{DriverKind, Scenario};
use nvmehp_lab::shared_ram::RamAccess;

#[derive(Parser)]
#[command(name = "nvmehp-lab", version, about = "Drive the nvme_hotplug engine against QEMU's NVMe and ACPI hotplug models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file (format: docs/scenarios.md).
    Run {
        /// The scenario (TOML).
        scenario: PathBuf,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Tell the story as it happens.
        #[arg(short, long)]
        verbose: bool,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the scenario's `driver`: `engine` (this process) or `kld` (the shipped
        /// .ko, run by the `kldhost` binary next to this one).
        #[arg(long, value_parser = ["engine", "kld"])]
        driver: Option<String>,
        /// With the kld driver: the module to load (default: nvme_hotplug.ko here).
        #[arg(long)]
        ko: Option<PathBuf>,
    },
    /// A short live story: a controller appears, I/O runs, it is removed, all is torn down.
    Demo,
    /// Hotplug cycles per second (attach, bring-up, 4 KiB write+read+verify, announced detach),
    /// and completion time after a surprise removal with requests in flight.
    Bench {
        /// Number of cycles.
        #[arg(long, default_value_t = 200)]
        cycles: u32,
        /// How the lab reaches guest RAM: `shared` (the mapping) or `qtest` (commands).
        #[arg(long, default_value = "shared", value_parser = ["shared", "qtest"])]
        ram_access: String,
    },
    /// The shipped nvme_hotplug.ko itself, in kldhost's emulated FreeBSD kernel over QEMU.
    Kld {
        #[command(subcommand)]
        cmd: KldCmd,
    },
}

#[derive(Subcommand)]
enum KldCmd {
    /// The module's hotplug story on one machine, as FreeBSD's console shows it: kldload,
    /// attach, a write and a read, a surprise removal with writes in flight, a hot-add to
    /// another slot, its announced eject, kldunload (`kldhost demo`).
    Demo {
        /// The module (default: nvme_hotplug.ko at the repository root above the current
        /// directory).
        #[arg(long)]
        ko: Option<PathBuf>,
    },
}

/// Runs `kldhost demo` on the module, its output straight to ours; its exit status is ours.
fn kld_demo(ko: Option<&std::path::Path>) -> ExitCode {
    use nvmehp_lab::kldhost_bin;
    let found = kldhost_bin::module(ko).and_then(|ko| Ok((kldhost_bin::command(["demo", "--ko"])?, ko)));
    let (mut cmd, ko) = match found {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nvmehp-lab kld demo: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(code) = need_qemu() {
        return code;
    }
    match cmd.arg(&ko).status() {
        Ok(st) => match st.code() {
            Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            None => {
                eprintln!("nvmehp-lab kld demo: kldhost ended by a signal ({st})");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("nvmehp-lab kld demo: cannot run kldhost: {e}");
            ExitCode::from(2)
        }
    }
}

/// `driver = "kld"`: the run belongs to kldhost (which links this crate, so this binary cannot
/// link it back): the `kldhost` executable built next to this one gets the same arguments as
/// `kldhost scenario`, and its exit status is this run's.
fn run_kldhost(scenario: &std::path::Path, json: Option<&std::path::Path>, verbose: bool, seed: Option<u64>, ko: Option<&std::path::Path>) -> ExitCode {
    use nvmehp_lab::kldhost_bin;
    let found = kldhost_bin::module(ko).and_then(|ko| Ok((kldhost_bin::command(["scenario".as_ref(), scenario.as_os_str()])?, ko)));
    let (mut cmd, ko) = match found {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nvmehp-lab run (driver = \"kld\"): {e}");
            return ExitCode::from(2);
        }
    };
    cmd.arg("--ko").arg(&ko);
    if let Some(j) = json {
        cmd.arg("--json").arg(j);
    }
    if verbose {
        cmd.arg("-v");
    }
    if let Some(s) = seed {
        cmd.arg("--seed").arg(s.to_string());
    }
    match cmd.status() {
        Ok(st) => ExitCode::from(st.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("nvmehp-lab: cannot run kldhost: {e}");
            ExitCode::from(2)
        }
    }
}

fn need_qemu() -> Result<(), ExitCode> {
    if qemu_available() {
        Ok(())
    } else {
        eprintln!("nvmehp-lab: {QEMU_BIN} not found (run scripts/bootstrap-debian.sh lab)");
        Err(ExitCode::from(2))
    }
}

const DEMO: &str = r#"
name = "demo"
machine = "pc"
seed = 7
[[controller]]
id = "boot0"
slot = 4
namespaces = [{ nsid = 1, size_mib = 16, lba = 4096 }, { nsid = 2, size_mib = 8, lba = 512 }]
[[step]]
op = "attach"
id = "ebs1"
slot = 6
namespaces = [{ nsid = 1, size_mib = 32, lba = 4096 }]
[[step]]
op = "expect"
controllers = 2
namespaces = 3
[[step]]
op = "io"
target = "boot0/2"
kind = "write-verify"
ops = 200
depth = 8
block = 4096
[[step]]
op = "io"
target = "ebs1/1"
kind = "write-verify"
ops = 400
depth = 16
block = 16384
[[step]]
op = "io"
target = "ebs1/1"
kind = "mixed"
ops = 400
depth = 16
block = 4096
background = true
[[step]]
op = "detach"
id = "ebs1"
mode = "announced"
during_io = true
[[step]]
op = "attach"
id = "ebs2"
slot = 7
namespaces = [{ nsid = 1, size_mib = 16, lba = 512 }]
[[step]]
op = "io"
target = "ebs2/1"
kind = "write-verify"
ops = 2000
depth = 32
block = 4096
background = true
[[step]]
op = "wait"
ms = 150
[[step]]
op = "detach"
id = "ebs2"
mode = "surprise"
during_io = true
[[step]]
op = "expect"
controllers = 1
nodes = 2
"#;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { scenario, json, verbose, seed, driver, ko } => {
            let mut sc = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("nvmehp-lab: {e}");
                    return ExitCode::from(2);
                }
            };
            let kld = match driver.as_deref() {
                Some(d) => d == "kld",
                None => sc.driver == DriverKind::Kld,
            };
            if kld {
                return run_kldhost(&scenario, json.as_deref(), verbose, seed, ko.as_deref());
            }
            if let Some(seed) = seed {
                sc.seed = seed;
            }
            if let Err(code) = need_qemu() {
                return code;
            }
            let report = Runner::new(sc).verbose(verbose).progress(verbose).run();
            println!("{}", report.summary());
            if let Some(path) = json {
                let text = match serde_json::to_string_pretty(&report) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("nvmehp-lab: cannot encode the report: {e}");
                        return ExitCode::from(2);
                    }
                };
                if let Err(e) = std::fs::write(&path, text + "\n") {
                    eprintln!("nvmehp-lab: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Demo => {
            if let Err(code) = need_qemu() {
                return code;
            }
            let sc = Scenario::parse(DEMO).expect("the built-in demo scenario is valid");
            println!("nvmehp-lab demo: QEMU pc machine (i440fx/PIIX4), no guest OS; the lab plays firmware, ACPI and kernel.");
            let report = Runner::new(sc).verbose(true).progress(true).run();
            println!();
            println!("{}", report.summary());
            println!(
                "  {} MiB moved, {} reads verified, {} qtest commands, {} GPEs",
                report.io.bytes >> 20,
                report.io.reads_verified,
                report.qemu.qtest_commands,
                report.qemu.gpes
            );
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Kld { cmd: KldCmd::Demo { ko } } => kld_demo(ko.as_deref()),
        Cmd::Bench { cycles, ram_access } => {
            if let Err(code) = need_qemu() {
                return code;
            }
            let ram = if ram_access == "qtest" { RamAccess::Qtest } else { RamAccess::Shared };
            if let Err(e) = nvmehp_lab::bench::print_all(cycles, ram) {
                eprintln!("nvmehp-lab bench: {e}");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
    }
}
