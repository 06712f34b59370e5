//! Intercepting the system calls a library makes: per-site stubs and one process-wide gate.
//!
//! Each patched site (see [`super::sites`]) jumps to its own stub:
//!
//! ```text
//! stub:  <relocated instructions of the window before the syscall>
//! call:  lea rsp, [rsp-128]          ; keep the red zone of the interrupted code
//!        mov r11, <site descriptor>  ; rcx and r11 are free: `syscall` clobbers them anyway
//!        mov rcx, <gate>
//!        call rcx                    ; the gate returns here, or to `native`
//!        lea rsp, [rsp+128]
//!        jmp post
//! native: lea rsp, [rsp+128]
//!        syscall                     ; calls that must run on the caller's registers and stack
//! post:  <relocated instructions of the window after the syscall>
//!        jmp <end of the window>
//! ```
//!
//! The gate saves the caller-saved general-purpose registers (and rbx, its frame pointer;
//! `gate_main` keeps the others, as the ABI has it), the arithmetic flags (`lahf`/`seto`, not
//! `pushfq`, which costs more than the rest of the gate; the direction flag is cleared for the
//! handlers and left clear, as the ABI has it at every call) and xmm0–xmm15, and calls
//! `gate_main`, which builds a [`SyscallCall`] (number in rax, arguments in rdi, rsi, rdx, r10,
//! r8, r9), calls the enter handler (which may skip the call and set its result), makes the
//! system call from its own `syscall` instruction, calls the exit handler with the result and
//! puts the result in rax (rcx and r11 get what `syscall` leaves there: the return address and
//! the flags). Calls that must not run inside the gate's frame (`clone`, `clone3`, `fork`,
//! `vfork`, `rt_sigreturn`, reached through a site whose number is only known at run time) get
//! their enter handler, then return to `native` with every register as it was, and run there
//! with no exit handler.
//!
//! # Invariants
//!
//! - Stubs and descriptors are written once, sealed (read-execute code page) and never
//!   unmapped; re-patching a site reuses its stub, so attach/detach cycles allocate nothing.
//! - Patching and unpatching hold the hook engine's registry lock (one patch at a time in the
//!   process, no overlap with uprobe hooks), make the text page writable only while writing,
//!   and use the engine's protocol: int3 on the first byte (trapping threads go to the stub),
//!   stop the world, move threads suspended at an inner instruction boundary of the window
//!   (e.g. a call interrupted with `EINTR` returns after the `syscall` instruction) to the
//!   matching stub instruction, write the jump, release.
//! - The gate's hot path takes no lock and allocates nothing; the handlers it calls are plain
//!   `extern "C"` functions set once with [`set_handlers`].

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::path::{Path, PathBuf};

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, MemoryOperand, Register,
};

use super::sites::{self, NEVER_PATCHED, Site};
use super::table::NR_MAX;
use crate::AttachError;
use crate::procmaps::{MapEntry, read_self_maps};
use crate::x86_64::code_mem::{self, CodeBlock, PAGE};
use crate::x86_64::hook::{Range, registry};
use crate::x86_64::patch::{self, INT3};
use crate::x86_64::signals::{self, Fixup};

/// One system call as the gate sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SyscallCall {
    /// The number (rax).
    pub nr: u64,
    /// The arguments (rdi, rsi, rdx, r10, r8, r9).
    pub args: [u64; 6],
    /// The result: set by the enter handler together with `skip`, else the kernel's.
    pub ret: i64,
    /// Set to non-zero by the enter handler: do not make the call; its result is `ret`.
    pub skip: u64,
    /// Address of the `syscall` instruction in the library.
    pub site: u64,
}

/// Called before each intercepted system call, on the calling thread.
pub type EnterHandler = extern "C" fn(call: &mut SyscallCall);
/// Called after each intercepted system call that returns (not after `exit`, a successful
/// `execve`, or the calls run natively), with `ret` set.
pub type ExitHandler = extern "C" fn(call: &SyscallCall);

pub(super) static ENTER: AtomicUsize = AtomicUsize::new(0);
pub(super) static EXIT: AtomicUsize = AtomicUsize::new(0);

/// Sets the handlers the gate calls (`None`: no call).
pub fn set_handlers(enter: Option<EnterHandler>, exit: Option<ExitHandler>) {
    ENTER.store(enter.map_or(0, |f| f as usize), Ordering::Release);
    EXIT.store(exit.map_or(0, |f| f as usize), Ordering::Release);
}

/// Programs the gate runs itself for one system call number: native entries
/// (`crate::NativeEntry`, called on the tracepoint's context: `sys_enter` 64 bytes, `sys_exit`
/// 24) with their tracepoint ids. See [`set_fast`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FastProgs {
    /// `syscalls:sys_enter_<name>` program's native entry (0: none).
    pub enter: u64,
    /// Its tracepoint id (the context's `common_type`).
    pub enter_id: u64,
    /// `syscalls:sys_exit_<name>` program's native entry (0: none).
    pub exit: u64,
    /// Its tracepoint id.
    pub exit_id: u64,
}

