//! The helper ABI shared by the interpreter and the JIT.
//!
//! A helper is an `extern "C"` function of the five argument registers r1–r5 and a pointer to
//! the engine's [`CallEnv`]; it returns the new r0. Both engines call the same function pointer:
//! the JIT passes the env pointer as the sixth C argument (rdi, rsi, rdx, rcx, r8, r9 on x86_64;
//! x0–x5 on aarch64), so a helper call from JIT code is one indirect call, no dispatch.
//!
//! Helpers see the current program context (`env.ctx`), the host's own data (`env.host`), can
//! ask the engine to stop the program (`env.request_exit`, used by the conformance "unwind"
//! helper and `bpf_tail_call`-like control), report a fault (`env.fault`), and, when the engine
//! checks memory, grant the program access to memory they hand out (map values). Helpers read
//! and write the program's memory only through [`CallEnv::read_guest`]/[`CallEnv::write_guest`],
//! which check the interpreter's regions (and trust the pointer under the JIT).

use crate::memory::GuestMemory;
use std::ffi::c_void;
use std::fmt;

/// A helper function as both engines call it.
pub type HelperFn = extern "C" fn(u64, u64, u64, u64, u64, &mut CallEnv) -> u64;

/// What a helper asked the engine to do after it returned.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallStatus {
    /// Continue with r0 = the helper's return value.
    Continue = 0,
    /// Stop the program now; its result is `CallEnv::exit_value`.
    Exit = 1,
    /// The helper faulted (bad argument it cannot turn into an errno); the program traps.
    Fault = 2,
}

/// A memory region the program may access, as (start, length, writable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Stores allowed.
    pub writable: bool,
}

impl MemRegion {
    /// Whether `[addr, addr + len)` lies inside the region (and is writable if `write`).
    #[inline]
    pub fn contains(&self, addr: u64, len: u64, write: bool) -> bool {
        (!write || self.writable)
            && addr >= self.start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.start.wrapping_add(self.len))
    }
}

/// Regions granted at run time (map values returned by helpers), checked by the interpreter.
#[derive(Debug, Default)]
pub struct Grants {
    regions: Vec<MemRegion>,
}

impl Grants {
    /// Adds a region; adjacent duplicates are not re-added.
    pub fn grant(&mut self, r: MemRegion) {
        if self.regions.last() != Some(&r) && !self.regions.contains(&r) {
            self.regions.push(r);
        }
    }
    /// Whether any granted region holds the access.
    #[inline]
    pub fn allows(&self, addr: u64, len: u64, write: bool) -> bool {
        self.regions.iter().any(|r| r.contains(addr, len, write))
    }
    /// The granted region that holds the access, if any.
    pub fn find(&self, addr: u64, len: u64, write: bool) -> Option<MemRegion> {
        self.regions
            .iter()
            .find(|r| r.contains(addr, len, write))
            .copied()
    }
    /// Forgets every grant.
    pub fn clear(&mut self) {
        self.regions.clear();
    }
}

/// The engine state a helper can see. `#[repr(C)]`: JIT code reads `status` at a fixed offset.
#[repr(C)]
pub struct CallEnv {
    /// [`CallStatus`] as u32; JIT code checks it after helpers that may stop the program.
    pub status: u32,
    /// Helper-defined fault code when `status == Fault`.
    pub fault_code: u32,
    /// The program's result when `status == Exit`.
    pub exit_value: u64,
    /// The program context (initial r1).
    pub ctx: u64,
    /// Host data, opaque to the VM (the runtime's per-call state).
    pub host: *mut c_void,
    /// The interpreter's guest memory during a helper call; null when the engine does not
    /// check memory (JIT code).
    mem: *mut GuestMemory,
}

const _: () = assert!(std::mem::offset_of!(CallEnv, status) == 0);
const _: () = assert!(std::mem::offset_of!(CallEnv, exit_value) == 8);

impl fmt::Debug for CallEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallEnv")
            .field("status", &self.status)
            .field("fault_code", &self.fault_code)
            .field("exit_value", &self.exit_value)
            .field("ctx", &format_args!("{:#x}", self.ctx))
            .field("checked", &!self.mem.is_null())
            .finish()
    }
}

impl CallEnv {
    /// An env for one program run.
    pub fn new(ctx: u64, host: *mut c_void) -> Self {
        CallEnv {
            status: CallStatus::Continue as u32,
            fault_code: 0,
            exit_value: 0,
            ctx,
            host,
            mem: std::ptr::null_mut(),
        }
    }

    /// Lets helpers check against, and grant into, the interpreter's memory for one call.
    pub(crate) fn set_memory(&mut self, mem: &mut GuestMemory) {
        self.mem = mem;
    }

