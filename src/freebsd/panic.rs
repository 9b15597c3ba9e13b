//! The panic handler: a Rust panic in the kernel is a kernel panic.
//!
//! The kld is built with `panic = "abort"`; there is no unwinding and nothing could catch it.
//! So the message is formatted without allocating (the allocator may be what failed) and handed
//! to `panic(9)`, which records it, enters the debugger if configured, and dumps. The engine is
//! written so that bad device data gives errors, never panics: reaching this is a bug.

use super::bindings;
use super::cstr_buf::StackCStr;
use core::panic::PanicInfo;

#[panic_handler]
fn rust_panic(info: &PanicInfo<'_>) -> ! {
    let msg = StackCStr::<{ super::log::MSG_MAX }>::format(format_args!("nvme_hotplug: {info}"));
    // SAFETY: the message is NUL-terminated; the glue passes it to panic(9) as "%s", which
    // does not return.
    unsafe { bindings::nvmehp_panic(msg.as_ptr()) }
}
