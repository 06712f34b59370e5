//! uretprobes end to end: the libbpf tool `examples/uretprobe-counter` (an unmodified bpftool
//! skeleton loader with `SEC("uprobe")` + `SEC("uretprobe")` programs reading `PT_REGS_RC`)
//! under `bpftime load`, the victim under `bpftime start`, as an unprivileged user — next to
//! the same tool on the kernel, for identical entry and return counts and return-value sums.
//! Victim modes: plain calls on three kinds of function entries, a function too short for a
//! jump (trap-based), recursion, 8 threads, `longjmp` out of probed frames, C++ exceptions.

mod probe_support;

use bpftime_suite::AgentLog;
use probe_support::{Runtime, example, kernel_available, run, run_status, run_status_env};
use std::os::unix::process::ExitStatusExt;

/// Runs `mode` of `retvictim` with both probes on `func` on bpftime and the kernel; both must
/// count what the victim expects.
fn same_as_kernel(mode: &str, func: &str, n: &str, tool_args: &[&str]) {
    let Some(build) = example() else {
        return;
    };
    let victim_args = ["-m", mode, n];
    let ours = run(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        tool_args,
        "retvictim",
        &victim_args,
        func,
    );
    assert_eq!(
        ours.counts(),
        ours.expected(),
        "bpftime, mode {mode}: {ours:?}"
    );
    if !kernel_available() {
        return;
    }
    let kernel = run(
        Runtime::Kernel,
        &build,
        "uretprobe-counter",
        tool_args,
        "retvictim",
        &victim_args,
        func,
    );
    assert_eq!(
        kernel.counts(),
        kernel.expected(),
        "kernel, mode {mode}: {kernel:?}"
    );
    assert_eq!(ours.counts(), kernel.counts());
}

#[test]
fn push_rbp_entry_counts_and_return_values_match_the_kernel() {
    same_as_kernel("target", "target_function", "2000", &[]);
}

#[test]
fn nop5_and_lea_entries_match_the_kernel() {
    same_as_kernel("nop5", "nop5_entry", "2000", &[]);
    same_as_kernel("lea", "lea_entry", "500", &[]);
}

#[test]
fn an_entry_only_count_runs_in_the_hook_stub_and_matches_the_kernel() {
    // count_entry alone: a per-CPU array lookup and update, both inlined by the JIT, so the
    // hook's stub runs the program itself (its native entry; no agent code per hit). With
    // BPFTIME_NATIVE=0 every hit goes through the agent's handler: the same counts.
    let Some(build) = example() else {
        return;
    };
    let args = ["-m", "nop5", "3000"];
    let mut counts = Vec::new();
    for native in ["1", "0"] {
        let log = AgentLog::new("native");
        let [a, b] = log.env();
        let env = [("BPFTIME_NATIVE", native), a, b];
        let (st, ours) = run_status_env(
            Runtime::Bpftime,
            &build,
            "uretprobe-counter",
            &["-e"],
            "retvictim",
            &args,
            "nop5_entry",
            &env,
        );
        assert!(st.success(), "{st}: {ours:?}");
        let text = log.text();
        assert_eq!(
            text.contains("runs natively"),
            native == "1",
            "BPFTIME_NATIVE={native}, agent log:\n{text}"
        );
        let c = ours.counts();
        assert_eq!([c[0], c[1]], [ours.expected()[0], 0], "{ours:?}");
        counts.push(c);
    }
    assert_eq!(counts[0], counts[1]);
    if !kernel_available() {
        return;
    }
    let kernel = run(
        Runtime::Kernel,
        &build,
        "uretprobe-counter",
        &["-e"],
        "retvictim",
        &args,
        "nop5_entry",
    );
    assert_eq!(kernel.counts(), counts[0], "{kernel:?}");
}

