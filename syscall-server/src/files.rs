//! Files of the kernel that loaders read to find the uprobe PMU and tracepoints, served from
//! memory.
//!
//! libbpf 1.1 and bcc read `/sys/bus/event_source/devices/uprobe/type` (the PMU's dynamic type
//! number for `perf_event_open`) and `.../format/retprobe` (which `config` bit marks a
//! uretprobe). We answer with the numbers this machine's kernel uses, and recognise that type
//! number in `perf_event_open`.
//!
//! Tracepoints: `events/syscalls/sys_{enter,exit}_<name>/{id,format}` and
//! `events/raw_syscalls/sys_{enter,exit}/{id,format}` under `/sys/kernel/tracing` and
//! `/sys/kernel/debug/tracing`, generated from `bpftime_attach::syscall::table` (an
//! unprivileged user cannot read the real tracefs), byte for byte as the kernel prints them.

/// The uprobe PMU type we announce and recognise (this machine's kernel uses 8 too).
pub const UPROBE_PMU_TYPE: u32 = 8;

const FILES: &[(&str, &str)] = &[
    ("/sys/bus/event_source/devices/uprobe/type", "8\n"),
    (
        "/sys/bus/event_source/devices/uprobe/format/retprobe",
        "config:0\n",
    ),
    (
        "/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset",
        "config:32-63\n",
    ),
];

/// Mount points of tracefs that loaders use (libbpf picks the debugfs one when it exists).
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing/", "/sys/kernel/debug/tracing/"];

/// The content we serve for `path`, if it is one of ours.
pub fn virtual_file(path: &[u8]) -> Option<&'static [u8]> {
    FILES
        .iter()
        .find(|(p, _)| p.as_bytes() == path)
        .map(|(_, c)| c.as_bytes())
        .or_else(|| tracefs_file(path))
        .or_else(|| crate::tracefs::file(path))
}

/// A tracepoint's `id` or `format` file. Allocates only for paths under a tracefs mount point
/// (never, then, from inside an allocator's own initialisation); each file's text is made
/// once and kept for the life of the process.
fn tracefs_file(path: &[u8]) -> Option<&'static [u8]> {
    use bpftime_attach::syscall::Tracepoint;
    use parking_lot::Mutex;
    use std::collections::HashMap;

    /// (tracepoint id, format rather than id) → the text.
    type Made = HashMap<(u32, bool), &'static [u8]>;
    static MADE: Mutex<Option<Made>> = Mutex::new(None);
    let rest = TRACEFS
        .iter()
        .find_map(|m| path.strip_prefix(m.as_bytes()))?
        .strip_prefix(b"events/")?;
    let rest = std::str::from_utf8(rest).ok()?;
    let mut parts = rest.split('/');
    let (category, name, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let tp = Tracepoint::by_path(category, name)?;
    let is_format = match file {
        "format" => true,
        "id" => false,
        _ => return None,
    };
    let mut made = MADE.lock();
    let made = made.get_or_insert_with(HashMap::new);
    let text = made.entry((tp.id(), is_format)).or_insert_with(|| {
        let s = if is_format {
            tp.format()
        } else {
            format!("{}\n", tp.id())
        };
        Box::leak(s.into_boxed_str()).as_bytes()
    });
    Some(*text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_file_announces_the_pmu_number() {
        let c = virtual_file(b"/sys/bus/event_source/devices/uprobe/type").unwrap();
        assert_eq!(c, format!("{UPROBE_PMU_TYPE}\n").as_bytes());
        assert!(virtual_file(b"/etc/passwd").is_none());
    }

    #[test]
    fn tracefs_files_of_syscall_tracepoints() {
        let e = bpftime_attach::syscall::table::by_name("openat").unwrap();
        for m in TRACEFS {
            let id = virtual_file(format!("{m}events/syscalls/sys_enter_openat/id").as_bytes());
            assert_eq!(id, Some(format!("{}\n", e.enter_id).as_bytes()));
            let f = virtual_file(format!("{m}events/syscalls/sys_exit_openat/format").as_bytes());
            let f = std::str::from_utf8(f.unwrap()).unwrap();
            assert!(f.starts_with(&format!("name: sys_exit_openat\nID: {}\n", e.exit_id)));
            assert!(
                virtual_file(format!("{m}events/raw_syscalls/sys_enter/id").as_bytes()).is_some()
            );
        }
        for bad in [
            "/sys/kernel/tracing/events/syscalls/sys_enter_nope/id",
            "/sys/kernel/tracing/events/sched/sched_switch/id",
            "/sys/kernel/tracing/events/syscalls/sys_enter_openat/enable",
            "/sys/kernel/tracing/events/syscalls/sys_enter_openat/id/x",
        ] {
            assert!(virtual_file(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
