//! Code generation: one pass over the verified program, emitting x86_64 with `dynasm!` into a
//! `Vec<u8>` (no executable memory here; see [`crate::exec_mem`]).
//!
//! Layout of the generated code:
//!
//! ```text
//! tail entry (offset 0): xor esi, esi; jmp init          ← bpf_tail_call targets land here
//! entry:                 push rbp, rbx, r12–r15; sub rsp, 8; r12 = ctx; ctx.saved_sp = rsp
//! init:                  rbp = ctx.frame_top; r0, r3–r9 = 0
//! pc 0 …                 main function body (exit: pop the host's registers, ret)
//! subprogram:            push rbx, r13, r14, r15, rbp; rbp -= 512; body (exit: pop, ret)
//! unwind / trap exit:    rsp = ctx.saved_sp; pop the host's registers; ret
//! callback entry:        (programs with callbacks) the entry's frame, then a call of the
//!                        function `abi::CallbackFrame` names
//! shared routines:       out-of-bounds trap and memory-check call (checked mode), tail call
//! cold stubs:            per-site slow paths and traps (checked memory, misaligned atomics,
//!                        unknown callx target, helper status)
//! data:                  jump tables (32-bit offsets), the callback table (`abi::FuncTable`)
//! ```
//!
//! The native stack is 16-byte aligned in every function body (so helper calls need no fix-up):
//! the entry pushes 6 registers plus 8 bytes, a subprogram 5 registers plus the return address.
//!
//! Code quality choices (each measured with `benches/jit.rs`):
//! - unsigned division and modulo by a constant multiply by a magic number (`mulx` with BMI2,
//!   else `mul`); by a power of two they shift or mask; 64-bit division by a register uses the
//!   32-bit `div` when both operands fit, as compilers do;
//! - shifts by a register use `shlx`/`shrx`/`sarx` when the compiling host has BMI2 (the code
//!   runs where it is compiled), else go through cl;
//! - rdx (r3) is not saved around `mul`/`div` when no instruction reads r3;
//! - 8-bit immediates and displacements where they fit, 8-bit backward jumps where they reach;
//! - loop heads (targets of backward jumps) are 16-byte aligned, and a loop estimated to fit 64
//!   bytes starts where it does not cross a 64-byte boundary;
//! - a forward `ja` to a block of at most 4 instructions ending in a conditional jump or `exit`
//!   gets a copy of the block ([`tail_copies`]: the `break` of each `case` into a loop's test);
//! - chains of 12 or more `jeq` on one register with dense constants become a bounds test and
//!   an indirect jump through a table ([`switch_chains`]; shorter chains are faster as compares);
//! - checked-mode stubs pass the trap's pc, length and direction packed in one register to one
//!   shared trap routine.
//!
//! Checked mode tests `[addr, addr + len)` inline against one region — the stack when the base
//! register provably holds a pointer derived from r10 ([`stack_pointers`]), else the fast region
//! (the run's memory block) — then, out of line, the other region, then the window `ctx.check`
//! last accepted (`reserved[0..3]`, filled by `crate::program`'s checker: map values granted by
//! helpers), then `ctx.check`. r10-based accesses need no test (the loader proved them inside
//! the frame).
//!
//! Jumps the loader did not check — in unreachable code, it only walks reachable instructions —
//! may point anywhere, and dead code may call the main function; these compile to `ud2`.

#![allow(
    clippy::useless_conversion,
    reason = "dynasm! expands every dynamic register operand to `expr.into()`"
)]

use super::regs::{native, x};
use crate::abi::{JitContext, MAX_TAIL_CALLS, NATIVE_NOT_RUN, TailCallTable, trap};
use crate::{Arch, CompiledCode, InlineMap, JitError, JitOptions, NativeOptions};
use bpftime_vm::helper::{CallEnv, CallStatus, HelperRegistry};
use bpftime_vm::isa::{AluOp, AtomicOp, Endian, JmpCond, LdImmKind, Op, Size, Src, Width};
use bpftime_vm::memory::{FRAME_SIZE, MAX_FRAMES};
use bpftime_vm::verifier::Program;
use dynasmrt::x64::X64Relocation;
use dynasmrt::{DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler, dynasm};
use std::mem::offset_of;

/// Offset of the tail-call entry in the code (see the module docs).
pub const TAIL_ENTRY: usize = 0;

macro_rules! asm {
    ($ops:expr; $($t:tt)*) => {
        dynasm!($ops ; .arch x64 ; $($t)*)
    };
}

/// `$pre [base + disp] $post`, with an 8-bit displacement when it fits (dynasm emits a SIB
/// byte and a displacement for every dynamic base register; this keeps them short).
macro_rules! at {
    ($ops:expr, $b:expr, $disp:expr; [$($pre:tt)*] [$($post:tt)*]) => {
        if let Ok(d8) = i8::try_from($disp) {
            asm!($ops; $($pre)* [BYTE Rq($b) + d8] $($post)*)
        } else {
            asm!($ops; $($pre)* [Rq($b) + $disp] $($post)*)
        }
    };
}

// JitContext field offsets (asserted in `abi`).
const FRAME_TOP: i32 = offset_of!(JitContext, frame_top) as i32;
const ENV: i32 = offset_of!(JitContext, env) as i32;
const CHECK: i32 = offset_of!(JitContext, check) as i32;
const MEM: i32 = offset_of!(JitContext, mem) as i32;
const HELPERS: i32 = offset_of!(JitContext, helpers) as i32;
const HELPERS_LEN: i32 = offset_of!(JitContext, helpers_len) as i32;
const TRAP_KIND: i32 = offset_of!(JitContext, trap_kind) as i32;
const TRAP_PC: i32 = offset_of!(JitContext, trap_pc) as i32;
const TRAP_ADDR: i32 = offset_of!(JitContext, trap_addr) as i32;
const TRAP_LEN: i32 = offset_of!(JitContext, trap_len) as i32;
const TRAP_WRITE: i32 = offset_of!(JitContext, trap_write) as i32;
const TAIL_CALLS: i32 = offset_of!(JitContext, tail_calls) as i32;
const SAVED_SP: i32 = offset_of!(JitContext, saved_sp) as i32;
const STACK_LO: i32 = offset_of!(JitContext, stack_lo) as i32;
const FAST_START: i32 = offset_of!(JitContext, fast_start) as i32;
const FAST_LEN: i32 = offset_of!(JitContext, fast_len) as i32;
const FAST_WLEN: i32 = offset_of!(JitContext, fast_wlen) as i32;
const TAIL_TABLES: i32 = offset_of!(JitContext, tail_tables) as i32;
// This backend's use of `JitContext::reserved` (set up by `crate::program`): a window that
// `ctx.check` accepted earlier in the run, tested inline before calling it again.
const CACHE_START: i32 = offset_of!(JitContext, reserved) as i32;
const CACHE_LEN: i32 = CACHE_START + 8;
const CACHE_WLEN: i32 = CACHE_START + 16;
const TAIL_TABLES_LEN: i32 = offset_of!(JitContext, tail_tables_len) as i32;
const FUNCS: i32 = offset_of!(JitContext, funcs) as i32;
const CUR_FP: i32 = offset_of!(JitContext, cur_fp) as i32;
const CPU: i32 = offset_of!(JitContext, cpu) as i32;
const STACK_LEN: i32 = offset_of!(JitContext, stack_len) as i32;
const CB_TARGET: i32 = crate::abi::CB_TARGET as i32;
const CB_FP: i32 = crate::abi::CB_FP as i32;
// CallEnv (asserted in bpftime_vm::helper for status and exit_value).
const ENV_STATUS: i32 = offset_of!(CallEnv, status) as i32;
const ENV_FAULT_CODE: i32 = offset_of!(CallEnv, fault_code) as i32;
const ENV_EXIT_VALUE: i32 = offset_of!(CallEnv, exit_value) as i32;
const ENV_TAIL_ENTRY: i32 = bpftime_vm::helper::ENV_TAIL_ENTRY as i32;
const ENV_CALLBACK_DEPTH: i32 = bpftime_vm::helper::ENV_CALLBACK_DEPTH as i32;
// TailCallTable.
const TT_MAP: i32 = offset_of!(TailCallTable, map) as i32;
const TT_LEN: i32 = offset_of!(TailCallTable, len) as i32;
const TT_SLOTS: i32 = offset_of!(TailCallTable, slots) as i32;
const TT_SIZE: i32 = std::mem::size_of::<TailCallTable>() as i32;

/// `E2BIG`, an array update's error for a key out of range.
const E2BIG: i64 = 7;
/// Bytes of eBPF stack (all frames).
const STACK_BYTES: i32 = (FRAME_SIZE * MAX_FRAMES) as i32;
/// `bpf_tail_call`.
const TAIL_CALL_ID: u32 = 12;

/// What the shared out-of-bounds trap gets in r10 (`len | write << 8 | pc << 9`; slots fit
/// 23 bits: the loader takes at most 1,000,000).
fn trap_info(pc: u32, len: u8, write: bool) -> i32 {
    const _: () = assert!(bpftime_vm::verifier::MAX_INSNS < 1 << 23);
    (i32::from(len) | (i32::from(write) << 8)) | ((pc as i32) << 9)
}

/// Out-of-line code for one instruction, emitted after all functions.
enum Stub {
    /// Checked access that missed the inline test: the other region's test, then
    /// `ctx.check`, else the trap. The address is in r11.
    Mem {
        entry: DynamicLabel,
        back: DynamicLabel,
        pc: u32,
        len: u8,
        write: bool,
        /// The inline test was the stack's; the stub tests the fast region.
        stack_first: bool,
    },
    /// Misaligned atomic; the address is in r11.
    Misaligned {
        entry: DynamicLabel,
        pc: u32,
        len: u8,
    },
    /// `callx` (or a call) to an id without helper; the id is in r11.
    UnknownHelper { entry: DynamicLabel, pc: u32 },
    /// `env.status != 0` after a helper; r10 holds the env pointer.
    Status {
        entry: DynamicLabel,
        back: DynamicLabel,
        pc: u32,
    },
}

struct Emitter<'a> {
    ops: VecAssembler<X64Relocation>,
    helpers: &'a HelperRegistry,
    checked: bool,
    /// Labels of the jump targets.
    labels: Vec<DynamicLabel>,
    /// Index in `labels` of each slot's label (`u32::MAX`: not a jump target).
    label_of: Vec<u32>,
    /// Function entry slots (sorted) and the labels of their prologues.
    functions: Vec<usize>,
    func_entry: Vec<DynamicLabel>,
    stubs: Vec<Stub>,
    unwind: DynamicLabel,
    trap_exit: DynamicLabel,
    check_routine: DynamicLabel,
    /// Shared out-of-bounds trap (checked mode), next to `check_routine`.
    oob_routine: DynamicLabel,
    tail_routine: DynamicLabel,
    uses_check: bool,
    uses_tail: bool,
    /// Shifts by register with `shlx`/`shrx`/`sarx` (BMI2) instead of through cl.
    bmi2: bool,
    /// Code offset of each slot emitted so far (`u32::MAX` otherwise).
    offsets: Vec<u32>,
    /// Checked mode: per slot, the registers that point into the stack on every path to it
    /// (bit r), so that their accesses test the stack range inline first.
    stack_ptrs: Vec<u16>,
    /// Checked mode: per slot, r0–r9's known offsets from r10 (`frame_offsets`): accesses
    /// through them that stay inside the frame need no check, like r10's own.
    frame_offs: Vec<[i32; 10]>,
    /// Checked mode: `JitOptions::static_regions`, and per slot the registers known to point
    /// into them (`static_pointers`): accesses that stay inside need no check.
    static_regions: &'a [(u64, u64, bool)],
    static_ptrs: Vec<[StaticPtr; 10]>,
    /// Whether eBPF r3 (rdx) is read anywhere in the program (explicitly or as a call
    /// argument): if not, `div`/`mul` may clobber rdx without saving it.
    r3_read: bool,
    /// Callbacks (`lddw rX, func f` targets): (entry slot, frames), sorted.
    callbacks: Vec<(usize, usize)>,
    /// The function table and the callback entry routine (when there are callbacks).
    func_table: DynamicLabel,
    callback_entry: DynamicLabel,
    /// Code offset of each function's prologue, by index in `functions`.
    func_offsets: Vec<usize>,
    /// `(ja slot, (start, end))`, sorted: the block `[start, end)` copied in place of the `ja`.
    tails: Vec<(usize, (usize, usize))>,
    /// Maps whose lookups and updates may be inlined ([`crate::InlineMap`]).
    inline: &'a [InlineMap],
    /// Lookups and updates left as plain helper calls.
    map_helper_calls: usize,
    /// Per slot: the constant r1 holds there when an `lddw` into r1 earlier in the same basic
    /// block set it (only computed when there are maps to inline).
    r1_const: Vec<Option<u64>>,
    /// The same for r4 (an update's flags).
    r4_const: Vec<Option<u64>>,
    /// The entry (after the tail entry), for the native entry's call.
    entry_label: DynamicLabel,
    /// A native entry was asked for ([`JitOptions::native`]).
    native: Option<&'a NativeOptions>,
    /// The first reason the program cannot have a native entry.
    native_refused: Option<String>,
    /// Inlined per-CPU accesses read `ctx.cpu`: the native entry reads the CPU id and checks
    /// it is below `cpu_limit` (every inlined per-CPU array has a slot for it).
    uses_cpu: bool,
    cpu_limit: u64,
}

/// For each slot, the value of register `r` when an `lddw r, imm64` or a `mov r, imm` earlier
/// in the same straight-line run of instructions (no jump target, call or other write of `r`
/// in between) set it.
fn reg_constants(prog: &Program, label_of: &[u32], r: u8) -> Vec<Option<u64>> {
    let ops = prog.ops();
    let mut out = vec![None; ops.len()];
    let mut cur = None;
    for (pc, op) in ops.iter().enumerate() {
        if label_of.get(pc).is_some_and(|&l| l != u32::MAX) || prog.functions().contains(&pc) {
            cur = None;
        }
        let Some(op) = op else { continue };
        out[pc] = cur;
        cur = match *op {
            Op::LdImm64 {
                dst,
                kind: LdImmKind::Imm64,
                lo,
                hi,
            } if dst == r => Some(u64::from(lo as u32) | (u64::from(hi as u32) << 32)),
            Op::Alu {
                width,
                op: AluOp::Mov,
                dst,
                src: Src::Imm(v),
            } if dst == r => Some(if width == Width::W64 {
                v as i64 as u64
            } else {
                u64::from(v as u32)
            }),
            Op::Alu { dst, .. }
            | Op::Neg { dst, .. }
            | Op::MovSx { dst, .. }
            | Op::Endian { dst, .. }
            | Op::LdImm64 { dst, .. }
            | Op::Load { dst, .. }
                if dst == r =>
            {
                None
            }
            Op::Atomic { src, .. } if src == r => None,
            Op::Atomic {
                op: AtomicOp::CmpXchg,
                ..
            } if r == 0 => None,
            Op::Call { .. }
            | Op::CallLocal { .. }
            | Op::Callx { .. }
            | Op::Ja { .. }
            | Op::Exit => None,
            _ => cur,
        };
    }
    out
}

