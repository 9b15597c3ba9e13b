//! Kernel messages: `printf(9)` and `device_printf(9)` with Rust formatting.
//!
//! The text is formatted in Rust into a [`StackCStr`] and handed to the glue, which prints it
//! with a fixed `"%s"` format: no format string built at run time ever reaches the kernel's
//! printf, and Rust makes no variadic call. Messages longer than
//! [`MSG_MAX`] bytes are cut (and end in `...`).

use super::bindings;
use super::cstr_buf::StackCStr;
use super::device::Device;
use core::fmt;

/// Longest message, NUL included. On the kernel stack, which is 16 KiB on amd64.
pub const MSG_MAX: usize = 256;

/// `printf(9)` of already formatted text. Use [`kprintf!`](crate::kprintf).
///
/// Never inlined: the message buffer then lives in this frame only, instead of adding
/// `MSG_MAX` bytes to every caller's (kernel stack frames must stay small).
#[inline(never)]
pub fn print(args: fmt::Arguments<'_>) {
    let msg = StackCStr::<MSG_MAX>::format(args);
    // SAFETY: a valid NUL-terminated string for the duration of the call; the glue prints it
    // with a fixed "%s" format.
    unsafe { bindings::nvmehp_print(msg.as_ptr()) }
}

/// `device_printf(9)` of already formatted text: the kernel prefixes "nvmehp0: ".
/// Use [`dev_printf!`](crate::dev_printf). Never inlined, like [`print`].
#[inline(never)]
pub fn device_print(dev: &Device, args: fmt::Arguments<'_>) {
    let msg = StackCStr::<MSG_MAX>::format(args);
    // SAFETY: `dev` is a live device_t (Device invariant); the string is NUL-terminated; the
    // glue prints it with a fixed "%s" format.
    unsafe { bindings::nvmehp_device_print(dev.as_raw(), msg.as_ptr()) }
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
