//! End to end: syscall tracepoints. The example libbpf tool (`examples/syscall-trace`) under
//! `bpftime load`, tracing a victim under `bpftime start`, both as an unprivileged user —
//! `syscalls:sys_{enter,exit}_openat` with path reads and results, `raw_syscalls:sys_enter`
//! and the raw tracepoint `sys_enter` counted per number, error injection — and the same tool
//! on the kernel (root) for the same counts; system calls made by `syscall` instructions
//! outside libc (`syscall-raw-victim`: the executable's own, a library's, loaded before or
//! after the tracepoints attach) counted with the same arguments and results as the kernel;
//! and the generated tracepoint table against the live tracefs.

use bpftime_attach::syscall::Tracepoint;
use bpftime_attach::syscall::table::events;
use bpftime_suite::{
    AgentLog, Proc, TestStore, artifacts, build_example, is_root, poll, skip, unprivileged,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
/// Iterations of the victim's loop.
const N: u64 = 200;

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

/// The report lines a comparison looks at: openat counts, per-path lines of the victim's
/// paths, and the numbers the victim calls in its loop (openat 257, getppid 110, umask 95).
fn results(lines: &[String], inject: Option<&str>) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            l.starts_with("openat_")
                || l.starts_with("path /etc/hostname ")
                || l.starts_with("path /nonexistent/bpftime-victim ")
                || inject.is_some_and(|p| l.starts_with(&format!("path {p} ")))
                || ["nr 257 ", "nr 110 ", "nr 95 "]
                    .iter()
                    .any(|p| l.starts_with(p))
        })
        .cloned()
        .collect()
}

fn expected(inject: Option<&str>) -> Vec<String> {
    let opens = if inject.is_some() { 3 * N } else { 2 * N };
    let mut v = vec![
        format!("openat_enter {opens}"),
        format!("openat_exit {opens}"),
        format!("path /etc/hostname opens {N} ok {N} errs 0 errno_sum 0"),
        format!(
            "path /nonexistent/bpftime-victim opens {N} ok 0 errs {N} errno_sum {}",
            2 * N
        ),
    ];
    if let Some(p) = inject {
        v.push(format!(
            "path {p} opens {N} ok 0 errs {N} errno_sum {}",
            2 * N
        ));
    }
    v.extend([
        format!("nr 95 calls {N}"),
        format!("nr 110 calls {}", 2 * N),
        format!("nr 257 calls {opens}"),
    ]);
    v.sort();
    v
}

/// Runs victim and tool under bpftime as the unprivileged user; returns (tool report,
/// victim output).
fn under_bpftime(
    build: &Path,
    tag: &str,
    tool_args: &[&str],
    inject: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let a = artifacts();
    let store = TestStore::new(tag);
    let mut c = unprivileged(&a.bpftime);
    c.args(["start", "--store", &store.name, "--"])
        .arg(build.join("syscall-victim"))
        .arg(N.to_string());
    if let Some(p) = inject {
        c.arg(p);
    }
    let mut v = Proc::spawn(c, "bpftime start syscall-victim");
    let ready = v.wait_line(T, |l| l.starts_with("ready "));
    let vpid: u32 = ready[6..].parse().expect("victim pid");
    let mut c = unprivileged(&a.bpftime);
    c.args(["load", "--store", &store.name, "--"])
        .arg(build.join("syscall-trace"))
        .args(["-p", &vpid.to_string()])
        .args(tool_args);
    let mut l = Proc::spawn(c, "bpftime load syscall-trace");
    l.wait_line(T, |x| x == "attached");
    let want = 3 + usize::from(inject.is_some());
    poll(T, "the agent to attach the tracepoints", || {
        attached_events(&store, vpid).filter(|&n| n >= want)
    });
    v.send_line("go");
    v.wait_line(T, |x| x == "done");
    let vout = v.finish(T);
    l.send_line("report");
    (l.finish(T), vout)
}

/// The same on the kernel (root): victim and tool run natively.
fn on_kernel(build: &Path, tool_args: &[&str]) -> Vec<String> {
    let mut v = Proc::spawn(
        {
            let mut c = Command::new(build.join("syscall-victim"));
            c.arg(N.to_string());
            c
        },
        "syscall-victim (kernel)",
    );
    let ready = v.wait_line(T, |l| l.starts_with("ready "));
    let vpid: u32 = ready[6..].parse().expect("victim pid");
    let mut c = Command::new(build.join("syscall-trace"));
    c.args(["-p", &vpid.to_string()]).args(tool_args);
    let mut l = Proc::spawn(c, "syscall-trace on the kernel");
    l.wait_line(T, |x| x == "attached");
    v.send_line("go");
    v.wait_line(T, |x| x == "done");
    v.finish(T);
    l.send_line("report");
    l.finish(T)
}

