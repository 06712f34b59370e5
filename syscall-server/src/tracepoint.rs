//! Syscall tracepoints for loaders: `perf_event_open(PERF_TYPE_TRACEPOINT, config = id)` and
//! `BPF_RAW_TRACEPOINT_OPEN("sys_enter" | "sys_exit")`.
//!
//! The ids are those of [`bpftime_attach::syscall::table`] (this machine's kernel), which the
//! tracefs files we serve (`files.rs`) announce. Only syscall tracepoints exist here: any
//! other id is `EINVAL` (the kernel's `perf_trace_init` answer for an id it does not know),
//! any other raw tracepoint name `ENOENT` (`bpf_get_raw_tracepoint`).
//!
//! A raw tracepoint attachment is stored as a tracepoint perf event whose id has
//! [`RAW_TP_FLAG`] set, with a link holding it and the program; the fd handed out is the
//! link's, as the kernel's is a `bpf_link` fd.

use crate::Errno;
use crate::emu::Emulator;
use crate::sys::read_user_cstr;
use crate::uapi::*;
use bpftime_attach::syscall::table::{RAW_TP_FLAG, Tracepoint};
use bpftime_maps::store::ObjectKind;
use bpftime_runtime::object::{
    LinkRecord, PerfEventRecord, PerfKind, create_link, create_perf_event, read_prog,
    set_perf_enabled,
};

/// `BPF_PROG_TYPE_RAW_TRACEPOINT`.
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
/// `BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE`.
const BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE: u32 = 24;
/// `BPF_TRACE_RAW_TP` (`enum bpf_attach_type`).
const BPF_TRACE_RAW_TP: u32 = 23;
/// End of the `raw_tracepoint` attr (`name`, `prog_fd`, pad, `cookie`).
const RAW_TP_ATTR_END: usize = 24;

fn e(errno: i32) -> Errno {
    Errno(errno)
}

impl Emulator {
    /// The `PERF_TYPE_TRACEPOINT` branch of `perf_event_open`: a perf event for syscall
    /// tracepoint `config`.
    pub(crate) fn open_tracepoint(
        &self,
        attr: &perf_event_attr,
        pid: i32,
        cpu: i32,
        flags: u64,
    ) -> Result<i64, Errno> {
        if let Some(ev) = crate::tracefs::dyn_uprobe(attr.config) {
            // An event made through `uprobe_events`: a uprobe perf event (see `tracefs`).
            let rec = PerfEventRecord {
                kind: if ev.retprobe {
                    PerfKind::Uretprobe
                } else {
                    PerfKind::Uprobe
                },
                pid,
                cpu,
                offset: ev.offset,
                ref_ctr_offset: 0,
                path: ev.path,
            };
            let id = create_perf_event(&self.store, &rec).map_err(|err| e(err.errno()))?;
            if attr.flags & PERF_ATTR_FLAG_DISABLED == 0
                && let Err(err) = set_perf_enabled(&self.store, id, true)
            {
                self.release(id);
                return Err(e(err.errno()));
            }
            let flag = flags & PERF_FLAG_FD_CLOEXEC != 0;
            return self.install(ObjectKind::PerfEvent, id, "uprobe", flag, true, true);
        }
        let Some(tp) = Tracepoint::by_id(attr.config) else {
            tracing::warn!(
                "perf_event_open: tracepoint {} is not a syscall tracepoint: EINVAL",
                attr.config
            );
            return Err(e(libc::EINVAL));
        };
        let rec = PerfEventRecord {
            kind: PerfKind::Tracepoint,
            pid,
            cpu,
            offset: u64::from(tp.id()),
            ref_ctr_offset: 0,
            path: String::new(),
        };
        let id = create_perf_event(&self.store, &rec).map_err(|err| e(err.errno()))?;
        if attr.flags & PERF_ATTR_FLAG_DISABLED == 0
            && let Err(err) = set_perf_enabled(&self.store, id, true)
        {
            self.release(id);
            return Err(e(err.errno()));
        }
        tracing::debug!("tracepoint {} (pid={pid}, cpu={cpu})", tp.name());
        self.install(
            ObjectKind::PerfEvent,
            id,
            "tracepoint",
            flags & PERF_FLAG_FD_CLOEXEC != 0,
            true,
            true,
        )
    }

    /// `BPF_RAW_TRACEPOINT_OPEN`: `attr` is the zero-extended `union bpf_attr`.
    pub(crate) fn raw_tracepoint_open(&self, attr: &[u8]) -> Result<i64, Errno> {
        if attr
            .get(RAW_TP_ATTR_END..)
            .is_some_and(|t| t.iter().any(|&b| b != 0))
        {
            return Err(e(libc::EINVAL));
        }
        let word = |at: usize, n: usize| -> u64 {
            let mut b = [0u8; 8];
            if let Some(s) = attr.get(at..at + n) {
                b[..n].copy_from_slice(s);
            }
            u64::from_le_bytes(b)
        };
        let (name_ptr, prog_fd, cookie) = (word(0, 8), word(8, 4) as u32, word(16, 8));
        let prog = self.get(prog_fd, ObjectKind::Prog)?;
        let rec = read_prog(&self.store, prog.id).map_err(|err| e(err.errno()))?;
        if !matches!(
            rec.prog_type,
            BPF_PROG_TYPE_RAW_TRACEPOINT | BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE
        ) {
            tracing::warn!(
                "BPF_RAW_TRACEPOINT_OPEN: program type {} is not emulated: EINVAL",
                rec.prog_type
            );
            return Err(e(libc::EINVAL));
        }
        if name_ptr == 0 {
            return Err(e(libc::EINVAL));
        }
        let name = read_user_cstr(name_ptr, 127)?;
        let name = String::from_utf8(name).map_err(|_| e(libc::ENOENT))?;
        let Some(tp) = Tracepoint::raw_by_name(&name) else {
            tracing::warn!("BPF_RAW_TRACEPOINT_OPEN: raw tracepoint {name:?} is not emulated");
            return Err(e(libc::ENOENT));
        };
        let perf = create_perf_event(
            &self.store,
            &PerfEventRecord {
                kind: PerfKind::Tracepoint,
                pid: -1,
                cpu: -1,
                offset: RAW_TP_FLAG | u64::from(tp.id()),
                ref_ctr_offset: 0,
                path: String::new(),
            },
        )
        .map_err(|err| e(err.errno()))?;
        if let Err(err) = set_perf_enabled(&self.store, perf, true) {
            self.release(perf);
            return Err(e(err.errno()));
        }
        let link = match create_link(
            &self.store,
            &LinkRecord {
                prog_id: prog.id,
                perf_event_id: perf,
                attach_type: BPF_TRACE_RAW_TP,
                cookie,
            },
        ) {
            Ok(l) => l,
            Err(err) => {
                self.release(perf);
                return Err(e(err.errno()));
            }
        };
        // The link holds the program and the perf event (the perf event's creator reference
        // becomes the link's).
        if !self.acquire(prog.id) {
            self.store.release(link);
            self.release(perf);
            return Err(e(libc::EBADF));
        }
        tracing::debug!("raw tracepoint {name} (program {})", prog.id);
        self.install(ObjectKind::Link, link, "raw_tracepoint", true, true, true)
    }
}
