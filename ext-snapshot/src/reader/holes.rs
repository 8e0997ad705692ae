//! The guest-offset layout's promise that every byte of the data area outside the data
//! extents is zero (in practice: a hole).
//!
//! Those bytes belong to no checksummed structure, yet a mapped restore of that layout shows
//! them to the guest as the contents of its non-data pages. [`check_zero_outside_extents`]
//! closes that gap for the callers that verify data (`SnapshotFile::verify_data`, hence every
//! eager restore and `MappedOptions::verify_data`): it walks the file's allocated ranges with
//! `SEEK_DATA`/`SEEK_HOLE` ([`crate::sparse::data_extents`], whose dense fallback reads
//! everything on a filesystem without them) and reads only the allocated bytes that no extent covers.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::page_type::is_zero_page;
use crate::sparse::data_extents;

/// Bytes read at once while checking allocated gaps.
const READ_CHUNK: u64 = 1 << 20;

/// Checks that `[start, end)` of `file` reads as zero outside `extents` (`(offset, len)`
/// pairs sorted by offset, non-overlapping). `Ok(())` if so; `Err(Inconsistent)` naming the
/// first non-zero gap byte's chunk; `Err(Io)`/`Err(Truncated)` if the file cannot be read.
pub(crate) fn check_zero_outside_extents(
    file: &File,
    start: u64,
    end: u64,
    extents: &[(u64, u64)],
) -> Result<()> {
    let allocated = data_extents(file, start, end.saturating_sub(start))
        .map_err(|e| Error::io("finding the holes of the data area", e))?;
    let mut buffer = Vec::new();
    for extent in allocated {
        let stop = extent.end.min(end);
        let mut at = extent.start;
        while at < stop {
            // The first extent that ends after `at`.
            let i = extents.partition_point(|&(o, l)| o + l <= at);
            match extents.get(i) {
                Some(&(o, l)) if o <= at => at = o + l,
                next => {
                    let gap_end = next.map_or(stop, |&(o, _)| o.min(stop));
                    check_zero(file, at, gap_end, &mut buffer)?;
                    at = gap_end;
                }
            }
        }
    }
    Ok(())
}

fn check_zero(file: &File, mut at: u64, end: u64, buffer: &mut Vec<u8>) -> Result<()> {
    while at < end {
        let count = (end - at).min(READ_CHUNK) as usize;
        buffer.resize(count, 0);
        file.read_exact_at(buffer, at)
            .map_err(|e| Error::read(format!("reading the data area at {at:#x}"), e))?;
        if !is_zero_page(buffer) {
            return Err(Error::Inconsistent(format!(
                "non-zero bytes in [{at:#x}, {:#x}), outside every data extent of a \
                 guest-offset layout",
                at + count as u64
            )));
        }
        at += count as u64;
    }
    Ok(())
}
