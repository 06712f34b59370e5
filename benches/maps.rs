//! Map lookups and updates per second, ours against the kernel's in the same run, 1 and 2
//! threads:
//!
//! - *program*: one eBPF program — 256 (`BPFTIME_BENCH_ITER`) lookups or updates of
//!   pseudo-random keys in a loop —
//!   run by our checked JIT with the runtime's helpers on a store map (`jit`), and the same
//!   bytecode loaded into the kernel and run with `BPF_PROG_TEST_RUN` on a kernel map
//!   (`kernel`; the kernel inlines array and hash lookups). Also the JIT on a kernel-backed map
//!   (`--kernel-maps`: arrays through a shared mapping, other types one `bpf()` per helper).
//! - *syscall*: `BPF_MAP_LOOKUP_ELEM` / `BPF_MAP_UPDATE_ELEM` from a loader: through the
//!   syscall-server's emulated `bpf()` (`Emulator::bpf`: attr, key and value copied with
//!   `process_vm_readv`/`writev` as from an intercepted call, minus the interposer's hop) and
//!   the real `bpf()` on a kernel map.
//!
//! Maps: 4-byte keys, 8-byte values, 1024 entries filled before measuring; LRU updates use
//! 4096 keys so they evict. Each cell is the median of 5 runs of ~0.2 s; with 2 threads each
//! thread runs the loop and the figure is the total. Kernel cells need root (skipped with a
//! note otherwise). Prints a markdown table with ours / kernel ratios.
//!
//! Run: `cargo bench --bench maps`; under `cargo test --benches` it runs tiny sizes.
//! `BPFTIME_BENCH_RUNS` (default 5), `BPFTIME_BENCH_MS` (per run, default 200),
//! `BPFTIME_BENCH_MAPS` (comma-separated map types to run, default all), `BPFTIME_BENCH_OPS`
//! (`lookup` or `update`; default both), `BPFTIME_BENCH_JIT_ONLY=1` (only the JIT program
//! column, on stderr, no table: for profiling).

use bpftime_maps::{Map, MapDef, MapType, Store};
use bpftime_runtime::LoadedProg;
use bpftime_syscall_server::Emulator;
use bpftime_vm::isa::insns_from_bytes;
use std::hint::black_box;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: u32 = 1024;
/// Map operations per program run (`BPFTIME_BENCH_ITER`, default 256).
fn iter() -> i32 {
    static I: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *I.get_or_init(|| {
        std::env::var("BPFTIME_BENCH_ITER")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0 && n <= 4096)
            .unwrap_or(256)
    })
}

/// The real `bpf()` with the raw `syscall` instruction: this binary links the syscall-server,
/// whose `syscall()` interposer would answer libc's `syscall(SYS_bpf)` from the emulation.
fn kbpf(cmd: i64, attr: &mut [u8; 80], size: usize) -> Result<i64, i32> {
    let ret: i64;
    // SAFETY: the x86_64 Linux syscall ABI; `attr` is a live 80-byte buffer and every pointer
    // in it points at a live buffer of the size the command uses (callers' duty, local).
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") libc::SYS_bpf => ret,
            in("rdi") cmd,
            in("rsi") attr.as_mut_ptr(),
            in("rdx") size,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if (-4095..0).contains(&ret) {
        Err(-ret as i32)
    } else {
        Ok(ret)
    }
}

fn put(a: &mut [u8; 80], off: usize, v: &[u8]) {
    a[off..off + v.len()].copy_from_slice(v);
}

