//! Module metadata rules: the module is declared under the expected name, carries a
//! `MODULE_VERSION` (other modules can depend on it), and declares the dependencies the
//! kernel must resolve before loading it, with a `kernel` range the target release satisfies.

use crate::modmetadata::{self, Record};
use crate::ko::Ko;
use crate::pointers::linker_set;
use crate::report::Verdict;
use std::str::FromStr;

/// A required `MODULE_DEPEND`: the name, and optionally the range the declared
/// `min..max` must lie inside (`kernel=1500000..1599999`: any FreeBSD 15).
#[derive(Clone, Debug, PartialEq)]
pub struct DependSpec {
    pub name: String,
    pub within: Option<(i32, i32)>,
}

impl FromStr for DependSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((name, range)) = s.split_once('=') else {
            return Ok(DependSpec { name: s.to_string(), within: None });
        };
        let (lo, hi) = range.split_once("..").ok_or_else(|| format!("{s}: expected NAME or NAME=MIN..MAX"))?;
        let parse = |v: &str| v.trim().parse::<i32>().map_err(|e| format!("{s}: {v}: {e}"));
        let (lo, hi) = (parse(lo)?, parse(hi.trim_start_matches('='))?);
        if name.is_empty() || lo > hi {
            return Err(format!("{s}: empty name or MIN > MAX"));
        }
        Ok(DependSpec { name: name.to_string(), within: Some((lo, hi)) })
    }
}

