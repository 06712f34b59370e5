//! Return probes: the return trampolines, the per-thread record of pending returns, and the
//! unwind information that lets C++ exceptions (and `backtrace`) see through a trampoline.
//!
//! At a probed function's entry, [`entry_with_return`] takes a free *slot* of the calling
//! thread, saves the return address `[rsp]` and rsp in it, and replaces `[rsp]` by the slot's
//! return trampoline `T(k)`; the hook's stub then enters the function through `C(k)`, a
//! `call` that ends at `T(k)`, so the CPU's return stack predicts the return. When the function
//! returns into `T(k)`, the trampoline pushes `k`
//! and jumps to the common return stub (`stub::encode_return_stub`), which builds `pt_regs`
//! (rax = the return value, rsp = the caller's rsp) and calls [`dispatch`]; that runs the
//! return handler, frees the slot and hands back the original return address, where the stub
//! resumes with every register as the function left it (or as the handler changed it).
//!
//! Slots are global (`CHUNKS` chunks of [`SLOTS_PER_CHUNK`]); a thread takes one chunk on its
//! first return probe and gives it back when it exits (a `pthread_key_create` destructor).
//! Within the chunk a 64-bit mask in thread-local storage says which slots hold pending
//! returns — the thread's shadow stack, at most 64 deep like the kernel's
//! (`MAX_URETPROBE_DEPTH`). Because every slot has its own trampoline, the DWARF rule for
//! `T(k)` is static: "the caller's rip is saved at `&slot[k].orig_ret`, its rsp is rsp". One
//! `.eh_frame` table with a frame description per trampoline is registered with the unwinder
//! (`__register_frame`), so an exception thrown below a probed frame unwinds through it to the
//! real caller.
//!
//! Pending returns whose frames are gone — left by `longjmp`, a caught exception, or a
//! cancelled thread — are recognised as the kernel does (`arch_uretprobe_is_alive`): on a
//! stack that grows down, a slot whose saved rsp is at or below the current return slot
//! belongs to a dead frame. They are dropped on the next entry or return on that thread. The
//! exception is a tail call from one probed function into another: the return address at the
//! inner entry is then the outer's live trampoline at the same rsp (the kernel's
//! `RP_CHECK_CHAIN_CALL`); the outer slot is kept, the inner one returns into it, and both
//! handlers see the real return address.
//!
//! # Invariants
//!
//! - The trampolines, the common stub and the unwind table are written once, then made
//!   read-execute (code) or left untouched (table) for the life of the process. Slot memory is
//!   read-write and never unmapped, so a return through a trampoline always finds its slot.
//! - A slot's fields are written only by the thread owning its chunk, while its bit is set in
//!   that thread's mask; every step of setting a slot up or freeing it is a single store
//!   ordered by compiler fences, so a signal handler running a probe on the same thread in
//!   between sees either a free bit or a slot whose `sp` (`u64::MAX` while being written) keeps
//!   it from being pruned.
//! - A return site (`SITES`) is called only while its generation matches the one the slot
//!   recorded, with its in-flight count raised; [`unregister_site`] changes the generation
//!   first and then waits for the count to drain, so once it returns the handler never runs
//!   again for that site (the return itself still resumes at the right address).
//! - [`entry_with_return`] reads and writes `[rsp]` of the probed thread: callers hook only
//!   function entries, where rsp points at the return address (the uretprobe contract).

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, compiler_fence};
use std::sync::OnceLock;

use super::hook::HookHandler;
use super::stub;
use super::threads::{self, ThreadRec};
use crate::{AttachError, PtRegs};

