//! The mapped store file: the only module of this crate that turns offsets into memory.
//!
//! # Invariants
//!
//! - At open, a large range of address space is reserved (`PROT_NONE`, `MAP_NORESERVE`); the
//!   store file is mapped `MAP_SHARED | MAP_FIXED` at the start of that range. The base never
//!   moves, so a pointer formed from an offset stays valid for the life of the [`Segment`].
//! - `mapped` only grows, and `[base, base + mapped)` is always backed by the file: the file
//!   never shrinks (the store only grows it with `ftruncate`), so no access below `mapped` can
//!   `SIGBUS`.
//! - Every access goes through [`Segment::range`], which checks `off + len <= mapped` (remapping
//!   first if the file grew in another process). Offsets read from the store are untrusted and
//!   are always checked here, never dereferenced raw.
//! - Other processes write this memory concurrently. We never form `&`/`&mut` to plain data in
//!   it: only `&AtomicU32`/`&AtomicU64` (naturally aligned, checked) and raw-pointer copies.
//! - A [`Mirror`] maps a page-aligned file range twice back to back inside its own reservation
//!   (so `MAP_FIXED` only replaces its own placeholder); the same access rules apply to it, and
//!   its accessors bound-check against twice its length.
//! - The socket, `poll` and `kill` wrappers at the end (wake-ups, see [`crate::wake`]) touch no
//!   memory of ours besides local buffers.
//! - [`current_cpu`] reads the calling thread's rseq area (`cpu_id`), which glibc registered
//!   with the kernel at `thread pointer + __rseq_offset` (glibc's public ABI, `sys/rseq.h`)
//!   when `__rseq_size` says so; otherwise it asks `sched_getcpu`.

use parking_lot::Mutex;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Address space reserved per store (virtual only). 64 GiB.
pub const DEFAULT_RESERVE: usize = 64 << 30;

/// A store file mapped into this process.
#[derive(Debug)]
pub struct Segment {
    base: *mut u8,
    reserved: usize,
    mapped: AtomicUsize,
    fd: OwnedFd,
    remap: Mutex<()>,
}

