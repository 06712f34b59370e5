//! Guest memory access: the only module of the VM that dereferences guest addresses.
//!
//! # Invariants
//!
//! - A [`GuestMemory`] holds the program's stack (owned, 8-byte aligned), the regions the host
//!   registered for the run, and the regions helpers granted. Every region it holds is valid,
//!   live memory of at least its length for as long as the `GuestMemory` exists: the stack
//!   because it owns it; host regions because [`GuestMemory::add_region`] is `unsafe` and its
//!   caller promises it; grants because [`crate::helper::CallEnv::grant`] is `unsafe` likewise.
//! - Every load, store and atomic first checks that `[addr, addr + len)` lies inside one region
//!   (and that the region is writable for stores). Nothing outside a region is ever touched:
//!   a failed check is a [`MemFault`], which the interpreter turns into a trap.
//! - Helpers reach guest memory through [`read_guest`], [`write_guest`] and [`grant`], given
//!   the interpreter's `GuestMemory` (checked like the program's own accesses) or null: under
//!   the JIT there is no region list and the pointer is trusted, which is the JIT's documented
//!   safety stance (programs are trusted to pass valid pointers to helpers).
//! - Plain accesses are unaligned reads/writes ([`std::ptr::read_unaligned`]); atomics require
//!   natural alignment (checked) and use `AtomicU32`/`AtomicU64` views of the location.
//! - Memory may be shared with other threads or processes (maps); we only ever form raw
//!   pointers or atomic references to it, never `&`/`&mut` to plain data.

use crate::helper::{Grants, MemRegion};
use crate::isa::AtomicOp;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes of stack per frame.
pub const FRAME_SIZE: usize = crate::verifier::STACK_SIZE;
/// Frames of stack (bpf-to-bpf calls nest at most this deep).
pub const MAX_FRAMES: usize = crate::verifier::MAX_CALL_DEPTH;

/// A failed access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemFault {
    /// Outside every region, or a store to a read-only region.
    OutOfBounds {
        /// Address.
        addr: u64,
        /// Bytes.
        len: u64,
        /// Was it a store.
        write: bool,
    },
    /// An atomic at an address that is not naturally aligned.
    Misaligned {
        /// Address.
        addr: u64,
        /// Bytes.
        len: u64,
    },
}

/// The memory one program run may touch.
#[derive(Debug)]
pub struct GuestMemory {
    stack: Box<[u64; FRAME_SIZE * MAX_FRAMES / 8]>,
    regions: Vec<MemRegion>,
    pub(crate) grants: Grants,
}

impl Default for GuestMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestMemory {
    /// Fresh memory: a zeroed stack and no regions.
    pub fn new() -> Self {
        GuestMemory {
            stack: Box::new([0; FRAME_SIZE * MAX_FRAMES / 8]),
            regions: Vec::new(),
            grants: Grants::default(),
        }
    }

    /// Address one past the end of frame `frame`'s stack (the value of r10 in that frame).
    /// Frame 0 is at the top, deeper frames below it.
    #[inline]
    pub fn frame_pointer(&self, frame: usize) -> u64 {
        let base = self.stack.as_ptr() as u64;
        base + (FRAME_SIZE * (MAX_FRAMES - frame)) as u64
    }

    /// Zeroes the stack and forgets host regions and grants, for a new run.
    pub fn reset(&mut self) {
        self.stack.fill(0);
        self.regions.clear();
        self.grants.clear();
    }

    /// Forgets host regions and grants but keeps the stack as it is (cheaper than
    /// [`GuestMemory::reset`] when one `GuestMemory` is reused for many runs).
    pub fn clear_regions(&mut self) {
        self.regions.clear();
        self.grants.clear();
    }

    /// Lets the program access `region`.
    ///
    /// # Safety
    /// `[region.start, region.start + region.len)` must be valid for reads (and for writes if
    /// `region.writable`) for as long as this `GuestMemory` is used to run programs, and not be
    /// accessed through a Rust reference during those runs.
    pub unsafe fn add_region(&mut self, region: MemRegion) {
        self.regions.push(region);
    }

    /// The host regions registered with [`GuestMemory::add_region`], in order (the JIT tests the
    /// first one inline in checked mode).
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// Forgets the regions helpers granted, keeping host regions and the stack (a new run).
    pub fn clear_grants(&mut self) {
        self.grants.clear();
    }

