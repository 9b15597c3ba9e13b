/*
 * Stand-in for the kernel build's generated opt_global.h (from the kernel config's global
 * options). An out-of-tree module built by bsd.kmod.mk gets an empty one too, so empty is the
 * faithful value: no INVARIANTS, no LOCK_DEBUG, no KTR.
 * Used only for Linux cross-builds; a native FreeBSD build uses the one bsd.kmod.mk makes.
 */
