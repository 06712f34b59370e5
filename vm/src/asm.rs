//! Assembler for the bpf_conformance text syntax (see [`crate::disasm`] for the syntax; the
//! mnemonic table lives there and is shared).
//!
//! Beyond the instructions themselves the assembler reads:
//! - `#` comments, to the end of the line, and blank lines;
//! - labels, `name:` at the start of a line; a jump or call target is a label or a relative
//!   offset in slots (`+3`, `-2`, `7`). As in the reference assembler, `exit` names the first
//!   `exit` instruction unless a label of that name is defined;
//! - decimal and hex numbers, either signed (`-0x1`). A 32-bit immediate written in decimal
//!   must fit `i32`; in hex it may also be written as its unsigned bit pattern (`0xffffffff`).
//!   `lddw` takes any value from `i64::MIN` to `u64::MAX`;
//! - `.raw code=.. dst=.. src=.. off=.. imm=..`, one slot with arbitrary fields, as the
//!   disassembler prints slots that do not decode;
//! - `call helper N`, `swap16/32/64` and `lock fetch xchg` as the reference spellings of
//!   `call N`, `bswap16/32/64` and `lock xchg`, and `call runtime N` for a kfunc call.
//!
//! Validation follows the reference assembler's negative tests: registers are `%r0`..`%r10`,
//! immediates and offsets must fit their fields, every label must exist. No input panics.

use crate::disasm::{self, Form, LDIMM_NAMES};
use crate::isa::{Insn, LdImmKind, Op, Src, encode};
use crate::opcode::{BPF_PSEUDO_KFUNC_CALL, CALL, JA32};
use std::collections::HashMap;
use std::sync::LazyLock;

/// Why assembly failed, and on which line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct AsmError {
    /// 1-based line number in the source text.
    pub line: usize,
    /// What is wrong with it.
    pub kind: AsmErrorKind,
}

/// The reasons a line does not assemble.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmErrorKind {
    /// No instruction has this name.
    #[error("unknown mnemonic {mnemonic:?}")]
    UnknownMnemonic {
        /// The name as written.
        mnemonic: String,
    },
    /// `lock` without an atomic operation.
    #[error("\"lock\" needs an atomic operation and two operands")]
    LockWithoutOperation,
    /// The instruction takes a different number of operands.
    #[error("{mnemonic:?} takes {expected} operand(s), found {found}")]
    OperandCount {
        /// The mnemonic.
        mnemonic: String,
        /// Operands it takes.
        expected: usize,
        /// Operands given.
        found: usize,
    },
    /// Nothing between two commas, or after the last one.
    #[error("empty operand")]
    EmptyOperand,
    /// Not one of `%r0`..`%r10`.
    #[error("invalid register {operand:?}")]
    InvalidRegister {
        /// The operand as written.
        operand: String,
    },
    /// Not a number.
    #[error("invalid number {operand:?}")]
    InvalidNumber {
        /// The operand as written.
        operand: String,
    },
    /// A number that does not fit its field.
    #[error("{what} {operand} does not fit in {bits} bits")]
    OutOfRange {
        /// Which field: immediate, offset, jump offset, ...
        what: &'static str,
        /// The value as written or computed.
        operand: String,
        /// Field width.
        bits: u8,
    },
    /// Not `[%rN]`, `[%rN+off]` or `[%rN-off]`.
    #[error("invalid memory operand {operand:?}, expected [%rN+offset]")]
    InvalidMemoryOperand {
        /// The operand as written.
        operand: String,
    },
    /// Neither a label nor a relative offset.
    #[error("invalid jump target {operand:?}, expected a label or +N/-N")]
    InvalidTarget {
        /// The operand as written.
        operand: String,
    },
    /// A label definition that is not an identifier.
    #[error("invalid label name {label:?}")]
    InvalidLabel {
        /// The name as written.
        label: String,
    },
    /// A label defined twice.
    #[error("label {label:?} is already defined on line {first_line}")]
    DuplicateLabel {
        /// The name.
        label: String,
        /// Where it was first defined.
        first_line: usize,
    },
    /// A jump or call to a label that is never defined.
    #[error("undefined label {label:?}")]
    UndefinedLabel {
        /// The name.
        label: String,
    },
    /// A `.raw` field that is not `code=`, `dst=`, `src=`, `off=` or `imm=` with a number.
    #[error("invalid .raw field {field:?}: {reason}")]
    InvalidRawField {
        /// The field as written.
        field: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `-- raw` word that is neither a 64-bit number nor a line of 8 hex bytes.
    #[error("invalid raw word {word:?}, expected a 64-bit number or 8 hex bytes")]
    InvalidRawWord {
        /// The word as written.
        word: String,
    },
}

