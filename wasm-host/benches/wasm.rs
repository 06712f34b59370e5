//! Wasm host benchmarks (a bench binary: the figures cross processes).
//!
//! 1. **load-to-first-event**: a victim under `bpftime start` calls `target_function` non-stop;
//!    `bpftime-wasm run uprobe_events.wasm` is started, and the time until its first `event`
//!    line is measured (process start, module compile, object load, agent attach, first
//!    record through the ring buffer and the guest's callback). Also in-process: compiling and
//!    instantiating the guest, and loading its BPF object.
//! 2. **host-call overhead**: a Wasm loop calling `wasm_bpf_map_operate` (array lookup; and a
//!    bad fd, the shortest path) vs the same loop calling a Wasm function.
//! 3. **ring buffer → guest callback**: a producer thread writes 24-byte records; the guest
//!    polls and its callback counts them; records per second delivered.
//!
//! Run: `cargo bench -p bpftime-wasm-host --bench wasm`. Prints medians of several runs.

#[path = "../tests/wasm_support/mod.rs"]
mod wasm_support;

use bpftime_maps::ringbuf::RingBuf;
use bpftime_suite::{Proc, TestStore, artifacts, build_example, unprivileged};
use bpftime_wasm_host::object::BpfObject;
use bpftime_wasm_host::{Guest, GuestConfig};
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasm_support::{ScratchStore, bpf_object, bpftime_wasm, example_guests, wat};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn load_to_first_event() {
    let (Some(guests), Some(victim_dir)) = (example_guests(), build_example("uprobe-counter"))
    else {
        return;
    };
    let a = artifacts();
    let wasm_bin = bpftime_wasm();
    // A compiled-guest cache the unprivileged guest owns.
    let cache =
        std::env::temp_dir().join(format!("bpftime-wasm-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let uid = bpftime_suite::unprivileged_uid();
    std::os::unix::fs::chown(&cache, Some(uid), Some(uid)).unwrap();
    let run = |cached: bool| -> f64 {
        let store = TestStore::new("wasm-bench-first");
        // A victim calling the probed function non-stop, agent loaded, nothing attached yet.
        let mut v = unprivileged(&a.bpftime);
        v.args(["start", "--store", &store.name, "--"])
            .arg(victim_dir.join("victim"))
            .arg("100000000000");
        let victim = Proc::spawn(v, "victim");
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let mut g = unprivileged(&wasm_bin);
        g.env("XDG_CACHE_HOME", &cache)
            .args(["run", "--store", &store.name, "--no-status"]);
        if !cached {
            g.arg("--no-cache");
        }
        g.arg(guests.join("uprobe_events.wasm"))
            .arg(victim_dir.join("victim"))
            .arg("1");
        let mut guest = Proc::spawn(g, "guest");
        guest.wait_line(Duration::from_secs(30), |l| l.starts_with("event "));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        drop(guest);
        drop(victim);
        ms
    };
    let cold: Vec<f64> = (0..5).map(|_| run(false)).collect();
    run(true); // fills the cache
    let warm: Vec<f64> = (0..5).map(|_| run(true)).collect();
    let _ = std::fs::remove_dir_all(&cache);
    let runs = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "load-to-first-event (bpftime-wasm process start → first event line): compiling \
         {:.1} ms median (runs: {}); compiled code from the cache {:.1} ms median (runs: {})",
        median(cold.clone()),
        runs(&cold),
        median(warm.clone()),
        runs(&warm)
    );

    // In-process phases.
    let wasm = std::fs::read(guests.join("uprobe_events.wasm")).unwrap();
    let scratch = ScratchStore::new("bench-phases");
    let mut compile = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let g = Guest::new(scratch.store.clone(), &wasm, &GuestConfig::default()).unwrap();
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        drop(g);
    }
    let obj = std::fs::read(guests.join("uprobe_events.bpf.o")).unwrap();
    let helpers = Arc::new(bpftime_runtime::helpers::registry());
    let mut load = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let o = BpfObject::load(&scratch.store, &obj, &helpers).unwrap();
        load.push(t.elapsed().as_secs_f64() * 1e3);
        drop(o);
    }
    println!(
        "  compile + instantiate uprobe_events.wasm ({} bytes): median {:.1} ms; load its BPF \
         object ({} bytes) into the store: median {:.2} ms",
        wasm.len(),
        median(compile),
        obj.len(),
        median(load)
    );
}

