//! A guest's BPF object in the store: its maps, programs and attachments.
//!
//! [`BpfObject::load`] does what libbpf's `bpf_object__load` does for a loader under
//! `bpftime load`, straight into the store instead of through an emulated `bpf()`:
//!
//! 1. parse the ELF with aya-obj (programs, `.maps` BTF-defined and legacy `maps` definitions,
//!    `.data`/`.rodata`/`.bss` as one-element arrays);
//! 2. create every map with [`Map::create_with`] (the same checks as `BPF_MAP_CREATE`) and
//!    write the initial contents of the global-data maps;
//! 3. relocate map references with aya-obj, giving it each map's **object id** as its "fd",
//!    which yields exactly the store's convention (`lddw src=BPF_PSEUDO_MAP_FD imm=id`,
//!    `BPF_PSEUDO_MAP_VALUE imm=id` with the offset in the second slot), then link
//!    bpf-to-bpf calls;
//! 4. check each program with the runtime's loader ([`LoadedProg::from_insns`], as the
//!    syscall-server's `BPF_PROG_LOAD` does) and store it with [`create_prog`].
//!
//! Attaching a uprobe writes the records the syscall-server writes for libbpf's
//! `perf_event_open` + `BPF_LINK_CREATE`: an enabled uprobe perf event (canonical binary path,
//! file offset, no pid filter) and a link, so agents in target processes attach the program.
//!
//! The host holds one reference on each object it created and drops them, links first, when
//! the object is closed or the host exits; if the host is killed, agents ignore the records
//! (their creator is gone) and the next loader reclaims them.
//!
//! Not supported (an error names it): CO-RE (BTF) relocations, kprobes (the kernel here has
//! none), program types other than uprobe/uretprobe/tracepoint sections at attach time.

use crate::error::{HostError, Result};
use aya_obj::generated::bpf_insn;
use aya_obj::{Object, ProgramSection};
use bpftime_maps::map::MapExtra;
use bpftime_maps::{Map, MapDef, MapType, ObjectKind, Store, perf_array};
use bpftime_runtime::LoadedProg;
use bpftime_runtime::object::{
    LinkRecord, PerfEventRecord, PerfKind, ProgRecord, create_link, create_perf_event, create_prog,
    set_perf_enabled,
};
use bpftime_vm::helper::HelperRegistry;
use bpftime_vm::isa::Insn;
use object::{Object as _, ObjectSection as _, SectionIndex};
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `BPF_PROG_TYPE_KPROBE` (uprobes are kprobe-type programs).
pub const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `BPF_PROG_TYPE_TRACEPOINT`.
pub const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
/// `BPF_PROG_TYPE_RAW_TRACEPOINT`.
pub const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
/// `BPF_PERF_EVENT` attach type of a perf-event link.
pub const BPF_PERF_EVENT: u32 = 41;
/// Largest object accepted from a guest.
pub const MAX_OBJECT_SIZE: usize = 64 << 20;

/// A map of a loaded object.
#[derive(Debug)]
pub struct ObjMap {
    /// Name in the object (`calls`, `.rodata`, …).
    pub name: String,
    /// The open map.
    pub map: Map,
}

/// A program of a loaded object.
#[derive(Debug, Clone)]
pub struct ObjProg {
    /// Function name.
    pub name: String,
    /// ELF section name (`uprobe/victim:target_function`).
    pub section: String,
    /// What aya-obj made of the section.
    pub kind: SectionKind,
    /// Object id in the store.
    pub id: u32,
}

/// The program kinds the host knows how to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// `uprobe`, `uprobe/…`.
    Uprobe,
    /// `uretprobe`, `uretprobe/…`.
    Uretprobe,
    /// `tracepoint/…`, `tp/…`.
    Tracepoint,
    /// `raw_tp/…`, `raw_tracepoint/…`.
    RawTracepoint,
    /// `kprobe`, `kretprobe`: no kprobes here.
    Kprobe,
    /// Anything else aya-obj parses (socket, xdp, …): loaded, never attached.
    Other,
}

/// What an attach created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// The perf event record.
    pub perf_event_id: u32,
    /// The link record.
    pub link_id: u32,
}

