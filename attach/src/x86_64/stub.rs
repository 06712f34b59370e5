//! The code a hook jumps to: a stub that builds [`PtRegs`](crate::PtRegs) and calls the
//! handler, followed by the trampoline (the relocated prologue and a jump back).
//!
//! Pure: produces bytes for a given base address, so it is tested by decoding its output.
//!
//! Stack at the hook site, `S` = rsp there:
//!
//! ```text
//! S-128 .. S        red zone of the hooked code, left alone
//! S-136             ss        \
//! S-144             rsp        |
//! S-152             eflags     |  struct pt_regs (168 bytes), base = S-296
//! S-160             cs         |
//! S-168             rip        |
//! S-176             orig_rax   |
//! S-296 .. S-176    rdi … r15 /
//! below             xmm0–xmm15 (256 bytes, 16-aligned), then the handler's frame
//!                   (native path: nothing, the entry's frame right below pt_regs, 16-aligned)
//! ```
//!
//! Native fast path: once `pt_regs` is written, the stub loads the hook's native word (data
//! page, after the in-flight counter and the removed flag); if it is set and the thread's
//! record (found from `fs:[0]`, see `threads`) does not say it is busy, it calls that [`NativeEntry`](super::hook::NativeEntry) with `rdi` = `&pt_regs`, `esi` = 168
//! and rsp 16-aligned (`cld` first at a mid-function site), saving no xmm register: the
//! entry's contract is to touch none. Status `NATIVE_RAN` continues after the handler call
//! (the `rip` redirect check included), `NATIVE_TRAPPED` counts a trap in the data page and
//! does the same, anything else calls the handler as usual. The call sits between the
//! in-flight increment and decrement, so removal drains it like a handler call. With a return
//! handler, a run entry is followed by the return armed here ([`call_native_then_arm`]); a
//! return-only probe arms before building `pt_regs` at all ([`fast_arm_entry`]), and the
//! common return stub runs the return program's native entry ([`return_native`]).
//!
//! At a function's first instruction ([`StubParams::at_entry`]) `eflags` holds the constant
//! 0x202 instead of `pushfq`'s value and the flags are not restored (the redirect tail
//! excepted), and there is no `cld`; every GPR and xmm0–15 are still kept (GCC's `-fipa-ra`
//! keeps values in caller-saved registers across calls to local functions). With a return
//! probe, the stub enters the function through `call [rsp - 8]` just before the return
//! trampoline (`C(k)`, see `retprobe`), using `[S - 8]` for the jump target.
//!
//! Per-hit cost (`tests/overhead.rs`, AMD EPYC, 2026-11-26): an entry hit is ~7.6 ns, about
//! the throughput of its ~100 instructions. A `lock inc` alone costs ~2 ns in a loop, but in
//! the stub the two locked in-flight operations overlap with the register saving: the same
//! stub with plain (unsound) increments measured 9.3 ns, and a variant counting per CPU with
//! plain increments in restartable sequences (rseq, with a `membarrier` on removal) 10.1 ns,
//! so the locked counter stays. `pushfq`+`popfq` cost ~4.7 ns in a loop, `cld` ~0.8 ns.
//! The native word check adds a load and a taken branch to the handler path (7.7–8.2 ns per
//! entry hit on the same day, within the noise); the native path with an entry that only does a `lock inc` costs 5.3–5.7 ns
//! per hit, entry included: no xmm saving, no Rust handler.

use iced_x86::code_asm::{
    AsmRegister64, AsmRegisterXmm, CodeAssembler, CodeLabel, al, dword_ptr, eax, ebp, esi, ptr,
    qword_ptr, r8, r9, r10, r11, r12, r12d, r13, r14, r15, r15d, rax, rbp, rbx, rcx, rdi, rdx, rsi,
    rsp, xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
    xmm14, xmm15, xmmword_ptr,
};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, IcedError, Instruction, InstructionBlock,
    MemoryOperand, OpKind, Register,
};

use super::hook::{NATIVE_NOT_RUN, NATIVE_TRAPPED};
use super::prologue::Prologue;
use super::retprobe::{TRAMP_CALL_LEN, TRAMP_STRIDE};
use crate::AttachError;
use crate::regs::{USER_CS, USER_SS};

/// The System V red zone below rsp that leaf code may use without moving rsp.
const RED_ZONE: i32 = 128;
/// Size of `struct pt_regs`.
const PT_REGS: i32 = 168;
/// Where the stub's first `lea` puts rsp: below the red zone and the ss/rsp slots.
const FIRST_DROP: i32 = RED_ZONE + 16;

/// What the hook's stub passes to the handler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StubParams {
    /// The hooked address, reported as `rip`.
    pub hook_addr: u64,
    /// `extern "C" fn(&mut PtRegs, *mut c_void)`.
    pub handler: u64,
    /// Second argument of the handler.
    pub user: u64,
    /// Address of the hook's in-flight counter (8 bytes, writable, within ±2 GiB of the stub).
    pub inflight: u64,
    /// Address of the hook's removed flag (8 bytes, within ±2 GiB of the stub).
    pub removed: u64,
    /// The hook is at a function's first instruction. There the flags are dead (no calling
    /// convention passes values in them) and DF is clear (the ABI), so the stub neither reads
    /// nor restores them (`pushfq`/`popfq` and `cld` cost more than the rest of the register
    /// saving), and only the argument registers xmm0–7 are live. Elsewhere every flag and
    /// all of xmm0–15 are kept.
    pub at_entry: bool,
    /// For a hook at a function's entry with a return probe: `T(0)` and the number of return
    /// trampolines. When the entry handler armed the return (`[rsp]` = some `T(k)`), the stub
    /// enters the function through `C(k)`, the `call` just before `T(k)`, instead of jumping,
    /// so the return into `T(k)` is predicted (see `retprobe`).
    pub ret_trampolines: Option<(u64, u64)>,
    /// Where the stub looks for a native entry (see [`NativeSlot`]). With a return handler
    /// (at a function's entry), a native entry runs the entry program and the stub then arms
    /// the return itself ([`fast_arm`], else `arm_only` = `retprobe::arm_only`); the handler
    /// (which arms and runs the entry programs) only when the entry did not run.
    pub native: Option<NativeSlot>,
    /// `extern "C" fn(&mut PtRegs, *mut ProbeCtx)` arming a return without running the entry
    /// handler (used with `native` and a return handler).
    pub arm_only: u64,
    /// For a hook with a return handler: its return site and generation and the slots'
    /// layout, so that the stub can arm the return itself (see [`fast_arm`]).
    pub fast_arm: Option<(u32, u32, RetLayout)>,
    /// The return handler is the only one: the stub arms the return before building
    /// `pt_regs` ([`fast_arm_entry`]) and calls the handler (`entry_with_return`) only when
    /// that cannot be done inline.
    pub arm_prefix: bool,
}

/// Where the return probes' slots and sites are, for the fast paths the stubs generate
/// (`retprobe`'s layout; field offsets in bytes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetLayout {
    /// Slot 0 (32 bytes each).
    pub slots: u64,
    /// `T(0)`.
    pub first: u64,
    /// Slots (and trampolines).
    pub count: u64,
    pub slot_orig: i32,
    pub slot_sp: i32,
    pub slot_site: i32,
    pub slot_generation: i32,
    /// Site 0.
    pub sites: u64,
    pub site_count: u64,
    pub site_size: i32,
    pub site_native: i32,
    pub site_native_traps: i32,
    pub site_inflight: i32,
    pub site_generation: i32,
}

