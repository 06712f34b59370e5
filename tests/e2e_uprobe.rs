//! End to end: the example libbpf tool (`examples/uprobe-counter`, an unmodified bpftool
//! skeleton loader) under `bpftime load`, counting calls in a victim under `bpftime start`,
//! as an unprivileged user — and the same tool against the kernel, for the same counts.

use bpftime_suite::{Proc, TestStore, artifacts, build_example, is_root, poll, skip, unprivileged};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// `pid P calls N`, `total_calls N`, `arg_sum S` lines from the tool's output, with the pid
/// replaced by `victim` when it is the victim's.
fn results(lines: &[String], victim: u32) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            l.starts_with("pid ") || l.starts_with("total_calls") || l.starts_with("arg_sum")
        })
        .map(|l| l.replace(&format!("pid {victim} "), "pid victim "))
        .collect()
}

fn expected(n: u64) -> Vec<String> {
    vec![
        format!("pid victim calls {n}"),
        format!("total_calls {n}"),
        format!("arg_sum {}", n * (n - 1) / 2),
    ]
}

fn loader(store: &TestStore, build: &Path, args: &[&str]) -> Proc {
    let a = artifacts();
    let mut c = unprivileged(&a.bpftime);
    c.args(["load", "--store", &store.name, "--"])
        .arg(build.join("uprobe-counter"))
        .args(args)
        .arg(build.join("victim"))
        .arg("target_function");
    let mut p = Proc::spawn(c, "bpftime load uprobe-counter");
    p.wait_line(T, |l| l == "attached");
    p
}

fn victim(store: &TestStore, build: &Path, args: &[&str]) -> Proc {
    let a = artifacts();
    let mut c = unprivileged(&a.bpftime);
    c.args(["start", "--store", &store.name]);
    // One test runs the agent's programs on the interpreter; the rest use the default JIT.
    if store.name.contains("interp") {
        c.arg("--no-jit");
    }
    c.arg("--").arg(build.join("victim")).args(args);
    Proc::spawn(c, "bpftime start victim")
}

/// Perf events the agent in `pid` reports attached, from `bpftime list`.
fn attached_events(store: &TestStore, pid: u32) -> Option<Vec<String>> {
    let out = unprivileged(&artifacts().bpftime)
        .args(["list", "--store", &store.name])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let prefix = format!("agent pid {pid} attached events [");
    let line = text.lines().find(|l| l.starts_with(&prefix))?;
    let inner = line.strip_prefix(&prefix)?.strip_suffix(']')?;
    Some(
        inner
            .split(", ")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn load_then_start_counts_exactly_as_unprivileged_user() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("ls");
    let l = loader(&store, &build, &["-n", "1000"]);
    let v = victim(&store, &build, &["1000"]);
    let vpid = v.pid();
    let vout = v.finish(T);
    assert_eq!(vout.last().map(String::as_str), Some("calls 1000"));
    let out = l.finish(T);
    assert_eq!(results(&out, vpid), expected(1000), "{out:?}");
}

#[test]
fn interpreter_engine_counts_exactly_too() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("interp");
    let l = loader(&store, &build, &["-n", "400"]);
    let v = victim(&store, &build, &["400"]);
    let vpid = v.pid();
    v.finish(T);
    assert_eq!(results(&l.finish(T), vpid), expected(400));
}

#[test]
fn start_then_load_counts_exactly() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("sl");
    let mut v = victim(&store, &build, &["-w", "500"]);
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    // The agent registers itself; then the loader attaches while the victim waits.
    poll(T, "the agent to register", || attached_events(&store, vpid));
    let l = loader(&store, &build, &["-n", "500"]);
    poll(T, "the agent to attach the new probe", || {
        attached_events(&store, vpid).filter(|e| !e.is_empty())
    });
    v.send_line("go");
    assert_eq!(v.finish(T).last().map(String::as_str), Some("calls 500"));
    assert_eq!(results(&l.finish(T), vpid), expected(500));
}

#[test]
fn two_loaders_at_once_each_count_with_their_own_maps() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("two");
    let a = loader(&store, &build, &["-n", "300"]);
    let b = loader(&store, &build, &["-n", "300"]);
    let v = victim(&store, &build, &["300"]);
    let vpid = v.pid();
    v.finish(T);
    // Had they shared maps or probes, one would see 600 calls.
    assert_eq!(results(&a.finish(T), vpid), expected(300));
    assert_eq!(results(&b.finish(T), vpid), expected(300));
}

/// The bytes of `symbol` in the running process `pid` (read through /proc/PID/mem).
fn live_bytes(pid: u32, binary: &Path, symbol: &str, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let off = bpftime_attach::symbol_file_offset(binary, symbol).expect("symbol offset");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("victim maps");
    let entries = bpftime_attach::procmaps::parse_maps(&maps).expect("parse maps");
    let canon = binary.canonicalize().unwrap();
    let e = entries
        .iter()
        .find(|e| {
            Path::new(&e.path) == canon.as_path()
                && off >= e.offset
                && off < e.offset + (e.end - e.start) as u64
        })
        .expect("victim maps the binary's text");
    let addr = e.start as u64 + (off - e.offset);
    let mut f = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open victim mem");
    f.seek(SeekFrom::Start(addr)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).expect("read victim mem");
    b
}