/// The slots control can reach from `op` at `pc` (of `n`): the jump target and the next slot
/// (past the end, or out of range for a dead jump, they are dropped by the caller's lookup).
fn successors(pc: usize, op: &Op, n: usize) -> impl Iterator<Item = usize> {
    let next = pc + op.slots();
    let target = |off: i64| (pc as i64 + 1 + off) as usize;
    let (a, b) = match *op {
        Op::Exit => (None, None),
        Op::Ja { off } => (Some(target(i64::from(off))), None),
        Op::Jmp { off, .. } => (Some(target(i64::from(off))), Some(next)),
        _ => (Some(next).filter(|&t| t < n), None),
    };
    a.into_iter().chain(b)
}

/// The forward dataflow pass the analyses below share: `state[pc]` holds on entry to `pc`
/// (`top` until reached); every function starts from `entry(f)`; `step` gives what holds
/// after `pc` (`None` stops the pass: the caller has its answer); a slot whose state its
/// `join` with a predecessor's changes is visited again.
fn forward<S: Copy + PartialEq>(
    prog: &Program,
    top: S,
    entry: impl Fn(usize) -> S,
    mut step: impl FnMut(&Op, S) -> Option<S>,
    join: impl Fn(S, S) -> S,
) -> Vec<S> {
    forward_edges(prog, top, entry, |_, op, s| step(op, s), |_, s, _| s, join)
}

/// [`forward`] with the slot's pc passed to `step`, and `edge(op, out, taken)` refining what
/// holds along each edge of a conditional jump (`taken`: to its target).
fn forward_edges<S: Copy + PartialEq>(
    prog: &Program,
    top: S,
    entry: impl Fn(usize) -> S,
    mut step: impl FnMut(usize, &Op, S) -> Option<S>,
    edge: impl Fn(&Op, S, bool) -> S,
    join: impl Fn(S, S) -> S,
) -> Vec<S> {
    let ops = prog.ops();
    let n = ops.len();
    let mut state = vec![top; n];
    let mut work: Vec<usize> = prog.functions().to_vec();
    for &f in prog.functions() {
        state[f] = entry(f);
    }
    while let Some(pc) = work.pop() {
        let Some(op) = ops[pc] else { continue };
        let Some(out) = step(pc, &op, state[pc]) else {
            break;
        };
        let conditional = matches!(op, Op::Jmp { .. });
        for (i, t) in successors(pc, &op, n).enumerate() {
            let Some(&cur) = state.get(t) else { continue };
            // `successors` yields a conditional jump's target first.
            let out = if conditional {
                edge(&op, out, i == 0)
            } else {
                out
            };
            let joined = join(cur, out);
            if joined != cur {
                state[t] = joined;
                work.push(t);
            }
        }
    }
    state
}

/// [`frame_offsets`]: not reached yet / not a known offset.
const OFF_TOP: i32 = i32::MAX;
const OFF_UNKNOWN: i32 = i32::MIN;

/// For each slot, the offset from r10 that each of r0–r9 holds on every path to it, when it is
/// the same known constant (`mov rX, r10` then `add`/`sub` of immediates, copies), else
/// [`OFF_UNKNOWN`] (or [`OFF_TOP`] for unreachable slots). Each function starts with none
/// known (r10 is its own frame's); calls clobber r0–r5; r6–r9 survive bpf-to-bpf calls.
fn frame_offsets(prog: &Program) -> Vec<[i32; 10]> {
    // Offsets stay far inside i32 (a frame is 512 bytes); anything larger is unknown.
    let known = |v: i64| {
        if (-(1 << 20)..=(1 << 20)).contains(&v) {
            v as i32
        } else {
            OFF_UNKNOWN
        }
    };
    let step = |op: &Op, mut m: [i32; 10]| {
        match *op {
            Op::Alu {
                width: Width::W64,
                op: AluOp::Mov,
                dst,
                src: Src::Reg(s),
            } => {
                let v = if s == bpftime_vm::isa::FRAME_REG {
                    0
                } else {
                    m.get(usize::from(s)).copied().unwrap_or(OFF_UNKNOWN)
                };
                set_reg(&mut m, dst, v);
            }
            Op::Alu {
                width: Width::W64,
                op: op @ (AluOp::Add | AluOp::Sub),
                dst,
                src: Src::Imm(i),
            } => {
                let cur = m.get(usize::from(dst)).copied().unwrap_or(OFF_UNKNOWN);
                let v = if cur == OFF_UNKNOWN || cur == OFF_TOP {
                    OFF_UNKNOWN
                } else if op == AluOp::Add {
                    known(i64::from(cur) + i64::from(i))
                } else {
                    known(i64::from(cur) - i64::from(i))
                };
                set_reg(&mut m, dst, v);
            }
            _ => op.written_regs(|r| set_reg(&mut m, r, OFF_UNKNOWN)),
        }
        Some(m)
    };
    let join = |cur, out| join_regs(cur, out, OFF_TOP, OFF_UNKNOWN);
    forward(prog, [OFF_TOP; 10], |_| [OFF_UNKNOWN; 10], step, join)
}

/// Sets register `r`'s state in `m` (registers past r9 have none: r10 is fixed).
fn set_reg<T>(m: &mut [T; 10], r: u8, v: T) {
    if let Some(x) = m.get_mut(usize::from(r)) {
        *x = v;
    }
}

/// The join of two per-register states: a register keeps a value both agree on (or the
/// other's when one side is `top`, not reached yet), else `unknown`.
fn join_regs<T: Copy + PartialEq>(mut cur: [T; 10], out: [T; 10], top: T, unknown: T) -> [T; 10] {
    for (j, &v) in cur.iter_mut().zip(out.iter()) {
        *j = if *j == top || *j == v { v } else { unknown };
    }
    cur
}

/// [`static_pointers`]: what a register holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StaticPtr {
    /// Not reached yet.
    Top,
    /// Nothing known.
    Unknown,
    /// `regions[region].start + off` on every path.
    At { region: u16, off: i32 },
    /// What an inlined lookup in `inline[map]` returned, plus `off`: an element's address
    /// (`value_size` bytes inside the map's data area) or, while `nullable`, possibly 0.
    Value { map: u16, off: i32, nullable: bool },
}

/// For each slot, which of r0–r9 hold an address inside one of `regions` (memory valid for
/// every run: global data) at a known offset on every path to it: an `lddw` of an address
/// inside a region, then copies and `add`/`sub` of immediates. Also the value pointers
/// `bpf_map_lookup_elem` returns for a map of `inline` (`r1_const`: r1's constant at each
/// slot): nullable until a 64-bit `jeq`/`jne` against 0 tells otherwise on an edge (only the
/// tested register: a copy stays nullable), then moved by immediates (arithmetic on a
/// nullable one forgets it, as the kernel's verifier refuses it). Each function starts with
/// none known; calls clobber r0–r5; r6–r9 survive bpf-to-bpf calls.
fn static_pointers(
    prog: &Program,
    regions: &[(u64, u64, bool)],
    inline: &[InlineMap],
    r1_const: &[Option<u64>],
) -> Vec<[StaticPtr; 10]> {
    use StaticPtr::{At, Top, Unknown, Value};
    if regions.is_empty() && inline.is_empty() {
        return Vec::new();
    }
    // Offsets stay far inside i32; anything larger is unknown.
    let moved = |off: i32, d: i64| {
        let v = i64::from(off) + d;
        (-(1 << 30)..(1 << 30)).contains(&v).then_some(v as i32)
    };
    let step = |pc: usize, op: &Op, mut m: [StaticPtr; 10]| {
        match *op {
            Op::LdImm64 {
                dst,
                kind: LdImmKind::Imm64,
                lo,
                hi,
            } => {
                let v = u64::from(lo as u32) | (u64::from(hi as u32) << 32);
                let at = regions
                    .iter()
                    .enumerate()
                    .find_map(|(i, &(start, len, _))| {
                        let off = v.checked_sub(start).filter(|&o| o < len)?;
                        Some(At {
                            region: u16::try_from(i).ok()?,
                            off: i32::try_from(off).ok()?,
                        })
                    });
                set_reg(&mut m, dst, at.unwrap_or(Unknown));
            }
            Op::Alu {
                width: Width::W64,
                op: AluOp::Mov,
                dst,
                src: Src::Reg(s),
            } => {
                let v = m.get(usize::from(s)).copied().unwrap_or(Unknown);
                set_reg(&mut m, dst, v);
            }
            Op::Alu {
                width: Width::W64,
                op: op @ (AluOp::Add | AluOp::Sub),
                dst,
                src: Src::Imm(i),
            } => {
                let d = if op == AluOp::Add {
                    i64::from(i)
                } else {
                    -i64::from(i)
                };
                let v = match m.get(usize::from(dst)).copied() {
                    Some(At { region, off }) => {
                        moved(off, d).map_or(Unknown, |off| At { region, off })
                    }
                    Some(Value {
                        map,
                        off,
                        nullable: false,
                    }) => moved(off, d).map_or(Unknown, |off| Value {
                        map,
                        off,
                        nullable: false,
                    }),
                    _ => Unknown,
                };
                set_reg(&mut m, dst, v);
            }
            Op::Call { id: 1 } => {
                let map = r1_const
                    .get(pc)
                    .copied()
                    .flatten()
                    .and_then(|h| inline.iter().position(|x| x.handle == h))
                    .and_then(|i| u16::try_from(i).ok());
                op.written_regs(|r| set_reg(&mut m, r, Unknown));
                if let Some(map) = map {
                    set_reg(
                        &mut m,
                        0,
                        Value {
                            map,
                            off: 0,
                            nullable: true,
                        },
                    );
                }
            }
            _ => op.written_regs(|r| set_reg(&mut m, r, Unknown)),
        }
        Some(m)
    };
    // `jeq r, 0` falls through, and `jne r, 0` jumps, only when r is not null.
    let edge = |op: &Op, mut m: [StaticPtr; 10], taken: bool| {
        if let Op::Jmp {
            width: Width::W64,
            cond: cond @ (JmpCond::Eq | JmpCond::Ne),
            dst,
            src: Src::Imm(0),
            ..
        } = *op
            && taken == (cond == JmpCond::Ne)
            && let Some(Value { map, off, .. }) = m.get(usize::from(dst)).copied()
        {
            m[usize::from(dst)] = Value {
                map,
                off,
                nullable: false,
            };
        }
        m
    };
    let join = |cur, out| join_regs(cur, out, Top, Unknown);
    forward_edges(prog, [Top; 10], |_| [Unknown; 10], step, edge, join)
}

/// Which of the first 64 bytes of the context (r1 at the main function's entry) the program
/// may read: bit i for byte i; every bit when it may read past them or the analysis loses
/// track (a context pointer stored to memory, passed to a call, or moved by a non-constant
/// amount and then dereferenced). A forward analysis of each register's offset from the
/// context, as [`frame_offsets`] does for r10.
pub(crate) fn ctx_reads(prog: &Program) -> u64 {
    const TOP: i32 = i32::MAX; // not reached
    const NONE: i32 = i32::MIN; // not a context pointer
    const ANY: i32 = i32::MIN + 1; // a context pointer at an unknown offset
    let mut mask = 0u64;
    let is_ctx = |v: i32| v != NONE && v != TOP;
    let read = |mask: &mut u64, base: i32, off: i16, len: usize| {
        let start = i64::from(base) + i64::from(off);
        if base == ANY || start < 0 || start + len as i64 > 64 {
            *mask = u64::MAX;
        } else {
            for b in start..start + len as i64 {
                *mask |= 1 << b;
            }
        }
    };
    let step = |op: &Op, mut m: [i32; 10]| {
        let get = |m: &[i32; 10], r: u8| m.get(usize::from(r)).copied().unwrap_or(NONE);
        match *op {
            Op::Alu {
                width,
                op: AluOp::Mov,
                dst,
                src,
            } => {
                let v = match src {
                    Src::Imm(_) => NONE,
                    Src::Reg(s) if width == Width::W64 => get(&m, s),
                    Src::Reg(s) if is_ctx(get(&m, s)) => ANY,
                    Src::Reg(_) => NONE,
                };
                set_reg(&mut m, dst, v);
            }
            Op::Alu {
                width: Width::W64,
                op: op @ (AluOp::Add | AluOp::Sub),
                dst,
                src: Src::Imm(i),
            } => {
                let cur = get(&m, dst);
                let v = if cur == NONE || cur == ANY {
                    cur
                } else {
                    let d = if op == AluOp::Add {
                        i64::from(cur) + i64::from(i)
                    } else {
                        i64::from(cur) - i64::from(i)
                    };
                    if (-(1 << 20)..=(1 << 20)).contains(&d) {
                        d as i32
                    } else {
                        ANY
                    }
                };
                set_reg(&mut m, dst, v);
            }
            Op::Alu { dst, src, .. } => {
                let derived =
                    is_ctx(get(&m, dst)) || matches!(src, Src::Reg(s) if is_ctx(get(&m, s)));
                set_reg(&mut m, dst, if derived { ANY } else { NONE });
            }
            Op::Neg { dst, .. } | Op::MovSx { dst, .. } | Op::Endian { dst, .. } => {
                let v = if is_ctx(get(&m, dst)) { ANY } else { NONE };
                set_reg(&mut m, dst, v);
            }
            Op::LdImm64 { dst, .. } => set_reg(&mut m, dst, NONE),
            Op::Load {
                size,
                dst,
                src,
                off,
                ..
            } => {
                let b = get(&m, src);
                if is_ctx(b) {
                    read(&mut mask, b, off, size.bytes());
                }
                set_reg(&mut m, dst, NONE);
            }
            Op::Store {
                src: Src::Reg(s), ..
            } if is_ctx(get(&m, s)) => mask = u64::MAX,
            Op::Store { .. } => {}
            Op::Atomic {
                size,
                op,
                fetch,
                dst,
                src,
                off,
            } => {
                if is_ctx(get(&m, src)) {
                    mask = u64::MAX;
                }
                let b = get(&m, dst);
                if is_ctx(b) {
                    read(&mut mask, b, off, size.bytes());
                }
                if op == AtomicOp::CmpXchg {
                    set_reg(&mut m, 0, NONE);
                }
                if fetch || op == AtomicOp::Xchg || op == AtomicOp::CmpXchg {
                    set_reg(&mut m, src, NONE);
                }
            }
            Op::Call { .. } | Op::CallLocal { .. } | Op::Callx { .. } => {
                if (1..=5).any(|r| is_ctx(get(&m, r))) {
                    mask = u64::MAX;
                }
                for r in 0..=5 {
                    set_reg(&mut m, r, NONE);
                }
            }
            _ => {}
        }
        // Every byte may be read already: nothing left to learn.
        (mask != u64::MAX).then_some(m)
    };
    let join = |mut cur: [i32; 10], out: [i32; 10]| {
        for (j, &v) in cur.iter_mut().zip(out.iter()) {
            *j = if *j == TOP || *j == v {
                v
            } else if v == TOP {
                *j
            } else if *j == NONE && v == NONE {
                NONE
            } else {
                ANY
            };
        }
        cur
    };
    // The main function starts with r1 = the context; the others with no context pointer.
    let main = prog.functions().first().copied();
    let entry = |f: usize| {
        let mut s = [NONE; 10];
        if Some(f) == main {
            s[1] = 0;
        }
        s
    };
    forward(prog, [TOP; 10], entry, step, join);
    mask
}

