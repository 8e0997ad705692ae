//! ext-clone's one error type.

use std::path::PathBuf;

/// Why a clone operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// A VMM's API call failed or was refused.
    #[error("API {call} on {}: {reason}", socket.display())]
    Api {
        /// The VMM's API socket.
        socket: PathBuf,
        /// The request, e.g. `PUT vm.pause`.
        call: String,
        /// What went wrong (no answer, timeout, or the error status and messages).
        reason: String,
    },
    /// The source VM cannot be cloned as it is.
    #[error("cannot clone this VM: {0}")]
    Source(String),
    /// A file or directory operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A clone's VMM did not start or did not come up in time.
    #[error("clone {index}: {reason}")]
    Clone {
        /// The clone's index.
        index: u32,
        /// What went wrong, with the end of its VMM's log.
        reason: String,
    },
    /// A termination signal arrived; everything begun was undone.
    #[error("interrupted by signal {0}; the source was resumed and unfinished clones removed")]
    Interrupted(i32),
    /// Anything else that cannot happen in a correct program.
    #[error("internal error: {0}")]
    Internal(String),
}

/// ext-clone's results.
pub type Result<T> = std::result::Result<T, CloneError>;
