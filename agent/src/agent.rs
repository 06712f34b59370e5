//! The agent's reconciliation loop: make this process's hooks match the store.

use crate::ffi;
use bpftime_attach::{Hook, resolve_file_offset};
use bpftime_maps::Store;
use bpftime_runtime::helpers::registry;
use bpftime_runtime::object::{
    Attachment, PerfKind, attachments, create_agent_record, update_agent_record,
};
use bpftime_runtime::{Engine, LoadedProg};
use bpftime_vm::helper::HelperRegistry;
use parking_lot::RwLock;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Settings, from the environment by default.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Store name (`BPFTIME_STORE`, default `default`).
    pub store: String,
    /// Longest wait between rescans, so dead loaders' probes are noticed without a wake-up.
    pub rescan: Duration,
    /// Engine for programs (`BPFTIME_NO_JIT`, `BPFTIME_JIT_UNCHECKED`; default checked JIT).
    pub engine: Engine,
}

impl AgentConfig {
    /// From `BPFTIME_STORE`.
    pub fn from_env() -> Self {
        AgentConfig {
            store: std::env::var("BPFTIME_STORE").unwrap_or_else(|_| "default".into()),
            rescan: Duration::from_millis(200),
            engine: Engine::from_env(),
        }
    }
}

/// What a hook runs: the programs attached at one address. Shared with the hook handler.
#[derive(Debug, Default)]
pub struct SiteData {
    /// Programs with their attach cookies, in attach order.
    pub progs: RwLock<Vec<(Arc<LoadedProg>, u64)>>,
    /// Times the hook fired.
    pub hits: AtomicU64,
    /// Program runs that trapped.
    pub traps: AtomicU64,
}

struct Site {
    hook: Option<Hook>,
    // Boxed: the hook handler holds its address until the hook is removed.
    data: Box<SiteData>,
    prog_ids: Vec<(u32, u64)>,
}

/// The agent of one process.
pub struct Agent {
    store: Arc<Store>,
    helpers: Arc<HelperRegistry>,
    sites: HashMap<usize, Site>,
    progs: HashMap<u32, Arc<LoadedProg>>,
    warned: HashSet<(u32, String)>,
    record: Option<u32>,
    reported: Vec<u32>,
    engine: Engine,
    syscalls: crate::syscalls::SyscallTracing,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("store", &self.store.path())
            .field("sites", &self.sites.len())
            .field("progs", &self.progs.len())
            .finish()
    }
}

