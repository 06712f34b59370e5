//! The map helpers beyond lookup/update/delete, run by programs loaded from the store:
//! queue/stack/bloom push–pop–peek, per-CPU lookups, stack ids and stacks.

use bpftime_maps::map::BPF_ANY;
use bpftime_maps::{Map, MapDef};
use bpftime_runtime::LoadedProg;
use bpftime_runtime::helpers::registry;
use bpftime_runtime::object::{ProgRecord, create_prog};
use bpftime_vm::asm::assemble;
use std::sync::Arc;

mod support;

use support::T;

fn temp_store() -> T {
    support::temp_store("helpers")
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

fn load(t: &T, src: &str) -> LoadedProg {
    let insns = assemble(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let id = create_prog(
        &t.store,
        &ProgRecord {
            prog_type: 2,
            expected_attach_type: 0,
            name: "t".into(),
            insns,
        },
    )
    .unwrap();
    LoadedProg::load(&t.store, id, Arc::new(registry())).unwrap()
}

fn run(p: &LoadedProg, regs: &mut [u64; 21]) -> u64 {
    // SAFETY: `regs` is a live, writable 168-byte buffer.
    unsafe { p.run(regs.as_mut_ptr().cast(), 168) }.unwrap()
}

#[test]
fn queue_push_pop_peek_from_a_program() {
    let t = temp_store();
    let q = Map::create(&t.store, def(22, 0, 8, 2), "q").unwrap();
    // push(ctx->rdi, flags = ctx->rsi); return result
    let push = load(
        &t,
        &format!(
            "ldxdw %r2, [%r1+112]
             stxdw [%r10-8], %r2
             ldxdw %r3, [%r1+104]
             lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -8
             call 87
             exit",
            id = q.id()
        ),
    );
    // pop (call 88) or peek (call 89) into the stack; return value, or 1000 + -errno
    let take = |helper: u32| {
        load(
            &t,
            &format!(
                "lddw %r1, map_fd {id}
                 mov %r2, %r10
                 add %r2, -8
                 call {helper}
                 jeq %r0, 0, ok
                 neg %r0
                 add %r0, 1000
                 exit
                 ok:
                 ldxdw %r0, [%r10-8]
                 exit",
                id = q.id()
            ),
        )
    };
    let (pop, peek) = (take(88), take(89));
    let mut regs = [0u64; 21];
    assert_eq!(run(&pop, &mut regs), 1000 + libc::ENOENT as u64);
    for v in [5u64, 6] {
        regs[14] = v;
        assert_eq!(run(&push, &mut regs), 0);
    }
    regs[14] = 7;
    assert_eq!(run(&push, &mut regs) as i64, -i64::from(libc::E2BIG));
    regs[13] = 2; // BPF_EXIST: overwrite the oldest
    assert_eq!(run(&push, &mut regs), 0);
    assert_eq!(run(&peek, &mut regs), 6);
    assert_eq!(run(&pop, &mut regs), 6);
    assert_eq!(run(&pop, &mut regs), 7);
    assert_eq!(run(&pop, &mut regs), 1000 + libc::ENOENT as u64);
}

#[test]
fn bloom_filter_push_and_peek_from_a_program() {
    let t = temp_store();
    let b = Map::create(&t.store, def(30, 0, 8, 64), "b").unwrap();
    let prog = |helper: u32| {
        load(
            &t,
            &format!(
                "ldxdw %r2, [%r1+112]
                 stxdw [%r10-8], %r2
                 lddw %r1, map_fd {id}
                 mov %r2, %r10
                 add %r2, -8
                 mov %r3, 0
                 call {helper}
                 exit",
                id = b.id()
            ),
        )
    };
    let (push, peek) = (prog(87), prog(89));
    let mut regs = [0u64; 21];
    regs[14] = 42;
    assert_eq!(run(&peek, &mut regs) as i64, -i64::from(libc::ENOENT));
    assert_eq!(run(&push, &mut regs), 0);
    assert_eq!(run(&peek, &mut regs), 0);
    let mut v = 42u64.to_ne_bytes();
    b.peek(&mut v).unwrap();
}

#[test]
fn percpu_lookup_helper_reaches_every_cpu() {
    let t = temp_store();
    let m = Map::create(&t.store, def(6, 4, 8, 2), "pc").unwrap();
    let ncpu = m.nr_cpus() as usize;
    let img: Vec<u8> = (0..ncpu as u64)
        .flat_map(|c| (100 + c).to_ne_bytes())
        .collect();
    m.update_syscall(&1u32.to_ne_bytes(), &img, BPF_ANY)
        .unwrap();
    // r0 = *bpf_map_lookup_percpu_elem(map, &1, ctx->rdi) or 9999 when NULL
    let p = load(
        &t,
        &format!(
            "ldxdw %r3, [%r1+112]
             stw [%r10-4], 1
             lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -4
             call 195
             jeq %r0, 0, null
             ldxdw %r0, [%r0+0]
             exit
             null:
             mov %r0, 9999
             exit",
            id = m.id()
        ),
    );
    let mut regs = [0u64; 21];
    for cpu in 0..ncpu as u64 {
        regs[14] = cpu;
        assert_eq!(run(&p, &mut regs), 100 + cpu);
    }
    regs[14] = ncpu as u64;
    assert_eq!(run(&p, &mut regs), 9999, "not a possible CPU");
}

/// pt_regs indexes (u64 slots) of bp, ip, sp.
const BP: usize = 4;
const IP: usize = 16;
const SP: usize = 19;

#[test]
fn stackid_and_stack_walk_frame_pointers_from_pt_regs() {
    let t = temp_store();
    let st = Map::create(&t.store, def(7, 4, 8 * 4, 16), "st").unwrap();
    // A fake frame chain: [next fp | return address].
    let mut chain = [0u64; 6];
    let fp = chain.as_ptr() as u64;
    chain[0] = fp + 16;
    chain[1] = 0x1111;
    chain[2] = fp + 32;
    chain[3] = 0x2222;
    chain[4] = 0;
    chain[5] = 0x3333;
    std::hint::black_box(&mut chain);
    let mut regs = [0u64; 21];
    regs[IP] = 0x4000; // not readable: not treated as a function entry
    regs[BP] = fp;
    regs[SP] = fp;
    // r0 = bpf_get_stackid(ctx, map, ctx->rdi)
    let stackid = load(
        &t,
        &format!(
            "ldxdw %r3, [%r1+112]
             lddw %r2, map_fd {id}
             call 27
             exit",
            id = st.id()
        ),
    );
    regs[14] = 1 << 8; // BPF_F_USER_STACK
    let id = run(&stackid, &mut regs);
    assert!(id < 16, "{}", id as i64);
    let mut v = [0u8; 32];
    st.lookup(&(id as u32).to_ne_bytes(), &mut v).unwrap();
    let frames: Vec<u64> = v
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(frames, [0x4000, 0x1111, 0x2222, 0x3333]);
    // The same stack gets the same id.
    assert_eq!(run(&stackid, &mut regs), id);
    // Skipping a frame: another stack, 3 deep, zero-padded (REUSE in case it shares a bucket).
    regs[14] = (1 << 8) | (1 << 10) | 1;
    let id2 = run(&stackid, &mut regs);
    st.lookup(&(id2 as u32).to_ne_bytes(), &mut v).unwrap();
    assert_eq!(&v[..8], &0x1111u64.to_ne_bytes());
    assert_eq!(&v[24..], &[0; 8]);
    // Kernel stacks do not exist here; unknown flags are EINVAL.
    regs[14] = 0;
    assert_eq!(run(&stackid, &mut regs) as i64, -i64::from(libc::EFAULT));
    regs[14] = 1 << 12;
    assert_eq!(run(&stackid, &mut regs) as i64, -i64::from(libc::EINVAL));

    // bpf_get_stack(ctx, buf, 48, flags): 4 frames then zeroes; returns 32.
    let get_stack = load(
        &t,
        "ldxdw %r4, [%r1+112]
         mov %r2, %r10
         add %r2, -48
         mov %r3, 48
         call 67
         mov %r6, %r0
         ldxdw %r7, [%r10-48]
         ldxdw %r8, [%r10-24]
         ldxdw %r9, [%r10-8]
         mov %r0, %r6
         lsh %r0, 8
         jne %r7, 0x4000, bad
         jne %r8, 0x3333, bad
         jne %r9, 0, bad
         exit
         bad:
         mov %r0, 1
         exit",
    );
    regs[14] = 1 << 8;
    assert_eq!(run(&get_stack, &mut regs), 32 << 8);
}

#[test]
fn lookup_in_a_map_of_maps_gives_a_usable_inner_map() {
    let t = temp_store();
    let inner = Map::create(&t.store, def(2, 4, 8, 4), "inner").unwrap();
    inner
        .update(&2u32.to_ne_bytes(), &77u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    let aom = Map::create_with(
        &t.store,
        def(12, 4, 4, 2),
        bpftime_maps::map::MapExtra {
            inner_map_id: inner.id(),
            ..Default::default()
        },
        "aom",
    )
    .unwrap();
    aom.update_id(&1u32.to_ne_bytes(), inner.id(), BPF_ANY)
        .unwrap();
    // inner = lookup(aom, &ctx->rdi); if !inner return 1000; v = lookup(inner, &2);
    // *v += 1; return *v
    let p = load(
        &t,
        &format!(
            "ldxdw %r2, [%r1+112]
             stxw [%r10-4], %r2
             lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -4
             call 1
             jeq %r0, 0, none
             mov %r1, %r0
             stw [%r10-8], 2
             mov %r2, %r10
             add %r2, -8
             call 1
             jeq %r0, 0, none
             ldxdw %r1, [%r0+0]
             add %r1, 1
             stxdw [%r0+0], %r1
             mov %r0, %r1
             exit
             none:
             mov %r0, 1000
             exit",
            id = aom.id()
        ),
    );
    let mut regs = [0u64; 21];
    regs[14] = 1;
    assert_eq!(run(&p, &mut regs), 78);
    assert_eq!(run(&p, &mut regs), 79, "the same handle again");
    regs[14] = 0;
    assert_eq!(run(&p, &mut regs), 1000, "empty slot: NULL");
    let mut v = [0u8; 8];
    inner.lookup(&2u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 79);
}

#[test]
fn rdonly_prog_maps_refuse_program_writes() {
    let t = temp_store();
    let d = MapDef {
        flags: bpftime_maps::map::BPF_F_RDONLY_PROG,
        ..def(1, 4, 8, 4)
    };
    let m = Map::create(&t.store, d, "ro").unwrap();
    m.update_syscall(&1u32.to_ne_bytes(), &5u64.to_ne_bytes(), BPF_ANY)
        .unwrap();
    // update(map, &1, &1, 0)
    let upd = load(
        &t,
        &format!(
            "stw [%r10-4], 1
             stdw [%r10-16], 1
             lddw %r1, map_fd {id}
             mov %r2, %r10
             add %r2, -4
             mov %r3, %r10
             add %r3, -16
             mov %r4, 0
             call 2
             exit",
            id = m.id()
        ),
    );
    let mut regs = [0u64; 21];
    assert_eq!(run(&upd, &mut regs) as i64, -i64::from(libc::EPERM));
    // A looked-up value reads fine but a store into it traps.
    let rd = |store: bool| {
        load(
            &t,
            &format!(
                "stw [%r10-4], 1
                 lddw %r1, map_fd {id}
                 mov %r2, %r10
                 add %r2, -4
                 call 1
                 jeq %r0, 0, out
                 {st}
                 ldxdw %r0, [%r0+0]
                 out:
                 exit",
                id = m.id(),
                st = if store { "stdw [%r0+0], 9" } else { "" }
            ),
        )
    };
    assert_eq!(run(&rd(false), &mut regs), 5);
    let p = rd(true);
    // SAFETY: `regs` is a live, writable 168-byte buffer.
    assert!(unsafe { p.run(regs.as_mut_ptr().cast(), 168) }.is_err());
}

#[test]
fn snprintf_strncmp_func_ip_and_cookie() {
    let t = temp_store();
    // bpf_snprintf(buf, 16, "v=%d", &[42], 8); r0 = ret << 56 | first 7 bytes of buf
    let p = load(
        &t,
        "lddw %r1, 0x64253d76
         stxdw [%r10-16], %r1
         stdw [%r10-24], 42
         mov %r1, %r10
         add %r1, -48
         mov %r2, 16
         mov %r3, %r10
         add %r3, -16
         mov %r4, %r10
         add %r4, -24
         mov %r5, 8
         call 165
         ldxdw %r1, [%r10-48]
         lsh %r0, 56
         or %r0, %r1
         exit",
    );
    let mut regs = [0u64; 21];
    let r = run(&p, &mut regs);
    assert_eq!(r >> 56, 5, "\"v=42\" and its NUL");
    assert_eq!(&(r & 0x00ff_ffff_ffff_ffff).to_le_bytes()[..5], b"v=42\0");
    // bpf_strncmp("abc", 3, "abd") = -1; ("abc", 2, "abd") = 0
    let cmp = |n: u32| {
        load(
            &t,
            &format!(
                "stw [%r10-8], 0x636261
                 stw [%r10-16], 0x646261
                 mov %r1, %r10
                 add %r1, -8
                 mov %r2, {n}
                 mov %r3, %r10
                 add %r3, -16
                 call 182
                 exit"
            ),
        )
    };
    assert_eq!(run(&cmp(3), &mut regs) as i64, -1);
    assert_eq!(run(&cmp(2), &mut regs), 0);
    // bpf_get_func_ip(ctx) = pt_regs ip; bpf_get_attach_cookie(ctx) = the run's cookie.
    let ip = load(&t, "call 173\nexit");
    regs[16] = 0x401234;
    assert_eq!(run(&ip, &mut regs), 0x401234);
    let ck = load(&t, "call 174\nexit");
    assert_eq!(run(&ck, &mut regs), 0);
    // SAFETY: `regs` is a live, writable 168-byte buffer.
    let r = unsafe { ck.run_with_cookie(regs.as_mut_ptr().cast(), 168, 0xc00c1e) }.unwrap();
    assert_eq!(r, 0xc00c1e);
    assert_eq!(run(&ck, &mut regs), 0, "the cookie lasts for one run");
}
