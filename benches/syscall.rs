//! Per-call overhead of a syscall tracepoint: `getpid()` in a loop with a count program on
//! `syscalls:sys_enter_getpid` (`examples/syscall-trace -g`) — bare vs bpftime (the loader under
//! `bpftime load`, the victim under `bpftime start`: libc's getpid site patched, the program on
//! the checked JIT, run by the syscall gate itself (its native entry); by default the Syscall
//! User Dispatch catch-all stays off here, every getpid site being patched; the catch-all
//! column forces it on with `BPFTIME_SYSCALL_DISPATCH=1`) vs the kernel's tracepoint (root). Same victim, same loader, same BPF
//! object, same machine, one run. Times are the victim thread's CPU time (user + system), which
//! includes the kernel's tracepoint work and stays steady on a loaded machine.
//!
//! `cargo bench --bench syscall` (the kernel column needs root; skipped otherwise).
//! Environment: `BPFTIME_BENCH_CALLS` (default 2,000,000).

use bpftime_suite::bench::median;
use bpftime_suite::{Proc, TestStore, artifacts, build_example, is_root};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn ns_per_call(lines: &[String]) -> f64 {
    bpftime_suite::bench::ns_per_call(lines).expect("victim prints ns_per_call")
}

/// `dispatch`: `BPFTIME_SYSCALL_DISPATCH` for the victim (`None`: the default, the
/// catch-all only where a wanted call could escape the patches; `"1"`: always on, which makes
/// every system call of the armed threads take the kernel's slow entry path).
fn victim(prefix: Option<(&Path, &str, Option<&str>)>, build: &Path, n: u64) -> f64 {
    let mut c = match prefix {
        Some((bpftime, store, dispatch)) => {
            let mut c = Command::new(bpftime);
            c.args(["start", "--store", store, "--"]);
            c.arg(build.join("syscall-victim"));
            match dispatch {
                Some(v) => c.env("BPFTIME_SYSCALL_DISPATCH", v),
                None => c.env_remove("BPFTIME_SYSCALL_DISPATCH"),
            };
            c
        }
        None => Command::new(build.join("syscall-victim")),
    };
    c.args(["-b", &n.to_string()]);
    ns_per_call(&Proc::spawn(c, "syscall-victim -b").finish(T))
}

/// The loader's report line `getpid_calls N`.
fn getpid_calls(lines: &[String]) -> u64 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("getpid_calls "))
        .and_then(|v| v.parse().ok())
        .expect("loader prints getpid_calls")
}

fn main() {
    // `cargo test --benches` runs us without `--bench`: a tiny run then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let a = artifacts();
    let n: u64 = std::env::var("BPFTIME_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20_000 } else { 2_000_000 });
    let reps = if quick { 1 } else { 5 };
    let bare = median((0..reps).map(|_| victim(None, &build, n)).collect());

    // `bpftime` runs as this process's user here (not `unprivileged`).
    let store = TestStore::for_current_user("bench-sys");
    let mut lc = Command::new(&a.bpftime);
    lc.args(["load", "--store", &store.name, "--"])
        .arg(build.join("syscall-trace"))
        .arg("-g");
    let mut l = Proc::spawn(lc, "bpftime load syscall-trace -g");
    l.wait_line(T, |s| s == "attached");
    let mut ours = 0.0;
    let mut catch_all = 0.0;
    for dispatch in [None, Some("1")] {
        let v = median(
            (0..reps)
                .map(|_| victim(Some((&a.bpftime, &store.name, dispatch)), &build, n))
                .collect(),
        );
        *(if dispatch.is_none() {
            &mut ours
        } else {
            &mut catch_all
        }) = v;
    }
    l.send_line("report");
    let counted = getpid_calls(&l.finish(T));
    assert!(
        counted >= 2 * n * reps,
        "the program counted {counted} getpid calls, the victims made {}",
        2 * n * reps
    );

    let kernel = is_root().then(|| {
        let mut k = Proc::spawn(
            {
                let mut c = Command::new(build.join("syscall-trace"));
                c.arg("-g");
                c
            },
            "syscall-trace -g (kernel)",
        );
        k.wait_line(T, |s| s == "attached");
        let v = median((0..reps).map(|_| victim(None, &build, n)).collect());
        k.send_line("report");
        let _ = k.finish(T);
        v
    });
    println!("syscall tracepoint overhead: getpid() with a count program on sys_enter_getpid");
    println!("{n} calls per run, median of {reps} runs, ns per call");
    println!(
        "bpftime: the default (the catch-all off: every getpid site is patched); catch-all: \
         BPFTIME_SYSCALL_DISPATCH=1"
    );
    println!(
        "| bare | bpftime | bpftime, catch-all on | kernel | bpftime overhead | catch-all overhead \
         | kernel overhead | bpftime / kernel | catch-all / kernel |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let ov = ours - bare;
    let ov_c = catch_all - bare;
    match kernel {
        Some(k) => println!(
            "| {bare:.1} | {ours:.1} | {catch_all:.1} | {k:.1} | {ov:.1} | {ov_c:.1} | {:.1} | \
             {:.2} | {:.2} |",
            k - bare,
            ov / (k - bare).max(0.01),
            ov_c / (k - bare).max(0.01)
        ),
        None => println!(
            "| {bare:.1} | {ours:.1} | {catch_all:.1} | (needs root) | {ov:.1} | {ov_c:.1} | | | |"
        ),
    }
}
