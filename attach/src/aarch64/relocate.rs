//! Which instructions the patch overwrites, whether they may move, and their relocation into a
//! trampoline at any address.
//!
//! Pure functions over a byte slice and the addresses involved. A relocated instruction keeps
//! its meaning: a branch still reaches its original target (or, if that target is another
//! moved instruction, that instruction's copy), an `adr`/`adrp` still yields the original
//! address, a literal load still reads the original location. When the re-encoded immediate
//! does not reach from the trampoline, the instruction is expanded:
//!
//! | original | near form | far form |
//! |---|---|---|
//! | `b L` | `b L` (±128 MiB) | `ldr x16, =L; br x16` |
//! | `bl L` (last) | `adr x30, ret; b L` | `ldr x30, =ret; ldr x16, =L; br x16` |
//! | `b.c`/`cbz`/`tbz L` | re-encoded (±1 MiB / ±32 KiB) | inverse condition over a `b L` or the `br x16` form |
//! | `adr xd, L` | `adr` (±1 MiB) | `adrp xd, L; add xd, xd, #lo12(L)` (±4 GiB), else `ldr xd, =L` |
//! | `adrp xd, P` | `adrp` (±4 GiB) | `ldr xd, =P` |
//! | `ldr w/x/sw t, L` | re-encoded (±1 MiB) | `ldr xt, =L; ldr w/x/sw t, [xt]` |
//! | `ldr s/d/q t, L`, `prfm op, L` | re-encoded | `ldr x17, =L; ldr s/d/q t, [x17]` / `prfm op, [x17]` |
//!
//! `=L` is an entry of the trampoline's literal pool. The far forms clobber x16 (IP0) and x17
//! (IP1), which the AAPCS64 lets veneers clobber between a call and its callee: exactly right
//! at a function entry, an assumption anywhere else. A literal load whose data lies inside the
//! patched bytes reads a copy of the original bytes in the pool. `bl` becomes a jump with the
//! link register set to the original return address, so the callee returns straight to the
//! original code (and sees the return address it always saw).

use super::encode::{self, IP0, IP1, Imm, LR};
use super::insn::{Flow, Insn, Kind, decode, word_at};
use crate::AttachError;

/// How many bytes after the patched ones are scanned for branches into them.
pub const SCAN_LEN: usize = 4096;

/// Highest hooked, trampoline or stub address: code from there on (patch, scan, stub and
/// trampoline are far below 1 MiB) never wraps around the address space.
pub(crate) const MAX_ADDR: u64 = u64::MAX - (1 << 20);

/// The instructions a patch of `len` bytes at `addr` overwrites.
#[derive(Debug, Clone)]
pub(crate) struct Prologue {
    pub addr: u64,
    pub len: usize,
    pub insns: Vec<Insn>,
}

impl Prologue {
    fn inside(&self, target: u64) -> bool {
        target > self.addr && target < self.addr + self.len as u64
    }
}

