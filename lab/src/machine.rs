//! One QEMU machine as the lab drives it: the process, the shared guest (qtest + DMA pool), QMP,
//! the ACPI hotplug block, and the NVMe devices plugged into it with their image files.
//!
//! This is the *platform* side of hotplug — what the hypervisor and the firmware do. The
//! driver side (what to do on Notify 1/3, the engine) lives in the runner, so that a scenario
//! exercises exactly the sequence a FreeBSD kernel sees.
//!
//! Device lifetime in QEMU, and why [`Machine::reap`] exists: after an eject, QEMU finishes the
//! unplug asynchronously (`DEVICE_DELETED` 5–60 ms later), and only then can the block nodes be
//! deleted. An eject while commands are in flight in the backend may never finish (QEMU leaks
//! the device), so removed devices are parked as *retiring* and reaped opportunistically; what
//! is left at the end is reported, never waited on forever.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use crate::access_faults::{RemovalReads, SlotFaults};
use crate::acpi_hotplug::{AcpiHotplug, HotplugLayout, Notify};
use crate::dma::{GuestRam, DMA_POOL_START};
use crate::firmware::{self, Bdf, PciFunction};
use crate::guest::Guest;
use crate::platform::LabPlatform;
use crate::qemu::{MachineKind, QemuProcess};
use crate::qmp::QmpClient;
use crate::qtest::Qtest;
use crate::scenario::ControllerSpec;
use crate::shared_ram::{RamAccess, SharedRam};

/// Guest RAM size: the DMA pool is everything above [`DMA_POOL_START`].
pub const GUEST_RAM_MIB: u32 = 256;

/// A namespace's backing image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Namespace ID it backs.
    pub nsid: u32,
    /// Host path of the raw image.
    pub path: PathBuf,
    /// Logical block size the namespace was given.
    pub lba_bytes: u32,
    /// Size in bytes.
    pub bytes: u64,
}

/// A boot-time controller placed in an NVMe subsystem (QEMU `nvme-subsys`) with a second,
/// lab-private controller: its namespaces are shared by the subsystem, and the lab can attach
/// and detach them through the private controller's admin queue (Namespace Attachment), which
/// makes QEMU send the first controller a Namespace Attribute Changed notice (hw/nvme/ctrl.c
/// `nvme_ns_attachment`). QEMU 10 cannot hot-plug an `nvme-ns` (its NVMe bus refuses
/// `device_add`), so this is the lab's way to change a live controller's namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemSpec {
    /// PCI slot on bus 0 of the private controller (pc only).
    pub private_slot: u8,
    /// Namespaces of the first controller that start detached (`nvme-ns detached=on`).
    pub detached: Vec<u32>,
}

/// Where QEMU's `nvme` device puts its MSI-X table and Pending Bit Array (hw/nvme/ctrl.c
/// `nvme_init_pci`). Chosen per machine: every controller plugged into it, cold or hot-added,
/// gets the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MsixPlacement {
    /// In BAR0, after the registers and doorbells (QEMU's default since 6.0).
    #[default]
    Bar0,
    /// `msix-exclusive-bar=on`: in a 32-bit BAR4 of their own (hw/pci/msix.c
    /// `msix_init_exclusive_bar`: 4 KiB for the 65 vectors, the table at offset 0, the PBA at
    /// 0x800), as on bhyve and many real controllers; BAR0 then holds only the registers and
    /// doorbells. The lab's engine refuses such a controller (crate::interrupts wants the table
    /// in BAR0); kldhost's pci(4) takes it. QEMU 10 aborts when such a controller is unplugged
    /// (hw/nvme/ctrl.c `nvme_exit` deletes its register region from a BAR0 container it was
    /// never added to: `memory_region_del_subregion` asserts), so no eject with it.
    ExclusiveBar,
}

