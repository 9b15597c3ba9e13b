//! Failure injection: `--fail FUNC[:N][=ERR]` makes the N-th call (default: every call) of the
//! emulated KPI function FUNC fail with ERR, so the module's error paths run on the shipped .ko.
//!
//! Only functions that can fail in FreeBSD are accepted ([`FAILABLE`]), each with the answers
//! FreeBSD's own can give; ERR defaults to the likeliest. The emulated function answers the
//! failure as FreeBSD's does: it returns the error and leaves behind what FreeBSD's leaves (the
//! caller's out-parameters, the kernel's state), which its [`Failable::leaves`] says, and the
//! call log says `kldhost: injected ERR into FUNC (call N)`.
//!
//! Counting: every call of FUNC counts, except for `malloc` and `malloc_aligned`, where only
//! `M_NOWAIT` calls do (an `M_WAITOK` malloc(9) sleeps until memory is available and never
//! returns NULL, so it is not a call that can fail). `pci_alloc_msix` and `pci_alloc_msi` are
//! kobj methods (the module calls `PCI_ALLOC_MSIX` through `pci_alloc_msix_desc`, and
//! `PCI_ALLOC_MSI`); they count as functions.
//!
//! The armed injections are process-global, as the emulated kernel is: one module per process.

use super::log;
use std::ffi::c_int;
use std::sync::Mutex;

/// What a failing call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An errno, for an int-returning function.
    Errno(c_int),
    /// An ACPICA status (`ACPI_STATUS`), for an ACPICA function.
    Acpi(u32),
    /// NULL, for an allocator or constructor returning a pointer.
    Null,
}

impl Answer {
    /// The name the log and the CLI use: `ENOMEM`, `AE_NO_MEMORY`, `NULL` (a number when the
    /// value has no name here).
    pub fn name(self) -> String {
        match self {
            Answer::Errno(e) => ERRNOS.iter().find(|(_, v)| *v == e).map_or_else(|| format!("errno {e}"), |(n, _)| n.to_string()),
            Answer::Acpi(s) => ACPI_STATUSES.iter().find(|(_, v)| *v == s).map_or_else(|| format!("{s:#x}"), |(n, _)| n.to_string()),
            Answer::Null => "NULL".to_string(),
        }
    }
}

/// What kind of failure a function has, and which answers FreeBSD's can give.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Errno { default: c_int, allowed: &'static [c_int] },
    Acpi { default: u32, allowed: &'static [u32] },
    Null,
}

/// A function `--fail` accepts.
#[derive(Debug)]
pub struct Failable {
    pub name: &'static str,
    pub kind: Kind,
    /// Where FreeBSD fails it and what it leaves behind then (what the emulation does).
    pub leaves: &'static str,
}

// FreeBSD's errno values (sys/sys/errno.h), those the functions below return.
const ENOENT: c_int = 2;
const ENXIO: c_int = 6;
const ENOMEM: c_int = 12;
const EBUSY: c_int = 16;
const EEXIST: c_int = 17;
const ENODEV: c_int = 19;
const EINVAL: c_int = 22;
const EFBIG: c_int = 27;
const ENAMETOOLONG: c_int = 63;

/// Errno names the CLI accepts (a number is accepted too).
pub const ERRNOS: &[(&str, c_int)] = &[
    ("ENOENT", ENOENT),
    ("ENXIO", ENXIO),
    ("ENOMEM", ENOMEM),
    ("EBUSY", EBUSY),
    ("EEXIST", EEXIST),
    ("ENODEV", ENODEV),
    ("EINVAL", EINVAL),
    ("EFBIG", EFBIG),
    ("ENAMETOOLONG", ENAMETOOLONG),
];

// ACPICA's exception codes (acexcep.h).
const AE_ERROR: u32 = 0x0001;
const AE_NO_MEMORY: u32 = 0x0004;
const AE_NOT_EXIST: u32 = 0x0006;
const AE_ALREADY_EXISTS: u32 = 0x0007;
const AE_BAD_PARAMETER: u32 = 0x1001;

