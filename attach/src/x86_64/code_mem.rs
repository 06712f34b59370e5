//! Memory for stubs and trampolines, allocated near the hooked code, and reads of code bytes.
//!
//! # Invariants
//!
//! - A [`CodeBlock`] is two pages: a code page and a data page (the in-flight counter, the
//!   removed flag, the native entry word and the native trap counter, 8 bytes each in that
//!   order). The code page is read-write until [`CodeBlock::seal`] makes it read-execute; it is
//!   never writable and executable at once. The data page is never executable.
//! - A sealed block is never unmapped: a thread may be running its last instructions (or be
//!   preempted in them) at any later time. Only blocks that were never sealed are freed.
//! - [`read_code`] reads only inside a mapping that `/proc/self/maps` listed as readable, and
//!   never past its end.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::AttachError;
use crate::procmaps::MapEntry;

/// x86_64 Linux base page size.
pub(crate) const PAGE: usize = 4096;
/// Code page + data page.
const BLOCK: usize = 2 * PAGE;
/// Lowest address `mmap` hands out by default (`vm.mmap_min_addr`).
const MIN_ADDR: usize = 0x1_0000;
/// One past the highest user address with 4-level paging.
const MAX_ADDR: usize = 0x7fff_ffff_f000;
/// Keep a block this far inside the ±2 GiB reach of a rel32 so relocated RIP-relative operands
/// of the prologue (which point near the target) stay in reach of the trampoline too.
const REACH: usize = (1 << 31) - (64 << 20);
/// Leave this much room below a stack mapping so its growth is not blocked.
const STACK_ROOM: usize = 64 << 20;

/// Two pages for one hook. The address is stored as an integer; the mapping is owned by
/// whoever holds the block (it is never unmapped once sealed).
#[derive(Debug)]
pub(crate) struct CodeBlock {
    base: usize,
}

impl CodeBlock {
    /// First byte of the code page.
    pub(crate) fn code_addr(&self) -> usize {
        self.base
    }

    /// Address of the in-flight counter at the start of the data page.
    pub(crate) fn inflight_addr(&self) -> usize {
        self.base + PAGE
    }

    /// Address of the *removed* flag (the word after the in-flight counter): set once the
    /// hook's original bytes are back; a thread that jumped to the stub before that and sees it
    /// goes back to the original code without calling the handler.
    pub(crate) fn removed_addr(&self) -> usize {
        self.base + PAGE + 8
    }

    /// Sets the removed flag (see [`CodeBlock::removed_addr`]).
    pub(crate) fn mark_removed(&self) {
        // SAFETY: the data page stays mapped read-write for the life of the process; the flag
        // is 8-aligned and only read (by the stub) or written here.
        let flag = unsafe { AtomicU64::from_ptr(self.removed_addr() as *mut u64) };
        flag.store(1, Ordering::SeqCst);
    }

    /// Address of the native entry word (after the removed flag): the address of a
    /// [`NativeEntry`](super::hook::NativeEntry) the stub calls instead of the handler, 0 for
    /// none. Read by the stub with a plain load (x86 loads are acquire).
    pub(crate) fn native_addr(&self) -> usize {
        self.base + PAGE + 16
    }

    /// Address of the native trap counter (after the native word): incremented by the stub
    /// (`lock inc`) each time a native entry returns `NATIVE_TRAPPED`.
    pub(crate) fn native_traps_addr(&self) -> usize {
        self.base + PAGE + 24
    }

    /// Stores `entry` (0 = none) in the native entry word, with release ordering: a thread
    /// that reads the new address also sees every write made before the store.
    pub(crate) fn set_native(&self, entry: u64) {
        // SAFETY: the data page stays mapped read-write for the life of the process; the word
        // is 8-aligned and only read (by the stub) or written here.
        let word = unsafe { AtomicU64::from_ptr(self.native_addr() as *mut u64) };
        word.store(entry, Ordering::Release);
    }

