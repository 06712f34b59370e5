//! The syscall side of the map types beyond hash and array: value layouts (per-CPU images),
//! key-less maps (NULL keys), fds stored as object ids with the references they hold,
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` and the batch commands.

use bpftime_maps::Store;
use bpftime_syscall_server::uapi::*;
use bpftime_syscall_server::{Emulator, Errno};
use bpftime_vm::asm::assemble;
use bpftime_vm::isa::insns_to_bytes;
use std::path::PathBuf;
use std::sync::Arc;
use zerocopy::IntoBytes;

struct Fixture {
    emu: Option<Emulator>,
    path: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.emu.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

const EINVAL: Errno = Errno(libc::EINVAL);
const ENOENT: Errno = Errno(libc::ENOENT);
const EPERM: Errno = Errno(libc::EPERM);

impl Fixture {
    fn new() -> Fixture {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "bpftime-sst-types-{}-{}",
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

    fn bpf<T: IntoBytes + zerocopy::Immutable>(&self, cmd: i32, attr: &T) -> Result<i64, Errno> {
        let b = attr.as_bytes();
        self.emu()
            .bpf(i64::from(cmd), b.as_ptr() as u64, b.len() as u64)
    }

    fn map_with(&self, a: bpf_attr_map_create) -> Result<i32, Errno> {
        self.bpf(BPF_MAP_CREATE, &a).map(|fd| fd as i32)
    }

    fn map(&self, map_type: u32, key: u32, value: u32, max: u32, flags: u32) -> i32 {
        self.map_with(bpf_attr_map_create {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: max,
            map_flags: flags,
            ..Default::default()
        })
        .expect("map create")
    }

    fn elem(&self, cmd: i32, fd: i32, key: u64, value: u64, flags: u64) -> Result<i64, Errno> {
        self.bpf(
            cmd,
            &bpf_attr_map_elem {
                map_fd: fd as u32,
                key,
                value,
                flags,
                ..Default::default()
            },
        )
    }

    fn update(&self, fd: i32, key: &[u8], value: &[u8], flags: u64) -> Result<i64, Errno> {
        let k = if key.is_empty() {
            0
        } else {
            key.as_ptr() as u64
        };
        self.elem(BPF_MAP_UPDATE_ELEM, fd, k, value.as_ptr() as u64, flags)
    }

    fn lookup(&self, fd: i32, key: &[u8], out: &mut [u8]) -> Result<i64, Errno> {
        let k = if key.is_empty() {
            0
        } else {
            key.as_ptr() as u64
        };
        self.elem(BPF_MAP_LOOKUP_ELEM, fd, k, out.as_mut_ptr() as u64, 0)
    }

    fn lookup_and_delete(&self, fd: i32, key: &[u8], out: &mut [u8]) -> Result<i64, Errno> {
        let k = if key.is_empty() {
            0
        } else {
            key.as_ptr() as u64
        };
        self.elem(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            fd,
            k,
            out.as_mut_ptr() as u64,
            0,
        )
    }

    fn delete(&self, fd: i32, key: &[u8]) -> Result<i64, Errno> {
        self.elem(BPF_MAP_DELETE_ELEM, fd, key.as_ptr() as u64, 0, 0)
    }

    fn prog(&self) -> i32 {
        let insns = assemble("mov %r0, 0\nexit").unwrap();
        let bytes = insns_to_bytes(&insns);
        let license = b"GPL\0";
        self.bpf(
            BPF_PROG_LOAD,
            &bpf_attr_prog_load {
                prog_type: BPF_PROG_TYPE_KPROBE,
                insn_cnt: insns.len() as u32,
                insns: bytes.as_ptr() as u64,
                license: license.as_ptr() as u64,
                ..Default::default()
            },
        )
        .expect("prog load") as i32
    }

    fn id(&self, fd: i32) -> u32 {
        self.emu().entry(fd).expect("our fd").id
    }

    fn close(&self, fd: i32) {
        self.emu().close(fd).expect("close");
    }

    fn live(&self, id: u32) -> bool {
        self.emu().store().object(id).is_some()
    }
}

fn k32(k: u32) -> [u8; 4] {
    k.to_ne_bytes()
}

fn ncpus() -> usize {
    bpftime_maps::percpu::nr_possible_cpus() as usize
}

#[test]
fn percpu_values_are_one_slot_per_possible_cpu() {
    let f = Fixture::new();
    let fd = f.map(6, 4, 4, 2, 0);
    let n = ncpus();
    let img: Vec<u8> = (0..n as u64).flat_map(|c| (c + 1).to_ne_bytes()).collect();
    f.update(fd, &k32(1), &img, 0).unwrap();
    let mut out = vec![0xffu8; 8 * n];
    f.lookup(fd, &k32(1), &mut out).unwrap();
    assert_eq!(out, img, "round_up(4, 8) bytes per CPU");
    let h = f.map(5, 4, 8, 2, 0);
    f.update(h, &k32(9), &img, 0).unwrap();
    f.lookup(h, &k32(9), &mut out).unwrap();
    assert_eq!(out, img);
    let mut out2 = vec![0u8; 8 * n];
    f.lookup_and_delete(h, &k32(9), &mut out2).unwrap();
    assert_eq!(out2, img);
    assert_eq!(f.lookup(h, &k32(9), &mut out), Err(ENOENT));
}

#[test]
fn queue_takes_null_keys_and_pops_with_lookup_and_delete() {
    let f = Fixture::new();
    let q = f.map(22, 0, 8, 2, 0);
    let mut out = [0u8; 8];
    assert_eq!(f.lookup(q, &[], &mut out), Err(ENOENT));
    f.update(q, &[], &1u64.to_ne_bytes(), 0).unwrap();
    f.update(q, &[], &2u64.to_ne_bytes(), 0).unwrap();
    assert_eq!(
        f.update(q, &[], &3u64.to_ne_bytes(), 0),
        Err(Errno(libc::E2BIG))
    );
    // A key pointer for a map without keys is EINVAL (`__bpf_copy_key`).
    let dummy = [0u8; 4];
    assert_eq!(
        f.elem(
            BPF_MAP_LOOKUP_ELEM,
            q,
            dummy.as_ptr() as u64,
            out.as_mut_ptr() as u64,
            0
        ),
        Err(EINVAL)
    );
    f.lookup(q, &[], &mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 1, "peek");
    // Flags on a queue's lookup-and-delete are EINVAL.
    assert_eq!(
        f.elem(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            q,
            0,
            out.as_mut_ptr() as u64,
            4
        ),
        Err(EINVAL)
    );
    f.lookup_and_delete(q, &[], &mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 1, "pop");
    f.lookup_and_delete(q, &[], &mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 2);
    assert_eq!(f.lookup_and_delete(q, &[], &mut out), Err(ENOENT));
    assert_eq!(f.elem(BPF_MAP_DELETE_ELEM, q, 0, 0, 0), Err(EINVAL));
    // Read-only fd: lookup-and-delete needs write access too.
    let ro = f.map(22, 0, 8, 2, BPF_F_RDONLY);
    assert_eq!(f.lookup_and_delete(ro, &[], &mut out), Err(EPERM));
}

#[test]
fn bloom_filter_lookup_reads_the_value() {
    let f = Fixture::new();
    let fd = f
        .map_with(bpf_attr_map_create {
            map_type: 30,
            key_size: 0,
            value_size: 8,
            max_entries: 16,
            map_extra: 3,
            ..Default::default()
        })
        .unwrap();
    let mut v = 5u64.to_ne_bytes();
    assert_eq!(f.lookup(fd, &[], &mut v), Err(ENOENT));
    f.update(fd, &[], &v, 0).unwrap();
    assert_eq!(f.lookup(fd, &[], &mut v), Ok(0));
    assert_eq!(u64::from_ne_bytes(v), 5, "nothing copied back");
    // map_extra on other types, and above 15, is EINVAL.
    let bad = |t, extra| {
        f.map_with(bpf_attr_map_create {
            map_type: t,
            key_size: if t == 30 { 0 } else { 4 },
            value_size: 8,
            max_entries: 16,
            map_extra: extra,
            ..Default::default()
        })
    };
    assert_eq!(bad(1, 1), Err(EINVAL));
    assert_eq!(bad(30, 16), Err(EINVAL));
}

#[test]
fn prog_array_holds_its_programs() {
    let f = Fixture::new();
    let pa = f.map(3, 4, 4, 4, 0);
    let p = f.prog();
    let pid = f.id(p);
    f.update(pa, &k32(1), &(p as u32).to_ne_bytes(), 0).unwrap();
    let mut out = [0u8; 4];
    f.lookup(pa, &k32(1), &mut out).unwrap();
    assert_eq!(
        u32::from_ne_bytes(out),
        pid,
        "lookup reports the program id"
    );
    // Bad flags / index are checked before the fd; a non-program fd is EINVAL.
    assert_eq!(f.update(pa, &k32(1), &999u32.to_ne_bytes(), 1), Err(EINVAL));
    assert_eq!(
        f.update(pa, &k32(4), &999u32.to_ne_bytes(), 0),
        Err(Errno(libc::E2BIG))
    );
    assert_eq!(
        f.update(pa, &k32(0), &(pa as u32).to_ne_bytes(), 0),
        Err(EINVAL)
    );
    assert_eq!(
        f.update(pa, &k32(0), &9999u32.to_ne_bytes(), 0),
        Err(Errno(libc::EBADF))
    );
    // The array keeps the program alive after its fd is closed…
    f.close(p);
    assert!(f.live(pid));
    // …until the entry goes.
    f.delete(pa, &k32(1)).unwrap();
    assert!(!f.live(pid));
    assert_eq!(f.delete(pa, &k32(1)), Err(ENOENT));
    // Closing the array drops what it still holds.
    let p2 = f.prog();
    let pid2 = f.id(p2);
    f.update(pa, &k32(2), &(p2 as u32).to_ne_bytes(), 0)
        .unwrap();
    f.close(p2);
    let pa_id = f.id(pa);
    f.close(pa);
    assert!(!f.live(pa_id));
    assert!(!f.live(pid2));
}

#[test]
fn maps_of_maps_take_an_inner_template_and_hold_inner_maps() {
    let f = Fixture::new();
    let tmpl = f.map(1, 4, 8, 8, 0);
    let mk = |t, inner: i32| {
        f.map_with(bpf_attr_map_create {
            map_type: t,
            key_size: 4,
            value_size: 4,
            max_entries: 4,
            inner_map_fd: inner as u32,
            ..Default::default()
        })
    };
    assert_eq!(
        mk(12, 9999),
        Err(Errno(libc::EBADF)),
        "inner_map_fd not open"
    );
    let aom = mk(12, tmpl).unwrap();
    let hom = mk(13, tmpl).unwrap();
    assert_eq!(mk(12, aom), Err(EINVAL), "no nesting");
    let inner = f.map(1, 4, 8, 100, 0);
    let inner_id = f.id(inner);
    f.update(aom, &k32(0), &(inner as u32).to_ne_bytes(), 0)
        .unwrap();
    f.update(hom, &k32(7), &(inner as u32).to_ne_bytes(), 1)
        .unwrap();
    assert_eq!(
        f.update(hom, &k32(7), &(inner as u32).to_ne_bytes(), 1),
        Err(Errno(libc::EEXIST))
    );
    let wrong = f.map(1, 4, 4, 8, 0);
    assert_eq!(
        f.update(aom, &k32(1), &(wrong as u32).to_ne_bytes(), 0),
        Err(EINVAL)
    );
    let mut out = [0u8; 4];
    f.lookup(hom, &k32(7), &mut out).unwrap();
    assert_eq!(u32::from_ne_bytes(out), inner_id);
    f.close(inner);
    assert!(f.live(inner_id), "held by both outer maps");
    f.delete(aom, &k32(0)).unwrap();
    assert!(f.live(inner_id), "still held by the hash of maps");
    let hom_id = f.id(hom);
    f.close(hom);
    assert!(!f.live(hom_id));
    assert!(!f.live(inner_id));
}

#[test]
fn lookup_and_delete_elem_per_type() {
    let f = Fixture::new();
    let h = f.map(1, 4, 8, 4, 0);
    f.update(h, &k32(1), &5u64.to_ne_bytes(), 0).unwrap();
    let mut out = [0u8; 8];
    f.lookup_and_delete(h, &k32(1), &mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 5);
    assert_eq!(f.lookup_and_delete(h, &k32(1), &mut out), Err(ENOENT));
    assert_eq!(
        f.elem(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            h,
            k32(1).as_ptr() as u64,
            out.as_mut_ptr() as u64,
            1
        ),
        Err(EINVAL),
        "flags other than BPF_F_LOCK"
    );
    let a = f.map(2, 4, 8, 4, 0);
    assert_eq!(
        f.lookup_and_delete(a, &k32(1), &mut out),
        Err(Errno(ENOTSUPP))
    );
}

impl Fixture {
    fn batch(&self, cmd: i32, a: &mut bpf_attr_map_batch) -> Result<i64, Errno> {
        let b = a.as_mut_bytes();
        self.emu()
            .bpf(i64::from(cmd), b.as_mut_ptr() as u64, b.len() as u64)
    }
}

#[test]
fn lookup_batch_protocol_cursor_count_and_enoent() {
    let f = Fixture::new();
    let h = f.map(1, 4, 8, 64, 0);
    for k in 0..20u32 {
        f.update(h, &k32(k), &u64::from(k).to_ne_bytes(), 0)
            .unwrap();
    }
    let mut keys = vec![0u8; 4 * 64];
    let mut vals = vec![0u8; 8 * 64];
    let mut cursor = 0u32;
    let mut next = 0u32;
    let mut seen = Vec::new();
    let mut first = true;
    loop {
        let mut a = bpf_attr_map_batch {
            in_batch: if first {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count: 8,
            map_fd: h as u32,
            ..Default::default()
        };
        first = false;
        let r = f.batch(BPF_MAP_LOOKUP_BATCH, &mut a);
        for i in 0..a.count as usize {
            let k = u32::from_ne_bytes(keys[i * 4..i * 4 + 4].try_into().unwrap());
            let v = u64::from_ne_bytes(vals[i * 8..i * 8 + 8].try_into().unwrap());
            assert_eq!(u64::from(k), v);
            seen.push(k);
        }
        match r {
            Ok(_) => cursor = next,
            Err(Errno(libc::ENOENT)) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    // Lookup-and-delete in one go empties the map; count 0 is a no-op.
    let mut a = bpf_attr_map_batch {
        out_batch: &mut next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: vals.as_mut_ptr() as u64,
        count: 64,
        map_fd: h as u32,
        ..Default::default()
    };
    assert_eq!(
        f.batch(BPF_MAP_LOOKUP_AND_DELETE_BATCH, &mut a),
        Err(ENOENT)
    );
    assert_eq!(a.count, 20);
    let mut out = [0u8; 8];
    assert_eq!(f.lookup(h, &k32(3), &mut out), Err(ENOENT));
    a.count = 0;
    assert_eq!(f.batch(BPF_MAP_LOOKUP_BATCH, &mut a), Ok(0));
    // Unknown flags, a map without batches, a read-only fd.
    a.count = 4;
    a.elem_flags = 1;
    assert_eq!(f.batch(BPF_MAP_LOOKUP_BATCH, &mut a), Err(EINVAL));
    a.elem_flags = 0;
    let q = f.map(22, 0, 8, 4, 0);
    a.map_fd = q as u32;
    assert_eq!(f.batch(BPF_MAP_LOOKUP_BATCH, &mut a), Err(Errno(ENOTSUPP)));
    let ro = f.map(1, 4, 8, 4, BPF_F_RDONLY);
    a.map_fd = ro as u32;
    assert_eq!(f.batch(BPF_MAP_DELETE_BATCH, &mut a), Err(EPERM));
}

#[test]
fn update_and_delete_batches_report_how_far_they_got() {
    let f = Fixture::new();
    let h = f.map(1, 4, 8, 3, 0);
    let keys: Vec<u8> = (0..5u32).flat_map(|k| k.to_ne_bytes()).collect();
    let vals: Vec<u8> = (0..5u64).flat_map(|v| (v * 3).to_ne_bytes()).collect();
    let mut a = bpf_attr_map_batch {
        keys: keys.as_ptr() as u64,
        values: vals.as_ptr() as u64,
        count: 5,
        map_fd: h as u32,
        ..Default::default()
    };
    // Room for 3: the 4th fails with E2BIG, count says 3.
    assert_eq!(
        f.batch(BPF_MAP_UPDATE_BATCH, &mut a),
        Err(Errno(libc::E2BIG))
    );
    assert_eq!(a.count, 3);
    let mut out = [0u8; 8];
    f.lookup(h, &k32(2), &mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 6);
    // Delete: keys 0..3 exist, key 3 does not.
    a.count = 5;
    assert_eq!(f.batch(BPF_MAP_DELETE_BATCH, &mut a), Err(ENOENT));
    assert_eq!(a.count, 3);
    // A fault in the keys is EFAULT with the count so far.
    a.keys = 8;
    a.count = 2;
    assert_eq!(
        f.batch(BPF_MAP_UPDATE_BATCH, &mut a),
        Err(Errno(libc::EFAULT))
    );
    assert_eq!(a.count, 0);
}

#[test]
fn hash_of_maps_batch_updates_translate_fds() {
    let f = Fixture::new();
    let tmpl = f.map(2, 4, 8, 4, 0);
    let hom = f
        .map_with(bpf_attr_map_create {
            map_type: 13,
            key_size: 4,
            value_size: 4,
            max_entries: 4,
            inner_map_fd: tmpl as u32,
            ..Default::default()
        })
        .unwrap();
    let keys: Vec<u8> = [5u32, 6].iter().flat_map(|k| k.to_ne_bytes()).collect();
    let vals: Vec<u8> = [tmpl as u32, tmpl as u32]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let mut a = bpf_attr_map_batch {
        keys: keys.as_ptr() as u64,
        values: vals.as_ptr() as u64,
        count: 2,
        map_fd: hom as u32,
        ..Default::default()
    };
    f.batch(BPF_MAP_UPDATE_BATCH, &mut a).unwrap();
    let tid = f.id(tmpl);
    let mut out = [0u8; 4];
    f.lookup(hom, &k32(6), &mut out).unwrap();
    assert_eq!(u32::from_ne_bytes(out), tid);
    f.close(tmpl);
    assert!(f.live(tid), "held twice by the hash of maps");
    a.count = 2;
    f.batch(BPF_MAP_DELETE_BATCH, &mut a).unwrap();
    assert!(!f.live(tid), "both references dropped");
}

#[test]
fn access_flags_belong_to_the_fd_not_the_map() {
    let f = Fixture::new();
    let ro = f.map(1, 4, 8, 4, BPF_F_RDONLY);
    let v = 1u64.to_ne_bytes();
    assert_eq!(f.update(ro, &k32(1), &v, 0), Err(EPERM));
    // The map itself does not keep BPF_F_RDONLY (`bpf_map_flags_retain_permanent`)…
    let mut info = bpf_map_info::default();
    let a = bpf_attr_info {
        bpf_fd: ro as u32,
        info_len: size_of::<bpf_map_info>() as u32,
        info: &mut info as *mut bpf_map_info as u64,
    };
    f.bpf(BPF_OBJ_GET_INFO_BY_FD, &a).unwrap();
    assert_eq!(info.map_flags, 0);
    // …so a new fd from its id may write.
    let rw = f
        .bpf(
            BPF_MAP_GET_FD_BY_ID,
            &bpf_attr_get_id {
                start_id: info.id,
                ..Default::default()
            },
        )
        .unwrap() as i32;
    f.update(rw, &k32(1), &v, 0).unwrap();
    // DELETE_ELEM's last field is the key: a value pointer or flags is EINVAL.
    assert_eq!(
        f.elem(
            BPF_MAP_DELETE_ELEM,
            rw,
            k32(1).as_ptr() as u64,
            v.as_ptr() as u64,
            0
        ),
        Err(EINVAL)
    );
    assert_eq!(
        f.elem(BPF_MAP_DELETE_ELEM, rw, k32(1).as_ptr() as u64, 0, 1),
        Err(EINVAL)
    );
    f.delete(rw, &k32(1)).unwrap();
    // map_extra is reported.
    let b = f
        .map_with(bpf_attr_map_create {
            map_type: 30,
            value_size: 4,
            max_entries: 8,
            map_extra: 7,
            ..Default::default()
        })
        .unwrap();
    let a = bpf_attr_info {
        bpf_fd: b as u32,
        info_len: size_of::<bpf_map_info>() as u32,
        info: &mut info as *mut bpf_map_info as u64,
    };
    f.bpf(BPF_OBJ_GET_INFO_BY_FD, &a).unwrap();
    assert_eq!((info.type_, info.map_extra), (30, 7));
}
