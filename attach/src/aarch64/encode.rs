//! A64 instruction words: the few encodings the relocator and the stub emit, and the
//! immediate fields of the pc-relative classes they rewrite.
//!
//! Pure bit manipulation after the Arm Architecture Reference Manual (DDI 0487), section C4.1
//! "A64 instruction set encoding"; every encoder is checked against yaxpeax-arm's decoder in the
//! tests at the bottom.

/// `x16` (IP0): scratch for veneers, clobberable at calls (AAPCS64 §6.1.1).
pub(crate) const IP0: u32 = 16;
/// `x17` (IP1).
pub(crate) const IP1: u32 = 17;
/// `x30`, the link register.
pub(crate) const LR: u32 = 30;
/// Register number 31 as a base register or `add` operand: `sp`.
pub(crate) const SP: u32 = 31;

/// `nop`.
pub(crate) const NOP: u32 = 0xd503_201f;

/// Sign-extends the low `bits` bits of `v`.
pub(crate) fn sext(v: u64, bits: u32) -> i64 {
    ((v << (64 - bits)) as i64) >> (64 - bits)
}

/// `delta >> shift` as a `bits`-bit two's-complement field, if `delta` is a multiple of
/// `1 << shift` and in range.
pub(crate) fn field(delta: i64, bits: u32, shift: u32) -> Option<u32> {
    if delta & ((1 << shift) - 1) != 0 {
        return None;
    }
    let v = delta >> shift;
    let half = 1i64 << (bits - 1);
    (-half..half)
        .contains(&v)
        .then_some((v as u64 & ((1 << bits) - 1)) as u32)
}

/// Where an instruction's pc-relative immediate lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Imm {
    /// `b`, `bl`: bits 25:0, ×4, ±128 MiB.
    Imm26,
    /// `b.cond`, `cbz`/`cbnz`, literal loads and `prfm`: bits 23:5, ×4, ±1 MiB.
    Imm19,
    /// `tbz`/`tbnz`: bits 18:5, ×4, ±32 KiB.
    Imm14,
}

impl Imm {
    fn bits(self) -> u32 {
        match self {
            Imm::Imm26 => 26,
            Imm::Imm19 => 19,
            Imm::Imm14 => 14,
        }
    }

    fn lsb(self) -> u32 {
        match self {
            Imm::Imm26 => 0,
            Imm::Imm19 | Imm::Imm14 => 5,
        }
    }

    /// The byte offset `word` encodes.
    pub(crate) fn offset(self, word: u32) -> i64 {
        let raw = (word >> self.lsb()) & ((1 << self.bits()) - 1);
        sext(u64::from(raw), self.bits()) * 4
    }

    /// Whether a byte offset fits.
    pub(crate) fn fits(self, delta: i64) -> bool {
        field(delta, self.bits(), 2).is_some()
    }

    /// `word` with its immediate replaced by `delta` bytes, if it fits.
    pub(crate) fn with(self, word: u32, delta: i64) -> Option<u32> {
        let mask = ((1u32 << self.bits()) - 1) << self.lsb();
        field(delta, self.bits(), 2).map(|f| (word & !mask) | (f << self.lsb()))
    }
}

/// `b` (or `bl` when `link`) to `delta` bytes away; zero offset when it does not fit (the
/// caller checks [`Imm::fits`] first).
pub(crate) fn b(delta: i64, link: bool) -> Option<u32> {
    let op = if link { 0x9400_0000 } else { 0x1400_0000 };
    Imm::Imm26.with(op, delta)
}

/// `b.cond` to `delta` bytes away.
#[cfg(test)]
pub(crate) fn b_cond(cond: u32, delta: i64) -> Option<u32> {
    Imm::Imm19.with(0x5400_0000 | (cond & 0xf), delta)
}

/// `adr xd, pc+delta` (±1 MiB).
pub(crate) fn adr(rd: u32, delta: i64) -> Option<u32> {
    let f = field(delta, 21, 0)?;
    Some(0x1000_0000 | ((f & 3) << 29) | ((f >> 2) << 5) | rd)
}

/// `adrp xd, page(pc)+page_delta` (±4 GiB, `page_delta` a multiple of 4096).
pub(crate) fn adrp(rd: u32, page_delta: i64) -> Option<u32> {
    let f = field(page_delta, 21, 12)?;
    Some(0x9000_0000 | ((f & 3) << 29) | ((f >> 2) << 5) | rd)
}

/// The byte offset of an `adr` (or page offset ×4096 of an `adrp`) word, before scaling.
pub(crate) fn adr_imm(word: u32) -> i64 {
    let raw = ((word >> 29) & 3) | (((word >> 5) & 0x7ffff) << 2);
    sext(u64::from(raw), 21)
}

