//! Dense `jeq` chains compiled as jump tables by the x86_64 JIT: random chains (32- and
//! 64-bit, negative, duplicate and sparse values, fall-through cases) agree with the
//! interpreter on values around and inside every case, and the table is really used.
#![cfg(target_arch = "x86_64")]

use bpftime_jit::{JitOptions, JitProgram};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::verifier::verify;
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A program reading r1 = the u64 at the block, switching on it with `values` (`jeq` or
/// `jeq32`), each case setting r0 to a distinct constant; the default path sets 999.
fn program(values: &[i64], w32: bool) -> String {
    let j = if w32 { "jeq32" } else { "jeq" };
    let mut src = String::from("ldxdw %r1, [%r1+0]\n");
    for (i, v) in values.iter().enumerate() {
        src.push_str(&format!("{j} %r1, {v}, case{i}\n"));
    }
    src.push_str("mov %r0, 999\nexit\n");
    for i in 0..values.len() {
        src.push_str(&format!("case{i}:\nmov %r0, {}\nexit\n", 100 + i));
    }
    src
}

fn uses_indirect_jump(code: &[u8]) -> bool {
    let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    d.iter()
        .any(|i| i.mnemonic() == Mnemonic::Jmp && i.op0_kind() == OpKind::Register)
}

#[test]
fn random_switches_agree_with_the_interpreter() {
    let h = HelperRegistry::new();
    let mut rng = Rng(0x5377_6974_6368_0001);
    let mut tables = 0;
    for case in 0..400 {
        let n = 2 + rng.below(30) as usize;
        let w32 = rng.below(2) == 0;
        let base = match rng.below(4) {
            0 => 0,
            1 => -(rng.below(40) as i64),
            2 => i64::from(i32::MAX) - 20,
            _ => rng.below(1000) as i64 - 500,
        };
        let spread = 1 + rng.below(6) as i64;
        let values: Vec<i64> = (0..n)
            .map(|_| base + rng.below(n as u64) as i64 * spread)
            .map(|v| v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)))
            .collect();
        let src = program(&values, w32);
        let prog = verify(&assemble(&src).unwrap(), &h).unwrap_or_else(|e| panic!("{e}\n{src}"));
        let jit = JitProgram::new(
            &prog,
            &h,
            &JitOptions {
                checked: true,
                ..Default::default()
            },
        )
        .unwrap();
        if uses_indirect_jump(&jit.compiled().code) {
            tables += 1;
        }
        let mut inputs: Vec<u64> = vec![0, 1, u64::MAX, 1 << 32, (1 << 32) - 1, 1 << 63];
        for &v in &values {
            for d in -2..=2i64 {
                inputs.push((v + d) as u64);
                inputs.push(((v + d) as u64 & 0xffff_ffff) | 0xabcd_0000_0000_0000);
            }
        }
        for x in inputs {
            let mut block = x.to_le_bytes();
            let want = Interpreter::new(&prog, &h).run(&mut block);
            let got = jit.run(&mut block);
            assert_eq!(got, want, "case {case}, input {x:#x}:\n{src}");
        }
    }
    assert!(
        tables > 30,
        "only {tables} of 400 programs used a jump table"
    );
}

#[test]
fn the_benchmark_switch_stays_a_compare_chain_and_agrees() {
    let h = HelperRegistry::new();
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benches/programs/switch.s"
    ))
    .unwrap();
    let prog = verify(&assemble(&src).unwrap(), &h).unwrap();
    let jit = JitProgram::new(
        &prog,
        &h,
        &JitOptions {
            checked: false,
            ..Default::default()
        },
    )
    .unwrap();
    // Nine cases: below the table threshold (see `SWITCH_MIN_CASES` in the emitter).
    assert!(!uses_indirect_jump(&jit.compiled().code));
    let want = Interpreter::new(&prog, &h).run(&mut []);
    assert_eq!(jit.run(&mut []), want);
    assert_eq!(want, Ok(0x4388_92ef_4f2d_4b35));
}

#[test]
fn short_or_sparse_chains_stay_compare_chains() {
    let h = HelperRegistry::new();
    let sparse: Vec<i64> = (0..16).map(|i| i * 100).collect();
    for values in [(1..12).collect::<Vec<i64>>(), sparse] {
        let src = program(&values, false);
        let prog = verify(&assemble(&src).unwrap(), &h).unwrap();
        let jit = JitProgram::new(
            &prog,
            &h,
            &JitOptions {
                checked: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!uses_indirect_jump(&jit.compiled().code), "{values:?}");
    }
}
