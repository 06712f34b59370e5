//! Low-level system access: raw system calls, errno, fault-safe access to the loader's memory,
//! placeholder file descriptors.
//!
//! # Invariants
//!
//! - Memory named by an intercepted call (attr pointers, keys, values, log buffers, paths) is
//!   untrusted. It is only ever read or written with `process_vm_readv`/`process_vm_writev` on
//!   our own pid, which report `EFAULT` for a bad address instead of faulting; no reference or
//!   raw dereference is ever formed to it.
//! - [`raw_syscall6`] issues the machine's `syscall`/`svc` instruction directly, so it never
//!   re-enters the exported `syscall` symbol (which [`crate::ffi`] defines).
//! - Functions here only call into libc through symbols that are either not interposed, or are
//!   interposed with a re-entrancy guard that forwards to libc (see [`crate::ffi`]).
#![allow(unsafe_code)]

use crate::Errno;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Issues a raw system call (`-errno` on failure, `errno` untouched), never through libc — the
/// store crate's, shared with the kernel-map code.
pub use bpftime_maps::kernel::raw_syscall6;

/// The calling thread's `errno`.
pub fn errno() -> i32 {
    // SAFETY: `__errno_location` returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(e: i32) {
    // SAFETY: `__errno_location` returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() = e }
}

fn last_errno() -> Errno {
    Errno(errno())
}

