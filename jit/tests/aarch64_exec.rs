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

extern "C" fn unused(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    unreachable!("bpf_tail_call is compiled inline")
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(12, "tail_call", unused);
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
    let code = compile(&program(target), &h, &JitOptions { checked }).unwrap();
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
    let code = compile(&program(src), &h, &JitOptions { checked }).unwrap();
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

/// Runs `src` on the interpreter and the JIT (fresh memory `mem` each).
fn both(src: &str, mem: &[u8], checked: bool) -> (Result<u64, Trap>, Result<u64, Trap>) {
    let h = HelperRegistry::new();
    let prog = program(src);
    let mut m = mem.to_vec();
    let want = Interpreter::new(&prog, &h).run(&mut m);
    let mut emu = Emu::new();
    let mut m = mem.to_vec();
    let got = emu
        .compile_and_run(&prog, &h, &JitOptions { checked }, &mut m)
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
            &JitOptions { checked: true },
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
            &JitOptions { checked: true },
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