/// A BPF object loaded into the store.
#[derive(Debug)]
pub struct BpfObject {
    store: Arc<Store>,
    /// Maps, in creation order (inner-map templates included, unnamed).
    pub maps: Vec<ObjMap>,
    /// Programs, sorted by name.
    pub progs: Vec<ObjProg>,
    /// Uprobe attachments.
    pub attached: Vec<Attached>,
    /// Other objects this one owns (perf buffer events), released with it.
    pub extra: Vec<u32>,
    /// Ids of inner-map templates (maps of maps), released with it.
    templates: Vec<Map>,
}

impl BpfObject {
    /// Loads the ELF object `bytes` into `store`.
    pub fn load(store: &Arc<Store>, bytes: &[u8], helpers: &Arc<HelperRegistry>) -> Result<Self> {
        if bytes.len() > MAX_OBJECT_SIZE {
            return Err(HostError::invalid(format!(
                "object of {} bytes (limit {MAX_OBJECT_SIZE})",
                bytes.len()
            )));
        }
        let elf = object::read::File::parse(bytes).map_err(|e| HostError::Object {
            what: format!("not an ELF object: {e}"),
        })?;
        if elf.architecture() != object::Architecture::Bpf {
            return Err(HostError::Object {
                what: format!("ELF for {:?}, not BPF", elf.architecture()),
            });
        }
        let section_name = |index: usize| -> String {
            elf.section_by_index(SectionIndex(index))
                .ok()
                .and_then(|s| s.name().ok().map(str::to_owned))
                .unwrap_or_default()
        };
        let mut obj =
            catch_panics("parsing", || Object::parse(bytes))?.map_err(|e| HostError::Object {
                what: e.to_string(),
            })?;
        if obj.has_btf_relocations() {
            return Err(HostError::NotSupported {
                what: "CO-RE (BTF) relocations".into(),
            });
        }
        let mut this = BpfObject {
            store: store.clone(),
            maps: Vec::new(),
            progs: Vec::new(),
            attached: Vec::new(),
            extra: Vec::new(),
            templates: Vec::new(),
        };
        // Maps: sorted by name so ids come out in a stable order.
        let mut defs: Vec<(String, aya_obj::Map)> = obj
            .maps
            .iter()
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect();
        defs.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, def) in &defs {
            let map = this.create_map(name, def)?;
            this.maps.push(ObjMap {
                name: name.clone(),
                map,
            });
        }
        let text_sections: HashSet<usize> =
            obj.functions.keys().map(|&(section, _)| section).collect();
        let ids: Vec<(String, RawFd, &aya_obj::Map)> = defs
            .iter()
            .zip(&this.maps)
            .map(|((name, def), m)| (name.clone(), m.map.id() as RawFd, def))
            .collect();
        catch_panics("relocating map references", || {
            obj.relocate_maps(
                ids.iter().map(|(n, fd, m)| (n.as_str(), *fd, *m)),
                &text_sections,
            )
        })?
        .map_err(|e| HostError::Object {
            what: format!("{e:#}"),
        })?;
        catch_panics("linking bpf-to-bpf calls", || {
            obj.relocate_calls(&text_sections)
        })?
        .map_err(|e| HostError::Object {
            what: format!("{e:#}"),
        })?;

