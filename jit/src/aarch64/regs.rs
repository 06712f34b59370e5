//! Register assignment of the aarch64 backend (after the kernel's arm64 JIT,
//! `arch/arm64/net/bpf_jit_comp.c`).
//!
//! | eBPF | aarch64 | why                                                          |
//! |------|---------|--------------------------------------------------------------|
//! | r0   | x7      | caller-saved: helper calls clobber r0 anyway                  |
//! | r1–r5| x0–x4   | already the AAPCS64 argument registers of a helper call      |
//! | r6–r9| x19–x22 | callee-saved: survive helper calls as eBPF requires           |
//! | r10  | x25     | callee-saved frame pointer of the current eBPF frame          |
//!
//! Fixed registers: x26 holds the [`crate::abi::JitContext`] pointer; in checked mode x27 holds
//! `ctx.stack_lo` and x23/x24/x28 `ctx.fast_start`/`fast_len`/`fast_wlen`, for the inline
//! access checks. Scratch: x9 (effective address), x10–x13 (immediates, trap arguments), x16
//! (indirect call target, the AAPCS64 IP0). x5 carries the helper env (sixth argument).

/// Host register of each eBPF register r0..=r10.
pub const BPF_TO_HOST: [u8; 11] = [7, 0, 1, 2, 3, 4, 19, 20, 21, 22, 25];

/// Host register holding eBPF register `r`.
#[inline]
pub fn host(r: u8) -> u8 {
    BPF_TO_HOST[r as usize]
}

/// eBPF r0.
pub const R0: u8 = 7;
/// eBPF r10.
pub const FP: u8 = 25;
/// The `JitContext` pointer.
pub const CTX: u8 = 26;
/// Checked mode: lowest address of the eBPF stack (`ctx.stack_lo`).
pub const STACK_LO: u8 = 27;
/// Checked mode: `ctx.fast_start`.
pub const FAST_START: u8 = 23;
/// Checked mode: `ctx.fast_len` (bytes loads may touch).
pub const FAST_LEN: u8 = 24;
/// Checked mode: `ctx.fast_wlen` (bytes stores may touch).
pub const FAST_WLEN: u8 = 28;
/// Scratch: effective address of memory accesses (kept across the slow-path check call).
pub const ADDR: u8 = 9;
/// Scratch: large immediates and offsets.
pub const TMP: u8 = 10;
/// Scratch: store values, quotients.
pub const TMP2: u8 = 11;
/// Scratch: trap arguments.
pub const TMP3: u8 = 12;
/// Scratch: trap kind.
pub const TMP4: u8 = 13;
/// Indirect call target (IP0).
pub const CALL: u8 = 16;
/// The helper env argument register.
pub const ENV_ARG: u8 = 5;
/// The zero register in data-register positions.
pub const ZR: u8 = 31;
