//! Differential tests of the interpreter.
//!
//! 1. [`interpreter_agrees_with_rbpf_on_random_programs`]: random terminating programs run on
//!    our interpreter and on rbpf 0.4's interpreter; r0 and the memory block must agree.
//! 2. [`random_bytes_never_panic_loader_or_interpreter`]: random byte strings go through
//!    `insns_from_bytes` → `verify` → a budgeted run and must never panic (the in-CI version
//!    of `fuzz/fuzz_targets/loader_interpreter.rs`).
//!
//! The generator's core (seeded [`Rng`], units, layout, shrinking) is shared with the JIT
//! differential tests (`bpftime_testkit::programs`); the instruction mix here is rbpf's subset.
//!
//! Both are seeded: the default seed is fixed; `BPFTIME_DIFF_SEED` (decimal or `0x` hex)
//! overrides it and `BPFTIME_DIFF_CASES` changes the number of programs. A failure prints the
//! seed, the case number and the (shrunk) program's disassembly.
//!
//! # The subset where rbpf 0.4 agrees with the kernel
//!
//! Read off `rbpf-0.4.1/src/interpreter.rs` and checked against RFC 9669:
//!
//! - No ISA v4 (`movsx`, `ldsx`, `bswap`, `gotol`, `sdiv`/`smod`), no atomics, no helpers, no
//!   bpf-to-bpf calls: never generated.
//! - 64-bit `jeq/jne/jgt/jge/jlt/jle` with an immediate zero-extend it (`imm as u32 as u64`);
//!   RFC 9669 §4.3 sign-extends it. Generated only with `imm >= 0`, where both agree. (`jset`
//!   and the signed conditions sign-extend correctly, and the 32-bit forms are right.)
//! - `mod32` by zero leaves all 64 bits of dst; RFC 9669 §4.1 zero-extends the 32-bit dividend.
//!   Each `mod32` is preceded by a guard that truncates dst first when the divisor is zero
//!   (`jne32 src, 0, +1; mov32 dst, dst`), which does not change the RFC result.
//! - `neg64` computes `-(x as i64)`, which panics on `i64::MIN` in a debug build of rbpf. It is
//!   guarded by `lddw r8, i64::MIN; jeq dst, r8, +1` (negating `i64::MIN` is `i64::MIN` anyway).
//! - Agreeing and therefore generated freely: 32-bit shifts masked to 5 bits, `arsh32`, `neg32`,
//!   `div`/`mod` by zero in 64 bits and `div32` by zero, `le`/`be` 16/32/64, `lddw`, byte to
//!   double-word loads and stores (aligned or not), every jmp32 condition.
//!
//! # Program shape
//!
//! `mov r9, r1` (r9 = memory block, never a data operand), `lddw` random values into r0–r8,
//! then 1–48 random units (an instruction, a guarded instruction, or a forward jump to a unit
//! start, so every program terminates), then an epilogue that stores r0–r7 and the 64-byte
//! stack window into the memory block, and `exit`. Data operands are r0–r7; r8 is the guards'
//! scratch; r10 is only ever a base address. Pointers never reach data registers, so both
//! engines must produce identical bytes although their memory lives at different addresses.

use bpftime_testkit::programs::{self, Frame, Rng, Unit};
use bpftime_vm::disasm::disassemble;
use bpftime_vm::helper::{HelperRegistry, conformance_helpers};
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::isa::{Insn, Op, encode, insns_from_bytes, insns_to_bytes};
use bpftime_vm::opcode::*;
use bpftime_vm::verifier::verify;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

const DEFAULT_SEED: u64 = 0x6270_6674_696d_6521;
const DEFAULT_CASES: u64 = 10_000;

/// Data registers the generator reads and writes.
const DATA_REGS: u8 = 8;
/// Scratch register of the guards (and the epilogue).
const SCRATCH: u8 = 8;
/// Holds the memory block's address for the whole run.
const BASE: u8 = 9;
/// Bytes of the memory block that generated loads and stores touch.
const MEM_DATA: usize = 64;
/// Bytes below r10 that generated stack accesses touch.
const STACK_WINDOW: usize = 64;
/// Where the epilogue dumps r0–r7, then the stack window.
const DUMP_REGS: usize = MEM_DATA;
const DUMP_STACK: usize = DUMP_REGS + 8 * DATA_REGS as usize;
const MEM_LEN: usize = DUMP_STACK + STACK_WINDOW;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

