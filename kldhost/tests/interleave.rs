//! Chosen interleavings on the real module (`kldhost run --in-sleep WMESG[:N]=ACTION`,
//! src/emu/interleave.rs): another kernel thread acts while the module sleeps in pause(9)
//! with a given wait message, its Giant (the newbus topology lock) dropped for the sleep as
//! kern_synch.c `_sleep` drops it. Here the sleeps are the bring-up's wait for CSTS.RDY
//! (`nvmehpbu`), made certain by `--device-fault rdy-slow=50` (RDY rises 50 ms after CC.EN).
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_in_order, console, kldhost_run_with, real_ko_on_qemu as real_ko};

/// The run went on to a clean end: the attach done, its write and read in the image, the
/// detach and unload with nothing left.
fn assert_attached_and_clean(code: Option<i32>, out: &str) {
    assert!(out.contains("attach device 4.0 (nvmehp0): 0"), "{out}");
    assert!(out.contains("io data in the backing file and read back: ok"), "{out}");
    assert!(out.contains("detach device 4.0 (nvmehp0): 0"), "{out}");
    assert!(out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true"), "{out}");
    assert!(out.contains("\nfindings: 0\n"), "{out}");
    assert!(!out.contains("panic:"), "{out}");
    assert_eq!(code, Some(0), "{out}");
}

/// kldunload while a controller's DEVICE_ATTACH sleeps (Giant dropped, so kld_sx and the
/// module events can go ahead): the module's MOD_QUIESCE refuses while one is attaching,
/// before anything is quiesced, so the attach finishes on a module that is still whole, does
/// its I/O, and the later unload is clean. Fails with the attaching check removed from the
/// module's quiesce (MOD_QUIESCE then agrees, removes the handlers and marks the module
/// unloading under the attach).
#[test]
fn a_kldunload_during_an_attach_is_refused_in_mod_quiesce() {
    let Some(ko) = real_ko("interleave_kldunload") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--device-fault", "rdy-slow=50", "--in-sleep", "nvmehpbu=kldunload"]);
    assert_in_order(
        &out,
        &[
            "nvmehp0: device_attach_desc ->",
            "pause_sbt(nvmehpbu",
            "kldhost: in sleep 1 on nvmehpbu, another thread: kldunload",
            "MOD_EVENT(pci/nvme_hotplug, MOD_QUIESCE) = 16",
            "kldhost: in sleep 1 on nvmehpbu, another thread: kldunload: pci/nvme_hotplug refused MOD_QUIESCE: error 16",
            "nvmehp0: device_attach_desc = 0",
        ],
    );
    let during = &out[out.find("another thread: kldunload").expect("the kldunload")..out.find("refused MOD_QUIESCE: error 16").expect("its refusal")];
    assert!(!during.contains("AcpiRemoveNotifyHandler("), "quiesced under the attach:\n{during}");
    assert_in_order(console(&out), &["nvme_hotplug: a controller is attaching: not unloading, try again", "nvmehp0: attached: /dev/nvmehp0"]);
    assert_attached_and_clean(code, &out);
}

/// devctl detach while the controller's DEVICE_ATTACH sleeps: newbus refuses it
/// ("device in attaching state! Deferring detach.", EBUSY) without calling the module, whose
/// attach then completes and works.
#[test]
fn a_detach_during_an_attach_is_deferred_by_newbus() {
    let Some(ko) = real_ko("interleave_detach") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--device-fault", "rdy-slow=50", "--in-sleep", "nvmehpbu=detach"]);
    assert_in_order(
        &out,
        &[
            "nvmehp0: device_attach_desc ->",
            "kldhost: in sleep 1 on nvmehpbu, another thread: devctl detach nvmehp0",
            "nvmehp0: device in attaching state! Deferring detach.",
            "kldhost: in sleep 1 on nvmehpbu, another thread: devctl detach nvmehp0 = 16",
            "nvmehp0: device_attach_desc = 0",
        ],
    );
    let during = &out[out.find("another thread: devctl detach nvmehp0").expect("the detach")..out.find("devctl detach nvmehp0 = 16").expect("its result")];
    assert!(!during.contains("device_detach_desc"), "the module's DEVICE_DETACH ran under its attach:\n{during}");
    assert_attached_and_clean(code, &out);
}

/// The option's mistakes are usage errors, not runs.
#[test]
fn a_bad_in_sleep_option_is_a_usage_error() {
    let ko = common::repo_root().join("nvme_hotplug.ko");
    let (code, out) = kldhost_run_with(&ko, &["--in-sleep", "nvmehpbu=reboot"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("expected WMESG[@unload][:N]=detach, =attach:SLOT, =kldunload, =notify:SLOT:VALUE or =namespace:attach|detach|reformat:NSID"),
        "{out}"
    );
}

/// devctl detach while DEVICE_SHUTDOWN's stop sleeps (`nvmehpst`, made certain by
/// `--device-fault admin-latency=30`: its Delete I/O Queue commands take 30 ms): the shutdown
/// holds the device busy, so newbus refuses the detach before calling the module (EBUSY,
/// "busy 1") and nothing is torn down under the shutdown, which then completes (CC.SHN, the
/// later write refused); the detach after it is clean. Fails if the detach reaches the
/// module's DEVICE_DETACH or tears anything down during the shutdown.
#[test]
fn a_detach_during_shutdown_is_refused_and_frees_nothing() {
    let Some(ko) = real_ko("interleave_shutdown") else { return };
    let (code, out) = kldhost_run_with(&ko, &["--qemu", "--acpi", "--shutdown", "--device-fault", "admin-latency=30", "--in-sleep", "nvmehpst=detach"]);
    assert_in_order(
        &out,
        &[
            "nvmehp0: device_shutdown_desc ->",
            "device_busy(nvmehp0) -> 1",
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl detach nvmehp0",
            "device_detach(nvmehp0) = EBUSY (busy 1)",
            "kldhost: in sleep 1 on nvmehpst, another thread: devctl detach nvmehp0 = 16",
            "device_unbusy(nvmehp0) -> 0",
            "nvmehp0: device_shutdown_desc = 0",
        ],
    );
    let from = out.find("another thread: devctl detach nvmehp0").expect("the detach");
    let to = out.find("nvmehp0: device_shutdown_desc = 0").expect("the shutdown's end");
    let during = &out[from..to];
    for never in ["device_detach_desc", "destroy_dev", "taskqueue_free(", "bus_teardown_intr(", "disk_gone("] {
        assert!(!during.contains(never), "{never} under the shutdown:\n{during}");
    }
    assert!(out.contains("shutdown device 4.0 (nvmehp0): 0"), "{out}");
    assert!(out.contains("write after the shutdown: bio_error 6, on the medium: false"), "{out}");
    assert_attached_and_clean(code, &out);
}
