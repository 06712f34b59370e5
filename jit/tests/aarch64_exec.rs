//! Targeted runs of aarch64 JIT code under emulation for what the generated-program
//! differential test does not reach: `bpf_tail_call` through `ctx.tail_tables`, branches over
//! more than 1 MiB of code, eight nested frames, and checked mode without a `check` function.

mod support_aarch64;

use bpftime_jit::JitOptions;
use bpftime_jit::aarch64::TAIL_ENTRY;
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{CallEnv, HelperRegistry, MemRegion};
use bpftime_vm::interpreter::{Interpreter, Trap, TrapKind};
use bpftime_vm::verifier::{Program, verify};
use support_aarch64::{Emu, compile};

/// Helper 12, called when no table of `ctx.tail_tables` answers to r2: starts nothing and
/// returns 5, what the callers below hold in r0, so every fall-through ends with r0 = 105.
extern "C" fn no_tail_call(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    5
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(12, "tail_call", no_tail_call);
    h
}

fn program(src: &str) -> Program {
    let insns = assemble(src).unwrap_or_else(|e| panic!("{src}: {e}"));
    verify(&insns, &helpers()).unwrap_or_else(|e| panic!("{src}: {e}"))
}

const MAP: u64 = 0x77;

/// Calls `bpf_tail_call(ctx, r2, r3)`; on fall-through adds 100 to r0 (5).
fn caller(map: u64, index: u64) -> String {
    format!(
        "mov %r6, 3\nlddw %r2, {map:#x}\nlddw %r3, {index:#x}\nmov %r0, 5\ncall 12\n\
         add %r0, 100\nexit"
    )
}

/// The tail-call target: 1000 + the u64 at r1 + every register it got but r1 and r10, which
/// the ABI sets to zero (and r2 too).
const TARGET: &str = "mov %r0, 1000\nldxdw %r4, [%r1+0]\nadd %r0, %r4\nadd %r0, %r2\n\
     add %r0, %r3\nadd %r0, %r5\nadd %r0, %r6\nadd %r0, %r7\nadd %r0, %r8\nadd %r0, %r9\n\
     stxdw [%r10-8], %r0\nldxdw %r0, [%r10-8]\nexit";

struct TailSetup {
    emu: Emu,
    target: u64,
}

/// Loads `target` at 32 MiB and returns its tail entry; `checked` for the target only.
fn tail_setup(target: &str, checked: bool) -> TailSetup {
    let mut emu = Emu::new();
    let h = helpers();
    emu.set_helpers(&h);
    let code = compile(
        &program(target),
        &h,
        &JitOptions {
            checked,
            ..Default::default()
        },
    )
    .unwrap();
    let base = emu.load_at(32 << 20, &code);
    TailSetup {
        emu,
        target: base + TAIL_ENTRY as u64,
    }
}

fn run_caller(
    s: &mut TailSetup,
    src: &str,
    tables: &[(u64, Vec<u64>)],
    checked: bool,
) -> Result<u64, Trap> {
    let h = helpers();
    let code = compile(
        &program(src),
        &h,
        &JitOptions {
            checked,
            ..Default::default()
        },
    )
    .unwrap();
    let entry = s.emu.load(&code);
    s.emu.set_tail_tables(tables);
    s.emu.guest_memory().reset();
    let block = s.emu.block_addr();
    s.emu.block_mut()[..8].copy_from_slice(&42u64.to_le_bytes());
    let region = MemRegion {
        start: block,
        len: 64,
        writable: true,
    };
    s.emu.fast_region = None;
    s.emu
        .run(entry, block, 64, &[region], std::ptr::null_mut())
        .unwrap()
        .result
}

#[test]
fn tail_call_replaces_the_program_with_r1_kept_and_registers_cleared() {
    for (checked_caller, checked_target) in [(false, false), (true, false), (false, true)] {
        let mut s = tail_setup(TARGET, checked_target);
        let t = s.target;
        let r = run_caller(
            &mut s,
            &caller(MAP, 1),
            &[(1, vec![t]), (MAP, vec![0, t])],
            checked_caller,
        );
        assert_eq!(
            r,
            Ok(1042),
            "checked caller {checked_caller}, target {checked_target}"
        );
        assert_eq!(s.emu.tail_calls(), 1);
        // Only the low 32 bits of the index count.
        let r = run_caller(
            &mut s,
            &caller(MAP, (1 << 32) | 1),
            &[(MAP, vec![0, t])],
            false,
        );
        assert_eq!(r, Ok(1042));
    }
}