fn seed() -> u64 {
    env_u64("BPFTIME_DIFF_SEED").unwrap_or(DEFAULT_SEED)
}

fn cases() -> u64 {
    env_u64("BPFTIME_DIFF_CASES").unwrap_or(DEFAULT_CASES)
}

/// SplitMix64: tiny, seedable, good enough to drive a generator.
fn data_reg(rng: &mut Rng) -> u8 {
    rng.below(u64::from(DATA_REGS)) as u8
}

/// Everything a case needs to be run again.
#[derive(Clone, Debug)]
struct Case {
    init: [u64; SCRATCH as usize + 1],
    /// One function: the main one's body.
    funcs: Vec<Vec<Unit>>,
    mem: Vec<u8>,
}

fn alu(class: u8, op: u8, dst: u8, src: Option<u8>, imm: i32) -> Insn {
    match src {
        Some(s) => Insn::new(class | op | BPF_X, dst, s, 0, 0),
        None => Insn::new(class | op | BPF_K, dst, 0, 0, imm),
    }
}

fn lddw(dst: u8, v: u64) -> [Insn; 2] {
    [
        Insn::new(LDDW, dst, 0, 0, v as u32 as i32),
        Insn::new(0, 0, 0, 0, (v >> 32) as u32 as i32),
    ]
}

const SIZES: [(u8, i64); 4] = [(BPF_B, 1), (BPF_H, 2), (BPF_W, 4), (BPF_DW, 8)];

/// A base register and an in-bounds offset for an access of `len` bytes.
fn address(rng: &mut Rng, len: i64) -> (u8, i16) {
    if rng.percent(50) {
        (10, rng.range(-(STACK_WINDOW as i64), -len) as i16)
    } else {
        (BASE, rng.range(0, MEM_DATA as i64 - len) as i16)
    }
}

fn gen_alu(rng: &mut Rng) -> Vec<Insn> {
    const OPS: [u8; 12] = [
        BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_MOD, BPF_XOR,
        BPF_MOV, BPF_ARSH,
    ];
    let wide = rng.percent(50);
    let class = if wide { BPF_ALU64 } else { BPF_ALU };
    let dst = data_reg(rng);
    let op = rng.pick(&OPS);
    let src = if rng.percent(50) {
        Some(data_reg(rng))
    } else {
        None
    };
    let imm = match op {
        BPF_LSH | BPF_RSH | BPF_ARSH if !rng.percent(10) => {
            rng.below(if wide { 64 } else { 32 }) as i32
        }
        _ => rng.imm32(),
    };
    let insn = alu(class, op, dst, src, imm);
    if op == BPF_MOD && !wide {
        // rbpf leaves the upper half of dst on mod32 by zero; truncate first (a no-op for
        // the RFC result, which only depends on the low 32 bits).
        let trunc = Insn::new(BPF_ALU | BPF_MOV | BPF_X, dst, dst, 0, 0);
        return match src {
            Some(s) => vec![
                Insn::new(BPF_JMP32 | BPF_JNE | BPF_K, s, 0, 1, 0),
                trunc,
                insn,
            ],
            None if imm == 0 => vec![trunc, insn],
            None => vec![insn],
        };
    }
    vec![insn]
}

