//! Writes to the text of the running process.
//!
//! # Invariants
//!
//! - Callers hold the hook registry lock: one patch at a time, and nothing else in this crate
//!   writes code.
//! - Text pages are writable only between [`make_writable`] and [`Writable::restore`]; they
//!   keep execute permission throughout (other threads run them) and get back exactly the
//!   protection `/proc/self/maps` listed.
//! - Every store another thread may fetch instructions from is one atomic store: a single
//!   byte, or an aligned 8-byte (`lock cmpxchg`) or 16-byte (`lock cmpxchg16b`) block that
//!   contains all the changed bytes. Multi-store changes use the int3 protocol
//!   ([`write_instruction`]), each step separated by a core-serializing barrier on every CPU
//!   running this process (`membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`), as the kernel's
//!   `text_poke_bp` does with IPIs.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::Once;

use super::code_mem::PAGE;
use crate::AttachError;
use crate::procmaps::MapEntry;

/// The `int3` opcode.
pub(crate) const INT3: u8 = 0xcc;

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

static SYNC_CORE_INIT: Once = Once::new();
static SYNC_CORE: AtomicBool = AtomicBool::new(false);

/// Registers for `membarrier` core serialization (once per process). Call before patching.
pub(crate) fn init_sync_core() {
    SYNC_CORE_INIT.call_once(|| {
        // SAFETY: membarrier takes integer arguments only; QUERY and REGISTER change no memory.
        let supported = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
        if supported > 0 && supported & MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE != 0 {
            // SAFETY: as above.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                    0,
                    0,
                )
            };
            SYNC_CORE.store(rc == 0, Ordering::Release);
        }
    });
}

