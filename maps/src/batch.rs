//! `BPF_MAP_{LOOKUP,LOOKUP_AND_DELETE,UPDATE,DELETE}_BATCH`, with the kernel's algorithms
//! (`kernel/bpf/syscall.c` `generic_map_*_batch`, `kernel/bpf/hashtab.c`
//! `__htab_map_lookup_and_delete_batch`) and its per-type support (the `map_*_batch` ops each
//! type has; a missing one is `ENOTSUPP`, 524).
//!
//! - Hash tables walk whole buckets: the cursor (`in_batch`/`out_batch`) is a `u32` bucket
//!   index; a bucket is copied only if all of it fits in what is left of `count` (`ENOSPC` if
//!   not even the first bucket fits); after the last bucket the result is `ENOENT` together
//!   with the partial count.
//! - Other types follow `get_next_key`: the cursor is the last key returned, `out_batch` is
//!   written only when something was copied, and the walk ending is `ENOENT`.
//! - Updates and deletes apply element after element and stop at the first error, reporting
//!   how many succeeded.
//!
//! Everything here works on plain buffers; the syscall side copies them from and to the
//! loader and, for maps whose values are fds, turns each value into an object id.

use crate::hash;
use crate::map::{BPF_F_LOCK, Map, MapError, MapType};

/// Which batch command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOp {
    /// `BPF_MAP_LOOKUP_BATCH`
    Lookup,
    /// `BPF_MAP_LOOKUP_AND_DELETE_BATCH`
    LookupAndDelete,
    /// `BPF_MAP_UPDATE_BATCH`
    Update,
    /// `BPF_MAP_DELETE_BATCH`
    Delete,
}

/// What a lookup batch produced (what the kernel copies out, and its return value).
#[derive(Debug, Default)]
pub struct BatchLookup {
    /// `count` keys, back to back.
    pub keys: Vec<u8>,
    /// `count` syscall-side values, back to back.
    pub values: Vec<u8>,
    /// Elements copied (`batch.count` on return).
    pub count: u32,
    /// The cursor to write to `out_batch` (`None`: left untouched).
    pub out_batch: Option<Vec<u8>>,
    /// The command's error alongside the results (`ENOENT` when the walk ended, `ENOSPC`
    /// when the first bucket did not fit); `None` for success.
    pub err: Option<MapError>,
}

fn hash_family(ty: MapType) -> bool {
    matches!(
        ty,
        MapType::Hash
            | MapType::PercpuHash
            | MapType::LruHash
            | MapType::LruPercpuHash
            | MapType::HashOfMaps
    )
}

impl Map {
    /// Whether the kernel gives this map type the batch command `op`.
    pub fn supports_batch(&self, op: BatchOp) -> bool {
        let Ok(ty) = MapType::try_from(self.def.map_type) else {
            return false;
        };
        match op {
            BatchOp::LookupAndDelete => hash_family(ty),
            BatchOp::Lookup | BatchOp::Update => {
                hash_family(ty)
                    || matches!(ty, MapType::Array | MapType::PercpuArray | MapType::LpmTrie)
            }
            BatchOp::Delete => hash_family(ty) || ty == MapType::LpmTrie,
        }
    }

    /// Bytes of the `in_batch`/`out_batch` cursor: a bucket index for hash tables, a key
    /// otherwise.
    pub fn batch_cursor_len(&self) -> usize {
        match MapType::try_from(self.def.map_type) {
            Ok(ty) if hash_family(ty) => 4,
            _ => self.def.key_size as usize,
        }
    }

    /// The checks a batch command makes before it looks at `count` or the cursor: the type
    /// has the command (`ENOTSUPP`), `elem_flags` (only `BPF_F_LOCK`, which needs a spin lock
    /// in the value: `EINVAL` here), and for hash-table lookups `flags` must be 0.
    pub fn batch_precheck(&self, op: BatchOp, elem_flags: u64, flags: u64) -> Result<(), MapError> {
        if !self.supports_batch(op) {
            return Err(MapError::KernelNotSupported);
        }
        if elem_flags & !BPF_F_LOCK != 0 || elem_flags & BPF_F_LOCK != 0 {
            // BPF_F_LOCK needs a bpf_spin_lock in the value (BTF-typed values).
            return Err(MapError::InvalidFlags { flags: elem_flags });
        }
        let ty = MapType::try_from(self.def.map_type)?;
        if hash_family(ty) && matches!(op, BatchOp::Lookup | BatchOp::LookupAndDelete) && flags != 0
        {
            return Err(MapError::InvalidFlags { flags });
        }
        Ok(())
    }

