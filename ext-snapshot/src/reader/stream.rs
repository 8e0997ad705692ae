//! Reading the stream encoding record by record.

use std::io::Read;

use crate::error::{Error, Result};
use crate::format::stream::{END_TAG, RECORD_HEADER_LEN, STREAM_MAGIC, STREAM_REGION_ENTRY_LEN};
use crate::format::{
    check_layout, decode_header_fields, le_u32, le_u64, to_array, Digest, Header,
    HEADER_FIELDS_LEN, MAX_DATA_RUN_PAGES, PAGE_SIZE,
};
use crate::page_type::PageType;

/// Regions a stream may announce; bounds what an untrusted header can make us allocate.
const MAX_STREAM_REGIONS: u32 = 1 << 16;

/// One verified run record of a stream.
#[derive(Debug)]
pub struct StreamRecord<'a> {
    /// Region index (in the stream's region table).
    pub region: usize,
    /// First page of the run inside the region.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// Type of the pages.
    pub page_type: PageType,
    /// The pages' bytes for `Data` runs (checksum verified), empty otherwise.
    pub data: &'a [u8],
    /// crc32c of `data` (0 for runs without data).
    pub data_crc: u32,
}

/// Reads a snapshot stream: the header and region table on construction, then one verified
/// record per [`next_record`](Self::next_record) call.
#[derive(Debug)]
pub struct StreamReader<R> {
    input: R,
    header: Header,
    layout: Vec<(u64, u64)>,
    region: usize,
    page: u64,
    records: u64,
    digest: Digest,
    buf: Vec<u8>,
    finished: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and validates the header and region table. `Err` if the stream is not a snapshot
    /// stream of a supported version, or is corrupt or truncated there.
    pub fn new(mut input: R) -> Result<Self> {
        let mut head = [0u8; HEADER_FIELDS_LEN + 4];
        input
            .read_exact(&mut head[..8])
            .map_err(|e| Error::read("stream header", e))?;
        if head[..8] != STREAM_MAGIC {
            return Err(Error::BadMagic { encoding: "stream" });
        }
        input
            .read_exact(&mut head[8..])
            .map_err(|e| Error::read("stream header", e))?;
        check_crc(
            "stream header",
            le_u32(&head[HEADER_FIELDS_LEN..]),
            &head[..HEADER_FIELDS_LEN],
        )?;
        let fields: [u8; HEADER_FIELDS_LEN] = to_array(&head);
        let (header, region_count, file) = decode_header_fields(&STREAM_MAGIC, "stream", &fields)?;
        if header.digest != 0 || file != Default::default() {
            return Err(Error::Inconsistent(
                "file-only header fields set in a stream".into(),
            ));
        }
        if region_count > MAX_STREAM_REGIONS {
            return Err(Error::Inconsistent(format!("{region_count} regions")));
        }
        let mut table = vec![0u8; region_count as usize * STREAM_REGION_ENTRY_LEN + 4];
        input
            .read_exact(&mut table)
            .map_err(|e| Error::read("stream region table", e))?;
        let (entries, crc) = table.split_at(table.len() - 4);
        check_crc("stream region table", le_u32(crc), entries)?;
        let layout: Vec<(u64, u64)> = entries
            .chunks_exact(STREAM_REGION_ENTRY_LEN)
            .map(|e| (le_u64(&e[..8]), le_u64(&e[8..])))
            .collect();
        check_layout(&layout)?;
        let mut digest = Digest::new();
        if let Some(&(addr, size)) = layout.first() {
            digest.region(addr, size);
        }
        Ok(StreamReader {
            input,
            header,
            layout,
            region: 0,
            page: 0,
            records: 0,
            digest,
            buf: Vec::new(),
            finished: false,
        })
    }

    /// The header. Its `digest` is 0 until the end record has been verified, then the
    /// stream's content digest.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// `(guest address, size)` of every region.
    pub fn layout(&self) -> &[(u64, u64)] {
        &self.layout
    }

