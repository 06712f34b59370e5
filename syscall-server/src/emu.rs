//! The emulator: one store, this process's fd table, and object lifetimes.
//!
//! Each fd we hand out is a memfd placeholder recorded in the table with the object it stands
//! for, the placeholder's `(st_dev, st_ino)` (so an fd number that was closed behind our back
//! and reused is recognised as not ours) and the pid that holds it (so a forked child, which
//! inherits the table, neither uses nor releases its parent's references).
//!
//! References follow the kernel: an fd holds one reference; a program holds its maps (used by
//! `lddw` or bound with `BPF_PROG_BIND_MAP`), a link its program and perf event, a perf event
//! the program set with `PERF_EVENT_IOC_SET_BPF`. Whoever drops the last reference of an object
//! drops the references the object held, and frees a map's data.
//!
//! Kernel-backed maps (`BPF_MAP_CREATE` with `BPFTIME_KERNEL_MAPS=1`, see
//! [`bpftime_maps::kernel`]): the fd handed out is the real kernel map fd, recorded in the table
//! like a placeholder (with `kernel` set, so map commands on it go to the kernel unchanged and
//! its `mmap` is the kernel's). The emulator also keeps a private duplicate of the kernel fd
//! for as long as the store object lives, so a program that holds the map keeps the kernel map
//! alive after the loader closed its fd, as the kernel's own references would.

use crate::Errno;
use crate::sys;
use bpftime_maps::store::{ObjectInfo, ObjectKind, Store};
use bpftime_maps::{Map, MapError, MapType, perf_array};
use bpftime_runtime::object::{perf_prog, read_link, read_prog};
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::opcode::{BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, LDDW};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

/// What one of our fds stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdEntry {
    /// Object kind.
    pub kind: ObjectKind,
    /// Store object id.
    pub id: u32,
    /// Syscall-side read permission (maps: not `BPF_F_WRONLY`).
    pub can_read: bool,
    /// Syscall-side write permission (maps: not `BPF_F_RDONLY`).
    pub can_write: bool,
    /// Ring buffer maps and `BPF_OUTPUT` perf events: the nonce of the wake-up socket that is
    /// the placeholder fd (see [`crate::epoll`]); 0 for memfd placeholders.
    pub wake: u64,
    /// The fd is a real kernel map fd (a kernel-backed map): map commands and `mmap` on it go
    /// to the kernel.
    pub kernel: bool,
    dev: u64,
    ino: u64,
    pid: u32,
}

/// Process-local facts about an object that the store records do not keep.
#[derive(Clone, Debug, Default)]
pub(crate) struct Side {
    pub btf_id: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
    pub btf_vmlinux_value_type_id: u32,
    pub load_time: u64,
    pub uid: u32,
    pub gpl: bool,
    /// Maps bound with `BPF_PROG_BIND_MAP` (the program holds a reference on each).
    pub bound_maps: Vec<u32>,
}

/// A mapping of a map's data that this process made through us.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mapping {
    pub start: u64,
    pub len: u64,
    pub map_id: u32,
    pub writable: bool,
    /// The process that made it (a forked child inherits the record, not the reference).
    pub pid: u32,
}

/// The emulation for one store.
#[derive(Debug)]
pub struct Emulator {
    pub(crate) store: Arc<Store>,
    pub(crate) helpers: Arc<HelperRegistry>,
    fds: Mutex<HashMap<RawFd, FdEntry>>,
    pub(crate) side: Mutex<HashMap<u32, Side>>,
    pub(crate) mmaps: Mutex<Vec<Mapping>>,
    ro_store: OnceLock<Option<OwnedFd>>,
    pub(crate) epolls: crate::epoll::EpollTable,
    /// Create data maps in the kernel (`BPFTIME_KERNEL_MAPS=1`, `bpftime load --kernel-maps`).
    pub(crate) kernel_maps: bool,
    /// Private duplicates of kernel map fds, by store object id (see the module docs).
    kernel_holds: Mutex<HashMap<u32, OwnedFd>>,
}

/// Whether `BPFTIME_KERNEL_MAPS` asks for kernel-backed maps.
fn kernel_maps_env() -> bool {
    std::env::var("BPFTIME_KERNEL_MAPS").is_ok_and(|v| !v.is_empty() && v != "0")
}

pub(crate) fn map_err(e: MapError) -> Errno {
    Errno(e.errno())
}

/// This process's id (cached: it is checked on every call; the cache is reset after `fork`).
pub(crate) fn pid() -> u32 {
    bpftime_maps::shm::cached_pid()
}

fn kind_label(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Map => "map",
        ObjectKind::Prog => "prog",
        ObjectKind::Btf => "btf",
        ObjectKind::Link => "link",
        ObjectKind::PerfEvent => "perf",
        _ => "object",
    }
}

