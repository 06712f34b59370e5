//! The native fast path of jump hooks: a word per hook holding the address of a function the
//! stub calls with the live `pt_regs` instead of the handler (no xmm saving around it).
//!
//! The native entries here are machine code assembled at run time into their own read-execute
//! pages, so they provably touch no xmm register. Each one checks its calling contract (rsi =
//! 168, rsp 16-aligned at the call, DF clear), counts its calls, records `pt_regs.rdi` and
//! `pt_regs.rip`, may act on `pt_regs`, then clobbers every caller-saved general-purpose
//! register before returning its status. Each test hooks its own functions: tests run in
//! parallel threads of one process.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;

mod native_support;
use native_support::map_rx;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bpftime_attach::x86_64::{missed_returns, pending_returns};
use bpftime_attach::{
    FuncBounds, Hook, HookKind, NATIVE_NOT_RUN, NATIVE_RAN, NATIVE_TRAPPED, NativeEntry, PatchMode,
    Probe, PtRegs, install_probe, set_native_excluded_thread,
};
use iced_x86::code_asm::{
    CodeAssembler, ecx, qword_ptr, r8, r9, r10, r11, rax, rcx, rdi, rdx, rsi, rsp,
};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_native,\"ax\",@progbits",
    // a + b, one per test
    ".p2align 4",
    ".globl n_ran",
    ".type n_ran,@function",
    "n_ran:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_ran, .-n_ran",
    ".p2align 4",
    ".globl n_not_run",
    ".type n_not_run,@function",
    "n_not_run:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_not_run, .-n_not_run",
    ".p2align 4",
    ".globl n_trapped",
    ".type n_trapped,@function",
    "n_trapped:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_trapped, .-n_trapped",
    ".p2align 4",
    ".globl n_toggle",
    ".type n_toggle,@function",
    "n_toggle:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_toggle, .-n_toggle",
    ".p2align 4",
    ".globl n_thread",
    ".type n_thread,@function",
    "n_thread:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_thread, .-n_thread",
    ".p2align 4",
    ".globl n_setarg",
    ".type n_setarg,@function",
    "n_setarg:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_setarg, .-n_setarg",
    ".p2align 4",
    ".globl n_conc",
    ".type n_conc,@function",
    "n_conc:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_conc, .-n_conc",
    ".p2align 4",
    ".globl n_noslot",
    ".type n_noslot,@function",
    "n_noslot:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_noslot, .-n_noslot",
    // a + b, return-probed
    ".p2align 4",
    ".globl n_ret",
    ".type n_ret,@function",
    "n_ret:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_ret, .-n_ret",
    ".p2align 4",
    ".globl n_ret_not_run",
    ".type n_ret_not_run,@function",
    "n_ret_not_run:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_ret_not_run, .-n_ret_not_run",
    ".p2align 4",
    ".globl n_ret_trapped",
    ".type n_ret_trapped,@function",
    "n_ret_trapped:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_ret_trapped, .-n_ret_trapped",
    ".p2align 4",
    ".globl n_ret_cycles",
    ".type n_ret_cycles,@function",
    "n_ret_cycles:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_ret_cycles, .-n_ret_cycles",
    // n, by n + 1 nested calls
    ".p2align 4",
    ".globl n_ret_rec",
    ".type n_ret_rec,@function",
    "n_ret_rec:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "test rdi, rdi",
    "jz 2f",
    "push rbx",
    "dec rdi",
    "call n_ret_rec",
    "inc rax",
    "pop rbx",
    "ret",
    "2:",
    "xor eax, eax",
    "ret",
    ".size n_ret_rec, .-n_ret_rec",
    ".p2align 4",
    ".globl n_both",
    ".type n_both,@function",
    "n_both:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_both, .-n_both",
    ".p2align 4",
    ".globl n_busy",
    ".type n_busy,@function",
    "n_busy:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_busy, .-n_busy",
    ".p2align 4",
    ".globl n_ret_busy",
    ".type n_ret_busy,@function",
    "n_ret_busy:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size n_ret_busy, .-n_ret_busy",
    // a + b behind push rbp (a native entry overrides the return value)
    ".p2align 4",
    ".globl n_override",
    ".type n_override,@function",
    "n_override:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + rsi]",
    "pop rbp",
    "ret",
    ".size n_override, .-n_override",
    // a + 2b + 3c + 4d + 5e + 6f
    ".p2align 4",
    ".globl n_sum6",
    ".type n_sum6,@function",
    "n_sum6:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 2*rsi]",
    "lea r10, [rdx + 2*rdx]",
    "add rax, r10",
    "lea rax, [rax + 4*rcx]",
    "lea r10, [r8 + 4*r8]",
    "add rax, r10",
    "lea r10, [r9 + 2*r9]",
    "lea rax, [rax + 2*r10]",
    "ret",
    ".size n_sum6, .-n_sum6",
    // the sum of eight doubles (xmm0-7)
    ".p2align 4",
    ".globl n_fsum8",
    ".type n_fsum8,@function",
    "n_fsum8:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "addsd xmm0, xmm1",
    "addsd xmm0, xmm2",
    "addsd xmm0, xmm3",
    "addsd xmm0, xmm4",
    "addsd xmm0, xmm5",
    "addsd xmm0, xmm6",
    "addsd xmm0, xmm7",
    "ret",
    ".size n_fsum8, .-n_fsum8",
    // 2x, touching nothing but rax
    ".p2align 4",
    ".globl n_ipa_leaf",
    ".type n_ipa_leaf,@function",
    "n_ipa_leaf:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rdi]",
    "ret",
    ".size n_ipa_leaf, .-n_ipa_leaf",
    // (9x + 21) + 3a, keeping values in caller-saved registers (rsi, rdx, rcx, r8-r11, xmm2,
    // xmm9, xmm15) across the call, as GCC's -fipa-ra does around a local callee that does not
    // use them
    ".p2align 4",
    ".globl n_ipa_caller",
    ".type n_ipa_caller,@function",
    "n_ipa_caller:",
    "sub rsp, 8",
    "movapd xmm2, xmm0",
    "movapd xmm9, xmm0",
    "movapd xmm15, xmm0",
    "mov r11, rdi",
    "lea r10, [rdi + 1]",
    "lea r9, [rdi + 2]",
    "lea r8, [rdi + 3]",
    "lea rcx, [rdi + 4]",
    "lea rdx, [rdi + 5]",
    "lea rsi, [rdi + 6]",
    "call n_ipa_leaf",
    "add rax, r11",
    "add rax, r10",
    "add rax, r9",
    "add rax, r8",
    "add rax, rcx",
    "add rax, rdx",
    "add rax, rsi",
    "cvtsi2sd xmm0, rax",
    "addsd xmm0, xmm2",
    "addsd xmm0, xmm9",
    "addsd xmm0, xmm15",
    "add rsp, 8",
    "ret",
    ".size n_ipa_caller, .-n_ipa_caller",
    // max(a, b) + (DF << 32): the flags of `cmp` and a set DF are live across the probe site
    ".p2align 4",
    ".globl n_mid",
    ".type n_mid,@function",
    "n_mid:",
    "cmp rdi, rsi",
    "std",
    ".globl n_mid_site",
    "n_mid_site:",
    "mov rax, rdi",
    "mov rdx, rsi",
    "cmovb rax, rdx",
    "pushfq",
    "pop rcx",
    "cld",
    "shr rcx, 10",
    "and ecx, 1",
    "shl rcx, 32",
    "add rax, rcx",
    "ret",
    ".globl n_mid_end",
    "n_mid_end:",
    ".size n_mid, .-n_mid",
    ".popsection",
);