#[test]
fn return_only_counts_run_natively_through_recursion_and_longjmp_like_the_kernel() {
    // count_return alone: the entry stub arms the return itself (no handler) and the return
    // stub runs the program's native entry; recursion nests 21 pending returns per thread,
    // longjmp abandons some (their slots are reclaimed later, by the handler path).
    let Some(build) = example() else {
        return;
    };
    for (mode, func, n) in [
        ("nop5", "nop5_entry", "3000"),
        ("rec", "rec_fn", "500"),
        ("longjmp", "jmp_fn", "2000"),
    ] {
        let log = AgentLog::new("native-ret");
        let env = log.env();
        let args = ["-m", mode, n];
        let (st, ours) = run_status_env(
            Runtime::Bpftime,
            &build,
            "uretprobe-counter",
            &["-r"],
            "retvictim",
            &args,
            func,
            &env,
        );
        assert!(st.success(), "{mode}: {st}: {ours:?}");
        let text = log.text();
        assert!(
            text.contains("runs natively in the return stub"),
            "{mode}: agent log:\n{text}"
        );
        let (c, want) = (ours.counts(), ours.expected());
        assert_eq!(
            [c[0], c[1], c[2]],
            [0, want[1], want[2]],
            "{mode}: {ours:?}"
        );
        if !kernel_available() {
            continue;
        }
        let kernel = run(
            Runtime::Kernel,
            &build,
            "uretprobe-counter",
            &["-r"],
            "retvictim",
            &args,
            func,
        );
        assert_eq!(kernel.counts(), c, "{mode}: {kernel:?}");
    }
}

#[test]
fn native_programs_come_and_go_while_8_threads_call() {
    // Loaders attach entry-only, return-only and both count() programs in turn and exit while
    // 8 threads call the probed function non-stop: the hook stubs and return stubs switch
    // between native entries and the handlers, hooks are removed with threads inside them,
    // and the JIT code of a detached program must outlive every stub still calling it.
    let Some(build) = example() else {
        return;
    };
    let a = bpftime_suite::artifacts();
    let store = bpftime_suite::TestStore::new("native-churn");
    let mut vc = bpftime_suite::unprivileged(&a.bpftime);
    vc.args(["start", "--store", &store.name, "--"])
        .arg(build.join("retvictim"))
        // (Far more calls than the rounds take: the victim is stopped at the end.)
        .args(["-w", "-m", "threads", "4000000000000"]);
    let mut v = bpftime_suite::Proc::spawn(vc, "retvictim -m threads");
    let vpid = v.wait_line(probe_support::T, |l| l.starts_with("pid "))[4..]
        .parse::<u32>()
        .expect("victim pid");
    v.send_line("go");
    for round in 0..12 {
        let mode: &[&str] = match round % 3 {
            0 => &["-e"],
            1 => &["-r"],
            _ => &[],
        };
        let mut lc = bpftime_suite::unprivileged(&a.bpftime);
        lc.args(["load", "--store", &store.name, "--"])
            .arg(build.join("uretprobe-counter"))
            .args(mode)
            .args(["-p", &vpid.to_string()])
            .arg(build.join("retvictim"))
            .arg("target_function");
        let mut l = bpftime_suite::Proc::spawn(lc, "uretprobe-counter");
        l.wait_line(probe_support::T, |s| s == "attached");
        bpftime_suite::poll(probe_support::T, "the agent to attach", || {
            probe_support::attached_events(&store, vpid).filter(|e| !e.is_empty())
        });
        std::thread::sleep(std::time::Duration::from_millis(150));
        probe_support::interrupt(l.pid());
        let out = l.finish(probe_support::T);
        assert!(out.iter().any(|x| x.starts_with("entries ")), "{out:?}");
    }
    // Still running (not killed by a fault in a stub, a return trampoline or JIT code).
    let state = std::fs::read_to_string(format!("/proc/{vpid}/stat")).unwrap_or_default();
    let state = state
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    assert!(
        matches!(state, Some("R" | "S")),
        "victim state {state:?} after the rounds"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vpid as i32, libc::SIGKILL) };
    let (st, _) = v.finish_status(probe_support::T);
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
}

#[test]
fn a_function_shorter_than_the_jump_is_traced_through_a_trap() {
    same_as_kernel("short", "short_fn", "1000", &[]);
}

