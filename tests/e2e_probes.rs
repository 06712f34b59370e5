//! Any probe point, end to end: uprobes in the middle of functions (jump or trap), USDT probes
//! with semaphores (libbpf's `SEC("usdt")`), `BPF_TRACE_UPROBE_MULTI` links made with a raw
//! `bpf()` call, `bpf_override_return` — each next to the kernel doing the same where the
//! kernel can — and the attach engine's stress test: 8 threads calling a probed function
//! non-stop through 1,000 attach/detach cycles.

mod probe_support;

use bpftime_suite::{Proc, TestStore, artifacts, poll, unprivileged};
use probe_support::{Run, Runtime, T, attached_events, example, kernel_available, run};
use std::process::Command;

fn offset_of(build: &std::path::Path, bin: &str, sym: &str) -> u64 {
    bpftime_attach::symbol_file_offset(build.join(bin), sym).expect("symbol in the victim")
}

fn counts_on(rt: Runtime, func: &str, n: &str) -> Option<[u64; 3]> {
    let build = example()?;
    let r = run(
        rt,
        &build,
        "uretprobe-counter",
        &["-e"],
        "retvictim",
        &["-m", "mid", n],
        func,
    );
    Some(r.counts())
}

#[test]
fn mid_function_probes_count_like_the_kernel() {
    let Some(build) = example() else {
        return;
    };
    let start = offset_of(&build, "retvictim", "mid_fn");
    // +8: the 5 bytes after it hold no branch target (a jump); +13: a loop branches 3 bytes
    // after it (a trap).
    for label in ["mid_fn_a", "mid_fn_b"] {
        let func = format!("mid_fn+{}", offset_of(&build, "retvictim", label) - start);
        let ours = counts_on(Runtime::Bpftime, &func, "1000").unwrap();
        assert_eq!(ours, [1000, 0, 0], "{func}");
        if kernel_available() {
            assert_eq!(
                counts_on(Runtime::Kernel, &func, "1000"),
                Some(ours),
                "{func}"
            );
        }
    }
}

#[test]
fn override_return_skips_the_function_and_the_return_probe_sees_the_value() {
    let Some(build) = example() else {
        return;
    };
    // check_fn returns 0; the uprobe program returns 7 from it instead (the kernel allows
    // bpf_override_return only on error-injectable kernel functions, so there is no baseline).
    let r = run(
        Runtime::Bpftime,
        &build,
        "uretprobe-counter",
        &["-o", "7"],
        "retvictim",
        &["-m", "override", "500"],
        "check_fn",
    );
    assert_eq!(
        r.victim_value("overridden").as_deref(),
        Some("500"),
        "{r:?}"
    );
    assert_eq!(r.counts(), [500, 500, 7 * 500]);
}

/// The USDT victim under bpftime or the kernel with usdt-counter attached: its output (with
/// the semaphore after the tool left) and the tool's.
fn usdt(rt: Runtime, build: &std::path::Path) -> Run {
    let store = TestStore::new("usdt");
    let a = artifacts();
    let mut vc = match rt {
        Runtime::Bpftime => {
            let mut c = unprivileged(&a.bpftime);
            c.args(["start", "--store", &store.name, "--"]);
            c.arg(build.join("usdtvictim"));
            c
        }
        Runtime::Kernel => Command::new(build.join("usdtvictim")),
    };
    vc.args(["-w", "2000"]);
    let mut v = Proc::spawn(vc, "usdtvictim");
    v.wait_line(T, |l| l.starts_with("pid "));
    let vpid = v.pid();
    let mut lc = match rt {
        Runtime::Bpftime => {
            let mut c = unprivileged(&a.bpftime);
            c.args(["load", "--store", &store.name, "--"]);
            c.arg(build.join("usdt-counter"));
            c
        }
        Runtime::Kernel => Command::new(build.join("usdt-counter")),
    };
    lc.args(["-p", &vpid.to_string()])
        .arg(build.join("usdtvictim"))
        .args(["bpftime_test", "tick"]);
    let mut l = Proc::spawn(lc, "usdt-counter");
    l.wait_line(T, |s| s == "attached");
    if rt == Runtime::Bpftime {
        poll(T, "the agent to attach", || {
            attached_events(&store, vpid).filter(|e| !e.is_empty())
        });
    }
    v.send_line("go");
    v.wait_line(T, |s| s.starts_with("expect "));
    let _ = Command::new("kill")
        .args(["-INT", &l.pid().to_string()])
        .status();
    let tool = l.finish(T);
    if rt == Runtime::Bpftime {
        poll(T, "the probe to leave", || {
            attached_events(&store, vpid).filter(|e| e.is_empty())
        });
    }
    v.send_line("again");
    Run {
        victim: v.finish(T),
        tool,
        victim_pid: vpid,
    }
}

