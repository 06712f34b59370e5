//! Threads call a function non-stop while the main thread installs and removes a hook on it.
//!
//! The count is exact: the handler marks each call it sees by setting the second argument
//! (rsi) to `MARK`, and the function returns its second argument, so a caller knows whether
//! its own call went through the handler. Summed over the callers this must equal the
//! handler's count, and no handler may run after `remove` returned.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bpftime_attach::{PtRegs, install};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_concurrency,\"ax\",@progbits",
    // Three-instruction prologue in the patched bytes: threads get caught between them.
    ".p2align 4",
    ".globl c_push_rbp",
    ".type c_push_rbp,@function",
    "c_push_rbp:",
    "push rbp",
    "mov rbp, rsp",
    "mov rax, rsi",
    "pop rbp",
    "ret",
    ".size c_push_rbp, .-c_push_rbp",
    // One instruction, aligned: a single atomic store, no stop.
    ".p2align 4",
    ".globl c_nop5",
    ".type c_nop5,@function",
    "c_nop5:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov rax, rsi",
    "ret",
    ".size c_nop5, .-c_nop5",
    // One instruction across an 8- and a 16-byte boundary: the int3 protocol.
    ".p2align 4",
    ".skip 14, 0xcc",
    ".globl c_unaligned",
    ".type c_unaligned,@function",
    "c_unaligned:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov rax, rsi",
    "ret",
    ".size c_unaligned, .-c_unaligned",
    ".popsection",
);

unsafe extern "C" {
    safe fn c_push_rbp(a: u64, b: u64) -> u64;
    safe fn c_nop5(a: u64, b: u64) -> u64;
    safe fn c_unaligned(a: u64, b: u64) -> u64;
}

const MARK: u64 = 0x5eed_f00d;
const THREADS: usize = 4;

extern "C" fn mark(regs: &mut PtRegs, user: *mut c_void) {
    // SAFETY: the test passes a `&AtomicU64` that outlives every hook it installs.
    let hits = unsafe { &*user.cast::<AtomicU64>() };
    hits.fetch_add(1, Ordering::Relaxed);
    regs.rsi = MARK;
}

/// One hammer at a time: 2 cores are busy enough with four callers.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn hammer(f: extern "C" fn(u64, u64) -> u64, cycles: usize) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let target = f as *const () as usize;
    let hits = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..THREADS)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut calls, mut marked) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match f(calls, 0) {
                        MARK => marked += 1,
                        0 => {}
                        other => panic!("function returned {other:#x}"),
                    }
                    calls += 1;
                }
                (calls, marked)
            })
        })
        .collect();

    let fixups_before = bpftime_attach::x86_64::fixups_applied();
    let user = Arc::as_ptr(&hits).cast_mut().cast::<c_void>();
    let mut after_remove = 0;
    let mut hooked_cycles_with_hits = 0;
    for _ in 0..cycles {
        assert_eq!(
            hits.load(Ordering::Relaxed),
            after_remove,
            "a handler ran after remove returned"
        );
        // SAFETY: `target` is the entry of a function above; `mark` writes rsi and bumps the
        // counter behind `user`, which outlives the hook (removed below).
        let hook = unsafe { install(target, mark, user) }.expect("install");
        let start = Instant::now();
        while hits.load(Ordering::Relaxed) < after_remove + 20
            && start.elapsed() < Duration::from_millis(20)
        {
            std::hint::spin_loop();
        }
        if hits.load(Ordering::Relaxed) > after_remove {
            hooked_cycles_with_hits += 1;
        }
        hook.remove().expect("remove");
        after_remove = hits.load(Ordering::Relaxed);
    }
    // Let the callers run unhooked for a moment: no more handler calls.
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let (calls, marked) = callers
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |(c, m), (tc, tm)| (c + tc, m + tm));
    let hits = hits.load(Ordering::Relaxed);
    eprintln!(
        "{cycles} cycles: {calls} calls, {hits} hooked, {} threads moved out of patched code, {hooked_cycles_with_hits} cycles with hits",
        bpftime_attach::x86_64::fixups_applied() - fixups_before
    );
    assert_eq!(hits, after_remove);
    assert_eq!(
        marked, hits,
        "every handler call seen by exactly one caller"
    );
    assert!(hits > 0 && calls > hits);
    assert!(
        hooked_cycles_with_hits > cycles / 2,
        "the callers kept running through the cycles"
    );
}

#[test]
fn callers_of_a_three_instruction_prologue_survive_200_install_remove_cycles() {
    hammer(c_push_rbp, 200);
}

#[test]
fn callers_of_an_aligned_nop5_survive_200_install_remove_cycles() {
    hammer(c_nop5, 200);
}

#[test]
fn callers_of_an_unaligned_nop5_survive_200_install_remove_cycles() {
    let f: extern "C" fn(u64, u64) -> u64 = c_unaligned;
    assert_eq!(f as *const () as usize % 16, 14);
    hammer(c_unaligned, 200);
}
