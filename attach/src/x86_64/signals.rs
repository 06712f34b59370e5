//! The two signal handlers of the hook engine.
//!
//! - `SIGTRAP`: a thread that hits the int3 written during a patch (see `patch`) is sent to the
//!   hook's stub; one that hits an int3 we already replaced retries the instruction; any other
//!   trap goes to the handler that was installed before ours (or the default action).
//! - A real-time "stop" signal: [`stop_the_world`] sends it to every other thread and waits
//!   until each is parked in the handler (or provably not in the code being patched). The
//!   patcher then writes the code and [`Stopped::release`] lets them go; on the way out each
//!   thread whose interrupted pc is the source of a [`Fixup`] moves to its destination — how a
//!   thread suspended between two instructions of a patched prologue gets into the trampoline,
//!   and one that entered a removed hook's stub gets back to the original code.
//!
//! # Invariants
//!
//! - Handlers touch only atomics, the interrupted thread's own `ucontext_t`, and its stack; they
//!   call only async-signal-safe system calls (`futex`, `gettid`, `getpid`, `sigaction`,
//!   `raise`) and preserve `errno`.
//! - Between [`stop_the_world`] and [`Stopped::release`] the stopping thread allocates nothing
//!   and takes no lock (a parked thread may hold the allocator's); it reads `/proc` with raw
//!   system calls into stack buffers.
//! - A parked thread applies fixups only of its own generation and only when released with
//!   `apply`; the fixup table is not rewritten until every thread has left the handler.
//! - Callers hold the hook registry lock, so there is one stop and one armed trap at a time.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::AttachError;

/// Most threads a stop can track.
pub(crate) const MAX_THREADS: usize = 4096;
/// Most fixups per stop (a 14-byte patch has at most 13 inner instruction boundaries).
pub(crate) const MAX_FIXUPS: usize = 16;
/// How long to wait for threads to park before looking at the ones that did not.
const ACK_WAIT: Duration = Duration::from_millis(500);
/// How long to keep trying before giving up on a thread that does not park.
const GIVE_UP: Duration = Duration::from_millis(3000);
/// `si_code` of a kernel-generated trap (`int3`).
const SI_KERNEL: c_int = 0x80;
/// `si_code` of `sigqueue`/`rt_tgsigqueueinfo`.
const SI_QUEUE: c_int = -1;

/// A thread stopped at `from` continues at `to` with `rsp_delta` added to rsp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fixup {
    pub from: usize,
    pub to: usize,
    pub rsp_delta: u64,
}

// ---- SIGTRAP ----------------------------------------------------------------------------

/// Seqlock over the armed (target, stub) pair: odd while being written.
static TRAP_SEQ: AtomicU32 = AtomicU32::new(0);
static TRAP_TARGET: AtomicUsize = AtomicUsize::new(0);
static TRAP_STUB: AtomicUsize = AtomicUsize::new(0);
/// Addresses where we wrote an int3 lately, to recognise a late trap after the byte changed.
static RECENT: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];
static RECENT_NEXT: AtomicUsize = AtomicUsize::new(0);

/// The application's `SIGTRAP` disposition: the one before ours, or what it installed since
/// (through [`intercept_sigaction`], or seen by [`recheck_trap_handler`]). A seqlock: odd while
/// being written. Traps that are not ours go there.
static APP_SEQ: AtomicU32 = AtomicU32::new(0);
static APP_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static APP_FLAGS: AtomicU64 = AtomicU64::new(0);
static APP_MASK: AtomicU64 = AtomicU64::new(0);
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static INIT: OnceLock<Result<(), i32>> = OnceLock::new();

#[derive(Debug, Clone, Copy)]
struct AppAction {
    handler: usize,
    flags: c_int,
    /// Signals 1–64 of `sa_mask`.
    mask: u64,
}

