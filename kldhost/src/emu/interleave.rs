//! Chosen interleavings: `--in-sleep WMESG[:N]=ACTION` runs ACTION on another kernel thread
//! while the module sleeps for the N-th time (default: the first) with the wait message WMESG.
//!
//! A sleep is where the kernel runs other threads on the sleeper's CPU, and the point every
//! ordering rule of the module is about: a detach arriving while a shutdown or a rescan
//! sleeps, a notify arriving while a detach sleeps. The emulated kernel runs one thread at a
//! time, so the other thread's work is done inside the sleep, before it returns. As
//! pause(9) and msleep(9) do (sys/kern/kern_synch.c `_sleep`: DROP_GIANT before the switch,
//! PICKUP_GIANT after), the sleeper's Giant, which is the newbus topology lock
//! (bus_topo_lock), is released for the duration and taken back afterwards, so the other
//! thread can take it as devctl(8) or acpi_task would.
//!
//! A sleep may be counted only while a kldunload's module events run (`WMESG@unload[:N]`):
//! the N-th sleep on WMESG inside MOD_QUIESCE or MOD_UNLOAD (driver_module_handler's detaches
//! included), whatever sleeps on WMESG came before (a devctl detach's stop sleeps as often as
//! the controller takes, so a count from the start of the run would not be stable).
//!
//! Every action run says so in the call log (`kldhost: in sleep N on WMESG, another thread:
//! ...`), with its outcome, so a test can tell where it happened. The armed interleavings
//! are process-global, as the emulated kernel is.

use super::{log, with};
use crate::layouts;
use std::sync::Mutex;

/// What the other thread does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// devctl(8) detach of every attached PCI function (DEV_DETACH: device_detach under the
    /// topology lock).
    Detach,
    /// devctl(8) attach of each function newbus has in slot `slot` on pci0 (DEV_ATTACH,
    /// sys/kern/subr_bus.c devctl2_ioctl: EBUSY for an attached device, else
    /// device_probe_and_attach under the topology lock), e.g. one `devctl detach` left in the
    /// driver's devclass.
    Attach { slot: u8 },
    /// The firmware's `Notify(Sxx_, value)` on slot `slot`, dispatched from acpi_task to the
    /// handlers installed on it.
    Notify { slot: u8, value: u32 },
    /// The NVMe subsystem's other host attaches (`attach`) or detaches namespace `nsid` to or
    /// from the module's controller (`run --qemu --namespace`'s machine, [`super::ns_admin`]):
    /// QEMU's Namespace Attribute Changed notice for the controller follows.
    Namespace { op: super::ns_admin::NsOp, nsid: u32 },
    /// kldunload(8) of the module (linker_file_unload, not forced): MOD_QUIESCE to each of its
    /// modules, the first veto ending it, then MOD_UNLOAD. A refusal of one of them is the only
    /// right answer while one of the module's threads sleeps in its code: if MOD_UNLOAD agrees,
    /// the linker would free the text that thread returns into, which is a finding here
    /// (UnloadWithLiveCallbacks); the linker's part (SYSUNINITs, freeing the file) is then not
    /// carried out, though the module's own MOD_UNLOAD already ran.
    Kldunload,
}

impl std::fmt::Display for Action {
    /// The option's own spelling, which [`parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Detach => write!(f, "detach"),
            Action::Attach { slot } => write!(f, "attach:{slot}"),
            Action::Notify { slot, value } => write!(f, "notify:{slot}:{value}"),
            Action::Kldunload => write!(f, "kldunload"),
            Action::Namespace { op, nsid } => write!(f, "namespace:{}:{nsid}", op.name()),
        }
    }
}

/// One `--in-sleep` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InSleep {
    pub wmesg: String,
    /// Only sleeps inside a kldunload's module events are counted (`@unload`).
    pub in_unload: bool,
    /// The sleep (1-based, counting that wait message only) the action runs in.
    pub nth: u64,
    pub action: Action,
}

impl std::fmt::Display for InSleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}:{}={}", self.wmesg, if self.in_unload { "@unload" } else { "" }, self.nth, self.action)
    }
}

