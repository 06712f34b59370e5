//! Maps of maps: `BPF_MAP_TYPE_ARRAY_OF_MAPS` (storage in [`crate::prog_array`]) and
//! `BPF_MAP_TYPE_HASH_OF_MAPS` (a [`crate::hash`] table whose values are map ids), as
//! `kernel/bpf/map_in_map.c`.
//!
//! At creation the kernel takes an *inner map template* from `inner_map_fd`: every map stored
//! later must match it (`bpf_map_meta_equal`: type, key and value size, flags; arrays also
//! `max_entries` unless the template has `BPF_F_INNER_MAP`), else `EINVAL`. Maps of maps do not
//! nest. The template's definition is kept in the outer map's metadata.
//!
//! Values are map ids on the syscall side (the caller turns fds into ids; lookups report ids)
//! and inner map handles on the program side (the runtime opens the id a lookup returns).
//! Like fd arrays, the outer map holds a reference on each inner map; updates and deletes hand
//! back the id they replaced so the caller can drop its reference.

use crate::hash::{self, Val};
use crate::map::{BPF_F_INNER_MAP, BPF_F_RDONLY, BPF_F_WRONLY, Map, MapDef, MapError, MapType};
use crate::store::Store;
use std::sync::Arc;

/// The template for an outer map from inner map `id` (which must exist and not be a map of
/// maps).
pub(crate) fn template(store: &Arc<Store>, id: u32) -> Result<MapDef, MapError> {
    let inner = Map::open(store, id).map_err(|_| MapError::BadDefinition {
        what: "inner_map_fd is not a map",
    })?;
    match MapType::try_from(inner.def.map_type)? {
        MapType::ArrayOfMaps | MapType::HashOfMaps => Err(MapError::BadDefinition {
            what: "maps of maps do not nest",
        }),
        _ => Ok(inner.def),
    }
}

/// `map_meta_equal`: whether `inner` may be stored in an outer map with template `t`.
pub(crate) fn compatible(t: &MapDef, inner: &MapDef) -> bool {
    // BPF_F_RDONLY/WRONLY belong to fds, not maps (`bpf_map_flags_retain_permanent`).
    let fd_flags = BPF_F_RDONLY | BPF_F_WRONLY;
    t.map_type == inner.map_type
        && t.key_size == inner.key_size
        && t.value_size == inner.value_size
        && t.flags & !fd_flags == inner.flags & !fd_flags
        && (t.map_type != MapType::Array as u32
            || t.flags & BPF_F_INNER_MAP != 0
            || t.max_entries == inner.max_entries)
}

pub(crate) fn check_def(def: &MapDef, nr_cpus: u32) -> Result<u64, MapError> {
    if def.value_size != 4 {
        return Err(MapError::BadDefinition {
            what: "maps of maps hold 4-byte map fds",
        });
    }
    match MapType::try_from(def.map_type)? {
        MapType::ArrayOfMaps => crate::prog_array::check_def(def),
        _ => hash::check_def(def, nr_cpus),
    }
}

/// Hash of maps: the inner map id at `key`.
pub(crate) fn hash_get(map: &Map, key: &[u8]) -> Result<u32, MapError> {
    let mut v = [0u8; 4];
    hash::lookup_copy(map, key, &mut v)?;
    Ok(u32::from_ne_bytes(v))
}

/// Hash of maps: stores `id` at `key`, returning the id it replaced.
pub(crate) fn hash_set(
    map: &Map,
    key: &[u8],
    id: u32,
    flags: u64,
) -> Result<Option<u32>, MapError> {
    let mut old = [0u8; 4];
    let new = hash::update_swap(
        map,
        key,
        Val::Plain(&id.to_ne_bytes()),
        flags,
        Some(&mut old),
    )?;
    Ok((!new).then(|| u32::from_ne_bytes(old)))
}

/// Hash of maps: removes `key`, returning the id it held.
pub(crate) fn hash_take(map: &Map, key: &[u8]) -> Result<u32, MapError> {
    let mut old = [0u8; 4];
    hash::delete(map, key, Some(&mut old))?;
    Ok(u32::from_ne_bytes(old))
}

/// Hash of maps: every inner map id.
pub(crate) fn hash_ids(map: &Map) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; map.def.key_size as usize];
    for _ in 0..map.def.max_entries {
        if hash::next_key(map, key.as_deref(), &mut next).is_err() {
            break;
        }
        if let Ok(id) = hash_get(map, &next) {
            ids.push(id);
        }
        key = Some(next.clone());
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(t: u32, max: u32, flags: u32) -> MapDef {
        MapDef {
            map_type: t,
            key_size: 4,
            value_size: 8,
            max_entries: max,
            flags,
        }
    }

    #[test]
    fn templates_compare_like_map_meta_equal() {
        assert!(
            compatible(&d(1, 10, 0), &d(1, 99, 0)),
            "hash: max_entries free"
        );
        assert!(
            !compatible(&d(2, 10, 0), &d(2, 99, 0)),
            "array: max_entries fixed"
        );
        assert!(compatible(
            &d(2, 10, BPF_F_INNER_MAP),
            &d(2, 99, BPF_F_INNER_MAP)
        ));
        assert!(!compatible(&d(1, 10, 0), &d(5, 10, 0)));
        assert!(!compatible(&d(1, 10, 0), &d(1, 10, 1)), "flags");
        assert!(
            compatible(&d(1, 10, 0), &d(1, 10, BPF_F_RDONLY)),
            "fd flags ignored"
        );
    }
}
