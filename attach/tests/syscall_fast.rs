//! The gate's fast path (`intercept::set_fast`): native entries it runs itself around a system
//! call from a patched site, on the tracepoint contexts, instead of calling the handlers.
//! One test function: patching libc affects every thread of the test process.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_attach::NativeEntry;
use bpftime_attach::syscall::intercept::{
    FastProgs, Interceptor, SyscallCall, fast_traps, set_fast, set_handlers,
};
use bpftime_attach::x86_64::{NATIVE_RAN, NATIVE_TRAPPED, NativeBusy};
use iced_x86::code_asm::{CodeAssembler, qword_ptr, r8, r9, r10, r11, rax, rcx, rdi, rdx, rsi};

mod native_support;
use native_support::map_rx;

static HANDLED_ENTER: AtomicU64 = AtomicU64::new(0);
static HANDLED_EXIT: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_enter(c: &mut SyscallCall) {
    if c.nr as i64 == libc::SYS_getppid {
        HANDLED_ENTER.fetch_add(1, Ordering::Relaxed);
    }
}

extern "C" fn on_exit(c: &SyscallCall) {
    if c.nr as i64 == libc::SYS_getppid {
        HANDLED_EXIT.fetch_add(1, Ordering::Relaxed);
    }
}

/// What an entry saw: its calls and the context's 8-byte words (leaked: the code holds the
/// addresses).
struct Seen {
    calls: AtomicU64,
    len: AtomicU64,
    words: [AtomicU64; 8],
}

/// An entry that counts its calls, copies the context's first `words` words and its length,
/// then clobbers every caller-saved register; it reports that the program ran.
fn recorder(words: usize) -> (NativeEntry, &'static Seen) {
    recorder_with(words, NATIVE_RAN)
}

/// As [`recorder`], returning `status`.
fn recorder_with(words: usize, status: u64) -> (NativeEntry, &'static Seen) {
    let seen: &'static Seen = Box::leak(Box::new(Seen {
        calls: AtomicU64::new(0),
        len: AtomicU64::new(0),
        words: Default::default(),
    }));
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, seen.calls.as_ptr() as u64).unwrap();
    a.lock().inc(qword_ptr(rax)).unwrap();
    a.mov(rax, seen.len.as_ptr() as u64).unwrap();
    a.mov(qword_ptr(rax), rsi).unwrap();
    for (i, w) in seen.words.iter().enumerate().take(words) {
        a.mov(rcx, qword_ptr(rdi + 8 * i as i32)).unwrap();
        a.mov(rax, w.as_ptr() as u64).unwrap();
        a.mov(qword_ptr(rax), rcx).unwrap();
    }
    for r in [rcx, rsi, rdi, r8, r9, r10, r11] {
        a.mov(r, -1i64).unwrap();
    }
    a.xor(rax, rax).unwrap();
    a.mov(rdx, status).unwrap();
    a.ret().unwrap();
    (map_rx(&a.assemble(0).unwrap()), seen)
}

fn getppid() -> i64 {
    // SAFETY: no arguments.
    i64::from(unsafe { libc::getppid() })
}

