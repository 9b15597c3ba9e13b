//! `kldhost demo`: the shipped module's hotplug story on one machine, told as FreeBSD's console
//! would show it.
//!
//! One run of the emulated kernel over QEMU's pc machine with ACPI PCI hotplug (the steps are
//! [`crate::emu::run`]'s, composed into one [`Plan`]): kldload with the loader tunables below,
//! the controller in slot 4 attached, a write and a read through `d_strategy`, a surprise
//! removal of that controller with writes in flight, a controller hot-added to slot 5 (empty
//! since boot) and written and read, its announced eject, kldunload, and the unload's checks.
//!
//! Three kinds of lines, told apart by their start:
//! - the emulated kernel's console, verbatim (the module's `printf`/`device_printf` and what
//!   newbus prints: `nvmehp0: <...> mem ... at device 4.0 on pci0`, `nvmehp0: detached`);
//! - `==> `: the narrator, what happens next and why;
//! - `    | `: what the host saw: QEMU's QMP events, the ACPI notifies, the KPI calls that
//!   make up the story (disk(9), devfs, pci(4), `_EJ0`), and the image files checked.
//!
//! Console and host lines come out in the order they happened: the emulation records the
//! console's length at each call-log line ([`crate::emu::Emu::console_at`]).

use crate::emu::run::{self, Moment, Options, Plan, Report, Step, IO_BYTES, IO_OFFSET, IO_PATTERN};
use crate::emu::with;
use crate::{LoadError, LoadedKo};
use std::io::Write;

/// The loader tunables of the demo: hot-added NVMe controllers are nvme_hotplug's (`claim=1`;
/// without it the module leaves them to nvme(4), which the emulation has not), and a 16-entry
/// I/O queue (15 trackers), so that the writes in flight at the surprise removal overflow into
/// the driver's bio queue, which the controller never sees.
pub const TUNABLES: [(&str, &str); 2] = [("hw.nvme_hotplug.claim", "1"), ("hw.nvme_hotplug.io_entries", "16")];

/// Writes in flight at the surprise removal: more than the 15 trackers.
pub const IN_FLIGHT: usize = 24;

/// The demo's steps. Each must do what it should; after one that did not, only the final
/// detach runs before the unload.
pub fn plan() -> Plan {
    Plan {
        steps: vec![
            Step::Attach,
            Step::Io,
            Step::Surprise { slot: crate::emu::machine::NVME_SLOT, id: crate::emu::machine::NVME_ID.to_string(), in_flight: IN_FLIGHT },
            Step::HotAdd { slot: run::HOT_ADD_SLOT, id: "nvme1".to_string() },
            Step::Io,
            Step::Eject { slot: run::HOT_ADD_SLOT, id: "nvme1".to_string() },
            Step::Detach,
        ],
        stop_at_failure: true,
    }
}

/// What the demo found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The steps that did not do what they should.
    pub failed: Vec<String>,
    /// The steps skipped after a failure.
    pub skipped: Vec<String>,
    pub unloaded: bool,
    pub findings: usize,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.skipped.is_empty() && self.unloaded && self.findings == 0
    }
}

/// The ACPI object of a slot, as the namespace names it.
fn slot_object(slot: u8) -> String {
    format!("\\_SB_.PCI0.S{slot:02X}_")
}