/// ACPICA status names the CLI accepts (a number is accepted too).
pub const ACPI_STATUSES: &[(&str, u32)] = &[
    ("AE_ERROR", AE_ERROR),
    ("AE_NO_MEMORY", AE_NO_MEMORY),
    ("AE_NOT_EXIST", AE_NOT_EXIST),
    ("AE_ALREADY_EXISTS", AE_ALREADY_EXISTS),
    ("AE_BAD_PARAMETER", AE_BAD_PARAMETER),
];

/// The functions `--fail` accepts.
pub const FAILABLE: &[Failable] = &[
    Failable {
        name: "make_dev_s",
        // The module passes MAKEDEV_CHECKNAME | MAKEDEV_WAITOK: ENOMEM needs MAKEDEV_NOWAIT.
        kind: Kind::Errno { default: EEXIST, allowed: &[EEXIST, EINVAL, ENAMETOOLONG] },
        leaves: "kern_conf.c make_dev_sv: a name refused under MAKEDEV_CHECKNAME (EEXIST, EINVAL, ENAMETOOLONG) is returned, no node, *cdev untouched; without MAKEDEV_CHECKNAME the kernel panics",
    },
    Failable {
        name: "bus_setup_intr",
        kind: Kind::Errno { default: EINVAL, allowed: &[EINVAL, ENOMEM, EBUSY, ENXIO, ENOENT] },
        leaves: "subr_bus.c bus_setup_intr, intr_event_add_handler, pci.c pci_setup_intr: the error, no handler, *cookiep untouched, an MSI-X vector still masked",
    },
    Failable {
        name: "bus_alloc_resource",
        kind: Kind::Null,
        leaves: "subr_bus.c bus_alloc_resource, rman: NULL, nothing allocated, *rid untouched",
    },
    Failable {
        name: "pci_alloc_msix",
        kind: Kind::Errno { default: ENXIO, allowed: &[ENXIO, ENODEV, EINVAL, ENOMEM] },
        leaves: "pci.c pci_alloc_msix_method: the error, MSI-X not enabled, no vector allocated, *count untouched",
    },
    Failable {
        name: "pci_alloc_msi",
        // pci.c pci_alloc_msi_method: EINVAL (count 0, not a power of two), ENXIO (rid 0 or
        // messages allocated, blacklisted, PCIB_ALLOC_MSI out of vectors), ENODEV (no capability).
        kind: Kind::Errno { default: ENXIO, allowed: &[ENXIO, ENODEV, EINVAL] },
        leaves: "pci.c pci_alloc_msi_method: the error, no message allocated, *count untouched",
    },
    Failable {
        name: "bus_teardown_intr",
        // sys/kern/subr_bus.c bus_teardown_intr (no parent), sys/dev/pci/pci.c pci_teardown_intr
        // (an inactive IRQ resource, an MSI/MSI-X rid with no handler counted) and
        // sys/kern/kern_intr.c intr_event_remove_handler (a NULL cookie) all answer EINVAL;
        // nothing on the path returns another errno.
        kind: Kind::Errno { default: EINVAL, allowed: &[EINVAL] },
        leaves: "subr_bus.c bus_teardown_intr, pci.c pci_teardown_intr: EINVAL before anything is removed: the handler stays installed and is still called, an MSI-X vector stays unmasked (INTx, an MSI message stay enabled), the handler count pci_release_msi checks stays as it was",
    },
    Failable {
        name: "bus_dma_tag_create",
        kind: Kind::Errno { default: ENOMEM, allowed: &[ENOMEM, EINVAL] },
        leaves: "busdma_machdep.c common_bus_dma_tag_create: *dmat set to NULL first, the error, no tag",
    },
    Failable {
        name: "bus_dmamap_load_bio",
        // busdma_bounce.c: EFBIG for more segments than the tag allows; ENOMEM for a
        // BUS_DMA_NOWAIT load that would need bounce pages not there (the module's loads are
        // NOWAIT, so no deferral, never EINPROGRESS).
        kind: Kind::Errno { default: EFBIG, allowed: &[EFBIG, ENOMEM] },
        leaves: "subr_bus_dma.c bus_dmamap_load_bio: the callback called with no segment and the error, the map not loaded; returns 0, or ENOMEM for ENOMEM",
    },
    Failable {
        name: "taskqueue_create",
        kind: Kind::Null,
        leaves: "subr_taskqueue.c _taskqueue_create: NULL (its malloc failed), no queue",
    },
    Failable {
        name: "taskqueue_start_threads",
        kind: Kind::Errno { default: ENOMEM, allowed: &[ENOMEM] },
        leaves: "subr_taskqueue.c _taskqueue_start_threads: prints `no memory for NAME threads`, ENOMEM, the queue stays with no thread (taskqueue_free frees it)",
    },
    Failable {
        name: "AcpiInstallNotifyHandler",
        kind: Kind::Acpi { default: AE_NO_MEMORY, allowed: &[AE_NO_MEMORY, AE_ALREADY_EXISTS, AE_BAD_PARAMETER] },
        leaves: "evxface.c AcpiInstallNotifyHandler: the status, the handler not installed",
    },
    Failable {
        name: "AcpiRemoveNotifyHandler",
        kind: Kind::Acpi { default: AE_NOT_EXIST, allowed: &[AE_NOT_EXIST, AE_BAD_PARAMETER, AE_ERROR] },
        leaves: "evxface.c AcpiRemoveNotifyHandler: the status, the handler still installed (and called)",
    },
    Failable {
        name: "malloc",
        kind: Kind::Null,
        leaves: "kern_malloc.c malloc: NULL for an M_NOWAIT call, nothing allocated (M_WAITOK calls never fail and are not counted)",
    },
    Failable {
        name: "malloc_aligned",
        kind: Kind::Null,
        leaves: "kern_malloc.c malloc_aligned: as malloc (M_NOWAIT calls only)",
    },
    Failable {
        name: "contigmalloc",
        kind: Kind::Null,
        leaves: "kern_malloc.c contigmalloc: NULL, nothing allocated (it may fail whatever the flags)",
    },
];

