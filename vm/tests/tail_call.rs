//! `bpf_tail_call` (helper 12) in the interpreter, with a test helper standing in for the
//! runtime's: the jump (context and stack kept, frames dropped), the kernel's fall-through
//! cases (wrong map, index out of range, empty slot) and the limit of 33 tail calls per run.

use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{CallEnv, HelperRegistry, MAX_TAIL_CALLS, TailTarget};
use bpftime_vm::interpreter::{Interpreter, Trap, TrapKind};
use bpftime_vm::verifier::verify;
use std::cell::RefCell;
use std::sync::Arc;

const MAP: u64 = 0xabcd_0001;
const ENOENT: u64 = (-2i64) as u64;
const EINVAL: u64 = (-22i64) as u64;

thread_local! {
    /// The program array `tail_call` reads: slots of targets.
    static SLOTS: RefCell<Vec<Option<TailTarget>>> = const { RefCell::new(Vec::new()) };
}

/// `bpf_tail_call(ctx, map, index)` over [`SLOTS`], in the kernel's order: the map, the index
/// range, the count, then the slot.
extern "C" fn tail_call(_: u64, map: u64, index: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    if map != MAP {
        return EINVAL;
    }
    SLOTS.with(|s| {
        let s = s.borrow();
        let i = index as u32 as usize;
        if i >= s.len() || !env.count_tail_call() {
            return ENOENT;
        }
        match &s[i] {
            // SAFETY: no JIT code runs here (null entry).
            Some(t) => unsafe {
                env.tail_call(t.clone(), std::ptr::null());
                0
            },
            None => ENOENT,
        }
    })
}

fn helpers() -> Arc<HelperRegistry> {
    let mut h = HelperRegistry::new();
    h.register(12, "bpf_tail_call", tail_call);
    Arc::new(h)
}

fn target(src: &str, h: &Arc<HelperRegistry>) -> TailTarget {
    let prog = verify(&assemble(src).expect("assembles"), h).expect("verifies");
    TailTarget {
        prog: Arc::new(prog),
        helpers: h.clone(),
    }
}

fn set_slots(slots: Vec<Option<TailTarget>>) {
    SLOTS.with(|s| *s.borrow_mut() = slots);
}

fn run(src: &str, h: &Arc<HelperRegistry>, block: &mut [u8]) -> Result<u64, Trap> {
    let p = verify(&assemble(src).expect("assembles"), h).expect("verifies");
    Interpreter::new(&p, h).run(block)
}

