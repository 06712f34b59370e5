//! The state behind a guest's `wasm_bpf` calls: its objects (by handle), map fds, buffers
//! being polled and WASI hooks. Plain Rust, independent of the Wasm engine: [`crate::api`]
//! checks guest memory and calls in here.

use crate::buffer::Buffer;
use crate::error::{HostError, Result};
use crate::object::{BpfObject, SectionKind};
use crate::wasi::WasiHooks;
use bpftime_maps::wake::WakeSocket;
use bpftime_maps::{Map, MapType, Store};
use bpftime_runtime::{Engine, LoadedProg};
use bpftime_vm::helper::HelperRegistry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `wasm_bpf_map_operate` commands (the kernel's `enum bpf_cmd` numbers).
pub const BPF_MAP_LOOKUP_ELEM: i32 = 1;
/// Update.
pub const BPF_MAP_UPDATE_ELEM: i32 = 2;
/// Delete.
pub const BPF_MAP_DELETE_ELEM: i32 = 3;
/// Next key.
pub const BPF_MAP_GET_NEXT_KEY: i32 = 4;

/// First map fd handed out (0–2 look like stdio to C guests).
const FIRST_FD: i32 = 3;
/// Most objects one guest may hold at once.
pub const MAX_OBJECTS: usize = 64;

/// Counters for the status line and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Records delivered to guest callbacks.
    pub delivered: u64,
    /// Host calls made.
    pub calls: u64,
}

/// One guest's BPF state.
#[derive(Debug)]
pub struct BpfHost {
    store: Arc<Store>,
    helpers: Arc<HelperRegistry>,
    engine: Engine,
    objects: BTreeMap<u64, BpfObject>,
    next_handle: u64,
    /// fd → (object handle, map id).
    fds: BTreeMap<i32, (u64, u32)>,
    next_fd: i32,
    buffers: BTreeMap<i32, Buffer>,
    /// fds whose buffer is being delivered right now (a callback polling it again is `EBUSY`).
    polling: Vec<i32>,
    sock: Option<WakeSocket>,
    /// Programs on WASI calls.
    pub wasi: WasiHooks,
    /// Set by SIGINT/SIGTERM: waits end and the guest is stopped.
    pub interrupted: Arc<AtomicBool>,
    /// Counters.
    pub stats: Stats,
}

