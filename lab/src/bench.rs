//! The hotplug-cycle benchmark: how many full cycles per second the lab sustains, and where
//! the time goes. One cycle = hot-add (QMP) → SCI → Notify 1 → probe + BAR → engine bring-up
//! → 4 KiB write + read + verify → `device_del` → Notify 3 → engine shutdown → `_EJ0` →
//! `DEVICE_DELETED` → `blockdev-del`. Figures are printed, never asserted. Every figure is
//! measured with the guest-RAM path asked for ([`RamAccess`]), so the two can be compared.

use std::time::{Duration, Instant};

use nvme_hotplug::nvme::{Controller, DataBuf, Event, Health, IoOp, IoRequest, NvmeError};
use nvme_hotplug::platform::{DmaAllocator, DmaRegion};

use crate::acpi_hotplug::NotifyCode;
use crate::driver::lab_config;
use crate::ledger::fill_block;
use crate::machine::Machine;
use crate::qemu::MachineKind;
use crate::scenario::{ControllerSpec, NamespaceSpec};
use crate::shared_ram::RamAccess;

/// Figures of one benchmark run.
#[derive(Debug, Clone, Default)]
pub struct BenchResult {
    /// Cycles completed.
    pub cycles: u32,
    /// Wall-clock seconds for all cycles.
    pub secs: f64,
    /// Mean milliseconds per phase: add+notify, bring-up, I/O, detach+eject+delete.
    pub phase_ms: [f64; 4],
    /// qtest commands per cycle.
    pub qtest_per_cycle: f64,
    /// QEMU RSS at start and end (KiB).
    pub rss_kib: (u64, u64),
    /// DMA bytes still allocated at the end (must be 0).
    pub leaked_bytes: u64,
}

impl BenchResult {
    /// Human-readable figures.
    pub fn describe(&self) -> String {
        let rate = self.cycles as f64 / self.secs.max(1e-9);
        format!(
            "hotplug cycles: {} in {:.2} s = {:.1} cycles/s ({:.2} ms/cycle)\n\
             per cycle: add+notify {:.2} ms, bring-up {:.2} ms, 4 KiB write+read+verify {:.2} ms, \
             detach+eject+delete {:.2} ms; {:.0} qtest commands\n\
             QEMU RSS {} -> {} KiB; DMA bytes leaked {}",
            self.cycles,
            self.secs,
            rate,
            1e3 / rate,
            self.phase_ms[0],
            self.phase_ms[1],
            self.phase_ms[2],
            self.phase_ms[3],
            self.qtest_per_cycle,
            self.rss_kib.0,
            self.rss_kib.1,
            self.leaked_bytes
        )
    }
}

fn wait_notify(m: &mut Machine, slot: u8, code: NotifyCode) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = m.poll_notifies().map_err(|e| e.to_string())?;
        if n.iter().any(|n| n.slot == slot && n.code == code) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no Notify {} on slot {slot}", code as u32));
        }
    }
}

