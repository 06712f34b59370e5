//! Structural loader checks ("verifier"): everything that can be decided about a program
//! without tracking register types. A [`Program`] exists only after these pass, and the
//! interpreter and JIT rely on them:
//!
//! - every slot decodes ([`crate::isa::decode`]: known opcode, unused fields zero, registers
//!   r0–r10, well-formed `lddw`);
//! - no instruction writes r10;
//! - every jump stays inside its function and lands on an instruction, never on the second
//!   slot of an `lddw`; no path falls off the end of a function;
//! - every local call targets the start of a function; the call graph has no recursion and
//!   nests at most [`MAX_CALL_DEPTH`] frames;
//! - every `lddw rX, func f` (`BPF_PSEUDO_FUNC`) names an instruction other than the entry,
//!   which becomes the start of a function (a *callback*, which helpers such as `bpf_loop`
//!   call); it counts as a call of `f` from the function holding the `lddw` in the call graph,
//!   and no callback may reach itself;
//! - every helper called by id is registered with the host;
//! - stack accesses through r10 with a constant offset stay inside the 512-byte frame;
//! - an `exit` is reachable from the entry; at most [`MAX_INSNS`] slots.
//!
//! Memory safety of accesses through other registers is *not* decided here: the interpreter
//! checks every access at run time (see [`crate::interpreter`]).

use crate::disasm;
use crate::helper::HelperRegistry;
use crate::isa::{DecodeError, FRAME_REG, Insn, LdImmKind, Op, decode};
use std::collections::BTreeSet;

/// Largest program accepted, in slots (the kernel's `BPF_COMPLEXITY_LIMIT_INSNS`).
pub const MAX_INSNS: usize = 1_000_000;
/// Deepest bpf-to-bpf call nesting, counting the entry frame (the kernel's `MAX_CALL_FRAMES`).
pub const MAX_CALL_DEPTH: usize = 8;
/// Stack bytes per frame.
pub const STACK_SIZE: usize = 512;

/// Why a program was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyErrorKind {
    /// No instructions.
    #[error("program is empty")]
    Empty,
    /// Over [`MAX_INSNS`].
    #[error("program has {len} instructions, more than the limit of {max}")]
    TooLarge {
        /// Slots.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The slot is not a valid instruction.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The instruction writes the read-only frame pointer.
    #[error("frame pointer r10 is read only")]
    WritesFramePointer,
    /// A jump leaves the program or its function.
    #[error("jump out of range to {target}")]
    JumpOutOfRange {
        /// Target slot (may be negative).
        target: i64,
    },
    /// A jump lands on the second slot of an `lddw`.
    #[error("jump into the middle of lddw at {target}")]
    JumpIntoLddw {
        /// Target slot.
        target: usize,
    },
    /// A local call does not target an instruction.
    #[error("call to {target} is out of range")]
    CallOutOfRange {
        /// Target slot.
        target: i64,
    },
    /// A path runs past the last instruction of its function.
    #[error("last instruction of a function must be exit or jump; execution falls through")]
    FallsThrough,
    /// No `exit` can be reached from the entry.
    #[error("no exit is reachable")]
    NoExit,
    /// The call graph has a cycle.
    #[error("recursive call to function at {target}")]
    Recursion {
        /// Function entry.
        target: usize,
    },
    /// The call graph nests too deep.
    #[error("call stack of {depth} frames is too deep (limit {max})")]
    CallTooDeep {
        /// Frames.
        depth: usize,
        /// Limit.
        max: usize,
    },
    /// A helper the host does not provide (wording follows the kernel's verifier log).
    #[error("invalid func unknown#{id}")]
    UnknownHelper {
        /// Helper id.
        id: u32,
    },
    /// An r10-relative access outside the frame.
    #[error("invalid stack access off={off} size={size}")]
    StackOutOfBounds {
        /// Offset from r10.
        off: i64,
        /// Access size.
        size: usize,
    },
    /// `lddw rX, func f` names no valid function start.
    #[error("invalid callback reference to {target}")]
    BadFunc {
        /// Target slot (may be negative).
        target: i64,
    },
    /// A map/BTF reference that the runtime has not resolved.
    #[error("unresolved {kind:?} reference in lddw; load the program through the runtime")]
    UnresolvedPseudo {
        /// The pseudo kind.
        kind: LdImmKind,
    },
}

