//! The x86_64 hook engine: decode → relocate → stub + trampoline → patch.
//!
//! - `prologue`: which instructions the jump overwrites and whether they can move (pure).
//! - `stub`: the code that builds `pt_regs`, calls the handler and runs the relocated
//!   instructions (pure, iced-x86's `CodeAssembler` and `BlockEncoder`).
//! - `code_mem`: memory for that code near the target (unsafe).
//! - `patch`: atomic writes to text (unsafe).
//! - `signals`: the `SIGTRAP` handler (patch-time redirection, trap probes, chaining to the
//!   application's handler) and the stop-the-world step (unsafe).
//! - `trap`: trap-based probes, int3 + out-of-line execution (unsafe).
//! - `retprobe`: return trampolines, per-thread pending returns, their unwind info (unsafe).
//! - `threads`: per-thread records generated code finds from `fs:[0]` (unsafe).
//! - `hook`: [`install_probe`] and [`Hook`], the order of the steps.

#[allow(unsafe_code)]
pub(crate) mod code_mem;
#[allow(unsafe_code)]
pub(crate) mod hook;
#[allow(unsafe_code)]
pub(crate) mod patch;
mod prologue;
#[allow(unsafe_code)]
mod retprobe;
#[allow(unsafe_code)]
pub(crate) mod signals;
mod stub;
#[allow(unsafe_code)]
pub(crate) mod threads;
#[allow(unsafe_code)]
mod trap;

pub use code_mem::own_code_ranges;
pub use hook::{
    FuncBounds, Hook, HookHandler, HookKind, NATIVE_NOT_RUN, NATIVE_RAN, NATIVE_TRAPPED,
    NativeEntry, NativeOutcome, PatchMode, Probe, install, install_probe, override_return,
    set_native_excluded_thread,
};
pub use signals::{intercept_sigaction, is_own_handler, recheck_trap_handler};
pub use threads::{NativeBusy, thread_is_busy};

/// Return probes skipped since the process started: a thread already had 64 returns pending
/// (the kernel's `MAX_URETPROBE_DEPTH` too), or 256 threads had returns pending at once.
pub fn missed_returns() -> u64 {
    retprobe::missed()
}

/// How many returns the calling thread has pending (for tests and diagnostics).
#[doc(hidden)]
pub fn pending_returns() -> u32 {
    retprobe::pending()
}

/// How many times a thread was moved out of code being patched (into a trampoline on install,
/// back to the original code on removal) since the process started. For tests and diagnostics.
#[doc(hidden)]
pub fn fixups_applied() -> u64 {
    signals::fixups_applied()
}