const FAST_ENTER: i32 = core::mem::offset_of!(FastProgs, enter) as i32;
const FAST_ENTER_ID: i32 = core::mem::offset_of!(FastProgs, enter_id) as i32;
const FAST_EXIT: i32 = core::mem::offset_of!(FastProgs, exit) as i32;
const FAST_EXIT_ID: i32 = core::mem::offset_of!(FastProgs, exit_id) as i32;

/// One number's fast programs (a `Box<FastProgs>` pointer, 0: none) and the gates using them.
#[repr(C, align(16))]
struct FastNr {
    progs: AtomicUsize,
    inflight: AtomicU64,
}

static FAST: [FastNr; NR_MAX] = [const {
    FastNr {
        progs: AtomicUsize::new(0),
        inflight: AtomicU64::new(0),
    }
}; NR_MAX];

/// Runs of fast programs that trapped ([`fast_traps`]).
static FAST_TRAPS: AtomicU64 = AtomicU64::new(0);

/// How many runs of the gate's own programs (`set_fast`) trapped, in this process, ever.
pub fn fast_traps() -> u64 {
    FAST_TRAPS.load(Ordering::Relaxed)
}

/// Makes the gate run `progs` itself for system call `nr` (from patched sites; `None`: the
/// handlers again), instead of calling the handlers: on a thread that is not busy
/// (`crate::x86_64::NativeBusy`), it builds the `sys_enter` context (with `common_pid` 0),
/// calls the enter entry, makes the call, builds the `sys_exit` context and calls the exit
/// entry, saving no vector register. Returns once no gate runs the previous programs any more.
/// False (and nothing changes) for a number out of range or one that must run on the
/// caller's own stack (`clone`, `fork`, `vfork`, `rt_sigreturn`, …).
///
/// # Safety
/// The entries must follow the `NativeEntry` contract, read no context byte they are not
/// given (the contexts' `common_pid` is 0: callers check the programs do not read it), and
/// stay valid until a later call for `nr` returned; their programs must not be meant to skip
/// the call or change its result (no `bpf_override_return`: the gate ignores what they
/// return).
pub unsafe fn set_fast(nr: u32, progs: Option<FastProgs>) -> bool {
    let Some(f) = FAST.get(nr as usize) else {
        return false;
    };
    if native_only(u64::from(nr)) {
        return false;
    }
    let new = progs
        .filter(|p| p.enter != 0 || p.exit != 0)
        .map_or(0, |p| Box::into_raw(Box::new(p)) as usize);
    if new != 0 {
        crate::x86_64::threads::native_used();
    }
    let old = f.progs.swap(new, Ordering::SeqCst);
    while f.inflight.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    if old != 0 {
        // SAFETY: `old` came from `Box::into_raw` above and is no longer published; gates
        // count themselves in flight before reading the pointer and keep the count until they
        // are done with it, and the count drained.
        drop(unsafe { Box::from_raw(old as *mut FastProgs) });
    }
    true
}

/// What a stub passes to the gate in r11.
#[repr(C)]
struct SiteDesc {
    /// Address just after the site's `syscall` instruction (what `syscall` puts in rcx).
    after: u64,
    /// Where the gate returns to run the call natively.
    native: u64,
}

/// The registers the gate saves, lowest address first: the caller-saved ones (`gate_main`
/// keeps rbp and r12–r15, as the ABI has it) and rbx, which holds the frame.
#[repr(C)]
struct GateFrame {
    /// The arithmetic flags as `lahf` (bits 8–15) and `seto` (bit 0) give them.
    flags: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rbx: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    ret: u64,
}

const _: () = assert!(core::mem::size_of::<GateFrame>() == 12 * 8);

