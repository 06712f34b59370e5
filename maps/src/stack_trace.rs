//! `BPF_MAP_TYPE_STACK_TRACE`, as `kernel/bpf/stackmap.c`: `bpf_get_stackid` hashes a stack
//! (instruction pointers) into one of `roundup_pow_of_two(max_entries)` buckets and returns the
//! bucket index as the stack id; the syscall side reads a bucket by id (the stack, zero-padded
//! to `value_size`), deletes it, and iterates the occupied ids.
//!
//! A bucket that holds another stack is kept (`EEXIST`) unless the caller passes
//! `BPF_F_REUSE_STACKID`; `BPF_F_FAST_STACK_CMP` trusts a matching hash without comparing the
//! frames. Walking the stack is the runtime's job (it has the program's context); this module
//! only stores frames.
//!
//! Data layout: buckets of `[lock: u64 | hash: u32 | nr: u32 | value_size bytes of frames]`.
//! A bucket changes under its robust lock, with `nr` cleared first and set last, so a writer
//! killed mid-way leaves an empty bucket rather than a torn stack.

use crate::lock;
use crate::map::{Map, MapDef, MapError, round8};
use crate::store::StoreError;
use std::sync::atomic::{AtomicU32, Ordering};

/// `sysctl_perf_event_max_stack` (default 127): the deepest stack a value may hold.
pub const MAX_STACK: u32 = 127;
/// `sizeof(struct bpf_stack_build_id)`.
const BUILD_ID_LEN: u32 = 32;
const HDR: u64 = 16;

/// `BPF_F_REUSE_STACKID`: replace the stack in an occupied bucket.
pub const BPF_F_REUSE_STACKID: u64 = 1 << 10;
/// `BPF_F_FAST_STACK_CMP`: a matching hash is enough.
pub const BPF_F_FAST_STACK_CMP: u64 = 1 << 9;

fn n_buckets(def: &MapDef) -> u64 {
    u64::from(def.max_entries).next_power_of_two()
}

fn bucket_len(def: &MapDef) -> u64 {
    HDR + round8(def.value_size)
}

pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    let vs = def.value_size;
    if def.key_size != 4 || vs < 8 || !vs.is_multiple_of(8) {
        return Err(MapError::BadDefinition {
            what: "stack trace maps need key_size 4 and value_size a multiple of 8",
        });
    }
    let frames = if def.flags & crate::map::BPF_F_STACK_BUILD_ID != 0 {
        if !vs.is_multiple_of(BUILD_ID_LEN) {
            return Err(MapError::BadDefinition {
                what: "build-id stack values are multiples of 32 bytes",
            });
        }
        vs / BUILD_ID_LEN
    } else {
        vs / 8
    };
    if frames > MAX_STACK {
        return Err(MapError::BadDefinition {
            what: "deeper than perf_event_max_stack",
        });
    }
    if def.max_entries > 1 << 31 {
        return Err(MapError::TooBig);
    }
    n_buckets(def)
        .checked_mul(bucket_len(def))
        .filter(|&l| l <= 1 << 40)
        .ok_or(MapError::TooBig)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt {
        what: "stack trace map",
    })
}

struct B<'a> {
    map: &'a Map,
    off: u64,
}

impl<'a> B<'a> {
    fn new(map: &'a Map, id: u32) -> Option<Self> {
        (u64::from(id) < n_buckets(&map.def)).then(|| B {
            map,
            off: map.data_off + u64::from(id) * bucket_len(&map.def),
        })
    }
    fn lock(&self) -> Result<lock::Guard<'a>, MapError> {
        let w = self
            .map
            .store
            .segment()
            .atomic_u64(self.off)
            .ok_or_else(corrupt)?;
        Ok(lock::lock(w))
    }
    fn hash(&self) -> Result<&'a AtomicU32, MapError> {
        self.map
            .store
            .segment()
            .atomic_u32(self.off + 8)
            .ok_or_else(corrupt)
    }
    fn nr(&self) -> Result<&'a AtomicU32, MapError> {
        self.map
            .store
            .segment()
            .atomic_u32(self.off + 12)
            .ok_or_else(corrupt)
    }
    /// The frames stored (at most the value's capacity, whatever `nr` says).
    fn frames(&self) -> Result<Vec<u8>, MapError> {
        let cap = self.map.def.value_size / 8;
        let nr = self.nr()?.load(Ordering::Acquire).min(cap);
        let mut b = vec![0u8; nr as usize * 8];
        self.map
            .store
            .segment()
            .read(self.off + HDR, &mut b)
            .ok_or_else(corrupt)?;
        Ok(b)
    }
}

