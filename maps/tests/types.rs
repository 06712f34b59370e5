//! Every map type against a model (std collections) with the kernel's errnos, processes
//! hammering shared maps with exact totals, and processes killed in the middle of updates.
//!
//! Cross-process tests re-run this test binary as the child (`child_*` tests do nothing unless
//! `BPFTIME_TYPES_CHILD` is set), so the children are real processes mapping the same store.

use bpftime_maps::map::{BPF_ANY, BPF_EXIST, BPF_NOEXIST};
use bpftime_maps::{Map, MapDef, MapError, Store};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const HASH: u32 = 1;
const PERCPU_HASH: u32 = 5;
const PERCPU_ARRAY: u32 = 6;

struct TempStore {
    store: Arc<Store>,
    path: PathBuf,
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn temp_store(tag: &str) -> TempStore {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "bpftime-types-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    TempStore {
        store: Arc::new(Store::open(&path).unwrap()),
        path,
    }
}

fn def(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> MapDef {
    MapDef {
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
    }
}

fn errno<T>(r: Result<T, MapError>) -> Result<T, i32> {
    r.map_err(|e| e.errno())
}

fn k32(k: u32) -> [u8; 4] {
    k.to_ne_bytes()
}

fn run_child(test: &str, path: &Path, arg: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("BPFTIME_TYPES_CHILD", format!("{}|{arg}", path.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn child_args() -> Option<(Arc<Store>, String)> {
    let v = std::env::var("BPFTIME_TYPES_CHILD").ok()?;
    let (p, arg) = v.split_once('|')?;
    Some((
        Arc::new(Store::open(Path::new(p)).unwrap()),
        arg.to_string(),
    ))
}

/// The `u64` a program would add to with `lock add` (an atomic in shared memory).
fn value_atomic(p: *mut u8) -> &'static AtomicU64 {
    assert_eq!(p as usize % 8, 0, "values are 8-byte aligned");
    // SAFETY: `p` is an 8-byte aligned value in the store mapping, which stays mapped for the
    // whole test process (the store is never closed before exit in the hammer tests), and is
    // only accessed atomically by every process.
    unsafe { AtomicU64::from_ptr(p.cast()) }
}

fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is checked against the set's capacity by the macro's implementation.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 = the calling thread.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0 }
}

// ---------------------------------------------------------------------------------------------
// Per-CPU maps
// ---------------------------------------------------------------------------------------------

/// A syscall-side per-CPU image with `v` in every CPU's slot.
fn image(ncpu: usize, vs: usize, f: impl Fn(usize) -> u64) -> Vec<u8> {
    let vs8 = vs.div_ceil(8) * 8;
    let mut img = vec![0u8; vs8 * ncpu];
    for c in 0..ncpu {
        let b = f(c).to_ne_bytes();
        let n = vs.min(8);
        img[c * vs8..c * vs8 + n].copy_from_slice(&b[..n]);
    }
    img
}

#[test]
fn percpu_array_program_sees_its_cpu_syscall_sees_every_cpu() {
    let t = temp_store("pcpu-arr");
    let m = Map::create(&t.store, def(PERCPU_ARRAY, 4, 12, 4, 0), "pa").unwrap();
    let ncpu = m.nr_cpus() as usize;
    assert_eq!(ncpu, bpftime_maps::percpu::nr_possible_cpus() as usize);
    assert_eq!(m.syscall_value_size(), 16 * ncpu, "round_up(12, 8) per CPU");
    for cpu in 0..ncpu {
        if !pin_to_cpu(cpu) {
            continue;
        }
        m.update(&k32(2), &[cpu as u8 + 1; 12], BPF_ANY).unwrap();
        let p = m.lookup_ptr(&k32(2)).unwrap();
        // SAFETY: `p` points at the 12-byte value inside the mapped store.
        let seen = unsafe { std::slice::from_raw_parts(p, 12) }.to_vec();
        assert_eq!(seen, [cpu as u8 + 1; 12], "program side: this CPU's value");
        let q = m.lookup_percpu_ptr(&k32(2), cpu as u32).unwrap();
        assert_eq!(p, q);
    }
    let mut img = vec![0u8; m.syscall_value_size()];
    m.lookup(&k32(2), &mut img).unwrap();
    for cpu in 0..ncpu {
        assert_eq!(&img[cpu * 16..cpu * 16 + 12], &[cpu as u8 + 1; 12]);
        assert_eq!(&img[cpu * 16 + 12..cpu * 16 + 16], &[0; 4], "padding");
    }
    // Syscall-side update writes every CPU.
    let img = image(ncpu, 12, |c| 100 + c as u64);
    m.update_syscall(&k32(0), &img, BPF_EXIST).unwrap();
    let mut back = vec![0u8; img.len()];
    m.lookup(&k32(0), &mut back).unwrap();
    assert_eq!(back, img);
    // Errnos of an array.
    assert_eq!(
        errno(m.update_syscall(&k32(4), &img, BPF_ANY)),
        Err(libc::E2BIG)
    );
    assert_eq!(
        errno(m.update_syscall(&k32(0), &img, BPF_NOEXIST)),
        Err(libc::EEXIST)
    );
    assert_eq!(errno(m.update_syscall(&k32(0), &img, 4)), Err(libc::EINVAL));
    assert_eq!(errno(m.lookup(&k32(4), &mut back)), Err(libc::ENOENT));
    assert_eq!(errno(m.delete(&k32(0))), Err(libc::EINVAL));
    assert_eq!(
        errno(m.lookup_percpu_ptr(&k32(0), ncpu as u32).map(drop)),
        Err(libc::ENOENT),
        "a CPU that is not possible"
    );
    assert_eq!(
        errno(m.update_syscall(&k32(0), &img[..16], BPF_ANY)),
        Err(libc::EINVAL),
        "syscall side needs every CPU's value"
    );
}

#[test]
fn percpu_hash_keeps_cpus_apart_and_updates_in_place() {
    let t = temp_store("pcpu-hash");
    let m = Map::create(&t.store, def(PERCPU_HASH, 4, 8, 2, 0), "ph").unwrap();
    let ncpu = m.nr_cpus() as usize;
    // A program creating the element: this CPU gets the value, the others zero.
    assert!(pin_to_cpu(0));
    m.update(&k32(7), &5u64.to_ne_bytes(), BPF_NOEXIST).unwrap();
    let mut img = vec![0u8; m.syscall_value_size()];
    m.lookup(&k32(7), &mut img).unwrap();
    assert_eq!(img, image(ncpu, 8, |c| if c == 0 { 5 } else { 0 }));
    // The value a program holds stays the element's value across updates (in place).
    let p = m.lookup_ptr(&k32(7)).unwrap();
    m.update_syscall(&k32(7), &image(ncpu, 8, |c| c as u64 + 10), BPF_EXIST)
        .unwrap();
    assert_eq!(value_atomic(p).load(Ordering::Relaxed), 10);
    // Full map: a new key is E2BIG, an existing key still updates.
    m.update_syscall(&k32(8), &image(ncpu, 8, |_| 1), BPF_ANY)
        .unwrap();
    assert_eq!(
        errno(m.update_syscall(&k32(9), &image(ncpu, 8, |_| 1), BPF_ANY)),
        Err(libc::E2BIG)
    );
    m.update(&k32(8), &3u64.to_ne_bytes(), BPF_EXIST).unwrap();
    // Deleted and re-created from a program: the other CPUs start from zero again.
    m.delete(&k32(8)).unwrap();
    m.update(&k32(8), &4u64.to_ne_bytes(), BPF_ANY).unwrap();
    m.lookup(&k32(8), &mut img).unwrap();
    assert_eq!(img, image(ncpu, 8, |c| if c == 0 { 4 } else { 0 }));
    if ncpu > 1 {
        let q = m.lookup_percpu_ptr(&k32(8), 1).unwrap();
        assert_eq!(value_atomic(q).load(Ordering::Relaxed), 0);
    }
}

#[derive(Debug, Clone)]
enum PcOp {
    Update(u32, u64, u64),
    Delete(u32),
    Lookup(u32),
}

fn pc_op() -> impl Strategy<Value = PcOp> {
    prop_oneof![
        (0u32..12, any::<u64>(), 0u64..4).prop_map(|(k, v, f)| PcOp::Update(k, v, f)),
        (0u32..12).prop_map(PcOp::Delete),
        (0u32..12).prop_map(PcOp::Lookup),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn percpu_hash_matches_model(ops in proptest::collection::vec(pc_op(), 1..150)) {
        let t = temp_store("pcpu-model");
        let max = 6;
        let m = Map::create(&t.store, def(PERCPU_HASH, 4, 4, max, 0), "m").unwrap();
        let ncpu = m.nr_cpus() as usize;
        let mut model: HashMap<u32, Vec<u8>> = HashMap::new();
        for op in ops {
            match op {
                PcOp::Update(k, v, flags) => {
                    let img = image(ncpu, 4, |c| v.wrapping_add(c as u64) & 0xffff_ffff);
                    let r = errno(m.update_syscall(&k32(k), &img, flags));
                    let expect = match flags {
                        f if f > BPF_EXIST => Err(libc::EINVAL),
                        BPF_NOEXIST if model.contains_key(&k) => Err(libc::EEXIST),
                        BPF_EXIST if !model.contains_key(&k) => Err(libc::ENOENT),
                        _ if !model.contains_key(&k) && model.len() == max as usize => {
                            Err(libc::E2BIG)
                        }
                        _ => {
                            model.insert(k, img);
                            Ok(())
                        }
                    };
                    prop_assert_eq!(r, expect);
                }
                PcOp::Delete(k) => {
                    let expect = model.remove(&k).map(drop).ok_or(libc::ENOENT);
                    prop_assert_eq!(errno(m.delete(&k32(k))), expect);
                }
                PcOp::Lookup(k) => {
                    let mut out = vec![0u8; m.syscall_value_size()];
                    let r = errno(m.lookup(&k32(k), &mut out)).map(|()| out);
                    prop_assert_eq!(r, model.get(&k).cloned().ok_or(libc::ENOENT));
                }
            }
        }
        prop_assert_eq!(keys_of(&m), sorted(model.keys().copied()));
    }

    #[test]
    fn percpu_array_matches_model(ops in proptest::collection::vec(pc_op(), 1..150)) {
        let t = temp_store("pcpu-arr-model");
        let max = 8;
        let m = Map::create(&t.store, def(PERCPU_ARRAY, 4, 4, max, 0), "m").unwrap();
        let ncpu = m.nr_cpus() as usize;
        let zero = vec![0u8; m.syscall_value_size()];
        let mut model: Vec<Vec<u8>> = vec![zero; max as usize];
        for op in ops {
            match op {
                PcOp::Update(k, v, flags) => {
                    let img = image(ncpu, 4, |c| v.wrapping_add(c as u64) & 0xffff_ffff);
                    let r = errno(m.update_syscall(&k32(k), &img, flags));
                    let expect = match flags {
                        f if f > BPF_EXIST => Err(libc::EINVAL),
                        _ if k >= max => Err(libc::E2BIG),
                        BPF_NOEXIST => Err(libc::EEXIST),
                        _ => {
                            model[k as usize] = img;
                            Ok(())
                        }
                    };
                    prop_assert_eq!(r, expect);
                }
                PcOp::Delete(k) => prop_assert_eq!(errno(m.delete(&k32(k))), Err(libc::EINVAL)),
                PcOp::Lookup(k) => {
                    let mut out = vec![0u8; m.syscall_value_size()];
                    let r = errno(m.lookup(&k32(k), &mut out)).map(|()| out);
                    prop_assert_eq!(r, model.get(k as usize).cloned().ok_or(libc::ENOENT));
                }
            }
        }
    }
}

fn sorted(it: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = it.into_iter().collect();
    v.sort_unstable();
    v
}

/// Every key of a map with `u32` keys, by `next_key`, checking each is visited once.
fn keys_of(m: &Map) -> Vec<u32> {
    let mut seen = Vec::new();
    let mut key: Option<[u8; 4]> = None;
    loop {
        let mut out = [0u8; 4];
        match m.next_key(key.as_ref().map(|k| &k[..]), &mut out) {
            Ok(()) => {
                seen.push(u32::from_ne_bytes(out));
                key = Some(out);
            }
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOENT);
                break;
            }
        }
        assert!(
            seen.len() <= m.def().max_entries as usize,
            "iteration loops"
        );
    }
    let n = seen.len();
    let s = sorted(seen);
    let mut d = s.clone();
    d.dedup();
    assert_eq!(d.len(), n, "a key was visited twice");
    s
}

