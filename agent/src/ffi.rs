//! The agent's entry points into the target process: the load-time constructor and the hook
//! handler. Everything `extern "C"` and every `unsafe` block of the agent is here.
//!
//! # Invariants
//!
//! - The constructor only spawns the agent thread; it never blocks, never panics across the
//!   FFI boundary, and does nothing visible unless `BPFTIME_LOG` asks for logs.
//! - The hook handlers' `user` pointer is the `SiteData` boxed in the agent's `Site`; the agent
//!   drops it only after `Hook::remove` returned, after which no handler runs for that hook
//!   (bpftime-attach's guarantee, return handlers included), or leaks it when removal failed.
//! - A [`ProgSlot`]'s list is replaced only by the agent thread, and a replaced list is kept
//!   (retired) until the slot is dropped or [`ProgSlot::quiesced`] is called, both only when
//!   no hook handler can be using it; handlers read the current list with one load.
//! - A hook's native entry (`set_native`) is the JIT code of the only program of its site's
//!   current entry list; replaced lists are retired, not freed, until the hook is removed, so
//!   every entry ever set outlives the stubs that may still call it. The agent's own thread
//!   is excluded from native runs (it takes the handler, which skips it).
//! - The handlers never unwind into the target: panics are caught; they keep the thread's
//!   `errno`; probes hit from inside a probe (a helper calling a hooked function) and from
//!   the agent's own thread are skipped: the runtime's per-thread run state is the guard
//!   (`bpftime_runtime::probe_hit`, one thread-local access per hit), and at thread exit,
//!   when that state is gone, a const thread-local flag is.
//! - The `sigaction`/`signal` interposers answer for `SIGTRAP` only once bpftime-attach's trap
//!   handler is installed (it then keeps the application's handler and passes it the traps
//!   that are not probes); everything else goes to the next definition (libc's). The
//!   `sigaction`, `pthread_sigmask` and `sigprocmask` interposers drop `SIGTRAP` from the masks
//!   they pass on: a blocked `SIGTRAP` would kill the process at an `int3`.

use crate::agent::{Agent, AgentConfig, SiteData};
use bpftime_attach::x86_64::{intercept_sigaction, override_return};
use bpftime_attach::{AttachError, FuncBounds, Hook, PatchMode, Probe, PtRegs, install_probe};
use bpftime_runtime::helpers::{FuncIpGuard, take_override};
use bpftime_runtime::{HitRefused, LoadedProg, ThreadMem};
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU16, AtomicUsize, Ordering};

thread_local! {
    /// The probe guard of a thread whose runtime state is gone (thread exit): const, without a
    /// destructor, so it outlives that state. Otherwise the runtime's state is the guard
    /// (`bpftime_runtime::probe_hit`).
    static TEARDOWN_BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as the agent's own: probes it hits are skipped (by the handler;
/// hook stubs send this thread to the handler instead of running programs natively).
pub(crate) fn enter_agent_thread() {
    // Native paths first: `exclude_thread` itself may make system calls.
    bpftime_attach::set_native_excluded_thread(true);
    bpftime_runtime::exclude_thread(true);
}

/// Makes `hook`'s stub run `prog` through its native entry on every hit (no agent code
/// runs then), or (`None`) call the handler again. False when the hook cannot run entries
/// natively (a trap, or a hook with a return handler).
///
/// `prog` must be the only program of the site's current entry list (which keeps it alive:
/// replaced lists are retired until the hook is removed, module invariants).
pub(crate) fn set_native(hook: &Hook, prog: Option<&LoadedProg>) -> bool {
    let entry = native_entry(prog);
    // SAFETY: the entry is `prog`'s JIT code, alive while `prog` is: `prog` is in the site's
    // current list, and a replaced list is kept until the hook is removed (module
    // invariants), so every entry ever set outlives the hook's uses of it; the program's
    // memory (its maps' data areas) lives in the store mapping its handles keep open.
    unsafe { hook.set_native(entry) }
}

/// [`set_native`] for the hook's return probe: its return stub runs `prog` on the registers
/// after the return. `prog` must be the only program of the site's current return list.
pub(crate) fn set_native_return(hook: &Hook, prog: Option<&LoadedProg>) -> bool {
    let entry = native_entry(prog);
    // SAFETY: as in `set_native`, for the return list.
    unsafe { hook.set_native_return(entry) }
}

fn native_entry(prog: Option<&LoadedProg>) -> Option<bpftime_attach::NativeEntry> {
    prog.and_then(LoadedProg::native_entry).map(|f| {
        // SAFETY: the JIT's native entry and the hook's have the same ABI: System V, the
        // same clobbers (caller-saved GPRs and flags only, no vector or x87 state, DF kept
        // clear), under 8 KiB of stack, and a `#[repr(C)]` pair of u64 returned in rax:rdx
        // with the same status values; the context argument is the stub's `pt_regs`, which
        // the entry treats as `len` writable bytes, as the handler path's runs do.
        unsafe { std::mem::transmute::<_, bpftime_attach::NativeEntry>(f) }
    })
}

/// Programs with their attach cookies, in attach order.
pub type ProgList = Vec<(Arc<LoadedProg>, u64)>;

/// A program list that hook handlers read without a lock while the agent replaces it.
#[derive(Debug)]
pub struct ProgSlot {
    cur: AtomicPtr<ProgList>,
    #[allow(
        clippy::vec_box,
        reason = "handlers may still hold references into a retired list's box"
    )]
    retired: parking_lot::Mutex<Vec<Box<ProgList>>>,
}

