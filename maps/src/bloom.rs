//! `BPF_MAP_TYPE_BLOOM_FILTER`, as `kernel/bpf/bloom_filter.c`: `key_size` 0, values are
//! pushed (`bpf_map_push_elem`, or `BPF_MAP_UPDATE_ELEM` with a NULL key) and tested
//! (`bpf_map_peek_elem`, or `BPF_MAP_LOOKUP_ELEM`: `ENOENT` when definitely absent). The low 4
//! bits of `map_extra` give the number of hash functions (5 when 0).
//!
//! Sizing follows the kernel: `max_entries × hashes × 7 / 5` bits (≈ `n·k / ln 2`), rounded up
//! to a power of two (at least 64), capped at 2³² bits. Bits are set with atomic `fetch_or` on
//! 64-bit words, so pushes from any number of processes need no lock and a killed pusher
//! leaves at most some of its bits set (a false positive, never a false negative for values
//! whose push completed).

use crate::map::{BPF_ANY, Map, MapDef, MapError};
use crate::store::StoreError;
use std::sync::atomic::Ordering;

/// Hash functions when `map_extra` says 0.
pub const DEFAULT_HASHES: u32 = 5;
/// The bits of `map_extra` that may be set (the number of hash functions).
const HASHES_MASK: u64 = 0xf;

/// Number of hash functions for `map_extra` (validated by [`check_def`]).
pub(crate) fn hashes(map_extra: u64) -> u32 {
    match (map_extra & HASHES_MASK) as u32 {
        0 => DEFAULT_HASHES,
        n => n,
    }
}

/// The bit mask (bit count − 1) of the filter.
fn bit_mask(def: &MapDef, map_extra: u64) -> u64 {
    let k = hashes(map_extra);
    let bits = def
        .max_entries
        .checked_mul(k)
        .and_then(|b| (b / 5).checked_mul(7))
        .filter(|&b| b <= 1 << 31);
    match bits {
        None => u64::from(u32::MAX),
        Some(b) if b <= 64 => 63,
        Some(b) => u64::from(b).next_power_of_two() - 1,
    }
}

pub(crate) fn check_def(def: &MapDef, map_extra: u64) -> Result<u64, MapError> {
    if def.key_size != 0 || def.value_size == 0 || def.max_entries == 0 {
        return Err(MapError::BadDefinition {
            what: "bloom filters need key_size 0 and non-zero value_size, max_entries",
        });
    }
    if map_extra & !HASHES_MASK != 0 {
        return Err(MapError::BadDefinition {
            what: "map_extra of a bloom filter is the number of hash functions (0-15)",
        });
    }
    if u64::from(def.value_size) > crate::map::KMALLOC_MAX_SIZE {
        return Err(MapError::TooBig);
    }
    // Whole 64-bit words.
    Ok((bit_mask(def, map_extra) + 1).div_ceil(64) * 8)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt {
        what: "bloom filter",
    })
}

/// The bit of hash function `i` for `value` (the kernel's `jhash(value, size, seed + i)`,
/// with this crate's hash).
fn bit(map: &Map, value: &[u8], i: u32) -> u64 {
    let h = crate::hash::hash_key(map.seed.wrapping_add(u64::from(i)), value);
    u64::from(h) & bit_mask(&map.def, map.map_extra)
}

fn word(map: &Map, bit: u64) -> Result<&std::sync::atomic::AtomicU64, MapError> {
    map.store
        .segment()
        .atomic_u64(map.data_off + bit / 64 * 8)
        .ok_or_else(corrupt)
}

/// `bloom_map_push_elem`: flags must be `BPF_ANY`.
pub(crate) fn push(map: &Map, value: &[u8], flags: u64) -> Result<(), MapError> {
    if flags != BPF_ANY {
        return Err(MapError::InvalidFlags { flags });
    }
    for i in 0..hashes(map.map_extra) {
        let b = bit(map, value, i);
        let w = word(map, b)?;
        let m = 1u64 << (b % 64);
        if w.load(Ordering::Relaxed) & m == 0 {
            w.fetch_or(m, Ordering::Release);
        }
    }
    Ok(())
}

/// `bloom_map_peek_elem`: `Ok` if `value` may be present, `ENOENT` if it is not.
pub(crate) fn peek(map: &Map, value: &[u8]) -> Result<(), MapError> {
    for i in 0..hashes(map.map_extra) {
        let b = bit(map, value, i);
        if word(map, b)?.load(Ordering::Acquire) & (1 << (b % 64)) == 0 {
            return Err(MapError::NotFound);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(max: u32) -> MapDef {
        MapDef {
            map_type: 30,
            key_size: 0,
            value_size: 4,
            max_entries: max,
            flags: 0,
        }
    }

    #[test]
    fn sizes_follow_the_kernel() {
        assert_eq!(bit_mask(&d(1), 0), 63, "at least one long");
        // 1000 × 5 / 5 × 7 = 7000 bits → 8192.
        assert_eq!(bit_mask(&d(1000), 0), 8191);
        assert_eq!(bit_mask(&d(500), 3), 4095, "2100 → 4096");
        assert_eq!(bit_mask(&d(u32::MAX), 0), u64::from(u32::MAX));
        assert_eq!(check_def(&d(1000), 0).unwrap(), 1024);
        assert!(check_def(&d(10), 16).is_err());
    }
}
