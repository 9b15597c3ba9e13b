//! FreeBSD 15 amd64 structure layouts, bindgen'd by build.rs from the same headers and flags as
//! the kld (with bindgen's size and offset tests).
#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code, clippy::all)]
include!(concat!(env!("OUT_DIR"), "/layouts.rs"));
