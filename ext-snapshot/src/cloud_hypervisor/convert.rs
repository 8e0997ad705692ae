//! Conversion between a Cloud Hypervisor snapshot directory and an ext-snapshot file.
//!
//! The snapshot format has no place for a VMM's device state, so `config.json` and `state.json`
//! travel next to the snapshot, verbatim, in a sidecar directory `<snapshot>.ch/`
//! ([`sidecar_dir`]). `export-ch` needs it; a snapshot that was not imported from Cloud
//! Hypervisor cannot be exported ([`ChError::NoChMetadata`]).

use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{CONFIG_FILE, STATE_FILE};
use super::memory_ranges::{load_into, PageFill, PageSource};
use super::{write_dir, ChError, ChSnapshotDir};
use crate::error::Error;
use crate::format::{Run, PAGE_SIZE};
use crate::page_type::PageType;
use crate::reader::SnapshotFile;
use crate::writer::{SnapshotReport, SnapshotWriter, WriteOptions};

/// Where the Cloud Hypervisor JSON files of `snapshot` are kept: `<snapshot>.ch/`.
pub fn sidecar_dir(snapshot: &Path) -> PathBuf {
    let mut name = snapshot.as_os_str().to_owned();
    name.push(".ch");
    PathBuf::from(name)
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Bytes of guest memory `memory-ranges` describes (its apparent length).
    pub saved_bytes: u64,
    /// Bytes of `memory-ranges` that were data extents (not holes).
    pub copied_bytes: u64,
    /// The snapshot writer's report.
    pub snapshot: SnapshotReport,
}

/// Imports the Cloud Hypervisor snapshot directory `dir` into the snapshot file `out` (and its
/// sidecar). Guest RAM regions become the snapshot's regions; pages in holes of
/// `memory-ranges` or outside every saved range become never-populated pages.
pub fn import(dir: &Path, out: &Path, options: WriteOptions) -> Result<ImportReport, ChError> {
    let snapshot_dir = ChSnapshotDir::open(dir, PAGE_SIZE)?;
    let ranges: Vec<(GuestAddress, usize)> = snapshot_dir
        .layout
        .regions
        .iter()
        .map(|r| {
            usize::try_from(r.size)
                .map(|size| (GuestAddress(r.gpa), size))
                .map_err(|_| ChError::Inconsistent(format!("region of {:#x} bytes", r.size)))
        })
        .collect::<Result<_, _>>()?;
    // Fresh anonymous memory: only the data extents are written into it, so the writer's
    // residency scan sees holes as never populated without reading them.
    let memory = GuestMemoryMmap::<()>::from_ranges(&ranges)
        .map_err(|e| ChError::GuestMemory(0, e.to_string()))?;
    let copied_bytes = match snapshot_dir.open_memory()? {
        Some(file) => load_into(&file, &snapshot_dir.layout, &memory)?,
        None => 0,
    };
    let sidecar = sidecar_dir(out);
    std::fs::create_dir_all(&sidecar).map_err(|e| ChError::Io("creating the sidecar", e))?;
    std::fs::write(sidecar.join(CONFIG_FILE), &snapshot_dir.config_json)
        .map_err(|e| ChError::Io("writing the sidecar config.json", e))?;
    std::fs::write(sidecar.join(STATE_FILE), &snapshot_dir.state_json)
        .map_err(|e| ChError::Io("writing the sidecar state.json", e))?;
    let snapshot = SnapshotWriter::new(options).write_file(&memory, out)?;
    Ok(ImportReport {
        saved_bytes: snapshot_dir.layout.saved_bytes(),
        copied_bytes,
        snapshot,
    })
}

/// Exports `snapshot` (with its sidecar) to a Cloud Hypervisor snapshot directory `dir`.
/// Returns the bytes of guest memory written into `memory-ranges`.
pub fn export(snapshot: &Path, dir: &Path) -> Result<u64, ChError> {
    let sidecar = sidecar_dir(snapshot);
    let read = |name: &str| match std::fs::read(sidecar.join(name)) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ChError::NoChMetadata),
        Err(e) => Err(ChError::Io("reading the sidecar", e)),
    };
    let config_json = read(CONFIG_FILE)?;
    let state_json = read(STATE_FILE)?;
    let snapshot = SnapshotFile::open(snapshot)?;
    if snapshot.is_diff() {
        return Err(Error::NeedsParent.into());
    }
    let mut source = SnapshotPages {
        snapshot,
        cached: None,
        buffer: Vec::new(),
    };
    write_dir(
        dir,
        &config_json,
        &state_json,
        PAGE_SIZE as usize,
        &mut source,
    )
}

/// Serves pages of a parsed snapshot file, one data extent in memory at a time (extents are
/// at most 4 MiB and exports walk pages in order, so each is read once).
struct SnapshotPages {
    snapshot: SnapshotFile,
    cached: Option<u64>,
    buffer: Vec<u8>,
}

impl SnapshotPages {
    fn run_at(&self, gpa: u64) -> Option<(Run, u64)> {
        let region = self
            .snapshot
            .regions()
            .iter()
            .find(|r| gpa >= r.guest_addr && gpa - r.guest_addr < r.size)?;
        let page = (gpa - region.guest_addr) / PAGE_SIZE;
        let index = region
            .runs
            .partition_point(|r| r.first_page <= page)
            .checked_sub(1)?;
        Some((region.runs[index], page))
    }
}

impl PageSource for SnapshotPages {
    fn page(&mut self, gpa: u64, page: &mut [u8]) -> Result<PageFill, ChError> {
        let Some((run, index)) = self.run_at(gpa) else {
            return Err(ChError::Inconsistent(format!(
                "state.json saves {gpa:#x}, which the snapshot does not cover"
            )));
        };
        match (run.page_type, run.extent) {
            (PageType::Data, Some(extent)) => {
                if self.cached != Some(extent.offset) {
                    self.buffer.resize(extent.len as usize, 0);
                    self.snapshot.read_extent(&extent, &mut self.buffer)?;
                    self.cached = Some(extent.offset);
                }
                let start = ((index - run.first_page) * PAGE_SIZE) as usize;
                page.copy_from_slice(&self.buffer[start..start + PAGE_SIZE as usize]);
                Ok(PageFill::Data)
            }
            (PageType::Zero, _) => Ok(PageFill::Zero),
            (PageType::NotPopulated | PageType::Invalid, _) => Ok(PageFill::Hole),
            (PageType::SameAsParent, _) | (PageType::Data, None) => Err(Error::NeedsParent.into()),
        }
    }
}
