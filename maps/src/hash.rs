//! `BPF_MAP_TYPE_HASH` and its variants `PERCPU_HASH`, `LRU_HASH`, `LRU_PERCPU_HASH` (and the
//! tables under `HASH_OF_MAPS` and `LPM_TRIE`), preallocated like the kernel's default.
//!
//! Data layout: `n_buckets` (a power of two ≥ `max_entries`) buckets of 16 bytes
//! `[lock: u64 | head: u32 | pad]`, then [`FREE_LISTS`] free-list heads of 64 bytes each (one
//! cache line per head), then `max_entries` elements of
//! `[next: u32 | hash: u32 | state: u32 | ref: u32 | key (8-rounded) | value (8-rounded)]`.
//! Per-CPU variants keep the values out of the elements: after the elements come one block per
//! possible CPU of `max_entries` values (`round_up(value_size, 8)` each, 64-byte aligned
//! blocks), so CPUs never share a cache line and a value is updated in place, as the kernel's
//! `pcpu_copy_value` does.
//! Free elements sit on [`FREE_LISTS`] lock-free stacks (Treiber), each head a tagged
//! `(tag << 32) | index` word on its own cache line: a thread pushes to and pops from its own
//! list (threads get lists round-robin, starting from a per-process offset) and takes from the
//! others only when that one is empty, as the kernel's `pcpu_freelist` does per CPU, so threads
//! replacing values do not fight over one head. A hint word after the heads says "every list
//! was empty" (set by a scan that found nothing, cleared by the next free): replacing an existing
//! key, which may write in place when nothing is free, checks it instead of scanning every
//! list, so a full map costs one list per update.
//!
//! Links are element indexes; a chain ends in a *nulls* marker `NULLS | bucket` (as the kernel's
//! `hlist_nulls`), and the free stack ends in `FREE_END`. Lookups take no lock: a reader that
//! follows an element which was deleted and reused elsewhere ends on a foreign marker and
//! restarts. Updates and deletes take the bucket's robust lock ([`crate::lock`]) and change a
//! chain only by single atomic stores of fully written elements, so a writer killed at any
//! point leaves every chain intact (at worst one element leaks).
//!
//! Replacing the value of a key takes a fresh element when one is free (readers keep a stable
//! old value) and otherwise overwrites the value in place, so an update of an existing key never
//! fails because the map is full (the kernel keeps spare elements for the same reason).
//!
//! LRU variants (`kernel/bpf/bpf_lru_list.c` is the model, approximated by CLOCK): lookups set
//! the element's `ref` word; an update that finds no free element sweeps a shared clock hand
//! over the elements, clearing set `ref` words and evicting the first element found clear. The
//! sweep holds no lock while it looks, then takes the victim's bucket lock and evicts it only
//! if it is still linked there, so it never waits on a lock while holding one.
//! `BPF_F_NO_COMMON_LRU` is accepted and uses the same shared clock.

use crate::lock;
use crate::map::{BPF_EXIST, BPF_NOEXIST, Map, MapDef, MapError, check_update_flags, meta, round8};
use crate::percpu;
use crate::store::StoreError;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const NULLS: u32 = 0x8000_0000;
const FREE_END: u32 = u32::MAX;
const BUCKET_LEN: u64 = 16;
const ELEM_HDR: u64 = 16;
const LIVE: u32 = 1;
const DEAD: u32 = 0;
const MAX_RESTARTS: usize = 16;
/// `sizeof(struct htab_elem)` in Linux 6.18 (x86_64).
const HTAB_ELEM_LEN: u64 = 48;
/// Evictions an LRU update tries before giving up with `E2BIG` (others keep taking the
/// elements it frees).
const MAX_EVICT_ROUNDS: usize = 64;
/// Free lists per hash map (CPUs share them modulo this count).
pub const FREE_LISTS: u32 = 16;
/// Bytes between two free-list heads (one cache line each); the "all empty" hint follows the
/// last head, on its own line.
const FREE_HEAD_LEN: u64 = 64;

/// Which hash flavour a map type is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Variant {
    /// Values per CPU.
    pub percpu: bool,
    /// Evicts instead of failing when full.
    pub lru: bool,
}

