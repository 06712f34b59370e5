//! The syscall tracepoints the kernel defines, their ids and `format` files, and the context
//! a program attached to each receives (`include/trace/syscall.h`,
//! `kernel/trace/trace_syscalls.c`, `include/trace/events/syscalls.h`).
//!
//! The table (`generated.rs`) is produced once from a live tracefs by `gen-table.py`; the ids
//! are those of the kernel it came from (this machine's), and `tests/e2e_syscalls.rs`
//! compares every `id` and `format` file with the live tracefs when run as root. System call
//! numbers are x86_64's.

use core::mem::{offset_of, size_of};
use std::sync::OnceLock;

pub use super::generated::{RAW_SYS_ENTER_ID, RAW_SYS_EXIT_ID};

/// Set in a tracepoint perf event's id when it stands for a raw tracepoint attachment
/// (`BPF_RAW_TRACEPOINT_OPEN`, context [`RawTpCtx`]) rather than a perf tracepoint event.
pub const RAW_TP_FLAG: u64 = 1 << 32;

/// One argument of a system call as its tracepoint format lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    /// The C type, as the format file prints it (`const char *`).
    pub ty: &'static str,
    /// The argument's name (`filename`).
    pub name: &'static str,
}

/// The pair of tracepoints `syscalls:sys_enter_<name>` / `syscalls:sys_exit_<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallEvent {
    /// The name after `sys_enter_` (the kernel's `SYSCALL_DEFINE` name: `newfstat` for
    /// `fstat`).
    pub name: &'static str,
    /// The x86_64 system call number.
    pub nr: u32,
    /// Tracepoint id of `sys_enter_<name>`.
    pub enter_id: u32,
    /// Tracepoint id of `sys_exit_<name>`.
    pub exit_id: u32,
    /// The arguments, in order (at most 6).
    pub args: &'static [Arg],
}

/// Every syscall tracepoint pair, sorted by name.
pub fn events() -> &'static [SyscallEvent] {
    super::generated::EVENTS
}

/// Highest system call number the table may use, plus one.
pub const NR_MAX: usize = 512;

fn by_nr_index() -> &'static [u16; NR_MAX] {
    static INDEX: OnceLock<[u16; NR_MAX]> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut idx = [u16::MAX; NR_MAX];
        for (i, e) in events().iter().enumerate() {
            if let Some(slot) = idx.get_mut(e.nr as usize) {
                *slot = i as u16;
            }
        }
        idx
    })
}

/// The tracepoints of system call `nr`, if the kernel has them.
pub fn by_nr(nr: u64) -> Option<&'static SyscallEvent> {
    let i = *by_nr_index().get(usize::try_from(nr).ok()?)?;
    events().get(usize::from(i))
}

/// The tracepoints named `sys_enter_<name>` / `sys_exit_<name>`.
pub fn by_name(name: &str) -> Option<&'static SyscallEvent> {
    let ev = events();
    ev.binary_search_by(|e| e.name.cmp(name))
        .ok()
        .map(|i| &ev[i])
}

