//! Every `extern "C"` entry of the preloaded library.
//!
//! Each entry checks a per-thread re-entrancy flag first: when it is already set (our own code
//! is running on this thread and called libc, which led back here), or when the call is not one
//! we emulate, the call goes to the next definition of the symbol (`dlsym(RTLD_NEXT)`, cached),
//! or for `syscall` straight to the `syscall` instruction. Emulated calls run inside
//! `catch_unwind`; a panic becomes an errno, never an unwind across the C boundary.
//!
//! `syscall` is variadic in C (`long syscall(long n, ...)`). Defining C-variadic functions is
//! unstable in Rust, so it is defined with seven `long` parameters. That is ABI-compatible with
//! a variadic call passing integer arguments on x86_64 SysV (the first six in rdi, rsi, rdx,
//! rcx, r8, r9, the seventh read from the caller's outgoing stack area, which always exists —
//! an unused slot holds garbage we pass through unread by the kernel) and on aarch64 Linux
//! (AAPCS64 passes variadic integer arguments in x0–x7 like fixed ones). The same holds for
//! `open`'s `mode`, `ioctl`'s and `fcntl`'s third argument.
//!
//! Linking the rlib into an executable (the integration tests do) exports these symbols from
//! it as well; with no store opened through `syscall`, they only forward.
//!
//! # Invariants
//!
//! - The re-entrancy flag is a `const`-initialised thread-local `Cell<bool>` without a
//!   destructor, so reading it never allocates and works during thread teardown; if it cannot be
//!   read, the call is forwarded.
//! - Function pointers come from `dlsym(RTLD_NEXT, name)` for the exact libc prototype they are
//!   transmuted to; a missing symbol makes the call fail with `ENOSYS`, never a null call.
//! - Pointers received from the caller are passed on unchanged to libc or the kernel, or read
//!   through [`crate::sys`]'s fault-safe copies; they are never dereferenced here.
#![allow(unsafe_code)]
#![allow(clippy::missing_safety_doc)]

use crate::emu::Emulator;
use crate::sys::{self, read_user_cstr, set_errno};
use crate::{Errno, STORE_ENV, files};
use libc::{FILE, c_char, c_int, c_long, c_uint, c_ulong, c_void, off_t, size_t};
use std::cell::Cell;
use std::os::fd::IntoRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Holds this thread's re-entrancy flag while our code runs.
struct Guard;

impl Guard {
    fn enter() -> Option<Guard> {
        BUSY.try_with(|b| {
            if b.get() {
                None
            } else {
                b.set(true);
                Some(Guard)
            }
        })
        .ok()
        .flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

static GLOBAL: OnceLock<Emulator> = OnceLock::new();
static OPEN: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn valid_store_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 200
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !n.starts_with('.')
}

/// The process's emulator, opening the store (`BPFTIME_STORE`, default `default`) on first
/// use.
fn global() -> Result<&'static Emulator, Errno> {
    if let Some(e) = GLOBAL.get() {
        return Ok(e);
    }
    let _g = OPEN.lock();
    if let Some(e) = GLOBAL.get() {
        return Ok(e);
    }
    let name = std::env::var(STORE_ENV).unwrap_or_else(|_| "default".to_owned());
    if !valid_store_name(&name) {
        tracing::warn!("{STORE_ENV}={name:?} is not a valid store name: EINVAL");
        return Err(Errno(libc::EINVAL));
    }
    let emu = Emulator::open_named(&name)?;
    tracing::debug!("bpftime store {:?} opened", emu.store().path());
    let _ = GLOBAL.set(emu);
    // SAFETY: `at_exit` is an `extern "C" fn()` that lives as long as this library.
    unsafe { libc::atexit(at_exit) };
    GLOBAL.get().ok_or(Errno(libc::ENOMEM))
}

