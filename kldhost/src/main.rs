//! `kldhost load nvme_hotplug.ko`: load the module as FreeBSD's kernel linker would, against the
//! emulated FreeBSD 15 KPI, and report what was loaded.

use clap::{Parser, Subcommand};
use kldhost::sets::{self, ModRecord};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Load a FreeBSD amd64 kld into this process over an emulated KPI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Map, link and relocate the .ko; print its sections, imports and linker sets.
    Load {
        ko: PathBuf,
    },
    /// Load, then run the module's life against the emulated kernel: SYSINITs (MOD_LOAD), the
    /// taskqueue threads, MOD_QUIESCE, MOD_UNLOAD, SYSUNINITs; print every emulated call.
    /// Exit status 1 if anything was refused or a finding was reported; 70 on an emulated panic.
    Run {
        ko: PathBuf,
        /// Let time pass after MOD_LOAD: fire armed timeout tasks, at most this many times
        /// (0: timeouts never fire).
        #[arg(long, default_value_t = 0)]
        timeouts: usize,
        /// Start QEMU with an NVMe controller behind the emulated pci0: after MOD_LOAD the
        /// driver is attached to it (devctl set driver -f, probe, attach), its disk written
        /// and read through d_strategy, and it is detached (devctl detach) before the unload.
        #[arg(long)]
        qemu: bool,
        /// With --qemu: the write's and the read's data are host memory outside guest RAM
        /// (which no device can reach) instead of guest RAM, so busdma must refuse them.
        #[arg(long, requires = "qemu")]
        bio_outside_guest_ram: bool,
        /// With --qemu: after the single write and read, this many 4 KiB writes sent at once
        /// (more than the driver's trackers: its bio queue), checked in the backing file.
        #[arg(long, default_value_t = 0, requires = "qemu")]
        burst: usize,
        /// With --qemu: an ACPI namespace for the root bus as QEMU's pc DSDT has it
        /// (\_SB_.PCI0, slot objects S00_..S1F_ with _ADR and _EJ0), so the module's hotplug
        /// discovery finds the slots and installs its notify handlers.
        #[arg(long, requires = "qemu")]
        acpi: bool,
        /// With --acpi: after the I/O, QMP device_del of the controller; QEMU's hotplug GPE
        /// becomes Notify(S04_, 3) to the module's handler, which should detach it and _EJ0.
        #[arg(long, requires = "acpi", group = "removal")]
        eject: bool,
        /// With --eject or --surprise: then QMP device_add of a controller in slot 5 (empty since
        /// boot); Notify(S05_, 1) should make the module rescan the slot and attach it; its disk
        /// is written and read.
        #[arg(long, requires = "removal")]
        hot_add: bool,
        /// With --acpi: after the I/O, a surprise removal (the slot ejected with no device_del,
        /// so no notify); time passes until the module's watchdog finds the controller gone.
        #[arg(long, requires = "acpi", conflicts_with = "eject", group = "removal")]
        surprise: bool,
        /// With --surprise: this many 4 KiB writes sent to the disk just before the removal,
        /// not waited for; each must end without error (and be on the medium) or with ENXIO.
        #[arg(long, default_value_t = 0, requires = "surprise")]
        in_flight: usize,
        /// With --surprise: before the removal, one 4 KiB read sent to the disk and left in
        /// flight while time passes, until it is done or the module's watchdog stops re-arming
        /// (it gave the controller up); with `--device-fault io-stall` it never reaches QEMU.
        #[arg(long, requires = "surprise")]
        read_in_flight: bool,
        /// With --acpi: stock FreeBSD, acpi_pci(4) drives pci0 and its (unremovable) notify
        /// handler is on every slot before the module loads; without it the module owns them.
        #[arg(long, requires = "acpi")]
        acpi_pci: bool,
        /// After MOD_LOAD (and after the attach with --qemu), open and close every device node
        /// (d_open, d_close, with the thread counted inside the node as devfs counts it).
        #[arg(long)]
        open_nodes: bool,
        /// After MOD_LOAD (and after the attach with --qemu), open every disk and keep it open
        /// until the unload returned, as a process holding /dev/<disk> open would.
        #[arg(long)]
        hold_disks_open: bool,
        /// After MOD_LOAD, read every node that has a d_read, each on its own thread, which
        /// stays in the module until d_read returns (a read(2) that blocks).
        #[arg(long)]
        park_readers: bool,
        /// A loader tunable, name=value (repeatable), e.g. hw.nvme_hotplug.claim=1, or pci(4)'s
        /// hw.pci.enable_msix=0 and hw.pci.enable_msi=0 (the driver then gets only INTx).
        #[arg(long = "tunable", value_name = "NAME=VALUE")]
        tunables: Vec<String>,
        /// With --qemu: never deliver an INTx line to its handler (a negative control: a driver
        /// on INTx then completes its I/O only by polling).
        #[arg(long, requires = "qemu")]
        intx_undelivered: bool,
        /// Failure injection (repeatable): the N-th call (default: every call) of the emulated
        /// KPI function FUNC fails with ERR (an errno or ACPICA AE_ name or number; NULL for
        /// a function returning a pointer; default: the likeliest FreeBSD error), answered as
        /// FreeBSD's function answers it (src/emu/fail.rs lists the functions).
        #[arg(long = "fail", value_name = "FUNC[:N][=ERR]", value_parser = kldhost::emu::fail::parse)]
        fail: Vec<kldhost::emu::fail::Injection>,
        /// After a refused kldunload (EBUSY), let the kernel's threads run and try kldunload
        /// again, at most this many times.
        #[arg(long, default_value_t = 0)]
        kldunload_retries: usize,
        /// kldunload -f (LINKER_UNLOAD_FORCE): a MOD_QUIESCE veto is ignored and MOD_UNLOAD
        /// sent anyway; the retries are forced too.
        #[arg(long)]
        kldunload_force: bool,
        /// With --qemu, nvme(4) is in the kernel (as in GENERIC): a stand-in driver "nvme"
        /// bidding as nvme_pci_probe does, on pci before the module loads (src/emu/stock_nvme.rs).
        #[arg(long)]
        stock_nvme: bool,
        /// With --qemu: after the write and read, bios a driver must refuse by itself (negative
        /// or oversized lengths, misaligned or negative offsets, past the end, BIO_DELETE, an
        /// empty read), each waited for; their ends are printed.
        #[arg(long, requires = "qemu")]
        bad_bios: bool,
        /// With --qemu: after the write and read, an unmapped write and read (BIO_UNMAPPED: the
        /// data as guest pages in bio_ma, bio_data not an address), as GEOM sends them to a disk
        /// with DISKFLAG_UNMAPPED_BIO; the medium and the read's pages are checked.
        #[arg(long, requires = "qemu")]
        unmapped_bios: bool,
        /// With --qemu, reboot(8) before the final detach: DEVICE_SHUTDOWN of every attached
        /// function, then a write to the disk, which must fail without reaching the medium.
        #[arg(long)]
        shutdown: bool,
        /// With --qemu --acpi (repeatable): after the removal and hot-add steps, the
        /// firmware's Notify(Sxx_, VALUE) on slot SLOT with nothing changed in the machine.
        #[arg(long = "notify", value_name = "SLOT=VALUE", value_parser = parse_notify)]
        notify: Vec<(u8, u32)>,
        /// With --qemu, a device fault (repeatable): what the module sees of QEMU's NVMe
        /// controller is rewritten between the two (src/emu/device_fault.rs): cap-to=N,
        /// rdy-never, rdy-slow=MS, no-stop, csts-cfs, identify-garbage=FIELD, cqe-cid[=N],
        /// admin-latency=MS, io-stall[=N] (I/O SQ doorbells after the first N held back),
        /// busmaster-stuck (config space: the bus-master bit cannot be cleared), header-layout=N
        /// (config space: the header type byte reads with layout N).
        #[arg(long = "device-fault", value_name = "KIND[=ARG]", value_parser = kldhost::emu::device_fault::parse, requires = "qemu")]
        device_fault: Vec<kldhost::emu::device_fault::Fault>,
        /// A chosen interleaving (repeatable): while the module sleeps in pause(9) for the
        /// N-th time (default 1) with wait message WMESG (with @unload: counting only sleeps
        /// inside a kldunload's module events), another kernel thread runs ACTION: `detach`
        /// (devctl detach of every attached function), `attach:SLOT` (devctl attach of the
        /// slot's functions), `kldunload`, `notify:SLOT:VALUE` or `namespace:OP:NSID`
        /// (src/emu/interleave.rs).
        #[arg(long = "in-sleep", value_name = "WMESG[@unload][:N]=ACTION", value_parser = kldhost::emu::interleave::parse)]
        in_sleep: Vec<kldhost::emu::interleave::InSleep>,
        /// With --qemu (pc; repeatable, in order; the module rescans only controllers in its
        /// hotplug slots, so with --acpi): the controller sits in an NVMe
        /// subsystem with namespaces 1 and 2 and a lab-private second controller; after the
        /// I/O, that controller's Namespace Attachment attaches or detaches NSID for the
        /// module's controller, or detaches it, formats it to the other block size (512/4096)
        /// and attaches it again (reformat), or detaches it and reads its disk before the
        /// module's threads run (detach+read); QEMU then sends the module's controller a
        /// Namespace Attribute Changed notice, and the first disk is written and read again
        /// (src/emu/ns_admin.rs).
        #[arg(long = "namespace", value_name = "attach:NSID|detach:NSID|detach+read:NSID|reformat:NSID", value_parser = kldhost::emu::ns_admin::parse, requires = "qemu")]
        namespace: Vec<(kldhost::emu::ns_admin::NsOp, u32)>,
        /// With --qemu: after the write and read, a BIO_GETATTR of GEOM::NAME with a LEN-byte
        /// buffer (default: the size of the attribute's number, else 256) to every disk, as
        /// geom_disk.c g_disk_start handles it: the driver's d_getattr first, then the disk's
        /// fields; each answer is printed. Repeatable.
        #[arg(long = "getattr", value_name = "GEOM::NAME[:LEN]", value_parser = kldhost::emu::geom::parse_getattr, requires = "qemu")]
        getattr: Vec<(String, usize)>,
        /// With --namespace: the NVMe subsystem's controller at SLOT.FUNC, a function of a
        /// --multifunction slot, instead of slot 4's controller (which is then a plain one).
        #[arg(long = "subsystem-at", value_name = "SLOT.FUNC", value_parser = parse_function, requires = "namespace")]
        subsystem_at: Option<(u8, u8)>,
        /// With --qemu: nvme(4) in the kernel (as --stock-nvme) taking only SLOT.FUNC (repeatable);
        /// every other NVMe function is left to the module, as after `devctl set driver`.
        #[arg(long = "stock-nvme-at", value_name = "SLOT.FUNC", value_parser = parse_function, requires = "qemu")]
        stock_nvme_at: Vec<(u8, u8)>,
        /// GEOM's event thread stalled (behind another provider's slow taste) from the first
        /// kldunload until one that reached MOD_UNLOAD returned (or 200 sleeps of the module): the
        /// d_gone callbacks of the disks the unload's own detaches gave up are still queued when
        /// MOD_UNLOAD looks (use --kldunload-retries to unload after).
        #[arg(long = "geom-stalled")]
        geom_stalled: bool,
        /// With --qemu: QEMU's q35 (ICH9) machine: the controller behind the pcie-root-port in
        /// slot 4 (pcib1 -> pci1), another port in slot 5 for --hot-add, and with --acpi q35's
        /// namespace (\_SB_.PCI0.S20_.S00_ is slot 4's hotplug slot). Not with INTx (ICH9's
        /// routing is not emulated).
        #[arg(long, requires = "qemu", conflicts_with = "intx_undelivered")]
        q35: bool,
        /// With --q35: the module loads before the root ports' pci buses attach (as from
        /// loader.conf): each port's pcib is there, its pci bus is added (and the functions on
        /// it probed) once the taskqueues ran what MOD_LOAD queued; then one timeout expiry.
        #[arg(long, requires = "q35")]
        bridge_buses_late: bool,
        /// With --q35 --acpi (repeatable): after the I/O, devctl detach of the root port's
        /// pcib in SLOT (its pci bus deleted), the firmware's Notify(S00_, 1) and
        /// Notify(S00_, 3) on its slot while the bus is gone, then devctl attach of the pcib.
        #[arg(long = "bridge-detached", value_name = "SLOT", value_parser = clap::value_parser!(u8).range(0..32), requires_all = ["q35", "acpi"])]
        bridge_detached: Vec<u8>,
        /// With --qemu: after the detach, one MSI-X message on every vector that still has a
        /// handler set up and unmasked (a function's late message), run by the interrupt
        /// threads: the handler a failed bus_teardown_intr left must still be safe to run.
        #[arg(long, requires = "qemu")]
        late_msix: bool,
        /// With --qemu: pci(4) offers an emulated MSI capability with one message over QEMU's
        /// NVMe function and no MSI-X capability; the function's INTx assertions stand in for
        /// its messages (src/emu/msi.rs). Not with --q35.
        #[arg(long, requires = "qemu", conflicts_with_all = ["q35", "msi_with_msix"])]
        msi_instead_of_msix: bool,
        /// With --qemu: as --msi-instead-of-msix, but QEMU's MSI-X capability is offered too
        /// (e.g. with --fail pci_alloc_msix, the driver's fallback to MSI). Not with --q35.
        #[arg(long, requires = "qemu", conflicts_with = "q35")]
        msi_with_msix: bool,
        /// With --msi-instead-of-msix or --msi-with-msix: the emulated MSI messages are never
        /// delivered (a negative control: the driver's I/O then completes only by polling).
        #[arg(long)]
        msi_undelivered: bool,
        /// With --qemu: every controller (hot-added ones too) plugged with QEMU's
        /// msix-exclusive-bar=on: its MSI-X table and PBA in BAR4 (as on bhyve) instead of
        /// BAR0, which then holds only the registers and doorbells. Not with a removal: QEMU 10
        /// aborts unplugging such a controller (hw/nvme/ctrl.c nvme_exit deletes its register
        /// region from a BAR0 container it was never put in).
        #[arg(long, requires = "qemu", conflicts_with_all = ["eject", "surprise", "eject_slots"])]
        msix_exclusive_bar: bool,
        /// With --qemu (pc, repeatable): a multi-function slot at boot, an NVMe controller at
        /// each listed function (0 among them), function 0 with multifunction=on, e.g. 6=0,1.
        #[arg(long = "multifunction", value_name = "SLOT=F[,F...]", value_parser = parse_multifunction, requires = "qemu", conflicts_with = "q35")]
        multifunction: Vec<(u8, Vec<u8>)>,
        /// With --qemu (repeatable): after the attach, a consumer opens this disk and keeps it
        /// open until the unload returned.
        #[arg(long = "hold-open", value_name = "DISK", requires = "qemu")]
        hold_open: Vec<String>,
        /// With --qemu (repeatable): after the attach and the I/O, devctl delete of the
        /// function at SLOT.FUNC (its driver detached, its device_t deleted; QEMU keeps it).
        #[arg(long = "devctl-delete", value_name = "SLOT.FUNC", value_parser = parse_function, requires = "qemu")]
        devctl_delete: Vec<(u8, u8)>,
        /// With --acpi (pc, repeatable, in order): after the removal and hot-add steps, QMP
        /// device_add of an NVMe controller at SLOT.FUNC (function 0 with multifunction=on
        /// when another function of the slot is named too); the GPE's notifies delivered.
        #[arg(long = "hot-add-function", value_name = "SLOT.FUNC", value_parser = parse_function, requires = "acpi", conflicts_with = "q35")]
        hot_add_functions: Vec<(u8, u8)>,
        /// With --acpi (repeatable): then the platform's removal request for SLOT (QMP
        /// device_del of its lowest function), whatever functions it holds.
        #[arg(long = "eject-slot", value_name = "SLOT", value_parser = clap::value_parser!(u8).range(0..32), requires = "acpi", conflicts_with = "q35")]
        eject_slots: Vec<u8>,
    },
    /// The module's hotplug story on one QEMU machine, as FreeBSD's console shows it: kldload,
    /// attach, a write and a read, a surprise removal with writes in flight, a hot-add to
    /// another slot with its write and read, that controller's announced eject, kldunload.
    /// Exit status 0 when every step did what it should and there was no finding, 1 otherwise
    /// (naming the step), 70 on an emulated panic. Needs qemu-system-x86_64.
    Demo {
        /// The module.
        #[arg(long, default_value = "nvme_hotplug.ko")]
        ko: PathBuf,
    },
    /// Run a lab scenario (docs/scenarios.md) with the .ko as the driver (`driver = "kld"`):
    /// QEMU as the lab's machine, the module loaded with hw.nvme_hotplug.claim=1, I/O through
    /// its disks' d_strategy, kldunload at the end; the report has the engine mode's keys.
    /// Exit status 0 when the report says ok, 1 when not, 2 on a usage or file error, 77 when
    /// the scenario needs something kldhost does not emulate yet.
    Scenario(ScenarioArgs),
}