/// For each slot, the registers (bit r) that hold a pointer derived from r10 on every path to
/// it: r10 itself, copies of such pointers and their sums with anything. Only a hint for the
/// order of checked-mode tests (both tests are always made), so precision is not critical.
fn stack_pointers(prog: &Program) -> Vec<u16> {
    const R10: u16 = 1 << 10;
    let bit = |r: u8| 1u16 << r;
    let step = |op: &Op, m: u16| {
        let out = match *op {
            Op::Alu {
                width: Width::W64,
                op: AluOp::Mov,
                dst,
                src: Src::Reg(s),
            } => (m & !bit(dst)) | if m & bit(s) != 0 { bit(dst) } else { 0 },
            Op::Alu {
                width: Width::W64,
                op: AluOp::Add,
                dst,
                src: Src::Reg(s),
            } => m | if m & bit(s) != 0 { bit(dst) } else { 0 },
            Op::Alu {
                width: Width::W64,
                op: AluOp::Add | AluOp::Sub,
                ..
            } => m,
            _ => {
                let mut m = m;
                op.written_regs(|r| m &= !bit(r));
                m
            }
        } | R10;
        Some(out)
    };
    // "Not reached" is every bit (the identity of the join, `&`).
    forward(prog, u16::MAX, |_| R10, step, |cur, out| cur & out)
}

/// Largest block (instructions, the final jump included) copied in place of a `ja`.
const TAIL_COPY_MAX: usize = 4;

/// For each forward `ja`, the block it jumps to when that block is short — at most
/// [`TAIL_COPY_MAX`] instructions without jumps or calls, ending in a conditional jump or
/// `exit` — as `[start, end)` (`end` = the slot after it, where a conditional jump falls
/// through). Copying it saves a taken jump on that path: typically the `break` of each `case`
/// of a `switch` into the loop's increment and test.
fn tail_copies(prog: &Program) -> Vec<(usize, (usize, usize))> {
    let ops = prog.ops();
    let n = ops.len();
    let block = |t: usize| -> Option<(usize, usize)> {
        let mut q = t;
        for _ in 0..TAIL_COPY_MAX {
            let op = ops.get(q).copied().flatten()?;
            let next = q + op.slots();
            match op {
                Op::Exit => return Some((t, next)),
                Op::Jmp { off, .. } => {
                    let target = usize::try_from(q as i64 + 1 + i64::from(off)).ok()?;
                    ops.get(target).copied().flatten()?;
                    ops.get(next).copied().flatten()?;
                    return Some((t, next));
                }
                Op::Ja { .. } | Op::Call { .. } | Op::CallLocal { .. } | Op::Callx { .. } => {
                    return None;
                }
                _ => q = next,
            }
        }
        None
    };
    let mut out = Vec::new();
    for (pc, op) in ops.iter().enumerate() {
        if let Some(Op::Ja { off }) = op
            && *off > 0
            && let Some(t) = usize::try_from(pc as i64 + 1 + i64::from(*off))
                .ok()
                .filter(|&t| t < n)
            && let Some(b) = block(t)
        {
            out.push((pc, b));
        }
    }
    out
}

/// A run of `jeq dst, imm, target` on one register compiled as a jump table.
#[derive(Debug, Clone)]
struct Switch {
    /// The register (eBPF) and the comparison width.
    dst: u8,
    w64: bool,
    /// The smallest case value (as compared: sign-extended for 64 bits).
    min: i64,
    /// Slot each value `min + i` jumps to (the fall-through slot for holes).
    cases: Vec<usize>,
    /// The slot after the chain, where unmatched values go.
    default: usize,
}

/// Shortest chain worth a table, and the largest table and emptiest one accepted. Measured
/// on a loop over pseudo-random cases (`benches/jit.rs`'s `switch`, and chains of 6–40 cases):
/// below ~12 cases a compare chain (with the `break` blocks copied, [`tail_copies`]) is as fast
/// or faster — the indirect jump predicts worse than the short chain — beyond it the table
/// wins by up to 2.3× (40 cases).
const SWITCH_MIN_CASES: usize = 12;
const SWITCH_MAX_ENTRIES: i64 = 1024;
const SWITCH_MAX_HOLES_PER_CASE: i64 = 3;

/// Dense `jeq` chains, by their first slot: consecutive `jeq dst, imm, +off` on the same
/// register and width (nothing jumping into the middle of the chain), at least
/// [`SWITCH_MIN_CASES`] distinct values spanning at most [`SWITCH_MAX_HOLES_PER_CASE`] + 1
/// entries per case. Compilers emit these for `switch` when the kernel's verifier-friendly
/// lowering avoids jump tables (eBPF has no indirect jumps); natively they are one bounds test
/// and one indirect jump instead of up to one compare per case.
fn switch_chains(prog: &Program, label_of: &[u32]) -> Vec<(usize, Switch)> {
    let ops = prog.ops();
    let n = ops.len();
    let mut out = Vec::new();
    let case = |pc: usize| -> Option<(u8, bool, i64, usize)> {
        match ops.get(pc).copied().flatten()? {
            Op::Jmp {
                width,
                cond: JmpCond::Eq,
                dst,
                src: Src::Imm(v),
                off,
            } => {
                let t = usize::try_from(pc as i64 + 1 + i64::from(off)).ok()?;
                ops.get(t).copied().flatten()?;
                let w64 = width == Width::W64;
                let v = if w64 {
                    i64::from(v)
                } else {
                    i64::from(v as u32)
                };
                Some((dst, w64, v, t))
            }
            _ => None,
        }
    };
    let mut pc = 0;
    while pc < n {
        let Some((dst, w64, _, _)) = case(pc) else {
            pc += 1;
            continue;
        };
        // Long enough to matter? (Counted before anything is allocated.)
        let run = (pc..n)
            .take_while(|&q| {
                case(q).is_some_and(|(d, w, _, _)| d == dst && w == w64)
                    && (q == pc || label_of[q] == u32::MAX)
            })
            .count();
        if run < SWITCH_MIN_CASES {
            pc += run.max(1);
            continue;
        }
        // The chain: same register and width, no label after its first slot.
        let mut entries: Vec<(i64, usize)> = Vec::new();
        let mut end = pc;
        while let Some((d, w, v, t)) = case(end) {
            if d != dst || w != w64 || (end > pc && label_of[end] != u32::MAX) {
                break;
            }
            if !entries.iter().any(|e| e.0 == v) {
                entries.push((v, t));
            }
            end += 1;
        }
        let (Some(min), Some(max)) = (
            entries.iter().map(|e| e.0).min(),
            entries.iter().map(|e| e.0).max(),
        ) else {
            pc += 1;
            continue;
        };
        let span = max - min + 1;
        let default = end;
        let fits = entries.len() >= SWITCH_MIN_CASES
            && span <= SWITCH_MAX_ENTRIES
            && span <= entries.len() as i64 * (SWITCH_MAX_HOLES_PER_CASE + 1)
            && default < n
            && ops[default].is_some()
            && i32::try_from(min).is_ok();
        if fits {
            let mut cases = vec![default; span as usize];
            for &(v, t) in &entries {
                cases[(v - min) as usize] = t;
            }
            out.push((
                pc,
                Switch {
                    dst,
                    w64,
                    min,
                    cases,
                    default,
                },
            ));
        }
        pc = end.max(pc + 1);
    }
    out
}

/// Whether any instruction of `prog` reads eBPF register `r`, explicitly or implicitly (helper
/// and local calls read r1–r5, `exit` reads r0).
fn reads_register(prog: &Program, r: u8) -> bool {
    prog.ops().iter().flatten().any(|op| match *op {
        Op::Alu { dst, src, op, .. } => (op != AluOp::Mov && dst == r) || src == Src::Reg(r),
        Op::Neg { dst, .. } | Op::Endian { dst, .. } => dst == r,
        Op::MovSx { src, .. } => src == r,
        Op::LdImm64 { .. } => false,
        Op::Load { src, .. } => src == r,
        Op::Store { dst, src, .. } => dst == r || src == Src::Reg(r),
        Op::Atomic { dst, src, op, .. } => {
            dst == r || src == r || (op == AtomicOp::CmpXchg && r == 0)
        }
        Op::Ja { .. } => false,
        Op::Jmp { dst, src, .. } => dst == r || src == Src::Reg(r),
        Op::Call { .. } | Op::CallLocal { .. } => (1..=5).contains(&r),
        Op::Callx { reg } => reg == r || (1..=5).contains(&r),
        Op::Exit => r == 0,
    })
}

/// Whether the generated code may use BMI2: only when compiling on an x86_64 host that has it
/// (the code runs where it is compiled); elsewhere the output is plain x86_64.
fn host_has_bmi2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("bmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How to divide by a constant `d` (≥ 3, not a power of two) without `div`
/// (Granlund–Montgomery; Hacker's Delight §10-8; libdivide's `u64_gen`). With
/// `t = (n * magic) >> 64`, for every 64-bit `n`:
/// `n / d == t >> shift` when `!add`, else `n / d == (t + ((n - t) >> 1)) >> shift`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Magic {
    pub magic: u64,
    pub shift: u32,
    pub add: bool,
}

pub(crate) fn magic_u64(d: u64) -> Magic {
    let k = 63 - d.leading_zeros(); // floor(log2 d)
    let p = 1u128 << (64 + k);
    let (m, rem) = (p / u128::from(d), p % u128::from(d));
    if u128::from(d) - rem < 1u128 << k {
        // m + 1 < 2^64 and the error is small enough: a plain multiply-high and shift.
        Magic {
            magic: (m + 1) as u64,
            shift: k,
            add: false,
        }
    } else {
        // The "round-up" variant: magic = floor(2^64 (2^l - d) / d) + 1, l = ceil(log2 d).
        let l = k + 1;
        let magic = (((1u128 << 64) * ((1u128 << l) - u128::from(d))) / u128::from(d) + 1) as u64;
        Magic {
            magic,
            shift: l - 1,
            add: true,
        }
    }
}

