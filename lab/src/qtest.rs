//! A small client for QEMU's qtest text protocol.
//!
//! qtest is a line protocol on a socket: the harness sends `readl 0x...`, QEMU answers `OK 0x...`.
//! Two things make a naive client wrong:
//! - QEMU also writes unsolicited `IRQ raise N` / `IRQ lower N` lines (after `irq_intercept_in`),
//!   and they arrive *before the next reply*, not when the interrupt happens. Every reply read
//!   therefore first consumes and records any IRQ lines; an IRQ caused by a QMP command is only
//!   visible after the following qtest command (see [`Qtest::sync`]).
//! - A reply can be `FAIL`/`ERR`: that is a harness bug (bad address, bad syntax), reported as an
//!   error rather than a wrong value.
//!
//! QEMU connects to the harness (the harness listens), see [`crate::qemu`].

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Highest GSI the client tracks (the PIIX/ICH I/O APIC has 24 inputs).
pub const MAX_IRQ: usize = 24;

/// An interrupt edge reported by QEMU, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqEvent {
    /// GSI number (9 = SCI on pc, 10/11 = PCI INTx after PIRQ routing).
    pub irq: u8,
    /// True for `raise`, false for `lower`.
    pub raised: bool,
}

/// What went wrong talking qtest.
#[derive(Debug)]
pub enum QtestError {
    /// The socket failed or QEMU went away.
    Io(io::Error),
    /// QEMU answered `FAIL`/`ERR`, or something unparsable.
    Protocol(String),
}

impl fmt::Display for QtestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QtestError::Io(e) => write!(f, "qtest I/O error: {e}"),
            QtestError::Protocol(s) => write!(f, "qtest protocol error: {s}"),
        }
    }
}

impl std::error::Error for QtestError {}

impl From<io::Error> for QtestError {
    fn from(e: io::Error) -> Self {
        QtestError::Io(e)
    }
}

/// Result of a qtest command.
pub type QtestResult<T> = Result<T, QtestError>;

/// A connected qtest session. Single-threaded by design (the lab is).
pub struct Qtest {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
    levels: [bool; MAX_IRQ],
    /// `IRQ raise` reports per line since the connection opened (edges, kept apart from
    /// `events`, which the ACPI path takes).
    raises: [u64; MAX_IRQ],
    events: Vec<IrqEvent>,
    commands: u64,
}

