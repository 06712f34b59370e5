//! End-to-end tests of the `bpftime` and `bpftime-conformance-plugin` binaries, each run in a
//! temporary directory.
//!
//! Prerequisites: clang (for the example objects; `CLANG` overrides the command) and the
//! conformance vectors (`BPF_CONFORMANCE_DIR`, default `../../shared/conformance` from this
//! crate). A missing prerequisite fails the test when `CI=true` and skips it, loudly, otherwise.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;
use tempfile::TempDir;

const BPFTIME: &str = env!("CARGO_BIN_EXE_bpftime");
const PLUGIN: &str = env!("CARGO_BIN_EXE_bpftime-conformance-plugin");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Panics in CI, prints why the test is skipped elsewhere.
fn missing(what: &str) {
    assert!(!in_ci(), "CI=true but {what}");
    eprintln!("SKIPPED: {what}");
}

fn clang() -> Option<String> {
    static FOUND: OnceLock<Option<String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
            let ok = Command::new(&clang)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            ok.then_some(clang)
        })
        .clone()
}

/// Compiles `src` with the flags of `examples/vm/Makefile` into `dir`; `None` (skip) when clang
/// is missing outside CI.
fn build(src: &Path, dir: &Path) -> Option<PathBuf> {
    let Some(clang) = clang() else {
        missing("clang is not installed (apt-get install clang llvm)");
        return None;
    };
    let stem = src.file_name().unwrap().to_str().unwrap();
    let out = dir.join(stem.replace(".bpf.c", ".o"));
    let status = Command::new(clang)
        .args([
            "-O2", "-g", "-mcpu=v3", "-Wall", "-Werror", "-target", "bpf", "-c",
        ])
        .arg(src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run clang");
    assert!(status.success(), "clang failed on {}", src.display());
    Some(out)
}

fn example(name: &str, dir: &Path) -> Option<PathBuf> {
    build(&repo_root().join("examples/vm").join(name), dir)
}

fn fixture(name: &str, dir: &Path) -> Option<PathBuf> {
    build(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
        dir,
    )
}

fn run_with(bin: &str, args: &[&str], stdin: Option<&str>, cwd: &Path) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn binary");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("wait for binary")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn bpftime(args: &[&str], stdin: Option<&str>, cwd: &Path) -> Run {
    let out = run_with(BPFTIME, args, stdin, cwd);
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_r0(run: &Run, r0: u64) {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, format!("r0 = {r0:#x} ({r0})\n"));
}

/// Bytes as hex text.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn examples_return_the_documented_r0() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let mut cases: Vec<(&str, String, u64)> = vec![
        ("log2.bpf.c", hex(&1000u64.to_le_bytes()), 9),
        ("log2.bpf.c", hex(&u64::MAX.to_le_bytes()), 63),
        ("log2.bpf.c", hex(&1u64.to_le_bytes()), 0),
        ("log2.bpf.c", "00".into(), u64::MAX),
        ("prime.bpf.c", hex(&100u32.to_le_bytes()), 25),
        ("prime.bpf.c", hex(&1000u32.to_le_bytes()), 168),
        ("prime.bpf.c", hex(&2u32.to_le_bytes()), 0),
        (
            "switch.bpf.c",
            hex(&[
                &5u64.to_le_bytes()[..],
                &[0, 2, 3, 5, 6, 7, 8, 9, 1, 4, 0xff, 0, 0, 0, 0, 0],
            ]
            .concat()),
            0x2200_66ea_e000_0000,
        ),
        (
            "switch.bpf.c",
            hex(&[&7u64.to_le_bytes()[..], &[0; 16]].concat()),
            23,
        ),
    ];
    let mut strings = vec![0u8; 64];
    strings[..5].copy_from_slice(b"hello");
    strings[32..36].copy_from_slice(b"help");
    cases.push(("strcmp.bpf.c", hex(&strings), -4i64 as u64));
    strings[32..37].copy_from_slice(b"hello");
    cases.push(("strcmp.bpf.c", hex(&strings), 0));
    let src: Vec<u8> = (1..=64).collect();
    for n in [13u32, 64, 0, 200] {
        let mem = [&n.to_le_bytes()[..], &[0; 4], &src, &[0; 64]].concat();
        let copied = &src[..(n as usize).min(64)];
        cases.push(("memcpy.bpf.c", hex(&mem), fnv1a(copied)));
    }

    let mut built = std::collections::HashMap::new();
    for (name, mem, r0) in cases {
        if !built.contains_key(name) {
            let Some(obj) = example(name, d) else { return };
            built.insert(name, obj);
        }
        let run = bpftime(&["run", "--mem", &mem, path_str(&built[name])], None, d);
        assert_r0(&run, r0);
    }
    // No memory: r2 = 0, every example reports bad input.
    assert_eq!(built.len(), 5);
    for obj in built.values() {
        assert_r0(
            &bpftime(&["run", "--no-jit", path_str(obj)], None, d),
            u64::MAX,
        );
    }
}

