//! Support for the wasm-host tests: BPF objects and example guests built with clang, a
//! throw-away store, and Wasm text compiled to binary.
#![allow(dead_code, reason = "each test file uses a part")]

use bpftime_maps::Store;
use bpftime_suite::{profile_dir, skip, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The crate directory.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `bpftime-wasm` binary of this build.
pub fn bpftime_wasm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bpftime-wasm"))
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// Compiles `tests/bpf/<name>.bpf.c` with `clang -target bpf`; `None` after [`skip`] when
/// clang or libbpf's headers are missing.
pub fn bpf_object(name: &str) -> Option<Vec<u8>> {
    if !have("clang") {
        skip("clang is not installed (scripts/deps installs it)");
        return None;
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        skip("libbpf-dev is not installed (scripts/deps installs it)");
        return None;
    }
    let out_dir = profile_dir().join("wasm-host-tests");
    std::fs::create_dir_all(&out_dir).expect("create the test build dir");
    let src = crate_dir().join("tests/bpf").join(format!("{name}.bpf.c"));
    let out = out_dir.join(format!("{name}.bpf.o"));
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let r = Command::new("clang")
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-target",
            "bpf",
            "-idirafter",
            &multiarch,
            "-c",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run clang");
    assert!(
        r.status.success(),
        "clang failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    Some(std::fs::read(&out).expect("read the object"))
}

/// Builds the example guests of `examples/wasm` into `<target>/<profile>/examples/wasm`;
/// `None` after [`skip`] when the wasm toolchain (lld, wasi-libc) is missing.
pub fn example_guests() -> Option<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for tool in ["clang", "make", "llvm-strip", "wasm-ld"] {
        if !have(tool) {
            skip(&format!(
                "{tool} is not installed (scripts/deps installs it)"
            ));
            return None;
        }
    }
    if !Path::new("/usr/include/wasm32-wasi/stdio.h").exists() {
        skip("wasi-libc is not installed (scripts/deps installs it)");
        return None;
    }
    let out = profile_dir().join("examples").join("wasm");
    std::fs::create_dir_all(&out).expect("create the example build dir");
    let r = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(workspace_root().join("examples/wasm"))
        .arg(format!("BUILD={}", out.display()))
        .output()
        .expect("run make");
    assert!(
        r.status.success(),
        "building examples/wasm failed:\n{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Some(out)
}

/// A store of this process that is removed when dropped.
#[derive(Debug)]
pub struct ScratchStore {
    /// The store.
    pub store: Arc<Store>,
    path: PathBuf,
}

impl ScratchStore {
    /// A fresh store for `tag`.
    pub fn new(tag: &str) -> ScratchStore {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wasmtest-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = bpftime_maps::store::default_path(&name);
        let _ = std::fs::remove_file(&path);
        let store = Arc::new(Store::open(&path).expect("open a scratch store"));
        ScratchStore { store, path }
    }

    /// Live objects in the store.
    pub fn live(&self) -> usize {
        self.store.live_ids().len()
    }
}

impl Drop for ScratchStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Wasm text → binary.
pub fn wat(src: &str) -> Vec<u8> {
    wat::parse_str(src).expect("valid wat")
}