/// A rejection, with where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pc {pc}: {kind} ({text})")]
pub struct VerifyError {
    /// Slot index of the offending instruction.
    pub pc: usize,
    /// Reason.
    pub kind: VerifyErrorKind,
    /// Disassembly of the offending instruction (raw fields when it does not decode).
    pub text: String,
}

impl VerifyError {
    fn new(insns: &[Insn], pc: usize, kind: VerifyErrorKind) -> Self {
        let text = insns
            .get(pc)
            .map(|_| disasm::disassemble_at(insns, pc))
            .unwrap_or_default();
        VerifyError { pc, kind, text }
    }

    /// The rejection as a kernel-style verifier log, as loaders (bpftrace) read it.
    pub fn log(&self) -> String {
        format!("{}: {}\n{}\n", self.pc, self.text, self.kind)
    }
}

/// Options for [`verify_with`].
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Largest program in slots.
    pub max_insns: usize,
    /// Accept `lddw` pseudo forms (map fd, map value, …) as plain immediates. The runtime
    /// resolves them first; tests of the instruction model may accept them as-is.
    pub allow_pseudo_lddw: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            max_insns: MAX_INSNS,
            allow_pseudo_lddw: false,
        }
    }
}

/// A program that passed the loader checks.
#[derive(Debug, Clone)]
pub struct Program {
    insns: Vec<Insn>,
    ops: Vec<Option<Op>>,
    functions: Vec<usize>,
    /// Entries of the functions named by `lddw rX, func f`, sorted, with the frames each one's
    /// call tree needs (itself included).
    callbacks: Vec<(usize, usize)>,
}

impl Program {
    /// The instruction slots.
    pub fn insns(&self) -> &[Insn] {
        &self.insns
    }
    /// The decoded instruction at each slot (`None` for the second slot of `lddw`).
    pub fn ops(&self) -> &[Option<Op>] {
        &self.ops
    }
    /// Entry slots of the functions, sorted; `functions()[0] == 0` is the main function.
    pub fn functions(&self) -> &[usize] {
        &self.functions
    }
    /// The functions `lddw rX, func f` names (callbacks), by entry slot, sorted.
    pub fn callbacks(&self) -> impl Iterator<Item = usize> + '_ {
        self.callbacks.iter().map(|c| c.0)
    }
    /// When `pc` is the entry of a callback: the frames its call tree needs, itself included.
    pub fn callback_frames(&self, pc: usize) -> Option<usize> {
        self.callbacks
            .binary_search_by_key(&pc, |c| c.0)
            .ok()
            .map(|i| self.callbacks[i].1)
    }
    /// Number of slots.
    pub fn len(&self) -> usize {
        self.insns.len()
    }
    /// Never true for a verified program.
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }
}

/// Checks `insns` with default options.
pub fn verify(insns: &[Insn], helpers: &HelperRegistry) -> Result<Program, VerifyError> {
    verify_with(insns, helpers, &VerifyOptions::default())
}