/// Runs `cycles` hotplug cycles on one QEMU and measures them.
pub fn hotplug_cycles(cycles: u32, ram: RamAccess) -> Result<BenchResult, String> {
    let mut m = Machine::start_with(MachineKind::Pc, &[], &[], ram).map_err(|e| e.to_string())?;
    let slot = 6;
    let spec = ControllerSpec {
        id: "bench".into(),
        slot,
        namespaces: vec![NamespaceSpec { nsid: 1, size_mib: 1, lba: 512 }],
    };
    let mut r = BenchResult { rss_kib: (m.process().rss_kib(), 0), ..Default::default() };
    let q0 = m.guest().qtest_commands();
    let start = Instant::now();
    let mut phase = [Duration::ZERO; 4];
    for i in 0..cycles {
        let t0 = Instant::now();
        m.hot_add(&spec).map_err(|e| format!("cycle {i}: hot-add: {e}"))?;
        wait_notify(&mut m, slot, NotifyCode::DeviceCheck)?;
        let f = m.probe(slot).map_err(|e| e.to_string())?.ok_or("no function after device check")?;
        let t1 = Instant::now();
        let mut ctrl = Controller::new(m.platform(&f), lab_config());
        ctrl.bring_up().map_err(|e| format!("cycle {i}: bring-up: {e}"))?;
        let t2 = Instant::now();
        {
            let buf = ctrl.platform().alloc_dma(4096, 4096).map_err(|e| format!("{e:?}"))?;
            let mut data = vec![0u8; 4096];
            for (k, chunk) in data.chunks_mut(512).enumerate() {
                fill_block(i as u64 + 1, k as u64, chunk);
            }
            buf.write(0, &data);
            let req = |op| IoRequest {
                tag: 1,
                nsid: 1,
                op,
                lba: 0,
                blocks: 8,
                data: DataBuf { bus_addr: buf.bus_addr(), len: 4096 },
            };
            ctrl.io_sync(req(IoOp::Write)).map_err(|e| format!("cycle {i}: write: {e}"))?;
            buf.write(0, &[0u8; 4096]);
            ctrl.io_sync(req(IoOp::Read)).map_err(|e| format!("cycle {i}: read: {e}"))?;
            let mut back = vec![0u8; 4096];
            buf.read(0, &mut back);
            if back != data {
                return Err(format!("cycle {i}: read back different data"));
            }
        }
        let t3 = Instant::now();
        m.request_unplug(slot).map_err(|e| e.to_string())?;
        wait_notify(&mut m, slot, NotifyCode::EjectRequest)?;
        ctrl.shutdown().map_err(|e| format!("cycle {i}: shutdown: {e}"))?;
        drop(ctrl);
        m.eject(slot).map_err(|e| e.to_string())?;
        if m.reap(Duration::from_secs(2)).map_err(|e| e.to_string())? != 0 {
            return Err(format!("cycle {i}: QEMU did not delete the device"));
        }
        let t4 = Instant::now();
        for (acc, d) in phase.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
            *acc += d;
        }
        r.cycles += 1;
    }
    r.secs = start.elapsed().as_secs_f64();
    let n = r.cycles.max(1) as f64;
    for (ms, d) in r.phase_ms.iter_mut().zip(phase) {
        *ms = d.as_secs_f64() * 1e3 / n;
    }
    r.qtest_per_cycle = (m.guest().qtest_commands() - q0) as f64 / n;
    r.rss_kib.1 = m.process().rss_kib();
    r.leaked_bytes = m.guest().live_dma_bytes();
    Ok(r)
}

/// Figures of the surprise-removal measurement.
#[derive(Debug, Clone, Default)]
pub struct SurpriseResult {
    /// Requests in flight when the device vanished.
    pub in_flight: usize,
    /// How long the eject write itself took (QEMU drains its backend first), ms.
    pub eject_ms: f64,
    /// From the end of the eject to the last completion delivered, ms (detection + fail_all).
    pub settle_ms: f64,
    /// Requests the device completed before vanishing.
    pub completed_ok: usize,
    /// Requests failed with `Gone` by the engine.
    pub failed: usize,
}

impl SurpriseResult {
    /// Human-readable figures.
    pub fn describe(&self) -> String {
        format!(
            "QEMU surprise removal with {} x 16 KiB writes in flight: eject {:.2} ms, all completed {:.2} ms later \
             ({} by the device, {} failed with Gone)",
            self.in_flight, self.eject_ms, self.settle_ms, self.completed_ok, self.failed
        )
    }
}

