//! Programs loaded from the store run over shared maps with the runtime's helpers.

use bpftime_maps::map::BPF_ANY;
use bpftime_maps::{Map, MapDef, Store};
use bpftime_runtime::LoadedProg;
use bpftime_runtime::helpers::registry;
use bpftime_runtime::object::{ProgRecord, create_prog};
use bpftime_vm::asm::assemble;
use std::sync::Arc;

fn temp_store() -> (Arc<Store>, std::path::PathBuf) {
    let p = std::env::temp_dir().join(format!(
        "bpftime-rt-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    (Arc::new(Store::open(&p).unwrap()), p)
}

fn def(map_type: u32, key: u32, value: u32, max: u32) -> MapDef {
    MapDef {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: max,
        flags: 0,
    }
}

#[test]
fn counter_program_updates_shared_hash_and_global_data() {
    let (store, path) = temp_store();
    let hash = Map::create(&store, def(1, 4, 8, 16), "counts").unwrap();
    let bss = Map::create(&store, def(2, 4, 16, 1), "prog.bss").unwrap();
    let src = format!(
        "stw [%r10-4], 7
         lddw %r1, map_fd {h}
         mov %r2, %r10
         add %r2, -4
         call 1
         jne %r0, 0, found
         stdw [%r10-16], 1
         lddw %r1, map_fd {h}
         mov %r2, %r10
         add %r2, -4
         mov %r3, %r10
         add %r3, -16
         mov %r4, 0
         call 2
         mov %r0, 0
         exit
         found:
         mov %r1, 1
         lock add [%r0+0], %r1
         lddw %r2, map_value {b}+8
         ldxdw %r3, [%r2+0]
         add %r3, 1
         stxdw [%r2+0], %r3
         mov %r0, 1
         exit",
        h = hash.id(),
        b = bss.id()
    );
    let insns = assemble(&src).unwrap();
    let id = create_prog(
        &store,
        &ProgRecord {
            prog_type: 2,
            expected_attach_type: 0,
            name: "counter".into(),
            insns,
        },
    )
    .unwrap();
    // A second process view of the store (as an agent would have).
    let agent_store = Arc::new(Store::open(&path).unwrap());
    let prog = LoadedProg::load(&agent_store, id, Arc::new(registry())).unwrap();
    assert_eq!(prog.map_ids(), vec![hash.id(), bss.id()]);
    for i in 0..1000 {
        // SAFETY: no context (null, length 0).
        let r0 = unsafe { prog.run(std::ptr::null_mut(), 0) }.unwrap();
        assert_eq!(r0, u64::from(i > 0));
    }
    let mut v = [0u8; 8];
    hash.lookup(&7u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 1000);
    let mut g = [0u8; 16];
    bss.lookup(&0u32.to_ne_bytes(), &mut g).unwrap();
    assert_eq!(u64::from_ne_bytes(g[8..].try_into().unwrap()), 999);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn context_is_readable_and_pid_helper_works() {
    let (store, path) = temp_store();
    // r0 = PT_REGS_PARM1(ctx) (rdi at offset 112) + (pid_tgid >> 32 == getpid()).
    let insns = assemble(
        "mov %r6, %r1
         call 14
         rsh %r0, 32
         ldxdw %r1, [%r6+112]
         lsh %r1, 32
         or %r0, %r1
         exit",
    )
    .unwrap();
    let id = create_prog(
        &store,
        &ProgRecord {
            prog_type: 2,
            expected_attach_type: 0,
            name: "ctx".into(),
            insns,
        },
    )
    .unwrap();
    let prog = LoadedProg::load(&store, id, Arc::new(registry())).unwrap();
    let mut regs = [0u64; 21];
    regs[14] = 0x55;
    // SAFETY: `regs` is a live, writable 168-byte buffer.
    let r0 = unsafe { prog.run(regs.as_mut_ptr().cast(), 168) }.unwrap();
    assert_eq!(r0, (0x55 << 32) | u64::from(std::process::id()));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn forged_map_pointer_and_bad_reads_are_refused_not_crashes() {
    let (store, path) = temp_store();
    let hash = Map::create(&store, def(1, 4, 8, 4), "h").unwrap();
    hash.update(&1u32.to_ne_bytes(), &5u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    // lookup with a forged map pointer (0x1000) returns NULL; probe_read of address 8 returns
    // -EFAULT and zeroes the buffer; r0 = lookup result + probe_read result.
    let insns = assemble(
        "stw [%r10-4], 1
         lddw %r1, 0x1000
         mov %r2, %r10
         add %r2, -4
         call 1
         mov %r6, %r0
         mov %r1, %r10
         add %r1, -16
         mov %r2, 8
         mov %r3, 8
         call 4
         add %r0, %r6
         exit",
    )
    .unwrap();
    let id = create_prog(
        &store,
        &ProgRecord {
            prog_type: 2,
            expected_attach_type: 0,
            name: "bad".into(),
            insns,
        },
    )
    .unwrap();
    let prog = LoadedProg::load(&store, id, Arc::new(registry())).unwrap();
    // SAFETY: no context.
    let r0 = unsafe { prog.run(std::ptr::null_mut(), 0) }.unwrap();
    assert_eq!(r0 as i64, -(libc::EFAULT as i64));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn reference_to_a_missing_map_fails_to_load() {
    let (store, path) = temp_store();
    let insns = assemble("lddw %r1, map_fd 4000\nmov %r0, 0\nexit").unwrap();
    let id = create_prog(
        &store,
        &ProgRecord {
            prog_type: 2,
            expected_attach_type: 0,
            name: "dangling".into(),
            insns,
        },
    )
    .unwrap();
    let err = LoadedProg::load(&store, id, Arc::new(registry())).unwrap_err();
    assert!(err.to_string().contains("map id 4000"), "{err}");
    std::fs::remove_file(path).unwrap();
}
