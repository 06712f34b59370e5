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
//! - Remove: the original bytes are written back first, then the hook's removed flag is set:
//!   a thread that entered the stub counts itself in flight, then reads the flag and, if set,
//!   goes back to the original code; the remover waits for the in-flight count to drain. After
//!   that no thread runs the handler for this hook (no stop of the world is needed).
//! - Native fast path (jump hooks): the stub calls the entry in the hook's native word, if any,
//!   instead of the handler, except on a busy thread (`threads::NativeBusy`). The word is set
//!   with a release store ([`Hook::set_native`]); the call happens between the in-flight
//!   increment and decrement, so removal's drain covers threads inside a native entry exactly
//!   as threads inside the handler. With a return handler the stub then arms the return
//!   itself (as `retprobe::arm_on` does, or through `retprobe::arm_only`).
//! - The `unsafe` here is the contract of [`install`] and of [`Hook::set_native`], and the
//!   one-instruction read of the thread pointer (`thread_pointer`); the work is done by the
//!   safe wrappers of `code_mem`, `patch` and `signals`.

use core::ffi::c_void;
use core::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use super::code_mem::{self, CodeBlock};
use super::patch::{self, INT3};
use super::prologue::{self, JMP_ABS_LEN, JMP_REL32_LEN, SCAN_LEN};
use super::retprobe::{self, ProbeCtx};
use super::signals::{self, Fixup};
use super::stub::{self, NativeSlot, StubParams};
use super::trap;
use crate::procmaps::{MapEntry, read_self_maps};
use crate::{AttachError, PtRegs};

/// A hook handler: called on the hooking thread with the registers at the hooked address and
/// the `user` pointer given to [`install`]. Changes to general-purpose registers and flags take
/// effect when the hooked code continues. A panic aborts the process (it cannot unwind through
/// the stub).
pub type HookHandler = extern "C" fn(regs: &mut PtRegs, user: *mut c_void);

/// What a [`NativeEntry`] returns (System V: two INTEGER words, in rax:rdx).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeOutcome {
    /// The program's return value.
    pub r0: u64,
    /// [`NATIVE_RAN`], [`NATIVE_NOT_RUN`] or [`NATIVE_TRAPPED`] (any other value is treated as
    /// [`NATIVE_NOT_RUN`]).
    pub status: u64,
}

/// The program ran: the stub skips the handler.
pub const NATIVE_RAN: u64 = 0;
/// Nothing ran (a precondition failed): the stub calls the handler as usual.
pub const NATIVE_NOT_RUN: u64 = 1;
/// The program ran and trapped: the stub skips the handler and counts it
/// ([`Hook::native_traps`]).
pub const NATIVE_TRAPPED: u64 = 2;

/// A native fast path of a jump hook ([`Hook::set_native`]): called by the hook's stub with
/// `regs` = the live, writable `pt_regs` the stub restores the registers from (changes to the
/// general-purpose registers, `eflags` and `rip`/`rsp` take effect as a handler's do) and
/// `len` = 168.
///
/// Contract: System V for the general-purpose registers (it may clobber rax, rcx, rdx, rsi,
/// rdi, r8–r11 and rflags; it keeps rbx, rbp, r12–r15 and rsp), it never touches xmm/ymm/zmm,
/// x87 or MXCSR state (the stub saves none of them on this path), it leaves DF clear, it uses at
/// most 8 KiB of stack below rsp; rsp is 16-aligned at the call and DF is clear.
pub type NativeEntry = unsafe extern "sysv64" fn(regs: *mut PtRegs, len: u64) -> NativeOutcome;

/// Makes the calling thread take the handler path of every hook and system call site even
/// where a native entry is set, for good (`on`; the agent's own threads, whose calls into
/// hooked code must not run programs natively), or undoes one such call (`off`).
pub fn set_native_excluded_thread(on: bool) {
    use super::threads::NativeBusy;
    if on {
        NativeBusy::enter_always().forever();
    } else if let Some(r) = super::threads::current() {
        let b = r.busy.load(Ordering::Relaxed);
        r.busy.store(b.saturating_sub(1), Ordering::Relaxed);
    }
}

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