fn app_action() -> AppAction {
    loop {
        let s1 = APP_SEQ.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            core::hint::spin_loop();
            continue;
        }
        let a = AppAction {
            handler: APP_HANDLER.load(Ordering::Acquire),
            flags: APP_FLAGS.load(Ordering::Acquire) as c_int,
            mask: APP_MASK.load(Ordering::Acquire),
        };
        if APP_SEQ.load(Ordering::Acquire) == s1 {
            return a;
        }
    }
}

/// Callers serialise (the registry lock, or `APP_WRITE`).
fn set_app_action(a: AppAction) {
    APP_SEQ.fetch_add(1, Ordering::AcqRel);
    APP_HANDLER.store(a.handler, Ordering::Release);
    APP_FLAGS.store(a.flags as u32 as u64, Ordering::Release);
    APP_MASK.store(a.mask, Ordering::Release);
    APP_SEQ.fetch_add(1, Ordering::AcqRel);
}

static APP_WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn mask_bits(set: &libc::sigset_t) -> u64 {
    // SAFETY: sigset_t is plain data of at least 8 bytes; glibc keeps signals 1–64 in its
    // first word (bit n-1 for signal n).
    unsafe { core::ptr::read_unaligned((set as *const libc::sigset_t).cast::<u64>()) }
}

fn set_mask_bits(set: &mut libc::sigset_t, bits: u64) {
    // SAFETY: as in `mask_bits`; sigemptyset clears the rest.
    unsafe {
        libc::sigemptyset(set);
        core::ptr::write_unaligned((set as *mut libc::sigset_t).cast::<u64>(), bits);
    }
}

/// Installs both handlers (once per process).
pub(crate) fn init() -> Result<(), AttachError> {
    let r = INIT.get_or_init(|| {
        install_trap_handler()?;
        install_stop_handler()
    });
    r.map_err(|errno| AttachError::Os {
        op: "sigaction",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn action(
    handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void),
    flags: c_int,
) -> libc::sigaction {
    // SAFETY: sigaction is plain data; all-zero is a valid (empty) value that we then fill.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = flags | libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigfillset(&mut sa.sa_mask) };
    sa
}

/// Our `SIGTRAP` action: runs on the current stack (probe handlers may need more than an
/// alternate signal stack offers), and does not block `SIGTRAP` itself, so a probe hit by
/// a handler (a helper calling a probed function) traps again instead of killing the process.
fn trap_action() -> libc::sigaction {
    let mut sa = action(on_trap, libc::SA_NODEFER | libc::SA_RESTART);
    // SAFETY: a valid sigset_t owned by `sa`.
    unsafe { libc::sigdelset(&mut sa.sa_mask, libc::SIGTRAP) };
    sa
}

fn install_trap_handler() -> Result<(), i32> {
    let sa = trap_action();
    // SAFETY: zeroed sigaction is valid output storage.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: valid pointers to a filled-in action and to output storage.
    if unsafe { libc::sigaction(libc::SIGTRAP, &sa, &mut old) } != 0 {
        return Err(errno());
    }
    if old.sa_sigaction != on_trap as *const () as usize {
        set_app_action(AppAction {
            handler: old.sa_sigaction,
            flags: old.sa_flags,
            mask: mask_bits(&old.sa_mask),
        });
    }
    Ok(())
}

/// Whether `handler` is one of this crate's signal handlers.
pub fn is_own_handler(handler: usize) -> bool {
    handler == on_trap as *const () as usize || handler == on_stop as *const () as usize
}

/// For a `sigaction` interposer: once trap-based probes may exist (our `SIGTRAP` handler is
/// installed), the application's `SIGTRAP` actions are recorded here, and traps that are not
/// ours go to them, instead of replacing our handler. Returns `None` when the call is not ours
/// to answer (another signal, our handler not installed, or our own installation) — forward it
/// to the real `sigaction` then.
///
/// # Safety
/// `act` and `old` must each be null or valid for reading / writing a `struct sigaction`.
pub unsafe fn intercept_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> Option<c_int> {
    if sig != libc::SIGTRAP || !matches!(INIT.get(), Some(Ok(()))) {
        return None;
    }
    // SAFETY: the caller's contract on `act`.
    let new = unsafe { act.as_ref() };
    if new.is_some_and(|a| is_own_handler(a.sa_sigaction)) {
        return None;
    }
    let _w = APP_WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let prev = app_action();
    // SAFETY: the caller's contract on `old`.
    if let Some(o) = unsafe { old.as_mut() } {
        // SAFETY: sigaction is plain data; zero is a valid starting point.
        *o = unsafe { core::mem::zeroed() };
        o.sa_sigaction = prev.handler;
        o.sa_flags = prev.flags;
        set_mask_bits(&mut o.sa_mask, prev.mask);
    }
    if let Some(a) = new {
        set_app_action(AppAction {
            handler: a.sa_sigaction,
            flags: a.sa_flags,
            mask: mask_bits(&a.sa_mask),
        });
    }
    Some(0)
}

/// The kernel's `struct sigaction` for `rt_sigaction`.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// If something replaced our `SIGTRAP` handler behind the interposer's back (a raw
/// `rt_sigaction`, or a program without the interposer), takes the new action as the
/// application's and puts ours back. Returns whether it had to. Does nothing before the first
/// hook.
pub fn recheck_trap_handler() -> Result<bool, AttachError> {
    if !matches!(INIT.get(), Some(Ok(()))) {
        return Ok(false);
    }
    let mut cur = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: query only (null new action); `cur` is the kernel's 32-byte layout with an
    // 8-byte mask.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGTRAP,
            core::ptr::null::<KernelSigaction>(),
            &mut cur as *mut KernelSigaction,
            8usize,
        )
    };
    if rc != 0 {
        return Err(AttachError::last_os("rt_sigaction(SIGTRAP)"));
    }
    if cur.handler == on_trap as *const () as usize {
        return Ok(false);
    }
    let _w = APP_WRITE.lock().unwrap_or_else(|e| e.into_inner());
    set_app_action(AppAction {
        handler: cur.handler,
        flags: cur.flags as c_int,
        mask: cur.mask,
    });
    let sa = trap_action();
    // SAFETY: a filled-in action; no old action wanted.
    if unsafe { libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut()) } != 0 {
        return Err(AttachError::last_os("sigaction(SIGTRAP)"));
    }
    Ok(true)
}