impl Variant {
    pub(crate) fn of(map_type: u32) -> Variant {
        Variant {
            percpu: matches!(map_type, 5 | 10),
            lru: matches!(map_type, 9 | 10),
        }
    }
}

/// Where a value to store comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val<'v> {
    /// `value_size` bytes (not per-CPU).
    Plain(&'v [u8]),
    /// A syscall-side per-CPU image: `round_up(value_size, 8)` bytes per CPU.
    AllCpus(&'v [u8]),
    /// A program's per-CPU update: this CPU's value (the others start zeroed).
    ThisCpu(&'v [u8]),
}

fn n_buckets(def: &MapDef) -> u64 {
    u64::from(def.max_entries).next_power_of_two()
}

/// Bytes of the buckets and the free-list heads after them (a cache-line multiple).
fn table_len(def: &MapDef) -> Option<u64> {
    let buckets = n_buckets(def).checked_mul(BUCKET_LEN)?.div_ceil(64) * 64;
    buckets.checked_add(u64::from(FREE_LISTS + 1) * FREE_HEAD_LEN)
}

fn elem_len(def: &MapDef, percpu: bool) -> u64 {
    let v = if percpu { 0 } else { round8(def.value_size) };
    ELEM_HDR + round8(def.key_size) + v
}

fn cpu_stride(def: &MapDef) -> u64 {
    (round8(def.value_size) * u64::from(def.max_entries)).div_ceil(64) * 64
}

/// Checks sizes and returns the data length. `nr_cpus` matters for per-CPU variants only.
pub(crate) fn check_def(def: &MapDef, nr_cpus: u32) -> Result<u64, MapError> {
    let v = Variant::of(def.map_type);
    // htab_map_alloc_check(): an element (key, value and the kernel's 48-byte `struct
    // htab_elem`) must fit one kmalloc.
    if u64::from(def.key_size) + u64::from(def.value_size)
        >= crate::map::KMALLOC_MAX_SIZE - HTAB_ELEM_LEN
    {
        return Err(MapError::TooBig);
    }
    if v.percpu && round8(def.value_size) > percpu::MAX_PERCPU_VALUE {
        return Err(MapError::TooBig);
    }
    if def.max_entries >= NULLS {
        return Err(MapError::TooBig);
    }
    let buckets = table_len(def);
    let elems = elem_len(def, v.percpu).checked_mul(u64::from(def.max_entries));
    let values = if v.percpu {
        if nr_cpus == 0 || nr_cpus > percpu::MAX_CPUS {
            return Err(MapError::BadDefinition {
                what: "bad number of CPUs",
            });
        }
        cpu_stride(def).checked_mul(u64::from(nr_cpus))
    } else {
        Some(0)
    };
    buckets
        .and_then(|b| b.checked_add(elems?))
        .and_then(|b| b.checked_add(values?))
        .filter(|&l| l <= 1 << 40)
        .ok_or(MapError::TooBig)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt { what: "hash map" })
}

/// Geometry of one open hash map.
struct H<'a> {
    map: &'a Map,
    v: Variant,
    mask: u32,
    heads_off: u64,
    elems_off: u64,
    elem_len: u64,
    values_off: u64,
    vs8: u64,
}

