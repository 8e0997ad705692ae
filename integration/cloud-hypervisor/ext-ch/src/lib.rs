//! The logic behind the patched Cloud Hypervisor v53.0's hooks.
//!
//! The patch series in `integration/cloud-hypervisor/` adds small hooks to Cloud Hypervisor's
//! `vmm` crate; what they do lives here, in code that builds and is tested in this workspace
//! on the same rust-vmm versions v53.0 pins:
//!
//! - [`write_memory`]: `vm.snapshot` writes guest memory as an ext-snapshot file
//!   ([`MEMORY_FILE`], typed pages, checksums) instead of the dense `memory-ranges`, and the
//!   memory manager's state records [`MEMORY_FORMAT`];
//! - [`MemorySnapshot`]: a restore opens and fully verifies that file before the VM exists,
//!   then copies only data pages into fresh memory ([`MemorySnapshot::restore_copy`]) or
//!   hands Cloud Hypervisor's userfaultfd handler a [`PageSource`] that serves data pages
//!   from the file and tells the background prefault which pages hold no data.
//!
//! - [`figures`]: the last snapshot and restore of this process, by page type, for the
//!   patched binary's `GET /api/v1/ext/vm.snapshot-figures`;
//! - [`balloon`]: the pages Cloud Hypervisor's in-process balloon holds, and [`vhost_user`]:
//!   the invalid-page maps of vhost-user backends that keep one (vhost-user-mem), both typed
//!   `Invalid` by the next snapshot.
//!
//! The crate takes guest memory through the `vm-memory` traits (Cloud Hypervisor's
//! `GuestMemoryMmap<AtomicBitmap>` fits) and knows nothing of Cloud Hypervisor's own types.

pub mod balloon;
pub mod figures;
mod restore;
mod snapshot;
pub mod vhost_user;

pub use ext_snapshot::GfnSet;
pub use restore::{MemorySnapshot, PageSource};
pub use snapshot::{write_memory, SnapshotFigures};

/// The value of the memory manager state's `memory_format` field for an ext-snapshot.
pub const MEMORY_FORMAT: &str = "ext-snapshot/1";

/// The name of the memory file inside a snapshot directory, next to Cloud Hypervisor's
/// `config.json` and `state.json`.
pub const MEMORY_FILE: &str = "memory.ext-snapshot";

/// What the patched binary writes in place of the memory range table, so that a stock
/// binary refuses the snapshot with this sentence (its state parser expects a table and
/// quotes the string it found) instead of restoring a VM without its memory.
pub const STOCK_REFUSAL: &str = "this snapshot's guest memory is an ext-snapshot \
     (memory.ext-snapshot, memory_format ext-snapshot/1): restore it with the patched \
     cloud-hypervisor of integration/cloud-hypervisor";

/// Errors of the hooks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot file is missing, unreadable, corrupt or truncated, or writing one failed.
    #[error("memory snapshot {path}: {source}")]
    Snapshot {
        /// The file.
        path: String,
        /// What ext-snapshot found.
        #[source]
        source: ext_snapshot::Error,
    },
    /// The snapshot's regions are not the guest memory's regions.
    #[error("memory snapshot {path} does not fit the VM's memory: {detail}")]
    Layout {
        /// The file.
        path: String,
        /// Which region differs.
        detail: String,
    },
    /// A page source read failed.
    #[error("reading guest page {gpa:#x} from {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The guest physical address of the page.
        gpa: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Results of the hooks.
pub type Result<T> = std::result::Result<T, Error>;
