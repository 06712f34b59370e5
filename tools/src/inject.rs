//! Calling functions inside another running process with ptrace (x86_64 Linux), used by
//! `bpftime attach` to load the agent without frida: `dlopen(agent)`, `dlsym(handle,
//! "bpftime_agent_attach")`, then that function with the store name.
//!
//! How: one thread of the target is *borrowed* — `PTRACE_SEIZE` + `PTRACE_INTERRUPT` stop that
//! thread only (the others keep running; nothing needs them stopped, since we change no code,
//! only this thread's registers and the unused part of its stack). Its registers are saved, the
//! strings we pass are written on its own stack below the 128-byte red zone, and each call
//! starts at the function with the SysV argument registers set and a return address of 0:
//! returning faults at address 0 (`SIGSEGV`), which we catch as a signal-delivery stop and
//! discard. The target's `dlopen`/`dlsym`/`dlerror` come from its own libc (glibc ≥ 2.34), else
//! its `libdl`, else glibc's private `__libc_dlopen_mode`, found through `/proc/PID/maps` and the
//! library's ELF dynamic symbols (goblin).
//!
//! A thread stopped inside a system call (blocked in `read`, `nanosleep`, …) is stopped on its
//! way out with the kernel's restart code in `rax` (`-ERESTARTSYS`, …) and the syscall number in
//! `orig_rax`. Our calls run with `orig_rax = -1` (so the kernel does not "restart" them), and
//! restoring the saved registers before detaching hands the thread back to the kernel's
//! restart logic unchanged: the syscall restarts — or returns `EINTR` where the kernel does
//! that for any signal — exactly as after a stop by a signal without a handler (`SIGSTOP`).
//!
//! # Invariants
//!
//! - Before the borrowed thread runs anything of ours, its general-purpose registers (with
//!   `orig_rax`, `eflags`, `fs_base`/`gs_base`), its whole XSAVE area (x87, SSE, AVX, …; the
//!   legacy FXSAVE area where XSAVE is absent) and the stack bytes we overwrite are saved; they
//!   are written back before detaching on every path, errors included (`Drop`), so the thread
//!   resumes exactly where it was. Calls run with a clean x87/SSE control state and the
//!   direction and trap flags clear, as the ABI requires of a caller.
//! - Memory below the red zone that the called functions use as stack is dead by the ABI (a
//!   signal handler may clobber it at any time); we restore only what we wrote ourselves.
//! - `ptrace` receives pointers only to live, correctly sized local buffers; the thread is in a
//!   ptrace stop whenever its registers are read or written.
//! - While a thread is borrowed, `SIGINT`, `SIGTERM`, `SIGHUP`, `SIGQUIT` and `SIGTSTP` are
//!   blocked in this (single-threaded) tool, so Ctrl-C cannot leave the target with our
//!   registers (a tracer that dies detaches its tracees as they are). `SIGKILL` still can.

use anyhow::{Context as _, Result, anyhow, bail};
use bpftime_attach::procmaps::{MapEntry, parse_maps};
use goblin::elf::{Elf, program_header::PT_LOAD, section_header::SHN_UNDEF, sym};
use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Where calls return to: unmapped (`vm.mmap_min_addr`), so returning faults.
const RETURN_ADDR: u64 = 0;
/// The x86_64 SysV red zone below `rsp`.
const RED_ZONE: u64 = 128;
/// Stack the calls may use below our data, at least, when the thread's stack is not the
/// growable main stack.
const MIN_STACK: u64 = 64 * 1024;
/// `NT_X86_XSTATE` (`elf.h`): the XSAVE area through `PTRACE_GETREGSET`.
const NT_X86_XSTATE: usize = 0x202;
/// Large enough for every XSAVE layout (AVX-512 ~2.7 KiB, AMX ~11 KiB).
const XSTATE_MAX: usize = 32 * 1024;
const RTLD_NOW: u64 = 2;
/// glibc's `__RTLD_DLOPEN`, which `__libc_dlopen_mode` callers pass.
const RTLD_DLOPEN_PRIVATE: u64 = 0x8000_0000;
/// `eflags` bits the ABI wants clear at a call: TF (8) and DF (10).
const FLAGS_CLEAR: u64 = (1 << 8) | (1 << 10);