#[test]
fn a_counter_runs_natively_in_the_gate_and_counts_every_call() {
    // syscall-trace -g: an atomic .bss counter on sys_enter_getpid, no helper and no context
    // read, so the gate runs it itself (no handler, no vector registers saved). Every
    // getpid() of the victim counts once, with and without the native path and the
    // dispatch catch-all; the agent's own getpid() calls never (its threads are busy).
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let a = artifacts();
    const CALLS: u64 = 20_000;
    for (native, dispatch) in [("1", ""), ("1", "0"), ("1", "1"), ("0", "0")] {
        let store = TestStore::new("sysfast");
        let mut c = unprivileged(&a.bpftime);
        c.args(["load", "--store", &store.name, "--"])
            .arg(build.join("syscall-trace"))
            .arg("-g");
        let mut l = Proc::spawn(c, "bpftime load syscall-trace -g");
        l.wait_line(T, |x| x == "attached");
        let log = AgentLog::new("sysfast");
        let mut c = unprivileged(&a.bpftime);
        c.args(["start", "--store", &store.name, "--"])
            .arg(build.join("syscall-victim"))
            .args(["-b", &CALLS.to_string()])
            .env("BPFTIME_NATIVE", native)
            .envs(log.env());
        if dispatch.is_empty() {
            c.env_remove("BPFTIME_SYSCALL_DISPATCH");
        } else {
            c.env("BPFTIME_SYSCALL_DISPATCH", dispatch);
        }
        Proc::spawn(c, "bpftime start syscall-victim -b").finish(T);
        let text = log.text();
        // By default the catch-all stays off here: every getpid site is patched.
        assert_eq!(
            text.contains("syscall user dispatch: on"),
            dispatch == "1",
            "BPFTIME_SYSCALL_DISPATCH={dispatch:?}, agent log:\n{text}"
        );
        assert_eq!(
            text.contains("run natively in the gate"),
            native == "1",
            "BPFTIME_NATIVE={native}, agent log:\n{text}"
        );
        l.send_line("report");
        let out = l.finish(T);
        let calls = out
            .iter()
            .find_map(|x| x.strip_prefix("getpid_calls "))
            .and_then(|v| v.parse::<u64>().ok());
        assert_eq!(
            calls,
            Some(CALLS),
            "BPFTIME_NATIVE={native} BPFTIME_SYSCALL_DISPATCH={dispatch}: {out:?}"
        );
    }
}

