//! Encoder table of the aarch64 backend: (eBPF instruction, expected AArch64 code) pairs, the
//! generated words decoded and printed by yaxpeax-arm. Runs on every host: it only compiles
//! and decodes, never executes (the emulated tests do that).

use bpftime_jit::JitOptions;
use bpftime_jit::aarch64::compile_with;
use bpftime_jit::{CompiledCode, JitError};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{CallEnv, HelperRegistry};
use bpftime_vm::verifier::verify;
use yaxpeax_arch::{Decoder, U8Reader};
use yaxpeax_arm::armv8::a64::InstDecoder;

extern "C" fn helper(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    0
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(1, "h", helper)
        .register_stopping(2, "stops", helper)
        .register(12, "tail_call", helper);
    h
}

/// Helper `id` is "at" `0x1234_5678_0000 + id` so the table does not depend on the host.
fn compiled(src: &str, checked: bool) -> Result<CompiledCode, JitError> {
    let insns = assemble(src).unwrap_or_else(|e| panic!("{src}: {e}"));
    let h = helpers();
    let prog = verify(&insns, &h).unwrap_or_else(|e| panic!("{src}: {e}"));
    compile_with(
        &prog,
        &h,
        &|id, _| 0x1234_5678_0000 + u64::from(id),
        &JitOptions {
            checked,
            ..Default::default()
        },
    )
}

/// Decodes `code[from..to]`, one line per instruction (invalid words fail the test).
fn disasm(code: &[u8], from: usize, to: usize) -> Vec<String> {
    let d = InstDecoder::default();
    code[from..to]
        .chunks(4)
        .enumerate()
        .map(|(i, w)| {
            let mut r = U8Reader::new(w);
            match d.decode(&mut r) {
                Ok(insn) => insn.to_string(),
                Err(e) => panic!(
                    "invalid word {:08x} at {:#x}: {e}",
                    u32::from_le_bytes(w.try_into().unwrap()),
                    from + 4 * i
                ),
            }
        })
        .collect()
}

/// The code of slot `pc` (up to the next slot's code), "; "-separated.
fn asm_of(src: &str, pc: usize, checked: bool) -> String {
    let c = compiled(src, checked).expect("compiles");
    let from = c.insn_offsets[pc] as usize;
    let to = c.insn_offsets[pc + 1..]
        .iter()
        .find(|&&o| o != u32::MAX)
        .map_or(c.code.len(), |&o| o as usize);
    disasm(&c.code, from, to).join("; ")
}

