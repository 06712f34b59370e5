//! Arbitrary bytes → `insns_from_bytes` → `verify` → the interpreter and the x86_64 JIT (checked,
//! then unchecked when the interpreter ran to exit) → identical r0 or trap, memory block, stack
//! and helper calls.
//!
//! Byte 0 sizes the memory block handed to the program (r1/r2, 0–127 bytes); the rest is the
//! program, truncated to whole 8-byte slots. Programs with a backward jump are skipped (the JIT
//! has no instruction budget; forward-only programs terminate, recursion is rejected by the
//! loader). Both engines run on the same `GuestMemory` and the same block, reset in between, so
//! even pointer-valued results must agree bit for bit. Programs that may read r1–r5 after a
//! helper call (which the JIT, like the kernel, clobbers; the kernel's verifier rejects such
//! reads) only run on the checked JIT, for crashes, without comparison.

#![no_main]

use bpftime_jit::{JitOptions, JitProgram};
use bpftime_vm::helper::{CallEnv, HelperRegistry, MemRegion, conformance_unwind};
use bpftime_vm::interpreter::{Interpreter, Trap};
use bpftime_vm::isa::{AluOp, AtomicOp, Op, Src, insns_from_bytes};
use bpftime_vm::memory::{GuestMemory, MAX_FRAMES};
use bpftime_vm::verifier::{Program, verify};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

thread_local! {
    static LOG: RefCell<Vec<[u64; 6]>> = const { RefCell::new(Vec::new()) };
}

extern "C" fn record(a: u64, b: u64, c: u64, d: u64, e: u64, env: &mut CallEnv) -> u64 {
    LOG.with(|l| l.borrow_mut().push([a, b, c, d, e, env.ctx]));
    a ^ b.rotate_left(3)
}

extern "C" fn fault_on_odd(a: u64, _: u64, _: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    if a & 1 == 1 {
        env.fault(a as u32);
    }
    a
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(1, "record", record)
        .register_stopping(3, "fault_on_odd", fault_on_odd)
        .register_stopping(5, "unwind", conformance_unwind);
    h
}

fn has_backward_jump(prog: &Program) -> bool {
    prog.ops().iter().any(|op| match op {
        Some(Op::Ja { off }) => *off < 0,
        Some(Op::Jmp { off, .. }) => *off < 0,
        _ => false,
    })
}

/// Registers (bit r) an instruction reads and writes.
fn reads_writes(op: Op) -> (u16, u16) {
    const ARGS: u16 = 0b11_1110;
    let b = |r: u8| 1u16 << r;
    let src_bit = |s: Src| match s {
        Src::Reg(r) => b(r),
        Src::Imm(_) => 0,
    };
    match op {
        Op::Alu { op, dst, src, .. } => {
            let dst_read = if op == AluOp::Mov { 0 } else { b(dst) };
            (dst_read | src_bit(src), b(dst))
        }
        Op::Neg { dst, .. } | Op::Endian { dst, .. } => (b(dst), b(dst)),
        Op::MovSx { dst, src, .. } => (b(src), b(dst)),
        Op::LdImm64 { dst, .. } => (0, b(dst)),
        Op::Load { dst, src, .. } => (b(src), b(dst)),
        Op::Store { dst, src, .. } => (b(dst) | src_bit(src), 0),
        Op::Atomic {
            op: AtomicOp::CmpXchg,
            dst,
            src,
            ..
        } => (b(dst) | b(src) | b(0), b(0)),
        Op::Atomic {
            dst, src, fetch, ..
        } => (b(dst) | b(src), if fetch { b(src) } else { 0 }),
        Op::Jmp { dst, src, .. } => (b(dst) | src_bit(src), 0),
        Op::Call { .. } => (ARGS, b(0)),
        Op::Callx { reg } => (ARGS | b(reg), b(0)),
        Op::CallLocal { .. } | Op::Ja { .. } => (0, 0),
        Op::Exit => (b(0), 0),
    }
}

