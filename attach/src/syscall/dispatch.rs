//! The catch-all for `syscall` instructions no site patch covers: Syscall User Dispatch
//! (`prctl(PR_SET_SYSCALL_USER_DISPATCH)`, Linux 5.11+, unprivileged, x86_64 here).
//!
//! The kernel (`kernel/entry/syscall_user_dispatch.c`) lets a thread name one *allowed* range
//! of addresses and a selector byte: a system call made from outside the range while the
//! byte says `BLOCK` is not executed; the thread gets `SIGSYS` (`si_code` `SYS_USER_DISPATCH`,
//! `si_call_addr` = the address after the instruction, rax = the number) instead. The setting
//! is per thread and not inherited by `clone`/`fork` children; `execve` clears it. On x86_64
//! no `rt_sigreturn` is exempt (the kernel's vDSO exemption is for 32-bit tasks only), so the
//! signal restorer must be inside the range.
//!
//! - **Range.** The hull of libc's mappings and this object's own (the gate, the handlers,
//!   every raw system call of ours — the agent): libc's calls (site-patched or not, its
//!   signal restorer `__restore_rt`, `clone`/`fork`/`vfork` included) and ours run untrapped.
//!   Whatever lies between the two (often most shared libraries) runs untrapped too: those
//!   objects rely on their site patches.
//! - **Selectors.** One byte per thread in a static table ([`MAX_THREADS`] slots, never
//!   freed, so the kernel can always read it). [`disable`] sets every byte to `ALLOW` at once
//!   and signals the armed threads to turn dispatch off (an armed thread's every system call
//!   takes the kernel's slow path, ~40 ns here); [`enable`] and [`arm_threads`] arm them
//!   again.
//! - **Arming.** A thread can only arm itself: [`arm_threads`] sends each thread not armed
//!   yet a real-time signal (`rt_tgsigqueueinfo`, the slot index as its value) whose handler
//!   calls the `prctl`. New threads are armed at the next call (the agent's periodic sync).
//! - **Trap.** The `SIGSYS` handler builds a [`SyscallCall`] from the ucontext, calls the
//!   gate's enter handler, makes the call (from inside the range), calls the exit handler and
//!   writes rax (rcx and r11 as `syscall` leaves them). `clone`, `clone3`, `fork`, `vfork`
//!   and `rt_sigreturn` cannot run inside a signal handler: the thread's selector goes to
//!   `ALLOW`, the pc back onto the `syscall` instruction, and the call runs natively, with no
//!   programs; the next [`arm_threads`] sets `BLOCK` again. `SIGSYS` that is not ours
//!   (seccomp's `SECCOMP_RET_TRAP`) goes to the application's action, which
//!   [`intercept_sigaction`] (for a `sigaction` interposer) records instead of letting it
//!   replace ours; a raw `rt_sigaction(SIGSYS)` made through a trap is undone the same way,
//!   and one that blocks `SIGSYS` with `rt_sigprocmask` gets it unblocked again (a blocked
//!   `SIGSYS` at a trap would kill the process).
//!
//! # Invariants
//!
//! - Handlers touch only atomics, the slot table, the interrupted thread's ucontext and
//!   stack, and the gate's handlers (which take no lock the trapped thread may hold); their
//!   own system calls are raw, from this object (inside the range); they preserve `errno`.
//! - A slot's `tid` is written only by the thread calling [`arm_threads`] (the agent's), so a
//!   slot belongs to one thread at a time; its selector byte stays mapped for the process's
//!   life.

use core::ffi::{c_int, c_void};
use core::sync::atomic::Ordering;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::intercept::{ENTER, EXIT, EnterHandler, ExitHandler, SyscallCall, raw_syscall};
use super::sites::NEVER_PATCHED;
use crate::AttachError;
use crate::procmaps::MapEntry;

