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
//! ```

use iced_x86::code_asm::{
    CodeAssembler, ptr, qword_ptr, r8, r9, r10, r11, r12, r13, r14, r15, rax, rbp, rbx, rcx, rdi,
    rdx, rsi, rsp, xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12,
    xmm13, xmm14, xmm15, xmmword_ptr,
};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, IcedError, Instruction, InstructionBlock,
    MemoryOperand, Register,
};

use super::prologue::Prologue;
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
}

/// A thread stopped at `pc` has not yet been counted as in flight; sending it back to the
/// hooked address requires adding `rsp_delta` to its rsp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryPc {
    pub pc: u64,
    pub rsp_delta: u64,
}

/// Stub and trampoline, encoded for one base address.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub code: Vec<u8>,
    /// Address of the first relocated instruction.
    pub trampoline: u64,
    /// New address of each relocated instruction (same order as [`Prologue::insns`]).
    pub relocated: Vec<u64>,
    /// The stub's instructions before the in-flight increment.
    pub entry: [EntryPc; 3],
}

fn iced(addr: u64) -> impl Fn(IcedError) -> AttachError {
    move |e| AttachError::Relocation {
        addr: addr as usize,
        message: e.to_string(),
    }
}

/// Encodes stub + trampoline to run at `base`.
pub(crate) fn encode(
    base: u64,
    params: &StubParams,
    prologue: &Prologue,
) -> Result<Encoded, AttachError> {
    let err = iced(prologue.addr);
    let mut insns = stub_instructions(params).map_err(&err)?;
    let stub_len = insns.len();
    insns.extend(prologue.insns.iter().copied());
    if let Some(resume) = prologue.resume {
        insns.push(Instruction::with_branch(Code::Jmp_rel32_64, resume).map_err(&err)?);
    }
    let block = InstructionBlock::new(&insns, base);
    let out = BlockEncoder::encode(
        64,
        block,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(&err)?;
    let at = |i: usize| -> Result<u64, AttachError> {
        match out.new_instruction_offsets.get(i) {
            Some(&off) if off != u32::MAX => Ok(base + u64::from(off)),
            _ => Err(AttachError::Relocation {
                addr: prologue.addr as usize,
                message: format!("instruction {i} was rewritten, its new address is unknown"),
            }),
        }
    };
    let relocated = (stub_len..stub_len + prologue.insns.len())
        .map(at)
        .collect::<Result<Vec<_>, _>>()?;
    let entry = [
        EntryPc {
            pc: at(0)?,
            rsp_delta: 0,
        },
        EntryPc {
            pc: at(1)?,
            rsp_delta: FIRST_DROP as u64,
        },
        EntryPc {
            pc: at(2)?,
            rsp_delta: FIRST_DROP as u64 + 8,
        },
    ];
    Ok(Encoded {
        code: out.code_buffer,
        trampoline: relocated[0],
        relocated,
        entry,
    })
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

fn stub_instructions(p: &StubParams) -> Result<Vec<Instruction>, IcedError> {
    const SAVED: [iced_x86::code_asm::AsmRegister64; 15] = [
        rdi, rsi, rdx, rcx, rax, r8, r9, r10, r11, rbx, rbp, r12, r13, r14, r15,
    ];
    let xmms = [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ];
    let mut a = CodeAssembler::new(64)?;
    // Entry: the three instructions before the increment are the `entry` window.
    a.lea(rsp, ptr(rsp - FIRST_DROP))?;
    a.pushfq()?;
    a.add_instruction(locked_rip_rel(Code::Inc_rm64, p.inflight)?)?;
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
    a.mov(rbx, rsp)?;
    a.and(rsp, -16)?;
    a.sub(rsp, 256)?;
    for (i, x) in xmms.iter().enumerate() {
        a.movaps(xmmword_ptr(rsp + 16 * i as i32), *x)?;
    }
    a.cld()?;
    a.mov(rdi, rbx)?;
    a.mov(rsi, p.user)?;
    a.mov(rax, p.handler)?;
    a.call(rax)?;
    for (i, x) in xmms.iter().enumerate() {
        a.movaps(*x, xmmword_ptr(rsp + 16 * i as i32))?;
    }
    a.mov(rsp, rbx)?;
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.lea(rsp, ptr(rsp + 24))?; // orig_rax, rip, cs
    a.add_instruction(locked_rip_rel(Code::Dec_rm64, p.inflight)?)?;
    a.popfq()?;
    a.lea(rsp, ptr(rsp + FIRST_DROP))?;
    Ok(a.take_instructions())
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
        assert_eq!(&m[..3], &[Mnemonic::Lea, Mnemonic::Pushfq, Mnemonic::Inc]);
        assert!(insns[2].has_lock_prefix());
        assert_eq!(insns[2].ip_rel_memory_address(), BASE + 4096);
        assert_eq!(
            enc.entry.map(|e| e.pc),
            [insns[0].ip(), insns[1].ip(), insns[2].ip()]
        );
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Push).count(), 16);
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Pop).count(), 15);
        assert_eq!(m.iter().filter(|&&x| x == Mnemonic::Movaps).count(), 32);
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
        assert_eq!(
            tail.len(),
            jmp.len(),
            "no jump back after an unconditional jmp"
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
