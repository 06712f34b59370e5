//! Ring buffers shared by producer threads in several processes and a consumer: nothing lost
//! or torn while the ring has room; counted drops and intact records when it fills; wake-ups
//! across processes; a producer killed holding a reservation does not wedge the ring.
//!
//! Producers are real processes: the test binary re-runs itself (`child_*` tests do nothing
//! unless `BPFTIME_RB_CHILD` is set), as `maps.rs` does.

use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::wake::WakeSocket;
use bpftime_maps::{Map, MapDef, Store};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "BPFTIME_RB_CHILD";

fn temp_store(tag: &str) -> (Arc<Store>, PathBuf) {
    let p = std::env::temp_dir().join(format!(
        "bpftime-rb-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    (Arc::new(Store::open(&p).unwrap()), p)
}

fn ringbuf(store: &Arc<Store>, size: u32) -> Map {
    let def = MapDef {
        map_type: 27,
        key_size: 0,
        value_size: 0,
        max_entries: size,
        flags: 0,
    };
    Map::create(store, def, "rb").unwrap()
}

fn run_child(test: &str, path: &Path, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{arg}", path.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn child_args() -> Option<(Arc<Store>, Vec<u64>)> {
    let v = std::env::var(CHILD_ENV).ok()?;
    let (p, arg) = v.split_once('|')?;
    let store = Arc::new(Store::open(Path::new(p)).unwrap());
    Some((store, arg.split(',').map(|x| x.parse().unwrap()).collect()))
}

/// Record `seq` of producer `producer`: `[producer u32 | seq u32 | len u32 | pattern…]`, 12 to
/// 140 bytes, every byte determined by (producer, seq).
fn record(producer: u32, seq: u32) -> Vec<u8> {
    let len = 12 + (seq.wrapping_mul(2_654_435_761) >> 25) as usize; // 12..=139
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&producer.to_ne_bytes());
    r.extend_from_slice(&seq.to_ne_bytes());
    r.extend_from_slice(&(len as u32).to_ne_bytes());
    r.extend((12..len).map(|i| (producer.wrapping_mul(31) ^ seq.wrapping_mul(7) ^ i as u32) as u8));
    r
}

/// Checks a delivered record; returns (producer, seq).
fn check(rec: &[u8]) -> (u32, u32) {
    assert!(rec.len() >= 12, "short record of {} bytes", rec.len());
    let word = |i: usize| u32::from_ne_bytes(rec[i..i + 4].try_into().unwrap());
    let (p, s) = (word(0), word(4));
    assert_eq!(rec, &record(p, s)[..], "torn or wrong record {p}/{s}");
    (p, s)
}

/// Produces `count` records as producer `producer` on `rb`, half through reserve + write +
/// submit, half through output, discarding every 13th reservation (it is not counted).
/// Returns the seqs that were refused (ring full) and how many of the reservations meant to be
/// discarded were refused too.
fn produce(rb: &RingBuf<'_>, producer: u32, count: u32) -> (Vec<u32>, u64) {
    let mut refused = Vec::new();
    let mut extra = 0;
    for seq in 0..count {
        let r = record(producer, seq);
        if seq % 2 == 0 {
            if rb.output(&r, 0).is_err() {
                refused.push(seq);
            }
            continue;
        }
        if seq % 13 == 1 {
            // A discarded reservation first: never delivered.
            match rb.reserve(r.len() as u64) {
                Some(d) => {
                    rb.write(&d, &vec![0xee; r.len()]).unwrap();
                    assert!(rb.discard(&d, 0));
                }
                None => extra += 1,
            }
        }
        match rb.reserve(r.len() as u64) {
            Some(res) => {
                rb.write(&res, &r).unwrap();
                assert!(rb.submit(&res, 0));
            }
            None => refused.push(seq),
        }
    }
    (refused, extra)
}

/// Child: `threads` producer threads numbered from `first`, `count` records each, on ring `id`;
/// writes the refused seqs of each producer to stderr-free files next to the store.
#[test]
fn child_produce() {
    let Some((store, a)) = child_args() else {
        return;
    };
    let (id, first, threads, count) = (a[0] as u32, a[1] as u32, a[2] as u32, a[3] as u32);
    let m = Map::open(&store, id).unwrap();
    let out = std::env::var(CHILD_ENV).unwrap();
    let dir = out.split_once('|').unwrap().0.to_string();
    std::thread::scope(|s| {
        for t in 0..threads {
            let m = m.clone();
            let dir = dir.clone();
            s.spawn(move || {
                let rb = RingBuf::new(&m).unwrap();
                let p = first + t;
                let (refused, extra) = produce(&rb, p, count);
                let text: Vec<String> = refused.iter().map(u32::to_string).collect();
                std::fs::write(
                    format!("{dir}.refused.{p}"),
                    format!("{extra};{}", text.join(",")),
                )
                .unwrap();
            });
        }
    });
}

/// Consumes until `done()` and the ring is empty, sleeping on a wake-up socket in between.
fn consume_all(rb: &RingBuf<'_>, mut done: impl FnMut() -> bool) -> Vec<(u32, u32)> {
    let sock = WakeSocket::new().unwrap();
    let mut got = Vec::new();
    loop {
        rb.consume(|rec| got.push(check(rec)));
        if done() && !rb.available() && rb.consumer_pos() == rb.producer_pos() {
            return got;
        }
        if !rb.arm(sock.nonce()) {
            sock.wait(50);
        }
        rb.disarm();
    }
}

/// Producer `p`'s refused seqs and refused discard reservations.
fn refused_of(path: &Path, p: u32) -> (Vec<u32>, u64) {
    let f = format!("{}.refused.{p}", path.display());
    let s = std::fs::read_to_string(&f).unwrap();
    let _ = std::fs::remove_file(&f);
    let (extra, seqs) = s.split_once(';').unwrap();
    let seqs = seqs
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().unwrap())
        .collect();
    (seqs, extra.parse().unwrap())
}