/// What a step is, in a few words (for the verdict).
fn title(step: &Step) -> String {
    match step {
        Step::Attach => "attach".to_string(),
        Step::Io => "write and read".to_string(),
        Step::Burst(n) => format!("burst of {n} writes"),
        Step::BadBios => "bios the driver must refuse".to_string(),
        Step::UnmappedIo => "unmapped write and read".to_string(),
        Step::Eject { slot, id } => format!("announced eject of {id} in slot {slot}"),
        Step::Surprise { slot, in_flight, .. } => format!("surprise removal of slot {slot} with {in_flight} writes in flight"),
        Step::HotAdd { slot, id, .. } => format!("hot-add of {id} in slot {slot}"),
        Step::Notify { slot, value } => format!("Notify({value}) on slot {slot}"),
        Step::Namespace { op, nsid } => format!("namespace {nsid}: {}", op.name()),
        Step::Getattr(attrs) => format!("{} GEOM attribute(s) of every disk", attrs.len()),
        Step::Shutdown => "reboot's DEVICE_SHUTDOWN".to_string(),
        Step::ReadInFlight => "a read left in flight".to_string(),
        Step::DevctlDelete { slot, func } => format!("devctl delete of {slot}.{func}"),
        Step::HotAddFunction { slot, func, .. } => format!("hot-add at {slot}.{func}"),
        Step::EjectSlot { slot } => format!("announced eject of slot {slot}"),
        Step::DetachBridge { slot } => format!("devctl detach of the bridge in slot {slot}"),
        Step::AttachBridge { slot } => format!("devctl attach of the bridge in slot {slot}"),
        Step::Detach => "devctl detach".to_string(),
    }
}

/// The narrator's line before `step`.
fn announce(step: &Step, report: &Report) -> String {
    let disk = report.target.as_ref().map_or("(no disk)".to_string(), |t| t.disk.clone());
    match step {
        Step::Attach => "==> attach: nvmehp on every pci0 function no driver took at MOD_LOAD (devctl set driver -f)".to_string(),
        Step::Io => {
            let image = report.target.as_ref().map_or(String::new(), |t| t.image.file_name().map_or(String::new(), |f| f.to_string_lossy().into_owned()));
            format!("==> write {IO_BYTES} bytes ({IO_PATTERN}) at offset {IO_OFFSET} of {disk} through d_strategy, read them back; check QEMU's image file {image}")
        }
        Step::Burst(n) => format!("==> {n} writes of 4 KiB to {disk} at once"),
        Step::BadBios => format!("==> bios {disk} must refuse: bad lengths and offsets, past its end, BIO_DELETE, an empty read"),
        Step::UnmappedIo => format!("==> an unmapped write and read of {disk}: pages without a kernel mapping (bio_ma), as GEOM passes them"),
        Step::Surprise { slot, in_flight, .. } => format!(
            "==> {in_flight} writes of 4 KiB sent to {disk} without waiting, then surprise removal of slot {slot} \
             (QEMU: the device vanishes, no ACPI notify); time passes until the driver notices"
        ),
        Step::HotAdd { slot, id, .. } => format!(
            "==> hot-add: controller {id} plugged into slot {slot}, empty since boot (QMP device_add; QEMU's hotplug GPE, \
             then Notify({}, 1) to the module's handler)",
            slot_object(*slot)
        ),
        Step::Eject { slot, id } => format!(
            "==> eject of slot {slot} announced: QMP device_del {id} (QEMU's hotplug GPE, then Notify({}, 3): \
             the module detaches, deletes the function, evaluates _EJ0)",
            slot_object(*slot)
        ),
        Step::Notify { slot, value } => format!("==> the firmware's Notify(S{slot:02X}_, {value}) with nothing changed in the machine"),
        Step::Namespace { op, nsid } => format!(
            "==> the subsystem's other host: {} of namespace {nsid} of the controller (Namespace Attachment; QEMU's Namespace Attribute Changed notice)",
            op.name()
        ),
        Step::Getattr(attrs) => {
            let names: Vec<&str> = attrs.iter().map(|(a, _)| a.as_str()).collect();
            format!("==> BIO_GETATTR {} of every disk, as GEOM's g_disk_start asks d_getattr", names.join(", "))
        }
        Step::Shutdown => "==> reboot: DEVICE_SHUTDOWN of every attached function, then a write that must fail".to_string(),
        Step::ReadInFlight => format!("==> a 4 KiB read sent to {disk} and left in flight while time passes"),
        Step::DevctlDelete { slot, func } => format!("==> devctl delete of the function at {slot}.{func}"),
        Step::HotAddFunction { slot, func, .. } => format!("==> hot-add: a controller plugged at {slot}.{func} (QMP device_add)"),
        Step::EjectSlot { slot } => format!("==> eject of slot {slot} announced (QMP device_del, then Notify({}, 3))", slot_object(*slot)),
        Step::DetachBridge { slot } => format!("==> devctl detach of the root port in slot {slot}: its pci bus and the functions on it deleted"),
        Step::AttachBridge { slot } => format!("==> devctl attach of the root port in slot {slot}: a new pci bus, its functions probed and attached"),
        Step::Detach => "==> devctl detach of every function still attached".to_string(),
    }
}

