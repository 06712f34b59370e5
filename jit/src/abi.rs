//! The contract between generated code (either architecture) and the host.
//!
//! **Change note (x86_64 backend):** fields were only *appended* to [`JitContext`] after
//! `reserved` (`stack_lo`, `fast_start`, `fast_len`, `fast_wlen`, `tail_tables`,
//! `tail_tables_len`, then `funcs` and `cur_fp` for callbacks, then `cpu` for inlined per-CPU
//! lookups, offsets asserted below); every
//! earlier offset is unchanged. Build contexts
//! with [`JitContext::new`] (the host fills the checked-mode and tail-call fields it uses; zero
//! means "none"). Tail calls: see [`TailCallTable`].
//!
//! Generated code is a function
//!
//! ```text
//! extern "C" fn(r1: u64, r2: u64, ctx: *mut JitContext) -> u64
//! ```
//!
//! - `r1`, `r2`: the program's initial r1 and r2 (context pointer / memory block and length).
//! - `ctx`: a [`JitContext`] the host prepared for this run (fixed `#[repr(C)]` layout; generated
//!   code reads its fields at the offsets asserted below).
//! - The return value is r0 when the program exits normally. When it traps (checked-mode memory
//!   fault, unknown `callx` target, helper fault, tail-call limit …) the code stores the trap in
//!   `ctx.trap_kind`/`trap_pc`/`trap_addr`/`trap_len`/`trap_write`, unwinds its own frames and
//!   returns 0; the host turns that into the interpreter's [`bpftime_vm::interpreter::Trap`].
//!   When a helper asks to stop (`CallEnv::request_exit`), the code returns `env.exit_value`.
//!
//! eBPF stack: the code does not use the native stack for eBPF frames. `ctx.frame_top` is r10 of
//! frame 0 (the top of `MAX_FRAMES × 512` bytes the host owns — the same `GuestMemory` stack the
//! interpreter uses, so checked mode traps at exactly the same addresses); a bpf-to-bpf call
//! subtracts 512 from r10, the return adds it back.
//!
//! Helpers: `extern "C" fn(r1..r5, env: &mut CallEnv) -> u64` (see `bpftime_vm::helper`), called
//! with `ctx.env` as the sixth argument. After a helper flagged `may_stop` (and after every
//! `callx`, whose target is known only at run time), the code checks `env.status` (2 fault →
//! trap `HelperFault` with `trap_addr = env.fault_code`, 1 exit with `env.exit_value`, anything
//! else continue — the interpreter's order). Helpers clobber r1–r5 (as in the kernel).
//!
//! Checked mode (`JitOptions::checked`): before each load/store/atomic the code checks
//! `[addr, addr+len)`; the stack range `[frame_top - MAX_FRAMES*512, frame_top)` is checked
//! inline, anything else through `ctx.check(ctx.mem, addr, len, write) -> bool`. Unchecked mode
//! trusts the program (the documented JIT stance) and emits no checks. Backends may also test
//! `[fast_start, fast_start + fast_len)` (`fast_wlen` for stores) inline before calling `check`:
//! the host sets it to one region `check` accepts (the run's memory block), or leaves it empty.
//! Atomics then check natural alignment (trap `MISALIGNED`), in that order, like
//! `GuestMemory::atomic`. Accesses through r10 with a constant offset need no check: the loader
//! proved them inside the frame.
//!
//! Tail calls (`call 12`, `bpf_tail_call(ctx, map, index)`): the code looks for the
//! [`TailCallTable`] whose `map` equals r2 among `ctx.tail_tables[..tail_tables_len]`. No such
//! table, `index as u32 >= len`, `tail_calls >= MAX_TAIL_CALLS` or an empty slot: the call falls
//! through (r0 unchanged), as in the kernel. Otherwise `tail_calls` is incremented and the target
//! replaces the running program — all of its frames, bpf-to-bpf callers included — starting at
//! its tail entry with r1 = the current r1, r10 = `frame_top` and the other registers zero.

use bpftime_vm::helper::CallEnv;
use std::ffi::c_void;

// Callbacks (`bpf_loop`, `bpf_for_each_map_elem`): a helper registered as calling back gets
// the engine's callback entry through `CallEnv::call_func`. The code stores r10 in
// `ctx.cur_fp` before calling such a helper (and `callx` targets) and clears it after; the
// host's entry (`crate::program`) looks the token's function up in the running program's
// [`FuncTable`] (`ctx.funcs`), checks that its frames fit below `cur_fp`, and runs it through
// the table's [`CallbackEntry`], which saves and restores `ctx.saved_sp` around the run so
// that a trap inside unwinds only the callback. After such a helper the code checks the
// status: `CallStatus::Trapped` (4) means the callback trapped and the context already holds
// the trap.

