//! Intercepting libc's system calls in this process: counts, skipping with a result, threads,
//! signals, fork, unpatch/repatch. One test function: patching libc affects every thread of
//! the test process.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bpftime_attach::syscall::intercept::{Interceptor, SyscallCall, set_handlers};

static ON: AtomicBool = AtomicBool::new(false);
static GETPPID_ENTER: AtomicU64 = AtomicU64::new(0);
static GETPPID_EXIT: AtomicU64 = AtomicU64::new(0);
static LAST_RET: AtomicU64 = AtomicU64::new(0);
static ARG_SUM: AtomicU64 = AtomicU64::new(0);
static FAKE_CLOSE: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU64 = AtomicU64::new(0);

/// `close(-77)` with FAKE_CLOSE set returns 4242 instead of EBADF (an `int`: the upper half
/// of the register is whatever the caller left there, as the kernel sees it too).
const MAGIC_FD: i32 = -77;

extern "C" fn on_enter(c: &mut SyscallCall) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    match c.nr as i64 {
        libc::SYS_getppid => {
            GETPPID_ENTER.fetch_add(1, Ordering::Relaxed);
        }
        libc::SYS_lseek => {
            ARG_SUM.fetch_add(c.args[1] + c.args[2], Ordering::Relaxed);
        }
        libc::SYS_close if c.args[0] as i32 == MAGIC_FD && FAKE_CLOSE.load(Ordering::Relaxed) => {
            c.skip = 1;
            c.ret = 4242;
        }
        _ => {}
    }
}

extern "C" fn on_exit(c: &SyscallCall) {
    if ON.load(Ordering::Relaxed) && c.nr as i64 == libc::SYS_getppid {
        GETPPID_EXIT.fetch_add(1, Ordering::Relaxed);
        LAST_RET.store(c.ret as u64, Ordering::Relaxed);
    }
}

extern "C" fn on_usr1(_: libc::c_int) {
    // A system call from a signal handler, through a patched site.
    // SAFETY: getppid is async-signal-safe.
    unsafe { libc::getppid() };
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

fn getppid_raw() -> i64 {
    // SAFETY: getppid takes no arguments.
    unsafe { libc::syscall(libc::SYS_getppid) }
}

#[test]
fn libc_system_calls_are_intercepted_counted_and_skipped() {
    let mut ic = Interceptor::for_libc().expect("scan libc");
    let (n, skipped) = ic.counts();
    assert!(n > 100, "{n} patchable sites, {skipped} skipped");
    // The sites of getppid and of syscall() (number known only at run time).
    assert!(
        ic.sites()
            .any(|(_, nr)| nr == Some(libc::SYS_getppid as u32))
    );
    assert!(ic.sites().any(|(_, nr)| nr.is_none()));
    set_handlers(Some(on_enter), Some(on_exit));
    ON.store(true, Ordering::SeqCst);

    // Only getppid's and the unknown sites.
    let want = |nr: Option<u32>| nr.is_none_or(|n| n == libc::SYS_getppid as u32);
    // SAFETY: no arguments.
    let ppid = unsafe { libc::getppid() };
    let patched = ic.apply(want).expect("patch");
    assert!(patched >= 2);
    for _ in 0..1000 {
        // SAFETY: no arguments.
        assert_eq!(unsafe { libc::getppid() }, ppid);
        assert_eq!(getppid_raw(), i64::from(ppid));
    }
    assert_eq!(GETPPID_ENTER.load(Ordering::SeqCst), 2000);
    assert_eq!(GETPPID_EXIT.load(Ordering::SeqCst), 2000);
    assert_eq!(LAST_RET.load(Ordering::SeqCst), ppid as u64);

    // Everything: lseek's arguments, close skipped with a chosen result, errno intact.
    ic.apply(|_| true).expect("patch all");
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    let fd = unsafe { libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0);
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    assert_eq!(unsafe { libc::lseek(fd, 3, libc::SEEK_SET) }, 3);
    assert_eq!(ARG_SUM.load(Ordering::SeqCst), 3 + libc::SEEK_SET as u64);
    FAKE_CLOSE.store(true, Ordering::SeqCst);
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    assert_eq!(unsafe { libc::syscall(libc::SYS_close, -77i64) }, 4242);
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    assert_eq!(unsafe { libc::close(-77) }, 4242);
    FAKE_CLOSE.store(false, Ordering::SeqCst);
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    assert_eq!(unsafe { libc::close(-77) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EBADF)
    );
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    assert_eq!(unsafe { libc::close(fd) }, 0);

    // Threads (created through the native clone path), each counting exactly.
    let before = GETPPID_ENTER.load(Ordering::SeqCst);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..500 {
                    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
                    unsafe { libc::getppid() };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(GETPPID_ENTER.load(Ordering::SeqCst) - before, 4000);

    // A signal handler making a system call while the main thread sleeps in one (restarted
    // or EINTR as without us).
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    let me = unsafe { libc::pthread_self() };
    // Standard signals do not queue: two sent before the first is handled are delivered once.
    // So each signal is sent only after the previous one was handled (on a loaded 2-core CI
    // machine the main thread can miss several 2 ms slices).
    let sender = std::thread::spawn(move || {
        for i in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            // SAFETY: plain libc calls with valid arguments (pointers to live locals).
            unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
            let start = std::time::Instant::now();
            while SIGNALS.load(Ordering::SeqCst) <= i && start.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    });
    let start = std::time::Instant::now();
    while SIGNALS.load(Ordering::SeqCst) < 20 && start.elapsed().as_secs() < 10 {
        let mut buf = [0u8; 1];
        // SAFETY: valid buffer; read from a pipe that never gets data: blocks until a signal.
        let mut p = [0i32; 2];
        // SAFETY: plain libc calls with valid arguments (pointers to live locals).
        unsafe {
            libc::pipe(p.as_mut_ptr());
            libc::fcntl(p[0], libc::F_SETFL, 0);
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 5_000_000,
            };
            libc::nanosleep(&ts, &mut ts);
            libc::close(p[0]);
            libc::close(p[1]);
        }
        let _ = &mut buf;
    }
    sender.join().unwrap();
    assert_eq!(SIGNALS.load(Ordering::SeqCst), 20);

    // fork: the child runs through the patched sites and exits cleanly.
    let before = GETPPID_ENTER.load(Ordering::SeqCst);
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain libc calls with valid arguments (pointers to live locals).
        let ok = unsafe { libc::getppid() } > 0;
        // SAFETY: plain libc calls with valid arguments (pointers to live locals).
        unsafe { libc::_exit(if ok { 7 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7,
        "{status:#x}"
    );
    assert_eq!(
        GETPPID_ENTER.load(Ordering::SeqCst),
        before,
        "the child counts in its copy"
    );

    // Unpatch: nothing is seen any more; repatching works again.
    ic.apply(|_| false).expect("unpatch");
    assert_eq!(ic.patched(), 0);
    let before = GETPPID_ENTER.load(Ordering::SeqCst);
    // SAFETY: plain libc calls with valid arguments (pointers to live locals).
    unsafe { libc::getppid() };
    assert_eq!(GETPPID_ENTER.load(Ordering::SeqCst), before);
    for _ in 0..3 {
        ic.apply(want).expect("repatch");
        // SAFETY: plain libc calls with valid arguments (pointers to live locals).
        unsafe { libc::getppid() };
        ic.apply(|_| false).expect("unpatch");
    }
    assert_eq!(GETPPID_ENTER.load(Ordering::SeqCst), before + 3);
    ON.store(false, Ordering::SeqCst);
}