/// Copies `buf.len()` bytes from address `addr` of this process into `buf`, or `EFAULT` if any
/// byte is not readable.
pub fn read_user_into(addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    if buf.is_empty() {
        return Ok(());
    }
    if addr == 0 || addr.checked_add(buf.len() as u64).is_none() {
        return Err(Errno(libc::EFAULT));
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` names `buf`, which we own mutably for the call; `remote` is only
    // accessed by the kernel, which checks it and reports EFAULT.
    let n = unsafe {
        libc::process_vm_readv(
            bpftime_maps::shm::cached_pid() as i32,
            &local,
            1,
            &remote,
            1,
            0,
        )
    };
    if n < 0 {
        let e = errno();
        return Err(Errno(if e == libc::ESRCH || e == libc::EPERM {
            libc::EFAULT
        } else {
            e
        }));
    }
    if n as usize != buf.len() {
        return Err(Errno(libc::EFAULT));
    }
    Ok(())
}

/// Reads `len` bytes at `addr` of this process.
pub fn read_user(addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
    let mut v = vec![0u8; len];
    read_user_into(addr, &mut v)?;
    Ok(v)
}

/// Writes `data` to address `addr` of this process, or `EFAULT` if any byte is not writable.
pub fn write_user(addr: u64, data: &[u8]) -> Result<(), Errno> {
    if data.is_empty() {
        return Ok(());
    }
    if addr == 0 || addr.checked_add(data.len() as u64).is_none() {
        return Err(Errno(libc::EFAULT));
    }
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: the kernel only reads `local` (our slice) and checks `remote`, reporting EFAULT
    // for an address that is not writable.
    let n = unsafe {
        libc::process_vm_writev(
            bpftime_maps::shm::cached_pid() as i32,
            &local,
            1,
            &remote,
            1,
            0,
        )
    };
    if n < 0 || n as usize != data.len() {
        return Err(Errno(libc::EFAULT));
    }
    Ok(())
}

/// Reads a NUL-terminated string at `addr` of at most `max` bytes (without the NUL).
/// `EFAULT` if unreadable, `ENAMETOOLONG` if no NUL within `max` bytes.
pub fn read_user_cstr(addr: u64, max: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; max + 1];
    let n = read_user_cstr_into(addr, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads a NUL-terminated string at `addr` into `buf` without allocating; returns its length
/// (without the NUL). `EFAULT` if unreadable, `ENAMETOOLONG` if no NUL fits in `buf`.
pub fn read_user_cstr_into(addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    const PAGE: u64 = 4096;
    let mut done = 0;
    let mut cur = addr;
    while done < buf.len() {
        let chunk = ((PAGE - cur % PAGE) as usize).min(buf.len() - done);
        read_user_into(cur, &mut buf[done..done + chunk])?;
        if let Some(n) = buf[done..done + chunk].iter().position(|&b| b == 0) {
            return Ok(done + n);
        }
        done += chunk;
        cur = cur.checked_add(chunk as u64).ok_or(Errno(libc::EFAULT))?;
    }
    Err(Errno(libc::ENAMETOOLONG))
}

/// A new memfd named `name` (visible in `/proc/<pid>/fd` as `/memfd:<name>`).
pub fn memfd(name: &str, cloexec: bool, sealing: bool) -> Result<OwnedFd, Errno> {
    let c = CString::new(name.replace('\0', "")).map_err(|_| Errno(libc::EINVAL))?;
    let mut flags = 0;
    if cloexec {
        flags |= libc::MFD_CLOEXEC;
    }
    if sealing {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: `c` is a valid C string for the duration of the call.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: `fd` was just returned by memfd_create and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sealed, read-only-content memfd holding `content`, positioned at offset 0.
pub fn content_fd(name: &str, content: &[u8], cloexec: bool) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    let fd = memfd(name, cloexec, true)?;
    let raw = fd.as_raw_fd();
    // SAFETY: `content` is a valid buffer of its length; `raw` is our open fd.
    let n = unsafe { libc::pwrite(raw, content.as_ptr().cast(), content.len(), 0) };
    if n < 0 || n as usize != content.len() {
        return Err(last_errno());
    }
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on our own fd. (fcntl may be interposed by us; the interposer
    // forwards F_ADD_SEALS to libc.)
    unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) };
    Ok(fd)
}

/// `(st_dev, st_ino)` of an open fd, or `None` if `fd` is not open.
pub fn fd_identity(fd: RawFd) -> Option<(u64, u64)> {
    if fd < 0 {
        return None;
    }
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable buffer of the right type; fstat fills it on success.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so it initialized `st`.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// Whether `fd` names an open file.
pub fn fd_is_open(fd: RawFd) -> bool {
    fd_identity(fd).is_some()
}

/// Closes `fd` with the raw system call (bypassing every interposer).
pub fn raw_close(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: closing an fd number cannot violate memory safety; callers own `fd`.
    let r = unsafe { raw_syscall6(libc::SYS_close, [fd as i64, 0, 0, 0, 0, 0]) };
    if r < 0 { Err(Errno(-r as i32)) } else { Ok(()) }
}

/// `dup(fd)` with the raw system call (bypassing every interposer).
pub fn raw_dup(fd: RawFd) -> Result<RawFd, Errno> {
    // SAFETY: dup creates a new fd number and touches no memory.
    let r = unsafe { raw_syscall6(libc::SYS_dup, [fd as i64, 0, 0, 0, 0, 0]) };
    if r < 0 {
        Err(Errno(-r as i32))
    } else {
        Ok(r as RawFd)
    }
}

/// Maps `len` bytes of `fd` at `off` (a thin wrapper: the result is an address, not a
/// reference, and nothing here touches the mapping).
pub fn mmap_raw(
    addr: u64,
    len: usize,
    prot: i32,
    flags: i32,
    fd: RawFd,
    off: u64,
) -> Result<u64, Errno> {
    let off = libc::off_t::try_from(off).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: mapping a file cannot affect memory we hold references to unless the caller
    // passes MAP_FIXED over such memory; with MAP_FIXED, `addr` is the loader's own request
    // (as it would be to the kernel), we forward it unchanged.
    let p = unsafe {
        libc::mmap(
            addr as usize as *mut libc::c_void,
            len,
            prot,
            flags,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last_errno())
    } else {
        Ok(p as usize as u64)
    }
}

/// The real `bpf(cmd, attr, size)` with the loader's own attr (commands on kernel-backed map
/// fds, which the kernel answers).
pub fn real_bpf(cmd: i32, uattr: u64, size: u32) -> Result<i64, Errno> {
    // SAFETY: the loader's own bpf() call, forwarded unchanged: the kernel validates the attr
    // and every pointer in it against this process's memory, as it would have without us.
    let r = unsafe {
        raw_syscall6(
            libc::SYS_bpf,
            [i64::from(cmd), uattr as i64, i64::from(size), 0, 0, 0],
        )
    };
    if r < 0 { Err(Errno(-r as i32)) } else { Ok(r) }
}

/// Opens `path` read-only (close-on-exec).
pub fn open_rdonly(path: &str) -> Result<OwnedFd, Errno> {
    let c = CString::new(path).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: `c` is a valid C string; open returns a new fd or -1.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: `fd` was just returned by open and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Boot-time clock in nanoseconds (`CLOCK_BOOTTIME`, as `bpf_prog_info.load_time`).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Whether process `pid` exists (`kill(pid, 0)` does not fail with `ESRCH`).
pub fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || errno() != libc::ESRCH
}

/// Number of configured CPUs (`nr_cpu_ids`).
pub fn nr_cpus() -> i64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if n <= 0 { 1 } else { n }
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> Result<(), Errno> {
    // SAFETY: F_GETFD/F_SETFD only change the fd's flags; a bad fd is EBADF. (fcntl may be
    // interposed by us; the interposer forwards these commands to libc.)
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(last_errno());
    }
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// Unmaps `[addr, addr + len)` (a mapping we made ourselves).
pub fn munmap_raw(addr: u64, len: usize) -> Result<(), Errno> {
    // SAFETY: callers pass only ranges they mapped themselves and hold no references into.
    if unsafe { libc::munmap(addr as usize as *mut libc::c_void, len) } != 0 {
        return Err(last_errno());
    }
    Ok(())
}
