//! Syscall tracepoints in the target process: `syscalls:sys_{enter,exit}_<name>`,
//! `raw_syscalls:sys_{enter,exit}` (perf tracepoint events) and the raw tracepoints
//! `sys_enter` / `sys_exit` (`BPF_RAW_TRACEPOINT_OPEN`), attached without privileges by
//! patching the `syscall` sites of every executable object mapped in the process — the main
//! executable, libc, the dynamic loader, other libraries, not the agent itself
//! (`bpftime_attach::syscall::intercept`).
//!
//! - [`SyscallTracing::sync`] (the agent thread) turns the store's tracepoint attachments into
//!   a dispatch table — programs per system call number — published behind a lock that the
//!   hot path only reads, and patches the sites that can make those calls (all of them for
//!   `raw_syscalls` and raw tracepoints; for `syscalls:*`, the sites whose number is that
//!   call's or known only at run time). No attachment left: every site is restored. While
//!   attachments exist, each sync (at least every `rescan` period) also scans objects mapped
//!   since (`dlopen`) and forgets unmapped ones (`dlclose`) without writing to them.
//! - The gate's handlers build the kernel's context for each program (the `format` file's
//!   layout, see `bpftime_attach::syscall::table`), run it, and after an enter program called
//!   `bpf_override_return(ctx, rc)` skip the system call: it returns `rc` (e.g. `-ENOENT`),
//!   and exit programs see that result. Program return values are ignored, as by the kernel.
//!
//! # Invariants
//!
//! - Handlers never run programs re-entrantly on a thread: a system call made while a program
//!   runs (by a helper) or by the agent's own thread is not traced (the kernel does not trace
//!   its BPF helpers either).
//! - The dispatch table is replaced only under the write lock, which no thread holds while
//!   making a system call; the hot path takes the read lock only for numbers with programs
//!   (an atomic bitmap says which), and never allocates.
//! - A pid filter other than this process's pid (or -1) keeps the attachment out of the table.

use bpftime_attach::PtRegs;
use bpftime_attach::procmaps::read_self_maps;
use bpftime_attach::syscall::dispatch;
use bpftime_attach::syscall::intercept::{
    ExitHandler, FastProgs, Interceptor, SyscallCall, fast_traps, patchable_objects, set_fast,
    set_handlers,
};
use bpftime_attach::syscall::table::{
    NR_MAX, RAW_SYS_ENTER_ID, RAW_SYS_EXIT_ID, RAW_TP_FLAG, RawSysEnterCtx, RawSysExitCtx,
    RawTpCtx, SysEnterCtx, SysExitCtx, TraceEntry, Tracepoint,
};
use bpftime_maps::Store;
use bpftime_runtime::helpers::take_override;
use bpftime_runtime::host;
use bpftime_runtime::object::{Attachment, PerfKind};
use bpftime_runtime::{Engine, HitRefused, LoadedProg, ThreadMem};
use bpftime_vm::helper::HelperRegistry;
use parking_lot::RwLock;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the handlers keep per thread besides the runtime's run state (const, without a
/// destructor: usable at thread exit too).
struct ThreadState {
    /// Set while this thread runs programs after its runtime state is gone (thread exit).
    guard: Cell<bool>,
    /// The thread id, and the process id it was read under (re-read after `fork`).
    pid: Cell<u32>,
    tid: Cell<u32>,
}

impl ThreadState {
    fn tid(&self) -> u32 {
        let pid = host::pid();
        if self.pid.get() != pid || self.tid.get() == 0 {
            self.tid.set(host::tid());
            self.pid.set(pid);
        }
        self.tid.get()
    }
}

thread_local! {
    static THREAD: ThreadState = const {
        ThreadState {
            guard: Cell::new(false),
            pid: Cell::new(0),
            tid: Cell::new(0),
        }
    };
}

type Progs = Vec<(Arc<LoadedProg>, u64)>;
/// One tracepoint attachment as the table is built from it: (perf event, tracepoint id,
/// programs with cookies).
type Built = (u32, u64, Vec<(u32, u64)>);