/// Functions the module imports that FreeBSD never fails, each with why: refused by the CLI.
pub const CANNOT_FAIL: &[(&str, &str)] = &[
    ("disk_alloc", "geom_disk.c disk_alloc is malloc(M_WAITOK | M_ZERO): it sleeps, never returns NULL"),
    ("disk_create", "geom_disk.c disk_create returns nothing: errors come later, on GEOM's event thread"),
    ("destroy_dev", "kern_conf.c destroy_dev returns nothing"),
    ("taskqueue_free", "subr_taskqueue.c taskqueue_free returns nothing"),
];

/// Functions FreeBSD can fail that the module does not import (so kldhost does not emulate
/// them), each with what the module uses instead: refused by the CLI.
pub const NOT_IMPORTED: &[(&str, &str)] = &[
    ("bus_dmamem_alloc", "its DMA memory (queues, PRP lists) is contigmalloc's: --fail contigmalloc"),
];

/// One `--fail` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    pub func: &'static str,
    /// The call that fails (1-based); None: every call.
    pub nth: Option<u64>,
    pub answer: Answer,
}

impl std::fmt::Display for Injection {
    /// The option's own spelling, `FUNC[:N]=ERR`, which [`parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.func)?;
        if let Some(n) = self.nth {
            write!(f, ":{n}")?;
        }
        match self.answer {
            Answer::Errno(e) => write!(f, "={e}"),
            Answer::Acpi(s) => write!(f, "={s:#x}"),
            Answer::Null => write!(f, "=NULL"),
        }
    }
}

