//! `bpftime-conformance-plugin`: runs one program for the bpf_conformance suite.
//!
//! Protocol (bpf_conformance `src/bpf_conformance.cc`, and its `libbpf_plugin`):
//! - the program arrives on stdin as hex bytes (whitespace and newlines allowed), or in
//!   `--program HEX`; with `--elf` the hex is an ELF object instead of raw bytecode;
//! - the memory block, when there is one, is the first argument that does not start with `--`
//!   (hex bytes, whitespace allowed); r1 points to it, r2 is its length;
//! - r0 is printed in lowercase hex without a prefix (`std::hex` in the reference plugin), exit 0;
//! - a rejected or trapping program prints one line on stderr and exits 1.
//!
//! Options: `--interpret` (default), `--jit` (the x86_64 JIT, checked mode), `--elf`, `--debug`
//! (prints the disassembly to stderr). Helpers: the conformance set (#5 = "unwind").

#![forbid(unsafe_code)]

use anyhow::{Context as _, Result, bail};
use bpftime_jit::JitOptions;
use bpftime_jit::program::JitProgram;
use bpftime_tools::input::{decode_hex, insns_from_hex};
use bpftime_tools::object::{self, Select};
use bpftime_vm::disasm;
use bpftime_vm::helper::conformance_helpers;
use bpftime_vm::interpreter::Interpreter;
use bpftime_vm::verifier::verify;
use std::io::Read as _;
use std::process::ExitCode;

/// Enough for every conformance test by orders of magnitude; keeps a looping program from
/// hanging the suite.
const BUDGET: u64 = 1 << 32;

#[derive(Debug, Default)]
struct Options {
    program: Option<String>,
    memory: Option<String>,
    elf: bool,
    debug: bool,
    jit: bool,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options> {
    let mut opts = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // The harness passes option strings as given, possibly empty or with several options
        // in one argument; split on whitespace unless it is memory.
        if arg.trim().is_empty() {
            continue;
        }
        if !arg.trim_start().starts_with("--") {
            if opts.memory.is_some() {
                bail!("unexpected argument {arg:?}: memory was already given");
            }
            opts.memory = Some(arg);
            continue;
        }
        for flag in arg.split_whitespace() {
            match flag {
                "--interpret" => opts.jit = false,
                "--jit" => opts.jit = true,
                "--elf" => opts.elf = true,
                "--debug" => opts.debug = true,
                "--program" => {
                    let hex = args.next().context("--program needs a hex argument")?;
                    opts.program = Some(hex);
                }
                "--help" => bail!(
                    "usage: bpftime-conformance-plugin [<hex memory>] [--interpret] [--elf] \
                     [--debug] [--program <hex>] < program.hex"
                ),
                other => bail!("unexpected argument {other:?}"),
            }
        }
    }
    Ok(opts)
}

fn run(opts: &Options) -> Result<u64> {
    let program = match &opts.program {
        Some(hex) => hex.clone(),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the program from stdin")?;
            text
        }
    };
    let insns = if opts.elf {
        let bytes = decode_hex(&program).context("invalid hex ELF object")?;
        object::load(&bytes, &Select::Only)?.insns
    } else {
        insns_from_hex(&program)?
    };
    if opts.debug {
        eprint!("{}", disasm::disassemble(&insns));
    }
    let mut memory = match &opts.memory {
        Some(hex) => decode_hex(hex).context("invalid hex memory")?,
        None => Vec::new(),
    };
    let helpers = conformance_helpers();
    let prog = verify(&insns, &helpers).context("program rejected")?;
    let result = if opts.jit {
        JitProgram::new(
            &prog,
            &helpers,
            &JitOptions {
                checked: true,
                ..Default::default()
            },
        )
        .context("JIT compilation failed")?
        .run(&mut memory)
    } else {
        Interpreter::new(&prog, &helpers)
            .with_budget(Some(BUDGET))
            .run(&mut memory)
    };
    let r0 = result.map_err(|trap| {
        anyhow::anyhow!("{trap} ({})", disasm::disassemble_at(prog.insns(), trap.pc))
    })?;
    Ok(r0)
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|opts| run(&opts));
    match result {
        Ok(r0) => {
            println!("{r0:x}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn memory_is_the_first_non_option_argument() {
        let o = parse(&["aa  bb  ", "--elf"]).unwrap();
        assert_eq!(o.memory.as_deref(), Some("aa  bb  "));
        assert!(o.elf);
        let o = parse(&["--interpret"]).unwrap();
        assert!(o.memory.is_none());
        // The older harness always passes memory and one options string, both maybe empty.
        let o = parse(&["", ""]).unwrap();
        assert!(o.memory.is_none());
    }

    #[test]
    fn engine_flags_select_and_unknown_options_are_errors() {
        assert!(parse(&["--jit"]).unwrap().jit);
        assert!(!parse(&["--jit --interpret"]).unwrap().jit);
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["aa", "bb"]).is_err());
    }
}