    /// The next run record, verified; `Ok(None)` once the end record has been read and the
    /// whole stream verified (record count and content digest). `Err` for corruption or
    /// truncation; records returned before an `Err` were each intact.
    pub fn next_record(&mut self) -> Result<Option<StreamRecord<'_>>> {
        if self.finished {
            return Ok(None);
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        self.input
            .read_exact(&mut h)
            .map_err(|e| Error::read("stream record", e))?;
        let count = le_u64(&h[8..]);
        if h[0] == END_TAG {
            let mut t = [0u8; 8];
            self.input
                .read_exact(&mut t)
                .map_err(|e| Error::read("stream end record", e))?;
            check_value_trailer("stream end record", &h, &t)?;
            if h[1..8] != [0; 7] {
                return Err(Error::Inconsistent("reserved bytes of end record".into()));
            }
            if self.region != self.layout.len() {
                return Err(Error::Inconsistent(format!(
                    "stream ends in region {} of {}",
                    self.region,
                    self.layout.len()
                )));
            }
            if count != self.records {
                return Err(Error::Inconsistent(format!(
                    "end record counts {count} records, stream had {}",
                    self.records
                )));
            }
            let stored = le_u32(&t[..4]);
            if stored != self.digest.value() {
                return Err(Error::BadChecksum {
                    what: "stream content digest".into(),
                    stored,
                    computed: self.digest.value(),
                });
            }
            self.header.digest = stored;
            self.finished = true;
            return Ok(None);
        }
        let page_type = PageType::from_u8(h[0])?;
        let mut data_crc = 0;
        let data_len = if page_type.has_data() {
            if count == 0 || count > MAX_DATA_RUN_PAGES {
                return Err(Error::Inconsistent(format!("data record of {count} pages")));
            }
            (count * PAGE_SIZE) as usize
        } else {
            0
        };
        self.buf.resize(data_len, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(|e| Error::read("stream record data", e))?;
        if page_type.has_data() {
            let mut t = [0u8; 8];
            self.input
                .read_exact(&mut t)
                .map_err(|e| Error::read("stream record trailer", e))?;
            check_value_trailer("stream record", &h, &t)?;
            data_crc = le_u32(&t[..4]);
            check_crc("stream record data", data_crc, &self.buf)?;
        } else {
            let mut t = [0u8; 4];
            self.input
                .read_exact(&mut t)
                .map_err(|e| Error::read("stream record trailer", e))?;
            check_crc("stream record", le_u32(&t), &h)?;
        }
        if h[1..8] != [0; 7] {
            return Err(Error::Inconsistent("reserved bytes of record".into()));
        }
        if page_type == PageType::SameAsParent && self.header.parent.is_none() {
            return Err(Error::Inconsistent(
                "same-as-parent record in a stream without parent".into(),
            ));
        }
        let Some(&(_, size)) = self.layout.get(self.region) else {
            return Err(Error::Inconsistent(
                "run record after the last region".into(),
            ));
        };
        let region_pages = size / PAGE_SIZE;
        if count == 0 || count > region_pages - self.page {
            return Err(Error::Inconsistent(format!(
                "record of {count} pages at page {} of region {} ({region_pages} pages)",
                self.page, self.region
            )));
        }
        let record = (self.region, self.page);
        self.digest.run(page_type, count, data_crc);
        self.records += 1;
        self.page += count;
        if self.page == region_pages {
            self.region += 1;
            self.page = 0;
            if let Some(&(addr, size)) = self.layout.get(self.region) {
                self.digest.region(addr, size);
            }
        }
        Ok(Some(StreamRecord {
            region: record.0,
            first_page: record.1,
            pages: count,
            page_type,
            data: &self.buf,
            data_crc,
        }))
    }
}

fn check_crc(what: &str, stored: u32, bytes: &[u8]) -> Result<()> {
    let computed = crate::format::checksum::crc32c(bytes);
    if computed != stored {
        return Err(Error::BadChecksum {
            what: what.into(),
            stored,
            computed,
        });
    }
    Ok(())
}

fn check_value_trailer(what: &str, header: &[u8; RECORD_HEADER_LEN], t: &[u8; 8]) -> Result<()> {
    let computed =
        crate::format::checksum::crc32c_append(crate::format::checksum::crc32c(header), &t[..4]);
    check_crc_value(what, le_u32(&t[4..]), computed)
}

fn check_crc_value(what: &str, stored: u32, computed: u32) -> Result<()> {
    if stored != computed {
        return Err(Error::BadChecksum {
            what: what.into(),
            stored,
            computed,
        });
    }
    Ok(())
}
