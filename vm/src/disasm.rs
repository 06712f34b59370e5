//! Disassembler to the bpf_conformance text syntax, the one the `-- asm` sections of the
//! conformance suite are written in (and that [`crate::asm`] reads back).
//!
//! Output is lossless: [`disassemble`] prints jump targets as relative offsets, 64-bit
//! immediates in full and every slot that does not decode as a `.raw` line with all five
//! fields, so `asm::assemble(&disassemble(p)) == p` for any slice of slots.
//!
//! This module also owns the one mnemonic table ([`Form`], [`mnemonic`], [`forms`]): the
//! assembler finds a mnemonic by asking which form prints as it, so the two cannot drift apart.
//!
//! Syntax, by example (RFC 9669 §4–§5 for what each instruction does):
//!
//! ```text
//! mov32 %r0, 0            add %r1, %r2             neg %r0          movsx832 %r0, %r1
//! be16 %r0                le32 %r0                 bswap64 %r0
//! lddw %r0, 0x123456789abcdef0                     lddw %r1, map_value 3+16
//! ldxdw %r0, [%r1+8]      ldxsh %r0, [%r10-2]      stw [%r10-4], 5  stxdw [%r1+0], %r2
//! lock add [%r10-8], %r1  lock fetch or32 [%r10-4], %r1            lock cmpxchg [%r1+0], %r2
//! ja +2                   ja32 +70000              jne %r1, 5, +3   jslt32 %r1, %r2, -4
//! call 5                  call local +3            call %r2         exit
//! .raw code=0x8f dst=1 src=0 off=0 imm=0
//! ```

use crate::isa::{AluOp, AtomicOp, Endian, Insn, JmpCond, LdImmKind, Op, Size, Src, Width, decode};
use crate::opcode::JA32;
use std::fmt::Write as _;

/// Binary ALU operation names; a `32` suffix selects `BPF_ALU`.
pub(crate) const ALU_NAMES: [(AluOp, &str); 14] = [
    (AluOp::Add, "add"),
    (AluOp::Sub, "sub"),
    (AluOp::Mul, "mul"),
    (AluOp::Div, "div"),
    (AluOp::SDiv, "sdiv"),
    (AluOp::Or, "or"),
    (AluOp::And, "and"),
    (AluOp::Lsh, "lsh"),
    (AluOp::Rsh, "rsh"),
    (AluOp::Mod, "mod"),
    (AluOp::SMod, "smod"),
    (AluOp::Xor, "xor"),
    (AluOp::Mov, "mov"),
    (AluOp::Arsh, "arsh"),
];

/// Conditional jump names; a `32` suffix selects `BPF_JMP32`.
pub(crate) const JMP_NAMES: [(JmpCond, &str); 11] = [
    (JmpCond::Eq, "jeq"),
    (JmpCond::Gt, "jgt"),
    (JmpCond::Ge, "jge"),
    (JmpCond::Set, "jset"),
    (JmpCond::Ne, "jne"),
    (JmpCond::Sgt, "jsgt"),
    (JmpCond::Sge, "jsge"),
    (JmpCond::Lt, "jlt"),
    (JmpCond::Le, "jle"),
    (JmpCond::Slt, "jslt"),
    (JmpCond::Sle, "jsle"),
];

/// Atomic operation names, after `lock [fetch]`; a `32` suffix selects the 32-bit access.
pub(crate) const ATOMIC_NAMES: [(AtomicOp, &str); 6] = [
    (AtomicOp::Add, "add"),
    (AtomicOp::Or, "or"),
    (AtomicOp::And, "and"),
    (AtomicOp::Xor, "xor"),
    (AtomicOp::Xchg, "xchg"),
    (AtomicOp::CmpXchg, "cmpxchg"),
];

/// Access size suffixes of `ldx`, `st` and `stx`.
pub(crate) const SIZE_NAMES: [(Size, &str); 4] = [
    (Size::B, "b"),
    (Size::H, "h"),
    (Size::W, "w"),
    (Size::DW, "dw"),
];

/// Byte-swap names, followed by the width in bits.
pub(crate) const ENDIAN_NAMES: [(Endian, &str); 3] = [
    (Endian::Le, "le"),
    (Endian::Be, "be"),
    (Endian::Swap, "bswap"),
];

