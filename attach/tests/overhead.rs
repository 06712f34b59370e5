//! Per-hit cost: 10M calls bare vs hooked with a no-op handler, for the three prologue kinds
//! the architecture notes benchmark kernel uprobes with. Run with
//! `cargo test -p bpftime-attach --release --test overhead -- --ignored --nocapture`.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::hint::black_box;
use std::time::Instant;

use bpftime_attach::{PtRegs, install};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_overhead,\"ax\",@progbits",
    ".p2align 4",
    ".globl o_nop5",
    ".type o_nop5,@function",
    "o_nop5:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size o_nop5, .-o_nop5",
    ".p2align 4",
    ".globl o_push_rbp",
    ".type o_push_rbp,@function",
    "o_push_rbp:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + rsi]",
    "pop rbp",
    "ret",
    ".size o_push_rbp, .-o_push_rbp",
    ".p2align 4",
    ".globl o_lea",
    ".type o_lea,@function",
    "o_lea:",
    "lea rax, [rdi + 1]",
    "add rax, rsi",
    "ret",
    ".size o_lea, .-o_lea",
    ".popsection",
);

unsafe extern "C" {
    safe fn o_nop5(a: u64, b: u64) -> u64;
    safe fn o_push_rbp(a: u64, b: u64) -> u64;
    safe fn o_lea(a: u64, b: u64) -> u64;
}

const CALLS: u64 = 10_000_000;

extern "C" fn noop(_regs: &mut PtRegs, _user: *mut c_void) {}

fn ns_per_call(f: extern "C" fn(u64, u64) -> u64) -> f64 {
    let mut acc = 0u64;
    let start = Instant::now();
    for i in 0..CALLS {
        acc = f(black_box(i), acc);
    }
    black_box(acc);
    start.elapsed().as_nanos() as f64 / CALLS as f64
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn hit_overhead_bare_vs_hooked() {
    for (name, f) in [
        ("nop5", o_nop5 as extern "C" fn(u64, u64) -> u64),
        ("push rbp", o_push_rbp),
        ("lea", o_lea),
    ] {
        ns_per_call(f); // warm up
        let bare = ns_per_call(f);
        // SAFETY: entry of a function above; the handler does nothing.
        let hook =
            unsafe { install(f as *const () as usize, noop, core::ptr::null_mut()) }.unwrap();
        ns_per_call(f);
        let hooked = ns_per_call(f);
        hook.remove().unwrap();
        println!(
            "{name:>8}: bare {bare:6.2} ns/call, hooked {hooked:6.2} ns/call, overhead {:6.2} ns/hit",
            hooked - bare
        );
    }
}
