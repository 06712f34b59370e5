//! `BPF_MAP_TYPE_LPM_TRIE`: longest-prefix match over `struct bpf_lpm_trie_key_u8`
//! (`u32 prefixlen` in host order, then `key_size - 4` bytes of data compared from the most
//! significant bit of the first byte), with the kernel's checks (`kernel/bpf/lpm_trie.c`):
//! `BPF_F_NO_PREALLOC` is required, `key_size` is 5..=260, a prefix longer than the data is
//! `EINVAL`, a full trie refuses new prefixes with `ENOSPC`.
//!
//! Not a trie here: the entries live in a [`crate::hash`] table keyed by the *normalized* key
//! (the prefix length and the data with every bit past the prefix cleared), and a bitmap
//! records which prefix lengths were ever inserted. A lookup probes the table once per
//! recorded length, longest first, never longer than the key's own prefix length; updates and
//! deletes are exact. So lookups take no lock and inherit the hash table's robustness; the bit
//! of a length is set before the first entry of that length is linked and never cleared (a
//! stale bit only costs a probe), so a killed writer cannot hide an entry.
//!
//! Differences from the kernel, all invisible unless a key has bits set past its prefix
//! length: such bits are dropped on update (the kernel keeps the last writer's bytes and
//! returns them from `BPF_MAP_GET_NEXT_KEY`). Iteration order is the hash table's, not the
//! kernel's post-order walk; every key is visited once.

use crate::hash::{self, Val};
use crate::map::{BPF_EXIST, BPF_F_NO_PREALLOC, Map, MapDef, MapError};
use crate::store::StoreError;
use std::sync::atomic::Ordering;

/// `LPM_KEY_SIZE_MIN`: a prefix length and one byte of data.
const KEY_MIN: u32 = 5;
/// `LPM_KEY_SIZE_MAX`: a prefix length and `LPM_DATA_SIZE_MAX` (256) bytes.
const KEY_MAX: u32 = 4 + 256;
/// The kernel's `LPM_VAL_SIZE_MAX` is about `KMALLOC_MAX_SIZE` (4 MiB).
const VALUE_MAX: u32 = (4 << 20) - KEY_MAX - 64;

fn max_prefixlen(def: &MapDef) -> u32 {
    (def.key_size - 4) * 8
}

/// Bytes of the prefix-length bitmap (`max_prefixlen + 1` bits, whole words).
fn bitmap_len(def: &MapDef) -> u64 {
    u64::from(max_prefixlen(def) + 1).div_ceil(64) * 8
}

pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.flags & BPF_F_NO_PREALLOC == 0 {
        return Err(MapError::BadDefinition {
            what: "LPM tries need BPF_F_NO_PREALLOC",
        });
    }
    if !(KEY_MIN..=KEY_MAX).contains(&def.key_size) || def.value_size == 0 {
        return Err(MapError::BadDefinition {
            what: "LPM trie key_size must be 5..=260 and value_size non-zero",
        });
    }
    if def.value_size > VALUE_MAX {
        return Err(MapError::BadDefinition {
            what: "LPM trie value too large",
        });
    }
    hash::check_def(def, 1)?
        .checked_add(bitmap_len(def))
        .ok_or(MapError::TooBig)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt { what: "LPM trie" })
}

fn prefixlen(key: &[u8]) -> u32 {
    u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
}

/// `key` with prefix length `plen` and every data bit past it cleared.
fn normalized(key: &[u8], plen: u32) -> Vec<u8> {
    let mut k = key.to_vec();
    k[..4].copy_from_slice(&plen.to_ne_bytes());
    for (i, b) in k[4..].iter_mut().enumerate() {
        let keep = plen.saturating_sub(i as u32 * 8).min(8);
        *b &= !(0xffu16 >> keep) as u8;
    }
    k
}

/// The bitmap word holding prefix length `plen`.
fn bitmap_word(map: &Map, plen: u32) -> Result<&std::sync::atomic::AtomicU64, MapError> {
    let hash_len = hash::check_def(&map.def, 1)?;
    map.store
        .segment()
        .atomic_u64(map.data_off + hash_len + u64::from(plen / 64) * 8)
        .ok_or_else(corrupt)
}

