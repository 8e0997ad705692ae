//! Errors of the page server and its client.
//!
//! The texts are what goes on the wire: a refused hello or a failed session sends the
//! server's error as the `error` field of an error message, and the client hands it on to the
//! VMM unchanged.

use std::io;
use std::path::PathBuf;

/// Errors of the page server (both halves).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot file cannot be served: unreadable, damaged, truncated, or a diff.
    #[error("snapshot {}: {source}", path.display())]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What ext-snapshot found.
        source: ext_snapshot::Error,
    },
    /// The socket path is empty, or its directory is missing.
    #[error("page server socket {}: {reason}", path.display())]
    SocketPath {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A system call on a socket or descriptor failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system error.
        source: io::Error,
    },
    /// The peer broke the protocol (`PAGE_SERVER.md`): garbage, another version, a missing
    /// or extra descriptor.
    #[error("{0}")]
    Protocol(String),
    /// The hello does not fit the snapshot served (regions, page size, snapshot identity).
    #[error("the region table does not match the snapshot: {0}")]
    RegionMismatch(String),
    /// Serving faults failed (a corrupt extent, a userfaultfd error).
    #[error("serving faults failed: {0}")]
    Serve(ext_snapshot::Error),
    /// The userfaultfd could not be created or registered (client side).
    #[error("userfaultfd: {0}")]
    Userfaultfd(String),
    /// The server answered the hello with an error.
    #[error("the page server refused the restore: {0}")]
    Refused(String),
}

impl Error {
    /// An [`Error::Io`] for `what`.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with the page server's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
