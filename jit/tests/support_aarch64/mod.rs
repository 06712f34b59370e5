//! Runs code from the aarch64 backend under Unicorn (an AArch64 "max" CPU, which has LSE).
//!
//! # Memory model
//!
//! Everything the program and its helpers share with the host is *identity-mapped*: the host
//! memory of the [`JitContext`], the helper env, the `callx` table, the memory block and the
//! [`GuestMemory`] stack are mapped into the emulator at their host addresses with
//! `mem_map_ptr`, backed by the same bytes. So pointers mean the same on both sides: helpers
//! run on the host with the registers the emulated code passed, write the env the code then
//! reads, and the interpreter can run on the very same block and stack, so trap addresses of
//! the two engines compare directly. Guest-only regions (the code, the native stack and the
//! trampolines) live at fixed low addresses no x86_64 Linux process uses.
//!
//! # Helpers and the checker
//!
//! Code is compiled with [`compile_with`] so that helper `id` is called at
//! `TRAMPOLINES + 4 * (FIRST_HELPER_SLOT + id)`, a page of `ret` instructions. A code hook on
//! that page reads x0–x5, calls the host helper (or, for slot [`CHECK_SLOT`], the checker that
//! `ctx.check` points at) and writes x0; the `ret` then returns to the generated code.
//!
//! # Invariants
//!
//! The identity-mapped host memory ([`HostPages`] and the `GuestMemory` stack pages) lives as
//! long as the [`Emu`] that mapped it, never moves, and is only touched by the host while the
//! emulator is stopped (or from its hooks, synchronously).

#![allow(dead_code)]

use bpftime_jit::aarch64::compile_with;
use bpftime_jit::abi::{CallbackFrame, JitContext, TailCallTable, trap};
use bpftime_jit::{CompiledCode, JitError, JitOptions};
use bpftime_vm::helper::{
    CallEnv, CallStatus, CallbackError, HelperFn, HelperRegistry, MAX_HELPER_ID, MemRegion,
    func_token_pc,
};
use bpftime_vm::interpreter::{Trap, TrapKind};
use bpftime_vm::memory::{FRAME_SIZE, GuestMemory, MAX_FRAMES};
use bpftime_vm::verifier::Program;
use std::alloc::Layout;
use std::cell::RefCell;
use std::ffi::c_void;
use std::mem::offset_of;
use unicorn_engine::{Arch, Arm64CpuModel, HookType, Mode, Prot, RegisterARM64, Unicorn};

const PAGE: u64 = 4096;
/// Trampoline page(s): `ret` instructions.
pub const TRAMPOLINES: u64 = 0x1000_0000;
/// Slot of the memory checker.
pub const CHECK_SLOT: u64 = 0;
/// Slot the entry returns to: the emulation stops there.
pub const EXIT_SLOT: u64 = 1;
/// Slot of helper 0.
pub const FIRST_HELPER_SLOT: u64 = 2;
const TRAMPOLINE_BYTES: u64 =
    (4 * (FIRST_HELPER_SLOT + MAX_HELPER_ID as u64 + 1)).next_multiple_of(PAGE);
/// Where code is loaded.
pub const CODE_BASE: u64 = 0x2000_0000;
const CODE_BYTES: u64 = 64 << 20;
/// The native stack.
pub const STACK_BASE: u64 = 0x3000_0000;
const STACK_BYTES: u64 = 1 << 20;
/// Bytes of the memory block.
pub const BLOCK_BYTES: usize = 64 * 1024;

/// Offsets inside the context page.
const CTX_OFF: usize = 0;
const ENV_OFF: usize = 512;
const TABLE_OFF: usize = 1024;
const TABLE_ENTRIES: usize = 1024;
/// Callback frames ([`CallbackFrame`]), one per nesting level.
const FRAMES_OFF: usize = TABLE_OFF + 8 * TABLE_ENTRIES;
const FRAME_SLOT: usize = 64;
const CTX_PAGE_BYTES: usize = FRAMES_OFF + FRAME_SLOT * MAX_FRAMES;
/// Tail-call tables: headers, then slot arrays.
const TAIL_PAGE_BYTES: usize = 4096;
const TAIL_SLOTS_OFF: usize = 1024;

