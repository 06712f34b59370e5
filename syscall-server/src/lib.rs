//! # bpftime-syscall-server
//!
//! The library an unmodified eBPF loader (a libbpf tool, bpftrace, bcc) runs with
//! `LD_PRELOAD`: it answers the loader's `bpf()`, `perf_event_open`, `ioctl`, `mmap` and its
//! reads of the uprobe PMU's sysfs files in userspace, putting programs, maps, BTF, perf events
//! and links into the shared-memory store, where agents in target processes pick them up.
//! No call ever reaches the kernel's `bpf()`, and no privilege is needed.
//!
//! - [`Emulator`] is the whole emulation for one store, callable directly (the tests do):
//!   [`Emulator::bpf`], [`Emulator::perf_event_open`], [`Emulator::ioctl`],
//!   [`Emulator::mmap`], and the fd lifecycle ([`Emulator::close`], [`Emulator::dup`]).
//! - [`ffi`] holds every `extern "C"` entry the preloaded library exports (`syscall`, `ioctl`,
//!   `mmap`, `close`, `dup*`, `fcntl`, `open*`, `fopen*`), each behind `catch_unwind` and a
//!   per-thread re-entrancy guard; calls that are not ours go to the next definition
//!   (`dlsym(RTLD_NEXT)`), raw system calls to the `syscall` instruction.
//! - [`uapi`] has the kernel's structures under their kernel names.
//!
//! Emulated: `BPF_MAP_CREATE` (hash, array; names, flags, BTF ids), `BPF_MAP_LOOKUP_ELEM`,
//! `UPDATE_ELEM`, `DELETE_ELEM`, `GET_NEXT_KEY`, `FREEZE`; `BPF_PROG_LOAD` (map fd, map value
//! and `fd_array` index references rewritten to object ids, the VM's loader checks, a
//! verifier-style log); `BPF_BTF_LOAD`; `BPF_PROG_BIND_MAP`; `BPF_LINK_CREATE` for perf
//! events; `BPF_OBJ_GET_INFO_BY_FD` for maps, programs, BTF and links; `BPF_*_GET_NEXT_ID` and
//! `BPF_*_GET_FD_BY_ID`; `perf_event_open` of the uprobe PMU and of `PERF_COUNT_SW_BPF_OUTPUT`
//! software events; the perf ioctls (enable, disable, `SET_BPF`, id); `mmap` of
//! `BPF_F_MMAPABLE` arrays, of ring buffer maps (consumer page; producer page and the data
//! twice) and of BPF-output perf events (the kernel's perf ring layout); perf event array
//! updates with perf event fds; readiness of ring buffer and perf event fds for `epoll_wait`,
//! `epoll_pwait(2)`, `poll` and `ppoll` ([`epoll`]); the uprobe PMU's sysfs files.
//! Everything else fails with the kernel's errno for it (usually `EINVAL`) and a warning.
//!
//! What it does not do: run programs or attach hooks (agents do), or emulate map types the
//! store does not implement, software perf events other than `BPF_OUTPUT`, or tracepoints
//! (yet).
//!
//! Invariants:
//! - Objects are addressed by store object id; each process keeps its own fd → (kind, id)
//!   table. Every fd handed out is a real placeholder (a memfd; for ring buffer maps and
//!   BPF-output perf events a wake-up socket that epoll sees readable), so fd numbers,
//!   `close`, `dup` and `fork` behave. An fd holds one store reference; the last release removes the object
//!   and drops the references it held (a link holds its program and perf event, a program its
//!   maps). At exit, a process releases all it holds.
//! - Loader memory is untrusted: it is read and written only through fault-safe copies
//!   ([`sys`]); a bad pointer is `EFAULT`, never a crash. Errors are the kernel's errnos.
//! - Unsafe code lives only in [`sys`], [`ffi`], `selfprobe` (hooks a loader puts on itself)
//!   and `timer` (timer perf event threads).
//!
//! For bpftrace (see `docs/architecture.md`): `creds` (libc answers uid 0 inside a loader;
//! programs it execs get the agent), `selfprobe` (BEGIN/END), `kbtf` (the kernel's BTF as a
//! BTF object), `tracefs` (`available_events`, `uprobe_events`), `timer` (interval/profile).
#![deny(unsafe_code)]

mod bpf;
mod creds;
mod emu;
pub mod epoll;
pub mod ffi;
mod files;
mod kbtf;
mod log;
mod mmap;
mod perf;
mod selfprobe;
pub mod sys;
mod timer;
mod tracefs;
mod tracepoint;
pub mod uapi;

pub use emu::{Emulator, FdEntry};
pub use epoll::Armed;
pub use files::{UPROBE_PMU_TYPE, virtual_file};

use std::fmt;

/// A kernel errno (positive), as returned by an emulated call.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The symbolic name (`EINVAL`), or the number.
    pub fn name(self) -> String {
        let n = match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::ESRCH => "ESRCH",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::EMFILE => "EMFILE",
            libc::ENOTTY => "ENOTTY",
            libc::ENOSPC => "ENOSPC",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::ENOSYS => "ENOSYS",
            libc::EPROTO => "EPROTO",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            uapi::ENOTSUPP => "ENOTSUPP",
            _ => return format!("errno {}", self.0),
        };
        n.to_owned()
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::error::Error for Errno {}

/// Environment variable naming the store (`/dev/shm/bpftime-<uid>-<name>`); default `default`.
pub const STORE_ENV: &str = "BPFTIME_STORE";
/// Environment variable enabling logs to stderr (a `tracing` filter, e.g. `debug`).
pub const LOG_ENV: &str = "BPFTIME_LOG";