/// Programs per tracepoint, by system call number.
struct Dispatch {
    /// By number: (tracepoint id, programs); empty lists for numbers without programs.
    enter: Vec<(u16, Progs)>,
    exit: Vec<(u16, Progs)>,
    raw_enter: Progs,
    raw_exit: Progs,
    rawtp_enter: Progs,
    rawtp_exit: Progs,
    /// Whether some enter / exit program may call `bpf_override_return` (only then do the
    /// handlers look at the thread's override value).
    enter_override: bool,
    exit_override: bool,
}

impl Default for Dispatch {
    fn default() -> Self {
        Dispatch {
            enter: vec![(0, Vec::new()); NR_MAX],
            exit: vec![(0, Vec::new()); NR_MAX],
            raw_enter: Vec::new(),
            raw_exit: Vec::new(),
            rawtp_enter: Vec::new(),
            rawtp_exit: Vec::new(),
            enter_override: false,
            exit_override: false,
        }
    }
}

/// The programs of number `nr` in `list`.
fn at(list: &[(u16, Progs)], nr: u64) -> Option<&(u16, Progs)> {
    list.get(usize::try_from(nr).ok()?)
        .filter(|e| !e.1.is_empty())
}

impl Dispatch {
    fn is_empty(&self) -> bool {
        self.enter.iter().all(|e| e.1.is_empty())
            && self.exit.iter().all(|e| e.1.is_empty())
            && self.raw_enter.is_empty()
            && self.raw_exit.is_empty()
            && self.rawtp_enter.is_empty()
            && self.rawtp_exit.is_empty()
    }
}

static DISPATCH: RwLock<Option<Dispatch>> = RwLock::new(None);
const WORDS: usize = NR_MAX / 64;
/// Numbers with enter / exit programs (bit per number); `ALL_*`: raw programs see every call.
static ENTER_BITS: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
static EXIT_BITS: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
static ALL_ENTER: AtomicBool = AtomicBool::new(false);
static ALL_EXIT: AtomicBool = AtomicBool::new(false);
/// Program runs that trapped (diagnostics).
static TRAPS: AtomicU64 = AtomicU64::new(0);

fn wanted(bits: &[AtomicU64; WORDS], all: &AtomicBool, nr: u64) -> bool {
    all.load(Ordering::Relaxed)
        || usize::try_from(nr)
            .ok()
            .and_then(|n| bits.get(n / 64))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (nr % 64)) != 0)
}

fn header(id: u32, tid: u32) -> TraceEntry {
    TraceEntry {
        common_type: id as u16,
        common_flags: 0,
        common_preempt_count: 0,
        common_pid: tid as i32,
    }
}

/// Runs `progs` on `ctx`, on the thread's run state `t` (or on fresh memory without it).
fn run_all<T>(t: &mut Option<&mut ThreadMem>, progs: &Progs, ctx: &mut T) {
    let (c, len) = ((ctx as *mut T).cast::<u8>(), size_of::<T>());
    for (p, cookie) in progs {
        // SAFETY: `ctx` is a live, writable value of `size_of::<T>()` bytes for the call.
        let r = unsafe {
            match t.as_deref_mut() {
                Some(t) => p.run_in(t, c, len, *cookie),
                None => p.run_with_cookie(c, len, *cookie),
            }
        };
        if let Err(t) = r {
            TRAPS.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("program {} trapped: {t}", p.id());
        }
    }
}

/// The registers a raw tracepoint's `struct pt_regs *` shows: the kernel's at syscall entry
/// (`orig_ax` = number, `ax` = `-ENOSYS` before the call, the result after).
fn regs_of(call: &SyscallCall, ax: u64) -> PtRegs {
    PtRegs {
        rdi: call.args[0],
        rsi: call.args[1],
        rdx: call.args[2],
        r10: call.args[3],
        r8: call.args[4],
        r9: call.args[5],
        rax: ax,
        orig_rax: call.nr,
        rip: call.site + 2,
        cs: bpftime_attach::regs::USER_CS,
        ss: bpftime_attach::regs::USER_SS,
        ..PtRegs::default()
    }
}