#[test]
fn example_makefile_builds_every_example() {
    if clang().is_none() {
        return missing("clang is not installed");
    }
    let dir = TempDir::new().unwrap();
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(repo_root().join("examples/vm"))
        .arg(format!("BUILD={}", dir.path().display()))
        .arg(format!("CLANG={}", clang().unwrap()))
        .status();
    let Ok(status) = status else {
        return missing("make is not installed");
    };
    assert!(status.success());
    for name in ["log2", "prime", "memcpy", "switch", "strcmp"] {
        let obj = dir.path().join(format!("{name}.o"));
        assert!(obj.is_file(), "{} not built", obj.display());
    }
    let prime = dir.path().join("prime.o");
    let run = bpftime(
        &["run", "--mem", "64000000", path_str(&prime)],
        None,
        dir.path(),
    );
    assert_r0(&run, 25);
}

#[test]
fn assembly_file_runs() {
    let dir = TempDir::new().unwrap();
    let prog = dir.path().join("sum.s");
    std::fs::write(
        &prog,
        "# r0 = 1 + 2 + ... + 10\nmov %r0, 0\nmov %r1, 10\nloop:\nadd %r0, %r1\nsub %r1, 1\njne %r1, 0, loop\nexit\n",
    )
    .unwrap();
    assert_r0(&bpftime(&["run", "sum.s"], None, dir.path()), 55);
    // --format overrides the extension-based guess.
    let txt = dir.path().join("sum.txt");
    std::fs::copy(&prog, &txt).unwrap();
    assert_r0(
        &bpftime(&["run", "--format", "asm", "sum.txt"], None, dir.path()),
        55,
    );
}

#[test]
fn hex_program_from_stdin() {
    let dir = TempDir::new().unwrap();
    // mov r0, 0x2a; exit, with arbitrary whitespace.
    let run = bpftime(
        &["run", "-"],
        Some("b7 00 00 00 2a 00 00 00\n95000000\n00000000\n"),
        dir.path(),
    );
    assert_r0(&run, 42);
    // Assembly from stdin is recognised too.
    let run = bpftime(&["run", "-"], Some("mov %r0, 7\nexit\n"), dir.path());
    assert_r0(&run, 7);
}

#[test]
fn mem_sets_r1_and_r2() {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("p.s"),
        "ldxb %r0, [%r1+2]\nlsh %r0, 8\nadd %r0, %r2\nexit\n",
    )
    .unwrap();
    let run = bpftime(&["run", "--mem", "aa bb 11 cc dd", "p.s"], None, dir.path());
    assert_r0(&run, 0x1105);
    std::fs::write(dir.path().join("mem.bin"), [0u8, 0, 0x22]).unwrap();
    let run = bpftime(&["run", "--mem-file", "mem.bin", "p.s"], None, dir.path());
    assert_r0(&run, 0x2203);
    let run = bpftime(&["run", "--mem", "abc", "p.s"], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("invalid --mem"), "{}", run.stderr);
}

#[test]
fn bad_opcode_is_rejected_with_exit_2_and_the_pc() {
    let dir = TempDir::new().unwrap();
    let run = bpftime(
        &["run", "-"],
        Some("b700000000000000 ff00000000000000 9500000000000000"),
        dir.path(),
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("pc 1"), "{}", run.stderr);
    assert!(run.stderr.contains("unknown opcode 0xff"), "{}", run.stderr);
}

#[test]
fn out_of_bounds_load_traps_with_exit_3() {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("oob.s"),
        "mov %r0, 0\nldxw %r0, [%r1+8]\nexit\n",
    )
    .unwrap();
    let run = bpftime(&["run", "--mem", "00112233", "oob.s"], None, dir.path());
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr.starts_with("trap at pc 1: out-of-bounds load"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("1: ldxw %r0, [%r1+8]"),
        "{}",
        run.stderr
    );
}

#[test]
fn budget_exhaustion_traps() {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("spin.s"),
        "mov %r1, 1\njne %r1, 0, -1\nexit\n",
    )
    .unwrap();
    let run = bpftime(&["run", "--budget", "1000", "spin.s"], None, dir.path());
    assert_eq!(run.code, 3);
    assert!(run.stderr.contains("budget"), "{}", run.stderr);
}

#[test]
fn missing_file_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let run = bpftime(&["run", "no-such.o"], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr.contains("cannot read `no-such.o`") && run.stderr.contains("No such file"),
        "{}",
        run.stderr
    );
}

