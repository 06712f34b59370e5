//! A program loaded from the store into this process, ready to run.
//!
//! Loading resolves the map references the store keeps as object ids: `lddw` with
//! `BPF_PSEUDO_MAP_FD` becomes the address of a process-local [`Map`] handle (what map helpers
//! receive, as the kernel passes `struct bpf_map *`), `BPF_PSEUDO_MAP_VALUE` becomes the
//! address of the value inside the map's data (global variables: `.bss`, `.data`, `.rodata`).
//! The result is checked by the VM's loader checks against this runtime's helpers.
//!
//! Tail calls (`bpf_tail_call`, helper 12) read the program array at call time, as the kernel
//! does, so slots the loader fills or changes after attaching take effect at the next call. The
//! program in a slot is a store object id; it is resolved to a program loaded in this process
//! (for the engine of the running program) through a per-process table, loading it on first
//! use: a tail-call target need not be attached anywhere.

use crate::exec;
use crate::host::ProgHost;
use crate::object::{RuntimeError, read_prog};
use bpftime_maps::{Map, MapType, Store};
use bpftime_vm::helper::{CallEnv, HelperRegistry, MemRegion, TailTarget};
use bpftime_vm::interpreter::{Interpreter, Trap};
use bpftime_vm::isa::{Insn, LdImmKind, Op, decode};
use bpftime_vm::opcode::{CALL, LDDW};
use bpftime_vm::verifier::{Program, VerifyError, verify};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

/// A loaded, checked program with the maps it uses.
#[derive(Debug)]
pub struct LoadedProg {
    id: u32,
    /// Store payload offset of the program object (0 when not loaded from the store): with
    /// `id`, tells this program from a later one reusing the id.
    payload_off: u64,
    name: String,
    prog: Arc<Program>,
    helpers: Arc<HelperRegistry>,
    #[allow(
        clippy::vec_box,
        reason = "boxed so their addresses, baked into the instructions, never move"
    )]
    maps: Vec<Box<Map>>,
    host: Box<ProgHost>,
    value_regions: Vec<MemRegion>,
    /// The program calls `bpf_tail_call`: its runs are registered for the helper.
    tail_calls: bool,
    /// The program may reserve ring buffer records (a ring buffer map, or a map of maps that
    /// may hold one): leftovers are discarded when its runs end.
    reserves: bool,
    /// The program may read its attach cookie (`bpf_get_attach_cookie`, or a tail call or
    /// `callx` that might): runs set it only then.
    uses_cookie: bool,
    /// The program may call `bpf_override_return` (directly, through a tail call or `callx`).
    may_override: bool,
    /// The program may call `bpf_get_func_ip` (likewise).
    uses_func_ip: bool,
    /// The JIT inlined every map lookup and update, and the program calls no helper that
    /// asks which CPU it runs on (directly or possibly): runs read the CPU for the inlined
    /// per-CPU accesses without pinning it (`bpftime_maps::shm::pin_cpu`, a thread-local).
    pin_free: bool,
    /// A tracing program (by its type): runs get the context read-only, as the kernel's
    /// verifier allows no stores into it.
    ctx_read_only: bool,
    /// Unique among the programs of this process, renewed whenever `value_regions` changes
    /// (runs on a thread keep its memory's regions while the serial and context match).
    serial: u64,
    #[cfg(target_arch = "x86_64")]
    jit: Option<bpftime_jit::program::JitProgram>,
}