impl Qtest {
    /// Wraps a stream QEMU connected on. A read timeout keeps a wedged QEMU from hanging the lab.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        Ok(Qtest {
            reader: BufReader::new(stream),
            writer,
            line: String::new(),
            levels: [false; MAX_IRQ],
            raises: [0; MAX_IRQ],
            events: Vec::new(),
            commands: 0,
        })
    }

    /// Number of commands sent so far (for the bench figures).
    pub fn commands(&self) -> u64 {
        self.commands
    }

    /// Sends one command and returns the text after `OK` (trimmed), recording IRQ lines on the way.
    pub fn command(&mut self, cmd: &str) -> QtestResult<String> {
        self.commands += 1;
        self.writer.write_all(cmd.as_bytes())?;
        self.writer.write_all(b"\n")?;
        loop {
            self.line.clear();
            let n = self.reader.read_line(&mut self.line)?;
            if n == 0 {
                return Err(QtestError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "QEMU closed the qtest socket",
                )));
            }
            let l = self.line.trim_end().to_string();
            if let Some(rest) = l.strip_prefix("IRQ ") {
                self.record_irq(rest)?;
                continue;
            }
            let l = l.as_str();
            if l == "OK" {
                return Ok(String::new());
            }
            if let Some(rest) = l.strip_prefix("OK ") {
                return Ok(rest.to_string());
            }
            return Err(QtestError::Protocol(format!("`{cmd:.60}` -> `{l}`")));
        }
    }

    fn record_irq(&mut self, rest: &str) -> QtestResult<()> {
        let mut it = rest.split_whitespace();
        let raised = match it.next() {
            Some("raise") => true,
            Some("lower") => false,
            _ => return Err(QtestError::Protocol(format!("bad IRQ line `{rest}`"))),
        };
        let irq: u8 = it
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| QtestError::Protocol(format!("bad IRQ line `{rest}`")))?;
        if (irq as usize) < MAX_IRQ {
            self.levels[irq as usize] = raised;
            self.raises[irq as usize] += u64::from(raised);
        }
        self.events.push(IrqEvent { irq, raised });
        Ok(())
    }

    fn value(&mut self, cmd: &str) -> QtestResult<u64> {
        let r = self.command(cmd)?;
        let hex = r.trim().trim_start_matches("0x");
        u64::from_str_radix(hex, 16).map_err(|_| QtestError::Protocol(format!("`{cmd}` -> bad value `{r}`")))
    }

    /// Round trip with no effect: delivers any IRQ lines QEMU queued since the last reply.
    pub fn sync(&mut self) -> QtestResult<()> {
        // `inb 0x80` (POST code port) reads nothing interesting and has no side effect.
        self.value("inb 0x80").map(drop)
    }

    /// Current level of `irq` as last reported.
    pub fn irq_level(&self, irq: u8) -> bool {
        self.levels.get(irq as usize).copied().unwrap_or(false)
    }

    /// How many times `irq` was reported raised so far (rising edges); unlike
    /// [`Qtest::take_irq_events`] reading it takes nothing from another reader.
    pub fn irq_raises(&self, irq: u8) -> u64 {
        self.raises.get(irq as usize).copied().unwrap_or(0)
    }

    /// Takes the IRQ edges seen since the last call.
    pub fn take_irq_events(&mut self) -> Vec<IrqEvent> {
        std::mem::take(&mut self.events)
    }

    /// Routes the named device's GPIO inputs to this connection (`ioapic` sees every GSI).
    /// QEMU accepts this once per machine.
    pub fn irq_intercept_in(&mut self, qom_path: &str) -> QtestResult<()> {
        self.command(&format!("irq_intercept_in {qom_path}")).map(drop)
    }

    /// 8-bit port read.
    pub fn inb(&mut self, port: u16) -> QtestResult<u8> {
        self.value(&format!("inb 0x{port:x}")).map(|v| v as u8)
    }
    /// 16-bit port read.
    pub fn inw(&mut self, port: u16) -> QtestResult<u16> {
        self.value(&format!("inw 0x{port:x}")).map(|v| v as u16)
    }
    /// 32-bit port read.
    pub fn inl(&mut self, port: u16) -> QtestResult<u32> {
        self.value(&format!("inl 0x{port:x}")).map(|v| v as u32)
    }
    /// 8-bit port write.
    pub fn outb(&mut self, port: u16, v: u8) -> QtestResult<()> {
        self.command(&format!("outb 0x{port:x} 0x{v:x}")).map(drop)
    }
    /// 16-bit port write.
    pub fn outw(&mut self, port: u16, v: u16) -> QtestResult<()> {
        self.command(&format!("outw 0x{port:x} 0x{v:x}")).map(drop)
    }
    /// 32-bit port write.
    pub fn outl(&mut self, port: u16, v: u32) -> QtestResult<()> {
        self.command(&format!("outl 0x{port:x} 0x{v:x}")).map(drop)
    }
    /// 32-bit memory read (MMIO or RAM).
    pub fn readl(&mut self, addr: u64) -> QtestResult<u32> {
        self.value(&format!("readl 0x{addr:x}")).map(|v| v as u32)
    }
    /// 64-bit memory read.
    pub fn readq(&mut self, addr: u64) -> QtestResult<u64> {
        self.value(&format!("readq 0x{addr:x}"))
    }
    /// 32-bit memory write.
    pub fn writel(&mut self, addr: u64, v: u32) -> QtestResult<()> {
        self.command(&format!("writel 0x{addr:x} 0x{v:x}")).map(drop)
    }
    /// 64-bit memory write.
    pub fn writeq(&mut self, addr: u64, v: u64) -> QtestResult<()> {
        self.command(&format!("writeq 0x{addr:x} 0x{v:x}")).map(drop)
    }

    /// Bulk read of guest memory (`read ADDR SIZE` answers hex).
    pub fn read(&mut self, addr: u64, buf: &mut [u8]) -> QtestResult<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let r = self.command(&format!("read 0x{addr:x} 0x{:x}", buf.len()))?;
        let hex = r.trim().strip_prefix("0x").unwrap_or(r.trim()).as_bytes();
        if hex.len() != buf.len() * 2 {
            return Err(QtestError::Protocol(format!(
                "read of {} bytes returned {} hex digits",
                buf.len(),
                hex.len()
            )));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nibble(hex[2 * i])? << 4) | nibble(hex[2 * i + 1])?;
        }
        Ok(())
    }

    /// Bulk write of guest memory (`write ADDR SIZE 0xHEX`).
    pub fn write(&mut self, addr: u64, data: &[u8]) -> QtestResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut cmd = format!("write 0x{addr:x} 0x{:x} 0x", data.len()).into_bytes();
        cmd.reserve(data.len() * 2);
        for b in data {
            cmd.push(HEX[(b >> 4) as usize]);
            cmd.push(HEX[(b & 15) as usize]);
        }
        // The command is pure ASCII by construction.
        let cmd = String::from_utf8(cmd).map_err(|_| QtestError::Protocol("non-ascii".into()))?;
        self.command(&cmd).map(drop)
    }

    /// Fills guest memory with one byte value.
    pub fn memset(&mut self, addr: u64, len: usize, v: u8) -> QtestResult<()> {
        if len == 0 {
            return Ok(());
        }
        self.command(&format!("memset 0x{addr:x} 0x{len:x} 0x{v:x}")).map(drop)
    }
}

fn nibble(c: u8) -> QtestResult<u8> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(QtestError::Protocol(format!("bad hex digit {c:#x}"))),
    }
}
