//! A per-user cache of compiled guests, so a guest starts without recompiling (Cranelift
//! dominates start-up: ~100 ms for a 35 KB module here, ~1 ms to load the cached code).
//!
//! Entries live in `$XDG_CACHE_HOME/bpftime/wasm` (else `~/.cache/bpftime/wasm`), a directory
//! of mode 0700 owned by the user: `<key>.wasm` (a copy of the module) and `<key>.cwasm`
//! (wasmtime's serialized code for it), `key` = a hash of the module and of the engine's
//! compatibility hash. An entry is used only if its `.wasm` copy equals the module byte for
//! byte, so a hash collision can never run other code than the module's own compilation.
//! Any failure (no home, unwritable, foreign owner, stale format) falls back to compiling.
//!
//! # Invariants
//! `Module::deserialize` runs only on bytes read from a directory owned by this user and not
//! accessible to others (checked on the open directory before reading), i.e. bytes that
//! `Module::serialize` of this program wrote there, or that the user put there themselves
//! (who can run any code anyway). wasmtime itself rejects code from another version or
//! configuration.

use std::hash::{Hash as _, Hasher as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use wasmtime::{Engine, Module};

/// The default cache directory, if the environment names a home.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("bpftime").join("wasm"))
}

fn key(engine: &Engine, wasm: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    wasm.hash(&mut h);
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}-{}", h.finish(), wasm.len())
}

/// Whether `dir` is a directory of this user that nobody else can reach into.
fn private_dir(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == euid() && m.mode() & 0o077 == 0)
}

fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// The module for `wasm`: from the cache in `dir` when it holds this exact module, else
/// compiled (and stored there for next time).
pub fn compile(engine: &Engine, wasm: &[u8], dir: Option<&Path>) -> wasmtime::Result<Module> {
    let Some(dir) = dir else {
        return Module::from_binary(engine, wasm);
    };
    let k = key(engine, wasm);
    let (copy, code) = (
        dir.join(format!("{k}.wasm")),
        dir.join(format!("{k}.cwasm")),
    );
    if private_dir(dir)
        && std::fs::read(&copy).is_ok_and(|c| c == wasm)
        && let Ok(bytes) = std::fs::read(&code)
    {
        // SAFETY: `bytes` come from this user's private cache directory (module invariant);
        // wasmtime checks the format, version and configuration.
        match unsafe { Module::deserialize(engine, &bytes) } {
            Ok(m) => {
                tracing::debug!("compiled module from {}", code.display());
                return Ok(m);
            }
            Err(e) => tracing::debug!("cached {} unusable: {e}", code.display()),
        }
    }
    let module = Module::from_binary(engine, wasm)?;
    if let Err(e) = store(dir, &copy, &code, wasm, &module) {
        tracing::debug!("not caching the compiled module in {}: {e}", dir.display());
    }
    Ok(module)
}

fn store(
    dir: &Path,
    copy: &Path,
    code: &Path,
    wasm: &[u8],
    module: &Module,
) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if !private_dir(dir) {
        return Err(std::io::Error::other("cache directory is not private"));
    }
    let bytes = module
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Write each file under a temporary name, then rename: readers see whole files only.
    let put = |path: &Path, data: &[u8]| -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, path)
    };
    put(code, &bytes)?;
    put(copy, wasm)
}