/// Runs `f` (given the thread id and its run state) unless the thread is already running
/// programs — a system call made by a helper (of a probe of any kind) or by a signal handler
/// that interrupted a run — or is excluded (the agent's own threads, a sync in progress:
/// `bpftime_runtime::exclude_thread`); at thread exit (the runtime's state gone) on fresh
/// memory, under our own guard. Keeps errno; never unwinds.
fn guarded(f: impl FnOnce(u32, &mut Option<&mut ThreadMem>)) {
    // SAFETY: errno is thread-local; its location is valid for the thread's life.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno };
    let mut f = Some(f);
    let hit = bpftime_runtime::probe_hit(|t| {
        if let Some(f) = f.take() {
            // Native paths of hooks and sites skip this thread while it runs programs here.
            let _busy = bpftime_attach::x86_64::NativeBusy::enter();
            let tid = THREAD.with(ThreadState::tid);
            let mut t = Some(t);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tid, &mut t)));
        }
    });
    if hit == Err(HitRefused::Gone)
        && let Some(f) = f.take()
    {
        let _ = THREAD.try_with(|st| {
            if !st.guard.replace(true) {
                let tid = st.tid();
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tid, &mut None)));
                st.guard.set(false);
            }
        });
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

extern "C" fn on_enter(call: &mut SyscallCall) {
    if !wanted(&ENTER_BITS, &ALL_ENTER, call.nr) {
        return;
    }
    guarded(|tid, t| {
        let d = DISPATCH.read();
        let Some(d) = d.as_ref() else {
            return;
        };
        if d.enter_override {
            let _ = take_override();
        }
        if !d.raw_enter.is_empty() {
            let mut ctx = RawSysEnterCtx {
                ent: header(RAW_SYS_ENTER_ID, tid),
                id: call.nr as i64,
                args: call.args,
            };
            run_all(t, &d.raw_enter, &mut ctx);
        }
        if let Some((id, progs)) = at(&d.enter, call.nr) {
            let mut ctx = SysEnterCtx {
                ent: header(u32::from(*id), tid),
                nr: call.nr as i32,
                pad: 0,
                args: call.args,
            };
            run_all(t, progs, &mut ctx);
        }
        if !d.rawtp_enter.is_empty() {
            let mut regs = regs_of(call, (-libc::ENOSYS) as i64 as u64);
            let mut ctx = RawTpCtx {
                args: [&mut regs as *mut PtRegs as u64, call.nr],
            };
            run_all(t, &d.rawtp_enter, &mut ctx);
        }
        if d.enter_override
            && let Some(rc) = take_override()
        {
            call.skip = 1;
            call.ret = rc as i64;
        }
    });
}

extern "C" fn on_exit(call: &SyscallCall) {
    if !wanted(&EXIT_BITS, &ALL_EXIT, call.nr) {
        return;
    }
    guarded(|tid, t| {
        let d = DISPATCH.read();
        let Some(d) = d.as_ref() else {
            return;
        };
        if !d.raw_exit.is_empty() {
            let mut ctx = RawSysExitCtx {
                ent: header(RAW_SYS_EXIT_ID, tid),
                id: call.nr as i64,
                ret: call.ret,
            };
            run_all(t, &d.raw_exit, &mut ctx);
        }
        if let Some((id, progs)) = at(&d.exit, call.nr) {
            let mut ctx = SysExitCtx {
                ent: header(u32::from(*id), tid),
                nr: call.nr as i32,
                pad: 0,
                ret: call.ret,
            };
            run_all(t, progs, &mut ctx);
        }
        if !d.rawtp_exit.is_empty() {
            let mut regs = regs_of(call, call.ret as u64);
            let mut ctx = RawTpCtx {
                args: [&mut regs as *mut PtRegs as u64, call.ret as u64],
            };
            run_all(t, &d.rawtp_exit, &mut ctx);
        }
        if d.exit_override {
            let _ = take_override();
        }
    });
}

/// What the gate's fast path runs per number (`intercept::set_fast`), as last set.
static FAST_SET: parking_lot::Mutex<Vec<Option<FastProgs>>> = parking_lot::Mutex::new(Vec::new());

