//! Measurement helpers shared by the cross-process benchmarks (`benches/uprobe.rs`,
//! `benches/syscall.rs`, `benches/report.rs`): a victim's `ns_per_call` line, medians and
//! spread, and a loader session run either under `bpftime load` or natively against the kernel.

use crate::{Proc, TestStore};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long one victim or loader step may take before the bench gives up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The value of a victim's `ns_per_call X` line.
pub fn ns_per_call(lines: &[String]) -> Option<f64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("ns_per_call "))
        .and_then(|v| v.trim().parse().ok())
}

/// The victim's CPU time per call (`cpu_ns_per_call X`: user + system time of its thread, so
/// a kernel probe's work counts and other processes' load does not), else its wall-clock
/// `ns_per_call X` (victims that print only that one measure CPU time already, e.g.
/// `syscall-victim -b`).
pub fn cpu_ns_per_call(lines: &[String]) -> Option<f64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("cpu_ns_per_call "))
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| ns_per_call(lines))
}

/// The median of `v` (the upper middle for an even length); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median and spread (min, max) of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Stats {
    /// The statistics of `v`; `None` when it is empty.
    pub fn of(v: &[f64]) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Stats {
            median: median(v.to_vec()),
            min,
            max,
            n: v.len(),
        })
    }
}

/// Runs `cmd` to completion and returns its [`cpu_ns_per_call`].
pub fn run_victim(cmd: Command, what: &str) -> f64 {
    let lines = Proc::spawn(cmd, what).finish(STEP_TIMEOUT);
    cpu_ns_per_call(&lines)
        .unwrap_or_else(|| panic!("{what} printed no (cpu_)ns_per_call line: {lines:?}"))
}

/// `bpftime start --store STORE -- PROGRAM` (with `Some`), else `PROGRAM`.
pub fn maybe_under_bpftime(bpftime: Option<(&Path, &str)>, program: &Path) -> Command {
    match bpftime {
        Some((bpftime, store)) => {
            let mut c = Command::new(bpftime);
            c.args(["start", "--store", store, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// How a loader session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT (loaders that wait for a signal or a deadline).
    Interrupt,
    /// A line on stdin (loaders that wait for one, e.g. `syscall-trace`).
    Line,
}

/// An unmodified loader that has printed `attached`: under `bpftime load` on its own store, or
/// natively against the kernel.
#[derive(Debug)]
pub struct Loader {
    proc: Proc,
    stop: Stop,
    /// The store of a `bpftime load` session (removed on drop).
    pub store: Option<TestStore>,
    /// Time from spawn to the `attached` line.
    pub attach_time: Duration,
}

impl Loader {
    /// Starts `loader ARGS` under `bpftime load` (when `bpftime` is given) or natively, and
    /// waits for its `attached` line.
    pub fn start(
        bpftime: Option<&Path>,
        tag: &str,
        loader: &Path,
        args: &[&str],
        stop: Stop,
    ) -> Loader {
        let t0 = Instant::now();
        let (cmd, store) = match bpftime {
            Some(b) => {
                // `bpftime` runs as this process's user here (not `unprivileged`).
                let store = TestStore::for_current_user(tag);
                let mut c = Command::new(b);
                c.args(["load", "--store", &store.name, "--"])
                    .arg(loader)
                    .args(args);
                (c, Some(store))
            }
            None => {
                let mut c = Command::new(loader);
                c.args(args);
                (c, None)
            }
        };
        let what = format!(
            "{} {}{}",
            loader
                .file_name()
                .map_or("loader".into(), |n| n.to_string_lossy()),
            args.join(" "),
            if store.is_some() {
                " (bpftime)"
            } else {
                " (kernel)"
            }
        );
        let mut proc = Proc::spawn(cmd, &what);
        proc.wait_line(STEP_TIMEOUT, |s| s == "attached");
        Loader {
            proc,
            stop,
            store,
            attach_time: t0.elapsed(),
        }
    }

    /// `Some((bpftime, store))` for [`maybe_under_bpftime`]: the session's store.
    pub fn under<'a>(&'a self, bpftime: &'a Path) -> Option<(&'a Path, &'a str)> {
        self.store.as_ref().map(|s| (bpftime, s.name.as_str()))
    }

    /// Stops the loader and returns everything it printed.
    pub fn finish(self) -> Vec<String> {
        let Loader {
            mut proc,
            stop,
            store,
            ..
        } = self;
        match stop {
            Stop::Interrupt => {
                let _ = Command::new("kill")
                    .args(["-INT", &proc.pid().to_string()])
                    .status();
            }
            Stop::Line => proc.send_line("report"),
        }
        let lines = proc.finish(STEP_TIMEOUT);
        drop(store);
        lines
    }

    /// The loader process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_lengths() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).expect("non-empty");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).expect("non-empty");
        assert_eq!(s.median, 3.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn ns_per_call_parses_the_victim_line() {
        let lines = vec!["calls 10".to_string(), "ns_per_call 12.50".to_string()];
        assert_eq!(ns_per_call(&lines), Some(12.5));
        assert_eq!(ns_per_call(&lines[..1]), None);
        assert_eq!(cpu_ns_per_call(&lines), Some(12.5));
        let with_cpu = vec![
            "ns_per_call 20.0".to_string(),
            "cpu_ns_per_call 15.0".to_string(),
        ];
        assert_eq!(cpu_ns_per_call(&with_cpu), Some(15.0));
    }
}