/// Whether the program may read r1–r5 after a helper call clobbered them (the kernel's verifier
/// rejects that; the interpreter leaves them unchanged, the JIT does not). Forward-only
/// programs: one pass in slot order sees every predecessor first. Conservative around
/// bpf-to-bpf calls (a callee's arguments and a caller's r1–r5 after a call count as clobbered).
fn reads_after_helper_call(prog: &Program) -> bool {
    const ARGS: u16 = 0b11_1110;
    let ops = prog.ops();
    if !ops
        .iter()
        .flatten()
        .any(|op| matches!(op, Op::Call { .. } | Op::Callx { .. }))
    {
        return false;
    }
    let n = ops.len();
    let mut clobbered = vec![0u16; n];
    for &f in &prog.functions()[1..] {
        clobbered[f] = ARGS;
    }
    for pc in 0..n {
        let Some(op) = ops[pc] else { continue };
        let m = clobbered[pc];
        let (reads, writes) = reads_writes(op);
        if reads & m != 0 {
            return true;
        }
        let mut out = m & !writes;
        if matches!(
            op,
            Op::Call { .. } | Op::Callx { .. } | Op::CallLocal { .. }
        ) {
            out |= ARGS;
        }
        let mut flow = |t: i64| {
            if let Ok(t) = usize::try_from(t)
                && t < n
            {
                clobbered[t] |= out;
            }
        };
        let next = (pc + op.slots()) as i64;
        match op {
            Op::Exit => {}
            Op::Ja { off } => flow(pc as i64 + 1 + i64::from(off)),
            Op::Jmp { off, .. } => {
                flow(pc as i64 + 1 + i64::from(off));
                flow(next);
            }
            _ => flow(next),
        }
    }
    false
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    result: Result<u64, Trap>,
    block: Vec<u8>,
    stack: Vec<u8>,
    log: Vec<[u64; 6]>,
}

/// Runs `f` on `gm` (stack zeroed, the block registered and restored to `init`).
fn run(
    gm: &mut GuestMemory,
    block: &mut [u8],
    init: &[u8],
    f: impl FnOnce(&mut GuestMemory, u64, u64) -> Result<u64, Trap>,
) -> Outcome {
    gm.reset();
    block.copy_from_slice(init);
    let (r1, r2) = if block.is_empty() {
        (0, 0)
    } else {
        (block.as_mut_ptr() as u64, block.len() as u64)
    };
    if !block.is_empty() {
        // SAFETY: `block` outlives the run and is only accessed through it meanwhile.
        unsafe {
            gm.add_region(MemRegion {
                start: r1,
                len: r2,
                writable: true,
            })
        };
    }
    LOG.with(|l| l.borrow_mut().clear());
    let result = f(gm, r1, r2);
    let lo = gm.frame_pointer(MAX_FRAMES);
    let stack = (lo..gm.frame_pointer(0))
        .step_by(8)
        .map(|a| gm.load(a, 8).expect("stack is accessible"))
        .flat_map(u64::to_le_bytes)
        .collect();
    Outcome {
        result,
        block: block.to_vec(),
        stack,
        log: LOG.with(|l| std::mem::take(&mut *l.borrow_mut())),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mem_len, code)) = data.split_first() else {
        return;
    };
    let code = &code[..code.len() / 8 * 8];
    let Ok(insns) = insns_from_bytes(code) else {
        unreachable!("a whole number of slots always splits");
    };
    let helpers = helpers();
    let Ok(prog) = verify(&insns, &helpers) else {
        return;
    };
    if has_backward_jump(&prog) {
        return;
    }
    let init: Vec<u8> = (0..mem_len % 128).collect();
    let mut block = init.clone();
    let mut gm = GuestMemory::new();
    let interp = Interpreter::new(&prog, &helpers);
    let reference = run(&mut gm, &mut block, &init, |gm, r1, r2| {
        interp.run_in(gm, r1, r2, std::ptr::null_mut())
    });
    // Runs that read r1–r5 after a helper call may differ legitimately: only run them.
    let comparable = !reads_after_helper_call(&prog);
    for checked in [true, false] {
        if !checked && (reference.result.is_err() || !comparable) {
            // Unchecked code trusts the program: only run what the interpreter proved safe.
            break;
        }
        let jit = JitProgram::new(&prog, &helpers, &JitOptions { checked, ..Default::default() })
            .unwrap_or_else(|e| panic!("verified program does not compile: {e}"));
        let got = run(&mut gm, &mut block, &init, |gm, r1, r2| {
            jit.run_in(gm, r1, r2, std::ptr::null_mut())
        });
        if comparable {
            assert_eq!(
                reference,
                got,
                "interpreter vs JIT (checked: {checked})\n{}",
                bpftime_vm::disasm::disassemble(&insns)
            );
        }
    }
});
