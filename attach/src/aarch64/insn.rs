//! One A64 instruction at a known address: its pc-relative class, found from the encoding
//! groups of the Arm ARM (section C4.1), and whether it can run somewhere else. yaxpeax-arm
//! decodes every word we move, so undecodable words are refused, and any operand it reports as
//! pc-relative in a class we do not rewrite is refused too (a second opinion on the bit
//! patterns below).

use yaxpeax_arch::{Decoder, U8Reader};
use yaxpeax_arm::armv8::a64::{InstDecoder, Opcode, Operand};

use super::encode::{Imm, Mem, adr_imm};
use crate::AttachError;

/// The register classes of literal loads (`ldr <reg>, label`) and `prfm label`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Literal {
    W,
    X,
    Sw,
    S,
    D,
    Q,
    Prfm,
}

impl Literal {
    /// The same access through a base register.
    pub(crate) fn mem(self) -> Mem {
        match self {
            Literal::W => Mem::LdrW,
            Literal::X => Mem::LdrX,
            Literal::Sw => Mem::LdrSw,
            Literal::S => Mem::LdrS,
            Literal::D => Mem::LdrD,
            Literal::Q => Mem::LdrQ,
            Literal::Prfm => Mem::Prfm,
        }
    }

    /// Whether the destination is a general-purpose register (usable as its own address
    /// register when the load is expanded).
    pub(crate) fn is_gpr(self) -> bool {
        matches!(self, Literal::W | Literal::X | Literal::Sw)
    }
}

/// What relocation an instruction needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `adr xd, target`.
    Adr { rd: u32, target: u64 },
    /// `adrp xd, target` (`target` is a page address).
    Adrp { rd: u32, target: u64 },
    /// `b target`, also `b.al`/`b.nv`.
    B { target: u64 },
    /// `bl target`.
    Bl { target: u64 },
    /// `b.cond`/`bc.cond`, `cbz`/`cbnz`, `tbz`/`tbnz`: `word` with its `imm` field replaced
    /// branches to a new place; `word ^ invert` has the opposite condition.
    Cond {
        word: u32,
        imm: Imm,
        invert: u32,
        target: u64,
    },
    /// A literal load or `prfm` of `target`; `rt` is the destination (or prefetch operation).
    Load {
        word: u32,
        lit: Literal,
        rt: u32,
        target: u64,
    },
    /// Independent of its address.
    Plain,
}

impl Kind {
    /// The target of a direct branch.
    pub(crate) fn branch_target(self) -> Option<u64> {
        match self {
            Kind::B { target } | Kind::Bl { target } | Kind::Cond { target, .. } => Some(target),
            _ => None,
        }
    }
}

/// Classifies `word` executing at `pc` by its encoding alone (no validation).
pub(crate) fn classify(word: u32, pc: u64) -> Kind {
    let rel = |off: i64| pc.wrapping_add_signed(off);
    let r = word & 0x1f;
    if word & 0x1f00_0000 == 0x1000_0000 {
        // PC-rel addressing: op:immlo:10000:immhi:Rd.
        let imm = adr_imm(word);
        return if word & 0x8000_0000 == 0 {
            Kind::Adr {
                rd: r,
                target: rel(imm),
            }
        } else {
            Kind::Adrp {
                rd: r,
                target: (pc & !0xfff).wrapping_add_signed(imm << 12),
            }
        };
    }
    match word & 0xfc00_0000 {
        0x1400_0000 => {
            return Kind::B {
                target: rel(Imm::Imm26.offset(word)),
            };
        }
        0x9400_0000 => {
            return Kind::Bl {
                target: rel(Imm::Imm26.offset(word)),
            };
        }
        _ => {}
    }
    if word & 0xff00_0000 == 0x5400_0000 {
        // b.cond (bit 4 clear) and bc.cond (bit 4 set).
        let target = rel(Imm::Imm19.offset(word));
        if word & 0xe >= 0xe {
            // al and nv: always taken; their "inverse" would be too.
            return Kind::B { target };
        }
        return Kind::Cond {
            word,
            imm: Imm::Imm19,
            invert: 1,
            target,
        };
    }
    match word & 0x7e00_0000 {
        0x3400_0000 => {
            return Kind::Cond {
                word,
                imm: Imm::Imm19,
                invert: 1 << 24,
                target: rel(Imm::Imm19.offset(word)),
            };
        }
        0x3600_0000 => {
            return Kind::Cond {
                word,
                imm: Imm::Imm14,
                invert: 1 << 24,
                target: rel(Imm::Imm14.offset(word)),
            };
        }
        _ => {}
    }
    if word & 0x3b00_0000 == 0x1800_0000 {
        // Load register (literal): opc:011:V:00:imm19:Rt.
        let lit = match (word >> 30, word & (1 << 26) != 0) {
            (0, false) => Literal::W,
            (1, false) => Literal::X,
            (2, false) => Literal::Sw,
            (3, false) => Literal::Prfm,
            (0, true) => Literal::S,
            (1, true) => Literal::D,
            (2, true) => Literal::Q,
            _ => return Kind::Plain, // unallocated; `decode` refuses it
        };
        return Kind::Load {
            word,
            lit,
            rt: r,
            target: rel(Imm::Imm19.offset(word)),
        };
    }
    Kind::Plain
}

