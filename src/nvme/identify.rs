//! Parsing and validating Identify Controller and Identify Namespace data (NVMe 1.4 §5.15).
//!
//! Every field the engine later relies on for sizing or indexing is checked here, so the rest
//! of the engine can use the parsed values without re-checking: a value outside what the spec
//! allows becomes a [`NvmeError::BadDevice`] (controller) or a rejected namespace, never a
//! panic or an out-of-bounds index.

use alloc::vec::Vec;

use super::error::NvmeError;
use super::ns::{Namespace, NsUid};
use super::regs::{Version, PAGE_SIZE};

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Upper bound on one command's transfer, whatever MDTS says (MDTS 0 means "no limit").
/// 1 MiB is 256 pages: a PRP list for it always fits in one 4 KiB list page, so the engine
/// never builds chained PRP lists.
pub const MAX_TRANSFER_BYTES: u32 = 1 << 20;

/// What the engine knows about a controller after bring-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI Vendor ID from Identify.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial number (printable ASCII, trailing spaces trimmed; other bytes shown as '?').
    pub serial: Ascii<20>,
    /// Model number.
    pub model: Ascii<40>,
    /// Firmware revision.
    pub firmware: Ascii<8>,
    /// Largest transfer per command in bytes (MDTS, capped at [`MAX_TRANSFER_BYTES`]).
    pub mdts_bytes: u32,
    /// Number of Namespaces as reported (the engine only looks at `min(nn, max_namespaces)`).
    pub nn: u32,
    /// Controller ID.
    pub cntlid: u16,
    /// Version register (VS).
    pub version: Version,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Asynchronous Event Request Limit (0-based).
    pub aerl: u8,
    /// Volatile Write Cache present.
    pub vwc: bool,
    /// I/O queue pairs granted by Set Features (Number of Queues) and created.
    pub io_queues: u16,
    /// Entries per I/O queue.
    pub io_entries: u16,
}

fn le16(d: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([d[o], d[o + 1]])
}
fn le32(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]])
}
fn le64(d: &[u8], o: usize) -> u64 {
    le32(d, o) as u64 | (le32(d, o + 4) as u64) << 32
}

