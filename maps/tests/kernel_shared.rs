//! Kernel-backed maps (`--kernel-maps`, `bpftime_maps::kernel`): a map created in the kernel
//! and recorded in our store is used through [`Map`] by "our" side while a real kernel eBPF
//! program (a socket filter run with `BPF_PROG_TEST_RUN`) uses the same map; each side checks
//! what the other wrote.
//!
//! Needs root (`CAP_BPF` to create maps and load programs, `CAP_SYS_ADMIN` for
//! `BPF_MAP_GET_FD_BY_ID`). Without it each test prints why and passes, except under
//! `CI=true`, where a missing prerequisite fails.

use bpftime_maps::{Map, MapDef, MapError, MapType, Store, kernel};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Raw bpf() and a tiny assembler for the kernel programs
// ---------------------------------------------------------------------------------------------

fn bpf(cmd: i64, attr: &mut [u8; 80], size: usize) -> Result<i64, i32> {
    // SAFETY: `attr` is a live 80-byte buffer, `size` ≤ 80; every pointer the callers put in it
    // points at a live buffer of the size the command uses.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn put32(a: &mut [u8; 80], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8; 80], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// eBPF instructions of a kernel program, with helpers for the few shapes used here.
#[derive(Default)]
struct Asm(Vec<[u8; 8]>);

impl Asm {
    fn i(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.0.push(insn(code, dst, src, off, imm));
        self
    }
    /// `*(u32 *)(r10 - 4) = k; r2 = r10 - 4` (the key pointer).
    fn key(&mut self, k: u32) -> &mut Self {
        self.i(0x62, 10, 0, -4, k as i32) // stw [r10-4], k
            .i(0xbf, 2, 10, 0, 0) // r2 = r10
            .i(0x07, 2, 0, 0, -4) // r2 += -4
    }
    /// `r1 = map fd` (lddw with BPF_PSEUDO_MAP_FD).
    fn map(&mut self, fd: i32) -> &mut Self {
        self.i(0x18, 1, 1, 0, fd).i(0, 0, 0, 0, 0)
    }
    fn call(&mut self, helper: i32) -> &mut Self {
        self.i(0x85, 0, 0, 0, helper)
    }
    /// `if r0 == 0 goto +off`.
    fn if_null(&mut self, off: i16) -> &mut Self {
        self.i(0x15, 0, 0, off, 0)
    }
    fn exit0(&mut self) -> &mut Self {
        self.i(0xb7, 0, 0, 0, 0).i(0x95, 0, 0, 0, 0)
    }
}

/// Loads a socket filter (`BPF_PROG_TYPE_SOCKET_FILTER`, which `BPF_PROG_TEST_RUN` runs).
fn load(prog: &Asm) -> OwnedFd {
    let bytes: Vec<u8> = prog.0.iter().flatten().copied().collect();
    let lic = b"GPL\0";
    let mut log = vec![0u8; 1 << 16];
    let mut a = [0u8; 80];
    put32(&mut a, 0, 1);
    put32(&mut a, 4, prog.0.len() as u32);
    put64(&mut a, 8, bytes.as_ptr() as u64);
    put64(&mut a, 16, lic.as_ptr() as u64);
    put32(&mut a, 24, 1);
    put32(&mut a, 28, log.len() as u32);
    put64(&mut a, 32, log.as_mut_ptr() as u64);
    match bpf(5, &mut a, 72) {
        // SAFETY: a new fd the kernel just gave us.
        Ok(fd) => unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) },
        Err(e) => {
            let n = log.iter().position(|&b| b == 0).unwrap_or(0);
            panic!(
                "kernel rejected the test program (errno {e}):\n{}",
                String::from_utf8_lossy(&log[..n])
            )
        }
    }
}

/// `BPF_PROG_TEST_RUN` `repeat` times on a 64-byte packet; the program's r0.
fn run(prog: &OwnedFd, repeat: u32) -> u32 {
    let pkt = [0u8; 64];
    let mut a = [0u8; 80];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 8, pkt.len() as u32);
    put64(&mut a, 16, pkt.as_ptr() as u64);
    put32(&mut a, 32, repeat);
    bpf(10, &mut a, 80).expect("BPF_PROG_TEST_RUN");
    u32::from_ne_bytes(a[4..8].try_into().unwrap())
}