/// The call-log line as the host's account of it, or None for a line the story leaves out.
fn host_fact(line: &str) -> Option<String> {
    // A pointer at the end says nothing to a reader.
    let strip_ptr = |l: &str, tag: &str| l.split_once(tag).map_or(l.to_string(), |(a, _)| a.to_string());
    const AS_IS: &[&str] = &[
        "QMP ",
        "QMP: ",
        "acpi_task: Notify(",
        "surprise removal: PCEJ",
        "acpi_SetInteger(",
        "device_delete_child(",
        "pci_read_device(",
        "pci_add_child(",
        "disk_create(",
        "disk_gone(",
        "g_event: d_gone(",
        "disk_destroy(",
        "destroy_dev(",
        "backing file ",
        "g_disk_access(",
        "g_down: ",
        "g_up: ",
        "in flight at the surprise removal",
        "after the ",
        "hot-add of ",
        "devclass_add_driver(",
        "pci_driver_added(",
        "pci_enable_busmaster(",
    ];
    // The kobj methods of newbus, by the name the kernel's DEVMETHODs give them.
    for (desc, method) in [("device_probe_desc", "DEVICE_PROBE"), ("device_attach_desc", "DEVICE_ATTACH"), ("device_detach_desc", "DEVICE_DETACH")] {
        if let Some((dev, r)) = line.split_once(&format!(": {desc} = ")) {
            return Some(format!("{method}({dev}) = {r}{}", if desc == "device_probe_desc" { probe_name(r) } else { "" }));
        }
    }
    if line.starts_with("MOD_EVENT(") {
        return line.contains(" = ").then(|| line.to_string());
    }
    // The size as nvd(4) prints it for its disk (sys/dev/nvd/nvd.c nvd_new_disk: "nvd0: 16MB
    // (32768 512 byte sectors)"); the module prints no such line, and GEOM only "new disk"
    // with bootverbose (sys/geom/geom_disk.c g_disk_create).
    if let Some(rest) = line.strip_prefix("disk_create(") {
        let num = |tag: &str| rest.split_once(tag).and_then(|(a, _)| a.rsplit(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok());
        if let (Some(bytes), Some(sector)) = (num(" bytes"), num("-byte sectors")) {
            if let Some(sectors) = bytes.checked_div(sector) {
                return Some(format!("{line}: {}MB ({sectors} {sector} byte sectors)", bytes >> 20));
            }
        }
        return Some(line.to_string());
    }
    if let Some(rest) = line.strip_prefix("make_dev_s(") {
        let name = rest.split(',').next().unwrap_or(rest);
        let r = line.rsplit_once(" = ").map_or("", |(_, r)| r);
        return Some(format!("make_dev_s({name}, ...) = {r}"));
    }
    if line.starts_with("taskqueue nvmehp_hotplug: run task") {
        return Some("taskqueue nvmehp_hotplug: the module's hotplug task runs".to_string());
    }
    if line.starts_with("time passes: callout ") {
        return Some("time passes: a callout fires (softclock, its mutex held)".to_string());
    }
    if line.starts_with("device ") && line.contains(": attached at MOD_LOAD") {
        return Some(line.to_string());
    }
    // A request the driver failed; one that succeeded is told by g_up.
    if let Some((_, rest)) = line.strip_prefix("biodone(").and_then(|r| r.split_once("): error ")) {
        let err = rest.split(',').next().unwrap_or(rest);
        return (err != "0").then(|| format!("biodone: error {err}{}", if err == "6" { " (ENXIO)" } else { "" }));
    }
    if !AS_IS.iter().any(|p| line.starts_with(p)) {
        return None;
    }
    if let Some((_, result)) = line.strip_prefix("g_up: bio 0x").and_then(|r| r.split_once(" done: ")) {
        return Some(format!("g_up: bio done: {result}"));
    }
    Some(strip_ptr(&strip_ptr(line, " bio 0x"), " (device_t 0x"))
}

/// The name sys/bus.h gives a DEVICE_PROBE bid, if it is one of them.
fn probe_name(r: &str) -> &'static str {
    use crate::layouts as l;
    match r.parse::<i32>() {
        Ok(l::BUS_PROBE_SPECIFIC) => " (BUS_PROBE_SPECIFIC)",
        Ok(l::BUS_PROBE_VENDOR) => " (BUS_PROBE_VENDOR)",
        Ok(l::BUS_PROBE_DEFAULT) => " (BUS_PROBE_DEFAULT)",
        Ok(l::BUS_PROBE_LOW_PRIORITY) => " (BUS_PROBE_LOW_PRIORITY)",
        Ok(l::BUS_PROBE_GENERIC) => " (BUS_PROBE_GENERIC)",
        Ok(l::BUS_PROBE_HOOVER) => " (BUS_PROBE_HOOVER)",
        Ok(l::BUS_PROBE_NOWILDCARD) => " (BUS_PROBE_NOWILDCARD)",
        _ => "",
    }
}

