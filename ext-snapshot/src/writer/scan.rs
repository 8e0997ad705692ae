//! Typing pages of guest memory on several threads.

use std::sync::{Condvar, Mutex};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use super::{DataSource, PageSet};
use crate::error::{Error, Result};
use crate::format::{Region, Run, MAX_DATA_RUN_PAGES, PAGE_SIZE};
use crate::page_type::{is_zero_page, PageType};
use crate::residency::Residency;

/// Pages typed per work item (8 MiB): large enough to amortise a pagemap read, small enough
/// that a few chunks fit the CPU's last-level cache (see [`lookahead`]).
const CHUNK_PAGES: u64 = 2048;

/// The runs found in one chunk, in page order.
pub(crate) type ChunkRuns = Vec<ChunkRun>;

/// Guest memory regions seen as byte ranges.
pub(crate) struct MemorySource<'m, B: Bitmap> {
    regions: Vec<&'m GuestRegionMmap<B>>,
}

impl<'m, B: Bitmap> MemorySource<'m, B> {
    pub(crate) fn new(regions: Vec<&'m GuestRegionMmap<B>>) -> Self {
        MemorySource { regions }
    }

    /// `(guest address, size)` of every region.
    pub(crate) fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// The bytes of pages `[first_page, first_page + pages)` of region `region`.
    ///
    /// Callers pass page ranges inside the region (they come from the scan of that region).
    pub(crate) fn pages(&self, region: usize, first_page: u64, pages: u64) -> Result<&[u8]> {
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

    fn direct(&self, region: usize, first_page: u64, pages: u64) -> Option<&[u8]> {
        self.pages(region, first_page, pages).ok()
    }
}

/// One run found in a chunk. Data runs never exceed [`MAX_DATA_RUN_PAGES`] and never cross
/// a chunk boundary, so their checksum can be computed by the thread that typed them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkRun {
    pub(crate) page_type: PageType,
    pub(crate) pages: u64,
    /// crc32c of the data (only for data runs, and only when asked).
    pub(crate) crc: u32,
}

/// A chunk of a region: `(region index, first page, pages)`.
pub(crate) type Chunk = (usize, u64, u64);

/// Chunks typed but not yet consumed, at most: the typing threads stay this close to the
/// consumer, so the data they checksummed is still in the CPU's last-level cache when the
/// consumer writes it (3 chunks of 8 MiB fit a 32 MiB L3 with room to spare), and more
/// threads still get a chunk each.
fn lookahead(threads: usize) -> usize {
    (threads + 1).max(3)
}

/// The chunks, their results and how far typing and consuming have got.
struct Queue {
    slots: Vec<Option<Result<ChunkRuns>>>,
    /// The next chunk nobody has claimed.
    next: usize,
    /// Chunks handed to `consume` so far.
    consumed: usize,
    /// Set when typing or consuming failed: nothing more is claimed.
    stop: bool,
}

impl Queue {
    /// Whether a chunk may be claimed now (one exists and it is inside the lookahead).
    fn claimable(&self, window: usize) -> bool {
        !self.stop && self.next < self.slots.len() && self.next < self.consumed + window
    }
}

/// Types every page of every region on `threads` threads and hands each chunk's runs to
/// `consume` **in memory order**, on the calling thread, while the other chunks are still being
/// typed (so the caller can write data while typing goes on). With `with_crc`, data runs carry
/// their checksum.
///
/// `threads` helpers type chunks, and the caller types the next unclaimed chunk itself
/// whenever the one it needs is not ready, so it never idles while typing is the bottleneck
/// (memory of zero pages). Typing stays at most [`lookahead`] chunks ahead of the consumer, so
/// the helpers sleep instead of competing with the caller's writes for the cores once they
/// are that far ahead.
pub(crate) fn scan_chunks<B: Bitmap + Sync>(
    source: &MemorySource<'_, B>,
    invalid: Option<&dyn PageSet>,
    dirty: Option<&dyn PageSet>,
    threads: usize,
    with_crc: bool,
    consume: &mut dyn FnMut(Chunk, ChunkRuns) -> Result<()>,
) -> Result<()> {
    let residency = Residency::new(&source.regions)?;
    let mut chunks: Vec<Chunk> = Vec::new();
    for (ri, r) in source.regions.iter().enumerate() {
        let pages = r.len() / PAGE_SIZE;
        let mut p = 0;
        while p < pages {
            let n = CHUNK_PAGES.min(pages - p);
            chunks.push((ri, p, n));
            p += n;
        }
    }
    let threads = threads.max(1);
    let window = lookahead(threads);
    let queue = Mutex::new(Queue {
        slots: (0..chunks.len()).map(|_| None).collect(),
        next: 0,
        consumed: 0,
        stop: false,
    });
    let changed = Condvar::new();
    // Types chunk `i` into its slot. A panic still fills the slot: the consumer waits for it.
    let type_into_slot = |i: usize, populated: &mut Vec<bool>| {
        let (ri, first, n) = chunks[i];
        let populated = &mut populated[..n as usize];
        let runs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            residency
                .populated(ri, source.regions[ri], first, populated)
                .and_then(|()| type_chunk(source, ri, first, populated, invalid, dirty, with_crc))
        }))
        .unwrap_or_else(|_| Err(poisoned()));
        let Ok(mut q) = queue.lock() else {
            return;
        };
        q.stop |= runs.is_err();
        q.slots[i] = Some(runs);
        drop(q);
        changed.notify_all();
    };
    let helper = || {
        let mut populated = vec![false; CHUNK_PAGES as usize];
        loop {
            let i = {
                let Ok(mut q) = queue.lock() else {
                    return;
                };
                while !q.claimable(window) {
                    if q.stop || q.next >= q.slots.len() {
                        return;
                    }
                    q = match changed.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
                q.next += 1;
                q.next - 1
            };
            type_into_slot(i, &mut populated);
        }
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(helper);
        }
        let mut populated = vec![false; CHUNK_PAGES as usize];
        let result = (|| {
            for (i, &chunk) in chunks.iter().enumerate() {
                let runs = loop {
                    let mut q = queue.lock().map_err(|_| poisoned())?;
                    if let Some(r) = q.slots[i].take() {
                        q.consumed = i + 1;
                        drop(q);
                        // Helpers waiting on the lookahead may go on.
                        changed.notify_all();
                        break r;
                    }
                    if q.claimable(window) {
                        // Not ready: type the next chunk here instead of waiting idle.
                        q.next += 1;
                        let j = q.next - 1;
                        drop(q);
                        type_into_slot(j, &mut populated);
                    } else {
                        drop(changed.wait(q).map_err(|_| poisoned())?);
                    }
                }?;
                consume(chunk, runs)?;
            }
            Ok(())
        })();
        // On failure the helpers claim nothing more; the scope joins them.
        if let Ok(mut q) = queue.lock() {
            q.stop = true;
        }
        changed.notify_all();
        result
    })
}