#[test]
fn failed_tail_calls_fall_through_with_r0_unchanged() {
    let mut s = tail_setup(TARGET, false);
    let t = s.target;
    type Tables = Vec<(u64, Vec<u64>)>;
    let cases: [(&str, String, Tables, u64); 5] = [
        ("no tables", caller(MAP, 1), vec![], 0),
        ("other map", caller(MAP + 1, 1), vec![(MAP, vec![t, t])], 0),
        (
            "index out of range",
            caller(MAP, 2),
            vec![(MAP, vec![t, t])],
            0,
        ),
        (
            "huge index",
            caller(MAP, u64::MAX),
            vec![(MAP, vec![t, t])],
            0,
        ),
        // Counted before the slot test, as the kernel's JITs do.
        ("empty slot", caller(MAP, 1), vec![(MAP, vec![t, 0])], 1),
    ];
    for (what, src, tables, counted) in cases {
        assert_eq!(run_caller(&mut s, &src, &tables, false), Ok(105), "{what}");
        assert_eq!(s.emu.tail_calls(), counted, "{what}");
    }
}

#[test]
fn tail_calls_stop_after_33() {
    // Counts its own runs in the block, then tail-calls itself.
    let me = "ldxdw %r2, [%r1+0]\nadd %r2, 1\nstxdw [%r1+0], %r2\nlddw %r2, 0x77\n\
              mov %r3, 0\ncall 12\nldxdw %r0, [%r1+0]\nexit";
    let mut s = tail_setup(me, false);
    let t = s.target;
    s.emu.block_mut()[..8].fill(0);
    let h = helpers();
    let code = compile(&program(me), &h, &JitOptions::default()).unwrap();
    let entry = s.emu.load_at(32 << 20, &code) + code.entry as u64;
    s.emu.set_tail_tables(&[(MAP, vec![t])]);
    let block = s.emu.block_addr();
    let r = s
        .emu
        .run(entry, block, 64, &[], std::ptr::null_mut())
        .unwrap()
        .result;
    assert_eq!(r, Ok(34), "the first run and 33 tail calls");
    assert_eq!(s.emu.tail_calls(), 33);
}

#[test]
fn tail_call_from_a_subprogram_drops_every_frame() {
    let mut s = tail_setup(TARGET, false);
    let t = s.target;
    let src = "lddw %r2, 0x77\nmov %r3, 1\ncall local f\nadd %r0, 100\nexit\n\
               f: mov %r6, 9\ncall local g\nmov %r0, 55\nexit\n\
               g: mov %r7, 4\ncall 12\nmov %r0, 66\nexit";
    assert_eq!(
        run_caller(&mut s, src, &[(MAP, vec![0, t])], true),
        Ok(1042)
    );
}

mod by_helper {
    use super::*;
    use bpftime_vm::helper::TailTarget;
    use std::cell::Cell;
    use std::sync::Arc;

    thread_local! {
        /// Guest address of the tail entry the helper starts (0: none).
        static ENTRY: Cell<u64> = const { Cell::new(0) };
        /// The helper's calls.
        static CALLS: Cell<u32> = const { Cell::new(0) };
    }

    /// `bpf_tail_call` as the runtime does it: slot 1 of map 0x77 holds the target.
    extern "C" fn tail_call(
        _: u64,
        map: u64,
        index: u64,
        _: u64,
        _: u64,
        env: &mut CallEnv,
    ) -> u64 {
        CALLS.with(|c| c.set(c.get() + 1));
        if map != MAP || index as u32 != 1 || !env.count_tail_call() {
            return 7;
        }
        let target = TailTarget {
            prog: Arc::new(program("exit")),
            helpers: Arc::new(HelperRegistry::new()),
        };
        // SAFETY: the entry is the guest address of loaded code (the test runs it emulated).
        unsafe { env.tail_call(target, ENTRY.with(Cell::get) as *const u8) };
        0
    }

    fn helpers() -> HelperRegistry {
        let mut h = HelperRegistry::new();
        h.register(12, "bpf_tail_call", tail_call);
        h
    }

    fn run(s: &mut TailSetup, src: &str, checked: bool) -> Result<u64, Trap> {
        let h = helpers();
        s.emu.set_helpers(&h);
        let prog = verify(&assemble(src).unwrap(), &h).unwrap();
        let code = compile(
            &prog,
            &h,
            &JitOptions {
                checked,
                ..Default::default()
            },
        )
        .unwrap();
        let entry = s.emu.load(&code);
        s.emu.set_tail_tables(&[]);
        s.emu.guest_memory().reset();
        let block = s.emu.block_addr();
        s.emu.block_mut()[..8].copy_from_slice(&42u64.to_le_bytes());
        let region = MemRegion {
            start: block,
            len: 64,
            writable: true,
        };
        s.emu
            .run(entry, block, 64, &[region], std::ptr::null_mut())
            .unwrap()
            .result
    }

