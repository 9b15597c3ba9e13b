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
    /// The globally unique ID the controller reports, if any.
    pub uid: NsUid,
}

/// A namespace's globally unique identifier from Identify Namespace: NGUID (bytes 104..120)
/// when the controller fills it, else EUI64 (bytes 120..128); both all-zero means none (NVMe
/// 1.4 §7.11: a controller may report neither). nvd(4) answers GEOM's `GEOM::lunid` with the
/// same choice (nvd_getattr), so a volume shows one lunid (`geom disk list`) whichever driver
/// serves it. The NSID alone does not name a namespace: another host may delete one and
/// create another under the same ID, which only a changed ID reveals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsUid {
    /// Neither field is set.
    None,
    /// Namespace Globally Unique Identifier.
    Nguid([u8; 16]),
    /// IEEE Extended Unique Identifier.
    Eui64([u8; 8]),
}

/// Longest [`NsUid::hex`]: two digits per NGUID byte.
pub const NS_UID_HEX_MAX: usize = 32;

impl NsUid {
    /// From the two Identify Namespace fields, NGUID first.
    pub fn from_fields(nguid: [u8; 16], eui64: [u8; 8]) -> NsUid {
        if nguid != [0; 16] {
            NsUid::Nguid(nguid)
        } else if eui64 != [0; 8] {
            NsUid::Eui64(eui64)
        } else {
            NsUid::None
        }
    }

    /// The ID as lowercase hex digits, bytes in the order the controller reports them (as
    /// nvd_getattr prints them), written to `out`; `None` when there is no ID.
    pub fn hex<'a>(&self, out: &'a mut [u8; NS_UID_HEX_MAX]) -> Option<&'a [u8]> {
        let bytes: &[u8] = match self {
            NsUid::None => return None,
            NsUid::Nguid(b) => b,
            NsUid::Eui64(b) => b,
        };
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        Some(&out[..bytes.len() * 2])
    }
}

/// The difference between two namespace scans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsChanges {
    /// NSIDs that appeared.
    pub added: Vec<u32>,
    /// NSIDs that disappeared (their nodes must be destroyed; their I/O will fail).
    pub removed: Vec<u32>,
    /// NSIDs that now name another namespace: its size, block size or unique ID changed
    /// (formatted, resized, or deleted and re-created by another host).
    pub replaced: Vec<u32>,
}

impl NsChanges {
    /// Compares two scans (both sorted by NSID); fails only when memory is short.
    pub fn between(old: &[Namespace], new: &[Namespace]) -> Result<NsChanges, AllocError> {
        let mut c = NsChanges::default();
        for n in new {
            match old.iter().find(|o| o.nsid == n.nsid) {
                None => try_push(&mut c.added, n.nsid)?,
                Some(o) if o != n => try_push(&mut c.replaced, n.nsid)?,
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
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(nsid: u32, blocks: u64, uid: NsUid) -> Namespace {
        Namespace { nsid, lba_shift: 9, lba_bytes: 512, blocks, capacity: blocks * 512, uid }
    }

    /// The same NSID with the same geometry but another unique ID is another namespace (deleted
    /// and re-created by another host): replaced, like a resized one. Fails when the diff
    /// compares the geometry only.
    #[test]
    fn a_new_unique_id_under_the_same_nsid_is_a_replacement() {
        let a = NsUid::Nguid([1; 16]);
        let b = NsUid::Nguid([2; 16]);
        let old = [ns(1, 100, a), ns(2, 100, NsUid::None), ns(3, 100, a)];
        let new = [ns(1, 100, b), ns(2, 200, NsUid::None), ns(4, 100, NsUid::Eui64([9; 8]))];
        let c = NsChanges::between(&old, &new).unwrap();
        assert_eq!(c, NsChanges { added: alloc::vec![4], removed: alloc::vec![3], replaced: alloc::vec![1, 2] });
        assert!(NsChanges::between(&new, &new).unwrap().is_empty());
    }
}