#[test]
fn a_trap_probe_works_in_a_thread_that_blocks_every_signal() {
    // A blocked SIGTRAP at an int3 kills the process; the agent keeps it unblocked.
    let Some(build) = example() else {
        return;
    };
    let r = run(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        &[],
        "retvictim",
        &["-b", "-m", "short", "300"],
        "short_fn",
    );
    assert_eq!(r.counts(), r.expected(), "{r:?}");
}

#[test]
fn an_int3_of_the_application_still_kills_it_with_sigtrap() {
    // The trap probe on short_fn installs our SIGTRAP handler; an int3 that is not a probe,
    // with no handler of the application, must end the process by SIGTRAP as without us
    // (the handler restores the default action with a raw rt_sigaction: the agent's
    // `sigaction` interposer would keep our handler and the trap would come back for ever).
    let Some(build) = example() else {
        return;
    };
    let (st, r) = run_status(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        &[],
        "retvictim",
        &["-T", "-m", "short", "300"],
        "short_fn",
    );
    assert_eq!(st.signal(), Some(libc::SIGTRAP), "{st}: {r:?}");
    assert_eq!(r.counts(), r.expected(), "{r:?}");
    assert!(!r.victim.iter().any(|l| l == "survived int3"), "{r:?}");
}

#[test]
fn recursion_21_frames_deep_returns_each_frame() {
    same_as_kernel("rec", "rec_fn", "1000", &[]);
}

#[test]
fn longjmp_out_of_probed_frames_loses_only_their_returns() {
    same_as_kernel("longjmp", "jmp_fn", "3000", &[]);
}

#[test]
fn eight_threads_count_exactly() {
    // The info programs count with atomic adds: exact even when threads share a CPU slot.
    same_as_kernel("threads", "target_function", "5000", &["-i"]);
}

#[test]
fn attach_cookie_and_func_ip_at_entry_and_return_match_the_kernel() {
    let Some(build) = example() else {
        return;
    };
    let args = ["-i", "-c", "4242"];
    let victim_args = ["-a", "-m", "target", "300"];
    let ours = run(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        &args,
        "retvictim",
        &victim_args,
        "target_function",
    );
    let addr = ours
        .victim
        .iter()
        .find_map(|l| l.strip_prefix("addr target_function "))
        .expect("victim prints its function's address")
        .to_string();
    let info = |r: &probe_support::Run| {
        ["entry_cookie", "entry_ip", "return_cookie", "return_ip"].map(|k| r.tool_value(k))
    };
    let want = [
        Some("4242".to_string()),
        Some(addr.clone()),
        Some("4242".to_string()),
        Some(addr),
    ];
    assert_eq!(info(&ours), want, "{ours:?}");
    assert_eq!(ours.counts(), ours.expected());
    if !kernel_available() {
        return;
    }
    let kernel = run(
        Runtime::Kernel,
        &build,
        "uretprobe-counter",
        &args,
        "retvictim",
        &victim_args,
        "target_function",
    );
    let kaddr = kernel
        .victim
        .iter()
        .find_map(|l| l.strip_prefix("addr target_function "))
        .expect("victim prints its function's address")
        .to_string();
    assert_eq!(
        info(&kernel),
        [
            Some("4242".to_string()),
            Some(kaddr.clone()),
            Some("4242".to_string()),
            Some(kaddr)
        ]
    );
}

#[test]
fn cxx_exceptions_unwind_through_a_probed_frame() {
    // The unwinder meets the return trampoline as the probed frame's return address; its
    // registered frame description leads to the real caller, whose catch runs. (The kernel's
    // uretprobes break this: its trampoline has no unwind information, so std::terminate
    // aborts the victim — see README, "uretprobes".)
    let Some(build) = example() else {
        return;
    };
    let ours = run(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        &[],
        "exvictim",
        &["1000"],
        "thrower",
    );
    assert_eq!(ours.victim_value("caught").as_deref(), Some("500"));
    assert_eq!(ours.counts(), ours.expected(), "{ours:?}");
    // Return-only: the stub arms each return itself and the return stub runs the program
    // natively; the 500 frames thrown through leave slots the handler path reclaims later.
    let ours = run(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        &["-r"],
        "exvictim",
        &["1000"],
        "thrower",
    );
    assert_eq!(ours.victim_value("caught").as_deref(), Some("500"));
    let (c, want) = (ours.counts(), ours.expected());
    assert_eq!([c[0], c[1], c[2]], [0, want[1], want[2]], "{ours:?}");
}

