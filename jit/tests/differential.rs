//! Differential test: the interpreter against the x86_64 JIT (checked, and unchecked when the
//! interpreter did not trap) on generated programs covering the whole ISA.
//!
//! Compared per program: r0 or the trap (kind and pc; addresses normalised relative to the
//! memory block or the stack, which live at different addresses in each run), the memory block,
//! a buffer handed out by a map-lookup-like helper (with a grant), and the log of helper calls.
//!
//! Seeded: `BPFTIME_JIT_DIFF_SEED` (decimal or `0x` hex) overrides the fixed default seed and
//! `BPFTIME_JIT_DIFF_CASES` the number of programs (default 100,000). A failure prints the seed,
//! the case number and the shrunk program's disassembly.
//!
//! # Program shape
//!
//! `mov r9, r1` (r9 = memory block, only ever a base), `lddw` random values into r0–r8, the
//! main function's units, an epilogue storing r0–r7 and a 64-byte stack window into the block,
//! `exit`; then up to 3 subprograms (units, `exit`). Units: ALU (all ops and widths, sdiv/smod,
//! movsx, neg, le/be/bswap), lddw, loads/stores/ldsx of every size through r9, r10 or a stack
//! pointer in r8, atomics (every op, fetch or not, sometimes misaligned), out-of-bounds accesses
//! (traps in checked mode), helper calls (logging, stopping, faulting, reading/writing guest
//! memory, granting a buffer), `callx` (known and unknown ids), bpf-to-bpf calls to later
//! functions, forward `ja`/`ja32`/conditional jumps (JMP and JMP32, imm and reg), early exits and
//! bounded loops (counter in r8, backward `jne`), and `bpf_loop` calls of a callback function
//! (`lddw r2, func f`; the callback's context is the block). The generator's core is
//! `bpftime_testkit::programs`, shared with the other differential tests. Data registers are
//! r0–r7; pointers to the
//! block or the stack never reach them, so both engines must produce identical bytes. After a
//! helper call r1–r5 are reset to constants (the JIT clobbers them, as the kernel does).

#![cfg(target_arch = "x86_64")]

use bpftime_jit::{JitOptions, JitProgram};
use bpftime_testkit::programs::{
    self, Frame, Rng, Unit, alu, alu_op, counted_loop, jump_insn, lddw, mov_imm, mov64,
};
use bpftime_vm::disasm::disassemble;
use bpftime_vm::helper::{BPF_LOOP, CallEnv, HelperRegistry, MemRegion, bpf_loop};
use bpftime_vm::interpreter::{Interpreter, Trap, TrapKind};
use bpftime_vm::isa::{AluOp, AtomicOp, Insn, Op, Size, Src, Width, encode};
use bpftime_vm::memory::{GuestMemory, MAX_FRAMES};
use bpftime_vm::opcode::*;
use bpftime_vm::verifier::verify;
use std::cell::{Cell, RefCell};
use std::time::Instant;

const DEFAULT_SEED: u64 = 0x6a69_745f_6469_6666;
const DEFAULT_CASES: u64 = 100_000;

const DATA_REGS: u8 = 8;
const SCRATCH: u8 = 8;
const BASE: u8 = 9;
const MEM_DATA: usize = 64;
const STACK_WINDOW: usize = 64;
const DUMP_REGS: usize = MEM_DATA;
const DUMP_STACK: usize = DUMP_REGS + 8 * DATA_REGS as usize;
const MEM_LEN: usize = DUMP_STACK + STACK_WINDOW;
/// Unused bytes around the block, so that out-of-bounds offsets never reach another region.
const PAD: usize = 512;
/// Helper ids of the test helpers.
const H_LOG: u32 = 1;
const H_STOP: u32 = 2;
const H_FAULT: u32 = 3;
const H_READ: u32 = 4;
const H_WRITE: u32 = 7;
const H_LOOKUP: u32 = 6;
const HELPER_IDS: [u32; 6] = [H_LOG, H_STOP, H_FAULT, H_READ, H_WRITE, H_LOOKUP];

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Test helpers: they record their calls in a thread-local log.

#[derive(Clone, Debug, PartialEq, Eq)]
struct Call {
    id: u32,
    args: [u64; 5],
    extra: u64,
}

thread_local! {
    static LOG: RefCell<Vec<Call>> = const { RefCell::new(Vec::new()) };
    /// The "map value" the lookup helper hands out; the same address for every run. 64-byte
    /// aligned, so that the checked JIT caches it as a window after the first access.
    static BUF: Box<Line> = Box::new(Line(std::array::from_fn(|_| Cell::new(0))));
}

