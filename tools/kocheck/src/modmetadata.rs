//! Decoding `set_modmetadata_set`: the records that `DECLARE_MODULE`, `MODULE_VERSION` and
//! `MODULE_DEPEND` leave for the kernel linker (sys/sys/module.h).
//!
//! ```text
//! struct mod_metadata { int md_version; int md_type; const void *md_data; const char *md_cval; };
//! struct mod_depend   { int md_ver_minimum, md_ver_preferred, md_ver_maximum; };
//! struct mod_version  { int mv_version; };
//! typedef struct moduledata { const char *name; modeventhand_t evhand; void *priv; } moduledata_t;
//! ```
//! The kernel reads these before it runs a single instruction of the module: a dependency
//! range it cannot satisfy, or a record it cannot decode, makes `kldload` refuse the file.

use crate::ko::Ko;
use crate::pointers::{linker_set, pointer_at, read_cstr, read_i32, Pointee};

pub const SET: &str = "set_modmetadata_set";
pub const MDT_STRUCT_VERSION: i32 = 1;
pub const MDT_DEPEND: i32 = 1;
pub const MDT_MODULE: i32 = 2;
pub const MDT_VERSION: i32 = 3;
pub const MDT_PNP_INFO: i32 = 4;

// Field offsets of struct mod_metadata on LP64.
const MD_VERSION: u64 = 0;
const MD_TYPE: u64 = 4;
const MD_DATA: u64 = 8;
const MD_CVAL: u64 = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// `DECLARE_MODULE`: `cval` is the module name; `name` is `moduledata_t.name` when the
    /// data lies in this file.
    Module { cval: String, name: Option<String>, evhand: String },
    /// `MODULE_VERSION(cval, version)`.
    Version { cval: String, version: i32 },
    /// `MODULE_DEPEND(module, cval, min, pref, max)`.
    Depend { cval: String, min: i32, pref: i32, max: i32 },
    PnpInfo { cval: String },
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Record::Module { cval, name, evhand } => {
                write!(f, "module {cval} (moduledata {}, evhand {evhand})", name.as_deref().unwrap_or("?"))
            }
            Record::Version { cval, version } => write!(f, "version {cval}={version}"),
            Record::Depend { cval, min, pref, max } => write!(f, "depend {cval} {min}..{max} (pref {pref})"),
            Record::PnpInfo { cval } => write!(f, "pnpinfo {cval}"),
        }
    }
}

/// `None`: the file has no `set_modmetadata_set`. `Some(Err)`: it has one that does not decode.
pub fn decode(ko: &Ko) -> Option<Result<Vec<Record>, String>> {
    let entries = match linker_set(ko, SET)? {
        Ok(e) => e,
        Err(e) => return Some(Err(e)),
    };
    Some(entries.into_iter().map(|(sec, off)| decode_one(ko, sec, off)).collect())
}

fn string_at(ko: &Ko, sec: usize, off: u64) -> Result<String, String> {
    match pointer_at(ko, sec, off)? {
        Pointee::Defined { section, offset } => read_cstr(ko, section, offset),
        Pointee::Null => Err(format!("{}: NULL string", ko.describe(sec, off))),
        Pointee::Undefined(s) => Err(format!("{}: string lives outside the module ({s})", ko.describe(sec, off))),
    }
}

/// The struct a record's `md_data` points to; it must be in this file.
fn data_at(ko: &Ko, sec: usize, off: u64) -> Result<(usize, u64), String> {
    match pointer_at(ko, sec, off + MD_DATA)? {
        Pointee::Defined { section, offset } => Ok((section, offset)),
        Pointee::Null => Err(format!("{}: md_data is NULL", ko.describe(sec, off))),
        Pointee::Undefined(s) => Err(format!("{}: md_data outside the module ({s})", ko.describe(sec, off))),
    }
}

fn decode_one(ko: &Ko, sec: usize, off: u64) -> Result<Record, String> {
    let at = ko.describe(sec, off);
    let md_version = read_i32(ko, sec, off + MD_VERSION)?;
    if md_version != MDT_STRUCT_VERSION {
        return Err(format!("{at}: md_version {md_version}, kernel expects {MDT_STRUCT_VERSION}"));
    }
    let md_type = read_i32(ko, sec, off + MD_TYPE)?;
    let cval = string_at(ko, sec, off + MD_CVAL)?;
    match md_type {
        MDT_DEPEND => {
            let (ds, doff) = data_at(ko, sec, off)?;
            Ok(Record::Depend {
                cval,
                min: read_i32(ko, ds, doff)?,
                pref: read_i32(ko, ds, doff + 4)?,
                max: read_i32(ko, ds, doff + 8)?,
            })
        }
        MDT_VERSION => {
            let (ds, doff) = data_at(ko, sec, off)?;
            Ok(Record::Version { cval, version: read_i32(ko, ds, doff)? })
        }
        MDT_MODULE => {
            let (ds, doff) = data_at(ko, sec, off)?;
            let name = string_at(ko, ds, doff).ok();
            let evhand = match pointer_at(ko, ds, doff + 8)? {
                Pointee::Null => "NULL".to_string(),
                Pointee::Undefined(s) => format!("{s} (kernel)"),
                Pointee::Defined { section, offset } => ko.describe(section, offset),
            };
            Ok(Record::Module { cval, name, evhand })
        }
        MDT_PNP_INFO => Ok(Record::PnpInfo { cval }),
        other => Err(format!("{at}: unknown md_type {other}")),
    }
}