/// The target's dynamic-loading functions, as addresses in the target.
#[derive(Debug, Clone, Copy)]
pub struct DlFunctions {
    /// `dlopen` (or `__libc_dlopen_mode`).
    pub dlopen: u64,
    /// `dlsym` (or `__libc_dlsym`).
    pub dlsym: u64,
    /// `dlerror`, when available.
    pub dlerror: Option<u64>,
    /// Flags passed to `dlopen`.
    pub dlopen_flags: u64,
}

/// The target's memory map.
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_maps(&text).map_err(|e| anyhow!("{path}: {e}"))
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The path (as the target sees it) of a mapped file whose name matches `pred`.
pub fn mapped_file(maps: &[MapEntry], pred: impl Fn(&str) -> bool) -> Option<String> {
    maps.iter()
        .filter(|m| m.path.starts_with('/') && !m.path.ends_with(" (deleted)"))
        .find(|m| pred(file_name(&m.path)))
        .map(|m| m.path.clone())
}

fn is_libc(name: &str) -> bool {
    name == "libc.so.6" || (name.starts_with("libc-") && name.ends_with(".so"))
}

fn is_libdl(name: &str) -> bool {
    name == "libdl.so.2" || (name.starts_with("libdl-") && name.ends_with(".so"))
}

/// The file behind a path of the target's, readable from here (through `/proc/PID/root` when
/// the target lives in another mount namespace).
fn host_path(pid: i32, path: &str) -> PathBuf {
    let via_root = PathBuf::from(format!("/proc/{pid}/root{path}"));
    if std::fs::metadata(&via_root).is_ok() {
        via_root
    } else {
        PathBuf::from(path)
    }
}

/// A library's dynamic function symbols and load segments, parsed lazily with goblin: only the
/// headers and `.dynsym`/`.dynstr` (a full parse of libc costs tens of ms in debug builds).
struct DynSyms {
    loads: Vec<(u64, u64, u64)>,
    funcs: Vec<(String, u64)>,
}

fn dyn_syms(bytes: &[u8]) -> goblin::error::Result<DynSyms> {
    use goblin::container::{Container, Ctx, Endian};
    use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB};
    use goblin::elf::program_header::ProgramHeader;
    use goblin::elf::section_header::{SHT_DYNSYM, SectionHeader};
    use goblin::elf::sym::Symtab;
    use goblin::strtab::Strtab;
    let h = Elf::parse_header(bytes)?;
    let ctx = Ctx::new(
        if h.e_ident[EI_CLASS] == ELFCLASS64 {
            Container::Big
        } else {
            Container::Little
        },
        if h.e_ident[EI_DATA] == ELFDATA2LSB {
            Endian::Little
        } else {
            Endian::Big
        },
    );
    let phdrs = ProgramHeader::parse(bytes, h.e_phoff as usize, h.e_phnum as usize, ctx)?;
    let shdrs = SectionHeader::parse(bytes, h.e_shoff as usize, h.e_shnum as usize, ctx)?;
    let mut funcs = Vec::new();
    if let Some(ds) = shdrs
        .iter()
        .find(|s| s.sh_type == SHT_DYNSYM && s.sh_entsize > 0)
        && let Some(st) = shdrs.get(ds.sh_link as usize)
    {
        let count = (ds.sh_size / ds.sh_entsize) as usize;
        let syms = Symtab::parse(bytes, ds.sh_offset as usize, count, ctx)?;
        let names = Strtab::parse(bytes, st.sh_offset as usize, st.sh_size as usize, 0)?;
        for s in syms.iter() {
            let defined = s.st_shndx != SHN_UNDEF as usize && s.st_value != 0;
            if defined
                && s.st_type() == sym::STT_FUNC
                && let Some(n) = names.get_at(s.st_name)
            {
                funcs.push((n.to_string(), s.st_value));
            }
        }
    }
    let loads = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| (p.p_vaddr, p.p_filesz, p.p_offset))
        .collect();
    Ok(DynSyms { loads, funcs })
}