core::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl bpftime_syscall_gate",
    ".hidden bpftime_syscall_gate",
    ".type bpftime_syscall_gate, @function",
    "bpftime_syscall_gate:",
    // Fast path: a number with programs the gate runs itself (`set_fast`).
    "cmp rax, {nr_max}",
    "jae 90f",
    "mov rcx, rax",
    "shl rcx, 4",
    "push r11",
    "lea r11, [rip + {fast}]",
    "add rcx, r11",
    "cmp qword ptr [rcx], 0",
    "jne 10f",
    "pop r11",
    "jmp 90f",
    "10:",
    // [rsp] = r11 (the site descriptor), rcx = &FAST[nr]. Keep every register the call and
    // the caller need (the entries keep rbx, rbp, r12 as the ABI has it; we use them).
    "push rax",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push rbx",
    "push rbp",
    "push r12",
    "lahf",
    "seto al",
    "push rax",
    // Frame (rbx): flags, r12, rbp, rbx, r10, r9, r8, rdi, rsi, rdx, rax (nr), r11, return.
    "mov rbx, rsp",
    "mov rbp, rcx",
    "mov r12, [rbx + 80]",
    "cld",
    // A busy thread (running programs on the handlers' side, or the agent's) goes to them.
    "mov rax, qword ptr fs:[0]",
    "mov rcx, {mul}",
    "imul rcx, rax",
    "shr rcx, {shift}",
    "shl rcx, 5",
    "lea rdx, [rip + {recs}]",
    "add rcx, rdx",
    "mov edx, {probes}",
    "11:",
    "cmp [rcx], rax",
    "je 12f",
    "add rcx, 32",
    "dec edx",
    "jnz 11b",
    "jmp 13f",
    "12:",
    "cmp qword ptr [rcx + {busy}], 0",
    "jne 80f",
    "13:",
    // Enter: in flight, then the programs (a remover swaps the pointer, then drains).
    "lock inc qword ptr [rbp + 8]",
    "mov rcx, [rbp]",
    "test rcx, rcx",
    "jz 14f",
    "mov rdx, [rcx + {enter}]",
    "test rdx, rdx",
    "jz 14f",
    "and rsp, -16",
    "sub rsp, 64",
    "movzx eax, word ptr [rcx + {enter_id}]",
    "mov [rsp], rax",
    "mov [rsp + 8], r12",
    "mov rax, [rbx + 56]",
    "mov [rsp + 16], rax",
    "mov rax, [rbx + 64]",
    "mov [rsp + 24], rax",
    "mov rax, [rbx + 72]",
    "mov [rsp + 32], rax",
    "mov rax, [rbx + 32]",
    "mov [rsp + 40], rax",
    "mov rax, [rbx + 48]",
    "mov [rsp + 48], rax",
    "mov rax, [rbx + 40]",
    "mov [rsp + 56], rax",
    "mov rdi, rsp",
    "mov esi, 64",
    "call rdx",
    "mov rsp, rbx",
    "cmp rdx, {trapped}",
    "jne 14f",
    "lock inc qword ptr [rip + {traps}]",
    "14:",
    "lock dec qword ptr [rbp + 8]",
    // The call, with the caller's arguments.
    "mov rax, r12",
    "mov rdi, [rbx + 56]",
    "mov rsi, [rbx + 64]",
    "mov rdx, [rbx + 72]",
    "mov r10, [rbx + 32]",
    "mov r8, [rbx + 48]",
    "mov r9, [rbx + 40]",
    "syscall",
    "mov [rbx + 80], rax",
    // Exit.
    "lock inc qword ptr [rbp + 8]",
    "mov rcx, [rbp]",
    "test rcx, rcx",
    "jz 15f",
    "mov rdx, [rcx + {exit}]",
    "test rdx, rdx",
    "jz 15f",
    "and rsp, -16",
    "sub rsp, 32",
    "movzx eax, word ptr [rcx + {exit_id}]",
    "mov [rsp], rax",
    "mov [rsp + 8], r12",
    "mov rax, [rbx + 80]",
    "mov [rsp + 16], rax",
    "mov rdi, rsp",
    "mov esi, 24",
    "call rdx",
    "mov rsp, rbx",
    "cmp rdx, {trapped}",
    "jne 15f",
    "lock inc qword ptr [rip + {traps}]",
    "15:",
    "lock dec qword ptr [rbp + 8]",
    // Back as the slow path returns: rax = the result, rcx = what `syscall` leaves there
    // (the address after the site's instruction), r11 = the flags as `syscall` saves them.
    "mov rcx, [rbx + 88]",
    "mov rcx, [rcx]",
    "mov r11, [rbx]",
    "mov rax, r11",
    "shr rax, 8",
    "and eax, 0xd5",
    "and r11d, 1",
    "shl r11d, 11",
    "or r11, rax",
    "or r11, 0x202",
    "pop rax",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "add al, 0x7f",
    "sahf",
    "pop rax",
    "lea rsp, [rsp + 8]",
    "ret",
    // A busy thread: everything back as it came, then the slow path.
    "80:",
    "pop rax",
    "add al, 0x7f",
    "sahf",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rax",
    "pop r11",
    "90:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rbx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    // The arithmetic flags, without pushfq/popfq (slow): SF ZF AF PF CF in ah, OF in al.
    "lahf",
    "seto al",
    "push rax",
    "mov rbx, rsp",
    "and rsp, -16",
    "sub rsp, 256",
    "movaps [rsp], xmm0",
    "movaps [rsp+16], xmm1",
    "movaps [rsp+32], xmm2",
    "movaps [rsp+48], xmm3",
    "movaps [rsp+64], xmm4",
    "movaps [rsp+80], xmm5",
    "movaps [rsp+96], xmm6",
    "movaps [rsp+112], xmm7",
    "movaps [rsp+128], xmm8",
    "movaps [rsp+144], xmm9",
    "movaps [rsp+160], xmm10",
    "movaps [rsp+176], xmm11",
    "movaps [rsp+192], xmm12",
    "movaps [rsp+208], xmm13",
    "movaps [rsp+224], xmm14",
    "movaps [rsp+240], xmm15",
    "cld",
    "mov rdi, rbx",
    "call {main}",
    "movaps xmm0, [rsp]",
    "movaps xmm1, [rsp+16]",
    "movaps xmm2, [rsp+32]",
    "movaps xmm3, [rsp+48]",
    "movaps xmm4, [rsp+64]",
    "movaps xmm5, [rsp+80]",
    "movaps xmm6, [rsp+96]",
    "movaps xmm7, [rsp+112]",
    "movaps xmm8, [rsp+128]",
    "movaps xmm9, [rsp+144]",
    "movaps xmm10, [rsp+160]",
    "movaps xmm11, [rsp+176]",
    "movaps xmm12, [rsp+192]",
    "movaps xmm13, [rsp+208]",
    "movaps xmm14, [rsp+224]",
    "movaps xmm15, [rsp+240]",
    "mov rsp, rbx",
    "pop rax",
    "add al, 0x7f",
    "sahf",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rbx",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "ret",
    ".size bpftime_syscall_gate, . - bpftime_syscall_gate",
    main = sym gate_main,
    nr_max = const NR_MAX,
    fast = sym FAST,
    traps = sym FAST_TRAPS,
    trapped = const crate::x86_64::NATIVE_TRAPPED,
    mul = const crate::x86_64::threads::MUL,
    shift = const crate::x86_64::threads::SHIFT,
    recs = sym crate::x86_64::threads::RECS,
    probes = const crate::x86_64::threads::PROBES,
    busy = const crate::x86_64::threads::REC_BUSY,
    enter = const FAST_ENTER,
    enter_id = const FAST_ENTER_ID,
    exit = const FAST_EXIT,
    exit_id = const FAST_EXIT_ID,
);

