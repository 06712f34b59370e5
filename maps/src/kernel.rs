//! Kernel-backed maps (`bpftime load --kernel-maps`): maps created in the kernel with the real
//! `bpf()`, recorded in the store by their kernel map id, and used by every process through
//! the same [`Map`] handle as store maps, so a kernel eBPF program and a userspace one share
//! them.
//!
//! How a process reaches a kernel map ([`Conn`], made when [`Map::open`] meets a record with a
//! kernel id): `BPF_MAP_GET_FD_BY_ID` (the kernel requires `CAP_SYS_ADMIN` for it), then
//!
//! - arrays (`BPF_MAP_TYPE_ARRAY`, always created with `BPF_F_MMAPABLE`, see [`create`]): one
//!   shared mapping of the values; lookups return pointers into it, so reads and writes —
//!   atomics included — are the kernel's memory, exactly as a kernel program sees it. The
//!   mapping is read-only for `BPF_F_RDONLY_PROG` and frozen maps (the kernel refuses a writable
//!   one);
//! - every other type: one `bpf()` call per operation on the fd. A program-side lookup copies the
//!   value into a per-thread slot and returns that: writes through the pointer are **not**
//!   seen by the kernel (use `bpf_map_update_elem`); the last [`COPY_SLOTS`] lookups of a map
//!   in a thread stay valid. Per-CPU maps copy the current CPU's value, and a program-side
//!   update rewrites every CPU's value (read, replace this CPU's slot, write), so it can undo a
//!   concurrent kernel-side update of another CPU's slot of the same key.
//!
//! # Invariants
//!
//! - Every system call here is the raw `syscall` instruction ([`raw_syscall`]), never libc's
//!   `syscall()`: the syscall-server interposes that one in loaders and would answer the call
//!   from the emulation.
//! - A `bpf()` attr is a zeroed local buffer; each pointer in it points at a live buffer of at
//!   least the size the kernel reads or writes for this map (`key_size` for keys, the syscall
//!   value size for values, `count` × those for batches), checked before the call.
//! - A [`Conn`] owns its fd and at most one shared mapping of an array's values, made once and
//!   unmapped on drop; every `Map` clone holds the `Arc<Conn>`, so a pointer into the mapping
//!   is valid while any handle lives (the kernel keeps the pages for the mapping's lifetime,
//!   whatever happens to the map's other fds). The mapping is written by kernel programs and
//!   other processes: no reference to it is ever formed, only raw copies.
//! - Per-thread copies are heap blocks owned by the thread's [`COPIES`] table, never freed or
//!   moved before the thread exits; they are reached only through raw pointers.

use crate::map::{BPF_EXIST, BPF_NOEXIST, Map, MapDef, MapError, MapType, round8};
use crate::percpu;
use crate::store::{ObjectKind, Store};
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lookups of one map in one thread whose copies stay valid (syscall-backed maps).
pub const COPY_SLOTS: usize = 8;

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_MAP_GET_NEXT_KEY: i64 = 4;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: i64 = 21;
const BPF_MAP_FREEZE: i64 = 22;
const BPF_MAP_LOOKUP_BATCH: i64 = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: i64 = 25;

/// `BPF_F_MMAPABLE`.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Bytes of every attr we pass (the largest we fill: `MAP_CREATE` up to `map_extra`).
const ATTR_LEN: usize = 72;

