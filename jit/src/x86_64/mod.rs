//! The x86_64 backend: compiles a verified [`Program`] to System V x86_64 code that follows
//! [`crate::abi`]. Compiling works on every host (it only produces bytes); running the code needs
//! an x86_64 host ([`crate::program::JitProgram`]).
//!
//! Every instruction the interpreter runs is compiled, with the interpreter's semantics
//! (RFC 9669): 32-bit results zero-extended, shift counts masked, division by zero and signed
//! `MIN / -1` without a CPU fault, `movsx`/`ldsx`, `bswap`/`le`/`be`, all atomics (fetching
//! or/and/xor through a `lock cmpxchg` loop), `ja32`, bpf-to-bpf calls on the host stack with
//! 512-byte eBPF frames in the `GuestMemory` stack, helper calls (absolute addresses baked in),
//! `callx` through `ctx.helpers`, and `bpf_tail_call` (helper 12) as a jump (see
//! [`crate::abi::TailCallTable`]).
//!
//! The output depends on the compiling host only through BMI2 (used when the host has it, since
//! x86_64 code runs where it is compiled); see `emit` for the code-quality choices.
//!
//! What it does not do: optimise across instructions (no register allocation beyond the fixed
//! mapping in [`regs`], no constant blinding) or count executed instructions (no budget: the
//! caller must not run unbounded loops it cannot afford).

mod emit;
pub mod regs;

pub use emit::TAIL_ENTRY;

use crate::{CompiledCode, JitError, JitOptions};
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::verifier::Program;

/// Compiles `prog` to x86_64 machine code; helper calls by id resolve through `helpers` (the
/// registry the program was verified against).
pub fn compile(
    prog: &Program,
    helpers: &HelperRegistry,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    emit::compile(prog, helpers, opts)
}