/// Keywords of the pseudo `lddw` forms (`lddw %r1, map_fd 3`); a plain constant has none.
pub(crate) const LDIMM_NAMES: [(LdImmKind, &str); 6] = [
    (LdImmKind::MapFd, "map_fd"),
    (LdImmKind::MapValue, "map_value"),
    (LdImmKind::BtfId, "btf_id"),
    (LdImmKind::Func, "func"),
    (LdImmKind::MapIdx, "map_idx"),
    (LdImmKind::MapIdxValue, "map_idx_value"),
];

/// `(result width, source bits)` of every `movsx` the ISA defines (RFC 9669 §4.1).
pub(crate) const MOVSX_SHAPES: [(Width, u8); 5] = [
    (Width::W32, 8),
    (Width::W32, 16),
    (Width::W64, 8),
    (Width::W64, 16),
    (Width::W64, 32),
];

/// Width in bits of the byte-swap forms.
pub(crate) const ENDIAN_BITS: [u8; 3] = [16, 32, 64];

/// The shape of an instruction as one mnemonic names it: the operation without its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Form {
    Alu(Width, AluOp),
    Neg(Width),
    MovSx(Width, u8),
    Endian(Endian, u8),
    Lddw,
    /// `ldx`, sign-extending when the flag is set.
    Load(Size, bool),
    /// `st`: store an immediate.
    Store(Size),
    /// `stx`: store a register.
    StoreX(Size),
    /// `lock`, with the fetch flag (always set for xchg and cmpxchg).
    Atomic(Size, AtomicOp, bool),
    Ja,
    /// `gotol`: `BPF_JMP32 | BPF_JA`, offset in imm.
    Ja32,
    Jmp(Width, JmpCond),
    /// Helper call by id, or `callx` with a register operand.
    Call,
    CallLocal,
    /// `BPF_PSEUDO_KFUNC_CALL`; assembled for completeness, never decoded.
    CallRuntime,
    Exit,
}

