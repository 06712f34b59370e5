//! Ring buffer throughput and wake-up latency, on the maps crate's producer and consumer paths
//! (what `bpf_ringbuf_reserve`/`submit` and libbpf's `ring_buffer__poll` do, minus the VM):
//!
//! - events/s with 1 and 8 producers (threads in this process, and 8 producers as 4 processes
//!   × 2 threads), 24-byte events (the examples' `struct event`) reserved, written and
//!   submitted, while one consumer thread drains the ring. Producers retry when the ring is
//!   full (back-pressure, counted), so nothing is lost; the consumer checks every event.
//! - the same without a consumer (the ring holds every event): the producer side alone.
//! - wake-up latency: a consumer asleep on its wake-up socket (armed), a producer (thread or
//!   other process) commits a record stamped with `CLOCK_MONOTONIC`; the consumer's wake-up
//!   time minus the stamp, p50/p90/p99.
//!
//! `cargo bench --bench ringbuf`; under `cargo test --benches` it runs tiny sizes.
//! Environment: `BPFTIME_BENCH_EVENTS` (events per producer, default 2,000,000),
//! `BPFTIME_BENCH_CASE` (only the throughput cases whose name contains it; no latency cases),
//! `BPFTIME_BENCH_BACKOFF=yield` (producers finding the ring full yield instead of sleeping).

use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::shm::monotonic_raw_ns;
use bpftime_maps::wake::WakeSocket;
use bpftime_maps::{Map, MapDef, Store};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "BPFTIME_RB_BENCH_CHILD";
const EVENT: usize = 24;

fn temp_store(tag: &str) -> (Arc<Store>, PathBuf) {
    // tmpfs, as the product's stores (`/dev/shm/bpftime-<uid>-<name>`).
    let p = Path::new("/dev/shm").join(format!(
        "bpftime-rb-bench-{tag}-{}-{}",
        std::process::id(),
        monotonic_raw_ns()
    ));
    (Arc::new(Store::open(&p).expect("store")), p)
}

fn ringbuf(store: &Arc<Store>, size: u32) -> Map {
    let def = MapDef {
        map_type: 27,
        key_size: 0,
        value_size: 0,
        max_entries: size,
        flags: 0,
    };
    Map::create(store, def, "bench").expect("ringbuf")
}

fn event(producer: u32, seq: u64) -> [u8; EVENT] {
    let mut e = [0u8; EVENT];
    e[..4].copy_from_slice(&producer.to_ne_bytes());
    e[8..16].copy_from_slice(&seq.wrapping_mul(3).to_ne_bytes());
    e[16..24].copy_from_slice(&seq.to_ne_bytes());
    e
}

/// How a producer waits for room: sleeps 50 µs, or with `BPFTIME_BENCH_BACKOFF=yield` yields
/// the CPU (to the consumer, when it is runnable).
fn backoff_sleeps() -> bool {
    static S: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *S.get_or_init(|| !std::env::var("BPFTIME_BENCH_BACKOFF").is_ok_and(|v| v == "yield"))
}

/// Produces `n` events as `producer`, retrying while the ring is full; returns the retries.
fn produce(rb: &RingBuf<'_>, producer: u32, n: u64) -> u64 {
    let mut retries = 0;
    for seq in 0..n {
        let e = event(producer, seq);
        loop {
            if let Some(r) = rb.reserve(EVENT as u64) {
                rb.write(&r, &e).expect("write");
                rb.submit(&r, 0);
                break;
            }
            retries += 1;
            // Back-pressure: leave the CPU to the consumer.
            if backoff_sleeps() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
    }
    retries
}

/// Consumes until `total` events arrived; checks each producer's sequence. Sleeps on a wake-up
/// socket when the ring is empty.
fn consume(rb: &RingBuf<'_>, total: u64, producers: usize) {
    let sock = WakeSocket::new().expect("socket");
    let mut next = vec![0u64; producers];
    let mut got = 0u64;
    while got < total {
        got += rb.consume(|s| {
            let p = u32::from_ne_bytes(s[..4].try_into().unwrap()) as usize;
            let seq = u64::from_ne_bytes(s[16..24].try_into().unwrap());
            assert_eq!(seq, next[p], "producer {p}: lost or reordered event");
            assert_eq!(&s[8..16], &seq.wrapping_mul(3).to_ne_bytes());
            next[p] += 1;
        }) as u64;
        if got < total && !rb.arm(sock.nonce()) {
            sock.wait(100);
        }
        rb.disarm();
    }
    assert!(next.iter().all(|&n| n == total / producers as u64));
}

struct Run {
    events: u64,
    secs: f64,
    /// CPU time of producers and consumer (this process and its children).
    cpu_ns: u64,
    retries: u64,
}

/// CPU time used so far by this process and its waited-for children, in ns.
fn cpu_ns() -> u64 {
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    let mut total = 0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: all-zero is a valid `rusage`, which getrusage fills.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is a valid out-pointer for the call.
        unsafe { libc::getrusage(who, &mut u) };
        total += tv(u.ru_utime) + tv(u.ru_stime);
    }
    total
}