        let mut programs: Vec<(String, aya_obj::Program)> = obj
            .programs
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        programs.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, p) in programs {
            let function = obj
                .functions
                .get(&(p.section_index, p.address))
                .ok_or_else(|| HostError::Object {
                    what: format!("program `{name}` has no code"),
                })?;
            let insns: Vec<Insn> = function.instructions.iter().map(to_insn).collect();
            let kind = match p.section {
                ProgramSection::UProbe { .. } => SectionKind::Uprobe,
                ProgramSection::URetProbe { .. } => SectionKind::Uretprobe,
                ProgramSection::TracePoint => SectionKind::Tracepoint,
                ProgramSection::RawTracePoint => SectionKind::RawTracepoint,
                ProgramSection::KProbe | ProgramSection::KRetProbe => SectionKind::Kprobe,
                _ => SectionKind::Other,
            };
            let prog_type = match kind {
                SectionKind::Uprobe | SectionKind::Uretprobe | SectionKind::Kprobe => {
                    BPF_PROG_TYPE_KPROBE
                }
                SectionKind::Tracepoint => BPF_PROG_TYPE_TRACEPOINT,
                SectionKind::RawTracepoint => BPF_PROG_TYPE_RAW_TRACEPOINT,
                SectionKind::Other => {
                    tracing::info!("program `{name}`: section type not attachable here, skipped");
                    continue;
                }
            };
            // The loader checks, as BPF_PROG_LOAD runs them.
            LoadedProg::from_insns(store, 0, name.clone(), insns.clone(), helpers.clone())
                .map_err(|source| HostError::Program {
                    name: name.clone(),
                    source,
                })?;
            let id = create_prog(
                store,
                &ProgRecord {
                    prog_type,
                    expected_attach_type: 0,
                    name: name.clone(),
                    insns,
                },
            )?;
            this.progs.push(ObjProg {
                name,
                section: section_name(p.section_index),
                kind,
                id,
            });
        }
        Ok(this)
    }

    fn create_map(&mut self, name: &str, m: &aya_obj::Map) -> Result<Map> {
        let ty = MapType::try_from(m.map_type()).map_err(|_| HostError::NotSupported {
            what: format!("map `{name}` of type {}", m.map_type()),
        })?;
        let mut max_entries = m.max_entries();
        if ty == MapType::PerfEventArray && max_entries == 0 {
            // libbpf sizes a perf event array to the number of possible CPUs.
            max_entries = bpftime_maps::percpu::nr_possible_cpus();
        }
        let def = MapDef {
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries,
            flags: m.map_flags(),
        };
        let mut extra = MapExtra {
            map_extra: m.map_extra(),
            inner_map_id: 0,
        };
        if let Some(inner) = m.inner() {
            let t = Map::create(
                &self.store,
                MapDef {
                    map_type: inner.map_type(),
                    key_size: inner.key_size(),
                    value_size: inner.value_size(),
                    max_entries: inner.max_entries(),
                    flags: inner.map_flags(),
                },
                "inner_template",
            )?;
            extra.inner_map_id = t.id();
            self.templates.push(t);
        }
        let map =
            Map::create_with(&self.store, def, extra, name).map_err(|e| HostError::Object {
                what: format!("map `{name}`: {e}"),
            })?;
        // Global data: the section's initial contents (`.bss` is zeros).
        if !m.data().is_empty()
            && let Err(e) = map.update_syscall(&0u32.to_ne_bytes(), m.data(), 0)
        {
            release_map(&self.store, &map);
            return Err(HostError::Object {
                what: format!("initialising `{name}`: {e}"),
            });
        }
        Ok(map)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The map named `name`.
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.maps.iter().find(|m| m.name == name).map(|m| &m.map)
    }

    /// The program whose function is `name`.
    pub fn prog(&self, name: &str) -> Option<&ObjProg> {
        self.progs.iter().find(|p| p.name == name)
    }

    /// Attaches program `name` as a uprobe at `target` (`binary:function[+offset]`), or at the
    /// target in its section name (`uprobe/binary:function`) when `target` is `None`.
    pub fn attach_uprobe(&mut self, name: &str, target: Option<&str>) -> Result<Attached> {
        let prog = self.prog(name).ok_or_else(|| HostError::NotFound {
            what: "program",
            name: name.into(),
        })?;
        let kind = match prog.kind {
            SectionKind::Uprobe => PerfKind::Uprobe,
            SectionKind::Uretprobe => PerfKind::Uretprobe,
            other => {
                return Err(HostError::NotSupported {
                    what: format!("attaching a {other:?} program as a uprobe"),
                });
            }
        };
        let target = match target {
            Some(t) => t.to_owned(),
            None => section_target(&prog.section).ok_or_else(|| HostError::Target {
                target: prog.section.clone(),
                why: "no attach target given and none in the section name \
                      (use SEC(\"uprobe/<binary>:<function>\") or pass one)"
                    .into(),
            })?,
        };
        let (path, offset) = resolve_uprobe_target(&target)?;
        let prog_id = prog.id;
        let a = self.attach_event(
            prog_id,
            &PerfEventRecord {
                kind,
                pid: -1,
                cpu: -1,
                offset,
                ref_ctr_offset: 0,
                path,
            },
        )?;
        tracing::info!(
            "attached `{name}` at {target} (perf event {}, link {})",
            a.perf_event_id,
            a.link_id
        );
        Ok(a)
    }

    /// Attaches program `name` to a syscall tracepoint: `target` is `category:name` or
    /// `category/name` (`syscalls:sys_enter_openat`, `raw_syscalls:sys_exit`), or, when
    /// `None`, the section name gives it (`tracepoint/syscalls/sys_enter_openat`,
    /// `raw_tp/sys_enter`).
    pub fn attach_tracepoint(&mut self, name: &str, target: Option<&str>) -> Result<Attached> {
        use bpftime_attach::syscall::Tracepoint;
        use bpftime_attach::syscall::table::RAW_TP_FLAG;
        let prog = self.prog(name).ok_or_else(|| HostError::NotFound {
            what: "program",
            name: name.into(),
        })?;
        let raw = match prog.kind {
            SectionKind::Tracepoint => false,
            SectionKind::RawTracepoint => true,
            other => {
                return Err(HostError::NotSupported {
                    what: format!("attaching a {other:?} program to a tracepoint"),
                });
            }
        };
        let spec = match target {
            Some(t) => t.to_owned(),
            None => prog
                .section
                .split_once('/')
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or_default(),
        };
        let bad = |why: &str| HostError::Target {
            target: spec.clone(),
            why: why.into(),
        };
        let tp = if raw {
            Tracepoint::raw_by_name(&spec)
        } else {
            let (category, tp_name) = spec
                .split_once([':', '/'])
                .ok_or_else(|| bad("expected <category>:<name>"))?;
            Tracepoint::by_path(category, tp_name)
        }
        .ok_or_else(|| {
            bad("not a syscall tracepoint (syscalls:sys_{enter,exit}_<name>, raw_syscalls:sys_{enter,exit})")
        })?;
        let id = u64::from(tp.id()) | if raw { RAW_TP_FLAG } else { 0 };
        let prog_id = prog.id;
        let a = self.attach_event(
            prog_id,
            &PerfEventRecord {
                kind: PerfKind::Tracepoint,
                pid: -1,
                cpu: -1,
                offset: id,
                ref_ctr_offset: 0,
                path: String::new(),
            },
        )?;
        tracing::info!(
            "attached `{name}` to {}{} (perf event {}, link {})",
            if raw { "raw tracepoint " } else { "" },
            tp.name(),
            a.perf_event_id,
            a.link_id
        );
        Ok(a)
    }

    /// Writes an enabled perf event and a link to `prog_id`, the records libbpf's
    /// `perf_event_open` + `BPF_LINK_CREATE` leave in the store under `bpftime load`.
    fn attach_event(&mut self, prog_id: u32, rec: &PerfEventRecord) -> Result<Attached> {
        let perf = create_perf_event(&self.store, rec)?;
        let link = set_perf_enabled(&self.store, perf, true).and_then(|()| {
            create_link(
                &self.store,
                &LinkRecord {
                    prog_id,
                    perf_event_id: perf,
                    attach_type: BPF_PERF_EVENT,
                    cookie: 0,
                },
            )
        });
        let link = match link {
            Ok(l) => l,
            Err(e) => {
                self.store.release(perf);
                return Err(e.into());
            }
        };
        let a = Attached {
            perf_event_id: perf,
            link_id: link,
        };
        self.attached.push(a);
        Ok(a)
    }

    /// Number of target processes whose agents have attached this object's probes now.
    pub fn attached_processes(&self) -> usize {
        let ours: HashSet<u32> = self.attached.iter().map(|a| a.perf_event_id).collect();
        if ours.is_empty() {
            return 0;
        }
        self.store
            .live_ids()
            .into_iter()
            .filter(|&id| {
                self.store
                    .object(id)
                    .is_some_and(|o| o.kind == ObjectKind::Agent && self.store.owner_alive(id))
            })
            .filter_map(|id| bpftime_runtime::object::read_agent_record(&self.store, id).ok())
            .filter(|a| a.perf_events.iter().any(|p| ours.contains(p)))
            .count()
    }
}