/// Checks whether `[addr, addr + len)` may be accessed (`write` for stores/atomics).
pub type CheckFn = extern "C" fn(mem: *mut c_void, addr: u64, len: u64, write: u64) -> bool;

/// Trap kinds as generated code stores them in [`JitContext::trap_kind`].
pub mod trap {
    /// No trap.
    pub const NONE: u32 = 0;
    /// Memory access outside every region (checked mode).
    pub const OUT_OF_BOUNDS: u32 = 1;
    /// Atomic at an unaligned address (checked mode).
    pub const MISALIGNED: u32 = 2;
    /// `callx` to an id with no helper.
    pub const UNKNOWN_HELPER: u32 = 3;
    /// A helper set `CallStatus::Fault`.
    pub const HELPER_FAULT: u32 = 4;
    /// Instruction budget exhausted (only if budgets are supported by the backend).
    pub const BUDGET: u32 = 5;
}

/// Per-run state shared with generated code.
#[repr(C)]
#[derive(Debug)]
pub struct JitContext {
    /// r10 of frame 0.
    pub frame_top: u64,
    /// The helper env (sixth argument of every helper call).
    pub env: *mut CallEnv,
    /// Checked mode: the region checker and its argument (the run's `GuestMemory`).
    pub check: Option<CheckFn>,
    /// Argument for `check`.
    pub mem: *mut c_void,
    /// Helper table for `callx`: `helpers[id]` or null; `helpers_len` entries.
    pub helpers: *const Option<bpftime_vm::helper::HelperFn>,
    /// Entries in `helpers`.
    pub helpers_len: u64,
    /// Trap out-parameters.
    pub trap_kind: u32,
    /// Trap: the eBPF pc of the faulting instruction.
    pub trap_pc: u32,
    /// Trap: faulting address / helper id / fault code.
    pub trap_addr: u64,
    /// Trap: access length.
    pub trap_len: u64,
    /// Trap: 1 for a store.
    pub trap_write: u64,
    /// Tail calls made so far in this run (limit 33, as the kernel's `MAX_TAIL_CALL_CNT`).
    pub tail_calls: u64,
    /// Saved native stack pointer for unwinding on a trap (written by the prologue).
    pub saved_sp: u64,
    /// Reserved for the backends (e.g. a tail-call target table).
    pub reserved: [u64; 4],
    /// Lowest stack address: `frame_top - MAX_FRAMES * 512`.
    pub stack_lo: u64,
    /// Checked mode: start of one region that may be tested inline before `check`.
    pub fast_start: u64,
    /// Bytes at `fast_start` the program may load (0: no fast region).
    pub fast_len: u64,
    /// Bytes at `fast_start` the program may store to (`fast_len`, or 0 for a read-only region).
    pub fast_wlen: u64,
    /// Tail calls: `tail_tables_len` tables (null when there are none).
    pub tail_tables: *const TailCallTable,
    /// Entries in `tail_tables`.
    pub tail_tables_len: u64,
    /// The running program's [`FuncTable`] (written by the code at its entry and tail entry;
    /// 0 when it has no callbacks).
    pub funcs: u64,
    /// r10 of the function that called a helper that calls back, during that call (0
    /// otherwise): callbacks run in the frame below it.
    pub cur_fp: u64,
    /// The CPU id the run is pinned to, for inlined per-CPU array lookups
    /// ([`crate::InlineMap`]); `u64::MAX` (unknown) sends them to the helper.
    pub cpu: u64,
    /// Bytes of stack from `stack_lo` that checked accesses may reach (`MAX_FRAMES * 512`;
    /// a native entry of a program without bpf-to-bpf calls gives it one frame).
    pub stack_len: u64,
}

impl JitContext {
    /// A context for one run: r10 of frame 0 is `frame_top` (the stack is the
    /// `MAX_FRAMES * 512` bytes below it), helpers get `env`; every other field is zero / null
    /// (no checker, no `callx` table, no fast region, no tail-call tables).
    pub fn new(frame_top: u64, env: *mut CallEnv) -> Self {
        JitContext {
            frame_top,
            env,
            check: None,
            mem: std::ptr::null_mut(),
            helpers: std::ptr::null(),
            helpers_len: 0,
            trap_kind: trap::NONE,
            trap_pc: 0,
            trap_addr: 0,
            trap_len: 0,
            trap_write: 0,
            tail_calls: 0,
            saved_sp: 0,
            reserved: [0; 4],
            stack_lo: frame_top
                - (bpftime_vm::memory::MAX_FRAMES * bpftime_vm::memory::FRAME_SIZE) as u64,
            fast_start: 0,
            fast_len: 0,
            fast_wlen: 0,
            tail_tables: std::ptr::null(),
            tail_tables_len: 0,
            funcs: 0,
            cur_fp: 0,
            cpu: u64::MAX,
            stack_len: (bpftime_vm::memory::MAX_FRAMES * bpftime_vm::memory::FRAME_SIZE) as u64,
        }
    }
}

