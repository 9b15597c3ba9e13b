//! `--device-fault` on the real module: controller behaviour QEMU's NVMe model will not
//! produce, made by kldhost's fault layer between the module and QEMU (src/emu/device_fault.rs),
//! and the shipped .ko's bring-up and teardown answering it as the driver says it does (its
//! device_printf lines, src/freebsd/pci_driver.rs, ctrl.rs; the engine's src/nvme/).
//!
//! These were fake-kernel tests of the Rust code (src/freebsd/bringup_tests.rs, against
//! src/freebsd/fake_nvme.rs); here the same assertions hold of the binary. Every test asserts
//! the layer's `kldhost: injected device fault ...` line and a console line only the fault's
//! path prints, so a layer that does nothing fails it. No assertion is about elapsed time:
//! bounds are on what the module asked for (the sleeps it requested, the registers it read)
//! and on the emulation clock as the layer reports it (when a held doorbell reached QEMU).
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, console, kldhost_run_with, real_ko_on_qemu as real_ko, assert_clean_unload};
use std::collections::BTreeMap;


/// The call log's lines (before the console), without the trace's indentation.
fn calls(out: &str) -> Vec<&str> {
    let end = out.find("\nconsole:\n").unwrap_or(out.len());
    out[..end].lines().map(str::trim_start).collect()
}

fn index(log: &[&str], from: usize, wanted: &str) -> usize {
    from + log[from..].iter().position(|l| l.starts_with(wanted)).unwrap_or_else(|| panic!("no {wanted:?} after line {from}:\n{}", log[from..].join("\n")))
}

/// The module's CC writes (BAR0 + 0x14), as logged.
const CC_ENABLE: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460001)";
const CC_DISABLE: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x460000)";
/// CC with SHN = 01b (normal shutdown notification) and EN.
const CC_SHN: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0x14, 0x464001)";

/// Whether `line` frees a block contigmalloc'd earlier in `log` (DMA memory).
fn frees_dma(log: &[&str], line: &str) -> bool {
    line.strip_prefix("free(").and_then(|r| r.split(')').next()).is_some_and(|a| {
        log.iter().any(|l| l.starts_with("contigmalloc(") && l.split(" = ").nth(1).and_then(|r| r.split_whitespace().next()) == Some(a))
    })
}

/// Milliseconds of pause_sbt(9) requested with `wmesg` in `lines`.
fn paused_ms(lines: &[&str], wmesg: &str) -> f64 {
    let p = format!("pause_sbt({wmesg}, ");
    lines.iter().filter_map(|l| l.strip_prefix(&p)).filter_map(|r| r.strip_suffix(" ms)")).map(|v| v.parse::<f64>().expect("a pause_sbt duration")).sum()
}

/// Microseconds spun in DELAY(9) in `lines`.
fn delayed_us(lines: &[&str]) -> u64 {
    lines.iter().filter_map(|l| l.strip_prefix("DELAY(")).filter_map(|r| r.strip_suffix(')')).map(|v| v.parse::<u64>().expect("a DELAY argument")).sum()
}

/// A failed bring-up, as the driver reports it: its message, the attach's ENXIO, nothing made.
fn assert_bring_up_failed(out: &str, why: &str) {
    assert_in_order(console(out), &[&format!("nvmehp0: bring-up failed: {why}"), "device_attach: nvmehp0 attach returned 6"]);
    assert!(out.contains("attach device 4.0 (nvmehp0): 6"), "{out}");
    assert!(out.contains("nodes after attach: []; disks: []"), "{out}");
}