/// How a probe gets into the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PatchMode {
    /// A jump where one can go, else a trap ([`PatchMode::Trap`]).
    #[default]
    Auto,
    /// Only a jump: errors say why one cannot go there.
    Jump,
    /// An `int3` and a `SIGTRAP` handler (~µs per hit instead of ~ns, but any instruction
    /// boundary works).
    Trap,
}

/// What is known about the function around a probe address, for checking that no branch
/// lands inside the bytes a jump would overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuncBounds {
    /// Nothing: a jump could overwrite the target of a branch from anywhere, so
    /// [`PatchMode::Auto`] uses a trap (a [`PatchMode::Jump`] is checked as for `Entry`).
    Unknown,
    /// The address is a function's first instruction; only branches after it are checked,
    /// and the stub neither reads nor restores the flags there (`pt_regs.eflags` = 0x202).
    Entry,
    /// The function occupies `start..end` (from its ELF symbol): every branch in it is
    /// checked, and a probe in its middle refuses a jump if it has jump tables.
    Range { start: usize, end: usize },
}

/// A probe to install with [`install_probe`].
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Called when a thread reaches the address, with the registers there.
    pub entry: Option<HookHandler>,
    /// Called when the function entered at the address returns (a uretprobe), with the
    /// registers after `ret` (rax = return value, rsp = the caller's, rip = the return
    /// address). Only meaningful at a function's entry, where `[rsp]` is the return address.
    pub ret: Option<HookHandler>,
    /// Passed to both handlers.
    pub user: *mut c_void,
    /// The function around the address.
    pub func: FuncBounds,
    /// Jump, trap, or the best that works.
    pub mode: PatchMode,
}

/// How an installed hook gets control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// A jump to a stub.
    Jump,
    /// An `int3` and the `SIGTRAP` handler.
    Trap,
}

/// An installed hook. Removing it ([`Hook::remove`] or drop) restores the original bytes.
#[derive(Debug)]
#[must_use = "dropping a Hook removes it"]
pub struct Hook {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    target: usize,
    patch: Patch,
    /// The return site, when the probe has a return handler.
    ret_site: Option<u32>,
    /// The stub's `user` for a probe with a return handler (read by `entry_with_return`).
    ctx: Option<Box<ProbeCtx>>,
}

#[derive(Debug)]
enum Patch {
    Jump(JumpState),
    Trap { original: u8, index: usize },
}

#[derive(Debug)]
struct JumpState {
    /// The bytes the jump replaced, `len` of them.
    original: [u8; JMP_ABS_LEN],
    len: usize,
    patch_len: usize,
    trampoline: usize,
    /// The stub has the native fast path (no return handler).
    native: bool,
    block: CodeBlock,
}

/// Installs a hook at `target`: from now on every thread executing `target` first calls
/// `handler(&mut regs, user)`, then runs the original instructions. A jump only: the same as
/// [`install_probe`] with [`PatchMode::Jump`] and [`FuncBounds::Entry`].
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
/// - `target` must be a function's first instruction (flags are not restored there: no
///   calling convention passes values in them) in code that stays mapped while hooked, and
///   nothing else may modify that code while the hook exists (another inline hooker, a
///   debugger's breakpoints, or code that jumps into the first bytes of `target` from before
///   it — only branches after `target` can be checked). Elsewhere use [`install_probe`].
/// - `handler` must be sound to call on any thread that executes `target`, at that point, with
///   `user`; `user` must stay valid for it until the hook is removed.
/// - The process must not replace the `SIGTRAP` handler or the stop signal's handler while
///   hooks are being installed or removed.
pub unsafe fn install(
    target: usize,
    handler: HookHandler,
    user: *mut c_void,
) -> Result<Hook, AttachError> {
    let probe = Probe {
        entry: Some(handler),
        ret: None,
        user,
        func: FuncBounds::Entry,
        mode: PatchMode::Jump,
    };
    // SAFETY: the same contract.
    unsafe { install_probe(target, &probe) }
}