extern "C" fn at_exit() {
    let Some(_g) = Guard::enter() else {
        return;
    };
    let _ = catch_unwind(|| {
        if let Some(e) = GLOBAL.get() {
            e.release_all();
        }
    });
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if BUSY.try_with(|b| b.get()).unwrap_or(true) {
                // Inside an intercepted call: never print into the loader's stderr unasked.
                tracing::error!("bpftime: internal error: {info}");
            } else {
                prev(info);
            }
        }));
    });
}

/// Runs an emulation body: logging set up, panics caught.
fn emulate<T>(f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
    crate::log::init();
    install_panic_hook();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(Errno(libc::EINVAL)),
    }
}

fn ret_long(r: Result<i64, Errno>) -> c_long {
    match r {
        Ok(v) => v as c_long,
        Err(e) => {
            set_errno(e.0);
            -1
        }
    }
}

fn ret_int(r: Result<i64, Errno>) -> c_int {
    ret_long(r) as c_int
}

fn resolve(name: &std::ffi::CStr, slot: &AtomicUsize) -> usize {
    let p = slot.load(Ordering::Acquire);
    if p != 0 {
        return p;
    }
    // SAFETY: `name` is a valid C string; RTLD_NEXT asks for the next definition after ours.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    slot.store(p, Ordering::Release);
    p
}

/// The next definition of libc function `$name` with C type `$ty`, or `None`.
macro_rules! next {
    ($name:literal, $ty:ty) => {{
        static SLOT: AtomicUsize = AtomicUsize::new(0);
        let p = resolve($name, &SLOT);
        if p == 0 {
            None
        } else {
            // SAFETY: `p` is the address dlsym gave for this libc symbol, whose C prototype is
            // `$ty` (module invariants).
            Some(unsafe { std::mem::transmute::<usize, $ty>(p) })
        }
    }};
}

fn enosys<T: From<i8>>() -> T {
    set_errno(libc::ENOSYS);
    T::from(-1)
}

/// A raw system call with libc's `syscall()` return convention.
fn forward_syscall(n: c_long, a: [c_long; 6]) -> c_long {
    // SAFETY: we forward exactly the call the caller asked libc's syscall() to make.
    let r = unsafe { sys::raw_syscall6(n, a) };
    if (-4095..0).contains(&r) {
        set_errno(-r as i32);
        -1
    } else {
        r
    }
}

/// `long syscall(long number, ...)`: `bpf` and `perf_event_open` are emulated, everything else
/// goes to the kernel.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    if n == libc::SYS_bpf || n == libc::SYS_perf_event_open {
        let Some(_g) = Guard::enter() else {
            // Re-entered (e.g. from a signal handler that interrupted our own emulation on this
            // thread): our locks are not re-entrant, and the kernel's bpf() is never used.
            set_errno(libc::EBUSY);
            return -1;
        };
        return ret_long(emulate(|| {
            let emu = global()?;
            if n == libc::SYS_bpf {
                emu.bpf(a1, a2 as u64, a3 as u64)
            } else {
                emu.perf_event_open(a1 as u64, a2, a3, a4, a5 as u64)
            }
        }));
    }
    forward_syscall(n, [a1, a2, a3, a4, a5, a6])
}

/// `int ioctl(int fd, unsigned long request, ...)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    if let Some(_g) = Guard::enter()
        && let Some(emu) = GLOBAL.get()
    {
        let r = emulate(|| Ok(emu.ioctl(fd, request, arg as usize as u64)));
        match r {
            Ok(Some(r)) => {
                if r.is_ok() {
                    let _ = emulate(|| {
                        crate::selfprobe::sync(emu);
                        Ok(())
                    });
                }
                return ret_int(r);
            }
            Ok(None) => {}
            Err(e) => return ret_int(Err(e)),
        }
    }
    match next!(
        c"ioctl",
        unsafe extern "C" fn(c_int, c_ulong, *mut c_void) -> c_int
    ) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's ioctl.
        Some(f) => unsafe { f(fd, request, arg) },
        None => enosys(),
    }
}

