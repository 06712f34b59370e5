//! Per-hit cost of a uprobe, a uretprobe, and both, running bpftrace-style `count()` programs
//! (lookup + increment + update on a per-CPU array; the uretprobe also sums the return value):
//! bare call vs bpftime (agent hook, JIT) vs the kernel, on three function entries — `push
//! %rbp` (`target_function`), a 5-byte nop (`nop5_entry`) and a `lea` the kernel must
//! single-step (`lea_entry`). Same victim (`examples/uretprobe-counter/retvictim`), same
//! loader, same BPF object, same machine, one run. Times are the victim thread's CPU time per
//! call (user + system, so the kernel's probe handling counts; steadier than wall time on a
//! loaded machine), median of the runs.
//!
//! `cargo bench --bench uprobe` (the kernel column needs root; it is skipped otherwise).
//! Environment: `BPFTIME_BENCH_CALLS` (default 2,000,000; kernel runs use a tenth).

use bpftime_suite::bench::{Loader, Stop, maybe_under_bpftime, median};
use bpftime_suite::{Proc, artifacts, build_example, is_root};
use std::path::Path;

/// The victim's `cpu_ns_per_call X` line.
fn cpu_ns(lines: &[String]) -> f64 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("cpu_ns_per_call "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("victim printed no cpu_ns_per_call: {lines:?}"))
}

/// Whether the tool counted every call of the runs (entries or returns).
fn fired(tool: &[String]) -> bool {
    tool.iter()
        .filter_map(|l| {
            l.strip_prefix("entries ")
                .or_else(|| l.strip_prefix("returns "))
        })
        .any(|v| v.trim().parse::<u64>().is_ok_and(|n| n > 0))
}

fn victim(under: Option<(&Path, &str)>, build: &Path, mode: &str, n: u64, reps: usize) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let mut c = maybe_under_bpftime(under, &build.join("retvictim"));
                c.args(["-t", "-m", mode, &n.to_string()]);
                let what = format!("retvictim -m {mode}");
                cpu_ns(&Proc::spawn(c, &what).finish(bpftime_suite::bench::STEP_TIMEOUT))
            })
            .collect(),
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with no such flag: do a
    // tiny run then, so the harness is exercised without taking long.
    let quick = !std::env::args().any(|a| a == "--bench");
    let Some(build) = build_example("uretprobe-counter") else {
        return;
    };
    let a = artifacts();
    let tool = build.join("uretprobe-counter");
    let bin = build.join("retvictim");
    let bin = bin.to_str().expect("utf-8 path");
    let n: u64 = std::env::var("BPFTIME_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20_000 } else { 2_000_000 });
    let reps = if quick { 1 } else { 5 };
    println!(
        "probe overhead, count() programs, {n} calls per run, CPU ns per call, median of {reps}"
    );
    println!(
        "| probe | entry | bare | bpftime | kernel | bpftime overhead | kernel overhead | kernel / bpftime |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let entries = [
        ("target", "target_function", "`push %rbp`"),
        ("nop5", "nop5_entry", "5-byte nop"),
        ("lea", "lea_entry", "`lea` (single-stepped by the kernel)"),
    ];
    for (probe, flag) in [("uprobe", "-e"), ("uretprobe", "-r"), ("both", "")] {
        for (mode, func, label) in entries {
            let bare = victim(None, &build, mode, n, reps);
            let args: Vec<&str> = [flag, bin, func]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
            let l = Loader::start(Some(&a.bpftime), "bench", &tool, &args, Stop::Interrupt);
            let ours = victim(l.under(&a.bpftime), &build, mode, n, reps);
            assert!(
                fired(&l.finish()),
                "bpftime probes did not fire ({probe} {func})"
            );
            let kernel = is_root().then(|| {
                // A system-wide kernel uprobe now and then misses a whole short run (see
                // examples/uprobe-counter/README.md): measure again then.
                for _ in 0..3 {
                    let l = Loader::start(None, "bench", &tool, &args, Stop::Interrupt);
                    let k = victim(None, &build, mode, (n / 10).max(1000), reps);
                    if fired(&l.finish()) {
                        return k;
                    }
                }
                panic!("kernel probes did not fire ({probe} {func})");
            });
            let ov = ours - bare;
            match kernel {
                Some(k) => println!(
                    "| {probe} | {label} | {bare:.1} | {ours:.1} | {k:.1} | {ov:.1} | {:.1} | {:.1}× |",
                    k - bare,
                    (k - bare) / ov.max(0.01)
                ),
                None => println!(
                    "| {probe} | {label} | {bare:.1} | {ours:.1} | (needs root) | {ov:.1} | | |"
                ),
            }
        }
    }
}