/// Installs `probe` at `target`. With [`PatchMode::Auto`], a jump is patched where one can go
/// safely and an `int3` trap is used otherwise (functions shorter than the jump, instructions
/// that are branch targets, the middle of a function with unknown branch targets, an address
/// whose function is unknown); the trap's `SIGTRAP` handler chains traps that are not ours to
/// the application's handler (see [`intercept_sigaction`](super::intercept_sigaction)).
///
/// A return handler makes the entry save the return address on the thread's shadow stack and
/// replace it by a return trampoline (see [`missed_returns`](super::missed_returns) for when
/// that is skipped).
///
/// # Safety
///
/// As for [`install`], for both handlers, except that `target` may be any instruction boundary
/// unless `func` is [`FuncBounds::Entry`]; with a return handler, `target` must be a function's
/// entry (`[rsp]` holds the return address there), and with [`FuncBounds::Range`] the range must
/// be the function's.
pub unsafe fn install_probe(target: usize, probe: &Probe) -> Result<Hook, AttachError> {
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
    let (handler, user, ret_site, ctx) = match (probe.entry, probe.ret) {
        (None, None) => return Err(AttachError::NoHandler { addr: target }),
        (Some(h), None) => (h, probe.user, None, None),
        (entry, Some(ret)) => {
            retprobe::init()?;
            let (site, generation) = retprobe::register_site(ret, probe.user)?;
            let ctx = Box::new(ProbeCtx {
                entry,
                user: probe.user as usize,
                site,
                generation,
            });
            let user = &*ctx as *const ProbeCtx as *mut c_void;
            (
                retprobe::entry_with_return as HookHandler,
                user,
                Some(site),
                Some(ctx),
            )
        }
    };
    // With a return probe: its site and generation, and whether there is no entry handler
    // (the stub then arms the return itself before building `pt_regs`, when it can).
    let ret = ctx
        .as_ref()
        .map(|c| (c.site, c.generation, c.entry.is_none()));
    let installed = read_self_maps().and_then(|maps| {
        let reg = &mut *reg;
        match probe.mode {
            PatchMode::Jump => install_jump(reg, &maps, target, handler, user, probe.func, ret),
            PatchMode::Trap => install_trap(reg, &maps, target, handler, user),
            PatchMode::Auto if probe.func == FuncBounds::Unknown => {
                install_trap(reg, &maps, target, handler, user)
            }
            PatchMode::Auto => {
                match install_jump(reg, &maps, target, handler, user, probe.func, ret) {
                    Err(
                        AttachError::TooShort { .. }
                        | AttachError::BranchIntoPatch { .. }
                        | AttachError::UnknownBranchTargets { .. }
                        | AttachError::Unrelocatable { .. }
                        | AttachError::Relocation { .. }
                        | AttachError::OverlapsHook { .. },
                    ) => install_trap(reg, &maps, target, handler, user),
                    other => other,
                }
            }
        }
    });
    match installed {
        Ok(patch) => Ok(Hook {
            state: Some(State {
                target,
                patch,
                ret_site,
                ctx,
            }),
        }),
        Err(e) => {
            if let Some(site) = ret_site {
                retprobe::unregister_site(site);
            }
            Err(e)
        }
    }
}

