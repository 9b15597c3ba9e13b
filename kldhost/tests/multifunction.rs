//! Multi-function PCI slots on the real module: QEMU's NVMe controllers at several functions of
//! one slot (`--multifunction SLOT=F,...` cold, `--hot-add-function SLOT.F` hot), kldhost's pci0
//! enumerating them as pci(4) does, and the module's single-slot rescan (src/freebsd/slot_rescan.rs)
//! and slot detach (src/freebsd/slots.rs) acting on them. What the module read of functions it
//! has no `device_t` for is in the call log: every `PCIB_READ_CONFIG(bus:slot.func, reg, width)`
//! is the module's (only its slot walk and presence checks call it).
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_clean_unload, assert_in_order, between, kldhost_run_with, real_ko_on_qemu as real_ko};

/// The module's config reads in `log`, as (slot, function, register).
fn config_reads(log: &str) -> Vec<(u8, u8, u16)> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("PCIB_READ_CONFIG(0:"))
        .map(|l| {
            let (sf, rest) = l.split_once(", ").expect("slot.func, reg");
            let (s, f) = sf.split_once('.').expect("slot.func");
            let reg = rest.split(',').next().expect("reg").trim_start_matches("0x");
            (s.parse().expect("slot"), f.parse().expect("func"), u16::from_str_radix(reg, 16).expect("reg"))
        })
        .collect()
}

/// The log of the `n`-th (0-based) device check the runner's `--notify SLOT=1` delivered to
/// `slot`, up to the runner's line after it.
fn nth_check(out: &str, slot: u8, n: usize) -> &str {
    let from = format!("acpi_task: Notify(\\_SB_.PCI0.S{slot:02X}_, 1)");
    let to = format!("after Notify(slot {slot}, 1)");
    let mut at = 0;
    for _ in 0..n {
        at += out[at..].find(&from).unwrap_or_else(|| panic!("fewer than {} checks of slot {slot}:\n{out}", n + 1)) + from.len();
    }
    let start = at + out[at..].find(&from).unwrap_or_else(|| panic!("no check {n} of slot {slot}:\n{out}"));
    between(&out[start..], &from, &to)
}

fn run(test: &str, args: &[&str]) -> Option<(Option<i32>, String)> {
    let ko = real_ko(test)?;
    let mut all = vec!["--qemu", "--acpi", "--tunable", "hw.nvme_hotplug.claim=1"];
    all.extend_from_slice(args);
    Some(kldhost_run_with(&ko, &all))
}

/// Hot-added function by function, as a platform may: QEMU hides a hot-plugged function 1
/// until function 0 is there (pci_host_config_read_common), yet its device_add already raises
/// the GPE and Notify(S06_, 1). The module's check then reads function 0's vendor ID (all-ones:
/// an empty slot) and nothing else: no function 1..7, no pci_read_device. When function 0 comes
/// (multifunction=on), the check's walk reads function 0's header type (PCIM_MFDEV), reads
/// 6.1..6.7, adds 6.0 and 6.1 (pci_read_device, pci_add_child) and only then probes and
/// attaches them, 6.0 first; the empty 6.2..6.7 are read (vendor) and skipped; nothing beyond
/// function 7 and nothing outside slot 6 is read. Both controllers attach and the unload is
/// clean. Fails when the walk ignores PCIM_MFDEV (6.1 never added) or probes a new function
/// before the last one is added.
#[test]
fn a_multifunction_slot_hot_added_function_1_first_is_added_whole_when_function_0_comes() {
    let Some((code, out)) = run("mf_hot_add", &["--hot-add-function", "6.1", "--hot-add-function", "6.0"]) else { return };
    let first = between(&out, "QMP device_add mf6f1 at 6.1: ok", "after the device_add of 6.1");
    assert!(first.contains("acpi_task: Notify(\\_SB_.PCI0.S06_, 1)"), "no Notify for function 1's device_add:\n{first}");
    assert_eq!(config_reads(first), [(6, 0, 0)], "{first}");
    assert!(!first.contains("pci_read_device(") && !first.contains("pci_add_child("), "{first}");
    assert!(out.contains("after the device_add of 6.1: functions answering in slot 6: []"), "{out}");

    let second = between(&out, "QMP device_add mf6f0 at 6.0, multifunction=on: ok", "after the device_add of 6.0");
    assert!(second.contains("acpi_task: Notify(\\_SB_.PCI0.S06_, 1)"), "{second}");
    let reads = config_reads(second);
    assert!(reads.contains(&(6, 0, 0xe)), "function 0's header type not read: {reads:?}");
    for f in 1..8 {
        assert!(reads.contains(&(6, f, 0)), "function {f} not looked at: {reads:?}");
    }
    assert!(reads.iter().all(|&(s, f, _)| s == 6 && f < 8), "{reads:?}");
    assert_in_order(
        second,
        &[
            "pci_read_device(0, 0, 6, 0) = 0x",
            "pci_add_child(pci0, 00:06.0) = device_t",
            "pci_read_device(0, 0, 6, 1) = 0x",
            "pci_add_child(pci0, 00:06.1) = device_t",
            "nvmehp1: device_probe_desc",
            "at device 6.0 on pci0",
            "nvmehp2: device_probe_desc",
            "at device 6.1 on pci0",
            "nvme_hotplug: slot \\\\_SB_.PCI0.S06_: 2 new functions, 2 attached",
        ],
    );
    let last_add = second.rfind("pci_add_child(").expect("an add");
    let first_probe = second.find("device_probe_desc").expect("a probe");
    assert!(last_add < first_probe, "a new function was probed before the last one was added:\n{second}");
    for f in 2..8 {
        assert!(!second.contains(&format!("pci_read_device(0, 0, 6, {f})")), "empty function {f} read in full:\n{second}");
    }
    assert!(out.contains("after the device_add of 6.0: functions answering in slot 6: [6.0 attached, 6.1 attached]"), "{out}");
    assert_clean_unload(code, &out);
}

