//! Syscall tracepoints in userspace, without privileges.
//!
//! - [`table`]: the kernel's `syscalls:sys_{enter,exit}_<name>` and `raw_syscalls:sys_{enter,
//!   exit}` tracepoints — ids, `format` files, x86_64 numbers — and the contexts programs
//!   attached to them receive.
//! - [`sites`]: the `syscall` instructions of an executable object and the bytes around each
//!   that a jump can replace.
//! - [`intercept`] (x86_64): patches those sites with jumps to per-site stubs that call one
//!   process-wide *gate*; the gate calls the enter handler (which may skip the call and set its
//!   result), makes the system call itself, and calls the exit handler with the result.
//! - [`dispatch`] (x86_64): the catch-all for `syscall` instructions no patch covers (the
//!   vDSO, anonymous code, sites too short to patch): Syscall User Dispatch traps them into a
//!   `SIGSYS` handler that calls the same handlers around the call.
//!
//! See `docs/architecture.md` ("Syscall tracepoints") for the mechanism and its limits.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
pub mod dispatch;
mod generated;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
pub mod intercept;
pub mod sites;
pub mod table;

pub use table::{SyscallEvent, Tracepoint};
