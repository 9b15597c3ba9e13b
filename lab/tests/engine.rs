//! The engine against QEMU's real NVMe controller: bring-up, identify, namespaces and formats,
//! data integrity checked against the raw image file, MDTS splitting, typed errors.

mod common;

use common::*;
use nvme_hotplug::nvme::{IoOp, NvmeError, StatusCode};
use nvme_hotplug::platform::DmaRegion;
use nvmehp_lab::skip::qemu_or_skip;

#[test]
fn bring_up_and_identify() {
    if !qemu_or_skip("bring_up_and_identify") {
        return;
    }
    let (_m, mut ctrls) = boot(&[spec("c0", 4, &[(1, 8, 512)])]);
    let c = &mut ctrls[0];
    assert!(c.is_ready());
    let info = c.info().expect("identify data");
    assert_eq!(info.model, "QEMU NVMe Ctrl");
    assert_eq!(info.vid, 0x1b36);
    assert!(info.serial.starts_with("NVMEHPc0-g"), "serial {}", info.serial);
    assert_eq!(info.mdts_bytes, 512 * 1024, "MDTS 7 with 4 KiB pages");
    assert!(info.io_queues >= 1);
    assert_eq!(c.namespaces().len(), 1);
    assert_eq!(c.outstanding(), 0);
    c.shutdown().expect("clean shutdown");
    assert!(!c.is_ready());
}

#[test]
fn two_namespaces_and_both_formats_on_one_controller() {
    if !qemu_or_skip("two_namespaces_and_both_formats_on_one_controller") {
        return;
    }
    let (m, mut ctrls) = boot(&[spec("c0", 5, &[(1, 16, 4096), (2, 8, 512)])]);
    let c = &mut ctrls[0];
    let ns: Vec<_> = c.namespaces().iter().map(|n| (n.nsid, n.lba_bytes, n.capacity)).collect();
    assert_eq!(ns, vec![(1, 4096, 16 << 20), (2, 512, 8 << 20)]);
    // Each namespace writes to its own image, at the right byte offset for its format.
    let (b1, d1) = pattern_buf(c, 8192, 1);
    io(c, IoOp::Write, 1, 10, &b1).unwrap();
    let (b2, d2) = pattern_buf(c, 4096, 2);
    io(c, IoOp::Write, 2, 10, &b2).unwrap();
    assert_eq!(read_image(&image(&m, 5, 1), 10 * 4096, 8192), d1);
    assert_eq!(read_image(&image(&m, 5, 2), 10 * 512, 4096), d2);
    drop((b1, b2));
    c.shutdown().unwrap();
}

#[test]
fn write_read_verify_against_the_image() {
    if !qemu_or_skip("write_read_verify_against_the_image") {
        return;
    }
    for lba_bytes in [512u32, 4096] {
        let (m, mut ctrls) = boot(&[spec("c0", 4, &[(1, 8, lba_bytes)])]);
        let c = &mut ctrls[0];
        let img = image(&m, 4, 1);
        for (k, (lba, len)) in [(0u64, 4096usize), (7, 12288), (1000, 65536)].into_iter().enumerate() {
            let (buf, data) = pattern_buf(c, len, k as u8 + 3);
            io(c, IoOp::Write, 1, lba, &buf).unwrap();
            assert_eq!(read_image(&img, lba * lba_bytes as u64, len), data, "image, lba {lba}, {lba_bytes} B blocks");
            buf.write(0, &vec![0xee; len]);
            io(c, IoOp::Read, 1, lba, &buf).unwrap();
            let mut back = vec![0; len];
            buf.read(0, &mut back);
            assert_eq!(back, data, "read back, lba {lba}");
        }
        io(c, IoOp::Flush, 1, 0, &pattern_buf(c, 4096, 0).0).unwrap();
        c.shutdown().unwrap();
        assert_eq!(m.guest().live_dma_bytes(), 0, "engine freed its queues");
    }
}

#[test]
fn io_above_mdts_is_split_and_lands_intact() {
    if !qemu_or_skip("io_above_mdts_is_split_and_lands_intact") {
        return;
    }
    let (m, mut ctrls) = boot(&[spec("c0", 4, &[(1, 16, 512)])]);
    let c = &mut ctrls[0];
    let len = 2 << 20; // 2 MiB: four commands at MDTS 512 KiB
    let (buf, data) = pattern_buf(c, len, 9);
    let before = c.stats().split_requests;
    io(c, IoOp::Write, 1, 2048, &buf).unwrap();
    assert_eq!(c.stats().split_requests, before + 1);
    assert_eq!(read_image(&image(&m, 4, 1), 2048 * 512, len), data);
    buf.write(0, &vec![0u8; len]);
    io(c, IoOp::Read, 1, 2048, &buf).unwrap();
    let mut back = vec![0; len];
    buf.read(0, &mut back);
    assert!(back == data, "2 MiB read back intact");
}

#[test]
fn out_of_range_lba_is_a_typed_error() {
    if !qemu_or_skip("out_of_range_lba_is_a_typed_error") {
        return;
    }
    let (_m, mut ctrls) = boot(&[spec("c0", 4, &[(1, 1, 512)])]);
    let c = &mut ctrls[0];
    let blocks = c.namespaces()[0].blocks;
    assert_eq!(blocks, 2048);
    let (buf, _) = pattern_buf(c, 4096, 1);
    for lba in [blocks, blocks - 4, u64::MAX - 100] {
        match io(c, IoOp::Write, 1, lba, &buf) {
            Err(NvmeError::Status(s)) => {
                assert_eq!(s.code, StatusCode::LbaOutOfRange, "lba {lba}: {s:?}");
                assert!(s.dnr);
            }
            Err(NvmeError::InvalidRequest(_)) => assert!(lba > blocks, "lba {lba} refused by the engine"),
            other => panic!("lba {lba}: expected a typed error, got {other:?}"),
        }
    }
    // Unknown namespace and a bad buffer length are refused before reaching the device.
    assert!(matches!(io(c, IoOp::Read, 9, 0, &buf), Err(NvmeError::InvalidRequest(_))));
    assert!(matches!(c.io_sync(req(IoOp::Read, 1, 0, 3, &buf, 5)), Err(NvmeError::InvalidRequest(_))));
    // The controller is still fine afterwards.
    io(c, IoOp::Write, 1, 0, &buf).unwrap();
    assert!(c.is_ready());
}
