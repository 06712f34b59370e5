//! All bpf_conformance vectors (`../shared/conformance/vectors.json`, or `BPF_CONFORMANCE_DIR`)
//! on the x86_64 JIT, unchecked and checked. A missing directory fails the test.
#![cfg(target_arch = "x86_64")]

use bpftime_jit::abi::{NATIVE_RAN, NATIVE_TRAPPED};
use bpftime_jit::{JitOptions, JitProgram, NativeOptions};
use bpftime_vm::helper::conformance_helpers;
use bpftime_vm::isa::insns_from_bytes;
use bpftime_vm::verifier::verify;

fn run_all(checked: bool) {
    let vectors = bpftime_testkit::vectors();
    let helpers = conformance_helpers();
    let opts = JitOptions {
        checked,
        native: Some(NativeOptions {
            ctx_writable: true,
            ..NativeOptions::default()
        }),
        ..Default::default()
    };
    let mut native = 0;
    let mut failures = Vec::new();
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
        let jit = match JitProgram::new(&prog, &helpers, &opts) {
            Ok(j) => j,
            Err(e) => {
                failures.push(format!("{name}: compile error: {e}"));
                continue;
            }
        };
        // The native entry (programs without helper calls), on its own copy of the memory:
        // the same r0 or the same trap (every vector that traps is an error vector).
        let mut copy = v.mem.clone();
        let ptr = if copy.is_empty() {
            std::ptr::null_mut()
        } else {
            copy.as_mut_ptr()
        };
        // SAFETY: `copy` outlives the run; no regions besides it.
        if let Some(out) = unsafe { jit.run_native(ptr, copy.len() as u64) } {
            native += 1;
            let hosted = jit.run(&mut v.mem.clone());
            let same = match (&hosted, out.status) {
                (Ok(r0), NATIVE_RAN) => *r0 == out.r0,
                (Err(_), NATIVE_TRAPPED) => out.r0 == 0,
                _ => false,
            };
            if !same {
                failures.push(format!(
                    "{name}: native entry gave {out:?}, hosted {hosted:?}"
                ));
            }
        }
        match jit.run(&mut mem) {
            Ok(r0) if r0 == expected => {}
            Ok(r0) => failures.push(format!(
                "{name}: r0 = {r0:#x}, expected {expected:#x}\n{}",
                bpftime_vm::disasm::disassemble(&insns)
            )),
            Err(t) => failures.push(format!(
                "{name}: {t} at `{}`",
                bpftime_vm::disasm::disassemble_at(&insns, t.pc)
            )),
        }
    }
    assert_eq!(vectors.len(), 313, "expected the full suite");
    assert!(
        failures.is_empty(),
        "{} of {} conformance vectors failed on the x86_64 JIT (checked: {checked}):\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    // Every vector without helper calls has a native entry.
    assert!(native > 200, "only {native} vectors got a native entry");
    println!(
        "conformance: {}/{} passed on the x86_64 JIT (checked: {checked}), {native} natively too",
        vectors.len(),
        vectors.len()
    );
}

#[test]
fn x86_64_jit_passes_all_313_conformance_vectors_unchecked() {
    run_all(false);
}

#[test]
fn x86_64_jit_passes_all_313_conformance_vectors_checked() {
    run_all(true);
}
