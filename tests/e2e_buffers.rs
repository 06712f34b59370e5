//! End to end: the example libbpf tools `examples/ringbuf-events` (BPF ring buffer) and
//! `examples/perfbuf-events` (perf buffers), unmodified bpftool-skeleton loaders, under
//! `bpftime load` with the victim under `bpftime start`, as an unprivileged user — and the same
//! tools against the kernel (root), for the same results.
//!
//! The loaders run with a 30 s `*_buffer__poll` timeout: events only arrive in time if the
//! buffer fds wake the loader's `epoll_wait`.

use bpftime_suite::{Proc, TestStore, artifacts, build_example, is_root, poll, skip, unprivileged};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The report lines of a tool's output.
fn results(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            ["events ", "arg_sum ", "seq_sum ", "pids ", "check "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .cloned()
        .collect()
}

fn expected(n: u64) -> Vec<String> {
    vec![
        format!("events {n} lost 0"),
        format!("arg_sum {}", n * (n - 1) / 2),
        format!("seq_sum {}", n * (n - 1) / 2),
        "pids 1".to_string(),
        "check ok".to_string(),
    ]
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

fn victim(store: &TestStore, build: &Path, args: &[&str]) -> Proc {
    let mut c = unprivileged(&artifacts().bpftime);
    c.args(["start", "--store", &store.name, "--"])
        .arg(build.join("victim"))
        .args(args);
    Proc::spawn(c, "bpftime start victim")
}

fn loader(store: &TestStore, build: &Path, tool: &str, args: &[&str]) -> Proc {
    let mut c = unprivileged(&artifacts().bpftime);
    c.args(["load", "--store", &store.name, "--"])
        .arg(build.join(tool))
        .args(["-s", "0", "-t", "30000"])
        .args(args)
        .arg(build.join("victim"))
        .arg("target_function");
    let mut p = Proc::spawn(c, &format!("bpftime load {tool}"));
    p.wait_line(T, |l| l == "attached");
    p
}

/// Under bpftime: the victim waits, the loader attaches with a pid filter, the agent attaches
/// the probe, the victim makes `n` calls; returns the loader's report.
fn under_bpftime(example: &str, tool: &str, n: u64, extra: &[&str]) -> Option<Vec<String>> {
    let build = build_example(example)?;
    let store = TestStore::new(tool);
    let mut v = victim(&store, &build, &["-w", &n.to_string()]);
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    poll(T, "the agent to register", || attached_events(&store, vpid));
    let mut args = vec![
        "-n".to_string(),
        n.to_string(),
        "-p".into(),
        vpid.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let l = loader(&store, &build, tool, &args);
    poll(T, "the agent to attach the probe", || {
        attached_events(&store, vpid).filter(|e| !e.is_empty())
    });
    v.send_line("go");
    assert_eq!(
        v.finish(T).last().map(String::as_str),
        Some(format!("calls {n}").as_str())
    );
    Some(results(&l.finish(T)))
}

/// On the kernel (root): the same tool and victim, natively, with the same pid filter.
fn on_kernel(example: &str, tool: &str, n: u64, extra: &[&str]) -> Option<Vec<String>> {
    let build = build_example(example)?;
    if !is_root() && skip("the kernel baseline needs root (bpf() and uprobes)") {
        return None;
    }
    let mut v = Proc::spawn(
        {
            let mut c = Command::new(build.join("victim"));
            c.args(["-w", &n.to_string()]);
            c
        },
        "victim",
    );
    v.wait_line(T, |l| l.starts_with("pid "));
    let mut c = Command::new(build.join(tool));
    c.args([
        "-t",
        "30000",
        "-n",
        &n.to_string(),
        "-p",
        &v.pid().to_string(),
    ])
    .args(extra)
    .arg(build.join("victim"))
    .arg("target_function");
    let mut k = Proc::spawn(c, &format!("{tool} on the kernel"));
    k.wait_line(T, |l| l == "attached");
    v.send_line("go");
    v.finish(T);
    Some(results(&k.finish(T)))
}

#[test]
fn ringbuf_events_arrive_exactly_once_as_unprivileged_user() {
    let Some(r) = under_bpftime("ringbuf-events", "ringbuf-events", 2000, &[]) else {
        return;
    };
    assert_eq!(r, expected(2000));
}

#[test]
fn ringbuf_output_events_arrive_exactly_once_as_unprivileged_user() {
    let Some(r) = under_bpftime("ringbuf-events", "ringbuf-events", 2000, &["-o"]) else {
        return;
    };
    assert_eq!(r, expected(2000));
}

#[test]
fn perfbuf_events_arrive_exactly_once_as_unprivileged_user() {
    let Some(r) = under_bpftime("perfbuf-events", "perfbuf-events", 2000, &[]) else {
        return;
    };
    assert_eq!(r, expected(2000));
}

#[test]
fn ringbuf_load_then_start_without_pid_filter() {
    let Some(build) = build_example("ringbuf-events") else {
        return;
    };
    let store = TestStore::new("rb-ls");
    let l = loader(&store, &build, "ringbuf-events", &["-n", "500"]);
    let v = victim(&store, &build, &["500"]);
    assert_eq!(v.finish(T).last().map(String::as_str), Some("calls 500"));
    assert_eq!(results(&l.finish(T)), expected(500));
}

#[test]
fn kernel_and_bpftime_agree_on_ringbuf_events() {
    let Some(kernel) = on_kernel("ringbuf-events", "ringbuf-events", 3000, &[]) else {
        return;
    };
    let ours = under_bpftime("ringbuf-events", "ringbuf-events", 3000, &[]).unwrap();
    assert_eq!(kernel, expected(3000));
    assert_eq!(ours, kernel);
}

#[test]
fn kernel_and_bpftime_agree_on_perfbuf_events() {
    let Some(kernel) = on_kernel("perfbuf-events", "perfbuf-events", 3000, &[]) else {
        return;
    };
    let ours = under_bpftime("perfbuf-events", "perfbuf-events", 3000, &[]).unwrap();
    assert_eq!(kernel, expected(3000));
    assert_eq!(ours, kernel);
}
