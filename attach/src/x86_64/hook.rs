//! [`install`] and [`Hook`]: the order of the steps that make a hook appear and disappear
//! while other threads run the hooked code.
//!
//! # Invariants
//!
//! - One registry lock serialises every install and removal in the process (and thereby every
//!   code write, stop and trap arming); hooked byte ranges in the registry never overlap.
//! - Install: the stub and trampoline are sealed (read-execute) before any byte of the target
//!   changes; the `SIGTRAP` redirection to the stub is armed before an int3 can appear.
//!   A multi-instruction patch first puts an int3 on the first byte (so no thread enters the
//!   prologue any more), then stops the world, writes the jump, and moves every thread stopped
//!   between two prologue instructions to the same instruction in the trampoline.
//! - Remove: the original bytes are written back first, then the world is stopped and threads
//!   that entered the stub but were not yet counted go back to the original code; then the
//!   in-flight count drains to zero. After that no thread runs the handler for this hook.
//! - The only `unsafe` here is the contract of [`install`]; the work is done by the safe
//!   wrappers of `code_mem`, `patch` and `signals`.

use core::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

use super::code_mem::{self, CodeBlock};
use super::patch::{self, INT3};
use super::prologue::{self, JMP_ABS_LEN, JMP_REL32_LEN, SCAN_LEN};
use super::signals::{self, Fixup};
use super::stub::{self, StubParams};
use crate::procmaps::read_self_maps;
use crate::{AttachError, PtRegs};

/// A hook handler: called on the hooking thread with the registers at the hooked address and
/// the `user` pointer given to [`install`]. Changes to general-purpose registers and flags take
/// effect when the hooked code continues. A panic aborts the process (it cannot unwind through
/// the stub).
pub type HookHandler = extern "C" fn(regs: &mut PtRegs, user: *mut c_void);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    pub(crate) start: usize,
    pub(crate) end: usize,
}

static REGISTRY: Mutex<Vec<Range>> = Mutex::new(Vec::new());

/// The registry of patched byte ranges (uprobe hooks and syscall sites); held across every
/// patch, stop and trap arming.
pub(crate) fn registry() -> MutexGuard<'static, Vec<Range>> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An installed inline hook. Removing it ([`Hook::remove`] or drop) restores the original bytes.
#[derive(Debug)]
#[must_use = "dropping a Hook removes it"]
pub struct Hook {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    target: usize,
    /// The bytes the jump replaced, `len` of them.
    original: [u8; JMP_ABS_LEN],
    len: usize,
    patch_len: usize,
    trampoline: usize,
    block: CodeBlock,
    entry: [Fixup; 3],
}

/// Installs a hook at `target`: from now on every thread executing `target` first calls
/// `handler(&mut regs, user)`, then runs the original instructions.
///
/// Errors leave the code untouched: [`AttachError::TooShort`] (a trap-based hook is needed
/// there), [`AttachError::BranchIntoPatch`], [`AttachError::Undecodable`],
/// [`AttachError::Unrelocatable`], [`AttachError::AlreadyHooked`] /
/// [`AttachError::OverlapsHook`], [`AttachError::NotMapped`], system call failures, and
/// [`AttachError::ThreadStopTimeout`] when a thread that blocks the stop signal keeps running.
///
/// Installing a hook whose patch covers several instructions briefly stops every other thread
/// with a real-time signal; a thread then inside a system call that is never restarted
/// (`nanosleep`, `poll`, `epoll_wait`, … see `signal(7)`) sees `EINTR`.
///
/// # Safety
///
/// - `target` must be the first byte of an instruction in code that stays mapped while hooked,
///   and nothing else may modify that code while the hook exists (another inline hooker, a
///   debugger's breakpoints, or code that jumps into the first bytes of `target` from before
///   it — only branches after `target` can be checked).
/// - `handler` must be sound to call on any thread that executes `target`, at that point, with
///   `user`; `user` must stay valid for it until the hook is removed.
/// - The process must not replace the `SIGTRAP` handler or the stop signal's handler while
///   hooks are being installed or removed.
pub unsafe fn install(
    target: usize,
    handler: HookHandler,
    user: *mut c_void,
) -> Result<Hook, AttachError> {
    let mut reg = registry();
    signals::init()?;
    patch::init_sync_core();
    if reg.iter().any(|r| r.start == target) {
        return Err(AttachError::AlreadyHooked { addr: target });
    }
    if let Some(r) = reg.iter().find(|r| r.start < target && target < r.end) {
        return Err(AttachError::OverlapsHook {
            addr: target,
            existing: r.start,
        });
    }
    let maps = read_self_maps()?;
    let code = code_mem::read_code(&maps, target, SCAN_LEN + 2 * JMP_ABS_LEN)?;
    let (block, len) = match code_mem::alloc_near(target, &maps)? {
        Some(block) => (block, JMP_REL32_LEN),
        None => (code_mem::alloc_anywhere()?, JMP_ABS_LEN),
    };
    let params = StubParams {
        hook_addr: target as u64,
        handler: handler as usize as u64,
        user: user as u64,
        inflight: block.inflight_addr() as u64,
    };
    let built = prologue::analyze(target as u64, &code, len).and_then(|p| {
        let enc = stub::encode(block.code_addr() as u64, &params, &p)?;
        if let Some(r) = reg
            .iter()
            .find(|r| r.start < target + p.patch_len && target < r.end)
        {
            return Err(AttachError::OverlapsHook {
                addr: target,
                existing: r.start,
            });
        }
        block.write_code(&enc.code)?;
        block.seal()?;
        Ok((p, enc))
    });
    let (prologue, enc) = match built {
        Ok(x) => x,
        Err(e) => {
            block.free_unsealed();
            return Err(e);
        }
    };
    // From here on the block is executable and is never freed, even on error.
    let stub_entry = block.code_addr();
    let jump = jump_bytes(target, stub_entry, len);
    let mut original = [0u8; JMP_ABS_LEN];
    original[..len].copy_from_slice(&code[..len]);
    let fixups: Vec<Fixup> = prologue
        .inner_boundaries()
        .map(|(i, off)| Fixup {
            from: target + off,
            to: enc.relocated[i] as usize,
            rsp_delta: 0,
        })
        .collect();
    let entry = enc.entry.map(|e| Fixup {
        from: e.pc as usize,
        to: target,
        rsp_delta: e.rsp_delta,
    });

    let writable = patch::make_writable(&maps, target, len)?;
    signals::arm_trap(target, stub_entry);
    let patched = if fixups.is_empty() {
        patch::write_instruction(target, &jump[..len]);
        Ok(())
    } else {
        // int3 first: from now on no thread enters the prologue; then move the ones inside it.
        patch::store_byte(target, INT3);
        patch::sync_cores();
        match signals::stop_the_world(&fixups) {
            Ok(stopped) => {
                patch::write_instruction(target, &jump[..len]);
                stopped.release(true);
                Ok(())
            }
            Err(e) => {
                patch::store_byte(target, original[0]);
                patch::sync_cores();
                Err(e)
            }
        }
    };
    signals::disarm_trap();
    let restored = writable.restore();
    patched?;
    reg.push(Range {
        start: target,
        end: target + prologue.patch_len,
    });
    let state = State {
        target,
        original,
        len,
        patch_len: prologue.patch_len,
        trampoline: enc.trampoline as usize,
        block,
        entry,
    };
    if let Err(e) = restored {
        // The text page could not be made read-only again: take the hook out and report.
        if let Err((_, e2)) = remove_locked(&mut reg, state) {
            unrecoverable(&e2);
        }
        return Err(e);
    }
    Ok(Hook { state: Some(state) })
}

