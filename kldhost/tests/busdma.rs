//! busdma(9) and bioq(9) in the emulated kernel (`src/emu/busdma.rs`, `src/emu/bioq.rs`): the
//! real module's I/O path loads each bio through busdma, on data in guest RAM; a bio whose
//! data no device can reach is refused, never translated; a fixture driver checks segments,
//! the tag's limits and the per-map rules. Needs QEMU (SKIP without it, a failure with
//! NVMEHP_REQUIRE_QEMU=1) and, for the real module, the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, kldhost_run_with, between};


#[test]
fn the_real_modules_bios_are_loaded_through_busdma_from_guest_ram() {
    if !nvmehp_lab::skip::qemu_or_skip("busdma_real") || common::real_ko("busdma_real").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu"]);
    assert_eq!(code, Some(0), "kldhost run --qemu failed:\n{out}");
    assert_in_order(
        &out,
        &[
            "bus_get_dma_tag(nvmehp0) = pci0's tag",
            // The payload tag: PRP entries are page-sized pieces.
            "alignment 0x4, boundary 0x1000",
            ") = 0: tag ",
            "bus_dmamap_create(tag ",
            "nvmehp0: device_attach_desc = 0",
            "bio data: write at ",
            "(guest RAM)",
            // The write: one page of guest RAM, synced for the device, then back.
            "g_down: d_strategy(nvmehpd0, BIO_WRITE",
            "flags 0x1) = 0: 1 segment(s) [0x",
            "+0x1000]",
            "PREWRITE)",
            "bus_write_4(nvmehp0 BAR 0x10 + 0x1008, 0x1)",
            "POSTWRITE)",
            "bus_dmamap_unload(",
            "biodone(",
            "g_down: d_strategy(nvmehpd0, BIO_READ",
            "= 0: 1 segment(s) [0x",
            "PREREAD)",
            "POSTREAD)",
            "bus_dmamap_unload(",
            "biodone(",
            "at 8192: the written data; read back: the written data",
            // Detach: the maps, then the tag, after the controller stopped.
            "nvmehp0: device_detach_desc ->",
            "bus_dmamap_destroy(",
            "bus_dma_tag_destroy(0x",
            ") = 0",
            "nvmehp0: device_detach_desc = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "io data in the backing file and read back: ok",
            "findings: 0",
        ],
    );
    // Every map made at attach was destroyed before the tag.
    let created = out.matches("bus_dmamap_create(tag ").count();
    assert!(created > 0, "{out}");
    assert_eq!(out.matches("bus_dmamap_destroy(").count(), created, "{out}");
    assert!(out.rfind("bus_dmamap_destroy(").unwrap() < out.find("bus_dma_tag_destroy(").unwrap(), "{out}");
    assert!(!out.contains("EBUSY"), "{out}");
    // The payload tag is nvme(4)'s (sys/dev/nvme/nvme_qpair.c nvme_qpair_construct): the
    // device's tag as parent, alignment 4, boundary and maxsegsz one page, no address limit,
    // maxsize the largest transfer (QEMU's default MDTS 7 of 4 KiB pages, hw/nvme/ctrl.c:
    // 512 KiB) and one segment per page of it plus one (a buffer that does not start on a
    // page); one map per request a queue holds (255 of a 256-entry queue).
    let parent = out.lines().find_map(|l| l.trim().strip_prefix("bus_get_dma_tag(nvmehp0) = pci0's tag ")).expect("the device's tag");
    let tag = format!(
        "bus_dma_tag_create(parent {parent}, alignment 0x4, boundary 0x1000, lowaddr 0xffffffffffffffff, highaddr 0xffffffffffffffff, maxsize 0x80000, nsegments 129, maxsegsz 0x1000, flags 0x0) = 0"
    );
    assert!(out.contains(&tag), "not nvme(4)'s payload tag ({tag}):\n{out}");
    assert!(common::console(&out).contains("1 I/O queue(s) x 256 entries"), "{out}");
    assert_eq!(created, 255, "{out}");
    // Each load with BUS_DMA_NOWAIT (flags 0x1), under the controller mutex (taken inside the
    // disk's link mutex: src/freebsd/ns_disk.rs), never sleeping for a bounce page.
    for bio in common::per_bio(&out) {
        let load = bio.find("bus_dmamap_load_bio(").unwrap_or_else(|| panic!("a bio not loaded:\n{bio}"));
        let locked = bio[..load].rfind("mtx_lock(nvmehp ctrl)").unwrap_or_else(|| panic!("loaded without the controller mutex:\n{bio}"));
        assert!(!bio[locked..load].contains("mtx_unlock(nvmehp ctrl)"), "loaded without the controller mutex:\n{bio}");
        assert!(bio[load..].lines().next().is_some_and(|l| l.contains(", flags 0x1) = 0: ")), "{bio}");
    }
    assert_eq!(common::per_bio(&out).len(), 2, "{out}");
    // The disk takes unmapped bios, as nvd(4)'s does (nvme(4) loads them through busdma).
    assert!(out.contains("disk(9) nvmehpd0: d_flags ") && out.contains(" (DISKFLAG_UNMAPPED_BIO)"), "{out}");
}

