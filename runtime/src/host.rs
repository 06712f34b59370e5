//! The host services helpers need: validated map handles, reads of arbitrary user memory,
//! clocks and the current task. The only module of this crate with `unsafe` code.
//!
//! # Invariants
//!
//! - `CallEnv::host` of a program run is null or points to the [`ProgHost`] of the
//!   [`crate::prog::LoadedProg`] being run, which outlives the run. A map pointer a program
//!   passes to a helper is used only if it is one of that `ProgHost`'s map handles; those are
//!   boxed [`Map`]s owned by the same `LoadedProg`, so they stay valid for the whole run.
//! - Inner maps a program got from a map of maps are boxed [`Map`]s in `ProgHost::inner`,
//!   which only ever grows while the `ProgHost` lives: a box, once pushed, is neither moved nor
//!   dropped before the `LoadedProg`, so its address stays valid for every later run.
//! - Memory outside the program's regions (a `probe_read` source) is only read with
//!   `process_vm_readv(getpid())`, which reports an unmapped address as `EFAULT` rather than
//!   faulting.

use bpftime_maps::Map;
use bpftime_vm::helper::{CallEnv, MemRegion};
use std::cell::Cell;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// Per-program data helpers see through `CallEnv::host`.
#[derive(Debug, Default)]
pub struct ProgHost {
    /// Addresses of the program's map handles (the values its `lddw` map references load).
    pub maps: Vec<usize>,
    /// Handles of inner maps handed out by lookups in maps of maps (append-only).
    pub inner: parking_lot::Mutex<Vec<Box<Map>>>,
    /// Where the elements of the program's arrays and per-CPU arrays are (on first use).
    pub(crate) arrays: std::sync::OnceLock<Vec<ArrayLayout>>,
}

/// Where the elements of an array or per-CPU array of this process are, as the map's own
/// lookups report them when the program first looks one up: element `i` is at
/// `bases[c] + i * stride` on CPU `c` (arrays: one base). The data lives in the store mapping,
/// fixed for the life of the map handle (the same fact direct value access relies on).
#[derive(Debug)]
pub(crate) struct ArrayLayout {
    /// The map handle's address.
    map: usize,
    max_entries: u32,
    stride: u64,
    /// Element 0 per CPU id (per-CPU arrays; 0: none, the map's generic path) or one base
    /// (arrays). Also the table inlined per-CPU lookups read (JIT).
    bases: Vec<u64>,
    percpu: bool,
    value_size: u32,
    /// Programs may write the values (no `BPF_F_RDONLY_PROG`).
    writable: bool,
}

/// Most CPU ids probed when laying out a per-CPU array.
const MAX_CPU_IDS: u32 = 4096;

impl ArrayLayout {
    fn of(m: &Map) -> Option<ArrayLayout> {
        use bpftime_maps::MapType;
        let ty = m.def().map_type;
        let percpu = ty == MapType::PercpuArray as u32;
        if !(percpu || ty == MapType::Array as u32) || m.kernel_id().is_some() {
            return None;
        }
        let max_entries = m.def().max_entries;
        let (k0, k1) = (0u32.to_ne_bytes(), 1u32.to_ne_bytes());
        let addr = |k: &[u8], cpu: Option<u32>| -> Option<u64> {
            match cpu {
                Some(c) => m.lookup_percpu_ptr(k, c).ok().map(|p| p as u64),
                None => m.lookup_ptr(k).ok().map(|p| p as u64),
            }
        };
        let stride_at = |cpu: Option<u32>| -> Option<u64> {
            if max_entries > 1 {
                addr(&k1, cpu)?.checked_sub(addr(&k0, cpu)?)
            } else {
                Some(0)
            }
        };
        let value_size = m.def().value_size;
        let writable = m.def().flags & bpftime_maps::map::BPF_F_RDONLY_PROG == 0;
        if !percpu {
            let base = addr(&k0, None)?;
            return Some(ArrayLayout {
                map: m as *const Map as usize,
                max_entries,
                stride: stride_at(None)?,
                bases: vec![base],
                percpu,
                value_size,
                writable,
            });
        }
        // Indexed by CPU id: the slot each CPU's lookups use, as the map reports it (CPUs
        // without a slot of their own keep the map's generic path).
        let nr = m.nr_cpus();
        let mut bases = Vec::new();
        let mut stride = None;
        let mut slots = vec![false; nr as usize];
        let mut found = 0;
        for cpu in 0..MAX_CPU_IDS {
            if found == nr {
                break;
            }
            let Some(slot) = bpftime_maps::percpu::slot_of_cpu(cpu, nr) else {
                continue;
            };
            let (Some(b), Some(st)) = (addr(&k0, Some(cpu)), stride_at(Some(cpu))) else {
                continue;
            };
            if *stride.get_or_insert(st) != st {
                return None;
            }
            bases.resize(cpu as usize + 1, 0);
            bases[cpu as usize] = b;
            if let Some(seen) = slots.get_mut(slot as usize)
                && !*seen
            {
                *seen = true;
                found += 1;
            }
        }
        Some(ArrayLayout {
            map: m as *const Map as usize,
            max_entries,
            stride: stride?,
            bases,
            percpu,
            value_size,
            writable,
        })
    }

