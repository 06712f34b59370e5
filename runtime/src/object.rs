//! Object records in the store: programs, perf events and links (maps are in `bpftime-maps`).
//!
//! Each record is the payload of a store object; layouts are `#[repr(C)]`-like fixed offsets,
//! written once by the creator before [`Store::publish`], except the few fields marked
//! *mutable*, which are atomics (a perf event's enable flag and directly attached program).
//! Readers copy records out and validate every length before use.
//!
//! Programs are stored *after relocation*: an `lddw` that referenced a map fd in the loader
//! holds the map's **object id** (`src = BPF_PSEUDO_MAP_FD`, `imm = id`; for
//! `BPF_PSEUDO_MAP_VALUE`, `imm = id` and the second slot's imm the value offset), so any
//! process can resolve it.

use bpftime_maps::store::{ObjectKind, Store, StoreError};
use bpftime_vm::isa::{Insn, insns_from_bytes, insns_to_bytes};
use std::sync::atomic::Ordering;

/// Failures of the runtime, each with the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such object, or not of the expected kind.
    #[error("no {kind} with id {id}")]
    NoObject {
        /// Expected kind.
        kind: &'static str,
        /// Id.
        id: u32,
    },
    /// A record failed validation.
    #[error("corrupt {what} record for object {id}")]
    Corrupt {
        /// Record kind.
        what: &'static str,
        /// Id.
        id: u32,
    },
    /// An argument the kernel would refuse.
    #[error("invalid argument: {what}")]
    Invalid {
        /// Why.
        what: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A map operation failed.
    #[error(transparent)]
    Map(#[from] bpftime_maps::MapError),
}

impl RuntimeError {
    /// The kernel's errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            RuntimeError::NoObject { .. } => libc::ENOENT,
            RuntimeError::Corrupt { .. } => libc::EFAULT,
            RuntimeError::Invalid { .. } => libc::EINVAL,
            RuntimeError::Store(e) => e.errno(),
            RuntimeError::Map(e) => e.errno(),
        }
    }
}

type Result<T> = std::result::Result<T, RuntimeError>;

/// Largest program accepted (the kernel's `BPF_COMPLEXITY_LIMIT_INSNS`).
pub const MAX_PROG_INSNS: usize = bpftime_vm::verifier::MAX_INSNS;
/// Longest path stored for a uprobe target (`PATH_MAX`).
pub const MAX_PATH: usize = 4096;

const PROG_HDR: u64 = 64;

/// A program as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgRecord {
    /// `enum bpf_prog_type`.
    pub prog_type: u32,
    /// `expected_attach_type`.
    pub expected_attach_type: u32,
    /// Name (up to 15 bytes kept).
    pub name: String,
    /// Instructions with map references as object ids.
    pub insns: Vec<Insn>,
}

fn put_u32(store: &Store, off: u64, v: u32) -> Result<()> {
    store
        .segment()
        .atomic_u32(off)
        .ok_or(StoreError::Corrupt { what: "record" })?
        .store(v, Ordering::Relaxed);
    Ok(())
}

fn get_u32(store: &Store, off: u64) -> Option<u32> {
    Some(store.segment().atomic_u32(off)?.load(Ordering::Acquire))
}

fn put_u64(store: &Store, off: u64, v: u64) -> Result<()> {
    store
        .segment()
        .atomic_u64(off)
        .ok_or(StoreError::Corrupt { what: "record" })?
        .store(v, Ordering::Relaxed);
    Ok(())
}

fn get_u64(store: &Store, off: u64) -> Option<u64> {
    Some(store.segment().atomic_u64(off)?.load(Ordering::Acquire))
}

fn payload(store: &Store, id: u32, kind: ObjectKind, name: &'static str, min: u64) -> Result<u64> {
    let info = store
        .object(id)
        .filter(|o| o.kind == kind)
        .ok_or(RuntimeError::NoObject { kind: name, id })?;
    if info.payload_len < min {
        return Err(RuntimeError::Corrupt { what: name, id });
    }
    Ok(info.payload_off)
}

