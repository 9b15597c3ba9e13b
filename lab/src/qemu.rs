//! Spawning Debian's `qemu-system-x86_64` with the command line the lab relies on, and reaping it.
//!
//! Facts this file depends on (see the team's qemu-lab notes):
//! - Debian ships no qtest *accelerator*, but the qtest protocol server works with TCG as long as
//!   the vCPU does nothing: the harness writes a 64 KiB BIOS whose reset vector is
//!   `cli; hlt; jmp hlt`, so the CPU halts forever with interrupts off and never touches memory
//!   the harness uses for DMA.
//! - QEMU *connects* to the qtest socket, so the harness listens first; QEMU *listens* on the QMP
//!   socket (`wait=off`), so the harness connects after the qtest handshake.
//! - `-qtest-log` must be given (otherwise QEMU logs every command to stderr).
//!
//! - With shared guest RAM ([`crate::shared_ram`]) the RAM file's descriptor is created
//!   close-on-exec and the flag is cleared only in the forked child, so concurrently spawned
//!   QEMUs (tests run in parallel threads) never inherit each other's RAM.
//!
//! Every spawned QEMU is owned by a [`QemuProcess`] whose `Drop` kills and waits for it, so a
//! failing test or a panic never leaves a QEMU behind. If the harness itself is killed (no
//! `Drop` runs), the kernel sends QEMU SIGKILL (`PR_SET_PDEATHSIG`), so not even a `kill -9` of
//! a test binary leaves one running.

use std::fs;
use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::qtest::Qtest;
use crate::shared_ram::{SharedRam, BACKEND_ID};

/// The QEMU binary the lab runs (Debian's, from bookworm-backports on bookworm).
pub const QEMU_BIN: &str = "qemu-system-x86_64";

/// Which PC machine model to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineKind {
    /// i440fx + PIIX3/PIIX4: what EC2 Nitro (C5+) presents, with ACPI hotplug on the root bus.
    Pc,
    /// q35 + ICH9: hotplug only behind a `pcie-root-port`.
    Q35,
}

impl MachineKind {
    /// The `-M` value.
    pub fn qemu_name(self) -> &'static str {
        match self {
            MachineKind::Pc => "pc",
            MachineKind::Q35 => "q35",
        }
    }
}

/// True when `qemu-system-x86_64` can be found on `PATH`.
pub fn qemu_available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(QEMU_BIN).is_file()))
        .unwrap_or(false)
}

/// Writes the 64 KiB halt BIOS: the reset vector (offset 0xfff0 of the last 64 KiB below 4 GiB)
/// holds `cli` (fa), `hlt` (f4), `jmp short -3` (eb fd, back to the `hlt`).
pub fn write_halt_bios(path: &Path) -> io::Result<()> {
    let mut img = vec![0u8; 64 * 1024];
    img[0xfff0..0xfff4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    fs::write(path, img)
}

/// A running QEMU. Dropping it kills and reaps the process.
pub struct QemuProcess {
    child: Option<Child>,
    /// Directory holding the sockets and the BIOS (removed on drop).
    _dir: tempfile::TempDir,
    qmp_path: PathBuf,
    stderr_path: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU with `extra` arguments appended (cold-plugged devices) and returns it with the
    /// qtest connection and the QMP stream. With `ram`, that file is the machine's RAM (its size
    /// must be `mem_mib`); without, QEMU allocates private RAM.
    pub fn spawn(
        kind: MachineKind,
        mem_mib: u32,
        ram: Option<&SharedRam>,
        extra: &[String],
    ) -> io::Result<(QemuProcess, Qtest, UnixStream)> {
        if let Some(r) = ram {
            if r.size() != (mem_mib as u64) << 20 {
                return Err(io::Error::other(format!("shared RAM is {} bytes, the machine has {mem_mib} MiB", r.size())));
            }
        }
        let dir = tempfile::Builder::new().prefix("nvmehp-qemu-").tempdir()?;
        let qtest_path = dir.path().join("qtest.sock");
        let qmp_path = dir.path().join("qmp.sock");
        let bios = dir.path().join("halt.bin");
        let stderr_path = dir.path().join("stderr.log");
        write_halt_bios(&bios)?;
        let listener = UnixListener::bind(&qtest_path)?;
        listener.set_nonblocking(true)?;

        let mut cmd = Command::new(QEMU_BIN);
        let machine = match ram {
            Some(_) => format!("{},memory-backend={BACKEND_ID}", kind.qemu_name()),
            None => kind.qemu_name().to_string(),
        };
        cmd.arg("-M").arg(machine);
        if let Some(r) = ram {
            cmd.arg("-object").arg(r.qemu_object());
        }
        cmd.arg("-qtest")
            .arg(format!("unix:{}", qtest_path.display()))
            .arg("-qtest-log")
            .arg("/dev/null")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-nodefaults", "-display", "none", "-accel", "tcg"])
            .arg("-m")
            .arg(format!("{mem_mib}M"))
            .arg("-bios")
            .arg(&bios)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&stderr_path)?));
        let ram_fd = ram.map(|r| r.fd());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
        // fcntl(2), which are async-signal-safe; it touches no memory shared with the parent
        // (`ram_fd` is a copied integer).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // QEMU opens the RAM file as /proc/self/fd/N: N must survive the exec.
                if let Some(fd) = ram_fd {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let mut proc = QemuProcess { child: Some(child), _dir: dir, qmp_path, stderr_path };

        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(st) = proc.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                        return Err(io::Error::other(format!(
                            "QEMU exited ({st}) before connecting to qtest: {}",
                            proc.stderr_text()
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(io::Error::other("QEMU did not connect to the qtest socket in 20 s"));
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        let qtest = Qtest::new(stream)?;
        let qmp = proc.connect_qmp()?;
        Ok((proc, qtest, qmp))
    }

    fn connect_qmp(&mut self) -> io::Result<UnixStream> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&self.qmp_path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    return Ok(s);
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// What QEMU wrote to stderr so far (for error messages).
    pub fn stderr_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s.trim().to_string()
    }

    /// The process id (for reports and for humans).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Resident set size in KiB, from /proc (0 if unknown).
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills and reaps QEMU now. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
