//! # bpftime-jit
//!
//! Compiles a verified eBPF [`Program`] to native code for x86_64 (run natively) and aarch64
//! (emitted on any host; executed under emulation in tests). Both backends follow the contract
//! in [`abi`]: same calling convention, same `GuestMemory` stack as the interpreter, same traps.
//!
//! Invariants: executable memory is never writable and executable at once (map RW → emit →
//! mprotect RX, checked → icache flush on aarch64 → unmap on drop); a compile failure is a
//! [`JitError`], never a panic; the JIT and the interpreter return the same result and the same
//! [`bpftime_vm::interpreter::Trap`] for the same program and memory.

pub mod abi;
pub mod exec_mem;
#[cfg(target_arch = "x86_64")]
pub mod program;

#[cfg(target_arch = "x86_64")]
pub use program::{JitProgram, ProgArray};

use bpftime_vm::verifier::Program;

/// Target architecture of generated code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86_64 (System V ABI).
    X86_64,
    /// aarch64 (AAPCS64).
    Aarch64,
}

/// Compilation options.
#[derive(Clone, Debug, Default)]
pub struct JitOptions {
    /// Check every memory access like the interpreter does (see [`abi`]); off: trust the
    /// program (no per-access cost).
    pub checked: bool,
}

/// Machine code for one program.
#[derive(Clone, Debug)]
pub struct CompiledCode {
    /// Target.
    pub arch: Arch,
    /// The code (position-independent except for absolute helper addresses baked in).
    pub code: Vec<u8>,
    /// Offset of the entry point ([`abi::JitEntry`]) in `code`.
    pub entry: usize,
    /// Code offset of each eBPF slot (`u32::MAX` for the second slot of `lddw`).
    pub insn_offsets: Vec<u32>,
}

/// Why a program could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    /// An instruction this backend cannot compile.
    #[error("pc {pc}: {what} is not supported by the {arch:?} JIT")]
    Unsupported {
        /// Slot.
        pc: usize,
        /// What.
        what: String,
        /// Backend.
        arch: Arch,
    },
    /// The assembler failed.
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// Executable memory could not be set up.
    #[error("executable memory: {0}")]
    Memory(#[from] std::io::Error),
}

/// Compiles `prog` for `arch`; helper calls by id resolve through `helpers`.
pub fn compile(
    arch: Arch,
    prog: &Program,
    helpers: &bpftime_vm::helper::HelperRegistry,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    match arch {
        Arch::X86_64 => x86_64::compile(prog, helpers, opts),
        Arch::Aarch64 => aarch64::compile(prog, helpers, opts),
    }
}

pub mod aarch64;
pub mod x86_64;