/// Tail-calls `index` of `map`; r0 = 99 + (the helper's r0 << 8) when the call falls through.
fn caller(map: u64, index: u64) -> String {
    format!(
        "mov %r6, %r1
         stdw [%r10-8], 7
         lddw %r2, {map:#x}
         lddw %r3, {index:#x}
         call 12
         lsh %r0, 8
         add %r0, 99
         exit"
    )
}

/// r0 = first word of the block + 1000 + the word at fp-8 (the caller's stack survives).
const TARGET: &str = "ldxdw %r0, [%r1+0]
    add %r0, 1000
    ldxdw %r2, [%r10-8]
    add %r0, %r2
    exit";

#[test]
fn tail_call_jumps_to_the_target_with_ctx_and_stack() {
    let h = helpers();
    set_slots(vec![None, Some(target(TARGET, &h)), None, None]);
    let mut block = 5u64.to_le_bytes();
    assert_eq!(run(&caller(MAP, 1), &h, &mut block), Ok(5 + 1000 + 7));
}

#[test]
fn tail_call_falls_through_like_the_kernel() {
    let h = helpers();
    set_slots(vec![None, Some(target(TARGET, &h)), None, None]);
    let fell = |errno: u64| (errno << 8).wrapping_add(99);
    let cases = [
        ("empty slot", caller(MAP, 2), fell(ENOENT)),
        ("index out of range", caller(MAP, 4), fell(ENOENT)),
        (
            "index truncated to 32 bits",
            caller(MAP, 1 << 32 | 9),
            fell(ENOENT),
        ),
        ("other map", caller(MAP + 1, 1), fell(EINVAL)),
        // Index as u32: 1 << 32 | 1 selects slot 1.
        ("index 1 << 32 | 1", caller(MAP, 1 << 32 | 1), 5 + 1000 + 7),
    ];
    for (what, src, want) in cases {
        let mut block = 5u64.to_le_bytes();
        assert_eq!(run(&src, &h, &mut block), Ok(want), "{what}");
    }
}

#[test]
fn tail_calls_stop_after_33() {
    // Counts its runs in the block, then tail-calls itself; r0 = the count once a tail call
    // falls through.
    let src = format!(
        "ldxdw %r2, [%r1+0]
         add %r2, 1
         stxdw [%r1+0], %r2
         mov %r6, %r1
         lddw %r2, {MAP:#x}
         mov %r3, 0
         call 12
         ldxdw %r0, [%r6+0]
         exit"
    );
    let h = helpers();
    let me = target(&src, &h);
    set_slots(vec![Some(me.clone())]);
    let mut block = [0u8; 8];
    let r = Interpreter::new(&me.prog, &h).run(&mut block);
    assert_eq!(r, Ok(u64::from(MAX_TAIL_CALLS) + 1));
    assert_eq!(u64::from_le_bytes(block), 34);
}

#[test]
fn a_chain_of_forty_stops_at_33_and_the_counter_is_per_run() {
    // Program k counts into slot k of the block and tail-calls k + 1; 40 programs.
    let h = helpers();
    let prog = |k: usize| {
        target(
            &format!(
                "mov %r6, %r1
                 ldxdw %r2, [%r1+{off}]
                 add %r2, 1
                 stxdw [%r1+{off}], %r2
                 lddw %r2, {MAP:#x}
                 mov %r3, {next}
                 call 12
                 mov %r0, {k}
                 exit",
                off = 8 * k,
                next = k + 1
            ),
            &h,
        )
    };
    let chain: Vec<TailTarget> = (0..40).map(prog).collect();
    set_slots(chain.iter().cloned().map(Some).collect());
    for _ in 0..2 {
        let mut block = [0u8; 8 * 40];
        let r = Interpreter::new(&chain[0].prog, &h).run(&mut block);
        // Programs 0..=33 ran; the 34th tail call (from program 33) fell through.
        assert_eq!(r, Ok(33));
        let counts: Vec<u64> = block
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 34);
        assert!(counts[..34].iter().all(|&c| c == 1), "{counts:?}");
    }
}

#[test]
fn tail_call_from_a_subprogram_replaces_the_whole_program() {
    let src = format!(
        "mov %r6, %r1
         call local f
         mov %r0, 55
         exit
         f:
         lddw %r2, {MAP:#x}
         mov %r3, 0
         call 12
         mov %r0, 66
         exit"
    );
    let h = helpers();
    set_slots(vec![Some(target("mov %r0, 77\nexit", &h))]);
    assert_eq!(run(&src, &h, &mut []), Ok(77));
    // Falling through returns to the caller as usual.
    set_slots(vec![None]);
    assert_eq!(run(&src, &h, &mut []), Ok(55));
}

#[test]
fn the_target_starts_with_r1_and_zeroed_registers() {
    // r1 is the caller's r1 at the call; r2-r9 are zero, r10 the top frame.
    let h = helpers();
    set_slots(vec![Some(target(
        "mov %r0, %r2
         or %r0, %r3
         or %r0, %r4
         or %r0, %r5
         or %r0, %r6
         or %r0, %r7
         or %r0, %r8
         or %r0, %r9
         ldxdw %r2, [%r1+0]
         add %r0, %r2
         exit",
        &h,
    ))]);
    let src = format!(
        "mov %r6, 1
         mov %r7, 2
         mov %r8, 3
         mov %r9, 4
         lddw %r2, {MAP:#x}
         mov %r3, 0
         call local f
         exit
         f:
         call 12
         exit"
    );
    let mut block = 42u64.to_le_bytes();
    assert_eq!(run(&src, &h, &mut block), Ok(42));
}

#[test]
fn a_trap_in_the_target_has_the_targets_pc() {
    let h = helpers();
    set_slots(vec![Some(target(
        "mov %r0, 0\nldxdw %r0, [%r0+16]\nexit",
        &h,
    ))]);
    let t = run(&caller(MAP, 0), &h, &mut []).unwrap_err();
    assert_eq!(
        t,
        Trap {
            kind: TrapKind::OutOfBounds {
                addr: 16,
                len: 8,
                write: false
            },
            pc: 1
        }
    );
}

#[test]
fn callx_of_the_tail_call_helper_does_not_jump() {
    let h = helpers();
    set_slots(vec![Some(target("mov %r0, 77\nexit", &h))]);
    let src = format!(
        "lddw %r2, {MAP:#x}
         mov %r3, 0
         mov %r4, 12
         call %r4
         exit"
    );
    // The helper ran (and counted) but only `call 12` starts the target.
    assert_eq!(run(&src, &h, &mut []), Ok(0));
}
