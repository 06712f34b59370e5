//! `bpf(cmd, attr, size)`: copying the attr as the kernel does and the emulated commands.
//!
//! Semantics follow `kernel/bpf/syscall.c` of Linux 6.18: `bpf_check_uarg_tail_zero` for the
//! attr size (`E2BIG` past a page or for a non-zero tail), `CHECK_ATTR` per command (`EINVAL` if
//! any byte after the command's last field is set), fd lookups (`EBADF` for an fd that is not
//! open, `EINVAL` for one that is not a bpf object of the expected kind), map fd permissions
//! (`EPERM`), and the verifier log protocol (`log_level`/`log_size`/`log_buf`, `ENOSPC` when the
//! log did not fit, `log_true_size`).
//!
//! Kernel-backed maps (`bpftime load --kernel-maps`): `BPF_MAP_CREATE` of a data map type makes
//! the map in the kernel ([`bpftime_maps::kernel`]) and hands out the kernel's fd; element,
//! batch and freeze commands on such an fd are passed to the kernel unchanged. Everything
//! that names maps by id (`PROG_LOAD` relocation, `OBJ_GET_INFO_BY_FD`, `GET_NEXT_ID`,
//! `GET_FD_BY_ID`) keeps using store object ids, so kernel-backed and store maps mix.

use crate::Errno;
use crate::emu::{Emulator, FdEntry, Side, map_err, prog_map_ids};
use crate::sys::{self, read_user, read_user_into, write_user};
use crate::uapi::*;
use bpftime_maps::batch::BatchOp;
use bpftime_maps::map::{MapExtra, create_flags_mask};
use bpftime_maps::store::ObjectKind;
use bpftime_maps::{MapDef, MapType};
use bpftime_runtime::object::{
    LinkRecord, PerfEventRecord, PerfKind, ProgRecord, UprobeTarget, create_link, create_prog,
    create_uprobe_multi, perf_prog, read_link, read_perf_event, read_prog,
};
use bpftime_runtime::{LoadError, LoadedProg};
use bpftime_vm::isa::{Insn, insns_from_bytes, insns_to_bytes};
use bpftime_vm::opcode::{
    BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE, BPF_PSEUDO_MAP_VALUE, LDDW,
};
use zerocopy::{FromBytes, IntoBytes};

/// Page size bound of `bpf_check_uarg_tail_zero`.
const PAGE: usize = 4096;
/// `BPF_COMPLEXITY_LIMIT_INSNS`.
const MAX_INSNS: u32 = 1_000_000;

type Attr = [u8; BPF_ATTR_SIZE];

fn e(errno: i32) -> Errno {
    Errno(errno)
}

/// Copies `size` bytes of attr at `uattr` into a zeroed union, as `__sys_bpf` does.
pub(crate) fn copy_attr(uattr: u64, size: u32, known: usize) -> Result<Vec<u8>, Errno> {
    let size = size as usize;
    if size > PAGE {
        return Err(e(libc::E2BIG));
    }
    if size > known {
        let tail = read_user(uattr.wrapping_add(known as u64), size - known)?;
        if tail.iter().any(|&b| b != 0) {
            return Err(e(libc::E2BIG));
        }
    }
    let mut a = vec![0u8; known];
    read_user_into(uattr, &mut a[..size.min(known)])?;
    Ok(a)
}

/// `__bpf_copy_key`: `key_size` bytes at `ukey`; a map without keys (queue, stack, bloom
/// filter) takes a NULL key and refuses any other with `EINVAL`.
fn copy_key(ukey: u64, key_size: u32) -> Result<Vec<u8>, Errno> {
    if key_size == 0 {
        return if ukey == 0 {
            Ok(Vec::new())
        } else {
            Err(e(libc::EINVAL))
        };
    }
    read_user(ukey, key_size as usize)
}

/// `CHECK_ATTR`: every byte after the command's last field must be zero.
fn check_attr(attr: &Attr, last_end: usize) -> Result<(), Errno> {
    if attr[last_end..].iter().any(|&b| b != 0) {
        return Err(e(libc::EINVAL));
    }
    Ok(())
}

fn parse<T: FromBytes>(attr: &Attr) -> T {
    match T::read_from_prefix(&attr[..]) {
        Ok((t, _)) => t,
        Err(_) => unreachable!("every attr struct fits in the union"),
    }
}

