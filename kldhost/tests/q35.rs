//! `kldhost run --qemu --q35`: QEMU's q35 (ICH9) as FreeBSD would see it, checked through the
//! KPI alone, before any driver relies on it: the namespace of QEMU's q35 DSDT (bus 0's objects
//! named after their devfn, each `pcie-root-port` with its hotplug slot `S00_` and its `_EJ0`),
//! a `pcibN` → `pciN` per root port whose bus number is the port's secondary bus, config space
//! of the function behind a port through `PCIB_READ_CONFIG`, `_EJ0` ejecting through the ICH9
//! block with the port's BSEL, acpi_pci's handles in the stock variant only; and the real module
//! attaching the controller behind a root port. Needs QEMU (the lab's rule: SKIP without it, a
//! failure with NVMEHP_REQUIRE_QEMU=1) and clang-19 or the built .ko.

mod common;

use common::{assert_in_order, kldhost_run_with};

fn walk_fixture(test: &str) -> Option<std::path::PathBuf> {
    let mut flags = common::kernel_header_flags();
    flags.push("-DKLDHOST_EJECT_PORT=S20_".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    common::compile(test, "q35_walk", &flags).map(|b| common::temp_object(test, &b))
}

/// The part of `out` from the first `from` to the next `to` after it.
fn between<'a>(out: &'a str, from: &str, to: &str) -> &'a str {
    let start = out.find(from).unwrap_or_else(|| panic!("no `{from}` in:\n{out}"));
    let len = out[start..].find(to).unwrap_or_else(|| panic!("no `{to}` after `{from}` in:\n{out}"));
    &out[start..start + len]
}

/// The BSEL the namespace line gives the port object `port` (e.g. `S20_`).
fn bsel_of(out: &str, port: &str) -> String {
    let key = format!("\\_SB_.PCI0.{port}.S00_ (BSEL ");
    let at = out.find(&key).unwrap_or_else(|| panic!("no hotplug slot behind {port} in the namespace line:\n{out}")) + key.len();
    out[at..].chars().take_while(char::is_ascii_digit).collect()
}