fn kmap_create(ty: u32) -> Option<OwnedFd> {
    let mut a = [0u8; 80];
    for (off, v) in [(0, ty), (4, 4), (8, 8), (12, N)] {
        put(&mut a, off, &v.to_ne_bytes());
    }
    let fd = kbpf(0, &mut a, 72).ok()?;
    // SAFETY: a new fd the kernel just returned.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn elem_attr(fd: i32, k: &[u8], v: &mut [u8]) -> [u8; 80] {
    let mut a = [0u8; 80];
    put(&mut a, 0, &(fd as u32).to_ne_bytes());
    put(&mut a, 8, &(k.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 16, &(v.as_mut_ptr() as u64).to_ne_bytes());
    a
}

fn key(i: u64, mask: u64) -> [u8; 4] {
    ((i.wrapping_mul(2_654_435_761) >> 7 & mask) as u32).to_ne_bytes()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Lookup,
    Update,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// The measured program: [`iter`] lookups or updates of keys `hash(seed + i) & mask`, where
/// `seed` is `bpf_get_prandom_u32()`. `map` is the `lddw` immediate (a kernel fd, or our id).
fn program(op: Op, map: i32, mask: i32) -> Vec<u8> {
    let mut p = vec![
        insn(0x85, 0, 0, 0, 7), // call bpf_get_prandom_u32
        insn(0xbf, 7, 0, 0, 0), // r7 = r0
        insn(0xb7, 6, 0, 0, 0), // r6 = 0
    ];
    let top = p.len();
    p.extend([
        insn(0xbf, 1, 7, 0, 0),                     // r1 = r7
        insn(0x0f, 1, 6, 0, 0),                     // r1 += r6
        insn(0x27, 1, 0, 0, 0x9E37_79B1u32 as i32), // r1 *= golden ratio
        insn(0x77, 1, 0, 0, 7),                     // r1 >>= 7
        insn(0x57, 1, 0, 0, mask),                  // r1 &= mask
        insn(0x63, 10, 1, -4, 0),                   // *(u32 *)(r10 - 4) = r1
        insn(0xbf, 2, 10, 0, 0),                    // r2 = r10
        insn(0x07, 2, 0, 0, -4),                    // r2 -= 4
        insn(0x18, 1, 1, 0, map),                   // r1 = map
        insn(0, 0, 0, 0, 0),
    ]);
    match op {
        Op::Lookup => p.push(insn(0x85, 0, 0, 0, 1)), // bpf_map_lookup_elem
        Op::Update => p.extend([
            insn(0x7b, 10, 6, -16, 0), // *(u64 *)(r10 - 16) = r6
            insn(0xbf, 3, 10, 0, 0),   // r3 = r10
            insn(0x07, 3, 0, 0, -16),  // r3 -= 16
            insn(0xb7, 4, 0, 0, 0),    // r4 = BPF_ANY
            insn(0x85, 0, 0, 0, 2),    // bpf_map_update_elem
        ]),
    }
    p.push(insn(0x07, 6, 0, 0, 1)); // r6 += 1
    let back = top as i16 - p.len() as i16 - 1;
    p.push(insn(0xa5, 6, 0, back, iter())); // if r6 < ITER goto top
    p.push(insn(0xb7, 0, 0, 0, 0));
    p.push(insn(0x95, 0, 0, 0, 0));
    p.concat()
}

/// Loads `bytes` into the kernel as a socket filter (which `BPF_PROG_TEST_RUN` runs).
fn kprog_load(bytes: &[u8]) -> OwnedFd {
    let lic = b"GPL\0";
    let mut log = vec![0u8; 1 << 20];
    let mut a = [0u8; 80];
    put(&mut a, 0, &1u32.to_ne_bytes());
    put(&mut a, 4, &((bytes.len() / 8) as u32).to_ne_bytes());
    put(&mut a, 8, &(bytes.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 16, &(lic.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 24, &1u32.to_ne_bytes());
    put(&mut a, 28, &(log.len() as u32).to_ne_bytes());
    put(&mut a, 32, &(log.as_mut_ptr() as u64).to_ne_bytes());
    match kbpf(5, &mut a, 72) {
        // SAFETY: a new fd the kernel just returned.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
        Err(e) => {
            let n = log.iter().position(|&b| b == 0).unwrap_or(0);
            panic!(
                "kernel program rejected ({e}): {}",
                String::from_utf8_lossy(&log[..n])
            )
        }
    }
}

/// `BPF_PROG_TEST_RUN` of `prog` `repeat` times.
fn kprog_run(prog: &OwnedFd, repeat: u32) {
    let pkt = [0u8; 64];
    let mut a = [0u8; 80];
    put(&mut a, 0, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut a, 8, &(pkt.len() as u32).to_ne_bytes());
    put(&mut a, 16, &(pkt.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 32, &repeat.to_ne_bytes());
    kbpf(10, &mut a, 80).expect("BPF_PROG_TEST_RUN");
}

/// Runs `batch(thread)` (returning the operations it did) on `threads` threads until `dur`
/// passed; operations per second (millions).
fn rate(threads: usize, dur: Duration, batch: &(dyn Fn(usize) -> u64 + Sync)) -> f64 {
    rate_cpu(threads, dur, batch).0
}

/// This process's CPU time so far (all threads), in ns.
fn cpu_ns() -> u64 {
    // SAFETY: all-zero is a valid `rusage`, which getrusage fills.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// [`rate`], and the CPU time per operation (ns) over all threads: unlike the rate, it does
/// not depend on how much of the machine other work leaves us, and it grows with contention.
fn rate_cpu(threads: usize, dur: Duration, batch: &(dyn Fn(usize) -> u64 + Sync)) -> (f64, f64) {
    let cpu0 = cpu_ns();
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut ops = 0;
                    loop {
                        ops += batch(t);
                        if start.elapsed() >= dur {
                            break ops;
                        }
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    });
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_ns().saturating_sub(cpu0);
    (total as f64 / secs / 1e6, cpu as f64 / total.max(1) as f64)
}

fn median(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..runs).map(|_| f()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A program run by our JIT on map `id` of `store` (one per thread).
fn our_progs(store: &Arc<Store>, op: Op, id: u32, mask: i32, threads: usize) -> Vec<LoadedProg> {
    let helpers = Arc::new(bpftime_runtime::helpers::registry());
    (0..threads)
        .map(|_| {
            let insns = insns_from_bytes(&program(op, id as i32, mask)).expect("decode");
            LoadedProg::from_insns(store, 0, "bench".into(), insns, helpers.clone())
                .and_then(|p| p.with_engine(bpftime_runtime::Engine::Jit { checked: true }))
                .expect("load our program")
        })
        .collect()
}

fn run_ours(progs: &[LoadedProg], t: usize, runs: u32) -> u64 {
    let mut ctx = [0u8; 64];
    for _ in 0..runs {
        // SAFETY: `ctx` is a live 64-byte buffer for the run.
        let r = unsafe { progs[t].run(ctx.as_mut_ptr(), ctx.len()) };
        black_box(r.expect("our program trapped"));
    }
    u64::from(runs) * iter() as u64
}

/// Hash and LRU updates straight through [`Map::update`] (what the helper does, without the
/// VM): 1 and 2 threads, for the free lists' scaling (1,024 keys in a 2,048-entry hash map; a
/// full 1,024-entry LRU map updated with 4,096 keys).
fn update_scaling(store: &Arc<Store>, runs: usize, dur: Duration) {
    println!(
        "\n| map | op | 1 thread | 2 threads | 2 / 1 | CPU ns/op, 1 thread | CPU ns/op, 2 threads |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, ty, mask) in [
        ("hash", MapType::Hash, 1023u64),
        ("lru_hash", MapType::LruHash, 4095),
    ] {
        // The hash map has room to spare, so replacing a value takes a free element and frees
        // the old one (the free lists' traffic); the LRU map is full and evicts.
        let def = MapDef {
            map_type: ty as u32,
            key_size: 4,
            value_size: 8,
            max_entries: if ty == MapType::Hash { 2 * N } else { N },
            flags: 0,
        };
        let m = Map::create(store, def, name).expect("map");
        for i in 0..u64::from(N) {
            m.update(&(i as u32).to_ne_bytes(), &i.to_ne_bytes(), 0)
                .expect("fill");
        }
        let r: Vec<(f64, f64)> = [1usize, 2]
            .iter()
            .map(|&threads| {
                let mut v: Vec<(f64, f64)> = (0..runs)
                    .map(|_| {
                        rate_cpu(threads, dur, &|t| {
                            for i in 0..256u64 {
                                let k = key(i + t as u64 * 7919 + u64::from(next_seed()), mask);
                                let _ = black_box(m.update(&k, &i.to_ne_bytes(), 0));
                            }
                            256
                        })
                    })
                    .collect();
                let mut rates: Vec<f64> = v.iter().map(|x| x.0).collect();
                rates.sort_by(f64::total_cmp);
                v.sort_by(|a, b| a.1.total_cmp(&b.1));
                (rates[rates.len() / 2], v[v.len() / 2].1)
            })
            .collect();
        let op = if ty == MapType::LruHash {
            "update (evicting)"
        } else {
            "update"
        };
        println!(
            "| {name} | {op} | {:.2} | {:.2} | {:.2}× | {:.0} | {:.0} |",
            r[0].0,
            r[1].0,
            r[1].0 / r[0].0,
            r[0].1,
            r[1].1
        );
    }
}

/// A cheap per-call seed so batches do not repeat the same keys.
fn next_seed() -> u32 {
    static S: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    S.fetch_add(0x9E37_79B9, std::sync::atomic::Ordering::Relaxed)
}

struct Row {
    map: &'static str,
    op: Op,
    threads: usize,
    jit: f64,
    kprog: Option<f64>,
    jit_kmap: Option<f64>,
    emu: f64,
    ksys: Option<f64>,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = if full {
        env("BPFTIME_BENCH_RUNS", 5) as usize
    } else {
        1
    };
    let dur = Duration::from_millis(if full {
        env("BPFTIME_BENCH_MS", 200)
    } else {
        5
    });
    let path =
        std::path::Path::new("/dev/shm").join(format!("bpftime-bench-maps-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let store = Arc::new(Store::open(&path).expect("store"));
    let emu = Emulator::new(store.clone());
    let kernel = bpftime_maps::kernel::probe_create().is_ok()
        && bpftime_maps::kernel::probe_open_by_id().is_ok();
    if !kernel {
        eprintln!("maps bench: no BPF privileges (not root): kernel columns skipped");
    }
    let types = [
        ("hash", MapType::Hash),
        ("array", MapType::Array),
        ("percpu_array", MapType::PercpuArray),
        ("lru_hash", MapType::LruHash),
    ];
    let mut rows = Vec::new();
    // `BPFTIME_BENCH_ONLY=scaling`: only the update-scaling table.
    let only_scaling = std::env::var("BPFTIME_BENCH_ONLY").is_ok_and(|v| v == "scaling");
    // `BPFTIME_BENCH_JIT_ONLY=1`: only the JIT program column, printed as it goes (profiling).
    let jit_only = std::env::var("BPFTIME_BENCH_JIT_ONLY").is_ok_and(|v| v == "1");
    // `BPFTIME_BENCH_MAPS=hash,lru_hash`: only these map types.
    let only_types = std::env::var("BPFTIME_BENCH_MAPS").ok();
    let wanted = |name: &str| {
        only_types
            .as_deref()
            .is_none_or(|l| l.split(',').any(|t| t == name))
    };
    for (name, ty) in types
        .into_iter()
        .filter(|(name, _)| !only_scaling && wanted(name))
    {
        let def = MapDef {
            map_type: ty as u32,
            key_size: 4,
            value_size: 8,
            max_entries: N,
            flags: 0,
        };
        // Ours, created through the emulated bpf() (the loader's path), and a kernel map.
        let mut a = [0u8; 80];
        for (off, v) in [(0, ty as u32), (4, 4), (8, 8), (12, N)] {
            put(&mut a, off, &v.to_ne_bytes());
        }
        let efd = emu
            .bpf(0, a.as_ptr() as u64, 72)
            .expect("emulated MAP_CREATE") as i32;
        let eid = emu.entry(efd).expect("our fd").id;
        let ours = Map::open(&store, eid).expect("open ours");
        let kfd = if kernel { kmap_create(ty as u32) } else { None };
        let kshared = if kernel {
            let (rec, fd) =
                Map::create_in_kernel(&store, def, 0, name, 0).expect("kernel-backed map");
            Some((Map::open(&store, rec.id()).expect("connect"), fd))
        } else {
            None
        };
        let vlen = ours.syscall_value_size();
        for i in 0..u64::from(N) {
            let k = (i as u32).to_ne_bytes();
            let mut v = vec![1u8; vlen];
            ours.update_syscall(&k, &v, 0).expect("fill ours");
            if let Some(fd) = &kfd {
                let mut at = elem_attr(fd.as_raw_fd(), &k, &mut v);
                kbpf(2, &mut at, 32).expect("fill kernel");
            }
            if let Some((m, _)) = &kshared {
                m.update_syscall(&k, &v, 0).expect("fill kernel-backed");
            }
        }
        let ops = match std::env::var("BPFTIME_BENCH_OPS").as_deref() {
            Ok("lookup") => &[Op::Lookup][..],
            Ok("update") => &[Op::Update][..],
            _ => &[Op::Lookup, Op::Update][..],
        };
        for &op in ops {
            let lru_evicting = ty == MapType::LruHash && op == Op::Update;
            let mask: i32 = if lru_evicting { 4095 } else { 1023 };
            for threads in [1usize, 2] {
                let progs = our_progs(&store, op, eid, mask, threads);
                let jit = median(runs, || rate(threads, dur, &|t| run_ours(&progs, t, 64)));
                if jit_only {
                    eprintln!("{name} {op:?} {threads}T: jit {jit:.2}");
                    continue;
                }
                let kprog = kfd.as_ref().map(|fd| {
                    let kp = kprog_load(&program(op, fd.as_raw_fd(), mask));
                    median(runs, || {
                        rate(threads, dur, &|_| {
                            kprog_run(&kp, 64);
                            64 * iter() as u64
                        })
                    })
                });
                let jit_kmap = kshared.as_ref().map(|(m, _)| {
                    let progs = our_progs(&store, op, m.id(), mask, threads);
                    median(runs, || rate(threads, dur, &|t| run_ours(&progs, t, 4)))
                });
                let sys_mask = u64::from(mask as u32);
                let emu_rate = median(runs, || {
                    rate(threads, dur, &|t| {
                        let mut v = vec![0u8; vlen];
                        for i in 0..256u64 {
                            let k = key(i + t as u64 * 7919, sys_mask);
                            v[..8].copy_from_slice(&i.to_ne_bytes());
                            let at = elem_attr(efd, &k, &mut v);
                            let cmd = if op == Op::Lookup { 1 } else { 2 };
                            let _ = black_box(emu.bpf(cmd, at.as_ptr() as u64, 32));
                        }
                        256
                    })
                });
                let ksys = kfd.as_ref().map(|fd| {
                    median(runs, || {
                        rate(threads, dur, &|t| {
                            let mut v = vec![0u8; vlen];
                            for i in 0..256u64 {
                                let k = key(i + t as u64 * 7919, sys_mask);
                                v[..8].copy_from_slice(&i.to_ne_bytes());
                                let mut at = elem_attr(fd.as_raw_fd(), &k, &mut v);
                                let cmd = if op == Op::Lookup { 1 } else { 2 };
                                let _ = black_box(kbpf(cmd, &mut at, 32));
                            }
                            256
                        })
                    })
                });
                let row = Row {
                    map: name,
                    op,
                    threads,
                    jit,
                    kprog,
                    jit_kmap,
                    emu: emu_rate,
                    ksys,
                };
                eprintln!(
                    "{name} {op:?} {threads}T: jit {:.2} kernel prog {:?} jit-on-kernel-map {:?} \
                     emulated bpf {:.3} kernel bpf {:?}",
                    row.jit, row.kprog, row.jit_kmap, row.emu, row.ksys
                );
                rows.push(row);
            }
        }
        let _ = emu.close(efd);
    }
    let f = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.2}"));
    let ratio = |a: f64, b: Option<f64>| b.map_or("–".to_string(), |b| format!("{:.2}×", a / b));
    println!(
        "\n| map | op | threads | JIT program | kernel program | JIT / kernel | JIT on kernel map \
         | emulated bpf() | kernel bpf() | emulated / kernel |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let op = match (r.op, r.map) {
            (Op::Update, "lru_hash") => "update (evicting)",
            (Op::Update, _) => "update",
            (Op::Lookup, _) => "lookup",
        };
        println!(
            "| {} | {op} | {} | {:.2} | {} | {} | {} | {:.3} | {} | {} |",
            r.map,
            r.threads,
            r.jit,
            f(r.kprog),
            ratio(r.jit, r.kprog),
            f(r.jit_kmap),
            r.emu,
            r.ksys.map_or("–".to_string(), |v| format!("{v:.3}")),
            ratio(r.emu, r.ksys),
        );
    }
    println!("\nmillions of operations per second (2 threads: both threads' operations)");
    if !jit_only {
        update_scaling(&store, runs, dur);
    }
    let _ = std::fs::remove_file(&path);
}