const CALLS: &str = r#"
(module
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_operate"
    (func $op (param i32 i32 i32 i32 i32 i64) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 1024) "array\00")
  (global $fd (mut i32) (i32.const 0))
  (func $local (param i32 i32 i32 i32 i32 i64) (result i32) (local.get 0))
  (func (export "setup") (param i32 i32) (result i32)
    (global.set $fd (call $fd (call $load (local.get 0) (local.get 1)) (i32.const 1024)))
    (global.get $fd))
  ;; n array lookups (key 0 at 2048, value to 2304)
  (func (export "lookups") (param $n i32) (result i32) (local $r i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $r (i32.or (local.get $r) (call $op (global.get $fd) (i32.const 1)
        (i32.const 2048) (i32.const 2304) (i32.const 0) (i64.const 0))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $r))
  ;; n calls with a bad fd (the shortest host path)
  (func (export "badfd") (param $n i32) (result i32) (local $r i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $r (i32.add (local.get $r) (call $op (i32.const -1) (i32.const 1)
        (i32.const 2048) (i32.const 2304) (i32.const 0) (i64.const 0))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $r))
  ;; n calls of a Wasm function with the same signature
  (func (export "wasm") (param $n i32) (result i32) (local $r i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $r (i32.add (local.get $r) (call $local (local.get $n) (i32.const 1)
        (i32.const 2048) (i32.const 2304) (i32.const 0) (i64.const 0))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $r))
)"#;

fn host_call_overhead() {
    let Some(obj) = bpf_object("api_test") else {
        return;
    };
    let scratch = ScratchStore::new("bench-calls");
    let mut g = Guest::new(scratch.store.clone(), &wat(CALLS), &GuestConfig::default()).unwrap();
    g.write_memory(65536, &obj).unwrap();
    let fd: i32 = g.call("setup", (65536, obj.len() as i32)).unwrap();
    assert!(fd >= 3);
    const N: i32 = 2_000_000;
    let mut per = |name: &str| {
        let mut v = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let _: i32 = g.call(name, N).unwrap();
            v.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(N));
        }
        median(v)
    };
    let (lookup, bad, wasm) = (per("lookups"), per("badfd"), per("wasm"));
    println!(
        "host-call overhead: wasm_bpf_map_operate array lookup {lookup:.1} ns/call, bad fd \
         (shortest path) {bad:.1} ns/call, a Wasm-to-Wasm call {wasm:.2} ns/call"
    );
}

const POLL: &str = r#"
(module
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_buffer_poll"
    (func $poll (param i64 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (table (export "__indirect_function_table") 2 funcref)
  (elem (i32.const 1) $count)
  (data (i32.const 1024) "ring\00")
  (global $h (mut i64) (i64.const 0))
  (global $fd (mut i32) (i32.const 0))
  (global $n (mut i32) (i32.const 0))
  (global $sum (mut i64) (i64.const 0))
  (func $count (param i32 i32 i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (global.set $sum (i64.add (global.get $sum) (i64.load (local.get 1))))
    (i32.const 0))
  (func (export "setup") (param i32 i32) (result i32)
    (global.set $h (call $load (local.get 0) (local.get 1)))
    (global.set $fd (call $fd (global.get $h) (i32.const 1024)))
    (global.get $fd))
  ;; polls until n records arrived
  (func (export "drain") (param $want i32) (result i32)
    (global.set $n (i32.const 0))
    (block $done (loop $l
      (br_if $done (i32.ge_u (global.get $n) (local.get $want)))
      (drop (call $poll (global.get $h) (global.get $fd) (i32.const 1) (i32.const 0)
        (i32.const 4096) (i32.const 64) (i32.const 100)))
      (br $l)))
    (global.get $n))
)"#;

fn ringbuf_to_callback() {
    let Some(obj) = bpf_object("bench") else {
        return;
    };
    let scratch = ScratchStore::new("bench-ring");
    let mut g = Guest::new(scratch.store.clone(), &wat(POLL), &GuestConfig::default()).unwrap();
    g.write_memory(65536, &obj).unwrap();
    let fd: i32 = g.call("setup", (65536, obj.len() as i32)).unwrap();
    let map = g.state().bpf.map_of_fd(fd).unwrap().clone();
    let rb = RingBuf::new(&map).unwrap();

    // Delivery alone: the ring holds the records already (16 MiB: 500,000 of 24 bytes).
    const FILLED: i32 = 500_000;
    let mut drain = Vec::new();
    for _ in 0..5 {
        for i in 0..FILLED {
            rb.output(&[i as u8; 24], 0).unwrap();
        }
        let t = Instant::now();
        let got: i32 = g.call("drain", FILLED).unwrap();
        drain.push(f64::from(got) / t.elapsed().as_secs_f64() / 1e6);
    }

    // With a producer thread writing at the same time.
    const N: i32 = 1_000_000;
    let mut live = Vec::new();
    for _ in 0..5 {
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (map, stop) = (map.clone(), stop.clone());
            std::thread::spawn(move || {
                let rb = RingBuf::new(&map).unwrap();
                let rec = [7u8; 24];
                while !stop.load(Ordering::Relaxed) {
                    if rb.output(&rec, 0).is_err() {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let t = Instant::now();
        let got: i32 = g.call("drain", N).unwrap();
        let dt = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        producer.join().unwrap();
        live.push(f64::from(got) / dt / 1e6);
        while rb.available() {
            let _: i32 = g.call("drain", 1).unwrap();
        }
    }
    let runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "ring buffer → guest callback (24-byte records, copied into the guest, callback per \
         record): {:.2} M records/s from a filled ring (runs: {}), {:.2} M records/s with a \
         producer thread running (runs: {})",
        median(drain.clone()),
        runs(&drain),
        median(live.clone()),
        runs(&live)
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this with no arguments too,
    // so only run when asked to measure.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!(
        "wasm-host benchmarks ({} CPUs, kernel {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    host_call_overhead();
    ringbuf_to_callback();
    load_to_first_event();
}
