//! Per-hit cost of the hook mechanism alone (no-op handlers): 10M calls bare vs with an entry
//! probe, a return probe and both, for the three prologue kinds the architecture notes
//! benchmark kernel uprobes with, plus a trap-based probe. Thread CPU time, best of 3 (steady
//! on a loaded machine). Run with
//! `cargo test -p bpftime-attach --release --test overhead -- --ignored --nocapture`.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::hint::black_box;

use bpftime_attach::{FuncBounds, PatchMode, Probe, PtRegs, install_probe};

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

fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid output pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

fn ns_per_call(f: extern "C" fn(u64, u64) -> u64, calls: u64) -> f64 {
    (0..3)
        .map(|_| {
            let mut acc = 0u64;
            let start = thread_cpu_ns();
            for i in 0..calls {
                acc = f(black_box(i), acc);
            }
            black_box(acc);
            (thread_cpu_ns() - start) / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn hit_overhead_bare_vs_hooked() {
    println!("| entry | bare | uprobe | uretprobe | both | trap uprobe |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, f) in [
        ("nop5", o_nop5 as extern "C" fn(u64, u64) -> u64),
        ("push rbp", o_push_rbp),
        ("lea", o_lea),
    ] {
        ns_per_call(f, CALLS / 10); // warm up
        let bare = ns_per_call(f, CALLS);
        let mut row = format!("| {name} | {bare:.2} |");
        for (entry, ret, mode, calls) in [
            (true, false, PatchMode::Jump, CALLS),
            (false, true, PatchMode::Jump, CALLS),
            (true, true, PatchMode::Jump, CALLS),
            (true, false, PatchMode::Trap, CALLS / 100),
        ] {
            let probe = Probe {
                entry: entry.then_some(noop as bpftime_attach::HookHandler),
                ret: ret.then_some(noop as bpftime_attach::HookHandler),
                user: core::ptr::null_mut(),
                func: FuncBounds::Entry,
                mode,
            };
            // SAFETY: entry of a function above; the handlers do nothing.
            let hook = unsafe { install_probe(f as *const () as usize, &probe) }.unwrap();
            ns_per_call(f, calls / 10);
            let hooked = ns_per_call(f, calls);
            hook.remove().unwrap();
            row += &format!(" {:.2} |", hooked - bare);
        }
        println!("{row}");
    }
}
