//! Reading and writing Cloud Hypervisor's `memory-ranges` file.
//!
//! The file is the saved ranges' bytes back to back, in the order of the range table, and
//! nothing else. Since Cloud Hypervisor copies shared (memfd) memory with `SEEK_DATA`/
//! `SEEK_HOLE`, the file is sparse where guest memory was never populated; anonymous memory is
//! written densely. The reader keeps that distinction (a hole is not a written zero) so an
//! export can reproduce the file with its holes where they were.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::MemoryLayout;
use super::ChError;
use crate::sparse::data_extents;

/// Copy granularity: large enough to amortize syscalls, small enough to stay in cache.
const CHUNK: usize = 1 << 20;

/// Copies the data extents of `memory-ranges` into `memory` at their guest addresses and
/// returns how many bytes were copied.
///
/// Holes are skipped, so on fresh anonymous memory their pages stay never-populated and a
/// snapshot writer types them without reading them. Fails if the file is not exactly as long as
/// the ranges (truncated or trailing bytes) or a range is not backed by `memory`.
pub fn load_into<M: GuestMemory>(
    file: &File,
    layout: &MemoryLayout,
    memory: &M,
) -> Result<u64, ChError> {
    let file_len = file
        .metadata()
        .map_err(|e| ChError::Io("reading memory-ranges metadata", e))?
        .len();
    if file_len != layout.saved_bytes() {
        return Err(ChError::Inconsistent(format!(
            "memory-ranges is {file_len} bytes, the range table says {}",
            layout.saved_bytes()
        )));
    }
    let mut buffer = vec![0u8; CHUNK];
    let mut copied = 0u64;
    for (range, offset) in layout.ranges.iter().zip(layout.file_offsets()) {
        let extents = data_extents(file, offset, range.length)
            .map_err(|e| ChError::Io("finding the data extents of memory-ranges", e))?;
        for extent in extents {
            let (data, length) = (extent.start, extent.end - extent.start);
            let mut done = 0u64;
            while done < length {
                let count = (length - done).min(CHUNK as u64) as usize;
                let chunk = &mut buffer[..count];
                file.read_exact_at(chunk, data + done)
                    .map_err(|e| ChError::Io("reading memory-ranges", e))?;
                let gpa = range.gpa + (data - offset) + done;
                memory
                    .write_slice(chunk, GuestAddress(gpa))
                    .map_err(|e| ChError::GuestMemory(gpa, e.to_string()))?;
                done += count as u64;
            }
            copied += length;
        }
    }
    Ok(copied)
}

/// How a page is to appear in a `memory-ranges` file being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageFill {
    /// Not stored: the page stays a hole in the file (reads back as zeros).
    Hole,
    /// Stored as written zeros (allocated on disk, as Cloud Hypervisor writes them).
    Zero,
    /// Stored with the bytes the source put in the page buffer.
    Data,
}

/// Where the export gets guest pages from.
pub trait PageSource {
    /// Says how the page at `gpa` is stored, filling `page` (one page long) for
    /// [`PageFill::Data`].
    fn page(&mut self, gpa: u64, page: &mut [u8]) -> Result<PageFill, ChError>;
}

/// Writes a `memory-ranges` file for `layout` from `source`; returns the bytes written.
///
/// The file is created (it must not exist, as Cloud Hypervisor requires), sized to the sum of
/// the ranges, and only non-hole pages are written, coalesced into large writes; hole pages stay
/// holes on any filesystem that supports sparse files.
pub fn write_file(
    path: &std::path::Path,
    layout: &MemoryLayout,
    page_size: usize,
    source: &mut dyn PageSource,
) -> Result<u64, ChError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ChError::Io("creating memory-ranges", e))?;
    file.set_len(layout.saved_bytes())
        .map_err(|e| ChError::Io("sizing memory-ranges", e))?;
    let mut pending = Vec::with_capacity(CHUNK);
    let mut pending_offset = 0u64;
    let mut written = 0u64;
    let mut page = vec![0u8; page_size];
    for (range, offset) in layout.ranges.iter().zip(layout.file_offsets()) {
        for index in 0..range.length / page_size as u64 {
            let in_range = index * page_size as u64;
            let fill = source.page(range.gpa + in_range, &mut page)?;
            let file_offset = offset + in_range;
            let contiguous = pending_offset + pending.len() as u64 == file_offset;
            if fill == PageFill::Hole || !contiguous || pending.len() >= CHUNK {
                written += flush(&file, &mut pending, pending_offset)?;
                pending_offset = file_offset;
            }
            match fill {
                PageFill::Hole => pending_offset = file_offset + page_size as u64,
                PageFill::Zero => pending.resize(pending.len() + page_size, 0),
                PageFill::Data => pending.extend_from_slice(&page),
            }
        }
    }
    written += flush(&file, &mut pending, pending_offset)?;
    Ok(written)
}

fn flush(file: &File, pending: &mut Vec<u8>, offset: u64) -> Result<u64, ChError> {
    if pending.is_empty() {
        return Ok(0);
    }
    file.write_all_at(pending, offset)
        .map_err(|e| ChError::Io("writing memory-ranges", e))?;
    let count = pending.len() as u64;
    pending.clear();
    Ok(count)
}