fn failable_list() -> String {
    FAILABLE.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

fn parse_errno(s: &str) -> Option<c_int> {
    ERRNOS.iter().find(|(n, _)| *n == s).map(|(_, v)| *v).or_else(|| s.parse().ok())
}

fn parse_acpi(s: &str) -> Option<u32> {
    let n = ACPI_STATUSES.iter().find(|(n, _)| *n == s).map(|(_, v)| *v);
    n.or_else(|| s.strip_prefix("0x").map_or_else(|| s.parse().ok(), |h| u32::from_str_radix(h, 16).ok()))
}

/// Parses `FUNC[:N][=ERR]`. The error says what is wrong and, for a function that cannot
/// fail, which can.
pub fn parse(spec: &str) -> Result<Injection, String> {
    let (left, err) = match spec.split_once('=') {
        Some((l, e)) => (l, Some(e)),
        None => (spec, None),
    };
    let (name, nth) = match left.split_once(':') {
        Some((f, n)) => match n.parse::<u64>() {
            Ok(n) if n >= 1 => (f, Some(n)),
            _ => return Err(format!("{spec}: the call number N in FUNC:N must be 1 or more")),
        },
        None => (left, None),
    };
    let Some(f) = FAILABLE.iter().find(|f| f.name == name) else {
        let why = match (CANNOT_FAIL.iter().find(|(n, _)| *n == name), NOT_IMPORTED.iter().find(|(n, _)| *n == name)) {
            (Some((n, why)), _) => format!("{n} cannot fail in FreeBSD ({why})"),
            (None, Some((n, instead))) => format!("{n} is not called by nvme_hotplug.ko ({instead})"),
            (None, None) => format!("{name} is not a KPI function kldhost can fail"),
        };
        return Err(format!("{why}; functions that can: {}", failable_list()));
    };
    let answer = match (f.kind, err) {
        (Kind::Null, None | Some("NULL")) => Answer::Null,
        (Kind::Null, Some(e)) => return Err(format!("{name} returns a pointer: it fails with NULL, not {e}")),
        (Kind::Errno { default, .. }, None) => Answer::Errno(default),
        (Kind::Errno { allowed, .. }, Some(e)) => match parse_errno(e) {
            Some(v) if allowed.contains(&v) => Answer::Errno(v),
            _ => return Err(format!("{name} fails in FreeBSD with one of {}, not {e}", allowed.iter().map(|&v| Answer::Errno(v).name()).collect::<Vec<_>>().join(", "))),
        },
        (Kind::Acpi { default, .. }, None) => Answer::Acpi(default),
        (Kind::Acpi { allowed, .. }, Some(e)) => match parse_acpi(e) {
            Some(v) if allowed.contains(&v) => Answer::Acpi(v),
            _ => return Err(format!("{name} fails with one of {}, not {e}", allowed.iter().map(|&v| Answer::Acpi(v).name()).collect::<Vec<_>>().join(", "))),
        },
    };
    Ok(Injection { func: f.name, nth, answer })
}

/// The armed injections and each function's call count so far.
struct Armed {
    list: Vec<Injection>,
    calls: Vec<(&'static str, u64)>,
}

static ARMED: Mutex<Armed> = Mutex::new(Armed { list: Vec::new(), calls: Vec::new() });

/// Arms `list` for the rest of the process (replacing what was armed; counts start again).
pub fn arm(list: Vec<Injection>) {
    let mut a = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    a.list = list;
    a.calls.clear();
}

/// Counts a call of `func` and says whether it fails, and how (logged). Each emulated function
/// of [`FAILABLE`] calls it once per call that can fail, before it changes anything.
pub fn check(func: &'static str) -> Option<Answer> {
    let hit = {
        let mut a = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        if a.list.is_empty() {
            return None;
        }
        let n = match a.calls.iter_mut().find(|(f, _)| *f == func) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                a.calls.push((func, 1));
                1
            }
        };
        a.list.iter().find(|i| i.func == func && i.nth.is_none_or(|k| k == n)).map(|i| (i.answer, n))
    };
    let (answer, n) = hit?;
    log(format!("kldhost: injected {} into {func} (call {n})", answer.name()));
    Some(answer)
}

