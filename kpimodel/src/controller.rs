//! A modelled attached controller: the engine's I/O side ([`ModelIo`]) and an attach routine
//! that creates what the real driver's attach creates (softc, interrupt, watchdog callout,
//! taskqueue, controller node, namespace nodes and disks), handing them to
//! [`Live`](nvme_hotplug::hotplug::teardown::Live).

use crate::memory::M_NVMEHP;
use crate::model::{IoBoard, IoRef, Model};
use nvme_hotplug::hotplug::errno::Errno;
use nvme_hotplug::hotplug::kernel::IoGate;
use nvme_hotplug::hotplug::teardown::Live;

/// Size of the modelled softc.
pub const SOFTC_SIZE: usize = 512;

/// Bytes of the per-disk context teardown allocates for each namespace.
pub const DISK_CTX_BYTES: usize = nvme_hotplug::hotplug::teardown::DISK_CTX_SIZE;

/// The engine's request queues as teardown sees them.
#[derive(Debug)]
pub struct ModelIo {
    board: IoBoard,
    gone: bool,
    outstanding: Vec<(u32, IoRef)>,
    /// Requests refused with ENXIO after mark_gone.
    pub refused: usize,
    /// Requests that completed normally during an announced removal's quiesce.
    pub quiesced: usize,
}

impl ModelIo {
    /// An engine whose requests complete on `board`.
    pub fn new(board: IoBoard) -> Self {
        ModelIo { board, gone: false, outstanding: Vec::new(), refused: 0, quiesced: 0 }
    }

    /// Submits a request to namespace `nsid`; ENXIO at once when gone.
    pub fn submit(&mut self, nsid: u32) -> Result<IoRef, Errno> {
        if self.gone {
            self.refused += 1;
            return Err(Errno::ENXIO);
        }
        let io = self.board.submit();
        self.outstanding.push((nsid, io));
        Ok(io)
    }

    /// Requests not completed yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

impl IoGate for ModelIo {
    fn mark_gone(&mut self) {
        self.gone = true;
    }
    fn quiesce(&mut self) {
        // The device is still there: what is in flight completes normally.
        self.quiesced += self.outstanding.len();
        for (_, io) in self.outstanding.drain(..) {
            self.board.complete(io);
        }
    }
    fn fail_all(&mut self) -> usize {
        let n = self.outstanding.len();
        for (_, io) in self.outstanding.drain(..) {
            self.board.complete(io);
        }
        n
    }
    fn fail_namespace(&mut self, nsid: u32) -> usize {
        let before = self.outstanding.len();
        let board = self.board.clone();
        self.outstanding.retain(|&(ns, io)| {
            if ns == nsid {
                board.complete(io);
            }
            ns != nsid
        });
        before - self.outstanding.len()
    }
}

/// Attaches a modelled controller with namespaces `nsids`, the way the driver's attach does.
/// Disk units are `unit * 1000 + nsid` so they never collide between controllers.
pub fn attach(m: &mut Model, nsids: &[u32]) -> Result<Live<Model, ModelIo>, Errno> {
    let unit = m.next_unit();
    let softc = m.malloc(M_NVMEHP, SOFTC_SIZE, true);
    let intr = m.setup_intr(softc);
    let timer = m.callout_reset(softc);
    let tq = m.taskqueue_create("nvmehp taskq");
    let io = ModelIo::new(m.io_board());
    let mut live = Live::new(unit, io, softc, Some(intr), Some(timer), Some(tq));
    live.create_controller_node(m)?;
    for &ns in nsids {
        live.add_namespace(m, ns, unit * 1000 + ns)?;
    }
    Ok(live)
}
