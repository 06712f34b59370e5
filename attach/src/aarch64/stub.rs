//! The code a hook jumps to: a stub that saves the registers as a
//! [`PtRegsArm64`](super::PtRegsArm64), calls the handler and restores them, followed by the
//! trampoline (the relocated prologue and the jump back), then the literal pools. And the
//! patch written over the hooked instructions.
//!
//! Pure: produces bytes for a given address. Stack during the handler call, `S` = sp at the
//! hooked instruction (16-byte aligned, as the AAPCS64 requires whenever sp is used; Linux has
//! no red zone on aarch64, so everything below `S` is free):
//!
//! ```text
//! S-16  .. S        fpsr, padding
//! S-528 .. S-16     q0–q31 (the handler may clobber any vector register but the low halves
//!                   of v8–v15, and the hooked code may use all of them)
//! S-800 .. S-528    struct user_pt_regs: x0–x30, sp (= S), pc (= hooked address), pstate
//!                   (NZCV) — the handler's first argument
//! ```
//!
//! The handler may change x0–x30 and the NZCV bits of `pstate`; the stub loads them back.
//! Changes to `sp` and `pc` are ignored. With the 16-byte patch, x16 already holds the stub
//! address on entry, so the handler sees that value, not the original x16.

use super::encode::{self, IP0, IP1, LR, Mem, SP, SysReg};
use super::relocate::{MAX_ADDR, Prologue, Trampoline, relocate};
use crate::AttachError;

/// Bytes of `struct user_pt_regs`.
const PT_REGS: u32 = 34 * 8;
/// Offset of q0 in the frame.
const VREGS: u32 = PT_REGS;
/// Offset of the saved fpsr.
const FPSR: u32 = VREGS + 32 * 16;
/// The whole frame, a multiple of 16.
pub(crate) const FRAME: u32 = FPSR + 16;
const _: () = assert!(FRAME.is_multiple_of(16) && FRAME == 800);
/// Offsets in `user_pt_regs`.
const REG_SP: u32 = 31 * 8;
const REG_PC: u32 = 32 * 8;
const REG_PSTATE: u32 = 33 * 8;

/// Bytes of `b <stub>`.
pub const BRANCH_PATCH_LEN: usize = 4;
/// Bytes of `ldr x16, #8; br x16; .quad <stub>`.
pub const ABSOLUTE_PATCH_LEN: usize = 16;

/// The bytes to write at `addr` so that it jumps to `stub`: `b stub` when it is within
/// ±128 MiB and `absolute` is not asked for, else `ldr x16, #8; br x16; .quad stub`.
pub fn entry_patch(addr: u64, stub: u64, absolute: bool) -> Vec<u8> {
    let near = encode::b(stub.wrapping_sub(addr) as i64, false);
    match near {
        Some(w) if !absolute => w.to_le_bytes().to_vec(),
        _ => {
            let mut bytes = Vec::with_capacity(ABSOLUTE_PATCH_LEN);
            // ldr x16, .+8 fits by construction.
            bytes.extend_from_slice(&0x5800_0050u32.to_le_bytes());
            bytes.extend_from_slice(&encode::br(IP0).to_le_bytes());
            bytes.extend_from_slice(&stub.to_le_bytes());
            bytes
        }
    }
}

/// What the stub passes to the handler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StubParams {
    /// Reported as `pc`.
    pub hook_addr: u64,
    /// `extern "C" fn(&mut PtRegsArm64, user)`.
    pub handler: u64,
    pub user: u64,
}

/// Stub, trampoline and pools for `base`.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    pub bytes: Vec<u8>,
    pub trampoline: u64,
    pub moved: Vec<(u64, u64)>,
}

/// Which stub word loads which constant.
#[derive(Debug, Clone, Copy)]
enum Const {
    Pc,
    User,
    Handler,
}

