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
use bpftime_vm::interpreter::{Interpreter, Trap};
use bpftime_vm::memory::GuestMemory;
use std::cell::RefCell;

thread_local! {
    static MEM: RefCell<GuestMemory> = RefCell::new(GuestMemory::new());
}

/// Runs `interp` with `ctx` in r1.
///
/// # Safety
/// `ctx` must be valid for reads and writes of `ctx_len` bytes during the call.
pub(crate) unsafe fn run_interpreted(
    interp: &Interpreter<'_>,
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
        interp.run_in(gm, ctx as u64, 0, host)
    };
    MEM.with(|m| match m.try_borrow_mut() {
        Ok(mut gm) => go(&mut gm),
        Err(_) => go(&mut GuestMemory::new()),
    })
}