/// What `ctx.mem` holds; the checker asserts it gets it back.
const MEM_ARG: u64 = 0x006d_656d;

/// Value written into every other register before a run, so code that relies on a register
/// it did not set shows up.
const POISON: u64 = 0x5a5a_5a5a_5a5a_5a5a;

fn x_reg(n: usize) -> RegisterARM64 {
    use RegisterARM64::*;
    const REGS: [RegisterARM64; 31] = [
        X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15, X16, X17, X18, X19,
        X20, X21, X22, X23, X24, X25, X26, X27, X28, X29, X30,
    ];
    REGS[n]
}

/// Page-aligned, zeroed host memory, freed on drop.
#[derive(Debug)]
pub struct HostPages {
    ptr: *mut u8,
    layout: Layout,
}

impl HostPages {
    fn new(bytes: usize) -> Self {
        let layout = Layout::from_size_align(bytes.next_multiple_of(PAGE as usize), PAGE as usize)
            .expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        HostPages { ptr, layout }
    }

    /// Host (= guest) address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn write_u64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len());
        // SAFETY: in bounds (checked above) of memory this struct owns; unaligned-tolerant.
        unsafe { self.ptr.add(off).cast::<u64>().write_unaligned(v) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len());
        // SAFETY: as in `write_u64`.
        unsafe { self.ptr.add(off).cast::<u64>().read_unaligned() }
    }

    fn read_u32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len());
        // SAFETY: as in `write_u64`.
        unsafe { self.ptr.add(off).cast::<u32>().read_unaligned() }
    }

    /// The bytes. Only while the emulator is stopped.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: owned, initialized (zeroed) memory of `len` bytes; `&mut self` makes the
        // borrow exclusive on the host, and the emulator does not run meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len()) }
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

thread_local! {
    /// Regions helpers granted during the current emulated run (see [`record_grant`]).
    static GRANTS: RefCell<Vec<MemRegion>> = const { RefCell::new(Vec::new()) };
    /// The emulator while a hook calls a host helper, so that the helper can call back into
    /// the emulated program ([`emu_callback`]).
    static CURRENT_UC: std::cell::Cell<*mut c_void> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    /// Callbacks running (nested emulations), for their frame slots.
    static LEVEL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Lets the emulated program access `r` for the rest of the run, in checked mode (what
/// `CallEnv::grant` does for the interpreter). Test helpers call both.
pub fn record_grant(r: MemRegion) {
    GRANTS.with(|g| g.borrow_mut().push(r));
}

/// State the hooks see.
#[derive(Debug, Default)]
pub struct HostState {
    helpers: Vec<Option<HelperFn>>,
    /// Regions the checker accepts besides the grants: the stack and the memory block.
    regions: Vec<MemRegion>,
    env_addr: u64,
    /// Set by a hook that found something wrong (reported by `run`).
    error: Option<String>,
    /// Helper and checker calls of the last run.
    pub calls: u64,
}

impl HostState {
    fn check(&self, addr: u64, len: u64, write: bool) -> bool {
        self.regions.iter().any(|r| r.contains(addr, len, write))
            || GRANTS.with(|g| g.borrow().iter().any(|r| r.contains(addr, len, write)))
    }
}

/// How one emulated run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// r0, or the trap the context recorded.
    pub result: Result<u64, Trap>,
    /// Emulated instructions are not counted; helper and checker calls are.
    pub host_calls: u64,
}

/// One emulated AArch64 CPU with the fixed mappings, reused for many runs.
pub struct Emu {
    uc: Unicorn<'static, HostState>,
    ctx_page: HostPages,
    tail_page: HostPages,
    tail_tables: u64,
    /// Checked mode: `(fast_start, fast_len, fast_wlen)` of the next runs.
    pub fast_region: Option<(u64, u64, u64)>,
    /// [`Emu::compile_and_run`] makes the block the fast region (default true).
    pub fast_region_for_block: bool,
    /// `ctx.check` is set (default true); otherwise null.
    pub check_enabled: bool,
    block: HostPages,
    gm: GuestMemory,
    code_len: usize,
    loads: u64,
    table_len: usize,
}

impl std::fmt::Debug for Emu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emu").finish_non_exhaustive()
    }
}