/// How control leaves an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// To the next instruction (possibly also elsewhere).
    Next,
    /// A call: to the next instruction when the callee returns.
    Call,
    /// Never to the next instruction.
    Leaves,
}

/// A decoded instruction of the patched range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    pub pc: u64,
    pub word: u32,
    pub kind: Kind,
    pub flow: Flow,
}

/// Decodes the word at `pc` and checks that it may execute at another address.
pub(crate) fn decode(word: u32, pc: u64) -> Result<Insn, AttachError> {
    let at = pc as usize;
    let bytes = word.to_le_bytes();
    let mut reader = U8Reader::new(&bytes);
    let decoded = InstDecoder::default()
        .decode(&mut reader)
        .map_err(|_| AttachError::Undecodable { at })?;
    let refuse = |reason| Err(AttachError::Unrelocatable { at, reason });
    use Opcode::*;
    let flow = match decoded.opcode {
        Invalid => return Err(AttachError::Undecodable { at }),
        UDF | BRK | HLT | HVC | SMC | DCPS1 | DCPS2 | DCPS3 => {
            return refuse("a trapping instruction reports its own address");
        }
        PACIASPPC | PACNBIASPPC | PACIBSPPC | PACNBIBSPPC | AUTIASPPC | AUTIBSPPC | RETAASPPC
        | RETABSPPC | RETAASPPCR | RETABSPPCR => {
            return refuse("pointer authentication with the pc as modifier");
        }
        BL | BLR | BLRAA | BLRAAZ | BLRAB | BLRABZ => Flow::Call,
        B | BR | BRAA | BRAAZ | BRAB | BRABZ | RET | RETAA | RETAB | ERET | ERETAA | ERETAB
        | DRPS => Flow::Leaves,
        _ => Flow::Next,
    };
    let kind = classify(word, pc);
    let flow = if matches!(kind, Kind::B { .. }) {
        Flow::Leaves
    } else {
        flow
    };
    let pc_relative = decoded
        .operands
        .iter()
        .any(|o| matches!(o, Operand::PCOffset(_)));
    if pc_relative && kind == Kind::Plain {
        return refuse("pc-relative instruction of a class the relocator does not rewrite");
    }
    Ok(Insn {
        pc,
        word,
        kind,
        flow,
    })
}