unsafe extern "C" {
    /// The gate (above); called only by stubs, with r11 = a `SiteDesc`.
    fn bpftime_syscall_gate();
}

/// Whether `nr` must run on the caller's own stack and registers.
fn native_only(nr: u64) -> bool {
    NEVER_PATCHED.iter().any(|&n| u64::from(n) == nr)
}

/// One `syscall` instruction with six arguments.
///
/// # Safety
/// The call must be sound for the process as the original code would have made it (it is: the
/// same number and arguments the interrupted code was about to pass).
#[inline(always)]
pub(super) unsafe fn raw_syscall(nr: u64, a: &[u64; 6]) -> u64 {
    let ret: u64;
    // SAFETY: forwarded contract; `syscall` clobbers only rcx, r11 and rax here.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

extern "C" fn gate_main(f: &mut GateFrame) {
    // SAFETY: stubs load r11 with the address of their descriptor, which lives in a data page
    // that is never unmapped (module invariants).
    let desc = unsafe { &*(f.r11 as *const SiteDesc) };
    let mut call = SyscallCall {
        nr: f.rax,
        args: [f.rdi, f.rsi, f.rdx, f.r10, f.r8, f.r9],
        ret: 0,
        skip: 0,
        site: desc.after - 2,
    };
    let enter = ENTER.load(Ordering::Acquire);
    if enter != 0 {
        // SAFETY: only `set_handlers` stores here, always an `EnterHandler`.
        let enter: EnterHandler = unsafe { core::mem::transmute::<usize, EnterHandler>(enter) };
        enter(&mut call);
    }
    if call.skip == 0 {
        if native_only(call.nr) {
            f.ret = desc.native;
            return;
        }
        // SAFETY: the call the interrupted code was making, unchanged.
        call.ret = unsafe { raw_syscall(call.nr, &call.args) } as i64;
    }
    let exit = EXIT.load(Ordering::Acquire);
    if exit != 0 {
        // SAFETY: only `set_handlers` stores here, always an `ExitHandler`.
        let exit: ExitHandler = unsafe { core::mem::transmute::<usize, ExitHandler>(exit) };
        exit(&call);
    }
    f.rax = call.ret as u64;
    f.rcx = desc.after;
    // What `syscall` leaves in r11: rflags (reserved bit 1 and IF set).
    f.r11 = 0x202 | ((f.flags >> 8) & 0xd5) | ((f.flags & 1) << 11);
}

/// A site with its stub, patched or not.
#[derive(Debug)]
struct Prepared {
    /// Runtime address of the window.
    start: usize,
    len: usize,
    /// The window's first bytes as in the library (what a removal writes back).
    original: [u8; 5],
    /// Runtime address of the `syscall` instruction.
    syscall: usize,
    nr: Option<u32>,
    entry: usize,
    fixups: Vec<Fixup>,
    patched: bool,
}

/// The syscall sites of one library in this process, with their stubs.
#[derive(Debug)]
pub struct Interceptor {
    path: PathBuf,
    /// Inode of the mapped file (0 if not found), to notice it was unmapped (`dlclose`).
    inode: u64,
    sites: Vec<Prepared>,
    skipped: usize,
    /// The static number of each skipped site, where known.
    skipped_nrs: Vec<Option<u32>>,
    /// Of `skipped`: windows outside every function symbol (not patched in objects other
    /// than glibc's, which may keep data in their text).
    unverified: usize,
    // Never freed: sealed code (module invariants).
    _blocks: Vec<CodeBlock>,
}

/// The path of the C library mapped in this process.
pub fn libc_path() -> Result<PathBuf, AttachError> {
    let maps = read_self_maps()?;
    maps.iter()
        .filter(|m| m.exec && m.path.starts_with('/'))
        .map(|m| Path::new(&m.path))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
        })
        .map(Path::to_path_buf)
        .ok_or_else(|| AttachError::Io {
            path: "libc.so.6".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no C library is mapped"),
        })
}