/// The words of a hook's native fast path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NativeSlot {
    /// Address of the hook's native entry word (the entry's address, 0 = none; 8 bytes, within
    /// ±2 GiB of the stub).
    pub entry: u64,
    /// Address of the hook's native trap counter (8 bytes, writable, within ±2 GiB).
    pub traps: u64,
}

/// Stub and trampoline, encoded for one base address.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub code: Vec<u8>,
    /// Address of the first relocated instruction.
    pub trampoline: u64,
    /// New address of each relocated instruction (same order as [`Prologue::insns`]).
    pub relocated: Vec<u64>,
}

fn iced(addr: u64) -> impl Fn(IcedError) -> AttachError {
    move |e| AttachError::Relocation {
        addr: addr as usize,
        message: e.to_string(),
    }
}

/// The relocated form of the prologue's instructions, each with the index of the prologue
/// instruction it comes from, followed by the jump back when the last one falls through.
///
/// A `call` is rewritten as "push the original return address, jump to the callee", so the
/// callee returns straight to the original code and unwinders (C++ exceptions, `backtrace`)
/// never see a return address inside our code.
fn relocated_insns(p: &Prologue) -> Result<Vec<(usize, Instruction)>, IcedError> {
    let mut out = Vec::with_capacity(p.insns.len() + 4);
    for (i, insn) in p.insns.iter().enumerate() {
        match insn.code() {
            Code::Call_rel32_64 | Code::Call_rm64 => {
                let ret = insn.next_ip();
                let mem = |d: i64| MemoryOperand::with_base_displ(Register::RSP, d);
                out.push((
                    i,
                    Instruction::with2(Code::Lea_r64_m, Register::RSP, mem(-8))?,
                ));
                out.push((
                    i,
                    Instruction::with2(Code::Mov_rm32_imm32, mem(0), ret as u32)?,
                ));
                out.push((
                    i,
                    Instruction::with2(Code::Mov_rm32_imm32, mem(4), (ret >> 32) as u32)?,
                ));
                let jmp = if insn.code() == Code::Call_rel32_64 {
                    Instruction::with_branch(Code::Jmp_rel32_64, insn.near_branch_target())?
                } else {
                    let mut j = *insn;
                    j.set_code(Code::Jmp_rm64);
                    // The operand is read after the push: an rsp-based one moved by 8.
                    if j.op0_kind() == OpKind::Memory && j.memory_base() == Register::RSP {
                        j.set_memory_displacement64(j.memory_displacement64().wrapping_add(8));
                    }
                    j
                };
                out.push((i, jmp));
            }
            _ => out.push((i, *insn)),
        }
    }
    if let Some(resume) = p.resume {
        out.push((
            p.insns.len(),
            Instruction::with_branch(Code::Jmp_rel32_64, resume)?,
        ));
    }
    Ok(out)
}

