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
use crate::bloom;
use crate::hash;
use crate::kernel;
use crate::lpm;
use crate::of_maps;
use crate::percpu;
use crate::perf_array;
use crate::prog_array;
use crate::queue_stack;
use crate::ringbuf;
use crate::stack_trace;
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
/// `BPF_F_NO_COMMON_LRU`.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `BPF_F_NUMA_NODE`.
pub const BPF_F_NUMA_NODE: u32 = 1 << 2;
/// `BPF_F_STACK_BUILD_ID`.
pub const BPF_F_STACK_BUILD_ID: u32 = 1 << 5;
/// `BPF_F_PRESERVE_ELEMS`.
pub const BPF_F_PRESERVE_ELEMS: u32 = 1 << 11;
/// `BPF_F_INNER_MAP`.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_ACCESS_MASK`.
pub const BPF_F_ACCESS_MASK: u32 =
    BPF_F_RDONLY | BPF_F_RDONLY_PROG | BPF_F_WRONLY | BPF_F_WRONLY_PROG;

/// The `BPF_MAP_CREATE` flags the kernel accepts for `ty` (its per-type
/// `*_CREATE_FLAG_MASK`, `kernel/bpf/{hashtab,arraymap,…}.c`).
pub fn create_flags_mask(ty: MapType) -> u32 {
    const HTAB: u32 = BPF_F_NO_PREALLOC
        | BPF_F_NO_COMMON_LRU
        | BPF_F_NUMA_NODE
        | BPF_F_ACCESS_MASK
        | BPF_F_ZERO_SEED;
    const ARRAY: u32 = BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK;
    match ty {
        MapType::Hash
        | MapType::PercpuHash
        | MapType::LruHash
        | MapType::LruPercpuHash
        | MapType::HashOfMaps => HTAB,
        // fd_array_map_alloc_check(): no BPF_F_RDONLY_PROG/WRONLY_PROG.
        MapType::ProgArray | MapType::ArrayOfMaps => BPF_F_NUMA_NODE | BPF_F_RDONLY | BPF_F_WRONLY,
        MapType::Array => ARRAY | BPF_F_MMAPABLE | BPF_F_INNER_MAP,
        MapType::PercpuArray => ARRAY,
        MapType::Queue | MapType::Stack => BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK,
        MapType::BloomFilter => BPF_F_NUMA_NODE | BPF_F_ZERO_SEED | BPF_F_ACCESS_MASK,
        MapType::LpmTrie => BPF_F_NO_PREALLOC | BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK,
        MapType::StackTrace => BPF_F_NUMA_NODE | BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_STACK_BUILD_ID,
        // fd_array_map_alloc_check(): no BPF_F_{RDONLY,WRONLY}_PROG.
        MapType::PerfEventArray => {
            BPF_F_NUMA_NODE | BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_PRESERVE_ELEMS
        }
        MapType::RingBuf => BPF_F_NUMA_NODE,
    }
}

/// Checks `flags` of a new map of type `ty` as `map_alloc_check` does: unknown flags, both
/// `BPF_F_RDONLY` and `BPF_F_WRONLY`, or both `BPF_F_RDONLY_PROG` and `BPF_F_WRONLY_PROG` are
/// `EINVAL`.
pub fn check_create_flags(ty: MapType, flags: u32) -> Result<(), MapError> {
    let both = |a: u32, b: u32| flags & a != 0 && flags & b != 0;
    if flags & !create_flags_mask(ty) != 0
        || both(BPF_F_RDONLY, BPF_F_WRONLY)
        || both(BPF_F_RDONLY_PROG, BPF_F_WRONLY_PROG)
    {
        return Err(MapError::InvalidFlags {
            flags: u64::from(flags),
        });
    }
    let v = hash::Variant::of(ty as u32);
    if flags & BPF_F_NO_COMMON_LRU != 0 && !v.lru {
        return Err(MapError::InvalidFlags {
            flags: u64::from(flags),
        });
    }
    if v.lru && flags & BPF_F_NO_PREALLOC != 0 {
        // htab_map_alloc_check(): LRU maps are always preallocated.
        return Err(MapError::KernelNotSupported);
    }
    Ok(())
}