/// Compiles `prog` (see [`super`]).
pub fn compile(
    prog: &Program,
    helpers: &HelperRegistry,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    let n = prog.len();
    // One pass over the program: jump targets (they get labels) and loops (targets of backward
    // jumps, with the last slot jumping back).
    const NONE: u32 = u32::MAX;
    let mut label_of = vec![NONE; n];
    let mut loop_end = vec![NONE; n];
    let mut targets = 0usize;
    for (pc, op) in prog.ops().iter().enumerate() {
        let off = match op {
            Some(Op::Ja { off }) => i64::from(*off),
            Some(Op::Jmp { off, .. }) => i64::from(*off),
            _ => continue,
        };
        let Some(t) = usize::try_from(pc as i64 + 1 + off).ok().filter(|&t| t < n) else {
            continue; // dead code (see `insn`)
        };
        if label_of[t] == NONE {
            label_of[t] = targets as u32;
            targets += 1;
        }
        if t <= pc {
            loop_end[t] = if loop_end[t] == NONE {
                pc as u32
            } else {
                loop_end[t].max(pc as u32)
            };
        }
    }
    // Forward `ja`s to a short block ending in a conditional jump or `exit` get a copy of the
    // block instead; the copy's fall-through needs a label.
    let tails = tail_copies(prog);
    for &(_, (_, end)) in &tails {
        if end < n && label_of[end] == NONE {
            label_of[end] = targets as u32;
            targets += 1;
        }
    }
    // Dense `jeq` chains become jump tables; their fall-through slot needs a label.
    let switches = switch_chains(prog, &label_of);
    for (_, sw) in &switches {
        if label_of[sw.default] == NONE {
            label_of[sw.default] = targets as u32;
            targets += 1;
        }
    }
    // ~6 bytes of code per instruction on average (more in checked mode); grows as needed.
    let mut ops = VecAssembler::<X64Relocation>::new_with_capacity(
        0,
        n * 8 + 256,
        0,
        0,
        targets + prog.functions().len() + 16,
        0,
        targets + 16,
    );
    let labels: Vec<DynamicLabel> = (0..targets).map(|_| ops.new_dynamic_label()).collect();
    let func_entry: Vec<DynamicLabel> = prog
        .functions()
        .iter()
        .map(|_| ops.new_dynamic_label())
        .collect();
    let (func_table, callback_entry) = (ops.new_dynamic_label(), ops.new_dynamic_label());
    let entry_label = ops.new_dynamic_label();
    let mut e = Emitter {
        unwind: ops.new_dynamic_label(),
        trap_exit: ops.new_dynamic_label(),
        check_routine: ops.new_dynamic_label(),
        oob_routine: ops.new_dynamic_label(),
        tail_routine: ops.new_dynamic_label(),
        ops,
        helpers,
        checked: opts.checked,
        labels,
        label_of,
        functions: prog.functions().to_vec(),
        func_entry,
        stubs: Vec::new(),
        uses_check: false,
        uses_tail: false,
        bmi2: host_has_bmi2(),
        r3_read: reads_register(prog, 3),
        offsets: vec![u32::MAX; n],
        callbacks: prog
            .callbacks()
            .map(|pc| (pc, prog.callback_frames(pc).unwrap_or(usize::MAX)))
            .collect(),
        func_table,
        callback_entry,
        func_offsets: vec![0; prog.functions().len()],
        tails,
        stack_ptrs: if opts.checked {
            stack_pointers(prog)
        } else {
            Vec::new()
        },
        frame_offs: if opts.checked {
            frame_offsets(prog)
        } else {
            Vec::new()
        },
        static_regions: &opts.static_regions,
        // After r1's constants (below): lookups in inlined maps return value pointers.
        static_ptrs: Vec::new(),
        inline: &opts.inline_maps,
        map_helper_calls: 0,
        r1_const: Vec::new(),
        r4_const: Vec::new(),
        entry_label,
        native: opts.native.as_ref(),
        native_refused: None,
        uses_cpu: false,
        cpu_limit: u64::MAX,
    };
    if !opts.inline_maps.is_empty() {
        e.r1_const = reg_constants(prog, &e.label_of, 1);
        e.r4_const = reg_constants(prog, &e.label_of, 4);
    }
    if opts.checked {
        e.static_ptrs = static_pointers(prog, &opts.static_regions, &opts.inline_maps, &e.r1_const);
    }
    if !e.callbacks.is_empty() {
        e.refuse_native("callbacks");
    }
    // Loops: prefix sums of estimated code sizes give a loop's size in O(1). A short loop is
    // placed so that it does not cross a 64-byte boundary (one fetch/op-cache window), others
    // start 16-byte aligned (measured: up to 40% on short loops).
    let size_before: Vec<u32> = if loop_end.iter().any(|&e| e != NONE) {
        let mut v = Vec::with_capacity(n + 1);
        let mut total = 0u32;
        v.push(0);
        for op in prog.ops() {
            total += op.as_ref().map_or(0, |op| e.estimated_size(op)) as u32;
            v.push(total);
        }
        v
    } else {
        Vec::new()
    };
    let entry = e.prologue();
    let main_end = prog.functions().get(1).copied().unwrap_or(n);
    let mut next_function = 1;
    let mut skip_to = 0;
    let mut tables = Vec::new();
    let mut next_switch = 0;
    for (pc, op) in prog.ops().iter().enumerate() {
        let Some(op) = *op else { continue };
        if pc < skip_to {
            // Inside a jump-table chain (no label: nothing jumps here).
            e.offsets[pc] = e.ops.offset().0 as u32;
            continue;
        }
        if e.functions.get(next_function) == Some(&pc) {
            e.func_offsets[next_function] = e.ops.offset().0;
            e.subprogram_prologue(e.func_entry[next_function]);
            next_function += 1;
        }
        if loop_end[pc] != NONE {
            let bytes = (size_before[loop_end[pc] as usize + 1] - size_before[pc]) as usize;
            e.align_with_nops(16);
            let off = e.ops.offset().0;
            if bytes <= 64 && off % 64 + bytes > 64 {
                e.align_with_nops(64);
            }
        }
        if e.label_of[pc] != NONE {
            let l = e.labels[e.label_of[pc] as usize];
            asm!(e.ops; =>l);
        }
        e.offsets[pc] = e.ops.offset().0 as u32;
        if let Some((_, sw)) = switches.get(next_switch).filter(|s| s.0 == pc) {
            next_switch += 1;
            tables.push(e.switch(sw));
            skip_to = sw.default;
            continue;
        }
        e.insn(pc, op, pc < main_end, prog)?;
    }
    e.finish();
    let native_entry = e.native_entry();
    e.emit_func_table();
    // Jump tables: 32-bit offsets from the table to each case's code, filled in below.
    let tables: Vec<(usize, Vec<usize>)> = tables
        .into_iter()
        .map(|(label, cases): (DynamicLabel, Vec<usize>)| {
            while !e.ops.offset().0.is_multiple_of(4) {
                e.ops.push(0xcc);
            }

            let at = e.ops.offset().0;
            asm!(e.ops; =>label);
            e.ops.extend(std::iter::repeat_n(0u8, 4 * cases.len()));
            (at, cases)
        })
        .collect();
    let mut code = std::mem::replace(&mut e.ops, VecAssembler::new(0))
        .finalize()
        .map_err(|err| JitError::Codegen(err.to_string()))?;
    for (at, cases) in tables {
        for (i, &target) in cases.iter().enumerate() {
            let rel = (i64::from(e.offsets[target]) - at as i64) as i32;
            code[at + 4 * i..at + 4 * i + 4].copy_from_slice(&rel.to_le_bytes());
        }
    }
    Ok(CompiledCode {
        arch: Arch::X86_64,
        code,
        entry,
        insn_offsets: e.offsets,
        map_helper_calls: e.map_helper_calls,
        native_entry,
        native_refused: e.native.and(e.native_refused.take()),
        ctx_reads: if native_entry.is_some() {
            ctx_reads(prog)
        } else {
            u64::MAX
        },
    })
}

