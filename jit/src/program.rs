//! Native execution of x86_64 code: [`JitProgram`], a drop-in for
//! [`bpftime_vm::interpreter::Interpreter`] (`run`, `run_in` with the same signatures, results
//! and traps), and the program arrays of `bpf_tail_call` ([`ProgArray`]).
//!
//! # Invariants
//!
//! - The entry pointer of a `JitProgram` points into its own [`ExecMem`], which holds code the
//!   x86_64 backend generated for this program; the two live and die together.
//! - A run hands the code a [`JitContext`] whose pointers (env, `GuestMemory`, helper table,
//!   tail-call tables) all point to values that outlive the native call, which is synchronous.
//! - Checked mode: generated code touches only the stack (inside `GuestMemory`'s own stack), the
//!   fast region (the first region registered with the `GuestMemory`, which its `add_region`
//!   contract keeps valid), the window `check_access` cached (which it accepted) or a cached
//!   run started with (the second registered region, valid likewise), an inlined map's data
//!   area (`crate::InlineMap`'s contract), and addresses `check_access` accepts
//!   (`GuestMemory::check`, the interpreter's check) — so it is as memory-safe as the
//!   interpreter.
//! - Unchecked mode trusts the program's memory accesses (and helper arguments), the JIT's
//!   documented stance when `JitOptions::checked` is false: the host that compiles a program
//!   unchecked vouches for it (e.g. because it passed the interpreter, or a kernel-grade verifier).
//! - Tail-call targets in a [`ProgArray`] are borrowed `JitProgram`s, alive for the run.
//! - Callbacks ([`jit_callback`]): the env's callback entry is this module's, with the run's
//!   context as its state, for the whole run. It reads the running program's function table
//!   (`ctx.funcs`, written by generated code: inside that code's mapping), and enters only
//!   addresses that table gives — the callback entry routine and function entries of the same
//!   code — with a frame it checked lies inside the stack (`cur_fp`, set by the code, and the
//!   callee's frame count from the loader).
//! - The native entry ([`JitProgram::native_entry`]) lies in the same mapping. Checked code run
//!   through it touches only its context, the stack and context it makes on the native stack,
//!   and the regions of `JitOptions::native` (tested by its own checker), which whoever calls
//!   it vouches for (`NativeEntry` is an unsafe function type).

use crate::abi::{
    CallbackEntry, CallbackFrame, JitContext, JitEntry, NativeEntry, NativeOutcome, TailCallTable,
    trap,
};
use crate::exec_mem::ExecMem;
use crate::{CompiledCode, JitError, JitOptions};
use bpftime_vm::helper::{
    CallEnv, CallStatus, CallbackError, HelperFn, HelperRegistry, MemRegion, func_token_pc,
};
use bpftime_vm::interpreter::{Trap, TrapKind};
use bpftime_vm::memory::GuestMemory;
use bpftime_vm::verifier::Program;
use std::ffi::c_void;
use std::marker::PhantomData;

/// A program compiled to x86_64 and mapped executable.
#[derive(Debug)]
pub struct JitProgram {
    mem: ExecMem,
    entry: JitEntry,
    native: Option<NativeEntry>,
    helper_table: Vec<Option<HelperFn>>,
    checked: bool,
    compiled: CompiledCode,
}

/// `JitContext::reserved` as this runner uses it: `[0..3]` the checker's cache window (start,
/// readable bytes, writable bytes; read by the x86_64 code), `[3]` the run's `GuestMemory`.
const RESERVED_GM: usize = 3;

