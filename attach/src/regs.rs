//! The register context handed to hook handlers: the kernel's x86_64 `struct pt_regs`
//! (`arch/x86/include/asm/ptrace.h`), so `bpf_tracing.h`'s `PT_REGS_*` macros read the same
//! offsets in userspace as in the kernel.

use core::mem::{offset_of, size_of};

/// The kernel's x86_64 `struct pt_regs`: 21 u64 in this order.
///
/// A hook handler may change the general-purpose registers and `eflags`; the changes are
/// applied when the hooked code continues. Writes to `rip`, `rsp`, `cs`, `ss` and `orig_rax` are
/// ignored for now.
#[doc(alias = "pt_regs")]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// `-1`: a probe is not a system call.
    pub orig_rax: u64,
    /// The hooked address.
    pub rip: u64,
    /// `0x33`, the 64-bit user code segment.
    pub cs: u64,
    pub eflags: u64,
    /// The stack pointer at the hooked address.
    pub rsp: u64,
    /// `0x2b`, the user data segment.
    pub ss: u64,
}

/// The user code segment selector of x86_64 Linux (`__USER_CS`).
pub const USER_CS: u64 = 0x33;
/// The user data segment selector of x86_64 Linux (`__USER_DS`).
pub const USER_SS: u64 = 0x2b;

const _: () = assert!(size_of::<PtRegs>() == 168);
const _: () = assert!(offset_of!(PtRegs, rax) == 80);
const _: () = assert!(offset_of!(PtRegs, rdi) == 112);
const _: () = assert!(offset_of!(PtRegs, orig_rax) == 120);
const _: () = assert!(offset_of!(PtRegs, rip) == 128);
const _: () = assert!(offset_of!(PtRegs, eflags) == 144);
const _: () = assert!(offset_of!(PtRegs, rsp) == 152);
const _: () = assert!(offset_of!(PtRegs, ss) == 160);

impl PtRegs {
    /// The `n`th integer argument of the System V calling convention (`PT_REGS_PARM1` is
    /// `n = 1`): rdi, rsi, rdx, rcx, r8, r9. `None` for other `n`.
    #[doc(alias = "PT_REGS_PARM1")]
    pub fn parm(&self, n: usize) -> Option<u64> {
        Some(match n {
            1 => self.rdi,
            2 => self.rsi,
            3 => self.rdx,
            4 => self.rcx,
            5 => self.r8,
            6 => self.r9,
            _ => return None,
        })
    }

    /// The return value register (`PT_REGS_RC`).
    #[doc(alias = "PT_REGS_RC")]
    pub fn rc(&self) -> u64 {
        self.rax
    }
}
