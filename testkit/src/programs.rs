//! The random program generator of the differential tests (the interpreter against rbpf, the
//! x86_64 JIT and the aarch64 JIT): a seeded [`Rng`] biased towards edge values, full-ISA ALU
//! and jump instructions, program bodies as [`Unit`]s (straight code, forward jumps, local calls
//! and `bpf_loop` callbacks), their [`layout`] into bytecode with every target resolved, and
//! [`shrink`]ing a failing case unit by unit.
//!
//! What stays with each test: the memory model (which bases and regions its accesses use), its
//! helpers, and the subset of the ISA its reference engine agrees on (rbpf 0.4 lacks ISA v4).

use bpftime_vm::helper::BPF_LOOP;
use bpftime_vm::isa::{AluOp, Endian, Insn, JmpCond, LdImmKind, Op, Size, Src, Width, encode};
use bpftime_vm::opcode::{BPF_PSEUDO_FUNC, JA, JA32, LDDW};

/// splitmix64, one independent stream per (seed, case).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The generator for case `case` of run `seed`, independent of the other cases.
    pub fn for_case(seed: u64, case: u64) -> Self {
        let mut r = Rng(seed ^ case.wrapping_mul(0xa076_1d64_78bd_642f));
        r.next();
        r
    }

    /// The next 64 random bits.
    #[allow(
        clippy::should_implement_trait,
        reason = "an endless stream, not an iterator; the tests call it everywhere"
    )]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// True with probability `p` percent.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A 64-bit value biased towards edge cases.
    pub fn value64(&mut self) -> u64 {
        match self.below(8) {
            0 => self.pick(&[
                0,
                1,
                u64::MAX,
                i64::MIN as u64,
                i64::MAX as u64,
                u64::from(u32::MAX),
                0x8000_0000,
                0xffff_ffff_8000_0000,
                0x1_0000_0000,
                0x7fff_ffff,
                0xffff_ffff_0000_0000,
                32,
                64,
            ]),
            1 => self.below(256),
            2 => self.range(-128, 127) as u64,
            3 => u64::from(self.next() as u32),
            4 => self.next() as i32 as i64 as u64,
            _ => self.next(),
        }
    }

    /// A 32-bit immediate biased towards edge cases.
    pub fn imm32(&mut self) -> i32 {
        match self.below(6) {
            0 => self.pick(&[
                0,
                1,
                -1,
                2,
                i32::MIN,
                i32::MAX,
                0x7fff,
                -0x8000,
                0xffff,
                64,
                32,
                8,
                16,
            ]),
            1 | 2 => self.range(-8, 63) as i32,
            _ => self.next() as i32,
        }
    }

    /// 32 or 64 bits, evenly.
    pub fn width(&mut self) -> Width {
        if self.percent(50) {
            Width::W64
        } else {
            Width::W32
        }
    }

    /// An access size, evenly.
    pub fn size(&mut self) -> Size {
        self.pick(&[Size::B, Size::H, Size::W, Size::DW])
    }
}

/// `dst = src` (64-bit).
pub fn mov64(dst: u8, src: u8) -> Op {
    alu(Width::W64, AluOp::Mov, dst, Src::Reg(src))
}

/// `dst = imm` (64-bit, sign-extended).
pub fn mov_imm(dst: u8, imm: i32) -> Op {
    alu(Width::W64, AluOp::Mov, dst, Src::Imm(imm))
}

/// An ALU instruction.
pub fn alu(width: Width, op: AluOp, dst: u8, src: Src) -> Op {
    Op::Alu {
        width,
        op,
        dst,
        src,
    }
}

/// `lddw dst, v`.
pub fn lddw(dst: u8, v: u64) -> Op {
    Op::LdImm64 {
        dst,
        kind: LdImmKind::Imm64,
        lo: v as u32 as i32,
        hi: (v >> 32) as u32 as i32,
    }
}

/// Every ALU operation.
pub const ALU_OPS: [AluOp; 14] = [
    AluOp::Add,
    AluOp::Sub,
    AluOp::Mul,
    AluOp::Div,
    AluOp::SDiv,
    AluOp::Or,
    AluOp::And,
    AluOp::Lsh,
    AluOp::Rsh,
    AluOp::Mod,
    AluOp::SMod,
    AluOp::Xor,
    AluOp::Mov,
    AluOp::Arsh,
];

/// Every jump condition.
pub const JMP_CONDS: [JmpCond; 11] = [
    JmpCond::Eq,
    JmpCond::Gt,
    JmpCond::Ge,
    JmpCond::Set,
    JmpCond::Ne,
    JmpCond::Sgt,
    JmpCond::Sge,
    JmpCond::Lt,
    JmpCond::Le,
    JmpCond::Slt,
    JmpCond::Sle,
];