impl ProgSlot {
    /// A slot holding `list`.
    pub fn new(list: ProgList) -> Self {
        ProgSlot {
            cur: AtomicPtr::new(Box::into_raw(Box::new(list))),
            retired: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The current list.
    pub fn get(&self) -> &ProgList {
        // SAFETY: `cur` always holds a pointer from `Box::into_raw`, freed only by `quiesced`
        // (retired ones) or `Drop` (module invariants), neither of which runs while a handler
        // holds this borrow.
        unsafe { &*self.cur.load(Ordering::Acquire) }
    }

    /// Publishes `list`; the old one is kept until no handler can be reading it.
    pub fn replace(&self, list: ProgList) {
        let old = self
            .cur
            .swap(Box::into_raw(Box::new(list)), Ordering::AcqRel);
        // SAFETY: `old` came from `Box::into_raw` and is no longer published.
        self.retired.lock().push(unsafe { Box::from_raw(old) });
    }

    /// Frees the replaced lists. Call only while no hook handler runs for this slot (its hook
    /// was removed and not yet reinstalled).
    pub fn quiesced(&self) {
        self.retired.lock().clear();
    }
}

impl Drop for ProgSlot {
    fn drop(&mut self) {
        // SAFETY: the current pointer came from `Box::into_raw`; the slot is dropped only when
        // no handler uses it (module invariants).
        drop(unsafe { Box::from_raw(*self.cur.get_mut()) });
    }
}

fn set_errno(v: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = v };
}

/// Runs `list` on `regs` (on the thread's run state `t`, or on fresh memory without it); the
/// value of the last `bpf_override_return`, if any.
fn run_list(
    mut t: Option<&mut ThreadMem>,
    site: &SiteData,
    list: &ProgList,
    regs: &mut PtRegs,
) -> Option<u64> {
    let mut may_override = false;
    let ctx = (regs as *mut PtRegs).cast::<u8>();
    let len = std::mem::size_of::<PtRegs>();
    for (p, cookie) in list {
        may_override |= p.may_override();
        // SAFETY: `regs` is the stub's (or signal frame's) live, writable pt_regs for the
        // duration of this call.
        let r = unsafe {
            match t.as_deref_mut() {
                Some(t) => p.run_in(t, ctx, len, *cookie),
                None => p.run_with_cookie(ctx, len, *cookie),
            }
        };
        if let Err(t) = r {
            site.traps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("program {} trapped: {t}", p.id());
        }
    }
    // (Programs that cannot override leave nothing to take: no thread-local access then.)
    if may_override { take_override() } else { None }
}

/// Runs `f` with the thread's run state unless the thread is already in a probe (or is the
/// agent's own); keeps errno; never unwinds. One thread-local access per hit.
fn guarded(f: impl FnOnce(Option<&mut ThreadMem>)) {
    // SAFETY: errno is thread-local; its location is valid for the thread's life.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno };
    let mut f = Some(f);
    let hit = bpftime_runtime::probe_hit(|t| {
        if let Some(f) = f.take() {
            // Hooks and system call sites with native entries send this thread to their
            // handlers (which skip it) while it runs programs here.
            let _busy = bpftime_attach::x86_64::NativeBusy::enter();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(Some(t))));
        }
    });
    if hit == Err(HitRefused::Gone)
        && let Some(f) = f.take()
    {
        // Thread exit: the runtime's state is gone; runs get fresh memory.
        let _ = TEARDOWN_BUSY.try_with(|b| {
            if !b.replace(true) {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(None)));
                b.set(false);
            }
        });
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// Entry handler (uprobes): `user` is the site's `SiteData`.
extern "C" fn on_entry(regs: &mut PtRegs, user: *mut c_void) {
    guarded(|t| {
        // SAFETY: `user` is the site's live `SiteData` (module invariants).
        let site = unsafe { &*(user as *const SiteData) };
        if let Some(rc) = run_list(t, site, site.entry.get(), regs)
            && site.can_override
        {
            // SAFETY: `can_override` is set only for a probe at a function's first
            // instruction, where rsp points at the return address.
            unsafe { override_return(regs, rc) };
        }
    });
}