    /// The JIT's description of this map and the data area its inlined code may touch (every
    /// element of every CPU id's slot), or `None` when there is nothing to inline.
    fn inline_map(&self) -> Option<(bpftime_jit::InlineMap, MemRegion)> {
        let present: Vec<u64> = self.bases.iter().copied().filter(|&b| b != 0).collect();
        let lo = *present.iter().min()?;
        let hi = *present.iter().max()?;
        let span = u64::from(self.max_entries.checked_sub(1)?)
            .checked_mul(self.stride)?
            .checked_add(u64::from(self.value_size))?;
        let area = MemRegion {
            start: lo,
            len: (hi - lo).checked_add(span)?,
            writable: self.writable,
        };
        let layout = if self.percpu {
            bpftime_jit::InlineLayout::PerCpu {
                bases: self.bases.as_ptr() as u64,
                len: self.bases.len() as u64,
            }
        } else {
            bpftime_jit::InlineLayout::Array { base: lo }
        };
        // SAFETY: the bases and stride are the map's own answers for element addresses
        // (`Map::lookup_ptr` / `lookup_percpu_ptr`, fixed for the life of the handle: the
        // data lives in the store mapping), and the area spans exactly those elements; the
        // handle and this layout (with `bases`, which is never modified after construction)
        // live in the `LoadedProg` that owns the compiled code (module invariants), and its
        // helpers 1 and 2 answer for the same handle.
        let m = unsafe {
            bpftime_jit::InlineMap::new(
                self.map as u64,
                self.max_entries,
                self.value_size,
                self.stride,
                layout,
                area.start,
                area.len,
                self.writable,
            )
        };
        Some((m, area))
    }

    /// The value of element `key` (this CPU's), or `None` to take the map's own path.
    #[inline]
    fn value(&self, key: u32) -> Option<*mut u8> {
        if key >= self.max_entries {
            return None;
        }
        let i = if self.percpu { current_cpu() } else { 0 };
        let base = *self.bases.get(i as usize).filter(|&&b| b != 0)?;
        Some((base + u64::from(key) * self.stride) as *mut u8)
    }
}

/// The value of element `key` of array or per-CPU array `m` (this CPU's), where
/// [`Map::lookup_ptr`] would find it, without the map's generic lookup path; `None` for other
/// maps or when unsure (the caller then takes the generic path).
#[inline]
pub(crate) fn array_value(env: &CallEnv, m: &Map, key: &[u8]) -> Option<*mut u8> {
    let key = u32::from_ne_bytes(key.try_into().ok()?);
    let host = env.host as *const ProgHost;
    // SAFETY: `host` is null or the running program's live `ProgHost` (module invariants).
    let host = unsafe { host.as_ref() }?;
    let arrays = host.arrays.get_or_init(|| array_layouts(host));
    let addr = m as *const Map as usize;
    arrays.iter().find(|a| a.map == addr)?.value(key)
}

/// The program's arrays and per-CPU arrays as the JIT inlines their lookups and updates, each
/// with the data area its code may access (to be registered as a region of every run).
pub(crate) fn inline_maps(host: &ProgHost) -> Vec<(bpftime_jit::InlineMap, MemRegion)> {
    host.arrays
        .get_or_init(|| array_layouts(host))
        .iter()
        .filter_map(ArrayLayout::inline_map)
        .collect()
}

