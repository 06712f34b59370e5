//! The emulation driven through the rlib API: each test has its own store file and
//! [`Emulator`], and passes pointers to its own buffers as the loader would.

use bpftime_maps::Store;
use bpftime_maps::store::ObjectKind;
use bpftime_runtime::object::{PerfKind, perf_enabled, perf_prog, read_perf_event, read_prog};
use bpftime_syscall_server::uapi::*;
use bpftime_syscall_server::{Emulator, Errno};
use bpftime_vm::asm::assemble;
use bpftime_vm::isa::{Insn, insns_to_bytes};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use zerocopy::{FromBytes, IntoBytes};

struct Fixture {
    emu: Option<Emulator>,
    path: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "bpftime-sst-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let store = Arc::new(Store::open(&path).expect("open store"));
        Fixture {
            emu: Some(Emulator::new(store)),
            path,
        }
    }

    fn emu(&self) -> &Emulator {
        self.emu.as_ref().unwrap()
    }

    fn store(&self) -> &Arc<Store> {
        self.emu().store()
    }

    fn bpf<T: IntoBytes + zerocopy::Immutable>(&self, cmd: i32, attr: &T) -> Result<i64, Errno> {
        let b = attr.as_bytes();
        self.emu()
            .bpf(i64::from(cmd), b.as_ptr() as u64, b.len() as u64)
    }

    fn bpf_mut<T: IntoBytes + FromBytes>(&self, cmd: i32, attr: &mut T) -> Result<i64, Errno> {
        let b = attr.as_mut_bytes();
        self.emu()
            .bpf(i64::from(cmd), b.as_mut_ptr() as u64, b.len() as u64)
    }

    fn map(&self, map_type: u32, key: u32, value: u32, max: u32, flags: u32, name: &str) -> i32 {
        self.try_map(map_type, key, value, max, flags, name)
            .expect("map create") as i32
    }

    fn try_map(
        &self,
        map_type: u32,
        key: u32,
        value: u32,
        max: u32,
        flags: u32,
        name: &str,
    ) -> Result<i64, Errno> {
        let mut a = bpf_attr_map_create {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: max,
            map_flags: flags,
            ..Default::default()
        };
        a.map_name[..name.len()].copy_from_slice(name.as_bytes());
        self.bpf(BPF_MAP_CREATE, &a)
    }

    fn update(&self, fd: i32, key: &[u8], value: &[u8], flags: u64) -> Result<i64, Errno> {
        let a = bpf_attr_map_elem {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags,
            ..Default::default()
        };
        self.bpf(BPF_MAP_UPDATE_ELEM, &a)
    }

    fn lookup(&self, fd: i32, key: &[u8], out: &mut [u8]) -> Result<i64, Errno> {
        let a = bpf_attr_map_elem {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value: out.as_mut_ptr() as u64,
            ..Default::default()
        };
        self.bpf(BPF_MAP_LOOKUP_ELEM, &a)
    }

    fn delete(&self, fd: i32, key: &[u8]) -> Result<i64, Errno> {
        let a = bpf_attr_map_elem {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            ..Default::default()
        };
        self.bpf(BPF_MAP_DELETE_ELEM, &a)
    }

    fn next_key(&self, fd: i32, key: Option<&[u8]>, out: &mut [u8]) -> Result<i64, Errno> {
        let a = bpf_attr_map_elem {
            map_fd: fd as u32,
            key: key.map_or(0, |k| k.as_ptr() as u64),
            value: out.as_mut_ptr() as u64,
            ..Default::default()
        };
        // libbpf sends GET_NEXT_KEY with the 24-byte attr.
        self.emu().bpf(
            i64::from(BPF_MAP_GET_NEXT_KEY),
            a.as_bytes().as_ptr() as u64,
            24,
        )
    }

    fn freeze(&self, fd: i32) -> Result<i64, Errno> {
        let a = bpf_attr_map_elem {
            map_fd: fd as u32,
            ..Default::default()
        };
        self.emu()
            .bpf(i64::from(BPF_MAP_FREEZE), a.as_bytes().as_ptr() as u64, 4)
    }

    fn prog(
        &self,
        prog_type: u32,
        insns: &[Insn],
        name: &str,
        log: Option<&mut LogBuf>,
    ) -> Result<i64, Errno> {
        let bytes = insns_to_bytes(insns);
        let license = b"GPL\0";
        let mut a = bpf_attr_prog_load {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: bytes.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        a.prog_name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = log {
            a.log_level = l.level;
            a.log_size = l.buf.len() as u32;
            a.log_buf = l.buf.as_mut_ptr() as u64;
            let r = self.bpf_mut(BPF_PROG_LOAD, &mut a);
            l.true_size = a.log_true_size;
            return r;
        }
        self.bpf(BPF_PROG_LOAD, &a)
    }

    fn asm_prog(&self, prog_type: u32, src: &str) -> Result<i64, Errno> {
        self.prog(prog_type, &assemble(src).expect("assemble"), "", None)
    }

    fn entry_id(&self, fd: i64) -> u32 {
        self.emu().entry(fd as i32).expect("our fd").id
    }

    fn close(&self, fd: i64) {
        self.emu().close(fd as i32).expect("close");
    }

    fn live(&self) -> Vec<u32> {
        self.store().live_ids()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.emu.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

struct LogBuf {
    level: u32,
    buf: Vec<u8>,
    true_size: u32,
}

impl LogBuf {
    fn new(level: u32, size: usize) -> LogBuf {
        LogBuf {
            level,
            buf: vec![0xff; size],
            true_size: 0,
        }
    }

    fn text(&self) -> String {
        let n = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.buf.len());
        String::from_utf8_lossy(&self.buf[..n]).into_owned()
    }
}

const EINVAL: Errno = Errno(libc::EINVAL);
const EBADF: Errno = Errno(libc::EBADF);
const ENOENT: Errno = Errno(libc::ENOENT);
const EPERM: Errno = Errno(libc::EPERM);
const E2BIG: Errno = Errno(libc::E2BIG);
const EFAULT: Errno = Errno(libc::EFAULT);

fn k32(k: u32) -> [u8; 4] {
    k.to_ne_bytes()
}

fn v64(v: u64) -> [u8; 8] {
    v.to_ne_bytes()
}

#[test]
fn hash_map_update_lookup_iterate_delete_with_kernel_errnos() {
    let f = Fixture::new();
    let fd = f.map(BPF_MAP_TYPE_HASH, 4, 8, 16, 0, "counts");
    assert_eq!(f.update(fd, &k32(1), &v64(10), 0), Ok(0));
    assert_eq!(f.update(fd, &k32(2), &v64(20), 0), Ok(0));
    let mut out = [0u8; 8];
    assert_eq!(f.lookup(fd, &k32(2), &mut out), Ok(0));
    assert_eq!(u64::from_ne_bytes(out), 20);
    // BPF_NOEXIST on a present key, BPF_EXIST on an absent one, bad flags.
    assert_eq!(f.update(fd, &k32(1), &v64(0), 1), Err(Errno(libc::EEXIST)));
    assert_eq!(f.update(fd, &k32(3), &v64(0), 2), Err(ENOENT));
    assert_eq!(f.update(fd, &k32(3), &v64(0), 7), Err(EINVAL));
    assert_eq!(f.lookup(fd, &k32(9), &mut out), Err(ENOENT));
    // GET_NEXT_KEY from NULL walks every key, then ENOENT.
    let mut keys = Vec::new();
    let mut cur = [0u8; 4];
    let mut prev: Option<[u8; 4]> = None;
    loop {
        match f.next_key(fd, prev.as_ref().map(|p| &p[..]), &mut cur) {
            Ok(_) => {
                keys.push(u32::from_ne_bytes(cur));
                prev = Some(cur);
            }
            Err(e) => {
                assert_eq!(e, ENOENT);
                break;
            }
        }
    }
    keys.sort();
    assert_eq!(keys, vec![1, 2]);
    assert_eq!(f.delete(fd, &k32(1)), Ok(0));
    assert_eq!(f.delete(fd, &k32(1)), Err(ENOENT));
    assert_eq!(f.lookup(fd, &k32(1), &mut out), Err(ENOENT));
}

#[test]
fn array_map_errnos_follow_the_kernel() {
    let f = Fixture::new();
    let fd = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 4, 0, "totals");
    let mut out = [0xffu8; 8];
    assert_eq!(f.lookup(fd, &k32(3), &mut out), Ok(0));
    assert_eq!(out, [0; 8], "array elements exist and start zeroed");
    assert_eq!(f.lookup(fd, &k32(4), &mut out), Err(ENOENT));
    assert_eq!(f.update(fd, &k32(4), &v64(1), 0), Err(E2BIG));
    assert_eq!(f.update(fd, &k32(0), &v64(1), 1), Err(Errno(libc::EEXIST)));
    assert_eq!(f.delete(fd, &k32(0)), Err(EINVAL));
    let mut k = [0u8; 4];
    assert_eq!(f.next_key(fd, Some(&k32(3)), &mut k), Err(ENOENT));
    assert_eq!(f.next_key(fd, Some(&k32(99)), &mut k), Ok(0));
    assert_eq!(
        u32::from_ne_bytes(k),
        0,
        "an absent key restarts at the first"
    );
}