/// (program, slot, expected code of that slot), unchecked mode. Register mapping: r0 x7,
/// r1–r5 x0–x4, r6–r9 x19–x22, r10 x25; x26 = ctx; x9–x11 scratch; x16 call target.
const UNCHECKED: &[(&str, usize, &str)] = &[
    ("mov %r0, %r1\nexit", 0, "mov x7, x0"),
    ("mov32 %r6, %r7\nexit", 0, "mov w19, w20"),
    ("mov %r1, -1\nexit", 0, "mov x0, #0xffffffffffffffff"),
    ("mov32 %r1, -1\nexit", 0, "mov w0, #0xffffffff"),
    ("mov %r1, 0\nexit", 0, "mov x0, #0x0"),
    (
        "mov %r1, 0x12345678\nexit",
        0,
        "mov x0, #0x5678; movk x0, #0x1234, lsl #16",
    ),
    ("mov %r1, -2\nexit", 0, "mov x0, #0xfffffffffffffffe"),
    (
        "mov %r1, -0x12345\nexit",
        0,
        "mov x0, #0xffffffffffffdcbb; movk x0, #0xfffe, lsl #16",
    ),
    (
        "lddw %r1, 0x1122334455667788\nexit",
        0,
        "mov x0, #0x7788; movk x0, #0x5566, lsl #16; movk x0, #0x3344, lsl #32; \
         movk x0, #0x1122, lsl #48",
    ),
    (
        "lddw %r1, 0xffffffff00000000\nexit",
        0,
        "mov x0, #0xffff00000000; movk x0, #0xffff, lsl #48",
    ),
    (
        "lddw %r1, 0xffff1234ffffffff\nexit",
        0,
        "mov x0, #0xffff1234ffffffff",
    ),
    ("add %r1, 5\nexit", 0, "add x0, x0, #0x5"),
    ("add %r1, -5\nexit", 0, "sub x0, x0, #0x5"),
    ("add %r1, 4095\nexit", 0, "add x0, x0, #0xfff"),
    (
        "add %r1, 0x10000\nexit",
        0,
        "mov x10, #0x10000; add x0, x0, x10",
    ),
    ("add32 %r6, %r7\nexit", 0, "add w19, w19, w20"),
    ("add32 %r6, -1\nexit", 0, "sub w19, w19, #0x1"),
    ("sub %r9, %r5\nexit", 0, "sub x22, x22, x4"),
    ("sub %r1, -4095\nexit", 0, "add x0, x0, #0xfff"),
    ("mul32 %r1, 7\nexit", 0, "mov w10, #0x7; mul w0, w0, w10"),
    ("mul %r1, %r2\nexit", 0, "mul x0, x0, x1"),
    ("div %r1, %r2\nexit", 0, "udiv x0, x0, x1"),
    ("div %r1, 0\nexit", 0, "mov x10, #0x0; udiv x0, x0, x10"),
    ("sdiv32 %r1, %r2\nexit", 0, "sdiv w0, w0, w1"),
    (
        "sdiv %r1, -1\nexit",
        0,
        "mov x10, #0xffffffffffffffff; sdiv x0, x0, x10",
    ),
    (
        "mod %r1, %r2\nexit",
        0,
        "udiv x11, x0, x1; msub x0, x11, x1, x0",
    ),
    (
        "mod32 %r1, %r1\nexit",
        0,
        "udiv w11, w0, w0; msub w0, w11, w0, w0",
    ),
    (
        "smod32 %r1, 3\nexit",
        0,
        "mov w10, #0x3; sdiv w11, w0, w10; msub w0, w11, w10, w0",
    ),
    ("and %r1, 0xff\nexit", 0, "and x0, x0, #0xff"),
    (
        "and %r1, 0x12345\nexit",
        0,
        "mov x10, #0x2345; movk x10, #0x1, lsl #16; and x0, x0, x10",
    ),
    ("and32 %r1, -2\nexit", 0, "and w0, w0, #0xfffffffe"),
    ("or32 %r1, 0x80000000\nexit", 0, "orr w0, w0, #0x80000000"),
    ("or %r1, %r2\nexit", 0, "orr x0, x0, x1"),
    (
        "xor %r1, -1\nexit",
        0,
        "mov x10, #0xffffffffffffffff; eor x0, x0, x10",
    ),
    (
        "xor32 %r3, 0x55\nexit",
        0,
        "mov w10, #0x55; eor w2, w2, w10",
    ),
    (
        "xor %r3, 0x5555\nexit",
        0,
        "mov x10, #0x5555; eor x2, x2, x10",
    ),
    ("xor %r3, 0xff00\nexit", 0, "eor x2, x2, #0xff00"),
    ("lsh %r1, 3\nexit", 0, "lsl x0, x0, #0x3"),
    ("lsh %r1, 67\nexit", 0, "lsl x0, x0, #0x3"),
    ("lsh %r1, 64\nexit", 0, ""),
    ("lsh32 %r1, 32\nexit", 0, "mov w0, w0"),
    ("rsh32 %r2, %r4\nexit", 0, "lsr w1, w1, w3"),
    ("rsh %r2, 63\nexit", 0, "lsr x1, x1, #0x3f"),
    ("arsh32 %r1, 31\nexit", 0, "asr w0, w0, #0x1f"),
    ("arsh %r1, %r2\nexit", 0, "asr x0, x0, x1"),
    ("neg32 %r0\nexit", 0, "neg w7, w7"),
    ("neg %r7\nexit", 0, "neg x20, x20"),
    ("movsx864 %r1, %r2\nexit", 0, "sxtb x0, w1"),
    ("movsx1632 %r1, %r2\nexit", 0, "sxth w0, w1"),
    ("movsx3264 %r1, %r2\nexit", 0, "sxtw x0, w1"),
    ("be16 %r1\nexit", 0, "rev16 w0, w0; uxth w0, w0"),
    ("be32 %r1\nexit", 0, "rev w0, w0"),
    ("be64 %r6\nexit", 0, "rev x19, x19"),
    ("le16 %r1\nexit", 0, "uxth w0, w0"),
    ("le32 %r1\nexit", 0, "mov w0, w0"),
    ("le64 %r1\nexit", 0, ""),
    ("bswap16 %r2\nexit", 0, "rev16 w1, w1; uxth w1, w1"),
    ("bswap64 %r2\nexit", 0, "rev x1, x1"),
    // Loads and stores: scaled, unscaled and register offsets.
    ("ldxdw %r0, [%r1+8]\nexit", 0, "ldr x7, [x0, #0x8]"),
    ("ldxdw %r0, [%r1+32760]\nexit", 0, "ldr x7, [x0, #0x7ff8]"),
    ("ldxw %r0, [%r10-4]\nexit", 0, "ldur w7, [x25, #-0x4]"),
    ("ldxh %r0, [%r1+3]\nexit", 0, "ldurh w7, [x0, #0x3]"),
    ("ldxb %r0, [%r1+4095]\nexit", 0, "ldrb w7, [x0, #0xfff]"),
    (
        "ldxdw %r0, [%r1-32768]\nexit",
        0,
        "mov x10, #0xffffffffffff8000; ldr x7, [x0, x10]",
    ),
    ("ldxsb %r0, [%r1+1]\nexit", 0, "ldrsb x7, [x0, #0x1]"),
    ("ldxsh %r0, [%r10-2]\nexit", 0, "ldursh x7, [x25, #-0x2]"),
    ("ldxsw %r0, [%r1+16380]\nexit", 0, "ldrsw x7, [x0, #0x3ffc]"),
    (
        "ldxsw %r0, [%r1+20000]\nexit",
        0,
        "mov x10, #0x4e20; ldrsw x7, [x0, x10]",
    ),
    ("stxdw [%r10-8], %r6\nexit", 0, "stur x19, [x25, #-0x8]"),
    ("stxb [%r1+0], %r2\nexit", 0, "strb w1, [x0]"),
    ("stb [%r1+2], 0\nexit", 0, "strb wzr, [x0, #0x2]"),
    (
        "stw [%r1+0], -1\nexit",
        0,
        "mov x11, #0xffffffffffffffff; str w11, [x0]",
    ),
    (
        "sth [%r1-300], 7\nexit",
        0,
        "mov x10, #0xfffffffffffffed4; mov x11, #0x7; strh w11, [x0, x10]",
    ),
    // Atomics (LSE, sequentially consistent).
    (
        "lock add [%r1+8], %r2\nexit",
        0,
        "add x9, x0, #0x8; ldaddal x1, xzr, [x9]",
    ),
    (
        "lock fetch add32 [%r1-4], %r2\nexit",
        0,
        "sub x9, x0, #0x4; ldaddal w1, w1, [x9]",
    ),
    (
        "lock and [%r1+0], %r2\nexit",
        0,
        "add x9, x0, #0x0; mvn x10, x1; ldclral x10, xzr, [x9]",
    ),
    (
        "lock fetch and32 [%r1+0], %r2\nexit",
        0,
        "add x9, x0, #0x0; mvn w10, w1; ldclral w10, w1, [x9]",
    ),
    (
        "lock or [%r1+0], %r2\nexit",
        0,
        "add x9, x0, #0x0; ldsetal x1, xzr, [x9]",
    ),
    (
        "lock fetch xor [%r1+0], %r2\nexit",
        0,
        "add x9, x0, #0x0; ldeoral x1, x1, [x9]",
    ),
    (
        "lock xchg [%r10-8], %r6\nexit",
        0,
        "sub x9, x25, #0x8; swpal x19, x19, [x9]",
    ),
    (
        "lock cmpxchg32 [%r1+4], %r2\nexit",
        0,
        "add x9, x0, #0x4; casal w7, w1, [x9]",
    ),
    // Local calls move r10 by one frame around `bl`.
    (
        "call local f\nexit\nf: exit",
        0,
        "sub x25, x25, #0x200; bl $+0x10; add x25, x25, #0x200",
    ),
    // Helper calls: env in x5, absolute address, r0 from x0.
    (
        "call 1\nexit",
        0,
        "ldr x5, [x26, #0x8]; mov x16, #0x1; movk x16, #0x5678, lsl #16; \
         movk x16, #0x1234, lsl #32; blr x16; mov x7, x0",
    ),
    (
        "call 2\nexit",
        0,
        "ldr x5, [x26, #0x8]; mov x16, #0x2; movk x16, #0x5678, lsl #16; \
         movk x16, #0x1234, lsl #32; blr x16; mov x7, x0; ldr x9, [x26, #0x8]; \
         ldr w10, [x9]; cmp w10, #0x0; b.ne $+0xc",
    ),
    (
        "call %r3\nexit",
        0,
        "mov x9, x2; ldr x10, [x26, #0x28]; cmp x9, x10; b.hs $+0x40; \
         ldr x11, [x26, #0x20]; ldr x16, [x11, x9, lsl #3]; cmp x16, #0x0; \
         b.eq $+0x30; ldr x5, [x26, #0x8]; str x25, [x26, #0xb8]; blr x16; mov x7, x0; \
         str xzr, [x26, #0xb8]; ldr x9, [x26, #0x8]; ldr w10, [x9]; cmp w10, #0x0; \
         b.ne $+0x20",
    ),
    ("call 12\nexit", 0, "bl $+0xc"),
    ("ja +0\nexit\nexit", 1, "mov x0, x7; b $+0x34"),
];

