//! `bpftime bench`: runs the benchmark report (`benches/report.rs` of the source tree) with
//! `cargo bench`, which builds the CLI, the agent, the syscall server and the bench binaries
//! in the bench profile first. The report needs the source tree (it builds the C examples with
//! their Makefiles), found at `--source`, `$BPFTIME_SOURCE_DIR`, or the tree this binary was
//! built from.

use clap::Args;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `bpftime bench [--quick] [--out DIR] [--source DIR]`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Fewer runs and calls: finishes in under two minutes once built (every scenario kind
    /// still runs).
    #[arg(long)]
    pub quick: bool,
    /// Folder for results.json, results.md and the PNG plots (created if missing).
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,
    /// The bpftime source tree (default: $BPFTIME_SOURCE_DIR, else the tree this binary was
    /// built from).
    #[arg(long, value_name = "DIR", env = "BPFTIME_SOURCE_DIR")]
    pub source: Option<PathBuf>,
}

/// The command line `cargo ARGS` that runs the report; `cwd` resolves a relative `--out`.
pub fn cargo_args(args: &BenchArgs, cwd: &Path) -> Vec<OsString> {
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        cwd.join(&args.out)
    };
    let mut v: Vec<OsString> = ["bench", "-p", "bpftime-suite", "--bench", "report", "--"]
        .iter()
        .map(OsString::from)
        .collect();
    v.push("--bench".into());
    if args.quick {
        v.push("--quick".into());
    }
    v.push("--out".into());
    v.push(out.into_os_string());
    v
}

/// Replaces this process with `cargo bench … --bench report -- …` in the source tree. Returns
/// only on failure.
pub fn exec_bench(args: &BenchArgs) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let src = args
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")));
    if !src.join("benches/report.rs").is_file() {
        return anyhow::anyhow!(
            "{} is not a bpftime source tree (no benches/report.rs); pass --source DIR or set \
             BPFTIME_SOURCE_DIR",
            src.display()
        );
    }
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => return anyhow::anyhow!("cannot read the current directory: {e}"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let e = std::process::Command::new(&cargo)
        .current_dir(&src)
        .args(cargo_args(args, &cwd))
        .exec();
    anyhow::anyhow!("cannot run {}: {e}", PathBuf::from(cargo).display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_out_is_resolved_against_the_callers_directory() {
        let a = BenchArgs {
            quick: true,
            out: "res".into(),
            source: None,
        };
        let v = cargo_args(&a, Path::new("/home/u"));
        let s: Vec<_> = v.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            s,
            [
                "bench",
                "-p",
                "bpftime-suite",
                "--bench",
                "report",
                "--",
                "--bench",
                "--quick",
                "--out",
                "/home/u/res"
            ]
        );
    }
}