#[test]
fn a_bio_whose_data_no_device_can_reach_is_refused_not_translated() {
    if !nvmehp_lab::skip::qemu_or_skip("busdma_outside") || common::real_ko("busdma_outside").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--bio-outside-guest-ram"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "(host memory, outside guest RAM)",
            "g_down: d_strategy(nvmehpd0, BIO_WRITE",
            "callback error 14 (data at 0x",
            "is not in guest RAM",
            "g_up: bio ",
            "g_down: d_strategy(nvmehpd0, BIO_READ",
            "callback error 14 (data at 0x",
            "g_up: bio ",
            // Nothing reached the medium.
            "at 8192: NOT the written data (still zeroes)",
            "nvmehp0: device_detach_desc = 0",
            "MOD_EVENT(pci/nvme_hotplug, MOD_UNLOAD) = 0",
            "io BIO_WRITE nvmehpd0 8192 4096: ",
            "io BIO_READ nvmehpd0 8192 4096: ",
            "io data in the backing file and read back: WRONG",
            "findings: 2",
            "refused: data at 0x",
            "refused: data at 0x",
        ],
    );
    // Both bios failed, and no command was rung in for either: no doorbell write between the
    // first bio and the check of the backing file.
    assert!(!out.contains("io BIO_WRITE nvmehpd0 8192 4096: 0\n"), "{out}");
    assert!(!out.contains("io BIO_READ nvmehpd0 8192 4096: 0\n"), "{out}");
    let io = between(&out, "bio data: write at ", "backing file ");
    assert!(!io.contains("BAR 0x10 + 0x1008"), "a command was submitted for a refused bio:\n{io}");
    assert!(!io.contains("segment(s) ["), "{io}");
}

fn fixture(test: &str, define: Option<&str>) -> Option<std::path::PathBuf> {
    common::fixture_object(test, "busdma", define)
}

#[test]
fn segments_follow_the_tags_limits_and_a_map_destroyed_while_loaded_is_refused() {
    if !nvmehp_lab::skip::qemu_or_skip("busdma_fixture") {
        return;
    }
    // Control: 8 KiB from 2 KiB into a page-aligned guest-RAM buffer is three page-bounded
    // segments; every rule kept.
    let Some(good) = fixture("busdma_ok", None) else { return };
    let (code, out) = kldhost_run_with(&good, &["--qemu"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "kldhostfx0: tag with alignment 3: 22",
            "kldhostfx0: callback: error 0, 3 segment(s)",
            "kldhostfx0: segment 0: +0x800, 2048 bytes",
            "kldhostfx0: segment 1: +0, 4096 bytes",
            "kldhostfx0: segment 2: +0, 2048 bytes",
            "kldhostfx0: load: 0, callback error 0",
            // Four pieces for a three-segment tag: EFBIG through the callback, 0 returned.
            "kldhostfx0: callback: error 27, 0 segment(s)",
            "kldhostfx0: 3 pages from mid-page: load 0, callback error 27",
            "kldhostfx0: tag destroy with a map alive: 16",
            "kldhostfx0: map destroy: 0",
            "kldhostfx0: tag destroy: 0",
            "findings: 0",
        ],
    );
    // The segments are the buffer's guest-physical pages, in order.
    let load = out.lines().find(|l| l.contains("= 0: 3 segment(s) [")).unwrap_or_else(|| panic!("{out}"));
    let list = &load[load.find('[').unwrap() + 1..load.find(']').unwrap()];
    let segs: Vec<(u64, u64)> = list
        .split(", ")
        .map(|s| {
            let (a, l) = s.split_once('+').unwrap();
            (u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap(), u64::from_str_radix(l.trim_start_matches("0x"), 16).unwrap())
        })
        .collect();
    assert_eq!(segs.len(), 3, "{load}");
    assert_eq!(segs[0].0 % 4096, 0x800, "{load}");
    assert_eq!(segs[1].0, segs[0].0 + 0x800, "{load}");
    assert_eq!(segs[2].0, segs[1].0 + 0x1000, "{load}");
    assert_eq!([segs[0].1, segs[1].1, segs[2].1], [0x800, 0x1000, 0x800], "{load}");

    let Some(bad) = fixture("busdma_destroy_loaded", Some("-DKLDHOST_DESTROY_LOADED")) else { return };
    let (code, out) = kldhost_run_with(&bad, &["--qemu"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "kldhostfx0: load: 0, callback error 0",
            "kldhostfx0: destroy while loaded: 16",
            "kldhostfx0: map destroy: 0",
            "kldhostfx0: tag destroy: 0",
            "findings: 1",
            "the map is loaded (the device may still use its pages)",
        ],
    );
}