/// One word of the stub.
#[derive(Debug, Clone, Copy)]
enum Word {
    Insn(u32),
    /// `ldr x<rd>, =constant`.
    Load(u32, Const),
}

/// Appends an encoding whose operands are constants of this module (always in range).
fn put(w: &mut Vec<Word>, insn: Option<u32>) {
    w.push(Word::Insn(insn.unwrap_or(encode::NOP)));
}

/// The stub's words.
fn stub_words() -> Vec<Word> {
    let mut w = Vec::with_capacity(96);
    put(&mut w, encode::add_imm(true, SP, SP, FRAME));
    for r in (0..30).step_by(2) {
        put(
            &mut w,
            encode::pair(false, false, r, r + 1, i64::from(8 * r)),
        );
    }
    put(&mut w, encode::add_imm(false, IP0, SP, FRAME));
    put(
        &mut w,
        encode::pair(false, false, LR, IP0, i64::from(REG_SP - 8)),
    );
    w.push(Word::Load(IP0, Const::Pc));
    put(&mut w, Some(encode::mrs(IP1, SysReg::Nzcv)));
    put(
        &mut w,
        encode::pair(false, false, IP0, IP1, i64::from(REG_PC)),
    );
    for q in (0..32).step_by(2) {
        put(
            &mut w,
            encode::pair(false, true, q, q + 1, i64::from(VREGS + 16 * q)),
        );
    }
    put(&mut w, Some(encode::mrs(IP0, SysReg::Fpsr)));
    put(&mut w, Mem::StrX.at(IP0, SP, FPSR));
    put(&mut w, encode::add_imm(false, 0, SP, 0));
    w.push(Word::Load(1, Const::User));
    w.push(Word::Load(IP0, Const::Handler));
    put(&mut w, Some(encode::blr(IP0)));
    put(&mut w, Mem::LdrX.at(IP0, SP, FPSR));
    put(&mut w, Some(encode::msr(SysReg::Fpsr, IP0)));
    for q in (0..32).step_by(2) {
        put(
            &mut w,
            encode::pair(true, true, q, q + 1, i64::from(VREGS + 16 * q)),
        );
    }
    put(&mut w, Mem::LdrX.at(IP0, SP, REG_PSTATE));
    put(&mut w, Some(encode::msr(SysReg::Nzcv, IP0)));
    for r in (0..30).step_by(2).filter(|&r| r != IP0) {
        put(
            &mut w,
            encode::pair(true, false, r, r + 1, i64::from(8 * r)),
        );
    }
    put(&mut w, Mem::LdrX.at(LR, SP, 8 * LR));
    put(
        &mut w,
        encode::pair(true, false, IP0, IP1, i64::from(8 * IP0)),
    );
    put(&mut w, encode::add_imm(false, SP, SP, FRAME));
    w
}

