//! Reading a loaded module: its memory, its symbols, and its linker sets decoded with the
//! bindgen'd FreeBSD 15 layouts.
//!
//! A linker set is a section `set_<name>` holding an array of pointers; link_elf_lookup_set
//! (sys/kern/link_elf_obj.c) returns the loaded section's start and end, and the kernel linker
//! (sys/kern/kern_linker.c) walks it: `modmetadata_set` (linker_file_register_modules,
//! linker_load_dependencies), `sysctl_set` (linker_file_register_sysctls), `sysinit_set`
//! (linker_file_sysinit) and `sysuninit_set` (linker_file_sysuninit).

use crate::error::LoadError;
use crate::layouts;
use crate::link::LoadedKo;
use object::elf;

impl LoadedKo {
    /// Where the mapping (module, then its imports) starts.
    pub fn base(&self) -> u64 {
        self.map.addr()
    }

    /// `len` bytes at `addr`, which must lie inside the mapping: every pointer read out of the
    /// module is checked before it is followed.
    pub fn read_bytes(&self, addr: u64, len: u64) -> Result<&[u8], LoadError> {
        if !self.map.contains(addr, len) {
            return Err(LoadError::Bad(format!("{len} bytes at {addr:#x} lie outside the loaded module")));
        }
        let off = (addr - self.map.addr()) as usize;
        Ok(&self.map.bytes()[off..off + len as usize])
    }

    /// A `T` (a plain C struct from [`layouts`]) at `addr`.
    pub fn read<T: Copy>(&self, addr: u64) -> Result<T, LoadError> {
        let b = self.read_bytes(addr, std::mem::size_of::<T>() as u64)?;
        // SAFETY: b is exactly size_of::<T>() readable bytes; T is a bindgen'd C struct of
        // integers, raw pointers and Option<fn>, for which the relocated bytes are valid values
        // (a null function pointer is None); read_unaligned has no alignment requirement.
        Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, LoadError> {
        self.read::<u64>(addr)
    }

    /// A NUL-terminated string at `addr` (at most 4 KiB).
    pub fn read_cstr(&self, addr: u64) -> Result<String, LoadError> {
        if addr == 0 {
            return Err(LoadError::Bad("NULL string pointer".into()));
        }
        let avail = (self.map.addr() + self.map.len() as u64).saturating_sub(addr).min(4096);
        let b = self.read_bytes(addr, avail)?;
        let end = b.iter().position(|&c| c == 0).ok_or_else(|| LoadError::Bad(format!("string at {addr:#x} is not NUL-terminated")))?;
        String::from_utf8(b[..end].to_vec()).map_err(|_| LoadError::Bad(format!("string at {addr:#x} is not UTF-8")))
    }

    /// The address of a symbol the module defines.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.elf
            .symbols
            .iter()
            .zip(&self.symvals)
            .find(|(s, v)| s.name == name && s.shndx != elf::SHN_UNDEF.0 && v.is_some())
            .and_then(|(_, v)| *v)
    }

    /// The import resolved for `name`, if the module imports it.
    pub fn import(&self, name: &str) -> Option<u64> {
        self.imports.iter().find(|i| i.name == name).map(|i| i.addr)
    }

    /// `symbol+0xoff` for an address inside the module, or the import at that address.
    pub fn describe(&self, addr: u64) -> String {
        if let Some(i) = self.imports.iter().find(|i| i.addr == addr) {
            return format!("{} ({})", i.name, i.kind);
        }
        let best = self
            .elf
            .symbols
            .iter()
            .zip(&self.symvals)
            .filter(|(s, v)| {
                !s.name.is_empty()
                    && s.shndx != elf::SHN_UNDEF.0
                    && (s.kind == elf::STT_FUNC.0 || s.kind == elf::STT_OBJECT.0)
                    && v.is_some_and(|v| v <= addr)
            })
            .max_by_key(|(_, v)| *v);
        match best {
            Some((s, Some(v))) if *v == addr => s.name.clone(),
            Some((s, Some(v))) => format!("{}+{:#x}", s.name, addr - v),
            _ => format!("{addr:#x}"),
        }
    }

    /// link_elf_lookup_set: the start and end of the loaded section `set_<name>`.
    pub fn lookup_set(&self, name: &str) -> Option<(u64, u64)> {
        self.progtab
            .iter()
            .find(|p| p.name.strip_prefix("set_") == Some(name))
            .map(|p| (p.addr, p.addr + p.size))
    }

