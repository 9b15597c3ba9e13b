//! No allocation failure of the real module ends in a kernel panic: every `M_NOWAIT` malloc(9)
//! of a whole `kldhost run --qemu --acpi` (load, slot discovery, attach with its bring-up, I/O,
//! detach, unload) is failed once, one run per malloc, and of the hot-add path of `--eject
//! --hot-add` (the slot rescan and the new controller's attach).
//!
//! The driver's global allocator is malloc(9) `M_NOWAIT`, so each of these can really fail in
//! FreeBSD (kern_malloc.c returns NULL); an infallible Rust allocation there would end in Rust's
//! allocation-error handler, a panic(9) (kldhost exit 70). Each run must instead end clean: no
//! panic, no finding (no leak, node, disk, resource, taskqueue, mutex or handler left), the
//! module unloaded, and where the failure hit an attach, the attach returned ENOMEM after the
//! driver said what it could not allocate. The number of mallocs is counted from a clean run's
//! call log, so the sweep follows the driver as it changes. kocheck's `no-alloc-error-handler`
//! proves the same statically on the `.ko`; this shows each failure is also handled well.
//!
//! Needs QEMU (SKIP without it, a failure with NVMEHP_REQUIRE_QEMU=1) and the built .ko
//! (NVMEHP_REQUIRE_KO=1).

mod common;

use common::kldhost_run_with;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The real module, or None (SKIP printed) without QEMU or the .ko.
fn real_ko(test: &str) -> Option<PathBuf> {
    if !nvmehp_lab::skip::qemu_or_skip(test) || common::real_ko(test).is_none() {
        return None;
    }
    Some(common::repo_root().join("nvme_hotplug.ko"))
}

/// The emulated console of a `kldhost run` output.
fn console(out: &str) -> &str {
    let from = out.find("\nconsole:\n").unwrap_or_else(|| panic!("no console in:\n{out}"));
    &out[from..]
}

/// The `--fail` function name of an `M_NOWAIT` allocation line of the call log
/// (`  malloc(96, flags 0x1) = 0x...`), or None for any other line (M_WAITOK calls are not
/// counted by `--fail`: they cannot fail).
fn nowait_alloc(line: &str) -> Option<&'static str> {
    let (func, rest) = if let Some(r) = line.strip_prefix("  malloc(") {
        ("malloc", r)
    } else if let Some(r) = line.strip_prefix("  malloc_aligned(") {
        ("malloc_aligned", r)
    } else {
        return None;
    };
    let flags = rest.split("flags 0x").nth(1)?.split(')').next()?;
    let flags = u32::from_str_radix(flags, 16).ok()?;
    (flags & 1 != 0).then_some(func) // M_NOWAIT is 0x0001 (sys/malloc.h)
}

/// How many `M_NOWAIT` calls of `func` the call log `out` has, counting only lines before the
/// first line containing `upto` (all when None).
fn count_nowait(out: &str, func: &str, upto: Option<&str>) -> usize {
    out.lines().take_while(|l| upto.is_none_or(|u| !l.contains(u))).filter(|l| nowait_alloc(l) == Some(func)).count()
}

/// Runs `kldhost run <flags> --fail FUNC:N <ko>` for every N in `calls`, `threads` at a time,
/// and checks each with [`check_run`]. Returns how many attaches failed (for the caller to see
/// that the sweep reached them).
fn sweep(ko: &Path, flags: &[&str], func: &str, calls: &[usize], threads: usize) -> usize {
    let next = AtomicUsize::new(0);
    let problems = Mutex::new(Vec::new());
    let attach_failures = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(&n) = calls.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
                let spec = format!("{func}:{n}");
                let mut args: Vec<&str> = flags.to_vec();
                args.extend(["--fail", &spec]);
                let (code, out) = kldhost_run_with(ko, &args);
                match check_run(func, n, code, &out) {
                    Ok(true) => drop(attach_failures.fetch_add(1, Ordering::Relaxed)),
                    Ok(false) => {}
                    Err(why) => problems.lock().unwrap().push((n, why, out)),
                }
            });
        }
    });
    let mut problems = problems.into_inner().unwrap();
    problems.sort_by_key(|p| p.0);
    if let Some((n, _, out)) = problems.first() {
        let list: Vec<String> = problems.iter().map(|(n, why, _)| format!("  {func}:{n}: {why}")).collect();
        panic!("{} of the runs with --fail {func}:N ({flags:?}) did not end clean:\n{}\n\nfull output of {func}:{n}:\n{out}", problems.len(), list.join("\n"));
    }
    attach_failures.into_inner()
}

/// One run's verdict: Ok(true) when an attach failed (with ENOMEM and the driver's message),
/// Ok(false) when none did, Err(why) for anything else.
fn check_run(func: &str, n: usize, code: Option<i32>, out: &str) -> Result<bool, String> {
    if !out.contains(&format!("kldhost: injected NULL into {func} (call {n})")) {
        return Err("the injection never happened (fewer calls than in the clean run?)".into());
    }
    if code == Some(70) || out.contains("memory allocation of") {
        let line = out.lines().find(|l| l.contains("panic")).unwrap_or("");
        return Err(format!("kernel panic: {line}"));
    }
    if !out.contains("\nfindings: 0\n") {
        let line = out.lines().find(|l| l.starts_with("findings:")).unwrap_or("no findings line");
        return Err(format!("findings: {line}"));
    }
    if !out.contains("MOD_QUIESCE: Some(0), MOD_UNLOAD: Some(0), unloaded: true") {
        return Err("the module did not unload".into());
    }
    if code != Some(0) {
        return Err(format!("kldhost run exited {code:?}"));
    }
    let con = console(out);
    let mut failed = false;
    for line in con.lines().filter(|l| l.contains("device_attach: ") && l.contains(" attach returned ")) {
        let dev = line.trim().trim_start_matches("device_attach: ").split(' ').next().unwrap_or("");
        if !line.ends_with(" attach returned 12") {
            return Err(format!("an attach failed with another errno than ENOMEM: {line}"));
        }
        let said = con.lines().any(|l| {
            l.trim_start().starts_with(&format!("{dev}: ")) && (l.contains("out of memory") || l.contains("no DMA memory"))
        });
        if !said {
            return Err(format!("{dev}'s attach failed with ENOMEM without the driver saying what it could not allocate"));
        }
        failed = true;
    }
    Ok(failed)
}