    #[test]
    fn helper_started_tail_calls_jump_with_r1_or_fall_through_with_its_r0() {
        for checked in [false, true] {
            let mut s = tail_setup(TARGET, false);
            ENTRY.with(|e| e.set(s.target));
            CALLS.with(|c| c.set(0));
            assert_eq!(run(&mut s, &caller(MAP, 1), checked), Ok(1042));
            // From a subprogram: every frame goes.
            let src = "lddw %r2, 0x77\nmov %r3, 1\ncall local f\nadd %r0, 100\nexit\n\
                       f: mov %r6, 9\ncall 12\nmov %r0, 66\nexit";
            assert_eq!(run(&mut s, src, checked), Ok(1042));
            // Falls through with the helper's r0.
            assert_eq!(run(&mut s, &caller(MAP, 2), checked), Ok(107));
            // A null entry falls through too.
            ENTRY.with(|e| e.set(0));
            assert_eq!(run(&mut s, &caller(MAP, 1), checked), Ok(100));
            assert_eq!(CALLS.with(Cell::get), 4);
        }
    }
}

mod callbacks {
    use super::*;
    use bpftime_vm::helper::{BPF_LOOP, bpf_loop, conformance_unwind, func_token};

    fn helpers() -> HelperRegistry {
        let mut h = HelperRegistry::new();
        h.register_calling_back(BPF_LOOP, "bpf_loop", bpf_loop);
        h.register_stopping(5, "unwind", conformance_unwind);
        h
    }

    /// `src` on the interpreter and emulated (checked, and unchecked when the interpreter did
    /// not trap) with a 64-byte block: the same result and block.
    fn agree(src: &str) -> Result<u64, Trap> {
        let h = helpers();
        let prog = verify(&assemble(src).unwrap(), &h).unwrap_or_else(|e| panic!("{e}\n{src}"));
        let mut m = vec![0u8; 64];
        let want = Interpreter::new(&prog, &h).run(&mut m);
        let mut emu = Emu::new();
        for checked in [true, false] {
            if !checked && want.is_err() {
                continue;
            }
            let mut g = vec![0u8; 64];
            let got = emu
                .compile_and_run(
                    &prog,
                    &h,
                    &JitOptions {
                        checked,
                        ..Default::default()
                    },
                    &mut g,
                )
                .unwrap();
            assert_eq!((got, &g), (want, &m), "checked {checked}:\n{src}");
        }
        want
    }

    fn looping(n: &str, cb: &str) -> String {
        format!(
            "mov %r6, %r1\nlddw %r1, {n}\nlddw %r2, func cb\nmov %r3, %r6\nmov %r4, 0\n\
             call 181\nmul %r0, 1000\nldxdw %r1, [%r6+0]\nadd %r0, %r1\nexit\ncb:\n{cb}"
        )
    }

    const SUM: &str = "ldxdw %r3, [%r2+0]\nadd %r3, %r1\nstxdw [%r2+0], %r3\nmov %r0, 0\n\
        jne %r1, 4, out\nmov %r0, 1\nout:\nexit";

    #[test]
    fn bpf_loop_callbacks_match_the_interpreter() {
        assert_eq!(agree(&looping("3", SUM)), Ok(3003));
        assert_eq!(agree(&looping("10", SUM)), Ok(5010));
        assert_eq!(
            agree(&looping("0x800001", SUM)),
            Ok((-7i64 as u64).wrapping_mul(1000))
        );
        // Garbage callback.
        let src = format!(
            "mov %r1, 3\nlddw %r2, {}\nmov %r3, 0\nmov %r4, 0\ncall 181\nexit",
            func_token(1)
        );
        assert_eq!(agree(&src), Ok((-22i64) as u64));
        // Own stack, a subprogram inside the callback, the caller's stack kept.
        let cb = "stdw [%r10-8], 9\nmov %r7, %r2\ncall local sq\nldxdw %r3, [%r7+8]\n\
                  add %r3, %r0\nstxdw [%r7+8], %r3\nldxdw %r0, [%r10-8]\nsub %r0, 9\nexit\n\
                  sq:\nstdw [%r10-8], 1\nmov %r0, %r1\nmul %r0, %r1\nexit";
        assert_eq!(
            agree(&format!("stdw [%r10-8], 3\n{}", looping("5", cb))),
            Ok(5000)
        );
        // A trap and an exit inside the callback.
        assert_eq!(
            agree(&looping("3", "ldxdw %r0, [%r1+0]\nexit"))
                .unwrap_err()
                .pc,
            12
        );
        assert_eq!(agree(&looping("3", "call 5\nmov %r0, 0\nexit")), Ok(0));
    }