/// Submits `n` 16 KiB writes, ejects the controller with no warning, and measures how long the
/// engine takes to complete every request (polling + the health check a driver's watchdog
/// would run, back to back).
pub fn surprise_removal(n: usize, ram: RamAccess) -> Result<SurpriseResult, String> {
    let spec = ControllerSpec {
        id: "victim".into(),
        slot: 5,
        namespaces: vec![NamespaceSpec { nsid: 1, size_mib: 64, lba: 512 }],
    };
    let mut m = Machine::start_with(MachineKind::Pc, std::slice::from_ref(&spec), &[], ram).map_err(|e| e.to_string())?;
    let (_, f) = m.scan().map_err(|e| e.to_string())?.into_iter().next().ok_or("controller not found")?;
    // One I/O queue deep enough for every request (QEMU's MQES allows 2,048 entries).
    let entries = (n + 1).clamp(256, 2048) as u16;
    let mut ctrl = Controller::new(m.platform(&f), nvme_hotplug::nvme::Config { io_entries: entries, ..lab_config() });
    ctrl.bring_up().map_err(|e| format!("bring-up: {e}"))?;
    if let Some(info) = ctrl.info() {
        if (info.io_queues as usize) * (info.io_entries as usize).saturating_sub(1) < n {
            return Err(format!("{n} requests do not fit in {} x {} queue entries", info.io_queues, info.io_entries));
        }
    }
    let mut bufs = Vec::new();
    for tag in 0..n as u64 {
        let buf = ctrl.platform().alloc_dma(16384, 4096).map_err(|e| format!("{e:?}"))?;
        let req = IoRequest {
            tag,
            nsid: 1,
            op: IoOp::Write,
            lba: tag * 32,
            blocks: 32,
            data: DataBuf { bus_addr: buf.bus_addr(), len: 16384 },
        };
        ctrl.submit(req).map_err(|e| format!("submit: {e}"))?;
        bufs.push(buf);
    }
    let t0 = Instant::now();
    m.eject(spec.slot).map_err(|e| e.to_string())?;
    let t1 = Instant::now();
    let mut r = SurpriseResult { in_flight: n, ..Default::default() };
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while done < n && Instant::now() < deadline {
        ctrl.poll(&mut |e| {
            if let Event::Io(c) = e {
                done += 1;
                if c.result.is_ok() {
                    r.completed_ok += 1;
                } else {
                    r.failed += 1;
                }
            }
        });
        if done < n && ctrl.check_health() == Health::Gone {
            ctrl.fail_all(NvmeError::Gone, &mut |_| {
                done += 1;
                r.failed += 1;
            });
        }
    }
    let t2 = Instant::now();
    if done < n {
        return Err(format!("{} of {n} requests never completed", n - done));
    }
    r.eject_ms = (t1 - t0).as_secs_f64() * 1e3;
    r.settle_ms = (t2 - t1).as_secs_f64() * 1e3;
    let _ = ctrl.shutdown();
    Ok(r)
}

/// Hotplug cycles per second through the whole kernel path the scenarios use: QEMU's GPE,
/// the lab's `_E01` -> `Notify`, the project's hotplug state machine, probe + bring-up +
/// nodes, a 4 KiB write-verify, then the removal (`device_del` -> Notify 3 -> detach -> `_EJ0`
/// when `surprise` is false; an eject with no notification, noticed by the watchdog, when
/// true), all judged by the FreeBSD-rules model. Returns (cycles per second, the report).
pub fn kernel_path_cycles(cycles: u32, surprise: bool, ram: RamAccess) -> Result<(f64, crate::report::Report), String> {
    let mode = if surprise { "surprise" } else { "announced" };
    let ram = format!("{ram:?}").to_lowercase();
    let text = format!(
        "name = 'bench-{mode}'\nram_access = '{ram}'\n[[step]]\nop = 'repeat'\ntimes = {cycles}\nsteps = [\n\
         {{ op = 'attach', id = 'b', slot = 6, namespaces = [{{ nsid = 1, size_mib = 4 }}] }},\n\
         {{ op = 'io', target = 'b/1', kind = 'write-verify', ops = 1, depth = 1, block = 4096 }},\n\
         {{ op = 'detach', id = 'b', mode = '{mode}' }} ]\n"
    );
    let sc = crate::scenario::Scenario::parse(&text).map_err(|e| e.to_string())?;
    let r = crate::runner::Runner::new(sc).run();
    if !r.ok {
        return Err(r.summary());
    }
    let step = r.steps.iter().find(|s| s.op == "repeat").map_or(r.total_ms, |s| s.ms);
    Ok((r.cycles as f64 / (step / 1e3), r))
}

/// Every lab figure, in the order `cargo bench -p nvmehp-lab` and `nvmehp-lab bench` print them:
/// engine-only hotplug cycles, cycles through the whole kernel path (announced and surprise
/// removal), then surprise removal with 1, 64 and 1,024 requests in flight. Each figure is
/// printed as soon as it is measured; the first failure ends the run.
pub fn print_all(cycles: u32, ram: RamAccess) -> Result<(), String> {
    println!("guest RAM reached through {}", if ram == RamAccess::Shared { "the shared mapping" } else { "qtest" });
    println!("{}", hotplug_cycles(cycles, ram)?.describe());
    for surprise in [false, true] {
        let (rate, r) = kernel_path_cycles(cycles.min(500), surprise, ram)?;
        println!(
            "kernel path ({}, hotplug state machine + FreeBSD model): {} cycles at {rate:.1} cycles/s ({:.2} ms/cycle)",
            if surprise { "surprise removal" } else { "announced removal" },
            r.cycles,
            1e3 / rate
        );
    }
    for n in [1, 64, 1024] {
        println!("{}", surprise_removal(n, ram)?.describe());
    }
    Ok(())
}
