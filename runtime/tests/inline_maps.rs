//! Array and per-CPU array lookups and updates inlined by the JIT behave like the helpers the
//! interpreter calls: same results (element found, NULL, the kernel's errors), same map
//! contents afterwards, for value sizes around every copy width and every flag, checked and
//! unchecked.

use bpftime_maps::{Map, MapDef};
use bpftime_runtime::helpers::registry;
use bpftime_runtime::object::{ProgRecord, create_prog};
use bpftime_runtime::{Engine, LoadedProg};
use bpftime_vm::asm::assemble;
use std::sync::Arc;

mod support;

use support::T;

fn temp_store() -> T {
    support::temp_store("inline")
}

/// Updates element `ctx[0]` (u32) with the bytes at `ctx + 16` and flags `ctx[8]`, stores the
/// result at `ctx[0]`, then looks the key up again: r0 = 1000 + the value's last byte, or 7
/// when the lookup gives NULL.
fn program(map: u32, value_size: u32) -> String {
    format!(
        "mov %r6, %r1
         ldxw %r2, [%r6+0]
         stxw [%r10-4], %r2
         lddw %r1, map_fd {map}
         mov %r2, %r10
         add %r2, -4
         mov %r3, %r6
         add %r3, 16
         ldxdw %r4, [%r6+8]
         call 2
         stxdw [%r6+0], %r0
         lddw %r1, map_fd {map}
         mov %r2, %r10
         add %r2, -4
         call 1
         jeq %r0, 0, null
         ldxb %r0, [%r0+{last}]
         add %r0, 1000
         exit
         null:
         mov %r0, 7
         exit",
        last = value_size - 1
    )
}

