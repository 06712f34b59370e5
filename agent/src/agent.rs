//! The agent's reconciliation loop: make this process's hooks match the store.

use crate::ffi::{self, ProgList, ProgSlot};
use bpftime_attach::{
    FuncBounds, Hook, HookKind, function_containing, function_ranges, resolve_file_offset,
    resolve_file_offset_writable,
};
use bpftime_maps::Store;
use bpftime_runtime::helpers::registry;
use bpftime_runtime::object::{
    Attachment, PerfKind, attachments, create_agent_record, update_agent_record,
};
use bpftime_runtime::{Engine, LoadedProg};
use bpftime_vm::helper::HelperRegistry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
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
    /// Hook stubs may run a site's program through its JIT native entry (`BPFTIME_NATIVE=0`
    /// turns this off: every hit then goes through the agent's handler).
    pub native: bool,
}

/// Whether programs may run natively in hook stubs and the system call gate
/// (`BPFTIME_NATIVE=0` turns that off: every hit then goes through the agent's handlers).
pub(crate) fn native_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("BPFTIME_NATIVE").is_none_or(|v| v != "0"))
}

impl AgentConfig {
    /// From `BPFTIME_STORE`.
    pub fn from_env() -> Self {
        AgentConfig {
            store: std::env::var("BPFTIME_STORE").unwrap_or_else(|_| "default".into()),
            rescan: Duration::from_millis(200),
            engine: Engine::from_env(),
            native: native_enabled(),
        }
    }
}

/// What a hook runs: the programs attached at one address. Shared with the hook handlers.
#[derive(Debug)]
pub struct SiteData {
    /// The probed address (`bpf_get_func_ip`).
    pub addr: usize,
    /// uprobe programs with their attach cookies, in attach order.
    pub entry: ProgSlot,
    /// uretprobe programs.
    pub ret: ProgSlot,
    /// Program runs that trapped.
    pub traps: AtomicU64,
    /// The address is a function's entry: `bpf_override_return` makes it return at once.
    pub can_override: bool,
}

struct Site {
    hook: Option<Hook>,
    // Boxed: the hook handlers hold its address until the hook is removed.
    data: Box<SiteData>,
    entry_ids: Vec<(u32, u64)>,
    ret_ids: Vec<(u32, u64)>,
    /// USDT semaphores this site incremented.
    semaphores: Vec<usize>,
    /// Trapped runs already reported: the handlers' (`SiteData::traps`) and the hook's native
    /// paths' (`Hook::native_traps`, which restarts at 0 with a new hook).
    traps_reported: (u64, u64),
}

/// A probe point this process should have, from one attachment.
struct Target {
    addr: usize,
    ret: bool,
    semaphore: Option<usize>,
    func: FuncBounds,
}

/// Everything wanted at one address.
#[derive(Default)]
struct Wanted {
    entry: Vec<(u32, u64)>,
    ret: Vec<(u32, u64)>,
    semaphores: Vec<usize>,
    func: Option<FuncBounds>,
}