#[test]
fn frozen_map_refuses_syscall_writes_and_a_second_freeze() {
    let f = Fixture::new();
    let fd = f.map(BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0, "x.rodata");
    assert_eq!(f.update(fd, &k32(0), &7u32.to_ne_bytes(), 0), Ok(0));
    assert_eq!(f.freeze(fd), Ok(0));
    assert_eq!(f.update(fd, &k32(0), &8u32.to_ne_bytes(), 0), Err(EPERM));
    assert_eq!(f.freeze(fd), Err(Errno(libc::EBUSY)));
    let mut out = [0u8; 4];
    assert_eq!(f.lookup(fd, &k32(0), &mut out), Ok(0));
    assert_eq!(u32::from_ne_bytes(out), 7);
    let h = f.map(BPF_MAP_TYPE_HASH, 4, 4, 4, 0, "h");
    assert_eq!(f.update(h, &k32(0), &k32(1), 0), Ok(0));
    assert_eq!(f.freeze(h), Ok(0));
    assert_eq!(f.delete(h, &k32(0)), Err(EPERM));
}

#[test]
fn map_create_rejects_what_the_kernel_rejects() {
    let f = Fixture::new();
    // Types the store does not implement (sockmap = 15), and a ring buffer whose size is not
    // a power-of-two number of pages.
    assert_eq!(f.try_map(27, 0, 0, 2048, 0, "events"), Err(EINVAL));
    assert_eq!(f.try_map(15, 4, 4, 1, 0, "sm"), Err(EINVAL));
    // Name characters, flags per type, contradictory access flags, sizes.
    assert_eq!(
        f.try_map(BPF_MAP_TYPE_HASH, 4, 8, 1, 0, "bad-name"),
        Err(EINVAL)
    );
    assert_eq!(
        f.try_map(BPF_MAP_TYPE_HASH, 4, 8, 1, BPF_F_MMAPABLE, "h"),
        Err(EINVAL)
    );
    assert_eq!(
        f.try_map(
            BPF_MAP_TYPE_ARRAY,
            4,
            8,
            1,
            BPF_F_RDONLY | BPF_F_WRONLY,
            "a"
        ),
        Err(EINVAL)
    );
    assert_eq!(f.try_map(BPF_MAP_TYPE_ARRAY, 8, 8, 1, 0, "a"), Err(EINVAL));
    assert_eq!(f.try_map(BPF_MAP_TYPE_HASH, 4, 0, 1, 0, "h"), Err(EINVAL));
    // A BTF type id needs a BTF fd.
    let a = bpf_attr_map_create {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 4,
        value_size: 8,
        max_entries: 4,
        btf_fd: 9999,
        btf_key_type_id: 1,
        btf_value_type_id: 2,
        ..Default::default()
    };
    assert_eq!(f.bpf(BPF_MAP_CREATE, &a), Err(EBADF));
    assert!(f.live().is_empty(), "nothing was left behind");
}

#[test]
fn map_fd_permissions_follow_rdonly_and_wronly() {
    let f = Fixture::new();
    let ro = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_RDONLY, "ro");
    let wo = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_WRONLY, "wo");
    let mut out = [0u8; 8];
    assert_eq!(f.update(ro, &k32(0), &v64(1), 0), Err(EPERM));
    assert_eq!(f.lookup(ro, &k32(0), &mut out), Ok(0));
    assert_eq!(f.lookup(wo, &k32(0), &mut out), Err(EPERM));
    assert_eq!(f.update(wo, &k32(0), &v64(1), 0), Ok(0));
}

