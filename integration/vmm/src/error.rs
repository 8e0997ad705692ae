//! The error type of the `vmm` module.

use std::io;

/// Everything that can go wrong while building, booting or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line option could not be parsed.
    #[error("invalid option {0}")]
    InvalidOption(String),
    /// Opening `/dev/kvm` or a KVM ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A host system call failed.
    #[error("{0} failed: {1}")]
    Sys(&'static str, #[source] io::Error),
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A file named in the configuration could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Loading the kernel, initramfs or command line failed.
    #[error("boot setup: {0}")]
    Boot(String),
    /// The configuration asks for something this VMM does not support.
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// Two devices claim overlapping bus ranges.
    #[error("bus range {0:#x}+{1:#x} overlaps another device")]
    BusOverlap(u64, u64),
    /// A vCPU stopped on an exit the VMM cannot handle.
    #[error("vCPU {0}: {1}")]
    VcpuExit(u8, String),
    /// A virtio device failed.
    #[error("virtio: {0}")]
    Virtio(String),
    /// The VM is not in a state that allows the operation.
    #[error("VM is {0:?}; cannot {1}")]
    InvalidState(ext_vmm_api::VmState, &'static str),
    /// A snapshot could not be written, or a snapshot directory is invalid (corrupt,
    /// truncated, another version, or not matching this host).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// ext-snapshot failed to write, validate or restore guest memory.
    #[error("snapshot memory: {0}")]
    SnapshotMemory(#[source] ext_snapshot::Error),
}

/// Result alias of the `vmm` module.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps the last OS error of a failed system call.
    pub fn last_os(what: &'static str) -> Self {
        Error::Sys(what, io::Error::last_os_error())
    }
}
