//! # bpftime-tools
//!
//! The pieces behind the `bpftime` command line and the `bpftime-conformance-plugin` binary:
//! reading programs from hex text, conformance assembly or clang-built ELF objects
//! ([`input`], [`object`]), the honest set of helpers `bpftime run` provides ([`helpers`]), and
//! the `run` subcommand itself ([`run`]); `load`/`start` ([`launch`]) and `list` ([`list`]);
//! `attach`/`detach` ([`attach`]) with the ptrace injector behind `attach` ([`inject`]).
//!
//! What it does not do: maps, BTF/CO-RE relocations, attaching, JIT. A program that needs any
//! of them is refused with an error that says so, never run with silently wrong semantics.
//!
//! Invariants: no `unsafe` outside [`inject`] (which states its own); untrusted input (bytecode, ELF files, hex text) never panics the
//! process — the ELF parser's own panics are caught and reported as errors.

#![deny(unsafe_code)]

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod attach;
pub mod bench;
pub mod helpers;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
pub mod inject;
pub mod input;
pub mod launch;
pub mod list;
pub mod object;
pub mod run;