#[test]
fn the_q35_namespace_root_ports_and_config_space_are_what_a_driver_finds() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_walk") {
        return;
    }
    let Some(f) = walk_fixture("q35_walk") else { return };
    let (code, out) = kldhost_run_with(&f, &["--qemu", "--q35", "--acpi"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --q35 --acpi failed:\n{out}");
    assert_in_order(
        &out,
        &[
            // pci(4)'s enumeration: root ports in slots 4 and 5, each a bridge with its bus.
            "pcib1: <PCI-PCI bridge> at device 4.0 on pci0; pci1: <PCI bus> on pcib1 (secondary bus 4)",
            "pcib2: <PCI-PCI bridge> at device 5.0 on pci0; pci2: <PCI bus> on pcib2 (secondary bus 5)",
            "pci1: 04:00.0 vendor 0x1b36 device 0x0010 class 010802",
            "console:",
            // Bus 0's objects in devfn order, none hotpluggable; each port's S00_ at level 2.
            "q35_walk: level 1 \\_SB_.PCI0.S00_ _ADR 0 _EJ0 no",
            "q35_walk: level 1 \\_SB_.PCI0.S20_ _ADR 0x40000 _EJ0 no",
            // The port's device is its pcib, whose pci bus is number 4, where the controller
            // answers through the bridge; no ACPI handle without acpi_pci.
            // Without acpi_pci nobody bound the port's object to its device: found by _ADR.
            "q35_walk: \\_SB_.PCI0.S20_: bridge found by _ADR",
            "q35_walk: \\_SB_.PCI0.S20_: pcib1 -> pci1, bus 4, slot 0 id 0x101b36",
            "q35_walk: \\_SB_.PCI0.S20_: bus handle none, bridge handle none",
            "q35_walk: level 2 \\_SB_.PCI0.S20_.S00_ _ADR 0 _EJ0 yes",
            "q35_walk: level 1 \\_SB_.PCI0.S28_ _ADR 0x50000 _EJ0 no",
            // Slot 5's port is empty: all-ones behind it.
            "q35_walk: \\_SB_.PCI0.S28_: pcib2 -> pci2, bus 5, slot 0 id 0xffffffff",
            "q35_walk: level 2 \\_SB_.PCI0.S28_.S00_ _ADR 0 _EJ0 yes",
            "q35_walk: level 1 \\_SB_.PCI0.SF8_ _ADR 0x1f0000 _EJ0 no",
            // _EJ0 of S20_.S00_ removes exactly the function behind slot 4's port.
            "q35_walk: before _EJ0: bus 4 slot 0 vendor 0x1b36",
            "q35_walk: _EJ0 0; after: bus 4 slot 0 vendor 0xffff",
            "findings: 0",
        ],
    );
    // The eject selected the port's bus with that port's BSEL (QEMU numbers the buses itself;
    // the two ports have different ones, so the other port's would have ejected nothing).
    let (b4, b5) = (bsel_of(&out, "S20_"), bsel_of(&out, "S28_"));
    assert_ne!(b4, b5, "{out}");
    assert!(out.contains(&format!("acpi_SetInteger(\\_SB_.PCI0.S20_.S00_, \"_EJ0\", 1) = 0x0: BNUM {b4} (the port's BSEL), PCEJ bit 0 written")), "{out}");
    // No slot-numbered objects as on pc; no _EJ0 on bus 0's objects, one on each port's S00_.
    assert!(!out.contains("\\_SB_.PCI0.S04_"), "{out}");
    let console = &out[out.find("console:").expect("console")..];
    let level = |l: &str| console.lines().filter(|x| x.contains(&format!("q35_walk: level {l} "))).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(level("1").len(), 6, "{out}");
    assert!(level("1").iter().all(|x| x.ends_with("_EJ0 no")), "{out}");
    assert_eq!(level("2").len(), 2, "{out}");
    assert!(level("2").iter().all(|x| x.ends_with("_EJ0 yes")), "{out}");
}

#[test]
fn with_acpi_pci_a_root_ports_bus_and_bridge_answer_the_port_object() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_acpi_pci") {
        return;
    }
    let Some(f) = walk_fixture("q35_acpi_pci") else { return };
    let (code, out) = kldhost_run_with(&f, &["--qemu", "--q35", "--acpi", "--acpi-pci"]);
    assert_eq!(code, Some(0), "{out}");
    // acpi_pcib_pci gives pciN the port's handle (and acpi_pci the bridge its object), so
    // acpi_pci sits on each port's bus, its handler on that port's hotplug slot.
    assert_in_order(
        &out,
        &[
            "acpi_pci: pci0 has ACPI handle \\_SB_.PCI0; its notify handler installed on 2 slots",
            "console:",
            // acpi_pci bound the port's object to its pcib.
            "q35_walk: \\_SB_.PCI0.S20_: bridge found by acpi_get_device",
            "q35_walk: \\_SB_.PCI0.S20_: pcib1 -> pci1, bus 4, slot 0 id 0x101b36",
            "q35_walk: \\_SB_.PCI0.S20_: bus handle port, bridge handle port",
            "q35_walk: \\_SB_.PCI0.S28_: bus handle port, bridge handle port",
            "findings: 0",
        ],
    );
}

/// The real module on q35: discovery finds each port's `S00_` on the port's secondary bus and
/// installs its handler there and nowhere else (not on a port object such as `S20_`, nor on
/// bus 0's other objects: the LPC bridge `SF8_`, ...); it attaches the controller behind
/// slot 4's port and does its I/O. Fails when a handler goes on another object, when a port's
/// slot is not found behind it, or when a port is offered to the module's driver.
#[test]
fn the_real_module_attaches_the_controller_behind_a_root_port_and_does_its_io() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_real") || common::real_ko("q35_real").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "kldhost run --qemu --q35 failed:\n{out}");
    // Exactly the two ports' slots get a handler.
    let installed: Vec<&str> = out.lines().filter_map(|l| l.trim().strip_prefix("AcpiInstallNotifyHandler(")?.split(',').next()).collect();
    assert_eq!(installed, ["\\_SB_.PCI0.S20_.S00_", "\\_SB_.PCI0.S28_.S00_"], "{out}");
    assert_in_order(
        &out,
        &[
            // The module's discovery: a handler on each port's hotplug slot, none on bus 0.
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S20_.S00_, type 1,",
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S28_.S00_, type 1,",
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S20_.S00_, type 1,",
            "AcpiRemoveNotifyHandler(\\_SB_.PCI0.S28_.S00_, type 1,",
            "console:",
            // BAR0 in slot 4's window, which is the port's memory window.
            "nvmehp0: <NVMe controller (nvme_hotplug)> mem 0xc0400000-0xc0403fff at device 0.0 on pci1",
            "nvmehp0: interrupt: MSI-X",
            "nvme_hotplug: 2 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 2 owned (2 handlers), 0 observed, on 2 pci buses",
            "nvme_hotplug: unloaded (2 ACPI notify handlers removed)",
            "io data in the backing file and read back: ok",
            "detach device 0.0 (nvmehp0): 0",
            "MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true",
            "findings: 0",
        ],
    );
    // The root ports (device 4.0 and 5.0 on pci0) were never offered to the module's driver
    // nor forced onto it; the controller (device 0.0 on pci1) was.
    assert!(out.contains("probing device 0.0"), "{out}");
    for port in ["device 4.0", "device 5.0"] {
        assert!(!out.contains(&format!("probing {port}")) && !out.contains(&format!("devctl set driver -f: {port}")), "{port}:\n{out}");
    }
}

