//! The helper ABI shared by the interpreter and the JIT.
//!
//! A helper is an `extern "C"` function of the five argument registers r1–r5 and a pointer to
//! the engine's [`CallEnv`]; it returns the new r0. Both engines call the same function pointer:
//! the JIT passes the env pointer as the sixth C argument (rdi, rsi, rdx, rcx, r8, r9 on x86_64;
//! x0–x5 on aarch64), so a helper call from JIT code is one indirect call, no dispatch.
//!
//! Helpers see the current program context (`env.ctx`), the host's own data (`env.host`), can
//! ask the engine to stop the program (`env.request_exit`, used by the conformance "unwind"
//! helper and `bpf_tail_call`-like control), report a fault (`env.fault`), and, when the engine
//! checks memory, grant the program access to memory they hand out (map values). Helpers read
//! and write the program's memory only through [`CallEnv::read_guest`]/[`CallEnv::write_guest`],
//! which check the interpreter's regions (and trust the pointer under the JIT).

use crate::memory::GuestMemory;
use crate::verifier::Program;
use std::ffi::c_void;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

/// A helper function as both engines call it.
pub type HelperFn = extern "C" fn(u64, u64, u64, u64, u64, &mut CallEnv) -> u64;

/// What a helper asked the engine to do after it returned.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallStatus {
    /// Continue with r0 = the helper's return value.
    Continue = 0,
    /// Stop the program now; its result is `CallEnv::exit_value`.
    Exit = 1,
    /// The helper faulted (bad argument it cannot turn into an errno); the program traps.
    Fault = 2,
    /// The helper started a tail call ([`CallEnv::tail_call`]): the engine replaces the running
    /// program with the target. An engine that cannot (no target for it, or inside a callback)
    /// continues as for [`CallStatus::Continue`].
    TailCall = 3,
    /// A callback the helper ran ([`CallEnv::call_func`]) trapped; the engine has recorded the
    /// trap and the program stops with it.
    Trapped = 4,
}

/// High 32 bits of the value `lddw rX, func f` (`BPF_PSEUDO_FUNC`) loads: the engines load
/// `FUNC_TAG | pc of f`, an opaque token only [`CallEnv::call_func`] gives meaning to.
pub const FUNC_TAG: u64 = 0xbfca_11b0 << 32;

/// The token `lddw rX, func f` loads for a function starting at slot `pc`.
pub fn func_token(pc: usize) -> u64 {
    FUNC_TAG | pc as u64
}

/// The slot a function token names (not checked against any program).
pub fn func_token_pc(token: u64) -> Option<usize> {
    (token & !0xffff_ffff == FUNC_TAG).then_some((token & 0xffff_ffff) as usize)
}

/// Why [`CallEnv::call_func`] did not return a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// Not a function of the running program that a `lddw` names (or no frame is left for
    /// it): the helper returns `-EINVAL`, as the kernel's verifier would have refused it.
    #[error("invalid callback")]
    Invalid,
    /// The program stops (the callback trapped, or a helper it called asked to stop): the
    /// helper returns at once; the engine ignores its result.
    #[error("the program stops")]
    Stop,
}

/// An engine's implementation of [`CallEnv::call_func`] (`engine` is its state).
///
/// # Safety
/// Called only through [`CallEnv::call_func`], with the env the engine set it in, during the
/// helper call; `grants` as in [`CallEnv::call_func_granting`].
pub type CallbackFn = unsafe fn(
    env: &mut CallEnv,
    func: u64,
    args: [u64; 5],
    grants: &[MemRegion],
) -> Result<u64, CallbackError>;

/// The kernel's `MAX_TAIL_CALL_CNT`: tail calls one run may make.
pub const MAX_TAIL_CALLS: u32 = 33;

/// The program a tail call starts, as the interpreter runs it (the JIT jumps to the target's
/// native code instead, [`CallEnv::tail_entry`]).
#[derive(Clone, Debug)]
pub struct TailTarget {
    /// The verified target program.
    pub prog: Arc<Program>,
    /// The helpers it was verified against.
    pub helpers: Arc<HelperRegistry>,
}

/// A memory region the program may access, as (start, length, writable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Stores allowed.
    pub writable: bool,
}

impl MemRegion {
    /// Whether `[addr, addr + len)` lies inside the region (and is writable if `write`).
    #[inline]
    pub fn contains(&self, addr: u64, len: u64, write: bool) -> bool {
        (!write || self.writable)
            && addr >= self.start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.start.wrapping_add(self.len))
    }
}