/// Which engine runs a loaded program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
        let payload_off = store.object(id).map_or(0, |o| o.payload_off);
        let mut p = Self::from_insns(store, id, rec.name, rec.insns, helpers)?;
        p.payload_off = payload_off;
        // The kernel's verifier refuses stores into the context of tracing programs (kprobe /
        // uprobe `pt_regs`, tracepoint records, perf events, raw tracepoints, fentry): their
        // runs get it read-only, so a store traps instead of changing the probed thread's
        // registers (a stub resumes from `pt_regs`).
        p.ctx_read_only = matches!(rec.prog_type, 2 | 5 | 7 | 17 | 26);
        Ok(p)
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
                // A function reference (callbacks) stays for the loader checks and the engines.
                LdImmKind::Imm64 | LdImmKind::Func => {
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
        let tail_calls = insns
            .iter()
            .any(|i| i.code == CALL && i.src == 0 && i.imm == crate::helpers::TAIL_CALL as i32);
        let dynamic = tail_calls || insns.iter().any(|i| i.code == bpftime_vm::opcode::CALLX);
        let calls = |id: u32| {
            dynamic
                || insns
                    .iter()
                    .any(|i| i.code == CALL && i.src == 0 && i.imm == id as i32)
        };
        let uses_cookie = calls(crate::helpers::GET_ATTACH_COOKIE);
        let may_override = calls(crate::helpers::OVERRIDE_RETURN);
        let uses_func_ip = calls(crate::helpers::GET_FUNC_IP);
        let reserves = maps.iter().any(|m| {
            [MapType::RingBuf, MapType::ArrayOfMaps, MapType::HashOfMaps]
                .iter()
                .any(|&t| m.def().map_type == t as u32)
        });
        let host = Box::new(ProgHost {
            maps: maps.iter().map(|m| &**m as *const Map as usize).collect(),
            ..ProgHost::default()
        });
        Ok(LoadedProg {
            id,
            payload_off: 0,
            name,
            prog: Arc::new(prog),
            helpers,
            maps,
            host,
            value_regions,
            tail_calls,
            reserves,
            uses_cookie,
            may_override,
            uses_func_ip,
            serial: next_serial(),
            pin_free: false,
            ctx_read_only: false,
            #[cfg(target_arch = "x86_64")]
            jit: None,
        })
    }

    /// Selects the engine: with [`Engine::Jit`] the program is compiled to native code now
    /// (x86_64; elsewhere the interpreter keeps running it).
    pub fn with_engine(mut self, engine: Engine) -> Result<Self, LoadError> {
        self.serial = next_serial();
        self.pin_free = false;
        #[cfg(target_arch = "x86_64")]
        {
            self.jit = match engine {
                Engine::Interpreter => None,
                Engine::Jit { checked } => {
                    // Array and per-CPU array lookups and updates are inlined, as the kernel's
                    // verifier does; a checked run may then access those maps' data areas.
                    let inline = crate::host::inline_maps(&self.host);
                    for (_, area) in &inline {
                        if !self.value_regions.contains(area) {
                            self.value_regions.push(*area);
                        }
                    }
                    // A native entry too when the program needs no helper (probe stubs
                    // call it directly): its regions are the ones hosted runs grant.
                    let native = bpftime_jit::NativeOptions {
                        ctx_writable: !self.ctx_read_only,
                        cpu_id_tp_offset: bpftime_maps::shm::rseq_cpu_id_offset(),
                        regions: self
                            .value_regions
                            .iter()
                            .map(|r| (r.start, r.len, r.writable))
                            .collect(),
                    };
                    let opts = bpftime_jit::JitOptions {
                        checked,
                        inline_maps: inline.into_iter().map(|(m, _)| m).collect(),
                        // Global data and inlined maps' data areas stay mapped while the
                        // program is loaded: accesses proved inside them need no test.
                        static_regions: native.regions.clone(),
                        native: Some(native),
                    };
                    let j =
                        bpftime_jit::program::JitProgram::new(&self.prog, &self.helpers, &opts)?;
                    self.pin_free = j.compiled().map_helper_calls == 0 && self.calls_cpu_free();
                    Some(j)
                }
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = engine;
        Ok(self)
    }

    /// The JIT's native entry (`bpftime_jit::abi::NativeEntry`) when the program has one: it
    /// calls no helper, so a probe may run it directly on its context, without this
    /// process's run state (see `bpftime_jit::NativeOptions`). It gives the same results as
    /// [`LoadedProg::run_in`] (the CPU is read as for a program that needs no pin). Valid
    /// while `self` lives.
    #[cfg(target_arch = "x86_64")]
    pub fn native_entry(&self) -> Option<bpftime_jit::abi::NativeEntry> {
        self.jit.as_ref()?.native_entry()
    }

    /// Which of the first 64 context bytes the native entry's program may read (bit i for
    /// byte i; every bit without a native entry or when that cannot be told).
    #[cfg(target_arch = "x86_64")]
    pub fn native_ctx_reads(&self) -> u64 {
        self.jit
            .as_ref()
            .map_or(u64::MAX, |j| j.compiled().ctx_reads)
    }

    /// Why the program has no native entry (`None` when it has one or is interpreted).
    #[cfg(target_arch = "x86_64")]
    pub fn native_refused(&self) -> Option<&str> {
        self.jit.as_ref()?.compiled().native_refused.as_deref()
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

    /// Whether every helper the program calls leaves the CPU alone (map lookups and updates
    /// are checked apart: inlined, they use the run's CPU), with no tail call or `callx` that
    /// could reach another.
    fn calls_cpu_free(&self) -> bool {
        use crate::helpers as h;
        const CPU_FREE: [u32; 11] = [
            1,
            2,
            5,
            h::GET_CURRENT_PID_TGID,
            h::GET_CURRENT_UID_GID,
            h::GET_CURRENT_COMM,
            h::OVERRIDE_RETURN,
            h::KTIME_GET_BOOT_NS,
            h::KTIME_GET_COARSE_NS,
            h::GET_FUNC_IP,
            h::GET_ATTACH_COOKIE,
        ];
        !self.tail_calls
            && self.prog.ops().iter().flatten().all(|op| match *op {
                Op::Call { id } => CPU_FREE.contains(&id),
                Op::Callx { .. } => false,
                _ => true,
            })
    }

    /// Whether a run may call `bpf_override_return` (whose value
    /// [`crate::helpers::take_override`] then gives): runners need not look otherwise.
    pub fn may_override(&self) -> bool {
        self.may_override
    }

    /// Whether a run may call `bpf_get_func_ip` (runners that set the function's address with
    /// [`crate::helpers::FuncIpGuard`] need not otherwise).
    pub fn uses_func_ip(&self) -> bool {
        self.uses_func_ip
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
        // SAFETY: forwarded contract.
        unsafe { self.run_on(None, ctx, ctx_len, cookie) }
    }

    /// [`LoadedProg::run_with_cookie`] inside a [`crate::exec::probe_hit`], on the state it
    /// borrowed (the probe hot path: no thread-local lookup of its own).
    ///
    /// # Safety
    /// As [`LoadedProg::run`].
    #[inline]
    pub unsafe fn run_in(
        &self,
        thread: &mut crate::exec::ThreadMem,
        ctx: *mut u8,
        ctx_len: usize,
        cookie: u64,
    ) -> Result<u64, Trap> {
        // SAFETY: forwarded contract.
        unsafe { self.run_on(Some(thread), ctx, ctx_len, cookie) }
    }

    #[inline]
    unsafe fn run_on(
        &self,
        thread: Option<&mut crate::exec::ThreadMem>,
        ctx: *mut u8,
        ctx_len: usize,
        cookie: u64,
    ) -> Result<u64, Trap> {
        let _cookie = self
            .uses_cookie
            .then(|| crate::helpers::CookieGuard::set(cookie));
        // One CPU for the whole run, as in the kernel (no migration mid-program): a per-CPU
        // lookup and the update that follows address the same slot.
        let pin = (!self.pin_free).then(bpftime_maps::shm::pin_cpu);
        // Ring buffer records the program leaves uncommitted are discarded when it ends (by
        // the last program of the run, after tail calls, then by this one). A program that
        // neither tail-calls nor can reserve records needs neither guard (the probe hot path).
        let _commit = self.reserves.then(|| crate::buffers::RunGuard(&self.maps));
        let _run = self.tail_calls.then(|| {
            exec::RunGuard::enter(self, self.engine(), |last| {
                if last.reserves {
                    crate::buffers::end_of_run(&last.maps)
                }
            })
        });
        #[cfg(target_arch = "x86_64")]
        if let Some(j) = &self.jit {
            let cpu = u64::from(
                pin.as_ref()
                    .map_or_else(bpftime_maps::shm::cpu_now, |p| p.cpu()),
            );
            // SAFETY: forwarded contract on `ctx`.
            return unsafe {
                exec::run_jit_on_thread(
                    thread,
                    j,
                    &self.host,
                    (self.serial, &self.value_regions, !self.ctx_read_only),
                    ctx,
                    ctx_len,
                    cpu,
                )
            };
        }
        let interp = Interpreter::new(&self.prog, &self.helpers);
        // SAFETY: forwarded contract on `ctx`.
        unsafe {
            exec::run_interpreter_on_thread(
                thread,
                &interp,
                &self.host,
                (self.serial, &self.value_regions, !self.ctx_read_only),
                ctx,
                ctx_len,
            )
        }
    }
}

/// A program serial never handed out before (see `LoadedProg::serial`).
fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Tail-call targets loaded in this process: (store, program id, engine) → program.
type TargetKey = (usize, u32, Engine);

static TARGETS: LazyLock<parking_lot::Mutex<HashMap<TargetKey, Arc<LoadedProg>>>> =
    LazyLock::new(Default::default);

/// Program `id` of `store`, loaded for `engine` (from the table, or now).
fn tail_target(
    store: &Arc<Store>,
    id: u32,
    engine: Engine,
    helpers: &Arc<HelperRegistry>,
) -> Option<Arc<LoadedProg>> {
    let key = (Arc::as_ptr(store) as usize, id, engine);
    let live = store.object(id).map(|o| o.payload_off);
    if let Some(p) = TARGETS.lock().get(&key)
        && live == Some(p.payload_off)
    {
        return Some(p.clone());
    }
    // Loaded without the lock held (compiling takes a while); a concurrent load of the same
    // program is harmless, the last one stays in the table.
    let p = match LoadedProg::load(store, id, helpers.clone()).and_then(|p| p.with_engine(engine)) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::warn!("tail call target {id} cannot be loaded: {e}");
            return None;
        }
    };
    let mut t = TARGETS.lock();
    // Forget programs that are gone from the store.
    t.retain(|&(s, i, _), q| {
        s != key.0 || store.object(i).map(|o| o.payload_off) == Some(q.payload_off)
    });
    t.insert(key, p.clone());
    Some(p)
}

