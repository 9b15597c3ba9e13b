//! The QMP side of the lab: block nodes and PCI devices, through the `qapi` crate's sync client.
//!
//! Hot-add is always two block nodes (a `file` node on the image, a `raw` node on top) plus one
//! `nvme` device, and for multi-namespace controllers `nvme-ns` devices on the controller's bus.
//! Node names are fresh for every attach (QEMU refuses a name still in use, and a leaked node
//! from an earlier cycle must not be picked up by a later one).

use std::io;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qapi::qmp;
use qapi::{ExecuteError, Qmp};

/// The sync QMP connection type.
pub type QmpStream = Qmp<qapi::Stream<io::BufReader<UnixStream>, UnixStream>>;

/// A QMP connection after the capabilities handshake, with the `DEVICE_DELETED` events seen so far.
pub struct QmpClient {
    qmp: QmpStream,
    deleted: Vec<String>,
    commands: u64,
}

/// Turns a qapi error into an io::Error with QEMU's message kept.
fn err(e: ExecuteError) -> io::Error {
    match e {
        ExecuteError::Io(e) => e,
        other => io::Error::other(format!("QMP: {other}")),
    }
}

impl QmpClient {
    /// Performs the handshake on a connected stream.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        let reader = io::BufReader::new(stream.try_clone()?);
        let mut qmp = Qmp::new(qapi::Stream::new(reader, stream));
        qmp.handshake().map_err(err)?;
        Ok(QmpClient { qmp, deleted: Vec::new(), commands: 0 })
    }

    /// Number of QMP commands sent so far.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    fn exec<C: qapi::Command>(&mut self, c: &C) -> io::Result<C::Ok> {
        self.commands += 1;
        let r = self.qmp.execute(c).map_err(err);
        self.collect_events();
        r
    }

    fn collect_events(&mut self) {
        for ev in self.qmp.events() {
            if let qmp::Event::DEVICE_DELETED { data, .. } = ev {
                if let Some(id) = data.device {
                    self.deleted.push(id);
                }
            }
        }
    }

    /// Adds `file` node `file_node` on `path` and `raw` node `raw_node` on top of it.
    pub fn blockdev_add_raw(&mut self, path: &str, file_node: &str, raw_node: &str) -> io::Result<()> {
        let base = |name: &str| qmp::BlockdevOptionsBase {
            auto_read_only: None,
            cache: None,
            detect_zeroes: None,
            discard: None,
            force_share: None,
            node_name: Some(name.to_string()),
            read_only: None,
        };
        let file = qmp::BlockdevOptions::file {
            base: base(file_node),
            file: qmp::BlockdevOptionsFile {
                aio: None,
                aio_max_batch: None,
                drop_cache: None,
                locking: None,
                pr_manager: None,
                x_check_cache_dropped: None,
                filename: path.to_string(),
            },
        };
        self.exec(&qmp::blockdev_add(file))?;
        let raw = qmp::BlockdevOptions::raw {
            base: base(raw_node),
            raw: qmp::BlockdevOptionsRaw {
                base: qmp::BlockdevOptionsGenericFormat {
                    file: qmp::BlockdevRef::reference(file_node.to_string()),
                },
                offset: None,
                size: None,
            },
        };
        self.exec(&qmp::blockdev_add(raw)).map(drop)
    }

    /// Deletes a block node (the raw node first, then its file node).
    pub fn blockdev_del(&mut self, node: &str) -> io::Result<()> {
        self.exec(&qmp::blockdev_del { node_name: node.to_string() }).map(drop)
    }

    /// `device_add` with driver, id, bus and extra properties (typed JSON values: QMP checks
    /// property types strictly).
    pub fn device_add(&mut self, driver: &str, id: &str, bus: &str, props: &[(&str, serde_json::Value)]) -> io::Result<()> {
        let mut arguments = qapi::Dictionary::new();
        for (k, v) in props {
            arguments.insert((*k).to_string(), v.clone());
        }
        self.exec(&qmp::device_add {
            bus: Some(bus.to_string()),
            id: Some(id.to_string()),
            driver: driver.to_string(),
            arguments,
        })
        .map(drop)
    }

    /// `device_del`: on pc this only *requests* removal (ACPI sets PCID and raises the SCI); the
    /// device lives on until the guest (here: the harness) ejects it.
    pub fn device_del(&mut self, id: &str) -> io::Result<()> {
        self.exec(&qmp::device_del { id: id.to_string() }).map(drop)
    }

    /// `qom-get` of an integer property (e.g. a bus's `acpi-pcihp-bsel`).
    pub fn qom_get_u64(&mut self, path: &str, property: &str) -> io::Result<u64> {
        let v = self.exec(&qmp::qom_get { path: path.to_string(), property: property.to_string() })?;
        v.as_u64().ok_or_else(|| io::Error::other(format!("qom-get {path} {property}: not an integer: {v}")))
    }

    /// Polls the socket for events (with a cheap `query-version`).
    pub fn poll_events(&mut self) -> io::Result<()> {
        self.commands += 1;
        self.qmp.nop()?;
        self.collect_events();
        Ok(())
    }

    /// True (once) if QEMU reported `DEVICE_DELETED` for `id`; the report is consumed.
    pub fn take_deleted(&mut self, id: &str) -> bool {
        if let Some(i) = self.deleted.iter().position(|d| d == id) {
            self.deleted.swap_remove(i);
            true
        } else {
            false
        }
    }

    /// Waits up to `timeout` for `DEVICE_DELETED` of `id`. Never waited on unconditionally:
    /// an eject with commands in flight in the backend leaks the device and sends no event.
    pub fn wait_deleted(&mut self, id: &str, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.take_deleted(id) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
            self.poll_events()?;
        }
    }
}
