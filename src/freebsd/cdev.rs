//! Device nodes: `make_dev_s(9)` and the ways to destroy them.
//!
//! The rules (sys/kern/kern_conf.c; docs/freebsd-kpi.md section 5) this module makes hard to break:
//! - **Never eternal.** A node created with `MAKEDEV_ETERNAL` is skipped by the thread counting
//!   that makes `destroy_dev(9)` safe, and destroying it panics (INVARIANTS) or frees memory
//!   under running threads. The flag is not even in our bindings; [`Cdev::create`] always
//!   passes `MAKEDEV_CHECKNAME | MAKEDEV_WAITOK`, so a bad or duplicate name is an error, not
//!   a panic.
//! - **`si_drv1` is set through the args**, so it is visible before devfs publishes the node:
//!   an `open()` racing with creation never sees it unset.
//! - **Every node is destroyed.** A [`Cdev`] is an owning handle: dropping it destroys the node
//!   (waiting until no thread is inside a method), or it is handed to
//!   [`Cdev::destroy_deferred`] where sleeping is not allowed. An orphan node is impossible
//!   without `mem::forget`.
//! - **The cdevsw outlives its nodes.** A [`CdevSw`] is `'static`; at module unload
//!   [`CdevSw::drain`] waits until every deferred destruction has finished.

use super::bindings;
use super::cstr_buf::StackCStr;
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void};
use core::fmt;
use core::ptr::NonNull;

/// A `struct cdevsw` in static storage. The kernel writes to it (it links the nodes created
/// with it and marks it initialised), hence the cell.
#[repr(transparent)]
pub struct CdevSw(UnsafeCell<bindings::cdevsw>);

// SAFETY: after construction only the kernel writes to the cdevsw, under its devmtx.
unsafe impl Sync for CdevSw {}

impl CdevSw {
    /// Wraps a cdevsw value (typically `bindings::cdevsw { d_version: D_VERSION as u32,
    /// d_name: .., d_open: Some(..), ..unsafe { core::mem::zeroed() } }`).
    pub const fn new(sw: bindings::cdevsw) -> Self {
        CdevSw(UnsafeCell::new(sw))
    }

    fn as_ptr(&'static self) -> *mut bindings::cdevsw {
        self.0.get()
    }

    /// `destroy_dev_drain(9)`: waits until every node of this cdevsw scheduled for destruction
    /// (see [`Cdev::destroy_deferred`]) is gone and its callbacks have run. Call at module
    /// unload, after the last node was handed over, from a sleepable context.
    pub fn drain(&'static self) {
        // SAFETY: the cdevsw is static and was used only for make_dev_s.
        unsafe { bindings::destroy_dev_drain(self.as_ptr()) }
    }
}

/// Ownership and permissions of a new node.
#[derive(Clone, Copy, Debug)]
pub struct NodePerms {
    /// Owner (UID_ROOT for disks).
    pub uid: u32,
    /// Group (GID_OPERATOR for disks).
    pub gid: u32,
    /// Mode, e.g. 0o640.
    pub mode: c_int,
}

impl NodePerms {
    /// root:operator 0640, the usual storage node permissions.
    pub const DISK: NodePerms =
        NodePerms { uid: bindings::UID_ROOT as u32, gid: bindings::GID_OPERATOR as u32, mode: 0o640 };
}

/// The flags of every node this driver creates: a bad or duplicate name is an error
/// (CHECKNAME), creation may sleep (WAITOK), and never `MAKEDEV_ETERNAL` (0x10 in sys/conf.h),
/// whose nodes may never be destroyed (kern_conf.c destroy_devl).
pub const NODE_FLAGS: c_int = bindings::MAKEDEV_CHECKNAME | bindings::MAKEDEV_WAITOK;
/// `MAKEDEV_ETERNAL` from sys/conf.h, only to assert that it is never passed.
const MAKEDEV_ETERNAL: c_int = 0x10;
const _: () = assert!(NODE_FLAGS & MAKEDEV_ETERNAL == 0, "device nodes must never be eternal");

/// A device node we created. Dropping it destroys it (`destroy_dev(9)`, which sleeps).
pub struct Cdev {
    raw: NonNull<bindings::cdev>,
}

// SAFETY: cdev operations are thread-safe (devmtx); the handle is the only owner.
unsafe impl Send for Cdev {}
// SAFETY: &Cdev only exposes the raw pointer.
unsafe impl Sync for Cdev {}