/// Issues system call `nr` with six arguments through the machine's `syscall`/`svc`
/// instruction; returns the kernel's raw result (`-errno` on failure) without touching `errno`
/// or going through libc (so it never re-enters an interposed `syscall` symbol). The
/// syscall-server uses this one too.
///
/// # Safety
/// The call and its arguments must be sound for the caller to make (the kernel may write the
/// memory the arguments point at, or change mappings).
#[cfg(target_arch = "x86_64")]
pub unsafe fn raw_syscall6(nr: i64, a: [i64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the Linux x86_64 syscall ABI: number in rax, arguments in rdi, rsi, rdx, r10, r8,
    // r9; the instruction clobbers rcx and r11. The call's own soundness is the caller's.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// As the x86_64 version.
///
/// # Safety
/// As the x86_64 version.
#[cfg(target_arch = "aarch64")]
pub unsafe fn raw_syscall6(nr: i64, a: [i64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the Linux aarch64 syscall ABI: number in x8, arguments in x0..x5, result in x0.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

/// [`raw_syscall6`] with `Err(errno)` for a negative result.
///
/// # Safety
/// As [`raw_syscall6`].
unsafe fn raw_syscall(nr: i64, a: [i64; 6]) -> Result<i64, i32> {
    // SAFETY: forwarded contract.
    let ret = unsafe { raw_syscall6(nr, a) };
    if (-4095..0).contains(&ret) {
        Err(-ret as i32)
    } else {
        Ok(ret)
    }
}

/// A zeroed `union bpf_attr` prefix, filled by offset.
struct Attr([u8; ATTR_LEN]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR_LEN])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
}

/// `bpf(cmd, attr, size)`.
///
/// # Safety
/// Every pointer in `attr` must point at a live buffer as large as what the kernel reads or
/// writes there for `cmd` (module invariants).
unsafe fn bpf(cmd: i64, attr: &mut Attr, size: usize) -> Result<i64, i32> {
    // SAFETY: `attr` is a live buffer of ATTR_LEN ≥ size bytes; the pointers inside are the
    // caller's contract.
    unsafe {
        raw_syscall(
            libc::SYS_bpf,
            [cmd, attr.0.as_mut_ptr() as i64, size as i64, 0, 0, 0],
        )
    }
}

fn ptr(b: &[u8]) -> u64 {
    if b.is_empty() { 0 } else { b.as_ptr() as u64 }
}

/// A kernel errno as a [`MapError`] (the ones callers match on keep their variant).
pub(crate) fn map_errno(errno: i32) -> MapError {
    match errno {
        libc::ENOENT => MapError::NotFound,
        libc::EEXIST => MapError::Exists,
        libc::E2BIG => MapError::TooBig,
        e => MapError::Kernel { errno: e },
    }
}

/// Whether maps of type `ty` can live in the kernel and be used from userspace here: the data
/// map types. Ring buffers, perf event arrays, program arrays, stack traces and maps of maps
/// are written by our runtime's own code paths and stay in the store.
pub fn shareable(ty: MapType) -> bool {
    matches!(
        ty,
        MapType::Hash
            | MapType::Array
            | MapType::PercpuHash
            | MapType::PercpuArray
            | MapType::LruHash
            | MapType::LruPercpuHash
            | MapType::Queue
            | MapType::Stack
            | MapType::BloomFilter
            | MapType::LpmTrie
    )
}

/// A map just created in the kernel.
#[derive(Debug)]
pub struct Created {
    /// The creator's fd.
    pub fd: OwnedFd,
    /// The kernel's map id.
    pub id: u32,
    /// The flags the kernel map has (the caller's plus `BPF_F_MMAPABLE` for arrays).
    pub flags: u32,
}

/// Creates `def` in the kernel (`BPF_MAP_CREATE`, without BTF: the loader's BTF lives in our
/// store). Arrays get `BPF_F_MMAPABLE` so every process can map their values. `numa_node` is
/// passed as is (meaningful with `BPF_F_NUMA_NODE`).
pub fn create(
    def: &MapDef,
    map_extra: u64,
    name: &str,
    numa_node: u32,
) -> Result<Created, MapError> {
    let mut flags = def.flags;
    if def.map_type == MapType::Array as u32 {
        flags |= BPF_F_MMAPABLE;
    }
    let mut a = Attr::new();
    a.u32(0, def.map_type)
        .u32(4, def.key_size)
        .u32(8, def.value_size)
        .u32(12, def.max_entries)
        .u32(16, flags)
        .u32(24, numa_node)
        .u64(64, map_extra);
    let n = name.as_bytes();
    let l = n.len().min(15);
    a.0[28..28 + l].copy_from_slice(&n[..l]);
    // SAFETY: MAP_CREATE reads only the attr (no pointers set).
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut a, ATTR_LEN) }.map_err(map_errno)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let info = info(&fd)?;
    Ok(Created {
        fd,
        id: info.id,
        flags,
    })
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says about a kernel map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// Map type.
    pub map_type: u32,
    /// Kernel map id.
    pub id: u32,
    /// Key bytes.
    pub key_size: u32,
    /// Value bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Flags.
    pub flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a map fd.
pub fn info(fd: &impl AsRawFd) -> Result<Info, MapError> {
    let mut buf = [0u8; 24];
    let mut a = Attr::new();
    a.u32(0, fd.as_raw_fd() as u32)
        .u32(4, buf.len() as u32)
        .u64(8, buf.as_mut_ptr() as u64);
    // SAFETY: `info` points at `buf`, whose length is `info_len`.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a, 16) }.map_err(map_errno)?;
    let w = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    Ok(Info {
        map_type: w(0),
        id: w(4),
        key_size: w(8),
        value_size: w(12),
        max_entries: w(16),
        flags: w(20),
    })
}

/// `BPF_MAP_GET_FD_BY_ID` (`open_flags`: `BPF_F_RDONLY`/`BPF_F_WRONLY` or 0). Needs
/// `CAP_SYS_ADMIN`.
pub fn get_fd_by_id(id: u32, open_flags: u32) -> Result<OwnedFd, MapError> {
    let mut a = Attr::new();
    a.u32(0, id).u32(8, open_flags);
    // SAFETY: no pointers in this attr.
    let fd = unsafe { bpf(BPF_MAP_GET_FD_BY_ID, &mut a, 12) }.map_err(map_errno)?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether this process may create kernel maps: creates and closes a one-entry array.
/// `Err(errno)` (`EPERM` without `CAP_BPF`).
pub fn probe_create() -> Result<(), i32> {
    let def = MapDef {
        map_type: MapType::Array as u32,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        flags: 0,
    };
    create(&def, 0, "bpftime_probe", 0)
        .map(drop)
        .map_err(|e| e.errno())
}

/// Whether this process may open kernel maps by id (`CAP_SYS_ADMIN`): `Err(EPERM)` if not.
pub fn probe_open_by_id() -> Result<(), i32> {
    match get_fd_by_id(u32::MAX, 0) {
        Ok(_) | Err(MapError::NotFound) => Ok(()),
        Err(e) => Err(e.errno()),
    }
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// This process's connection to one kernel map (see the module documentation).
#[derive(Debug)]
pub(crate) struct Conn {
    fd: OwnedFd,
    ty: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    nr_cpus: u32,
    /// Arrays: the shared mapping of the values `(base, len, writable)`.
    values: Option<(usize, usize, bool)>,
    /// Tells this connection's per-thread copies apart from those of dropped ones.
    serial: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some((base, len, _)) = self.values {
            // SAFETY: `base`/`len` are exactly the mapping this connection made and owns; no
            // other code unmaps it.
            let _ = unsafe { raw_syscall(libc::SYS_munmap, [base as i64, len as i64, 0, 0, 0, 0]) };
        }
    }
}

impl Conn {
    /// Opens kernel map `kernel_id`, checking it still is the map `def` describes (a freed
    /// map's id may be reused), and maps an mmapable array's values.
    pub(crate) fn connect(
        kernel_id: u32,
        def: &MapDef,
        kernel_flags: u32,
        nr_cpus: u32,
        frozen: bool,
    ) -> Result<Conn, MapError> {
        let ty = MapType::try_from(def.map_type)?;
        let fd = get_fd_by_id(kernel_id, 0)?;
        let i = info(&fd)?;
        if (i.map_type, i.key_size, i.value_size, i.max_entries)
            != (def.map_type, def.key_size, def.value_size, def.max_entries)
        {
            return Err(MapError::NotFound);
        }
        let mut conn = Conn {
            fd,
            ty,
            key_size: def.key_size,
            value_size: def.value_size,
            max_entries: def.max_entries,
            nr_cpus: nr_cpus.max(1),
            values: None,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        };
        if ty == MapType::Array && kernel_flags & BPF_F_MMAPABLE != 0 {
            let len = (round8(def.value_size) * u64::from(def.max_entries)).div_ceil(4096) * 4096;
            let ro = def.flags & crate::map::BPF_F_RDONLY_PROG != 0 || frozen;
            let try_map = |prot: i32| {
                // SAFETY: a new shared mapping of the map fd, placed by the kernel (no
                // MAP_FIXED), so no existing mapping is touched.
                unsafe {
                    raw_syscall(
                        libc::SYS_mmap,
                        [
                            0,
                            len as i64,
                            i64::from(prot),
                            i64::from(libc::MAP_SHARED),
                            i64::from(conn.fd.as_raw_fd()),
                            0,
                        ],
                    )
                }
            };
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            let mapped = if ro {
                try_map(libc::PROT_READ).map(|b| (b, false))
            } else {
                // Frozen meanwhile (EPERM) or read-only by flags (EACCES): map read-only.
                try_map(rw).map(|b| (b, true)).or_else(|e| {
                    if e == libc::EPERM || e == libc::EACCES {
                        try_map(libc::PROT_READ).map(|b| (b, false))
                    } else {
                        Err(e)
                    }
                })
            };
            let (base, writable) = mapped.map_err(map_errno)?;
            conn.values = Some((base as usize, len as usize, writable));
        }
        Ok(conn)
    }

    /// Bytes of the mapped values (arrays), else 0.
    pub(crate) fn mapped_len(&self) -> u64 {
        self.values.map_or(0, |(_, l, _)| l as u64)
    }

    fn fd(&self) -> u32 {
        self.fd.as_raw_fd() as u32
    }

    fn syscall_value_size(&self) -> usize {
        if self.ty.is_percpu() {
            round8(self.value_size) as usize * self.nr_cpus as usize
        } else {
            self.value_size as usize
        }
    }

    /// One `BPF_MAP_*_ELEM`-shaped call: `key` (empty: NULL) and `value` (empty: NULL).
    fn elem(&self, cmd: i64, key: &[u8], value: *mut u8, flags: u64) -> Result<(), MapError> {
        let mut a = Attr::new();
        a.u32(0, self.fd())
            .u64(8, ptr(key))
            .u64(16, value as u64)
            .u64(24, flags);
        // SAFETY: `key` has key_size bytes (checked by `Map`), `value` points at a buffer of
        // the size the command copies (every caller passes a syscall-value-sized buffer, or a
        // key-sized one for GET_NEXT_KEY).
        unsafe { bpf(cmd, &mut a, 32) }.map(drop).map_err(map_errno)
    }

    fn index(&self, key: &[u8]) -> u32 {
        u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
    }

    /// The address of array value `i` in the mapping.
    fn mapped_value(&self, i: u32) -> Option<*mut u8> {
        let (base, _, _) = self.values?;
        (i < self.max_entries)
            .then(|| (base + i as usize * round8(self.value_size) as usize) as *mut u8)
    }

    /// Program-side lookup: a pointer into the mapping (arrays) or to a per-thread copy.
    pub(crate) fn lookup_ptr(&self, key: &[u8]) -> Result<*mut u8, MapError> {
        if self.values.is_some() {
            return self.mapped_value(self.index(key)).ok_or(MapError::NotFound);
        }
        match self.ty {
            // Programs use bpf_map_peek_elem; the kernel's lookup returns NULL.
            MapType::Queue | MapType::Stack | MapType::BloomFilter => Err(MapError::NotFound),
            t if t.is_percpu() => {
                let slot = percpu::current_slot(self.nr_cpus);
                self.percpu_copy(key, slot)
            }
            _ => {
                let vs = self.value_size as usize;
                with_copy(self.serial, vs, |p| {
                    self.elem(BPF_MAP_LOOKUP_ELEM, key, p, 0)
                })
            }
        }
    }

    /// CPU slot `slot`'s value of `key` in a per-thread copy.
    fn percpu_copy(&self, key: &[u8], slot: u32) -> Result<*mut u8, MapError> {
        let mut all = vec![0u8; self.syscall_value_size()];
        self.elem(BPF_MAP_LOOKUP_ELEM, key, all.as_mut_ptr(), 0)?;
        let stride = round8(self.value_size) as usize;
        let at = slot as usize * stride;
        let one = all
            .get(at..at + self.value_size as usize)
            .ok_or(MapError::NotFound)?;
        with_copy(self.serial, one.len(), |p| {
            // SAFETY: `p` is a per-thread copy slot of at least `one.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(one.as_ptr(), p, one.len()) };
            Ok(())
        })
    }

    /// `bpf_map_lookup_percpu_elem`.
    pub(crate) fn lookup_percpu_ptr(&self, key: &[u8], cpu: u32) -> Result<*mut u8, MapError> {
        if !self.ty.is_percpu() {
            return Err(MapError::NotFound);
        }
        let slot = percpu::slot_of_cpu(cpu, self.nr_cpus).ok_or(MapError::NotFound)?;
        self.percpu_copy(key, slot)
    }

    /// Syscall-side lookup into `out` (syscall value size).
    pub(crate) fn lookup(&self, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
        if let Some(p) = self.values.and(self.mapped_value(self.index(key))) {
            // SAFETY: `p` is a value inside our live mapping, `out` has value_size bytes
            // (checked by `Map`); a raw copy of memory others write (module invariants).
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
            return Ok(());
        }
        self.elem(BPF_MAP_LOOKUP_ELEM, key, out.as_mut_ptr(), 0)
    }

    /// Program-side update (per-CPU maps: the current CPU's value).
    pub(crate) fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        let op = crate::map::check_update_flags(flags)?;
        if let Some((_, _, writable)) = self.values {
            let i = self.index(key);
            if i >= self.max_entries {
                return Err(MapError::TooBig);
            }
            if op == BPF_NOEXIST {
                return Err(MapError::Exists);
            }
            if !writable {
                // Frozen or BPF_F_RDONLY_PROG: the kernel gave us a read-only mapping.
                return Err(MapError::Frozen);
            }
            let p = self.mapped_value(i).ok_or(MapError::TooBig)?;
            // SAFETY: `p` is value `i` of our live writable mapping; `value` has value_size
            // bytes (checked by `Map`), which fit in the value's round8 slot.
            unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), p, value.len()) };
            return Ok(());
        }
        if !self.ty.is_percpu() {
            return self.update_syscall(key, value, flags);
        }
        if self.ty == MapType::PercpuArray && self.index(key) >= self.max_entries {
            return Err(MapError::TooBig);
        }
        // Read every CPU's value, replace ours, write back (see the module documentation).
        let stride = round8(self.value_size) as usize;
        let at = percpu::current_slot(self.nr_cpus) as usize * stride;
        let mut img = vec![0u8; self.syscall_value_size()];
        loop {
            let found = match self.elem(BPF_MAP_LOOKUP_ELEM, key, img.as_mut_ptr(), 0) {
                Ok(()) => true,
                Err(MapError::NotFound) if self.ty != MapType::PercpuArray => false,
                Err(e) => return Err(e),
            };
            match (found, op) {
                (true, BPF_NOEXIST) => return Err(MapError::Exists),
                (false, BPF_EXIST) => return Err(MapError::NotFound),
                _ => {}
            }
            if !found {
                img.fill(0);
            }
            let dst = img.get_mut(at..at + value.len()).ok_or(MapError::TooBig)?;
            dst.copy_from_slice(value);
            let how = if found { BPF_EXIST } else { BPF_NOEXIST };
            let how = if self.ty == MapType::PercpuArray {
                op
            } else {
                how
            };
            match self.update_syscall(key, &img, how) {
                // Deleted or created by someone else meanwhile: go again unless the caller's
                // flags decide.
                Err(MapError::NotFound | MapError::Exists) if op == crate::map::BPF_ANY => {}
                r => return r,
            }
        }
    }

    /// Syscall-side update (`value`: the syscall value size).
    pub(crate) fn update_syscall(
        &self,
        key: &[u8],
        value: &[u8],
        flags: u64,
    ) -> Result<(), MapError> {
        // The kernel only reads the value: the const-to-mut cast is never written through.
        self.elem(BPF_MAP_UPDATE_ELEM, key, value.as_ptr().cast_mut(), flags)
    }

    pub(crate) fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        self.elem(BPF_MAP_DELETE_ELEM, key, std::ptr::null_mut(), 0)
    }

    pub(crate) fn next_key(&self, key: Option<&[u8]>, out: &mut [u8]) -> Result<(), MapError> {
        self.elem(
            BPF_MAP_GET_NEXT_KEY,
            key.unwrap_or(&[]),
            out.as_mut_ptr(),
            0,
        )
    }

    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (queues and stacks: `key` empty, a pop).
    pub(crate) fn lookup_and_delete(&self, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
        self.elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, out.as_mut_ptr(), 0)
    }

    /// Queue/stack push or bloom filter add (`BPF_MAP_UPDATE_ELEM` without a key).
    pub(crate) fn push(&self, value: &[u8], flags: u64) -> Result<(), MapError> {
        self.update_syscall(&[], value, flags)
    }

    /// Queue/stack peek into `out`, or bloom filter test of `out` (`Ok`: maybe present).
    pub(crate) fn peek(&self, out: &mut [u8]) -> Result<(), MapError> {
        self.elem(BPF_MAP_LOOKUP_ELEM, &[], out.as_mut_ptr(), 0)
    }

    pub(crate) fn freeze(&self) -> Result<(), MapError> {
        let mut a = Attr::new();
        a.u32(0, self.fd());
        // SAFETY: no pointers in this attr.
        unsafe { bpf(BPF_MAP_FREEZE, &mut a, 4) }
            .map(drop)
            .map_err(map_errno)
    }

    /// `BPF_MAP_LOOKUP(_AND_DELETE)_BATCH` of up to `count` elements after `in_batch`.
    pub(crate) fn lookup_batch(
        &self,
        in_batch: Option<&[u8]>,
        cursor_len: usize,
        count: u32,
        elem_flags: u64,
        flags: u64,
        delete: bool,
    ) -> Result<crate::batch::BatchLookup, MapError> {
        let mut out = crate::batch::BatchLookup::default();
        if count == 0 {
            return Ok(out);
        }
        let ks = self.key_size as usize;
        let vs = self.syscall_value_size();
        let mut keys = vec![0u8; ks * count as usize];
        let mut values = vec![0u8; vs * count as usize];
        let mut next = vec![0u8; cursor_len.max(ks)];
        let cursor = match in_batch {
            Some(c) if c.len() == cursor_len => c.to_vec(),
            Some(_) => return Err(MapError::Fault),
            None => Vec::new(),
        };
        let mut a = Attr::new();
        a.u64(0, ptr(&cursor))
            .u64(8, next.as_mut_ptr() as u64)
            .u64(16, keys.as_mut_ptr() as u64)
            .u64(24, values.as_mut_ptr() as u64)
            .u32(32, count)
            .u32(36, self.fd())
            .u64(40, elem_flags)
            .u64(48, flags);
        let cmd = if delete {
            BPF_MAP_LOOKUP_AND_DELETE_BATCH
        } else {
            BPF_MAP_LOOKUP_BATCH
        };
        // SAFETY: `keys`/`values` hold `count` keys / syscall values; `in_batch` (if any)
        // and `out_batch` hold a cursor (a key, or a u32 bucket for hash tables).
        let r = unsafe { bpf(cmd, &mut a, 56) };
        let done = a.get_u32(32).min(count);
        if let Err(e) = r
            && done == 0
            && e != libc::ENOENT
        {
            return Err(map_errno(e));
        }
        out.count = done;
        keys.truncate(ks * done as usize);
        values.truncate(vs * done as usize);
        out.keys = keys;
        out.values = values;
        if done > 0 {
            next.truncate(cursor_len);
            out.out_batch = Some(next);
        }
        out.err = r.err().map(map_errno);
        Ok(out)
    }
}