/// Prints what happened since the last call: the console and the host's lines in the order
/// they were made.
struct Teller<'w> {
    out: &'w mut dyn Write,
    /// How far the call log and the console were told.
    log_at: usize,
    console_at: usize,
    /// The last host line, not printed yet, and how many times in a row it came.
    last: Option<(String, usize)>,
}

impl Teller<'_> {
    fn say(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
    }

    /// Prints the pending host line, with its count if it came more than once in a row.
    fn flush(&mut self) {
        if let Some((fact, n)) = self.last.take() {
            let times = if n > 1 { format!(" (x{n})") } else { String::new() };
            self.say(&format!("    | {fact}{times}"));
        }
    }

    fn fact(&mut self, fact: String) {
        match &mut self.last {
            Some((f, n)) if *f == fact => *n += 1,
            _ => {
                self.flush();
                self.last = Some((fact, 1));
            }
        }
    }

    /// Prints `console` up to byte `end`, from where it was told last.
    fn console_upto(&mut self, console: &str, end: usize) {
        let text = console.get(self.console_at..end).unwrap_or("");
        self.console_at = end.max(self.console_at);
        if !text.is_empty() {
            self.flush();
            let _ = self.out.write_all(text.as_bytes());
        }
    }

    /// Tells the call-log lines from `log_at` on, each after the console text printed before
    /// it (`marks[i]`: the console's length when `log[i]` was made), then the rest of the
    /// console.
    fn tell(&mut self, log: &[String], marks: &[usize], console: &str) {
        let from = self.log_at.min(log.len());
        for (line, &mark) in log[from..].iter().zip(&marks[from.min(marks.len())..]) {
            self.console_upto(console, mark);
            if let Some(fact) = host_fact(line) {
                self.fact(fact);
            }
        }
        self.log_at = log.len();
        self.console_upto(console, console.len());
        self.flush();
    }

    /// Tells what the emulated kernel recorded since the last call.
    fn catch_up(&mut self) {
        let (log, marks, console) = with(|e| (e.log.clone(), e.console_at.clone(), e.console.clone()));
        self.tell(&log, &marks, &console);
    }
}