/// Largest key a program builds on its stack (`MAX_BPF_STACK`); helpers copy keys up to this
/// size without allocating. Maps may have larger keys (Linux 6.18 dropped that limit).
pub const MAX_KEY_SIZE: u32 = 512;
/// `KMALLOC_MAX_SIZE` on x86_64: the kernel's bound on one allocation, which bounds a hash
/// element (`key_size + value_size`) and a queue, stack or bloom filter value.
pub const KMALLOC_MAX_SIZE: u64 = 4 << 20;

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
    /// `BPF_MAP_TYPE_PROG_ARRAY`
    #[doc(alias = "BPF_MAP_TYPE_PROG_ARRAY")]
    ProgArray = 3,
    /// `BPF_MAP_TYPE_PERCPU_HASH`
    #[doc(alias = "BPF_MAP_TYPE_PERCPU_HASH")]
    PercpuHash = 5,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`
    #[doc(alias = "BPF_MAP_TYPE_PERCPU_ARRAY")]
    PercpuArray = 6,
    /// `BPF_MAP_TYPE_STACK_TRACE`
    #[doc(alias = "BPF_MAP_TYPE_STACK_TRACE")]
    StackTrace = 7,
    /// `BPF_MAP_TYPE_LRU_HASH`
    #[doc(alias = "BPF_MAP_TYPE_LRU_HASH")]
    LruHash = 9,
    /// `BPF_MAP_TYPE_LRU_PERCPU_HASH`
    #[doc(alias = "BPF_MAP_TYPE_LRU_PERCPU_HASH")]
    LruPercpuHash = 10,
    /// `BPF_MAP_TYPE_LPM_TRIE`
    #[doc(alias = "BPF_MAP_TYPE_LPM_TRIE")]
    LpmTrie = 11,
    /// `BPF_MAP_TYPE_ARRAY_OF_MAPS`
    #[doc(alias = "BPF_MAP_TYPE_ARRAY_OF_MAPS")]
    ArrayOfMaps = 12,
    /// `BPF_MAP_TYPE_HASH_OF_MAPS`
    #[doc(alias = "BPF_MAP_TYPE_HASH_OF_MAPS")]
    HashOfMaps = 13,
    /// `BPF_MAP_TYPE_QUEUE`
    #[doc(alias = "BPF_MAP_TYPE_QUEUE")]
    Queue = 22,
    /// `BPF_MAP_TYPE_STACK`
    #[doc(alias = "BPF_MAP_TYPE_STACK")]
    Stack = 23,
    /// `BPF_MAP_TYPE_BLOOM_FILTER`
    #[doc(alias = "BPF_MAP_TYPE_BLOOM_FILTER")]
    BloomFilter = 30,
    /// `BPF_MAP_TYPE_PERF_EVENT_ARRAY`
    #[doc(alias = "BPF_MAP_TYPE_PERF_EVENT_ARRAY")]
    PerfEventArray = 4,
    /// `BPF_MAP_TYPE_RINGBUF`
    #[doc(alias = "BPF_MAP_TYPE_RINGBUF")]
    RingBuf = 27,
}

impl MapType {
    /// The kernel's name without the prefix, lowercase (`bpftool`'s spelling).
    pub fn name(self) -> &'static str {
        match self {
            MapType::Hash => "hash",
            MapType::Array => "array",
            MapType::PercpuHash => "percpu_hash",
            MapType::PercpuArray => "percpu_array",
            MapType::StackTrace => "stack_trace",
            MapType::LruHash => "lru_hash",
            MapType::LruPercpuHash => "lru_percpu_hash",
            MapType::LpmTrie => "lpm_trie",
            MapType::ProgArray => "prog_array",
            MapType::ArrayOfMaps => "array_of_maps",
            MapType::HashOfMaps => "hash_of_maps",
            MapType::Queue => "queue",
            MapType::Stack => "stack",
            MapType::BloomFilter => "bloom_filter",
            MapType::PerfEventArray => "perf_event_array",
            MapType::RingBuf => "ringbuf",
        }
    }

    /// Whether values are per CPU (the syscall side sees one per possible CPU).
    pub fn is_percpu(self) -> bool {
        matches!(
            self,
            MapType::PercpuHash | MapType::PercpuArray | MapType::LruPercpuHash
        )
    }

    /// Whether this is one of the hash table types sharing [`crate::hash`].
    pub fn is_hash(self) -> bool {
        matches!(
            self,
            MapType::Hash
                | MapType::PercpuHash
                | MapType::LruHash
                | MapType::LruPercpuHash
                | MapType::HashOfMaps
        )
    }

    /// Whether values are object ids given as fds on the syscall side (program arrays and
    /// maps of maps): see [`Map::update_id`].
    pub fn holds_ids(self) -> bool {
        matches!(
            self,
            MapType::ProgArray | MapType::ArrayOfMaps | MapType::HashOfMaps
        )
    }
}

impl TryFrom<u32> for MapType {
    type Error = MapError;
    fn try_from(v: u32) -> Result<Self, MapError> {
        match v {
            1 => Ok(MapType::Hash),
            2 => Ok(MapType::Array),
            5 => Ok(MapType::PercpuHash),
            6 => Ok(MapType::PercpuArray),
            7 => Ok(MapType::StackTrace),
            9 => Ok(MapType::LruHash),
            10 => Ok(MapType::LruPercpuHash),
            11 => Ok(MapType::LpmTrie),
            3 => Ok(MapType::ProgArray),
            12 => Ok(MapType::ArrayOfMaps),
            13 => Ok(MapType::HashOfMaps),
            22 => Ok(MapType::Queue),
            23 => Ok(MapType::Stack),
            30 => Ok(MapType::BloomFilter),
            4 => Ok(MapType::PerfEventArray),
            27 => Ok(MapType::RingBuf),
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
    /// The operation exists but this map type does not provide it (`EOPNOTSUPP`).
    #[error("operation not supported")]
    NotSupported,
    /// The kernel's internal `ENOTSUPP` (524), e.g. a batch operation a map type lacks.
    #[error("operation not supported by this map type (ENOTSUPP)")]
    KernelNotSupported,
    /// No room for another element where the kernel says `ENOSPC` (LPM trie, batch buffers).
    #[error("no space")]
    NoSpace,
    /// A memory read failed (a user stack that cannot be walked).
    #[error("bad address")]
    Fault,
    /// A `bpf()` call on a kernel-backed map failed with this errno (see [`crate::kernel`]).
    #[error("kernel map operation failed (errno {errno})")]
    Kernel {
        /// The kernel's errno.
        errno: i32,
    },
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
            MapError::NotSupported => libc::EOPNOTSUPP,
            MapError::KernelNotSupported => 524,
            MapError::NoSpace => libc::ENOSPC,
            MapError::Fault => libc::EFAULT,
            MapError::Kernel { errno } => *errno,
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
    /// Per-CPU slots of every value (per-CPU types; 1 otherwise).
    pub const NR_CPUS: u64 = 48;
    /// LRU hash maps: the clock hand of the eviction sweep.
    pub const LRU_HAND: u64 = 52;
    /// `map_extra` of `BPF_MAP_CREATE` (bloom filter: number of hash functions).
    pub const MAP_EXTRA: u64 = 56;
    /// Maps of maps: the inner map template (type, key size, value size, max entries, flags:
    /// five `u32`s).
    pub const INNER_DEF: u64 = 96;
    /// Kernel-backed maps: the kernel's map id (0: the map lives in the store).
    pub const KERNEL_ID: u64 = 116;
    /// Kernel-backed maps: the flags the kernel map was created with.
    pub const KERNEL_FLAGS: u64 = 120;
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
    /// Per-CPU slots of each value (1 for types that are not per-CPU).
    pub(crate) nr_cpus: u32,
    /// Ring buffers: this process's double mapping of the data, made on first use.
    pub(crate) mirror: ringbuf::MirrorCell,
    /// `map_extra` (bloom filter: number of hash functions).
    pub(crate) map_extra: u64,
    /// Kernel-backed maps: the kernel's map id (0: a store map).
    pub(crate) kernel_id: u32,
    /// Kernel-backed maps: the kernel map's flags.
    pub(crate) kernel_flags: u32,
    /// Kernel-backed maps: this process's connection (`None` for [`Map::open_meta`] handles).
    pub(crate) kernel: Option<Arc<kernel::Conn>>,
}

/// `BPF_MAP_CREATE` attributes beyond [`MapDef`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapExtra {
    /// `map_extra`: the number of hash functions of a bloom filter (low 4 bits; 0 = 5). Must
    /// be 0 for other types (`EINVAL`).
    pub map_extra: u64,
    /// Maps of maps: the object id of the map `inner_map_fd` names, the template every inner
    /// map must match. Ignored for other types.
    pub inner_map_id: u32,
}

impl Map {
    /// Creates a map in `store` and publishes it. Checks the definition as `BPF_MAP_CREATE`
    /// does.
    pub fn create(store: &Arc<Store>, def: MapDef, name: &str) -> Result<Map, MapError> {
        Self::create_with(store, def, MapExtra::default(), name)
    }

    /// [`Map::create`] with the attributes some types need beyond [`MapDef`].
    pub fn create_with(
        store: &Arc<Store>,
        def: MapDef,
        extra: MapExtra,
        name: &str,
    ) -> Result<Map, MapError> {
        let ty = MapType::try_from(def.map_type)?;
        // BPF_F_RDONLY/WRONLY restrict the creator's fd, not the map
        // (`bpf_map_flags_retain_permanent`): checked below, not kept.
        let fd_flags = def.flags & (BPF_F_RDONLY | BPF_F_WRONLY);
        let def = MapDef {
            flags: def.flags & !(BPF_F_RDONLY | BPF_F_WRONLY),
            ..def
        };
        if extra.map_extra != 0 && ty != MapType::BloomFilter {
            return Err(MapError::BadDefinition {
                what: "map_extra is only for bloom filters",
            });
        }
        check_create_flags(ty, def.flags | fd_flags)?;
        if def.key_size == 0 && ty.is_hash()
            || def.value_size == 0 && ty != MapType::RingBuf
            || def.max_entries == 0
        {
            return Err(MapError::BadDefinition {
                what: "key_size, value_size and max_entries must be non-zero",
            });
        }
        let nr_cpus = if ty.is_percpu() {
            percpu::nr_possible_cpus()
        } else {
            1
        };
        let data_len = data_len_of(ty, &def, nr_cpus, extra.map_extra)?;
        let inner = match ty {
            MapType::ArrayOfMaps | MapType::HashOfMaps => {
                Some(of_maps::template(store, extra.inner_map_id)?)
            }
            _ => None,
        };
        let payload_len = if ty == MapType::RingBuf {
            ringbuf::PAYLOAD_LEN
        } else {
            meta::LEN
        };
        let (id, meta_off) = store.create(ObjectKind::Map, name, payload_len)?;
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
        w32(meta::NR_CPUS, nr_cpus);
        w64(meta::MAP_EXTRA, extra.map_extra);
        if let Some(t) = inner {
            let fields = [t.map_type, t.key_size, t.value_size, t.max_entries, t.flags];
            for (i, v) in fields.into_iter().enumerate() {
                w32(meta::INNER_DEF + 4 * i as u64, v);
            }
        }
        let map = Map {
            store: store.clone(),
            id,
            def,
            meta_off,
            data_off,
            data_len,
            seed,
            nr_cpus,
            mirror: Default::default(),
            map_extra: extra.map_extra,
            kernel_id: 0,
            kernel_flags: 0,
            kernel: None,
        };
        if let Err(e) = map.init_data() {
            store.publish(id);
            store.release(id);
            store.free(data_off, data_len);
            return Err(e);
        }
        store.publish(id);
        Ok(map)
    }

    /// Opens map `id`, validating its metadata. A kernel-backed map is connected to (its fd
    /// opened by id, an array's values mapped): see [`crate::kernel`].
    pub fn open(store: &Arc<Store>, id: u32) -> Result<Map, MapError> {
        let mut m = Self::open_meta(store, id)?;
        if m.kernel_id != 0 {
            let conn = kernel::Conn::connect(
                m.kernel_id,
                &m.def,
                m.kernel_flags,
                m.nr_cpus,
                m.is_frozen(),
            )?;
            m.data_len = conn.mapped_len();
            m.kernel = Some(Arc::new(conn));
        }
        Ok(m)
    }

    /// Opens map `id` for its definition and metadata only: a kernel-backed map is not
    /// connected to, and its element operations fail (`EBADF`).
    pub fn open_meta(store: &Arc<Store>, id: u32) -> Result<Map, MapError> {
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
        let nr_cpus = r32(meta::NR_CPUS)?;
        let kernel_id = r32(meta::KERNEL_ID)?;
        if kernel_id != 0 {
            let expect = if ty.is_percpu() {
                percpu::nr_possible_cpus()
            } else {
                1
            };
            if !kernel::shareable(ty) || nr_cpus != expect {
                return Err(bad().into());
            }
            return Ok(Map {
                store: store.clone(),
                id,
                def,
                meta_off: m,
                data_off: 0,
                data_len: 0,
                seed: 0,
                nr_cpus,
                mirror: Default::default(),
                map_extra: r64(meta::MAP_EXTRA)?,
                kernel_id,
                kernel_flags: r32(meta::KERNEL_FLAGS)?,
                kernel: None,
            });
        }
        if nr_cpus != 1 && !ty.is_percpu()
            || ty == MapType::RingBuf && info.payload_len < ringbuf::PAYLOAD_LEN
        {
            return Err(bad().into());
        }
        let map_extra = r64(meta::MAP_EXTRA)?;
        let expect = data_len_of(ty, &def, nr_cpus, map_extra).map_err(|_| bad())?;
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
            nr_cpus,
            mirror: Default::default(),
            map_extra,
            kernel_id: 0,
            kernel_flags: 0,
            kernel: None,
        })
    }

    /// Prepares freshly allocated (zeroed) data.
    fn init_data(&self) -> Result<(), MapError> {
        match self.ty() {
            MapType::Hash
            | MapType::PercpuHash
            | MapType::LruHash
            | MapType::LruPercpuHash
            | MapType::LpmTrie
            | MapType::HashOfMaps => hash::init(self),
            MapType::ProgArray | MapType::ArrayOfMaps => Ok(()),
            MapType::Array
            | MapType::PercpuArray
            | MapType::Queue
            | MapType::Stack
            | MapType::BloomFilter
            | MapType::StackTrace => Ok(()),
            MapType::RingBuf => ringbuf::init(self),
            MapType::PerfEventArray => Ok(()),
        }
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
    /// Offset of the map's data in the store (page-aligned for mmap-able arrays; 0 for a
    /// kernel-backed map, whose data is the kernel's).
    pub fn data_offset(&self) -> u64 {
        self.data_off
    }
    /// Bytes of data (a connected kernel-backed array: bytes of its mapped values, which
    /// [`Map::lookup_ptr`] of index 0 starts; other kernel-backed maps: 0).
    pub fn data_len(&self) -> u64 {
        self.data_len
    }
    /// The kernel's map id if this map lives in the kernel (`--kernel-maps`), else `None`.
    pub fn kernel_id(&self) -> Option<u32> {
        (self.kernel_id != 0).then_some(self.kernel_id)
    }

    /// The kernel connection of a kernel-backed map (`EBADF` for an [`Map::open_meta`]
    /// handle).
    pub(crate) fn conn(&self) -> Result<&kernel::Conn, MapError> {
        self.kernel
            .as_deref()
            .ok_or(MapError::Kernel { errno: libc::EBADF })
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

    /// `BPF_MAP_FREEZE` (a connected kernel-backed map is frozen in the kernel too, when the
    /// kernel allows it).
    pub fn freeze(&self) {
        if let Some(k) = &self.kernel {
            let _ = k.freeze();
        }
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

    /// The store offset of `key`'s value, if present (for programs: `bpf_map_lookup_elem`;
    /// per-CPU maps give the current CPU's value).
    pub fn lookup_offset(&self, key: &[u8]) -> Result<u64, MapError> {
        self.check_key(key)?;
        if self.kernel_id != 0 {
            // Kernel data has no store offset: see lookup_ptr.
            return Err(MapError::NotSupported);
        }
        match self.ty() {
            MapType::Array => array::lookup(self, key),
            MapType::PercpuArray => percpu::lookup(self, key),
            // Programs use bpf_map_peek_elem; the kernel's lookup returns NULL.
            MapType::Queue | MapType::Stack | MapType::BloomFilter | MapType::StackTrace => {
                Err(MapError::NotFound)
            }
            // Programs reach inner maps through the runtime (`Map::inner_map_id`) and program
            // arrays only through bpf_tail_call.
            MapType::ProgArray | MapType::ArrayOfMaps | MapType::HashOfMaps => {
                Err(MapError::NotFound)
            }
            MapType::RingBuf | MapType::PerfEventArray => Err(MapError::KernelNotSupported),
            MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
                hash::lookup(self, key)
            }
            MapType::LpmTrie => lpm::lookup(self, key),
        }
    }

    /// The address of `key`'s value in this process, if present.
    pub fn lookup_ptr(&self, key: &[u8]) -> Result<*mut u8, MapError> {
        if self.kernel_id != 0 {
            self.check_key(key)?;
            return self.conn()?.lookup_ptr(key);
        }
        let off = self.lookup_offset(key)?;
        self.value_ptr(off)
    }

    fn value_ptr(&self, off: u64) -> Result<*mut u8, MapError> {
        self.store
            .segment()
            .range(off, self.def.value_size as usize)
            .ok_or(MapError::Store(StoreError::Corrupt { what: "value" }))
    }

    /// `bpf_map_lookup_percpu_elem`: the address of CPU `cpu`'s value of `key` (per-CPU maps
    /// only; `NotFound` for a CPU that is not possible, as the kernel returns NULL).
    pub fn lookup_percpu_ptr(&self, key: &[u8], cpu: u32) -> Result<*mut u8, MapError> {
        self.check_key(key)?;
        if self.kernel_id != 0 {
            return self.conn()?.lookup_percpu_ptr(key, cpu);
        }
        let off = match self.ty() {
            MapType::PercpuArray => percpu::lookup_cpu(self, key, cpu)?,
            MapType::PercpuHash | MapType::LruPercpuHash => {
                let slot = percpu::slot_of_cpu(cpu, self.nr_cpus).ok_or(MapError::NotFound)?;
                hash::lookup_cpu(self, key, slot)?
            }
            _ => return Err(MapError::NotFound),
        };
        self.value_ptr(off)
    }

    /// `map_extra` given at creation (bloom filters: the number of hash functions).
    pub fn map_extra(&self) -> u64 {
        self.map_extra
    }

    /// Per-CPU slots of each value (1 unless the map type is per-CPU).
    pub fn nr_cpus(&self) -> u32 {
        self.nr_cpus
    }

    /// Bytes of a value on the syscall side: `round_up(value_size, 8) × possible CPUs` for
    /// per-CPU maps (the kernel's `bpf_map_value_size`), else `value_size`.
    pub fn syscall_value_size(&self) -> usize {
        if self.ty().is_percpu() {
            round8(self.def.value_size) as usize * self.nr_cpus as usize
        } else {
            self.def.value_size as usize
        }
    }

    fn check_syscall_value(&self, value: &[u8]) -> Result<(), MapError> {
        let expected = self.syscall_value_size();
        if value.len() != expected {
            return Err(MapError::InvalidValueSize {
                size: value.len(),
                expected,
            });
        }
        Ok(())
    }

    /// `BPF_MAP_LOOKUP_ELEM`: copies the value into `out` ([`Map::syscall_value_size`] bytes:
    /// per-CPU maps copy every CPU's value).
    pub fn lookup(&self, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
        self.check_syscall_value(out)?;
        self.check_key(key)?;
        if self.kernel_id != 0 {
            return match self.ty() {
                MapType::Queue | MapType::Stack | MapType::BloomFilter => self.conn()?.peek(out),
                _ => self.conn()?.lookup(key, out),
            };
        }
        match self.ty() {
            MapType::PercpuArray => percpu::lookup_all(self, key, out),
            MapType::Queue | MapType::Stack => queue_stack::take(self, out, false),
            // `out` holds the value to test (the kernel copies it in for bloom filters).
            MapType::BloomFilter => bloom::peek(self, out),
            MapType::StackTrace => stack_trace::extract(self, key, out, false),
            MapType::ProgArray | MapType::ArrayOfMaps => {
                out.copy_from_slice(&prog_array::get(self, key)?.to_ne_bytes());
                Ok(())
            }
            MapType::HashOfMaps => {
                out.copy_from_slice(&of_maps::hash_get(self, key)?.to_ne_bytes());
                Ok(())
            }
            MapType::RingBuf | MapType::PerfEventArray => Err(MapError::KernelNotSupported),
            MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
                hash::lookup_copy(self, key, out)
            }
            MapType::LpmTrie => lpm::lookup_copy(self, key, out),
            MapType::Array => {
                let off = self.lookup_offset(key)?;
                self.store
                    .segment()
                    .read(off, out)
                    .ok_or(MapError::Store(StoreError::Corrupt { what: "value" }))
            }
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` from a program (frozen maps stay writable to programs unless
    /// `BPF_F_RDONLY_PROG`, which the loader enforces). Per-CPU maps: the current CPU's value.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        self.check_key(key)?;
        self.check_value(value)?;
        if self.kernel_id != 0 {
            return match self.ty() {
                MapType::Queue | MapType::Stack | MapType::BloomFilter => Err(MapError::InvalidOp),
                _ => self.conn()?.update(key, value, flags),
            };
        }
        match self.ty() {
            MapType::Array => array::update(self, key, value, flags),
            MapType::PercpuArray => percpu::update(self, key, value, flags),
            MapType::Hash | MapType::LruHash => {
                hash::update(self, key, hash::Val::Plain(value), flags).map(drop)
            }
            MapType::LpmTrie => lpm::update(self, key, value, flags),
            MapType::PercpuHash | MapType::LruPercpuHash => {
                hash::update(self, key, hash::Val::ThisCpu(value), flags).map(drop)
            }
            // queue_stack_map_update_elem(), bloom_map_update_elem(): programs push instead.
            MapType::Queue | MapType::Stack | MapType::BloomFilter | MapType::StackTrace => {
                Err(MapError::InvalidOp)
            }
            // Values are object ids with references: see update_id.
            MapType::ProgArray | MapType::ArrayOfMaps | MapType::HashOfMaps => {
                Err(MapError::InvalidOp)
            }
            MapType::RingBuf => Err(MapError::KernelNotSupported),
            // The syscall side passes a perf event's object id (it translated the fd).
            MapType::PerfEventArray => perf_array::update(self, key, value, flags),
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` through the syscall: refused on a frozen map. `value` has
    /// [`Map::syscall_value_size`] bytes (per-CPU maps: every CPU's value).
    pub fn update_syscall(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        if self.is_frozen() {
            return Err(MapError::Frozen);
        }
        self.check_key(key)?;
        self.check_syscall_value(value)?;
        if self.kernel_id != 0 {
            return match self.ty() {
                MapType::Queue | MapType::Stack | MapType::BloomFilter => {
                    self.conn()?.push(value, flags)
                }
                _ => self.conn()?.update_syscall(key, value, flags),
            };
        }
        match self.ty() {
            MapType::PercpuArray => percpu::update_all(self, key, value, flags),
            MapType::PercpuHash | MapType::LruPercpuHash => {
                hash::update(self, key, hash::Val::AllCpus(value), flags).map(drop)
            }
            MapType::Queue | MapType::Stack => queue_stack::push(self, value, flags),
            MapType::BloomFilter => bloom::push(self, value, flags),
            _ => self.update(key, value, flags),
        }
    }

    /// `bpf_map_push_elem` (and `BPF_MAP_UPDATE_ELEM` of a queue or stack): flags `BPF_ANY`, or
    /// `BPF_EXIST` to overwrite the oldest element when full (else `E2BIG`).
    pub fn push(&self, value: &[u8], flags: u64) -> Result<(), MapError> {
        self.check_value(value)?;
        if self.kernel_id != 0 {
            return match self.ty() {
                MapType::Queue | MapType::Stack | MapType::BloomFilter => {
                    self.conn()?.push(value, flags)
                }
                _ => Err(MapError::InvalidOp),
            };
        }
        match self.ty() {
            MapType::Queue | MapType::Stack => queue_stack::push(self, value, flags),
            MapType::BloomFilter => bloom::push(self, value, flags),
            _ => Err(MapError::InvalidOp),
        }
    }

    /// `bpf_map_pop_elem`: removes and copies the next element; `ENOENT` when empty.
    pub fn pop(&self, out: &mut [u8]) -> Result<(), MapError> {
        self.check_value(out)?;
        if self.kernel_id != 0 {
            return match self.ty() {
                MapType::Queue | MapType::Stack => self.conn()?.lookup_and_delete(&[], out),
                MapType::BloomFilter => Err(MapError::NotSupported),
                _ => Err(MapError::InvalidOp),
            };
        }
        match self.ty() {
            MapType::Queue | MapType::Stack => queue_stack::take(self, out, true),
            MapType::BloomFilter => Err(MapError::NotSupported),
            _ => Err(MapError::InvalidOp),
        }
    }

    /// `bpf_map_peek_elem`: copies the next element without removing it; `ENOENT` when empty.
    /// For a bloom filter `out` is the value to test: `Ok` if it may be present.
    pub fn peek(&self, out: &mut [u8]) -> Result<(), MapError> {
        self.check_value(out)?;
        if self.kernel_id != 0 {
            return match self.ty() {
                MapType::Queue | MapType::Stack | MapType::BloomFilter => self.conn()?.peek(out),
                _ => Err(MapError::InvalidOp),
            };
        }
        match self.ty() {
            MapType::Queue | MapType::Stack => queue_stack::take(self, out, false),
            MapType::BloomFilter => bloom::peek(self, out),
            _ => Err(MapError::InvalidOp),
        }
    }

    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: pop for queues and stacks, lookup then delete of `key`
    /// for the hash types (`out` has [`Map::syscall_value_size`] bytes); `ENOTSUPP` (524) for
    /// other types, as the kernel.
    pub fn lookup_and_delete(&self, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
        if self.is_frozen() {
            return Err(MapError::Frozen);
        }
        self.check_key(key)?;
        self.check_syscall_value(out)?;
        if self.kernel_id != 0 {
            return self.conn()?.lookup_and_delete(key, out);
        }
        match self.ty() {
            MapType::Queue | MapType::Stack => queue_stack::take(self, out, true),
            MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
                hash::delete(self, key, Some(out))
            }
            MapType::StackTrace => stack_trace::extract(self, key, out, true),
            _ => Err(MapError::KernelNotSupported),
        }
    }

    /// `bpf_get_stackid`'s storage half (stack trace maps): the id of the bucket holding
    /// `ips` (innermost frame first). `flags`: `BPF_F_REUSE_STACKID`, `BPF_F_FAST_STACK_CMP`;
    /// `EEXIST` when the bucket holds another stack and may not be reused.
    pub fn stack_id(&self, ips: &[u64], flags: u64) -> Result<u32, MapError> {
        match self.ty() {
            MapType::StackTrace if self.def.flags & BPF_F_STACK_BUILD_ID == 0 => {
                stack_trace::stack_id(self, ips, flags)
            }
            // Build-id stacks (file offsets + ELF build ids) are not produced here.
            MapType::StackTrace => Err(MapError::NotSupported),
            _ => Err(MapError::InvalidOp),
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` of a program array or map of maps, after the caller turned the fd
    /// into object `id` and took a reference on it for the map: stores `id` at `key` and
    /// returns the id it replaced (whose reference the caller drops). Program arrays want a
    /// program (`EINVAL` otherwise); maps of maps a map matching the inner template
    /// (`EINVAL` otherwise). Fd arrays take only `BPF_ANY` and check the index (`E2BIG`)
    /// first; hash of maps honours `BPF_NOEXIST`/`BPF_EXIST`.
    pub fn update_id(&self, key: &[u8], id: u32, flags: u64) -> Result<Option<u32>, MapError> {
        if self.is_frozen() {
            return Err(MapError::Frozen);
        }
        self.check_key(key)?;
        let ty = self.ty();
        if matches!(ty, MapType::ProgArray | MapType::ArrayOfMaps) {
            prog_array::check_set(self, key, flags)?;
        }
        match ty {
            MapType::ProgArray => {
                let is_prog = self
                    .store
                    .object(id)
                    .is_some_and(|o| o.kind == ObjectKind::Prog);
                if !is_prog {
                    return Err(MapError::BadDefinition {
                        what: "not a program",
                    });
                }
            }
            MapType::ArrayOfMaps | MapType::HashOfMaps => {
                let t = self.inner_template().ok_or(MapError::InvalidOp)?;
                let inner = Map::open(&self.store, id)
                    .map_err(|_| MapError::BadDefinition { what: "not a map" })?;
                if !of_maps::compatible(&t, &inner.def) {
                    return Err(MapError::BadDefinition {
                        what: "inner map does not match the template",
                    });
                }
            }
            _ => return Err(MapError::InvalidOp),
        }
        match ty {
            MapType::HashOfMaps => of_maps::hash_set(self, key, id, flags),
            _ => prog_array::set(self, key, id, flags),
        }
    }

    /// `BPF_MAP_DELETE_ELEM` of a program array or map of maps: returns the id removed (whose
    /// reference the caller drops).
    pub fn delete_id(&self, key: &[u8]) -> Result<u32, MapError> {
        if self.is_frozen() {
            return Err(MapError::Frozen);
        }
        self.check_key(key)?;
        match self.ty() {
            MapType::ProgArray | MapType::ArrayOfMaps => prog_array::take(self, key),
            MapType::HashOfMaps => of_maps::hash_take(self, key),
            _ => Err(MapError::InvalidOp),
        }
    }

    /// The program id at `index` of a program array (for `bpf_tail_call`), if any.
    pub fn prog_array_get(&self, index: u32) -> Option<u32> {
        if self.ty() != MapType::ProgArray {
            return None;
        }
        prog_array::get(self, &index.to_ne_bytes()).ok()
    }

    /// Program side of `bpf_map_lookup_elem` on a map of maps: the inner map's id (the
    /// runtime hands the program its own handle to that map).
    pub fn inner_map_id(&self, key: &[u8]) -> Result<u32, MapError> {
        self.check_key(key)?;
        match self.ty() {
            MapType::ArrayOfMaps => prog_array::get(self, key),
            MapType::HashOfMaps => of_maps::hash_get(self, key),
            _ => Err(MapError::InvalidOp),
        }
    }

    /// Maps of maps: the definition every inner map must match.
    pub fn inner_template(&self) -> Option<MapDef> {
        if !matches!(self.ty(), MapType::ArrayOfMaps | MapType::HashOfMaps) {
            return None;
        }
        let r = |i: u64| {
            self.store
                .segment()
                .atomic_u32(self.meta_off + meta::INNER_DEF + 4 * i)
                .map(|a| a.load(Ordering::Relaxed))
        };
        Some(MapDef {
            map_type: r(0)?,
            key_size: r(1)?,
            value_size: r(2)?,
            max_entries: r(3)?,
            flags: r(4)?,
        })
    }

    /// The object ids this map holds references on (program arrays, maps of maps), to drop
    /// when the map goes away.
    pub fn held_ids(&self) -> Vec<u32> {
        match self.ty() {
            MapType::ProgArray | MapType::ArrayOfMaps => prog_array::ids(self),
            MapType::HashOfMaps => of_maps::hash_ids(self),
            _ => Vec::new(),
        }
    }

    /// Whether the map object this handle was opened on is still in the store (not removed,
    /// its id not reused by another object).
    pub fn is_live(&self) -> bool {
        self.store
            .object(self.id)
            .is_some_and(|o| o.kind == ObjectKind::Map && o.payload_off == self.meta_off)
    }

    /// `BPF_MAP_DELETE_ELEM`.
    pub fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        self.check_key(key)?;
        if self.kernel_id != 0 {
            return self.conn()?.delete(key);
        }
        match self.ty() {
            MapType::Array | MapType::PercpuArray | MapType::Queue | MapType::Stack => {
                Err(MapError::InvalidOp)
            }
            MapType::RingBuf => Err(MapError::KernelNotSupported),
            MapType::BloomFilter => Err(MapError::NotSupported),
            MapType::StackTrace => stack_trace::delete(self, key),
            // Values are object ids with references: see delete_id.
            MapType::ProgArray | MapType::ArrayOfMaps | MapType::HashOfMaps => {
                Err(MapError::InvalidOp)
            }
            MapType::PerfEventArray => perf_array::delete(self, key),
            MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
                hash::delete(self, key, None)
            }
            MapType::LpmTrie => lpm::delete(self, key),
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
        if self.kernel_id != 0 {
            return self.conn()?.next_key(key, out);
        }
        match self.ty() {
            MapType::Array | MapType::PercpuArray | MapType::PerfEventArray => {
                array::next_key(self, key, out)
            }
            MapType::Queue | MapType::Stack => Err(MapError::InvalidOp),
            MapType::BloomFilter => Err(MapError::NotSupported),
            MapType::StackTrace => stack_trace::next_key(self, key, out),
            MapType::ProgArray | MapType::ArrayOfMaps => array::next_key(self, key, out),
            MapType::HashOfMaps => hash::next_key(self, key, out),
            MapType::RingBuf => Err(MapError::KernelNotSupported),
            MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
                hash::next_key(self, key, out)
            }
            MapType::LpmTrie => lpm::next_key(self, key, out),
        }
    }
}

