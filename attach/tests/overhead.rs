//! Per-hit cost of the hook mechanism alone (no-op handlers): 10M calls bare vs with an entry
//! probe, a return probe and both, for the three prologue kinds the architecture notes
//! benchmark kernel uprobes with, plus a trap-based probe and an entry probe whose native fast
//! path (a `lock inc`) replaces the handler. Thread CPU time, best of 3 (steady
//! on a loaded machine). Run with
//! `cargo test -p bpftime-attach --release --test overhead -- --ignored --nocapture`.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, Ordering};
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

/// Native fast path entry that only counts: `mov rax, &COUNT; lock inc qword [rax];
/// xor eax, eax; xor edx, edx (NATIVE_RAN); ret`, in its own read-execute page (leaked).
fn counting_native_entry(count: &'static AtomicU64) -> bpftime_attach::NativeEntry {
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&(count.as_ptr() as u64).to_le_bytes());
    code.extend_from_slice(&[0xf0, 0x48, 0xff, 0x00, 0x31, 0xc0, 0x31, 0xd2, 0xc3]);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh anonymous page, written, made read-execute and never unmapped; the code
    // touches only rax, rdx, the flags and `count`, as `NativeEntry` requires.
    unsafe {
        let page = libc::mmap(core::ptr::null_mut(), 4096, rw, flags, -1, 0);
        assert_ne!(page, libc::MAP_FAILED);
        core::ptr::copy_nonoverlapping(code.as_ptr(), page.cast::<u8>(), code.len());
        assert_eq!(
            libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
        core::mem::transmute::<*mut c_void, bpftime_attach::NativeEntry>(page)
    }
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn hit_overhead_bare_vs_hooked() {
    static NATIVE_HITS: AtomicU64 = AtomicU64::new(0);
    let native = counting_native_entry(&NATIVE_HITS);
    println!("| entry | bare | uprobe | uretprobe | both | trap uprobe | uprobe, native entry |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
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
        // An entry probe whose native fast path (a `lock inc`) replaces the no-op handler.
        let probe = Probe {
            entry: Some(noop),
            ret: None,
            user: core::ptr::null_mut(),
            func: FuncBounds::Entry,
            mode: PatchMode::Jump,
        };
        // SAFETY: entry of a function above; the handler does nothing, and the native entry
        // follows the contract and is never unmapped.
        let hook = unsafe { install_probe(f as *const () as usize, &probe) }.unwrap();
        // SAFETY: as above.
        assert!(unsafe { hook.set_native(Some(native)) });
        let before = NATIVE_HITS.load(Ordering::Relaxed);
        ns_per_call(f, CALLS / 10);
        let hooked = ns_per_call(f, CALLS);
        hook.remove().unwrap();
        assert_eq!(
            NATIVE_HITS.load(Ordering::Relaxed) - before,
            CALLS / 10 * 3 + CALLS * 3
        );
        row += &format!(" {:.2} |", hooked - bare);
        println!("{row}");
    }
}
