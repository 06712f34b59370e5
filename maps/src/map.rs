//! Map definitions, errors with kernel errnos, and the per-process [`Map`] handle.
//!
//! A map lives in the store as an object of kind [`ObjectKind::Map`]: its payload is a
//! 128-byte metadata record ([`meta`] offsets below), its data a separate allocation. A
//! process opens a map by id and gets a [`Map`]: a copy of the definition, validated once,
//! plus the data geometry. Nothing read from the store is trusted without a bounds check.
//!
//! Semantics follow the kernel (`kernel/bpf/arraymap.c`, `kernel/bpf/hashtab.c`,
//! `kernel/bpf/syscall.c`): update flags `BPF_ANY`/`BPF_NOEXIST`/`BPF_EXIST`, `ENOENT` for a
//! missing key, `EEXIST` for `BPF_NOEXIST` on a present key, `E2BIG` when full or for an array
//! index past the end, `EINVAL` for bad flags or definitions, `EPERM` for syscall-side writes to
//! a frozen map.

use crate::array;
use crate::hash;
use crate::store::{ObjectKind, Store, StoreError};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// `BPF_ANY`: create or update.
pub const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only.
pub const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: update only.
pub const BPF_EXIST: u64 = 2;
/// `BPF_F_LOCK`: take the value's spin lock (accepted only where the kernel accepts it).
pub const BPF_F_LOCK: u64 = 4;

/// `BPF_F_NO_PREALLOC`.
pub const BPF_F_NO_PREALLOC: u32 = 1 << 0;
/// `BPF_F_RDONLY`.
pub const BPF_F_RDONLY: u32 = 1 << 3;
/// `BPF_F_WRONLY`.
pub const BPF_F_WRONLY: u32 = 1 << 4;
/// `BPF_F_ZERO_SEED`.
pub const BPF_F_ZERO_SEED: u32 = 1 << 6;
/// `BPF_F_RDONLY_PROG`.
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;
/// `BPF_F_WRONLY_PROG`.
pub const BPF_F_WRONLY_PROG: u32 = 1 << 8;
/// `BPF_F_MMAPABLE`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Largest key the kernel accepts for hash maps (`MAX_BPF_STACK`).
pub const MAX_KEY_SIZE: u32 = 512;
/// Largest value (`KMALLOC_MAX_SIZE` is larger; the kernel's practical limit for hash values).
pub const MAX_VALUE_SIZE: u32 = 1 << 20;

/// Map types, with the kernel's numbering (`enum bpf_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapType {
    /// `BPF_MAP_TYPE_HASH`
    #[doc(alias = "BPF_MAP_TYPE_HASH")]
    Hash = 1,
    /// `BPF_MAP_TYPE_ARRAY`
    #[doc(alias = "BPF_MAP_TYPE_ARRAY")]
    Array = 2,
}

impl TryFrom<u32> for MapType {
    type Error = MapError;
    fn try_from(v: u32) -> Result<Self, MapError> {
        match v {
            1 => Ok(MapType::Hash),
            2 => Ok(MapType::Array),
            other => Err(MapError::Unsupported { map_type: other }),
        }
    }
}

/// What `BPF_MAP_CREATE` specifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// `enum bpf_map_type` value.
    pub map_type: u32,
    /// Key bytes.
    pub key_size: u32,
    /// Value bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` flags.
    pub flags: u32,
}

