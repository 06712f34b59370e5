//! `BPF_MAP_TYPE_ARRAY`: `max_entries` values of `round_up(value_size, 8)` bytes, contiguous
//! and page-aligned (so `BPF_F_MMAPABLE` arrays, `.bss` and `.rodata` can be mmapped by the
//! loader straight from the store file). Keys are `u32` indexes; every element always exists.
//! No locks: like the kernel, a value update is a plain copy and concurrent readers may see a
//! partly written value.

use crate::map::{BPF_NOEXIST, Map, MapDef, MapError, check_update_flags, round8};
use crate::store::StoreError;

pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.key_size != 4 {
        return Err(MapError::BadDefinition {
            what: "array maps need key_size 4",
        });
    }
    let len = round8(def.value_size)
        .checked_mul(u64::from(def.max_entries))
        .filter(|&l| l <= u64::from(u32::MAX))
        .ok_or(MapError::TooBig)?;
    // Whole pages, so the data can be mmapped.
    Ok(len.div_ceil(4096) * 4096)
}

fn index(key: &[u8]) -> u32 {
    u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
}

fn value_off(map: &Map, i: u32) -> u64 {
    map.data_off + u64::from(i) * round8(map.def.value_size)
}

pub(crate) fn lookup(map: &Map, key: &[u8]) -> Result<u64, MapError> {
    let i = index(key);
    if i >= map.def.max_entries {
        return Err(MapError::NotFound);
    }
    Ok(value_off(map, i))
}

pub(crate) fn update(map: &Map, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
    let op = check_update_flags(flags)?;
    let i = index(key);
    if i >= map.def.max_entries {
        return Err(MapError::TooBig);
    }
    if op == BPF_NOEXIST {
        return Err(MapError::Exists);
    }
    map.store
        .segment()
        .write(value_off(map, i), value)
        .ok_or(MapError::Store(StoreError::Corrupt { what: "array" }))
}

pub(crate) fn next_key(map: &Map, key: Option<&[u8]>, out: &mut [u8]) -> Result<(), MapError> {
    let next = match key.map(index) {
        Some(i) if i < map.def.max_entries => {
            if i + 1 == map.def.max_entries {
                return Err(MapError::NotFound);
            }
            i + 1
        }
        _ => 0,
    };
    out.copy_from_slice(&next.to_ne_bytes());
    Ok(())
}