unsafe extern "C" {
    safe fn n_ran(a: u64, b: u64) -> u64;
    safe fn n_not_run(a: u64, b: u64) -> u64;
    safe fn n_trapped(a: u64, b: u64) -> u64;
    safe fn n_toggle(a: u64, b: u64) -> u64;
    safe fn n_thread(a: u64, b: u64) -> u64;
    safe fn n_setarg(a: u64, b: u64) -> u64;
    safe fn n_conc(a: u64, b: u64) -> u64;
    safe fn n_noslot(a: u64, b: u64) -> u64;
    safe fn n_override(a: u64, b: u64) -> u64;
    safe fn n_ret(a: u64, b: u64) -> u64;
    safe fn n_ret_not_run(a: u64, b: u64) -> u64;
    safe fn n_ret_trapped(a: u64, b: u64) -> u64;
    safe fn n_ret_cycles(a: u64, b: u64) -> u64;
    safe fn n_ret_rec(n: u64) -> u64;
    safe fn n_busy(a: u64, b: u64) -> u64;
    safe fn n_both(a: u64, b: u64) -> u64;
    safe fn n_ret_busy(a: u64, b: u64) -> u64;
    safe fn n_sum6(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64;
    safe fn n_fsum8(a: f64, b: f64, c: f64, d: f64, e: f64, f: f64, g: f64, h: f64) -> f64;
    safe fn n_ipa_leaf(x: u64) -> u64;
    safe fn n_ipa_caller(a: f64, x: u64) -> f64;
    safe fn n_mid(a: u64, b: u64) -> u64;
    fn n_mid_site();
    fn n_mid_end();
}

fn addr(f: *const ()) -> usize {
    f as usize
}

/// What a native entry records (leaked: the entry's code holds its address).
#[derive(Default)]
struct Seen {
    /// Calls of the entry.
    calls: AtomicU64,
    /// Calls that broke the contract: rsi != 168, rsp not 16-aligned at the call, DF set.
    bad: AtomicU64,
    /// `pt_regs.rdi` and `pt_regs.rip` of the last call.
    rdi: AtomicU64,
    rip: AtomicU64,
}

/// What a native entry does to `pt_regs` besides recording.
#[derive(Clone, Copy)]
enum Action {
    Nothing,
    /// `pt_regs.rdi = v`.
    SetRdi(u64),
    /// Return from the probed function at once with `v` (at a function's entry: rip = [rsp],
    /// rsp += 8, rax = v).
    Return(u64),
}

/// Assembles a native entry returning `status` into its own read-execute page (never
/// unmapped: a thread may call it until its hook is removed). Returns the entry and what it
/// records.
fn native(status: u64, action: Action) -> (NativeEntry, &'static Seen) {
    let seen: &'static Seen = Box::leak(Box::default());
    let at = |f: &AtomicU64| f.as_ptr() as u64;
    let build = || -> Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut bad = a.create_label();
        let mut ok = a.create_label();
        a.mov(rax, at(&seen.bad))?;
        a.cmp(rsi, 168)?;
        a.jne(bad)?;
        a.mov(rcx, rsp)?;
        a.and(ecx, 15)?;
        a.cmp(ecx, 8)?; // the call pushed 8 bytes
        a.jne(bad)?;
        a.pushfq()?;
        a.pop(rcx)?;
        a.test(ecx, 0x400)?; // DF
        a.jnz(bad)?;
        a.jmp(ok)?;
        a.set_label(&mut bad)?;
        a.lock().inc(qword_ptr(rax))?;
        a.set_label(&mut ok)?;
        a.mov(rax, at(&seen.calls))?;
        a.lock().inc(qword_ptr(rax))?;
        a.mov(rcx, qword_ptr(rdi + 112))?;
        a.mov(rax, at(&seen.rdi))?;
        a.mov(qword_ptr(rax), rcx)?;
        a.mov(rcx, qword_ptr(rdi + 128))?;
        a.mov(rax, at(&seen.rip))?;
        a.mov(qword_ptr(rax), rcx)?;
        match action {
            Action::Nothing => {}
            Action::SetRdi(v) => {
                a.mov(rcx, v)?;
                a.mov(qword_ptr(rdi + 112), rcx)?;
            }
            Action::Return(v) => {
                a.mov(rax, qword_ptr(rdi + 152))?;
                a.mov(rcx, qword_ptr(rax))?;
                a.mov(qword_ptr(rdi + 128), rcx)?;
                a.add(rax, 8)?;
                a.mov(qword_ptr(rdi + 152), rax)?;
                a.mov(rcx, v)?;
                a.mov(qword_ptr(rdi + 80), rcx)?;
            }
        }
        for r in [rcx, rsi, rdi, r8, r9, r10, r11] {
            a.mov(r, -1i64)?;
        }
        a.mov(rax, 0x1234u64)?; // r0: the stub ignores it
        a.mov(rdx, status)?;
        a.ret()?;
        a.assemble(0)
    };
    let code = build().expect("assemble the native entry");
    (map_rx(&code), seen)
}