impl BpfHost {
    /// A host over `store`.
    pub fn new(store: Arc<Store>) -> BpfHost {
        BpfHost {
            store,
            helpers: Arc::new(bpftime_runtime::helpers::registry()),
            engine: Engine::from_env(),
            objects: BTreeMap::new(),
            next_handle: 1,
            fds: BTreeMap::new(),
            next_fd: FIRST_FD,
            buffers: BTreeMap::new(),
            polling: Vec::new(),
            sock: None,
            wasi: WasiHooks::default(),
            interrupted: Arc::new(AtomicBool::new(false)),
            stats: Stats::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether a signal asked the run to stop.
    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// `wasm_load_bpf_object`: a new handle (never 0).
    pub fn load(&mut self, bytes: &[u8]) -> Result<u64> {
        if self.objects.len() >= MAX_OBJECTS {
            return Err(HostError::invalid(format!(
                "more than {MAX_OBJECTS} objects open"
            )));
        }
        let obj = BpfObject::load(&self.store, bytes, &self.helpers)?;
        let h = self.next_handle;
        self.next_handle += 1;
        tracing::info!(
            "object {h}: {} maps, programs {:?}",
            obj.maps.len(),
            obj.progs
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
        );
        self.objects.insert(h, obj);
        Ok(h)
    }

    fn object(&mut self, h: u64) -> Result<&mut BpfObject> {
        self.objects.get_mut(&h).ok_or_else(|| HostError::NotFound {
            what: "object handle",
            name: h.to_string(),
        })
    }

    /// `wasm_attach_bpf_program`.
    pub fn attach(&mut self, h: u64, prog: &str, target: Option<&str>) -> Result<()> {
        let obj = self.object(h)?;
        let p = obj.prog(prog).ok_or_else(|| HostError::NotFound {
            what: "program",
            name: prog.into(),
        })?;
        let section_target = crate::object::section_target(&p.section);
        let target = target.map(str::to_owned).or(section_target);
        match (p.kind, target.as_deref()) {
            (SectionKind::Uprobe | SectionKind::Uretprobe, Some(t))
                if WasiHooks::is_wasi_target(t) =>
            {
                if p.kind != SectionKind::Uprobe || !crate::wasi::TARGETS.contains(&t) {
                    return Err(HostError::NotSupported {
                        what: format!(
                            "WASI attach target `{t}` (supported: {})",
                            crate::wasi::TARGETS.join(", ")
                        ),
                    });
                }
                let id = p.id;
                let loaded = LoadedProg::load(&self.store, id, self.helpers.clone())
                    .and_then(|l| l.with_engine(self.engine))
                    .map_err(|source| HostError::Program {
                        name: prog.into(),
                        source,
                    })?;
                self.wasi.attach(h, t, loaded);
                tracing::info!("attached `{prog}` to {t}");
                Ok(())
            }
            (SectionKind::Uprobe | SectionKind::Uretprobe, t) => {
                obj.attach_uprobe(prog, t).map(drop)
            }
            (SectionKind::Tracepoint | SectionKind::RawTracepoint, t) => {
                obj.attach_tracepoint(prog, t).map(drop)
            }
            (SectionKind::Kprobe, _) => Err(HostError::NotSupported {
                what: format!("kprobe program `{prog}`: there are no kernel probes in userspace"),
            }),
            (SectionKind::Other, _) => Err(HostError::NotSupported {
                what: format!("program `{prog}` of section `{}`", p.section),
            }),
        }
    }

    /// `wasm_bpf_map_fd_by_name`: the same fd for the same map every time.
    pub fn map_fd_by_name(&mut self, h: u64, name: &str) -> Result<i32> {
        let id = self
            .object(h)?
            .map(name)
            .map(Map::id)
            .ok_or_else(|| HostError::NotFound {
                what: "map",
                name: name.into(),
            })?;
        if let Some((&fd, _)) = self.fds.iter().find(|(_, v)| **v == (h, id)) {
            return Ok(fd);
        }
        let fd = self.next_fd;
        self.next_fd = self
            .next_fd
            .checked_add(1)
            .ok_or_else(|| HostError::invalid("out of map fds"))?;
        self.fds.insert(fd, (h, id));
        Ok(fd)
    }

    /// The map behind `fd`.
    pub fn map_of_fd(&self, fd: i32) -> Result<&Map> {
        let &(h, id) = self.fds.get(&fd).ok_or(HostError::BadFd { fd })?;
        self.objects
            .get(&h)
            .and_then(|o| o.maps.iter().find(|m| m.map.id() == id))
            .map(|m| &m.map)
            .ok_or(HostError::BadFd { fd })
    }

    /// `wasm_bpf_map_operate` on host memory: `key`/`value`/`next_key` are the guest's
    /// buffers, already bounds-checked by the caller to the sizes [`BpfHost::op_sizes`] gave.
    pub fn map_operate(
        &self,
        fd: i32,
        cmd: i32,
        key: Option<&[u8]>,
        value: Option<&mut [u8]>,
        next_key: Option<&mut [u8]>,
        flags: u64,
    ) -> Result<()> {
        let map = self.map_of_fd(fd)?;
        let ty = MapType::try_from(map.def().map_type)?;
        let writes_ids = ty.holds_ids() || ty == MapType::PerfEventArray;
        match cmd {
            BPF_MAP_LOOKUP_ELEM => {
                if flags != 0 {
                    return Err(HostError::invalid("lookup flags"));
                }
                map.lookup(
                    key.unwrap_or(&[]),
                    value.ok_or(HostError::Fault { what: "value" })?,
                )?;
            }
            BPF_MAP_UPDATE_ELEM => {
                if writes_ids {
                    return Err(HostError::NotSupported {
                        what: format!("updating a {} map from a guest", ty.name()),
                    });
                }
                let v = value.ok_or(HostError::Fault { what: "value" })?;
                map.update_syscall(key.unwrap_or(&[]), v, flags)?;
            }
            BPF_MAP_DELETE_ELEM => {
                if writes_ids {
                    return Err(HostError::NotSupported {
                        what: format!("deleting from a {} map from a guest", ty.name()),
                    });
                }
                map.delete(key.unwrap_or(&[]))?;
            }
            BPF_MAP_GET_NEXT_KEY => {
                map.next_key(key, next_key.ok_or(HostError::Fault { what: "next_key" })?)?;
            }
            _ => return Err(HostError::invalid(format!("map command {cmd}"))),
        }
        Ok(())
    }

    /// Sizes of the key and value buffers `cmd` on `fd` uses: (key, value).
    pub fn op_sizes(&self, fd: i32) -> Result<(usize, usize)> {
        let map = self.map_of_fd(fd)?;
        Ok((map.def().key_size as usize, map.syscall_value_size()))
    }

    /// `wasm_close_bpf_object`: detaches and removes everything of object `h`.
    pub fn close(&mut self, h: u64) -> Result<()> {
        let obj = self.objects.remove(&h).ok_or_else(|| HostError::NotFound {
            what: "object handle",
            name: h.to_string(),
        })?;
        self.wasi.detach_object(h);
        let fds: Vec<i32> = self
            .fds
            .iter()
            .filter(|(_, (o, _))| *o == h)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in fds {
            self.fds.remove(&fd);
            self.buffers.remove(&fd);
        }
        drop(obj);
        Ok(())
    }

    /// Takes (opening it on first use) the buffer behind `fd` of object `h`, so the caller can
    /// deliver records while calling back into the guest; give it back with
    /// [`BpfHost::put_buffer`].
    pub fn take_buffer(&mut self, h: u64, fd: i32) -> Result<Buffer> {
        let &(owner, id) = self.fds.get(&fd).ok_or(HostError::BadFd { fd })?;
        if owner != h {
            self.object(h)?;
            return Err(HostError::BadFd { fd });
        }
        if self.polling.contains(&fd) {
            return Err(HostError::Busy { fd });
        }
        if let Some(b) = self.buffers.remove(&fd) {
            self.polling.push(fd);
            return Ok(b);
        }
        let obj = self.object(h)?;
        let map = obj
            .maps
            .iter()
            .find(|m| m.map.id() == id)
            .map(|m| m.map.clone())
            .ok_or(HostError::BadFd { fd })?;
        let b = Buffer::open(obj, map)?;
        self.polling.push(fd);
        Ok(b)
    }

    /// Returns a buffer taken with [`BpfHost::take_buffer`] (dropped if its object was
    /// closed meanwhile, e.g. by the guest's callback).
    pub fn put_buffer(&mut self, fd: i32, b: Buffer) {
        self.polling.retain(|&f| f != fd);
        if self.fds.contains_key(&fd) {
            self.buffers.insert(fd, b);
        }
    }

    /// The socket producers wake this host with.
    pub fn wake_socket(&mut self) -> Result<&WakeSocket> {
        if self.sock.is_none() {
            self.sock = Some(WakeSocket::new().map_err(|e| HostError::Invalid {
                what: format!("wake-up socket: {e}"),
            })?);
        }
        self.sock
            .as_ref()
            .ok_or_else(|| HostError::invalid("wake-up socket"))
    }

    /// The socket made by [`BpfHost::wake_socket`].
    pub fn wake_socket_ref(&self) -> Result<&WakeSocket> {
        self.sock
            .as_ref()
            .ok_or_else(|| HostError::invalid("no wake-up socket yet"))
    }

    /// Probes attached, and target processes whose agents run them.
    pub fn probe_counts(&self) -> (usize, usize) {
        self.objects.values().fold((0, 0), |(p, t), o| {
            (p + o.attached.len(), t + o.attached_processes())
        })
    }

    /// Object handles open.
    pub fn handles(&self) -> Vec<u64> {
        self.objects.keys().copied().collect()
    }

    /// Closes every object (at the end of a run).
    pub fn close_all(&mut self) {
        for h in self.handles() {
            let _ = self.close(h);
        }
    }
}

impl Drop for BpfHost {
    fn drop(&mut self) {
        self.close_all();
    }
}