/// Stores a program and publishes it; returns its id.
pub fn create_prog(store: &Store, p: &ProgRecord) -> Result<u32> {
    if p.insns.is_empty() || p.insns.len() > MAX_PROG_INSNS {
        return Err(RuntimeError::Invalid {
            what: format!("program of {} instructions", p.insns.len()),
        });
    }
    let len = PROG_HDR + 8 * p.insns.len() as u64;
    let (id, off) = store.create(ObjectKind::Prog, &p.name, len)?;
    put_u32(store, off, p.prog_type)?;
    put_u32(store, off + 4, p.insns.len() as u32)?;
    put_u32(store, off + 8, p.expected_attach_type)?;
    store
        .segment()
        .write(off + PROG_HDR, &insns_to_bytes(&p.insns))
        .ok_or(StoreError::Corrupt { what: "program" })?;
    store.publish(id);
    Ok(id)
}

/// Reads program `id`.
pub fn read_prog(store: &Store, id: u32) -> Result<ProgRecord> {
    let off = payload(store, id, ObjectKind::Prog, "program", PROG_HDR)?;
    let corrupt = || RuntimeError::Corrupt {
        what: "program",
        id,
    };
    let info = store.object(id).ok_or(corrupt())?;
    let prog_type = get_u32(store, off).ok_or_else(corrupt)?;
    let cnt = get_u32(store, off + 4).ok_or_else(corrupt)? as u64;
    if cnt == 0 || PROG_HDR + cnt * 8 > info.payload_len {
        return Err(corrupt());
    }
    let mut bytes = vec![0u8; (cnt * 8) as usize];
    store
        .segment()
        .read(off + PROG_HDR, &mut bytes)
        .ok_or_else(corrupt)?;
    Ok(ProgRecord {
        prog_type,
        expected_attach_type: get_u32(store, off + 8).ok_or_else(corrupt)?,
        name: info.name,
        insns: insns_from_bytes(&bytes).map_err(|_| corrupt())?,
    })
}

/// Kinds of perf events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PerfKind {
    /// A uprobe (uprobe PMU, retprobe bit clear).
    Uprobe = 1,
    /// A uretprobe (retprobe bit set).
    Uretprobe = 2,
    /// A tracepoint (`PERF_TYPE_TRACEPOINT`, config = tracepoint id).
    Tracepoint = 3,
    /// `PERF_COUNT_SW_BPF_OUTPUT` (a perf buffer for `bpf_perf_event_output`).
    SoftwareBpfOutput = 4,
}

impl PerfKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Uprobe,
            2 => Self::Uretprobe,
            3 => Self::Tracepoint,
            4 => Self::SoftwareBpfOutput,
            _ => return None,
        })
    }
}

/// A perf event as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerfEventRecord {
    /// Kind.
    pub kind: PerfKind,
    /// pid filter (-1: any process).
    pub pid: i32,
    /// cpu filter (-1: any).
    pub cpu: i32,
    /// File offset of a uprobe, or the tracepoint id.
    pub offset: u64,
    /// USDT semaphore offset (`config` bits 32–63 of the uprobe PMU).
    pub ref_ctr_offset: u64,
    /// Target binary of a uprobe.
    pub path: String,
}

const PE_KIND: u64 = 0;
const PE_ENABLED: u64 = 4;
const PE_PID: u64 = 8;
const PE_CPU: u64 = 12;
const PE_OFFSET: u64 = 16;
const PE_REF_CTR: u64 = 24;
const PE_PATH_LEN: u64 = 32;
const PE_PROG: u64 = 36;
const PE_PATH: u64 = 64;
/// Store offset of the perf ring (`PERF_COUNT_SW_BPF_OUTPUT` events, set when the loader first
/// mmaps the event; 0 before). Owned by `bpftime_maps::perf_array`, which reads these fields.
const PE_RING: u64 = 40;
const _: () = assert!(
    PE_KIND == bpftime_maps::perf_array::EVENT_KIND
        && PE_ENABLED == bpftime_maps::perf_array::EVENT_ENABLED
        && PE_RING == bpftime_maps::perf_array::EVENT_RING
        && PE_RING + 8 <= PE_PATH
        && PerfKind::SoftwareBpfOutput as u32 == bpftime_maps::perf_array::KIND_BPF_OUTPUT
);