/// [`check`] for an int-returning function: the errno to return.
pub fn errno(func: &'static str) -> Option<c_int> {
    match check(func) {
        Some(Answer::Errno(e)) => Some(e),
        _ => None,
    }
}

/// [`check`] for an ACPICA function: the status to return.
pub fn acpi(func: &'static str) -> Option<u32> {
    match check(func) {
        Some(Answer::Acpi(s)) => Some(s),
        _ => None,
    }
}

/// [`check`] for a function returning a pointer: whether to return NULL.
pub fn null(func: &'static str) -> bool {
    check(func) == Some(Answer::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_function_call_number_and_error() {
        assert_eq!(parse("make_dev_s"), Ok(Injection { func: "make_dev_s", nth: None, answer: Answer::Errno(EEXIST) }));
        assert_eq!(parse("make_dev_s:2=EINVAL"), Ok(Injection { func: "make_dev_s", nth: Some(2), answer: Answer::Errno(EINVAL) }));
        assert_eq!(parse("bus_setup_intr=12"), Ok(Injection { func: "bus_setup_intr", nth: None, answer: Answer::Errno(ENOMEM) }));
        assert_eq!(parse("taskqueue_create:1"), Ok(Injection { func: "taskqueue_create", nth: Some(1), answer: Answer::Null }));
        assert_eq!(parse("AcpiInstallNotifyHandler:3=AE_ALREADY_EXISTS").map(|i| i.answer), Ok(Answer::Acpi(AE_ALREADY_EXISTS)));
        assert_eq!(parse("AcpiRemoveNotifyHandler=0x1001").map(|i| i.answer), Ok(Answer::Acpi(AE_BAD_PARAMETER)));
        assert_eq!(parse("bus_teardown_intr"), Ok(Injection { func: "bus_teardown_intr", nth: None, answer: Answer::Errno(EINVAL) }));
    }

    #[test]
    fn an_injection_spelled_back_parses_to_itself() {
        for spec in ["make_dev_s:2=EINVAL", "malloc:7", "AcpiRemoveNotifyHandler=AE_ERROR", "bus_setup_intr"] {
            let i = parse(spec).unwrap();
            assert_eq!(parse(&i.to_string()), Ok(i));
        }
    }

    #[test]
    fn refuses_what_freebsd_cannot_do() {
        let e = parse("disk_alloc").unwrap_err();
        assert!(e.contains("disk_alloc cannot fail") && e.contains("M_WAITOK") && e.contains("make_dev_s, bus_setup_intr"), "{e}");
        let e = parse("bus_dmamem_alloc").unwrap_err();
        assert!(e.contains("not called by nvme_hotplug.ko") && e.contains("--fail contigmalloc"), "{e}");
        let e = parse("no_such_function:1").unwrap_err();
        assert!(e.contains("not a KPI function") && e.contains("functions that can: "), "{e}");
        assert!(parse("make_dev_s=ENOMEM").unwrap_err().contains("EEXIST, EINVAL, ENAMETOOLONG"));
        assert!(parse("taskqueue_start_threads=EINVAL").is_err());
        assert!(parse("bus_teardown_intr=EBUSY").unwrap_err().contains("one of EINVAL, not EBUSY"));
        assert!(parse("malloc=ENOMEM").unwrap_err().contains("NULL"));
        assert!(parse("malloc:0").is_err());
        assert!(parse("AcpiInstallNotifyHandler=ENOMEM").is_err());
    }

    #[test]
    fn names_answers_as_freebsd_spells_them() {
        assert_eq!(Answer::Errno(ENOMEM).name(), "ENOMEM");
        assert_eq!(Answer::Errno(99).name(), "errno 99");
        assert_eq!(Answer::Acpi(AE_NO_MEMORY).name(), "AE_NO_MEMORY");
        assert_eq!(Answer::Null.name(), "NULL");
    }
}