    /// The region — the stack, a host region or a grant — that holds `[addr, addr + len)`
    /// (writable if `write`), for callers that cache it (the JIT's checked mode: regions only
    /// grow during a run).
    pub fn region_of(&self, addr: u64, len: u64, write: bool) -> Option<MemRegion> {
        // The value a helper just granted first: the checker's window holds the context or
        // global data, so a value returned by a lookup is what usually misses it.
        if let Some(r) = self.grants.newest(addr, len, write) {
            return Some(r);
        }
        let stack = MemRegion {
            start: self.stack.as_ptr() as u64,
            len: (FRAME_SIZE * MAX_FRAMES) as u64,
            writable: true,
        };
        if stack.contains(addr, len, write) {
            return Some(stack);
        }
        self.regions
            .iter()
            .find(|r| r.contains(addr, len, write))
            .copied()
            .or_else(|| self.grants.find(addr, len, write))
    }

    #[inline]
    fn check(&self, addr: u64, len: u64, write: bool) -> Result<(), MemFault> {
        let base = self.stack.as_ptr() as u64;
        let stack = MemRegion {
            start: base,
            len: (FRAME_SIZE * MAX_FRAMES) as u64,
            writable: true,
        };
        if stack.contains(addr, len, write)
            || self.regions.iter().any(|r| r.contains(addr, len, write))
            || self.grants.allows(addr, len, write)
        {
            Ok(())
        } else {
            Err(MemFault::OutOfBounds { addr, len, write })
        }
    }

    /// Loads `len` (1, 2, 4 or 8) bytes, zero-extended.
    #[inline]
    pub fn load(&self, addr: u64, len: usize) -> Result<u64, MemFault> {
        self.check(addr, len as u64, false)?;
        let p = addr as *const u8;
        // SAFETY: `check` proved [addr, addr+len) lies in a region that is valid for reads (module
        // invariants); the read is unaligned-tolerant and of a plain integer type.
        let v = unsafe {
            match len {
                1 => u64::from(p.read()),
                2 => u64::from(p.cast::<u16>().read_unaligned()),
                4 => u64::from(p.cast::<u32>().read_unaligned()),
                _ => p.cast::<u64>().read_unaligned(),
            }
        };
        Ok(v)
    }

    /// Stores the low `len` (1, 2, 4 or 8) bytes of `val`.
    #[inline]
    pub fn store(&mut self, addr: u64, len: usize, val: u64) -> Result<(), MemFault> {
        self.check(addr, len as u64, true)?;
        let p = addr as *mut u8;
        // SAFETY: `check` proved [addr, addr+len) lies in a writable region valid for writes
        // (module invariants); the write is unaligned-tolerant and of a plain integer type.
        unsafe {
            match len {
                1 => p.write(val as u8),
                2 => p.cast::<u16>().write_unaligned(val as u16),
                4 => p.cast::<u32>().write_unaligned(val as u32),
                _ => p.cast::<u64>().write_unaligned(val),
            }
        }
        Ok(())
    }

    /// Atomic read-modify-write of 4 or 8 bytes. Returns the old value (zero-extended).
    /// For `CmpXchg`, `expected` is r0 and `val` the new value.
    pub fn atomic(
        &mut self,
        addr: u64,
        len: usize,
        op: AtomicOp,
        val: u64,
        expected: u64,
    ) -> Result<u64, MemFault> {
        self.check(addr, len as u64, true)?;
        if !addr.is_multiple_of(len as u64) {
            return Err(MemFault::Misaligned {
                addr,
                len: len as u64,
            });
        }
        const SEQ: Ordering = Ordering::SeqCst;
        if len == 4 {
            // SAFETY: checked in-bounds, writable, 4-byte aligned; only atomic views of guest
            // memory are formed (module invariants), so concurrent access is not a data race.
            let a = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
            let v = val as u32;
            let old = match op {
                AtomicOp::Add => a.fetch_add(v, SEQ),
                AtomicOp::Or => a.fetch_or(v, SEQ),
                AtomicOp::And => a.fetch_and(v, SEQ),
                AtomicOp::Xor => a.fetch_xor(v, SEQ),
                AtomicOp::Xchg => a.swap(v, SEQ),
                AtomicOp::CmpXchg => match a.compare_exchange(expected as u32, v, SEQ, SEQ) {
                    Ok(o) | Err(o) => o,
                },
            };
            Ok(u64::from(old))
        } else {
            // SAFETY: as above, 8-byte aligned.
            let a = unsafe { AtomicU64::from_ptr(addr as *mut u64) };
            let old = match op {
                AtomicOp::Add => a.fetch_add(val, SEQ),
                AtomicOp::Or => a.fetch_or(val, SEQ),
                AtomicOp::And => a.fetch_and(val, SEQ),
                AtomicOp::Xor => a.fetch_xor(val, SEQ),
                AtomicOp::Xchg => a.swap(val, SEQ),
                AtomicOp::CmpXchg => match a.compare_exchange(expected, val, SEQ, SEQ) {
                    Ok(o) | Err(o) => o,
                },
            };
            Ok(old)
        }
    }
}