/// A controller plugged into QEMU (cold at start, or hot-added).
#[derive(Debug, Clone)]
pub struct PluggedDevice {
    /// Scenario id ("c1").
    pub id: String,
    /// PCI slot on bus 0.
    pub slot: u8,
    /// PCI function in the slot (0 unless the slot is multi-function).
    pub func: u8,
    /// Function 0 of a multi-function slot: plugged with `multifunction=on`, so its header type
    /// has PCIM_MFDEV and the OS looks at functions 1..7 (QEMU hw/pci/pci.c refuses a second
    /// function in a slot whose function 0 lacks it).
    pub multifunction: bool,
    /// qdev id of the `nvme` device (fresh per plug).
    pub qdev: String,
    /// Backing images, one per namespace.
    pub images: Vec<Image>,
    /// Block nodes to delete after the device is gone, raw nodes before their file nodes.
    pub nodes: Vec<String>,
    /// With a [`SubsystemSpec`]: the private controller's slot and qdev id.
    pub private: Option<(u8, String)>,
    /// Where its MSI-X table and PBA are.
    pub msix: MsixPlacement,
}

/// The running machine.
pub struct Machine {
    kind: MachineKind,
    /// q35: slots holding a `pcie-root-port` (a scenario slot names the port).
    ports: Vec<u8>,
    guest: Rc<Guest>,
    qmp: QmpClient,
    acpi: AcpiHotplug,
    images_dir: tempfile::TempDir,
    /// Devices currently in a slot (from QEMU's point of view), by (slot, function).
    plugged: BTreeMap<(u8, u8), PluggedDevice>,
    /// Ejected devices whose `DEVICE_DELETED`/`blockdev-del` has not happened yet.
    retiring: Vec<PluggedDevice>,
    generation: u64,
    /// Fault state of the platform last handed out per slot.
    faults: RefCell<BTreeMap<u8, Rc<SlotFaults>>>,
    /// Removals armed for the next platform of a slot: eject before access N.
    armed: RefCell<BTreeMap<u8, u64>>,
    /// What reads of a removed device return.
    removal_reads: RemovalReads,
    /// Where the controllers plugged into it have their MSI-X table and PBA.
    msix: MsixPlacement,
    // Declared last: dropped (killed and reaped) after everything that talks to it.
    process: QemuProcess,
}

impl Machine {
    /// Starts QEMU with `cold` controllers present at power-on, connects qtest and QMP, and does
    /// the firmware's one-time setup. Does not probe the bus: call [`Machine::scan`].
    /// On q35, root ports are created for the cold slots and for slots 2..=15.
    pub fn start(kind: MachineKind, cold: &[ControllerSpec]) -> io::Result<Machine> {
        Self::start_with_slots(kind, cold, &(2..=15).collect::<Vec<u8>>())
    }

    /// Like [`Machine::start`], naming the slots hot-adds will use (q35 needs a root port in
    /// each before power-on; pc ignores the list).
    pub fn start_with_slots(kind: MachineKind, cold: &[ControllerSpec], hot_slots: &[u8]) -> io::Result<Machine> {
        Self::start_with(kind, cold, hot_slots, RamAccess::default())
    }

    /// Like [`Machine::start_with_slots`], choosing how the lab reaches guest RAM: with
    /// [`RamAccess::Shared`] QEMU's RAM is a file the lab maps too ([`SharedRam`]).
    pub fn start_with(
        kind: MachineKind,
        cold: &[ControllerSpec],
        hot_slots: &[u8],
        ram_access: RamAccess,
    ) -> io::Result<Machine> {
        let cold: Vec<(ControllerSpec, u8)> = cold.iter().map(|c| (c.clone(), 0)).collect();
        Self::start_with_functions(kind, &cold, hot_slots, ram_access)
    }

    /// Like [`Machine::start_with`], each cold controller at a function of its slot (pc only
    /// for functions above 0): function 0 of a slot that holds another function is plugged
    /// with `multifunction=on`, the others at `addr=SLOT.FUNC`.
    pub fn start_with_functions(
        kind: MachineKind,
        cold: &[(ControllerSpec, u8)],
        hot_slots: &[u8],
        ram_access: RamAccess,
    ) -> io::Result<Machine> {
        Self::start_full(kind, cold, hot_slots, ram_access, None, MsixPlacement::Bar0)
    }