/// Stores a perf event (disabled, no program) and publishes it.
pub fn create_perf_event(store: &Store, r: &PerfEventRecord) -> Result<u32> {
    if r.path.len() > MAX_PATH {
        return Err(RuntimeError::Invalid {
            what: "uprobe path longer than PATH_MAX".into(),
        });
    }
    let len = PE_PATH + r.path.len() as u64;
    let (id, off) = store.create(ObjectKind::PerfEvent, "perf_event", len)?;
    put_u32(store, off + PE_KIND, r.kind as u32)?;
    put_u32(store, off + PE_PID, r.pid as u32)?;
    put_u32(store, off + PE_CPU, r.cpu as u32)?;
    put_u64(store, off + PE_OFFSET, r.offset)?;
    put_u64(store, off + PE_REF_CTR, r.ref_ctr_offset)?;
    put_u32(store, off + PE_PATH_LEN, r.path.len() as u32)?;
    store
        .segment()
        .write(off + PE_PATH, r.path.as_bytes())
        .ok_or(StoreError::Corrupt { what: "perf event" })?;
    store.publish(id);
    Ok(id)
}

/// Reads perf event `id`.
pub fn read_perf_event(store: &Store, id: u32) -> Result<PerfEventRecord> {
    let off = payload(store, id, ObjectKind::PerfEvent, "perf event", PE_PATH)?;
    let corrupt = || RuntimeError::Corrupt {
        what: "perf event",
        id,
    };
    let info = store.object(id).ok_or_else(corrupt)?;
    let kind = get_u32(store, off + PE_KIND)
        .and_then(PerfKind::from_u32)
        .ok_or_else(corrupt)?;
    let plen = get_u32(store, off + PE_PATH_LEN).ok_or_else(corrupt)? as u64;
    if plen as usize > MAX_PATH || PE_PATH + plen > info.payload_len {
        return Err(corrupt());
    }
    let mut path = vec![0u8; plen as usize];
    store
        .segment()
        .read(off + PE_PATH, &mut path)
        .ok_or_else(corrupt)?;
    Ok(PerfEventRecord {
        kind,
        pid: get_u32(store, off + PE_PID).ok_or_else(corrupt)? as i32,
        cpu: get_u32(store, off + PE_CPU).ok_or_else(corrupt)? as i32,
        offset: get_u64(store, off + PE_OFFSET).ok_or_else(corrupt)?,
        ref_ctr_offset: get_u64(store, off + PE_REF_CTR).ok_or_else(corrupt)?,
        path: String::from_utf8(path).map_err(|_| corrupt())?,
    })
}

/// One probe point of a `BPF_TRACE_UPROBE_MULTI` link: file offset, USDT semaphore offset
/// (0: none) and the BPF cookie programs see there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UprobeTarget {
    /// File offset of the probed instruction.
    pub offset: u64,
    /// File offset of the USDT semaphore, 0 for none.
    pub ref_ctr_offset: u64,
    /// `bpf_get_attach_cookie` at this point.
    pub cookie: u64,
}

/// Number of [`UprobeTarget`]s stored after the path (0 for an ordinary perf event).
const PE_MULTI_CNT: u64 = 48;
/// Most targets one uprobe_multi link may have (the kernel's `MAX_UPROBE_MULTI_CNT`).
pub const MAX_UPROBE_MULTI: usize = 1 << 20;

fn multi_at(path_len: u64) -> u64 {
    (PE_PATH + path_len).next_multiple_of(8)
}