/// Regions granted at run time (map values returned by helpers), checked by the interpreter.
///
/// A program looking many keys up in one run (a loop) gets many grants. A grant equal to one
/// of the last few is dropped; others are kept as they come until there are
/// [`GRANTS_UNINDEXED`], and from then on duplicates are found through a set (so a run's
/// grants stay bounded by the distinct values it was given, plus that many). Searches start
/// from the newest grant (the value a helper just returned is what the program touches next).
#[derive(Debug, Default)]
pub struct Grants {
    regions: Vec<MemRegion>,
    /// `regions` as a set, kept while there are more than [`GRANTS_UNINDEXED`] of them (its
    /// table is kept across runs).
    index: std::collections::HashSet<(u64, u64, bool), BuildHasherDefault<GrantHasher>>,
}

/// A multiply-rotate hash for grant keys (addresses and lengths the host chose, not input an
/// attacker controls): the default SipHash cost more than the rest of a map lookup's grant.
#[derive(Debug, Default, Clone, Copy)]
pub struct GrantHasher(u64);

impl std::hash::Hasher for GrantHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The newest grants a new one is compared with before it is added.
const GRANTS_RECENT: usize = 2;
/// Grants kept without the set (duplicates of older ones included); past them every grant
/// goes through [`Grants::index`]. Inserting into the set cost a quarter of a hash map
/// lookup from a program, so the common runs (up to some hundreds of lookups) skip it.
const GRANTS_UNINDEXED: usize = 1024;

impl Grants {
    /// Adds a region unless it is already granted (among the newest ones, or any once the
    /// set is in use).
    /// (Inlined into the helpers: passing the region through memory right after building it
    /// field by field stalled on store forwarding.)
    #[inline]
    pub fn grant(&mut self, r: MemRegion) {
        let n = self.regions.len();
        if self.regions[n.saturating_sub(GRANTS_RECENT)..].contains(&r) {
            return;
        }
        if n < GRANTS_UNINDEXED {
            self.regions.push(r);
            return;
        }
        self.grant_indexed(r);
    }

    /// [`Grants::grant`] past [`GRANTS_UNINDEXED`]: through the set.
    #[cold]
    #[inline(never)]
    fn grant_indexed(&mut self, r: MemRegion) {
        if self.index.is_empty() {
            self.index
                .extend(self.regions.iter().map(|g| (g.start, g.len, g.writable)));
        }
        if self.index.insert((r.start, r.len, r.writable)) {
            self.regions.push(r);
        }
    }
    /// Whether any granted region holds the access.
    #[inline]
    pub fn allows(&self, addr: u64, len: u64, write: bool) -> bool {
        self.regions
            .iter()
            .rev()
            .any(|r| r.contains(addr, len, write))
    }
    /// The newest grant, if it holds the access (the value a helper just returned, which the
    /// program touches next).
    #[inline]
    pub fn newest(&self, addr: u64, len: u64, write: bool) -> Option<MemRegion> {
        self.regions
            .last()
            .filter(|r| r.contains(addr, len, write))
            .copied()
    }
    /// The granted region that holds the access, if any.
    pub fn find(&self, addr: u64, len: u64, write: bool) -> Option<MemRegion> {
        self.regions
            .iter()
            .rev()
            .find(|r| r.contains(addr, len, write))
            .copied()
    }
    /// Forgets every grant.
    pub fn clear(&mut self) {
        self.regions.clear();
        if !self.index.is_empty() {
            self.index.clear();
        }
    }
    /// Number of grants.
    pub fn len(&self) -> usize {
        self.regions.len()
    }
    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
    /// Drops every grant after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        if len < self.regions.len() {
            self.regions.truncate(len);
            // Rebuilt on the next grant past the scanned ones.
            self.index.clear();
        }
    }
}