/// Whether `path` is glibc's C library or dynamic loader, whose text holds only code (every
/// `syscall` found by the linear sweep is one).
fn is_glibc(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("libc.so")
            || n.starts_with("libc-")
            || n.starts_with("ld-linux")
            || n.starts_with("ld-2.")
    })
}

/// The executable objects mapped in this process whose sites [`Interceptor::for_object`] may
/// patch, libc first: every file with an executable mapping, except pseudo-files (`[vdso]`,
/// `[vsyscall]`), deleted or replaced files, the object that holds this code (the agent: its
/// own system calls, the gate's included, must never go through the gate) and any other
/// `libbpftime*` file.
pub fn patchable_objects(maps: &[MapEntry]) -> Vec<PathBuf> {
    let gate = bpftime_syscall_gate as *const () as usize;
    let own: Option<&str> = maps
        .iter()
        .find(|m| m.contains(gate))
        .map(|m| m.path.as_str());
    let mut out: Vec<PathBuf> = Vec::new();
    for m in maps.iter().filter(|m| m.exec && m.path.starts_with('/')) {
        let path = Path::new(&m.path);
        let ours = own == Some(m.path.as_str())
            || path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libbpftime"));
        if ours || m.path.ends_with(" (deleted)") || out.iter().any(|p| p == path) {
            continue;
        }
        out.push(path.to_path_buf());
    }
    let libc = out.iter().position(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
    });
    if let Some(i) = libc {
        let l = out.remove(i);
        out.insert(0, l);
    }
    out
}

struct Encoded {
    code: Vec<u8>,
    entry: u64,
    fixups: Vec<Fixup>,
    native: u64,
}

fn iced_err(addr: usize) -> impl Fn(iced_x86::IcedError) -> AttachError {
    move |e| AttachError::Relocation {
        addr,
        message: e.to_string(),
    }
}