const PR_SET_SYSCALL_USER_DISPATCH: u64 = 59;
const PR_SYS_DISPATCH_OFF: u64 = 0;
const PR_SYS_DISPATCH_ON: u64 = 1;
const ALLOW: u8 = 0;
const BLOCK: u8 = 1;
/// `si_code` of a dispatch `SIGSYS`.
const SYS_USER_DISPATCH: c_int = 2;
/// `si_code` of `rt_tgsigqueueinfo`.
const SI_QUEUE: c_int = -1;

/// Most threads that can be armed at once.
pub const MAX_THREADS: usize = 4096;

const FREE: u8 = 0;
/// The (dis)arm signal is on its way; its handler makes the thread what `ENABLED` says.
const SENT: u8 = 1;
const ARMED: u8 = 2;
const FAILED: u8 = 3;
/// Armed once, turned off since (no attachment left).
const DISARMED: u8 = 4;

struct Slot {
    tid: AtomicI32,
    state: AtomicU8,
    selector: AtomicU8,
}

static SLOTS: [Slot; MAX_THREADS] = [const {
    Slot {
        tid: AtomicI32::new(0),
        state: AtomicU8::new(FREE),
        selector: AtomicU8::new(ALLOW),
    }
}; MAX_THREADS];

static LO: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);
static ENABLED: AtomicBool = AtomicBool::new(false);
static ARM_SIGNAL: AtomicI32 = AtomicI32::new(0);
static TRAPS: AtomicU64 = AtomicU64::new(0);
static ESCAPES: AtomicU64 = AtomicU64::new(0);
/// `Ok((lo, hi))` once the handlers are installed for that range.
static INIT: OnceLock<Result<(usize, usize), i32>> = OnceLock::new();

/// The kernel's `struct sigaction` (`rt_sigaction` with an 8-byte mask).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Our `SIGSYS` action as the kernel holds it (to put it back from the handler).
static OURS_FLAGS: AtomicU64 = AtomicU64::new(0);
static OURS_RESTORER: AtomicUsize = AtomicUsize::new(0);

/// The application's `SIGSYS` action: a seqlock (odd while being written).
static APP_SEQ: AtomicU32 = AtomicU32::new(0);
static APP_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static APP_FLAGS: AtomicU64 = AtomicU64::new(0);
static APP_MASK: AtomicU64 = AtomicU64::new(0);
static APP_WRITE: Mutex<()> = Mutex::new(());

fn app_action() -> KernelSigaction {
    loop {
        let s1 = APP_SEQ.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            core::hint::spin_loop();
            continue;
        }
        let a = KernelSigaction {
            handler: APP_HANDLER.load(Ordering::Acquire),
            flags: APP_FLAGS.load(Ordering::Acquire),
            restorer: 0,
            mask: APP_MASK.load(Ordering::Acquire),
        };
        if APP_SEQ.load(Ordering::Acquire) == s1 {
            return a;
        }
    }
}

/// Writers serialise: `APP_WRITE`, or a signal handler on a thread whose writes cannot
/// interleave with another's in practice (a trapped `rt_sigaction(SIGSYS)`).
fn set_app_action(a: KernelSigaction) {
    APP_SEQ.fetch_add(1, Ordering::AcqRel);
    APP_HANDLER.store(a.handler, Ordering::Release);
    APP_FLAGS.store(a.flags, Ordering::Release);
    APP_MASK.store(a.mask, Ordering::Release);
    APP_SEQ.fetch_add(1, Ordering::AcqRel);
}

fn sys(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: callers pass system calls whose pointer arguments point to live memory of
    // theirs (or are null), and no call that changes the stack or the thread.
    unsafe { raw_syscall(nr as u64, &a) as i64 }
}

fn gettid() -> i32 {
    sys(libc::SYS_gettid, [0; 6]) as i32
}

fn getpid() -> i32 {
    sys(libc::SYS_getpid, [0; 6]) as i32
}