/// The regions of `source` with no runs yet.
pub(crate) fn empty_regions<B: Bitmap>(source: &MemorySource<'_, B>) -> Vec<Region> {
    source
        .regions
        .iter()
        .map(|r| Region {
            guest_addr: r.start_addr().0,
            size: r.len(),
            runs: Vec::new(),
        })
        .collect()
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
    with_crc: bool,
) -> Result<ChunkRuns> {
    let base_gfn = source.regions[ri].start_addr().0 / PAGE_SIZE;
    let mut runs: ChunkRuns = Vec::new();
    let mut run_start = first;
    for (i, &present) in populated.iter().enumerate() {
        let page = first + i as u64;
        let gfn = base_gfn + page;
        let t = if dirty.is_some_and(|d| !d.contains(ri, page, gfn)) {
            PageType::SameAsParent
        } else if invalid.is_some_and(|s| s.contains(ri, page, gfn)) {
            // Before residency: a balloon punches out the pages it takes, and they are still
            // the guest's declared-invalid pages, not merely never populated.
            PageType::Invalid
        } else if !present {
            PageType::NotPopulated
        } else if is_zero_page(source.pages(ri, page, 1)?) {
            PageType::Zero
        } else {
            PageType::Data
        };
        match runs.last_mut() {
            Some(last)
                if last.page_type == t && (!t.has_data() || last.pages < MAX_DATA_RUN_PAGES) =>
            {
                last.pages += 1
            }
            _ => {
                finish_run(source, ri, run_start, runs.last_mut(), with_crc)?;
                run_start = page;
                runs.push(ChunkRun {
                    page_type: t,
                    pages: 1,
                    crc: 0,
                });
            }
        }
    }
    finish_run(source, ri, run_start, runs.last_mut(), with_crc)?;
    Ok(runs)
}

/// Computes the checksum of a finished data run starting at `first_page`.
fn finish_run<B: Bitmap + Sync>(
    source: &MemorySource<'_, B>,
    ri: usize,
    first_page: u64,
    run: Option<&mut ChunkRun>,
    with_crc: bool,
) -> Result<()> {
    if let Some(run) = run.filter(|r| with_crc && r.page_type.has_data()) {
        run.crc = crate::format::checksum::crc32c(source.pages(ri, first_page, run.pages)?);
    }
    Ok(())
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

    /// Anonymous memory of `chunks` chunks plus a partial one, every third page data.
    fn striped_memory(chunks: u64) -> vm_memory::GuestMemoryMmap {
        use vm_memory::{Bytes, GuestAddress};
        let pages = chunks * CHUNK_PAGES + 7;
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            (pages * PAGE_SIZE) as usize,
        )])
        .unwrap();
        for page in (0..pages).step_by(3) {
            mem.write_obj(page | 1, GuestAddress(page * PAGE_SIZE + 16))
                .unwrap();
        }
        mem
    }

    /// A chunk and its runs as `(type, pages, crc)`.
    type Seen = (Chunk, Vec<(PageType, u64, u32)>);

    fn scan_all(
        source: &MemorySource<'_, ()>,
        threads: usize,
        fail_at: Option<usize>,
    ) -> Result<Vec<Seen>> {
        let mut seen = Vec::new();
        scan_chunks(source, None, None, threads, true, &mut |chunk, runs| {
            if fail_at == Some(seen.len()) {
                return Err(Error::Inconsistent("consumer gives up".into()));
            }
            seen.push((
                chunk,
                runs.iter().map(|r| (r.page_type, r.pages, r.crc)).collect(),
            ));
            Ok(())
        })
        .map(|()| seen)
    }

    #[test]
    fn any_number_of_threads_types_the_same_chunks_in_order() {
        let mem = striped_memory(9);
        let source = MemorySource::new(vm_memory::GuestMemory::iter(&mem).collect());
        let one = scan_all(&source, 1, None).unwrap();
        assert_eq!(one.len(), 10);
        assert!(
            one.windows(2).all(|w| w[0].0 .1 < w[1].0 .1),
            "out of order"
        );
        for threads in [2, 3, 8] {
            assert_eq!(
                scan_all(&source, threads, None).unwrap(),
                one,
                "{threads} threads"
            );
        }
    }

    #[test]
    fn a_failing_consumer_stops_every_thread() {
        let mem = striped_memory(9);
        let source = MemorySource::new(vm_memory::GuestMemory::iter(&mem).collect());
        for threads in [1, 2, 8] {
            for fail_at in [0, 4, 9] {
                assert!(scan_all(&source, threads, Some(fail_at)).is_err());
            }
        }
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