    /// `BPF_MAP_LOOKUP_BATCH` / `BPF_MAP_LOOKUP_AND_DELETE_BATCH` for up to `count` elements
    /// after the cursor `in_batch` (`None`: from the start). `Err` is an error returned before
    /// anything was looked at (the kernel then leaves `count` as it was, or 0).
    pub fn lookup_batch(
        &self,
        in_batch: Option<&[u8]>,
        count: u32,
        elem_flags: u64,
        flags: u64,
        delete: bool,
    ) -> Result<BatchLookup, MapError> {
        let op = if delete {
            BatchOp::LookupAndDelete
        } else {
            BatchOp::Lookup
        };
        self.batch_precheck(op, elem_flags, flags)?;
        if self.kernel_id != 0 {
            let cursor = self.batch_cursor_len();
            return self
                .conn()?
                .lookup_batch(in_batch, cursor, count, elem_flags, flags, delete);
        }
        let ty = MapType::try_from(self.def.map_type)?;
        if hash_family(ty) {
            self.hash_batch(in_batch, count, delete)
        } else {
            self.generic_lookup_batch(in_batch, count)
        }
    }

    /// `__htab_map_lookup_and_delete_batch`.
    fn hash_batch(
        &self,
        in_batch: Option<&[u8]>,
        max: u32,
        delete: bool,
    ) -> Result<BatchLookup, MapError> {
        let mut out = BatchLookup::default();
        if max == 0 {
            return Ok(out);
        }
        let n = hash::bucket_count(self);
        let mut b = match in_batch {
            Some(c) => u32::from_ne_bytes(c.try_into().map_err(|_| MapError::Fault)?),
            None => 0,
        };
        if b >= n {
            return Err(MapError::NotFound);
        }
        let vlen = self.syscall_value_size();
        loop {
            let room = (max - out.count) as usize;
            match hash::drain_bucket(self, b, room, delete, vlen)? {
                hash::Drained::TooMany => {
                    // The bucket does not fit in what is left.
                    if out.count == 0 {
                        out.err = Some(MapError::NoSpace);
                    }
                    break;
                }
                hash::Drained::Elems(elems) => {
                    for (k, v) in &elems {
                        out.keys.extend_from_slice(k);
                        out.values.extend_from_slice(v);
                    }
                    out.count += elems.len() as u32;
                    b += 1;
                    if b >= n {
                        out.err = Some(MapError::NotFound);
                        break;
                    }
                }
            }
        }
        out.out_batch = Some(b.to_ne_bytes().to_vec());
        Ok(out)
    }

    /// `generic_map_lookup_batch`.
    fn generic_lookup_batch(
        &self,
        in_batch: Option<&[u8]>,
        max: u32,
    ) -> Result<BatchLookup, MapError> {
        let mut out = BatchLookup::default();
        if max == 0 {
            return Ok(out);
        }
        let ks = self.def.key_size as usize;
        let mut prev: Option<Vec<u8>> = match in_batch {
            Some(c) if c.len() == ks => Some(c.to_vec()),
            Some(_) => return Err(MapError::Fault),
            None => None,
        };
        let mut value = vec![0u8; self.syscall_value_size()];
        let mut key = vec![0u8; ks];
        while out.count < max {
            if let Err(e) = self.next_key(prev.as_deref(), &mut key) {
                out.err = Some(e);
                break;
            }
            match self.lookup(&key, &mut value) {
                Ok(()) => {
                    out.keys.extend_from_slice(&key);
                    out.values.extend_from_slice(&value);
                    out.count += 1;
                }
                // Deleted meanwhile: go on with the next key.
                Err(MapError::NotFound) => {}
                Err(e) => return Err(e),
            }
            prev = Some(key.clone());
        }
        if out.count > 0 {
            out.out_batch = prev;
        }
        Ok(out)
    }

    /// `generic_map_update_batch` / `generic_map_delete_batch`: applies `one` to each of
    /// `count` elements in turn (the caller reads key `i` at `keys[i * key_size..]` and value
    /// `i` at `values[i * syscall_value_size..]`), stopping at the first error. Returns how
    /// many succeeded and that error; `Err` is an error returned before the first element.
    pub fn apply_batch<E>(
        &self,
        op: BatchOp,
        count: u32,
        elem_flags: u64,
        mut one: impl FnMut(u32) -> Result<(), E>,
    ) -> Result<(u32, Option<E>), MapError> {
        if !matches!(op, BatchOp::Update | BatchOp::Delete) {
            return Err(MapError::KernelNotSupported);
        }
        self.batch_precheck(op, elem_flags, 0)?;
        for i in 0..count {
            if let Err(e) = one(i) {
                return Ok((i, Some(e)));
            }
        }
        Ok((count, None))
    }
}