/// A single-function slot (function 0 without PCIM_MFDEV, QEMU's controller plugged without
/// multifunction=on) whose device_t was deleted (`devctl delete 4.0`): a device check's walk
/// reads function 0's vendor ID and header type and re-adds and attaches 4.0, and never reads
/// functions 1..7 (a device that decodes only the device number would answer there with
/// function 0's identity). Fails when the walk looks at functions 1..7 regardless of PCIM_MFDEV.
#[test]
fn a_single_function_slot_never_probes_functions_1_to_7() {
    let Some((code, out)) = run("mf_single", &["--devctl-delete", "4.0", "--notify", "4=1"]) else { return };
    assert!(out.contains("devctl delete 4.0: 0"), "{out}");
    let check = nth_check(&out, 4, 0);
    let reads = config_reads(check);
    assert!(reads.contains(&(4, 0, 0)) && reads.contains(&(4, 0, 0xe)), "{reads:?}");
    assert!(reads.iter().all(|&(s, f, _)| (s, f) == (4, 0)), "the walk read beyond function 0 of a single-function slot: {reads:?}");
    assert_in_order(check, &["pci_read_device(0, 0, 4, 0) = 0x", "pci_add_child(pci0, 00:04.0)", "at device 4.0 on pci0", "1 new functions, 1 attached"]);
    assert!(!check.contains("pci_read_device(0, 0, 4, 1"), "{check}");
    assert_clean_unload(code, &out);
}

/// A device check that finds nothing to add adds nothing: on an empty slot (7) only function
/// 0's vendor ID is read; on a slot whose only function is hidden (6.1 hot-plugged without a
/// function 0: QEMU shows all-ones at 6.0) the same, with function 1 there in QEMU; on a slot
/// whose function is known (4, attached) no pci_read_device, pci_add_child or probe runs and no
/// function but 4.0 is read. Fails when a check of an empty slot walks its other functions, or
/// a check of a known slot adds or re-probes its function.
#[test]
fn an_empty_or_known_slot_adds_nothing() {
    let Some((code, out)) = run("mf_empty_known", &["--hot-add-function", "6.1", "--notify", "7=1", "--notify", "4=1"]) else { return };
    let hidden = between(&out, "QMP device_add mf6f1 at 6.1: ok", "after the device_add of 6.1");
    let empty = nth_check(&out, 7, 0);
    let known = nth_check(&out, 4, 0);
    for (what, log, slot) in [("hidden function 1", hidden, 6), ("empty slot", empty, 7)] {
        assert!(log.contains(&format!("Notify(\\_SB_.PCI0.S{slot:02X}_, 1) to 1 handler(s)")), "{what}: not delivered:\n{log}");
        assert_eq!(config_reads(log), [(slot, 0, 0)], "{what}:\n{log}");
    }
    assert!(known.contains("Notify(\\_SB_.PCI0.S04_, 1) to 1 handler(s)"), "{known}");
    assert!(config_reads(known).iter().all(|&(s, f, _)| (s, f) == (4, 0)), "{known}");
    for log in [hidden, empty, known] {
        for never in ["pci_read_device(", "pci_add_child(", "device_probe_desc", "device_delete_child("] {
            assert!(!log.contains(never), "{never} in a check that has nothing to add:\n{log}");
        }
    }
    assert!(!out.contains("new functions"), "{out}");
    assert_clean_unload(code, &out);
}