    /// Like [`Machine::start_with_functions`]; with `subsys` the first cold controller is
    /// placed in an NVMe subsystem with a lab-private second controller ([`SubsystemSpec`];
    /// pc only); every controller, cold or hot-added, with its MSI-X table and PBA where
    /// `msix` says.
    pub fn start_full(
        kind: MachineKind,
        cold: &[(ControllerSpec, u8)],
        hot_slots: &[u8],
        ram_access: RamAccess,
        subsys: Option<&SubsystemSpec>,
        msix: MsixPlacement,
    ) -> io::Result<Machine> {
        if kind == MachineKind::Q35 && cold.iter().any(|(_, f)| *f != 0) {
            return Err(io::Error::other("q35: multi-function slots are not supported (a root port's bus has one device)"));
        }
        if let Some(sub) = subsys {
            if kind != MachineKind::Pc || cold.is_empty() || cold.iter().any(|(c, _)| c.slot == sub.private_slot) || !(2..32).contains(&sub.private_slot) {
                return Err(io::Error::other("an NVMe subsystem needs pc, a cold controller, and a free slot 2..=31 for its private controller"));
            }
        }
        let mut ports: Vec<u8> = Vec::new();
        if kind == MachineKind::Q35 {
            ports = cold.iter().map(|(c, _)| c.slot).chain(hot_slots.iter().copied()).collect();
            ports.sort_unstable();
            ports.dedup();
            if let Some(bad) = ports.iter().find(|s| !(2..=30).contains(*s)) {
                return Err(io::Error::other(format!("q35: slot {bad} cannot hold a root port (use 2..=30)")));
            }
        }
        let images_dir = tempfile::Builder::new().prefix("nvmehp-images-").tempdir()?;
        let mut generation = 0;
        let mut args = Vec::new();
        for &s in &ports {
            args.push("-device".into());
            args.push(format!("pcie-root-port,id=rp{s},bus=pcie.0,chassis={s},addr=0x{s:x}"));
        }
        let mut plugged = BTreeMap::new();
        for (i, (spec, func)) in cold.iter().enumerate() {
            generation += 1;
            let multifunction = *func == 0 && cold.iter().any(|(c, f)| c.slot == spec.slot && *f != 0);
            let mut dev = Self::make_device(images_dir.path(), spec, *func, multifunction, generation, msix)?;
            let sub = subsys.filter(|_| i == 0);
            if let Some(sub) = sub {
                dev.private = Some((sub.private_slot, format!("{}-priv", dev.qdev)));
            }
            for img in &dev.images {
                let (f, r) = node_names(&dev.qdev, img.nsid);
                args.push("-blockdev".into());
                args.push(format!("driver=file,filename={},node-name={f}", img.path.display()));
                args.push("-blockdev".into());
                args.push(format!("driver=raw,file={f},node-name={r}"));
            }
            for (driver, props) in device_props_in(kind, &dev, sub) {
                args.push("-device".into());
                let p: Vec<String> = props.iter().map(|(k, v)| format!("{k}={}", plain(v))).collect();
                args.push(format!("{driver},{}", p.join(",")));
            }
            plugged.insert((spec.slot, *func), dev);
        }
        let shared = match ram_access {
            RamAccess::Shared => Some(SharedRam::create((GUEST_RAM_MIB as u64) << 20)?),
            RamAccess::Qtest => None,
        };
        let (process, mut qtest, qmp_stream) = QemuProcess::spawn(kind, GUEST_RAM_MIB, shared.as_ref(), &args)?;
        let mut qmp = QmpClient::new(qmp_stream)?;
        let layout = match kind {
            MachineKind::Pc => HotplugLayout::pc(),
            MachineKind::Q35 => {
                // The DSDT hard-codes each bridge's BSEL; QEMU numbers them itself, so ask it.
                let mut pairs = Vec::new();
                for &s in &ports {
                    let bsel = qmp.qom_get_u64(&format!("/machine/peripheral/rp{s}/rp{s}"), "acpi-pcihp-bsel")?;
                    pairs.push((bsel as u32, s));
                }
                HotplugLayout::q35(&pairs)
            }
        };
        let acpi = AcpiHotplug::new(layout);
        setup_firmware(kind, &mut qtest, &ports, &acpi).map_err(to_io)?;
        let ram = GuestRam::new(DMA_POOL_START, (GUEST_RAM_MIB as u64) << 20);
        let guest = match shared {
            Some(s) => Guest::with_shared_ram(qtest, ram, s),
            None => Guest::new(qtest, ram),
        };
        Ok(Machine {
            kind,
            ports,
            guest: Rc::new(guest),
            qmp,
            acpi,
            images_dir,
            plugged,
            retiring: Vec::new(),
            generation,
            faults: RefCell::new(BTreeMap::new()),
            armed: RefCell::new(BTreeMap::new()),
            removal_reads: RemovalReads::Zeros,
            msix,
            process,
        })
    }