/// The jump: stub + trampoline near the target, then the patch.
fn install_jump(
    reg: &mut Vec<Range>,
    maps: &[MapEntry],
    target: usize,
    handler: HookHandler,
    user: *mut c_void,
    func: FuncBounds,
    ret: Option<(u32, u32, bool)>,
) -> Result<Patch, AttachError> {
    let with_return = ret.is_some();
    let code = code_mem::read_code(maps, target, SCAN_LEN + 2 * JMP_ABS_LEN)?;
    let (block, len) = match code_mem::alloc_near(target, maps)? {
        Some(block) => (block, JMP_REL32_LEN),
        None => (code_mem::alloc_anywhere()?, JMP_ABS_LEN),
    };
    let params = StubParams {
        hook_addr: target as u64,
        handler: handler as usize as u64,
        user: user as u64,
        inflight: block.inflight_addr() as u64,
        removed: block.removed_addr() as u64,
        at_entry: matches!(func, FuncBounds::Entry)
            || matches!(func, FuncBounds::Range { start, .. } if start == target),
        ret_trampolines: if with_return {
            retprobe::trampolines()
        } else {
            None
        },
        native: Some(NativeSlot {
            entry: block.native_addr() as u64,
            traps: block.native_traps_addr() as u64,
        }),
        arm_only: retprobe::arm_only as *const () as u64,
        fast_arm: ret
            .and_then(|(site, generation, _)| retprobe::layout().map(|l| (site, generation, l))),
        arm_prefix: ret.is_some_and(|(_, _, no_entry)| no_entry),
    };
    let built = prologue::analyze(target as u64, &code, len).and_then(|p| {
        if let FuncBounds::Range { start, end } = func
            && start <= target
            && target < end
        {
            let body = code_mem::read_code(maps, start, end - start)?;
            prologue::check_function(target as u64, p.patch_len, start as u64, &body)?;
        }
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

    let writable = patch::make_writable(maps, target, len)?;
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
    let state = JumpState {
        original,
        len,
        patch_len: prologue.patch_len,
        trampoline: enc.trampoline as usize,
        native: true,
        block,
    };
    if let Err(e) = restored {
        // The text page could not be made read-only again: take the hook out and report.
        if let Err((_, e2)) = remove_jump(reg, target, state) {
            unrecoverable(&e2);
        }
        return Err(e);
    }
    Ok(Patch::Jump(state))
}

/// The trap: an out-of-line copy of the instruction, the site in the trap table, the int3.
fn install_trap(
    reg: &mut Vec<Range>,
    maps: &[MapEntry],
    target: usize,
    handler: HookHandler,
    user: *mut c_void,
) -> Result<Patch, AttachError> {
    let code = code_mem::read_code(maps, target, SCAN_LEN)?;
    if code.first() == Some(&INT3) {
        return Err(AttachError::Unrelocatable {
            at: target,
            reason: "an int3 is already there",
        });
    }
    let one = prologue::analyze(target as u64, &code, 1).map_err(|e| match e {
        AttachError::TooShort { .. } => AttachError::Unrelocatable {
            at: target,
            reason: "the instruction cannot run out of line",
        },
        e => e,
    })?;
    let block = match code_mem::alloc_near(target, maps)? {
        Some(b) => b,
        None => code_mem::alloc_anywhere()?,
    };
    let built = stub::encode_out_of_line(block.code_addr() as u64, &one)
        .and_then(|c| block.write_code(&c))
        .and_then(|()| block.seal());
    if let Err(e) = built {
        block.free_unsealed();
        return Err(e);
    }
    // The block is sealed: never freed from here on.
    let index = trap::add(target, handler, user, block.code_addr())?;
    let writable = match patch::make_writable(maps, target, 1) {
        Ok(w) => w,
        Err(e) => {
            trap::remove(index);
            return Err(e);
        }
    };
    patch::store_byte(target, INT3);
    patch::sync_cores();
    if let Err(e) = writable.restore() {
        remove_trap(maps, target, code[0], index).unwrap_or_else(|e2| unrecoverable(&e2));
        return Err(e);
    }
    reg.push(Range {
        start: target,
        end: target + 1,
    });
    Ok(Patch::Trap {
        original: code[0],
        index,
    })
}

fn remove_trap(
    maps: &[MapEntry],
    target: usize,
    original: u8,
    index: usize,
) -> Result<(), AttachError> {
    let writable = patch::make_writable(maps, target, 1)?;
    patch::store_byte(target, original);
    patch::sync_cores();
    signals::remember_int3(target);
    let restored = writable.restore();
    trap::remove(index);
    restored
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

/// Restores the original bytes of a jump hook. On `Err`, the bool says whether the bytes
/// were restored (only the stop failed) or the hook is still in place.
fn remove_jump(
    reg: &mut Vec<Range>,
    target: usize,
    state: JumpState,
) -> Result<(), (bool, AttachError)> {
    let maps = read_self_maps().map_err(|e| (false, e))?;
    let writable = patch::make_writable(&maps, target, state.len).map_err(|e| (false, e))?;
    signals::arm_trap(target, state.block.code_addr());
    patch::write_instruction(target, &state.original[..state.len]);
    let restored = writable.restore();
    reg.retain(|r| r.start != target);
    // Threads that took the jump but are not yet counted see the flag once counted and go
    // back to the original code; the counted ones drain.
    state.block.mark_removed();
    signals::disarm_trap();
    while state.block.inflight() != 0 {
        std::thread::yield_now();
    }
    // `state.block` stays mapped (`CodeBlock` has no Drop): a thread may still be in the
    // stub's or the trampoline's last instructions.
    restored.map_err(|e| (true, e))
}

/// Removes the hook of `state`; on `Err`, whether the original bytes are back.
fn remove_locked(reg: &mut Vec<Range>, state: State) -> Result<(), (bool, AttachError)> {
    let State {
        target,
        patch,
        ret_site,
        ctx,
    } = state;
    let r = match patch {
        Patch::Jump(j) => remove_jump(reg, target, j),
        Patch::Trap { original, index } => {
            let maps = read_self_maps().map_err(|e| (false, e))?;
            let r = remove_trap(&maps, target, original, index).map_err(|e| (true, e));
            reg.retain(|r| r.start != target);
            r
        }
    };
    if let Err((false, _)) = r {
        // Still installed: its entry handler may run for ever.
        if let Some(ctx) = ctx {
            Box::leak(ctx);
        }
        return r;
    }
    if let Some(site) = ret_site {
        retprobe::unregister_site(site);
    }
    drop(ctx);
    r
}

fn unrecoverable(e: &AttachError) -> ! {
    eprintln!("bpftime-attach: cannot restore the original code of a hook: {e}");
    std::process::abort();
}

/// Makes the probed function return `rc` to its caller at once, from an entry handler
/// (`bpf_override_return`): rax = `rc`, and the thread continues at the return address with
/// the caller's rsp. If the probe also has a return handler, that runs first (the return
/// address is then its trampoline).
///
/// # Safety
/// `regs` must be the registers an entry handler got at a function's first instruction, so
/// `regs.rsp` points at the return address on the thread's stack.
pub unsafe fn override_return(regs: &mut PtRegs, rc: u64) {
    // SAFETY: the caller's contract: rsp points at the return address.
    let ret = unsafe { core::ptr::read_volatile(regs.rsp as *const u64) };
    regs.rax = rc;
    regs.rip = ret;
    regs.rsp = regs.rsp.wrapping_add(8);
}

impl Hook {
    /// The hooked address.
    pub fn target(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.target)
    }

    /// Jump or trap.
    pub fn kind(&self) -> HookKind {
        match self.state.as_ref().map(|s| &s.patch) {
            Some(Patch::Trap { .. }) => HookKind::Trap,
            _ => HookKind::Jump,
        }
    }

    /// Where the relocated original instructions start: calling this address runs the hooked
    /// function without the hook. 0 for a trap.
    pub fn trampoline(&self) -> usize {
        match self.state.as_ref().map(|s| &s.patch) {
            Some(Patch::Jump(j)) => j.trampoline,
            _ => 0,
        }
    }

    /// Bytes from [`Hook::target`] owned by the hook (the overwritten instructions).
    pub fn patched_len(&self) -> usize {
        match self.state.as_ref().map(|s| &s.patch) {
            Some(Patch::Jump(j)) => j.patch_len,
            Some(Patch::Trap { .. }) => 1,
            None => 0,
        }
    }

    /// Sets (`Some`) or clears (`None`) the hook's native fast path: from the store on (a
    /// release store), a thread that hits the hook, unless it is busy
    /// ([`NativeBusy`](super::NativeBusy), [`set_native_excluded_thread`]), calls `entry` with the registers instead of the
    /// handler, and calls the handler only if `entry` returns [`NATIVE_NOT_RUN`] (or an unknown
    /// status). With a return handler (at a function's entry) the stub arms the return itself
    /// after a native entry ran (the handler does both when it did not). Returns whether the
    /// hook has a native slot: `false` (and nothing changes) for a trap hook and for a return
    /// probe without an entry handler.
    ///
    /// # Safety
    ///
    /// - `entry` must follow the [`NativeEntry`] contract and be sound to call on any thread
    ///   that executes the hooked address, at that point.
    /// - `entry` (its code and everything it uses) must stay valid until the hook is removed
    ///   ([`Hook::remove`] returns or the hook is dropped), even after this hook was given
    ///   another value: a thread that read the old value may still be calling it. The hook
    ///   offers no way to tell when that thread has left, short of removal; keeping every entry
    ///   ever set alive until then is enough.
    pub unsafe fn set_native(&self, entry: Option<NativeEntry>) -> bool {
        // A return probe without an entry handler has no entry programs to run.
        let return_only = self
            .state
            .as_ref()
            .and_then(|s| s.ctx.as_ref())
            .is_some_and(|c| c.entry.is_none());
        match self.state.as_ref().map(|s| &s.patch) {
            Some(Patch::Jump(j)) if j.native && !return_only => {
                if entry.is_some() {
                    super::threads::native_used();
                }
                j.block.set_native(entry.map_or(0, |e| e as usize as u64));
                true
            }
            _ => false,
        }
    }

    /// Sets (`Some`) or clears (`None`) the native fast path of the hook's return probe: from
    /// the store on, a return through the hook's return trampoline on a thread that is not
    /// busy calls `entry` with the registers after the return (rip = the return
    /// address) instead of the return handler, and calls the handler only if `entry` returns
    /// [`NATIVE_NOT_RUN`] (or if the return was a tail call between probed functions, which
    /// the handler path resolves). Returns whether the hook has a return probe (`false`: nothing
    /// changes). Jump and trap hooks alike: returns go through the same trampolines. A
    /// trapped run ([`NATIVE_TRAPPED`]) is counted ([`Hook::native_traps`]).
    ///
    /// # Safety
    ///
    /// As for [`Hook::set_native`], at the return address of the probed function.
    pub unsafe fn set_native_return(&self, entry: Option<NativeEntry>) -> bool {
        match self.state.as_ref().and_then(|s| s.ret_site) {
            Some(site) => {
                if entry.is_some() {
                    super::threads::native_used();
                }
                // SAFETY: forwarded contract; the site stays registered until removal, which
                // clears the entry and waits for the returns running it.
                unsafe { retprobe::set_site_native(site, entry.map_or(0, |e| e as usize)) };
                true
            }
            None => false,
        }
    }

    /// How many times a native entry of this hook returned [`NATIVE_TRAPPED`]: the entry
    /// program's ([`Hook::set_native`]) and the return program's
    /// ([`Hook::set_native_return`]) runs together, since the hook was installed.
    pub fn native_traps(&self) -> u64 {
        let Some(state) = self.state.as_ref() else {
            return 0;
        };
        let entry = match &state.patch {
            Patch::Jump(j) if j.native => j.block.native_traps(),
            _ => 0,
        };
        entry + state.ret_site.map_or(0, retprobe::site_native_traps)
    }

    /// Removes the hook: restores the original bytes and returns once no thread runs (or will
    /// run) its handlers. Returns still pending through a return trampoline resume at the right
    /// address without the handler. Must not be called from the hook's own handlers (it would
    /// wait for itself).
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