/// The programs the gate may run itself, per number: where a number's enter and exit lists
/// hold at most one program each, every one with a native entry (no helper: no override,
/// nothing that may reach our own code) that does not read `common_pid` (the fast path does
/// not look up the thread id), and no raw tracepoint program needs to see every call.
fn fast_progs(d: &Dispatch, raw: bool) -> Vec<Option<FastProgs>> {
    /// Bytes 4..8 of `struct trace_entry`: `common_pid`.
    const PID_BYTES: u64 = 0xf0;
    let one = |list: &(u16, Progs)| -> Option<Option<(u64, u64)>> {
        match list.1.as_slice() {
            [] => Some(None),
            [(p, _)] if p.native_ctx_reads() & PID_BYTES == 0 => p
                .native_entry()
                .map(|f| Some((f as usize as u64, u64::from(list.0)))),
            [(p, _)] => {
                tracing::debug!(
                    "program {} runs through the handlers: {}",
                    p.id(),
                    p.native_refused().unwrap_or("it may read common_pid")
                );
                None
            }
            _ => None,
        }
    };
    (0..NR_MAX)
        .map(|nr| {
            if raw || !crate::agent::native_enabled() {
                return None;
            }
            let (enter, exit) = (one(&d.enter[nr])?, one(&d.exit[nr])?);
            if enter.is_none() && exit.is_none() {
                return None;
            }
            let (enter, enter_id) = enter.unwrap_or((0, 0));
            let (exit, exit_id) = exit.unwrap_or((0, 0));
            Some(FastProgs {
                enter,
                enter_id,
                exit,
                exit_id,
            })
        })
        .collect()
}

/// Which sites to patch: every one (`raw_syscalls`, raw tracepoints), or those whose static
/// number is in the list or unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Want {
    all_calls: bool,
    nrs: Vec<u64>,
}

impl Want {
    fn accepts(&self, nr: Option<u32>) -> bool {
        self.all_calls || nr.is_none_or(|n| self.nrs.contains(&u64::from(n)))
    }
}

/// The Syscall User Dispatch catch-all (`bpftime_attach::syscall::dispatch`): on while some
/// wanted system call could escape the patches (`SyscallTracing::update_catch_all`), unless
/// the kernel lacks it.
#[derive(Debug, Default)]
struct Sud {
    /// The allowed range (libc and the agent), once found.
    range: Option<(usize, usize)>,
    /// Unavailable or turned off: not tried again.
    off: bool,
    on: bool,
    /// "Not needed" was logged.
    told_unneeded: bool,
    /// Last logged.
    stats: dispatch::Stats,
}

impl Sud {
    /// Turns the catch-all on (if it can be) and arms the threads that are not yet.
    fn enable(&mut self) {
        if self.off {
            return;
        }
        let range = match self.range {
            Some(r) => r,
            None => {
                if !dispatch::supported() {
                    tracing::info!(
                        "syscall user dispatch: not supported by this kernel; only patched \
                         sites are traced"
                    );
                    self.off = true;
                    return;
                }
                let Some(r) = read_self_maps()
                    .ok()
                    .and_then(|m| dispatch::allowed_range(&m))
                else {
                    tracing::warn!("syscall user dispatch: libc or the agent not found in maps");
                    self.off = true;
                    return;
                };
                *self.range.insert(r)
            }
        };
        if !self.on {
            if let Err(e) = dispatch::enable(range) {
                tracing::warn!("syscall user dispatch: {e}; only patched sites are traced");
                self.off = true;
                return;
            }
            tracing::info!(
                "syscall user dispatch: on, system calls from outside {:#x}..{:#x} (libc and \
                 the agent) trap",
                range.0,
                range.1
            );
            self.on = true;
        }
        if dispatch::recheck_handler() {
            tracing::info!(
                "syscall user dispatch: SIGSYS handler replaced behind our back, put back"
            );
        }
        match dispatch::arm_threads(&is_agent_thread) {
            Ok(0) => {}
            Ok(n) => tracing::debug!("syscall user dispatch: arming {n} thread(s)"),
            Err(e) => tracing::warn!("syscall user dispatch: {e}"),
        }
        let st = dispatch::stats();
        if st != self.stats {
            tracing::debug!(
                "syscall user dispatch: {} thread(s) armed, {} failed, {} trap(s), {} run \
                 natively",
                st.armed,
                st.failed,
                st.traps,
                st.escapes
            );
            self.stats = st;
        }
    }