/// What the handler saw.
#[derive(Default)]
struct Record {
    hits: AtomicU64,
    rdi: AtomicU64,
}

extern "C" fn counting(regs: &mut PtRegs, user: *mut c_void) {
    // SAFETY: every hook using this handler passes a `&Record` that outlives the hook.
    let rec = unsafe { &*user.cast::<Record>() };
    rec.rdi.store(regs.rdi, Ordering::Relaxed);
    rec.hits.fetch_add(1, Ordering::Relaxed);
}

fn probe_at(target: usize, func: FuncBounds, mode: PatchMode, rec: &Record) -> Hook {
    let p = Probe {
        entry: Some(counting),
        ret: None,
        user: core::ptr::from_ref(rec).cast_mut().cast(),
        func,
        mode,
    };
    // SAFETY: `target` is an instruction of a function above that nothing else modifies (a
    // function's entry unless `func` says otherwise); `counting` only touches `rec`, which the
    // tests keep alive until the hook is removed.
    unsafe { install_probe(target, &p) }.expect("install_probe")
}

fn hook(target: usize, rec: &Record) -> Hook {
    let h = probe_at(target, FuncBounds::Entry, PatchMode::Jump, rec);
    assert_eq!(h.kind(), HookKind::Jump);
    h
}

/// Sets `entry` on `h`.
fn set(h: &Hook, entry: Option<NativeEntry>) -> bool {
    // SAFETY: the entries of this file follow the contract and are never unmapped.
    unsafe { h.set_native(entry) }
}

