//! disk(9) and the GEOM event thread (sys/geom/geom_disk.c).
//!
//! disk_gone withers the provider; `d_gone` runs on the GEOM event thread only after the last
//! consumer closed. The model queues it and [`Model::run_geom_events`] plays the event thread,
//! calling the driver's real `d_gone` ([`nvme_hotplug::hotplug::teardown::on_disk_gone`]).

use crate::model::{Disk, DiskRef, MemRef, Model, ThreadKind};
use crate::rules::Rule;

impl Model {
    /// disk_alloc + disk_create(9), `d_drv1 = ctx`.
    pub fn disk_create(&mut self, unit: u32, ctx: MemRef) -> DiskRef {
        self.might_sleep("disk_create");
        if self.is_freed(ctx) {
            self.violate(Rule::UseAfterFree, format!("disk_create(unit {unit}) with freed d_drv1"));
        }
        self.disks.push(Disk {
            unit,
            ctx,
            opens: 0,
            gone: false,
            d_gone_queued: false,
            d_gone_running: false,
            d_gone_done: false,
            destroyed: false,
        });
        DiskRef(self.disks.len() - 1)
    }

    /// A GEOM consumer opens the disk's provider (mount, dd).
    pub fn disk_open(&mut self, disk: DiskRef) -> bool {
        match self.disks.get_mut(disk.0) {
            Some(d) if !d.gone && !d.destroyed => {
                d.opens += 1;
                true
            }
            _ => false,
        }
    }

    /// The consumer closes; after disk_gone the last close lets d_gone run.
    pub fn disk_close(&mut self, disk: DiskRef) {
        if let Some(d) = self.disks.get_mut(disk.0) {
            d.opens = d.opens.saturating_sub(1);
        }
        self.queue_d_gone(disk);
    }

    fn queue_d_gone(&mut self, disk: DiskRef) {
        if let Some(d) = self.disks.get_mut(disk.0) {
            if d.gone && d.opens == 0 && !d.d_gone_queued {
                d.d_gone_queued = true;
                self.geom_queue.push_back(disk);
            }
        }
    }

    /// disk_gone(9).
    pub fn disk_gone(&mut self, disk: DiskRef) {
        self.might_sleep("disk_gone");
        let Some(d) = self.disks.get_mut(disk.0) else { return };
        if d.gone || d.destroyed {
            let unit = d.unit;
            self.violate(Rule::DiskDoubleRelease, format!("disk_gone(unit {unit}) twice"));
            return;
        }
        d.gone = true;
        self.queue_d_gone(disk);
    }

    /// `d_drv1`.
    pub fn disk_drv1(&mut self, disk: DiskRef) -> MemRef {
        let d = &self.disks[disk.0];
        if d.destroyed {
            let unit = d.unit;
            self.violate(Rule::DiskDoubleRelease, format!("d_drv1 of destroyed disk unit {unit}"));
        }
        self.disks[disk.0].ctx
    }

    /// disk_destroy(9): only from d_gone (or for a disk GEOM never saw).
    pub fn disk_destroy(&mut self, disk: DiskRef) {
        self.might_sleep("disk_destroy");
        let Some(d) = self.disks.get(disk.0) else { return };
        let unit = d.unit;
        if d.destroyed {
            self.violate(Rule::DiskDoubleRelease, format!("disk_destroy(unit {unit}) twice"));
            return;
        }
        let in_d_gone = d.d_gone_running && self.threads[self.current.0].kind == ThreadKind::GeomEvent;
        if !in_d_gone {
            self.violate(Rule::DiskFreedBeforeGone, format!("disk_destroy(unit {unit}) outside its d_gone callback"));
        }
        self.disks[disk.0].destroyed = true;
    }

    /// Plays the GEOM event thread: runs every queued d_gone callback.
    pub fn run_geom_events(&mut self) {
        let geom = self.spawn_thread(ThreadKind::GeomEvent);
        while let Some(disk) = self.geom_queue.pop_front() {
            let prev = self.switch_to(geom);
            self.disks[disk.0].d_gone_running = true;
            nvme_hotplug::hotplug::teardown::on_disk_gone(self, disk);
            self.disks[disk.0].d_gone_running = false;
            self.disks[disk.0].d_gone_done = true;
            self.switch_to(prev);
        }
    }

    /// Disks that were given to disk_gone and whose d_gone has not run yet.
    pub fn disks_awaiting_gone(&self) -> usize {
        self.disks.iter().filter(|d| d.gone && !d.d_gone_done).count()
    }

    /// Disks not yet released through d_gone + disk_destroy.
    pub fn disks_alive(&self) -> usize {
        self.disks.iter().filter(|d| !d.destroyed).count()
    }

    /// The newest disk with unit `unit`.
    pub fn find_disk(&self, unit: u32) -> Option<DiskRef> {
        self.disks.iter().rposition(|d| d.unit == unit).map(DiskRef)
    }

    /// A disk's provider is open.
    pub fn disk_busy(&self, disk: DiskRef) -> bool {
        self.disks.get(disk.0).is_some_and(|d| d.opens > 0)
    }

    /// Sleeps until every d_gone ran, as nvd_controller_fail does. A disk still open would
    /// make the real kernel sleep until someone closes it.
    pub fn wait_all_gone(&mut self) {
        self.might_sleep("msleep(d_gone)");
        self.run_geom_events();
        let stuck: Vec<u32> = self.disks.iter().filter(|d| d.gone && !d.d_gone_done).map(|d| d.unit).collect();
        for unit in stuck {
            self.violate(Rule::WaitForeverForGone, format!("waiting for d_gone of open disk unit {unit}"));
        }
    }
}