/// `jmp rel32` to `stub` or `jmp [rip+0]; dq stub`.
fn jump_bytes(target: usize, stub: usize, len: usize) -> [u8; JMP_ABS_LEN] {
    let mut b = [0u8; JMP_ABS_LEN];
    if len == JMP_REL32_LEN {
        let rel = (stub as i64 - (target as i64 + JMP_REL32_LEN as i64)) as i32;
        b[0] = 0xe9;
        b[1..5].copy_from_slice(&rel.to_le_bytes());
    } else {
        b[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        b[6..14].copy_from_slice(&(stub as u64).to_le_bytes());
    }
    b
}

/// Restores the original bytes of `state`'s hook. On `Err`, the bool says whether the bytes
/// were restored (only the stop failed) or the hook is still in place.
fn remove_locked(reg: &mut Vec<Range>, state: State) -> Result<(), (bool, AttachError)> {
    let maps = read_self_maps().map_err(|e| (false, e))?;
    let target = state.target;
    let writable = patch::make_writable(&maps, target, state.len).map_err(|e| (false, e))?;
    signals::arm_trap(target, state.block.code_addr());
    patch::write_instruction(target, &state.original[..state.len]);
    let restored = writable.restore();
    reg.retain(|r| r.start != target);
    // Threads that took the jump but were not yet counted go back to the original code.
    let stop = signals::stop_the_world(&state.entry).map(|s| s.release(true));
    signals::disarm_trap();
    while state.block.inflight() != 0 {
        std::thread::yield_now();
    }
    // `state.block` stays mapped (`CodeBlock` has no Drop): a thread may still be in the
    // stub's or the trampoline's last instructions.
    stop.and(restored).map_err(|e| (true, e))
}

fn unrecoverable(e: &AttachError) -> ! {
    eprintln!("bpftime-attach: cannot restore the original code of a hook: {e}");
    std::process::abort();
}

impl Hook {
    /// The hooked address.
    pub fn target(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.target)
    }

    /// Where the relocated original instructions start: calling this address runs the hooked
    /// function without the hook.
    pub fn trampoline(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.trampoline)
    }

    /// Bytes from [`Hook::target`] owned by the hook (the overwritten instructions).
    pub fn patched_len(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.patch_len)
    }

    /// Removes the hook: restores the original bytes and returns once no thread runs (or will
    /// run) the handler for it. Must not be called from the hook's own handler (it would wait
    /// for itself).
    ///
    /// On [`AttachError::ThreadStopTimeout`] the original bytes are back, but a thread that
    /// blocks the stop signal may still enter the handler once: keep `user` valid. On other
    /// errors the hook stays installed for the rest of the process.
    pub fn remove(mut self) -> Result<(), AttachError> {
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        remove_locked(&mut registry(), state).map_err(|(_, e)| e)
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        if let Some(state) = self.state.take()
            && let Err((false, e)) = remove_locked(&mut registry(), state)
        {
            // Returning would leave the handler running with a `user` its owner is about to
            // free.
            unrecoverable(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_encodings() {
        let j = jump_bytes(0x1000, 0x2000, JMP_REL32_LEN);
        assert_eq!(&j[..5], &[0xe9, 0xfb, 0x0f, 0, 0]);
        let j = jump_bytes(0x2000, 0x1000, JMP_REL32_LEN);
        assert_eq!(&j[..5], &[0xe9, 0xfb, 0xef, 0xff, 0xff]);
        let j = jump_bytes(0x1000, 0x1122_3344_5566_7788, JMP_ABS_LEN);
        assert_eq!(
            j,
            [
                0xff, 0x25, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
    }
}
