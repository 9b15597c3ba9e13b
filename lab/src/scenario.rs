//! The scenario file format (TOML), parsed strictly: an unknown key or op is an error that names
//! it, never silently ignored — a typo in a test must not turn it into a weaker test.
//! The format is documented for users in `docs/scenarios.md`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::access_faults::RemovalReads;
use crate::interrupts::InterruptMode;
use crate::qemu::MachineKind;
use crate::shared_ram::RamAccess;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in reports.
    pub name: String,
    /// Machine model.
    #[serde(default = "default_machine")]
    pub machine: MachineKind,
    /// Seed every random choice derives from.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Who drives the controllers: `engine` (default: the lab runs the engine and the hotplug
    /// state machine itself) or `kld` (the shipped nvme_hotplug.ko inside kldhost's emulated
    /// FreeBSD kernel; `nvmehp-lab run` hands the scenario to the `kldhost` binary).
    #[serde(default)]
    pub driver: DriverKind,
    /// What reads of a removed controller return: `zeros` (QEMU) or `all-ones` (real PCIe).
    #[serde(default)]
    pub removal_reads: RemovalReads,
    /// How drivers learn of completions: `poll` (default), `msix` (MSI-X vector 0 written to
    /// guest RAM) or `intx` (the intercepted INTx line; pc only). With interrupts, a driver
    /// polls only after an interrupt, plus once a second from its watchdog, as the kld does.
    #[serde(default)]
    pub interrupts: InterruptMode,
    /// How the lab reaches guest RAM (DMA buffers, queues, MSI-X mailboxes): `shared` (default:
    /// QEMU's RAM is a file the lab maps too) or `qtest` (qtest `read`/`write` commands).
    #[serde(default)]
    pub ram_access: RamAccess,
    /// Controllers present at power-on.
    #[serde(default, rename = "controller")]
    pub controllers: Vec<ControllerSpec>,
    /// Steps, in order.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
}

/// Who drives the controllers in a run.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DriverKind {
    /// The lab's kernel around the engine (`src/nvme`, `src/hotplug`), in this process.
    #[default]
    Engine,
    /// The shipped `.ko` in kldhost (an emulated FreeBSD kernel), I/O through `d_strategy`.
    Kld,
}

impl DriverKind {
    /// The name reports use (`engine` or `kld`).
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Engine => "engine",
            DriverKind::Kld => "kld",
        }
    }
}

fn default_machine() -> MachineKind {
    MachineKind::Pc
}

fn default_seed() -> u64 {
    1
}

/// A controller: where it sits and what namespaces it has.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControllerSpec {
    /// Scenario-level name ("c0"); letters, digits, '-' and '_', starting with a letter.
    pub id: String,
    /// PCI slot on bus 0 (2..=31; 0 and 1 are the host bridge and the PIIX).
    pub slot: u8,
    /// Namespaces (at least one).
    pub namespaces: Vec<NamespaceSpec>,
}

/// One namespace and its backing image.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Namespace ID (1..=256).
    pub nsid: u32,
    /// Image size in MiB.
    pub size_mib: u32,
    /// Logical block size: 512 or 4096.
    #[serde(default = "default_lba")]
    pub lba: u32,
}

fn default_lba() -> u32 {
    512
}

/// What an `io` step does.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IoKind {
    /// Write a block, then read it back and compare.
    WriteVerify,
    /// Read blocks; compare with what the ledger knows is there.
    Read,
    /// Random reads and writes, reads compared with the ledger.
    Mixed,
}

/// How a controller leaves.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DetachMode {
    /// `device_del`: ACPI eject request (Notify 3), the driver detaches, then `_EJ0`.
    #[default]
    Announced,
    /// The device vanishes with no notification; the driver learns only from what it reads.
    Surprise,
    /// Announced or surprise, chosen from the scenario's seed.
    Random,
}

/// The `_OST` answer a `notify` step expects (one for the whole burst).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OstExpect {
    /// 0x0: handled (for an eject: the device is gone).
    Success,
    /// 0x1: non-specific failure (e.g. an eject request for an empty slot).
    Failure,
    /// 0x2: the notify value is not one we handle.
    Unrecognized,
    /// 0x81: the device is in use (a node is open).
    InUse,
    /// 0x82: the device is busy (detach returned EBUSY).
    Busy,
}