/// One thread's copies of one map's values.
struct Copies {
    slots: Vec<*mut u64>,
    words: usize,
    next: usize,
}

impl Drop for Copies {
    fn drop(&mut self) {
        for &p in &self.slots {
            // SAFETY: each slot was made by `Box::into_raw` of a `[u64]` of `words` words and
            // is freed exactly once, here, when the thread exits.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, self.words)) });
        }
    }
}

thread_local! {
    /// Per-thread copies of syscall-backed values, by connection serial.
    static COPIES: RefCell<HashMap<u64, Copies>> = RefCell::new(HashMap::new());
}

/// Fills the next per-thread copy slot of connection `serial` (at least `len` bytes, 8-byte
/// aligned) with `fill` and returns it.
fn with_copy(
    serial: u64,
    len: usize,
    fill: impl FnOnce(*mut u8) -> Result<(), MapError>,
) -> Result<*mut u8, MapError> {
    let words = len.div_ceil(8).max(1);
    let p = COPIES.with(|c| {
        let mut c = c.borrow_mut();
        let e = c.entry(serial).or_insert_with(|| Copies {
            slots: Vec::new(),
            words,
            next: 0,
        });
        if e.words < words {
            return None;
        }
        let i = e.next % COPY_SLOTS;
        e.next = e.next.wrapping_add(1);
        if i == e.slots.len() {
            let b: Box<[u64]> = vec![0u64; e.words].into_boxed_slice();
            e.slots.push(Box::into_raw(b).cast::<u64>());
        }
        e.slots.get(i).copied()
    });
    let p = p.ok_or(MapError::Fault)?.cast::<u8>();
    fill(p)?;
    Ok(p)
}

