//! The host-side ledger of writes: what must be on the media at the end.
//!
//! Every write the lab issues stamps each logical block with a pattern derived from a unique
//! write stamp and the block's address (so a block written to the wrong LBA is caught too).
//! The ledger records, per logical block, which contents are acceptable:
//! - after a write *reported complete*: exactly that write's pattern;
//! - after a write that *failed* (e.g. the controller vanished): either the previous contents
//!   or the new ones — the device may have written some blocks before it went away.
//!
//! At the end of a run, [`Ledger::verify_images`] reads the raw image files directly from the
//! host (not through QEMU) and counts acked writes whose data is missing: `lost_writes`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Stamp of a never-written block (all zeros).
pub const ZERO_STAMP: u64 = 0;

/// The pattern of one logical block for `stamp` at `lba`: a 16-byte header (stamp, lba) then
/// pseudo-random words. Stamp 0 is all zeros (a fresh sparse image).
pub fn fill_block(stamp: u64, lba: u64, out: &mut [u8]) {
    if stamp == ZERO_STAMP {
        out.fill(0);
        return;
    }
    let mut x = stamp ^ lba.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let w = match i {
            0 => stamp,
            1 => lba,
            _ => splitmix64(&mut x),
        };
        let b = w.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// splitmix64: a tiny, well-known mixing PRNG (also the lab's seeded RNG).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What may be in one block.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Exactly this stamp (the last write to it was acknowledged, or it was never written).
    Exactly(u64),
    /// Any of these (a write to it failed or never completed).
    AnyOf(BTreeSet<u64>),
}

/// Per-image expected contents.
#[derive(Debug, Default)]
struct ImageLedger {
    lba_bytes: u32,
    blocks: BTreeMap<u64, Expect>,
}