impl Emulator {
    /// An emulator over `store`.
    pub fn new(store: Arc<Store>) -> Emulator {
        crate::log::init();
        Emulator {
            store,
            helpers: Arc::new(bpftime_runtime::helpers::registry()),
            fds: Mutex::new(HashMap::new()),
            side: Mutex::new(HashMap::new()),
            mmaps: Mutex::new(Vec::new()),
            ro_store: OnceLock::new(),
            epolls: Default::default(),
            kernel_maps: kernel_maps_env(),
            kernel_holds: Mutex::new(HashMap::new()),
        }
    }

    /// Turns kernel-backed map creation on or off (default: `BPFTIME_KERNEL_MAPS`).
    pub fn set_kernel_maps(&mut self, on: bool) {
        self.kernel_maps = on;
    }

    /// Opens the store `name` (`/dev/shm/bpftime-<uid>-<name>`).
    pub fn open_named(name: &str) -> Result<Emulator, Errno> {
        let store = Store::open_named(name).map_err(|e| {
            tracing::warn!("cannot open store {name:?}: {e}");
            Errno(e.errno())
        })?;
        let store = Arc::new(store);
        // Objects of loaders that died without closing their fds: the kernel would have
        // dropped them with the process; return their memory now.
        let n = bpftime_maps::map::reclaim_dead_owners(&store);
        if n > 0 {
            tracing::info!("reclaimed {n} objects of exited processes");
        }
        Ok(Emulator::new(store))
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A read-only fd of the store file (so read-only mappings cannot be made writable with
    /// `mprotect`, as the kernel clears `VM_MAYWRITE`); `None` if it cannot be opened.
    pub(crate) fn ro_store_fd(&self) -> Option<RawFd> {
        self.ro_store
            .get_or_init(|| {
                let p = format!("/proc/self/fd/{}", self.store.segment().fd());
                sys::open_rdonly(&p).ok()
            })
            .as_ref()
            .map(|f| f.as_raw_fd())
    }

    /// The object `fd` stands for in this process, if it is one of ours and still open.
    pub fn entry(&self, fd: RawFd) -> Option<FdEntry> {
        let e = *self.fds.lock().get(&fd)?;
        if e.pid != pid() {
            return None;
        }
        if sys::fd_identity(fd) != Some((e.dev, e.ino)) {
            // Closed behind our back (raw syscall, close_range) and possibly reused: forget it.
            let stale = {
                let mut t = self.fds.lock();
                match t.get(&fd) {
                    Some(cur) if *cur == e => t.remove(&fd),
                    _ => None,
                }
            };
            if let Some(s) = stale {
                self.release(s.id);
            }
            return None;
        }
        Some(e)
    }

    /// Whether `fd` is one of ours (for the interposers' fast path; no validation).
    pub fn is_ours(&self, fd: RawFd) -> bool {
        self.fds.lock().get(&fd).is_some_and(|e| e.pid == pid())
    }

    /// The object of `fd`, which must be of `kind`: `EBADF` if `fd` is not open, `EINVAL` if it
    /// is not one of ours of that kind (the kernel's `__bpf_map_get` / `bpf_prog_get`).
    pub(crate) fn get(&self, fd: u32, kind: ObjectKind) -> Result<FdEntry, Errno> {
        let Ok(fd) = RawFd::try_from(fd) else {
            return Err(Errno(libc::EBADF));
        };
        match self.entry(fd) {
            Some(e) if e.kind == kind => Ok(e),
            _ if sys::fd_is_open(fd) => Err(Errno(libc::EINVAL)),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    /// Any bpf object of `fd` (not perf events): `EBADF` / `EINVAL` as [`Emulator::get`].
    pub(crate) fn get_any(&self, fd: u32) -> Result<FdEntry, Errno> {
        let Ok(fd) = RawFd::try_from(fd) else {
            return Err(Errno(libc::EBADF));
        };
        match self.entry(fd) {
            Some(e)
                if matches!(
                    e.kind,
                    ObjectKind::Map | ObjectKind::Prog | ObjectKind::Btf | ObjectKind::Link
                ) =>
            {
                Ok(e)
            }
            _ if sys::fd_is_open(fd) => Err(Errno(libc::EINVAL)),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    /// Opens map `id` of the store (a kernel-backed map for its metadata only: commands on
    /// kernel map fds go to the kernel before they get here).
    pub(crate) fn open_map(&self, id: u32) -> Result<Map, Errno> {
        Map::open_meta(&self.store, id).map_err(map_err)
    }

    /// Hands out a new placeholder fd for object `id`, which already holds the reference the
    /// fd will own. On failure the reference is dropped.
    pub(crate) fn install(
        &self,
        kind: ObjectKind,
        id: u32,
        name: &str,
        cloexec: bool,
        can_read: bool,
        can_write: bool,
    ) -> Result<i64, Errno> {
        let label = format!("bpftime-{}:{name}", kind_label(kind));
        let fd = match sys::memfd(&label, cloexec, false) {
            Ok(fd) => fd,
            Err(e) => {
                self.release(id);
                return Err(e);
            }
        };
        self.install_fd(kind, id, fd, 0, false, can_read, can_write)
    }

    /// Records `fd`, a real kernel map fd, as the fd of kernel-backed map `id` (which already
    /// holds the reference the fd will own), and keeps a private duplicate of it while the
    /// object lives.
    pub(crate) fn install_kernel_map(
        &self,
        id: u32,
        fd: OwnedFd,
        can_read: bool,
        can_write: bool,
    ) -> Result<i64, Errno> {
        if let Ok(dup) = fd.try_clone() {
            self.kernel_holds.lock().entry(id).or_insert(dup);
        }
        self.install_fd(ObjectKind::Map, id, fd, 0, true, can_read, can_write)
    }

    /// As [`Emulator::install`], with a wake-up socket as the placeholder (ring buffer maps and
    /// `BPF_OUTPUT` perf events, whose fds must become readable for epoll when data arrives).
    pub(crate) fn install_waking(
        &self,
        kind: ObjectKind,
        id: u32,
        cloexec: bool,
        can_read: bool,
        can_write: bool,
    ) -> Result<i64, Errno> {
        let sock = match bpftime_maps::wake::WakeSocket::new() {
            Ok(s) => s,
            Err(err) => {
                self.release(id);
                tracing::warn!("cannot create a wake-up socket: {err}");
                return Err(Errno(err.raw_os_error().unwrap_or(libc::ENOMEM)));
            }
        };
        let (fd, nonce) = sock.into_parts();
        if !cloexec && let Err(e) = sys::set_cloexec(fd.as_raw_fd(), false) {
            self.release(id);
            return Err(e);
        }
        self.epolls
            .any_waking
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.install_fd(kind, id, fd, nonce, false, can_read, can_write)
    }

    /// Records `fd` (which the caller made) as the placeholder of object `id`, which already
    /// holds the reference the fd will own.
    #[allow(clippy::too_many_arguments)]
    fn install_fd(
        &self,
        kind: ObjectKind,
        id: u32,
        fd: OwnedFd,
        wake: u64,
        kernel: bool,
        can_read: bool,
        can_write: bool,
    ) -> Result<i64, Errno> {
        let Some((dev, ino)) = sys::fd_identity(fd.as_raw_fd()) else {
            self.release(id);
            return Err(Errno(libc::EBADF));
        };
        let raw = fd.into_raw_fd();
        let old = self.fds.lock().insert(
            raw,
            FdEntry {
                kind,
                id,
                can_read,
                can_write,
                wake,
                kernel,
                dev,
                ino,
                pid: pid(),
            },
        );
        // An entry under a number the kernel just gave us again was closed behind our back.
        if let Some(o) = old.filter(|o| o.pid == pid()) {
            self.release(o.id);
        }
        Ok(i64::from(raw))
    }

    /// Object ids `id` holds references on, and the map data to free, read before releasing.
    fn held_by(&self, info: &ObjectInfo) -> (Vec<u32>, Option<(u64, u64)>) {
        match info.kind {
            ObjectKind::Prog => {
                let mut ids = read_prog(&self.store, info.id)
                    .map(|p| prog_map_ids(&p.insns))
                    .unwrap_or_default();
                if let Some(s) = self.side.lock().get(&info.id) {
                    ids.extend(s.bound_maps.iter().copied());
                }
                (ids, None)
            }
            ObjectKind::Link => match read_link(&self.store, info.id) {
                Ok(l) => (vec![l.prog_id, l.perf_event_id], None),
                Err(_) => (Vec::new(), None),
            },
            // A perf event's ring (made at mmap) goes with it.
            ObjectKind::PerfEvent => (
                perf_prog(&self.store, info.id).into_iter().collect(),
                perf_array::event_ring(&self.store, info.id).map(|r| (r.offset(), r.len())),
            ),
            // A kernel-backed map has no data in the store.
            ObjectKind::Map => match Map::open_meta(&self.store, info.id) {
                Ok(m) if m.kernel_id().is_some() => (Vec::new(), None),
                // A perf event array holds its perf events.
                Ok(m) => (
                    if m.def().map_type == MapType::PerfEventArray as u32 {
                        perf_array::held(&m)
                    } else {
                        // Program arrays and maps of maps hold their programs / inner maps.
                        m.held_ids()
                    },
                    Some((m.data_offset(), m.data_len())),
                ),
                Err(_) => (Vec::new(), None),
            },
            _ => (Vec::new(), None),
        }
    }

    /// Drops one reference on `id`; if it was the last, the object goes away and so do the
    /// references it held.
    pub(crate) fn release(&self, id: u32) {
        let mut todo = vec![id];
        while let Some(id) = todo.pop() {
            let Some(info) = self.store.object(id) else {
                continue;
            };
            let (held, data) = self.held_by(&info);
            if self.store.release(id).is_some() {
                tracing::debug!("object {id} ({:?} {:?}) removed", info.kind, info.name);
                if let Some((off, len)) = data {
                    self.store.free(off, len);
                }
                self.side.lock().remove(&id);
                // The kernel map may go now (unless other fds or kernel programs hold it).
                self.kernel_holds.lock().remove(&id);
                todo.extend(held);
            }
        }
    }

    /// Takes a reference on `id` (false if it is gone).
    pub(crate) fn acquire(&self, id: u32) -> bool {
        self.store.acquire(id)
    }

    /// `close(fd)`: runs `real` (the actual close) and, if `fd` was ours, drops its reference.
    pub fn close_with(&self, fd: RawFd, real: impl FnOnce() -> i32) -> i32 {
        let mut t = self.fds.lock();
        let taken = match t.get(&fd) {
            Some(e) if e.pid == pid() => t.remove(&fd),
            _ => None,
        };
        let r = real();
        drop(t);
        if r == 0 {
            self.epoll_fd_closed(fd);
        }
        if let Some(e) = taken {
            tracing::debug!("close({fd}) drops {:?} {}", e.kind, e.id);
            self.release(e.id);
        }
        r
    }

    /// Closes `fd` (ours or not), dropping its reference if it was ours.
    pub fn close(&self, fd: RawFd) -> Result<(), Errno> {
        let r = self.close_with(fd, || match sys::raw_close(fd) {
            Ok(()) => 0,
            Err(e) => -e.0,
        });
        if r < 0 { Err(Errno(-r)) } else { Ok(()) }
    }

    /// `dup`-like calls: runs `real`, which makes the fd it returns a copy of `old` (for
    /// dup2/dup3, possibly replacing an fd of ours under that number, whose reference is
    /// dropped). The new fd takes its own reference.
    pub fn dup_with(&self, old: RawFd, real: impl FnOnce() -> i32) -> i32 {
        let src = self.entry(old);
        let mut t = self.fds.lock();
        let r = real();
        let mut drop_id = None;
        if r >= 0 && r != old {
            if let Some(prev) = t.remove(&r).filter(|e| e.pid == pid()) {
                drop_id = Some(prev.id);
            }
            if let Some(e) = src
                && self.acquire(e.id)
            {
                t.insert(r, e);
            }
        }
        drop(t);
        if let Some(id) = drop_id {
            self.release(id);
        }
        r
    }

    /// `dup(fd)` through the real system call, keeping the table in step.
    pub fn dup(&self, fd: RawFd) -> Result<RawFd, Errno> {
        let r = self.dup_with(fd, || match sys::raw_dup(fd) {
            Ok(n) => n,
            Err(e) => -e.0,
        });
        if r < 0 { Err(Errno(-r)) } else { Ok(r) }
    }

    /// Drops every reference this process holds (at exit).
    pub fn release_all(&self) {
        let me = pid();
        let entries: Vec<FdEntry> = {
            let mut t = self.fds.lock();
            let mine: Vec<RawFd> = t
                .iter()
                .filter(|(_, e)| e.pid == me)
                .map(|(fd, _)| *fd)
                .collect();
            mine.into_iter().filter_map(|fd| t.remove(&fd)).collect()
        };
        for e in entries {
            self.release(e.id);
        }
        // Mappings still in place hold their maps too.
        let maps: Vec<u32> = {
            let mut all = self.mmaps.lock();
            let mine = all
                .iter()
                .filter(|m| m.pid == me)
                .map(|m| m.map_id)
                .collect();
            all.retain(|m| m.pid != me);
            mine
        };
        for id in maps {
            self.release(id);
        }
    }

    /// Number of fds this process holds through us (for tests and logs).
    pub fn fd_count(&self) -> usize {
        let me = pid();
        self.fds.lock().values().filter(|e| e.pid == me).count()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Map ids referenced by `lddw` in relocated instructions (map fd and map value forms).
pub(crate) fn prog_map_ids(insns: &[bpftime_vm::isa::Insn]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut pc = 0;
    while pc < insns.len() {
        let i = insns[pc];
        if i.code == LDDW {
            if (i.src == BPF_PSEUDO_MAP_FD || i.src == BPF_PSEUDO_MAP_VALUE)
                && !ids.contains(&(i.imm as u32))
            {
                ids.push(i.imm as u32);
            }
            pc += 2;
        } else {
            pc += 1;
        }
    }
    ids
}
