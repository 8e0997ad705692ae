//! The writers our snapshot writer is measured against.
//!
//! * [`dense_dump`]: every byte of guest memory, region after region — what Cloud Hypervisor
//!   writes to `memory-ranges` for anonymous memory (`shared=off`) and what Firecracker writes
//!   for a full snapshot.
//! * [`holes_only_copy`]: Cloud Hypervisor's `shared=on` path — walk the memfd behind each
//!   region with `SEEK_DATA`/`SEEK_HOLE`, copy the data extents to the same offsets of a
//!   pre-sized file and leave the holes; regions without a backing file are copied densely.
//! * [`write_data_runs_alone`]: the floor for the "create time ≤ 1.2 × writing the data
//!   alone" target — the very bytes our snapshot stores, taken from the same guest memory and
//!   written the way our writer writes them (contiguous `pwritev` batches of at most 1024
//!   slices / 8 MiB), with no typing, no checksums and no index.
//! * [`copy_data_into_fresh_memory`]: the floor for "eager restore ≤ 1.2 × a plain copy" —
//!   the same data bytes read from the same snapshot file into the same kind of fresh memory,
//!   each extent `pread` straight to its place (after `MADV_POPULATE_WRITE`, as our restore
//!   does) on the same number of threads, with no validation at all.
//! * [`settle`]: between measurements, writes back and drops from the page cache what the
//!   previous measurement left dirty, so it does not throttle the next one.
//!
//! They exist to be measured side by side with the real writer in one run (`ext-snapshot
//! bench`, the criterion benches); they are written the way those VMMs write, with no tricks
//! either way.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use ext_snapshot::sparse::data_extents;
use ext_snapshot::{Run, PAGE_SIZE};
use vm_memory::{
    GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use super::error::{BenchError, Result};

/// Most slices in one `pwritev` batch: our writer's batch limit (`writer::to_file`), copied
/// here because the floor must be written the way the writer writes.
const MAX_BATCH_RUNS: usize = 1024;
/// Most bytes in one batch, likewise our writer's.
const MAX_BATCH_BYTES: u64 = 8 << 20;

/// What a baseline writer did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BaselineReport {
    /// Wall-clock seconds, including the fsync when one was asked for.
    pub seconds: f64,
    /// Bytes of guest memory copied into the file.
    pub bytes_written: u64,
    /// Apparent length of the file.
    pub file_len: u64,
    /// Bytes the filesystem allocated for the file (`st_blocks` × 512).
    pub allocated: u64,
}

fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| BenchError::io(format!("creating {}", path.display()), e))
}

