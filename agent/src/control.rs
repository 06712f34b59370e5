//! Agent sessions: starting the agent in a process that did not preload it (`bpftime attach`
//! injects a call to [`bpftime_agent_attach`] after `dlopen`), following the store, and stopping
//! on request — `bpftime detach` sets `AGENT_DETACH` in the agent's store record (this works
//! whatever the process's own threads are doing: the agent thread waits on the store's
//! generation futex, which the request bumps), and [`bpftime_agent_detach`] does the same from
//! inside the process.
//!
//! # Invariants
//!
//! - At most one session runs per process. [`bpftime_agent_attach`] returns at once: it only
//!   spawns the session's thread, because the injector borrowed one of the target's threads and
//!   must give it back quickly. A session started while the previous one is still stopping waits
//!   for it on its own thread.
//! - A session stops by dropping its [`Agent`] (every hook removed, original bytes restored),
//!   then sets `AGENT_DETACHED` in its record and only then lets the record go, so whoever waits
//!   for the record to disappear finds a process without hooks.
//! - The library is never unloaded: a removed hook's stub or a handler may still be on a
//!   thread's stack, so `dlclose` would be unsafe. Re-attaching reuses the loaded copy.
//! - A session belongs to the process that started it: one inherited through `fork` (whose
//!   thread did not survive the fork) counts as none.
//! - The only `unsafe` here reads the C strings the injector passes: NUL-terminated, in the
//!   borrowed thread's stack for the duration of the call, or null.

use crate::agent::{Agent, AgentConfig};
use bpftime_maps::Store;
use bpftime_runtime::object::{
    AGENT_DETACH, AGENT_DETACHED, agent_control, note_agent_sync, set_agent_control,
};
use std::ffi::{CStr, OsStr, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The agent library's file name (what `bpftime start` preloads).
const LIB_NAME: &str = "libbpftime_agent.so";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Thread spawned, agent not created yet.
    Starting,
    /// Following the store.
    Running,
    /// Removing hooks.
    Stopping,
    /// Thread finished (or never got an agent).
    Done,
}