impl Emu {
    /// Sets up the CPU and all mappings.
    pub fn new() -> Self {
        let mut uc = Unicorn::new_with_data(Arch::ARM64, Mode::ARM, HostState::default())
            .expect("unicorn arm64");
        uc.ctl_set_cpu_model(Arm64CpuModel::MAX as i32)
            .expect("cpu model max (LSE atomics)");
        uc.mem_map(TRAMPOLINES, TRAMPOLINE_BYTES, Prot::READ | Prot::EXEC)
            .expect("map trampolines");
        let ret = 0xd65f_03c0u32.to_le_bytes();
        let rets: Vec<u8> = (0..TRAMPOLINE_BYTES / 4).flat_map(|_| ret).collect();
        uc.mem_write(TRAMPOLINES, &rets).expect("write trampolines");
        uc.mem_map(CODE_BASE, CODE_BYTES, Prot::READ | Prot::EXEC)
            .expect("map code");
        uc.mem_map(STACK_BASE, STACK_BYTES, Prot::READ | Prot::WRITE)
            .expect("map native stack");

        let ctx_page = HostPages::new(CTX_PAGE_BYTES);
        let tail_page = HostPages::new(TAIL_PAGE_BYTES);
        let block = HostPages::new(BLOCK_BYTES);
        let gm = GuestMemory::new();
        for (addr, len) in [
            (ctx_page.addr(), ctx_page.len() as u64),
            (tail_page.addr(), tail_page.len() as u64),
            (block.addr(), block.len() as u64),
        ] {
            // SAFETY: page-aligned host memory owned by the returned `Emu`, which also owns
            // `uc`: it outlives every use of the mapping (module invariants).
            unsafe { uc.mem_map_ptr(addr, len, Prot::READ | Prot::WRITE, addr as *mut c_void) }
                .unwrap_or_else(|e| panic!("identity-map {addr:#x}+{len:#x}: {e:?}"));
        }
        // The interpreter's stack: map the pages that hold it (it is a `Box` inside `gm`).
        let top = gm.frame_pointer(0);
        let base = top - (FRAME_SIZE * MAX_FRAMES) as u64;
        let (lo, hi) = (base & !(PAGE - 1), top.next_multiple_of(PAGE));
        // SAFETY: these pages hold the stack `Box` of `gm`, owned by the returned `Emu` and never
        // moved or freed before it; other heap data on the same pages is exposed to the guest,
        // which in checked mode never touches it and in unchecked mode is trusted, as natively.
        unsafe { uc.mem_map_ptr(lo, hi - lo, Prot::READ | Prot::WRITE, lo as *mut c_void) }
            .unwrap_or_else(|e| panic!("identity-map the stack {lo:#x}..{hi:#x}: {e:?}"));

        uc.add_code_hook(
            TRAMPOLINES,
            TRAMPOLINES + TRAMPOLINE_BYTES - 1,
            trampoline_hook,
        )
        .expect("trampoline hook");
        // Speed only: with any memory hook on the code region, Unicorn skips re-arming its
        // self-modifying-code tracking after each translation — a walk over the whole TLB
        // that otherwise costs about a third of the run time. The guest never writes its code
        // (mapped R+X; `load_at` drops stale translations itself), and this hook never fires.
        uc.add_mem_hook(
            HookType::MEM_FETCH_UNMAPPED,
            CODE_BASE,
            CODE_BASE + CODE_BYTES - 1,
            |_, _, _, _, _| false,
        )
        .expect("code-region memory hook");
        Emu {
            uc,
            ctx_page,
            tail_page,
            tail_tables: 0,
            fast_region: None,
            fast_region_for_block: true,
            check_enabled: true,
            block,
            gm,
            code_len: 0,
            loads: 0,
            table_len: 0,
        }
    }

