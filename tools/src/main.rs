//! `bpftime`: the command line. Argument parsing only; the work is in the `bpftime_tools`
//! library (see `run.rs`).

#![forbid(unsafe_code)]

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
    match cli.command {
        Command::Run(args) => ExitCode::from(run::main(&args)),
    }
}