/// Spellings the reference assembler accepts besides the ones the disassembler prints.
const ALIASES: [(&str, &str); 8] = [
    ("swap16", "bswap16"),
    ("swap32", "bswap32"),
    ("swap64", "bswap64"),
    ("call helper", "call"),
    ("lock fetch xchg", "lock xchg"),
    ("lock fetch xchg32", "lock xchg32"),
    ("lock fetch cmpxchg", "lock cmpxchg"),
    ("lock fetch cmpxchg32", "lock cmpxchg32"),
];

/// Mnemonic → form, built from the disassembler's table.
static MNEMONICS: LazyLock<HashMap<String, Form>> = LazyLock::new(|| {
    disasm::forms()
        .into_iter()
        .map(|form| (disasm::mnemonic(form), form))
        .collect()
});

fn lookup(mnemonic: &str) -> Option<Form> {
    let name = ALIASES
        .iter()
        .find(|&&(alias, _)| alias == mnemonic)
        .map_or(mnemonic, |&(_, name)| name);
    MNEMONICS.get(name).copied()
}

/// Assembles conformance-syntax text into instruction slots. Text without instructions gives
/// an empty program (rejecting that is the loader's job, as for any other program).
pub fn assemble(text: &str) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Assembler::default();
    for (index, source) in text.lines().enumerate() {
        asm.line = index + 1;
        asm.assemble_line(source).map_err(|kind| AsmError {
            line: asm.line,
            kind,
        })?;
    }
    asm.finish()
}

/// Parses the conformance `-- raw` format: per line either 64-bit words (`0x5566778800000018`,
/// the little-endian slot as a number, see [`Insn::from_u64`]) or exactly 8 hex bytes in memory
/// order (`04 10 00 00 01 00 00 00`). `#` starts a comment.
pub fn parse_raw_words(text: &str) -> Result<Vec<Insn>, AsmError> {
    let mut insns = Vec::new();
    for (index, source) in text.lines().enumerate() {
        let words: Vec<&str> = strip_comment(source).split_whitespace().collect();
        let is_byte = |w: &&str| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit());
        if words.len() == Insn::SIZE && words.iter().all(is_byte) {
            let mut bytes = [0u8; Insn::SIZE];
            for (b, w) in bytes.iter_mut().zip(&words) {
                *b = u8::from_str_radix(w, 16).unwrap_or_default();
            }
            insns.push(Insn::from_bytes(bytes));
            continue;
        }
        for word in words {
            let value = parse_literal(word)
                .filter(|lit| lit.value >= 0)
                .and_then(|lit| u64::try_from(lit.value).ok())
                .ok_or_else(|| AsmError {
                    line: index + 1,
                    kind: AsmErrorKind::InvalidRawWord { word: word.into() },
                })?;
            insns.push(Insn::from_u64(value));
        }
    }
    Ok(insns)
}

/// Which field of an instruction a jump target goes into.
#[derive(Clone, Copy, Debug)]
enum Field {
    /// 16-bit `off` (jumps).
    Off,
    /// 32-bit `imm` (`ja32`, local calls, `lddw func`).
    Imm,
}

/// A label reference resolved once every label is known.
#[derive(Debug)]
struct Fixup {
    slot: usize,
    label: String,
    field: Field,
    line: usize,
}

