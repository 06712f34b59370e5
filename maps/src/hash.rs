//! `BPF_MAP_TYPE_HASH`, preallocated like the kernel's default.
//!
//! Data layout: `n_buckets` (a power of two ≥ `max_entries`) buckets of 16 bytes
//! `[lock: u64 | head: u32 | pad]`, then `max_entries` elements of
//! `[next: u32 | hash: u32 | state: u32 | pad | key (8-rounded) | value (8-rounded)]`.
//! Free elements sit on a lock-free stack (Treiber) whose head is a tagged
//! `(tag << 32) | index` word in the map metadata.
//!
//! Links are element indexes; a chain ends in a *nulls* marker `NULLS | bucket` (as the kernel's
//! `hlist_nulls`), and the free stack ends in `FREE_END`. Lookups take no lock: a reader that
//! follows an element which was deleted and reused elsewhere ends on a foreign marker and
//! restarts. Updates and deletes take the bucket's robust lock ([`crate::lock`]) and change a
//! chain only by single atomic stores of fully written elements, so a writer killed at any
//! point leaves every chain intact (at worst one element leaks).

use crate::lock;
use crate::map::{BPF_EXIST, BPF_NOEXIST, Map, MapDef, MapError, check_update_flags, meta, round8};
use crate::store::StoreError;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const NULLS: u32 = 0x8000_0000;
const FREE_END: u32 = u32::MAX;
const BUCKET_LEN: u64 = 16;
const ELEM_HDR: u64 = 16;
const LIVE: u32 = 1;
const DEAD: u32 = 0;
const MAX_RESTARTS: usize = 16;

fn n_buckets(def: &MapDef) -> u64 {
    u64::from(def.max_entries).next_power_of_two()
}

fn elem_len(def: &MapDef) -> u64 {
    ELEM_HDR + round8(def.key_size) + round8(def.value_size)
}

pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.key_size > crate::map::MAX_KEY_SIZE {
        return Err(MapError::TooBig);
    }
    if def.value_size > crate::map::MAX_VALUE_SIZE {
        return Err(MapError::TooBig);
    }
    if def.max_entries >= NULLS {
        return Err(MapError::TooBig);
    }
    n_buckets(def)
        .checked_mul(BUCKET_LEN)
        .and_then(|b| {
            elem_len(def)
                .checked_mul(u64::from(def.max_entries))
                .and_then(|e| e.checked_add(b))
        })
        .ok_or(MapError::TooBig)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt { what: "hash map" })
}

/// Geometry of one open hash map.
struct H<'a> {
    map: &'a Map,
    mask: u32,
    elems_off: u64,
    elem_len: u64,
}

impl<'a> H<'a> {
    fn new(map: &'a Map) -> Self {
        let nb = n_buckets(&map.def);
        H {
            map,
            mask: (nb - 1) as u32,
            elems_off: map.data_off + nb * BUCKET_LEN,
            elem_len: elem_len(&map.def),
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
    fn key_off(&self, i: u32) -> Result<u64, MapError> {
        Ok(self.elem(i)? + ELEM_HDR)
    }
    fn value_off(&self, i: u32) -> Result<u64, MapError> {
        Ok(self.elem(i)? + ELEM_HDR + round8(self.map.def.key_size))
    }
    fn freelist(&self) -> Result<&'a AtomicU64, MapError> {
        self.seg()
            .atomic_u64(self.map.meta_off + meta::FREELIST)
            .ok_or_else(corrupt)
    }
    fn key_eq(&self, i: u32, key: &[u8]) -> Result<bool, MapError> {
        self.seg()
            .bytes_eq(self.key_off(i)?, key)
            .ok_or_else(corrupt)
    }

    fn pop_free(&self) -> Result<Option<u32>, MapError> {
        let head = self.freelist()?;
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

    fn push_free(&self, idx: u32) -> Result<(), MapError> {
        let head = self.freelist()?;
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
                if self.hash_field(link)?.load(Ordering::Acquire) == h
                    && self.state(link)?.load(Ordering::Acquire) == LIVE
                    && self.key_eq(link, key)?
                {
                    return Ok(Some(link));
                }
                link = self.next(link)?.load(Ordering::Acquire);
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
}

/// The hash of a key: a multiply–rotate mix over 8-byte words, seeded per map.
fn hash_key(seed: u64, key: &[u8]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (key.len() as u64).wrapping_mul(K);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 32;
    h = h.wrapping_mul(K);
    (h >> 32) as u32
}

/// Links every element into the free stack and empties every bucket.
pub(crate) fn init(map: &Map) -> Result<(), MapError> {
    let h = H::new(map);
    for b in 0..=h.mask {
        h.bucket_head(b)?.store(NULLS | b, Ordering::Relaxed);
    }
    let n = map.def.max_entries;
    for i in 0..n {
        let next = if i + 1 < n { i + 1 } else { FREE_END };
        h.next(i)?.store(next, Ordering::Relaxed);
    }
    h.freelist()?.store(0, Ordering::Release); // tag 0, head = element 0
    Ok(())
}

pub(crate) fn lookup(map: &Map, key: &[u8]) -> Result<u64, MapError> {
    let h = H::new(map);
    let hv = hash_key(map.seed, key);
    match h.find(hv & h.mask, hv, key)? {
        Some(i) => h.value_off(i),
        None => Err(MapError::NotFound),
    }
}

pub(crate) fn update(map: &Map, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
    let op = check_update_flags(flags)?;
    let h = H::new(map);
    let hv = hash_key(map.seed, key);
    let b = hv & h.mask;
    let _g = lock::lock(h.bucket_lock(b)?);
    let existing = h.find_locked(b, hv, key)?;
    match (existing, op) {
        (Some(_), BPF_NOEXIST) => return Err(MapError::Exists),
        (None, BPF_EXIST) => return Err(MapError::NotFound),
        _ => {}
    }
    // Fill a fresh element completely before linking it (readers never see it half-written).
    let new = h.pop_free()?.ok_or(MapError::TooBig)?;
    let seg = h.seg();
    let fill = || -> Result<(), MapError> {
        seg.write(h.key_off(new)?, key).ok_or_else(corrupt)?;
        seg.write(h.value_off(new)?, value).ok_or_else(corrupt)?;
        h.hash_field(new)?.store(hv, Ordering::Relaxed);
        h.state(new)?.store(LIVE, Ordering::Release);
        Ok(())
    };
    if let Err(e) = fill() {
        let _ = h.push_free(new);
        return Err(e);
    }
    match existing {
        Some((old, prev)) => {
            h.next(new)?
                .store(h.next(old)?.load(Ordering::Acquire), Ordering::Release);
            prev.store(new, Ordering::Release);
            h.push_free(old)?;
        }
        None => {
            let head = h.bucket_head(b)?;
            h.next(new)?
                .store(head.load(Ordering::Acquire), Ordering::Release);
            head.store(new, Ordering::Release);
        }
    }
    Ok(())
}

pub(crate) fn delete(map: &Map, key: &[u8]) -> Result<(), MapError> {
    let h = H::new(map);
    let hv = hash_key(map.seed, key);
    let b = hv & h.mask;
    let _g = lock::lock(h.bucket_lock(b)?);
    let Some((i, prev)) = h.find_locked(b, hv, key)? else {
        return Err(MapError::NotFound);
    };
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

#[cfg(test)]
mod tests {
    use super::hash_key;

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
