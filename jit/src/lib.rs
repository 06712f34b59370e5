//! # bpftime-jit
//!
//! Compiles a verified eBPF [`Program`] to native code for x86_64 (run natively) and aarch64
//! (emitted on any host; executed under emulation in tests). Both backends follow the contract
//! in [`abi`]: same calling convention, same `GuestMemory` stack as the interpreter, same traps.
//!
//! Invariants: executable memory is never writable and executable at once (map RW → emit →
//! mprotect RX, checked → icache flush on aarch64 → unmap on drop); a compile failure is a
//! [`JitError`], never a panic; the JIT and the interpreter return the same result and the same
//! [`bpftime_vm::interpreter::Trap`] for the same program and memory.

pub mod abi;
pub mod exec_mem;
#[cfg(target_arch = "x86_64")]
pub mod program;

#[cfg(target_arch = "x86_64")]
pub use program::{JitProgram, ProgArray};

use bpftime_vm::verifier::Program;

/// Target architecture of generated code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86_64 (System V ABI).
    X86_64,
    /// aarch64 (AAPCS64).
    Aarch64,
}

/// Compilation options.
#[derive(Clone, Debug, Default)]
pub struct JitOptions {
    /// Check every memory access like the interpreter does (see [`abi`]); off: trust the
    /// program (no per-access cost).
    pub checked: bool,
    /// Arrays and per-CPU arrays whose `bpf_map_lookup_elem` / `bpf_map_update_elem` calls the
    /// x86_64 backend may inline (see [`InlineMap`]); other maps, and every call the inlined
    /// code cannot answer, go to the registered helper.
    pub inline_maps: Vec<InlineMap>,
    /// Also generate a native entry ([`CompiledCode::native_entry`], x86_64 only) when the
    /// program can run without the host: see [`NativeOptions`].
    pub native: Option<NativeOptions>,
    /// Checked mode: memory (start, length, writable) the program may access on every run,
    /// for as long as the code lives — its global data (`.bss`, `.data`, `.rodata`: the
    /// addresses `lddw` loads). An access through a register proved to hold such an
    /// address plus a constant, inside the region (and writable for a store), is not tested
    /// at run time, as the kernel's verifier proves `PTR_TO_MAP_VALUE` accesses at load.
    pub static_regions: Vec<(u64, u64, bool)>,
}

/// What a native entry needs to know: the memory a checked program may access besides its
/// context and stack, and where the running thread's CPU id is.
///
/// A native entry (`abi::NativeEntry`) runs the program with a context and stack it makes
/// on the native stack, without the host's run state: it exists only for programs whose
/// every helper call is an inlined array or per-CPU array lookup or update
/// ([`InlineMap`]) that provably never falls back to the helper, without tail calls,
/// `callx`, callbacks or bpf-to-bpf calls. Generated code never touches SSE/x87 state, so a
/// caller (a probe's hook stub) need not save those registers around it.
#[derive(Clone, Debug, Default)]
pub struct NativeOptions {
    /// Whether the program may store into its context (`false` for tracing programs, whose
    /// context the kernel's verifier keeps read-only: a store then traps).
    pub ctx_writable: bool,
    /// Offset from the thread pointer (`fs` base) of the calling thread's rseq `cpu_id` (a
    /// `u32`, glibc's `__rseq_offset + 4`), for per-CPU arrays; `None`: programs using
    /// per-CPU arrays get no native entry.
    pub cpu_id_tp_offset: Option<i32>,
    /// Checked mode: the regions (start, length, writable) the program may access besides its
    /// context and stack, e.g. its global data and its inlined maps' data areas. Accesses
    /// elsewhere trap.
    pub regions: Vec<(u64, u64, bool)>,
}

/// Where the elements of an array (`BPF_MAP_TYPE_ARRAY`) or per-CPU array live, so that
/// generated code can compute an element's address itself, as the kernel's verifier inlines
/// `array_map_gen_lookup`: element `key` is at `base + key × stride` (per-CPU arrays: `base`
/// is `bases[ctx.cpu]`, [`abi::JitContext::cpu`]).
///
/// The x86_64 backend inlines `bpf_map_lookup_elem(handle, &key)` when r1 holds `handle` from
/// an `lddw` in the same basic block: a key `>= max_entries` gives NULL, a per-CPU array whose
/// CPU is unknown or has no base (0) calls the helper. It inlines `bpf_map_update_elem(handle,
/// &key, &value, flags)` for `flags` 0 (`BPF_ANY`) or 2 (`BPF_EXIST`) and keys in range
/// (everything else calls the helper, which returns the kernel's errors), copying
/// `value_size` bytes; r0 = 0. In checked mode the key and value reads are checked like any
/// access, and a lookup makes the whole data area (`area_start`, `area_len`) the checker's
/// cached window, so that the program's accesses through the returned pointer test it inline.
#[derive(Clone, Debug)]
pub struct InlineMap {
    handle: u64,
    max_entries: u32,
    value_size: u32,
    stride: u64,
    layout: InlineLayout,
    area_start: u64,
    area_len: u64,
    writable: bool,
    /// Per-CPU arrays: how many CPU ids from 0 up have a base (a native entry runs only on
    /// those; see [`NativeOptions`]).
    cpu_slots: u64,
}