    /// The memory block (host = guest address [`Emu::block_addr`]).
    pub fn block_mut(&mut self) -> &mut [u8] {
        self.block.bytes_mut()
    }

    /// Address of the memory block.
    pub fn block_addr(&self) -> u64 {
        self.block.addr()
    }

    /// The stack both engines use.
    pub fn guest_memory(&mut self) -> &mut GuestMemory {
        &mut self.gm
    }

    /// A copy of the whole eBPF stack (all frames).
    pub fn stack_bytes(&self) -> Vec<u8> {
        let n = FRAME_SIZE * MAX_FRAMES;
        let base = (self.gm.frame_pointer(0) - n as u64) as *const u8;
        // SAFETY: `[base, base + n)` is the stack `Box` owned by `self.gm`, alive and
        // initialized; the emulator is stopped and nothing holds a reference into it.
        unsafe { std::slice::from_raw_parts(base, n) }.to_vec()
    }

    /// Registers the helpers the next programs call (by id, through trampolines).
    pub fn set_helpers(&mut self, helpers: &HelperRegistry) {
        let max = helpers.ids().max().map_or(0, |m| m as usize + 1);
        assert!(
            max <= TABLE_ENTRIES,
            "callx table holds {TABLE_ENTRIES} ids"
        );
        let state = self.uc.get_data_mut();
        state.helpers = vec![None; max];
        for id in helpers.ids() {
            state.helpers[id as usize] = helpers.get(id).map(|h| h.func);
            self.ctx_page
                .write_u64(TABLE_OFF + 8 * id as usize, helper_trampoline(id));
        }
        for id in max..self.table_len {
            self.ctx_page.write_u64(TABLE_OFF + 8 * id, 0);
        }
        self.table_len = max;
    }

    /// Loads `code` at [`CODE_BASE`], dropping translations of what was there; returns the
    /// guest address of its entry.
    pub fn load(&mut self, code: &CompiledCode) -> u64 {
        self.load_at(0, code) + code.entry as u64
    }

    /// Loads `code` at `CODE_BASE + offset` (for several programs at once); returns the guest
    /// address of its first byte.
    pub fn load_at(&mut self, offset: u64, code: &CompiledCode) -> u64 {
        let len = code.code.len() as u64;
        assert!(offset + len <= CODE_BYTES, "code too large");
        let base = CODE_BASE + offset;
        self.uc.mem_write(base, &code.code).expect("write code");
        let end = base + (self.code_len as u64).max(len);
        self.uc
            .ctl_remove_cache(base, end)
            .expect("drop stale translations");
        self.code_len = len as usize;
        // Translations pile up in TCG's code buffer; starting it over now and then keeps
        // it in memory that is already faulted in.
        self.loads += 1;
        if self.loads.is_multiple_of(64) {
            self.uc.ctl_flush_tb().expect("flush translations");
        }
        base
    }

    /// Program arrays for `bpf_tail_call`: `(map handle, slots)` with each slot the guest
    /// address of a loaded program's tail entry, or 0.
    pub fn set_tail_tables(&mut self, tables: &[(u64, Vec<u64>)]) {
        let mut slots_off = TAIL_SLOTS_OFF;
        for (i, (map, slots)) in tables.iter().enumerate() {
            let h = i * size_of::<TailCallTable>();
            assert!(h + size_of::<TailCallTable>() <= TAIL_SLOTS_OFF);
            assert!(slots_off + 8 * slots.len() <= TAIL_PAGE_BYTES);
            let t = &self.tail_page;
            t.write_u64(h + offset_of!(TailCallTable, map), *map);
            t.write_u64(h + offset_of!(TailCallTable, len), slots.len() as u64);
            t.write_u64(
                h + offset_of!(TailCallTable, slots),
                t.addr() + slots_off as u64,
            );
            for (k, &a) in slots.iter().enumerate() {
                t.write_u64(slots_off + 8 * k, a);
            }
            slots_off += 8 * slots.len();
        }
        self.tail_tables = tables.len() as u64;
    }