fn install_stop_handler() -> Result<(), i32> {
    // The highest real-time signal nobody handles; glibc keeps the first two for itself.
    for sig in (libc::SIGRTMIN() + 2..=libc::SIGRTMAX()).rev() {
        // SAFETY: zeroed sigaction is valid output storage.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: querying only (null new action), valid output pointer.
        if unsafe { libc::sigaction(sig, core::ptr::null(), &mut old) } != 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL {
            continue;
        }
        let sa = action(on_stop, libc::SA_RESTART | libc::SA_ONSTACK);
        // SAFETY: valid pointer to a filled-in action.
        if unsafe { libc::sigaction(sig, &sa, core::ptr::null_mut()) } != 0 {
            return Err(errno());
        }
        STOP_SIGNAL.store(sig, Ordering::Release);
        return Ok(());
    }
    Err(libc::EBUSY)
}

/// From now on, a thread trapping on an int3 at `target` continues at `stub`.
pub(crate) fn arm_trap(target: usize, stub: usize) {
    let i = RECENT_NEXT.fetch_add(1, Ordering::Relaxed) % RECENT.len();
    RECENT[i].store(target, Ordering::Release);
    TRAP_SEQ.fetch_add(1, Ordering::AcqRel);
    TRAP_STUB.store(stub, Ordering::Release);
    TRAP_TARGET.store(target, Ordering::Release);
    TRAP_SEQ.fetch_add(1, Ordering::AcqRel);
}

/// Ends the redirection set by [`arm_trap`]; late trappers retry the (rewritten) instruction.
pub(crate) fn disarm_trap() {
    TRAP_SEQ.fetch_add(1, Ordering::AcqRel);
    TRAP_TARGET.store(0, Ordering::Release);
    TRAP_STUB.store(0, Ordering::Release);
    TRAP_SEQ.fetch_add(1, Ordering::AcqRel);
}