#[test]
fn status_ran_skips_the_handler_and_the_entry_sees_the_live_registers() {
    let target = addr(n_ran as *const ());
    let rec = Record::default();
    let h = hook(target, &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set(&h, Some(entry)));
    for i in 0..1000 {
        assert_eq!(n_ran(black_box(i), 7), i + 7);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1000);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0, "the handler never ran");
    assert_eq!(seen.bad.load(Ordering::SeqCst), 0, "rsi, alignment or DF");
    assert_eq!(seen.rdi.load(Ordering::SeqCst), 999);
    assert_eq!(seen.rip.load(Ordering::SeqCst), target as u64);
    assert_eq!(h.native_traps(), 0);
    h.remove().unwrap();
    assert_eq!(n_ran(1, 2), 3);
    assert_eq!(
        seen.calls.load(Ordering::SeqCst),
        1000,
        "no call after removal"
    );
}

#[test]
fn status_not_run_and_unknown_statuses_call_the_handler_as_well() {
    let target = addr(n_not_run as *const ());
    let rec = Record::default();
    let h = hook(target, &rec);
    let (not_run, seen) = native(NATIVE_NOT_RUN, Action::Nothing);
    assert!(set(&h, Some(not_run)));
    for i in 0..100 {
        assert_eq!(n_not_run(black_box(i), 1), i + 1);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 100);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 100);
    assert_eq!(rec.rdi.load(Ordering::SeqCst), 99);
    let (unknown, seen7) = native(7, Action::Nothing);
    assert!(set(&h, Some(unknown)));
    for i in 0..50 {
        assert_eq!(n_not_run(black_box(i), 1), i + 1);
    }
    assert_eq!(seen7.calls.load(Ordering::SeqCst), 50);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 150);
    assert_eq!(
        seen.bad.load(Ordering::SeqCst) + seen7.bad.load(Ordering::SeqCst),
        0
    );
    assert_eq!(h.native_traps(), 0);
    h.remove().unwrap();
    assert_eq!(n_not_run(1, 2), 3);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 150);
}

#[test]
fn status_trapped_skips_the_handler_and_counts_the_trap() {
    let target = addr(n_trapped as *const ());
    let rec = Record::default();
    let h = hook(target, &rec);
    let (entry, seen) = native(NATIVE_TRAPPED, Action::Nothing);
    assert!(set(&h, Some(entry)));
    for i in 0..300 {
        assert_eq!(n_trapped(black_box(i), 2), i + 2);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 300);
    assert_eq!(h.native_traps(), 300);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    h.remove().unwrap();
    assert_eq!(n_trapped(1, 2), 3);
}

