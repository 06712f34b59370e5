//! The instruction model: the raw 8-byte [`Insn`], its encoding, and a strict decode into
//! the typed [`Op`] that the verifier, disassembler and JIT work with.
//!
//! Decoding is where "unused fields must be zero" (RFC 9669 §3) is enforced: every field an
//! instruction does not use is checked, so a program that decodes is exactly one of the
//! instructions the RFC defines (plus the kernel's pseudo forms).

use crate::opcode::*;
use std::fmt;

/// Number of registers r0..=r10.
pub const NUM_REGS: usize = 11;
/// Frame pointer register number.
pub const FRAME_REG: u8 = 10;

/// One raw eBPF instruction slot (RFC 9669 §3.1), in host order after decoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Insn {
    /// Opcode byte.
    pub code: u8,
    /// Destination register (low nibble of byte 1 on little-endian).
    pub dst: u8,
    /// Source register (high nibble of byte 1 on little-endian).
    pub src: u8,
    /// Signed 16-bit offset.
    pub off: i16,
    /// Signed 32-bit immediate.
    pub imm: i32,
}

impl fmt::Debug for Insn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Insn {{ code: {:#04x}, dst: {}, src: {}, off: {}, imm: {} }}",
            self.code, self.dst, self.src, self.off, self.imm
        )
    }
}

impl Insn {
    /// Size of an encoded instruction slot in bytes.
    pub const SIZE: usize = 8;

    /// Builds an instruction from its fields.
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }

    /// Decodes one little-endian slot.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Insn {
            code: b[0],
            dst: b[1] & 0x0f,
            src: b[1] >> 4,
            off: i16::from_le_bytes([b[2], b[3]]),
            imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Encodes one little-endian slot.
    pub fn to_bytes(self) -> [u8; 8] {
        let off = self.off.to_le_bytes();
        let imm = self.imm.to_le_bytes();
        [
            self.code,
            (self.dst & 0x0f) | (self.src << 4),
            off[0],
            off[1],
            imm[0],
            imm[1],
            imm[2],
            imm[3],
        ]
    }

    /// The slot as a little-endian u64 (the `-- raw` format of the conformance suite).
    pub fn to_u64(self) -> u64 {
        u64::from_le_bytes(self.to_bytes())
    }

    /// Inverse of [`Insn::to_u64`].
    pub fn from_u64(v: u64) -> Self {
        Self::from_bytes(v.to_le_bytes())
    }
}

/// Splits bytecode into slots. The length must be a multiple of 8.
pub fn insns_from_bytes(bytes: &[u8]) -> Result<Vec<Insn>, DecodeError> {
    if !bytes.len().is_multiple_of(Insn::SIZE) {
        return Err(DecodeError::TrailingBytes { len: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(Insn::SIZE)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            Insn::from_bytes(a)
        })
        .collect())
}

/// Encodes slots back into bytecode.
pub fn insns_to_bytes(insns: &[Insn]) -> Vec<u8> {
    insns.iter().flat_map(|i| i.to_bytes()).collect()
}

/// Operand width of ALU and jump instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    /// 32-bit (`BPF_ALU`, `BPF_JMP32`); ALU results are zero-extended.
    W32,
    /// 64-bit (`BPF_ALU64`, `BPF_JMP`).
    W64,
}

/// Second operand of ALU, jump and store instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Src {
    /// `BPF_X`: a register.
    Reg(u8),
    /// `BPF_K`: the sign-extended 32-bit immediate.
    Imm(i32),
}

/// Binary ALU operations (RFC 9669 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum AluOp {
    Add,
    Sub,
    Mul,
    Div,
    SDiv,
    Or,
    And,
    Lsh,
    Rsh,
    Mod,
    SMod,
    Xor,
    Mov,
    Arsh,
}

/// Conditional jump conditions (RFC 9669 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum JmpCond {
    Eq,
    Gt,
    Ge,
    Set,
    Ne,
    Sgt,
    Sge,
    Lt,
    Le,
    Slt,
    Sle,
}

