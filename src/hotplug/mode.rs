//! `hw.nvme_hotplug.acpi_mode`: who answers ACPI hotplug notifies, us or the in-tree acpi_pci.
//!
//! # Why this has to be decided at all
//! acpi_pci.c installs `acpi_pci_device_notify_handler` on every slot object that has `_EJ0`
//! when the PCI bus attaches (acpi_pci.c acpi_pci_attach). ACPICA lets several system notify
//! handlers sit on one
//! object and calls all of them (ACPICA evmisc.c AcpiEvNotifyDispatch). If we simply added ours, an
//! eject request would
//! run both: the first `device_detach` + `_EJ0` would be ours, the second acpi_pci's (or the
//! other way round): a double detach and a double `_EJ0`, possibly of the *next* device
//! inserted into the slot. So on every slot exactly one party may act on notifies:
//!
//! | mode   | in-tree handler absent | present, removable          | present, not removable      |
//! |--------|------------------------|-----------------------------|-----------------------------|
//! | `off`  | observe                | observe                     | observe                     |
//! | `auto` | **own**                | observe                     | observe                     |
//! | `own`  | **own**                | **own** (remove it first)   | observe, and say so loudly  |
//!
//! - *own*: we install our handler, and after acpi_pci's handler has been removed from that slot
//!   (the glue calls `AcpiRemoveNotifyHandler` from attach or the module load path, never from an
//!   ACPI task thread: Osd/OsdSchedule.c AcpiOsWaitEventsComplete) we do the slot rescan, the safe
//!   detach, `_EJ0` and `_OST`.
//! - *observe*: we install no notify handler on the slot; acpi_pci (if any) detaches our
//!   controller through newbus, which runs our ordinary `device_detach` teardown, and our
//!   EBUSY for an open node or disk makes it skip `_EJ0`. Our task never changes the slot's
//!   topology (no rescan, detach or delete; see `SlotMachine::check`, the observer rule): the
//!   optional fallback check and a controller that saw itself vanish only report what they
//!   found. Namespace rescans (inside our own driver) still run.
//! - `auto` is the default: fill the gaps (kernels before r353586, slots acpi_pci did not see at
//!   bus attach) and leave the rest to the kernel, which already works on current FreeBSD.
//!   On stock FreeBSD 15 every slot is "present, not removable", so `auto` observes them all:
//!   acpi_pci rescans and ejects, our detach keeps the teardown safe and refuses an eject with
//!   EBUSY while a node or disk is open (acpi_pci then skips `_EJ0`), namespace rescans run;
//!   no `_OST`, no slot rescan, no sweep (README "On stock FreeBSD 15", nvme_hotplug.4). We do
//!   not answer `_OST` there: we cannot tell when acpi_pci's handler has finished without
//!   waiting on the ACPI task queue, and such a wait can last as long as an nvme(4) detach
//!   waits for an unmount, which our task (drained at unload) must never do. Nor do we install
//!   a recording-only handler to learn of the notifies: removing it at unload waits for every
//!   queued ACPI task (`AcpiRemoveNotifyHandler` and `AcpiOsWaitEventsComplete`), acpi_pci's
//!   eject of a mounted nvme(4) disk included, so kldunload could hang until an unmount;
//!   without a handler of ours, unload waits for no ACPI task.
//! - "Removable" means the glue can name acpi_pci's handler function to `AcpiRemoveNotifyHandler`
//!   (it is a static function of acpi_pci.c, found through the kernel linker's symbol table).
//!   If it cannot, the handler is "not removable" and `own` must degrade to observing: the
//!   alternative is the double eject above.

/// The tunable's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcpiMode {
    /// Own slots nobody else handles; observe the others.
    #[default]
    Auto,
    /// Take every slot over, removing acpi_pci's handler where possible.
    Own,
    /// Never install an ACPI notify handler.
    Off,
}

impl AcpiMode {
    /// Parses the tunable string (`"auto"`, `"own"`, `"off"`); `None` for anything else, so
    /// the glue can print which value it ignored.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(AcpiMode::Auto),
            "own" => Some(AcpiMode::Own),
            "off" => Some(AcpiMode::Off),
            _ => None,
        }
    }

    /// The tunable spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            AcpiMode::Auto => "auto",
            AcpiMode::Own => "own",
            AcpiMode::Off => "off",
        }
    }
}

