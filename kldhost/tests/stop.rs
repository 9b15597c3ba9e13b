//! How the real module stops a controller (src/nvme/stop.rs `DeviceStop::run`, run by
//! src/freebsd/ctrl.rs `CtrlShared::run_stop` without the controller mutex): a present, idle
//! controller that is detached (`devctl detach`, an eject) gets the stop NVMe recommends and
//! nvme(4) makes (nvme_ctrlr.c nvme_ctrlr_destruct): Delete I/O SQ, Delete I/O CQ, the normal
//! shutdown notification, the disable; on INTx with its interrupt masked first. A controller
//! the watchdog finds gone is given up by the watchdog's own task, whose stop touches nothing
//! and fails what was in flight.
//!
//! `--device-fault admin-latency=30` makes every admin command 30 ms late, so a stop that does
//! not wait for its queue deletions, or waits by spinning, shows; the layer logs each held
//! command's opcode and CDW10. Needs QEMU (SKIP without it, a failure with
//! NVMEHP_REQUIRE_QEMU=1) and the built .ko (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_clean_unload, between, cc_writes, console, kldhost_run_with, real_ko_on_qemu as real_ko};

/// The detach of the run's one controller, from DEVICE_DETACH's call to its return.
fn detach(out: &str) -> &str {
    between(out, "nvmehp0: device_detach_desc ->", "nvmehp0: device_detach_desc = 0")
}

/// The register write that masks the controller's interrupt (INTMS, BAR0 + 0xc, bit 0).
const INTMS_MASK: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0xc, 0x1)";
/// Any write to INTMS.
const INTMS_WRITE: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0xc, ";
/// An admin SQ tail doorbell write: one admin command handed to the controller.
const ADMIN_DOORBELL: &str = "bus_write_4(nvmehp0 BAR 0x10 + 0x1000, ";

/// The stop of a present, idle controller in its detach `d`: Delete I/O SQ 1 (opcode 00h),
/// then Delete I/O CQ 1 (04h, CDW10 = the queue ID), each waited for while the module sleeps
/// in its stop (`nvmehpst`) and answered (the admin CQ head doorbell) before anything else is
/// sent; then CC.SHN = normal, then CC.EN = 0.
fn assert_orderly_stop(d: &str) {
    let held: Vec<(&str, &str)> = d
        .lines()
        .filter_map(|l| {
            let (_, r) = l.split_once("device fault admin-latency=30: the write above (")?;
            r.split_once(") is held: QEMU gets it 30 ms after the module made it; its command(s): ")
        })
        .collect();
    let cmds: Vec<&str> = held.iter().map(|h| h.1).collect();
    assert_eq!(cmds, ["opcode 0x00 CDW10 0x1", "opcode 0x04 CDW10 0x1"], "not Delete I/O SQ 1, then Delete I/O CQ 1:\n{d}");
    let mut last_answer = 0;
    for (tail, _) in &held {
        let at = d.find(&format!("the write above ({tail}) is held")).expect("the held line");
        let rest = &d[at..];
        let reached = rest
            .find(&format!("the admin SQ tail doorbell write ({tail}) of BAR "))
            .unwrap_or_else(|| panic!("the command of admin SQ tail {tail} never reached QEMU:\n{d}"));
        assert!(rest[..reached].contains("pause_sbt(nvmehpst"), "the stop did not sleep while its command (tail {tail}) was on its way:\n{d}");
        // Answered before the next command or CC write: the stop waited for this one.
        let next = [rest.find(ADMIN_DOORBELL), rest.find("bus_write_4(nvmehp0 BAR 0x10 + 0x14, ")].into_iter().flatten().min().unwrap_or(rest.len());
        let answer = rest[reached..next].find("bus_write_4(nvmehp0 BAR 0x10 + 0x1004, ");
        assert!(reached < next && answer.is_some(), "the command of admin SQ tail {tail} was not answered before the stop went on:\n{d}");
        last_answer = at + reached + answer.unwrap_or(0);
    }
    let cc = cc_writes(&d[last_answer..]);
    let shn = cc.iter().position(|v| (v >> 14) & 3 == 1).unwrap_or_else(|| panic!("no CC.SHN = normal after the queue deletions: {cc:x?}\n{d}"));
    assert!(cc[shn..].iter().any(|v| v & 1 == 0), "CC.EN never cleared after the notification: {cc:x?}\n{d}");
    assert!(cc[..shn].iter().all(|v| v & 1 == 1), "disabled before the notification: {cc:x?}\n{d}");
}

/// A `devctl detach` of the idle controller on MSI-X: the queue deletions, each waited for by
/// sleeping (a SleepWithMutex finding if a mutex were held), the notification, the disable,
/// and INTMS never written (NVMe 1.4 §3.1.3 forbids it with MSI-X). Replaces the fake kernel's
/// `an_announced_removal_deletes_the_io_queues_before_the_shutdown_notification` (its announced
/// half; the surprise half is `the_watchdog_task_...` below). Fails with the deletions left out
/// of the stop (src/nvme/stop.rs `delete_queues`).
#[test]
fn an_announced_stop_deletes_the_io_queues_then_notifies_and_disables_sleeping_for_each_command() {
    let Some(ko) = real_ko("stop_announced") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--device-fault", "admin-latency=30"]);
    assert!(console(&out).contains("nvmehp0: interrupt: MSI-X"), "{out}");
    assert_orderly_stop(detach(&out));
    assert!(!out.contains(INTMS_WRITE), "INTMS written on MSI-X:\n{out}");
    assert!(console(&out).contains("nvmehp0: detached (announced): 0 requests failed with ENXIO"), "{out}");
    assert_clean_unload(code, &out);
}

