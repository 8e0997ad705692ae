//! The crate's single error type.

use std::io;

/// Errors returned by `ext-perm`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A gfn range was empty or its end overflowed.
    #[error("invalid gfn range {start:#x}..{end:#x}")]
    InvalidRange {
        /// First gfn of the range.
        start: u64,
        /// One past the last gfn of the range.
        end: u64,
    },
    /// A GPA range was not page aligned.
    #[error("range at {gpa:#x} with size {size:#x} is not page aligned")]
    Unaligned {
        /// Guest-physical address of the range.
        gpa: u64,
        /// Size of the range in bytes.
        size: u64,
    },
    /// The view does not exist.
    #[error("view {0} does not exist")]
    NoSuchView(u16),
    /// The view already exists.
    #[error("view {0} already exists")]
    ViewExists(u16),
    /// A permission string was not of the form `rwx`, `r-x`, `---`...
    #[error("invalid permission string {0:?}")]
    InvalidPermissions(String),
    /// A KVM ioctl failed.
    #[error("KVM {operation} failed: {source}")]
    Kvm {
        /// The ioctl that failed.
        operation: &'static str,
        /// The errno KVM returned.
        source: vmm_sys_util::errno::Error,
    },
    /// The hypervisor lacks a capability the backend cannot work without.
    #[error("hypervisor lacks {0}")]
    MissingCapability(&'static str),
    /// Every memslot is in use.
    #[error("out of KVM memslots (limit {0})")]
    OutOfMemslots(u32),
    /// Guest memory could not be read or written.
    #[error("guest memory access at {gpa:#x} failed: {reason}")]
    GuestMemory {
        /// Guest-physical address of the access.
        gpa: u64,
        /// What vm-memory reported.
        reason: String,
    },
    /// A guest-virtual address has no translation.
    #[error("guest virtual address {0:#x} is not mapped")]
    Untranslated(u64),
    /// The instruction could not be decoded.
    #[error("cannot decode instruction at {rip:#x}")]
    Decode {
        /// Guest RIP of the instruction.
        rip: u64,
    },
    /// The software emulator does not implement the instruction.
    #[error("instruction {0} is not supported by the software emulator")]
    UnsupportedInstruction(String),
    /// A guest memory region does not fit KVM's memslot encoding.
    #[error("guest memory region at {0:#x} is not page aligned")]
    BadRegion(u64),
    /// Host I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