/// Stores the hidden perf event behind a `BPF_TRACE_UPROBE_MULTI` link — every target of it,
/// with their cookies — enabled, and publishes it. `kind` is [`PerfKind::Uprobe`] or
/// [`PerfKind::Uretprobe`]; `offset` and `ref_ctr_offset` of `r` are unused.
pub fn create_uprobe_multi(
    store: &Store,
    r: &PerfEventRecord,
    targets: &[UprobeTarget],
) -> Result<u32> {
    if r.path.len() > MAX_PATH || targets.is_empty() || targets.len() > MAX_UPROBE_MULTI {
        return Err(RuntimeError::Invalid {
            what: format!("uprobe_multi of {} targets", targets.len()),
        });
    }
    let at = multi_at(r.path.len() as u64);
    let len = at + 24 * targets.len() as u64;
    let (id, off) = store.create(ObjectKind::PerfEvent, "uprobe_multi", len)?;
    put_u32(store, off + PE_KIND, r.kind as u32)?;
    put_u32(store, off + PE_PID, r.pid as u32)?;
    put_u32(store, off + PE_CPU, r.cpu as u32)?;
    put_u64(store, off + PE_OFFSET, targets[0].offset)?;
    put_u64(store, off + PE_REF_CTR, targets[0].ref_ctr_offset)?;
    put_u32(store, off + PE_PATH_LEN, r.path.len() as u32)?;
    put_u32(store, off + PE_MULTI_CNT, targets.len() as u32)?;
    put_u32(store, off + PE_ENABLED, 1)?;
    store
        .segment()
        .write(off + PE_PATH, r.path.as_bytes())
        .ok_or(StoreError::Corrupt { what: "perf event" })?;
    for (i, t) in targets.iter().enumerate() {
        let e = off + at + 24 * i as u64;
        put_u64(store, e, t.offset)?;
        put_u64(store, e + 8, t.ref_ctr_offset)?;
        put_u64(store, e + 16, t.cookie)?;
    }
    store.publish(id);
    Ok(id)
}

/// The targets of a uprobe_multi perf event (empty for an ordinary one).
pub fn read_uprobe_multi(store: &Store, id: u32) -> Result<Vec<UprobeTarget>> {
    let off = payload(store, id, ObjectKind::PerfEvent, "perf event", PE_PATH)?;
    let corrupt = || RuntimeError::Corrupt {
        what: "perf event",
        id,
    };
    let info = store.object(id).ok_or_else(corrupt)?;
    let n = u64::from(get_u32(store, off + PE_MULTI_CNT).ok_or_else(corrupt)?);
    if n == 0 {
        return Ok(Vec::new());
    }
    let plen = u64::from(get_u32(store, off + PE_PATH_LEN).ok_or_else(corrupt)?);
    let at = multi_at(plen);
    if n as usize > MAX_UPROBE_MULTI || at + 24 * n > info.payload_len {
        return Err(corrupt());
    }
    (0..n)
        .map(|i| {
            let e = off + at + 24 * i;
            Ok(UprobeTarget {
                offset: get_u64(store, e).ok_or_else(corrupt)?,
                ref_ctr_offset: get_u64(store, e + 8).ok_or_else(corrupt)?,
                cookie: get_u64(store, e + 16).ok_or_else(corrupt)?,
            })
        })
        .collect()
}

/// Enables or disables a perf event (`PERF_EVENT_IOC_ENABLE`/`DISABLE`); bumps nothing by itself
/// — call [`touch`] so agents re-read.
pub fn set_perf_enabled(store: &Store, id: u32, on: bool) -> Result<()> {
    let off = payload(store, id, ObjectKind::PerfEvent, "perf event", PE_PATH)?;
    put_u32(store, off + PE_ENABLED, u32::from(on))?;
    store.touch();
    Ok(())
}

/// Whether a perf event is enabled.
pub fn perf_enabled(store: &Store, id: u32) -> bool {
    payload(store, id, ObjectKind::PerfEvent, "perf event", PE_PATH)
        .ok()
        .and_then(|off| get_u32(store, off + PE_ENABLED))
        .is_some_and(|v| v != 0)
}

/// Attaches program `prog_id` directly to a perf event (`PERF_EVENT_IOC_SET_BPF`).
pub fn set_perf_prog(store: &Store, id: u32, prog_id: u32) -> Result<()> {
    let off = payload(store, id, ObjectKind::PerfEvent, "perf event", PE_PATH)?;
    put_u32(store, off + PE_PROG, prog_id)?;
    store.touch();
    Ok(())
}

/// The program attached with `PERF_EVENT_IOC_SET_BPF`, if any.
pub fn perf_prog(store: &Store, id: u32) -> Option<u32> {
    let off = payload(store, id, ObjectKind::PerfEvent, "perf event", PE_PATH).ok()?;
    get_u32(store, off + PE_PROG).filter(|&p| p != 0)
}

