//! Callbacks (`lddw rX, func f`, `bpf_loop`) on the x86_64 JIT, checked and unchecked, against
//! the interpreter: the same r0 or trap, memory and stack contents, on programs covering
//! iteration, early stops, the kernel's errors, garbage callbacks, nesting, frames, traps and
//! exits inside callbacks, grants that last only for one callback, and tail calls refused
//! inside callbacks.
#![cfg(target_arch = "x86_64")]

use bpftime_jit::{JitOptions, JitProgram};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{
    BPF_LOOP, CallEnv, CallbackError, HelperRegistry, MemRegion, bpf_loop, conformance_unwind,
    func_token,
};
use bpftime_vm::interpreter::{Interpreter, Trap};
use bpftime_vm::verifier::verify;
use std::cell::RefCell;

/// A map value `for_each` hands each callback, granted for that call only.
#[repr(align(8))]
struct Value([u8; 16]);

thread_local! {
    static VALUES: RefCell<Box<[Value; 3]>> = RefCell::new(Box::new([
        Value([1; 16]),
        Value([2; 16]),
        Value([3; 16]),
    ]));
}

/// A `bpf_for_each_map_elem`-like helper: `f(i, &values[i], ctx)` for three values, stopping
/// on a non-zero return; returns the calls made, or -EINVAL.
extern "C" fn for_each(func: u64, ctx: u64, _: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    VALUES.with(|v| {
        let v = v.borrow();
        for (i, val) in v.iter().enumerate() {
            let p = val.0.as_ptr() as u64;
            let grant = MemRegion {
                start: p,
                len: 16,
                writable: false,
            };
            // SAFETY: `v` lives (and is not touched by Rust) during the call.
            match unsafe { env.call_func_granting(func, [i as u64, p, ctx, 0, 0], &[grant]) } {
                Ok(0) => {}
                Ok(_) => return i as u64 + 1,
                Err(CallbackError::Invalid) => return (-22i64) as u64,
                Err(CallbackError::Stop) => return 0,
            }
        }
        3
    })
}

/// Helper 12: tries a tail call with nothing to jump to (inside callbacks it must fall through
/// on every engine anyway).
extern "C" fn tail(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    77
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register_calling_back(BPF_LOOP, "bpf_loop", bpf_loop);
    h.register_calling_back(164, "for_each", for_each);
    h.register_stopping(5, "unwind", conformance_unwind);
    h.register(12, "tail", tail);
    h
}

type Outcome = (Result<u64, Trap>, Vec<u8>);