/// Runs iced's block encoder over `insns` at `base`; the new address of each instruction.
fn encode_block(
    addr: u64,
    base: u64,
    insns: &[Instruction],
) -> Result<(Vec<u8>, Vec<u64>), AttachError> {
    let block = InstructionBlock::new(insns, base);
    let out = BlockEncoder::encode(
        64,
        block,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(iced(addr))?;
    let offsets = out
        .new_instruction_offsets
        .iter()
        .map(|&off| {
            if off == u32::MAX {
                u64::MAX
            } else {
                base + u64::from(off)
            }
        })
        .collect();
    Ok((out.code_buffer, offsets))
}

/// Where each prologue instruction starts after relocation: the first encoded instruction
/// that came from it.
fn prologue_addrs(
    p: &Prologue,
    origin: &[usize],
    at: &[u64],
    skip: usize,
) -> Result<Vec<u64>, AttachError> {
    (0..p.insns.len())
        .map(|i| {
            origin
                .iter()
                .position(|&o| o == i)
                .map(|k| at[skip + k])
                .filter(|&a| a != u64::MAX)
                .ok_or_else(|| AttachError::Relocation {
                    addr: p.addr as usize,
                    message: format!("instruction {i} was rewritten, its new address is unknown"),
                })
        })
        .collect()
}

/// Encodes stub + trampoline (+ the redirect tail) to run at `base`.
pub(crate) fn encode(
    base: u64,
    params: &StubParams,
    prologue: &Prologue,
) -> Result<Encoded, AttachError> {
    let err = iced(prologue.addr);
    let (stub, redirect) = stub_instructions(params).map_err(&err)?;
    let reloc = relocated_insns(prologue).map_err(&err)?;
    let origin: Vec<usize> = reloc.iter().map(|(i, _)| *i).collect();
    let mut insns = stub.clone();
    insns.extend(reloc.iter().map(|(_, insn)| *insn));
    insns.extend(redirect);
    let (code, at) = encode_block(prologue.addr, base, &insns)?;
    let relocated = prologue_addrs(prologue, &origin, &at, stub.len())?;
    Ok(Encoded {
        code,
        trampoline: relocated[0],
        relocated,
    })
}

/// Encodes the out-of-line copy of a trap site's instruction (`prologue` holds that one
/// instruction) to run at `base`: the relocated instruction, then a jump back after it.
/// Returns the code; execution starts at `base`.
pub(crate) fn encode_out_of_line(base: u64, prologue: &Prologue) -> Result<Vec<u8>, AttachError> {
    let reloc = relocated_insns(prologue).map_err(iced(prologue.addr))?;
    let insns: Vec<Instruction> = reloc.into_iter().map(|(_, i)| i).collect();
    Ok(encode_block(prologue.addr, base, &insns)?.0)
}

/// `lock inc/dec qword ptr [rip + …]` on the absolute address `counter`.
fn locked_rip_rel(code: Code, counter: u64) -> Result<Instruction, IcedError> {
    let mut insn = Instruction::with1(
        code,
        MemoryOperand::with_base_displ(Register::RIP, counter as i64),
    )?;
    insn.set_has_lock_prefix(true);
    Ok(insn)
}

/// The registers pushed after `orig_rax`, in push order (rdi ends up at `pt_regs + 112`).
const SAVED: [AsmRegister64; 15] = [
    rdi, rsi, rdx, rcx, rax, r8, r9, r10, r11, rbx, rbp, r12, r13, r14, r15,
];
/// Every xmm register: what a mid-function site must keep.
const XMMS: [AsmRegisterXmm; 16] = [
    xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14,
    xmm15,
];
/// What a function-entry stub stores as `pt_regs.eflags` instead of reading the flags: IF and
/// the always-set bit 1, as `pushfq` reads in user space with the arithmetic flags clear (they
/// are dead at a function's entry, and the ABI requires DF clear there).
const ENTRY_EFLAGS: i32 = 0x202;

/// With rsp = `&pt_regs` (kept in rbx): saves xmm0–15 below, calls `handler(rdi = pt_regs,
/// rsi)` with rsi loaded by `load_rsi`, restores xmm0–15 and rsp. Leaves the handler's result
/// in rax. `cld` first unless the direction flag is known to be clear (the ABI requires it
/// clear at every call and return; only a mid-function site may see it set).
///
/// All sixteen, even where the ABI makes xmm8–15 (at a function's entry) or xmm2–15 (after
/// its return) dead: GCC's `-fipa-ra` (on at `-O2`) lets a caller keep values in caller-saved
/// registers across a call to a local function that does not use them, and a handler may use
/// any of them. Keeping 8 instead of 16 at an entry measured ~0.3 ns.
fn call_with_xmm_saved(
    a: &mut CodeAssembler,
    handler: u64,
    cld: bool,
    load_rsi: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    a.mov(rbx, rsp)?;
    a.and(rsp, -16)?;
    a.sub(rsp, 16 * XMMS.len() as i32)?;
    for (i, x) in XMMS.iter().enumerate() {
        a.movaps(xmmword_ptr(rsp + 16 * i as i32), *x)?;
    }
    if cld {
        a.cld()?;
    }
    a.mov(rdi, rbx)?;
    load_rsi(a)?;
    a.mov(rax, handler)?;
    a.call(rax)?;
    for (i, x) in XMMS.iter().enumerate() {
        a.movaps(*x, xmmword_ptr(rsp + 16 * i as i32))?;
    }
    a.mov(rsp, rbx)?;
    Ok(())
}

/// With rsp = `&pt_regs`: if the hook's native entry word is set and the thread is not busy
/// (`threads::NativeBusy`: the agent's threads, or one running programs in a handler), calls the entry (`rdi` = `&pt_regs`, `esi` = 168, rsp 16-aligned, DF clear:
/// `cld` first at a mid-function site) without saving any xmm register (the entry's contract
/// is not to touch them). Its status (rdx): `NATIVE_RAN` jumps to the returned label (set by
/// the caller after the handler call), `NATIVE_TRAPPED` counts a trap and jumps there too;
/// anything else, an unset word and a busy thread fall through to the handler call that
/// follows. rax, rcx, rdx, rsi, rdi, r8–r11 and the flags may be clobbered: every register is
/// restored from `pt_regs` (the flags of a mid-function site from the `pushfq` slot).
fn call_native(
    a: &mut CodeAssembler,
    p: &StubParams,
    n: &NativeSlot,
) -> Result<CodeLabel, IcedError> {
    let mut handler = a.create_label();
    let after = a.create_label();
    emit_native_call(a, p, n, handler, after)?;
    a.jmp(after)?;
    a.set_label(&mut handler)?;
    Ok(after)
}

/// The call itself, with rsp = `&pt_regs`: to `handler` without a native entry, on a busy
/// thread (running programs on the host's side, or the agent's: the handler skips the hit)
/// and for an entry that did not run; to `ran` when it ran, falling through after counting a
/// trap.
fn emit_native_call(
    a: &mut CodeAssembler,
    p: &StubParams,
    n: &NativeSlot,
    handler: CodeLabel,
    ran: CodeLabel,
) -> Result<(), IcedError> {
    a.add_instruction(Instruction::with2(
        Code::Mov_r64_rm64,
        Register::RAX,
        MemoryOperand::with_base_displ(Register::RIP, n.entry as i64),
    )?)?;
    a.test(rax, rax)?;
    a.jz(handler)?;
    super::threads::emit_busy_check(a, rcx, rdx, rsi, handler)?;
    a.mov(rbx, rsp)?;
    a.and(rsp, -16)?;
    if !p.at_entry {
        a.cld()?;
    }
    a.mov(rdi, rbx)?;
    a.mov(esi, PT_REGS)?;
    a.call(rax)?;
    a.mov(rsp, rbx)?;
    a.test(rdx, rdx)?; // NATIVE_RAN
    a.jz(ran)?;
    a.cmp(rdx, NATIVE_TRAPPED as i32)?;
    a.jne(handler)?;
    a.add_instruction(locked_rip_rel(Code::Inc_rm64, n.traps)?)?;
    Ok(())
}

/// At a function's entry with r9 = `S` (where the return address is): arms the return as
/// `retprobe::arm` does, for a thread whose record (`threads`) has a slot chunk with a free
/// slot, when the return address is not a trampoline already (a tail call between probed
/// functions), and continues with rax = `T(k)`; otherwise jumps to `slow` (the handler,
/// `entry_with_return`, which also takes a chunk, prunes the slots of frames that are gone and
/// handles the tail call). The stores are in the order `arm_on` makes them (the slot's `sp`
/// reserved first, then the mask bit, the slot, its `sp`, the return address), so a signal
/// handler probing on this thread in between sees what it would see there. Clobbers rax, rcx,
/// rdx, rdi, r8, r10, r11 and the flags.
fn fast_arm(
    a: &mut CodeAssembler,
    site: u32,
    generation: u32,
    l: &RetLayout,
    slow: CodeLabel,
) -> Result<(), IcedError> {
    use super::threads::{REC_CHUNK, REC_MASK, emit_lookup};
    emit_lookup(a, rcx, rax, rdx, slow)?;
    a.mov(rdx, qword_ptr(rcx + REC_CHUNK))?;
    a.test(rdx, rdx)?;
    a.jz(slow)?;
    a.mov(r8, qword_ptr(r9))?;
    a.mov(rax, r8)?;
    a.mov(rdi, l.first)?;
    a.sub(rax, rdi)?;
    a.cmp(rax, (l.count * TRAMP_STRIDE as u64) as i32)?;
    a.jb(slow)?;
    a.mov(r10, qword_ptr(rcx + REC_MASK))?;
    a.mov(r11, r10)?;
    a.not(r11)?;
    a.test(r11, r11)?;
    a.jz(slow)?;
    a.bsf(r11, r11)?; // j: the lowest free slot of the chunk
    a.dec(rdx)?;
    a.shl(rdx, 6)?;
    a.add(rdx, r11)?; // k = chunk * 64 + j
    a.mov(rax, rdx)?;
    a.shl(rax, 5)?;
    a.mov(rdi, l.slots)?;
    a.add(rax, rdi)?; // &slot[k]
    a.mov(qword_ptr(rax + l.slot_sp), -1)?;
    a.bts(r10, r11)?;
    a.mov(qword_ptr(rcx + REC_MASK), r10)?;
    a.mov(qword_ptr(rax + l.slot_orig), r8)?;
    a.mov(dword_ptr(rax + l.slot_site), site)?;
    a.mov(dword_ptr(rax + l.slot_generation), generation)?;
    a.mov(qword_ptr(rax + l.slot_sp), r9)?;
    a.shl(rdx, 4)?;
    a.mov(rax, l.first)?;
    a.add(rax, rdx)?;
    a.mov(qword_ptr(r9), rax)?; // [S] = T(k)
    Ok(())
}

/// The return-only probe's way in: at the function's entry, before any `pt_regs` is built,
/// arms the return ([`fast_arm`]) with only the registers it uses saved, and enters the
/// function through `C(k)` as [`enter_through_return_call`] does. No in-flight count: no
/// handler runs here and nothing this path reads is freed on removal (a return armed with a
/// site's old generation runs no handler). On a removed hook or when the return cannot be
/// armed inline, restores those registers and falls through to the full stub.
fn fast_arm_entry(
    a: &mut CodeAssembler,
    p: &StubParams,
    site: u32,
    generation: u32,
    l: &RetLayout,
) -> Result<(), IcedError> {
    const SCRATCH: [AsmRegister64; 8] = [rax, rcx, rdx, rdi, r8, r9, r10, r11];
    let mut full = a.create_label();
    let mut enter = a.create_label();
    a.lea(rsp, ptr(rsp - FIRST_DROP))?;
    for r in SCRATCH {
        a.push(r)?;
    }
    a.add_instruction(Instruction::with2(
        Code::Cmp_rm8_imm8,
        MemoryOperand::with_base_displ(Register::RIP, p.removed as i64),
        0u32,
    )?)?;
    a.jne(full)?;
    let s = FIRST_DROP + 8 * SCRATCH.len() as i32; // S, from rsp
    a.lea(r9, ptr(rsp + s))?;
    fast_arm(a, site, generation, l, full)?;
    // [S - 8] = C(k), [S] = `enter`; C(k) = `call [rsp - 8]` run with rsp = S + 8 calls
    // `enter` and leaves [S] = T(k).
    a.lea(rcx, ptr(rax - TRAMP_CALL_LEN as i32))?;
    a.mov(qword_ptr(r9 - 8), rcx)?;
    a.lea(rcx, ptr(enter))?;
    a.mov(qword_ptr(r9), rcx)?;
    for r in SCRATCH.iter().rev() {
        a.pop(*r)?;
    }
    a.lea(rsp, ptr(rsp + FIRST_DROP + 8))?; // rsp = S + 8
    a.jmp(qword_ptr(rsp - 16))?;
    a.set_label(&mut enter)?;
    a.add_instruction(Instruction::with_branch(Code::Jmp_rel32_64, p.hook_addr)?)?;
    a.set_label(&mut full)?;
    for r in SCRATCH.iter().rev() {
        a.pop(*r)?;
    }
    a.lea(rsp, ptr(rsp + FIRST_DROP))?;
    Ok(())
}

/// [`call_native`] for a hook with a return handler, at a function's entry: when the entry
/// ran (or trapped), arms the return as the handler would have — inline ([`fast_arm`]) or,
/// when that cannot be done, through `p.arm_only` with the xmm registers saved — and jumps to
/// the returned label (after the handler call, where the function is entered through its
/// return trampoline's `call`). Anything else falls through to the handler, which arms and
/// runs the entry programs itself.
fn call_native_then_arm(
    a: &mut CodeAssembler,
    p: &StubParams,
    n: &NativeSlot,
    site: u32,
    generation: u32,
    l: &RetLayout,
) -> Result<CodeLabel, IcedError> {
    let mut handler = a.create_label();
    let mut arm = a.create_label();
    let mut slow_arm = a.create_label();
    let after = a.create_label();
    emit_native_call(a, p, n, handler, arm)?;
    a.set_label(&mut arm)?;
    // S from the stub's own frame, not `pt_regs.rsp` (which the program could have written).
    a.lea(r9, ptr(rsp + (PT_REGS + RED_ZONE)))?;
    fast_arm(a, site, generation, l, slow_arm)?;
    a.jmp(after)?;
    a.set_label(&mut slow_arm)?;
    call_with_xmm_saved(a, p.arm_only, false, |a| a.mov(rsi, p.user))?;
    a.jmp(after)?;
    a.set_label(&mut handler)?;
    Ok(after)
}

/// At a function's entry with rsp = `&pt_regs` after the handler: if the return address
/// `[S]` is a return trampoline `T(k)` (the entry handler armed the return), restores every
/// register and enters the function by jumping to `C(k)` = `call [rsp - 8]` with rsp = `S + 8`
/// and `[S]` = a jump to the relocated prologue: the stack is then exactly as on the plain
/// path (`[S]` = `T(k)`), and the CPU's return stack predicts the function's `ret`. Otherwise
/// falls through to the plain exit. Uses only the dead stack below `S` (`[S - 8]` holds
/// `C(k)`; a signal frame goes below the 128-byte red zone) and rax/rcx before they are
/// restored; the flags are dead at a function's entry.
fn enter_through_return_call(
    a: &mut CodeAssembler,
    p: &StubParams,
    first: u64,
    count: u64,
) -> Result<(), IcedError> {
    let mut plain = a.create_label();
    let mut enter = a.create_label();
    let ret_slot = PT_REGS + RED_ZONE; // [S], from rsp = &pt_regs
    a.mov(rax, qword_ptr(rsp + ret_slot))?;
    a.mov(rcx, first)?;
    a.sub(rax, rcx)?;
    a.cmp(rax, (count * TRAMP_STRIDE as u64) as i32)?;
    a.jae(plain)?;
    a.test(al, (TRAMP_STRIDE - 1) as i32)?;
    a.jne(plain)?;
    a.lea(rax, ptr(rax + rcx - TRAMP_CALL_LEN as i32))?;
    a.mov(qword_ptr(rsp + (ret_slot - 8)), rax)?;
    a.lea(rax, ptr(enter))?;
    a.mov(qword_ptr(rsp + ret_slot), rax)?;
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.lea(rsp, ptr(rsp + 24))?; // orig_rax, rip, cs
    a.add_instruction(locked_rip_rel(Code::Dec_rm64, p.inflight)?)?;
    a.lea(rsp, ptr(rsp + FIRST_DROP + 16))?; // eflags, [S]: rsp = S + 8
    a.jmp(qword_ptr(rsp - 16))?;
    // What C(k) calls: the relocated prologue (the encoder sends a branch to the hooked
    // address there).
    a.set_label(&mut enter)?;
    a.add_instruction(Instruction::with_branch(Code::Jmp_rel32_64, p.hook_addr)?)?;
    a.set_label(&mut plain)?;
    Ok(())
}

/// The entry stub (ending where the trampoline starts) and its tails: the redirect, taken
/// when the handler changed `rip` (it resumes at `pt_regs.rip` with rsp = `pt_regs.rsp`), and
/// the bail-out of a thread that entered a hook being removed (back to the original code).
fn stub_instructions(p: &StubParams) -> Result<(Vec<Instruction>, Vec<Instruction>), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut redirect = a.create_label();
    let mut bail = a.create_label();
    if let Some((site, generation, l)) = p.fast_arm.filter(|_| p.at_entry && p.arm_prefix) {
        fast_arm_entry(&mut a, p, site, generation, &l)?;
    }
    a.lea(rsp, ptr(rsp - FIRST_DROP))?;
    if p.at_entry {
        a.push(ENTRY_EFLAGS)?;
    } else {
        a.pushfq()?;
    }
    a.add_instruction(locked_rip_rel(Code::Inc_rm64, p.inflight)?)?;
    // Counted first, then the flag: a remover that sets the flag and then sees no thread in
    // flight knows every later entrant will see the flag (both are sequentially consistent).
    a.add_instruction(Instruction::with2(
        Code::Cmp_rm8_imm8,
        MemoryOperand::with_base_displ(Register::RIP, p.removed as i64),
        0u32,
    )?)?;
    a.jne(bail)?;
    a.push(USER_CS as i32)?;
    a.lea(rsp, ptr(rsp - 16))?; // rip, orig_rax
    for r in SAVED {
        a.push(r)?;
    }
    // rsp = &pt_regs
    a.mov(rax, p.hook_addr)?;
    a.mov(qword_ptr(rsp + 128), rax)?;
    a.mov(qword_ptr(rsp + 120), -1)?;
    a.lea(rax, ptr(rsp + (PT_REGS + RED_ZONE)))?;
    a.mov(qword_ptr(rsp + 152), rax)?;
    a.mov(qword_ptr(rsp + 160), USER_SS as i32)?;
    let after = match (p.native, p.fast_arm, p.ret_trampolines) {
        // Entry and return programs: native entry, then the return armed here.
        (Some(n), Some((site, generation, l)), Some(_)) if p.at_entry => {
            Some(call_native_then_arm(&mut a, p, &n, site, generation, &l)?)
        }
        (Some(n), _, None) => Some(call_native(&mut a, p, &n)?),
        _ => None,
    };
    call_with_xmm_saved(&mut a, p.handler, !p.at_entry, |a| a.mov(rsi, p.user))?;
    if let Some(mut after) = after {
        a.set_label(&mut after)?;
    }
    // Did the handler (or the native entry) move rip (e.g. bpf_override_return)? rax and the flags are restored
    // from pt_regs below.
    a.mov(rax, p.hook_addr)?;
    a.cmp(qword_ptr(rsp + 128), rax)?;
    a.jne(redirect)?;
    if let Some((first, count)) = p.ret_trampolines.filter(|_| p.at_entry) {
        enter_through_return_call(&mut a, p, first, count)?;
    }
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.lea(rsp, ptr(rsp + 24))?; // orig_rax, rip, cs
    a.add_instruction(locked_rip_rel(Code::Dec_rm64, p.inflight)?)?;
    if p.at_entry {
        a.lea(rsp, ptr(rsp + FIRST_DROP + 8))?;
    } else {
        a.popfq()?;
        a.lea(rsp, ptr(rsp + FIRST_DROP))?;
    }
    let stub_len = a.instructions().len();
    // Redirect: store the new rip just below the new rsp, point the saved rsp at it, restore
    // everything (the flags too: the handler may send the thread where they are live), switch
    // stacks and `ret` into it.
    a.set_label(&mut redirect)?;
    a.mov(rax, qword_ptr(rsp + 152))?;
    a.mov(rcx, qword_ptr(rsp + 128))?;
    a.mov(qword_ptr(rax - 8), rcx)?;
    a.lea(rax, ptr(rax - 8))?;
    a.mov(qword_ptr(rsp + 152), rax)?;
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.lea(rsp, ptr(rsp + 24))?;
    a.add_instruction(locked_rip_rel(Code::Dec_rm64, p.inflight)?)?;
    a.popfq()?;
    a.mov(rsp, qword_ptr(rsp))?;
    a.ret()?;
    // Bail out: the hook is gone; run the original instructions (the encoder sends this jump
    // to their relocated copy, which is the same thing).
    a.set_label(&mut bail)?;
    a.add_instruction(locked_rip_rel(Code::Dec_rm64, p.inflight)?)?;
    if p.at_entry {
        a.lea(rsp, ptr(rsp + FIRST_DROP + 8))?;
    } else {
        a.popfq()?;
        a.lea(rsp, ptr(rsp + FIRST_DROP))?;
    }
    a.add_instruction(Instruction::with_branch(Code::Jmp_rel32_64, p.hook_addr)?)?;
    let mut all = a.take_instructions();
    let redirect = all.split_off(stub_len);
    Ok((all, redirect))
}