    /// The pointers in linker set `name`; empty when the module has no such set.
    pub fn set_entries(&self, name: &str) -> Result<Vec<u64>, LoadError> {
        let Some((start, stop)) = self.lookup_set(name) else { return Ok(Vec::new()) };
        if (stop - start) % 8 != 0 {
            return Err(LoadError::Bad(format!("set_{name}: size {} is not a whole number of pointers", stop - start)));
        }
        (start..stop).step_by(8).map(|a| self.read_u64(a)).collect()
    }
}

/// One record of `set_modmetadata_set` (sys/sys/module.h).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModRecord {
    /// DECLARE_MODULE: the moduledata_t at `data` (name, event handler, its argument).
    Module { cval: String, data: u64, name: String, evhand: u64, priv_: u64 },
    /// MODULE_VERSION.
    Version { cval: String, version: i32 },
    /// MODULE_DEPEND: the module needs `cval` with a version in min..=max.
    Depend { cval: String, min: i32, pref: i32, max: i32 },
    /// MODULE_PNP_INFO.
    PnpInfo { cval: String },
}

/// Decodes `set_modmetadata_set`. md_version must be MDT_STRUCT_VERSION: a record of another
/// layout version would be read with the wrong layout (a kldhost check; the kernel linker
/// functions named above dispatch on md_type alone).
pub fn modmetadata(ko: &LoadedKo) -> Result<Vec<ModRecord>, LoadError> {
    let mut out = Vec::new();
    for p in ko.set_entries("modmetadata_set")? {
        let md: layouts::mod_metadata = ko.read(p)?;
        if md.md_version != layouts::MDT_STRUCT_VERSION {
            return Err(LoadError::Bad(format!(
                "mod_metadata at {}: md_version {}, expected MDT_STRUCT_VERSION {}",
                ko.describe(p),
                md.md_version,
                layouts::MDT_STRUCT_VERSION
            )));
        }
        let cval = ko.read_cstr(md.md_cval as u64)?;
        let data = md.md_data as u64;
        out.push(match md.md_type {
            layouts::MDT_MODULE => {
                let m: layouts::moduledata = ko.read(data)?;
                ModRecord::Module {
                    cval,
                    data,
                    name: ko.read_cstr(m.name as u64)?,
                    evhand: m.evhand.map_or(0, |f| f as usize as u64),
                    priv_: m.priv_ as u64,
                }
            }
            layouts::MDT_VERSION => {
                let v: layouts::mod_version = ko.read(data)?;
                ModRecord::Version { cval, version: v.mv_version }
            }
            layouts::MDT_DEPEND => {
                let d: layouts::mod_depend = ko.read(data)?;
                ModRecord::Depend { cval, min: d.md_ver_minimum, pref: d.md_ver_preferred, max: d.md_ver_maximum }
            }
            layouts::MDT_PNP_INFO => ModRecord::PnpInfo { cval },
            t => return Err(LoadError::Bad(format!("mod_metadata at {}: unknown md_type {t}", ko.describe(p)))),
        });
    }
    Ok(out)
}

/// One `struct sysinit` of `set_sysinit_set` or `set_sysuninit_set`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysinit {
    /// Address of the struct itself.
    pub at: u64,
    pub subsystem: u32,
    pub order: u32,
    pub func: u64,
    pub udata: u64,
}

fn read_sysinits(ko: &LoadedKo, set: &str) -> Result<Vec<Sysinit>, LoadError> {
    ko.set_entries(set)?
        .into_iter()
        .map(|p| {
            let s: layouts::sysinit = ko.read(p)?;
            Ok(Sysinit {
                at: p,
                subsystem: s.subsystem,
                order: s.order,
                func: s.func.map_or(0, |f| f as usize as u64),
                udata: s.udata as u64,
            })
        })
        .collect()
}

/// The exchange sort linker_file_sysinit and linker_file_sysuninit (sys/kern/kern_linker.c,
/// read at freebsd-src commit 2e696f27, an older version) run over the set in place: element i
/// is swapped with every later element j that must come before it. With `reverse`, the
/// sysuninit order (subsystem, then order, both descending). The same algorithm, not merely
/// the same keys, so ties come out as that sort leaves them; whether FreeBSD 15 orders ties the
/// same way is not verified (nvme_hotplug.ko has no ties).
fn exchange_sort(v: &mut [Sysinit], reverse: bool) {
    for i in 0..v.len() {
        for j in i + 1..v.len() {
            let (a, b) = (&v[i], &v[j]);
            let in_order = if reverse {
                a.subsystem > b.subsystem || (a.subsystem == b.subsystem && a.order >= b.order)
            } else {
                a.subsystem < b.subsystem || (a.subsystem == b.subsystem && a.order <= b.order)
            };
            if !in_order {
                v.swap(i, j);
            }
        }
    }
}