/// How a driver with an open node refuses an eject request.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// A consumer holds the device: `_OST` 0x81 (what the kld does for an open node).
    #[default]
    InUse,
    /// `device_detach` returned EBUSY: `_OST` 0x82.
    Busy,
}

/// Which removal flavours a bring-up sweep runs.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SweepReads {
    /// QEMU's: reads return 0.
    Zeros,
    /// Real PCIe's: reads return all-ones.
    AllOnes,
    /// Both, one sweep each.
    #[default]
    Both,
}

/// What a `wait` step waits for.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WaitUntil {
    /// Every I/O job finished and nothing outstanding on any controller.
    Idle,
    /// Every plugged controller has a driver (after `attach` steps with `wait = false`).
    Attached,
    /// Every removal started by a `detach` step with `wait = false` has finished (driver torn
    /// down, slot empty, hotplug task settled).
    Removed,
}

/// One step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Hot-add a controller.
    Attach {
        /// Scenario id.
        id: String,
        /// Slot.
        slot: u8,
        /// Namespaces.
        namespaces: Vec<NamespaceSpec>,
        /// Wait until the driver attached (default). With `false` the step only plugs the
        /// device (QEMU raises the GPE); a later step (e.g. `notify`) sees it arrive.
        #[serde(default = "yes")]
        wait: bool,
    },
    /// Run I/O against one namespace.
    Io {
        /// "ctrl/nsid", e.g. "c1/1".
        target: String,
        /// What to do.
        kind: IoKind,
        /// Number of operations.
        ops: u64,
        /// Most requests in flight at once.
        #[serde(default = "default_depth")]
        depth: u32,
        /// Bytes per request (a multiple of the namespace's block size).
        #[serde(default = "default_block")]
        block: u32,
        /// Run interleaved with the following steps instead of to completion.
        #[serde(default)]
        background: bool,
    },
    /// Remove a controller.
    Detach {
        /// Scenario id.
        id: String,
        /// Announced or surprise.
        #[serde(default)]
        mode: DetachMode,
        /// Remove while requests are in flight (the runner makes sure some are).
        #[serde(default)]
        during_io: bool,
        /// Before removing, keep servicing the machine for a seeded-random 0..=jitter_ms ms,
        /// so the removal lands at a random point of the running I/O.
        #[serde(default)]
        jitter_ms: u64,
        /// Wait until the controller is torn down and its slot empty (default). With `false`
        /// the step only starts the removal; `wait until = "removed"` waits for all of them.
        #[serde(default = "yes")]
        wait: bool,
        /// Announced only: the driver is expected to refuse the eject (a node is held open
        /// with `open`): `_OST` 0x81/0x82, no `_EJ0`, the controller stays attached.
        #[serde(default)]
        refused: bool,
    },
    /// The platform's `Notify(slot, code)`, `times` times in a row, all delivered before the
    /// hotplug task runs (a storm): the state machine must coalesce them into one action.
    Notify {
        /// Slot (2..=31).
        slot: u8,
        /// Notify value: 0 bus check, 1 device check, 3 eject request, anything else is
        /// unrecognized.
        code: u32,
        /// How many.
        #[serde(default = "one")]
        times: u32,
        /// The one final `_OST` the burst must be answered with (checked when given).
        #[serde(default)]
        expect_ost: Option<OstExpect>,
        /// Slot rescans (attaches) the burst must cause (checked when given).
        #[serde(default)]
        expect_rescans: Option<u64>,
    },
    /// Hold a namespace node open (like a mounted file system): an eject request is refused
    /// until `close`.
    Open {
        /// "ctrl/nsid".
        target: String,
        /// How the refusal is reported.
        #[serde(default)]
        refuse: Refusal,
    },
    /// Close a node held open by `open`.
    Close {
        /// "ctrl/nsid".
        target: String,
    },
    /// Surprise removal at every device access of a bring-up: for N = 0, 1, 2, ... hot-add a
    /// fresh controller in `slot` and eject it right before the driver's device access N, until
    /// a bring-up completes before access N. Every run must end with bring-up failing (or
    /// the removal noticed right after it) and a clean teardown: no panic, no hang, DMA memory
    /// back to where it was, no node left.
    BringupRemovalSweep {
        /// Slot to use (must be free).
        slot: u8,
        /// Namespaces of the swept controller (default: one 4 MiB namespace, 512 B blocks).
        #[serde(default = "sweep_namespaces")]
        namespaces: Vec<NamespaceSpec>,
        /// Removal flavour(s).
        #[serde(default)]
        reads: SweepReads,
        /// Sweep every `stride`-th access (1 = every access).
        #[serde(default = "one_u64")]
        stride: u64,
    },
    /// Let time pass, or wait until idle.
    Wait {
        /// Milliseconds to keep servicing the machine.
        #[serde(default)]
        ms: Option<u64>,
        /// A condition instead of a time.
        #[serde(default)]
        until: Option<WaitUntil>,
    },
    /// Repeat inline steps.
    Repeat {
        /// How many times.
        times: u64,
        /// The steps (same keys as top-level steps).
        steps: Vec<Step>,
    },
    /// Check the current state.
    Expect {
        /// Controllers attached and live.
        #[serde(default)]
        controllers: Option<usize>,
        /// Namespaces across live controllers.
        #[serde(default)]
        namespaces: Option<usize>,
        /// Device nodes alive (as the observer counts them).
        #[serde(default)]
        nodes: Option<usize>,
    },
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn one_u64() -> u64 {
    1
}

