//! Which interrupt a controller gets, chosen as nvme(4) chooses it
//! (sys/dev/nvme/nvme_pci.c `nvme_ctrlr_setup_interrupts`): an MSI-X vector, else an MSI
//! message, else the shared INTx line. The driver needs one (every queue completes on it).
//!
//! **MSI-X needs its BARs first.** The MSI-X table and the Pending Bit Array live in memory
//! BARs of the function, not necessarily BAR0 (NVMe allows them behind BAR4/5; bhyve and
//! real controllers use that). pci(4) programs the table through those resources, so
//! `pci_alloc_msix_method` (sys/dev/pci/pci.c) fails with ENXIO unless the table's BAR, and
//! the PBA's if it is another one, is allocated and active. nvme(4) allocates both in
//! `nvme_ctrlr_allocate_bar` (nvme_pci.c) from `pci_msix_table_bar`/`pci_msix_pba_bar`,
//! before `pci_alloc_msix`; so do we ([`IrqSource::alloc`]). BAR0 is the engine's register
//! window and stays allocated for longer than the interrupt (the engine is freed at teardown
//! step 5, the interrupt torn down at step 3), so it is not allocated twice.
//!
//! **Release order** ([`IrqSource::release`]): after `bus_teardown_intr` and the IRQ resource's
//! release, `pci_release_msi` (it refuses while a message's IRQ resource is allocated), and
//! only then the table and PBA BARs, which pci(4) uses until the messages are gone.
//!
//! **Allocated before the queues, set up after** ([`IrqAlloc`]). Attach allocates the interrupt
//! before the engine's bring-up creates any completion queue, as nvme(4) does:
//! sys/dev/nvme/nvme_pci.c `nvme_pci_attach` calls `nvme_ctrlr_setup_interrupts` before
//! `nvme_attach`, and the queues are created on the device only later, in
//! sys/dev/nvme/nvme_ctrlr.c `nvme_ctrlr_start` (`nvme_ctrlr_create_qpairs`). A controller may
//! tie a completion queue's vector to the interrupt mode in force when the queue was created:
//! QEMU's NVMe model marks an MSI-X vector in use only for a queue created while MSI-X is
//! enabled (hw/nvme/ctrl.c `nvme_init_cq`), and drops the messages of a vector not in use
//! (hw/pci/msix.c `msix_notify`). `pci_alloc_msix_method` (sys/dev/pci/pci.c) sets the MSI-X
//! Enable bit with every vector masked, and `pci_setup_intr` unmasks the vector only once
//! `bus_setup_intr` gives it a handler (`pci_enable_msix`, `pci_unmask_msix`): a message sent
//! in between waits in the Pending Bit Array and is delivered at the unmask. The handler itself
//! is set up after the bring-up, once the engine is behind the controller mutex it takes;
//! bring-up's own admin commands are polled, and no I/O is outstanding before the first node
//! exists.
//!
//! **One vector, IV 0.** The engine creates every completion queue with interrupt vector 0
//! (`nvme::admin::create_cq`), which is the only vector we allocate: MSI-X table entry 0
//! (IRQ rid 1), MSI message 0 (rid 1), or INTx, where the IV only selects an INTMS bit.

use super::device::Device;
use super::intr::IrqResource;
use super::resource::MemResource;
use core::ffi::{c_int, CStr};
use core::fmt;
use core::mem::ManuallyDrop;

/// The kind of interrupt a controller got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IrqKind {
    /// One MSI-X vector (IRQ rid 1).
    Msix = 1,
    /// One MSI message (IRQ rid 1).
    Msi = 2,
    /// The legacy line, shared with other functions (IRQ rid 0, RF_SHAREABLE).
    Intx = 3,
}

impl IrqKind {
    /// Its name, as `dev.nvmehp.N.interrupt` and the attach message say it.
    pub fn name(self) -> &'static CStr {
        match self {
            IrqKind::Msix => c"MSI-X",
            IrqKind::Msi => c"MSI",
            IrqKind::Intx => c"INTx",
        }
    }

    /// The kind `code` (`kind as u8`) stands for; `None` for anything else (0: none yet).
    pub fn from_code(code: u8) -> Option<IrqKind> {
        [IrqKind::Msix, IrqKind::Msi, IrqKind::Intx].into_iter().find(|k| *k as u8 == code)
    }
}

impl fmt::Display for IrqKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().to_str().unwrap_or("?"))
    }
}

/// What backs a controller's IRQ resource besides itself: the messages allocated from pci(4)
/// and, for MSI-X, the table and PBA BARs that are not BAR0. Give it back with
/// [`IrqSource::release`] after the IRQ resource is released; dropping it instead releases the
/// BARs but not the messages (only for an interrupt that could not be torn down, whose
/// source must then be forgotten whole, see `FreeBsdKernel::teardown_intr`).
pub struct IrqSource {
    kind: IrqKind,
    /// The MSI-X table's BAR and the PBA's, where they are not BAR0 (nor the same BAR twice).
    bars: [Option<MemResource>; 2],
}

