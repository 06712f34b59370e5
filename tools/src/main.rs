//! `bpftime`: the command line. Argument parsing only; the work is in the `bpftime_tools`
//! library (see `run.rs`).

#![forbid(unsafe_code)]

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use bpftime_tools::attach::{self, AttachArgs, DetachArgs};
use bpftime_tools::bench::{BenchArgs, exec_bench};
use bpftime_tools::launch::{LaunchArgs, Library, exec_with};
use bpftime_tools::list::{self, ListArgs};
use bpftime_tools::run::{self, RunArgs};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// bpftime: a userspace eBPF runtime.
#[derive(Debug, Parser)]
#[command(name = "bpftime", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one eBPF program in the interpreter and print r0.
    ///
    /// Exit status: 0 on success, 1 on a usage or input error, 2 when the loader checks reject
    /// the program, 3 when it traps.
    Run(RunArgs),
    /// Run an unmodified eBPF loader (libbpf tool, bpftrace, bcc) with its bpf() calls
    /// answered in userspace: programs and maps go into the shared-memory store. No root
    /// (except with `--kernel-maps`, which creates the data maps in the kernel).
    Load(LaunchArgs),
    /// Run a program with the agent preloaded: it attaches the store's probes inside it.
    Start(LaunchArgs),
    /// List the store's maps, programs, perf events, links and attached processes.
    List(ListArgs),
    /// Run a wasm-bpf guest module (`bpftime wasm run [OPTIONS] MODULE [ARGS]`).
    ///
    /// Execs `bpftime-wasm` (beside this binary, else on PATH, or `$BPFTIME_WASM`), which
    /// holds the Wasm engine; `bpftime wasm run --help` lists its options.
    #[command(disable_help_flag = true)]
    Wasm {
        /// `run` and its arguments, passed to `bpftime-wasm`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Benchmark bpftime against the kernel (uprobes, uretprobes, syscall tracepoints, maps,
    /// load latency, memory, VM suite) and write results.json, results.md and PNG plots.
    /// Runs `cargo bench --bench report` in the source tree; the kernel columns need root.
    Bench(BenchArgs),
    /// Load the agent into a running process (ptrace; same user, no root): it attaches the
    /// store's probes there. Returns once they are in place.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Attach(AttachArgs),
    /// Remove every hook of the agent in PID (or in every process with an agent on the store)
    /// and stop it; the target keeps running with its original code.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Detach(DetachArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on usage errors; keep 2 for "rejected by the loader checks".
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { run::EXIT_ERROR } else { 0 });
        }
    };
    let fail = |e: anyhow::Error| {
        eprintln!("bpftime: {e:#}");
        ExitCode::from(run::EXIT_ERROR)
    };
    match cli.command {
        Command::Run(args) => ExitCode::from(run::main(&args)),
        Command::Load(args) => fail(exec_with(Library::SyscallServer, &args)),
        Command::Start(args) => fail(exec_with(Library::Agent, &args)),
        Command::List(args) => match list::main(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Wasm { args } => fail(exec_wasm(&args)),
        Command::Bench(args) => fail(exec_bench(&args)),
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Command::Attach(args) => {
            attach::attach_main(&args).map_or_else(fail, |()| ExitCode::SUCCESS)
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Command::Detach(args) => {
            attach::detach_main(&args).map_or_else(fail, |()| ExitCode::SUCCESS)
        }
    }
}

/// Replaces this process with `bpftime-wasm ARGS`: `$BPFTIME_WASM`, else beside this binary,
/// else on `PATH`. Returns only on failure.
fn exec_wasm(args: &[std::ffi::OsString]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    const BIN: &str = "bpftime-wasm";
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(BIN)))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(BIN))
            .find(|p| p.is_file())
    };
    let Some(bin) = std::env::var_os("BPFTIME_WASM")
        .map(std::path::PathBuf::from)
        .or(beside)
        .or_else(on_path)
    else {
        return anyhow::anyhow!(
            "{BIN} not found beside this binary or on PATH (build it with `cargo build -p \
             bpftime-wasm-host`, or set BPFTIME_WASM)"
        );
    };
    let e = std::process::Command::new(&bin).args(args).exec();
    anyhow::anyhow!("cannot run {}: {e}", bin.display())
}