fn sweep_namespaces() -> Vec<NamespaceSpec> {
    vec![NamespaceSpec { nsid: 1, size_mib: 4, lba: 512 }]
}

fn default_depth() -> u32 {
    8
}

fn default_block() -> u32 {
    4096
}

impl Step {
    /// The `op` name, for reports.
    pub fn op_name(&self) -> &'static str {
        match self {
            Step::Attach { .. } => "attach",
            Step::Io { .. } => "io",
            Step::Detach { .. } => "detach",
            Step::Wait { .. } => "wait",
            Step::Repeat { .. } => "repeat",
            Step::Expect { .. } => "expect",
            Step::Notify { .. } => "notify",
            Step::Open { .. } => "open",
            Step::Close { .. } => "close",
            Step::BringupRemovalSweep { .. } => "bringup-removal-sweep",
        }
    }
}

/// A scenario that failed to load or validate.
#[derive(Debug)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError(format!("invalid scenario: {e}")))?;
        s.validate()?;
        Ok(s)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ScenarioError(format!("{}: {}", path.display(), e.0)))
    }

    /// Every slot the scenario uses (boot-time controllers and attach steps, repeats included).
    pub fn slots(&self) -> Vec<u8> {
        fn walk(steps: &[Step], out: &mut Vec<u8>) {
            for s in steps {
                match s {
                    Step::Attach { slot, .. } | Step::BringupRemovalSweep { slot, .. } => out.push(*slot),
                    Step::Repeat { steps, .. } => walk(steps, out),
                    _ => {}
                }
            }
        }
        let mut out: Vec<u8> = self.controllers.iter().map(|c| c.slot).collect();
        walk(&self.steps, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Checks everything that can be checked without running (ids, slots, sizes, targets).
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let mut slots = std::collections::BTreeMap::new();
        for c in &self.controllers {
            validate_controller(&c.id, c.slot, &c.namespaces)?;
            if let Some(other) = slots.insert(c.slot, c.id.clone()) {
                return Err(ScenarioError(format!("controllers {other} and {} both use slot {}", c.id, c.slot)));
            }
        }
        validate_steps(&self.steps, 0)?;
        if self.machine == MachineKind::Q35 {
            if let Some(s) = self.slots().into_iter().find(|s| *s > 30) {
                return Err(ScenarioError(format!("q35: slot {s} is the ICH9 LPC's; use 2..=30")));
            }
        }
        Ok(())
    }
}

