//! Lowering of each eBPF instruction to aarch64 with dynasm-rs.
//!
//! Layout of the generated code:
//!
//! ```text
//! tail entry (offset 0): mov x1, xzr; b init          ← bpf_tail_call targets land here
//! entry (offset 8):      stp fp, lr and x19–x28; x26 = ctx; ctx.saved_sp = sp
//! init:                  r10 = ctx.frame_top; r0, r3–r9 = 0; checked: x27 = stack_lo,
//!                        x23/x24/x28 = the fast region
//! pc 0 …                 main function body (exit: restore the host's registers, ret)
//! subprogram:            stp fp, lr, r6–r9; body (exit: ldp, ret); the caller moves r10
//! stubs:                 per-site slow paths (checked memory, misaligned atomics, unknown
//!                        callx target, helper status), then the tail-call routine
//! trap / unwind / epilogue: store the trap; sp = ctx.saved_sp; restore; ret
//! ```
//!
//! Every immediate handed to `dynasm!` is range-checked here first (dynasm-rs panics on an
//! unencodable dynamic immediate), so no program can make code generation panic.
#![allow(
    clippy::useless_conversion,
    reason = "dynasm-rs expands every dynamic register operand to `u8::into()`"
)]

use super::regs::*;
use crate::abi::{JitContext, MAX_TAIL_CALLS, TailCallTable, trap};
use crate::{Arch, CompiledCode, JitError, JitOptions};
use bpftime_vm::helper::{Helper, HelperRegistry};
use bpftime_vm::isa::{AluOp, AtomicOp, Endian, JmpCond, LdImmKind, Op, Size, Src, Width};
use bpftime_vm::memory::{FRAME_SIZE, MAX_FRAMES};
use bpftime_vm::verifier::Program;
use dynasmrt::aarch64::{
    Aarch64Relocation, encode_logical_immediate_32bit, encode_logical_immediate_64bit,
};
use dynasmrt::{DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler, dynasm};
use std::mem::offset_of;

/// Resolves the absolute address called for helper `id` (the host function pointer in
/// production; a trampoline address when the code runs under emulation).
pub type HelperAddr<'a> = &'a dyn Fn(u32, &Helper) -> u64;

macro_rules! a64 {
    ($ops:expr; $($t:tt)*) => {
        dynasm!($ops ; .arch aarch64 ; $($t)*)
    };
}

const CTX_FRAME_TOP: u32 = offset_of!(JitContext, frame_top) as u32;
const CTX_ENV: u32 = offset_of!(JitContext, env) as u32;
const CTX_CHECK: u32 = offset_of!(JitContext, check) as u32;
const CTX_MEM: u32 = offset_of!(JitContext, mem) as u32;
const CTX_HELPERS: u32 = offset_of!(JitContext, helpers) as u32;
const CTX_HELPERS_LEN: u32 = offset_of!(JitContext, helpers_len) as u32;
const CTX_TRAP_KIND: u32 = offset_of!(JitContext, trap_kind) as u32;
const CTX_TRAP_PC: u32 = offset_of!(JitContext, trap_pc) as u32;
const CTX_TRAP_ADDR: u32 = offset_of!(JitContext, trap_addr) as u32;
const CTX_TRAP_LEN: u32 = offset_of!(JitContext, trap_len) as u32;
const CTX_TRAP_WRITE: u32 = offset_of!(JitContext, trap_write) as u32;
const CTX_SAVED_SP: u32 = offset_of!(JitContext, saved_sp) as u32;
const CTX_TAIL_CALLS: u32 = offset_of!(JitContext, tail_calls) as u32;
const CTX_STACK_LO: u32 = offset_of!(JitContext, stack_lo) as u32;
const CTX_FAST_START: u32 = offset_of!(JitContext, fast_start) as u32;
const CTX_FAST_LEN: u32 = offset_of!(JitContext, fast_len) as u32;
const CTX_FAST_WLEN: u32 = offset_of!(JitContext, fast_wlen) as u32;
const CTX_TAIL_TABLES: u32 = offset_of!(JitContext, tail_tables) as u32;
const CTX_TAIL_TABLES_LEN: u32 = offset_of!(JitContext, tail_tables_len) as u32;
const CTX_FUNCS: u32 = offset_of!(JitContext, funcs) as u32;
const CTX_CUR_FP: u32 = offset_of!(JitContext, cur_fp) as u32;
const CB_TARGET: u32 = crate::abi::CB_TARGET as u32;
const CB_FP: u32 = crate::abi::CB_FP as u32;
const TT_MAP: u32 = offset_of!(TailCallTable, map) as u32;
const TT_LEN: u32 = offset_of!(TailCallTable, len) as u32;
const TT_SLOTS: u32 = offset_of!(TailCallTable, slots) as u32;
const TT_SIZE: u32 = size_of::<TailCallTable>() as u32;
const _: () = assert!(MAX_TAIL_CALLS < 4096, "compared as an immediate");

/// Offset of the tail-call entry in the code: `bpf_tail_call` targets start here (with the
/// entry's native frame already in place), the host calls [`CompiledCode::entry`].
pub const TAIL_ENTRY: usize = 0;
/// Offset of the host entry: the tail entry is two instructions.
const ENTRY: usize = 8;

/// `CallEnv` fields read by generated code (layout asserted in `bpftime_vm::helper`).
const ENV_STATUS: u32 = 0;
const ENV_FAULT_CODE: u32 = 4;
const ENV_EXIT_VALUE: u32 = 8;
const STATUS_EXIT: u32 = 1;
const STATUS_FAULT: u32 = 2;
const STATUS_TAIL_CALL: u32 = 3;
const STATUS_TRAPPED: u32 = 4;
const ENV_TAIL_ENTRY: u32 = bpftime_vm::helper::ENV_TAIL_ENTRY as u32;
const ENV_CALLBACK_DEPTH: u32 = bpftime_vm::helper::ENV_CALLBACK_DEPTH as u32;

const _: () = assert!(FRAME_SIZE < 4096, "r10 moves by an add/sub immediate");
/// Bytes of eBPF stack of all frames.
const STACK_BYTES: u32 = (FRAME_SIZE * MAX_FRAMES) as u32;
const _: () = assert!(STACK_BYTES <= 4096, "compared as an add/sub immediate");
/// Frame size of the entry function: fp, lr, x19–x28 and the previous `ctx.saved_sp` (at
/// [`SAVED_SP_SLOT`], restored by the unwinder: callback runs nest).
const ENTRY_FRAME: u32 = 112;
const SAVED_SP_SLOT: u32 = 96;
/// Frame size of a subprogram: fp, lr and r6–r9.
const SUB_FRAME: u32 = 48;
/// Above this many slots, conditional branches are emitted as `b.!cond +8; b target` because
/// `b.cond`'s ±1 MiB reach may not span the code.
const FAR_BRANCH_SLOTS: usize = 4096;

/// aarch64 condition codes used for eBPF jumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cond {
    Eq,
    Ne,
    Hs,
    Lo,
    Hi,
    Ls,
    Ge,
    Lt,
    Gt,
    Le,
}

impl Cond {
    fn invert(self) -> Cond {
        match self {
            Cond::Eq => Cond::Ne,
            Cond::Ne => Cond::Eq,
            Cond::Hs => Cond::Lo,
            Cond::Lo => Cond::Hs,
            Cond::Hi => Cond::Ls,
            Cond::Ls => Cond::Hi,
            Cond::Ge => Cond::Lt,
            Cond::Lt => Cond::Ge,
            Cond::Gt => Cond::Le,
            Cond::Le => Cond::Gt,
        }
    }