#[derive(Debug, Default)]
struct Assembler {
    insns: Vec<Insn>,
    /// Label → (slot, line of definition).
    labels: HashMap<String, (usize, usize)>,
    first_exit: Option<usize>,
    fixups: Vec<Fixup>,
    /// Line being assembled (1-based).
    line: usize,
}

impl Assembler {
    fn assemble_line(&mut self, source: &str) -> Result<(), AsmErrorKind> {
        let mut text = strip_comment(source).trim();
        let (first, rest) = take_word(text);
        if let Some(label) = first.strip_suffix(':') {
            self.define_label(label)?;
            text = rest;
        }
        if text.is_empty() {
            return Ok(());
        }
        let (mnemonic, operands) = split_mnemonic(text);
        if mnemonic == ".raw" {
            let insn = parse_raw_fields(operands)?;
            self.insns.push(insn);
            return Ok(());
        }
        let Some(form) = lookup(&mnemonic) else {
            return Err(if mnemonic == "lock" || mnemonic == "lock fetch" {
                AsmErrorKind::LockWithoutOperation
            } else {
                AsmErrorKind::UnknownMnemonic { mnemonic }
            });
        };
        let operands = split_operands(operands)?;
        self.instruction(form, &mnemonic, &operands)
    }

    fn define_label(&mut self, label: &str) -> Result<(), AsmErrorKind> {
        if !is_identifier(label) {
            return Err(AsmErrorKind::InvalidLabel {
                label: label.into(),
            });
        }
        if let Some(&(_, first_line)) = self.labels.get(label) {
            return Err(AsmErrorKind::DuplicateLabel {
                label: label.into(),
                first_line,
            });
        }
        self.labels
            .insert(label.into(), (self.insns.len(), self.line));
        Ok(())
    }

    /// Encodes one instruction whose operands have been split.
    fn instruction(
        &mut self,
        form: Form,
        mnemonic: &str,
        ops: &[&str],
    ) -> Result<(), AsmErrorKind> {
        let op = match (form, ops) {
            (Form::Alu(width, op), &[dst, src]) => Op::Alu {
                width,
                op,
                dst: register(dst)?,
                src: reg_or_imm(src)?,
            },
            (Form::Neg(width), &[dst]) => Op::Neg {
                width,
                dst: register(dst)?,
            },
            (Form::MovSx(width, bits), &[dst, src]) => Op::MovSx {
                width,
                dst: register(dst)?,
                src: register(src)?,
                bits,
            },
            (Form::Endian(kind, bits), &[dst]) => Op::Endian {
                kind,
                bits,
                dst: register(dst)?,
            },
            (Form::Lddw, &[dst, value]) => self.lddw(register(dst)?, value)?,
            (Form::Load(size, signed), &[dst, mem]) => {
                let (src, off) = memory(mem)?;
                Op::Load {
                    size,
                    signed,
                    dst: register(dst)?,
                    src,
                    off,
                }
            }
            (Form::Store(size), &[mem, value]) => {
                let (dst, off) = memory(mem)?;
                Op::Store {
                    size,
                    dst,
                    off,
                    src: Src::Imm(imm32(value)?),
                }
            }
            (Form::StoreX(size), &[mem, src]) => {
                let (dst, off) = memory(mem)?;
                Op::Store {
                    size,
                    dst,
                    off,
                    src: Src::Reg(register(src)?),
                }
            }
            (Form::Atomic(size, op, fetch), &[mem, src]) => {
                let (dst, off) = memory(mem)?;
                Op::Atomic {
                    size,
                    op,
                    fetch,
                    dst,
                    src: register(src)?,
                    off,
                }
            }
            (Form::Ja, &[target]) => Op::Ja {
                off: self.target(target, Field::Off)?,
            },
            (Form::Ja32, &[target]) => {
                // Built directly: `encode` would pick the 16-bit `ja` for a short offset.
                let off = self.target(target, Field::Imm)?;
                self.insns.push(Insn::new(JA32, 0, 0, 0, off));
                return Ok(());
            }
            (Form::Jmp(width, cond), &[dst, src, target]) => Op::Jmp {
                width,
                cond,
                dst: register(dst)?,
                src: reg_or_imm(src)?,
                off: self.target(target, Field::Off)? as i16,
            },
            (Form::Call, &[target]) if target.starts_with('%') => Op::Callx {
                reg: register(target)?,
            },
            (Form::Call, &[id]) => Op::Call { id: helper_id(id)? },
            (Form::CallLocal, &[target]) => Op::CallLocal {
                off: self.target(target, Field::Imm)?,
            },
            (Form::CallRuntime, &[id]) => {
                let id = helper_id(id)? as i32;
                self.insns
                    .push(Insn::new(CALL, 0, BPF_PSEUDO_KFUNC_CALL, 0, id));
                return Ok(());
            }
            (Form::Exit, &[]) => {
                self.first_exit.get_or_insert(self.insns.len());
                Op::Exit
            }
            (form, ops) => {
                return Err(AsmErrorKind::OperandCount {
                    mnemonic: mnemonic.into(),
                    expected: arity(form),
                    found: ops.len(),
                });
            }
        };
        self.insns.extend(encode(&op));
        Ok(())
    }