/// Decodes the `len / 4` instructions at `addr` (`code` holds the bytes from `addr`, up to the
/// end of its mapping or [`SCAN_LEN`] more) and checks that they can move: all decode, none
/// traps, control stays in the range until its last instruction (no `ret`, `b` or call
/// before it: a thread inside a callee would return into the patch), and no direct branch in
/// the scanned bytes after them targets the inside of the range.
pub(crate) fn analyze(addr: u64, code: &[u8], len: usize) -> Result<Prologue, AttachError> {
    if !addr.is_multiple_of(4) {
        return Err(AttachError::Undecodable { at: addr as usize });
    }
    if addr > MAX_ADDR || len == 0 || len > SCAN_LEN || !len.is_multiple_of(4) {
        return Err(AttachError::Unrelocatable {
            at: addr as usize,
            reason: "patch length not a multiple of 4, or the range wraps around",
        });
    }
    let count = len / 4;
    let mut insns = Vec::with_capacity(count);
    for i in 0..count {
        let Some(word) = word_at(code, i) else {
            return Err(AttachError::TooShort {
                addr: addr as usize,
                len: 4 * i,
                needed: len,
            });
        };
        let insn = decode(word, addr + 4 * i as u64)?;
        if i + 1 < count {
            match insn.flow {
                Flow::Next => {}
                Flow::Leaves => {
                    return Err(AttachError::TooShort {
                        addr: addr as usize,
                        len: 4 * (i + 1),
                        needed: len,
                    });
                }
                Flow::Call => {
                    return Err(AttachError::Unrelocatable {
                        at: insn.pc as usize,
                        reason: "call before the end of the patched bytes",
                    });
                }
            }
        }
        insns.push(insn);
    }
    let p = Prologue { addr, len, insns };
    for insn in &p.insns {
        if let Kind::Adr { target, .. } = insn.kind
            && p.inside(target)
        {
            return Err(AttachError::Unrelocatable {
                at: insn.pc as usize,
                reason: "adr of an address inside the patched bytes",
            });
        }
    }
    let end = code.len().min(len + SCAN_LEN) / 4;
    for n in count..end {
        let Some(word) = word_at(code, n) else { break };
        let pc = addr + 4 * n as u64;
        if let Some(target) = super::insn::classify(word, pc).branch_target()
            && p.inside(target)
        {
            return Err(AttachError::BranchIntoPatch {
                addr: addr as usize,
                branch: pc as usize,
                target: target as usize,
            });
        }
    }
    Ok(p)
}

/// The relocated prologue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trampoline {
    /// Code, then the 16-byte aligned literal pool, for the address it was built for.
    pub bytes: Vec<u8>,
    /// `(original address, trampoline address)` of every moved instruction: a thread stopped
    /// at the first may continue at the second.
    pub moved: Vec<(u64, u64)>,
}

/// Where a branch of the trampoline goes.
#[derive(Debug, Clone, Copy)]
enum Dest {
    /// An address outside the trampoline.
    Abs(u64),
    /// The copy of the `n`th moved instruction.
    Insn(usize),
    /// The `n`th word of the trampoline.
    Op(usize),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Word(u32),
    /// `word` with its `imm` field pointing at `dest`.
    Branch {
        word: u32,
        imm: Imm,
        dest: Dest,
    },
    /// A literal load (`word`'s imm19 replaced) of pool entry `entry`.
    Pool {
        word: u32,
        entry: usize,
    },
}

struct Emitter {
    at: u64,
    guarded: bool,
    ops: Vec<Op>,
    pool: Vec<Vec<u8>>,
}

impl Emitter {
    fn pc(&self) -> u64 {
        self.at + 4 * self.ops.len() as u64
    }

    fn word(&mut self, w: u32) {
        self.ops.push(Op::Word(w));
    }

    /// A literal load (the template `word`, any imm19) of `bytes` from the pool.
    fn pool_load(&mut self, word: u32, bytes: Vec<u8>) {
        self.pool.push(bytes);
        let entry = self.pool.len() - 1;
        self.ops.push(Op::Pool { word, entry });
    }

    /// `ldr xd, =value`.
    fn load_const(&mut self, rd: u32, value: u64) {
        self.pool_load(0x5800_0000 | rd, value.to_le_bytes().to_vec());
    }

    /// An unconditional jump (a call when `link`) to `dest`, from the instruction at `from`.
    fn jump(&mut self, dest: Dest, link: bool, from: u64) -> Result<(), AttachError> {
        let word = if link { 0x9400_0000 } else { 0x1400_0000 };
        match dest {
            Dest::Abs(t) if !Imm::Imm26.fits(t.wrapping_sub(self.pc()) as i64) => {
                if self.guarded {
                    return Err(AttachError::Unrelocatable {
                        at: from as usize,
                        reason: "target beyond a direct branch from the trampoline \
                                 (BTI-guarded code needs a trampoline within 128 MiB)",
                    });
                }
                self.load_const(IP0, t);
                self.word(if link {
                    encode::blr(IP0)
                } else {
                    encode::br(IP0)
                });
            }
            dest => self.ops.push(Op::Branch {
                word,
                imm: Imm::Imm26,
                dest,
            }),
        }
        Ok(())
    }
}

