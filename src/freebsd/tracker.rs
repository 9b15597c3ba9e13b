//! The per-controller trackers: a fixed table, sized at attach, of what a bio in flight needs
//! (its busdma map, the bio itself), so the I/O path allocates nothing.
//!
//! As in nvme(4) (sys/dev/nvme/nvme_qpair.c, `nvme_qpair_construct`: one tracker and one
//! `bus_dmamap_create` each, at construction), every tracker gets its map at attach. A tracker
//! is taken by `d_strategy` under the controller mutex, its map loaded with the bio, and given
//! back when the request completes. When none is free the bio waits in the controller's
//! [`BioQueue`](super::bio::BioQueue) instead of failing.
//!
//! **A tracker whose request was failed by hand** (the engine gave the controller up) is
//! *parked*: the device may still be running and DMA into the bio's pages (a read) or from
//! them (a write), so neither the map is unloaded nor the bio completed until the stop's
//! outcome is known ([`Trackers::release_parked`]). If the device stopped, the bio fails with
//! its errno. If it could not be stopped (a present controller that ignored CC.SHN and
//! CC.EN = 0), the bio is *held*: never completed, its map never unloaded, the tracker never
//! reused. Completing it would give its pages back to their owner (the buffer cache, a user
//! process through physio) while the device may still write them: memory corruption. Holding it
//! leaves that consumer waiting for ever (and GEOM never calls `d_gone` while the consumer keeps
//! the provider open, so kldunload is refused), which is the honest result of a device that
//! cannot be stopped. They are counted in `hw.nvme_hotplug.leaked_buffers`. A request without
//! data (a flush) lent the device no pages and is failed either way.

use super::bindings;
use super::bio::Bio;
use super::busdma::{Dir, DmaMap, DmaTag};
use super::device::Device;
use crate::fallible::push_within_capacity;
use crate::nvme::DmaSeg;
use alloc::vec::Vec;
use core::ffi::c_int;

/// One slot.
struct Tracker {
    map: DmaMap,
    bio: Option<Bio>,
    /// The errno a parked request fails with once the device is known to be stopped.
    errno: c_int,
    /// Held for ever (counted once): the device could not be stopped.
    held: bool,
}

/// Every tracker of one controller, with the payload tag their maps belong to.
pub struct Trackers {
    /// `None` only after a teardown that had to leak it (maps still loaded).
    tag: Option<DmaTag>,
    slots: Vec<Tracker>,
    free: Vec<u32>,
    /// Failed by hand; waiting for the stop's outcome.
    parked: Vec<u32>,
}

impl Trackers {
    /// `count` trackers for transfers of at most `max_bytes`, each with its map. Attach only
    /// (sleeps, allocates). The errno of the failing busdma call, or ENOMEM.
    pub fn create(dev: Device, count: usize, max_bytes: u32) -> Result<Trackers, c_int> {
        let tag = DmaTag::for_payload(dev, max_bytes)?;
        let mut t = Trackers { tag: None, slots: Vec::new(), free: Vec::new(), parked: Vec::new() };
        t.slots.try_reserve_exact(count).map_err(|_| bindings::ENOMEM)?;
        t.free.try_reserve_exact(count).map_err(|_| bindings::ENOMEM)?;
        t.parked.try_reserve_exact(count).map_err(|_| bindings::ENOMEM)?;
        for _ in 0..count {
            match tag.create_map() {
                // Within the capacity reserved above.
                Ok(map) => drop(push_within_capacity(&mut t.slots, Tracker { map, bio: None, errno: 0, held: false })),
                Err(e) => {
                    t.destroy_maps(&tag);
                    return Err(e);
                }
            }
        }
        for i in (0..count as u32).rev() {
            let _ = push_within_capacity(&mut t.free, i);
        }
        t.tag = Some(tag);
        Ok(t)
    }

    /// True when a tracker is free.
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Takes a free tracker.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives back tracker `t`, unused (its bio was never submitted): unloads its map.
    pub fn give_back(&mut self, t: u32) {
        let (Some(tag), Some(s)) = (self.tag.as_ref(), self.slots.get_mut(t as usize)) else { return };
        s.map.unload(tag);
        let _ = push_within_capacity(&mut self.free, t); // sized at creation
    }

