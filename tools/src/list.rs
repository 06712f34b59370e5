//! `bpftime list`: what the store holds — maps, programs, perf events, links — and which
//! processes have agents attached.

use anyhow::{Result, bail};
use bpftime_maps::store::{ObjectKind, Store, default_path};
use bpftime_maps::{Map, MapType};
use bpftime_runtime::object::{
    perf_enabled, perf_prog, read_agent_record, read_link, read_perf_event, read_prog,
};
use std::fmt::Write as _;
use std::sync::Arc;

/// Arguments of `bpftime list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// The store (`/dev/shm/bpftime-<uid>-<NAME>`).
    #[arg(
        long,
        value_name = "NAME",
        env = "BPFTIME_STORE",
        default_value = "default"
    )]
    pub store: String,
}

fn map_type_name(t: u32) -> String {
    match MapType::try_from(t) {
        Ok(ty) => ty.name().into(),
        Err(_) => format!("type {t}"),
    }
}

/// Renders the listing.
pub fn render(store: &Arc<Store>) -> String {
    let mut out = String::new();
    let ids = store.live_ids();
    let objs: Vec<_> = ids.iter().filter_map(|&id| store.object(id)).collect();
    let alive = |id: u32| {
        if store.owner_alive(id) {
            ""
        } else {
            " (creator exited)"
        }
    };
    let _ = writeln!(out, "store {}", store.path().display());
    for o in objs.iter().filter(|o| o.kind == ObjectKind::Map) {
        let desc = match Map::open(store, o.id) {
            Ok(m) => {
                let d = m.def();
                format!(
                    "{} key {} value {} max_entries {} flags {:#x}",
                    map_type_name(d.map_type),
                    d.key_size,
                    d.value_size,
                    d.max_entries,
                    d.flags
                )
            }
            Err(e) => format!("unreadable: {e}"),
        };
        let _ = writeln!(
            out,
            "map   {:>5} {:<16} {desc} pid {}{}",
            o.id,
            o.name,
            o.owner_pid,
            alive(o.id)
        );
    }
    for o in objs.iter().filter(|o| o.kind == ObjectKind::Prog) {
        let desc = match read_prog(store, o.id) {
            Ok(p) => format!("type {} insns {}", p.prog_type, p.insns.len()),
            Err(e) => format!("unreadable: {e}"),
        };
        let _ = writeln!(
            out,
            "prog  {:>5} {:<16} {desc} pid {}{}",
            o.id,
            o.name,
            o.owner_pid,
            alive(o.id)
        );
    }
    for o in objs.iter().filter(|o| o.kind == ObjectKind::PerfEvent) {
        let desc = match read_perf_event(store, o.id) {
            Ok(e) => {
                let pid = if e.pid < 0 {
                    "all".to_string()
                } else {
                    e.pid.to_string()
                };
                let prog = perf_prog(store, o.id)
                    .map(|p| format!(" prog {p}"))
                    .unwrap_or_default();
                format!(
                    "{:?} {}:{:#x} pid-filter {pid} {}{prog}",
                    e.kind,
                    e.path,
                    e.offset,
                    if perf_enabled(store, o.id) {
                        "enabled"
                    } else {
                        "disabled"
                    }
                )
            }
            Err(e) => format!("unreadable: {e}"),
        };
        let _ = writeln!(
            out,
            "event {:>5} {desc} pid {}{}",
            o.id,
            o.owner_pid,
            alive(o.id)
        );
    }
    for o in objs.iter().filter(|o| o.kind == ObjectKind::Link) {
        let desc = match read_link(store, o.id) {
            Ok(l) => format!("prog {} -> event {}", l.prog_id, l.perf_event_id),
            Err(e) => format!("unreadable: {e}"),
        };
        let _ = writeln!(
            out,
            "link  {:>5} {desc} pid {}{}",
            o.id,
            o.owner_pid,
            alive(o.id)
        );
    }
    for o in objs.iter().filter(|o| o.kind == ObjectKind::Agent) {
        if !store.owner_alive(o.id) {
            continue;
        }
        if let Ok(a) = read_agent_record(store, o.id) {
            let evs: Vec<String> = a.perf_events.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "agent pid {} attached events [{}]",
                a.pid,
                evs.join(", ")
            );
        }
    }
    out
}

/// Runs `bpftime list`.
pub fn main(args: &ListArgs) -> Result<()> {
    let path = default_path(&args.store);
    if !path.exists() {
        bail!(
            "no store {} (nothing has been loaded under this name)",
            path.display()
        );
    }
    let store = Arc::new(Store::open(&path)?);
    print!("{}", render(&store));
    Ok(())
}
