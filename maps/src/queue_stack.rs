//! `BPF_MAP_TYPE_QUEUE` (FIFO) and `BPF_MAP_TYPE_STACK` (LIFO), as `kernel/bpf/queue_stack_maps.c`:
//! a ring of `max_entries + 1` slots with `head` (next free slot) and `tail` (oldest element)
//! indexes, under one lock. `key_size` is 0; programs use `bpf_map_push_elem`,
//! `bpf_map_pop_elem` and `bpf_map_peek_elem`; the syscall side maps `BPF_MAP_UPDATE_ELEM` to
//! push, `BPF_MAP_LOOKUP_ELEM` to peek and `BPF_MAP_LOOKUP_AND_DELETE_ELEM` to pop.
//!
//! Data layout: `[lock: u64 | head: u32 | tail: u32 | pad to 64]`, then the slots
//! (`round_up(value_size, 8)` bytes each). The lock is the robust [`crate::lock`]; every
//! operation publishes with single stores of `head`/`tail` after the slot is written, so a
//! holder killed at any point leaves a consistent ring (a push with `BPF_EXIST` on a full ring
//! killed between its two stores drops the oldest element without adding its own).

use crate::lock;
use crate::map::{BPF_EXIST, BPF_NOEXIST, Map, MapDef, MapError, round8};
use crate::store::StoreError;
use std::sync::atomic::{AtomicU32, Ordering};

const HDR: u64 = 64;

pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.key_size != 0 || def.value_size == 0 || def.max_entries == 0 {
        return Err(MapError::BadDefinition {
            what: "queue/stack maps need key_size 0 and non-zero value_size, max_entries",
        });
    }
    if u64::from(def.value_size) > crate::map::KMALLOC_MAX_SIZE {
        return Err(MapError::TooBig);
    }
    (u64::from(def.max_entries) + 1)
        .checked_mul(round8(def.value_size))
        .and_then(|l| l.checked_add(HDR))
        .filter(|&l| l <= 1 << 40)
        .ok_or(MapError::TooBig)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt { what: "queue map" })
}

struct Q<'a> {
    map: &'a Map,
    size: u32,
    stack: bool,
}

impl<'a> Q<'a> {
    fn new(map: &'a Map) -> Self {
        Q {
            map,
            size: map.def.max_entries + 1,
            stack: map.def.map_type == crate::map::MapType::Stack as u32,
        }
    }
    fn word(&self, off: u64) -> Result<&'a AtomicU32, MapError> {
        self.map
            .store
            .segment()
            .atomic_u32(self.map.data_off + off)
            .ok_or_else(corrupt)
    }
    fn head(&self) -> Result<&'a AtomicU32, MapError> {
        self.word(8)
    }
    fn tail(&self) -> Result<&'a AtomicU32, MapError> {
        self.word(12)
    }
    fn slot(&self, i: u32) -> u64 {
        self.map.data_off + HDR + u64::from(i) * round8(self.map.def.value_size)
    }
    /// `(head, tail)`, validated (another process may have scribbled on them).
    fn indexes(&self) -> Result<(u32, u32), MapError> {
        let h = self.head()?.load(Ordering::Acquire);
        let t = self.tail()?.load(Ordering::Acquire);
        if h >= self.size || t >= self.size {
            return Err(corrupt());
        }
        Ok((h, t))
    }
    fn next(&self, i: u32) -> u32 {
        if i + 1 >= self.size { 0 } else { i + 1 }
    }
    fn prev(&self, i: u32) -> u32 {
        if i == 0 { self.size - 1 } else { i - 1 }
    }
    fn lock(&self) -> Result<lock::Guard<'a>, MapError> {
        let w = self
            .map
            .store
            .segment()
            .atomic_u64(self.map.data_off)
            .ok_or_else(corrupt)?;
        Ok(lock::lock(w))
    }
}

/// `map_push_elem`: `BPF_EXIST` overwrites the oldest element when full, else `E2BIG`.
pub(crate) fn push(map: &Map, value: &[u8], flags: u64) -> Result<(), MapError> {
    if flags & BPF_NOEXIST != 0 || flags > BPF_EXIST {
        return Err(MapError::InvalidFlags { flags });
    }
    let q = Q::new(map);
    let _g = q.lock()?;
    let (h, t) = q.indexes()?;
    let full = q.next(h) == t;
    if full && flags & BPF_EXIST == 0 {
        return Err(MapError::TooBig);
    }
    // The slot at `head` is always free (the ring has one spare slot).
    map.store
        .segment()
        .write(q.slot(h), value)
        .ok_or_else(corrupt)?;
    if full {
        q.tail()?.store(q.next(t), Ordering::Release);
    }
    q.head()?.store(q.next(h), Ordering::Release);
    Ok(())
}

/// `map_pop_elem` (`delete`) or `map_peek_elem`: the oldest element of a queue, the newest of
/// a stack; `ENOENT` when empty.
pub(crate) fn take(map: &Map, out: &mut [u8], delete: bool) -> Result<(), MapError> {
    let q = Q::new(map);
    let _g = q.lock()?;
    let (h, t) = q.indexes()?;
    if h == t {
        return Err(MapError::NotFound);
    }
    let i = if q.stack { q.prev(h) } else { t };
    map.store
        .segment()
        .read(q.slot(i), out)
        .ok_or_else(corrupt)?;
    if delete {
        if q.stack {
            q.head()?.store(i, Ordering::Release);
        } else {
            q.tail()?.store(q.next(t), Ordering::Release);
        }
    }
    Ok(())
}