    /// Loads `bio`'s data into tracker `t`'s map (`BUS_DMA_NOWAIT`, PRE sync): the segments to
    /// hand the engine. The errno of the load on failure.
    pub fn load(&mut self, t: u32, bio: &Bio, dir: Dir) -> Result<&[DmaSeg], c_int> {
        let (Some(tag), Some(s)) = (self.tag.as_ref(), self.slots.get_mut(t as usize)) else {
            return Err(bindings::ENXIO);
        };
        s.map.load_bio(tag, bio, dir)
    }

    /// Tracker `t` now carries `bio` (the engine accepted the request).
    pub fn attach(&mut self, t: u32, bio: Bio) -> Result<(), Bio> {
        match self.slots.get_mut(t as usize) {
            Some(s) if s.bio.is_none() => {
                s.bio = Some(bio);
                Ok(())
            }
            _ => Err(bio),
        }
    }

    /// The device completed tracker `t`'s request (its completion entry came after its last
    /// access to the pages): POST sync, unload, and the bio, which the caller completes. The
    /// tracker is free again. `None` for a tag that carries no bio.
    pub fn complete(&mut self, t: u32) -> Option<Bio> {
        let tag = self.tag.as_ref()?;
        let s = self.slots.get_mut(t as usize)?;
        let bio = s.bio.take()?;
        s.held = false;
        s.map.unload(tag);
        let _ = push_within_capacity(&mut self.free, t); // sized at creation
        Some(bio)
    }

    /// Tracker `t`'s request completed with an error during an engine call: whether the
    /// device may still touch its pages is known only after the call (see the module
    /// documentation). Returns false for a tag that carries no bio.
    pub fn park(&mut self, t: u32, errno: c_int) -> bool {
        let Some(s) = self.slots.get_mut(t as usize).filter(|s| s.bio.is_some()) else { return false };
        s.errno = errno;
        let _ = push_within_capacity(&mut self.parked, t); // sized at creation
        true
    }

    /// True while trackers wait for the stop's outcome.
    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// How many trackers wait for the stop's outcome.
    pub fn parked_count(&self) -> usize {
        self.parked.len()
    }

    /// Decides the parked trackers: with `device_stopped` (or a device that completed them
    /// itself), their maps are unloaded and their bios failed with their errno; otherwise they
    /// are held for ever, except requests without data (a flush), which lent the device no
    /// pages. Returns the number newly held.
    pub fn release_parked(&mut self, device_stopped: bool) -> u64 {
        let mut held = 0;
        while let Some(t) = self.parked.pop() {
            let Some(s) = self.slots.get_mut(t as usize) else { continue };
            // A request without data (a flush) lent the device no pages: it never needs holding.
            if device_stopped || !s.map.is_loaded() {
                let errno = s.errno;
                if let Some(bio) = self.complete(t) {
                    bio.fail(errno);
                }
            } else if !s.held {
                s.held = true;
                held += 1;
            }
        }
        held
    }

    fn destroy_maps(&mut self, tag: &DmaTag) -> bool {
        let mut all = true;
        for s in self.slots.drain(..) {
            if let Some(bio) = s.bio {
                // Held (or a bug): the device may use its pages. Never completed, never freed.
                core::mem::forget(bio);
            }
            all &= tag.destroy_map(s.map);
        }
        all
    }

    /// Teardown (step 5, the device stopped or given up): any bio still carried is completed
    /// with ENXIO if `device_stopped` (or if it lent the device no pages), else held; then every
    /// unloaded map is destroyed, and the tag if no map had to be kept. Returns the number of
    /// bios newly held here.
    pub fn destroy(&mut self, device_stopped: bool) -> u64 {
        let mut held = self.release_parked(device_stopped);
        for t in 0..self.slots.len() as u32 {
            let Some(s) = self.slots.get_mut(t as usize).filter(|s| s.bio.is_some()) else { continue };
            if device_stopped || !s.map.is_loaded() {
                if let Some(bio) = self.complete(t) {
                    bio.fail(bindings::ENXIO);
                }
            } else if !s.held {
                s.held = true;
                held += 1;
            }
        }
        if let Some(tag) = self.tag.take() {
            if !self.destroy_maps(&tag) {
                // A map is still loaded: the tag must outlive it, i.e. for ever.
                core::mem::forget(tag);
            }
        }
        held
    }
}

impl Drop for Trackers {
    fn drop(&mut self) {
        // The owner calls destroy(); if it did not, nothing is known about the device: hold.
        if self.tag.is_some() {
            let _ = self.destroy(false);
        }
    }
}
