//! # bpftime-maps
//!
//! The shared-memory store that loaders, agents and the Wasm host share, and the eBPF map
//! types that live in it.
//!
//! - [`shm`]: the store file mapped at a fixed base in each process (the only module that
//!   turns offsets into memory; all of this crate's unsafe code is there, except the raw
//!   `bpf()` calls and kernel map mappings of [`kernel`]).
//! - [`lock`]: a cross-process lock that a killed holder cannot wedge.
//! - [`store`]: header, allocator, object table, generation counter.
//! - [`map`]: map definitions, kernel errnos, the per-process [`map::Map`] handle and its
//!   dispatch by type. The types: [`array`], [`percpu`] (CPU numbering, per-CPU arrays),
//!   [`hash`] (hash, per-CPU hash, LRU, LRU per-CPU; also the tables under [`lpm`] and
//!   hash-of-maps), [`queue_stack`], [`bloom`], [`lpm`] (longest-prefix match), [`stack_trace`],
//!   [`prog_array`] (arrays of object ids: program arrays, arrays of maps), [`of_maps`]
//!   (inner-map templates); [`batch`]: the `BPF_MAP_*_BATCH` algorithms.
//! - [`ringbuf`] (`BPF_MAP_TYPE_RINGBUF`) and [`perf_array`] (`BPF_MAP_TYPE_PERF_EVENT_ARRAY` and
//!   the perf ring buffers behind it) in the kernel's mmap layouts; [`wake`]: how their
//!   producers wake consumers in other processes through a real file descriptor.
//! - [`kernel`]: kernel-backed maps (`--kernel-maps`): maps created in the kernel, recorded in
//!   the store by kernel id and used through the same [`map::Map`] handle.
//!
//! Invariants: the store holds offsets, never pointers; every offset or length read from it is
//! bounds-checked before use; no process-local lock (parking_lot, std) ever lives in it.

pub mod array;
pub mod batch;
pub mod bloom;
pub mod hash;
pub mod kernel;
pub mod lock;
pub mod lpm;
pub mod map;
pub mod of_maps;
pub mod percpu;
pub mod perf_array;
pub mod prog_array;
pub mod queue_stack;
pub mod ringbuf;
pub mod shm;
pub mod stack_trace;
pub mod store;
pub mod wake;

pub use map::{Map, MapDef, MapError, MapType};
pub use store::{ObjectKind, Store, StoreError};