#[test]
fn usdt_probe_with_semaphore_counts_like_the_kernel() {
    let Some(build) = example() else {
        return;
    };
    let check = |r: &Run| {
        let sem: Vec<&str> = r
            .victim
            .iter()
            .filter_map(|l| l.strip_prefix("semaphore "))
            .collect();
        // Raised while attached, back to 0 once the tool left.
        assert_eq!(sem, ["1", "0"], "{r:?}");
        assert_eq!(r.victim_value("enabled").as_deref(), Some("2000"));
        assert_eq!(r.tool_value("hits").as_deref(), Some("2000"));
        // arg_sum = sum of i + 2i
        assert_eq!(
            r.tool_value("arg_sum"),
            Some((3 * 1999 * 2000 / 2).to_string())
        );
    };
    let ours = usdt(Runtime::Bpftime, &build);
    check(&ours);
    if kernel_available() {
        let kernel = usdt(Runtime::Kernel, &build);
        check(&kernel);
        assert_eq!(ours.tool, kernel.tool);
    }
}

fn multi(rt: Runtime, ret: bool) -> Option<Vec<String>> {
    let build = example()?;
    let points: Vec<String> = [
        ("target_function", 1),
        ("nop5_entry", 10),
        ("short_fn", 100),
    ]
    .iter()
    .map(|(f, c)| format!("{:#x}:{c}", offset_of(&build, "retvictim", f)))
    .collect();
    let args: &[&str] = if ret { &["-r"] } else { &[] };
    let r = run(
        rt,
        &build,
        "uprobe-multi",
        args,
        "retvictim",
        &["-m", "mix", "1000"],
        &points.join(" "),
    );
    let [_, _, ret_sum] = r.expected();
    let mut out: Vec<String> = ["hits", "cookie_sum", "rc_sum"]
        .iter()
        .map(|k| format!("{k} {}", r.tool_value(k).unwrap_or_default()))
        .collect();
    out.push(format!("expected_ret_sum {ret_sum}"));
    Some(out)
}

#[test]
fn uprobe_multi_link_counts_each_point_with_its_cookie_like_the_kernel() {
    for ret in [false, true] {
        let Some(ours) = multi(Runtime::Bpftime, ret) else {
            return;
        };
        assert_eq!(&ours[..2], ["hits 3000", "cookie_sum 111000"], "ret={ret}");
        if ret {
            // At the returns rax is each function's return value.
            let want = ours[3].replace("expected_ret_sum", "rc_sum");
            assert_eq!(ours[2], want);
        }
        if kernel_available() {
            assert_eq!(multi(Runtime::Kernel, ret), Some(ours), "ret={ret}");
        }
    }
}

// ---- stress: the attach engine under fire -------------------------------------------------

mod stress {
    use bpftime_attach::{FuncBounds, PatchMode, Probe, PtRegs, install_probe};
    use core::ffi::c_void;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    core::arch::global_asm!(
        ".pushsection .text.bpftime_e2e_stress,\"ax\",@progbits",
        ".p2align 4",
        ".globl stress_nop5",
        ".type stress_nop5,@function",
        "stress_nop5:",
        ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
        "mov rax, rsi",
        "ret",
        ".size stress_nop5, .-stress_nop5",
        ".p2align 4",
        ".globl stress_short",
        ".type stress_short,@function",
        "stress_short:",
        "mov rax, rsi",
        "ret",
        ".size stress_short, .-stress_short",
        ".popsection",
    );

    unsafe extern "C" {
        safe fn stress_nop5(a: u64, b: u64) -> u64;
        safe fn stress_short(a: u64, b: u64) -> u64;
    }

    const ENTRY_MARK: u64 = 1 << 40;
    const RETURN_MARK: u64 = 1 << 41;

    #[derive(Default)]
    struct Counts {
        entries: AtomicU64,
        returns: AtomicU64,
    }

