//! What the hotplug state machine asks its platform to do, one slot at a time.
//!
//! The state machine only decides; an implementation of [`SlotOps`] acts. In the kernel that is
//! newbus + ACPI under `bus_topo_lock()` on our own taskqueue (never in the ACPI notify context);
//! in tests and the lab it is a model. Every method may sleep.

/// Index of a hotplug slot in the table the state machine was built with. The glue maps it to
/// an ACPI handle (`\_SB.PCI0.S08_`) and a PCI slot number.
pub type SlotIndex = usize;

/// Why a slot's device is being detached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachReason {
    /// The platform asked for an eject; the device still answers. The driver may refuse
    /// ([`DetachError::Busy`] / [`DetachError::InUse`]) and the eject is then not performed.
    Eject,
    /// The device no longer answers (surprise removal, stale device). Refusing is pointless: the
    /// implementation must tear down (failing I/O with ENXIO) and must not return Busy/InUse.
    Gone,
}

/// Why a detach did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachError {
    /// The driver refused for now (`device_detach` returned EBUSY): `_OST` 0x82.
    Busy,
    /// A consumer holds the device (open node, mounted file system): `_OST` 0x81.
    InUse,
    /// There was no `device_t` for the slot when the lock was taken: someone else (the
    /// in-tree handler, a `devctl delete`) removed it first. Not an error for an eject.
    NoDevice,
    /// A function of the slot is attached to another driver (nvme(4), or anything else):
    /// nothing was detached. We never detach other drivers' devices: nvme(4)'s detach sleeps
    /// until every disk's file system is unmounted (sys/dev/nvd/nvd.c nvd_controller_fail), and
    /// our hotplug task, which unload drains, must never wait for that. For an eject: `_OST`
    /// 0x80 (eject not supported); the owner detaches it (`devctl detach`) and asks again.
    NotOurs,
    /// Anything else.
    Failed,
}

/// What a check found and, by rule, left for someone else (see [`SlotOps::left_alone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftAlone {
    /// A `device_t` whose device no longer answers (config space and `_STA` agree).
    Stale,
    /// A function that answers and has no `device_t` yet.
    New,
    /// On a slot we own: a stale device of another driver ([`DetachError::NotOurs`]).
    OtherDriver,
}

/// A slot action failed (rescan, `_EJ0`, namespace rescan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpFailed;

/// The actions and questions the state machine needs, per slot.
///
/// Contract shared by all implementations: [`SlotOps::detach_slot`] re-checks under the bus
/// topology lock that a `device_t` exists and returns [`DetachError::NoDevice`] otherwise, so
/// that a detach can never run twice for one device even when two handlers race.
pub trait SlotOps {
    /// Config space of function 0 answers (vendor ID is not 0xffff).
    fn present(&mut self, slot: SlotIndex) -> bool;
    /// The slot's `_STA` value, or `None` when the object has no `_STA` (ACPI: then assume
    /// present and functioning).
    fn sta(&mut self, slot: SlotIndex) -> Option<u32>;
    /// A `device_t` exists for the slot (attached or not), at any of its functions: an eject
    /// must not take "function 0 has none" for an empty slot.
    fn has_child(&mut self, slot: SlotIndex) -> bool;
    /// Adds and attaches the functions of this slot that have no `device_t` yet, this slot
    /// only (not a whole-bus rescan). Called on occupied slots too (an ACPI check of a slot with
    /// a live function): known functions must be neither re-added nor re-probed.
    fn rescan_slot(&mut self, slot: SlotIndex) -> Result<(), OpFailed>;
    /// `device_detach` + `device_delete_child` of the slot's device(s), under the topology lock.
    fn detach_slot(&mut self, slot: SlotIndex, why: DetachReason) -> Result<(), DetachError>;
    /// Evaluates `_EJ0(1)` on the slot object.
    fn eject(&mut self, slot: SlotIndex) -> Result<(), OpFailed>;
    /// Evaluates `_OST(source, status)` on the slot object. Absent `_OST` is not an error.
    fn ost(&mut self, slot: SlotIndex, source: u32, status: crate::hotplug::ost::OstStatus);
    /// A namespace attribute changed on a controller in this slot: re-read the namespace
    /// list of every controller of ours in it (the event does not say which function), add
    /// new namespaces, remove deleted ones.
    fn rescan_namespaces(&mut self, slot: SlotIndex) -> Result<(), OpFailed>;
    /// A check found something to add or remove and, by rule, did nothing (a slot we only
    /// observe, or another driver's stale device): say so (the kernel glue prints what the
    /// administrator can do). Called when the finding changes, not at every check repeating it.
    fn left_alone(&mut self, _slot: SlotIndex, _what: LeftAlone) {}
}
