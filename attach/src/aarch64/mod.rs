//! The aarch64 hook engine: decode → relocate → stub + trampoline → patch, as pure functions
//! over byte buffers and addresses, so it builds and is tested on every host (the tests run
//! its output under Unicorn and qemu-user). Installing the bytes in a live aarch64 process —
//! memory near the target, atomic text patching, moving stopped threads — is not here yet;
//! the agent is not built for aarch64.
//!
//! - `insn`: one instruction's pc-relative class (bit patterns of the Arm ARM, cross-checked
//!   by yaxpeax-arm's decoder) and whether it may move.
//! - `relocate`: which instructions a patch overwrites, the checks that refuse a patch
//!   (errors the caller answers with a trap-based probe), and their relocation into a
//!   trampoline at any distance.
//! - `stub`: the entry patch and the handler stub building a [`PtRegsArm64`].
//! - `encode`: the A64 encodings emitted.
//!
//! The patch is `b stub` (4 bytes, one instruction moved) when the stub is within ±128 MiB,
//! else `ldr x16, #8; br x16; .quad stub` (16 bytes, four instructions moved, x16 clobbered:
//! the AAPCS64 allows that at a function entry, where veneers do the same).

mod encode;
mod insn;
mod regs;
mod relocate;
mod stub;

pub use regs::PtRegsArm64;
pub use relocate::{SCAN_LEN, Trampoline};
pub use stub::{ABSOLUTE_PATCH_LEN, BRANCH_PATCH_LEN, entry_patch};

use crate::AttachError;

/// The handler a stub calls, by address (the code may be built for another address space):
/// it gets the registers at the hooked instruction and the hook's `user` word.
pub type HandlerArm64 = extern "C" fn(regs: &mut PtRegsArm64, user: u64);

/// Choices for [`build_hook`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookOptions {
    /// Use the 16-byte absolute patch even when the stub is within reach of a `b`.
    pub absolute: bool,
    /// The hooked code is in a BTI-guarded page (`PROT_BTI`): an indirect branch into it must
    /// land on a `bti` instruction, so every way back into the original code must be a direct
    /// branch. A target out of `b` range from the trampoline is then an error, not a `br x16`.
    pub bti_guarded: bool,
}

/// Everything needed to install a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCode {
    /// The bytes to write at the hooked address: [`BRANCH_PATCH_LEN`] or
    /// [`ABSOLUTE_PATCH_LEN`] of them.
    pub patch: Vec<u8>,
    /// Code for the stub address: the stub, the trampoline and their literal pools.
    pub code: Vec<u8>,
    /// Address of the trampoline inside `code`: running it executes the hooked code without
    /// the handler.
    pub trampoline: u64,
    /// `(original address, trampoline address)` of every moved instruction.
    pub moved: Vec<(u64, u64)>,
}

/// Builds the hook for `addr`, whose bytes from `addr` on are `code` (up to the end of the
/// mapping or [`SCAN_LEN`] bytes past the patch, for the check that nothing branches into the
/// patched bytes), with its stub at `stub_addr` (4-byte aligned) calling `handler(regs, user)`.
///
/// Errors: [`AttachError::TooShort`] when control leaves the function before the end of the
/// patch; [`AttachError::Undecodable`], [`AttachError::Unrelocatable`] and
/// [`AttachError::BranchIntoPatch`] for instructions that cannot move — the caller falls back
/// to a trap there.
pub fn build_hook(
    addr: u64,
    code: &[u8],
    stub_addr: u64,
    handler: u64,
    user: u64,
    opts: HookOptions,
) -> Result<HookCode, AttachError> {
    let patch = entry_patch(addr, stub_addr, opts.absolute);
    let prologue = relocate::analyze(addr, code, patch.len())?;
    let params = stub::StubParams {
        hook_addr: addr,
        handler,
        user,
    };
    let built = stub::build(stub_addr, params, &prologue, code, opts.bti_guarded)?;
    Ok(HookCode {
        patch,
        code: built.bytes,
        trampoline: built.trampoline,
        moved: built.moved,
    })
}

/// Relocates the first `len` bytes (a multiple of 4) of `code`, found at `addr`, into a
/// trampoline at `at` that continues at `addr + len`, with the checks of [`build_hook`]. For
/// callers that build their own entry code (return probes, trap fallbacks).
pub fn relocate(
    addr: u64,
    code: &[u8],
    len: usize,
    at: u64,
    bti_guarded: bool,
) -> Result<Trampoline, AttachError> {
    let prologue = relocate::analyze(addr, code, len)?;
    relocate::relocate(&prologue, code, at, bti_guarded)
}
