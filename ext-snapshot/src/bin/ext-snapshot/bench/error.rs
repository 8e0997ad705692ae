//! The benchmark's error type: the library's errors plus the benchmark's own I/O and memory
//! failures (the library keeps its constructors to itself, and these are not snapshot errors).

/// Why a benchmark step failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Our writer, reader or a restore failed.
    #[error(transparent)]
    Snapshot(#[from] ext_snapshot::Error),
    /// A file operation of a baseline or of the set-up failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Guest memory could not be created, mapped or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
}

impl BenchError {
    /// An I/O failure while doing `context`.
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        BenchError::Io(context.into(), error)
    }
}

/// Result of a benchmark step.
pub type Result<T> = std::result::Result<T, BenchError>;
