//! `bpftime run`: load one program (ELF object, assembly or hex), check it, run it in the
//! interpreter over a memory block, print r0.
//!
//! Exit status: 0 with `r0 = 0x<hex> (<decimal>)` on stdout; 1 for a usage, input or
//! unsupported-feature error (maps, CO-RE); 2 when the loader checks reject the program
//! (including a call to a helper the runner does not provide); 3 when the program traps.

use crate::helpers::{describe_kernel_helper, describe_registry, runner_helpers};
use crate::input::{
    Format, as_text, decode_hex, detect_format, insns_from_asm, insns_from_hex, read_source,
};
use crate::object::{self, Select};
use anyhow::{Context as _, Result, bail};
use bpftime_jit::JitOptions;
use bpftime_jit::program::JitProgram;
use bpftime_vm::disasm;
use bpftime_vm::helper::{HelperRegistry, conformance_helpers};
use bpftime_vm::interpreter::{Interpreter, Trap, TrapKind};
use bpftime_vm::isa::Insn;
use bpftime_vm::verifier::{VerifyError, VerifyErrorKind, verify};
use std::path::{Path, PathBuf};

/// Instructions a run may execute unless `--budget` says otherwise.
pub const DEFAULT_BUDGET: u64 = 100_000_000;

/// Exit status for errors before the program runs.
pub const EXIT_ERROR: u8 = 1;
/// Exit status when the loader checks reject the program.
pub const EXIT_REJECTED: u8 = 2;
/// Exit status when the program traps.
pub const EXIT_TRAP: u8 = 3;

/// Arguments of `bpftime run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The program: an ELF object (`clang -O2 -target bpf -c`), conformance assembly
    /// (`.s`/`.asm`) or bytecode as hex text; `-` reads standard input.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Run in the interpreter instead of the JIT (the default engine, which checks every
    /// memory access like the interpreter: a bad access is the same trap).
    #[arg(long)]
    pub no_jit: bool,

    /// The memory block, as hex bytes (whitespace ignored): r1 points to it, r2 is its length.
    /// Without memory r1 = r2 = 0.
    #[arg(long, value_name = "HEX", conflicts_with = "mem_file")]
    pub mem: Option<String>,

    /// The memory block, read from a file (raw bytes).
    #[arg(long, value_name = "PATH")]
    pub mem_file: Option<PathBuf>,

    /// ELF only: run the program in this section (`socket`, `xdp`, ...).
    #[arg(long, value_name = "NAME", conflicts_with = "program")]
    pub section: Option<String>,

    /// ELF only: run the program with this function name.
    #[arg(long, value_name = "NAME")]
    pub program: Option<String>,

    /// Stop the program with a trap after this many instructions; 0 means no limit. Counting
    /// needs the interpreter, so a budget implies `--no-jit` (whose default budget is
    /// 100,000,000).
    #[arg(long, value_name = "N")]
    pub budget: Option<u64>,

    /// How FILE is encoded; detected by default (ELF magic, `.s`/`.asm` extension, hex
    /// digits only).
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// Provide the bpf_conformance helper set (#5 = "unwind") instead of the kernel-compatible
    /// helpers `bpf_ktime_get_ns` (5) and `bpf_get_prandom_u32` (7).
    #[arg(long)]
    pub conformance_helpers: bool,
}

/// How a run ended, short of an error before the program started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program returned r0.
    Returned(u64),
    /// The loader checks rejected it; the message says why and where.
    Rejected(String),
    /// It trapped; the message has the pc and its disassembly.
    Trapped(String),
}

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_status(&self) -> u8 {
        match self {
            Outcome::Returned(_) => 0,
            Outcome::Rejected(_) => EXIT_REJECTED,
            Outcome::Trapped(_) => EXIT_TRAP,
        }
    }
}

/// Runs `bpftime run`, printing the result; returns the exit status.
pub fn main(args: &RunArgs) -> u8 {
    match run(args) {
        Ok(outcome) => {
            match &outcome {
                Outcome::Returned(r0) => println!("r0 = {r0:#x} ({r0})"),
                Outcome::Rejected(msg) => eprintln!("error: {msg}"),
                Outcome::Trapped(msg) => eprintln!("{msg}"),
            }
            outcome.exit_status()
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_ERROR
        }
    }
}