/// The stub for an int3 at `addr`, if it is the armed one.
fn armed_stub(addr: usize) -> Option<usize> {
    loop {
        let s1 = TRAP_SEQ.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            core::hint::spin_loop();
            continue;
        }
        let target = TRAP_TARGET.load(Ordering::Acquire);
        let stub = TRAP_STUB.load(Ordering::Acquire);
        if TRAP_SEQ.load(Ordering::Acquire) == s1 {
            return (target != 0 && target == addr).then_some(stub);
        }
    }
}

fn gregs(ctx: *mut c_void) -> *mut [libc::greg_t; 23] {
    // SAFETY (of the callers' use): the kernel passes a valid ucontext_t for SA_SIGINFO
    // handlers; we only form a raw pointer to its register array here.
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: `uc` points to the live ucontext of this signal frame.
    unsafe { core::ptr::addr_of_mut!((*uc).uc_mcontext.gregs) }
}

/// Remembers that an int3 was at `addr` (a removed trap probe), so a thread that trapped on
/// it just before the original byte came back retries the instruction.
pub(crate) fn remember_int3(addr: usize) {
    let i = RECENT_NEXT.fetch_add(1, Ordering::Relaxed) % RECENT.len();
    RECENT[i].store(addr, Ordering::Release);
}

extern "C" fn on_trap(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: errno is thread-local; its location is valid for the thread's life.
    let saved_errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes valid siginfo/ucontext pointers to an SA_SIGINFO handler, both
    // owned by this signal frame. Register accesses go through short-lived borrows.
    let code = unsafe { (*info).si_code };
    let set_rip = |v: usize| {
        // SAFETY: as above.
        unsafe { (*gregs(ctx))[libc::REG_RIP as usize] = v as libc::greg_t };
    };
    let mut ours = false;
    if code == SI_KERNEL {
        // SAFETY: as above.
        let rip = unsafe { (*gregs(ctx))[libc::REG_RIP as usize] } as usize;
        let addr = rip.wrapping_sub(1);
        if let Some(stub) = armed_stub(addr) {
            set_rip(stub);
            ours = true;
        } else if super::trap::dispatch(addr, ctx) {
            ours = true;
        } else if RECENT.iter().any(|r| r.load(Ordering::Acquire) == addr) {
            // SAFETY: `addr` is a patch site of ours inside mapped text (we wrote an int3 there);
            // text stays mapped.
            let byte = unsafe { core::ptr::read_volatile(addr as *const u8) };
            if byte != super::patch::INT3 {
                // Our int3 was replaced meanwhile: run whatever is there now.
                set_rip(addr);
                ours = true;
            }
        }
    }
    if !ours {
        chain(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Passes a trap that is not ours to the application's disposition, with the signal mask
/// its action asks for.
fn chain(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let app = app_action();
    if app.handler == libc::SIG_DFL || app.handler == libc::SIG_IGN {
        // A trap cannot be ignored (the kernel kills on an ignored forced SIGTRAP): restore the
        // default action and re-raise; it terminates the process as if we had never been here.
        // The raw system call: libc's `sigaction` may be an interposer (the agent's) that
        // keeps our handler in place, and the trap would then come back for ever.
        let dfl = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: `dfl` is the kernel's 32-byte layout (SIG_DFL, empty 8-byte mask); no old
        // action wanted; rt_sigaction and raise are async-signal-safe.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                core::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
            libc::raise(sig);
        }
        return;
    }
    // The mask the kernel would have set for the application's handler: the interrupted
    // context's, plus its sa_mask, plus the signal unless SA_NODEFER.
    // SAFETY: `ctx` is this frame's ucontext; sigset_t values are plain data.
    let mut want: libc::sigset_t = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_sigmask };
    let mut bits = mask_bits(&want) | app.mask;
    if app.flags & libc::SA_NODEFER == 0 {
        bits |= 1 << (sig - 1);
    }
    // SAFETY: `want` is a valid sigset_t; its first word holds signals 1–64.
    unsafe { core::ptr::write_unaligned((&mut want as *mut libc::sigset_t).cast::<u64>(), bits) };
    // SAFETY: zeroed sigset_t is valid output storage.
    let mut saved: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: valid sigset pointers; pthread_sigmask is async-signal-safe.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &want, &mut saved) };
    if app.flags & libc::SA_RESETHAND != 0 {
        set_app_action(AppAction {
            handler: libc::SIG_DFL,
            flags: 0,
            mask: 0,
        });
    }
    if app.flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the application installed an SA_SIGINFO handler with this signature; we
        // pass it the frame's own arguments.
        let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
            unsafe { core::mem::transmute(app.handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the application installed a plain `void (*)(int)` handler.
        let f: extern "C" fn(c_int) = unsafe { core::mem::transmute(app.handler) };
        f(sig);
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, core::ptr::null_mut()) };
}

