//! Kernel names for the eBPF instruction encoding, verbatim from
//! `include/uapi/linux/bpf_common.h` and `include/uapi/linux/bpf.h`
//! (RFC 9669 §3–§5 describes the same encoding).
#![allow(missing_docs)]

// Instruction classes (RFC 9669 §3.3).
pub const BPF_LD: u8 = 0x00;
pub const BPF_LDX: u8 = 0x01;
pub const BPF_ST: u8 = 0x02;
pub const BPF_STX: u8 = 0x03;
pub const BPF_ALU: u8 = 0x04;
pub const BPF_JMP: u8 = 0x05;
pub const BPF_JMP32: u8 = 0x06;
pub const BPF_ALU64: u8 = 0x07;

// Source operand (RFC 9669 §4).
pub const BPF_K: u8 = 0x00;
pub const BPF_X: u8 = 0x08;

// ALU operations (RFC 9669 §4.1).
pub const BPF_ADD: u8 = 0x00;
pub const BPF_SUB: u8 = 0x10;
pub const BPF_MUL: u8 = 0x20;
pub const BPF_DIV: u8 = 0x30;
pub const BPF_OR: u8 = 0x40;
pub const BPF_AND: u8 = 0x50;
pub const BPF_LSH: u8 = 0x60;
pub const BPF_RSH: u8 = 0x70;
pub const BPF_NEG: u8 = 0x80;
pub const BPF_MOD: u8 = 0x90;
pub const BPF_XOR: u8 = 0xa0;
pub const BPF_MOV: u8 = 0xb0;
pub const BPF_ARSH: u8 = 0xc0;
pub const BPF_END: u8 = 0xd0;

// Byte swap source (RFC 9669 §4.2): in BPF_ALU, BPF_TO_LE/BPF_TO_BE; in BPF_ALU64, bswap.
pub const BPF_TO_LE: u8 = 0x00;
pub const BPF_TO_BE: u8 = 0x08;

// Jump operations (RFC 9669 §4.3).
pub const BPF_JA: u8 = 0x00;
pub const BPF_JEQ: u8 = 0x10;
pub const BPF_JGT: u8 = 0x20;
pub const BPF_JGE: u8 = 0x30;
pub const BPF_JSET: u8 = 0x40;
pub const BPF_JNE: u8 = 0x50;
pub const BPF_JSGT: u8 = 0x60;
pub const BPF_JSGE: u8 = 0x70;
pub const BPF_CALL: u8 = 0x80;
pub const BPF_EXIT: u8 = 0x90;
pub const BPF_JLT: u8 = 0xa0;
pub const BPF_JLE: u8 = 0xb0;
pub const BPF_JSLT: u8 = 0xc0;
pub const BPF_JSLE: u8 = 0xd0;

// Load/store sizes and modes (RFC 9669 §5).
pub const BPF_W: u8 = 0x00;
pub const BPF_H: u8 = 0x08;
pub const BPF_B: u8 = 0x10;
pub const BPF_DW: u8 = 0x18;
pub const BPF_IMM: u8 = 0x00;
pub const BPF_ABS: u8 = 0x20;
pub const BPF_IND: u8 = 0x40;
pub const BPF_MEM: u8 = 0x60;
pub const BPF_MEMSX: u8 = 0x80;
pub const BPF_ATOMIC: u8 = 0xc0;

// Atomic operations, carried in imm (RFC 9669 §5.3).
pub const BPF_FETCH: i32 = 0x01;
pub const BPF_XCHG: i32 = 0xe0 | BPF_FETCH;
pub const BPF_CMPXCHG: i32 = 0xf0 | BPF_FETCH;

// src_reg values of special instructions (include/uapi/linux/bpf.h).
pub const BPF_PSEUDO_MAP_FD: u8 = 1;
pub const BPF_PSEUDO_MAP_VALUE: u8 = 2;
pub const BPF_PSEUDO_BTF_ID: u8 = 3;
pub const BPF_PSEUDO_FUNC: u8 = 4;
pub const BPF_PSEUDO_MAP_IDX: u8 = 5;
pub const BPF_PSEUDO_MAP_IDX_VALUE: u8 = 6;
pub const BPF_PSEUDO_CALL: u8 = 1;
pub const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// `BPF_LD | BPF_IMM | BPF_DW`: the two-slot 64-bit immediate load.
pub const LDDW: u8 = BPF_LD | BPF_IMM | BPF_DW;
/// `BPF_JMP | BPF_CALL`.
pub const CALL: u8 = BPF_JMP | BPF_CALL;
/// `BPF_JMP | BPF_X | BPF_CALL`: call the helper whose id is in `dst`.
pub const CALLX: u8 = BPF_JMP | BPF_X | BPF_CALL;
/// `BPF_JMP | BPF_EXIT`.
pub const EXIT: u8 = BPF_JMP | BPF_EXIT;
/// `BPF_JMP | BPF_JA`.
pub const JA: u8 = BPF_JMP | BPF_JA;
/// `BPF_JMP32 | BPF_JA`: `gotol`, the offset is in imm.
pub const JA32: u8 = BPF_JMP32 | BPF_JA;

/// Instruction class of an opcode.
#[inline]
pub const fn class(code: u8) -> u8 {
    code & 0x07
}
/// Operation bits of an ALU or JMP opcode.
#[inline]
pub const fn op(code: u8) -> u8 {
    code & 0xf0
}
/// Source bit of an ALU or JMP opcode.
#[inline]
pub const fn source(code: u8) -> u8 {
    code & 0x08
}
/// Mode bits of a load/store opcode.
#[inline]
pub const fn mode(code: u8) -> u8 {
    code & 0xe0
}
/// Size bits of a load/store opcode.
#[inline]
pub const fn size(code: u8) -> u8 {
    code & 0x18
}
/// Access width in bytes of a load/store size.
#[inline]
pub const fn size_bytes(size: u8) -> usize {
    match size {
        BPF_B => 1,
        BPF_H => 2,
        BPF_W => 4,
        _ => 8,
    }
}
