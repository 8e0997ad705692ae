//! Producing the stream encoding.

use std::io::Write;
use std::time::Instant;

use vm_memory::bitmap::Bitmap;

use super::scan::{scan_chunks, MemorySource};
use super::{DataSource, PageSet};
use crate::error::{Error, Result};
use crate::format::stream::{
    encode_header, encode_region_table, plain_trailer, record_header, run_header, value_trailer,
    END_TAG,
};
use crate::format::{Digest, Header, Region};
use crate::page_type::PageType;

/// Emits records in order, keeping the digest, record count and byte count.
struct RecordWriter<W: Write> {
    out: std::io::BufWriter<W>,
    written: u64,
    digest: Digest,
    records: u64,
    layout: Vec<(u64, u64)>,
    /// Region whose runs are being written (its digest entry is emitted on entry).
    region: Option<usize>,
    counts: [u64; 5],
}

impl<W: Write> RecordWriter<W> {
    fn new(out: W, header: &Header, layout: Vec<(u64, u64)>) -> Result<Self> {
        let mut w = RecordWriter {
            out: std::io::BufWriter::with_capacity(1 << 16, out),
            written: 0,
            digest: Digest::new(),
            records: 0,
            layout,
            region: None,
            counts: [0; 5],
        };
        w.put(&encode_header(header, w.layout.len() as u32))?;
        let table = encode_region_table(&w.layout);
        w.put(&table)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io("write snapshot stream", e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Writes one run of region `ri`; `data` (bytes and their crc) for data runs.
    fn run(
        &mut self,
        ri: usize,
        t: PageType,
        pages: u64,
        data: Option<(&[u8], u32)>,
    ) -> Result<()> {
        while self.region != Some(ri) {
            let next = self.region.map_or(0, |r| r + 1);
            let (addr, size) = self.layout[next];
            self.digest.region(addr, size);
            self.region = Some(next);
        }
        let h = run_header(t, pages);
        self.put(&h)?;
        let crc = match data {
            Some((bytes, crc)) => {
                self.put(bytes)?;
                self.put(&value_trailer(&h, crc))?;
                crc
            }
            None => {
                self.put(&plain_trailer(&h))?;
                0
            }
        };
        self.digest.run(t, pages, crc);
        self.counts[t as usize] += pages;
        self.records += 1;
        Ok(())
    }

    /// Writes the end record and flushes; returns the digest and the stream length.
    fn finish(mut self) -> Result<(u32, u64, [u64; 5])> {
        let end = record_header(END_TAG, self.records);
        let digest = self.digest.value();
        self.put(&end)?;
        self.put(&value_trailer(&end, digest))?;
        self.out
            .flush()
            .map_err(|e| Error::io("flush snapshot stream", e))?;
        Ok((digest, self.written, self.counts))
    }
}

/// Writes `regions` (runs typed, data from `source`) as a stream, keeping their runs exactly.
/// Returns the header with its digest and the stream length.
pub(crate) fn write_stream<W: Write>(
    out: W,
    mut header: Header,
    regions: &[Region],
    source: &dyn DataSource,
) -> Result<(Header, u64)> {
    let layout = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    let mut w = RecordWriter::new(out, &header, layout)?;
    let mut scratch = Vec::new();
    for (ri, region) in regions.iter().enumerate() {
        for run in &region.runs {
            if run.page_type.has_data() {
                source.with_data(ri, run.first_page, run.pages, &mut scratch, &mut |d| {
                    let crc = crate::format::checksum::crc32c(d);
                    w.run(ri, run.page_type, run.pages, Some((d, crc)))
                })?;
            } else {
                w.run(ri, run.page_type, run.pages, None)?;
            }
        }
    }
    let (digest, len, _) = w.finish()?;
    header.digest = digest;
    Ok((header, len))
}

/// What the pipelined stream write produced.
pub(crate) struct StreamWritten {
    pub(crate) header: Header,
    pub(crate) pages_by_type: [u64; 5],
    pub(crate) len: u64,
    /// Seconds until the last chunk was typed.
    pub(crate) scan_seconds: f64,
    /// Seconds from then until the end record was flushed.
    pub(crate) write_seconds: f64,
}

/// Types `source` on `threads` workers and streams records as chunks come in, in memory
/// order, data straight from guest memory. Runs without data that continue across chunks
/// are joined into one record.
pub(crate) fn write_memory_stream<W: Write, B: Bitmap + Sync>(
    out: W,
    mut header: Header,
    source: &MemorySource<'_, B>,
    invalid: Option<&dyn PageSet>,
    dirty: Option<&dyn PageSet>,
    threads: usize,
) -> Result<StreamWritten> {
    let start = Instant::now();
    let layout = source.layout();
    let mut w = RecordWriter::new(out, &header, layout)?;
    // A run without data waiting for the next chunk, which may continue it.
    let mut pending: Option<(usize, PageType, u64)> = None;
    let mut scanned_at = start;
    scan_chunks(
        source,
        invalid,
        dirty,
        threads,
        true,
        &mut |(ri, first, _), runs| {
            scanned_at = Instant::now();
            let mut page = first;
            for r in runs {
                match pending {
                    Some((pri, pt, n)) if pri == ri && pt == r.page_type && !pt.has_data() => {
                        pending = Some((pri, pt, n + r.pages));
                    }
                    _ => {
                        if let Some((pri, pt, n)) = pending.take() {
                            w.run(pri, pt, n, None)?;
                        }
                        if r.page_type.has_data() {
                            let bytes = source.pages(ri, page, r.pages)?;
                            w.run(ri, r.page_type, r.pages, Some((bytes, r.crc)))?;
                        } else {
                            pending = Some((ri, r.page_type, r.pages));
                        }
                    }
                }
                page += r.pages;
            }
            Ok(())
        },
    )?;
    if let Some((pri, pt, n)) = pending {
        w.run(pri, pt, n, None)?;
    }
    let (digest, len, pages_by_type) = w.finish()?;
    header.digest = digest;
    Ok(StreamWritten {
        header,
        pages_by_type,
        len,
        scan_seconds: (scanned_at - start).as_secs_f64(),
        write_seconds: scanned_at.elapsed().as_secs_f64(),
    })
}
