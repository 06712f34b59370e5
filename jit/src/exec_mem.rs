//! Executable memory for generated code.
//!
//! # Invariants
//!
//! - An [`ExecMem`] owns one private anonymous mapping of `len` bytes (rounded up to pages),
//!   created read-write, filled with the code, then switched to read-execute with `mprotect`
//!   (whose result is checked) *before* the value exists. It is never writable and executable at
//!   once, and never writable again; it is unmapped exactly once, on drop.
//! - The pointer it hands out ([`ExecMem::as_ptr`]) stays valid, readable and executable for as
//!   long as the `ExecMem` lives; callers that turn it into a function pointer must not call it
//!   after the `ExecMem` is dropped.
//! - On x86_64 the instruction cache is coherent with data writes; the `mprotect` (a
//!   serialising system call) suffices. On aarch64 the cache is flushed before `mprotect`.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A read-execute mapping holding a copy of some machine code.
#[derive(Debug)]
pub struct ExecMem {
    ptr: NonNull<u8>,
    /// Bytes of code.
    len: usize,
    /// Bytes mapped (`len` rounded up to pages).
    map_len: usize,
}

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
        // Successive mappings take successive addresses downwards from `near - 256 MiB`, so
        // that each hint names a range no earlier mapping holds.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let start = near.saturating_sub(NEAR_DISTANCE) & !(page - 1);
        let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
        let cursor = NEXT.fetch_sub(len, Ordering::Relaxed);
        let hint = if cursor.abs_diff(near) < 4 * NEAR_DISTANCE && cursor > len {
            cursor - len
        } else {
            start
        };
        Self::map(code, hint)
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
        // From here on `mem` owns the mapping and unmaps it on every exit path.
        let mem = ExecMem {
            ptr,
            len: code.len(),
            map_len: len,
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
        // SAFETY: `ptr`/`len` describe the mapping this value owns; it is unmapped only here.
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
        debug_assert_eq!(r, 0, "munmap failed: {}", io::Error::last_os_error());
    }
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
    fn empty_code_still_maps_a_page() {
        let m = ExecMem::new(&[]).unwrap();
        assert!(m.is_empty());
        assert!(!m.as_ptr().is_null());
    }
}