/// Return handler (uretprobes): `regs` is the state after the function returned.
extern "C" fn on_return(regs: &mut PtRegs, user: *mut c_void) {
    guarded(|t| {
        // SAFETY: `user` is the site's live `SiteData` (module invariants).
        let site = unsafe { &*(user as *const SiteData) };
        let list = site.ret.get();
        let _ip = list
            .iter()
            .any(|(p, _)| p.uses_func_ip())
            .then(|| FuncIpGuard::set(site.addr as u64));
        if let Some(rc) = run_list(t, site, list, regs) {
            // bpf_override_return in a uretprobe replaces the return value.
            regs.rax = rc;
        }
    });
}

/// Hooks `addr` with the handlers running `data`'s programs: entry programs if `entry`,
/// return programs if `ret`. `addr` comes from a uprobe's (binary, file offset), which the
/// loader computed from a symbol or an offset given by the user, exactly what the kernel
/// trusts for its uprobes: the start of an instruction; `func` is its function from the
/// binary's symbols.
pub(crate) fn install_hook(
    addr: usize,
    data: &SiteData,
    entry: bool,
    ret: bool,
    func: FuncBounds,
) -> Result<Hook, AttachError> {
    let probe = Probe {
        entry: entry.then_some(on_entry as bpftime_attach::HookHandler),
        ret: ret.then_some(on_return as bpftime_attach::HookHandler),
        user: data as *const SiteData as *mut c_void,
        func,
        mode: PatchMode::Auto,
    };
    // SAFETY: `addr` is the start of an instruction in a mapped file (the uprobe contract the
    // kernel also relies on) and `func` comes from the same file's symbols; a return handler
    // is asked for by uretprobes, which the kernel too places at function entries; the
    // handlers are sound on any thread; `data` is boxed in the agent's `Site` and outlives the
    // hook (module invariants); SIGTRAP changes by the application go through our interposer.
    unsafe { install_probe(addr, &probe) }
}

/// Adds `delta` to the USDT semaphore (a `unsigned short`) at `addr`, which
/// `resolve_file_offset_writable` found in a writable mapping of the probed binary, as the
/// kernel does when it installs (+1) or removes (-1) a uprobe with a `ref_ctr_offset`.
/// False if the address is misaligned.
pub(crate) fn adjust_semaphore(addr: usize, delta: i16) -> bool {
    if !addr.is_multiple_of(2) {
        return false;
    }
    // SAFETY: `addr` is 2-aligned and lies in a writable, file-backed mapping of this process
    // (`resolve_file_offset_writable`), the semaphore the target's USDT probes read; programs
    // only ever read it, and we update it atomically.
    let sem = unsafe { AtomicU16::from_ptr(addr as *mut u16) };
    sem.fetch_add(delta as u16, Ordering::AcqRel);
    true
}

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;