/// Runs the demo on the loaded module, telling it to `out`.
pub fn demo(ko: &LoadedKo, ko_name: &str, out: &mut dyn Write) -> Result<Verdict, LoadError> {
    let opts = Options {
        qemu: true,
        acpi: true,
        tunables: TUNABLES.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        plan: Some(plan()),
        ..Options::default()
    };
    let mut t = Teller { out, log_at: 0, console_at: 0, last: None };
    t.say("kldhost demo: the shipped nvme_hotplug.ko in an emulated FreeBSD 15 kernel over QEMU's pc machine");
    t.say("(i440fx/PIIX4, ACPI PCI hotplug as QEMU's DSDT has it; one NVMe controller in slot 4 on a 16 MiB image).");
    t.say("Lines starting with ==> are the narrator, with '    |' what the host saw; the rest is the kernel's console.");
    t.say("");
    let tunables: Vec<String> = TUNABLES.iter().map(|(n, v)| format!("{n}={v}")).collect();
    t.say(&format!("==> kldload {ko_name} (loader tunables: {})", tunables.join(" ")));
    let mut verdict = Verdict::default();
    let report = run::run_observed(ko, &opts, &mut |m, report| {
        t.catch_up();
        match m {
            Moment::Loaded => {}
            Moment::Before(step) => {
                t.say("");
                t.say(&announce(step, report));
            }
            Moment::After(step, ok) => {
                if *step == Step::Detach && report.detach.is_empty() {
                    t.say("    | no function attached: nothing to detach");
                }
                if !ok {
                    t.say(&format!("==> FAILED: {}", title(step)));
                    verdict.failed.push(title(step));
                }
            }
            Moment::Skipped(step) => {
                t.say(&format!("==> skipped after the failure: {}", title(step)));
                verdict.skipped.push(title(step));
            }
            Moment::Unloading => {
                t.say("");
                t.say("==> kldunload nvme_hotplug (MOD_QUIESCE, then MOD_UNLOAD)");
            }
            Moment::Unloaded => {}
        }
    })?;
    verdict.unloaded = report.unloaded;
    verdict.findings = report.findings.len();
    let (blocks, freed, nodes, disks) = with(|e| {
        let freed = e.blocks.values().filter(|b| b.freed).count();
        let disks = e.disks.values().filter(|d| d.state != crate::emu::geom::DiskState::Destroyed).count();
        (e.blocks.len(), freed, e.devs.len(), disks)
    });
    let handlers = crate::emu::acpi::installed_handlers().len();
    t.say("");
    t.say("==> summary");
    let steps = plan().steps.len();
    t.say(&format!("    | steps done: {} of {steps}", steps - verdict.failed.len() - verdict.skipped.len()));
    t.say(&format!("    | MOD_QUIESCE: {}, MOD_UNLOAD: {}, unloaded: {}", errno(report.quiesce), errno(report.unload), report.unloaded));
    t.say(&format!("    | allocations (malloc(9), contigmalloc(9)): {blocks}, freed: {freed}"));
    t.say(&format!("    | device nodes left: {nodes}, disks left: {disks}, ACPI notify handlers left: {handlers}"));
    t.say(&format!("    | findings: {}", report.findings.len()));
    for f in &report.findings {
        t.say(&format!("    |   {f}"));
    }
    if verdict.ok() {
        t.say("kldhost demo: ok");
    } else if let Some(step) = verdict.failed.first() {
        t.say(&format!("kldhost demo: FAILED at the step: {step}"));
    } else {
        t.say(&format!("kldhost demo: FAILED: unloaded {}, {} findings", report.unloaded, report.findings.len()));
    }
    Ok(verdict)
}