    /// `lddw`: a 64-bit constant, or a pseudo form `kind value[+offset]`.
    fn lddw(&mut self, dst: u8, operand: &str) -> Result<Op, AsmErrorKind> {
        let (keyword, rest) = take_word(operand);
        let Some(kind) = disasm::value_of(&LDIMM_NAMES, keyword) else {
            let value = imm64(operand)?;
            return Ok(Op::LdImm64 {
                dst,
                kind: LdImmKind::Imm64,
                lo: value as i32,
                hi: (value >> 32) as i32,
            });
        };
        let (value, offset) = split_value_offset(rest);
        let lo = if kind == LdImmKind::Func {
            self.target(value, Field::Imm)?
        } else {
            imm32(value)?
        };
        let hi = offset.map(imm32).transpose()?.unwrap_or(0);
        Ok(Op::LdImm64 { dst, kind, lo, hi })
    }

    /// A jump or call target: a relative offset, or a label resolved in [`Self::finish`] (the
    /// instruction using it must be the next one pushed).
    fn target(&mut self, operand: &str, field: Field) -> Result<i32, AsmErrorKind> {
        if let Some(lit) = parse_literal(operand) {
            let (what, bits) = match field {
                Field::Off => ("jump offset", 16),
                Field::Imm => ("jump offset", 32),
            };
            let fits = match field {
                Field::Off => i16::try_from(lit.value).is_ok(),
                Field::Imm => i32::try_from(lit.value).is_ok(),
            };
            return if fits {
                Ok(lit.value as i32)
            } else {
                Err(AsmErrorKind::OutOfRange {
                    what,
                    operand: operand.into(),
                    bits,
                })
            };
        }
        if !is_identifier(operand) {
            return Err(AsmErrorKind::InvalidTarget {
                operand: operand.into(),
            });
        }
        self.fixups.push(Fixup {
            slot: self.insns.len(),
            label: operand.into(),
            field,
            line: self.line,
        });
        Ok(0)
    }

    /// Resolves label references.
    fn finish(mut self) -> Result<Vec<Insn>, AsmError> {
        for fixup in &self.fixups {
            let err = |kind| AsmError {
                line: fixup.line,
                kind,
            };
            let target = match self.labels.get(&fixup.label) {
                Some(&(slot, _)) => Some(slot),
                None if fixup.label == "exit" => self.first_exit,
                None => None,
            };
            let Some(target) = target else {
                return Err(err(AsmErrorKind::UndefinedLabel {
                    label: fixup.label.clone(),
                }));
            };
            let rel = target as i64 - (fixup.slot as i64 + 1);
            let out_of_range = |bits| {
                err(AsmErrorKind::OutOfRange {
                    what: "jump offset",
                    operand: format!("{rel:+} (to {:?})", fixup.label),
                    bits,
                })
            };
            let Some(insn) = self.insns.get_mut(fixup.slot) else {
                continue;
            };
            match fixup.field {
                Field::Off => insn.off = i16::try_from(rel).map_err(|_| out_of_range(16))?,
                Field::Imm => insn.imm = i32::try_from(rel).map_err(|_| out_of_range(32))?,
            }
        }
        Ok(self.insns)
    }
}