fn mmap_emulated(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> Option<*mut c_void> {
    let _g = Guard::enter()?;
    let emu = GLOBAL.get()?;
    if fd < 0 {
        return None;
    }
    let r = emulate(|| {
        Ok(emu.mmap(
            addr as usize as u64,
            len as u64,
            prot,
            flags,
            fd,
            off as u64,
        ))
    });
    match r {
        Ok(None) => None,
        Ok(Some(Ok(a))) => Some(a as usize as *mut c_void),
        Ok(Some(Err(e))) | Err(e) => {
            set_errno(e.0);
            Some(libc::MAP_FAILED)
        }
    }
}

/// `void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if let Some(p) = mmap_emulated(addr, len, prot, flags, fd, off) {
        return p;
    }
    type F = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    match next!(c"mmap", F) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's mmap.
        Some(f) => unsafe { f(addr, len, prot, flags, fd, off) },
        None => {
            set_errno(libc::ENOSYS);
            libc::MAP_FAILED
        }
    }
}

/// `void *mmap64(...)` (the same function on 64-bit targets).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if let Some(p) = mmap_emulated(addr, len, prot, flags, fd, off) {
        return p;
    }
    type F = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    match next!(c"mmap64", F) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's mmap64.
        Some(f) => unsafe { f(addr, len, prot, flags, fd, off) },
        None => {
            set_errno(libc::ENOSYS);
            libc::MAP_FAILED
        }
    }
}

/// `int munmap(void *addr, size_t len)`: passed through; our mapping records follow.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    let r = match next!(
        c"munmap",
        unsafe extern "C" fn(*mut c_void, size_t) -> c_int
    ) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's munmap.
        Some(f) => unsafe { f(addr, len) },
        None => return enosys(),
    };
    if r == 0
        && let Some(_g) = Guard::enter()
        && let Some(emu) = GLOBAL.get()
    {
        let _ = emulate(|| {
            emu.munmapped(addr as usize as u64, len as u64);
            Ok(())
        });
    }
    r
}

fn real_close(fd: c_int) -> c_int {
    match next!(c"close", unsafe extern "C" fn(c_int) -> c_int) {
        // SAFETY: forwarding the caller's fd to libc's close.
        Some(f) => unsafe { f(fd) },
        None => enosys(),
    }
}

/// `int close(int fd)`: closing one of our fds drops its object reference.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if let Some(_g) = Guard::enter()
        && crate::tracefs::is_writer(fd)
    {
        let applied = emulate(|| crate::tracefs::close_writer(fd));
        let r = real_close(fd);
        return match applied {
            Ok(()) => r,
            Err(e) => ret_int(Err(e)),
        };
    }
    if let Some(_g) = Guard::enter()
        && let Some(emu) = GLOBAL.get()
        && (emu.is_ours(fd) || emu.is_tracked_epoll(fd))
    {
        let mut out = -1;
        let r = emulate(|| {
            out = emu.close_with(fd, || real_close(fd));
            if crate::selfprobe::active() || crate::timer::active() {
                crate::selfprobe::sync(emu);
            }
            Ok(())
        });
        return if r.is_ok() {
            out
        } else {
            ret_int(r.map(|_| 0))
        };
    }
    real_close(fd)
}

/// Runs a dup-like call `real`, keeping our fd table in step when `old` or the fd it replaces
/// is ours.
fn dup_like(old: c_int, target: Option<c_int>, real: impl FnOnce() -> c_int) -> c_int {
    let Some(_g) = Guard::enter() else {
        return real();
    };
    let Some(emu) = GLOBAL.get() else {
        return real();
    };
    if !emu.is_ours(old) && !target.is_some_and(|t| emu.is_ours(t)) {
        return real();
    }
    let mut real = Some(real);
    let mut out = -1;
    let r = emulate(|| {
        out = emu.dup_with(old, || real.take().map_or(-1, |f| f()));
        Ok(())
    });
    if r.is_ok() {
        out
    } else {
        ret_int(r.map(|_| 0))
    }
}

/// `int dup(int fd)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    dup_like(fd, None, || {
        match next!(c"dup", unsafe extern "C" fn(c_int) -> c_int) {
            // SAFETY: forwarding the caller's fd to libc's dup.
            Some(f) => unsafe { f(fd) },
            None => enosys(),
        }
    })
}

