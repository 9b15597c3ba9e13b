//! GEOM attributes of the shipped .ko's disks on QEMU: `run --qemu --getattr GEOM::NAME[:LEN]`
//! sends a BIO_GETATTR to every disk as geom_disk.c `g_disk_start` does (the driver's
//! `d_getattr` first, then the `struct disk` fields), and the answers are compared with what
//! QEMU's devices are: the NGUID the lab gave each namespace (`nvmehp_lab::machine::nguid`) and
//! the PCI IDs of QEMU's NVMe controller.
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::{assert_clean_unload, kldhost_run_with, real_ko_on_qemu};

/// The answer line `kldhost run` prints for `attr` of `disk` with a `len`-byte buffer:
/// (error, value).
fn answer(out: &str, disk: &str, attr: &str, len: usize) -> (i32, String) {
    let tag = format!("getattr {disk} {attr} ({len} bytes): error ");
    let line = out.lines().find_map(|l| l.split_once(&tag).map(|(_, r)| r)).unwrap_or_else(|| panic!("no `{tag}` in:\n{out}"));
    let (e, v) = line.split_once(", value \"").expect("error, value");
    (e.parse().expect("errno"), v.trim_end_matches('"').to_string())
}

/// sys/sys/errno.h (kernel): EFAULT, and ENOIOCTL, g_disk_start's "no such attribute".
const EFAULT: i32 = 14;
const ENOIOCTL: i32 = -3;

/// The module's controller in an NVMe subsystem with namespaces 1 and 2, each given its own
/// NGUID by the lab: GEOM::lunid of each disk is that NGUID in hex, answered by the driver's
/// d_getattr itself (as nvd_getattr does), so the two disks of one controller, which share
/// GEOM::ident (the controller's serial), are told apart (`geom disk list`'s lunid); a buffer one byte
/// short of the 32 digits and their NUL is EFAULT with nothing written, an exact one is
/// answered. Fails when the driver has no d_getattr (GEOM answers ENOIOCTL), reads the wrong
/// Identify bytes, prints them in another order, or overruns a short buffer.
#[test]
fn each_namespace_reports_its_own_nguid_as_lunid() {
    let Some(ko) = real_ko_on_qemu("attrs_nguid") else { return };
    // A namespace step turns on the subsystem; the attributes are asked before it.
    let args = ["--qemu", "--acpi", "--namespace", "detach:2", "--getattr", "GEOM::lunid", "--getattr", "GEOM::lunid:32", "--getattr", "GEOM::lunid:33", "--getattr", "GEOM::ident"];
    let (code, out) = kldhost_run_with(&ko, &args);
    // The lab's controller serial is NVMEHP + the qdev id of this plug, which the NGUIDs use.
    let (e, serial) = answer(&out, "nvmehpd0", "GEOM::ident", 256);
    let qdev = serial.strip_prefix("NVMEHP").filter(|_| e == 0).unwrap_or_else(|| panic!("ident {serial:?}:\n{out}"));
    for (disk, nsid) in [("nvmehpd0", 1), ("nvmehpd1", 2)] {
        let nguid = nvmehp_lab::machine::nguid(qdev, nsid);
        assert_eq!(answer(&out, disk, "GEOM::lunid", 256), (0, nguid.clone()), "{disk}:\n{out}");
        assert_eq!(answer(&out, disk, "GEOM::lunid", 33), (0, nguid), "{disk}:\n{out}");
        assert_eq!(answer(&out, disk, "GEOM::lunid", 32).0, EFAULT, "{disk}:\n{out}");
        assert!(out.contains(&format!("g_down: d_getattr({disk}, GEOM::lunid, 256 bytes) = 0")), "not the driver's answer:\n{out}");
    }
    assert_eq!(answer(&out, "nvmehpd0", "GEOM::ident", 256), answer(&out, "nvmehpd1", "GEOM::ident", 256), "{out}");
    assert_clean_unload(code, &out);
}