/// CSTS.RDY rising 200 ms after CC.EN = 1: the bring-up waits for it by sleeping in pause(9)
/// ("nvmehpbu"; a sleep with a mutex held would be a finding), spins no DELAY(9) in that
/// wait (under 1 ms in all of the attach), reads the hidden RDY more than once and then
/// attaches; I/O works. The detach then stops the controller and tears the interrupt down
/// before it turns bus mastering off (nvme_pci_detach's order).
#[test]
fn a_slow_ready_is_waited_for_by_sleeping_not_spinning() {
    let Some(ko) = real_ko("device_fault_rdy_slow") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", "rdy-slow=200"]);
    let log = calls(&out);
    let enable = index(&log, 0, CC_ENABLE);
    assert_in_order(&out, &[CC_ENABLE, "bus_read_4(nvmehp0 BAR 0x10 + 0x1c) = 0x0", "kldhost: injected device fault rdy-slow=200: CSTS.RDY hidden for 200 ms after CC.EN = 1"]);
    let first_admin = index(&log, enable, "bus_write_4(nvmehp0 BAR 0x10 + 0x1000,");
    let wait = &log[enable..first_admin];
    let hidden = wait.iter().filter(|l| l.starts_with("device fault: the module read 0x0 where QEMU's register holds 0x1")).count();
    assert!(hidden >= 2, "CSTS.RDY was hidden from {hidden} reads:\n{}", wait.join("\n"));
    assert!(wait.iter().filter(|l| l.starts_with("pause_sbt(nvmehpbu, ")).count() >= hidden, "a sleep between the reads:\n{}", wait.join("\n"));
    assert_eq!(delayed_us(wait), 0, "no DELAY(9) spin in the RDY wait:\n{}", wait.join("\n"));
    let attach_end = index(&log, enable, "nvmehp0: device_attach_desc = 0");
    assert!(delayed_us(&log[..attach_end]) < 1_000, "the attach spun {} us in DELAY(9)", delayed_us(&log[..attach_end]));
    assert_in_order(console(&out), &["nvmehp0: interrupt: MSI-X", "nvmehp0: attached: /dev/nvmehp0 and 1 namespace node(s)"]);
    assert!(out.contains("io data in the backing file and read back: ok"), "{out}");

    let detach = index(&log, attach_end, "nvmehp0: device_detach_desc ->");
    let disabled = index(&log, detach, CC_DISABLE);
    let torn = index(&log, detach, "bus_teardown_intr(nvmehp0");
    let off = index(&log, detach, "pci_disable_busmaster(nvmehp0)");
    assert!(disabled < off && torn < off, "stop and interrupt teardown before bus mastering off:\n{}", log[detach..].join("\n"));
    assert_clean_unload(code, &out);
}

/// A controller whose CSTS.RDY never rises, with CAP.TO rewritten to 1 (500 ms): the enable
/// wait asks for at most CAP.TO of sleep (QEMU's own CAP.TO is 7.5 s, so a CAP.TO the layer
/// did not rewrite fails this), spins nothing, gets no CC.SHN (it never became ready), is
/// disabled, and the attach fails with the driver's message. Then, in order: the rings freed
/// after the disable, the IRQ resource, the MSI-X vector, BAR0, bus mastering off; no handler
/// was ever set up. Nothing left: no finding, the module unloads.
#[test]
fn a_controller_that_never_becomes_ready_fails_the_attach_within_cap_to() {
    let Some(ko) = real_ko("device_fault_rdy_never") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", "cap-to=1", "--device-fault", "rdy-never"]);
    assert_in_order(&out, &["kldhost: injected device fault cap-to=1: CAP.TO reads 1 (500 ms) instead of 15", CC_ENABLE, "kldhost: injected device fault rdy-never: CSTS.RDY hidden while CC.EN is set"]);
    assert_bring_up_failed(&out, "timed out");
    let log = calls(&out);
    let enable = index(&log, 0, CC_ENABLE);
    let disable = index(&log, enable, CC_DISABLE);
    let wait = &log[enable..disable];
    let slept = paused_ms(wait, "nvmehpbu");
    assert!(slept > 0.0 && slept <= 500.0 + 1.0, "the enable wait asked for {slept} ms of sleep; CAP.TO is 500 ms");
    assert_eq!(delayed_us(wait), 0, "no DELAY(9) spin in the RDY wait");
    assert!(!log.contains(&CC_SHN), "no shutdown notification to a controller that never became ready:\n{out}");
    assert!(!out.contains("bus_setup_intr("), "no handler:\n{out}");
    let first_free = (disable..log.len()).find(|&i| frees_dma(&log, log[i])).expect("the rings freed");
    let failed = index(&log, disable, "device_printf(\"nvmehp0: bring-up failed: timed out");
    let irq = index(&log, failed, "bus_release_resource(nvmehp0, type 1, rid 0x1)");
    let vector = index(&log, irq, "pci_release_msi(nvmehp0) = 0");
    let bar0 = index(&log, vector, "bus_release_resource(nvmehp0, type 3, rid 0x10)");
    let off = index(&log, bar0, "pci_disable_busmaster(nvmehp0) (command 0x6 -> 0x2)");
    assert!(disable < first_free && first_free < failed && off > bar0, "{}", log[enable..=off].join("\n"));
    assert_clean_unload(code, &out);
}