struct Session {
    pid: u32,
    store_name: String,
    /// In-process detach request ([`bpftime_agent_detach`]).
    stop: AtomicBool,
    phase: Mutex<Phase>,
    changed: Condvar,
    /// Once running: the store and the agent's record there.
    record: Mutex<Option<(Arc<Store>, Option<u32>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    fn new(store: &str) -> Arc<Session> {
        Arc::new(Session {
            pid: std::process::id(),
            store_name: store.to_string(),
            stop: AtomicBool::new(false),
            phase: Mutex::new(Phase::Starting),
            changed: Condvar::new(),
            record: Mutex::new(None),
        })
    }

    fn set(&self, p: Phase) {
        *lock(&self.phase) = p;
        self.changed.notify_all();
    }

    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    fn wait_done(&self) {
        let mut p = lock(&self.phase);
        while *p != Phase::Done {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether someone asked this session to stop (in-process or through the store).
    fn detach_requested(&self) -> bool {
        if self.stop.load(Ordering::Acquire) {
            return true;
        }
        match &*lock(&self.record) {
            Some((store, Some(rec))) => agent_control(store, *rec) & AGENT_DETACH != 0,
            _ => false,
        }
    }
}

static CURRENT: Mutex<Option<Arc<Session>>> = Mutex::new(None);

/// Whether this library was preloaded (`LD_PRELOAD` names it), as `bpftime start` does. When
/// it was not (`dlopen` by `bpftime attach`), the constructor leaves starting to
/// [`bpftime_agent_attach`], which knows the store.
pub(crate) fn preloaded() -> bool {
    let Some(list) = std::env::var_os("LD_PRELOAD") else {
        return false;
    };
    let me = own_path();
    list.to_string_lossy()
        .split([':', ' '])
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let p = Path::new(entry);
            match (&me, std::fs::canonicalize(p)) {
                (Some(me), Ok(c)) => &c == me,
                _ => p.file_name() == Some(OsStr::new(LIB_NAME)),
            }
        })
}

/// This library's file, from the mapping that holds this function.
fn own_path() -> Option<PathBuf> {
    let maps = bpftime_attach::procmaps::read_self_maps().ok()?;
    let here = preloaded as fn() -> bool as usize;
    let m = bpftime_attach::procmaps::find(&maps, here)?;
    std::fs::canonicalize(m.path.trim_end_matches(" (deleted)")).ok()
}

/// Runs a preloaded agent (created and synced by the constructor) on the calling thread until
/// it is asked to detach.
pub(crate) fn follow(agent: Agent, cfg: &AgentConfig) {
    let session = Session::new(&cfg.store);
    *lock(&CURRENT) = Some(session.clone());
    run(agent, cfg, &session);
}

fn run(mut agent: Agent, cfg: &AgentConfig, s: &Session) {
    let store = agent.store().clone();
    let rec = agent.record_id();
    // Our own reference keeps the record alive while the hooks are removed (the agent drops
    // its reference first).
    let held = rec.filter(|&r| store.acquire(r));
    *lock(&s.record) = Some((store.clone(), rec));
    s.set(Phase::Running);
    let mut seen = store.generation();
    while !s.detach_requested() {
        agent.sync();
        if let Some(r) = rec {
            let _ = note_agent_sync(&store, r);
        }
        seen = store.wait_generation(seen, cfg.rescan.as_nanos() as u64);
    }
    s.set(Phase::Stopping);
    drop(agent);
    tracing::info!("bpftime agent in pid {} detached", s.pid);
    if let Some(r) = held {
        let _ = set_agent_control(&store, r, AGENT_DETACHED);
        store.release(r);
    }
    // Unmap the store once nothing of this session needs it.
    *lock(&s.record) = None;
    s.set(Phase::Done);
}

/// Starts an agent following `store` unless one runs. Returns 0 (started), 1 (already
/// following that store), or a negative errno.
fn start(store: String, log: Option<String>, log_file: Option<PathBuf>) -> c_int {
    if store.is_empty() || store.contains('/') || store.len() > 200 {
        return -libc::EINVAL;
    }
    if let Some(level) = log.as_deref().filter(|l| !l.is_empty()) {
        crate::log::init(level, log_file.as_deref());
    }
    let mut cur = lock(&CURRENT);
    let prev = match cur.as_ref() {
        Some(s) if s.pid == std::process::id() => match s.phase() {
            Phase::Starting | Phase::Running if !s.detach_requested() => {
                return if s.store_name == store {
                    1
                } else {
                    -libc::EBUSY
                };
            }
            Phase::Done => None,
            _ => Some(s.clone()),
        },
        _ => None,
    };
    let session = Session::new(&store);
    let cfg = AgentConfig {
        store,
        ..AgentConfig::from_env()
    };
    let s = session.clone();
    let spawned = std::thread::Builder::new()
        .name("bpftime-agent".into())
        .spawn(move || {
            crate::ffi::enter_agent_thread();
            if let Some(p) = prev {
                p.wait_done();
            }
            match Agent::new(&cfg) {
                Ok(agent) => {
                    tracing::info!(
                        "bpftime agent attached to pid {} following {}",
                        s.pid,
                        agent.store().path().display()
                    );
                    run(agent, &cfg, &s);
                }
                Err(e) => {
                    tracing::error!("bpftime agent disabled: {e}");
                    s.set(Phase::Done);
                }
            }
        });
    match spawned {
        Ok(_) => {
            *cur = Some(session);
            0
        }
        Err(e) => -e.raw_os_error().unwrap_or(libc::EAGAIN),
    }
}

fn c_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null pointers come from the injector, which wrote a NUL-terminated string
    // there and keeps it in place for the duration of the call (module invariants).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().ok().map(str::to_string)
}

/// Starts the agent in this process on the store `store` (a name, as `--store` takes), with
/// logs at `log_level` (null or empty: silent) to `log_file` (null: stderr). Called by
/// `bpftime attach` in a borrowed thread of the target; returns at once: 0 when an agent was
/// started, 1 when one already follows that store, `-EBUSY` when one follows another store,
/// `-EINVAL` for a bad name, another negative errno when its thread cannot start.
#[unsafe(no_mangle)]
pub extern "C" fn bpftime_agent_attach(
    store: *const c_char,
    log_level: *const c_char,
    log_file: *const c_char,
) -> c_int {
    std::panic::catch_unwind(|| {
        let Some(store) = c_string(store) else {
            return -libc::EINVAL;
        };
        start(
            store,
            c_string(log_level),
            c_string(log_file).map(PathBuf::from),
        )
    })
    .unwrap_or(-libc::EFAULT)
}

/// Asks the running agent to remove its hooks and stop, without waiting. Returns 0, or
/// `-ENOENT` when no agent runs in this process.
#[unsafe(no_mangle)]
pub extern "C" fn bpftime_agent_detach() -> c_int {
    std::panic::catch_unwind(|| {
        let cur = lock(&CURRENT);
        let Some(s) = cur.as_ref().filter(|s| s.pid == std::process::id()) else {
            return -libc::ENOENT;
        };
        if s.phase() == Phase::Done {
            return -libc::ENOENT;
        }
        s.stop.store(true, Ordering::Release);
        if let Some((store, _)) = &*lock(&s.record) {
            store.touch();
        }
        0
    })
    .unwrap_or(-libc::EFAULT)
}
