//! Per-thread records that generated code finds from the thread pointer alone, without a
//! thread-local access (which costs a `__tls_get_addr` call in a `cdylib` such as the agent,
//! and Rust code that may clobber vector registers).
//!
//! A fixed table of [`ThreadRec`]s, open addressing: a thread's record is among the
//! [`PROBES`] records from `hash(tp)` on (no wrap-around: the table has `PROBES - 1` spare
//! records at its end), its `tp` word holding the thread pointer (`fs:[0]`, which the x86_64
//! TLS ABI makes the thread pointer itself). [`emit_lookup`] emits the search for generated
//! code; [`current`] is the same search in Rust, [`current_or_insert`] also claims a record.
//!
//! # Invariants
//!
//! - A record's `tp` word goes empty (0) → reserved → the owner's thread pointer (claimed by a
//!   compare-and-swap from empty or a tombstone), and back to a tombstone when its thread
//!   exits (a `pthread_key_create` destructor) or, in a forked child, when it belonged to a
//!   thread that does not exist there. A live thread's pointer is unique among live threads,
//!   so at most one published record matches it... except that a signal handler on the
//!   same thread that claims a record while the interrupted code is between reserving and
//!   publishing claims a second, later one: lookups then find the first one published in
//!   probe order, and the thread's destructor retires both.
//! - Every other field of a record is read and written only by its owner thread (and its
//!   signal handlers), so plain loads and stores suffice; they are atomics only to be shared
//!   through a `static`.
//! - Records are never freed: the table is a `static`.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use iced_x86::IcedError;
use iced_x86::code_asm::{AsmRegister64, CodeAssembler, CodeLabel, qword_ptr};

/// Records: 4096 threads can have one at once (more, and generated code takes its slow path).
const TABLE: usize = 4096;
/// Records a lookup examines.
pub(crate) const PROBES: usize = 8;
const EMPTY: u64 = 0;
const TOMBSTONE: u64 = 1;
const RESERVED: u64 = 2;

/// One thread's record.
#[repr(C, align(32))]
#[derive(Debug)]
pub(crate) struct ThreadRec {
    /// The owner's thread pointer (or empty, reserved, a tombstone).
    pub tp: AtomicU64,
    /// Return probes: the thread's slot chunk + 1 (0: none yet).
    pub chunk: AtomicU64,
    /// Return probes: which slots of the chunk hold pending returns.
    pub mask: AtomicU64,
    /// Non-zero while the thread must not run programs natively: it is running programs on
    /// the host's side (a helper's calls into hooked code or system calls are not traced, as
    /// the handlers skip them), or it is excluded for good (the agent's own thread).
    pub busy: AtomicU64,
}

/// Offsets of the fields, for generated code.
pub(crate) const REC_SIZE: i32 = size_of::<ThreadRec>() as i32;
pub(crate) const REC_CHUNK: i32 = core::mem::offset_of!(ThreadRec, chunk) as i32;
pub(crate) const REC_MASK: i32 = core::mem::offset_of!(ThreadRec, mask) as i32;
pub(crate) const REC_BUSY: i32 = core::mem::offset_of!(ThreadRec, busy) as i32;
const _: () = assert!(REC_SIZE == 32);

pub(crate) static RECS: [ThreadRec; TABLE + PROBES - 1] = [const {
    ThreadRec {
        tp: AtomicU64::new(EMPTY),
        chunk: AtomicU64::new(0),
        mask: AtomicU64::new(0),
        busy: AtomicU64::new(0),
    }
}; TABLE + PROBES - 1];

/// The multiplier of the hash (Fibonacci hashing; the top 12 bits index the table).
pub(crate) const MUL: u64 = 0x9e37_79b9_7f4a_7c15;
pub(crate) const SHIFT: u32 = 64 - TABLE.trailing_zeros();

fn first(tp: u64) -> usize {
    (tp.wrapping_mul(MUL) >> SHIFT) as usize
}

