//! # bpftime-agent
//!
//! Loaded into a target process (`LD_PRELOAD` by `bpftime start`, or injected by
//! `bpftime attach`), the agent opens the user's store, follows its generation counter, and
//! keeps the process's hooks equal to what the store asks for: every enabled uprobe or
//! uretprobe perf event (whose creator is alive, and whose pid filter matches this process) —
//! or point of a `uprobe_multi` link — gets a hook at the address its (binary, file offset)
//! resolves to here (a jump, or an `int3` trap where a jump cannot go), running the attached
//! programs with the kernel's `struct pt_regs` as context at the entry or at the return, with
//! their attach cookies; USDT semaphores are counted while hooked. Links that disappear (the
//! loader closed them or exited) are detached live, so `load` and `start` work in either order.
//!
//! Injected by `bpftime attach` (dlopen), it starts when the injector calls
//! `bpftime_agent_attach(store, log_level, log_file)`; `bpftime detach` asks it, through its
//! store record, to remove every hook and stop (`control`).
//!
//! The agent never writes to the target's stdout or stderr unless asked: `BPFTIME_LOG` sets the
//! level (`error`, `warn`, `info`, `debug`), `BPFTIME_LOG_FILE` a file to log to (default:
//! stderr, only when `BPFTIME_LOG` is set). `BPFTIME_STORE` names the store (`default`).
//!
//! What it does not do yet: aarch64.

pub mod agent;
mod control;
mod ffi;
pub mod log;
pub mod syscalls;

pub use agent::{Agent, AgentConfig};