/// The engine state a helper can see. `#[repr(C)]`: JIT code reads `status` at a fixed offset.
#[repr(C)]
pub struct CallEnv {
    /// [`CallStatus`] as u32; JIT code checks it after helpers that may stop the program.
    pub status: u32,
    /// Helper-defined fault code when `status == Fault`.
    pub fault_code: u32,
    /// The program's result when `status == Exit`.
    pub exit_value: u64,
    /// The program context (initial r1).
    pub ctx: u64,
    /// Host data, opaque to the VM (the runtime's per-call state).
    pub host: *mut c_void,
    /// The interpreter's guest memory during a helper call; null when the engine does not
    /// check memory (JIT code).
    mem: *mut GuestMemory,
    /// Tail call: where JIT code jumps when `status == TailCall` (the target's tail entry;
    /// null: the JIT falls through).
    tail_entry: *const u8,
    /// Tail calls made so far in this run (at most [`MAX_TAIL_CALLS`]).
    tail_calls: u32,
    /// Callbacks (`bpf_loop`, …) of this run currently executing: 0 in the program itself.
    pub(crate) callback_depth: u32,
    /// Tail call: the target for the interpreter.
    pub(crate) tail_target: Option<TailTarget>,
    /// The engine's callback entry, set around calls of helpers that call back.
    callback: Option<CallbackFn>,
    /// The engine's state for `callback`.
    engine: *mut c_void,
}

const _: () = assert!(std::mem::offset_of!(CallEnv, status) == 0);
const _: () = assert!(std::mem::offset_of!(CallEnv, exit_value) == 8);
/// Offset of the tail-call entry JIT code reads after a tail-calling helper.
pub const ENV_TAIL_ENTRY: usize = std::mem::offset_of!(CallEnv, tail_entry);
/// Offset of the callback depth JIT code reads before a tail call.
pub const ENV_CALLBACK_DEPTH: usize = std::mem::offset_of!(CallEnv, callback_depth);

impl fmt::Debug for CallEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallEnv")
            .field("status", &self.status)
            .field("fault_code", &self.fault_code)
            .field("exit_value", &self.exit_value)
            .field("ctx", &format_args!("{:#x}", self.ctx))
            .field("checked", &!self.mem.is_null())
            .finish()
    }
}

impl CallEnv {
    /// An env for one program run.
    pub fn new(ctx: u64, host: *mut c_void) -> Self {
        CallEnv {
            status: CallStatus::Continue as u32,
            fault_code: 0,
            exit_value: 0,
            ctx,
            host,
            mem: std::ptr::null_mut(),
            tail_entry: std::ptr::null(),
            tail_calls: 0,
            callback_depth: 0,
            tail_target: None,
            callback: None,
            engine: std::ptr::null_mut(),
        }
    }

    /// Makes an env that served an earlier run ready for another one with context `ctx` and
    /// host data `host`, as [`CallEnv::new`] would, but keeping the engine's callback entry and
    /// guest memory (for engines that keep one env per thread).
    #[inline]
    pub fn reset_for_run(&mut self, ctx: u64, host: *mut c_void) {
        self.status = CallStatus::Continue as u32;
        self.fault_code = 0;
        self.exit_value = 0;
        self.ctx = ctx;
        self.host = host;
        self.tail_entry = std::ptr::null();
        self.tail_calls = 0;
        self.callback_depth = 0;
        if self.tail_target.is_some() {
            self.tail_target = None;
        }
    }

    /// Calls the program's function `func` — a token `lddw rX, func f` loaded, as a helper
    /// such as `bpf_loop` gets it — with r1–r5 = `args`, in a fresh 512-byte frame below the
    /// calling function's, on the run's memory; returns its r0.
    ///
    /// `Err(Invalid)`: not a callback of the running program (a helper then returns
    /// `-EINVAL`, never a crash). `Err(Stop)`: the program stops (the callback trapped or
    /// exited through a helper); the helper must return at once.
    pub fn call_func(&mut self, func: u64, args: [u64; 5]) -> Result<u64, CallbackError> {
        // SAFETY: no grants.
        unsafe { self.call_func_granting(func, args, &[]) }
    }

    /// [`CallEnv::call_func`], letting the callback access `grants` (a map key and value)
    /// during the call only.
    ///
    /// # Safety
    /// Each grant must be valid for reads (and writes if writable) during the call, and not be
    /// accessed through Rust references meanwhile.
    pub unsafe fn call_func_granting(
        &mut self,
        func: u64,
        args: [u64; 5],
        grants: &[MemRegion],
    ) -> Result<u64, CallbackError> {
        match self.callback {
            // SAFETY: the engine set `f` for this helper call (see `set_callback`); grants
            // per this function's contract.
            Some(f) => unsafe { f(self, func, args, grants) },
            None => Err(CallbackError::Invalid),
        }
    }