// SAFETY: the segment is a region of shared memory accessed only through atomics and raw
// copies (module invariants); `base` never changes and is valid for the life of the value, so
// it may be used from any thread.
unsafe impl Send for Segment {}
// SAFETY: as above; all mutation of `mapped` goes through an atomic and the remap mutex.
unsafe impl Sync for Segment {}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Segment {
    /// Opens (creating with mode 0600 if absent) the file at `path` and maps it.
    /// Returns the segment and whether the file was empty (so the caller initializes it).
    /// Refuses a file owned by another user or accessible by group/others.
    pub fn open(path: &Path, reserve: usize) -> io::Result<Segment> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `c` is a valid NUL-terminated path; flags and mode are plain integers.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(&fd)?;
        let euid = euid();
        if st.st_uid != euid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "store {} belongs to uid {}, not to this user (uid {euid})",
                    path.display(),
                    st.st_uid
                ),
            ));
        }
        if st.st_mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "store {} is accessible by other users (mode {:o})",
                    path.display(),
                    st.st_mode & 0o777
                ),
            ));
        }
        // SAFETY: reserving fresh address space; no existing mapping is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(errno());
        }
        let seg = Segment {
            base: base.cast(),
            reserved: reserve,
            mapped: AtomicUsize::new(0),
            fd,
            remap: Mutex::new(()),
        };
        seg.sync_mapping()?;
        Ok(seg)
    }

    /// The file descriptor of the store file (for `mmap` of map data by loaders).
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Bytes currently mapped.
    pub fn mapped(&self) -> usize {
        self.mapped.load(Ordering::Acquire)
    }

    /// Current size of the file.
    pub fn file_len(&self) -> io::Result<usize> {
        Ok(fstat(&self.fd)?.st_size as usize)
    }

    /// Maps any part of the file that grew since the last call.
    pub fn sync_mapping(&self) -> io::Result<()> {
        let _g = self.remap.lock();
        let len = self.file_len()?.min(self.reserved);
        let have = self.mapped.load(Ordering::Acquire);
        if len <= have {
            return Ok(());
        }
        let page = page_size();
        let have_aligned = have / page * page;
        let len_aligned = len / page * page;
        if len_aligned > have_aligned {
            // SAFETY: the target range lies inside our own reservation (len <= reserved), above
            // everything already mapped, so MAP_FIXED replaces only our PROT_NONE placeholder.
            let p = unsafe {
                libc::mmap(
                    self.base.add(have_aligned).cast(),
                    len_aligned - have_aligned,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.fd.as_raw_fd(),
                    have_aligned as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(errno());
            }
            self.mapped.store(len_aligned, Ordering::Release);
        }
        Ok(())
    }

    /// Grows the file to at least `len` bytes (page-rounded) and maps it.
    pub fn grow(&self, len: usize) -> io::Result<()> {
        if len > self.reserved {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let page = page_size();
        let len = len.div_ceil(page) * page;
        if self.file_len()? < len {
            // SAFETY: plain syscall on our own fd; growing never invalidates mapped pages.
            if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) } != 0 {
                return Err(errno());
            }
        }
        self.sync_mapping()
    }

    /// Checks that `[off, off + len)` is inside the mapped store (mapping more if the file grew)
    /// and returns its address.
    #[inline]
    pub fn range(&self, off: u64, len: usize) -> Option<*mut u8> {
        let end = (off as usize).checked_add(len)?;
        if end > self.mapped.load(Ordering::Acquire) {
            self.sync_mapping().ok()?;
            if end > self.mapped.load(Ordering::Acquire) {
                return None;
            }
        }
        // SAFETY: off + len <= mapped <= reserved, so the result stays inside the reservation.
        Some(unsafe { self.base.add(off as usize) })
    }

    /// The `AtomicU64` at `off` (8-byte aligned, in bounds).
    #[inline]
    pub fn atomic_u64(&self, off: u64) -> Option<&AtomicU64> {
        if !off.is_multiple_of(8) {
            return None;
        }
        let p = self.range(off, 8)?;
        // SAFETY: in bounds of mapped shared memory (checked), aligned (checked); the memory is
        // only ever accessed atomically or by raw copies (module invariants); it lives as long as
        // `self`, which bounds the returned reference.
        Some(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    /// The `AtomicU32` at `off` (4-byte aligned, in bounds).
    #[inline]
    pub fn atomic_u32(&self, off: u64) -> Option<&AtomicU32> {
        if !off.is_multiple_of(4) {
            return None;
        }
        let p = self.range(off, 4)?;
        // SAFETY: as for `atomic_u64`, with 4-byte alignment.
        Some(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// Copies `buf.len()` bytes at `off` into `buf`.
    #[inline]
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Option<()> {
        let p = self.range(off, buf.len())?;
        // SAFETY: source checked in bounds; `buf` is a distinct local buffer. Values of 4 and
        // 8 bytes (counters, most keys) are one unaligned load, not a `memcpy` call.
        unsafe {
            match buf.len() {
                8 => buf.copy_from_slice(&p.cast::<[u8; 8]>().read_unaligned()),
                4 => buf.copy_from_slice(&p.cast::<[u8; 4]>().read_unaligned()),
                n => std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n),
            }
        }
        Some(())
    }

    /// Copies `buf` to `off`.
    #[inline]
    pub fn write(&self, off: u64, buf: &[u8]) -> Option<()> {
        let p = self.range(off, buf.len())?;
        // SAFETY: destination checked in bounds and writable (mapped RW); `buf` is distinct.
        // 4 and 8 bytes: one unaligned store, not a `memcpy` call.
        unsafe {
            match *buf {
                [a, b, c, d, e, f, g, h] => {
                    p.cast::<[u8; 8]>()
                        .write_unaligned([a, b, c, d, e, f, g, h]);
                }
                [a, b, c, d] => p.cast::<[u8; 4]>().write_unaligned([a, b, c, d]),
                _ => std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()),
            }
        }
        Some(())
    }

    /// Zeroes `len` bytes at `off`.
    pub fn zero(&self, off: u64, len: usize) -> Option<()> {
        let p = self.range(off, len)?;
        // SAFETY: destination checked in bounds and writable.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Some(())
    }

    /// Whether `addr..addr+len` (a host address) lies in the mapped store; returns its offset.
    pub fn offset_of(&self, addr: usize, len: usize) -> Option<u64> {
        let base = self.base as usize;
        let off = addr.checked_sub(base)?;
        (off.checked_add(len)? <= self.mapped()).then_some(off as u64)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range we reserved; no references into it outlive `self`
        // (every reference handed out borrows `self`).
        unsafe { libc::munmap(self.base.cast(), self.reserved) };
    }
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `st` is a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(errno());
    }
    Ok(st)
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// Waits while `*word == expected`, up to `timeout_ns` (FUTEX_WAIT on shared memory).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `word` is a valid aligned u32 in shared memory; FUTEX_WAIT only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes every waiter on `word` in any process.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid aligned u32; FUTEX_WAKE does not access it.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// The low 32 bits of an aligned `u64` word, as a futex word.
pub fn low_half(word: &AtomicU64) -> &AtomicU32 {
    // SAFETY: on little-endian targets the low 32 bits of an aligned u64 are its first 4 bytes;
    // 8-byte alignment implies 4-byte alignment; the view borrows `word`, so it cannot outlive
    // it. Mixed-size atomic access to one location is what futex-based locks do on Linux.
    unsafe { AtomicU32::from_ptr(word.as_ptr().cast()) }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// `flock(2)` on `fd`.
pub fn flock(fd: i32, op: i32) -> io::Result<()> {
    // SAFETY: flock takes plain integers; an invalid fd is reported as EBADF.
    if unsafe { libc::flock(fd, op) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Segment {
    /// `[off, off + len)` checked once, for several accesses to one structure in it (a hash
    /// element's fields): the [`Window`]'s accessors check against `len` only.
    #[inline]
    pub fn window(&self, off: u64, len: usize) -> Option<Window<'_>> {
        let base = self.range(off, len)?;
        Some(Window {
            base,
            len,
            _segment: std::marker::PhantomData,
        })
    }
}

/// A range of a [`Segment`] checked in bounds when it was made ([`Segment::window`]); it
/// borrows the segment, whose mapping never shrinks or moves, so it stays valid.
#[derive(Clone, Copy, Debug)]
pub struct Window<'a> {
    base: *mut u8,
    len: usize,
    _segment: std::marker::PhantomData<&'a Segment>,
}

impl<'a> Window<'a> {
    /// The `AtomicU32` at `rel` bytes into the window (4-byte aligned, inside it).
    #[inline]
    pub fn atomic_u32(&self, rel: usize) -> Option<&'a AtomicU32> {
        if rel.checked_add(4)? > self.len {
            return None;
        }
        let p = self.base.wrapping_add(rel);
        if !(p as usize).is_multiple_of(4) {
            return None;
        }
        // SAFETY: inside the window (checked), which lies in mapped shared memory for `'a`
        // (checked at `Segment::window`; the mapping never shrinks or moves); aligned
        // (checked); accessed only atomically or by raw copies (module invariants).
        Some(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// Whether the bytes at `rel` equal `data` (None when past the window). Keys of 4 and 8
    /// bytes are compared as one word each (no `memcmp` call).
    #[inline]
    pub fn bytes_eq(&self, rel: usize, data: &[u8]) -> Option<bool> {
        if rel.checked_add(data.len())? > self.len {
            return None;
        }
        let p = self.base.wrapping_add(rel);
        // SAFETY: `[p, p + data.len())` is inside the window (checked), in mapped memory for
        // `'a`. Raw unaligned reads (or a byte view dropped before returning) of memory others
        // may write: a torn comparison only yields a spurious mismatch or match of a key being
        // replaced, which callers tolerate like the kernel's lockless lookups.
        Some(unsafe {
            match *data {
                [a, b, c, d] => p.cast::<[u8; 4]>().read_unaligned() == [a, b, c, d],
                [a, b, c, d, e, f, g, h] => {
                    p.cast::<[u8; 8]>().read_unaligned() == [a, b, c, d, e, f, g, h]
                }
                _ => std::slice::from_raw_parts(p, data.len()) == data,
            }
        })
    }
}

/// `clock_gettime(CLOCK_MONOTONIC)` in ns (system-wide, so comparable across processes).
pub fn monotonic_raw_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

thread_local! {
    // The CPU a program run on this thread is pinned to (u32::MAX: none). Const-initialised
    // and without a destructor, so it stays usable while the thread's TLS is torn down.
    static PINNED_CPU: std::cell::Cell<u32> = const { std::cell::Cell::new(u32::MAX) };
}

/// The CPU the calling thread runs on (`sched_getcpu`, served from rseq or the vDSO: no
/// system call); 0 if the kernel cannot tell. Inside a [`pin_cpu`] scope, the pinned CPU.
#[inline]
pub fn current_cpu() -> u32 {
    let pinned = PINNED_CPU.with(std::cell::Cell::get);
    if pinned != u32::MAX {
        return pinned;
    }
    cpu_now()
}

/// Offset of glibc's per-thread rseq area from the thread pointer, when glibc registered one
/// with the kernel (`__rseq_size` covers `cpu_id`); resolved once.
#[cfg(target_arch = "x86_64")]
#[inline]
fn rseq_offset() -> Option<isize> {
    // One relaxed load on the hot path (`UNKNOWN` until resolved, `NONE` without rseq).
    const UNKNOWN: isize = isize::MIN;
    const NONE: isize = isize::MIN + 1;
    static OFF: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(UNKNOWN);
    match OFF.load(Ordering::Relaxed) {
        UNKNOWN => {}
        NONE => return None,
        off => return Some(off),
    }
    let found = resolve_rseq_offset();
    OFF.store(found.unwrap_or(NONE), Ordering::Relaxed);
    found
}

#[cfg(target_arch = "x86_64")]
#[cold]
fn resolve_rseq_offset() -> Option<isize> {
    // SAFETY: dlsym with a NUL-terminated name has no other preconditions.
    let (size, off) = unsafe {
        (
            libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32,
            libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize,
        )
    };
    if size.is_null() || off.is_null() {
        return None;
    }
    // SAFETY: glibc's exported constants (`unsigned int __rseq_size`, `ptrdiff_t
    // __rseq_offset`), set before any user code runs and never written again.
    let (size, off) = unsafe { (size.read(), off.read()) };
    // `struct rseq`: u32 cpu_id_start, then u32 cpu_id.
    (size >= 8).then_some(off)
}

/// Where every thread's rseq `cpu_id` (a `u32`; negative until the kernel registered the
/// area) lies relative to its thread pointer (`fs` base), when glibc registered rseq areas:
/// what generated code reads to learn its CPU without a call.
#[cfg(target_arch = "x86_64")]
pub fn rseq_cpu_id_offset() -> Option<i32> {
    rseq_offset().and_then(|off| i32::try_from(off.checked_add(4)?).ok())
}

/// The CPU the calling thread runs on now (its rseq `cpu_id`, else `sched_getcpu`), pinned or
/// not (for runs that need no pin: nothing in them asks [`current_cpu`]).
#[inline]
pub fn cpu_now() -> u32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(off) = rseq_offset() {
        let tp: usize;
        // SAFETY: on x86_64 glibc, `fs:0` holds the thread pointer (the TCB's self pointer).
        unsafe {
            core::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
        };
        let at = (tp as isize).wrapping_add(off).wrapping_add(4) as *const u32;
        // SAFETY: glibc keeps every thread's rseq area at `tp + __rseq_offset` for the
        // thread's life (module invariants); the kernel updates `cpu_id`, hence the volatile
        // read. Negative values mean "not registered": ask libc then.
        let cpu = unsafe { at.read_volatile() };
        if (cpu as i32) >= 0 {
            return cpu;
        }
    }
    // SAFETY: sched_getcpu has no preconditions; it returns -1 on error.
    let c = unsafe { libc::sched_getcpu() };
    c.max(0) as u32
}

/// Pins [`current_cpu`] on this thread to the CPU it runs on now, until the guard drops
/// (nested pins keep the outer CPU).
///
/// A program run in the kernel cannot migrate (preemption is off), so its per-CPU lookup and the
/// update that follows address the same CPU's slot. A userspace thread can migrate between the
/// two; pinning the CPU *index* for the run keeps the kernel's behaviour for the thread itself
/// (a `count()`-style lookup-then-update of one thread never writes another slot's value back).
/// Two threads that share a slot can still interleave — see the README's limits.
#[inline]
pub fn pin_cpu() -> CpuPin {
    // One thread-local access per pin (the guard keeps the cell's address for its drop).
    let cell: *const std::cell::Cell<u32> = PINNED_CPU.with(|p| p as *const _);
    // SAFETY: the cell is this thread's `PINNED_CPU`, const-initialised without a destructor:
    // it lives until the thread ends, beyond this call.
    let p = unsafe { &*cell };
    let prev = p.get();
    let cpu = if prev == u32::MAX {
        let c = cpu_now();
        p.set(c);
        c
    } else {
        prev
    };
    CpuPin { cell, prev, cpu }
}

/// Guard of [`pin_cpu`]; restores the previous state on drop. Not `Send`: it belongs to the
/// thread whose CPU it pinned.
#[derive(Debug)]
#[must_use = "the CPU stays pinned only while the guard lives"]
pub struct CpuPin {
    cell: *const std::cell::Cell<u32>,
    prev: u32,
    cpu: u32,
}

impl CpuPin {
    /// The pinned CPU id (what [`current_cpu`] returns while the guard lives).
    #[inline]
    pub fn cpu(&self) -> u32 {
        self.cpu
    }
}

impl Drop for CpuPin {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `cell` is the creating thread's `PINNED_CPU` (see `pin_cpu`), alive until
        // that thread ends; the guard is not `Send`, so this runs on that thread.
        unsafe { (*self.cell).set(self.prev) };
    }
}

/// A page-aligned range of the store file mapped twice, back to back, in this process's address
/// space (`[base, base + len)` and `[base + len, base + 2 × len)` show the same file pages), so
/// a record that wraps around the end of a ring buffer is contiguous in memory — the kernel's
/// ring buffer layout (`kernel/bpf/ringbuf.c`, `bpf_ringbuf_area_alloc`).
///
/// The mapping is independent of the [`Segment`] it was made from (it maps the file, not the
/// segment), and is unmapped on drop. Like the segment, it is shared memory written by other
/// processes: only atomics and raw copies touch it.
#[derive(Debug)]
pub struct Mirror {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mirror is shared memory accessed only through atomics and raw copies (module
// invariants); `base` is fixed and valid until drop.
unsafe impl Send for Mirror {}
// SAFETY: as above; the mirror has no interior state besides the mapping.
unsafe impl Sync for Mirror {}

impl Segment {
    /// Maps `[off, off + len)` of the store file twice back to back (see [`Mirror`]). `off` and
    /// `len` must be page multiples and the range inside the file.
    pub fn mirror(&self, off: u64, len: usize) -> io::Result<Mirror> {
        let page = page_size();
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        if len == 0 || !len.is_multiple_of(page) || !off.is_multiple_of(page as u64) {
            return Err(einval());
        }
        self.range(off, len).ok_or_else(einval)?;
        let total = len.checked_mul(2).ok_or_else(einval)?;
        let foff = libc::off_t::try_from(off).map_err(|_| einval())?;
        // SAFETY: reserving fresh address space; no existing mapping is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(errno());
        }
        let m = Mirror {
            base: base.cast(),
            len,
        };
        for half in 0..2 {
            // SAFETY: the target lies inside the reservation made above, which only `m` owns,
            // so MAP_FIXED replaces nothing but our own placeholder; the file range is in
            // bounds (checked) and the file never shrinks.
            let p = unsafe {
                libc::mmap(
                    m.base.add(half * len).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.fd.as_raw_fd(),
                    foff,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(errno()); // `m` unmaps the reservation on drop
            }
        }
        Ok(m)
    }
}

impl Mirror {
    /// Address of the first copy.
    pub fn base(&self) -> usize {
        self.base as usize
    }

    /// Bytes of one copy (the mapped range is twice this).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a mirror is never empty); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of `[pos, pos + n)`, which must lie inside the double mapping.
    #[inline]
    pub fn ptr(&self, pos: usize, n: usize) -> Option<*mut u8> {
        let end = pos.checked_add(n)?;
        if end > 2 * self.len {
            return None;
        }
        // SAFETY: pos + n <= 2 × len, the size of the mapping.
        Some(unsafe { self.base.add(pos) })
    }

    /// The `AtomicU32` at `pos` (4-byte aligned, in bounds).
    #[inline]
    pub fn atomic_u32(&self, pos: usize) -> Option<&AtomicU32> {
        if !pos.is_multiple_of(4) {
            return None;
        }
        let p = self.ptr(pos, 4)?;
        // SAFETY: in bounds and aligned (checked); the memory is only accessed atomically or by
        // raw copies; the reference borrows `self`, which keeps the mapping alive.
        Some(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// The `AtomicU64` at `pos` (8-byte aligned, in bounds).
    #[inline]
    pub fn atomic_u64(&self, pos: usize) -> Option<&AtomicU64> {
        if !pos.is_multiple_of(8) {
            return None;
        }
        let p = self.ptr(pos, 8)?;
        // SAFETY: as for `atomic_u32`, with 8-byte alignment.
        Some(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    /// Copies `data` to `pos`.
    pub fn write(&self, pos: usize, data: &[u8]) -> Option<()> {
        let p = self.ptr(pos, data.len())?;
        // SAFETY: destination in bounds and writable (mapped RW); `data` is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Some(())
    }

    /// Copies `buf.len()` bytes at `pos` into `buf`.
    pub fn read(&self, pos: usize, buf: &mut [u8]) -> Option<()> {
        let p = self.ptr(pos, buf.len())?;
        // SAFETY: source in bounds; `buf` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// The position of host address range `[addr, addr + n)` inside the double mapping.
    pub fn position_of(&self, addr: usize, n: usize) -> Option<usize> {
        let pos = addr.checked_sub(self.base as usize)?;
        (pos.checked_add(n)? <= 2 * self.len).then_some(pos)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the reservation this value owns; references into it borrow
        // `self` and are gone.
        unsafe { libc::munmap(self.base.cast(), 2 * self.len) };
    }
}

fn abstract_addr(name: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: all-zero is a valid `sockaddr_un`.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Abstract namespace: a leading NUL, then the name (not NUL-terminated).
    if name.is_empty() || name.len() + 1 > a.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in a.sun_path[1..].iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len();
    Ok((a, len as libc::socklen_t))
}

/// A non-blocking, close-on-exec `AF_UNIX` datagram socket, bound to the abstract socket
/// address `name` when given (`EADDRINUSE` if someone holds that name).
pub fn dgram_socket(name: Option<&[u8]>) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(name) = name {
        let (a, len) = abstract_addr(name)?;
        // SAFETY: `a` is a valid sockaddr_un of `len` bytes for the duration of the call.
        let r = unsafe { libc::bind(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) };
        if r != 0 {
            return Err(errno());
        }
    }
    Ok(fd)
}

/// Sends a one-byte datagram from `fd` to the abstract socket `name`, without blocking. Fails
/// with `ECONNREFUSED` if nobody holds the name, `EAGAIN` if its queue is full (then it is
/// readable already).
pub fn dgram_send(fd: i32, name: &[u8]) -> io::Result<()> {
    let (a, len) = abstract_addr(name)?;
    let b = [1u8];
    // SAFETY: `b` and `a` are valid for the call; a bad fd is reported as EBADF/ENOTSOCK.
    let r = unsafe {
        libc::sendto(
            fd,
            b.as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            (&a as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// Receives and discards every queued datagram of `fd` (non-blocking).
pub fn dgram_drain(fd: i32) {
    let mut b = [0u8; 64];
    loop {
        // SAFETY: `b` is a writable buffer of its length; a bad fd returns -1.
        let r = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
        if r < 0 {
            return;
        }
    }
}

/// Waits up to `timeout_ms` (-1: forever) for `fd` to become readable; true if it is.
pub fn poll_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// Whether process `pid` exists (`kill(pid, 0)` does not fail with `ESRCH`).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forget_pid_in_child() {
    PID.store(0, Ordering::Relaxed);
}

/// This process's id, cached (glibc does not cache `getpid`); the cache is cleared in the
/// child after `fork`.
#[inline]
pub fn cached_pid() -> u32 {
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    static ATFORK: std::sync::Once = std::sync::Once::new();
    ATFORK.call_once(|| {
        // SAFETY: the handler only stores to an atomic, which is valid in a freshly forked
        // child (async-signal-safe).
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid_in_child)) };
    });
    let p = std::process::id();
    PID.store(p, Ordering::Relaxed);
    p
}