/// In the common return stub with rsp = `&pt_regs` and the slot number `k` at `[rsp + 168]`:
/// when slot `k`'s site has a native entry, its generation is the slot's, the return address
/// is not another trampoline (tail calls take `dispatch`) and the thread is not the excluded
/// one, runs the entry as `dispatch` runs the handler — site in flight, `pt_regs.rip` = the
/// return address — clears the slot's bit in the thread's mask and jumps to the returned label
/// with rax = the return address. Otherwise (or when the entry did not run) falls through to
/// the `dispatch` call. Clobbers every GPR but rsp (restored from `pt_regs` after) and the
/// flags.
fn return_native(a: &mut CodeAssembler, l: &RetLayout) -> Result<CodeLabel, IcedError> {
    use super::threads::{REC_BUSY, REC_CHUNK, REC_MASK, emit_lookup};
    let mut slow = a.create_label();
    let mut undo = a.create_label();
    let mut cleared = a.create_label();
    let after = a.create_label();
    a.mov(r13, qword_ptr(rsp + PT_REGS))?; // k
    a.cmp(r13, l.count as i32)?;
    a.jae(slow)?;
    a.mov(rax, r13)?;
    a.shl(rax, 5)?;
    a.mov(rdi, l.slots)?;
    a.add(rax, rdi)?; // &slot[k]
    a.mov(r14, qword_ptr(rax + l.slot_orig))?;
    a.mov(rcx, r14)?;
    a.mov(rdi, l.first)?;
    a.sub(rcx, rdi)?;
    a.cmp(rcx, (l.count * TRAMP_STRIDE as u64) as i32)?;
    a.jb(slow)?;
    a.mov(r12d, dword_ptr(rax + l.slot_site))?;
    a.cmp(r12, l.site_count as i32)?;
    a.jae(slow)?;
    a.mov(r15d, dword_ptr(rax + l.slot_generation))?;
    a.imul_3(r12, r12, l.site_size)?;
    a.mov(rdi, l.sites)?;
    a.add(r12, rdi)?; // &SITES[site]
    a.cmp(qword_ptr(r12 + l.site_native), 0)?;
    a.je(slow)?;
    // The thread's record (rbp, 0 without one: no slot of its to free then), and a busy
    // thread takes `dispatch`, whose handler skips the hit.
    let mut no_rec = a.create_label();
    let mut have = a.create_label();
    emit_lookup(a, rbp, rcx, rdx, no_rec)?;
    a.cmp(qword_ptr(rbp + REC_BUSY), 0)?;
    a.jne(slow)?;
    a.jmp(have)?;
    a.set_label(&mut no_rec)?;
    a.xor(ebp, ebp)?;
    a.set_label(&mut have)?;
    // In flight first, then the generation (as `dispatch`; `unregister_site` bumps the
    // generation, then waits for the count).
    let mut inc = Instruction::with1(
        Code::Inc_rm64,
        MemoryOperand::with_base_displ(Register::R12, i64::from(l.site_inflight)),
    )?;
    inc.set_has_lock_prefix(true);
    a.add_instruction(inc)?;
    a.cmp(dword_ptr(r12 + l.site_generation), r15d)?;
    a.jne(undo)?;
    a.mov(rax, qword_ptr(r12 + l.site_native))?;
    a.test(rax, rax)?;
    a.jz(undo)?;
    a.mov(qword_ptr(rsp + 128), r14)?; // rip = the return address
    a.mov(rbx, rsp)?;
    a.and(rsp, -16)?;
    a.mov(rdi, rbx)?;
    a.mov(esi, PT_REGS)?;
    a.call(rax)?;
    a.mov(rsp, rbx)?;
    a.cmp(rdx, NATIVE_NOT_RUN as i32)?;
    a.je(undo)?;
    let mut counted = a.create_label();
    a.cmp(rdx, NATIVE_TRAPPED as i32)?;
    a.jne(counted)?;
    let mut count = Instruction::with1(
        Code::Inc_rm64,
        MemoryOperand::with_base_displ(Register::R12, i64::from(l.site_native_traps)),
    )?;
    count.set_has_lock_prefix(true);
    a.add_instruction(count)?;
    a.set_label(&mut counted)?;
    let mut dec = Instruction::with1(
        Code::Dec_rm64,
        MemoryOperand::with_base_displ(Register::R12, i64::from(l.site_inflight)),
    )?;
    dec.set_has_lock_prefix(true);
    a.add_instruction(dec)?;
    // The slot is free again (the thread armed it: it owns the chunk).
    a.test(rbp, rbp)?;
    a.jz(cleared)?;
    a.mov(rax, r13)?;
    a.shr(rax, 6)?;
    a.inc(rax)?;
    a.cmp(qword_ptr(rbp + REC_CHUNK), rax)?;
    a.jne(cleared)?;
    a.mov(rax, r13)?;
    a.and(eax, 63)?;
    a.mov(rdx, qword_ptr(rbp + REC_MASK))?;
    a.btr(rdx, rax)?;
    a.mov(qword_ptr(rbp + REC_MASK), rdx)?;
    a.set_label(&mut cleared)?;
    a.mov(rax, r14)?;
    a.jmp(after)?;
    a.set_label(&mut undo)?;
    a.add_instruction(dec)?;
    a.set_label(&mut slow)?;
    Ok(after)
}