/// The data length of a map of type `ty`, checking the definition as `map_alloc_check` does.
fn data_len_of(ty: MapType, def: &MapDef, nr_cpus: u32, map_extra: u64) -> Result<u64, MapError> {
    match ty {
        MapType::Array => array::check_def(def),
        MapType::PercpuArray => percpu::check_def(def, nr_cpus),
        MapType::Queue | MapType::Stack => queue_stack::check_def(def),
        MapType::BloomFilter => bloom::check_def(def, map_extra),
        MapType::LpmTrie => lpm::check_def(def),
        MapType::StackTrace => stack_trace::check_def(def),
        MapType::ProgArray => prog_array::check_def(def),
        MapType::ArrayOfMaps | MapType::HashOfMaps => of_maps::check_def(def, nr_cpus),
        MapType::RingBuf => ringbuf::check_def(def),
        MapType::PerfEventArray => perf_array::check_def(def),
        MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
            hash::check_def(def, nr_cpus)
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
        // A map's data, or a perf event's ring (made when its loader mmapped it). A
        // kernel-backed map has no data in the store.
        let data = Map::open_meta(store, id)
            .ok()
            .filter(|m| m.kernel_id == 0)
            .map(|m| (m.data_offset(), m.data_len()))
            .or_else(|| perf_array::event_ring(store, id).map(|r| (r.offset(), r.len())));
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