// ---- stop the world ---------------------------------------------------------------------

static GEN: AtomicU32 = AtomicU32::new(0);
/// Generation being stopped (0: none). Handlers of other generations leave at once.
static ACTIVE: AtomicU32 = AtomicU32::new(0);
/// Futex: the last released generation.
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// Generation whose fixups parked threads apply.
static APPLY: AtomicU32 = AtomicU32::new(0);
/// Futex: threads parked in the current generation.
static ACKS: AtomicU32 = AtomicU32::new(0);
/// Threads inside the stop handler, any generation.
static ENTERED: AtomicU32 = AtomicU32::new(0);
static NFIX: AtomicUsize = AtomicUsize::new(0);
static FIX_FROM: [AtomicUsize; MAX_FIXUPS] = [const { AtomicUsize::new(0) }; MAX_FIXUPS];
static FIX_TO: [AtomicUsize; MAX_FIXUPS] = [const { AtomicUsize::new(0) }; MAX_FIXUPS];
static FIX_RSP: [AtomicU64; MAX_FIXUPS] = [const { AtomicU64::new(0) }; MAX_FIXUPS];
static NTIDS: AtomicUsize = AtomicUsize::new(0);
static TIDS: [AtomicI32; MAX_THREADS] = [const { AtomicI32::new(0) }; MAX_THREADS];
/// Per thread of the current stop: the generation it parked in (or was found gone).
static ACKED: [AtomicU32; MAX_THREADS] = [const { AtomicU32::new(0) }; MAX_THREADS];
/// How many times a stopped thread was moved by a fixup (diagnostics for tests).
static FIXUPS_APPLIED: AtomicU64 = AtomicU64::new(0);

