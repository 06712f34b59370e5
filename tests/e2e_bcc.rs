//! End to end: unmodified bcc 0.26 tools (Debian `bpfcc-tools`, `python3-bpfcc`) run both
//! ways on the same victims — against the kernel as root, and under `bpftime load` as an
//! unprivileged user (uid 65534) with the victim under `bpftime start` — and must print the
//! same thing: exact counts, identical histogram buckets, the same event lines modulo pids.
//!
//! Every case runs on a private copy of its victim binary (the kernel's uprobes are per
//! inode, so no other test's kernel probes can count its calls). bcc compiles its C in-process
//! against kernel headers: `scripts/bcc-headers` merges Debian's split header trees and the
//! tools get the result in `BCC_KERNEL_SOURCE`. Tools run with `/usr/bin/python3` and
//! `PYTHONUNBUFFERED=1` (so "ready" lines arrive while they run) and are stopped the way a
//! user stops them, with SIGINT, where they do not exit by themselves.

use bpftime_suite::{TestStore, artifacts, build_example, is_root, skip, unprivileged};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";
/// bcc compiles its program with clang at startup: seconds, more on a loaded machine.
const READY: Duration = Duration::from_secs(180);
const T: Duration = Duration::from_secs(60);

/// Where the merged kernel headers are, or `None` (after [`skip`]) when bcc, its python
/// binding or the headers are missing.
fn bcc_env() -> Option<PathBuf> {
    static HEADERS: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut h = HEADERS.lock().unwrap_or_else(|e| e.into_inner());
    let r = h.get_or_insert_with(|| {
        for tool in [
            "funccount-bpfcc",
            "trace-bpfcc",
            "argdist-bpfcc",
            "stackcount-bpfcc",
        ] {
            if !Path::new("/usr/sbin").join(tool).is_file() {
                return Err(format!(
                    "{tool} is missing (scripts/deps installs bpfcc-tools)"
                ));
            }
        }
        let ok = Command::new(PYTHON)
            .args(["-c", "import bcc"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err("python3-bpfcc is missing (scripts/deps installs it)".into());
        }
        let out = Command::new(bpftime_suite::workspace_root().join("scripts/bcc-headers"))
            .output()
            .map_err(|e| format!("scripts/bcc-headers: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "no kernel headers for bcc (scripts/deps installs linux-headers-amd64): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            skip(e);
            None
        }
    }
}

/// A copy of a built victim in a private directory everyone can read (removed on drop).
struct Victim {
    dir: PathBuf,
    path: PathBuf,
}

impl Victim {
    fn new(example: &str, binary: &str, tag: &str) -> Option<Victim> {
        use std::os::unix::fs::PermissionsExt as _;
        let build = build_example(example)?;
        let dir = std::env::temp_dir().join(format!("bpftime-bcc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("victim dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join(binary);
        std::fs::copy(build.join(binary), &path).expect("copy victim");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Victim { dir, path })
    }

    fn path(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// The tool as root against the kernel; the victim as itself.
    Kernel,
    /// The tool under `bpftime load` and the victim under `bpftime start`, both as uid 65534.
    Bpftime,
}

/// A running bcc tool: stdout lines arrive on a channel, stderr is collected for messages.
struct Tool {
    child: Child,
    lines: Receiver<String>,
    out: Vec<String>,
    err: Arc<Mutex<String>>,
    what: String,
}

impl Tool {
    fn spawn(mode: Mode, store: &TestStore, headers: &Path, args: &[String]) -> Tool {
        let mut cmd = match mode {
            Mode::Kernel => {
                let mut c = Command::new(PYTHON);
                c.current_dir("/tmp");
                c
            }
            Mode::Bpftime => {
                let mut c = unprivileged(&artifacts().bpftime);
                c.args(["load", "--store", &store.name, "--", PYTHON]);
                c
            }
        };
        cmd.args(args)
            .env("BCC_KERNEL_SOURCE", headers)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{mode:?}: {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (tx, lines) = channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = err.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let s = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap_or_else(|e| e.into_inner()).push_str(&s);
            }
        });
        Tool {
            child,
            lines,
            out: Vec::new(),
            err,
            what,
        }
    }

    fn report(&self) -> String {
        format!(
            "{}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.out.join("\n"),
            self.err.lock().unwrap_or_else(|e| e.into_inner())
        )
    }

    /// Reads stdout until `done(all lines so far)` holds.
    fn wait_for(&mut self, timeout: Duration, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.out) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.out.push(l),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("no {what} within {timeout:?}: {}", self.report());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait();
                    std::thread::sleep(Duration::from_millis(200));
                    panic!("exited ({st:?}) before {what}: {}", self.report());
                }
            }
        }
    }

    /// Ctrl-C, as a user stops a bcc tool — once it waits in its main loop (sleeping or
    /// polling), for a tool that prints its "ready" line *before* entering the `try` that
    /// catches `KeyboardInterrupt` dies with a traceback when the signal lands in between.
    fn interrupt(&self) {
        // clock_nanosleep, nanosleep, poll, ppoll, epoll_wait, epoll_pwait, epoll_pwait2.
        const WAITING: [&str; 7] = ["230", "35", "7", "271", "232", "281", "441"];
        let file = format!("/proc/{}/syscall", self.child.id());
        bpftime_suite::poll(T, "the tool to wait in its main loop", || {
            let s = std::fs::read_to_string(&file).ok()?;
            WAITING
                .contains(&s.split_whitespace().next()?)
                .then_some(())
        });
        let st = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -INT {}", self.child.id());
    }

    /// Waits for exit; returns the exit code and every stdout line.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let st = loop {
            if let Some(st) = self.child.try_wait().expect("wait tool") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("still running after {timeout:?}: {}", self.report());
            }
            while let Ok(l) = self.lines.try_recv() {
                self.out.push(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.out.push(l);
        }
        eprintln!("{}", self.report());
        (st.code(), std::mem::take(&mut self.out))
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the victim to completion (`bpftime start` in [`Mode::Bpftime`]); its stdout lines.
fn run_victim(mode: Mode, store: &TestStore, victim: &Victim, args: &[&str]) -> Vec<String> {
    let out = match mode {
        Mode::Kernel => Command::new(&victim.path).args(args).output(),
        Mode::Bpftime => unprivileged(&artifacts().bpftime)
            .args(["start", "--store", &store.name, "--"])
            .arg(&victim.path)
            .args(args)
            .output(),
    }
    .expect("run victim");
    assert!(
        out.status.success(),
        "victim {args:?} failed in {mode:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// When a tool is done.
enum Stop {
    /// It exits by itself.
    Exits,
    /// Ctrl-C once the victim has finished and the output satisfies the predicate.
    InterruptWhen(fn(&[String]) -> bool),
}

/// One bcc invocation.
struct Case {
    tag: &'static str,
    example: &'static str,
    binary: &'static str,
    victim_args: &'static [&'static str],
    /// The tool's arguments (after the python interpreter), given the victim's path.
    tool: fn(&str) -> Vec<String>,
    /// The line that says the probes are attached.
    ready: fn(&str) -> bool,
    stop: Stop,
    /// The part of the output compared between the two ways, pids and times removed.
    normalize: fn(&[String]) -> Vec<String>,
}

/// One run of a case; `(exit code, normalized output, victim output)`.
fn run_case(
    case: &Case,
    mode: Mode,
    victim: &Victim,
    headers: &Path,
) -> (Option<i32>, Vec<String>, Vec<String>) {
    let store = TestStore::new(&format!("bcc-{}", case.tag));
    let args = (case.tool)(&victim.path());
    let mut tool = Tool::spawn(mode, &store, headers, &args);
    tool.wait_for(READY, "ready line", |out| {
        out.iter().any(|l| (case.ready)(l))
    });
    let vout = run_victim(mode, &store, victim, case.victim_args);
    if let Stop::InterruptWhen(done) = case.stop {
        tool.wait_for(T, "complete output", done);
        tool.interrupt();
    }
    let (code, out) = tool.finish(T);
    (code, (case.normalize)(&out), vout)
}

/// Runs `case` against the kernel (as root) and under bpftime (as uid 65534), asserts the
/// two agree, and returns the bpftime run's normalized output and victim output for the
/// case's own checks. `None` when a prerequisite is missing (outside CI).
fn both_ways(case: &Case) -> Option<(Vec<String>, Vec<String>)> {
    let headers = bcc_env()?;
    let victim = Victim::new(case.example, case.binary, case.tag)?;
    let ours = run_case(case, Mode::Bpftime, &victim, &headers);
    if is_root() {
        let kernel = run_case(case, Mode::Kernel, &victim, &headers);
        assert_eq!(
            ours.1, kernel.1,
            "{}: bpftime (left) and kernel (right) outputs differ",
            case.tag
        );
        assert_eq!(ours.0, kernel.0, "{}: exit codes differ", case.tag);
    } else {
        skip("the kernel half of the bcc comparison needs root");
    }
    Some((ours.1, ours.2))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Every line, except empty ones.
fn all_lines(out: &[String]) -> Vec<String> {
    out.iter()
        .filter(|l| !l.trim().is_empty())
        .cloned()
        .collect()
}

/// The sum of the counts in one argdist block: `N -> M : count |…|` histogram rows and
/// `count  expr = value` frequency rows.
fn block_total(block: &[String]) -> u64 {
    block
        .iter()
        .filter_map(|l| {
            if l.contains("->") {
                l.split(':')
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            } else if l.contains(" = ") {
                l.split_whitespace().next()?.parse::<u64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// argdist prints a `[HH:MM:SS]` line, then the (cumulative, with `-c`) summary, every
/// interval: the last block.
fn last_block(out: &[String]) -> Vec<String> {
    let start = out
        .iter()
        .rposition(|l| l.starts_with('['))
        .map_or(0, |i| i + 1);
    all_lines(&out[start..])
}

#[test]
fn funccount_counts_exactly() {
    let case = Case {
        tag: "funccount",
        example: "uprobe-counter",
        binary: "victim",
        victim_args: &["1234"],
        tool: |v| s(&["/usr/sbin/funccount-bpfcc", &format!("{v}:target_function")]),
        ready: |l| l.starts_with("Tracing 1 functions"),
        stop: Stop::InterruptWhen(|_| true),
        normalize: all_lines,
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    let counts: Vec<Vec<&str>> = out
        .iter()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.first() == Some(&"target_function"))
        .collect();
    assert_eq!(counts, vec![vec!["target_function", "1234"]], "{out:?}");
}

#[test]
fn funccount_regex_counts_each_function() {
    let case = Case {
        tag: "funccount-re",
        example: "uretprobe-counter",
        binary: "retvictim",
        victim_args: &["-m", "mix", "700"],
        tool: |v| {
            s(&[
                "/usr/sbin/funccount-bpfcc",
                "-r",
                &format!("{v}:^(target_function|short_fn|rec_fn)$"),
            ])
        },
        ready: |l| l.starts_with("Tracing 3 functions"),
        stop: Stop::InterruptWhen(|_| true),
        // funccount prints the functions in hash-table order.
        normalize: |out| {
            let mut v = all_lines(out);
            v.sort();
            v
        },
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    // `mix` calls target_function, nop5_entry and short_fn (4 bytes: too short for a jump,
    // so bpftime traps there) 700 times each, rec_fn never: funccount leaves it out.
    let counts: Vec<Vec<&str>> = out
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 2 && f[1].parse::<u64>().is_ok())
        .collect();
    assert_eq!(
        counts,
        vec![vec!["short_fn", "700"], vec!["target_function", "700"]],
        "{out:?}"
    );
}

#[test]
fn trace_prints_arguments_and_return_values() {
    let case = Case {
        tag: "trace",
        example: "uprobe-counter",
        binary: "victim",
        victim_args: &["40", "250"],
        tool: |v| {
            s(&[
                "/usr/sbin/trace-bpfcc",
                &format!("{v}:target_function \"arg=%d\", arg1"),
                &format!("r:{v}:target_function \"ret=%d\", retval"),
            ])
        },
        ready: |l| l.starts_with("PID"),
        stop: Stop::InterruptWhen(|out| out.len() > 80),
        // `PID TID COMM FUNC -` columns: drop the pid and tid. Entry and return events come
        // through per-CPU buffers, so their order across CPUs is not fixed: sort.
        normalize: |out| {
            let mut v: Vec<String> = out
                .iter()
                .skip_while(|l| !l.starts_with("PID"))
                .skip(1)
                .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
                .filter(|l| !l.is_empty())
                .collect();
            v.sort();
            v
        },
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    let mut want: Vec<String> = (250..290)
        .flat_map(|a| {
            [
                format!("victim target_function arg={a}"),
                format!("victim target_function ret={}", a & 0xff),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(out, want);
}

#[test]
fn argdist_histogram_has_the_same_buckets() {
    let case = Case {
        tag: "argdist-hist",
        example: "uprobe-counter",
        binary: "victim",
        victim_args: &["300"],
        tool: |v| {
            s(&[
                "/usr/sbin/argdist-bpfcc",
                "-c",
                "-i",
                "1",
                "-H",
                &format!("p:{v}:target_function(long a):long:a"),
            ])
        },
        ready: |l| l.starts_with('['),
        stop: Stop::InterruptWhen(|out| block_total(&last_block(out)) == 300),
        normalize: last_block,
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    // 0..300 in log2 buckets: 0 -> 1 holds 0 and 1, then 2, 4, 8, … and 256..299.
    let buckets: Vec<(String, u64)> = out
        .iter()
        .filter(|l| l.contains("->"))
        .filter_map(|l| {
            let mut it = l.split(':');
            let range = it.next()?.split_whitespace().collect::<Vec<_>>().join(" ");
            Some((range, it.next()?.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    let mut want = vec![("0 -> 1".to_string(), 2)];
    for k in 1..8 {
        want.push((format!("{} -> {}", 1 << k, (2 << k) - 1), 1 << k));
    }
    want.push(("256 -> 511".into(), 44));
    assert_eq!(buckets, want, "{out:?}");
}

#[test]
fn argdist_counts_argument_values() {
    let case = Case {
        tag: "argdist-count",
        example: "uprobe-counter",
        binary: "victim",
        victim_args: &["500"],
        tool: |v| {
            s(&[
                "/usr/sbin/argdist-bpfcc",
                "-c",
                "-i",
                "1",
                "-C",
                &format!("p:{v}:target_function(u64 a):u64:a%7"),
            ])
        },
        ready: |l| l.starts_with('['),
        stop: Stop::InterruptWhen(|out| block_total(&last_block(out)) == 500),
        // Rows are sorted by count; equal counts come in hash-table order.
        normalize: |out| {
            let mut v = last_block(out);
            v.sort();
            v
        },
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    // 0..500 modulo 7: residues 0..3 occur 72 times, 4..6 71 times.
    let mut counts: Vec<(u64, u64)> = out
        .iter()
        .filter(|l| l.contains(" = "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.last()?.parse().ok()?, f.first()?.parse().ok()?))
        })
        .collect();
    counts.sort();
    let want: Vec<(u64, u64)> = (0..7).map(|r| (r, if r < 3 { 72 } else { 71 })).collect();
    assert_eq!(counts, want, "{out:?}");
}

#[test]
fn argdist_counts_return_values() {
    let case = Case {
        tag: "argdist-ret",
        example: "uprobe-counter",
        binary: "victim",
        victim_args: &["300"],
        tool: |v| {
            s(&[
                "/usr/sbin/argdist-bpfcc",
                "-c",
                "-i",
                "1",
                "-C",
                &format!("r:{v}:target_function():u32:(u32)$retval%5"),
            ])
        },
        ready: |l| l.starts_with('['),
        stop: Stop::InterruptWhen(|out| block_total(&last_block(out)) == 300),
        normalize: |out| {
            let mut v = last_block(out);
            v.sort();
            v
        },
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    // target_function(i) returns i & 0xff for i in 0..300: 0..=255 then 0..=43, modulo 5.
    let mut counts: Vec<(u64, u64)> = out
        .iter()
        .filter(|l| l.contains(" = "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.last()?.parse().ok()?, f.first()?.parse().ok()?))
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        vec![(0, 61), (1, 60), (2, 60), (3, 60), (4, 59)],
        "{out:?}"
    );
}

#[test]
fn stackcount_counts_user_stacks() {
    let case = Case {
        tag: "stackcount",
        example: "uprobe-counter",
        binary: "victim",
        victim_args: &["300"],
        tool: |v| {
            s(&[
                "/usr/sbin/stackcount-bpfcc",
                "-U",
                &format!("{v}:target_function"),
            ])
        },
        ready: |l| l.starts_with("Tracing 1 functions"),
        stop: Stop::InterruptWhen(|_| true),
        normalize: all_lines,
    };
    let Some((out, _)) = both_ways(&case) else {
        return;
    };
    // One stack (every call comes from main's loop), counted 300 times. The victim has
    // exited when stackcount symbolizes, so frames print as [unknown] both ways.
    let counts: Vec<&str> = out
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.parse::<u64>().is_ok())
        .collect();
    assert_eq!(counts, vec!["300"], "{out:?}");
}

#[test]
fn custom_script_with_uprobe_uretprobe_and_perf_buffer() {
    let case = Case {
        tag: "script",
        example: "uretprobe-counter",
        binary: "retvictim",
        victim_args: &["1000"],
        tool: |v| {
            let script = bpftime_suite::workspace_root().join("tests/bcc/uprobe_ret.py");
            s(&[&script.display().to_string(), v, "target_function", "1000"])
        },
        ready: |l| l == "attached",
        stop: Stop::Exits,
        normalize: all_lines,
    };
    let Some((out, vout)) = both_ways(&case) else {
        return;
    };
    // retvictim prints what the probes must have seen: "expect entries E returns R ret_sum S".
    let expect = vout
        .iter()
        .find_map(|l| l.strip_prefix("expect "))
        .expect("victim's expect line");
    let ret_sum = expect.split_whitespace().last().unwrap();
    let want = s(&[
        "attached",
        "event arg=0 ret=0",
        "event arg=1 ret=1",
        "event arg=2 ret=2",
        "event arg=3 ret=3",
        "event arg=4 ret=4",
        "events 1000 lost 0",
        "arg_sum 499500",
        &format!("ret_sum {ret_sum}"),
        "main_thread_events 1000",
        "entries arg%4=0: 250",
        "entries arg%4=1: 250",
        "entries arg%4=2: 250",
        "entries arg%4=3: 250",
    ]);
    assert_eq!(out, want);
}

#[test]
fn custom_script_on_eight_threads() {
    let case = Case {
        tag: "script-threads",
        example: "uretprobe-counter",
        binary: "retvictim",
        victim_args: &["-m", "threads", "250"],
        tool: |v| {
            let script = bpftime_suite::workspace_root().join("tests/bcc/uprobe_ret.py");
            s(&[&script.display().to_string(), v, "target_function", "2000"])
        },
        ready: |l| l == "attached",
        stop: Stop::Exits,
        normalize: all_lines,
    };
    let Some((out, vout)) = both_ways(&case) else {
        return;
    };
    let expect = vout
        .iter()
        .find_map(|l| l.strip_prefix("expect "))
        .expect("victim's expect line");
    let ret_sum = expect.split_whitespace().last().unwrap();
    // 8 threads call target_function(0..250): each argument 8 times, none on the main thread.
    let want = s(&[
        "attached",
        "event arg=0 ret=0",
        "event arg=0 ret=0",
        "event arg=0 ret=0",
        "event arg=0 ret=0",
        "event arg=0 ret=0",
        "events 2000 lost 0",
        "arg_sum 249000",
        &format!("ret_sum {ret_sum}"),
        "main_thread_events 0",
        "entries arg%4=0: 504",
        "entries arg%4=1: 504",
        "entries arg%4=2: 496",
        "entries arg%4=3: 496",
    ]);
    assert_eq!(out, want);
}

/// Perf events the agent in `pid` reports attached, from `bpftime list`.
fn attached_events(store: &TestStore, pid: u32) -> Option<usize> {
    let out = unprivileged(&artifacts().bpftime)
        .args(["list", "--store", &store.name])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let prefix = format!("agent pid {pid} attached events [");
    let line = text.lines().find(|l| l.starts_with(&prefix))?;
    let inner = line.strip_prefix(&prefix)?.strip_suffix(']')?;
    Some(inner.split(", ").filter(|s| !s.is_empty()).count())
}

/// `funccount -p PID` on a victim that waits for a file, while another process runs the same
/// function unfiltered: only the chosen process counts, both ways.
#[test]
fn funccount_pid_filter_counts_one_process() {
    let Some(headers) = bcc_env() else {
        return;
    };
    let Some(victim) = Victim::new("uprobe-counter", "victim", "funccount-pid") else {
        return;
    };
    let mut modes = vec![Mode::Bpftime];
    if is_root() {
        modes.push(Mode::Kernel);
    } else {
        skip("the kernel half of the bcc comparison needs root");
    }
    let mut outs = Vec::new();
    for mode in modes {
        let store = TestStore::new("bcc-pid");
        let go = victim.dir.join(format!("go-{mode:?}"));
        let go_arg = go.display().to_string();
        let args = ["-W", go_arg.as_str(), "321"];
        let cmd = match mode {
            Mode::Kernel => {
                let mut c = Command::new(&victim.path);
                c.args(args);
                c
            }
            Mode::Bpftime => {
                let mut c = unprivileged(&artifacts().bpftime);
                c.args(["start", "--store", &store.name, "--"])
                    .arg(&victim.path)
                    .args(args);
                c
            }
        };
        let mut target = bpftime_suite::Proc::spawn(cmd, "waiting victim");
        let pid = target.wait_line(T, |l| l.starts_with("pid "))[4..].to_string();
        let tool_args = s(&[
            "/usr/sbin/funccount-bpfcc",
            "-p",
            &pid,
            &format!("{}:target_function", victim.path()),
        ]);
        let mut tool = Tool::spawn(mode, &store, &headers, &tool_args);
        tool.wait_for(READY, "ready line", |out| {
            out.iter().any(|l| l.starts_with("Tracing 1 functions"))
        });
        if mode == Mode::Bpftime {
            let vpid: u32 = pid.parse().expect("victim pid");
            bpftime_suite::poll(T, "the agent to attach funccount's probe", || {
                attached_events(&store, vpid).filter(|&n| n > 0)
            });
        }
        // Another process calling the same function: filtered out.
        run_victim(mode, &store, &victim, &["200"]);
        std::fs::write(&go, b"").expect("create the go file");
        assert_eq!(
            target.finish(T).last().map(String::as_str),
            Some("calls 321")
        );
        tool.interrupt();
        let (code, out) = tool.finish(T);
        outs.push((code, all_lines(&out)));
    }
    let ours = &outs[0];
    let counts: Vec<&str> = ours
        .1
        .iter()
        .filter(|l| l.starts_with("target_function"))
        .map(String::as_str)
        .collect();
    assert_eq!(counts.len(), 1, "{ours:?}");
    assert!(
        counts[0].split_whitespace().eq(["target_function", "321"]),
        "{ours:?}"
    );
    if let Some(kernel) = outs.get(1) {
        assert_eq!(ours, kernel, "bpftime (left) and kernel (right) differ");
    }
}
