//! Random `bpf()` and `perf_event_open` arguments: the emulation answers with an errno (or
//! a result), never a panic or a crash, and leaves no object behind once the emulator drops.

use bpftime_maps::Store;
use bpftime_syscall_server::Emulator;
use bpftime_syscall_server::uapi::{BPF_MAP_CREATE, BPF_PROG_LOAD};
use std::sync::Arc;

const LICENSE: &[u8] = b"GPL\0";

fn put(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_attrs_give_errnos_never_panics() {
    let path = std::env::temp_dir().join(format!("bpftime-sst-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let store = Arc::new(Store::open(&path).unwrap());
    let emu = Emulator::new(store.clone());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut scratch = vec![0u8; 1 << 16];
    for b in scratch.iter_mut() {
        *b = rng.next() as u8;
    }
    let base = scratch.as_ptr() as u64;
    let mut fds: Vec<i64> = Vec::new();
    // Small valid programs for PROG_LOAD to point at: `mov r0, 0; exit`, and an `lddw` of a
    // map fd patched per round. Their pointers also land in other fields, where the emulation
    // may write through them (a value, a key, an info struct), so each buffer is padded to
    // more than anything written.
    let prog = |src: &str| {
        let mut b = bpftime_vm::isa::insns_to_bytes(&bpftime_vm::asm::assemble(src).unwrap());
        let n = (b.len() / 8) as u32;
        b.resize(1 << 14, 0);
        (b, n)
    };
    let mut progs: Vec<(Vec<u8>, u32)> = vec![
        prog("mov %r0, 0\nexit"),
        prog("lddw %r1, map_fd 3\ncall 1\nmov %r0, 0\nexit"),
    ];
    let last_end = |cmd: i64| -> usize {
        match cmd {
            0 => 92,
            1..=3 => 32,
            4 => 24,
            5 => 168,
            15 => 16,
            18 => 40,
            22 => 4,
            28 => 60,
            35 => 12,
            _ => 16,
        }
    };
    for round in 0..20_000 {
        let cmd = match rng.below(3) {
            0 => rng.below(40) as i64,
            _ => [0i64, 1, 2, 3, 4, 5, 15, 18, 22, 28, 35, 11, 12, 14, 19][rng.below(15) as usize],
        };
        let mut attr = [0u8; 256];
        let end = last_end(cmd);
        let mut at = 0;
        while at + 4 <= end {
            let v: u64 = match rng.below(10) {
                0..=3 => 0,
                4 => rng.below(16),
                5 => [1u64, 2, 4, 8, 16, 41, 42, 1024, u32::MAX as u64][rng.below(9) as usize],
                6 if !fds.is_empty() => fds[rng.below(fds.len() as u64) as usize] as u64,
                7 if at % 8 == 0 => {
                    if rng.below(3) == 0 {
                        let p = &mut progs[rng.below(2) as usize].0;
                        // imm of the lddw: the newest fd (a map or not).
                        if let (Some(&fd), Some(s)) = (fds.last(), p.get_mut(4..8)) {
                            s.copy_from_slice(&(fd as i32).to_ne_bytes())
                        }
                        p.as_ptr() as u64
                    } else {
                        base + rng.below(scratch.len() as u64 - 8192)
                    }
                }
                _ => rng.next() & 0xffff_ffff,
            };
            if v > u64::from(u32::MAX) && at % 8 == 0 && at + 8 <= attr.len() {
                attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
                at += 8;
            } else {
                attr[at..at + 4].copy_from_slice(&(v as u32).to_ne_bytes());
                at += 4;
            }
        }
        if rng.below(20) == 0 {
            attr[rng.below(256) as usize] = rng.next() as u8;
        }
        if cmd == i64::from(BPF_MAP_CREATE) {
            // Mostly plausible maps (small: the point is the argument checks, not the
            // allocator), with the name and BTF fields usually clean.
            let ty = [1u32, 2, 1, 2, rng.below(40) as u32][rng.below(5) as usize];
            let key = [4u32, 4, 8, rng.below(600) as u32][rng.below(4) as usize];
            put(&mut attr, 0, ty);
            put(&mut attr, 4, key);
            put(&mut attr, 8, rng.below(4096) as u32);
            put(&mut attr, 12, rng.below(64) as u32);
            if rng.below(4) != 0 {
                put(
                    &mut attr,
                    16,
                    [0, 1 << 10, 1 << 7 | 1 << 10, 1 << 3][rng.below(4) as usize],
                );
                attr[28..44].fill(0);
                attr[48..64].fill(0);
            }
        }
        if cmd == i64::from(BPF_PROG_LOAD) && rng.below(2) == 0 {
            let (p, n) = &progs[rng.below(2) as usize];
            put(&mut attr, 0, [1u32, 2, 5, 7][rng.below(4) as usize]);
            put(&mut attr, 4, *n);
            attr[8..16].copy_from_slice(&(p.as_ptr() as u64).to_ne_bytes());
            attr[16..24].copy_from_slice(&(LICENSE.as_ptr() as u64).to_ne_bytes());
            if rng.below(4) != 0 {
                attr[24..168].fill(0);
                if rng.below(2) == 0 {
                    // A log buffer in the scratch area.
                    put(&mut attr, 24, 1 + rng.below(2) as u32);
                    put(&mut attr, 28, rng.below(512) as u32 + 1);
                    let log = base + rng.below(scratch.len() as u64 - 1024);
                    attr[32..40].copy_from_slice(&log.to_ne_bytes());
                }
            }
        }
        let size = match rng.below(4) {
            0 => rng.below(300),
            1 => rng.below(5000),
            _ => 168,
        };
        if let Ok(fd) = emu.bpf(cmd, attr.as_ptr() as u64, size)
            && fd > 2
            && emu.entry(fd as i32).is_some()
        {
            fds.push(fd);
        }
        if round % 7 == 0 {
            let r = emu.perf_event_open(
                attr.as_ptr() as u64,
                rng.below(3) as i64 - 1,
                rng.below(3) as i64 - 1,
                -1,
                rng.below(16),
            );
            if let Ok(fd) = r {
                fds.push(fd);
            }
        }
        if round % 5 == 0 && !fds.is_empty() {
            let fd = fds[rng.below(fds.len() as u64) as usize] as i32;
            let req =
                [0x2400u64, 0x2401, 0x4004_2408, 0x8008_2407, rng.next()][rng.below(5) as usize];
            let arg = if rng.below(2) == 0 {
                base
            } else {
                rng.below(64)
            };
            let _ = emu.ioctl(fd, req, arg);
        }
        if fds.len() > 64 {
            let fd = fds.swap_remove(rng.below(fds.len() as u64) as usize);
            let _ = emu.close(fd as i32);
        }
    }
    drop(emu);
    assert!(store.live_ids().is_empty(), "{:?}", store.live_ids());
    let _ = std::fs::remove_file(&path);
}
