//! Inlined array / per-CPU array lookups and updates ([`bpftime_jit::InlineMap`]) on the
//! x86_64 JIT: the element addresses, the NULL of an absent key, every case that must reach
//! the helper instead (flags, key out of range, unknown CPU, a CPU without a slot, values over
//! 64 bytes, a handle that is not constant in the block), value copies of every width, and the
//! checked-mode window over the data area. The helpers here answer with a sentinel, so a
//! result tells which path ran. (Semantics against the interpreter on real maps:
//! `runtime/tests/inline_maps.rs`.)
#![cfg(target_arch = "x86_64")]

use bpftime_jit::{InlineLayout, InlineMap, JitOptions, JitProgram};
use bpftime_vm::asm::assemble;
use bpftime_vm::helper::{CallEnv, HelperRegistry, MemRegion};
use bpftime_vm::interpreter::TrapKind;
use bpftime_vm::memory::GuestMemory;
use bpftime_vm::verifier::verify;

const HANDLE: u64 = 0x7777_0000_1230;
const SLOW_LOOKUP: u64 = 0x51_0001;
const SLOW_UPDATE: u64 = 0x51_0002;

extern "C" fn lookup(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    SLOW_LOOKUP
}

extern "C" fn update(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    SLOW_UPDATE
}

fn helpers() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(1, "bpf_map_lookup_elem", lookup);
    h.register(2, "bpf_map_update_elem", update);
    h
}

/// A fake map: `cpus` slots of `max` elements of `stride` bytes, slot `c` at `c * slot_len`.
struct Fake {
    data: Vec<u64>,
    max: u32,
    value_size: u32,
    stride: u64,
    slot_len: u64,
    bases: Vec<u64>,
}

impl Fake {
    fn new(max: u32, value_size: u32, cpus: usize) -> Fake {
        let stride = u64::from(value_size).div_ceil(8) * 8;
        let slot_len = stride * u64::from(max);
        let data = vec![0u64; (slot_len as usize * cpus).div_ceil(8) + 1];
        let mut f = Fake {
            data,
            max,
            value_size,
            stride,
            slot_len,
            bases: Vec::new(),
        };
        let base = f.data.as_ptr() as u64;
        f.bases = (0..cpus as u64).map(|c| base + c * slot_len).collect();
        f
    }

    fn base(&self) -> u64 {
        self.data.as_ptr() as u64
    }

    fn elem(&self, cpu: usize, key: u32) -> u64 {
        self.bases[cpu] + u64::from(key) * self.stride
    }

    fn area_len(&self) -> u64 {
        self.slot_len * self.bases.len() as u64
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let off = (addr - self.base()) as usize;
        // SAFETY: test-only view of the fake map's own buffer.
        let all = unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.data.len() * 8)
        };
        all[off..off + len].to_vec()
    }

    fn array(&self) -> InlineMap {
        // SAFETY: the buffer outlives every program compiled with it in these tests and holds
        // `max` elements of `stride` bytes from `base()`.
        unsafe {
            InlineMap::new(
                HANDLE,
                self.max,
                self.value_size,
                self.stride,
                InlineLayout::Array { base: self.base() },
                self.base(),
                self.slot_len,
                true,
            )
        }
    }

    fn percpu(&self, bases: &[u64], writable: bool) -> InlineMap {
        // SAFETY: as above; `bases` (the caller's) outlives the programs, its non-zero entries
        // are slots of the buffer.
        unsafe {
            InlineMap::new(
                HANDLE,
                self.max,
                self.value_size,
                self.stride,
                InlineLayout::PerCpu {
                    bases: bases.as_ptr() as u64,
                    len: bases.len() as u64,
                },
                self.base(),
                self.area_len(),
                writable,
            )
        }
    }
}