#[test]
fn the_gate_runs_native_entries_around_the_call_itself() {
    let mut ic = Interceptor::for_libc().expect("scan libc");
    set_handlers(Some(on_enter), Some(on_exit));
    let want = |nr: Option<u32>| nr.is_none_or(|n| n == libc::SYS_getppid as u32);
    let ppid = getppid();
    assert!(ic.apply(want).expect("patch") >= 2);
    // The handlers first.
    for _ in 0..10 {
        assert_eq!(getppid(), ppid);
    }
    assert_eq!(HANDLED_ENTER.load(Ordering::SeqCst), 10);
    assert_eq!(HANDLED_EXIT.load(Ordering::SeqCst), 10);

    let (enter, e) = recorder(8);
    let (exit, x) = recorder(3);
    let progs = FastProgs {
        enter: enter as usize as u64,
        enter_id: 777,
        exit: exit as usize as u64,
        exit_id: 778,
    };
    // SAFETY: the recorders follow the native entry contract, read only what they are given
    // and are never unmapped.
    assert!(unsafe { set_fast(libc::SYS_getppid as u32, Some(progs)) });
    for _ in 0..1000 {
        assert_eq!(getppid(), ppid);
    }
    assert_eq!(e.calls.load(Ordering::SeqCst), 1000);
    assert_eq!(x.calls.load(Ordering::SeqCst), 1000);
    assert_eq!(
        HANDLED_ENTER.load(Ordering::SeqCst),
        10,
        "no handler on the fast path"
    );
    assert_eq!(
        (e.len.load(Ordering::SeqCst), x.len.load(Ordering::SeqCst)),
        (64, 24)
    );
    let w = |s: &Seen, i: usize| s.words[i].load(Ordering::SeqCst);
    // struct trace_entry: type 777, flags 0, preempt count 0, pid 0 (not filled); then nr.
    assert_eq!(w(e, 0), 777);
    assert_eq!(w(e, 1), libc::SYS_getppid as u64);
    assert_eq!(
        (w(x, 0), w(x, 1), w(x, 2)),
        (778, libc::SYS_getppid as u64, ppid as u64)
    );
    // Through syscall(), whose number is known only at run time: the six arguments.
    // SAFETY: getppid ignores its arguments.
    let r = unsafe { libc::syscall(libc::SYS_getppid, 11, 22, 33, 44, 55, 66) };
    assert_eq!(r, ppid);
    assert_eq!(
        (2..8).map(|i| w(e, i)).collect::<Vec<_>>(),
        [11, 22, 33, 44, 55, 66]
    );
    // A failing call's result (and so errno) comes back as without us: close(-1) through
    // syscall(), with an exit entry that sees -EBADF.
    let (close_exit, c) = recorder(3);
    let close_progs = FastProgs {
        enter: 0,
        enter_id: 0,
        exit: close_exit as usize as u64,
        exit_id: 779,
    };
    // SAFETY: as above.
    assert!(unsafe { set_fast(libc::SYS_close as u32, Some(close_progs)) });
    // SAFETY: closing an invalid descriptor only fails.
    assert_eq!(unsafe { libc::syscall(libc::SYS_close, -1) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EBADF)
    );
    assert_eq!(c.calls.load(Ordering::SeqCst), 1);
    assert_eq!(w(c, 2) as i64, -i64::from(libc::EBADF));
    // SAFETY: clearing.
    assert!(unsafe { set_fast(libc::SYS_close as u32, None) });
    assert_eq!(fast_traps(), 0);

    // Programs that trap: the call is still made and returns its result; each trapped run is
    // counted, the handlers are not called.
    let (t_enter, te) = recorder_with(2, NATIVE_TRAPPED);
    let (t_exit, tx) = recorder_with(3, NATIVE_TRAPPED);
    let trapping = FastProgs {
        enter: t_enter as usize as u64,
        enter_id: 780,
        exit: t_exit as usize as u64,
        exit_id: 781,
    };
    // SAFETY: as above.
    assert!(unsafe { set_fast(libc::SYS_getppid as u32, Some(trapping)) });
    for _ in 0..50 {
        assert_eq!(getppid(), ppid);
    }
    assert_eq!(
        (
            te.calls.load(Ordering::SeqCst),
            tx.calls.load(Ordering::SeqCst)
        ),
        (50, 50)
    );
    assert_eq!(fast_traps(), 100);
    assert_eq!(HANDLED_ENTER.load(Ordering::SeqCst), 10);
    // SAFETY: as above.
    assert!(unsafe { set_fast(libc::SYS_getppid as u32, Some(progs)) });

    // Four threads: every call seen once.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..5000 {
                    assert_eq!(getppid(), ppid);
                }
            });
        }
    });
    assert_eq!(e.calls.load(Ordering::SeqCst), 1001 + 20_000);
    assert_eq!(x.calls.load(Ordering::SeqCst), 1001 + 20_000);

    // A busy thread goes to the handlers.
    {
        let _busy = NativeBusy::enter();
        assert_eq!(getppid(), ppid);
    }
    assert_eq!(HANDLED_ENTER.load(Ordering::SeqCst), 11);
    assert_eq!(e.calls.load(Ordering::SeqCst), 21_001);

    // Enter only; then none: the handlers again.
    let only_enter = FastProgs { exit: 0, ..progs };
    // SAFETY: as above.
    assert!(unsafe { set_fast(libc::SYS_getppid as u32, Some(only_enter)) });
    assert_eq!(getppid(), ppid);
    assert_eq!(e.calls.load(Ordering::SeqCst), 21_002);
    assert_eq!(x.calls.load(Ordering::SeqCst), 21_001);
    // SAFETY: clearing.
    assert!(unsafe { set_fast(libc::SYS_getppid as u32, None) });
    assert_eq!(getppid(), ppid);
    assert_eq!(HANDLED_ENTER.load(Ordering::SeqCst), 12);
    assert_eq!(e.calls.load(Ordering::SeqCst), 21_002);
    // Calls that must run on the caller's stack never take it; numbers out of range neither.
    // SAFETY: refused before anything is stored.
    assert!(!unsafe { set_fast(libc::SYS_clone as u32, Some(progs)) });
    // SAFETY: as above.
    assert!(!unsafe { set_fast(100_000, Some(progs)) });
    ic.apply(|_| false).expect("unpatch");
    set_handlers(None, None);
}