    /// Installs the engine's callback entry for a helper call; returns the previous one, to
    /// restore after the call.
    ///
    /// # Safety
    /// `f` must be sound to call with this env and `engine` until the previous entry is
    /// restored.
    pub unsafe fn set_callback(
        &mut self,
        f: Option<CallbackFn>,
        engine: *mut c_void,
    ) -> (Option<CallbackFn>, *mut c_void) {
        let old = (self.callback, self.engine);
        self.callback = f;
        self.engine = engine;
        old
    }

    /// The engine state set with [`CallEnv::set_callback`].
    pub fn engine_state(&self) -> *mut c_void {
        self.engine
    }

    /// Enters (`true`) or leaves a callback: tail calls are refused inside one.
    pub fn enter_callback(&mut self, enter: bool) {
        if enter {
            self.callback_depth += 1;
        } else {
            self.callback_depth = self.callback_depth.saturating_sub(1);
        }
    }

    /// The number of regions helpers granted so far this run (with checked memory), for
    /// [`CallEnv::truncate_grants`].
    pub fn grants_mark(&self) -> usize {
        crate::memory::grants_len(self.mem)
    }

    /// Revokes the grants made after `mark` (a callback's arguments, once it returned).
    pub fn truncate_grants(&mut self, mark: usize) {
        crate::memory::truncate_grants(self.mem, mark)
    }

    /// Tail calls made so far in this run.
    pub fn tail_calls(&self) -> u32 {
        self.tail_calls
    }

    /// Counts one tail call, as the kernel does before it looks at the slot: false (nothing
    /// counted) when the run already made [`MAX_TAIL_CALLS`].
    pub fn count_tail_call(&mut self) -> bool {
        if self.tail_calls >= MAX_TAIL_CALLS {
            return false;
        }
        self.tail_calls += 1;
        true
    }

    /// Whether a callback (a function a helper such as `bpf_loop` called) is running: tail
    /// calls are not possible there.
    pub fn in_callback(&self) -> bool {
        self.callback_depth > 0
    }

    /// Replaces the running program with `target` once this helper returns: the interpreter
    /// runs `target`, JIT code jumps to `jit_entry` (null: JIT code falls through instead).
    /// The new program starts with the current r1 and an empty stack of frames; helpers it
    /// calls see `self.host` (which the caller of this function sets to the target's).
    ///
    /// # Safety
    /// `jit_entry` is null or the tail entry of native code compiled for the running JIT
    /// backend that stays mapped until the run ends.
    pub unsafe fn tail_call(&mut self, target: TailTarget, jit_entry: *const u8) {
        self.status = CallStatus::TailCall as u32;
        self.tail_target = Some(target);
        self.tail_entry = jit_entry;
    }

    /// The pending tail call's target, clearing it and the status (for engines).
    pub fn take_tail_call(&mut self) -> Option<TailTarget> {
        self.status = CallStatus::Continue as u32;
        self.tail_entry = std::ptr::null();
        self.tail_target.take()
    }

    /// Lets helpers check against, and grant into, the interpreter's memory for one call.
    pub(crate) fn set_memory(&mut self, mem: &mut GuestMemory) {
        self.mem = mem;
    }

    /// Lets helpers check against, and grant into, `mem` for the rest of a run (the JIT's checked
    /// mode); null makes them trust pointers, as under unchecked JIT code.
    ///
    /// # Safety
    /// `mem` is null or points to a `GuestMemory` that stays alive, and is not otherwise borrowed
    /// while helpers run, until this env is dropped or given another memory.
    pub unsafe fn set_guest_memory(&mut self, mem: *mut GuestMemory) {
        self.mem = mem;
    }

    /// Stops the program after this helper returns, with result `value`.
    pub fn request_exit(&mut self, value: u64) {
        self.status = CallStatus::Exit as u32;
        self.exit_value = value;
    }

    /// Makes the program trap after this helper returns.
    pub fn fault(&mut self, code: u32) {
        self.status = CallStatus::Fault as u32;
        self.fault_code = code;
    }

    /// Whether the engine checks memory accesses.
    pub fn is_checked(&self) -> bool {
        !self.mem.is_null()
    }

    /// Lets the program access `[start, start + len)` (a map value this helper hands out).
    /// A no-op when the engine does not check memory.
    ///
    /// # Safety
    /// The range must be valid for reads (and writes if `writable`) until the program run ends,
    /// and not be accessed through Rust references meanwhile.
    #[inline]
    pub unsafe fn grant(&mut self, start: u64, len: u64, writable: bool) {
        // SAFETY: forwarded contract; `mem` is null or set by `set_memory` for this call.
        unsafe {
            crate::memory::grant(
                self.mem,
                MemRegion {
                    start,
                    len,
                    writable,
                },
            )
        }
    }