/// Atomic read-modify-write operations (RFC 9669 §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum AtomicOp {
    Add,
    Or,
    And,
    Xor,
    Xchg,
    CmpXchg,
}

/// Byte-swap kinds (RFC 9669 §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endian {
    /// `BPF_ALU | BPF_END | BPF_TO_LE`: truncate to little-endian (a no-op swap here).
    Le,
    /// `BPF_ALU | BPF_END | BPF_TO_BE`: convert to big-endian.
    Be,
    /// `BPF_ALU64 | BPF_END`: unconditional byte swap (ISA v4).
    Swap,
}

/// Memory access size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Size {
    B,
    H,
    W,
    DW,
}

impl Size {
    /// Width in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            Size::B => 1,
            Size::H => 2,
            Size::W => 4,
            Size::DW => 8,
        }
    }

    fn from_code(code: u8) -> Size {
        match size(code) {
            BPF_B => Size::B,
            BPF_H => Size::H,
            BPF_W => Size::W,
            _ => Size::DW,
        }
    }
}

/// What the 64-bit immediate of an `lddw` means (its `src` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LdImmKind {
    /// Plain 64-bit constant.
    Imm64,
    /// `BPF_PSEUDO_MAP_FD`: imm is a map fd, replaced by the map's address.
    MapFd,
    /// `BPF_PSEUDO_MAP_VALUE`: imm is a map fd, the next imm an offset into its value.
    MapValue,
    /// `BPF_PSEUDO_BTF_ID`: a kernel BTF variable.
    BtfId,
    /// `BPF_PSEUDO_FUNC`: imm is the pc-relative address of a subprogram.
    Func,
    /// `BPF_PSEUDO_MAP_IDX`: imm indexes `fd_array`.
    MapIdx,
    /// `BPF_PSEUDO_MAP_IDX_VALUE`: index into `fd_array`, next imm an offset.
    MapIdxValue,
}

/// A decoded, field-checked instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `dst = dst OP src` at the given width.
    Alu {
        /// Operand width.
        width: Width,
        /// Operation.
        op: AluOp,
        /// Destination register.
        dst: u8,
        /// Second operand.
        src: Src,
    },
    /// `dst = -dst`.
    Neg {
        /// Operand width.
        width: Width,
        /// Destination register.
        dst: u8,
    },
    /// `dst = (sign-extend from bits) src` (ISA v4 `movsx`).
    MovSx {
        /// Result width (32-bit results are zero-extended into 64).
        width: Width,
        /// Destination register.
        dst: u8,
        /// Source register.
        src: u8,
        /// Source bits: 8, 16 or 32.
        bits: u8,
    },
    /// Byte swap of `dst`.
    Endian {
        /// Kind of swap.
        kind: Endian,
        /// 16, 32 or 64.
        bits: u8,
        /// Destination register.
        dst: u8,
    },
    /// `dst = imm64` (two slots).
    LdImm64 {
        /// Destination register.
        dst: u8,
        /// Meaning of the immediate.
        kind: LdImmKind,
        /// First slot imm (low 32 bits).
        lo: i32,
        /// Second slot imm (high 32 bits, or the value offset).
        hi: i32,
    },
    /// `dst = *(size *)(src + off)`, optionally sign-extending (`BPF_MEMSX`).
    Load {
        /// Access size.
        size: Size,
        /// Sign-extend the loaded value (ISA v4).
        signed: bool,
        /// Destination register.
        dst: u8,
        /// Base register.
        src: u8,
        /// Offset.
        off: i16,
    },
    /// `*(size *)(dst + off) = src`.
    Store {
        /// Access size.
        size: Size,
        /// Base register.
        dst: u8,
        /// Offset.
        off: i16,
        /// Value: register (`BPF_STX`) or immediate (`BPF_ST`).
        src: Src,
    },
    /// Atomic read-modify-write of `*(size *)(dst + off)` with `src`.
    Atomic {
        /// 32 or 64-bit (`Size::W` or `Size::DW`).
        size: Size,
        /// Operation.
        op: AtomicOp,
        /// For add/or/and/xor: write the old value back into `src`.
        fetch: bool,
        /// Base register.
        dst: u8,
        /// Operand register.
        src: u8,
        /// Offset.
        off: i16,
    },
    /// Unconditional jump by `off` slots (`ja`, or `gotol` with a 32-bit offset).
    Ja {
        /// Relative target.
        off: i32,
    },
    /// Conditional jump.
    Jmp {
        /// Comparison width.
        width: Width,
        /// Condition.
        cond: JmpCond,
        /// First operand.
        dst: u8,
        /// Second operand.
        src: Src,
        /// Relative target.
        off: i16,
    },
    /// Call helper function `id`.
    Call {
        /// Helper id.
        id: u32,
    },
    /// Call a local subprogram at `pc + 1 + off` (`BPF_PSEUDO_CALL`).
    CallLocal {
        /// Relative target.
        off: i32,
    },
    /// Call the helper whose id is in register `reg`.
    Callx {
        /// Register holding the helper id.
        reg: u8,
    },
    /// Return from the current function.
    Exit,
}

