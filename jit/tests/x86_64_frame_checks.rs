//! Checked mode skips the test of accesses through registers known to hold r10 + k when the
//! access stays inside the frame (as for r10's own accesses); everything else is still
//! checked: the same results and traps as the interpreter for in-frame, above-the-frame,
//! merged-path and clobbered pointers.
#![cfg(target_arch = "x86_64")]

use bpftime_jit::{JitOptions, JitProgram};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::verifier::verify;

mod support_checks;
use support_checks::{kind, nop};

fn both(src: &str, mem: &[u8]) -> [Result<u64, String>; 2] {
    let mut h = HelperRegistry::new();
    h.register(1, "nop", nop);
    let prog = verify(&assemble(src).expect("assembles"), &h).expect("verifies");
    let interp = Interpreter::new(&prog, &h)
        .run(&mut mem.to_vec())
        .map_err(kind);
    let opts = JitOptions {
        checked: true,
        ..Default::default()
    };
    let jit = JitProgram::new(&prog, &h, &opts)
        .expect("compiles")
        .run(&mut mem.to_vec())
        .map_err(kind);
    [interp, jit]
}

fn same(src: &str) -> Result<u64, String> {
    let [i, j] = both(src, &[0u8; 16]);
    assert_eq!(i, j, "interpreter vs checked JIT:\n{src}");
    i
}

#[test]
fn in_frame_pointers_read_and_write_like_r10() {
    let r = same(
        "mov %r2, %r10
         add %r2, -16
         stdw [%r2+8], 77
         mov %r3, %r2
         sub %r3, 8
         ldxdw %r0, [%r3+16]
         exit",
    );
    assert_eq!(r, Ok(77));
}

#[test]
fn pointers_above_the_frame_still_trap() {
    // r10 + 8 is outside the stack: both engines trap.
    let r = same(
        "mov %r2, %r10
         add %r2, 8
         ldxdw %r0, [%r2+0]
         exit",
    );
    assert!(r.is_err(), "{r:?}");
    // In the frame but the access crosses its top.
    let r = same(
        "mov %r2, %r10
         add %r2, -4
         ldxdw %r0, [%r2+0]
         exit",
    );
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn merged_paths_and_clobbers_forget_the_offset() {
    // One path leaves r2 in the frame, the other above it: the access is checked and traps
    // on that path only.
    for first in [0u64, 1] {
        let src = format!(
            "mov %r2, %r10
             add %r2, -8
             mov %r3, {first}
             jeq %r3, 0, skip
             add %r2, 16
             skip:
             ldxdw %r0, [%r2+0]
             exit"
        );
        let r = same(&src);
        assert_eq!(r.is_err(), first == 1, "{r:?}");
    }
    // A helper call clobbers r1–r5: r2 is no stack pointer afterwards (the verifier lets
    // it be read only if set again; set it to the memory block).
    let r = same(
        "mov %r6, %r1
         mov %r2, %r10
         add %r2, -8
         call 1
         mov %r2, %r6
         ldxdw %r0, [%r2+8]
         exit",
    );
    assert_eq!(r, Ok(0));
    // r6 survives calls: still in the frame.
    let r = same(
        "mov %r6, %r10
         add %r6, -8
         stdw [%r6+0], 5
         call 1
         ldxdw %r0, [%r6+0]
         exit",
    );
    assert_eq!(r, Ok(5));
}

#[test]
fn atomics_through_in_frame_pointers_hit_the_frame_and_check_alignment() {
    // The block access first leaves its address in the checker's scratch register; the
    // atomic through r2 (= r10 - 8) must still address the stack slot.
    let r = same(
        "ldxdw %r3, [%r1+0]
         mov %r2, %r10
         add %r2, -8
         stdw [%r2+0], 40
         mov %r4, 2
         lock add [%r2+0], %r4
         mov %r0, 0
         add %r0, %r3
         ldxdw %r5, [%r10-8]
         add %r0, %r5
         exit",
    );
    assert_eq!(r, Ok(42));
    // Fetching forms and a misaligned 8-byte atomic (r10 - 12): both engines trap.
    let r = same(
        "mov %r2, %r10
         add %r2, -16
         stdw [%r2+0], 7
         mov %r0, 5
         lock fetch add [%r2+0], %r0
         ldxdw %r3, [%r2+0]
         add %r0, %r3
         exit",
    );
    assert_eq!(r, Ok(7 + 12));
    let r = same(
        "mov %r2, %r10
         add %r2, -12
         mov %r4, 1
         lock add [%r2+0], %r4
         exit",
    );
    assert!(r.as_ref().is_err_and(|e| e.contains("Misaligned")), "{r:?}");
}