/// The checker generated code calls in checked mode (`ctx.check`).
///
/// `mem` is the run's `JitContext` (its `ctx.mem` points to itself), whose `reserved[3]` is the
/// run's `GuestMemory`: both alive, the memory not otherwise borrowed, while generated code runs
/// (it only calls this during the run, which owns the `&mut GuestMemory`).
///
/// On success it also caches, in `reserved[0..3]`, the region that holds the access (a map
/// value a helper granted, typically), so that further accesses there are tested inline. Sound
/// because regions only grow during a run (helpers add grants, nothing removes any) and the
/// context, with its cache, lives for one run.
extern "C" fn check_access(mem: *mut c_void, addr: u64, len: u64, write: u64) -> bool {
    let ctx = mem.cast::<JitContext>();
    // SAFETY: per the contract above: `ctx` is the run's live context; no reference to it is
    // held elsewhere during the native call (the runner passed it as a raw pointer).
    let reserved = unsafe { &mut (*ctx).reserved };
    // SAFETY: `reserved[3]` is the run's `GuestMemory` (contract above), alive and not
    // otherwise borrowed while generated code runs.
    let gm = unsafe { &*(reserved[RESERVED_GM] as *const GuestMemory) };
    match gm.region_of(addr, len, write != 0) {
        Some(r) => {
            let wlen = if r.writable { r.len } else { 0 };
            *reserved = [r.start, r.len, wlen, reserved[RESERVED_GM]];
            true
        }
        None => false,
    }
}

impl JitProgram {
    /// Compiles `prog` (verified against `helpers`) and maps the code executable.
    ///
    /// With `opts.checked == false` every memory access of the program is trusted (see the
    /// module invariants); use checked mode for programs nothing else has proven safe.
    pub fn new(
        prog: &Program,
        helpers: &HelperRegistry,
        opts: &JitOptions,
    ) -> Result<Self, JitError> {
        let compiled = crate::x86_64::compile(prog, helpers, opts)?;
        // Near the helpers the code calls (or our own code when there are none).
        let near = helpers
            .ids()
            .find_map(|id| helpers.get(id))
            .map_or(check_access as *const () as usize, |h| h.func as usize);
        let mem = ExecMem::new_near(&compiled.code, near)?;
        if compiled.entry >= mem.len() {
            return Err(JitError::Codegen(format!(
                "entry {} outside code of {} bytes",
                compiled.entry,
                mem.len()
            )));
        }
        // SAFETY: `entry` is inside the mapping (checked above), where the backend put the
        // function of type `JitEntry` (the ABI of `crate::abi`); the mapping lives as long as
        // `self` (module invariants).
        let entry =
            unsafe { std::mem::transmute::<*const u8, JitEntry>(mem.as_ptr().add(compiled.entry)) };
        let native = match compiled.native_entry {
            Some(off) if off < mem.len() => {
                // SAFETY: as for `entry`: inside the mapping, where the backend put a function
                // of type `NativeEntry`.
                Some(unsafe {
                    std::mem::transmute::<*const u8, NativeEntry>(mem.as_ptr().add(off))
                })
            }
            Some(off) => {
                return Err(JitError::Codegen(format!(
                    "native entry {off} outside code of {} bytes",
                    mem.len()
                )));
            }
            None => None,
        };
        let len = helpers.ids().last().map_or(0, |id| id as usize + 1);
        let mut helper_table = vec![None; len];
        for id in helpers.ids() {
            helper_table[id as usize] = helpers.get(id).map(|h| h.func);
        }
        Ok(JitProgram {
            mem,
            entry,
            native,
            helper_table,
            checked: opts.checked,
            compiled,
        })
    }

    /// The native entry, when `JitOptions::native` asked for one and the program qualifies
    /// (see [`crate::NativeOptions`]; why not: [`CompiledCode::native_refused`]). Valid while
    /// `self` lives.
    pub fn native_entry(&self) -> Option<NativeEntry> {
        self.native
    }

    /// Runs the program through its native entry on `[ctx, ctx + len)`; `None` without one.
    ///
    /// # Safety
    /// `[ctx, ctx + len)` is valid for reads and writes during the call, and the regions given
    /// in `JitOptions::native` are valid for the program's accesses (writes where marked
    /// writable), as are the inlined maps' (their [`crate::InlineMap`] contract).
    pub unsafe fn run_native(&self, ctx: *mut u8, len: u64) -> Option<NativeOutcome> {
        // SAFETY: forwarded contract; the entry is this program's code (module invariants).
        self.native.map(|f| unsafe { f(ctx, len) })
    }

