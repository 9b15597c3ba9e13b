//! The bindgen'd FreeBSD kernel programming interface (see build.rs and kmod/kpi.h).
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]
#![allow(clippy::all)]
include!(concat!(env!("OUT_DIR"), "/kpi.rs"));