/// 4 processes × 2 threads = 8 producers; `count` records each.
fn run_producers(size: u32, count: u32, consume_while: bool) -> (usize, u64) {
    let (store, path) = temp_store("mp");
    let m = ringbuf(&store, size);
    let rb = RingBuf::new(&m).unwrap();
    let mut kids: Vec<Child> = (0..4)
        .map(|i| {
            run_child(
                "child_produce",
                &path,
                &format!("{},{},2,{count}", m.id(), i * 2),
            )
        })
        .collect();
    let mut poll_kids = || {
        let mut exited = 0;
        for k in kids.iter_mut() {
            if let Some(st) = k.try_wait().unwrap() {
                assert!(st.success(), "producer process failed: {st}");
                exited += 1;
            }
        }
        exited == 4
    };
    let got = if consume_while {
        consume_all(&rb, &mut poll_kids)
    } else {
        while !poll_kids() {
            std::thread::sleep(Duration::from_millis(20));
        }
        consume_all(&rb, || true)
    };
    // Every producer's records arrive in its own order, each at most once, intact (checked).
    let mut next: HashMap<u32, Vec<u32>> = HashMap::new();
    for (p, s) in &got {
        next.entry(*p).or_default().push(*s);
    }
    let (mut refused_total, mut extra_total) = (0, 0);
    for p in 0..8u32 {
        let seqs = next.remove(&p).unwrap_or_default();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "producer {p} out of order"
        );
        let (refused, extra) = refused_of(&path, p);
        refused_total += refused.len() as u64;
        extra_total += extra;
        let mut all: Vec<u32> = seqs.iter().chain(refused.iter()).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..count).collect::<Vec<_>>(),
            "producer {p}: delivered ∪ refused"
        );
    }
    assert!(next.is_empty(), "records of unknown producers");
    assert_eq!(
        rb.drops(),
        refused_total + extra_total,
        "every refusal is counted"
    );
    std::fs::remove_file(path).unwrap();
    (got.len(), refused_total)
}

#[test]
fn ringbuf_8_producers_in_4_processes_lose_nothing() {
    // 8 × 20,000 records of ≤ 160 bytes fit in 32 MiB: the ring never fills.
    let (delivered, refused) = run_producers(32 << 20, 20_000, true);
    assert_eq!(refused, 0);
    assert_eq!(delivered, 160_000);
}

#[test]
fn a_full_ring_counts_drops_and_delivers_intact_records() {
    // 64 KiB and nobody consuming until the producers are done: most records are refused.
    let (delivered, refused) = run_producers(64 << 10, 5_000, false);
    assert!(refused > 0, "the ring filled");
    assert!(delivered > 0);
    assert_eq!(delivered as u64 + refused, 40_000);
}

#[test]
fn a_small_ring_under_a_live_consumer_delivers_or_counts_everything() {
    // 16 KiB with the consumer running: some records may be refused, none lost silently.
    let (delivered, refused) = run_producers(16 << 10, 10_000, true);
    assert_eq!(delivered as u64 + refused, 80_000);
}

/// Child: commits one record to ring `id` after the given delay in ms.
#[test]
fn child_commit_later() {
    let Some((store, a)) = child_args() else {
        return;
    };
    let m = Map::open(&store, a[0] as u32).unwrap();
    let rb = RingBuf::new(&m).unwrap();
    let r = rb.reserve(8).unwrap();
    std::thread::sleep(Duration::from_millis(a[1]));
    rb.write(&r, &shared_ns().to_ne_bytes()).unwrap();
    rb.submit(&r, 0);
}

fn shared_ns() -> u64 {
    bpftime_maps::shm::monotonic_raw_ns()
}