    /// Copies guest memory at `addr` into `buf` (a key, a buffer the program passed).
    /// Returns false, copying nothing, when the engine checks memory and the program may not
    /// read that range. Without checks (JIT), the program is trusted to pass valid pointers.
    /// (Inlined: helpers copy small, fixed-size keys and words, which then need no `memmove`.)
    #[inline]
    pub fn read_guest(&self, addr: u64, buf: &mut [u8]) -> bool {
        crate::memory::read_guest(self.mem, addr, buf)
    }

    /// Copies `data` into guest memory at `addr`; false (nothing written) when checked and the
    /// program may not write there.
    #[inline]
    pub fn write_guest(&mut self, addr: u64, data: &[u8]) -> bool {
        crate::memory::write_guest(self.mem, addr, data)
    }
}

/// A registered helper.
#[derive(Clone, Copy)]
pub struct Helper {
    /// Name for logs and disassembly (`bpf_map_lookup_elem`).
    pub name: &'static str,
    /// The function.
    pub func: HelperFn,
    /// Whether it may set [`CallStatus::Exit`] or [`CallStatus::Fault`]; the JIT checks the
    /// status only after such helpers.
    pub may_stop: bool,
    /// Whether it calls program functions back ([`CallEnv::call_func`]): the engines set up
    /// their callback entry around calls of such helpers.
    pub calls_back: bool,
}

impl fmt::Debug for Helper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Helper")
            .field("name", &self.name)
            .field("may_stop", &self.may_stop)
            .field("calls_back", &self.calls_back)
            .finish()
    }
}

/// Helpers by id. Ids are the kernel's (`BPF_FUNC_map_lookup_elem` = 1, …).
#[derive(Clone, Debug, Default)]
pub struct HelperRegistry {
    table: Vec<Option<Helper>>,
}

/// Highest helper id accepted (the kernel has ~212; leave room for host extensions).
pub const MAX_HELPER_ID: u32 = 1 << 16;

impl HelperRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `func` under `id`, replacing any earlier one.
    ///
    /// # Panics
    /// If `id` is above [`MAX_HELPER_ID`] (a host programming error, not guest input).
    pub fn register(&mut self, id: u32, name: &'static str, func: HelperFn) -> &mut Self {
        self.insert(
            id,
            Helper {
                name,
                func,
                may_stop: false,
                calls_back: false,
            },
        )
    }

    /// Registers a helper that may stop the program or fault.
    pub fn register_stopping(&mut self, id: u32, name: &'static str, func: HelperFn) -> &mut Self {
        self.insert(
            id,
            Helper {
                name,
                func,
                may_stop: true,
                calls_back: false,
            },
        )
    }

    /// Registers a helper that calls program functions back ([`CallEnv::call_func`]); it may
    /// stop the program too (a callback that traps stops it).
    pub fn register_calling_back(
        &mut self,
        id: u32,
        name: &'static str,
        func: HelperFn,
    ) -> &mut Self {
        self.insert(
            id,
            Helper {
                name,
                func,
                may_stop: true,
                calls_back: true,
            },
        )
    }

    fn insert(&mut self, id: u32, h: Helper) -> &mut Self {
        assert!(id <= MAX_HELPER_ID, "helper id {id} out of range");
        let idx = id as usize;
        if self.table.len() <= idx {
            self.table.resize(idx + 1, None);
        }
        self.table[idx] = Some(h);
        self
    }

    /// The helper registered under `id`.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&Helper> {
        self.table.get(id as usize).and_then(Option::as_ref)
    }

    /// Whether `id` is registered.
    pub fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    /// Registered ids in order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.table
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|_| i as u32))
    }
}

/// Helper #5 of the conformance suite: returns r1; stops the program with r0 = 0 when r1 is 0.
pub extern "C" fn conformance_unwind(
    r1: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if r1 == 0 {
        env.request_exit(0);
    }
    r1
}

/// The helpers the bpf_conformance suite assumes (only #5, "unwind").
pub fn conformance_helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register_stopping(5, "unwind", conformance_unwind);
    h
}

/// `BPF_FUNC_loop`.
pub const BPF_LOOP: u32 = 181;
/// Most iterations `bpf_loop` runs (the kernel's `BPF_MAX_LOOPS`).
pub const BPF_MAX_LOOPS: u64 = 1 << 23;