    /// Runs loaded code once: `entry(r1, r2, ctx)` (a guest address from [`Emu::load`]), with
    /// `host` as `env.host`, the checker accepting the stack, `regions` and the grants.
    pub fn run(
        &mut self,
        entry: u64,
        r1: u64,
        r2: u64,
        regions: &[MemRegion],
        host: *mut c_void,
    ) -> Result<Outcome, String> {
        GRANTS.with(|g| g.borrow_mut().clear());
        let top = self.gm.frame_pointer(0);
        let stack = MemRegion {
            start: top - (FRAME_SIZE * MAX_FRAMES) as u64,
            len: (FRAME_SIZE * MAX_FRAMES) as u64,
            writable: true,
        };
        let ctx = self.ctx_page.addr() + CTX_OFF as u64;
        let env = self.ctx_page.addr() + ENV_OFF as u64;
        {
            let state = self.uc.get_data_mut();
            state.regions.clear();
            state.regions.push(stack);
            state.regions.extend_from_slice(regions);
            state.env_addr = env;
            state.error = None;
            state.calls = 0;
        }
        // The context, field by field at the ABI's offsets (`check` is a guest address, not a
        // host function, so no `JitContext` value is formed).
        let p = &self.ctx_page;
        for off in (0..size_of::<JitContext>()).step_by(8) {
            p.write_u64(CTX_OFF + off, 0);
        }
        p.write_u64(CTX_OFF + offset_of!(JitContext, frame_top), top);
        p.write_u64(CTX_OFF + offset_of!(JitContext, env), env);
        if self.check_enabled {
            p.write_u64(
                CTX_OFF + offset_of!(JitContext, check),
                TRAMPOLINES + 4 * CHECK_SLOT,
            );
        }
        p.write_u64(CTX_OFF + offset_of!(JitContext, mem), MEM_ARG);
        p.write_u64(
            CTX_OFF + offset_of!(JitContext, helpers),
            self.ctx_page.addr() + TABLE_OFF as u64,
        );
        p.write_u64(
            CTX_OFF + offset_of!(JitContext, helpers_len),
            self.table_len as u64,
        );
        p.write_u64(CTX_OFF + offset_of!(JitContext, stack_lo), stack.start);
        if let Some((start, len, wlen)) = self.fast_region {
            p.write_u64(CTX_OFF + offset_of!(JitContext, fast_start), start);
            p.write_u64(CTX_OFF + offset_of!(JitContext, fast_len), len);
            p.write_u64(CTX_OFF + offset_of!(JitContext, fast_wlen), wlen);
        }
        if self.tail_tables > 0 {
            p.write_u64(
                CTX_OFF + offset_of!(JitContext, tail_tables),
                self.tail_page.addr(),
            );
            p.write_u64(
                CTX_OFF + offset_of!(JitContext, tail_tables_len),
                self.tail_tables,
            );
        }
        let env_ptr = env as *mut CallEnv;
        const _: () = assert!(ENV_OFF + size_of::<CallEnv>() <= TABLE_OFF);
        // SAFETY: `env` is 8-aligned host memory of the context page, inside it (ENV_OFF +
        // size_of::<CallEnv>() <= TABLE_OFF), owned by `self`; the emulator is stopped. The
        // callback entry is sound with the context page as state (see `emu_callback`).
        unsafe {
            env_ptr.write(CallEnv::new(r1, host));
            (*env_ptr).set_callback(Some(emu_callback), ctx as *mut c_void);
        }

        for n in 0..=30 {
            self.uc.reg_write(x_reg(n), POISON ^ n as u64).unwrap();
        }
        self.uc.reg_write(RegisterARM64::X0, r1).unwrap();
        self.uc.reg_write(RegisterARM64::X1, r2).unwrap();
        self.uc.reg_write(RegisterARM64::X2, ctx).unwrap();
        let exit = TRAMPOLINES + 4 * EXIT_SLOT;
        self.uc.reg_write(RegisterARM64::X30, exit).unwrap();
        let sp = STACK_BASE + STACK_BYTES - 64;
        self.uc.reg_write(RegisterARM64::SP, sp).unwrap();

        if let Err(e) = self.uc.emu_start(entry, exit, 0, 0) {
            let pc = self.uc.pc_read().unwrap_or(0);
            return Err(format!(
                "emulation failed: {e:?} at pc {pc:#x} (code offset {:#x})",
                pc.wrapping_sub(CODE_BASE)
            ));
        }
        if let Some(e) = self.uc.get_data_mut().error.take() {
            return Err(e);
        }
        // AAPCS64: callee-saved registers and sp are preserved.
        for n in 19..=29 {
            let v = self.uc.reg_read(x_reg(n)).unwrap();
            if v != POISON ^ n as u64 {
                return Err(format!("x{n} not preserved: {v:#x}"));
            }
        }
        let got_sp = self.uc.reg_read(RegisterARM64::SP).unwrap();
        if got_sp != sp {
            return Err(format!("sp not restored: {got_sp:#x} != {sp:#x}"));
        }
        let r0 = self.uc.reg_read(RegisterARM64::X0).unwrap();
        let result = match self.trap() {
            Some(t) => {
                if r0 != 0 {
                    return Err(format!("trap {t:?} returned {r0:#x}, not 0"));
                }
                Err(t)
            }
            None => Ok(r0),
        };
        Ok(Outcome {
            result,
            host_calls: self.uc.get_data().calls,
        })
    }