    fn disable(&mut self) {
        if self.on {
            dispatch::disable();
            self.on = false;
        }
    }

    /// Whether the object of `ic` lies outside the allowed range (its unpatched sites trap).
    fn traps(&self, ic: &Interceptor) -> bool {
        match (self.on, self.range) {
            (true, Some((lo, hi))) => ic.sites().next().is_some_and(|(a, _)| a < lo || a >= hi),
            _ => false,
        }
    }
}

/// Whether thread `tid` of this process is one of the agent's (named `bpftime…`).
fn is_agent_thread(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .is_ok_and(|c| c.starts_with("bpftime"))
}

/// The syscall tracepoints of one agent.
#[derive(Default)]
pub struct SyscallTracing {
    /// One per executable object mapped (the main executable, libc, the dynamic loader, other
    /// libraries), scanned when the first attachment arrives and, for objects mapped later
    /// (`dlopen`), at the next sync while attachments exist.
    objects: Vec<Interceptor>,
    /// Objects scanned (or that could not be), by path: not scanned again while mapped.
    tried: HashSet<PathBuf>,
    /// Objects scanned successfully (with patchable sites or not), with the static numbers
    /// of the `syscall` instructions they have that no patch covers (`None`: not known).
    scanned: HashMap<PathBuf, Vec<Option<u32>>>,
    /// The sites wanted now; `None` with no attachment.
    want: Option<Want>,
    /// The Syscall User Dispatch catch-all.
    sud: Sud,
    progs: HashMap<u32, Arc<LoadedProg>>,
    /// What the table was built from: (perf event, programs).
    built: Vec<Built>,
    attached: Vec<u32>,
    /// Trapped runs already reported (handlers and the gate's own programs together).
    traps_reported: u64,
}

impl std::fmt::Debug for SyscallTracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyscallTracing")
            .field("attached", &self.attached)
            .field(
                "patched",
                &self.objects.iter().map(Interceptor::patched).sum::<usize>(),
            )
            .finish()
    }
}

impl SyscallTracing {
    /// Makes the dispatch table and the patched sites match the tracepoint attachments in
    /// `all`; returns the perf events attached (for the agent's record).
    pub fn sync(
        &mut self,
        all: &[Attachment],
        store: &Arc<Store>,
        helpers: &Arc<HelperRegistry>,
        engine: Engine,
    ) -> &[u32] {
        // Our own system calls (patching, scanning) are not traced; a caller that excluded
        // the thread already (the agent's constructor) keeps it excluded.
        let was = bpftime_runtime::exclude_thread(true);
        self.sync_guarded(all, store, helpers, engine);
        self.report_traps();
        bpftime_runtime::exclude_thread(was);
        &self.attached
    }

    /// Warns once per sync about syscall tracepoint program runs that trapped since the last
    /// report (on the handlers, each is also logged at debug level with its cause).
    fn report_traps(&mut self) {
        let now = TRAPS.load(Ordering::Relaxed) + fast_traps();
        if now > self.traps_reported {
            tracing::warn!(
                "{} syscall tracepoint program run(s) trapped (an access outside the \
                 program's memory stops a run there)",
                now - self.traps_reported
            );
            self.traps_reported = now;
        }
    }

