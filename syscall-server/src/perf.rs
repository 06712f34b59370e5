//! `perf_event_open` for the uprobe PMU, and the perf ioctls on our perf event fds.
//!
//! Semantics follow `kernel/events/core.c` (`perf_copy_attr`, the `perf_event_open` argument
//! checks, `_perf_ioctl`) and `kernel/trace/trace_event_perf.c` (`perf_uprobe_init`): the
//! uprobe PMU takes the binary's path in `config1`, the file offset in `config2`, the
//! retprobe flag in `config` bit 0 and the USDT semaphore offset in `config` bits 32–63.

use crate::Errno;
use crate::emu::Emulator;
use crate::files::UPROBE_PMU_TYPE;
use crate::sys::{self, read_user_cstr, read_user_into, write_user};
use crate::uapi::*;
use bpftime_maps::store::ObjectKind;
use bpftime_runtime::object::{
    PerfEventRecord, PerfKind, create_perf_event, read_prog, set_perf_enabled, set_perf_prog,
};
use zerocopy::FromBytes;

const PAGE: u32 = 4096;
const ATTR_SIZE: u32 = size_of::<perf_event_attr>() as u32;
/// `PATH_MAX`.
const PATH_MAX: usize = 4096;
/// `PERF_COUNT_SW_BPF_OUTPUT`.
const PERF_COUNT_SW_BPF_OUTPUT: u64 = 10;

fn e(errno: i32) -> Errno {
    Errno(errno)
}

/// `perf_copy_attr`: the attr, or `E2BIG` (writing the size we know back to `attr.size`).
fn copy_perf_attr(uattr: u64) -> Result<perf_event_attr, Errno> {
    let mut sz = [0u8; 4];
    read_user_into(uattr.wrapping_add(4), &mut sz)?;
    let mut size = u32::from_ne_bytes(sz);
    let too_big = || {
        let _ = write_user(uattr.wrapping_add(4), &ATTR_SIZE.to_ne_bytes());
        e(libc::E2BIG)
    };
    if size > PAGE {
        return Err(too_big());
    }
    if size == 0 {
        size = PERF_ATTR_SIZE_VER0;
    }
    if size < PERF_ATTR_SIZE_VER0 {
        return Err(too_big());
    }
    let bytes = match crate::bpf::copy_attr(uattr, size, ATTR_SIZE as usize) {
        Ok(b) => b,
        Err(Errno(libc::E2BIG)) => return Err(too_big()),
        Err(err) => return Err(err),
    };
    perf_event_attr::read_from_bytes(&bytes).map_err(|_| e(libc::EINVAL))
}

impl Emulator {
    /// Emulates `perf_event_open(attr, pid, cpu, group_fd, flags)`; the arguments are the raw
    /// syscall registers (truncated to the kernel's C types here).
    pub fn perf_event_open(
        &self,
        uattr: u64,
        pid: i64,
        cpu: i64,
        group_fd: i64,
        flags: u64,
    ) -> Result<i64, Errno> {
        let (pid, cpu, group_fd) = (pid as i32, cpu as i32, group_fd as i32);
        let r = self.perf_open_inner(uattr, pid, cpu, group_fd, flags);
        match &r {
            Ok(v) => tracing::debug!("perf_event_open(pid={pid}, cpu={cpu}) = {v}"),
            Err(err) => tracing::debug!("perf_event_open(pid={pid}, cpu={cpu}) = -{err}"),
        }
        r
    }