    /// Current value of the native trap counter.
    pub(crate) fn native_traps(&self) -> u64 {
        // SAFETY: as for `inflight`: mapped read-write for good, 8-aligned, and otherwise only
        // changed by the stub's locked increments.
        let counter = unsafe { AtomicU64::from_ptr(self.native_traps_addr() as *mut u64) };
        counter.load(Ordering::Relaxed)
    }

    /// Copies `code` to the code page. Fails if it does not fit.
    pub(crate) fn write_code(&self, code: &[u8]) -> Result<(), AttachError> {
        if code.len() > PAGE {
            return Err(AttachError::Relocation {
                addr: self.base,
                message: format!("stub of {} bytes does not fit in a page", code.len()),
            });
        }
        // SAFETY: the code page is mapped read-write and not sealed (callers seal only after
        // writing), `code` fits in it, and no other pointer into the fresh mapping exists.
        unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), self.base as *mut u8, code.len()) };
        Ok(())
    }

    /// Makes the code page read-execute. After this the block must never be freed.
    pub(crate) fn seal(&self) -> Result<(), AttachError> {
        // SAFETY: `base` is the page-aligned start of our own two-page mapping; changing the
        // protection of its first page affects no memory Rust code references.
        let rc = unsafe {
            libc::mprotect(
                self.base as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if rc != 0 {
            return Err(AttachError::last_os("mprotect(stub, PROT_READ|PROT_EXEC)"));
        }
        Ok(())
    }

    /// Current value of the in-flight counter (threads between the stub's increment and
    /// decrement, i.e. in or around the handler call).
    pub(crate) fn inflight(&self) -> u64 {
        // SAFETY: the data page stays mapped read-write for the life of the process (blocks are
        // never unmapped once sealed, and unsealed ones are only freed by value), the counter is
        // 8-aligned, and every other access to it is a locked read-modify-write from the stub.
        let counter = unsafe { AtomicU64::from_ptr(self.inflight_addr() as *mut u64) };
        counter.load(Ordering::Acquire)
    }

    /// Unmaps a block that was never sealed (no code ever ran from it).
    pub(crate) fn free_unsealed(self) {
        // SAFETY: the block was never made executable, so no thread can be running in it and no
        // reference into it exists; we unmap exactly the mapping we created.
        unsafe { libc::munmap(self.base as *mut libc::c_void, BLOCK) };
        OWN.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&(a, _)| a != self.base);
    }
}

/// The blocks (and other code mappings) of this process's hooks, by start and length: never
/// unmapped once sealed, removed when freed unsealed.
static OWN: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// Records `[addr, addr + len)` as bpftime's own code ([`own_code_ranges`]).
pub(crate) fn own_add(addr: usize, len: usize) {
    OWN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((addr, len));
}