fn gen_unit(rng: &mut Rng, index: usize, len: usize) -> Unit {
    let roll = rng.below(100);
    let code = match roll {
        0..=39 => gen_alu(rng),
        40..=42 => {
            let dst = data_reg(rng);
            if rng.percent(50) {
                vec![Insn::new(BPF_ALU | BPF_NEG, dst, 0, 0, 0)]
            } else {
                // rbpf panics (debug overflow check) negating i64::MIN; skip it, as the RFC
                // result equals the input.
                let [a, b] = lddw(SCRATCH, i64::MIN as u64);
                vec![
                    a,
                    b,
                    Insn::new(BPF_JMP | BPF_JEQ | BPF_X, dst, SCRATCH, 1, 0),
                    Insn::new(BPF_ALU64 | BPF_NEG, dst, 0, 0, 0),
                ]
            }
        }
        43..=47 => {
            let src = rng.pick(&[BPF_TO_LE, BPF_TO_BE]);
            let bits = rng.pick(&[16, 32, 64]);
            vec![Insn::new(
                BPF_ALU | BPF_END | src,
                data_reg(rng),
                0,
                0,
                bits,
            )]
        }
        48..=52 => lddw(data_reg(rng), rng.value64()).to_vec(),
        53..=64 => {
            let (size, len) = rng.pick(&SIZES);
            let (base, off) = address(rng, len);
            vec![Insn::new(
                BPF_LDX | BPF_MEM | size,
                data_reg(rng),
                base,
                off,
                0,
            )]
        }
        65..=76 => {
            let (size, len) = rng.pick(&SIZES);
            let (base, off) = address(rng, len);
            if rng.percent(50) {
                vec![Insn::new(
                    BPF_STX | BPF_MEM | size,
                    base,
                    data_reg(rng),
                    off,
                    0,
                )]
            } else {
                vec![Insn::new(
                    BPF_ST | BPF_MEM | size,
                    base,
                    0,
                    off,
                    rng.imm32(),
                )]
            }
        }
        77 if rng.percent(30) => vec![Insn::new(EXIT, 0, 0, 0, 0)],
        _ => {
            // Forward jump to any later unit or the epilogue.
            let target = index + 1 + rng.below((len - index) as u64) as usize;
            let insn = if roll < 80 {
                Insn::new(JA, 0, 0, 0, 0)
            } else {
                const CONDS: [u8; 11] = [
                    BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE, BPF_JLT,
                    BPF_JLE, BPF_JSLT, BPF_JSLE,
                ];
                let wide = rng.percent(50);
                let class = if wide { BPF_JMP } else { BPF_JMP32 };
                let cond = rng.pick(&CONDS);
                let dst = data_reg(rng);
                if rng.percent(50) {
                    Insn::new(class | cond | BPF_X, dst, data_reg(rng), 0, 0)
                } else {
                    let mut imm = rng.imm32();
                    let unsigned = matches!(
                        cond,
                        BPF_JEQ | BPF_JGT | BPF_JGE | BPF_JNE | BPF_JLT | BPF_JLE
                    );
                    if wide && unsigned {
                        // rbpf zero-extends these immediates; only imm >= 0 is comparable.
                        imm &= i32::MAX;
                    }
                    Insn::new(class | cond | BPF_K, dst, 0, 0, imm)
                }
            };
            return Unit::Jump { insn, target };
        }
    };
    Unit::Code(code)
}

fn gen_case(rng: &mut Rng) -> Case {
    let mut init = [0u64; SCRATCH as usize + 1];
    for v in &mut init {
        *v = rng.value64();
    }
    let len = 1 + rng.below(48) as usize;
    let body = (0..len).map(|i| gen_unit(rng, i, len)).collect();
    let funcs = vec![body];
    let mut mem = vec![0u8; MEM_LEN];
    for b in &mut mem[..MEM_DATA] {
        *b = rng.next() as u8;
    }
    Case { init, funcs, mem }
}

/// Lays out prologue, body and epilogue, resolving jump targets to slot offsets.
fn layout(case: &Case) -> Vec<Insn> {
    let mut prologue = vec![Insn::new(BPF_ALU64 | BPF_MOV | BPF_X, BASE, 1, 0, 0)];
    for (r, &v) in case.init.iter().enumerate() {
        prologue.extend(lddw(r as u8, v));
    }
    let mut epilogue = Vec::new();
    for r in 0..DATA_REGS {
        let off = (DUMP_REGS + 8 * r as usize) as i16;
        epilogue.push(Insn::new(BPF_STX | BPF_MEM | BPF_DW, BASE, r, off, 0));
    }
    for k in 0..STACK_WINDOW / 8 {
        let from = -8 * (k as i16 + 1);
        let to = (DUMP_STACK + 8 * k) as i16;
        epilogue.push(Insn::new(BPF_LDX | BPF_MEM | BPF_DW, SCRATCH, 10, from, 0));
        epilogue.push(Insn::new(BPF_STX | BPF_MEM | BPF_DW, BASE, SCRATCH, to, 0));
    }
    epilogue.push(Insn::new(EXIT, 0, 0, 0, 0));
    programs::layout(
        &case.funcs,
        &Frame {
            prologue: &prologue,
            epilogue: &epilogue,
            heads: &[],
            tails: &[],
        },
    )
}