/// Encodes the stub of the window `insns` (decoded at their runtime addresses) at `base`.
fn encode_stub(
    base: u64,
    insns: &[Instruction],
    syscall: u64,
    end: u64,
    desc: u64,
) -> Result<Encoded, AttachError> {
    let err = iced_err(syscall as usize);
    let pre: Vec<Instruction> = insns.iter().copied().filter(|i| i.ip() < syscall).collect();
    let post: Vec<Instruction> = insns.iter().copied().filter(|i| i.ip() > syscall).collect();
    let rsp_m = |d: i64| MemoryOperand::with_base_displ(Register::RSP, d);
    let mut v: Vec<Instruction> = pre.clone();
    let call_at = v.len();
    v.push(Instruction::with2(Code::Lea_r64_m, Register::RSP, rsp_m(-128)).map_err(&err)?);
    v.push(Instruction::with2(Code::Mov_r64_imm64, Register::R11, desc).map_err(&err)?);
    v.push(
        Instruction::with2(
            Code::Mov_r64_imm64,
            Register::RCX,
            bpftime_syscall_gate as *const () as usize as u64,
        )
        .map_err(&err)?,
    );
    v.push(Instruction::with1(Code::Call_rm64, Register::RCX).map_err(&err)?);
    v.push(Instruction::with2(Code::Lea_r64_m, Register::RSP, rsp_m(128)).map_err(&err)?);
    let after = post.first().map_or(end, Instruction::ip);
    v.push(Instruction::with_branch(Code::Jmp_rel32_64, after).map_err(&err)?);
    let native_at = v.len();
    v.push(Instruction::with2(Code::Lea_r64_m, Register::RSP, rsp_m(128)).map_err(&err)?);
    v.push(Instruction::with(Code::Syscall));
    let post_at = v.len();
    v.extend(post.iter().copied());
    // A call returns to the instruction after it, in the stub: jump back from there too
    // (glibc's `pthread_kill`: `syscall; mov ebx, eax; call __getpid`).
    let falls_through = post.last().is_none_or(|i| {
        matches!(
            i.flow_control(),
            FlowControl::Next
                | FlowControl::ConditionalBranch
                | FlowControl::Call
                | FlowControl::IndirectCall
        )
    });
    if falls_through {
        v.push(Instruction::with_branch(Code::Jmp_rel32_64, end).map_err(&err)?);
    }
    let out = BlockEncoder::encode(
        64,
        InstructionBlock::new(&v, base),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(&err)?;
    let at = |i: usize| -> Result<u64, AttachError> {
        match out.new_instruction_offsets.get(i) {
            Some(&off) if off != u32::MAX => Ok(base + u64::from(off)),
            _ => Err(AttachError::Relocation {
                addr: syscall as usize,
                message: format!("stub instruction {i} has no known address"),
            }),
        }
    };
    let mut fixups = Vec::new();
    for (k, i) in pre.iter().enumerate().skip(1) {
        fixups.push((i.ip(), at(k)?));
    }
    if !pre.is_empty() {
        fixups.push((syscall, at(call_at)?));
    }
    for (j, i) in post.iter().enumerate() {
        fixups.push((i.ip(), at(post_at + j)?));
    }
    Ok(Encoded {
        code: out.code_buffer,
        entry: base,
        fixups: fixups
            .into_iter()
            .map(|(from, to)| Fixup {
                from: from as usize,
                to: to as usize,
                rsp_delta: 0,
            })
            .collect(),
        native: at(native_at)?,
    })
}

/// Bytes reserved at the end of a code page (never filled with a stub).
const MAX_STUB: usize = 256;
/// Descriptors start here in a block's data page (the engine's in-flight counter is at 0).
const DESC_BASE: usize = 64;

impl Interceptor {
    /// Finds the `syscall` sites of the C library mapped in this process and prepares a stub
    /// for each; patches nothing yet.
    pub fn for_libc() -> Result<Interceptor, AttachError> {
        Interceptor::for_library(&libc_path()?)
    }

    /// As [`Interceptor::for_libc`], for the library at `path` (mapped in this process): every
    /// `syscall` instruction the linear sweep finds.
    pub fn for_library(path: &Path) -> Result<Interceptor, AttachError> {
        Interceptor::build(path, None)
    }

    /// As [`Interceptor::for_library`], for any executable object mapped in this process (the
    /// main executable, a shared library): glibc's libc and dynamic loader get every site;
    /// other objects only the sites whose whole window lies inside one function symbol
    /// (`.symtab` or `.dynsym`), since their text may hold data (hand-written assembly
    /// tables) where a linear sweep would see a `syscall` that is not one. The others count
    /// as skipped ([`Interceptor::unverified`]).
    pub fn for_object(path: &Path) -> Result<Interceptor, AttachError> {
        if is_glibc(path) {
            return Interceptor::build(path, None);
        }
        let funcs = crate::resolve::function_ranges(path)?;
        Interceptor::build(path, Some(&funcs))
    }

    fn build(path: &Path, funcs: Option<&[(u64, u64)]>) -> Result<Interceptor, AttachError> {
        let scan = sites::scan_file(path)?;
        let maps = read_self_maps()?;
        let inode = maps
            .iter()
            .find(|m| m.exec && Path::new(&m.path) == path)
            .map_or(0, |m| m.inode);
        let mut out = Interceptor {
            path: path.to_path_buf(),
            inode,
            sites: Vec::new(),
            skipped: scan.skipped.len(),
            skipped_nrs: scan.skipped_nrs.clone(),
            unverified: 0,
            _blocks: Vec::new(),
        };
        let mut bias: Option<i64> = None;
        let mut block: Option<(CodeBlock, Vec<u8>, usize)> = None;
        for site in &scan.sites {
            if let Some(funcs) = funcs {
                let inside = scan.file_offset(site.start).is_some_and(|off| {
                    crate::resolve::function_containing(funcs, off)
                        .is_some_and(|(_, end)| off + site.bytes.len() as u64 <= end)
                });
                if !inside {
                    out.skipped += 1;
                    out.skipped_nrs.push(site.nr);
                    out.unverified += 1;
                    continue;
                }
            }
            let b = match bias {
                Some(b) => b,
                None => {
                    let off = scan.file_offset(site.start).ok_or(AttachError::NotMapped {
                        addr: site.start as usize,
                    })?;
                    let addr = crate::resolve_file_offset(path, off)?;
                    *bias.insert(addr as i64 - site.start as i64)
                }
            };
            let start = (site.start as i64 + b) as usize;
            match prepare_one(&maps, site, start, &mut block, &mut out._blocks) {
                Ok(p) => out.sites.push(p),
                Err(_) => {
                    out.skipped += 1;
                    out.skipped_nrs.push(site.nr);
                }
            }
        }
        if let Some((blk, code, _)) = block.take() {
            seal_block(blk, &code, &mut out._blocks)?;
        }
        Ok(out)
    }

    /// The static numbers of the `syscall` instructions left alone (`None`: not known
    /// before run time), one per skipped site.
    pub fn skipped_nrs(&self) -> &[Option<u32>] {
        &self.skipped_nrs
    }

    /// The library.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(sites that can be patched, syscall instructions left alone)`.
    pub fn counts(&self) -> (usize, usize) {
        (self.sites.len(), self.skipped)
    }

    /// Of the skipped `syscall` instructions, those outside every function symbol (see
    /// [`Interceptor::for_object`]).
    pub fn unverified(&self) -> usize {
        self.unverified
    }

    /// Whether the object is still mapped where its sites were found, as we left it (false
    /// after a `dlclose` unmapped it, or a `dlclose` and `dlopen` mapped it again, at the same
    /// place, with its original bytes: [`Interceptor::forget`] it then). `maps`: this
    /// process's mappings now.
    pub fn still_mapped(&self, maps: &[MapEntry]) -> bool {
        let at = |addr: usize| {
            maps.iter()
                .any(|m| m.exec && m.contains(addr) && m.inode == self.inode)
        };
        let here = match self.sites.first() {
            Some(s) => at(s.start) && at(s.start + s.len - 1),
            None => maps.iter().any(|m| m.exec && m.inode == self.inode),
        };
        // A patched site still holds our jump (only this thread patches).
        here && self.sites.iter().find(|s| s.patched).is_none_or(|s| {
            code_mem::read_code(maps, s.start, 1).is_ok_and(|b| b.first() == Some(&0xe9))
        })
    }

    /// Drops the interceptor of an object that is no longer mapped without writing its old
    /// bytes back (the addresses may hold another object now); its stubs stay mapped.
    pub fn forget(mut self) {
        let mut reg = registry();
        for s in &mut self.sites {
            if s.patched {
                reg.retain(|r| r.start != s.start);
                s.patched = false;
            }
        }
        drop(reg);
    }

    /// Sites patched now.
    pub fn patched(&self) -> usize {
        self.sites.iter().filter(|s| s.patched).count()
    }

    /// Runtime addresses of the `syscall` instructions of the patchable sites, with their
    /// statically known numbers.
    pub fn sites(&self) -> impl Iterator<Item = (usize, Option<u32>)> + '_ {
        self.sites.iter().map(|s| (s.syscall, s.nr))
    }

    /// Patches the sites `want(nr)` accepts (`nr` = the statically known number, `None` when it
    /// is only known at run time) and unpatches the others. Returns how many are patched; the
    /// first error stops the pass (sites already handled stay as they are).
    pub fn apply(&mut self, want: impl Fn(Option<u32>) -> bool) -> Result<usize, AttachError> {
        let mut reg = registry();
        signals::init()?;
        patch::init_sync_core();
        let maps = read_self_maps()?;
        for s in &mut self.sites {
            let w = want(s.nr);
            if w == s.patched {
                continue;
            }
            if w {
                if let Some(r) = reg
                    .iter()
                    .find(|r| r.start < s.start + s.len && s.start < r.end)
                {
                    // A uprobe hook owns these bytes: leave the site alone.
                    let _ = r;
                    continue;
                }
                patch_site(&maps, s)?;
                reg.push(Range {
                    start: s.start,
                    end: s.start + s.len,
                });
            } else {
                unpatch_site(&maps, s)?;
                reg.retain(|r| r.start != s.start);
            }
        }
        drop(reg);
        Ok(self.patched())
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        if self.apply(|_| false).is_err() {
            eprintln!("bpftime-attach: cannot restore a patched syscall site");
            std::process::abort();
        }
    }
}

