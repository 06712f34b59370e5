//! Executable memory for generated code.
//!
//! # Invariants
//!
//! - An [`ExecMem`] owns pages of private anonymous memory (`len` bytes rounded up to pages):
//!   read-write when it gets them, filled with the code, then switched to read-execute with
//!   `mprotect` (whose result is checked) *before* the value exists. They are never writable and
//!   executable at once, and not writable while the `ExecMem` lives.
//! - Code of one page comes from a per-process pool (most programs: one `mprotect` instead of
//!   `mmap` + page fault + `mprotect` + `munmap`): the pool's `ready` pages are read-write,
//!   prefaulted, owned by the pool alone and never executed while there. A dropped pooled page
//!   goes to `freed` still read-execute (no system call at drop; nothing executes it any more);
//!   when `ready` runs dry, `freed` pages are switched back to read-write (one `mprotect` per
//!   contiguous run) before any is handed out again — a page whose `mprotect` fails is leaked,
//!   never reused while possibly executable. Larger code has its own mapping, unmapped on drop.
//! - The pointer it hands out ([`ExecMem::as_ptr`]) stays valid, readable and executable for as
//!   long as the `ExecMem` lives; callers that turn it into a function pointer must not call it
//!   after the `ExecMem` is dropped.
//! - On x86_64 the instruction cache is coherent with data writes; the `mprotect` (a
//!   serialising system call) suffices. On aarch64 the cache is flushed before `mprotect`.

use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A read-execute mapping holding a copy of some machine code.
#[derive(Debug)]
pub struct ExecMem {
    ptr: NonNull<u8>,
    /// Bytes of code.
    len: usize,
    /// Bytes mapped (`len` rounded up to pages).
    map_len: usize,
    /// A page of the pool (returned on drop) rather than an own mapping.
    pooled: bool,
}

/// Pages for one-page programs, taken from mappings of [`POOL_CHUNK`] pages (module
/// invariants).
#[derive(Debug)]
struct Pool {
    /// Read-write pages, ready for code.
    ready: Vec<usize>,
    /// Pages of dropped programs, still read-execute.
    freed: Vec<usize>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    ready: Vec::new(),
    freed: Vec::new(),
});
/// Pages the pool maps at once.
const POOL_CHUNK: usize = 16;
/// Pages the pool keeps at most; more freed pages are unmapped.
const POOL_MAX: usize = 256;

// SAFETY: the mapping is immutable (read-execute) after construction and owned by this value;
// sharing or sending its address between threads is as safe as sharing a `&[u8]`.
unsafe impl Send for ExecMem {}
// SAFETY: as above; nothing mutates the mapping through `&ExecMem`.
unsafe impl Sync for ExecMem {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// How far below `near` [`ExecMem::new_near`] asks for its mapping.
const NEAR_DISTANCE: usize = 256 << 20;

impl ExecMem {
    /// Maps a copy of `code` read-execute, wherever the kernel likes.
    pub fn new(code: &[u8]) -> io::Result<Self> {
        Self::map(code, 0)
    }

    /// Maps a copy of `code` read-execute, preferably within a few hundred MiB of address `near`
    /// (the code it calls: helpers). Indirect calls and returns between code that far apart
    /// are slower on some CPUs (measured: ~25% on a helper-call-heavy loop on AMD EPYC). Only a
    /// hint: if that range is taken, the kernel maps elsewhere.
    pub fn new_near(code: &[u8], near: usize) -> io::Result<Self> {
        let page = page_size();
        let len = code.len().max(1).div_ceil(page) * page;
        if len == page {
            return Self::pooled(code, near);
        }
        Self::map(code, Self::hint(len, near))
    }

    /// A hint for a mapping of `len` bytes near `near`: successive mappings take successive
    /// addresses downwards from `near - 256 MiB`, so that each hint names a range no earlier
    /// mapping holds.
    fn hint(len: usize, near: usize) -> usize {
        let page = page_size();
        // Successive mappings take successive addresses downwards from `near - 256 MiB`, so
        // that each hint names a range no earlier mapping holds.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let start = near.saturating_sub(NEAR_DISTANCE) & !(page - 1);
        let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
        let cursor = NEXT.fetch_sub(len, Ordering::Relaxed);
        if cursor.abs_diff(near) < 4 * NEAR_DISTANCE && cursor > len {
            cursor - len
        } else {
            start
        }
    }

