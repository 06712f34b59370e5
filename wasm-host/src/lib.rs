//! # bpftime-wasm-host
//!
//! Runs wasm-bpf guests — eBPF control planes compiled to WebAssembly (WASI preview 1) —
//! with their eBPF programs on bpftime's userspace backend instead of the kernel: the guest's
//! `wasm_bpf` imports ([`api`]) load its BPF object into the same shared-memory store
//! `bpftime load` uses ([`object`]), agents in target processes started with `bpftime start`
//! attach the programs, and the guest polls the same ring and perf buffers ([`buffer`]).
//! Programs can also attach to the host's own WASI calls ([`wasi`]).
//!
//! What it does not do: run programs in the kernel, apply CO-RE relocations, or attach
//! kprobes. The `bpftime` CLI does not link this crate: `bpftime wasm run` execs the
//! `bpftime-wasm` binary built here.
//!
//! Invariants: every guest pointer and length is checked against the guest's memory before
//! use ([`guest`]); host calls return errors to the guest rather than trapping; a guest's
//! objects are removed from the store when it closes them or its run ends. Unsafe code lives
//! in [`wasi`] (running a program on a local context), [`signals`] and [`cache`]
//! (loading compiled guests from the user's private cache).

pub mod api;
pub mod buffer;
pub mod cache;
pub mod error;
pub mod guest;
pub mod host;
pub mod object;
pub mod run;
pub mod signals;
pub mod wasi;

pub use error::HostError;
pub use run::{Guest, GuestConfig, Outcome, open_store};
