//! Differential test: the interpreter against the aarch64 JIT (under Unicorn) on generated
//! programs. Both engines run each program on the *same* memory block and eBPF stack (the
//! emulator maps them at their host addresses, see `support_aarch64`), one after the other, so
//! everything must agree exactly: r0 or the trap (kind, pc, address, length, direction), every
//! byte of the block and of the stack, and the log of helper calls with their arguments.
//!
//! Seeded: `BPFTIME_DIFF_SEED` (decimal or `0x` hex) overrides the default seed and
//! `BPFTIME_A64_DIFF_CASES` the number of programs (default 100,000, split between checked and
//! unchecked mode). A mismatch panics with the seed, the case and the disassembly.
//!
//! # Program shape
//!
//! Main: `mov r9, r1` (r9 = the block for the whole run), `lddw` random values into r0–r8,
//! 1–40 random units, an epilogue storing r0–r8 and 64 bytes of stack into the block, `exit`.
//! Then 0–3 subprograms (units, writes to r6–r9, `exit`); function i only calls functions
//! j > i.
//!
//! Units: ALU32/64 (every op, register or immediate, edge values), `neg`, `movsx`, byte swaps,
//! `lddw`; loads (sign-extending too) and stores of every size, through r9, r10 or a derived
//! pointer with a large offset; atomics of both sizes (every op, fetch or not); forward
//! conditional jumps (JMP/JMP32, register or immediate), `ja` and `gotol`; counted loops;
//! helper calls by id and by `callx` (including unknown ids); local calls; `bpf_loop` calls of
//! a callback function (generator core shared with the other differential tests:
//! `bpftime_testkit::programs`). In checked mode,
//! some accesses are out of bounds, unaligned (atomics) or into memory a helper grants only
//! when called, and some helpers stop the program or fault.
//!
//! Addresses never reach data (r9/r10 are only bases, derived pointers and the "grant" result
//! are overwritten after use), so a seed reproduces the same run although the host places the
//! block and the stack differently in each process.
//!
//! Helpers clobber r1–r5 under the JIT (as in the kernel) but not in the interpreter, so every
//! helper call unit sets r1–r5 again after the call; nothing else depends on them.

mod support_aarch64;

use bpftime_jit::JitOptions;
use bpftime_testkit::programs::{
    self, Frame, Rng, Unit, alu, alu_op, counted_loop, jump_insn, lddw, mov_imm, mov64,
};
use bpftime_vm::disasm::disassemble;
use bpftime_vm::helper::{BPF_LOOP, CallEnv, HelperRegistry, MemRegion, bpf_loop};
use bpftime_vm::interpreter::{Interpreter, Trap};
use bpftime_vm::isa::{AluOp, AtomicOp, Insn, Op, Size, Src, Width, encode};
use bpftime_vm::memory::{FRAME_SIZE, MAX_FRAMES};
use bpftime_vm::verifier::verify;
use std::ffi::c_void;
use std::time::Instant;
use support_aarch64::{Emu, record_grant};

const DEFAULT_SEED: u64 = 0x6161_7263_6836_3421;
const DEFAULT_CASES: u64 = 100_000;

/// The block region the program may access: data, then the dump area.
const DATA_LEN: usize = 256;
const DUMP_REGS: usize = DATA_LEN;
const DUMP_STACK: usize = DUMP_REGS + 8 * 9;
const MEM_LEN: usize = 512;
/// A read-only region (registered with both engines; stores to it trap in checked mode).
const RO_OFF: usize = 4096;
const RO_LEN: usize = 64;
/// Where the "grant" helper hands out 64 bytes (outside the region until granted).
const GRANT_OFF: usize = 8192;
const GRANT_LEN: usize = 64;
/// Bytes of the block compared after each run.
const COMPARED: usize = GRANT_OFF + GRANT_LEN;

const BASE: u8 = 9;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

#[derive(Clone, Debug)]
struct Case {
    /// funcs[0] is main (between prologue and epilogue); with `callback`, the last one is a
    /// `bpf_loop` callback (never called directly).
    funcs: Vec<Vec<Unit>>,
    callback: bool,
    /// The data register whose low bit the callback returns (1 stops `bpf_loop`).
    callback_ret: u8,
    /// Per subprogram: values written into r6–r9 right before its `exit` (the caller must
    /// get its own back).
    scramble: Vec<Vec<(u8, i32)>>,
    init: [u64; 9],
    mem: Vec<u8>,
}