/// The calling thread's thread pointer (`fs:[0]`).
pub(crate) fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: the x86_64 TLS ABI (variant II, which glibc and musl follow) makes fs:[0] hold
    // the thread pointer itself, for every thread of a process with a C runtime; the load
    // reads only that word, writes no memory and leaves the flags alone.
    unsafe {
        core::arch::asm!(
            "mov {}, qword ptr fs:[0]",
            out(reg) tp,
            options(nostack, readonly, preserves_flags),
        );
    }
    tp
}

/// The calling thread's record, if it has one.
pub(crate) fn current() -> Option<&'static ThreadRec> {
    let tp = thread_pointer();
    let i = first(tp);
    RECS[i..i + PROBES]
        .iter()
        .find(|r| r.tp.load(Ordering::Acquire) == tp)
}

/// The calling thread's record, claimed now if it has none; `None` when the records around
/// its hash are all taken (callers then do without: their generated fast paths miss too).
pub(crate) fn current_or_insert() -> Option<&'static ThreadRec> {
    if let Some(r) = current() {
        return Some(r);
    }
    let tp = thread_pointer();
    let i = first(tp);
    for r in &RECS[i..i + PROBES] {
        let cur = r.tp.load(Ordering::Relaxed);
        if (cur == EMPTY || cur == TOMBSTONE)
            && r.tp
                .compare_exchange(cur, RESERVED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            r.chunk.store(0, Ordering::Relaxed);
            r.mask.store(0, Ordering::Relaxed);
            r.busy.store(0, Ordering::Relaxed);
            r.tp.store(tp, Ordering::Release);
            arm_destructor();
            return Some(r);
        }
    }
    None
}