/// Slots per chunk: the pending returns one thread can have (the kernel's limit is 64 too).
pub(crate) const SLOTS_PER_CHUNK: usize = 64;
/// Chunks: threads that can have pending returns at the same time.
const CHUNKS: usize = 256;
const SLOTS: usize = CHUNKS * SLOTS_PER_CHUNK;
/// Bytes per trampoline: two `int3`s, the call site `C(k)` = `call [rsp - 8]` (4 bytes), then
/// `T(k)` = `push imm32`, `jmp rel32` to the common stub. `C(k)` ends where `T(k)` starts, so a
/// hook's entry stub can enter the probed function through it: the `call` pushes `T(k)` as the
/// return address *and* on the CPU's return stack buffer, so the function's `ret` into `T(k)`
/// is predicted (and so is the common stub's `ret` to the real caller, whose entry is then
/// next on the return stack). `T(k) - 1`, the address unwinders look up, is inside the range.
pub(crate) const TRAMP_STRIDE: usize = 16;
/// Offset of `T(k)` in its 16 bytes.
const TRAMP_OFFSET: usize = 6;
/// Length of the `call qword ptr [rsp - 8]` just before `T(k)`.
pub(crate) const TRAMP_CALL_LEN: usize = 4;
const _: () = assert!(TRAMP_OFFSET > TRAMP_CALL_LEN && TRAMP_OFFSET + 10 == TRAMP_STRIDE);
/// Room for the common stub before the first trampoline.
const STUB_AREA: usize = 4096;
const CODE_LEN: usize = STUB_AREA + SLOTS * TRAMP_STRIDE;
/// Return sites that can exist at once.
pub(crate) const MAX_SITES: usize = 4096;

/// One pending return.
#[repr(C)]
struct Slot {
    /// The probed function's return address.
    orig_ret: AtomicU64,
    /// Where that return address was (rsp at the function's entry); `u64::MAX` while the slot
    /// is being filled.
    sp: AtomicU64,
    /// Return site index and its generation at entry.
    site: AtomicU32,
    generation: AtomicU32,
    _pad: u64,
}
const _: () = assert!(size_of::<Slot>() == 32);

/// A registered return handler.
#[repr(C)]
struct RetSite {
    handler: AtomicUsize,
    user: AtomicUsize,
    /// A native entry the common return stub calls instead of the handler (0: none; see
    /// [`set_site_native`]).
    native: AtomicUsize,
    /// Runs of `native` that trapped (counted by the common return stub).
    native_traps: AtomicU64,
    inflight: AtomicU64,
    generation: AtomicU32,
    used: AtomicBool,
}

static SITES: [RetSite; MAX_SITES] = [const {
    RetSite {
        handler: AtomicUsize::new(0),
        user: AtomicUsize::new(0),
        native: AtomicUsize::new(0),
        native_traps: AtomicU64::new(0),
        inflight: AtomicU64::new(0),
        generation: AtomicU32::new(0),
        used: AtomicBool::new(false),
    }
}; MAX_SITES];

/// What the generated fast paths need to know about slots and sites.
fn fast_layout(code: usize, data: usize) -> stub::RetLayout {
    stub::RetLayout {
        slots: data as u64,
        first: trampoline(code, 0) as u64,
        count: SLOTS as u64,
        slot_orig: core::mem::offset_of!(Slot, orig_ret) as i32,
        slot_sp: core::mem::offset_of!(Slot, sp) as i32,
        slot_site: core::mem::offset_of!(Slot, site) as i32,
        slot_generation: core::mem::offset_of!(Slot, generation) as i32,
        sites: SITES.as_ptr() as u64,
        site_count: MAX_SITES as u64,
        site_size: size_of::<RetSite>() as i32,
        site_native: core::mem::offset_of!(RetSite, native) as i32,
        site_native_traps: core::mem::offset_of!(RetSite, native_traps) as i32,
        site_inflight: core::mem::offset_of!(RetSite, inflight) as i32,
        site_generation: core::mem::offset_of!(RetSite, generation) as i32,
    }
}

/// The layout for stubs, once [`init`] succeeded.
pub(crate) fn layout() -> Option<stub::RetLayout> {
    let (code, data) = (CODE.load(Ordering::Acquire), DATA.load(Ordering::Acquire));
    (code != 0 && data != 0).then(|| fast_layout(code, data))
}

/// Makes the common return stub call `entry` (a `NativeEntry`'s address; 0: the handler
/// again) for site `i`'s returns, while the site is registered.
///
/// # Safety
/// `entry` follows the `NativeEntry` contract and stays valid until the site is unregistered.
pub(crate) unsafe fn set_site_native(i: u32, entry: usize) {
    SITES[i as usize].native.store(entry, Ordering::Release);
}