/// `int dup2(int old, int new)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    dup_like(old, Some(new), || {
        match next!(c"dup2", unsafe extern "C" fn(c_int, c_int) -> c_int) {
            // SAFETY: forwarding the caller's fds to libc's dup2.
            Some(f) => unsafe { f(old, new) },
            None => enosys(),
        }
    })
}

/// `int dup3(int old, int new, int flags)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    dup_like(old, Some(new), || {
        match next!(c"dup3", unsafe extern "C" fn(c_int, c_int, c_int) -> c_int) {
            // SAFETY: forwarding the caller's arguments to libc's dup3.
            Some(f) => unsafe { f(old, new, flags) },
            None => enosys(),
        }
    })
}

type FcntlFn = unsafe extern "C" fn(c_int, c_int, c_ulong) -> c_int;

fn fcntl_common(fd: c_int, cmd: c_int, arg: c_ulong, real: Option<FcntlFn>) -> c_int {
    let call = || match real {
        // SAFETY: forwarding the caller's arguments unchanged to libc's fcntl.
        Some(f) => unsafe { f(fd, cmd, arg) },
        None => enosys(),
    };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        dup_like(fd, None, call)
    } else {
        call()
    }
}

/// `int fcntl(int fd, int cmd, ...)`: `F_DUPFD`/`F_DUPFD_CLOEXEC` of our fds take a reference.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    fcntl_common(fd, cmd, arg, next!(c"fcntl", FcntlFn))
}

/// `int fcntl64(int fd, int cmd, ...)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    fcntl_common(fd, cmd, arg, next!(c"fcntl64", FcntlFn))
}

/// Longest path we serve, plus one (tracefs: `/sys/kernel/debug/tracing/events/syscalls/
/// sys_enter_sched_get_priority_max/format` is 81 bytes).
const VPATH_MAX: usize = 128;

/// The content of a file we serve, if `path` names one. Reads the caller's string
/// fault-safely into a stack buffer (no allocation: `open` may be called from inside an
/// allocator's initialisation); a bad pointer is left to the real call to report.
fn served(path: *const c_char) -> Option<&'static [u8]> {
    if path.is_null() {
        return None;
    }
    let mut buf = [0u8; VPATH_MAX + 1];
    let n = sys::read_user_cstr_into(path as usize as u64, &mut buf).ok()?;
    files::virtual_file(&buf[..n])
}

/// `uprobe_events` opened for writing inside a loader (see `tracefs.rs`); with
/// `BPFTIME_NO_UPROBE_PMU=1`, the uprobe PMU's `type` file is missing (`ENOENT`), so loaders
/// take their `uprobe_events` fallback (the tests use this to exercise it).
fn open_tracefs_writer(path: *const c_char, flags: c_int) -> Option<c_int> {
    if path.is_null() {
        return None;
    }
    // Path checks first (no allocation: `open` may run inside an allocator's initialisation);
    // the environment is read only for the two paths concerned.
    let mut buf = [0u8; VPATH_MAX + 1];
    let n = sys::read_user_cstr_into(path as usize as u64, &mut buf).ok()?;
    let path = &buf[..n];
    let writer =
        flags & libc::O_ACCMODE != libc::O_RDONLY && crate::tracefs::is_uprobe_events(path);
    if !writer && path != crate::tracefs::UPROBE_PMU_TYPE_FILE.as_bytes() {
        return None;
    }
    if !crate::creds::preloaded() {
        return None;
    }
    if crate::tracefs::pmu_hidden(path) {
        set_errno(libc::ENOENT);
        return Some(-1);
    }
    if !writer {
        return None;
    }
    Some(ret_int(emulate(|| {
        crate::tracefs::open_writer(flags & libc::O_CLOEXEC != 0).map(i64::from)
    })))
}