impl Map {
    /// Creates `def` in the kernel ([`create`]) and records it in `store` by its kernel id, so
    /// every process that opens the map uses the kernel's. Returns the (not connected) handle
    /// and the kernel fd, which the caller keeps: the kernel map lives while some fd (or
    /// kernel program) holds it. Only [`shareable`] types; `BPF_F_RDONLY`/`WRONLY` restrict
    /// the returned fd as the kernel does.
    pub fn create_in_kernel(
        store: &Arc<Store>,
        def: MapDef,
        map_extra: u64,
        name: &str,
        numa_node: u32,
    ) -> Result<(Map, OwnedFd), MapError> {
        let ty = MapType::try_from(def.map_type)?;
        if !shareable(ty) {
            return Err(MapError::NotSupported);
        }
        let created = create(&def, map_extra, name, numa_node)?;
        let map = Map::record_kernel(store, def, map_extra, created.id, created.flags, name)?;
        Ok((map, created.fd))
    }

    /// Records kernel map `kernel_id` (created with `kernel_flags`) in `store` as a map
    /// object described by `def`.
    pub fn record_kernel(
        store: &Arc<Store>,
        def: MapDef,
        map_extra: u64,
        kernel_id: u32,
        kernel_flags: u32,
        name: &str,
    ) -> Result<Map, MapError> {
        use crate::map::meta;
        let ty = MapType::try_from(def.map_type)?;
        if !shareable(ty) || kernel_id == 0 {
            return Err(MapError::NotSupported);
        }
        let def = MapDef {
            flags: def.flags & !(crate::map::BPF_F_RDONLY | crate::map::BPF_F_WRONLY),
            ..def
        };
        let nr_cpus = if ty.is_percpu() {
            percpu::nr_possible_cpus()
        } else {
            1
        };
        let (id, meta_off) = store.create(ObjectKind::Map, name, meta::LEN)?;
        let seg = store.segment();
        let w32 = |f: u64, v: u32| {
            seg.atomic_u32(meta_off + f)
                .map(|a| a.store(v, Ordering::Relaxed))
        };
        w32(meta::MAP_TYPE, def.map_type);
        w32(meta::KEY_SIZE, def.key_size);
        w32(meta::VALUE_SIZE, def.value_size);
        w32(meta::MAX_ENTRIES, def.max_entries);
        w32(meta::FLAGS, def.flags);
        w32(meta::NR_CPUS, nr_cpus);
        w32(meta::KERNEL_ID, kernel_id);
        w32(meta::KERNEL_FLAGS, kernel_flags);
        if let Some(a) = seg.atomic_u64(meta_off + meta::MAP_EXTRA) {
            a.store(map_extra, Ordering::Relaxed);
        }
        store.publish(id);
        Ok(Map {
            store: store.clone(),
            id,
            def,
            meta_off,
            data_off: 0,
            data_len: 0,
            seed: 0,
            nr_cpus,
            mirror: Default::default(),
            map_extra,
            kernel_id,
            kernel_flags,
            kernel: None,
        })
    }
}