    /// Where the function of a scenario slot lives: bus 0 slot `slot` on pc, slot 0 of the bus
    /// behind the root port in `slot` on q35.
    pub fn bdf(&self, slot: u8) -> Bdf {
        match self.kind {
            MachineKind::Pc => Bdf::slot(slot),
            MachineKind::Q35 => Bdf { bus: slot, dev: 0, func: 0 },
        }
    }

    fn make_device(dir: &std::path::Path, spec: &ControllerSpec, func: u8, multifunction: bool, generation: u64, msix: MsixPlacement) -> io::Result<PluggedDevice> {
        let qdev = format!("{}-g{generation}", spec.id);
        let mut images = Vec::new();
        let mut nodes = Vec::new();
        for ns in &spec.namespaces {
            let path = dir.join(format!("{qdev}-ns{}.raw", ns.nsid));
            let bytes = ns.size_mib as u64 * 1024 * 1024;
            let f = fs::File::create(&path)?;
            f.set_len(bytes)?;
            images.push(Image { nsid: ns.nsid, path, lba_bytes: ns.lba, bytes });
            let (fnode, rnode) = node_names(&qdev, ns.nsid);
            nodes.push(rnode);
            nodes.push(fnode);
        }
        Ok(PluggedDevice { id: spec.id.clone(), slot: spec.slot, func, multifunction, qdev, images, nodes, private: None, msix })
    }

    /// Which machine model runs.
    pub fn kind(&self) -> MachineKind {
        self.kind
    }

    /// The shared guest (qtest + DMA pool).
    pub fn guest(&self) -> &Rc<Guest> {
        &self.guest
    }

    /// The QEMU process (pid, RSS).
    pub fn process(&self) -> &QemuProcess {
        &self.process
    }

    /// QMP commands sent so far.
    pub fn qmp_commands(&self) -> u64 {
        self.qmp.commands()
    }

    /// The device QEMU has at function 0 of `slot`, if any.
    pub fn plugged(&self, slot: u8) -> Option<&PluggedDevice> {
        self.plugged.get(&(slot, 0))
    }

    /// The device QEMU has at `slot`.`func`, if any.
    pub fn plugged_function(&self, slot: u8, func: u8) -> Option<&PluggedDevice> {
        self.plugged.get(&(slot, func))
    }

    /// The plugged device with scenario id `id`.
    pub fn plugged_by_id(&self, id: &str) -> Option<&PluggedDevice> {
        self.plugged.values().find(|d| d.id == id)
    }

    /// The temporary directory holding every image of this machine (removed on drop).
    pub fn images_dir(&self) -> &std::path::Path {
        self.images_dir.path()
    }

    /// Bus scan at "boot": probes and programs every slot (functions 1..7 of a slot whose
    /// function 0 has PCIM_MFDEV, each function's memory BARs in its eighth of the slot's window);
    /// returns the NVMe functions found, with the scenario slot each is in.
    pub fn scan(&mut self) -> io::Result<Vec<(u8, PciFunction)>> {
        let mut found = Vec::new();
        let slots: Vec<u8> = match self.kind {
            MachineKind::Pc => (2..32).collect(),
            MachineKind::Q35 => self.ports.clone(),
        };
        for slot in slots {
            let bdf = self.bdf(slot);
            // Functions 1..7 only when function 0 says the device has several (PCIM_MFDEV in
            // its header type), as a BIOS and FreeBSD's pci_add_children look (a
            // single-function device may answer at every function number).
            let hdr = self.guest.qtest(|q| firmware::cfg_read8(q, bdf, firmware::cfg::HEADER_TYPE)).map_err(to_io)?;
            let last = if hdr != 0xff && hdr & firmware::cfg::HEADER_MFDEV != 0 { 7 } else { 0 };
            for func in 0..=last {
                let bdf = Bdf { func, ..bdf };
                let bar0 = firmware::bar0_for_function(slot, func);
                if let Some(f) = self.guest.qtest(|q| firmware::probe_and_program(q, bdf, bar0)).map_err(to_io)? {
                    found.push((slot, f));
                }
            }
        }
        Ok(found)
    }