/// `ldr xt, pc+delta` (literal, 64-bit).
pub(crate) fn ldr_x_literal(rt: u32, delta: i64) -> Option<u32> {
    Imm::Imm19.with(0x5800_0000 | rt, delta)
}

/// `br xn`.
pub(crate) fn br(rn: u32) -> u32 {
    0xd61f_0000 | (rn << 5)
}

/// `blr xn`.
pub(crate) fn blr(rn: u32) -> u32 {
    0xd63f_0000 | (rn << 5)
}

/// Loads and stores with an unsigned, scaled 12-bit offset (`[xn, #imm]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mem {
    /// `ldr wt` (zero-extends).
    LdrW,
    /// `ldr xt`.
    LdrX,
    /// `ldrsw xt`.
    LdrSw,
    /// `ldr st`.
    LdrS,
    /// `ldr dt`.
    LdrD,
    /// `ldr qt`.
    LdrQ,
    /// `prfm <op>`.
    Prfm,
    /// `str xt`.
    StrX,
}

impl Mem {
    fn base(self) -> u32 {
        match self {
            Mem::LdrW => 0xb940_0000,
            Mem::LdrX => 0xf940_0000,
            Mem::LdrSw => 0xb980_0000,
            Mem::LdrS => 0xbd40_0000,
            Mem::LdrD => 0xfd40_0000,
            Mem::LdrQ => 0x3dc0_0000,
            Mem::Prfm => 0xf980_0000,
            Mem::StrX => 0xf900_0000,
        }
    }

    /// Bytes accessed (the offset scale).
    pub(crate) fn size(self) -> u32 {
        match self {
            Mem::LdrW | Mem::LdrSw | Mem::LdrS => 4,
            Mem::LdrX | Mem::LdrD | Mem::Prfm | Mem::StrX => 8,
            Mem::LdrQ => 16,
        }
    }

    /// `op rt, [rn, #off]`; `off` must be a multiple of the size below 4096 × size.
    pub(crate) fn at(self, rt: u32, rn: u32, off: u32) -> Option<u32> {
        let size = self.size();
        (off.is_multiple_of(size) && off / size < 4096)
            .then(|| self.base() | ((off / size) << 10) | (rn << 5) | rt)
    }
}

/// `stp`/`ldp` of two 64-bit (`q == false`) or 128-bit registers at `[sp, #off]`.
pub(crate) fn pair(load: bool, q: bool, rt: u32, rt2: u32, off: i64) -> Option<u32> {
    let (base, scale) = match (load, q) {
        (false, false) => (0xa900_0000, 3),
        (true, false) => (0xa940_0000, 3),
        (false, true) => (0xad00_0000, 4),
        (true, true) => (0xad40_0000, 4),
    };
    let f = field(off, 7, scale)?;
    Some(base | (f << 15) | (rt2 << 10) | (SP << 5) | rt)
}

/// `add xd, xn, #imm` (`sub` when `sub`), `imm` < 4096; register 31 is `sp`.
pub(crate) fn add_imm(sub: bool, rd: u32, rn: u32, imm: u32) -> Option<u32> {
    let op = if sub { 0xd100_0000 } else { 0x9100_0000 };
    (imm < 4096).then_some(op | (imm << 10) | (rn << 5) | rd)
}

/// The system registers the stub saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SysReg {
    /// Condition flags (bits 31:28).
    Nzcv,
    /// Floating-point status (cumulative exception flags).
    Fpsr,
}

impl SysReg {
    fn bits(self) -> u32 {
        match self {
            // o0:op1:CRn:CRm:op2 = 1:3:4:2:0 and 1:3:4:4:1, bits 19:5.
            SysReg::Nzcv => 0x000b_4200,
            SysReg::Fpsr => 0x000b_4420,
        }
    }
}

/// `mrs xt, reg`.
pub(crate) fn mrs(rt: u32, reg: SysReg) -> u32 {
    0xd530_0000 | reg.bits() | rt
}