impl<'a> H<'a> {
    fn new(map: &'a Map) -> Self {
        let def = &map.def;
        let v = Variant::of(def.map_type);
        let nb = n_buckets(def);
        let table = table_len(def).unwrap_or(0);
        let elems_off = map.data_off + table;
        let elem_len = elem_len(def, v.percpu);
        H {
            map,
            v,
            mask: (nb - 1) as u32,
            heads_off: elems_off - u64::from(FREE_LISTS + 1) * FREE_HEAD_LEN,
            elems_off,
            elem_len,
            values_off: elems_off + elem_len * u64::from(def.max_entries),
            vs8: round8(def.value_size),
        }
    }
    fn seg(&self) -> &'a crate::shm::Segment {
        self.map.store.segment()
    }
    fn bucket_lock(&self, b: u32) -> Result<&'a AtomicU64, MapError> {
        self.seg()
            .atomic_u64(self.map.data_off + u64::from(b) * BUCKET_LEN)
            .ok_or_else(corrupt)
    }
    fn bucket_head(&self, b: u32) -> Result<&'a AtomicU32, MapError> {
        self.seg()
            .atomic_u32(self.map.data_off + u64::from(b) * BUCKET_LEN + 8)
            .ok_or_else(corrupt)
    }
    fn elem(&self, i: u32) -> Result<u64, MapError> {
        if i >= self.map.def.max_entries {
            return Err(corrupt());
        }
        Ok(self.elems_off + u64::from(i) * self.elem_len)
    }
    fn next(&self, i: u32) -> Result<&'a AtomicU32, MapError> {
        self.seg().atomic_u32(self.elem(i)?).ok_or_else(corrupt)
    }
    fn hash_field(&self, i: u32) -> Result<&'a AtomicU32, MapError> {
        self.seg().atomic_u32(self.elem(i)? + 4).ok_or_else(corrupt)
    }
    fn state(&self, i: u32) -> Result<&'a AtomicU32, MapError> {
        self.seg().atomic_u32(self.elem(i)? + 8).ok_or_else(corrupt)
    }
    fn ref_bit(&self, i: u32) -> Result<&'a AtomicU32, MapError> {
        self.seg()
            .atomic_u32(self.elem(i)? + 12)
            .ok_or_else(corrupt)
    }
    fn key_off(&self, i: u32) -> Result<u64, MapError> {
        Ok(self.elem(i)? + ELEM_HDR)
    }
    /// The value of element `i` (per-CPU maps: CPU slot 0's).
    fn value_off(&self, i: u32) -> Result<u64, MapError> {
        self.cpu_value_off(i, 0)
    }
    fn cpu_value_off(&self, i: u32, slot: u32) -> Result<u64, MapError> {
        if self.v.percpu {
            if i >= self.map.def.max_entries || slot >= self.map.nr_cpus {
                return Err(corrupt());
            }
            Ok(self.values_off
                + u64::from(slot) * cpu_stride(&self.map.def)
                + u64::from(i) * self.vs8)
        } else {
            Ok(self.elem(i)? + ELEM_HDR + round8(self.map.def.key_size))
        }
    }
    /// The value programs see: this CPU's for per-CPU maps.
    fn prog_value_off(&self, i: u32) -> Result<u64, MapError> {
        if self.v.percpu {
            self.cpu_value_off(i, percpu::current_slot(self.map.nr_cpus))
        } else {
            self.value_off(i)
        }
    }
    /// Head of free list `l` (taken modulo [`FREE_LISTS`]).
    fn freelist(&self, l: u32) -> Result<&'a AtomicU64, MapError> {
        self.seg()
            .atomic_u64(self.heads_off + u64::from(l % FREE_LISTS) * FREE_HEAD_LEN)
            .ok_or_else(corrupt)
    }

    /// The "every free list was empty" hint.
    fn empty_hint(&self) -> Result<&'a AtomicU32, MapError> {
        self.seg()
            .atomic_u32(self.heads_off + u64::from(FREE_LISTS) * FREE_HEAD_LEN)
            .ok_or_else(corrupt)
    }
    fn key_eq(&self, i: u32, key: &[u8]) -> Result<bool, MapError> {
        self.seg()
            .window(self.key_off(i)?, key.len())
            .and_then(|w| w.bytes_eq(0, key))
            .ok_or_else(corrupt)
    }

    /// Stores `val` into element `i`'s value. `fresh`: the element is new (per-CPU program
    /// updates then zero the other CPUs' values).
    fn write_value(&self, i: u32, val: Val<'_>, fresh: bool) -> Result<(), MapError> {
        let seg = self.seg();
        match val {
            Val::Plain(v) => seg.write(self.value_off(i)?, v).ok_or_else(corrupt),
            Val::AllCpus(img) => {
                for (slot, chunk) in img.chunks_exact(self.vs8 as usize).enumerate() {
                    seg.write(self.cpu_value_off(i, slot as u32)?, chunk)
                        .ok_or_else(corrupt)?;
                }
                Ok(())
            }
            Val::ThisCpu(v) => {
                if fresh {
                    for slot in 0..self.map.nr_cpus {
                        seg.zero(self.cpu_value_off(i, slot)?, self.vs8 as usize)
                            .ok_or_else(corrupt)?;
                    }
                }
                seg.write(self.prog_value_off(i)?, v).ok_or_else(corrupt)
            }
        }
    }

    /// Copies element `i`'s value the way the syscall side sees it (per-CPU: every CPU).
    fn read_value(&self, i: u32, out: &mut [u8]) -> Result<(), MapError> {
        let seg = self.seg();
        if self.v.percpu {
            for (slot, chunk) in out.chunks_exact_mut(self.vs8 as usize).enumerate() {
                seg.read(self.cpu_value_off(i, slot as u32)?, chunk)
                    .ok_or_else(corrupt)?;
            }
            Ok(())
        } else {
            seg.read(self.value_off(i)?, out).ok_or_else(corrupt)
        }
    }

    /// A free element: from this thread's list, else from the next non-empty one. With
    /// `replacing` (the caller can write in place instead), gives up after its own list when
    /// the hint says every list was empty.
    fn pop_free(&self, replacing: bool) -> Result<Option<u32>, MapError> {
        let me = my_list();
        if let Some(i) = self.pop_from(self.freelist(me)?)? {
            return Ok(Some(i));
        }
        let hint = self.empty_hint()?;
        if replacing && hint.load(Ordering::Relaxed) != 0 {
            return Ok(None);
        }
        for k in 1..FREE_LISTS {
            if let Some(i) = self.pop_from(self.freelist(me.wrapping_add(k))?)? {
                return Ok(Some(i));
            }
        }
        if hint.load(Ordering::Relaxed) == 0 {
            hint.store(1, Ordering::Relaxed);
        }
        Ok(None)
    }

    fn pop_from(&self, head: &AtomicU64) -> Result<Option<u32>, MapError> {
        loop {
            let cur = head.load(Ordering::Acquire);
            let idx = cur as u32;
            if idx == FREE_END {
                return Ok(None);
            }
            let next = self.next(idx)?.load(Ordering::Acquire);
            let new = ((cur >> 32).wrapping_add(1) << 32) | u64::from(next);
            if head
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(Some(idx));
            }
        }
    }

    /// Returns element `idx` to this thread's free list.
    fn push_free(&self, idx: u32) -> Result<(), MapError> {
        let head = self.freelist(my_list())?;
        let hint = self.empty_hint()?;
        if hint.load(Ordering::Relaxed) != 0 {
            hint.store(0, Ordering::Relaxed);
        }
        self.state(idx)?.store(DEAD, Ordering::Release);
        loop {
            let cur = head.load(Ordering::Acquire);
            self.next(idx)?.store(cur as u32, Ordering::Release);
            let new = ((cur >> 32).wrapping_add(1) << 32) | u64::from(idx);
            if head
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Lock-free search of bucket `b`; `Ok(None)` when absent.
    fn find(&self, b: u32, h: u32, key: &[u8]) -> Result<Option<u32>, MapError> {
        let limit = self.map.def.max_entries as usize + 1;
        'restart: for _ in 0..MAX_RESTARTS {
            let mut link = self.bucket_head(b)?.load(Ordering::Acquire);
            for _ in 0..=limit {
                if link & NULLS != 0 {
                    if link == NULLS | b {
                        return Ok(None);
                    }
                    continue 'restart;
                }
                // One bounds check for the element's fields (next 0, hash 4, state 8, key 16).
                let e = self
                    .seg()
                    .window(self.elem(link)?, self.elem_len as usize)
                    .ok_or_else(corrupt)?;
                let field = |off: usize| e.atomic_u32(off).ok_or_else(corrupt);
                if field(4)?.load(Ordering::Acquire) == h
                    && field(8)?.load(Ordering::Acquire) == LIVE
                    && e.bytes_eq(ELEM_HDR as usize, key).ok_or_else(corrupt)?
                {
                    return Ok(Some(link));
                }
                link = field(0)?.load(Ordering::Acquire);
            }
            // A chain longer than the map: corrupt or concurrently rebuilt; try again.
        }
        // Contended beyond reason: search under the bucket lock.
        let _g = lock::lock(self.bucket_lock(b)?);
        self.find_locked(b, h, key).map(|r| r.map(|(i, _)| i))
    }

    /// Search under the bucket lock; returns the element and the link word pointing to it.
    fn find_locked(
        &self,
        b: u32,
        h: u32,
        key: &[u8],
    ) -> Result<Option<(u32, &'a AtomicU32)>, MapError> {
        let mut prev = self.bucket_head(b)?;
        let mut link = prev.load(Ordering::Acquire);
        for _ in 0..=self.map.def.max_entries {
            if link & NULLS != 0 {
                return Ok(None);
            }
            if self.hash_field(link)?.load(Ordering::Acquire) == h && self.key_eq(link, key)? {
                return Ok(Some((link, prev)));
            }
            prev = self.next(link)?;
            link = prev.load(Ordering::Acquire);
        }
        Err(corrupt())
    }

    /// The link word pointing at element `i` in bucket `b` (under the bucket lock).
    fn link_to(&self, b: u32, i: u32) -> Result<Option<&'a AtomicU32>, MapError> {
        let mut prev = self.bucket_head(b)?;
        let mut link = prev.load(Ordering::Acquire);
        for _ in 0..=self.map.def.max_entries {
            if link & NULLS != 0 {
                return Ok(None);
            }
            if link == i {
                return Ok(Some(prev));
            }
            prev = self.next(link)?;
            link = prev.load(Ordering::Acquire);
        }
        Err(corrupt())
    }

    /// LRU: evicts one element (CLOCK sweep) and hands it to the caller, unlinked and marked
    /// dead (not on a free list, so no other thread takes it first). `None` if none could be
    /// evicted.
    fn evict_one(&self) -> Result<Option<u32>, MapError> {
        let hand = self
            .seg()
            .atomic_u32(self.map.meta_off + meta::LRU_HAND)
            .ok_or_else(corrupt)?;
        let n = self.map.def.max_entries;
        // Two turns: the first may only clear reference bits.
        for _ in 0..2 * u64::from(n) + 2 {
            let i = hand.fetch_add(1, Ordering::Relaxed) % n;
            if self.state(i)?.load(Ordering::Acquire) != LIVE {
                continue;
            }
            let r = self.ref_bit(i)?;
            if r.load(Ordering::Relaxed) != 0 {
                r.store(0, Ordering::Relaxed);
                continue;
            }
            let b = self.hash_field(i)?.load(Ordering::Acquire) & self.mask;
            let _g = lock::lock(self.bucket_lock(b)?);
            // Still linked in that bucket (not freed, moved or being filled meanwhile)?
            if self.state(i)?.load(Ordering::Acquire) != LIVE {
                continue;
            }
            if let Some(prev) = self.link_to(b, i)? {
                prev.store(self.next(i)?.load(Ordering::Acquire), Ordering::Release);
                self.state(i)?.store(DEAD, Ordering::Release);
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

/// This thread's free list: assigned round-robin on first use, from an offset derived from the
/// process id so the first threads of different processes use different lists.
fn my_list() -> u32 {
    use std::cell::Cell;
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local! {
        static LIST: Cell<u32> = const { Cell::new(u32::MAX) };
    }
    LIST.with(|c| {
        let l = c.get();
        if l != u32::MAX {
            return l;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let l = crate::shm::cached_pid().wrapping_mul(7).wrapping_add(n) % FREE_LISTS;
        c.set(l);
        l
    })
}

/// The hash of a key: a multiply–rotate mix over 8-byte words, seeded per map.
/// `rest` (1 to 7 bytes) as a little-endian word padded with zeros, from loads of the bytes
/// themselves (at most two overlapping ones): copying them into a zeroed buffer and loading
/// that as a word stalls on store forwarding, the largest cost of hashing a 4-byte key.
#[inline(always)]
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    debug_assert!((1..8).contains(&n));
    if n >= 4 {
        let lo = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
        let hi = u64::from(u32::from_le_bytes([
            rest[n - 4],
            rest[n - 3],
            rest[n - 2],
            rest[n - 1],
        ]));
        // The two loads overlap on equal bytes when n < 8, so or-ing them is exact.
        lo | hi << ((n - 4) * 8)
    } else if n >= 2 {
        let lo = u64::from(u16::from_le_bytes([rest[0], rest[1]]));
        let hi = u64::from(u16::from_le_bytes([rest[n - 2], rest[n - 1]]));
        lo | hi << ((n - 2) * 8)
    } else {
        u64::from(rest[0])
    }
}

pub(crate) fn hash_key(seed: u64, key: &[u8]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (key.len() as u64).wrapping_mul(K);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        h = (h ^ tail_word(rest)).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 32;
    h = h.wrapping_mul(K);
    (h >> 32) as u32
}

/// Splits the elements into the free lists (list `l` gets a contiguous run) and empties every
/// bucket.
pub(crate) fn init(map: &Map) -> Result<(), MapError> {
    let h = H::new(map);
    for b in 0..=h.mask {
        h.bucket_head(b)?.store(NULLS | b, Ordering::Relaxed);
    }
    let n = u64::from(map.def.max_entries);
    for l in 0..FREE_LISTS {
        let start = (n * u64::from(l) / u64::from(FREE_LISTS)) as u32;
        let end = (n * u64::from(l + 1) / u64::from(FREE_LISTS)) as u32;
        for i in start..end {
            let next = if i + 1 < end { i + 1 } else { FREE_END };
            h.next(i)?.store(next, Ordering::Relaxed);
        }
        let first = if start < end { start } else { FREE_END };
        // Tag 0, head = the run's first element.
        h.freelist(l)?.store(u64::from(first), Ordering::Release);
    }
    Ok(())
}

/// Program side: the value's offset (per-CPU maps: this CPU's). LRU maps mark it used.
pub(crate) fn lookup(map: &Map, key: &[u8]) -> Result<u64, MapError> {
    let h = H::new(map);
    let i = find(&h, key)?;
    h.prog_value_off(i)
}

fn find(h: &H<'_>, key: &[u8]) -> Result<u32, MapError> {
    let hv = hash_key(h.map.seed, key);
    let i = h.find(hv & h.mask, hv, key)?.ok_or(MapError::NotFound)?;
    if h.v.lru {
        let r = h.ref_bit(i)?;
        if r.load(Ordering::Relaxed) == 0 {
            r.store(1, Ordering::Relaxed);
        }
    }
    Ok(i)
}

/// `bpf_map_lookup_percpu_elem`: CPU slot `slot`'s value.
pub(crate) fn lookup_cpu(map: &Map, key: &[u8], slot: u32) -> Result<u64, MapError> {
    let h = H::new(map);
    let i = find(&h, key)?;
    h.cpu_value_off(i, slot)
}

/// Syscall side: copies the value (per-CPU: every CPU's) into `out`.
pub(crate) fn lookup_copy(map: &Map, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
    let h = H::new(map);
    let i = find(&h, key)?;
    h.read_value(i, out)
}

/// Inserts or replaces `key`. Returns whether the key was new.
pub(crate) fn update(map: &Map, key: &[u8], val: Val<'_>, flags: u64) -> Result<bool, MapError> {
    update_swap(map, key, val, flags, None)
}

/// [`update`], copying the replaced value (syscall-side layout) into `old` under the bucket
/// lock when the key existed.
pub(crate) fn update_swap(
    map: &Map,
    key: &[u8],
    val: Val<'_>,
    flags: u64,
    mut old: Option<&mut [u8]>,
) -> Result<bool, MapError> {
    let op = check_update_flags(flags)?;
    let h = H::new(map);
    let hv = hash_key(map.seed, key);
    let b = hv & h.mask;
    // LRU: an element this update evicted, for its next round (back to a free list if unused).
    struct Spare<'h, 'a>(Option<u32>, &'h H<'a>);
    impl Drop for Spare<'_, '_> {
        fn drop(&mut self) {
            if let Some(i) = self.0.take() {
                let _ = self.1.push_free(i);
            }
        }
    }
    let mut spare = Spare(None, &h);
    for _ in 0..MAX_EVICT_ROUNDS {
        {
            let _g = lock::lock(h.bucket_lock(b)?);
            let existing = h.find_locked(b, hv, key)?;
            match (existing, op) {
                (Some(_), BPF_NOEXIST) => return Err(MapError::Exists),
                (None, BPF_EXIST) => return Err(MapError::NotFound),
                _ => {}
            }
            if let (Some((i, _)), Some(out)) = (existing, old.as_deref_mut()) {
                h.read_value(i, out)?;
            }
            if let (Some((old, _)), true) = (existing, h.v.percpu) {
                // Per-CPU values are updated in place (`pcpu_copy_value`).
                h.write_value(old, val, false)?;
                return Ok(false);
            }
            // A full LRU map evicts rather than searching every list (the hint suffices).
            let new = match spare.0.take() {
                Some(i) => Some(i),
                None => h.pop_free(existing.is_some() || h.v.lru)?,
            };
            let Some(new) = new else {
                if let Some((old, _)) = existing {
                    // Full: overwrite in place rather than fail.
                    h.write_value(old, val, false)?;
                    return Ok(false);
                }
                if !h.v.lru {
                    return Err(MapError::TooBig);
                }
                // Evict outside the lock (the victim's bucket may be this one), then retry with
                // the victim.
                drop(_g);
                spare.0 = h.evict_one()?;
                continue;
            };
            // Fill a fresh element completely before linking it (readers never see it
            // half-written).
            let fill = || -> Result<(), MapError> {
                h.seg().write(h.key_off(new)?, key).ok_or_else(corrupt)?;
                h.write_value(new, val, true)?;
                h.hash_field(new)?.store(hv, Ordering::Relaxed);
                // Born unreferenced, as the kernel's LRU nodes (`ref` = 0 until a lookup): a
                // sweep over freshly inserted elements then stops at the first one instead of
                // clearing every bit and lapping the table onto a key in use.
                h.ref_bit(new)?.store(0, Ordering::Relaxed);
                h.state(new)?.store(LIVE, Ordering::Release);
                Ok(())
            };
            if let Err(e) = fill() {
                let _ = h.push_free(new);
                return Err(e);
            }
            return match existing {
                Some((old, prev)) => {
                    h.next(new)?
                        .store(h.next(old)?.load(Ordering::Acquire), Ordering::Release);
                    prev.store(new, Ordering::Release);
                    h.push_free(old)?;
                    Ok(false)
                }
                None => {
                    let head = h.bucket_head(b)?;
                    h.next(new)?
                        .store(head.load(Ordering::Acquire), Ordering::Release);
                    head.store(new, Ordering::Release);
                    Ok(true)
                }
            };
        }
    }
    Err(MapError::TooBig)
}

/// Removes `key`; with `out`, copies its value first (syscall-side layout).
pub(crate) fn delete(map: &Map, key: &[u8], out: Option<&mut [u8]>) -> Result<(), MapError> {
    let h = H::new(map);
    let hv = hash_key(map.seed, key);
    let b = hv & h.mask;
    let _g = lock::lock(h.bucket_lock(b)?);
    let Some((i, prev)) = h.find_locked(b, hv, key)? else {
        return Err(MapError::NotFound);
    };
    if let Some(out) = out {
        h.read_value(i, out)?;
    }
    prev.store(h.next(i)?.load(Ordering::Acquire), Ordering::Release);
    h.push_free(i)
}

pub(crate) fn next_key(map: &Map, key: Option<&[u8]>, out: &mut [u8]) -> Result<(), MapError> {
    let h = H::new(map);
    let seg = h.seg();
    // Position after `key` within its bucket, if it is present.
    let mut start_bucket = 0;
    if let Some(k) = key {
        let hv = hash_key(map.seed, k);
        let b = hv & h.mask;
        let _g = lock::lock(h.bucket_lock(b)?);
        if let Some((i, _)) = h.find_locked(b, hv, k)? {
            let next = h.next(i)?.load(Ordering::Acquire);
            if next & NULLS == 0 {
                seg.read(h.key_off(next)?, out).ok_or_else(corrupt)?;
                return Ok(());
            }
            start_bucket = b + 1;
            if b == h.mask {
                return Err(MapError::NotFound);
            }
        }
    }
    for b in start_bucket..=h.mask {
        let head = h.bucket_head(b)?.load(Ordering::Acquire);
        if head & NULLS == 0 {
            let _g = lock::lock(h.bucket_lock(b)?);
            let head = h.bucket_head(b)?.load(Ordering::Acquire);
            if head & NULLS == 0 {
                seg.read(h.key_off(head)?, out).ok_or_else(corrupt)?;
                return Ok(());
            }
        }
    }
    Err(MapError::NotFound)
}

/// Number of buckets (the batch cursor of `BPF_MAP_LOOKUP_BATCH` counts buckets).
pub(crate) fn bucket_count(map: &Map) -> u32 {
    n_buckets(&map.def) as u32
}

/// What [`drain_bucket`] found.
pub(crate) enum Drained {
    /// The bucket's elements as `(key, syscall-side value)`.
    Elems(Vec<(Vec<u8>, Vec<u8>)>),
    /// More elements than there was room for (nothing was copied or deleted).
    TooMany,
}

/// Copies out every element of bucket `b` as `(key, syscall-side value)`, deleting them if
/// `delete`, provided there are at most `room` — the unit `htab_map_lookup_batch` works in.
pub(crate) fn drain_bucket(
    map: &Map,
    b: u32,
    room: usize,
    delete: bool,
    value_len: usize,
) -> Result<Drained, MapError> {
    let h = H::new(map);
    if b > h.mask {
        return Err(MapError::NotFound);
    }
    if h.bucket_head(b)?.load(Ordering::Acquire) & NULLS != 0 {
        return Ok(Drained::Elems(Vec::new()));
    }
    let _g = lock::lock(h.bucket_lock(b)?);
    let mut elems = Vec::new();
    let mut link = h.bucket_head(b)?.load(Ordering::Acquire);
    for _ in 0..=map.def.max_entries {
        if link & NULLS != 0 {
            break;
        }
        elems.push(link);
        link = h.next(link)?.load(Ordering::Acquire);
    }
    if link & NULLS == 0 {
        return Err(corrupt());
    }
    if elems.len() > room {
        return Ok(Drained::TooMany);
    }
    let mut out = Vec::with_capacity(elems.len());
    for &i in &elems {
        let mut k = vec![0u8; map.def.key_size as usize];
        h.seg().read(h.key_off(i)?, &mut k).ok_or_else(corrupt)?;
        let mut v = vec![0u8; value_len];
        h.read_value(i, &mut v)?;
        out.push((k, v));
    }
    if delete {
        // Unlink the whole chain with one store, then free the elements.
        h.bucket_head(b)?.store(NULLS | b, Ordering::Release);
        for &i in &elems {
            h.push_free(i)?;
        }
    }
    Ok(Drained::Elems(out))
}

#[cfg(test)]
mod tests {
    use super::{hash_key, tail_word};

    #[test]
    fn the_tail_word_is_the_zero_padded_little_endian_word() {
        let bytes = [0x81u8, 0x02, 0xf3, 0x44, 0x05, 0xa6, 0x77];
        for n in 1..8 {
            let mut padded = [0u8; 8];
            padded[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(
                tail_word(&bytes[..n]),
                u64::from_le_bytes(padded),
                "{n} bytes"
            );
        }
    }
    use crate::map::{BPF_EXIST, BPF_NOEXIST, Map, MapDef, MapError};

    #[test]
    fn one_thread_fills_every_free_list_and_refills_after_deletes() {
        let p = std::env::temp_dir().join(format!(
            "bpftime-hash-lists-{}-{}",
            std::process::id(),
            crate::shm::monotonic_raw_ns()
        ));
        let s = std::sync::Arc::new(crate::Store::open(&p).unwrap());
        // Fewer elements than lists, and more: every element is reachable from any CPU.
        for n in [5u32, 100] {
            let def = MapDef {
                map_type: 1,
                key_size: 4,
                value_size: 8,
                max_entries: n,
                flags: 0,
            };
            let m = Map::create(&s, def, "h").unwrap();
            for round in 0..2 {
                for k in 0..n {
                    m.update(&k.to_ne_bytes(), &[round; 8], BPF_NOEXIST)
                        .unwrap();
                }
                assert!(matches!(
                    m.update(&n.to_ne_bytes(), &[0; 8], 0),
                    Err(MapError::TooBig)
                ));
                // Replacing a value takes a fresh element only if one is free: still works.
                m.update(&0u32.to_ne_bytes(), &[9; 8], BPF_EXIST).unwrap();
                // Deleting from another thread (another CPU's list, maybe) frees for everyone.
                std::thread::scope(|sc| {
                    sc.spawn(|| {
                        for k in 0..n {
                            m.delete(&k.to_ne_bytes()).unwrap();
                        }
                    });
                });
            }
        }
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn hash_depends_on_seed_and_every_byte() {
        let k = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        let base = hash_key(1, &k);
        assert_ne!(base, hash_key(2, &k));
        for i in 0..k.len() {
            let mut k2 = k;
            k2[i] ^= 1;
            assert_ne!(base, hash_key(1, &k2), "byte {i}");
        }
    }
}
