//! The model's state: one struct that plays the kernel, with handles instead of pointers.
//!
//! Handles are indices that are never reused, so a handle to a destroyed node, a released
//! disk or freed memory stays meaningful and its misuse can be reported instead of silently
//! hitting a recycled object. The `impl Model` blocks that give the state its behaviour live
//! in one file per kernel subsystem: memory.rs (malloc(9)), devfs.rs (make_dev/destroy_dev),
//! geom.rs (disk(9)), sched.rs (threads, mutexes, taskqueues, interrupts, callouts).

use crate::rules::{Rule, Violation};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

macro_rules! handle {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub(crate) usize);
    };
}

handle!(
    /// Driver memory from malloc(9) (a softc pointer).
    MemRef
);
handle!(
    /// A device node (`struct cdev *`).
    NodeRef
);
handle!(
    /// A disk (`struct disk *`).
    DiskRef
);
handle!(
    /// A kernel thread.
    ThreadId
);
handle!(
    /// A mutex (mtx(9), MTX_DEF).
    LockId
);
handle!(
    /// An I/O request a thread may sleep on.
    IoRef
);
handle!(
    /// A callback: an interrupt handler, a callout, a task, or a function pointer kept in
    /// driver memory.
    CbRef
);
handle!(
    /// A taskqueue.
    TqRef
);

/// One malloc(9) allocation.
#[derive(Debug)]
pub(crate) struct Alloc {
    pub ty: &'static str,
    pub size: usize,
    pub data: Vec<u8>,
    pub freed: bool,
}

/// One cdev.
#[derive(Debug)]
pub(crate) struct Node {
    pub name: String,
    pub flags: u32,
    pub drv1: Option<MemRef>,
    pub parent: Option<NodeRef>,
    pub named: bool,
    pub destroyed: bool,
    pub sched: bool,
    /// Counted threads inside a method, and the I/O each one sleeps on.
    pub threads: Vec<(ThreadId, Option<IoRef>)>,
    /// Open file descriptors (si_usecount).
    pub opens: u32,
}

/// One struct disk.
#[derive(Debug)]
pub(crate) struct Disk {
    pub unit: u32,
    pub ctx: MemRef,
    pub opens: u32,
    pub gone: bool,
    pub d_gone_queued: bool,
    pub d_gone_running: bool,
    pub d_gone_done: bool,
    pub destroyed: bool,
}

/// What a callback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CbKind {
    /// An interrupt handler (bus_setup_intr).
    Intr,
    /// A callout.
    Callout,
    /// A task on a taskqueue.
    Task(TqRef),
    /// A plain function pointer stored in driver memory (e.g. a completion callback).
    Pointer,
}

#[derive(Debug)]
pub(crate) struct Callback {
    pub name: String,
    pub kind: CbKind,
    /// Argument the callback runs on (its softc).
    pub arg: Option<MemRef>,
    /// Memory the pointer itself is stored in.
    pub stored_in: Option<MemRef>,
    pub armed: bool,
}

#[derive(Debug)]
pub(crate) struct TaskQueue {
    pub name: String,
    pub thread: ThreadId,
    pub freed: bool,
}

/// What kind of thread the current code runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// An ordinary sleepable kernel thread (detach, MOD_UNLOAD, a syscall).
    Kernel,
    /// One of the `acpi_task` threads that run notify handlers.
    AcpiTask,
    /// The thread of one taskqueue.
    TaskQueue(TqRef),
    /// The GEOM event thread (runs `d_gone`).
    GeomEvent,
}

#[derive(Debug)]
pub(crate) struct Thread {
    pub kind: ThreadKind,
    pub locks: Vec<LockId>,
}

#[derive(Debug)]
pub(crate) struct Lock {
    pub name: String,
    pub owner: Option<ThreadId>,
}

/// The model kernel. Create one per test or lab run; read [`Model::report`] at the end.
#[derive(Debug)]
pub struct Model {
    pub(crate) allocs: Vec<Alloc>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) disks: Vec<Disk>,
    pub(crate) geom_queue: VecDeque<DiskRef>,
    pub(crate) callbacks: Vec<Callback>,
    pub(crate) taskqueues: Vec<TaskQueue>,
    pub(crate) threads: Vec<Thread>,
    pub(crate) current: ThreadId,
    pub(crate) locks: Vec<Lock>,
    pub(crate) ios: IoBoard,
    pub(crate) violations: Vec<Violation>,
    pub(crate) notify_handlers: u32,
    pub(crate) next_unit: u32,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    /// A fresh kernel with one sleepable thread (the one tests run on) as the current thread.
    pub fn new() -> Self {
        Model {
            allocs: Vec::new(),
            nodes: Vec::new(),
            disks: Vec::new(),
            geom_queue: VecDeque::new(),
            callbacks: Vec::new(),
            taskqueues: Vec::new(),
            threads: vec![Thread { kind: ThreadKind::Kernel, locks: Vec::new() }],
            current: ThreadId(0),
            locks: Vec::new(),
            ios: IoBoard::default(),
            violations: Vec::new(),
            notify_handlers: 0,
            next_unit: 0,
        }
    }

    /// Records a broken rule.
    pub(crate) fn violate(&mut self, rule: Rule, detail: impl Into<String>) {
        self.violations.push(Violation { rule, detail: detail.into() });
    }

    /// Every violation so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// True if `rule` was broken at least once.
    pub fn broke(&self, rule: Rule) -> bool {
        self.violations.iter().any(|v| v.rule == rule)
    }

    /// Forgets the violations so far (a test that provoked one on purpose and checked it).
    pub fn take_violations(&mut self) -> Vec<Violation> {
        std::mem::take(&mut self.violations)
    }

    /// Hands out controller unit numbers (what device_get_unit would give).
    pub fn next_unit(&mut self) -> u32 {
        let u = self.next_unit;
        self.next_unit += 1;
        u
    }
}

/// Completion state of every modelled I/O request, shareable with a fake controller so that
/// its `fail_all` can complete requests without holding the model.
#[derive(Debug, Clone, Default)]
pub struct IoBoard(Rc<RefCell<Vec<bool>>>);

impl IoBoard {
    /// A new request, not completed.
    pub fn submit(&self) -> IoRef {
        let mut v = self.0.borrow_mut();
        v.push(false);
        IoRef(v.len() - 1)
    }
    /// Completes a request (normally or with ENXIO).
    pub fn complete(&self, io: IoRef) {
        if let Some(x) = self.0.borrow_mut().get_mut(io.0) {
            *x = true;
        }
    }
    /// Whether it completed (unknown requests count as completed).
    pub fn is_done(&self, io: IoRef) -> bool {
        self.0.borrow().get(io.0).copied().unwrap_or(true)
    }
}
