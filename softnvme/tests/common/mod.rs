//! Helpers shared by the softnvme integration tests.
#![allow(dead_code)]

use nvme_hotplug::nvme::{Completion, Config, Controller, DataBuf, Event, IoOp, IoRequest};
use nvme_hotplug::platform::DmaRegion;
use softnvme::{SoftConfig, SoftNvme, SoftRegion};

/// A brought-up controller over a software device with `cfg`.
pub fn up(cfg: SoftConfig) -> (SoftNvme, Controller<SoftNvme>) {
    let dev = SoftNvme::new(cfg);
    let mut c = Controller::new(dev.clone(), Config::default());
    c.bring_up().expect("bring-up");
    (dev, c)
}

/// A deterministic pattern for `seed` (a xorshift stream, 8 bytes per step).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A write request for `blocks` at `lba` from `buf`.
pub fn req(
    tag: u64,
    op: IoOp,
    nsid: u32,
    lba: u64,
    blocks: u32,
    buf: &SoftRegion,
    lba_bytes: usize,
) -> IoRequest {
    IoRequest {
        tag,
        nsid,
        op,
        lba,
        blocks,
        data: DataBuf {
            bus_addr: buf.bus_addr(),
            len: blocks as usize * lba_bytes,
        },
    }
}

/// Polls once and collects I/O completions and other events.
pub fn poll_all(c: &mut Controller<SoftNvme>) -> (Vec<Completion>, Vec<Event>) {
    let mut io = Vec::new();
    let mut other = Vec::new();
    c.poll(&mut |e| match e {
        Event::Io(x) => io.push(x),
        e => other.push(e),
    });
    (io, other)
}
