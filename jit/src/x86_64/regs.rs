//! Register assignment of the x86_64 backend (the kernel's `arch/x86/net/bpf_jit_comp.c`
//! mapping, with r12 holding the [`crate::abi::JitContext`] pointer).
//!
//! | eBPF | x86_64 | why |
//! |---|---|---|
//! | r0 | rax | return value |
//! | r1–r5 | rdi, rsi, rdx, rcx, r8 | the first five C arguments: a helper call needs no moves |
//! | r6–r9 | rbx, r13, r14, r15 | callee-saved: survive helper calls for free |
//! | r10 | rbp | callee-saved frame pointer |
//! | — | r12 | the `JitContext` (callee-saved) |
//! | — | r9, r10, r11 | scratch (r9 is also the helpers' sixth argument, the env) |

/// x86_64 register numbers (the ModRM/REX encoding).
#[allow(missing_docs)]
pub mod x {
    pub const RAX: u8 = 0;
    pub const RCX: u8 = 1;
    pub const RDX: u8 = 2;
    pub const RBX: u8 = 3;
    pub const RSP: u8 = 4;
    pub const RBP: u8 = 5;
    pub const RSI: u8 = 6;
    pub const RDI: u8 = 7;
    pub const R8: u8 = 8;
    pub const R9: u8 = 9;
    pub const R10: u8 = 10;
    pub const R11: u8 = 11;
    pub const R12: u8 = 12;
    pub const R13: u8 = 13;
    pub const R14: u8 = 14;
    pub const R15: u8 = 15;
}

/// The x86_64 register holding eBPF register `r` (0..=10).
pub const MAP: [u8; 11] = [
    x::RAX,
    x::RDI,
    x::RSI,
    x::RDX,
    x::RCX,
    x::R8,
    x::RBX,
    x::R13,
    x::R14,
    x::R15,
    x::RBP,
];

/// Native register of eBPF register `r`.
#[inline]
pub fn native(r: u8) -> u8 {
    MAP[usize::from(r)]
}

/// Scratch registers, never holding eBPF state across instructions.
pub const SCRATCH: [u8; 3] = [x::R9, x::R10, x::R11];

/// Holds the `JitContext` pointer for the whole run.
pub const CTX: u8 = x::R12;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_injective_and_avoids_scratch_ctx_and_rsp() {
        let mut seen = [false; 16];
        for &n in &MAP {
            assert!(!seen[usize::from(n)], "x{n} used twice");
            seen[usize::from(n)] = true;
            assert!(!SCRATCH.contains(&n) && n != CTX && n != x::RSP);
        }
    }
}