    fn of(cond: JmpCond) -> Cond {
        match cond {
            JmpCond::Eq => Cond::Eq,
            JmpCond::Ne | JmpCond::Set => Cond::Ne,
            JmpCond::Gt => Cond::Hi,
            JmpCond::Ge => Cond::Hs,
            JmpCond::Lt => Cond::Lo,
            JmpCond::Le => Cond::Ls,
            JmpCond::Sgt => Cond::Gt,
            JmpCond::Sge => Cond::Ge,
            JmpCond::Slt => Cond::Lt,
            JmpCond::Sle => Cond::Le,
        }
    }
}

/// A memory instruction shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemOp {
    LdB,
    LdH,
    LdW,
    LdX,
    LdSB,
    LdSH,
    LdSW,
    StB,
    StH,
    StW,
    StX,
}

/// How a memory instruction addresses memory.
#[derive(Clone, Copy, Debug)]
enum AddrMode {
    /// `[base, #off]`, `off` a non-negative multiple of the access size below 4096 × size.
    Scaled(u8, u32),
    /// `[base, #off]` with -256 <= off < 256 (`ldur`/`stur`).
    Unscaled(u8, i32),
    /// `[base, index]`.
    Indexed(u8, u8),
}

/// Out-of-line code reached from a conditional branch in the body.
#[derive(Clone, Copy, Debug)]
enum Stub {
    /// Checked mode, address outside the stack: ask `ctx.check` (address in x9); resume on
    /// success, trap out-of-bounds otherwise.
    Check {
        pc: usize,
        len: u32,
        write: bool,
        resume: DynamicLabel,
    },
    /// Checked mode: atomic at an unaligned address (in x9).
    Misaligned { pc: usize, len: u32 },
    /// A helper left a non-zero status (in w10; the env pointer in x9).
    Status { pc: usize, resume: DynamicLabel },
    /// `callx` to an id (in x9) without a helper.
    UnknownHelper { pc: usize },
}

pub(crate) struct Emitter<'a> {
    ops: VecAssembler<Aarch64Relocation>,
    prog: &'a Program,
    helpers: &'a HelperRegistry,
    helper_addr: HelperAddr<'a>,
    checked: bool,
    /// A native entry was asked for (none on this backend).
    native: bool,
    far: bool,
    /// Label of each slot.
    labels: Vec<DynamicLabel>,
    /// Entry label of each function (before its prologue), by index in `prog.functions()`.
    func_entries: Vec<DynamicLabel>,
    stubs: Vec<(DynamicLabel, Stub)>,
    trap: DynamicLabel,
    unwind: DynamicLabel,
    epilogue: DynamicLabel,
    tail_routine: DynamicLabel,
    uses_tail: bool,
    /// Callbacks (`lddw rX, func f` targets): (entry slot, frames), sorted.
    callbacks: Vec<(usize, usize)>,
    callback_entry: DynamicLabel,
    /// Code offset of each function's entry, by index in `prog.functions()`.
    func_offsets: Vec<usize>,
    /// Offset of the `movz`/`movk` pair in the prologue that receives the distance to the
    /// function table.
    table_fixup: Option<usize>,
}

impl<'a> Emitter<'a> {
    pub(crate) fn new(
        prog: &'a Program,
        helpers: &'a HelperRegistry,
        helper_addr: HelperAddr<'a>,
        opts: &JitOptions,
    ) -> Self {
        let mut ops = VecAssembler::new(0);
        let labels = (0..prog.len()).map(|_| ops.new_dynamic_label()).collect();
        let func_entries = prog
            .functions()
            .iter()
            .map(|_| ops.new_dynamic_label())
            .collect();
        let trap = ops.new_dynamic_label();
        let unwind = ops.new_dynamic_label();
        let epilogue = ops.new_dynamic_label();
        let tail_routine = ops.new_dynamic_label();
        let callback_entry = ops.new_dynamic_label();
        Emitter {
            ops,
            prog,
            helpers,
            helper_addr,
            checked: opts.checked,
            native: opts.native.is_some(),
            far: prog.len() > FAR_BRANCH_SLOTS,
            labels,
            func_entries,
            stubs: Vec::new(),
            trap,
            unwind,
            epilogue,
            tail_routine,
            uses_tail: false,
            callbacks: prog
                .callbacks()
                .map(|pc| (pc, prog.callback_frames(pc).unwrap_or(usize::MAX)))
                .collect(),
            callback_entry,
            func_offsets: vec![0; prog.functions().len()],
            table_fixup: None,
        }
    }

    fn unsupported(pc: usize, what: impl Into<String>) -> JitError {
        JitError::Unsupported {
            pc,
            what: what.into(),
            arch: Arch::Aarch64,
        }
    }

    pub(crate) fn compile(mut self) -> Result<CompiledCode, JitError> {
        let prog = self.prog;
        let n = prog.len();
        let funcs = prog.functions();
        let mut insn_offsets = vec![u32::MAX; n];
        self.entry_prologue();
        for (fi, &start) in funcs.iter().enumerate() {
            let end = funcs.get(fi + 1).copied().unwrap_or(n);
            let main = fi == 0;
            if !main {
                let entry = self.func_entries[fi];
                self.func_offsets[fi] = self.ops.offset().0;
                a64!(self.ops
                    ; =>entry
                    ; stp x29, x30, [sp, -(SUB_FRAME as i32)]!
                    ; stp x19, x20, [sp, 16]
                    ; stp x21, x22, [sp, 32]
                );
            }
            let mut pc = start;
            while pc < end {
                let op = prog.ops()[pc].ok_or_else(|| {
                    Self::unsupported(pc, "second slot of lddw at an instruction boundary")
                })?;
                insn_offsets[pc] = self.ops.offset().0 as u32;
                let label = self.labels[pc];
                a64!(self.ops ; =>label);
                self.op(pc, op, main)?;
                pc += op.slots();
            }
        }
        self.emit_stubs();
        if self.uses_tail {
            self.emit_tail_call();
        }
        self.emit_tail();
        if !self.callbacks.is_empty() {
            self.emit_callback_entry();
        }
        let table = self.emit_func_table();
        let mut code = self
            .ops
            .finalize()
            .map_err(|e| JitError::Codegen(format!("aarch64: {e}")))?;
        if let (Some(at), Some(table)) = (self.table_fixup, table) {
            // `adr x9, here` at `at - 4`: the table is `table - (at - 4)` bytes further.
            let dist = u32::try_from(table - (at - 4))
                .map_err(|_| JitError::Codegen("aarch64: code over 4 GiB".into()))?;
            let movz = 0xd280_0000 | ((dist & 0xffff) << 5) | u32::from(TMP);
            let movk = 0xf2a0_0000 | ((dist >> 16) << 5) | u32::from(TMP);
            code[at..at + 4].copy_from_slice(&movz.to_le_bytes());
            code[at + 4..at + 8].copy_from_slice(&movk.to_le_bytes());
        }
        // No inlined map calls on this backend.
        let map_helper_calls = self
            .prog
            .ops()
            .iter()
            .filter(|op| matches!(op, Some(bpftime_vm::isa::Op::Call { id: 1 | 2 })))
            .count();
        Ok(CompiledCode {
            arch: Arch::Aarch64,
            code,
            entry: ENTRY,
            insn_offsets,
            map_helper_calls,
            native_entry: None,
            native_refused: self
                .native
                .then(|| "native entries are generated for x86_64 only".to_string()),
            ctx_reads: u64::MAX,
        })
    }

    // ---- prologue and epilogue -------------------------------------------------------------