    /// Whether memory accesses are checked.
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// The generated code and its per-instruction offsets.
    pub fn compiled(&self) -> &CompiledCode {
        &self.compiled
    }

    /// Where `bpf_tail_call` jumps to start this program (for [`ProgArray`] and the
    /// [`TailCallTable`]s of a host's own runner).
    pub fn tail_entry(&self) -> *const u8 {
        self.mem.as_ptr().wrapping_add(crate::x86_64::TAIL_ENTRY)
    }

    /// Runs with `mem` as the program's memory: r1 = its address (0 when empty), r2 = its
    /// length — as [`bpftime_vm::interpreter::Interpreter::run`].
    pub fn run(&self, mem: &mut [u8]) -> Result<u64, Trap> {
        let mut gm = GuestMemory::new();
        let (r1, r2) = if mem.is_empty() {
            (0, 0)
        } else {
            (mem.as_mut_ptr() as u64, mem.len() as u64)
        };
        if !mem.is_empty() {
            // SAFETY: `mem` is an exclusive borrow that outlives this call, and `gm` is dropped
            // before it returns; the program accesses it only through the run below.
            unsafe {
                gm.add_region(MemRegion {
                    start: r1,
                    len: r2,
                    writable: true,
                })
            };
        }
        self.run_in(&mut gm, r1, r2, std::ptr::null_mut())
    }

    /// Runs with r1 = `r1`, r2 = `r2`, in memory `gm` (whose regions the caller registered),
    /// with `host` passed to helpers — as [`bpftime_vm::interpreter::Interpreter::run_in`]:
    /// earlier helper grants are dropped, the stack is not cleared.
    #[inline]
    pub fn run_in(
        &self,
        gm: &mut GuestMemory,
        r1: u64,
        r2: u64,
        host: *mut c_void,
    ) -> Result<u64, Trap> {
        self.run_inner(gm, r1, r2, host, &[], u64::MAX)
    }

    /// [`JitProgram::run_in`] pinned to CPU id `cpu`: inlined per-CPU array lookups and updates
    /// ([`crate::InlineMap`]) address that CPU's elements (`u64::MAX`: they call the helper).
    #[inline]
    pub fn run_in_on_cpu(
        &self,
        gm: &mut GuestMemory,
        r1: u64,
        r2: u64,
        host: *mut c_void,
        cpu: u64,
    ) -> Result<u64, Trap> {
        self.run_inner(gm, r1, r2, host, &[], cpu)
    }

