//! The interpreter's side of [`CallEnv::call_func`]: helpers such as `bpf_loop` call back into
//! the program through it.
//!
//! # Invariants
//!
//! - [`Callbacks::call`] installs [`call_func`] with `engine` = the `Callbacks` value itself for
//!   exactly the duration of one helper call, and restores the previous entry afterwards, so
//!   `call_func` always finds a live `Callbacks` behind `env.engine_state()`.
//! - `Callbacks::gm` and `Callbacks::budget` come from the `&mut` borrows the interpreter's
//!   `Run::exec` holds while it calls the helper; the interpreter does not touch them until the
//!   helper returns, so the callback run is their only user meanwhile (as `CallEnv`'s guest
//!   memory pointer, which points at the same `GuestMemory`).

use crate::helper::{CallEnv, CallStatus, CallbackError, HelperFn, MemRegion, func_token_pc};
use crate::interpreter::{Budget, Run, Stop, Trap};
use crate::memory::{GuestMemory, MAX_FRAMES};

/// The state a callback run needs: the running program, the frame of the function that called
/// the helper, the run's memory and budget, and the trap a callback ended with.
pub(crate) struct Callbacks<'p> {
    /// The running program; `depth` is the frame of the function calling the helper.
    pub(crate) run: Run<'p>,
    pub(crate) gm: *mut GuestMemory,
    pub(crate) budget: *mut Budget,
    /// Set when a callback trapped: the program stops with this trap.
    pub(crate) trap: Option<Trap>,
}

impl<'p> Callbacks<'p> {
    /// Calls helper `func` with the program's r1–r5, able to call back.
    pub(crate) fn call(&mut self, func: HelperFn, regs: &[u64; 16], env: &mut CallEnv) -> u64 {
        let me: *mut Callbacks<'p> = self;
        // SAFETY: `call_func` is sound with `me` for this helper call (module invariants);
        // the previous entry is restored right after it.
        let old = unsafe { env.set_callback(Some(call_func), me.cast()) };
        let r = func(regs[1], regs[2], regs[3], regs[4], regs[5], env);
        // SAFETY: restores what was installed before this call.
        unsafe { env.set_callback(old.0, old.1) };
        r
    }
}

/// [`crate::helper::CallbackFn`] of the interpreter: runs callback `func` of the running program
/// in the frame below the calling function's, on the same memory and budget.
///
/// # Safety
/// `env.engine_state()` is the live [`Callbacks`] that installed this function (module
/// invariants); `grants` are valid for the call.
unsafe fn call_func(
    env: &mut CallEnv,
    func: u64,
    args: [u64; 5],
    grants: &[MemRegion],
) -> Result<u64, CallbackError> {
    // SAFETY: per this function's contract; no other reference to it is live (the helper
    // that called us holds only `env`).
    let cb = unsafe { &mut *env.engine_state().cast::<Callbacks<'_>>() };
    let pc = func_token_pc(func).ok_or(CallbackError::Invalid)?;
    let frames = cb
        .run
        .prog
        .callback_frames(pc)
        .ok_or(CallbackError::Invalid)?;
    let depth = cb.run.depth + 1;
    if depth + frames > MAX_FRAMES {
        return Err(CallbackError::Invalid);
    }
    // SAFETY: the interpreter's memory and budget, unused by it until the helper returns
    // (module invariants).
    let (gm, budget) = unsafe { (&mut *cb.gm, &mut *cb.budget) };
    let mark = gm.grants.len();
    for g in grants {
        gm.grants.grant(*g);
    }
    let mut regs = [0u64; 16];
    regs[1..6].copy_from_slice(&args);
    regs[10] = gm.frame_pointer(depth);
    let run = Run { depth, ..cb.run };
    env.enter_callback(true);
    let r = run.exec(gm, &mut regs, env, budget, pc);
    env.enter_callback(false);
    gm.grants.truncate(mark);
    match r {
        Ok(Stop::Return(_)) if env.status == CallStatus::Exit as u32 => Err(CallbackError::Stop),
        Ok(Stop::Return(v)) => Ok(v),
        // Not started inside callbacks (`Run::exec` drops the request).
        Ok(Stop::TailCall(_)) => Ok(regs[0]),
        Err(trap) => {
            cb.trap = Some(trap);
            env.status = CallStatus::Trapped as u32;
            Err(CallbackError::Stop)
        }
    }
}