#[test]
fn a_commit_in_another_process_wakes_a_sleeping_consumer() {
    let (store, path) = temp_store("wake");
    let m = ringbuf(&store, 4096);
    let rb = RingBuf::new(&m).unwrap();
    let sock = WakeSocket::new().unwrap();
    for _ in 0..5 {
        let mut kid = run_child("child_commit_later", &path, &format!("{},300", m.id()));
        // Asleep (armed) before the record exists; only a wake-up can end this wait early.
        assert!(!rb.arm(sock.nonce()));
        let t0 = Instant::now();
        assert!(sock.wait(20_000), "woken");
        rb.disarm();
        assert!(t0.elapsed() < Duration::from_secs(10));
        let woke = shared_ns();
        let mut lat = 0;
        assert_eq!(
            rb.consume(|s| lat = woke - u64::from_ne_bytes(s.try_into().unwrap())),
            1
        );
        assert!(lat < 1_000_000_000, "wake-up took {lat} ns");
        assert!(kid.wait().unwrap().success());
    }
    // No wake-up is sent to a consumer that is not asleep.
    rb.output(&[1; 8], 0).unwrap();
    assert!(!sock.wait(0));
    // BPF_RB_NO_WAKEUP keeps an armed consumer asleep; BPF_RB_FORCE_WAKEUP wakes it anyway.
    assert!(rb.arm(sock.nonce()), "a record is there");
    rb.consume(|_| {});
    assert!(!rb.arm(sock.nonce()));
    rb.output(&[2; 8], bpftime_maps::ringbuf::BPF_RB_NO_WAKEUP)
        .unwrap();
    assert!(!sock.wait(100));
    rb.disarm();
    rb.output(&[3; 8], bpftime_maps::ringbuf::BPF_RB_FORCE_WAKEUP)
        .unwrap();
    assert!(sock.wait(1000));
    std::fs::remove_file(path).unwrap();
}

/// Child: reserves a record on ring `id`, reports it, and waits to be killed.
#[test]
fn child_reserve_and_hang() {
    let Some((store, a)) = child_args() else {
        return;
    };
    let m = Map::open(&store, a[0] as u32).unwrap();
    let rb = RingBuf::new(&m).unwrap();
    let _r = rb.reserve(64).unwrap();
    println!("reserved");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_producer_killed_holding_a_reservation_does_not_wedge_the_ring() {
    let (store, path) = temp_store("kill");
    let m = ringbuf(&store, 4096);
    let rb = RingBuf::new(&m).unwrap();
    let mut kid = run_child("child_reserve_and_hang", &path, &m.id().to_string());
    let deadline = Instant::now() + Duration::from_secs(20);
    while rb.producer_pos() == 0 {
        assert!(Instant::now() < deadline, "child reserved");
        std::thread::sleep(Duration::from_millis(10));
    }
    rb.output(&[7; 16], 0).unwrap();
    assert!(!rb.available(), "blocked behind the child's busy record");
    kid.kill().unwrap();
    kid.wait().unwrap();
    // The dead producer's record is discarded; ours is delivered; the ring keeps working.
    assert!(rb.available());
    let mut got = Vec::new();
    for round in 0..100u8 {
        rb.output(&[round; 100], 0).unwrap();
        rb.consume(|s| got.push(s.to_vec()));
    }
    assert_eq!(got[0], vec![7; 16]);
    assert_eq!(got.len(), 101);
    assert_eq!(rb.drops(), 0);
    std::fs::remove_file(path).unwrap();
}

/// Regression: a consumer checking for a dead producer's reservation (while the head record is
/// busy) raced with the producer's commit and discarded a live record. A fast producer and a
/// consumer that keeps arming on busy records, a million records.
#[test]
fn a_consumer_arming_on_busy_records_never_discards_live_ones() {
    let (store, path) = temp_store("race");
    let m = ringbuf(&store, 1 << 18);
    let n: u64 = 1_000_000;
    std::thread::scope(|s| {
        let m2 = m.clone();
        s.spawn(move || {
            let rb = RingBuf::new(&m2).unwrap();
            for seq in 0..n {
                loop {
                    if let Some(r) = rb.reserve(8) {
                        rb.write(&r, &seq.to_ne_bytes()).unwrap();
                        assert!(rb.submit(&r, 0), "record {seq} was taken from us");
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        });
        let rb = RingBuf::new(&m).unwrap();
        let sock = WakeSocket::new().unwrap();
        let mut next = 0u64;
        while next < n {
            rb.consume(|s| {
                assert_eq!(u64::from_ne_bytes(s.try_into().unwrap()), next);
                next += 1;
            });
            if next < n && !rb.arm(sock.nonce()) {
                sock.wait(100);
            }
            rb.disarm();
        }
    });
    std::fs::remove_file(path).unwrap();
}