/// The `n`th little-endian word of `code`, if it is there.
pub(crate) fn word_at(code: &[u8], n: usize) -> Option<u32> {
    let b = code.get(4 * n..4 * n + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PC: u64 = 0x40_1000;

    #[test]
    fn classes_and_targets() {
        let cases: &[(u32, Kind)] = &[
            // adr x1, .+0x10
            (
                0x1000_0081,
                Kind::Adr {
                    rd: 1,
                    target: PC + 0x10,
                },
            ),
            // adr x1, .-1
            (
                0x70ff_ffe1,
                Kind::Adr {
                    rd: 1,
                    target: PC - 1,
                },
            ),
            // adrp x2, page(.)+0x1000
            (
                0xb000_0002,
                Kind::Adrp {
                    rd: 2,
                    target: (PC & !0xfff) + 0x1000,
                },
            ),
            // b .+8 / bl .-4
            (0x1400_0002, Kind::B { target: PC + 8 }),
            (0x97ff_ffff, Kind::Bl { target: PC - 4 }),
            // b.al .+4 is unconditional
            (0x5400_002e, Kind::B { target: PC + 4 }),
        ];
        for &(w, want) in cases {
            assert_eq!(classify(w, PC), want, "{w:#010x}");
        }
        // b.ne .+0x20; its inverse is b.eq.
        match classify(0x5400_0101, PC) {
            Kind::Cond {
                word,
                invert,
                target,
                imm,
            } => {
                assert_eq!((target, imm), (PC + 0x20, Imm::Imm19));
                assert_eq!((word ^ invert) & 0xf, 0);
            }
            k => panic!("{k:?}"),
        }
        // cbnz w3, .-8; tbz x5, #40, .+0x100
        assert!(matches!(classify(0x35ff_ffc3, PC), Kind::Cond { target, .. } if target == PC - 8));
        let tbz = 0xb600_0005 | (8 << 19) | (0x40 << 5);
        assert!(
            matches!(classify(tbz, PC), Kind::Cond { target, imm: Imm::Imm14, .. } if target == PC + 0x100)
        );
        // ldr x7, .+0x40 / ldrsw / ldr q / prfm
        let lits = [
            (0x5800_0207, Literal::X),
            (0x1800_0207, Literal::W),
            (0x9800_0207, Literal::Sw),
            (0x1c00_0207, Literal::S),
            (0x5c00_0207, Literal::D),
            (0x9c00_0207, Literal::Q),
            (0xd800_0207, Literal::Prfm),
        ];
        for (w, lit) in lits {
            assert_eq!(
                classify(w, PC),
                Kind::Load {
                    word: w,
                    lit,
                    rt: 7,
                    target: PC + 0x40
                },
                "{w:#010x}"
            );
        }
        // add x0, x1, #1 and ldr x0, [x1]
        assert_eq!(classify(0x9100_0420, PC), Kind::Plain);
        assert_eq!(classify(0xf940_0020, PC), Kind::Plain);
    }

    #[test]
    fn decode_refuses_traps_and_undecodable_words() {
        for (w, what) in [
            (0xd420_0000u32, "brk #0"),
            (0xd440_0000, "hlt #0"),
            (0x0000_0000, "udf #0"),
        ] {
            assert!(
                matches!(decode(w, PC), Err(AttachError::Unrelocatable { .. })),
                "{what}"
            );
        }
        // ldr (literal) with opc=11, V=1 is unallocated.
        assert!(
            matches!(decode(0xdc00_0000, PC), Err(AttachError::Undecodable { at }) if at == PC as usize)
        );
    }

    #[test]
    fn decode_flow() {
        let flow = |w| decode(w, PC).unwrap().flow;
        assert_eq!(flow(0xd65f_03c0), Flow::Leaves, "ret");
        assert_eq!(flow(0xd61f_0200), Flow::Leaves, "br x16");
        assert_eq!(flow(0x1400_0002), Flow::Leaves, "b");
        assert_eq!(flow(0x5400_002e), Flow::Leaves, "b.al");
        assert_eq!(flow(0x5400_0101), Flow::Next, "b.ne");
        assert_eq!(flow(0x9400_0002), Flow::Call, "bl");
        assert_eq!(flow(0xd63f_0200), Flow::Call, "blr x16");
        assert_eq!(flow(0xd503_233f), Flow::Next, "paciasp");
        assert_eq!(flow(0xa9bf_7bfd), Flow::Next, "stp x29, x30, [sp, #-16]!");
    }
}