/// The stored key holding the longest prefix of `key`.
fn longest_match(map: &Map, key: &[u8]) -> Result<Vec<u8>, MapError> {
    let plen = prefixlen(key);
    let max = max_prefixlen(&map.def);
    if plen > max {
        return Err(MapError::NotFound);
    }
    let mut p = plen as i64;
    while p >= 0 {
        let w = bitmap_word(map, p as u32)?.load(Ordering::Acquire);
        // Candidate lengths in this word at or below `p`, longest first.
        let below = if p % 64 == 63 {
            w
        } else {
            w & ((1u64 << (p % 64 + 1)) - 1)
        };
        if below == 0 {
            p = p / 64 * 64 - 1;
            continue;
        }
        let top = 63 - below.leading_zeros() as i64;
        let cand = (p / 64 * 64 + top) as u32;
        let k = normalized(key, cand);
        match hash::lookup(map, &k) {
            Ok(_) => return Ok(k),
            Err(MapError::NotFound) => p = i64::from(cand) - 1,
            Err(e) => return Err(e),
        }
    }
    Err(MapError::NotFound)
}

/// Longest-prefix lookup (`trie_lookup_elem`): the value's offset.
pub(crate) fn lookup(map: &Map, key: &[u8]) -> Result<u64, MapError> {
    let k = longest_match(map, key)?;
    hash::lookup(map, &k)
}

/// Longest-prefix lookup, copying the value (`BPF_MAP_LOOKUP_ELEM`).
pub(crate) fn lookup_copy(map: &Map, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
    // The entry may go between the match and the copy; retry the match then.
    for _ in 0..8 {
        let k = longest_match(map, key)?;
        match hash::lookup_copy(map, &k, out) {
            Err(MapError::NotFound) => continue,
            r => return r,
        }
    }
    Err(MapError::NotFound)
}

/// `trie_update_elem`: exact prefix; `ENOSPC` when full.
pub(crate) fn update(map: &Map, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
    if flags > BPF_EXIST {
        return Err(MapError::InvalidFlags { flags });
    }
    let plen = prefixlen(key);
    if plen > max_prefixlen(&map.def) {
        return Err(MapError::BadDefinition {
            what: "prefix longer than the key",
        });
    }
    // Announce the length before an entry of that length can be found.
    let w = bitmap_word(map, plen)?;
    let bit = 1u64 << (plen % 64);
    if w.load(Ordering::Relaxed) & bit == 0 {
        w.fetch_or(bit, Ordering::AcqRel);
    }
    match hash::update(map, &normalized(key, plen), Val::Plain(value), flags) {
        Ok(_) => Ok(()),
        Err(MapError::TooBig) => Err(MapError::NoSpace),
        Err(e) => Err(e),
    }
}

/// `trie_delete_elem`: exact prefix.
pub(crate) fn delete(map: &Map, key: &[u8]) -> Result<(), MapError> {
    let plen = prefixlen(key);
    if plen > max_prefixlen(&map.def) {
        return Err(MapError::BadDefinition {
            what: "prefix longer than the key",
        });
    }
    hash::delete(map, &normalized(key, plen), None)
}

/// `trie_get_next_key`: every stored prefix once; an absent or invalid key starts over.
pub(crate) fn next_key(map: &Map, key: Option<&[u8]>, out: &mut [u8]) -> Result<(), MapError> {
    let start = key
        .filter(|k| prefixlen(k) <= max_prefixlen(&map.def))
        .map(|k| normalized(k, prefixlen(k)));
    hash::next_key(map, start.as_deref(), out)
}

#[cfg(test)]
mod tests {
    use super::normalized;

    #[test]
    fn bits_past_the_prefix_are_cleared() {
        let k = [0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(&normalized(&k, 0)[4..], &[0, 0, 0, 0]);
        assert_eq!(&normalized(&k, 12)[4..], &[0xff, 0xf0, 0, 0]);
        assert_eq!(&normalized(&k, 32)[4..], &[0xff; 4]);
        assert_eq!(&normalized(&k, 12)[..4], &12u32.to_ne_bytes());
    }
}
