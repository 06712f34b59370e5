//! The interpreter: runs a verified [`Program`] instruction by instruction.
//!
//! Semantics follow RFC 9669: 32-bit ALU results are zero-extended; immediates are
//! sign-extended for 64-bit operations; shift amounts are masked to the operand width;
//! unsigned division by zero yields 0 and modulo by zero leaves the dividend (truncated to
//! 32 bits for 32-bit ops); signed division of `MIN` by -1 yields `MIN` and the matching modulo 0.
//!
//! Every memory access is checked against the stack, the regions the host registered and the
//! regions helpers granted ([`GuestMemory`]); an access outside them is a [`Trap`] with the
//! faulting pc. r1–r5 are left unchanged by helper calls here; programs must not rely on their
//! value after a call (the JIT clobbers them, as the kernel does).

use crate::helper::{CallEnv, CallStatus, HelperRegistry, MemRegion, TailTarget, func_token};
use crate::isa::AtomicOp;
use crate::memory::{GuestMemory, MemFault};
use crate::opcode::*;
use crate::verifier::Program;
use std::ffi::c_void;

/// Why a run stopped abnormally. Interpreter and JIT return the same trap for the same program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrapKind {
    /// A load or store outside every permitted region.
    #[error("out-of-bounds {} of {len} bytes at {addr:#x}", if *.write { "store" } else { "load" })]
    OutOfBounds {
        /// Address.
        addr: u64,
        /// Bytes.
        len: u64,
        /// Store or load.
        write: bool,
    },
    /// An atomic operation at an unaligned address.
    #[error("misaligned atomic of {len} bytes at {addr:#x}")]
    Misaligned {
        /// Address.
        addr: u64,
        /// Bytes.
        len: u64,
    },
    /// The instruction budget ran out.
    #[error("instruction budget exhausted")]
    BudgetExhausted,
    /// `callx` named a helper the host does not provide.
    #[error("call to unknown helper {id}")]
    UnknownHelper {
        /// The id (register value).
        id: u64,
    },
    /// A helper reported a fault.
    #[error("helper faulted with code {code}")]
    HelperFault {
        /// Helper-defined code.
        code: u32,
    },
}

/// An abnormal stop at a pc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("trap at pc {pc}: {kind}")]
pub struct Trap {
    /// What happened.
    pub kind: TrapKind,
    /// Slot of the faulting instruction.
    pub pc: usize,
}

impl From<MemFault> for TrapKind {
    fn from(f: MemFault) -> Self {
        match f {
            MemFault::OutOfBounds { addr, len, write } => {
                TrapKind::OutOfBounds { addr, len, write }
            }
            MemFault::Misaligned { addr, len } => TrapKind::Misaligned { addr, len },
        }
    }
}

/// Runs one verified program. Cheap to create; holds no per-run state.
#[derive(Debug, Clone, Copy)]
pub struct Interpreter<'a> {
    prog: &'a Program,
    helpers: &'a HelperRegistry,
    budget: Option<u64>,
}

struct Frame {
    ret_pc: usize,
    saved: [u64; 4],
}

impl<'a> Interpreter<'a> {
    /// An interpreter for `prog` calling `helpers`. The program must have been verified
    /// against the same registry.
    pub fn new(prog: &'a Program, helpers: &'a HelperRegistry) -> Self {
        Interpreter {
            prog,
            helpers,
            budget: None,
        }
    }

    /// Limits a run to `insns` executed instructions; exceeding it is a
    /// [`TrapKind::BudgetExhausted`] trap.
    pub fn with_budget(mut self, insns: Option<u64>) -> Self {
        self.budget = insns;
        self
    }