/// Number of comma-separated operands a form takes.
fn arity(form: Form) -> usize {
    match form {
        Form::Exit => 0,
        Form::Neg(_)
        | Form::Endian(..)
        | Form::Ja
        | Form::Ja32
        | Form::Call
        | Form::CallLocal
        | Form::CallRuntime => 1,
        Form::Jmp(..) => 3,
        _ => 2,
    }
}

fn strip_comment(line: &str) -> &str {
    line.split('#').next().unwrap_or_default()
}

/// The first whitespace-separated word and the rest, trimmed.
fn take_word(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Splits off the mnemonic, which for `lock [fetch] op` and `call local|helper|runtime` is
/// more than one word.
fn split_mnemonic(text: &str) -> (String, &str) {
    let (first, mut rest) = take_word(text);
    let mut mnemonic = first.to_string();
    let mut absorb = |word: &str, rest: &mut &str| {
        let (next, after) = take_word(rest);
        if word.is_empty() || next == word {
            mnemonic.push(' ');
            mnemonic.push_str(next);
            *rest = after;
            true
        } else {
            false
        }
    };
    match first {
        "lock" => {
            absorb("fetch", &mut rest);
            if !rest.is_empty() {
                absorb("", &mut rest);
            }
        }
        "call" => {
            let _ = absorb("local", &mut rest)
                || absorb("helper", &mut rest)
                || absorb("runtime", &mut rest);
        }
        _ => {}
    }
    (mnemonic, rest)
}

fn split_operands(text: &str) -> Result<Vec<&str>, AsmErrorKind> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let operands: Vec<&str> = text.split(',').map(str::trim).collect();
    if operands.iter().any(|o| o.is_empty()) {
        return Err(AsmErrorKind::EmptyOperand);
    }
    Ok(operands)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// A number as written: its value (saturated far outside every field) and whether it was hex.
#[derive(Clone, Copy, Debug)]
struct Literal {
    value: i128,
    hex: bool,
}

/// `[+|-]digits` or `[+|-]0xhexdigits`.
fn parse_literal(s: &str) -> Option<Literal> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (hex, digits) = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(digits) => (true, digits),
        None => (false, body),
    };
    let radix = if hex { 16 } else { 10 };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Only overflow can fail now; saturate so that range checks reject it.
    let magnitude = i128::from_str_radix(digits, radix).unwrap_or(i128::MAX);
    Some(Literal {
        value: if negative { -magnitude } else { magnitude },
        hex,
    })
}

fn number(operand: &str) -> Result<Literal, AsmErrorKind> {
    parse_literal(operand).ok_or_else(|| AsmErrorKind::InvalidNumber {
        operand: operand.into(),
    })
}

/// A signed field of `bits` bits; hex may also give the unsigned bit pattern.
fn signed_field(operand: &str, what: &'static str, bits: u8) -> Result<i64, AsmErrorKind> {
    let lit = number(operand)?;
    let min = -(1i128 << (bits - 1));
    let max = if lit.hex {
        (1i128 << bits) - 1
    } else {
        -min - 1
    };
    if lit.value < min || lit.value > max {
        return Err(AsmErrorKind::OutOfRange {
            what,
            operand: operand.into(),
            bits,
        });
    }
    // Wrap an unsigned hex pattern into the signed range.
    let value = if lit.value > -min - 1 {
        lit.value - (1i128 << bits)
    } else {
        lit.value
    };
    Ok(value as i64)
}

