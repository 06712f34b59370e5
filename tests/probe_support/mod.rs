//! Shared by `e2e_uretprobe.rs` and `e2e_probes.rs`: run one victim of
//! `examples/uretprobe-counter` with one of its libbpf tools attached — under bpftime as an
//! unprivileged user, or natively on the kernel (root) — and collect both outputs.

#![allow(dead_code, reason = "each test binary uses a different part")]

use bpftime_suite::{Proc, TestStore, artifacts, is_root, poll, skip, unprivileged};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const T: Duration = Duration::from_secs(60);

/// One run: the victim's and the tool's stdout lines.
#[derive(Debug)]
pub struct Run {
    pub victim: Vec<String>,
    pub tool: Vec<String>,
    pub victim_pid: u32,
}

impl Run {
    /// `key value` from the tool's output.
    pub fn tool_value(&self, key: &str) -> Option<String> {
        value(&self.tool, key)
    }

    /// `key value` from the victim's output.
    pub fn victim_value(&self, key: &str) -> Option<String> {
        value(&self.victim, key)
    }

    /// The tool's `entries`, `returns`, `ret_sum`.
    pub fn counts(&self) -> [u64; 3] {
        ["entries", "returns", "ret_sum"].map(|k| {
            self.tool_value(k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {:?}", self.tool))
        })
    }

    /// What the victim says a probe must have counted (`expect entries E returns R ret_sum S`).
    pub fn expected(&self) -> [u64; 3] {
        let line = self
            .victim
            .iter()
            .find_map(|l| l.strip_prefix("expect "))
            .unwrap_or_else(|| panic!("no expect line in {:?}", self.victim));
        let f: Vec<&str> = line.split_whitespace().collect();
        [f[1], f[3], f[5]].map(|v| v.parse().expect("number"))
    }
}

fn value(lines: &[String], key: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(' '))
            .map(str::to_string)
    })
}

/// Sends SIGINT to `pid` (a loader: it detaches and prints its counts).
pub fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}

/// Where the probes apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `bpftime load` + `bpftime start`, as uid 65534 when root.
    Bpftime,
    /// The same tool natively (root).
    Kernel,
}

/// The victim waits (`-w`) until the tool is attached to its pid, runs, exits; then the tool
/// is interrupted and prints its counts. `tool` is a binary of the example build; its last
/// arguments are the victim's path and `func` (split at spaces: several probe points).
pub fn run(
    rt: Runtime,
    build: &Path,
    tool: &str,
    tool_args: &[&str],
    victim: &str,
    victim_args: &[&str],
    func: &str,
) -> Run {
    let (st, r) = run_status(rt, build, tool, tool_args, victim, victim_args, func);
    assert!(st.success(), "{victim} ({rt:?}) failed ({st}): {r:?}");
    r
}

/// [`run`] for a victim that may fail: its exit status too.
pub fn run_status(
    rt: Runtime,
    build: &Path,
    tool: &str,
    tool_args: &[&str],
    victim: &str,
    victim_args: &[&str],
    func: &str,
) -> (std::process::ExitStatus, Run) {
    run_status_env(rt, build, tool, tool_args, victim, victim_args, func, &[])
}

/// [`run_status`] with extra environment variables for the victim.
#[allow(clippy::too_many_arguments)]
pub fn run_status_env(
    rt: Runtime,
    build: &Path,
    tool: &str,
    tool_args: &[&str],
    victim: &str,
    victim_args: &[&str],
    func: &str,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, Run) {
    let store = TestStore::new(&format!("ret-{tool}"));
    let a = artifacts();
    let mut vc = match rt {
        Runtime::Bpftime => {
            let mut c = unprivileged(&a.bpftime);
            c.args(["start", "--store", &store.name, "--"])
                .arg(build.join(victim));
            c
        }
        Runtime::Kernel => Command::new(build.join(victim)),
    };
    vc.arg("-w").args(victim_args).envs(env.iter().copied());
    let mut v = Proc::spawn(vc, &format!("{victim} ({rt:?})"));
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    let mut lc = match rt {
        Runtime::Bpftime => {
            let mut c = unprivileged(&a.bpftime);
            c.args(["load", "--store", &store.name, "--"])
                .arg(build.join(tool));
            c
        }
        Runtime::Kernel => Command::new(build.join(tool)),
    };
    lc.args(tool_args)
        .args(["-p", &vpid.to_string()])
        .arg(build.join(victim))
        .args(func.split(' '));
    let mut l = Proc::spawn(lc, &format!("{tool} ({rt:?})"));
    l.wait_line(T, |s| s == "attached");
    if rt == Runtime::Bpftime {
        poll(T, "the agent to attach", || {
            attached_events(&store, vpid).filter(|e| !e.is_empty())
        });
    }
    v.send_line("go");
    let (status, victim_lines) = v.finish_status(T);
    interrupt(l.pid());
    let r = Run {
        victim: victim_lines,
        tool: l.finish(T),
        victim_pid: vpid,
    };
    (status, r)
}

/// Perf events the agent in `pid` reports attached, from `bpftime list`.
pub fn attached_events(store: &TestStore, pid: u32) -> Option<Vec<String>> {
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

/// Whether the kernel baseline can run (root); otherwise skips (fails under CI).
pub fn kernel_available() -> bool {
    is_root() || !skip("the kernel baseline needs root (bpf() and uprobes)")
}

/// The example build directory.
pub fn example() -> Option<PathBuf> {
    bpftime_suite::build_example("uretprobe-counter")
}