/// A space-padded ASCII field of Identify data as printable text, kept inline (`N` bytes, the
/// field's size): no heap allocation, so parsing cannot fail for want of memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ascii<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Ascii<N> {
    /// The text: printable ASCII, trailing spaces trimmed.
    pub fn as_str(&self) -> &str {
        // Only bytes 0x20..0x7f are stored (see `ascii`), which are UTF-8.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> core::ops::Deref for Ascii<N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> core::fmt::Display for Ascii<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> core::fmt::Debug for Ascii<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> PartialEq<&str> for Ascii<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<const N: usize> PartialEq<str> for Ascii<N> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// Turns a space-padded ASCII field into printable text: bytes outside 0x20..0x7f become '?'
/// (NUL a space), trailing spaces are trimmed. Longer fields are cut at `N` bytes.
fn ascii<const N: usize>(field: &[u8]) -> Ascii<N> {
    let mut buf = [b' '; N];
    for (d, &b) in buf.iter_mut().zip(field) {
        *d = if (0x20..0x7f).contains(&b) {
            b
        } else if b == 0 {
            b' '
        } else {
            b'?'
        };
    }
    let len = buf.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    Ascii { buf, len }
}

/// Parses Identify Controller data. `version` is the VS register already read.
pub fn parse_controller(d: &[u8], version: Version) -> Result<ControllerInfo, NvmeError> {
    if d.len() < IDENTIFY_LEN {
        return Err(NvmeError::BadDevice("identify controller data too short"));
    }
    if d[..IDENTIFY_LEN].iter().all(|&b| b == 0) {
        // A controller that completes Identify successfully but never wrote the buffer.
        return Err(NvmeError::BadDevice("identify controller data is all zero"));
    }
    let mdts = d[77];
    let sqes = d[512];
    let cqes = d[513];
    // The entry sizes we program are 64/16 bytes: the device must allow them.
    if sqes & 0xf > 6 || sqes >> 4 < 6 {
        return Err(NvmeError::BadDevice(
            "SQES does not allow 64-byte submission entries",
        ));
    }
    if cqes & 0xf > 4 || cqes >> 4 < 4 {
        return Err(NvmeError::BadDevice(
            "CQES does not allow 16-byte completion entries",
        ));
    }
    Ok(ControllerInfo {
        vid: le16(d, 0),
        ssvid: le16(d, 2),
        serial: ascii(&d[4..24]),
        model: ascii(&d[24..64]),
        firmware: ascii(&d[64..72]),
        mdts_bytes: mdts_bytes(mdts),
        nn: le32(d, 516),
        cntlid: le16(d, 78),
        version,
        oacs: le16(d, 256),
        aerl: d[259],
        vwc: d[525] & 1 != 0,
        io_queues: 0,
        io_entries: 0,
    })
}

/// MDTS is a power of two in units of the minimum page size (4 KiB, enforced at bring-up);
/// 0 means unlimited. Both "unlimited" and absurd exponents are capped.
pub fn mdts_bytes(mdts: u8) -> u32 {
    if mdts == 0 || mdts >= 20 {
        return MAX_TRANSFER_BYTES;
    }
    ((PAGE_SIZE as u64) << mdts).min(MAX_TRANSFER_BYTES as u64) as u32
}

/// Parses Identify Namespace data for `nsid`. Returns the reason for rejecting it otherwise.
/// `mdts_bytes` is needed because a block larger than one command's transfer is unusable.
/// `Ok(None)` means "inactive" (all-zero data, NSZE = 0), which is normal when probing NSIDs
/// without an active list.
pub fn parse_namespace(
    nsid: u32,
    d: &[u8],
    mdts_bytes: u32,
) -> Result<Option<Namespace>, &'static str> {
    if d.len() < IDENTIFY_LEN {
        return Err("identify namespace data too short");
    }
    let nsze = le64(d, 0);
    let ncap = le64(d, 8);
    let nuse = le64(d, 16);
    if nsze == 0 && ncap == 0 {
        return Ok(None);
    }
    if nsze == 0 || ncap == 0 {
        return Err("NSZE or NCAP is zero");
    }
    if ncap > nsze {
        return Err("NCAP larger than NSZE");
    }
    if nuse > ncap {
        return Err("NUSE larger than NCAP");
    }
    let nlbaf = d[25] as usize; // 0-based count of formats
    let flbas = d[26];
    if nlbaf > 63 {
        return Err("NLBAF above 63");
    }
    let mut index = (flbas & 0xf) as usize;
    if nlbaf > 15 {
        index |= (((flbas >> 5) & 0x3) as usize) << 4; // NVMe 2.0: FLBAS bits 6:5 extend it
    }
    if index > nlbaf {
        return Err("FLBAS selects a format beyond NLBAF");
    }
    let lbaf = le32(d, 128 + 4 * index); // index <= 63 keeps this inside the 4 KiB page
    let ms = lbaf & 0xffff;
    let lbads = (lbaf >> 16) & 0xff;
    if !(9..=16).contains(&lbads) {
        return Err("LBADS outside 512 B..64 KiB");
    }
    if ms != 0 {
        return Err("formats with metadata are not supported");
    }
    let lba_bytes = 1u32 << lbads;
    if lba_bytes > mdts_bytes {
        return Err("one block is larger than MDTS");
    }
    let capacity = nsze
        .checked_mul(lba_bytes as u64)
        .ok_or("NSZE x block size overflows")?;
    let mut nguid = [0u8; 16];
    nguid.copy_from_slice(&d[104..120]);
    let mut eui64 = [0u8; 8];
    eui64.copy_from_slice(&d[120..128]);
    Ok(Some(Namespace {
        nsid,
        lba_shift: lbads,
        lba_bytes,
        blocks: nsze,
        capacity,
        uid: NsUid::from_fields(nguid, eui64),
    }))
}