/// Stock FreeBSD on q35: acpi_pci drives pci0 and, through acpi_pcib_pci, each port's bus, so
/// its handler is on both ports' `S00_`: the module observes them, installs nothing and says
/// that acpi_pci handles them. Fails when a port's pcib answers no ACPI handle for its bus
/// (the module would own the slot), or when the module does not say who serves its slots.
#[test]
fn with_acpi_pci_on_the_ports_buses_the_real_module_observes_their_slots() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_real_acpi_pci") || common::real_ko("q35_real_acpi_pci").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--acpi-pci", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    // acpi_get_handle(pciN) is the port's object, so acpi_pci's handler is there: the module
    // observes both slots and installs nothing (fails when pcibN answers no ACPI handle).
    assert!(out.contains("nvme_hotplug: 2 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 0 owned (0 handlers), 2 observed, on 2 pci buses"), "{out}");
    assert!(!out.contains("AcpiInstallNotifyHandler("), "{out}");
    let said = out.lines().filter(|l| l.trim_start().starts_with("nvme_hotplug: acpi_pci handles these slots (its handler cannot be removed)"));
    assert_eq!(said.count(), 1, "said once on the console:\n{out}");
    assert!(out.contains("findings: 0"), "{out}");
}

/// Slot actions behind root ports act on the port's bus alone. An eject request on
/// `S20_.S00_` (slot 0 of pci1) detaches and deletes the controller on pci1, and nothing
/// else, then `_EJ0`s that slot with the port's BSEL; a device check on `S28_.S00_` (slot 0 of
/// pci2) reads and adds the new controller there and reads no function of pci0, whose slot 0
/// (the host bridge) shares the slot number. Fails when a slot action goes to pci0 or to the
/// other port's bus (wrong deletion, nothing added), when no handler gets the notify
/// (control: `acpi_mode=off`), or when the eject does not reach QEMU.
#[test]
fn an_eject_request_and_a_hot_add_behind_root_ports_reach_the_real_module() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_eject") || common::real_ko("q35_eject").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--eject", "--hot-add", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            // device_del of the controller behind slot 4's port: Notify 3 to that port's S00_,
            // the module detaches and deletes it on pci1, then _EJ0 with the port's BSEL.
            "acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 3) to 1 handler(s)",
            "acpi_SetInteger(\\_SB_.PCI0.S20_.S00_, \"_EJ0\", 1) = 0x0: BNUM",
            "after the eject request: device 0.0 deleted from pci1",
            "QMP: DEVICE_DELETED nvme0: received",
            // device_add behind slot 5's port: Notify 1 to its S00_, the module's rescan of
            // pci2 adds and attaches it; its disk is written and read.
            "acpi_task: Notify(\\_SB_.PCI0.S28_.S00_, 1) to 1 handler(s)",
            "pci_add_child(pci2, 05:00.0)",
            "after the hot-add: device 0.0 attached on pci2",
            "console:",
            "mem 0xc0500000-0xc0503fff at device 0.0 on pci2",
            "findings: 0",
        ],
    );
    assert!(out.contains("hot-added and attached: true; its write and read: ok"), "{out}");
    // The eject request's work, up to the next step: one deletion, of 04:00.0 on pci1.
    let eject = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 3)", "step Eject");
    let deleted: Vec<&str> = eject.lines().map(str::trim).filter(|l| l.starts_with("device_delete_child(")).collect();
    assert_eq!(deleted.len(), 1, "{eject}");
    assert!(deleted[0].starts_with("device_delete_child(pci1, pci0:4:0:0) = 0"), "{eject}");
    assert_eq!(eject.matches("\"_EJ0\"").count(), 1, "{eject}");
    // The device check's work: functions of bus 5 only (besides finding the port at 00:05.0).
    let check = between(&out, "acpi_task: Notify(\\_SB_.PCI0.S28_.S00_, 1)", "step HotAdd");
    let reads: Vec<&str> = check.lines().map(str::trim).filter(|l| l.starts_with("pci_read_device(")).collect();
    assert!(reads.len() == 1 && reads[0].starts_with("pci_read_device(0, 5, 0, 0) = "), "{check}");
    assert!(!check.contains("pci_find_dbsf(0, 0, 0,") && !check.contains("pci_read_device(0, 0,"), "pci0's slot 0 looked at:\n{check}");

    // Control: with hw.nvme_hotplug.acpi_mode=off nobody handles the port's notify: the
    // controller stays on pci1 and QEMU keeps it.
    let (code, out) =
        kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--eject", "--tunable", "hw.nvme_hotplug.claim=1", "--tunable", "hw.nvme_hotplug.acpi_mode=off"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("acpi_SetInteger("), "{out}");
    assert_in_order(
        &out,
        &["acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 3) to 0 handler(s)", "after the eject request: device 0.0 still on pci1", "findings: 0"],
    );
}