/// Addresses in the target of the defined function symbols `names` of its mapped library
/// `lib` (`None` for those it lacks).
fn symbols_in(pid: i32, maps: &[MapEntry], lib: &str, names: &[&str]) -> Result<Vec<Option<u64>>> {
    let file = host_path(pid, lib);
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let syms = std::panic::catch_unwind(|| dyn_syms(&bytes))
        .map_err(|_| anyhow!("{}: malformed ELF", file.display()))?
        .with_context(|| format!("{}: not a usable ELF file", file.display()))?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let value = syms.funcs.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let addr = value.and_then(|v| {
            let off = syms.loads.iter().find_map(|&(vaddr, filesz, offset)| {
                (vaddr <= v && v - vaddr < filesz).then(|| v - vaddr + offset)
            })?;
            let m = maps.iter().find(|m| {
                m.path == lib && m.offset <= off && off - m.offset < (m.end - m.start) as u64
            })?;
            Some(m.start as u64 + (off - m.offset))
        });
        out.push(addr);
    }
    Ok(out)
}

/// Finds the target's `dlopen`, `dlsym` and `dlerror`.
pub fn find_dl_functions(pid: i32, maps: &[MapEntry]) -> Result<DlFunctions> {
    let Some(libc) = mapped_file(maps, is_libc) else {
        bail!(
            "process {pid} has no glibc mapped (statically linked, or another C library): \
             bpftime attach cannot load the agent into it; start it with `bpftime start` instead"
        );
    };
    let s = symbols_in(
        pid,
        maps,
        &libc,
        &[
            "dlopen",
            "dlsym",
            "dlerror",
            "__libc_dlopen_mode",
            "__libc_dlsym",
        ],
    )?;
    if let (Some(dlopen), Some(dlsym)) = (s[0], s[1]) {
        return Ok(DlFunctions {
            dlopen,
            dlsym,
            dlerror: s[2],
            dlopen_flags: RTLD_NOW,
        });
    }
    // glibc < 2.34: dlopen lives in libdl, when the program linked it.
    if let Some(libdl) = mapped_file(maps, is_libdl) {
        let d = symbols_in(pid, maps, &libdl, &["dlopen", "dlsym", "dlerror"])?;
        if let (Some(dlopen), Some(dlsym)) = (d[0], d[1]) {
            return Ok(DlFunctions {
                dlopen,
                dlsym,
                dlerror: d[2],
                dlopen_flags: RTLD_NOW,
            });
        }
    }
    if let (Some(dlopen), Some(dlsym)) = (s[3], s[4]) {
        return Ok(DlFunctions {
            dlopen,
            dlsym,
            dlerror: None,
            dlopen_flags: RTLD_NOW | RTLD_DLOPEN_PRIVATE,
        });
    }
    bail!("no dlopen found in {libc} of process {pid}")
}

/// What to run in the borrowed thread.
#[derive(Debug, Clone)]
pub struct AgentCall<'a> {
    /// The agent library, as the target sees the path.
    pub library: &'a str,
    /// Store name.
    pub store: &'a str,
    /// Log level for the agent (`None`: silent).
    pub log_level: Option<&'a str>,
    /// Log file for the agent (`None`: its stderr).
    pub log_file: Option<&'a Path>,
}

/// Explains a ptrace permission failure on `pid`.
pub fn permission_hint(pid: i32) -> String {
    let mut why = String::from(
        "ptrace needs the target to run as your user (or CAP_SYS_PTRACE), to be dumpable \
         (not setuid/setcap, no PR_SET_DUMPABLE 0), and not already traced",
    );
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        match s.trim() {
            "1" => why.push_str(&format!(
                "; kernel.yama.ptrace_scope is 1 here: only a parent may trace its \
                 children unless process {pid} called prctl(PR_SET_PTRACER, ...) — run \
                 `sysctl kernel.yama.ptrace_scope=0`, or start the program with `bpftime start`"
            )),
            "2" => why.push_str(
                "; kernel.yama.ptrace_scope is 2 here: only CAP_SYS_PTRACE may trace (use \
                 `bpftime start` instead)",
            ),
            "3" => why.push_str(
                "; kernel.yama.ptrace_scope is 3 here: ptrace is disabled (use `bpftime start`)",
            ),
            _ => {}
        }
    }
    why
}

