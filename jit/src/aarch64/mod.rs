//! The aarch64 backend: compiles a verified eBPF program to AArch64 (ARMv8.1-A: the atomics
//! use LSE) machine code with dynasm-rs, on any host.
//!
//! What it does: the whole ISA the interpreter runs — ALU32/64 with RFC 9669 division, modulo
//! and shift semantics, `movsx`, byte swaps, `lddw`, loads and stores of every size (sign-
//! extending too), the atomics with and without `FETCH`, `xchg` and `cmpxchg`, `ja`/`gotol`,
//! conditional jumps, helper calls by id and through `callx`, bpf-to-bpf calls, and checked
//! mode with the interpreter's traps. The calling convention and context are those of
//! [`crate::abi`]; registers are assigned in [`regs`].
//!
//! Checked mode tests each access inline against the host's fast region and the eBPF stack
//! (accesses through r10 with a constant offset need no test: the loader proved them), and
//! calls `ctx.check` from an out-of-line stub otherwise; atomics then test alignment.
//!
//! `bpf_tail_call` (helper 12) follows [`crate::abi`]: a jump to the target's [`TAIL_ENTRY`]
//! through `ctx.tail_tables`, at most [`crate::abi::MAX_TAIL_CALLS`] per run.
//!
//! What it does not do: run the code (it is bytes; the caller maps it executable on an aarch64
//! host, or emulates it — see `jit/tests/support_aarch64/`) or instruction budgets.
//!
//! Invariants: the generated code touches only the eBPF stack through r10, memory the program
//! addresses (checked first in checked mode), the [`crate::abi::JitContext`] and the helper
//! env; it keeps the AAPCS64 callee-saved registers and returns on every path, traps included
//! (unwinding to the native stack pointer saved in the context).

mod emit;
pub mod regs;

pub use emit::{HelperAddr, TAIL_ENTRY};

use crate::{CompiledCode, JitError, JitOptions};
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::verifier::Program;

/// Compiles `prog`; helper calls go to the helpers' host function pointers.
pub fn compile(
    prog: &Program,
    helpers: &HelperRegistry,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    compile_with(prog, helpers, &|_, h| h.func as usize as u64, opts)
}

/// Compiles `prog` with helper `id` called at `helper_addr(id, helper)` instead of its host
/// function pointer (for running the code under emulation, where host addresses mean
/// nothing). `may_stop` still comes from `helpers`.
pub fn compile_with(
    prog: &Program,
    helpers: &HelperRegistry,
    helper_addr: HelperAddr<'_>,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    emit::Emitter::new(prog, helpers, helper_addr, opts).compile()
}