#[test]
fn unprovided_helper_is_named() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = fixture("helper.bpf.c", dir.path()) else {
        return;
    };
    let run = bpftime(&["run", path_str(&obj)], None, dir.path());
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("helper 14 (bpf_get_current_pid_tgid)")
            && run.stderr.contains("does not provide"),
        "{}",
        run.stderr
    );
    // Same from assembly: bpf_trace_printk is not provided either.
    std::fs::write(dir.path().join("printk.s"), "call 6\nexit\n").unwrap();
    let run = bpftime(&["run", "printk.s"], None, dir.path());
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("helper 6 (bpf_trace_printk)"),
        "{}",
        run.stderr
    );
}

#[test]
fn helper_set_is_kernel_ids_unless_conformance_is_asked() {
    let dir = TempDir::new().unwrap();
    // Helper 5 with r1 = 0: the conformance "unwind" stops with r0 = 0; bpf_ktime_get_ns
    // returns and the program goes on.
    std::fs::write(
        dir.path().join("h5.s"),
        "mov %r1, 0\ncall 5\nmov %r0, 9\nexit\n",
    )
    .unwrap();
    assert_r0(&bpftime(&["run", "h5.s"], None, dir.path()), 9);
    assert_r0(
        &bpftime(&["run", "--conformance-helpers", "h5.s"], None, dir.path()),
        0,
    );
    // bpf_get_prandom_u32 returns 32 bits.
    std::fs::write(dir.path().join("h7.s"), "call 7\nrsh %r0, 32\nexit\n").unwrap();
    assert_r0(&bpftime(&["run", "h7.s"], None, dir.path()), 0);
}

#[test]
fn maps_are_refused_with_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = fixture("maps.bpf.c", dir.path()) else {
        return;
    };
    let run = bpftime(
        &["run", "--program", "lookup", path_str(&obj)],
        None,
        dir.path(),
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("map `counts`")
            && run
                .stderr
                .contains("maps are not supported by `bpftime run` yet"),
        "{}",
        run.stderr
    );
    let run = bpftime(
        &["run", "--section", "xdp", path_str(&obj)],
        None,
        dir.path(),
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("global data in `.bss`")
            && run.stderr.contains("maps are not supported"),
        "{}",
        run.stderr
    );
}

#[test]
fn program_selection_in_a_multi_program_object() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = fixture("multi.bpf.c", dir.path()) else {
        return;
    };
    let obj = path_str(&obj);
    let run = bpftime(&["run", obj], None, dir.path());
    assert_eq!(run.code, 1);
    for choice in [
        "--program one (section socket)",
        "--program two (section xdp)",
        "--program three (section xdp)",
    ] {
        assert!(run.stderr.contains(choice), "{}", run.stderr);
    }
    // Each program calls the shared .text function `twice` (a bpf-to-bpf call).
    assert_r0(
        &bpftime(&["run", "--section", "socket", obj], None, dir.path()),
        2,
    );
    assert_r0(
        &bpftime(&["run", "--program", "two", obj], None, dir.path()),
        4,
    );
    assert_r0(
        &bpftime(&["run", "--program", "three", obj], None, dir.path()),
        7,
    );
    let run = bpftime(&["run", "--section", "xdp", obj], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("several programs"), "{}", run.stderr);
    let run = bpftime(&["run", "--program", "nope", obj], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("no program named `nope`"),
        "{}",
        run.stderr
    );
}

#[test]
fn object_without_program_sections_offers_its_text_functions() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = fixture("textonly.bpf.c", dir.path()) else {
        return;
    };
    let run = bpftime(
        &["run", "--mem", "0500000000000000", path_str(&obj)],
        None,
        dir.path(),
    );
    assert_r0(&run, 6);
}

#[test]
fn unknown_section_name_is_explained() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = fixture("badsection.bpf.c", dir.path()) else {
        return;
    };
    let run = bpftime(&["run", path_str(&obj)], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("unknown program section `prog`"),
        "{}",
        run.stderr
    );
}

