//! End to end: `examples/tailcall`, an unmodified libbpf tool whose uprobe program dispatches
//! through a `BPF_MAP_TYPE_PROG_ARRAY` with `bpf_tail_call` into programs attached nowhere (two
//! of which use callbacks: `bpf_loop` and `bpf_for_each_map_elem` over a hash map), under
//! `bpftime load` + `bpftime start` as an unprivileged user, on both engines — and the same
//! tool on the kernel for the same counts and the tail-call limit.

use bpftime_suite::{Proc, TestStore, artifacts, build_example, is_root, skip, unprivileged};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

const NAMES: [&str; 8] = [
    "handler0",
    "handler1",
    "handler2",
    "fallthrough",
    "chain",
    "dispatch",
    "loops",
    "visits",
];

/// The tool's count lines (`handler0 N`, …, `visits N`).
fn counts(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| NAMES.iter().any(|n| l.starts_with(&format!("{n} "))))
        .cloned()
        .collect()
}

fn lines(counts: [u64; 8]) -> Vec<String> {
    NAMES
        .iter()
        .zip(counts)
        .map(|(n, c)| format!("{n} {c}"))
        .collect()
}

/// What `dispatch` counts for hits with these (distinct) arguments, the handler slots filled
/// for the hits after the first `empty` ones: slot `arg % 4`, `bpf_loop` of `arg % 5 + 1`
/// iterations in handler1, handler2 visiting every argument it has seen so far.
fn dispatched(args: impl Iterator<Item = u64>, empty: usize) -> [u64; 8] {
    let mut c = [0u64; 8];
    for (i, a) in args.enumerate() {
        c[5] += 1;
        let slot = (a % 4) as usize;
        if i < empty || slot == 3 {
            c[3] += 1;
            continue;
        }
        c[slot] += 1;
        match slot {
            1 => c[6] += a % 5 + 1,
            2 => c[7] += c[2],
            _ => {}
        }
    }
    c
}

fn loader(store: &TestStore, build: &Path, args: &[&str]) -> Proc {
    let mut c = unprivileged(&artifacts().bpftime);
    c.args(["load", "--store", &store.name, "--"])
        .arg(build.join("tailcall"))
        .args(args)
        .arg(build.join("victim"))
        .arg("target_function");
    let mut p = Proc::spawn(c, "bpftime load tailcall");
    p.wait_line(T, |l| l == "attached");
    p
}

/// Runs the victim under `bpftime start`: `calls` calls with arguments `base..base + calls`.
fn victim(
    store: &TestStore,
    build: &Path,
    interpreter: bool,
    calls: u64,
    base: u64,
) -> Vec<String> {
    let mut c = unprivileged(&artifacts().bpftime);
    c.args(["start", "--store", &store.name]);
    if interpreter {
        c.arg("--no-jit");
    }
    c.arg("--")
        .arg(build.join("victim"))
        .arg(calls.to_string())
        .arg(base.to_string());
    Proc::spawn(c, "bpftime start victim").finish(T)
}

#[test]
fn dispatch_through_a_program_array_counts_exactly_on_both_engines() {
    let Some(build) = build_example("tailcall") else {
        return;
    };
    for interpreter in [false, true] {
        let store = TestStore::new(if interpreter { "tc-interp" } else { "tc-jit" });
        let l = loader(&store, &build, &["-n", "400"]);
        let out = victim(&store, &build, interpreter, 400, 0);
        assert_eq!(out.last().map(String::as_str), Some("calls 400"));
        // Arguments 0..400: a quarter each to slots 0-2 and to the empty slot 3.
        assert_eq!(
            counts(&l.finish(T)),
            lines(dispatched(0..400, 0)),
            "interpreter: {interpreter}"
        );
    }
    if !is_root() && skip("the kernel baseline needs root (bpf() and uprobes)") {
        return;
    }
    assert_eq!(
        kernel(&build, false, 400),
        lines(dispatched(0..400, 0)),
        "the kernel"
    );
}

#[test]
fn slots_filled_after_attaching_take_effect_at_the_next_call() {
    let Some(build) = build_example("tailcall") else {
        return;
    };
    let store = TestStore::new("tc-late");
    let mut l = loader(&store, &build, &["-l", "-n", "200"]);
    // Attached with empty handler slots: every call falls through.
    victim(&store, &build, false, 100, 0);
    l.send_line("fill");
    l.wait_line(T, |s| s == "filled");
    victim(&store, &build, false, 100, 1000);
    assert_eq!(
        counts(&l.finish(T)),
        lines(dispatched((0..100).chain(1000..1100), 100))
    );
}

/// Runs `tailcall [-c]` for `hits` probe hits natively on the kernel, attached to a waiting
/// victim's pid.
fn kernel(build: &Path, chain: bool, hits: u64) -> Vec<String> {
    let mut v = Proc::spawn(
        {
            let mut c = Command::new(build.join("victim"));
            c.args(["-w", &hits.to_string()]);
            c
        },
        "victim",
    );
    v.wait_line(T, |l| l.starts_with("pid "));
    let pid = v.pid().to_string();
    let mut c = Command::new(build.join("tailcall"));
    if chain {
        c.arg("-c");
    }
    c.args(["-n", &hits.to_string(), "-p", &pid])
        .arg(build.join("victim"))
        .arg("target_function");
    let mut k = Proc::spawn(c, "tailcall on the kernel");
    k.wait_line(T, |l| l == "attached");
    v.send_line("go");
    v.finish(T);
    counts(&k.finish(T))
}

#[test]
fn a_self_tail_call_stops_after_33_like_the_kernel() {
    let Some(build) = build_example("tailcall") else {
        return;
    };
    // One hit = the first run and 33 tail calls.
    let want = lines([0, 0, 0, 0, 34 * 50, 0, 0, 0]);
    for interpreter in [false, true] {
        let store = TestStore::new("tc-chain");
        let l = loader(&store, &build, &["-c", "-n", "50"]);
        victim(&store, &build, interpreter, 50, 0);
        assert_eq!(counts(&l.finish(T)), want, "interpreter: {interpreter}");
    }
    if !is_root() && skip("the kernel baseline needs root (bpf() and uprobes)") {
        return;
    }
    assert_eq!(kernel(&build, true, 50), want, "the kernel");
}