    /// Probes one slot and programs its BARs (the rescan that follows a Notify 1).
    pub fn probe(&mut self, slot: u8) -> io::Result<Option<PciFunction>> {
        let bdf = self.bdf(slot);
        self.guest.qtest(|q| firmware::probe_and_program(q, bdf, firmware::bar0_for_slot(slot))).map_err(to_io)
    }

    /// The engine platform for a probed function, with fresh fault state (and the removal
    /// armed for its slot, if any).
    pub fn platform(&self, f: &PciFunction) -> LabPlatform {
        let slot = (0..32u8).find(|&s| self.bdf(s) == f.bdf).unwrap_or(f.bdf.dev);
        let faults = Rc::new(SlotFaults::new(slot, self.acpi.eject_write(slot), self.removal_reads));
        if let Some(n) = self.armed.borrow_mut().remove(&slot) {
            faults.arm(n);
        }
        self.faults.borrow_mut().insert(slot, faults.clone());
        LabPlatform::new(self.guest.clone(), f.bdf, f.bar0, faults)
    }

    /// What reads of a removed device return from now on (for platforms handed out later).
    pub fn set_removal_reads(&mut self, reads: RemovalReads) {
        self.removal_reads = reads;
    }

    /// The removal flavour in effect.
    pub fn removal_reads(&self) -> RemovalReads {
        self.removal_reads
    }

    /// Arms a surprise removal of `slot` right before device access `n` of the next platform
    /// handed out for it (see [`crate::access_faults`]).
    pub fn arm_removal(&mut self, slot: u8, n: u64) {
        self.armed.borrow_mut().insert(slot, n);
    }

    /// True if the current platform of `slot` performed its armed eject.
    pub fn removal_fired(&self, slot: u8) -> bool {
        self.faults.borrow().get(&slot).is_some_and(|f| f.fired())
    }

    /// Device accesses made through the current platform of `slot`.
    pub fn accesses(&self, slot: u8) -> u64 {
        self.faults.borrow().get(&slot).map_or(0, |f| f.accesses())
    }

    /// Books the ejects a platform performed from inside a device access (the device moves to
    /// the retiring list, as after [`Machine::eject`]).
    pub fn sync_injected_removals(&mut self) {
        let fired: Vec<u8> = self.faults.borrow().iter().filter(|(_, f)| f.fired()).map(|(s, _)| *s).collect();
        for slot in fired {
            let gone = self.unplug_slot(slot);
            if gone > 0 {
                self.acpi.forget_pending(slot);
            }
            self.faults.borrow_mut().remove(&slot);
        }
    }

    /// Hot-adds a controller: image files, block nodes, `device_add` (plus `nvme-ns` devices).
    /// QEMU then sets PCIU and raises the SCI; see [`Machine::poll_notifies`].
    pub fn hot_add(&mut self, spec: &ControllerSpec) -> io::Result<()> {
        self.hot_add_function(spec, 0, false)
    }