impl Op {
    /// Calls `f` for each register the instruction writes: an ALU, load or `lddw`
    /// destination, an atomic's fetched register (and r0 for `cmpxchg`), r0–r5 for calls
    /// (the return value and the caller-saved argument registers).
    pub fn written_regs(&self, mut f: impl FnMut(u8)) {
        match *self {
            Op::Alu { dst, .. }
            | Op::Neg { dst, .. }
            | Op::MovSx { dst, .. }
            | Op::Endian { dst, .. }
            | Op::LdImm64 { dst, .. }
            | Op::Load { dst, .. } => f(dst),
            Op::Atomic { op, fetch, src, .. } => {
                if op == AtomicOp::CmpXchg {
                    f(0);
                }
                if fetch || op == AtomicOp::Xchg || op == AtomicOp::CmpXchg {
                    f(src);
                }
            }
            Op::Call { .. } | Op::CallLocal { .. } | Op::Callx { .. } => (0..=5).for_each(f),
            _ => {}
        }
    }

    /// Number of slots the instruction occupies (2 for `lddw`, else 1).
    pub fn slots(&self) -> usize {
        match self {
            Op::LdImm64 { .. } => 2,
            _ => 1,
        }
    }
}

/// Why a slot is not a valid instruction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The opcode byte is not an instruction.
    #[error("unknown opcode {code:#04x}")]
    UnknownOpcode {
        /// Opcode byte.
        code: u8,
    },
    /// A field this instruction does not use is not zero (RFC 9669 §3).
    #[error("unused field {field} is not zero ({value}) in opcode {code:#04x}")]
    NonZeroField {
        /// Opcode byte.
        code: u8,
        /// Field name: dst, src, off or imm.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// A register number above r10.
    #[error("invalid register r{reg}")]
    InvalidRegister {
        /// Register number.
        reg: u8,
    },
    /// A field has a value the instruction does not define.
    #[error("invalid {field} {value} for opcode {code:#04x}")]
    InvalidField {
        /// Opcode byte.
        code: u8,
        /// Field name.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// The first half of `lddw` is the last slot.
    #[error("lddw is truncated: its second slot is missing")]
    TruncatedLddw,
    /// The second half of `lddw` is not a zero-opcode slot.
    #[error("second slot of lddw must have zero opcode, registers and offset")]
    BadLddwSecondSlot,
    /// Known to the ISA but not run by this implementation.
    #[error("{what} is not supported")]
    Unsupported {
        /// What.
        what: &'static str,
    },
    /// Bytecode length is not a multiple of 8.
    #[error("bytecode length {len} is not a multiple of 8")]
    TrailingBytes {
        /// Length in bytes.
        len: usize,
    },
}

fn reg(r: u8) -> Result<u8, DecodeError> {
    if r as usize >= NUM_REGS {
        Err(DecodeError::InvalidRegister { reg: r })
    } else {
        Ok(r)
    }
}

fn zero(code: u8, field: &'static str, value: i64) -> Result<(), DecodeError> {
    if value != 0 {
        Err(DecodeError::NonZeroField { code, field, value })
    } else {
        Ok(())
    }
}

/// Decodes the instruction starting at `insns[pc]`, checking every field.
pub fn decode(insns: &[Insn], pc: usize) -> Result<Op, DecodeError> {
    let i = insns[pc];
    let code = i.code;
    match class(code) {
        BPF_ALU | BPF_ALU64 => decode_alu(i),
        BPF_JMP | BPF_JMP32 => decode_jmp(i),
        BPF_LD => {
            if code != LDDW {
                return Err(match mode(code) {
                    BPF_ABS | BPF_IND => DecodeError::Unsupported {
                        what: "legacy packet access (BPF_ABS/BPF_IND)",
                    },
                    _ => DecodeError::UnknownOpcode { code },
                });
            }
            let dst = reg(i.dst)?;
            zero(code, "off", i.off.into())?;
            let kind = match i.src {
                0 => LdImmKind::Imm64,
                BPF_PSEUDO_MAP_FD => LdImmKind::MapFd,
                BPF_PSEUDO_MAP_VALUE => LdImmKind::MapValue,
                BPF_PSEUDO_BTF_ID => LdImmKind::BtfId,
                BPF_PSEUDO_FUNC => LdImmKind::Func,
                BPF_PSEUDO_MAP_IDX => LdImmKind::MapIdx,
                BPF_PSEUDO_MAP_IDX_VALUE => LdImmKind::MapIdxValue,
                s => {
                    return Err(DecodeError::InvalidField {
                        code,
                        field: "src",
                        value: s.into(),
                    });
                }
            };
            let Some(next) = insns.get(pc + 1) else {
                return Err(DecodeError::TruncatedLddw);
            };
            if next.code != 0 || next.dst != 0 || next.src != 0 || next.off != 0 {
                return Err(DecodeError::BadLddwSecondSlot);
            }
            Ok(Op::LdImm64 {
                dst,
                kind,
                lo: i.imm,
                hi: next.imm,
            })
        }
        BPF_LDX => {
            let signed = match mode(code) {
                BPF_MEM => false,
                BPF_MEMSX if size(code) != BPF_DW => true,
                BPF_ABS | BPF_IND => {
                    return Err(DecodeError::Unsupported {
                        what: "legacy packet access (BPF_ABS/BPF_IND)",
                    });
                }
                _ => return Err(DecodeError::UnknownOpcode { code }),
            };
            zero(code, "imm", i.imm.into())?;
            Ok(Op::Load {
                size: Size::from_code(code),
                signed,
                dst: reg(i.dst)?,
                src: reg(i.src)?,
                off: i.off,
            })
        }
        BPF_ST => {
            if mode(code) != BPF_MEM {
                return Err(DecodeError::UnknownOpcode { code });
            }
            zero(code, "src", i.src.into())?;
            Ok(Op::Store {
                size: Size::from_code(code),
                dst: reg(i.dst)?,
                off: i.off,
                src: Src::Imm(i.imm),
            })
        }
        _ /* BPF_STX */ => match mode(code) {
            BPF_MEM => {
                zero(code, "imm", i.imm.into())?;
                Ok(Op::Store {
                    size: Size::from_code(code),
                    dst: reg(i.dst)?,
                    off: i.off,
                    src: Src::Reg(reg(i.src)?),
                })
            }
            BPF_ATOMIC => {
                let size = match size(code) {
                    BPF_W => Size::W,
                    BPF_DW => Size::DW,
                    _ => return Err(DecodeError::UnknownOpcode { code }),
                };
                let (op, fetch) = match i.imm {
                    0x00 => (AtomicOp::Add, false),
                    0x01 => (AtomicOp::Add, true),
                    0x40 => (AtomicOp::Or, false),
                    0x41 => (AtomicOp::Or, true),
                    0x50 => (AtomicOp::And, false),
                    0x51 => (AtomicOp::And, true),
                    0xa0 => (AtomicOp::Xor, false),
                    0xa1 => (AtomicOp::Xor, true),
                    BPF_XCHG => (AtomicOp::Xchg, true),
                    BPF_CMPXCHG => (AtomicOp::CmpXchg, true),
                    v => {
                        return Err(DecodeError::InvalidField {
                            code,
                            field: "imm",
                            value: v.into(),
                        });
                    }
                };
                Ok(Op::Atomic {
                    size,
                    op,
                    fetch,
                    dst: reg(i.dst)?,
                    src: reg(i.src)?,
                    off: i.off,
                })
            }
            _ => Err(DecodeError::UnknownOpcode { code }),
        },
    }
}

fn decode_alu(i: Insn) -> Result<Op, DecodeError> {
    let code = i.code;
    let width = if class(code) == BPF_ALU64 {
        Width::W64
    } else {
        Width::W32
    };
    let dst = reg(i.dst)?;
    // Second operand: BPF_K uses imm (src must be 0), BPF_X uses src (imm must be 0).
    let operand = |i: Insn| -> Result<Src, DecodeError> {
        if source(i.code) == BPF_X {
            zero(i.code, "imm", i.imm.into())?;
            Ok(Src::Reg(reg(i.src)?))
        } else {
            zero(i.code, "src", i.src.into())?;
            Ok(Src::Imm(i.imm))
        }
    };
    let simple = |op: AluOp| -> Result<Op, DecodeError> {
        zero(code, "off", i.off.into())?;
        Ok(Op::Alu {
            width,
            op,
            dst,
            src: operand(i)?,
        })
    };
    let signed_pair = |unsigned: AluOp, signed: AluOp| -> Result<Op, DecodeError> {
        let op = match i.off {
            0 => unsigned,
            1 => signed,
            v => {
                return Err(DecodeError::InvalidField {
                    code,
                    field: "off",
                    value: v.into(),
                });
            }
        };
        Ok(Op::Alu {
            width,
            op,
            dst,
            src: operand(i)?,
        })
    };
    match op(code) {
        BPF_ADD => simple(AluOp::Add),
        BPF_SUB => simple(AluOp::Sub),
        BPF_MUL => simple(AluOp::Mul),
        BPF_DIV => signed_pair(AluOp::Div, AluOp::SDiv),
        BPF_MOD => signed_pair(AluOp::Mod, AluOp::SMod),
        BPF_OR => simple(AluOp::Or),
        BPF_AND => simple(AluOp::And),
        BPF_LSH => simple(AluOp::Lsh),
        BPF_RSH => simple(AluOp::Rsh),
        BPF_XOR => simple(AluOp::Xor),
        BPF_ARSH => simple(AluOp::Arsh),
        BPF_MOV => {
            if i.off == 0 {
                return simple(AluOp::Mov);
            }
            // movsx: only the register form, 8/16 (and 32 for 64-bit results).
            let ok = source(code) == BPF_X
                && match width {
                    Width::W32 => matches!(i.off, 8 | 16),
                    Width::W64 => matches!(i.off, 8 | 16 | 32),
                };
            if !ok {
                return Err(DecodeError::InvalidField {
                    code,
                    field: "off",
                    value: i.off.into(),
                });
            }
            zero(code, "imm", i.imm.into())?;
            Ok(Op::MovSx {
                width,
                dst,
                src: reg(i.src)?,
                bits: i.off as u8,
            })
        }
        BPF_NEG => {
            if source(code) != BPF_K {
                return Err(DecodeError::UnknownOpcode { code });
            }
            zero(code, "src", i.src.into())?;
            zero(code, "off", i.off.into())?;
            zero(code, "imm", i.imm.into())?;
            Ok(Op::Neg { width, dst })
        }
        BPF_END => {
            let kind = match (width, source(code)) {
                (Width::W32, BPF_TO_LE) => Endian::Le,
                (Width::W32, _) => Endian::Be,
                (Width::W64, BPF_TO_LE) => Endian::Swap,
                (Width::W64, _) => return Err(DecodeError::UnknownOpcode { code }),
            };
            zero(code, "src", i.src.into())?;
            zero(code, "off", i.off.into())?;
            if !matches!(i.imm, 16 | 32 | 64) {
                return Err(DecodeError::InvalidField {
                    code,
                    field: "imm",
                    value: i.imm.into(),
                });
            }
            Ok(Op::Endian {
                kind,
                bits: i.imm as u8,
                dst,
            })
        }
        _ => Err(DecodeError::UnknownOpcode { code }),
    }
}

fn decode_jmp(i: Insn) -> Result<Op, DecodeError> {
    let code = i.code;
    let width = if class(code) == BPF_JMP {
        Width::W64
    } else {
        Width::W32
    };
    let cond = match op(code) {
        BPF_JA => {
            if source(code) != BPF_K {
                return Err(DecodeError::UnknownOpcode { code });
            }
            zero(code, "dst", i.dst.into())?;
            zero(code, "src", i.src.into())?;
            return Ok(match width {
                Width::W64 => {
                    zero(code, "imm", i.imm.into())?;
                    Op::Ja { off: i.off.into() }
                }
                Width::W32 => {
                    zero(code, "off", i.off.into())?;
                    Op::Ja { off: i.imm }
                }
            });
        }
        BPF_CALL if width == Width::W64 => {
            zero(code, "off", i.off.into())?;
            if source(code) == BPF_X {
                zero(code, "src", i.src.into())?;
                zero(code, "imm", i.imm.into())?;
                return Ok(Op::Callx { reg: reg(i.dst)? });
            }
            zero(code, "dst", i.dst.into())?;
            return match i.src {
                0 => Ok(Op::Call { id: i.imm as u32 }),
                BPF_PSEUDO_CALL => Ok(Op::CallLocal { off: i.imm }),
                BPF_PSEUDO_KFUNC_CALL => Err(DecodeError::Unsupported {
                    what: "kfunc calls (BPF_PSEUDO_KFUNC_CALL)",
                }),
                s => Err(DecodeError::InvalidField {
                    code,
                    field: "src",
                    value: s.into(),
                }),
            };
        }
        BPF_EXIT if width == Width::W64 => {
            if source(code) != BPF_K {
                return Err(DecodeError::UnknownOpcode { code });
            }
            zero(code, "dst", i.dst.into())?;
            zero(code, "src", i.src.into())?;
            zero(code, "off", i.off.into())?;
            zero(code, "imm", i.imm.into())?;
            return Ok(Op::Exit);
        }
        BPF_JEQ => JmpCond::Eq,
        BPF_JGT => JmpCond::Gt,
        BPF_JGE => JmpCond::Ge,
        BPF_JSET => JmpCond::Set,
        BPF_JNE => JmpCond::Ne,
        BPF_JSGT => JmpCond::Sgt,
        BPF_JSGE => JmpCond::Sge,
        BPF_JLT => JmpCond::Lt,
        BPF_JLE => JmpCond::Le,
        BPF_JSLT => JmpCond::Slt,
        BPF_JSLE => JmpCond::Sle,
        _ => return Err(DecodeError::UnknownOpcode { code }),
    };
    let src = if source(code) == BPF_X {
        zero(code, "imm", i.imm.into())?;
        Src::Reg(reg(i.src)?)
    } else {
        zero(code, "src", i.src.into())?;
        Src::Imm(i.imm)
    };
    Ok(Op::Jmp {
        width,
        cond,
        dst: reg(i.dst)?,
        src,
        off: i.off,
    })
}

/// Encodes a typed instruction back into slots (one, or two for `lddw`).
pub fn encode(op: &Op) -> Vec<Insn> {
    let alu_class = |w: Width| if w == Width::W64 { BPF_ALU64 } else { BPF_ALU };
    let jmp_class = |w: Width| if w == Width::W64 { BPF_JMP } else { BPF_JMP32 };
    let size_bits = |s: Size| match s {
        Size::B => BPF_B,
        Size::H => BPF_H,
        Size::W => BPF_W,
        Size::DW => BPF_DW,
    };
    let src_parts = |s: Src| match s {
        Src::Reg(r) => (BPF_X, r, 0),
        Src::Imm(v) => (BPF_K, 0, v),
    };
    match *op {
        Op::Alu {
            width,
            op,
            dst,
            src,
        } => {
            let (opbits, off) = match op {
                AluOp::Add => (BPF_ADD, 0),
                AluOp::Sub => (BPF_SUB, 0),
                AluOp::Mul => (BPF_MUL, 0),
                AluOp::Div => (BPF_DIV, 0),
                AluOp::SDiv => (BPF_DIV, 1),
                AluOp::Or => (BPF_OR, 0),
                AluOp::And => (BPF_AND, 0),
                AluOp::Lsh => (BPF_LSH, 0),
                AluOp::Rsh => (BPF_RSH, 0),
                AluOp::Mod => (BPF_MOD, 0),
                AluOp::SMod => (BPF_MOD, 1),
                AluOp::Xor => (BPF_XOR, 0),
                AluOp::Mov => (BPF_MOV, 0),
                AluOp::Arsh => (BPF_ARSH, 0),
            };
            let (s, r, imm) = src_parts(src);
            vec![Insn::new(alu_class(width) | opbits | s, dst, r, off, imm)]
        }
        Op::Neg { width, dst } => vec![Insn::new(alu_class(width) | BPF_NEG, dst, 0, 0, 0)],
        Op::MovSx {
            width,
            dst,
            src,
            bits,
        } => vec![Insn::new(
            alu_class(width) | BPF_MOV | BPF_X,
            dst,
            src,
            bits.into(),
            0,
        )],
        Op::Endian { kind, bits, dst } => {
            let code = match kind {
                Endian::Le => BPF_ALU | BPF_END | BPF_TO_LE,
                Endian::Be => BPF_ALU | BPF_END | BPF_TO_BE,
                Endian::Swap => BPF_ALU64 | BPF_END | BPF_TO_LE,
            };
            vec![Insn::new(code, dst, 0, 0, bits.into())]
        }
        Op::LdImm64 { dst, kind, lo, hi } => {
            let src = match kind {
                LdImmKind::Imm64 => 0,
                LdImmKind::MapFd => BPF_PSEUDO_MAP_FD,
                LdImmKind::MapValue => BPF_PSEUDO_MAP_VALUE,
                LdImmKind::BtfId => BPF_PSEUDO_BTF_ID,
                LdImmKind::Func => BPF_PSEUDO_FUNC,
                LdImmKind::MapIdx => BPF_PSEUDO_MAP_IDX,
                LdImmKind::MapIdxValue => BPF_PSEUDO_MAP_IDX_VALUE,
            };
            vec![Insn::new(LDDW, dst, src, 0, lo), Insn::new(0, 0, 0, 0, hi)]
        }
        Op::Load {
            size,
            signed,
            dst,
            src,
            off,
        } => {
            let m = if signed { BPF_MEMSX } else { BPF_MEM };
            vec![Insn::new(BPF_LDX | m | size_bits(size), dst, src, off, 0)]
        }
        Op::Store {
            size,
            dst,
            off,
            src,
        } => match src {
            Src::Reg(r) => vec![Insn::new(
                BPF_STX | BPF_MEM | size_bits(size),
                dst,
                r,
                off,
                0,
            )],
            Src::Imm(v) => vec![Insn::new(
                BPF_ST | BPF_MEM | size_bits(size),
                dst,
                0,
                off,
                v,
            )],
        },
        Op::Atomic {
            size,
            op,
            fetch,
            dst,
            src,
            off,
        } => {
            let base = match op {
                AtomicOp::Add => 0x00,
                AtomicOp::Or => 0x40,
                AtomicOp::And => 0x50,
                AtomicOp::Xor => 0xa0,
                AtomicOp::Xchg => BPF_XCHG,
                AtomicOp::CmpXchg => BPF_CMPXCHG,
            };
            let imm = if fetch { base | BPF_FETCH } else { base };
            vec![Insn::new(
                BPF_STX | BPF_ATOMIC | size_bits(size),
                dst,
                src,
                off,
                imm,
            )]
        }
        Op::Ja { off } => match i16::try_from(off) {
            Ok(o) => vec![Insn::new(JA, 0, 0, o, 0)],
            Err(_) => vec![Insn::new(JA32, 0, 0, 0, off)],
        },
        Op::Jmp {
            width,
            cond,
            dst,
            src,
            off,
        } => {
            let opbits = match cond {
                JmpCond::Eq => BPF_JEQ,
                JmpCond::Gt => BPF_JGT,
                JmpCond::Ge => BPF_JGE,
                JmpCond::Set => BPF_JSET,
                JmpCond::Ne => BPF_JNE,
                JmpCond::Sgt => BPF_JSGT,
                JmpCond::Sge => BPF_JSGE,
                JmpCond::Lt => BPF_JLT,
                JmpCond::Le => BPF_JLE,
                JmpCond::Slt => BPF_JSLT,
                JmpCond::Sle => BPF_JSLE,
            };
            let (s, r, imm) = src_parts(src);
            vec![Insn::new(jmp_class(width) | opbits | s, dst, r, off, imm)]
        }
        Op::Call { id } => vec![Insn::new(CALL, 0, 0, 0, id as i32)],
        Op::CallLocal { off } => vec![Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, off)],
        Op::Callx { reg } => vec![Insn::new(CALLX, reg, 0, 0, 0)],
        Op::Exit => vec![Insn::new(EXIT, 0, 0, 0, 0)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_bytes_round_trip() {
        let i = Insn::new(0x61, 3, 10, -8, -1);
        assert_eq!(Insn::from_bytes(i.to_bytes()), i);
        assert_eq!(i.to_bytes()[1], 0xa3);
    }

    #[test]
    fn add_imm_with_nonzero_src_is_rejected() {
        let insns = [Insn::new(0x04, 0, 1, 0, 1)];
        assert!(matches!(
            decode(&insns, 0),
            Err(DecodeError::NonZeroField { field: "src", .. })
        ));
    }

    #[test]
    fn every_opcode_byte_decodes_or_errors_and_round_trips() {
        for code in 0..=255u8 {
            for (dst, src, off, imm) in [(1, 2, 0, 0), (1, 0, 0, 16), (1, 2, 1, 0), (0, 0, 3, 0)] {
                let insns = [
                    Insn::new(code, dst, src, off, imm),
                    Insn::new(0, 0, 0, 0, 7),
                ];
                if let Ok(op) = decode(&insns, 0) {
                    let enc = encode(&op);
                    assert_eq!(enc[0], insns[0], "{op:?}");
                }
            }
        }
    }

    #[test]
    fn lddw_needs_second_slot() {
        let insns = [Insn::new(LDDW, 0, 0, 0, 1)];
        assert_eq!(decode(&insns, 0), Err(DecodeError::TruncatedLddw));
    }
}