fn imm32(operand: &str) -> Result<i32, AsmErrorKind> {
    signed_field(operand, "immediate", 32).map(|v| v as i32)
}

/// `lddw` constant: anything from `i64::MIN` to `u64::MAX`, as its 64-bit pattern.
fn imm64(operand: &str) -> Result<u64, AsmErrorKind> {
    let lit = number(operand)?;
    u64::try_from(lit.value)
        .or_else(|_| i64::try_from(lit.value).map(|v| v as u64))
        .map_err(|_| AsmErrorKind::OutOfRange {
            what: "immediate",
            operand: operand.into(),
            bits: 64,
        })
}

/// A helper id: `i32` or `u32`, decimal or hex.
fn helper_id(operand: &str) -> Result<u32, AsmErrorKind> {
    let lit = number(operand)?;
    u32::try_from(lit.value)
        .or_else(|_| i32::try_from(lit.value).map(|v| v as u32))
        .map_err(|_| AsmErrorKind::OutOfRange {
            what: "helper id",
            operand: operand.into(),
            bits: 32,
        })
}

fn register(operand: &str) -> Result<u8, AsmErrorKind> {
    operand
        .strip_prefix("%r")
        .and_then(|digits| {
            let n: u8 = digits.parse().ok()?;
            (usize::from(n) < crate::isa::NUM_REGS && n.to_string() == digits).then_some(n)
        })
        .ok_or_else(|| AsmErrorKind::InvalidRegister {
            operand: operand.into(),
        })
}

fn reg_or_imm(operand: &str) -> Result<Src, AsmErrorKind> {
    if operand.starts_with('%') {
        register(operand).map(Src::Reg)
    } else {
        imm32(operand).map(Src::Imm)
    }
}

/// `[%rN]`, `[%rN+off]` or `[%rN-off]` → (register, offset).
fn memory(operand: &str) -> Result<(u8, i16), AsmErrorKind> {
    let invalid = || AsmErrorKind::InvalidMemoryOperand {
        operand: operand.into(),
    };
    let inner = operand
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(invalid)?
        .trim();
    let Some(split) = inner.find(['+', '-']) else {
        return Ok((register(inner)?, 0));
    };
    let base = register(inner[..split].trim())?;
    let offset: String = inner[split..].split_whitespace().collect();
    let lit = parse_literal(&offset).ok_or_else(invalid)?;
    let off = i16::try_from(lit.value).map_err(|_| AsmErrorKind::OutOfRange {
        what: "offset",
        operand: offset.clone(),
        bits: 16,
    })?;
    Ok((base, off))
}

/// `3+16` → (`3`, `+16`); `-1` → (`-1`, none).
fn split_value_offset(s: &str) -> (&str, Option<&str>) {
    match s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == '+' || c == '-')
    {
        Some((i, _)) => (s[..i].trim(), Some(s[i..].trim())),
        None => (s.trim(), None),
    }
}