/// Parses `WMESG[@unload][:N]=ACTION` (ACTION: `detach`, `attach:SLOT`, `kldunload`,
/// `notify:SLOT:VALUE` with SLOT the PCI slot number and VALUE the notify value, decimal, or
/// `namespace:OP:NSID` with OP `attach`, `detach` or `reformat`).
pub fn parse(s: &str) -> Result<InSleep, String> {
    let usage = || format!("--in-sleep {s}: expected WMESG[@unload][:N]=detach, =attach:SLOT, =kldunload, =notify:SLOT:VALUE or =namespace:attach|detach|reformat:NSID");
    let (at, action) = s.split_once('=').ok_or_else(usage)?;
    let (wmesg, nth) = match at.split_once(':') {
        Some((w, n)) => (w, n.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(usage)?),
        None => (at, 1),
    };
    let (wmesg, in_unload) = match wmesg.split_once('@') {
        Some((w, "unload")) => (w, true),
        Some(_) => return Err(usage()),
        None => (wmesg, false),
    };
    // pause(9)'s wmesg is a short C string (WMESGLEN, 8 characters, in struct thread).
    if wmesg.is_empty() || wmesg.len() > 8 {
        return Err(format!("--in-sleep {s}: a wait message is 1 to 8 characters"));
    }
    let action = match action.split(':').collect::<Vec<_>>()[..] {
        ["detach"] => Action::Detach,
        ["attach", slot] => Action::Attach { slot: slot.parse::<u8>().ok().filter(|&s| s < 32).ok_or_else(usage)? },
        ["kldunload"] => Action::Kldunload,
        ["notify", slot, value] => {
            let slot = slot.parse::<u8>().ok().filter(|&s| s < 32).ok_or_else(usage)?;
            let value = value.parse::<u32>().map_err(|_| usage())?;
            Action::Notify { slot, value }
        }
        ["namespace", sel, nsid] => {
            let (op, nsid) = super::ns_admin::parse(&format!("{sel}:{nsid}")).map_err(|_| usage())?;
            Action::Namespace { op, nsid }
        }
        _ => return Err(usage()),
    };
    Ok(InSleep { wmesg: wmesg.to_string(), in_unload, nth, action })
}

struct Armed {
    what: InSleep,
    /// Sleeps on the wait message seen so far.
    seen: u64,
}

static ARMED: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

