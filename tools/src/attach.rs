//! `bpftime attach PID` and `bpftime detach [PID]`: start and stop the agent in a running
//! process that was not started with `bpftime start`.
//!
//! `attach` checks everything it can before touching the target — the process exists and runs
//! as our user, the store exists, no agent of that store runs there yet — then loads the agent
//! with our ptrace injector ([`crate::inject`]: `dlopen` + `bpftime_agent_attach(store)` in one
//! borrowed thread) and waits until the agent has synced with the store once, so the store's
//! probes are active when it returns. When the agent library is already loaded (a previous
//! attach, or `bpftime start`), only the start call is injected.
//!
//! `detach` needs no ptrace: it sets the detach bit in the agent's store record and wakes the
//! agents; the agent's own thread removes every hook (original bytes back), drops its record
//! and ends, whatever the process's other threads are doing. The library stays loaded (code of
//! a removed hook may still be on a stack), so a later `attach` only starts a new agent.

use crate::inject::{self, AgentCall};
use crate::launch::{Library, find_library};
use anyhow::{Context as _, Result, bail};
use bpftime_maps::store::{ObjectKind, Store, default_path};
use bpftime_runtime::object::{AGENT_DETACH, AGENT_DETACHED, read_agent_record, set_agent_control};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long `attach` waits for the agent's first sync and `detach` for the agent to finish.
const WAIT: Duration = Duration::from_secs(10);
/// The agent thread's name (`bpftime-agent`), never borrowed for injection.
const AGENT_THREAD: &str = "bpftime-agent";

/// Arguments of `bpftime attach`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// The store whose probes the agent attaches (`/dev/shm/bpftime-<uid>-<NAME>`).
    #[arg(
        long,
        value_name = "NAME",
        env = "BPFTIME_STORE",
        default_value = "default"
    )]
    pub store: String,

    /// The agent's log level inside the target (`error`, `warn`, `info`, `debug`); without it
    /// the agent prints nothing.
    #[arg(long, value_name = "LEVEL")]
    pub log: Option<String>,

    /// Where the agent logs (default: the target's stderr).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// The thread to borrow for the injected calls (default: the main thread).
    #[arg(long, value_name = "TID")]
    pub thread: Option<i32>,

    /// The process to attach to.
    pub pid: i32,
}

/// Arguments of `bpftime detach`.
#[derive(Debug, Clone, clap::Args)]
pub struct DetachArgs {
    /// The store (`/dev/shm/bpftime-<uid>-<NAME>`).
    #[arg(
        long,
        value_name = "NAME",
        env = "BPFTIME_STORE",
        default_value = "default"
    )]
    pub store: String,

    /// The process to detach from (default: every process with an agent on the store).
    pub pid: Option<i32>,
}

/// What `/proc/PID/status` says about a process or thread.
#[derive(Debug, Default)]
struct Status {
    state: char,
    uids: Vec<u32>,
    tracer: i32,
    sig_blocked: u64,
    sig_ignored: u64,
    shadow_stack: bool,
}

fn status(path: &str) -> Option<Status> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut s = Status::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "Uid" => {
                s.uids = v
                    .split_whitespace()
                    .filter_map(|u| u.parse().ok())
                    .collect()
            }
            "TracerPid" => s.tracer = v.parse().unwrap_or(0),
            "SigBlk" => s.sig_blocked = u64::from_str_radix(v, 16).unwrap_or(0),
            "SigIgn" => s.sig_ignored = u64::from_str_radix(v, 16).unwrap_or(0),
            "x86_Thread_features" => s.shadow_stack = v.split_whitespace().any(|f| f == "shstk"),
            _ => {}
        }
    }
    Some(s)
}

fn euid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX)
}

fn check_store_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || name.contains(['/', '\0']) {
        bail!("invalid store name {name:?}");
    }
    Ok(())
}

/// Opens an existing store (never creates one).
fn open_existing(name: &str) -> Result<Store> {
    check_store_name(name)?;
    let path = default_path(name);
    if !path.exists() {
        bail!(
            "no store {} (nothing has been loaded under the name {name:?}: run the loader with \
             `bpftime load --store {name} -- ...` first)",
            path.display()
        );
    }
    Store::open(&path).with_context(|| format!("cannot open the store {}", path.display()))
}