fn validate_steps(steps: &[Step], depth: usize) -> Result<(), ScenarioError> {
    for (i, s) in steps.iter().enumerate() {
        let at = |m: String| ScenarioError(format!("step {} ({}): {m}", i + 1, s.op_name()));
        match s {
            Step::Attach { id, slot, namespaces, .. } => {
                validate_controller(id, *slot, namespaces).map_err(|e| at(e.0))?;
                // QEMU's NVMe bus is not hotpluggable: a hot-added controller can only carry
                // the namespace its own `drive` gives it.
                if namespaces.len() != 1 || namespaces[0].nsid != 1 {
                    return Err(at(format!(
                        "{id}: a hot-added controller has exactly one namespace, nsid 1 (QEMU cannot \
                         hot-plug nvme-ns); put multi-namespace controllers in [[controller]]"
                    )));
                }
            }
            Step::Io { target, ops, depth, block, .. } => {
                parse_target(target).map_err(|e| at(e.0))?;
                if *ops == 0 {
                    return Err(at("ops must be at least 1".into()));
                }
                if *depth == 0 || *depth > 1024 {
                    return Err(at(format!("depth {depth} outside 1..=1024")));
                }
                if *block == 0 || block % 512 != 0 || *block > 8 << 20 {
                    return Err(at(format!("block {block} must be a multiple of 512, at most 8 MiB")));
                }
            }
            Step::Detach { id, mode, refused, jitter_ms, .. } => {
                validate_id(id).map_err(|e| at(e.0))?;
                if *refused && *mode != DetachMode::Announced {
                    return Err(at("refused = true needs mode = \"announced\" (only an eject request can be refused)".into()));
                }
                if *jitter_ms > 60_000 {
                    return Err(at(format!("jitter_ms {jitter_ms} above 60000")));
                }
            }
            Step::Notify { slot, times, .. } => {
                if !(2..=31).contains(slot) {
                    return Err(at(format!("slot {slot} outside 2..=31")));
                }
                if *times == 0 || *times > 100_000 {
                    return Err(at(format!("times {times} outside 1..=100000")));
                }
            }
            Step::Open { target, .. } | Step::Close { target } => {
                parse_target(target).map_err(|e| at(e.0))?;
            }
            Step::BringupRemovalSweep { slot, namespaces, stride, .. } => {
                validate_controller("sweep", *slot, namespaces).map_err(|e| at(e.0))?;
                if namespaces.len() != 1 || namespaces[0].nsid != 1 {
                    return Err(at("the swept controller is hot-added: exactly one namespace, nsid 1".into()));
                }
                if *stride == 0 {
                    return Err(at("stride must be at least 1".into()));
                }
            }
            Step::Wait { ms, until } => {
                if ms.is_some() == until.is_some() {
                    return Err(at("give exactly one of `ms` or `until`".into()));
                }
            }
            Step::Repeat { times, steps } => {
                if *times == 0 {
                    return Err(at("times must be at least 1".into()));
                }
                if depth > 4 {
                    return Err(at("repeat nested too deeply".into()));
                }
                validate_steps(steps, depth + 1).map_err(|e| at(e.0))?;
            }
            Step::Expect { controllers, namespaces, nodes } => {
                if controllers.is_none() && namespaces.is_none() && nodes.is_none() {
                    return Err(at("expect needs at least one of controllers, namespaces, nodes".into()));
                }
            }
        }
    }
    Ok(())
}

fn validate_id(id: &str) -> Result<(), ScenarioError> {
    let ok = id.len() <= 12
        && id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ScenarioError(format!(
            "id {id:?}: use 1-12 letters, digits, '-' or '_', starting with a letter"
        )))
    }
}

fn validate_controller(id: &str, slot: u8, namespaces: &[NamespaceSpec]) -> Result<(), ScenarioError> {
    validate_id(id)?;
    if !(2..=31).contains(&slot) {
        return Err(ScenarioError(format!("{id}: slot {slot} outside 2..=31")));
    }
    if namespaces.is_empty() {
        return Err(ScenarioError(format!("{id}: needs at least one namespace")));
    }
    let mut seen = std::collections::BTreeSet::new();
    for ns in namespaces {
        if ns.nsid == 0 || ns.nsid > 256 {
            return Err(ScenarioError(format!("{id}: nsid {} outside 1..=256", ns.nsid)));
        }
        if !seen.insert(ns.nsid) {
            return Err(ScenarioError(format!("{id}: nsid {} given twice", ns.nsid)));
        }
        if ns.lba != 512 && ns.lba != 4096 {
            return Err(ScenarioError(format!("{id}: lba {} must be 512 or 4096", ns.lba)));
        }
        if ns.size_mib == 0 || ns.size_mib > 4096 {
            return Err(ScenarioError(format!("{id}: size_mib {} outside 1..=4096", ns.size_mib)));
        }
    }
    Ok(())
}

