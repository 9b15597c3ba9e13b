//! The NVMe engine (placeholder; see issue 3).
