//! Runs all bpf_conformance vectors (`../shared/conformance/vectors.json`, or
//! `BPF_CONFORMANCE_DIR`) through the aarch64 JIT under emulation, unchecked and checked.
//! A missing directory fails the test: it never passes silently.

mod support_aarch64;

use bpftime_jit::JitOptions;
use bpftime_vm::helper::conformance_helpers;
use bpftime_vm::isa::insns_from_bytes;
use bpftime_vm::verifier::verify;
use std::time::Instant;
use support_aarch64::Emu;

fn run_all(checked: bool) {
    let vectors = bpftime_testkit::vectors();
    let helpers = conformance_helpers();
    let opts = JitOptions {
        checked,
        ..Default::default()
    };
    let mut emu = Emu::new();
    let mut failures = Vec::new();
    let start = Instant::now();
    for v in &vectors {
        let name = &v.name;
        let insns = insns_from_bytes(&v.code).unwrap();
        let mut mem = v.mem.clone();
        let expected = v.result;
        let prog = match verify(&insns, &helpers) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name}: rejected: {e}"));
                continue;
            }
        };
        match emu.compile_and_run(&prog, &helpers, &opts, &mut mem) {
            Ok(Ok(r0)) if r0 == expected => {}
            Ok(Ok(r0)) => failures.push(format!(
                "{name}: r0 = {r0:#x}, expected {expected:#x}\n{}",
                bpftime_vm::disasm::disassemble(&insns)
            )),
            Ok(Err(t)) => failures.push(format!(
                "{name}: {t} at `{}`",
                bpftime_vm::disasm::disassemble_at(&insns, t.pc)
            )),
            Err(e) => failures.push(format!(
                "{name}: {e}\n{}",
                bpftime_vm::disasm::disassemble(&insns)
            )),
        }
    }
    assert_eq!(vectors.len(), 313, "expected the full suite");
    assert!(
        failures.is_empty(),
        "{} of {} conformance vectors failed on the aarch64 JIT (checked: {checked}):\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    println!(
        "conformance: {}/{} passed on the aarch64 JIT (checked: {checked}) in {:?}",
        vectors.len(),
        vectors.len(),
        start.elapsed()
    );
}

#[test]
fn aarch64_jit_passes_all_313_conformance_vectors() {
    run_all(false);
}

#[test]
fn aarch64_jit_checked_passes_all_313_conformance_vectors() {
    run_all(true);
}