/// Loads, checks and runs the program `args` describe.
pub fn run(args: &RunArgs) -> Result<Outcome> {
    let insns = load_program(args)?;
    let mut mem = memory(args)?;
    let helpers = if args.conformance_helpers {
        conformance_helpers()
    } else {
        runner_helpers()
    };
    let engine = match (args.no_jit, args.budget) {
        (false, None) => Engine::Jit,
        (_, Some(b)) => Engine::Interpreter((b != 0).then_some(b)),
        (true, None) => Engine::Interpreter(Some(DEFAULT_BUDGET)),
    };
    execute(&insns, &helpers, &mut mem, engine)
}

/// Which engine `bpftime run` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The x86_64 JIT in checked mode.
    Jit,
    /// The interpreter, with an optional instruction budget.
    Interpreter(Option<u64>),
}

/// Checks and runs `insns` with `helpers` over `mem`.
pub fn execute(
    insns: &[Insn],
    helpers: &HelperRegistry,
    mem: &mut [u8],
    engine: Engine,
) -> Result<Outcome> {
    let prog = match verify(insns, helpers) {
        Ok(prog) => prog,
        Err(e) => return Ok(Outcome::Rejected(rejection(&e, helpers))),
    };
    let result = match engine {
        Engine::Interpreter(budget) => Interpreter::new(&prog, helpers)
            .with_budget(budget)
            .run(mem),
        Engine::Jit => JitProgram::new(
            &prog,
            helpers,
            &JitOptions {
                checked: true,
                ..Default::default()
            },
        )
        .context("the JIT cannot compile this program (try --no-jit)")?
        .run(mem),
    };
    Ok(match result {
        Ok(r0) => Outcome::Returned(r0),
        Err(trap) => Outcome::Trapped(describe_trap(&trap, prog.insns())),
    })
}

fn load_program(args: &RunArgs) -> Result<Vec<Insn>> {
    let bytes = read_source(&args.file)?;
    let stdin = args.file == Path::new("-");
    let path = (!stdin).then_some(args.file.as_path());
    let format = args.format.unwrap_or_else(|| detect_format(path, &bytes));
    let name = if stdin {
        "standard input".to_owned()
    } else {
        format!("`{}`", args.file.display())
    };
    if format != Format::Elf && (args.section.is_some() || args.program.is_some()) {
        bail!("--section and --program select a program in an ELF object, but {name} is {format}");
    }
    match format {
        Format::Elf => {
            let select = match (&args.section, &args.program) {
                (Some(s), _) => Select::Section(s.clone()),
                (_, Some(p)) => Select::Function(p.clone()),
                _ => Select::Only,
            };
            Ok(object::load(&bytes, &select)
                .with_context(|| format!("cannot load {name}"))?
                .insns)
        }
        Format::Asm => {
            insns_from_asm(as_text(&bytes, &name)?).with_context(|| format!("in {name}"))
        }
        Format::Hex => {
            insns_from_hex(as_text(&bytes, &name)?).with_context(|| format!("in {name}"))
        }
    }
}

fn memory(args: &RunArgs) -> Result<Vec<u8>> {
    if let Some(hex) = &args.mem {
        return decode_hex(hex).context("invalid --mem");
    }
    if let Some(path) = &args.mem_file {
        return std::fs::read(path)
            .with_context(|| format!("cannot read --mem-file `{}`", path.display()));
    }
    Ok(Vec::new())
}

fn rejection(e: &VerifyError, helpers: &HelperRegistry) -> String {
    match e.kind {
        VerifyErrorKind::UnknownHelper { id } => format!(
            "program calls {}, which `bpftime run` does not provide (provided: {})\n  loader \
             check: {e}",
            describe_kernel_helper(id),
            describe_registry(helpers)
        ),
        _ => format!("program rejected by the loader checks: {e}"),
    }
}