    #[test]
    fn nested_callbacks_match_the_interpreter() {
        let src = "mov %r6, %r1\nmov %r1, 4\nlddw %r2, func outer\nmov %r3, %r6\nmov %r4, 0\n\
                   call 181\nldxdw %r1, [%r6+0]\nmul %r0, 1000\nadd %r0, %r1\nexit\n\
                   outer:\nmov %r1, 3\nmov %r3, %r2\nlddw %r2, func inner\nmov %r4, 0\n\
                   call 181\nmov %r0, 0\nexit\n\
                   inner:\nldxdw %r3, [%r2+0]\nadd %r3, 1\nstxdw [%r2+0], %r3\nmov %r0, 0\nexit";
        assert_eq!(agree(src), Ok(4012));
    }
}

/// Runs `src` on the interpreter and the JIT (fresh memory `mem` each).
fn both(src: &str, mem: &[u8], checked: bool) -> (Result<u64, Trap>, Result<u64, Trap>) {
    let h = HelperRegistry::new();
    let prog = program(src);
    let mut m = mem.to_vec();
    let want = Interpreter::new(&prog, &h).run(&mut m);
    let mut emu = Emu::new();
    let mut m = mem.to_vec();
    let got = emu
        .compile_and_run(
            &prog,
            &h,
            &JitOptions {
                checked,
                ..Default::default()
            },
            &mut m,
        )
        .unwrap();
    (want, got)
}

#[test]
fn branches_over_more_than_one_mib_of_code_run() {
    // Checked loads of the block take ~176 bytes each (inline test and stub).
    let mut body = String::new();
    for _ in 0..7000 {
        body.push_str("ldxdw %r2, [%r1+8]\n");
    }
    let src = format!(
        "jeq %r2, 16, far\nmov %r0, 1\nja back\nmid: {body}mov %r0, 2\nexit\n\
         far: mov %r0, 7\nja mid\nback: jeq %r0, 1, mid\nexit"
    );
    for len in [16usize, 24] {
        let (want, got) = both(&src, &vec![0u8; len], true);
        assert_eq!(got, want, "len {len}");
    }
    assert_eq!(both(&src, &[0; 16], true).1, Ok(2));
}

#[test]
fn eight_nested_frames_keep_their_stacks_and_registers() {
    // Each level stores a marker in its frame, calls the next, then checks the marker and its
    // r6 survived; r0 accumulates on the way back.
    let mut src = String::from("mov %r0, 0\ncall local f1\nexit\n");
    for i in 1..8 {
        let next = if i < 7 {
            format!("call local f{}\n", i + 1)
        } else {
            String::new()
        };
        src.push_str(&format!(
            "f{i}: mov %r6, {i}\nstxdw [%r10-8], %r6\nmov %r1, %r10\n{next}\
             ldxdw %r2, [%r10-8]\nadd %r0, %r2\nmul %r0, 3\nadd %r0, %r6\n\
             ldxdw %r3, [%r1-8]\nadd %r0, %r3\nexit\n"
        ));
    }
    for checked in [false, true] {
        let (want, got) = both(&src, &[], checked);
        assert!(want.is_ok(), "{want:?}");
        assert_eq!(got, want, "checked {checked}");
    }
}

#[test]
fn checked_mode_without_a_check_function_traps_outside_the_stack() {
    let mut emu = Emu::new();
    emu.check_enabled = false;
    let prog = program("ldxdw %r0, [%r10-8]\nldxb %r0, [%r1+0]\nexit");
    let mut mem = [9u8; 8];
    let r = emu
        .compile_and_run(
            &prog,
            &HelperRegistry::new(),
            &JitOptions {
                checked: true,
                ..Default::default()
            },
            &mut mem,
        )
        .unwrap();
    let addr = emu.block_addr();
    // The fast region still admits the block.
    assert_eq!(r, Ok(9));
    emu.fast_region_for_block = false;
    let r = emu
        .compile_and_run(
            &prog,
            &HelperRegistry::new(),
            &JitOptions {
                checked: true,
                ..Default::default()
            },
            &mut mem,
        )
        .unwrap();
    assert_eq!(
        r,
        Err(Trap {
            kind: TrapKind::OutOfBounds {
                addr,
                len: 1,
                write: false
            },
            pc: 1
        })
    );
}
