//! Per-CPU values: CPU numbering and `BPF_MAP_TYPE_PERCPU_ARRAY` (the per-CPU hash variants
//! share [`crate::hash`]).
//!
//! As in the kernel (`kernel/bpf/arraymap.c`, `bpf_percpu_array_copy`), a program sees the
//! value of the CPU it runs on, and the syscall side sees `round_up(value_size, 8)` bytes per
//! *possible* CPU (`/sys/devices/system/cpu/possible`), in CPU order. In userspace the CPU is
//! `sched_getcpu()`; a thread may migrate between the lookup and its use of the value, so two
//! threads can share a slot for a moment: programs that count use atomics on their value (as
//! bpftrace and libbpf tools do), and the map only hands out the current CPU's slot, which makes
//! no update get lost.
//!
//! Data layout: CPU-major, one block of `max_entries × round_up(value_size, 8)` bytes per
//! possible CPU, each block 64-byte aligned so two CPUs never share a cache line.

use crate::map::{BPF_NOEXIST, Map, MapDef, MapError, check_update_flags, round8};
use crate::store::StoreError;
use std::sync::OnceLock;

/// Most CPUs a per-CPU map supports (the kernel's largest `NR_CPUS`).
pub const MAX_CPUS: u32 = 8192;
/// Largest per-CPU value (`PCPU_MIN_UNIT_SIZE`).
pub const MAX_PERCPU_VALUE: u64 = 32 * 1024;

struct Cpus {
    /// Possible CPU ids in order; the syscall-side image has one slot per entry.
    ids: Vec<u32>,
    /// Slot of each CPU id (`u32::MAX` for ids that are not possible).
    slot_of: Vec<u32>,
}

/// Parses a kernel CPU list (`0-3,5,7-8`); `None` if malformed.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let v: u32 = part.trim().parse().ok()?;
                (v, v)
            }
        };
        if lo > hi || hi >= MAX_CPUS {
            return None;
        }
        ids.extend(lo..=hi);
    }
    ids.sort_unstable();
    ids.dedup();
    (!ids.is_empty()).then_some(ids)
}

fn cpus() -> &'static Cpus {
    static CPUS: OnceLock<Cpus> = OnceLock::new();
    CPUS.get_or_init(|| {
        let ids = std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| parse_cpu_list(&s))
            .unwrap_or_else(|| {
                let n = std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1)
                    .min(MAX_CPUS);
                (0..n).collect()
            });
        let max = ids.iter().copied().max().unwrap_or(0) as usize;
        let mut slot_of = vec![u32::MAX; max + 1];
        for (slot, &id) in ids.iter().enumerate() {
            slot_of[id as usize] = slot as u32;
        }
        Cpus { ids, slot_of }
    })
}

/// The number of possible CPUs (libbpf's `libbpf_num_possible_cpus()`): the per-CPU slots of
/// every per-CPU map created by this process.
pub fn nr_possible_cpus() -> u32 {
    cpus().ids.len() as u32
}

/// The slot of CPU `cpu` in a map with `nr` slots (`None` if it is not a possible CPU).
pub fn slot_of_cpu(cpu: u32, nr: u32) -> Option<u32> {
    cpus()
        .slot_of
        .get(cpu as usize)
        .copied()
        .filter(|&s| s < nr)
}

/// The slot of the CPU the caller runs on, in a map with `nr` slots.
#[inline]
pub fn current_slot(nr: u32) -> u32 {
    let cpu = crate::shm::current_cpu();
    match slot_of_cpu(cpu, nr) {
        Some(s) => s,
        // A CPU the map was not sized for (hotplug beyond `possible`): share a slot.
        None => cpu % nr.max(1),
    }
}

/// Bytes of one CPU's block: `max_entries` values, padded to a cache line.
fn cpu_stride(def: &MapDef) -> Option<u64> {
    round8(def.value_size)
        .checked_mul(u64::from(def.max_entries))
        .map(|l| l.div_ceil(64) * 64)
}