/// The name paired with `value` in `table` (every table above covers its whole enum).
pub(crate) fn name_of<T: PartialEq + Copy>(table: &[(T, &'static str)], value: T) -> &'static str {
    table
        .iter()
        .find(|&&(v, _)| v == value)
        .map_or("?", |&(_, name)| name)
}

/// The value paired with `name` in `table`.
pub(crate) fn value_of<T: Copy>(table: &[(T, &'static str)], name: &str) -> Option<T> {
    table.iter().find(|&&(_, n)| n == name).map(|&(v, _)| v)
}

/// xchg and cmpxchg always fetch; their mnemonic has no `fetch`.
pub(crate) fn implicit_fetch(op: AtomicOp) -> bool {
    matches!(op, AtomicOp::Xchg | AtomicOp::CmpXchg)
}

fn width_suffix(width: Width) -> &'static str {
    match width {
        Width::W64 => "",
        Width::W32 => "32",
    }
}

/// The mnemonic of a form, as printed and as assembled.
pub(crate) fn mnemonic(form: Form) -> String {
    match form {
        Form::Alu(width, op) => format!("{}{}", name_of(&ALU_NAMES, op), width_suffix(width)),
        Form::Neg(width) => format!("neg{}", width_suffix(width)),
        Form::MovSx(width, bits) => {
            let result = if width == Width::W64 { 64 } else { 32 };
            format!("movsx{bits}{result}")
        }
        Form::Endian(kind, bits) => format!("{}{bits}", name_of(&ENDIAN_NAMES, kind)),
        Form::Lddw => "lddw".into(),
        Form::Load(size, signed) => {
            let s = if signed { "s" } else { "" };
            format!("ldx{s}{}", name_of(&SIZE_NAMES, size))
        }
        Form::Store(size) => format!("st{}", name_of(&SIZE_NAMES, size)),
        Form::StoreX(size) => format!("stx{}", name_of(&SIZE_NAMES, size)),
        Form::Atomic(size, op, fetch) => {
            let fetch = if fetch && !implicit_fetch(op) {
                "fetch "
            } else {
                ""
            };
            let suffix = if size == Size::W { "32" } else { "" };
            format!("lock {fetch}{}{suffix}", name_of(&ATOMIC_NAMES, op))
        }
        Form::Ja => "ja".into(),
        Form::Ja32 => "ja32".into(),
        Form::Jmp(width, cond) => format!("{}{}", name_of(&JMP_NAMES, cond), width_suffix(width)),
        Form::Call => "call".into(),
        Form::CallLocal => "call local".into(),
        Form::CallRuntime => "call runtime".into(),
        Form::Exit => "exit".into(),
    }
}

/// Every form the ISA defines, each once: the assembler's mnemonic table.
pub(crate) fn forms() -> Vec<Form> {
    let mut all = vec![
        Form::Lddw,
        Form::Ja,
        Form::Ja32,
        Form::Call,
        Form::CallLocal,
        Form::CallRuntime,
        Form::Exit,
    ];
    for width in [Width::W64, Width::W32] {
        all.extend(ALU_NAMES.iter().map(|&(op, _)| Form::Alu(width, op)));
        all.extend(JMP_NAMES.iter().map(|&(cond, _)| Form::Jmp(width, cond)));
        all.push(Form::Neg(width));
    }
    all.extend(MOVSX_SHAPES.iter().map(|&(w, bits)| Form::MovSx(w, bits)));
    for &(kind, _) in &ENDIAN_NAMES {
        all.extend(ENDIAN_BITS.iter().map(|&bits| Form::Endian(kind, bits)));
    }
    for &(size, _) in &SIZE_NAMES {
        all.extend([
            Form::Load(size, false),
            Form::Store(size),
            Form::StoreX(size),
        ]);
        // BPF_MEMSX exists for 1, 2 and 4-byte loads only.
        if size != Size::DW {
            all.push(Form::Load(size, true));
        }
    }
    for size in [Size::W, Size::DW] {
        for &(op, _) in &ATOMIC_NAMES {
            if !implicit_fetch(op) {
                all.push(Form::Atomic(size, op, false));
            }
            all.push(Form::Atomic(size, op, true));
        }
    }
    all
}

/// The form of a decoded instruction.
pub(crate) fn form_of(op: &Op) -> Form {
    match *op {
        Op::Alu { width, op, .. } => Form::Alu(width, op),
        Op::Neg { width, .. } => Form::Neg(width),
        Op::MovSx { width, bits, .. } => Form::MovSx(width, bits),
        Op::Endian { kind, bits, .. } => Form::Endian(kind, bits),
        Op::LdImm64 { .. } => Form::Lddw,
        Op::Load { size, signed, .. } => Form::Load(size, signed),
        Op::Store {
            size,
            src: Src::Imm(_),
            ..
        } => Form::Store(size),
        Op::Store {
            size,
            src: Src::Reg(_),
            ..
        } => Form::StoreX(size),
        Op::Atomic {
            size, op, fetch, ..
        } => Form::Atomic(size, op, fetch || implicit_fetch(op)),
        // `encode` picks the 16-bit form whenever the offset fits; so does the printer.
        Op::Ja { off } if i16::try_from(off).is_ok() => Form::Ja,
        Op::Ja { .. } => Form::Ja32,
        Op::Jmp { width, cond, .. } => Form::Jmp(width, cond),
        Op::Call { .. } | Op::Callx { .. } => Form::Call,
        Op::CallLocal { .. } => Form::CallLocal,
        Op::Exit => Form::Exit,
    }
}

fn reg(r: u8) -> String {
    format!("%r{r}")
}

fn src_operand(src: Src) -> String {
    match src {
        Src::Reg(r) => reg(r),
        Src::Imm(v) => v.to_string(),
    }
}

fn mem_operand(base: u8, off: i16) -> String {
    format!("[%r{base}{off:+}]")
}

/// The second operand of `lddw`: a full 64-bit hex constant, or `kind value[+offset]`.
fn ldimm_operand(kind: LdImmKind, lo: i32, hi: i32) -> String {
    if kind == LdImmKind::Imm64 {
        let value = u64::from(lo as u32) | (u64::from(hi as u32) << 32);
        return format!("{value:#x}");
    }
    let name = name_of(&LDIMM_NAMES, kind);
    // A function reference is pc-relative like a jump target; the rest are plain numbers.
    let mut text = if kind == LdImmKind::Func {
        format!("{name} {lo:+}")
    } else {
        format!("{name} {lo}")
    };
    if hi != 0 || matches!(kind, LdImmKind::MapValue | LdImmKind::MapIdxValue) {
        let _ = write!(text, "{hi:+}");
    }
    text
}

/// One decoded instruction in conformance syntax, e.g. `ldxdw %r0, [%r1+8]`.
pub fn format_op(op: &Op) -> String {
    let m = mnemonic(form_of(op));
    match *op {
        Op::Alu { dst, src, .. } => format!("{m} {}, {}", reg(dst), src_operand(src)),
        Op::Neg { dst, .. } | Op::Endian { dst, .. } => format!("{m} {}", reg(dst)),
        Op::MovSx { dst, src, .. } => format!("{m} {}, {}", reg(dst), reg(src)),
        Op::LdImm64 { dst, kind, lo, hi } => {
            format!("{m} {}, {}", reg(dst), ldimm_operand(kind, lo, hi))
        }
        Op::Load { dst, src, off, .. } => format!("{m} {}, {}", reg(dst), mem_operand(src, off)),
        Op::Store { dst, off, src, .. } => {
            format!("{m} {}, {}", mem_operand(dst, off), src_operand(src))
        }
        Op::Atomic { dst, src, off, .. } => {
            format!("{m} {}, {}", mem_operand(dst, off), reg(src))
        }
        Op::Ja { off } | Op::CallLocal { off } => format!("{m} {off:+}"),
        Op::Jmp { dst, src, off, .. } => {
            format!("{m} {}, {}, {off:+}", reg(dst), src_operand(src))
        }
        Op::Call { id } => format!("{m} {id}"),
        Op::Callx { reg: r } => format!("{m} {}", reg(r)),
        Op::Exit => m,
    }
}

/// A slot with all its fields, for slots that do not decode; the assembler reads it back.
fn format_raw(insn: Insn) -> String {
    format!(
        ".raw code={:#04x} dst={} src={} off={} imm={}",
        insn.code, insn.dst, insn.src, insn.off, insn.imm
    )
}

/// The text of the instruction at `pc` and the number of slots it covers.
fn line_at(insns: &[Insn], pc: usize) -> Option<(String, usize)> {
    let insn = *insns.get(pc)?;
    Some(match decode(insns, pc) {
        // `gotol` with a short offset decodes to the same `Op::Ja` as `ja`; keep its encoding.
        Ok(Op::Ja { off }) if insn.code == JA32 => (format!("{} {off:+}", mnemonic(Form::Ja32)), 1),
        Ok(op) => (format_op(&op), op.slots()),
        Err(_) => (format_raw(insn), 1),
    })
}

/// The instruction starting at `insns[pc]`; a slot that does not decode is printed as a `.raw`
/// line. Empty when `pc` is out of range. Never panics.
pub fn disassemble_at(insns: &[Insn], pc: usize) -> String {
    line_at(insns, pc).map(|(text, _)| text).unwrap_or_default()
}

/// The whole program, one instruction per line (the second slot of `lddw` has no line of its
/// own); assembling the result gives back exactly `insns`.
pub fn disassemble(insns: &[Insn]) -> String {
    let mut out = String::new();
    let mut pc = 0;
    while let Some((text, slots)) = line_at(insns, pc) {
        out.push_str(&text);
        out.push('\n');
        pc += slots;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::encode;
    use crate::opcode::LDDW;
    use std::collections::HashSet;

    #[test]
    fn formats_every_operand_kind_in_conformance_syntax() {
        let cases: [(Op, &str); 16] = [
            (
                Op::Alu {
                    width: Width::W32,
                    op: AluOp::Mov,
                    dst: 0,
                    src: Src::Imm(0),
                },
                "mov32 %r0, 0",
            ),
            (
                Op::Alu {
                    width: Width::W64,
                    op: AluOp::Mov,
                    dst: 1,
                    src: Src::Imm(-1),
                },
                "mov %r1, -1",
            ),
            (
                Op::Alu {
                    width: Width::W32,
                    op: AluOp::SMod,
                    dst: 0,
                    src: Src::Reg(1),
                },
                "smod32 %r0, %r1",
            ),
            (
                Op::Load {
                    size: Size::DW,
                    signed: false,
                    dst: 0,
                    src: 1,
                    off: 8,
                },
                "ldxdw %r0, [%r1+8]",
            ),
            (
                Op::Load {
                    size: Size::H,
                    signed: true,
                    dst: 0,
                    src: 10,
                    off: -2,
                },
                "ldxsh %r0, [%r10-2]",
            ),
            (
                Op::Store {
                    size: Size::W,
                    dst: 10,
                    off: -4,
                    src: Src::Reg(1),
                },
                "stxw [%r10-4], %r1",
            ),
            (
                Op::Store {
                    size: Size::DW,
                    dst: 1,
                    off: 0,
                    src: Src::Imm(5),
                },
                "stdw [%r1+0], 5",
            ),
            (
                Op::LdImm64 {
                    dst: 0,
                    kind: LdImmKind::Imm64,
                    lo: 0x9abc_def0_u32 as i32,
                    hi: 0x1234_5678,
                },
                "lddw %r0, 0x123456789abcdef0",
            ),
            (
                Op::LdImm64 {
                    dst: 1,
                    kind: LdImmKind::MapValue,
                    lo: 3,
                    hi: 16,
                },
                "lddw %r1, map_value 3+16",
            ),
            (
                Op::Jmp {
                    width: Width::W64,
                    cond: JmpCond::Ne,
                    dst: 1,
                    src: Src::Imm(5),
                    off: 3,
                },
                "jne %r1, 5, +3",
            ),
            (Op::Ja { off: 70000 }, "ja32 +70000"),
            (Op::CallLocal { off: -3 }, "call local -3"),
            (Op::Callx { reg: 2 }, "call %r2"),
            (
                Op::MovSx {
                    width: Width::W64,
                    dst: 0,
                    src: 1,
                    bits: 32,
                },
                "movsx3264 %r0, %r1",
            ),
            (
                Op::Atomic {
                    size: Size::W,
                    op: AtomicOp::Add,
                    fetch: true,
                    dst: 10,
                    src: 1,
                    off: -4,
                },
                "lock fetch add32 [%r10-4], %r1",
            ),
            (
                Op::Atomic {
                    size: Size::DW,
                    op: AtomicOp::CmpXchg,
                    fetch: true,
                    dst: 10,
                    src: 1,
                    off: -8,
                },
                "lock cmpxchg [%r10-8], %r1",
            ),
        ];
        for (op, text) in cases {
            assert_eq!(format_op(&op), text);
        }
    }

    #[test]
    fn every_form_has_a_distinct_mnemonic() {
        let all = forms();
        let names: HashSet<String> = all.iter().map(|&f| mnemonic(f)).collect();
        assert_eq!(names.len(), all.len());
        assert!(!names.iter().any(|n| n.contains('?')));
    }

    #[test]
    fn every_decodable_op_has_a_listed_form() {
        let all: HashSet<Form> = forms().into_iter().collect();
        for code in 0..=255u8 {
            for (src, off, imm) in [
                (0, 0, 0),
                (1, 0, 0),
                (2, 1, 0),
                (1, 8, 0),
                (0, 0, 16),
                (3, 0, 0xe1),
            ] {
                let insns = [Insn::new(code, 1, src, off, imm), Insn::new(0, 0, 0, 0, 0)];
                if let Ok(op) = decode(&insns, 0) {
                    assert!(all.contains(&form_of(&op)), "{op:?}");
                }
            }
        }
    }

    #[test]
    fn undecodable_slot_prints_raw_fields() {
        let insns = [Insn::new(0x8f, 1, 0, 0, 0)];
        assert_eq!(
            disassemble_at(&insns, 0),
            ".raw code=0x8f dst=1 src=0 off=0 imm=0"
        );
    }

    #[test]
    fn out_of_range_pc_is_empty() {
        assert_eq!(disassemble_at(&[], 0), "");
        assert_eq!(disassemble_at(&[Insn::new(0x95, 0, 0, 0, 0)], 7), "");
    }

    #[test]
    fn truncated_lddw_is_raw_and_second_slot_is_skipped() {
        let lddw = encode(&Op::LdImm64 {
            dst: 0,
            kind: LdImmKind::Imm64,
            lo: 1,
            hi: 2,
        });
        let mut insns = lddw.clone();
        insns.push(Insn::new(0x95, 0, 0, 0, 0));
        assert_eq!(disassemble(&insns), "lddw %r0, 0x200000001\nexit\n");
        assert_eq!(
            disassemble(&lddw[..1]),
            format!(".raw code={LDDW:#04x} dst=0 src=0 off=0 imm=1\n")
        );
    }

    #[test]
    fn short_gotol_keeps_its_mnemonic() {
        let insns = [Insn::new(JA32, 0, 0, 0, 2)];
        assert_eq!(disassemble_at(&insns, 0), "ja32 +2");
    }
}
