//! Writing snapshots of live guest memory.
//!
//! [`SnapshotWriter`] types every page of a `GuestMemory` made of `GuestRegionMmap` regions by
//! the cheapest evidence (host residency, then the caller's invalid-page set, then an all-zero
//! check; for a diff, the dirty set first) on all configured threads, then writes the file or
//! stream encoding. Memory use is bounded: data goes from guest memory straight to the output
//! and only the run lists (a few bytes per run) are held.
//!
//! The guest must not run while a snapshot is written (pause the vCPUs and devices first);
//! pages that change meanwhile are captured in an unspecified state.

mod page_set;
mod pipeline;
pub(crate) mod scan;
pub(crate) mod to_file;
mod to_stream;

pub use crate::page_type::is_zero_page;
pub use page_set::{GfnBitmap, GfnSet, MemoryDirtyBitmap, PageSet, RegionBitmaps};

pub(crate) use scan::push_run;
pub(crate) use to_file::{write_file as write_file_from, TempOutput};
pub(crate) use to_stream::write_stream as write_stream_from;

use std::io::Write;
use std::path::Path;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryRegion, GuestRegionMmap};

use crate::error::{Error, Result};
use crate::format::{count_pages, FileLayout, Header, ParentRef, SnapshotId, PAGE_SIZE, VERSION};
use crate::page_type::PageType;
use crate::reader::SnapshotFile;

/// Options of a snapshot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// `fsync` the file and its directory before returning (file encoding), or flush the
    /// writer (stream encoding, which cannot sync). Off by default: a snapshot that must
    /// survive a host crash asks for it.
    pub fsync: bool,
    /// Threads typing pages and checksumming data (at least 1; default 2). The calling thread
    /// writes the output meanwhile, in memory order.
    pub threads: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            fsync: false,
            threads: 2,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotReport {
    /// The new snapshot's identity.
    pub id: SnapshotId,
    /// Its content digest (what a diff against it records).
    pub digest: u32,
    /// Pages of each type, indexed by `PageType as usize`.
    pub pages_by_type: [u64; 5],
    /// Bytes written to the output (file length or stream length).
    pub output_bytes: u64,
    /// Seconds spent typing pages.
    pub scan_seconds: f64,
    /// Seconds spent writing the output.
    pub write_seconds: f64,
}

impl SnapshotReport {
    /// Number of pages of type `t`.
    pub fn pages(&self, t: PageType) -> u64 {
        self.pages_by_type[t as usize]
    }

    /// Guest bytes covered by pages of type `t`.
    pub fn bytes(&self, t: PageType) -> u64 {
        self.pages(t) * PAGE_SIZE
    }

    /// Pages of all types.
    pub fn total_pages(&self) -> u64 {
        self.pages_by_type.iter().sum()
    }
}

/// Supplies the bytes of data runs to the encoders.
pub(crate) trait DataSource: Sync {
    /// Calls `f` with the bytes of pages `[first_page, first_page + pages)` of region
    /// `region`, using `scratch` if the bytes must be copied first.
    fn with_data(
        &self,
        region: usize,
        first_page: u64,
        pages: u64,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()>;

    /// The bytes of the page range in place, when the source is memory that outlives the
    /// write (so many runs can go to the kernel in one vectored write). `None` otherwise.
    fn direct(&self, _region: usize, _first_page: u64, _pages: u64) -> Option<&[u8]> {
        None
    }
}

/// The parent of a diff: its reference and region layout.
#[derive(Debug, Clone)]
struct DiffBase<'a> {
    parent: ParentRef,
    layout: Vec<(u64, u64)>,
    dirty: &'a dyn PageSet,
}

/// Writes snapshots of guest memory. Build one per snapshot (it is cheap) and call
/// [`write_file`](Self::write_file) or [`write_stream`](Self::write_stream).
#[derive(Debug, Clone)]
pub struct SnapshotWriter<'a> {
    options: WriteOptions,
    invalid: Option<&'a dyn PageSet>,
    diff: Option<DiffBase<'a>>,
    layout: FileLayout,
}

impl std::fmt::Debug for dyn PageSet + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageSet")
    }
}

impl<'a> SnapshotWriter<'a> {
    /// A writer for a standalone snapshot with no invalid pages.
    pub fn new(options: WriteOptions) -> Self {
        SnapshotWriter {
            options,
            invalid: None,
            diff: None,
            layout: FileLayout::Packed,
        }
    }