#[test]
fn fds_that_are_not_maps_give_ebadf_or_einval() {
    let f = Fixture::new();
    let mut out = [0u8; 8];
    // Not open at all: EBADF.
    assert_eq!(f.lookup(987_654, &k32(0), &mut out), Err(EBADF));
    // Open, but not a bpf map: EINVAL.
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(f.lookup(null.as_raw_fd(), &k32(0), &mut out), Err(EINVAL));
    let prog = f
        .asm_prog(BPF_PROG_TYPE_SOCKET_FILTER, "mov %r0, 0\nexit")
        .unwrap();
    assert_eq!(f.lookup(prog as i32, &k32(0), &mut out), Err(EINVAL));
    // A bad key pointer is EFAULT.
    let m = f.map(BPF_MAP_TYPE_HASH, 4, 8, 1, 0, "m");
    let a = bpf_attr_map_elem {
        map_fd: m as u32,
        key: 0x10,
        value: out.as_mut_ptr() as u64,
        ..Default::default()
    };
    assert_eq!(f.bpf(BPF_MAP_LOOKUP_ELEM, &a), Err(EFAULT));
}

#[test]
fn prog_load_rewrites_map_fds_to_ids_and_holds_the_maps() {
    let f = Fixture::new();
    let hash = f.map(BPF_MAP_TYPE_HASH, 4, 8, 16, 0, "counts");
    let bss = f.map(BPF_MAP_TYPE_ARRAY, 4, 16, 1, BPF_F_MMAPABLE, "p.bss");
    let hash_id = f.entry_id(hash.into());
    let bss_id = f.entry_id(bss.into());
    let src = format!(
        "stw [%r10-4], 7
         lddw %r1, map_fd {hash}
         mov %r2, %r10
         add %r2, -4
         call 1
         lddw %r2, map_value {bss}+8
         ldxdw %r3, [%r2+0]
         mov %r0, 0
         exit"
    );
    let fd = f.asm_prog(BPF_PROG_TYPE_KPROBE, &src).expect("load");
    let id = f.entry_id(fd);
    let rec = read_prog(f.store(), id).unwrap();
    assert_eq!(rec.prog_type, BPF_PROG_TYPE_KPROBE);
    let lddw: Vec<(u8, i32, i32)> = rec
        .insns
        .iter()
        .enumerate()
        .filter(|(_, i)| i.code == 0x18)
        .map(|(pc, i)| (i.src, i.imm, rec.insns[pc + 1].imm))
        .collect();
    assert_eq!(lddw, vec![(1, hash_id as i32, 0), (2, bss_id as i32, 8)]);
    // The program holds its maps: closing the map fds keeps them; closing the program frees.
    f.close(hash.into());
    f.close(bss.into());
    assert!(f.store().object(hash_id).is_some());
    f.close(fd);
    assert!(f.store().object(hash_id).is_none());
    assert!(f.store().object(bss_id).is_none());
    assert!(f.live().is_empty());
}

#[test]
fn prog_load_map_idx_uses_fd_array() {
    let f = Fixture::new();
    let m = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, "m");
    let insns =
        assemble("lddw %r1, map_idx 1\nlddw %r2, map_idx_value 1+4\nmov %r0, 0\nexit").unwrap();
    let bytes = insns_to_bytes(&insns);
    let fds: [i32; 2] = [-1, m];
    let lic = b"GPL\0";
    let mut a = bpf_attr_prog_load {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: bytes.as_ptr() as u64,
        license: lic.as_ptr() as u64,
        ..Default::default()
    };
    // Without fd_array: EPROTO, as the kernel.
    assert_eq!(f.bpf(BPF_PROG_LOAD, &a), Err(Errno(libc::EPROTO)));
    a.fd_array = fds.as_ptr() as u64;
    let fd = f.bpf(BPF_PROG_LOAD, &a).expect("load with fd_array");
    let rec = read_prog(f.store(), f.entry_id(fd)).unwrap();
    let mid = f.entry_id(m.into()) as i32;
    assert_eq!((rec.insns[0].src, rec.insns[0].imm), (1, mid));
    assert_eq!(
        (rec.insns[2].src, rec.insns[2].imm, rec.insns[3].imm),
        (2, mid, 4)
    );
}

#[test]
fn prog_load_with_a_bad_map_fd_is_ebadf_with_the_kernel_log_line() {
    let f = Fixture::new();
    let insns = assemble("lddw %r1, map_fd 999\nmov %r0, 0\nexit").unwrap();
    let mut log = LogBuf::new(1, 4096);
    assert_eq!(
        f.prog(BPF_PROG_TYPE_KPROBE, &insns, "p", Some(&mut log)),
        Err(EBADF)
    );
    assert!(
        log.text()
            .contains("fd 999 is not pointing to valid bpf_map"),
        "{}",
        log.text()
    );
    // An open fd that is not a map: EINVAL.
    let null = std::fs::File::open("/dev/null").unwrap();
    let insns = assemble(&format!(
        "lddw %r1, map_fd {}\nmov %r0, 0\nexit",
        null.as_raw_fd()
    ))
    .unwrap();
    assert_eq!(f.prog(BPF_PROG_TYPE_KPROBE, &insns, "p", None), Err(EINVAL));
}