/// Child: `threads` threads each add 1 to the current CPU's value of key `key`, `iters` times
/// (what `bpftrace`'s `count()` does on a per-CPU array), migrating between CPUs as they like.
#[test]
fn child_percpu_add() {
    let Some((store, arg)) = child_args() else {
        return;
    };
    let a: Vec<u64> = arg.split(',').map(|x| x.parse().unwrap()).collect();
    let (id, key, threads, iters) = (a[0] as u32, a[1] as u32, a[2], a[3]);
    let m = Map::open(&store, id).unwrap();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for i in 0..iters {
                    let p = m.lookup_ptr(&k32(key)).unwrap();
                    value_atomic(p).fetch_add(1, Ordering::Relaxed);
                    if i % 1024 == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
}

fn percpu_total(m: &Map, key: u32) -> u64 {
    let mut img = vec![0u8; m.syscall_value_size()];
    m.lookup(&k32(key), &mut img).unwrap();
    img.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .sum()
}

#[test]
fn percpu_array_4_processes_x_3_threads_count_exactly() {
    let t = temp_store("pcpu-hammer");
    let m = Map::create(&t.store, def(PERCPU_ARRAY, 4, 8, 4, 0), "count").unwrap();
    let iters = 50_000u64;
    let kids: Vec<_> = (0..4)
        .map(|_| {
            run_child(
                "child_percpu_add",
                &t.path,
                &format!("{},1,3,{iters}", m.id()),
            )
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert_eq!(percpu_total(&m, 1), 4 * 3 * iters);
    assert_eq!(percpu_total(&m, 0), 0);
}

#[test]
fn percpu_hash_processes_count_exactly() {
    let t = temp_store("pcpu-hash-hammer");
    let m = Map::create(&t.store, def(PERCPU_HASH, 4, 8, 16, 0), "count").unwrap();
    m.update_syscall(&k32(3), &vec![0u8; m.syscall_value_size()], BPF_ANY)
        .unwrap();
    let iters = 50_000u64;
    let kids: Vec<_> = (0..3)
        .map(|_| {
            run_child(
                "child_percpu_add",
                &t.path,
                &format!("{},3,2,{iters}", m.id()),
            )
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert_eq!(percpu_total(&m, 3), 3 * 2 * iters);
}

#[test]
fn hash_update_of_an_existing_key_in_a_full_map_succeeds() {
    let t = temp_store("hash-full");
    let m = Map::create(&t.store, def(HASH, 4, 8, 2, 0), "h").unwrap();
    m.update(&k32(1), &1u64.to_ne_bytes(), BPF_ANY).unwrap();
    m.update(&k32(2), &2u64.to_ne_bytes(), BPF_ANY).unwrap();
    assert_eq!(
        errno(m.update(&k32(3), &3u64.to_ne_bytes(), BPF_ANY)),
        Err(libc::E2BIG)
    );
    m.update(&k32(2), &22u64.to_ne_bytes(), BPF_ANY).unwrap();
    m.update(&k32(1), &11u64.to_ne_bytes(), BPF_EXIST).unwrap();
    let mut v = [0u8; 8];
    m.lookup(&k32(2), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 22);
    m.lookup(&k32(1), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 11);
}

#[test]
fn create_flags_follow_each_types_mask() {
    let t = temp_store("flags");
    let mk = |ty, flags| errno(Map::create(&t.store, def(ty, 4, 8, 4, flags), "f").map(drop));
    use bpftime_maps::map::*;
    assert_eq!(
        mk(HASH, BPF_F_NO_PREALLOC),
        Ok(()),
        "accepted; we still preallocate"
    );
    assert_eq!(mk(HASH, BPF_F_ZERO_SEED), Ok(()));
    assert_eq!(mk(HASH, BPF_F_MMAPABLE), Err(libc::EINVAL));
    assert_eq!(mk(HASH, BPF_F_NO_COMMON_LRU), Err(libc::EINVAL), "LRU only");
    assert_eq!(mk(PERCPU_ARRAY, BPF_F_MMAPABLE), Err(libc::EINVAL));
    assert_eq!(mk(PERCPU_ARRAY, BPF_F_NO_PREALLOC), Err(libc::EINVAL));
    assert_eq!(mk(2, BPF_F_MMAPABLE), Ok(()));
    assert_eq!(mk(2, BPF_F_PRESERVE_ELEMS), Err(libc::EINVAL));
    assert_eq!(mk(PERCPU_HASH, BPF_F_RDONLY_PROG), Ok(()));
    assert_eq!(
        mk(PERCPU_HASH, BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG),
        Err(libc::EINVAL)
    );
    assert_eq!(mk(HASH, BPF_F_RDONLY | BPF_F_WRONLY), Err(libc::EINVAL));
    assert_eq!(mk(HASH, 1 << 20), Err(libc::EINVAL));
}

// ---------------------------------------------------------------------------------------------
// LRU hash maps
// ---------------------------------------------------------------------------------------------

const LRU_HASH: u32 = 9;
const LRU_PERCPU_HASH: u32 = 10;

fn get_u64(m: &Map, k: u32) -> Result<u64, i32> {
    let mut v = [0u8; 8];
    errno(m.lookup(&k32(k), &mut v)).map(|()| u64::from_ne_bytes(v))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Like a hash map, except that inserting into a full map evicts exactly one other key.
    #[test]
    fn lru_hash_matches_model_with_eviction(ops in proptest::collection::vec(pc_op(), 1..200)) {
        let t = temp_store("lru-model");
        let max = 6;
        let m = Map::create(&t.store, def(LRU_HASH, 4, 8, max, 0), "m").unwrap();
        let mut model: HashMap<u32, u64> = HashMap::new();
        for op in ops {
            match op {
                PcOp::Update(k, v, flags) => {
                    let r = errno(m.update(&k32(k), &v.to_ne_bytes(), flags));
                    let expect = match flags {
                        f if f > BPF_EXIST => Err(libc::EINVAL),
                        BPF_NOEXIST if model.contains_key(&k) => Err(libc::EEXIST),
                        BPF_EXIST if !model.contains_key(&k) => Err(libc::ENOENT),
                        _ => Ok(()),
                    };
                    prop_assert_eq!(r, expect);
                    if r.is_ok() {
                        let was_full = !model.contains_key(&k) && model.len() == max as usize;
                        model.insert(k, v);
                        if was_full {
                            let now = keys_of(&m);
                            let gone: Vec<u32> =
                                model.keys().copied().filter(|x| !now.contains(x)).collect();
                            prop_assert_eq!(gone.len(), 1, "exactly one key evicted");
                            prop_assert_ne!(gone[0], k, "not the key just written");
                            model.remove(&gone[0]);
                        }
                    }
                }
                PcOp::Delete(k) => {
                    let expect = model.remove(&k).map(drop).ok_or(libc::ENOENT);
                    prop_assert_eq!(errno(m.delete(&k32(k))), expect);
                }
                PcOp::Lookup(k) => {
                    prop_assert_eq!(get_u64(&m, k), model.get(&k).copied().ok_or(libc::ENOENT));
                }
            }
            prop_assert_eq!(keys_of(&m), sorted(model.keys().copied()));
        }
    }
}

#[test]
fn lru_hash_keeps_a_hot_key_while_cold_ones_are_evicted() {
    let t = temp_store("lru-hot");
    let max = 64u32;
    let m = Map::create(&t.store, def(LRU_HASH, 4, 8, max, 0), "lru").unwrap();
    for k in 0..max {
        m.update(&k32(k), &u64::from(k).to_ne_bytes(), BPF_NOEXIST)
            .unwrap();
    }
    // Full: a new key evicts instead of failing.
    m.update(&k32(1000), &1000u64.to_ne_bytes(), BPF_NOEXIST)
        .unwrap();
    assert_eq!(keys_of(&m).len(), max as usize);
    // Key 7 is used between every insertion (as a program's lookup would): it survives
    // 4 × max insertions of new keys.
    for k in 2000..2000 + 4 * max {
        m.lookup_ptr(&k32(7)).unwrap();
        m.update(&k32(k), &u64::from(k).to_ne_bytes(), BPF_ANY)
            .unwrap();
    }
    assert_eq!(get_u64(&m, 7), Ok(7));
    let keys = keys_of(&m);
    assert_eq!(keys.len(), max as usize);
    // The most recent insertions are there too.
    for k in 2000 + 4 * max - 8..2000 + 4 * max {
        assert!(keys.contains(&k), "recent key {k} evicted");
    }
    // An existing key in the full map is updated without evicting anything.
    let before = keys_of(&m);
    m.update(&k32(7), &77u64.to_ne_bytes(), BPF_EXIST).unwrap();
    assert_eq!(keys_of(&m), before);
    assert_eq!(get_u64(&m, 7), Ok(77));
}

#[test]
fn lru_percpu_hash_evicts_and_keeps_per_cpu_values() {
    let t = temp_store("lru-pcpu");
    let m = Map::create(&t.store, def(LRU_PERCPU_HASH, 4, 8, 4, 0), "lp").unwrap();
    let ncpu = m.nr_cpus() as usize;
    for k in 0..10u32 {
        let img = image(ncpu, 8, |c| u64::from(k) * 100 + c as u64);
        m.update_syscall(&k32(k), &img, BPF_ANY).unwrap();
        let mut back = vec![0u8; img.len()];
        m.lookup(&k32(k), &mut back).unwrap();
        assert_eq!(back, img);
    }
    assert_eq!(keys_of(&m).len(), 4);
    assert_eq!(
        errno(Map::create(&t.store, def(LRU_HASH, 4, 8, 4, BPF_F_NO_PREALLOC_), "x").map(drop)),
        Err(524),
        "LRU maps cannot be BPF_F_NO_PREALLOC (ENOTSUPP)"
    );
    Map::create(
        &t.store,
        def(LRU_HASH, 4, 8, 4, bpftime_maps::map::BPF_F_NO_COMMON_LRU),
        "y",
    )
    .unwrap();
}

const BPF_F_NO_PREALLOC_: u32 = bpftime_maps::map::BPF_F_NO_PREALLOC;

/// Child: inserts keys `base..base+n` (value = key) into an LRU map, looking up each a few
/// times, then counts into key `base` `iters` times with atomics.
#[test]
fn child_lru_insert() {
    let Some((store, arg)) = child_args() else {
        return;
    };
    let a: Vec<u32> = arg.split(',').map(|x| x.parse().unwrap()).collect();
    let (id, base, n) = (a[0], a[1], a[2]);
    let m = Map::open(&store, id).unwrap();
    for k in base..base + n {
        m.update(&k32(k), &u64::from(k).to_ne_bytes(), BPF_ANY)
            .unwrap();
        let _ = m.lookup_ptr(&k32(k));
    }
}

#[test]
fn lru_hash_4_processes_within_capacity_lose_nothing() {
    let t = temp_store("lru-procs");
    let m = Map::create(&t.store, def(LRU_HASH, 4, 8, 4096, 0), "lru").unwrap();
    let kids: Vec<_> = (0..4)
        .map(|i| {
            run_child(
                "child_lru_insert",
                &t.path,
                &format!("{},{},1000", m.id(), i * 1000),
            )
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    // 4000 of 4096: no eviction may have happened.
    for k in 0..4000 {
        assert_eq!(get_u64(&m, k), Ok(u64::from(k)), "key {k}");
    }
    assert_eq!(keys_of(&m).len(), 4000);
}

#[test]
fn lru_hash_4_processes_over_capacity_stay_exactly_full() {
    let t = temp_store("lru-over");
    let max = 512;
    let m = Map::create(&t.store, def(LRU_HASH, 4, 8, max, 0), "lru").unwrap();
    let kids: Vec<_> = (0..4)
        .map(|i| {
            run_child(
                "child_lru_insert",
                &t.path,
                &format!("{},{},3000", m.id(), i * 10_000),
            )
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    // 12,000 insertions into 512 slots: exactly 512 remain, each with its own value (no
    // element lost, none torn, none shared by two keys).
    let keys = keys_of(&m);
    assert_eq!(keys.len(), max as usize);
    for k in keys {
        assert_eq!(get_u64(&m, k), Ok(u64::from(k)));
    }
}

/// Child: updates an LRU map with ever new keys (evicting all the time) until killed.
#[test]
fn child_lru_hammer_forever() {
    let Some((store, arg)) = child_args() else {
        return;
    };
    let m = Map::open(&store, arg.parse().unwrap()).unwrap();
    let mut k = 1_000_000u32;
    loop {
        let _ = m.update(&k32(k), &u64::from(k).to_ne_bytes(), BPF_ANY);
        let _ = m.lookup_ptr(&k32(k.wrapping_sub(3)));
        if k.is_multiple_of(3) {
            let _ = m.delete(&k32(k.wrapping_sub(1)));
        }
        k = k.wrapping_add(1);
    }
}

#[test]
fn lru_hash_process_killed_mid_update_leaves_map_usable() {
    let t = temp_store("lru-kill");
    let max = 64;
    let m = Map::create(&t.store, def(LRU_HASH, 4, 8, max, 0), "victim").unwrap();
    let rounds = 5;
    for round in 0..rounds {
        let mut kid = run_child("child_lru_hammer_forever", &t.path, &m.id().to_string());
        std::thread::sleep(std::time::Duration::from_millis(
            150 + u64::from(round) * 37,
        ));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(kid.id() as i32, libc::SIGKILL) };
        kid.wait().unwrap();
        // Locks recovered, chains intact: fresh keys go in (evicting), and can be read back.
        for k in 0..2 * max {
            m.update(&k32(k), &u64::from(k).to_ne_bytes(), BPF_ANY)
                .unwrap_or_else(|e| panic!("round {round}, key {k}: {e}"));
            assert_eq!(get_u64(&m, k), Ok(u64::from(k)));
        }
    }
    // Each kill leaks at most the one element its update or eviction had in hand.
    let n = keys_of(&m).len() as u32;
    assert!(n <= max && n >= max - rounds, "{n} elements live");
    for k in keys_of(&m) {
        assert_eq!(get_u64(&m, k), Ok(u64::from(k)));
    }
}

// ---------------------------------------------------------------------------------------------
// Queue and stack
// ---------------------------------------------------------------------------------------------

const QUEUE: u32 = 22;
const STACK: u32 = 23;

#[derive(Debug, Clone)]
enum QOp {
    Push(u32, u64),
    Pop,
    Peek,
}

fn q_op() -> impl Strategy<Value = QOp> {
    prop_oneof![
        3 => (any::<u32>(), 0u64..4).prop_map(|(v, f)| QOp::Push(v, f)),
        2 => Just(QOp::Pop),
        1 => Just(QOp::Peek),
    ]
}

fn check_queue_model(map_type: u32, ops: Vec<QOp>, syscall: bool) -> Result<(), TestCaseError> {
    let t = temp_store("queue-model");
    let max = 5;
    let m = Map::create(&t.store, def(map_type, 0, 4, max, 0), "q").unwrap();
    let stack = map_type == STACK;
    let mut model: std::collections::VecDeque<u32> = Default::default();
    for op in ops {
        match op {
            QOp::Push(v, flags) => {
                let r = if syscall {
                    errno(m.update_syscall(&[], &v.to_ne_bytes(), flags))
                } else {
                    errno(m.push(&v.to_ne_bytes(), flags))
                };
                let expect = if flags & BPF_NOEXIST != 0 || flags > BPF_EXIST {
                    Err(libc::EINVAL)
                } else if model.len() == max as usize && flags != BPF_EXIST {
                    Err(libc::E2BIG)
                } else {
                    if model.len() == max as usize {
                        model.pop_front(); // the oldest goes, for stacks too
                    }
                    model.push_back(v);
                    Ok(())
                };
                prop_assert_eq!(r, expect);
            }
            QOp::Pop | QOp::Peek => {
                let pop = matches!(op, QOp::Pop);
                let mut out = [0u8; 4];
                let r = match (syscall, pop) {
                    (true, true) => errno(m.lookup_and_delete(&[], &mut out)),
                    (true, false) => errno(m.lookup(&[], &mut out)),
                    (false, true) => errno(m.pop(&mut out)),
                    (false, false) => errno(m.peek(&mut out)),
                };
                let expect = match (stack, pop) {
                    (false, true) => model.pop_front(),
                    (true, true) => model.pop_back(),
                    (false, false) => model.front().copied(),
                    (true, false) => model.back().copied(),
                };
                prop_assert_eq!(
                    r.map(|()| u32::from_ne_bytes(out)),
                    expect.ok_or(libc::ENOENT)
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn queue_matches_vecdeque(ops in proptest::collection::vec(q_op(), 1..120), sys in any::<bool>()) {
        check_queue_model(QUEUE, ops, sys)?;
    }

    #[test]
    fn stack_matches_vecdeque(ops in proptest::collection::vec(q_op(), 1..120), sys in any::<bool>()) {
        check_queue_model(STACK, ops, sys)?;
    }
}

#[test]
fn queue_and_stack_refuse_keyed_operations() {
    let t = temp_store("queue-ops");
    for ty in [QUEUE, STACK] {
        let m = Map::create(&t.store, def(ty, 0, 8, 4, 0), "q").unwrap();
        assert_eq!(
            errno(m.lookup_ptr(&[]).map(drop)),
            Err(libc::ENOENT),
            "programs get NULL"
        );
        assert_eq!(errno(m.update(&[], &[0; 8], BPF_ANY)), Err(libc::EINVAL));
        assert_eq!(errno(m.delete(&[])), Err(libc::EINVAL));
        assert_eq!(errno(m.next_key(None, &mut [])), Err(libc::EINVAL));
        let mut out = [0u8; 8];
        assert_eq!(errno(m.pop(&mut out)), Err(libc::ENOENT));
        m.freeze();
        assert_eq!(
            errno(m.update_syscall(&[], &[1; 8], BPF_ANY)),
            Err(libc::EPERM)
        );
        assert_eq!(errno(m.lookup_and_delete(&[], &mut out)), Err(libc::EPERM));
        m.push(&[2; 8], BPF_ANY).unwrap();
    }
    let mk = |k, v, n, f| errno(Map::create(&t.store, def(QUEUE, k, v, n, f), "q").map(drop));
    assert_eq!(mk(4, 8, 4, 0), Err(libc::EINVAL), "key_size must be 0");
    assert_eq!(mk(0, 0, 4, 0), Err(libc::EINVAL));
    assert_eq!(mk(0, 8, 0, 0), Err(libc::EINVAL));
    assert_eq!(
        mk(0, 8, 4, bpftime_maps::map::BPF_F_NO_PREALLOC),
        Err(libc::EINVAL)
    );
    assert_eq!(mk(0, 8, 4, bpftime_maps::map::BPF_F_RDONLY_PROG), Ok(()));
}

/// Child: pushes (overwriting) and pops forever, until killed.
#[test]
fn child_queue_hammer_forever() {
    let Some((store, arg)) = child_args() else {
        return;
    };
    let m = Map::open(&store, arg.parse().unwrap()).unwrap();
    let mut i = 0u64;
    let mut out = [0u8; 8];
    loop {
        let _ = m.push(&i.to_ne_bytes(), BPF_EXIST);
        let _ = m.push(&(i + 1).to_ne_bytes(), BPF_EXIST);
        let _ = m.pop(&mut out);
        i += 2;
    }
}

#[test]
fn queue_process_killed_mid_push_leaves_a_consistent_ring() {
    let t = temp_store("queue-kill");
    let max = 16u32;
    let m = Map::create(&t.store, def(QUEUE, 0, 8, max, 0), "q").unwrap();
    for round in 0..5u64 {
        let mut kid = run_child("child_queue_hammer_forever", &t.path, &m.id().to_string());
        std::thread::sleep(std::time::Duration::from_millis(150 + round * 37));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(kid.id() as i32, libc::SIGKILL) };
        kid.wait().unwrap();
        // What the child left is a run of increasing values, at most `max` of them.
        let mut out = [0u8; 8];
        let mut left = Vec::new();
        while m.pop(&mut out).is_ok() {
            left.push(u64::from_ne_bytes(out));
            assert!(left.len() <= max as usize, "more elements than slots");
        }
        assert!(left.windows(2).all(|w| w[0] < w[1]), "{left:?}");
        // The ring takes exactly `max` elements again, in order.
        for v in 0..u64::from(max) {
            m.push(&v.to_ne_bytes(), BPF_ANY).unwrap();
        }
        assert_eq!(errno(m.push(&[0; 8], BPF_ANY)), Err(libc::E2BIG));
        for v in 0..u64::from(max) {
            m.pop(&mut out).unwrap();
            assert_eq!(u64::from_ne_bytes(out), v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bloom filter
// ---------------------------------------------------------------------------------------------

const BLOOM: u32 = 30;

fn bloom(t: &TempStore, value_size: u32, max: u32, map_extra: u64) -> Result<Map, i32> {
    errno(Map::create_with(
        &t.store,
        def(BLOOM, 0, value_size, max, 0),
        bpftime_maps::map::MapExtra {
            map_extra,
            ..Default::default()
        },
        "bloom",
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Never a false negative; false positives rare at the designed load.
    #[test]
    fn bloom_filter_has_no_false_negatives(
        values in proptest::collection::hash_set(any::<u64>(), 1..200),
        hashes in 0u64..16,
        syscall in any::<bool>(),
    ) {
        let t = temp_store("bloom-model");
        let m = bloom(&t, 8, 200, hashes).unwrap();
        for v in &values {
            if syscall {
                m.update_syscall(&[], &v.to_ne_bytes(), BPF_ANY).unwrap();
            } else {
                m.push(&v.to_ne_bytes(), BPF_ANY).unwrap();
            }
        }
        for v in &values {
            let mut b = v.to_ne_bytes();
            prop_assert_eq!(errno(m.peek(&mut b)), Ok(()));
            prop_assert_eq!(errno(m.lookup(&[], &mut b)), Ok(()));
        }
        let mut fp = 0;
        for i in 0..2000u64 {
            let probe = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xdead_beef;
            if values.contains(&probe) {
                continue;
            }
            let mut b = probe.to_ne_bytes();
            match errno(m.peek(&mut b)) {
                Ok(()) => fp += 1,
                Err(e) => prop_assert_eq!(e, libc::ENOENT),
            }
        }
        // The textbook rate (1 - e^(-kn/m))^k with the kernel's sizing (m = 2^⌈log2(7kN/5)⌉).
        let k = if hashes == 0 { 5.0 } else { hashes as f64 };
        let bits = ((200.0 * k / 5.0).floor() * 7.0).max(64.0).log2().ceil().exp2();
        let rate = (1.0 - (-k * values.len() as f64 / bits).exp()).powf(k);
        prop_assert!(
            (fp as f64) < 2000.0 * (rate * 1.5 + 0.02),
            "{} false positives of 2000, expected rate {:.3}", fp, rate
        );
    }
}

#[test]
fn bloom_filter_errnos_follow_the_kernel() {
    let t = temp_store("bloom-ops");
    let m = bloom(&t, 4, 16, 0).unwrap();
    let mut v = 7u32.to_ne_bytes();
    assert_eq!(errno(m.peek(&mut v)), Err(libc::ENOENT), "empty filter");
    assert_eq!(
        errno(m.push(&v, BPF_EXIST)),
        Err(libc::EINVAL),
        "only BPF_ANY"
    );
    assert_eq!(errno(m.push(&v, BPF_NOEXIST)), Err(libc::EINVAL));
    m.push(&v, BPF_ANY).unwrap();
    assert_eq!(errno(m.peek(&mut v)), Ok(()));
    assert_eq!(errno(m.pop(&mut v)), Err(libc::EOPNOTSUPP));
    assert_eq!(errno(m.delete(&[])), Err(libc::EOPNOTSUPP));
    assert_eq!(errno(m.next_key(None, &mut [])), Err(libc::EOPNOTSUPP));
    assert_eq!(errno(m.update(&[], &v, BPF_ANY)), Err(libc::EINVAL));
    assert_eq!(errno(m.lookup_ptr(&[]).map(drop)), Err(libc::ENOENT));
    assert_eq!(errno(m.lookup_and_delete(&[], &mut v)), Err(524));
    // Reopened elsewhere, the hash count and seed come from the store.
    let m2 = Map::open(&t.store, m.id()).unwrap();
    assert_eq!(errno(m2.peek(&mut v)), Ok(()));
    // Definitions.
    assert_eq!(
        bloom(&t, 4, 16, 16).map(drop),
        Err(libc::EINVAL),
        "map_extra > 15"
    );
    assert_eq!(bloom(&t, 0, 16, 0).map(drop), Err(libc::EINVAL));
    assert_eq!(bloom(&t, 4, 0, 0).map(drop), Err(libc::EINVAL));
    assert_eq!(
        errno(Map::create(&t.store, def(BLOOM, 4, 4, 16, 0), "b").map(drop)),
        Err(libc::EINVAL),
        "key_size must be 0"
    );
    assert_eq!(
        errno(
            Map::create_with(
                &t.store,
                def(HASH, 4, 4, 16, 0),
                bpftime_maps::map::MapExtra {
                    map_extra: 3,
                    ..Default::default()
                },
                "h"
            )
            .map(drop)
        ),
        Err(libc::EINVAL),
        "map_extra on another type"
    );
    let z = Map::create(
        &t.store,
        def(BLOOM, 0, 4, 16, bpftime_maps::map::BPF_F_ZERO_SEED),
        "z",
    )
    .unwrap();
    z.push(&v, BPF_ANY).unwrap();
}

// ---------------------------------------------------------------------------------------------
// LPM trie
// ---------------------------------------------------------------------------------------------

const LPM_TRIE: u32 = 11;

/// An LPM key for 4 bytes of data (an IPv4 prefix).
fn lpm_key(plen: u32, data: [u8; 4]) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&plen.to_ne_bytes());
    k[4..].copy_from_slice(&data);
    k
}

fn mask(plen: u32, data: [u8; 4]) -> u32 {
    let v = u32::from_be_bytes(data);
    if plen == 0 {
        0
    } else {
        v & (u32::MAX << (32 - plen.min(32)))
    }
}

#[derive(Debug, Clone)]
enum LOp {
    Update(u32, [u8; 4], u64, u64),
    Delete(u32, [u8; 4]),
    Lookup(u32, [u8; 4]),
}

fn lpm_data() -> impl Strategy<Value = [u8; 4]> {
    // Few distinct leading bytes so prefixes overlap.
    (0u8..3, 0u8..4, any::<u8>(), any::<u8>()).prop_map(|(a, b, c, d)| [10 + a, b, c, d])
}

fn l_op() -> impl Strategy<Value = LOp> {
    let plen = prop_oneof![Just(0u32), Just(8), Just(16), Just(24), Just(32), 0u32..34];
    prop_oneof![
        (plen.clone(), lpm_data(), any::<u64>(), 0u64..4)
            .prop_map(|(p, d, v, f)| LOp::Update(p, d, v, f)),
        (plen.clone(), lpm_data()).prop_map(|(p, d)| LOp::Delete(p, d)),
        (plen, lpm_data()).prop_map(|(p, d)| LOp::Lookup(p, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn lpm_trie_matches_btreemap_model(ops in proptest::collection::vec(l_op(), 1..200)) {
        let t = temp_store("lpm-model");
        let max = 12;
        let m = Map::create(&t.store, def(LPM_TRIE, 8, 8, max, BPF_F_NO_PREALLOC_), "lpm").unwrap();
        // (prefix length, masked address) → value
        let mut model: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
        for op in ops {
            match op {
                LOp::Update(p, d, v, flags) => {
                    let r = errno(m.update(&lpm_key(p, d), &v.to_ne_bytes(), flags));
                    let k = (p, mask(p, d));
                    let expect = if flags > BPF_EXIST || p > 32 {
                        Err(libc::EINVAL)
                    } else if flags == BPF_NOEXIST && model.contains_key(&k) {
                        Err(libc::EEXIST)
                    } else if flags == BPF_EXIST && !model.contains_key(&k) {
                        Err(libc::ENOENT)
                    } else if !model.contains_key(&k) && model.len() == max as usize {
                        Err(libc::ENOSPC)
                    } else {
                        model.insert(k, v);
                        Ok(())
                    };
                    prop_assert_eq!(r, expect);
                }
                LOp::Delete(p, d) => {
                    let expect = if p > 32 {
                        Err(libc::EINVAL)
                    } else {
                        model.remove(&(p, mask(p, d))).map(drop).ok_or(libc::ENOENT)
                    };
                    prop_assert_eq!(errno(m.delete(&lpm_key(p, d))), expect);
                }
                LOp::Lookup(p, d) => {
                    let expect = if p > 32 {
                        None
                    } else {
                        model
                            .iter()
                            .filter(|((mp, ma), _)| *mp <= p && mask(*mp, d) == *ma)
                            .max_by_key(|((mp, _), _)| *mp)
                            .map(|(_, v)| *v)
                    };
                    let mut out = [0u8; 8];
                    let r = errno(m.lookup(&lpm_key(p, d), &mut out)).map(|()| u64::from_ne_bytes(out));
                    prop_assert_eq!(r, expect.ok_or(libc::ENOENT));
                    // Programs see the same value.
                    let pr = errno(m.lookup_ptr(&lpm_key(p, d)))
                        // SAFETY: an 8-byte value in the mapped store.
                        .map(|ptr| unsafe { std::ptr::read_unaligned(ptr.cast::<u64>()) });
                    prop_assert_eq!(pr, expect.ok_or(libc::ENOENT));
                }
            }
        }
        // Iteration: every stored prefix exactly once (in any order).
        let mut seen = Vec::new();
        let mut key: Option<[u8; 8]> = None;
        loop {
            let mut out = [0u8; 8];
            match errno(m.next_key(key.as_ref().map(|k| &k[..]), &mut out)) {
                Ok(()) => {
                    let p = u32::from_ne_bytes(out[..4].try_into().unwrap());
                    seen.push((p, u32::from_be_bytes(out[4..].try_into().unwrap())));
                    key = Some(out);
                }
                Err(e) => {
                    prop_assert_eq!(e, libc::ENOENT);
                    break;
                }
            }
            prop_assert!(seen.len() <= model.len());
        }
        seen.sort_unstable();
        prop_assert_eq!(seen, model.keys().copied().collect::<Vec<_>>());
    }
}

#[test]
fn lpm_trie_definition_and_edge_errnos() {
    let t = temp_store("lpm-defs");
    let mk = |k, v, n, f| errno(Map::create(&t.store, def(LPM_TRIE, k, v, n, f), "l").map(drop));
    let np = BPF_F_NO_PREALLOC_;
    assert_eq!(
        mk(8, 8, 4, 0),
        Err(libc::EINVAL),
        "BPF_F_NO_PREALLOC is required"
    );
    assert_eq!(mk(4, 8, 4, np), Err(libc::EINVAL), "no data");
    assert_eq!(
        mk(261, 8, 4, np),
        Err(libc::EINVAL),
        "more than 256 bytes of data"
    );
    assert_eq!(mk(260, 8, 4, np), Ok(()));
    assert_eq!(mk(8, 0, 4, np), Err(libc::EINVAL));
    assert_eq!(mk(8, 8, 0, np), Err(libc::EINVAL));
    assert_eq!(
        mk(8, 8, 4, np | bpftime_maps::map::BPF_F_ZERO_SEED),
        Err(libc::EINVAL)
    );
    let m = Map::create(&t.store, def(LPM_TRIE, 8, 8, 4, np), "l").unwrap();
    // The default route matches everything; a /32 only itself.
    m.update(&lpm_key(0, [0; 4]), &1u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    m.update(&lpm_key(32, [10, 0, 0, 1]), &2u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    m.update(&lpm_key(8, [10, 9, 9, 9]), &3u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    let look = |p, d| {
        let mut o = [0u8; 8];
        errno(m.lookup(&lpm_key(p, d), &mut o)).map(|()| u64::from_ne_bytes(o))
    };
    assert_eq!(look(32, [10, 0, 0, 1]), Ok(2));
    assert_eq!(look(32, [10, 0, 0, 2]), Ok(3));
    assert_eq!(
        look(31, [10, 0, 0, 1]),
        Ok(3),
        "a shorter key cannot match the /32"
    );
    assert_eq!(look(32, [11, 0, 0, 1]), Ok(1));
    assert_eq!(look(33, [10, 0, 0, 1]), Err(libc::ENOENT));
    // Exact delete: a /8 given with host bits set is the same prefix.
    m.delete(&lpm_key(8, [10, 1, 2, 3])).unwrap();
    assert_eq!(look(32, [10, 0, 0, 2]), Ok(1));
    assert_eq!(
        errno(m.delete(&lpm_key(8, [10, 0, 0, 0]))),
        Err(libc::ENOENT)
    );
    assert_eq!(errno(m.delete(&lpm_key(33, [0; 4]))), Err(libc::EINVAL));
    assert_eq!(
        errno(m.lookup_and_delete(&lpm_key(0, [0; 4]), &mut [0; 8])),
        Err(524)
    );
}

// ---------------------------------------------------------------------------------------------
// Stack trace
// ---------------------------------------------------------------------------------------------

const STACK_TRACE: u32 = 7;
const REUSE: u64 = 1 << 10;
const FAST_CMP: u64 = 1 << 9;

fn frames_of(m: &Map, id: u32) -> Result<Vec<u64>, i32> {
    let mut v = vec![0u8; m.def().value_size as usize];
    errno(m.lookup(&k32(id), &mut v))?;
    Ok(v.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect())
}

#[test]
fn stack_trace_ids_reuse_and_syscall_side() {
    let t = temp_store("stacks");
    let m = Map::create(&t.store, def(STACK_TRACE, 4, 24, 4, 0), "st").unwrap();
    let a = m.stack_id(&[1, 2, 3], 0).unwrap();
    assert!(a < 4);
    assert_eq!(m.stack_id(&[1, 2, 3], 0).unwrap(), a, "same stack, same id");
    assert_eq!(frames_of(&m, a), Ok(vec![1, 2, 3]));
    // Deeper than the value: cut to 3 frames.
    assert_eq!(m.stack_id(&[1, 2, 3, 4, 5], 0).unwrap(), a);
    // A shorter stack is zero-padded.
    let b = m.stack_id(&[9], REUSE).unwrap();
    assert_eq!(frames_of(&m, b), Ok(vec![9, 0, 0]));
    assert_eq!(
        errno(m.update(&k32(a), &[0; 24], BPF_ANY)),
        Err(libc::EINVAL)
    );
    assert_eq!(
        errno(m.update_syscall(&k32(a), &[0; 24], BPF_ANY)),
        Err(libc::EINVAL)
    );
    assert_eq!(errno(m.lookup_ptr(&k32(a)).map(drop)), Err(libc::ENOENT));
    // Iteration visits the occupied ids.
    let ids = keys_of(&m);
    assert!(ids.contains(&b));
    // Delete: ENOENT when empty, E2BIG past the buckets.
    m.delete(&k32(b)).unwrap();
    assert_eq!(errno(m.delete(&k32(b))), Err(libc::ENOENT));
    assert_eq!(errno(m.delete(&k32(4))), Err(libc::E2BIG));
    assert_eq!(frames_of(&m, b), Err(libc::ENOENT));
    assert_eq!(frames_of(&m, 99), Err(libc::ENOENT));
    // lookup-and-delete takes the stack out.
    let c = m.stack_id(&[7, 7], REUSE).unwrap();
    let mut v = [0u8; 24];
    m.lookup_and_delete(&k32(c), &mut v).unwrap();
    assert_eq!(&v[..8], &7u64.to_ne_bytes());
    assert_eq!(frames_of(&m, c), Err(libc::ENOENT));
}

#[test]
fn stack_trace_collisions_need_reuse() {
    let t = temp_store("stack-collide");
    // One bucket: every stack collides.
    let m = Map::create(&t.store, def(STACK_TRACE, 4, 16, 1, 0), "st").unwrap();
    assert_eq!(errno(m.stack_id(&[1, 2], 0)), Ok(0));
    assert_eq!(errno(m.stack_id(&[3, 4], 0)), Err(libc::EEXIST));
    assert_eq!(frames_of(&m, 0), Ok(vec![1, 2]), "kept");
    assert_eq!(errno(m.stack_id(&[3, 4], REUSE)), Ok(0));
    assert_eq!(frames_of(&m, 0), Ok(vec![3, 4]), "replaced");
    // FAST_CMP trusts the hash: the same stack still matches.
    assert_eq!(errno(m.stack_id(&[3, 4], FAST_CMP)), Ok(0));
}

#[test]
fn stack_trace_definitions_follow_the_kernel() {
    let t = temp_store("stack-defs");
    let mk = |k, v, n, f| errno(Map::create(&t.store, def(STACK_TRACE, k, v, n, f), "s").map(drop));
    use bpftime_maps::map::*;
    assert_eq!(mk(4, 8, 1, 0), Ok(()));
    assert_eq!(mk(8, 8, 1, 0), Err(libc::EINVAL), "key is a u32 id");
    assert_eq!(mk(4, 12, 1, 0), Err(libc::EINVAL), "frames are u64");
    assert_eq!(mk(4, 127 * 8, 1, 0), Ok(()));
    assert_eq!(
        mk(4, 128 * 8, 1, 0),
        Err(libc::EINVAL),
        "deeper than perf_event_max_stack"
    );
    assert_eq!(mk(4, 64, 1, BPF_F_STACK_BUILD_ID), Ok(()));
    assert_eq!(mk(4, 40, 1, BPF_F_STACK_BUILD_ID), Err(libc::EINVAL));
    assert_eq!(mk(4, 8, 1, BPF_F_RDONLY_PROG), Err(libc::EINVAL));
    assert_eq!(mk(4, 8, 1, BPF_F_RDONLY), Ok(()));
    assert_eq!(mk(4, 8, (1 << 31) + 1, 0), Err(libc::E2BIG));
}

// ---------------------------------------------------------------------------------------------
// Program arrays and maps of maps
// ---------------------------------------------------------------------------------------------

const PROG_ARRAY: u32 = 3;
const ARRAY_OF_MAPS: u32 = 12;
const HASH_OF_MAPS: u32 = 13;

fn fake_prog(t: &TempStore) -> u32 {
    let (id, _) = t
        .store
        .create(bpftime_maps::ObjectKind::Prog, "p", 64)
        .unwrap();
    t.store.publish(id);
    id
}

fn outer(t: &TempStore, ty: u32, key: u32, max: u32, inner: &Map) -> Result<Map, i32> {
    errno(Map::create_with(
        &t.store,
        def(ty, key, 4, max, 0),
        bpftime_maps::map::MapExtra {
            inner_map_id: inner.id(),
            ..Default::default()
        },
        "outer",
    ))
}

#[test]
fn prog_array_stores_program_ids() {
    let t = temp_store("progarr");
    let pa = Map::create(&t.store, def(PROG_ARRAY, 4, 4, 4, 0), "pa").unwrap();
    let (p1, p2) = (fake_prog(&t), fake_prog(&t));
    assert_eq!(errno(pa.update_id(&k32(0), p1, BPF_ANY)), Ok(None));
    assert_eq!(
        errno(pa.update_id(&k32(0), p2, BPF_ANY)),
        Ok(Some(p1)),
        "replaced id returned"
    );
    assert_eq!(pa.prog_array_get(0), Some(p2));
    assert_eq!(pa.prog_array_get(1), None);
    assert_eq!(pa.prog_array_get(9), None);
    let mut v = [0u8; 4];
    pa.lookup(&k32(0), &mut v).unwrap();
    assert_eq!(
        u32::from_ne_bytes(v),
        p2,
        "the syscall side sees the program id"
    );
    assert_eq!(errno(pa.lookup(&k32(1), &mut v)), Err(libc::ENOENT));
    assert_eq!(
        errno(pa.update_id(&k32(1), p1, BPF_NOEXIST)),
        Err(libc::EINVAL),
        "BPF_ANY only"
    );
    assert_eq!(errno(pa.update_id(&k32(4), p1, BPF_ANY)), Err(libc::E2BIG));
    assert_eq!(
        errno(pa.update_id(&k32(1), pa.id(), BPF_ANY)),
        Err(libc::EINVAL),
        "not a prog"
    );
    assert_eq!(
        errno(pa.update(&k32(1), &p1.to_ne_bytes(), BPF_ANY)),
        Err(libc::EINVAL)
    );
    assert_eq!(pa.held_ids(), vec![p2]);
    assert_eq!(errno(pa.delete_id(&k32(0))), Ok(p2));
    assert_eq!(errno(pa.delete_id(&k32(0))), Err(libc::ENOENT));
    assert_eq!(errno(pa.delete_id(&k32(4))), Err(libc::E2BIG));
    assert_eq!(errno(pa.lookup_ptr(&k32(0)).map(drop)), Err(libc::ENOENT));
    assert_eq!(keys_of(&pa), vec![0, 1, 2, 3], "iterates like an array");
    let mk = |v, f| errno(Map::create(&t.store, def(PROG_ARRAY, 4, v, 4, f), "x").map(drop));
    use bpftime_maps::map::*;
    assert_eq!(mk(8, 0), Err(libc::EINVAL), "values are 4-byte fds");
    assert_eq!(mk(4, BPF_F_RDONLY_PROG), Err(libc::EINVAL));
    assert_eq!(mk(4, BPF_F_MMAPABLE), Err(libc::EINVAL));
    assert_eq!(mk(4, BPF_F_RDONLY), Ok(()));
}

#[test]
fn array_of_maps_checks_the_inner_template() {
    let t = temp_store("aom");
    let tmpl = Map::create(&t.store, def(HASH, 4, 8, 16, 0), "tmpl").unwrap();
    let aom = outer(&t, ARRAY_OF_MAPS, 4, 4, &tmpl).unwrap();
    assert_eq!(aom.inner_template(), Some(*tmpl.def()));
    let same = Map::create(&t.store, def(HASH, 4, 8, 999, 0), "same").unwrap();
    let other = Map::create(&t.store, def(HASH, 4, 4, 16, 0), "other").unwrap();
    assert_eq!(
        errno(aom.update_id(&k32(1), same.id(), BPF_ANY)),
        Ok(None),
        "hash: any size"
    );
    assert_eq!(
        errno(aom.update_id(&k32(2), other.id(), BPF_ANY)),
        Err(libc::EINVAL),
        "value size differs"
    );
    assert_eq!(errno(aom.inner_map_id(&k32(1))), Ok(same.id()));
    assert_eq!(errno(aom.inner_map_id(&k32(2))), Err(libc::ENOENT));
    let mut v = [0u8; 4];
    aom.lookup(&k32(1), &mut v).unwrap();
    assert_eq!(u32::from_ne_bytes(v), same.id());
    assert_eq!(aom.held_ids(), vec![same.id()]);
    // No nesting, and a template is required.
    assert_eq!(
        outer(&t, ARRAY_OF_MAPS, 4, 4, &aom).map(drop),
        Err(libc::EINVAL)
    );
    assert_eq!(
        errno(Map::create(&t.store, def(ARRAY_OF_MAPS, 4, 4, 4, 0), "x").map(drop)),
        Err(libc::EINVAL)
    );
    assert_eq!(
        errno(aom.update_id(&k32(0), aom.id(), BPF_ANY)),
        Err(libc::EINVAL),
        "an outer map is no inner map"
    );
    // Arrays compare max_entries unless the template says BPF_F_INNER_MAP.
    let a4 = Map::create(&t.store, def(2, 4, 8, 4, 0), "a4").unwrap();
    let a8 = Map::create(&t.store, def(2, 4, 8, 8, 0), "a8").unwrap();
    let o = outer(&t, ARRAY_OF_MAPS, 4, 2, &a4).unwrap();
    assert_eq!(
        errno(o.update_id(&k32(0), a8.id(), BPF_ANY)),
        Err(libc::EINVAL)
    );
    let f = bpftime_maps::map::BPF_F_INNER_MAP;
    let i4 = Map::create(&t.store, def(2, 4, 8, 4, f), "i4").unwrap();
    let i8 = Map::create(&t.store, def(2, 4, 8, 8, f), "i8").unwrap();
    let o = outer(&t, ARRAY_OF_MAPS, 4, 2, &i4).unwrap();
    assert_eq!(errno(o.update_id(&k32(0), i8.id(), BPF_ANY)), Ok(None));
}

#[test]
fn hash_of_maps_honours_update_flags() {
    let t = temp_store("hom");
    let tmpl = Map::create(&t.store, def(2, 4, 8, 4, 0), "tmpl").unwrap();
    let m2 = Map::create(&t.store, def(2, 4, 8, 4, 0), "m2").unwrap();
    let hom = outer(&t, HASH_OF_MAPS, 8, 2, &tmpl).unwrap();
    let key = 77u64.to_ne_bytes();
    assert_eq!(
        errno(hom.update_id(&key, tmpl.id(), BPF_EXIST)),
        Err(libc::ENOENT)
    );
    assert_eq!(errno(hom.update_id(&key, tmpl.id(), BPF_NOEXIST)), Ok(None));
    assert_eq!(
        errno(hom.update_id(&key, m2.id(), BPF_NOEXIST)),
        Err(libc::EEXIST)
    );
    assert_eq!(
        errno(hom.update_id(&key, m2.id(), BPF_ANY)),
        Ok(Some(tmpl.id()))
    );
    assert_eq!(errno(hom.inner_map_id(&key)), Ok(m2.id()));
    assert_eq!(hom.held_ids(), vec![m2.id()]);
    assert_eq!(errno(hom.lookup_and_delete(&key, &mut [0; 4])), Err(524));
    assert_eq!(errno(hom.delete_id(&key)), Ok(m2.id()));
    assert_eq!(errno(hom.delete_id(&key)), Err(libc::ENOENT));
    assert!(hom.held_ids().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Batch operations
// ---------------------------------------------------------------------------------------------

use bpftime_maps::batch::BatchOp;

/// Walks a map with lookup batches of `step` elements (growing the step on `ENOSPC`, as a
/// caller must when a bucket does not fit); returns the (key, value) pairs seen.
fn batch_walk(m: &Map, mut step: u32, delete: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let ks = m.def().key_size as usize;
    let vs = m.syscall_value_size();
    let mut cursor: Option<Vec<u8>> = None;
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let out = match m.lookup_batch(cursor.as_deref(), step, 0, 0, delete) {
            Ok(o) => o,
            Err(e) if e.errno() == libc::ENOENT && seen.is_empty() => return seen,
            Err(e) => panic!("batch: {e}"),
        };
        assert_eq!(out.keys.len(), out.count as usize * ks);
        assert_eq!(out.values.len(), out.count as usize * vs);
        for i in 0..out.count as usize {
            seen.push((
                out.keys[i * ks..(i + 1) * ks].to_vec(),
                out.values[i * vs..(i + 1) * vs].to_vec(),
            ));
        }
        match out.err.map(|e| e.errno()) {
            None => {}
            Some(libc::ENOENT) => return seen,
            Some(libc::ENOSPC) => {
                assert_eq!(out.count, 0);
                step *= 2;
                continue;
            }
            Some(e) => panic!("errno {e}"),
        }
        if out.out_batch.is_some() {
            cursor = out.out_batch;
        }
    }
    panic!("batch walk does not end");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn hash_batches_visit_every_element_once(
        keys in proptest::collection::hash_set(0u32..1000, 0..40),
        step in 1u32..8,
        ty in prop_oneof![Just(HASH), Just(PERCPU_HASH), Just(LRU_HASH)],
    ) {
        let t = temp_store("batch-hash");
        let m = Map::create(&t.store, def(ty, 4, 8, 64, 0), "b").unwrap();
        let ncpu = m.nr_cpus() as usize;
        let mut model = std::collections::BTreeMap::new();
        for &k in &keys {
            let img = image(ncpu, 8, |c| u64::from(k) * 10 + c as u64);
            m.update_syscall(&k32(k), &img, BPF_ANY).unwrap();
            model.insert(k32(k).to_vec(), img);
        }
        let mut seen = batch_walk(&m, step, false);
        seen.sort();
        prop_assert_eq!(&seen, &model.clone().into_iter().collect::<Vec<_>>());
        // Lookup-and-delete batches empty the map.
        let mut taken = batch_walk(&m, step, true);
        taken.sort();
        prop_assert_eq!(taken, model.into_iter().collect::<Vec<_>>());
        prop_assert!(keys_of(&m).is_empty());
    }
}

#[test]
fn array_batches_follow_get_next_key() {
    let t = temp_store("batch-array");
    let m = Map::create(&t.store, def(2, 4, 8, 5, 0), "a").unwrap();
    for i in 0..5u32 {
        m.update(&k32(i), &u64::from(i * 7).to_ne_bytes(), BPF_ANY)
            .unwrap();
    }
    let out = m.lookup_batch(None, 2, 0, 0, false).unwrap();
    assert_eq!(out.count, 2);
    assert!(out.err.is_none());
    assert_eq!(
        out.out_batch.as_deref(),
        Some(&k32(1)[..]),
        "cursor = last key"
    );
    let out = m.lookup_batch(Some(&k32(1)), 10, 0, 0, false).unwrap();
    assert_eq!(out.count, 3, "partial count at the end");
    assert_eq!(out.err.map(|e| e.errno()), Some(libc::ENOENT));
    assert_eq!(&out.values[16..24], &28u64.to_ne_bytes());
    let out = m.lookup_batch(Some(&k32(4)), 10, 0, 0, false).unwrap();
    assert_eq!(
        (out.count, out.out_batch.is_none()),
        (0, true),
        "nothing: cursor untouched"
    );
    assert_eq!(out.err.map(|e| e.errno()), Some(libc::ENOENT));
    // Arrays have no delete batches; elem_flags other than BPF_F_LOCK are EINVAL.
    assert_eq!(
        errno(m.lookup_batch(None, 1, 0, 0, true).map(drop)),
        Err(524)
    );
    assert_eq!(
        errno(
            m.apply_batch(BatchOp::Delete, 1, 0, |_| Ok::<(), ()>(()))
                .map(drop)
        ),
        Err(524)
    );
    assert_eq!(
        errno(m.lookup_batch(None, 1, 1, 0, false).map(drop)),
        Err(libc::EINVAL)
    );
    // Count 0 does nothing.
    assert_eq!(m.lookup_batch(None, 0, 0, 0, false).unwrap().count, 0);
    // Update batches stop at the first failure and say how far they got.
    let (done, err) = m
        .apply_batch(BatchOp::Update, 4, 0, |i| {
            m.update_syscall(&k32(i + 2), &[1; 8], BPF_ANY)
        })
        .unwrap();
    assert_eq!((done, err.map(|e| e.errno())), (3, Some(libc::E2BIG)));
}

#[test]
fn batch_support_follows_the_kernel_ops_tables() {
    let t = temp_store("batch-support");
    let q = Map::create(&t.store, def(QUEUE, 0, 8, 4, 0), "q").unwrap();
    let h = Map::create(&t.store, def(HASH, 4, 8, 4, 0), "h").unwrap();
    for op in [
        BatchOp::Lookup,
        BatchOp::LookupAndDelete,
        BatchOp::Update,
        BatchOp::Delete,
    ] {
        assert!(!q.supports_batch(op));
        assert!(h.supports_batch(op));
    }
    assert_eq!(
        errno(h.lookup_batch(None, 4, 0, 1, false).map(drop)),
        Err(libc::EINVAL),
        "hash lookups check flags"
    );
    assert_eq!(
        errno(h.lookup_batch(Some(&k32(4)), 4, 0, 0, false).map(drop)),
        Err(libc::ENOENT),
        "cursor past the buckets"
    );
}
