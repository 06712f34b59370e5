//! Running a loaded program on this thread's reusable guest memory.
//!
//! # Invariants
//!
//! - Each thread owns one `GuestMemory` and one JIT run context (`ThreadMem`, boxed on first
//!   use and reached through a const thread-local `Slot` that never allocates: a probe or a
//!   traced system call fired by that first allocation finds it being made and is skipped;
//!   freed by the thread's `Owner` at thread exit, after which runs get fresh memory),
//!   reused across runs: before every run
//!   its regions are made exactly the run's own (kept when the previous run left the same
//!   ones, rebuilt otherwise) and the engines drop earlier grants, so no run sees another
//!   run's regions.
//! - The regions added for a run are the context (valid per the caller's contract) and the
//!   program's map value areas, which live in the store mapping owned by the program's `Map`
//!   handles and stay mapped while the `LoadedProg` exists, i.e. beyond the run.
//! - A helper that runs another program on the same thread (not possible today) would find the
//!   memory borrowed; we detect that and run it on a fresh `GuestMemory` instead.
//! - [`RunState`]: while a [`LoadedProg`] runs on this thread, the innermost entry of `RUNS`
//!   describes that run. Its `current` pointer is the program running now: the one that started
//!   the run (borrowed by `LoadedProg::run_with_cookie` for the whole run) or a tail-call target
//!   held in `keep`, which only grows during the run and is dropped with the entry after the
//!   engine returned. So `current` is valid whenever `with_current_run` hands it out.

use crate::host::ProgHost;
use crate::prog::{Engine, LoadedProg};
use bpftime_vm::helper::MemRegion;
use bpftime_vm::interpreter::Trap;
use bpftime_vm::memory::GuestMemory;
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::sync::Arc;

thread_local! {
    /// This thread's run state: const and without a destructor, so that reaching it never
    /// allocates or registers anything (a probe on `malloc`, or a traced system call, may
    /// fire while it is being set up: it then finds `INIT` and is skipped).
    static SLOT: Slot = const {
        Slot {
            state: Cell::new(NONE),
            mem: Cell::new(std::ptr::null()),
        }
    };
    /// Frees the run state at thread exit (set once the state exists).
    static OWNER: RefCell<Option<Owner>> = const { RefCell::new(None) };
    /// The runs of [`LoadedProg`]s in progress on this thread, innermost last.
    static RUNS: RefCell<Vec<RunState>> = const { RefCell::new(Vec::new()) };
}

/// [`Slot::state`]: no run state yet / being made / `mem` valid / freed (thread exit).
const NONE: u8 = 0;
const INIT: u8 = 1;
const READY: u8 = 2;
const GONE: u8 = 3;

struct Slot {
    state: Cell<u8>,
    /// The boxed run state while `state == READY`.
    mem: Cell<*const RefCell<ThreadMem>>,
}

/// Owns the boxed run state of its thread; dropped with the thread's thread-locals.
struct Owner(*mut RefCell<ThreadMem>);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = SLOT.try_with(|s| {
            s.state.set(GONE);
            s.mem.set(std::ptr::null());
        });
        // SAFETY: `self.0` came from `Box::into_raw` in `make_thread_mem` and is no longer
        // published (above); no borrow of it is live: thread-local destructors run one after
        // another, outside any probe hit of this thread.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// This thread's run state, made on first use; `Busy` while it is being made (a probe fired
/// by the allocation), `Gone` after the thread's thread-locals were torn down.
///
/// The reference is valid until the calling thread exits; callers use it only within their
/// own call (a `RefCell`, it cannot reach another thread).
#[inline]
fn thread_mem() -> Result<&'static RefCell<ThreadMem>, HitRefused> {
    SLOT.try_with(|s| match s.state.get() {
        // SAFETY: `mem` is the live box while the state is READY (see `Owner`).
        READY => Ok(unsafe { &*s.mem.get() }),
        NONE => make_thread_mem(s),
        INIT => Err(HitRefused::Busy),
        _ => Err(HitRefused::Gone),
    })
    .unwrap_or(Err(HitRefused::Gone))
}

#[cold]
fn make_thread_mem(s: &Slot) -> Result<&'static RefCell<ThreadMem>, HitRefused> {
    s.state.set(INIT);
    let p = Box::into_raw(Box::new(RefCell::new(ThreadMem::default())));
    if OWNER
        .try_with(|o| *o.borrow_mut() = Some(Owner(p)))
        .is_err()
    {
        // SAFETY: `p` was just made and published nowhere.
        drop(unsafe { Box::from_raw(p) });
        s.state.set(GONE);
        return Err(HitRefused::Gone);
    }
    s.mem.set(p);
    s.state.set(READY);
    // SAFETY: owned by this thread's `OWNER` until it exits.
    Ok(unsafe { &*p })
}