#[test]
fn a_fixtures_load_of_memory_outside_guest_ram_gets_an_error_and_no_segment() {
    if !nvmehp_lab::skip::qemu_or_skip("busdma_host_buffer") {
        return;
    }
    let Some(bad) = fixture("busdma_host_buffer", Some("-DKLDHOST_HOST_BUFFER")) else { return };
    let (code, out) = kldhost_run_with(&bad, &["--qemu"]);
    assert_eq!(code, Some(1), "{out}");
    assert_in_order(
        &out,
        &[
            "kldhostfx0: callback: error 14, 0 segment(s)",
            "kldhostfx0: load: 0, callback error 14",
            "kldhostfx0: callback: error 14, 0 segment(s)",
            "kldhostfx0: map destroy: 0",
            "kldhostfx0: tag destroy: 0",
            "findings: 2",
            "is not in guest RAM",
        ],
    );
    assert!(!out.contains("kldhostfx0: segment 0"), "{out}");
}

#[test]
fn more_bios_than_trackers_wait_in_the_bioq_and_all_reach_the_medium() {
    if !nvmehp_lab::skip::qemu_or_skip("busdma_burst") || common::real_ko("busdma_burst").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--burst", "300"]);
    assert_eq!(code, Some(0), "{out}");
    // One map per tracker; the bios beyond them wait in the controller's bioq and are taken
    // from it as completions free trackers: the 300 writes and the cache flush sent right
    // behind them, which waits last and has no data. None ends before a tracker took it (no
    // ENOMEM or early completion for a full queue).
    let trackers = out.matches("bus_dmamap_create(tag ").count();
    assert!(trackers > 0 && trackers < 300, "{trackers} trackers:\n{out}");
    let burst = between(&out, "g_down: 300 bios to d_strategy(nvmehpd0) without waiting", "burst: 300 writes");
    let waiting = 300 + 1 - trackers;
    assert_eq!(burst.matches("bioq_insert_tail(").count(), waiting, "{burst}");
    let taken = burst.lines().filter(|l| l.contains("bioq_takefirst(") && !l.contains(") = 0x0")).count();
    assert_eq!(taken, waiting, "{burst}");
    let flush = burst.lines().find_map(|l| l.trim().strip_prefix("g_down: d_strategy(nvmehpd0, BIO_FLUSH, offset 0, 0 bytes) bio ")).expect("the flush");
    let sent = between(&out, "g_down: 300 bios to d_strategy(nvmehpd0) without waiting", &format!("bio {flush}"));
    assert!(!sent.contains("biodone("), "a bio ended while the burst was sent:\n{sent}");
    assert_in_order(
        burst,
        &[
            &format!(", {flush}): {waiting} queued"),
            &format!(") = {flush}: 0 queued"),
            &format!("biodone({flush}): error 0, flags 0x2, resid 0"),
        ],
    );
    assert_eq!(out.matches(&format!("biodone({flush})")).count(), 1, "{out}");
    assert_in_order(
        &out,
        &[
            "bioq_init(",
            "g_up: 300 of 300 bios done",
            "burst: the BIO_FLUSH behind the writes: error 0",
            "burst: 300 writes, 0 failed, 0 pages not in the backing file",
            "io burst of 300 BIO_WRITE nvmehpd0: bios not done without error: 0",
            "io burst's BIO_FLUSH nvmehpd0: 0",
            "io burst of 300: pages not on the medium: 0",
            "findings: 0",
        ],
    );
}

