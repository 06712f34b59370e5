//! A program loaded from the store into this process, ready to run.
//!
//! Loading resolves the map references the store keeps as object ids: `lddw` with
//! `BPF_PSEUDO_MAP_FD` becomes the address of a process-local [`Map`] handle (what map helpers
//! receive, as the kernel passes `struct bpf_map *`), `BPF_PSEUDO_MAP_VALUE` becomes the
//! address of the value inside the map's data (global variables: `.bss`, `.data`, `.rodata`).
//! The result is checked by the VM's loader checks against this runtime's helpers.

use crate::exec;
use crate::host::ProgHost;
use crate::object::{RuntimeError, read_prog};
use bpftime_maps::{Map, Store};
use bpftime_vm::helper::{HelperRegistry, MemRegion};
use bpftime_vm::interpreter::{Interpreter, Trap};
use bpftime_vm::isa::{Insn, LdImmKind, Op, decode};
use bpftime_vm::opcode::LDDW;
use bpftime_vm::verifier::{Program, VerifyError, verify};
use std::sync::Arc;

/// A loaded, checked program with the maps it uses.
#[derive(Debug)]
pub struct LoadedProg {
    id: u32,
    name: String,
    prog: Program,
    helpers: Arc<HelperRegistry>,
    #[allow(
        clippy::vec_box,
        reason = "boxed so their addresses, baked into the instructions, never move"
    )]
    maps: Vec<Box<Map>>,
    host: Box<ProgHost>,
    value_regions: Vec<MemRegion>,
    #[cfg(target_arch = "x86_64")]
    jit: Option<bpftime_jit::program::JitProgram>,
}

/// Which engine runs a loaded program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The interpreter (every access checked).
    Interpreter,
    /// Native code. `checked`: every memory access is checked like the interpreter's (a bad
    /// pointer traps instead of crashing the target); unchecked trusts the program.
    Jit {
        /// Check memory accesses.
        checked: bool,
    },
}

impl Engine {
    /// From the environment: `BPFTIME_NO_JIT` (set, non-empty) selects the interpreter;
    /// `BPFTIME_JIT_UNCHECKED=1` drops the per-access checks; the default is the checked JIT.
    pub fn from_env() -> Engine {
        let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty() && x != "0");
        if set("BPFTIME_NO_JIT") {
            Engine::Interpreter
        } else {
            Engine::Jit {
                checked: !set("BPFTIME_JIT_UNCHECKED"),
            }
        }
    }
}

/// Why a program could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store or a map failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The loader checks rejected it.
    #[error("program rejected: {0}")]
    Verify(#[from] VerifyError),
    /// The JIT could not compile it.
    #[error("JIT: {0}")]
    Jit(#[from] bpftime_jit::JitError),
    /// A map reference the runtime cannot resolve.
    #[error("instruction {pc}: {what}")]
    Reloc {
        /// Slot.
        pc: usize,
        /// Why.
        what: String,
    },
}

impl LoadError {
    /// The kernel's errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            LoadError::Runtime(e) => e.errno(),
            LoadError::Verify(_) | LoadError::Reloc { .. } | LoadError::Jit(_) => libc::EINVAL,
        }
    }
}

impl LoadedProg {
    /// Loads program `id` from `store`.
    pub fn load(
        store: &Arc<Store>,
        id: u32,
        helpers: Arc<HelperRegistry>,
    ) -> Result<Self, LoadError> {
        let rec = read_prog(store, id)?;
        Self::from_insns(store, id, rec.name, rec.insns, helpers)
    }

