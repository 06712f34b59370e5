//! Arbitrary bytes → `insns_from_bytes` → `verify` → a budgeted interpreter run.
//!
//! Bytecode is untrusted input: the loader and the interpreter must reject or trap, never
//! panic (STYLE.md, "Errors"). The first byte picks the size of the memory block handed to the
//! program (r1/r2), the rest is the program, truncated to whole 8-byte slots.

#![no_main]

use bpftime_vm::helper::conformance_helpers;
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::isa::insns_from_bytes;
use bpftime_vm::verifier::verify;
use libfuzzer_sys::fuzz_target;

/// Instructions one run may execute; backward jumps make non-terminating programs legal.
const BUDGET: u64 = 10_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mem_len, code)) = data.split_first() else {
        return;
    };
    let code = &code[..code.len() / 8 * 8];
    let Ok(insns) = insns_from_bytes(code) else {
        unreachable!("a whole number of slots always splits");
    };
    let helpers = conformance_helpers();
    let Ok(prog) = verify(&insns, &helpers) else {
        return;
    };
    let mut mem: Vec<u8> = (0..mem_len % 128).collect();
    let _ = Interpreter::new(&prog, &helpers)
        .with_budget(Some(BUDGET))
        .run(&mut mem);
});
