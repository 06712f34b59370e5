//! Map lookups and updates per second: our shared-memory maps called from Rust, against kernel
//! maps through raw `bpf()` system calls, with 1 and 2 threads.
//!
//! - `ours-prog`: what a program's helper does (`Map::lookup_ptr`, the current CPU's value for
//!   per-CPU maps; `Map::update`).
//! - `ours-sys`: what the emulated `bpf()` does (`Map::lookup` copying the syscall-side value,
//!   every CPU's for per-CPU maps; `Map::update_syscall`).
//! - `kernel-sys`: `BPF_MAP_LOOKUP_ELEM` / `BPF_MAP_UPDATE_ELEM` on a kernel map (root only;
//!   skipped with a note otherwise). The kernel's own program-side cost is not measurable from
//!   userspace; its syscall path is the baseline a loader sees.
//!
//! Every map has 8-byte values and 1024 entries filled before measuring (the LRU map 1024
//! slots with 4096 keys in rotation for updates, so updates evict). With 2 threads, each
//! thread runs the full iteration count; throughput counts both.
//!
//! Run: `cargo bench --bench maps` (or `-- --warm-up-time 1 --measurement-time 2`).

use bpftime_maps::map::BPF_ANY;
use bpftime_maps::{Map, MapDef, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: u32 = 1024;

fn key(i: u64) -> [u8; 4] {
    ((i.wrapping_mul(2_654_435_761) % u64::from(N)) as u32).to_ne_bytes()
}

fn lru_key(i: u64) -> [u8; 4] {
    ((i.wrapping_mul(2_654_435_761) % (4 * u64::from(N))) as u32).to_ne_bytes()
}

/// A kernel map through raw bpf().
struct KMap(i32);

impl Drop for KMap {
    fn drop(&mut self) {
        // SAFETY: closing the fd this bench created.
        unsafe { libc::close(self.0) };
    }
}

fn bpf(cmd: i64, attr: &mut [u8; 72], size: usize) -> i64 {
    // SAFETY: `attr` is a live buffer of at least `size` bytes; the pointers in it point at
    // live buffers of the sizes the map was created with.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) }
}

impl KMap {
    fn create(ty: u32) -> Option<KMap> {
        let mut a = [0u8; 72];
        for (off, v) in [(0, ty), (4, 4), (8, 8), (12, N)] {
            a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        }
        let fd = bpf(0, &mut a, 72);
        (fd >= 0).then_some(KMap(fd as i32))
    }

    fn elem(&self, cmd: i64, k: &[u8], v: &mut [u8]) -> i64 {
        let mut a = [0u8; 72];
        a[..4].copy_from_slice(&(self.0 as u32).to_ne_bytes());
        a[8..16].copy_from_slice(&(k.as_ptr() as u64).to_ne_bytes());
        a[16..24].copy_from_slice(&(v.as_mut_ptr() as u64).to_ne_bytes());
        bpf(cmd, &mut a, 32)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Lookup,
    Update,
}

/// Runs `f(i)` for `iters` iterations on each of `threads` threads; returns the wall time.
fn parallel(threads: usize, iters: u64, f: &(dyn Fn(u64) + Sync)) -> Duration {
    let start = Instant::now();
    if threads == 1 {
        for i in 0..iters {
            f(i);
        }
        return start.elapsed();
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let base = t as u64 * 7919;
                for i in 0..iters {
                    f(base + i);
                }
            });
        }
    });
    start.elapsed()
}

fn bench_maps(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("bpftime-bench-maps-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let store = Arc::new(Store::open(&path).expect("store"));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("maps bench: not root, kernel maps skipped");
    }
    let types: [(&str, u32); 4] = [
        ("hash", 1),
        ("array", 2),
        ("percpu_array", 6),
        ("lru_hash", 9),
    ];
    for (name, ty) in types {
        let ours = Map::create(
            &store,
            MapDef {
                map_type: ty,
                key_size: 4,
                value_size: 8,
                max_entries: N,
                flags: 0,
            },
            name,
        )
        .expect("map");
        let kmap = if root { KMap::create(ty) } else { None };
        let vlen = ours.syscall_value_size();
        for i in 0..u64::from(N) {
            let img = vec![1u8; vlen];
            ours.update_syscall(&key(i), &img, BPF_ANY).expect("fill");
            if let Some(k) = &kmap {
                let mut v = img.clone();
                assert_eq!(k.elem(2, &key(i), &mut v), 0, "kernel fill");
            }
        }
        let lru = ty == 9;
        for op in [Op::Lookup, Op::Update] {
            let mut g = c.benchmark_group(format!(
                "maps/{name}/{}",
                if op == Op::Lookup { "lookup" } else { "update" }
            ));
            g.warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2))
                .sample_size(20);
            for threads in [1usize, 2] {
                g.throughput(Throughput::Elements(threads as u64));
                let kf = |i: u64| {
                    if lru && op == Op::Update {
                        lru_key(i)
                    } else {
                        key(i)
                    }
                };
                let prog = |i: u64| match op {
                    Op::Lookup => {
                        black_box(ours.lookup_ptr(&kf(i)).ok());
                    }
                    Op::Update => {
                        let _ = black_box(ours.update(&kf(i), &i.to_ne_bytes(), BPF_ANY));
                    }
                };
                g.bench_function(BenchmarkId::new("ours-prog", threads), |b| {
                    b.iter_custom(|iters| parallel(threads, iters, &prog))
                });
                let sys = |i: u64| {
                    let mut v = [0u8; 8 * 64];
                    let v = &mut v[..vlen];
                    match op {
                        Op::Lookup => {
                            let _ = black_box(ours.lookup(&kf(i), v));
                        }
                        Op::Update => {
                            v[..8].copy_from_slice(&i.to_ne_bytes());
                            let _ = black_box(ours.update_syscall(&kf(i), v, BPF_ANY));
                        }
                    }
                };
                g.bench_function(BenchmarkId::new("ours-sys", threads), |b| {
                    b.iter_custom(|iters| parallel(threads, iters, &sys))
                });
                if let Some(k) = &kmap {
                    let kern = |i: u64| {
                        let mut v = [0u8; 8 * 64];
                        let v = &mut v[..vlen];
                        let cmd = if op == Op::Lookup { 1 } else { 2 };
                        black_box(k.elem(cmd, &kf(i), v));
                    };
                    g.bench_function(BenchmarkId::new("kernel-sys", threads), |b| {
                        b.iter_custom(|iters| parallel(threads, iters, &kern))
                    });
                }
            }
            g.finish();
        }
    }
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, bench_maps);
criterion_main!(benches);
