//! Host residency: which guest pages the host ever populated, learned without reading them.
//!
//! Reading a never-populated anonymous page would populate it (and a hole of a memfd would
//! allocate a page cache page), so the writer asks the kernel instead: `/proc/self/pagemap`
//! for anonymous memory, `SEEK_DATA`/`SEEK_HOLE` for file-backed (memfd) memory. A private
//! mapping of a file needs both: the file's data plus the pages copied on write. Shared
//! anonymous memory has no reliable residency source and is read in full.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use crate::error::{Error, Result};
use crate::format::PAGE_SIZE;
use crate::sparse;

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// Answers "was this page ever populated?" for the regions of one guest memory.
#[derive(Debug)]
pub struct Residency {
    pagemap: File,
    /// For each file-backed region: the page ranges `[first, end)` (region-relative) that hold
    /// data in the file, found with one `SEEK_DATA`/`SEEK_HOLE` walk of the whole region.
    /// One walk, because `SEEK_HOLE` cannot be bounded: asking per chunk would rescan the
    /// rest of a fully populated file for every chunk.
    file_data: Vec<Option<Vec<(u64, u64)>>>,
}

impl Residency {
    /// Opens `/proc/self/pagemap` and walks the data of every file-backed region of
    /// `regions`; `Err(Io)` if either fails.
    pub fn new<B: Bitmap>(regions: &[&GuestRegionMmap<B>]) -> Result<Self> {
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| Error::io("open /proc/self/pagemap", e))?;
        let file_data = regions
            .iter()
            .map(|r| {
                r.file_offset()
                    .map(|fo| file_data_ranges(fo.file(), fo.start(), r.len() / PAGE_SIZE))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Residency { pagemap, file_data })
    }

    /// Fills `out[i]` with whether page `first_page + i` of `region` (index `index` in the
    /// list given to [`new`](Self::new)) is populated on the host, for `out.len()` pages.
    /// Reads no guest memory.
    pub fn populated<B: Bitmap>(
        &self,
        index: usize,
        region: &GuestRegionMmap<B>,
        first_page: u64,
        out: &mut [bool],
    ) -> Result<()> {
        out.fill(false);
        let shared = region.flags() & libc::MAP_SHARED != 0;
        match self.file_data.get(index).and_then(Option::as_ref) {
            Some(ranges) => {
                let end = first_page + out.len() as u64;
                let start = ranges.partition_point(|&(_, e)| e <= first_page);
                for &(a, b) in ranges[start..].iter().take_while(|&&(a, _)| a < end) {
                    let from = a.max(first_page) - first_page;
                    let to = b.min(end) - first_page;
                    out[from as usize..to as usize].fill(true);
                }
                if !shared {
                    self.pagemap_present(region, first_page, out)?;
                }
            }
            // Shared anonymous memory is shmem: a page swapped out of it is not reported
            // by pagemap, so "not present" would lose data. Treat every page as populated.
            None if shared => out.fill(true),
            None => self.pagemap_present(region, first_page, out)?,
        }
        Ok(())
    }

    /// ORs pagemap "present or swapped" into `out`.
    fn pagemap_present<B: Bitmap>(
        &self,
        region: &GuestRegionMmap<B>,
        first_page: u64,
        out: &mut [bool],
    ) -> Result<()> {
        let vaddr = region.as_ptr() as u64 + first_page * PAGE_SIZE;
        let mut entries = vec![0u8; 8 * 4096];
        let mut done = 0usize;
        while done < out.len() {
            let n = (out.len() - done).min(4096);
            let buf = &mut entries[..n * 8];
            let offset = (vaddr / PAGE_SIZE + done as u64) * 8;
            self.pagemap
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io("read /proc/self/pagemap", e))?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let entry = crate::format::le_u64(e);
                if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                    out[done + i] = true;
                }
            }
            done += n;
        }
        Ok(())
    }
}

/// The page ranges of `[start, start + pages * PAGE_SIZE)` of `file` that hold data, relative
/// to `start`, in order. Extents are rounded outward to whole pages; on a filesystem without
/// `SEEK_DATA` every page counts as populated (read and zero-checked), as a dense copy would.
fn file_data_ranges(file: &File, start: u64, pages: u64) -> Result<Vec<(u64, u64)>> {
    let extents = sparse::data_extents(file, start, pages * PAGE_SIZE)
        .map_err(|e| Error::io("lseek SEEK_DATA/SEEK_HOLE on guest memory file", e))?;
    Ok(extents
        .into_iter()
        .map(|r| {
            (
                (r.start - start) / PAGE_SIZE,
                (r.end - start).div_ceil(PAGE_SIZE),
            )
        })
        .collect())
}
