//! malloc(9) with INVARIANTS-style poisoning and malloc type accounting, plus the registry of
//! callback pointers kept in driver memory.
//!
//! Freed memory is kept (never reused) and filled with 0xdeadc0de as uma_dbg.c's trash_dtor
//! does, so a read after free returns the poison *and* is recorded. A "function pointer" is a
//! [`CbRef`] registered as stored inside some allocation; once that allocation is freed,
//! calling it is the classic "free the structure, then call the pointer inside" bug.

use crate::model::{Alloc, CbKind, CbRef, Callback, MemRef, Model};
use crate::rules::Rule;

/// The poison pattern (sys/vm/uma_dbg.c `uma_junk`).
pub const POISON: u32 = 0xdead_c0de;
/// Our malloc type's name (MALLOC_DEFINE(M_NVMEHP, "nvmehp", ...)).
pub const M_NVMEHP: &str = "nvmehp";

impl Model {
    /// malloc(size, type, M_ZERO | (wait ? M_WAITOK : M_NOWAIT)).
    pub fn malloc(&mut self, ty: &'static str, size: usize, wait: bool) -> MemRef {
        if wait {
            self.might_sleep("malloc(M_WAITOK)");
        }
        self.allocs.push(Alloc { ty, size, data: vec![0; size], freed: false });
        MemRef(self.allocs.len() - 1)
    }

    /// free(9). Checks: double free, live nodes pointing here (orphans), disks whose d_drv1 is
    /// this memory and whose d_gone has not run, armed callbacks running on this memory.
    pub fn free(&mut self, mem: MemRef) {
        let Some(a) = self.allocs.get(mem.0) else {
            self.violate(Rule::DoubleFree, format!("free of unknown memory {mem:?}"));
            return;
        };
        if a.freed {
            self.violate(Rule::DoubleFree, format!("{mem:?} ({} bytes) freed twice", a.size));
            return;
        }
        let orphans: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.destroyed && n.drv1 == Some(mem))
            .map(|n| n.name.clone())
            .collect();
        for name in orphans {
            self.violate(Rule::OrphanNode, format!("/dev/{name} still published, si_drv1 = freed {mem:?}"));
        }
        let early: Vec<u32> =
            self.disks.iter().filter(|d| d.ctx == mem && !d.d_gone_done && !d.d_gone_running).map(|d| d.unit).collect();
        for unit in early {
            self.violate(Rule::DiskFreedBeforeGone, format!("d_drv1 of disk unit {unit} freed before d_gone"));
        }
        let armed: Vec<String> = self
            .callbacks
            .iter()
            .filter(|c| c.armed && c.arg == Some(mem) && c.kind != CbKind::Pointer)
            .map(|c| c.name.clone())
            .collect();
        for name in armed {
            self.violate(Rule::FreeWhileCallbackArmed, format!("{name} still armed with argument {mem:?}"));
        }
        let a = &mut self.allocs[mem.0];
        a.freed = true;
        for chunk in a.data.chunks_mut(4) {
            let p = POISON.to_le_bytes();
            chunk.copy_from_slice(&p[..chunk.len()]);
        }
    }

    /// True once `mem` was freed.
    pub fn is_freed(&self, mem: MemRef) -> bool {
        self.allocs.get(mem.0).is_none_or(|a| a.freed)
    }

    /// Reads a u32 of driver memory (0 beyond its end). Poison and a violation after free.
    pub fn read_u32(&mut self, mem: MemRef, off: usize) -> u32 {
        if self.is_freed(mem) {
            self.violate(Rule::UseAfterFree, format!("read of freed {mem:?} at {off}"));
            return POISON;
        }
        let d = &self.allocs[mem.0].data;
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = d.get(off + i).copied().unwrap_or(0);
        }
        u32::from_le_bytes(b)
    }

    /// Writes a u32 of driver memory (ignored beyond its end). A violation after free.
    pub fn write_u32(&mut self, mem: MemRef, off: usize, v: u32) {
        if self.is_freed(mem) {
            self.violate(Rule::UseAfterFree, format!("write to freed {mem:?} at {off}"));
            return;
        }
        let d = &mut self.allocs[mem.0].data;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            if let Some(slot) = d.get_mut(off + i) {
                *slot = *x;
            }
        }
    }

    /// Stores a function pointer named `name` inside `stored_in` (e.g. a completion callback
    /// in a request structure). Its argument is `arg`.
    pub fn store_fn_pointer(&mut self, stored_in: MemRef, name: &str, arg: Option<MemRef>) -> CbRef {
        self.callbacks.push(Callback {
            name: name.into(),
            kind: CbKind::Pointer,
            arg,
            stored_in: Some(stored_in),
            armed: true,
        });
        CbRef(self.callbacks.len() - 1)
    }

    /// Calls a function pointer read from driver memory. Returns false (and records a
    /// violation) when the memory holding it, or its argument, was freed: the real kernel
    /// would jump to 0xdeadc0dedeadc0de.
    pub fn call_fn_pointer(&mut self, cb: CbRef) -> bool {
        let Some(c) = self.callbacks.get(cb.0) else { return false };
        let (name, stored, arg) = (c.name.clone(), c.stored_in, c.arg);
        if stored.is_some_and(|m| self.is_freed(m)) {
            self.violate(Rule::CallThroughFreedPointer, format!("{name} called through freed {stored:?}: jump to {POISON:#x}"));
            return false;
        }
        if let Some(a) = arg {
            if self.is_freed(a) {
                self.violate(Rule::UseAfterFree, format!("{name} called with freed argument {a:?}"));
                return false;
            }
        }
        true
    }

    /// Bytes still allocated, per malloc type (sys/kern/kern_malloc.c keeps the same count).
    pub fn allocated_bytes(&self, ty: &str) -> usize {
        self.allocs.iter().filter(|a| !a.freed && a.ty == ty).map(|a| a.size).sum()
    }

    /// Bytes still allocated, all types.
    pub fn leaked_bytes(&self) -> usize {
        self.allocs.iter().filter(|a| !a.freed).map(|a| a.size).sum()
    }
}