/// The next definition of `name` (libc's), cached in `cache`.
fn next_symbol(cache: &AtomicUsize, name: &std::ffi::CStr) -> usize {
    let f = cache.load(Ordering::Acquire);
    if f != 0 {
        return f;
    }
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT looks past this library.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    cache.store(f, Ordering::Release);
    f
}

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// `sigaction(2)` for the application: see the module invariants.
///
/// # Safety
/// The libc contract: `act` and `old` are null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    // SAFETY: forwarded contract.
    if let Some(r) = unsafe { intercept_sigaction(sig, act, old) } {
        return r;
    }
    // SIGSYS once the syscall user dispatch catch-all is on (`crate::syscalls`): the same.
    if let Some(r) =
        // SAFETY: forwarded contract.
        unsafe { bpftime_attach::syscall::dispatch::intercept_sigaction(sig, act, old) }
    {
        return r;
    }
    // A handler's mask does not block SIGTRAP (nor SIGSYS) either (see `without_trap`).
    // SAFETY: forwarded contract on `act`.
    let mut copy: libc::sigaction = match unsafe { act.as_ref() } {
        Some(a) => *a,
        // SAFETY: plain data.
        None => unsafe { std::mem::zeroed() },
    };
    // SAFETY: a valid sigset_t inside `copy`.
    unsafe { libc::sigdelset(&mut copy.sa_mask, libc::SIGTRAP) };
    // SAFETY: as above.
    unsafe { libc::sigdelset(&mut copy.sa_mask, libc::SIGSYS) };
    let act = if act.is_null() {
        act
    } else {
        &copy as *const libc::sigaction
    };
    let f = next_symbol(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `f` is libc's `sigaction`, with this signature.
    let f: SigactionFn = unsafe { std::mem::transmute(f) };
    // SAFETY: forwarded contract.
    unsafe { f(sig, act, old) }
}

static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);

type SigmaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

/// `set` without `SIGTRAP` (copied into `copy`) when it would block it. A blocked `SIGTRAP`
/// is fatal at a trap-based probe or during a patch (the kernel forces an `int3`'s signal
/// through, resetting its action to the default), so the agent keeps it unblocked; nothing
/// sends `SIGTRAP` asynchronously in practice. The same for `SIGSYS`: a syscall user
/// dispatch trap with `SIGSYS` blocked kills the process (seccomp's `SIGSYS` is forced
/// through anyway).
fn without_trap(set: *const libc::sigset_t, copy: &mut libc::sigset_t) -> *const libc::sigset_t {
    let member = |s: &libc::sigset_t, sig: c_int| {
        // SAFETY: a valid sigset_t.
        let r = unsafe { libc::sigismember(s, sig) };
        r == 1
    };
    // SAFETY: `set` is null or a valid sigset_t (the libc contract of our callers).
    match unsafe { set.as_ref() } {
        Some(s) if member(s, libc::SIGTRAP) || member(s, libc::SIGSYS) => {
            *copy = *s;
            // SAFETY: `copy` is a valid sigset_t.
            unsafe { libc::sigdelset(copy, libc::SIGTRAP) };
            // SAFETY: `copy` is a valid sigset_t.
            unsafe { libc::sigdelset(copy, libc::SIGSYS) };
            copy
        }
        _ => set,
    }
}

