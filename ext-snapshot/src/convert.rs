//! Converting between the file and stream encodings of one snapshot.
//!
//! Conversion keeps the snapshot's identity and runs, so the content digest — and with it
//! every diff that names this snapshot as parent — stays valid across encodings.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::format::count_pages;
use crate::format::file::HEADER_BLOCK_LEN;
use crate::format::{Extent, Region, Run, PAGE_SIZE};
use crate::reader::{SnapshotFile, StreamReader};
use crate::writer::{DataSource, SnapshotReport, TempOutput, WriteOptions};

/// Receives a stream and stores it as a snapshot file at `path` (through `<path>.tmp`).
///
/// `Ok` only after the end record verified the whole stream; on `Err` nothing is left at
/// `path` (and the temporary file is removed). Memory use is one record (at most 4 MiB).
pub fn stream_to_file<R: Read>(
    input: R,
    path: &Path,
    options: WriteOptions,
) -> Result<SnapshotReport> {
    let start = Instant::now();
    let mut reader = StreamReader::new(input)?;
    let mut regions: Vec<Region> = reader
        .layout()
        .iter()
        .map(|&(guest_addr, size)| Region {
            guest_addr,
            size,
            runs: Vec::new(),
        })
        .collect();
    let out = TempOutput::create(path)?;
    let mut cursor = HEADER_BLOCK_LEN;
    while let Some(record) = reader.next_record()? {
        let extent = if record.page_type.has_data() {
            out.file
                .write_all_at(record.data, cursor)
                .map_err(|e| Error::io("write snapshot data", e))?;
            let e = Extent {
                offset: cursor,
                len: record.data.len() as u64,
                crc: record.data_crc,
            };
            cursor += e.len;
            Some(e)
        } else {
            None
        };
        regions[record.region].runs.push(Run {
            page_type: record.page_type,
            first_page: record.first_page,
            pages: record.pages,
            extent,
        });
    }
    let counts = count_pages(&regions);
    let scan_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let (header, len) = out.commit(
        *reader.header(),
        &regions,
        cursor,
        crate::format::FileLayout::Packed,
        options.fsync,
    )?;
    Ok(SnapshotReport {
        id: header.id,
        digest: header.digest,
        pages_by_type: counts,
        output_bytes: len,
        scan_seconds,
        write_seconds: start.elapsed().as_secs_f64(),
    })
}

use std::os::unix::fs::FileExt;

/// Reads data runs of a snapshot file, checking each extent's checksum as it goes.
struct FileSource<'s> {
    snapshot: &'s SnapshotFile,
}

impl DataSource for FileSource<'_> {
    fn with_data(
        &self,
        region: usize,
        first_page: u64,
        pages: u64,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let runs = &self.snapshot.regions()[region].runs;
        let i = runs.partition_point(|r| r.first_page < first_page);
        let extent = runs
            .get(i)
            .filter(|r| r.first_page == first_page && r.pages == pages)
            .and_then(|r| r.extent)
            .ok_or_else(|| Error::Inconsistent("no extent for data run".into()))?;
        scratch.resize((pages * PAGE_SIZE) as usize, 0);
        self.snapshot.read_extent(&extent, scratch)?;
        f(scratch)
    }
}

/// Sends a snapshot file as a stream (same identity and digest). Each extent's checksum is
/// checked as it is read; `Err` leaves an incomplete stream that readers reject. Returns the
/// stream length.
pub fn file_to_stream<W: Write>(snapshot: &SnapshotFile, out: W) -> Result<u64> {
    let source = FileSource { snapshot };
    let (_, len) =
        crate::writer::write_stream_from(out, *snapshot.header(), snapshot.regions(), &source)?;
    Ok(len)
}
