//! Shared by the native-entry tests: hand-assembled entries in their own pages.

use bpftime_attach::NativeEntry;
use core::ffi::c_void;

/// Copies `code` into a fresh page, makes it read-execute and returns it as an entry.
pub fn map_rx(code: &[u8]) -> NativeEntry {
    assert!(code.len() <= 4096);
    // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing.
    let page = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    // SAFETY: the page is ours, writable and large enough; then it becomes read-execute and is
    // never unmapped. The code is position-independent (absolute addresses only) and follows
    // the `NativeEntry` contract: it touches only rax, rcx, rdx, rsi, rdi, r8-r11, the flags,
    // 8 bytes of stack, `pt_regs` and its leaked `Seen`.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), page.cast::<u8>(), code.len());
        assert_eq!(
            libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
        core::mem::transmute::<*mut c_void, NativeEntry>(page)
    }
}
