//! `bpftime-wasm`: runs a wasm-bpf guest module on bpftime's userspace backend. `bpftime wasm
//! …` execs this binary, so the `bpftime` CLI itself does not carry a Wasm engine.

use anyhow::{Context as _, Result};
use bpftime_wasm_host::run::{GuestConfig, open_store};
use bpftime_wasm_host::{Guest, signals};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Run wasm-bpf guests (eBPF control planes compiled to WebAssembly) with their eBPF programs
/// in userspace: programs go into the store, agents in processes started with
/// `bpftime start` run them.
#[derive(Debug, Parser)]
#[command(name = "bpftime-wasm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run MODULE (a WASI preview 1 module importing `wasm_bpf`) with ARGS.
    ///
    /// Exit status: the guest's; 1 when the module cannot be run, 3 when it traps, 130 when
    /// interrupted.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The store to use (a file `/dev/shm/bpftime-<uid>-<NAME>`).
    #[arg(
        long,
        value_name = "NAME",
        env = "BPFTIME_STORE",
        default_value = "default"
    )]
    store: String,

    /// Log level (`off`, `error`, `warn`, `info`, `debug`): load and attach failures are
    /// warnings.
    #[arg(
        long,
        value_name = "LEVEL",
        env = "BPFTIME_LOG",
        default_value = "warn"
    )]
    log: String,

    /// Give the guest a host directory: `HOST` (seen as the same path) or `HOST::GUEST`.
    /// Repeatable. Without it the guest sees no files.
    #[arg(long, value_name = "HOST[::GUEST]")]
    dir: Vec<String>,

    /// No status line while the guest waits for events (it is shown only on a terminal).
    #[arg(long)]
    no_status: bool,

    /// Compile the module even if the cache (`~/.cache/bpftime/wasm`) holds its code.
    #[arg(long)]
    no_cache: bool,

    /// The module.
    module: PathBuf,

    /// The guest's arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let Command::Run(args) = cli.command;
    match run(&args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("bpftime-wasm: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &RunArgs) -> Result<i32> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("bad --log level `{}`", args.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("cannot read {}", args.module.display()))?;
    let store = open_store(&args.store)?;
    let dirs = args
        .dir
        .iter()
        .map(|d| match d.split_once("::") {
            Some((h, g)) => (PathBuf::from(h), g.to_owned()),
            None => (PathBuf::from(d), d.clone()),
        })
        .collect();
    let mut argv = vec![
        args.module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    ];
    argv.extend(args.args.iter().cloned());
    let cfg = GuestConfig {
        args: argv,
        dirs,
        status: !args.no_status,
        inherit_stdio: true,
        cache_dir: if args.no_cache {
            None
        } else {
            bpftime_wasm_host::cache::default_dir()
        },
    };
    signals::install();
    let mut guest = Guest::new(store, &wasm, &cfg)?;
    if !guest.exports_func("_start") {
        anyhow::bail!(
            "{} exports no `_start`: build it as a WASI command (a `main` function)",
            args.module.display()
        );
    }
    let outcome = guest.run();
    if let bpftime_wasm_host::Outcome::Trapped(msg) = &outcome {
        eprintln!("bpftime-wasm: the guest trapped: {msg}");
    }
    Ok(outcome.exit_code())
}
