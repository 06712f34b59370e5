//! The host's failures, each with the errno a guest receives (as a negative return value).

use bpftime_maps::MapError;
use bpftime_runtime::{LoadError, RuntimeError};

/// Why a host call failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A guest pointer or length outside the guest's memory, or a string without its NUL.
    #[error("guest memory access out of bounds: {what}")]
    Fault {
        /// Which argument.
        what: &'static str,
    },
    /// An argument no call accepts (negative length, unknown command, bad flags).
    #[error("invalid argument: {what}")]
    Invalid {
        /// Why.
        what: String,
    },
    /// An object handle, map fd or program name that does not exist.
    #[error("no such {what}: {name}")]
    NotFound {
        /// Kind of thing.
        what: &'static str,
        /// Which one.
        name: String,
    },
    /// A map fd that is not open.
    #[error("bad map fd {fd}")]
    BadFd {
        /// The fd.
        fd: i32,
    },
    /// A buffer polled again from inside its own callback.
    #[error("buffer of fd {fd} is being polled already")]
    Busy {
        /// The fd.
        fd: i32,
    },
    /// Something this host does not provide (yet).
    #[error("not supported: {what}")]
    NotSupported {
        /// What.
        what: String,
    },
    /// The ELF object could not be parsed or relocated.
    #[error("bad BPF object: {what}")]
    Object {
        /// Why.
        what: String,
    },
    /// A program was rejected by the loader checks or could not be relocated.
    #[error("program `{name}` rejected: {source}")]
    Program {
        /// Program name.
        name: String,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// The uprobe target could not be resolved.
    #[error("attach target `{target}`: {why}")]
    Target {
        /// The target as given.
        target: String,
        /// Why.
        why: String,
    },
    /// A map operation failed.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A store record could not be written or read.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl HostError {
    /// The Linux errno a guest sees (negated) for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            HostError::Fault { .. } => libc::EFAULT,
            HostError::Invalid { .. } | HostError::Object { .. } => libc::EINVAL,
            HostError::NotFound { .. } => libc::ENOENT,
            HostError::BadFd { .. } => libc::EBADF,
            HostError::NotSupported { .. } => libc::EOPNOTSUPP,
            HostError::Busy { .. } => libc::EBUSY,
            HostError::Program { source, .. } => source.errno(),
            HostError::Target { .. } => libc::ENOENT,
            HostError::Map(e) => e.errno(),
            HostError::Runtime(e) => e.errno(),
        }
    }

    /// `-errno`, as host calls return it.
    pub fn ret(&self) -> i32 {
        -self.errno()
    }

    pub(crate) fn invalid(what: impl Into<String>) -> HostError {
        HostError::Invalid { what: what.into() }
    }
}

/// Result of host operations.
pub type Result<T> = std::result::Result<T, HostError>;