fn seal_block(blk: CodeBlock, code: &[u8], keep: &mut Vec<CodeBlock>) -> Result<(), AttachError> {
    blk.write_code(code)?;
    blk.seal()?;
    keep.push(blk);
    Ok(())
}

fn prepare_one(
    maps: &[crate::procmaps::MapEntry],
    site: &Site,
    start: usize,
    block: &mut Option<(CodeBlock, Vec<u8>, usize)>,
    keep: &mut Vec<CodeBlock>,
) -> Result<Prepared, AttachError> {
    let len = site.bytes.len();
    let now = code_mem::read_code(maps, start, len)?;
    if now != site.bytes {
        // Not the file's bytes (patched by someone else, or another file).
        return Err(AttachError::Undecodable { at: start });
    }
    let syscall = start + (site.syscall - site.start) as usize;
    let insns: Vec<Instruction> = Decoder::with_ip(64, &now, start as u64, DecoderOptions::NONE)
        .into_iter()
        .collect();
    if insns.iter().any(Instruction::is_invalid) {
        return Err(AttachError::Undecodable { at: start });
    }
    let end = (start + len) as u64;
    for _ in 0..2 {
        if block.is_none() {
            let b = match code_mem::alloc_near(start, maps)? {
                Some(b) => b,
                None => return Err(AttachError::NotMapped { addr: start }),
            };
            *block = Some((b, Vec::new(), 0));
        }
        let Some((blk, code, ndesc)) = block.as_mut() else {
            unreachable!("set above");
        };
        let reach = (blk.code_addr() as i64 - start as i64).unsigned_abs();
        let desc = blk.inflight_addr() + DESC_BASE + 16 * *ndesc;
        let fits_desc = desc + 16 <= blk.inflight_addr() + PAGE;
        if reach < (1 << 31) - (64 << 20) && fits_desc && code.len() + MAX_STUB <= PAGE {
            let base = blk.code_addr() + code.len();
            let enc = encode_stub(base as u64, &insns, syscall as u64, end, desc as u64)?;
            if enc.code.len() <= MAX_STUB {
                code.extend_from_slice(&enc.code);
                // Keep stubs 16-aligned.
                code.resize(code.len().next_multiple_of(16), 0xcc);
                write_desc(
                    desc,
                    SiteDesc {
                        after: syscall as u64 + 2,
                        native: enc.native,
                    },
                );
                *ndesc += 1;
                let mut original = [0u8; 5];
                original.copy_from_slice(&now[..5]);
                return Ok(Prepared {
                    start,
                    len,
                    original,
                    syscall,
                    nr: site.nr,
                    entry: enc.entry as usize,
                    fixups: enc.fixups,
                    patched: false,
                });
            }
        }
        // Full (or out of reach): seal this block and start another.
        if let Some((blk, code, _)) = block.take() {
            seal_block(blk, &code, keep)?;
        }
    }
    Err(AttachError::Relocation {
        addr: syscall,
        message: "stub does not fit in a code page".into(),
    })
}