    fn trap(&self) -> Option<Trap> {
        let p = &self.ctx_page;
        let kind = p.read_u32(CTX_OFF + offset_of!(JitContext, trap_kind));
        let pc = p.read_u32(CTX_OFF + offset_of!(JitContext, trap_pc)) as usize;
        let addr = p.read_u64(CTX_OFF + offset_of!(JitContext, trap_addr));
        let len = p.read_u64(CTX_OFF + offset_of!(JitContext, trap_len));
        let write = p.read_u64(CTX_OFF + offset_of!(JitContext, trap_write)) != 0;
        let kind = match kind {
            trap::NONE => return None,
            trap::OUT_OF_BOUNDS => TrapKind::OutOfBounds { addr, len, write },
            trap::MISALIGNED => TrapKind::Misaligned { addr, len },
            trap::UNKNOWN_HELPER => TrapKind::UnknownHelper { id: addr },
            trap::HELPER_FAULT => TrapKind::HelperFault { code: addr as u32 },
            trap::BUDGET => TrapKind::BudgetExhausted,
            k => panic!("unknown trap kind {k}"),
        };
        Some(Trap { kind, pc })
    }

    /// The context's tail-call counter after the last run.
    pub fn tail_calls(&self) -> u64 {
        self.ctx_page
            .read_u64(CTX_OFF + offset_of!(JitContext, tail_calls))
    }

    /// Compiles `prog` for emulation (helpers at their trampolines), loads and runs it on
    /// `mem` copied into the block (r1 = block address or 0 when `mem` is empty, r2 = length),
    /// then copies the block back into `mem`.
    pub fn compile_and_run(
        &mut self,
        prog: &Program,
        helpers: &HelperRegistry,
        opts: &JitOptions,
        mem: &mut [u8],
    ) -> Result<Result<u64, Trap>, String> {
        let code = compile(prog, helpers, opts).map_err(|e| e.to_string())?;
        self.set_helpers(helpers);
        let entry = self.load(&code);
        assert!(mem.len() <= BLOCK_BYTES);
        self.gm.reset();
        let addr = self.block_addr();
        self.block_mut()[..mem.len()].copy_from_slice(mem);
        let (r1, r2, region) = if mem.is_empty() {
            (0, 0, None)
        } else {
            let r = MemRegion {
                start: addr,
                len: mem.len() as u64,
                writable: true,
            };
            (addr, mem.len() as u64, Some(r))
        };
        self.fast_region = region
            .filter(|_| self.fast_region_for_block)
            .map(|r| (r.start, r.len, r.len));
        let regions: Vec<MemRegion> = region.into_iter().collect();
        let out = self.run(entry, r1, r2, &regions, std::ptr::null_mut())?;
        mem.copy_from_slice(&self.block_mut()[..mem.len()]);
        Ok(out.result)
    }
}

