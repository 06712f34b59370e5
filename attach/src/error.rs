//! The error type of this crate.

use std::path::PathBuf;

/// Why a hook could not be installed or removed, or a uprobe target could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The address is not inside an executable mapping of this process.
    #[error("address {addr:#x} is not in an executable mapping")]
    NotMapped { addr: usize },

    /// An instruction in the bytes to patch does not decode.
    #[error("undecodable instruction at {at:#x}")]
    Undecodable { at: usize },

    /// Control leaves the function (`ret`, `int3`, `ud2`, an indirect or backward jump) before
    /// enough bytes for the jump; a trap-based hook is the way to attach there.
    #[error(
        "function at {addr:#x} is too short to patch: {len} bytes before control leaves it, {needed} needed"
    )]
    TooShort {
        addr: usize,
        len: usize,
        needed: usize,
    },

    /// A branch targets the inside of the bytes that the jump would overwrite.
    #[error("branch at {branch:#x} targets {target:#x}, inside the bytes to patch at {addr:#x}")]
    BranchIntoPatch {
        addr: usize,
        branch: usize,
        target: usize,
    },

    /// The function jumps through a register or a table (a `switch`) whose targets cannot be
    /// known, so a patch of several bytes in its middle might be jumped into.
    #[error(
        "indirect jump at {branch:#x} has unknown targets: patching several bytes at {addr:#x}, inside its function, is not safe"
    )]
    UnknownBranchTargets { addr: usize, branch: usize },

    /// An instruction in the bytes to patch cannot be moved to the trampoline.
    #[error("instruction at {at:#x} cannot be relocated: {reason}")]
    Unrelocatable { at: usize, reason: &'static str },

    /// The relocation of the prologue into the trampoline failed (iced-x86's message).
    #[error("relocating the prologue at {addr:#x} failed: {message}")]
    Relocation { addr: usize, message: String },

    /// There is already a hook at this address.
    #[error("address {addr:#x} is already hooked")]
    AlreadyHooked { addr: usize },

    /// The bytes to patch overlap those of another hook.
    #[error("patching {addr:#x} would overlap the hook at {existing:#x}")]
    OverlapsHook { addr: usize, existing: usize },

    /// Every return-probe site is in use.
    #[error("too many return probes (limit {limit})")]
    TooManyReturnProbes { limit: usize },

    /// Every trap-based probe site is in use.
    #[error("too many trap-based probes (limit {limit})")]
    TooManyTraps { limit: usize },

    /// A probe with neither an entry nor a return handler.
    #[error("probe at {addr:#x} has no handler")]
    NoHandler { addr: usize },

    /// A system call failed.
    #[error("{op} failed")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A thread neither answered the stop signal nor could be seen to be outside the code being
    /// patched (it blocks the signal while running). The patch was rolled back.
    #[error("thread {tid} did not stop for patching within {millis} ms")]
    ThreadStopTimeout { tid: i32, millis: u64 },

    /// The process has more threads than the stop-the-world step can track.
    #[error("too many threads to stop for patching (limit {limit})")]
    TooManyThreads { limit: usize },

    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A line of `/proc/self/maps` did not parse.
    #[error("malformed /proc/self/maps line: {line:?}")]
    MapsParse { line: String },

    /// The file is not an ELF file goblin can parse.
    #[error("cannot parse ELF file {path}")]
    Elf {
        path: PathBuf,
        #[source]
        source: goblin::error::Error,
    },

    /// No defined symbol of that name.
    #[error("symbol {symbol:?} not found in {path}")]
    SymbolNotFound { path: PathBuf, symbol: String },

    /// The symbol's address is in no `PT_LOAD` segment backed by the file.
    #[error("symbol {symbol:?} at {vaddr:#x} is in no loadable segment of {path}")]
    SymbolNotLoaded {
        path: PathBuf,
        symbol: String,
        vaddr: u64,
    },

    /// No mapping of the file in this process covers the offset.
    #[error("offset {offset:#x} of {path} is not mapped in this process")]
    OffsetNotMapped { path: PathBuf, offset: u64 },
}

impl AttachError {
    /// An [`AttachError::Os`] from `errno`.
    pub(crate) fn last_os(op: &'static str) -> Self {
        Self::Os {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}
