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

/// Hooks `addr` with the handler running `data`'s programs.
pub(crate) fn install_hook(addr: usize, data: &SiteData) -> Result<Hook, AttachError> {
    install(addr, on_hit, data as *const SiteData as *mut c_void)
}

fn agent_main() {
    BUSY.with(|b| b.set(true));
    crate::log::init_from_env();
    let cfg = AgentConfig::from_env();
    match Agent::new(&cfg) {
        Ok(agent) => {
            tracing::info!(
                "bpftime agent in pid {} following {}",
                std::process::id(),
                agent.store().path().display()
            );
            agent.run(&cfg)
        }
        Err(e) => tracing::error!("bpftime agent disabled: {e}"),
    }
}

extern "C" fn agent_constructor() {
    let _ = std::panic::catch_unwind(|| {
        if std::env::var_os("BPFTIME_AGENT_DISABLE").is_some() {
            return;
        }
        // Children started by the target (e.g. a shell running the real program) get the agent
        // too through LD_PRELOAD; each follows the store on its own.
        let _ = std::thread::Builder::new()
            .name("bpftime-agent".into())
            .spawn(agent_main);
    });
}

/// Runs the constructor when the library is loaded (preload or dlopen).
#[used]
#[unsafe(link_section = ".init_array")]
static AGENT_INIT: extern "C" fn() = agent_constructor;