/// Splits "ctrl/nsid".
pub fn parse_target(t: &str) -> Result<(String, u32), ScenarioError> {
    let (c, n) = t
        .split_once('/')
        .ok_or_else(|| ScenarioError(format!("target {t:?} must look like \"c1/1\"")))?;
    validate_id(c)?;
    let nsid: u32 = n.parse().map_err(|_| ScenarioError(format!("target {t:?}: bad nsid")))?;
    if nsid == 0 {
        return Err(ScenarioError(format!("target {t:?}: nsid 0")));
    }
    Ok((c.to_string(), nsid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "remove-under-write"
machine = "pc"
seed = 1
[[controller]]
id = "c0"
slot = 4
namespaces = [{ nsid = 1, size_mib = 64, lba = 512 }]
[[step]]
op = "attach"
id = "c1"
slot = 6
namespaces = [{ nsid = 1, size_mib = 16, lba = 4096 }]
[[step]]
op = "io"
target = "c1/1"
kind = "write-verify"
ops = 2000
depth = 32
block = 4096
background = true
[[step]]
op = "detach"
id = "c1"
mode = "surprise"
during_io = true
[[step]]
op = "wait"
until = "idle"
[[step]]
op = "repeat"
times = 100
steps = [ { op = "attach", id = "c2", slot = 7, namespaces = [{ nsid = 1, size_mib = 8, lba = 512 }] },
          { op = "detach", id = "c2", mode = "announced" } ]
[[step]]
op = "expect"
controllers = 1
"#;

    #[test]
    fn parses_the_documented_example() {
        let s = Scenario::parse(EXAMPLE).unwrap();
        assert_eq!(s.controllers.len(), 1);
        assert_eq!(s.steps.len(), 6);
        match &s.steps[4] {
            Step::Repeat { times, steps } => {
                assert_eq!(*times, 100);
                assert_eq!(steps.len(), 2);
            }
            other => panic!("wrong step {other:?}"),
        }
    }

    #[test]
    fn driver_defaults_to_engine_and_kld_can_be_asked_for() {
        assert_eq!(Scenario::parse("name='x'\n").unwrap().driver, DriverKind::Engine);
        assert_eq!(Scenario::parse("name='x'\ndriver='kld'\n").unwrap().driver, DriverKind::Kld);
        let e = Scenario::parse("name='x'\ndriver='linux'\n").unwrap_err();
        assert!(e.0.contains("linux"), "{}", e.0);
    }

    #[test]
    fn ram_access_defaults_to_shared_and_qtest_can_be_asked_for() {
        assert_eq!(Scenario::parse("name='x'\n").unwrap().ram_access, RamAccess::Shared);
        assert_eq!(Scenario::parse("name='x'\nram_access='qtest'\n").unwrap().ram_access, RamAccess::Qtest);
        assert_eq!(Scenario::parse("name='x'\nram_access='shared'\n").unwrap().ram_access, RamAccess::Shared);
    }

    #[test]
    fn unknown_op_is_an_error_naming_it() {
        let e = Scenario::parse("name='x'\n[[step]]\nop='explode'\n").unwrap_err();
        assert!(e.0.contains("explode"), "{}", e.0);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = Scenario::parse("name='x'\n[[step]]\nop='wait'\nms=3\nfrobnicate=1\n").unwrap_err();
        assert!(e.0.contains("frobnicate"), "{}", e.0);
        let e = Scenario::parse("name='x'\ncolour='red'\n").unwrap_err();
        assert!(e.0.contains("colour"), "{}", e.0);
        let e = Scenario::parse("name='x'\n[[controller]]\nid='c0'\nslot=4\nnamespaces=[{nsid=1,size_mib=1,lab=512}]\n")
            .unwrap_err();
        assert!(e.0.contains("lab"), "{}", e.0);
    }

    #[test]
    fn bad_values_are_errors() {
        for (bad, word) in [
            ("name='x'\n[[controller]]\nid='c0'\nslot=1\nnamespaces=[{nsid=1,size_mib=1}]\n", "slot"),
            ("name='x'\n[[controller]]\nid='c0'\nslot=4\nnamespaces=[{nsid=1,size_mib=1,lba=1024}]\n", "lba"),
            ("name='x'\n[[step]]\nop='wait'\n", "exactly one"),
            ("name='x'\n[[step]]\nop='io'\ntarget='c0'\nkind='read'\nops=1\n", "target"),
            ("name='x'\nmachine='sparc'\n", "sparc"),
            ("name='x'\nram_access='mmap'\n", "mmap"),
            ("name='x'\n[[step]]\nop='attach'\nid='c1'\nslot=6\nnamespaces=[{nsid=2,size_mib=1}]\n", "exactly one"),
        ] {
            let e = Scenario::parse(bad).unwrap_err();
            assert!(e.0.contains(word), "{bad}: {}", e.0);
        }
    }
}
