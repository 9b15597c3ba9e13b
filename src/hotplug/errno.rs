//! FreeBSD errno values the hotplug and teardown code returns (sys/sys/errno.h).
//!
//! Kept as a tiny newtype instead of a C binding so the OS-neutral code and its host tests use
//! the very numbers the kernel will see.

/// A FreeBSD errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// Device not configured: what every request to a removed controller completes with.
    pub const ENXIO: Errno = Errno(6);
    /// Cannot allocate memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Device busy: detach or kldunload refused while a node or disk is open.
    pub const EBUSY: Errno = Errno(16);
    /// File exists: make_dev_s(9) with MAKEDEV_CHECKNAME on a duplicate name.
    pub const EEXIST: Errno = Errno(17);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(22);
    /// File name too long: make_dev_s(9) with MAKEDEV_CHECKNAME.
    pub const ENAMETOOLONG: Errno = Errno(63);
}
