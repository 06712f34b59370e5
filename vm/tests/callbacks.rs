//! Callbacks in the interpreter: `lddw rX, func f` (`BPF_PSEUDO_FUNC`) and `bpf_loop`
//! (helper 181) — results, the kernel's errors, frames, traps, exits and budgets inside
//! callbacks — and the loader checks on function references.

use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{
    BPF_LOOP, CallEnv, HelperRegistry, bpf_loop, conformance_unwind, func_token,
};
use bpftime_vm::interpreter::{Interpreter, Trap, TrapKind};
use bpftime_vm::verifier::{VerifyErrorKind, verify};

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register_calling_back(BPF_LOOP, "bpf_loop", bpf_loop);
    h.register_stopping(5, "unwind", conformance_unwind);
    h.register(7, "tokens", func_pc_of_r1);
    h
}

/// Returns r1 unchanged: lets a program hand a token to the test.
extern "C" fn func_pc_of_r1(r1: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    r1
}

fn run_budget(src: &str, budget: Option<u64>) -> Result<u64, Trap> {
    let h = helpers();
    let insns = assemble(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let p = verify(&insns, &h).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Interpreter::new(&p, &h).with_budget(budget).run(&mut [])
}

fn run(src: &str) -> Result<u64, Trap> {
    run_budget(src, None)
}

/// `bpf_loop(n, cb, &sum, flags)`; r0 = iterations * 1000 + sum.
fn looping(n: &str, flags: u64, cb: &str) -> String {
    format!(
        "stdw [%r10-8], 0
         lddw %r1, {n}
         lddw %r2, func cb
         mov %r3, %r10
         add %r3, -8
         mov %r4, {flags}
         call 181
         mul %r0, 1000
         ldxdw %r1, [%r10-8]
         add %r0, %r1
         exit
         cb:
         {cb}"
    )
}

/// Adds the index to the sum; stops after index 4 when r0 is set to `stop`.
const SUM: &str = "ldxdw %r3, [%r2+0]
    add %r3, %r1
    stxdw [%r2+0], %r3
    mov %r0, 0
    jne %r1, 4, out
    mov %r0, 1
    out:
    exit";

const SUM_ALL: &str = "ldxdw %r3, [%r2+0]
    add %r3, %r1
    stxdw [%r2+0], %r3
    mov %r0, 0
    exit";

#[test]
fn bpf_loop_calls_back_nr_loops_times() {
    assert_eq!(run(&looping("10", 0, SUM_ALL)), Ok(10 * 1000 + 45));
    assert_eq!(run(&looping("0", 0, SUM_ALL)), Ok(0));
}

#[test]
fn bpf_loop_stops_after_a_callback_returns_one() {
    assert_eq!(run(&looping("10", 0, SUM)), Ok(5 * 1000 + 10));
}

#[test]
fn bpf_loop_refuses_what_the_kernel_refuses() {
    let e2big = (-7i64 as u64).wrapping_mul(1000);
    let einval = (-22i64 as u64).wrapping_mul(1000);
    assert_eq!(run(&looping("0x800001", 0, SUM_ALL)), Ok(e2big));
    assert_eq!(run(&looping("10", 1, SUM_ALL)), Ok(einval));
    // 1 << 23 loops are allowed (the upper 32 bits of nr_loops are ignored).
    assert_eq!(
        run(&looping("0x100800000", 0, SUM)),
        Ok(5 * 1000 + 10),
        "2^23 loops, stopped early"
    );
}

#[test]
fn garbage_callbacks_are_einval_never_a_crash() {
    let einval = (-22i64) as u64;
    // A subprogram that is called but never named by `lddw func`, a number, a token of a
    // slot that is no callback, the tag alone.
    for r2 in [
        func_token(7).to_string(),
        "0x1234".to_string(),
        func_token(1).to_string(),
        func_token(99_999).to_string(),
        (func_token(0) - 1).to_string(),
    ] {
        let src = format!(
            "mov %r1, 3
             lddw %r2, {r2}
             mov %r3, 0
             mov %r4, 0
             call 181
             exit
             call local f
             exit
             f:
             mov %r0, 0
             exit"
        );
        assert_eq!(run(&src), Ok(einval), "r2 = {r2}");
    }
}

#[test]
fn the_token_is_the_tag_and_the_slot() {
    let src = "lddw %r1, func f
        call 7
        exit
        f:
        mov %r0, 0
        exit";
    assert_eq!(run(src), Ok(func_token(4)));
}

#[test]
fn a_callback_runs_in_its_own_frame_below_the_callers() {
    // The callback writes its own fp-8 and reads the caller's stack through the context.
    let cb = "stdw [%r10-8], 99
        ldxdw %r3, [%r2+0]
        add %r3, %r1
        stxdw [%r2+0], %r3
        ldxdw %r0, [%r10-8]
        jeq %r0, 99, ok
        mov %r0, 1
        exit
        ok:
        mov %r0, 0
        exit";
    assert_eq!(run(&looping("5", 0, cb)), Ok(5 * 1000 + 10));
}

#[test]
fn callbacks_nest() {
    // The outer callback runs an inner bpf_loop of 3 for each of its 4 iterations; each
    // inner iteration adds 1 to the outer context.
    let src = "stdw [%r10-8], 0
        mov %r1, 4
        lddw %r2, func outer
        mov %r3, %r10
        add %r3, -8
        mov %r4, 0
        call 181
        ldxdw %r1, [%r10-8]
        mul %r0, 1000
        add %r0, %r1
        exit
        outer:
        mov %r1, 3
        mov %r3, %r2
        lddw %r2, func inner
        mov %r4, 0
        call 181
        mov %r0, 0
        exit
        inner:
        ldxdw %r3, [%r2+0]
        add %r3, 1
        stxdw [%r2+0], %r3
        mov %r0, 0
        exit";
    assert_eq!(run(src), Ok(4 * 1000 + 12));
}

#[test]
fn a_trap_in_a_callback_stops_the_program_with_the_callbacks_pc() {
    let cb = "ldxdw %r0, [%r1+0]\nexit";
    let t = run(&looping("3", 0, cb)).unwrap_err();
    assert_eq!(
        t,
        Trap {
            kind: TrapKind::OutOfBounds {
                addr: 0,
                len: 8,
                write: false
            },
            pc: 13
        }
    );
}

#[test]
fn an_exit_requested_in_a_callback_stops_the_program() {
    // Helper 5 ("unwind") stops the program with r0 = 0 when r1 is 0: iteration 0.
    let cb = "call 5\nmov %r0, 0\nexit";
    assert_eq!(run(&looping("3", 0, cb)), Ok(0));
    // r1 = 1 in iteration 1 does not stop.
    let cb = "jeq %r1, 0, skip\ncall 5\nskip:\nmov %r0, 0\nexit";
    assert_eq!(run(&looping("3", 0, cb)), Ok(3 * 1000));
}

#[test]
fn the_budget_covers_callbacks() {
    let src = looping("0x800000", 0, SUM_ALL);
    let t = run_budget(&src, Some(100_000)).unwrap_err();
    assert_eq!(t.kind, TrapKind::BudgetExhausted);
    assert!(t.pc >= 11, "trapped in the callback at {}", t.pc);
}

#[test]
fn too_deep_callback_chains_are_refused() {
    // main -> f1 -> ... -> f6 calls bpf_loop with cb, whose tree needs 2 frames: 7 + 2 > 8.
    let mut src = String::from(
        "mov %r1, 1
         lddw %r2, func cb
         mov %r3, 0
         mov %r4, 0
         call local f1
         exit\n",
    );
    for i in 1..=6 {
        let body = if i < 6 {
            format!("call local f{}", i + 1)
        } else {
            "call 181".to_string()
        };
        src.push_str(&format!("f{i}:\n{body}\nexit\n"));
    }
    src.push_str("cb:\ncall local g\nexit\ng:\nmov %r0, 1\nexit\n");
    // The loader counts the callback from main only (depth 3): it accepts; at run time the
    // engine sees the callback would need frames 8 and 9.
    assert_eq!(run(&src), Ok((-22i64) as u64));
}

#[test]
fn function_references_are_checked_by_the_loader() {
    let h = helpers();
    let bad = |src: &str| {
        let insns = assemble(src).unwrap();
        verify(&insns, &h).unwrap_err().kind
    };
    // To the entry (the main function is no callback).
    assert!(matches!(
        bad("lddw %r1, func -1\nexit"),
        VerifyErrorKind::BadFunc { target: 0 }
    ));
    // Out of the program.
    assert!(matches!(
        bad("lddw %r1, func 5\nexit"),
        VerifyErrorKind::BadFunc { target: 6 }
    ));
    // Into the second slot of an lddw.
    assert!(matches!(
        bad("lddw %r1, func 3\nexit\nlddw %r0, 5\nexit"),
        VerifyErrorKind::BadFunc { target: 4 }
    ));
    // A callback naming itself (recursion through a callback).
    assert!(matches!(
        bad("mov %r0, 0\nexit\nf:\nlddw %r1, func f\nexit"),
        VerifyErrorKind::Recursion { .. }
    ));
    // Recursion reachable only through a callback named in dead code.
    assert!(matches!(
        bad("mov %r0, 0\nexit\nlddw %r1, func f\nexit\nf:\ncall local f\nexit"),
        VerifyErrorKind::Recursion { .. }
    ));
    // The target becomes a function: a jump into it from main is out of main.
    assert!(matches!(
        bad("lddw %r1, func f\nja f\nf:\nmov %r0, 0\nexit"),
        VerifyErrorKind::JumpOutOfRange { .. }
    ));
}
