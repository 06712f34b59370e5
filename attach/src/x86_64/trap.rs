//! Trap-based probes: an `int3` at the probed instruction and a `SIGTRAP` handler that runs
//! the probe's handler on the interrupted thread, then resumes in an out-of-line copy of the
//! displaced instruction followed by a jump back (no single-stepping). Used where a 5-byte
//! jump cannot go: functions shorter than the jump, instructions that are jump targets,
//! probes in the middle of functions whose branch targets are unknown.
//!
//! # Invariants
//!
//! - A site's handler, user pointer and out-of-line address are published before its address
//!   (release); the signal handler raises the site's in-flight count *before* re-checking the
//!   address, and [`remove`] clears the address before waiting for the count to drain — so once
//!   `remove` returns the handler never runs again for that registration.
//! - The signal handler touches only these atomics, the interrupted thread's `ucontext_t`, and
//!   calls the probe handler (which must be sound on any thread at the probed instruction —
//!   the contract of `install_probe`). It never allocates.
//! - Out-of-line copies live in code blocks that are never unmapped.
//! - Callers of [`add`] and [`remove`] hold the hook registry lock.

use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::hook::HookHandler;
use crate::regs::{USER_CS, USER_SS};
use crate::{AttachError, PtRegs};

/// Most trap sites at once.
pub(crate) const MAX_TRAPS: usize = 1024;

struct TrapSite {
    addr: AtomicUsize,
    handler: AtomicUsize,
    user: AtomicUsize,
    ool: AtomicUsize,
    inflight: AtomicU64,
}

static SITES: [TrapSite; MAX_TRAPS] = [const {
    TrapSite {
        addr: AtomicUsize::new(0),
        handler: AtomicUsize::new(0),
        user: AtomicUsize::new(0),
        ool: AtomicUsize::new(0),
        inflight: AtomicU64::new(0),
    }
}; MAX_TRAPS];
/// One past the highest site index ever used.
static HIGH: AtomicUsize = AtomicUsize::new(0);

/// Registers a trap site at `addr`; returns its index. The int3 is written by the caller.
pub(crate) fn add(
    addr: usize,
    handler: HookHandler,
    user: *mut c_void,
    ool: usize,
) -> Result<usize, AttachError> {
    let i = SITES
        .iter()
        .position(|s| {
            s.addr.load(Ordering::Acquire) == 0 && s.inflight.load(Ordering::Acquire) == 0
        })
        .ok_or(AttachError::TooManyTraps { limit: MAX_TRAPS })?;
    let s = &SITES[i];
    s.handler.store(handler as usize, Ordering::Relaxed);
    s.user.store(user as usize, Ordering::Relaxed);
    s.ool.store(ool, Ordering::Relaxed);
    s.addr.store(addr, Ordering::SeqCst);
    HIGH.fetch_max(i + 1, Ordering::SeqCst);
    Ok(i)
}

/// Unregisters site `i`; returns once no thread runs its handler. The original byte must be
/// back in place already (late trappers then retry the instruction).
pub(crate) fn remove(i: usize) {
    let s = &SITES[i];
    s.addr.store(0, Ordering::SeqCst);
    while s.inflight.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// From the `SIGTRAP` handler: if `addr` is a trap site, runs its handler with the registers
/// of `ctx` (the signal frame's `ucontext_t`), writes the registers back and points the
/// thread at the out-of-line copy (or where the handler sent it). False if not ours.
pub(crate) fn dispatch(addr: usize, ctx: *mut c_void) -> bool {
    let high = HIGH.load(Ordering::Acquire).min(MAX_TRAPS);
    let Some(s) = SITES[..high]
        .iter()
        .find(|s| s.addr.load(Ordering::Acquire) == addr)
    else {
        return false;
    };
    s.inflight.fetch_add(1, Ordering::SeqCst);
    if s.addr.load(Ordering::SeqCst) != addr {
        s.inflight.fetch_sub(1, Ordering::Release);
        return false;
    }
    let handler = s.handler.load(Ordering::Relaxed);
    let user = s.user.load(Ordering::Relaxed) as *mut c_void;
    let ool = s.ool.load(Ordering::Relaxed);
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; we only use the
    // general registers of this thread's own signal frame.
    let g = unsafe { &mut (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let r = |i: libc::c_int| g[i as usize] as u64;
    let mut regs = PtRegs {
        r15: r(libc::REG_R15),
        r14: r(libc::REG_R14),
        r13: r(libc::REG_R13),
        r12: r(libc::REG_R12),
        rbp: r(libc::REG_RBP),
        rbx: r(libc::REG_RBX),
        r11: r(libc::REG_R11),
        r10: r(libc::REG_R10),
        r9: r(libc::REG_R9),
        r8: r(libc::REG_R8),
        rax: r(libc::REG_RAX),
        rcx: r(libc::REG_RCX),
        rdx: r(libc::REG_RDX),
        rsi: r(libc::REG_RSI),
        rdi: r(libc::REG_RDI),
        orig_rax: u64::MAX,
        rip: addr as u64,
        cs: USER_CS,
        eflags: r(libc::REG_EFL),
        rsp: r(libc::REG_RSP),
        ss: USER_SS,
    };
    // SAFETY: a registered site stores a `HookHandler` (`add`); the address still matched
    // after our in-flight count went up, so `user` is valid until it goes down.
    let handler: HookHandler = unsafe { core::mem::transmute(handler) };
    handler(&mut regs, user);
    let mut w = |i: libc::c_int, v: u64| g[i as usize] = v as libc::greg_t;
    w(libc::REG_R15, regs.r15);
    w(libc::REG_R14, regs.r14);
    w(libc::REG_R13, regs.r13);
    w(libc::REG_R12, regs.r12);
    w(libc::REG_RBP, regs.rbp);
    w(libc::REG_RBX, regs.rbx);
    w(libc::REG_R11, regs.r11);
    w(libc::REG_R10, regs.r10);
    w(libc::REG_R9, regs.r9);
    w(libc::REG_R8, regs.r8);
    w(libc::REG_RAX, regs.rax);
    w(libc::REG_RCX, regs.rcx);
    w(libc::REG_RDX, regs.rdx);
    w(libc::REG_RSI, regs.rsi);
    w(libc::REG_RDI, regs.rdi);
    w(libc::REG_EFL, regs.eflags);
    if regs.rip != addr as u64 {
        w(libc::REG_RIP, regs.rip);
        w(libc::REG_RSP, regs.rsp);
    } else {
        w(libc::REG_RIP, ool as u64);
    }
    s.inflight.fetch_sub(1, Ordering::Release);
    true
}
