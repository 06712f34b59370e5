//! Running a loaded program on this thread's reusable guest memory.
//!
//! # Invariants
//!
//! - Each thread owns one `GuestMemory` (thread-local), reused across runs: regions are reset
//!   before every run, so no run sees another run's regions.
//! - The regions added for a run are the context (valid per the caller's contract) and the
//!   program's map value areas, which live in the store mapping owned by the program's `Map`
//!   handles and stay mapped while the `LoadedProg` exists, i.e. beyond the run.
//! - A helper that runs another program on the same thread (not possible today) would find the
//!   memory borrowed; we detect that and run it on a fresh `GuestMemory` instead.

use crate::host::ProgHost;
use bpftime_vm::helper::MemRegion;
use bpftime_vm::interpreter::Trap;
use bpftime_vm::memory::GuestMemory;
use std::cell::RefCell;
use std::ffi::c_void;

thread_local! {
    static MEM: RefCell<GuestMemory> = RefCell::new(GuestMemory::new());
}

/// An engine's `run_in(gm, r1, r2, host)`: the interpreter's or the JIT's, same contract.
pub(crate) type RunIn<'a> =
    dyn Fn(&mut GuestMemory, u64, u64, *mut c_void) -> Result<u64, Trap> + 'a;

/// Runs a program with `ctx` in r1 on this thread's guest memory: `engine` is the interpreter's
/// or the JIT's `run_in` (same contract).
///
/// # Safety
/// `ctx` must be valid for reads and writes of `ctx_len` bytes during the call.
pub(crate) unsafe fn run_on_thread_memory(
    engine: &RunIn<'_>,
    host: &ProgHost,
    values: &[MemRegion],
    ctx: *mut u8,
    ctx_len: usize,
) -> Result<u64, Trap> {
    let go = |gm: &mut GuestMemory| {
        gm.clear_regions();
        // SAFETY: `ctx` per this function's contract; `values` per the module invariants.
        unsafe {
            if !ctx.is_null() && ctx_len > 0 {
                gm.add_region(MemRegion {
                    start: ctx as u64,
                    len: ctx_len as u64,
                    writable: true,
                });
            }
            for r in values {
                gm.add_region(*r);
            }
        }
        let host = host as *const ProgHost as *mut std::ffi::c_void;
        engine(gm, ctx as u64, 0, host)
    };
    // After the thread's TLS destructors ran (a system call traced at thread or process exit)
    // the thread memory is gone: use a fresh one.
    MEM.try_with(|m| match m.try_borrow_mut() {
        Ok(mut gm) => go(&mut gm),
        Err(_) => go(&mut GuestMemory::new()),
    })
    .unwrap_or_else(|_| go(&mut GuestMemory::new()))
}