fn finish(
    file: File,
    path: &Path,
    fsync: bool,
    start: Instant,
    written: u64,
) -> Result<BaselineReport> {
    if fsync {
        file.sync_all()
            .map_err(|e| BenchError::io(format!("fsync of {}", path.display()), e))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let metadata = file
        .metadata()
        .map_err(|e| BenchError::io(format!("stat of {}", path.display()), e))?;
    Ok(BaselineReport {
        seconds,
        bytes_written: written,
        file_len: metadata.len(),
        allocated: metadata.blocks() * 512,
    })
}

fn copy_dense<R: GuestMemoryRegion>(
    region: &R,
    offset: u64,
    length: u64,
    file_offset: u64,
    file: &mut File,
) -> Result<()> {
    file.seek(SeekFrom::Start(file_offset))
        .map_err(|e| BenchError::io("seeking the baseline file", e))?;
    let slice = region
        .get_slice(MemoryRegionAddress(offset), length as usize)
        .map_err(|e| BenchError::Memory(e.to_string()))?;
    let mut done = 0usize;
    while done < slice.len() {
        let rest = slice
            .offset(done)
            .map_err(|e| BenchError::Memory(e.to_string()))?;
        let count = vm_memory::WriteVolatile::write_volatile(file, &rest)
            .map_err(|e| BenchError::Memory(e.to_string()))?;
        if count == 0 {
            return Err(BenchError::io(
                "writing the baseline file",
                std::io::Error::from(std::io::ErrorKind::WriteZero),
            ));
        }
        done += count;
    }
    Ok(())
}

/// Writes every byte of every region of `memory` to `path`, regions back to back.
///
/// Regions with a backing file are read through the file (`pread`), the others through their
/// mapping: either way never-populated pages read as zeros without being allocated, as they do
/// for the anonymous memory Cloud Hypervisor dumps densely (reading a memfd hole through a
/// shared mapping would allocate it, a cost the real dense writer does not pay).
pub fn dense_dump<M: GuestMemory>(memory: &M, path: &Path, fsync: bool) -> Result<BaselineReport> {
    let start = Instant::now();
    let mut file = create(path)?;
    let mut base = 0u64;
    let mut buffer = Vec::new();
    for region in memory.iter() {
        match region.file_offset() {
            Some(backing) => {
                buffer.resize(1 << 20, 0);
                let mut done = 0u64;
                while done < region.len() {
                    let count = (region.len() - done).min(buffer.len() as u64) as usize;
                    backing
                        .file()
                        .read_exact_at(&mut buffer[..count], backing.start() + done)
                        .map_err(|e| BenchError::io("reading guest memory through its file", e))?;
                    file.write_all(&buffer[..count])
                        .map_err(|e| BenchError::io("writing the dense dump", e))?;
                    done += count as u64;
                }
            }
            None => copy_in_slices(region, 0, region.len(), base, &mut file)?,
        }
        base += region.len();
    }
    finish(file, path, fsync, start, base)
}

/// Copies `[offset, offset + length)` of `region` to `file_base + offset` in 64 MiB slices, so
/// a slice length always fits `usize` and the kernel sees large sequential writes.
fn copy_in_slices<R: GuestMemoryRegion>(
    region: &R,
    offset: u64,
    length: u64,
    file_base: u64,
    file: &mut File,
) -> Result<()> {
    const SLICE: u64 = 64 << 20;
    let mut done = 0u64;
    while done < length {
        let count = SLICE.min(length - done);
        copy_dense(
            region,
            offset + done,
            count,
            file_base + offset + done,
            file,
        )?;
        done += count;
    }
    Ok(())
}

/// Copies only the host-populated extents of memfd-backed regions (dense for the others) into
/// a file as long as the dense dump, at the same offsets, leaving holes elsewhere.
pub fn holes_only_copy<M: GuestMemory>(
    memory: &M,
    path: &Path,
    fsync: bool,
) -> Result<BaselineReport> {
    let start = Instant::now();
    let mut file = create(path)?;
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    file.set_len(total)
        .map_err(|e| BenchError::io("sizing the holes-only copy", e))?;
    let mut base = 0u64;
    let mut written = 0u64;
    for region in memory.iter() {
        let extents = match region.file_offset() {
            Some(backing) => data_extents(backing.file(), backing.start(), region.len())
                .map_err(|e| BenchError::io("finding the data extents of guest memory", e))?
                .into_iter()
                .map(|r| (r.start - backing.start(), r.end - r.start))
                .collect(),
            None => vec![(0, region.len())],
        };
        for (offset, length) in extents {
            copy_in_slices(region, offset, length, base, &mut file)?;
            written += length;
        }
        base += region.len();
    }
    finish(file, path, fsync, start, written)
}

/// Writes the bytes of `runs` (`(region index, run)` pairs of `Data` runs, in file order) from
/// `memory` back to back into `path`, in the batches our writer uses: the time to write exactly
/// the data a snapshot stores, from the same pages, without typing them.
pub fn write_data_runs_alone(
    memory: &GuestMemoryMmap,
    runs: &[(usize, Run)],
    path: &Path,
    fsync: bool,
) -> Result<BaselineReport> {
    let regions: Vec<&GuestRegionMmap> = memory.iter().collect();
    let start = Instant::now();
    let file = create(path)?;
    let mut batch: Vec<&[u8]> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut at = 0u64;
    let mut done = 0u64;
    for &(region, run) in runs {
        let len = run.pages * PAGE_SIZE;
        if batch.len() == MAX_BATCH_RUNS || batch_bytes + len > MAX_BATCH_BYTES {
            pwritev_all(&file, &batch, at)?;
            at += batch_bytes;
            batch.clear();
            batch_bytes = 0;
        }
        batch.push(region_pages(&regions, region, run.first_page, run.pages)?);
        batch_bytes += len;
        done += len;
    }
    pwritev_all(&file, &batch, at)?;
    finish(file, path, fsync, start, done)
}

/// The bytes of pages `[first_page, first_page + pages)` of region `region`, in place.
fn region_pages<'m>(
    regions: &[&'m GuestRegionMmap],
    region: usize,
    first_page: u64,
    pages: u64,
) -> Result<&'m [u8]> {
    let r = regions
        .get(region)
        .ok_or_else(|| BenchError::Memory(format!("no region {region}")))?;
    let end = (first_page + pages) * PAGE_SIZE;
    if end > r.len() {
        return Err(BenchError::Memory(format!(
            "page range ends at {end:#x}, region is {:#x} bytes",
            r.len()
        )));
    }
    // SAFETY: the range lies inside the region's mapping (checked above), which stays mapped
    // while the guest memory is borrowed for 'm. Nothing writes guest memory while the
    // benchmark writes it out (no guest runs), so the shared slice is not mutated while it
    // lives; any bit pattern is a valid `u8`.
    Ok(unsafe {
        std::slice::from_raw_parts(
            r.as_ptr().add((first_page * PAGE_SIZE) as usize),
            (pages * PAGE_SIZE) as usize,
        )
    })
}