/// Checks `insns` with `opts`.
pub fn verify_with(
    insns: &[Insn],
    helpers: &HelperRegistry,
    opts: &VerifyOptions,
) -> Result<Program, VerifyError> {
    let err = |pc: usize, kind: VerifyErrorKind| Err(VerifyError::new(insns, pc, kind));
    if insns.is_empty() {
        return Err(VerifyError {
            pc: 0,
            kind: VerifyErrorKind::Empty,
            text: String::new(),
        });
    }
    if insns.len() > opts.max_insns {
        return Err(VerifyError {
            pc: 0,
            kind: VerifyErrorKind::TooLarge {
                len: insns.len(),
                max: opts.max_insns,
            },
            text: String::new(),
        });
    }

    // Pass 1: decode every instruction, per-instruction checks, collect function entries.
    let n = insns.len();
    let mut ops: Vec<Option<Op>> = vec![None; n];
    let mut functions = BTreeSet::from([0usize]);
    let mut callbacks = BTreeSet::new();
    let mut pc = 0;
    while pc < n {
        let op = match decode(insns, pc) {
            Ok(op) => op,
            Err(e) => return err(pc, e.into()),
        };
        if writes_frame_pointer(&op) {
            return err(pc, VerifyErrorKind::WritesFramePointer);
        }
        match op {
            Op::Call { id } if !helpers.contains(id) => {
                return err(pc, VerifyErrorKind::UnknownHelper { id });
            }
            Op::CallLocal { off } => {
                let target = pc as i64 + 1 + off as i64;
                if target < 0 || target >= n as i64 {
                    return err(pc, VerifyErrorKind::CallOutOfRange { target });
                }
                functions.insert(target as usize);
            }
            Op::LdImm64 {
                kind: LdImmKind::Func,
                lo,
                hi,
                ..
            } => {
                let target = pc as i64 + 1 + i64::from(lo);
                if hi != 0 || target <= 0 || target >= n as i64 {
                    return err(pc, VerifyErrorKind::BadFunc { target });
                }
                functions.insert(target as usize);
                callbacks.insert(target as usize);
            }
            Op::LdImm64 { kind, .. } if kind != LdImmKind::Imm64 && !opts.allow_pseudo_lddw => {
                return err(pc, VerifyErrorKind::UnresolvedPseudo { kind });
            }
            Op::Load {
                src: base,
                off,
                size,
                ..
            }
            | Op::Store {
                dst: base,
                off,
                size,
                ..
            }
            | Op::Atomic {
                dst: base,
                off,
                size,
                ..
            } if base == FRAME_REG => {
                let off = i64::from(off);
                if off < -(STACK_SIZE as i64) || off + size.bytes() as i64 > 0 {
                    return err(
                        pc,
                        VerifyErrorKind::StackOutOfBounds {
                            off,
                            size: size.bytes(),
                        },
                    );
                }
            }
            _ => {}
        }
        ops[pc] = Some(op);
        pc += op.slots();
    }
    let functions: Vec<usize> = functions.into_iter().collect();
    for (pc, op) in ops.iter().enumerate() {
        if let Some(Op::CallLocal { off }) = op {
            let target = (pc as i64 + 1 + *off as i64) as usize;
            if ops[target].is_none() {
                return err(pc, VerifyErrorKind::JumpIntoLddw { target });
            }
        }
        if let Some(Op::LdImm64 {
            kind: LdImmKind::Func,
            lo,
            ..
        }) = op
        {
            let target = pc as i64 + 1 + i64::from(*lo);
            if ops[target as usize].is_none() {
                return err(pc, VerifyErrorKind::BadFunc { target });
            }
        }
    }

    // Pass 2: control flow inside each function.
    let func_end = |f: usize| -> usize {
        let i = functions.partition_point(|&s| s <= f);
        functions.get(i).copied().unwrap_or(n)
    };
    let mut calls: Vec<Vec<usize>> = vec![Vec::new(); functions.len()];
    let mut exit_reachable = false;
    for (fi, &start) in functions.iter().enumerate() {
        let end = func_end(start);
        if ops[start].is_none() {
            return err(start, VerifyErrorKind::JumpIntoLddw { target: start });
        }
        // Walk reachable instructions of this function.
        let mut seen = vec![false; end - start];
        let mut stack = vec![start];
        while let Some(pc) = stack.pop() {
            if seen[pc - start] {
                continue;
            }
            seen[pc - start] = true;
            let op = ops[pc].expect("walk only visits instruction starts");
            let next = pc + op.slots();
            let push = |target: i64, stack: &mut Vec<usize>| -> Result<(), VerifyError> {
                if target < start as i64 || target >= end as i64 {
                    return Err(VerifyError::new(
                        insns,
                        pc,
                        VerifyErrorKind::JumpOutOfRange { target },
                    ));
                }
                let t = target as usize;
                if ops[t].is_none() {
                    return Err(VerifyError::new(
                        insns,
                        pc,
                        VerifyErrorKind::JumpIntoLddw { target: t },
                    ));
                }
                stack.push(t);
                Ok(())
            };
            match op {
                Op::Exit => {
                    if fi == 0 {
                        exit_reachable = true;
                    }
                }
                Op::Ja { off } => push(pc as i64 + 1 + off as i64, &mut stack)?,
                Op::Jmp { off, .. } => {
                    push(pc as i64 + 1 + off as i64, &mut stack)?;
                    if next >= end {
                        return err(pc, VerifyErrorKind::FallsThrough);
                    }
                    stack.push(next);
                }
                _ => {
                    let callee = match op {
                        Op::CallLocal { off } => Some(pc as i64 + 1 + i64::from(off)),
                        Op::LdImm64 {
                            kind: LdImmKind::Func,
                            lo,
                            ..
                        } => Some(pc as i64 + 1 + i64::from(lo)),
                        _ => None,
                    };
                    if let Some(target) = callee {
                        let ti = functions
                            .binary_search(&(target as usize))
                            .expect("collected in pass 1");
                        calls[fi].push(ti);
                    }
                    if next >= end {
                        return err(pc, VerifyErrorKind::FallsThrough);
                    }
                    stack.push(next);
                }
            }
        }
    }
    if !exit_reachable {
        return err(0, VerifyErrorKind::NoExit);
    }

    // Pass 3: call graph depth and recursion (DFS from main).
    fn depth(
        f: usize,
        calls: &[Vec<usize>],
        on_path: &mut Vec<bool>,
        memo: &mut Vec<Option<usize>>,
    ) -> Result<usize, usize> {
        if let Some(d) = memo[f] {
            return Ok(d);
        }
        if on_path[f] {
            return Err(f);
        }
        on_path[f] = true;
        let mut d = 1;
        for &c in &calls[f] {
            d = d.max(1 + depth(c, calls, on_path, memo)?);
        }
        on_path[f] = false;
        memo[f] = Some(d);
        Ok(d)
    }
    let mut memo = vec![None; functions.len()];
    let mut on_path = vec![false; functions.len()];
    match depth(0, &calls, &mut on_path, &mut memo) {
        Err(fi) => {
            return err(
                functions[fi],
                VerifyErrorKind::Recursion {
                    target: functions[fi],
                },
            );
        }
        Ok(d) if d > MAX_CALL_DEPTH => {
            return err(
                0,
                VerifyErrorKind::CallTooDeep {
                    depth: d,
                    max: MAX_CALL_DEPTH,
                },
            );
        }
        Ok(_) => {}
    }

    // Callbacks: a helper may call any of them from anywhere (the token is a value), so each
    // one's tree is checked for recursion, and its depth kept for the engines' run-time check.
    let mut cbs = Vec::with_capacity(callbacks.len());
    for &target in &callbacks {
        let fi = functions
            .binary_search(&target)
            .expect("collected in pass 1");
        match depth(fi, &calls, &mut on_path, &mut memo) {
            Err(fi) => {
                return err(
                    functions[fi],
                    VerifyErrorKind::Recursion {
                        target: functions[fi],
                    },
                );
            }
            Ok(d) => cbs.push((target, d)),
        }
    }

    Ok(Program {
        insns: insns.to_vec(),
        ops,
        functions,
        callbacks: cbs,
    })
}

