//! `bpftime load` and `bpftime start`: run a command with one of our libraries preloaded.
//!
//! `load` preloads the syscall-server into an unmodified eBPF loader (libbpf tool, bpftrace,
//! bcc): its bpf() and perf calls are answered in userspace into the shared-memory store.
//! `start` preloads the agent into a target program: it attaches what the store holds.
//! Both replace this process with the command (`exec`), so signals, exit status and the
//! terminal belong to the command as if it were run directly.

use anyhow::{Context as _, Result, bail};
use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Options shared by `load` and `start`.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// The store to use (a file `/dev/shm/bpftime-<uid>-<NAME>`).
    #[arg(
        long,
        value_name = "NAME",
        env = "BPFTIME_STORE",
        default_value = "default"
    )]
    pub store: String,

    /// Log level of our library inside the command (`error`, `warn`, `info`, `debug`).
    /// Without it the library prints nothing.
    #[arg(long, value_name = "LEVEL")]
    pub log: Option<String>,

    /// Write our library's log to this file instead of the command's stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// `start`: run programs on the interpreter instead of the (checked) JIT
    /// (sets `BPFTIME_NO_JIT=1` for the agent).
    #[arg(long)]
    pub no_jit: bool,

    /// Share maps with the kernel: `load` creates the loader's data maps (hash, array, per-CPU,
    /// LRU, queue, stack, bloom filter, LPM trie) in the kernel with the real bpf(), so kernel
    /// eBPF programs and the userspace programs agents run use the same maps. Needs BPF
    /// privileges (root or CAP_BPF); targets opening such maps need CAP_SYS_ADMIN, which
    /// `start --kernel-maps` checks up front.
    #[arg(long)]
    pub kernel_maps: bool,

    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// Which library to preload.
#[derive(Debug, Clone, Copy)]
pub enum Library {
    /// `libbpftime_syscall_server.so`, for loaders.
    SyscallServer,
    /// `libbpftime_agent.so`, for targets.
    Agent,
}

impl Library {
    fn file_name(self) -> &'static str {
        match self {
            Library::SyscallServer => "libbpftime_syscall_server.so",
            Library::Agent => "libbpftime_agent.so",
        }
    }
    fn env_override(self) -> &'static str {
        match self {
            Library::SyscallServer => "BPFTIME_SYSCALL_SERVER_LIB",
            Library::Agent => "BPFTIME_AGENT_LIB",
        }
    }
}

/// Finds a library: `$BPFTIME_*_LIB`, else beside the `bpftime` binary (the cargo target
/// directory), else `../lib` relative to it.
pub fn find_library(lib: Library) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(lib.env_override()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "{} points to {}, which does not exist",
            lib.env_override(),
            p.display()
        );
    }
    let exe = std::env::current_exe().context("cannot locate the bpftime binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for cand in [
        dir.join(lib.file_name()),
        dir.join("../lib").join(lib.file_name()),
    ] {
        if cand.is_file() {
            return Ok(cand.canonicalize().unwrap_or(cand));
        }
    }
    bail!(
        "{} not found beside {} (build it with `cargo build --release --workspace`, or set {})",
        lib.file_name(),
        exe.display(),
        lib.env_override()
    )
}

/// `--kernel-maps`: the privileges the command will need, checked before it runs so a missing
/// one is one clear message rather than failures inside the command.
fn check_kernel_maps(lib: Library) -> Result<()> {
    let name = |e: i32| std::io::Error::from_raw_os_error(e);
    match lib {
        Library::SyscallServer => bpftime_maps::kernel::probe_create().map_err(|e| {
            anyhow::anyhow!(
                "--kernel-maps needs BPF privileges to create maps in the kernel (run as root, \
                 or with CAP_BPF): creating a test map failed: {}",
                name(e)
            )
        }),
        Library::Agent => bpftime_maps::kernel::probe_open_by_id().map_err(|e| {
            anyhow::anyhow!(
                "--kernel-maps: the target needs CAP_SYS_ADMIN to open kernel maps by id \
                 (BPF_MAP_GET_FD_BY_ID; run as root): {}",
                name(e)
            )
        }),
    }
}

/// Replaces this process with `args.command`, `lib` preloaded. Returns only on failure.
pub fn exec_with(lib: Library, args: &LaunchArgs) -> anyhow::Error {
    if args.kernel_maps
        && let Err(e) = check_kernel_maps(lib)
    {
        return e;
    }
    let so = match find_library(lib) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut preload = OsString::from(&so);
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("BPFTIME_STORE", &args.store);
    if let Some(l) = &args.log {
        cmd.env("BPFTIME_LOG", l);
    }
    if let Some(f) = &args.log_file {
        cmd.env("BPFTIME_LOG_FILE", f);
    }
    if args.no_jit {
        cmd.env("BPFTIME_NO_JIT", "1");
    }
    if args.kernel_maps && matches!(lib, Library::SyscallServer) {
        cmd.env("BPFTIME_KERNEL_MAPS", "1");
    }
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!(
        "cannot run {}",
        PathBuf::from(&args.command[0]).display()
    ))
}
