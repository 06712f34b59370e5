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
            // BPF_NOEXIST, BPF_F_LOCK, unknown flags, a key past the end: the helper.
            for (key, flags) in [(0, 1), (0, 4), (0, 6), (0, 1 << 40), (4, 0), (u32::MAX, 2)] {
                assert_eq!(run(&p, &mut block(key, flags), 0), Ok(SLOW_UPDATE));
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
