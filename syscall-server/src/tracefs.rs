//! tracefs files for dynamic probes, served from memory, and the text interface for uprobes.
//!
//! bcc's `bpf_detach_probe` (used by bpftrace 0.17 and bcc for every uprobe they detach) reads
//! `uprobe_events` to see whether the probe was made there and only then writes a `-:` line; an
//! unprivileged user cannot open the real file, so detaching would fail with
//! "open(.../uprobe_events): Permission denied".
//!
//! `uprobe_events` is emulated per process: a loader that cannot use the uprobe PMU (bpftrace
//! and bcc fall back to this without `CAP_SYS_ADMIN`) opens it for writing, writes
//! `p[:[GROUP/]EVENT] PATH:OFFSET` (or `r:` for a return probe, `-:[GROUP/]EVENT` to remove),
//! and closes it; then it reads `events/GROUP/EVENT/id` and calls
//! `perf_event_open(PERF_TYPE_TRACEPOINT, config = id)`, which makes a uprobe perf event for
//! (PATH, OFFSET) in the store (`tracepoint.rs`). The lines are applied when the fd is closed
//! (a write cannot fail early: a malformed line makes `close` fail with `EINVAL`); reading the
//! file lists the events in the kernel's `p:GROUP/EVENT PATH:0xOFFSET` form. Fetch arguments
//! after the location are accepted and ignored (programs read registers, not them).
//!
//! `available_events` lists the tracepoints the emulation has (the syscall tracepoints of
//! `bpftime_attach::syscall::table`, `raw_syscalls:sys_{enter,exit}` and the uprobe events made
//! here), in the kernel's `category:name` lines: bpftrace reads it to check and expand
//! `tracepoint:` probes before it reads their `format` files.

use crate::Errno;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::RawFd;

/// Ids of uprobe events made through `uprobe_events` start here (syscall tracepoint ids are
/// small numbers).
pub const DYN_ID_BASE: u32 = 0x4000_0000;

/// A uprobe event made through `uprobe_events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynEvent {
    /// `GROUP/EVENT`.
    pub group: String,
    /// Event name.
    pub name: String,
    /// The probed binary.
    pub path: String,
    /// File offset.
    pub offset: u64,
    /// `r:` (a return probe).
    pub retprobe: bool,
    /// Its tracepoint id.
    pub id: u32,
}

struct Dyn {
    events: Vec<DynEvent>,
    next_id: u32,
    /// fd → (device, inode) of the memfds open for writing `uprobe_events`.
    writers: HashMap<RawFd, (u64, u64)>,
    /// Texts served for files whose content changes, kept for the life of the process.
    texts: HashMap<Vec<u8>, &'static [u8]>,
}

static DYN: Mutex<Option<Dyn>> = Mutex::new(None);

fn with_dyn<R>(f: impl FnOnce(&mut Dyn) -> R) -> R {
    let mut g = DYN.lock();
    let d = g.get_or_insert_with(|| Dyn {
        events: Vec::new(),
        next_id: DYN_ID_BASE,
        writers: HashMap::new(),
        texts: HashMap::new(),
    });
    f(d)
}

/// The uprobe event with tracepoint id `id`, if one was made through `uprobe_events`.
pub fn dyn_uprobe(id: u64) -> Option<DynEvent> {
    if id < u64::from(DYN_ID_BASE) {
        return None;
    }
    with_dyn(|d| d.events.iter().find(|e| u64::from(e.id) == id).cloned())
}

/// Environment variable hiding the uprobe PMU from loaders (`1`), so they use `uprobe_events`.
pub const NO_PMU_ENV: &str = "BPFTIME_NO_UPROBE_PMU";

/// The uprobe PMU's `type` file.
pub const UPROBE_PMU_TYPE_FILE: &str = "/sys/bus/event_source/devices/uprobe/type";

/// Whether `path` is the uprobe PMU's `type` file and [`NO_PMU_ENV`] hides it.
pub fn pmu_hidden(path: &[u8]) -> bool {
    path == UPROBE_PMU_TYPE_FILE.as_bytes()
        && std::env::var_os(NO_PMU_ENV).is_some_and(|v| v == "1")
}

/// Whether `path` is a tracefs `uprobe_events` file.
pub fn is_uprobe_events(path: &[u8]) -> bool {
    TRACEFS
        .iter()
        .any(|m| path.strip_prefix(m.as_bytes()) == Some(b"uprobe_events".as_slice()))
}

/// Opens `uprobe_events` for writing: a memfd whose content is applied at close.
pub fn open_writer(cloexec: bool) -> Result<RawFd, Errno> {
    use std::os::fd::IntoRawFd as _;
    let fd = crate::sys::memfd("bpftime-uprobe_events", cloexec, false)?.into_raw_fd();
    let ident = crate::sys::fd_identity(fd).ok_or(Errno(libc::EBADF))?;
    with_dyn(|d| d.writers.insert(fd, ident));
    Ok(fd)
}

