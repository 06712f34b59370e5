//! The contract between generated code (either architecture) and the host.
//!
//! **Change note (x86_64 backend):** fields were only *appended* to [`JitContext`] after
//! `reserved` (`stack_lo`, `fast_start`, `fast_len`, `fast_wlen`, `tail_tables`,
//! `tail_tables_len`, offsets asserted below); every earlier offset is unchanged. Build contexts
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
        }
    }
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
};

/// The generated function's type.
pub type JitEntry = unsafe extern "C" fn(r1: u64, r2: u64, ctx: *mut JitContext) -> u64;
