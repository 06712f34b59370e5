//! # bpftime-runtime
//!
//! The userspace backend shared by the syscall-server, the agent and the Wasm host: object
//! records in the store ([`object`]: programs after relocation, perf events, links), the
//! kernel helpers ([`helpers`]), and loading and running programs ([`prog`]).
//!
//! What it does not do: intercept syscalls (syscall-server), hook functions (attach), or decide
//! when programs run (agent).
//!
//! Invariants: records are read by copying and validating; map references in stored programs
//! are object ids, resolved per process at load; unsafe code lives in [`host`] and `exec`.

mod buffers;
mod exec;
pub mod helpers;
pub mod host;
pub mod object;
pub mod prog;
pub mod trace;

pub use exec::{HitRefused, ThreadMem, exclude_thread, probe_hit};
pub use object::RuntimeError;
pub use prog::{Engine, LoadError, LoadedProg};

/// The address ranges (start, length) holding JIT-compiled program code in this process (see
/// `bpftime_jit::exec_mem::code_ranges`); empty where programs are interpreted.
pub fn jit_code_ranges() -> Vec<(usize, usize)> {
    bpftime_jit::exec_mem::code_ranges()
}