/// Writes `slices` back to back at `offset`: the same system calls our writer makes for its
/// data batches (`ext_snapshot::file_io`).
fn pwritev_all(file: &File, slices: &[&[u8]], offset: u64) -> Result<()> {
    ext_snapshot::file_io::write_all_vectored_at(file, slices, offset)
        .map_err(|e| BenchError::io("writing the data-only file", e))
}

/// Writes back `path`'s dirty pages, waits for them and drops its pages from the page cache,
/// so the next measurement starts without another writer's dirty data to throttle it or
/// clean cache to evict. Not part of any timed section.
pub fn settle(path: &Path) -> Result<()> {
    let file =
        File::open(path).map_err(|e| BenchError::io(format!("open {}", path.display()), e))?;
    file.sync_data()
        .map_err(|e| BenchError::io(format!("fdatasync {}", path.display()), e))?;
    // SAFETY: plain advice on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(BenchError::io(
            format!("posix_fadvise {}", path.display()),
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// Copies the data extents `runs` (`(region index, run)` pairs of `Data` runs) of the snapshot
/// file at `path` into fresh anonymous memory with `layout`'s regions, on `threads` threads,
/// with plain `pread`s and no checks; returns the wall-clock seconds from opening the file to
/// the last byte copied (the memory is dropped afterwards, untimed).
pub fn copy_data_into_fresh_memory(
    path: &Path,
    layout: &[(u64, u64)],
    runs: &[(usize, Run)],
    threads: usize,
) -> Result<f64> {
    let start = Instant::now();
    let file =
        File::open(path).map_err(|e| BenchError::io(format!("open {}", path.display()), e))?;
    let memory = ext_snapshot::fresh_memory(layout)?;
    let regions: Vec<&GuestRegionMmap> = memory.iter().collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(region, run)) = runs.get(i) else {
                return Ok(());
            };
            let extent = run
                .extent
                .ok_or_else(|| BenchError::Memory("a data run without an extent".into()))?;
            let r = regions
                .get(region)
                .ok_or_else(|| BenchError::Memory(format!("no region {region}")))?;
            let (at, len) = (run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE);
            if at + len > r.len() {
                return Err(BenchError::Memory(format!(
                    "run past the end of region {region}"
                )));
            }
            // SAFETY: `at + len` is inside the region's mapping (checked above), so the
            // pointer stays inside it.
            let ptr = unsafe { r.as_ptr().add(at as usize) };
            // SAFETY: the range is inside the fresh mapping; populating pages that are about
            // to be written changes no contents.
            unsafe { libc::madvise(ptr.cast(), len as usize, libc::MADV_POPULATE_WRITE) };
            // SAFETY: the range lies inside the writable fresh mapping, which this function
            // owns and nothing else reads or writes meanwhile: each run is copied by exactly
            // one thread and runs do not overlap.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
            file.read_exact_at(bytes, extent.offset)
                .map_err(|e| BenchError::io("plain copy of snapshot data", e))?;
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(worker)).collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| BenchError::Memory("plain copy thread panicked".into()))?
        })
    })?;
    let seconds = start.elapsed().as_secs_f64();
    drop(memory);
    Ok(seconds)
}

/// The data runs of the snapshot at `path` as `(region index, run)` pairs, in file order: what
/// [`write_data_runs_alone`] and [`copy_data_into_fresh_memory`] take.
pub fn data_runs(path: &Path) -> Result<Vec<(usize, Run)>> {
    Ok(ext_snapshot::SnapshotFile::open(path)?
        .regions()
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| r.runs.iter().map(move |run| (ri, *run)))
        .filter(|(_, run)| run.extent.is_some())
        .collect())
}
