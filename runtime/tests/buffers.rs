//! Ring buffer and perf buffer helpers, run by the interpreter over maps in a shared store.

use bpftime_maps::perf_array::{self, PERF_RECORD_SAMPLE};
use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::{Map, MapDef, Store};
use bpftime_runtime::LoadedProg;
use bpftime_runtime::helpers::registry;
use bpftime_runtime::object::{
    PerfEventRecord, PerfKind, ProgRecord, create_perf_event, create_prog, set_perf_enabled,
};
use bpftime_vm::asm::assemble;
use std::sync::Arc;

fn temp_store() -> (Arc<Store>, std::path::PathBuf) {
    let p = std::env::temp_dir().join(format!(
        "bpftime-rt-buf-{}-{}",
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

/// Loads `src` as a program in a second view of the store (as an agent would).
fn load(store: &Arc<Store>, path: &std::path::Path, src: &str) -> LoadedProg {
    let insns = assemble(src).unwrap();
    let id = create_prog(
        store,
        &ProgRecord {
            prog_type: 2,
            expected_attach_type: 0,
            name: "buf".into(),
            insns,
        },
    )
    .unwrap();
    let agent_store = Arc::new(Store::open(path).unwrap());
    LoadedProg::load(&agent_store, id, Arc::new(registry())).unwrap()
}

fn run(p: &LoadedProg) -> u64 {
    // SAFETY: no context (null, length 0).
    unsafe { p.run(std::ptr::null_mut(), 0) }.unwrap()
}

#[test]
fn reserve_write_submit_reaches_the_consumer() {
    let (store, path) = temp_store();
    let m = ringbuf(&store, 16384);
    let prog = load(
        &store,
        &path,
        &format!(
            "lddw %r1, map_fd {id}
             mov %r2, 16
             mov %r3, 0
             call 131
             jeq %r0, 0, out
             stdw [%r0+0], 42
             call 14
             mov %r1, %r0
             stxdw [%r10-8], %r1
             lddw %r1, map_fd {id}
             mov %r2, 16
             mov %r3, 0
             call 131
             jeq %r0, 0, out
             ldxdw %r1, [%r10-8]
             stxdw [%r0+8], %r1
             stdw [%r0+0], 7
             mov %r1, %r0
             mov %r2, 0
             call 132
             mov %r0, 1
             exit
             out:
             mov %r0, 0
             exit",
            id = m.id()
        ),
    );
    for _ in 0..100 {
        assert_eq!(run(&prog), 1);
    }
    // The program reserved a second record it never submitted: the first one (left uncommitted
    // after `call 14` clobbered r0) is discarded at the end of each run, so nothing is stuck.
    let rb = RingBuf::new(&m).unwrap();
    let mut got = Vec::new();
    rb.consume(|s| got.push(s.to_vec()));
    assert_eq!(got.len(), 100);
    let pid_tgid = (u64::from(std::process::id()) << 32) | u64::from(tid());
    for s in got {
        assert_eq!(u64::from_ne_bytes(s[..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_ne_bytes(s[8..].try_into().unwrap()), pid_tgid);
    }
    assert_eq!(rb.drops(), 0);
    std::fs::remove_file(path).unwrap();
}

fn tid() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn output_query_and_forged_submits() {
    let (store, path) = temp_store();
    let m = ringbuf(&store, 8192);
    // r6 = output(16 bytes of stack) ; r7 = output with bad flags ; submit(forged) ; r0 =
    // query(RING_SIZE) + r6 + (r7 == -EINVAL)
    let prog = load(
        &store,
        &path,
        &format!(
            "stdw [%r10-16], 1
             stdw [%r10-8], 2
             lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -16
             mov %r3, 16
             mov %r4, 0
             call 130
             mov %r6, %r0
             lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -16
             mov %r3, 16
             mov %r4, 4
             call 130
             mov %r7, %r0
             mov %r1, %r10
             add %r1, -16
             mov %r2, 0
             call 132
             lddw %r1, map_fd {id}
             mov %r2, 1
             call 134
             add %r0, %r6
             jne %r7, -22, bad
             add %r0, 1
             bad:
             exit",
            id = m.id()
        ),
    );
    assert_eq!(run(&prog), 8192 + 1);
    let rb = RingBuf::new(&m).unwrap();
    let mut got = Vec::new();
    rb.consume(|s| got.push(s.to_vec()));
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][..8], &1u64.to_ne_bytes());
    assert_eq!(&got[0][8..], &2u64.to_ne_bytes());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_full_ring_makes_output_fail_with_eagain_and_counts_it() {
    let (store, path) = temp_store();
    let m = ringbuf(&store, 4096);
    let prog = load(
        &store,
        &path,
        &format!(
            "lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -256
             mov %r3, 248
             mov %r4, 0
             call 130
             exit",
            id = m.id()
        ),
    );
    // 256-byte records: 15 fit in 4096 bytes (one byte stays free).
    let results: Vec<u64> = (0..17).map(|_| run(&prog)).collect();
    assert!(results[..15].iter().all(|&r| r == 0), "{results:?}");
    assert_eq!(results[15], (-(libc::EAGAIN as i64)) as u64);
    assert_eq!(RingBuf::new(&m).unwrap().drops(), 2);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn perf_event_output_writes_raw_samples_to_the_current_cpus_ring() {
    let (store, path) = temp_store();
    let cpus = bpftime_maps::percpu::nr_possible_cpus();
    let arr = Map::create(
        &store,
        MapDef {
            map_type: 4,
            key_size: 4,
            value_size: 4,
            max_entries: cpus,
            flags: 0,
        },
        "events",
    )
    .unwrap();
    let mut rings = Vec::new();
    for cpu in 0..cpus {
        let ev = create_perf_event(
            &store,
            &PerfEventRecord {
                kind: PerfKind::SoftwareBpfOutput,
                pid: -1,
                cpu: cpu as i32,
                offset: 0,
                ref_ctr_offset: 0,
                path: String::new(),
            },
        )
        .unwrap();
        set_perf_enabled(&store, ev, true).unwrap();
        perf_array::attach_ring(&store, ev, 4).unwrap();
        perf_array::set(&arr, cpu, ev, 0).unwrap();
        rings.push(ev);
    }
    let prog = load(
        &store,
        &path,
        &format!(
            "stdw [%r10-8], 0x1234
             lddw %r2, map_fd {id}
             lddw %r3, 0xffffffff
             mov %r4, %r10
             add %r4, -8
             mov %r5, 8
             call 25
             exit",
            id = arr.id()
        ),
    );
    for _ in 0..50 {
        assert_eq!(run(&prog), 0);
    }
    let mut n = 0;
    for ev in rings {
        let ring = perf_array::event_ring(&store, ev).unwrap();
        n += ring.read(|ty, rec| {
            assert_eq!(ty, PERF_RECORD_SAMPLE);
            assert_eq!(rec.len(), 24);
            assert_eq!(u32::from_ne_bytes(rec[8..12].try_into().unwrap()), 12);
            assert_eq!(&rec[12..20], &0x1234u64.to_ne_bytes());
        });
    }
    assert_eq!(n, 50);
    std::fs::remove_file(path).unwrap();
}