/// `set_sysinit_set` in the order linker_file_sysinit runs it (SI_SUB_DUMMY entries included:
/// the caller skips them, as the kernel does).
pub fn sysinits(ko: &LoadedKo) -> Result<Vec<Sysinit>, LoadError> {
    let mut v = read_sysinits(ko, "sysinit_set")?;
    exchange_sort(&mut v, false);
    Ok(v)
}

/// `set_sysuninit_set` in the order linker_file_sysuninit runs it.
pub fn sysuninits(ko: &LoadedKo) -> Result<Vec<Sysinit>, LoadError> {
    let mut v = read_sysinits(ko, "sysuninit_set")?;
    exchange_sort(&mut v, true);
    Ok(v)
}

/// One `struct sysctl_oid` of `set_sysctl_set`, with its path resolved through its parents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlOid {
    pub at: u64,
    /// e.g. `hw.nvme_hotplug.claim`.
    pub path: String,
    pub kind: u32,
    pub number: i32,
    pub descr: String,
}

impl SysctlOid {
    pub fn ctl_type(&self) -> u32 {
        self.kind & layouts::CTLTYPE as u32
    }
}

/// Decodes `set_sysctl_set`. A parent is either a node of this set (its `oid_children` list)
/// or one of the kernel's root nodes the module imports (`sysctl___hw` is `hw`).
pub fn sysctls(ko: &LoadedKo) -> Result<Vec<SysctlOid>, LoadError> {
    let children_off = std::mem::offset_of!(layouts::sysctl_oid, oid_children) as u64;
    let mut raw = Vec::new();
    for p in ko.set_entries("sysctl_set")? {
        let o: layouts::sysctl_oid = ko.read(p)?;
        let descr = if o.oid_descr.is_null() { String::new() } else { ko.read_cstr(o.oid_descr as u64)? };
        raw.push((p, o.oid_parent as u64, ko.read_cstr(o.oid_name as u64)?, o.oid_kind, o.oid_number, descr));
    }
    let path_of = |mut parent: u64, name: &str| -> Result<String, LoadError> {
        let mut parts = vec![name.to_string()];
        for _ in 0..16 {
            if let Some(i) = ko.imports.iter().find(|i| i.addr + children_off == parent) {
                let root = i.name.strip_prefix("sysctl___").unwrap_or(&i.name);
                parts.push(root.replace("___", "."));
                parts.reverse();
                return Ok(parts.join("."));
            }
            let Some((_, pp, n, ..)) = raw.iter().find(|(at, ..)| at + children_off == parent) else {
                return Err(LoadError::Bad(format!("sysctl {name}: parent list {parent:#x} is neither an imported root nor a node of the set")));
            };
            parts.push(n.clone());
            parent = *pp;
        }
        Err(LoadError::Bad(format!("sysctl {name}: parent chain too deep")))
    };
    raw.iter()
        .map(|(at, parent, name, kind, number, descr)| {
            Ok(SysctlOid { at: *at, path: path_of(*parent, name)?, kind: *kind, number: *number, descr: descr.clone() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{exchange_sort, Sysinit};

    fn si(at: u64, subsystem: u32, order: u32) -> Sysinit {
        Sysinit { at, subsystem, order, func: 0, udata: 0 }
    }

    #[test]
    fn sysinits_sort_by_subsystem_then_order_and_sysuninits_the_reverse() {
        let mut v = vec![si(1, 3, 1), si(2, 1, 9), si(3, 3, 0), si(4, 2, 5)];
        exchange_sort(&mut v, false);
        assert_eq!(v.iter().map(|s| s.at).collect::<Vec<_>>(), [2, 4, 3, 1]);
        exchange_sort(&mut v, true);
        assert_eq!(v.iter().map(|s| s.at).collect::<Vec<_>>(), [1, 3, 4, 2]);
    }

    #[test]
    fn equal_keys_keep_the_order_the_kernels_exchange_sort_gives_them() {
        // Entries 1 and 2 tie; swapping 3 (lower subsystem) to the front moves 1 behind 2:
        // a stable sort would give [3, 1, 2].
        let mut v = vec![si(1, 5, 0), si(2, 5, 0), si(3, 4, 0)];
        exchange_sort(&mut v, false);
        assert_eq!(v.iter().map(|s| s.at).collect::<Vec<_>>(), [3, 2, 1]);
    }
}
