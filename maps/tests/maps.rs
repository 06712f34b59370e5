//! Map semantics against a model, and processes sharing (and dying inside) a store.
//!
//! Cross-process tests re-run this test binary as the child (`child_*` tests do nothing unless
//! `BPFTIME_MAPS_CHILD` is set), so the children are real processes mapping the same store.

use bpftime_maps::map::{BPF_ANY, BPF_EXIST, BPF_NOEXIST};
use bpftime_maps::{Map, MapDef, Store};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn temp_store(tag: &str) -> (Arc<Store>, PathBuf) {
    let p = std::env::temp_dir().join(format!(
        "bpftime-maps-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    (Arc::new(Store::open(&p).unwrap()), p)
}

fn hash_def(max: u32) -> MapDef {
    MapDef {
        map_type: 1,
        key_size: 4,
        value_size: 8,
        max_entries: max,
        flags: 0,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Update(u32, u64, u64),
    Delete(u32),
    Lookup(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..24, any::<u64>(), 0u64..4).prop_map(|(k, v, f)| Op::Update(k, v, f)),
        (0u32..24).prop_map(Op::Delete),
        (0u32..24).prop_map(Op::Lookup),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn hash_map_matches_model_and_kernel_errnos(ops in proptest::collection::vec(op(), 1..200)) {
        let (store, path) = temp_store("model");
        let max = 16;
        let map = Map::create(&store, hash_def(max), "model").unwrap();
        let mut model: HashMap<u32, u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Update(k, v, flags) => {
                    let r = map.update(&k.to_ne_bytes(), &v.to_ne_bytes(), flags);
                    let expect = match flags {
                        f if f > BPF_EXIST => Err(libc::EINVAL),
                        BPF_NOEXIST if model.contains_key(&k) => Err(libc::EEXIST),
                        BPF_EXIST if !model.contains_key(&k) => Err(libc::ENOENT),
                        _ if !model.contains_key(&k) && model.len() == max as usize => Err(libc::E2BIG),
                        _ => { model.insert(k, v); Ok(()) }
                    };
                    prop_assert_eq!(r.map_err(|e| e.errno()), expect);
                }
                Op::Delete(k) => {
                    let r = map.delete(&k.to_ne_bytes()).map_err(|e| e.errno());
                    let expect = model.remove(&k).map(|_| ()).ok_or(libc::ENOENT);
                    prop_assert_eq!(r, expect);
                }
                Op::Lookup(k) => {
                    let mut out = [0u8; 8];
                    let r = map.lookup(&k.to_ne_bytes(), &mut out).map(|_| u64::from_ne_bytes(out));
                    prop_assert_eq!(r.map_err(|e| e.errno()), model.get(&k).copied().ok_or(libc::ENOENT));
                }
            }
        }
        // Iteration visits every key exactly once.
        let mut seen = Vec::new();
        let mut key: Option<[u8; 4]> = None;
        loop {
            let mut out = [0u8; 4];
            match map.next_key(key.as_ref().map(|k| &k[..]), &mut out) {
                Ok(()) => { seen.push(u32::from_ne_bytes(out)); key = Some(out); }
                Err(e) => { prop_assert_eq!(e.errno(), libc::ENOENT); break; }
            }
            prop_assert!(seen.len() <= model.len(), "iteration does not terminate");
        }
        seen.sort();
        let mut keys: Vec<u32> = model.keys().copied().collect();
        keys.sort();
        prop_assert_eq!(seen, keys);
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn array_map_has_kernel_semantics() {
    let (store, path) = temp_store("array");
    let def = MapDef {
        map_type: 2,
        key_size: 4,
        value_size: 12,
        max_entries: 3,
        flags: 0,
    };
    let m = Map::create(&store, def, "arr").unwrap();
    let mut v = [0u8; 12];
    m.lookup(&1u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(v, [0; 12], "elements start zeroed");
    m.update(&1u32.to_ne_bytes(), &[7; 12], BPF_ANY).unwrap();
    m.lookup(&1u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(v, [7; 12]);
    let errno = |r: Result<(), bpftime_maps::MapError>| r.unwrap_err().errno();
    assert_eq!(
        errno(m.update(&3u32.to_ne_bytes(), &[0; 12], BPF_ANY)),
        libc::E2BIG
    );
    assert_eq!(
        errno(m.update(&0u32.to_ne_bytes(), &[0; 12], BPF_NOEXIST)),
        libc::EEXIST
    );
    assert_eq!(
        errno(m.update(&0u32.to_ne_bytes(), &[0; 12], 9)),
        libc::EINVAL
    );
    assert_eq!(errno(m.lookup(&3u32.to_ne_bytes(), &mut v)), libc::ENOENT);
    assert_eq!(errno(m.delete(&0u32.to_ne_bytes())), libc::EINVAL);
    let mut k = [0u8; 4];
    m.next_key(None, &mut k).unwrap();
    assert_eq!(u32::from_ne_bytes(k), 0);
    m.next_key(Some(&1u32.to_ne_bytes()), &mut k).unwrap();
    assert_eq!(u32::from_ne_bytes(k), 2);
    assert_eq!(
        errno(m.next_key(Some(&2u32.to_ne_bytes()), &mut k)),
        libc::ENOENT
    );
    m.next_key(Some(&99u32.to_ne_bytes()), &mut k).unwrap();
    assert_eq!(u32::from_ne_bytes(k), 0, "an absent key restarts at 0");
    // Frozen: syscall-side writes refused with EPERM.
    m.freeze();
    assert_eq!(
        errno(m.update_syscall(&0u32.to_ne_bytes(), &[1; 12], BPF_ANY)),
        libc::EPERM
    );
    // Data is page-aligned for mmap.
    assert_eq!(m.data_offset() % 4096, 0);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn bad_definitions_get_kernel_errnos() {
    let (store, path) = temp_store("defs");
    let mk = |t, k, v, n| {
        Map::create(
            &store,
            MapDef {
                map_type: t,
                key_size: k,
                value_size: v,
                max_entries: n,
                flags: 0,
            },
            "x",
        )
        .map(|_| ())
        .map_err(|e| e.errno())
    };
    assert_eq!(
        mk(2, 8, 4, 1),
        Err(libc::EINVAL),
        "array key must be 4 bytes"
    );
    assert_eq!(mk(1, 4, 0, 1), Err(libc::EINVAL));
    assert_eq!(mk(1, 4, 4, 0), Err(libc::EINVAL));
    assert_eq!(
        mk(1, 4, 4 << 20, 1),
        Err(libc::E2BIG),
        "key + value past KMALLOC_MAX_SIZE"
    );
    assert_eq!(mk(999, 4, 4, 1), Err(libc::EINVAL));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn map_opened_by_id_sees_the_same_data() {
    let (store, path) = temp_store("reopen");
    let m = Map::create(&store, hash_def(8), "h").unwrap();
    m.update(&5u32.to_ne_bytes(), &42u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    let other = Arc::new(Store::open(&path).unwrap());
    let m2 = Map::open(&other, m.id()).unwrap();
    let mut v = [0u8; 8];
    m2.lookup(&5u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 42);
    std::fs::remove_file(path).unwrap();
}

fn run_child(test: &str, path: &std::path::Path, arg: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("BPFTIME_MAPS_CHILD", format!("{}|{arg}", path.display()))
        // The child's own test-harness summary must not mix into ours.
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn child_args() -> Option<(Arc<Store>, String)> {
    let v = std::env::var("BPFTIME_MAPS_CHILD").ok()?;
    let (p, arg) = v.split_once('|')?;
    Some((
        Arc::new(Store::open(std::path::Path::new(p)).unwrap()),
        arg.to_string(),
    ))
}

/// Child: inserts keys `base..base+1000` into map id 1 of the store.
#[test]
fn child_insert_keys() {
    let Some((store, arg)) = child_args() else {
        return;
    };
    let (id, base) = arg.split_once(',').unwrap();
    let m = Map::open(&store, id.parse().unwrap()).unwrap();
    let base: u32 = base.parse().unwrap();
    for k in base..base + 1000 {
        m.update(&k.to_ne_bytes(), &u64::from(k).to_ne_bytes(), BPF_NOEXIST)
            .unwrap();
    }
}

#[test]
fn four_processes_insert_concurrently_and_nothing_is_lost() {
    let (store, path) = temp_store("procs");
    let m = Map::create(&store, hash_def(4096), "shared").unwrap();
    let kids: Vec<_> = (0..4)
        .map(|i| {
            run_child(
                "child_insert_keys",
                &path,
                &format!("{},{}", m.id(), i * 1000),
            )
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    for k in 0..4000u32 {
        let mut v = [0u8; 8];
        m.lookup(&k.to_ne_bytes(), &mut v)
            .unwrap_or_else(|e| panic!("key {k}: {e}"));
        assert_eq!(u64::from_ne_bytes(v), u64::from(k));
    }
    // 4000 of 4096 used: 96 more fit, then the map is full.
    for k in 10_000..10_096u32 {
        m.update(&k.to_ne_bytes(), &[0; 8], BPF_NOEXIST).unwrap();
    }
    assert_eq!(
        m.update(&9999u32.to_ne_bytes(), &[0; 8], BPF_ANY)
            .unwrap_err()
            .errno(),
        libc::E2BIG
    );
    std::fs::remove_file(path).unwrap();
}

/// Child: hammers updates on one key forever (until killed).
#[test]
fn child_hammer_forever() {
    let Some((store, arg)) = child_args() else {
        return;
    };
    let m = Map::open(&store, arg.parse().unwrap()).unwrap();
    let mut i = 0u64;
    loop {
        for k in 0..8u32 {
            let _ = m.update(&k.to_ne_bytes(), &i.to_ne_bytes(), BPF_ANY);
            let _ = m.delete(&(k + 8).to_ne_bytes());
            let _ = m.update(&(k + 8).to_ne_bytes(), &i.to_ne_bytes(), BPF_ANY);
        }
        i += 1;
    }
}

#[test]
fn process_killed_mid_update_leaves_map_usable() {
    let (store, path) = temp_store("kill");
    let m = Map::create(&store, hash_def(64), "victim").unwrap();
    for round in 0..5 {
        let mut kid = run_child("child_hammer_forever", &path, &m.id().to_string());
        std::thread::sleep(std::time::Duration::from_millis(150 + round * 37));
        // SIGKILL at an arbitrary point, possibly holding a bucket lock.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(kid.id() as i32, libc::SIGKILL) };
        kid.wait().unwrap();
        // Every key can still be written, read and deleted (locks recovered, chains intact).
        for k in 0..16u32 {
            m.update(&k.to_ne_bytes(), &7u64.to_ne_bytes(), BPF_ANY)
                .unwrap_or_else(|e| panic!("round {round}, key {k}: {e}"));
            let mut v = [0u8; 8];
            m.lookup(&k.to_ne_bytes(), &mut v).unwrap();
            assert_eq!(u64::from_ne_bytes(v), 7);
        }
        for k in 0..16u32 {
            m.delete(&k.to_ne_bytes()).unwrap();
        }
    }
    std::fs::remove_file(path).unwrap();
}
