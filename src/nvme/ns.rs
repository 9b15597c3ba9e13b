//! Namespaces: what the engine exposes per namespace, and what changed in a rescan.

use crate::fallible::{try_push, AllocError};
use alloc::vec::Vec;

/// An active, usable namespace (validated by [`identify::parse_namespace`]).
///
/// [`identify::parse_namespace`]: super::identify::parse_namespace
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// log2 of the block size.
    pub lba_shift: u32,
    /// Block size in bytes (512..=65536).
    pub lba_bytes: u32,
    /// Size in blocks (NSZE).
    pub blocks: u64,
    /// Size in bytes.
    pub capacity: u64,
}

/// The difference between two namespace scans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsChanges {
    /// NSIDs that appeared.
    pub added: Vec<u32>,
    /// NSIDs that disappeared (their nodes must be destroyed; their I/O will fail).
    pub removed: Vec<u32>,
    /// NSIDs whose size or block size changed.
    pub resized: Vec<u32>,
}

impl NsChanges {
    /// Compares two scans (both sorted by NSID); fails only when memory is short.
    pub fn between(old: &[Namespace], new: &[Namespace]) -> Result<NsChanges, AllocError> {
        let mut c = NsChanges::default();
        for n in new {
            match old.iter().find(|o| o.nsid == n.nsid) {
                None => try_push(&mut c.added, n.nsid)?,
                Some(o) if o != n => try_push(&mut c.resized, n.nsid)?,
                Some(_) => {}
            }
        }
        for o in old {
            if !new.iter().any(|n| n.nsid == o.nsid) {
                try_push(&mut c.removed, o.nsid)?;
            }
        }
        Ok(c)
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.resized.is_empty()
    }
}