/// One ALU-class instruction of the whole ISA writing one of `dsts` and reading `srcs`: `neg`,
/// `movsx`, byte swaps, `lddw`, and every ALU operation at both widths with a register or an
/// edge-biased immediate (shift counts mostly in range, divisors mostly special).
pub fn alu_op(rng: &mut Rng, dsts: &[u8], srcs: &[u8]) -> Op {
    let dst = rng.pick(dsts);
    match rng.below(20) {
        0 => Op::Neg {
            width: rng.width(),
            dst,
        },
        1 => {
            let width = rng.width();
            let bits = match width {
                Width::W32 => rng.pick(&[8, 16]),
                Width::W64 => rng.pick(&[8, 16, 32]),
            };
            Op::MovSx {
                width,
                dst,
                src: rng.pick(srcs),
                bits,
            }
        }
        2 => Op::Endian {
            kind: rng.pick(&[Endian::Le, Endian::Be, Endian::Swap]),
            bits: rng.pick(&[16, 32, 64]),
            dst,
        },
        3 => lddw(dst, rng.value64()),
        _ => {
            let op = rng.pick(&ALU_OPS);
            let src = if rng.percent(50) {
                Src::Reg(rng.pick(srcs))
            } else {
                Src::Imm(match op {
                    AluOp::Lsh | AluOp::Rsh | AluOp::Arsh if rng.percent(80) => {
                        rng.below(64) as i32
                    }
                    AluOp::Div | AluOp::Mod if rng.percent(30) => {
                        rng.pick(&[1, 2, 4, 8, 64, 1 << 20, i32::MIN, 3, 10])
                    }
                    _ => rng.imm32(),
                })
            };
            alu(rng.width(), op, dst, src)
        }
    }
}

/// A forward jump with its offset left for [`layout`]: `ja`, `gotol` (`ja32`) or a conditional
/// jump (either width, every condition) on `regs`.
pub fn jump_insn(rng: &mut Rng, regs: &[u8]) -> Insn {
    match rng.below(10) {
        0 => Insn::new(JA, 0, 0, 0, 0),
        1 => Insn::new(JA32, 0, 0, 0, 0),
        _ => {
            let src = if rng.percent(50) {
                Src::Reg(rng.pick(regs))
            } else {
                Src::Imm(rng.imm32())
            };
            encode(&Op::Jmp {
                width: rng.width(),
                cond: rng.pick(&JMP_CONDS),
                dst: rng.pick(regs),
                src,
                off: 0,
            })[0]
        }
    }
}

/// `count` (≥ 1) runs of straight-line `body`, counted down in `counter` (which `body` must not
/// write).
pub fn counted_loop(counter: u8, count: i32, body: &[Insn]) -> Vec<Insn> {
    let mut out = encode(&mov_imm(counter, count));
    out.extend_from_slice(body);
    out.extend(encode(&alu(Width::W64, AluOp::Add, counter, Src::Imm(-1))));
    out.extend(encode(&Op::Jmp {
        width: Width::W64,
        cond: JmpCond::Ne,
        dst: counter,
        src: Src::Imm(0),
        off: -(body.len() as i16 + 2),
    }));
    out
}

/// A piece of a function body. Targets name units and functions, not slots, so units can be
/// removed while shrinking.
#[derive(Clone, Debug)]
pub enum Unit {
    /// Straight-line code (loops may jump backwards inside it).
    Code(Vec<Insn>),
    /// A forward jump to unit `target` of the same function (`== len`: the function's end).
    Jump {
        /// The jump, offset 0 (`ja32` takes its offset in `imm`).
        insn: Insn,
        /// Unit index.
        target: usize,
    },
    /// `call` function `func` (an index into the case's functions, always a later one).
    Call {
        /// Function index.
        func: usize,
    },
    /// `before`, then `lddw r2, func <func>` and `call 181` (`bpf_loop`), then `after`:
    /// `before` sets r1 (loops), r3 (context) and r4 (flags); `after` redefines r1–r5.
    Callback {
        /// Function index of the callback.
        func: usize,
        /// Argument set-up.
        before: Vec<Insn>,
        /// After the call.
        after: Vec<Insn>,
    },
}

/// Slots of `u` once laid out.
pub fn unit_len(u: &Unit) -> usize {
    match u {
        Unit::Code(c) => c.len(),
        Unit::Jump { .. } | Unit::Call { .. } => 1,
        Unit::Callback { before, after, .. } => before.len() + 3 + after.len(),
    }
}

/// How the functions of a case are framed.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Before the main function's units.
    pub prologue: &'a [Insn],
    /// After the main function's units (ends in `exit`).
    pub epilogue: &'a [Insn],
    /// Before each other function's units, by function index (empty for none).
    pub heads: &'a [Vec<Insn>],
    /// After each other function's units (ends in `exit`), by function index.
    pub tails: &'a [Vec<Insn>],
}