#[test]
fn every_m_nowait_malloc_of_load_attach_io_detach_unload_can_fail_without_a_panic() {
    let Some(ko) = real_ko("nomem_sweep") else { return };
    let flags = ["--qemu", "--acpi"];
    let (code, clean) = kldhost_run_with(&ko, &flags);
    assert_eq!(code, Some(0), "the clean run failed:\n{clean}");
    assert!(clean.contains("\nfindings: 0\n") && clean.contains("nvmehp0: attached: /dev/nvmehp0"), "{clean}");
    let mallocs = count_nowait(&clean, "malloc", None);
    let aligned = count_nowait(&clean, "malloc_aligned", None);
    // Load, discovery (30 slots), a controller's bring-up with its 255 trackers and the I/O:
    // hundreds of them. Far fewer means the log format changed under this test.
    assert!(mallocs > 200, "only {mallocs} M_NOWAIT mallocs counted in:\n{clean}");
    // Each run is CPU-bound (about 0.1 s): one per core.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
    let all: Vec<usize> = (1..=mallocs).collect();
    let failed_attaches = sweep(&ko, &flags, "malloc", &all, threads);
    if aligned > 0 {
        sweep(&ko, &flags, "malloc_aligned", &(1..=aligned).collect::<Vec<_>>(), threads);
    }
    // The bring-up's and the trackers' mallocs are most of them: the sweep went through attach.
    assert!(failed_attaches > mallocs / 2, "only {failed_attaches} of {mallocs} failed an attach");
    eprintln!("nomem: {mallocs} M_NOWAIT mallocs and {aligned} malloc_aligned each failed once: no panic, no finding, {failed_attaches} attaches failed with ENOMEM and a message");
}

/// A sample, not all: a run whose failure stops the hot-added controller's attach waits 5 s for
/// an attach that never comes (kldhost's runner), so the ~285 mallocs of the hot-add would take
/// minutes. Every 12th of them, and the last 4 (the namespace's node and disk, the end of the
/// attach), cover the rescan, the bring-up, the trackers and the nodes.
#[test]
fn m_nowait_mallocs_of_a_hot_add_can_fail_without_a_panic() {
    let Some(ko) = real_ko("nomem_hot_add") else { return };
    // claim=1: the hot-added controller is nvmehp's (no nvme(4) here), so its attach runs.
    let flags = ["--qemu", "--acpi", "--eject", "--hot-add", "--tunable", "hw.nvme_hotplug.claim=1"];
    let (code, clean) = kldhost_run_with(&ko, &flags);
    assert_eq!(code, Some(0), "the clean run failed:\n{clean}");
    assert!(clean.contains("hot-added and attached: true; its write and read: ok"), "{clean}");
    // From the device check on slot 5 (the rescan, the new function's attach and I/O) to the end.
    let notify = "acpi_task: Notify(\\_SB_.PCI0.S05_, 1)";
    let before = count_nowait(&clean, "malloc", Some(notify));
    let all = count_nowait(&clean, "malloc", None);
    assert!(all > before + 100, "{before} mallocs before the hot-add's notify, {all} in all:\n{clean}");
    // The end of the window: the last mallocs before the hot-added controller's attach is done.
    let attached = count_nowait(&clean, "malloc", Some("1 new functions, 1 attached"));
    let mut sample: Vec<usize> = (before + 1..=attached).step_by(12).collect();
    sample.extend(attached.saturating_sub(3).max(before + 1)..=attached);
    sample.sort_unstable();
    sample.dedup();
    // Mostly waiting, not computing: more runs at once than cores.
    let failed_attaches = sweep(&ko, &flags, "malloc", &sample, 8);
    assert!(failed_attaches * 2 > sample.len(), "only {failed_attaches} of {} sampled failures hit the hot-added controller's attach", sample.len());
    eprintln!("nomem: {} of the hot-add's {} M_NOWAIT mallocs each failed once: no panic, no finding, {failed_attaches} attaches failed with ENOMEM", sample.len(), attached - before);
}

#[test]
fn the_counting_sees_m_nowait_calls_only() {
    assert_eq!(nowait_alloc("  malloc(96, flags 0x1) = 0x55c76cb58630"), Some("malloc"));
    assert_eq!(nowait_alloc("  malloc(120, flags 0x101) = 0x55c1ba1eee60"), Some("malloc"));
    assert_eq!(nowait_alloc("  malloc_aligned(64, flags 0x1) = NULL"), Some("malloc_aligned"));
    assert_eq!(nowait_alloc("  malloc(80, flags 0x2) = 0x55c76cc041d0"), None);
    assert_eq!(nowait_alloc("  malloc_init(nvme_hotplug)"), None);
    assert_eq!(count_nowait("  malloc(8, flags 0x1) = 0x1\nX\n  malloc(8, flags 0x1) = 0x2\n", "malloc", Some("X")), 1);
}