impl Drop for BpfObject {
    fn drop(&mut self) {
        let store = self.store.clone();
        // Links first (agents drop the probes on the next sync), then what they point to.
        for a in self.attached.drain(..) {
            store.release(a.link_id);
            store.release(a.perf_event_id);
        }
        for id in self.extra.drain(..) {
            let ring = perf_array::event_ring(&store, id).map(|r| (r.offset(), r.len()));
            if store.release(id).is_some()
                && let Some((off, len)) = ring
            {
                store.free(off, len);
            }
        }
        for p in self.progs.drain(..) {
            store.release(p.id);
        }
        for m in self.maps.drain(..) {
            release_map(&store, &m.map);
        }
        for t in self.templates.drain(..) {
            release_map(&store, &t);
        }
    }
}

/// Drops the host's reference on a map, freeing its data when it was the last.
fn release_map(store: &Store, map: &Map) {
    if store.release(map.id()).is_some() {
        store.free(map.data_offset(), map.data_len());
    }
}

/// The target in a section name: `uprobe/<binary>:<function>` → `<binary>:<function>`.
pub fn section_target(section: &str) -> Option<String> {
    let (_, rest) = section.split_once('/')?;
    (!rest.is_empty() && rest.contains(':')).then(|| rest.to_owned())
}

