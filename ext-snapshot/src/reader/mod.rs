//! Reading and validating snapshots.
//!
//! [`SnapshotFile::open`] validates every structure of a file (header, region table,
//! indexes, extent placement, content digest) and [`SnapshotFile::verify_data`] the checksum
//! of every data extent; restores call both before the first write into guest memory.
//! [`StreamReader`] validates a stream record by record.

mod holes;
mod stream;

pub use stream::{StreamReader, StreamRecord};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::format::file::HEADER_BLOCK_LEN;
use crate::format::{guest_offset_bases, Extent, FileLayout, Header, Region, PAGE_SIZE};
use crate::page_type::PageType;

/// Below this much data, extents are verified on one thread.
const PARALLEL_VERIFY_BYTES: u64 = 16 << 20;
/// Bytes `verify_data` reads and checksums at a time (as the eager restore's pieces).
const VERIFY_PIECE: usize = 256 << 10;

/// An open, structurally validated snapshot file.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    header: Header,
    regions: Vec<Region>,
    layout: FileLayout,
    data_verified: AtomicBool,
}

impl SnapshotFile {
    /// Opens and validates `path`. `Ok` means header, region table and indexes are intact and
    /// consistent and the extents tile the data area exactly; the extents' contents are checked
    /// by [`verify_data`](Self::verify_data). `Err` names the first problem found.
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        Self::from_file(file, path)
    }

    /// Like [`open`](Self::open) for an already open file; `path` is only used in messages
    /// and by [`path`](Self::path).
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let (header, regions, layout) = crate::format::file::parse(&file)?;
        Ok(SnapshotFile {
            file,
            path: path.to_owned(),
            header,
            regions,
            layout,
            data_verified: AtomicBool::new(false),
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Where the file keeps its data pages (header flag, see `FORMAT.md`).
    pub fn file_layout(&self) -> FileLayout {
        self.layout
    }

    /// The regions with their runs and extents, sorted by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// `(guest address, size)` of every region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect()
    }

    /// The underlying file (for mapping extents).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path the snapshot was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a diff (it has a parent and may hold `SameAsParent` pages).
    pub fn is_diff(&self) -> bool {
        self.header.parent.is_some()
    }

    /// Pages of each type, indexed by `PageType as usize`.
    pub fn pages_by_type(&self) -> [u64; 5] {
        crate::format::count_pages(&self.regions)
    }

    /// Bytes of stored page data.
    pub fn data_bytes(&self) -> u64 {
        self.pages_by_type()[PageType::Data as usize] * PAGE_SIZE
    }

    /// Length of the file in bytes.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("stat snapshot file", e))?
            .len())
    }

    /// Checks the crc32c of every data extent (on two threads) and, in the guest-offset
    /// layout, that the data area reads as zero outside the extents. `Ok` means every stored
    /// page is intact; `Err(BadChecksum)` names the first bad extent found. Remembers success, so
    /// calling it again is free.
    pub fn verify_data(&self) -> Result<()> {
        if self.data_verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let extents: Vec<Extent> = self
            .regions
            .iter()
            .flat_map(|r| r.runs.iter().filter_map(|run| run.extent))
            .collect();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let worker = || -> Result<()> {
            let mut buf = vec![0u8; VERIFY_PIECE];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= extents.len() || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if let Err(e) = self.verify_extent(&extents[i], &mut buf) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        };
        // Spawning is not worth it for a small snapshot.
        let data: u64 = extents.iter().map(|e| e.len).sum();
        if data < PARALLEL_VERIFY_BYTES {
            worker()?;
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..2).map(|_| s.spawn(worker)).collect();
                handles.into_iter().try_for_each(|h| {
                    h.join().map_err(|_| {
                        Error::io(
                            "verify thread",
                            std::io::Error::other("verify thread panicked"),
                        )
                    })?
                })
            })?;
        }
        self.verify_outside_extents()?;
        self.data_verified.store(true, Ordering::Release);
        Ok(())
    }

    /// In the guest-offset layout, checks that the data area reads as zero outside the
    /// extents (reading only the allocated bytes no extent covers); nothing to do in the
    /// packed layout. Part of [`verify_data`](Self::verify_data); a restore that checks the
    /// extents while copying them calls it before its first write.
    pub(crate) fn verify_outside_extents(&self) -> Result<()> {
        if self.layout != FileLayout::GuestOffset {
            return Ok(());
        }
        // Extents are in offset order in this layout (the parser checks each sits at its
        // page's own offset, regions one after the other).
        let spans: Vec<(u64, u64)> = self
            .regions
            .iter()
            .flat_map(|r| r.runs.iter().filter_map(|run| run.extent))
            .map(|e| (e.offset, e.len))
            .collect();
        let (_, data_end) = guest_offset_bases(self.regions.iter().map(|r| r.size))
            .ok_or_else(|| Error::Inconsistent("data area overflows".into()))?;
        holes::check_zero_outside_extents(&self.file, HEADER_BLOCK_LEN, data_end, &spans)
    }

    /// Whether [`verify_data`](Self::verify_data) (or a restore that verified every extent
    /// while copying it) has already succeeded on this file.
    pub fn is_data_verified(&self) -> bool {
        self.data_verified.load(Ordering::Acquire)
    }

    /// Records that every extent and the bytes outside them were verified by a restore.
    pub(crate) fn mark_data_verified(&self) {
        self.data_verified.store(true, Ordering::Release);
    }

    /// Checks `extent`'s crc32c, reading it in `buf.len()`-byte pieces: a piece small enough
    /// to stay in the CPU cache between the read and the checksum makes verification run at
    /// page-cache copy speed (a whole 4 MiB extent per read ran at a third of it here).
    fn verify_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        let mut crc = 0;
        let mut done = 0u64;
        while done < extent.len {
            let len = (extent.len - done).min(buf.len() as u64) as usize;
            let piece = &mut buf[..len];
            self.file
                .read_exact_at(piece, extent.offset + done)
                .map_err(|e| Error::read(format!("reading extent at {:#x}", extent.offset), e))?;
            crc = crate::format::checksum::crc32c_append(crc, piece);
            done += len as u64;
        }
        extent.check_crc(crc)
    }

    /// Reads `extent` into the start of `buf` (at least `extent.len` bytes) and checks its
    /// crc32c. `Err(BadChecksum)` if the bytes do not match, `Err(Truncated)`/`Err(Io)` if
    /// they cannot be read.
    pub fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        let len = usize::try_from(extent.len)
            .ok()
            .filter(|&l| l <= buf.len())
            .ok_or_else(|| Error::Inconsistent("extent larger than the read buffer".into()))?;
        let bytes = &mut buf[..len];
        self.file
            .read_exact_at(bytes, extent.offset)
            .map_err(|e| Error::read(format!("reading extent at {:#x}", extent.offset), e))?;
        extent.check_crc(crate::format::checksum::crc32c(bytes))
    }
}