/// The common return stub of uretprobes, at `base`. Entered from a return trampoline that
/// pushed its slot number, so rsp = `S` (where the probed function's return address was) and
/// `[S]` = slot. Builds `pt_regs` (rsp = `S + 8`, the caller's rsp after the return), calls
/// `dispatch(&mut pt_regs, slot) -> original return address`, writes that address to `[S]`,
/// restores every register (with the handler's changes) and returns through it.
///
/// When the slot's site has a native entry (`RetSite::native`), the stub calls it instead,
/// without saving any xmm register: see [`return_native`].
pub(crate) fn encode_return_stub(
    base: u64,
    dispatch: u64,
    l: &RetLayout,
) -> Result<Vec<u8>, AttachError> {
    let err = iced(base);
    let build = || -> Result<Vec<Instruction>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        a.lea(rsp, ptr(rsp - 16))?; // ss, rsp
        // Flags are dead after a `ret`, and DF is clear (the ABI).
        a.push(ENTRY_EFLAGS)?;
        a.push(USER_CS as i32)?;
        a.lea(rsp, ptr(rsp - 16))?; // rip, orig_rax
        for r in SAVED {
            a.push(r)?;
        }
        a.mov(qword_ptr(rsp + 120), -1)?;
        a.mov(qword_ptr(rsp + 128), 0)?;
        a.lea(rax, ptr(rsp + (PT_REGS + 8)))?;
        a.mov(qword_ptr(rsp + 152), rax)?;
        a.mov(qword_ptr(rsp + 160), USER_SS as i32)?;
        let mut after = return_native(&mut a, l)?;
        call_with_xmm_saved(&mut a, dispatch, false, |a| {
            a.mov(rsi, qword_ptr(rbx + PT_REGS))
        })?;
        a.set_label(&mut after)?;
        a.mov(qword_ptr(rsp + PT_REGS), rax)?;
        for r in SAVED.iter().rev() {
            a.pop(*r)?;
        }
        // eflags too: after a `ret`, no calling convention leaves values in the flags.
        a.lea(rsp, ptr(rsp + 24 + 8 + 16))?; // orig_rax, rip, cs, eflags, rsp, ss
        a.ret()?;
        Ok(a.take_instructions())
    };
    let insns = build().map_err(&err)?;
    Ok(encode_block(base, base, &insns)?.0)
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    use super::*;
    use crate::x86_64::prologue::{JMP_REL32_LEN, analyze};

    const TARGET: u64 = 0x5555_0000_1000;
    const BASE: u64 = 0x5555_0100_0000;

    fn params() -> StubParams {
        StubParams {
            hook_addr: TARGET,
            handler: 0x7777_0000_0010,
            user: 0x1234,
            inflight: BASE + 4096,
            removed: BASE + 4096 + 8,
            at_entry: false,
            ret_trampolines: None,
            native: None,
            arm_only: 0,
            fast_arm: None,
            arm_prefix: false,
        }
    }

    #[test]
    fn stub_saves_pt_regs_and_trampoline_relocates_rip_relative_mov() {
        // mov rax, [rip+0x100]; add rax, rdi; ret
        let bytes = [
            0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0x48, 0x01, 0xf8, 0xc3,
        ];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        let enc = encode(BASE, &params(), &p).unwrap();
        let insns: Vec<_> = Decoder::with_ip(64, &enc.code, BASE, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert!(insns.iter().all(|i| !i.is_invalid()));
        let m: Vec<Mnemonic> = insns.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            &m[..5],
            &[
                Mnemonic::Lea,
                Mnemonic::Pushfq,
                Mnemonic::Inc,
                Mnemonic::Cmp,
                Mnemonic::Jne
            ]
        );
        assert!(insns[2].has_lock_prefix());
        assert_eq!(insns[2].ip_rel_memory_address(), BASE + 4096);
        assert_eq!(insns[3].ip_rel_memory_address(), BASE + 4096 + 8);
        // The bail-out: uncount, restore flags and rsp, back to the hooked address.
        let bail = insns
            .iter()
            .position(|i| i.ip() == insns[4].near_branch_target())
            .unwrap();
        assert_eq!(
            &m[bail..bail + 4],
            &[Mnemonic::Dec, Mnemonic::Popfq, Mnemonic::Lea, Mnemonic::Jmp]
        );
        // (To the relocated copy of the original instructions: the block encoder resolves a
        // branch to the hooked address to the instruction that came from there.)
        assert_eq!(insns[bail + 3].near_branch_target(), enc.trampoline);
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Push).count(), 16);
        // 15 pops on the way out, 15 more in the redirect tail.
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Pop).count(), 30);
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Popfq).count(), 3);
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Movaps).count(), 32);
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Cld).count(), 1);
        // The trampoline: the mov reads the same absolute address, then jumps back.
        let t = insns.iter().position(|i| i.ip() == enc.trampoline).unwrap();
        assert_eq!(insns[t].mnemonic(), Mnemonic::Mov);
        assert_eq!(insns[t].ip_rel_memory_address(), TARGET + 7 + 0x100);
        assert_eq!(insns[t + 1].mnemonic(), Mnemonic::Jmp);
        assert_eq!(insns[t + 1].near_branch_target(), TARGET + 7);
        assert_eq!(enc.relocated, vec![enc.trampoline]);
        // The in-flight decrement comes after the handler call and before popfq.
        let dec = insns
            .iter()
            .position(|i| i.mnemonic() == Mnemonic::Dec)
            .unwrap();
        assert!(insns[dec].has_lock_prefix());
        assert_eq!(m[dec + 1], Mnemonic::Popfq);
        assert!(m[..dec].contains(&Mnemonic::Call));
        // After the call: compare rip with the hooked address, branch to the redirect tail
        // (after the trampoline), which ends by switching stacks and returning into new rip.
        let jne = insns
            .iter()
            .position(|i| i.mnemonic() == Mnemonic::Jne)
            .unwrap();
        assert_eq!(m[jne - 1], Mnemonic::Cmp);
        assert!(jne < dec && insns[jne].near_branch_target() > enc.trampoline);
        assert_eq!(m[bail - 1], Mnemonic::Ret);
        assert_eq!(m[bail - 2], Mnemonic::Mov);
        assert_eq!(m[bail - 3], Mnemonic::Popfq);
    }

    #[test]
    fn relocated_call_pushes_the_original_return_address() {
        // push rbp; call rel32 (to TARGET + 0x100)
        let bytes = [0x55, 0xe8, 0xfa, 0x00, 0x00, 0x00, 0xc3];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        let enc = encode(BASE, &params(), &p).unwrap();
        let insns: Vec<_> = Decoder::with_ip(64, &enc.code, BASE, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let t = insns.iter().position(|i| i.ip() == enc.trampoline).unwrap();
        let m: Vec<Mnemonic> = insns[t..t + 5].iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            m,
            [
                Mnemonic::Push,
                Mnemonic::Lea,
                Mnemonic::Mov,
                Mnemonic::Mov,
                Mnemonic::Jmp
            ]
        );
        assert_eq!(enc.relocated[1], insns[t + 1].ip());
        let ret = TARGET + 6;
        assert_eq!(insns[t + 2].immediate32(), ret as u32);
        assert_eq!(insns[t + 3].immediate32(), (ret >> 32) as u32);
        assert_eq!(insns[t + 4].near_branch_target(), TARGET + 0x100);
        // No call anywhere in the trampoline, and no jump back after the callee's jmp.
        assert!(insns[t..].iter().all(|i| i.mnemonic() != Mnemonic::Call));
    }

    #[test]
    fn return_stub_writes_the_original_address_and_returns_through_it() {
        let code = encode_return_stub(BASE, 0x7777_0000_0010, &layout()).unwrap();
        let insns: Vec<_> = Decoder::with_ip(64, &code, BASE, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert!(insns.iter().all(|i| !i.is_invalid()));
        let m: Vec<Mnemonic> = insns.iter().map(|i| i.mnemonic()).collect();
        // Flags are dead after a `ret` and DF is clear: a constant eflags, no pushfq, no cld.
        assert_eq!(&m[..3], &[Mnemonic::Lea, Mnemonic::Push, Mnemonic::Push]);
        assert_eq!(insns[1].immediate32(), ENTRY_EFLAGS as u32);
        assert!(!m.contains(&Mnemonic::Pushfq) && !m.contains(&Mnemonic::Cld));
        // Every xmm register (-fipa-ra callers may keep values in any of them).
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Movaps).count(), 32);
        // The dispatch call (after the native path's): the first call after the xmm saves.
        let saves = m.iter().position(|&x| x == Mnemonic::Movaps).unwrap();
        let call = saves
            + m[saves..]
                .iter()
                .position(|&x| x == Mnemonic::Call)
                .unwrap();
        // The native path saves no xmm register.
        assert!(m[..saves].contains(&Mnemonic::Call));
        // The slot number comes from above pt_regs; the result goes back there.
        let load = insns[..call]
            .iter()
            .rev()
            .find(|i| i.op0_register() == Register::RSI)
            .unwrap();
        assert_eq!(
            (load.memory_base(), load.memory_displacement64()),
            (Register::RBX, PT_REGS as u64)
        );
        let after = &insns[call..];
        assert!(after.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.memory_base() == Register::RSP
            && i.memory_displacement64() == PT_REGS as u64
            && i.op1_register() == Register::RAX));
        assert_eq!(&m[m.len() - 2..], &[Mnemonic::Lea, Mnemonic::Ret]);
        assert!(
            !m.contains(&Mnemonic::Popfq),
            "flags are dead after a return"
        );
    }

    fn layout() -> RetLayout {
        RetLayout {
            slots: 0x7000_0000_0000,
            first: BASE + 4096 + 6,
            count: 16384,
            slot_orig: 0,
            slot_sp: 8,
            slot_site: 16,
            slot_generation: 20,
            sites: 0x7100_0000_0000,
            site_count: 4096,
            site_size: 48,
            site_native: 16,
            site_native_traps: 40,
            site_inflight: 24,
            site_generation: 32,
        }
    }

    fn decode(code: &[u8]) -> (Vec<Instruction>, Vec<Mnemonic>) {
        let insns: Vec<_> = Decoder::with_ip(64, code, BASE, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert!(insns.iter().all(|i| !i.is_invalid()));
        let m = insns.iter().map(|i| i.mnemonic()).collect();
        (insns, m)
    }

    #[test]
    fn entry_stub_neither_reads_nor_restores_flags_and_keeps_every_xmm() {
        // nop5; lea rax, [rdi+rsi]; ret
        let bytes = [0x0f, 0x1f, 0x44, 0, 0, 0x48, 0x8d, 0x04, 0x37, 0xc3];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        let params = StubParams {
            at_entry: true,
            ..params()
        };
        let enc = encode(BASE, &params, &p).unwrap();
        let (insns, m) = decode(&enc.code);
        assert_eq!(
            &m[..5],
            &[
                Mnemonic::Lea,
                Mnemonic::Push,
                Mnemonic::Inc,
                Mnemonic::Cmp,
                Mnemonic::Jne
            ]
        );
        assert_eq!(insns[1].immediate32(), ENTRY_EFLAGS as u32);
        assert!(!m.contains(&Mnemonic::Pushfq) && !m.contains(&Mnemonic::Cld));
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Movaps).count(), 32);
        // Only the redirect tail (the handler may send the thread anywhere) restores them.
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Popfq).count(), 1);
        // The plain exit: uncount, drop the 152 bytes above (eflags included), trampoline.
        let t = insns.iter().position(|i| i.ip() == enc.trampoline).unwrap();
        assert_eq!(&m[t - 2..t], &[Mnemonic::Dec, Mnemonic::Lea]);
        assert_eq!(
            insns[t - 1].memory_displacement64(),
            (FIRST_DROP + 8) as u64
        );
        // The bail-out too.
        let bail = insns
            .iter()
            .position(|i| i.ip() == insns[4].near_branch_target())
            .unwrap();
        assert_eq!(
            &m[bail..bail + 3],
            &[Mnemonic::Dec, Mnemonic::Lea, Mnemonic::Jmp]
        );
        assert_eq!(insns[bail + 2].near_branch_target(), enc.trampoline);
    }

    #[test]
    fn armed_return_enters_the_function_through_the_call_before_its_trampoline() {
        let bytes = [0x0f, 0x1f, 0x44, 0, 0, 0x48, 0x8d, 0x04, 0x37, 0xc3];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        let first = 0x7000_0000_1006u64;
        let params = StubParams {
            at_entry: true,
            ret_trampolines: Some((first, 16384)),
            ..params()
        };
        let enc = encode(BASE, &params, &p).unwrap();
        let (insns, m) = decode(&enc.code);
        let call = m.iter().position(|&x| x == Mnemonic::Call).unwrap();
        let after = &insns[call..];
        // The range check of [S] (rsp + 296 = the return address) against T(0)..T(16384).
        assert!(after.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.memory_base() == Register::RSP
            && i.memory_displacement64() == 296
            && i.op0_register() == Register::RAX));
        assert!(after.iter().any(|i| i.op0_register() == Register::RCX
            && i.op0_kind() == OpKind::Register
            && i.immediate64() == first));
        assert!(after.iter().any(
            |i| i.mnemonic() == Mnemonic::Cmp && i.immediate32() == 16384 * TRAMP_STRIDE as u32
        ));
        // C(k) = T(k) - 4 goes to [S - 8], the address of a jump to the trampoline to [S].
        let lea_c = after
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Lea && i.memory_index() == Register::RCX)
            .unwrap();
        assert_eq!(
            lea_c.memory_displacement64() as i64,
            -(TRAMP_CALL_LEN as i64)
        );
        let lea_enter = after
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Lea && i.memory_base() == Register::RIP)
            .unwrap();
        let enter = insns
            .iter()
            .find(|i| i.ip() == lea_enter.ip_rel_memory_address())
            .unwrap();
        assert_eq!(
            (enter.mnemonic(), enter.near_branch_target()),
            (Mnemonic::Jmp, enc.trampoline)
        );
        // Just before it: uncount, rsp = S + 8, jmp [rsp - 16].
        let e = insns.iter().position(|i| i.ip() == enter.ip()).unwrap();
        assert_eq!(&m[e - 3..e], &[Mnemonic::Dec, Mnemonic::Lea, Mnemonic::Jmp]);
        assert_eq!(
            insns[e - 2].memory_displacement64(),
            (FIRST_DROP + 16) as u64
        );
        assert_eq!(
            (
                insns[e - 1].memory_base(),
                insns[e - 1].memory_displacement64() as i64
            ),
            (Register::RSP, -16)
        );
        // 15 pops on each exit and in the redirect tail.
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Pop).count(), 45);
    }

    #[test]
    fn native_path_calls_the_entry_without_saving_xmm_and_rejoins_after_the_handler() {
        let bytes = [0x0f, 0x1f, 0x44, 0, 0, 0x48, 0x8d, 0x04, 0x37, 0xc3];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        for at_entry in [true, false] {
            let params = StubParams {
                at_entry,
                native: Some(NativeSlot {
                    entry: BASE + 4096 + 16,
                    traps: BASE + 4096 + 24,
                }),
                ..params()
            };
            let enc = encode(BASE, &params, &p).unwrap();
            let (insns, m) = decode(&enc.code);
            // The word is read after the pt_regs fields are written (the ss store).
            let load = insns
                .iter()
                .position(|i| {
                    i.is_ip_rel_memory_operand() && i.ip_rel_memory_address() == BASE + 4096 + 16
                })
                .unwrap();
            assert_eq!(insns[load - 1].memory_displacement64(), 160);
            assert_eq!(insns[load].op0_register(), Register::RAX);
            assert_eq!(&m[load + 1..load + 3], &[Mnemonic::Test, Mnemonic::Je]);
            // The thread pointer (fs:[0]) finds the thread's record: a busy thread takes the
            // handler.
            let tp = &insns[load + 3];
            assert_eq!(
                (
                    tp.segment_prefix(),
                    tp.memory_base(),
                    tp.memory_displacement64()
                ),
                (Register::FS, Register::None, 0)
            );
            let handler = insns[load + 2].near_branch_target();
            let busy = insns[load..]
                .iter()
                .position(|i| {
                    i.mnemonic() == Mnemonic::Cmp
                        && i.memory_displacement64() == super::super::threads::REC_BUSY as u64
                })
                .unwrap()
                + load;
            assert_eq!(m[busy + 1], Mnemonic::Jne);
            assert_eq!(insns[busy + 1].near_branch_target(), handler);
            // The call: no xmm register saved, DF cleared only at a mid-function site.
            let calls: Vec<usize> = (0..m.len()).filter(|&i| m[i] == Mnemonic::Call).collect();
            assert_eq!(calls.len(), 2, "native entry, then the handler");
            let native = &m[load..calls[0]];
            assert!(!native.contains(&Mnemonic::Movaps));
            assert_eq!(native.contains(&Mnemonic::Cld), !at_entry);
            assert_eq!(insns[calls[0]].op0_register(), Register::RAX);
            let arg = &insns[calls[0] - 1];
            assert_eq!(
                (arg.op0_register(), arg.immediate32()),
                (Register::ESI, 168)
            );
            // The handler path starts with `mov rbx, rsp` and saves every xmm register.
            let h = insns.iter().position(|i| i.ip() == handler).unwrap();
            assert_eq!(m[h], Mnemonic::Mov);
            assert!(h > calls[0] && h < calls[1]);
            assert_eq!(
                m[h..calls[1]]
                    .iter()
                    .filter(|&&x| x == Mnemonic::Movaps)
                    .count(),
                16
            );
            // After the entry: status 0 skips to the rip check after the handler call, status 2
            // counts a trap and goes there too, anything else calls the handler.
            assert_eq!(
                &m[calls[0] + 1..calls[0] + 9],
                &[
                    Mnemonic::Mov,
                    Mnemonic::Test,
                    Mnemonic::Je,
                    Mnemonic::Cmp,
                    Mnemonic::Jne,
                    Mnemonic::Inc,
                    Mnemonic::Jmp,
                    Mnemonic::Mov,
                ]
            );
            let after = insns[calls[0] + 3].near_branch_target();
            assert_eq!(insns[calls[0] + 7].near_branch_target(), after);
            assert_eq!(insns[calls[0] + 5].near_branch_target(), handler);
            assert_eq!(insns[calls[0] + 4].immediate32(), NATIVE_TRAPPED as u32);
            let inc = &insns[calls[0] + 6];
            assert!(inc.has_lock_prefix());
            assert_eq!(inc.ip_rel_memory_address(), BASE + 4096 + 24);
            let a = insns.iter().position(|i| i.ip() == after).unwrap();
            assert_eq!(
                a,
                calls[1] + 1 + 16 + 1,
                "after the xmm restores and `mov rsp, rbx`"
            );
            assert_eq!(insns[a].immediate64(), TARGET);
            assert_eq!(m[a + 1], Mnemonic::Cmp);
            assert_eq!(insns[a + 1].memory_displacement64(), 128);
        }
    }

    #[test]
    fn short_jump_is_relocated_to_its_absolute_target() {
        let bytes = [0xeb, 0x03, 0x0f, 0x0b, 0xcc, 0xc3];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        let enc = encode(BASE, &params(), &p).unwrap();
        let tail = &enc.code[(enc.trampoline - BASE) as usize..];
        let jmp = Decoder::with_ip(64, tail, enc.trampoline, DecoderOptions::NONE).decode();
        assert_eq!(
            (jmp.mnemonic(), jmp.near_branch_target()),
            (Mnemonic::Jmp, TARGET + 5)
        );
        // No jump back after an unconditional jmp: the redirect tail follows directly.
        let next = Decoder::with_ip(64, &tail[jmp.len()..], 0, DecoderOptions::NONE).decode();
        assert_eq!(
            (next.mnemonic(), next.memory_displacement64()),
            (Mnemonic::Mov, 152)
        );
    }

    #[test]
    fn multi_instruction_prologue_maps_every_boundary() {
        let bytes = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xc9, 0xc3];
        let p = analyze(TARGET, &bytes, JMP_REL32_LEN).unwrap();
        let enc = encode(BASE, &params(), &p).unwrap();
        assert_eq!(enc.relocated.len(), 3);
        assert_eq!(enc.relocated[1] - enc.relocated[0], 1);
        assert_eq!(enc.relocated[2] - enc.relocated[1], 3);
    }
}