#[test]
fn with_acpi_pci_the_ports_eject_and_rescan_act_on_the_ports_bus() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_acpi_pci_eject") || common::real_ko("q35_acpi_pci_eject").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--acpi-pci", "--eject", "--hot-add", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    // acpi_pci's handler (the only one: the module observes) detaches the controller, _EJ0s
    // the port's slot and rescans pci1, which deletes it; its device check rescans pci2, which
    // adds the hot-added controller, and the module's driver (claim=1) attaches it.
    assert_in_order(
        &out,
        &[
            "acpi_pci: Notify(\\_SB_.PCI0.S20_.S00_, 3)",
            "acpi_SetInteger(\\_SB_.PCI0.S20_.S00_, \"_EJ0\", 1) = 0x0",
            "BUS_RESCAN(pci1): 04:00.0 is gone: device_delete_child = 0",
            "after the eject request: device 0.0 deleted from pci1",
            "acpi_pci: Notify(\\_SB_.PCI0.S28_.S00_, 1)",
            "BUS_RESCAN(pci2): added 05:00.0: device_probe_and_attach = 0",
            "after the hot-add: device 0.0 attached on pci2",
            "findings: 0",
        ],
    );
    assert!(!out.contains("AcpiInstallNotifyHandler("), "{out}");
}

#[test]
fn a_surprise_removal_behind_a_root_port_is_found_by_the_real_modules_watchdog() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_surprise") || common::real_ko("q35_surprise").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(
        &ko,
        &["--qemu", "--q35", "--acpi", "--surprise", "--in-flight", "24", "--tunable", "hw.nvme_hotplug.claim=1", "--tunable", "hw.nvme_hotplug.io_entries=16"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert_in_order(
        &out,
        &[
            "surprise removal: PCEJ bit 0 (with the BSEL of slot 4's root port) written with no device_del: Ok(())",
            "after the surprise removal: device 0.0 deleted from pci1 after",
            "0 of them not in the backing file",
            "0 never done",
            "findings: 0",
        ],
    );
    assert!(!out.contains("acpi_SetInteger("), "no _EJ0 after a surprise removal:\n{out}");
}

/// Loaded early (loader.conf), before newbus attached the root ports' buses
/// (`--bridge-buses-late`): discovery finds the ports' slot objects but not the buses below
/// them, so it serves nothing yet and arms a retry a second later, instead of serving what it
/// found without them; once the buses are attached the retry finds both slots, and an eject
/// request on slot 4's port is served. Fails when discovery does not wait (a summary line or a
/// handler before the buses are there), when no retry is armed, or when the retry misses a slot.
#[test]
fn a_root_ports_bus_attached_after_mod_load_is_waited_for() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_late_bus") || common::real_ko("q35_late_bus").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--bridge-buses-late", "--eject", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    let (before, after) = out.split_at(out.find("pcib_attach_child(pcib1)").unwrap_or_else(|| panic!("pci1 never attached:\n{out}")));
    assert!(before.contains("pcib1: <PCI-PCI bridge> at device 4.0 on pci0; its pci bus not attached yet"), "{before}");
    assert!(!before.contains("hotplug slots under") && !before.contains("AcpiInstallNotifyHandler("), "served before the buses were there:\n{before}");
    assert!(before.lines().any(|l| l.contains("taskqueue_enqueue_timeout_sbt(") && l.contains("sbt 0x100000000,")), "no retry a second later:\n{before}");
    assert_in_order(
        after,
        &[
            "pcib_attach_child(pcib2): pci2: <PCI bus> on pcib2 (secondary bus 5)",
            "time passes: timeout task",
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S20_.S00_, type 1,",
            "AcpiInstallNotifyHandler(\\_SB_.PCI0.S28_.S00_, type 1,",
            "acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 3) to 1 handler(s)",
            "acpi_SetInteger(\\_SB_.PCI0.S20_.S00_, \"_EJ0\", 1) = 0x0",
            "after the eject request: device 0.0 deleted from pci1",
            "console:",
            "nvme_hotplug: 2 hotplug slots under \\_SB_.PCI0 (acpi_mode=auto): 2 owned (2 handlers), 0 observed, on 2 pci buses",
            "findings: 0",
        ],
    );
}

