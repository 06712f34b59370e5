use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::wake::WakeSocket;
use bpftime_maps::{Map, MapDef, Store};
use std::sync::Arc;

#[test]
fn stress() {
    let p = std::path::Path::new("/dev/shm").join(format!("bpftime-rbstress-{}", std::process::id()));
    let store = Arc::new(Store::open(&p).unwrap());
    let size: u32 = std::env::var("RB_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(16 << 20);
    let n: u64 = std::env::var("RB_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000_000);
    let m = Map::create(&store, MapDef { map_type: 27, key_size: 0, value_size: 0, max_entries: size, flags: 0 }, "s").unwrap();
    std::thread::scope(|s| {
        let m2 = m.clone();
        s.spawn(move || {
            let rb = RingBuf::new(&m2).unwrap();
            for seq in 0..n {
                let mut e = [0u8; 24];
                e[16..24].copy_from_slice(&seq.to_ne_bytes());
                loop {
                    if let Some(r) = rb.reserve(24) { rb.write(&r, &e).unwrap(); assert!(rb.submit(&r, 0)); break; }
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        });
        let rb = RingBuf::new(&m).unwrap();
        let sock = WakeSocket::new().unwrap();
        let mut next = 0u64;
        while next < n {
            rb.consume(|s| {
                let seq = u64::from_ne_bytes(s[16..24].try_into().unwrap());
                if seq != next {
                    panic!("expected {next} got {seq}; cons {} prod {}", rb.consumer_pos(), rb.producer_pos());
                }
                next += 1;
            });
            if next < n && !rb.arm(sock.nonce()) { sock.wait(100); }
            rb.disarm();
        }
    });
    std::fs::remove_file(p).unwrap();
}