impl Default for Emu {
    fn default() -> Self {
        Self::new()
    }
}

/// Guest address that stands for helper `id`.
pub fn helper_trampoline(id: u32) -> u64 {
    TRAMPOLINES + 4 * (FIRST_HELPER_SLOT + u64::from(id))
}

/// Compiles for the emulator: helper calls go to their trampolines.
pub fn compile(
    prog: &Program,
    helpers: &HelperRegistry,
    opts: &JitOptions,
) -> Result<CompiledCode, JitError> {
    compile_with(prog, helpers, &|id, _| helper_trampoline(id), opts)
}

fn trampoline_hook(uc: &mut Unicorn<'_, HostState>, addr: u64, _size: u32) {
    let slot = (addr - TRAMPOLINES) / 4;
    let x: Vec<u64> = (0..6).map(|n| uc.reg_read(x_reg(n)).unwrap()).collect();
    let state = uc.get_data_mut();
    state.calls += 1;
    let r0 = match slot {
        CHECK_SLOT => {
            if x[0] != MEM_ARG {
                state.error = Some(format!("check called with mem {:#x}", x[0]));
            }
            u64::from(state.check(x[1], x[2], x[3] != 0))
        }
        EXIT_SLOT => return,
        _ => {
            let id = (slot - FIRST_HELPER_SLOT) as usize;
            let Some(Some(f)) = state.helpers.get(id).copied() else {
                state.error = Some(format!("call to trampoline of unregistered helper {id}"));
                uc.emu_stop().unwrap();
                return;
            };
            if x[5] != state.env_addr {
                state.error = Some(format!(
                    "helper {id} got env {:#x}, expected {:#x}",
                    x[5], state.env_addr
                ));
                uc.emu_stop().unwrap();
                return;
            }
            // SAFETY: x5 is the env this run wrote in the context page (checked just above),
            // host memory owned by the `Emu`; the emulator is paused in this hook, so the
            // helper has exclusive access to it for the call.
            let env = unsafe { &mut *(x[5] as *mut CallEnv) };
            let outer = CURRENT_UC.with(|c| c.replace((uc as *mut Unicorn<'_, HostState>).cast()));
            let r = f(x[0], x[1], x[2], x[3], x[4], env);
            CURRENT_UC.with(|c| c.set(outer));
            r
        }
    };
    // A C `bool` only defines the low byte: poison the rest to catch code that reads more.
    let r0 = if slot == CHECK_SLOT {
        r0 | 0xdead_be00
    } else {
        r0
    };
    uc.reg_write(RegisterARM64::X0, r0).unwrap();
    // Caller-saved registers are the callee's to clobber: prove the JIT does not rely on them.
    for n in 6..=17 {
        uc.reg_write(x_reg(n), POISON.rotate_left(n as u32))
            .unwrap();
    }
    for n in 1..=5 {
        uc.reg_write(x_reg(n), POISON.rotate_right(n as u32))
            .unwrap();
    }
}

/// The emulator's [`bpftime_vm::helper::CallbackFn`]: what `crate::program`'s `jit_callback`
/// does natively, with a nested emulation of the program's callback entry routine. The
/// function table is read from the emulated code; the frame is written to the context page.
///
/// # Safety
/// Called through `CallEnv::call_func` by a helper that `trampoline_hook` runs: `CURRENT_UC`
/// is the paused emulator (not otherwise used until the helper returns) and the env's state is
/// the context page of its `Emu`.
unsafe fn emu_callback(
    env: &mut CallEnv,
    func: u64,
    args: [u64; 5],
    grants: &[MemRegion],
) -> Result<u64, CallbackError> {
    let uc_ptr = CURRENT_UC
        .with(|c| c.get())
        .cast::<Unicorn<'static, HostState>>();
    // SAFETY: per the contract: the emulator paused in the hook that runs this helper.
    let uc = unsafe { uc_ptr.as_mut() }.ok_or(CallbackError::Invalid)?;
    let ctx = env.engine_state() as u64;
    let field = |off: usize| {
        // SAFETY: the context page (contract), identity-mapped host memory of the `Emu`.
        unsafe { ((ctx + off as u64) as *const u64).read_unaligned() }
    };
    let set_field = |off: usize, v: u64| {
        // SAFETY: as above.
        unsafe { ((ctx + off as u64) as *mut u64).write_unaligned(v) }
    };
    let pc = func_token_pc(func).ok_or(CallbackError::Invalid)?;
    let table = field(offset_of!(JitContext, funcs));
    let mut read = |addr: u64, buf: &mut [u8]| uc.mem_read(addr, buf).is_ok();
    let (entry, target, frames) =
        bpftime_jit::abi::find_callback(&mut read, table, pc).ok_or(CallbackError::Invalid)?;
    let cur_fp = field(offset_of!(JitContext, cur_fp));
    let fp =
        bpftime_jit::abi::callback_fp(field(offset_of!(JitContext, frame_top)), cur_fp, frames)
            .ok_or(CallbackError::Invalid)?;
    // One frame slot per nesting level (at most MAX_FRAMES: each level takes a frame).
    let level = LEVEL.with(|l| l.get());
    if level >= MAX_FRAMES {
        return Err(CallbackError::Invalid);
    }
    let frame_addr = ctx + (FRAMES_OFF + FRAME_SLOT * level) as u64;
    let frame = CallbackFrame { args, target, fp };
    // SAFETY: inside the context page (CTX_PAGE_BYTES covers MAX_FRAMES slots), 8-aligned.
    unsafe { (frame_addr as *mut CallbackFrame).write(frame) };
    let mark = GRANTS.with(|g| g.borrow().len());
    for g in grants {
        record_grant(*g);
    }
    let saved = uc.context_init().map_err(|_| CallbackError::Invalid)?;
    let sp = (uc
        .reg_read(RegisterARM64::SP)
        .unwrap_or(STACK_BASE + STACK_BYTES)
        - 256)
        & !15;
    let exit = TRAMPOLINES + 4 * EXIT_SLOT;
    for (reg, v) in [
        (RegisterARM64::X0, frame_addr),
        (RegisterARM64::X1, ctx),
        (RegisterARM64::X30, exit),
        (RegisterARM64::SP, sp),
    ] {
        uc.reg_write(reg, v).map_err(|_| CallbackError::Invalid)?;
    }
    env.enter_callback(true);
    LEVEL.with(|l| l.set(level + 1));
    let run = uc.emu_start(entry, exit, 0, 0);
    LEVEL.with(|l| l.set(level));
    env.enter_callback(false);
    let r0 = uc.reg_read(RegisterARM64::X0).unwrap_or(0);
    let _ = uc.context_restore(&saved);
    GRANTS.with(|g| g.borrow_mut().truncate(mark));
    set_field(offset_of!(JitContext, cur_fp), cur_fp);
    for k in 0..3 {
        set_field(offset_of!(JitContext, reserved) + 8 * k, 0);
    }
    if let Err(e) = run {
        uc.get_data_mut().error = Some(format!("nested emulation failed: {e:?}"));
        env.status = CallStatus::Trapped as u32;
        return Err(CallbackError::Stop);
    }
    let trap_kind =
        // SAFETY: as `field`, a u32.
        unsafe { ((ctx + offset_of!(JitContext, trap_kind) as u64) as *const u32).read() };
    if trap_kind != trap::NONE {
        env.status = CallStatus::Trapped as u32;
        return Err(CallbackError::Stop);
    }
    if env.status == CallStatus::Exit as u32 {
        return Err(CallbackError::Stop);
    }
    Ok(r0)
}
