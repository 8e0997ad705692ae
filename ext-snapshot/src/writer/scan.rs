//! Typing pages of guest memory on several threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use super::{DataSource, PageSet};
use crate::error::{Error, Result};
use crate::format::{Region, Run, MAX_DATA_RUN_PAGES, PAGE_SIZE};
use crate::page_type::PageType;
use crate::residency::Residency;

/// Pages typed per work item: large enough to amortise a pagemap read, small enough to
/// balance two threads.
const CHUNK_PAGES: u64 = 8192;

/// The runs `(type, pages)` found in one chunk.
type ChunkRuns = Vec<(PageType, u64)>;

/// Whether a page (or any buffer) is all zero bytes.
///
/// Works on 256-byte blocks of `u64` words ORed together without early exit inside a block,
/// a shape the compiler turns into wide vector loads; returns at the first non-zero block.
pub fn is_zero_page(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Guest memory regions seen as byte ranges.
pub(crate) struct MemorySource<'m, B: Bitmap> {
    regions: Vec<&'m GuestRegionMmap<B>>,
}

impl<'m, B: Bitmap> MemorySource<'m, B> {
    pub(crate) fn new(regions: Vec<&'m GuestRegionMmap<B>>) -> Self {
        MemorySource { regions }
    }

    /// The bytes of pages `[first_page, first_page + pages)` of region `region`.
    ///
    /// Callers pass page ranges inside the region (they come from the scan of that region).
    fn pages(&self, region: usize, first_page: u64, pages: u64) -> Result<&[u8]> {
        let r = self
            .regions
            .get(region)
            .ok_or_else(|| Error::UnsupportedMemory(format!("no region {region}")))?;
        let end = (first_page + pages) * PAGE_SIZE;
        if end > r.len() {
            return Err(Error::UnsupportedMemory(format!(
                "page range ends at {end:#x}, region is {:#x} bytes",
                r.len()
            )));
        }
        // SAFETY: the range lies inside the region's mapping (checked above), which stays
        // mapped while `self` borrows the guest memory. The guest is paused while a snapshot
        // is written (documented precondition of the writer), so nothing writes these bytes
        // while the shared slice lives; any bit pattern is a valid `u8`.
        Ok(unsafe {
            std::slice::from_raw_parts(
                r.as_ptr().add((first_page * PAGE_SIZE) as usize),
                (pages * PAGE_SIZE) as usize,
            )
        })
    }
}

impl<B: Bitmap + Sync> DataSource for MemorySource<'_, B> {
    fn with_data(
        &self,
        region: usize,
        first_page: u64,
        pages: u64,
        _scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        f(self.pages(region, first_page, pages)?)
    }
}

/// Types every page of every region; returns regions with runs (no extents yet). Data runs are
/// split to at most [`MAX_DATA_RUN_PAGES`] pages.
pub(crate) fn scan<B: Bitmap + Sync>(
    source: &MemorySource<'_, B>,
    invalid: Option<&dyn PageSet>,
    dirty: Option<&dyn PageSet>,
    threads: usize,
) -> Result<Vec<Region>> {
    let residency = Residency::new()?;
    let mut chunks = Vec::new();
    for (ri, r) in source.regions.iter().enumerate() {
        let pages = r.len() / PAGE_SIZE;
        let mut p = 0;
        while p < pages {
            let n = CHUNK_PAGES.min(pages - p);
            chunks.push((ri, p, n));
            p += n;
        }
    }
    let results: Mutex<Vec<Option<ChunkRuns>>> = Mutex::new(vec![None; chunks.len()]);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> Result<()> {
        let mut populated = vec![false; CHUNK_PAGES as usize];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= chunks.len() || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (ri, first, n) = chunks[i];
            let r = source.regions[ri];
            let populated = &mut populated[..n as usize];
            let runs = residency
                .populated(r, first, populated)
                .and_then(|()| type_chunk(source, ri, first, populated, invalid, dirty));
            match runs {
                Ok(runs) => {
                    let mut all = results.lock().map_err(|_| poisoned())?;
                    all[i] = Some(runs);
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| poisoned())?)
    })?;
    let results = results.into_inner().map_err(|_| poisoned())?;

    let mut regions: Vec<Region> = source
        .regions
        .iter()
        .map(|r| Region {
            guest_addr: r.start_addr().0,
            size: r.len(),
            runs: Vec::new(),
        })
        .collect();
    for (&(ri, _, _), runs) in chunks.iter().zip(results) {
        let runs = runs.ok_or_else(poisoned)?;
        for (t, n) in runs {
            push_run(&mut regions[ri].runs, t, n);
        }
    }
    Ok(regions)
}

fn poisoned() -> Error {
    Error::io(
        "page typing thread",
        std::io::Error::other("a page typing thread panicked"),
    )
}

/// Appends `pages` pages of type `t`, merging with the last run and keeping data runs at most
/// [`MAX_DATA_RUN_PAGES`] long.
pub(crate) fn push_run(runs: &mut Vec<Run>, t: PageType, mut pages: u64) {
    while pages > 0 {
        let next_page = runs.last().map_or(0, |r| r.first_page + r.pages);
        let limit = if t.has_data() {
            MAX_DATA_RUN_PAGES
        } else {
            u64::MAX
        };
        match runs.last_mut() {
            Some(last) if last.page_type == t && last.pages < limit => {
                let add = pages.min(limit - last.pages);
                last.pages += add;
                pages -= add;
            }
            _ => {
                let add = pages.min(limit);
                runs.push(Run {
                    page_type: t,
                    first_page: next_page,
                    pages: add,
                    extent: None,
                });
                pages -= add;
            }
        }
    }
}

fn type_chunk<B: Bitmap + Sync>(
    source: &MemorySource<'_, B>,
    ri: usize,
    first: u64,
    populated: &[bool],
    invalid: Option<&dyn PageSet>,
    dirty: Option<&dyn PageSet>,
) -> Result<ChunkRuns> {
    let base_gfn = source.regions[ri].start_addr().0 / PAGE_SIZE;
    let mut runs: ChunkRuns = Vec::new();
    for (i, &present) in populated.iter().enumerate() {
        let page = first + i as u64;
        let gfn = base_gfn + page;
        let t = if dirty.is_some_and(|d| !d.contains(ri, page, gfn)) {
            PageType::SameAsParent
        } else if !present {
            PageType::NotPopulated
        } else if invalid.is_some_and(|s| s.contains(ri, page, gfn)) {
            PageType::Invalid
        } else if is_zero_page(source.pages(ri, page, 1)?) {
            PageType::Zero
        } else {
            PageType::Data
        };
        match runs.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => runs.push((t, 1)),
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_finds_any_non_zero_byte() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero_page(&page));
        for i in [0, 1, 255, 256, 2047, 4095] {
            page[i] = 1;
            assert!(!is_zero_page(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(!is_zero_page(&[0, 0, 3]));
    }

    #[test]
    fn push_run_merges_and_splits_data() {
        let mut runs = Vec::new();
        push_run(&mut runs, PageType::Zero, 3);
        push_run(&mut runs, PageType::Zero, 2);
        push_run(&mut runs, PageType::Data, MAX_DATA_RUN_PAGES + 5);
        let shape: Vec<_> = runs
            .iter()
            .map(|r| (r.page_type, r.first_page, r.pages))
            .collect();
        assert_eq!(
            shape,
            vec![
                (PageType::Zero, 0, 5),
                (PageType::Data, 5, MAX_DATA_RUN_PAGES),
                (PageType::Data, 5 + MAX_DATA_RUN_PAGES, 5)
            ]
        );
    }
}