#[test]
fn rejected_program_gets_a_verifier_style_log() {
    let f = Fixture::new();
    // bpf_skb_store_bytes (9): a networking helper a userspace runtime never has.
    let insns = assemble("call 9\nmov %r0, 0\nexit").unwrap();
    // log_level 0: EINVAL and the buffer untouched.
    assert_eq!(f.prog(BPF_PROG_TYPE_KPROBE, &insns, "", None), Err(EINVAL));
    let mut log = LogBuf::new(1, 4096);
    assert_eq!(
        f.prog(BPF_PROG_TYPE_KPROBE, &insns, "", Some(&mut log)),
        Err(EINVAL)
    );
    let text = log.text();
    assert!(text.contains("invalid func unknown#9"), "{text}");
    assert_eq!(log.true_size as usize, text.len() + 1);
    // A log that does not fit: ENOSPC, the buffer NUL-terminated, the true size reported.
    let mut small = LogBuf::new(1, 8);
    assert_eq!(
        f.prog(BPF_PROG_TYPE_KPROBE, &insns, "", Some(&mut small)),
        Err(Errno(libc::ENOSPC))
    );
    assert_eq!(small.buf[7], 0);
    assert_eq!(small.true_size, log.true_size);
    // A level without a buffer: nothing written, EINVAL.
    let lic = b"GPL\0";
    let bytes = insns_to_bytes(&insns);
    let a = bpf_attr_prog_load {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: bytes.as_ptr() as u64,
        license: lic.as_ptr() as u64,
        log_level: 1,
        ..Default::default()
    };
    assert_eq!(f.bpf(BPF_PROG_LOAD, &a), Err(EINVAL));
    // Invalid log attrs: a buffer without a level.
    let mut bad = LogBuf::new(0, 64);
    assert_eq!(
        f.prog(BPF_PROG_TYPE_KPROBE, &insns, "", Some(&mut bad)),
        Err(EINVAL)
    );
    assert!(f.live().is_empty());
}

#[test]
fn libbpf_feature_probes_succeed() {
    let f = Fixture::new();
    // probe_prog_load: SOCKET_FILTER `mov r0, 0; exit`, and one calling ktime_get_coarse_ns.
    assert!(
        f.asm_prog(BPF_PROG_TYPE_SOCKET_FILTER, "mov %r0, 0\nexit")
            .is_ok()
    );
    assert!(
        f.asm_prog(BPF_PROG_TYPE_SOCKET_FILTER, "call 160\nmov %r0, 0\nexit")
            .is_ok()
    );
    // Program names.
    let ok = assemble("mov %r0, 0\nexit").unwrap();
    assert!(
        f.prog(BPF_PROG_TYPE_SOCKET_FILTER, &ok, "libbpf_nametest", None)
            .is_ok()
    );
    assert_eq!(
        f.prog(BPF_PROG_TYPE_SOCKET_FILTER, &ok, "bad name", None),
        Err(EINVAL)
    );
    // Global data: lddw MAP_VALUE into an array.
    let m = f.map(BPF_MAP_TYPE_ARRAY, 4, 32, 1, 0, "libbpf_global");
    let src = format!("lddw %r1, map_value {m}+0\nstdw [%r1+0], 42\nmov %r0, 0\nexit");
    assert!(f.asm_prog(BPF_PROG_TYPE_SOCKET_FILTER, &src).is_ok());
    // TRACEPOINT, KPROBE with probe_read_kernel (113), PERF_EVENT.
    assert!(
        f.asm_prog(BPF_PROG_TYPE_TRACEPOINT, "mov %r0, 0\nexit")
            .is_ok()
    );
    assert!(
        f.asm_prog(
            BPF_PROG_TYPE_KPROBE,
            "mov %r1, %r10\nadd %r1, -8\nmov %r2, 8\nmov %r3, 0\ncall 113\nmov %r0, 0\nexit"
        )
        .is_ok()
    );
    // Unknown program type, empty program.
    assert_eq!(f.asm_prog(0, "mov %r0, 0\nexit"), Err(EINVAL));
    assert_eq!(f.prog(BPF_PROG_TYPE_KPROBE, &[], "", None), Err(E2BIG));
}

fn btf_blob() -> Vec<u8> {
    // struct btf_header: magic, version 1, flags 0, hdr_len 24, type_off 0, type_len 0,
    // str_off 0, str_len 1; then the string section "\0".
    let mut b = Vec::new();
    b.extend_from_slice(&0xEB9F_u16.to_le_bytes());
    b.extend_from_slice(&[1, 0]);
    for v in [24u32, 0, 0, 0, 1] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.push(0);
    b
}

#[test]
fn btf_load_checks_the_magic_and_info_returns_the_blob() {
    let f = Fixture::new();
    let blob = btf_blob();
    let mut log = vec![0xffu8; 256];
    let a = bpf_attr_btf_load {
        btf: blob.as_ptr() as u64,
        btf_size: blob.len() as u32,
        btf_log_buf: log.as_mut_ptr() as u64,
        btf_log_size: log.len() as u32,
        btf_log_level: 1,
        ..Default::default()
    };
    let fd = f.bpf(BPF_BTF_LOAD, &a).expect("btf load");
    assert_eq!(log[0], 0, "empty, NUL-terminated log");
    let mut bad = blob.clone();
    bad[0] = 0;
    let a2 = bpf_attr_btf_load {
        btf: bad.as_ptr() as u64,
        btf_size: bad.len() as u32,
        ..Default::default()
    };
    assert_eq!(f.bpf(BPF_BTF_LOAD, &a2), Err(EINVAL));

    let mut copy = vec![0u8; 64];
    let mut info = bpf_btf_info {
        btf: copy.as_mut_ptr() as u64,
        btf_size: copy.len() as u32,
        ..Default::default()
    };
    let mut ia = bpf_attr_info {
        bpf_fd: fd as u32,
        info_len: size_of::<bpf_btf_info>() as u32,
        info: info.as_mut_bytes().as_mut_ptr() as u64,
    };
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut ia), Ok(0));
    assert_eq!(ia.info_len, 32);
    assert_eq!(info.btf_size as usize, blob.len());
    assert_eq!(info.id, f.entry_id(fd));
    assert_eq!(&copy[..blob.len()], &blob[..]);
}

/// A uprobe perf event on this test binary; returns its fd.
fn uprobe(f: &Fixture, config: u64, pid: i64, cpu: i64) -> Result<i64, Errno> {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let path = std::ffi::CString::new(exe.as_os_str().as_encoded_bytes()).unwrap();
    let attr = perf_event_attr {
        type_: bpftime_syscall_server::UPROBE_PMU_TYPE,
        size: size_of::<perf_event_attr>() as u32,
        config,
        config1: path.as_ptr() as u64,
        config2: 0x1540,
        ..Default::default()
    };
    f.emu().perf_event_open(
        attr.as_bytes().as_ptr() as u64,
        pid,
        cpu,
        -1,
        PERF_FLAG_FD_CLOEXEC,
    )
}