/// A map operation's failure; [`MapError::errno`] gives the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// No such key.
    #[error("key not found")]
    NotFound,
    /// `BPF_NOEXIST` and the key exists.
    #[error("key already exists")]
    Exists,
    /// The map is full, or an array index is past the end.
    #[error("map is full or index is out of range")]
    TooBig,
    /// Bad flags for the operation.
    #[error("invalid flags {flags:#x}")]
    InvalidFlags {
        /// The flags.
        flags: u64,
    },
    /// Key buffer of the wrong size.
    #[error("invalid key size {size}, expected {expected}")]
    InvalidKeySize {
        /// Given.
        size: usize,
        /// Expected.
        expected: usize,
    },
    /// Value buffer of the wrong size.
    #[error("invalid value size {size}, expected {expected}")]
    InvalidValueSize {
        /// Given.
        size: usize,
        /// Expected.
        expected: usize,
    },
    /// A definition the kernel would refuse.
    #[error("invalid map definition: {what}")]
    BadDefinition {
        /// Why.
        what: &'static str,
    },
    /// The operation does not apply to this map type (e.g. delete on an array).
    #[error("operation not supported by this map type")]
    InvalidOp,
    /// Syscall-side write to a frozen map.
    #[error("map is frozen")]
    Frozen,
    /// A map type this runtime does not implement.
    #[error("map type {map_type} is not supported")]
    Unsupported {
        /// The type number.
        map_type: u32,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MapError {
    /// The kernel's errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            MapError::NotFound => libc::ENOENT,
            MapError::Exists => libc::EEXIST,
            MapError::TooBig => libc::E2BIG,
            MapError::InvalidFlags { .. }
            | MapError::InvalidKeySize { .. }
            | MapError::InvalidValueSize { .. }
            | MapError::BadDefinition { .. }
            | MapError::InvalidOp
            | MapError::Unsupported { .. } => libc::EINVAL,
            MapError::Frozen => libc::EPERM,
            MapError::Store(e) => e.errno(),
        }
    }
}

/// Offsets in the 128-byte metadata record.
pub(crate) mod meta {
    pub const LEN: u64 = 128;
    pub const MAP_TYPE: u64 = 0;
    pub const KEY_SIZE: u64 = 4;
    pub const VALUE_SIZE: u64 = 8;
    pub const MAX_ENTRIES: u64 = 12;
    pub const FLAGS: u64 = 16;
    pub const FROZEN: u64 = 20;
    pub const DATA_OFF: u64 = 24;
    pub const DATA_LEN: u64 = 32;
    pub const SEED: u64 = 40;
    pub const FREELIST: u64 = 64;
}

/// `x` rounded up to a multiple of 8.
pub(crate) fn round8(x: u32) -> u64 {
    u64::from(x).div_ceil(8) * 8
}

/// An open map in this process.
#[derive(Debug, Clone)]
pub struct Map {
    pub(crate) store: Arc<Store>,
    pub(crate) id: u32,
    pub(crate) def: MapDef,
    pub(crate) meta_off: u64,
    pub(crate) data_off: u64,
    pub(crate) data_len: u64,
    pub(crate) seed: u64,
}

impl Map {
    /// Creates a map in `store` and publishes it. Checks the definition as `BPF_MAP_CREATE`
    /// does.
    pub fn create(store: &Arc<Store>, def: MapDef, name: &str) -> Result<Map, MapError> {
        let ty = MapType::try_from(def.map_type)?;
        if def.key_size == 0 && ty == MapType::Hash || def.value_size == 0 || def.max_entries == 0 {
            return Err(MapError::BadDefinition {
                what: "key_size, value_size and max_entries must be non-zero",
            });
        }
        let data_len = match ty {
            MapType::Array => array::check_def(&def)?,
            MapType::Hash => hash::check_def(&def)?,
        };
        let (id, meta_off) = store.create(ObjectKind::Map, name, meta::LEN)?;
        let data_off = match store.alloc(data_len) {
            Ok(o) => o,
            Err(e) => {
                store.publish(id);
                store.release(id);
                return Err(e.into());
            }
        };
        let seg = store.segment();
        let w32 = |f: u64, v: u32| {
            seg.atomic_u32(meta_off + f)
                .map(|a| a.store(v, Ordering::Relaxed))
        };
        let w64 = |f: u64, v: u64| {
            seg.atomic_u64(meta_off + f)
                .map(|a| a.store(v, Ordering::Relaxed))
        };
        let seed = if def.flags & BPF_F_ZERO_SEED != 0 {
            0
        } else {
            random_seed()
        };
        w32(meta::MAP_TYPE, def.map_type);
        w32(meta::KEY_SIZE, def.key_size);
        w32(meta::VALUE_SIZE, def.value_size);
        w32(meta::MAX_ENTRIES, def.max_entries);
        w32(meta::FLAGS, def.flags);
        w64(meta::DATA_OFF, data_off);
        w64(meta::DATA_LEN, data_len);
        w64(meta::SEED, seed);
        let map = Map {
            store: store.clone(),
            id,
            def,
            meta_off,
            data_off,
            data_len,
            seed,
        };
        if ty == MapType::Hash {
            hash::init(&map)?;
        }
        store.publish(id);
        Ok(map)
    }

