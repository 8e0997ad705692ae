//! Eager restore: copy data pages in, leave every other page untouched.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestRegionMmap};

use super::segment::{single_segments, Segment};
use super::target::Target;
use super::{EagerOptions, RestoreReport};
use crate::error::{Error, Result};
use crate::format::{Extent, MAX_DATA_RUN_PAGES, PAGE_SIZE};
use crate::page_type::PageType;
use crate::reader::{SnapshotFile, StreamReader};

/// Restores a standalone snapshot into `mem`, which must have the snapshot's regions.
///
/// `Ok` means memory now reads exactly as the snapshotted memory did; `Err` means no
/// unverified byte is visible in `mem`:
/// - With `target_is_fresh` (memory that reads as zero and holds nothing, e.g. from
///   [`fresh_memory`](super::fresh_memory)), only data pages are written, and each data
///   extent's checksum is verified while it is copied (the data is read once). On any failure
///   every page written so far is released again (`MADV_DONTNEED`, or a punched hole for
///   shared file memory), so `mem` is as fresh as before the call, host memory included, and
///   the error is returned. A file whose data was verified already
///   ([`SnapshotFile::is_data_verified`]) is copied without checking again; a successful
///   restore marks the file verified.
/// - Otherwise every checksum is verified before the first write, so `Err` leaves `mem`
///   untouched. A diff snapshot is applied onto the memory's current content (its
///   `SameAsParent` pages left alone); into a fresh target it is rejected with
///   `Err(NeedsParent)`.
pub fn restore_eager<M, B>(
    snapshot: &SnapshotFile,
    mem: &M,
    options: EagerOptions,
) -> Result<RestoreReport>
where
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    if options.target_is_fresh && !snapshot.is_diff() {
        return restore_fresh(snapshot, mem, options);
    }
    let segments = single_segments(snapshot);
    restore_segments(&[snapshot], &segments, mem, options)
}