/// An fd with the content of a served file, for an `open` with `flags`.
fn open_served(content: &'static [u8], flags: c_int) -> c_int {
    let r = emulate(|| {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(Errno(libc::EACCES));
        }
        let fd = sys::content_fd("bpftime-sysfs", content, flags & libc::O_CLOEXEC != 0)?;
        tracing::debug!("served a uprobe PMU file from memory");
        Ok(i64::from(fd.into_raw_fd()))
    });
    ret_int(r)
}

macro_rules! open_like {
    ($(#[$m:meta])* $name:ident, $sym:literal, ($($arg:ident : $t:ty),*), $path:ident, $flags:ident) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $t),*) -> c_int {
            if let Some(_g) = Guard::enter() {
                if let Some(fd) = open_tracefs_writer($path, $flags) {
                    return fd;
                }
                if let Some(c) = served($path) {
                    return open_served(c, $flags);
                }
            }
            match next!($sym, unsafe extern "C" fn($($t),*) -> c_int) {
                // SAFETY: forwarding the caller's arguments unchanged to libc.
                Some(f) => unsafe { f($($arg),*) },
                None => enosys(),
            }
        }
    };
}

open_like!(
    /// `int open(const char *path, int flags, ...)`.
    open, c"open", (path: *const c_char, flags: c_int, mode: c_uint), path, flags
);
open_like!(
    /// `int open64(const char *path, int flags, ...)`.
    open64, c"open64", (path: *const c_char, flags: c_int, mode: c_uint), path, flags
);
open_like!(
    /// `int openat(int dirfd, const char *path, int flags, ...)`.
    openat, c"openat", (dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint), path, flags
);
open_like!(
    /// `int openat64(int dirfd, const char *path, int flags, ...)`.
    openat64, c"openat64", (dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint), path, flags
);
open_like!(
    /// `int __open_2(const char *path, int flags)` (fortified `open`).
    __open_2, c"__open_2", (path: *const c_char, flags: c_int), path, flags
);
open_like!(
    /// `int __open64_2(const char *path, int flags)`.
    __open64_2, c"__open64_2", (path: *const c_char, flags: c_int), path, flags
);
open_like!(
    /// `int __openat_2(int dirfd, const char *path, int flags)`.
    __openat_2, c"__openat_2", (dirfd: c_int, path: *const c_char, flags: c_int), path, flags
);
open_like!(
    /// `int __openat64_2(int dirfd, const char *path, int flags)`.
    __openat64_2, c"__openat64_2", (dirfd: c_int, path: *const c_char, flags: c_int), path, flags
);

/// A `FILE *` over a served file (glibc's `fopen` opens without going through `open`).
fn fopen_served(content: &'static [u8], mode: *const c_char) -> *mut FILE {
    let m = match read_user_cstr(mode as usize as u64, 16) {
        Ok(m) => m,
        Err(e) => {
            set_errno(e.0);
            return std::ptr::null_mut();
        }
    };
    if m.iter().any(|c| b"wa+".contains(c)) {
        set_errno(libc::EACCES);
        return std::ptr::null_mut();
    }
    let fd = match emulate(|| sys::content_fd("bpftime-sysfs", content, m.contains(&b'e'))) {
        Ok(fd) => fd.into_raw_fd(),
        Err(e) => {
            set_errno(e.0);
            return std::ptr::null_mut();
        }
    };
    tracing::debug!("served a uprobe PMU file from memory (fopen)");
    // SAFETY: `fd` is our open fd and `mode` the caller's valid mode string (read above).
    let f = unsafe { libc::fdopen(fd, mode) };
    if f.is_null() {
        let e = sys::errno();
        let _ = sys::raw_close(fd);
        set_errno(e);
    }
    f
}

/// `FILE *fopen(const char *path, const char *mode)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
    if let Some(_g) = Guard::enter()
        && let Some(c) = served(path)
    {
        return fopen_served(c, mode);
    }
    match next!(
        c"fopen",
        unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE
    ) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's fopen.
        Some(f) => unsafe { f(path, mode) },
        None => {
            set_errno(libc::ENOSYS);
            std::ptr::null_mut()
        }
    }
}