/// Builds the stub at `base` (4-byte aligned), with the trampoline for `p` right after it.
pub(crate) fn build(
    base: u64,
    params: StubParams,
    p: &Prologue,
    code: &[u8],
    guarded: bool,
) -> Result<Built, AttachError> {
    if !base.is_multiple_of(4) || base > MAX_ADDR {
        return Err(AttachError::Unrelocatable {
            at: p.addr as usize,
            reason: "the stub address is not 4-byte aligned or too high",
        });
    }
    let words = stub_words();
    let trampoline = base + 4 * words.len() as u64;
    let Trampoline {
        bytes: tramp,
        moved,
    } = relocate(p, code, trampoline, guarded)?;
    let pool = (trampoline + tramp.len() as u64).next_multiple_of(8);
    let consts = [params.hook_addr, params.user, params.handler];
    let mut bytes = Vec::with_capacity((pool - base) as usize + 8 * consts.len());
    for (i, w) in words.iter().enumerate() {
        let w = match *w {
            Word::Insn(w) => w,
            Word::Load(rd, c) => {
                let slot = pool + 8 * c as u64;
                let pc = base + 4 * i as u64;
                encode::ldr_x_literal(rd, slot.wrapping_sub(pc) as i64).ok_or(
                    AttachError::Unrelocatable {
                        at: p.addr as usize,
                        reason: "trampoline too large",
                    },
                )?
            }
        };
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.extend_from_slice(&tramp);
    bytes.resize((pool - base) as usize, 0);
    for c in consts {
        bytes.extend_from_slice(&c.to_le_bytes());
    }
    Ok(Built {
        bytes,
        trampoline,
        moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aarch64::relocate::analyze;
    use crate::aarch64::relocate::tests::{A, listing};

    #[test]
    fn entry_patch_is_a_b_when_near_and_an_absolute_jump_otherwise() {
        let near = A + 0x7ff_fffc;
        assert_eq!(listing(&entry_patch(A, near, false), A), ["b 0x83ffffc"]);
        let high = 0x900_0000;
        assert_eq!(
            listing(&entry_patch(high, high - 0x800_0000, false), high),
            ["b 0x1000000"]
        );
        assert_eq!(
            entry_patch(high, high - 0x800_0004, false).len(),
            ABSOLUTE_PATCH_LEN
        );
        for (stub, absolute) in [
            (near, true),
            (A + 0x800_0000, false),
            (0x7f00_1234_5670, false),
        ] {
            let p = entry_patch(A, stub, absolute);
            assert_eq!(p.len(), ABSOLUTE_PATCH_LEN);
            assert_eq!(
                listing(&p, A),
                [format!("ldr x16, ={stub:#018x}"), "br x16".into()]
            );
        }
    }

    #[test]
    fn stub_saves_calls_restores_and_falls_into_the_trampoline() {
        const HOOK: u64 = A;
        const BASE: u64 = 0x7f00_0000_1000;
        let code = 0x9100_0400u32.to_le_bytes(); // add x0, x0, #1
        let p = analyze(HOOK, &code, 4).unwrap();
        let params = StubParams {
            hook_addr: HOOK,
            handler: 0x1111_2222_3333,
            user: 0x4444_5555_6666,
        };
        let built = build(BASE, params, &p, &code, false).unwrap();
        let l = listing(&built.bytes, BASE);
        let stub_len = ((built.trampoline - BASE) / 4) as usize;
        let (stub, tramp) = l.split_at(stub_len);
        let count = |prefix: &str| stub.iter().filter(|s| s.starts_with(prefix)).count();
        assert_eq!(stub[0], "sub sp, sp, #0x320");
        assert_eq!(stub[stub_len - 1], "add sp, sp, #0x320");
        assert_eq!(
            (count("stp x"), count("ldp x")),
            (17, 15),
            "x0-x29, (x30, sp), (pc, pstate)"
        );
        assert_eq!((count("stp q"), count("ldp q")), (16, 16));
        assert_eq!(count("nop"), 0, "every encoding in range");
        for want in [
            "stp x30, x16, [sp, #0xf0]",
            "ldr x16, =0x0000000000400000",
            "stp x16, x17, [sp, #0x100]",
            "mov x0, sp",
            "ldr x1, =0x0000444455556666",
            "ldr x16, =0x0000111122223333",
            "blr x16",
            "ldr x16, [sp, #0x108]",
            "ldr x30, [sp, #0xf0]",
            "ldp x16, x17, [sp, #0x80]",
        ] {
            assert!(
                stub.contains(&want.to_string()),
                "missing `{want}` in\n{}",
                stub.join("\n")
            );
        }
        // x16/x17 are restored last: they carried the constants.
        assert_eq!(stub[stub_len - 2], "ldp x16, x17, [sp, #0x80]");
        assert_eq!(
            tramp,
            ["add x0, x0, #0x1", "ldr x16, =0x0000000000400004", "br x16"]
        );
        assert_eq!(built.moved, [(HOOK, built.trampoline)]);
    }
}
