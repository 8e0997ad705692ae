//! Snapshots of guest memory written by the daemon, out of the VMM's process.
//!
//! The daemon maps guest memory itself (the memory table's memfds, shared), and it knows which
//! pages the guest ballooned: so it can write an `ext-snapshot` file of guest memory in which
//! inflated pages are typed `Invalid` (from the invalid-page map) and reported ranges, punched
//! out of the memfd, type themselves as never populated (ext-snapshot's residency walk of the
//! file). Only data pages are stored.
//!
//! Called by the control API's `PUT /api/v1/snapshot` and by benchmarks. The guest must not run
//! meanwhile: the caller pauses the VM through its VMM first (Cloud Hypervisor's or ext-vmm's
//! `vm.pause`) and resumes it afterwards; pages written during the snapshot are captured in an
//! unspecified state.
//!
//! The backend lock is held only while [`SnapshotSource::capture`] copies what the write needs
//! (a handle on the mappings and the invalid-page bitmap), never during the write, so the
//! vhost-user side keeps answering the frontend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ext_snapshot::{GfnBitmap, PageType, SnapshotId, SnapshotWriter, WriteOptions};
use vm_memory::GuestMemoryMmap;

use crate::backend::BalloonBackend;
use crate::error::{Error, Result};

/// What a snapshot write did.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotFigures {
    /// Where the snapshot is.
    pub path: PathBuf,
    /// The snapshot's identity (what a diff against it names).
    pub id: SnapshotId,
    /// Length of the file written.
    pub bytes_written: u64,
    /// Guest pages of each type, indexed by `PageType as usize`.
    pub pages_by_type: [u64; 5],
    /// Time from the start of the write to the file in place.
    pub duration: Duration,
}

impl SnapshotFigures {
    /// Guest pages of type `page_type`.
    pub fn pages(&self, page_type: PageType) -> u64 {
        self.pages_by_type[page_type as usize]
    }
}

/// What a snapshot needs from the backend, taken under its lock and written without it.
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    memory: Arc<GuestMemoryMmap<()>>,
    invalid_gfn_words: Vec<u64>,
}

impl SnapshotSource {
    /// Takes the current memory table's mappings and a copy of the invalid-page map.
    /// `Err(Error::NoMemoryTable)` before a frontend has sent a memory table (or after it
    /// disconnected).
    pub fn capture(backend: &BalloonBackend) -> Result<Self> {
        let memory = backend.guest_memory().ok_or(Error::NoMemoryTable)?;
        Ok(SnapshotSource {
            memory,
            invalid_gfn_words: backend.balloon().invalid_pages().gfn_words().to_vec(),
        })
    }

    /// Writes the snapshot file to `path` (an absolute path in an existing directory; an
    /// existing file there is replaced). The file is written under `<path>.tmp` and renamed
    /// into place once complete, so a failed write leaves nothing at `path` and no temporary
    /// file. `Err(Error::SnapshotDestination)` for a bad path, `Err(Error::Snapshot)` when
    /// ext-snapshot fails (memory it cannot describe, an I/O error).
    pub fn write(&self, path: &Path) -> Result<SnapshotFigures> {
        check_destination(path)?;
        let invalid = GfnBitmap::new(&self.invalid_gfn_words);
        let writer = SnapshotWriter::new(WriteOptions::default()).invalid_pages(&invalid);
        let started = Instant::now();
        let report = writer
            .write_file(&*self.memory, path)
            .map_err(|source| Error::Snapshot {
                path: path.to_path_buf(),
                source,
            });
        // The writer's buffers are freed by now; give the heap they grew back to the host, so
        // the daemon's own memory falls back to its idle size right after a snapshot.
        // SAFETY: malloc_trim only releases free heap memory; no pointer is involved.
        unsafe { libc::malloc_trim(0) };
        let report = report?;
        Ok(SnapshotFigures {
            path: path.to_path_buf(),
            id: report.id,
            bytes_written: report.output_bytes,
            pages_by_type: report.pages_by_type,
            duration: started.elapsed(),
        })
    }
}