    /// Opens map `id`, validating its metadata.
    pub fn open(store: &Arc<Store>, id: u32) -> Result<Map, MapError> {
        let info = store.object(id).ok_or(MapError::NotFound)?;
        if info.kind != ObjectKind::Map || info.payload_len < meta::LEN {
            return Err(MapError::NotFound);
        }
        let seg = store.segment();
        let m = info.payload_off;
        let bad = || StoreError::Corrupt {
            what: "map metadata",
        };
        let r32 = |f: u64| {
            seg.atomic_u32(m + f)
                .map(|a| a.load(Ordering::Relaxed))
                .ok_or_else(bad)
        };
        let r64 = |f: u64| {
            seg.atomic_u64(m + f)
                .map(|a| a.load(Ordering::Relaxed))
                .ok_or_else(bad)
        };
        let def = MapDef {
            map_type: r32(meta::MAP_TYPE)?,
            key_size: r32(meta::KEY_SIZE)?,
            value_size: r32(meta::VALUE_SIZE)?,
            max_entries: r32(meta::MAX_ENTRIES)?,
            flags: r32(meta::FLAGS)?,
        };
        let ty = MapType::try_from(def.map_type)?;
        let expect = match ty {
            MapType::Array => array::check_def(&def),
            MapType::Hash => hash::check_def(&def),
        }
        .map_err(|_| bad())?;
        let data_off = r64(meta::DATA_OFF)?;
        let data_len = r64(meta::DATA_LEN)?;
        if data_len != expect || seg.range(data_off, data_len as usize).is_none() {
            return Err(bad().into());
        }
        Ok(Map {
            store: store.clone(),
            id,
            def,
            meta_off: m,
            data_off,
            data_len,
            seed: r64(meta::SEED)?,
        })
    }