/// The trapped runs the agent's log reports ("N program run(s) at 0x… trapped").
fn trapped_runs(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            let (before, _) = l.split_once(" program run(s) at ")?;
            before.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn runs_that_trap_are_stopped_counted_and_logged_natively_and_on_the_handlers() {
    // trap_entry and trap_return count, then read memory at an integer (the argument, the
    // return value) without bpf_probe_read_user. The kernel's verifier refuses them at load;
    // bpftime stops each run at the read, the victim goes on unharmed, and the agent's log
    // reports every trapped run, from the hook and return stubs (native entries) as from
    // the handlers.
    use bpftime_suite::{Proc, TestStore, artifacts, poll, unprivileged};
    let Some(build) = example() else {
        return;
    };
    for native in ["1", "0"] {
        let store = TestStore::new("trap");
        let log = AgentLog::new("trap");
        let [a, b] = log.env();
        let mut vc = unprivileged(&artifacts().bpftime);
        vc.args(["start", "--store", &store.name, "--"])
            .arg(build.join("retvictim"))
            .args(["-w", "-z", "-m", "nop5", "1000"])
            .envs([("BPFTIME_NATIVE", native), a, b]);
        let mut v = Proc::spawn(vc, "retvictim");
        v.wait_line(probe_support::T, |l| l.starts_with("pid "));
        let vpid = v.pid();
        let mut lc = unprivileged(&artifacts().bpftime);
        lc.args(["load", "--store", &store.name, "--"])
            .arg(build.join("uretprobe-counter"))
            .args(["-t", "-p", &vpid.to_string()])
            .arg(build.join("retvictim"))
            .arg("nop5_entry");
        let mut l = Proc::spawn(lc, "uretprobe-counter -t");
        l.wait_line(probe_support::T, |s| s == "attached");
        poll(probe_support::T, "the agent to attach both", || {
            probe_support::attached_events(&store, vpid).filter(|e| e.len() == 2)
        });
        v.send_line("go");
        v.wait_line(probe_support::T, |s| s.starts_with("calls "));
        // Reported at the agent's next sync (200 ms).
        let n = poll(probe_support::T, "2,000 trapped runs in the log", || {
            let n = trapped_runs(&log.text());
            (n >= 2000).then_some(n)
        });
        let text = log.text();
        assert_eq!(n, 2000, "BPFTIME_NATIVE={native}, agent log:\n{text}");
        assert_eq!(
            text.contains("runs natively in the hook") && text.contains("in the return stub"),
            native == "1",
            "BPFTIME_NATIVE={native}, agent log:\n{text}"
        );
        v.send_line("exit");
        let (st, _) = v.finish_status(probe_support::T);
        assert!(st.success(), "the victim survives its probes' traps: {st}");
        probe_support::interrupt(l.pid());
        let out = l.finish(probe_support::T);
        // Each run counted before its read and stopped there (nothing added to ret_sum).
        for want in ["entries 1000", "returns 1000", "ret_sum 0"] {
            assert!(out.iter().any(|s| s == want), "{want}: {out:?}");
        }
    }
    if !kernel_available() {
        return;
    }
    let out = std::process::Command::new(build.join("uretprobe-counter"))
        .args(["-t", "-d", "0"])
        .arg(build.join("retvictim"))
        .arg("nop5_entry")
        .output()
        .expect("run the loader on the kernel");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("failed to load the BPF object"),
        "the kernel's verifier refuses the trap programs: {}\n{err}",
        out.status
    );
}