    /// Relocates and checks `insns` (map references as object ids in `store`).
    pub fn from_insns(
        store: &Arc<Store>,
        id: u32,
        name: String,
        mut insns: Vec<Insn>,
        helpers: Arc<HelperRegistry>,
    ) -> Result<Self, LoadError> {
        let mut maps: Vec<Box<Map>> = Vec::new();
        let mut value_regions = Vec::new();
        let mut pc = 0;
        while pc < insns.len() {
            if insns[pc].code != LDDW {
                pc += 1;
                continue;
            }
            let op = decode(&insns, pc).map_err(|e| LoadError::Reloc {
                pc,
                what: e.to_string(),
            })?;
            let Op::LdImm64 { kind, lo, hi, .. } = op else {
                unreachable!("LDDW decodes to LdImm64");
            };
            let map_for = |maps: &mut Vec<Box<Map>>, map_id: u32| -> Result<usize, LoadError> {
                if let Some(i) = maps.iter().position(|m| m.id() == map_id) {
                    return Ok(i);
                }
                let m = Map::open(store, map_id).map_err(|e| LoadError::Reloc {
                    pc,
                    what: format!("map id {map_id}: {e}"),
                })?;
                maps.push(Box::new(m));
                Ok(maps.len() - 1)
            };
            let value: u64 = match kind {
                LdImmKind::Imm64 => {
                    pc += 2;
                    continue;
                }
                LdImmKind::MapFd => {
                    let i = map_for(&mut maps, lo as u32)?;
                    &*maps[i] as *const Map as u64
                }
                LdImmKind::MapValue => {
                    let i = map_for(&mut maps, lo as u32)?;
                    let m = &maps[i];
                    let off = hi as u32 as u64;
                    let vsize = u64::from(m.def().value_size);
                    if m.def().map_type != bpftime_maps::MapType::Array as u32 || off >= vsize {
                        return Err(LoadError::Reloc {
                            pc,
                            what: format!("direct value access at offset {off} of map {}", m.id()),
                        });
                    }
                    let base = m
                        .lookup_ptr(&0u32.to_ne_bytes())
                        .map_err(|e| LoadError::Reloc {
                            pc,
                            what: e.to_string(),
                        })? as u64;
                    // The whole data area: programs index arrays past element 0 through it.
                    value_regions.push(MemRegion {
                        start: base,
                        len: m.data_len(),
                        writable: m.def().flags & bpftime_maps::map::BPF_F_RDONLY_PROG == 0,
                    });
                    base + off
                }
                other => {
                    return Err(LoadError::Reloc {
                        pc,
                        what: format!("{other:?} references are not supported"),
                    });
                }
            };
            insns[pc] = Insn::new(LDDW, insns[pc].dst, 0, 0, value as u32 as i32);
            insns[pc + 1] = Insn::new(0, 0, 0, 0, (value >> 32) as u32 as i32);
            pc += 2;
        }
        let prog = verify(&insns, &helpers)?;
        let host = Box::new(ProgHost {
            maps: maps.iter().map(|m| &**m as *const Map as usize).collect(),
            ..ProgHost::default()
        });
        Ok(LoadedProg {
            id,
            name,
            prog,
            helpers,
            maps,
            host,
            value_regions,
            #[cfg(target_arch = "x86_64")]
            jit: None,
        })
    }

    /// Selects the engine: with [`Engine::Jit`] the program is compiled to native code now
    /// (x86_64; elsewhere the interpreter keeps running it).
    pub fn with_engine(mut self, engine: Engine) -> Result<Self, LoadError> {
        #[cfg(target_arch = "x86_64")]
        {
            self.jit = match engine {
                Engine::Interpreter => None,
                Engine::Jit { checked } => Some(bpftime_jit::program::JitProgram::new(
                    &self.prog,
                    &self.helpers,
                    &bpftime_jit::JitOptions { checked },
                )?),
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = engine;
        Ok(self)
    }

    /// The engine running this program.
    pub fn engine(&self) -> Engine {
        #[cfg(target_arch = "x86_64")]
        if let Some(j) = &self.jit {
            return Engine::Jit {
                checked: j.is_checked(),
            };
        }
        Engine::Interpreter
    }

    /// Object id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ids of the maps the program uses.
    pub fn map_ids(&self) -> Vec<u32> {
        self.maps.iter().map(|m| m.id()).collect()
    }

    /// Runs the program with `ctx` (e.g. a `struct pt_regs`) as its context; the program may
    /// read and write the `ctx_len` bytes at `ctx`.
    ///
    /// # Safety
    /// `ctx` must be valid for reads and writes of `ctx_len` bytes for the duration of the call.
    pub unsafe fn run(&self, ctx: *mut u8, ctx_len: usize) -> Result<u64, Trap> {
        // SAFETY: forwarded contract on `ctx`.
        unsafe { self.run_with_cookie(ctx, ctx_len, 0) }
    }

    /// [`LoadedProg::run`] for an attachment with a BPF cookie (`bpf_get_attach_cookie`
    /// returns it during the run).
    ///
    /// # Safety
    /// As [`LoadedProg::run`].
    pub unsafe fn run_with_cookie(
        &self,
        ctx: *mut u8,
        ctx_len: usize,
        cookie: u64,
    ) -> Result<u64, Trap> {
        let _cookie = crate::helpers::CookieGuard::set(cookie);
        // Ring buffer records the program leaves uncommitted are discarded when it ends.
        let _commit = crate::buffers::RunGuard(&self.maps);
        #[cfg(target_arch = "x86_64")]
        if let Some(j) = &self.jit {
            let run = |gm: &mut _, r1, r2, host| j.run_in(gm, r1, r2, host);
            // SAFETY: forwarded contract on `ctx`.
            return unsafe {
                exec::run_on_thread_memory(&run, &self.host, &self.value_regions, ctx, ctx_len)
            };
        }
        let interp = Interpreter::new(&self.prog, &self.helpers);
        let run = |gm: &mut _, r1, r2, host| interp.run_in(gm, r1, r2, host);
        // SAFETY: forwarded contract on `ctx`.
        unsafe { exec::run_on_thread_memory(&run, &self.host, &self.value_regions, ctx, ctx_len) }
    }
}
