//! The hotplug state machine and node lifecycle (placeholder; see issue 4).