/// On INTx the stop masks the controller's interrupt (INTMS bit 0) before its first admin
/// command: the deletions' completions, which only the stop's poll reaps between its sleeps,
/// must not hold a level-triggered line up meanwhile (src/freebsd/ctrl.rs `run_stop`). The
/// mask is written once, by the stop only. Replaces the fake kernel's
/// `on_intx_the_stop_masks_the_controllers_interrupt_before_its_admin_commands` (its MSI-X
/// half is the test above). Fails with the mask removed from `run_stop`.
#[test]
fn on_intx_the_stop_masks_the_controllers_interrupt_before_its_admin_commands() {
    let Some(ko) = real_ko("stop_intx") else { return };
    let (code, out) = kldhost_run_with(
        &ko,
        &["--qemu", "--tunable", "hw.pci.enable_msix=0", "--tunable", "hw.pci.enable_msi=0", "--device-fault", "admin-latency=30"],
    );
    assert!(console(&out).contains("nvmehp0: interrupt: INTx"), "{out}");
    let d = detach(&out);
    let mask = d.find(INTMS_MASK).unwrap_or_else(|| panic!("the stop did not mask the interrupt (INTMS):\n{d}"));
    let first_cmd = d.find(ADMIN_DOORBELL).unwrap_or_else(|| panic!("no admin command in the detach:\n{d}"));
    assert!(mask < first_cmd, "the interrupt masked after the stop's first admin command:\n{d}");
    assert_eq!(out.matches(INTMS_WRITE).count(), 1, "INTMS written outside the stop:\n{out}");
    assert_orderly_stop(d);
    assert_clean_unload(code, &out);
}

/// A write in flight (its doorbell held back by `io-stall=2`, so QEMU never sees it) when the
/// controller is surprise-removed: the watchdog's callout queues its task, which finds the
/// controller gone, fails the write by hand and runs the stop itself, with the mutex released;
/// the stop of a gone device writes no register and waits for nothing, and its outcome (a
/// gone device does no DMA) unloads the write's map, then completes its bio with ENXIO, once,
/// on that task, before the module says the controller is lost and long before the hotplug
/// task's detach. Replaces the fake kernel's
/// `the_watchdog_task_runs_the_stop_of_a_controller_it_gives_up`. Fails with the watchdog
/// task leaving the stop to the detach (src/freebsd/ctrl.rs `WatchdogTask::run`).
#[test]
fn the_watchdog_task_stops_a_vanished_controller_and_fails_its_parked_write_once() {
    let Some(ko) = real_ko("stop_watchdog_gone") else { return };
    let (code, out) = kldhost_run_with(
        &ko,
        &["--qemu", "--acpi", "--surprise", "--in-flight", "1", "--device-fault", "io-stall=2", "--tunable", "hw.nvme_hotplug.claim=1"],
    );
    let sent = between(&out, "g_down: 1 bios to d_strategy(nvmehpd0) without waiting", "surprise removal: PCEJ bit 4 written with no device_del");
    assert!(sent.contains("device fault io-stall=2: the write above (SQ 1 tail 3) was not passed on"), "{sent}");
    let load = sent.lines().find(|l| l.contains("bus_dmamap_load_bio(")).unwrap_or_else(|| panic!("the write was not loaded:\n{sent}"));
    let field = |name: &str, end: char| -> String {
        let from = load.find(name).unwrap_or_else(|| panic!("no {name} in {load}")) + name.len();
        load[from..].split(end).next().unwrap_or_default().to_string()
    };
    let (tag, map, bio) = (field("(tag ", ','), field(" map ", ','), field(" bio ", ':'));
    let done = format!("biodone({bio}): error 6, flags 0x3, resid 4096");
    assert_eq!(out.matches(&format!("biodone({bio})")).count(), 1, "the write not completed exactly once:\n{out}");

    let after = &out[out.find("surprise removal: PCEJ bit 4 written").expect("the removal")..];
    let done_at = after.find(&done).unwrap_or_else(|| panic!("{done} missing after the removal:\n{after}"));
    let lost_at = after.find("device_printf(\"nvmehp0: controller lost (controller gone, health Gone)").expect("the controller lost line");
    let detach_at = after.find("nvmehp0: device_detach_desc ->").expect("the hotplug task's detach");
    assert!(done_at < lost_at && lost_at < detach_at, "not completed by the watchdog before the module gave the controller up:\n{after}");
    let task = after[..done_at].rfind("taskqueue nvmehp_ctrl: run task").unwrap_or_else(|| panic!("no watchdog task before the completion:\n{after}"));
    let on_task = &after[task..done_at];
    for other in ["taskqueue nvmehp_hotplug: run task", ": interrupt (", "time passes: callout"] {
        assert!(!on_task.contains(other), "the write completed after `{other}`, not on the watchdog task:\n{on_task}");
    }
    assert!(on_task.contains(&format!("bus_dmamap_unload(tag {tag}, map {map})")), "its map not unloaded before the completion:\n{on_task}");
    // Nothing to stop on a gone device: no register written, no sleep.
    assert!(!on_task.contains("bus_write_4(") && !on_task.contains("pause_sbt("), "the stop of a gone device touched it or waited:\n{on_task}");
    assert!(
        out.contains("writes in flight at the surprise removal: 0 done without error (0 not on the medium), 1 ENXIO, 0 other errors, 0 never done"),
        "{out}"
    );
    assert_clean_unload(code, &out);
}