fn add_unique<T: PartialEq + Copy>(list: &mut Vec<T>, items: &[T]) {
    for i in items {
        if !list.contains(i) {
            list.push(*i);
        }
    }
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
    native: bool,
    syscalls: crate::syscalls::SyscallTracing,
    /// Function ranges (file offsets) per binary, for telling entries from mid-function offsets.
    functions: HashMap<String, Arc<Vec<(u64, u64)>>>,
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
            native: cfg.native,
            syscalls: Default::default(),
            functions: HashMap::new(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// This agent's record in the store (`None` when it could not register).
    pub fn record_id(&self) -> Option<u32> {
        self.record
    }

    /// Addresses currently hooked, and how.
    pub fn hooked(&self) -> Vec<(usize, HookKind)> {
        self.sites
            .iter()
            .filter_map(|(a, s)| Some((*a, s.hook.as_ref()?.kind())))
            .collect()
    }

    fn warn_once(&mut self, perf_id: u32, msg: String) {
        if self.warned.insert((perf_id, msg.clone())) {
            tracing::warn!("perf event {perf_id}: {msg}");
        }
    }

    fn wanted_here(&mut self, a: &Attachment) -> Option<Target> {
        let me = std::process::id() as i32;
        if a.event.pid != -1 && a.event.pid != me {
            return None;
        }
        let ret = match a.event.kind {
            PerfKind::Uprobe => false,
            PerfKind::Uretprobe => true,
            // Syscall tracepoints: `crate::syscalls`.
            PerfKind::Tracepoint => return None,
            other => {
                self.warn_once(
                    a.perf_event_id,
                    format!("{other:?} is not attached by agents yet"),
                );
                return None;
            }
        };
        let addr = match resolve_file_offset(&a.event.path, a.event.offset) {
            Ok(addr) => addr,
            // Not mapped in this process: the probe is for another binary.
            Err(e) => {
                tracing::debug!("perf event {}: {e}", a.perf_event_id);
                return None;
            }
        };
        let semaphore = match a.event.ref_ctr_offset {
            0 => None,
            off => match resolve_file_offset_writable(&a.event.path, off) {
                Ok(s) => Some(s),
                Err(e) => {
                    // No writable mapping holds it: the kernel still attaches and defers the
                    // increment to a later mapping (`delayed_ref_ctr_inc`). bcc's python
                    // binding always sends garbage here (ref_ctr_offset 6, the ELF header).
                    tracing::debug!("perf event {}: USDT semaphore: {e}", a.perf_event_id);
                    None
                }
            },
        };
        let funcs = self
            .functions
            .entry(a.event.path.clone())
            .or_insert_with(|| Arc::new(function_ranges(&a.event.path).unwrap_or_default()))
            .clone();
        let func = match function_containing(&funcs, a.event.offset) {
            Some((start, end)) => FuncBounds::Range {
                start: addr - (a.event.offset - start) as usize,
                end: addr + (end - a.event.offset) as usize,
            },
            None => FuncBounds::Unknown,
        };
        Some(Target {
            addr,
            ret,
            semaphore,
            func,
        })
    }

    fn prog_list(&mut self, ids: &[(u32, u64)]) -> ProgList {
        ids.iter()
            .filter_map(|&(id, cookie)| self.prog(id).map(|p| (p, cookie)))
            .collect()
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
        let mut wanted: HashMap<usize, Wanted> = HashMap::new();
        let mut perf_at: Vec<(usize, u32)> = Vec::new();
        let all = attachments(&self.store);
        for a in &all {
            if let Some(t) = self.wanted_here(a) {
                perf_at.push((t.addr, a.perf_event_id));
                let w = wanted.entry(t.addr).or_default();
                add_unique(if t.ret { &mut w.ret } else { &mut w.entry }, &a.progs);
                add_unique(&mut w.semaphores, t.semaphore.as_slice());
                w.func.get_or_insert(t.func);
            }
        }
        if let Err(e) = bpftime_attach::x86_64::recheck_trap_handler() {
            tracing::warn!("checking the SIGTRAP handler: {e}");
        }
        // Remove sites nobody wants any more.
        let gone: Vec<usize> = self
            .sites
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(site) = self.sites.remove(&addr) {
                remove_site(addr, site);
                tracing::info!("detached {addr:#x}");
            }
        }
        for (addr, w) in wanted {
            let entry = self.prog_list(&w.entry);
            let ret = self.prog_list(&w.ret);
            let func = w.func.unwrap_or(FuncBounds::Unknown);
            let kinds = (!entry.is_empty(), !ret.is_empty());
            if let Some(mut site) = self.sites.remove(&addr) {
                let had = (!site.entry_ids.is_empty(), !site.ret_ids.is_empty());
                if site.entry_ids != w.entry {
                    site.data.entry.replace(entry);
                    site.entry_ids = w.entry;
                }
                if site.ret_ids != w.ret {
                    site.data.ret.replace(ret);
                    site.ret_ids = w.ret;
                }
                if had != kinds || site.hook.is_none() {
                    // uprobe ↔ uretprobe ↔ both: the hook itself changes.
                    site.report_traps();
                    if let Some(h) = site.hook.take()
                        && let Err(e) = h.remove()
                    {
                        tracing::error!("detach at {addr:#x}: {e}");
                        Box::leak(site.data);
                        continue;
                    }
                    site.data.entry.quiesced();
                    site.data.ret.quiesced();
                    if kinds == (false, false) {
                        set_semaphores(&mut site.semaphores, &[]);
                        continue;
                    }
                    match ffi::install_hook(addr, &site.data, kinds.0, kinds.1, func) {
                        Ok(h) => {
                            site.hook = Some(h);
                            site.traps_reported.1 = 0;
                        }
                        Err(e) => {
                            self.warn_once(0, format!("cannot hook {addr:#x}: {e}"));
                            set_semaphores(&mut site.semaphores, &[]);
                            continue;
                        }
                    }
                }
                set_semaphores(&mut site.semaphores, &w.semaphores);
                site.set_native(self.native);
                site.report_traps();
                self.sites.insert(addr, site);
                continue;
            }
            if kinds == (false, false) {
                continue;
            }
            let data = Box::new(SiteData {
                addr,
                entry: ProgSlot::new(entry),
                ret: ProgSlot::new(ret),
                traps: AtomicU64::new(0),
                can_override: matches!(func, FuncBounds::Range { start, .. } if start == addr),
            });
            match ffi::install_hook(addr, &data, kinds.0, kinds.1, func) {
                Ok(hook) => {
                    tracing::info!(
                        "attached {} uprobe and {} uretprobe program(s) at {addr:#x} ({:?}, {:?})",
                        w.entry.len(),
                        w.ret.len(),
                        hook.kind(),
                        self.engine
                    );
                    let mut site = Site {
                        hook: Some(hook),
                        data,
                        entry_ids: w.entry,
                        ret_ids: w.ret,
                        semaphores: Vec::new(),
                        traps_reported: (0, 0),
                    };
                    set_semaphores(&mut site.semaphores, &w.semaphores);
                    site.set_native(self.native);
                    self.sites.insert(addr, site);
                }
                Err(e) => self.warn_once(0, format!("cannot hook {addr:#x}: {e}")),
            }
        }
        // Drop programs no site uses.
        let used: HashSet<u32> = self
            .sites
            .values()
            .flat_map(|s| s.entry_ids.iter().chain(&s.ret_ids).map(|p| p.0))
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
        for (addr, site) in self.sites.drain() {
            remove_site(addr, site);
        }
    }
}