/// The address ranges (start, length) holding the hook engine's own code: stubs,
/// trampolines, out-of-line copies, return trampolines (so that a host can tell its code from
/// code the application generates, e.g. for system call tracing's catch-all).
pub fn own_code_ranges() -> Vec<(usize, usize)> {
    OWN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Maps a block within rel32 reach of `target`, trying the free gaps of `maps` nearest to it.
/// `None` if no gap in reach could be mapped.
pub(crate) fn alloc_near(
    target: usize,
    maps: &[MapEntry],
) -> Result<Option<CodeBlock>, AttachError> {
    for cand in near_candidates(maps, target).into_iter().take(64) {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a fresh anonymous
        // private mapping aliases nothing.
        let p = unsafe {
            libc::mmap(
                cand as *mut libc::c_void,
                BLOCK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        if p as usize != cand {
            // A kernel that ignores MAP_FIXED_NOREPLACE treats the address as a hint.
            CodeBlock { base: p as usize }.free_unsealed();
            continue;
        }
        own_add(cand, BLOCK);
        return Ok(Some(CodeBlock { base: cand }));
    }
    Ok(None)
}

/// Maps a block anywhere (for the 14-byte absolute jump).
pub(crate) fn alloc_anywhere() -> Result<CodeBlock, AttachError> {
    // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            BLOCK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(AttachError::last_os("mmap(stub)"));
    }
    own_add(p as usize, BLOCK);
    Ok(CodeBlock { base: p as usize })
}

/// Block-aligned addresses in free gaps between `maps` whose whole block lies within
/// [`REACH`] of `target`, nearest first.
pub(crate) fn near_candidates(maps: &[MapEntry], target: usize) -> Vec<usize> {
    let lo = target.saturating_sub(REACH).max(MIN_ADDR);
    let hi = target.saturating_add(REACH).min(MAX_ADDR);
    let mut out = Vec::new();
    let mut prev_end = MIN_ADDR;
    let mut bounds: Vec<(usize, usize, bool)> = maps
        .iter()
        .map(|m| (m.start, m.end, m.path == "[stack]"))
        .collect();
    bounds.push((MAX_ADDR, MAX_ADDR, false));
    for (start, end, stack) in bounds {
        let gap_lo = prev_end.max(lo);
        let gap_hi = if stack {
            start.saturating_sub(STACK_ROOM)
        } else {
            start
        }
        .min(hi);
        prev_end = prev_end.max(end);
        if gap_hi < gap_lo + BLOCK {
            continue;
        }
        // The two ends of the gap, and the point nearest the target when it lies inside.
        let first = gap_lo.next_multiple_of(PAGE);
        let last = (gap_hi - BLOCK) & !(PAGE - 1);
        for c in [first, last, target.clamp(first, last) & !(PAGE - 1)] {
            if c >= gap_lo && c + BLOCK <= gap_hi && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out.sort_by_key(|&c| c.abs_diff(target));
    out
}

/// Copies up to `max` bytes starting at `addr`, stopping at the end of its mapping. Fails if
/// `addr` is not in a readable, executable mapping.
pub(crate) fn read_code(
    maps: &[MapEntry],
    addr: usize,
    max: usize,
) -> Result<Vec<u8>, AttachError> {
    let m = maps
        .iter()
        .find(|m| m.contains(addr) && m.read && m.exec)
        .ok_or(AttachError::NotMapped { addr })?;
    let len = max.min(m.end - addr);
    let mut out = vec![0u8; len];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: [addr, addr+len) lies inside a readable mapping (checked above against the
        // current maps). Code is patched only by this crate, under the registry lock the
        // caller holds; volatile reads keep the compiler from assuming the bytes immutable.
        *b = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procmaps::parse_maps;

    #[test]
    fn candidates_are_free_in_reach_and_nearest_first() {
        let maps = parse_maps(
            "\
555555554000-555555600000 r-xp 00000000 fe:01 1 /bin/x
555555600000-555555700000 rw-p 00000000 00:00 0
7ffff7000000-7ffff7200000 r-xp 00000000 fe:01 2 /lib/libc.so.6
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0 [stack]
",
        )
        .unwrap();
        let target = 0x5555_5555_5000;
        let c = near_candidates(&maps, target);
        assert!(!c.is_empty());
        assert_eq!(c[0], 0x5555_5555_4000 - BLOCK, "right below the binary");
        for &a in &c {
            assert!(a.abs_diff(target) <= REACH && (a + BLOCK).abs_diff(target) <= REACH);
            assert!(
                maps.iter().all(|m| a + BLOCK <= m.start || a >= m.end),
                "{a:#x} overlaps"
            );
            assert_eq!(a % PAGE, 0);
        }
        let libc_target = 0x7fff_f710_0000;
        let c = near_candidates(&maps, libc_target);
        assert!(
            c.iter()
                .all(|&a| a + BLOCK <= 0x7fff_fffd_e000 - STACK_ROOM || a >= 0x7fff_ffff_f000)
        );
    }

    #[test]
    fn unreachable_target_has_no_candidates_when_everything_around_is_mapped() {
        let maps = parse_maps("10000-7ffffffff000 r-xp 00000000 00:00 0\n").unwrap();
        assert!(near_candidates(&maps, 0x4000_0000).is_empty());
    }
}
