//! tracefs files for dynamic probes, served from memory.
//!
//! bcc's `bpf_detach_probe` (used by bpftrace 0.17 and bcc for every uprobe they detach) reads
//! `uprobe_events` to see whether the probe was made there (the text-interface fallback) and
//! only then writes a `-:` line; an unprivileged user cannot open the real file, so detaching
//! would fail with "open(.../uprobe_events): Permission denied". The emulation never uses the
//! text interface (uprobes are made with the uprobe PMU), so the file we serve lists no events.
//! Writes (`p:uprobes/...`) are refused with `EACCES` like the real file's for this user.

/// Mount points of tracefs that loaders use.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing/", "/sys/kernel/debug/tracing/"];

/// The content of a dynamic-probe tracefs file we serve, if `path` is one.
pub fn file(path: &[u8]) -> Option<&'static [u8]> {
    let rest = TRACEFS
        .iter()
        .find_map(|m| path.strip_prefix(m.as_bytes()))?;
    match rest {
        b"uprobe_events" => Some(b""),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uprobe_events_is_an_empty_list() {
        assert_eq!(file(b"/sys/kernel/tracing/uprobe_events"), Some(b"".as_slice()));
        assert_eq!(
            file(b"/sys/kernel/debug/tracing/uprobe_events"),
            Some(b"".as_slice())
        );
        assert!(file(b"/sys/kernel/tracing/kprobe_events").is_none());
        assert!(file(b"/sys/kernel/tracing/uprobe_events/x").is_none());
    }
}