fn link(f: &Fixture, prog: i64, target: i64, attach_type: u32, cookie: u64) -> Result<i64, Errno> {
    let a = bpf_attr_link_create {
        prog_fd: prog as u32,
        target_fd: target as u32,
        attach_type,
        bpf_cookie: cookie,
        ..Default::default()
    };
    // libbpf 1.1 sends 48 bytes.
    f.emu()
        .bpf(i64::from(BPF_LINK_CREATE), a.as_bytes().as_ptr() as u64, 48)
}

#[test]
fn link_create_on_a_uprobe_and_the_libbpf_ebadf_probe() {
    let f = Fixture::new();
    let tp = f
        .asm_prog(BPF_PROG_TYPE_TRACEPOINT, "mov %r0, 0\nexit")
        .unwrap();
    // libbpf's probe_perf_link: target_fd -1 must be EBADF.
    assert_eq!(link(&f, tp, -1, BPF_PERF_EVENT, 0), Err(EBADF));
    let kp = f
        .asm_prog(BPF_PROG_TYPE_KPROBE, "mov %r0, 0\nexit")
        .unwrap();
    let pe = uprobe(&f, 0, -1, 0).expect("perf_event_open");
    let pe_id = f.entry_id(pe);
    // A tracepoint program does not fit a uprobe.
    assert_eq!(link(&f, tp, pe, BPF_PERF_EVENT, 0), Err(EINVAL));
    let l = link(&f, kp, pe, BPF_PERF_EVENT, 77).expect("link");
    let rec = bpftime_runtime::object::read_link(f.store(), f.entry_id(l)).unwrap();
    assert_eq!(
        (rec.perf_event_id, rec.cookie, rec.attach_type),
        (pe_id, 77, BPF_PERF_EVENT)
    );
    assert_eq!(
        link(&f, kp, pe, BPF_PERF_EVENT, 0),
        Err(Errno(libc::EEXIST))
    );
    // Other attach types.
    assert_eq!(link(&f, kp, 0, BPF_TRACE_UPROBE_MULTI, 0), Err(EINVAL));
    // The link holds the program and the perf event.
    let kp_id = f.entry_id(kp);
    f.close(kp);
    f.close(pe);
    assert!(f.store().object(kp_id).is_some() && f.store().object(pe_id).is_some());
    f.close(l);
    assert!(f.store().object(kp_id).is_none() && f.store().object(pe_id).is_none());
}

#[test]
fn kprobe_multi_link_is_eopnotsupp_like_this_kernel() {
    let f = Fixture::new();
    let insns = assemble("mov %r0, 0\nexit").unwrap();
    let bytes = insns_to_bytes(&insns);
    let lic = b"GPL\0";
    let a = bpf_attr_prog_load {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: 2,
        insns: bytes.as_ptr() as u64,
        license: lic.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_KPROBE_MULTI,
        ..Default::default()
    };
    let p = f.bpf(BPF_PROG_LOAD, &a).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(
        link(&f, p, null.as_raw_fd().into(), BPF_TRACE_KPROBE_MULTI, 0),
        Err(Errno(libc::EOPNOTSUPP))
    );
}

#[test]
fn obj_get_info_copies_min_of_info_len_and_sizeof() {
    let f = Fixture::new();
    let m = f.map(BPF_MAP_TYPE_HASH, 4, 8, 1024, 0, "entry_counts");
    // Short: 16 bytes (type, id, key_size, value_size) only.
    let mut buf = [0xaau8; 200];
    let mut a = bpf_attr_info {
        bpf_fd: m as u32,
        info_len: 16,
        info: buf.as_mut_ptr() as u64,
    };
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut a), Ok(0));
    assert_eq!(a.info_len, 16);
    assert_eq!(&buf[..4], &1u32.to_ne_bytes());
    assert_eq!(&buf[8..12], &4u32.to_ne_bytes());
    assert_eq!(buf[16], 0xaa, "nothing past info_len is written");
    // Larger than the kernel's struct with a zero tail: sizeof written back.
    let mut buf = [0u8; 200];
    a.info_len = 200;
    a.info = buf.as_mut_ptr() as u64;
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut a), Ok(0));
    assert_eq!(a.info_len as usize, size_of::<bpf_map_info>());
    let info = bpf_map_info::read_from_prefix(&buf).unwrap().0;
    assert_eq!(
        (info.type_, info.key_size, info.value_size, info.max_entries),
        (1, 4, 8, 1024)
    );
    assert_eq!(&info.name[..12], b"entry_counts");
    assert_eq!(info.id, f.entry_id(m.into()));
    // A non-zero tail past sizeof: E2BIG.
    let mut buf = [0u8; 200];
    buf[150] = 1;
    a.info_len = 200;
    a.info = buf.as_mut_ptr() as u64;
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut a), Err(E2BIG));

    // Programs: map ids and the translated instructions.
    let src = format!("lddw %r1, map_fd {m}\nmov %r0, 0\nexit");
    let p = f.asm_prog(BPF_PROG_TYPE_KPROBE, &src).unwrap();
    let mut ids = [0u32; 4];
    let mut xlated = [0u8; 64];
    let mut pi = bpf_prog_info {
        nr_map_ids: 4,
        map_ids: ids.as_mut_ptr() as u64,
        xlated_prog_len: 64,
        xlated_prog_insns: xlated.as_mut_ptr() as u64,
        ..Default::default()
    };
    let mut a = bpf_attr_info {
        bpf_fd: p as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: pi.as_mut_bytes().as_mut_ptr() as u64,
    };
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut a), Ok(0));
    assert_eq!(pi.type_, BPF_PROG_TYPE_KPROBE);
    assert_eq!(pi.nr_map_ids, 1);
    assert_eq!(ids[0], f.entry_id(m.into()));
    assert_eq!(pi.xlated_prog_len, 32);
    assert_eq!(pi.gpl_compatible, 1);

    // Links: type, prog id, uprobe details.
    let pe = uprobe(&f, 1 | (6 << 32), -1, 0).unwrap();
    let l = link(&f, p, pe, BPF_PERF_EVENT, 5).unwrap();
    let mut li = bpf_link_info::default();
    let mut a = bpf_attr_info {
        bpf_fd: l as u32,
        info_len: size_of::<bpf_link_info>() as u32,
        info: li.as_mut_bytes().as_mut_ptr() as u64,
    };
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut a), Ok(0));
    assert_eq!(
        (li.type_, li.prog_id),
        (BPF_LINK_TYPE_PERF_EVENT, f.entry_id(p))
    );
    assert_eq!(
        (li.perf_event_type, li.offset, li.cookie, li.ref_ctr_offset),
        (BPF_PERF_EVENT_URETPROBE, 0x1540, 5, 6)
    );
    // A perf event fd is not a bpf object.
    a.bpf_fd = pe as u32;
    assert_eq!(f.bpf_mut(BPF_OBJ_GET_INFO_BY_FD, &mut a), Err(EINVAL));
}