struct Gen<'a> {
    rng: &'a mut Rng,
    checked: bool,
    func: usize,
    /// Functions that units may call (the callback, if any, comes after them).
    callable: usize,
    /// The callback's function index.
    callback: Option<usize>,
}

const DATA: [u8; 9] = [0, 1, 2, 3, 4, 5, 6, 7, 8];

impl Gen<'_> {
    /// One ALU-class instruction writing one of `dsts`.
    fn alu_op(&mut self, dsts: &[u8]) -> Op {
        alu_op(self.rng, dsts, &DATA)
    }

    fn size(&mut self) -> Size {
        self.rng.pick(&[Size::B, Size::H, Size::W, Size::DW])
    }

    /// A base register and offset for an access of `len` bytes, with the instructions that
    /// set the base up. Out of bounds or misaligned only in checked mode.
    fn address(&mut self, len: usize, atomic: bool, write: bool, code: &mut Vec<Op>) -> (u8, i16) {
        let checked = self.checked;
        let align = |rng: &mut Rng, v: i64| {
            if atomic && !(checked && rng.percent(8)) {
                v - v.rem_euclid(len as i64)
            } else {
                v
            }
        };
        let bad = self.checked && self.rng.percent(3);
        if bad {
            // Just outside a region (or inside one a helper has not granted yet).
            let tmp = self.rng.pick(&[6, 7, 8]);
            let (from, at) = match self.rng.below(5) {
                0 => (BASE, MEM_LEN as i64 - self.rng.range(0, len as i64 - 1)),
                1 => (BASE, -self.rng.range(1, 16)),
                2 => (10, self.rng.range(-(len as i64) + 1, 16)),
                3 => (
                    10,
                    -((FRAME_SIZE * MAX_FRAMES) as i64) - self.rng.range(1, 16),
                ),
                _ => (BASE, GRANT_OFF as i64 + self.rng.range(0, 8)),
            };
            let k = self.rng.range(-20_000, 20_000);
            code.push(mov64(tmp, from));
            code.push(alu(Width::W64, AluOp::Add, tmp, Src::Imm(k as i32)));
            return (tmp, (at - k) as i16);
        }
        if (!write && self.rng.percent(8)) || (write && self.checked && self.rng.percent(2)) {
            // The read-only region: loads work, stores trap (checked mode only).
            let tmp = self.rng.pick(&[6, 7, 8]);
            let at = self.rng.range(0, (RO_LEN - len) as i64);
            let at = align(self.rng, at);
            code.push(mov64(tmp, BASE));
            code.push(alu(Width::W64, AluOp::Add, tmp, Src::Imm(RO_OFF as i32)));
            return (tmp, at as i16);
        }
        match self.rng.below(10) {
            0..=3 => {
                let at = self.rng.range(0, (MEM_LEN - len) as i64);
                let at = align(self.rng, at);
                (BASE, at as i16)
            }
            4..=6 => {
                let at = self.rng.range(-(FRAME_SIZE as i64), -(len as i64));
                let at = align(self.rng, at);
                (10, at.max(-(FRAME_SIZE as i64)) as i16)
            }
            _ => {
                // A derived pointer: large immediates and offsets.
                let tmp = self.rng.pick(&[6, 7, 8]);
                let (from, at) = if self.rng.percent(50) {
                    (BASE, self.rng.range(0, (MEM_LEN - len) as i64))
                } else {
                    (10, self.rng.range(-(FRAME_SIZE as i64), -(len as i64)))
                };
                let at = align(self.rng, at);
                let off = self.rng.range(-32768, 32767);
                let k = at - off;
                code.push(mov64(tmp, from));
                code.push(alu(Width::W64, AluOp::Add, tmp, Src::Imm(k as i32)));
                (tmp, off as i16)
            }
        }
    }

    /// After an access through a derived pointer: give the register a value that does not
    /// depend on where the host put the memory.
    fn forget_pointer(&mut self, base: u8, code: &mut Vec<Op>) {
        if base != BASE && base != 10 {
            code.push(alu(
                Width::W64,
                AluOp::Mov,
                base,
                Src::Imm(self.rng.imm32()),
            ));
        }
    }

    fn load_store(&mut self, code: &mut Vec<Op>) {
        let size = self.size();
        let kind = self.rng.below(3);
        let (base, off) = self.address(size.bytes(), false, kind != 0, code);
        let op = match kind {
            0 => Op::Load {
                size,
                signed: size != Size::DW && self.rng.percent(40),
                dst: self.rng.pick(&DATA),
                src: base,
                off,
            },
            1 => Op::Store {
                size,
                dst: base,
                off,
                src: Src::Reg(self.rng.pick(&DATA)),
            },
            _ => Op::Store {
                size,
                dst: base,
                off,
                src: Src::Imm(self.rng.imm32()),
            },
        };
        code.push(op);
        self.forget_pointer(base, code);
    }

    fn atomic(&mut self, code: &mut Vec<Op>) {
        let size = self.rng.pick(&[Size::W, Size::DW]);
        let (base, off) = self.address(size.bytes(), true, true, code);
        let (op, fetch) = self.rng.pick(&[
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
        // The operand: a data register other than the base (fetch forms write it).
        let src = loop {
            let r = self.rng.pick(&DATA);
            if r != base {
                break r;
            }
        };
        if op == AtomicOp::CmpXchg && self.rng.percent(50) {
            // Make the comparison succeed sometimes: r0 = current value.
            code.push(Op::Load {
                size,
                signed: false,
                dst: 0,
                src: base,
                off,
            });
        }
        code.push(Op::Atomic {
            size,
            op,
            fetch,
            dst: base,
            src,
            off,
        });
        self.forget_pointer(base, code);
    }

    fn loop_unit(&mut self, code: &mut Vec<Insn>) {
        let n = self.rng.range(1, 5) as i32;
        let body: Vec<Insn> = (0..self.rng.range(1, 4))
            .flat_map(|_| encode(&self.alu_op(&[0, 1, 2, 3, 4, 5, 6, 7])))
            .collect();
        code.extend(counted_loop(8, n, &body));
    }

    /// Sets r1–r5 for a helper call of `id`.
    fn helper_args(&mut self, id: u64, code: &mut Vec<Op>) {
        for r in 1..=5u8 {
            let op = match self.rng.below(4) {
                0 => alu(Width::W64, AluOp::Mov, r, Src::Imm(self.rng.imm32())),
                1 => mov64(r, self.rng.pick(&[0, 6, 7, 8])),
                2 => alu(
                    Width::W64,
                    AluOp::Mov,
                    r,
                    Src::Imm(self.rng.range(0, 20) as i32),
                ),
                _ => continue,
            };
            code.push(op);
        }
        // read/write take a pointer: 8 bytes of stack or block.
        if id == 6 || id == 7 {
            let (from, at) = if self.rng.percent(50) {
                (10u8, -8 * self.rng.range(1, 64))
            } else {
                (BASE, self.rng.range(0, (DATA_LEN - 8) as i64))
            };
            code.push(mov64(1, from));
            code.push(alu(Width::W64, AluOp::Add, 1, Src::Imm(at as i32)));
        }
    }

    /// "grant" returns an address in r0: replace it before it can reach data.
    fn forget_r0(&mut self, id: u64, code: &mut Vec<Op>) {
        if id == 4 {
            code.push(alu(Width::W64, AluOp::Mov, 0, Src::Imm(self.rng.imm32())));
        }
    }

    /// After a call: r1–r5 are undefined under the JIT; define them again.
    fn reset_args(&mut self, code: &mut Vec<Op>) {
        for r in 1..=5u8 {
            let op = if self.rng.percent(50) {
                mov64(r, self.rng.pick(&[0, 6, 7, 8]))
            } else {
                alu(Width::W64, AluOp::Mov, r, Src::Imm(self.rng.imm32()))
            };
            code.push(op);
        }
    }

    fn helper_call(&mut self, code: &mut Vec<Op>) {
        let id = self.rng.pick(&[1u32, 2, 3, 4, 6, 7]);
        self.helper_args(id.into(), code);
        code.push(Op::Call { id });
        if id == 4 && self.rng.percent(70) {
            // Use the granted memory through r0.
            let size = self.size();
            let off = self.rng.range(0, (GRANT_LEN - size.bytes()) as i64) as i16;
            code.push(if self.rng.percent(50) {
                Op::Load {
                    size,
                    signed: false,
                    dst: self.rng.pick(&[6, 7, 8]),
                    src: 0,
                    off,
                }
            } else {
                Op::Store {
                    size,
                    dst: 0,
                    off,
                    src: Src::Reg(self.rng.pick(&[6, 7, 8])),
                }
            });
        }
        self.forget_r0(id.into(), code);
        self.reset_args(code);
    }

    fn callx(&mut self, code: &mut Vec<Op>) {
        let id: u64 = if self.checked && self.rng.percent(15) {
            self.rng
                .pick(&[0, 5, 8, 1000, (1 << 32) | 1, u64::MAX, 1 << 40])
        } else {
            self.rng.pick(&[1u64, 2, 3, 4, 6, 7])
        };
        self.helper_args(id, code);
        let reg = self.rng.pick(&[0, 6, 7, 8]);
        code.push(lddw(reg, id));
        code.push(Op::Callx { reg });
        self.forget_r0(id, code);
        self.reset_args(code);
    }

    /// A `bpf_loop` of the callback: 0–4 loops over the block (r3 = r9, so the callback's r2
    /// is the block), now and then too many loops or non-zero flags (errors, no call).
    fn callback_unit(&mut self, func: usize) -> Unit {
        let loops = if self.rng.percent(5) {
            1 << 24
        } else {
            self.rng.range(0, 4) as i32
        };
        let flags = i32::from(self.rng.percent(5));
        let before = [mov_imm(1, loops), mov64(3, BASE), mov_imm(4, flags)]
            .iter()
            .flat_map(encode)
            .collect();
        let mut after = Vec::new();
        self.reset_args(&mut after);
        Unit::Callback {
            func,
            before,
            after: after.iter().flat_map(encode).collect(),
        }
    }

    fn units(&mut self, n: usize) -> Vec<Unit> {
        let in_callback = self.callback == Some(self.func);
        let mut units = Vec::with_capacity(n);
        for i in 0..n {
            let mut ops = Vec::new();
            let mut code = Vec::new();
            match self.rng.below(100) {
                0..=34 => {
                    for _ in 0..self.rng.range(1, 3) {
                        let op = self.alu_op(&DATA);
                        ops.push(op);
                    }
                }
                35..=37 => ops.push(lddw(self.rng.pick(&DATA), self.rng.value64())),
                38..=55 => self.load_store(&mut ops),
                56..=63 => self.atomic(&mut ops),
                64..=77 => {
                    let target = self.rng.range(i as i64 + 1, n as i64) as usize;
                    let insn = jump_insn(self.rng, &DATA);
                    units.push(Unit::Jump { insn, target });
                    continue;
                }
                78..=81 => self.loop_unit(&mut code),
                82..=89 => self.helper_call(&mut ops),
                90..=93 => self.callx(&mut ops),
                94..=96 if !in_callback && self.callback.is_some() => {
                    let f = self.callback.unwrap_or_default();
                    units.push(self.callback_unit(f));
                    continue;
                }
                _ => {
                    if self.func + 1 < self.callable {
                        let func = self
                            .rng
                            .range(self.func as i64 + 1, self.callable as i64 - 1);
                        units.push(Unit::Call {
                            func: func as usize,
                        });
                        continue;
                    }
                    let op = self.alu_op(&DATA);
                    ops.push(op);
                }
            }
            code.extend(ops.iter().flat_map(encode));
            units.push(Unit::Code(code));
        }
        units
    }
}

fn generate(seed: u64, case: u64, checked: bool) -> Case {
    let mut rng = Rng::for_case(seed, case);
    let callable = 1 + rng.below(4) as usize;
    let callback = rng.percent(30).then_some(callable);
    let nfuncs = callable + usize::from(callback.is_some());
    let mut funcs = Vec::new();
    for func in 0..nfuncs {
        let n = if func == 0 {
            rng.range(1, 40)
        } else {
            rng.range(1, 12)
        } as usize;
        let mut g = Gen {
            rng: &mut rng,
            checked,
            func,
            callable,
            callback,
        };
        funcs.push(g.units(n));
    }
    let mut scramble = vec![Vec::new(); nfuncs];
    for regs in &mut scramble {
        for r in 6..=9u8 {
            if rng.percent(50) {
                regs.push((r, rng.imm32()));
            }
        }
    }
    let mut init = [0u64; 9];
    for v in &mut init {
        *v = rng.value64();
    }
    let mut mem = vec![0u8; MEM_LEN];
    for b in &mut mem[..DATA_LEN] {
        *b = rng.next() as u8;
    }
    Case {
        funcs,
        callback: callback.is_some(),
        callback_ret: rng.pick(&DATA),
        scramble,
        init,
        mem,
    }
}

/// Lays the case out as bytecode.
fn layout(c: &Case) -> Vec<Insn> {
    let mut prologue = vec![mov64(BASE, 1)];
    for (r, &v) in c.init.iter().enumerate() {
        prologue.push(lddw(r as u8, v));
    }
    let mut epilogue = Vec::new();
    for r in 0..9u8 {
        epilogue.push(Op::Store {
            size: Size::DW,
            dst: BASE,
            off: (DUMP_REGS + 8 * r as usize) as i16,
            src: Src::Reg(r),
        });
    }
    for k in 0..8 {
        epilogue.push(Op::Load {
            size: Size::DW,
            signed: false,
            dst: 0,
            src: 10,
            off: -8 * (k + 1),
        });
        epilogue.push(Op::Store {
            size: Size::DW,
            dst: BASE,
            off: (DUMP_STACK + 8 * k as usize) as i16,
            src: Src::Reg(0),
        });
    }
    epilogue.push(Op::Exit);
    let n = c.funcs.len();
    let mut heads = vec![Vec::new(); n];
    let mut tails: Vec<Vec<Insn>> = (0..n)
        .map(|f| {
            c.scramble[f]
                .iter()
                .map(|&(r, v)| mov_imm(r, v))
                .chain([Op::Exit])
                .flat_map(|op| encode(&op))
                .collect()
        })
        .collect();
    if c.callback {
        // The callback gets the block as its context (r2): r9 as everywhere else, r2 a
        // constant (no address in data); it returns the low bit of a data register.
        heads[n - 1] = [mov64(BASE, 2), mov_imm(2, 0x1234)]
            .iter()
            .flat_map(encode)
            .collect();
        let ret = [
            mov64(0, c.callback_ret),
            alu(Width::W64, AluOp::And, 0, Src::Imm(1)),
        ];
        let last = tails[n - 1].len() - 1;
        tails[n - 1].splice(last..last, ret.iter().flat_map(encode));
    }
    let flat = |ops: &[Op]| -> Vec<Insn> { ops.iter().flat_map(encode).collect() };
    programs::layout(
        &c.funcs,
        &Frame {
            prologue: &flat(&prologue),
            epilogue: &flat(&epilogue),
            heads: &heads,
            tails: &tails,
        },
    )
}

// ---- helpers ---------------------------------------------------------------------------------

/// Per-run host state behind `env.host`.
#[derive(Debug, Default)]
struct HostLog {
    calls: Vec<(u32, [u64; 5])>,
    grant_addr: u64,
}

fn host_log(env: &mut CallEnv) -> &mut HostLog {
    // SAFETY: every run passes a live, exclusively owned `HostLog` as `host` and nothing else
    // touches it during the run.
    unsafe { &mut *(env.host as *mut HostLog) }
}

extern "C" fn h_mix(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    host_log(env).calls.push((1, [a, b, c, d, e]));
    a.wrapping_mul(31)
        .wrapping_add(b)
        .rotate_left(7)
        .wrapping_add(c ^ d)
        .wrapping_sub(e)
}

extern "C" fn h_stop(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    host_log(env).calls.push((2, [a, b, c, d, e]));
    if a.is_multiple_of(4) {
        env.request_exit(b);
    }
    a.wrapping_mul(3)
}

extern "C" fn h_fault(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    host_log(env).calls.push((3, [a, b, c, d, e]));
    if a.is_multiple_of(5) {
        env.fault(b as u32);
    }
    a ^ b
}

extern "C" fn h_grant(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    let log = host_log(env);
    log.calls.push((4, [a, b, c, d, e]));
    let p = log.grant_addr;
    let region = MemRegion {
        start: p,
        len: GRANT_LEN as u64,
        writable: true,
    };
    // SAFETY: `p` is inside the emulator's block pages, alive for the whole test and accessed
    // only by the program run in progress.
    unsafe { env.grant(region.start, region.len, region.writable) };
    record_grant(region);
    p
}

extern "C" fn h_read(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    host_log(env).calls.push((6, [a, b, c, d, e]));
    let mut buf = [0u8; 8];
    if env.read_guest(a, &mut buf) {
        u64::from_le_bytes(buf)
    } else {
        u64::MAX
    }
}

extern "C" fn h_write(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    host_log(env).calls.push((7, [a, b, c, d, e]));
    u64::from(env.write_guest(a, &b.to_le_bytes()))
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(1, "mix", h_mix)
        .register_stopping(2, "stop", h_stop)
        .register_stopping(3, "fault", h_fault)
        .register(4, "grant", h_grant)
        .register(6, "read", h_read)
        .register(7, "write", h_write)
        .register_calling_back(BPF_LOOP, "bpf_loop", bpf_loop);
    h
}

// ---- running -----------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Observed {
    result: Result<u64, Trap>,
    block: Vec<u8>,
    stack: Vec<u8>,
    calls: Vec<(u32, [u64; 5])>,
}