    fn perf_open_inner(
        &self,
        uattr: u64,
        pid: i32,
        cpu: i32,
        group_fd: i32,
        flags: u64,
    ) -> Result<i64, Errno> {
        let all = PERF_FLAG_FD_NO_GROUP
            | PERF_FLAG_FD_OUTPUT
            | PERF_FLAG_PID_CGROUP
            | PERF_FLAG_FD_CLOEXEC;
        if flags & !all != 0 {
            return Err(e(libc::EINVAL));
        }
        let attr = copy_perf_attr(uattr)?;
        if flags & PERF_FLAG_PID_CGROUP != 0 {
            tracing::warn!("perf_event_open: cgroup events are not emulated: EINVAL");
            return Err(e(libc::EINVAL));
        }
        if pid == -1 && cpu == -1 || cpu < -1 || i64::from(cpu) >= sys::nr_cpus() {
            return Err(e(libc::EINVAL));
        }
        let pid_filter = match pid {
            -1 => -1,
            0 => std::process::id() as i32,
            p if p > 0 && sys::pid_exists(p) => p,
            _ => return Err(e(libc::ESRCH)),
        };
        if group_fd != -1 {
            tracing::warn!("perf_event_open: event groups are not emulated: EINVAL");
            return Err(e(libc::EINVAL));
        }
        match attr.type_ {
            t if t == UPROBE_PMU_TYPE => {}
            PERF_TYPE_SOFTWARE if attr.config == PERF_COUNT_SW_BPF_OUTPUT => {
                return self.open_bpf_output(&attr, pid_filter, cpu, flags);
            }
            PERF_TYPE_SOFTWARE
                if attr.config == crate::timer::PERF_COUNT_SW_CPU_CLOCK
                    || attr.config == crate::timer::PERF_COUNT_SW_TASK_CLOCK =>
            {
                return self.open_timer(&attr, pid_filter, cpu, flags);
            }
            PERF_TYPE_SOFTWARE => {
                tracing::warn!(
                    "perf_event_open: software event {} is not emulated: EOPNOTSUPP",
                    attr.config
                );
                return Err(e(libc::EOPNOTSUPP));
            }
            PERF_TYPE_TRACEPOINT => {
                return self.open_tracepoint(&attr, pid_filter, cpu, flags);
            }
            t => {
                tracing::warn!("perf_event_open: PMU type {t} is not emulated: ENOENT");
                return Err(e(libc::ENOENT));
            }
        }
        // perf_uprobe_init()
        if attr.config1 == 0 {
            return Err(e(libc::EINVAL));
        }
        let raw = read_user_cstr(attr.config1, PATH_MAX - 1)?;
        if raw.is_empty() {
            return Err(e(libc::ENOENT));
        }
        let raw = String::from_utf8(raw).map_err(|_| e(libc::EINVAL))?;
        // The kernel resolves the path to an inode now; we keep the canonical path, so agents
        // in processes with another cwd find the same file.
        let path = std::fs::canonicalize(&raw)
            .map_err(|err| e(err.raw_os_error().unwrap_or(libc::ENOENT)))?;
        let meta = std::fs::metadata(&path)
            .map_err(|err| e(err.raw_os_error().unwrap_or(libc::ENOENT)))?;
        if !meta.is_file() {
            return Err(e(libc::EINVAL));
        }
        let path = path
            .into_os_string()
            .into_string()
            .map_err(|_| e(libc::EINVAL))?;
        let retprobe = attr.config & 1 != 0;
        let rec = PerfEventRecord {
            kind: if retprobe {
                PerfKind::Uretprobe
            } else {
                PerfKind::Uprobe
            },
            pid: pid_filter,
            cpu,
            offset: attr.config2,
            ref_ctr_offset: attr.config >> 32,
            path,
        };
        tracing::debug!(
            "uprobe {:?}+{:#x} retprobe={retprobe} pid={pid_filter}",
            rec.path,
            rec.offset
        );
        let id = create_perf_event(&self.store, &rec).map_err(|err| e(err.errno()))?;
        if attr.flags & PERF_ATTR_FLAG_DISABLED == 0 {
            // Not `disabled`: the kernel enables the event at open.
            if let Err(err) = set_perf_enabled(&self.store, id, true) {
                self.release(id);
                return Err(e(err.errno()));
            }
        }
        let name = if retprobe { "uretprobe" } else { "uprobe" };
        self.install(
            ObjectKind::PerfEvent,
            id,
            name,
            flags & PERF_FLAG_FD_CLOEXEC != 0,
            true,
            true,
        )
    }