/// An [`InlineMap`]'s element bases.
#[derive(Clone, Debug)]
pub enum InlineLayout {
    /// One base.
    Array {
        /// Address of element 0.
        base: u64,
    },
    /// A base per CPU id.
    PerCpu {
        /// Address of `len` u64s: element 0 of each CPU id's slot, or 0 (use the helper).
        bases: u64,
        /// Entries at `bases`.
        len: u64,
    },
}

impl InlineMap {
    /// Describes the map whose handle (the value programs load with `lddw`) is `handle`.
    ///
    /// # Safety
    /// For as long as code compiled with this description may run: every element address the
    /// layout gives for keys below `max_entries` (`base + key × stride`, each non-zero
    /// `bases[i]` likewise) is valid for reads (and writes when `writable`) of `value_size`
    /// bytes, the `bases` table is readable (from this call on) and its non-zero entries never
    /// change, and `[area_start, area_start + area_len)` (which
    /// contains all those elements) is valid memory for the program's accesses — reads, and
    /// writes when `writable`. The helper registered as id 1 / 2 answers for the same map; in
    /// particular `bpf_map_lookup_elem` (id 1) on `handle` returns 0 or the address of an
    /// element valid as above: checked code does not test accesses inside a non-null lookup
    /// result (as the kernel's verifier proves them at load).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        handle: u64,
        max_entries: u32,
        value_size: u32,
        stride: u64,
        layout: InlineLayout,
        area_start: u64,
        area_len: u64,
        writable: bool,
    ) -> Self {
        let cpu_slots = match layout {
            InlineLayout::Array { .. } => u64::MAX,
            InlineLayout::PerCpu { bases, len } => (0..len)
                // SAFETY: the caller guarantees `len` readable u64s at `bases`.
                .find(|&i| unsafe { (bases as *const u64).add(i as usize).read() } == 0)
                .unwrap_or(len),
        };
        InlineMap {
            cpu_slots,
            handle,
            max_entries,
            value_size,
            stride,
            layout,
            area_start,
            area_len,
            writable,
        }
    }
}

/// Machine code for one program.
#[derive(Clone, Debug)]
pub struct CompiledCode {
    /// Target.
    pub arch: Arch,
    /// The code (position-independent except for absolute helper addresses baked in).
    pub code: Vec<u8>,
    /// Offset of the entry point ([`abi::JitEntry`]) in `code`.
    pub entry: usize,
    /// Code offset of each eBPF slot (`u32::MAX` for the second slot of `lddw`).
    pub insn_offsets: Vec<u32>,
    /// `bpf_map_lookup_elem` / `bpf_map_update_elem` calls compiled as plain helper calls
    /// (not inlined, [`InlineMap`]); 0 when every one was inlined (with its fallback).
    pub map_helper_calls: usize,
    /// Offset of the native entry (`abi::NativeEntry`) when [`JitOptions::native`] asked for
    /// one and the program can have one.
    pub native_entry: Option<usize>,
    /// Why there is no native entry (when one was asked for).
    pub native_refused: Option<String>,
    /// With a native entry: which of the first 64 bytes of its context the program may read
    /// (bit i for byte i; every bit when it may read further or cannot be told), so that a
    /// caller may leave the others unset. Every bit without a native entry.
    pub ctx_reads: u64,
}

/// Why a program could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    /// An instruction this backend cannot compile.
    #[error("pc {pc}: {what} is not supported by the {arch:?} JIT")]
    Unsupported {
        /// Slot.
        pc: usize,
        /// What.
        what: String,
        /// Backend.
        arch: Arch,
    },
    /// The assembler failed.
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// Executable memory could not be set up.
    #[error("executable memory: {0}")]
    Memory(#[from] std::io::Error),
}

/// Compiles `prog` for `arch`; helper calls by id resolve through `helpers`.
pub fn compile(
    arch: Arch,
    prog: &Program,
    helpers: &bpftime_vm::helper::HelperRegistry,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    match arch {
        Arch::X86_64 => x86_64::compile(prog, helpers, opts),
        Arch::Aarch64 => aarch64::compile(prog, helpers, opts),
    }
}

pub mod aarch64;
pub mod x86_64;
