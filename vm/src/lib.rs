//! # bpftime-vm
//!
//! The eBPF virtual machine of bpftime: the instruction model ([`isa`], [`opcode`]), an
//! assembler and disassembler for the bpf_conformance text syntax ([`asm`], [`disasm`]),
//! structural loader checks ([`verifier`]), the helper ABI shared with the JIT ([`helper`]) and
//! an interpreter ([`interpreter`]) that runs every RFC 9669 instruction (ISA v4).
//!
//! What it does not do: know about shared memory, maps or processes. Maps and helpers reach a
//! program only through the [`helper`] ABI, so everything here is testable with in-memory fakes.
//!
//! Invariants:
//! - A [`verifier::Program`] only holds instructions that decode, with every jump and call
//!   target inside the program, on an instruction boundary, and an `exit` reachable.
//! - Guest memory is touched only in [`memory`], and only inside regions the host registered;
//!   anything else is a [`interpreter::Trap`], never a host fault. The only other unsafe code
//!   is the interpreter's callback entry (`callback`), which reaches the interpreter's state
//!   through the helper env.

pub mod asm;
mod callback;
pub mod disasm;
pub mod helper;
pub mod interpreter;
pub mod isa;
pub mod memory;
pub mod opcode;
pub mod verifier;
