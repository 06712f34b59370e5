//! Per-call overhead of a uprobe running the example tool's program (hash + array map updates,
//! a `.bss` counter): bare call vs bpftime (agent hook, current engine) vs the kernel's uprobe,
//! on three function entries — `push %rbp` (`target_function`), a 5-byte nop (`nop5_entry`)
//! and a `lea` the kernel must single-step (`lea_entry`). Same victim, same loader, same BPF
//! object, same machine, one run.
//!
//! `cargo bench --bench uprobe` (the kernel column needs root; it is skipped otherwise).
//! Environment: `BPFTIME_BENCH_CALLS` (default 2,000,000; kernel runs use a tenth).

use bpftime_suite::bench::median;
use bpftime_suite::{Proc, TestStore, artifacts, build_example, is_root};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn ns_per_call(lines: &[String]) -> f64 {
    bpftime_suite::bench::ns_per_call(lines).expect("victim prints ns_per_call")
}

fn victim_cmd(prefix: Option<(&Path, &str)>, build: &Path, mode: &str, n: u64) -> Command {
    let mut c = match prefix {
        Some((bpftime, store)) => {
            let mut c = Command::new(bpftime);
            c.args(["start", "--store", store, "--"])
                .arg(build.join("victim"));
            c
        }
        None => Command::new(build.join("victim")),
    };
    c.args(["-t", "-m", mode, &n.to_string()]);
    c
}

fn interrupt(p: &Proc) {
    let _ = Command::new("kill")
        .args(["-INT", &p.pid().to_string()])
        .status();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with no such flag: do a
    // tiny run then, so the harness is exercised without taking long.
    let quick = !std::env::args().any(|a| a == "--bench");
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let a = artifacts();
    let n: u64 = std::env::var("BPFTIME_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20_000 } else { 2_000_000 });
    let reps = if quick { 1 } else { 5 };
    println!("uprobe overhead, {n} calls per run, median of {reps} runs");
    println!(
        "| entry | bare ns/call | bpftime ns/call | kernel ns/call | bpftime overhead | kernel overhead | kernel/bpftime |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (mode, func) in [
        ("target", "target_function"),
        ("nop5", "nop5_entry"),
        ("lea", "lea_entry"),
    ] {
        let bare = median(
            (0..reps)
                .map(|_| {
                    let p = Proc::spawn(victim_cmd(None, &build, mode, n), "bare victim");
                    ns_per_call(&p.finish(T))
                })
                .collect(),
        );
        // bpftime: the unmodified loader under `bpftime load`, the victim under `bpftime start`.
        let store = TestStore::new("bench");
        let mut lc = Command::new(&a.bpftime);
        lc.args(["load", "--store", &store.name, "--"])
            .arg(build.join("uprobe-counter"))
            .args(["-d", "600"])
            .arg(build.join("victim"))
            .arg(func);
        let mut l = Proc::spawn(lc, "bpftime load");
        l.wait_line(T, |s| s == "attached");
        let ours = median(
            (0..reps)
                .map(|_| {
                    let p = Proc::spawn(
                        victim_cmd(Some((&a.bpftime, &store.name)), &build, mode, n),
                        "victim under bpftime",
                    );
                    ns_per_call(&p.finish(T))
                })
                .collect(),
        );
        interrupt(&l);
        let _ = l.finish(T);
        // Kernel: the same loader natively.
        let kernel = if is_root() {
            let kn = (n / 10).max(1000);
            let mut kc = Command::new(build.join("uprobe-counter"));
            kc.args(["-d", "600"]).arg(build.join("victim")).arg(func);
            let mut k = Proc::spawn(kc, "uprobe-counter (kernel)");
            k.wait_line(T, |s| s == "attached");
            let v = median(
                (0..reps)
                    .map(|_| {
                        let p = Proc::spawn(victim_cmd(None, &build, mode, kn), "victim (kernel)");
                        ns_per_call(&p.finish(T))
                    })
                    .collect(),
            );
            interrupt(&k);
            let _ = k.finish(T);
            Some(v)
        } else {
            None
        };
        let ov = ours - bare;
        match kernel {
            Some(k) => println!(
                "| {func} | {bare:.1} | {ours:.1} | {k:.1} | {ov:.1} | {:.1} | {:.1}× |",
                k - bare,
                (k - bare) / ov.max(0.01)
            ),
            None => println!("| {func} | {bare:.1} | {ours:.1} | (needs root) | {ov:.1} | | |"),
        }
    }
}