    /// The tail entry, then `extern "C" fn(r1 = x0, r2 = x1, ctx = x2) -> u64`.
    fn entry_prologue(&mut self) {
        let init = self.ops.new_dynamic_label();
        a64!(self.ops
            // Tail entry: the running program's frame, ctx (x26) and r1 stay; r2 = 0.
            ; mov x1, xzr
            ; b =>init
        );
        debug_assert_eq!(self.ops.offset().0, ENTRY);
        a64!(self.ops
            ; stp x29, x30, [sp, -(ENTRY_FRAME as i32)]!
            ; mov x29, sp
            ; stp x19, x20, [sp, 16]
            ; stp x21, x22, [sp, 32]
            ; stp x25, x26, [sp, 48]
            ; stp x27, x28, [sp, 64]
            ; stp x23, x24, [sp, 80]
            ; mov X(CTX), x2
            ; ldr X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; str X(ADDR), [sp, SAVED_SP_SLOT]
            ; mov XSP(ADDR), sp
            ; str X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; str wzr, [X(CTX), CTX_TRAP_KIND]
            ; =>init
        );
        if self.callbacks.is_empty() {
            a64!(self.ops ; str xzr, [X(CTX), CTX_FUNCS]);
        } else {
            // x9 = this instruction's address + the distance to the table (patched in
            // `compile`, once the table's offset is known).
            let here = self.ops.new_dynamic_label();
            a64!(self.ops ; =>here ; adr X(ADDR), =>here);
            self.table_fixup = Some(self.ops.offset().0);
            a64!(self.ops
                ; movz X(TMP), 0
                ; movk X(TMP), 0, lsl 16
                ; add X(ADDR), X(ADDR), X(TMP)
                ; str X(ADDR), [X(CTX), CTX_FUNCS]
            );
        }
        a64!(self.ops
            ; ldr X(FP), [X(CTX), CTX_FRAME_TOP]
            // The interpreter starts every register but r1, r2 and r10 at zero.
            ; mov X(R0), xzr
            ; mov x2, xzr
            ; mov x3, xzr
            ; mov x4, xzr
            ; mov x19, xzr
            ; mov x20, xzr
            ; mov x21, xzr
            ; mov x22, xzr
        );
        if self.checked {
            a64!(self.ops
                ; ldr X(STACK_LO), [X(CTX), CTX_STACK_LO]
                ; ldr X(FAST_START), [X(CTX), CTX_FAST_START]
                ; ldr X(FAST_LEN), [X(CTX), CTX_FAST_LEN]
                ; ldr X(FAST_WLEN), [X(CTX), CTX_FAST_WLEN]
            );
        }
    }

    /// Shared tail: the trap writer, the unwinder and the epilogue of the entry function.
    fn emit_tail(&mut self) {
        let (trap, unwind, epilogue) = (self.trap, self.unwind, self.epilogue);
        a64!(self.ops
            // In: w13 kind, w10 pc, x9 address/id/code, x11 length, x12 write.
            ; =>trap
            ; str W(TMP4), [X(CTX), CTX_TRAP_KIND]
            ; str W(TMP), [X(CTX), CTX_TRAP_PC]
            ; str X(ADDR), [X(CTX), CTX_TRAP_ADDR]
            ; str X(TMP2), [X(CTX), CTX_TRAP_LEN]
            ; str X(TMP3), [X(CTX), CTX_TRAP_WRITE]
            ; mov x0, xzr
            // In: x0 the return value; from any depth of bpf-to-bpf calls.
            ; =>unwind
            ; ldr X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; mov sp, XSP(ADDR)
            ; ldr X(ADDR), [sp, SAVED_SP_SLOT]
            ; str X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; =>epilogue
            ; ldp x23, x24, [sp, 80]
            ; ldp x27, x28, [sp, 64]
            ; ldp x25, x26, [sp, 48]
            ; ldp x21, x22, [sp, 32]
            ; ldp x19, x20, [sp, 16]
            ; ldp x29, x30, [sp], ENTRY_FRAME as i32
            ; ret
        );
    }

    /// The callback entry routine ([`crate::abi::CallbackEntry`]): x0 = the frame, x1 = the
    /// context. Same native frame as the host entry, so the unwinder serves both.
    fn emit_callback_entry(&mut self) {
        let (l, epilogue) = (self.callback_entry, self.epilogue);
        a64!(self.ops
            ; =>l
            ; stp x29, x30, [sp, -(ENTRY_FRAME as i32)]!
            ; mov x29, sp
            ; stp x19, x20, [sp, 16]
            ; stp x21, x22, [sp, 32]
            ; stp x25, x26, [sp, 48]
            ; stp x27, x28, [sp, 64]
            ; stp x23, x24, [sp, 80]
            ; mov X(CTX), x1
            ; ldr X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; str X(ADDR), [sp, SAVED_SP_SLOT]
            ; mov XSP(ADDR), sp
            ; str X(ADDR), [X(CTX), CTX_SAVED_SP]
        );
        if self.checked {
            a64!(self.ops
                ; ldr X(STACK_LO), [X(CTX), CTX_STACK_LO]
                ; ldr X(FAST_START), [X(CTX), CTX_FAST_START]
                ; ldr X(FAST_LEN), [X(CTX), CTX_FAST_LEN]
                ; ldr X(FAST_WLEN), [X(CTX), CTX_FAST_WLEN]
            );
        }
        a64!(self.ops
            ; mov X(CALL), x0
            ; ldr x17, [X(CALL), CB_TARGET]
            ; ldr X(FP), [X(CALL), CB_FP]
            ; ldp x0, x1, [X(CALL)]
            ; ldp x2, x3, [X(CALL), 16]
            ; ldr x4, [X(CALL), 32]
            ; mov X(R0), xzr
            ; mov x19, xzr
            ; mov x20, xzr
            ; mov x21, xzr
            ; mov x22, xzr
            ; blr x17
            ; mov x0, X(R0)
            ; ldr X(ADDR), [sp, SAVED_SP_SLOT]
            ; str X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; b =>epilogue
        );
    }

    /// The [`crate::abi::FuncTable`] at the end of the code (when there are callbacks); its
    /// offset.
    fn emit_func_table(&mut self) -> Option<usize> {
        if self.callbacks.is_empty() {
            return None;
        }
        while !self.ops.offset().0.is_multiple_of(8) {
            a64!(self.ops ; nop);
        }
        let table_off = self.ops.offset().0;
        let entry_off = self
            .ops
            .labels()
            .resolve_dynamic(self.callback_entry)
            .map_or(0, |o| o.0);
        let funcs = self.prog.functions();
        let entries: Vec<(usize, usize, usize)> = self
            .callbacks
            .iter()
            .filter_map(|&(pc, frames)| {
                let fi = funcs.binary_search(&pc).ok()?;
                Some((pc, self.func_offsets[fi], frames))
            })
            .collect();
        self.ops
            .extend(crate::abi::func_table_bytes(table_off, entry_off, &entries));
        Some(table_off)
    }

