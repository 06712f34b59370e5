//! What the checked-JIT tests share: a no-op helper and traps compared without addresses.

use bpftime_vm::helper::CallEnv;

/// Helper 1 of the tests: does nothing, returns 0 (a call that clobbers r1–r5).
pub extern "C" fn nop(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    0
}

/// A trap without its address (the engines' stacks and each run's buffers live at different
/// addresses).
pub fn kind(t: bpftime_vm::interpreter::Trap) -> String {
    let k = format!("{:?}", t.kind);
    match k.split_once("addr: ") {
        Some((a, rest)) => format!("{a}{}", rest.split_once(',').map_or("", |r| r.1)),
        None => k,
    }
}