fn forward_sigmask(
    cache: &AtomicUsize,
    name: &std::ffi::CStr,
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: zeroed sigset_t is valid storage.
    let mut copy: libc::sigset_t = unsafe { std::mem::zeroed() };
    let set = if how == libc::SIG_UNBLOCK {
        set
    } else {
        without_trap(set, &mut copy)
    };
    let f = next_symbol(cache, name);
    if f == 0 {
        return libc::ENOSYS;
    }
    // SAFETY: `f` is libc's function of that name, with this signature.
    let f: SigmaskFn = unsafe { std::mem::transmute(f) };
    // SAFETY: `set` is null, the caller's set or our copy; `old` is the caller's.
    unsafe { f(how, set, old) }
}

/// `pthread_sigmask(3)` for the application: never blocks `SIGTRAP` (see `without_trap`).
///
/// # Safety
/// The libc contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    forward_sigmask(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask", how, set, old)
}

/// `sigprocmask(2)` for the application: never blocks `SIGTRAP` (see `without_trap`).
///
/// # Safety
/// The libc contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let r = forward_sigmask(&REAL_SIGPROCMASK, c"sigprocmask", how, set, old);
    if r > 0 {
        set_errno(r);
        return -1;
    }
    r
}

/// `signal(3)` for the application: glibc's calls its internal `sigaction`, which the
/// interposer above does not see, so `SIGTRAP` and `SIGSYS` are handled here the same way (BSD
/// semantics, as glibc's `signal`).
///
/// # Safety
/// The libc contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if sig == libc::SIGTRAP || sig == libc::SIGSYS {
        // SAFETY: plain data; zero is a valid empty action.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: zeroed sigaction is valid output storage.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers.
        let r = unsafe { intercept_sigaction(sig, &sa, &mut old) }.or_else(|| {
            // SAFETY: valid pointers.
            unsafe { bpftime_attach::syscall::dispatch::intercept_sigaction(sig, &sa, &mut old) }
        });
        if let Some(r) = r {
            return if r == 0 {
                old.sa_sigaction
            } else {
                libc::SIG_ERR
            };
        }
    }
    let f = next_symbol(&REAL_SIGNAL, c"signal");
    if f == 0 {
        set_errno(libc::ENOSYS);
        return libc::SIG_ERR;
    }
    // SAFETY: `f` is libc's `signal`, with this signature.
    let f: SignalFn = unsafe { std::mem::transmute(f) };
    // SAFETY: forwarded contract.
    unsafe { f(sig, handler) }
}

extern "C" fn agent_constructor() {
    let _ = std::panic::catch_unwind(|| {
        if std::env::var_os("BPFTIME_AGENT_DISABLE").is_some() {
            return;
        }
        if !crate::control::preloaded() {
            // dlopen'ed (`bpftime attach`): the injector starts us with `bpftime_agent_attach`.
            return;
        }
        crate::log::init_from_env();
        // Attach what the store already holds before the program's main runs, so
        // `bpftime start` traces from the first call; then follow the store on a thread.
        bpftime_attach::set_native_excluded_thread(true);
        bpftime_runtime::exclude_thread(true);
        let cfg = AgentConfig::from_env();
        let agent = Agent::new(&cfg).map(|mut a| {
            a.sync();
            a
        });
        match agent {
            Ok(agent) => {
                tracing::info!(
                    "bpftime agent in pid {} following {}",
                    std::process::id(),
                    agent.store().path().display()
                );
                let spawned = std::thread::Builder::new()
                    .name("bpftime-agent".into())
                    .spawn(move || {
                        enter_agent_thread();
                        crate::control::follow(agent, &cfg)
                    });
                if let Err(e) = spawned {
                    tracing::error!("bpftime agent: cannot start its thread: {e}");
                }
                // Only now: our own calls (the log's getpid, the thread's creation) are not
                // traced.
                bpftime_attach::set_native_excluded_thread(false);
                bpftime_runtime::exclude_thread(false);
            }
            Err(e) => {
                tracing::error!("bpftime agent disabled: {e}");
                bpftime_attach::set_native_excluded_thread(false);
                bpftime_runtime::exclude_thread(false);
            }
        }
    });
}

/// Runs the constructor when the library is loaded (preload or dlopen).
#[used]
#[unsafe(link_section = ".init_array")]
static AGENT_INIT: extern "C" fn() = agent_constructor;
