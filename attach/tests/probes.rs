//! Return probes, trap-based probes and overrides through `install_probe`: recursion, threads,
//! unwinding (panics use the same unwinder as C++ exceptions), signals, fork, and the int3
//! fallback for functions too short for a jump. Each test hooks its own functions: tests run
//! in parallel threads of one process.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_attach::x86_64::{missed_returns, override_return, pending_returns};
use bpftime_attach::{FuncBounds, Hook, HookKind, PatchMode, Probe, PtRegs, install_probe};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_probes,\"ax\",@progbits",
    // nop5 entry: a + b
    ".p2align 4",
    ".globl p_nop5",
    ".type p_nop5,@function",
    "p_nop5:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size p_nop5, .-p_nop5",
    // two bytes: a jump cannot go here
    ".p2align 4",
    ".globl p_short",
    ".type p_short,@function",
    "p_short:",
    "mov rax, rdi",
    "ret",
    ".size p_short, .-p_short",
    // a loop back to +8: a + 3*b
    ".p2align 4",
    ".globl p_loop",
    ".type p_loop,@function",
    "p_loop:",
    "mov ecx, 3",
    "mov rax, rdi",
    "2:",
    "add rax, rsi",
    "dec ecx",
    "jnz 2b",
    "ret",
    ".size p_loop, .-p_loop",
    // call in the first five bytes' last instruction: returns f(a) = p_nop5(a, 1) + 100
    ".p2align 4",
    ".globl p_calls",
    ".type p_calls,@function",
    "p_calls:",
    "mov esi, 1",
    "call p_nop5",
    "add rax, 100",
    "ret",
    ".size p_calls, .-p_calls",
    // for override tests: a + b
    ".p2align 4",
    ".globl p_override",
    ".type p_override,@function",
    "p_override:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + rsi]",
    "pop rbp",
    "ret",
    ".size p_override, .-p_override",
    ".p2align 4",
    ".globl p_override_short",
    ".type p_override_short,@function",
    "p_override_short:",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size p_override_short, .-p_override_short",
    // the sum of eight doubles (xmm0-7)
    ".p2align 4",
    ".globl p_fsum8",
    ".type p_fsum8,@function",
    "p_fsum8:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "addsd xmm0, xmm1",
    "addsd xmm0, xmm2",
    "addsd xmm0, xmm3",
    "addsd xmm0, xmm4",
    "addsd xmm0, xmm5",
    "addsd xmm0, xmm6",
    "addsd xmm0, xmm7",
    "ret",
    ".size p_fsum8, .-p_fsum8",
    // 2x, touching nothing but rax
    ".p2align 4",
    ".globl p_ipa_leaf",
    ".type p_ipa_leaf,@function",
    "p_ipa_leaf:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rdi]",
    "ret",
    ".size p_ipa_leaf, .-p_ipa_leaf",
    // 3x + 3a, keeping x and a in caller-saved registers (r11, xmm2, xmm9, xmm15) across the
    // call, as GCC's -fipa-ra does around a local callee that does not use them
    ".p2align 4",
    ".globl p_ipa_caller",
    ".type p_ipa_caller,@function",
    "p_ipa_caller:",
    "sub rsp, 8",
    "movapd xmm2, xmm0",
    "movapd xmm9, xmm0",
    "movapd xmm15, xmm0",
    "mov r11, rdi",
    "call p_ipa_leaf",
    "add rax, r11",
    "cvtsi2sd xmm0, rax",
    "addsd xmm0, xmm2",
    "addsd xmm0, xmm9",
    "addsd xmm0, xmm15",
    "add rsp, 8",
    "ret",
    ".size p_ipa_caller, .-p_ipa_caller",
    // a tail call from one probed function into another: x + 1
    ".p2align 4",
    ".globl p_tail",
    ".type p_tail,@function",
    "p_tail:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "jmp p_tail_callee",
    ".size p_tail, .-p_tail",
    ".p2align 4",
    ".globl p_tail_callee",
    ".type p_tail_callee,@function",
    "p_tail_callee:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    ".size p_tail_callee, .-p_tail_callee",
    ".popsection",
);