fn hash_ips(ips: &[u64]) -> u32 {
    let bytes: Vec<u8> = ips.iter().flat_map(|ip| ip.to_ne_bytes()).collect();
    crate::hash::hash_key(0, &bytes)
}

/// `bpf_get_stackid`'s storage half: the id of the bucket holding `ips` (innermost frame
/// first, already cut to the value's capacity). `flags` may hold `BPF_F_REUSE_STACKID` and
/// `BPF_F_FAST_STACK_CMP`.
pub(crate) fn stack_id(map: &Map, ips: &[u64], flags: u64) -> Result<u32, MapError> {
    let cap = (map.def.value_size / 8) as usize;
    let ips = &ips[..ips.len().min(cap)];
    let h = hash_ips(ips);
    let id = h & (n_buckets(&map.def) - 1) as u32;
    let b = B::new(map, id).ok_or_else(corrupt)?;
    let want: Vec<u8> = ips.iter().flat_map(|ip| ip.to_ne_bytes()).collect();
    let _g = b.lock()?;
    let nr = b.nr()?.load(Ordering::Acquire);
    if nr != 0 {
        let hash_matches = b.hash()?.load(Ordering::Acquire) == h;
        if hash_matches
            && (flags & BPF_F_FAST_STACK_CMP != 0
                || nr as usize == ips.len() && b.frames()? == want)
        {
            return Ok(id);
        }
        if flags & BPF_F_REUSE_STACKID == 0 {
            return Err(MapError::Exists);
        }
    }
    b.nr()?.store(0, Ordering::Release);
    map.store
        .segment()
        .write(b.off + HDR, &want)
        .ok_or_else(corrupt)?;
    b.hash()?.store(h, Ordering::Relaxed);
    b.nr()?.store(ips.len() as u32, Ordering::Release);
    Ok(id)
}

fn id_of(key: &[u8]) -> u32 {
    u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
}

/// `bpf_stackmap_extract`: the stack of id `key`, zero-padded to `value_size`, removed if
/// `delete` (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`).
pub(crate) fn extract(map: &Map, key: &[u8], out: &mut [u8], delete: bool) -> Result<(), MapError> {
    let b = B::new(map, id_of(key)).ok_or(MapError::NotFound)?;
    let _g = b.lock()?;
    if b.nr()?.load(Ordering::Acquire) == 0 {
        return Err(MapError::NotFound);
    }
    let f = b.frames()?;
    out.fill(0);
    out[..f.len()].copy_from_slice(&f);
    if delete {
        b.nr()?.store(0, Ordering::Release);
    }
    Ok(())
}

/// `stack_map_delete_elem`: `E2BIG` past the buckets, `ENOENT` for an empty one.
pub(crate) fn delete(map: &Map, key: &[u8]) -> Result<(), MapError> {
    let b = B::new(map, id_of(key)).ok_or(MapError::TooBig)?;
    let _g = b.lock()?;
    if b.nr()?.swap(0, Ordering::AcqRel) == 0 {
        return Err(MapError::NotFound);
    }
    Ok(())
}

/// `stack_map_get_next_key`: the next occupied id after `key` (from 0 when `key` is absent,
/// out of range or empty).
pub(crate) fn next_key(map: &Map, key: Option<&[u8]>, out: &mut [u8]) -> Result<(), MapError> {
    let n = n_buckets(&map.def) as u32;
    let occupied = |id: u32| -> Result<bool, MapError> {
        Ok(B::new(map, id)
            .ok_or_else(corrupt)?
            .nr()?
            .load(Ordering::Acquire)
            != 0)
    };
    let mut id = match key.map(id_of) {
        Some(k) if k < n && occupied(k)? => k + 1,
        _ => 0,
    };
    while id < n && !occupied(id)? {
        id += 1;
    }
    if id >= n {
        return Err(MapError::NotFound);
    }
    out.copy_from_slice(&id.to_ne_bytes());
    Ok(())
}