#[repr(align(64))]
struct Line([Cell<u64>; 8]);

fn log(id: u32, args: [u64; 5], extra: u64) {
    LOG.with(|l| l.borrow_mut().push(Call { id, args, extra }));
}

extern "C" fn h_log(a: u64, b: u64, c: u64, d: u64, e: u64, _: &mut CallEnv) -> u64 {
    log(H_LOG, [a, b, c, d, e], 0);
    a.wrapping_mul(3) ^ e.rotate_left(7) ^ c
}

extern "C" fn h_stop(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    log(H_STOP, [a, b, c, d, e], 0);
    if a.is_multiple_of(8) {
        env.request_exit(b);
    }
    a ^ b
}

extern "C" fn h_fault(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    log(H_FAULT, [a, b, c, d, e], 0);
    if a % 8 == 1 {
        env.fault(b as u32);
    }
    a.wrapping_add(1)
}

extern "C" fn h_read(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    let off = a & 56;
    let mut buf = [0u8; 8];
    let ok = env.read_guest(env.ctx + off, &mut buf);
    let v = u64::from_le_bytes(buf);
    log(H_READ, [a, b, c, d, e], u64::from(ok) << 63 | (v >> 1));
    v
}

extern "C" fn h_write(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    let off = a & 56;
    let ok = env.write_guest(env.ctx + off, &b.to_le_bytes());
    log(H_WRITE, [a, b, c, d, e], u64::from(ok));
    u64::from(ok)
}

extern "C" fn h_lookup(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    log(H_LOOKUP, [a, b, c, d, e], 0);
    let addr = BUF.with(|b| b.0.as_ptr() as u64);
    // Read-only for odd r1: stores to it trap in checked mode.
    // SAFETY: the thread-local buffer lives for the thread, longer than any run; it is only
    // accessed through `Cell`s (interior mutability) outside runs.
    unsafe { env.grant(addr, 64, a.is_multiple_of(2)) };
    addr
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(H_LOG, "log", h_log)
        .register_stopping(H_STOP, "stop", h_stop)
        .register_stopping(H_FAULT, "fault", h_fault)
        .register(H_READ, "read", h_read)
        .register(H_WRITE, "write", h_write)
        .register(H_LOOKUP, "lookup", h_lookup)
        .register_calling_back(BPF_LOOP, "bpf_loop", bpf_loop);
    h
}

// ---------------------------------------------------------------------------------------------
// Generator.

/// The data registers.
const DATA: [u8; DATA_REGS as usize] = [0, 1, 2, 3, 4, 5, 6, 7];

fn data_reg(rng: &mut Rng) -> u8 {
    rng.pick(&DATA)
}

#[derive(Clone, Debug)]
struct Case {
    init: [u64; SCRATCH as usize + 1],
    /// funcs[0] is main; with `callback`, the last one is a `bpf_loop` callback (never called
    /// directly).
    funcs: Vec<Vec<Unit>>,
    callback: bool,
    mem: Vec<u8>,
    readonly: bool,
    /// Whether the epilogue stores r3 (when not, and nothing else reads r3, the JIT may use
    /// rdx as scratch).
    dump_r3: bool,
    /// The data register whose low bit a callback returns (1 stops `bpf_loop`).
    callback_ret: u8,
}

fn one(op: Op) -> Vec<Insn> {
    encode(&op)
}

/// Resets r1–r5 after a helper call (the JIT clobbers them).
fn reset_args(rng: &mut Rng, out: &mut Vec<Insn>) {
    for r in 1..=5u8 {
        out.extend(encode(&mov_imm(r, rng.imm32())));
    }
}

fn gen_alu(rng: &mut Rng) -> Vec<Insn> {
    one(alu_op(rng, &DATA, &DATA))
}

/// A base and an in-bounds offset for `len` bytes; `r8_ok`: r8 may be set to a stack pointer.
fn address(rng: &mut Rng, len: i64, r8_ok: bool, out: &mut Vec<Insn>) -> (u8, i16) {
    match rng.below(10) {
        0..=3 => (10, rng.range(-(STACK_WINDOW as i64), -len) as i16),
        4..=7 => (BASE, rng.range(0, MEM_DATA as i64 - len) as i16),
        _ if r8_ok => {
            let k = rng.range(1, 8) * 8;
            out.extend(encode(&mov64(SCRATCH, 10)));
            out.extend(encode(&Op::Alu {
                width: Width::W64,
                op: AluOp::Add,
                dst: SCRATCH,
                src: Src::Imm(-k as i32),
            }));
            // r8 + off in [fp - 64, fp - len].
            (SCRATCH, rng.range(k - STACK_WINDOW as i64, k - len) as i16)
        }
        _ => (BASE, rng.range(0, MEM_DATA as i64 - len) as i16),
    }
}

