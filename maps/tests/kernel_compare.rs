//! Every map type against a real kernel map: the same operations through raw `bpf()` system
//! calls on a kernel map and through [`Map`] on ours, comparing results and errnos, edge
//! cases included (full maps, `BPF_NOEXIST`/`BPF_EXIST`, out-of-range indexes, empty queues,
//! bad flags, batch cursors).
//!
//! Needs root (kernel maps need `CAP_BPF`/`CAP_SYS_ADMIN`). Without it each test prints why
//! and passes, except under `CI=true`, where a missing prerequisite fails.
//!
//! Where our semantics differ from the kernel's by design (which element an LRU map evicts,
//! bloom filter false positives, hash iteration order, which keys share a bucket), the
//! comparison is of what the kernel guarantees (sets, counts) rather than of exact results.
//! Known errno differences are listed, with their reasons, in [`KNOWN_DIFFERENCES`].

use bpftime_maps::batch::BatchOp;
use bpftime_maps::map::MapExtra;
use bpftime_maps::{Map, MapDef, Store};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

/// Where we knowingly differ from Linux 6.18, with why; the tests compare around these (no
/// errno differs in what they run).
pub const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    (
        "LRU victims",
        "CLOCK sweep over all elements instead of the kernel's per-CPU lists: which keys an \
         over-full LRU map keeps differs (both keep at most max_entries and the newest key)",
    ),
    (
        "LPM key bits past the prefix",
        "cleared on update; the kernel keeps the last writer's bytes and returns them from \
         GET_NEXT_KEY (lookups and updates agree either way): only normalized keys are sent",
    ),
    (
        "iteration and batch boundaries of hash tables",
        "our hash function and bucket layout differ: key sets and values are compared, not order \
         or which batch holds which key",
    ),
    (
        "bloom filter false positives",
        "different hash functions: present values are found by both, absent ones compared by rate",
    ),
    (
        "stack trace maps filled by programs",
        "the kernel fills them only from its own programs' stacks; the syscall side is compared",
    ),
];

type R<T> = Result<T, i32>;

// ---------------------------------------------------------------------------------------------
// Raw bpf() on the kernel
// ---------------------------------------------------------------------------------------------

mod sys {
    pub const MAP_CREATE: i64 = 0;
    pub const MAP_LOOKUP_ELEM: i64 = 1;
    pub const MAP_UPDATE_ELEM: i64 = 2;
    pub const MAP_DELETE_ELEM: i64 = 3;
    pub const MAP_GET_NEXT_KEY: i64 = 4;
    pub const PROG_LOAD: i64 = 5;
    pub const MAP_LOOKUP_AND_DELETE_ELEM: i64 = 21;
    pub const MAP_LOOKUP_BATCH: i64 = 24;
    pub const MAP_LOOKUP_AND_DELETE_BATCH: i64 = 25;
    pub const MAP_UPDATE_BATCH: i64 = 26;
    pub const MAP_DELETE_BATCH: i64 = 27;

    /// A zeroed `union bpf_attr` with fields set by offset.
    #[derive(Clone)]
    pub struct Attr(pub [u8; 128]);

    impl Attr {
        pub fn new() -> Attr {
            Attr([0; 128])
        }
        pub fn u32(mut self, off: usize, v: u32) -> Attr {
            self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        pub fn u64(mut self, off: usize, v: u64) -> Attr {
            self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        pub fn get_u32(&self, off: usize) -> u32 {
            u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
        }
    }

    /// `bpf(cmd, attr, size)`: the result or the errno.
    pub fn bpf(cmd: i64, attr: &mut Attr, size: usize) -> Result<i64, i32> {
        // SAFETY: `attr` is a live 128-byte buffer and `size` ≤ 128; the kernel reads (and for
        // some commands writes) only within it, and follows the pointers in it, which the
        // callers point at their own live buffers.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), size) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r)
        }
    }

    pub fn close(fd: i32) {
        // SAFETY: closing an fd this test created.
        unsafe { libc::close(fd) };
    }
}

use sys::Attr;

fn ptr(b: &[u8]) -> u64 {
    if b.is_empty() { 0 } else { b.as_ptr() as u64 }
}

/// A kernel map (closed on drop).
struct KMap {
    fd: i32,
    def: MapDef,
}

impl Drop for KMap {
    fn drop(&mut self) {
        sys::close(self.fd);
    }
}

fn kcreate(def: MapDef, extra: u64, inner_fd: i32) -> R<KMap> {
    let mut a = Attr::new()
        .u32(0, def.map_type)
        .u32(4, def.key_size)
        .u32(8, def.value_size)
        .u32(12, def.max_entries)
        .u32(16, def.flags)
        .u32(20, inner_fd.max(0) as u32)
        .u64(64, extra);
    sys::bpf(sys::MAP_CREATE, &mut a, 72).map(|fd| KMap { fd: fd as i32, def })
}

/// A trivial socket filter program (for program arrays).
fn kprog() -> i32 {
    // mov r0, 0; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let lic = b"GPL\0";
    let mut a = Attr::new()
        .u32(0, 1)
        .u32(4, 2)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, lic.as_ptr() as u64);
    sys::bpf(sys::PROG_LOAD, &mut a, 72).expect("load a socket filter") as i32
}

/// The map operations, with syscall semantics, on either side.
trait Side {
    fn def(&self) -> MapDef;
    fn value_len(&self) -> usize;
    fn update(&self, key: &[u8], val: &[u8], flags: u64) -> R<()>;
    /// `BPF_MAP_LOOKUP_ELEM` with `buf` as the value buffer (in/out: bloom filters read it).
    fn lookup_into(&self, key: &[u8], buf: &mut [u8]) -> R<()>;
    fn delete(&self, key: &[u8]) -> R<()>;
    fn next_key(&self, key: Option<&[u8]>) -> R<Vec<u8>>;
    fn lookup_and_delete(&self, key: &[u8], flags: u64) -> R<Vec<u8>>;
    /// Lookup batch: (result, count, keys, values, out_batch).
    fn lookup_batch(
        &self,
        cursor: Option<&[u8]>,
        count: u32,
        delete: bool,
        ef: u64,
        f: u64,
    ) -> Batch;
    /// Update/delete batch: (result, count).
    fn apply_batch(
        &self,
        op: BatchOp,
        keys: &[u8],
        vals: &[u8],
        count: u32,
        ef: u64,
    ) -> (R<()>, u32);