fn write_desc(at: usize, d: SiteDesc) {
    // SAFETY: `at` is 16-byte slot inside a block's data page (checked by the caller), mapped
    // read-write for the life of the process and not yet used by any stub (the stub that reads
    // it is not reachable before the site is patched, after this write).
    unsafe { core::ptr::write_volatile(at as *mut SiteDesc, d) };
}

fn patch_site(maps: &[crate::procmaps::MapEntry], s: &mut Prepared) -> Result<(), AttachError> {
    let rel = (s.entry as i64 - (s.start as i64 + 5)) as i32;
    let mut jump = [0xe9, 0, 0, 0, 0];
    jump[1..].copy_from_slice(&rel.to_le_bytes());
    let writable = patch::make_writable(maps, s.start, s.len)?;
    signals::arm_trap(s.start, s.entry);
    patch::store_byte(s.start, INT3);
    patch::sync_cores();
    let r = match signals::stop_the_world(&s.fixups) {
        Ok(stopped) => {
            patch::write_instruction(s.start, &jump);
            stopped.release(true);
            s.patched = true;
            Ok(())
        }
        Err(e) => {
            patch::store_byte(s.start, s.original[0]);
            patch::sync_cores();
            Err(e)
        }
    };
    signals::disarm_trap();
    let restored = writable.restore();
    r.and(restored)
}

fn unpatch_site(maps: &[crate::procmaps::MapEntry], s: &mut Prepared) -> Result<(), AttachError> {
    let writable = patch::make_writable(maps, s.start, s.len)?;
    // Threads in the stub finish there and jump back to the end of the window, which is an
    // instruction boundary of the original code too; the stub stays mapped.
    signals::arm_trap(s.start, s.entry);
    patch::write_instruction(s.start, &s.original);
    signals::disarm_trap();
    s.patched = false;
    writable.restore()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Mnemonic;

    #[test]
    fn stub_calls_the_gate_and_keeps_the_native_path() {
        // mov eax, 39; syscall; ret  at 0x7000_0000_1000
        let code = [0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3];
        let ip = 0x7000_0000_1000u64;
        let insns: Vec<Instruction> = Decoder::with_ip(64, &code, ip, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let base = 0x7000_0100_0000u64;
        let enc = encode_stub(base, &insns, ip + 5, ip + 8, 0x1234).unwrap();
        let out: Vec<Instruction> = Decoder::with_ip(64, &enc.code, base, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let m: Vec<Mnemonic> = out.iter().map(Instruction::mnemonic).collect();
        assert_eq!(
            m,
            [
                Mnemonic::Mov,
                Mnemonic::Lea,
                Mnemonic::Mov,
                Mnemonic::Mov,
                Mnemonic::Call,
                Mnemonic::Lea,
                Mnemonic::Jmp,
                Mnemonic::Lea,
                Mnemonic::Syscall,
                Mnemonic::Ret
            ]
        );
        // The done path jumps to the relocated `ret`; the native path falls into it.
        assert_eq!(out[6].near_branch_target(), out[9].ip());
        assert_eq!(enc.native, out[7].ip());
        // A thread restarted at the original syscall goes to the gate call.
        assert_eq!(
            enc.fixups
                .iter()
                .map(|f| (f.from as u64, f.to as u64))
                .collect::<Vec<_>>(),
            vec![(ip + 5, out[1].ip()), (ip + 7, out[9].ip())]
        );
    }

    #[test]
    fn a_call_ending_the_window_returns_into_a_jump_back() {
        // syscall; mov ebx, eax; call +0x1000 (glibc's pthread_kill), then more code.
        let code = [0x0f, 0x05, 0x89, 0xc3, 0xe8, 0x00, 0x10, 0x00, 0x00];
        let ip = 0x7000_0000_2000u64;
        let insns: Vec<Instruction> = Decoder::with_ip(64, &code, ip, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let base = 0x7000_0100_0000u64;
        let end = ip + code.len() as u64;
        let enc = encode_stub(base, &insns, ip, end, 0x1234).unwrap();
        let out: Vec<Instruction> = Decoder::with_ip(64, &enc.code, base, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let call = out
            .iter()
            .position(|i| i.mnemonic() == Mnemonic::Call && i.near_branch_target() != 0)
            .expect("relocated call");
        assert_eq!(out[call].near_branch_target(), ip + 4 + 5 + 0x1000);
        let next = &out[call + 1];
        assert_eq!(next.mnemonic(), Mnemonic::Jmp);
        assert_eq!(next.near_branch_target(), end);
    }
}