/// One syscall tracepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracepoint {
    /// `syscalls:sys_enter_<name>`: context [`SysEnterCtx`].
    Enter(&'static SyscallEvent),
    /// `syscalls:sys_exit_<name>`: context [`SysExitCtx`].
    Exit(&'static SyscallEvent),
    /// `raw_syscalls:sys_enter`: context [`RawSysEnterCtx`].
    RawEnter,
    /// `raw_syscalls:sys_exit`: context [`RawSysExitCtx`].
    RawExit,
}

impl Tracepoint {
    /// The tracepoint with id `id` (as in its tracefs `id` file).
    pub fn by_id(id: u64) -> Option<Tracepoint> {
        static INDEX: OnceLock<Vec<(u32, Tracepoint)>> = OnceLock::new();
        let index = INDEX.get_or_init(|| {
            let mut v: Vec<(u32, Tracepoint)> = events()
                .iter()
                .flat_map(|e| {
                    [
                        (e.enter_id, Tracepoint::Enter(e)),
                        (e.exit_id, Tracepoint::Exit(e)),
                    ]
                })
                .collect();
            v.push((RAW_SYS_ENTER_ID, Tracepoint::RawEnter));
            v.push((RAW_SYS_EXIT_ID, Tracepoint::RawExit));
            v.sort_by_key(|x| x.0);
            v
        });
        let id = u32::try_from(id).ok()?;
        index
            .binary_search_by_key(&id, |x| x.0)
            .ok()
            .map(|i| index[i].1)
    }

    /// The tracepoint `category:name` (`syscalls:sys_enter_openat`, `raw_syscalls:sys_exit`).
    pub fn by_path(category: &str, name: &str) -> Option<Tracepoint> {
        match category {
            "raw_syscalls" => match name {
                "sys_enter" => Some(Tracepoint::RawEnter),
                "sys_exit" => Some(Tracepoint::RawExit),
                _ => None,
            },
            "syscalls" => {
                if let Some(n) = name.strip_prefix("sys_enter_") {
                    by_name(n).map(Tracepoint::Enter)
                } else if let Some(n) = name.strip_prefix("sys_exit_") {
                    by_name(n).map(Tracepoint::Exit)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// The raw tracepoint (`BPF_RAW_TRACEPOINT_OPEN` name) `sys_enter` / `sys_exit`.
    pub fn raw_by_name(name: &str) -> Option<Tracepoint> {
        Tracepoint::by_path("raw_syscalls", name)
    }

    /// Its id.
    pub fn id(self) -> u32 {
        match self {
            Tracepoint::Enter(e) => e.enter_id,
            Tracepoint::Exit(e) => e.exit_id,
            Tracepoint::RawEnter => RAW_SYS_ENTER_ID,
            Tracepoint::RawExit => RAW_SYS_EXIT_ID,
        }
    }

    /// `category:name`.
    pub fn name(self) -> String {
        match self {
            Tracepoint::Enter(e) => format!("syscalls:sys_enter_{}", e.name),
            Tracepoint::Exit(e) => format!("syscalls:sys_exit_{}", e.name),
            Tracepoint::RawEnter => "raw_syscalls:sys_enter".into(),
            Tracepoint::RawExit => "raw_syscalls:sys_exit".into(),
        }
    }

    /// Bytes of the context a program receives.
    pub fn ctx_len(self) -> usize {
        match self {
            Tracepoint::Enter(_) => size_of::<SysEnterCtx>(),
            Tracepoint::Exit(_) => size_of::<SysExitCtx>(),
            Tracepoint::RawEnter => size_of::<RawSysEnterCtx>(),
            Tracepoint::RawExit => size_of::<RawSysExitCtx>(),
        }
    }

    /// The text of its tracefs `format` file, byte for byte as the kernel prints it.
    pub fn format(self) -> String {
        let mut s = String::new();
        let short = self.name();
        let short = short.split(':').nth(1).unwrap_or_default();
        s.push_str(&format!("name: {short}\nID: {}\nformat:\n", self.id()));
        let field = |s: &mut String, ty: &str, name: &str, off: usize, size: usize, signed: u8| {
            s.push_str(&format!(
                "\tfield:{ty} {name};\toffset:{off};\tsize:{size};\tsigned:{signed};\n"
            ));
        };
        field(&mut s, "unsigned short", "common_type", 0, 2, 0);
        field(&mut s, "unsigned char", "common_flags", 2, 1, 0);
        field(&mut s, "unsigned char", "common_preempt_count", 3, 1, 0);
        field(&mut s, "int", "common_pid", 4, 4, 1);
        s.push('\n');
        match self {
            Tracepoint::Enter(e) => {
                field(&mut s, "int", "__syscall_nr", 8, 4, 1);
                for (i, a) in e.args.iter().enumerate() {
                    field(&mut s, a.ty, a.name, 16 + 8 * i, 8, 0);
                }
                let names: Vec<String> = e
                    .args
                    .iter()
                    .map(|a| format!("{}: 0x%08lx", a.name))
                    .collect();
                let vals: String = e
                    .args
                    .iter()
                    .map(|a| format!(", ((unsigned long)(REC->{}))", a.name))
                    .collect();
                s.push_str(&format!("\nprint fmt: \"{}\"{vals}\n", names.join(", ")));
            }
            Tracepoint::Exit(_) => {
                field(&mut s, "int", "__syscall_nr", 8, 4, 1);
                field(&mut s, "long", "ret", 16, 8, 1);
                s.push_str("\nprint fmt: \"0x%lx\", REC->ret\n");
            }
            Tracepoint::RawEnter => {
                field(&mut s, "long", "id", 8, 8, 1);
                field(&mut s, "unsigned long", "args[6]", 16, 48, 0);
                s.push_str(concat!(
                    "\nprint fmt: \"NR %ld (%lx, %lx, %lx, %lx, %lx, %lx)\", REC->id, ",
                    "REC->args[0], REC->args[1], REC->args[2], REC->args[3], REC->args[4], ",
                    "REC->args[5]\n"
                ));
            }
            Tracepoint::RawExit => {
                field(&mut s, "long", "id", 8, 8, 1);
                field(&mut s, "long", "ret", 16, 8, 1);
                s.push_str("\nprint fmt: \"NR %ld = %ld\", REC->id, REC->ret\n");
            }
        }
        s
    }
}

/// `struct trace_entry`: the 8-byte header of every tracepoint record.
///
/// The kernel's BPF path overwrites these 8 bytes with a `struct pt_regs *` before running a
/// program (`perf_call_bpf_enter`, `perf_trace_run_bpf_submit`); we keep the header the format
/// file describes: the tracepoint id, zero flags and preempt count, the calling thread's id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TraceEntry {
    /// The tracepoint id.
    pub common_type: u16,
    /// `TRACE_FLAG_*`; 0.
    pub common_flags: u8,
    /// 0 (user context).
    pub common_preempt_count: u8,
    /// The thread id.
    pub common_pid: i32,
}

/// The context of `syscalls:sys_enter_<name>` (`struct syscall_trace_enter`): all six argument
/// registers are filled (the format lists only the call's own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SysEnterCtx {
    /// Header.
    pub ent: TraceEntry,
    /// `__syscall_nr`.
    pub nr: i32,
    /// Padding to the 8-byte aligned arguments.
    pub pad: u32,
    /// Arguments (`rdi, rsi, rdx, r10, r8, r9`).
    pub args: [u64; 6],
}

/// The context of `syscalls:sys_exit_<name>` (`struct syscall_trace_exit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SysExitCtx {
    /// Header.
    pub ent: TraceEntry,
    /// `__syscall_nr`.
    pub nr: i32,
    /// Padding.
    pub pad: u32,
    /// The result (a negative errno on failure).
    pub ret: i64,
}

/// The context of `raw_syscalls:sys_enter` (`TRACE_EVENT(sys_enter)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawSysEnterCtx {
    /// Header.
    pub ent: TraceEntry,
    /// The system call number.
    pub id: i64,
    /// Arguments.
    pub args: [u64; 6],
}

/// The context of `raw_syscalls:sys_exit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawSysExitCtx {
    /// Header.
    pub ent: TraceEntry,
    /// The system call number.
    pub id: i64,
    /// The result.
    pub ret: i64,
}