/// Runs both engines; `Err` describes the disagreement.
fn compare(case: &Case) -> Result<(), String> {
    let insns = layout(case);
    let helpers = HelperRegistry::new();
    let prog = verify(&insns, &helpers).map_err(|e| format!("our loader rejected it: {e}"))?;
    let mut ours_mem = case.mem.clone();
    let ours = Interpreter::new(&prog, &helpers).run(&mut ours_mem);

    let bytes = insns_to_bytes(&insns);
    let mut rbpf_mem = case.mem.clone();
    let theirs = rbpf::EbpfVmRaw::new(Some(&bytes))
        .and_then(|vm| vm.execute_program(&mut rbpf_mem))
        .map_err(|e| e.to_string());

    match (&ours, &theirs) {
        (Ok(a), Ok(b)) if a == b && ours_mem == rbpf_mem => Ok(()),
        (Ok(a), Ok(b)) if a == b => Err(format!(
            "r0 agrees ({a:#x}) but memory differs:\n  ours: {}\n  rbpf: {}",
            hex(&ours_mem),
            hex(&rbpf_mem)
        )),
        _ => Err(format!("ours: {ours:x?}\nrbpf: {theirs:x?}")),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Removes body units one at a time while the disagreement persists.
fn shrink(case: Case) -> Case {
    programs::shrink(case, |c| &mut c.funcs, |c| compare(c).is_err())
}

#[test]
fn interpreter_agrees_with_rbpf_on_random_programs() {
    let seed = seed();
    let n = cases();
    let start = Instant::now();
    let mut slots = 0usize;
    for case_no in 0..n {
        let case = gen_case(&mut Rng::for_case(seed, case_no));
        slots += layout(&case).len();
        if let Err(first) = compare(&case) {
            let small = shrink(case.clone());
            let why = compare(&small).unwrap_err();
            panic!(
                "interpreter and rbpf disagree: BPFTIME_DIFF_SEED={seed:#x}, case {case_no}\n\
                 first report: {first}\n\
                 shrunk program ({} of {} body units):\n{}\n{why}\n\
                 memory block before the run: {}",
                small.funcs[0].len(),
                case.funcs[0].len(),
                disassemble(&layout(&small)),
                hex(&small.mem),
            );
        }
    }
    println!(
        "differential: {n} programs ({slots} slots) agree with rbpf, seed {seed:#x}, {:?}",
        start.elapsed()
    );
}

/// A random instruction from the whole ISA, with registers r0–r10 and jump and call targets
/// near `pc` in a program of `len` slots, so that a good share of programs verify.
fn random_op(rng: &mut Rng, pc: usize, len: usize) -> Op {
    use bpftime_vm::isa::{AluOp, AtomicOp, Endian, JmpCond, LdImmKind, Size, Src, Width};
    let width = |rng: &mut Rng| rng.pick(&[Width::W32, Width::W64]);
    // Registers to read may be r10; registers written rarely are (the loader rejects that).
    let reg = |rng: &mut Rng| rng.below(11) as u8;
    let dst = |rng: &mut Rng| {
        let n = if rng.percent(98) { 10 } else { 11 };
        rng.below(n) as u8
    };
    let src = |rng: &mut Rng| {
        if rng.percent(50) {
            Src::Reg(rng.below(11) as u8)
        } else {
            Src::Imm(rng.imm32())
        }
    };
    let size = |rng: &mut Rng| rng.pick(&[Size::B, Size::H, Size::W, Size::DW]);
    // A base register and an offset: mostly inside the stack frame or near the memory block.
    let addr = |rng: &mut Rng| -> (u8, i16) {
        match rng.below(10) {
            0..=4 => (10, rng.range(-512, -1) as i16),
            5..=7 => (1, rng.range(-8, 80) as i16),
            8 => (rng.below(11) as u8, rng.range(-16, 16) as i16),
            _ => (rng.below(11) as u8, rng.next() as i16),
        }
    };
    let rel = |rng: &mut Rng| rng.range(-(pc as i64) - 1, (len - pc) as i64);
    match rng.below(100) {
        0..=29 => Op::Alu {
            width: width(rng),
            op: rng.pick(&[
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
            ]),
            dst: dst(rng),
            src: src(rng),
        },
        30..=31 => Op::Neg {
            width: width(rng),
            dst: dst(rng),
        },
        32..=33 => {
            let width = width(rng);
            let bits = match width {
                Width::W32 => rng.pick(&[8, 16]),
                Width::W64 => rng.pick(&[8, 16, 32]),
            };
            Op::MovSx {
                width,
                dst: dst(rng),
                src: reg(rng),
                bits,
            }
        }
        34..=35 => Op::Endian {
            kind: rng.pick(&[Endian::Le, Endian::Be, Endian::Swap]),
            bits: rng.pick(&[16, 32, 64]),
            dst: dst(rng),
        },
        36..=40 => Op::LdImm64 {
            dst: dst(rng),
            kind: if rng.percent(95) {
                LdImmKind::Imm64
            } else {
                LdImmKind::MapFd
            },
            lo: rng.imm32(),
            hi: rng.imm32(),
        },
        41..=52 => {
            let (base, off) = addr(rng);
            Op::Load {
                size: size(rng),
                signed: rng.percent(20),
                dst: dst(rng),
                src: base,
                off,
            }
        }
        53..=64 => {
            let (base, off) = addr(rng);
            Op::Store {
                size: size(rng),
                dst: base,
                off,
                src: src(rng),
            }
        }
        65..=69 => {
            let (base, off) = addr(rng);
            let fetch = rng.percent(50);
            Op::Atomic {
                size: rng.pick(&[Size::W, Size::DW]),
                op: rng.pick(&[
                    AtomicOp::Add,
                    AtomicOp::Or,
                    AtomicOp::And,
                    AtomicOp::Xor,
                    AtomicOp::Xchg,
                    AtomicOp::CmpXchg,
                ]),
                fetch,
                dst: base,
                src: if fetch { dst(rng) } else { reg(rng) },
                off: off & !3,
            }
        }
        70..=73 => Op::Ja {
            off: rel(rng) as i32,
        },
        74..=87 => Op::Jmp {
            width: width(rng),
            cond: rng.pick(&[
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
            ]),
            dst: reg(rng),
            src: src(rng),
            off: rel(rng) as i16,
        },
        88..=90 => Op::Call {
            id: if rng.percent(90) {
                5
            } else {
                rng.below(8) as u32
            },
        },
        91..=93 => Op::CallLocal {
            off: rel(rng) as i32,
        },
        94 => Op::Callx { reg: reg(rng) },
        _ => Op::Exit,
    }
}

/// A program of random instructions; now and then one bit of it is flipped, so the strict
/// decoder's rejections are exercised too.
fn random_program(rng: &mut Rng) -> Vec<u8> {
    if rng.percent(5) {
        return (0..rng.below(64)).map(|_| rng.next() as u8).collect();
    }
    let len = 1 + rng.below(32) as usize;
    let mut insns = Vec::with_capacity(len + 2);
    while insns.len() < len {
        let op = random_op(rng, insns.len(), len);
        insns.extend(encode(&op));
    }
    if rng.percent(70) {
        insns.push(Insn::new(EXIT, 0, 0, 0, 0));
    }
    let mut bytes = insns_to_bytes(&insns);
    if rng.percent(20) {
        let bit = rng.below(bytes.len() as u64 * 8);
        bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
    }
    if rng.percent(3) {
        bytes.extend((0..rng.below(8)).map(|_| rng.next() as u8));
    }
    bytes
}

#[test]
fn random_bytes_never_panic_loader_or_interpreter() {
    let base_seed = seed();
    let seed = base_seed ^ 0xf0f0;
    let n = cases() * 2;
    let helpers = conformance_helpers();
    let start = Instant::now();
    let (mut accepted, mut finished) = (0u64, 0u64);
    for case_no in 0..n {
        let mut rng = Rng::for_case(seed, case_no);
        let bytes = random_program(&mut rng);
        let mut mem: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let insns = insns_from_bytes(&bytes[..bytes.len() / 8 * 8]).expect("multiple of 8");
            let Ok(prog) = verify(&insns, &helpers) else {
                return (false, false);
            };
            let r = Interpreter::new(&prog, &helpers)
                .with_budget(Some(10_000))
                .run(&mut mem);
            (true, r.is_ok())
        }));
        match outcome {
            Ok((a, f)) => {
                accepted += u64::from(a);
                finished += u64::from(f);
            }
            Err(_) => panic!(
                "panic on BPFTIME_DIFF_SEED={base_seed:#x}, case {case_no}, input {}",
                hex(&bytes)
            ),
        }
    }
    println!(
        "loader/interpreter robustness: {n} inputs, {accepted} verified, {finished} ran to exit, {:?}",
        start.elapsed()
    );
    assert!(
        accepted * 10 > n,
        "only {accepted} of {n} inputs verified: the generator no longer exercises the interpreter"
    );
}