/// How many runs of site `i`'s native entry trapped since it was registered.
pub(crate) fn site_native_traps(i: u32) -> u64 {
    SITES[i as usize].native_traps.load(Ordering::Relaxed)
}

/// The pool, once made.
static CODE: AtomicUsize = AtomicUsize::new(0);
static DATA: AtomicUsize = AtomicUsize::new(0);
static INIT: OnceLock<Result<(), i32>> = OnceLock::new();
/// Free chunks: a tagged Treiber stack. Low 32 bits: chunk index + 1 (0 = empty); high 32
/// bits: a tag bumped on every change (no ABA).
static FREE_HEAD: AtomicU64 = AtomicU64::new(0);
static FREE_NEXT: [AtomicU32; CHUNKS] = [const { AtomicU32::new(0) }; CHUNKS];
/// `pthread_key_t` whose destructor gives a thread's chunk back (u32::MAX: none).
static KEY: AtomicU32 = AtomicU32::new(u32::MAX);
/// Returns not probed because the thread had 64 pending or no chunk was free.
static MISSED: AtomicU64 = AtomicU64::new(0);

// A thread's shadow stack (its chunk and the mask of its pending slots) is in its
// `threads::ThreadRec`, which generated code finds without a thread-local access.

/// Return probes skipped since the process started (a thread had 64 pending returns, or 256
/// threads had pending returns at once).
pub(crate) fn missed() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

fn slot(k: usize) -> &'static Slot {
    let data = DATA.load(Ordering::Acquire);
    debug_assert!(data != 0 && k < SLOTS);
    // SAFETY: `data` is the slot array of SLOTS 32-byte, 8-aligned `Slot`s, mapped read-write
    // for the life of the process (module invariants); all fields are atomics.
    unsafe { &*((data + k * size_of::<Slot>()) as *const Slot) }
}

/// Address of slot `k`'s trampoline (what the probed function returns into).
fn trampoline(code: usize, k: usize) -> usize {
    code + STUB_AREA + k * TRAMP_STRIDE + TRAMP_OFFSET
}

/// `T(0)` and the number of trampolines (`T(k)` = `T(0) + k *` [`TRAMP_STRIDE`]), once
/// [`init`] succeeded.
pub(crate) fn trampolines() -> Option<(u64, u64)> {
    let code = CODE.load(Ordering::Acquire);
    (code != 0).then(|| (trampoline(code, 0) as u64, SLOTS as u64))
}