/// Parses an Active Namespace ID list page (CNS 02h). NSIDs must be strictly ascending,
/// greater than `after`, and not above `nn`; the list ends at the first zero. At most
/// `limit` IDs are returned. Returns `(ids, page_was_full)`.
pub fn parse_ns_list(
    d: &[u8],
    after: u32,
    nn: u32,
    limit: usize,
) -> Result<(Vec<u32>, bool), NvmeError> {
    let mut ids = Vec::new();
    let mut prev = after;
    let entries = d.len().min(IDENTIFY_LEN) / 4;
    for i in 0..entries {
        let id = le32(d, i * 4);
        if id == 0 {
            return Ok((ids, false));
        }
        if id <= prev {
            return Err(NvmeError::BadDevice("active namespace list not ascending"));
        }
        if id > nn || id == u32::MAX {
            return Err(NvmeError::BadDevice(
                "active namespace list has an NSID above NN",
            ));
        }
        if ids.len() >= limit {
            return Ok((ids, false));
        }
        crate::fallible::try_push(&mut ids, id).map_err(|_| NvmeError::OutOfMemory("the namespace list"))?;
        prev = id;
    }
    Ok((ids, entries == IDENTIFY_LEN / 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctrl_page() -> Vec<u8> {
        let mut d = alloc::vec![0u8; IDENTIFY_LEN];
        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        d[4..24].copy_from_slice(b"abc                 ");
        d[24..38].copy_from_slice(b"QEMU NVMe Ctrl");
        d[77] = 7;
        d[512] = 0x66;
        d[513] = 0x44;
        d[516..520].copy_from_slice(&256u32.to_le_bytes());
        d
    }

    #[test]
    fn qemu_like_controller() {
        let c = parse_controller(&ctrl_page(), Version::decode(0x10400)).unwrap();
        assert_eq!(c.vid, 0x1b36);
        assert_eq!(c.serial, "abc");
        assert_eq!(c.model, "QEMU NVMe Ctrl");
        assert_eq!(c.mdts_bytes, 512 * 1024);
        assert_eq!(c.nn, 256);
    }

    #[test]
    fn bad_controller_fields() {
        let mut d = ctrl_page();
        d[512] = 0x77;
        assert!(matches!(
            parse_controller(&d, Version::decode(0)),
            Err(NvmeError::BadDevice(_))
        ));
        let z = alloc::vec![0u8; IDENTIFY_LEN];
        assert!(parse_controller(&z, Version::decode(0)).is_err());
        assert!(parse_controller(&z[..100], Version::decode(0)).is_err());
    }

    #[test]
    fn mdts_caps() {
        assert_eq!(mdts_bytes(0), MAX_TRANSFER_BYTES);
        assert_eq!(mdts_bytes(1), 8192);
        assert_eq!(mdts_bytes(255), MAX_TRANSFER_BYTES);
    }

    fn ns_page(nsze: u64, ncap: u64, nuse: u64, lbads: u8) -> Vec<u8> {
        let mut d = alloc::vec![0u8; IDENTIFY_LEN];
        d[0..8].copy_from_slice(&nsze.to_le_bytes());
        d[8..16].copy_from_slice(&ncap.to_le_bytes());
        d[16..24].copy_from_slice(&nuse.to_le_bytes());
        d[128 + 2] = lbads;
        d
    }

    /// NGUID wins over EUI64, EUI64 is used alone, neither is none; the hex is the bytes in
    /// the controller's order. Fails when the offsets or the priority are wrong.
    #[test]
    fn namespace_unique_id() {
        let mut d = ns_page(100, 100, 10, 9);
        let id = |d: &[u8]| parse_namespace(1, d, 4096).unwrap().unwrap().uid;
        assert_eq!(id(&d), NsUid::None);
        d[120..128].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0, 0, 0x07]);
        assert_eq!(id(&d), NsUid::Eui64([0x52, 0x54, 0, 0, 0, 0, 0, 0x07]));
        let mut out = [0u8; super::super::ns::NS_UID_HEX_MAX];
        assert_eq!(id(&d).hex(&mut out), Some(&b"5254000000000007"[..]));
        for (i, b) in d[104..120].iter_mut().enumerate() {
            *b = 0xf0 | i as u8;
        }
        let nguid = id(&d);
        assert!(matches!(nguid, NsUid::Nguid(b) if b[0] == 0xf0 && b[15] == 0xff));
        assert_eq!(nguid.hex(&mut out), Some(&b"f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"[..]));
        assert_eq!(NsUid::None.hex(&mut out), None);
    }

    #[test]
    fn namespace_validation() {
        let ns = parse_namespace(1, &ns_page(100, 100, 10, 9), 4096)
            .unwrap()
            .unwrap();
        assert_eq!((ns.lba_bytes, ns.blocks, ns.capacity), (512, 100, 51200));
        assert_eq!(parse_namespace(1, &ns_page(0, 0, 0, 9), 4096), Ok(None));
        assert!(parse_namespace(1, &ns_page(10, 11, 0, 9), 4096).is_err());
        assert!(parse_namespace(1, &ns_page(10, 10, 11, 9), 4096).is_err());
        assert!(parse_namespace(1, &ns_page(10, 10, 0, 8), 4096).is_err());
        assert!(parse_namespace(1, &ns_page(10, 10, 0, 17), 4096).is_err());
        assert!(parse_namespace(1, &ns_page(10, 10, 0, 13), 4096).is_err());
        assert!(parse_namespace(1, &ns_page(u64::MAX, 1, 0, 12), 1 << 20).is_err());
        let mut d = ns_page(10, 10, 0, 12);
        d[26] = 1; // FLBAS 1 with NLBAF 0
        assert!(parse_namespace(1, &d, 4096).is_err());
    }

    #[test]
    fn ns_list_rules() {
        let mut d = alloc::vec![0u8; IDENTIFY_LEN];
        for (i, id) in [1u32, 2, 5].iter().enumerate() {
            d[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
        }
        assert_eq!(
            parse_ns_list(&d, 0, 8, 100).unwrap(),
            (alloc::vec![1, 2, 5], false)
        );
        assert_eq!(parse_ns_list(&d, 0, 8, 2).unwrap().0, alloc::vec![1, 2]);
        assert!(parse_ns_list(&d, 0, 4, 100).is_err());
        assert!(parse_ns_list(&d, 1, 8, 100).is_err());
        d[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_ns_list(&d, 0, 8, 100).is_err());
    }
}