/// CSTS.CFS during the enable: the bring-up stops waiting at once and fails with the engine's
/// "controller fatal status" message; nothing left.
#[test]
fn fatal_status_during_the_enable_fails_the_attach() {
    let Some(ko) = real_ko("device_fault_csts_cfs") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", "csts-cfs"]);
    assert_in_order(&out, &[CC_ENABLE, "kldhost: injected device fault csts-cfs: CSTS.CFS set while CC.EN is set", CC_DISABLE]);
    assert_bring_up_failed(&out, "bad device: controller fatal status during enable");
    assert_clean_unload(code, &out);
}

/// An allocation or free in the call log: (address, bytes, contigmalloc'd).
fn blocks_left(log: &[&str]) -> BTreeMap<String, (u64, bool)> {
    let mut live = BTreeMap::new();
    for l in log {
        let contig = l.starts_with("contigmalloc(");
        if contig || l.starts_with("malloc(") || l.starts_with("malloc_aligned(") {
            let size = l.split(['(', ',']).nth(1).and_then(|s| s.trim().parse::<u64>().ok());
            let addr = l.split(" = ").nth(1).and_then(|r| r.split_whitespace().next());
            if let (Some(size), Some(addr)) = (size, addr) {
                if addr != "NULL" && addr != "0x0" {
                    live.insert(addr.to_string(), (size, contig));
                }
            }
        } else if let Some(r) = l.strip_prefix("free(") {
            live.remove(r.split(')').next().unwrap_or(""));
        }
    }
    live
}

/// A present controller that ignores CC.SHN and CC.EN = 0 (no-stop; CAP.TO 1 keeps the
/// disable's wait short, the shutdown's is max(CAP.TO, 5 s)): the detach's stop finds it still
/// enabled and turns bus mastering off (the PCI command register write, read back clear), says
/// so, and frees none of the memory the controller was given before that; after it, with the
/// function unable to start DMA, the rings are freed and nothing is left (no [Leak] finding:
/// memory kept past kldunload would be lost for good). Control: a controller that obeys keeps
/// bus mastering until the teardown has freed its rings.
#[test]
fn a_controller_that_cannot_be_stopped_loses_bus_mastering_before_its_memory_is_released() {
    let Some(ko) = real_ko("device_fault_no_stop") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", "cap-to=1", "--device-fault", "no-stop"]);
    assert_in_order(
        &out,
        &[
            CC_SHN,
            "device fault no-stop: the write above (0x464001) was not passed on",
            "kldhost: injected device fault no-stop: the controller ignores CC.EN = 0 and CC.SHN once enabled",
            CC_DISABLE,
            "device fault no-stop: the write above (0x460000) was not passed on",
        ],
    );
    let log = calls(&out);
    let detach = index(&log, 0, "nvmehp0: device_detach_desc ->");
    let shn = index(&log, detach, CC_SHN);
    let off = index(&log, shn, "pci_disable_busmaster(nvmehp0) (command 0x6 -> 0x2)");
    const OFF: &str = "nvmehp0: controller ignored the disable: bus mastering turned off; its requests fail and its memory is freed";
    assert!(log[off..].iter().take(4).any(|l| l.contains(OFF)), "{}", log[shn..].join("\n"));
    let early_free = log[shn..off].iter().find(|l| frees_dma(&log, l));
    assert!(early_free.is_none(), "DMA memory freed before bus mastering was off: {early_free:?}");
    assert!(log[off..].iter().any(|l| frees_dma(&log, l)), "the rings freed once bus mastering is off:\n{}", log[off..].join("\n"));
    assert_in_order(console(&out), &["nvmehp0: attached: /dev/nvmehp0", OFF, "nvmehp0: detached (announced)"]);
    let left = blocks_left(&log);
    assert!(left.is_empty(), "nothing kept: {left:?}");
    assert_clean_unload(code, &out);

    // Control: the same run without the fault.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", "cap-to=1"]);
    let log = calls(&out);
    let detach = index(&log, 0, "nvmehp0: device_detach_desc ->");
    let offs: Vec<usize> = (detach..log.len()).filter(|&i| log[i].starts_with("pci_disable_busmaster(nvmehp0)")).collect();
    assert_eq!(offs.len(), 1, "{}", log[detach..].join("\n"));
    let last_ring_free = (detach..log.len()).rev().find(|&i| frees_dma(&log, log[i])).expect("the rings freed");
    assert!(last_ring_free < offs[0], "bus mastering kept through a stop that worked");
    assert!(!console(&out).contains("ignored the disable"), "{out}");
    assert_clean_unload(code, &out);
}

