//! Restoring snapshots into guest memory.
//!
//! Three modes share one guarantee — restored memory is bit-identical to the snapshotted
//! memory — and differ in when the bytes arrive (see [`RestoreMode`]). Every mode validates
//! the whole snapshot file (structure and every data checksum) before it touches guest memory.

mod eager;
#[cfg(feature = "lazy")]
pub mod lazy;
pub mod mapped;
pub(crate) mod segment;
mod target;

pub(crate) use eager::{raw_from_segments, restore_segments};

pub use eager::{
    restore_eager, restore_stream, restore_stream_staged, restore_to_raw_file, RawLayout,
};
pub use segment::Segment;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

/// How a snapshot's pages reach guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestoreMode {
    /// Copy data pages into memory before the guest runs; pages without data are never
    /// touched, so the host does not allocate them. Implemented by [`restore_eager`].
    Eager,
    /// Map data extents copy-on-write from the snapshot file; ranges without data stay
    /// anonymous. O(extents), independent of data size.
    Mapped,
    /// Serve page faults with userfaultfd: copy for data pages, the zero page for the others,
    /// with no background prefault of pages that have no data.
    Lazy,
}

/// Options of an eager restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EagerOptions {
    /// The target memory is freshly mapped and reads as zero everywhere (for example from
    /// [`fresh_memory`]). Then pages without data are left alone. When `false`, they are
    /// discarded so they read as zero: `MADV_DONTNEED` for private anonymous memory, a punched
    /// hole for shared file memory, written zeros otherwise.
    pub target_is_fresh: bool,
    /// Threads copying data (at least 1; default 2).
    pub threads: usize,
}

impl Default for EagerOptions {
    fn default() -> Self {
        EagerOptions {
            target_is_fresh: true,
            threads: 2,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RestoreReport {
    /// Pages whose bytes were written into memory (or into the raw file).
    pub data_pages: u64,
    /// Pages made to read as zero in a target that was not fresh.
    pub discarded_pages: u64,
    /// Seconds spent validating the snapshot before the first write.
    pub verify_seconds: f64,
    /// Seconds spent writing memory.
    pub restore_seconds: f64,
}

/// Fresh anonymous guest memory with `layout`'s regions (`(guest address, size)` pairs, as
/// returned by `SnapshotFile::layout`). Nothing is populated until written.
pub fn fresh_memory(layout: &[(u64, u64)]) -> Result<GuestMemoryMmap> {
    let ranges = layout
        .iter()
        .map(|&(addr, size)| {
            usize::try_from(size)
                .map(|s| (GuestAddress(addr), s))
                .map_err(|_| Error::UnsupportedMemory(format!("region of {size:#x} bytes")))
        })
        .collect::<Result<Vec<_>>>()?;
    GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| Error::UnsupportedMemory(format!("mapping fresh guest memory: {e}")))
}