/// Writes a snapshot of `backend`'s guest memory to `path`: [`SnapshotSource::capture`] then
/// [`SnapshotSource::write`], with the same errors. The caller holds `backend` (its lock) for
/// the whole write; a caller that shares the backend captures under the lock and writes after.
pub fn write_snapshot(backend: &BalloonBackend, path: &Path) -> Result<SnapshotFigures> {
    check_destination(path)?;
    SnapshotSource::capture(backend)?.write(path)
}

/// Checks that `path` can name a snapshot file: absolute, not a directory, in a directory
/// that exists. `Err(Error::SnapshotDestination)` says what is wrong. [`SnapshotSource::write`]
/// checks too; a caller checks first to refuse a bad request before anything else.
pub fn check_destination(path: &Path) -> Result<()> {
    let refuse = |reason| {
        Err(Error::SnapshotDestination {
            path: path.to_path_buf(),
            reason,
        })
    };
    if !path.is_absolute() {
        return refuse("not an absolute path");
    }
    if path.file_name().is_none() {
        return refuse("names no file");
    }
    match path.parent() {
        Some(dir) if dir.is_dir() => {}
        _ => return refuse("its directory does not exist"),
    }
    if path.is_dir() {
        return refuse("is a directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::FromRawFd;

    use ext_snapshot::SnapshotFile;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    use super::*;

    fn memfd_memory(pages: u64) -> (File, GuestMemoryMmap<()>) {
        let name = CString::new("vum-snapshot-test").unwrap();
        // SAFETY: `name` is NUL-terminated; the fd is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(pages * 4096).unwrap();
        let offset = FileOffset::new(file.try_clone().unwrap(), 0);
        let mmap = MmapRegion::<()>::from_file(offset, (pages * 4096) as usize).unwrap();
        let region = GuestRegionMmap::new(mmap, GuestAddress(0)).unwrap();
        (file, GuestMemoryMmap::from_regions(vec![region]).unwrap())
    }

    #[test]
    fn destinations_are_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let bad = |path: &Path| {
            matches!(
                check_destination(path),
                Err(Error::SnapshotDestination { .. })
            )
        };
        assert!(bad(Path::new("relative/snap")));
        assert!(bad(&dir.path().join("missing/snap")));
        assert!(bad(dir.path()));
        assert!(bad(Path::new("/")));
        assert!(check_destination(&dir.path().join("snap")).is_ok());
    }

    #[test]
    fn inflated_pages_are_invalid_and_data_is_kept() {
        let (file, memory) = memfd_memory(64);
        for page in [1u64, 2, 3, 10] {
            file.write_all_at(&[page as u8 + 1; 4096], page * 4096)
                .unwrap();
        }
        // Page 10 holds data but the guest ballooned it.
        let source = SnapshotSource {
            memory: Arc::new(memory),
            invalid_gfn_words: vec![1 << 10],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let figures = source.write(&path).unwrap();
        assert_eq!(figures.pages(PageType::Data), 3);
        assert_eq!(figures.pages(PageType::Invalid), 1);
        assert_eq!(figures.pages(PageType::NotPopulated), 60);
        let snapshot = SnapshotFile::open(&path).unwrap();
        assert_eq!(snapshot.pages_by_type(), figures.pages_by_type);
        assert_eq!(snapshot.file_len().unwrap(), figures.bytes_written);
        assert!(!dir.path().join("snap.tmp").exists());
    }

    #[test]
    fn no_memory_table_no_snapshot() {
        let backend = BalloonBackend::new();
        let dir = tempfile::tempdir().unwrap();
        let result = write_snapshot(&backend, &dir.path().join("snap"));
        assert!(matches!(result, Err(Error::NoMemoryTable)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