fn array_layouts(host: &ProgHost) -> Vec<ArrayLayout> {
    host.maps
        .iter()
        .filter_map(|&a| {
            // SAFETY: the program's own boxed map handles (module invariants).
            ArrayLayout::of(unsafe { &*(a as *const Map) })
        })
        .collect()
}

/// Most inner map handles one program keeps (each lookup of a not yet seen inner map opens
/// one; a program cycling through more maps than this gets NULL).
const MAX_INNER: usize = 4096;

/// `bpf_map_lookup_elem` on a map of maps: the address of this program's handle to inner map
/// `id` (opened on first use), or `None`.
pub(crate) fn inner_map_handle(env: &CallEnv, outer: &Map, id: u32) -> Option<u64> {
    let host = env.host as *const ProgHost;
    // SAFETY: `host` is null or the running program's live `ProgHost` (module invariants).
    let host = unsafe { host.as_ref() }?;
    let mut inner = host.inner.lock();
    if let Some(m) = inner.iter().find(|m| m.id() == id && m.is_live()) {
        return Some(&**m as *const Map as u64);
    }
    if inner.len() >= MAX_INNER {
        return None;
    }
    let m = Box::new(Map::open(outer.store(), id).ok()?);
    let addr = &*m as *const Map as u64;
    inner.push(m);
    Some(addr)
}

/// The map a program passed as a helper argument, if it is one of the program's maps.
/// The reference is valid for the rest of the helper call (module invariants).
#[inline]
pub(crate) fn map_arg<'a>(env: &CallEnv, arg: u64) -> Option<&'a Map> {
    let host = env.host as *const ProgHost;
    // SAFETY: `host` is null or the running program's live `ProgHost` (module invariants).
    let host = unsafe { host.as_ref() }?;
    if !host.maps.contains(&(arg as usize)) {
        return inner_map_arg(host, arg);
    }
    let p = arg as *const Map;
    // SAFETY: `p` is one of the program's boxed map handles, alive for the whole run.
    Some(unsafe { &*p })
}

/// [`map_arg`] for an inner map handle (not one of the program's own maps).
#[cold]
fn inner_map_arg<'a>(host: &ProgHost, arg: u64) -> Option<&'a Map> {
    let inner = host.inner.lock();
    let m = inner
        .iter()
        .find(|m| &***m as *const Map as u64 == arg && m.is_live())?;
    let p = &**m as *const Map;
    // SAFETY: `p` is one of the program's inner map boxes, never moved or dropped while the
    // `ProgHost` lives (module invariants), so beyond the lock and the helper call.
    Some(unsafe { &*p })
}

/// `bpf_map_update_elem` on an array or per-CPU array of this process (flags `BPF_ANY` or
/// `BPF_EXIST`, which such maps treat alike) without the generic update path: `value` is
/// copied over the element [`Map::lookup_ptr`] finds (this CPU's, for a per-CPU array), which
/// is where `Map::update` writes it. False (nothing written) for any other case, including a
/// key out of range: the caller then takes the generic path and its error.
#[inline]
pub(crate) fn update_array_in_place(
    env: &CallEnv,
    m: &Map,
    key: &[u8],
    value: &[u8],
    flags: u64,
) -> bool {
    use bpftime_maps::MapType;
    use bpftime_maps::map::{BPF_ANY, BPF_EXIST};
    let ty = m.def().map_type;
    if !(ty == MapType::Array as u32 || ty == MapType::PercpuArray as u32)
        || !(flags == BPF_ANY || flags == BPF_EXIST)
        || m.kernel_id().is_some()
        || value.len() != m.def().value_size as usize
    {
        return false;
    }
    let Some(p) = array_value(env, m, key).or_else(|| m.lookup_ptr(key).ok()) else {
        return false;
    };
    // SAFETY: `p` is the element's value, `value_size` bytes inside the map's data in the
    // store mapping (mapped read-write for the life of the handle); `value` is a distinct
    // buffer of exactly that length.
    unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), p, value.len()) };
    true
}