    /// Runs with `mem` as the program's memory: r1 = its address (0 when empty), r2 = its
    /// length, as the bpf_conformance suite expects.
    pub fn run(&self, mem: &mut [u8]) -> Result<u64, Trap> {
        let mut gm = GuestMemory::new();
        let (r1, r2) = if mem.is_empty() {
            (0, 0)
        } else {
            (mem.as_mut_ptr() as u64, mem.len() as u64)
        };
        if !mem.is_empty() {
            // SAFETY: `mem` is an exclusive borrow that outlives this call, and `gm` is dropped
            // before it returns; the program accesses it only through `gm`.
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
    /// with `host` passed to helpers. Earlier helper grants are dropped; the stack is *not*
    /// cleared (callers that reuse `gm` and need a zeroed stack call [`GuestMemory::reset`]).
    ///
    /// A helper that starts a tail call ([`CallEnv::tail_call`]) replaces the running program
    /// with its target: all frames are dropped, the target starts at its first instruction with
    /// r1 = the r1 of the call, r10 = the top frame's and every other register zero (the stack
    /// memory is left as it is, as the JIT leaves it).
    pub fn run_in(
        &self,
        gm: &mut GuestMemory,
        r1: u64,
        r2: u64,
        host: *mut c_void,
    ) -> Result<u64, Trap> {
        gm.grants.clear();
        let mut env = CallEnv::new(r1, host);
        let mut budget = Budget {
            left: self.budget.unwrap_or(u64::MAX),
            limited: self.budget.is_some(),
        };
        let mut target: Option<TailTarget> = None;
        let (mut r1, mut r2) = (r1, r2);
        loop {
            let (prog, helpers) = match &target {
                Some(t) => (&*t.prog, &*t.helpers),
                None => (self.prog, self.helpers),
            };
            let mut regs = [0u64; 16];
            regs[1] = r1;
            regs[2] = r2;
            regs[10] = gm.frame_pointer(0);
            let run = Run {
                prog,
                helpers,
                depth: 0,
            };
            match run.exec(gm, &mut regs, &mut env, &mut budget, 0)? {
                Stop::Return(v) => return Ok(v),
                Stop::TailCall(ctx) => {
                    target = env.take_tail_call();
                    r1 = ctx;
                    r2 = 0;
                }
            }
        }
    }
}

/// `BPF_FUNC_tail_call`.
const TAIL_CALL_ID: i32 = 12;

/// How [`Run::exec`] ended without a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The function it started returned (or a helper stopped the program), with this r0.
    Return(u64),
    /// A helper started a tail call (the target is in the env); the r1 of the call.
    TailCall(u64),
}

/// Instructions a run may still execute (shared by a program and the callbacks it runs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) left: u64,
    pub(crate) limited: bool,
}

/// One function activation chain: a program, its helpers, and the frame it starts in.
#[derive(Clone, Copy)]
pub(crate) struct Run<'p> {
    pub(crate) prog: &'p Program,
    pub(crate) helpers: &'p HelperRegistry,
    /// Frame index of the starting function (0: the program's entry; deeper for callbacks).
    pub(crate) depth: usize,
}