struct Runner {
    emu: Emu,
    helpers: HelperRegistry,
}

impl Runner {
    fn new() -> Self {
        let helpers = helpers();
        let mut emu = Emu::new();
        emu.set_helpers(&helpers);
        Runner { emu, helpers }
    }

    fn prepare(&mut self, mem: &[u8]) -> (u64, HostLog) {
        let block = self.emu.block_mut();
        block[..COMPARED].fill(0);
        block[..mem.len()].copy_from_slice(mem);
        for (i, b) in block[RO_OFF..RO_OFF + RO_LEN].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0x5a;
        }
        self.emu.guest_memory().reset();
        let addr = self.emu.block_addr();
        (
            addr,
            HostLog {
                calls: Vec::new(),
                grant_addr: addr + GRANT_OFF as u64,
            },
        )
    }

    fn observe(&mut self, result: Result<u64, Trap>, log: HostLog) -> Observed {
        Observed {
            result,
            block: self.emu.block_mut()[..COMPARED].to_vec(),
            stack: self.emu.stack_bytes(),
            calls: log.calls,
        }
    }

    fn interpret(&mut self, prog: &bpftime_vm::verifier::Program, mem: &[u8]) -> Observed {
        let (addr, mut log) = self.prepare(mem);
        let gm = self.emu.guest_memory();
        // SAFETY: the block is host memory owned by the emulator, alive for the whole test and
        // not accessed through references while the interpreter runs.
        unsafe {
            gm.add_region(MemRegion {
                start: addr,
                len: mem.len() as u64,
                writable: true,
            });
            gm.add_region(ro_region(addr));
        }
        let host = (&raw mut log).cast::<c_void>();
        let result = Interpreter::new(prog, &self.helpers).run_in(gm, addr, mem.len() as u64, host);
        self.observe(result, log)
    }

    fn jit(&mut self, code: &bpftime_jit::CompiledCode, mem: &[u8]) -> Result<Observed, String> {
        let (addr, mut log) = self.prepare(mem);
        let entry = self.emu.load(code);
        let host = (&raw mut log).cast::<c_void>();
        let region = MemRegion {
            start: addr,
            len: mem.len() as u64,
            writable: true,
        };
        let out = self.emu.run(
            entry,
            addr,
            mem.len() as u64,
            &[region, ro_region(addr)],
            host,
        )?;
        Ok(self.observe(out.result, log))
    }
}