#[test]
fn probes_leave_the_running_target_when_the_loader_exits() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("exit");
    let bin = build.join("victim");
    let mut v = victim(&store, &build, &["-w", "10"]);
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    poll(T, "the agent to register", || attached_events(&store, vpid));
    let original = live_bytes(vpid, &bin, "target_function", 16);
    // A loader that attaches, waits one second and exits.
    let l = loader(&store, &build, &["-d", "1"]);
    poll(T, "the probe to attach", || {
        attached_events(&store, vpid).filter(|e| !e.is_empty())
    });
    assert_ne!(
        live_bytes(vpid, &bin, "target_function", 16),
        original,
        "the function is patched while the probe is attached"
    );
    l.finish(T);
    poll(T, "the probe to leave", || {
        attached_events(&store, vpid).filter(|e| e.is_empty())
    });
    assert_eq!(
        live_bytes(vpid, &bin, "target_function", 16),
        original,
        "original bytes restored"
    );
    // The target keeps running and completes its work.
    v.send_line("go");
    assert_eq!(v.finish(T).last().map(String::as_str), Some("calls 10"));
}

#[test]
fn kernel_and_bpftime_report_the_same_counts() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    if !is_root() && skip("the kernel baseline needs root (bpf() and uprobes)") {
        return;
    }
    // Kernel: the same tool, natively. A system-wide uprobe on this kernel can miss calls made
    // in the first milliseconds after attaching (see examples/uprobe-counter/README.md), so the
    // baseline attaches to the waiting victim's pid and releases it once attached.
    let mut kv = Proc::spawn(
        {
            let mut c = Command::new(build.join("victim"));
            c.args(["-w", "777"]);
            c
        },
        "victim",
    );
    kv.wait_line(T, |l| l.starts_with("pid "));
    let kpid = kv.pid();
    let mut c = Command::new(build.join("uprobe-counter"));
    c.args(["-n", "777", "-p", &kpid.to_string()])
        .arg(build.join("victim"))
        .arg("target_function");
    let mut k = Proc::spawn(c, "uprobe-counter on the kernel");
    k.wait_line(T, |l| l == "attached");
    kv.send_line("go");
    kv.finish(T);
    let kernel = results(&k.finish(T), kpid);
    // bpftime, unprivileged, the same way.
    let store = TestStore::new("kern");
    let mut v = victim(&store, &build, &["-w", "777"]);
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    let l = loader(&store, &build, &["-n", "777", "-p", &vpid.to_string()]);
    poll(T, "the probe to attach", || {
        attached_events(&store, vpid).filter(|e| !e.is_empty())
    });
    v.send_line("go");
    v.finish(T);
    let ours = results(&l.finish(T), vpid);
    assert_eq!(kernel, expected(777));
    assert_eq!(ours, kernel);
}

#[test]
fn pid_filter_attaches_only_in_the_chosen_process() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("pid");
    let mut chosen = victim(&store, &build, &["-w", "200"]);
    chosen.wait_line(T, |l| l.starts_with("pid "));
    let mut other = victim(&store, &build, &["-w", "300"]);
    other.wait_line(T, |l| l.starts_with("pid "));
    let (cpid, opid) = (chosen.pid(), other.pid());
    poll(T, "both agents to register", || {
        attached_events(&store, opid)?;
        attached_events(&store, cpid)
    });
    let l = loader(&store, &build, &["-n", "200", "-p", &cpid.to_string()]);
    poll(T, "the probe to attach in the chosen process", || {
        attached_events(&store, cpid).filter(|e| !e.is_empty())
    });
    assert_eq!(
        attached_events(&store, opid),
        Some(vec![]),
        "the other process is not hooked"
    );
    other.send_line("go");
    other.finish(T);
    chosen.send_line("go");
    chosen.finish(T);
    assert_eq!(results(&l.finish(T), cpid), expected(200));
}

#[test]
fn probes_leave_and_objects_are_reclaimed_when_the_loader_is_killed() {
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("kill");
    let bin = build.join("victim");
    let mut v = victim(&store, &build, &["-w", "10"]);
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    poll(T, "the agent to register", || attached_events(&store, vpid));
    let original = live_bytes(vpid, &bin, "target_function", 16);
    let mut l = loader(&store, &build, &["-d", "60"]);
    let lpid = l.pid();
    poll(T, "the probe to attach", || {
        attached_events(&store, vpid).filter(|e| !e.is_empty())
    });
    // SIGKILL: no chance to close fds or run exit handlers.
    l.child.kill().unwrap();
    l.child.wait().unwrap();
    poll(T, "the probe to leave", || {
        attached_events(&store, vpid).filter(|e| e.is_empty())
    });
    assert_eq!(live_bytes(vpid, &bin, "target_function", 16), original);
    // The next loader to open the store returns the dead loader's objects' memory.
    let next = loader(&store, &build, &["-d", "0"]);
    next.finish(T);
    let listing = unprivileged(&artifacts().bpftime)
        .args(["list", "--store", &store.name])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        !listing.contains(&format!("pid {lpid}")),
        "objects of the killed loader remain:\n{listing}"
    );
    v.send_line("go");
    assert_eq!(v.finish(T).last().map(String::as_str), Some("calls 10"));
}
