//! The interrupt-driven completion loop: what the kld's ithread does, run against QEMU.
//!
//! The kernel driver (`src/freebsd/ctrl.rs`) never spins on completion queues: its interrupt
//! handler takes the controller mutex and calls the engine's `poll`. This loop does the same
//! with a lab [`Interrupt`]: wait for vector 0, then `poll`. The wait is bounded because a
//! removed device never interrupts again (QEMU raises nothing on a surprise removal); on a
//! timeout the loop does what the kld's watchdog does — asks the engine for the controller's
//! health, and polls once in case an interrupt was missed. Completions found by that fallback
//! poll are counted apart ([`IrqStats::reaped_without_irq`]), so a test can prove that the
//! interrupts, not the fallback, did the work.

use std::time::Duration;

use nvme_hotplug::nvme::{Completion, Controller, Event, Health, NvmeError};

use crate::interrupts::Interrupt;
use crate::platform::LabPlatform;
use crate::qtest::QtestError;

/// What the loop saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqStats {
    /// Interrupts taken (each followed by a poll).
    pub interrupts: u64,
    /// Interrupts whose poll reaped no I/O completion (spurious, or admin-only).
    pub empty_polls: u64,
    /// Waits that timed out.
    pub timeouts: u64,
    /// I/O completions reaped by a poll that followed an interrupt.
    pub reaped_by_irq: u64,
    /// I/O completions reaped by the fallback poll after a timeout (a missed interrupt).
    pub reaped_without_irq: u64,
}

/// Why [`IrqDriven::run_until_idle`] stopped early.
#[derive(Debug)]
pub enum IrqLoopError {
    /// The controller is gone or broken; every request still in flight was completed with
    /// [`NvmeError::Gone`] before this was returned.
    Lost(Health),
    /// The harness failed (QEMU died, qtest broke).
    Harness(QtestError),
}

/// One controller driven by its interrupt.
pub struct IrqDriven {
    irq: Interrupt,
    timeout: Duration,
    stats: IrqStats,
}

impl IrqDriven {
    /// Waits at most `timeout` for each interrupt before falling back to the health check.
    pub fn new(irq: Interrupt, timeout: Duration) -> Self {
        IrqDriven { irq, timeout, stats: IrqStats::default() }
    }

    /// What the loop saw so far.
    pub fn stats(&self) -> IrqStats {
        self.stats
    }

    /// The interrupt (to mask it, read its pending bit, count strays).
    pub fn interrupt(&self) -> &Interrupt {
        &self.irq
    }

    /// One ithread iteration: wait for the interrupt (bounded), then poll; on a timeout, check
    /// health and poll once. I/O completions go to `done`. `Ok(Some(h))`: the controller was
    /// given up (by the health check or by the engine inside `poll`); the caller fails what is
    /// left ([`IrqDriven::run_until_idle`] does).
    pub fn service(
        &mut self,
        ctrl: &mut Controller<LabPlatform>,
        done: &mut dyn FnMut(Completion),
    ) -> Result<Option<Health>, QtestError> {
        let got = self.irq.wait(self.timeout)?;
        if !got {
            self.stats.timeouts += 1;
            match ctrl.check_health() {
                Health::Healthy => {}
                h => return Ok(Some(h)),
            }
        }
        let mut lost = None;
        let n = ctrl.poll(&mut |e| match e {
            Event::Io(c) => done(c),
            Event::ControllerLost { health, .. } => lost = Some(health),
            _ => {}
        }) as u64;
        if got {
            self.stats.interrupts += 1;
            self.stats.reaped_by_irq += n;
            if n == 0 {
                self.stats.empty_polls += 1;
            }
        } else {
            self.stats.reaped_without_irq += n;
        }
        Ok(lost)
    }

    /// Services interrupts until nothing is outstanding. If the controller is lost, fails
    /// everything still in flight (each request completed exactly once, through `done`) and
    /// returns [`IrqLoopError::Lost`]. Never hangs: each wait is bounded, and a controller that
    /// stays healthy but never completes is given up by the engine's command deadline.
    pub fn run_until_idle(
        &mut self,
        ctrl: &mut Controller<LabPlatform>,
        done: &mut dyn FnMut(Completion),
    ) -> Result<(), IrqLoopError> {
        while ctrl.outstanding() > 0 {
            match self.service(ctrl, done) {
                Ok(None) => {}
                Ok(Some(h)) => {
                    ctrl.fail_all(NvmeError::Gone, done);
                    return Err(IrqLoopError::Lost(h));
                }
                Err(e) => {
                    ctrl.fail_all(NvmeError::Aborted, done);
                    return Err(IrqLoopError::Harness(e));
                }
            }
        }
        Ok(())
    }
}