    /// A `PERF_COUNT_SW_BPF_OUTPUT` event: the target of `bpf_perf_event_output`, with a perf
    /// ring buffer made when the loader mmaps it. Its fd is a wake-up socket, so the loader's
    /// epoll sees it readable when samples arrive.
    fn open_bpf_output(
        &self,
        attr: &perf_event_attr,
        pid: i32,
        cpu: i32,
        flags: u64,
    ) -> Result<i64, Errno> {
        let rec = PerfEventRecord {
            kind: PerfKind::SoftwareBpfOutput,
            pid,
            cpu,
            offset: 0,
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
        tracing::debug!("bpf output perf event {id} (pid={pid}, cpu={cpu})");
        self.install_waking(
            ObjectKind::PerfEvent,
            id,
            flags & PERF_FLAG_FD_CLOEXEC != 0,
            true,
            true,
        )
    }

    /// `ioctl(fd, request, arg)` on one of our fds; `None` if the call is not ours to answer
    /// (not our fd, or a generic fd ioctl such as `FIOCLEX` that the real call handles).
    pub fn ioctl(&self, fd: i32, request: u64, arg: u64) -> Option<Result<i64, Errno>> {
        let ent = self.entry(fd)?;
        // The kernel's `cmd` is an unsigned int.
        let req = u64::from(request as u32);
        let generic = [libc::FIOCLEX, libc::FIONCLEX, libc::FIONBIO, libc::FIOASYNC];
        if generic.contains(&req) || ent.kind != ObjectKind::PerfEvent {
            // bpf object fds have no ioctls (ENOTTY from the placeholder, as from the kernel).
            return None;
        }
        let r = self.perf_ioctl(ent.id, req, arg);
        match &r {
            Ok(v) => tracing::debug!("ioctl({fd}, {req:#x}, {arg:#x}) = {v}"),
            Err(err) => tracing::debug!("ioctl({fd}, {req:#x}, {arg:#x}) = -{err}"),
        }
        Some(r)
    }

    fn perf_ioctl(&self, id: u32, req: u64, arg: u64) -> Result<i64, Errno> {
        let errno = |err: bpftime_runtime::RuntimeError| e(err.errno());
        match req {
            PERF_EVENT_IOC_ENABLE | PERF_EVENT_IOC_DISABLE => {
                set_perf_enabled(&self.store, id, req == PERF_EVENT_IOC_ENABLE).map_err(errno)?;
                Ok(0)
            }
            PERF_EVENT_IOC_RESET => Ok(0),
            PERF_EVENT_IOC_ID => {
                write_user(arg, &u64::from(id).to_ne_bytes())?;
                Ok(0)
            }
            PERF_EVENT_IOC_SET_BPF => {
                let prog = self.get(arg as u32, ObjectKind::Prog)?;
                let rec = read_prog(&self.store, prog.id).map_err(errno)?;
                self.check_perf_attach(id, rec.prog_type)?;
                // The perf event holds the program until it goes away.
                if !self.acquire(prog.id) {
                    return Err(e(libc::EBADF));
                }
                if let Err(err) = set_perf_prog(&self.store, id, prog.id) {
                    self.release(prog.id);
                    return Err(errno(err));
                }
                Ok(0)
            }
            PERF_EVENT_IOC_REFRESH
            | PERF_EVENT_IOC_PERIOD
            | PERF_EVENT_IOC_SET_OUTPUT
            | PERF_EVENT_IOC_SET_FILTER
            | PERF_EVENT_IOC_PAUSE_OUTPUT
            | PERF_EVENT_IOC_QUERY_BPF
            | PERF_EVENT_IOC_MODIFY_ATTRIBUTES => {
                tracing::warn!("perf ioctl {req:#x} is not emulated: EINVAL");
                Err(e(libc::EINVAL))
            }
            _ => {
                tracing::warn!("ioctl {req:#x} on a perf event is not emulated: ENOTTY");
                Err(e(libc::ENOTTY))
            }
        }
    }
}