/// Marks the calling thread busy (its record's `busy` count) until the guard drops: the native
/// paths of hooks and system call sites send it to their handlers meanwhile. Nests.
#[derive(Debug)]
#[must_use = "the thread is busy only while the guard lives"]
pub struct NativeBusy(Option<&'static ThreadRec>);

/// Whether a native entry was ever set in this process (hooks, returns, system call
/// numbers): until then no native path can run, and [`NativeBusy::enter`] does nothing.
static NATIVE_USED: AtomicBool = AtomicBool::new(false);

/// Notes that a native entry is being set (before it is published).
pub(crate) fn native_used() {
    NATIVE_USED.store(true, Ordering::SeqCst);
}

impl NativeBusy {
    /// Marks the calling thread busy (a no-op when no record can be had for it: the native
    /// paths then cannot find it either, and take the handlers; and while no native entry was
    /// ever set in the process, nothing could look).
    pub fn enter() -> Self {
        if !NATIVE_USED.load(Ordering::Relaxed) {
            return NativeBusy(None);
        }
        let r = current_or_insert();
        if let Some(r) = r {
            // Owner-only field: a plain read-modify-write (a signal handler nests inside).
            r.busy
                .store(r.busy.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            core::sync::atomic::compiler_fence(Ordering::SeqCst);
        }
        NativeBusy(r)
    }

    /// Keeps the calling thread busy for good (the agent's own threads).
    pub fn forever(self) {
        core::mem::forget(self);
    }

    /// [`NativeBusy::enter`] even before any native entry was set (for threads that must be
    /// busy whenever one appears: the agent's own).
    pub fn enter_always() -> Self {
        let r = current_or_insert();
        if let Some(r) = r {
            r.busy
                .store(r.busy.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            core::sync::atomic::compiler_fence(Ordering::SeqCst);
        }
        NativeBusy(r)
    }
}

impl Drop for NativeBusy {
    fn drop(&mut self) {
        if let Some(r) = self.0 {
            core::sync::atomic::compiler_fence(Ordering::SeqCst);
            r.busy.store(
                r.busy.load(Ordering::Relaxed).saturating_sub(1),
                Ordering::Relaxed,
            );
        }
    }
}

/// Whether the native paths consider the calling thread busy (see [`NativeBusy`]).
pub fn thread_is_busy() -> bool {
    current().is_some_and(|r| r.busy.load(Ordering::Relaxed) != 0)
}

/// `pthread_key_t` whose destructor retires the exiting thread's records (u32::MAX: none).
static KEY: AtomicU32 = AtomicU32::new(u32::MAX);

fn arm_destructor() {
    let mut key = KEY.load(Ordering::Acquire);
    if key == u32::MAX {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        key = KEY.load(Ordering::Acquire);
        if key == u32::MAX {
            let mut k: libc::pthread_key_t = 0;
            // SAFETY: valid output pointer; the destructor is an `extern "C" fn(*mut c_void)`.
            if unsafe { libc::pthread_key_create(&mut k, Some(retire)) } != 0 {
                return;
            }
            // A forked child keeps only the forking thread: the others' records go.
            // SAFETY: `forget_other_threads` is an `extern "C" fn()` safe in a fresh child.
            unsafe { libc::pthread_atfork(None, None, Some(forget_other_threads)) };
            KEY.store(k, Ordering::Release);
            key = k;
        }
    }
    // SAFETY: `key` came from pthread_key_create; the value is only a non-null marker.
    unsafe { libc::pthread_setspecific(key, core::ptr::dangling::<c_void>()) };
}

/// Thread exit: the thread's records become tombstones (its pending returns died with its
/// stack; the return probes' own destructor gives the chunk back).
extern "C" fn retire(_: *mut c_void) {
    let tp = thread_pointer();
    let i = first(tp);
    for r in &RECS[i..i + PROBES] {
        let _ =
            r.tp.compare_exchange(tp, TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

extern "C" fn forget_other_threads() {
    let tp = thread_pointer();
    for r in &RECS {
        let cur = r.tp.load(Ordering::Relaxed);
        if cur > RESERVED && cur != tp {
            r.tp.store(TOMBSTONE, Ordering::Relaxed);
        }
    }
}

/// Emits the search for the calling thread's record: `rec` = its address, or a jump to
/// `miss`. Clobbers `rec`, `tp` (left holding the thread pointer) and `n`, and the flags.
pub(crate) fn emit_lookup(
    a: &mut CodeAssembler,
    rec: AsmRegister64,
    tp: AsmRegister64,
    n: AsmRegister64,
    miss: CodeLabel,
) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut found = a.create_label();
    a.mov(tp, qword_ptr(0).fs())?;
    a.mov(rec, MUL)?;
    a.imul_2(rec, tp)?;
    a.shr(rec, SHIFT)?;
    a.shl(rec, REC_SIZE.trailing_zeros())?;
    a.mov(n, RECS.as_ptr() as u64)?;
    a.add(rec, n)?;
    a.mov(n, PROBES as u64)?;
    a.set_label(&mut next)?;
    a.cmp(qword_ptr(rec), tp)?;
    a.je(found)?;
    a.add(rec, REC_SIZE)?;
    a.dec(n)?;
    a.jne(next)?;
    a.jmp(miss)?;
    a.set_label(&mut found)?;
    Ok(())
}

/// Emits: jump to `busy` if the calling thread's record says it is busy; fall through when it
/// is not or has no record. Clobbers `rec`, `tp`, `n` and the flags.
pub(crate) fn emit_busy_check(
    a: &mut CodeAssembler,
    rec: AsmRegister64,
    tp: AsmRegister64,
    n: AsmRegister64,
    busy: CodeLabel,
) -> Result<(), IcedError> {
    let mut free = a.create_label();
    emit_lookup(a, rec, tp, n, free)?;
    a.cmp(qword_ptr(rec + REC_BUSY), 0)?;
    a.jne(busy)?;
    a.set_label(&mut free)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_its_own_record_and_exit_retires_it() {
        let mine = current_or_insert().expect("a record") as *const ThreadRec as usize;
        assert_eq!(
            current().map(|r| r as *const ThreadRec as usize),
            Some(mine)
        );
        let (theirs, tp) = std::thread::spawn(|| {
            let r = current_or_insert().expect("a record");
            (r as *const ThreadRec as usize, thread_pointer())
        })
        .join()
        .unwrap();
        assert_ne!(theirs, mine);
        // SAFETY: records live in a static for ever.
        let theirs = unsafe { &*(theirs as *const ThreadRec) };
        assert_ne!(theirs.tp.load(Ordering::Relaxed), tp, "retired at exit");
    }
}