pub(crate) fn check_def(def: &MapDef, nr_cpus: u32) -> Result<u64, MapError> {
    if def.key_size != 4 {
        return Err(MapError::BadDefinition {
            what: "array maps need key_size 4",
        });
    }
    if round8(def.value_size) > MAX_PERCPU_VALUE {
        return Err(MapError::TooBig);
    }
    if nr_cpus == 0 || nr_cpus > MAX_CPUS {
        return Err(MapError::BadDefinition {
            what: "bad number of CPUs",
        });
    }
    cpu_stride(def)
        .and_then(|s| s.checked_mul(u64::from(nr_cpus)))
        .filter(|&l| l <= 1 << 40)
        .ok_or(MapError::TooBig)
}

fn corrupt() -> MapError {
    MapError::Store(StoreError::Corrupt {
        what: "percpu array",
    })
}

fn index(map: &Map, key: &[u8]) -> Option<u32> {
    let i = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]);
    (i < map.def.max_entries).then_some(i)
}

fn value_off(map: &Map, i: u32, slot: u32) -> u64 {
    let stride = cpu_stride(&map.def).unwrap_or(0);
    map.data_off + u64::from(slot) * stride + u64::from(i) * round8(map.def.value_size)
}

/// Program side: the current CPU's value.
pub(crate) fn lookup(map: &Map, key: &[u8]) -> Result<u64, MapError> {
    let i = index(map, key).ok_or(MapError::NotFound)?;
    Ok(value_off(map, i, current_slot(map.nr_cpus)))
}

/// `bpf_map_lookup_percpu_elem`: CPU `cpu`'s value.
pub(crate) fn lookup_cpu(map: &Map, key: &[u8], cpu: u32) -> Result<u64, MapError> {
    let i = index(map, key).ok_or(MapError::NotFound)?;
    let slot = slot_of_cpu(cpu, map.nr_cpus).ok_or(MapError::NotFound)?;
    Ok(value_off(map, i, slot))
}

/// Syscall side: every CPU's value, `round_up(value_size, 8)` bytes each.
pub(crate) fn lookup_all(map: &Map, key: &[u8], out: &mut [u8]) -> Result<(), MapError> {
    let i = index(map, key).ok_or(MapError::NotFound)?;
    let vs8 = round8(map.def.value_size) as usize;
    let seg = map.store.segment();
    for (slot, chunk) in out.chunks_exact_mut(vs8).enumerate() {
        seg.read(value_off(map, i, slot as u32), chunk)
            .ok_or_else(corrupt)?;
    }
    Ok(())
}

fn check_update(map: &Map, key: &[u8], flags: u64) -> Result<u32, MapError> {
    let op = check_update_flags(flags)?;
    let i = index(map, key).ok_or(MapError::TooBig)?;
    if op == BPF_NOEXIST {
        return Err(MapError::Exists);
    }
    Ok(i)
}

/// Program side: writes the current CPU's value.
pub(crate) fn update(map: &Map, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
    let i = check_update(map, key, flags)?;
    map.store
        .segment()
        .write(value_off(map, i, current_slot(map.nr_cpus)), value)
        .ok_or_else(corrupt)
}

/// Syscall side: writes every CPU's value from a `round_up(value_size, 8) × nr_cpus` image.
pub(crate) fn update_all(map: &Map, key: &[u8], image: &[u8], flags: u64) -> Result<(), MapError> {
    let i = check_update(map, key, flags)?;
    let vs8 = round8(map.def.value_size) as usize;
    let seg = map.store.segment();
    for (slot, chunk) in image.chunks_exact(vs8).enumerate() {
        seg.write(value_off(map, i, slot as u32), chunk)
            .ok_or_else(corrupt)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-3\n"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list(""), None);
    }

    #[test]
    fn current_cpu_is_the_cpu_the_thread_runs_on() {
        // Pinned to each CPU in turn (no migration), the rseq read and sched_getcpu agree.
        std::thread::spawn(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            for cpu in 0..n {
                // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity on the
                // calling thread with a valid set.
                let pinned = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0
                };
                if !pinned {
                    continue;
                }
                for _ in 0..100 {
                    // SAFETY: no preconditions.
                    let libc_cpu = unsafe { libc::sched_getcpu() };
                    assert_eq!(crate::shm::current_cpu() as i32, libc_cpu);
                    assert_eq!(libc_cpu as usize, cpu);
                }
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn current_cpu_has_a_slot() {
        let n = nr_possible_cpus();
        assert!(n >= 1);
        assert!(current_slot(n) < n);
    }
}
