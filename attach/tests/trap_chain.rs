//! The `SIGTRAP` handler of trap-based probes shares the signal with the application: traps
//! that are not ours go to the application's handler, whether it was installed through the
//! `sigaction` interposer (`intercept_sigaction`) or behind its back (`recheck_trap_handler`).
//! A process of its own: it changes the `SIGTRAP` disposition.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_attach::x86_64::{intercept_sigaction, recheck_trap_handler};
use bpftime_attach::{FuncBounds, HookKind, PatchMode, Probe, PtRegs, install_probe};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_trap_chain,\"ax\",@progbits",
    ".p2align 4",
    ".globl tc_short",
    ".type tc_short,@function",
    "tc_short:",
    "lea eax, [rdi + 1]",
    "ret",
    ".size tc_short, .-tc_short",
    ".popsection",
);

unsafe extern "C" {
    safe fn tc_short(a: u64) -> u64;
}

static HITS: AtomicU64 = AtomicU64::new(0);
static APP1: AtomicU64 = AtomicU64::new(0);
static APP2: AtomicU64 = AtomicU64::new(0);

extern "C" fn count(_regs: &mut PtRegs, _user: *mut c_void) {
    HITS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn app1(_sig: libc::c_int) {
    APP1.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn app2(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    APP2.fetch_add(1, Ordering::SeqCst);
}

fn foreign_int3() {
    // SAFETY: an int3 that is not a probe: the kernel sends SIGTRAP with rip after it, the
    // application's handler runs and execution continues with the next instruction.
    unsafe { core::arch::asm!("int3") };
}

fn sa(handler: usize, flags: libc::c_int) -> libc::sigaction {
    // SAFETY: plain data; zero is a valid empty action.
    let mut a: libc::sigaction = unsafe { core::mem::zeroed() };
    a.sa_sigaction = handler;
    a.sa_flags = flags;
    a
}

#[test]
fn application_trap_handlers_keep_working_next_to_trap_probes() {
    let p = Probe {
        entry: Some(count),
        ret: None,
        user: core::ptr::null_mut(),
        func: FuncBounds::Entry,
        mode: PatchMode::Auto,
    };
    // SAFETY: a function entry of this binary; the handler only bumps a static.
    let h = unsafe { install_probe(tc_short as *const () as usize, &p) }.unwrap();
    assert_eq!(h.kind(), HookKind::Trap);
    assert_eq!(tc_short(1), 2);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);

    // The application installs its handler through the interposer: recorded, not installed.
    let new = sa(app1 as *const () as usize, 0);
    // SAFETY: zeroed sigaction is valid output storage.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: valid pointers.
    let r = unsafe { intercept_sigaction(libc::SIGTRAP, &new, &mut old) };
    assert_eq!(r, Some(0));
    assert_eq!(
        old.sa_sigaction,
        libc::SIG_DFL,
        "the disposition before ours"
    );
    // Other signals are not ours to answer.
    // SAFETY: null pointers are allowed.
    let r = unsafe { intercept_sigaction(libc::SIGUSR2, core::ptr::null(), core::ptr::null_mut()) };
    assert_eq!(r, None);
    foreign_int3();
    assert_eq!(APP1.load(Ordering::SeqCst), 1);
    assert_eq!(tc_short(2), 3);
    assert_eq!(HITS.load(Ordering::SeqCst), 2);
    // A query sees the application's own handler.
    // SAFETY: as above.
    let r = unsafe { intercept_sigaction(libc::SIGTRAP, core::ptr::null(), &mut old) };
    assert_eq!(r, Some(0));
    assert_eq!(old.sa_sigaction, app1 as *const () as usize);

    // Behind the interposer's back (the real sigaction): probes would be lost until the
    // recheck puts our handler back in front of the application's.
    let raw = sa(app2 as *const () as usize, libc::SA_SIGINFO);
    // SAFETY: valid action, no old action wanted.
    let r = unsafe { libc::sigaction(libc::SIGTRAP, &raw, core::ptr::null_mut()) };
    assert_eq!(r, 0);
    assert!(recheck_trap_handler().unwrap());
    assert!(
        !recheck_trap_handler().unwrap(),
        "nothing to do a second time"
    );
    assert_eq!(tc_short(3), 4);
    assert_eq!(HITS.load(Ordering::SeqCst), 3);
    foreign_int3();
    assert_eq!(APP2.load(Ordering::SeqCst), 1);
    assert_eq!(APP1.load(Ordering::SeqCst), 1);
    h.remove().unwrap();
    assert_eq!(tc_short(4), 5);
    assert_eq!(HITS.load(Ordering::SeqCst), 3);
}
