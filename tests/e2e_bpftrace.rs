//! End to end: unmodified bpftrace 0.17 under `bpftime load` as an unprivileged user (uid
//! 65534), tracing victims under `bpftime start`, against bpftrace as root on the kernel with the
//! same victims: a table of one-liners, each run both ways, stdout compared line by line after
//! the victim's pid (and the victim's uid, in `uid=` fields) is replaced by a placeholder.
//!
//! Every case also names lines that must appear in bpftime's output (the counts the victim
//! makes), so the userspace side is checked without root as well. Cases that cannot work in
//! userspace (kprobes, kernel structs, hardware counters) check the clear error instead.
//!
//! Victims: `examples/uprobe-counter/victim` (`target_function(i)` for i < N),
//! `examples/uretprobe-counter/retvictim -m nop5` (`nop5_entry(i)` returns i + 1),
//! `examples/syscall-trace/victim` (openat, getppid twice, umask per iteration) and
//! `tests/bpftrace/victim.c` (libc `malloc(1000 + i)`, six arguments, strings, a `char **`).

use bpftime_suite::{
    Proc, TestStore, artifacts, build_example, is_root, poll, profile_dir, skip, unprivileged,
    unprivileged_uid, workspace_root,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
/// Iterations of every victim's loop.
const N: u64 = 64;
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// examples/uprobe-counter/victim -W GO N
    Counter,
    /// examples/uretprobe-counter/retvictim -W GO -m nop5 N
    Ret,
    /// tests/bpftrace/victim.c: bpftrace-victim -W GO N
    Bt,
    /// examples/syscall-trace/victim N (ready line, "go" on stdin)
    Sys,
}

/// How bpftrace ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// SIGINT once the victim has exited.
    Sigint,
    /// The program calls exit().
    Exit,
    /// `-c CMD`: bpftrace runs the victim and ends with it.
    Cmd,
    /// No victim: bpftrace ends by itself (`-l`, `exit()` from `interval`); lines compared
    /// sorted.
    List,
}

