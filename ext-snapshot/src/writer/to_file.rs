//! Producing the file encoding: data extents in parallel, then indexes, table and header.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{DataSource, WriteOptions};
use crate::error::{Error, Result};
use crate::format::file::{encode_tail, HEADER_BLOCK_LEN};
use crate::format::{Digest, Extent, FileLayout, Header, Region, Run, PAGE_SIZE};

/// An output file under a temporary name, removed unless [`TempOutput::commit`] succeeds.
pub(crate) struct TempOutput {
    pub(crate) file: File,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl TempOutput {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        Ok(TempOutput {
            file,
            tmp,
            path: path.to_owned(),
            committed: false,
        })
    }

    /// Writes indexes, region table and header (header last, so a crash leaves no valid
    /// header on a partial file), syncs if asked and renames into place.
    /// Returns the final header (with its digest) and the file length.
    pub(crate) fn commit(
        mut self,
        mut header: Header,
        regions: &[Region],
        data_end: u64,
        layout: FileLayout,
        fsync: bool,
    ) -> Result<(Header, u64)> {
        let mut digest = Digest::new();
        for r in regions {
            digest.region(r.guest_addr, r.size);
            for run in &r.runs {
                digest.run(run.page_type, run.pages, run.extent.map_or(0, |e| e.crc));
            }
        }
        header.digest = digest.value();
        let (tail, block) = encode_tail(&header, regions, data_end, layout);
        let write = |bytes: &[u8], at: u64| {
            self.file
                .write_all_at(bytes, at)
                .map_err(|e| Error::io(format!("write {}", self.tmp.display()), e))
        };
        write(&tail, data_end)?;
        write(&block, 0)?;
        let len = data_end + tail.len() as u64;
        if fsync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(format!("fsync {}", self.tmp.display()), e))?;
        }
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io(format!("rename to {}", self.path.display()), e))?;
        self.committed = true;
        if fsync {
            let dir = match self.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            };
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))?;
        }
        Ok((header, len))
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error that made us give up is the one worth reporting.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Assigns extents to the data runs of `regions` contiguously from the end of the header
/// block; returns the end of the data area.
pub(crate) fn assign_extents(regions: &mut [Region]) -> u64 {
    let mut cursor = HEADER_BLOCK_LEN;
    for run in regions.iter_mut().flat_map(|r| r.runs.iter_mut()) {
        run.extent = run.page_type.has_data().then(|| {
            let e = Extent {
                offset: cursor,
                len: run.pages * PAGE_SIZE,
                crc: 0,
            };
            cursor += e.len;
            e
        });
    }
    cursor
}

/// Most runs in one vectored write (the kernel's `IOV_MAX`).
pub(crate) const MAX_BATCH_RUNS: usize = 1024;
/// Most bytes in one batch: large writes, and still several batches per thread.
pub(crate) const MAX_BATCH_BYTES: u64 = 8 << 20;

/// Writes a complete snapshot file: data of every data run (read from `source`, on
/// `options.threads` threads), then the tail and header. Returns the header and file length.
///
/// Data runs are contiguous in the file, so consecutive runs are grouped into batches written
/// with one `pwritev` straight from guest memory: a fragmented guest (single data pages
/// between zero pages) costs one system call per batch, not one per page.
pub(crate) fn write_file(
    path: &Path,
    header: Header,
    mut regions: Vec<Region>,
    source: &dyn DataSource,
    options: WriteOptions,
) -> Result<(Header, u64)> {
    let data_end = assign_extents(&mut regions);
    let out = TempOutput::create(path)?;
    let mut batches: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut batch_bytes = 0;
    for (ri, r) in regions.iter().enumerate() {
        for (i, run) in r.runs.iter().enumerate() {
            let Some(e) = run.extent else { continue };
            match batches.last_mut() {
                Some(b) if b.len() < MAX_BATCH_RUNS && batch_bytes + e.len <= MAX_BATCH_BYTES => {
                    b.push((ri, i));
                    batch_bytes += e.len;
                }
                _ => {
                    batches.push(vec![(ri, i)]);
                    batch_bytes = e.len;
                }
            }
        }
    }
    let crcs = Mutex::new(vec![Vec::new(); batches.len()]);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let file = &out.file;
    let regions_ref = &regions;
    let worker = || -> Result<()> {
        let mut scratch = Vec::new();
        loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= batches.len() || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let runs: Vec<_> = batches[b]
                .iter()
                .map(|&(ri, i)| (ri, regions_ref[ri].runs[i]))
                .collect();
            let r = write_batch(file, &runs, source, &mut scratch);
            match r {
                Ok(batch_crcs) => {
                    let mut all = crcs.lock().map_err(|_| panicked())?;
                    all[b] = batch_crcs;
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..options.threads.max(1))
            .map(|_| s.spawn(worker))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| panicked())?)
    })?;
    let crcs = crcs.into_inner().map_err(|_| panicked())?;
    for (batch, batch_crcs) in batches.iter().zip(crcs) {
        for (&(ri, i), crc) in batch.iter().zip(batch_crcs) {
            if let Some(e) = regions[ri].runs[i].extent.as_mut() {
                e.crc = crc;
            }
        }
    }
    out.commit(
        header,
        &regions,
        data_end,
        FileLayout::Packed,
        options.fsync,
    )
}

/// Writes consecutive data runs (contiguous in the file); returns their checksums.
fn write_batch(
    file: &File,
    runs: &[(usize, Run)],
    source: &dyn DataSource,
    scratch: &mut Vec<u8>,
) -> Result<Vec<u32>> {
    let at = runs
        .first()
        .and_then(|(_, r)| r.extent)
        .map_or(0, |e| e.offset);
    let direct: Option<Vec<&[u8]>> = runs
        .iter()
        .map(|&(ri, r)| source.direct(ri, r.first_page, r.pages))
        .collect();
    if let Some(slices) = direct {
        let crcs = slices
            .iter()
            .map(|s| crate::format::checksum::crc32c(s))
            .collect();
        pwritev_all(file, &slices, at)?;
        return Ok(crcs);
    }
    let mut crcs = Vec::with_capacity(runs.len());
    for &(ri, run) in runs {
        let at = run.extent.map_or(0, |e| e.offset);
        source.with_data(ri, run.first_page, run.pages, scratch, &mut |d| {
            crcs.push(crate::format::checksum::crc32c(d));
            file.write_all_at(d, at)
                .map_err(|e| Error::io("write snapshot data", e))
        })?;
    }
    Ok(crcs)
}

/// Writes `slices` back to back at `offset`, retrying short writes.
pub(crate) fn pwritev_all(file: &File, slices: &[&[u8]], offset: u64) -> Result<()> {
    crate::file_io::write_all_vectored_at(file, slices, offset)
        .map_err(|e| Error::io("write snapshot data", e))
}

fn panicked() -> Error {
    Error::io(
        "snapshot writer thread",
        std::io::Error::other("a writer thread panicked"),
    )
}