/// Makes every CPU currently running a thread of this process execute a core-serializing
/// instruction, so none keeps executing stale prefetched code. Without kernel support this is
/// a plain fence; x86 cores also snoop stores to lines they have fetched.
pub(crate) fn sync_cores() {
    if SYNC_CORE.load(Ordering::Acquire) {
        // SAFETY: integer arguments only; the command was registered in `init_sync_core`.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
    } else {
        core::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// Pages made writable for a patch, with the protection to give back.
#[derive(Debug)]
#[must_use = "the pages stay writable until restored"]
pub(crate) struct Writable {
    pages: [(usize, i32); 2],
    count: usize,
}

/// Adds write permission to the pages holding `[addr, addr + len)`.
pub(crate) fn make_writable(
    maps: &[MapEntry],
    addr: usize,
    len: usize,
) -> Result<Writable, AttachError> {
    let first = addr & !(PAGE - 1);
    let last = (addr + len - 1) & !(PAGE - 1);
    let mut w = Writable {
        pages: [(0, 0); 2],
        count: 0,
    };
    for page in [first, last] {
        if w.count == 1 && page == first {
            break;
        }
        let prot = maps
            .iter()
            .find(|m| m.contains(page))
            .map(MapEntry::prot)
            .ok_or(AttachError::NotMapped { addr: page })?;
        w.pages[w.count] = (page, prot);
        w.count += 1;
    }
    for i in 0..w.count {
        let (page, prot) = w.pages[i];
        // SAFETY: `page` is a mapped text page (listed in maps); adding PROT_WRITE and keeping
        // the rest changes no memory and keeps it executable for threads running it.
        let rc =
            unsafe { libc::mprotect(page as *mut libc::c_void, PAGE, prot | libc::PROT_WRITE) };
        if rc != 0 {
            let err = AttachError::last_os("mprotect(text, +PROT_WRITE)");
            w.count = i;
            let _ = w.restore();
            return Err(err);
        }
    }
    Ok(w)
}

impl Writable {
    /// Gives the pages their original protection back.
    pub(crate) fn restore(self) -> Result<(), AttachError> {
        let mut result = Ok(());
        for &(page, prot) in &self.pages[..self.count] {
            // SAFETY: restores the protection `make_writable` found on this page.
            let rc = unsafe { libc::mprotect(page as *mut libc::c_void, PAGE, prot) };
            if rc != 0 && result.is_ok() {
                result = Err(AttachError::last_os("mprotect(text, original protection)"));
            }
        }
        result
    }
}

/// Reads `N` code bytes at `addr`.
pub(crate) fn read<const N: usize>(addr: usize, len: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate().take(len) {
        // SAFETY: callers pass bytes of a hook's patch site, inside a mapped text page (checked
        // when the hook was installed; text is never unmapped while hooked).
        *b = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
    }
    out
}

/// One atomic byte store to (writable) text.
pub(crate) fn store_byte(addr: usize, value: u8) {
    // SAFETY: `addr` lies in a page made writable by `make_writable` (caller holds the
    // `Writable`); other threads only execute these bytes, and the store is a single atomic byte.
    let cell = unsafe { AtomicU8::from_ptr(addr as *mut u8) };
    cell.store(value, Ordering::Release);
}

/// Writes `bytes` at `addr` with one atomic store if they fit in an aligned 8- or 16-byte block.
/// Returns false (and writes nothing) otherwise.
pub(crate) fn store_block(addr: usize, bytes: &[u8]) -> bool {
    let off8 = addr & 7;
    if off8 + bytes.len() <= 8 {
        let block = addr - off8;
        // SAFETY: the 8-aligned block lies in pages made writable by `make_writable` (it is
        // within the page holding `addr`, since 8-byte blocks never straddle pages); other
        // threads only execute it; all our writes to it are atomic.
        let cell = unsafe { AtomicU64::from_ptr(block as *mut u64) };
        let mut old = cell.load(Ordering::Acquire);
        loop {
            let mut b = old.to_le_bytes();
            b[off8..off8 + bytes.len()].copy_from_slice(bytes);
            match cell.compare_exchange(
                old,
                u64::from_le_bytes(b),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => old = now,
            }
        }
    }
    let off16 = addr & 15;
    if off16 + bytes.len() <= 16 && std::is_x86_feature_detected!("cmpxchg16b") {
        let block = addr - off16;
        let mut old = u128::from_le_bytes(read::<16>(block, 16));
        loop {
            let mut b = old.to_le_bytes();
            b[off16..off16 + bytes.len()].copy_from_slice(bytes);
            // SAFETY: as for the 8-byte block: 16-aligned, inside a writable text page, and
            // the CPU supports cmpxchg16b (checked above).
            let seen = unsafe { cmpxchg16b(block as *mut u128, old, u128::from_le_bytes(b)) };
            if seen == old {
                return true;
            }
            old = seen;
        }
    }
    false
}

/// `lock cmpxchg16b [ptr]`: returns the value found (equal to `old` on success).
///
/// # Safety
/// `ptr` must be 16-aligned and writable, and the CPU must support cmpxchg16b.
unsafe fn cmpxchg16b(ptr: *mut u128, old: u128, new: u128) -> u128 {
    let (mut lo, mut hi) = (old as u64, (old >> 64) as u64);
    // SAFETY: the caller guarantees alignment, writability and CPU support. rbx cannot be an
    // asm operand, so the new low half is swapped into it and rbx restored afterwards.
    unsafe {
        core::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {new_lo}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    u128::from(lo) | (u128::from(hi) << 64)
}

/// Replaces the instruction bytes at `addr` by `new` so that a thread executing there sees the
/// old or the new instruction, never a mix: one atomic store when possible, else int3 at the
/// first byte, the tail, then the first byte. During the int3 window a thread executing `addr`
/// traps; the `SIGTRAP` handler (see `signals`) decides where it goes.
pub(crate) fn write_instruction(addr: usize, new: &[u8]) {
    if store_block(addr, new) {
        sync_cores();
        return;
    }
    store_byte(addr, INT3);
    sync_cores();
    for (i, &b) in new.iter().enumerate().skip(1) {
        store_byte(addr + i, b);
    }
    sync_cores();
    store_byte(addr, new[0]);
    sync_cores();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-write page to exercise the stores on (no code runs from it).
    fn page() -> usize {
        // SAFETY: fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }

    #[test]
    fn block_stores_change_only_the_given_bytes() {
        let p = page();
        for i in 0..64 {
            store_byte(p + i, i as u8);
        }
        assert!(store_block(p + 3, &[0xe9, 1, 2, 3, 4])); // 3..8: one 8-byte block
        assert_eq!(
            store_block(p + 20, &[0xe9, 1, 2, 3, 4]),
            std::is_x86_feature_detected!("cmpxchg16b")
        ); // 20..25: one 16-byte block
        assert!(!store_block(p + 32 + 13, &[0xe9, 1, 2, 3, 4])); // crosses a 16-byte block
        let got = read::<64>(p, 64);
        let mut want: Vec<u8> = (0..64).collect();
        want[3..8].copy_from_slice(&[0xe9, 1, 2, 3, 4]);
        if std::is_x86_feature_detected!("cmpxchg16b") {
            want[20..25].copy_from_slice(&[0xe9, 1, 2, 3, 4]);
        }
        assert_eq!(&got[..], &want[..]);
        write_instruction(p + 32 + 13, &[0xe9, 9, 9, 9, 9]);
        assert_eq!(read::<5>(p + 45, 5), [0xe9, 9, 9, 9, 9]);
        // SAFETY: unmaps the page mapped above; nothing refers to it any more.
        unsafe { libc::munmap(p as *mut libc::c_void, PAGE) };
    }
}