    fn lookup(&self, key: &[u8]) -> R<Vec<u8>> {
        let mut v = vec![0u8; self.value_len()];
        self.lookup_into(key, &mut v).map(|()| v)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Batch {
    r: R<()>,
    count: u32,
    keys: Vec<u8>,
    values: Vec<u8>,
    out_batch: Option<Vec<u8>>,
}

fn cursor_len(def: &MapDef) -> usize {
    match def.map_type {
        1 | 5 | 9 | 10 | 13 => 4,
        _ => def.key_size as usize,
    }
}

impl Side for KMap {
    fn def(&self) -> MapDef {
        self.def
    }
    fn value_len(&self) -> usize {
        match self.def.map_type {
            5 | 6 | 10 => self.def.value_size.div_ceil(8) as usize * 8 * ncpus(),
            _ => self.def.value_size as usize,
        }
    }
    fn update(&self, key: &[u8], val: &[u8], flags: u64) -> R<()> {
        let mut a = Attr::new()
            .u32(0, self.fd as u32)
            .u64(8, ptr(key))
            .u64(16, ptr(val))
            .u64(24, flags);
        sys::bpf(sys::MAP_UPDATE_ELEM, &mut a, 32).map(drop)
    }
    fn lookup_into(&self, key: &[u8], buf: &mut [u8]) -> R<()> {
        let mut a = Attr::new()
            .u32(0, self.fd as u32)
            .u64(8, ptr(key))
            .u64(16, buf.as_mut_ptr() as u64);
        sys::bpf(sys::MAP_LOOKUP_ELEM, &mut a, 32).map(drop)
    }
    fn delete(&self, key: &[u8]) -> R<()> {
        let mut a = Attr::new().u32(0, self.fd as u32).u64(8, ptr(key));
        sys::bpf(sys::MAP_DELETE_ELEM, &mut a, 32).map(drop)
    }
    fn next_key(&self, key: Option<&[u8]>) -> R<Vec<u8>> {
        let mut out = vec![0u8; self.def.key_size as usize];
        let mut a = Attr::new()
            .u32(0, self.fd as u32)
            .u64(8, key.map_or(0, |k| k.as_ptr() as u64))
            .u64(16, out.as_mut_ptr() as u64);
        sys::bpf(sys::MAP_GET_NEXT_KEY, &mut a, 24).map(|_| out)
    }
    fn lookup_and_delete(&self, key: &[u8], flags: u64) -> R<Vec<u8>> {
        let mut v = vec![0u8; self.value_len()];
        let mut a = Attr::new()
            .u32(0, self.fd as u32)
            .u64(8, ptr(key))
            .u64(16, v.as_mut_ptr() as u64)
            .u64(24, flags);
        sys::bpf(sys::MAP_LOOKUP_AND_DELETE_ELEM, &mut a, 32).map(|_| v)
    }
    fn lookup_batch(
        &self,
        cursor: Option<&[u8]>,
        count: u32,
        delete: bool,
        ef: u64,
        f: u64,
    ) -> Batch {
        let cl = cursor_len(&self.def);
        let sentinel = vec![0xa5u8; cl];
        let mut out_batch = sentinel.clone();
        let mut keys = vec![0u8; self.def.key_size as usize * count as usize];
        let mut values = vec![0u8; self.value_len() * count as usize];
        let mut a = Attr::new()
            .u64(0, cursor.map_or(0, |c| c.as_ptr() as u64))
            .u64(8, out_batch.as_mut_ptr() as u64)
            .u64(16, keys.as_mut_ptr() as u64)
            .u64(24, values.as_mut_ptr() as u64)
            .u32(32, count)
            .u32(36, self.fd as u32)
            .u64(40, ef)
            .u64(48, f);
        let cmd = if delete {
            sys::MAP_LOOKUP_AND_DELETE_BATCH
        } else {
            sys::MAP_LOOKUP_BATCH
        };
        let r = sys::bpf(cmd, &mut a, 56).map(drop);
        let count = a.get_u32(32);
        keys.truncate(self.def.key_size as usize * count as usize);
        values.truncate(self.value_len() * count as usize);
        Batch {
            r,
            count,
            keys,
            values,
            out_batch: (out_batch != sentinel).then_some(out_batch),
        }
    }
    fn apply_batch(
        &self,
        op: BatchOp,
        keys: &[u8],
        vals: &[u8],
        count: u32,
        ef: u64,
    ) -> (R<()>, u32) {
        let mut a = Attr::new()
            .u64(16, ptr(keys))
            .u64(24, ptr(vals))
            .u32(32, count)
            .u32(36, self.fd as u32)
            .u64(40, ef);
        let cmd = if op == BatchOp::Update {
            sys::MAP_UPDATE_BATCH
        } else {
            sys::MAP_DELETE_BATCH
        };
        let r = sys::bpf(cmd, &mut a, 56).map(drop);
        (r, a.get_u32(32))
    }
}

impl Side for Map {
    fn def(&self) -> MapDef {
        *Map::def(self)
    }
    fn value_len(&self) -> usize {
        self.syscall_value_size()
    }
    fn update(&self, key: &[u8], val: &[u8], flags: u64) -> R<()> {
        self.update_syscall(key, val, flags).map_err(|e| e.errno())
    }
    fn lookup_into(&self, key: &[u8], buf: &mut [u8]) -> R<()> {
        Map::lookup(self, key, buf).map_err(|e| e.errno())
    }
    fn delete(&self, key: &[u8]) -> R<()> {
        Map::delete(self, key).map_err(|e| e.errno())
    }
    fn next_key(&self, key: Option<&[u8]>) -> R<Vec<u8>> {
        let mut out = vec![0u8; Map::def(self).key_size as usize];
        Map::next_key(self, key, &mut out)
            .map(|()| out)
            .map_err(|e| e.errno())
    }
    fn lookup_and_delete(&self, key: &[u8], flags: u64) -> R<Vec<u8>> {
        // The syscall layer's checks (flags), then the map's.
        let ty = Map::def(self).map_type;
        if flags & !4 != 0 || flags != 0 && matches!(ty, 22 | 23) || flags & 4 != 0 {
            return Err(libc::EINVAL);
        }
        let mut v = vec![0u8; self.value_len()];
        Map::lookup_and_delete(self, key, &mut v)
            .map(|()| v)
            .map_err(|e| e.errno())
    }
    fn lookup_batch(
        &self,
        cursor: Option<&[u8]>,
        count: u32,
        delete: bool,
        ef: u64,
        f: u64,
    ) -> Batch {
        let op = if delete {
            BatchOp::LookupAndDelete
        } else {
            BatchOp::Lookup
        };
        // As bpf_map_do_batch: checks first (count untouched), then count = 0, then the walk.
        if let Err(e) = self.batch_precheck(op, ef, f) {
            return Batch {
                r: Err(e.errno()),
                count,
                keys: Vec::new(),
                values: Vec::new(),
                out_batch: None,
            };
        }
        match Map::lookup_batch(self, cursor, count, ef, f, delete) {
            Ok(b) => Batch {
                r: b.err.map_or(Ok(()), |e| Err(e.errno())),
                count: b.count,
                keys: b.keys,
                values: b.values,
                out_batch: b.out_batch,
            },
            Err(e) => Batch {
                r: Err(e.errno()),
                count: 0,
                keys: Vec::new(),
                values: Vec::new(),
                out_batch: None,
            },
        }
    }
    fn apply_batch(
        &self,
        op: BatchOp,
        keys: &[u8],
        vals: &[u8],
        count: u32,
        ef: u64,
    ) -> (R<()>, u32) {
        let ks = Map::def(self).key_size as usize;
        let vs = self.value_len();
        let r = Map::apply_batch(self, op, count, ef, |i| {
            let i = i as usize;
            let k = &keys[i * ks..(i + 1) * ks];
            if op == BatchOp::Delete {
                Map::delete(self, k)
            } else {
                self.update_syscall(k, &vals[i * vs..(i + 1) * vs], ef)
            }
        });
        match r {
            Ok((n, None)) => (Ok(()), n),
            Ok((n, Some(e))) => (Err(e.errno()), n),
            // Refused before the walk: count untouched.
            Err(e) => (Err(e.errno()), count),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

fn ncpus() -> usize {
    bpftime_maps::percpu::nr_possible_cpus() as usize
}

/// Whether kernel maps can be created here; explains (or fails under CI) when not.
fn kernel_ok(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let probe = root
        && kcreate(
            MapDef {
                map_type: 2,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
                flags: 0,
            },
            0,
            -1,
        )
        .is_ok();
    if probe {
        return true;
    }
    let why = if root {
        "BPF_MAP_CREATE of a kernel array failed (no bpf() in this kernel or sandbox?)"
    } else {
        "not root: kernel maps need CAP_BPF/CAP_SYS_ADMIN"
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot compare with the kernel: {why}");
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
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "bpftime-kcmp-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    TempStore {
        store: Arc::new(Store::open(&path).unwrap()),
        path,
    }
}

fn def(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> MapDef {
    MapDef {
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
    }
}

/// A kernel map and ours with the same definition.
struct Pair {
    k: KMap,
    o: Map,
    what: String,
}

fn pair(t: &TempStore, d: MapDef, extra: u64) -> Pair {
    let k = kcreate(d, extra, -1).unwrap_or_else(|e| panic!("kernel create {d:?}: {e}"));
    let o = Map::create_with(
        &t.store,
        d,
        MapExtra {
            map_extra: extra,
            ..Default::default()
        },
        "m",
    )
    .unwrap_or_else(|e| panic!("our create {d:?}: {e}"));
    Pair {
        k,
        o,
        what: format!("type {} {d:?}", d.map_type),
    }
}

/// Runs `$e` with `$s` bound to the kernel map, then to ours, asserts equal results and
/// evaluates to the kernel's.
macro_rules! same_r {
    ($p:expr, $op:literal, |$s:ident| $e:expr) => {{
        let kr = {
            let $s: &dyn Side = &$p.k;
            $e
        };
        let or = {
            let $s: &dyn Side = &$p.o;
            $e
        };
        assert_eq!(or, kr, "{}: {} (ours left, kernel right)", $p.what, $op);
        kr
    }};
}

/// [`same_r`] as a statement.
macro_rules! same {
    ($p:expr, $op:literal, |$s:ident| $e:expr) => {{
        let _ = same_r!($p, $op, |$s| $e);
    }};
}

/// A small deterministic generator for operation sequences.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn k32(k: u32) -> Vec<u8> {
    k.to_ne_bytes().to_vec()
}

fn all_keys(s: &dyn Side) -> BTreeSet<Vec<u8>> {
    let mut keys = BTreeSet::new();
    let mut k: Option<Vec<u8>> = None;
    for _ in 0..=s.def().max_entries {
        match s.next_key(k.as_deref()) {
            Ok(n) => {
                assert!(keys.insert(n.clone()), "key visited twice");
                k = Some(n);
            }
            Err(e) => {
                assert_eq!(e, libc::ENOENT);
                break;
            }
        }
    }
    keys
}

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

#[test]
fn map_create_errnos_match_the_kernel() {
    if !kernel_ok("map_create_errnos_match_the_kernel") {
        return;
    }
    let t = temp_store("create");
    use bpftime_maps::map::*;
    let np = BPF_F_NO_PREALLOC;
    // (type, key, value, max, flags, map_extra)
    let cases: &[(u32, u32, u32, u32, u32, u64)] = &[
        // hash family
        (1, 4, 8, 4, 0, 0),
        (1, 0, 8, 4, 0, 0),
        (1, 4, 0, 4, 0, 0),
        (1, 4, 8, 0, 0, 0),
        (1, 512, 8, 4, 0, 0),
        (1, 513, 8, 4, 0, 0),
        (1, 4, 8, 4, np, 0),
        (1, 4, 8, 4, BPF_F_ZERO_SEED, 0),
        (1, 4, 8, 4, BPF_F_MMAPABLE, 0),
        (1, 4, 8, 4, BPF_F_NO_COMMON_LRU, 0),
        (1, 4, 8, 4, BPF_F_RDONLY | BPF_F_WRONLY, 0),
        (1, 4, 8, 4, BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG, 0),
        (1, 4, 8, 4, BPF_F_RDONLY_PROG, 0),
        (1, 4, 8, 4, BPF_F_WRONLY, 0),
        (1, 4, 8, 4, 1 << 20, 0),
        (1, 4, 8, 4, BPF_F_INNER_MAP, 0),
        (1, 4, 8, 4, 0, 1),
        (5, 4, 32768, 4, 0, 0),
        (5, 4, 32769, 4, 0, 0),
        (5, 4, 8, 4, np, 0),
        (9, 4, 8, 4, 0, 0),
        (9, 4, 8, 4, np, 0),
        (9, 4, 8, 4, BPF_F_NO_COMMON_LRU, 0),
        (9, 4, 8, 4, BPF_F_ZERO_SEED, 0),
        (10, 4, 8, 4, BPF_F_NO_COMMON_LRU, 0),
        (10, 4, 40000, 4, 0, 0),
        // arrays
        (2, 4, 8, 4, 0, 0),
        (2, 8, 8, 4, 0, 0),
        (2, 4, 0, 4, 0, 0),
        (2, 4, 8, 0, 0, 0),
        (2, 4, 8, 4, BPF_F_MMAPABLE, 0),
        (2, 4, 8, 4, BPF_F_INNER_MAP, 0),
        (2, 4, 8, 4, BPF_F_PRESERVE_ELEMS, 0),
        (2, 4, 8, 4, np, 0),
        (2, 4, 8, 4, BPF_F_ZERO_SEED, 0),
        (2, 4, 8, 4, BPF_F_RDONLY_PROG, 0),
        (6, 4, 8, 4, 0, 0),
        (6, 4, 8, 4, BPF_F_MMAPABLE, 0),
        (6, 4, 8, 4, BPF_F_INNER_MAP, 0),
        (6, 4, 32768, 4, 0, 0),
        (6, 4, 32769, 4, 0, 0),
        (6, 8, 8, 4, 0, 0),
        // program arrays
        (3, 4, 4, 4, 0, 0),
        (3, 4, 8, 4, 0, 0),
        (3, 8, 4, 4, 0, 0),
        (3, 4, 4, 4, BPF_F_RDONLY_PROG, 0),
        (3, 4, 4, 4, BPF_F_MMAPABLE, 0),
        (3, 4, 4, 4, BPF_F_RDONLY, 0),
        // queue / stack
        (22, 0, 8, 4, 0, 0),
        (22, 4, 8, 4, 0, 0),
        (22, 0, 0, 4, 0, 0),
        (22, 0, 8, 0, 0, 0),
        (22, 0, 8, 4, np, 0),
        (22, 0, 8, 4, BPF_F_RDONLY_PROG, 0),
        (22, 0, 8, 4, BPF_F_ZERO_SEED, 0),
        (23, 0, 8, 4, 0, 0),
        (23, 0, 8, 4, BPF_F_MMAPABLE, 0),
        // bloom filter
        (30, 0, 8, 100, 0, 0),
        (30, 0, 8, 100, 0, 15),
        (30, 0, 8, 100, 0, 16),
        (30, 4, 8, 100, 0, 0),
        (30, 0, 0, 100, 0, 0),
        (30, 0, 8, 0, 0, 0),
        (30, 0, 8, 100, BPF_F_ZERO_SEED, 0),
        (30, 0, 8, 100, np, 0),
        // LPM trie
        (11, 8, 8, 16, np, 0),
        (11, 8, 8, 16, 0, 0),
        (11, 4, 8, 16, np, 0),
        (11, 5, 8, 16, np, 0),
        (11, 260, 8, 16, np, 0),
        (11, 261, 8, 16, np, 0),
        (11, 8, 0, 16, np, 0),
        (11, 8, 8, 0, np, 0),
        (11, 8, 8, 16, np | BPF_F_ZERO_SEED, 0),
        (11, 8, 8, 16, np | BPF_F_RDONLY_PROG, 0),
        // stack trace
        (7, 4, 8, 16, 0, 0),
        (7, 8, 8, 16, 0, 0),
        (7, 4, 12, 16, 0, 0),
        (7, 4, 4, 16, 0, 0),
        (7, 4, 127 * 8, 16, 0, 0),
        (7, 4, 128 * 8, 16, 0, 0),
        (7, 4, 64, 16, BPF_F_STACK_BUILD_ID, 0),
        (7, 4, 40, 16, BPF_F_STACK_BUILD_ID, 0),
        (7, 4, 8, 16, BPF_F_RDONLY_PROG, 0),
        (7, 4, 8, 16, BPF_F_RDONLY, 0),
        (7, 4, 8, 16, np, 0),
        (7, 4, 8, 0, 0, 0),
        // maps of maps without an inner map
        (12, 4, 4, 4, 0, 0),
        (13, 4, 4, 4, 0, 0),
    ];
    let mut diffs = Vec::new();
    for &(ty, k, v, n, f, x) in cases {
        let d = def(ty, k, v, n, f);
        let kr = kcreate(d, x, -1).map(drop);
        let or = Map::create_with(
            &t.store,
            d,
            MapExtra {
                map_extra: x,
                ..Default::default()
            },
            "c",
        )
        .map(drop)
        .map_err(|e| e.errno());
        if kr != or {
            diffs.push(format!("{d:?} extra {x}: kernel {kr:?}, ours {or:?}"));
        }
    }
    assert!(diffs.is_empty(), "create differs:\n{}", diffs.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Element operations
// ---------------------------------------------------------------------------------------------

/// A random sequence of updates, lookups, deletes and lookup-and-deletes on both maps, with
/// values of `vlen` bytes and keys from `keys`; exact comparison of every result.
fn random_elem_ops(p: &Pair, keys: &[Vec<u8>], seed: u64, n: usize) {
    let mut rng = Rng(seed);
    let vlen = p.k.value_len();
    for i in 0..n {
        let key = &keys[rng.below(keys.len() as u64) as usize];
        match rng.below(10) {
            0..=4 => {
                let flags = [0, 0, 1, 2, 4, 8][rng.below(6) as usize];
                let val: Vec<u8> = (0..vlen).map(|_| rng.next() as u8).collect();
                // Per-CPU padding bytes are copied as is by both.
                same!(p, "update", |s| s.update(key, &val, flags));
            }
            5..=6 => {
                same!(p, "lookup", |s| s.lookup(key));
            }
            7..=8 => {
                same!(p, "delete", |s| s.delete(key));
            }
            _ => {
                let flags = [0, 0, 0, 1, 4][rng.below(5) as usize];
                same!(p, "lookup_and_delete", |s| s.lookup_and_delete(key, flags));
            }
        }
        if i % 16 == 0 {
            assert_eq!(all_keys(&p.o), all_keys(&p.k), "{}: key sets", p.what);
        }
    }
    assert_eq!(all_keys(&p.o), all_keys(&p.k), "{}: key sets", p.what);
}

#[test]
fn hash_and_percpu_hash_match_the_kernel() {
    if !kernel_ok("hash_and_percpu_hash_match_the_kernel") {
        return;
    }
    let t = temp_store("hash");
    let keys: Vec<Vec<u8>> = (0..12).map(k32).collect();
    for (ty, vs) in [(1, 8), (1, 3), (5, 4), (5, 12)] {
        let p = pair(&t, def(ty, 4, vs, 6, 0), 0);
        random_elem_ops(&p, &keys, 0x1234_5678 + u64::from(ty * vs), 600);
    }
    // Odd key sizes.
    let p = pair(&t, def(1, 7, 8, 4, 0), 0);
    let keys: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i, 1, 2, 3, 4, 5, 6]).collect();
    random_elem_ops(&p, &keys, 99, 300);
    // Next key of an absent key restarts from the first; ENOENT after the last.
    let p = pair(&t, def(1, 4, 8, 4, 0), 0);
    same!(p, "next_key empty", |s| s.next_key(None));
    same!(p, "next_key absent on empty", |s| s.next_key(Some(&k32(7))));
}

#[test]
fn arrays_match_the_kernel_exactly() {
    if !kernel_ok("arrays_match_the_kernel_exactly") {
        return;
    }
    let t = temp_store("array");
    for (ty, vs) in [(2, 8), (2, 5), (6, 8), (6, 12)] {
        let p = pair(&t, def(ty, 4, vs, 5, 0), 0);
        let keys: Vec<Vec<u8>> = (0..7).map(k32).collect();
        random_elem_ops(&p, &keys, 77 + u64::from(ty * vs), 400);
        // Array iteration order is the index order: compare it exactly.
        for k in [None, Some(k32(0)), Some(k32(3)), Some(k32(4)), Some(k32(9))] {
            same!(p, "next_key", |s| s.next_key(k.as_deref()));
        }
    }
}

#[test]
fn lru_hash_matches_the_kernel_where_the_kernel_is_deterministic() {
    if !kernel_ok("lru_hash_matches_the_kernel_where_the_kernel_is_deterministic") {
        return;
    }
    let t = temp_store("lru");
    for (ty, flags) in [(9, 0), (9, bpftime_maps::map::BPF_F_NO_COMMON_LRU), (10, 0)] {
        let max = 256;
        let p = pair(&t, def(ty, 4, 8, max, flags), 0);
        let vlen = p.k.value_len();
        // Below capacity an LRU map is a hash map.
        let keys: Vec<Vec<u8>> = (0..16).map(k32).collect();
        random_elem_ops(&p, &keys, 5 + u64::from(ty), 300);
        // Far over capacity: every update succeeds (eviction, not E2BIG), and the map never
        // holds more than max_entries. Which keys survive is the implementation's choice.
        for k in 1000..1000 + 4 * max {
            same!(p, "update over capacity", |s| s.update(
                &k32(k),
                &vec![1; vlen],
                0
            ));
        }
        let (kn, on) = (all_keys(&p.k).len(), all_keys(&p.o).len());
        assert!(kn <= max as usize && on <= max as usize, "{kn} {on}");
        // The most recent insertion is always there.
        let last = k32(1000 + 4 * max - 1);
        same!(p, "lookup newest", |s| s.lookup(&last).map(drop));
        // NOEXIST on a present key, EXIST on an absent one.
        same!(p, "noexist", |s| s.update(&last, &vec![2; vlen], 1));
        same!(p, "exist absent", |s| s.update(
            &k32(7_777_777),
            &vec![2; vlen],
            2
        ));
    }
}

#[test]
fn queue_and_stack_match_the_kernel() {
    if !kernel_ok("queue_and_stack_match_the_kernel") {
        return;
    }
    let t = temp_store("queue");
    for ty in [22, 23] {
        let p = pair(&t, def(ty, 0, 4, 3, 0), 0);
        let mut rng = Rng(31 + u64::from(ty));
        same!(p, "peek empty", |s| s.lookup(&[]));
        same!(p, "pop empty", |s| s.lookup_and_delete(&[], 0));
        for _ in 0..300 {
            match rng.below(6) {
                0..=2 => {
                    let flags = [0, 0, 2, 1, 3, 4][rng.below(6) as usize];
                    let v = (rng.next() as u32).to_ne_bytes();
                    same!(p, "push", |s| s.update(&[], &v, flags));
                }
                3 => {
                    same!(p, "peek", |s| s.lookup(&[]));
                }
                4 => {
                    same!(p, "pop", |s| s.lookup_and_delete(&[], 0));
                }
                _ => {
                    let f = [1u64, 4][rng.below(2) as usize];
                    same!(p, "pop with flags", |s| s.lookup_and_delete(&[], f));
                }
            }
        }
        same!(p, "delete", |s| s.delete(&[]));
        same!(p, "next_key", |s| s.next_key(None));
    }
}

#[test]
fn bloom_filter_matches_the_kernel() {
    if !kernel_ok("bloom_filter_matches_the_kernel") {
        return;
    }
    let t = temp_store("bloom");
    for extra in [0, 1, 3] {
        let p = pair(&t, def(30, 0, 8, 64, 0), extra);
        let mut v = 1u64.to_ne_bytes();
        same!(p, "peek empty", |s| s.lookup_into(&[], &mut v.clone()));
        for i in 0..64u64 {
            let v = (i * 7919).to_ne_bytes();
            same!(p, "push", |s| s.update(&[], &v, 0));
        }
        for i in 0..64u64 {
            let v = (i * 7919).to_ne_bytes();
            same!(p, "peek present", |s| s.lookup_into(&[], &mut v.clone()));
        }
        for f in [1, 2, 4] {
            same!(p, "push flags", |s| s.update(&[], &v, f));
        }
        same!(p, "pop", |s| s.lookup_and_delete(&[], 0));
        same!(p, "delete", |s| s.delete(&[]));
        same!(p, "next_key", |s| s.next_key(None));
        // Absent values: both may report false positives, but mostly ENOENT.
        let absent = (0..200u64)
            .filter(|i| {
                v = (1_000_000 + i).to_ne_bytes();
                p.o.lookup_into(&[], &mut v) == Err(libc::ENOENT)
            })
            .count();
        assert!(absent > 100, "{absent} of 200 absent values rejected");
    }
}

/// An LPM key: prefix length and 4 bytes.
fn lpm(plen: u32, d: [u8; 4]) -> Vec<u8> {
    let mut k = plen.to_ne_bytes().to_vec();
    k.extend_from_slice(&d);
    k
}

#[test]
fn lpm_trie_matches_the_kernel() {
    if !kernel_ok("lpm_trie_matches_the_kernel") {
        return;
    }
    let t = temp_store("lpm");
    let np = bpftime_maps::map::BPF_F_NO_PREALLOC;
    let p = pair(&t, def(11, 8, 8, 10, np), 0);
    let mut rng = Rng(4242);
    let mut key = || {
        let plen = [0, 8, 16, 24, 32, 12, 33][rng.below(7) as usize];
        // Normalized data only: the kernel keeps the bits past the prefix, we clear them.
        let raw = [
            10,
            rng.below(3) as u8,
            rng.below(4) as u8,
            rng.below(4) as u8,
        ];
        let m = if plen == 0 {
            0
        } else {
            u32::from_be_bytes(raw) & (u32::MAX << (32 - plen.min(32)))
        };
        (lpm(plen, m.to_be_bytes()), rng.next())
    };
    for _ in 0..500 {
        let (k, r) = key();
        match r % 8 {
            0..=3 => {
                let flags = [0, 0, 1, 2, 3][(r >> 8) as usize % 5];
                same!(p, "update", |s| s.update(&k, &r.to_ne_bytes(), flags));
            }
            4..=5 => {
                // Longest-prefix lookups of full addresses.
                let mut full = k.clone();
                full[..4].copy_from_slice(&32u32.to_ne_bytes());
                full[7] = (r >> 16) as u8;
                same!(p, "lookup", |s| s.lookup(&full));
                same!(p, "lookup exact", |s| s.lookup(&k));
            }
            6 => {
                same!(p, "delete", |s| s.delete(&k));
            }
            _ => {
                same!(p, "lookup_and_delete", |s| s.lookup_and_delete(&k, 0));
            }
        }
    }
    assert_eq!(all_keys(&p.o), all_keys(&p.k), "LPM key sets");
}

#[test]
fn stack_trace_syscall_side_matches_the_kernel() {
    if !kernel_ok("stack_trace_syscall_side_matches_the_kernel") {
        return;
    }
    let t = temp_store("stacks");
    let p = pair(&t, def(7, 4, 32, 8, 0), 0);
    for id in [0, 3, 7, 8, 1000] {
        same!(p, "lookup empty", |s| s.lookup(&k32(id)));
        same!(p, "delete empty", |s| s.delete(&k32(id)));
        same!(p, "update", |s| s.update(&k32(id), &[0; 32], 0));
        same!(p, "lookup_and_delete", |s| s.lookup_and_delete(&k32(id), 0));
        same!(p, "next_key", |s| s.next_key(Some(&k32(id))));
    }
    same!(p, "next_key first", |s| s.next_key(None));
}

#[test]
fn prog_array_and_maps_of_maps_match_the_kernel() {
    if !kernel_ok("prog_array_and_maps_of_maps_match_the_kernel") {
        return;
    }
    let t = temp_store("fdmaps");
    // Program array: kernel with a real program fd, ours with a program object id.
    let kp = kprog();
    let (op, _) = t
        .store
        .create(bpftime_maps::ObjectKind::Prog, "p", 64)
        .unwrap();
    t.store.publish(op);
    let d = def(3, 4, 4, 4, 0);
    let k = kcreate(d, 0, -1).unwrap();
    let o = Map::create(&t.store, d, "pa").unwrap();
    let kset = |key: u32, fd: i32, flags: u64| k.update(&k32(key), &fd.to_ne_bytes(), flags);
    let oset = |key: u32, id: u32, flags: u64| {
        o.update_id(&k32(key), id, flags)
            .map(drop)
            .map_err(|e| e.errno())
    };
    for (key, flags) in [(0, 0), (0, 0), (3, 0), (4, 0), (1, 1), (1, 2), (9, 5)] {
        assert_eq!(
            oset(key, op, flags),
            kset(key, kp, flags),
            "prog array update {key} {flags}"
        );
    }
    let shape = |r: R<Vec<u8>>| r.map(|v| v.len());
    for key in [0, 1, 3, 4] {
        assert_eq!(
            shape(Side::lookup(&o, &k32(key))),
            shape(k.lookup(&k32(key))),
            "prog array lookup {key}"
        );
        assert_eq!(
            o.delete_id(&k32(key)).map(drop).map_err(|e| e.errno()),
            k.delete(&k32(key)),
            "prog array delete {key}"
        );
    }
    for key in [None, Some(k32(2)), Some(k32(3)), Some(k32(8))] {
        assert_eq!(
            Side::next_key(&o, key.as_deref()),
            k.next_key(key.as_deref()),
            "prog array next_key"
        );
    }
    assert_eq!(
        Side::lookup_and_delete(&o, &k32(0), 0),
        k.lookup_and_delete(&k32(0), 0)
    );
    sys::close(kp);

    // Maps of maps.
    for outer_ty in [12, 13] {
        let tmpl_def = def(1, 4, 8, 8, 0);
        let kt = kcreate(tmpl_def, 0, -1).unwrap();
        let ot = Map::create(&t.store, tmpl_def, "t").unwrap();
        let od = def(outer_ty, 4, 4, 4, 0);
        let ko = kcreate(od, 0, kt.fd).unwrap();
        let oo = Map::create_with(
            &t.store,
            od,
            MapExtra {
                inner_map_id: ot.id(),
                ..Default::default()
            },
            "o",
        )
        .unwrap();
        // Nesting.
        assert_eq!(
            kcreate(od, 0, ko.fd).map(drop),
            Map::create_with(
                &t.store,
                od,
                MapExtra {
                    inner_map_id: oo.id(),
                    ..Default::default()
                },
                "n",
            )
            .map(drop)
            .map_err(|e| e.errno()),
            "nested map of maps"
        );
        // Inner maps: compatible (other max_entries), and incompatible ones.
        for inner in [
            def(1, 4, 8, 100, 0),
            def(1, 4, 4, 8, 0),
            def(5, 4, 8, 8, 0),
            def(1, 4, 8, 8, bpftime_maps::map::BPF_F_NO_PREALLOC),
            def(1, 4, 8, 8, bpftime_maps::map::BPF_F_RDONLY),
        ] {
            let ki = kcreate(inner, 0, -1).unwrap();
            let oi = Map::create(&t.store, inner, "i").unwrap();
            for (key, flags) in [(1, 0), (1, 1), (2, 2), (9, 0)] {
                assert_eq!(
                    oo.update_id(&k32(key), oi.id(), flags)
                        .map(drop)
                        .map_err(|e| e.errno()),
                    ko.update(&k32(key), &ki.fd.to_ne_bytes(), flags),
                    "type {outer_ty} inner {inner:?} key {key} flags {flags}"
                );
            }
            for key in [1, 2, 9] {
                assert_eq!(
                    shape(Side::lookup(&oo, &k32(key))),
                    shape(ko.lookup(&k32(key))),
                    "type {outer_ty} lookup {key}"
                );
            }
            assert_eq!(
                oo.delete_id(&k32(1)).map(drop).map_err(|e| e.errno()),
                ko.delete(&k32(1)),
                "type {outer_ty} delete"
            );
        }
        assert_eq!(
            Side::lookup_and_delete(&oo, &k32(1), 0),
            ko.lookup_and_delete(&k32(1), 0),
            "type {outer_ty} lookup_and_delete"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Batch operations
// ---------------------------------------------------------------------------------------------

/// (key, value) pairs.
type Elems = BTreeSet<(Vec<u8>, Vec<u8>)>;

/// Walks a map with lookup batches of `step` until the walk ends; returns every (key, value)
/// seen (each once) and the terminal errno (`ENOENT` at the end, `ENOSPC` if a bucket does not
/// fit in `step`).
fn batch_walk(s: &dyn Side, step: u32, delete: bool) -> (Elems, i32) {
    let ks = s.def().key_size as usize;
    let vs = s.value_len();
    let mut cursor: Option<Vec<u8>> = None;
    let mut seen = BTreeSet::new();
    for _ in 0..1000 {
        let b = s.lookup_batch(cursor.as_deref(), step, delete, 0, 0);
        for i in 0..b.count as usize {
            assert!(seen.insert((
                b.keys[i * ks..(i + 1) * ks].to_vec(),
                b.values[i * vs..(i + 1) * vs].to_vec()
            )));
        }
        match b.r {
            Ok(()) => {}
            Err(libc::ENOSPC) => return (seen, libc::ENOSPC),
            Err(e) => return (seen, e),
        }
        cursor = b.out_batch;
    }
    panic!("batch walk does not end");
}

#[test]
fn batch_operations_match_the_kernel() {
    if !kernel_ok("batch_operations_match_the_kernel") {
        return;
    }
    let t = temp_store("batch");
    let np = bpftime_maps::map::BPF_F_NO_PREALLOC;
    // Which types have which batch commands.
    let types = [
        def(1, 4, 8, 8, 0),
        def(5, 4, 8, 8, 0),
        def(9, 4, 8, 8, 0),
        def(10, 4, 8, 8, 0),
        def(2, 4, 8, 8, 0),
        def(6, 4, 8, 8, 0),
        def(11, 8, 8, 8, np),
        def(22, 0, 8, 8, 0),
        def(23, 0, 8, 8, 0),
        def(30, 0, 8, 8, 0),
        def(7, 4, 8, 8, 0),
        def(3, 4, 4, 8, 0),
    ];
    for d in types {
        let p = pair(&t, d, 0);
        let ks = d.key_size as usize;
        let vs = p.k.value_len();
        for delete in [false, true] {
            let kb = p.k.lookup_batch(None, 4, delete, 0, 0);
            let ob = Side::lookup_batch(&p.o, None, 4, delete, 0, 0);
            assert_eq!(
                ob.r, kb.r,
                "{}: lookup batch (delete {delete}) on empty",
                p.what
            );
            assert_eq!(ob.count, kb.count, "{}: count on empty", p.what);
        }
        for op in [BatchOp::Update, BatchOp::Delete] {
            let keys = vec![0u8; ks * 2];
            let vals = vec![0u8; vs * 2];
            let kr = p.k.apply_batch(op, &keys, &vals, 2, 0);
            let or = Side::apply_batch(&p.o, op, &keys, &vals, 2, 0);
            assert_eq!(or, kr, "{}: {op:?} batch", p.what);
        }
        // Bad elem_flags / flags.
        for (ef, f) in [(1, 0), (4, 0), (0, 1)] {
            let kb = p.k.lookup_batch(None, 4, false, ef, f);
            let ob = Side::lookup_batch(&p.o, None, 4, false, ef, f);
            assert_eq!(ob.r, kb.r, "{}: lookup batch ef {ef} f {f}", p.what);
            let keys = vec![0u8; ks];
            let vals = vec![0u8; vs];
            let kr = p.k.apply_batch(BatchOp::Update, &keys, &vals, 1, ef);
            let or = Side::apply_batch(&p.o, BatchOp::Update, &keys, &vals, 1, ef);
            assert_eq!(or.0, kr.0, "{}: update batch ef {ef}", p.what);
        }
    }
    // Contents: hash tables (sets; bucket boundaries differ) and arrays (exact).
    for d in [
        def(1, 4, 8, 64, 0),
        def(5, 4, 8, 64, 0),
        def(9, 4, 8, 64, 0),
    ] {
        let p = pair(&t, d, 0);
        let vs = p.k.value_len();
        let keys: Vec<u8> = (0..40u32).flat_map(|k| (k * 3).to_ne_bytes()).collect();
        let vals: Vec<u8> = (0..40 * vs).map(|i| (i * 7) as u8).collect();
        same!(p, "update batch", |s| s.apply_batch(
            BatchOp::Update,
            &keys,
            &vals,
            40,
            0
        ));
        for step in [64, 7] {
            let (ks_, ke) = batch_walk(&p.k, step, false);
            let (os, oe) = batch_walk(&p.o, step, false);
            assert_eq!(
                (oe, os.len()),
                (ke, ks_.len()),
                "{}: walk step {step}",
                p.what
            );
            assert_eq!(os, ks_, "{}: batch contents", p.what);
        }
        // A cursor past the end.
        let past = 1000u32.to_ne_bytes();
        same!(p, "cursor past end", |s| s
            .lookup_batch(Some(&past), 4, false, 0, 0)
            .r);
        // Delete batch stopping at a missing key.
        let dk: Vec<u8> = [0u32, 3, 1, 6]
            .iter()
            .flat_map(|k| k.to_ne_bytes())
            .collect();
        same!(p, "delete batch", |s| s.apply_batch(
            BatchOp::Delete,
            &dk,
            &[],
            4,
            0
        ));
        let (ks_, ke) = batch_walk(&p.k, 64, true);
        let (os, oe) = batch_walk(&p.o, 64, true);
        assert_eq!((os, oe), (ks_, ke), "{}: lookup-and-delete walk", p.what);
        same!(p, "empty after", |s| s.next_key(None));
    }
    for d in [def(2, 4, 8, 6, 0), def(6, 4, 4, 6, 0)] {
        let p = pair(&t, d, 0);
        let vs = p.k.value_len();
        let keys: Vec<u8> = [0u32, 2, 5, 7]
            .iter()
            .flat_map(|k| k.to_ne_bytes())
            .collect();
        let vals: Vec<u8> = (0..4 * vs).map(|i| i as u8).collect();
        same!(p, "update batch (index 7 out of range)", |s| s.apply_batch(
            BatchOp::Update,
            &keys,
            &vals,
            4,
            0
        ));
        let mut cursor: Option<Vec<u8>> = None;
        for step in [4, 4, 4] {
            let b = same_r!(p, "lookup batch", |s| s.lookup_batch(
                cursor.as_deref(),
                step,
                false,
                0,
                0
            ));
            cursor = b.out_batch.or(cursor);
        }
    }
    // LPM: generic batches over its keys.
    let p = pair(&t, def(11, 8, 8, 8, np), 0);
    let keys: Vec<u8> = [
        lpm(8, [10, 0, 0, 0]),
        lpm(16, [10, 1, 0, 0]),
        lpm(0, [0; 4]),
    ]
    .concat();
    let vals = vec![3u8; 24];
    same!(p, "lpm update batch", |s| s.apply_batch(
        BatchOp::Update,
        &keys,
        &vals,
        3,
        0
    ));
    let (ks_, ke) = batch_walk(&p.k, 2, false);
    let (os, oe) = batch_walk(&p.o, 2, false);
    assert_eq!((os, oe), (ks_, ke), "LPM batch walk");
    same!(p, "lpm delete batch", |s| s.apply_batch(
        BatchOp::Delete,
        &keys,
        &[],
        3,
        0
    ));
}