    /// Lets helpers check against, and grant into, `mem` for the rest of a run (the JIT's checked
    /// mode); null makes them trust pointers, as under unchecked JIT code.
    ///
    /// # Safety
    /// `mem` is null or points to a `GuestMemory` that stays alive, and is not otherwise borrowed
    /// while helpers run, until this env is dropped or given another memory.
    pub unsafe fn set_guest_memory(&mut self, mem: *mut GuestMemory) {
        self.mem = mem;
    }

    /// Stops the program after this helper returns, with result `value`.
    pub fn request_exit(&mut self, value: u64) {
        self.status = CallStatus::Exit as u32;
        self.exit_value = value;
    }

    /// Makes the program trap after this helper returns.
    pub fn fault(&mut self, code: u32) {
        self.status = CallStatus::Fault as u32;
        self.fault_code = code;
    }

    /// Whether the engine checks memory accesses.
    pub fn is_checked(&self) -> bool {
        !self.mem.is_null()
    }

    /// Lets the program access `[start, start + len)` (a map value this helper hands out).
    /// A no-op when the engine does not check memory.
    ///
    /// # Safety
    /// The range must be valid for reads (and writes if `writable`) until the program run ends,
    /// and not be accessed through Rust references meanwhile.
    pub unsafe fn grant(&mut self, start: u64, len: u64, writable: bool) {
        // SAFETY: forwarded contract; `mem` is null or set by `set_memory` for this call.
        unsafe {
            crate::memory::grant(
                self.mem,
                MemRegion {
                    start,
                    len,
                    writable,
                },
            )
        }
    }

    /// Copies guest memory at `addr` into `buf` (a key, a buffer the program passed).
    /// Returns false, copying nothing, when the engine checks memory and the program may not
    /// read that range. Without checks (JIT), the program is trusted to pass valid pointers.
    pub fn read_guest(&self, addr: u64, buf: &mut [u8]) -> bool {
        crate::memory::read_guest(self.mem, addr, buf)
    }

    /// Copies `data` into guest memory at `addr`; false (nothing written) when checked and the
    /// program may not write there.
    pub fn write_guest(&mut self, addr: u64, data: &[u8]) -> bool {
        crate::memory::write_guest(self.mem, addr, data)
    }
}

/// A registered helper.
#[derive(Clone, Copy)]
pub struct Helper {
    /// Name for logs and disassembly (`bpf_map_lookup_elem`).
    pub name: &'static str,
    /// The function.
    pub func: HelperFn,
    /// Whether it may set [`CallStatus::Exit`] or [`CallStatus::Fault`]; the JIT checks the
    /// status only after such helpers.
    pub may_stop: bool,
}

impl fmt::Debug for Helper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Helper")
            .field("name", &self.name)
            .field("may_stop", &self.may_stop)
            .finish()
    }
}

/// Helpers by id. Ids are the kernel's (`BPF_FUNC_map_lookup_elem` = 1, …).
#[derive(Clone, Debug, Default)]
pub struct HelperRegistry {
    table: Vec<Option<Helper>>,
}

/// Highest helper id accepted (the kernel has ~212; leave room for host extensions).
pub const MAX_HELPER_ID: u32 = 1 << 16;

impl HelperRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `func` under `id`, replacing any earlier one.
    ///
    /// # Panics
    /// If `id` is above [`MAX_HELPER_ID`] (a host programming error, not guest input).
    pub fn register(&mut self, id: u32, name: &'static str, func: HelperFn) -> &mut Self {
        self.insert(
            id,
            Helper {
                name,
                func,
                may_stop: false,
            },
        )
    }

    /// Registers a helper that may stop the program or fault.
    pub fn register_stopping(&mut self, id: u32, name: &'static str, func: HelperFn) -> &mut Self {
        self.insert(
            id,
            Helper {
                name,
                func,
                may_stop: true,
            },
        )
    }

    fn insert(&mut self, id: u32, h: Helper) -> &mut Self {
        assert!(id <= MAX_HELPER_ID, "helper id {id} out of range");
        let idx = id as usize;
        if self.table.len() <= idx {
            self.table.resize(idx + 1, None);
        }
        self.table[idx] = Some(h);
        self
    }

    /// The helper registered under `id`.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&Helper> {
        self.table.get(id as usize).and_then(Option::as_ref)
    }

    /// Whether `id` is registered.
    pub fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    /// Registered ids in order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.table
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|_| i as u32))
    }
}

/// Helper #5 of the conformance suite: returns r1; stops the program with r0 = 0 when r1 is 0.
pub extern "C" fn conformance_unwind(
    r1: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if r1 == 0 {
        env.request_exit(0);
    }
    r1
}

/// The helpers the bpf_conformance suite assumes (only #5, "unwind").
pub fn conformance_helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register_stopping(5, "unwind", conformance_unwind);
    h
}