fn kernel_sigaction(sig: c_int, new: Option<&KernelSigaction>) -> Option<KernelSigaction> {
    let mut old = KernelSigaction::default();
    let rc = sys(
        libc::SYS_rt_sigaction,
        [
            sig as u64,
            new.map_or(0, |n| n as *const KernelSigaction as u64),
            &mut old as *mut KernelSigaction as u64,
            8,
            0,
            0,
        ],
    );
    (rc == 0).then_some(old)
}

fn errno_location() -> *mut c_int {
    // SAFETY: no preconditions; the location is valid for the thread's life.
    unsafe { libc::__errno_location() }
}

fn gregs(ctx: *mut c_void) -> *mut [libc::greg_t; 23] {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: `uc` is the live ucontext of a SA_SIGINFO signal frame; only a raw pointer to
    // its register array is formed here.
    unsafe { core::ptr::addr_of_mut!((*uc).uc_mcontext.gregs) }
}

/// Whether this kernel has Syscall User Dispatch (turning it off on the calling thread is
/// accepted exactly when it does; the thread was not using it).
pub fn supported() -> bool {
    sys(
        libc::SYS_prctl,
        [
            PR_SET_SYSCALL_USER_DISPATCH,
            PR_SYS_DISPATCH_OFF,
            0,
            0,
            0,
            0,
        ],
    ) == 0
}

/// The allowed range for this process: the hull of libc's mappings and of the object that
/// holds this code. `None` if either is not found.
pub fn allowed_range(maps: &[MapEntry]) -> Option<(usize, usize)> {
    let own_addr = on_sigsys as *const () as usize;
    let own = maps.iter().find(|m| m.contains(own_addr))?;
    let is_libc = |m: &MapEntry| {
        Path::new(&m.path)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
    };
    let mut lo = usize::MAX;
    let mut hi = 0;
    let mut libc_seen = false;
    for m in maps {
        let mine = !own.path.is_empty() && m.path == own.path || m.contains(own_addr);
        let libc = is_libc(m);
        libc_seen |= libc;
        if mine || libc {
            lo = lo.min(m.start);
            hi = hi.max(m.end);
        }
    }
    (libc_seen && lo < hi).then_some((lo, hi))
}

/// The range the handlers were installed for.
pub fn range() -> Option<(usize, usize)> {
    match INIT.get() {
        Some(Ok(r)) => Some(*r),
        _ => None,
    }
}

