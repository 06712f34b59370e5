//! Arrays of object ids: `BPF_MAP_TYPE_PROG_ARRAY` (program ids, for `bpf_tail_call`) and the
//! storage of `BPF_MAP_TYPE_ARRAY_OF_MAPS` (map ids), as the kernel's fd arrays
//! (`kernel/bpf/arraymap.c`, `bpf_fd_array_map_update_elem`): the syscall side writes fds,
//! which the caller turns into object ids; lookups return ids (what the kernel reports, as
//! `map_fd_sys_lookup_elem` does); 0 is an empty slot.
//!
//! The map holds a reference on each object it names. This module swaps ids with single
//! atomic exchanges and hands back the replaced id, so the caller (who took a reference on
//! the new id) drops exactly one reference on the old one, even with concurrent writers.
//!
//! Data layout: `max_entries` × `u32`.

use crate::map::{BPF_ANY, Map, MapDef, MapError};
use crate::store::StoreError;
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.key_size != 4 || def.value_size != 4 {
        return Err(MapError::BadDefinition {
            what: "fd arrays need key_size 4 and value_size 4",
        });
    }
    Ok((u64::from(def.max_entries) * 4).div_ceil(64) * 64)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt { what: "fd array" })
}

fn index(key: &[u8]) -> u32 {
    u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
}

fn slot(map: &Map, i: u32) -> Result<&AtomicU32, MapError> {
    map.store
        .segment()
        .atomic_u32(map.data_off + u64::from(i) * 4)
        .ok_or_else(corrupt)
}

/// The id at `key`; `ENOENT` when empty or out of range.
pub(crate) fn get(map: &Map, key: &[u8]) -> Result<u32, MapError> {
    let i = index(key);
    if i >= map.def.max_entries {
        return Err(MapError::NotFound);
    }
    match slot(map, i)?.load(Ordering::Acquire) {
        0 => Err(MapError::NotFound),
        id => Ok(id),
    }
}

/// Stores `id` at `key`, returning the id it replaced. Flags must be `BPF_ANY`; an index past
/// the end is `E2BIG` (checked before anything else, as the kernel does).
pub(crate) fn set(map: &Map, key: &[u8], id: u32, flags: u64) -> Result<Option<u32>, MapError> {
    check_set(map, key, flags)?;
    let old = slot(map, index(key))?.swap(id, Ordering::AcqRel);
    Ok((old != 0).then_some(old))
}

/// The checks [`set`] makes before looking at the new value.
pub(crate) fn check_set(map: &Map, key: &[u8], flags: u64) -> Result<(), MapError> {
    if flags != BPF_ANY {
        return Err(MapError::InvalidFlags { flags });
    }
    if index(key) >= map.def.max_entries {
        return Err(MapError::TooBig);
    }
    Ok(())
}

/// Empties `key`, returning the id it held (`E2BIG` past the end, `ENOENT` when empty).
pub(crate) fn take(map: &Map, key: &[u8]) -> Result<u32, MapError> {
    let i = index(key);
    if i >= map.def.max_entries {
        return Err(MapError::TooBig);
    }
    match slot(map, i)?.swap(0, Ordering::AcqRel) {
        0 => Err(MapError::NotFound),
        id => Ok(id),
    }
}

/// Every id stored (for releasing them with the map).
pub(crate) fn ids(map: &Map) -> Vec<u32> {
    (0..map.def.max_entries)
        .filter_map(|i| slot(map, i).ok().map(|s| s.load(Ordering::Acquire)))
        .filter(|&id| id != 0)
        .collect()
}