/// A bio busdma cannot load (`--fail bus_dmamap_load_bio:3`, the burst's first write: EFBIG to
/// the callback, as busdma_bounce.c answers more segments than the tag allows) fails with EIO,
/// as nvme(4) fails a tracker whose payload could not be mapped, inside d_strategy, without a
/// doorbell; its map was unloaded and its tracker given back: the next bio is loaded into the
/// same map, and of the other 299 writes and the flush exactly those beyond the trackers wait
/// in the bioq (one more would mean a tracker lost). Replaces the fake kernel's
/// `a_failed_load_fails_the_bio_and_frees_its_tracker`.
#[test]
fn a_bio_busdma_cannot_load_fails_with_eio_and_gives_its_tracker_back() {
    if !nvmehp_lab::skip::qemu_or_skip("busdma_load_fails") || common::real_ko("busdma_load_fails").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--burst", "300", "--fail", "bus_dmamap_load_bio:3"]);
    let burst = between(&out, "g_down: 300 bios to d_strategy(nvmehpd0) without waiting", "burst: 300 writes");
    let failed = between(burst, "kldhost: injected EFBIG into bus_dmamap_load_bio (call 3)", "mtx_lock(nvmehp disk)");
    let load = failed.lines().nth(1).unwrap_or_default().trim();
    assert!(load.starts_with("bus_dmamap_load_bio(") && load.ends_with("callback error 27 (injected)"), "{failed}");
    let map = load.split(" map ").nth(1).and_then(|r| r.split(',').next()).expect("the map");
    let bio = load.split(" bio ").nth(1).and_then(|r| r.split(':').next()).expect("the bio");
    assert_in_order(failed, &["bus_dmamap_unload(tag ", &format!("map {map})"), &format!("biodone({bio}): error 5, flags 0x3, resid 4096")]);
    assert!(!failed.contains("bus_write_4("), "a doorbell for a bio never loaded:\n{failed}");
    let after = &burst[burst.find(&format!("biodone({bio})")).expect("its biodone")..];
    let next = after.lines().find(|l| l.contains("bus_dmamap_load_bio(")).expect("the next load");
    assert!(next.contains(&format!(" map {map}, ")) && next.contains(") = 0: "), "the failed bio's tracker was not the next one's: {next}");
    let trackers = out.matches("bus_dmamap_create(tag ").count();
    assert_eq!(burst.matches("bioq_insert_tail(").count(), 300 + 1 - 1 - trackers, "{burst}");
    assert_in_order(
        &out,
        &[
            "burst: the BIO_FLUSH behind the writes: error 0",
            "burst: 300 writes, 1 failed, 1 pages not in the backing file",
            "io burst of 300 BIO_WRITE nvmehpd0: bios not done without error: 1",
            "MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true",
            "findings: 0",
        ],
    );
    // The run reports the failed write (exit status 1); nothing else went wrong.
    assert!(!out.contains("panic:"), "{out}");
    assert_eq!(code, Some(1), "{out}");
}

/// An unmapped bio (`run --unmapped-bios`): the disk set DISKFLAG_UNMAPPED_BIO, so GEOM may
/// pass a consumer's pages as `bio_ma` with `bio_data` pointing at a page that faults on any
/// access (unmapped_buf). A write of 8 KiB from pages 4, 2 and 0 of a block (neither adjacent
/// nor ascending), starting 512 bytes into the first, and a read into pages 5, 3 and 1: the
/// module hands each to `bus_dmamap_load_bio`, whose segments are exactly those pages' pieces
/// in bio order (3.5 KiB, 4 KiB, 0.5 KiB), the data lands on the medium and comes back into
/// the read's pages at the same places, and nothing touched `bio_data`. Fails when the disk
/// does not accept unmapped bios (GEOM then maps them first: nothing unmapped is sent), when
/// the module reads or writes through `bio_data` (a fault in its code), or when its PRP list
/// does not follow the segments (the medium or the read pages differ). (Replaces the fake
/// kernel's `unmapped_bios_move_data_from_their_pages`, io_path_tests.rs.)
#[test]
fn an_unmapped_bio_moves_data_from_its_scattered_pages() {
    let Some(ko) = common::real_ko_on_qemu("busdma_unmapped") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--unmapped-bios"]);
    for cmd in ["BIO_WRITE", "BIO_READ"] {
        let tag = format!("d_strategy(nvmehpd0, {cmd} unmapped, offset 16384, 8192 bytes) bio ");
        let line = out.lines().find(|l| l.contains(&tag)).unwrap_or_else(|| panic!("no unmapped {cmd} sent:\n{out}"));
        let pages: Vec<u64> = line
            .split("pages [")
            .nth(1)
            .and_then(|r| r.split(']').next())
            .expect("pages")
            .split(", ")
            .map(|p| u64::from_str_radix(p.trim_start_matches("0x"), 16).expect("hex page"))
            .collect();
        assert_eq!(pages.len(), 3, "{line}");
        let want = format!("3 segment(s) [{:#x}+0xe00, {:#x}+0x1000, {:#x}+0x200]", pages[0] + 0x200, pages[1], pages[2]);
        let after = &out[out.find(line).expect("the line")..];
        let load = after.lines().find(|l| l.contains("bus_dmamap_load_bio(")).unwrap_or_else(|| panic!("no load after the {cmd}:\n{out}"));
        assert!(load.ends_with(&want), "{cmd}: {load}\nwanted {want}");
    }
    assert!(out.contains("unmapped bios: write error 0, read error 0; backing file ") && out.contains("at 16384: the written data; read pages: the written data"), "{out}");
    common::assert_clean_unload(code, &out);
}
