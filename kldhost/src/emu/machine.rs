//! The machine under the emulated kernel for `kldhost run --qemu`: QEMU's pc machine with one
//! NVMe controller, driven through the lab crate (nvmehp-lab: spawning and reaping QEMU, the
//! qtest protocol, the firmware's BAR placement and command register).
//!
//! - **Guest RAM is shared**: the lab's [`SharedRam`] (a memfd QEMU runs the machine on and this
//!   process maps too), so memory the module gets from `contigmalloc(9)` is memory QEMU's NVMe
//!   model can DMA to, at physical address = offset in the file (`pmap_kextract`). Below
//!   [`DMA_POOL_START`] nothing is handed out.
//! - **Config space** goes through qtest (configuration mechanism #1, the lab's `firmware`).
//! - **BAR0** is not mapped: the module's register access is `bus_read_4`/`bus_write_4`, which
//!   amd64's <machine/bus.h> (x86/bus.h `bus_space_read_4`) inlines into the glue's
//!   `nvmehp_bus_read_4` as a plain load from `r_bushandle + offset`; no out-of-line KPI call
//!   is made. The handle therefore points at an inaccessible window of this process, and
//!   [`super::mmio`] turns each faulting load or store into a qtest `readl`/`writel` at the
//!   BAR's physical address.
//!
//! The firmware role (what SeaBIOS and pci(4) do before a driver runs): BAR0 programmed, memory
//! decode on. Bus mastering is left **off**: the driver's `pci_enable_busmaster` must turn it
//! on, or QEMU's NVMe model drops every DMA.

use nvmehp_lab::firmware::{self, Bdf, PciFunction};
use nvmehp_lab::qemu::{MachineKind, QemuProcess};
use nvmehp_lab::qtest::Qtest;
use nvmehp_lab::shared_ram::SharedRam;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

/// Guest RAM size (the lab's pc machine: the 32-bit PCI hole starts right after it).
pub const RAM_MIB: u32 = 256;
/// First guest-physical byte contigmalloc hands out.
pub const DMA_POOL_START: u64 = 16 << 20;
/// The slot the controller sits in (pc: 00:04.0).
pub const NVME_SLOT: u8 = 4;
/// Its qdev id (QMP `device_del`).
pub const NVME_ID: &str = "nvme0";

/// One running machine. Its qtest connection is used by config-space accessors and the MMIO
/// trap; [`MACHINE`] serialises them.
pub struct Machine {
    pub qtest: Qtest,
    /// What the firmware found in each populated slot.
    pub functions: Vec<PciFunction>,
    /// Guest RAM, mapped in this process too.
    pub ram: SharedRam,
    /// The controller's backing image (raw), for checking data a write put there.
    pub image: PathBuf,
    /// Bump pointer of the contigmalloc pool (guest-physical). Freed memory is poisoned and
    /// kept, as malloc'd memory is (super::kern), so it is never handed out twice.
    pub next_free: u64,
    /// The QMP connection (connected lazily by [`Machine::qmp`]: `device_del` for hotplug).
    qmp_stream: Option<std::os::unix::net::UnixStream>,
    qmp: Option<nvmehp_lab::qmp::QmpClient>,
    _dir: tempfile::TempDir,
    qemu: QemuProcess,
}

// SAFETY: SharedRam is a mapping owned by the Machine for its whole life (not Send only because
// it holds a raw pointer); every access from here goes through the MACHINE mutex or through
// module code the emulation serialises.
unsafe impl Send for Machine {}

pub static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);

/// Image size of the controller's namespace.
pub const IMAGE_BYTES: u64 = 16 << 20;