/// `devctl detach pcib1` after discovery (`--bridge-detached 4`; pci_pci.c pcib_detach
/// detaches the controller and deletes pci1): the slot's bus is found again at each action, so
/// while it is gone a device check on `S20_.S00_` reads and adds nothing and an eject request
/// is not carried out (no `_EJ0`; the module counts a failure), and no KPI call is made with
/// pci1's freed device_t (kldhost poisons it; a use is a finding and a panic). After `devctl
/// attach pcib1` (a new pci1, the controller attached again on it) the announced eject
/// detaches and deletes that new child on the new bus and ejects the slot. Fails when the
/// module keeps the bus's device_t from discovery, or acts on a slot whose bus is gone.
#[test]
fn a_slot_whose_bridge_lost_its_bus_fails_cleanly_and_works_once_the_bus_is_back() {
    if !nvmehp_lab::skip::qemu_or_skip("q35_bridge_detached") || common::real_ko("q35_bridge_detached").is_none() {
        return;
    }
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--q35", "--acpi", "--bridge-detached", "4", "--eject", "--tunable", "hw.nvme_hotplug.claim=1"]);
    assert_eq!(code, Some(0), "{out}");
    // The old pci1's device_t never reaches the KPI again.
    let freed = out.lines().find(|l| l.contains("device_delete_child(pcib1, pci1) = 0")).unwrap_or_else(|| panic!("pci1 not deleted:\n{out}"));
    let old_pci1 = freed.split("device_t ").nth(1).and_then(|s| s.split(' ').next()).expect("the freed device_t");
    let since = &out[out.find(freed).expect("the line") + freed.len()..];
    assert!(!since.contains(old_pci1), "pci1's freed device_t {old_pci1} used:\n{since}");
    // While the bus is gone: both notifies handled, nothing read, added or ejected.
    let gone = between(&out, "step DetachBridge { slot: 4 }: done", "pcib_attach_child(pcib1)");
    assert_in_order(
        gone,
        &[
            "acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 1) to 1 handler(s)",
            "acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 3) to 1 handler(s)",
            "nvme_hotplug: hotplug run: 0 rescans, 0 detaches (0 stale), 0 ejected, 0 refused, 1 failures",
        ],
    );
    assert!(!gone.contains("pci_read_device(") && !gone.contains("pci_add_child(") && !gone.contains("\"_EJ0\""), "{gone}");
    // Back: the eject deletes the new pci1's child.
    let added = out.lines().rfind(|l| l.contains("pci_add_child(pci1, 04:00.0) = device_t ")).unwrap_or_else(|| panic!("no new child on pci1:\n{out}"));
    let child = added.rsplit(' ').next().expect("its device_t");
    assert_in_order(
        &out,
        &[
            "devctl detach pcib1: 0 (its pci bus deleted)",
            "pcib_attach_child(pcib1): pci1: <PCI bus> on pcib1 (secondary bus 4)",
            "BUS_RESCAN(pci1): added 04:00.0: device_probe_and_attach = 0",
            "acpi_task: Notify(\\_SB_.PCI0.S20_.S00_, 3) to 1 handler(s)",
            &format!("device_delete_child(pci1, pci0:4:0:0) = 0 (device_t {child} freed"),
            "acpi_SetInteger(\\_SB_.PCI0.S20_.S00_, \"_EJ0\", 1) = 0x0",
            "after the eject request: device 0.0 deleted from pci1",
            "QMP: DEVICE_DELETED nvme0: received",
            "findings: 0",
        ],
    );
}