    /// Chooses the layout of files written by [`write_file`](Self::write_file) (streams have
    /// none). [`FileLayout::Packed`] by default; [`FileLayout::GuestOffset`] puts every data
    /// page at its own offset in a sparse file, so a mapped restore needs one mapping per
    /// region (see `FORMAT.md`, "Layouts").
    pub fn file_layout(mut self, layout: FileLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Pages in `set` (balloon-inflated or free-page-reported) are recorded as
    /// [`PageType::Invalid`] without reading them, populated or not (a balloon that punched
    /// them out of a memfd still has them typed `Invalid`).
    pub fn invalid_pages(mut self, set: &'a dyn PageSet) -> Self {
        self.invalid = Some(set);
        self
    }

    /// Makes the snapshot a diff against `parent`: pages not in `dirty` are recorded as
    /// [`PageType::SameAsParent`]; dirty pages are typed as usual. The memory must have the
    /// parent's region layout (checked when writing).
    pub fn diff_against(mut self, parent: &SnapshotFile, dirty: &'a dyn PageSet) -> Self {
        self.diff = Some(DiffBase {
            parent: parent.header().as_parent(),
            layout: parent.layout(),
            dirty,
        });
        self
    }

    /// Like [`diff_against`](Self::diff_against) for a parent known only by reference and
    /// layout (for example one received as a stream).
    pub fn diff_against_ref(
        mut self,
        parent: ParentRef,
        layout: Vec<(u64, u64)>,
        dirty: &'a dyn PageSet,
    ) -> Self {
        self.diff = Some(DiffBase {
            parent,
            layout,
            dirty,
        });
        self
    }

    /// Writes the file encoding to `path` (through `<path>.tmp`, renamed into place on
    /// success; removed on failure). `Ok` carries what was written; `Err(UnsupportedMemory)`
    /// for memory the format cannot describe, `Err(RegionMismatch)` for a diff whose memory
    /// does not match the parent, `Err(Io)` for residency or output failures.
    pub fn write_file<M, B>(&self, mem: &M, path: &Path) -> Result<SnapshotReport>
    where
        M: GuestMemory<R = GuestRegionMmap<B>>,
        B: Bitmap + Sync,
    {
        let (source, header) = self.check(mem)?;
        let w = pipeline::write_memory_file(
            path,
            header,
            &source,
            self.invalid,
            self.diff.as_ref().map(|d| d.dirty),
            self.options,
            self.layout,
        )?;
        Ok(SnapshotReport {
            id: w.header.id,
            digest: w.header.digest,
            pages_by_type: count_pages(&w.regions),
            output_bytes: w.file_len,
            scan_seconds: w.scan_seconds,
            write_seconds: w.write_seconds,
        })
    }

    /// Writes the stream encoding to `out`. Same errors as [`write_file`](Self::write_file);
    /// on `Err` the stream is incomplete and a reader will reject it.
    pub fn write_stream<M, B, W>(&self, mem: &M, out: W) -> Result<SnapshotReport>
    where
        M: GuestMemory<R = GuestRegionMmap<B>>,
        B: Bitmap + Sync,
        W: Write,
    {
        let (source, header) = self.check(mem)?;
        let w = to_stream::write_memory_stream(
            out,
            header,
            &source,
            self.invalid,
            self.diff.as_ref().map(|d| d.dirty),
            self.options.threads.max(1),
        )?;
        Ok(SnapshotReport {
            id: w.header.id,
            digest: w.header.digest,
            pages_by_type: w.pages_by_type,
            output_bytes: w.len,
            scan_seconds: w.scan_seconds,
            write_seconds: w.write_seconds,
        })
    }

    /// Checks the memory layout (and against the parent for a diff); returns the memory as a
    /// data source and the new snapshot's header.
    fn check<'m, M, B>(&self, mem: &'m M) -> Result<(scan::MemorySource<'m, B>, Header)>
    where
        M: GuestMemory<R = GuestRegionMmap<B>>,
        B: Bitmap + Sync,
    {
        let regions: Vec<&GuestRegionMmap<B>> = mem.iter().collect();
        let layout: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        crate::format::check_layout(&layout)
            .map_err(|e| Error::UnsupportedMemory(e.to_string()))?;
        if let Some(diff) = &self.diff {
            if diff.layout != layout {
                return Err(Error::RegionMismatch(format!(
                    "memory has regions {layout:x?}, parent has {:x?}",
                    diff.layout
                )));
            }
        }
        let source = scan::MemorySource::new(regions);
        let header = Header {
            version: VERSION,
            page_size: PAGE_SIZE as u32,
            id: SnapshotId::random()?,
            parent: self.diff.as_ref().map(|d| d.parent),
            digest: 0,
        };
        Ok((source, header))
    }
}