fn neg(errno: i32) -> u64 {
    (-i64::from(errno)) as u64
}

/// `bpf_tail_call(ctx, prog_array, index)` (helper 12) for the running program: checks in the
/// kernel's order (`bpf_tail_call` in `kernel/bpf/core.c`) — a program array, `index` (as u32)
/// in range, fewer than 33 tail calls so far (counted from here on), a filled slot — then
/// resolves the slot's program and tells the engine to start it
/// ([`CallEnv::tail_call`]): its map handles, global data and JIT code. A failed call falls
/// through with a negative errno (`-ENOENT`; `-EINVAL` for a bad map or inside a callback).
pub(crate) fn tail_call(env: &mut CallEnv, map: u64, index: u64) -> u64 {
    if env.in_callback() {
        return neg(libc::EINVAL);
    }
    let Some(m) = crate::host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if m.def().map_type != MapType::ProgArray as u32 {
        return neg(libc::EINVAL);
    }
    let index = index as u32;
    if index >= m.def().max_entries || !env.count_tail_call() {
        return neg(libc::ENOENT);
    }
    let Some(id) = m.prog_array_get(index) else {
        return neg(libc::ENOENT);
    };
    exec::with_current_run(|run| {
        let Some(run) = run else {
            return neg(libc::EINVAL);
        };
        let helpers = run.current().helpers.clone();
        let Some(target) = tail_target(m.store(), id, run.engine, &helpers) else {
            return neg(libc::ENOENT);
        };
        // The kernel's verifier refuses a tail call while a ring buffer record is held; ours
        // cannot, so whatever the caller left uncommitted is discarded here.
        crate::buffers::end_of_run(&run.current().maps);
        env.host = &*target.host as *const ProgHost as *mut std::ffi::c_void;
        for r in &target.value_regions {
            // SAFETY: the target's global data lives in its map handles' store mapping, and
            // the target stays alive until the run ends (`RunState::enter` below).
            unsafe { env.grant(r.start, r.len, r.writable) };
        }
        #[cfg(target_arch = "x86_64")]
        let entry = target
            .jit
            .as_ref()
            .map_or(std::ptr::null(), |j| j.tail_entry());
        #[cfg(not(target_arch = "x86_64"))]
        let entry = std::ptr::null();
        let next = TailTarget {
            prog: target.prog.clone(),
            helpers: target.helpers.clone(),
        };
        // SAFETY: `entry` is null or the tail entry of the target's JIT code, compiled for the
        // run's engine (the table is keyed by it) and kept mapped by `run.enter` until the run
        // ends.
        unsafe { env.tail_call(next, entry) };
        run.enter(target);
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{ProgRecord, create_prog};
    use bpftime_maps::MapDef;
    use bpftime_maps::map::BPF_ANY;
    use bpftime_vm::asm::assemble;

    struct TempStore {
        store: Arc<Store>,
        path: std::path::PathBuf,
    }

    impl TempStore {
        fn new() -> TempStore {
            let path = std::env::temp_dir().join(format!(
                "bpftime-rt-tail-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            TempStore {
                store: Arc::new(Store::open(&path).unwrap()),
                path,
            }
        }

        fn map(&self, map_type: MapType, value_size: u32, max_entries: u32) -> Map {
            let def = MapDef {
                map_type: map_type as u32,
                key_size: 4,
                value_size,
                max_entries,
                flags: 0,
            };
            Map::create(&self.store, def, "m").unwrap()
        }

        fn prog(&self, src: &str) -> u32 {
            let insns = assemble(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
            let rec = ProgRecord {
                prog_type: 2,
                expected_attach_type: 0,
                name: "t".into(),
                insns,
            };
            create_prog(&self.store, &rec).unwrap()
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    const ENGINES: [Engine; 3] = [
        Engine::Interpreter,
        Engine::Jit { checked: true },
        Engine::Jit { checked: false },
    ];

    fn load(t: &TempStore, id: u32, engine: Engine) -> LoadedProg {
        LoadedProg::load(&t.store, id, Arc::new(crate::helpers::registry()))
            .unwrap()
            .with_engine(engine)
            .unwrap()
    }

    /// `counts[slot] += 1` (array map `counts`), r0 = `ret`.
    fn counter(counts: u32, slot: u32, ret: u32) -> String {
        format!(
            "stw [%r10-4], {slot}
             lddw %r1, map_fd {counts}
             mov %r2, %r10
             add %r2, -4
             call 1
             jeq %r0, 0, out
             mov %r1, 1
             lock add [%r0+0], %r1
             out:
             mov %r0, {ret}
             exit"
        )
    }

    fn count(m: &Map, slot: u32) -> u64 {
        let mut v = [0u8; 8];
        m.lookup(&slot.to_ne_bytes(), &mut v).unwrap();
        u64::from_ne_bytes(v)
    }

    fn run(p: &LoadedProg, arg: u64) -> u64 {
        let mut regs = [0u64; 21];
        regs[14] = arg;
        // SAFETY: `regs` is a live, writable 168-byte buffer.
        unsafe { p.run(regs.as_mut_ptr().cast(), 168) }.unwrap()
    }

    #[test]
    fn dispatcher_tail_calls_into_targets_that_count_exactly() {
        for engine in ENGINES {
            let t = TempStore::new();
            let progs = t.map(MapType::ProgArray, 4, 4);
            let counts = t.map(MapType::Array, 8, 8);
            // Slot k: counts[k] += 1, returns 100 + k. Slot 3 stays empty.
            let targets: Vec<u32> = (0..3)
                .map(|k| t.prog(&counter(counts.id(), k, 100 + k)))
                .collect();
            for (k, &id) in targets.iter().enumerate() {
                progs
                    .update_id(&(k as u32).to_ne_bytes(), id, BPF_ANY)
                    .unwrap();
            }
            // The dispatcher: tail-call slot PARM1 % 4; on fall-through counts[7] += 1.
            let dispatcher = t.prog(&format!(
                "mov %r6, %r1
                 ldxdw %r3, [%r1+112]
                 mod %r3, 4
                 lddw %r2, map_fd {}
                 call 12
                 mov %r1, %r6
                 {}",
                progs.id(),
                counter(counts.id(), 7, 7)
            ));
            let p = load(&t, dispatcher, engine);
            let mut sum = 0;
            for i in 0..400u64 {
                sum += run(&p, i);
            }
            assert_eq!(
                (0..8).map(|k| count(&counts, k)).collect::<Vec<_>>(),
                [100, 100, 100, 0, 0, 0, 0, 100],
                "{engine:?}"
            );
            assert_eq!(sum, 100 * (100 + 101 + 102 + 7), "{engine:?}");
        }
    }

    #[test]
    fn slot_updates_after_loading_take_effect_at_the_next_call() {
        for engine in ENGINES {
            let t = TempStore::new();
            let progs = t.map(MapType::ProgArray, 4, 1);
            let counts = t.map(MapType::Array, 8, 4);
            let a = t.prog(&counter(counts.id(), 0, 1));
            let b = t.prog(&counter(counts.id(), 1, 2));
            let caller = t.prog(&format!(
                "lddw %r2, map_fd {}
                 mov %r3, 0
                 call 12
                 mov %r0, 9
                 exit",
                progs.id()
            ));
            let p = load(&t, caller, engine);
            assert_eq!(run(&p, 0), 9, "empty slot: falls through");
            progs.update_id(&0u32.to_ne_bytes(), a, BPF_ANY).unwrap();
            assert_eq!(run(&p, 0), 1);
            progs.update_id(&0u32.to_ne_bytes(), b, BPF_ANY).unwrap();
            assert_eq!(run(&p, 0), 2);
            progs.delete_id(&0u32.to_ne_bytes()).unwrap();
            assert_eq!(run(&p, 0), 9);
            assert_eq!((count(&counts, 0), count(&counts, 1)), (1, 1), "{engine:?}");
        }
    }

    #[test]
    fn self_tail_calls_stop_after_33_per_run() {
        for engine in ENGINES {
            let t = TempStore::new();
            let progs = t.map(MapType::ProgArray, 4, 1);
            let counts = t.map(MapType::Array, 8, 1);
            let me = t.prog(&format!(
                "mov %r6, %r1
                 {}
                 mov %r1, %r6
                 lddw %r2, map_fd {}
                 mov %r3, 0
                 call 12
                 exit",
                counter(counts.id(), 0, 0).replace("mov %r0, 0\n             exit", ""),
                progs.id()
            ));
            progs.update_id(&0u32.to_ne_bytes(), me, BPF_ANY).unwrap();
            let p = load(&t, me, engine);
            for run_no in 1..=3 {
                run(&p, 0);
                assert_eq!(count(&counts, 0), 34 * run_no, "{engine:?}");
            }
        }
    }

    #[test]
    fn a_target_uses_its_own_maps_and_global_data() {
        for engine in ENGINES {
            let t = TempStore::new();
            let progs = t.map(MapType::ProgArray, 4, 1);
            let counts = t.map(MapType::Array, 8, 1);
            let data = t.map(MapType::Array, 16, 1);
            // The target, not the caller, uses `counts` and a global variable.
            let target = t.prog(&format!(
                "{}
                 lddw %r2, map_value {}+8
                 ldxdw %r3, [%r2+0]
                 add %r3, 5
                 stxdw [%r2+0], %r3
                 mov %r0, %r3
                 exit",
                counter(counts.id(), 0, 0).replace("mov %r0, 0\n             exit", ""),
                data.id()
            ));
            progs
                .update_id(&0u32.to_ne_bytes(), target, BPF_ANY)
                .unwrap();
            let caller = t.prog(&format!(
                "lddw %r2, map_fd {}
                 mov %r3, 0
                 call 12
                 exit",
                progs.id()
            ));
            let p = load(&t, caller, engine);
            assert_eq!(run(&p, 0), 5);
            assert_eq!(run(&p, 0), 10);
            assert_eq!(count(&counts, 0), 2, "{engine:?}");
        }
    }

    /// `bpf_for_each_map_elem(map, cb, &acc, flags)` where `cb` adds the value's first u64 to
    /// acc[0], the key's first u32 to acc[1], counts in acc[2], bumps the value, and stops
    /// when the key is `stop`; r0 = calls * 1000 + acc[2].
    fn for_each(map: u32, flags: u32, stop: u32) -> String {
        format!(
            "stdw [%r10-24], 0
             stdw [%r10-16], 0
             stdw [%r10-8], 0
             lddw %r1, map_fd {map}
             lddw %r2, func cb
             mov %r3, %r10
             add %r3, -24
             mov %r4, {flags}
             call 164
             mov %r6, %r0
             mul %r6, 1000
             ldxdw %r1, [%r10-8]
             add %r6, %r1
             mov %r0, %r6
             exit
             cb:
             ldxdw %r5, [%r4+0]
             ldxdw %r6, [%r3+0]
             add %r5, %r6
             stxdw [%r4+0], %r5
             ldxw %r6, [%r2+0]
             ldxdw %r5, [%r4+8]
             add %r5, %r6
             stxdw [%r4+8], %r5
             ldxdw %r5, [%r4+16]
             add %r5, 1
             stxdw [%r4+16], %r5
             ldxdw %r5, [%r3+0]
             add %r5, 1
             stxdw [%r3+0], %r5
             mov %r0, 0
             jne %r6, {stop}, out
             mov %r0, 1
             out:
             exit"
        )
    }

    #[test]
    fn for_each_map_elem_visits_hash_and_array_elements() {
        for engine in ENGINES {
            let t = TempStore::new();
            let hash = t.map(MapType::Hash, 8, 16);
            for k in 1..=5u32 {
                hash.update(&k.to_ne_bytes(), &u64::from(10 * k).to_ne_bytes(), 0)
                    .unwrap();
            }
            let p = load(&t, t.prog(&for_each(hash.id(), 0, 99)), engine);
            assert_eq!(run(&p, 0), 5 * 1000 + 5, "{engine:?}");
            let mut v = [0u8; 8];
            hash.lookup(&3u32.to_ne_bytes(), &mut v).unwrap();
            assert_eq!(u64::from_ne_bytes(v), 31, "the callback wrote the value");
            // Stopping at one key: the call that stops counts.
            let p = load(&t, t.prog(&for_each(hash.id(), 0, 3)), engine);
            let r = run(&p, 0);
            assert!(
                r / 1000 >= 1 && r / 1000 <= 5 && r % 1000 == r / 1000,
                "{r}"
            );
            // An array: every index, in order.
            let array = t.map(MapType::Array, 8, 4);
            let p = load(&t, t.prog(&for_each(array.id(), 0, 2)), engine);
            assert_eq!(run(&p, 0), 3 * 1000 + 3, "{engine:?}");
            // Per-CPU array: this CPU's value.
            let pc = t.map(MapType::PercpuArray, 8, 2);
            let p = load(&t, t.prog(&for_each(pc.id(), 0, 99)), engine);
            assert_eq!(run(&p, 0), 2 * 1000 + 2, "{engine:?}");
            // Flags and maps the kernel refuses.
            let einval = (-22i64 as u64).wrapping_mul(1000);
            let p = load(&t, t.prog(&for_each(hash.id(), 1, 99)), engine);
            assert_eq!(run(&p, 0), einval);
            let q = Map::create(
                &t.store,
                MapDef {
                    map_type: MapType::Queue as u32,
                    key_size: 0,
                    value_size: 8,
                    max_entries: 4,
                    flags: 0,
                },
                "q",
            )
            .unwrap();
            let p = load(&t, t.prog(&for_each(q.id(), 0, 99)), engine);
            assert_eq!(run(&p, 0), einval);
        }
    }

    #[test]
    fn bpf_loop_runs_in_the_runtime() {
        for engine in ENGINES {
            let t = TempStore::new();
            let counts = t.map(MapType::Array, 8, 1);
            // 7 iterations, each counting into the array through a map lookup.
            let src = format!(
                "mov %r1, 7
                 lddw %r2, func cb
                 mov %r3, 0
                 mov %r4, 0
                 call 181
                 exit
                 cb:
                 {}",
                counter(counts.id(), 0, 0)
            );
            let p = load(&t, t.prog(&src), engine);
            assert_eq!(run(&p, 0), 7);
            assert_eq!(count(&counts, 0), 7, "{engine:?}");
        }
    }

    /// Array and per-CPU array lookups and updates (the runtime's fast path) find the element
    /// the map's own lookups find, and refuse keys out of range as the map does.
    #[test]
    fn array_lookups_and_updates_hit_the_maps_own_elements() {
        for engine in ENGINES {
            let t = TempStore::new();
            for ty in [MapType::Array, MapType::PercpuArray] {
                let m = t.map(ty, 8, 4);
                // r0 = bpf_map_lookup_elem(m, &arg).
                let lookup = load(
                    &t,
                    t.prog(&format!(
                        "ldxdw %r6, [%r1+112]
                         stxw [%r10-4], %r6
                         lddw %r1, map_fd {}
                         mov %r2, %r10
                         add %r2, -4
                         call 1
                         exit",
                        m.id()
                    )),
                    engine,
                );
                // r0 = bpf_map_update_elem(m, &arg, &(arg + 100), BPF_ANY).
                let update = load(
                    &t,
                    t.prog(&format!(
                        "ldxdw %r6, [%r1+112]
                         stxw [%r10-4], %r6
                         add %r6, 100
                         stxdw [%r10-16], %r6
                         lddw %r1, map_fd {}
                         mov %r2, %r10
                         add %r2, -4
                         mov %r3, %r10
                         add %r3, -16
                         mov %r4, 0
                         call 2
                         exit",
                        m.id()
                    )),
                    engine,
                );
                for key in 0..4u32 {
                    let k = key.to_ne_bytes();
                    let p = run(&lookup, u64::from(key));
                    let own: Vec<u64> = if ty == MapType::Array {
                        vec![m.lookup_ptr(&k).unwrap() as u64]
                    } else {
                        (0..m.nr_cpus())
                            .filter_map(|c| {
                                let cpu = (0..4096).find(|&cpu| {
                                    bpftime_maps::percpu::slot_of_cpu(cpu, m.nr_cpus()) == Some(c)
                                })?;
                                m.lookup_percpu_ptr(&k, cpu).ok().map(|p| p as u64)
                            })
                            .collect()
                    };
                    assert!(
                        own.contains(&p),
                        "{engine:?} {ty:?} key {key}: {p:#x} {own:x?}"
                    );
                    assert_eq!(run(&update, u64::from(key)), 0, "{engine:?} {ty:?}");
                    // The value the update wrote is where the lookup points (per-CPU arrays:
                    // the thread may have moved to another CPU meanwhile, so only arrays).
                    if ty == MapType::Array {
                        let v = run(&lookup, u64::from(key));
                        let mut b = [0u8; 8];
                        assert!(crate::host::read_user(v, &mut b));
                        assert_eq!(u64::from_ne_bytes(b), u64::from(key) + 100);
                    }
                }
                assert_eq!(run(&lookup, 4), 0, "{engine:?} {ty:?}");
                assert_eq!(
                    run(&update, 4) as i64,
                    -i64::from(libc::E2BIG),
                    "{engine:?} {ty:?}"
                );
            }
        }
    }
}
