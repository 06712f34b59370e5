//! SIGINT and SIGTERM end a guest run cleanly (its probes detached, its objects removed)
//! instead of killing the host with its records still in the store. A second signal kills
//! as usual (the handler resets itself).
//!
//! # Invariants
//! The handler only stores to a static atomic, which is async-signal-safe; `sigaction` is
//! given a fully initialised `struct sigaction`.

use std::sync::atomic::{AtomicBool, Ordering};

static PENDING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    PENDING.store(true, Ordering::Relaxed);
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value; we set the
        // handler and flags before passing it, and `on_signal` is async-signal-safe
        // (module invariant).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether SIGINT or SIGTERM arrived.
pub fn pending() -> bool {
    PENDING.load(Ordering::Relaxed)
}
