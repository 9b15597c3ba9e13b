//! A devfs user of one of the module's nodes (`open` with `refuse = "busy"`): open(2) and
//! close(2) of `/dev/nvmehp<U>ns<N>` as devfs performs them (sys/fs/devfs/devfs_vnops.c):
//! `devfs_open` holds a thread reference (`si_threadcount`, dev_refthread) around the driver's
//! `d_open`; the open file keeps the vnode, whose use count devfs keeps in the cdev's
//! `si_usecount` (under dev_lock) until the last close, which calls `d_close`. The module's
//! detach sees the node in use through those two fields.

use crate::layouts;

/// FREAD | FWRITE (sys/sys/fcntl.h) and S_IFCHR (sys/sys/stat.h).
const FREAD_FWRITE: i32 = 0x0003;
const S_IFCHR: i32 = 0o020000;

/// open(2) of the node `cdev`: returns d_open's error (0: the node is held open).
pub fn open(cdev: u64) -> i32 {
    let dev = cdev as *mut layouts::cdev;
    // SAFETY: a live node of the module (listed in the emulated devfs); its cdevsw is the
    // module's static one.
    unsafe {
        (*dev).si_threadcount += 1;
        let r = match (*(*dev).si_devsw).d_open {
            Some(f) => f(dev, FREAD_FWRITE, S_IFCHR, std::ptr::null_mut()),
            None => 0,
        };
        (*dev).si_threadcount -= 1;
        if r == 0 {
            (*dev).si_usecount += 1;
        }
        crate::emu::log(format!("devfs_open({cdev:#x}) -> d_open = {r}"));
        r
    }
}

/// The last close(2) of the node: `d_close`, the use count dropped. A node destroyed
/// meanwhile is not called (destroy_dev waited for its threads; devfs gives the closing
/// file a dead vnode).
pub fn close(cdev: u64) {
    let alive = crate::emu::with(|e| e.devs.values().any(|&c| c == cdev));
    if !alive {
        crate::emu::log(format!("devfs_close({cdev:#x}): the node is gone (dead vnode)"));
        return;
    }
    let dev = cdev as *mut layouts::cdev;
    // SAFETY: as open; the node is still in devfs.
    unsafe {
        (*dev).si_usecount = (*dev).si_usecount.saturating_sub(1);
        (*dev).si_threadcount += 1;
        let r = match (*(*dev).si_devsw).d_close {
            Some(f) => f(dev, FREAD_FWRITE, S_IFCHR, std::ptr::null_mut()),
            None => 0,
        };
        (*dev).si_threadcount -= 1;
        crate::emu::log(format!("devfs_close({cdev:#x}) -> d_close = {r}"));
    }
}
