//! `bpf_tail_call` (helper 12) on the x86_64 JIT, with hand-built program arrays: the jump, the
//! kernel's fall-through cases (wrong map, index out of range, empty slot) and the limit of 33.
#![cfg(target_arch = "x86_64")]

use bpftime_jit::abi::MAX_TAIL_CALLS;
use bpftime_jit::{JitOptions, JitProgram, ProgArray};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{CallEnv, HelperRegistry, MemRegion};
use bpftime_vm::memory::GuestMemory;
use bpftime_vm::verifier::verify;

const MAP: u64 = 0xabcd_0001;

extern "C" fn tail_call_placeholder(
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    _: &mut CallEnv,
) -> u64 {
    // Only registered so that the loader accepts `call 12`; the JIT never calls it.
    u64::MAX
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(12, "bpf_tail_call", tail_call_placeholder);
    h
}

fn jit(src: &str, checked: bool) -> JitProgram {
    let h = helpers();
    let prog = verify(&assemble(src).expect("assembles"), &h).expect("verifies");
    JitProgram::new(
        &prog,
        &h,
        &JitOptions {
            checked,
            ..Default::default()
        },
    )
    .expect("compiles")
}

/// Tail-calls `index` of `map`; 99 when the call falls through.
fn caller(map: u64, index: u64) -> String {
    format!(
        "mov %r6, %r1
         stdw [%r10-8], 7
         lddw %r2, {map:#x}
         lddw %r3, {index:#x}
         call 12
         mov %r0, 99
         exit"
    )
}

/// r0 = first word of the block + 1000 + the word at fp-8 (the caller's stack survives).
const TARGET: &str = "ldxdw %r0, [%r1+0]
    add %r0, 1000
    ldxdw %r2, [%r10-8]
    add %r0, %r2
    exit";

fn run(p: &JitProgram, arrays: &[ProgArray<'_>], block: &mut [u64; 1]) -> u64 {
    let mut gm = GuestMemory::new();
    let start = block.as_mut_ptr() as u64;
    // SAFETY: `block` outlives `gm` and is only accessed through the run.
    unsafe {
        gm.add_region(MemRegion {
            start,
            len: 8,
            writable: true,
        })
    };
    p.run_with_tail_calls(&mut gm, start, 8, std::ptr::null_mut(), arrays)
        .expect("runs")
}

#[test]
fn tail_call_jumps_to_the_target_with_ctx_and_stack() {
    for checked in [false, true] {
        let target = jit(TARGET, checked);
        let a = jit(&caller(MAP, 1), checked);
        let mut arr = ProgArray::new(MAP, 4);
        assert!(arr.set(1, Some(&target)));
        assert_eq!(
            run(&a, &[arr], &mut [5]),
            5 + 1000 + 7,
            "checked: {checked}"
        );
    }
}

#[test]
fn tail_call_falls_through_like_the_kernel() {
    let target = jit(TARGET, true);
    let mut arr = ProgArray::new(MAP, 4);
    arr.set(1, Some(&target));
    let cases = [
        ("empty slot", caller(MAP, 2)),
        ("index out of range", caller(MAP, 4)),
        ("index truncated to 32 bits", caller(MAP, 1 << 32 | 9)),
        ("other map", caller(MAP + 1, 1)),
    ];
    for (what, src) in cases {
        let a = jit(&src, false);
        assert_eq!(run(&a, std::slice::from_ref(&arr), &mut [5]), 99, "{what}");
    }
    // No arrays at all.
    assert_eq!(run(&jit(&caller(MAP, 1), false), &[], &mut [5]), 99);
    // Index as u32: 1 << 32 | 1 selects slot 1.
    let a = jit(&caller(MAP, 1 << 32 | 1), false);
    assert_eq!(run(&a, &[arr], &mut [5]), 1012);
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
    let p = jit(&src, true);
    let mut arr = ProgArray::new(MAP, 1);
    arr.set(0, Some(&p));
    let mut block = [0u64];
    assert_eq!(run(&p, &[arr], &mut block), MAX_TAIL_CALLS + 1);
    assert_eq!(block[0], 34);
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
    let target = jit("mov %r0, 77\nexit", false);
    let a = jit(&src, false);
    let mut arr = ProgArray::new(MAP, 1);
    arr.set(0, Some(&target));
    assert_eq!(run(&a, std::slice::from_ref(&arr), &mut [0]), 77);
    // Falling through returns to the caller as usual.
    arr.set(0, None);
    assert_eq!(run(&a, &[arr], &mut [0]), 55);
}

#[test]
fn checked_target_traps_with_its_own_pc() {
    let target = jit("mov %r0, 0\nldxdw %r0, [%r0+16]\nexit", true);
    let a = jit(&caller(MAP, 0), true);
    let mut arr = ProgArray::new(MAP, 1);
    arr.set(0, Some(&target));
    let mut gm = GuestMemory::new();
    let t = a
        .run_with_tail_calls(&mut gm, 0, 0, std::ptr::null_mut(), &[arr])
        .unwrap_err();
    assert_eq!(t.pc, 1);
    assert_eq!(
        t.kind,
        bpftime_vm::interpreter::TrapKind::OutOfBounds {
            addr: 16,
            len: 8,
            write: false
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Tail calls started by a helper (`CallStatus::TailCall`), as the runtime does them: the same
// programs on the interpreter and the JIT (checked and unchecked) give the same results.

mod by_helper {
    use super::*;
    use bpftime_vm::helper::{MAX_TAIL_CALLS as VM_MAX, TailTarget};
    use bpftime_vm::interpreter::Interpreter;
    use std::cell::RefCell;
    use std::sync::Arc;

    const ENOENT: u64 = (-2i64) as u64;

    /// One slot: the target for the interpreter and its JIT code.
    struct Slot {
        target: TailTarget,
        jit: [JitProgram; 2],
    }

    thread_local! {
        static SLOTS: RefCell<Vec<Option<Arc<Slot>>>> = const { RefCell::new(Vec::new()) };
        /// Which JIT variant runs (0 unchecked, 1 checked), or None for the interpreter.
        static MODE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    extern "C" fn tail_call(
        _: u64,
        map: u64,
        index: u64,
        _: u64,
        _: u64,
        env: &mut CallEnv,
    ) -> u64 {
        if map != MAP {
            return (-22i64) as u64;
        }
        SLOTS.with(|s| {
            let s = s.borrow();
            let i = index as u32 as usize;
            if i >= s.len() || !env.count_tail_call() {
                return ENOENT;
            }
            let Some(slot) = &s[i] else { return ENOENT };
            let entry = MODE
                .with(|m| m.get())
                .map_or(std::ptr::null(), |k| slot.jit[k].tail_entry());
            // SAFETY: `entry` is null or the tail entry of a JitProgram the thread-local keeps
            // alive beyond the run.
            unsafe { env.tail_call(slot.target.clone(), entry) };
            0
        })
    }

    fn helpers() -> Arc<HelperRegistry> {
        let mut h = HelperRegistry::new();
        h.register(12, "bpf_tail_call", tail_call);
        Arc::new(h)
    }

    fn slot(src: &str, h: &Arc<HelperRegistry>) -> Arc<Slot> {
        let prog = verify(&assemble(src).expect("assembles"), h).expect("verifies");
        let jit = [false, true].map(|checked| {
            JitProgram::new(
                &prog,
                h,
                &JitOptions {
                    checked,
                    ..Default::default()
                },
            )
            .expect("compiles")
        });
        Arc::new(Slot {
            target: TailTarget {
                prog: Arc::new(prog),
                helpers: h.clone(),
            },
            jit,
        })
    }

    type Outcome = (Result<u64, bpftime_vm::interpreter::Trap>, Vec<u8>);

    /// Runs `entry` on every engine (the unchecked JIT only when the interpreter did not trap)
    /// over a copy of `block`; asserts they agree, returns r0 and the block.
    fn run_all(entry: &Slot, block: &[u8]) -> Outcome {
        let mut results: Vec<Outcome> = Vec::new();
        for mode in [None, Some(1), Some(0)] {
            if mode == Some(0) && results[0].0.is_err() {
                results.push(results[0].clone());
                continue;
            }
            MODE.with(|m| m.set(mode));
            let mut b = block.to_vec();
            let r = match mode {
                None => Interpreter::new(&entry.target.prog, &entry.target.helpers).run(&mut b),
                Some(k) => entry.jit[k].run(&mut b),
            };
            results.push((r, b));
        }
        assert_eq!(results[0], results[1], "interpreter vs checked JIT");
        assert_eq!(results[0], results[2], "interpreter vs unchecked JIT");
        results.swap_remove(0)
    }

    #[test]
    fn a_chain_of_forty_stops_at_33_on_every_engine() {
        assert_eq!(u64::from(VM_MAX), MAX_TAIL_CALLS);
        let h = helpers();
        let chain: Vec<Arc<Slot>> = (0..40)
            .map(|k| {
                slot(
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
            })
            .collect();
        SLOTS.with(|s| *s.borrow_mut() = chain.iter().cloned().map(Some).collect());
        let (r, block) = run_all(&chain[0], &[0u8; 8 * 40]);
        assert_eq!(r, Ok(33));
        let counts: Vec<u64> = block
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 34);
        SLOTS.with(|s| s.borrow_mut().clear());
    }

    #[test]
    fn fall_through_subprograms_and_traps_agree() {
        let h = helpers();
        let target = slot(TARGET, &h);
        let trapping = slot("mov %r0, 0\nldxdw %r0, [%r0+16]\nexit", &h);
        SLOTS.with(|s| *s.borrow_mut() = vec![None, Some(target), None, Some(trapping)]);
        let sub = |index: u64| {
            format!(
                "mov %r6, %r1
                 stdw [%r10-8], 7
                 call local f
                 add %r0, 55
                 exit
                 f:
                 lddw %r2, {MAP:#x}
                 mov %r3, {index}
                 call 12
                 exit"
            )
        };
        for src in [
            caller(MAP, 1),
            caller(MAP, 0),
            caller(MAP, 2),
            caller(MAP, 3),
            caller(MAP, 4),
            caller(MAP, 1 << 32 | 1),
            caller(MAP + 1, 1),
            sub(1),
            sub(0),
            sub(3),
        ] {
            let entry = slot(&src, &h);
            let _ = run_all(&entry, &5u64.to_le_bytes());
        }
        let (r, _) = run_all(&slot(&caller(MAP, 1), &h), &5u64.to_le_bytes());
        assert_eq!(r, Ok(1012));
        let (r, _) = run_all(&slot(&caller(MAP, 3), &h), &5u64.to_le_bytes());
        assert_eq!(r.unwrap_err().pc, 1, "the target's pc");
        SLOTS.with(|s| s.borrow_mut().clear());
    }
}