    extern "C" fn on_entry(regs: &mut PtRegs, user: *mut c_void) {
        // SAFETY: the test passes a `&Counts` that outlives every hook.
        unsafe { &*user.cast::<Counts>() }
            .entries
            .fetch_add(1, Ordering::Relaxed);
        regs.rsi |= ENTRY_MARK;
    }

    extern "C" fn on_return(regs: &mut PtRegs, user: *mut c_void) {
        // SAFETY: as above.
        unsafe { &*user.cast::<Counts>() }
            .returns
            .fetch_add(1, Ordering::Relaxed);
        regs.rax |= RETURN_MARK;
    }

    /// 8 threads call `f` non-stop, each counting its own calls and the marks the handlers left
    /// on them, while `cycles` install/remove cycles of a uprobe + uretprobe run. A call that
    /// starts and ends inside one attached window (the odd `window` values) must carry both
    /// marks; every handler run must be seen by exactly one call.
    fn hammer(f: extern "C" fn(u64, u64) -> u64, mode: PatchMode, cycles: u64) {
        let counts = Counts::default();
        let window = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let (calls, entry_marks, return_marks, missed) = std::thread::scope(|s| {
            let callers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let (mut calls, mut e, mut r, mut missed) = (0u64, 0u64, 0u64, 0u64);
                        while !stop.load(Ordering::Relaxed) {
                            let w1 = window.load(Ordering::SeqCst);
                            let v = f(calls, 7);
                            let w2 = window.load(Ordering::SeqCst);
                            assert_eq!(v & !(ENTRY_MARK | RETURN_MARK), 7, "wrong result");
                            e += u64::from(v & ENTRY_MARK != 0);
                            r += u64::from(v & RETURN_MARK != 0);
                            if w1 == w2
                                && w1 % 2 == 1
                                && v & (ENTRY_MARK | RETURN_MARK) != ENTRY_MARK | RETURN_MARK
                            {
                                missed += 1;
                            }
                            calls += 1;
                            if calls % 64 == 0 {
                                // Two cores, nine busy threads: let the patching thread run
                                // now and then, or each cycle waits for whole time slices.
                                std::thread::yield_now();
                            }
                        }
                        (calls, e, r, missed)
                    })
                })
                .collect();
            let probe = Probe {
                entry: Some(on_entry),
                ret: Some(on_return),
                user: &counts as *const Counts as *mut c_void,
                func: FuncBounds::Entry,
                mode,
            };
            for _ in 0..cycles {
                // SAFETY: `f` is a function entry of this binary; the handlers only touch
                // `counts`, which outlives the hook (removed below, in this scope).
                let hook =
                    unsafe { install_probe(f as *const () as usize, &probe) }.expect("install");
                window.fetch_add(1, Ordering::SeqCst);
                let before = counts.entries.load(Ordering::Relaxed);
                let start = Instant::now();
                while counts.entries.load(Ordering::Relaxed) < before + 16
                    && start.elapsed() < Duration::from_millis(5)
                {
                    std::hint::spin_loop();
                }
                window.fetch_add(1, Ordering::SeqCst);
                hook.remove().expect("remove");
            }
            stop.store(true, Ordering::Relaxed);
            callers
                .into_iter()
                .map(|t| t.join().expect("caller"))
                .fold((0, 0, 0, 0), |a, b| {
                    (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
                })
        });
        let (entries, returns) = (
            counts.entries.load(Ordering::Relaxed),
            counts.returns.load(Ordering::Relaxed),
        );
        eprintln!("{mode:?}: {cycles} cycles, {calls} calls, {entries} entries, {returns} returns");
        assert_eq!(
            missed, 0,
            "calls inside an attached window that a handler missed"
        );
        assert_eq!(entry_marks, entries, "every entry seen by exactly one call");
        assert_eq!(
            return_marks, returns,
            "every return seen by exactly one call"
        );
        assert!(
            entries > cycles,
            "the callers kept running through the cycles"
        );
    }

    #[test]
    fn eight_threads_through_1000_jump_attach_detach_cycles_count_exactly() {
        hammer(stress_nop5, PatchMode::Jump, 1000);
    }

    #[test]
    fn eight_threads_through_200_trap_attach_detach_cycles_count_exactly() {
        hammer(stress_short, PatchMode::Trap, 200);
    }
}