    /// Object id.
    pub fn id(&self) -> u32 {
        self.id
    }
    /// The definition.
    pub fn def(&self) -> &MapDef {
        &self.def
    }
    /// The store the map lives in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
    /// Offset of the map's data in the store (page-aligned for mmap-able arrays).
    pub fn data_offset(&self) -> u64 {
        self.data_off
    }
    /// Bytes of data.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    fn ty(&self) -> MapType {
        MapType::try_from(self.def.map_type).expect("validated at open")
    }

    /// Whether syscall-side writes are refused (`BPF_MAP_FREEZE`).
    pub fn is_frozen(&self) -> bool {
        self.store
            .segment()
            .atomic_u32(self.meta_off + meta::FROZEN)
            .is_some_and(|a| a.load(Ordering::Acquire) != 0)
    }

    /// `BPF_MAP_FREEZE`.
    pub fn freeze(&self) {
        if let Some(a) = self
            .store
            .segment()
            .atomic_u32(self.meta_off + meta::FROZEN)
        {
            a.store(1, Ordering::Release);
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), MapError> {
        if key.len() != self.def.key_size as usize {
            return Err(MapError::InvalidKeySize {
                size: key.len(),
                expected: self.def.key_size as usize,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), MapError> {
        if value.len() != self.def.value_size as usize {
            return Err(MapError::InvalidValueSize {
                size: value.len(),
                expected: self.def.value_size as usize,
            });
        }
        Ok(())
    }

    /// The store offset of `key`'s value, if present (for programs: `bpf_map_lookup_elem`).
    pub fn lookup_offset(&self, key: &[u8]) -> Result<u64, MapError> {
        self.check_key(key)?;
        match self.ty() {
            MapType::Array => array::lookup(self, key),
            MapType::Hash => hash::lookup(self, key),
        }
    }

    /// The address of `key`'s value in this process, if present.
    pub fn lookup_ptr(&self, key: &[u8]) -> Result<*mut u8, MapError> {
        let off = self.lookup_offset(key)?;
        self.store
            .segment()
            .range(off, self.def.value_size as usize)
            .ok_or(MapError::Store(StoreError::Corrupt { what: "value" }))
    }

    /// `BPF_MAP_LOOKUP_ELEM`: copies the value into `out`.
    pub fn lookup(&self, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
        self.check_value(out)?;
        let off = self.lookup_offset(key)?;
        self.store
            .segment()
            .read(off, out)
            .ok_or(MapError::Store(StoreError::Corrupt { what: "value" }))
    }

    /// `BPF_MAP_UPDATE_ELEM` from a program (frozen maps stay writable to programs unless
    /// `BPF_F_RDONLY_PROG`, which the loader enforces).
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        self.check_key(key)?;
        self.check_value(value)?;
        match self.ty() {
            MapType::Array => array::update(self, key, value, flags),
            MapType::Hash => hash::update(self, key, value, flags),
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` through the syscall: refused on a frozen map.
    pub fn update_syscall(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        if self.is_frozen() {
            return Err(MapError::Frozen);
        }
        self.update(key, value, flags)
    }

    /// `BPF_MAP_DELETE_ELEM`.
    pub fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        self.check_key(key)?;
        match self.ty() {
            MapType::Array => Err(MapError::InvalidOp),
            MapType::Hash => hash::delete(self, key),
        }
    }

    /// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first key when `key` is `None` or
    /// absent); `ENOENT` after the last.
    pub fn next_key(&self, key: Option<&[u8]>, out: &mut [u8]) -> Result<(), MapError> {
        if let Some(k) = key {
            self.check_key(k)?;
        }
        if out.len() != self.def.key_size as usize {
            return Err(MapError::InvalidKeySize {
                size: out.len(),
                expected: self.def.key_size as usize,
            });
        }
        match self.ty() {
            MapType::Array => array::next_key(self, key, out),
            MapType::Hash => hash::next_key(self, key, out),
        }
    }
}

/// Removes every object whose creator has exited (a loader killed before it could close its
/// fds), as the kernel does when a process dies, freeing map data too. Returns how many objects
/// were removed. Agents already ignore such objects; this returns their memory.
pub fn reclaim_dead_owners(store: &Arc<Store>) -> usize {
    let mut n = 0;
    for id in store.live_ids() {
        if store.owner_alive(id) {
            continue;
        }
        let data = Map::open(store, id)
            .ok()
            .map(|m| (m.data_offset(), m.data_len()));
        if store.force_release(id).is_some() {
            n += 1;
            if let Some((off, len)) = data {
                store.free(off, len);
            }
        }
    }
    n
}

/// Validates update flags as the kernel does for hash and array maps.
pub(crate) fn check_update_flags(flags: u64) -> Result<u64, MapError> {
    let op = flags & !BPF_F_LOCK;
    if op > BPF_EXIST || flags & BPF_F_LOCK != 0 {
        // BPF_F_LOCK needs a bpf_spin_lock in the value (BTF); we have no BTF-typed values yet.
        return Err(MapError::InvalidFlags { flags });
    }
    Ok(op)
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = (t ^ u64::from(std::process::id())).to_le_bytes();
    }
    u64::from_le_bytes(b)
}