    /// [`JitProgram::run_in`] with program arrays for `bpf_tail_call` (helper 12): a tail call
    /// with r2 equal to an array's `map` handle and r3 an index of a filled slot starts that
    /// program in place of this one (at most [`crate::abi::MAX_TAIL_CALLS`] times per run).
    pub fn run_with_tail_calls(
        &self,
        gm: &mut GuestMemory,
        r1: u64,
        r2: u64,
        host: *mut c_void,
        arrays: &[ProgArray<'_>],
    ) -> Result<u64, Trap> {
        self.run_inner(gm, r1, r2, host, arrays, u64::MAX)
    }

    fn run_inner(
        &self,
        gm: &mut GuestMemory,
        r1: u64,
        r2: u64,
        host: *mut c_void,
        arrays: &[ProgArray<'_>],
        cpu: u64,
    ) -> Result<u64, Trap> {
        gm.clear_grants();
        let frame_top = gm.frame_pointer(0);
        let fast = gm.regions().first().copied();
        let tables: Vec<TailCallTable> = arrays
            .iter()
            .map(|a| TailCallTable {
                map: a.map,
                len: a.slots.len() as u64,
                slots: a.slots.as_ptr(),
            })
            .collect();
        let checked = self.checked || arrays.iter().any(|a| a.any_checked);
        let gm_ptr: *mut GuestMemory = gm;
        let mut env = CallEnv::new(r1, host);
        if checked {
            // SAFETY: `gm` is exclusively borrowed for this whole call and `env` is dropped
            // before it returns; helpers use it only during the native call below.
            unsafe { env.set_guest_memory(gm_ptr) };
        }
        let mut ctx = JitContext::new(frame_top, &mut env);
        ctx.cpu = cpu;
        let ctx_ptr: *mut JitContext = &mut ctx;
        // SAFETY: `jit_callback` is sound with this run's context as state (module
        // invariants); the env and the context live until the run ends.
        unsafe { env.set_callback(Some(jit_callback), ctx_ptr.cast()) };
        ctx.check = Some(check_access);
        ctx.reserved[RESERVED_GM] = gm_ptr as u64;
        ctx.helpers = self.helper_table.as_ptr();
        ctx.helpers_len = self.helper_table.len() as u64;
        if let Some(r) = fast {
            ctx.fast_start = r.start;
            ctx.fast_len = r.len;
            ctx.fast_wlen = if r.writable { r.len } else { 0 };
        }
        ctx.tail_tables = tables.as_ptr();
        ctx.tail_tables_len = tables.len() as u64;
        // SAFETY: writes the field through the pointer the code will get; `ctx` is not
        // otherwise borrowed until the run ends.
        unsafe { (*ctx_ptr).mem = ctx_ptr.cast() };
        // SAFETY: `entry` is this program's generated code (module invariants) following the
        // `crate::abi` contract; every pointer in `ctx` refers to locals or borrows that outlive
        // this synchronous call; memory safety of the program's accesses is as stated in the
        // module invariants (checked: `check_access`; unchecked: trusted by the host's choice).
        let r0 = unsafe { (self.entry)(r1, r2, ctx_ptr) };
        outcome(&ctx, r0)
    }

    /// [`JitProgram::run_in_on_cpu`] with the env and context of `cache`, which outlive the run
    /// and are only updated where this run differs from the cache's last one (a thread's
    /// runner keeps one cache; see [`JitRunCache`]).
    #[inline]
    pub fn run_cached(
        &self,
        cache: &mut JitRunCache,
        gm: &mut GuestMemory,
        r1: u64,
        r2: u64,
        host: *mut c_void,
        cpu: u64,
    ) -> Result<u64, Trap> {
        gm.clear_grants();
        let gm_ptr: *mut GuestMemory = gm;
        let inner: *mut CacheInner = &mut *cache.inner;
        // SAFETY: `inner` is the cache's box, exclusively borrowed through `cache` for this
        // call; the references end before the native call, which gets raw pointers.
        let (env, ctx) = unsafe { (&mut (*inner).env, &mut (*inner).ctx) };
        env.reset_for_run(r1, host);
        // SAFETY: `gm` is exclusively borrowed for this whole call; helpers use it only during
        // the native call below (null for unchecked code, which gives helpers no memory).
        unsafe {
            env.set_guest_memory(if self.checked {
                gm_ptr
            } else {
                std::ptr::null_mut()
            })
        };
        if ctx.reserved[RESERVED_GM] != gm_ptr as u64 {
            let frame_top = gm.frame_pointer(0);
            ctx.frame_top = frame_top;
            ctx.stack_lo = frame_top
                - (bpftime_vm::memory::MAX_FRAMES * bpftime_vm::memory::FRAME_SIZE) as u64;
            ctx.reserved[RESERVED_GM] = gm_ptr as u64;
        }
        ctx.trap_kind = trap::NONE;
        ctx.tail_calls = 0;
        // The checker's window starts on the second region the host registered (a program's
        // global data, typically), which is valid for the whole run: its accesses are then
        // tested inline from the first one on.
        let window = gm.regions().get(1).map_or([0; 3], |r| {
            [r.start, r.len, if r.writable { r.len } else { 0 }]
        });
        ctx.reserved[..3].copy_from_slice(&window);
        ctx.helpers = self.helper_table.as_ptr();
        ctx.helpers_len = self.helper_table.len() as u64;
        match gm.regions().first() {
            Some(r) => {
                ctx.fast_start = r.start;
                ctx.fast_len = r.len;
                ctx.fast_wlen = if r.writable { r.len } else { 0 };
            }
            None => {
                ctx.fast_start = 0;
                ctx.fast_len = 0;
                ctx.fast_wlen = 0;
            }
        }
        ctx.funcs = 0;
        ctx.cur_fp = 0;
        ctx.cpu = cpu;
        // SAFETY: as in `run_inner`: generated code of this program, a context whose pointers
        // (env, itself, the checker's memory, helper table) outlive this synchronous call.
        let r0 = unsafe { (self.entry)(r1, r2, inner.cast::<u8>().add(CTX_OFF).cast()) };
        // SAFETY: the run is over; nothing else borrows the cache.
        outcome(unsafe { &(*inner).ctx }, r0)
    }
}

/// A [`JitContext`] and its [`CallEnv`] kept across runs (one per thread in a runner):
/// [`JitProgram::run_cached`] sets only the fields that change between runs. Boxed, so the
/// pointers between them (context → env, context → itself, env → callback state) stay valid
/// when the cache moves.
#[derive(Debug)]
pub struct JitRunCache {
    inner: Box<CacheInner>,
}

#[repr(C)]
#[derive(Debug)]
struct CacheInner {
    ctx: JitContext,
    env: CallEnv,
}

/// Offset of the context in [`CacheInner`] (first, `repr(C)`).
const CTX_OFF: usize = std::mem::offset_of!(CacheInner, ctx);

impl Default for JitRunCache {
    fn default() -> Self {
        Self::new()
    }
}

impl JitRunCache {
    /// A fresh cache (its first run fills every field).
    pub fn new() -> Self {
        let mut inner = Box::new(CacheInner {
            // (Placeholder frame: the first run sets the stack of its memory.)
            ctx: JitContext::new(
                (bpftime_vm::memory::MAX_FRAMES * bpftime_vm::memory::FRAME_SIZE) as u64,
                std::ptr::null_mut(),
            ),
            env: CallEnv::new(0, std::ptr::null_mut()),
        });
        let p: *mut CacheInner = &mut *inner;
        // SAFETY: `p` is the box just made; the pointers stored point into it and stay valid
        // for the box's life (it is never moved out of).
        unsafe {
            (*p).ctx.env = &mut (*p).env;
            (*p).ctx.mem = (&raw mut (*p).ctx).cast();
            (*p).ctx.check = Some(check_access);
            // No GuestMemory yet: the first run sets the memory-dependent fields.
            (*p).ctx.reserved[RESERVED_GM] = 0;
            // `jit_callback` is sound with this context as state (module invariants) while a
            // run of `run_cached` is in progress, the only time helpers can call it.
            (*p).env
                .set_callback(Some(jit_callback), (&raw mut (*p).ctx).cast());
        }
        JitRunCache { inner }
    }
}

/// The result of a run from its context: `Ok(r0)`, or the trap the code recorded.
#[inline]
fn outcome(ctx: &JitContext, r0: u64) -> Result<u64, Trap> {
    let pc = ctx.trap_pc as usize;
    let kind = match ctx.trap_kind {
        trap::NONE => return Ok(r0),
        trap::OUT_OF_BOUNDS => TrapKind::OutOfBounds {
            addr: ctx.trap_addr,
            len: ctx.trap_len,
            write: ctx.trap_write != 0,
        },
        trap::MISALIGNED => TrapKind::Misaligned {
            addr: ctx.trap_addr,
            len: ctx.trap_len,
        },
        trap::UNKNOWN_HELPER => TrapKind::UnknownHelper { id: ctx.trap_addr },
        trap::HELPER_FAULT => TrapKind::HelperFault {
            code: ctx.trap_addr as u32,
        },
        _ => TrapKind::BudgetExhausted,
    };
    Err(Trap { kind, pc })
}

/// A `BPF_MAP_TYPE_PROG_ARRAY` as the x86_64 code sees it: slots of compiled programs selected
/// by the `map` handle a program passes in r2 of `bpf_tail_call`.
#[derive(Debug, Clone)]
pub struct ProgArray<'a> {
    map: u64,
    slots: Vec<*const u8>,
    any_checked: bool,
    _progs: PhantomData<&'a JitProgram>,
}

impl<'a> ProgArray<'a> {
    /// An array of `len` empty slots, answering to r2 == `map`.
    pub fn new(map: u64, len: usize) -> Self {
        ProgArray {
            map,
            slots: vec![std::ptr::null(); len],
            any_checked: false,
            _progs: PhantomData,
        }
    }