/// An address that is (almost surely) outside every region.
fn bad_address(rng: &mut Rng) -> (u8, i16) {
    match rng.below(3) {
        0 => (data_reg(rng), rng.next() as i16),
        1 => (
            BASE,
            rng.range(MEM_LEN as i64 - 7, MEM_LEN as i64 + 300) as i16,
        ),
        _ => (BASE, rng.range(-300, -1) as i16),
    }
}

fn gen_mem(rng: &mut Rng, r8_ok: bool) -> Vec<Insn> {
    let mut out = Vec::new();
    let size = rng.size();
    let len = size.bytes() as i64;
    let (base, off) = if rng.percent(4) {
        bad_address(rng)
    } else {
        address(rng, len, r8_ok, &mut out)
    };
    let op = match rng.below(3) {
        0 => Op::Load {
            size,
            signed: size != Size::DW && rng.percent(30),
            dst: data_reg(rng),
            src: base,
            off,
        },
        1 => Op::Store {
            size,
            dst: base,
            off,
            src: Src::Reg(data_reg(rng)),
        },
        _ => Op::Store {
            size,
            dst: base,
            off,
            src: Src::Imm(rng.imm32()),
        },
    };
    out.extend(encode(&op));
    out
}

fn gen_atomic(rng: &mut Rng, r8_ok: bool) -> Vec<Insn> {
    let mut out = Vec::new();
    let size = rng.pick(&[Size::W, Size::DW]);
    let len = size.bytes() as i64;
    let (base, mut off) = if rng.percent(3) {
        bad_address(rng)
    } else {
        address(rng, len, r8_ok, &mut out)
    };
    if !rng.percent(6) {
        // Round down to natural alignment (r9, r10 and r8 = fp - 8k are 8-aligned); stays
        // inside the block or the frame.
        off &= !(len as i16 - 1);
    }
    let (op, fetch) = rng.pick(&[
        (AtomicOp::Add, false),
        (AtomicOp::Add, true),
        (AtomicOp::Or, false),
        (AtomicOp::Or, true),
        (AtomicOp::And, false),
        (AtomicOp::And, true),
        (AtomicOp::Xor, false),
        (AtomicOp::Xor, true),
        (AtomicOp::Xchg, true),
        (AtomicOp::CmpXchg, true),
    ]);
    out.extend(encode(&Op::Atomic {
        size,
        op,
        fetch,
        dst: base,
        src: data_reg(rng),
        off,
    }));
    out
}

fn gen_helper_call(rng: &mut Rng) -> Vec<Insn> {
    let id = rng.pick(&HELPER_IDS);
    let mut out = encode(&Op::Call { id });
    reset_args(rng, &mut out);
    if id == H_LOOKUP {
        // Use the granted buffer through r0.
        let k = rng.range(0, 7) as i16 * 8;
        let op = match rng.below(4) {
            0 => Op::Load {
                size: Size::DW,
                signed: false,
                dst: data_reg(rng),
                src: 0,
                off: k,
            },
            1 => Op::Store {
                size: Size::DW,
                dst: 0,
                off: k,
                src: Src::Reg(rng.range(1, 7) as u8),
            },
            2 => Op::Atomic {
                size: Size::DW,
                op: AtomicOp::Add,
                fetch: true,
                dst: 0,
                src: rng.range(1, 7) as u8,
                off: k,
            },
            _ => Op::Load {
                size: Size::W,
                signed: true,
                dst: rng.range(1, 7) as u8,
                src: 0,
                off: k + 4,
            },
        };
        out.extend(encode(&op));
    }
    out
}

fn gen_callx(rng: &mut Rng) -> Vec<Insn> {
    let id: u64 = if rng.percent(15) {
        rng.pick(&[0, 99, 5, 1 << 32 | u64::from(H_LOG), u64::MAX])
    } else {
        u64::from(rng.pick(&HELPER_IDS))
    };
    let mut out = encode(&lddw(SCRATCH, id));
    out.extend(encode(&Op::Callx { reg: SCRATCH }));
    reset_args(rng, &mut out);
    out
}

/// Straight-line code (no jumps, r8 untouched when `!r8_ok`).
fn gen_code(rng: &mut Rng, r8_ok: bool) -> Vec<Insn> {
    match rng.below(100) {
        0..=44 => gen_alu(rng),
        45..=69 => gen_mem(rng, r8_ok),
        70..=81 => gen_atomic(rng, r8_ok),
        82..=91 => gen_helper_call(rng),
        _ if r8_ok => gen_callx(rng),
        _ => gen_alu(rng),
    }
}

