//! Uprobes a loader puts on itself, run inside the loader.
//!
//! bpftrace 0.17 runs `BEGIN` and `END` by attaching a uprobe to its own `BEGIN_trigger` /
//! `END_trigger` functions (`perf_event_open` with `pid` = its own pid), calling the function,
//! then detaching. A loader has no agent, so nothing would run those programs: here, when a
//! uprobe perf event created by this process for this process is enabled with a program, we
//! hook the function in this process with the same engine agents use
//! ([`bpftime_attach::install_probe`]) and run the program there; disabling or closing the event
//! removes the hook. [`sync`] brings the hooks in line with the store after every perf ioctl
//! and close of one of our perf event fds (and the timer threads, see `timer.rs`).
//!
//! # Invariants
//!
//! - A hook's `user` pointer is the `Box<Site>` kept beside it in [`HOOKS`]; the box is dropped
//!   only after [`bpftime_attach::Hook::remove`] returned, when no thread runs the handler.
//! - The handler runs programs with this thread's re-entrancy flag set (via the caller's
//!   [`ffi`](crate::ffi) guard), so libc calls made by helpers are never emulated again.
#![allow(unsafe_code)]

use crate::emu::Emulator;
use bpftime_attach::{FuncBounds, Hook, PatchMode, Probe, PtRegs, install_probe};
use bpftime_runtime::object::{PerfKind, attachments};
use bpftime_runtime::prog::LoadedProg;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::c_void;

/// The programs of one self-probe.
struct Site {
    progs: Vec<(LoadedProg, u64)>,
}

/// Installed self-probes by (perf event id, program ids).
type Hooks = HashMap<(u32, Vec<u32>), (Hook, Box<Site>)>;
static HOOKS: Mutex<Option<Hooks>> = Mutex::new(None);

/// Whether any self-probe is installed (so a close has something to check).
pub(crate) fn active() -> bool {
    HOOKS.lock().as_ref().is_some_and(|h| !h.is_empty())
}

extern "C" fn on_hit(regs: &mut PtRegs, user: *mut c_void) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `user` is the live `Site` boxed beside the hook (module invariants).
        let site = unsafe { &*(user as *const Site) };
        for (p, cookie) in &site.progs {
            // SAFETY: `regs` is the stub's live, writable pt_regs for this call.
            let r = unsafe {
                p.run_with_cookie(
                    (regs as *mut PtRegs).cast(),
                    std::mem::size_of::<PtRegs>(),
                    *cookie,
                )
            };
            if let Err(t) = r {
                tracing::debug!("self-probe program {} trapped: {t}", p.id());
            }
        }
    }));
}

/// Installs hooks for the enabled uprobes this process created on itself, removes those no
/// longer enabled.
pub(crate) fn sync(emu: &Emulator) {
    crate::timer::sync(emu);
    let me = crate::emu::pid() as i32;
    let store = emu.store();
    let wanted: Vec<_> = attachments(store)
        .into_iter()
        .filter(|a| a.event.kind == PerfKind::Uprobe && a.event.pid == me)
        .filter(|a| {
            store
                .object(a.perf_event_id)
                .is_some_and(|o| o.owner_pid == me as u32)
        })
        .collect();
    let mut hooks = HOOKS.lock();
    let hooks = hooks.get_or_insert_with(HashMap::new);
    let keys: Vec<(u32, Vec<u32>)> = wanted
        .iter()
        .map(|a| (a.perf_event_id, a.progs.iter().map(|p| p.0).collect()))
        .collect();
    let stale: Vec<_> = hooks
        .keys()
        .filter(|k| !keys.contains(k))
        .cloned()
        .collect();
    for k in stale {
        if let Some((hook, site)) = hooks.remove(&k)
            && let Err(err) = hook.remove()
        {
            tracing::warn!("removing self-probe of perf event {}: {err}", k.0);
            // The hook may still call the handler: keep its data alive.
            std::mem::forget(site);
        }
    }
    for (a, k) in wanted.iter().zip(keys) {
        if hooks.contains_key(&k) {
            continue;
        }
        let addr = match bpftime_attach::resolve_file_offset(&a.event.path, a.event.offset) {
            Ok(x) => x,
            Err(err) => {
                tracing::warn!("self-probe {}+{:#x}: {err}", a.event.path, a.event.offset);
                continue;
            }
        };
        let mut progs = Vec::new();
        for &(id, cookie) in &a.progs {
            match LoadedProg::load(store, id, emu.helpers.clone()) {
                Ok(p) => progs.push((p, cookie)),
                Err(err) => tracing::warn!("self-probe: program {id}: {err}"),
            }
        }
        let site = Box::new(Site { progs });
        let probe = Probe {
            entry: Some(on_hit as bpftime_attach::HookHandler),
            ret: None,
            user: &*site as *const Site as *mut c_void,
            func: FuncBounds::Entry,
            mode: PatchMode::Auto,
        };
        // SAFETY: `addr` is the start of a function in a mapped file of this process (the
        // uprobe contract bpftrace follows, placing it at its trigger functions' symbols);
        // the handler is sound on any thread; `site` lives beside the hook until it is removed
        // (module invariants).
        match unsafe { install_probe(addr, &probe) } {
            Ok(h) => {
                tracing::debug!("self-probe at {:#x} ({} programs)", addr, site.progs.len());
                hooks.insert(k, (h, site));
            }
            Err(err) => tracing::warn!("self-probe at {addr:#x}: {err}"),
        }
    }
}
