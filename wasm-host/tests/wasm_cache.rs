//! The compiled-guest cache: entries are written privately, used only for the exact module
//! they were made from, and ignored in a directory others can write to.

mod wasm_support;

use bpftime_wasm_host::cache::compile;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use wasm_support::wat;
use wasmtime::{Engine, Module};

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bpftime-wasm-cache-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn exports(m: &Module) -> Vec<String> {
    m.exports().map(|e| e.name().to_owned()).collect()
}

fn entries(dir: &Path, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cache_entries_are_private_and_used_only_for_their_own_module() {
    let engine = Engine::default();
    let a = wat(r#"(module (func (export "a")))"#);
    let b = wat(r#"(module (func (export "b")))"#);
    let dir = scratch_dir("use");

    // First compile writes the entry, in a 0700 directory.
    let m = compile(&engine, &a, Some(&dir)).unwrap();
    assert_eq!(exports(&m), ["a"]);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let code = entries(&dir, "cwasm");
    assert_eq!(code.len(), 1);

    // Put b's compiled code under a's entry: the cache is really read (the loaded module is
    // b) while a's copy matches...
    let b_code = Module::from_binary(&engine, &b)
        .unwrap()
        .serialize()
        .unwrap();
    std::fs::write(&code[0], &b_code).unwrap();
    assert_eq!(exports(&compile(&engine, &a, Some(&dir)).unwrap()), ["b"]);

    // ...and never when the copy differs from the module being run: it is compiled afresh
    // (and the entry rewritten).
    let copy = entries(&dir, "wasm");
    std::fs::write(&copy[0], &b).unwrap();
    assert_eq!(exports(&compile(&engine, &a, Some(&dir)).unwrap()), ["a"]);
    assert_eq!(std::fs::read(&copy[0]).unwrap(), a);

    // Garbage code falls back to compiling.
    std::fs::write(&code[0], b"garbage").unwrap();
    assert_eq!(exports(&compile(&engine, &a, Some(&dir)).unwrap()), ["a"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_directory_others_can_write_is_neither_read_nor_written() {
    let engine = Engine::default();
    let a = wat(r#"(module (func (export "a")))"#);
    let b = wat(r#"(module (func (export "b")))"#);
    let dir = scratch_dir("open");
    compile(&engine, &a, Some(&dir)).unwrap();
    let code = entries(&dir, "cwasm");
    let b_code = Module::from_binary(&engine, &b)
        .unwrap()
        .serialize()
        .unwrap();
    std::fs::write(&code[0], &b_code).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(
        exports(&compile(&engine, &a, Some(&dir)).unwrap()),
        ["a"],
        "planted code in a shared directory is not loaded"
    );
    assert_eq!(
        std::fs::read(&code[0]).unwrap(),
        b_code,
        "nor is the entry rewritten"
    );
    // No cache at all, and a cache path that cannot be created, still compile.
    assert_eq!(exports(&compile(&engine, &a, None).unwrap()), ["a"]);
    let blocked = dir.join("file");
    std::fs::write(&blocked, b"x").unwrap();
    assert_eq!(
        exports(&compile(&engine, &a, Some(&blocked.join("sub"))).unwrap()),
        ["a"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