#[test]
fn attr_copy_follows_bpf_check_uarg_tail_zero() {
    let f = Fixture::new();
    // Garbage pointer: EFAULT, no crash.
    assert_eq!(
        f.emu().bpf(i64::from(BPF_MAP_CREATE), 0x10, 72),
        Err(EFAULT)
    );
    assert_eq!(
        f.emu().bpf(i64::from(BPF_MAP_CREATE), u64::MAX - 8, 72),
        Err(EFAULT)
    );
    // A tail that wraps the address space: EFAULT, not an overflow.
    assert_eq!(
        f.emu().bpf(i64::from(BPF_MAP_CREATE), u64::MAX - 8, 300),
        Err(EFAULT)
    );
    assert_eq!(
        f.emu().perf_event_open(u64::MAX - 2, -1, 0, -1, 0),
        Err(EFAULT)
    );
    // Unknown command: EINVAL.
    let a = bpf_attr_map_elem::default();
    assert_eq!(f.bpf(999, &a), Err(EINVAL));
    assert_eq!(f.bpf(-1, &a), Err(EINVAL));
    // Larger than a page: E2BIG.
    let big = vec![0u8; 8192];
    assert_eq!(
        f.emu()
            .bpf(i64::from(BPF_MAP_CREATE), big.as_ptr() as u64, 4097),
        Err(E2BIG)
    );
    // Larger than the union with a zero tail: accepted; a non-zero tail: E2BIG.
    let mut buf = vec![0u8; 512];
    let create = bpf_attr_map_create {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..Default::default()
    };
    buf[..96].copy_from_slice(create.as_bytes());
    assert!(f.emu().bpf(0, buf.as_ptr() as u64, 512).is_ok());
    buf[300] = 1;
    assert_eq!(f.emu().bpf(0, buf.as_ptr() as u64, 512), Err(E2BIG));
    // Short attr: zero-extended (16 bytes: type, key, value, max_entries).
    assert!(f.emu().bpf(0, buf.as_ptr() as u64, 16).is_ok());
    // CHECK_ATTR: a byte after the command's last field is EINVAL.
    let mut elem = [0u8; 48];
    elem[40] = 1;
    assert_eq!(
        f.emu()
            .bpf(i64::from(BPF_MAP_LOOKUP_ELEM), elem.as_ptr() as u64, 48),
        Err(EINVAL)
    );
    // A short attr whose tail is unmapped: only `size` bytes are read.
    let page = 4096;
    let m = two_pages();
    let at = m + page - 16;
    assert_eq!(
        f.emu().bpf(i64::from(BPF_MAP_LOOKUP_ELEM), at as u64, 16),
        Err(EBADF)
    );
    assert_eq!(
        f.emu().bpf(i64::from(BPF_MAP_LOOKUP_ELEM), at as u64, 17),
        Err(EFAULT)
    );
}

/// Two pages, the second `PROT_NONE`; returns the first page's address.
fn two_pages() -> usize {
    // SAFETY: a fresh anonymous mapping; mprotect on its own second page.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(m, libc::MAP_FAILED);
        assert_eq!(
            libc::mprotect((m as usize + 4096) as *mut _, 4096, libc::PROT_NONE),
            0
        );
        // Map fd 0xffffffff (an fd that cannot be open) in the last 16 bytes of page one.
        std::ptr::write_bytes(m as *mut u8, 0xff, 4096);
        m as usize
    }
}

#[test]
fn perf_event_open_uprobe_records_the_target() {
    let f = Fixture::new();
    let fd = uprobe(&f, 0, -1, 0).expect("uprobe");
    let id = f.entry_id(fd);
    let ev = read_perf_event(f.store(), id).unwrap();
    assert_eq!(ev.kind, PerfKind::Uprobe);
    assert_eq!(
        (ev.pid, ev.cpu, ev.offset, ev.ref_ctr_offset),
        (-1, 0, 0x1540, 0)
    );
    assert_eq!(
        std::path::Path::new(&ev.path),
        std::fs::canonicalize("/proc/self/exe").unwrap()
    );
    assert!(
        perf_enabled(f.store(), id),
        "not `disabled`: enabled at open"
    );
    // bcc's garbage ref_ctr_offset (6 << 32) with a retprobe; a pid filter.
    let me = i64::from(std::process::id() as i32);
    let r = uprobe(&f, (6 << 32) | 1, me, -1).expect("uretprobe");
    let ev = read_perf_event(f.store(), f.entry_id(r)).unwrap();
    assert_eq!(
        (ev.kind, ev.ref_ctr_offset, ev.pid),
        (PerfKind::Uretprobe, 6, me as i32)
    );
    // pid -1 with cpu -1, a pid that does not exist.
    assert_eq!(uprobe(&f, 0, -1, -1), Err(EINVAL));
    assert_eq!(uprobe(&f, 0, 0x3fff_fff0, -1), Err(Errno(libc::ESRCH)));
}

#[test]
fn perf_event_open_checks_attr_size_and_type() {
    let f = Fixture::new();
    let mut attr = perf_event_attr {
        type_: PERF_TYPE_SOFTWARE,
        size: 136,
        // PERF_COUNT_SW_CPU_CLOCK: software events other than BPF_OUTPUT are not emulated.
        config: 0,
        ..Default::default()
    };
    let open = |a: &mut perf_event_attr| {
        f.emu()
            .perf_event_open(a.as_mut_bytes().as_mut_ptr() as u64, -1, 0, -1, 0)
    };
    assert_eq!(open(&mut attr), Err(Errno(libc::EOPNOTSUPP)));
    attr.type_ = PERF_TYPE_TRACEPOINT;
    // Id 0 is no tracepoint: EINVAL, as from the kernel's perf_trace_init.
    assert_eq!(open(&mut attr), Err(EINVAL));
    attr.size = 32;
    assert_eq!(open(&mut attr), Err(E2BIG));
    assert_eq!(attr.size, 136, "the kernel writes its size back");
    attr.size = 8192;
    assert_eq!(open(&mut attr), Err(E2BIG));
    attr.type_ = bpftime_syscall_server::UPROBE_PMU_TYPE;
    attr.size = 136;
    attr.config1 = 0;
    assert_eq!(open(&mut attr), Err(EINVAL), "no path");
    attr.config1 = 0x10;
    assert_eq!(open(&mut attr), Err(EFAULT), "garbage path pointer");
    let missing = c"/nonexistent/binary";
    attr.config1 = missing.as_ptr() as u64;
    assert_eq!(open(&mut attr), Err(ENOENT));
    assert_eq!(f.emu().perf_event_open(0x10, -1, 0, -1, 0), Err(EFAULT));
    assert!(f.live().is_empty());
}