/// Lays out `funcs` (function 0 is the entry) framed by `frame`, resolving every jump, call and
/// function reference.
pub fn layout(funcs: &[Vec<Unit>], frame: &Frame<'_>) -> Vec<Insn> {
    let head = |f: usize| -> &[Insn] {
        if f == 0 {
            frame.prologue
        } else {
            frame.heads.get(f).map_or(&[], Vec::as_slice)
        }
    };
    let tail = |f: usize| -> &[Insn] {
        if f == 0 {
            frame.epilogue
        } else {
            &frame.tails[f]
        }
    };
    // Pass 1: function and unit starts.
    let mut func_start = Vec::with_capacity(funcs.len());
    let mut starts: Vec<Vec<usize>> = Vec::with_capacity(funcs.len());
    let mut pc = 0;
    for (f, units) in funcs.iter().enumerate() {
        func_start.push(pc);
        pc += head(f).len();
        let mut s = Vec::with_capacity(units.len() + 1);
        for u in units {
            s.push(pc);
            pc += unit_len(u);
        }
        s.push(pc);
        pc += tail(f).len();
        starts.push(s);
    }
    // Pass 2: emit.
    let mut out = Vec::with_capacity(pc);
    for (f, units) in funcs.iter().enumerate() {
        out.extend_from_slice(head(f));
        for (i, u) in units.iter().enumerate() {
            let here = out.len() as i64;
            match u {
                Unit::Code(c) => out.extend_from_slice(c),
                Unit::Jump { insn, target } => {
                    let off = starts[f][*target] as i64 - (here + 1);
                    out.push(if insn.code == JA32 {
                        Insn {
                            imm: off as i32,
                            ..*insn
                        }
                    } else {
                        Insn {
                            off: i16::try_from(off).expect("generated programs are short"),
                            ..*insn
                        }
                    });
                }
                Unit::Call { func } => {
                    let off = func_start[*func] as i64 - (here + 1);
                    out.extend(encode(&Op::CallLocal { off: off as i32 }));
                }
                Unit::Callback {
                    func,
                    before,
                    after,
                } => {
                    out.extend_from_slice(before);
                    let at = out.len() as i64;
                    let off = func_start[*func] as i64 - (at + 1);
                    out.push(Insn::new(LDDW, 2, BPF_PSEUDO_FUNC, 0, off as i32));
                    out.push(Insn::new(0, 0, 0, 0, 0));
                    out.extend(encode(&Op::Call { id: BPF_LOOP }));
                    out.extend_from_slice(after);
                }
            }
            debug_assert_eq!(out.len(), starts[f][i] + unit_len(u));
        }
        out.extend_from_slice(tail(f));
    }
    out
}

/// `funcs` without unit `i` of function `f`, jump targets renumbered.
pub fn without_unit(funcs: &[Vec<Unit>], f: usize, i: usize) -> Vec<Vec<Unit>> {
    let mut out = funcs.to_vec();
    out[f].remove(i);
    for u in &mut out[f] {
        if let Unit::Jump { target, .. } = u
            && *target > i
        {
            *target -= 1;
        }
    }
    out
}

/// Removes units one at a time (every function) while `fails` still holds.
pub fn shrink<C: Clone>(
    mut case: C,
    funcs: impl Fn(&mut C) -> &mut Vec<Vec<Unit>>,
    mut fails: impl FnMut(&C) -> bool,
) -> C {
    let mut f = 0;
    while f < funcs(&mut case).len() {
        let mut i = 0;
        while i < funcs(&mut case)[f].len() {
            let mut smaller = case.clone();
            let fs = funcs(&mut smaller);
            *fs = without_unit(fs, f, i);
            if fails(&smaller) {
                case = smaller;
            } else {
                i += 1;
            }
        }
        f += 1;
    }
    case
}

#[cfg(test)]
mod tests {
    use super::*;
    use bpftime_vm::helper::{HelperRegistry, bpf_loop};
    use bpftime_vm::opcode::EXIT;
    use bpftime_vm::verifier::verify;

    #[test]
    fn layouts_resolve_jumps_calls_and_callbacks() {
        let exit = [Insn::new(EXIT, 0, 0, 0, 0)];
        let mut rng = Rng::for_case(1, 2);
        let funcs = vec![
            vec![
                Unit::Jump {
                    insn: jump_insn(&mut rng, &[0, 1]),
                    target: 2,
                },
                Unit::Call { func: 1 },
                Unit::Callback {
                    func: 2,
                    before: encode(&mov_imm(1, 3)),
                    after: encode(&mov_imm(1, 0)),
                },
            ],
            vec![Unit::Code(encode(&mov_imm(0, 1)))],
            vec![Unit::Code(encode(&mov_imm(0, 0)))],
        ];
        let tails = vec![vec![], exit.to_vec(), exit.to_vec()];
        let frame = Frame {
            prologue: &encode(&mov_imm(0, 0)),
            epilogue: &exit,
            heads: &[],
            tails: &tails,
        };
        let insns = layout(&funcs, &frame);
        let mut h = HelperRegistry::new();
        h.register_calling_back(BPF_LOOP, "bpf_loop", bpf_loop);
        let p = verify(&insns, &h).expect("verifies");
        assert_eq!(p.callbacks().collect::<Vec<_>>(), [insns.len() - 2]);
        let smaller = without_unit(&funcs, 0, 1);
        assert!(matches!(smaller[0][0], Unit::Jump { target: 1, .. }));
    }
}