impl Run<'_> {
    /// Runs from `start` with `regs` until the starting function returns, a helper stops the
    /// program or starts a tail call, or a trap.
    pub(crate) fn exec(
        &self,
        gm: &mut GuestMemory,
        regs: &mut [u64; 16],
        env: &mut CallEnv,
        budget: &mut Budget,
        start: usize,
    ) -> Result<Stop, Trap> {
        let insns = self.prog.insns();
        let mut frames: Vec<Frame> = Vec::new();
        let mut pc = start;
        let mut left = budget.left;
        let limited = budget.limited;
        macro_rules! trap {
            ($kind:expr) => {
                return Err(Trap { kind: $kind, pc })
            };
        }
        macro_rules! mem {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(f) => trap!(TrapKind::from(f)),
                }
            };
        }
        // A helper call: r0, or the end of this activation chain. Tail calls start only from
        // `call 12` (`bpf_tail_call`) outside callbacks; elsewhere the request is dropped.
        macro_rules! helper {
            ($id:expr, $tail:expr) => {{
                budget.left = left;
                regs[0] = self.call_helper($id, regs, gm, env, budget, pc, frames.len())?;
                left = budget.left;
                match env.status {
                    s if s == CallStatus::Continue as u32 => {}
                    s if s == CallStatus::Exit as u32 => return Ok(Stop::Return(env.exit_value)),
                    s if s == CallStatus::TailCall as u32 => {
                        if !$tail || env.in_callback() || env.tail_target.is_none() {
                            // Nothing this engine can start: fall through.
                            env.take_tail_call();
                        } else {
                            return Ok(Stop::TailCall(regs[1]));
                        }
                    }
                    _ => {}
                }
            }};
        }
        loop {
            if limited {
                if left == 0 {
                    trap!(TrapKind::BudgetExhausted);
                }
                left -= 1;
            }
            let insn = insns[pc];
            let dst = (insn.dst & 0xf) as usize;
            let src = (insn.src & 0xf) as usize;
            let imm = insn.imm as i64 as u64; // sign-extended
            let off = insn.off as i64 as u64;
            let mut next = pc + 1;
            // 64-bit second operand and 32-bit second operand.
            let s64 = if source(insn.code) == BPF_X {
                regs[src]
            } else {
                imm
            };
            let s32 = s64 as u32;
            let d32 = regs[dst] as u32;
            match insn.code {
                // ALU64
                c if class(c) == BPF_ALU64 => {
                    let d = regs[dst];
                    regs[dst] = match op(c) {
                        BPF_ADD => d.wrapping_add(s64),
                        BPF_SUB => d.wrapping_sub(s64),
                        BPF_MUL => d.wrapping_mul(s64),
                        BPF_DIV if insn.off == 0 => d.checked_div(s64).unwrap_or(0),
                        BPF_DIV => {
                            if s64 == 0 {
                                0
                            } else {
                                (d as i64).wrapping_div(s64 as i64) as u64
                            }
                        }
                        BPF_MOD if insn.off == 0 => d.checked_rem(s64).unwrap_or(d),
                        BPF_MOD => {
                            if s64 == 0 {
                                d
                            } else {
                                (d as i64).wrapping_rem(s64 as i64) as u64
                            }
                        }
                        BPF_OR => d | s64,
                        BPF_AND => d & s64,
                        BPF_LSH => d << (s64 & 63),
                        BPF_RSH => d >> (s64 & 63),
                        BPF_ARSH => ((d as i64) >> (s64 & 63)) as u64,
                        BPF_XOR => d ^ s64,
                        BPF_NEG => (d as i64).wrapping_neg() as u64,
                        BPF_MOV => match insn.off {
                            0 => s64,
                            8 => s64 as i8 as i64 as u64,
                            16 => s64 as i16 as i64 as u64,
                            _ => s64 as i32 as i64 as u64,
                        },
                        // BPF_END in ALU64: unconditional bswap.
                        _ => match insn.imm {
                            16 => u64::from((d as u16).swap_bytes()),
                            32 => u64::from((d as u32).swap_bytes()),
                            _ => d.swap_bytes(),
                        },
                    };
                }
                // ALU (32-bit, zero-extended)
                c if class(c) == BPF_ALU => {
                    let d = d32;
                    let s = s32;
                    regs[dst] = match op(c) {
                        BPF_ADD => u64::from(d.wrapping_add(s)),
                        BPF_SUB => u64::from(d.wrapping_sub(s)),
                        BPF_MUL => u64::from(d.wrapping_mul(s)),
                        BPF_DIV if insn.off == 0 => u64::from(d.checked_div(s).unwrap_or(0)),
                        BPF_DIV => {
                            if s == 0 {
                                0
                            } else {
                                u64::from((d as i32).wrapping_div(s as i32) as u32)
                            }
                        }
                        BPF_MOD if insn.off == 0 => u64::from(d.checked_rem(s).unwrap_or(d)),
                        BPF_MOD => {
                            if s == 0 {
                                u64::from(d)
                            } else {
                                u64::from((d as i32).wrapping_rem(s as i32) as u32)
                            }
                        }
                        BPF_OR => u64::from(d | s),
                        BPF_AND => u64::from(d & s),
                        BPF_LSH => u64::from(d << (s & 31)),
                        BPF_RSH => u64::from(d >> (s & 31)),
                        BPF_ARSH => u64::from(((d as i32) >> (s & 31)) as u32),
                        BPF_XOR => u64::from(d ^ s),
                        BPF_NEG => u64::from((d as i32).wrapping_neg() as u32),
                        BPF_MOV => match insn.off {
                            0 => u64::from(s),
                            8 => u64::from(s as i8 as i32 as u32),
                            _ => u64::from(s as i16 as i32 as u32),
                        },
                        // BPF_END: to little-endian truncates on this (little-endian) host;
                        // to big-endian swaps.
                        _ => {
                            let v = regs[dst];
                            match (source(c), insn.imm) {
                                (BPF_TO_LE, 16) => u64::from(v as u16),
                                (BPF_TO_LE, 32) => u64::from(v as u32),
                                (BPF_TO_LE, _) => v,
                                (_, 16) => u64::from((v as u16).swap_bytes()),
                                (_, 32) => u64::from((v as u32).swap_bytes()),
                                _ => v.swap_bytes(),
                            }
                        }
                    };
                }
                LDDW => {
                    regs[dst] = if insn.src == BPF_PSEUDO_FUNC {
                        func_token((pc as i64 + 1 + insn.imm as i64) as usize)
                    } else {
                        (insn.imm as u32 as u64) | ((insns[pc + 1].imm as u32 as u64) << 32)
                    };
                    next = pc + 2;
                }
                c if class(c) == BPF_LDX => {
                    let addr = regs[src].wrapping_add(off);
                    let len = size_bytes(size(c));
                    let v = mem!(gm.load(addr, len));
                    regs[dst] = if mode(c) == BPF_MEMSX {
                        match len {
                            1 => v as i8 as i64 as u64,
                            2 => v as i16 as i64 as u64,
                            _ => v as i32 as i64 as u64,
                        }
                    } else {
                        v
                    };
                }
                c if class(c) == BPF_ST => {
                    let addr = regs[dst].wrapping_add(off);
                    mem!(gm.store(addr, size_bytes(size(c)), imm));
                }
                c if class(c) == BPF_STX && mode(c) == BPF_MEM => {
                    let addr = regs[dst].wrapping_add(off);
                    mem!(gm.store(addr, size_bytes(size(c)), regs[src]));
                }
                c if class(c) == BPF_STX => {
                    // BPF_ATOMIC
                    let addr = regs[dst].wrapping_add(off);
                    let len = size_bytes(size(c));
                    let (aop, fetch) = match insn.imm {
                        0x00 => (AtomicOp::Add, false),
                        0x01 => (AtomicOp::Add, true),
                        0x40 => (AtomicOp::Or, false),
                        0x41 => (AtomicOp::Or, true),
                        0x50 => (AtomicOp::And, false),
                        0x51 => (AtomicOp::And, true),
                        0xa0 => (AtomicOp::Xor, false),
                        0xa1 => (AtomicOp::Xor, true),
                        BPF_XCHG => (AtomicOp::Xchg, true),
                        _ => (AtomicOp::CmpXchg, true),
                    };
                    let old = mem!(gm.atomic(addr, len, aop, regs[src], regs[0]));
                    if aop == AtomicOp::CmpXchg {
                        regs[0] = old;
                    } else if fetch {
                        regs[src] = old;
                    }
                }
                JA => next = (pc as i64 + 1 + insn.off as i64) as usize,
                JA32 => next = (pc as i64 + 1 + insn.imm as i64) as usize,
                CALL => {
                    if insn.src == BPF_PSEUDO_CALL {
                        frames.push(Frame {
                            ret_pc: pc + 1,
                            saved: [regs[6], regs[7], regs[8], regs[9]],
                        });
                        regs[10] = gm.frame_pointer(self.depth + frames.len());
                        next = (pc as i64 + 1 + insn.imm as i64) as usize;
                    } else {
                        helper!(insn.imm as u32 as u64, insn.imm == TAIL_CALL_ID);
                    }
                }
                CALLX => helper!(regs[dst], false),
                EXIT => match frames.pop() {
                    None => {
                        budget.left = left;
                        return Ok(Stop::Return(regs[0]));
                    }
                    Some(f) => {
                        regs[6..10].copy_from_slice(&f.saved);
                        regs[10] = gm.frame_pointer(self.depth + frames.len());
                        next = f.ret_pc;
                    }
                },
                c => {
                    // Conditional jumps (BPF_JMP / BPF_JMP32); the verifier admitted nothing else.
                    let taken = if class(c) == BPF_JMP {
                        cond(op(c), regs[dst], s64)
                    } else {
                        cond32(op(c), d32, s32)
                    };
                    if taken {
                        next = (pc as i64 + 1 + insn.off as i64) as usize;
                    }
                }
            }
            pc = next;
        }
    }

    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn call_helper(
        &self,
        id: u64,
        regs: &[u64; 16],
        gm: &mut GuestMemory,
        env: &mut CallEnv,
        budget: &mut Budget,
        pc: usize,
        frames: usize,
    ) -> Result<u64, Trap> {
        let Some(h) = u32::try_from(id).ok().and_then(|id| self.helpers.get(id)) else {
            return Err(Trap {
                kind: TrapKind::UnknownHelper { id },
                pc,
            });
        };
        env.set_memory(gm);
        let r = if h.calls_back {
            let mut cb = crate::callback::Callbacks {
                run: Run {
                    depth: self.depth + frames,
                    ..*self
                },
                gm,
                budget,
                trap: None,
            };
            let r = cb.call(h.func, regs, env);
            if let Some(trap) = cb.trap {
                return Err(trap);
            }
            r
        } else {
            (h.func)(regs[1], regs[2], regs[3], regs[4], regs[5], env)
        };
        if env.status == CallStatus::Fault as u32 {
            return Err(Trap {
                kind: TrapKind::HelperFault {
                    code: env.fault_code,
                },
                pc,
            });
        }
        Ok(r)
    }
}