/// Makes the trampolines, the common stub and the unwind table (once per process).
pub(crate) fn init() -> Result<(), AttachError> {
    let r = INIT.get_or_init(|| {
        // SAFETY: fresh anonymous private mappings at addresses of the kernel's choosing.
        let (code, data) = unsafe {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            let code = libc::mmap(core::ptr::null_mut(), CODE_LEN, rw, flags, -1, 0);
            let data = libc::mmap(
                core::ptr::null_mut(),
                SLOTS * size_of::<Slot>(),
                rw,
                flags,
                -1,
                0,
            );
            (code, data)
        };
        if code == libc::MAP_FAILED || data == libc::MAP_FAILED {
            return Err(errno());
        }
        let (code, data) = (code as usize, data as usize);
        super::code_mem::own_add(code, CODE_LEN);
        let stub = stub::encode_return_stub(
            code as u64,
            dispatch as *const () as u64,
            &fast_layout(code, data),
        )
        .map_err(|_| libc::EINVAL)?;
        if stub.len() > STUB_AREA {
            return Err(libc::E2BIG);
        }
        let mut bytes = vec![0xccu8; CODE_LEN];
        bytes[..stub.len()].copy_from_slice(&stub);
        for k in 0..SLOTS {
            let at = STUB_AREA + k * TRAMP_STRIDE;
            let t = &mut bytes[at..at + TRAMP_STRIDE];
            // C(k): call qword ptr [rsp - 8]
            t[2..6].copy_from_slice(&[0xff, 0x54, 0x24, 0xf8]);
            t[6] = 0x68; // T(k): push imm32
            t[7..11].copy_from_slice(&(k as u32).to_le_bytes());
            t[11] = 0xe9; // jmp rel32 to the stub
            let rel = code as i64 - (code + at + 16) as i64;
            t[12..16].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        // SAFETY: `code` is our fresh CODE_LEN-byte read-write mapping; nothing runs from it
        // yet. Afterwards it becomes read-execute and is never written again.
        let sealed = unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), code as *mut u8, CODE_LEN);
            libc::mprotect(
                code as *mut c_void,
                CODE_LEN,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if sealed != 0 {
            return Err(errno());
        }
        for c in (0..CHUNKS).rev() {
            push_free_chunk(c);
        }
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: valid output pointer; the destructor is an `extern "C" fn(*mut c_void)`.
        if unsafe { libc::pthread_key_create(&mut key, Some(release_chunk)) } == 0 {
            KEY.store(key, Ordering::Release);
        }
        DATA.store(data, Ordering::Release);
        CODE.store(code, Ordering::Release);
        let table = eh_frame(
            (code + STUB_AREA) as u64,
            data as u64 + core::mem::offset_of!(Slot, orig_ret) as u64,
            SLOTS,
        );
        // The table must live as long as the registration: for ever.
        let table: &'static [u8] = Box::leak(table.into_boxed_slice());
        // SAFETY: `table` is a well-formed .eh_frame section (CIE, one FDE per trampoline, a
        // zero terminator) that is never freed or changed.
        unsafe { __register_frame(table.as_ptr().cast()) };
        Ok(())
    });
    r.map_err(|errno| AttachError::Os {
        op: "setting up return trampolines",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

unsafe extern "C" {
    /// libgcc's (and LLVM libunwind's) registration of an `.eh_frame` section.
    fn __register_frame(begin: *const c_void);
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// An `.eh_frame` section describing `n` trampolines of [`TRAMP_STRIDE`] bytes from `first`:
/// in each, the CFA is rsp and the return address is saved at `ret_at + 32 * k` (the slot's
/// `orig_ret`). Little-endian, absolute pointers (`DW_EH_PE_absptr`).
pub(crate) fn eh_frame(first: u64, ret_at: u64, n: usize) -> Vec<u8> {
    const DW_CFA_DEF_CFA: u8 = 0x0c;
    const DW_CFA_EXPRESSION: u8 = 0x10;
    const DW_CFA_VAL_OFFSET: u8 = 0x14;
    const DW_OP_ADDR: u8 = 0x03;
    const RSP: u8 = 7;
    const RIP: u8 = 16;
    let mut out = Vec::with_capacity(32 + n * 40);
    // CIE: length, id 0, version 1, "zR", code align 1, data align -8, ra column 16,
    // augmentation data (pointer encoding absptr), CFA = rsp + 8, the caller's rsp = CFA - 8
    // (= rsp: the trampoline frame takes no stack). The same rule holds on `C(k)`, where rsp
    // is already the caller's and the return address is in the slot. The CFA cannot be rsp itself: it
    // identifies the caller's frame to the unwinder (`uw_identify_context`) and would then
    // equal the probed function's CFA — a handler in the direct caller would be "found" one
    // frame early and libgcc aborts in phase 2.
    #[rustfmt::skip]
    let cie_body: &[u8] = &[
        0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, RIP, 1, 0x00,
        DW_CFA_DEF_CFA, RSP, 8,
        DW_CFA_VAL_OFFSET, RSP, 1,
        0,
    ];
    out.extend_from_slice(&(cie_body.len() as u32).to_le_bytes());
    out.extend_from_slice(cie_body);
    for k in 0..n {
        let at = out.len();
        let mut fde = Vec::with_capacity(40);
        fde.extend_from_slice(&[0; 4]); // length, below
        fde.extend_from_slice(&((at + 4) as u32).to_le_bytes()); // back to the CIE at 0
        fde.extend_from_slice(&(first + (k * TRAMP_STRIDE) as u64).to_le_bytes());
        fde.extend_from_slice(&(TRAMP_STRIDE as u64).to_le_bytes());
        fde.push(0); // augmentation data length
        fde.extend_from_slice(&[DW_CFA_EXPRESSION, RIP, 9, DW_OP_ADDR]);
        fde.extend_from_slice(&(ret_at + (k * size_of::<Slot>()) as u64).to_le_bytes());
        while fde.len() % 8 != 0 {
            fde.push(0); // DW_CFA_nop
        }
        let len = (fde.len() - 4) as u32;
        fde[..4].copy_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&fde);
    }
    out.extend_from_slice(&[0; 4]);
    out
}

fn push_free_chunk(c: usize) {
    let mut head = FREE_HEAD.load(Ordering::Acquire);
    loop {
        FREE_NEXT[c].store(head as u32, Ordering::Relaxed);
        let new = ((head >> 32).wrapping_add(1) << 32) | (c as u64 + 1);
        match FREE_HEAD.compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

fn pop_free_chunk() -> Option<usize> {
    let mut head = FREE_HEAD.load(Ordering::Acquire);
    loop {
        let top = head as u32;
        if top == 0 {
            return None;
        }
        let next = FREE_NEXT[top as usize - 1].load(Ordering::Relaxed);
        let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(next);
        match FREE_HEAD.compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(top as usize - 1),
            Err(h) => head = h,
        }
    }
}

/// Thread exit: the thread's pending returns died with its stack; its chunk goes back.
extern "C" fn release_chunk(value: *mut c_void) {
    let c = value as usize;
    if c == 0 || c > CHUNKS {
        return;
    }
    // (The thread's record may be retired already: then nothing refers to the chunk.)
    if let Some(t) = threads::current()
        && t.chunk.load(Ordering::Relaxed) as usize == c
    {
        t.chunk.store(0, Ordering::Relaxed);
        t.mask.store(0, Ordering::Relaxed);
    }
    push_free_chunk(c - 1);
}

/// This thread's chunk, taking one if it has none.
fn my_chunk(t: &ThreadRec) -> Option<usize> {
    let c = t.chunk.load(Ordering::Relaxed);
    if c != 0 {
        return Some(c as usize - 1);
    }
    let c = pop_free_chunk()?;
    t.mask.store(0, Ordering::Relaxed);
    t.chunk.store(c as u64 + 1, Ordering::Relaxed);
    let key = KEY.load(Ordering::Acquire);
    if key != u32::MAX {
        // SAFETY: `key` came from pthread_key_create; the value is a small integer, never
        // dereferenced (the destructor decodes it).
        unsafe { libc::pthread_setspecific(key, (c + 1) as *const c_void) };
    }
    Some(c)
}

/// Clears the bits of `used` whose slots (in `chunk`) belong to frames that are gone: saved
/// rsp `<= limit`.
fn prune(chunk: usize, used: u64, limit: u64) -> u64 {
    let mut keep = used;
    let mut bits = used;
    while bits != 0 {
        let j = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        if slot(chunk * SLOTS_PER_CHUNK + j).sp.load(Ordering::Relaxed) <= limit {
            keep &= !(1 << j);
        }
    }
    keep
}

/// Registers a return handler; returns its site index and generation.
/// Callers hold the hook registry lock.
pub(crate) fn register_site(
    handler: HookHandler,
    user: *mut c_void,
) -> Result<(u32, u32), AttachError> {
    let (i, site) = SITES
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, s)| !s.used.load(Ordering::Acquire))
        .ok_or(AttachError::TooManyReturnProbes {
            limit: MAX_SITES - 1,
        })?;
    site.handler.store(handler as usize, Ordering::Relaxed);
    site.user.store(user as usize, Ordering::Relaxed);
    site.native.store(0, Ordering::Relaxed);
    site.native_traps.store(0, Ordering::Relaxed);
    let mut generation = site.generation.load(Ordering::Relaxed).wrapping_add(1);
    if generation == 0 {
        generation = 1;
    }
    site.generation.store(generation, Ordering::SeqCst);
    site.used.store(true, Ordering::Release);
    Ok((i as u32, generation))
}

/// Stops calling site `i`'s handler; returns once no thread runs it.
/// Callers hold the hook registry lock.
pub(crate) fn unregister_site(i: u32) {
    let site = &SITES[i as usize];
    site.native.store(0, Ordering::SeqCst);
    site.generation.fetch_add(1, Ordering::SeqCst);
    while site.inflight.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    site.used.store(false, Ordering::Release);
}

/// What a hook with a return probe passes its stub as `user`.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct ProbeCtx {
    pub entry: Option<HookHandler>,
    /// The probe's `user` pointer, as an address (so hooks stay `Send`).
    pub user: usize,
    pub site: u32,
    pub generation: u32,
}

/// The entry handler of a hook with a return probe: arms the return, then runs the entry
/// handler (which may redirect the function, e.g. return at once — through the trampoline).
pub(crate) extern "C" fn entry_with_return(regs: &mut PtRegs, ctx: *mut c_void) {
    // SAFETY: the hook passes its boxed `ProbeCtx`, alive until the hook is removed.
    let ctx = unsafe { &*(ctx as *const ProbeCtx) };
    arm(regs.rsp, ctx.site, ctx.generation);
    if let Some(h) = ctx.entry {
        h(regs, ctx.user as *mut c_void);
    }
}

/// The return half of [`entry_with_return`], for a stub that ran the entry program natively
/// and could not arm the return inline.
pub(crate) extern "C" fn arm_only(regs: &mut PtRegs, ctx: *mut c_void) {
    // SAFETY: the hook passes its boxed `ProbeCtx`, alive until the hook is removed.
    let ctx = unsafe { &*(ctx as *const ProbeCtx) };
    arm(regs.rsp, ctx.site, ctx.generation);
}

/// Takes a slot for the return whose address is at `sp` and points `[sp]` at its trampoline.
fn arm(sp: u64, site: u32, generation: u32) {
    let code = CODE.load(Ordering::Acquire);
    if code == 0
        || !threads::current_or_insert().is_some_and(|t| arm_on(t, code, sp, site, generation))
    {
        MISSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// [`arm`] on this thread's shadow stack `t`; false if no slot was free.
fn arm_on(t: &ThreadRec, code: usize, sp: u64, site: u32, generation: u32) -> bool {
    let Some(chunk) = my_chunk(t) else {
        return false;
    };
    // SAFETY: `sp` is rsp at a probed function's entry (module invariants): it points at the
    // return address on this thread's stack.
    let ret = unsafe { core::ptr::read_volatile(sp as *const u64) };
    // A tail call from another probed function: its pending return is at this same `sp` and
    // still alive (the kernel's `RP_CHECK_CHAIN_CALL`); the new return goes through it.
    let limit = if chained(t, code, chunk, sp, ret) {
        sp - 1
    } else {
        sp
    };
    let used = prune(chunk, t.mask.load(Ordering::Relaxed), limit);
    t.mask.store(used, Ordering::Relaxed);
    if used == u64::MAX {
        return false;
    }
    let j = (!used).trailing_zeros() as usize;
    let k = chunk * SLOTS_PER_CHUNK + j;
    let s = slot(k);
    s.sp.store(u64::MAX, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    t.mask
        .store(t.mask.load(Ordering::Relaxed) | 1 << j, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    s.orig_ret.store(ret, Ordering::Relaxed);
    s.site.store(site, Ordering::Relaxed);
    s.generation.store(generation, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    s.sp.store(sp, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above; the function will return through the trampoline of slot `k`.
    unsafe { core::ptr::write_volatile(sp as *mut u64, trampoline(code, k) as u64) };
    true
}

/// Whether `ret`, the return address at `sp`, is the trampoline of a pending return of this
/// thread made at the same `sp` (the function was entered by a tail call from a probed one).
fn chained(t: &ThreadRec, code: usize, chunk: usize, sp: u64, ret: u64) -> bool {
    slot_of(code, ret).is_some_and(|k| {
        k / SLOTS_PER_CHUNK == chunk
            && t.mask.load(Ordering::Relaxed) & (1 << (k % SLOTS_PER_CHUNK)) != 0
            && slot(k).sp.load(Ordering::Relaxed) == sp
    })
}

/// The slot whose trampoline is at `addr`, if it is one.
fn slot_of(code: usize, addr: u64) -> Option<usize> {
    let off = addr.wrapping_sub(trampoline(code, 0) as u64);
    let k = off / TRAMP_STRIDE as u64;
    (off.is_multiple_of(TRAMP_STRIDE as u64) && k < SLOTS as u64).then_some(k as usize)
}

/// Called by the common return stub with `pt_regs` at the return (rsp = the caller's) and the
/// slot number its trampoline pushed. Returns the original return address.
extern "C" fn dispatch(regs: &mut PtRegs, k: u64) -> u64 {
    let k = k as usize;
    if k >= SLOTS || DATA.load(Ordering::Acquire) == 0 {
        // Only our trampolines enter here, each with its own number.
        std::process::abort();
    }
    let s = slot(k);
    let orig = s.orig_ret.load(Ordering::Relaxed);
    let (site, generation) = (
        s.site.load(Ordering::Relaxed),
        s.generation.load(Ordering::Relaxed),
    );
    let (chunk, j) = (k / SLOTS_PER_CHUNK, k % SLOTS_PER_CHUNK);
    if let Some(t) = threads::current()
        && t.chunk.load(Ordering::Relaxed) as usize == chunk + 1
    {
        // This slot is done, and so is every frame below the one returning now.
        let here = regs.rsp.wrapping_sub(8);
        let used = t.mask.load(Ordering::Relaxed) & !(1 << j);
        t.mask
            .store(prune(chunk, used, here.wrapping_sub(1)), Ordering::Relaxed);
    }
    // After a chained tail call `orig` is the outer probe's trampoline: the handler sees the
    // real return address, as the kernel reports it.
    regs.rip = orig;
    let code = CODE.load(Ordering::Acquire);
    for _ in 0..SLOTS_PER_CHUNK {
        match slot_of(code, regs.rip) {
            Some(j) => regs.rip = slot(j).orig_ret.load(Ordering::Relaxed),
            None => break,
        }
    }
    if let Some(site) = SITES.get(site as usize) {
        site.inflight.fetch_add(1, Ordering::SeqCst);
        if site.generation.load(Ordering::SeqCst) == generation {
            let handler = site.handler.load(Ordering::Relaxed);
            let user = site.user.load(Ordering::Relaxed) as *mut c_void;
            // SAFETY: a registered site stores a `HookHandler` (register_site); its generation
            // still matches, so `user` is valid until our in-flight count drops.
            let handler: HookHandler = unsafe { core::mem::transmute(handler) };
            handler(regs, user);
        }
        site.inflight.fetch_sub(1, Ordering::Release);
    }
    orig
}

/// Number of returns this thread has pending (for tests).
pub(crate) fn pending() -> u32 {
    threads::current().map_or(0, |t| t.mask.load(Ordering::Relaxed).count_ones())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eh_frame_layout() {
        let t = eh_frame(0x1000, 0x9000, 2);
        let cie_len = u32::from_le_bytes(t[..4].try_into().unwrap()) as usize;
        assert_eq!(&t[8..12], &[1, b'z', b'R', 0]);
        let fde = &t[4 + cie_len..];
        let len = u32::from_le_bytes(fde[..4].try_into().unwrap()) as usize;
        assert_eq!((4 + len) % 8, 0);
        // CIE pointer: distance back to the CIE's start.
        assert_eq!(
            u32::from_le_bytes(fde[4..8].try_into().unwrap()) as usize,
            4 + cie_len + 4
        );
        assert_eq!(u64::from_le_bytes(fde[8..16].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(fde[16..24].try_into().unwrap()), 16);
        assert_eq!(&fde[24..29], &[0, 0x10, 16, 9, 0x03]);
        assert_eq!(u64::from_le_bytes(fde[29..37].try_into().unwrap()), 0x9000);
        let fde2 = &fde[4 + len..];
        assert_eq!(u64::from_le_bytes(fde2[8..16].try_into().unwrap()), 0x1010);
        assert_eq!(u64::from_le_bytes(fde2[29..37].try_into().unwrap()), 0x9020);
        assert_eq!(&fde2[4 + len..], &[0, 0, 0, 0], "zero terminator");
    }
}