fn jit(src: &str, checked: bool, inline: InlineMap) -> JitProgram {
    let h = helpers();
    let prog = verify(&assemble(src).expect("assembles"), &h).expect("verifies");
    let opts = JitOptions {
        checked,
        inline_maps: vec![inline],
        ..Default::default()
    };
    JitProgram::new(&prog, &h, &opts).expect("compiles")
}

/// Runs with a 128-byte block (r1) on `cpu`.
fn run(p: &JitProgram, block: &mut [u8; 128], cpu: u64) -> Result<u64, TrapKind> {
    let mut gm = GuestMemory::new();
    let start = block.as_mut_ptr() as u64;
    // SAFETY: `block` outlives the run, which is its only user.
    unsafe {
        gm.add_region(MemRegion {
            start,
            len: 128,
            writable: true,
        })
    };
    p.run_in_on_cpu(&mut gm, start, 128, std::ptr::null_mut(), cpu)
        .map_err(|t| t.kind)
}

/// r0 = lookup(map, &block[0] as u32) as an address, or 0.
fn lookup_prog() -> String {
    format!(
        "mov %r2, %r1
         lddw %r1, {HANDLE:#x}
         call 1
         exit"
    )
}

/// update(map, &block[0], &block[16], block[8]); r0 = its result.
fn update_prog() -> String {
    format!(
        "mov %r2, %r1
         mov %r3, %r1
         add %r3, 16
         ldxdw %r4, [%r1+8]
         lddw %r1, {HANDLE:#x}
         call 2
         exit"
    )
}

fn block(key: u32, flags: u64) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[..4].copy_from_slice(&key.to_ne_bytes());
    b[8..16].copy_from_slice(&flags.to_ne_bytes());
    for (i, v) in b[16..].iter_mut().enumerate() {
        *v = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    b
}

#[test]
fn array_lookup_gives_element_addresses_and_null_past_the_end() {
    let f = Fake::new(5, 12, 1);
    for checked in [false, true] {
        let p = jit(&lookup_prog(), checked, f.array());
        for key in 0..5 {
            assert_eq!(run(&p, &mut block(key, 0), 0), Ok(f.elem(0, key)));
        }
        for key in [5, 6, u32::MAX] {
            assert_eq!(run(&p, &mut block(key, 0), 0), Ok(0), "key {key}");
        }
    }
}

#[test]
fn percpu_lookup_uses_the_cpu_slot_or_the_helper() {
    let f = Fake::new(3, 8, 4);
    // CPU 2 has no slot (0): the helper answers for it, as for CPU ids past the table.
    let bases = vec![f.bases[0], f.bases[1], 0, f.bases[3]];
    for checked in [false, true] {
        let p = jit(&lookup_prog(), checked, f.percpu(&bases, true));
        for cpu in [0usize, 1, 3] {
            assert_eq!(run(&p, &mut block(2, 0), cpu as u64), Ok(f.elem(cpu, 2)));
        }
        assert_eq!(run(&p, &mut block(2, 0), 2), Ok(SLOW_LOOKUP));
        assert_eq!(run(&p, &mut block(2, 0), 4), Ok(SLOW_LOOKUP));
        assert_eq!(run(&p, &mut block(2, 0), u64::MAX), Ok(SLOW_LOOKUP));
        assert_eq!(run(&p, &mut block(3, 0), 0), Ok(0));
    }
}

#[test]
fn update_copies_every_value_width_and_leaves_the_rest_to_the_helper() {
    for vs in [1u32, 2, 3, 4, 5, 7, 8, 12, 24, 60, 64] {
        for checked in [false, true] {
            let f = Fake::new(4, vs, 1);
            let p = jit(&update_prog(), checked, f.array());
            let mut b = block(3, 2);
            assert_eq!(run(&p, &mut b, 0), Ok(0), "value size {vs}");
            assert_eq!(
                f.bytes(f.elem(0, 3), vs as usize),
                b[16..16 + vs as usize].to_vec()
            );
            // Neighbours untouched (the stride's padding included).
            assert!(
                f.bytes(f.elem(0, 0), 3 * f.stride as usize)
                    .iter()
                    .all(|&x| x == 0)
            );
            // BPF_NOEXIST, BPF_F_LOCK, unknown flags: the helper.
            for (key, flags) in [(0, 1), (0, 4), (0, 6), (0, 1 << 40), (4, 1)] {
                assert_eq!(run(&p, &mut block(key, flags), 0), Ok(SLOW_UPDATE));
            }
            // Valid flags and a key past the end: the kernel's -E2BIG, inline.
            for (key, flags) in [(4, 0), (u32::MAX, 2)] {
                assert_eq!(run(&p, &mut block(key, flags), 0), Ok(-7i64 as u64));
            }
        }
    }
    // Over 64 bytes: never inlined.
    let f = Fake::new(2, 72, 1);
    let p = jit(&update_prog(), true, f.array());
    assert_eq!(run(&p, &mut block(0, 0), 0), Ok(SLOW_UPDATE));
}

#[test]
fn percpu_update_writes_this_cpus_slot_only() {
    let f = Fake::new(2, 8, 2);
    let bases = f.bases.clone();
    let p = jit(&update_prog(), true, f.percpu(&bases, true));
    let mut b = block(1, 0);
    assert_eq!(run(&p, &mut b, 1), Ok(0));
    assert_eq!(f.bytes(f.elem(1, 1), 8), b[16..24].to_vec());
    assert_eq!(f.bytes(f.elem(0, 1), 8), vec![0; 8]);
    // A read-only map: updates go to the helper.
    let p = jit(&update_prog(), true, f.percpu(&bases, false));
    assert_eq!(run(&p, &mut block(1, 0), 1), Ok(SLOW_UPDATE));
}

#[test]
fn handle_must_be_constant_in_the_block() {
    let f = Fake::new(2, 8, 1);
    // The lddw is on one path only: r1 is not known at the call.
    let src = format!(
        "mov %r2, %r1
         lddw %r1, {HANDLE:#x}
         jeq %r2, 0, skip
         lddw %r1, {HANDLE:#x}
         skip:
         call 1
         exit"
    );
    let p = jit(&src, false, f.array());
    assert_eq!(run(&p, &mut block(0, 0), 0), Ok(SLOW_LOOKUP));
    // Another handle, or r1 rewritten after the lddw.
    let other = lookup_prog().replace(&format!("{HANDLE:#x}"), "0x1234");
    assert_eq!(
        run(&jit(&other, false, f.array()), &mut block(0, 0), 0),
        Ok(SLOW_LOOKUP)
    );
    let moved = format!(
        "mov %r2, %r1
         lddw %r1, {HANDLE:#x}
         add %r1, 0
         call 1
         exit"
    );
    assert_eq!(
        run(&jit(&moved, false, f.array()), &mut block(0, 0), 0),
        Ok(SLOW_LOOKUP)
    );
}

#[test]
fn checked_accesses_through_the_pointer_stay_inside_the_data_area() {
    let f = Fake::new(2, 8, 1);
    // Read the element, write it + 1, read past the area's end.
    let src = |off: i16| {
        format!(
            "mov %r2, %r1
             lddw %r1, {HANDLE:#x}
             call 1
             jeq %r0, 0, out
             ldxdw %r1, [%r0+{off}]
             add %r1, 1
             stxdw [%r0+{off}], %r1
             mov %r0, %r1
             out:
             exit"
        )
    };
    let p = jit(&src(0), true, f.array());
    assert_eq!(run(&p, &mut block(1, 0), 0), Ok(1));
    assert_eq!(run(&p, &mut block(1, 0), 0), Ok(2));
    let p = jit(&src(8), true, f.array());
    match run(&p, &mut block(1, 0), 0) {
        Err(TrapKind::OutOfBounds { addr, len: 8, .. }) => assert_eq!(addr, f.elem(0, 1) + 8),
        other => panic!("expected an out-of-bounds trap, got {other:?}"),
    }
    // A read-only area: reads pass, the store traps.
    let ro = {
        let bases = vec![f.base()];
        let m = f.percpu(&bases, false);
        let p = jit(&src(0), true, m);
        run(&p, &mut block(0, 0), 0)
    };
    assert!(
        matches!(ro, Err(TrapKind::OutOfBounds { write: true, .. })),
        "{ro:?}"
    );
}

/// The calling thread's rseq `cpu_id` offset from the thread pointer (glibc's ABI).
fn rseq_cpu_id_offset() -> Option<i32> {
    // SAFETY: dlsym with NUL-terminated names; glibc's exported constants are read-only.
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        if off.is_null() || size.is_null() || size.read() < 8 {
            return None;
        }
        i32::try_from(off.read() + 4).ok()
    }
}

fn native_jit(src: &str, checked: bool, inline: InlineMap) -> JitProgram {
    let h = helpers();
    let prog = verify(&assemble(src).expect("assembles"), &h).expect("verifies");
    let opts = JitOptions {
        checked,
        inline_maps: vec![inline],
        native: Some(bpftime_jit::NativeOptions {
            ctx_writable: true,
            cpu_id_tp_offset: rseq_cpu_id_offset(),
            regions: Vec::new(),
        }),
        static_regions: Vec::new(),
    };
    JitProgram::new(&prog, &h, &opts).expect("compiles")
}

/// count(): lookup, then update with `value + 1` (BPF_ANY), as `uretprobe-counter` does.
fn count_prog() -> String {
    format!(
        "mov %r6, %r1
         stw [%r10-4], 0
         mov %r2, %r10
         add %r2, -4
         lddw %r1, {HANDLE:#x}
         call 1
         mov %r1, 1
         jeq %r0, 0, add
         ldxdw %r1, [%r0]
         add %r1, 1
         add:
         stxdw [%r10-16], %r1
         mov %r2, %r10
         add %r2, -4
         mov %r3, %r10
         add %r3, -16
         mov %r4, 0
         lddw %r1, {HANDLE:#x}
         call 2
         exit"
    )
}

#[test]
fn native_count_on_a_percpu_array_writes_the_running_cpus_slot() {
    if rseq_cpu_id_offset().is_none() {
        eprintln!("skipped: glibc registered no rseq area (per-CPU native entries need it)");
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) + 64;
    let f = Fake::new(1, 8, cpus);
    let bases = f.bases.clone();
    for checked in [false, true] {
        let p = native_jit(&count_prog(), checked, f.percpu(&bases, true));
        assert_eq!(p.compiled().native_refused, None);
        let mut ctx = [0u8; 168];
        for _ in 0..1000 {
            // SAFETY: `ctx` and the fake map outlive the run.
            let out = unsafe { p.run_native(ctx.as_mut_ptr(), 168) }.expect("native entry");
            assert_eq!((out.r0, out.status), (0, bpftime_jit::abi::NATIVE_RAN));
        }
    }
    let total: u64 = (0..cpus)
        .map(|c| u64::from_ne_bytes(f.bytes(f.elem(c, 0), 8).try_into().unwrap()))
        .sum();
    assert_eq!(total, 2000);
}

#[test]
fn native_entry_does_not_run_on_a_cpu_without_a_slot() {
    if rseq_cpu_id_offset().is_none() {
        eprintln!("skipped: glibc registered no rseq area (per-CPU native entries need it)");
        return;
    }
    let f = Fake::new(1, 8, 2);
    // No CPU has a slot: nothing may run natively, and nothing is written.
    let bases = vec![0, f.bases[1]];
    let p = native_jit(&count_prog(), true, f.percpu(&bases, true));
    let mut ctx = [0u8; 168];
    // SAFETY: as above.
    let out = unsafe { p.run_native(ctx.as_mut_ptr(), 168) }.expect("native entry");
    assert_eq!(out.status, bpftime_jit::abi::NATIVE_NOT_RUN);
    assert!(
        f.bytes(f.base(), f.area_len() as usize)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn native_entries_need_updates_whose_flags_cannot_reach_the_helper() {
    let f = Fake::new(4, 8, 1);
    // Flags from memory: BPF_NOEXIST would need the helper.
    let p = native_jit(&update_prog(), true, f.array());
    assert!(p.native_entry().is_none());
    assert!(
        p.compiled()
            .native_refused
            .as_deref()
            .is_some_and(|w| w.contains("may need the helper")),
        "{:?}",
        p.compiled().native_refused
    );
    // A constant BPF_EXIST (2) cannot; a key past the end answers -E2BIG natively.
    let src = update_prog().replace("ldxdw %r4, [%r1+8]", "mov %r4, 2");
    let p = native_jit(&src, true, f.array());
    for (key, want) in [(1u32, 0u64), (9, -7i64 as u64)] {
        let mut b = block(key, 0);
        // SAFETY: `b` and the fake map outlive the run.
        let out = unsafe { p.run_native(b.as_mut_ptr(), 128) }.expect("native entry");
        assert_eq!((out.r0, out.status), (want, bpftime_jit::abi::NATIVE_RAN));
    }
    assert_eq!(f.bytes(f.elem(0, 1), 8), block(0, 0)[16..24].to_vec());
    // A map that is not inlined (another handle): the helper, so no native entry.
    let other = lookup_prog().replace(&format!("{HANDLE:#x}"), "0x1234");
    let p = native_jit(&other, true, f.array());
    assert!(p.native_entry().is_none());
}

#[test]
fn native_entries_check_accesses_against_their_regions() {
    let f = Fake::new(4, 8, 1);
    let data = f.base();
    let h = helpers();
    // *(u64 *)(data + off) += 1; r0 = the new value.
    let src = |off: i16| {
        format!(
            "lddw %r1, {data:#x}
             ldxdw %r0, [%r1+{off}]
             add %r0, 1
             stxdw [%r1+{off}], %r0
             exit"
        )
    };
    let compile = |src: &str, regions: Vec<(u64, u64, bool)>| {
        let prog = verify(&assemble(src).expect("assembles"), &h).expect("verifies");
        let opts = JitOptions {
            checked: true,
            native: Some(bpftime_jit::NativeOptions {
                ctx_writable: true,
                cpu_id_tp_offset: None,
                regions,
            }),
            ..Default::default()
        };
        JitProgram::new(&prog, &h, &opts).expect("compiles")
    };
    let other = [0u64; 4];
    let other_region = (other.as_ptr() as u64, 32, true);
    let mut ctx = [0u8; 16];
    let run = |p: &JitProgram, ctx: &mut [u8; 16]| {
        // SAFETY: `ctx`, the fake map and `other` outlive the runs.
        let out = unsafe { p.run_native(ctx.as_mut_ptr(), 16) }.expect("native entry");
        (out.r0, out.status)
    };
    use bpftime_jit::abi::{NATIVE_RAN, NATIVE_TRAPPED};
    // Found in the second region (the checker walks the table) and in the first (the window).
    let area = (data, f.area_len(), true);
    for (i, regions) in [vec![area], vec![other_region, area]]
        .into_iter()
        .enumerate()
    {
        let p = compile(&src(8), regions);
        assert_eq!(run(&p, &mut ctx), (2 * i as u64 + 1, NATIVE_RAN));
        assert_eq!(run(&p, &mut ctx), (2 * i as u64 + 2, NATIVE_RAN));
    }
    // Past the end of every region, in no region at all, a store to a read-only one.
    let p = compile(&src(f.area_len() as i16), vec![other_region, area]);
    assert_eq!(run(&p, &mut ctx), (0, NATIVE_TRAPPED));
    let p = compile(&src(0), Vec::new());
    assert_eq!(run(&p, &mut ctx), (0, NATIVE_TRAPPED));
    let p = compile(&src(0), vec![other_region, (data, f.area_len(), false)]);
    assert_eq!(run(&p, &mut ctx), (0, NATIVE_TRAPPED));
    // The trapped runs wrote nothing.
    assert_eq!(f.bytes(data, 16), [[0u8; 8], 4u64.to_ne_bytes()].concat());
    // A helper that is not an inlined map call: no native entry, and why.
    let p = compile("call 1\nexit", Vec::new());
    assert!(p.native_entry().is_none());
    assert_eq!(
        p.compiled().native_refused.as_deref(),
        Some("pc 0: helper 1")
    );
}

#[test]
fn native_code_never_touches_vector_or_x87_state() {
    use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory};
    let f = Fake::new(2, 8, 2);
    let bases = f.bases.clone();
    let mut info = InstructionInfoFactory::new();
    for checked in [false, true] {
        // Regions empty: the code holds no data table, so all of it decodes as instructions.
        let h = helpers();
        let prog = verify(&assemble(&count_prog()).unwrap(), &h).unwrap();
        let opts = JitOptions {
            checked,
            inline_maps: vec![f.percpu(&bases, true)],
            native: Some(bpftime_jit::NativeOptions {
                ctx_writable: true,
                cpu_id_tp_offset: Some(0x100),
                regions: Vec::new(),
            }),
            static_regions: Vec::new(),
        };
        let p = JitProgram::new(&prog, &h, &opts).unwrap();
        assert!(p.native_entry().is_some());
        let code = &p.compiled().code;
        let mut d = Decoder::new(64, code, DecoderOptions::NONE);
        let mut n = 0;
        for insn in &mut d {
            n += 1;
            assert!(!insn.is_invalid(), "undecodable code in {code:02x?}");
            for r in info.info(&insn).used_registers() {
                let r = r.register();
                assert!(
                    !(r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_st() || r.is_mm()),
                    "{insn} uses {r:?}"
                );
            }
        }
        assert!(n > 50);
    }
}

#[test]
fn native_entries_report_which_context_bytes_the_program_may_read() {
    let h = helpers();
    let reads = |src: &str| {
        let prog = verify(&assemble(src).expect("assembles"), &h).expect("verifies");
        let opts = JitOptions {
            checked: true,
            native: Some(bpftime_jit::NativeOptions::default()),
            ..Default::default()
        };
        let p = JitProgram::new(&prog, &h, &opts).expect("compiles");
        assert!(p.native_entry().is_some(), "{src}");
        p.compiled().ctx_reads
    };
    let bytes = |r: std::ops::Range<u32>| r.fold(0u64, |m, b| m | 1 << b);
    assert_eq!(reads("mov %r0, 0\nexit"), 0);
    // r1 overwritten first (the syscall benchmark's program: r1 = 1, then an atomic add).
    assert_eq!(reads("mov %r1, 1\nldxdw %r0, [%r10-8]\nexit"), 0);
    assert_eq!(reads("mov32 %r2, %r1\nldxb %r0, [%r2]\nexit"), u64::MAX);
    assert_eq!(reads("ldxdw %r0, [%r1+16]\nexit"), bytes(16..24));
    // Copies and constant moves are followed.
    assert_eq!(
        reads("mov %r6, %r1\nadd %r6, 8\nldxw %r0, [%r6+4]\nldxb %r2, [%r1]\nexit"),
        bytes(12..16) | bytes(0..1)
    );
    // Both paths' offsets count where they agree; a join of a context pointer with another
    // value, a variable offset, a read past 64 bytes, or the pointer stored: everything.
    assert_eq!(
        reads("mov %r2, %r1\njeq %r1, 0, l\nldxw %r0, [%r2+8]\nl:\nldxw %r0, [%r2+8]\nexit"),
        bytes(8..12)
    );
    assert_eq!(
        reads("mov %r2, %r1\njeq %r1, 0, l\nmov %r2, %r10\nadd %r2, -8\nl:\nldxw %r0, [%r2]\nexit"),
        u64::MAX
    );
    assert_eq!(
        reads("ldxdw %r2, [%r1]\nadd %r1, %r2\nldxb %r0, [%r1]\nexit"),
        u64::MAX
    );
    assert_eq!(reads("ldxb %r0, [%r1+64]\nexit"), u64::MAX);
    assert_eq!(reads("stxdw [%r10-8], %r1\nmov %r0, 0\nexit"), u64::MAX);
}

#[test]
fn a_native_entry_gives_a_program_without_calls_one_frame_of_stack() {
    use bpftime_jit::abi::{NATIVE_RAN, NATIVE_TRAPPED};
    let h = helpers();
    let run = |off: i32| {
        // A pointer derived from r10 (checked at run time, unlike r10's own accesses).
        let src = format!(
            "mov %r2, %r10
             add %r2, {off}
             stdw [%r2], 7
             ldxdw %r0, [%r2]
             exit"
        );
        let prog = verify(&assemble(&src).expect("assembles"), &h).expect("verifies");
        let opts = JitOptions {
            checked: true,
            native: Some(bpftime_jit::NativeOptions::default()),
            ..Default::default()
        };
        let p = JitProgram::new(&prog, &h, &opts).expect("compiles");
        let mut ctx = [0u8; 8];
        // SAFETY: `ctx` outlives the run; no regions.
        let out = unsafe { p.run_native(ctx.as_mut_ptr(), 8) }.expect("native entry");
        (out.status, out.r0)
    };
    // Inside the 512-byte frame: fine; below it (another frame's place: no bpf-to-bpf call
    // here, so none was reserved) or above the frame: a trap, not the native stack around it.
    assert_eq!(run(-8), (NATIVE_RAN, 7));
    assert_eq!(run(-512), (NATIVE_RAN, 7));
    assert_eq!(run(-520), (NATIVE_TRAPPED, 0));
    assert_eq!(run(-4096), (NATIVE_TRAPPED, 0));
    assert_eq!(run(0), (NATIVE_TRAPPED, 0));
}

#[test]
fn accesses_inside_a_null_checked_lookup_result_are_not_tested() {
    let f = Fake::new(4, 16, 1);
    // The same loads, stores and atomic through r0, after a null check of r0 itself or of a
    // copy (which the analysis does not follow): the first compiles without their tests.
    let src = |tested: &str| {
        format!(
            "mov %r2, %r1
             lddw %r1, {HANDLE:#x}
             call 1
             mov %r7, %r0
             jeq {tested}, 0, out
             ldxdw %r1, [%r0+8]
             add %r1, 3
             stxdw [%r0+8], %r1
             mov %r2, 1
             lock add [%r0+0], %r2
             ldxdw %r0, [%r0+8]
             out:
             exit"
        )
    };
    let (proved, copied) = (
        jit(&src("%r0"), true, f.array()),
        jit(&src("%r7"), true, f.array()),
    );
    assert!(
        proved.compiled().code.len() + 40 < copied.compiled().code.len(),
        "{} vs {} bytes",
        proved.compiled().code.len(),
        copied.compiled().code.len()
    );
    // Both programs on the same element: +3 each.
    assert_eq!(run(&proved, &mut block(2, 0), 0), Ok(3));
    assert_eq!(run(&copied, &mut block(2, 0), 0), Ok(6));
    assert_eq!(f.bytes(f.elem(0, 2), 16)[..8], 2u64.to_ne_bytes());
    assert_eq!(f.bytes(f.elem(0, 2), 16)[8..], 6u64.to_ne_bytes());
    // An absent key: NULL, both leave through `out`.
    assert_eq!(run(&proved, &mut block(9, 0), 0), Ok(0));
}