    /// `bpf_tail_call(r1 = ctx, r2 = map, r3 = index)`, entered with `bl` (every function saved
    /// lr). Falls through (returns, r0–r5 unchanged) when r2 names no table, the index is out
    /// of range, the run made [`MAX_TAIL_CALLS`] tail calls, or the slot is empty — counting
    /// the call before the slot test, as the kernel does; otherwise drops every frame down to
    /// the entry's and jumps to the target's tail entry.
    fn emit_tail_call(&mut self) {
        let (l, next, found, out, dynamic) = (
            self.tail_routine,
            self.ops.new_dynamic_label(),
            self.ops.new_dynamic_label(),
            self.ops.new_dynamic_label(),
            self.ops.new_dynamic_label(),
        );
        a64!(self.ops
            ; =>l
            ; ldr X(ADDR), [X(CTX), CTX_TAIL_TABLES]
            ; ldr X(TMP), [X(CTX), CTX_TAIL_TABLES_LEN]
            ; cbz X(TMP), =>dynamic
            ; =>next
            ; ldr X(TMP2), [X(ADDR), TT_MAP]
            ; cmp X(TMP2), x1
            ; b.eq =>found
            ; add XSP(ADDR), XSP(ADDR), TT_SIZE
            ; subs X(TMP), XSP(TMP), 1
            ; b.ne =>next
            ; =>dynamic
        );
        if let Some(h) = self.helpers.get(TAIL_CALL_ID).copied() {
            // No table for r2: the registered helper 12, which may start a tail call through
            // the env (`CallStatus::TailCall`). r1 (x0) and lr are kept across the call.
            let addr = (self.helper_addr)(TAIL_CALL_ID, &h);
            a64!(self.ops
                ; stp x0, x30, [sp, -16]!
                ; ldr X(ENV_ARG), [X(CTX), CTX_ENV]
            );
            self.mov_imm64(CALL, addr);
            a64!(self.ops
                ; blr X(CALL)
                ; mov X(R0), x0
                ; ldp x0, x30, [sp], 16
                ; ldr X(ADDR), [X(CTX), CTX_ENV]
                ; ldr W(TMP), [X(ADDR), ENV_STATUS]
                ; cmp WSP(TMP), STATUS_TAIL_CALL
                ; b.ne =>out
                ; str wzr, [X(ADDR), ENV_STATUS]
                ; ldr W(TMP), [X(ADDR), ENV_CALLBACK_DEPTH]
                ; cbnz W(TMP), =>out
                ; ldr X(CALL), [X(ADDR), ENV_TAIL_ENTRY]
                ; cbz X(CALL), =>out
                ; ldr X(ADDR), [X(CTX), CTX_SAVED_SP]
                ; mov sp, XSP(ADDR)
                ; br X(CALL)
            );
        }
        a64!(self.ops
            ; =>out
            ; ret
            ; =>found
            ; ldr X(TMP2), [X(CTX), CTX_ENV]
            ; ldr W(TMP2), [X(TMP2), ENV_CALLBACK_DEPTH]
            ; cbnz W(TMP2), =>out
            ; mov W(TMP), w2
            ; ldr X(TMP2), [X(ADDR), TT_LEN]
            ; cmp X(TMP), X(TMP2)
            ; b.hs =>out
            ; ldr X(TMP2), [X(CTX), CTX_TAIL_CALLS]
            ; cmp XSP(TMP2), MAX_TAIL_CALLS as u32
            ; b.hs =>out
            ; add XSP(TMP2), XSP(TMP2), 1
            ; str X(TMP2), [X(CTX), CTX_TAIL_CALLS]
            ; ldr X(ADDR), [X(ADDR), TT_SLOTS]
            ; ldr X(CALL), [X(ADDR), X(TMP), lsl 3]
            ; cbz X(CALL), =>out
            ; ldr X(ADDR), [X(CTX), CTX_SAVED_SP]
            ; mov sp, XSP(ADDR)
            ; br X(CALL)
        );
    }

    /// Loads the trap arguments and jumps to the trap writer (x9 must hold the address).
    fn trap_jump(&mut self, kind: u32, pc: usize, len: u32, write: bool) {
        let trap = self.trap;
        a64!(self.ops ; movz W(TMP4), kind);
        self.mov_imm32(TMP, pc as u32);
        a64!(self.ops
            ; movz X(TMP2), len
            ; movz X(TMP3), write as u32
            ; b =>trap
        );
    }

    fn emit_stubs(&mut self) {
        let stubs = std::mem::take(&mut self.stubs);
        for (label, stub) in stubs {
            a64!(self.ops ; =>label);
            match stub {
                Stub::Check {
                    pc,
                    len,
                    write,
                    resume,
                } => {
                    let skip = self.ops.new_dynamic_label();
                    let fail = self.ops.new_dynamic_label();
                    a64!(self.ops
                        // Keep eBPF r0–r5 and the address across the C call.
                        ; sub sp, sp, 64
                        ; stp x0, x1, [sp]
                        ; stp x2, x3, [sp, 16]
                        ; stp x4, X(R0), [sp, 32]
                        ; str X(ADDR), [sp, 48]
                        ; movz W(TMP), 0
                        ; ldr X(CALL), [X(CTX), CTX_CHECK]
                        ; cbz X(CALL), =>skip
                        ; ldr x0, [X(CTX), CTX_MEM]
                        ; mov x1, X(ADDR)
                        ; movz x2, len
                        ; movz x3, write as u32
                        ; blr X(CALL)
                        // A C `bool` return: only the low byte is defined.
                        ; and WSP(TMP), w0, 0xff
                        ; =>skip
                        ; ldr X(ADDR), [sp, 48]
                        ; ldp x4, X(R0), [sp, 32]
                        ; ldp x2, x3, [sp, 16]
                        ; ldp x0, x1, [sp]
                        ; add sp, sp, 64
                        ; cbz W(TMP), =>fail
                        ; b =>resume
                        ; =>fail
                    );
                    self.trap_jump(trap::OUT_OF_BOUNDS, pc, len, write);
                }
                Stub::Misaligned { pc, len } => {
                    self.trap_jump(trap::MISALIGNED, pc, len, false);
                }
                Stub::Status { pc, resume } => {
                    let exit = self.ops.new_dynamic_label();
                    let fault = self.ops.new_dynamic_label();
                    let trapped = self.ops.new_dynamic_label();
                    let unwind = self.unwind;
                    a64!(self.ops
                        ; cmp WSP(TMP), STATUS_EXIT
                        ; b.eq =>exit
                        ; cmp WSP(TMP), STATUS_FAULT
                        ; b.eq =>fault
                        // A callback trapped: the context holds its trap.
                        ; cmp WSP(TMP), STATUS_TRAPPED
                        ; b.eq =>trapped
                        // A tail call requested anywhere but `call 12`: dropped.
                        ; str wzr, [X(ADDR), ENV_STATUS]
                        ; b =>resume
                        ; =>exit
                        ; ldr x0, [X(ADDR), ENV_EXIT_VALUE]
                        ; b =>unwind
                        ; =>trapped
                        ; mov x0, xzr
                        ; b =>unwind
                        ; =>fault
                        ; ldr W(ADDR), [X(ADDR), ENV_FAULT_CODE]
                    );
                    self.trap_jump(trap::HELPER_FAULT, pc, 0, false);
                }
                Stub::UnknownHelper { pc } => {
                    self.trap_jump(trap::UNKNOWN_HELPER, pc, 0, false);
                }
            }
        }
    }

    // ---- small building blocks -------------------------------------------------------------

    fn target(&self, pc: usize, off: i64) -> DynamicLabel {
        // The verifier proved every target is an instruction start in the same function.
        self.labels[(pc as i64 + 1 + off) as usize]
    }

    fn b_cond_near(&mut self, c: Cond, l: DynamicLabel) {
        match c {
            Cond::Eq => a64!(self.ops ; b.eq =>l),
            Cond::Ne => a64!(self.ops ; b.ne =>l),
            Cond::Hs => a64!(self.ops ; b.hs =>l),
            Cond::Lo => a64!(self.ops ; b.lo =>l),
            Cond::Hi => a64!(self.ops ; b.hi =>l),
            Cond::Ls => a64!(self.ops ; b.ls =>l),
            Cond::Ge => a64!(self.ops ; b.ge =>l),
            Cond::Lt => a64!(self.ops ; b.lt =>l),
            Cond::Gt => a64!(self.ops ; b.gt =>l),
            Cond::Le => a64!(self.ops ; b.le =>l),
        }
    }

    /// `b.cond label`, through an inverted branch over a `b` when the code may be too large
    /// for `b.cond`'s reach.
    fn b_cond(&mut self, c: Cond, l: DynamicLabel) {
        if self.far {
            let skip = self.ops.new_dynamic_label();
            self.b_cond_near(c.invert(), skip);
            a64!(self.ops ; b =>l ; =>skip);
        } else {
            self.b_cond_near(c, l);
        }
    }

    fn stub(&mut self, cond: Cond, stub: Stub) {
        let label = self.ops.new_dynamic_label();
        self.stubs.push((label, stub));
        self.b_cond(cond, label);
    }