/// The surprise run with a read left in flight (`--read-in-flight`): the read's SQ doorbell
/// is the third I/O one (after the I/O step's write and read), which `io-stall=2` holds back,
/// so QEMU never sees it; the module's 1 s command timeout (tunable) makes its watchdog give
/// the controller up and run the stop on the still-present controller, with the read parked.
const READ_IN_FLIGHT: &[&str] = &[
    "--qemu",
    "--acpi",
    "--surprise",
    "--read-in-flight",
    "--tunable",
    "hw.nvme_hotplug.cmd_timeout_ms=1000",
    "--device-fault",
    "cap-to=1",
    "--device-fault",
    "io-stall=2",
    "--device-fault",
    "busmaster-stuck",
];

/// The parked read's d_strategy and the busdma map it was loaded into (`tag T, map M`).
fn parked_read(log: &[&str]) -> (usize, String) {
    let r = index(log, 0, "g_down: d_strategy(nvmehpd0, BIO_READ, offset 1048576, 4096 bytes)");
    let load = log[index(log, r, "bus_dmamap_load_bio(")];
    let map = load.strip_prefix("bus_dmamap_load_bio(").and_then(|l| l.split(", bio ").next()).expect("tag and map").to_string();
    (r, map)
}

/// A controller that ignores the disable (no-stop) and whose function ignores the clearing of
/// its bus-master bit (busmaster-stuck), with a read in flight that never completes (io-stall):
/// the module gives the controller up (command timeout), its stop tries CC.SHN and CC.EN = 0,
/// then turns bus mastering off (pci_disable_busmaster) before anything is decided about the
/// parked read and before any DMA memory is freed; the bit reads back on, so the read is held:
/// never completed, its map never unloaded, counted and said on the console, and the rings
/// kept. The slot is then pulled (surprise removal) and the controller detached with the
/// device gone: no panic, and the kept DMA memory (rings, the loaded map and its tag) is
/// told as kept, not as a leak, because the module said so; nothing else is left. Control:
/// without no-stop the controller stops, keeps bus mastering through the teardown, the read
/// fails (EIO, the timeout's error) after its map was unloaded, and everything is freed; with
/// no-stop but a bus-master bit that clears, bus mastering is turned off first, then the read
/// fails the same way and everything is freed.
/// This was the fake kernel's `a_controller_that_cannot_be_stopped_loses_bus_mastering_before_its_memory_is_let_go`;
/// there the teardown was a surprise one with the controller still present, which the shipped
/// .ko never runs (its detach is a surprise only when config space reads all-ones, and its
/// stop then touches nothing), so here the stop is the one of a controller given up while
/// present, which is where the .ko meets a controller that may still DMA.
#[test]
fn a_controller_that_cannot_be_stopped_loses_bus_mastering_before_a_parked_read_is_decided() {
    let Some(ko) = real_ko("device_fault_busmaster_stuck") else { return };
    let mut args = READ_IN_FLIGHT.to_vec();
    args.extend(["--device-fault", "no-stop"]);
    let (code, out) = kldhost_run_with(&ko, &args);
    let log = calls(&out);
    let (r, map) = parked_read(&log);
    let stalled = index(&log, r, "kldhost: injected device fault io-stall=2: ");
    let shn = index(&log, stalled, CC_SHN);
    assert!(log[shn + 1].starts_with("device fault no-stop: the write above (0x464001) was not passed on"), "{}", log[shn + 1]);
    let disable = index(&log, shn, CC_DISABLE);
    assert!(log[disable + 1].starts_with("device fault no-stop: the write above (0x460000) was not passed on"), "{}", log[disable + 1]);
    let stuck = index(&log, disable, "kldhost: injected device fault busmaster-stuck: ");
    let off = index(&log, disable, "pci_disable_busmaster(nvmehp0)");
    assert!(stuck < off, "the config write of pci_disable_busmaster was the one held on");
    index(&log, off, "nvmehp0: PCIR_COMMAND reads back 0x6: bus mastering is still on");
    let said = index(&log, off, "device_printf(\"nvmehp0: controller ignored the disable and still has bus mastering on (command 0x0006): its memory and requests are held");
    let held = index(&log, said, "device_printf(\"nvmehp0: controller could not be stopped: holding the I/O requests whose pages it may still access, never completing them (1 now;");
    let early_free = log[r..off].iter().find(|l| frees_dma(&log, l));
    assert!(early_free.is_none(), "DMA memory freed before bus mastering was turned off: {early_free:?}");
    assert!(!log[r..].iter().any(|l| frees_dma(&log, l)), "DMA memory freed although the device may still use it");
    let unload = format!("bus_dmamap_unload({map})");
    assert!(!log[r..].iter().any(|l| *l == unload), "the held read's map was unloaded");
    assert!(!log[r..].iter().any(|l| l.starts_with("biodone(")), "a read the device may still write was completed");
    assert!(held < index(&log, held, "surprise removal: PCEJ bit 4 written with no device_del"));
    assert!(out.contains("\nread in flight: never done (the module keeps it)\n"), "{out}");
    assert_in_order(
        console(&out),
        &[
            "nvmehp0: controller ignored the disable and still has bus mastering on",
            "nvmehp0: controller could not be stopped: holding the I/O requests",
            // The parked read is said, not "0 requests failed" alone.
            "nvmehp0: controller lost (timed out, health Healthy): 0 requests failed, 1 more once it is stopped;",
            "nvmehp0: detached (device gone)",
        ],
    );
    // Kept, as FreeBSD requires of memory a device may still DMA into, and said so: no finding.
    assert_in_order(
        &out,
        &[
            "contigmalloc'd blocks (",
            "kept, not a leak: nvmehp0 may still DMA into them (bus mastering on) and the module said so",
            "after unload: 1 loaded busdma map(s) and 1 tag(s) kept, not a finding: nvmehp0 may still DMA",
        ],
    );
    let left: Vec<_> = blocks_left(&log).into_iter().filter(|(_, (_, contig))| !contig).collect();
    assert!(left.is_empty(), "only DMA memory kept: {left:?}");
    assert_clean_unload(code, &out);

    // The same controller whose function obeys the bus-master write: cut off, so the read
    // fails (after its map's unload) and everything is freed.
    let at = READ_IN_FLIGHT.len() - 2;
    assert_eq!(READ_IN_FLIGHT[at..], ["--device-fault", "busmaster-stuck"]);
    let mut args = READ_IN_FLIGHT[..at].to_vec();
    args.extend(["--device-fault", "no-stop"]);
    let (code, out) = kldhost_run_with(&ko, &args);
    let log = calls(&out);
    let (r, map) = parked_read(&log);
    let off = index(&log, r, "pci_disable_busmaster(nvmehp0) (command 0x6 -> 0x2)");
    index(&log, off, "device_printf(\"nvmehp0: controller ignored the disable: bus mastering turned off; its requests fail and its memory is freed");
    let early_free = log[r..off].iter().find(|l| frees_dma(&log, l));
    assert!(early_free.is_none(), "DMA memory freed before bus mastering was turned off: {early_free:?}");
    let unload = index(&log, off, &format!("bus_dmamap_unload({map})"));
    let done = index(&log, unload, "biodone(");
    assert!(log[done].contains(": error 5, flags 0x3, resid 4096"), "the read fails with EIO: {}", log[done]);
    assert!(!out.contains("kept, not a"), "{out}");
    assert!(blocks_left(&log).is_empty(), "everything freed: {:?}", blocks_left(&log));
    assert_clean_unload(code, &out);

    // Control: the controller obeys the disable.
    let (code, out) = kldhost_run_with(&ko, READ_IN_FLIGHT);
    let log = calls(&out);
    let (r, map) = parked_read(&log);
    index(&log, r, "kldhost: injected device fault io-stall=2: ");
    assert!(!log[r..].iter().any(|l| l.starts_with("pci_disable_busmaster(")), "bus mastering kept through the teardown of a stopped controller");
    let unload = index(&log, r, &format!("bus_dmamap_unload({map})"));
    let done = index(&log, unload, "biodone(");
    assert!(log[done].contains(": error 5, flags 0x3, resid 4096"), "the read fails with EIO: {}", log[done]);
    assert!(out.contains("\nread in flight: done, error 5\n"), "{out}");
    assert!(!out.contains("kept, not a"), "{out}");
    assert!(blocks_left(&log).is_empty(), "everything freed: {:?}", blocks_left(&log));
    assert_clean_unload(code, &out);
}

