//! Cloud Hypervisor snapshot interoperability: `import-ch` and `export-ch`.
//!
//! Cloud Hypervisor's `vm.snapshot` writes a directory with `config.json`, `state.json` and
//! `memory-ranges` (see [`layout`] for what each holds). Importing reads the range table from
//! `state.json`, loads the data extents of `memory-ranges` into fresh anonymous guest memory
//! (holes are never touched, so they become never-populated pages) and hands that memory to
//! the snapshot writer, which types every page. Both JSON files are carried verbatim inside the
//! snapshot (see `FORMAT.md`) because a restore by Cloud Hypervisor needs them and nothing
//! else could rebuild them. Exporting writes them back and rebuilds `memory-ranges` from the
//! page types: data and zero pages are written, never-populated and invalid pages are left as
//! holes, so an imported snapshot exports to a byte-identical, equally sparse file.
//!
//! Called by the `ext-snapshot` CLI and usable by a VMM that wants to convert in process.

pub mod convert;
pub mod layout;
pub mod memory_ranges;

use std::path::{Path, PathBuf};

pub use convert::{export, import, sidecar_dir, ImportReport};
pub use layout::{MemoryLayout, MemoryRange, RamRegion};
pub use memory_ranges::{PageFill, PageSource};

/// Errors of the Cloud Hypervisor import and export.
#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// A file of the snapshot directory could not be read or written.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// `state.json` is not JSON of the shape Cloud Hypervisor writes.
    #[error("state.json is not a Cloud Hypervisor snapshot state: {0}")]
    StateJson(#[source] serde_json::Error),
    /// `state.json` has no memory manager section.
    #[error("state.json has no memory-manager snapshot")]
    NoMemoryManager,
    /// The range table, the regions and `memory-ranges` disagree.
    #[error("inconsistent Cloud Hypervisor snapshot: {0}")]
    Inconsistent(String),
    /// Guest memory refused an access.
    #[error("guest memory access at {0:#x} failed: {1}")]
    GuestMemory(u64, String),
    /// The snapshot carries no Cloud Hypervisor metadata to export.
    #[error("snapshot was not imported from Cloud Hypervisor: it has no config.json/state.json")]
    NoChMetadata,
    /// The snapshot file could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] crate::error::Error),
}

/// A Cloud Hypervisor snapshot directory, read and checked.
#[derive(Debug)]
pub struct ChSnapshotDir {
    /// The directory.
    pub path: PathBuf,
    /// `config.json`, byte for byte.
    pub config_json: Vec<u8>,
    /// `state.json`, byte for byte.
    pub state_json: Vec<u8>,
    /// The memory layout `state.json` describes.
    pub layout: MemoryLayout,
}

impl ChSnapshotDir {
    /// Reads `config.json` and `state.json` of `dir` and parses the memory layout.
    ///
    /// `memory-ranges` is only opened by [`ChSnapshotDir::open_memory`]; a snapshot whose
    /// range table is empty may lack it, as Cloud Hypervisor then writes no file.
    pub fn open(dir: &Path, page_size: u64) -> Result<Self, ChError> {
        let config_json = std::fs::read(dir.join(layout::CONFIG_FILE))
            .map_err(|e| ChError::Io("reading config.json", e))?;
        let state_json = std::fs::read(dir.join(layout::STATE_FILE))
            .map_err(|e| ChError::Io("reading state.json", e))?;
        let layout = layout::parse_state(&state_json, page_size)?;
        Ok(Self {
            path: dir.to_path_buf(),
            config_json,
            state_json,
            layout,
        })
    }

    /// Opens `memory-ranges`, or `None` when the range table is empty.
    pub fn open_memory(&self) -> Result<Option<std::fs::File>, ChError> {
        if self.layout.ranges.is_empty() {
            return Ok(None);
        }
        std::fs::File::open(self.path.join(layout::MEMORY_RANGES_FILE))
            .map(Some)
            .map_err(|e| ChError::Io("opening memory-ranges", e))
    }
}

/// Writes a Cloud Hypervisor snapshot directory: both JSON files verbatim and a
/// `memory-ranges` built from `source`. `dir` is created if missing; existing snapshot files
/// in it are an error (never overwritten). Returns the bytes of guest memory written.
pub fn write_dir(
    dir: &Path,
    config_json: &[u8],
    state_json: &[u8],
    page_size: usize,
    source: &mut dyn PageSource,
) -> Result<u64, ChError> {
    let layout = layout::parse_state(state_json, page_size as u64)?;
    std::fs::create_dir_all(dir).map_err(|e| ChError::Io("creating the export directory", e))?;
    for (name, bytes) in [
        (layout::CONFIG_FILE, config_json),
        (layout::STATE_FILE, state_json),
    ] {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .map_err(|e| ChError::Io("creating a JSON file of the export", e))?;
        file.write_all(bytes)
            .map_err(|e| ChError::Io("writing a JSON file of the export", e))?;
    }
    if layout.ranges.is_empty() {
        return Ok(0);
    }
    memory_ranges::write_file(
        &dir.join(layout::MEMORY_RANGES_FILE),
        &layout,
        page_size,
        source,
    )
}