fn writes_frame_pointer(op: &Op) -> bool {
    let mut writes = false;
    op.written_regs(|r| writes |= r == FRAME_REG);
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opcode::*;

    fn v(insns: &[Insn]) -> Result<Program, VerifyError> {
        verify(insns, &crate::helper::conformance_helpers())
    }
    const EXIT_I: Insn = Insn::new(EXIT, 0, 0, 0, 0);
    const MOV0: Insn = Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 0);

    #[test]
    fn empty_program_is_rejected() {
        assert_eq!(v(&[]).unwrap_err().kind, VerifyErrorKind::Empty);
    }

    #[test]
    fn write_to_r10_is_rejected() {
        let p = [Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 10, 0, 0, 0), EXIT_I];
        assert_eq!(v(&p).unwrap_err().kind, VerifyErrorKind::WritesFramePointer);
    }

    #[test]
    fn jump_past_end_is_rejected() {
        let p = [Insn::new(JA, 0, 0, 5, 0), EXIT_I];
        let e = v(&p).unwrap_err();
        assert_eq!(e.pc, 0);
        assert_eq!(e.kind, VerifyErrorKind::JumpOutOfRange { target: 6 });
    }

    #[test]
    fn jump_into_lddw_is_rejected() {
        let p = [
            Insn::new(JA, 0, 0, 1, 0),
            Insn::new(LDDW, 0, 0, 0, 1),
            Insn::new(0, 0, 0, 0, 2),
            EXIT_I,
        ];
        assert_eq!(
            v(&p).unwrap_err().kind,
            VerifyErrorKind::JumpIntoLddw { target: 2 }
        );
    }

    #[test]
    fn falling_off_the_end_is_rejected() {
        assert_eq!(v(&[MOV0]).unwrap_err().kind, VerifyErrorKind::FallsThrough);
    }

    #[test]
    fn infinite_loop_without_exit_is_rejected() {
        let p = [Insn::new(JA, 0, 0, -1, 0), EXIT_I];
        assert_eq!(v(&p).unwrap_err().kind, VerifyErrorKind::NoExit);
    }

    #[test]
    fn unknown_helper_is_rejected_with_kernel_wording() {
        let p = [Insn::new(CALL, 0, 0, 0, 77), EXIT_I];
        let e = v(&p).unwrap_err();
        assert_eq!(e.kind, VerifyErrorKind::UnknownHelper { id: 77 });
        assert!(e.log().contains("invalid func "));
    }

    #[test]
    fn recursion_is_rejected() {
        // main: call f; exit.  f: call f; exit.
        let p = [
            Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, 1),
            EXIT_I,
            Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, -1),
            EXIT_I,
        ];
        assert!(matches!(
            v(&p).unwrap_err().kind,
            VerifyErrorKind::Recursion { .. }
        ));
    }

    #[test]
    fn call_chain_of_nine_frames_is_rejected_and_eight_accepted() {
        let chain = |frames: usize| {
            let mut p = Vec::new();
            for _ in 0..frames - 1 {
                p.push(Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, 1));
                p.push(EXIT_I);
            }
            p.push(MOV0);
            p.push(EXIT_I);
            p
        };
        assert!(v(&chain(8)).is_ok());
        assert_eq!(
            v(&chain(9)).unwrap_err().kind,
            VerifyErrorKind::CallTooDeep { depth: 9, max: 8 }
        );
    }

    #[test]
    fn jump_across_functions_is_rejected() {
        let p = [
            Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, 1),
            Insn::new(JA, 0, 0, 0, 0),
            MOV0,
            EXIT_I,
        ];
        // pc 1 jumps to 2 which is the start of the callee: outside main.
        assert!(matches!(
            v(&p).unwrap_err().kind,
            VerifyErrorKind::JumpOutOfRange { .. }
        ));
    }

    #[test]
    fn stack_access_outside_frame_is_rejected() {
        let p = [
            Insn::new(BPF_STX | BPF_MEM | BPF_DW, 10, 0, -516, 0),
            MOV0,
            EXIT_I,
        ];
        assert!(matches!(
            v(&p).unwrap_err().kind,
            VerifyErrorKind::StackOutOfBounds { .. }
        ));
        let p = [
            Insn::new(BPF_STX | BPF_MEM | BPF_DW, 10, 0, -512, 0),
            MOV0,
            EXIT_I,
        ];
        assert!(v(&p).is_ok());
    }

    #[test]
    fn oversized_program_is_rejected() {
        let p = vec![EXIT_I; MAX_INSNS + 1];
        assert!(matches!(
            v(&p).unwrap_err().kind,
            VerifyErrorKind::TooLarge { .. }
        ));
    }
}