impl Agent {
    /// Opens the store named in `cfg`.
    pub fn new(cfg: &AgentConfig) -> Result<Agent, bpftime_maps::StoreError> {
        let store = Arc::new(Store::open_named(&cfg.store)?);
        let record = create_agent_record(&store)
            .map_err(|e| tracing::warn!("cannot register in the store: {e}"))
            .ok();
        Ok(Agent {
            store,
            helpers: Arc::new(registry()),
            sites: HashMap::new(),
            progs: HashMap::new(),
            warned: HashSet::new(),
            record,
            reported: Vec::new(),
            engine: cfg.engine,
            syscalls: Default::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Addresses currently hooked, with hit counts.
    pub fn hooked(&self) -> Vec<(usize, u64)> {
        self.sites
            .iter()
            .map(|(a, s)| (*a, s.data.hits.load(Ordering::Relaxed)))
            .collect()
    }

    fn warn_once(&mut self, perf_id: u32, msg: String) {
        if self.warned.insert((perf_id, msg.clone())) {
            tracing::warn!("perf event {perf_id}: {msg}");
        }
    }

    fn wanted_here(&mut self, a: &Attachment) -> Option<usize> {
        let me = std::process::id() as i32;
        if a.event.pid != -1 && a.event.pid != me {
            return None;
        }
        match a.event.kind {
            PerfKind::Uprobe => {}
            // Syscall tracepoints: `crate::syscalls`.
            PerfKind::Tracepoint => return None,
            PerfKind::Uretprobe => {
                self.warn_once(a.perf_event_id, "uretprobes are not supported yet".into());
                return None;
            }
            other => {
                self.warn_once(
                    a.perf_event_id,
                    format!("{other:?} is not attached by agents yet"),
                );
                return None;
            }
        }
        match resolve_file_offset(&a.event.path, a.event.offset) {
            Ok(addr) => Some(addr),
            // Not mapped in this process: the probe is for another binary.
            Err(e) => {
                tracing::debug!("perf event {}: {e}", a.perf_event_id);
                None
            }
        }
    }

    fn prog(&mut self, id: u32) -> Option<Arc<LoadedProg>> {
        if let Some(p) = self.progs.get(&id) {
            return Some(p.clone());
        }
        match LoadedProg::load(&self.store, id, self.helpers.clone())
            .and_then(|p| p.with_engine(self.engine))
        {
            Ok(p) => {
                let p = Arc::new(p);
                self.progs.insert(id, p.clone());
                Some(p)
            }
            Err(e) => {
                self.warn_once(0, format!("program {id} cannot be loaded: {e}"));
                None
            }
        }
    }

    /// Makes the hooks match the store. Returns the number of hooked addresses.
    pub fn sync(&mut self) -> usize {
        let mut wanted: HashMap<usize, Vec<(u32, u64)>> = HashMap::new();
        let mut perf_at: Vec<(usize, u32)> = Vec::new();
        let all = attachments(&self.store);
        for a in &all {
            if let Some(addr) = self.wanted_here(a) {
                perf_at.push((addr, a.perf_event_id));
                let list = wanted.entry(addr).or_default();
                for p in &a.progs {
                    if !list.contains(p) {
                        list.push(*p);
                    }
                }
            }
        }
        // Remove sites nobody wants any more.
        let gone: Vec<usize> = self
            .sites
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(mut site) = self.sites.remove(&addr) {
                if let Some(h) = site.hook.take()
                    && let Err(e) = h.remove()
                {
                    tracing::error!("detach at {addr:#x}: {e}");
                    // The hook may still fire: keep its data alive for good.
                    Box::leak(site.data);
                    continue;
                }
                tracing::info!("detached {addr:#x}");
            }
        }
        for (addr, ids) in wanted {
            let progs: Vec<(Arc<LoadedProg>, u64)> = ids
                .iter()
                .filter_map(|&(id, cookie)| self.prog(id).map(|p| (p, cookie)))
                .collect();
            if let Some(site) = self.sites.get_mut(&addr) {
                if site.prog_ids != ids {
                    *site.data.progs.write() = progs;
                    site.prog_ids = ids;
                }
                continue;
            }
            if progs.is_empty() {
                continue;
            }
            let data = Box::new(SiteData {
                progs: RwLock::new(progs),
                ..SiteData::default()
            });
            match ffi::install_hook(addr, &data) {
                Ok(hook) => {
                    tracing::info!(
                        "attached {} program(s) at {addr:#x} ({:?})",
                        ids.len(),
                        self.engine
                    );
                    self.sites.insert(
                        addr,
                        Site {
                            hook: Some(hook),
                            data,
                            prog_ids: ids,
                        },
                    );
                }
                Err(e) => self.warn_once(0, format!("cannot hook {addr:#x}: {e}")),
            }
        }
        // Drop programs no site uses.
        let used: HashSet<u32> = self
            .sites
            .values()
            .flat_map(|s| s.prog_ids.iter().map(|p| p.0))
            .collect();
        self.progs.retain(|id, _| used.contains(id));
        let mut attached: Vec<u32> = perf_at
            .iter()
            .filter(|(a, _)| self.sites.contains_key(a))
            .map(|(_, pe)| *pe)
            .collect();
        attached.extend_from_slice(self.syscalls.sync(
            &all,
            &self.store,
            &self.helpers,
            self.engine,
        ));
        attached.sort_unstable();
        if let Some(rec) = self.record
            && attached != self.reported
        {
            let _ = update_agent_record(&self.store, rec, &attached);
            self.reported = attached;
        }
        self.sites.len()
    }

    /// Follows the store forever: sync, then wait for the generation to change (or `rescan`).
    pub fn run(mut self, cfg: &AgentConfig) -> ! {
        let mut seen = self.store.generation();
        loop {
            self.sync();
            seen = self
                .store
                .wait_generation(seen, cfg.rescan.as_nanos() as u64);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(rec) = self.record.take() {
            self.store.release(rec);
        }
        for (_, mut site) in self.sites.drain() {
            if let Some(h) = site.hook.take()
                && h.remove().is_err()
            {
                Box::leak(site.data);
            }
        }
    }
}