/// `FILE *fopen64(const char *path, const char *mode)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
    if let Some(_g) = Guard::enter()
        && let Some(c) = served(path)
    {
        return fopen_served(c, mode);
    }
    match next!(
        c"fopen64",
        unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE
    ) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's fopen64.
        Some(f) => unsafe { f(path, mode) },
        None => {
            set_errno(libc::ENOSYS);
            std::ptr::null_mut()
        }
    }
}

/// `int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)`: passed through; we
/// note which of our ring buffer / perf event fds are in which set (see [`crate::epoll`]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
    let r = match next!(c"epoll_ctl", F) {
        // SAFETY: forwarding the caller's arguments unchanged to libc's epoll_ctl.
        Some(f) => unsafe { f(epfd, op, fd, event) },
        None => return enosys(),
    };
    if r == 0 {
        let e = sys::errno();
        if let Some(_g) = Guard::enter()
            && let Some(emu) = GLOBAL.get()
        {
            let _ = emulate(|| {
                emu.epoll_ctl_done(epfd, op, fd);
                Ok(())
            });
        }
        set_errno(e);
    }
    r
}

/// Runs a wait (`wait`) with our buffers armed by `arm` before it and disarmed after it,
/// keeping the wait's `errno`.
fn armed_wait<R>(arm: impl FnOnce(&Emulator) -> Vec<crate::Armed>, wait: impl FnOnce() -> R) -> R {
    let armed = match (Guard::enter(), GLOBAL.get()) {
        (Some(_g), Some(emu)) if emu.has_waking_fds() => {
            emulate(|| Ok(arm(emu))).map(|a| (emu, a)).ok()
        }
        _ => None,
    };
    let r = wait();
    if let Some((emu, a)) = armed
        && !a.is_empty()
    {
        let e = sys::errno();
        if let Some(_g) = Guard::enter() {
            let _ = emulate(|| {
                emu.after_wait(a);
                Ok(())
            });
        }
        set_errno(e);
    }
    r
}

/// `int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    maxevents: c_int,
    timeout: c_int,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
    armed_wait(
        |emu| emu.before_epoll_wait(epfd),
        || match next!(c"epoll_wait", F) {
            // SAFETY: forwarding the caller's arguments unchanged to libc's epoll_wait.
            Some(f) => unsafe { f(epfd, events, maxevents, timeout) },
            None => enosys(),
        },
    )
}

/// `int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout,
/// const sigset_t *sigmask)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    maxevents: c_int,
    timeout: c_int,
    sigmask: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        c_int,
        *const libc::sigset_t,
    ) -> c_int;
    armed_wait(
        |emu| emu.before_epoll_wait(epfd),
        || match next!(c"epoll_pwait", F) {
            // SAFETY: forwarding the caller's arguments unchanged to libc's epoll_pwait.
            Some(f) => unsafe { f(epfd, events, maxevents, timeout, sigmask) },
            None => enosys(),
        },
    )
}

/// `int epoll_pwait2(int epfd, struct epoll_event *events, int maxevents,
/// const struct timespec *timeout, const sigset_t *sigmask)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    maxevents: c_int,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    armed_wait(
        |emu| emu.before_epoll_wait(epfd),
        || match next!(c"epoll_pwait2", F) {
            // SAFETY: forwarding the caller's arguments unchanged to libc's epoll_pwait2.
            Some(f) => unsafe { f(epfd, events, maxevents, timeout, sigmask) },
            None => enosys(),
        },
    )
}

/// Most `pollfd`s we look at in one `poll` (more are passed through unarmed).
const POLL_MAX: usize = 4096;

/// The fds of the caller's `pollfd` array that wait for input (read fault-safely).
fn poll_inputs(fds: *const libc::pollfd, nfds: libc::nfds_t) -> Vec<c_int> {
    let n = (nfds as usize).min(POLL_MAX);
    let size = std::mem::size_of::<libc::pollfd>();
    let Ok(raw) = sys::read_user(fds as usize as u64, n * size) else {
        return Vec::new();
    };
    raw.chunks_exact(size)
        .filter_map(|c| {
            let fd = c_int::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            let events = i16::from_ne_bytes([c[4], c[5]]);
            (fd >= 0 && events & libc::POLLIN != 0).then_some(fd)
        })
        .collect()
}