/// Checked mode: the inline fast-region and stack tests, the `check` stub, and alignment.
const CHECKED: &[(&str, usize, &str)] = &[
    // The fast region (x23 start, x24 load length), then the stack (x27 = stack_lo), then a
    // stub calling `ctx.check`.
    (
        "ldxdw %r0, [%r1+8]\nexit",
        0,
        "add x9, x0, #0x8; sub x10, x9, x23; subs x11, x24, x10; ccmp x11, #0x8, #0x0, hs; \
         b.hs $+0x10; sub x10, x9, x27; cmp x10, #0xff8; b.hi $+0x10; ldr x7, [x9]",
    ),
    // Stores test the writable length (x28).
    (
        "stb [%r2-1000], 7\nexit",
        0,
        "sub x9, x1, #0x3e8; sub x10, x9, x23; subs x11, x28, x10; ccmp x11, #0x1, #0x0, hs; \
         b.hs $+0x10; sub x10, x9, x27; cmp x10, #0xfff; b.hi $+0x14; mov x11, #0x7; \
         strb w11, [x9]",
    ),
    // r10 with a constant offset was proven in-frame by the loader: no bounds check.
    ("ldxdw %r0, [%r10-8]\nexit", 0, "ldur x7, [x25, #-0x8]"),
    (
        "lock add [%r10-8], %r1\nexit",
        0,
        "sub x9, x25, #0x8; tst x9, #0x7; b.ne $+0x10; ldaddal x0, xzr, [x9]",
    ),
    (
        "lock fetch or32 [%r1+0], %r2\nexit",
        0,
        "add x9, x0, #0x0; sub x10, x9, x23; subs x11, x28, x10; ccmp x11, #0x4, #0x0, hs; \
         b.hs $+0x10; sub x10, x9, x27; cmp x10, #0xffc; b.hi $+0x18; tst x9, #0x3; \
         b.ne $+0x78; ldsetal w1, w1, [x9]",
    ),
];