/// Hostile Identify Namespace data written over QEMU's after its completion: each is rejected
/// with the engine's reason, the controller attaches with no namespace node or disk, nothing
/// panics, nothing is left.
#[test]
fn hostile_identify_namespace_data_rejects_the_namespace() {
    let Some(ko) = real_ko("device_fault_identify_ns") else { return };
    for (field, what, why) in [
        ("flbas", "FLBAS = 8 with NLBAF 7", "FLBAS selects a format beyond NLBAF"),
        ("lbads0", "LBADS = 0", "LBADS outside 512 B..64 KiB"),
        ("lbads63", "LBADS = 63", "LBADS outside 512 B..64 KiB"),
        ("nsze0", "NSZE = 0", "NSZE or NCAP is zero"),
        ("ncap", "> NSZE", "NCAP larger than NSZE"),
    ] {
        let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", &format!("identify-garbage={field}")]);
        let injected = format!("kldhost: injected device fault identify-garbage={field}: Identify Namespace 1 ");
        let line = out.lines().find(|l| l.trim_start().starts_with(&injected)).unwrap_or_else(|| panic!("{field}: no injection:\n{out}"));
        assert!(line.contains(what), "{field}: {line}");
        assert_in_order(
            console(&out),
            &["1 I/O queue(s) x 256 entries, 0 namespace(s)", &format!("nvmehp0: namespace 1 not exposed: {why}"), "nvmehp0: attached: /dev/nvmehp0 and 0 namespace node(s)"],
        );
        assert!(out.contains("nodes after attach: [\"nvmehp0\"]; disks: []"), "{field}:\n{out}");
        assert_clean_unload(code, &out);
    }
}