/// How many kldunloads are sending their module events now (the runner's, or one run by
/// [`Action::Kldunload`] inside a sleep).
static IN_UNLOAD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A kldunload's module events begin (`true`) or are over (`false`): sleeps meanwhile count
/// for `WMESG@unload`.
pub fn unload_events(begin: bool) {
    use std::sync::atomic::Ordering;
    if begin {
        IN_UNLOAD.fetch_add(1, Ordering::SeqCst);
    } else {
        IN_UNLOAD.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Arms `list` (replacing what was armed).
pub fn arm(list: Vec<InSleep>) {
    let mut a = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    *a = list.into_iter().map(|what| Armed { what, seen: 0 }).collect();
}

/// Called by every sleeping KPI with its wait message, after the sleep is logged: runs the
/// actions armed for this sleep.
pub fn at_sleep(wmesg: &str) {
    let unloading = IN_UNLOAD.load(std::sync::atomic::Ordering::SeqCst) > 0;
    let due: Vec<(u64, Action)> = {
        let mut a = ARMED.lock().unwrap_or_else(|e| e.into_inner());
        a.iter_mut()
            .filter(|x| x.what.wmesg == wmesg && (unloading || !x.what.in_unload))
            .filter_map(|x| {
                x.seen += 1;
                (x.seen == x.what.nth).then(|| (x.seen, x.what.action.clone()))
            })
            .collect()
    };
    for (n, action) in due {
        // The sleeper's Giant is dropped for the switch (kern_synch.c `_sleep`).
        let giant = with(|e| std::mem::replace(&mut e.topo_locked, false));
        run(n, wmesg, &action);
        with(|e| e.topo_locked = giant);
    }
}

fn run(n: u64, wmesg: &str, action: &Action) {
    let at = format!("kldhost: in sleep {n} on {wmesg}, another thread");
    match action {
        Action::Detach => {
            // A device still in DEVICE_ATTACH counts: devctl's detach reaches device_detach,
            // which refuses it ("device in attaching state").
            let attached: Vec<u64> = super::newbus::pci_functions().into_iter().filter(|&c| super::newbus::state(c) >= layouts::DS_ATTACHING).collect();
            if attached.is_empty() {
                log(format!("{at}: devctl detach: no attached function"));
            }
            for dev in attached {
                let name = super::newbus::nameunit(dev);
                log(format!("{at}: devctl detach {name}"));
                super::sched::topo_lock();
                let r = super::newbus::device_detach(dev);
                super::sched::topo_unlock();
                log(format!("{at}: devctl detach {name} = {r}"));
            }
        }
        Action::Attach { slot } => {
            let functions: Vec<u64> = (0..8).filter_map(|f| super::newbus::pci_child_at(*slot, f)).collect();
            if functions.is_empty() {
                log(format!("{at}: devctl attach: no function in slot {slot}"));
            }
            for dev in functions {
                let name = super::newbus::nameunit(dev);
                log(format!("{at}: devctl attach {name}"));
                super::sched::topo_lock();
                let r = if super::newbus::state(dev) >= layouts::DS_ATTACHED { layouts::EBUSY } else { super::newbus::probe_and_attach(dev) };
                super::sched::topo_unlock();
                log(format!("{at}: devctl attach {name} = {r}"));
            }
        }
        Action::Notify { slot, value } => {
            log(format!("{at}: acpi_task: Notify(slot {slot}, {value})"));
            let n = super::acpi::notify(*slot, *value);
            log(format!("{at}: the notify reached {n} handler(s)"));
        }
        Action::Kldunload => kldunload(&at),
        Action::Namespace { op, nsid } => {
            log(format!("{at}: the subsystem's other host: namespace {} {nsid}", op.name()));
            let r = super::ns_admin::run(*op, *nsid);
            let ok = r.is_ok();
            for l in r.unwrap_or_else(|l| l) {
                log(format!("  | {l}"));
            }
            log(format!("{at}: the Namespace Attachment {}", if ok { "completed" } else { "FAILED" }));
        }
    }
}

/// [`Action::Kldunload`]: the module events of an unload, stopping at the first refusal.
fn kldunload(at: &str) {
    let names: Vec<String> = with(|e| e.modules.iter().map(|m| m.name.clone()).collect());
    log(format!("{at}: kldunload"));
    unload_events(true);
    let agreed = unload_module_events(at, &names);
    unload_events(false);
    if !agreed {
        return;
    }
    super::rules::finding(
        super::rules::Rule::UnloadWithLiveCallbacks,
        &format!("{at}: kldunload: every module agreed to unload while the module's own thread sleeps in it (its text would be freed under that thread)"),
    );
}

/// MOD_QUIESCE then MOD_UNLOAD to each of `names`, stopping at the first refusal (logged);
/// whether every module agreed.
fn unload_module_events(at: &str, names: &[String]) -> bool {
    use super::kern::{event_name, mod_event};
    for what in [layouts::MOD_QUIESCE, layouts::MOD_UNLOAD] {
        for name in names {
            let r = mod_event(name, what as std::ffi::c_int).unwrap_or(0);
            let agreed = r == 0 || (what == layouts::MOD_QUIESCE && (r == layouts::EOPNOTSUPP || r == layouts::EINVAL));
            if !agreed {
                log(format!("{at}: kldunload: {name} refused {}: error {r}", event_name(what as std::ffi::c_int)));
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_round_trips_and_bad_spellings_are_refused() {
        for s in ["nvmehpsd:1=detach", "nvmehpst:3=notify:4:3", "nvmehpbu:2=kldunload", "nvmehpns:2=namespace:attach:2", "nvmehpst@unload:1=attach:4"] {
            assert_eq!(parse(s).map(|x| x.to_string()), Ok(s.to_string()));
        }
        assert_eq!(parse("nvmehpst=detach").map(|x| x.nth), Ok(1));
        assert_eq!(parse("nvmehpst@unload=detach").map(|x| (x.wmesg, x.in_unload, x.nth)), Ok(("nvmehpst".to_string(), true, 1)));
        for bad in ["nvmehpst", "=detach", "toolongwmesg=detach", "x:0=detach", "x=attach", "x=attach:32", "x@load=detach", "@unload=detach", "x=notify:40:1", "x=notify:4"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