/// A device check on slot 7 (a controller hot-added there) while slot 6 holds a function newbus
/// does not know (6.1, `devctl delete`d; QEMU still has it, and 6.0 says PCIM_MFDEV): the check
/// reads slot 7 only, looks up no device_t outside slot 7, and adds 7.0 alone; 6.1 stays
/// without a device_t and nothing is deleted. (No stale child sits in another slot here: what
/// would find one, a config read or a device_t lookup of that slot, is what the log excludes.)
/// Fails when a check walks or rescans other slots.
#[test]
fn a_device_check_touches_only_its_own_slot() {
    let Some((code, out)) = run("mf_own_slot", &["--multifunction", "6=0,1", "--devctl-delete", "6.1", "--hot-add-function", "7.0"]) else { return };
    assert!(out.contains("devctl delete 6.1: 0"), "{out}");
    let check = between(&out, "QMP device_add mf7f0 at 7.0: ok", "after the device_add of 7.0");
    assert!(check.contains("acpi_task: Notify(\\_SB_.PCI0.S07_, 1) to 1 handler(s)"), "{check}");
    assert!(!check.contains("Notify(\\_SB_.PCI0.S06_"), "{check}");
    let reads = config_reads(check);
    assert!(reads.contains(&(7, 0, 0)), "{reads:?}");
    assert!(reads.iter().all(|&(s, _, _)| s == 7), "config reads outside slot 7: {reads:?}");
    // Nor a device_t of another slot looked up (what a sweep of stale children would need).
    let lookups: Vec<&str> = check.lines().filter(|l| l.contains("pci_find_dbsf(0, 0, ")).collect();
    assert!(!lookups.is_empty() && lookups.iter().all(|l| l.contains("pci_find_dbsf(0, 0, 7, ")), "{lookups:#?}");
    assert_eq!(check.matches("pci_read_device(").count(), 1, "{check}");
    assert!(check.contains("pci_add_child(pci0, 00:07.0) = device_t"), "{check}");
    assert!(!check.contains("pci_add_child(pci0, 00:06.1)") && !check.contains("device_delete_child("), "{check}");
    assert!(check.contains("nvme_hotplug: slot \\\\_SB_.PCI0.S07_: 1 new functions, 1 attached"), "{check}");
    assert!(out.contains("after the device_add of 7.0: functions answering in slot 7: [7.0 attached]"), "{out}");
    assert_clean_unload(code, &out);
}

/// A device check of a slot with live functions adds and attaches only the ones newbus lacks:
/// functions 0, 1, 3 and 7 of slot 6 attached, 1 and 3 then `devctl delete`d (QEMU still has
/// them), 2 and 4..6 empty; `Notify(S06_, 1)`. The module walks slot 6 as acpi_pci's
/// BUS_RESCAN would for that slot: 6.1 and 6.3 are read in full (pci_read_device), added, and
/// probed and attached only after both were added; 6.0 and 6.7 are neither re-added nor
/// re-probed, the empty functions are only looked at, nothing outside slot 6 or beyond
/// function 7 is read and nothing is deleted. Fails when the check takes "a function has a
/// device_t" for "nothing to do" (6.1 and 6.3 then stay without a driver until the next
/// eject), re-adds or re-probes a known function, or probes a new one before the last add.
/// (Replaces the fake kernel's `a_multifunction_slot_adds_and_attaches_only_its_new_functions`.)
#[test]
fn a_device_check_of_an_occupied_slot_adds_only_its_missing_functions() {
    let args = ["--multifunction", "6=0,1,3,7", "--devctl-delete", "6.1", "--devctl-delete", "6.3", "--notify", "6=1"];
    let Some((code, out)) = run("mf_occupied", &args) else { return };
    assert!(out.contains("devctl delete 6.1: 0") && out.contains("devctl delete 6.3: 0"), "{out}");
    let check = nth_check(&out, 6, 0);
    assert!(check.contains("Notify(\\_SB_.PCI0.S06_, 1) to 1 handler(s)"), "{check}");
    let reads = config_reads(check);
    assert!(reads.iter().all(|&(s, f, _)| s == 6 && f < 8), "{reads:?}");
    assert!(reads.contains(&(6, 7, 0)), "function 7 not looked at: {reads:?}");
    assert_in_order(
        check,
        &[
            "pci_read_device(0, 0, 6, 1) = 0x",
            "pci_add_child(pci0, 00:06.1) = device_t",
            "pci_read_device(0, 0, 6, 3) = 0x",
            "pci_add_child(pci0, 00:06.3) = device_t",
            "at device 6.1 on pci0",
            "at device 6.3 on pci0",
            "nvme_hotplug: slot \\\\_SB_.PCI0.S06_: 2 new functions, 2 attached",
        ],
    );
    assert_eq!(check.matches("pci_read_device(").count(), 2, "{check}");
    let last_add = check.rfind("pci_add_child(").expect("an add");
    let first_probe = check.find("device_probe_desc ->").expect("a probe");
    assert!(last_add < first_probe, "a new function was probed before the last one was added:\n{check}");
    for never in ["pci_add_child(pci0, 00:06.0)", "pci_add_child(pci0, 00:06.7)", "device_delete_child(", "device_detach_desc"] {
        assert!(!check.contains(never), "{never} in the check:\n{check}");
    }
    assert_eq!(check.matches("device_probe_desc ->").count(), 2, "only 6.1 and 6.3 are probed:\n{check}");
    assert_clean_unload(code, &out);
}

