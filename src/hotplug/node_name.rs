//! Names of our device nodes: `nvmehp<U>` for a controller, `nvmehp<U>ns<N>` for a namespace.
//!
//! The prefix differs from nvme(4)'s `nvme<U>` so that both drivers can coexist on one machine
//! without a duplicate-name panic (make_dev without MAKEDEV_CHECKNAME panics on duplicates,
//! kern_conf.c make_dev_sv). The name is built in a fixed buffer: no allocation, always
//! NUL-terminated for
//! make_dev_s(9)'s `"%s"` format.

use core::fmt::{self, Write};

/// Prefix of every node name.
pub const PREFIX: &str = "nvmehp";
/// disk(9) `d_name` of our namespace disks (`/dev/nvmehpd<N>`).
pub const DISK_NAME: &str = "nvmehpd";

/// Longest name: "nvmehp" + 10 digits + "ns" + 10 digits = 28, plus NUL.
const CAP: usize = 32;

/// A node name; only the two constructors below can make one, so no other name can be created.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NodeName {
    buf: [u8; CAP],
    len: u8,
}

impl NodeName {
    /// `nvmehp<unit>`: the controller node.
    pub fn controller(unit: u32) -> Self {
        Self::format(format_args!("{PREFIX}{unit}"))
    }

    /// `nvmehp<unit>ns<nsid>`: a namespace node.
    pub fn namespace(unit: u32, nsid: u32) -> Self {
        Self::format(format_args!("{PREFIX}{unit}ns{nsid}"))
    }

    fn format(args: fmt::Arguments<'_>) -> Self {
        let mut n = NodeName { buf: [0; CAP], len: 0 };
        // Cannot fail: the longest possible name fits (see CAP).
        let _ = n.write_fmt(args);
        n
    }

    /// The name without NUL.
    pub fn as_str(&self) -> &str {
        // Only ASCII was ever written.
        core::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }

    /// The name with its terminating NUL, for C.
    pub fn as_bytes_with_nul(&self) -> &[u8] {
        &self.buf[..self.len as usize + 1]
    }
}

impl Write for NodeName {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let start = self.len as usize;
        let end = start + s.len();
        if end >= CAP {
            return Err(fmt::Error);
        }
        self.buf[start..end].copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(NodeName::controller(0).as_str(), "nvmehp0");
        assert_eq!(NodeName::namespace(3, 12).as_str(), "nvmehp3ns12");
        let max = NodeName::namespace(u32::MAX, u32::MAX);
        assert_eq!(max.as_str(), "nvmehp4294967295ns4294967295");
        assert_eq!(max.as_bytes_with_nul().last(), Some(&0));
    }
}