#[test]
fn clearing_the_native_entry_returns_to_the_handler() {
    let target = addr(n_toggle as *const ());
    let rec = Record::default();
    let h = hook(target, &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    for _ in 0..3 {
        assert!(set(&h, Some(entry)));
        for i in 0..10 {
            assert_eq!(n_toggle(i, 1), i + 1);
        }
        assert!(set(&h, None));
        for i in 0..20 {
            assert_eq!(n_toggle(i, 1), i + 1);
        }
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 30);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 60);
    h.remove().unwrap();
    assert_eq!(n_toggle(1, 2), 3);
}

/// Clears the excluded thread when dropped (a panicking test must not leave a thread pointer
/// there that a later thread may reuse).
struct Excluded;

impl Excluded {
    fn on() -> Self {
        set_native_excluded_thread(true);
        Excluded
    }
}

impl Drop for Excluded {
    fn drop(&mut self) {
        set_native_excluded_thread(false);
    }
}

#[test]
fn the_excluded_thread_takes_the_handler_path_while_others_take_the_native_one() {
    let target = addr(n_thread as *const ());
    let rec = Record::default();
    let h = hook(target, &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set(&h, Some(entry)));
    std::thread::scope(|s| {
        s.spawn(|| {
            let _excluded = Excluded::on();
            for i in 0..100 {
                assert_eq!(n_thread(black_box(i), 3), i + 3);
            }
            assert_eq!(rec.hits.load(Ordering::SeqCst), 100);
            assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
            // Another thread, while this one is excluded: native.
            std::thread::spawn(|| {
                for i in 0..40 {
                    assert_eq!(n_thread(black_box(i), 3), i + 3);
                }
            })
            .join()
            .unwrap();
            assert_eq!(seen.calls.load(Ordering::SeqCst), 40);
            for i in 0..100 {
                assert_eq!(n_thread(black_box(i), 3), i + 3);
            }
            assert_eq!(rec.hits.load(Ordering::SeqCst), 200);
        });
    });
    // No thread is excluded any more: this one runs the entry as well.
    for i in 0..10 {
        assert_eq!(n_thread(black_box(i), 3), i + 3);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 50);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 200);
    h.remove().unwrap();
    assert_eq!(n_thread(1, 2), 3);
}

#[test]
fn arguments_and_values_in_caller_saved_registers_survive_a_clobbering_entry() {
    let rec = Record::default();
    let hooks = [
        hook(addr(n_sum6 as *const ()), &rec),
        hook(addr(n_fsum8 as *const ()), &rec),
        hook(addr(n_ipa_leaf as *const ()), &rec),
    ];
    let mut seens = Vec::new();
    for h in &hooks {
        let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
        assert!(set(h, Some(entry)));
        seens.push(seen);
    }
    for i in 0..200u64 {
        let x = black_box(i);
        assert_eq!(
            n_sum6(x, 2, 3, 4, 5, 6),
            x + 4 + 9 + 16 + 25 + 36,
            "integer arguments"
        );
        let f = i as f64 * 0.5;
        assert_eq!(
            n_fsum8(black_box(f), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.25),
            f + 21.25,
            "float arguments"
        );
        let a = 0.25 + f;
        assert_eq!(
            n_ipa_caller(black_box(a), x),
            (9 * x + 21) as f64 + 3.0 * a,
            "values kept in caller-saved registers across the call"
        );
    }
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    for s in &seens {
        assert_eq!(s.calls.load(Ordering::SeqCst), 200);
        assert_eq!(s.bad.load(Ordering::SeqCst), 0);
    }
    assert_eq!(seens[0].rdi.load(Ordering::SeqCst), 199);
    for h in hooks {
        h.remove().unwrap();
    }
    assert_eq!(n_sum6(1, 2, 3, 4, 5, 6), 91);
    assert_eq!(n_fsum8(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), 8.0);
    assert_eq!(n_ipa_caller(1.0, 1), 33.0);
}

