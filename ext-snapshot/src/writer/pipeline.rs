//! The file writer for live memory: data is written while pages are still being typed.
//!
//! Typing (residency, zero check, checksums) runs on the worker threads and hands chunks over
//! in memory order; the calling thread appends each chunk's data runs to the data area with
//! vectored writes straight from guest memory. Extents are assigned in that same order, so the
//! file is identical to one written after a complete scan, and the create time is about
//! max(typing, writing) instead of their sum.
//!
//! In the guest-offset layout each data run goes to its own place (region base + page offset)
//! instead of the end of the data area; a batch then holds runs that are also adjacent in
//! guest memory, and the pages between batches stay holes of the file.

use std::path::Path;
use std::time::Instant;

use vm_memory::bitmap::Bitmap;

use super::scan::{empty_regions, push_run, scan_chunks, MemorySource};
use super::to_file::{pwritev_all, TempOutput, MAX_BATCH_BYTES, MAX_BATCH_RUNS};
use super::{PageSet, WriteOptions};
use crate::error::{Error, Result};
use crate::format::file::HEADER_BLOCK_LEN;
use crate::format::{guest_offset_bases, Extent, FileLayout, Header, Region, Run, PAGE_SIZE};
use crate::page_type::PageType;

/// What the pipelined write produced.
pub(crate) struct Written {
    pub(crate) header: Header,
    pub(crate) regions: Vec<Region>,
    pub(crate) file_len: u64,
    /// Seconds until the last chunk was typed.
    pub(crate) scan_seconds: f64,
    /// Seconds from then until the file was in place.
    pub(crate) write_seconds: f64,
}

/// Types and writes the snapshot of `source` to `path` (through `<path>.tmp`).
pub(crate) fn write_memory_file<B: Bitmap + Sync>(
    path: &Path,
    header: Header,
    source: &MemorySource<'_, B>,
    invalid: Option<&dyn PageSet>,
    dirty: Option<&dyn PageSet>,
    options: WriteOptions,
    layout: FileLayout,
) -> Result<Written> {
    let start = Instant::now();
    let out = TempOutput::create(path)?;
    let mut regions = empty_regions(source);
    let guest_offset = layout == FileLayout::GuestOffset;
    let (bases, guest_offset_end) = if guest_offset {
        guest_offset_bases(regions.iter().map(|r| r.size)).ok_or_else(|| {
            Error::UnsupportedMemory("regions too large for the guest-offset layout".into())
        })?
    } else {
        (Vec::new(), 0)
    };
    let mut cursor = HEADER_BLOCK_LEN;
    let mut batch: Vec<&[u8]> = Vec::new();
    let mut batch_at = cursor;
    let mut batch_bytes = 0;
    let mut scanned_at = start;
    let file = &out.file;
    scan_chunks(
        source,
        invalid,
        dirty,
        options.threads.max(1),
        true,
        &mut |(ri, first, _), runs| {
            scanned_at = Instant::now();
            let mut page = first;
            for r in runs {
                if r.page_type == PageType::Data {
                    let bytes = source.pages(ri, page, r.pages)?;
                    let len = r.pages * PAGE_SIZE;
                    if guest_offset {
                        cursor = bases[ri] + page * PAGE_SIZE;
                    }
                    if batch.len() == MAX_BATCH_RUNS
                        || batch_bytes + len > MAX_BATCH_BYTES
                        || batch_at + batch_bytes != cursor
                    {
                        pwritev_all(file, &batch, batch_at)?;
                        batch.clear();
                        batch_at = cursor;
                        batch_bytes = 0;
                    }
                    batch.push(bytes);
                    batch_bytes += len;
                    regions[ri].runs.push(Run {
                        page_type: PageType::Data,
                        first_page: page,
                        pages: r.pages,
                        extent: Some(Extent {
                            offset: cursor,
                            len,
                            crc: r.crc,
                        }),
                    });
                    cursor += len;
                } else {
                    push_run(&mut regions[ri].runs, r.page_type, r.pages);
                }
                page += r.pages;
            }
            Ok(())
        },
    )?;
    pwritev_all(file, &batch, batch_at)?;
    let data_end = if guest_offset {
        guest_offset_end
    } else {
        cursor
    };
    let (header, file_len) = out.commit(header, &regions, data_end, layout, options.fsync)?;
    Ok(Written {
        header,
        regions,
        file_len,
        scan_seconds: (scanned_at - start).as_secs_f64(),
        write_seconds: scanned_at.elapsed().as_secs_f64(),
    })
}