/// Hostile Identify Controller data: NN 0xffffffff and MDTS 255 are bounded by the engine
/// (it looks at no more namespaces than it supports, a transfer at most 1 MiB), so the
/// controller attaches and its write lands on the medium and reads back.
#[test]
fn hostile_identify_controller_limits_are_bounded_and_io_still_lands() {
    let Some(ko) = real_ko("device_fault_identify_ctrl") else { return };
    for (field, what) in [("nn", "Identify Controller NN = 0xffffffff"), ("mdts", "Identify Controller MDTS = 255")] {
        let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", &format!("identify-garbage={field}")]);
        assert!(out.contains(&format!("kldhost: injected device fault identify-garbage={field}: {what}, after QEMU's completion")), "{field}:\n{out}");
        assert_in_order(console(&out), &["entries, 1 namespace(s)", "nvmehp0: attached: /dev/nvmehp0 and 1 namespace node(s)"]);
        // The bound is said, not silent (MDTS above the engine's largest transfer is just
        // used up to it, as any large MDTS is).
        let said = console(&out).contains("nvmehp0: reports 4294967295 namespaces; only IDs up to 256 are scanned");
        assert_eq!(said, field == "nn", "{field}:\n{out}");
        assert!(out.contains("io data in the backing file and read back: ok"), "{field}: a write not on the medium:\n{out}");
        assert_clean_unload(code, &out);
    }
}