/// What a thread keeps for its runs (one thread-local access per run, or per probe hit with
/// [`probe_hit`]).
#[derive(Debug, Default)]
pub struct ThreadMem {
    gm: GuestMemory,
    /// The JIT's run context, reused by this thread's JIT runs.
    #[cfg(target_arch = "x86_64")]
    jit: bpftime_jit::program::JitRunCache,
    /// [`exclude_thread`] was called: [`probe_hit`] refuses this thread.
    excluded: bool,
    /// What `gm`'s regions were last made for: (program serial, context address, context
    /// length); serials are never reused, so a match means the same regions.
    regions_for: (u64, u64, u64),
}

/// Why [`probe_hit`] did not run its closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitRefused {
    /// The thread is already running a program (a probe hit from a helper, or from a signal
    /// handler that interrupted a run), or was excluded with [`exclude_thread`]: skip the
    /// probe (the kernel does not trace its BPF programs' own work either).
    Busy,
    /// The thread's thread-locals are being torn down (a probe hit at thread exit): runs can
    /// still go through [`LoadedProg::run_with_cookie`](crate::LoadedProg::run_with_cookie),
    /// on fresh memory.
    Gone,
}

/// Runs `f` with this thread's run state for one probe hit — the programs of a probe run with
/// [`LoadedProg::run_in`](crate::LoadedProg::run_in), sharing one thread-local access — or
/// says why not.
#[inline]
pub fn probe_hit<R>(f: impl FnOnce(&mut ThreadMem) -> R) -> Result<R, HitRefused> {
    let mut t = thread_mem()?
        .try_borrow_mut()
        .map_err(|_| HitRefused::Busy)?;
    if t.excluded {
        return Err(HitRefused::Busy);
    }
    Ok(f(&mut t))
}

/// Makes [`probe_hit`] refuse (`excluded`) or accept again the calling thread (a runtime's own
/// threads, or a thread while it sets probes up); returns whether it was excluded, so that a
/// nested exclusion can restore the outer one.
pub fn exclude_thread(excluded: bool) -> bool {
    match thread_mem().map(RefCell::try_borrow_mut) {
        Ok(Ok(mut t)) => std::mem::replace(&mut t.excluded, excluded),
        _ => false,
    }
}

/// One program run in progress (see the module invariants).
#[derive(Debug)]
pub(crate) struct RunState {
    /// The engine of the run (tail-call targets are loaded for the same one).
    pub(crate) engine: Engine,
    /// The program running now.
    current: *const LoadedProg,
    /// Tail-call targets entered during the run, kept alive until it ends.
    keep: Vec<Arc<LoadedProg>>,
}

impl RunState {
    /// The program running now.
    pub(crate) fn current(&self) -> &LoadedProg {
        // SAFETY: `current` is the run's starting program or a target in `keep`, both alive
        // while this entry exists (module invariants); the borrow cannot outlive `self`.
        unsafe { &*self.current }
    }

    /// Makes `target` the running program (a tail call), keeping it alive for the run.
    pub(crate) fn enter(&mut self, target: Arc<LoadedProg>) {
        self.current = Arc::as_ptr(&target);
        self.keep.push(target);
    }
}

/// Registers a run of `prog` on `engine` until the guard drops; on drop, `at_end` is called
/// with the program that ran last (after tail calls, not necessarily `prog`).
/// (During the thread's TLS teardown nothing is registered: such a run makes no tail calls.)
pub(crate) struct RunGuard {
    at_end: fn(&LoadedProg),
    registered: bool,
}

impl RunGuard {
    pub(crate) fn enter(prog: &LoadedProg, engine: Engine, at_end: fn(&LoadedProg)) -> RunGuard {
        let registered = RUNS
            .try_with(|r| {
                r.borrow_mut().push(RunState {
                    engine,
                    current: prog,
                    keep: Vec::new(),
                })
            })
            .is_ok();
        RunGuard { at_end, registered }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        let state = RUNS.try_with(|r| r.borrow_mut().pop()).ok().flatten();
        if let Some(state) = state {
            (self.at_end)(state.current());
        }
    }
}

/// Calls `f` with the innermost run in progress on this thread (`None` outside any run).
pub(crate) fn with_current_run<R>(f: impl FnOnce(Option<&mut RunState>) -> R) -> R {
    let mut f = Some(f);
    let r = RUNS.try_with(|r| match r.try_borrow_mut() {
        Ok(mut runs) => f.take().map(|f| f(runs.last_mut())),
        Err(_) => None,
    });
    match (r, f) {
        (Ok(Some(v)), _) => v,
        (_, Some(f)) => f(None),
        // `f` ran but the closure yielded nothing: impossible (`Some` when it runs).
        (_, None) => unreachable!("with_current_run: callback consumed without a result"),
    }
}