/// Callbacks (`lddw rX, func f` + `bpf_loop` & co.): the code of a program with callbacks ends
/// with this table (8-aligned), which its entry and tail entry publish in
/// [`JitContext::funcs`]. Offsets are relative to the table, so the code stays
/// position-independent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuncTable {
    /// Entries that follow.
    pub len: u32,
    /// Offset of the callback entry routine ([`CallbackEntry`]).
    pub entry: i32,
}

/// One callback of a [`FuncTable`], sorted by `pc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuncEntry {
    /// eBPF slot of the function (what its token names).
    pub pc: u32,
    /// Offset of the function's code.
    pub code: i32,
    /// Frames its call tree needs, itself included.
    pub frames: u32,
    /// Zero.
    pub pad: u32,
}

const _: () = assert!(size_of::<FuncTable>() == 8 && size_of::<FuncEntry>() == 16);

/// What the callback entry routine runs: function `target` (absolute code address) with r1–r5
/// = `args` and r10 = `fp`, every other register zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CallbackFrame {
    /// r1–r5.
    pub args: [u64; 5],
    /// Code address of the function.
    pub target: u64,
    /// r10 of the callback's frame.
    pub fp: u64,
}

/// Offsets of [`CallbackFrame`] fields read by the code.
pub const CB_TARGET: usize = std::mem::offset_of!(CallbackFrame, target);
/// See [`CB_TARGET`].
pub const CB_FP: usize = std::mem::offset_of!(CallbackFrame, fp);

/// The callback entry routine: saves the host's registers like the program entry, runs the
/// frame's function and returns its r0 — or 0 after a trap, which it records in the context
/// and unwinds from, like the entry (exits requested by helpers return `env.exit_value`).
pub type CallbackEntry =
    unsafe extern "C" fn(frame: *const CallbackFrame, ctx: *mut JitContext) -> u64;

/// Looks callback `pc` up in the [`FuncTable`] at `table`, reading memory through `read`
/// (false: unreadable): `(entry routine address, function address, frames)`.
pub fn find_callback(
    read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
    table: u64,
    pc: usize,
) -> Option<(u64, u64, usize)> {
    if table == 0 {
        return None;
    }
    let mut b = [0u8; 16];
    read(table, &mut b[..8]).then_some(())?;
    let len = u32::from_le_bytes(b[..4].try_into().ok()?);
    let entry = i32::from_le_bytes(b[4..8].try_into().ok()?);
    let (mut lo, mut hi) = (0u32, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = table.checked_add(8 + 16 * u64::from(mid))?;
        read(at, &mut b).then_some(())?;
        let epc = u32::from_le_bytes(b[..4].try_into().ok()?) as usize;
        match epc.cmp(&pc) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                let code = i32::from_le_bytes(b[4..8].try_into().ok()?);
                let frames = u32::from_le_bytes(b[8..12].try_into().ok()?);
                return Some((
                    table.wrapping_add_signed(i64::from(entry)),
                    table.wrapping_add_signed(i64::from(code)),
                    frames as usize,
                ));
            }
        }
    }
    None
}

/// r10 of a callback whose call tree needs `frames` frames, called from the function whose r10
/// is `cur_fp` (the stack's frame 0 has r10 = `frame_top`): the frame below `cur_fp`, or
/// `None` when `cur_fp` is no frame of that stack or the tree would not fit in it.
pub fn callback_fp(frame_top: u64, cur_fp: u64, frames: usize) -> Option<u64> {
    use bpftime_vm::memory::{FRAME_SIZE, MAX_FRAMES};
    let frame = FRAME_SIZE as u64;
    let below = frame_top.checked_sub(cur_fp)?;
    if cur_fp == 0 || !below.is_multiple_of(frame) {
        return None;
    }
    let depth = below / frame + 1;
    (depth.saturating_add(frames as u64) <= MAX_FRAMES as u64).then(|| frame_top - depth * frame)
}

/// The table bytes for `entries` (sorted by pc) and the entry routine, with `table_off` the
/// offset of the table in the code and the other offsets absolute in the code.
pub(crate) fn func_table_bytes(
    table_off: usize,
    entry_off: usize,
    entries: &[(usize, usize, usize)],
) -> Vec<u8> {
    let rel = |off: usize| (off as i64 - table_off as i64) as i32;
    let mut out = Vec::with_capacity(8 + 16 * entries.len());
    out.extend((entries.len() as u32).to_le_bytes());
    out.extend(rel(entry_off).to_le_bytes());
    for &(pc, code, frames) in entries {
        out.extend((pc as u32).to_le_bytes());
        out.extend(rel(code).to_le_bytes());
        out.extend((frames as u32).to_le_bytes());
        out.extend(0u32.to_le_bytes());
    }
    out
}