#[derive(clap::Args)]
struct ScenarioArgs {
    /// The scenario (TOML).
    scenario: PathBuf,
    /// The module to load.
    #[arg(long, default_value = "nvme_hotplug.ko")]
    ko: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tell the story as it happens.
    #[arg(short, long)]
    verbose: bool,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Print every emulated call as it is made (long: for one failing step).
    #[arg(long)]
    trace: bool,
    /// Negative control: one acknowledged block is zeroed in its image before the check.
    #[arg(long)]
    lose_a_write: bool,
    /// Negative control: the ACPI notifications are not delivered to the module.
    #[arg(long)]
    drop_notifies: bool,
    /// Negative control: the emulated kernel panics before top-level step N (1-based).
    #[arg(long, value_name = "N")]
    panic_before_step: Option<usize>,
    /// A loader tunable, name=value (repeatable), after the runner's own.
    #[arg(long = "tunable", value_name = "NAME=VALUE")]
    tunables: Vec<String>,
    /// Failure injection (repeatable), as for `run`: the N-th call of FUNC fails with ERR.
    #[arg(long = "fail", value_name = "FUNC[:N][=ERR]", value_parser = kldhost::emu::fail::parse)]
    fail: Vec<kldhost::emu::fail::Injection>,
    /// A device fault (repeatable), as for `run`: every controller's registers and identify
    /// data as the fault rewrites them.
    #[arg(long = "device-fault", value_name = "KIND[=ARG]", value_parser = kldhost::emu::device_fault::parse)]
    device_fault: Vec<kldhost::emu::device_fault::Fault>,
    /// (internal) Run in this process and write the report here: the parent's child.
    #[arg(long, hide = true)]
    child_report: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Scenario(a) => scenario(a),
        Cmd::Load { ko } => match load(&ko) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}: {e}", ko.display());
                ExitCode::FAILURE
            }
        },
        Cmd::Demo { ko } => match demo(&ko) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("kldhost demo: {}: {e}", ko.display());
                if !ko.exists() {
                    eprintln!("kldhost demo: build the module first: make (or NVMEHP_SKIP_BOOTSTRAP=1 sh scripts/build-kld.sh)");
                }
                ExitCode::FAILURE
            }
        },
        Cmd::Run { ko, timeouts, qemu, bio_outside_guest_ram, burst, acpi, eject, hot_add, surprise, in_flight, read_in_flight, acpi_pci, open_nodes, hold_disks_open, park_readers, tunables, intx_undelivered, fail, kldunload_retries, kldunload_force, stock_nvme, shutdown, bad_bios, notify, q35, bridge_buses_late, bridge_detached, device_fault, in_sleep, late_msix, msi_instead_of_msix, msi_with_msix, msi_undelivered, msix_exclusive_bar, multifunction, hold_open, devctl_delete, hot_add_functions, eject_slots, namespace, getattr, subsystem_at, stock_nvme_at, geom_stalled, unmapped_bios } => {
            if msi_undelivered && !(msi_instead_of_msix || msi_with_msix) {
                eprintln!("kldhost run: --msi-undelivered needs --msi-instead-of-msix or --msi-with-msix");
                return ExitCode::from(2);
            }
            kldhost::emu::fail::arm(fail);
            kldhost::emu::device_fault::arm(device_fault);
            kldhost::emu::interleave::arm(in_sleep);
            let tunables = tunables.iter().map(|t| t.split_once('=').map(|(n, v)| (n.to_string(), v.to_string())).unwrap_or((t.clone(), String::new()))).collect();
            let opts = kldhost::emu::run::Options {
                timeouts,
                qemu,
                tunables,
                bio_outside_guest_ram,
                burst,
                acpi,
                eject,
                hot_add,
                surprise,
                in_flight,
                read_in_flight,
                acpi_pci,
                plan: None,
                open_nodes,
                hold_disks_open,
                park_readers,
                intx_undelivered,
                kldunload_retries,
                kldunload_force,
                stock_nvme,
                shutdown,
                bad_bios,
                unmapped_bios,
                notify,
                q35,
                bridge_buses_late,
                bridge_detached,
                late_msix,
                msi: if msi_instead_of_msix {
                    kldhost::emu::msi::Mode::InsteadOfMsix
                } else if msi_with_msix {
                    kldhost::emu::msi::Mode::WithMsix
                } else {
                    kldhost::emu::msi::Mode::Off
                },
                msi_undelivered,
                msix_exclusive_bar,
                namespace,
                getattr,
                subsystem_at,
                stock_nvme_at,
                geom_stalled,
                multifunction,
                hold_open,
                devctl_delete,
                hot_add_functions,
                eject_slots,
            };
            match run(&ko, &opts) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("{}: {e}", ko.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `--notify SLOT=VALUE`: a PCI slot number (0..31) and a notify value, decimal.
fn parse_notify(s: &str) -> Result<(u8, u32), String> {
    let bad = || format!("--notify {s}: expected SLOT=VALUE (slot 0..31, a decimal notify value)");
    let (slot, value) = s.split_once('=').ok_or_else(bad)?;
    let slot = slot.parse::<u8>().ok().filter(|&n| n < 32).ok_or_else(bad)?;
    Ok((slot, value.parse::<u32>().map_err(|_| bad())?))
}

/// `--hot-add-function`, `--devctl-delete`, `--subsystem-at`, `--stock-nvme-at SLOT.FUNC`: a slot (0..31) and a function (0..7).
fn parse_function(s: &str) -> Result<(u8, u8), String> {
    let bad = || format!("{s}: expected SLOT.FUNC (slot 0..31, function 0..7)");
    let (slot, func) = s.split_once('.').ok_or_else(bad)?;
    let slot = slot.parse::<u8>().ok().filter(|&n| n < 32).ok_or_else(bad)?;
    Ok((slot, func.parse::<u8>().ok().filter(|&f| f < 8).ok_or_else(bad)?))
}

/// `--multifunction SLOT=F[,F...]`: a slot other than `run --qemu`'s controller's and the
/// hot-add's (2..31 but 4 and 5), its functions (0..7, function 0 among them: a slot without
/// function 0 is empty to every OS).
fn parse_multifunction(s: &str) -> Result<(u8, Vec<u8>), String> {
    let bad = |why: &str| format!("--multifunction {s}: {why}");
    let (slot, funcs) = s.split_once('=').ok_or_else(|| bad("expected SLOT=F[,F...]"))?;
    let slot = slot.parse::<u8>().ok().filter(|n| (2..32).contains(n) && *n != 4 && *n != 5).ok_or_else(|| bad("the slot must be 2..31, not 4 (the controller's) or 5 (--hot-add's)"))?;
    let mut v = Vec::new();
    for f in funcs.split(',') {
        let f = f.parse::<u8>().ok().filter(|&f| f < 8).ok_or_else(|| bad("functions are 0..7"))?;
        if v.contains(&f) {
            return Err(bad("a function named twice"));
        }
        v.push(f);
    }
    if !v.contains(&0) {
        return Err(bad("function 0 must be among the functions"));
    }
    v.sort_unstable();
    Ok((slot, v))
}

fn demo(path: &PathBuf) -> Result<bool, Box<dyn std::error::Error>> {
    let data = std::fs::read(path)?;
    let ko = kldhost::load(&data, &kldhost::emu::table())?;
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let verdict = kldhost::demo::demo(&ko, &name, &mut std::io::stdout())?;
    Ok(verdict.ok())
}

fn scenario(a: ScenarioArgs) -> ExitCode {
    let mut sc = match nvmehp_lab::scenario::Scenario::load(&a.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kldhost: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(s) = a.seed {
        sc.seed = s;
    }
    if let Some(why) = kldhost::scenario::unsupported(&sc) {
        println!("SKIP scenario {} (kld): {why}", sc.name);
        return ExitCode::from(kldhost::scenario::SKIP_EXIT as u8);
    }
    let tunables: Vec<(String, String)> = a.tunables.iter().map(|t| t.split_once('=').map(|(n, v)| (n.to_string(), v.to_string())).unwrap_or((t.clone(), String::new()))).collect();
    if let Some(out) = &a.child_report {
        // The child: the emulated kernel lives (and may die) in this process.
        let data = match std::fs::read(&a.ko) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("kldhost: {}: {e} (build it with `make` or scripts/build-kld.sh)", a.ko.display());
                return ExitCode::from(2);
            }
        };
        let ko = match kldhost::load(&data, &kldhost::emu::table()) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("kldhost: {}: {e}", a.ko.display());
                return ExitCode::from(2);
            }
        };
        kldhost::emu::set_trace(a.trace);
        kldhost::emu::fail::arm(a.fail.clone());
        kldhost::emu::device_fault::arm(a.device_fault.clone());
        let opts = kldhost::scenario::runner::Options { verbose: a.verbose, lose_a_write: a.lose_a_write, drop_notifies: a.drop_notifies, tunables, panic_before_step: a.panic_before_step };
        let report = kldhost::scenario::runner::run(&ko, &sc, &opts);
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(out, text + "\n") {
            eprintln!("kldhost: cannot write {}: {e}", out.display());
            return ExitCode::from(2);
        }
        return if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    if !a.ko.is_file() {
        eprintln!("kldhost: {}: no such module (build it with `make` or scripts/build-kld.sh)", a.ko.display());
        return ExitCode::from(2);
    }
    if !nvmehp_lab::qemu::qemu_available() {
        eprintln!("kldhost: {} not found (run scripts/bootstrap-debian.sh lab)", nvmehp_lab::qemu::QEMU_BIN);
        return ExitCode::from(2);
    }
    let mut extra = Vec::new();
    if a.lose_a_write {
        extra.push("--lose-a-write".to_string());
    }
    if a.drop_notifies {
        extra.push("--drop-notifies".to_string());
    }
    if a.trace {
        extra.push("--trace".to_string());
    }
    if let Some(n) = a.panic_before_step {
        extra.push("--panic-before-step".to_string());
        extra.push(n.to_string());
    }
    for t in &a.tunables {
        extra.push("--tunable".to_string());
        extra.push(t.clone());
    }
    for f in &a.fail {
        extra.push("--fail".to_string());
        extra.push(f.to_string());
    }
    for f in &a.device_fault {
        extra.push("--device-fault".to_string());
        extra.push(f.to_string());
    }
    let args = kldhost::scenario::child::Args { scenario: a.scenario.clone(), ko: a.ko.clone(), json: a.json.clone(), verbose: a.verbose, seed: a.seed, extra };
    let (report, json) = kldhost::scenario::child::run(&args, &sc.name, sc.seed, sc.machine.qemu_name());
    println!("{}", report.summary());
    if let Some(path) = &a.json {
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("kldhost: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn load(path: &PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let data = std::fs::read(path)?;
    let ko = kldhost::load(&data, &kldhost::emu::table())?;
    println!("loaded {} at {:#x} ({} bytes of module, {} imports)", path.display(), ko.base(), ko.module_size, ko.imports.len());
    println!("sections:");
    for p in &ko.progtab {
        println!("  {:<24} {:#010x} {:>7} bytes", p.name, p.addr, p.size);
    }
    println!("relocations applied:");
    for (t, n) in &ko.reloc_counts {
        println!("  {t:<20} {n}");
    }
    println!("imports:");
    for i in &ko.imports {
        println!("  {:<32} {:#010x} {}", i.name, i.addr, i.kind);
    }
    println!("modmetadata_set:");
    for r in sets::modmetadata(&ko)? {
        match r {
            ModRecord::Module { cval, name, evhand, priv_, .. } => println!(
                "  MDT_MODULE  {cval}: moduledata \"{name}\", evhand {}, arg {}",
                ko.describe(evhand),
                ko.describe(priv_)
            ),
            ModRecord::Version { cval, version } => println!("  MDT_VERSION {cval} {version}"),
            ModRecord::Depend { cval, min, pref, max } => println!("  MDT_DEPEND  {cval} {min}..{max} (preferred {pref})"),
            ModRecord::PnpInfo { cval } => println!("  MDT_PNP_INFO {cval}"),
        }
    }
    for (title, list) in [("sysinit_set (run order)", sets::sysinits(&ko)?), ("sysuninit_set (run order)", sets::sysuninits(&ko)?)] {
        println!("{title}:");
        for s in list {
            println!(
                "  subsystem {:#010x} order {:#010x}  {}({})",
                s.subsystem,
                s.order,
                ko.describe(s.func),
                ko.describe(s.udata)
            );
        }
    }
    println!("sysctl_set:");
    for o in sets::sysctls(&ko)? {
        println!("  {:<40} kind {:#010x}  {}", o.path, o.kind, o.descr);
    }
    Ok(())
}

fn run(path: &PathBuf, opts: &kldhost::emu::run::Options) -> Result<bool, Box<dyn std::error::Error>> {
    let data = std::fs::read(path)?;
    let ko = kldhost::load(&data, &kldhost::emu::table())?;
    println!("loaded {} at {:#x}", path.display(), ko.base());
    println!("calls:");
    kldhost::emu::set_trace(true);
    let r = kldhost::emu::run::run(&ko, opts)?;
    println!("console:");
    for l in r.console.lines() {
        println!("  {l}");
    }
    for (loc, name, e) in &r.attach {
        println!("attach {loc} ({name}): {e}");
    }
    if !r.attach.is_empty() {
        println!("nodes after attach: {:?}; disks: {:?}", r.nodes_attached, r.disks_attached);
    }
    for (what, e) in &r.io {
        println!("io {what}: {e}");
    }
    if !r.io.is_empty() {
        println!("io data in the backing file and read back: {}", if r.io_data_ok { "ok" } else { "WRONG" });
    }
    for (slot, value, n) in &r.notifies {
        println!("notify slot {slot} value {value}: {n} handler(s)");
    }
    if !r.notifies.is_empty() {
        println!("ejected (deleted from pci0, DEVICE_DELETED): {}", r.ejected);
    }
    if r.surprise_detected {
        println!("surprise removal: the function left pci0");
    }
    if let Some(e) = r.read_in_flight {
        println!("read in flight: {}", if e < 0 { "never done (the module keeps it)".to_string() } else { format!("done, error {e}") });
    }
    if !r.in_flight.is_empty() {
        const ENXIO: i32 = kldhost::layouts::ENXIO;
        let count = |f: fn(i32) -> bool| r.in_flight.iter().filter(|&&e| f(e)).count();
        println!(
            "writes in flight at the surprise removal: {} done without error ({} not on the medium), {} ENXIO, {} other errors, {} never done",
            count(|e| e == 0),
            r.in_flight_lost,
            count(|e| e == ENXIO),
            count(|e| e > 0 && e != ENXIO),
            count(|e| e < 0)
        );
    }
    if r.hot_added || r.notifies.iter().any(|n| n.1 == 1) {
        println!("hot-added and attached: {}; its write and read: {}", r.hot_added, if r.hot_added_io_ok { "ok" } else { "WRONG" });
    }
    for (what, e, resid) in &r.bad_bios {
        println!("bad bio {what}: error {e}, resid {resid}");
    }
    for n in &r.namespaces {
        println!(
            "namespace {} {}: command {}, rescan {}, disks added {:?}, gone {:?}{}",
            n.nsid,
            n.op.map_or("?", |o| o.name()),
            if n.sent { "ok" } else { "FAILED" },
            if n.rescanned { "ended" } else { "NOT done" },
            n.disks_added,
            n.disks_gone,
            n.read_ok.map_or(String::new(), |ok| format!(", the new disk reads the medium: {}", if ok { "ok" } else { "WRONG" }))
                + &n.early_read.map_or(String::new(), |e| format!(", the read after the detach: error {e}"))
        );
    }
    for (loc, name, e) in &r.shutdown {
        println!("shutdown {loc} ({name}): {e}");
    }
    if let Some((e, landed)) = r.after_shutdown_write {
        println!("write after the shutdown: bio_error {e}, on the medium: {landed}");
    }
    for (loc, name, e) in &r.detach {
        println!("detach {loc} ({name}): {e}");
    }
    println!("MOD_QUIESCE: {:?}, MOD_UNLOAD: {:?}, unloaded: {}", r.quiesce, r.unload, r.unloaded);
    if let Some((n, bytes)) = r.kept_loaded {
        println!("still loaded: {n} malloc(9) allocations ({bytes} bytes) stay with the module, not leaks (only an unload's checks count them)");
    }
    println!("findings: {}", r.findings.len());
    for f in &r.findings {
        println!("  {f}");
    }
    if let Some((we, re, data)) = r.unmapped_io {
        println!("unmapped bios: write {we}, read {re}, data {}", if data { "ok" } else { "WRONG" });
    }
    let io_ok = r.io.iter().all(|(_, e)| *e == 0) && (r.io.is_empty() || r.io_data_ok) && r.unmapped_io.is_none_or(|u| u == (0, 0, true));
    let ns_ok = r.namespaces.iter().all(|n| n.sent && n.rescanned && n.read_ok != Some(false) && n.early_read.is_none_or(|e| e > 0));
    Ok(r.unloaded && r.findings.is_empty() && io_ok && ns_ok)
}