/// A link as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkRecord {
    /// The program.
    pub prog_id: u32,
    /// The perf event it is attached to.
    pub perf_event_id: u32,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
    /// `bpf_get_attach_cookie` value.
    pub cookie: u64,
}

/// Stores a link and publishes it.
pub fn create_link(store: &Store, l: &LinkRecord) -> Result<u32> {
    let (id, off) = store.create(ObjectKind::Link, "link", 32)?;
    put_u32(store, off, l.prog_id)?;
    put_u32(store, off + 4, l.perf_event_id)?;
    put_u32(store, off + 8, l.attach_type)?;
    put_u64(store, off + 16, l.cookie)?;
    store.publish(id);
    Ok(id)
}

/// Reads link `id`.
pub fn read_link(store: &Store, id: u32) -> Result<LinkRecord> {
    let off = payload(store, id, ObjectKind::Link, "link", 32)?;
    let corrupt = || RuntimeError::Corrupt { what: "link", id };
    Ok(LinkRecord {
        prog_id: get_u32(store, off).ok_or_else(corrupt)?,
        perf_event_id: get_u32(store, off + 4).ok_or_else(corrupt)?,
        attach_type: get_u32(store, off + 8).ok_or_else(corrupt)?,
        cookie: get_u64(store, off + 16).ok_or_else(corrupt)?,
    })
}

/// One probe point an agent should have attached: a perf event with its programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The perf event's id.
    pub perf_event_id: u32,
    /// The perf event.
    pub event: PerfEventRecord,
    /// Programs to run there, in attach order, with their cookies.
    pub progs: Vec<(u32, u64)>,
}

/// Every enabled perf event whose creator is alive, with the programs attached to it (by
/// `PERF_EVENT_IOC_SET_BPF` or by links whose creators are alive).
pub fn attachments(store: &Store) -> Vec<Attachment> {
    let ids = store.live_ids();
    let mut out: Vec<Attachment> = Vec::new();
    for &id in &ids {
        let Some(info) = store.object(id) else {
            continue;
        };
        if info.kind != ObjectKind::PerfEvent || !perf_enabled(store, id) || !store.owner_alive(id)
        {
            continue;
        }
        let Ok(event) = read_perf_event(store, id) else {
            continue;
        };
        let mut progs = Vec::new();
        if let Some(p) = perf_prog(store, id) {
            progs.push((p, 0));
        }
        out.push(Attachment {
            perf_event_id: id,
            event,
            progs,
        });
    }
    // A uprobe_multi perf event stands for several probe points, each with its cookie.
    let multi: Vec<(usize, Vec<UprobeTarget>)> = out
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a.event.kind, PerfKind::Uprobe | PerfKind::Uretprobe))
        .filter_map(|(i, a)| {
            read_uprobe_multi(store, a.perf_event_id)
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| (i, t))
        })
        .collect();
    for &id in &ids {
        let Some(info) = store.object(id) else {
            continue;
        };
        if info.kind != ObjectKind::Link || !store.owner_alive(id) {
            continue;
        }
        let Ok(l) = read_link(store, id) else {
            continue;
        };
        if let Some(a) = out.iter_mut().find(|a| a.perf_event_id == l.perf_event_id) {
            a.progs.push((l.prog_id, l.cookie));
        }
    }
    for (i, targets) in multi.into_iter().rev() {
        let a = out.remove(i);
        for t in targets {
            let mut event = a.event.clone();
            event.offset = t.offset;
            event.ref_ctr_offset = t.ref_ctr_offset;
            out.push(Attachment {
                perf_event_id: a.perf_event_id,
                event,
                progs: a.progs.iter().map(|&(p, _)| (p, t.cookie)).collect(),
            });
        }
    }
    out.retain(|a| !a.progs.is_empty());
    out
}

