//! The device nodes `nvmehp<U>` (controller) and `nvmehp<U>ns<N>` (namespace).
//!
//! They exist so that the node lifecycle FreeBSD got wrong three times (eternal nodes, orphan
//! nodes, use after free through a node) is exercised on every attach and detach: created with
//! `make_dev_s(9)` (never eternal, `si_drv1` set through the args), destroyed with
//! `destroy_dev(9)` by the teardown. Block I/O goes through the GEOM disk (`nvmehpd<N>`); the
//! nodes answer `open` (refused once the controller is going away or the module unloading)
//! and nothing else yet: every ioctl is ENOTTY.
//!
//! `si_drv1` points to a [`NodeCtx`], the typestate's "softc" memory, freed by the teardown
//! only after `destroy_dev` returned for every node, so a method never sees it freed.

use super::bindings;
use super::cdev::CdevSw;
use super::ctrl::CtrlRef;
use core::ffi::c_int;

/// What `si_drv1` of every node of one controller points to.
#[repr(C)]
pub struct NodeCtx {
    /// The controller, alive until after the nodes were destroyed (teardown step 4 before 5).
    pub ctrl: CtrlRef,
}

/// The cdevsw of every node. Static: it must outlive its nodes (destroy_dev_drain at unload).
pub static NODE_CDEVSW: CdevSw = CdevSw::new(bindings::cdevsw {
    d_version: bindings::D_VERSION,
    d_name: c"nvmehp".as_ptr(),
    d_open: Some(node_open),
    d_close: Some(node_close),
    d_ioctl: Some(node_ioctl),
    // SAFETY: an all-zero cdevsw is valid: no other methods, no flags (in particular no
    // D_NEEDGIANT: the methods take no lock).
    ..unsafe { core::mem::zeroed() }
});

unsafe extern "C" fn node_open(dev: *mut bindings::cdev, _oflags: c_int, _devtype: c_int, _td: *mut bindings::thread) -> c_int {
    if super::module::unloading() {
        return bindings::ENXIO;
    }
    // SAFETY: devfs calls us for our live node; si_drv1 was set before it was published and
    // stays valid until destroy_dev returned (NodeCtx is freed after that).
    let ctx = unsafe { dev.as_ref().and_then(|d| d.si_drv1.cast::<NodeCtx>().as_ref()) };
    match ctx {
        Some(c) if !c.ctrl.is_gone() => 0,
        _ => bindings::ENXIO,
    }
}

unsafe extern "C" fn node_close(_dev: *mut bindings::cdev, _fflag: c_int, _devtype: c_int, _td: *mut bindings::thread) -> c_int {
    0
}

unsafe extern "C" fn node_ioctl(
    _dev: *mut bindings::cdev,
    _cmd: core::ffi::c_ulong,
    _data: bindings::caddr_t,
    _fflag: c_int,
    _td: *mut bindings::thread,
) -> c_int {
    bindings::ENOTTY
}
