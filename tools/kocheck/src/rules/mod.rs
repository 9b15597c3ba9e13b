//! One file per rule family. Each returns `Verdict`s; none prints or exits.

pub mod alloc_error;
pub mod code;
pub mod exports;
pub mod header;
pub mod kpi;
pub mod module;
pub mod relocations;
pub mod sections;
pub mod stack;