    /// One page of code from the pool.
    fn pooled(code: &[u8], near: usize) -> io::Result<Self> {
        let page = page_size();
        let taken = {
            let mut pool = POOL
                .lock()
                .map_err(|_| io::Error::other("code pool poisoned"))?;
            if pool.ready.is_empty() && !pool.freed.is_empty() {
                let mut freed = std::mem::take(&mut pool.freed);
                freed.sort_unstable();
                let mut i = 0;
                while i < freed.len() {
                    let mut j = i + 1;
                    while j < freed.len() && freed[j] == freed[j - 1] + page {
                        j += 1;
                    }
                    // SAFETY: pages of dropped programs, owned by the pool, executed by
                    // nothing any more (module invariants).
                    let r = unsafe {
                        libc::mprotect(
                            freed[i] as *mut libc::c_void,
                            (j - i) * page,
                            libc::PROT_READ | libc::PROT_WRITE,
                        )
                    };
                    if r == 0 {
                        pool.ready.extend_from_slice(&freed[i..j]);
                    }
                    i = j;
                }
            }
            pool.ready.pop()
        };
        let addr = match taken {
            Some(a) => a,
            None => {
                let chunk = POOL_CHUNK * page;
                // SAFETY: a fresh private anonymous mapping, prefaulted; without MAP_FIXED the
                // address is only a hint.
                let p = unsafe {
                    libc::mmap(
                        Self::hint(chunk, near) as *mut libc::c_void,
                        chunk,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED || p.is_null() {
                    return Err(io::Error::last_os_error());
                }
                let base = p as usize;
                own_add(base, chunk);
                if let Ok(mut pool) = POOL.lock() {
                    pool.ready.extend((1..POOL_CHUNK).map(|i| base + i * page));
                }
                base
            }
        };
        let Some(ptr) = NonNull::new(addr as *mut u8) else {
            return Err(io::Error::other("null code page"));
        };
        // SAFETY: a read-write pool page that is now ours alone (popped or fresh), one page of
        // at least `code.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), ptr.as_ptr(), code.len()) };
        #[cfg(target_arch = "aarch64")]
        flush_icache(ptr.as_ptr(), code.len());
        // SAFETY: exactly the page taken above.
        let r =
            unsafe { libc::mprotect(ptr.as_ptr().cast(), page, libc::PROT_READ | libc::PROT_EXEC) };
        if r != 0 {
            // Its protection is unknown now: leak the page rather than reuse it.
            return Err(io::Error::last_os_error());
        }
        Ok(ExecMem {
            ptr,
            len: code.len(),
            map_len: page,
            pooled: true,
        })
    }

    fn map(code: &[u8], hint: usize) -> io::Result<Self> {
        let page = page_size();
        let len = code.len().max(1).div_ceil(page) * page;
        // SAFETY: a fresh private anonymous mapping. Without MAP_FIXED the address is only a
        // hint: the kernel never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(io::Error::other("mmap returned null"));
        };
        own_add(p as usize, len);
        // From here on `mem` owns the mapping and unmaps it on every exit path.
        let mem = ExecMem {
            ptr,
            len: code.len(),
            map_len: len,
            pooled: false,
        };
        // SAFETY: the mapping is `len >= code.len()` bytes, writable, and not aliased by
        // anything else (it was just created).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.ptr.as_ptr(), code.len()) };
        #[cfg(target_arch = "aarch64")]
        flush_icache(mem.ptr.as_ptr(), code.len());
        // SAFETY: `ptr..ptr+len` is exactly the mapping created above.
        let r = unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(mem)
    }

    /// Start of the code.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Bytes of code (not counting the padding to a page).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no code was copied.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The code, as mapped (read-only view).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is readable, at least `len` bytes, immutable and alive as
        // long as `self` (module invariants).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ExecMem {
    fn drop(&mut self) {
        let p = self.ptr.as_ptr().cast::<libc::c_void>();
        if self.pooled
            && let Ok(mut pool) = POOL.lock()
            && pool.ready.len() + pool.freed.len() < POOL_MAX
        {
            // Switched back to read-write when the pool needs it (module invariants).
            pool.freed.push(p as usize);
            return;
        }
        // SAFETY: `ptr`/`map_len` describe memory this value owns (its mapping, or a pool page
        // the full pool does not take back); it is unmapped only here.
        let r = unsafe { libc::munmap(p, self.map_len) };
        own_remove(p as usize, self.map_len);
        debug_assert_eq!(r, 0, "munmap failed: {}", io::Error::last_os_error());
    }
}

/// Address ranges (start, length) of the mappings that hold generated code (pool chunks and
/// own mappings), so that a host can tell its code from code its application generates.
static OWN: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn own_add(addr: usize, len: usize) {
    if let Ok(mut own) = OWN.lock() {
        own.push((addr, len));
    }
}

/// Forgets `[addr, addr + len)` (unmapped), splitting the range that held it.
fn own_remove(addr: usize, len: usize) {
    if let Ok(mut own) = OWN.lock() {
        let end = addr + len;
        let mut kept = Vec::with_capacity(own.len() + 1);
        for &(s, l) in own.iter() {
            let e = s + l;
            if e <= addr || end <= s {
                kept.push((s, l));
                continue;
            }
            if s < addr {
                kept.push((s, addr - s));
            }
            if end < e {
                kept.push((end, e - end));
            }
        }
        *own = kept;
    }
}

/// The address ranges (start, length) of every mapping that holds (or held, for pool pages
/// waiting for reuse) code of this process's [`ExecMem`]s.
pub fn code_ranges() -> Vec<(usize, usize)> {
    OWN.lock().map(|o| o.clone()).unwrap_or_default()
}

#[cfg(target_arch = "aarch64")]
fn flush_icache(start: *mut u8, len: usize) {
    unsafe extern "C" {
        fn __clear_cache(start: *mut libc::c_char, end: *mut libc::c_char);
    }
    // SAFETY: `[start, start + len)` is a live mapping owned by the caller.
    unsafe { __clear_cache(start.cast(), start.add(len).cast()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_ranges_cover_live_code_and_forget_unmapped_mappings() {
        let inside = |a: usize| code_ranges().iter().any(|&(s, l)| s <= a && a < s + l);
        let small = ExecMem::new(&[0xc3]).unwrap();
        assert!(inside(small.as_ptr() as usize));
        // Larger than a page: its own mapping, unmapped (and forgotten) on drop.
        let big = ExecMem::new(&vec![0xc3u8; 3 * page_size()]).unwrap();
        let at = big.as_ptr() as usize;
        assert!(inside(at) && inside(at + 2 * page_size()));
        assert!(code_ranges().contains(&(at, 3 * page_size())));
        drop(big);
        // (Other tests may map the same addresses again: the exact range is what must go.)
        assert!(!code_ranges().contains(&(at, 3 * page_size())));
        assert!(inside(small.as_ptr() as usize));
    }

    fn protection_of(addr: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("procfs");
        for line in maps.lines() {
            let mut parts = line.split_whitespace();
            let range = parts.next().unwrap();
            let perms = parts.next().unwrap();
            let (lo, hi) = range.split_once('-').unwrap();
            let lo = usize::from_str_radix(lo, 16).unwrap();
            let hi = usize::from_str_radix(hi, 16).unwrap();
            if (lo..hi).contains(&addr) {
                return perms.to_string();
            }
        }
        panic!("{addr:#x} is not mapped");
    }

    #[test]
    fn code_is_mapped_read_execute_never_writable() {
        let m = ExecMem::new(&[0xc3; 100]).unwrap();
        assert_eq!(m.bytes(), &[0xc3; 100][..]);
        assert_eq!(m.len(), 100);
        let perms = protection_of(m.as_ptr() as usize);
        assert!(perms.starts_with("r-x"), "{perms}");
    }

    #[test]
    fn mapping_near_an_address_is_only_a_hint() {
        let near = protection_of as *const () as usize;
        let m = ExecMem::new_near(&[0xc3; 10], near).unwrap();
        assert_eq!(m.bytes(), &[0xc3; 10][..]);
        assert!(protection_of(m.as_ptr() as usize).starts_with("r-x"));
        // An impossible hint still maps somewhere.
        let m = ExecMem::new_near(&[0xc3], usize::MAX).unwrap();
        assert!(!m.as_ptr().is_null());
    }

    #[test]
    fn pooled_pages_are_reused_and_never_writable_while_live() {
        let a = ExecMem::new_near(&[0xc3; 64], 0).unwrap();
        let addr = a.as_ptr() as usize;
        assert!(protection_of(addr).starts_with("r-x"));
        drop(a);
        let many: Vec<ExecMem> = (0..40)
            .map(|i| ExecMem::new_near(&[0x90, 0xc3, i as u8], 0).unwrap())
            .collect();
        for (i, m) in many.iter().enumerate() {
            assert_eq!(m.bytes(), &[0x90, 0xc3, i as u8]);
            assert!(protection_of(m.as_ptr() as usize).starts_with("r-x"));
        }
        drop(many);
        // Freed pages come back read-write before they hold code again.
        let again: Vec<ExecMem> = (0..80)
            .map(|_| ExecMem::new_near(&[0xc3], 0).unwrap())
            .collect();
        assert!(again.iter().all(|m| m.bytes() == [0xc3]));
        // Larger code has its own mapping.
        let big = ExecMem::new_near(&vec![0xc3; 10_000], 0).unwrap();
        assert_eq!(big.len(), 10_000);
        assert!(protection_of(big.as_ptr() as usize).starts_with("r-x"));
    }

    #[test]
    fn empty_code_still_maps_a_page() {
        let m = ExecMem::new(&[]).unwrap();
        assert!(m.is_empty());
        assert!(!m.as_ptr().is_null());
    }
}