#[test]
fn malformed_objects_are_errors_not_crashes() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = example("prime.bpf.c", dir.path()) else {
        return;
    };
    let bytes = std::fs::read(&obj).unwrap();
    let bad = dir.path().join("bad.o");
    // Truncations and byte flips: the tool must exit with a status, never a signal or panic.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..60 {
        let mut b = bytes.clone();
        if i % 3 == 0 {
            b.truncate((seed as usize) % b.len());
        }
        for _ in 0..4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % b.len().max(1);
            if let Some(byte) = b.get_mut(at) {
                *byte = (seed >> 32) as u8;
            }
        }
        std::fs::write(&bad, &b).unwrap();
        let run = bpftime(
            &["run", "--format", "elf", "--budget", "100000", "bad.o"],
            None,
            dir.path(),
        );
        assert!(
            (0..=3).contains(&run.code),
            "exit {}: {}",
            run.code,
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let dir = TempDir::new().unwrap();
    let run = bpftime(&["run", "--frobnicate", "x.s"], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("--frobnicate"), "{}", run.stderr);
    let run = bpftime(
        &["run", "--mem", "00", "--mem-file", "m", "x.s"],
        None,
        dir.path(),
    );
    assert_eq!(run.code, 1);
    let run = bpftime(&["run", "--help"], None, dir.path());
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("--conformance-helpers"));
}

#[test]
fn elf_selection_flags_need_an_elf_object() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("p.s"), "mov %r0, 1\nexit\n").unwrap();
    let run = bpftime(&["run", "--section", "xdp", "p.s"], None, dir.path());
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("ELF object"), "{}", run.stderr);
}

// ---- bpftime-conformance-plugin ----

fn conformance_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("BPF_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"));
    if dir.join("vectors.json").is_file() {
        Some(dir)
    } else {
        missing(&format!("no conformance vectors at {}", dir.display()));
        None
    }
}

/// Hex as bpf_conformance sends it: each byte followed by two spaces.
fn harness_hex(compact: &str) -> String {
    compact
        .as_bytes()
        .chunks(2)
        .map(|pair| format!("{}  ", std::str::from_utf8(pair).unwrap()))
        .collect()
}

fn plugin(args: &[&str], stdin: &str) -> Output {
    run_with(PLUGIN, args, Some(stdin), Path::new("."))
}

#[test]
fn plugin_passes_every_conformance_vector() {
    let Some(dir) = conformance_dir() else { return };
    let text = std::fs::read_to_string(dir.join("vectors.json")).unwrap();
    let vectors: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(vectors.len() >= 20, "only {} vectors", vectors.len());
    let start = Instant::now();
    let mut failures = Vec::new();
    for (v, engine) in vectors
        .iter()
        .flat_map(|v| [(v, "--interpret"), (v, "--jit")])
    {
        let name = v["name"].as_str().unwrap();
        let code = harness_hex(v["code"].as_str().unwrap());
        let mem = v["mem"].as_str().unwrap();
        let result = v["result"].as_str().unwrap();
        let expected = u64::from_str_radix(result.trim_start_matches("0x"), 16).unwrap();
        // The current harness passes memory only when there is some; options follow.
        let mem_arg = harness_hex(mem);
        let mut args = Vec::new();
        if !mem.is_empty() {
            args.push(mem_arg.as_str());
        }
        args.push(engine);
        let out = plugin(&args, &format!("{code}\n"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let got = u64::from_str_radix(stdout.trim(), 16).ok();
        if !out.status.success() || got != Some(expected) {
            failures.push(format!(
                "{name} {engine}: expected {expected:x}, got {:?} (exit {:?}, stderr {})",
                stdout.trim(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} conformance vectors in {:?}",
        vectors.len(),
        start.elapsed()
    );
}

#[test]
fn plugin_prints_lowercase_hex_without_prefix() {
    // lddw r0, 0xABCDEF0123456789; exit
    let out = plugin(
        &[],
        "18 00 00 00 89 67 45 23 00 00 00 00 ef cd ab 00 95 00 00 00 00 00 00 00",
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "abcdef23456789\n");
}

#[test]
fn plugin_reports_rejection_and_traps_on_stderr_with_both_engines() {
    let out = plugin(&[], "ff00000000000000 9500000000000000");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pc 0"));

    // ldxw r0, [r1+8] with 4 bytes of memory.
    let out = plugin(&["00  11  22  33  "], "6110080000000000 9500000000000000");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trap at pc 0") && stderr.contains("ldxw"),
        "{stderr}"
    );

    // The JIT (checked mode) gives the same result and the same trap.
    let out = plugin(&["--jit"], "b700000001000000 9500000000000000");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    let out = plugin(
        &["00  11  22  33  ", "--jit"],
        "6110080000000000 9500000000000000",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trap at pc 0") && stderr.contains("ldxw"),
        "{stderr}"
    );
}

#[test]
fn plugin_accepts_an_elf_object() {
    let dir = TempDir::new().unwrap();
    let Some(obj) = fixture("textonly.bpf.c", dir.path()) else {
        return;
    };
    let elf = harness_hex(&hex(&std::fs::read(obj).unwrap()));
    let out = plugin(&["29  00  00  00  00  00  00  00  ", "--elf"], &elf);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2a\n");
}