/// Installs the handlers for `range` (the first call; later calls must pass the same range)
/// and sets every armed thread's selector to `BLOCK`.
pub fn enable(range: (usize, usize)) -> Result<(), AttachError> {
    let r = INIT.get_or_init(|| install(range));
    match r {
        Ok(r) if *r == range => {}
        Ok(_) => {
            return Err(AttachError::Os {
                op: "syscall user dispatch",
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        Err(e) => {
            return Err(AttachError::Os {
                op: "sigaction(SIGSYS)",
                source: std::io::Error::from_raw_os_error(*e),
            });
        }
    }
    ENABLED.store(true, Ordering::SeqCst);
    for s in &SLOTS {
        if s.state.load(Ordering::Acquire) == ARMED {
            s.selector.store(BLOCK, Ordering::Release);
        }
    }
    Ok(())
}

/// Lets every thread's system calls through untrapped at once, then signals the armed
/// threads to turn dispatch off (so their system calls leave the kernel's slow path too).
pub fn disable() {
    ENABLED.store(false, Ordering::SeqCst);
    for s in &SLOTS {
        s.selector.store(ALLOW, Ordering::Release);
    }
    let _ = sync_threads(&|_| true);
}

fn install(range: (usize, usize)) -> Result<(usize, usize), i32> {
    LO.store(range.0, Ordering::Release);
    LEN.store(range.1 - range.0, Ordering::Release);
    // The arm signal: the highest real-time signal nobody handles (bpftime-attach's stop
    // signal, installed first, is taken).
    let mut arm = 0;
    for sig in (libc::SIGRTMIN() + 2..=libc::SIGRTMAX()).rev() {
        match kernel_sigaction(sig, None) {
            Some(old) if old.handler == libc::SIG_DFL => {
                arm = sig;
                break;
            }
            _ => {}
        }
    }
    if arm == 0 {
        return Err(libc::EAGAIN);
    }
    // SAFETY: zeroed sigaction is a valid empty action, filled in below.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = on_arm as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: a valid action and no old action wanted; libc's sigaction supplies its
    // restorer (inside the allowed range).
    if unsafe { libc::sigaction(arm, &sa, core::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    ARM_SIGNAL.store(arm, Ordering::Release);
    // SIGSYS: on the interrupted stack, nested traps allowed (a signal handler that runs
    // while we run programs may make one), nothing else blocked.
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
    // SAFETY: zeroed sigaction is valid output storage.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: valid pointers.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, &mut old) } != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    if old.sa_sigaction != on_sigsys as *const () as usize {
        set_app_action(KernelSigaction {
            handler: old.sa_sigaction,
            flags: old.sa_flags as u32 as u64,
            restorer: 0,
            mask: mask_bits(&old.sa_mask),
        });
    }
    let ours = kernel_sigaction(libc::SIGSYS, None).ok_or(libc::EINVAL)?;
    OURS_FLAGS.store(ours.flags, Ordering::Release);
    OURS_RESTORER.store(ours.restorer, Ordering::Release);
    Ok(range)
}

fn mask_bits(set: &libc::sigset_t) -> u64 {
    // SAFETY: sigset_t is plain data of at least 8 bytes; glibc keeps signals 1–64 in its
    // first word.
    unsafe { core::ptr::read_unaligned((set as *const libc::sigset_t).cast::<u64>()) }
}

fn our_action() -> KernelSigaction {
    KernelSigaction {
        handler: on_sigsys as *const () as usize,
        flags: OURS_FLAGS.load(Ordering::Acquire),
        restorer: OURS_RESTORER.load(Ordering::Acquire),
        mask: 0,
    }
}

/// Threads armed, threads whose `prctl` failed, traps handled, calls let through natively
/// (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub armed: usize,
    pub failed: usize,
    pub traps: u64,
    pub escapes: u64,
}

/// See [`Stats`].
pub fn stats() -> Stats {
    let mut s = Stats {
        traps: TRAPS.load(Ordering::Relaxed),
        escapes: ESCAPES.load(Ordering::Relaxed),
        ..Stats::default()
    };
    for slot in &SLOTS {
        match slot.state.load(Ordering::Acquire) {
            ARMED => s.armed += 1,
            FAILED => s.failed += 1,
            _ => {}
        }
    }
    s
}

/// Arms every thread of the process that is not armed yet and for which `skip(tid)` is false
/// (the caller's own threads), frees the slots of threads that exited, and sets the selectors
/// of armed threads back to `BLOCK` (after a native call, see the module doc). Returns how
/// many threads were signalled. Call after [`enable`].
pub fn arm_threads(skip: &dyn Fn(i32) -> bool) -> Result<usize, AttachError> {
    sync_threads(skip)
}

/// Signals each thread whose state is not what `ENABLED` says: threads not known yet (unless
/// `skip`), armed ones while disabled, disarmed ones while enabled.
fn sync_threads(skip: &dyn Fn(i32) -> bool) -> Result<usize, AttachError> {
    let sig = ARM_SIGNAL.load(Ordering::Acquire);
    if sig == 0 {
        return Ok(0);
    }
    let live: HashSet<i32> = std::fs::read_dir("/proc/self/task")
        .map_err(|source| AttachError::Io {
            path: "/proc/self/task".into(),
            source,
        })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let enabled = ENABLED.load(Ordering::SeqCst);
    let mut known: HashSet<i32> = HashSet::new();
    let mut resend: Vec<(usize, i32)> = Vec::new();
    for (i, s) in SLOTS.iter().enumerate() {
        let tid = s.tid.load(Ordering::Acquire);
        if tid == 0 {
            continue;
        }
        if !live.contains(&tid) {
            s.state.store(FREE, Ordering::Release);
            s.selector.store(ALLOW, Ordering::Release);
            s.tid.store(0, Ordering::Release);
            continue;
        }
        known.insert(tid);
        match (enabled, s.state.load(Ordering::Acquire)) {
            (true, ARMED) => s.selector.store(BLOCK, Ordering::Release),
            (true, DISARMED) | (false, ARMED) => resend.push((i, tid)),
            _ => {}
        }
    }
    let (pid, uid) = (getpid(), {
        // SAFETY: no arguments.
        unsafe { libc::getuid() }
    });
    let mut sent = 0;
    let new = live
        .iter()
        .copied()
        .filter(|&tid| enabled && !known.contains(&tid) && !skip(tid))
        .filter_map(|tid| {
            let i = SLOTS
                .iter()
                .position(|s| s.tid.load(Ordering::Acquire) == 0)?;
            SLOTS[i].selector.store(ALLOW, Ordering::Release);
            SLOTS[i].tid.store(tid, Ordering::Release);
            Some((i, tid))
        })
        .collect::<Vec<_>>();
    for (i, tid) in resend.into_iter().chain(new) {
        let s = &SLOTS[i];
        s.state.store(SENT, Ordering::Release);
        // siginfo_t for rt_tgsigqueueinfo: signo, errno, code, pad, pid, uid, sigval.
        let mut si = [0u64; 16];
        si[0] = sig as u32 as u64;
        si[1] = SI_QUEUE as u32 as u64;
        si[2] = pid as u32 as u64 | (u64::from(uid) << 32);
        si[3] = i as u64;
        let rc = sys(
            libc::SYS_rt_tgsigqueueinfo,
            [pid as u64, tid as u64, sig as u64, si.as_ptr() as u64, 0, 0],
        );
        if rc == 0 {
            sent += 1;
        } else {
            s.state.store(FREE, Ordering::Release);
            s.selector.store(ALLOW, Ordering::Release);
            s.tid.store(0, Ordering::Release);
        }
    }
    Ok(sent)
}

extern "C" fn on_arm(_sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let errno = errno_location();
    // SAFETY: the thread's errno.
    let saved = unsafe { *errno };
    // SAFETY: the siginfo of this frame; si_pid and si_ptr are meaningful for SI_QUEUE,
    // checked first.
    let (code, pid, idx) = unsafe {
        let code = (*info).si_code;
        if code == SI_QUEUE {
            (
                code,
                (*info).si_pid(),
                (*info).si_value().sival_ptr as usize,
            )
        } else {
            (code, 0, usize::MAX)
        }
    };
    if code == SI_QUEUE
        && pid == getpid()
        && let Some(s) = SLOTS.get(idx)
        && s.tid.load(Ordering::Acquire) == gettid()
    {
        if ENABLED.load(Ordering::SeqCst) {
            s.selector.store(BLOCK, Ordering::Release);
            let rc = sys(
                libc::SYS_prctl,
                [
                    PR_SET_SYSCALL_USER_DISPATCH,
                    PR_SYS_DISPATCH_ON,
                    LO.load(Ordering::Acquire) as u64,
                    LEN.load(Ordering::Acquire) as u64,
                    s.selector.as_ptr() as u64,
                    0,
                ],
            );
            s.state
                .store(if rc == 0 { ARMED } else { FAILED }, Ordering::Release);
        } else {
            s.selector.store(ALLOW, Ordering::Release);
            sys(
                libc::SYS_prctl,
                [
                    PR_SET_SYSCALL_USER_DISPATCH,
                    PR_SYS_DISPATCH_OFF,
                    0,
                    0,
                    0,
                    0,
                ],
            );
            s.state.store(DISARMED, Ordering::Release);
        }
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// Sets this thread's selector to `ALLOW` (until the next [`arm_threads`]).
fn allow_this_thread() {
    let me = gettid();
    if let Some(s) = SLOTS.iter().find(|s| s.tid.load(Ordering::Acquire) == me) {
        s.selector.store(ALLOW, Ordering::Release);
    }
}

extern "C" fn on_sigsys(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let errno = errno_location();
    // SAFETY: the thread's errno.
    let saved = unsafe { *errno };
    // SAFETY: the siginfo of this frame.
    let code = unsafe { (*info).si_code };
    if code == SYS_USER_DISPATCH {
        dispatch(ctx);
    } else {
        to_app(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// A `SIGSYS` that is not ours: the application's action.
fn to_app(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let a = app_action();
    match a.handler {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // The default action (core dump): put it in place and send the signal again; it
            // is delivered when this handler returns.
            let dfl = KernelSigaction::default();
            let _ = kernel_sigaction(libc::SIGSYS, Some(&dfl));
            sys(
                libc::SYS_tgkill,
                [
                    getpid() as u64,
                    gettid() as u64,
                    libc::SIGSYS as u64,
                    0,
                    0,
                    0,
                ],
            );
        }
        h if a.flags & libc::SA_SIGINFO as u64 != 0 => {
            // SAFETY: the application installed this SA_SIGINFO handler for SIGSYS.
            let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                unsafe { core::mem::transmute(h) };
            f(sig, info, ctx);
        }
        h => {
            // SAFETY: the application installed this plain handler for SIGSYS.
            let f: extern "C" fn(c_int) = unsafe { core::mem::transmute(h) };
            f(sig);
        }
    }
}

fn dispatch(ctx: *mut c_void) {
    TRAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the ucontext of this frame, read and written only by this thread.
    let g = unsafe { &mut *gregs(ctx) };
    let reg = |r: c_int| g[r as usize] as u64;
    let nr = reg(libc::REG_RAX);
    let after = reg(libc::REG_RIP);
    if NEVER_PATCHED.iter().any(|&n| u64::from(n) == nr) {
        // Cannot run in a signal handler: natively, from the same instruction.
        allow_this_thread();
        g[libc::REG_RIP as usize] = after.wrapping_sub(2) as libc::greg_t;
        ESCAPES.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut call = SyscallCall {
        nr,
        args: [
            reg(libc::REG_RDI),
            reg(libc::REG_RSI),
            reg(libc::REG_RDX),
            reg(libc::REG_R10),
            reg(libc::REG_R8),
            reg(libc::REG_R9),
        ],
        ret: 0,
        skip: 0,
        site: after.wrapping_sub(2),
    };
    let enter = ENTER.load(Ordering::Acquire);
    if enter != 0 {
        // SAFETY: only `set_handlers` stores there, always an `EnterHandler`.
        let enter: EnterHandler = unsafe { core::mem::transmute::<usize, EnterHandler>(enter) };
        enter(&mut call);
    }
    if call.skip == 0 {
        call.ret = perform(&call);
    }
    let exit = EXIT.load(Ordering::Acquire);
    if exit != 0 {
        // SAFETY: only `set_handlers` stores there, always an `ExitHandler`.
        let exit: ExitHandler = unsafe { core::mem::transmute::<usize, ExitHandler>(exit) };
        exit(&call);
    }
    g[libc::REG_RAX as usize] = call.ret as libc::greg_t;
    g[libc::REG_RCX as usize] = after as libc::greg_t;
    g[libc::REG_R11 as usize] = g[libc::REG_EFL as usize];
}

/// Makes the trapped call, keeping our `SIGSYS` handler installed and `SIGSYS` unblocked.
fn perform(call: &SyscallCall) -> i64 {
    // SAFETY: the call the interrupted code was making, unchanged (its pointers are its own).
    let ret = unsafe { raw_syscall(call.nr, &call.args) } as i64;
    match call.nr as i64 {
        libc::SYS_rt_sigaction if call.args[0] == libc::SIGSYS as u64 && ret == 0 => {
            if let Some(cur) = kernel_sigaction(libc::SIGSYS, None)
                && cur.handler != on_sigsys as *const () as usize
            {
                set_app_action(cur);
                let _ = kernel_sigaction(libc::SIGSYS, Some(&our_action()));
            }
        }
        libc::SYS_rt_sigprocmask if ret == 0 => {
            let unblock: u64 = 1 << (libc::SIGSYS - 1);
            sys(
                libc::SYS_rt_sigprocmask,
                [
                    libc::SIG_UNBLOCK as u64,
                    &unblock as *const u64 as u64,
                    0,
                    8,
                    0,
                    0,
                ],
            );
        }
        _ => {}
    }
    ret
}

/// For a `sigaction` interposer: once the dispatch handler is installed, the application's
/// `SIGSYS` actions are recorded here (non-dispatch `SIGSYS` goes to them) instead of
/// replacing ours. `None`: not ours to answer (another signal, or not installed) — forward
/// the call to the real `sigaction`.
///
/// # Safety
/// `act` and `old` must each be null or valid for a `struct sigaction`.
pub unsafe fn intercept_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> Option<c_int> {
    if sig != libc::SIGSYS || range().is_none() {
        return None;
    }
    // SAFETY: the caller's contract on `act`.
    let new = unsafe { act.as_ref() };
    if new.is_some_and(|a| a.sa_sigaction == on_sigsys as *const () as usize) {
        return None;
    }
    let _w = APP_WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let prev = app_action();
    // SAFETY: the caller's contract on `old`.
    if let Some(o) = unsafe { old.as_mut() } {
        // SAFETY: plain data; zero is a valid starting point.
        *o = unsafe { core::mem::zeroed() };
        o.sa_sigaction = prev.handler;
        o.sa_flags = prev.flags as c_int;
        // SAFETY: sa_mask is plain data of at least 8 bytes; glibc keeps signals 1–64 in its
        // first word (it was zeroed above).
        unsafe {
            core::ptr::write_unaligned(
                (&mut o.sa_mask as *mut libc::sigset_t).cast::<u64>(),
                prev.mask,
            )
        };
    }
    if let Some(a) = new {
        set_app_action(KernelSigaction {
            handler: a.sa_sigaction,
            flags: a.sa_flags as u32 as u64,
            restorer: 0,
            mask: mask_bits(&a.sa_mask),
        });
    }
    Some(0)
}

/// If something replaced our `SIGSYS` handler behind the interposer's back (a raw
/// `rt_sigaction` from inside the allowed range), takes the new action as the application's
/// and puts ours back. Returns whether it had to.
pub fn recheck_handler() -> bool {
    if range().is_none() {
        return false;
    }
    let _w = APP_WRITE.lock().unwrap_or_else(|e| e.into_inner());
    match kernel_sigaction(libc::SIGSYS, None) {
        Some(cur) if cur.handler != on_sigsys as *const () as usize => {
            set_app_action(cur);
            kernel_sigaction(libc::SIGSYS, Some(&our_action())).is_some()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_syscall_user_dispatch() {
        // Kernel 5.11+ with CONFIG_GENERIC_ENTRY (every x86_64 kernel since).
        assert!(supported());
    }

    #[test]
    fn the_allowed_range_holds_libc_and_this_code() {
        let maps = crate::procmaps::read_self_maps().unwrap();
        let (lo, hi) = allowed_range(&maps).expect("range");
        let own = on_sigsys as *const () as usize;
        assert!(lo <= own && own < hi);
        // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope (libc's).
        let libc_fn = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as usize;
        assert!(
            lo <= libc_fn && libc_fn < hi,
            "{lo:#x}..{hi:#x} {libc_fn:#x}"
        );
    }
}
