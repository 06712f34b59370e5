//! # bpftime-agent
//!
//! Loaded into a target process (`LD_PRELOAD` by `bpftime start`, or injected by
//! `bpftime attach`), the agent opens the user's store, follows its generation counter, and
//! keeps the process's hooks equal to what the store asks for: every enabled uprobe perf event
//! (whose creator is alive, and whose pid filter matches this process) gets an inline hook at
//! the address its (binary, file offset) resolves to here, running the attached programs with
//! the kernel's `struct pt_regs` as context. Links that disappear (the loader closed them or
//! exited) are detached live, so `load` and `start` work in either order.
//!
//! Injected by `bpftime attach` (dlopen), it starts when the injector calls
//! `bpftime_agent_attach(store, log_level, log_file)`; `bpftime detach` asks it, through its
//! store record, to remove every hook and stop (`control`).
//!
//! The agent never writes to the target's stdout or stderr unless asked: `BPFTIME_LOG` sets the
//! level (`error`, `warn`, `info`, `debug`), `BPFTIME_LOG_FILE` a file to log to (default:
//! stderr, only when `BPFTIME_LOG` is set). `BPFTIME_STORE` names the store (`default`).
//!
//! What it does not do yet: uretprobes, syscall tracepoints, the JIT (programs run on the
//! interpreter), aarch64.

pub mod agent;
mod control;
mod ffi;
pub mod syscalls;
pub mod log;

pub use agent::{Agent, AgentConfig};