fn load(t: &T, src: &str, engine: Engine) -> LoadedProg {
    let insns = assemble(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let id = create_prog(
        &t.store,
        &ProgRecord {
            // Not a tracing type: the programs store their results into the context, which
            // tracing programs get read-only (as the kernel's verifier keeps it).
            prog_type: 0,
            expected_attach_type: 0,
            name: "inline".into(),
            insns,
        },
    )
    .unwrap();
    LoadedProg::load(&t.store, id, Arc::new(registry()))
        .unwrap()
        .with_engine(engine)
        .unwrap()
}

/// The map's contents as the syscall side sees them (every CPU's values for per-CPU maps).
fn contents(m: &Map) -> Vec<Vec<u8>> {
    (0..m.def().max_entries)
        .map(|k| {
            let mut v = vec![0u8; m.syscall_value_size()];
            m.lookup(&k.to_ne_bytes(), &mut v).unwrap();
            v
        })
        .collect()
}

/// Keeps the calling thread on the CPU it runs on now: per-CPU values of the engines' runs
/// then land in the same slot.
fn stay_on_this_cpu() {
    // SAFETY: sched_getcpu has no preconditions; a zeroed cpu_set_t is empty; CPU_SET and
    // sched_setaffinity on the calling thread with a valid set.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

#[test]
fn inlined_lookups_and_updates_match_the_interpreter() {
    stay_on_this_cpu();
    let engines = [
        Engine::Interpreter,
        Engine::Jit { checked: true },
        Engine::Jit { checked: false },
    ];
    for map_type in [2u32, 6] {
        for value_size in [1u32, 3, 4, 8, 12, 24, 64, 72] {
            for max in [1u32, 3] {
                let mut outcomes = Vec::new();
                for engine in engines {
                    let t = temp_store();
                    let def = MapDef {
                        map_type,
                        key_size: 4,
                        value_size,
                        max_entries: max,
                        flags: 0,
                    };
                    let m = Map::create(&t.store, def, "arr").unwrap();
                    let p = load(&t, &program(m.id(), value_size), engine);
                    let mut seen = Vec::new();
                    for (key, flags) in [
                        (0u32, 0u64),
                        (max - 1, 2),
                        (max, 0),
                        (u32::MAX, 0),
                        (0, 1),
                        (0, 4),
                        (0, 3),
                        (0, 1 << 33),
                    ] {
                        let mut ctx = [0u8; 168];
                        ctx[..4].copy_from_slice(&key.to_ne_bytes());
                        ctx[8..16].copy_from_slice(&flags.to_ne_bytes());
                        for (i, b) in ctx[16..].iter_mut().enumerate() {
                            *b = (i as u8)
                                .wrapping_mul(29)
                                .wrapping_add((key as u8).wrapping_add(3));
                        }
                        // SAFETY: `ctx` is a live, writable buffer of 168 bytes.
                        let r = unsafe { p.run(ctx.as_mut_ptr(), ctx.len()) }
                            .unwrap_or_else(|t| panic!("{engine:?}: {t}"));
                        let rc = i64::from_ne_bytes(ctx[..8].try_into().unwrap());
                        seen.push((key, flags, r, rc));
                    }
                    outcomes.push((engine, seen, contents(&m)));
                }
                let (_, want, want_data) = &outcomes[0];
                for (engine, got, data) in &outcomes[1..] {
                    let what = format!("type {map_type}, value size {value_size}, max {max}");
                    assert_eq!(got, want, "{engine:?} vs interpreter: {what}");
                    assert_eq!(data, want_data, "{engine:?} map contents: {what}");
                }
                // The kernel's answers, as the interpreter's helpers give them.
                let rc = |i: usize| want[i].3;
                assert_eq!(rc(0), 0);
                assert_eq!(rc(2), -i64::from(libc::E2BIG));
                assert_eq!(rc(4), -i64::from(libc::EEXIST));
                assert_eq!(rc(6), -i64::from(libc::EINVAL));
                assert_eq!(want[2].2, 7, "absent key: NULL");
            }
        }
    }
}

/// The same program with constant flags has a native entry (no helper call can be reached),
/// which gives the interpreter's results and map contents on real maps.
#[cfg(target_arch = "x86_64")]
#[test]
fn native_entries_match_the_interpreter() {
    stay_on_this_cpu();
    for map_type in [2u32, 6] {
        for value_size in [1u32, 8, 12, 64] {
            for flags in [0u64, 2] {
                let src = program(3, value_size)
                    .replace("ldxdw %r4, [%r6+8]", &format!("mov %r4, {flags}"));
                let mut outcomes = Vec::new();
                for engine in [
                    Engine::Interpreter,
                    Engine::Jit { checked: true },
                    Engine::Jit { checked: false },
                ] {
                    let t = temp_store();
                    let def = MapDef {
                        map_type,
                        key_size: 4,
                        value_size,
                        max_entries: 3,
                        flags: 0,
                    };
                    let m = Map::create(&t.store, def, "arr").unwrap();
                    let p = load(
                        &t,
                        &src.replace("map_fd 3", &format!("map_fd {}", m.id())),
                        engine,
                    );
                    let native = p.native_entry();
                    assert_eq!(
                        native.is_some(),
                        engine != Engine::Interpreter,
                        "{engine:?}: {:?}",
                        p.native_refused()
                    );
                    let mut seen = Vec::new();
                    for key in [0u32, 2, 3, u32::MAX] {
                        let mut ctx = [0u8; 168];
                        ctx[..4].copy_from_slice(&key.to_ne_bytes());
                        for (i, b) in ctx[16..].iter_mut().enumerate() {
                            *b = (i as u8).wrapping_mul(13).wrapping_add(key as u8);
                        }
                        let r = match native {
                            Some(f) => {
                                // SAFETY: `ctx` is a live, writable buffer of 168 bytes; the
                                // program's regions live in `t`'s store, open for the test.
                                let out = unsafe { f(ctx.as_mut_ptr(), 168) };
                                assert_eq!(out.status, bpftime_jit::abi::NATIVE_RAN);
                                out.r0
                            }
                            // SAFETY: as above.
                            None => unsafe { p.run(ctx.as_mut_ptr(), ctx.len()) }.unwrap(),
                        };
                        seen.push((key, r, i64::from_ne_bytes(ctx[..8].try_into().unwrap())));
                    }
                    outcomes.push((engine, seen, contents(&m)));
                }
                let (_, want, want_data) = &outcomes[0];
                for (engine, got, data) in &outcomes[1..] {
                    let what = format!("type {map_type}, value size {value_size}, flags {flags}");
                    assert_eq!(got, want, "{engine:?} native vs interpreter: {what}");
                    assert_eq!(data, want_data, "{engine:?} map contents: {what}");
                }
            }
        }
    }
}

/// A tracing program (kprobe/uprobe type) gets its context read-only, as the kernel's verifier
/// keeps it: a store into `pt_regs` traps on every engine, native entries included, instead of
/// changing the probed thread's registers. Other types may store into theirs.
#[test]
fn tracing_programs_cannot_store_into_their_context() {
    let src = "stdw [%r1+128], 0x1234\nmov %r0, 5\nexit";
    for (prog_type, writable) in [(2u32, false), (5, false), (0, true)] {
        for engine in [Engine::Interpreter, Engine::Jit { checked: true }] {
            let t = temp_store();
            let insns = assemble(src).unwrap();
            let id = create_prog(
                &t.store,
                &ProgRecord {
                    prog_type,
                    expected_attach_type: 0,
                    name: "ctxstore".into(),
                    insns,
                },
            )
            .unwrap();
            let p = LoadedProg::load(&t.store, id, Arc::new(registry()))
                .unwrap()
                .with_engine(engine)
                .unwrap();
            let mut ctx = [0u8; 168];
            // SAFETY: `ctx` is a live, writable buffer of 168 bytes.
            let r = unsafe { p.run(ctx.as_mut_ptr(), ctx.len()) };
            assert_eq!(r.is_ok(), writable, "type {prog_type}, {engine:?}: {r:?}");
            assert_eq!(ctx[128] == 0x34, writable, "type {prog_type}, {engine:?}");
            #[cfg(target_arch = "x86_64")]
            if let Some(f) = p.native_entry() {
                let mut ctx = [0u8; 168];
                // SAFETY: as above.
                let out = unsafe { f(ctx.as_mut_ptr(), 168) };
                let want = if writable {
                    bpftime_jit::abi::NATIVE_RAN
                } else {
                    bpftime_jit::abi::NATIVE_TRAPPED
                };
                assert_eq!(out.status, want, "type {prog_type} natively");
                assert_eq!(ctx[128] == 0x34, writable);
            }
        }
    }
}

/// After `jeq r0, 0` the checked JIT trusts accesses inside the looked-up value without a
/// run-time test (as the kernel's verifier proves them); everything else is still tested:
/// past the data area, a NULL result used without a check, a copy tested instead of the
/// register, a misaligned atomic. Same results, traps and contents as the interpreter. (A
/// neighbour element through the same pointer is the one documented difference: the JIT has
/// the map's whole data area as a region, the interpreter only the value it was given.)
#[test]
fn lookup_results_are_trusted_only_inside_the_value_after_a_null_check() {
    stay_on_this_cpu();
    let body = |key: u32, access: &str| {
        format!(
            "mov %r6, %r1
             mov %r1, {key}
             stxw [%r10-4], %r1
             lddw %r1, map_fd MAP
             mov %r2, %r10
             add %r2, -4
             call 1
             {access}
             exit"
        )
    };
    let cases = [
        // Inside the value: load, store, atomic add.
        body(
            1,
            "jeq %r0, 0, +5
             ldxdw %r1, [%r0+0]
             add %r1, 5
             stxdw [%r0+0], %r1
             mov %r2, 2
             lock add [%r0+0], %r2
             mov %r0, 0",
        ),
        // Past the data area's end (for a per-CPU array, past every CPU's slot: the next
        // element of the last key is the next CPU's first, except on the last CPU).
        body(
            2,
            "jeq %r0, 0, +1
             ldxdw %r0, [%r0+4096]",
        ),
        // An absent key's NULL, used without a check.
        body(5, "ldxdw %r0, [%r0+0]"),
        // A copy checked, the original used: still tested (and fine here).
        body(
            1,
            "mov %r7, %r0
             jeq %r7, 0, +1
             ldxdw %r0, [%r0+0]",
        ),
        // A misaligned atomic inside the value.
        body(
            1,
            "jeq %r0, 0, +2
             mov %r1, 1
             lock add32 [%r0+2], %r1",
        ),
    ];
    for map_type in [2u32, 6] {
        for src in &cases {
            let (want, want_data) = run_on_array(map_type, src, Engine::Interpreter);
            let (got, data) = run_on_array(map_type, src, Engine::Jit { checked: true });
            assert_eq!(
                got, want,
                "checked JIT vs interpreter, type {map_type}:\n{src}"
            );
            assert_eq!(data, want_data, "map contents, type {map_type}:\n{src}");
        }
        // The neighbour element (README limits): the interpreter traps, the checked JIT
        // writes it (inside the map's data area, its region).
        let src = body(
            0,
            "jeq %r0, 0, +2
             stdw [%r0+8], 9
             ldxdw %r0, [%r0+8]",
        );
        for (engine, want) in [
            (Engine::Interpreter, None),
            (Engine::Jit { checked: true }, Some(9)),
        ] {
            let (r, _) = run_on_array(map_type, &src, engine);
            assert_eq!(r.ok(), want, "{engine:?}, type {map_type}");
        }
    }
}

/// A trap's kind (without its address: each store maps elsewhere) and pc.
type TrapAt = (String, usize);

/// Runs `src` (its `MAP` replaced by the map's id) once on a fresh 3-element array (or per-CPU
/// array) of 8-byte values: its result or trap, and the map's contents afterwards.
fn run_on_array(map_type: u32, src: &str, engine: Engine) -> (Result<u64, TrapAt>, Vec<Vec<u8>>) {
    let t = temp_store();
    let def = MapDef {
        map_type,
        key_size: 4,
        value_size: 8,
        max_entries: 3,
        flags: 0,
    };
    let m = Map::create(&t.store, def, "arr").unwrap();
    let p = load(&t, &src.replace("MAP", &m.id().to_string()), engine);
    let mut ctx = [0u8; 168];
    // SAFETY: `ctx` is a live, writable buffer of 168 bytes.
    let r = unsafe { p.run(ctx.as_mut_ptr(), ctx.len()) }.map_err(|t| {
        let k = format!("{:?}", t.kind);
        (
            k.split_once(" addr").map_or(k.clone(), |x| x.0.to_string()),
            t.pc,
        )
    });
    (r, contents(&m))
}