/// Whether `fd` is an `uprobe_events` writer of ours.
pub fn is_writer(fd: RawFd) -> bool {
    DYN.lock().as_ref().is_some_and(|d| {
        d.writers
            .get(&fd)
            .is_some_and(|&i| crate::sys::fd_identity(fd) == Some(i))
    })
}

/// Before `close(fd)` of a writer: applies what was written. `Err(EINVAL)` for a malformed
/// line, `ENOENT` for removing an unknown event (the lines before it stay applied).
pub fn close_writer(fd: RawFd) -> Result<(), Errno> {
    with_dyn(|d| d.writers.remove(&fd));
    let text = std::fs::read(format!("/proc/self/fd/{fd}"))
        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let text = String::from_utf8(text).map_err(|_| Errno(libc::EINVAL))?;
    for line in text.lines() {
        apply(line)?;
    }
    Ok(())
}

/// Applies one `uprobe_events` line (see the module docs).
pub fn apply(line: &str) -> Result<(), Errno> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(());
    }
    let inval = || Errno(libc::EINVAL);
    let mut words = line.split_whitespace();
    let head = words.next().ok_or_else(inval)?;
    let (kind, name) = match head.split_once(':') {
        Some((k, n)) => (k, Some(n)),
        None => (head, None),
    };
    let split_name = |n: &str| -> Result<(String, String), Errno> {
        let (g, e) = n.split_once('/').unwrap_or(("uprobes", n));
        let ok =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok(g) || !ok(e) {
            return Err(inval());
        }
        Ok((g.to_owned(), e.to_owned()))
    };
    match kind {
        "-" => {
            let (g, e) = split_name(name.ok_or_else(inval)?)?;
            with_dyn(|d| {
                let before = d.events.len();
                d.events.retain(|x| !(x.group == g && x.name == e));
                if d.events.len() == before {
                    Err(Errno(libc::ENOENT))
                } else {
                    Ok(())
                }
            })
        }
        "p" | "r" => {
            let loc = words.next().ok_or_else(inval)?;
            let (path, off) = loc.rsplit_once(':').ok_or_else(inval)?;
            let off = off.split('(').next().unwrap_or(off);
            let offset = match off.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => off.parse(),
            }
            .map_err(|_| inval())?;
            if !path.starts_with('/') {
                return Err(inval());
            }
            let file = path.rsplit('/').next().unwrap_or(path);
            let auto: String = format!("{kind}_{file}_0x{offset:x}")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let (group, name) = match name {
                Some(n) if !n.is_empty() => split_name(n)?,
                _ => ("uprobes".to_owned(), auto),
            };
            with_dyn(|d| {
                if d.events.iter().any(|x| x.group == group && x.name == name) {
                    return Err(Errno(libc::EEXIST));
                }
                let id = d.next_id;
                d.next_id += 1;
                d.events.push(DynEvent {
                    group,
                    name,
                    path: path.to_owned(),
                    offset,
                    retprobe: kind == "r",
                    id,
                });
                Ok(())
            })
        }
        _ => Err(inval()),
    }
}

/// A text that may change, leaked once per distinct content.
fn keep(d: &mut Dyn, text: String) -> &'static [u8] {
    let key = text.into_bytes();
    if let Some(t) = d.texts.get(&key) {
        return t;
    }
    let leaked: &'static [u8] = Box::leak(key.clone().into_boxed_slice());
    d.texts.insert(key, leaked);
    leaked
}

fn uprobe_events_text() -> &'static [u8] {
    with_dyn(|d| {
        let mut t = String::new();
        for e in &d.events {
            let k = if e.retprobe { 'r' } else { 'p' };
            t.push_str(&format!(
                "{k}:{}/{} {}:0x{:016x}\n",
                e.group, e.name, e.path, e.offset
            ));
        }
        keep(d, t)
    })
}

/// `events/GROUP/EVENT/{id,format}` of an event made here.
fn dyn_event_file(rest: &[u8]) -> Option<&'static [u8]> {
    let rest = std::str::from_utf8(rest.strip_prefix(b"events/")?).ok()?;
    let mut parts = rest.split('/');
    let (g, n, f) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    with_dyn(|d| {
        let e = d
            .events
            .iter()
            .find(|e| e.group == g && e.name == n)?
            .clone();
        let text = match f {
            "id" => format!("{}\n", e.id),
            "format" => format!(
                "name: {}\nID: {}\nformat:\n\
                 \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
                 \tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
                 \tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
                 \tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n\n\
                 print fmt: \"(%lx)\", REC->__probe_ip\n",
                e.name, e.id
            ),
            _ => return None,
        };
        Some(keep(d, text))
    })
}

