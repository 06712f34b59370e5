//! eBPF programs attached to the host's own WASI calls (attach target `wasi:path_open`).
//!
//! The program runs in the host process, on the same runtime the agents use, every time the
//! guest calls `path_open`, before the call is carried out. Its context is
//! [`PathOpenCtx`] (`struct wasi_path_open_ctx` in `examples/wasm/wasm-bpf.h`): the call's
//! arguments and the path, copied from guest memory. A program that returns non-zero denies
//! the call, which then fails with WASI's `EACCES` (2) without touching the file system.
//!
//! # Invariants
//! The only unsafe code is the program run: its context pointer is a local
//! [`PathOpenCtx`] that outlives the run, and the length passed is its size.

use bpftime_runtime::LoadedProg;

/// Bytes of the path kept in the context (the rest is cut; `path_len` has the full length).
pub const PATH_BYTES: usize = 256;
/// WASI's `errno::acces`.
pub const WASI_EACCES: i32 = 2;
/// Attach targets this module provides.
pub const TARGETS: &[&str] = &["wasi:path_open"];

/// Context of a `wasi:path_open` program (little-endian, fixed offsets).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PathOpenCtx {
    /// Directory fd the path is relative to.
    pub dirfd: u32,
    /// `lookupflags`.
    pub dirflags: u32,
    /// `oflags` (creat, directory, excl, trunc).
    pub oflags: u32,
    /// `fdflags`.
    pub fdflags: u32,
    /// `fs_rights_base`.
    pub rights_base: u64,
    /// `fs_rights_inheriting`.
    pub rights_inheriting: u64,
    /// Length of the whole path.
    pub path_len: u32,
    /// Reserved (0).
    pub reserved: u32,
    /// The path, NUL-terminated, cut to 255 bytes.
    pub path: [u8; PATH_BYTES],
}

const _: () = assert!(size_of::<PathOpenCtx>() == 40 + PATH_BYTES);

impl PathOpenCtx {
    /// A context for a call with these arguments.
    pub fn new(args: [u64; 6], path: &[u8]) -> PathOpenCtx {
        let mut p = [0u8; PATH_BYTES];
        let n = path.len().min(PATH_BYTES - 1);
        p[..n].copy_from_slice(&path[..n]);
        PathOpenCtx {
            dirfd: args[0] as u32,
            dirflags: args[1] as u32,
            oflags: args[2] as u32,
            fdflags: args[3] as u32,
            rights_base: args[4],
            rights_inheriting: args[5],
            path_len: path.len().min(u32::MAX as usize) as u32,
            reserved: 0,
            path: p,
        }
    }
}

/// Programs attached to WASI calls, by owning object handle.
#[derive(Debug, Default)]
pub struct WasiHooks {
    path_open: Vec<(u64, LoadedProg)>,
}

impl WasiHooks {
    /// Whether `target` names a WASI call.
    pub fn is_wasi_target(target: &str) -> bool {
        target.starts_with("wasi:")
    }

    /// Attaches `prog` (of object `handle`) to `target`; false if the target is unknown.
    pub fn attach(&mut self, handle: u64, target: &str, prog: LoadedProg) -> bool {
        match target {
            "wasi:path_open" => {
                self.path_open.push((handle, prog));
                true
            }
            _ => false,
        }
    }

    /// Detaches everything object `handle` attached.
    pub fn detach_object(&mut self, handle: u64) {
        self.path_open.retain(|(h, _)| *h != handle);
    }

    /// Whether any program watches `path_open`.
    pub fn watches_path_open(&self) -> bool {
        !self.path_open.is_empty()
    }

    /// Runs the `path_open` programs; true if one denies the call. A program that traps
    /// neither allows nor denies on its own: the others still run, and the trap is logged.
    pub fn deny_path_open(&self, ctx: &PathOpenCtx) -> bool {
        let mut deny = false;
        for (_, prog) in &self.path_open {
            let mut c = *ctx;
            // SAFETY: `c` is a live local of `size_of::<PathOpenCtx>()` bytes for the whole
            // run (module invariant).
            let r = unsafe { prog.run((&raw mut c).cast::<u8>(), size_of::<PathOpenCtx>()) };
            match r {
                Ok(0) => {}
                Ok(_) => deny = true,
                Err(trap) => tracing::warn!("wasi:path_open program `{}`: {trap}", prog.name()),
            }
        }
        deny
    }
}