/// QEMU's built-in namespace of a plain `nvme` device has neither NGUID nor EUI64: the driver
/// leaves GEOM::lunid to GEOM (d_getattr -1, then ENOIOCTL, as nvd(4)); and the attributes GEOM
/// answers from the disk's fields say what nvd_new_disk fills in: a non-rotating medium (so
/// ZFS marks the vdev non-rotational), the controller's device name as the attachment, and the
/// controller's PCI IDs (QEMU's NVMe controller: 1b36:0010, subsystem 1af4:1100,
/// hw/nvme/ctrl.c `nvme_init_pci`). Fails when the driver invents a lunid, leaves the rotation
/// rate "unknown" (0), or the attachment or an HBA ID empty.
#[test]
fn a_disk_says_it_is_solid_state_and_names_its_controller() {
    let Some(ko) = real_ko_on_qemu("attrs_plain") else { return };
    let mut args = vec!["--qemu"];
    let attrs = ["GEOM::lunid", "GEOM::rotation_rate", "GEOM::attachment", "GEOM::hba_vendor", "GEOM::hba_device", "GEOM::hba_subvendor", "GEOM::hba_subdevice", "GEOM::candelete"];
    for a in attrs {
        args.extend(["--getattr", a]);
    }
    // g_handleattr_uint16_t into a 4-byte buffer: EFAULT, as in geom_subr.c g_handleattr.
    args.extend(["--getattr", "GEOM::rotation_rate:4"]);
    let (code, out) = kldhost_run_with(&ko, &args);
    assert!(out.contains("g_down: d_getattr(nvmehpd0, GEOM::lunid, 256 bytes) = -1"), "{out}");
    assert_eq!(answer(&out, "nvmehpd0", "GEOM::lunid", 256).0, ENOIOCTL, "{out}");
    // geom_disk.h DISK_RR_NON_ROTATING.
    assert_eq!(answer(&out, "nvmehpd0", "GEOM::rotation_rate", 2), (0, "1".to_string()), "{out}");
    assert_eq!(answer(&out, "nvmehpd0", "GEOM::rotation_rate", 4).0, EFAULT, "{out}");
    assert_eq!(answer(&out, "nvmehpd0", "GEOM::attachment", 256), (0, "nvmehp0".to_string()), "{out}");
    for (attr, id) in [("GEOM::hba_vendor", 0x1b36), ("GEOM::hba_device", 0x0010), ("GEOM::hba_subvendor", 0x1af4), ("GEOM::hba_subdevice", 0x1100)] {
        assert_eq!(answer(&out, "nvmehpd0", attr, 2), (0, id.to_string()), "{attr}:\n{out}");
    }
    // No BIO_DELETE support is advertised (the driver refuses BIO_DELETE).
    assert_eq!(answer(&out, "nvmehpd0", "GEOM::candelete", 4), (0, "0".to_string()), "{out}");
    assert_clean_unload(code, &out);
}

/// `--getattr` arguments are checked before anything runs (no QEMU or .ko needed): a name
/// outside GEOM's namespace, an empty one, a zero or huge buffer are usage errors (exit 2).
/// Fails when the parser accepts any of them.
#[test]
fn a_bad_getattr_argument_is_a_usage_error() {
    let ko = std::path::Path::new("no-such.ko");
    for (arg, said) in [("lunid", "expected GEOM::NAME[:LEN]"), ("GEOM::", "expected GEOM::NAME[:LEN]"), ("GEOM::lunid:0", "1..4096 bytes"), ("GEOM::lunid:5000", "1..4096 bytes")] {
        let (code, out) = kldhost_run_with(ko, &["--qemu", "--getattr", arg]);
        assert_eq!(code, Some(2), "{arg}:\n{out}");
        assert!(out.contains(said), "{arg}: {said} not said:\n{out}");
    }
}