/// `int poll(struct pollfd *fds, nfds_t nfds, int timeout)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    type F = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
    armed_wait(
        |emu| emu.before_poll(&poll_inputs(fds, nfds)),
        || match next!(c"poll", F) {
            // SAFETY: forwarding the caller's arguments unchanged to libc's poll.
            Some(f) => unsafe { f(fds, nfds, timeout) },
            None => enosys(),
        },
    )
}

/// `int __poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen)` (the
/// `_FORTIFY_SOURCE` spelling of `poll`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    type F = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int, size_t) -> c_int;
    armed_wait(
        |emu| emu.before_poll(&poll_inputs(fds, nfds)),
        || match next!(c"__poll_chk", F) {
            // SAFETY: forwarding the caller's arguments unchanged to libc's __poll_chk.
            Some(f) => unsafe { f(fds, nfds, timeout, fdslen) },
            None => enosys(),
        },
    )
}

/// `int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *tmo,
/// const sigset_t *sigmask)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    tmo: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        *mut libc::pollfd,
        libc::nfds_t,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    armed_wait(
        |emu| emu.before_poll(&poll_inputs(fds, nfds)),
        || match next!(c"ppoll", F) {
            // SAFETY: forwarding the caller's arguments unchanged to libc's ppoll.
            Some(f) => unsafe { f(fds, nfds, tmo, sigmask) },
            None => enosys(),
        },
    )
}

/// Runs `f` with this thread's re-entrancy flag set, so the libc calls it makes go to libc
/// (threads of ours that run programs, see `timer.rs`); does nothing if it is set.
pub(crate) fn guarded(f: impl FnOnce()) {
    if let Some(_g) = Guard::enter() {
        f();
    }
}

/// Whether a libc credential call should answer root (see `creds.rs`).
fn fake_root() -> bool {
    Guard::enter().is_some_and(|_g| crate::creds::fake_root())
}

/// `uid_t getuid(void)`: 0 inside a loader (see `creds.rs`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getuid() -> libc::uid_t {
    if fake_root() {
        return 0;
    }
    match next!(c"getuid", unsafe extern "C" fn() -> libc::uid_t) {
        // SAFETY: getuid has no arguments or preconditions.
        Some(f) => unsafe { f() },
        // SAFETY: the raw system call has no arguments.
        None => unsafe { sys::raw_syscall6(libc::SYS_getuid, [0; 6]) as libc::uid_t },
    }
}

/// `uid_t geteuid(void)`: 0 inside a loader (see `creds.rs`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn geteuid() -> libc::uid_t {
    if fake_root() {
        return 0;
    }
    match next!(c"geteuid", unsafe extern "C" fn() -> libc::uid_t) {
        // SAFETY: geteuid has no arguments or preconditions.
        Some(f) => unsafe { f() },
        // SAFETY: the raw system call has no arguments.
        None => unsafe { sys::raw_syscall6(libc::SYS_geteuid, [0; 6]) as libc::uid_t },
    }
}

/// `int getresuid(uid_t *r, uid_t *e, uid_t *s)`: all 0 inside a loader.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getresuid(
    r: *mut libc::uid_t,
    e: *mut libc::uid_t,
    s: *mut libc::uid_t,
) -> c_int {
    if fake_root() {
        let zero = 0u32.to_ne_bytes();
        for p in [r, e, s] {
            if let Err(err) = sys::write_user(p as usize as u64, &zero) {
                set_errno(err.0);
                return -1;
            }
        }
        return 0;
    }
    type F = unsafe extern "C" fn(*mut libc::uid_t, *mut libc::uid_t, *mut libc::uid_t) -> c_int;
    match next!(c"getresuid", F) {
        // SAFETY: forwarding the caller's pointers unchanged to libc's getresuid.
        Some(f) => unsafe { f(r, e, s) },
        None => enosys(),
    }
}