/// Whether `gm` holds exactly the regions a run with `ctx` and `values` adds: the context
/// (when there is one) followed by the value areas.
fn regions_match(gm: &GuestMemory, ctx: Option<MemRegion>, values: &[MemRegion]) -> bool {
    let r = gm.regions();
    match ctx {
        Some(c) => r.first() == Some(&c) && r[1..] == *values,
        None => r == values,
    }
}

/// Runs a program with `ctx` in r1 on this thread's run state — `thread` when a [`probe_hit`]
/// borrowed it, else borrowed here — : `engine` is the interpreter's or the JIT's run (same
/// contract: both drop earlier helper grants), given the thread state. After the thread's
/// thread-locals were torn down (a system call traced at thread or process exit), or when a
/// run nested in another on this thread (a signal handler's probe) finds the state borrowed,
/// the run gets a fresh one.
///
/// The regions the previous run on this thread left are kept while the program (by serial)
/// and the context are the same (the common case of one probe hit after another), which
/// spares rebuilding them; otherwise they are replaced. Either way the run sees exactly its
/// own regions.
///
/// # Safety
/// `ctx` must be valid for reads and writes of `ctx_len` bytes during the call.
#[inline]
unsafe fn run_on_thread<F>(
    thread: Option<&mut ThreadMem>,
    engine: F,
    host: &ProgHost,
    (serial, values, ctx_writable): (u64, &[MemRegion], bool),
    ctx: *mut u8,
    ctx_len: usize,
) -> Result<u64, Trap>
where
    F: FnOnce(&mut ThreadMem, u64, u64, *mut c_void) -> Result<u64, Trap>,
{
    let mut borrowed;
    let mut fresh;
    let t = match thread {
        Some(t) => t,
        None => {
            borrowed = thread_mem().ok().and_then(|c| c.try_borrow_mut().ok());
            match borrowed.as_deref_mut() {
                Some(t) => t,
                None => {
                    fresh = ThreadMem::default();
                    &mut fresh
                }
            }
        }
    };
    let key = (serial, ctx as u64, ctx_len as u64);
    if t.regions_for != key {
        let ctx_region = (!ctx.is_null() && ctx_len > 0).then_some(MemRegion {
            start: ctx as u64,
            len: ctx_len as u64,
            writable: ctx_writable,
        });
        // SAFETY: `ctx` per this function's contract; `values` per the module invariants.
        unsafe { prepare(&mut t.gm, ctx_region, values) };
        t.regions_for = key;
    }
    let host = host as *const ProgHost as *mut c_void;
    engine(t, ctx as u64, 0, host)
}

/// [`run_on_thread`] for JIT code: the thread also keeps the code's run context
/// ([`bpftime_jit::program::JitRunCache`]), so a run writes only what differs from the last.
///
/// # Safety
/// As [`run_on_thread`].
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) unsafe fn run_jit_on_thread(
    thread: Option<&mut ThreadMem>,
    jit: &bpftime_jit::program::JitProgram,
    host: &ProgHost,
    values: (u64, &[MemRegion], bool),
    ctx: *mut u8,
    ctx_len: usize,
    cpu: u64,
) -> Result<u64, Trap> {
    let run =
        |t: &mut ThreadMem, r1, r2, host| jit.run_cached(&mut t.jit, &mut t.gm, r1, r2, host, cpu);
    // SAFETY: forwarded contract.
    unsafe { run_on_thread(thread, run, host, values, ctx, ctx_len) }
}

/// [`run_on_thread`] for the interpreter, on `thread` when a [`probe_hit`] borrowed it.
///
/// # Safety
/// As [`run_on_thread`].
#[inline]
pub(crate) unsafe fn run_interpreter_on_thread(
    thread: Option<&mut ThreadMem>,
    interp: &bpftime_vm::interpreter::Interpreter<'_>,
    host: &ProgHost,
    values: (u64, &[MemRegion], bool),
    ctx: *mut u8,
    ctx_len: usize,
) -> Result<u64, Trap> {
    let run = |t: &mut ThreadMem, r1, r2, host| interp.run_in(&mut t.gm, r1, r2, host);
    // SAFETY: forwarded contract.
    unsafe { run_on_thread(thread, run, host, values, ctx, ctx_len) }
}

/// Makes `gm`'s regions exactly `ctx` (if any) then `values`, keeping them when they already
/// are (kept regions equal the ones described, so the same contract covers them).
///
/// # Safety
/// As [`GuestMemory::add_region`] for each region, for the run about to start.
#[inline]
unsafe fn prepare(gm: &mut GuestMemory, ctx: Option<MemRegion>, values: &[MemRegion]) {
    if regions_match(gm, ctx, values) {
        return;
    }
    gm.clear_regions();
    // SAFETY: forwarded contract.
    unsafe {
        if let Some(c) = ctx {
            gm.add_region(c);
        }
        for r in values {
            gm.add_region(*r);
        }
    }
}