fn gen_jump(rng: &mut Rng) -> Insn {
    jump_insn(rng, &DATA)
}

/// A `bpf_loop` of the case's callback: 0–4 loops over the block (r3 = r9, so the callback's
/// r2 is the block), now and then too many loops or non-zero flags (errors, no call).
fn gen_callback(rng: &mut Rng, func: usize) -> Unit {
    let loops = if rng.percent(5) {
        1 << 24
    } else {
        rng.range(0, 4) as i32
    };
    let mut before = encode(&mov_imm(1, loops));
    before.extend(encode(&mov64(3, BASE)));
    before.extend(encode(&mov_imm(4, i32::from(rng.percent(5)))));
    let mut after = Vec::new();
    reset_args(rng, &mut after);
    Unit::Callback {
        func,
        before,
        after,
    }
}

/// Units of function `func`: `callable` functions may be called (the callback, if any, comes
/// after them), `callback` is the callback's index.
fn gen_unit(
    rng: &mut Rng,
    func: usize,
    callable: usize,
    callback: Option<usize>,
    index: usize,
    len: usize,
) -> Unit {
    let in_callback = callback == Some(func);
    match rng.below(100) {
        0..=71 => Unit::Code(gen_code(rng, true)),
        72..=83 => Unit::Jump {
            insn: gen_jump(rng),
            target: index + 1 + rng.below((len - index) as u64) as usize,
        },
        84..=88 if func + 1 < callable => Unit::Call {
            func: rng.range(func as i64 + 1, callable as i64 - 1) as usize,
        },
        89..=94 => {
            let body: Vec<Insn> = (0..rng.range(1, 4))
                .flat_map(|_| gen_code(rng, false))
                .collect();
            Unit::Code(counted_loop(SCRATCH, rng.range(1, 5) as i32, &body))
        }
        95 | 96 => Unit::Code(vec![Insn::new(EXIT, 0, 0, 0, 0)]),
        97..=99 if !in_callback && callback.is_some() => {
            gen_callback(rng, callback.unwrap_or_default())
        }
        _ => Unit::Code(gen_code(rng, true)),
    }
}

fn gen_case(rng: &mut Rng) -> Case {
    let mut init = [0u64; SCRATCH as usize + 1];
    for v in &mut init {
        *v = rng.value64();
    }
    let callable = 1 + rng.below(4) as usize;
    let callback = rng.percent(30).then_some(callable);
    let nfuncs = callable + usize::from(callback.is_some());
    let funcs = (0..nfuncs)
        .map(|f| {
            let len = if f == 0 {
                1 + rng.below(30) as usize
            } else {
                1 + rng.below(8) as usize
            };
            (0..len)
                .map(|i| gen_unit(rng, f, callable, callback, i, len))
                .collect()
        })
        .collect();
    let mut mem = vec![0u8; MEM_LEN];
    for b in &mut mem[..MEM_DATA] {
        *b = rng.next() as u8;
    }
    Case {
        init,
        funcs,
        callback: callback.is_some(),
        mem,
        readonly: rng.percent(5),
        dump_r3: rng.percent(70),
        callback_ret: data_reg(rng),
    }
}