/// The kernel's `MAX_TAIL_CALL_CNT`: tail calls one run may make.
pub const MAX_TAIL_CALLS: u64 = 33;

/// One program array as generated code sees it (a future `BPF_MAP_TYPE_PROG_ARRAY` builds one per
/// process from its entries). Selected by r2 of the `bpf_tail_call`, indexed by r3.
#[repr(C)]
#[derive(Debug)]
pub struct TailCallTable {
    /// The r2 value (the map handle the program loaded) this table answers to.
    pub map: u64,
    /// Slots in `slots`.
    pub len: u64,
    /// `len` tail entries of compiled programs of the same backend, or null for an empty slot.
    pub slots: *const *const u8,
}

const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(TailCallTable, map) == 0);
    assert!(offset_of!(TailCallTable, len) == 8);
    assert!(offset_of!(TailCallTable, slots) == 16);
    assert!(std::mem::size_of::<TailCallTable>() == 24);
};

const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(JitContext, frame_top) == 0);
    assert!(offset_of!(JitContext, env) == 8);
    assert!(offset_of!(JitContext, check) == 16);
    assert!(offset_of!(JitContext, mem) == 24);
    assert!(offset_of!(JitContext, helpers) == 32);
    assert!(offset_of!(JitContext, helpers_len) == 40);
    assert!(offset_of!(JitContext, trap_kind) == 48);
    assert!(offset_of!(JitContext, trap_pc) == 52);
    assert!(offset_of!(JitContext, trap_addr) == 56);
    assert!(offset_of!(JitContext, trap_len) == 64);
    assert!(offset_of!(JitContext, trap_write) == 72);
    assert!(offset_of!(JitContext, tail_calls) == 80);
    assert!(offset_of!(JitContext, saved_sp) == 88);
    assert!(offset_of!(JitContext, reserved) == 96);
    assert!(offset_of!(JitContext, stack_lo) == 128);
    assert!(offset_of!(JitContext, fast_start) == 136);
    assert!(offset_of!(JitContext, fast_len) == 144);
    assert!(offset_of!(JitContext, fast_wlen) == 152);
    assert!(offset_of!(JitContext, tail_tables) == 160);
    assert!(offset_of!(JitContext, tail_tables_len) == 168);
    assert!(offset_of!(JitContext, funcs) == 176);
    assert!(offset_of!(JitContext, cur_fp) == 184);
    assert!(offset_of!(JitContext, cpu) == 192);
    assert!(offset_of!(JitContext, stack_len) == 200);
};

/// The generated function's type.
pub type JitEntry = unsafe extern "C" fn(r1: u64, r2: u64, ctx: *mut JitContext) -> u64;

/// What a native entry returns: r0 and a status ([`NATIVE_RAN`], [`NATIVE_NOT_RUN`],
/// [`NATIVE_TRAPPED`]), in rax:rdx (System V returns this two-word struct in registers).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeOutcome {
    /// The program's r0 (0 when it trapped or did not run).
    pub r0: u64,
    /// What happened.
    pub status: u64,
}

/// The program ran to its exit.
pub const NATIVE_RAN: u64 = 0;
/// Nothing ran: a precondition of the native entry failed (the thread's CPU id is unknown or
/// has no slot in an inlined per-CPU array); run the program through the host instead.
pub const NATIVE_NOT_RUN: u64 = 1;
/// The program trapped (an access outside its context, stack and regions, or a misaligned
/// atomic); its effects up to the trap stay, as in a hosted run.
pub const NATIVE_TRAPPED: u64 = 2;

/// A program's native entry ([`crate::CompiledCode::native_entry`], x86_64): runs the
/// program with r1 = `ctx` and r2 = `len` (as [`crate::JitProgram::run`] does), the context
/// region `[ctx, ctx + len)` writable (as in a hosted run), the eBPF stack and a
/// [`JitContext`] on the native stack (one 512-byte frame and ~800 bytes in all without
/// bpf-to-bpf calls — a stack pointer below that frame traps, where a hosted run's 4 KiB
/// stack would take it; all frames, ~4.4 KiB, with them), the regions of
/// [`crate::NativeOptions`], and the CPU id read from the thread's rseq area.
///
/// It keeps the System V callee-saved registers, clobbers only rax, rcx, rdx, rsi, rdi,
/// r8–r11 and the arithmetic flags, never touches xmm/ymm, x87 or MXCSR state, never changes
/// DF (which must be clear, as at any call), and calls nothing outside its own code: callers
/// such as a hook stub need not save vector registers around it, and it never re-enters the
/// host (no allocation, locks or thread-locals).
pub type NativeEntry = unsafe extern "sysv64" fn(ctx: *mut u8, len: u64) -> NativeOutcome;