/// `bpf_obj_name_cpy`: alphanumerics, `_` and `.`, NUL-terminated within 16 bytes.
fn obj_name(raw: &[u8; BPF_OBJ_NAME_LEN]) -> Result<String, Errno> {
    let Some(n) = raw.iter().position(|&b| b == 0) else {
        return Err(e(libc::EINVAL));
    };
    let name = &raw[..n];
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return Err(e(libc::EINVAL));
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

fn name_bytes(name: &str) -> [u8; BPF_OBJ_NAME_LEN] {
    let mut n = [0u8; BPF_OBJ_NAME_LEN];
    let b = name.as_bytes();
    let l = b.len().min(BPF_OBJ_NAME_LEN - 1);
    n[..l].copy_from_slice(&b[..l]);
    n
}

/// `license_is_gpl_compatible`.
fn gpl_compatible(license: &[u8]) -> bool {
    matches!(
        license,
        b"GPL"
            | b"GPL v2"
            | b"GPL and additional rights"
            | b"Dual BSD/GPL"
            | b"Dual MIT/GPL"
            | b"Dual MPL/GPL"
    )
}

/// A verifier (or BTF) log in the loader's buffer.
struct VLog {
    level: u32,
    size: u32,
    buf: u64,
    text: String,
}

impl VLog {
    fn new(level: u32, size: u32, buf: u64) -> Result<VLog, Errno> {
        // bpf_verifier_log_attr_valid()
        let valid = (buf != 0) == (size != 0)
            && !(buf != 0 && level == 0)
            && level & !BPF_LOG_MASK == 0
            && size <= u32::MAX >> 2;
        if !valid {
            return Err(e(libc::EINVAL));
        }
        Ok(VLog {
            level,
            size,
            buf,
            text: String::new(),
        })
    }

    fn line(&mut self, s: &str) {
        if self.level != 0 {
            self.text.push_str(s);
            if !s.ends_with('\n') {
                self.text.push('\n');
            }
        }
    }

    /// Writes the log out (`bpf_vlog_finalize`): the true size, or `ENOSPC` if it was cut.
    fn finalize(&self) -> (u32, Result<(), Errno>) {
        // Without a buffer nothing is collected (`bpf_verifier_log_needed`).
        if self.level == 0 || self.buf == 0 || self.size == 0 {
            return (0, Ok(()));
        }
        let full = self.text.as_bytes();
        let true_size = full.len() as u32 + 1;
        let cap = self.size as usize;
        let (body, cut) = if full.len() < cap {
            (full, false)
        } else if self.level & BPF_LOG_FIXED != 0 {
            (&full[..cap - 1], true)
        } else {
            (&full[full.len() - (cap - 1)..], true)
        };
        let mut out = body.to_vec();
        out.push(0);
        if write_user(self.buf, &out).is_err() {
            return (true_size, Err(e(libc::EFAULT)));
        }
        (true_size, if cut { Err(e(libc::ENOSPC)) } else { Ok(()) })
    }
}

/// Which perf events accept which program types (`perf_event_set_bpf_prog`).
fn prog_fits_event(kind: PerfKind, prog_type: u32) -> bool {
    match kind {
        PerfKind::Uprobe | PerfKind::Uretprobe => prog_type == BPF_PROG_TYPE_KPROBE,
        PerfKind::Tracepoint => prog_type == BPF_PROG_TYPE_TRACEPOINT,
        PerfKind::SoftwareBpfOutput => prog_type == BPF_PROG_TYPE_PERF_EVENT,
    }
}

impl Emulator {
    /// Emulates `bpf(cmd, attr, size)`; `Ok` is the syscall's non-negative result.
    ///
    /// The arguments are the raw syscall registers: `cmd` is truncated to `int` and `size` to
    /// `unsigned int` as the kernel does.
    pub fn bpf(&self, cmd: i64, uattr: u64, size: u64) -> Result<i64, Errno> {
        let cmd = cmd as i32;
        let size = size as u32;
        let r = self.bpf_inner(cmd, uattr, size);
        match &r {
            Ok(v) => tracing::debug!("bpf({}, size={size}) = {v}", cmd_name(cmd)),
            Err(err) => tracing::debug!("bpf({}, size={size}) = -{err}", cmd_name(cmd)),
        }
        r
    }

    fn bpf_inner(&self, cmd: i32, uattr: u64, size: u32) -> Result<i64, Errno> {
        let v = copy_attr(uattr, size, BPF_ATTR_SIZE)?;
        let mut attr: Attr = [0; BPF_ATTR_SIZE];
        attr.copy_from_slice(&v);
        let attr = &attr;
        if let Some(r) = self.kernel_map_command(cmd, attr, uattr, size) {
            return r;
        }
        match cmd {
            BPF_MAP_CREATE => self.map_create(attr),
            BPF_MAP_LOOKUP_ELEM => self.map_lookup(attr),
            BPF_MAP_UPDATE_ELEM => self.map_update(attr),
            BPF_MAP_DELETE_ELEM => self.map_delete(attr),
            BPF_MAP_GET_NEXT_KEY => self.map_next_key(attr),
            BPF_MAP_LOOKUP_AND_DELETE_ELEM => self.map_lookup_and_delete(attr),
            BPF_MAP_LOOKUP_BATCH => self.map_batch(attr, uattr, BatchOp::Lookup),
            BPF_MAP_LOOKUP_AND_DELETE_BATCH => {
                self.map_batch(attr, uattr, BatchOp::LookupAndDelete)
            }
            BPF_MAP_UPDATE_BATCH => self.map_batch(attr, uattr, BatchOp::Update),
            BPF_MAP_DELETE_BATCH => self.map_batch(attr, uattr, BatchOp::Delete),
            BPF_MAP_FREEZE => self.map_freeze(attr),
            BPF_PROG_LOAD => self.prog_load(attr, uattr, size),
            BPF_BTF_LOAD => self.btf_load(attr, uattr, size),
            BPF_PROG_BIND_MAP => self.prog_bind_map(attr),
            BPF_LINK_CREATE => self.link_create(attr),
            BPF_RAW_TRACEPOINT_OPEN => self.raw_tracepoint_open(&attr[..]),
            BPF_OBJ_GET_INFO_BY_FD
                if crate::kbtf::is_vmlinux_fd(parse::<bpf_attr_info>(attr).bpf_fd as i32) =>
            {
                let a: bpf_attr_info = parse(attr);
                let len = crate::kbtf::info(a.info, a.info_len)?;
                write_user(uattr.wrapping_add(4), &len.to_ne_bytes())?;
                Ok(0)
            }
            BPF_OBJ_GET_INFO_BY_FD => self.obj_get_info(attr, uattr),
            BPF_PROG_GET_NEXT_ID => self.get_next_id(attr, uattr, ObjectKind::Prog),
            BPF_MAP_GET_NEXT_ID => self.get_next_id(attr, uattr, ObjectKind::Map),
            BPF_BTF_GET_NEXT_ID => self
                .get_next_id(attr, uattr, ObjectKind::Btf)
                .or_else(|err| {
                    // After the store's BTF objects, the kernel's (see `kbtf`).
                    if err != e(libc::ENOENT) {
                        return Err(err);
                    }
                    let a: bpf_attr_get_id = parse(attr);
                    let next = crate::kbtf::next_id(a.start_id).ok_or(err)?;
                    write_user(uattr.wrapping_add(4), &next.to_ne_bytes())?;
                    Ok(0)
                }),
            BPF_LINK_GET_NEXT_ID => self.get_next_id(attr, uattr, ObjectKind::Link),
            BPF_PROG_GET_FD_BY_ID => self.get_fd_by_id(attr, ObjectKind::Prog),
            BPF_MAP_GET_FD_BY_ID => self.get_fd_by_id(attr, ObjectKind::Map),
            BPF_BTF_GET_FD_BY_ID
                if parse::<bpf_attr_get_id>(attr).start_id == crate::kbtf::VMLINUX_BTF_ID =>
            {
                crate::kbtf::open_fd()
            }
            BPF_BTF_GET_FD_BY_ID => self.get_fd_by_id(attr, ObjectKind::Btf),
            BPF_LINK_GET_FD_BY_ID => self.get_fd_by_id(attr, ObjectKind::Link),
            _ => {
                tracing::warn!("bpf({} = {cmd}) is not emulated: EINVAL", cmd_name(cmd));
                Err(e(libc::EINVAL))
            }
        }
    }

    /// A map command on a kernel map fd: passed to the kernel as the loader made it. `None`
    /// when `cmd` is not a map command or its fd is not a kernel map's.
    fn kernel_map_command(
        &self,
        cmd: i32,
        attr: &Attr,
        uattr: u64,
        size: u32,
    ) -> Option<Result<i64, Errno>> {
        let fd_off = match cmd {
            BPF_MAP_LOOKUP_ELEM
            | BPF_MAP_UPDATE_ELEM
            | BPF_MAP_DELETE_ELEM
            | BPF_MAP_GET_NEXT_KEY
            | BPF_MAP_LOOKUP_AND_DELETE_ELEM
            | BPF_MAP_FREEZE => 0,
            BPF_MAP_LOOKUP_BATCH
            | BPF_MAP_LOOKUP_AND_DELETE_BATCH
            | BPF_MAP_UPDATE_BATCH
            | BPF_MAP_DELETE_BATCH => 36,
            _ => return None,
        };
        let fd = u32::from_ne_bytes([
            attr[fd_off],
            attr[fd_off + 1],
            attr[fd_off + 2],
            attr[fd_off + 3],
        ]);
        let ent = self
            .entry(i32::try_from(fd).ok()?)
            .filter(|e| e.kernel && e.kind == ObjectKind::Map)?;
        let r = match sys::real_bpf(cmd, uattr, size) {
            Ok(r) => r,
            Err(err) => return Some(Err(err)),
        };
        if cmd == BPF_MAP_FREEZE
            && let Ok(m) = self.open_map(ent.id)
        {
            // Agents that open the map later map an array read-only.
            m.freeze();
        }
        Some(Ok(r))
    }

    /// `BPF_MAP_CREATE` of a map that lives in the kernel (`--kernel-maps`): created with the
    /// real `bpf()`, recorded in the store by its kernel id; the loader gets the kernel fd.
    fn kernel_map_create(
        &self,
        a: &bpf_attr_map_create,
        def: MapDef,
        name: &str,
        side: Side,
    ) -> Result<i64, Errno> {
        let (map, fd) =
            bpftime_maps::Map::create_in_kernel(&self.store, def, a.map_extra, name, a.numa_node)
                .map_err(|err| {
                if err.errno() == libc::EPERM {
                    tracing::warn!(
                        "BPF_MAP_CREATE {name:?} in the kernel (--kernel-maps): EPERM: \
                             kernel maps need CAP_BPF (run as root)"
                    );
                }
                map_err(err)
            })?;
        let id = map.id();
        tracing::debug!(
            "map {id} {name:?} created in the kernel (kernel id {:?})",
            map.kernel_id()
        );
        self.side.lock().insert(id, side);
        let flags = a.map_flags;
        self.install_kernel_map(id, fd, flags & BPF_F_WRONLY == 0, flags & BPF_F_RDONLY == 0)
    }

    fn map_create(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_CREATE_LAST_END)?;
        let a: bpf_attr_map_create = parse(attr);
        let flags = a.map_flags & !BPF_F_TOKEN_FD;
        if flags & BPF_F_RDONLY != 0 && flags & BPF_F_WRONLY != 0
            || flags & BPF_F_RDONLY_PROG != 0 && flags & BPF_F_WRONLY_PROG != 0
        {
            return Err(e(libc::EINVAL));
        }
        if a.map_extra != 0 && a.map_type != MapType::BloomFilter as u32
            || a.excl_prog_hash == 0 && a.excl_prog_hash_size != 0
        {
            return Err(e(libc::EINVAL));
        }
        let allowed = match a.map_type {
            BPF_MAP_TYPE_HASH => {
                BPF_F_NO_PREALLOC
                    | BPF_F_NO_COMMON_LRU
                    | BPF_F_NUMA_NODE
                    | BPF_F_ACCESS_MASK
                    | BPF_F_ZERO_SEED
            }
            BPF_MAP_TYPE_ARRAY => {
                BPF_F_NUMA_NODE
                    | BPF_F_MMAPABLE
                    | BPF_F_ACCESS_MASK
                    | BPF_F_PRESERVE_ELEMS
                    | BPF_F_INNER_MAP
            }
            t if [
                MapType::PercpuHash,
                MapType::PercpuArray,
                MapType::LruHash,
                MapType::LruPercpuHash,
                MapType::Queue,
                MapType::Stack,
                MapType::BloomFilter,
                MapType::LpmTrie,
                MapType::StackTrace,
                MapType::ProgArray,
                MapType::ArrayOfMaps,
                MapType::HashOfMaps,
            ]
            .iter()
            .any(|&m| m as u32 == t) =>
            {
                MapType::try_from(t).map_or(0, create_flags_mask)
            }
            t if t == MapType::RingBuf as u32 || t == MapType::PerfEventArray as u32 => {
                MapType::try_from(t).map_or(0, create_flags_mask)
            }
            t => {
                tracing::warn!("BPF_MAP_CREATE: map type {t} is not emulated: EINVAL");
                return Err(e(libc::EINVAL));
            }
        };
        if flags & !allowed != 0 {
            return Err(e(libc::EINVAL));
        }
        let name = obj_name(&a.map_name)?;
        let mut side = Side {
            uid: sys::euid(),
            ..Side::default()
        };
        if a.btf_key_type_id != 0 || a.btf_value_type_id != 0 || a.btf_vmlinux_value_type_id != 0 {
            side.btf_id = self.get(a.btf_fd, ObjectKind::Btf)?.id;
            side.btf_key_type_id = a.btf_key_type_id;
            side.btf_value_type_id = a.btf_value_type_id;
            side.btf_vmlinux_value_type_id = a.btf_vmlinux_value_type_id;
        }
        let def = MapDef {
            map_type: a.map_type,
            key_size: a.key_size,
            value_size: a.value_size,
            max_entries: a.max_entries,
            flags,
        };
        if self.kernel_maps
            && MapType::try_from(a.map_type).is_ok_and(bpftime_maps::kernel::shareable)
        {
            return self.kernel_map_create(&a, def, &name, side);
        }
        let inner_map_id = if a.map_type == MapType::ArrayOfMaps as u32
            || a.map_type == MapType::HashOfMaps as u32
        {
            // bpf_map_meta_alloc(): inner_map_fd must be a map.
            self.get(a.inner_map_fd, ObjectKind::Map)?.id
        } else {
            0
        };
        let extra = MapExtra {
            map_extra: a.map_extra,
            inner_map_id,
        };
        let map =
            bpftime_maps::Map::create_with(&self.store, def, extra, &name).map_err(map_err)?;
        let id = map.id();
        self.side.lock().insert(id, side);
        let (can_read, can_write) = (flags & BPF_F_WRONLY == 0, flags & BPF_F_RDONLY == 0);
        if a.map_type == MapType::RingBuf as u32 {
            // Its fd must be pollable: a wake-up socket (see `epoll`).
            return self.install_waking(ObjectKind::Map, id, true, can_read, can_write);
        }
        self.install(ObjectKind::Map, id, &name, true, can_read, can_write)
    }

    /// `BPF_MAP_UPDATE_ELEM` of a perf event array (`bpf_fd_array_map_update_elem`): the value
    /// is a perf event fd; the array stores the event's id and holds a reference on it.
    fn perf_array_update(
        &self,
        map: &bpftime_maps::Map,
        key: &[u8],
        val: &[u8],
        flags: u64,
    ) -> Result<i64, Errno> {
        if flags != 0 {
            return Err(e(libc::EINVAL));
        }
        let index = u32::from_ne_bytes(key.try_into().map_err(|_| e(libc::EINVAL))?);
        if index >= map.def().max_entries {
            return Err(e(libc::E2BIG));
        }
        let fd = i32::from_ne_bytes(val.try_into().map_err(|_| e(libc::EINVAL))?);
        // perf_event_get(): anything but a perf event fd is EBADF.
        let ev = self
            .entry(fd)
            .filter(|x| x.kind == ObjectKind::PerfEvent)
            .ok_or(e(libc::EBADF))?;
        if !self.acquire(ev.id) {
            return Err(e(libc::EBADF));
        }
        match bpftime_maps::perf_array::set(map, index, ev.id, flags) {
            Ok(old) => {
                if old != 0 {
                    self.release(old);
                }
                Ok(0)
            }
            Err(err) => {
                self.release(ev.id);
                Err(map_err(err))
            }
        }
    }

    /// The map of `fd` with the kernel's checks, opened.
    fn map_of(&self, fd: u32) -> Result<(FdEntry, bpftime_maps::Map), Errno> {
        let ent = self.get(fd, ObjectKind::Map)?;
        Ok((ent, self.open_map(ent.id)?))
    }

    fn map_lookup(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_ELEM_LAST_END)?;
        let a: bpf_attr_map_elem = parse(attr);
        let (ent, map) = self.map_of(a.map_fd)?;
        if a.flags & !BPF_F_LOCK != 0 || a.flags & BPF_F_LOCK != 0 {
            // BPF_F_LOCK needs a bpf_spin_lock in the value, which needs BTF-typed values.
            return Err(e(libc::EINVAL));
        }
        if !ent.can_read {
            return Err(e(libc::EPERM));
        }
        let key = copy_key(a.key, map.def().key_size)?;
        if map.def().map_type == MapType::BloomFilter as u32 {
            // The value is the input: is it (maybe) in the filter? Nothing is copied back.
            let mut val = read_user(a.value, map.syscall_value_size())?;
            map.lookup(&key, &mut val).map_err(map_err)?;
            return Ok(0);
        }
        let mut val = vec![0u8; map.syscall_value_size()];
        map.lookup(&key, &mut val).map_err(map_err)?;
        write_user(a.value, &val)?;
        Ok(0)
    }

    fn map_update(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_ELEM_LAST_END)?;
        let a: bpf_attr_map_elem = parse(attr);
        let (ent, map) = self.map_of(a.map_fd)?;
        if !ent.can_write || map.is_frozen() {
            return Err(e(libc::EPERM));
        }
        if a.flags & BPF_F_LOCK != 0 {
            return Err(e(libc::EINVAL));
        }
        let key = copy_key(a.key, map.def().key_size)?;
        let val = read_user(a.value, map.syscall_value_size())?;
        self.update_value(&map, &key, &val, a.flags)
    }

    /// `bpf_map_update_value`: one syscall-side update (fds in values become object ids).
    fn update_value(
        &self,
        map: &bpftime_maps::Map,
        key: &[u8],
        val: &[u8],
        flags: u64,
    ) -> Result<i64, Errno> {
        if map.def().map_type == MapType::PerfEventArray as u32 {
            return self.perf_array_update(map, key, val, flags);
        }
        if MapType::try_from(map.def().map_type).is_ok_and(MapType::holds_ids) {
            return self.id_map_update(map, key, val, flags);
        }
        map.update_syscall(key, val, flags).map_err(map_err)?;
        Ok(0)
    }

    fn map_delete(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_DELETE_ELEM_LAST_END)?;
        let a: bpf_attr_map_elem = parse(attr);
        let (ent, map) = self.map_of(a.map_fd)?;
        if !ent.can_write || map.is_frozen() {
            return Err(e(libc::EPERM));
        }
        let key = copy_key(a.key, map.def().key_size)?;
        self.delete_value(&map, key)
    }

    /// `map_delete_elem` of one key, dropping the references an entry held.
    fn delete_value(&self, map: &bpftime_maps::Map, key: Vec<u8>) -> Result<i64, Errno> {
        if MapType::try_from(map.def().map_type).is_ok_and(MapType::holds_ids) {
            // The map's reference on the program / inner map goes with the entry.
            let old = map.delete_id(&key).map_err(map_err)?;
            self.release(old);
            return Ok(0);
        }
        if map.def().map_type == MapType::PerfEventArray as u32 {
            // The array's reference on the perf event goes with the entry.
            let index = u32::from_ne_bytes(key.try_into().map_err(|_| e(libc::EINVAL))?);
            let old = bpftime_maps::perf_array::clear(map, index).map_err(map_err)?;
            self.release(old);
            return Ok(0);
        }
        map.delete(&key).map_err(map_err)?;
        Ok(0)
    }

    /// An update of a program array or map of maps: the value is an fd, stored as the object
    /// id it stands for, and the map takes a reference on it (dropping the one on the object it
    /// replaces), as `bpf_fd_array_map_update_elem` / `bpf_fd_htab_map_update_elem` do.
    pub(crate) fn id_map_update(
        &self,
        map: &bpftime_maps::Map,
        key: &[u8],
        val: &[u8],
        flags: u64,
    ) -> Result<i64, Errno> {
        let ty = MapType::try_from(map.def().map_type).map_err(map_err)?;
        if ty != MapType::HashOfMaps {
            // Flags and index are checked before the fd.
            if flags != 0 {
                return Err(e(libc::EINVAL));
            }
            let index = u32::from_ne_bytes(key.try_into().map_err(|_| e(libc::EINVAL))?);
            if index >= map.def().max_entries {
                return Err(e(libc::E2BIG));
            }
        }
        let fd = u32::from_ne_bytes(val.try_into().map_err(|_| e(libc::EINVAL))?);
        let kind = if ty == MapType::ProgArray {
            ObjectKind::Prog
        } else {
            ObjectKind::Map
        };
        let obj = self.get(fd, kind)?;
        if !self.acquire(obj.id) {
            return Err(e(libc::EBADF));
        }
        match map.update_id(key, obj.id, flags) {
            Ok(old) => {
                if let Some(old) = old {
                    self.release(old);
                }
                Ok(0)
            }
            Err(err) => {
                self.release(obj.id);
                Err(map_err(err))
            }
        }
    }

    /// `bpf_map_do_batch`: permissions, then the type's batch op with the kernel's protocol
    /// for `count` (zeroed before the walk, the number done after) and the cursors.
    fn map_batch(&self, attr: &Attr, uattr: u64, op: BatchOp) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_BATCH_LAST_END)?;
        let a: bpf_attr_map_batch = parse(attr);
        let (ent, map) = self.map_of(a.map_fd)?;
        let has_read = matches!(op, BatchOp::Lookup | BatchOp::LookupAndDelete);
        let has_write = op != BatchOp::Lookup;
        if has_read && !ent.can_read || has_write && (!ent.can_write || map.is_frozen()) {
            return Err(e(libc::EPERM));
        }
        map.batch_precheck(op, a.elem_flags, a.flags)
            .map_err(map_err)?;
        if a.count == 0 {
            return Ok(0);
        }
        let count_addr = uattr.wrapping_add(BPF_MAP_BATCH_COUNT_OFF as u64);
        write_user(count_addr, &0u32.to_ne_bytes())?;
        let ks = map.def().key_size as usize;
        let vs = map.syscall_value_size();
        if has_read {
            let cursor = if a.in_batch != 0 {
                Some(read_user(a.in_batch, map.batch_cursor_len())?)
            } else {
                None
            };
            let out = map
                .lookup_batch(
                    cursor.as_deref(),
                    a.count,
                    a.elem_flags,
                    a.flags,
                    op == BatchOp::LookupAndDelete,
                )
                .map_err(map_err)?;
            write_user(a.keys, &out.keys)?;
            write_user(a.values, &out.values)?;
            if let Some(c) = &out.out_batch {
                write_user(a.out_batch, c)?;
            }
            write_user(count_addr, &out.count.to_ne_bytes())?;
            return match out.err {
                Some(err) => Err(map_err(err)),
                None => Ok(0),
            };
        }
        let (done, err) = map
            .apply_batch(op, a.count, a.elem_flags, |i| {
                let i = u64::from(i);
                let key = read_user(a.keys.wrapping_add(i * ks as u64), ks)?;
                if op == BatchOp::Delete {
                    return self.delete_value(&map, key).map(drop);
                }
                let val = read_user(a.values.wrapping_add(i * vs as u64), vs)?;
                self.update_value(&map, &key, &val, a.elem_flags).map(drop)
            })
            .map_err(map_err)?;
        write_user(count_addr, &done.to_ne_bytes())?;
        match err {
            Some(err) => Err(err),
            None => Ok(0),
        }
    }

    fn map_lookup_and_delete(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_ELEM_LAST_END)?;
        let a: bpf_attr_map_elem = parse(attr);
        if a.flags & !BPF_F_LOCK != 0 {
            return Err(e(libc::EINVAL));
        }
        let (ent, map) = self.map_of(a.map_fd)?;
        if !ent.can_read || !ent.can_write || map.is_frozen() {
            return Err(e(libc::EPERM));
        }
        let ty = MapType::try_from(map.def().map_type).map_err(map_err)?;
        if a.flags != 0 && matches!(ty, MapType::Queue | MapType::Stack) {
            return Err(e(libc::EINVAL));
        }
        if a.flags & BPF_F_LOCK != 0 {
            // BPF_F_LOCK needs a bpf_spin_lock in the value, which needs BTF-typed values.
            return Err(e(libc::EINVAL));
        }
        let key = copy_key(a.key, map.def().key_size)?;
        let mut val = vec![0u8; map.syscall_value_size()];
        map.lookup_and_delete(&key, &mut val).map_err(map_err)?;
        write_user(a.value, &val)?;
        Ok(0)
    }

    fn map_next_key(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_GET_NEXT_KEY_LAST_END)?;
        let a: bpf_attr_map_elem = parse(attr);
        let (ent, map) = self.map_of(a.map_fd)?;
        if !ent.can_read {
            return Err(e(libc::EPERM));
        }
        let ks = map.def().key_size as usize;
        let key = if a.key != 0 {
            Some(copy_key(a.key, map.def().key_size)?)
        } else {
            None
        };
        let mut next = vec![0u8; ks];
        map.next_key(key.as_deref(), &mut next).map_err(map_err)?;
        write_user(a.value, &next)?;
        Ok(0)
    }

    fn map_freeze(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_MAP_FREEZE_LAST_END)?;
        let a: bpf_attr_map_elem = parse(attr);
        let (ent, map) = self.map_of(a.map_fd)?;
        if !ent.can_write {
            return Err(e(libc::EPERM));
        }
        let writable_mapping = self
            .mmaps
            .lock()
            .iter()
            .any(|m| m.map_id == ent.id && m.writable && m.pid == crate::emu::pid());
        if writable_mapping || map.is_frozen() {
            return Err(e(libc::EBUSY));
        }
        map.freeze();
        Ok(0)
    }

    /// A map fd in an instruction: its id, or the kernel's error with its log line.
    fn map_fd_to_id(&self, fd: i32, log: &mut VLog) -> Result<u32, Errno> {
        match self.entry(fd) {
            Some(ent) if ent.kind == ObjectKind::Map => Ok(ent.id),
            _ => {
                log.line(&format!("fd {fd} is not pointing to valid bpf_map"));
                Err(e(if sys::fd_is_open(fd) {
                    libc::EINVAL
                } else {
                    libc::EBADF
                }))
            }
        }
    }

    /// Rewrites map references from fds (or `fd_array` indexes) to object ids
    /// (`resolve_pseudo_ldimm64`).
    fn relocate(&self, insns: &mut [Insn], fd_array: u64, log: &mut VLog) -> Result<(), Errno> {
        let mut pc = 0;
        while pc < insns.len() {
            if insns[pc].code != LDDW || pc + 1 >= insns.len() {
                pc += 1;
                continue;
            }
            let src = insns[pc].src;
            let fd = match src {
                BPF_PSEUDO_MAP_FD | BPF_PSEUDO_MAP_VALUE => insns[pc].imm,
                BPF_PSEUDO_MAP_IDX | BPF_PSEUDO_MAP_IDX_VALUE => {
                    if fd_array == 0 {
                        log.line("fd_idx without fd_array is invalid");
                        return Err(e(libc::EPROTO));
                    }
                    let idx = insns[pc].imm as u32 as u64;
                    let mut b = [0u8; 4];
                    read_user_into(fd_array.wrapping_add(idx * 4), &mut b)?;
                    i32::from_ne_bytes(b)
                }
                _ => {
                    pc += 2;
                    continue;
                }
            };
            let id = self.map_fd_to_id(fd, log)?;
            insns[pc].imm = id as i32;
            insns[pc].src = match src {
                BPF_PSEUDO_MAP_FD | BPF_PSEUDO_MAP_IDX => BPF_PSEUDO_MAP_FD,
                _ => BPF_PSEUDO_MAP_VALUE,
            };
            pc += 2;
        }
        Ok(())
    }

    fn prog_load(&self, attr: &Attr, uattr: u64, size: u32) -> Result<i64, Errno> {
        check_attr(attr, BPF_PROG_LOAD_LAST_END)?;
        let a: bpf_attr_prog_load = parse(attr);
        if a.prog_type == BPF_PROG_TYPE_UNSPEC || a.prog_type >= __MAX_BPF_PROG_TYPE {
            tracing::warn!(
                "BPF_PROG_LOAD: program type {} is unknown: EINVAL",
                a.prog_type
            );
            return Err(e(libc::EINVAL));
        }
        let known_flags = BPF_F_STRICT_ALIGNMENT
            | BPF_F_ANY_ALIGNMENT
            | BPF_F_TEST_RND_HI32
            | BPF_F_TEST_STATE_FREQ
            | BPF_F_SLEEPABLE
            | BPF_F_XDP_HAS_FRAGS
            | BPF_F_XDP_DEV_BOUND_ONLY
            | BPF_F_TEST_REG_INVARIANTS
            | BPF_F_TOKEN_FD;
        if a.prog_flags & !known_flags != 0 {
            return Err(e(libc::EINVAL));
        }
        if a.insn_cnt == 0 || a.insn_cnt > MAX_INSNS {
            return Err(e(libc::E2BIG));
        }
        if a.prog_ifindex != 0 {
            tracing::warn!("BPF_PROG_LOAD: device offload is not emulated: EINVAL");
            return Err(e(libc::EINVAL));
        }
        // strncpy_from_user(license, attr->license, 127): a fault is EFAULT, a longer string
        // is cut.
        let license = read_cstr_trunc(a.license, 127)?;
        let name = obj_name(&a.prog_name)?;
        let bytes = read_user(a.insns, a.insn_cnt as usize * Insn::SIZE)?;
        let mut insns = insns_from_bytes(&bytes).map_err(|_| e(libc::EINVAL))?;
        let mut log = VLog::new(a.log_level, a.log_size, a.log_buf)?;

        let checked = self.check_prog(&a, &name, &mut insns, &mut log);
        let (true_size, wrote) = log.finalize();
        if size as usize >= PROG_LOAD_LOG_TRUE_SIZE_OFF + 4 {
            write_user(
                uattr.wrapping_add(PROG_LOAD_LOG_TRUE_SIZE_OFF as u64),
                &true_size.to_ne_bytes(),
            )?;
        }
        // bpf_vlog_finalize(): a log that did not fit (or could not be written) overrides the
        // verdict, even an accepted program's.
        wrote?;
        let (map_ids, btf_id) = checked?;

        // The program holds a reference on each map it uses.
        for (i, &m) in map_ids.iter().enumerate() {
            if !self.acquire(m) {
                // The map went away since the check (another thread closed its last fd).
                for &held in &map_ids[..i] {
                    self.release(held);
                }
                return Err(e(libc::EBADF));
            }
        }
        let id = match create_prog(
            &self.store,
            &ProgRecord {
                prog_type: a.prog_type,
                expected_attach_type: a.expected_attach_type,
                name: name.clone(),
                insns,
            },
        ) {
            Ok(id) => id,
            Err(err) => {
                for &held in &map_ids {
                    self.release(held);
                }
                return Err(e(err.errno()));
            }
        };
        self.side.lock().insert(
            id,
            Side {
                btf_id,
                load_time: sys::boottime_ns(),
                uid: sys::euid(),
                gpl: gpl_compatible(&license),
                ..Side::default()
            },
        );
        self.install(ObjectKind::Prog, id, &name, true, true, true)
    }

    /// Relocates and checks a program; the map ids it uses and its BTF id.
    fn check_prog(
        &self,
        a: &bpf_attr_prog_load,
        name: &str,
        insns: &mut [Insn],
        log: &mut VLog,
    ) -> Result<(Vec<u32>, u32), Errno> {
        self.relocate(insns, a.fd_array, log)?;
        let btf_id = if a.func_info_cnt != 0 || a.line_info_cnt != 0 || a.prog_btf_fd != 0 {
            match self.get(a.prog_btf_fd, ObjectKind::Btf) {
                Ok(b) => b.id,
                Err(err) if a.func_info_cnt != 0 || a.line_info_cnt != 0 => return Err(err),
                Err(_) => 0,
            }
        } else {
            0
        };
        match LoadedProg::from_insns(
            &self.store,
            0,
            name.to_owned(),
            insns.to_vec(),
            self.helpers.clone(),
        ) {
            Ok(p) => {
                if log.level & (BPF_LOG_LEVEL1 | BPF_LOG_LEVEL2 | BPF_LOG_STATS) != 0 {
                    log.line(&format!(
                        "processed {} insns (limit {MAX_INSNS}) max_states_per_insn 0 \
                         total_states 0 peak_states 0 mark_read 0",
                        insns.len()
                    ));
                }
                Ok((p.map_ids(), btf_id))
            }
            Err(LoadError::Verify(v)) => {
                tracing::debug!("BPF_PROG_LOAD {name:?} rejected: {v}");
                log.line(&v.log());
                Err(e(libc::EINVAL))
            }
            Err(LoadError::Reloc { pc, what }) => {
                tracing::debug!("BPF_PROG_LOAD {name:?} rejected at {pc}: {what}");
                log.line(&format!("{pc}: {what}"));
                Err(e(libc::EINVAL))
            }
            Err(err @ LoadError::Jit(_)) => {
                log.line(&err.to_string());
                Err(e(libc::EINVAL))
            }
            Err(LoadError::Runtime(err)) => Err(e(err.errno())),
        }
    }

    fn btf_load(&self, attr: &Attr, uattr: u64, size: u32) -> Result<i64, Errno> {
        check_attr(attr, BPF_BTF_LOAD_LAST_END)?;
        let a: bpf_attr_btf_load = parse(attr);
        if a.btf_flags & !BPF_F_TOKEN_FD != 0 {
            return Err(e(libc::EINVAL));
        }
        let mut log = VLog::new(a.btf_log_level, a.btf_log_size, a.btf_log_buf)?;
        if a.btf_size > BTF_MAX_SIZE {
            return Err(e(libc::E2BIG));
        }
        let blob = read_user(a.btf, a.btf_size as usize)?;
        let checked = check_btf(&blob, &mut log);
        let (true_size, wrote) = log.finalize();
        if size as usize >= BTF_LOAD_LOG_TRUE_SIZE_OFF + 4 {
            write_user(
                uattr.wrapping_add(BTF_LOAD_LOG_TRUE_SIZE_OFF as u64),
                &true_size.to_ne_bytes(),
            )?;
        }
        wrote?;
        checked?;
        let (id, off) = self
            .store
            .create(ObjectKind::Btf, "btf", blob.len() as u64)
            .map_err(|err| e(err.errno()))?;
        if self.store.segment().write(off, &blob).is_none() {
            self.store.publish(id);
            self.release(id);
            return Err(e(libc::EFAULT));
        }
        self.store.publish(id);
        self.install(ObjectKind::Btf, id, "btf", true, true, true)
    }

    fn prog_bind_map(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_PROG_BIND_MAP_LAST_END)?;
        let a: bpf_attr_prog_bind_map = parse(attr);
        if a.flags != 0 {
            return Err(e(libc::EINVAL));
        }
        let prog = self.get(a.prog_fd, ObjectKind::Prog)?;
        let map = self.get(a.map_fd, ObjectKind::Map)?;
        let used = read_prog(&self.store, prog.id)
            .map(|p| prog_map_ids(&p.insns))
            .map_err(|err| e(err.errno()))?;
        let mut side = self.side.lock();
        let s = side.entry(prog.id).or_default();
        if used.contains(&map.id) || s.bound_maps.contains(&map.id) {
            return Ok(0);
        }
        if !self.acquire(map.id) {
            return Err(e(libc::EBADF));
        }
        s.bound_maps.push(map.id);
        Ok(0)
    }

    /// Whether a program is attached to perf event `id` (by `SET_BPF` or a live link).
    pub(crate) fn perf_has_prog(&self, id: u32) -> bool {
        if perf_prog(&self.store, id).is_some() {
            return true;
        }
        self.store.live_ids().into_iter().any(|l| {
            self.store
                .object(l)
                .is_some_and(|o| o.kind == ObjectKind::Link)
                && read_link(&self.store, l).is_ok_and(|r| r.perf_event_id == id)
        })
    }

    /// Whether a program of `prog_type` may be attached to perf event `perf_id`
    /// (`perf_event_set_bpf_prog`: matching type, no program yet).
    pub(crate) fn check_perf_attach(&self, perf_id: u32, prog_type: u32) -> Result<(), Errno> {
        let ev = read_perf_event(&self.store, perf_id).map_err(|err| e(err.errno()))?;
        if !prog_fits_event(ev.kind, prog_type) {
            return Err(e(libc::EINVAL));
        }
        if self.perf_has_prog(perf_id) {
            return Err(e(libc::EEXIST));
        }
        Ok(())
    }

    fn link_create(&self, attr: &Attr) -> Result<i64, Errno> {
        check_attr(attr, BPF_LINK_CREATE_LAST_END)?;
        let a: bpf_attr_link_create = parse(attr);
        let prog = self.get(a.prog_fd, ObjectKind::Prog)?;
        let rec = read_prog(&self.store, prog.id).map_err(|err| e(err.errno()))?;
        match a.attach_type {
            BPF_PERF_EVENT => {
                if !matches!(
                    rec.prog_type,
                    BPF_PROG_TYPE_KPROBE | BPF_PROG_TYPE_TRACEPOINT | BPF_PROG_TYPE_PERF_EVENT
                ) || rec.prog_type == BPF_PROG_TYPE_KPROBE
                    && rec.expected_attach_type == BPF_TRACE_KPROBE_MULTI
                {
                    return Err(e(libc::EINVAL));
                }
                if a.flags != 0 {
                    return Err(e(libc::EINVAL));
                }
                // perf_event_get(): anything but a perf event fd is EBADF.
                let perf = i32::try_from(a.target_fd)
                    .ok()
                    .and_then(|fd| self.entry(fd))
                    .filter(|x| x.kind == ObjectKind::PerfEvent)
                    .ok_or(e(libc::EBADF))?;
                self.check_perf_attach(perf.id, rec.prog_type)?;
                let id = create_link(
                    &self.store,
                    &LinkRecord {
                        prog_id: prog.id,
                        perf_event_id: perf.id,
                        attach_type: BPF_PERF_EVENT,
                        cookie: a.bpf_cookie,
                    },
                )
                .map_err(|err| e(err.errno()))?;
                // The link holds its program and its perf event.
                let held_prog = self.acquire(prog.id);
                let held_perf = self.acquire(perf.id);
                if !held_prog || !held_perf {
                    if held_prog {
                        self.release(prog.id);
                    }
                    if held_perf {
                        self.release(perf.id);
                    }
                    // Nothing is held yet: drop the bare link record.
                    self.store.release(id);
                    return Err(e(libc::EBADF));
                }
                self.install(ObjectKind::Link, id, "perf_event", true, true, true)
            }
            BPF_TRACE_UPROBE_MULTI => self.uprobe_multi_link(&a, prog.id, &rec),
            BPF_TRACE_KPROBE_MULTI => {
                if rec.prog_type != BPF_PROG_TYPE_KPROBE
                    || rec.expected_attach_type != BPF_TRACE_KPROBE_MULTI
                {
                    return Err(e(libc::EINVAL));
                }
                // This kernel has no kprobes: kprobe_multi_link_attach() is EOPNOTSUPP.
                Err(e(libc::EOPNOTSUPP))
            }
            t => {
                tracing::warn!("BPF_LINK_CREATE: attach type {t} is not emulated: EINVAL");
                Err(e(libc::EINVAL))
            }
        }
    }

    /// `bpf_uprobe_multi_link_attach()` (kernel 6.6+): `link_create.uprobe_multi` = path,
    /// offsets, ref_ctr_offsets, cookies (user pointers), cnt, flags
    /// (`BPF_F_UPROBE_MULTI_RETURN`), pid. One hidden perf event holds every target; the link
    /// holds it and the program, so closing the link fd removes them all.
    fn uprobe_multi_link(
        &self,
        a: &bpf_attr_link_create,
        prog_id: u32,
        rec: &ProgRecord,
    ) -> Result<i64, Errno> {
        const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;
        const MAX_UPROBE_MULTI_CNT: u32 = 1 << 20;
        if rec.prog_type != BPF_PROG_TYPE_KPROBE
            || rec.expected_attach_type != BPF_TRACE_UPROBE_MULTI
        {
            return Err(e(libc::EINVAL));
        }
        let upath = a.bpf_cookie;
        let (uoffsets, uref_ctrs, ucookies) = (a._rest[0], a._rest[1], a._rest[2]);
        let (cnt, flags) = (a._rest[3] as u32, (a._rest[3] >> 32) as u32);
        let pid = a._rest[4] as u32 as i32;
        if flags & !BPF_F_UPROBE_MULTI_RETURN != 0 {
            return Err(e(libc::EINVAL));
        }
        if upath == 0 || uoffsets == 0 || cnt == 0 || pid < 0 {
            return Err(e(libc::EINVAL));
        }
        if cnt > MAX_UPROBE_MULTI_CNT {
            return Err(e(libc::E2BIG));
        }
        let raw = sys::read_user_cstr(upath, PAGE - 1)?;
        let raw = String::from_utf8(raw).map_err(|_| e(libc::EINVAL))?;
        let path = std::fs::canonicalize(&raw)
            .map_err(|err| e(err.raw_os_error().unwrap_or(libc::ENOENT)))?;
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            return Err(e(libc::EBADF));
        }
        let path = path
            .into_os_string()
            .into_string()
            .map_err(|_| e(libc::EINVAL))?;
        if pid != 0 && !sys::pid_exists(pid) {
            return Err(e(libc::ESRCH));
        }
        let read_u64s = |ptr: u64| -> Result<Vec<u64>, Errno> {
            if ptr == 0 {
                return Ok(vec![0; cnt as usize]);
            }
            let bytes = read_user(ptr, cnt as usize * 8)?;
            Ok(bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
                .collect())
        };
        let (offsets, ref_ctrs, cookies) = (
            read_u64s(uoffsets)?,
            read_u64s(uref_ctrs)?,
            read_u64s(ucookies)?,
        );
        let targets: Vec<UprobeTarget> = (0..cnt as usize)
            .map(|i| UprobeTarget {
                offset: offsets[i],
                ref_ctr_offset: ref_ctrs[i],
                cookie: cookies[i],
            })
            .collect();
        let kind = if flags & BPF_F_UPROBE_MULTI_RETURN != 0 {
            PerfKind::Uretprobe
        } else {
            PerfKind::Uprobe
        };
        let ev = PerfEventRecord {
            kind,
            pid: if pid == 0 { -1 } else { pid },
            cpu: -1,
            offset: 0,
            ref_ctr_offset: 0,
            path,
        };
        let perf = create_uprobe_multi(&self.store, &ev, &targets).map_err(|err| e(err.errno()))?;
        let id = match create_link(
            &self.store,
            &LinkRecord {
                prog_id,
                perf_event_id: perf,
                attach_type: BPF_TRACE_UPROBE_MULTI,
                cookie: 0,
            },
        ) {
            Ok(id) => id,
            Err(err) => {
                self.store.release(perf);
                return Err(e(err.errno()));
            }
        };
        // The link holds its program and (with the creation reference) the perf event.
        if !self.acquire(prog_id) {
            self.store.release(id);
            self.store.release(perf);
            return Err(e(libc::EBADF));
        }
        tracing::debug!(
            "uprobe_multi link {id}: {cnt} target(s) in {:?}, pid {pid}, return={}",
            ev.path,
            kind == PerfKind::Uretprobe
        );
        self.install(ObjectKind::Link, id, "uprobe_multi", true, true, true)
    }

    fn obj_get_info(&self, attr: &Attr, uattr: u64) -> Result<i64, Errno> {
        check_attr(attr, BPF_OBJ_GET_INFO_BY_FD_LAST_END)?;
        let a: bpf_attr_info = parse(attr);
        let ent = self.get_any(a.bpf_fd)?;
        let len = match ent.kind {
            ObjectKind::Map => self.map_info(&ent, a.info, a.info_len)?,
            ObjectKind::Prog => self.prog_info(&ent, a.info, a.info_len)?,
            ObjectKind::Btf => self.btf_info(&ent, a.info, a.info_len)?,
            ObjectKind::Link => self.link_info(&ent, a.info, a.info_len)?,
            _ => return Err(e(libc::EINVAL)),
        };
        write_user(uattr.wrapping_add(4), &len.to_ne_bytes())?;
        Ok(0)
    }

    fn map_info(&self, ent: &FdEntry, uinfo: u64, info_len: u32) -> Result<u32, Errno> {
        let (_, len) = read_info::<bpf_map_info>(uinfo, info_len)?;
        let map = self.open_map(ent.id)?;
        let d = map.def();
        let name = self
            .store
            .object(ent.id)
            .map(|o| o.name)
            .unwrap_or_default();
        let side = self.side.lock().get(&ent.id).cloned().unwrap_or_default();
        let info = bpf_map_info {
            type_: d.map_type,
            id: ent.id,
            key_size: d.key_size,
            value_size: d.value_size,
            max_entries: d.max_entries,
            map_flags: d.flags,
            name: name_bytes(&name),
            btf_vmlinux_value_type_id: side.btf_vmlinux_value_type_id,
            btf_id: side.btf_id,
            btf_key_type_id: side.btf_key_type_id,
            btf_value_type_id: side.btf_value_type_id,
            map_extra: map.map_extra(),
            ..bpf_map_info::default()
        };
        write_user(uinfo, &info.as_bytes()[..len as usize])?;
        Ok(len)
    }

    fn prog_info(&self, ent: &FdEntry, uinfo: u64, info_len: u32) -> Result<u32, Errno> {
        let (mut info, len) = read_info::<bpf_prog_info>(uinfo, info_len)?;
        let rec = read_prog(&self.store, ent.id).map_err(|err| e(err.errno()))?;
        let side = self.side.lock().get(&ent.id).cloned().unwrap_or_default();
        let mut maps = prog_map_ids(&rec.insns);
        for m in side.bound_maps.iter() {
            if !maps.contains(m) {
                maps.push(*m);
            }
        }
        let xlated = insns_to_bytes(&rec.insns);
        info.type_ = rec.prog_type;
        info.id = ent.id;
        info.tag = [0; BPF_TAG_SIZE];
        info.load_time = side.load_time;
        info.created_by_uid = side.uid;
        info.gpl_compatible = u32::from(side.gpl);
        info.name = name_bytes(&rec.name);
        info.ifindex = 0;
        info.netns_dev = 0;
        info.netns_ino = 0;
        info.btf_id = side.btf_id;
        info.verified_insns = rec.insns.len() as u32;
        info.run_time_ns = 0;
        info.run_cnt = 0;
        info.recursion_misses = 0;
        // Map ids: report the count, copy as many as the caller made room for.
        let room = info.nr_map_ids.min(maps.len() as u32) as usize;
        info.nr_map_ids = maps.len() as u32;
        if room > 0 {
            let ids: Vec<u8> = maps[..room].iter().flat_map(|m| m.to_ne_bytes()).collect();
            write_user(info.map_ids, &ids)?;
        }
        // Translated instructions (map references as map ids, as the kernel dumps them).
        let want = info.xlated_prog_len as usize;
        info.xlated_prog_len = xlated.len() as u32;
        if want > 0 && info.xlated_prog_insns != 0 {
            write_user(info.xlated_prog_insns, &xlated[..want.min(xlated.len())])?;
        }
        // No JIT image, no func/line info, no ksyms kept.
        info.jited_prog_len = 0;
        info.nr_jited_ksyms = 0;
        info.nr_jited_func_lens = 0;
        info.nr_func_info = 0;
        info.nr_line_info = 0;
        info.nr_jited_line_info = 0;
        info.nr_prog_tags = 0;
        write_user(uinfo, &info.as_bytes()[..len as usize])?;
        Ok(len)
    }

    fn btf_info(&self, ent: &FdEntry, uinfo: u64, info_len: u32) -> Result<u32, Errno> {
        let (mut info, len) = read_info::<bpf_btf_info>(uinfo, info_len)?;
        let obj = self.store.object(ent.id).ok_or(e(libc::EBADF))?;
        let size = obj.payload_len as usize;
        let copy = (info.btf_size as usize).min(size);
        if copy > 0 {
            let mut blob = vec![0u8; copy];
            self.store
                .segment()
                .read(obj.payload_off, &mut blob)
                .ok_or(e(libc::EFAULT))?;
            write_user(info.btf, &blob)?;
        }
        info.btf_size = size as u32;
        info.id = ent.id;
        info.kernel_btf = 0;
        if (info.name == 0) != (info.name_len == 0) {
            return Err(e(libc::EINVAL));
        }
        if info.name != 0 {
            // User BTF has an empty name.
            write_user(info.name, &[0])?;
        }
        info.name_len = 0;
        write_user(uinfo, &info.as_bytes()[..len as usize])?;
        Ok(len)
    }

    fn link_info(&self, ent: &FdEntry, uinfo: u64, info_len: u32) -> Result<u32, Errno> {
        let (mut info, len) = read_info::<bpf_link_info>(uinfo, info_len)?;
        let l = read_link(&self.store, ent.id).map_err(|err| e(err.errno()))?;
        info.type_ = BPF_LINK_TYPE_PERF_EVENT;
        info.id = ent.id;
        info.prog_id = l.prog_id;
        if let Ok(ev) = read_perf_event(&self.store, l.perf_event_id) {
            let (ty, uprobe) = match ev.kind {
                PerfKind::Uprobe => (BPF_PERF_EVENT_UPROBE, true),
                PerfKind::Uretprobe => (BPF_PERF_EVENT_URETPROBE, true),
                _ => (0, false),
            };
            info.perf_event_type = ty;
            if uprobe {
                // bpf_perf_link_fill_uprobe(): copy the path if a buffer was given.
                let ubuf = info.file_name;
                let ulen = info.name_len as usize;
                if (ubuf == 0) != (ulen == 0) {
                    return Err(e(libc::EINVAL));
                }
                let mut path = ev.path.into_bytes();
                info.name_len = path.len() as u32 + 1;
                if ubuf != 0 {
                    path.push(0);
                    let cut = path.len() > ulen;
                    path.truncate(ulen);
                    if let Some(last) = path.last_mut()
                        && cut
                    {
                        *last = 0;
                    }
                    write_user(ubuf, &path)?;
                }
                info.offset = ev.offset as u32;
                info.cookie = l.cookie;
                info.ref_ctr_offset = ev.ref_ctr_offset;
            }
        }
        write_user(uinfo, &info.as_bytes()[..len as usize])?;
        Ok(len)
    }

    fn get_next_id(&self, attr: &Attr, uattr: u64, kind: ObjectKind) -> Result<i64, Errno> {
        check_attr(attr, BPF_GET_NEXT_ID_LAST_END)?;
        let a: bpf_attr_get_id = parse(attr);
        let next = self
            .store
            .live_ids()
            .into_iter()
            .filter(|&id| id > a.start_id)
            .find(|&id| self.store.object(id).is_some_and(|o| o.kind == kind))
            .ok_or(e(libc::ENOENT))?;
        write_user(uattr.wrapping_add(4), &next.to_ne_bytes())?;
        Ok(0)
    }

    fn get_fd_by_id(&self, attr: &Attr, kind: ObjectKind) -> Result<i64, Errno> {
        check_attr(attr, BPF_GET_FD_BY_ID_LAST_END)?;
        let a: bpf_attr_get_id = parse(attr);
        let flags = a.open_flags & !BPF_F_TOKEN_FD;
        let (can_read, can_write) = match kind {
            ObjectKind::Map => {
                if flags & !(BPF_F_RDONLY | BPF_F_WRONLY) != 0
                    || flags & BPF_F_RDONLY != 0 && flags & BPF_F_WRONLY != 0
                {
                    return Err(e(libc::EINVAL));
                }
                (flags & BPF_F_WRONLY == 0, flags & BPF_F_RDONLY == 0)
            }
            _ if flags != 0 => return Err(e(libc::EINVAL)),
            _ => (true, true),
        };
        let obj = self
            .store
            .object(a.start_id)
            .filter(|o| o.kind == kind)
            .ok_or(e(libc::ENOENT))?;
        if !self.acquire(obj.id) {
            return Err(e(libc::ENOENT));
        }
        let mut ringbuf = false;
        if kind == ObjectKind::Map
            && let Some(kid) = self.open_map(obj.id).ok().and_then(|m| m.kernel_id())
        {
            // A kernel-backed map: the kernel's own fd, with the kernel's permission checks.
            return match bpftime_maps::kernel::get_fd_by_id(kid, flags) {
                Ok(fd) => self.install_kernel_map(obj.id, fd, can_read, can_write),
                Err(err) => {
                    self.release(obj.id);
                    Err(map_err(err))
                }
            };
        }
        let (can_read, can_write) = if kind == ObjectKind::Map {
            let m = self.open_map(obj.id);
            let mf = m.as_ref().map(|m| m.def().flags).unwrap_or(0);
            ringbuf = m.is_ok_and(|m| m.def().map_type == MapType::RingBuf as u32);
            (
                can_read && mf & BPF_F_WRONLY == 0,
                can_write && mf & BPF_F_RDONLY == 0,
            )
        } else {
            (can_read, can_write)
        };
        if ringbuf {
            return self.install_waking(kind, obj.id, true, can_read, can_write);
        }
        self.install(kind, obj.id, &obj.name, true, can_read, can_write)
    }
}