/// `binary:function[+offset]` → (canonical binary path, file offset). The binary is a path,
/// or a bare name looked up in `PATH`.
pub fn resolve_uprobe_target(target: &str) -> Result<(String, u64)> {
    let bad = |why: String| HostError::Target {
        target: target.into(),
        why,
    };
    let (bin, func) = target
        .rsplit_once(':')
        .ok_or_else(|| bad("expected <binary>:<function>".into()))?;
    if bin.is_empty() || func.is_empty() {
        return Err(bad("expected <binary>:<function>".into()));
    }
    let path = find_binary(bin).ok_or_else(|| bad(format!("binary `{bin}` not found")))?;
    let (sym, extra) = match func.split_once('+') {
        Some((s, off)) => (
            s,
            parse_offset(off).ok_or_else(|| bad("bad offset".into()))?,
        ),
        None => (func, 0),
    };
    let offset = match parse_offset(sym) {
        // A raw file offset (`binary:0x1234`).
        Some(off) if sym.starts_with("0x") => off,
        _ => bpftime_attach::resolve::symbol_file_offset(&path, sym)
            .map_err(|e| bad(e.to_string()))?,
    };
    let path = path
        .into_os_string()
        .into_string()
        .map_err(|_| bad("path is not UTF-8".into()))?;
    Ok((path, offset.wrapping_add(extra)))
}

fn parse_offset(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn find_binary(bin: &str) -> Option<PathBuf> {
    let canon = |p: &Path| {
        std::fs::canonicalize(p)
            .ok()
            .filter(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file()))
    };
    if bin.contains('/') {
        return canon(Path::new(bin));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find_map(|dir| canon(&dir.join(bin)))
        .or_else(|| canon(Path::new(bin)))
}

fn to_insn(i: &bpf_insn) -> Insn {
    Insn::new(i.code, i.dst_reg(), i.src_reg(), i.off, i.imm)
}

/// Runs `f`, turning a panic inside it (aya-obj indexes into ELF data it has not checked in a
/// few places) into an error, without the panic message on stderr.
fn catch_panics<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous);
    result.map_err(|_| HostError::Object {
        what: format!("malformed ELF object: {what} failed"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_targets() {
        assert_eq!(
            section_target("uprobe//usr/bin/victim:target_function").as_deref(),
            Some("/usr/bin/victim:target_function")
        );
        assert_eq!(
            section_target("uprobe/victim:f").as_deref(),
            Some("victim:f")
        );
        assert_eq!(section_target("uprobe"), None);
        assert_eq!(section_target("uprobe/"), None);
        assert_eq!(section_target("tracepoint/syscalls/sys_enter_openat"), None);
    }

    #[test]
    fn bad_uprobe_targets_are_errors() {
        for t in ["", ":", "nofunc", "/nonexistent/bin:f", "/proc/self/exe:"] {
            assert!(resolve_uprobe_target(t).is_err(), "{t}");
        }
        let e = resolve_uprobe_target("/proc/self/exe:no_such_symbol_here").unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
    }

    #[test]
    fn garbage_objects_are_errors_not_panics() {
        let store = Arc::new(
            Store::open(
                &std::env::temp_dir().join(format!("bpftime-wasm-obj-unit-{}", std::process::id())),
            )
            .unwrap(),
        );
        let helpers = Arc::new(bpftime_runtime::helpers::registry());
        for b in [
            &b""[..],
            b"\x7fELF",
            b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0",
            &[0u8; 4096][..],
        ] {
            assert!(BpfObject::load(&store, b, &helpers).is_err());
        }
        let _ = std::fs::remove_file(store.path());
    }
}