#[test]
fn perf_ioctls_enable_disable_and_set_bpf() {
    let f = Fixture::new();
    let pe = uprobe(&f, 0, -1, 0).unwrap();
    let id = f.entry_id(pe);
    let ioctl = |req: u64, arg: u64| f.emu().ioctl(pe as i32, req, arg).expect("ours");
    assert_eq!(ioctl(PERF_EVENT_IOC_DISABLE, 0), Ok(0));
    assert!(!perf_enabled(f.store(), id));
    assert_eq!(ioctl(PERF_EVENT_IOC_ENABLE, 0), Ok(0));
    assert!(perf_enabled(f.store(), id));
    let tp = f
        .asm_prog(BPF_PROG_TYPE_TRACEPOINT, "mov %r0, 0\nexit")
        .unwrap();
    assert_eq!(
        ioctl(PERF_EVENT_IOC_SET_BPF, tp as u64),
        Err(EINVAL),
        "wrong program type"
    );
    assert_eq!(ioctl(PERF_EVENT_IOC_SET_BPF, 999_999), Err(EBADF));
    let kp = f
        .asm_prog(BPF_PROG_TYPE_KPROBE, "mov %r0, 0\nexit")
        .unwrap();
    assert_eq!(ioctl(PERF_EVENT_IOC_SET_BPF, kp as u64), Ok(0));
    assert_eq!(perf_prog(f.store(), id), Some(f.entry_id(kp)));
    assert_eq!(
        ioctl(PERF_EVENT_IOC_SET_BPF, kp as u64),
        Err(Errno(libc::EEXIST))
    );
    assert_eq!(ioctl(0x1234, 0), Err(Errno(libc::ENOTTY)));
    let mut idv = 0u64;
    assert_eq!(ioctl(PERF_EVENT_IOC_ID, &mut idv as *mut u64 as u64), Ok(0));
    assert_eq!(idv, u64::from(id));
    // Not our fd: not answered here.
    assert!(f.emu().ioctl(0, PERF_EVENT_IOC_ENABLE, 0).is_none());
    // The perf event holds the program set with SET_BPF.
    let kp_id = f.entry_id(kp);
    f.close(kp);
    assert!(f.store().object(kp_id).is_some());
    f.close(pe);
    assert!(f.store().object(kp_id).is_none());
}

#[test]
fn mmapable_array_maps_map_the_store_pages() {
    let f = Fixture::new();
    let emu = f.emu();
    let fd = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 4, BPF_F_MMAPABLE, "p.bss");
    let shared = libc::MAP_SHARED;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let at = emu.mmap(0, 4096, rw, shared, fd, 0).unwrap().expect("mmap");
    // A write through the mapping is what a syscall lookup (and a program) sees.
    bpftime_syscall_server::sys::write_user(at + 8, &v64(0x1234)).unwrap();
    let mut out = [0u8; 8];
    assert_eq!(f.lookup(fd, &k32(1), &mut out), Ok(0));
    assert_eq!(u64::from_ne_bytes(out), 0x1234);
    // Kernel checks: private mapping, past the data, offset, a hash map, a plain array.
    assert_eq!(
        emu.mmap(0, 4096, rw, libc::MAP_PRIVATE, fd, 0),
        Some(Err(EINVAL))
    );
    assert_eq!(emu.mmap(0, 8192, rw, shared, fd, 0), Some(Err(EINVAL)));
    assert_eq!(emu.mmap(0, 4096, rw, shared, fd, 4096), Some(Err(EINVAL)));
    let h = f.map(BPF_MAP_TYPE_HASH, 4, 8, 4, 0, "h");
    assert_eq!(
        emu.mmap(0, 4096, rw, shared, h, 0),
        Some(Err(Errno(ENOTSUPP)))
    );
    let plain = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 4, 0, "plain");
    assert_eq!(emu.mmap(0, 4096, rw, shared, plain, 0), Some(Err(EINVAL)));
    // A writable mapping blocks FREEZE until it is unmapped.
    assert_eq!(f.freeze(fd), Err(Errno(libc::EBUSY)));
    // SAFETY: unmapping the mapping made above, which nothing references.
    let r = unsafe { libc::munmap(at as usize as *mut libc::c_void, 4096) };
    assert_eq!(r, 0);
    emu.munmapped(at, 4096);
    assert_eq!(f.freeze(fd), Ok(0));
    // Frozen: read-only mappings only. RDONLY_PROG: no writable mapping.
    assert_eq!(emu.mmap(0, 4096, rw, shared, fd, 0), Some(Err(EPERM)));
    let ro = emu
        .mmap(0, 4096, libc::PROT_READ, shared, fd, 0)
        .unwrap()
        .expect("ro mmap");
    let mut got = [0u8; 8];
    bpftime_syscall_server::sys::read_user_into(ro + 8, &mut got).unwrap();
    assert_eq!(u64::from_ne_bytes(got), 0x1234);
    assert!(
        bpftime_syscall_server::sys::write_user(ro, &[1]).is_err(),
        "read-only pages"
    );
    let rodata = f.map(
        BPF_MAP_TYPE_ARRAY,
        4,
        4,
        1,
        BPF_F_MMAPABLE | BPF_F_RDONLY_PROG,
        "x.rodata",
    );
    assert_eq!(
        emu.mmap(0, 4096, rw, shared, rodata, 0),
        Some(Err(Errno(libc::EACCES)))
    );
    // A BPF_F_RDONLY map fd: no writable shared mapping (the fd is read-only).
    let rofd = f.map(
        BPF_MAP_TYPE_ARRAY,
        4,
        8,
        1,
        BPF_F_MMAPABLE | BPF_F_RDONLY,
        "ro",
    );
    assert_eq!(
        emu.mmap(0, 4096, rw, shared, rofd, 0),
        Some(Err(Errno(libc::EACCES)))
    );
    // Programs have no mmap.
    let p = f
        .asm_prog(BPF_PROG_TYPE_KPROBE, "mov %r0, 0\nexit")
        .unwrap();
    assert_eq!(
        emu.mmap(0, 4096, libc::PROT_READ, shared, p as i32, 0),
        Some(Err(Errno(libc::ENODEV)))
    );
    assert!(emu.mmap(0, 4096, libc::PROT_READ, shared, 0, 0).is_none());
}