#[test]
fn an_entry_writing_pt_regs_changes_the_argument_and_can_return_at_once() {
    let rec = Record::default();
    let h = hook(addr(n_setarg as *const ()), &rec);
    let (entry, _) = native(NATIVE_RAN, Action::SetRdi(100));
    assert!(set(&h, Some(entry)));
    assert_eq!(n_setarg(1, 2), 102);
    h.remove().unwrap();
    assert_eq!(n_setarg(1, 2), 3);

    let h = hook(addr(n_override as *const ()), &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Return(42));
    assert!(set(&h, Some(entry)));
    for i in 0..20 {
        assert_eq!(n_override(black_box(i), 2), 42);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 20);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    h.remove().unwrap();
    assert_eq!(n_override(1, 2), 3);
}

#[test]
fn a_mid_function_native_probe_keeps_the_flags_and_clears_df_for_the_entry() {
    let start = addr(n_mid as *const ());
    let site = addr(n_mid_site as *const ());
    let end = addr(n_mid_end as *const ());
    let df = 1u64 << 32;
    let rec = Record::default();
    let h = probe_at(
        site,
        FuncBounds::Range { start, end },
        PatchMode::Jump,
        &rec,
    );
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set(&h, Some(entry)));
    // The entry clobbers the flags (CF from `cmp`) and requires DF clear; the caller set it.
    for (a, b) in [(1, 2), (2, 1), (5, 5), (0, u64::MAX), (u64::MAX, 3)] {
        assert_eq!(
            n_mid(black_box(a), b),
            a.max(b).wrapping_add(df),
            "({a}, {b})"
        );
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 5);
    assert_eq!(seen.bad.load(Ordering::SeqCst), 0, "DF clear at the call");
    assert_eq!(seen.rip.load(Ordering::SeqCst), site as u64);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    // The handler path of the same stub.
    assert!(set(&h, None));
    assert_eq!(n_mid(3, 9), 9 + df);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 1);
    h.remove().unwrap();
    assert_eq!(n_mid(3, 9), 9 + df);
    assert_eq!(n_mid(9, 3), 9 + df);
}

#[test]
fn trap_hooks_have_no_native_slot() {
    let target = addr(n_noslot as *const ());
    let rec = Record::default();
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    let h = probe_at(target, FuncBounds::Entry, PatchMode::Trap, &rec);
    assert_eq!(h.kind(), HookKind::Trap);
    assert!(!set(&h, Some(entry)));
    assert_eq!(n_noslot(1, 2), 3);
    assert_eq!(h.native_traps(), 0);
    h.remove().unwrap();
    assert_eq!(rec.hits.load(Ordering::SeqCst), 1);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn with_a_return_handler_the_entry_runs_natively_and_the_stub_arms_the_return() {
    let target = addr(n_both as *const ());
    let rec = Record::default();
    let p = Probe {
        entry: Some(counting),
        ret: Some(counting),
        user: core::ptr::from_ref(&rec).cast_mut().cast(),
        func: FuncBounds::Entry,
        mode: PatchMode::Jump,
    };
    // SAFETY: a function entry above; `counting` only touches `rec`, which outlives the hook.
    let h = unsafe { install_probe(target, &p) }.unwrap();
    assert_eq!(h.kind(), HookKind::Jump);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set(&h, Some(entry)));
    for i in 0..500 {
        assert_eq!(n_both(black_box(i), 2), i + 2);
    }
    // The entry natively every time; the return handler every time (the first return of the
    // thread armed by `arm_only`, the others inline), the entry handler never.
    assert_eq!(seen.calls.load(Ordering::SeqCst), 500);
    assert_eq!(seen.bad.load(Ordering::SeqCst), 0);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 500);
    assert_eq!(
        rec.rdi.load(Ordering::SeqCst),
        499,
        "rdi after the last return"
    );
    assert_eq!(pending_returns(), 0);
    // An entry that did not run: the handler arms and runs the entry program.
    let (not_run, nr_seen) = native(NATIVE_NOT_RUN, Action::Nothing);
    assert!(set(&h, Some(not_run)));
    for i in 0..100 {
        assert_eq!(n_both(black_box(i), 2), i + 2);
    }
    assert_eq!(nr_seen.calls.load(Ordering::SeqCst), 100);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 500 + 200);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
    assert_eq!(n_both(1, 2), 3);
}