    /// `rd = v` (64-bit) in at most four instructions: movz or movn, then movk.
    pub(crate) fn mov_imm64(&mut self, rd: u8, v: u64) {
        let hw = |i: u32| ((v >> (16 * i)) & 0xffff) as u32;
        let zeros = (0..4).filter(|&i| hw(i) == 0).count();
        let ones = (0..4).filter(|&i| hw(i) == 0xffff).count();
        let inverted = ones > zeros;
        let skip = if inverted { 0xffff } else { 0 };
        let first = (0..4).find(|&i| hw(i) != skip).unwrap_or(0);
        let sh = 16 * first;
        if inverted {
            let imm = !hw(first) & 0xffff;
            a64!(self.ops ; movn X(rd), imm, lsl sh);
        } else {
            let imm = hw(first);
            a64!(self.ops ; movz X(rd), imm, lsl sh);
        }
        for i in (first + 1)..4 {
            if hw(i) != skip {
                let (imm, sh) = (hw(i), 16 * i);
                a64!(self.ops ; movk X(rd), imm, lsl sh);
            }
        }
    }

    /// `wd = v`, zero-extended into xd.
    pub(crate) fn mov_imm32(&mut self, rd: u8, v: u32) {
        let (lo, hi) = (v & 0xffff, v >> 16);
        if hi == 0xffff && lo != 0 {
            let imm = !lo & 0xffff;
            a64!(self.ops ; movn W(rd), imm);
        } else if lo == 0 {
            a64!(self.ops ; movz W(rd), hi, lsl 16);
        } else {
            a64!(self.ops ; movz W(rd), lo);
            if hi != 0 {
                a64!(self.ops ; movk W(rd), hi, lsl 16);
            }
        }
    }

    /// `rd = rn + imm` at the given width; `rn` must not be x10.
    fn add_imm(&mut self, w64: bool, rd: u8, rn: u8, imm: i64) {
        debug_assert_ne!(rn, TMP);
        match (w64, imm) {
            (true, 0..=4095) => a64!(self.ops ; add XSP(rd), XSP(rn), imm as u32),
            (true, -4095..=-1) => a64!(self.ops ; sub XSP(rd), XSP(rn), (-imm) as u32),
            (false, 0..=4095) => a64!(self.ops ; add WSP(rd), WSP(rn), imm as u32),
            (false, -4095..=-1) => a64!(self.ops ; sub WSP(rd), WSP(rn), (-imm) as u32),
            (true, _) => {
                self.mov_imm64(TMP, imm as u64);
                a64!(self.ops ; add X(rd), X(rn), X(TMP));
            }
            (false, _) => {
                self.mov_imm32(TMP, imm as u32);
                a64!(self.ops ; add W(rd), W(rn), W(TMP));
            }
        }
    }

    // ---- instructions ----------------------------------------------------------------------

    fn op(&mut self, pc: usize, op: Op, main: bool) -> Result<(), JitError> {
        match op {
            Op::Alu {
                width,
                op,
                dst,
                src,
            } => self.alu(width, op, host(dst), src),
            Op::Neg { width, dst } => {
                let d = host(dst);
                match width {
                    Width::W64 => a64!(self.ops ; neg X(d), X(d)),
                    Width::W32 => a64!(self.ops ; neg W(d), W(d)),
                }
            }
            Op::MovSx {
                width,
                dst,
                src,
                bits,
            } => {
                let (d, s) = (host(dst), host(src));
                match (width, bits) {
                    (Width::W64, 8) => a64!(self.ops ; sxtb X(d), W(s)),
                    (Width::W64, 16) => a64!(self.ops ; sxth X(d), W(s)),
                    (Width::W64, _) => a64!(self.ops ; sxtw X(d), W(s)),
                    (Width::W32, 8) => a64!(self.ops ; sxtb W(d), W(s)),
                    (Width::W32, _) => a64!(self.ops ; sxth W(d), W(s)),
                }
            }
            Op::Endian { kind, bits, dst } => {
                let d = host(dst);
                match (kind, bits) {
                    (Endian::Le, 16) => a64!(self.ops ; uxth W(d), W(d)),
                    (Endian::Le, 32) => a64!(self.ops ; mov W(d), W(d)),
                    (Endian::Le, _) => {}
                    (Endian::Be | Endian::Swap, 16) => {
                        a64!(self.ops ; rev16 W(d), W(d) ; uxth W(d), W(d))
                    }
                    (Endian::Be | Endian::Swap, 32) => a64!(self.ops ; rev W(d), W(d)),
                    (Endian::Be | Endian::Swap, _) => a64!(self.ops ; rev X(d), X(d)),
                }
            }
            Op::LdImm64 {
                dst,
                kind: LdImmKind::Func,
                lo,
                ..
            } => {
                let target = (pc as i64 + 1 + i64::from(lo)) as usize;
                self.mov_imm64(host(dst), bpftime_vm::helper::func_token(target));
            }
            Op::LdImm64 { dst, lo, hi, .. } => {
                self.mov_imm64(
                    host(dst),
                    u64::from(lo as u32) | (u64::from(hi as u32) << 32),
                );
            }
            Op::Load {
                size,
                signed,
                dst,
                src,
                off,
            } => {
                let m = match (size, signed) {
                    (Size::B, false) => MemOp::LdB,
                    (Size::H, false) => MemOp::LdH,
                    (Size::W, false) => MemOp::LdW,
                    (Size::DW, _) => MemOp::LdX,
                    (Size::B, true) => MemOp::LdSB,
                    (Size::H, true) => MemOp::LdSH,
                    (Size::W, true) => MemOp::LdSW,
                };
                self.mem(pc, m, host(dst), None, host(src), off, size);
            }
            Op::Store {
                size,
                dst,
                off,
                src,
            } => {
                let m = match size {
                    Size::B => MemOp::StB,
                    Size::H => MemOp::StH,
                    Size::W => MemOp::StW,
                    Size::DW => MemOp::StX,
                };
                let (rt, imm) = match src {
                    Src::Reg(r) => (host(r), None),
                    Src::Imm(0) => (ZR, None),
                    // Materialized after the address check, whose slow path clobbers x11.
                    Src::Imm(v) => (TMP2, Some(v as i64 as u64)),
                };
                self.mem(pc, m, rt, imm, host(dst), off, size);
            }
            Op::Atomic {
                size,
                op,
                fetch,
                dst,
                src,
                off,
            } => self.atomic(pc, size, op, fetch, host(dst), host(src), off),
            Op::Ja { off } => {
                let l = self.target(pc, off.into());
                a64!(self.ops ; b =>l);
            }
            Op::Jmp {
                width,
                cond,
                dst,
                src,
                off,
            } => {
                self.compare(width, cond, host(dst), src);
                let l = self.target(pc, off.into());
                self.b_cond(Cond::of(cond), l);
            }
            Op::Call { id } => self.call_helper(pc, id)?,
            Op::CallLocal { off } => {
                let target = (pc as i64 + 1 + i64::from(off)) as usize;
                let fi = self
                    .prog
                    .functions()
                    .binary_search(&target)
                    .map_err(|_| Self::unsupported(pc, "local call to a non-function"))?;
                let entry = self.func_entries[fi];
                a64!(self.ops
                    ; sub XSP(FP), XSP(FP), FRAME_SIZE as u32
                    ; bl =>entry
                    ; add XSP(FP), XSP(FP), FRAME_SIZE as u32
                );
            }
            Op::Callx { reg } => self.callx(pc, host(reg)),
            Op::Exit => {
                if main {
                    let epilogue = self.epilogue;
                    a64!(self.ops ; mov x0, X(R0) ; b =>epilogue);
                } else {
                    a64!(self.ops
                        ; ldp x19, x20, [sp, 16]
                        ; ldp x21, x22, [sp, 32]
                        ; ldp x29, x30, [sp], SUB_FRAME as i32
                        ; ret
                    );
                }
            }
        }
        Ok(())
    }