/// Live agent records on `store`: (record id, pid, control bits, syncs, perf events).
fn agents(store: &Store) -> Vec<(u32, bpftime_runtime::object::AgentRecord)> {
    store
        .live_ids()
        .into_iter()
        .filter(|&id| {
            store
                .object(id)
                .is_some_and(|o| o.kind == ObjectKind::Agent && store.owner_alive(id))
        })
        .filter_map(|id| read_agent_record(store, id).ok().map(|r| (id, r)))
        .collect()
}

/// The record of a running (not detaching) agent in `pid`.
fn active_agent(store: &Store, pid: i32) -> Option<(u32, bpftime_runtime::object::AgentRecord)> {
    agents(store)
        .into_iter()
        .find(|(_, r)| r.pid as i32 == pid && r.control & AGENT_DETACH == 0)
}

/// Checks the process: it exists, runs, is ours, and is not traced. Touches nothing.
fn check_process(pid: i32) -> Result<Status> {
    if pid <= 0 {
        bail!("invalid pid {pid}");
    }
    let Some(st) = status(&format!("/proc/{pid}/status")) else {
        bail!("no process {pid}");
    };
    if matches!(st.state, 'Z' | 'X') {
        bail!("process {pid} has exited");
    }
    if st.state == 'T' {
        bail!(
            "process {pid} is stopped (SIGSTOP/SIGTSTP): its agent could not start; continue it \
             first (kill -CONT {pid}); the process was not touched"
        );
    }
    let me = euid();
    if st.uids.iter().any(|&u| u != me) {
        let owner = st.uids.first().copied().unwrap_or(0);
        if me == 0 {
            bail!(
                "process {pid} runs as uid {owner}: run bpftime attach as that user (the agent \
                 uses that user's stores); the process was not touched"
            );
        }
        bail!(
            "process {pid} belongs to uid {owner}, you are uid {me}: bpftime attach injects the \
             agent with ptrace, which only works on your own processes \
             (Operation not permitted); the process was not touched"
        );
    }
    if st.tracer != 0 {
        bail!(
            "process {pid} is already being traced by process {} (a debugger?); the process \
             was not touched",
            st.tracer
        );
    }
    if st.shadow_stack {
        bail!(
            "process {pid} runs with a CET shadow stack, which the injector does not support \
             yet (use `bpftime start`); the process was not touched"
        );
    }
    Ok(st)
}

/// The thread to borrow: `--thread`, else the main thread, else the first other live thread
/// that is not the agent's.
fn pick_thread(pid: i32, wanted: Option<i32>) -> Result<i32> {
    let usable = |tid: i32| -> Result<(), String> {
        let dir = format!("/proc/{pid}/task/{tid}");
        let Some(st) = status(&format!("{dir}/status")) else {
            return Err(format!("process {pid} has no thread {tid}"));
        };
        if matches!(st.state, 'Z' | 'X') {
            return Err(format!("thread {tid} has exited"));
        }
        let comm = std::fs::read_to_string(format!("{dir}/comm")).unwrap_or_default();
        if comm.trim() == AGENT_THREAD {
            return Err(format!("thread {tid} is the agent's own"));
        }
        const SIGSEGV_BIT: u64 = 1 << (libc::SIGSEGV - 1);
        if (st.sig_blocked | st.sig_ignored) & SIGSEGV_BIT != 0 {
            return Err(format!(
                "thread {tid} blocks or ignores SIGSEGV, which the injected calls return through"
            ));
        }
        Ok(())
    };
    if let Some(tid) = wanted {
        return usable(tid).map(|()| tid).map_err(anyhow::Error::msg);
    }
    let first = usable(pid);
    if first.is_ok() {
        return Ok(pid);
    }
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids.into_iter()
        .find(|&t| usable(t).is_ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no thread of process {pid} can be borrowed: {}",
                first.unwrap_err()
            )
        })
}

