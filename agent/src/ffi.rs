//! The agent's entry points into the target process: the load-time constructor and the hook
//! handler. Everything `extern "C"` and every `unsafe` block of the agent is here.
//!
//! # Invariants
//!
//! - The constructor only spawns the agent thread; it never blocks, never panics across the
//!   FFI boundary, and does nothing visible unless `BPFTIME_LOG` asks for logs.
//! - The hook handler's `user` pointer is the `SiteData` boxed in the agent's `Site`; the agent
//!   drops it only after `Hook::remove` returned, after which no handler runs for that hook
//!   (bpftime-attach's guarantee), or leaks it when removal failed.
//! - The handler never unwinds into the target: panics are caught, and a thread-local guard
//!   skips probes hit from inside a probe (a helper calling a hooked function) and from the
//!   agent's own thread.

use crate::agent::{Agent, AgentConfig, SiteData};
use bpftime_attach::{AttachError, Hook, PtRegs, install};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::Ordering;

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

extern "C" fn on_hit(regs: &mut PtRegs, user: *mut c_void) {
    if BUSY.with(|b| b.replace(true)) {
        return;
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `user` is the site's live `SiteData` (module invariants).
        let site = unsafe { &*(user as *const SiteData) };
        site.hits.fetch_add(1, Ordering::Relaxed);
        let progs = site.progs.read();
        for (p, _cookie) in progs.iter() {
            // SAFETY: `regs` is the stub's live, writable pt_regs for the duration of this call.
            let r = unsafe { p.run((regs as *mut PtRegs).cast(), std::mem::size_of::<PtRegs>()) };
            if let Err(t) = r {
                site.traps.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("program {} trapped: {t}", p.id());
            }
        }
    }));
    BUSY.with(|b| b.set(false));
}

/// Hooks `addr` with the handler running `data`'s programs. `addr` comes from a uprobe's
/// (binary, file offset), which the loader computed from a symbol or an offset given by the
/// user, exactly what the kernel trusts for its uprobes: the start of an instruction.
pub(crate) fn install_hook(addr: usize, data: &SiteData) -> Result<Hook, AttachError> {
    // SAFETY: `addr` is the start of an instruction in a mapped file (the uprobe contract the
    // kernel also relies on); `on_hit` is sound on any thread; `data` is boxed in the agent's
    // `Site` and outlives the hook (module invariants); we never replace SIGTRAP handlers.
    unsafe { install(addr, on_hit, data as *const SiteData as *mut c_void) }
}

extern "C" fn agent_constructor() {
    let _ = std::panic::catch_unwind(|| {
        if std::env::var_os("BPFTIME_AGENT_DISABLE").is_some() {
            return;
        }
        crate::log::init_from_env();
        // Attach what the store already holds before the program's main runs, so
        // `bpftime start` traces from the first call; then follow the store on a thread.
        BUSY.with(|b| b.set(true));
        let cfg = AgentConfig::from_env();
        let agent = Agent::new(&cfg).map(|mut a| {
            a.sync();
            a
        });
        BUSY.with(|b| b.set(false));
        match agent {
            Ok(agent) => {
                tracing::info!(
                    "bpftime agent in pid {} following {}",
                    std::process::id(),
                    agent.store().path().display()
                );
                let spawned = std::thread::Builder::new()
                    .name("bpftime-agent".into())
                    .spawn(move || {
                        BUSY.with(|b| b.set(true));
                        agent.run(&cfg)
                    });
                if let Err(e) = spawned {
                    tracing::error!("bpftime agent: cannot start its thread: {e}");
                }
            }
            Err(e) => tracing::error!("bpftime agent disabled: {e}"),
        }
    });
}

/// Runs the constructor when the library is loaded (preload or dlopen).
#[used]
#[unsafe(link_section = ".init_array")]
static AGENT_INIT: extern "C" fn() = agent_constructor;