unsafe extern "C" {
    safe fn p_nop5(a: u64, b: u64) -> u64;
    safe fn p_short(a: u64) -> u64;
    safe fn p_loop(a: u64, b: u64) -> u64;
    safe fn p_calls(a: u64) -> u64;
    safe fn p_override(a: u64, b: u64) -> u64;
    safe fn p_override_short(a: u64, b: u64) -> u64;
    safe fn p_fsum8(a: f64, b: f64, c: f64, d: f64, e: f64, f: f64, g: f64, h: f64) -> f64;
    safe fn p_ipa_leaf(x: u64) -> u64;
    safe fn p_ipa_caller(a: f64, x: u64) -> f64;
    safe fn p_tail(x: u64) -> u64;
    safe fn p_tail_callee(x: u64) -> u64;
}

/// What the handlers record.
#[derive(Default)]
struct Rec {
    entries: AtomicU64,
    returns: AtomicU64,
    ret_sum: AtomicU64,
    /// Last rip / rsp seen by the return handler.
    ret_rip: AtomicU64,
    ret_rsp: AtomicU64,
    entry_rsp: AtomicU64,
}

impl Rec {
    /// All counts zero (for statics).
    const fn zero() -> Rec {
        Rec {
            entries: AtomicU64::new(0),
            returns: AtomicU64::new(0),
            ret_sum: AtomicU64::new(0),
            ret_rip: AtomicU64::new(0),
            ret_rsp: AtomicU64::new(0),
            entry_rsp: AtomicU64::new(0),
        }
    }
}

/// Waits for the child a fork test recorded in `pid` and checks it exited with 0.
fn child_exited_ok(pid: &std::sync::atomic::AtomicI32) {
    let child = pid.load(Ordering::SeqCst);
    let mut status = 0;
    // SAFETY: waiting for our own child, with a valid status pointer.
    let got = unsafe { libc::waitpid(child, &mut status, 0) };
    assert_eq!(got, child);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
}

extern "C" fn on_entry(regs: &mut PtRegs, user: *mut c_void) {
    // SAFETY: every test passes a `&Rec` that outlives its hook.
    let r = unsafe { &*user.cast::<Rec>() };
    r.entries.fetch_add(1, Ordering::SeqCst);
    r.entry_rsp.store(regs.rsp, Ordering::SeqCst);
}

extern "C" fn on_return(regs: &mut PtRegs, user: *mut c_void) {
    // SAFETY: as above.
    let r = unsafe { &*user.cast::<Rec>() };
    r.returns.fetch_add(1, Ordering::SeqCst);
    r.ret_sum.fetch_add(regs.rax, Ordering::SeqCst);
    r.ret_rip.store(regs.rip, Ordering::SeqCst);
    r.ret_rsp.store(regs.rsp, Ordering::SeqCst);
}

fn addr(f: *const ()) -> usize {
    f as usize
}

fn probe(target: usize, rec: &Rec, entry: bool, ret: bool, mode: PatchMode) -> Hook {
    let p = Probe {
        entry: entry.then_some(on_entry as bpftime_attach::HookHandler),
        ret: ret.then_some(on_return as bpftime_attach::HookHandler),
        user: rec as *const Rec as *mut c_void,
        func: FuncBounds::Entry,
        mode,
    };
    // SAFETY: `target` is a function entry of this test binary; the handlers only touch the
    // `Rec`, which the tests keep alive until the hook is removed.
    unsafe { install_probe(target, &p) }.expect("install_probe")
}

#[test]
fn return_probe_sees_every_return_value_and_the_caller() {
    let rec = Rec::default();
    let h = probe(addr(p_nop5 as *const ()), &rec, true, true, PatchMode::Auto);
    assert_eq!(h.kind(), HookKind::Jump);
    let mut want = 0;
    for i in 0..1000u64 {
        assert_eq!(p_nop5(black_box(i), 7), i + 7);
        want += i + 7;
    }
    assert_eq!(rec.entries.load(Ordering::SeqCst), 1000);
    assert_eq!(rec.returns.load(Ordering::SeqCst), 1000);
    assert_eq!(rec.ret_sum.load(Ordering::SeqCst), want);
    // At the return, rsp is the caller's (one slot above the entry's) and rip is the return
    // address, inside this test function.
    assert_eq!(
        rec.ret_rsp.load(Ordering::SeqCst),
        rec.entry_rsp.load(Ordering::SeqCst) + 8
    );
    let me = return_probe_sees_every_return_value_and_the_caller as *const () as u64;
    let rip = rec.ret_rip.load(Ordering::SeqCst);
    assert!(rip > me && rip < me + 0x2000, "{rip:#x} vs {me:#x}");
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
    assert_eq!(p_nop5(1, 2), 3);
    assert_eq!(rec.returns.load(Ordering::SeqCst), 1000);
}