/// An eject request on a slot holding two controllers of ours (6.0 and 6.1) while 6.0's disk
/// is held open: the module refuses the whole slot before detaching anything (6.1, which it
/// would detach first, last function first, included): no DEVICE_DETACH, no
/// device_delete_child, no `_EJ0`, both functions still on pci0 and in QEMU. Without the hold,
/// the same request detaches and deletes 6.1, then 6.0, then evaluates `_EJ0` once, and QEMU
/// deletes both devices. Fails when the module checks each function only as it reaches it
/// (6.1 is then detached and deleted before 6.0 refuses), or detaches function 0 first.
#[test]
fn a_multi_function_slot_is_refused_whole_when_one_function_is_open() {
    // nvmehp0 is 4.0's, nvmehp1 6.0's (disk nvmehpd1), nvmehp2 6.1's: attached in pci0's order.
    let Some((code, out)) = run("mf_refused", &["--multifunction", "6=0,1", "--hold-open", "nvmehpd1", "--eject-slot", "6", "--kldunload-retries", "1"]) else { return };
    assert!(out.contains("nvmehp1: <NVMe controller (nvme_hotplug)> mem ") && out.contains(" at device 6.0 on pci0"), "{out}");
    assert!(out.contains("g_disk_access(nvmehpd1, open) -> d_open = 0"), "{out}");
    let eject = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S06_, 3)", "after the eject request of slot 6");
    assert!(eject.contains("nvmehp1: eject request refused: a node or disk is open"), "{eject}");
    for never in ["device_detach_desc", "device_delete_child(", "acpi_SetInteger("] {
        assert!(!eject.contains(never), "{never} in a refused eject:\n{eject}");
    }
    assert!(out.contains("after the eject request of slot 6: still on pci0: device 6.0, device 6.1"), "{out}");
    assert!(out.contains("step EjectSlot { slot: 6 }: NOT done"), "{out}");
    // The held disk closes after the first kldunload; the retry unloads clean.
    assert_clean_unload(code, &out);

    let Some((code, out)) = run("mf_ejected", &["--multifunction", "6=0,1", "--eject-slot", "6"]) else { return };
    let eject = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S06_, 3)", "after the eject request of slot 6");
    assert_in_order(
        eject,
        &[
            "nvmehp2: device_detach_desc ->",
            "device_delete_child(pci0, pci0:0:6:1) = 0",
            "nvmehp1: device_detach_desc ->",
            "device_delete_child(pci0, pci0:0:6:0) = 0",
            "acpi_SetInteger(\\_SB_.PCI0.S06_, \"_EJ0\", 1) = 0x0",
        ],
    );
    assert_eq!(eject.matches("acpi_SetInteger(").count(), 1, "{eject}");
    assert!(out.contains("after the eject request of slot 6: no function left on pci0"), "{out}");
    assert!(out.contains("QMP: DEVICE_DELETED of slot 6's devices: received"), "{out}");
    assert_clean_unload(code, &out);
}