fn threads(producers: u32, per: u64, with_consumer: bool) -> Run {
    let (store, path) = temp_store("thr");
    let total = per * u64::from(producers);
    // With a consumer: 16 MiB; without: room for every record (32 bytes each).
    let size = if with_consumer {
        16 << 20
    } else {
        (total * 32 + 4096).next_power_of_two().max(4096) as u32
    };
    let m = ringbuf(&store, size);
    // Touch every page of the ring once (fill and drain it), so page faults are not measured.
    {
        let rb = RingBuf::new(&m).unwrap();
        while let Some(r) = rb.reserve(4000) {
            rb.submit(&r, 0);
        }
        rb.consume(|_| {});
    }
    let retries = AtomicU64::new(0);
    let cpu0 = cpu_ns();
    let start = Instant::now();
    std::thread::scope(|s| {
        for p in 0..producers {
            let m = m.clone();
            let retries = &retries;
            s.spawn(move || {
                let rb = RingBuf::new(&m).unwrap();
                retries.fetch_add(produce(&rb, p, per), Ordering::Relaxed);
            });
        }
        if with_consumer {
            let rb = RingBuf::new(&m).unwrap();
            consume(&rb, total, producers as usize);
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_ns() - cpu0;
    if !with_consumer {
        consume(&RingBuf::new(&m).unwrap(), total, producers as usize);
    }
    let _ = std::fs::remove_file(path);
    Run {
        events: total,
        secs,
        cpu_ns: cpu,
        retries: retries.load(Ordering::Relaxed),
    }
}

fn child(args: &str) {
    let mut it = args.split(',');
    let mut next = || it.next().expect("child arg");
    let path = PathBuf::from(next());
    let id: u32 = next().parse().unwrap();
    let first: u32 = next().parse().unwrap();
    let n_threads: u32 = next().parse().unwrap();
    let per: u64 = next().parse().unwrap();
    let mode = next().to_string();
    let store = Arc::new(Store::open(&path).expect("store"));
    let m = Map::open(&store, id).expect("map");
    if mode == "latency" {
        // `per` records, one every 500 µs, stamped at commit.
        let rb = RingBuf::new(&m).unwrap();
        for _ in 0..per {
            std::thread::sleep(Duration::from_micros(500));
            let r = rb.reserve(8).unwrap();
            rb.write(&r, &monotonic_raw_ns().to_ne_bytes()).unwrap();
            rb.submit(&r, 0);
        }
        return;
    }
    let mut retries = 0;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n_threads)
            .map(|t| {
                let m = m.clone();
                s.spawn(move || produce(&RingBuf::new(&m).unwrap(), first + t, per))
            })
            .collect();
        for h in hs {
            retries += h.join().unwrap();
        }
    });
    println!("retries {retries}");
}