/// `msr reg, xt`.
pub(crate) fn msr(reg: SysReg, rt: u32) -> u32 {
    0xd510_0000 | reg.bits() | rt
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaxpeax_arch::{Decoder, U8Reader};
    use yaxpeax_arm::armv8::a64::InstDecoder;

    fn show(word: u32) -> String {
        let bytes = word.to_le_bytes();
        let mut r = U8Reader::new(&bytes);
        InstDecoder::default()
            .decode(&mut r)
            .map(|i| i.to_string())
            .unwrap_or_else(|e| format!("undecodable {word:#010x}: {e}"))
    }

    #[test]
    fn fields_round_trip_and_refuse_out_of_range() {
        assert_eq!(field(-4, 19, 2), Some(0x7ffff));
        assert_eq!(field((1 << 20) - 4, 19, 2), Some(0x3ffff));
        assert_eq!(field(1 << 20, 19, 2), None);
        assert_eq!(field(-(1 << 20), 19, 2), Some(0x40000));
        assert_eq!(field(-(1 << 20) - 4, 19, 2), None);
        assert_eq!(field(6, 19, 2), None, "unaligned");
        for imm in [Imm::Imm26, Imm::Imm19, Imm::Imm14] {
            let max = (1i64 << (imm.bits() + 1)) - 4;
            for d in [0, 4, -4, max, -max - 4] {
                let w = imm.with(0, d).unwrap();
                assert_eq!(imm.offset(w), d, "{imm:?} {d}");
            }
            assert!(!imm.fits(max + 4));
            assert!(!imm.fits(-max - 8));
        }
    }

    #[test]
    fn encodings_decode_as_intended() {
        let cases: &[(u32, &str)] = &[
            (b(8, false).unwrap(), "b $+0x8"),
            (b(-0x800_0000, true).unwrap(), "bl $-0x8000000"),
            (b_cond(0xb, 0x40).unwrap(), "b.lt $+0x40"),
            (adr(3, -5).unwrap(), "adr x3, $-0x5"),
            (adrp(9, 0x7000).unwrap(), "adrp x9, $+0x7000"),
            (ldr_x_literal(16, 8).unwrap(), "ldr x16, $+0x8"),
            (br(16), "br x16"),
            (blr(17), "blr x17"),
            (Mem::LdrW.at(4, 4, 0).unwrap(), "ldr w4, [x4]"),
            (Mem::LdrX.at(5, 17, 8).unwrap(), "ldr x5, [x17, #0x8]"),
            (Mem::LdrSw.at(6, 6, 0).unwrap(), "ldrsw x6, [x6]"),
            (Mem::LdrS.at(1, 17, 0).unwrap(), "ldr s1, [x17]"),
            (Mem::LdrD.at(2, 17, 0).unwrap(), "ldr d2, [x17]"),
            (Mem::LdrQ.at(3, 17, 0).unwrap(), "ldr q3, [x17]"),
            (Mem::Prfm.at(0, 17, 0).unwrap(), "prfm pldl1keep, [x17]"),
            (Mem::StrX.at(16, SP, 784).unwrap(), "str x16, [sp, #0x310]"),
            (pair(false, false, 0, 1, 0).unwrap(), "stp x0, x1, [sp]"),
            (
                pair(true, false, 28, 29, 224).unwrap(),
                "ldp x28, x29, [sp, #0xe0]",
            ),
            (
                pair(false, true, 30, 31, 752).unwrap(),
                "stp q30, q31, [sp, #0x2f0]",
            ),
            (
                pair(true, true, 0, 1, 272).unwrap(),
                "ldp q0, q1, [sp, #0x110]",
            ),
            (add_imm(true, SP, SP, 800).unwrap(), "sub sp, sp, #0x320"),
            (add_imm(false, 16, SP, 800).unwrap(), "add x16, sp, #0x320"),
            (add_imm(false, 0, SP, 0).unwrap(), "mov x0, sp"),
            (mrs(17, SysReg::Nzcv), "mrs x17, s3_3_c4_c2_0"),
            (mrs(16, SysReg::Fpsr), "mrs x16, s3_3_c4_c4_1"),
            (NOP, "nop"),
        ];
        let mut bad = Vec::new();
        for &(w, want) in cases {
            let got = show(w);
            if got != want {
                bad.push(format!("{w:#010x}: got `{got}`, want `{want}`"));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn system_register_moves_match_the_arm_arm() {
        // yaxpeax-arm 0.5 names neither register (and prints msr's Rt wrongly); these are the
        // words of `mrs x0, nzcv`, `msr nzcv, x0`, `mrs x0, fpsr`, `msr fpsr, x0`.
        assert_eq!(mrs(0, SysReg::Nzcv), 0xd53b_4200);
        assert_eq!(msr(SysReg::Nzcv, 0), 0xd51b_4200);
        assert_eq!(mrs(0, SysReg::Fpsr), 0xd53b_4420);
        assert_eq!(msr(SysReg::Fpsr, 0), 0xd51b_4420);
        assert_eq!(msr(SysReg::Nzcv, 17), 0xd51b_4211);
    }

    #[test]
    fn out_of_range_operands_are_refused() {
        assert_eq!(b(1 << 27, false), None);
        assert_eq!(b_cond(0, 1 << 20), None);
        assert_eq!(adr(0, 1 << 20), None);
        assert_eq!(adrp(0, 1 << 32), None);
        assert_eq!(adrp(0, 0x1001), None);
        assert_eq!(Mem::LdrX.at(0, 0, 4), None, "unaligned");
        assert_eq!(Mem::LdrX.at(0, 0, 8 * 4096), None);
        assert_eq!(pair(false, false, 0, 1, 512), None);
        assert_eq!(pair(false, true, 0, 1, 1024), None);
        assert_eq!(add_imm(false, 0, 0, 4096), None);
    }
}