#[test]
fn four_threads_count_exactly_and_removal_waits_for_entries_in_flight() {
    let target = addr(n_conc as *const ());
    let rec = Record::default();
    let h = hook(target, &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set(&h, Some(entry)));
    const CALLS: u64 = 20_000;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..CALLS {
                    assert_eq!(n_conc(black_box(i), 1), i + 1);
                }
            });
        }
    });
    assert_eq!(seen.calls.load(Ordering::SeqCst), 4 * CALLS);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    // Removal while four threads call: once `remove` returns, the entry is never called again.
    let stop = AtomicBool::new(false);
    let started = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                started.fetch_add(1, Ordering::SeqCst);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(n_conc(black_box(i), 1), i + 1);
                    i += 1;
                }
            });
        }
        while started.load(Ordering::SeqCst) < 4 || seen.calls.load(Ordering::SeqCst) < 5 * CALLS {
            std::thread::yield_now();
        }
        h.remove().unwrap();
        let after_remove = seen.calls.load(Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(seen.calls.load(Ordering::SeqCst), after_remove);
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    assert_eq!(seen.bad.load(Ordering::SeqCst), 0);
    assert_eq!(n_conc(1, 2), 3);
}

/// A return probe only (no entry handler): the stub arms returns itself.
fn ret_probe(target: usize, rec: &Record) -> Hook {
    let p = Probe {
        entry: None,
        ret: Some(counting),
        user: core::ptr::from_ref(rec).cast_mut().cast(),
        func: FuncBounds::Entry,
        mode: PatchMode::Jump,
    };
    // SAFETY: a function entry above that nothing else modifies; `counting` only touches
    // `rec`, which the tests keep alive until the hook is removed.
    let h = unsafe { install_probe(target, &p) }.expect("install_probe");
    assert_eq!(h.kind(), HookKind::Jump);
    h
}

fn set_ret(h: &Hook, entry: Option<NativeEntry>) -> bool {
    // SAFETY: the entries of this file follow the contract and are never unmapped.
    unsafe { h.set_native_return(entry) }
}

#[test]
fn a_return_only_probe_runs_its_native_entry_at_every_return() {
    let target = addr(n_ret as *const ());
    let rec = Record::default();
    let h = ret_probe(target, &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set_ret(&h, Some(entry)));
    assert!(
        !set(&h, Some(entry)),
        "no entry slot: the return must be armed"
    );
    let missed = missed_returns();
    for i in 0..1000 {
        assert_eq!(n_ret(black_box(i), 5), i + 5);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1000);
    assert_eq!(seen.bad.load(Ordering::SeqCst), 0, "rsi, alignment or DF");
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0, "the handler never ran");
    // The registers after the return: rdi as the function left it, rip = the return address
    // in the caller (not the trampoline, not the function).
    assert_eq!(seen.rdi.load(Ordering::SeqCst), 999);
    let rip = seen.rip.load(Ordering::SeqCst);
    assert!(rip != 0 && rip != target as u64, "{rip:#x}");
    assert_eq!(pending_returns(), 0, "every slot was given back");
    assert_eq!(missed_returns(), missed);
    // Cleared: the handler again.
    assert!(set_ret(&h, None));
    for i in 0..10 {
        assert_eq!(n_ret(black_box(i), 5), i + 5);
    }
    assert_eq!(rec.hits.load(Ordering::SeqCst), 10);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1000);
    h.remove().unwrap();
    assert_eq!(n_ret(1, 2), 3);
    assert_eq!(pending_returns(), 0);
}

#[test]
fn a_return_entry_that_did_not_run_leaves_the_return_to_the_handler() {
    let target = addr(n_ret_not_run as *const ());
    let rec = Record::default();
    let h = ret_probe(target, &rec);
    let (entry, seen) = native(NATIVE_NOT_RUN, Action::Nothing);
    assert!(set_ret(&h, Some(entry)));
    for i in 0..100 {
        assert_eq!(n_ret_not_run(black_box(i), 1), i + 1);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 100);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 100);
    assert_eq!(rec.rdi.load(Ordering::SeqCst), 99);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
}