/// `code=0x8f dst=1 src=0 off=0 imm=0`; omitted fields are zero.
fn parse_raw_fields(text: &str) -> Result<Insn, AsmErrorKind> {
    let mut insn = Insn::default();
    let mut seen: Vec<&str> = Vec::new();
    for field in text.split_whitespace() {
        let invalid = |reason| AsmErrorKind::InvalidRawField {
            field: field.into(),
            reason,
        };
        let Some((key, value)) = field.split_once('=') else {
            return Err(invalid("expected key=value"));
        };
        if seen.contains(&key) {
            return Err(invalid("given twice"));
        }
        seen.push(key);
        let unsigned = |max: i128| {
            parse_literal(value)
                .filter(|lit| (0..=max).contains(&lit.value))
                .map(|lit| lit.value as u8)
                .ok_or_else(|| invalid("value out of range"))
        };
        match key {
            "code" => insn.code = unsigned(0xff)?,
            "dst" => insn.dst = unsigned(0x0f)?,
            "src" => insn.src = unsigned(0x0f)?,
            "off" => insn.off = signed_field(value, "offset", 16)? as i16,
            "imm" => insn.imm = imm32(value)?,
            _ => {
                return Err(invalid(
                    "unknown field; expected code, dst, src, off or imm",
                ));
            }
        }
    }
    Ok(insn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disasm::disassemble;
    use crate::isa::decode;
    use proptest::prelude::*;

    fn asm(text: &str) -> Vec<Insn> {
        assemble(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn err(text: &str) -> String {
        match assemble(text) {
            Ok(insns) => panic!("{text:?} assembled to {insns:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn labels_resolve_forward_and_backward() {
        let insns = asm("top:\nmov %r0, 0 # comment\nja end\n\nja top\nend: exit\n");
        assert_eq!(insns[1], Insn::new(0x05, 0, 0, 1, 0));
        assert_eq!(insns[2], Insn::new(0x05, 0, 0, -3, 0));
    }

    #[test]
    fn exit_names_the_first_exit_unless_defined() {
        let insns = asm("jeq %r1, 0, exit\nmov %r0, 1\nexit\nexit\n");
        assert_eq!(insns[0].off, 1);
        let insns = asm("jeq %r1, 0, exit\nexit\nexit:\nexit\n");
        assert_eq!(insns[0].off, 1);
    }

    #[test]
    fn lddw_takes_full_64_bit_values() {
        let insns =
            asm("lddw %r0, 0xffffffffffffffff\nlddw %r1, -2\nlddw %r2, 18446744073709551615");
        assert_eq!((insns[0].imm, insns[1].imm), (-1, -1));
        assert_eq!((insns[2].imm, insns[3].imm), (-2, -1));
        assert_eq!((insns[4].imm, insns[5].imm), (-1, -1));
        assert!(err("lddw %r0, 0x10000000000000000").contains("does not fit in 64 bits"));
    }

    #[test]
    fn imm32_accepts_signed_decimal_and_hex_bit_patterns() {
        assert_eq!(asm("mov32 %r0, 0xffffffff")[0].imm, -1);
        assert_eq!(asm("mov32 %r0, -0x1")[0].imm, -1);
        assert_eq!(asm("mov32 %r0, -2147483648")[0].imm, i32::MIN);
        assert!(err("mov32 %r0, 2147483648").starts_with("line 1: immediate"));
        assert!(err("mov32 %r0, 0x100000000").contains("32 bits"));
    }

    #[test]
    fn errors_carry_line_numbers() {
        assert_eq!(err("exit\n\nfoo %r0"), "line 3: unknown mnemonic \"foo\"");
        assert_eq!(
            err("# c\nor %r0, %r11"),
            "line 2: invalid register \"%r11\""
        );
        assert_eq!(
            err("lddw %r0"),
            "line 1: \"lddw\" takes 2 operand(s), found 1"
        );
        assert_eq!(
            err("exit\nja nowhere"),
            "line 2: undefined label \"nowhere\""
        );
        assert_eq!(
            err("a:\nexit\na:"),
            "line 3: label \"a\" is already defined on line 1"
        );
        assert!(err("ldxb %r0, %r1").contains("invalid memory operand"));
        assert!(err("ldxb %r0, [%r1+0x10000]").contains("offset +0x10000 does not fit in 16 bits"));
        assert!(err("lock").contains("needs an atomic operation"));
        assert!(err("lock or [%r10-8]").contains("takes 2 operand(s), found 1"));
        assert!(err("mov %r0,").contains("empty operand"));
        assert!(err("1abc:").contains("invalid label"));
        assert!(err(".raw code=0x100").contains("out of range"));
    }

    #[test]
    fn far_label_is_rejected_for_16_bit_jumps_but_not_gotol() {
        let body = "mov %r0, 0\n".repeat(40_000);
        assert!(err(&format!("ja far\n{body}far: exit")).contains("16 bits"));
        let insns = asm(&format!("ja32 far\n{body}far: exit"));
        assert_eq!(insns[0], Insn::new(JA32, 0, 0, 0, 40_000));
    }

    #[test]
    fn calls_in_every_spelling() {
        let insns = asm("call 5\ncall helper 5\ncall %r2\ncall local f\ncall runtime 7\nf: exit");
        assert_eq!(insns[0], Insn::new(0x85, 0, 0, 0, 5));
        assert_eq!(insns[1], insns[0]);
        assert_eq!(insns[2], Insn::new(0x8d, 2, 0, 0, 0));
        assert_eq!(insns[3], Insn::new(0x85, 0, 1, 0, 1));
        assert_eq!(insns[4], Insn::new(0x85, 0, 2, 0, 7));
    }

    #[test]
    fn pseudo_lddw_forms_round_trip() {
        let text = "lddw %r1, map_fd 3\nlddw %r1, map_value 3+16\nlddw %r2, map_idx 0\n\
                    lddw %r2, map_idx_value 1-8\nlddw %r3, btf_id 5\nlddw %r4, func -4\n\
                    lddw %r4, map_fd -1+7\n";
        let insns = asm(text);
        assert_eq!(insns[0], Insn::new(0x18, 1, 1, 0, 3));
        assert_eq!((insns[2].src, insns[2].imm, insns[3].imm), (2, 3, 16));
        assert_eq!(disassemble(&insns), text);
        let insns = asm("lddw %r1, func f\nexit\nf: exit");
        assert_eq!(
            decode(&insns, 0).map(|op| disasm::format_op(&op)),
            Ok("lddw %r1, func +2".into())
        );
    }

    #[test]
    fn reference_spellings_are_aliases() {
        assert_eq!(asm("swap32 %r0"), asm("bswap32 %r0"));
        assert_eq!(
            asm("lock fetch cmpxchg32 [%r1-4], %r2"),
            asm("lock cmpxchg32 [%r1-4], %r2")
        );
        assert_eq!(disassemble(&asm("swap64 %r3")), "bswap64 %r3\n");
    }

    #[test]
    fn raw_words_in_both_formats() {
        let words = parse_raw_words("0x5566778800000018\n0x1122334400000000 # hi\n0x95\n").unwrap();
        assert_eq!(words, asm("lddw %r0, 0x1122334455667788\nexit"));
        let bytes = parse_raw_words("04 10 00 00 01 00 00 00\n95 00 00 00 00 00 00 00\n").unwrap();
        assert_eq!(
            bytes,
            vec![Insn::new(0x04, 0, 1, 0, 1), Insn::new(0x95, 0, 0, 0, 0)]
        );
        let e = parse_raw_words("0x95\nzz\n").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn empty_text_is_an_empty_program() {
        assert_eq!(asm("# nothing\n\n"), Vec::new());
    }

    fn any_slot() -> impl Strategy<Value = Insn> {
        (
            any::<u8>(),
            0u8..16,
            0u8..16,
            prop_oneof![
                Just(0i16),
                Just(1),
                Just(8),
                Just(16),
                Just(32),
                any::<i16>()
            ],
            prop_oneof![
                Just(0i32),
                Just(1),
                Just(16),
                Just(32),
                Just(64),
                Just(0xe1),
                Just(0xf1),
                any::<i32>()
            ],
        )
            .prop_map(|(code, dst, src, off, imm)| Insn::new(code, dst, src, off, imm))
    }

    proptest! {
        #[test]
        fn disassembly_of_any_slots_reassembles_identically(insns in prop::collection::vec(any_slot(), 0..8)) {
            let text = disassemble(&insns);
            prop_assert_eq!(assemble(&text), Ok(insns), "{}", text);
        }

        #[test]
        fn any_text_assembles_or_errors_without_panicking(text in "[a-z0-9%\\[\\]+:#,. x-]{0,40}(\n[a-z0-9%\\[\\]+:#,. x-]{0,40}){0,4}") {
            let _ = assemble(&text);
            let _ = parse_raw_words(&text);
        }
    }
}