fn errno(r: Option<std::ffi::c_int>) -> String {
    r.map_or("not sent".to_string(), |e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lines_are_chosen_and_shortened() {
        assert_eq!(host_fact("g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes) bio 0x55e7c27b3d30").as_deref(), Some("g_down: d_strategy(nvmehpd0, BIO_WRITE, offset 8192, 4096 bytes)"));
        assert_eq!(host_fact("g_up: bio 0x55e7c27b3d30 done: error 0, resid 0").as_deref(), Some("g_up: bio done: error 0, resid 0"));
        assert_eq!(host_fact("biodone(0x1234): error 6, flags 0x3, resid 4096").as_deref(), Some("biodone: error 6 (ENXIO)"));
        assert_eq!(host_fact("biodone(0x1234): error 0, flags 0x2, resid 0"), None, "a success is told by g_up");
        assert_eq!(host_fact("nvmehp0: device_probe_desc = -1000000").as_deref(), Some("DEVICE_PROBE(nvmehp0) = -1000000 (BUS_PROBE_HOOVER)"));
        assert_eq!(host_fact("nvmehp0: device_probe_desc ->"), None);
        assert_eq!(host_fact("MOD_EVENT(pci/nvme_hotplug, MOD_LOAD)"), None, "the call, not its result");
        assert_eq!(host_fact("MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0").as_deref(), Some("MOD_EVENT(pci/nvme_hotplug, MOD_LOAD) = 0"));
        assert_eq!(host_fact("make_dev_s(\"nvmehp0\", uid 0, gid 5, mode 600, flags 0x28, si_drv1 0x1) = 0").as_deref(), Some("make_dev_s(\"nvmehp0\", ...) = 0"));
        assert_eq!(host_fact("device_delete_child(pci0, pci0:0:4:0) = 0 (device_t 0x1 freed, poisoned)").as_deref(), Some("device_delete_child(pci0, pci0:0:4:0) = 0"));
        assert_eq!(
            host_fact("disk_create(nvmehpd0: 16777216 bytes, 512-byte sectors, d_gone set)").as_deref(),
            Some("disk_create(nvmehpd0: 16777216 bytes, 512-byte sectors, d_gone set): 16MB (32768 512 byte sectors)")
        );
        assert_eq!(host_fact("malloc(48, flags 0x1) = 0x1"), None);
    }

    #[test]
    fn console_and_host_lines_come_out_in_the_order_they_were_made_repeats_counted() {
        let log: Vec<String> = [
            "surprise removal: PCEJ bit 4 written with no device_del: Ok(())",
            "biodone(0x1): error 6, flags 0x3, resid 4096",
            "biodone(0x2): error 6, flags 0x3, resid 4096",
            "malloc(48, flags 0x1) = 0x3",
            "disk_gone(nvmehpd0) (d_gone runs from the GEOM event thread)",
            "g_event: d_gone(nvmehpd0)",
        ]
        .map(String::from)
        .to_vec();
        let console = "nvmehp0: controller lost\nnvmehp0: detached\nunloaded\n";
        // "controller lost" was printed after the two biodones, "detached" after disk_gone,
        // "unloaded" after the last log line.
        let marks = [0, 0, 0, 25, 25, 43];
        let mut out = Vec::new();
        let mut t = Teller { out: &mut out, log_at: 0, console_at: 0, last: None };
        // Told in two goes, as at a step's boundary (a repeat is counted within one go).
        t.tell(&log[..1], &marks[..1], &console[..0]);
        t.tell(&log, &marks, console);
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "    | surprise removal: PCEJ bit 4 written with no device_del: Ok(())\n\
             \x20   | biodone: error 6 (ENXIO) (x2)\n\
             nvmehp0: controller lost\n\
             \x20   | disk_gone(nvmehpd0) (d_gone runs from the GEOM event thread)\n\
             nvmehp0: detached\n\
             \x20   | g_event: d_gone(nvmehpd0)\n\
             unloaded\n"
        );
    }
}