#[test]
fn a_trapped_return_entry_skips_the_handler_and_counts_the_trap() {
    let target = addr(n_ret_trapped as *const ());
    let rec = Record::default();
    let h = ret_probe(target, &rec);
    let (entry, seen) = native(NATIVE_TRAPPED, Action::Nothing);
    assert!(set_ret(&h, Some(entry)));
    for i in 0..250 {
        assert_eq!(n_ret_trapped(black_box(i), 3), i + 3);
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 250);
    assert_eq!(h.native_traps(), 250, "counted by the return stub");
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
    // A new hook on the same function (likely the same return site) starts from zero.
    let h = ret_probe(target, &rec);
    assert_eq!(h.native_traps(), 0);
    h.remove().unwrap();
}

#[test]
fn recursion_on_four_threads_returns_every_frame_through_native_entries() {
    let target = addr(n_ret_rec as *const ());
    let rec = Record::default();
    let h = ret_probe(target, &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set_ret(&h, Some(entry)));
    const ROUNDS: u64 = 500;
    const DEPTH: u64 = 20;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    assert_eq!(n_ret_rec(black_box(DEPTH)), DEPTH);
                }
                assert_eq!(pending_returns(), 0);
            });
        }
    });
    assert_eq!(seen.calls.load(Ordering::SeqCst), 4 * ROUNDS * (DEPTH + 1));
    assert_eq!(rec.hits.load(Ordering::SeqCst), 0);
    h.remove().unwrap();
}

#[test]
fn return_probes_come_and_go_while_four_threads_call() {
    let target = addr(n_ret_cycles as *const ());
    let rec = Record::default();
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A return armed before a removal still comes back here.
                    assert_eq!(n_ret_cycles(black_box(i), 1), i + 1);
                    i += 1;
                }
            });
        }
        for _ in 0..200 {
            let h = ret_probe(target, &rec);
            assert!(set_ret(&h, Some(entry)));
            std::thread::sleep(std::time::Duration::from_micros(200));
            h.remove().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let calls = seen.calls.load(Ordering::SeqCst);
    assert!(calls > 0, "the entry ran while attached");
    assert_eq!(n_ret_cycles(1, 2), 3);
    assert_eq!(
        seen.calls.load(Ordering::SeqCst),
        calls,
        "never after removal"
    );
}

#[test]
fn a_busy_thread_takes_the_handlers_of_entries_and_returns() {
    // What a thread running programs on the host's side (a helper calling hooked code) gets.
    use bpftime_attach::x86_64::NativeBusy;
    let rec = Record::default();
    let h = hook(addr(n_busy as *const ()), &rec);
    let (entry, seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set(&h, Some(entry)));
    let ret_rec = Record::default();
    let r = ret_probe(addr(n_ret_busy as *const ()), &ret_rec);
    let (ret_entry, ret_seen) = native(NATIVE_RAN, Action::Nothing);
    assert!(set_ret(&r, Some(ret_entry)));
    for _ in 0..3 {
        assert_eq!(n_busy(1, 2), 3);
        assert_eq!(n_ret_busy(1, 2), 3);
    }
    {
        let _outer = NativeBusy::enter();
        {
            let _inner = NativeBusy::enter();
            assert_eq!(n_busy(1, 2), 3);
            assert_eq!(n_ret_busy(1, 2), 3);
        }
        assert_eq!(n_busy(1, 2), 3);
        assert_eq!(n_ret_busy(1, 2), 3);
    }
    assert_eq!(n_busy(1, 2), 3);
    assert_eq!(n_ret_busy(1, 2), 3);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 4);
    assert_eq!(rec.hits.load(Ordering::SeqCst), 2);
    assert_eq!(ret_seen.calls.load(Ordering::SeqCst), 4);
    // The first return of the thread was armed by the handler path but ran natively.
    assert_eq!(ret_rec.hits.load(Ordering::SeqCst), 2);
    assert_eq!(pending_returns(), 0);
    h.remove().unwrap();
    r.remove().unwrap();
}