/// Runs `src` with a 64-byte block on the interpreter and the JIT (unchecked only when the
/// interpreter did not trap); asserts they agree and returns the interpreter's outcome.
fn agree(src: &str) -> Outcome {
    let h = helpers();
    let insns = assemble(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let p = verify(&insns, &h).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut block = vec![0u8; 64];
    let want = (Interpreter::new(&p, &h).run(&mut block), block);
    for checked in [true, false] {
        if !checked && want.0.is_err() {
            continue;
        }
        let j = JitProgram::new(
            &p,
            &h,
            &JitOptions {
                checked,
                ..Default::default()
            },
        )
        .expect("compiles");
        let mut block = vec![0u8; 64];
        let got = (j.run(&mut block), block);
        assert_eq!(got, want, "checked {checked}:\n{src}");
    }
    want
}

/// `bpf_loop(n, cb, block, flags)`, r0 = calls * 1000 + block[0].
fn looping(n: &str, flags: u64, cb: &str) -> String {
    format!(
        "mov %r6, %r1
         lddw %r1, {n}
         lddw %r2, func cb
         mov %r3, %r6
         mov %r4, {flags}
         call 181
         mul %r0, 1000
         ldxdw %r1, [%r6+0]
         add %r0, %r1
         exit
         cb:
         {cb}"
    )
}

const SUM_ALL: &str = "ldxdw %r3, [%r2+0]
    add %r3, %r1
    stxdw [%r2+0], %r3
    mov %r0, 0
    exit";

const SUM_STOP_AT_4: &str = "ldxdw %r3, [%r2+0]
    add %r3, %r1
    stxdw [%r2+0], %r3
    mov %r0, 0
    jne %r1, 4, out
    mov %r0, 1
    out:
    exit";

#[test]
fn bpf_loop_results_match() {
    assert_eq!(agree(&looping("10", 0, SUM_ALL)).0, Ok(10_045));
    assert_eq!(agree(&looping("0", 0, SUM_ALL)).0, Ok(0));
    assert_eq!(agree(&looping("10", 0, SUM_STOP_AT_4)).0, Ok(5010));
    let e2big = (-7i64 as u64).wrapping_mul(1000);
    assert_eq!(agree(&looping("0x800001", 0, SUM_ALL)).0, Ok(e2big));
    let einval = (-22i64 as u64).wrapping_mul(1000);
    assert_eq!(agree(&looping("3", 2, SUM_ALL)).0, Ok(einval));
    assert_eq!(
        agree(&looping("100000", 0, SUM_ALL)).0,
        Ok(100_000_000 + 4_999_950_000)
    );
}

#[test]
fn garbage_callbacks_match() {
    for r2 in [
        func_token(7),
        0x1234,
        func_token(1),
        func_token(99_999),
        func_token(0) - 1,
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
        assert_eq!(agree(&src).0, Ok((-22i64) as u64), "{r2:#x}");
    }
}

#[test]
fn frames_nesting_and_stack_contents_match() {
    // The callback uses its own stack and calls a subprogram; the caller's stack survives.
    let cb = "stdw [%r10-8], 99
        mov %r7, %r1
        mov %r8, %r2
        call local sq
        ldxdw %r3, [%r8+8]
        add %r3, %r0
        stxdw [%r8+8], %r3
        ldxdw %r0, [%r10-8]
        jeq %r0, 99, ok
        mov %r0, 1
        exit
        ok:
        mov %r0, 0
        exit
        sq:
        stdw [%r10-8], 5
        mov %r0, %r7
        mul %r0, %r7
        exit";
    let src = format!(
        "stdw [%r10-8], 42
         {}",
        looping("6", 0, cb)
    )
    .replace(
        "add %r0, %r1\n         exit",
        "add %r0, %r1\n         ldxdw %r1, [%r10-8]\n         add %r0, %r1\n         exit",
    );
    let (r, block) = agree(&src);
    assert_eq!(r, Ok(6000 + 42));
    assert_eq!(block[8], 55, "sum of squares 0..6");
    // Nested loops.
    let src = "mov %r1, 4
        lddw %r2, func outer
        mov %r3, %r1
        mov %r3, %r10
        add %r3, -8
        stdw [%r10-8], 0
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
    assert_eq!(agree(src).0, Ok(4012));
}

#[test]
fn traps_and_exits_in_callbacks_match() {
    let r = agree(&looping("3", 0, "ldxdw %r0, [%r1+0]\nexit")).0;
    assert_eq!(r.unwrap_err().pc, 12, "the callback's first instruction");
    // A trap on the second iteration, after the first wrote the block.
    let r = agree(&looping(
        "3",
        0,
        "stxdw [%r2+16], %r1\njeq %r1, 0, ok\nldxdw %r0, [%r1+0]\nok:\nmov %r0, 0\nexit",
    ));
    assert!(r.0.is_err());
    assert_eq!(agree(&looping("3", 0, "call 5\nmov %r0, 0\nexit")).0, Ok(0));
    assert_eq!(
        agree(&looping(
            "3",
            0,
            "jeq %r1, 0, skip\ncall 5\nskip:\nmov %r0, 0\nexit"
        ))
        .0,
        Ok(3000)
    );
}

#[test]
fn grants_last_for_one_callback() {
    // Reads each value through its pointer (granted), sums their first bytes.
    let src = "mov %r6, %r1
        lddw %r1, func cb
        mov %r2, %r6
        call 164
        ldxdw %r1, [%r6+0]
        mul %r0, 1000
        add %r0, %r1
        exit
        cb:
        ldxb %r4, [%r2+0]
        ldxdw %r5, [%r3+0]
        add %r5, %r4
        stxdw [%r3+0], %r5
        mov %r0, 0
        exit";
    assert_eq!(agree(src).0, Ok(3006));
    // A store into a read-only value traps.
    let ro = "mov %r6, %r1\nlddw %r1, func cb\nmov %r2, %r6\ncall 164\nexit\n\
              cb:\nstb [%r2+0], 1\nmov %r0, 0\nexit";
    assert!(agree(ro).0.is_err());
    // The pointer is not valid once the callback returned.
    let late = "mov %r6, %r1\nlddw %r1, func cb\nmov %r2, %r6\ncall 164\n\
                ldxdw %r1, [%r6+8]\nldxb %r0, [%r1+0]\nexit\n\
                cb:\nstxdw [%r3+8], %r2\nmov %r0, 1\nexit";
    assert!(agree(late).0.is_err());
}

#[test]
fn tail_calls_inside_callbacks_fall_through() {
    let cb = "mov %r6, %r2\ncall 12\nstxdw [%r6+0], %r0\nmov %r0, 0\nexit";
    assert_eq!(agree(&looping("2", 0, cb)).0, Ok(2077));
}