#[inline(always)]
fn cond(op: u8, a: u64, b: u64) -> bool {
    match op {
        BPF_JEQ => a == b,
        BPF_JGT => a > b,
        BPF_JGE => a >= b,
        BPF_JSET => a & b != 0,
        BPF_JNE => a != b,
        BPF_JSGT => (a as i64) > (b as i64),
        BPF_JSGE => (a as i64) >= (b as i64),
        BPF_JLT => a < b,
        BPF_JLE => a <= b,
        BPF_JSLT => (a as i64) < (b as i64),
        _ => (a as i64) <= (b as i64),
    }
}

#[inline(always)]
fn cond32(op: u8, a: u32, b: u32) -> bool {
    match op {
        BPF_JEQ => a == b,
        BPF_JGT => a > b,
        BPF_JGE => a >= b,
        BPF_JSET => a & b != 0,
        BPF_JNE => a != b,
        BPF_JSGT => (a as i32) > (b as i32),
        BPF_JSGE => (a as i32) >= (b as i32),
        BPF_JLT => a < b,
        BPF_JLE => a <= b,
        BPF_JSLT => (a as i32) < (b as i32),
        _ => (a as i32) <= (b as i32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::helper::conformance_helpers;
    use crate::isa::Insn;
    use crate::verifier::verify;

    fn run(insns: &[Insn], mem: &mut [u8]) -> Result<u64, Trap> {
        let h = conformance_helpers();
        let p = verify(insns, &h).expect("verifies");
        Interpreter::new(&p, &h).run(mem)
    }
    const EXIT_I: Insn = Insn::new(EXIT, 0, 0, 0, 0);

    #[test]
    fn alu64_div_by_zero_yields_zero() {
        let p = [
            Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 7),
            Insn::new(BPF_ALU64 | BPF_DIV | BPF_K, 0, 0, 0, 0),
            EXIT_I,
        ];
        assert_eq!(run(&p, &mut []), Ok(0));
    }

    #[test]
    fn mod32_by_zero_truncates_dividend() {
        let p = [
            Insn::new(LDDW, 0, 0, 0, 5),
            Insn::new(0, 0, 0, 0, 1),
            Insn::new(BPF_ALU | BPF_MOD | BPF_K, 0, 0, 0, 0),
            EXIT_I,
        ];
        assert_eq!(run(&p, &mut []), Ok(5));
    }

    #[test]
    fn sdiv64_min_by_minus_one_is_min() {
        let p = [
            Insn::new(LDDW, 0, 0, 0, 0),
            Insn::new(0, 0, 0, 0, i32::MIN),
            Insn::new(BPF_ALU64 | BPF_DIV | BPF_K, 0, 0, 1, -1),
            EXIT_I,
        ];
        assert_eq!(run(&p, &mut []), Ok(i64::MIN as u64));
    }

    #[test]
    fn load_outside_regions_traps_with_pc() {
        let p = [
            Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 1, 0, 0, 0x1000),
            Insn::new(BPF_LDX | BPF_MEM | BPF_DW, 0, 1, 0, 0),
            EXIT_I,
        ];
        assert_eq!(
            run(&p, &mut []),
            Err(Trap {
                kind: TrapKind::OutOfBounds {
                    addr: 0x1000,
                    len: 8,
                    write: false
                },
                pc: 1
            })
        );
    }

    #[test]
    fn load_from_memory_argument() {
        let p = [Insn::new(BPF_LDX | BPF_MEM | BPF_W, 0, 1, 2, 0), EXIT_I];
        let mut mem = [0u8, 0, 0x78, 0x56, 0x34, 0x12];
        assert_eq!(run(&p, &mut mem), Ok(0x12345678));
    }

    #[test]
    fn budget_exhaustion_traps() {
        let p = [Insn::new(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, -1, 0), EXIT_I];
        let h = conformance_helpers();
        let prog = verify(&p, &h).unwrap();
        let r = Interpreter::new(&prog, &h)
            .with_budget(Some(1000))
            .run(&mut []);
        assert_eq!(r.unwrap_err().kind, TrapKind::BudgetExhausted);
    }

    #[test]
    fn callx_to_unknown_helper_traps() {
        let p = [
            Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, 99),
            Insn::new(CALLX, 3, 0, 0, 0),
            EXIT_I,
        ];
        assert_eq!(
            run(&p, &mut []).unwrap_err(),
            Trap {
                kind: TrapKind::UnknownHelper { id: 99 },
                pc: 1
            }
        );
    }
}