impl std::fmt::Display for DependSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.within {
            Some((lo, hi)) => write!(f, "{}={lo}..{hi}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

pub fn check(ko: &Ko, module: &str, depends: &[DependSpec]) -> Vec<Verdict> {
    let records = match modmetadata::decode(ko) {
        None => {
            let why = format!("no {} section (no DECLARE_MODULE/MODULE_* in the link?)", modmetadata::SET);
            return failed_all(why, module, depends);
        }
        Some(Err(e)) => return failed_all(format!("{} does not decode: {e}", modmetadata::SET), module, depends),
        Some(Ok(r)) => r,
    };
    let listing = records.iter().map(Record::to_string).collect::<Vec<_>>().join("; ");
    let mut out = vec![Verdict::pass("modmetadata", format!("{} records: {listing}", records.len()))];
    out.push(check_name(&records, module));
    out.push(check_version(&records, module));
    out.extend(depends.iter().map(|d| check_depend(&records, d)));
    out
}

fn failed_all(why: String, module: &str, depends: &[DependSpec]) -> Vec<Verdict> {
    let mut out = vec![Verdict::fail("modmetadata", why.clone())];
    out.push(Verdict::fail("module-name", format!("{module}: {why}")));
    out.push(Verdict::fail("module-version", format!("{module}: {why}")));
    out.extend(depends.iter().map(|d| Verdict::fail(format!("module-depend-{}", d.name), why.clone())));
    out
}

/// `DECLARE_MODULE(name, ...)` records `name` as `md_cval`; `DRIVER_MODULE(name, bus, ...)`
/// declares `name_bus` whose moduledata is named `bus/name`. Either is the module.
fn check_name(records: &[Record], module: &str) -> Verdict {
    let modules: Vec<_> = records.iter().filter(|r| matches!(r, Record::Module { .. })).collect();
    let hit = modules.iter().find(|r| match r {
        Record::Module { cval, name, .. } => {
            cval == module
                || name.as_deref() == Some(module)
                || name.as_deref().is_some_and(|n| n.rsplit_once('/').is_some_and(|(_, m)| m == module))
        }
        _ => false,
    });
    match hit {
        Some(r) => Verdict::pass("module-name", r.to_string()),
        None => Verdict::fail(
            "module-name",
            format!("no module {module}; declared: [{}]", modules.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")),
        ),
    }
}

fn check_version(records: &[Record], module: &str) -> Verdict {
    let hit = records.iter().find_map(|r| match r {
        Record::Version { cval, version } if cval == module => Some(*version),
        _ => None,
    });
    match hit {
        Some(v) if v >= 1 => Verdict::pass("module-version", format!("MODULE_VERSION({module}, {v})")),
        Some(v) => Verdict::fail("module-version", format!("MODULE_VERSION({module}, {v}): version must be >= 1")),
        None => Verdict::fail("module-version", format!("no MODULE_VERSION({module}, ...)")),
    }
}

fn check_depend(records: &[Record], spec: &DependSpec) -> Verdict {
    let rule = format!("module-depend-{}", spec.name);
    let found = records.iter().find_map(|r| match r {
        Record::Depend { cval, min, pref, max } if *cval == spec.name => Some((*min, *pref, *max)),
        _ => None,
    });
    let Some((min, pref, max)) = found else {
        return Verdict::fail(rule, format!("no MODULE_DEPEND on {}", spec.name));
    };
    let declared = format!("MODULE_DEPEND {} {min}..{max} (pref {pref})", spec.name);
    if !(min <= pref && pref <= max) {
        return Verdict::fail(rule, format!("{declared}: need min <= preferred <= max"));
    }
    match spec.within {
        Some((lo, hi)) if min < lo || max > hi => {
            Verdict::fail(rule, format!("{declared}: range must lie inside {lo}..{hi}"))
        }
        _ => Verdict::pass(rule, declared),
    }
}

/// `SYSINIT`s are how `DECLARE_MODULE` gets its event handler called at load; a module
/// without any never runs.
pub fn check_sysinit(ko: &Ko) -> Verdict {
    match linker_set(ko, "set_sysinit_set") {
        None => Verdict::fail("sysinit-set", "no set_sysinit_set section: nothing would run at load"),
        Some(Err(e)) => Verdict::fail("sysinit-set", format!("set_sysinit_set does not decode: {e}")),
        Some(Ok(v)) if v.is_empty() => Verdict::fail("sysinit-set", "set_sysinit_set is empty"),
        Some(Ok(v)) => Verdict::pass("sysinit-set", format!("set_sysinit_set: {} entries, all resolved", v.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depend_spec_parses() {
        assert_eq!("pci".parse(), Ok(DependSpec { name: "pci".into(), within: None }));
        assert_eq!(
            "kernel=1500000..1599999".parse(),
            Ok(DependSpec { name: "kernel".into(), within: Some((1_500_000, 1_599_999)) })
        );
        assert!("kernel=2..1".parse::<DependSpec>().is_err());
        assert!("kernel=x..1".parse::<DependSpec>().is_err());
    }

    fn dep(cval: &str, min: i32, pref: i32, max: i32) -> Record {
        Record::Depend { cval: cval.into(), min, pref, max }
    }

    #[test]
    fn depend_range_must_lie_inside() {
        let spec: DependSpec = "kernel=1500000..1599999".parse().unwrap();
        assert!(check_depend(&[dep("kernel", 1_500_068, 1_500_068, 1_599_999)], &spec).pass);
        assert!(!check_depend(&[dep("kernel", 1_400_000, 1_400_000, 1_499_999)], &spec).pass);
        assert!(!check_depend(&[dep("kernel", 1_500_000, 1_500_000, 1_699_999)], &spec).pass);
        assert!(!check_depend(&[dep("kernel", 1_500_010, 1_500_000, 1_500_020)], &spec).pass);
        assert!(!check_depend(&[dep("pci", 1, 1, 1)], &spec).pass);
    }

    #[test]
    fn driver_module_name_counts() {
        let m = Record::Module { cval: "nvme_hotplug_pci".into(), name: Some("pci/nvme_hotplug".into()), evhand: "x".into() };
        assert!(check_name(std::slice::from_ref(&m), "nvme_hotplug").pass);
        assert!(!check_name(&[m], "nvme").pass);
    }
}
