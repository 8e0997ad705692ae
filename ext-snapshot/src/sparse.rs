//! The allocated (data) extents of sparse files, found with `lseek(SEEK_DATA/SEEK_HOLE)`.
//!
//! One walker for the whole crate, because every caller needs the same care: `SEEK_HOLE`
//! cannot be bounded (walk a window once, not per chunk), `ENXIO` means "nothing more", not
//! failure, and a filesystem without the two whences must degrade to a dense reading rather
//! than fail. Callers:
//! - `residency`: which pages of a memfd- or file-backed guest region hold data, so the
//!   writer never reads (and allocates) a hole;
//! - `cloud_hypervisor::memory_ranges`: which parts of a `memory-ranges` file Cloud Hypervisor
//!   wrote, so an import copies only those and an export reproduces the holes;
//! - `reader` (guest-offset layout check): which allocated bytes outside every data extent
//!   must be read to prove they are zero;
//! - the `ext-snapshot bench` baselines (Cloud Hypervisor's holes-only copy) and tests.
//!
//! Nothing here reads file contents or touches memory; the file position is not used
//! (`SEEK_DATA`/`SEEK_HOLE` take the offset as an argument and return the answer), so
//! concurrent callers on one descriptor get correct answers.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The next byte at or after `offset` that is data (allocated) in `file`.
///
/// `Ok(Some(at))`: data starts at `at >= offset`. `Ok(None)`: there is no data at or after
/// `offset` (`ENXIO`: the rest of the file is a hole, or `offset` is at or past its end).
/// `Err`: any other failure, including `EINVAL`/`EOPNOTSUPP` from a filesystem that does not
/// support `SEEK_DATA` (see [`unsupported`]) and an `offset` beyond `i64::MAX`.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The next byte at or after `offset` that is in a hole of `file`; the end of the file
/// counts as a hole, so for an `offset` inside the file this is `Ok(Some(_))`.
///
/// `Ok(None)`: `offset` is at or past the end of the file (`ENXIO`). `Err`: as for
/// [`seek_data`].
pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

/// Whether `error` (from [`seek_data`] or [`seek_hole`]) means the filesystem does not
/// support `SEEK_DATA`/`SEEK_HOLE` at all, as opposed to a failure of this file.
pub fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

/// The data extents of `[offset, offset + len)` of `file`, as byte ranges clipped to that
/// window, sorted and non-overlapping; everything else in the window is a hole.
///
/// `Ok` with an empty list: the window is all hole (or past the end of the file). On a
/// filesystem without `SEEK_DATA`/`SEEK_HOLE` the whole window is one extent: a dense reading
/// is always correct, only less sparse. `Err`: `lseek` failed otherwise (the caller cannot
/// tell holes from data and must not guess).
///
/// Extents are as the filesystem reports them, usually whole blocks; callers that need pages
/// round them outward.
pub fn data_extents(file: &File, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
    let end = offset.saturating_add(len);
    let mut extents = Vec::new();
    let mut cursor = offset;
    while cursor < end {
        let data = match seek_data(file, cursor) {
            Ok(Some(data)) => data,
            Ok(None) => break,
            // Only the first call can tell "not supported" from a real failure: once a seek
            // has worked, the filesystem supports them.
            Err(error) if cursor == offset && unsupported(&error) => {
                return Ok(std::iter::once(offset..end).collect());
            }
            Err(error) => return Err(error),
        };
        if data >= end {
            break;
        }
        let hole = seek_hole(file, data)?.unwrap_or(end).min(end);
        if hole > data {
            extents.push(data..hole);
        }
        // `max`: never loop on a file that changes under us (a hole reported at the data).
        cursor = hole.max(data + 1);
    }
    Ok(extents)
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("file offset {offset:#x} too large for lseek"),
        )
    })?;
    // SAFETY: lseek takes a descriptor that the borrowed `File` keeps open for this call and
    // plain integers; it reads or writes no memory of ours. With SEEK_DATA/SEEK_HOLE the
    // answer depends only on `offset`, so sharing the descriptor's position is harmless.
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if result < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(error);
    }
    // `result >= 0` was checked above, so the conversion cannot fail.
    Ok(u64::try_from(result).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn sparse_file() -> File {
        // The test writes two blocks far apart in an otherwise empty file.
        let file = tempfile::tempfile().unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        file.write_all_at(&[2u8; 4096], 8 << 20).unwrap();
        file
    }

    #[test]
    fn finds_data_and_clips_to_the_window() {
        let file = sparse_file();
        let all = data_extents(&file, 0, 16 << 20).unwrap();
        if all.len() == 1 && all[0] == (0..16 << 20) {
            // A filesystem without SEEK_DATA: the dense fallback.
            return;
        }
        assert!(all.iter().any(|r| r.contains(&(1 << 20))), "{all:x?}");
        assert!(all.iter().any(|r| r.contains(&(8 << 20))), "{all:x?}");
        assert!(all.iter().all(|r| !r.contains(&(4 << 20))), "{all:x?}");
        let window = data_extents(&file, (1 << 20) + 100, 1000).unwrap();
        assert_eq!(window.len(), 1);
        assert_eq!(window[0], (1 << 20) + 100..(1 << 20) + 1100);
        assert!(data_extents(&file, 2 << 20, 1 << 20).unwrap().is_empty());
        assert!(data_extents(&file, 32 << 20, 4096).unwrap().is_empty());
    }

    #[test]
    fn seek_past_the_end_is_none() {
        let file = sparse_file();
        assert_eq!(seek_data(&file, 32 << 20).unwrap(), None);
        assert_eq!(seek_hole(&file, 32 << 20).unwrap(), None);
        assert_eq!(
            seek_hole(&file, 0).unwrap().map(|h| h <= 1 << 20),
            Some(true)
        );
    }
}
