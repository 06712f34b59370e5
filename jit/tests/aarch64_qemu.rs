//! Cross-check of the emulator used by the other aarch64 tests: every conformance vector is
//! compiled once per mode and run both under Unicorn and natively under qemu-user (through
//! `support_aarch64/qemu_harness.c`, a static aarch64 binary); r0 and the memory block must
//! match each other and the expected result.
//!
//! Ignored by default (it needs Debian's `qemu-user` and `gcc-aarch64-linux-gnu`); run with
//! `cargo test -p bpftime-jit --test aarch64_qemu -- --ignored`.

mod support_aarch64;

use bpftime_jit::JitOptions;
use bpftime_jit::aarch64::compile_with;
use bpftime_vm::helper::conformance_helpers;
use bpftime_vm::isa::insns_from_bytes;
use bpftime_vm::verifier::verify;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support_aarch64::Emu;

fn conformance_dir() -> PathBuf {
    std::env::var_os("BPF_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/conformance"
            ))
        })
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn parse_result(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).expect("hex result"),
        None => s.parse::<i64>().map(|v| v as u64).expect("decimal result"),
    }
}

fn build_harness(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support_aarch64/qemu_harness.c");
    let exe = dir.join("qemu_harness");
    let out = Command::new("aarch64-linux-gnu-gcc")
        .args(["-O2", "-static", "-no-pie", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("aarch64-linux-gnu-gcc (apt-get install -y gcc-aarch64-linux-gnu)");
    assert!(
        out.status.success(),
        "harness build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn qemu(exe: &Path, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("qemu-aarch64")
        .arg(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-aarch64 (apt-get install -y qemu-user)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "qemu harness failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
#[ignore = "needs qemu-user and gcc-aarch64-linux-gnu"]
fn qemu_user_and_unicorn_agree_on_every_conformance_vector() {
    let dir = std::env::temp_dir().join(format!("bpftime-a64-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = build_harness(&dir);
    let addr = qemu(&exe, &["--helper-address"], &[]);
    let unwind = u64::from_str_radix(addr.trim().trim_start_matches("0x"), 16).unwrap();

    let text = std::fs::read_to_string(conformance_dir().join("vectors.json")).unwrap();
    let vectors: serde_json::Value = serde_json::from_str(&text).unwrap();
    let helpers = conformance_helpers();
    let mut emu = Emu::new();
    let mut input = Vec::new();
    // (name, expected r0, unicorn r0, unicorn memory after)
    let mut expected = Vec::new();
    for v in vectors.as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let insns = insns_from_bytes(&hex(v["code"].as_str().unwrap())).unwrap();
        let mem = hex(v["mem"].as_str().unwrap());
        let want = parse_result(v["result"].as_str().unwrap());
        let prog = verify(&insns, &helpers).unwrap();
        for checked in [false, true] {
            let opts = JitOptions {
                checked,
                ..Default::default()
            };
            let code = compile_with(&prog, &helpers, &|_, _| unwind, &opts).unwrap();
            let mut after = mem.clone();
            let uc = emu
                .compile_and_run(&prog, &helpers, &opts, &mut after)
                .unwrap()
                .unwrap_or_else(|t| panic!("{name}: unicorn trapped: {t}"));
            let label = format!("{name}/{}", if checked { "checked" } else { "unchecked" });
            for part in [label.as_bytes(), &code.code] {
                input.extend_from_slice(&(part.len() as u32).to_le_bytes());
                input.extend_from_slice(part);
            }
            input.extend_from_slice(&(code.entry as u32).to_le_bytes());
            input.extend_from_slice(&(mem.len() as u32).to_le_bytes());
            input.extend_from_slice(&mem);
            expected.push((label, want, uc, after));
        }
    }
    let out = qemu(&exe, &[], &input);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), expected.len(), "one line per program");
    let mut bad = Vec::new();
    for (line, (label, want, uc, after)) in lines.iter().zip(&expected) {
        let f: Vec<&str> = line.split(' ').collect();
        let r0 = u64::from_str_radix(f[1].trim_start_matches("0x"), 16).unwrap_or(0);
        let trap = f[2];
        let mem_hex: String = after.iter().map(|b| format!("{b:02x}")).collect();
        let qemu_mem = f.get(5).copied().unwrap_or("");
        if f[0] != label || r0 != *want || r0 != *uc || trap != "0" || qemu_mem != mem_hex {
            bad.push(format!(
                "{label}: qemu `{line}`, unicorn r0 {uc:#x}, expected {want:#x}"
            ));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        bad.is_empty(),
        "{} disagreements:\n{}",
        bad.len(),
        bad.join("\n")
    );
    println!(
        "qemu-user: {} runs ({} vectors × unchecked/checked) agree with unicorn and the \
         expected results",
        expected.len(),
        expected.len() / 2
    );
}
