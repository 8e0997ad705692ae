//! The crate's one error type.
//!
//! Most variants describe a guest request the balloon refused: it logs them, counts them and
//! returns the descriptor chain to the used ring; they never end the daemon. [`Error::Punch`]
//! is the host refusing a hole (logged and counted, the request still succeeds),
//! [`Error::Queue`] a queue whose rings are unusable. [`Error::Listener`], [`Error::Daemon`],
//! [`Error::Signal`] and the configuration errors are the daemon's own; the control API and
//! snapshot variants come last.

use std::io;
use std::path::PathBuf;

/// Errors of `vhost-user-mem`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A guest range does not start or end on a 4 KiB page boundary.
    #[error("range at {addr:#x} of {len:#x} bytes is not 4 KiB aligned")]
    Unaligned {
        /// Guest physical address of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// A guest range is empty or its end overflows the address space.
    #[error("range at {addr:#x} of {len:#x} bytes is empty or overflows")]
    BadLength {
        /// Guest physical address of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// A guest range is not entirely inside the guest memory table.
    #[error("range at {addr:#x} of {len:#x} bytes is outside guest memory")]
    OutsideMemory {
        /// Guest physical address of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// A descriptor's buffer is not inside the guest memory table.
    #[error("descriptor buffer at {addr:#x} of {len} bytes is outside guest memory")]
    DescriptorOutsideMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer in bytes.
        len: u32,
    },
    /// A device-readable request came in a device-writable descriptor.
    #[error("request in a write-only descriptor at {addr:#x}")]
    WriteOnlyDescriptor {
        /// Guest physical address of the buffer.
        addr: u64,
    },
    /// A request is not a whole, non-zero number of entries.
    #[error("request of {len} bytes is not a whole non-zero number of {entry}-byte entries")]
    Malformed {
        /// Bytes in the request.
        len: usize,
        /// Size of one entry.
        entry: usize,
    },
    /// A request is larger than the device accepts in one chain.
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Bytes in the request (so far).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Guest memory at an address is not backed by a file, so it cannot be punched.
    #[error("guest memory at {addr:#x} is not backed by a file")]
    NotFileBacked {
        /// Guest physical address.
        addr: u64,
    },
    /// `fallocate(PUNCH_HOLE)` failed.
    #[error("punching {len:#x} bytes at file offset {offset:#x} failed")]
    Punch {
        /// File offset of the hole.
        offset: u64,
        /// Length of the hole.
        len: u64,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The queue's rings are not usable (addresses outside memory, bad index).
    #[error("virtqueue")]
    Queue(#[from] virtio_queue::Error),
    /// A config-space access outside the fields the device has, or a write to a read-only one.
    #[error("config space access of {size} bytes at offset {offset} refused")]
    ConfigAccess {
        /// Offset in the config space.
        offset: u32,
        /// Size of the access.
        size: usize,
    },
    /// `--socket` was empty.
    #[error("the socket path is empty")]
    EmptySocketPath,
    /// The directory that would hold the socket does not exist.
    #[error("the directory of the socket, {0}, does not exist")]
    SocketDirectoryMissing(PathBuf),
    /// `--log-level` was not one of error, warn, info, debug, trace.
    #[error("unknown log level {0:?} (error, warn, info, debug or trace)")]
    LogLevel(String),
    /// Signalling the guest through the call eventfd failed.
    #[error("cannot signal the guest")]
    Signal(#[source] io::Error),
    /// The vhost-user listening socket could not be created.
    #[error("cannot listen on the vhost-user socket")]
    Listener(#[source] vhost::vhost_user::Error),
    /// The vhost-user daemon framework failed outside a connection (thread start, accept).
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// `--api-socket` names the same path as `--socket`.
    #[error("the control API socket and the vhost-user socket are both {0}")]
    SameSocketTwice(PathBuf),
    /// The control API socket could not be created or served.
    #[error("control API socket {path}")]
    ApiSocket {
        /// The socket path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A request needs guest memory and no frontend has sent a memory table.
    #[error("no guest memory: no frontend has sent a memory table")]
    NoMemoryTable,
    /// A snapshot destination is not an absolute file path in an existing directory.
    #[error("snapshot destination {path}: {reason}")]
    SnapshotDestination {
        /// The destination asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// ext-snapshot could not write the snapshot (nothing is left at the destination).
    #[error("writing the snapshot {path} failed")]
    Snapshot {
        /// The destination.
        path: PathBuf,
        /// ext-snapshot's error.
        #[source]
        source: ext_snapshot::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