const _: () = assert!(size_of::<TraceEntry>() == 8);
const _: () = assert!(offset_of!(SysEnterCtx, nr) == 8 && offset_of!(SysEnterCtx, args) == 16);
const _: () = assert!(offset_of!(SysExitCtx, nr) == 8 && offset_of!(SysExitCtx, ret) == 16);
const _: () = assert!(offset_of!(RawSysEnterCtx, id) == 8 && size_of::<RawSysEnterCtx>() == 64);
const _: () = assert!(offset_of!(RawSysExitCtx, ret) == 16 && size_of::<RawSysExitCtx>() == 24);

/// The raw tracepoint context (`BPF_PROG_TYPE_RAW_TRACEPOINT`, `struct bpf_raw_tracepoint_args`)
/// of `sys_enter(struct pt_regs *regs, long id)` and `sys_exit(struct pt_regs *regs, long ret)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawTpCtx {
    /// `args[0]`: address of the caller's `struct pt_regs`; `args[1]`: the number (enter) or
    /// the result (exit).
    pub args: [u64; 2],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openat_has_its_x86_64_number_and_arguments() {
        let e = by_name("openat").unwrap();
        assert_eq!(e.nr, 257);
        assert_eq!(by_nr(257), Some(e));
        let names: Vec<&str> = e.args.iter().map(|a| a.name).collect();
        assert_eq!(names, ["dfd", "filename", "flags", "mode"]);
        assert_eq!(
            Tracepoint::by_id(u64::from(e.enter_id)),
            Some(Tracepoint::Enter(e))
        );
        assert_eq!(
            Tracepoint::by_path("syscalls", "sys_exit_openat"),
            Some(Tracepoint::Exit(e))
        );
        assert_eq!(by_name("newfstat").map(|e| e.nr), Some(5));
        assert!(by_name("no_such_call").is_none() && Tracepoint::by_id(1 << 40).is_none());
    }

    #[test]
    fn format_text_matches_the_kernels_shape() {
        let f = Tracepoint::Enter(by_name("getpid").unwrap()).format();
        assert!(f.starts_with("name: sys_enter_getpid\nID: "));
        assert!(f.ends_with(
            "\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\nprint fmt: \"\"\n"
        ));
        let raw = Tracepoint::RawEnter.format();
        assert!(raw.contains("\tfield:unsigned long args[6];\toffset:16;\tsize:48;\tsigned:0;\n"));
    }

    #[test]
    fn every_number_and_id_is_unique() {
        let mut nrs: Vec<u32> = events().iter().map(|e| e.nr).collect();
        let mut ids: Vec<u32> = events()
            .iter()
            .flat_map(|e| [e.enter_id, e.exit_id])
            .collect();
        ids.extend([RAW_SYS_ENTER_ID, RAW_SYS_EXIT_ID]);
        let (n, m) = (nrs.len(), ids.len());
        nrs.sort_unstable();
        nrs.dedup();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!((nrs.len(), ids.len()), (n, m));
        assert!(nrs.iter().all(|&n| (n as usize) < NR_MAX));
        assert!(events().windows(2).all(|w| w[0].name < w[1].name));
    }
}