const AGENT_MAX_SITES: usize = 62;
const AGENT_LIST_LEN: u64 = 8 + 4 * AGENT_MAX_SITES as u64;
/// Control word (mutable): [`AGENT_DETACH`] / [`AGENT_DETACHED`] bits.
const AGENT_CONTROL: u64 = AGENT_LIST_LEN;
/// Completed syncs (mutable), so `bpftime attach` knows when a new agent has caught up.
const AGENT_SYNCS: u64 = AGENT_LIST_LEN + 4;
const AGENT_LEN: u64 = AGENT_LIST_LEN + 8;

/// Agent control bit: `bpftime detach` asks the agent to remove its hooks and stop.
pub const AGENT_DETACH: u32 = 1;
/// Agent control bit: the agent has removed every hook (its record goes next).
pub const AGENT_DETACHED: u32 = 2;

/// An agent's entry in the store: which process it runs in and which perf events it has
/// attached there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    /// The target process.
    pub pid: u32,
    /// Perf events attached in it (at most 62 listed).
    pub perf_events: Vec<u32>,
    /// Control bits ([`AGENT_DETACH`], [`AGENT_DETACHED`]).
    pub control: u32,
    /// Syncs the agent has completed.
    pub syncs: u32,
}

/// Registers the calling process's agent; returns the object id.
pub fn create_agent_record(store: &Store) -> Result<u32> {
    let (id, off) = store.create(ObjectKind::Agent, "agent", AGENT_LEN)?;
    put_u32(store, off, std::process::id())?;
    store.publish(id);
    Ok(id)
}

/// Records the perf events an agent has attached (no generation bump: nobody waits on it).
pub fn update_agent_record(store: &Store, id: u32, perf_events: &[u32]) -> Result<()> {
    let off = payload(store, id, ObjectKind::Agent, "agent", AGENT_LEN)?;
    let n = perf_events.len().min(AGENT_MAX_SITES);
    for (i, pe) in perf_events.iter().take(n).enumerate() {
        put_u32(store, off + 8 + 4 * i as u64, *pe)?;
    }
    put_u32(store, off + 4, n as u32)
}

/// Reads an agent record.
pub fn read_agent_record(store: &Store, id: u32) -> Result<AgentRecord> {
    let off = payload(store, id, ObjectKind::Agent, "agent", AGENT_LEN)?;
    let corrupt = || RuntimeError::Corrupt { what: "agent", id };
    let n = (get_u32(store, off + 4).ok_or_else(corrupt)? as usize).min(AGENT_MAX_SITES);
    let perf_events = (0..n)
        .map(|i| get_u32(store, off + 8 + 4 * i as u64).ok_or_else(corrupt))
        .collect::<Result<Vec<_>>>()?;
    Ok(AgentRecord {
        pid: get_u32(store, off).ok_or_else(corrupt)?,
        perf_events,
        control: get_u32(store, off + AGENT_CONTROL).ok_or_else(corrupt)?,
        syncs: get_u32(store, off + AGENT_SYNCS).ok_or_else(corrupt)?,
    })
}

fn agent_word(store: &Store, id: u32, at: u64) -> Result<&std::sync::atomic::AtomicU32> {
    let off = payload(store, id, ObjectKind::Agent, "agent", AGENT_LEN)?;
    store
        .segment()
        .atomic_u32(off + at)
        .ok_or(RuntimeError::Corrupt { what: "agent", id })
}

/// Sets `bits` in an agent record's control word and wakes every agent (`bpftime detach`
/// sets [`AGENT_DETACH`]; the agent sets [`AGENT_DETACHED`] once its hooks are gone).
pub fn set_agent_control(store: &Store, id: u32, bits: u32) -> Result<()> {
    agent_word(store, id, AGENT_CONTROL)?.fetch_or(bits, Ordering::AcqRel);
    store.touch();
    Ok(())
}

/// An agent record's control word (0 when the record is gone).
pub fn agent_control(store: &Store, id: u32) -> u32 {
    agent_word(store, id, AGENT_CONTROL).map_or(0, |w| w.load(Ordering::Acquire))
}

/// Counts one completed sync of the agent owning record `id`.
pub fn note_agent_sync(store: &Store, id: u32) -> Result<()> {
    agent_word(store, id, AGENT_SYNCS)?.fetch_add(1, Ordering::AcqRel);
    Ok(())
}