    /// Fills (or empties, with `None`) slot `index`; false when out of range.
    pub fn set(&mut self, index: usize, prog: Option<&'a JitProgram>) -> bool {
        let Some(slot) = self.slots.get_mut(index) else {
            return false;
        };
        *slot = prog.map_or(std::ptr::null(), JitProgram::tail_entry);
        self.any_checked |= prog.is_some_and(JitProgram::is_checked);
        true
    }
}

/// [`bpftime_vm::helper::CallbackFn`] of the x86_64 JIT: runs callback `func` of the running
/// program (its token names a function of `ctx.funcs`) in the frame below `ctx.cur_fp`.
///
/// # Safety
/// `env` is the env of a run of [`JitProgram::run_inner`], whose state is that run's live
/// context (module invariants); `grants` are valid for the call.
unsafe fn jit_callback(
    env: &mut CallEnv,
    func: u64,
    args: [u64; 5],
    grants: &[MemRegion],
) -> Result<u64, CallbackError> {
    let ctx = env.engine_state().cast::<JitContext>();
    // SAFETY: the run's context (contract); generated code is suspended in the helper that
    // called us, so nothing else accesses these fields meanwhile.
    let (table, cur_fp, frame_top) = unsafe { ((*ctx).funcs, (*ctx).cur_fp, (*ctx).frame_top) };
    let pc = func_token_pc(func).ok_or(CallbackError::Invalid)?;
    let mut read = |addr: u64, buf: &mut [u8]| {
        // SAFETY: `table` is the function table generated code published, inside its code
        // mapping, which stays mapped for the run; `find_callback` reads only the header and
        // the entries it counts.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    };
    let (entry, target, frames) =
        crate::abi::find_callback(&mut read, table, pc).ok_or(CallbackError::Invalid)?;
    // The frame below the caller's (from its r10), if the callback's tree fits there.
    let fp = crate::abi::callback_fp(frame_top, cur_fp, frames).ok_or(CallbackError::Invalid)?;
    let frame = CallbackFrame { args, target, fp };
    let mark = env.grants_mark();
    for g in grants {
        // SAFETY: forwarded contract on `grants`.
        unsafe { env.grant(g.start, g.len, g.writable) };
    }
    env.enter_callback(true);
    // SAFETY: `entry` is the callback entry routine of the running program's code (from its
    // own table), following `CallbackEntry`'s contract; `frame` lives across the call and its
    // frame lies inside the run's stack (checked above).
    let r0 = unsafe {
        let entry = std::mem::transmute::<u64, CallbackEntry>(entry);
        entry(&frame, ctx)
    };
    env.enter_callback(false);
    env.truncate_grants(mark);
    // SAFETY: as above; the callback's run is over.
    let trapped = unsafe {
        (*ctx).cur_fp = cur_fp;
        // Revoked grants may be cached as the checker's window.
        (*ctx).reserved[0] = 0;
        (*ctx).reserved[1] = 0;
        (*ctx).reserved[2] = 0;
        (*ctx).trap_kind != trap::NONE
    };
    if trapped {
        env.status = CallStatus::Trapped as u32;
        return Err(CallbackError::Stop);
    }
    if env.status == CallStatus::Exit as u32 {
        return Err(CallbackError::Stop);
    }
    Ok(r0)
}
