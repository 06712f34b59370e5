//! # bpftime-attach
//!
//! Attaches code to instructions of the process this library runs in: the x86_64 inline-hook
//! engine behind bpftime's userspace uprobes, and the mapping from a uprobe target as the kernel
//! receives it — (binary path, file offset) — to an address in this process.
//!
//! - [`install`] decodes the first instructions at an address (iced-x86), relocates them into a
//!   trampoline (iced-x86's `BlockEncoder` fixes RIP-relative operands and branches), builds a
//!   stub that saves every general-purpose register, the flags and xmm0–xmm15 into the kernel's
//!   x86_64 [`PtRegs`] layout, calls a [`HookHandler`], restores the (possibly modified)
//!   registers and continues in the trampoline; then it patches a `jmp rel32` (or a 14-byte
//!   absolute jump when no memory within ±2 GiB is free) over the start of the function.
//!   [`Hook::remove`] (or dropping the [`Hook`]) restores the original bytes.
//! - [`resolve`] maps (path, file offset) to a runtime address through `/proc/self/maps`, and an
//!   ELF symbol to its file offset through the program headers (goblin), as libbpf does.
//! - [`aarch64`] generates the same kind of hook for aarch64 code as pure functions of bytes and
//!   addresses (relocator, stub building [`aarch64::PtRegsArm64`], entry patch); it is built
//!   and tested (under emulation) on every host, and nothing installs it in a process yet.
//!
//! - [`install_probe`] is the general form: entry and return handlers (uretprobes: return
//!   trampolines, a per-thread shadow stack, unwind information for them), and the trap-based
//!   fallback (`int3` + a `SIGTRAP` handler + out-of-line execution) where a jump cannot go.
//!
//! It does not run eBPF programs: the handlers are plain native code.
//!
//! ## Invariants
//!
//! - Executable memory this crate allocates is never writable and executable at once: it is
//!   mapped read-write, written, then made read-execute. Patched text pages are made writable
//!   only for the duration of a patch and get their original protection back.
//! - A thread running the hooked function while it is patched or restored sees either the old
//!   or the new instruction, never a torn one: the jump is written with one atomic 8- or 16-byte
//!   store when it fits in an aligned block, else with the int3 protocol (int3 first, then the
//!   tail, then the first byte) and a `SIGTRAP` handler that sends trapping threads to the stub.
//! - A thread suspended inside the patched bytes (between two instructions of a multi-instruction
//!   prologue) is moved to the matching instruction of the trampoline, in a short "stop the
//!   world" in which every other thread waits in a real-time signal handler (see the `signals`
//!   module). A thread that has entered the stub but not yet been counted when a hook is
//!   removed sees the hook's removed flag once counted and goes back to the original code.
//! - When [`Hook::remove`] returns, no thread is running or will run the handler for that hook.
//!   Stubs and trampolines are never unmapped: a preempted thread may still be executing their
//!   last instructions.
//! - The hit path takes no lock, allocates nothing and makes no system call.
//!
//! Everything `unsafe` lives in the modules `x86_64::hook`, `x86_64::code_mem`,
//! `x86_64::patch` and `x86_64::signals`; each states its invariants at the top.

#![deny(unsafe_code)]

pub mod aarch64;
pub mod error;
pub mod procmaps;
pub mod regs;
pub mod resolve;
pub mod syscall;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod x86_64;

pub use error::AttachError;
pub use regs::PtRegs;
pub use resolve::{
    find_symbol_in_process, function_containing, function_ranges, resolve_file_offset,
    resolve_file_offset_writable, symbol_file_offset,
};
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub use x86_64::{
    FuncBounds, Hook, HookHandler, HookKind, NATIVE_NOT_RUN, NATIVE_RAN, NATIVE_TRAPPED,
    NativeEntry, NativeOutcome, PatchMode, Probe, install, install_probe,
    set_native_excluded_thread,
};
