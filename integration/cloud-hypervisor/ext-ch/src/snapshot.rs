//! Writing guest memory as an ext-snapshot at `vm.snapshot`.

use std::path::Path;
use std::time::Instant;

use ext_snapshot::{PageSet, PageType, SnapshotWriter, WriteOptions, PAGE_SIZE};
use serde::Serialize;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestRegionMmap};

use crate::{Error, Result, MEMORY_FILE};

/// What a memory snapshot holds, by page type, and what writing it cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SnapshotFigures {
    /// Pages the host never populated.
    pub not_populated_pages: u64,
    /// Pages the guest gave back (balloon-inflated or free-page-reported).
    pub invalid_pages: u64,
    /// Populated pages that read as zero.
    pub zero_pages: u64,
    /// Pages stored with their bytes.
    pub data_pages: u64,
    /// Bytes of data stored (`data_pages` × 4096).
    pub data_bytes: u64,
    /// Size of the file.
    pub file_bytes: u64,
    /// Seconds from the start of the write to the file being in place.
    pub seconds: f64,
}

impl SnapshotFigures {
    /// The figures of an existing snapshot file (its header's counts; no timing).
    pub fn of(file: &ext_snapshot::SnapshotFile) -> Result<Self> {
        let pages = file.pages_by_type();
        let file_bytes = file.file_len().map_err(|source| Error::Snapshot {
            path: file.path().display().to_string(),
            source,
        })?;
        Ok(Self::from_counts(pages, file_bytes, 0.0))
    }

    fn from_counts(pages: [u64; 5], file_bytes: u64, seconds: f64) -> Self {
        SnapshotFigures {
            not_populated_pages: pages[PageType::NotPopulated as usize],
            invalid_pages: pages[PageType::Invalid as usize],
            zero_pages: pages[PageType::Zero as usize],
            data_pages: pages[PageType::Data as usize],
            data_bytes: pages[PageType::Data as usize] * PAGE_SIZE,
            file_bytes,
            seconds,
        }
    }
}

/// Writes `mem` as `<dir>/memory.ext-snapshot`, typing the pages of `invalid` (guest frame
/// numbers a balloon holds) `Invalid`. The VM must be paused. The file appears only when
/// complete (it is written under a temporary name and renamed); on `Err` nothing is left.
pub fn write_memory<M, B>(
    mem: &M,
    dir: &Path,
    invalid: Option<&dyn PageSet>,
) -> Result<SnapshotFigures>
where
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    let path = dir.join(MEMORY_FILE);
    let start = Instant::now();
    let mut writer = SnapshotWriter::new(WriteOptions::default());
    if let Some(invalid) = invalid {
        writer = writer.invalid_pages(invalid);
    }
    let report = writer
        .write_file(mem, &path)
        .map_err(|source| Error::Snapshot {
            path: path.display().to_string(),
            source,
        })?;
    let figures = SnapshotFigures::from_counts(
        report.pages_by_type,
        report.output_bytes,
        start.elapsed().as_secs_f64(),
    );
    crate::figures::record_snapshot(crate::figures::Record {
        path: path.display().to_string(),
        mode: "snapshot",
        figures,
        pages_copied: None,
    });
    Ok(figures)
}