/// `BPF_MAP_LOOKUP_ELEM` on the kernel fd: the kernel's view of a value.
fn klookup(fd: &OwnedFd, key: &[u8], value: &mut [u8]) -> Result<(), i32> {
    let mut a = [0u8; 80];
    put32(&mut a, 0, fd.as_raw_fd() as u32);
    put64(&mut a, 8, key.as_ptr() as u64);
    put64(&mut a, 16, value.as_mut_ptr() as u64);
    bpf(1, &mut a, 32).map(drop)
}

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

fn kernel_ok(test: &str) -> bool {
    let why = match (kernel::probe_create(), kernel::probe_open_by_id()) {
        (Ok(()), Ok(())) => return true,
        (Err(e), _) | (_, Err(e)) => format!(
            "kernel maps cannot be created or opened by id here ({}); run as root",
            std::io::Error::from_raw_os_error(e)
        ),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}");
    }
    eprintln!("{test}: skipped: {why}");
    false
}

struct TempStore {
    store: Arc<Store>,
    path: PathBuf,
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn temp_store(tag: &str) -> TempStore {
    let path = std::env::temp_dir().join(format!("bpftime-kshared-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    TempStore {
        store: Arc::new(Store::open(&path).unwrap()),
        path,
    }
}

fn def(ty: MapType, value_size: u32, max_entries: u32) -> MapDef {
    MapDef {
        map_type: ty as u32,
        key_size: if matches!(ty, MapType::Queue | MapType::Stack) {
            0
        } else {
            4
        },
        value_size,
        max_entries,
        flags: 0,
    }
}

/// A kernel-backed map: the creator's kernel fd, and our connected handle (opened by id, as
/// an agent does).
fn shared(t: &TempStore, d: MapDef) -> (OwnedFd, Map) {
    let (rec, fd) = Map::create_in_kernel(&t.store, d, 0, "shared", 0).expect("create in kernel");
    assert!(rec.kernel_id().is_some());
    let ours = Map::open(&t.store, rec.id()).expect("open by id");
    (fd, ours)
}

fn read_u64(p: *mut u8) -> u64 {
    // SAFETY: `p` is a value pointer returned by a lookup (at least 8 bytes, valid while the
    // map handle lives); the kernel may write it concurrently, hence a volatile read.
    unsafe { std::ptr::read_volatile(p.cast::<u64>()) }
}

fn u64v(v: u64) -> [u8; 8] {
    v.to_ne_bytes()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn array_values_are_the_kernels_memory_both_ways() {
    if !kernel_ok("array_values_are_the_kernels_memory_both_ways") {
        return;
    }
    let t = temp_store("array");
    let (kfd, ours) = shared(&t, def(MapType::Array, 8, 4));
    // Kernel program: array[0] += 5 (atomically); return array[1].
    let mut p = Asm::default();
    p.key(0)
        .map(kfd.as_raw_fd())
        .call(1)
        .if_null(2)
        .i(0xb7, 1, 0, 0, 5)
        .i(0xdb, 0, 1, 0, 0) // lock *(u64 *)(r0 + 0) += r1
        .key(1)
        .map(kfd.as_raw_fd())
        .call(1)
        .if_null(2)
        .i(0x79, 0, 0, 0, 0) // r0 = *(u64 *)(r0 + 0)
        .i(0x95, 0, 0, 0, 0)
        .exit0();
    let prog = load(&p);
    assert_eq!(run(&prog, 10), 0);

    // Ours reads what the kernel program wrote, through a pointer into the kernel's pages.
    let v0 = ours.lookup_ptr(&0u32.to_ne_bytes()).unwrap();
    assert_eq!(read_u64(v0), 50);
    // A write through that pointer (what a program's atomic add does) is the kernel's value.
    // SAFETY: `v0` points at array[0] in our writable mapping of the kernel's values.
    unsafe {
        (*v0.cast::<std::sync::atomic::AtomicU64>())
            .fetch_add(100, std::sync::atomic::Ordering::SeqCst)
    };
    ours.update(&1u32.to_ne_bytes(), &u64v(77), 0).unwrap();
    // The kernel sees both: the program returns array[1], the syscall reads array[0].
    assert_eq!(run(&prog, 1), 77);
    let mut v = [0u8; 8];
    klookup(&kfd, &0u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 155);
    // Our syscall-side view agrees, and the kernel's errnos come through.
    ours.lookup(&0u32.to_ne_bytes(), &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 155);
    assert!(matches!(
        ours.update(&4u32.to_ne_bytes(), &u64v(1), 0),
        Err(MapError::TooBig)
    ));
    assert!(matches!(
        ours.update(&0u32.to_ne_bytes(), &u64v(1), 1),
        Err(MapError::Exists)
    ));
    assert_eq!(
        ours.delete(&0u32.to_ne_bytes()).unwrap_err().errno(),
        libc::EINVAL
    );
    // The data area a program's direct value access uses is the mapping.
    assert_eq!(ours.data_len(), 4096);
}

#[test]
fn hash_elements_written_by_either_side_are_seen_by_the_other() {
    if !kernel_ok("hash_elements_written_by_either_side_are_seen_by_the_other") {
        return;
    }
    let t = temp_store("hash");
    let (kfd, ours) = shared(&t, def(MapType::Hash, 8, 16));
    // Kernel program: hash[1] = 11 (update helper); return hash[2] or 0xdead if absent.
    let mut p = Asm::default();
    p.i(0x7a, 10, 0, -16, 11) // *(u64 *)(r10 - 16) = 11
        .key(1)
        .i(0xbf, 3, 10, 0, 0)
        .i(0x07, 3, 0, 0, -16)
        .i(0xb7, 4, 0, 0, 0)
        .map(kfd.as_raw_fd())
        .call(2)
        .key(2)
        .map(kfd.as_raw_fd())
        .call(1)
        .if_null(2)
        .i(0x79, 0, 0, 0, 0)
        .i(0x95, 0, 0, 0, 0)
        .i(0xb7, 0, 0, 0, 0xdead)
        .i(0x95, 0, 0, 0, 0);
    let prog = load(&p);
    assert_eq!(run(&prog, 1), 0xdead);
    assert_eq!(read_u64(ours.lookup_ptr(&1u32.to_ne_bytes()).unwrap()), 11);
    ours.update(&2u32.to_ne_bytes(), &u64v(22), 0).unwrap();
    assert_eq!(run(&prog, 1), 22);
    assert!(matches!(
        ours.update(&2u32.to_ne_bytes(), &u64v(23), 1),
        Err(MapError::Exists)
    ));
    // Iteration sees both keys.
    let mut keys = Vec::new();
    let mut k = [0u8; 4];
    let mut prev: Option<[u8; 4]> = None;
    while ours.next_key(prev.as_ref().map(|p| &p[..]), &mut k).is_ok() {
        keys.push(u32::from_ne_bytes(k));
        prev = Some(k);
    }
    keys.sort();
    assert_eq!(keys, vec![1, 2]);
    // A lookup through bpf() is a per-thread copy: writing it does not change the kernel's
    // value (documented), an update does.
    let copy = ours.lookup_ptr(&2u32.to_ne_bytes()).unwrap();
    // SAFETY: `copy` is this thread's 8-byte copy slot, valid until the thread exits.
    unsafe { copy.cast::<u64>().write(999) };
    assert_eq!(run(&prog, 1), 22);
    ours.delete(&1u32.to_ne_bytes()).unwrap();
    let mut v = [0u8; 8];
    assert_eq!(
        klookup(&kfd, &1u32.to_ne_bytes(), &mut v),
        Err(libc::ENOENT)
    );
    assert!(matches!(
        ours.delete(&1u32.to_ne_bytes()),
        Err(MapError::NotFound)
    ));
    // Batches go to the kernel too.
    let b = ours.lookup_batch(None, 8, 0, 0, false).unwrap();
    assert_eq!(b.count, 1);
    assert_eq!(b.keys, 2u32.to_ne_bytes());
    assert_eq!(b.values, u64v(22));
}

#[test]
fn percpu_array_updates_meet_in_the_kernels_per_cpu_values() {
    if !kernel_ok("percpu_array_updates_meet_in_the_kernels_per_cpu_values") {
        return;
    }
    let t = temp_store("percpu");
    let (kfd, ours) = shared(&t, def(MapType::PercpuArray, 8, 2));
    let ncpu = bpftime_maps::percpu::nr_possible_cpus() as usize;
    assert_eq!(ours.syscall_value_size(), 8 * ncpu);
    // Kernel program: this CPU's value of [0] += 1.
    let mut p = Asm::default();
    p.key(0)
        .map(kfd.as_raw_fd())
        .call(1)
        .if_null(2)
        .i(0xb7, 1, 0, 0, 1)
        .i(0xdb, 0, 1, 0, 0)
        .exit0();
    let prog = load(&p);
    run(&prog, 7);
    // Syscall side: every CPU's value; they sum to the runs.
    let mut all = vec![0u8; ours.syscall_value_size()];
    ours.lookup(&0u32.to_ne_bytes(), &mut all).unwrap();
    let sum: u64 = all
        .chunks(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .sum();
    assert_eq!(sum, 7);
    // Program side: our update sets the current CPU's value of [1]; the kernel sees it in
    // exactly one CPU's slot.
    ours.update(&1u32.to_ne_bytes(), &u64v(40), 0).unwrap();
    let mut kall = vec![0u8; ours.syscall_value_size()];
    klookup(&kfd, &1u32.to_ne_bytes(), &mut kall).unwrap();
    let vals: Vec<u64> = kall
        .chunks(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals.iter().sum::<u64>(), 40);
    assert_eq!(vals.iter().filter(|&&v| v == 40).count(), 1);
    // And a program-side lookup reads one CPU's value (the one we wrote, or 0 if we moved).
    let v = read_u64(ours.lookup_ptr(&1u32.to_ne_bytes()).unwrap());
    assert!(v == 40 || v == 0, "{v}");
    for cpu in 0..ncpu as u32 {
        let p = ours.lookup_percpu_ptr(&1u32.to_ne_bytes(), cpu).unwrap();
        assert_eq!(read_u64(p), vals[cpu as usize]);
    }
    assert!(matches!(
        ours.update(&2u32.to_ne_bytes(), &u64v(1), 0),
        Err(MapError::TooBig)
    ));
}

#[test]
fn queue_pushed_by_us_is_popped_by_the_kernel_program() {
    if !kernel_ok("queue_pushed_by_us_is_popped_by_the_kernel_program") {
        return;
    }
    let t = temp_store("queue");
    let (kfd, ours) = shared(&t, def(MapType::Queue, 8, 4));
    // Kernel program: pop into the stack and return the value (or 0xdead when empty).
    let mut p = Asm::default();
    p.map(kfd.as_raw_fd())
        .i(0xbf, 2, 10, 0, 0)
        .i(0x07, 2, 0, 0, -8)
        .call(88)
        .i(0x55, 0, 0, 2, 0) // if r0 != 0 goto empty
        .i(0x79, 0, 10, -8, 0)
        .i(0x95, 0, 0, 0, 0)
        .i(0xb7, 0, 0, 0, 0xdead)
        .i(0x95, 0, 0, 0, 0);
    let prog = load(&p);
    for v in [3u64, 4, 5] {
        ours.push(&u64v(v), 0).unwrap();
    }
    let mut out = [0u8; 8];
    ours.peek(&mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 3);
    assert_eq!(run(&prog, 1), 3);
    assert_eq!(run(&prog, 1), 4);
    ours.pop(&mut out).unwrap();
    assert_eq!(u64::from_ne_bytes(out), 5);
    assert_eq!(run(&prog, 1), 0xdead);
    assert!(matches!(ours.pop(&mut out), Err(MapError::NotFound)));
}

#[test]
fn metadata_handles_and_types_that_stay_in_the_store() {
    if !kernel_ok("metadata_handles_and_types_that_stay_in_the_store") {
        return;
    }
    let t = temp_store("meta");
    let (_kfd, ours) = shared(&t, def(MapType::Hash, 8, 4));
    let meta = Map::open_meta(&t.store, ours.id()).unwrap();
    assert_eq!(meta.def(), ours.def());
    assert_eq!(meta.kernel_id(), ours.kernel_id());
    // Not connected: element operations say so instead of touching the store.
    assert_eq!(
        meta.update(&1u32.to_ne_bytes(), &u64v(1), 0)
            .unwrap_err()
            .errno(),
        libc::EBADF
    );
    // Ring buffers are written by our runtime's own code: they are not kernel-backed.
    let rb = MapDef {
        map_type: MapType::RingBuf as u32,
        key_size: 0,
        value_size: 0,
        max_entries: 4096,
        flags: 0,
    };
    assert!(matches!(
        Map::create_in_kernel(&t.store, rb, 0, "rb", 0),
        Err(MapError::NotSupported)
    ));
    // A kernel map that went away (its last fd closed) cannot be opened.
    let (rec, fd) =
        Map::create_in_kernel(&t.store, def(MapType::Array, 4, 1), 0, "gone", 0).unwrap();
    drop(fd);
    let mut gone = false;
    for _ in 0..100 {
        // The kernel frees maps after an RCU grace period.
        if Map::open(&t.store, rec.id()).is_err() {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone, "a closed kernel map could still be opened");
}