fn spawn_child(path: &Path, id: u32, first: u32, threads: u32, per: u64, mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(
            CHILD_ENV,
            format!("{},{id},{first},{threads},{per},{mode}", path.display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child")
}

fn processes(per: u64) -> Run {
    let (store, path) = temp_store("proc");
    let m = ringbuf(&store, 16 << 20);
    let rb = RingBuf::new(&m).unwrap();
    let cpu0 = cpu_ns();
    let start = Instant::now();
    let kids: Vec<Child> = (0..4)
        .map(|i| spawn_child(&path, m.id(), i * 2, 2, per, "throughput"))
        .collect();
    consume(&rb, per * 8, 8);
    let mut secs = start.elapsed().as_secs_f64();
    let mut retries = 0;
    for k in kids {
        let out = k.wait_with_output().unwrap();
        assert!(out.status.success());
        let s = String::from_utf8_lossy(&out.stdout);
        retries += s
            .lines()
            .find_map(|l| l.strip_prefix("retries "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    // The consumer saw the last event; the producers may still be exiting.
    secs = secs.max(1e-9);
    let cpu = cpu_ns() - cpu0;
    let _ = std::fs::remove_file(path);
    Run {
        events: per * 8,
        secs,
        cpu_ns: cpu,
        retries,
    }
}

/// Wake-up latencies (ns) of `n` records committed 500 µs apart by a producer thread, or a
/// producer process.
fn latency(n: u64, other_process: bool) -> Vec<u64> {
    let (store, path) = temp_store("lat");
    let m = ringbuf(&store, 1 << 20);
    let rb = RingBuf::new(&m).unwrap();
    let sock = WakeSocket::new().unwrap();
    let mut lat = Vec::with_capacity(n as usize);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut kid = None;
        if other_process {
            kid = Some(spawn_child(&path, m.id(), 0, 1, n, "latency"));
        } else {
            let m = m.clone();
            let done = &done;
            s.spawn(move || {
                let rb = RingBuf::new(&m).unwrap();
                for _ in 0..n {
                    std::thread::sleep(Duration::from_micros(500));
                    let r = rb.reserve(8).unwrap();
                    rb.write(&r, &monotonic_raw_ns().to_ne_bytes()).unwrap();
                    rb.submit(&r, 0);
                }
                done.store(true, Ordering::Release);
            });
        }
        while (lat.len() as u64) < n {
            if !rb.arm(sock.nonce()) {
                sock.wait(5000);
            }
            let woke = monotonic_raw_ns();
            rb.disarm();
            rb.consume(|s| {
                let t = u64::from_ne_bytes(s.try_into().unwrap());
                lat.push(woke.saturating_sub(t));
            });
        }
        if let Some(k) = kid {
            assert!(k.wait_with_output().unwrap().status.success());
        }
    });
    let _ = std::fs::remove_file(path);
    lat
}

/// The OS's floor for the same wake-up: a thread sends a stamped datagram every 500 µs on a
/// Unix datagram socket pair; the receiver blocks in `recv`.
fn os_floor(n: u64) -> Vec<u64> {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    let mut lat = Vec::with_capacity(n as usize);
    std::thread::scope(|s| {
        s.spawn(move || {
            for _ in 0..n {
                std::thread::sleep(Duration::from_micros(500));
                a.send(&monotonic_raw_ns().to_ne_bytes()).expect("send");
            }
        });
        let mut buf = [0u8; 8];
        for _ in 0..n {
            b.recv(&mut buf).expect("recv");
            lat.push(monotonic_raw_ns().saturating_sub(u64::from_ne_bytes(buf)));
        }
    });
    lat
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

fn main() {
    if let Ok(a) = std::env::var(CHILD_ENV) {
        child(&a);
        return;
    }
    let quick = !std::env::args().any(|a| a == "--bench");
    let per_default = if quick { 20_000 } else { 2_000_000 };
    let per_thread_total: u64 = std::env::var("BPFTIME_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(per_default);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "ring buffer, {EVENT}-byte events (reserve + write + submit), {cpus} CPUs, \
         kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let reps: usize = if quick { 1 } else { 5 };
    println!(
        "{:<38} {:>10} {:>9} {:>9} {:>11} {:>8}",
        "case (median of runs, best)", "events", "Mev/s", "best", "CPU ns/ev", "retries"
    );
    // `BPFTIME_BENCH_CASE=TEXT`: only the cases whose name contains TEXT.
    let only = std::env::var("BPFTIME_BENCH_CASE").ok();
    let show = |name: &str, f: &dyn Fn() -> Run| {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            return;
        }
        let runs: Vec<Run> = (0..reps).map(|_| f()).collect();
        let mut rate: Vec<f64> = runs
            .iter()
            .map(|r| r.events as f64 / r.secs / 1e6)
            .collect();
        let mut cpu: Vec<f64> = runs
            .iter()
            .map(|r| r.cpu_ns as f64 / r.events as f64)
            .collect();
        rate.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        println!(
            "{name:<38} {:>10} {:>9.2} {:>9.2} {:>11.1} {:>8}",
            runs[0].events,
            rate[rate.len() / 2],
            rate[rate.len() - 1],
            cpu[cpu.len() / 2],
            runs.iter().map(|r| r.retries).sum::<u64>()
        );
    };
    for &(p, consumer) in &[(1u32, true), (8, true), (1, false), (8, false)] {
        // 8 producers share the same total as 1, so each run takes about as long.
        let per = if p == 1 {
            per_thread_total
        } else {
            per_thread_total / 8
        };
        let name = format!(
            "{p} producer thread(s), {}",
            if consumer { "consumer" } else { "no consumer" }
        );
        show(&name, &|| threads(p, per, consumer));
    }
    show("8 producers in 4 processes, consumer", &|| {
        processes(per_thread_total / 8)
    });
    if only.is_some() {
        return;
    }
    let n = if quick { 200 } else { 4000 };
    let cases: [(&str, &dyn Fn() -> Vec<u64>); 3] = [
        ("ring buffer, producer thread", &|| latency(n, false)),
        ("ring buffer, producer process", &|| latency(n, true)),
        ("OS floor: unix datagram to a blocked thread", &|| {
            os_floor(n)
        }),
    ];
    for (name, f) in cases {
        let mut l = f();
        println!(
            "wake-up latency, {name}: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs ({n} wake-ups)",
            pct(&mut l, 0.5),
            pct(&mut l, 0.9),
            pct(&mut l, 0.99)
        );
    }
}