fn neg(errno: i64) -> u64 {
    (-errno) as u64
}

/// `bpf_loop(nr_loops, callback_fn, callback_ctx, flags)` (helper 181, `kernel/bpf/bpf_iter.c`):
/// calls `callback_fn(i, callback_ctx)` for i = 0, 1, … up to `nr_loops` times, stopping after
/// a call that returns non-zero (the verifier allows only 0 and 1); returns the number of calls
/// made. `-E2BIG` when `nr_loops` is over 2^23, `-EINVAL` for non-zero flags or a bad
/// callback. Register it with [`HelperRegistry::register_calling_back`].
pub extern "C" fn bpf_loop(
    nr_loops: u64,
    func: u64,
    ctx: u64,
    flags: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    const E2BIG: i64 = 7;
    const EINVAL: i64 = 22;
    let nr_loops = nr_loops & 0xffff_ffff;
    if nr_loops > BPF_MAX_LOOPS {
        return neg(E2BIG);
    }
    if flags != 0 {
        return neg(EINVAL);
    }
    for i in 0..nr_loops {
        match env.call_func(func, [i, ctx, 0, 0, 0]) {
            Ok(0) => {}
            Ok(_) => return i + 1,
            Err(CallbackError::Invalid) => return neg(EINVAL),
            Err(CallbackError::Stop) => return 0,
        }
    }
    nr_loops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64, writable: bool) -> MemRegion {
        MemRegion {
            start,
            len,
            writable,
        }
    }

    #[test]
    fn grants_stay_bounded_past_the_unindexed_ones_and_after_truncation() {
        let mut g = Grants::default();
        // The same value again and again (a key looked up in a loop): one grant.
        for _ in 0..5000 {
            g.grant(r(0x1000, 8, true));
        }
        assert_eq!(g.len(), 1);
        // 100 distinct values, each granted three times in a loop-like order: kept as they
        // come (300) while under the unindexed count.
        g.clear();
        for _ in 0..3 {
            for i in 0..100 {
                g.grant(r(0x1000 + 64 * i, 8, i % 2 == 0));
            }
        }
        assert_eq!(g.len(), 300);
        // Past it, duplicates are dropped: 5,000 distinct values granted 10 times each stay
        // under their number plus the unindexed count.
        let mut big = Grants::default();
        for _ in 0..10 {
            for i in 0..5000 {
                big.grant(r(0x10_0000 + 16 * i, 8, true));
            }
        }
        assert!(big.len() <= 5000 + GRANTS_UNINDEXED, "{}", big.len());
        assert!(big.allows(0x10_0000 + 16 * 4999, 8, true));
        assert!(big.allows(0x10_0000, 8, true));
        // The 100 values once each.
        g.clear();
        for i in 0..100 {
            g.grant(r(0x1000 + 64 * i, 8, i % 2 == 0));
        }
        assert_eq!(g.len(), 100);
        assert!(g.allows(0x1000 + 64 * 99, 8, false));
        assert!(g.allows(0x1000 + 64 * 98, 8, true));
        assert!(!g.allows(0x1000 + 64 * 99, 8, true), "read-only grant");
        assert!(!g.allows(0x1000 + 64 * 99 + 4, 8, false), "past its end");
        assert_eq!(
            g.find(0x1000 + 64 * 50 + 2, 4, true),
            Some(r(0x1000 + 64 * 50, 8, true))
        );
        // A callback's grants revoked: they can be granted again.
        g.truncate(20);
        assert_eq!(g.len(), 20);
        assert!(!g.allows(0x1000 + 64 * 50, 8, false));
        for i in 20..100 {
            g.grant(r(0x1000 + 64 * i, 8, i % 2 == 0));
        }
        assert_eq!(g.len(), 100);
        assert!(g.allows(0x1000 + 64 * 50, 8, true));
        // Truncated past the set: it is rebuilt, and duplicates are still dropped.
        big.truncate(GRANTS_UNINDEXED + 10);
        for i in 0..5000 {
            big.grant(r(0x10_0000 + 16 * i, 8, true));
        }
        assert!(big.len() <= 5000 + GRANTS_UNINDEXED, "{}", big.len());
        g.clear();
        assert!(g.is_empty());
        g.grant(r(1, 1, false));
        g.grant(r(1, 1, false));
        assert_eq!(g.len(), 1);
    }
}