/// The bring-up's Identify completes with CID 0xffff (no such command): the engine drops the
/// entry instead of indexing with it, the command runs out its timeout (1 s here), and the
/// attach fails, saying it dropped the entry; nothing left.
#[test]
fn a_completion_with_an_out_of_range_cid_is_dropped_and_the_bring_up_fails() {
    let Some(ko) = real_ko("device_fault_cqe_cid") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--tunable", "hw.nvme_hotplug.cmd_timeout_ms=1000", "--device-fault", "cqe-cid=1"]);
    assert!(out.contains("kldhost: injected device fault cqe-cid=1: the completion of admin command CID 0 carries CID 0xffff"), "{out}");
    assert_bring_up_failed(&out, "timed out");
    // The timeout is explained: the dropped entry is said, though the interrupt path that
    // reports such entries never ran.
    assert_in_order(console(&out), &["nvmehp0: bring-up failed: timed out", "nvmehp0: bring-up: dropped 1 invalid completion entries (unknown command id or queue)"]);
    assert_clean_unload(code, &out);
}

/// The engine's shared admin budget of a bring-up (src/nvme/controller.rs
/// `BRING_UP_ADMIN_MIN_US`): max(command timeout, 5 s).
const BRING_UP_ADMIN_MS: f64 = 5_000.0;

/// The emulation-clock delays (ms) after which the layer forwarded held admin doorbell writes,
/// in order, from its `reaches QEMU X ms after the module made it` lines.
fn forwarded_after_ms(lines: &[&str]) -> Vec<f64> {
    lines
        .iter()
        .filter(|l| l.starts_with("device fault admin-latency="))
        .filter_map(|l| l.split(" reaches QEMU ").nth(1))
        .filter_map(|r| r.split(" ms after").next())
        .map(|v| v.parse::<f64>().expect("a forwarding delay"))
        .collect()
}