/// Runs `bpftime attach`.
pub fn attach_main(args: &AttachArgs) -> Result<()> {
    let pid = args.pid;
    check_process(pid)?;
    let store = open_existing(&args.store)?;
    if let Some((_, r)) = active_agent(&store, pid) {
        println!(
            "process {pid} already has an agent on store {} ({} probe(s) attached)",
            args.store,
            r.perf_events.len()
        );
        return Ok(());
    }
    let tid = pick_thread(pid, args.thread)?;
    let maps = inject::read_maps(pid)?;
    // An agent already loaded (a previous attach, `bpftime start`): use that copy, so the
    // process never has two.
    let library = match inject::mapped_file(&maps, |n| n == "libbpftime_agent.so") {
        Some(p) => p,
        None => {
            let p = find_library(Library::Agent)?;
            let p = p.canonicalize().unwrap_or(p);
            p.to_str()
                .with_context(|| format!("{} is not a UTF-8 path", p.display()))?
                .to_string()
        }
    };
    let dl = inject::find_dl_functions(pid, &maps)?;
    let call = AgentCall {
        library: &library,
        store: &args.store,
        log_level: args.log.as_deref(),
        log_file: args.log_file.as_deref(),
    };
    let r = inject::inject_agent(pid, tid, &dl, &call)?;
    match r {
        0 | 1 => {}
        e if e == -libc::EBUSY => bail!(
            "process {pid} already has an agent following another store; detach it there first \
             (bpftime detach --store OTHER {pid})"
        ),
        e => bail!(
            "the agent in process {pid} did not start: {}",
            std::io::Error::from_raw_os_error(-e)
        ),
    }
    // Wait for the agent's first sync: from then on the store's probes are in place.
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((_, rec)) = active_agent(&store, pid).filter(|(_, r)| r.syncs > 0) {
            println!(
                "attached to process {pid} (store {}): {} probe(s) attached",
                args.store,
                rec.perf_events.len()
            );
            return Ok(());
        }
        if status(&format!("/proc/{pid}/status")).is_none_or(|s| matches!(s.state, 'Z' | 'X')) {
            bail!("process {pid} exited while the agent was starting");
        }
        if Instant::now() > deadline {
            bail!(
                "the agent was loaded into process {pid} but did not register on store {} within \
                 {}s (run with --log debug --log-file FILE to see why)",
                args.store,
                WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `bpftime detach`.
pub fn detach_main(args: &DetachArgs) -> Result<()> {
    if let Some(pid) = args.pid
        && (pid <= 0 || status(&format!("/proc/{pid}/status")).is_none())
    {
        bail!("no process {pid}");
    }
    let store = open_existing(&args.store)?;
    let targets: Vec<(u32, u32)> = agents(&store)
        .into_iter()
        .filter(|(_, r)| args.pid.is_none_or(|p| r.pid as i32 == p))
        .map(|(id, r)| (id, r.pid))
        .collect();
    if targets.is_empty() {
        match args.pid {
            Some(pid) => println!("process {pid} has no agent on store {}", args.store),
            None => println!("no agent on store {}", args.store),
        }
        return Ok(());
    }
    for &(id, _) in &targets {
        set_agent_control(&store, id, AGENT_DETACH)
            .with_context(|| format!("cannot signal agent record {id}"))?;
    }
    let deadline = Instant::now() + WAIT;
    let mut pending = targets;
    loop {
        pending.retain(|&(id, pid)| {
            let gone = match store.object(id) {
                Some(o) if o.kind == ObjectKind::Agent && o.owner_pid == pid => {
                    !store.owner_alive(id)
                        || read_agent_record(&store, id)
                            .map_or(true, |r| r.control & AGENT_DETACHED != 0)
                }
                _ => true,
            };
            if gone {
                println!("detached from process {pid}");
            }
            !gone
        });
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let pids: Vec<String> = pending.iter().map(|(_, p)| p.to_string()).collect();
            bail!(
                "the agent in process(es) {} did not finish detaching within {}s (is the \
                 process stopped?)",
                pids.join(", "),
                WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_that_would_escape_dev_shm_are_refused() {
        assert!(check_store_name("default").is_ok());
        for bad in ["", "a/b", "../x", "a\0b"] {
            assert!(check_store_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_status_parses() {
        let st = status("/proc/self/status").unwrap();
        assert!(matches!(st.state, 'R' | 'S'), "{}", st.state);
        assert_eq!(st.uids.len(), 4);
        assert!(st.uids.iter().all(|&u| u == euid()));
    }

    #[test]
    fn dead_and_invalid_pids_are_refused_before_anything_else() {
        assert!(check_process(0).is_err());
        // pid_max is at most 2^22.
        let e = check_process(1 << 23).unwrap_err().to_string();
        assert!(e.contains("no process"), "{e}");
    }
}