/// What the glue found on one slot object before deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InTreeHandler {
    /// No acpi_pci notify handler on this slot.
    Absent,
    /// acpi_pci's handler is installed and we can remove it.
    Removable,
    /// acpi_pci's handler is installed and we cannot remove it.
    Fixed,
}

/// Who acts on notifies for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We answer notifies: rescan, detach, `_EJ0`, `_OST`.
    Owner,
    /// We never evaluate `_EJ0` and ignore ACPI notifies; newbus tells us about detaches.
    Observer,
}

/// The decision for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// Our role on the slot.
    pub role: Role,
    /// Install our notify handler on the slot (true exactly when we own it).
    pub install_ours: bool,
    /// Remove acpi_pci's handler from the slot before installing ours.
    pub remove_in_tree: bool,
    /// `own` was asked for and could not be honoured: print a warning.
    pub downgraded: bool,
}

/// Decides the role for one slot. See the module documentation for the table and the reasons.
pub const fn resolve(mode: AcpiMode, in_tree: InTreeHandler) -> Resolution {
    const OBSERVE: Resolution =
        Resolution { role: Role::Observer, install_ours: false, remove_in_tree: false, downgraded: false };
    const OWN: Resolution =
        Resolution { role: Role::Owner, install_ours: true, remove_in_tree: false, downgraded: false };
    match (mode, in_tree) {
        (AcpiMode::Off, _) => OBSERVE,
        (AcpiMode::Auto, InTreeHandler::Absent) | (AcpiMode::Own, InTreeHandler::Absent) => OWN,
        (AcpiMode::Auto, _) => OBSERVE,
        (AcpiMode::Own, InTreeHandler::Removable) => Resolution { remove_in_tree: true, ..OWN },
        (AcpiMode::Own, InTreeHandler::Fixed) => Resolution { downgraded: true, ..OBSERVE },
    }
}

/// After resolution, is acpi_pci's handler still active on the slot?
pub const fn in_tree_active(in_tree: InTreeHandler, r: Resolution) -> bool {
    !matches!(in_tree, InTreeHandler::Absent) && !r.remove_in_tree
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [AcpiMode; 3] = [AcpiMode::Auto, AcpiMode::Own, AcpiMode::Off];
    const IN_TREE: [InTreeHandler; 3] =
        [InTreeHandler::Absent, InTreeHandler::Removable, InTreeHandler::Fixed];

    /// The invariant behind the whole module: on no slot, in no mode, do two handlers act.
    #[test]
    fn never_two_active_handlers() {
        for m in MODES {
            for t in IN_TREE {
                let r = resolve(m, t);
                let ours = r.install_ours;
                assert_eq!(ours, r.role == Role::Owner, "{m:?}/{t:?}");
                assert!(!(ours && in_tree_active(t, r)), "{m:?}/{t:?}: both handlers active");
                assert!(!r.remove_in_tree || t == InTreeHandler::Removable, "{m:?}/{t:?}");
            }
        }
    }

    #[test]
    fn table() {
        assert_eq!(resolve(AcpiMode::Off, InTreeHandler::Absent).role, Role::Observer);
        assert_eq!(resolve(AcpiMode::Auto, InTreeHandler::Absent).role, Role::Owner);
        assert_eq!(resolve(AcpiMode::Auto, InTreeHandler::Removable).role, Role::Observer);
        let own = resolve(AcpiMode::Own, InTreeHandler::Removable);
        assert!(own.role == Role::Owner && own.remove_in_tree);
        let fixed = resolve(AcpiMode::Own, InTreeHandler::Fixed);
        assert!(fixed.role == Role::Observer && fixed.downgraded);
    }

    #[test]
    fn parse_round_trip() {
        for m in MODES {
            assert_eq!(AcpiMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(AcpiMode::parse("on"), None);
        assert_eq!(AcpiMode::default(), AcpiMode::Auto);
    }
}