#[test]
fn dup_takes_a_reference_and_the_last_close_removes() {
    let f = Fixture::new();
    let fd = f.map(BPF_MAP_TYPE_HASH, 4, 8, 4, 0, "m");
    let id = f.entry_id(fd.into());
    let d = f.emu().dup(fd).expect("dup");
    assert_ne!(d, fd);
    assert_eq!(f.emu().entry(d).map(|e| e.id), Some(id));
    assert_eq!(f.store().object(id).unwrap().refs, 2);
    f.close(fd.into());
    assert_eq!(
        f.update(d, &k32(1), &v64(1), 0),
        Ok(0),
        "the dup still works"
    );
    f.close(d.into());
    assert!(f.store().object(id).is_none());
}

#[test]
fn an_fd_closed_behind_our_back_is_forgotten() {
    let f = Fixture::new();
    let fd = f.map(BPF_MAP_TYPE_HASH, 4, 8, 4, 0, "m");
    let id = f.entry_id(fd.into());
    // Replaced behind our back by a raw dup3 (as a raw close plus reuse of the number would).
    let other = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: dup3 onto our own fd number; touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_dup3, other.as_raw_fd(), fd, 0) };
    assert_eq!(r, i64::from(fd));
    let mut out = [0u8; 8];
    assert_eq!(
        f.lookup(fd, &k32(1), &mut out),
        Err(EINVAL),
        "now /dev/null"
    );
    assert!(f.store().object(id).is_none(), "its reference was dropped");
}

#[test]
fn dropping_the_emulator_releases_everything() {
    let mut f = Fixture::new();
    let m = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, "m");
    let src = format!("lddw %r1, map_fd {m}\nmov %r0, 0\nexit");
    let p = f.asm_prog(BPF_PROG_TYPE_KPROBE, &src).unwrap();
    let pe = uprobe(&f, 0, -1, 0).unwrap();
    link(&f, p, pe, BPF_PERF_EVENT, 0).unwrap();
    assert_eq!(f.live().len(), 4);
    let store = f.store().clone();
    drop(f.emu.take());
    assert!(store.live_ids().is_empty());
}

#[test]
fn get_next_id_and_get_fd_by_id() {
    let f = Fixture::new();
    let m = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_RDONLY, "m");
    let mid = f.entry_id(m.into());
    let mut a = bpf_attr_get_id::default();
    assert_eq!(f.bpf_mut(BPF_MAP_GET_NEXT_ID, &mut a), Ok(0));
    assert_eq!(a.next_id, mid);
    a.start_id = mid;
    assert_eq!(f.bpf_mut(BPF_MAP_GET_NEXT_ID, &mut a), Err(ENOENT));
    assert_eq!(
        f.bpf_mut(BPF_PROG_GET_NEXT_ID, &mut bpf_attr_get_id::default()),
        Err(ENOENT)
    );
    let g = bpf_attr_get_id {
        start_id: mid,
        ..Default::default()
    };
    let fd = f.bpf(BPF_MAP_GET_FD_BY_ID, &g).expect("fd by id") as i32;
    assert_eq!(
        f.emu().entry(fd).map(|e| (e.kind, e.id)),
        Some((ObjectKind::Map, mid))
    );
    // BPF_F_RDONLY restricted the creating fd only: Linux does not keep it in the map
    // (`bpf_map_flags_retain_permanent`), so an fd by id may write (checked on 6.18).
    assert_eq!(f.update(fd, &k32(0), &v64(1), 0), Ok(0));
    assert_eq!(
        f.bpf(BPF_PROG_GET_FD_BY_ID, &g),
        Err(ENOENT),
        "not a program"
    );
}

#[test]
fn prog_bind_map_takes_a_reference() {
    let f = Fixture::new();
    let m = f.map(BPF_MAP_TYPE_ARRAY, 4, 32, 1, 0, "libbpf_det_bind");
    let mid = f.entry_id(m.into());
    let p = f
        .asm_prog(BPF_PROG_TYPE_SOCKET_FILTER, "mov %r0, 0\nexit")
        .unwrap();
    let a = bpf_attr_prog_bind_map {
        prog_fd: p as u32,
        map_fd: m as u32,
        flags: 0,
    };
    assert_eq!(f.bpf(BPF_PROG_BIND_MAP, &a), Ok(0));
    assert_eq!(
        f.bpf(BPF_PROG_BIND_MAP, &a),
        Ok(0),
        "binding twice is a no-op"
    );
    let bad = bpf_attr_prog_bind_map {
        prog_fd: m as u32,
        map_fd: m as u32,
        flags: 0,
    };
    assert_eq!(f.bpf(BPF_PROG_BIND_MAP, &bad), Err(EINVAL));
    f.close(m.into());
    assert!(
        f.store().object(mid).is_some(),
        "the program holds the bound map"
    );
    f.close(p);
    assert!(f.store().object(mid).is_none());
}

#[test]
fn a_mapping_keeps_its_map_alive_until_munmap() {
    let f = Fixture::new();
    let emu = f.emu();
    let fd = f.map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_MMAPABLE, "p.data");
    let id = f.entry_id(fd.into());
    let at = emu
        .mmap(
            0,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
        .unwrap()
        .unwrap();
    f.close(fd.into());
    assert!(f.store().object(id).is_some(), "still mapped");
    // SAFETY: unmapping the mapping made above, which nothing references.
    let r = unsafe { libc::munmap(at as usize as *mut libc::c_void, 4096) };
    assert_eq!(r, 0);
    emu.munmapped(at, 4096);
    assert!(f.store().object(id).is_none());
}