/// How many times a stopped thread was moved by a fixup since the process started.
pub(crate) fn fixups_applied() -> u64 {
    FIXUPS_APPLIED.load(Ordering::Relaxed)
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as _,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word` (a live static) and sleeps; the
    // timeout pointer is null or points to a live timespec.
    unsafe {
        raw_syscall4(
            libc::SYS_futex,
            word.as_ptr() as u64,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as u64,
            u64::from(expected),
            ts_ptr as u64,
        );
    }
}

/// A system call made by our own `syscall` instruction, not through libc: the handlers here
/// run with every signal blocked, and libc's system call sites may be patched (syscall
/// tracepoints) or briefly hold an int3 while they are.
///
/// # Safety
/// As for the system call made.
unsafe fn raw_syscall4(nr: libc::c_long, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let ret: i64;
    // SAFETY: forwarded contract; `syscall` clobbers rcx and r11 only.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key.
    unsafe {
        raw_syscall4(
            libc::SYS_futex,
            word.as_ptr() as u64,
            (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as u64,
            n as u64,
            0,
        );
    }
}

fn gettid() -> i32 {
    // SAFETY: no arguments, no memory.
    unsafe { raw_syscall4(libc::SYS_gettid, 0, 0, 0, 0) as i32 }
}

fn getpid() -> i32 {
    // SAFETY: no arguments, no memory.
    unsafe { raw_syscall4(libc::SYS_getpid, 0, 0, 0, 0) as i32 }
}

extern "C" fn on_stop(_sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: errno is thread-local; its location is valid for the thread's life.
    let saved_errno = unsafe { *libc::__errno_location() };
    ENTERED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: valid siginfo of this frame; si_pid/si_ptr are meaningful for SI_QUEUE, which
    // is checked first.
    let (code, pid, generation) = unsafe {
        let code = (*info).si_code;
        if code == SI_QUEUE {
            (code, (*info).si_pid(), (*info).si_ptr() as usize as u32)
        } else {
            (code, 0, 0)
        }
    };
    if code == SI_QUEUE
        && pid == getpid()
        && generation != 0
        && ACTIVE.load(Ordering::SeqCst) == generation
    {
        let me = gettid();
        let n = NTIDS.load(Ordering::Acquire);
        if let Some(i) = (0..n).find(|&i| TIDS[i].load(Ordering::Relaxed) == me) {
            ACKED[i].store(generation, Ordering::Release);
        }
        ACKS.fetch_add(1, Ordering::AcqRel);
        futex_wake(&ACKS, 1);
        loop {
            let r = RELEASED.load(Ordering::Acquire);
            if r == generation {
                break;
            }
            futex_wait(&RELEASED, r, None);
        }
        if APPLY.load(Ordering::Acquire) == generation {
            // SAFETY: the ucontext of this frame; writing its rip/rsp changes where this
            // thread resumes after sigreturn, to places the patcher prepared.
            let regs = unsafe { &mut *gregs(ctx) };
            let pc = regs[libc::REG_RIP as usize] as usize;
            let nfix = NFIX.load(Ordering::Acquire);
            if let Some(i) = (0..nfix).find(|&i| FIX_FROM[i].load(Ordering::Relaxed) == pc) {
                regs[libc::REG_RIP as usize] = FIX_TO[i].load(Ordering::Relaxed) as libc::greg_t;
                let delta = FIX_RSP[i].load(Ordering::Relaxed);
                regs[libc::REG_RSP as usize] =
                    (regs[libc::REG_RSP as usize] as u64).wrapping_add(delta) as libc::greg_t;
                FIXUPS_APPLIED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    ENTERED.fetch_sub(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Every other thread parked (or shown to be elsewhere). Release with [`Stopped::release`];
/// dropping releases without applying fixups.
#[derive(Debug)]
#[must_use = "threads stay parked until released"]
pub(crate) struct Stopped {
    generation: u32,
    released: bool,
}

/// Parks every other thread of the process in the stop handler. Threads whose pc is the
/// `from` of a fixup move when released with `apply`.
pub(crate) fn stop_the_world(fixups: &[Fixup]) -> Result<Stopped, AttachError> {
    if fixups.len() > MAX_FIXUPS {
        return Err(AttachError::Unrelocatable {
            at: fixups[0].from,
            reason: "too many instructions in the patch",
        });
    }
    let sig = STOP_SIGNAL.load(Ordering::Acquire);
    let mut generation = GEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    if generation == 0 {
        generation = GEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    }
    for (i, f) in fixups.iter().enumerate() {
        FIX_FROM[i].store(f.from, Ordering::Relaxed);
        FIX_TO[i].store(f.to, Ordering::Relaxed);
        FIX_RSP[i].store(f.rsp_delta, Ordering::Relaxed);
    }
    NFIX.store(fixups.len(), Ordering::Release);
    ACKS.store(0, Ordering::Release);
    let n = list_threads(gettid())?;
    NTIDS.store(n, Ordering::Release);
    ACTIVE.store(generation, Ordering::SeqCst);
    let stopped = Stopped {
        generation,
        released: false,
    };

    let (pid, uid) = (getpid(), {
        // SAFETY: no arguments, no memory.
        unsafe { libc::getuid() }
    });
    let mut sent = 0u32;
    for i in 0..n {
        let tid = TIDS[i].load(Ordering::Relaxed);
        // siginfo_t for rt_tgsigqueueinfo: signo, errno, code, pad, pid, uid, sigval.
        let mut si = [0u64; 16];
        si[0] = sig as u32 as u64;
        si[1] = SI_QUEUE as u32 as u64;
        si[2] = pid as u32 as u64 | (u64::from(uid) << 32);
        si[3] = u64::from(generation);
        // SAFETY: `si` is a 128-byte siginfo_t image living across the call.
        let rc = unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, si.as_ptr()) };
        if rc == 0 {
            sent += 1;
        } else if errno() == libc::ESRCH {
            ACKED[i].store(generation, Ordering::Release); // exited
        }
    }

    let start = Instant::now();
    loop {
        let acks = ACKS.load(Ordering::Acquire);
        if acks >= sent || start.elapsed() >= ACK_WAIT {
            break;
        }
        futex_wait(&ACKS, acks, Some(Duration::from_millis(5)));
    }
    // Threads that did not park (they block the signal, or have not been scheduled): fine if
    // asleep at a pc no fixup names — they cannot reach the patched bytes without passing
    // the (already patched or int3-guarded) first byte.
    'threads: for i in 0..n {
        loop {
            if ACKED[i].load(Ordering::Acquire) == generation {
                continue 'threads;
            }
            let tid = TIDS[i].load(Ordering::Relaxed);
            match thread_pc(tid) {
                ThreadPc::Gone => continue 'threads,
                ThreadPc::Asleep(pc) if !fixups.iter().any(|f| f.from == pc) => continue 'threads,
                _ if start.elapsed() >= GIVE_UP => {
                    drop(stopped);
                    return Err(AttachError::ThreadStopTimeout {
                        tid,
                        millis: GIVE_UP.as_millis() as u64,
                    });
                }
                _ => futex_wait(
                    &ACKS,
                    ACKS.load(Ordering::Acquire),
                    Some(Duration::from_millis(5)),
                ),
            }
        }
    }
    Ok(stopped)
}

impl Stopped {
    /// Lets the parked threads go; with `apply`, those at a fixup's `from` resume at its `to`.
    /// Returns once every thread has left the stop handler.
    pub(crate) fn release(mut self, apply: bool) {
        self.release_inner(apply);
    }

    fn release_inner(&mut self, apply: bool) {
        if self.released {
            return;
        }
        self.released = true;
        if apply {
            APPLY.store(self.generation, Ordering::Release);
        }
        RELEASED.store(self.generation, Ordering::Release);
        futex_wake(&RELEASED, i32::MAX);
        ACTIVE.store(0, Ordering::SeqCst);
        while ENTERED.load(Ordering::SeqCst) != 0 {
            // SAFETY: no arguments, no memory.
            unsafe { libc::sched_yield() };
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.release_inner(false);
    }
}

/// Fills `TIDS` with the thread ids of this process except `me`; returns how many.
fn list_threads(me: i32) -> Result<usize, AttachError> {
    // SAFETY: a NUL-terminated path literal; O_CLOEXEC keeps the fd out of children.
    let fd = unsafe {
        libc::open(
            c"/proc/self/task".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(AttachError::last_os("open(/proc/self/task)"));
    }
    let mut buf = [0u64; 1024];
    let mut n = 0;
    let result = loop {
        // SAFETY: getdents64 writes at most `size_of_val(&buf)` bytes into `buf`.
        let got = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd,
                buf.as_mut_ptr(),
                core::mem::size_of_val(&buf),
            )
        };
        if got < 0 {
            break Err(AttachError::last_os("getdents64(/proc/self/task)"));
        }
        if got == 0 {
            break Ok(n);
        }
        // SAFETY: u64 buffer viewed as bytes, `got` of which the kernel filled.
        let bytes = unsafe { core::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), got as usize) };
        let mut off = 0;
        while off + 19 < bytes.len() {
            // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[].
            let reclen = u16::from_ne_bytes([bytes[off + 16], bytes[off + 17]]) as usize;
            if reclen == 0 {
                break;
            }
            let name = &bytes[off + 19..(off + reclen).min(bytes.len())];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(tid) = parse_decimal(name).filter(|&t| t != me) {
                if n == MAX_THREADS {
                    // SAFETY: closing our own fd.
                    unsafe { libc::close(fd) };
                    return Err(AttachError::TooManyThreads { limit: MAX_THREADS });
                }
                TIDS[n].store(tid, Ordering::Relaxed);
                ACKED[n].store(0, Ordering::Relaxed);
                n += 1;
            }
            off += reclen;
        }
    };
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    result
}

fn parse_decimal(s: &[u8]) -> Option<i32> {
    if s.is_empty() || s.len() > 9 {
        return None;
    }
    s.iter().try_fold(0i32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + i32::from(b - b'0'))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadPc {
    /// Running or runnable: the kernel does not say where.
    Running,
    /// Sleeping at this user pc.
    Asleep(usize),
    Gone,
}

/// Where a sleeping thread is, from `/proc/self/task/<tid>/syscall` (`proc(5)`).
fn thread_pc(tid: i32) -> ThreadPc {
    let mut path = [0u8; 48];
    let prefix = b"/proc/self/task/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 10];
    let mut nd = 0;
    let mut t = tid.unsigned_abs();
    loop {
        digits[nd] = b'0' + (t % 10) as u8;
        nd += 1;
        t /= 10;
        if t == 0 {
            break;
        }
    }
    for k in (0..nd).rev() {
        path[len] = digits[k];
        len += 1;
    }
    let suffix = b"/syscall";
    path[len..len + suffix.len()].copy_from_slice(suffix);
    // SAFETY: `path` is NUL-terminated (zero-initialised beyond what we wrote).
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return if errno() == libc::ENOENT {
            ThreadPc::Gone
        } else {
            ThreadPc::Running
        };
    }
    let mut buf = [0u8; 256];
    // SAFETY: reads at most buf.len() bytes into `buf`.
    let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if got <= 0 {
        return ThreadPc::Running;
    }
    parse_syscall_file(&buf[..got as usize])
}

/// `running`, or `<nr> [args…] <sp> <pc>` with hex sp and pc.
fn parse_syscall_file(text: &[u8]) -> ThreadPc {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    if text.starts_with(b"running") {
        return ThreadPc::Running;
    }
    let last = text.rsplit(|&b| b == b' ').next().unwrap_or_default();
    let hex = last.strip_prefix(b"0x").unwrap_or(last);
    if hex.is_empty() || hex.len() > 16 {
        return ThreadPc::Running;
    }
    hex.iter()
        .try_fold(0usize, |acc, &b| {
            (b as char).to_digit(16).map(|d| acc << 4 | d as usize)
        })
        .map_or(ThreadPc::Running, ThreadPc::Asleep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_file_formats() {
        assert_eq!(parse_syscall_file(b"running\n"), ThreadPc::Running);
        assert_eq!(
            parse_syscall_file(b"-1 0x7ffd1000 0x401234\n"),
            ThreadPc::Asleep(0x401234)
        );
        assert_eq!(
            parse_syscall_file(b"202 0x1 0x2 0x3 0x4 0x5 0x6 0x7ffd1000 0x7f00deadbeef\n"),
            ThreadPc::Asleep(0x7f00_dead_beef)
        );
        assert_eq!(parse_syscall_file(b"garbage"), ThreadPc::Running);
    }

    #[test]
    fn decimal_names() {
        assert_eq!(parse_decimal(b"1234"), Some(1234));
        assert_eq!(parse_decimal(b"."), None);
        assert_eq!(parse_decimal(b""), None);
    }

    #[test]
    fn own_sleeping_thread_is_seen_asleep_outside_any_fixup() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tidtx, tidrx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tidtx.send(gettid()).unwrap();
            rx.recv().unwrap();
        });
        let tid = tidrx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(thread_pc(tid), ThreadPc::Asleep(pc) if pc != 0));
        tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(thread_pc(i32::MAX - 1), ThreadPc::Gone);
    }
}
