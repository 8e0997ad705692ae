//! Producing the stream encoding.

use std::io::Write;

use super::DataSource;
use crate::error::{Error, Result};
use crate::format::stream::{
    encode_header, encode_region_table, plain_trailer, record_header, run_header, value_trailer,
    END_TAG,
};
use crate::format::{Digest, Header, Region};

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .map_err(|e| Error::io("write snapshot stream", e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Writes `regions` (runs typed, data from `source`) as a stream. Returns the header with its
/// digest and the stream length.
pub(crate) fn write_stream<W: Write>(
    out: W,
    mut header: Header,
    regions: &[Region],
    source: &dyn DataSource,
) -> Result<(Header, u64)> {
    let mut out = Counting {
        inner: std::io::BufWriter::with_capacity(1 << 16, out),
        written: 0,
    };
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    out.put(&encode_header(&header, regions.len() as u32))?;
    out.put(&encode_region_table(&layout))?;
    let mut digest = Digest::new();
    let mut records = 0u64;
    let mut scratch = Vec::new();
    for (ri, region) in regions.iter().enumerate() {
        digest.region(region.guest_addr, region.size);
        for run in &region.runs {
            let h = run_header(run.page_type, run.pages);
            out.put(&h)?;
            let mut crc = 0;
            if run.page_type.has_data() {
                source.with_data(ri, run.first_page, run.pages, &mut scratch, &mut |d| {
                    crc = crate::format::checksum::crc32c(d);
                    out.put(d)
                })?;
                out.put(&value_trailer(&h, crc))?;
            } else {
                out.put(&plain_trailer(&h))?;
            }
            digest.run(run.page_type, run.pages, crc);
            records += 1;
        }
    }
    header.digest = digest.value();
    let end = record_header(END_TAG, records);
    out.put(&end)?;
    out.put(&value_trailer(&end, header.digest))?;
    out.inner
        .flush()
        .map_err(|e| Error::io("flush snapshot stream", e))?;
    Ok((header, out.written))
}
