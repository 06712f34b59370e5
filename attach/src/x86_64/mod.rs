//! The x86_64 hook engine: decode → relocate → stub + trampoline → patch.
//!
//! - `prologue`: which instructions the jump overwrites and whether they can move (pure).
//! - `stub`: the code that builds `pt_regs`, calls the handler and runs the relocated
//!   instructions (pure, iced-x86's `CodeAssembler` and `BlockEncoder`).
//! - `code_mem`: memory for that code near the target (unsafe).
//! - `patch`: atomic writes to text (unsafe).
//! - `signals`: the `SIGTRAP` redirection and the stop-the-world step (unsafe).
//! - `hook`: [`install`] and [`Hook`], the order of the steps.

#[allow(unsafe_code)]
pub(crate) mod code_mem;
#[allow(unsafe_code)]
pub(crate) mod hook;
#[allow(unsafe_code)]
pub(crate) mod patch;
mod prologue;
#[allow(unsafe_code)]
pub(crate) mod signals;
mod stub;

pub use hook::{Hook, HookHandler, install};

/// How many times a thread was moved out of code being patched (into a trampoline on install,
/// back to the original code on removal) since the process started. For tests and diagnostics.
#[doc(hidden)]
pub fn fixups_applied() -> u64 {
    signals::fixups_applied()
}