/// A slot whose function 0 has no device_t (`devctl delete 6.0`) while 6.1 is attached: the
/// eject request detaches and deletes 6.1 before `_EJ0` powers the slot off, never finding
/// "no device" by looking at function 0 alone. Fails when the module's has-a-device check or
/// its detach looks at function 0 only (`_EJ0` then runs with 6.1 still attached, and QEMU
/// pulls the controller from under its driver).
#[test]
fn an_eject_detaches_function_1_when_function_0_has_no_device() {
    let Some((code, out)) = run("mf_no_f0", &["--multifunction", "6=0,1", "--devctl-delete", "6.0", "--eject-slot", "6"]) else { return };
    assert!(out.contains("devctl delete 6.0: 0"), "{out}");
    let eject = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S06_, 3)", "after the eject request of slot 6");
    assert_in_order(eject, &["nvmehp2: device_detach_desc ->", "nvmehp2: device_detach_desc = 0", "device_delete_child(pci0, pci0:0:6:1) = 0", "acpi_SetInteger(\\_SB_.PCI0.S06_, \"_EJ0\", 1) = 0x0"]);
    assert!(!eject.contains("pci0:0:6:0"), "function 0 has no device_t:\n{eject}");
    assert!(out.contains("after the eject request of slot 6: no function left on pci0"), "{out}");
    assert!(out.contains("QMP: DEVICE_DELETED of slot 6's devices: received"), "{out}");
    assert_clean_unload(code, &out);
}

/// The flags' arguments are checked before anything runs (no QEMU or .ko needed): a
/// multi-function slot without function 0 (empty to every OS), a function named twice, the
/// controller's slot 4, a function above 7 are usage errors (exit 2) naming the problem.
/// Fails when the parser accepts any of them.
#[test]
fn a_bad_multi_function_argument_is_a_usage_error() {
    let ko = std::path::Path::new("no-such.ko");
    for (args, said) in [
        (&["--qemu", "--multifunction", "6=1,2"][..], "function 0 must be among the functions"),
        (&["--qemu", "--multifunction", "6=0,1,1"][..], "a function named twice"),
        (&["--qemu", "--multifunction", "4=0,1"][..], "not 4 (the controller's)"),
        (&["--qemu", "--acpi", "--hot-add-function", "6.8"][..], "expected SLOT.FUNC (slot 0..31, function 0..7)"),
        (&["--qemu", "--devctl-delete", "6"][..], "expected SLOT.FUNC"),
        (&["--qemu", "--acpi", "--eject-slot", "32"][..], "32"),
    ] {
        let (code, out) = kldhost_run_with(ko, args);
        assert_eq!(code, Some(2), "{args:?} not a usage error:\n{out}");
        assert!(out.contains(said), "{args:?}: {said:?} not said:\n{out}");
    }
}

/// A function whose header type byte says a layout above PCI_MAXHDRTYPE
/// (`--device-fault header-layout=127`: QEMU's type 0 header rewritten on its way to the
/// kernel) hot-added into slot 7: the module's walk reads its vendor ID and header type and
/// skips the slot, as pci_rescan_method does: no pci_read_device, no pci_add_child, no probe,
/// no function 1..7 read, and 7.0 stays unattached (the same hot-add without the fault attaches
/// it: `a_device_check_touches_only_its_own_slot`). Fails when the walk does not skip unknown
/// layouts (7.0 is added and attached).
#[test]
fn an_unknown_header_layout_is_skipped() {
    let Some((code, out)) = run("mf_hdrtype", &["--device-fault", "header-layout=127", "--hot-add-function", "7.0"]) else { return };
    let check = between(&out, "QMP device_add mf7f0 at 7.0: ok", "after the device_add of 7.0");
    assert!(check.contains("acpi_task: Notify(\\_SB_.PCI0.S07_, 1) to 1 handler(s)"), "{check}");
    assert!(check.contains("PCIB_READ_CONFIG(0:7.0, 0xe, 1) = 0x7f"), "the fault did not reach the walk:\n{check}");
    let reads = config_reads(check);
    assert!(reads.iter().all(|&(s, f, _)| (s, f) == (7, 0)), "{reads:?}");
    for never in ["pci_read_device(", "pci_add_child(", "device_probe_desc"] {
        assert!(!check.contains(never), "{never} for a slot with an unknown header layout:\n{check}");
    }
    assert!(out.contains("after the device_add of 7.0: functions answering in slot 7: [7.0 not attached]"), "{out}");
    assert_clean_unload(code, &out);
}
