//! Our interpreter against rbpf 0.4's interpreter on the same programs.
//!
//! The programs are in `benches/programs/*.s` (our assembler's syntax) and use only
//! instructions rbpf 0.4 runs the way RFC 9669 says (see `vm/tests/differential.rs` for that
//! subset). Before measuring, each program runs once on both engines and on a Rust reference
//! implementation; all three must agree.
//!
//! The memory block is only ever read by the programs: rbpf's reusable entry point,
//! `EbpfVmMbuff::execute_program(&self, mem: &[u8], ..)`, takes it by shared reference (its
//! `EbpfVmRaw` takes `&'a mut [u8]` for the VM's whole lifetime, so it can run only once).
//!
//! Run: `cargo bench --bench vm` (or `-- --warm-up-time 1 --measurement-time 3` for a quick look).

use bpftime_vm::asm::assemble;
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::isa::insns_to_bytes;
use bpftime_vm::verifier::verify;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

/// One benchmark program: its source, the memory block it reads, and its result.
struct Program {
    name: &'static str,
    source: &'static str,
    mem: Vec<u8>,
    expected: u64,
}

const FIB_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

fn log2_reference() -> u64 {
    (1..=1000u64)
        .map(|i| {
            let x = (i.wrapping_mul(FIB_HASH) >> (i & 63)) | 1;
            u64::from(63 - x.leading_zeros())
        })
        .sum()
}

fn prime_reference() -> u64 {
    (2..1000u64)
        .filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
        .count() as u64
}

fn memcpy_memory() -> Vec<u8> {
    (0..256u32).map(|i| (i * 37 + 11) as u8).collect()
}

fn memcpy_reference(mem: &[u8]) -> u64 {
    mem.chunks_exact(8).fold(0u64, |acc, w| {
        let word = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
        acc.wrapping_mul(31).wrapping_add(word)
    })
}

fn switch_reference() -> u64 {
    let (mut acc, mut state) = (0u64, 12345u64);
    for i in 0..1000u64 {
        state = (state.wrapping_mul(1_103_515_245).wrapping_add(12345)) & 0x7fff_ffff;
        let case = (state >> 16) % 10;
        acc = match case {
            0 => acc.wrapping_add(3),
            1 => acc ^ 0x55,
            2 => acc.wrapping_mul(3),
            3 => acc.wrapping_sub(7),
            4 => acc.wrapping_add(case),
            5 => acc >> 1,
            6 => acc | 0x100,
            7 => acc.wrapping_add(i),
            8 => acc << 2,
            _ => acc.wrapping_add(9001),
        };
    }
    acc
}

const KEY: &str = "the quick brown fox jumps over the lazy dog, again and again!";

fn strcmp_memory() -> Vec<u8> {
    let mut strings: Vec<String> = Vec::new();
    // Differ at positions 5, 15, ..., 55 (6 strings), one equal, one a proper prefix.
    for pos in (5..60).step_by(10) {
        let mut s = KEY.as_bytes().to_vec();
        s[pos] = s[pos].wrapping_add((pos % 7) as u8 + 1);
        strings.push(String::from_utf8(s).expect("ascii"));
    }
    strings.push(KEY.to_string());
    strings.push(KEY[..40].to_string());
    let mut mem = vec![0u8; 9 * 64];
    for (slot, s) in strings
        .iter()
        .chain(std::iter::once(&KEY.to_string()))
        .enumerate()
    {
        mem[slot * 64..slot * 64 + s.len()].copy_from_slice(s.as_bytes());
    }
    mem
}

fn strcmp_reference(mem: &[u8]) -> u64 {
    let cstr = |at: usize| {
        let s = &mem[at..at + 64];
        &s[..=s.iter().position(|&b| b == 0).expect("NUL-terminated")]
    };
    let key = cstr(512);
    (0..8).fold(0u64, |acc, slot| {
        let s = cstr(slot * 64);
        let d = s
            .iter()
            .zip(key)
            .find(|(a, b)| a != b || **a == 0)
            .map_or(0, |(&a, &b)| i64::from(a) - i64::from(b));
        acc.wrapping_mul(1000).wrapping_add((d + 256) as u64)
    })
}

fn programs() -> Vec<Program> {
    let memcpy_mem = memcpy_memory();
    let strcmp_mem = strcmp_memory();
    vec![
        Program {
            name: "log2",
            source: include_str!("programs/log2.s"),
            mem: vec![0; 8],
            expected: log2_reference(),
        },
        Program {
            name: "prime",
            source: include_str!("programs/prime.s"),
            mem: vec![0; 8],
            expected: prime_reference(),
        },
        Program {
            name: "memcpy",
            source: include_str!("programs/memcpy.s"),
            expected: memcpy_reference(&memcpy_mem),
            mem: memcpy_mem,
        },
        Program {
            name: "switch",
            source: include_str!("programs/switch.s"),
            mem: vec![0; 8],
            expected: switch_reference(),
        },
        Program {
            name: "strcmp",
            source: include_str!("programs/strcmp.s"),
            expected: strcmp_reference(&strcmp_mem),
            mem: strcmp_mem,
        },
    ]
}

/// Instructions one run executes: the smallest budget it completes in.
fn executed_insns(interp: &Interpreter<'_>, mem: &[u8]) -> u64 {
    let completes = |budget: u64| {
        interp
            .with_budget(Some(budget))
            .run(&mut mem.to_vec())
            .is_ok()
    };
    let (mut lo, mut hi) = (0u64, 1u64);
    while !completes(hi) {
        (lo, hi) = (hi, hi * 2);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if completes(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

fn interpreters(c: &mut Criterion) {
    let helpers = HelperRegistry::new();
    for p in programs() {
        let insns = assemble(p.source).unwrap_or_else(|e| panic!("{}.s: {e}", p.name));
        let prog = verify(&insns, &helpers).unwrap_or_else(|e| panic!("{}.s: {e}", p.name));
        let ours = Interpreter::new(&prog, &helpers);
        let bytes = insns_to_bytes(&insns);
        let rbpf_vm = rbpf::EbpfVmMbuff::new(Some(&bytes))
            .unwrap_or_else(|e| panic!("rbpf rejects {}.s: {e}", p.name));

        let mut mem = p.mem.clone();
        let r_ours = ours.run(&mut mem).expect("runs on our interpreter");
        let r_rbpf = rbpf_vm.execute_program(&p.mem, &[]).expect("runs on rbpf");
        assert_eq!(
            (r_ours, r_rbpf),
            (p.expected, p.expected),
            "{}: (ours, rbpf) vs the Rust reference",
            p.name
        );

        eprintln!(
            "{}: r0 = {:#x}, {} instructions executed",
            p.name,
            p.expected,
            executed_insns(&ours, &p.mem)
        );

        let mut group = c.benchmark_group(p.name);
        group.bench_function("interpreter", |b| {
            b.iter(|| ours.run(black_box(&mut mem)).expect("runs"))
        });
        group.bench_function("rbpf_interpreter", |b| {
            b.iter(|| {
                rbpf_vm
                    .execute_program(black_box(&p.mem), &[])
                    .expect("runs")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, interpreters);
criterion_main!(benches);
