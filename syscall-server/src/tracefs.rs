//! tracefs files for dynamic probes, served from memory.
//!
//! bcc's `bpf_detach_probe` (used by bpftrace 0.17 and bcc for every uprobe they detach) reads
//! `uprobe_events` to see whether the probe was made there (the text-interface fallback) and
//! only then writes a `-:` line; an unprivileged user cannot open the real file, so detaching
//! would fail with "open(.../uprobe_events): Permission denied". The emulation never uses the
//! text interface (uprobes are made with the uprobe PMU), so the file we serve lists no events.
//! Writes (`p:uprobes/...`) are refused with `EACCES` like the real file's for this user.
//!
//! `available_events` lists the tracepoints the emulation has (the syscall tracepoints of
//! `bpftime_attach::syscall::table`, and `raw_syscalls:sys_{enter,exit}`), in the kernel's
//! `category:name` lines: bpftrace reads it to check and expand `tracepoint:` probes before it
//! reads their `format` files.

/// Mount points of tracefs that loaders use.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing/", "/sys/kernel/debug/tracing/"];

/// The content of a dynamic-probe tracefs file we serve, if `path` is one.
pub fn file(path: &[u8]) -> Option<&'static [u8]> {
    let rest = TRACEFS
        .iter()
        .find_map(|m| path.strip_prefix(m.as_bytes()))?;
    match rest {
        b"uprobe_events" => Some(b""),
        b"available_events" => Some(available_events()),
        _ => None,
    }
}

/// The `available_events` text, made once.
fn available_events() -> &'static [u8] {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut t = String::from("raw_syscalls:sys_exit\nraw_syscalls:sys_enter\n");
        for e in bpftime_attach::syscall::table::events() {
            t.push_str(&format!(
                "syscalls:sys_exit_{0}\nsyscalls:sys_enter_{0}\n",
                e.name
            ));
        }
        t
    })
    .as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uprobe_events_is_an_empty_list() {
        assert_eq!(
            file(b"/sys/kernel/tracing/uprobe_events"),
            Some(b"".as_slice())
        );
        assert_eq!(
            file(b"/sys/kernel/debug/tracing/uprobe_events"),
            Some(b"".as_slice())
        );
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