#[inline(never)]
extern "C" fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
}

#[test]
fn recursion_returns_each_frame_once_in_order() {
    let rec = Rec::default();
    let h = probe(addr(fib as *const ()), &rec, true, true, PatchMode::Auto);
    assert_eq!(fib(black_box(15)), 610);
    // fib(15) makes 1973 calls; each returns once; the return values sum to
    // sum over calls of fib(k).
    fn calls(n: u64) -> (u64, u64) {
        if n < 2 {
            (1, n)
        } else {
            let (a, sa) = calls(n - 1);
            let (b, sb) = calls(n - 2);
            let v = fib_plain(n);
            (a + b + 1, sa + sb + v)
        }
    }
    fn fib_plain(n: u64) -> u64 {
        if n < 2 {
            n
        } else {
            fib_plain(n - 1) + fib_plain(n - 2)
        }
    }
    let (n, sum) = calls(15);
    assert_eq!(rec.entries.load(Ordering::SeqCst), n);
    assert_eq!(rec.returns.load(Ordering::SeqCst), n);
    assert_eq!(rec.ret_sum.load(Ordering::SeqCst), sum);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
}

#[inline(never)]
extern "C" fn deep(n: u64) -> u64 {
    if n == 0 { 0 } else { deep(n - 1) + 1 }
}

#[test]
fn more_than_64_nested_returns_are_skipped_like_the_kernel() {
    let rec = Rec::default();
    let h = probe(addr(deep as *const ()), &rec, true, true, PatchMode::Auto);
    let missed = missed_returns();
    assert_eq!(deep(black_box(99)), 99);
    assert_eq!(rec.entries.load(Ordering::SeqCst), 100);
    // The 64 outermost frames got return probes; the 36 deepest did not.
    assert_eq!(rec.returns.load(Ordering::SeqCst), 64);
    assert!(missed_returns() >= missed + 36);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
}

#[inline(never)]
extern "C" fn threaded(a: u64, b: u64) -> u64 {
    black_box(a.wrapping_mul(3).wrapping_add(b))
}