/// Lays out all functions, resolving jump and call targets.
fn layout(case: &Case) -> Vec<Insn> {
    let mut prologue = encode(&mov64(BASE, 1));
    for (r, &v) in case.init.iter().enumerate() {
        prologue.extend(encode(&lddw(r as u8, v)));
    }
    let mut epilogue = Vec::new();
    for r in (0..DATA_REGS).filter(|&r| r != 3 || case.dump_r3) {
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
    let n = case.funcs.len();
    let mut heads = vec![Vec::new(); n];
    let mut tails = vec![vec![Insn::new(EXIT, 0, 0, 0, 0)]; n];
    if case.callback {
        // The callback gets the block as its context (r2): r9 as everywhere else, and r2 a
        // constant (no pointer in a data register); it returns the low bit of a data register
        // (1 stops the loop).
        heads[n - 1] = [encode(&mov64(BASE, 2)), encode(&mov_imm(2, 0x1234))].concat();
        tails[n - 1] = [
            encode(&mov64(0, case.callback_ret)),
            encode(&alu(Width::W64, AluOp::And, 0, Src::Imm(1))),
            vec![Insn::new(EXIT, 0, 0, 0, 0)],
        ]
        .concat();
    }
    programs::layout(
        &case.funcs,
        &Frame {
            prologue: &prologue,
            epilogue: &epilogue,
            heads: &heads,
            tails: &tails,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Running and comparing.

/// Where an address points, relative to the run's own allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Addr {
    Mem(i64),
    Stack(i64),
    Abs(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Exit(u64),
    Trap {
        pc: usize,
        kind: String,
        addr: Option<Addr>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Run {
    outcome: Outcome,
    mem: Vec<u8>,
    buf: [u64; 8],
    log: Vec<Call>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Interpreter,
    Checked,
    Unchecked,
}

/// Inside the stack, or near the block (out-of-bounds offsets stay inside the block's padding,
/// so they never fall into the stack), or elsewhere.
fn normalize(addr: u64, mem: u64, stack_lo: u64) -> Addr {
    const NEAR: u64 = PAD as u64;
    let s = addr.wrapping_sub(stack_lo);
    if s < (MAX_FRAMES * bpftime_vm::memory::FRAME_SIZE) as u64 {
        return Addr::Stack(s as i64);
    }
    let d = addr.wrapping_sub(mem);
    if d < MEM_LEN as u64 + NEAR || d.wrapping_neg() <= NEAR {
        return Addr::Mem(d as i64);
    }
    Addr::Abs(addr)
}

fn run_engine(
    engine: Engine,
    prog: &bpftime_vm::verifier::Program,
    helpers: &HelperRegistry,
    case: &Case,
) -> Result<Run, String> {
    let mut backing = vec![0u8; PAD + MEM_LEN + PAD];
    backing[PAD..PAD + MEM_LEN].copy_from_slice(&case.mem);
    let block = &mut backing[PAD..PAD + MEM_LEN];
    let start = block.as_mut_ptr() as u64;
    let mut gm = GuestMemory::new();
    // SAFETY: `backing` outlives `gm` and is only accessed through the run while it lasts.
    unsafe {
        gm.add_region(MemRegion {
            start,
            len: MEM_LEN as u64,
            writable: !case.readonly,
        })
    };
    let stack_lo = gm.frame_pointer(MAX_FRAMES);
    BUF.with(|b| {
        for (i, c) in b.0.iter().enumerate() {
            c.set(0x0101_0101_0101_0101 * (i as u64 + 1));
        }
    });
    LOG.with(|l| l.borrow_mut().clear());
    let r = match engine {
        Engine::Interpreter => Interpreter::new(prog, helpers).run_in(
            &mut gm,
            start,
            MEM_LEN as u64,
            std::ptr::null_mut(),
        ),
        Engine::Checked | Engine::Unchecked => {
            let opts = JitOptions {
                checked: engine == Engine::Checked,
                ..Default::default()
            };
            let jit = JitProgram::new(prog, helpers, &opts).map_err(|e| e.to_string())?;
            jit.run_in(&mut gm, start, MEM_LEN as u64, std::ptr::null_mut())
        }
    };
    drop(gm);
    let outcome = match r {
        Ok(v) => Outcome::Exit(v),
        Err(Trap { kind, pc }) => {
            let addr = match kind {
                TrapKind::OutOfBounds { addr, .. } | TrapKind::Misaligned { addr, .. } => {
                    Some(normalize(addr, start, stack_lo))
                }
                _ => None,
            };
            let kind = match kind {
                TrapKind::OutOfBounds { len, write, .. } => format!("oob len {len} write {write}"),
                TrapKind::Misaligned { len, .. } => format!("misaligned len {len}"),
                k => format!("{k:?}"),
            };
            Outcome::Trap { pc, kind, addr }
        }
    };
    Ok(Run {
        outcome,
        mem: backing[PAD..PAD + MEM_LEN].to_vec(),
        buf: BUF.with(|b| std::array::from_fn(|i| b.0[i].get())),
        log: LOG.with(|l| std::mem::take(&mut *l.borrow_mut())),
    })
}

#[derive(Default, Debug)]
struct Stats {
    exits: u64,
    traps: std::collections::BTreeMap<String, u64>,
    unchecked_runs: u64,
    helper_calls: u64,
    slots: u64,
    /// Programs with a `bpf_loop` callback.
    callbacks: u64,
}

/// The fields of two runs that differ, interpreter first.
fn diff(a: &Run, b: &Run) -> String {
    let mut out = String::new();
    if a.outcome != b.outcome {
        out += &format!("  outcome: {:x?} vs {:x?}\n", a.outcome, b.outcome);
    }
    for (i, (x, y)) in a.mem.iter().zip(&b.mem).enumerate() {
        if x != y {
            out += &format!("  mem[{i}]: {x:#04x} vs {y:#04x}\n");
        }
    }
    if a.buf != b.buf {
        out += &format!("  lookup buffer: {:x?} vs {:x?}\n", a.buf, b.buf);
    }
    if a.log != b.log {
        out += &format!("  helper log: {:x?}\n   vs {:x?}\n", a.log, b.log);
    }
    out
}

/// Runs the engines; `Err` describes the first disagreement.
fn compare(case: &Case, helpers: &HelperRegistry, stats: Option<&mut Stats>) -> Result<(), String> {
    let insns = layout(case);
    let prog = verify(&insns, helpers).map_err(|e| format!("the loader rejected it: {e}"))?;
    let reference = run_engine(Engine::Interpreter, &prog, helpers, case)?;
    let checked = run_engine(Engine::Checked, &prog, helpers, case)?;
    if checked != reference {
        return Err(format!(
            "checked JIT disagrees:\n{}",
            diff(&reference, &checked)
        ));
    }
    let run_unchecked = matches!(reference.outcome, Outcome::Exit(_)) && !case.readonly;
    if run_unchecked {
        let unchecked = run_engine(Engine::Unchecked, &prog, helpers, case)?;
        if unchecked != reference {
            return Err(format!(
                "unchecked JIT disagrees:\n{}",
                diff(&reference, &unchecked)
            ));
        }
    }
    if let Some(s) = stats {
        s.slots += insns.len() as u64;
        s.callbacks += u64::from(
            insns
                .iter()
                .any(|i| i.code == LDDW && i.src == BPF_PSEUDO_FUNC),
        );
        s.helper_calls += reference.log.len() as u64;
        s.unchecked_runs += u64::from(run_unchecked);
        match &reference.outcome {
            Outcome::Exit(_) => s.exits += 1,
            Outcome::Trap { kind, .. } => {
                let k = kind.split([' ', '{']).next().unwrap_or(kind).to_string();
                *s.traps.entry(k).or_default() += 1;
            }
        }
    }
    Ok(())
}

/// Removes units while the disagreement persists.
fn shrink(case: Case, helpers: &HelperRegistry) -> Case {
    programs::shrink(
        case,
        |c| &mut c.funcs,
        |c| compare(c, helpers, None).is_err(),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn jit_agrees_with_interpreter_on_generated_programs() {
    let seed = env_u64("BPFTIME_JIT_DIFF_SEED").unwrap_or(DEFAULT_SEED);
    let n = env_u64("BPFTIME_JIT_DIFF_CASES").unwrap_or(DEFAULT_CASES);
    let helpers = helpers();
    let mut stats = Stats::default();
    let start = Instant::now();
    for case_no in 0..n {
        let case = gen_case(&mut Rng::for_case(seed, case_no));
        if let Err(first) = compare(&case, &helpers, Some(&mut stats)) {
            let mut small = shrink(case.clone(), &helpers);
            let why = match compare(&small, &helpers, None) {
                Err(why) => why,
                Ok(()) => {
                    // Not reproducible while shrinking: report the case as generated.
                    small = case.clone();
                    format!("(not reproduced on re-run) {first}")
                }
            };
            panic!(
                "interpreter and x86_64 JIT disagree: BPFTIME_JIT_DIFF_SEED={seed:#x}, case {case_no}\n\
                 first report: {first}\n\
                 shrunk program (read-only block: {}):\n{}\n{why}\n\
                 memory block before the run: {}",
                small.readonly,
                disassemble(&layout(&small)),
                hex(&small.mem),
            );
        }
    }
    println!(
        "jit differential: {n} programs ({} slots, {} with callbacks), seed {seed:#x}, {:?}: {} \
         exits, traps {:?}, {} also unchecked, {} helper calls, zero mismatches",
        stats.slots,
        stats.callbacks,
        start.elapsed(),
        stats.exits,
        stats.traps,
        stats.unchecked_runs,
        stats.helper_calls,
    );
    assert!(
        stats.exits * 3 > n,
        "too few programs run to exit: {stats:?}"
    );
    assert!(
        stats.callbacks * 10 > n,
        "too few programs with callbacks: {stats:?}"
    );
    for kind in ["oob", "misaligned", "UnknownHelper", "HelperFault"] {
        assert!(
            stats.traps.keys().any(|k| k.starts_with(kind)),
            "no {kind} trap generated: {stats:?}"
        );
    }
}

/// Runs `f` on `gm` with the stack zeroed and `block` (registered as the only region) restored
/// to `init`; returns r0 or the trap, the block and the stack afterwards.
fn run_same_memory(
    gm: &mut GuestMemory,
    block: &mut [u8],
    init: &[u8],
    f: impl FnOnce(&mut GuestMemory, u64) -> Result<u64, Trap>,
) -> (Result<u64, Trap>, Vec<u8>, Vec<u8>) {
    gm.reset();
    block.copy_from_slice(init);
    let start = block.as_mut_ptr() as u64;
    // SAFETY: `block` outlives the run and is only accessed through it meanwhile.
    unsafe {
        gm.add_region(MemRegion {
            start,
            len: block.len() as u64,
            writable: true,
        })
    };
    let r = f(gm, start);
    let stack = (gm.frame_pointer(MAX_FRAMES)..gm.frame_pointer(0))
        .step_by(8)
        .flat_map(|a| gm.load(a, 8).expect("stack").to_le_bytes())
        .collect();
    (r, block.to_vec(), stack)
}

/// Generated programs with random bit flips and random dead slots after the last `exit` (the
/// in-CI version of `fuzz/fuzz_targets/jit_differential.rs`): whatever the loader accepts, the
/// JIT compiles (checked and unchecked) without error or panic, and — for programs without
/// helper calls, whose r1–r5 the JIT clobbers — the checked JIT agrees with the interpreter
/// exactly: both run on the same `GuestMemory` and block, so even results that are pointers
/// must be equal.
#[test]
fn mutated_programs_compile_and_agree() {
    let seed = env_u64("BPFTIME_JIT_DIFF_SEED").unwrap_or(DEFAULT_SEED) ^ 0x5eed;
    let n = env_u64("BPFTIME_JIT_DIFF_CASES").unwrap_or(DEFAULT_CASES) / 5;
    let helpers = helpers();
    let (mut verified, mut compared) = (0u64, 0u64);
    for case_no in 0..n {
        let mut rng = Rng::for_case(seed, case_no);
        let mut case = gen_case(&mut rng);
        // No helper calls (the JIT clobbers r1–r5 and a flip may make the program read them).
        for u in case.funcs.iter_mut().flatten() {
            let calls = |c: &[Insn]| {
                c.iter()
                    .any(|i| i.code == CALL && i.src == 0 || i.code == CALLX)
            };
            match u {
                Unit::Code(c) if calls(c) => *u = Unit::Code(Vec::new()),
                Unit::Callback { .. } => *u = Unit::Code(Vec::new()),
                _ => {}
            }
        }
        let mut insns = layout(&case);
        // Dead code after the last exit: valid instructions, and jumps anywhere (the loader
        // does not check unreachable jumps).
        for _ in 0..rng.below(4) {
            if rng.percent(50) {
                insns.extend(gen_code(&mut rng, true));
            } else {
                let mut j = gen_jump(&mut rng);
                j.off = rng.next() as i16 % 64;
                insns.push(j);
            }
        }
        if rng.percent(50) {
            let slot = rng.below(insns.len() as u64) as usize;
            let bit = rng.below(64);
            insns[slot] = Insn::from_u64(insns[slot].to_u64() ^ (1 << bit));
        }
        let Ok(prog) = verify(&insns, &helpers) else {
            continue;
        };
        verified += 1;
        let compile = |checked| {
            JitProgram::new(
                &prog,
                &helpers,
                &JitOptions {
                    checked,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| {
                panic!(
                    "case {case_no}: verified program does not compile: {e}\n{}",
                    disassemble(&insns)
                )
            })
        };
        let (checked, _unchecked) = (compile(true), compile(false));
        // A flipped bit may turn the reset of r1–r5 after a helper call into something that
        // reads them: after calls, only compile (the JIT clobbers r1–r5, as the kernel does).
        if prog
            .ops()
            .iter()
            .flatten()
            .any(|op| matches!(op, Op::Call { .. } | Op::Callx { .. }))
        {
            continue;
        }
        let mut gm = GuestMemory::new();
        let mut block = case.mem.clone();
        let interp = run_same_memory(&mut gm, &mut block, &case.mem, |gm, r1| {
            Interpreter::new(&prog, &helpers)
                .with_budget(Some(100_000))
                .run_in(gm, r1, MEM_LEN as u64, std::ptr::null_mut())
        });
        if matches!(
            interp.0,
            Err(Trap {
                kind: TrapKind::BudgetExhausted,
                ..
            })
        ) {
            continue; // a flipped loop counter: the JIT has no budget
        }
        let log_interp = LOG.with(|l| std::mem::take(&mut *l.borrow_mut()));
        let jit = run_same_memory(&mut gm, &mut block, &case.mem, |gm, r1| {
            checked.run_in(gm, r1, MEM_LEN as u64, std::ptr::null_mut())
        });
        let log_jit = LOG.with(|l| std::mem::take(&mut *l.borrow_mut()));
        if interp != jit || log_interp != log_jit {
            let stack_diff: Vec<_> = (0..interp.2.len())
                .filter(|&i| interp.2[i] != jit.2[i])
                .map(|i| (i as i64 - interp.2.len() as i64, interp.2[i], jit.2[i]))
                .collect();
            panic!(
                "BPFTIME_JIT_DIFF_SEED={seed:#x} (^0x5eed), case {case_no}: interpreter {:x?} vs \
                 checked JIT {:x?}\nblock {}\n   vs {}\nstack (offset from the top, \
                 interpreter, JIT): {stack_diff:x?}\nhelper calls {log_interp:x?}\n   vs \
                 {log_jit:x?}\n{}",
                interp.0,
                jit.0,
                hex(&interp.1),
                hex(&jit.1),
                disassemble(&insns)
            );
        }
        compared += 1;
    }
    println!(
        "mutated programs: {n} generated, {verified} verified, {compared} compared, all agree"
    );
    assert!(
        compared * 4 > n,
        "too few mutated programs ran: {compared} of {n}"
    );
}

#[test]
fn dead_call_of_the_main_function_compiles() {
    // Found by the fuzzer: main; a subprogram nobody calls, which calls main.
    let insns = [
        Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 7),
        Insn::new(EXIT, 0, 0, 0, 0),
        Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, -3),
        Insn::new(EXIT, 0, 0, 0, 0),
        Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, -3),
        Insn::new(EXIT, 0, 0, 0, 0),
    ];
    let helpers = helpers();
    let prog = verify(&insns, &helpers).expect("dead calls are not checked for recursion");
    for checked in [false, true] {
        let jit = JitProgram::new(
            &prog,
            &helpers,
            &JitOptions {
                checked,
                ..Default::default()
            },
        )
        .expect("compiles");
        assert_eq!(jit.run(&mut []), Ok(7));
    }
}

#[test]
fn dead_jump_out_of_the_program_compiles() {
    // Found by the fuzzer: the loader checks the targets of reachable jumps only.
    let insns = [
        Insn::new(EXIT, 0, 0, 0, 0),
        Insn::new(BPF_JMP | BPF_JEQ, 0, 0, 0, 0),
    ];
    let helpers = helpers();
    let prog = verify(&insns, &helpers).expect("the dead jump is not checked");
    for checked in [false, true] {
        let jit = JitProgram::new(
            &prog,
            &helpers,
            &JitOptions {
                checked,
                ..Default::default()
            },
        )
        .expect("compiles");
        assert_eq!(jit.run(&mut []), Ok(0));
    }
}

/// A `switch` as compilers emit it, a run of `jeq r, k`: every input value (in range, out of
/// range, above 32 bits for JMP32), duplicate cases (the first wins) and jumps into the middle
/// of the run agree with the interpreter.
#[test]
fn switch_like_jeq_runs_agree_with_the_interpreter() {
    for width in ["", "32"] {
        // r1 = the input; r0 = 100 + the case taken, or 99 when none.
        let src = format!(
            "ldxdw %r1, [%r1+0]
             jgt %r1, 1000, middle
             jeq{width} %r1, 0, c0
             jeq{width} %r1, 3, c3
             jeq{width} %r1, 2, c2
             jeq{width} %r1, 3, c2
             middle:
             jeq{width} %r1, 7, c7
             jeq{width} %r1, 63, c63
             mov %r0, 99
             exit
             c0:
             mov %r0, 100
             exit
             c2:
             mov %r0, 102
             exit
             c3:
             mov %r0, 103
             exit
             c7:
             mov %r0, 107
             exit
             c63:
             mov %r0, 163
             exit"
        );
        let insns = bpftime_vm::asm::assemble(&src).expect("assembles");
        let helpers = helpers();
        let prog = verify(&insns, &helpers).expect("verifies");
        let jit = JitProgram::new(
            &prog,
            &helpers,
            &JitOptions {
                checked: true,
                ..Default::default()
            },
        )
        .expect("compiles");
        let inputs = (0..70u64).chain([
            u64::MAX,
            1 << 32,
            (1 << 32) | 3,
            (1 << 32) | 7,
            1001,
            1 << 63,
            0xffff_ffff,
        ]);
        for v in inputs {
            let mut a = v.to_le_bytes();
            let mut b = v.to_le_bytes();
            let want = Interpreter::new(&prog, &helpers).run(&mut a);
            assert_eq!(jit.run(&mut b), want, "jeq{width} with input {v:#x}");
        }
    }
}