/// Lets a checked (interpreted) program access the value `p` of map `m` a helper returned:
/// read-only when the map is `BPF_F_RDONLY_PROG` (the kernel's verifier refuses stores into
/// such values; here the interpreter traps them).
#[inline]
pub(crate) fn grant_map_value(env: &mut CallEnv, m: &Map, p: *mut u8) {
    let writable = m.def().flags & bpftime_maps::map::BPF_F_RDONLY_PROG == 0;
    // SAFETY: as for `grant_value`: `p` is a value inside `m`'s data in the store mapping,
    // which stays mapped for the rest of the run.
    unsafe { env.grant(p as u64, u64::from(m.def().value_size), writable) };
}

/// Lets a checked (interpreted) program access a map value a helper returned.
pub(crate) fn grant_value(env: &mut CallEnv, p: *mut u8, len: u32) {
    // SAFETY: `p` points at a value inside the map's data in the store mapping, which stays
    // mapped for the life of the `Map` handle (the store segment never unmaps while open),
    // and so for the rest of the run.
    unsafe { env.grant(p as u64, u64::from(len), true) };
}

/// Reads `buf.len()` bytes of this process's memory at `addr`; false on any fault.
pub fn read_user(addr: u64, buf: &mut [u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes our own writable buffer; the kernel validates `remote` and
    // returns -1/EFAULT (or a short count) instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == buf.len() as isize
}

/// Reads a NUL-terminated string at `addr` into `buf` (at most `buf.len() - 1` bytes plus a
/// NUL). Returns the length including the NUL, or None if the first byte cannot be read.
pub fn read_user_str(addr: u64, buf: &mut [u8]) -> Option<usize> {
    let cap = buf.len().checked_sub(1)?;
    let mut done = 0;
    while done < cap {
        // Read up to the next page boundary so an unmapped page after the string is harmless.
        let a = addr.checked_add(done as u64)?;
        let to_page = (4096 - (a % 4096)) as usize;
        let n = to_page.min(cap - done);
        if !read_user(a, &mut buf[done..done + n]) {
            if done == 0 {
                return None;
            }
            break;
        }
        if let Some(z) = buf[done..done + n].iter().position(|&b| b == 0) {
            return Some(done + z + 1);
        }
        done += n;
    }
    buf[done] = 0;
    Some(done + 1)
}

/// The user stack at a probe, innermost frame first, by walking frame pointers as the kernel's
/// `perf_callchain_user` does: `ip`, then (at a function entry, where `rbp` is still the
/// caller's) the return address at `sp`, then each frame's return address at `fp + 8`,
/// following the saved frame pointers at `fp`. Every read goes through `process_vm_readv`, so a
/// bad frame pointer ends the walk instead of faulting. At most `max` frames.
///
/// "At a function entry" follows the kernel's heuristic (`is_uprobe_at_func_entry`): the probed
/// instruction is `push %rbp` or `endbr64`. Our inline hooks replace that instruction with a
/// `jmp rel32` (or an `int3`), so those count as entries too.
pub fn user_stack(ip: u64, bp: u64, sp: u64, max: usize) -> Vec<u64> {
    let mut ips = Vec::with_capacity(max.min(128));
    if max == 0 {
        return ips;
    }
    ips.push(ip);
    let mut insn = [0u8; 4];
    let at_entry = read_user(ip, &mut insn)
        && (insn[0] == 0x55
            || insn == [0xf3, 0x0f, 0x1e, 0xfa]
            || insn[0] == 0xe9
            || insn[0] == 0xcc);
    if at_entry && ips.len() < max {
        let mut ret = [0u8; 8];
        if read_user(sp, &mut ret) {
            ips.push(u64::from_ne_bytes(ret));
        }
    }
    let mut fp = bp;
    while ips.len() < max && fp != 0 && fp.is_multiple_of(8) {
        let mut frame = [0u8; 16];
        if !read_user(fp, &mut frame) {
            break;
        }
        let next = u64::from_ne_bytes(frame[..8].try_into().unwrap_or_default());
        let ret = u64::from_ne_bytes(frame[8..].try_into().unwrap_or_default());
        if ret == 0 {
            break;
        }
        ips.push(ret);
        // Callers' frames lie at higher addresses; anything else is not a frame chain.
        if next <= fp {
            break;
        }
        fp = next;
    }
    ips
}

/// `clock_gettime(clock)` in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock ids used are supported on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

thread_local! {
    static TID: Cell<(u64, u32)> = const { Cell::new((u64::MAX, 0)) };
}

/// Bumped in the child after every `fork`, invalidating cached pids and tids.
static FORK_GEN: AtomicU64 = AtomicU64::new(0);
static PID: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GEN.fetch_add(1, Ordering::AcqRel);
    PID.store(0, Ordering::Release);
}