    /// Hot-adds a controller at function `func` of its slot (pc only above 0), function 0 with
    /// `multifunction=on` if `multifunction`. QEMU (hw/pci/pci.c do_pci_register_device)
    /// refuses a function above 0 once function 0 is there; one plugged before function 0
    /// reads all-ones until function 0 comes (pci_host.c pci_host_config_read_common hides a
    /// hot-plugged function whose function 0 is missing). Each device_add sets the slot's
    /// PCIU bit and raises the SCI (hw/acpi/pcihp.c acpi_pcihp_device_plug_cb).
    pub fn hot_add_function(&mut self, spec: &ControllerSpec, func: u8, multifunction: bool) -> io::Result<()> {
        if self.kind == MachineKind::Q35 && !self.ports.contains(&spec.slot) {
            return Err(io::Error::other(format!("q35: no root port in slot {} (not named at start)", spec.slot)));
        }
        if self.kind == MachineKind::Q35 && func != 0 {
            return Err(io::Error::other("q35: multi-function slots are not supported (a root port's bus has one device)"));
        }
        if self.plugged.contains_key(&(spec.slot, func)) {
            return Err(io::Error::other(format!("slot {} function {func} is already occupied", spec.slot)));
        }
        self.generation += 1;
        let dev = Self::make_device(self.images_dir.path(), spec, func, multifunction, self.generation, self.msix)?;
        for img in &dev.images {
            let (f, r) = node_names(&dev.qdev, img.nsid);
            self.qmp.blockdev_add_raw(&img.path.to_string_lossy(), &f, &r)?;
        }
        for (driver, mut props) in device_props(self.kind, &dev) {
            let id = props.iter().position(|(k, _)| *k == "id").map(|i| plain(&props.remove(i).1)).unwrap_or_default();
            let bus = props.iter().position(|(k, _)| *k == "bus").map(|i| plain(&props.remove(i).1)).unwrap_or_default();
            self.qmp.device_add(driver, &id, &bus, &props)?;
        }
        self.plugged.insert((spec.slot, func), dev);
        Ok(())
    }

    /// Every function of `slot` leaves the plugged list for the retiring one (an eject removes
    /// them all: hw/acpi/pcihp.c acpi_pcihp_eject_slot unplugs each device of the slot).
    /// Returns how many.
    fn unplug_slot(&mut self, slot: u8) -> usize {
        let keys: Vec<(u8, u8)> = self.plugged.keys().filter(|(s, _)| *s == slot).copied().collect();
        for k in &keys {
            if let Some(dev) = self.plugged.remove(k) {
                self.retiring.push(dev);
            }
        }
        keys.len()
    }

    /// Asks QEMU to remove the controller (QMP `device_del`): PCID is set and the SCI raised;
    /// the device stays fully alive until ejected. In a multi-function slot the request names
    /// its lowest function; PCID is per slot, and the eject removes every function.
    pub fn request_unplug(&mut self, slot: u8) -> io::Result<()> {
        let dev = self.plugged.iter().find(|((s, _), _)| *s == slot).map(|(_, d)| d).ok_or_else(|| io::Error::other(format!("slot {slot} is empty")))?;
        let qdev = dev.qdev.clone();
        self.qmp.device_del(&qdev)
    }

    /// Runs the `_E01` logic if the SCI is up: the notifications the AML would send.
    pub fn poll_notifies(&mut self) -> io::Result<Vec<Notify>> {
        let guest = self.guest.clone();
        let acpi = &mut self.acpi;
        guest.qtest(|q| acpi.poll(q)).map_err(to_io)
    }

    /// `_EJ0` of `slot` (also the surprise-removal trigger when no `device_del` came first).
    /// The device moves to the retiring list; its QEMU objects are reaped by [`Machine::reap`].
    pub fn eject(&mut self, slot: u8) -> io::Result<()> {
        let guest = self.guest.clone();
        let acpi = &mut self.acpi;
        guest.qtest(|q| acpi.eject(q, slot)).map_err(to_io)?;
        if let Some(f) = self.faults.borrow_mut().remove(&slot) {
            f.mark_removed();
        }
        self.unplug_slot(slot);
        Ok(())
    }

    /// True while config space of `slot` still answers.
    pub fn slot_present(&mut self, slot: u8) -> io::Result<bool> {
        let bdf = self.bdf(slot);
        let v = self
            .guest
            .qtest(|q| firmware::cfg_read16(q, bdf, firmware::cfg::VENDOR_ID))
            .map_err(to_io)?;
        Ok(v != 0xffff)
    }