/// Removes a site's hook and gives its semaphores back.
impl Site {
    /// Warns about program runs at this site that trapped since the last report (on the
    /// handlers, each is also logged at debug level with its cause).
    fn report_traps(&mut self) {
        let handlers = self.data.traps.load(std::sync::atomic::Ordering::Relaxed);
        let native = self.hook.as_ref().map_or(0, Hook::native_traps);
        let (h0, n0) = self.traps_reported;
        let new = handlers.saturating_sub(h0) + native.saturating_sub(n0);
        if new > 0 {
            tracing::warn!(
                "{new} program run(s) at {:#x} trapped (an access outside the program's \
                 memory stops a run there)",
                self.data.addr
            );
        }
        self.traps_reported = (handlers, native);
    }

    /// Lets the hook's stub run the site's entry program itself, and its return stub the
    /// return program, when it is the only one of its kind and has a native entry (see
    /// `bpftime_jit::NativeOptions`): no agent code then runs on a hit. Otherwise (or with
    /// `enabled` false) hits go through the handlers.
    fn set_native(&self, enabled: bool) {
        let Some(hook) = &self.hook else { return };
        let (entry, ret) = (self.data.entry.get(), self.data.ret.get());
        // The one entry program and the one return program (a hook runs either natively, the
        // other through its handler if need be).
        fn only(list: &ProgList, enabled: bool) -> Option<&LoadedProg> {
            match list.as_slice() {
                [(p, _)] if enabled => {
                    if let Some(why) = p.native_refused() {
                        tracing::debug!("program {} runs through the handler: {why}", p.id());
                    }
                    Some(&**p).filter(|p| p.native_entry().is_some())
                }
                _ => None,
            }
        }
        let (on_entry, on_return) = (only(entry, enabled), only(ret, enabled));
        for (native, set, what) in [
            (on_entry, ffi::set_native(hook, on_entry), "hook"),
            (
                on_return,
                ffi::set_native_return(hook, on_return),
                "return stub",
            ),
        ] {
            if let (true, Some(p)) = (set, native) {
                tracing::info!(
                    "{:#x}: program {} runs natively in the {what}",
                    self.data.addr,
                    p.id()
                );
            }
        }
    }
}

fn remove_site(addr: usize, mut site: Site) {
    site.report_traps();
    if let Some(h) = site.hook.take()
        && let Err(e) = h.remove()
    {
        tracing::error!("detach at {addr:#x}: {e}");
        // The hook may still fire: keep its data alive for good.
        Box::leak(site.data);
        return;
    }
    set_semaphores(&mut site.semaphores, &[]);
}

/// Makes the set of USDT semaphores a site holds `want`: +1 on each new one, -1 on each
/// dropped one (the kernel counts once per probe point and process).
fn set_semaphores(held: &mut Vec<usize>, want: &[usize]) {
    held.retain(|&s| {
        if want.contains(&s) {
            true
        } else {
            ffi::adjust_semaphore(s, -1);
            false
        }
    });
    for &s in want {
        if !held.contains(&s) && ffi::adjust_semaphore(s, 1) {
            held.push(s);
        }
    }
}