#[test]
fn eight_threads_each_get_their_own_returns() {
    let rec = Rec::default();
    let h = probe(
        addr(threaded as *const ()),
        &rec,
        true,
        true,
        PatchMode::Auto,
    );
    const N: u64 = 20_000;
    let sums: Vec<u64> = std::thread::scope(|s| {
        let ts: Vec<_> = (0..8u64)
            .map(|t| {
                s.spawn(move || {
                    let mut sum = 0u64;
                    for i in 0..N {
                        sum = sum.wrapping_add(threaded(black_box(i), t));
                    }
                    assert_eq!(pending_returns(), 0);
                    sum
                })
            })
            .collect();
        ts.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(rec.entries.load(Ordering::SeqCst), 8 * N);
    assert_eq!(rec.returns.load(Ordering::SeqCst), 8 * N);
    let want = sums.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    assert_eq!(rec.ret_sum.load(Ordering::SeqCst), want);
    h.remove().unwrap();
}

#[inline(never)]
fn catch_right_here(x: u64) -> Result<u64, Box<dyn std::any::Any + Send>> {
    // The handler frame is the probed function's direct caller (as with a C++ try/catch
    // around the call).
    std::panic::catch_unwind(|| thrower(black_box(x)))
}

#[inline(never)]
extern "C-unwind" fn thrower(x: u64) -> u64 {
    if x == 1 {
        std::panic::panic_any(41u64);
    }
    if x == 2 {
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        return u64::from(bt.contains("unwinding_through_a_probed_frame_reaches_the_caller"));
    }
    black_box(x) + 1
}

#[test]
fn unwinding_through_a_probed_frame_reaches_the_caller() {
    let rec = Rec::default();
    let h = probe(
        addr(thrower as *const ()),
        &rec,
        true,
        true,
        PatchMode::Auto,
    );
    // The unwinder finds the trampoline's frame description and continues in this function.
    let caught = std::panic::catch_unwind(|| thrower(black_box(1)));
    assert_eq!(caught.unwrap_err().downcast_ref::<u64>(), Some(&41));
    // The frame did not return: no return event; the pending return is dropped later.
    assert_eq!(rec.returns.load(Ordering::SeqCst), 0);
    assert_eq!(thrower(black_box(5)), 6);
    assert_eq!(rec.returns.load(Ordering::SeqCst), 1);
    assert_eq!(pending_returns(), 0, "the dead frame's return was pruned");
    // A backtrace taken below the probed frame sees its real caller.
    assert_eq!(thrower(black_box(2)), 1, "backtrace through the trampoline");
    assert_eq!(rec.entries.load(Ordering::SeqCst), 3);
    for _ in 0..3 {
        let caught = catch_right_here(1);
        assert_eq!(caught.unwrap_err().downcast_ref::<u64>(), Some(&41));
        assert_eq!(catch_right_here(3).unwrap(), 4);
    }
    assert_eq!(rec.returns.load(Ordering::SeqCst), 5);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
}

static SIG_REC: Rec = Rec::zero();

#[inline(never)]
extern "C" fn sig_victim(x: u64) -> u64 {
    if x == 1 {
        // SAFETY: raising a signal whose handler (installed by the test) is async-safe.
        unsafe { libc::raise(libc::SIGUSR1) };
    }
    black_box(x) * 10
}

extern "C" fn usr1(_: libc::c_int) {
    // The handler runs on the same thread, inside sig_victim(1), and calls it again.
    assert_eq!(sig_victim(black_box(7)), 70);
}

#[test]
fn a_signal_handler_on_the_same_thread_nests_its_own_returns() {
    let h = probe(
        addr(sig_victim as *const ()),
        &SIG_REC,
        true,
        true,
        PatchMode::Auto,
    );
    // SAFETY: installing a plain handler for SIGUSR1, which nothing else in this binary uses.
    unsafe { libc::signal(libc::SIGUSR1, usr1 as *const () as libc::sighandler_t) };
    assert_eq!(sig_victim(black_box(1)), 10);
    assert_eq!(SIG_REC.entries.load(Ordering::SeqCst), 2);
    assert_eq!(SIG_REC.returns.load(Ordering::SeqCst), 2);
    assert_eq!(SIG_REC.ret_sum.load(Ordering::SeqCst), 80);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
}

static FORK_REC: Rec = Rec::zero();

#[inline(never)]
extern "C" fn forker(x: u64) -> u64 {
    // SAFETY: the child only returns through this frame and calls _exit.
    let pid = unsafe { libc::fork() };
    FORK_PID.store(pid, Ordering::SeqCst);
    if pid < 0 {
        u64::MAX
    } else {
        black_box(x) + u64::from(pid == 0)
    }
}

#[test]
fn a_child_forked_inside_a_probed_frame_returns_through_it_too() {
    let h = probe(
        addr(forker as *const ()),
        &FORK_REC,
        false,
        true,
        PatchMode::Auto,
    );
    let r = forker(black_box(100));
    if r == 101 {
        // Child: the return went through the inherited trampoline and its handler ran here.
        let ok = FORK_REC.returns.load(Ordering::SeqCst) == 1
            && FORK_REC.ret_sum.load(Ordering::SeqCst) == 101
            && pending_returns() == 0;
        // SAFETY: leave the child at once, without running the test harness's exit code.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    assert_eq!(r, 100);
    assert_eq!(FORK_REC.returns.load(Ordering::SeqCst), 1);
    child_exited_ok(&FORK_PID);
    h.remove().unwrap();
}

static FORK2_REC: Rec = Rec::zero();

#[inline(never)]
extern "C" fn forker2(x: u64, fork: u64) -> u64 {
    if fork == 0 {
        return black_box(x);
    }
    // SAFETY: the child only returns through this frame and calls _exit.
    let pid = unsafe { libc::fork() };
    FORK2_PID.store(pid, Ordering::SeqCst);
    if pid < 0 {
        u64::MAX
    } else {
        black_box(x) + u64::from(pid == 0)
    }
}

/// The child `forker` made.
static FORK_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The child `forker2` made (waited for by pid: other tests fork too).
static FORK2_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

#[test]
fn a_child_forked_inside_a_frame_armed_by_the_stub_returns_through_it_too() {
    // A return-only probe: after the thread's first return (armed by the handler, which
    // gives the thread its record and slots), the stub arms returns itself; the child
    // inherits the record (same thread pointer) and the armed slot.
    let h = probe(
        addr(forker2 as *const ()),
        &FORK2_REC,
        false,
        true,
        PatchMode::Jump,
    );
    for i in 0..3 {
        assert_eq!(forker2(black_box(i), 0), i);
    }
    let r = forker2(black_box(100), 1);
    if r == 101 {
        let ok = FORK2_REC.returns.load(Ordering::SeqCst) == 4
            && FORK2_REC.ret_sum.load(Ordering::SeqCst) == 3 + 101
            && pending_returns() == 0
            && forker2(7, 0) == 7
            && FORK2_REC.returns.load(Ordering::SeqCst) == 5;
        // SAFETY: leave the child at once, without running the test harness's exit code.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    assert_eq!(r, 100);
    assert_eq!(FORK2_REC.returns.load(Ordering::SeqCst), 4);
    assert_eq!(pending_returns(), 0);
    child_exited_ok(&FORK2_PID);
    h.remove().unwrap();
}

#[test]
fn a_function_shorter_than_the_jump_gets_a_trap() {
    let target = addr(p_short as *const ());
    let before = unsafe_bytes(target);
    let rec = Rec::default();
    let h = probe(target, &rec, true, true, PatchMode::Auto);
    assert_eq!(h.kind(), HookKind::Trap);
    assert_eq!(h.patched_len(), 1);
    for i in 0..50 {
        assert_eq!(p_short(black_box(i)), i);
    }
    assert_eq!(rec.entries.load(Ordering::SeqCst), 50);
    assert_eq!(rec.returns.load(Ordering::SeqCst), 50);
    assert_eq!(rec.ret_sum.load(Ordering::SeqCst), (0..50).sum::<u64>());
    h.remove().unwrap();
    assert_eq!(unsafe_bytes(target), before);
    assert_eq!(p_short(3), 3);
    assert_eq!(rec.entries.load(Ordering::SeqCst), 50);
}

#[test]
fn a_jump_target_inside_the_patch_gets_a_trap_in_the_middle_of_a_function() {
    let f = addr(p_loop as *const ());
    let rec = Rec::default();
    // At +5 (mov rax, rdi; 3 bytes), a jump would also overwrite the loop target +8.
    let p = |mode| Probe {
        entry: Some(on_entry),
        ret: None,
        user: &rec as *const Rec as *mut c_void,
        func: FuncBounds::Range {
            start: f,
            end: f + 16,
        },
        mode,
    };
    // SAFETY: an instruction boundary of p_loop; the handler only touches `rec`.
    let refused = unsafe { install_probe(f + 5, &p(PatchMode::Jump)) };
    assert!(
        matches!(refused, Err(bpftime_attach::AttachError::BranchIntoPatch { target, .. }) if target == f + 8),
        "{refused:?}"
    );
    // SAFETY: as above.
    let h = unsafe { install_probe(f + 5, &p(PatchMode::Auto)) }.unwrap();
    assert_eq!(h.kind(), HookKind::Trap);
    // The loop body at +8 too (a jump fits there: the loop branches to its first byte); the
    // loop runs it three times per call.
    // SAFETY: as above.
    let h2 = unsafe { install_probe(f + 8, &p(PatchMode::Auto)) }.unwrap();
    assert_eq!(p_loop(1, 2), 7);
    assert_eq!(p_loop(10, 1), 13);
    assert_eq!(h2.kind(), HookKind::Jump);
    assert_eq!(rec.entries.load(Ordering::SeqCst), 2 + 6);
    h.remove().unwrap();
    h2.remove().unwrap();
    assert_eq!(p_loop(1, 2), 7);
}

#[test]
fn a_relocated_call_returns_to_the_original_code() {
    // The call is the last instruction the jump overwrites: the trampoline pushes the
    // original return address, so p_nop5 returns straight into p_calls.
    let rec = Rec::default();
    let h = probe(
        addr(p_calls as *const ()),
        &rec,
        true,
        false,
        PatchMode::Jump,
    );
    assert_eq!(p_calls(5), 106);
    assert_eq!(rec.entries.load(Ordering::SeqCst), 1);
    // And as a trap's out-of-line instruction (second instruction of p_calls).
    let rec2 = Rec::default();
    let p = Probe {
        entry: Some(on_entry),
        ret: None,
        user: &rec2 as *const Rec as *mut c_void,
        func: FuncBounds::Unknown,
        mode: PatchMode::Auto,
    };
    // SAFETY: the `call` at p_calls+5 is an instruction boundary; `rec2` outlives the hook.
    let h2 = unsafe { install_probe(addr(p_calls as *const ()) + 5, &p) }.unwrap();
    assert_eq!(h2.kind(), HookKind::Trap);
    assert_eq!(p_calls(6), 107);
    assert_eq!(rec2.entries.load(Ordering::SeqCst), 1);
    h2.remove().unwrap();
    h.remove().unwrap();
}

extern "C" fn override_42(regs: &mut PtRegs, user: *mut c_void) {
    on_entry(regs, user);
    // SAFETY: an entry handler at a function's first instruction.
    unsafe { override_return(regs, 42) };
}

#[test]
fn override_skips_the_function_and_returns_the_value() {
    for (f, mode, kind) in [
        (
            p_override as extern "C" fn(u64, u64) -> u64,
            PatchMode::Jump,
            HookKind::Jump,
        ),
        (p_override_short, PatchMode::Trap, HookKind::Trap),
    ] {
        let rec = Rec::default();
        let p = Probe {
            entry: Some(override_42),
            ret: Some(on_return),
            user: &rec as *const Rec as *mut c_void,
            func: FuncBounds::Entry,
            mode,
        };
        // SAFETY: a function entry; the handlers only touch `rec`.
        let h = unsafe { install_probe(f as *const () as usize, &p) }.unwrap();
        assert_eq!(h.kind(), kind);
        assert_eq!(f(1, 2), 42);
        assert_eq!(f(3, 4), 42);
        // The return probe sees the overridden value.
        assert_eq!(rec.returns.load(Ordering::SeqCst), 2);
        assert_eq!(rec.ret_sum.load(Ordering::SeqCst), 84);
        h.remove().unwrap();
        assert_eq!(f(1, 2), 3);
    }
}

fn unsafe_bytes(at: usize) -> [u8; 8] {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: reads text of this test binary, which stays mapped.
        *x = unsafe { core::ptr::read_volatile((at + i) as *const u8) };
    }
    b
}

/// Overwrites every xmm register and the caller-saved general-purpose ones.
#[inline(always)]
fn clobber() {
    // SAFETY: writes only the registers declared as clobbered.
    unsafe {
        core::arch::asm!(
            "pcmpeqd xmm0, xmm0",
            "pcmpeqd xmm1, xmm1",
            "pcmpeqd xmm2, xmm2",
            "pcmpeqd xmm3, xmm3",
            "pcmpeqd xmm4, xmm4",
            "pcmpeqd xmm5, xmm5",
            "pcmpeqd xmm6, xmm6",
            "pcmpeqd xmm7, xmm7",
            "pcmpeqd xmm8, xmm8",
            "pcmpeqd xmm9, xmm9",
            "pcmpeqd xmm10, xmm10",
            "pcmpeqd xmm11, xmm11",
            "pcmpeqd xmm12, xmm12",
            "pcmpeqd xmm13, xmm13",
            "pcmpeqd xmm14, xmm14",
            "pcmpeqd xmm15, xmm15",
            "mov rcx, -1",
            "mov rdx, -1",
            "mov rsi, -1",
            "mov r8, -1",
            "mov r9, -1",
            "mov r10, -1",
            "mov r11, -1",
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            out("rcx") _, out("rdx") _, out("rsi") _, out("r8") _,
            out("r9") _, out("r10") _, out("r11") _,
        );
    }
}

extern "C" fn clobber_on_entry(regs: &mut PtRegs, user: *mut c_void) {
    clobber();
    on_entry(regs, user);
    clobber();
}

extern "C" fn clobber_on_return(regs: &mut PtRegs, user: *mut c_void) {
    clobber();
    on_return(regs, user);
    clobber();
}

fn clobbering_probe(target: usize, rec: &Rec, mode: PatchMode) -> Hook {
    let p = Probe {
        entry: Some(clobber_on_entry),
        ret: Some(clobber_on_return),
        user: rec as *const Rec as *mut c_void,
        func: FuncBounds::Entry,
        mode,
    };
    // SAFETY: a function entry of this test binary; the handlers touch only their own
    // registers and `rec`, which outlives the hook.
    unsafe { install_probe(target, &p) }.expect("install_probe")
}

#[test]
fn float_arguments_and_results_survive_handlers_that_clobber_every_xmm_register() {
    for mode in [PatchMode::Jump, PatchMode::Trap] {
        let rec = Rec::default();
        let h = clobbering_probe(addr(p_fsum8 as *const ()), &rec, mode);
        for i in 0..100 {
            let x = f64::from(i);
            let got = p_fsum8(black_box(x), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5);
            assert_eq!(got, x + 21.5, "{mode:?}");
        }
        h.remove().unwrap();
        assert_eq!(rec.entries.load(Ordering::SeqCst), 100, "{mode:?}");
        assert_eq!(rec.returns.load(Ordering::SeqCst), 100, "{mode:?}");
    }
}

#[test]
fn values_a_caller_keeps_in_caller_saved_registers_survive_entry_and_return_handlers() {
    // GCC's -fipa-ra keeps values in registers the ABI calls dead across a call to a local
    // function that does not touch them: the hook must not touch them either.
    for mode in [PatchMode::Jump, PatchMode::Trap] {
        let rec = Rec::default();
        let h = clobbering_probe(addr(p_ipa_leaf as *const ()), &rec, mode);
        for x in 0..100u64 {
            let a = 0.25 + x as f64;
            assert_eq!(p_ipa_caller(black_box(a), x), 3.0 * x as f64 + 3.0 * a);
        }
        assert_eq!(p_ipa_leaf(4), 8);
        h.remove().unwrap();
        assert_eq!(rec.entries.load(Ordering::SeqCst), 101, "{mode:?}");
        assert_eq!(rec.returns.load(Ordering::SeqCst), 101, "{mode:?}");
    }
}

#[test]
fn a_tail_call_between_two_return_probed_functions_returns_through_both() {
    for (outer_mode, inner_mode) in [
        (PatchMode::Jump, PatchMode::Jump),
        (PatchMode::Trap, PatchMode::Trap),
        (PatchMode::Jump, PatchMode::Trap),
    ] {
        tail_call_through_both(outer_mode, inner_mode);
    }
}

fn tail_call_through_both(outer_mode: PatchMode, inner_mode: PatchMode) {
    let modes = format!("{outer_mode:?}/{inner_mode:?}");
    let (outer, inner) = (Rec::default(), Rec::default());
    let ho = probe(addr(p_tail as *const ()), &outer, true, true, outer_mode);
    let hi = probe(
        addr(p_tail_callee as *const ()),
        &inner,
        true,
        true,
        inner_mode,
    );
    let mut want = 0;
    for x in 0..100u64 {
        assert_eq!(p_tail(black_box(x)), x + 1, "{modes}");
        want += x + 1;
    }
    for (rec, name) in [(&outer, "outer"), (&inner, "inner")] {
        assert_eq!(rec.entries.load(Ordering::SeqCst), 100, "{name} {modes}");
        assert_eq!(rec.returns.load(Ordering::SeqCst), 100, "{name} {modes}");
        assert_eq!(rec.ret_sum.load(Ordering::SeqCst), want, "{name} {modes}");
    }
    // The inner function returns through the outer one's trampoline; both handlers see the
    // real return address, in the caller, and the same rsp.
    let me = tail_call_through_both as *const () as u64;
    let rip = outer.ret_rip.load(Ordering::SeqCst);
    assert!(rip > me && rip < me + 0x2000, "{rip:#x} vs {me:#x} {modes}");
    assert_eq!(inner.ret_rip.load(Ordering::SeqCst), rip, "{modes}");
    assert_eq!(
        inner.ret_rsp.load(Ordering::SeqCst),
        outer.ret_rsp.load(Ordering::SeqCst),
        "{modes}"
    );
    assert_eq!(pending_returns(), 0, "{modes}");
    hi.remove().unwrap();
    ho.remove().unwrap();
}