#[test]
fn the_catch_all_is_on_only_when_a_wanted_call_can_escape_the_patches() {
    // getpid counted in the raw victim, which also runs code from an anonymous page: that
    // page is executable memory no patch covers, so the dispatch catch-all goes on by itself
    // (the plain victim of the test above needs none: every getpid site is patched).
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let log = AgentLog::new("autosud");
    let (out, vout) = raw_run_with(&build, "autosud", Dlopen::Early, false, &["-g"], &log.env());
    let text = log.text();
    assert!(text.contains("syscall user dispatch: on"), "{text}");
    assert!(vout.iter().any(|l| l == "app_sigsys 1"), "{vout:?}");
    // As the raw_syscalls count of number 39 (+ 1: raise(SIGSYS) calls getpid).
    let calls = out.iter().find_map(|x| x.strip_prefix("getpid_calls "));
    assert_eq!(calls, Some((2 * N + 1).to_string().as_str()), "{out:?}");
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn openat_and_raw_syscalls_counted_as_unprivileged_user_like_the_kernel() {
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let (out, _) = under_bpftime(&build, "sys-tp", &[], None);
    let ours = sorted(results(&out, None));
    assert_eq!(ours, expected(None), "{out:#?}");
    if !is_root() && skip("the kernel baseline needs root") {
        return;
    }
    mount_tracefs();
    let kernel = sorted(results(&on_kernel(&build, &[]), None));
    assert_eq!(kernel, expected(None));
    assert_eq!(ours, kernel);
}

#[test]
fn a_victim_started_after_raw_syscalls_attached_runs_and_is_counted() {
    // Every system call is traced from the agent's first moments: the first allocation of a
    // thread's run state (the agent's own thread: a new malloc arena, so an mmap) makes
    // traced system calls itself, which must be skipped, not recursed into.
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let a = artifacts();
    let store = TestStore::new("sys-first");
    let mut c = unprivileged(&a.bpftime);
    c.args(["load", "--store", &store.name, "--"])
        .arg(build.join("syscall-trace"));
    let mut l = Proc::spawn(c, "bpftime load syscall-trace");
    l.wait_line(T, |x| x == "attached");
    let mut c = unprivileged(&a.bpftime);
    c.args(["start", "--store", &store.name, "--"])
        .arg(build.join("syscall-victim"))
        .args(["-b", "20000"]);
    let out = Proc::spawn(c, "bpftime start syscall-victim -b").finish(T);
    assert!(out.iter().any(|x| x.starts_with("ns_per_call ")), "{out:?}");
    l.send_line("report");
    let report = l.finish(T);
    // getpid (39) at least 20,000 times.
    let getpid: u64 = report
        .iter()
        .find_map(|x| x.strip_prefix("nr 39 calls "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(getpid >= 20_000, "{report:?}");
}

#[test]
fn raw_tracepoint_sys_enter_counts_like_the_kernel() {
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let (out, _) = under_bpftime(&build, "sys-rawtp", &["-r"], None);
    let ours = sorted(results(&out, None));
    assert_eq!(ours, expected(None), "{out:#?}");
    if !is_root() && skip("the kernel baseline needs root") {
        return;
    }
    let kernel = sorted(results(&on_kernel(&build, &["-r"]), None));
    assert_eq!(ours, kernel);
}

#[test]
fn openat_error_injection_fails_the_chosen_path_with_enoent() {
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    // A file the unprivileged user can open: only the program makes the opens fail.
    let path = format!("/tmp/bpftime-inject-{}", std::process::id());
    std::fs::write(&path, "x").expect("create the file");
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&path, perms).unwrap();
    let (out, vout) = under_bpftime(&build, "sys-inject", &["-i", &path], Some(&path));
    let _ = std::fs::remove_file(&path);
    assert!(
        vout.contains(&format!("inject ok 0 err {N} errno_sum {}", 2 * N)),
        "{vout:?}"
    );
    assert_eq!(
        sorted(results(&out, Some(&path))),
        expected(Some(&path)),
        "{out:#?}"
    );
}

/// How `syscall-raw-victim` loads its library: before "ready", after "go" (then it waits
/// until bpftime patched it; the kernel run does not wait), or after "go", closed and loaded
/// again (waiting each time).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dlopen {
    Early,
    Late,
    Reload,
}

/// The raw victim's report lines: its numbers (getpid 39 from the executable's own
/// `syscall`, getuid 102 from the library's, getppid 110 from an anonymous page — only the
/// Syscall User Dispatch catch-all sees that one — by the main thread and by a second one,
/// each also called once through libc per iteration) and its writes (number in a register,
/// from the executable).
fn raw_results(lines: &[String]) -> Vec<String> {
    sorted(
        lines
            .iter()
            .filter(|l| {
                ["nr 39 ", "nr 102 ", "nr 110 ", "raw_write "]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .cloned()
            .collect(),
    )
}

fn raw_expected() -> Vec<String> {
    sorted(vec![
        // + 1: raise(SIGSYS) calls getpid.
        format!("nr 39 calls {}", 2 * N + 1),
        format!("nr 102 calls {}", 2 * N),
        format!("nr 110 calls {}", 4 * N),
        format!(
            "raw_write enter {N} bytes {} text {N} exit {N} ret_sum -{}",
            12 * N,
            9 * N
        ),
    ])
}

/// `syscall-raw-victim` and `syscall-trace -w`, under bpftime as the unprivileged user
/// (`kernel` false) or natively as root; returns (tool report, victim output).
fn raw_run(build: &Path, tag: &str, when: Dlopen, kernel: bool) -> (Vec<String>, Vec<String>) {
    raw_run_with(build, tag, when, kernel, &["-w"], &[])
}

/// [`raw_run`] with other tool arguments and extra environment for the victim.
fn raw_run_with(
    build: &Path,
    tag: &str,
    when: Dlopen,
    kernel: bool,
    tool_args: &[&str],
    env: &[(&str, &str)],
) -> (Vec<String>, Vec<String>) {
    let a = artifacts();
    let store = TestStore::new(tag);
    let when_arg = match (when, kernel) {
        (Dlopen::Early, _) => "early",
        (Dlopen::Late, false) => "late",
        (Dlopen::Late, true) => "late-nowait",
        (Dlopen::Reload, false) => "reload",
        (Dlopen::Reload, true) => "reload-nowait",
    };
    let mut c = if kernel {
        Command::new(build.join("syscall-raw-victim"))
    } else {
        let mut c = unprivileged(&a.bpftime);
        c.args(["start", "--store", &store.name, "--"])
            .arg(build.join("syscall-raw-victim"));
        c
    };
    c.arg(N.to_string())
        .arg(build.join("librawsys.so"))
        .arg(when_arg)
        .envs(env.iter().copied());
    let mut v = Proc::spawn(c, "syscall-raw-victim");
    let ready = v.wait_line(T, |l| l.starts_with("ready "));
    let vpid: u32 = ready[6..].parse().expect("victim pid");
    let mut c = if kernel {
        Command::new(build.join("syscall-trace"))
    } else {
        let mut c = unprivileged(&a.bpftime);
        c.args(["load", "--store", &store.name, "--"])
            .arg(build.join("syscall-trace"));
        c
    };
    c.args(["-p", &vpid.to_string()]).args(tool_args);
    let mut l = Proc::spawn(c, "syscall-trace");
    l.wait_line(T, |x| x == "attached");
    if !kernel {
        let want = if tool_args == ["-w"] { 3 } else { 1 };
        poll(T, "the agent to attach the tracepoints", || {
            attached_events(&store, vpid).filter(|&n| n >= want)
        });
    }
    v.send_line("go");
    v.wait_line(T, |x| x == "done");
    let vout = v.finish(T);
    l.send_line("report");
    (l.finish(T), vout)
}

fn raw_case(tag: &str, when: Dlopen) {
    let Some(build) = build_example("syscall-trace") else {
        return;
    };
    let (out, vout) = raw_run(&build, tag, when, false);
    assert!(vout.contains(&format!("write_errs {N}")), "{vout:?}");
    // Its own SIGSYS handler still gets the SIGSYS that is not a dispatch trap.
    assert!(vout.iter().any(|l| l == "app_sigsys 1"), "{vout:?}");
    // A vfork from the executable's own (never patched) site ran natively.
    assert!(vout.iter().any(|l| l == "vfork_status 3"), "{vout:?}");
    let patched = vout.iter().filter(|l| *l == "patched").count();
    match when {
        Dlopen::Early => {}
        Dlopen::Late => assert_eq!(patched, 1, "{vout:?}"),
        Dlopen::Reload => assert_eq!(patched, 2, "{vout:?}"),
    }
    let ours = raw_results(&out);
    assert_eq!(ours, raw_expected(), "{out:#?}");
    if !is_root() && skip("the kernel baseline needs root") {
        return;
    }
    mount_tracefs();
    let (kout, kvout) = raw_run(&build, tag, when, true);
    assert!(kvout.contains(&format!("write_errs {N}")), "{kvout:?}");
    assert_eq!(raw_results(&kout), ours, "{kout:#?}");
}

#[test]
fn raw_syscall_instructions_in_the_executable_and_a_library_counted_like_the_kernel() {
    raw_case("sys-raw", Dlopen::Early);
}

#[test]
fn a_library_dlopened_after_attach_is_patched_and_traced_like_the_kernel() {
    raw_case("sys-raw-late", Dlopen::Late);
}

#[test]
fn a_library_closed_and_opened_again_is_patched_again_and_traced_like_the_kernel() {
    raw_case("sys-raw-reload", Dlopen::Reload);
}

/// Mounts tracefs at /sys/kernel/tracing if it is not (root only; the kernel baseline and
/// the table comparison read it).
fn mount_tracefs() -> bool {
    let probe = Path::new("/sys/kernel/tracing/events/raw_syscalls/sys_enter/id");
    if !probe.exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    probe.exists()
}

#[test]
fn generated_table_matches_the_live_tracefs() {
    if !is_root() && skip("reading tracefs needs root") {
        return;
    }
    if !mount_tracefs() && skip("tracefs cannot be mounted") {
        return;
    }
    let base = Path::new("/sys/kernel/tracing/events");
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let mut checked = 0;
    let mut tps: Vec<(String, Tracepoint)> = vec![
        ("raw_syscalls/sys_enter".into(), Tracepoint::RawEnter),
        ("raw_syscalls/sys_exit".into(), Tracepoint::RawExit),
    ];
    for e in events() {
        tps.push((
            format!("syscalls/sys_enter_{}", e.name),
            Tracepoint::Enter(e),
        ));
        tps.push((format!("syscalls/sys_exit_{}", e.name), Tracepoint::Exit(e)));
    }
    for (dir, tp) in &tps {
        assert_eq!(
            read(base.join(dir).join("id")),
            format!("{}\n", tp.id()),
            "{dir}/id"
        );
        assert_eq!(
            read(base.join(dir).join("format")),
            tp.format(),
            "{dir}/format"
        );
        checked += 1;
    }
    // And nothing the kernel has is missing from the table.
    let live = std::fs::read_dir(base.join("syscalls"))
        .expect("tracefs syscalls directory")
        .filter_map(|d| d.ok())
        .filter(|d| d.path().is_dir())
        .count();
    assert_eq!(live + 2, checked);
    assert!(checked > 700);
}
