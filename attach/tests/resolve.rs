//! From (binary, file offset) — what a uprobe carries — back to a function of this process.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_attach::{
    PtRegs, find_symbol_in_process, install, resolve_file_offset, symbol_file_offset,
};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_resolve,\"ax\",@progbits",
    ".p2align 4",
    ".globl r_uprobe_target",
    ".type r_uprobe_target,@function",
    "r_uprobe_target:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + rsi]",
    "pop rbp",
    "ret",
    ".size r_uprobe_target, .-r_uprobe_target",
    ".popsection",
);

unsafe extern "C" {
    safe fn r_uprobe_target(a: u64, b: u64) -> u64;
}

fn target() -> usize {
    r_uprobe_target as *const () as usize
}

#[test]
fn symbol_offset_of_own_binary_resolves_to_the_function() {
    let offset = symbol_file_offset("/proc/self/exe", "r_uprobe_target").unwrap();
    assert_ne!(offset, 0);
    assert_eq!(
        resolve_file_offset("/proc/self/exe", offset).unwrap(),
        target()
    );
    // The same through the binary's real path, as a loader would pass it.
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(resolve_file_offset(&exe, offset).unwrap(), target());
    assert_eq!(find_symbol_in_process("r_uprobe_target").unwrap(), target());
}

#[test]
fn offset_outside_any_mapping_is_an_error() {
    let len = std::fs::metadata("/proc/self/exe").unwrap().len();
    assert!(matches!(
        resolve_file_offset("/proc/self/exe", len + (1 << 30)),
        Err(bpftime_attach::AttachError::OffsetNotMapped { .. })
    ));
}

static HITS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count(_regs: &mut PtRegs, _user: *mut c_void) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn uprobe_style_target_can_be_hooked() {
    let offset = symbol_file_offset("/proc/self/exe", "r_uprobe_target").unwrap();
    let addr = resolve_file_offset("/proc/self/exe", offset).unwrap();
    // SAFETY: the resolved address is the entry of the function above; `count` touches only a
    // static.
    let hook = unsafe { install(addr, count, core::ptr::null_mut()) }.unwrap();
    assert_eq!(r_uprobe_target(2, 3), 5);
    hook.remove().unwrap();
    assert_eq!(HITS.load(Ordering::Relaxed), 1);
}