    fn sync_guarded(
        &mut self,
        all: &[Attachment],
        store: &Arc<Store>,
        helpers: &Arc<HelperRegistry>,
        engine: Engine,
    ) {
        let me = host::pid() as i32;
        let mut key: Vec<Built> = all
            .iter()
            .filter(|a| a.event.kind == PerfKind::Tracepoint)
            .filter(|a| a.event.pid == -1 || a.event.pid == me)
            .map(|a| (a.perf_event_id, a.event.offset, a.progs.clone()))
            .collect();
        key.sort();
        if key == self.built {
            if self.want.is_some() {
                // Objects mapped (or unmapped) since (`dlopen`, `dlclose`), threads started.
                let new = self.rescan_objects();
                self.update_catch_all();
                self.apply(new);
            }
            return;
        }
        let mut d = Dispatch::default();
        let mut attached = Vec::new();
        let mut nrs: Vec<u64> = Vec::new();
        for (perf, id, progs) in &key {
            let raw_tp = id & RAW_TP_FLAG != 0;
            let Some(tp) = Tracepoint::by_id(id & !RAW_TP_FLAG) else {
                tracing::warn!("perf event {perf}: tracepoint {id} is not a syscall tracepoint");
                continue;
            };
            let loaded: Progs = progs
                .iter()
                .filter_map(|&(p, cookie)| {
                    self.prog(store, helpers, engine, p).map(|p| (p, cookie))
                })
                .collect();
            if loaded.is_empty() {
                continue;
            }
            attached.push(*perf);
            let push = |list: &mut Vec<(u16, Progs)>, nr: u32, tid: u32| {
                if let Some(e) = list.get_mut(nr as usize) {
                    e.0 = tid as u16;
                    e.1.extend(loaded.iter().cloned());
                }
            };
            let may_override = loaded.iter().any(|(p, _)| p.may_override());
            if matches!(tp, Tracepoint::RawEnter | Tracepoint::Enter(_)) {
                d.enter_override |= may_override;
            } else {
                d.exit_override |= may_override;
            }
            match (tp, raw_tp) {
                (Tracepoint::RawEnter, true) => d.rawtp_enter.extend(loaded.iter().cloned()),
                (Tracepoint::RawExit, true) => d.rawtp_exit.extend(loaded.iter().cloned()),
                (Tracepoint::RawEnter, false) => d.raw_enter.extend(loaded.iter().cloned()),
                (Tracepoint::RawExit, false) => d.raw_exit.extend(loaded.iter().cloned()),
                (Tracepoint::Enter(e), _) => {
                    push(&mut d.enter, e.nr, e.enter_id);
                    nrs.push(u64::from(e.nr));
                }
                (Tracepoint::Exit(e), _) => {
                    push(&mut d.exit, e.nr, e.exit_id);
                    nrs.push(u64::from(e.nr));
                }
            }
        }
        let all_calls = !(d.raw_enter.is_empty()
            && d.raw_exit.is_empty()
            && d.rawtp_enter.is_empty()
            && d.rawtp_exit.is_empty());
        let empty = d.is_empty();
        self.publish(d);
        if empty {
            self.want = None;
            self.sud.disable();
            self.restore_all();
        } else {
            self.want = Some(Want { all_calls, nrs });
            self.rescan_objects();
            self.update_catch_all();
            let n = self.apply(0);
            tracing::info!(
                "syscall tracepoints: {} attachment(s), {n} site(s) patched in {} object(s)",
                attached.len(),
                self.objects.len()
            );
            if self.objects.is_empty() && !self.sud.on {
                attached.clear();
            }
        }
        let used: Vec<u32> = key.iter().flat_map(|k| k.2.iter().map(|p| p.0)).collect();
        self.progs.retain(|id, _| used.contains(id));
        self.built = key;
        self.attached = attached;
    }

    /// Patches the sites of `self.objects[from..]` as `self.want` says — every site of an
    /// object outside the dispatch range while the catch-all is on (the gate costs far less
    /// than a trap); returns the sites patched.
    fn apply(&mut self, from: usize) -> usize {
        let Some(want) = &self.want else {
            return 0;
        };
        let mut n = 0;
        for ic in self.objects.iter_mut().skip(from) {
            let all = self.sud.traps(ic);
            match ic.apply(|nr| all || want.accepts(nr)) {
                Ok(k) => n += k,
                Err(e) => {
                    tracing::error!("patching the syscall sites of {}: {e}", ic.path().display())
                }
            }
        }
        n
    }

