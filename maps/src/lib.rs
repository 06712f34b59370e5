//! # bpftime-maps
//!
//! The shared-memory store that loaders, agents and the Wasm host share, and the eBPF map
//! types that live in it.
//!
//! - [`shm`]: the store file mapped at a fixed base in each process (the only module that
//!   turns offsets into memory; all of this crate's unsafe code is there).
//! - [`lock`]: a cross-process lock that a killed holder cannot wedge.
//! - [`store`]: header, allocator, object table, generation counter.
//! - [`map`]: map definitions, kernel errnos, the per-process [`map::Map`] handle; [`array`]
//!   and [`hash`] implement the types.
//!
//! Invariants: the store holds offsets, never pointers; every offset or length read from it is
//! bounds-checked before use; no process-local lock (parking_lot, std) ever lives in it.

pub mod array;
pub mod hash;
pub mod lock;
pub mod map;
pub mod shm;
pub mod store;

pub use map::{Map, MapDef, MapError, MapType};
pub use store::{ObjectKind, Store, StoreError};