/// Adds a grant to `mem` (no-op when null).
///
/// # Safety
/// `mem` is null or points to a live `GuestMemory` not otherwise borrowed during the call; the
/// region must be valid memory for the rest of the program run (see [`GuestMemory::add_region`]).
#[inline]
pub(crate) unsafe fn grant(mem: *mut GuestMemory, region: MemRegion) {
    // SAFETY: per the contract, `mem` is null or valid and unaliased for this call.
    if let Some(m) = unsafe { mem.as_mut() } {
        m.grants.grant(region);
    }
}

/// Regions granted so far (0 without a `GuestMemory`).
pub(crate) fn grants_len(mem: *mut GuestMemory) -> usize {
    // SAFETY: as in `read_guest`.
    unsafe { mem.as_ref() }.map_or(0, |m| m.grants.len())
}

/// Drops the grants after the first `len` (nothing without a `GuestMemory`).
pub(crate) fn truncate_grants(mem: *mut GuestMemory, len: usize) {
    // SAFETY: as in `read_guest`; no other reference to the memory is live during the call.
    if let Some(m) = unsafe { mem.as_mut() } {
        m.grants.truncate(len);
    }
}

/// Copies guest memory into `buf`; with a `GuestMemory`, only from permitted ranges.
#[inline]
pub(crate) fn read_guest(mem: *mut GuestMemory, addr: u64, buf: &mut [u8]) -> bool {
    // SAFETY: `mem` comes from `CallEnv`, which holds null or the interpreter's live memory,
    // unborrowed while a helper runs.
    if let Some(m) = unsafe { mem.as_ref() } {
        if m.check(addr, buf.len() as u64, false).is_err() {
            return false;
        }
    } else if addr == 0 && !buf.is_empty() {
        return false;
    }
    // SAFETY: either checked in a valid region above, or (JIT, unchecked) the program is trusted
    // to pass a valid pointer — the JIT's stance, documented in the module invariants.
    unsafe { std::ptr::copy(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
    true
}

/// Copies `data` into guest memory; with a `GuestMemory`, only into permitted ranges.
#[inline]
pub(crate) fn write_guest(mem: *mut GuestMemory, addr: u64, data: &[u8]) -> bool {
    // SAFETY: as in `read_guest`.
    if let Some(m) = unsafe { mem.as_ref() } {
        if m.check(addr, data.len() as u64, true).is_err() {
            return false;
        }
    } else if addr == 0 && !data.is_empty() {
        return false;
    }
    // SAFETY: as in `read_guest`, for writes.
    unsafe { std::ptr::copy(data.as_ptr(), addr as *mut u8, data.len()) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_outside_every_region_faults() {
        let m = GuestMemory::new();
        assert_eq!(
            m.load(0x1000, 8),
            Err(MemFault::OutOfBounds {
                addr: 0x1000,
                len: 8,
                write: false
            })
        );
    }

    #[test]
    fn stack_is_readable_and_writable_up_to_frame_pointer() {
        let mut m = GuestMemory::new();
        let fp = m.frame_pointer(0);
        m.store(fp - 8, 8, 0x1122).unwrap();
        assert_eq!(m.load(fp - 8, 8), Ok(0x1122));
        assert!(m.load(fp - 4, 8).is_err(), "straddles the top of the stack");
    }

    #[test]
    fn read_only_region_rejects_stores() {
        let mut buf = [1u8, 2, 3, 4];
        let mut m = GuestMemory::new();
        // SAFETY: `buf` outlives `m` and is not otherwise accessed while `m` is used.
        unsafe {
            m.add_region(MemRegion {
                start: buf.as_mut_ptr() as u64,
                len: 4,
                writable: false,
            })
        };
        let a = buf.as_ptr() as u64;
        assert_eq!(m.load(a, 4), Ok(0x04030201));
        assert!(m.store(a, 1, 0).is_err());
    }

    #[test]
    fn misaligned_atomic_faults() {
        let mut m = GuestMemory::new();
        let fp = m.frame_pointer(0);
        assert!(matches!(
            m.atomic(fp - 12, 8, AtomicOp::Add, 1, 0),
            Err(MemFault::Misaligned { .. })
        ));
    }
}