    /// Forgets the objects no longer mapped and scans the new ones (not patched yet);
    /// returns the index of the first new one in `self.objects`.
    fn rescan_objects(&mut self) -> usize {
        let maps = match read_self_maps() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("syscall tracepoints: {e}");
                return self.objects.len();
            }
        };
        let mut i = 0;
        while i < self.objects.len() {
            if self.objects[i].still_mapped(&maps) {
                i += 1;
                continue;
            }
            let ic = self.objects.swap_remove(i);
            tracing::info!(
                "{} was unmapped: its sites are forgotten",
                ic.path().display()
            );
            self.tried.remove(ic.path());
            self.scanned.remove(ic.path());
            ic.forget();
        }
        let first_new = self.objects.len();
        let mapped = patchable_objects(&maps);
        // A path unmapped without ever being scanned successfully may be mapped again.
        self.tried.retain(|p| mapped.contains(p));
        self.scanned.retain(|p, _| mapped.contains(p));
        for path in mapped {
            if !self.tried.insert(path.clone()) {
                continue;
            }
            let ic = match Interceptor::for_object(&path) {
                Ok(ic) => ic,
                Err(e) => {
                    tracing::info!("{}: syscall sites not scanned: {e}", path.display());
                    continue;
                }
            };
            let (n, skipped) = ic.counts();
            self.scanned.insert(path.clone(), ic.skipped_nrs().to_vec());
            tracing::info!(
                "{}: {n} syscall sites can be patched, {skipped} left alone ({} outside \
                 function symbols)",
                path.display(),
                ic.unverified()
            );
            if n == 0 {
                continue;
            }
            self.objects.push(ic);
        }
        first_new
    }

    /// Turns the catch-all on where it is needed (or asked for with
    /// `BPFTIME_SYSCALL_DISPATCH=1`), off elsewhere (or always with `=0`).
    fn update_catch_all(&mut self) {
        let (needed, why) = match std::env::var("BPFTIME_SYSCALL_DISPATCH").as_deref() {
            Ok("0") => (false, "BPFTIME_SYSCALL_DISPATCH=0"),
            Ok(_) => (true, ""),
            Err(_) => (
                self.catch_all_needed(),
                "every wanted system call is made from a patched site",
            ),
        };
        if needed {
            self.sud.enable();
            self.sud.told_unneeded = false;
            return;
        }
        if self.sud.on || !self.sud.told_unneeded {
            tracing::info!("syscall user dispatch: off ({why})");
            self.sud.told_unneeded = true;
        }
        self.sud.disable();
    }

    /// Whether a wanted system call could come from a `syscall` instruction outside libc and
    /// the agent (where Syscall User Dispatch traps) that no patch covers: the vDSO's
    /// fallbacks (`clock_gettime`, `gettimeofday`, `time`, `clock_getres`, `getcpu`), sites
    /// left alone in other objects, and executable memory nothing scanned — code the
    /// application generated (not ours: hook stubs and JIT code are known by address) or an
    /// object that could not be scanned. With `raw_syscalls` every number is wanted.
    fn catch_all_needed(&self) -> bool {
        /// The system calls x86_64 vDSO functions fall back to.
        const VDSO_NRS: [u32; 5] = [96, 201, 228, 229, 309];
        let Some(want) = &self.want else {
            return false;
        };
        if want.all_calls || VDSO_NRS.iter().any(|&n| want.accepts(Some(n))) {
            return true;
        }
        let Ok(maps) = read_self_maps() else {
            return true;
        };
        let allowed = dispatch::allowed_range(&maps);
        let traps = |start: usize| allowed.is_none_or(|(lo, hi)| start < lo || start >= hi);
        let own: Vec<(usize, usize)> = bpftime_attach::x86_64::own_code_ranges()
            .into_iter()
            .chain(bpftime_runtime::jit_code_ranges())
            .collect();
        // Every byte of the mapping in our ranges (adjacent ones may have merged into it).
        let ours = |m: &bpftime_attach::procmaps::MapEntry| {
            let mut at = m.start;
            while at < m.end {
                match own
                    .iter()
                    .find(|&&(a, len)| a <= at && at < a.saturating_add(len))
                {
                    Some(&(a, len)) => at = a.saturating_add(len),
                    None => return false,
                }
            }
            true
        };
        maps.iter().filter(|m| m.exec && traps(m.start)).any(|m| {
            if m.path == "[vdso]" || m.path == "[vsyscall]" || (m.path.is_empty() && ours(m)) {
                return false;
            }
            match self.scanned.get(std::path::Path::new(&m.path)) {
                Some(left_alone) => left_alone.iter().any(|&nr| want.accepts(nr)),
                None => true,
            }
        })
    }

    /// Restores every patched site.
    fn restore_all(&mut self) {
        for ic in &mut self.objects {
            if let Err(e) = ic.apply(|_| false) {
                tracing::error!(
                    "cannot restore the syscall sites of {}: {e}",
                    ic.path().display()
                );
            }
        }
    }

    fn publish(&self, d: Dispatch) {
        let mut enter = [0u64; WORDS];
        let mut exit = [0u64; WORDS];
        for (nr, e) in d.enter.iter().enumerate() {
            if !e.1.is_empty() {
                enter[nr / 64] |= 1 << (nr % 64);
            }
        }
        for (nr, e) in d.exit.iter().enumerate() {
            if !e.1.is_empty() {
                exit[nr / 64] |= 1 << (nr % 64);
            }
        }
        let all_enter = !(d.raw_enter.is_empty() && d.rawtp_enter.is_empty());
        let all_exit = !(d.raw_exit.is_empty() && d.rawtp_exit.is_empty());
        let empty = d.is_empty();
        let fast = fast_progs(&d, all_enter || all_exit);
        // Programs go in before the bits that lead handlers to them; the previous ones stay
        // alive until the gate's fast path has let go of them too.
        let old = std::mem::replace(&mut *DISPATCH.write(), (!empty).then_some(d));
        {
            let mut cur = FAST_SET.lock();
            cur.resize(NR_MAX, None);
            for (nr, (want, have)) in fast.iter().zip(cur.iter_mut()).enumerate() {
                if want != have {
                    // SAFETY: the entries are JIT code of programs the new dispatch table
                    // holds, which stays published until the next `publish` has replaced
                    // them here (`set_fast` drains the gates using the old ones before
                    // returning); they are native entries whose programs cannot override the
                    // call and do not read `common_pid` (`fast_progs`).
                    let set = unsafe { set_fast(nr as u32, *want) };
                    if set && want.is_some() {
                        tracing::info!("system call {nr}: its programs run natively in the gate");
                    }
                    *have = *want;
                }
            }
        }
        drop(old);
        for i in 0..WORDS {
            ENTER_BITS[i].store(enter[i], Ordering::Release);
            EXIT_BITS[i].store(exit[i], Ordering::Release);
        }
        ALL_ENTER.store(all_enter, Ordering::Release);
        ALL_EXIT.store(all_exit, Ordering::Release);
        // No exit programs: the gate does not even call the exit handler.
        let any_exit = all_exit || exit.iter().any(|&w| w != 0);
        set_handlers(Some(on_enter), any_exit.then_some(on_exit as ExitHandler));
    }

    fn prog(
        &mut self,
        store: &Arc<Store>,
        helpers: &Arc<HelperRegistry>,
        engine: Engine,
        id: u32,
    ) -> Option<Arc<LoadedProg>> {
        if let Some(p) = self.progs.get(&id) {
            return Some(p.clone());
        }
        match LoadedProg::load(store, id, helpers.clone()).and_then(|p| p.with_engine(engine)) {
            Ok(p) => {
                let p = Arc::new(p);
                self.progs.insert(id, p.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!("program {id} cannot be loaded: {e}");
                None
            }
        }
    }

    /// Removes every program and restores libc (agent shutdown or detach; also on drop).
    pub fn clear(&mut self) {
        let was = bpftime_runtime::exclude_thread(true);
        self.publish(Dispatch::default());
        self.want = None;
        self.sud.disable();
        self.restore_all();
        self.progs.clear();
        self.built.clear();
        self.attached.clear();
        bpftime_runtime::exclude_thread(was);
    }
}

impl Drop for SyscallTracing {
    fn drop(&mut self) {
        self.clear();
    }
}