impl Emitter<'_> {
    /// The native entry ([`crate::abi::NativeEntry`]) when one was asked for and the program
    /// qualifies (see [`NativeOptions`]); its offset. Emitted after the shared routines.
    ///
    /// Native stack below the return address: 8 bytes of padding, the [`JitContext`]
    /// (`NATIVE_CTX` bytes) and under it the eBPF stack (one frame without bpf-to-bpf calls,
    /// all of them with; `ctx.stack_len` bounds the body's stack tests): `frame_top` = the
    /// context's address.
    fn native_entry(&mut self) -> Option<usize> {
        let opts = self.native?;
        if self.uses_cpu && opts.cpu_id_tp_offset.is_none() {
            self.refuse_native("per-CPU arrays without the thread's rseq CPU id");
        }
        if self.native_refused.is_some() {
            return None;
        }
        const NATIVE_CTX: i32 = (std::mem::size_of::<JitContext>() as i32 + 15) & !15;
        // One frame without bpf-to-bpf calls, all of them with: the native stack used stays
        // under a page for most programs (a footprint over 4 KiB made stores alias the map
        // values' addresses modulo 4 KiB, doubling a hit's cost in about half of the runs).
        let frames = if self.functions.len() > 1 {
            STACK_BYTES
        } else {
            FRAME_SIZE as i32
        };
        let area = frames + NATIVE_CTX + 8;
        let c = frames;
        let (not_run, ran) = (self.ops.new_dynamic_label(), self.ops.new_dynamic_label());
        let checker = self.ops.new_dynamic_label();
        let entry = self.entry_label;
        self.align_with_nops(16);
        let at = self.ops.offset().0;
        asm!(self.ops; sub rsp, area);
        match opts.cpu_id_tp_offset.filter(|_| self.uses_cpu) {
            Some(off) => {
                // mov eax, fs:[off] (the rseq cpu_id; negative when not registered).
                self.ops.extend([0x64, 0x8b, 0x04, 0x25]);
                self.ops.extend(off.to_le_bytes());
                let limit = i32::try_from(self.cpu_limit).unwrap_or(i32::MAX);
                asm!(self.ops
                    ; cmp eax, limit
                    ; jae =>not_run
                    ; mov [rsp + c + CPU], rax
                );
            }
            None => asm!(self.ops; mov QWORD [rsp + c + CPU], -1),
        }
        asm!(self.ops
            ; lea rax, [rsp + c]
            ; mov [rsp + c + FRAME_TOP], rax
            ; mov [rsp + c + STACK_LO], rsp
            ; mov QWORD [rsp + c + STACK_LEN], frames
            ; mov [rsp + c + FAST_START], rdi
            ; mov [rsp + c + FAST_LEN], rsi
            ; mov DWORD [rsp + c + TRAP_KIND], trap::NONE as i32
            ; xor eax, eax
        );
        if opts.ctx_writable {
            asm!(self.ops; mov [rsp + c + FAST_WLEN], rsi);
        } else {
            asm!(self.ops; mov [rsp + c + FAST_WLEN], rax);
        }
        // (The helper, tail-call and callback fields stay unset: code with a native entry
        // never reaches the instructions that read them.)
        // The checker's window starts on the first region (global data, typically).
        match opts.regions.first() {
            Some(&(start, len, writable)) => {
                self.mov_imm64(x::RAX, start);
                asm!(self.ops; mov [rsp + c + CACHE_START], rax);
                self.mov_imm64(x::RAX, len);
                asm!(self.ops; mov [rsp + c + CACHE_LEN], rax);
                if !writable {
                    asm!(self.ops; xor eax, eax);
                }
                asm!(self.ops; mov [rsp + c + CACHE_WLEN], rax);
            }
            None => asm!(self.ops
                ; mov [rsp + c + CACHE_START], rax
                ; mov [rsp + c + CACHE_LEN], rax
                ; mov [rsp + c + CACHE_WLEN], rax
            ),
        }
        asm!(self.ops
            ; lea rax, [=>checker]
            ; mov [rsp + c + CHECK], rax
            ; lea rdx, [rsp + c]
            ; call =>entry
            ; xor edx, edx
            ; cmp DWORD [rsp + c + TRAP_KIND], trap::NONE as i32
            ; je =>ran
            ; mov edx, crate::abi::NATIVE_TRAPPED as i32
            ; =>ran
            ; add rsp, area
            ; ret
            ; =>not_run
            ; xor eax, eax
            ; mov edx, NATIVE_NOT_RUN as i32
            ; add rsp, area
            ; ret
        );
        // The checker (`abi::CheckFn`: rsi = address, edx = length, ecx = 1 for a store; al =
        // accessible), over the regions' table: (start, len, writable len) each. Clobbers only
        // what a C function may (the check routine saved the rest).
        let table = self.ops.new_dynamic_label();
        let (next, miss) = (self.ops.new_dynamic_label(), self.ops.new_dynamic_label());
        let n = opts.regions.len() as i32;
        asm!(self.ops
            ; =>checker
            ; lea r8, [=>table]
            ; mov r9d, n
            ; test r9d, r9d
            ; jz =>miss
            ; =>next
            ; mov rax, rsi
            ; sub rax, [r8]
            ; mov r10, [r8 + 8]
            ; test ecx, ecx
            ; cmovnz r10, [r8 + 16]
            ; sub r10, rdx
            ; jb >skip
            ; cmp rax, r10
            ; ja >skip
            ; mov eax, 1
            ; ret
            ; skip:
            ; add r8, 24
            ; dec r9d
            ; jnz =>next
            ; =>miss
            ; xor eax, eax
            ; ret
        );
        self.align_with_nops(8);
        asm!(self.ops; =>table);
        for &(start, len, writable) in &opts.regions {
            self.ops.extend(start.to_le_bytes());
            self.ops.extend(len.to_le_bytes());
            self.ops
                .extend((if writable { len } else { 0 }).to_le_bytes());
        }
        Some(at)
    }

    /// Tail entry, entry and register initialisation; returns the entry's offset.
    fn prologue(&mut self) -> usize {
        let init = self.ops.new_dynamic_label();
        debug_assert_eq!(self.ops.offset().0, TAIL_ENTRY);
        asm!(self.ops
            // Tail entry: r1 (rdi) is the context, the frame is the caller's; r2 = 0.
            ; xor esi, esi
            ; jmp =>init
        );
        let entry = self.ops.offset().0;
        let entry_label = self.entry_label;
        asm!(self.ops
            ; =>entry_label
            ; push rbp
            ; push rbx
            ; push r12
            ; push r13
            ; push r14
            ; push r15
            ; sub rsp, 8
            ; mov r12, rdx
        );
        if !self.callbacks.is_empty() {
            // The unwinder restores ctx.saved_sp from here (callback runs nest). Code without
            // callbacks never runs nested, and its unwinder leaves saved_sp alone.
            asm!(self.ops
                ; mov rax, [r12 + SAVED_SP]
                ; mov [rsp], rax
            );
        }
        asm!(self.ops
            ; mov [r12 + SAVED_SP], rsp
            ; =>init
        );
        if self.callbacks.is_empty() {
            asm!(self.ops; mov QWORD [r12 + FUNCS], 0);
        } else {
            let t = self.func_table;
            asm!(self.ops
                ; lea rax, [=>t]
                ; mov [r12 + FUNCS], rax
            );
        }
        asm!(self.ops
            ; mov rbp, [r12 + FRAME_TOP]
            ; xor eax, eax
            ; xor edx, edx
            ; xor ecx, ecx
            ; xor r8d, r8d
            ; xor ebx, ebx
            ; xor r13d, r13d
            ; xor r14d, r14d
            ; xor r15d, r15d
        );
        entry
    }

    /// A jump-table dispatch for `sw` (see [`switch_chains`]); returns the table's label and
    /// its case slots, for the table emitted after the code.
    fn switch(&mut self, sw: &Switch) -> (DynamicLabel, Vec<usize>) {
        let d = native(sw.dst);
        let table = self.ops.new_dynamic_label();
        let default = self.label(sw.default);
        let last = (sw.cases.len() - 1) as i32;
        // r11 = dst - min, as the comparison's width sees it.
        if sw.w64 {
            asm!(self.ops; mov r11, Rq(d));
            if sw.min != 0 {
                asm!(self.ops; sub r11, sw.min as i32);
            }
            asm!(self.ops; cmp r11, last);
        } else {
            asm!(self.ops; mov r11d, Rd(d));
            if sw.min != 0 {
                asm!(self.ops; sub r11d, sw.min as i32);
            }
            asm!(self.ops; cmp r11d, last);
        }
        asm!(self.ops
            ; ja =>default
            ; lea r10, [=>table]
            ; movsxd r11, DWORD [r10 + r11 * 4]
            ; add r11, r10
            ; jmp r11
        );
        (table, sw.cases.clone())
    }

    /// The callback entry routine ([`crate::abi::CallbackEntry`]): `rdi` = the frame, `rsi` =
    /// the context. Same native frame as the program entry, so the unwinder serves both.
    fn emit_callback_entry(&mut self) {
        let l = self.callback_entry;
        self.align_with_nops(16);
        asm!(self.ops
            ; =>l
            ; push rbp
            ; push rbx
            ; push r12
            ; push r13
            ; push r14
            ; push r15
            ; sub rsp, 8
            ; mov r12, rsi
            ; mov rax, [r12 + SAVED_SP]
            ; mov [rsp], rax
            ; mov [r12 + SAVED_SP], rsp
            ; mov r11, rdi
            // The subprogram's prologue moves r10 down by a frame.
            ; mov rbp, [r11 + CB_FP]
            ; add rbp, FRAME_SIZE as i32
            ; mov rdi, [r11]
            ; mov rsi, [r11 + 8]
            ; mov rdx, [r11 + 16]
            ; mov rcx, [r11 + 24]
            ; mov r8, [r11 + 32]
            ; xor eax, eax
            ; xor ebx, ebx
            ; xor r13d, r13d
            ; xor r14d, r14d
            ; xor r15d, r15d
            ; call QWORD [r11 + CB_TARGET]
            ; mov r11, [rsp]
            ; mov [r12 + SAVED_SP], r11
        );
        self.main_epilogue();
    }

    /// The [`crate::abi::FuncTable`] at the end of the code (when there are callbacks).
    fn emit_func_table(&mut self) {
        if self.callbacks.is_empty() {
            return;
        }
        self.align_with_nops(8);
        let table_off = self.ops.offset().0;
        let t = self.func_table;
        asm!(self.ops; =>t);
        let entry_off = self
            .ops
            .labels()
            .resolve_dynamic(self.callback_entry)
            .map_or(0, |o| o.0);
        let entries: Vec<(usize, usize, usize)> = self
            .callbacks
            .iter()
            .filter_map(|&(pc, frames)| {
                let fi = self.functions.binary_search(&pc).ok()?;
                Some((pc, self.func_offsets[fi], frames))
            })
            .collect();
        self.ops
            .extend(crate::abi::func_table_bytes(table_off, entry_off, &entries));
    }

    /// Rough bytes of code for `op` (only to place loops; errs on the large side).
    fn estimated_size(&self, op: &Op) -> usize {
        let checked_mem = if self.checked { 28 } else { 0 };
        match *op {
            Op::Alu {
                op: AluOp::Div | AluOp::Mod | AluOp::SDiv | AluOp::SMod,
                ..
            } => 48,
            Op::Alu {
                op: AluOp::Lsh | AluOp::Rsh | AluOp::Arsh,
                src: Src::Reg(_),
                ..
            } if !self.bmi2 => 12,
            Op::Alu {
                src: Src::Imm(v), ..
            } if i8::try_from(v).is_err() => 7,
            Op::Alu { .. } | Op::Neg { .. } | Op::MovSx { .. } => 4,
            Op::Endian { .. } => 8,
            Op::LdImm64 { .. } => 10,
            Op::Load { src, .. } => 6 + if src == 10 { 0 } else { checked_mem },
            Op::Store { dst, .. } => 9 + if dst == 10 { 0 } else { checked_mem },
            Op::Atomic { .. } => 24 + checked_mem,
            Op::Ja { .. } => 5,
            Op::Jmp { .. } => 13,
            Op::Call { .. } => 30,
            Op::CallLocal { .. } => 5,
            Op::Callx { .. } => 48,
            Op::Exit => 16,
        }
    }

    /// Pads with the recommended multi-byte NOPs up to a multiple of `align`.
    fn align_with_nops(&mut self, align: usize) {
        const NOPS: [&[u8]; 9] = [
            &[0x90],
            &[0x66, 0x90],
            &[0x0f, 0x1f, 0x00],
            &[0x0f, 0x1f, 0x40, 0x00],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
            &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
            &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        ];
        let mut pad = (align - self.ops.offset().0 % align) % align;
        while pad > 0 {
            let k = pad.min(NOPS.len());
            self.ops.extend(NOPS[k - 1].iter().copied());
            pad -= k;
        }
    }

    fn subprogram_prologue(&mut self, l: DynamicLabel) {
        asm!(self.ops
            ; =>l
            ; push rbx
            ; push r13
            ; push r14
            ; push r15
            ; push rbp
            ; sub rbp, FRAME_SIZE as i32
        );
    }

    fn main_epilogue(&mut self) {
        asm!(self.ops
            ; add rsp, 8
            ; pop r15
            ; pop r14
            ; pop r13
            ; pop r12
            ; pop rbx
            ; pop rbp
            ; ret
        );
    }

    fn insn(&mut self, pc: usize, op: Op, in_main: bool, prog: &Program) -> Result<(), JitError> {
        let rel = |off: i64| (pc as i64 + 1 + off) as usize;
        // The loader checks the jumps of reachable instructions only: a jump elsewhere (out of
        // the program, into an lddw) is dead code. Never executed, it becomes `ud2`.
        let jump = match op {
            Op::Ja { off } => Some(i64::from(off)),
            Op::Jmp { off, .. } => Some(i64::from(off)),
            _ => None,
        };
        if let Some(off) = jump {
            let target = usize::try_from(pc as i64 + 1 + off).ok();
            if !target.is_some_and(|t| prog.ops().get(t).is_some_and(Option::is_some)) {
                asm!(self.ops; ud2);
                return Ok(());
            }
        }
        match op {
            Op::Alu {
                width,
                op,
                dst,
                src,
            } => self.alu(width == Width::W64, op, native(dst), src),
            Op::Neg { width, dst } => {
                let d = native(dst);
                match width {
                    Width::W64 => asm!(self.ops; neg Rq(d)),
                    Width::W32 => asm!(self.ops; neg Rd(d)),
                }
            }
            Op::MovSx {
                width,
                dst,
                src,
                bits,
            } => {
                let (d, s) = (native(dst), native(src));
                match (width, bits) {
                    (Width::W64, 8) => asm!(self.ops; movsx Rq(d), Rb(s)),
                    (Width::W64, 16) => asm!(self.ops; movsx Rq(d), Rw(s)),
                    (Width::W64, _) => asm!(self.ops; movsxd Rq(d), Rd(s)),
                    (Width::W32, 8) => asm!(self.ops; movsx Rd(d), Rb(s)),
                    (Width::W32, _) => asm!(self.ops; movsx Rd(d), Rw(s)),
                }
            }
            Op::Endian { kind, bits, dst } => {
                let d = native(dst);
                match (kind, bits) {
                    (Endian::Le, 16) => asm!(self.ops; movzx Rd(d), Rw(d)),
                    (Endian::Le, 32) => asm!(self.ops; mov Rd(d), Rd(d)),
                    (Endian::Le, _) => {}
                    (_, 16) => asm!(self.ops; ror Rw(d), 8; movzx Rd(d), Rw(d)),
                    (_, 32) => asm!(self.ops; bswap Rd(d)),
                    (_, _) => asm!(self.ops; bswap Rq(d)),
                }
            }
            Op::LdImm64 {
                dst,
                kind: LdImmKind::Func,
                lo,
                ..
            } => {
                let target = (pc as i64 + 1 + i64::from(lo)) as usize;
                self.mov_imm64(native(dst), bpftime_vm::helper::func_token(target));
            }
            Op::LdImm64 { dst, lo, hi, .. } => {
                let v = u64::from(lo as u32) | (u64::from(hi as u32) << 32);
                self.mov_imm64(native(dst), v);
            }
            Op::Load {
                size,
                signed,
                dst,
                src,
                off,
            } => {
                let (b, disp) = self.mem_operand(pc, src, off, size.bytes() as u8, false);
                let d = native(dst);
                match (size, signed) {
                    (Size::B, false) => at!(self.ops, b, disp; [movzx Rd(d), BYTE] []),
                    (Size::H, false) => at!(self.ops, b, disp; [movzx Rd(d), WORD] []),
                    (Size::W, false) => at!(self.ops, b, disp; [mov Rd(d), DWORD] []),
                    (Size::DW, _) => at!(self.ops, b, disp; [mov Rq(d), QWORD] []),
                    (Size::B, true) => at!(self.ops, b, disp; [movsx Rq(d), BYTE] []),
                    (Size::H, true) => at!(self.ops, b, disp; [movsx Rq(d), WORD] []),
                    (Size::W, true) => at!(self.ops, b, disp; [movsxd Rq(d), DWORD] []),
                }
            }
            Op::Store {
                size,
                dst,
                off,
                src,
            } => {
                let (b, disp) = self.mem_operand(pc, dst, off, size.bytes() as u8, true);
                match (size, src) {
                    (Size::B, Src::Imm(v)) => at!(self.ops, b, disp; [mov BYTE] [, v as i8]),
                    (Size::H, Src::Imm(v)) => at!(self.ops, b, disp; [mov WORD] [, v as i16]),
                    (Size::W, Src::Imm(v)) => at!(self.ops, b, disp; [mov DWORD] [, v]),
                    (Size::DW, Src::Imm(v)) => at!(self.ops, b, disp; [mov QWORD] [, v]),
                    (Size::B, Src::Reg(s)) => {
                        at!(self.ops, b, disp; [mov BYTE] [, Rb(native(s))])
                    }
                    (Size::H, Src::Reg(s)) => {
                        at!(self.ops, b, disp; [mov WORD] [, Rw(native(s))])
                    }
                    (Size::W, Src::Reg(s)) => {
                        at!(self.ops, b, disp; [mov DWORD] [, Rd(native(s))])
                    }
                    (Size::DW, Src::Reg(s)) => {
                        at!(self.ops, b, disp; [mov QWORD] [, Rq(native(s))])
                    }
                }
            }
            Op::Atomic {
                size,
                op,
                fetch,
                dst,
                src,
                off,
            } => self.atomic(pc, size == Size::DW, op, fetch, dst, native(src), off),
            Op::Ja { .. } if self.tails.binary_search_by_key(&pc, |t| t.0).is_ok() => {
                let Ok(i) = self.tails.binary_search_by_key(&pc, |t| t.0) else {
                    unreachable!("guarded")
                };
                let (start, end) = self.tails[i].1;
                let mut q = start;
                let mut last = None;
                while q < end {
                    let Some(op) = prog.ops()[q] else { break };
                    self.insn(q, op, in_main, prog)?;
                    last = Some(op);
                    q += op.slots();
                }
                if let Some(Op::Jmp { .. }) = last {
                    let l = self.label(end);
                    asm!(self.ops; jmp =>l);
                }
            }
            Op::Ja { off } => {
                let t = rel(off.into());
                let l = self.label(t);
                if self.short_reach(t, 2) {
                    asm!(self.ops; jmp BYTE =>l);
                } else {
                    asm!(self.ops; jmp =>l);
                }
            }
            Op::Jmp {
                width,
                cond,
                dst,
                src,
                off,
            } => {
                let d = native(dst);
                let w64 = width == Width::W64;
                match (cond, src, w64) {
                    (JmpCond::Set, Src::Reg(s), true) => asm!(self.ops; test Rq(d), Rq(native(s))),
                    (JmpCond::Set, Src::Reg(s), false) => {
                        asm!(self.ops; test Rd(d), Rd(native(s)))
                    }
                    (JmpCond::Set, Src::Imm(v), true) => asm!(self.ops; test Rq(d), DWORD v),
                    (JmpCond::Set, Src::Imm(v), false) => asm!(self.ops; test Rd(d), DWORD v),
                    (_, Src::Reg(s), true) => asm!(self.ops; cmp Rq(d), Rq(native(s))),
                    (_, Src::Reg(s), false) => asm!(self.ops; cmp Rd(d), Rd(native(s))),
                    (_, Src::Imm(0), true) => asm!(self.ops; test Rq(d), Rq(d)),
                    (_, Src::Imm(0), false) => asm!(self.ops; test Rd(d), Rd(d)),
                    (_, Src::Imm(v), w64) if i8::try_from(v).is_ok() => {
                        // `cmp r, imm8` (83 /7 ib): dynasm's table picks imm32 for cmp.
                        let rex = 0x40 | (u8::from(w64) << 3) | (d >> 3);
                        if rex != 0x40 {
                            self.ops.push(rex);
                        }
                        self.ops.extend([0x83, 0xf8 | (d & 7), v as u8]);
                    }
                    (_, Src::Imm(v), true) => asm!(self.ops; cmp Rq(d), DWORD v),
                    (_, Src::Imm(v), false) => asm!(self.ops; cmp Rd(d), DWORD v),
                }
                let t = rel(off.into());
                let short = self.short_reach(t, 2);
                self.jcc(cond, self.label(t), short);
            }
            Op::Call { id } if id == TAIL_CALL_ID => {
                self.refuse_native("tail calls");
                self.uses_tail = true;
                let l = self.tail_routine;
                asm!(self.ops; call =>l);
                if self.helpers.get(id).is_some_and(|h| h.may_stop) {
                    self.status_check(pc);
                }
            }
            Op::Call { id } => match self.helpers.get(id) {
                Some(h) => {
                    // An inlined map lookup / update falls back to the call below.
                    let inlined = self.inline_map_call(pc, id);
                    if inlined.is_none() && (id == 1 || id == 2) {
                        self.map_helper_calls += 1;
                    }
                    match inlined {
                        Some((_, false)) => {}
                        Some((_, true)) => {
                            self.refuse_native(&format!("pc {pc}: map call may need the helper"))
                        }
                        None => self.refuse_native(&format!("pc {pc}: helper {id}")),
                    }
                    let inlined = inlined.map(|(done, _)| done);
                    let addr = h.func as usize as i64;
                    if h.calls_back {
                        asm!(self.ops; mov [r12 + CUR_FP], rbp);
                    }
                    asm!(self.ops
                        ; mov r9, [r12 + ENV]
                        ; mov rax, QWORD addr
                        ; call rax
                    );
                    if h.calls_back {
                        asm!(self.ops; mov QWORD [r12 + CUR_FP], 0);
                    }
                    if h.may_stop {
                        self.status_check(pc);
                    }
                    if let Some(done) = inlined {
                        asm!(self.ops; =>done);
                    }
                }
                None => {
                    // Verified against another registry: trap like the interpreter would.
                    let entry = self.ops.new_dynamic_label();
                    self.stubs.push(Stub::UnknownHelper {
                        entry,
                        pc: pc as u32,
                    });
                    asm!(self.ops
                        ; mov r11d, id as i32
                        ; jmp =>entry
                    );
                }
            },
            Op::CallLocal { off } => {
                // Every call target is a function (the loader checks all calls); a call of the
                // main function would be recursion, which the loader rejects when reachable:
                // such a call is dead code.
                let target = rel(off.into());
                match self.functions.binary_search(&target) {
                    Ok(f) if f > 0 => {
                        let l = self.func_entry[f];
                        asm!(self.ops; call =>l);
                    }
                    _ => asm!(self.ops; ud2),
                }
            }
            Op::Callx { reg } => {
                self.refuse_native("callx");
                let entry = self.ops.new_dynamic_label();
                self.stubs.push(Stub::UnknownHelper {
                    entry,
                    pc: pc as u32,
                });
                asm!(self.ops
                    ; mov r11, Rq(native(reg))
                    ; cmp r11, [r12 + HELPERS_LEN]
                    ; jae =>entry
                    ; mov r10, [r12 + HELPERS]
                    ; mov r10, [r10 + r11 * 8]
                    ; test r10, r10
                    ; jz =>entry
                    ; mov r9, [r12 + ENV]
                    // The target may call back (its registration is not known here).
                    ; mov [r12 + CUR_FP], rbp
                    ; call r10
                    ; mov QWORD [r12 + CUR_FP], 0
                );
                self.status_check(pc);
            }
            Op::Exit => {
                if in_main {
                    self.main_epilogue();
                } else {
                    asm!(self.ops
                        ; pop rbp
                        ; pop r15
                        ; pop r14
                        ; pop r13
                        ; pop rbx
                        ; ret
                    );
                }
            }
        }
        Ok(())
    }

    /// The inlined fast path of `bpf_map_lookup_elem` (`id` 1) or `bpf_map_update_elem` (2)
    /// at `pc` when r1 holds an [`InlineMap`]'s handle there (see [`crate::InlineMap`]): it
    /// jumps to the returned label when it answered, and falls through to the helper call the
    /// caller emits next (with r1–r5 intact) when it cannot. Uses only rax, r10 and r11.
    ///
    /// Also returns whether the helper may be needed in a native run (whose preconditions
    /// give every inlined per-CPU array a slot for the CPU): only an update whose flags are
    /// not a known 0 or 2 may.
    fn inline_map_call(&mut self, pc: usize, id: u32) -> Option<(DynamicLabel, bool)> {
        if id != 1 && id != 2 {
            return None;
        }
        let handle = self.r1_const.get(pc).copied().flatten()?;
        let m = self.inline.iter().find(|m| m.handle == handle)?.clone();
        let update = id == 2;
        if update && (!m.writable || m.value_size == 0 || m.value_size > 64) {
            return None;
        }
        let done = self.ops.new_dynamic_label();
        let slow = self.ops.new_dynamic_label();
        let flags = self.r4_const.get(pc).copied().flatten();
        let may_fall_back = update && !matches!(flags, Some(0 | 2));
        if may_fall_back {
            // Flags other than BPF_ANY (0) and BPF_EXIST (2): the helper's errors.
            asm!(self.ops
                ; test rcx, -3
                ; jnz =>slow
            );
        }
        // The key (r2 points at it).
        let (b, disp) = self.mem_operand(pc, 2, 0, 4, false);
        at!(self.ops, b, disp; [mov eax, DWORD] []);
        let absent = self.ops.new_dynamic_label();
        if m.max_entries <= i32::MAX as u32 {
            asm!(self.ops; cmp eax, m.max_entries as i32);
        } else {
            asm!(self.ops; mov r10d, m.max_entries as i32; cmp eax, r10d);
        }
        asm!(self.ops; jae =>absent);
        // rax = key × stride (+ base below).
        if m.max_entries == 1 {
            asm!(self.ops; xor eax, eax);
        } else if m.stride.is_power_of_two() {
            asm!(self.ops; shl rax, m.stride.trailing_zeros() as i8);
        } else if m.stride <= i32::MAX as u64 {
            asm!(self.ops; imul rax, rax, m.stride as i32);
        } else {
            self.mov_imm64(x::R10, m.stride);
            asm!(self.ops; imul rax, r10);
        }
        match m.layout {
            crate::InlineLayout::Array { base } => {
                self.mov_imm64(x::R10, base);
            }
            crate::InlineLayout::PerCpu { bases, len } => {
                self.uses_cpu = true;
                self.cpu_limit = self.cpu_limit.min(m.cpu_slots);
                self.mov_imm64(x::R11, len);
                asm!(self.ops
                    ; mov r10, [r12 + CPU]
                    ; cmp r10, r11
                    ; jae =>slow
                );
                self.mov_imm64(x::R11, bases);
                asm!(self.ops
                    ; mov r10, [r11 + r10 * 8]
                    ; test r10, r10
                    ; jz =>slow
                );
            }
        }
        asm!(self.ops; add rax, r10);
        if update {
            // The value: [r3, r3 + value_size), checked as one access.
            let len = m.value_size as u8;
            let (b, disp) = self.mem_operand(pc, 3, 0, len, false);
            let mut off = 0i32;
            let end = i32::from(len);
            while off < end {
                let d = disp + off;
                match end - off {
                    8.. => {
                        at!(self.ops, b, d; [mov r10, QWORD] []);
                        asm!(self.ops; mov [rax + off], r10);
                        off += 8;
                    }
                    4..=7 => {
                        at!(self.ops, b, d; [mov r10d, DWORD] []);
                        asm!(self.ops; mov [rax + off], r10d);
                        off += 4;
                    }
                    2 | 3 => {
                        at!(self.ops, b, d; [movzx r10d, WORD] []);
                        asm!(self.ops; mov [rax + off], r10w);
                        off += 2;
                    }
                    _ => {
                        at!(self.ops, b, d; [movzx r10d, BYTE] []);
                        asm!(self.ops; mov [rax + off], r10b);
                        off += 1;
                    }
                }
            }
            asm!(self.ops
                ; xor eax, eax
                ; jmp =>done
                // A key out of range: the kernel's -E2BIG (its flags were checked first).
                ; =>absent
                ; mov rax, -(E2BIG as i32)
                ; jmp =>done
            );
        } else {
            if self.checked {
                // Accesses through the pointer test the data area inline.
                self.mov_imm64(x::R10, m.area_start);
                asm!(self.ops; mov [r12 + CACHE_START], r10);
                self.mov_imm64(x::R10, m.area_len);
                asm!(self.ops; mov [r12 + CACHE_LEN], r10);
                if !m.writable {
                    asm!(self.ops; xor r10d, r10d);
                }
                asm!(self.ops; mov [r12 + CACHE_WLEN], r10);
            }
            asm!(self.ops
                ; jmp =>done
                ; =>absent
                ; xor eax, eax
                ; jmp =>done
            );
        }
        asm!(self.ops; =>slow);
        Some((done, may_fall_back))
    }

    /// Notes why the program gets no native entry (the first reason is kept).
    fn refuse_native(&mut self, why: &str) {
        if self.native.is_some() && self.native_refused.is_none() {
            self.native_refused = Some(why.to_string());
        }
    }

    /// The label of jump target `t` (every valid target got one in `compile`).
    fn label(&self, t: usize) -> DynamicLabel {
        self.labels[self.label_of[t] as usize]
    }

    /// Whether a `len`-byte jump emitted here reaches slot `target`, already emitted, with an
    /// 8-bit displacement (forward targets are not known yet: they get 32 bits).
    fn short_reach(&self, target: usize, len: usize) -> bool {
        let Some(&t) = self.offsets.get(target).filter(|&&o| o != u32::MAX) else {
            return false;
        };
        let from = self.ops.offset().0 + len;
        i64::from(t) - from as i64 >= -128
    }

    fn jcc(&mut self, cond: JmpCond, l: DynamicLabel, short: bool) {
        macro_rules! j {
            ($mn:ident) => {
                if short {
                    asm!(self.ops; $mn BYTE =>l)
                } else {
                    asm!(self.ops; $mn =>l)
                }
            };
        }
        match cond {
            JmpCond::Eq => j!(je),
            JmpCond::Ne => j!(jne),
            JmpCond::Set => j!(jnz),
            JmpCond::Gt => j!(ja),
            JmpCond::Ge => j!(jae),
            JmpCond::Lt => j!(jb),
            JmpCond::Le => j!(jbe),
            JmpCond::Sgt => j!(jg),
            JmpCond::Sge => j!(jge),
            JmpCond::Slt => j!(jl),
            JmpCond::Sle => j!(jle),
        }
    }

    fn mov_imm64(&mut self, d: u8, v: u64) {
        if v == 0 {
            asm!(self.ops; xor Rd(d), Rd(d));
        } else if let Ok(v32) = u32::try_from(v) {
            asm!(self.ops; mov Rd(d), DWORD v32 as i32);
        } else if let Ok(s) = i32::try_from(v as i64) {
            asm!(self.ops; mov Rq(d), DWORD s);
        } else {
            asm!(self.ops; mov Rq(d), QWORD v as i64);
        }
    }

    fn alu(&mut self, w64: bool, op: AluOp, d: u8, src: Src) {
        macro_rules! binop {
            ($mn:ident) => {
                match (w64, src) {
                    (true, Src::Reg(s)) => asm!(self.ops; $mn Rq(d), Rq(native(s))),
                    (false, Src::Reg(s)) => asm!(self.ops; $mn Rd(d), Rd(native(s))),
                    (true, Src::Imm(v)) => match i8::try_from(v) {
                        Ok(v8) => asm!(self.ops; $mn Rq(d), BYTE v8),
                        Err(_) => asm!(self.ops; $mn Rq(d), DWORD v),
                    },
                    (false, Src::Imm(v)) => match i8::try_from(v) {
                        Ok(v8) => asm!(self.ops; $mn Rd(d), BYTE v8),
                        Err(_) => asm!(self.ops; $mn Rd(d), DWORD v),
                    },
                }
            };
        }
        match op {
            AluOp::Add => binop!(add),
            AluOp::Sub => binop!(sub),
            AluOp::Or => binop!(or),
            AluOp::And => binop!(and),
            AluOp::Xor => binop!(xor),
            AluOp::Mul => match (w64, src) {
                (true, Src::Reg(s)) => asm!(self.ops; imul Rq(d), Rq(native(s))),
                (false, Src::Reg(s)) => asm!(self.ops; imul Rd(d), Rd(native(s))),
                (true, Src::Imm(v)) => asm!(self.ops; imul Rq(d), Rq(d), DWORD v),
                (false, Src::Imm(v)) => asm!(self.ops; imul Rd(d), Rd(d), DWORD v),
            },
            AluOp::Mov => match (w64, src) {
                (true, Src::Reg(s)) => {
                    let s = native(s);
                    if s != d {
                        asm!(self.ops; mov Rq(d), Rq(s));
                    }
                }
                (false, Src::Reg(s)) => asm!(self.ops; mov Rd(d), Rd(native(s))),
                (true, Src::Imm(v)) => self.mov_imm64(d, v as i64 as u64),
                (false, Src::Imm(v)) => self.mov_imm64(d, u64::from(v as u32)),
            },
            AluOp::Lsh | AluOp::Rsh | AluOp::Arsh => self.shift(w64, op, d, src),
            AluOp::Div | AluOp::Mod | AluOp::SDiv | AluOp::SMod => self.divmod(w64, op, d, src),
        }
    }

    fn shift(&mut self, w64: bool, op: AluOp, d: u8, src: Src) {
        macro_rules! by_cl {
            ($r:expr) => {
                match (op, w64) {
                    (AluOp::Lsh, true) => asm!(self.ops; shl Rq($r), cl),
                    (AluOp::Rsh, true) => asm!(self.ops; shr Rq($r), cl),
                    (_, true) => asm!(self.ops; sar Rq($r), cl),
                    (AluOp::Lsh, false) => asm!(self.ops; shl Rd($r), cl),
                    (AluOp::Rsh, false) => asm!(self.ops; shr Rd($r), cl),
                    (_, false) => asm!(self.ops; sar Rd($r), cl),
                }
            };
        }
        match src {
            Src::Imm(v) => {
                let n = (v & if w64 { 63 } else { 31 }) as i8;
                match (op, w64, n) {
                    (_, true, 0) => {}
                    (_, false, 0) => asm!(self.ops; mov Rd(d), Rd(d)),
                    (AluOp::Lsh, true, _) => asm!(self.ops; shl Rq(d), n),
                    (AluOp::Rsh, true, _) => asm!(self.ops; shr Rq(d), n),
                    (_, true, _) => asm!(self.ops; sar Rq(d), n),
                    (AluOp::Lsh, false, _) => asm!(self.ops; shl Rd(d), n),
                    (AluOp::Rsh, false, _) => asm!(self.ops; shr Rd(d), n),
                    (_, false, _) => asm!(self.ops; sar Rd(d), n),
                }
            }
            Src::Reg(s) if self.bmi2 => {
                // Counts masked by the CPU to the operand width, as RFC 9669 requires.
                let s = native(s);
                match (op, w64) {
                    (AluOp::Lsh, true) => asm!(self.ops; shlx Rq(d), Rq(d), Rq(s)),
                    (AluOp::Rsh, true) => asm!(self.ops; shrx Rq(d), Rq(d), Rq(s)),
                    (_, true) => asm!(self.ops; sarx Rq(d), Rq(d), Rq(s)),
                    (AluOp::Lsh, false) => asm!(self.ops; shlx Rd(d), Rd(d), Rd(s)),
                    (AluOp::Rsh, false) => asm!(self.ops; shrx Rd(d), Rd(d), Rd(s)),
                    (_, false) => asm!(self.ops; sarx Rd(d), Rd(d), Rd(s)),
                }
            }
            Src::Reg(s) => {
                // The count must be in cl (masked by the CPU to the operand width, as RFC 9669
                // requires); rcx is eBPF r4.
                let s = native(s);
                if s == x::RCX {
                    by_cl!(d);
                } else if d == x::RCX {
                    asm!(self.ops; mov r11, rcx; mov rcx, Rq(s));
                    by_cl!(x::R11);
                    asm!(self.ops; mov rcx, r11);
                } else {
                    asm!(self.ops; mov r11, rcx; mov rcx, Rq(s));
                    by_cl!(d);
                    asm!(self.ops; mov rcx, r11);
                }
            }
        }
    }

    /// Division and modulo with RFC 9669 §4.1 semantics: by zero, div gives 0 and mod the
    /// (truncated) dividend; signed `MIN / -1` gives `MIN` and `MIN % -1` gives 0 — without
    /// ever executing a faulting `div`/`idiv`.
    fn divmod(&mut self, w64: bool, op: AluOp, d: u8, src: Src) {
        let signed = matches!(op, AluOp::SDiv | AluOp::SMod);
        let is_div = matches!(op, AluOp::Div | AluOp::SDiv);
        match src {
            Src::Imm(0) => self.div_by_zero(w64, is_div, d),
            Src::Imm(-1) if signed => self.div_by_minus_one(w64, is_div, d),
            Src::Imm(v) => {
                let divisor = if w64 {
                    v as i64 as u64
                } else {
                    u64::from(v as u32)
                };
                if !signed && divisor.is_power_of_two() {
                    let k = divisor.trailing_zeros() as i8;
                    match (is_div, w64) {
                        (true, true) if k > 0 => asm!(self.ops; shr Rq(d), k),
                        (true, true) => {}
                        (true, false) if k > 0 => asm!(self.ops; shr Rd(d), k),
                        (true, false) => asm!(self.ops; mov Rd(d), Rd(d)),
                        // divisor - 1 < 2^31 here (a positive imm, or 2^31 for 32-bit).
                        (false, true) => asm!(self.ops; and Rq(d), DWORD (divisor - 1) as i32),
                        (false, false) => asm!(self.ops; and Rd(d), DWORD (divisor - 1) as i32),
                    }
                    return;
                }
                if !signed {
                    self.div_const(w64, is_div, d, divisor);
                    return;
                }
                if w64 {
                    asm!(self.ops; mov r11, DWORD v);
                } else {
                    asm!(self.ops; mov r11d, DWORD v);
                }
                self.div_core(w64, signed, is_div, d);
            }
            Src::Reg(s) => {
                let s = native(s);
                let (zero, minus_one, done) = (
                    self.ops.new_dynamic_label(),
                    self.ops.new_dynamic_label(),
                    self.ops.new_dynamic_label(),
                );
                // 64-bit modulo by zero leaves dst as it is: no code on that path.
                let zero_is_nop = !is_div && w64;
                let on_zero = if zero_is_nop { done } else { zero };
                if w64 {
                    asm!(self.ops; mov r11, Rq(s); test r11, r11; jz =>on_zero);
                    if signed {
                        asm!(self.ops; cmp r11, -1; je =>minus_one);
                    }
                } else {
                    asm!(self.ops; mov r11d, Rd(s); test r11d, r11d; jz =>on_zero);
                    if signed {
                        asm!(self.ops; cmp r11d, -1; je =>minus_one);
                    }
                }
                self.div_core(w64, signed, is_div, d);
                if !zero_is_nop {
                    asm!(self.ops; jmp =>done; =>zero);
                    self.div_by_zero(w64, is_div, d);
                }
                if signed {
                    asm!(self.ops; jmp =>done; =>minus_one);
                    self.div_by_minus_one(w64, is_div, d);
                }
                asm!(self.ops; =>done);
            }
        }
    }

    /// Unsigned `d / divisor` or `d % divisor` for a constant divisor (≥ 3, not a power of two)
    /// by multiplication ([`magic_u64`]), keeping rax and rdx. 32-bit operands are zero-extended
    /// first, which the 64-bit method divides exactly.
    fn div_const(&mut self, w64: bool, is_div: bool, d: u8, divisor: u64) {
        if self.bmi2 {
            self.div_const_mulx(w64, is_div, d, divisor);
            return;
        }
        let Magic { magic, shift, add } = magic_u64(divisor);
        if !w64 {
            asm!(self.ops; mov Rd(d), Rd(d));
        }
        // n: the dividend, in a register `mul` leaves alone; q: the quotient.
        let (n, q) = match d {
            x::RAX => (x::R11, x::R9),
            x::RDX => (x::R11, x::R10),
            _ => (d, x::R11),
        };
        if n != d {
            asm!(self.ops; mov Rq(n), Rq(d));
        }
        if d != x::RAX {
            asm!(self.ops; mov r9, rax);
        }
        let keep_rdx = d != x::RDX && self.r3_read;
        if keep_rdx {
            asm!(self.ops; mov r10, rdx);
        }
        asm!(self.ops
            ; mov rax, QWORD magic as i64
            ; mul Rq(n)
        );
        if add {
            asm!(self.ops
                ; mov Rq(q), Rq(n)
                ; sub Rq(q), rdx
                ; shr Rq(q), 1
                ; add Rq(q), rdx
                ; shr Rq(q), shift as i8
            );
        } else if shift > 0 {
            asm!(self.ops; shr rdx, shift as i8; mov Rq(q), rdx);
        } else {
            asm!(self.ops; mov Rq(q), rdx);
        }
        if is_div {
            asm!(self.ops; mov Rq(d), Rq(q));
        } else {
            // The divisor is the instruction's immediate (sign-extended for 64 bits).
            let imm = divisor as i32;
            if w64 {
                asm!(self.ops; imul Rq(q), Rq(q), DWORD imm);
            } else {
                asm!(self.ops; imul Rd(q), Rd(q), DWORD imm);
            }
            if n != d {
                asm!(self.ops; mov Rq(d), Rq(n));
            }
            asm!(self.ops; sub Rq(d), Rq(q));
        }
        if d != x::RAX {
            asm!(self.ops; mov rax, r9);
        }
        if keep_rdx {
            asm!(self.ops; mov rdx, r10);
        }
    }

    /// [`Emitter::div_const`] with BMI2's `mulx`, which leaves rax and the flags alone: only rdx
    /// (its implicit operand) is used, and kept when r3 is read anywhere.
    fn div_const_mulx(&mut self, w64: bool, is_div: bool, d: u8, divisor: u64) {
        let Magic { magic, shift, add } = magic_u64(divisor);
        if !w64 {
            asm!(self.ops; mov Rd(d), Rd(d));
        }
        // n: the dividend (rdx is about to hold the magic number).
        let n = if d == x::RDX {
            asm!(self.ops; mov r11, rdx);
            x::R11
        } else {
            d
        };
        let keep_rdx = d != x::RDX && self.r3_read;
        if keep_rdx {
            asm!(self.ops; mov r10, rdx);
        }
        // r9 = (n * magic) >> 64, then the quotient.
        asm!(self.ops
            ; mov rdx, QWORD magic as i64
            ; mulx r9, r9, Rq(n)
        );
        if add {
            asm!(self.ops
                ; mov rdx, Rq(n)
                ; sub rdx, r9
                ; shr rdx, 1
                ; add r9, rdx
            );
        }
        if shift > 0 {
            asm!(self.ops; shr r9, shift as i8);
        }
        if is_div {
            asm!(self.ops; mov Rq(d), r9);
        } else {
            let imm = divisor as i32;
            if w64 {
                asm!(self.ops; imul r9, r9, DWORD imm);
            } else {
                asm!(self.ops; imul r9d, r9d, DWORD imm);
            }
            if n != d {
                asm!(self.ops; mov Rq(d), Rq(n));
            }
            asm!(self.ops; sub Rq(d), r9);
        }
        if keep_rdx {
            asm!(self.ops; mov rdx, r10);
        }
    }

    /// `d = d / r11` or `d % r11` (divisor neither 0 nor, when signed, -1), keeping rax and rdx.
    /// Unsigned 64-bit division uses the (faster) 32-bit `div` when both operands fit 32 bits,
    /// as compilers do.
    fn div_core(&mut self, w64: bool, signed: bool, is_div: bool, d: u8) {
        let keep_rdx = self.r3_read;
        asm!(self.ops; mov r9, rax);
        if keep_rdx {
            asm!(self.ops; mov r10, rdx);
        }
        if d != x::RAX {
            asm!(self.ops; mov rax, Rq(d));
        }
        match (w64, signed) {
            (true, false) => {
                let (wide, join) = (self.ops.new_dynamic_label(), self.ops.new_dynamic_label());
                asm!(self.ops
                    ; mov rdx, rax
                    ; or rdx, r11
                    ; shr rdx, 32
                    ; jnz =>wide
                    ; div r11d
                    ; jmp =>join
                    ; =>wide
                    ; xor edx, edx
                    ; div r11
                    ; =>join
                );
            }
            (true, true) => asm!(self.ops; cqo; idiv r11),
            (false, false) => asm!(self.ops; xor edx, edx; div r11d),
            (false, true) => asm!(self.ops; cdq; idiv r11d),
        }
        if is_div {
            asm!(self.ops; mov r11, rax);
        } else {
            asm!(self.ops; mov r11, rdx);
        }
        asm!(self.ops; mov rax, r9);
        if keep_rdx {
            asm!(self.ops; mov rdx, r10);
        }
        asm!(self.ops; mov Rq(d), r11);
    }

    fn div_by_zero(&mut self, w64: bool, is_div: bool, d: u8) {
        match (is_div, w64) {
            (true, _) => asm!(self.ops; xor Rd(d), Rd(d)),
            (false, true) => {}
            (false, false) => asm!(self.ops; mov Rd(d), Rd(d)),
        }
    }

    fn div_by_minus_one(&mut self, w64: bool, is_div: bool, d: u8) {
        match (is_div, w64) {
            (true, true) => asm!(self.ops; neg Rq(d)),
            (true, false) => asm!(self.ops; neg Rd(d)),
            (false, _) => asm!(self.ops; xor Rd(d), Rd(d)),
        }
    }

    /// The operand `[base + disp]` of an access of `len` bytes at `reg + off`. Checked mode
    /// (except r10-relative accesses, which the loader proved inside the frame) computes the
    /// address into r11, checks it and returns `[r11 + 0]`.
    fn mem_operand(&mut self, pc: usize, reg: u8, off: i16, len: u8, write: bool) -> (u8, i32) {
        let b = native(reg);
        if !self.checked || reg == bpftime_vm::isa::FRAME_REG {
            return (b, i32::from(off));
        }
        if self.in_frame(pc, reg, off, len).is_some() || self.in_static(pc, reg, off, len, write) {
            return (b, i32::from(off));
        }
        self.uses_check = true;
        let entry = self.ops.new_dynamic_label();
        let back = self.ops.new_dynamic_label();
        let stack_first = self.stack_ptrs.get(pc).is_some_and(|m| m & (1 << reg) != 0);
        asm!(self.ops; lea r11, [Rq(b) + i32::from(off)]);
        if stack_first {
            self.stack_test(len, entry);
        } else {
            self.fast_test(len, write, entry);
        }
        asm!(self.ops; =>back);
        self.stubs.push(Stub::Mem {
            entry,
            back,
            pc: pc as u32,
            len,
            write,
            stack_first,
        });
        (x::R11, 0)
    }

    /// When `reg` is known to hold r10 + k at `pc` and `[k + off, k + off + len)` lies inside
    /// the frame (what the loader proves for r10's own accesses), `k + off`.
    fn in_frame(&self, pc: usize, reg: u8, off: i16, len: u8) -> Option<i64> {
        let k = *self.frame_offs.get(pc)?.get(usize::from(reg))?;
        if k == OFF_UNKNOWN || k == OFF_TOP {
            return None;
        }
        let at = i64::from(k) + i64::from(off);
        (at >= -(FRAME_SIZE as i64) && at + i64::from(len) <= 0).then_some(at)
    }

    /// Whether `reg` is known to point into a static region at `pc` with `[reg + off, reg +
    /// off + len)` inside it (and the region writable, for a store).
    fn in_static(&self, pc: usize, reg: u8, off: i16, len: u8, write: bool) -> bool {
        self.static_at(pc, reg, off, len, write).is_some()
    }

    /// Whether [`Self::in_static`] proves the access, with its address when that is known
    /// at compile time (global data; not an element a lookup returned), for alignment checks.
    fn static_at(&self, pc: usize, reg: u8, off: i16, len: u8, write: bool) -> Option<Option<u64>> {
        let inside = |k: i32, size: u64, writable: bool| {
            let at = i64::from(k) + i64::from(off);
            (at >= 0 && (at as u64).checked_add(u64::from(len))? <= size && (writable || !write))
                .then_some(at as u64)
        };
        match *self.static_ptrs.get(pc)?.get(usize::from(reg))? {
            StaticPtr::At { region, off: k } => {
                let &(start, rlen, writable) = self.static_regions.get(usize::from(region))?;
                inside(k, rlen, writable).map(|at| Some(start.wrapping_add(at)))
            }
            StaticPtr::Value {
                map,
                off: k,
                nullable: false,
            } => {
                let m = self.inline.get(usize::from(map))?;
                inside(k, u64::from(m.value_size), m.writable).map(|_| None)
            }
            _ => None,
        }
    }

    /// Jumps to `fail` unless `[r11, r11 + len)` is inside the stack.
    fn stack_test(&mut self, len: u8, fail: DynamicLabel) {
        asm!(self.ops
            ; mov r10, r11
            ; sub r10, [r12 + STACK_LO]
            ; add r10, i32::from(len)
            ; jc =>fail
            ; cmp r10, [r12 + STACK_LEN]
            ; ja =>fail
        );
    }

    /// Jumps to `fail` unless `[r11, r11 + len)` is inside the fast region (`fast_wlen` bytes
    /// of it for a store).
    fn fast_test(&mut self, len: u8, write: bool, fail: DynamicLabel) {
        let limit = if write { FAST_WLEN } else { FAST_LEN };
        asm!(self.ops
            ; mov r10, r11
            ; sub r10, [r12 + FAST_START]
            ; add r10, i32::from(len)
            ; jc =>fail
            ; cmp r10, [r12 + limit]
            ; ja =>fail
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn atomic(
        &mut self,
        pc: usize,
        w64: bool,
        op: AtomicOp,
        fetch: bool,
        base: u8,
        s: u8,
        off: i16,
    ) {
        let len: u8 = if w64 { 8 } else { 4 };
        if self.checked {
            // r10 is 8-aligned, so for r10 and registers known to hold r10 + k the offset
            // decides alignment (and the frame holds the access).
            let in_frame = if base == bpftime_vm::isa::FRAME_REG {
                Some(i64::from(off))
            } else {
                self.in_frame(pc, base, off, len)
                    // A known global-data address: its own value decides alignment.
                    .or_else(|| self.static_at(pc, base, off, len, true)?.map(|a| a as i64))
            };
            if let Some(at) = in_frame {
                asm!(self.ops; lea r11, [Rq(native(base)) + i32::from(off)]);
                if at % i64::from(len) != 0 {
                    let entry = self.ops.new_dynamic_label();
                    self.stubs.push(Stub::Misaligned {
                        entry,
                        pc: pc as u32,
                        len,
                    });
                    asm!(self.ops; jmp =>entry);
                    return;
                }
            } else {
                if self.in_static(pc, base, off, len, true) {
                    // Inside a map value a lookup returned: only the alignment is tested.
                    asm!(self.ops; lea r11, [Rq(native(base)) + i32::from(off)]);
                } else {
                    // The checked address into r11.
                    let _ = self.mem_operand(pc, base, off, len, true);
                }
                let entry = self.ops.new_dynamic_label();
                self.stubs.push(Stub::Misaligned {
                    entry,
                    pc: pc as u32,
                    len,
                });
                asm!(self.ops
                    ; test r11b, (len - 1) as i8
                    ; jnz =>entry
                );
            }
        } else {
            asm!(self.ops; lea r11, [Rq(native(base)) + i32::from(off)]);
        }
        // The address is in r11.
        match (op, fetch, w64) {
            (AtomicOp::Add, false, true) => asm!(self.ops; lock add QWORD [r11], Rq(s)),
            (AtomicOp::Add, false, false) => asm!(self.ops; lock add DWORD [r11], Rd(s)),
            (AtomicOp::Or, false, true) => asm!(self.ops; lock or QWORD [r11], Rq(s)),
            (AtomicOp::Or, false, false) => asm!(self.ops; lock or DWORD [r11], Rd(s)),
            (AtomicOp::And, false, true) => asm!(self.ops; lock and QWORD [r11], Rq(s)),
            (AtomicOp::And, false, false) => asm!(self.ops; lock and DWORD [r11], Rd(s)),
            (AtomicOp::Xor, false, true) => asm!(self.ops; lock xor QWORD [r11], Rq(s)),
            (AtomicOp::Xor, false, false) => asm!(self.ops; lock xor DWORD [r11], Rd(s)),
            (AtomicOp::Add, true, true) => asm!(self.ops; lock xadd QWORD [r11], Rq(s)),
            (AtomicOp::Add, true, false) => asm!(self.ops; lock xadd DWORD [r11], Rd(s)),
            (AtomicOp::Xchg, _, true) => asm!(self.ops; xchg QWORD [r11], Rq(s)),
            (AtomicOp::Xchg, _, false) => asm!(self.ops; xchg DWORD [r11], Rd(s)),
            (AtomicOp::CmpXchg, _, true) => asm!(self.ops; lock cmpxchg QWORD [r11], Rq(s)),
            (AtomicOp::CmpXchg, _, false) => {
                // A successful 32-bit cmpxchg leaves rax's upper half alone; r0 must be the
                // zero-extended old value.
                asm!(self.ops
                    ; lock cmpxchg DWORD [r11], Rd(s)
                    ; mov eax, eax
                );
            }
            (_, true, _) => {
                // Fetching or/and/xor: a cmpxchg loop on rax (r0, saved in r9).
                let retry = self.ops.new_dynamic_label();
                let operand = if s == x::RAX { x::R9 } else { s };
                asm!(self.ops; mov r9, rax);
                if w64 {
                    asm!(self.ops; mov rax, QWORD [r11]; =>retry; mov r10, rax);
                    match op {
                        AtomicOp::Or => asm!(self.ops; or r10, Rq(operand)),
                        AtomicOp::And => asm!(self.ops; and r10, Rq(operand)),
                        _ => asm!(self.ops; xor r10, Rq(operand)),
                    }
                    asm!(self.ops; lock cmpxchg QWORD [r11], r10; jne =>retry);
                } else {
                    asm!(self.ops; mov eax, DWORD [r11]; =>retry; mov r10d, eax);
                    match op {
                        AtomicOp::Or => asm!(self.ops; or r10d, Rd(operand)),
                        AtomicOp::And => asm!(self.ops; and r10d, Rd(operand)),
                        _ => asm!(self.ops; xor r10d, Rd(operand)),
                    }
                    asm!(self.ops; lock cmpxchg DWORD [r11], r10d; jne =>retry);
                }
                // rax = the old value (zero-extended for 32 bits).
                if s != x::RAX {
                    asm!(self.ops; mov Rq(s), rax; mov rax, r9);
                }
            }
        }
    }

    /// After a helper that may stop the program: leave through a stub unless `env.status == 0`.
    fn status_check(&mut self, pc: usize) {
        let entry = self.ops.new_dynamic_label();
        let back = self.ops.new_dynamic_label();
        asm!(self.ops
            ; mov r10, [r12 + ENV]
            ; cmp DWORD [r10 + ENV_STATUS], 0
            ; jne =>entry
            ; =>back
        );
        self.stubs.push(Stub::Status {
            entry,
            back,
            pc: pc as u32,
        });
    }

    /// Shared exits, routines and the cold stubs.
    fn finish(&mut self) {
        let (unwind, trap_exit) = (self.unwind, self.trap_exit);
        asm!(self.ops
            ; =>trap_exit
            ; xor eax, eax
            ; =>unwind
            ; mov rsp, [r12 + SAVED_SP]
        );
        if !self.callbacks.is_empty() {
            asm!(self.ops
                ; mov r11, [rsp]
                ; mov [r12 + SAVED_SP], r11
            );
        }
        self.main_epilogue();
        if !self.callbacks.is_empty() {
            self.emit_callback_entry();
        }
        if self.uses_check {
            // In: r11 = address, r10 = `trap_info` (len | write << 8 | pc << 9). Out: ZF clear
            // iff accessible. Entered by `call` from a body (rsp 16-aligned there): 7 pushes +
            // the return address keep `ctx.check` aligned.
            let (l, oob) = (self.check_routine, self.oob_routine);
            asm!(self.ops
                // The out-of-bounds trap of every access (same inputs), then the checker.
                ; =>oob
                ; mov DWORD [r12 + TRAP_KIND], trap::OUT_OF_BOUNDS as i32
                ; mov [r12 + TRAP_ADDR], r11
                ; movzx r11d, r10b
                ; mov [r12 + TRAP_LEN], r11
                ; mov r11d, r10d
                ; shr r11d, 8
                ; and r11d, 1
                ; mov [r12 + TRAP_WRITE], r11
                ; shr r10d, 9
                ; mov [r12 + TRAP_PC], r10d
                ; jmp =>trap_exit
                ; =>l
                ; push rax
                ; push rcx
                ; push rdx
                ; push rsi
                ; push rdi
                ; push r8
                ; push r11
                ; mov rdi, [r12 + MEM]
                ; mov rsi, r11
                ; movzx edx, r10b
                ; shr r10d, 8
                ; mov ecx, r10d
                ; and ecx, 1
                ; call QWORD [r12 + CHECK]
                ; test al, al
                ; pop r11
                ; pop r8
                ; pop rdi
                ; pop rsi
                ; pop rdx
                ; pop rcx
                ; pop rax
                ; ret
            );
        }
        if self.uses_tail {
            // bpf_tail_call(r1 = ctx, r2 = map, r3 = index), entered by `call`: the host's
            // tables (`ctx.tail_tables`) first; no table for r2 → the registered helper 12,
            // which may start a tail call through the env (`CallStatus::TailCall`).
            let l = self.tail_routine;
            let (next, found, out, dynamic) = (
                self.ops.new_dynamic_label(),
                self.ops.new_dynamic_label(),
                self.ops.new_dynamic_label(),
                self.ops.new_dynamic_label(),
            );
            asm!(self.ops
                ; =>l
                ; mov r9, [r12 + TAIL_TABLES]
                ; mov r10, [r12 + TAIL_TABLES_LEN]
                ; test r10, r10
                ; jz =>dynamic
                ; =>next
                ; cmp rsi, [r9 + TT_MAP]
                ; je =>found
                ; add r9, TT_SIZE
                ; dec r10
                ; jnz =>next
                ; =>dynamic
            );
            if let Some(h) = self.helpers.get(TAIL_CALL_ID) {
                // rsp is 8 mod 16 here: the push realigns it for the call.
                let addr = h.func as usize as i64;
                let fall = self.ops.new_dynamic_label();
                asm!(self.ops
                    ; push rdi
                    ; mov r9, [r12 + ENV]
                    ; mov rax, QWORD addr
                    ; call rax
                    ; pop rdi
                    ; mov r10, [r12 + ENV]
                    ; cmp DWORD [r10 + ENV_STATUS], CallStatus::TailCall as i32
                    ; jne =>out
                    ; mov DWORD [r10 + ENV_STATUS], 0
                    ; mov r11, [r10 + ENV_TAIL_ENTRY]
                    ; cmp DWORD [r10 + ENV_CALLBACK_DEPTH], 0
                    ; jne =>fall
                    ; test r11, r11
                    ; jz =>fall
                    ; mov rsp, [r12 + SAVED_SP]
                    ; jmp r11
                    ; =>fall
                );
            }
            asm!(self.ops
                ; =>out
                ; ret
                ; =>found
                ; mov r10, [r12 + ENV]
                ; cmp DWORD [r10 + ENV_CALLBACK_DEPTH], 0
                ; jne =>out
                ; mov r10d, edx
                ; cmp r10, [r9 + TT_LEN]
                ; jae =>out
                ; cmp QWORD [r12 + TAIL_CALLS], MAX_TAIL_CALLS as i32
                ; jae =>out
                ; add QWORD [r12 + TAIL_CALLS], 1
                ; mov r9, [r9 + TT_SLOTS]
                ; mov r9, [r9 + r10 * 8]
                ; test r9, r9
                ; jz =>out
                ; mov rsp, [r12 + SAVED_SP]
                ; jmp r9
            );
        }
        let stubs = std::mem::take(&mut self.stubs);
        for stub in stubs {
            match stub {
                Stub::Mem {
                    entry,
                    back,
                    pc,
                    len,
                    write,
                    stack_first,
                } => {
                    // The other inline-testable region, then `ctx.check`, else the trap.
                    let (check, oob) = (self.check_routine, self.oob_routine);
                    let info = trap_info(pc, len, write);
                    let slow = self.ops.new_dynamic_label();
                    let uncached = self.ops.new_dynamic_label();
                    asm!(self.ops; =>entry);
                    if stack_first {
                        self.fast_test(len, write, uncached);
                    } else {
                        self.stack_test(len, uncached);
                    }
                    let limit = if write { CACHE_WLEN } else { CACHE_LEN };
                    asm!(self.ops
                        ; jmp =>back
                        ; =>uncached
                        ; mov r10, r11
                        ; sub r10, [r12 + CACHE_START]
                        ; add r10, i32::from(len)
                        ; jc =>slow
                        ; cmp r10, [r12 + limit]
                        ; jbe =>back
                        ; =>slow
                        ; mov r10d, info
                        ; call =>check
                        ; jnz =>back
                        ; mov r10d, info
                        ; jmp =>oob
                    );
                }
                Stub::Misaligned { entry, pc, len } => {
                    asm!(self.ops
                        ; =>entry
                        ; mov DWORD [r12 + TRAP_KIND], trap::MISALIGNED as i32
                        ; mov DWORD [r12 + TRAP_PC], pc as i32
                        ; mov [r12 + TRAP_ADDR], r11
                        ; mov QWORD [r12 + TRAP_LEN], i32::from(len)
                        ; jmp =>trap_exit
                    );
                }
                Stub::UnknownHelper { entry, pc } => {
                    asm!(self.ops
                        ; =>entry
                        ; mov DWORD [r12 + TRAP_KIND], trap::UNKNOWN_HELPER as i32
                        ; mov DWORD [r12 + TRAP_PC], pc as i32
                        ; mov [r12 + TRAP_ADDR], r11
                        ; jmp =>trap_exit
                    );
                }
                Stub::Status { entry, back, pc } => {
                    // r10 = env. The interpreter's order: fault first, then exit.
                    let fault = self.ops.new_dynamic_label();
                    let exit = self.ops.new_dynamic_label();
                    asm!(self.ops
                        ; =>entry
                        ; mov r11d, DWORD [r10 + ENV_STATUS]
                        ; cmp r11d, 2
                        ; je =>fault
                        ; cmp r11d, 1
                        ; je =>exit
                        // A callback trapped: the context holds its trap.
                        ; cmp r11d, CallStatus::Trapped as i32
                        ; je =>trap_exit
                        // A tail call requested anywhere but `call 12`: dropped.
                        ; mov DWORD [r10 + ENV_STATUS], 0
                        ; jmp =>back
                        ; =>exit
                        ; mov rax, [r10 + ENV_EXIT_VALUE]
                        ; jmp =>unwind
                        ; =>fault
                        ; mov DWORD [r12 + TRAP_KIND], trap::HELPER_FAULT as i32
                        ; mov DWORD [r12 + TRAP_PC], pc as i32
                        ; mov r11d, DWORD [r10 + ENV_FAULT_CODE]
                        ; mov [r12 + TRAP_ADDR], r11
                        ; jmp =>trap_exit
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::magic_u64;

    fn divide(n: u64, d: u64) -> u64 {
        let m = magic_u64(d);
        let t = ((u128::from(n) * u128::from(m.magic)) >> 64) as u64;
        if m.add {
            (t + ((n - t) >> 1)) >> m.shift
        } else {
            t >> m.shift
        }
    }

    #[test]
    fn magic_for_ten_and_seven_is_the_textbook_one() {
        let ten = magic_u64(10);
        assert_eq!(
            (ten.magic, ten.shift, ten.add),
            (0xcccc_cccc_cccc_cccd, 3, false)
        );
        let seven = magic_u64(7);
        assert_eq!(
            (seven.magic, seven.shift, seven.add),
            (0x2492_4924_9249_2493, 2, true)
        );
    }

    #[test]
    fn magic_division_is_exact() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut divisors: Vec<u64> = (3..2000).filter(|d: &u64| !d.is_power_of_two()).collect();
        divisors.extend([
            u64::MAX,
            u64::MAX - 1,
            (1 << 63) + 1,
            0xffff_ffff_8000_0001,
            u64::from(u32::MAX),
            1_000_000_007,
            (1 << 32) + 1,
        ]);
        divisors.extend(
            (0..2000)
                .map(|_| next())
                .filter(|d| *d > 2 && !d.is_power_of_two()),
        );
        for d in divisors {
            for n in [
                0,
                1,
                d - 1,
                d,
                d.wrapping_add(1),
                u64::MAX,
                u64::MAX - 1,
                1 << 63,
                u64::from(u32::MAX),
            ] {
                assert_eq!(divide(n, d), n / d, "{n} / {d}");
            }
            for _ in 0..50 {
                let n = next();
                assert_eq!(divide(n, d), n / d, "{n} / {d}");
                let n = n >> (next() % 64);
                assert_eq!(divide(n, d), n / d, "{n} / {d}");
            }
        }
    }
}