/// The ledger for every image of the run.
///
/// It also hands out *reservations*: a request may only touch blocks no other request (of any
/// job) has in flight. Two jobs on one namespace, or a read racing a write of the same block,
/// would otherwise make the expected contents ambiguous.
#[derive(Debug, Default)]
pub struct Ledger {
    images: BTreeMap<PathBuf, ImageLedger>,
    reserved: BTreeMap<PathBuf, BTreeSet<u64>>,
    next_stamp: u64,
    acked_writes: u64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Ledger { next_stamp: 1, ..Default::default() }
    }

    /// Registers an image (fresh, all zeros) with its logical block size.
    pub fn add_image(&mut self, path: &Path, lba_bytes: u32) {
        self.images.insert(path.to_path_buf(), ImageLedger { lba_bytes, blocks: BTreeMap::new() });
    }

    /// Reserves blocks `lba..lba+n` of `image` for one request; false if any is in flight.
    pub fn try_reserve(&mut self, image: &Path, lba: u64, n: u64) -> bool {
        let set = self.reserved.entry(image.to_path_buf()).or_default();
        if set.range(lba..lba + n).next().is_some() {
            return false;
        }
        set.extend(lba..lba + n);
        true
    }

    /// Releases a reservation.
    pub fn release(&mut self, image: &Path, lba: u64, n: u64) {
        if let Some(set) = self.reserved.get_mut(image) {
            for b in lba..lba + n {
                set.remove(&b);
            }
        }
    }

    /// Blocks reserved right now (0 when nothing is in flight).
    pub fn reserved_blocks(&self) -> usize {
        self.reserved.values().map(|s| s.len()).sum()
    }

    /// A fresh write stamp.
    pub fn new_stamp(&mut self) -> u64 {
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }

    /// Write requests acknowledged so far.
    pub fn acked_writes(&self) -> u64 {
        self.acked_writes
    }

    /// If every block of `lba..lba+n` has one known content, that stamp per block.
    pub fn known(&self, image: &Path, lba: u64, n: u64) -> Option<Vec<u64>> {
        let img = self.images.get(image)?;
        (lba..lba + n)
            .map(|b| match img.blocks.get(&b) {
                None => Some(ZERO_STAMP),
                Some(Expect::Exactly(s)) => Some(*s),
                Some(Expect::AnyOf(_)) => None,
            })
            .collect()
    }

    /// Records a write reported complete.
    pub fn write_acked(&mut self, image: &Path, lba: u64, n: u64, stamp: u64) {
        self.acked_writes += 1;
        if let Some(img) = self.images.get_mut(image) {
            for b in lba..lba + n {
                img.blocks.insert(b, Expect::Exactly(stamp));
            }
        }
    }

    /// Records a write that failed or whose fate is unknown: old or new contents are both fine.
    pub fn write_uncertain(&mut self, image: &Path, lba: u64, n: u64, stamp: u64) {
        if let Some(img) = self.images.get_mut(image) {
            for b in lba..lba + n {
                let e = img.blocks.entry(b).or_insert(Expect::Exactly(ZERO_STAMP));
                let mut set = match e {
                    Expect::Exactly(s) => BTreeSet::from([*s]),
                    Expect::AnyOf(s) => std::mem::take(s),
                };
                set.insert(stamp);
                *e = Expect::AnyOf(set);
            }
        }
    }

    /// Some block that holds an acknowledged write: (image, byte offset, length). For fault
    /// injection in the lab's own tests.
    pub fn some_acked_block(&self) -> Option<(PathBuf, u64, usize)> {
        self.images.iter().find_map(|(path, img)| {
            img.blocks.iter().find_map(|(&lba, e)| match e {
                Expect::Exactly(s) if *s != ZERO_STAMP => {
                    Some((path.clone(), lba * img.lba_bytes as u64, img.lba_bytes as usize))
                }
                _ => None,
            })
        })
    }

    /// Reads every image from the host and returns the acked write stamps whose data is not
    /// there (each stamp counted once, however many of its blocks are wrong).
    pub fn verify_images(&self) -> io::Result<BTreeSet<u64>> {
        let mut lost = BTreeSet::new();
        for (path, img) in &self.images {
            let f = File::open(path)?;
            let mut buf = vec![0u8; img.lba_bytes as usize];
            let mut want = vec![0u8; img.lba_bytes as usize];
            for (&lba, e) in &img.blocks {
                let got = f.read_exact_at(&mut buf, lba * img.lba_bytes as u64);
                if got.is_err() {
                    buf.fill(0);
                }
                match e {
                    Expect::Exactly(s) => {
                        fill_block(*s, lba, &mut want);
                        if buf != want && *s != ZERO_STAMP {
                            lost.insert(*s);
                        }
                    }
                    Expect::AnyOf(set) => {
                        let ok = set.iter().any(|s| {
                            fill_block(*s, lba, &mut want);
                            buf == want
                        });
                        // Only acked stamps count as lost; an uncertain block that matches
                        // nothing is corruption and is reported the same way (by its newest
                        // acked candidate, if any).
                        if !ok {
                            if let Some(s) = set.iter().rev().find(|s| **s != ZERO_STAMP) {
                                lost.insert(*s);
                            }
                        }
                    }
                }
            }
        }
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reservations_exclude_overlaps() {
        let p = Path::new("/img");
        let mut l = Ledger::new();
        assert!(l.try_reserve(p, 8, 8));
        assert!(!l.try_reserve(p, 15, 1));
        assert!(!l.try_reserve(p, 0, 9));
        assert!(l.try_reserve(p, 0, 8));
        assert!(l.try_reserve(Path::new("/other"), 8, 8));
        l.release(p, 8, 8);
        assert!(l.try_reserve(p, 12, 2));
        assert_eq!(l.reserved_blocks(), 8 + 8 + 2);
    }

    #[test]
    fn patterns_differ_by_stamp_and_lba() {
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        fill_block(5, 10, &mut a);
        fill_block(5, 11, &mut b);
        assert_ne!(a, b);
        fill_block(6, 10, &mut b);
        assert_ne!(a, b);
        fill_block(ZERO_STAMP, 10, &mut b);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn detects_a_lost_write_and_accepts_uncertain_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![0u8; 4096]).unwrap();
        let mut l = Ledger::new();
        l.add_image(&p, 512);
        let s1 = l.new_stamp();
        let s2 = l.new_stamp();
        let s3 = l.new_stamp();
        // Block 0: acked and really written. Block 1: acked, never written (lost).
        // Block 2: uncertain, left at zero (fine).
        let mut blk = [0u8; 512];
        fill_block(s1, 0, &mut blk);
        f.write_all_at(&blk, 0).unwrap();
        l.write_acked(&p, 0, 1, s1);
        l.write_acked(&p, 1, 1, s2);
        l.write_uncertain(&p, 2, 1, s3);
        let lost = l.verify_images().unwrap();
        assert_eq!(lost, BTreeSet::from([s2]));
        assert_eq!(l.known(&p, 0, 2), Some(vec![s1, s2]));
        assert_eq!(l.known(&p, 2, 1), None);
    }
}