fn check_table(table: &[(&str, usize, &str)], checked: bool) {
    let mut bad = Vec::new();
    for &(src, pc, want) in table {
        let got = asm_of(src, pc, checked);
        if got != want {
            bad.push(format!("{src:?} (slot {pc}):\n  want {want}\n  got  {got}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} encodings differ:\n{}",
        bad.len(),
        table.len(),
        bad.join("\n")
    );
}

#[test]
fn unchecked_encodings_match_the_table() {
    check_table(UNCHECKED, false);
}

#[test]
fn checked_encodings_match_the_table() {
    check_table(CHECKED, true);
}

#[test]
fn tail_entry_is_at_offset_zero_and_host_entry_follows() {
    let c = compiled("exit", false).unwrap();
    assert_eq!(bpftime_jit::aarch64::TAIL_ENTRY, 0);
    assert_eq!(c.entry, 8);
    let text = disasm(&c.code, 0, 12);
    assert_eq!(text[0], "mov x1, xzr");
    assert!(text[1].starts_with("b $+"), "{}", text[1]);
    assert_eq!(text[2], "stp x29, x30, [sp, #-0x70]!");
}

/// Every conditional jump lands on the code of its target slot.
#[test]
fn conditional_jumps_branch_to_the_target_slot() {
    let conds = [
        ("jeq", "b.eq"),
        ("jne", "b.ne"),
        ("jgt", "b.hi"),
        ("jge", "b.hs"),
        ("jlt", "b.lo"),
        ("jle", "b.ls"),
        ("jsgt", "b.gt"),
        ("jsge", "b.ge"),
        ("jslt", "b.lt"),
        ("jsle", "b.le"),
        ("jset", "b.ne"),
    ];
    for (mnem, bcond) in conds {
        let set = mnem == "jset";
        for (suffix, operand, cmp) in [
            ("", "%r2", if set { "tst x0, x1" } else { "cmp x0, x1" }),
            ("32", "%r2", if set { "tst w0, w1" } else { "cmp w0, w1" }),
            ("", "4", if set { "tst x0, #0x4" } else { "cmp x0, #0x4" }),
            (
                "32",
                "-5",
                if set {
                    "tst w0, #0xfffffffb"
                } else {
                    "cmn w0, #0x5"
                },
            ),
        ] {
            let src = format!("{mnem}{suffix} %r1, {operand}, +2\nmov %r0, 1\nmov %r0, 2\nexit");
            let c = compiled(&src, false).unwrap();
            let from = c.insn_offsets[0] as usize;
            let to = c.insn_offsets[1] as usize;
            let text = disasm(&c.code, from, to);
            let last = text.last().unwrap();
            assert_eq!(text[0], cmp, "{src}");
            let (b, rel) = last
                .split_once(" $+")
                .unwrap_or_else(|| panic!("{src}: {last}"));
            assert_eq!(b, bcond, "{src}");
            let rel = usize::from_str_radix(rel.trim_start_matches("0x"), 16).unwrap();
            assert_eq!(to - 4 + rel, c.insn_offsets[3] as usize, "{src}");
        }
    }
}

/// A conditional jump over more than 1 MiB of code (beyond `b.cond`'s reach) still compiles
/// and decodes: large programs use `b.!cond +8; b target`. (Executed in `aarch64_exec.rs`.)
#[test]
fn conditional_jump_across_more_than_one_mib_of_code() {
    let n = 20_000;
    let mut src = String::from("jeq %r1, 0, far\n");
    for _ in 0..n {
        src.push_str("ldxdw %r2, [%r1+8]\n");
    }
    src.push_str("far: mov %r0, 7\nexit\n");
    let c = compiled(&src, true).expect("compiles");
    assert!(c.code.len() > (2 << 20), "{} bytes", c.code.len());
    let from = c.insn_offsets[0] as usize;
    let text = disasm(&c.code, from, c.insn_offsets[1] as usize);
    assert_eq!(text[..2], ["cmp x0, #0x0", "b.ne $+0x8"]);
    let rel = text[2].strip_prefix("b $+0x").expect("far branch");
    let rel = usize::from_str_radix(rel, 16).unwrap();
    assert_eq!(from + 8 + rel, c.insn_offsets[n + 1] as usize);
    // Every word of the program decodes.
    disasm(&c.code, 0, c.code.len());
}

/// Random slot sequences that pass the verifier always compile, in both modes, without a
/// panic (dynasm-rs panics on unencodable immediates: every one must be range-checked first).
#[test]
fn every_verified_random_program_compiles() {
    use bpftime_vm::isa::Insn;
    let mut seed = 0x0123_4567_89ab_cdefu64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 11
    };
    let h = helpers();
    let (mut verified, mut tried) = (0, 0);
    while verified < 5000 {
        tried += 1;
        let n = 1 + next() % 16;
        let mut insns = Vec::new();
        for _ in 0..n {
            let class = [
                0x04, 0x07, 0x0c, 0x0f, 0x61, 0x62, 0x63, 0x05, 0x06, 0x15, 0x16, 0x1d, 0xdb, 0xc3,
                0x85, 0x18, 0x81, 0x91, 0x79, 0x7a, 0xd4, 0xdc, 0xbf, 0xbc, 0x24, 0x27, 0x34, 0x37,
                0x94, 0x97, 0x64, 0x67, 0x74, 0x77, 0xc4, 0xc7, 0x87,
            ][(next() % 37) as usize];
            let code = if next() % 16 == 0 {
                (next() % 256) as u8
            } else {
                class
            };
            let imm = match next() % 4 {
                0 => (next() % 64) as i32,
                1 => [0, 1, 8, 16, 32, 64, -1, 0xdb, 0x51, 0xf1, 12][(next() % 11) as usize],
                _ => next() as i32,
            };
            let off = match next() % 3 {
                0 => (next() % 3) as i16,
                1 => -8 * (next() % 64) as i16,
                _ => next() as i16,
            };
            // Unused fields must be zero: make zero common.
            let zero_or = |v: u64, x: u64| if v.is_multiple_of(2) { 0 } else { x };
            let src = zero_or(next(), next() % 11) as u8;
            let off = if next() % 2 == 0 { 0 } else { off };
            let imm = if next() % 2 == 0 { 0 } else { imm };
            insns.push(Insn::new(code, (next() % 10) as u8, src, off, imm));
        }
        insns.push(Insn::new(0x95, 0, 0, 0, 0));
        let Ok(prog) = verify(&insns, &h) else {
            continue;
        };
        verified += 1;
        for checked in [false, true] {
            compile_with(
                &prog,
                &h,
                &|_, _| u64::MAX,
                &JitOptions {
                    checked,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", bpftime_vm::disasm::disassemble(&insns)));
        }
    }
    println!("{verified} of {tried} random programs verified and compiled");
    assert!(tried > verified);
}