struct Case {
    name: &'static str,
    victim: Victim,
    end: End,
    /// bpftrace arguments; `{V}` = victim binary, `{P}` = victim pid, `{LIBC}` = libc,
    /// `{OFF}` = the address of `target_function` in the victim, `{N}` = N.
    args: &'static [&'static str],
    /// Perf events the agent must have attached before the victim starts (bpftime side).
    events: usize,
    /// Lines that must appear in the output (after normalisation; `{N}` etc. substituted).
    must: &'static [&'static str],
    /// bpftime side: hide the uprobe PMU (`BPFTIME_NO_UPROBE_PMU=1`), so bpftrace attaches
    /// through its tracefs `uprobe_events` fallback.
    no_pmu: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "uprobe count by symbol",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &["-e", "uprobe:{V}:target_function { @calls = count(); }"],
        events: 1,
        must: &["@calls: 64"],
        no_pmu: false,
    },
    Case {
        name: "sum avg min max",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function { @s = sum(arg0); @a = avg(arg0); @mn = min(arg0); @mx = max(arg0); }",
        ],
        events: 1,
        must: &["@s: 2016", "@a: 31", "@mn: 0", "@mx: 63"],
        no_pmu: false,
    },
    Case {
        name: "stats",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &["-e", "uprobe:{V}:target_function { @st = stats(arg0); }"],
        events: 1,
        must: &["@st: count 64, average 31, total 2016"],
        no_pmu: false,
    },
    Case {
        name: "hist",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &["-e", "uprobe:{V}:target_function { @h = hist(arg0); }"],
        events: 1,
        must: &["[32, 64)              32 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|"],
        no_pmu: false,
    },
    Case {
        name: "lhist",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function { @l = lhist(arg0, 0, 64, 16); }",
        ],
        events: 1,
        must: &["[48, 64)              16 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|"],
        no_pmu: false,
    },
    Case {
        name: "uprobe by address",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &["-e", "uprobe:{V}:{OFF} { @by_addr = count(); }"],
        events: 1,
        must: &["@by_addr: 64"],
        no_pmu: false,
    },
    Case {
        name: "filter",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function /arg0 % 2 == 0/ { @even = count(); }",
        ],
        events: 1,
        must: &["@even: 32"],
        no_pmu: false,
    },
    Case {
        name: "uretprobe retval",
        victim: Victim::Ret,
        end: End::Sigint,
        args: &[
            "-e",
            "uretprobe:{V}:nop5_entry { @n = count(); @r = sum(retval); @h = hist(retval); }",
        ],
        events: 1,
        must: &["@n: 64", "@r: 2080"],
        no_pmu: false,
    },
    Case {
        name: "pid tid comm",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function /arg0 == 7/ { printf(\"pid=%d tid=%d comm=%s\\n\", pid, tid, comm); }",
        ],
        events: 1,
        must: &["pid=PID tid=PID comm=victim"],
        no_pmu: false,
    },
    Case {
        name: "uid",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function /arg0 == 7/ { printf(\"uid=%d\\n\", uid); }",
        ],
        events: 1,
        must: &["uid=UID"],
        no_pmu: false,
    },
    Case {
        name: "nsecs cpu",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function /arg0 == 7/ { printf(\"nsecs %d cpu %d\\n\", nsecs > 1000, cpu < 4096); }",
        ],
        events: 1,
        must: &["nsecs 1 cpu 1"],
        no_pmu: false,
    },
    Case {
        name: "func probe",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:six_args /arg0 == 3/ { printf(\"%s|%s\\n\", func, probe); }",
        ],
        events: 1,
        must: &["six_args|uprobe:{V}:six_args"],
        no_pmu: false,
    },
    Case {
        name: "ustack",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:six_args /arg0 == 3/ { printf(\"%s\\n\", ustack(2)); }",
        ],
        events: 1,
        must: &["        six_args+0"],
        no_pmu: false,
    },
    Case {
        name: "arg0-arg5",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:six_args /arg0 == 5/ { printf(\"%d %d %d %d %d %d\\n\", arg0, arg1, arg2, arg3, arg4, arg5); }",
        ],
        events: 1,
        must: &["5 10 15 20 25 30"],
        no_pmu: false,
    },
    Case {
        name: "str",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &["-e", "uprobe:{V}:greet { @names[str(arg0)] = count(); }"],
        events: 1,
        must: &["@names[alice]: 32", "@names[bob]: 32"],
        no_pmu: false,
    },
    Case {
        name: "join",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &["-e", "uprobe:{V}:words { join(arg0); }"],
        events: 1,
        must: &["one two three"],
        no_pmu: false,
    },
    Case {
        name: "libc malloc lhist with -p",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &[
            "-p",
            "{P}",
            "-e",
            "uprobe:{LIBC}:malloc /pid == {P} && arg0 >= 1000 && arg0 < 1064/ { @sizes = lhist(arg0, 1000, 1064, 16); }",
        ],
        events: 1,
        must: &["[1000, 1016)          16 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|"],
        no_pmu: false,
    },
    Case {
        name: "libc malloc uretprobe with delete",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &[
            "-p",
            "{P}",
            "-e",
            "uprobe:{LIBC}:malloc /pid == {P} && arg0 >= 1000 && arg0 < 1064/ { @pending[tid] = arg0; } \
             uretprobe:{LIBC}:malloc /pid == {P} && @pending[tid]/ { @ok[retval != 0] = count(); delete(@pending[tid]); }",
        ],
        events: 2,
        must: &["@ok[1]: 64"],
        no_pmu: false,
    },
    Case {
        name: "print clear delete",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function { @c[arg0 % 4] = count(); if (arg0 == 63) { delete(@c[0]); print(@c); clear(@c); } }",
        ],
        events: 1,
        must: &["@c[1]: 16", "@c[3]: 16"],
        no_pmu: false,
    },
    Case {
        name: "BEGIN END printf",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "BEGIN { printf(\"start\\n\"); } uprobe:{V}:target_function { @c = count(); } END { printf(\"end %d\\n\", 1); }",
        ],
        events: 1,
        must: &["start", "end 1", "@c: 64"],
        no_pmu: false,
    },
    Case {
        name: "exit from a probe",
        victim: Victim::Counter,
        end: End::Exit,
        args: &[
            "-e",
            "uprobe:{V}:target_function { @c = count(); if (arg0 == 40) { printf(\"seen %d\\n\", arg0); exit(); } }",
        ],
        events: 1,
        must: &["seen 40"],
        no_pmu: false,
    },
    Case {
        name: "-c command",
        victim: Victim::Counter,
        end: End::Cmd,
        args: &[
            "-c",
            "{V} {N}",
            "-e",
            "uprobe:{V}:target_function { @c = count(); }",
        ],
        events: 0,
        must: &["calls 64", "@c: 64"],
        no_pmu: false,
    },
    Case {
        name: "tracepoint syscalls count",
        victim: Victim::Sys,
        end: End::Sigint,
        args: &[
            "-e",
            "tracepoint:syscalls:sys_enter_getppid /pid == {P}/ { @getppid = count(); }",
        ],
        events: 1,
        must: &["@getppid: 128"],
        no_pmu: false,
    },
    Case {
        name: "tracepoint exit args",
        victim: Victim::Sys,
        end: End::Sigint,
        args: &[
            "-e",
            "tracepoint:syscalls:sys_exit_openat /pid == {P}/ { @ok[args->ret >= 0] = count(); }",
        ],
        events: 1,
        must: &["@ok[0]: 64", "@ok[1]: 64"],
        no_pmu: false,
    },
    Case {
        name: "tracepoint string arg",
        victim: Victim::Sys,
        end: End::Sigint,
        args: &[
            "-e",
            "tracepoint:syscalls:sys_enter_openat /pid == {P}/ { @paths[str(args->filename)] = count(); }",
        ],
        events: 1,
        must: &["@paths[/etc/hostname]: 64"],
        no_pmu: false,
    },
    Case {
        name: "raw_syscalls",
        victim: Victim::Sys,
        end: End::Sigint,
        args: &[
            "-e",
            "tracepoint:raw_syscalls:sys_enter /pid == {P} && args->id == 95/ { @umask = count(); }",
        ],
        events: 1,
        must: &["@umask: 64"],
        no_pmu: false,
    },
    Case {
        name: "uprobe and uretprobe through uprobe_events",
        victim: Victim::Counter,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:{V}:target_function { @c = count(); } uretprobe:{V}:target_function { @r = sum(retval); }",
        ],
        events: 2,
        must: &["@c: 64", "@r: 2016"],
        no_pmu: true,
    },
    Case {
        name: "interval and exit",
        victim: Victim::Counter,
        end: End::List,
        args: &[
            "-e",
            "interval:ms:100 { @n++; if (@n == 5) { printf(\"five\\n\"); exit(); } } END { printf(\"end\\n\"); }",
        ],
        events: 0,
        must: &["five", "end", "@n: 5"],
        no_pmu: false,
    },
    Case {
        name: "libc by short name, uretprobe stats, ustack map key",
        victim: Victim::Bt,
        end: End::Sigint,
        args: &[
            "-e",
            "uprobe:libc:malloc /pid == {P} && arg0 >= 1000 && arg0 < 1064/ { @m = count(); } \
             uretprobe:{V}:six_args { @s = stats(retval); @u[ustack(1)] = count(); }",
        ],
        events: 2,
        must: &["@m: 64", "@s: count 64, average 661, total 42336"],
        no_pmu: false,
    },
    Case {
        name: "-l tracepoints",
        victim: Victim::Bt,
        end: End::List,
        args: &["-l", "tracepoint:syscalls:sys_enter_getp*"],
        events: 0,
        must: &["tracepoint:syscalls:sys_enter_getppid"],
        no_pmu: false,
    },
    Case {
        name: "-lv tracepoint arguments",
        victim: Victim::Bt,
        end: End::List,
        args: &["-lv", "tracepoint:syscalls:sys_enter_openat"],
        events: 0,
        must: &["    const char * filename", "    umode_t mode"],
        no_pmu: false,
    },
    Case {
        name: "-l uprobes",
        victim: Victim::Bt,
        end: End::List,
        args: &["-l", "uprobe:{V}:*"],
        events: 0,
        must: &["uprobe:{V}:six_args", "uprobe:{V}:greet"],
        no_pmu: false,
    },
];

/// Perf events the agent in `pid` reports attached (`bpftime list`).
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

/// Perf events with a BPF program that process `pid` holds in the kernel (`bpftool perf`).
fn kernel_perf_events(pid: u32) -> Option<usize> {
    let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let out = Command::new(bpftool).args(["perf", "list"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let prefix = format!("pid {pid} ");
    Some(text.lines().filter(|l| l.starts_with(&prefix)).count())
}

struct Victims {
    counter: PathBuf,
    ret: PathBuf,
    sys: PathBuf,
    bt: PathBuf,
}

impl Victims {
    fn path(&self, v: Victim) -> &Path {
        match v {
            Victim::Counter => &self.counter,
            Victim::Ret => &self.ret,
            Victim::Bt => &self.bt,
            Victim::Sys => &self.sys,
        }
    }
}

/// Builds tests/bpftrace/victim.c into the profile directory.
fn build_bt_victim() -> PathBuf {
    let out = profile_dir().join("examples").join("bpftrace-victim");
    let src = workspace_root().join("tests/bpftrace/victim.c");
    let st = Command::new("cc")
        .args(["-O2", "-g", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(st.success(), "building {} failed", src.display());
    out
}

/// `nm`'s address of `sym` in `bin`, as `0x…`.
fn symbol_address(bin: &Path, sym: &str) -> String {
    let out = Command::new("nm").arg(bin).output().expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (a, _, s) = (f.next()?, f.next()?, f.next()?);
            (s == sym).then(|| a.trim_start_matches('0').to_owned())
        })
        .unwrap_or_else(|| panic!("{sym} not in {}", bin.display()));
    format!("0x{addr}")
}

fn subst(s: &str, v: &Path, pid: Option<u32>, off: &str) -> String {
    let mut s = s
        .replace("{V}", &v.display().to_string())
        .replace("{LIBC}", LIBC)
        .replace("{OFF}", off)
        .replace("{N}", &N.to_string());
    if let Some(p) = pid {
        s = s.replace("{P}", &p.to_string());
    }
    s
}

/// The output lines to compare: from the "Attaching" line on (exclusive), each through
/// [`norm_line`].
fn normalise(lines: &[String], pid: Option<u32>, uid: u32) -> Vec<String> {
    let start = lines
        .iter()
        .position(|l| l.starts_with("Attaching "))
        .map_or(0, |i| i + 1);
    lines[start..]
        .iter()
        .map(|l| norm_line(l, pid, uid))
        .collect()
}

/// `l` with the victim's pid replaced by `PID` (whole words) and `uid=<uid>` by `uid=UID`.
fn norm_line(l: &str, pid: Option<u32>, uid: u32) -> String {
    let l = l.replace(&format!("uid={uid}"), "uid=UID");
    let Some(p) = pid else {
        return l;
    };
    let p = p.to_string();
    let mut out = String::new();
    let mut rest = l.as_str();
    while let Some(i) = rest.find(&p) {
        let before = rest[..i].chars().last();
        let after = rest[i + p.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        out.push_str(&rest[..i]);
        out.push_str(if word(before) || word(after) {
            &p
        } else {
            "PID"
        });
        rest = &rest[i + p.len()..];
    }
    out.push_str(rest);
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Kernel,
    Bpftime,
}

/// The uid the victims of `side` run as.
fn side_uid(side: Side) -> u32 {
    match side {
        Side::Kernel => 0,
        Side::Bpftime => unprivileged_uid(),
    }
}

/// Runs one case one way; the normalised output.
fn run(case: &Case, side: Side, victims: &Victims, off: &str, tag: &str) -> Vec<String> {
    let a = artifacts();
    let store = TestStore::new(tag);
    let vpath = victims.path(case.victim);
    let go = std::env::temp_dir().join(format!("bpftrace-go-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    let n = N.to_string();
    let vargs: Vec<String> = match case.victim {
        Victim::Counter | Victim::Bt => vec!["-W".into(), go.display().to_string(), n],
        Victim::Ret => vec![
            "-W".into(),
            go.display().to_string(),
            "-m".into(),
            "nop5".into(),
            n,
        ],
        Victim::Sys => vec![n],
    };
    let mut victim = None;
    let mut vpid = None;
    if !matches!(case.end, End::Cmd | End::List) {
        let cmd = match side {
            Side::Kernel => {
                let mut c = Command::new(vpath);
                c.args(&vargs);
                c
            }
            Side::Bpftime => {
                let mut c = unprivileged(&a.bpftime);
                c.args(["start", "--store", &store.name, "--"])
                    .arg(vpath)
                    .args(&vargs);
                c
            }
        };
        let mut v = Proc::spawn(cmd, &format!("victim ({})", case.name));
        let l = v.wait_line(T, |l| l.starts_with("pid ") || l.starts_with("ready "));
        vpid = Some(
            l.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                .expect("victim pid"),
        );
        victim = Some(v);
    }
    let args: Vec<String> = case
        .args
        .iter()
        .map(|s| subst(s, vpath, vpid, off))
        .collect();
    let cmd = match side {
        Side::Kernel => {
            let mut c = Command::new("bpftrace");
            c.args(&args).current_dir("/tmp");
            c
        }
        Side::Bpftime => {
            let mut c = unprivileged(&a.bpftime);
            c.args(["load", "--store", &store.name, "--", "bpftrace"])
                .args(&args);
            if case.no_pmu {
                c.env("BPFTIME_NO_UPROBE_PMU", "1");
            }
            c
        }
    };
    let mut bt = Proc::spawn(cmd, &format!("bpftrace ({})", case.name));
    if case.end == End::List {
        let mut out = bt.finish(T);
        out.sort();
        return out;
    }
    bt.wait_line(T, |l| l.starts_with("Attaching "));
    if let Some(p) = vpid
        && case.events > 0
    {
        match side {
            Side::Bpftime => poll(T, "the agent to attach the probes", || {
                attached_events(&store, p).filter(|&n| n >= case.events)
            }),
            // "Attaching N probes..." comes before the attachments: wait for the kernel's.
            Side::Kernel => poll(T, "bpftrace to attach its probes", || {
                kernel_perf_events(bt.pid()).filter(|&n| n >= case.events)
            }),
        };
    }
    if let Some(v) = &mut victim {
        match case.victim {
            Victim::Sys => v.send_line("go"),
            _ => std::fs::write(&go, b"").expect("create go file"),
        }
        v.wait_line(T, |l| l.starts_with("calls ") || l == "done");
    }
    if case.victim != Victim::Bt
        && let Some(v) = victim.take()
    {
        v.finish(T);
    }
    if case.end == End::Sigint {
        // printf output comes through perf buffers, read asynchronously: wait for the lines the
        // case expects from printf before interrupting (maps are printed at exit).
        // (END's "end …" line comes after the interrupt.)
        let printed =
            |m: &&&str| !m.starts_with('@') && !m.starts_with('[') && !m.starts_with("end ");
        for m in case.must.iter().filter(printed) {
            let m = subst(m, vpath, None, off);
            let (p, uid) = (vpid, side_uid(side));
            if !bt.seen.iter().any(|l| norm_line(l, p, uid) == m) {
                bt.wait_line(T, |l| norm_line(l, p, uid) == m);
            }
        }
        // bpftrace now and then misses a SIGINT that arrives while it is busy; repeat it.
        for _ in 0..10 {
            // kill(1) as a command: the test crate forbids unsafe.
            let st = Command::new("kill")
                .args(["-INT", &bt.pid().to_string()])
                .status()
                .expect("run kill");
            if !st.success() {
                break;
            }
            let exited = (0..250).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                matches!(bt.child.try_wait(), Ok(Some(_)))
            });
            if exited {
                break;
            }
        }
    }
    let out = bt.finish(T);
    let _ = std::fs::remove_file(&go);
    if let Some(v) = victim {
        v.finish(T);
    }
    normalise(&out, vpid, side_uid(side))
}

fn prerequisites() -> Option<Victims> {
    if Command::new("bpftrace").arg("--version").output().is_err() {
        skip("bpftrace is not installed (scripts/deps installs it)");
        return None;
    }
    let counter = build_example("uprobe-counter")?.join("victim");
    let ret = build_example("uretprobe-counter")?.join("retvictim");
    let sys = build_example("syscall-trace")?.join("syscall-victim");
    let bt = build_bt_victim();
    Some(Victims {
        counter,
        ret,
        sys,
        bt,
    })
}

#[test]
fn bpftrace_one_liners_match_the_kernel_as_unprivileged_user() {
    let Some(victims) = prerequisites() else {
        return;
    };
    let off = symbol_address(&victims.counter, "target_function");
    let only = std::env::var("BPFTRACE_CASE").ok();
    let kernel = is_root() || !skip("the kernel side of the bpftrace matrix needs root");
    let mut failures = Vec::new();
    let mut ran = 0;
    for (i, case) in CASES.iter().enumerate() {
        if only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        ran += 1;
        eprintln!("RUN {}", case.name);
        let attempt = |side, tag: String| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(case, side, &victims, &off, &tag)
            }))
            .map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            })
        };
        let ours = match attempt(Side::Bpftime, format!("bt{i}")) {
            Ok(o) => o,
            Err(msg) => {
                failures.push(format!("{} (bpftime): {msg}", case.name));
                continue;
            }
        };
        let vpath = victims.path(case.victim);
        let missing: Vec<String> = case
            .must
            .iter()
            .map(|m| subst(m, vpath, None, &off))
            .filter(|m| !ours.iter().any(|l| l == m))
            .collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{}: bpftime output lacks {missing:?}:\n{}",
                case.name,
                ours.join("\n")
            ));
            continue;
        }
        if kernel {
            let theirs = match attempt(Side::Kernel, format!("bk{i}")) {
                Ok(o) => o,
                Err(msg) => {
                    failures.push(format!("{} (kernel): {msg}", case.name));
                    continue;
                }
            };
            // Map entries with equal values print in hash order, which differs between the
            // kernel's maps and ours: compare the lines as multisets.
            let (mut theirs, mut ours) = (theirs, ours);
            theirs.sort();
            ours.sort();
            if theirs != ours {
                failures.push(format!(
                    "{}: differs from the kernel\n--- kernel\n{}\n--- bpftime\n{}",
                    case.name,
                    theirs.join("\n"),
                    ours.join("\n")
                ));
                continue;
            }
        }
        eprintln!("PASS {}", case.name);
    }
    assert!(ran > 0, "BPFTRACE_CASE matched no case");
    assert!(
        failures.is_empty(),
        "{} of {ran} one-liners failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// What cannot work in userspace fails with a clear message under `bpftime load` (and never
/// hangs): (probe, text bpftrace prints on stderr).
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "kprobe:do_nanosleep { @ = count(); }",
        "ERROR: Error attaching probe: 'kprobe:do_nanosleep'",
    ),
    (
        "software:page-faults:100 { @ = count(); }",
        "ERROR: Error attaching probe: software:page-faults:100",
    ),
    (
        "hardware:cycles:1000000 { @ = count(); }",
        "ERROR: Error attaching probe: hardware:cycles:1000000",
    ),
    (
        "tracepoint:sched:sched_switch { @ = count(); }",
        "ERROR: tracepoint not found: sched:sched_switch",
    ),
    (
        // Kernel structs: curtask is bpf_get_current_task (helper 35), which userspace has
        // not (`bpftrace -v` shows the verifier log "invalid func unknown#35").
        "uprobe:/usr/bin/bpftrace:BEGIN_trigger { @pid = curtask->pid; }",
        "ERROR: Error loading program: uprobe:/usr/bin/bpftrace:BEGIN_trigger",
    ),
    (
        "kfunc:vfs_read { @ = count(); }",
        "ERROR: kfunc/kretfunc not available for your kernel version.",
    ),
];

#[test]
fn kernel_only_probes_fail_with_a_clear_error_as_unprivileged_user() {
    if Command::new("bpftrace").arg("--version").output().is_err() {
        skip("bpftrace is not installed (scripts/deps installs it)");
        return;
    }
    let a = artifacts();
    for (i, (prog, want)) in UNSUPPORTED.iter().enumerate() {
        let store = TestStore::new(&format!("btx{i}"));
        let out = unprivileged("timeout")
            .args(["-s", "KILL", "60"])
            .arg(&a.bpftime)
            .args(["load", "--store", &store.name, "--", "bpftrace", "-e", prog])
            .output()
            .expect("run bpftrace");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.lines().any(|l| l.contains(want)),
            "{prog}: expected {want:?} on stderr, got status {} and:\n{err}",
            out.status
        );
        // 137: killed by the timeout, i.e. it hung instead of failing.
        assert_ne!(out.status.code(), Some(137), "{prog} hung");
    }
}