/// Loads the agent into `pid` through its thread `tid` and starts it: returns what
/// `bpftime_agent_attach` returned (0 started, 1 already running, negative errno).
pub fn inject_agent(pid: i32, tid: i32, dl: &DlFunctions, call: &AgentCall<'_>) -> Result<i32> {
    let maps = read_maps(pid)?;
    let mut data = Scratch::default();
    let lib = data.push(call.library.as_bytes());
    let sym = data.push(b"bpftime_agent_attach");
    let store = data.push(call.store.as_bytes());
    let level = call.log_level.map(|l| data.push(l.as_bytes()));
    let file = call
        .log_file
        .map(|f| data.push(f.as_os_str().as_encoded_bytes()));

    let _quiet = SignalBlock::new();
    let mut t = Borrowed::seize(pid, tid)?;
    let base = t.lay_out(&maps, &data.bytes)?;
    let at = |off: u64| base + off;

    let handle = t.call(dl.dlopen, &[at(lib), dl.dlopen_flags])?;
    if handle == 0 {
        let msg = match dl.dlerror {
            Some(f) => {
                let p = t.call(f, &[])?;
                t.read_c_string(p).unwrap_or_default()
            }
            None => String::new(),
        };
        t.restore()?;
        bail!(
            "dlopen({}) failed in process {pid}: {}",
            call.library,
            if msg.is_empty() {
                "no reason given"
            } else {
                &msg
            }
        );
    }
    let f = t.call(dl.dlsym, &[handle, at(sym)])?;
    if f == 0 {
        t.restore()?;
        bail!(
            "{} in process {pid} has no bpftime_agent_attach (a library from another build?)",
            call.library
        );
    }
    let r = t.call(f, &[at(store), level.map_or(0, at), file.map_or(0, at)])?;
    t.restore()?;
    Ok(r as u32 as i32)
}

/// NUL-terminated strings laid out back to back.
#[derive(Default)]
struct Scratch {
    bytes: Vec<u8>,
}

impl Scratch {
    fn push(&mut self, s: &[u8]) -> u64 {
        let off = self.bytes.len() as u64;
        self.bytes.extend_from_slice(s);
        self.bytes.push(0);
        off
    }
}

/// Blocks the terminal signals for as long as it lives.
struct SignalBlock {
    old: libc::sigset_t,
}

impl SignalBlock {
    fn new() -> SignalBlock {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset/pthread_sigmask only write the
        // local sets they are given.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGTSTP,
            ] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            SignalBlock { old }
        }
    }
}