/// Relocates `p` (whose bytes are `code`, from `p.addr`) to a trampoline at `at`, followed by
/// a jump back to `p.addr + p.len` unless the last instruction never falls through. With
/// `guarded` (the code is in a BTI-guarded page), every way back into the original code is a
/// direct branch, and a target out of its range is an error.
pub(crate) fn relocate(
    p: &Prologue,
    code: &[u8],
    at: u64,
    guarded: bool,
) -> Result<Trampoline, AttachError> {
    if !at.is_multiple_of(4) || at > MAX_ADDR {
        return Err(AttachError::Unrelocatable {
            at: p.addr as usize,
            reason: "the trampoline address is not 4-byte aligned or too high",
        });
    }
    let mut e = Emitter {
        at,
        guarded,
        ops: Vec::new(),
        pool: Vec::new(),
    };
    let dest = |t: u64| {
        if p.inside(t) {
            Dest::Insn(((t - p.addr) / 4) as usize)
        } else {
            Dest::Abs(t)
        }
    };
    let resume = p.addr + p.len as u64;
    let mut starts = Vec::with_capacity(p.insns.len());
    for insn in &p.insns {
        starts.push(e.ops.len());
        let pc = e.pc();
        let delta = |t: u64| t.wrapping_sub(pc) as i64;
        match insn.kind {
            Kind::Plain => e.word(insn.word),
            Kind::Adr { rd, target } => {
                let page = delta(target & !0xfff).wrapping_add((pc & 0xfff) as i64);
                if let Some(w) = encode::adr(rd, delta(target)) {
                    e.word(w);
                } else if let (Some(w), Some(add)) = (
                    encode::adrp(rd, page),
                    encode::add_imm(false, rd, rd, (target & 0xfff) as u32),
                ) {
                    e.word(w);
                    e.word(add);
                } else {
                    e.load_const(rd, target);
                }
            }
            Kind::Adrp { rd, target } => {
                match encode::adrp(rd, target.wrapping_sub(pc & !0xfff) as i64) {
                    Some(w) => e.word(w),
                    None => e.load_const(rd, target),
                }
            }
            Kind::B { target } => e.jump(dest(target), false, insn.pc)?,
            Kind::Bl { target } => {
                // The last instruction (`analyze` refuses calls before it): return straight
                // to the original code after the patch.
                let ret = insn.pc + 4;
                match encode::adr(LR, delta(ret)) {
                    Some(w) => e.word(w),
                    None => e.load_const(LR, ret),
                }
                e.jump(dest(target), false, insn.pc)?;
            }
            Kind::Cond {
                word,
                imm,
                invert,
                target,
            } => match dest(target) {
                Dest::Abs(t) if !imm.fits(delta(t)) => {
                    // Skip the long jump when the condition does not hold.
                    let skip = e.ops.len();
                    e.ops.push(Op::Branch {
                        word: word ^ invert,
                        imm,
                        dest: Dest::Op(0),
                    });
                    e.jump(Dest::Abs(t), false, insn.pc)?;
                    let after = e.ops.len();
                    if let Op::Branch { dest, .. } = &mut e.ops[skip] {
                        *dest = Dest::Op(after);
                    }
                }
                d => e.ops.push(Op::Branch { word, imm, dest: d }),
            },
            Kind::Load {
                word,
                lit,
                rt,
                target,
            } => {
                let size = u64::from(lit.mem().size());
                if target < resume && target.checked_add(size).is_some_and(|end| end > p.addr) {
                    // The data is (partly) in the bytes the patch overwrites: load a copy.
                    let bytes = target
                        .checked_sub(p.addr)
                        .and_then(|off| code.get(off as usize..(off + size) as usize))
                        .ok_or(AttachError::Unrelocatable {
                            at: insn.pc as usize,
                            reason: "literal straddles the bounds of the given code",
                        })?;
                    e.pool_load(word, bytes.to_vec());
                } else if let Some(w) = Imm::Imm19.with(word, delta(target)) {
                    e.word(w);
                } else {
                    let base = if lit.is_gpr() && rt != 31 { rt } else { IP1 };
                    e.load_const(base, target);
                    let load = lit
                        .mem()
                        .at(rt, base, 0)
                        .ok_or(AttachError::Unrelocatable {
                            at: insn.pc as usize,
                            reason: "literal load without a register form",
                        })?;
                    e.word(load);
                }
            }
        }
    }
    let last = p.insns.last();
    let falls_through = last.is_some_and(|i| match i.flow {
        Flow::Next => true,
        Flow::Call => !matches!(i.kind, Kind::Bl { .. }),
        Flow::Leaves => false,
    });
    if falls_through || last.is_none() {
        e.jump(Dest::Abs(resume), false, resume)?;
    }

    // Layout: code, then the pool from the next 16-byte boundary, entries aligned to their size.
    let code_len = 4 * e.ops.len() as u64;
    let mut pool_addrs = Vec::with_capacity(e.pool.len());
    let mut next = (at + code_len).next_multiple_of(16);
    for entry in &e.pool {
        next = next.next_multiple_of(entry.len() as u64);
        pool_addrs.push(next);
        next += entry.len() as u64;
    }
    let mut bytes = Vec::with_capacity((next - at) as usize);
    for (i, op) in e.ops.iter().enumerate() {
        let pc = at + 4 * i as u64;
        let (word, imm, target) = match *op {
            Op::Word(w) => {
                bytes.extend_from_slice(&w.to_le_bytes());
                continue;
            }
            Op::Branch { word, imm, dest } => {
                let t = match dest {
                    Dest::Abs(t) => t,
                    Dest::Insn(n) => at + 4 * starts[n] as u64,
                    Dest::Op(n) => at + 4 * n as u64,
                };
                (word, imm, t)
            }
            Op::Pool { word, entry } => (word, Imm::Imm19, pool_addrs[entry]),
        };
        let w =
            imm.with(word, target.wrapping_sub(pc) as i64)
                .ok_or(AttachError::Unrelocatable {
                    at: p.addr as usize,
                    reason: "trampoline branch out of range",
                })?;
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    for (entry, &addr) in e.pool.iter().zip(&pool_addrs) {
        bytes.resize((addr - at) as usize, 0);
        bytes.extend_from_slice(entry);
    }
    let moved = p
        .insns
        .iter()
        .zip(&starts)
        .map(|(i, &s)| (i.pc, at + 4 * s as u64))
        .collect();
    Ok(Trampoline { bytes, moved })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::aarch64::insn::classify;
    use yaxpeax_arch::{Decoder, U8Reader};
    use yaxpeax_arm::armv8::a64::InstDecoder;

    pub(crate) const A: u64 = 0x40_0000;
    const NEAR: u64 = A + 0x1000;
    const MID: u64 = A + 0x40_0000;
    const FAR: u64 = 0x7f00_0000_0000;

    /// Disassembly of trampoline code at `at` with absolute targets; literal loads from the
    /// pool show the value (`=0x..`). Stops where the pool starts.
    pub(crate) fn listing(bytes: &[u8], at: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut end = bytes.len() as u64;
        let mut i = 0u64;
        while 4 * i < end {
            let word = word_at(bytes, i as usize).unwrap();
            if word == 0 {
                break; // padding before the pool
            }
            let pc = at + 4 * i;
            let b = word.to_le_bytes();
            let text = InstDecoder::default()
                .decode(&mut U8Reader::new(&b))
                .map(|d| d.to_string())
                .unwrap_or_else(|_| format!(".word {word:#010x}"));
            let target = match classify(word, pc) {
                Kind::Adr { target, .. } | Kind::Adrp { target, .. } => Some(target),
                Kind::Load { target, .. } => Some(target),
                k => k.branch_target(),
            };
            let mut line = match (target, text.find('$')) {
                (Some(t), Some(k)) => {
                    let tail = text[k..].find([',', ' ']).map_or(text.len(), |n| k + n);
                    format!("{}{t:#x}{}", &text[..k], &text[tail..])
                }
                _ => text,
            };
            if let Kind::Load { target, lit, .. } = classify(word, pc)
                && target >= at
                && target < at + bytes.len() as u64
            {
                let off = (target - at) as usize;
                end = end.min(target - at);
                let size = lit.mem().size() as usize;
                let v = &bytes[off..off + size];
                let hex: String = v.iter().rev().map(|b| format!("{b:02x}")).collect();
                line = format!("{} =0x{}", &line[..line.rfind(' ').unwrap()], hex);
            }
            out.push(line);
            i += 1;
        }
        out
    }

    fn reloc(words: &[u32], len: usize, at: u64) -> Result<Vec<String>, AttachError> {
        let code: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let p = analyze(A, &code, len)?;
        let t = relocate(&p, &code, at, false)?;
        Ok(listing(&t.bytes, at))
    }

    fn one(word: u32, at: u64) -> Vec<String> {
        reloc(&[word], 4, at).unwrap()
    }

    #[track_caller]
    fn check(word: u32, at: u64, want: &[&str]) {
        let got = one(word, at);
        assert_eq!(got, want, "{word:#010x} at {at:#x}");
    }

    // Words at A (= 0x400000), as an assembler would write them.
    const ADR_X1_A_MINUS_0X10: u32 = 0x10ff_ff81; // adr x1, 0x3ffff0
    const B_PLUS_0X100: u32 = 0x1400_0040; // b 0x400100
    const BL_MINUS_0X40: u32 = 0x97ff_fff0; // bl 0x3fffc0
    const BNE_PLUS_0X20: u32 = 0x5400_0101; // b.ne 0x400020
    const CBZ_W3_PLUS_0X80: u32 = 0x3400_0403; // cbz w3, 0x400080
    const TBNZ_X5_40_MINUS_8: u32 = 0xb747_ffc5; // tbnz x5, #40, 0x3ffff8
    const LDR_X7_PLUS_0X40: u32 = 0x5800_0207; // ldr x7, 0x400040

    #[test]
    fn near_trampolines_re_encode_in_place() {
        check(
            ADR_X1_A_MINUS_0X10,
            NEAR,
            &["adr x1, 0x3ffff0", "b 0x400004"],
        );
        check(B_PLUS_0X100, NEAR, &["b 0x400100"]);
        check(BNE_PLUS_0X20, NEAR, &["b.ne 0x400020", "b 0x400004"]);
        check(CBZ_W3_PLUS_0X80, NEAR, &["cbz w3, 0x400080", "b 0x400004"]);
        check(
            TBNZ_X5_40_MINUS_8,
            NEAR,
            &["tbnz x5, #0x28, 0x3ffff8", "b 0x400004"],
        );
        check(LDR_X7_PLUS_0X40, NEAR, &["ldr x7, 0x400040", "b 0x400004"]);
        check(BL_MINUS_0X40, NEAR, &["adr x30, 0x400004", "b 0x3fffc0"]);
    }

    #[test]
    fn mid_distance_uses_b_and_adrp() {
        check(
            ADR_X1_A_MINUS_0X10,
            MID,
            &["adrp x1, 0x3ff000", "add x1, x1, #0xff0", "b 0x400004"],
        );
        check(
            BNE_PLUS_0X20,
            MID,
            &["b.eq 0x800008", "b 0x400020", "b 0x400004"],
        );
        check(
            CBZ_W3_PLUS_0X80,
            MID,
            &["cbnz w3, 0x800008", "b 0x400080", "b 0x400004"],
        );
        check(
            TBNZ_X5_40_MINUS_8,
            MID,
            &["tbz x5, #0x28, 0x800008", "b 0x3ffff8", "b 0x400004"],
        );
        check(
            LDR_X7_PLUS_0X40,
            MID,
            &["ldr x7, =0x0000000000400040", "ldr x7, [x7]", "b 0x400004"],
        );
        check(
            BL_MINUS_0X40,
            MID,
            &["ldr x30, =0x0000000000400004", "b 0x3fffc0"],
        );
    }

    #[test]
    fn far_trampolines_expand_through_x16_x17_and_the_pool() {
        let back = ["ldr x16, =0x0000000000400004", "br x16"];
        let with_back = |v: &[&str]| -> Vec<String> {
            v.iter().chain(back.iter()).map(|s| s.to_string()).collect()
        };
        assert_eq!(
            one(ADR_X1_A_MINUS_0X10, FAR),
            with_back(&["ldr x1, =0x00000000003ffff0"])
        );
        assert_eq!(
            one(B_PLUS_0X100, FAR),
            ["ldr x16, =0x0000000000400100", "br x16"]
        );
        assert_eq!(
            one(BNE_PLUS_0X20, FAR),
            with_back(&[
                "b.eq 0x7f000000000c",
                "ldr x16, =0x0000000000400020",
                "br x16"
            ])
        );
        assert_eq!(
            one(BL_MINUS_0X40, FAR),
            [
                "ldr x30, =0x0000000000400004",
                "ldr x16, =0x00000000003fffc0",
                "br x16"
            ]
        );
        // Literal loads of every class: a GPR is its own address register, others use x17.
        let lits = [
            (0x1800_0207u32, "ldr w7, [x7]"),
            (0x9800_0207, "ldrsw x7, [x7]"),
            (0x1c00_0207, "ldr s7, [x17]"),
            (0x5c00_0207, "ldr d7, [x17]"),
            (0x9c00_0207, "ldr q7, [x17]"),
            (0xd800_0200, "prfm pldl1keep, [x17]"),
            (0x5800_021f, "ldr xzr, [x17]"),
        ];
        for (w, load) in lits {
            let reg = if load.contains("[x7]") { "x7" } else { "x17" };
            assert_eq!(
                one(w, FAR),
                with_back(&[&format!("ldr {reg}, =0x0000000000400040"), load]),
                "{w:#010x}"
            );
        }
    }

    #[test]
    fn adrp_keeps_its_page() {
        // adrp x2, page(A) + 0x1000 * 5
        let w = encode::adrp(2, 5 << 12).unwrap();
        assert_eq!(
            classify(w, A),
            Kind::Adrp {
                rd: 2,
                target: A + 0x5000
            }
        );
        check(w, NEAR, &["adrp x2, 0x405000", "b 0x400004"]);
        check(w, MID, &["adrp x2, 0x405000", "b 0x400004"]);
        assert_eq!(
            one(w, FAR),
            [
                "ldr x2, =0x0000000000405000",
                "ldr x16, =0x0000000000400004",
                "br x16"
            ]
        );
        // From a trampoline not page-aligned relative to A: same page.
        check(w, NEAR + 0x7fc, &["adrp x2, 0x405000", "b 0x400004"]);
    }

    #[test]
    fn branches_inside_the_range_go_to_the_moved_copies() {
        let code = [
            0xb400_0060u32,                                       // cbz x0, A+12
            0x9100_0400,                                          // add x0, x0, #1
            0x5400_0001 | (((-4i32 as u32) >> 2) & 0x7ffff) << 5, // b.ne A+4
            0x9100_0800,                                          // add x0, x0, #2
        ];
        for at in [NEAR, MID, FAR] {
            let l = reloc(&code, 16, at).unwrap();
            assert_eq!(l[0], format!("cbz x0, {:#x}", at + 12), "at {at:#x}");
            assert_eq!(l[1], "add x0, x0, #0x1");
            assert_eq!(l[2], format!("b.ne {:#x}", at + 4));
            assert_eq!(l[3], "add x0, x0, #0x2");
        }
        // A branch back to the hooked address itself goes through the hook again.
        let code = [
            0x9100_0400u32,
            0xb5ff_ffe0, /* cbnz x0, A */
            0xd503_201f,
            0xd503_201f,
        ];
        let l = reloc(&code, 16, NEAR).unwrap();
        assert_eq!(l[1], "cbnz x0, 0x400000");
    }

    #[test]
    fn literals_inside_the_patch_are_read_from_a_copy() {
        // ldr x1, A+8; nop; <8 bytes of data>
        // The data (two `add` words) must decode: the patched range is decoded as code.
        let code = [0x5800_0041u32, 0xd503_201f, 0x9100_0400, 0x9100_0800];
        let bytes: Vec<u8> = code.iter().flat_map(|w| w.to_le_bytes()).collect();
        let p = analyze(A, &bytes, 16);
        match p {
            Ok(p) => {
                let t = relocate(&p, &bytes, NEAR, false).unwrap();
                let l = listing(&t.bytes, NEAR);
                assert_eq!(l[0], "ldr x1, =0x9100080091000400");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn patches_that_cannot_be_applied_are_refused() {
        let nop = 0xd503_201fu32;
        let ret = 0xd65f_03c0u32;
        let bytes = |w: &[u32]| -> Vec<u8> { w.iter().flat_map(|w| w.to_le_bytes()).collect() };
        // Shorter than the patch: ret at A+4.
        let e = analyze(A, &bytes(&[nop, ret, nop, nop]), 16).unwrap_err();
        assert!(
            matches!(
                e,
                AttachError::TooShort {
                    len: 8,
                    needed: 16,
                    ..
                }
            ),
            "{e}"
        );
        // Fewer bytes than the patch.
        let e = analyze(A, &bytes(&[nop, nop]), 16).unwrap_err();
        assert!(matches!(e, AttachError::TooShort { len: 8, .. }), "{e}");
        // An unconditional branch before the end.
        let e = analyze(A, &bytes(&[B_PLUS_0X100, nop, nop, nop]), 16).unwrap_err();
        assert!(matches!(e, AttachError::TooShort { len: 4, .. }), "{e}");
        // A call before the end.
        let e = analyze(A, &bytes(&[BL_MINUS_0X40, nop, nop, nop]), 16).unwrap_err();
        assert!(
            matches!(e, AttachError::Unrelocatable { at: 0x40_0000, .. }),
            "{e}"
        );
        // A trap.
        let e = analyze(A, &bytes(&[nop, 0xd420_0000]), 8).unwrap_err();
        assert!(
            matches!(e, AttachError::Unrelocatable { at: 0x40_0004, .. }),
            "{e}"
        );
        // Undecodable.
        let e = analyze(A, &bytes(&[0xdc00_0000]), 4).unwrap_err();
        assert!(
            matches!(e, AttachError::Undecodable { at: 0x40_0000 }),
            "{e}"
        );
        // Misaligned address.
        let e = analyze(A + 2, &bytes(&[nop]), 4).unwrap_err();
        assert!(matches!(e, AttachError::Undecodable { .. }), "{e}");
        // adr of an instruction inside the patch.
        let e = analyze(
            A,
            &bytes(&[0x1000_0041 /* adr x1, A+8 */, nop, nop, nop]),
            16,
        )
        .unwrap_err();
        assert!(matches!(e, AttachError::Unrelocatable { .. }), "{e}");
        // A later branch into the patched bytes (b.ne A+8 from A+0x20), but not into A itself.
        let mut later = vec![nop; 12];
        later[8] = 0x5400_0001 | ((((-0x18i32) >> 2) as u32 & 0x7ffff) << 5);
        let e = analyze(A, &bytes(&later), 16).unwrap_err();
        assert!(
            matches!(
                e,
                AttachError::BranchIntoPatch {
                    branch: 0x40_0020,
                    target: 0x40_0008,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            analyze(A, &bytes(&later), 4).is_ok(),
            "a 4-byte patch has no inside"
        );
        later[8] = 0x5400_0001 | ((((-0x20i32) >> 2) as u32 & 0x7ffff) << 5);
        assert!(
            analyze(A, &bytes(&later), 16).is_ok(),
            "branch to the hooked address"
        );
    }

    #[test]
    fn guarded_code_refuses_indirect_returns() {
        let code = B_PLUS_0X100.to_le_bytes();
        let p = analyze(A, &code, 4).unwrap();
        assert!(relocate(&p, &code, MID, true).is_ok());
        let e = relocate(&p, &code, FAR, true).unwrap_err();
        assert!(matches!(e, AttachError::Unrelocatable { .. }), "{e}");
        let code = 0x9100_0400u32.to_le_bytes();
        let p = analyze(A, &code, 4).unwrap();
        assert!(relocate(&p, &code, FAR, true).is_err(), "the jump back");
    }

    #[test]
    fn moved_maps_each_instruction_to_its_copy() {
        let code: Vec<u8> = [BNE_PLUS_0X20, 0x9100_0400, LDR_X7_PLUS_0X40, 0x9100_0400]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let p = analyze(A, &code, 16).unwrap();
        let t = relocate(&p, &code, FAR, false).unwrap();
        // b.eq skip; ldr x16; br x16 | add | ldr x7, =; ldr x7, [x7] | add | ldr x16; br x16
        assert_eq!(
            t.moved,
            [
                (A, FAR),
                (A + 4, FAR + 12),
                (A + 8, FAR + 16),
                (A + 12, FAR + 24)
            ]
        );
        assert_eq!((FAR + 28 + 8).next_multiple_of(16) - FAR, 48);
        assert_eq!(
            t.bytes.len(),
            48 + 3 * 8,
            "code, padding, three pool entries"
        );
    }

    /// Everything the trampoline at `at` refers to outside itself: branch and `adr(p)` targets,
    /// `adrp`+`add` pairs, literal addresses, and pool constants.
    fn references(bytes: &[u8], at: u64) -> Vec<u64> {
        let mut refs = Vec::new();
        let n = bytes.len() / 4;
        let mut prev_adrp: Option<(u32, u64)> = None;
        for i in 0..n {
            let w = word_at(bytes, i).unwrap();
            let pc = at + 4 * i as u64;
            match classify(w, pc) {
                Kind::Adr { target, .. } => refs.push(target),
                Kind::Adrp { rd, target } => {
                    refs.push(target);
                    prev_adrp = Some((rd, target));
                    continue;
                }
                Kind::Load { target, lit, .. } => {
                    refs.push(target);
                    let off = target.wrapping_sub(at) as usize;
                    if lit == crate::aarch64::insn::Literal::X
                        && let Some(c) = bytes.get(off..off + 8)
                    {
                        refs.push(u64::from_le_bytes(c.try_into().unwrap()));
                    }
                }
                k => refs.extend(k.branch_target()),
            }
            // add xd, xd, #imm after adrp xd
            if let Some((rd, page)) = prev_adrp
                && w & 0xffc0_0000 == 0x9100_0000
                && w & 0x1f == rd
                && (w >> 5) & 0x1f == rd
            {
                refs.push(page + u64::from((w >> 10) & 0xfff));
            }
            prev_adrp = None;
        }
        refs
    }

    #[test]
    fn random_words_relocate_or_are_refused_and_keep_their_targets() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let bases = [0x1000u64, A, 0x7fff_ffff_f000, MAX_ADDR & !3, u64::MAX - 3];
        let (mut moved, mut refused) = (0, 0);
        for _ in 0..40_000 {
            let word = next() as u32;
            let addr = bases[(next() % 5) as usize];
            let at = match next() % 4 {
                0 => addr.wrapping_add(0x1000),
                1 => addr.wrapping_sub(0x40_0000),
                2 => 0x7f00_0000_0000,
                _ => next() & !3,
            };
            let code = word.to_le_bytes();
            let Ok(p) = analyze(addr, &code, 4) else {
                refused += 1;
                continue;
            };
            let Ok(t) = relocate(&p, &code, at, false) else {
                refused += 1;
                continue;
            };
            moved += 1;
            let refs = references(&t.bytes, at);
            let want = match classify(word, addr) {
                Kind::Adr { target, .. }
                | Kind::Adrp { target, .. }
                | Kind::Load { target, .. } => Some(target),
                k => k.branch_target(),
            };
            // (A literal overlapping the patched word itself is read from a copy instead.)
            let copied = matches!(classify(word, addr), Kind::Load { target, .. }
                if target.wrapping_sub(addr) < 4 || addr.wrapping_sub(target) < 16);
            if let Some(target) = want.filter(|_| !copied) {
                assert!(
                    refs.contains(&target),
                    "{word:#010x} at {addr:#x} to {at:#x}: {target:#x} not in {refs:#x?}"
                );
            }
            if !matches!(p.insns[0].flow, Flow::Leaves)
                && !matches!(p.insns[0].kind, Kind::Bl { .. })
            {
                assert!(refs.contains(&(addr + 4)), "{word:#010x}: no way back");
            }
        }
        assert!(
            moved > 10_000 && refused > 1_000,
            "moved {moved}, refused {refused}"
        );
    }
}
