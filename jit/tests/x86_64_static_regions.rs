//! Checked mode skips the test of accesses through registers proved to hold an address inside
//! a static region (`JitOptions::static_regions`: global data) plus a constant, when the access
//! stays inside it (and the region is writable, for stores and atomics); everything else is
//! still checked: the same results and traps as the interpreter for in-region, past-the-end,
//! before-the-start, read-only, merged-path, clobbered and misaligned cases.
#![cfg(target_arch = "x86_64")]

use bpftime_jit::{JitOptions, JitProgram};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{HelperRegistry, MemRegion};
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::memory::GuestMemory;
use bpftime_vm::verifier::verify;

mod support_checks;
use support_checks::{kind, nop};

/// Global data for one run: a writable 32-byte block (`.bss`), a read-only one (`.rodata`).
struct Data {
    rw: Box<[u64; 4]>,
    ro: Box<[u64; 4]>,
}

impl Data {
    fn new() -> Data {
        Data {
            rw: Box::new([1, 2, 3, 4]),
            ro: Box::new([10, 20, 30, 40]),
        }
    }
    fn regions(&self) -> Vec<(u64, u64, bool)> {
        vec![
            (self.rw.as_ptr() as u64, 32, true),
            (self.ro.as_ptr() as u64, 32, false),
        ]
    }
    /// `src` with `RW` and `RO` replaced by the blocks' addresses.
    fn program(&self, src: &str) -> String {
        src.replace("RW", &format!("{:#x}", self.rw.as_ptr() as u64))
            .replace("RO", &format!("{:#x}", self.ro.as_ptr() as u64))
    }
    fn memory(&self) -> GuestMemory {
        let mut gm = GuestMemory::new();
        for (start, len, writable) in self.regions() {
            // SAFETY: the boxes outlive every run of these tests (`self` is borrowed across
            // them) and are accessed only through the program during a run.
            unsafe {
                gm.add_region(MemRegion {
                    start,
                    len,
                    writable,
                })
            };
        }
        gm
    }
}

struct Outcome {
    result: Result<u64, String>,
    rw: [u64; 4],
}

fn interpret(src: &str, h: &HelperRegistry) -> Outcome {
    let d = Data::new();
    let prog = verify(&assemble(&d.program(src)).expect("assembles"), h).expect("verifies");
    let mut gm = d.memory();
    let result = Interpreter::new(&prog, h)
        .run_in(&mut gm, 0, 0, std::ptr::null_mut())
        .map_err(kind);
    Outcome { result, rw: *d.rw }
}

/// The checked JIT's outcome and code size, with (`known`) or without static regions.
fn jit(src: &str, h: &HelperRegistry, known: bool) -> (Outcome, usize) {
    let d = Data::new();
    let prog = verify(&assemble(&d.program(src)).expect("assembles"), h).expect("verifies");
    let opts = JitOptions {
        checked: true,
        static_regions: if known { d.regions() } else { Vec::new() },
        ..Default::default()
    };
    let p = JitProgram::new(&prog, h, &opts).expect("compiles");
    let mut gm = d.memory();
    let result = p.run_in(&mut gm, 0, 0, std::ptr::null_mut()).map_err(kind);
    (Outcome { result, rw: *d.rw }, p.compiled().code.len())
}

/// Runs `src` on the interpreter and the checked JIT with and without static regions: the
/// same result and global data each time. Returns the result and the code sizes (with, without).
fn same(src: &str) -> (Result<u64, String>, usize, usize) {
    let mut h = HelperRegistry::new();
    h.register(1, "nop", nop);
    let i = interpret(src, &h);
    let (with, with_len) = jit(src, &h, true);
    let (without, without_len) = jit(src, &h, false);
    for (what, o) in [("with static regions", &with), ("without", &without)] {
        assert_eq!(
            i.result, o.result,
            "interpreter vs checked JIT {what}:\n{src}"
        );
        assert_eq!(
            i.rw, o.rw,
            "global data, interpreter vs checked JIT {what}:\n{src}"
        );
    }
    (i.result, with_len, without_len)
}

#[test]
fn in_region_accesses_run_untested_with_the_same_results() {
    let (r, with, without) = same(
        "lddw %r2, RW
         lddw %r3, RO
         ldxdw %r0, [%r2+8]
         ldxdw %r4, [%r3+24]
         add %r0, %r4
         mov %r5, %r2
         add %r5, 16
         stxdw [%r5+8], %r0
         stw [%r2+0], 7
         mov %r6, 5
         lock add [%r5+0], %r6
         exit",
    );
    assert_eq!(r, Ok(42));
    assert!(
        with < without,
        "the proved accesses lost their tests: {with} vs {without} bytes"
    );
}

#[test]
fn accesses_leaving_the_region_or_writing_read_only_data_still_trap() {
    for src in [
        // Past the end: the last 8 bytes start at +24.
        "lddw %r2, RW
         ldxdw %r0, [%r2+28]
         exit",
        // Before the start.
        "lddw %r2, RW
         sub %r2, 8
         ldxdw %r0, [%r2+0]
         exit",
        // A store, and an atomic, into read-only data.
        "lddw %r2, RO
         stdw [%r2+0], 1
         mov %r0, 0
         exit",
        "lddw %r2, RO
         mov %r3, 1
         lock add [%r2+8], %r3
         mov %r0, 0
         exit",
        // A misaligned atomic on writable data.
        "lddw %r2, RW
         mov %r3, 1
         lock add [%r2+4], %r3
         mov %r0, 0
         exit",
    ] {
        let (r, _, _) = same(src);
        assert!(r.is_err(), "{r:?}:\n{src}");
    }
}

#[test]
fn merged_paths_and_clobbers_forget_the_address() {
    // One path leaves r2 inside the data, the other past its end: checked, trapping only on
    // that path.
    for first in [0u64, 1] {
        let src = format!(
            "lddw %r2, RW
             add %r2, 8
             mov %r3, {first}
             jeq %r3, 0, skip
             add %r2, 32
             skip:
             ldxdw %r0, [%r2+0]
             exit"
        );
        let (r, _, _) = same(&src);
        assert_eq!(r.is_err(), first == 1, "{r:?}");
    }
    // A helper call clobbers r1-r5; r6-r9 keep the address.
    let (r, _, _) = same(
        "lddw %r6, RW
         call 1
         ldxdw %r0, [%r6+24]
         exit",
    );
    assert_eq!(r, Ok(4));
    // A pointer loaded from memory, or moved by a register amount, is not known.
    let (r, _, _) = same(
        "lddw %r2, RW
         stxdw [%r10-8], %r2
         ldxdw %r3, [%r10-8]
         mov %r4, 8
         add %r3, %r4
         ldxdw %r0, [%r3+0]
         exit",
    );
    assert_eq!(r, Ok(2));
    // A constant that is no global data's address is checked (and traps).
    let (r, _, _) = same(
        "lddw %r2, 0x1000
         ldxdw %r0, [%r2+0]
         exit",
    );
    assert!(r.is_err(), "{r:?}");
}