/// Reads a NULL-terminated `char *[]` (at most 65536 entries) fault-safely.
fn read_cstr_array(p: *const *const c_char) -> Result<Vec<Vec<u8>>, Errno> {
    let mut out = Vec::new();
    if p.is_null() {
        return Ok(out);
    }
    for i in 0..65536u64 {
        let at = (p as usize as u64).saturating_add(i * 8);
        let w = sys::read_user(at, 8)?;
        let s = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if s == 0 {
            return Ok(out);
        }
        out.push(read_user_cstr(s, 1 << 20)?);
    }
    Err(Errno(libc::E2BIG))
}

/// The loader's environment for a program it starts, if it must change (see
/// `creds.rs`): owned strings and the NULL-terminated pointer array over them.
fn child_envp(envp: *const *const c_char) -> Option<(Vec<std::ffi::CString>, Vec<*const c_char>)> {
    let _g = Guard::enter()?;
    if !crate::creds::preloaded() {
        return None;
    }
    let env = read_cstr_array(envp).ok()?;
    let refs: Vec<&[u8]> = env.iter().map(Vec::as_slice).collect();
    let owned = crate::creds::child_env(&refs)?;
    let mut ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    Some((owned, ptrs))
}

/// `int execve(const char *path, char *const argv[], char *const envp[])`: a program started
/// by a loader gets the agent instead of this library (see `creds.rs`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    type F =
        unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    let Some(f) = next!(c"execve", F) else {
        return enosys();
    };
    if let Some((_owned, ptrs)) = child_envp(envp) {
        // SAFETY: `ptrs` is a NULL-terminated array of valid C strings owned by `_owned`, which
        // lives until execve returns (it only returns on failure).
        return unsafe { f(path, argv, ptrs.as_ptr()) };
    }
    // SAFETY: forwarding the caller's arguments unchanged to libc's execve.
    unsafe { f(path, argv, envp) }
}

/// `int execvpe(const char *file, char *const argv[], char *const envp[])`: as [`execve`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    type F =
        unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    let Some(f) = next!(c"execvpe", F) else {
        return enosys();
    };
    if let Some((_owned, ptrs)) = child_envp(envp) {
        // SAFETY: as in `execve`.
        return unsafe { f(file, argv, ptrs.as_ptr()) };
    }
    // SAFETY: forwarding the caller's arguments unchanged to libc's execvpe.
    unsafe { f(file, argv, envp) }
}

type SetrlimitFn = unsafe extern "C" fn(c_int, *const libc::rlimit) -> c_int;

fn setrlimit_common(
    resource: c_int,
    rlim: *const libc::rlimit,
    real: Option<SetrlimitFn>,
) -> c_int {
    let Some(f) = real else {
        return enosys();
    };
    // SAFETY: forwarding the caller's arguments unchanged to libc.
    let r = unsafe { f(resource, rlim) };
    if r != 0
        && resource as u32 == libc::RLIMIT_MEMLOCK
        && sys::errno() == libc::EPERM
        && Guard::enter().is_some_and(|_g| crate::creds::preloaded())
    {
        // Loaders raise RLIMIT_MEMLOCK for the kernel's map accounting; emulated maps lock no
        // kernel memory, so the limit does not matter and an unprivileged loader may go on.
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK) refused by the kernel: ignored in a loader");
        return 0;
    }
    r
}

/// `int setrlimit(int resource, const struct rlimit *rlim)`: in a loader, raising
/// `RLIMIT_MEMLOCK` beyond the hard limit succeeds (nothing is locked).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setrlimit(resource: c_int, rlim: *const libc::rlimit) -> c_int {
    setrlimit_common(resource, rlim, next!(c"setrlimit", SetrlimitFn))
}

/// `int setrlimit64(int resource, const struct rlimit64 *rlim)`: as [`setrlimit`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setrlimit64(resource: c_int, rlim: *const libc::rlimit) -> c_int {
    setrlimit_common(resource, rlim, next!(c"setrlimit64", SetrlimitFn))
}