    /// Finishes the QEMU side of removed devices: waits up to `wait` for their
    /// `DEVICE_DELETED`, then deletes their block nodes. Returns how many are still retiring.
    /// Only the newest retiring device is waited for; older ones (QEMU may never delete a
    /// device ejected with backend I/O in flight) are checked against the events received so
    /// far, so a long run with many leaked devices does not wait for each of them every time.
    pub fn reap(&mut self, wait: Duration) -> io::Result<usize> {
        let deadline = std::time::Instant::now() + wait;
        let mut still = Vec::new();
        self.qmp.poll_events()?;
        let devs = std::mem::take(&mut self.retiring);
        let newest = devs.len().saturating_sub(1);
        for (i, dev) in devs.into_iter().enumerate() {
            let left = if i == newest {
                deadline.saturating_duration_since(std::time::Instant::now())
            } else {
                Duration::ZERO
            };
            if self.qmp.wait_deleted(&dev.qdev, left)? {
                for n in &dev.nodes {
                    // A node can stay busy if QEMU leaked the device; keep going, count it below.
                    let _ = self.qmp.blockdev_del(n);
                }
            } else {
                still.push(dev);
            }
        }
        self.retiring = still;
        Ok(self.retiring.len())
    }

    /// Where the hotplug block is and which buses it covers (on q35, each root port's slot with
    /// the BSEL QEMU gave its bus): what an ACPI namespace built for this machine declares.
    pub fn hotplug_layout(&self) -> &HotplugLayout {
        self.acpi.layout()
    }

    /// ACPI GPEs handled so far.
    pub fn gpes(&self) -> u64 {
        self.acpi.gpes
    }

    /// The removable-slots mask (PCIRMV) of the bus holding `slot`, as the AML reads it.
    pub fn removable_slots(&mut self, slot: u8) -> io::Result<u32> {
        let guest = self.guest.clone();
        let acpi = &self.acpi;
        guest.qtest(|q| acpi.removable_slots(q, slot)).map_err(to_io)
    }

    /// Slots holding a plugged device (from QEMU's point of view).
    pub fn plugged_slots(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.plugged.keys().map(|(s, _)| *s).collect();
        v.dedup();
        v
    }

    /// Devices ejected but not (yet) deleted by QEMU.
    pub fn retiring(&self) -> &[PluggedDevice] {
        &self.retiring
    }
}

/// A property value as the command line spells it.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn to_io(e: crate::qtest::QtestError) -> io::Error {
    io::Error::other(e.to_string())
}

/// One-time firmware work on a fresh machine.
fn setup_firmware(kind: MachineKind, q: &mut Qtest, ports: &[u8], acpi: &AcpiHotplug) -> crate::qtest::QtestResult<()> {
    // Interrupt lines come to this connection (SCI = GSI 9). QEMU accepts this once.
    q.irq_intercept_in("ioapic")?;
    match kind {
        MachineKind::Pc => firmware::init_pc(q)?,
        MachineKind::Q35 => firmware::init_q35(q, ports)?,
    }
    acpi.enable_gpe(q)
}

/// File and raw node names for a namespace of `qdev`.
fn node_names(qdev: &str, nsid: u32) -> (String, String) {
    (format!("{qdev}-f{nsid}"), format!("{qdev}-r{nsid}"))
}

/// The qdev devices of a controller: one `nvme` (owning the drive itself when it has exactly
/// namespace 1), or an `nvme` plus one `nvme-ns` per namespace.
///
/// Values are typed JSON: QMP's `device_add` checks types strictly (a size given as a string is
/// refused), while the command line takes their plain text form.
fn device_props(kind: MachineKind, dev: &PluggedDevice) -> Vec<(&'static str, Vec<(&'static str, Value)>)> {
    device_props_in(kind, dev, None)
}