    fn alu(&mut self, width: Width, op: AluOp, d: u8, src: Src) {
        let w64 = width == Width::W64;
        let s = match src {
            Src::Reg(r) => host(r),
            Src::Imm(i) => {
                // RFC 9669 §4.1: the immediate is sign-extended for 64-bit operations and
                // taken as its low 32 bits for 32-bit ones.
                let v64 = i as i64 as u64;
                let v32 = i as u32;
                match op {
                    AluOp::Mov if w64 => return self.mov_imm64(d, v64),
                    AluOp::Mov => return self.mov_imm32(d, v32),
                    AluOp::Add => return self.add_imm(w64, d, d, i.into()),
                    AluOp::Sub => return self.add_imm(w64, d, d, -i64::from(i)),
                    AluOp::Lsh | AluOp::Rsh | AluOp::Arsh => {
                        return self.shift_imm(w64, op, d, v32);
                    }
                    AluOp::And | AluOp::Or | AluOp::Xor
                        if (w64 && encode_logical_immediate_64bit(v64).is_some())
                            || (!w64 && encode_logical_immediate_32bit(v32).is_some()) =>
                    {
                        return self.logic_imm(w64, op, d, v64);
                    }
                    _ => {
                        if w64 {
                            self.mov_imm64(TMP, v64);
                        } else {
                            self.mov_imm32(TMP, v32);
                        }
                        TMP
                    }
                }
            }
        };
        if w64 {
            self.alu64_reg(op, d, s);
        } else {
            self.alu32_reg(op, d, s);
        }
    }

    fn shift_imm(&mut self, w64: bool, op: AluOp, d: u8, amount: u32) {
        // RFC 9669 §4.1: the shift amount is masked to the operand width.
        if amount & if w64 { 63 } else { 31 } == 0 {
            // A shift by zero: the value, zero-extended for 32-bit operations.
            if !w64 {
                a64!(self.ops ; mov W(d), W(d));
            }
            return;
        }
        if w64 {
            let sh = amount & 63;
            match op {
                AluOp::Lsh => a64!(self.ops ; lsl X(d), X(d), sh),
                AluOp::Rsh => a64!(self.ops ; lsr X(d), X(d), sh),
                _ => a64!(self.ops ; asr X(d), X(d), sh),
            }
        } else {
            let sh = amount & 31;
            match op {
                AluOp::Lsh => a64!(self.ops ; lsl W(d), W(d), sh),
                AluOp::Rsh => a64!(self.ops ; lsr W(d), W(d), sh),
                _ => a64!(self.ops ; asr W(d), W(d), sh),
            }
        }
    }

    /// and/orr/eor with an encodable logical immediate.
    fn logic_imm(&mut self, w64: bool, op: AluOp, d: u8, v: u64) {
        if w64 {
            match op {
                AluOp::And => a64!(self.ops ; and XSP(d), X(d), v),
                AluOp::Or => a64!(self.ops ; orr XSP(d), X(d), v),
                _ => a64!(self.ops ; eor XSP(d), X(d), v),
            }
        } else {
            let v = v as u32;
            match op {
                AluOp::And => a64!(self.ops ; and WSP(d), W(d), v),
                AluOp::Or => a64!(self.ops ; orr WSP(d), W(d), v),
                _ => a64!(self.ops ; eor WSP(d), W(d), v),
            }
        }
    }

    fn alu64_reg(&mut self, op: AluOp, d: u8, s: u8) {
        // aarch64 udiv/sdiv give 0 for a zero divisor and MIN for MIN / -1, which is exactly
        // RFC 9669 §4.1; `msub` then gives the dividend for x % 0 and 0 for MIN % -1.
        match op {
            AluOp::Add => a64!(self.ops ; add X(d), X(d), X(s)),
            AluOp::Sub => a64!(self.ops ; sub X(d), X(d), X(s)),
            AluOp::Mul => a64!(self.ops ; mul X(d), X(d), X(s)),
            AluOp::Div => a64!(self.ops ; udiv X(d), X(d), X(s)),
            AluOp::SDiv => a64!(self.ops ; sdiv X(d), X(d), X(s)),
            AluOp::Mod => a64!(self.ops
                ; udiv X(TMP2), X(d), X(s)
                ; msub X(d), X(TMP2), X(s), X(d)
            ),
            AluOp::SMod => a64!(self.ops
                ; sdiv X(TMP2), X(d), X(s)
                ; msub X(d), X(TMP2), X(s), X(d)
            ),
            AluOp::Or => a64!(self.ops ; orr X(d), X(d), X(s)),
            AluOp::And => a64!(self.ops ; and X(d), X(d), X(s)),
            AluOp::Xor => a64!(self.ops ; eor X(d), X(d), X(s)),
            // Register shifts use the amount modulo 64 natively.
            AluOp::Lsh => a64!(self.ops ; lsl X(d), X(d), X(s)),
            AluOp::Rsh => a64!(self.ops ; lsr X(d), X(d), X(s)),
            AluOp::Arsh => a64!(self.ops ; asr X(d), X(d), X(s)),
            AluOp::Mov => a64!(self.ops ; mov X(d), X(s)),
        }
    }

    fn alu32_reg(&mut self, op: AluOp, d: u8, s: u8) {
        // Every write of a W register zero-extends into the X register (RFC 9669 §4.1).
        match op {
            AluOp::Add => a64!(self.ops ; add W(d), W(d), W(s)),
            AluOp::Sub => a64!(self.ops ; sub W(d), W(d), W(s)),
            AluOp::Mul => a64!(self.ops ; mul W(d), W(d), W(s)),
            AluOp::Div => a64!(self.ops ; udiv W(d), W(d), W(s)),
            AluOp::SDiv => a64!(self.ops ; sdiv W(d), W(d), W(s)),
            AluOp::Mod => a64!(self.ops
                ; udiv W(TMP2), W(d), W(s)
                ; msub W(d), W(TMP2), W(s), W(d)
            ),
            AluOp::SMod => a64!(self.ops
                ; sdiv W(TMP2), W(d), W(s)
                ; msub W(d), W(TMP2), W(s), W(d)
            ),
            AluOp::Or => a64!(self.ops ; orr W(d), W(d), W(s)),
            AluOp::And => a64!(self.ops ; and W(d), W(d), W(s)),
            AluOp::Xor => a64!(self.ops ; eor W(d), W(d), W(s)),
            AluOp::Lsh => a64!(self.ops ; lsl W(d), W(d), W(s)),
            AluOp::Rsh => a64!(self.ops ; lsr W(d), W(d), W(s)),
            AluOp::Arsh => a64!(self.ops ; asr W(d), W(d), W(s)),
            AluOp::Mov => a64!(self.ops ; mov W(d), W(s)),
        }
    }

    /// Sets the flags for a conditional jump (`cmp`, or `tst` for `jset`).
    fn compare(&mut self, width: Width, cond: JmpCond, d: u8, src: Src) {
        let w64 = width == Width::W64;
        let s = match src {
            Src::Reg(r) => host(r),
            Src::Imm(i) => {
                let v64 = i as i64 as u64;
                let v32 = i as u32;
                if cond == JmpCond::Set {
                    if w64 && encode_logical_immediate_64bit(v64).is_some() {
                        a64!(self.ops ; tst X(d), v64);
                        return;
                    }
                    if !w64 && encode_logical_immediate_32bit(v32).is_some() {
                        a64!(self.ops ; tst W(d), v32);
                        return;
                    }
                } else {
                    // `cmn x, #k` sets the same flags as `cmp x, #-k` for 0 < k < 4096.
                    let signed = if w64 {
                        i64::from(i)
                    } else {
                        i64::from(v32 as i32)
                    };
                    match (w64, signed) {
                        (true, 0..=4095) => {
                            return a64!(self.ops ; cmp XSP(d), signed as u32);
                        }
                        (true, -4095..=-1) => {
                            return a64!(self.ops ; cmn XSP(d), (-signed) as u32);
                        }
                        (false, 0..=4095) => {
                            return a64!(self.ops ; cmp WSP(d), signed as u32);
                        }
                        (false, -4095..=-1) => {
                            return a64!(self.ops ; cmn WSP(d), (-signed) as u32);
                        }
                        _ => {}
                    }
                }
                if w64 {
                    self.mov_imm64(TMP, v64);
                } else {
                    self.mov_imm32(TMP, v32);
                }
                TMP
            }
        };
        match (w64, cond == JmpCond::Set) {
            (true, false) => a64!(self.ops ; cmp X(d), X(s)),
            (true, true) => a64!(self.ops ; tst X(d), X(s)),
            (false, false) => a64!(self.ops ; cmp W(d), W(s)),
            (false, true) => a64!(self.ops ; tst W(d), W(s)),
        }
    }