/// The caller's info struct for `OBJ_GET_INFO_BY_FD` (its input fields) and the length the
/// kernel will copy back: `min(info_len, sizeof)`, after `bpf_check_uarg_tail_zero`.
fn read_info<T: FromBytes + IntoBytes + Default>(
    uinfo: u64,
    info_len: u32,
) -> Result<(T, u32), Errno> {
    let known = size_of::<T>();
    let v = copy_attr(uinfo, info_len, known)?;
    let len = (info_len as usize).min(known) as u32;
    let t = T::read_from_bytes(&v).map_err(|_| e(libc::EINVAL))?;
    Ok((t, len))
}

/// `strncpy_from_user(dst, src, max)`: up to `max` bytes, a fault anywhere before the NUL is
/// `EFAULT`.
fn read_cstr_trunc(addr: u64, max: usize) -> Result<Vec<u8>, Errno> {
    match sys::read_user_cstr(addr, max) {
        Ok(s) => Ok(s),
        Err(Errno(libc::ENAMETOOLONG)) => read_user(addr, max),
        Err(err) => Err(err),
    }
}

/// The checks `btf_parse_hdr` makes before the type section (magic, version, flags, header).
fn check_btf(blob: &[u8], log: &mut VLog) -> Result<(), Errno> {
    if blob.len() < 24 {
        log.line(&format!("btf_size {} is too small", blob.len()));
        return Err(e(libc::EINVAL));
    }
    let magic = u16::from_le_bytes([blob[0], blob[1]]);
    if magic != BTF_MAGIC {
        log.line("Invalid magic");
        return Err(e(libc::EINVAL));
    }
    if blob[2] != 1 {
        log.line("Unsupported version");
        return Err(e(ENOTSUPP));
    }
    if blob[3] != 0 {
        log.line("Unsupported flags");
        return Err(e(ENOTSUPP));
    }
    Ok(())
}
