//! Producing the file encoding: data extents in parallel, then indexes, table and header.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{DataSource, WriteOptions};
use crate::error::{Error, Result};
use crate::format::file::{encode_tail, HEADER_BLOCK_LEN};
use crate::format::{Digest, Extent, Header, Region, PAGE_SIZE};

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
        let (tail, block) = encode_tail(&header, regions, data_end);
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

/// Writes a complete snapshot file: data of every data run (read from `source`, on
/// `options.threads` threads), then the tail and header. Returns the header and file length.
pub(crate) fn write_file(
    path: &Path,
    header: Header,
    mut regions: Vec<Region>,
    source: &dyn DataSource,
    options: WriteOptions,
) -> Result<(Header, u64)> {
    let data_end = assign_extents(&mut regions);
    let out = TempOutput::create(path)?;
    let work: Vec<(usize, usize)> = regions
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            r.runs
                .iter()
                .enumerate()
                .filter(|(_, run)| run.extent.is_some())
                .map(move |(i, _)| (ri, i))
        })
        .collect();
    let crcs = Mutex::new(vec![0u32; work.len()]);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let file = &out.file;
    let regions_ref = &regions;
    let worker = || -> Result<()> {
        let mut scratch = Vec::new();
        loop {
            let w = next.fetch_add(1, Ordering::Relaxed);
            if w >= work.len() || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (ri, i) = work[w];
            let run = regions_ref[ri].runs[i];
            let at = run.extent.map_or(0, |e| e.offset);
            let mut crc = 0;
            let r = source.with_data(ri, run.first_page, run.pages, &mut scratch, &mut |d| {
                crc = crc32c::crc32c(d);
                file.write_all_at(d, at)
                    .map_err(|e| Error::io("write snapshot data", e))
            });
            if let Err(e) = r {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
            let mut all = crcs.lock().map_err(|_| panicked())?;
            all[w] = crc;
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
    for (&(ri, i), crc) in work.iter().zip(crcs) {
        if let Some(e) = regions[ri].runs[i].extent.as_mut() {
            e.crc = crc;
        }
    }
    out.commit(header, &regions, data_end, options.fsync)
}

fn panicked() -> Error {
    Error::io(
        "snapshot writer thread",
        std::io::Error::other("a writer thread panicked"),
    )
}