    /// Checked mode: verifies `[x9, x9 + len)` like the interpreter — inline against the
    /// host's fast region (usually the memory block) and the stack, otherwise through
    /// `ctx.check` in a stub.
    fn check_access(&mut self, pc: usize, len: u32, write: bool) {
        let resume = self.ops.new_dynamic_label();
        let slow = self.ops.new_dynamic_label();
        self.stubs.push((
            slow,
            Stub::Check {
                pc,
                len,
                write,
                resume,
            },
        ));
        let fast_len = if write { FAST_WLEN } else { FAST_LEN };
        let stack_max = STACK_BYTES - len;
        a64!(self.ops
            // In the fast region iff off = addr - start <= fast_len and fast_len - off >= len
            // (wrap-free: `ccmp` only compares when the subtraction did not borrow).
            ; sub X(TMP), X(ADDR), X(FAST_START)
            ; subs X(TMP2), X(fast_len), X(TMP)
            ; ccmp X(TMP2), len, 0, hs
        );
        self.b_cond(Cond::Hs, resume);
        a64!(self.ops
            // In the stack iff addr - stack_lo <= 4096 - len.
            ; sub X(TMP), X(ADDR), X(STACK_LO)
            ; cmp XSP(TMP), stack_max
        );
        self.b_cond(Cond::Hi, slow);
        a64!(self.ops ; =>resume);
    }

    /// A load or store of `rt` (set to `imm` first when given) at `base + off`.
    #[allow(clippy::too_many_arguments)]
    fn mem(
        &mut self,
        pc: usize,
        m: MemOp,
        rt: u8,
        imm: Option<u64>,
        base: u8,
        off: i16,
        size: Size,
    ) {
        let len = size.bytes() as u32;
        let write = matches!(m, MemOp::StB | MemOp::StH | MemOp::StW | MemOp::StX);
        // r10 with a constant offset: the loader proved the access inside the frame.
        let mode = if self.checked && base != FP {
            self.add_imm(true, ADDR, base, off.into());
            self.check_access(pc, len, write);
            AddrMode::Scaled(ADDR, 0)
        } else {
            let o = i32::from(off);
            if o >= 0 && (o as u32).is_multiple_of(len) && (o as u32 / len) < 4096 {
                AddrMode::Scaled(base, o as u32)
            } else if (-256..256).contains(&o) {
                AddrMode::Unscaled(base, o)
            } else {
                self.mov_imm64(TMP, o as i64 as u64);
                AddrMode::Indexed(base, TMP)
            }
        };
        if let Some(v) = imm {
            self.mov_imm64(rt, v);
        }
        self.mem_insn(m, rt, mode);
    }

    fn mem_insn(&mut self, m: MemOp, t: u8, mode: AddrMode) {
        use AddrMode::*;
        use MemOp::*;
        match (m, mode) {
            (LdB, Scaled(n, o)) => a64!(self.ops ; ldrb W(t), [X(n), o]),
            (LdH, Scaled(n, o)) => a64!(self.ops ; ldrh W(t), [X(n), o]),
            (LdW, Scaled(n, o)) => a64!(self.ops ; ldr W(t), [X(n), o]),
            (LdX, Scaled(n, o)) => a64!(self.ops ; ldr X(t), [X(n), o]),
            (LdSB, Scaled(n, o)) => a64!(self.ops ; ldrsb X(t), [X(n), o]),
            (LdSH, Scaled(n, o)) => a64!(self.ops ; ldrsh X(t), [X(n), o]),
            (LdSW, Scaled(n, o)) => a64!(self.ops ; ldrsw X(t), [X(n), o]),
            (StB, Scaled(n, o)) => a64!(self.ops ; strb W(t), [X(n), o]),
            (StH, Scaled(n, o)) => a64!(self.ops ; strh W(t), [X(n), o]),
            (StW, Scaled(n, o)) => a64!(self.ops ; str W(t), [X(n), o]),
            (StX, Scaled(n, o)) => a64!(self.ops ; str X(t), [X(n), o]),
            (LdB, Unscaled(n, o)) => a64!(self.ops ; ldurb W(t), [X(n), o]),
            (LdH, Unscaled(n, o)) => a64!(self.ops ; ldurh W(t), [X(n), o]),
            (LdW, Unscaled(n, o)) => a64!(self.ops ; ldur W(t), [X(n), o]),
            (LdX, Unscaled(n, o)) => a64!(self.ops ; ldur X(t), [X(n), o]),
            (LdSB, Unscaled(n, o)) => a64!(self.ops ; ldursb X(t), [X(n), o]),
            (LdSH, Unscaled(n, o)) => a64!(self.ops ; ldursh X(t), [X(n), o]),
            (LdSW, Unscaled(n, o)) => a64!(self.ops ; ldursw X(t), [X(n), o]),
            (StB, Unscaled(n, o)) => a64!(self.ops ; sturb W(t), [X(n), o]),
            (StH, Unscaled(n, o)) => a64!(self.ops ; sturh W(t), [X(n), o]),
            (StW, Unscaled(n, o)) => a64!(self.ops ; stur W(t), [X(n), o]),
            (StX, Unscaled(n, o)) => a64!(self.ops ; stur X(t), [X(n), o]),
            (LdB, Indexed(n, i)) => a64!(self.ops ; ldrb W(t), [X(n), X(i)]),
            (LdH, Indexed(n, i)) => a64!(self.ops ; ldrh W(t), [X(n), X(i)]),
            (LdW, Indexed(n, i)) => a64!(self.ops ; ldr W(t), [X(n), X(i)]),
            (LdX, Indexed(n, i)) => a64!(self.ops ; ldr X(t), [X(n), X(i)]),
            (LdSB, Indexed(n, i)) => a64!(self.ops ; ldrsb X(t), [X(n), X(i)]),
            (LdSH, Indexed(n, i)) => a64!(self.ops ; ldrsh X(t), [X(n), X(i)]),
            (LdSW, Indexed(n, i)) => a64!(self.ops ; ldrsw X(t), [X(n), X(i)]),
            (StB, Indexed(n, i)) => a64!(self.ops ; strb W(t), [X(n), X(i)]),
            (StH, Indexed(n, i)) => a64!(self.ops ; strh W(t), [X(n), X(i)]),
            (StW, Indexed(n, i)) => a64!(self.ops ; str W(t), [X(n), X(i)]),
            (StX, Indexed(n, i)) => a64!(self.ops ; str X(t), [X(n), X(i)]),
        }
    }