impl IrqSource {
    /// Allocates the controller's interrupt: MSI-X, then MSI, then INTx, each tried only if
    /// the one before could not be had; `regs_rid` is the BAR the caller already holds (BAR0).
    /// Returns the source and its IRQ resource, or `None` if not even INTx could be allocated.
    pub fn alloc(dev: Device, regs_rid: c_int) -> Option<(IrqSource, IrqResource)> {
        Self::msix(dev, regs_rid).or_else(|| Self::msi(dev)).or_else(|| {
            let irq = IrqResource::alloc(dev, 0)?;
            Some((IrqSource { kind: IrqKind::Intx, bars: [None, None] }, irq))
        })
    }

    fn msix(dev: Device, regs_rid: c_int) -> Option<(IrqSource, IrqResource)> {
        if dev.msix_count() < 1 {
            return None;
        }
        let (table, pba) = (dev.msix_table_bar()?, dev.msix_pba_bar()?);
        let bar = |rid: c_int| {
            let r = MemResource::alloc(dev, rid);
            if r.is_none() {
                dev_printf!(&dev, "cannot allocate the MSI-X table/PBA BAR (rid {:#x}); not using MSI-X\n", rid);
            }
            r
        };
        // A BAR already held (BAR0), or the table's again for the PBA, is not allocated twice.
        // On a failure, the BAR allocated before is released on return.
        let table_bar = if table != regs_rid { Some(bar(table)?) } else { None };
        let pba_bar = if pba != regs_rid && pba != table { Some(bar(pba)?) } else { None };
        let bars = [table_bar, pba_bar];
        // pci_alloc_msix only after both BARs are active (pci.c pci_alloc_msix_method).
        if !matches!(dev.alloc_msix(1), Ok(n) if n >= 1) {
            return None;
        }
        Self::message_irq(dev, IrqSource { kind: IrqKind::Msix, bars })
    }

    fn msi(dev: Device) -> Option<(IrqSource, IrqResource)> {
        if dev.msi_count() < 1 || !matches!(dev.alloc_msi(1), Ok(n) if n >= 1) {
            return None;
        }
        Self::message_irq(dev, IrqSource { kind: IrqKind::Msi, bars: [None, None] })
    }

    /// The IRQ resource of the first message (rid 1); gives the messages back if it fails.
    fn message_irq(dev: Device, source: IrqSource) -> Option<(IrqSource, IrqResource)> {
        match IrqResource::alloc(dev, 1) {
            Some(irq) => Some((source, irq)),
            None => {
                source.release(dev);
                None
            }
        }
    }

    /// The source of an INTx IRQ resource a host test allocated itself (rid 0).
    #[cfg(test)]
    pub(super) fn intx() -> IrqSource {
        IrqSource { kind: IrqKind::Intx, bars: [None, None] }
    }

    /// The kind allocated.
    pub fn kind(&self) -> IrqKind {
        self.kind
    }

    /// Gives the messages back (`pci_release_msi`), then the MSI-X table and PBA BARs. Call
    /// only after the IRQ resource was released (its interrupt torn down).
    pub fn release(self, dev: Device) {
        if self.kind != IrqKind::Intx {
            if let Err(e) = dev.release_msi() {
                dev_printf!(&dev, "pci_release_msi failed: {}\n", e);
            }
        }
        drop(self.bars);
    }
}

/// An interrupt allocated and not (yet) set up: the IRQ resource and its [`IrqSource`].
/// Attach holds it across the engine's bring-up (see the module doc). Dropped, it gives
/// everything back in the release order: the IRQ resource, the messages, then the MSI-X
/// table and PBA BARs; so every failure path between the allocation and `bus_setup_intr`
/// releases it right without a line of its own.
pub struct IrqAlloc {
    dev: Device,
    irq: ManuallyDrop<IrqResource>,
    source: ManuallyDrop<IrqSource>,
}

impl IrqAlloc {
    /// [`IrqSource::alloc`]: MSI-X, else MSI, else INTx; `None` if not even INTx.
    pub fn alloc(dev: Device, regs_rid: c_int) -> Option<IrqAlloc> {
        let (source, irq) = IrqSource::alloc(dev, regs_rid)?;
        Some(IrqAlloc { dev, irq: ManuallyDrop::new(irq), source: ManuallyDrop::new(source) })
    }

    /// The kind allocated.
    pub fn kind(&self) -> IrqKind {
        self.source.kind()
    }

    /// The parts, for `bus_setup_intr` on the IRQ resource; from here on the caller releases
    /// them (`Interrupt` and [`IrqSource::release`]).
    pub fn into_parts(self) -> (IrqSource, IrqResource) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so each field is taken exactly once, here.
        unsafe { (ManuallyDrop::take(&mut this.source), ManuallyDrop::take(&mut this.irq)) }
    }
}

impl Drop for IrqAlloc {
    fn drop(&mut self) {
        // SAFETY: Drop runs once and only for a value `into_parts` did not consume; each field
        // is dropped or taken exactly once. The IRQ resource goes first: pci_release_msi
        // refuses while a message's IRQ resource is allocated.
        let source = unsafe {
            ManuallyDrop::drop(&mut self.irq);
            ManuallyDrop::take(&mut self.source)
        };
        source.release(self.dev);
    }
}