impl Drop for SignalBlock {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`; the pointer is to our own field.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}

/// # Safety
///
/// `addr` and `data` must be what `request` expects: for requests that read or write through
/// `data`, a pointer to a live buffer of the right type and size.
unsafe fn ptrace(request: libc::c_uint, tid: i32, addr: usize, data: usize) -> io::Result<i64> {
    // SAFETY: the caller guarantees the arguments fit the request.
    let r = unsafe { libc::ptrace(request, tid, addr as *mut c_void, data as *mut c_void) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// How a traced thread stopped (or went away).
enum Stop {
    /// A ptrace event stop (`PTRACE_INTERRUPT`, group stop).
    Event,
    /// A signal-delivery stop.
    Signal(i32),
    /// The thread is gone.
    Gone(String),
}

fn wait_stop(tid: i32) -> Result<Stop> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live local the kernel writes.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r != -1 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).context("waitpid");
        }
    }
    Ok(if libc::WIFEXITED(status) {
        Stop::Gone(format!("exited with status {}", libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Stop::Gone(format!("was killed by signal {}", libc::WTERMSIG(status)))
    } else if (status >> 16) != 0 {
        Stop::Event
    } else {
        Stop::Signal(libc::WSTOPSIG(status))
    })
}

enum FpState {
    Xsave(Vec<u8>),
    Fx(Box<libc::user_fpregs_struct>),
}

/// A thread of the target, stopped under ptrace, with everything needed to put it back.
struct Borrowed {
    pid: i32,
    tid: i32,
    mem: File,
    regs: libc::user_regs_struct,
    fp: FpState,
    /// The legacy FP area with default control words, for calls.
    clean_fp: Box<libc::user_fpregs_struct>,
    /// Stack bytes we overwrote, and where.
    saved_stack: Option<(u64, Vec<u8>)>,
    call_rsp: u64,
    done: bool,
}

fn zeroed_regs() -> libc::user_regs_struct {
    // SAFETY: user_regs_struct is integers only; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

fn zeroed_fpregs() -> Box<libc::user_fpregs_struct> {
    // SAFETY: user_fpregs_struct is integers only; all-zero is a valid value.
    Box::new(unsafe { std::mem::zeroed() })
}

impl Borrowed {
    fn seize(pid: i32, tid: i32) -> Result<Borrowed> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| denied(pid, e))?;
        // SAFETY: PTRACE_SEIZE takes no pointers (options 0).
        unsafe { ptrace(libc::PTRACE_SEIZE, tid, 0, 0) }.map_err(|e| denied(pid, e))?;
        let mut t = Borrowed {
            pid,
            tid,
            mem,
            regs: zeroed_regs(),
            fp: FpState::Xsave(Vec::new()),
            clean_fp: zeroed_fpregs(),
            saved_stack: None,
            call_rsp: 0,
            // Nothing to restore until the registers are saved; detach on early errors.
            done: true,
        };
        // SAFETY: PTRACE_INTERRUPT takes no pointers.
        if let Err(e) = unsafe { ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) } {
            t.detach_quietly();
            return Err(e).context("PTRACE_INTERRUPT");
        }
        loop {
            match wait_stop(tid)? {
                Stop::Event => break,
                // A signal was already on its way: deliver it as usual, the interrupt follows.
                Stop::Signal(sig) => {
                    // SAFETY: PTRACE_CONT takes a signal number, no pointers.
                    unsafe { ptrace(libc::PTRACE_CONT, tid, 0, sig as usize) }
                        .context("PTRACE_CONT")?;
                }
                Stop::Gone(how) => bail!("process {pid} {how}"),
            }
        }
        // SAFETY: GETREGS writes one user_regs_struct into `t.regs`.
        unsafe {
            ptrace(
                libc::PTRACE_GETREGS,
                tid,
                0,
                &mut t.regs as *mut libc::user_regs_struct as usize,
            )
        }
        .context("PTRACE_GETREGS")?;
        t.fp = save_fp(tid)?;
        // SAFETY: GETFPREGS writes one user_fpregs_struct into the box.
        unsafe {
            ptrace(
                libc::PTRACE_GETFPREGS,
                tid,
                0,
                &mut *t.clean_fp as *mut libc::user_fpregs_struct as usize,
            )
        }
        .context("PTRACE_GETFPREGS")?;
        let c = &mut t.clean_fp;
        c.cwd = 0x037f;
        c.swd = 0;
        c.ftw = 0;
        c.fop = 0;
        c.rip = 0;
        c.rdp = 0;
        c.mxcsr = 0x1f80;
        t.done = false;
        Ok(t)
    }

    fn detach_quietly(&self) {
        // SAFETY: PTRACE_DETACH with signal 0 takes no pointers.
        let _ = unsafe { ptrace(libc::PTRACE_DETACH, self.tid, 0, 0) };
    }

    /// Writes `data` below the red zone and a return address below it; returns where `data`
    /// starts in the target.
    fn lay_out(&mut self, maps: &[MapEntry], data: &[u8]) -> Result<u64> {
        let sp = self.regs.rsp;
        let top = sp
            .checked_sub(RED_ZONE + data.len() as u64)
            .ok_or_else(|| anyhow!("thread {} has a bad stack pointer {sp:#x}", self.tid))?
            & !15;
        // At a function's first instruction rsp + 8 is 16-byte aligned.
        let call_rsp = top - 24;
        let stack = maps
            .iter()
            .find(|m| m.contains(sp as usize) && m.write)
            .ok_or_else(|| {
                anyhow!(
                    "thread {} stack pointer {sp:#x} is not in writable memory",
                    self.tid
                )
            })?;
        if stack.path != "[stack]" && call_rsp.saturating_sub(stack.start as u64) < MIN_STACK {
            bail!(
                "thread {} has less than {} KiB of stack left below {sp:#x} (a signal stack?); \
                 pick another with --thread",
                self.tid,
                MIN_STACK / 1024
            );
        }
        let end = sp - RED_ZONE;
        let mut old = vec![0u8; (end - call_rsp) as usize];
        self.mem
            .read_exact_at(&mut old, call_rsp)
            .context("cannot read the target's stack")?;
        self.saved_stack = Some((call_rsp, old));
        self.mem
            .write_all_at(&RETURN_ADDR.to_le_bytes(), call_rsp)
            .and_then(|()| self.mem.write_all_at(data, top))
            .context("cannot write to the target's stack")?;
        self.call_rsp = call_rsp;
        Ok(top)
    }

    /// Calls `func(args...)` in the thread and returns `rax`.
    fn call(&mut self, func: u64, args: &[u64]) -> Result<u64> {
        let mut r = self.regs;
        r.rip = func;
        r.rsp = self.call_rsp;
        r.rax = 0;
        r.orig_rax = u64::MAX;
        r.eflags &= !FLAGS_CLEAR;
        let slots = [
            &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.rcx, &mut r.r8, &mut r.r9,
        ];
        if args.len() > slots.len() {
            bail!("too many arguments");
        }
        for (slot, a) in slots.into_iter().zip(args) {
            *slot = *a;
        }
        // SAFETY: SETREGS reads one user_regs_struct from `r`; SETFPREGS one
        // user_fpregs_struct from the box; the thread is in a ptrace stop.
        unsafe {
            ptrace(
                libc::PTRACE_SETREGS,
                self.tid,
                0,
                &r as *const libc::user_regs_struct as usize,
            )
        }
        .context("PTRACE_SETREGS")?;
        // SAFETY: as above.
        unsafe {
            ptrace(
                libc::PTRACE_SETFPREGS,
                self.tid,
                0,
                &*self.clean_fp as *const libc::user_fpregs_struct as usize,
            )
        }
        .context("PTRACE_SETFPREGS")?;
        let mut sig = 0;
        loop {
            // SAFETY: PTRACE_CONT takes a signal number, no pointers.
            unsafe { ptrace(libc::PTRACE_CONT, self.tid, 0, sig as usize) }
                .context("PTRACE_CONT")?;
            sig = 0;
            match wait_stop(self.tid)? {
                Stop::Event => {}
                Stop::Signal(s) => {
                    let mut now = zeroed_regs();
                    if matches!(
                        s,
                        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE
                    ) {
                        // SAFETY: GETREGS writes one user_regs_struct into `now`.
                        unsafe {
                            ptrace(
                                libc::PTRACE_GETREGS,
                                self.tid,
                                0,
                                &mut now as *mut libc::user_regs_struct as usize,
                            )
                        }
                        .context("PTRACE_GETREGS")?;
                        if s == libc::SIGSEGV && now.rip == RETURN_ADDR {
                            return Ok(now.rax);
                        }
                        bail!(
                            "the call at {func:#x} in process {} faulted (signal {s} at \
                             {:#x}); its registers were restored, but the process may be \
                             left inconsistent",
                            self.pid,
                            now.rip
                        );
                    }
                    // Any other signal is the program's: deliver it.
                    sig = s;
                }
                Stop::Gone(how) => {
                    self.done = true;
                    bail!("process {} {how} during the call", self.pid)
                }
            }
        }
    }

    fn read_c_string(&self, addr: u64) -> Option<String> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 256];
        while out.len() < 4096 {
            let n = self.mem.read_at(&mut chunk, addr + out.len() as u64).ok()?;
            if n == 0 {
                break;
            }
            if let Some(z) = chunk[..n].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Some(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk[..n]);
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// Puts back the stack bytes, the FP state and the registers, and detaches.
    fn restore(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut errors = Vec::new();
        if let Some((at, bytes)) = self.saved_stack.take()
            && let Err(e) = self.mem.write_all_at(&bytes, at)
        {
            errors.push(format!("stack: {e}"));
        }
        if let Err(e) = restore_fp(self.tid, &mut self.fp) {
            errors.push(format!("FP state: {e}"));
        }
        // SAFETY: SETREGS reads one user_regs_struct from `self.regs`.
        if let Err(e) = unsafe {
            ptrace(
                libc::PTRACE_SETREGS,
                self.tid,
                0,
                &self.regs as *const libc::user_regs_struct as usize,
            )
        } {
            errors.push(format!("registers: {e}"));
        }
        // SAFETY: PTRACE_DETACH with signal 0 takes no pointers.
        if let Err(e) = unsafe { ptrace(libc::PTRACE_DETACH, self.tid, 0, 0) } {
            errors.push(format!("detach: {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "restoring thread {} of process {} failed: {}",
                self.tid,
                self.pid,
                errors.join(", ")
            )
        }
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if self.done {
            self.detach_quietly();
        } else if let Err(e) = self.restore() {
            eprintln!("bpftime: {e:#}");
        }
    }
}

fn save_fp(tid: i32) -> Result<FpState> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: GETREGSET writes at most `iov_len` bytes to `buf` and updates `iov`.
    match unsafe {
        ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec as usize,
        )
    } {
        Ok(_) => {
            buf.truncate(iov.iov_len);
            Ok(FpState::Xsave(buf))
        }
        // No XSAVE on this CPU: the FXSAVE area is all there is.
        Err(_) => {
            let mut fx = zeroed_fpregs();
            // SAFETY: GETFPREGS writes one user_fpregs_struct into the box.
            unsafe {
                ptrace(
                    libc::PTRACE_GETFPREGS,
                    tid,
                    0,
                    &mut *fx as *mut libc::user_fpregs_struct as usize,
                )
            }
            .context("PTRACE_GETFPREGS")?;
            Ok(FpState::Fx(fx))
        }
    }
}

fn restore_fp(tid: i32, fp: &mut FpState) -> io::Result<()> {
    match fp {
        FpState::Xsave(buf) => {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: SETREGSET reads `iov_len` bytes from `buf`, the area GETREGSET gave us.
            unsafe {
                ptrace(
                    libc::PTRACE_SETREGSET,
                    tid,
                    NT_X86_XSTATE,
                    &mut iov as *mut libc::iovec as usize,
                )
            }
            .map(drop)
        }
        // SAFETY: SETFPREGS reads one user_fpregs_struct from the box.
        FpState::Fx(fx) => unsafe {
            ptrace(
                libc::PTRACE_SETFPREGS,
                tid,
                0,
                &**fx as *const libc::user_fpregs_struct as usize,
            )
        }
        .map(drop),
    }
}

fn denied(pid: i32, e: io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(
            "cannot ptrace process {pid}: {e} ({}); the process was not touched",
            permission_hint(pid)
        ),
        Some(libc::ESRCH) | Some(libc::ENOENT) => anyhow!("no process {pid}"),
        _ => anyhow!("cannot ptrace process {pid}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_dlopen_and_dlsym() {
        let pid = std::process::id() as i32;
        let maps = read_maps(pid).unwrap();
        let dl = find_dl_functions(pid, &maps).unwrap();
        assert_eq!(dl.dlopen, libc::dlopen as *const () as u64);
        assert_eq!(dl.dlsym, libc::dlsym as *const () as u64);
        assert_eq!(dl.dlerror, Some(libc::dlerror as *const () as u64));
    }

    #[test]
    fn scratch_strings_are_nul_terminated_back_to_back() {
        let mut s = Scratch::default();
        assert_eq!(s.push(b"ab"), 0);
        assert_eq!(s.push(b""), 3);
        assert_eq!(s.push(b"c"), 4);
        assert_eq!(s.bytes, b"ab\0\0c\0");
    }

    #[test]
    fn library_names() {
        assert!(is_libc("libc.so.6") && is_libc("libc-2.31.so"));
        assert!(!is_libc("libcap.so.2") && !is_libc("libc.so.6.bak"));
        assert!(is_libdl("libdl.so.2") && is_libdl("libdl-2.31.so"));
    }
}
