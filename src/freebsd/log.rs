//! Kernel messages: `printf(9)` and `device_printf(9)` with Rust formatting.
//!
//! The text is formatted in Rust into a [`StackCStr`] and handed to the kernel as `"%s"`, so no
//! format string built at run time ever reaches the kernel's printf. Messages longer than
//! [`MSG_MAX`] bytes are cut (and end in `...`).

use super::bindings;
use super::cstr_buf::StackCStr;
use super::device::Device;
use core::fmt;

/// Longest message, NUL included. On the kernel stack, which is 16 KiB on amd64.
pub const MSG_MAX: usize = 256;

/// `printf(9)` of already formatted text. Use [`kprintf!`](crate::kprintf).
pub fn print(args: fmt::Arguments<'_>) {
    let msg = StackCStr::<MSG_MAX>::format(args);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call, and
    // "%s" consumes exactly the one argument passed.
    unsafe {
        bindings::printf(c"%s".as_ptr(), msg.as_ptr());
    }
}

/// `device_printf(9)` of already formatted text: the kernel prefixes "nvmehp0: ".
/// Use [`dev_printf!`](crate::dev_printf).
pub fn device_print(dev: &Device, args: fmt::Arguments<'_>) {
    let msg = StackCStr::<MSG_MAX>::format(args);
    // SAFETY: `dev` is a live device_t (Device invariant); the strings are NUL-terminated and
    // "%s" consumes exactly the one argument passed.
    unsafe {
        bindings::device_printf(dev.as_raw(), c"%s".as_ptr(), msg.as_ptr());
    }
}

/// `kprintf!("nvme_hotplug: {}\n", x)`: formatted `printf(9)`. Add the newline yourself.
#[macro_export]
macro_rules! kprintf {
    ($($arg:tt)*) => { $crate::freebsd::log::print(::core::format_args!($($arg)*)) };
}

/// `dev_printf!(&dev, "CAP {:#x}\n", cap)`: formatted `device_printf(9)`.
#[macro_export]
macro_rules! dev_printf {
    ($dev:expr, $($arg:tt)*) => {
        $crate::freebsd::log::device_print($dev, ::core::format_args!($($arg)*))
    };
}
