//! reboot(8) on the real module (`kldhost run --shutdown`): kern_reboot's
//! bus_generic_shutdown calls DEVICE_SHUTDOWN of the attached controller, which must tell the
//! controller a normal shutdown is coming (CC.SHN, NVMe 1.4 §7.6.2: its volatile write cache
//! flushed) and then refuse I/O: a write sent after it fails and never reaches the medium.
//! The controller is then detached and the module unloaded with nothing left, as a shutdown
//! must leave the driver's state consistent.
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, cc_writes, console, kldhost_run_with, real_ko_on_qemu as real_ko};

/// The values the module read from CSTS (BAR0 + 0x1c) in `log`, in order.
fn csts_reads(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("bus_read_4(nvmehp0 BAR 0x10 + 0x1c) = 0x"))
        .filter_map(|v| u32::from_str_radix(v, 16).ok())
        .collect()
}

#[test]
fn device_shutdown_notifies_the_controller_and_a_later_write_fails_without_reaching_the_medium() {
    let Some(ko) = real_ko("shutdown") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--shutdown"]);
    assert!(!out.contains("panic:"), "{out}");
    let from = out.find("reboot: shutdown_post_sync: bus_generic_shutdown(root0)").unwrap_or_else(|| panic!("no shutdown:\n{out}"));
    let to = out[from..].find("nvmehp0: device_shutdown_desc = 0").unwrap_or_else(|| panic!("DEVICE_SHUTDOWN did not return 0:\n{out}")) + from;
    let shutdown = &out[from..to];
    // The quiesce sleeps: the device is held busy, so no detach can free it meanwhile.
    assert_in_order(shutdown, &["nvmehp0: device_shutdown_desc ->", "device_busy(nvmehp0)", "device_unbusy(nvmehp0)"]);
    // CC.SHN = 01b (normal), then CSTS.SHST = 10b (complete) seen, then CC.EN cleared.
    let cc = cc_writes(shutdown);
    let shn = cc.iter().position(|v| (v >> 14) & 3 == 1).unwrap_or_else(|| panic!("no CC.SHN write in {cc:x?}:\n{shutdown}"));
    assert!(cc[shn..].iter().any(|v| v & 1 == 0), "CC.EN never cleared after the notification: {cc:x?}");
    assert!(csts_reads(shutdown).iter().any(|v| (v >> 2) & 3 == 2), "CSTS.SHST never read as complete:\n{shutdown}");
    // An idle controller's I/O queues are deleted first (Delete I/O SQ, Delete I/O CQ: two
    // admin commands, each rung on the admin SQ tail doorbell) so the notification finds no
    // queue to flush behind it.
    let shn_at = shutdown.find(&format!("bus_write_4(nvmehp0 BAR 0x10 + 0x14, {:#x})", cc[shn])).expect("the SHN write");
    let rings = shutdown[..shn_at].matches("bus_write_4(nvmehp0 BAR 0x10 + 0x1000, ").count();
    assert!(rings >= 2, "{rings} admin commands before CC.SHN:\n{shutdown}");
    assert!(out.contains("shutdown device 4.0 (nvmehp0): 0"), "{out}");
    // The write after it: refused with ENXIO, and not in QEMU's image.
    assert!(out.contains("write after the shutdown: bio_error 6, on the medium: false"), "{out}");
    // Consistent afterwards: the detach and the unload find nothing wrong.
    assert_in_order(console(&out), &["nvmehp0: attached: /dev/nvmehp0", "nvmehp0: detached", "nvme_hotplug: unloaded (30 ACPI notify handlers removed)"]);
    assert!(out.contains("detach device 4.0 (nvmehp0): 0"), "{out}");
    assert!(out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "{out}");
    assert_eq!(code, Some(0), "{out}");
}