impl Machine {
    /// Starts QEMU (pc, 256 MiB of shared RAM, an NVMe controller in slot [`NVME_SLOT`] with a
    /// 16 MiB zeroed namespace), does the firmware's part and returns the machine.
    pub fn start() -> io::Result<Machine> {
        let dir = tempfile::Builder::new().prefix("kldhost-").tempdir()?;
        let image = dir.path().join("nvme0n1.img");
        std::fs::File::create(&image)?.set_len(IMAGE_BYTES)?;
        let ram = SharedRam::create(u64::from(RAM_MIB) << 20)?;
        let args = vec![
            "-blockdev".to_string(),
            format!("driver=file,filename={},node-name=img0", image.display()),
            "-blockdev".to_string(),
            "driver=raw,file=img0,node-name=nvm0".to_string(),
            "-device".to_string(),
            format!("nvme,id={NVME_ID},serial=KLDHOST0,drive=nvm0,bus=pci.0,addr=0x{NVME_SLOT:x}"),
        ];
        let (qemu, mut qtest, qmp) = QemuProcess::spawn(MachineKind::Pc, RAM_MIB, Some(&ram), &args)?;
        let to_io = |e: nvmehp_lab::qtest::QtestError| io::Error::other(e.to_string());
        firmware::init_pc(&mut qtest).map_err(to_io)?;
        let mut functions = Vec::new();
        let bdf = Bdf::slot(NVME_SLOT);
        if let Some(f) = firmware::probe_and_program(&mut qtest, bdf, firmware::bar0_for_slot(NVME_SLOT)).map_err(to_io)? {
            // The firmware leaves bus mastering to the driver (pci_enable_busmaster).
            let cmd = firmware::cfg_read16(&mut qtest, bdf, firmware::cfg::COMMAND).map_err(to_io)?;
            firmware::cfg_write16(&mut qtest, bdf, firmware::cfg::COMMAND, cmd & !firmware::cfg::CMD_BUS_MASTER).map_err(to_io)?;
            functions.push(f);
        }
        Ok(Machine {
            qtest,
            functions,
            ram,
            image,
            next_free: DMA_POOL_START,
            qmp_stream: Some(qmp),
            qmp: None,
            _dir: dir,
            qemu,
        })
    }

    /// The guest-physical address of `va` if it lies in guest RAM.
    pub fn phys_of(&self, va: u64) -> Option<u64> {
        self.ram.gpa_of(va as *const u8, 1)
    }

    /// Allocates `size` bytes of guest RAM aligned to `align` within `[low, high]`
    /// (contigmalloc's constraints; `boundary` 0 only). Returns the host address.
    pub fn contig_alloc(&mut self, size: u64, low: u64, high: u64, align: u64, boundary: u64) -> Option<*mut u8> {
        let align = align.max(4096);
        if !align.is_power_of_two() || boundary != 0 || size == 0 {
            return None;
        }
        let start = self.next_free.max(low).div_ceil(align) * align;
        let end = start.checked_add(size)?;
        if end - 1 > high {
            return None;
        }
        let p = self.ram.host_ptr(start, size).ok()?.as_ptr();
        self.next_free = end.div_ceil(4096) * 4096;
        Some(p)
    }

    /// The QMP client (handshake on first use).
    pub fn qmp(&mut self) -> io::Result<&mut nvmehp_lab::qmp::QmpClient> {
        if self.qmp.is_none() {
            let s = self.qmp_stream.take().ok_or_else(|| io::Error::other("QMP: no connection"))?;
            self.qmp = Some(nvmehp_lab::qmp::QmpClient::new(s)?);
        }
        Ok(self.qmp.as_mut().expect("just set"))
    }

    /// QEMU's stderr so far (for error messages).
    pub fn qemu_stderr(&self) -> String {
        self.qemu.stderr_text()
    }
}

/// Runs `f` on the machine. Panics (an emulation bug, not the module's) when there is none.
pub fn with_machine<R>(f: impl FnOnce(&mut Machine) -> R) -> R {
    let mut g = MACHINE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.as_mut().expect("kldhost: no machine (run without --qemu)"))
}

/// Whether a machine is running.
pub fn has_machine() -> bool {
    MACHINE.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Starts the machine for this process's emulated kernel.
pub fn start() -> io::Result<()> {
    let m = Machine::start()?;
    *MACHINE.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
    Ok(())
}

/// Stops QEMU and unmaps guest RAM.
pub fn stop() {
    let m = MACHINE.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(m);
}

/// A config-space read of `bdf` (width 1, 2 or 4) through qtest; all-ones if QEMU is gone.
pub fn cfg_read(bdf: Bdf, reg: u16, width: i32) -> u32 {
    with_machine(|m| {
        let q = &mut m.qtest;
        let r = match width {
            1 => firmware::cfg_read8(q, bdf, reg).map(u32::from),
            2 => firmware::cfg_read16(q, bdf, reg).map(u32::from),
            _ => firmware::cfg_read32(q, bdf, reg),
        };
        r.unwrap_or(u32::MAX)
    })
}

/// A config-space write of `bdf` through qtest.
pub fn cfg_write(bdf: Bdf, reg: u16, val: u32, width: i32) {
    with_machine(|m| {
        let q = &mut m.qtest;
        let _ = match width {
            1 => firmware::cfg_write8(q, bdf, reg, val as u8),
            2 => firmware::cfg_write16(q, bdf, reg, val as u16),
            _ => firmware::cfg_write32(q, bdf, reg, val),
        };
    })
}