/// Every admin command answered 900 ms after its doorbell, within the 1 s command timeout
/// (`hw.nvme_hotplug.cmd_timeout_ms=1000`): each would pass on its own, but the bring-up's
/// admin commands share one budget, max(1 s, 5 s), so the bring-up fails once it is used up
/// instead of taking 0.9 s for every command it sends. Five commands fit (the layer forwards
/// five held doorbells, each no earlier than 900 ms on the emulation clock, while the module
/// sleeps in its poll); the sixth is given
/// up after less than its 900 ms, which only the budget explains; `bring-up failed: timed out`,
/// attach ENXIO. Bounded: from the first admin doorbell to the failure the module asked for
/// at most the 5 s budget (+ its last 1 ms sleep) of pause, and spun under 1 ms in DELAY in
/// all of the attach. The stop: CC.SHN (the controller had become ready), then the disable
/// (the sixth command, never fetched, is dropped with it), then bus mastering off; nothing
/// left, no finding, the module unloads. Control: a 50 ms latency attaches and I/O works.
/// About 6 s: 5 s is the budget running out (the emulation clock is the host's monotonic one).
#[test]
fn admin_commands_of_a_bring_up_share_one_budget() {
    let Some(ko) = real_ko("device_fault_admin_latency") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--tunable", "hw.nvme_hotplug.cmd_timeout_ms=1000", "--device-fault", "admin-latency=900"]);
    let log = calls(&out);
    assert_in_order(&out, &[CC_ENABLE, "bus_write_4(nvmehp0 BAR 0x10 + 0x1000, 0x1)", "kldhost: injected device fault admin-latency=900: every admin SQ tail doorbell write reaches QEMU 900 ms after"]);
    assert_bring_up_failed(&out, "timed out");
    let enable = index(&log, 0, CC_ENABLE);
    let first_admin = index(&log, enable, "bus_write_4(nvmehp0 BAR 0x10 + 0x1000,");
    let failed = index(&log, enable, "device_printf(\"nvmehp0: bring-up failed: timed out");
    let admin: Vec<usize> = (first_admin..failed).filter(|&i| log[i].starts_with("bus_write_4(nvmehp0 BAR 0x10 + 0x1000,")).collect();
    let forwarded = forwarded_after_ms(&log[..failed]);
    // 5 x 900 ms fit the 5 s budget, a sixth does not (each poll adds at most a few ms).
    assert_eq!((admin.len(), forwarded.len()), (6, 5), "admin commands sent, answered before the failure:\n{}", log[first_admin..failed].iter().filter(|l| !l.starts_with("pause_sbt")).copied().collect::<Vec<_>>().join("\n"));
    assert!(forwarded.iter().all(|&ms| ms >= 900.0), "a held doorbell reached QEMU early: {forwarded:?}");
    // Forwarded while the module sleeps in its poll, not only at its next register access (the
    // health check, 100 ms apart). One may fall due in the microseconds between a sleep and a
    // register access: at least 4 of the 5.
    let in_sleep = log[..failed].iter().filter(|l| l.starts_with("device fault admin-latency=900:") && l.ends_with("while the module sleeps (pause_sbt)")).count();
    assert!(in_sleep >= 4, "{in_sleep} of 5 held doorbells forwarded while the module slept:\n{}", log[..failed].iter().filter(|l| l.contains("reaches QEMU")).copied().collect::<Vec<_>>().join("\n"));
    let last_wait = paused_ms(&log[admin[5]..failed], "nvmehpbu");
    assert!(last_wait < 900.0, "the sixth command was waited for {last_wait} ms: given up by its own 1 s timeout, not the shared budget");
    let slept = paused_ms(&log[first_admin..failed], "nvmehpbu");
    assert!(slept <= BRING_UP_ADMIN_MS + 1.0, "the admin commands asked for {slept} ms of sleep; the budget is 5 s");
    assert!(delayed_us(&log[..failed]) < 1_000, "the attach spun {} us in DELAY(9)", delayed_us(&log[..failed]));
    let shn = index(&log, admin[5], CC_SHN);
    let disable = index(&log, shn, CC_DISABLE);
    assert!(log[disable..].iter().take(3).any(|l| l.starts_with("device fault admin-latency=900: the held admin SQ tail doorbell write(s) 0x6 dropped")), "{}", log[disable..].join("\n"));
    let off = index(&log, disable, "pci_disable_busmaster(nvmehp0) (command 0x6 -> 0x2)");
    assert!(shn < disable && disable < off && failed < off);
    let left = blocks_left(&log);
    assert!(left.is_empty(), "nothing kept: {left:?}");
    assert_clean_unload(code, &out);

    // Control: 50 ms per admin command fits every bound.
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--tunable", "hw.nvme_hotplug.cmd_timeout_ms=1000", "--device-fault", "admin-latency=50"]);
    let log = calls(&out);
    assert!(out.contains("kldhost: injected device fault admin-latency=50: every admin SQ tail doorbell write reaches QEMU 50 ms after"), "{out}");
    let forwarded = forwarded_after_ms(&log);
    assert!(forwarded.len() >= 6 && forwarded.iter().all(|&ms| ms >= 50.0), "{forwarded:?}");
    assert_in_order(console(&out), &["1 I/O queue(s) x 256 entries, 1 namespace(s)", "nvmehp0: attached: /dev/nvmehp0 and 1 namespace node(s)"]);
    assert!(out.contains("io data in the backing file and read back: ok"), "{out}");
    assert_clean_unload(code, &out);
}

/// A fault kind kldhost does not know, or a known one with a bad argument, is a usage error
/// naming the kinds it does.
#[test]
fn an_unknown_device_fault_is_a_usage_error() {
    for spec in ["rdy-sometimes", "admin-latency=soon", "admin-latency"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kldhost")).args(["run", "--qemu", "--device-fault", spec, "x.ko"]).output().expect("run kldhost");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(&format!("{spec}: not a device fault; one of: cap-to=N")), "{spec}: {err}");
        assert!(err.contains("admin-latency=MS"), "{spec}: {err}");
    }
}
