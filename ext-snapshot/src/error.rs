//! The one error type of the crate.
//!
//! Every rejection of a snapshot names what was wrong, so a caller can tell a corrupt file
//! (`BadChecksum`, `Truncated`, `Inconsistent`) from one it merely cannot read
//! (`UnsupportedVersion`, `UnsupportedPageSize`) and from a local failure (`Io`).

use std::io;

/// Errors of `ext-snapshot`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a snapshot, a stream, a memory file or `/proc/self/pagemap` failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The data does not start with the magic of the expected encoding.
    #[error("bad magic: not an ext-snapshot {encoding}")]
    BadMagic {
        /// "file" or "stream".
        encoding: &'static str,
    },
    /// The format version is not one this build reads.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    /// The page size recorded in the snapshot is not supported.
    #[error("unsupported page size {0}")]
    UnsupportedPageSize(u32),
    /// The header sets flag bits this build does not know.
    #[error("unknown header flags {0:#x}")]
    UnknownFlags(u32),
    /// A checksum does not match the bytes it covers.
    #[error("checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Which structure failed (header, region table, index of region N, extent at offset X...).
        what: String,
        /// The checksum stored in the snapshot.
        stored: u32,
        /// The checksum of the bytes actually read.
        computed: u32,
    },
    /// The snapshot ends before all the structures it announces.
    #[error("truncated snapshot: {0}")]
    Truncated(String),
    /// The structures are individually intact but contradict each other (overlapping or
    /// unsorted regions, runs that do not cover a region, extents out of place, unknown page
    /// type, non-zero reserved bytes...).
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(String),
    /// The guest memory does not have the regions the snapshot (or the parent) describes.
    #[error("region layout mismatch: {0}")]
    RegionMismatch(String),
    /// A snapshot chain is not linked correctly (a diff does not name the previous snapshot).
    #[error("broken snapshot chain: {0}")]
    BrokenChain(String),
    /// A diff snapshot (with `SameAsParent` pages) was used where a standalone one is needed.
    #[error("snapshot is a diff; restore or merge it as part of a chain")]
    NeedsParent,
    /// The guest memory cannot be handled (a region that is not mmap-backed, a size that is not
    /// a multiple of the page size...).
    #[error("unsupported guest memory: {0}")]
    UnsupportedMemory(String),
    /// A stream restore failed after some verified records had already been written into guest
    /// memory; the memory holds a mix of old and restored pages and must be discarded.
    #[error("stream restore aborted after writing {data_pages_written} data pages: {source}")]
    PartialRestore {
        /// How many data pages were written before the failure.
        data_pages_written: u64,
        /// Why the restore stopped.
        #[source]
        source: Box<Error>,
    },
}

/// Result type of `ext-snapshot`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Maps an unexpected end of input to `Truncated`, anything else to `Io`.
    pub(crate) fn read(context: impl Into<String>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated(context.into())
        } else {
            Error::io(context, source)
        }
    }
}