fn describe_trap(trap: &Trap, insns: &[Insn]) -> String {
    let hint = match trap.kind {
        TrapKind::BudgetExhausted => " (raise the limit with --budget N; 0 removes it)".to_owned(),
        TrapKind::UnknownHelper { id } => u32::try_from(id)
            .map(|id| format!(" ({})", describe_kernel_helper(id)))
            .unwrap_or_default(),
        _ => String::new(),
    };
    format!(
        "{trap}{hint}\n    {}: {}",
        trap.pc,
        disasm::disassemble_at(insns, trap.pc)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bpftime_vm::asm::assemble;

    fn exec(src: &str, mem: &mut [u8]) -> Outcome {
        let insns = assemble(src).unwrap();
        execute(
            &insns,
            &runner_helpers(),
            mem,
            Engine::Interpreter(Some(1000)),
        )
        .unwrap()
    }

    #[test]
    fn jit_and_interpreter_agree_including_traps() {
        for (src, mem) in [
            ("mov %r0, %r2\nexit\n", vec![0u8; 3]),
            ("mov %r0, 0\nldxw %r0, [%r1+8]\nexit\n", vec![0u8; 4]),
        ] {
            let insns = assemble(src).unwrap();
            // The same buffer for both, so trap addresses compare equal.
            let mut m = mem;
            let i = execute(&insns, &runner_helpers(), &mut m, Engine::Interpreter(None));
            let j = execute(&insns, &runner_helpers(), &mut m, Engine::Jit);
            assert_eq!(i.unwrap(), j.unwrap(), "{src}");
        }
    }

    #[test]
    fn returns_r0() {
        assert_eq!(exec("mov %r0, 42\nexit\n", &mut []), Outcome::Returned(42));
        assert_eq!(
            exec("mov %r0, %r2\nexit\n", &mut [0; 3]),
            Outcome::Returned(3)
        );
    }

    #[test]
    fn unprovided_helper_is_named() {
        let Outcome::Rejected(msg) = exec("call 14\nexit\n", &mut []) else {
            panic!("not rejected");
        };
        assert!(
            msg.contains("helper 14 (bpf_get_current_pid_tgid)"),
            "{msg}"
        );
        assert!(
            msg.contains("provided: 5 (bpf_ktime_get_ns), 7 (bpf_get_prandom_u32)"),
            "{msg}"
        );
    }

    #[test]
    fn trap_has_pc_and_disassembly() {
        let out = exec("mov %r0, 0\nldxw %r0, [%r1+8]\nexit\n", &mut [0; 4]);
        assert_eq!(out.exit_status(), EXIT_TRAP);
        let Outcome::Trapped(msg) = out else {
            unreachable!()
        };
        assert!(msg.starts_with("trap at pc 1: out-of-bounds load"), "{msg}");
        assert!(msg.contains("1: ldxw %r0, [%r1+8]"), "{msg}");
    }

    #[test]
    fn budget_exhaustion_is_a_trap_with_a_hint() {
        let Outcome::Trapped(msg) = exec("mov %r1, 1\njne %r1, 0, -1\nexit\n", &mut []) else {
            panic!("no trap");
        };
        assert!(msg.contains("budget") && msg.contains("--budget"), "{msg}");
    }

    #[test]
    fn ktime_helper_runs() {
        let out = exec("call 5\nmov %r0, 1\nexit\n", &mut []);
        assert_eq!(out, Outcome::Returned(1));
    }

    /// A clang-built program whose `bpf_loop` callback sums the indexes up to 9, where it
    /// stops the loop: r0 = 10 * 1000 + 45 on both engines.
    #[test]
    fn clang_built_bpf_loop_runs_on_both_engines() {
        const SRC: &str = r#"
typedef unsigned int __u32;
typedef unsigned long long __u64;
static long (*bpf_loop)(__u32 nr_loops, void *fn, void *ctx, __u64 flags) = (void *)181;
struct acc { __u64 sum; };
static int add(__u32 i, void *data)
{
    struct acc *a = data;
    a->sum += i;
    return i == 9;
}
__attribute__((section("socket"), used)) int prog(void *mem)
{
    struct acc a = { 0 };
    long n = bpf_loop(100, add, &a, 0);
    return n * 1000 + a.sum;
}
"#;
        let dir = std::env::temp_dir().join(format!("bpftime-run-loop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, obj) = (dir.join("loop.bpf.c"), dir.join("loop.o"));
        std::fs::write(&src, SRC).unwrap();
        let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
        let built = std::process::Command::new(clang)
            .args(["-O2", "-g", "-target", "bpf", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        if !built.is_ok_and(|s| s.success()) {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!ci, "CI=true but clang cannot build a BPF object");
            eprintln!("SKIPPED: clang cannot build a BPF object");
            return;
        }
        for no_jit in [false, true] {
            let args = RunArgs {
                file: obj.clone(),
                no_jit,
                mem: None,
                mem_file: None,
                section: None,
                program: None,
                budget: None,
                format: None,
                conformance_helpers: false,
            };
            assert_eq!(
                run(&args).unwrap(),
                Outcome::Returned(10_045),
                "no_jit {no_jit}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