/// Mount points of tracefs that loaders use.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing/", "/sys/kernel/debug/tracing/"];

/// The content of a dynamic-probe tracefs file we serve, if `path` is one.
pub fn file(path: &[u8]) -> Option<&'static [u8]> {
    let rest = TRACEFS
        .iter()
        .find_map(|m| path.strip_prefix(m.as_bytes()))?;
    match rest {
        b"uprobe_events" => Some(uprobe_events_text()),
        b"available_events" => Some(available_events()),
        _ => dyn_event_file(rest),
    }
}

/// The `available_events` text: the syscall tracepoints (made once) and the uprobe events.
fn available_events() -> &'static [u8] {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let fixed = TEXT.get_or_init(|| {
        let mut t = String::from("raw_syscalls:sys_exit\nraw_syscalls:sys_enter\n");
        for e in bpftime_attach::syscall::table::events() {
            t.push_str(&format!(
                "syscalls:sys_exit_{0}\nsyscalls:sys_enter_{0}\n",
                e.name
            ));
        }
        t
    });
    with_dyn(|d| {
        if d.events.is_empty() {
            return fixed.as_bytes();
        }
        let mut t = fixed.clone();
        for e in &d.events {
            t.push_str(&format!("{}:{}\n", e.group, e.name));
        }
        keep(d, t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uprobe_events_is_served_at_both_mount_points() {
        assert!(file(b"/sys/kernel/tracing/uprobe_events").is_some());
        assert!(file(b"/sys/kernel/debug/tracing/uprobe_events").is_some());
        assert!(file(b"/sys/kernel/tracing/kprobe_events").is_none());
        assert!(file(b"/sys/kernel/tracing/uprobe_events/x").is_none());
    }

    #[test]
    fn available_events_lists_the_syscall_tracepoints() {
        let t =
            std::str::from_utf8(file(b"/sys/kernel/tracing/available_events").unwrap()).unwrap();
        assert!(t.lines().any(|l| l == "syscalls:sys_enter_openat"));
        assert!(t.lines().any(|l| l == "syscalls:sys_exit_getppid"));
        assert!(t.lines().any(|l| l == "raw_syscalls:sys_enter"));
        assert!(t.lines().all(|l| l.split(':').count() == 2));
    }
}

#[cfg(test)]
mod uprobe_events_tests {
    use super::*;

    #[test]
    fn uprobe_events_lines_make_and_remove_events() {
        apply("p:uprobes/bt_t1 /usr/bin/true:0x1540").unwrap();
        apply("r:mygrp/ret1 /usr/bin/true:0x20 arg1=%di").unwrap();
        apply("p /usr/bin/true:64").unwrap();
        assert_eq!(
            apply("p:uprobes/bt_t1 /usr/bin/true:0x1540"),
            Err(Errno(libc::EEXIST))
        );
        for bad in [
            "x:foo /bin/true:1",
            "p:uprobes/a relative:1",
            "p:a /bin/true:zz",
            "p:a/b/c /x:1",
        ] {
            assert_eq!(apply(bad), Err(Errno(libc::EINVAL)), "{bad}");
        }
        let list =
            std::str::from_utf8(file(b"/sys/kernel/tracing/uprobe_events").unwrap()).unwrap();
        assert!(
            list.contains("p:uprobes/bt_t1 /usr/bin/true:0x0000000000001540\n"),
            "{list}"
        );
        assert!(
            list.contains("r:mygrp/ret1 /usr/bin/true:0x0000000000000020\n"),
            "{list}"
        );
        assert!(
            list.contains("p:uprobes/p_true_0x40 /usr/bin/true:0x0000000000000040\n"),
            "{list}"
        );
        let id: u64 =
            std::str::from_utf8(file(b"/sys/kernel/tracing/events/mygrp/ret1/id").unwrap())
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        let ev = dyn_uprobe(id).unwrap();
        assert!(ev.retprobe && ev.offset == 0x20 && ev.path == "/usr/bin/true");
        let fmt = file(b"/sys/kernel/debug/tracing/events/mygrp/ret1/format").unwrap();
        assert!(
            std::str::from_utf8(fmt)
                .unwrap()
                .starts_with(&format!("name: ret1\nID: {id}\n"))
        );
        let avail =
            std::str::from_utf8(file(b"/sys/kernel/tracing/available_events").unwrap()).unwrap();
        assert!(avail.lines().any(|l| l == "mygrp:ret1"));
        apply("-:mygrp/ret1").unwrap();
        assert_eq!(apply("-:mygrp/ret1"), Err(Errno(libc::ENOENT)));
        assert!(dyn_uprobe(id).is_none());
        assert!(file(b"/sys/kernel/tracing/events/mygrp/ret1/id").is_none());
    }
}
