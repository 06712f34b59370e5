//! `bpftime`: the command line. Argument parsing only; the work is in the `bpftime_tools`
//! library (see `run.rs`).

#![forbid(unsafe_code)]

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
    }
}