/// [`restore_eager`] into a fresh target: verify while copying, release on failure.
fn restore_fresh<M, B>(
    snapshot: &SnapshotFile,
    mem: &M,
    options: EagerOptions,
) -> Result<RestoreReport>
where
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    let start = Instant::now();
    let target = Target::new(mem, &snapshot.layout())?;
    let check = !snapshot.is_data_verified();
    if check {
        // The only bytes a fresh restore must vouch for that no extent covers.
        snapshot.verify_outside_extents()?;
    }
    let verify_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    // Work items: every data extent with its region and first page (at most
    // MAX_DATA_RUN_PAGES each, so both threads stay busy).
    let work: Vec<(usize, u64, Extent)> = snapshot
        .regions()
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            r.runs
                .iter()
                .filter_map(move |run| run.extent.map(|e| (ri, run.first_page, e)))
        })
        .collect();
    let bytes: u64 = work.iter().map(|(_, _, e)| e.len).sum();
    let result = for_each_parallel(work.len(), options.threads, bytes < PARALLEL_BYTES, |i| {
        let (ri, first_page, extent) = &work[i];
        target.read_extent_into(*ri, *first_page, snapshot.file(), extent, check)
    });
    if let Err(e) = result {
        // Give back every page a data extent may have touched: the target is fresh again.
        for (ri, first_page, extent) in &work {
            // Best effort: the restore's own error is the one to report; `discard` falls
            // back to writing zeros, so the pages read as zero whatever happens.
            let _ = target.discard(*ri, *first_page, extent.len / PAGE_SIZE);
        }
        return Err(e);
    }
    if check {
        snapshot.mark_data_verified();
    }
    Ok(RestoreReport {
        data_pages: bytes / PAGE_SIZE,
        discarded_pages: 0,
        verify_seconds,
        restore_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Restores resolved `segments` (sources indexing `layers`) into `mem`: the common part of
/// [`restore_eager`] and the chain's eager restore. Verifies every layer before the first
/// write.
pub(crate) fn restore_segments<M, B>(
    layers: &[&SnapshotFile],
    segments: &[Vec<Segment>],
    mem: &M,
    options: EagerOptions,
) -> Result<RestoreReport>
where
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    let start = Instant::now();
    let target = Target::new(mem, &layers[0].layout())?;
    let has_parent_pages = segments
        .iter()
        .flatten()
        .any(|s| s.page_type == PageType::SameAsParent);
    if has_parent_pages && options.target_is_fresh {
        return Err(Error::NeedsParent);
    }
    layers.iter().try_for_each(|l| l.verify_data())?;
    let verify_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();

    // Work items: (region, segment); long data segments are cut so both threads stay busy.
    let mut work = Vec::new();
    for (ri, segs) in segments.iter().enumerate() {
        for s in segs {
            let wanted = match s.page_type {
                PageType::Data => true,
                PageType::SameAsParent => false,
                _ => !options.target_is_fresh,
            };
            if !wanted {
                continue;
            }
            let mut done = 0;
            while done < s.pages {
                let n = (s.pages - done).min(MAX_DATA_RUN_PAGES);
                work.push((
                    ri,
                    Segment {
                        first_page: s.first_page + done,
                        pages: n,
                        source: s.source.map(|(l, o)| (l, o + done * PAGE_SIZE)),
                        ..*s
                    },
                ));
                done += n;
            }
        }
    }
    let pages_where = |with_source: bool| -> u64 {
        work.iter()
            .filter(|(_, s)| s.source.is_some() == with_source)
            .map(|(_, s)| s.pages)
            .sum()
    };
    let (data_pages, discarded_pages) = (pages_where(true), pages_where(false));
    for_each_parallel(
        work.len(),
        options.threads,
        (data_pages + discarded_pages) * PAGE_SIZE < PARALLEL_BYTES,
        |i| {
            let (ri, s) = work[i];
            match s.source {
                Some((layer, offset)) => {
                    target.read_from(ri, s.first_page, s.pages, layers[layer].file(), offset)
                }
                None => target.discard(ri, s.first_page, s.pages),
            }
        },
    )?;
    Ok(RestoreReport {
        data_pages,
        discarded_pages,
        verify_seconds,
        restore_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Below this many bytes to write, a restore runs on the calling thread alone: spawning is not
/// worth it.
const PARALLEL_BYTES: u64 = 4096 * PAGE_SIZE;

/// Runs `job(i)` for every `i < items` on `threads` threads (on the calling thread alone when
/// `serial`), each thread taking the next item; after the first error no item is started, and
/// that error is returned once every thread has stopped.
fn for_each_parallel(
    items: usize,
    threads: usize,
    serial: bool,
    job: impl Fn(usize) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let job = &job;
    let worker = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= items || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Err(e) = job(i) {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    };
    if serial {
        return worker();
    }
    // The scope joins every thread before it returns, the first error included.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(worker)).collect();
        handles.into_iter().try_for_each(|h| {
            h.join().unwrap_or_else(|_| {
                Err(Error::io(
                    "restore thread",
                    std::io::Error::other("restore thread panicked"),
                ))
            })
        })
    })
}

/// How guest memory is laid out in a raw memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RawLayout {
    /// File offset = guest physical address (what `ext-snapshot restore --to` writes).
    GuestPhysical,
    /// Regions back to back in address order (Cloud Hypervisor's `memory-ranges`).
    Packed,
}

/// Writes the memory of a standalone snapshot (or of a resolved chain, see
/// `SnapshotChain::restore_to_raw_file`) into `out` as a sparse raw file: `out` is truncated,
/// sized, and only data pages are written, so every other page is a hole. Validates all data
/// first; `Err` before the first write leaves `out` untouched.
pub fn restore_to_raw_file(
    snapshot: &SnapshotFile,
    out: &File,
    layout: RawLayout,
) -> Result<RestoreReport> {
    let segments = single_segments(snapshot);
    raw_from_segments(&[snapshot], &segments, out, layout)
}

pub(crate) fn raw_from_segments(
    layers: &[&SnapshotFile],
    segments: &[Vec<Segment>],
    out: &File,
    layout: RawLayout,
) -> Result<RestoreReport> {
    let start = Instant::now();
    if segments
        .iter()
        .flatten()
        .any(|s| s.page_type == PageType::SameAsParent)
    {
        return Err(Error::NeedsParent);
    }
    layers.iter().try_for_each(|l| l.verify_data())?;
    let verify_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let regions = layers[0].layout();
    let mut bases = Vec::with_capacity(regions.len());
    let mut packed = 0u64;
    for &(addr, size) in &regions {
        bases.push(match layout {
            RawLayout::GuestPhysical => addr,
            RawLayout::Packed => packed,
        });
        packed += size;
    }
    let total = match layout {
        RawLayout::GuestPhysical => regions.last().map_or(0, |&(a, s)| a + s),
        RawLayout::Packed => packed,
    };
    out.set_len(0)
        .and_then(|()| out.set_len(total))
        .map_err(|e| Error::io("size raw memory file", e))?;
    let mut buf = vec![0u8; (MAX_DATA_RUN_PAGES * PAGE_SIZE) as usize];
    let mut data_pages = 0;
    for (ri, segs) in segments.iter().enumerate() {
        for s in segs {
            let Some((layer, offset)) = s.source else {
                continue;
            };
            let mut done = 0;
            while done < s.pages {
                let n = (s.pages - done).min(MAX_DATA_RUN_PAGES);
                let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
                layers[layer]
                    .file()
                    .read_exact_at(bytes, offset + done * PAGE_SIZE)
                    .map_err(|e| Error::read("reading snapshot data", e))?;
                out.write_all_at(bytes, bases[ri] + (s.first_page + done) * PAGE_SIZE)
                    .map_err(|e| Error::io("write raw memory file", e))?;
                done += n;
            }
            data_pages += s.pages;
        }
    }
    Ok(RestoreReport {
        data_pages,
        discarded_pages: 0,
        verify_seconds,
        restore_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Restores a stream directly into `mem`, writing each record as soon as its checksum
/// verifies (no spool space, one pass).
///
/// Guarantee: the header and region table are validated before any write, and no unverified
/// byte is ever written. A corrupt or truncated stream is detected at the first bad record:
/// `Err` with nothing written if that happens before the first data write, otherwise
/// `Err(PartialRestore)` — memory then holds a mix of old and restored pages and must be
/// discarded. For all-or-nothing use [`restore_stream_staged`]. A diff stream is applied onto
/// the memory's current content (`SameAsParent` pages left alone) unless `target_is_fresh`,
/// which rejects it with `Err(NeedsParent)`.
pub fn restore_stream<R, M, B>(input: R, mem: &M, options: EagerOptions) -> Result<RestoreReport>
where
    R: Read,
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    let start = Instant::now();
    let mut reader = StreamReader::new(input)?;
    if reader.header().parent.is_some() && options.target_is_fresh {
        return Err(Error::NeedsParent);
    }
    let target = Target::new(mem, reader.layout())?;
    let mut report = RestoreReport::default();
    let mut touched = false;
    loop {
        let record = match reader.next_record() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) if touched => {
                return Err(Error::PartialRestore {
                    data_pages_written: report.data_pages,
                    source: Box::new(e),
                })
            }
            Err(e) => return Err(e),
        };
        let r = match record.page_type {
            PageType::Data => {
                touched = true;
                report.data_pages += record.pages;
                target.copy_in(record.region, record.first_page, record.data)
            }
            PageType::SameAsParent => Ok(()),
            _ if options.target_is_fresh => Ok(()),
            _ => {
                touched = true;
                report.discarded_pages += record.pages;
                target.discard(record.region, record.first_page, record.pages)
            }
        };
        r?;
    }
    report.restore_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Restores a stream all-or-nothing: spools it into a snapshot file at `spool` (validated
/// completely, see [`crate::convert::stream_to_file`]), restores that file with [`restore_eager`] and
/// removes it. `Err` leaves `mem` untouched. Costs spool disk space equal to the file size.
pub fn restore_stream_staged<R, M, B>(
    input: R,
    mem: &M,
    spool: &Path,
    options: EagerOptions,
) -> Result<RestoreReport>
where
    R: Read,
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    let start = Instant::now();
    crate::convert::stream_to_file(input, spool, Default::default())?;
    let result = SnapshotFile::open(spool).and_then(|s| restore_eager(&s, mem, options));
    // The spool is ours; failing to remove it must not hide the restore's outcome.
    let _ = std::fs::remove_file(spool);
    let mut report = result?;
    report.verify_seconds = start.elapsed().as_secs_f64() - report.restore_seconds;
    Ok(report)
}