fn ro_region(block: u64) -> MemRegion {
    MemRegion {
        start: block + RO_OFF as u64,
        len: RO_LEN as u64,
        writable: false,
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn run_cases(checked: bool, first: u64, count: u64) {
    let seed = env_u64("BPFTIME_DIFF_SEED").unwrap_or(DEFAULT_SEED);
    let mut runner = Runner::new();
    let opts = JitOptions {
        checked,
        ..Default::default()
    };
    let start = Instant::now();
    let (mut traps, mut stops, mut insns, mut callbacks) = (0u64, 0u64, 0usize, 0u64);
    for case in first..first + count {
        let c = generate(seed, case, checked);
        let prog_insns = layout(&c);
        insns += prog_insns.len();
        callbacks += u64::from(c.callback);
        let text = || {
            format!(
                "seed {seed:#x} case {case} (checked: {checked}); rerun with \
                 BPFTIME_DIFF_SEED={seed:#x}\n{}",
                disassemble(&prog_insns)
            )
        };
        let prog = verify(&prog_insns, &runner.helpers)
            .unwrap_or_else(|e| panic!("generated program rejected: {e}\n{}", text()));
        let code = support_aarch64::compile(&prog, &runner.helpers, &opts)
            .unwrap_or_else(|e| panic!("compile failed: {e}\n{}", text()));
        let want = runner.interpret(&prog, &c.mem);
        // The JIT's inline fast region: the block, the read-only region (no stores), or none.
        let a = runner.emu.block_addr();
        runner.emu.fast_region = match case % 3 {
            0 => Some((a, MEM_LEN as u64, MEM_LEN as u64)),
            1 => Some((a + RO_OFF as u64, RO_LEN as u64, 0)),
            _ => None,
        };
        let got = runner
            .jit(&code, &c.mem)
            .unwrap_or_else(|e| panic!("JIT run failed: {e}\n{}", text()));
        if want != got {
            let mut why = Vec::new();
            if want.result != got.result {
                why.push(format!(
                    "result: interpreter {:x?}, jit {:x?}",
                    want.result, got.result
                ));
            }
            if let Some(i) = first_difference(&want.block, &got.block) {
                why.push(format!(
                    "block differs from byte {i}: interpreter {:02x?}, jit {:02x?}",
                    &want.block[i..(i + 8).min(COMPARED)],
                    &got.block[i..(i + 8).min(COMPARED)]
                ));
            }
            if let Some(i) = first_difference(&want.stack, &got.stack) {
                why.push(format!(
                    "stack differs from byte {i} (of {})",
                    want.stack.len()
                ));
            }
            if want.calls != got.calls {
                why.push(format!(
                    "helper calls: interpreter {:x?}\n jit {:x?}",
                    want.calls, got.calls
                ));
            }
            panic!("mismatch: {}\n{}", why.join("\n"), text());
        }
        match want.result {
            Err(_) => traps += 1,
            Ok(_) if want.block[DUMP_REGS..DUMP_STACK].iter().all(|&b| b == 0) => stops += 1,
            Ok(_) => {}
        }
    }
    println!(
        "aarch64 differential (checked: {checked}, cases {first}..{}): {count} programs \
         ({insns} slots, {callbacks} with a callback), \
         {traps} traps, ~{stops} early stops, 0 mismatches in {:?} (seed {seed:#x})",
        first + count,
        start.elapsed()
    );
}

fn cases() -> u64 {
    env_u64("BPFTIME_A64_DIFF_CASES").unwrap_or(DEFAULT_CASES)
}

/// Case numbers of quarter `q` (0–3) of the run: checked mode takes the first half, unchecked
/// the second; each half runs as two tests so both cores stay busy.
fn quarter(q: u64) -> (u64, u64) {
    let n = cases();
    let bounds = [0, n / 4, n / 2, n / 2 + n / 4, n];
    (
        bounds[q as usize],
        bounds[q as usize + 1] - bounds[q as usize],
    )
}

#[test]
fn aarch64_jit_matches_interpreter_checked_1() {
    let (first, count) = quarter(0);
    run_cases(true, first, count);
}

#[test]
fn aarch64_jit_matches_interpreter_checked_2() {
    let (first, count) = quarter(1);
    run_cases(true, first, count);
}

#[test]
fn aarch64_jit_matches_interpreter_unchecked_1() {
    let (first, count) = quarter(2);
    run_cases(false, first, count);
}

#[test]
fn aarch64_jit_matches_interpreter_unchecked_2() {
    let (first, count) = quarter(3);
    run_cases(false, first, count);
}