/// [`device_props`], with `subsys`: an `nvme-subsys` first, the controller in it, its private
/// twin (same serial: QEMU refuses controllers of one subsystem with different ones) in
/// `subsys.private_slot`, then one shared `nvme-ns` per namespace, those in `subsys.detached`
/// with `detached=on`. A shared namespace is attached to every controller of the subsystem
/// (hw/nvme/ns.c `nvme_ns_realize`).
fn device_props_in(kind: MachineKind, dev: &PluggedDevice, subsys: Option<&SubsystemSpec>) -> Vec<(&'static str, Vec<(&'static str, Value)>)> {
    // NVMe serial numbers are at most 20 characters; the qdev id is unique per plug.
    let serial: String = format!("NVMEHP{}", dev.qdev).chars().take(20).collect();
    let mut out = Vec::new();
    if let (Some(sub), Some((pslot, pqdev))) = (subsys, dev.private.as_ref()) {
        let sid = format!("{}-subsys", dev.qdev);
        out.push(("nvme-subsys", vec![("id", Value::from(sid.clone())), ("nqn", Value::from(dev.qdev.clone()))]));
        for (id, slot, func, multifunction) in [(dev.qdev.clone(), dev.slot, dev.func, dev.multifunction), (pqdev.clone(), *pslot, 0, false)] {
            let mut ctrl = vec![
                ("id", Value::from(id)),
                ("bus", Value::from("pci.0")),
                ("addr", Value::from(format!("0x{slot:x}.0x{func:x}"))),
                ("serial", Value::from(serial.clone())),
                ("subsys", Value::from(sid.clone())),
            ];
            if multifunction {
                ctrl.push(("multifunction", Value::from(true)));
            }
            push_msix(&mut ctrl, dev.msix);
            out.push(("nvme", ctrl));
        }
        for img in &dev.images {
            let mut ns = ns_props(dev, img);
            ns.push(("shared", Value::from("on")));
            if sub.detached.contains(&img.nsid) {
                ns.push(("detached", Value::from("on")));
            }
            out.push(("nvme-ns", ns));
        }
        return out;
    }
    let mut ctrl = vec![("id", Value::from(dev.qdev.clone()))];
    match kind {
        MachineKind::Pc => {
            ctrl.push(("bus", Value::from("pci.0")));
            ctrl.push(("addr", Value::from(format!("0x{:x}.0x{:x}", dev.slot, dev.func))));
            if dev.multifunction {
                ctrl.push(("multifunction", Value::from(true)));
            }
        }
        MachineKind::Q35 => ctrl.push(("bus", Value::from(format!("rp{}", dev.slot)))),
    }
    ctrl.push(("serial", Value::from(serial)));
    push_msix(&mut ctrl, dev.msix);
    let single = dev.images.len() == 1 && dev.images[0].nsid == 1;
    if single {
        let img = &dev.images[0];
        ctrl.push(("drive", Value::from(node_names(&dev.qdev, 1).1)));
        ctrl.push(("logical_block_size", Value::from(img.lba_bytes)));
        ctrl.push(("physical_block_size", Value::from(img.lba_bytes)));
        out.push(("nvme", ctrl));
    } else {
        out.push(("nvme", ctrl));
        for img in &dev.images {
            out.push(("nvme-ns", ns_props(dev, img)));
        }
    }
    out
}

/// `msix-exclusive-bar=on` for a controller whose MSI-X table is in a BAR of its own (QEMU's
/// default, off, is left unsaid).
fn push_msix(ctrl: &mut Vec<(&'static str, Value)>, msix: MsixPlacement) {
    if msix == MsixPlacement::ExclusiveBar {
        ctrl.push(("msix-exclusive-bar", Value::from(true)));
    }
}

/// The NGUID the lab gives namespace `nsid` of controller `qdev` (an `nvme-ns` `nguid`, 32
/// hex digits, reported by Identify Namespace in this byte order): FNV-1a of the controller's
/// id, then the NSID, so every namespace of a machine has its own, the same at every run, and
/// a test can tell which namespace a disk is from what the driver reports (GEOM::lunid).
/// (A controller's single built-in namespace has none: QEMU's `nvme` device has no such
/// property.)
pub fn nguid(qdev: &str, nsid: u32) -> String {
    let hash = qdev.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{hash:016x}{:016x}", u64::from(nsid))
}

/// The properties of the `nvme-ns` device of namespace `img` on the controller `dev`.
fn ns_props(dev: &PluggedDevice, img: &Image) -> Vec<(&'static str, Value)> {
    vec![
        ("id", Value::from(format!("{}-ns{}", dev.qdev, img.nsid))),
        ("nguid", Value::from(nguid(&dev.qdev, img.nsid))),
        ("bus", Value::from(dev.qdev.clone())),
        ("drive", Value::from(node_names(&dev.qdev, img.nsid).1)),
        ("nsid", Value::from(img.nsid)),
        ("logical_block_size", Value::from(img.lba_bytes)),
        ("physical_block_size", Value::from(img.lba_bytes)),
    ]
}