fn watch_forks() {
    ATFORK.call_once(|| {
        // SAFETY: registering a handler that only touches atomics, which is async-signal-safe
        // and valid in a freshly forked child.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
}

/// The process id, cached (glibc no longer caches `getpid`, a system call per probe hit
/// otherwise); the cache is reset in the child after `fork`.
pub fn pid() -> u32 {
    let p = PID.load(Ordering::Acquire);
    if p != 0 {
        return p as u32;
    }
    watch_forks();
    let p = std::process::id();
    PID.store(u64::from(p), Ordering::Release);
    p
}

/// The calling thread's id (cached per thread; re-read after `fork`).
pub fn tid() -> u32 {
    let generation = FORK_GEN.load(Ordering::Acquire);
    TID.with(|c| {
        let (g, t) = c.get();
        if g == generation && t != 0 {
            return t;
        }
        watch_forks();
        // SAFETY: gettid has no preconditions.
        let t = unsafe { libc::gettid() } as u32;
        c.set((generation, t));
        t
    })
}

/// The CPU the caller runs on.
#[inline]
pub fn current_cpu() -> u32 {
    // Pinned for the duration of a program run (`LoadedProg::run_with_cookie`).
    bpftime_maps::shm::current_cpu()
}

/// Real uid and gid of the process.
pub fn uid_gid() -> (u32, u32) {
    // SAFETY: getuid/getgid have no preconditions.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// The calling thread's name (`comm`, at most 16 bytes with the NUL).
pub fn comm() -> Vec<u8> {
    let mut buf = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer we pass.
    let r = unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr()) };
    if r != 0 {
        return Vec::new();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(16);
    buf[..n].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_an_unmapped_address_fails_cleanly() {
        let mut b = [0u8; 8];
        assert!(!read_user(8, &mut b));
        let x = 0x1122_3344_5566_7788u64;
        assert!(read_user(&x as *const u64 as u64, &mut b));
        assert_eq!(u64::from_ne_bytes(b), x);
    }

    #[test]
    fn frame_pointer_walk_follows_a_chain_and_stops_at_garbage() {
        // A fake chain on our own stack: [next fp, return address] pairs.
        let mut chain = [0u64; 4];
        let fp = chain.as_ptr() as u64;
        chain[0] = fp + 16;
        chain[1] = 0x1111;
        chain[2] = 0; // end of chain
        chain[3] = 0x2222;
        std::hint::black_box(&mut chain);
        assert_eq!(user_stack(0xdead, fp, 0, 16), vec![0xdead, 0x1111, 0x2222]);
        assert_eq!(user_stack(0xdead, fp, 0, 2), vec![0xdead, 0x1111]);
        // An unreadable or misaligned frame pointer ends the walk.
        assert_eq!(user_stack(0xdead, 8, 0, 16), vec![0xdead]);
        assert_eq!(user_stack(0xdead, fp + 1, 0, 16), vec![0xdead]);
        assert!(user_stack(1, 0, 0, 0).is_empty());
    }

    #[test]
    fn strings_stop_at_nul_and_truncate() {
        let s = b"hello\0world";
        let mut b = [0xffu8; 16];
        assert_eq!(read_user_str(s.as_ptr() as u64, &mut b), Some(6));
        assert_eq!(&b[..6], b"hello\0");
        let mut small = [0xffu8; 4];
        assert_eq!(read_user_str(s.as_ptr() as u64, &mut small), Some(4));
        assert_eq!(&small, b"hel\0");
        assert_eq!(read_user_str(16, &mut small), None);
    }
}