impl Cdev {
    /// `make_dev_s(9)`: creates `/dev/<name>` served by `sw`, with `drv1` in `si_drv1`.
    ///
    /// Sleeps (MAKEDEV_WAITOK). Errors: EEXIST (name taken), EINVAL or ENAMETOOLONG (bad
    /// name), from MAKEDEV_CHECKNAME. `drv1` must stay valid until the node is destroyed; the
    /// cdevsw methods that dereference it are the caller's (unsafe) code.
    pub fn create(
        sw: &'static CdevSw,
        unit: c_int,
        perms: NodePerms,
        drv1: *mut c_void,
        name: fmt::Arguments<'_>,
    ) -> Result<Cdev, c_int> {
        let name = StackCStr::<{ bindings::SPECNAMELEN as usize + 1 }>::format(name);
        if name.truncated() {
            return Err(bindings::ENAMETOOLONG);
        }
        let mut args = bindings::make_dev_args::default();
        // SAFETY: make_dev_args_init zeroes the struct and sets its size.
        unsafe { bindings::nvmehp_make_dev_args_init(&mut args) };
        args.mda_flags = NODE_FLAGS;
        args.mda_devsw = sw.as_ptr();
        args.mda_uid = perms.uid;
        args.mda_gid = perms.gid;
        args.mda_mode = perms.mode;
        args.mda_unit = unit;
        args.mda_si_drv1 = drv1;
        let mut out: *mut bindings::cdev = core::ptr::null_mut();
        // SAFETY: initialised args with a static cdevsw; the name is NUL-terminated (the glue
        // passes it as "%s"); `out` is a valid out pointer.
        let err = unsafe { bindings::nvmehp_make_dev_s(&mut args, &mut out, name.as_ptr()) };
        if err != 0 {
            return Err(err);
        }
        NonNull::new(out).map(|raw| Cdev { raw }).ok_or(bindings::ENXIO)
    }

    /// The `struct cdev *` (e.g. to compare with the one a method was called for).
    pub fn as_raw(&self) -> *mut bindings::cdev {
        self.raw.as_ptr()
    }

    /// The node is open (`si_usecount`) or a thread is inside one of its methods
    /// (`si_threadcount`). A hint for unload policy, stale as soon as it is returned: the
    /// fields are read without dev_lock (the kernel updates them atomically or under it).
    pub fn in_use(&self) -> bool {
        let cdev = self.raw.as_ptr();
        // SAFETY: reads of two word-sized fields of our live cdev; a racy read is acceptable
        // for a hint and cannot tear on amd64.
        let (users, threads) = unsafe {
            (
                (&raw const (*cdev).si_usecount).read_volatile(),
                (&raw const (*cdev).si_threadcount).read_volatile(),
            )
        };
        users > 0 || threads > 0
    }

    /// Destroys the node now; same as dropping it. Returns once no thread is inside one of
    /// its methods and none will enter again: the `drv1` memory may be freed afterwards.
    pub fn destroy(self) {
        drop(self)
    }

    /// `destroy_dev_sched_cb(9)`: for contexts that must not sleep (e.g. a cdevsw method of
    /// this very node). The node disappears from /dev at once; the destruction completes on
    /// a kernel thread, which then calls `cb(arg)`: free `drv1` there, not before.
    /// Drain with [`CdevSw::drain`] before the module (and `cb`) goes away.
    ///
    /// # Safety
    /// Calling `cb(arg)` once, later, on a kernel thread must be sound: `arg` stays valid
    /// until then.
    pub unsafe fn destroy_deferred(self, cb: Option<unsafe extern "C" fn(*mut c_void)>, arg: *mut c_void) {
        let raw = self.raw.as_ptr();
        core::mem::forget(self); // ownership passes to the kernel's destroy thread
        // SAFETY: our node, destroyed once (the handle was consumed); `cb(arg)` is sound per
        // this function's contract. destroy_dev_sched_cb always succeeds.
        unsafe { bindings::destroy_dev_sched_cb(raw, cb, arg) };
    }
}

impl Drop for Cdev {
    fn drop(&mut self) {
        // SAFETY: our node, destroyed exactly once; destroy_dev waits for threads in methods.
        // Callers drop nodes only from sleepable contexts (documented above).
        unsafe { bindings::destroy_dev(self.raw.as_ptr()) }
    }
}