    /// RFC 9669 §5.3 atomics with ARMv8.1 LSE instructions (`*al`: sequentially consistent,
    /// like the interpreter's `SeqCst`). `and` is `ldclr` of the complement.
    #[allow(clippy::too_many_arguments)]
    fn atomic(
        &mut self,
        pc: usize,
        size: Size,
        op: AtomicOp,
        fetch: bool,
        base: u8,
        s: u8,
        off: i16,
    ) {
        let len = size.bytes() as u32;
        self.add_imm(true, ADDR, base, off.into());
        if self.checked {
            if base != FP {
                self.check_access(pc, len, true);
            }
            let mask = u64::from(len - 1);
            a64!(self.ops ; tst X(ADDR), mask);
            self.stub(Cond::Ne, Stub::Misaligned { pc, len });
        }
        // Non-fetch forms discard the old value into the zero register.
        let t = if fetch { s } else { ZR };
        match (size, op) {
            (Size::DW, AtomicOp::Add) => a64!(self.ops ; ldaddal X(s), X(t), [X(ADDR)]),
            (Size::DW, AtomicOp::Or) => a64!(self.ops ; ldsetal X(s), X(t), [X(ADDR)]),
            (Size::DW, AtomicOp::Xor) => a64!(self.ops ; ldeoral X(s), X(t), [X(ADDR)]),
            (Size::DW, AtomicOp::And) => a64!(self.ops
                ; mvn X(TMP), X(s)
                ; ldclral X(TMP), X(t), [X(ADDR)]
            ),
            (Size::DW, AtomicOp::Xchg) => a64!(self.ops ; swpal X(s), X(s), [X(ADDR)]),
            (Size::DW, AtomicOp::CmpXchg) => {
                a64!(self.ops ; casal X(R0), X(s), [X(ADDR)])
            }
            (_, AtomicOp::Add) => a64!(self.ops ; ldaddal W(s), W(t), [X(ADDR)]),
            (_, AtomicOp::Or) => a64!(self.ops ; ldsetal W(s), W(t), [X(ADDR)]),
            (_, AtomicOp::Xor) => a64!(self.ops ; ldeoral W(s), W(t), [X(ADDR)]),
            (_, AtomicOp::And) => a64!(self.ops
                ; mvn W(TMP), W(s)
                ; ldclral W(TMP), W(t), [X(ADDR)]
            ),
            (_, AtomicOp::Xchg) => a64!(self.ops ; swpal W(s), W(s), [X(ADDR)]),
            (_, AtomicOp::CmpXchg) => a64!(self.ops ; casal W(R0), W(s), [X(ADDR)]),
        }
    }

    /// After a helper that may stop the program: continue, exit with `env.exit_value`, or trap.
    fn status_check(&mut self, pc: usize) {
        let resume = self.ops.new_dynamic_label();
        a64!(self.ops
            ; ldr X(ADDR), [X(CTX), CTX_ENV]
            ; ldr W(TMP), [X(ADDR), ENV_STATUS]
            ; cmp WSP(TMP), 0
        );
        self.stub(Cond::Ne, Stub::Status { pc, resume });
        a64!(self.ops ; =>resume);
    }

    fn call_helper(&mut self, pc: usize, id: u32) -> Result<(), JitError> {
        let h = *self
            .helpers
            .get(id)
            .ok_or_else(|| Self::unsupported(pc, format!("call to unregistered helper {id}")))?;
        if id == TAIL_CALL_ID {
            self.uses_tail = true;
            let l = self.tail_routine;
            a64!(self.ops ; bl =>l);
            if h.may_stop {
                self.status_check(pc);
            }
            return Ok(());
        }
        let addr = (self.helper_addr)(id, &h);
        if h.calls_back {
            a64!(self.ops ; str X(FP), [X(CTX), CTX_CUR_FP]);
        }
        a64!(self.ops ; ldr X(ENV_ARG), [X(CTX), CTX_ENV]);
        self.mov_imm64(CALL, addr);
        a64!(self.ops
            ; blr X(CALL)
            ; mov X(R0), x0
        );
        if h.calls_back {
            a64!(self.ops ; str xzr, [X(CTX), CTX_CUR_FP]);
        }
        if h.may_stop {
            self.status_check(pc);
        }
        Ok(())
    }

    fn callx(&mut self, pc: usize, reg: u8) {
        let unknown = self.ops.new_dynamic_label();
        self.stubs.push((unknown, Stub::UnknownHelper { pc }));
        a64!(self.ops
            ; mov X(ADDR), X(reg)
            ; ldr X(TMP), [X(CTX), CTX_HELPERS_LEN]
            ; cmp X(ADDR), X(TMP)
        );
        self.b_cond(Cond::Hs, unknown);
        a64!(self.ops
            ; ldr X(TMP2), [X(CTX), CTX_HELPERS]
            ; ldr X(CALL), [X(TMP2), X(ADDR), lsl 3]
            ; cmp XSP(CALL), 0
        );
        self.b_cond(Cond::Eq, unknown);
        a64!(self.ops
            ; ldr X(ENV_ARG), [X(CTX), CTX_ENV]
            // The target may call back (its registration is not known here).
            ; str X(FP), [X(CTX), CTX_CUR_FP]
            ; blr X(CALL)
            ; mov X(R0), x0
            ; str xzr, [X(CTX), CTX_CUR_FP]
        );
        // The table does not say which helpers may stop: always look at the status.
        self.status_check(pc);
    }
}

/// `BPF_FUNC_tail_call`.
const TAIL_CALL_ID: u32 = 12;

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a sequence of MOVZ/MOVN/MOVK words (the only ones `mov_imm*` emit) on one
    /// register, as the architecture defines them.
    fn eval_moves(code: &[u8]) -> u64 {
        let mut x = 0u64;
        for w in code.chunks(4) {
            let w = u32::from_le_bytes(w.try_into().unwrap());
            let sf = w >> 31;
            let opc = (w >> 29) & 3;
            assert_eq!((w >> 23) & 0x3f, 0b100101, "not a move-wide: {w:#010x}");
            let shift = 16 * ((w >> 21) & 3);
            let imm = u64::from((w >> 5) & 0xffff) << shift;
            x = match opc {
                0b00 => !imm,                           // movn
                0b10 => imm,                            // movz
                0b11 => (x & !(0xffff << shift)) | imm, // movk
                _ => panic!("bad opc in {w:#010x}"),
            };
            if sf == 0 {
                x &= 0xffff_ffff;
            }
        }
        x
    }

    #[test]
    fn mov_imm64_materializes_every_value_in_at_most_four_moves() {
        let helpers = HelperRegistry::new();
        let prog =
            bpftime_vm::verifier::verify(&[bpftime_vm::isa::Insn::new(0x95, 0, 0, 0, 0)], &helpers)
                .unwrap();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut values = vec![0, 1, u64::MAX, 0xffff, 0xffff_0000, 1 << 63, 0x8000_0000];
        for _ in 0..20_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Mix in runs of zero and one halfwords.
            let mask = seed >> 60;
            let mut v = seed.rotate_left(17);
            for i in 0..4 {
                if mask & (1 << i) != 0 {
                    v = if seed & (1 << (i + 8)) != 0 {
                        v | (0xffff << (16 * i))
                    } else {
                        v & !(0xffff << (16 * i))
                    };
                }
            }
            values.push(v);
        }
        for v in values {
            let mut e = Emitter::new(&prog, &helpers, &|_, _| 0, &JitOptions::default());
            e.mov_imm64(9, v);
            let code = e.ops.finalize().unwrap();
            assert!(code.len() <= 16, "{v:#x}: {} words", code.len() / 4);
            assert_eq!(eval_moves(&code), v, "{v:#x}");
            let mut e = Emitter::new(&prog, &helpers, &|_, _| 0, &JitOptions::default());
            e.mov_imm32(9, v as u32);
            let code = e.ops.finalize().unwrap();
            assert!(code.len() <= 8, "{v:#x}: {} words", code.len() / 4);
            assert_eq!(eval_moves(&code), u64::from(v as u32), "{:#x}", v as u32);
        }
    }

    #[test]
    fn inverted_conditions_are_the_complements() {
        use Cond::*;
        for c in [Eq, Ne, Hs, Lo, Hi, Ls, Ge, Lt, Gt, Le] {
            assert_ne!(c.invert(), c);
            assert_eq!(c.invert().invert(), c);
        }
    }
}
