//! Restoring guest memory from an ext-snapshot: checks before the VM exists, the copy
//! restore, and the page source of the on-demand restore.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ext_snapshot::{
    restore_eager, EagerOptions, PageType, Region, RestoreReport, SnapshotFile, PAGE_SIZE,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryRegion, GuestRegionMmap};

use crate::{Error, Result, SnapshotFigures, MEMORY_FILE};

/// A memory snapshot opened for a restore: its structure was verified when it was opened (a
/// truncated or inconsistent file never gets this far), its data checksums are verified by
/// the restore itself, before the VM runs: while the data is copied in
/// ([`restore_copy`](Self::restore_copy)), or whole before the first page is served
/// ([`page_source`](Self::page_source)).
#[derive(Debug)]
pub struct MemorySnapshot {
    file: SnapshotFile,
}

impl MemorySnapshot {
    /// Opens `<dir>/memory.ext-snapshot` and verifies its structure (header, region table,
    /// indexes, extent placement, content digest). A diff snapshot is refused: Cloud
    /// Hypervisor restores standalone snapshots only.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MEMORY_FILE);
        let failed = |source| Error::Snapshot {
            path: path.display().to_string(),
            source,
        };
        let file = SnapshotFile::open(&path).map_err(failed)?;
        if file.is_diff() {
            return Err(failed(ext_snapshot::Error::NeedsParent));
        }
        Ok(MemorySnapshot { file })
    }

    /// The snapshot's regions, `(guest address, size)` in address order.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.file.layout()
    }

    /// Pages by type and file size.
    pub fn figures(&self) -> Result<SnapshotFigures> {
        SnapshotFigures::of(&self.file)
    }

    /// Checks that `mem` has exactly the snapshot's regions.
    pub fn check_memory<M: GuestMemory>(&self, mem: &M) -> Result<()> {
        let theirs: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let ours = self.regions();
        if theirs != ours {
            return Err(Error::Layout {
                path: self.file.path().display().to_string(),
                detail: format!("snapshot regions {ours:x?}, VM memory regions {theirs:x?}"),
            });
        }
        Ok(())
    }

    /// Copies the data pages into `mem`, fresh memory that reads as zero: pages without
    /// data are not touched, so the host allocates nothing for them. Each extent's checksum is
    /// verified on the bytes just copied (the data is read once); on a failure every page
    /// written is released again and the error returned, so no VM runs on corrupt memory.
    pub fn restore_copy<M, B>(&self, mem: &M) -> Result<RestoreReport>
    where
        M: GuestMemory<R = GuestRegionMmap<B>>,
        B: Bitmap + Sync,
    {
        self.check_memory(mem)?;
        let report = restore_eager(&self.file, mem, EagerOptions::default()).map_err(|source| {
            Error::Snapshot {
                path: self.file.path().display().to_string(),
                source,
            }
        })?;
        self.record("copy", report.restore_seconds, Some(report.data_pages))?;
        Ok(report)
    }

    /// Records this restore for [`crate::figures`].
    fn record(&self, mode: &'static str, seconds: f64, pages_copied: Option<u64>) -> Result<()> {
        let mut figures = self.figures()?;
        figures.seconds = seconds;
        crate::figures::record_restore(crate::figures::Record {
            path: self.file.path().display().to_string(),
            mode,
            figures,
            pages_copied,
        });
        Ok(())
    }

    /// A source of page contents for an on-demand restore, over its own handle of the file.
    /// Verifies every data checksum first (faults are served from a file known intact).
    pub fn page_source(&self) -> Result<PageSource> {
        let path = self.file.path().display().to_string();
        self.file.verify_data().map_err(|source| Error::Snapshot {
            path: path.clone(),
            source,
        })?;
        self.record("ondemand", 0.0, None)?;
        let file = self.file.file().try_clone().map_err(|source| Error::Read {
            path: path.clone(),
            gpa: 0,
            source,
        })?;
        Ok(PageSource {
            file,
            path,
            regions: self.file.regions().to_vec(),
        })
    }
}

/// Page contents of a verified snapshot, by guest physical address: what an on-demand
/// restore's fault handler installs, and which pages its background prefault can skip.
#[derive(Debug)]
pub struct PageSource {
    file: File,
    path: String,
    regions: Vec<Region>,
}

impl PageSource {
    /// The region and run holding page `gpa`, and the page's index inside the region.
    fn locate(&self, gpa: u64) -> Option<(&Region, usize, u64)> {
        let r = self
            .regions
            .partition_point(|r| r.guest_addr + r.size <= gpa);
        let region = self.regions.get(r).filter(|r| r.guest_addr <= gpa)?;
        let page = (gpa - region.guest_addr) / PAGE_SIZE;
        let run = region
            .runs
            .partition_point(|run| run.first_page + run.pages <= page);
        (run < region.runs.len()).then_some((region, run, page))
    }

    /// Whether any page of `[gpa, gpa + len)` holds data. Pages outside the snapshot hold
    /// none.
    pub fn has_data(&self, gpa: u64, len: u64) -> bool {
        let mut at = gpa & !(PAGE_SIZE - 1);
        while at < gpa + len {
            let Some((region, run, _)) = self.locate(at) else {
                at += PAGE_SIZE;
                continue;
            };
            let run = &region.runs[run];
            if run.page_type == PageType::Data {
                return true;
            }
            at = region.guest_addr + (run.first_page + run.pages) * PAGE_SIZE;
        }
        false
    }

    /// Fills `buf` (a whole number of pages) with the contents of the pages from `gpa`:
    /// data pages from the file, every other page with zeros. `Ok(true)` if any page held
    /// data. `Err` if the range leaves the snapshot or the file cannot be read.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<bool> {
        let outside = |at: u64| Error::Read {
            path: self.path.clone(),
            gpa: at,
            source: std::io::Error::other("outside the snapshot's regions"),
        };
        if gpa % PAGE_SIZE != 0 || buf.len() as u64 % PAGE_SIZE != 0 {
            return Err(outside(gpa));
        }
        let mut any_data = false;
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let (region, run, page) = self.locate(at).ok_or_else(|| outside(at))?;
            let run = &region.runs[run];
            let left_in_run = (run.first_page + run.pages - page) * PAGE_SIZE;
            let chunk = (buf.len() - done).min(left_in_run as usize);
            let out = &mut buf[done..done + chunk];
            match (run.page_type, run.extent) {
                (PageType::Data, Some(extent)) => {
                    let offset = extent.offset + (page - run.first_page) * PAGE_SIZE;
                    self.file
                        .read_exact_at(out, offset)
                        .map_err(|source| Error::Read {
                            path: self.path.clone(),
                            gpa: at,
                            source,
                        })?;
                    any_data = true;
                }
                _ => out.fill(0),
            }
            done += chunk;
        }
        Ok(any_data)
    }
}
