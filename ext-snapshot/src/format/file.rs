//! The file encoding: header block, data extents, per-region run indexes, region table.
//!
//! Layout (all integers little endian, see `FORMAT.md`):
//! `[header block: 4096 bytes][data extents][index of region 0]...[index of region N-1][region table]`.
//! The index and table come last so a writer can stream data before it knows every checksum,
//! and so every byte of the file belongs to exactly one checksummed structure.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{
    check_layout, decode_header_fields, encode_header_fields, le_u32, le_u64, Digest, Extent,
    FileFields, FileLayout, Header, Region, Run, HEADER_FIELDS_LEN, MAX_DATA_RUN_PAGES, PAGE_SIZE,
};
use crate::error::{Error, Result};
use crate::page_type::PageType;

/// Magic of the file encoding.
pub const FILE_MAGIC: [u8; 8] = *b"EXTSNAPF";
/// Size of the header block; data extents start right after it.
pub const HEADER_BLOCK_LEN: u64 = 4096;
/// Size of one index entry (one run).
pub const INDEX_ENTRY_LEN: u64 = 24;
/// Size of one region table entry.
pub const REGION_ENTRY_LEN: u64 = 40;

const HEADER_CRC_AT: usize = HEADER_BLOCK_LEN as usize - 4;

/// Encodes the tail (indexes + region table) and the header block of a file whose data area
/// ends at `data_end`. `regions` must carry extents for every data run, placed as `layout`
/// says.
pub(crate) fn encode_tail(
    header: &Header,
    regions: &[Region],
    data_end: u64,
    layout: FileLayout,
) -> (Vec<u8>, Vec<u8>) {
    let mut tail = Vec::new();
    let mut table = Vec::with_capacity(regions.len() * REGION_ENTRY_LEN as usize);
    for region in regions {
        let index_offset = data_end + tail.len() as u64;
        let start = tail.len();
        for run in &region.runs {
            let (crc, offset) = run.extent.map_or((0, 0), |e| (e.crc, e.offset));
            tail.push(run.page_type.as_u8());
            tail.extend_from_slice(&[0; 3]);
            tail.extend_from_slice(&crc.to_le_bytes());
            tail.extend_from_slice(&run.pages.to_le_bytes());
            tail.extend_from_slice(&offset.to_le_bytes());
        }
        let index_crc = crate::format::checksum::crc32c(&tail[start..]);
        table.extend_from_slice(&region.guest_addr.to_le_bytes());
        table.extend_from_slice(&region.size.to_le_bytes());
        table.extend_from_slice(&index_offset.to_le_bytes());
        table.extend_from_slice(&(region.runs.len() as u64).to_le_bytes());
        table.extend_from_slice(&index_crc.to_le_bytes());
        table.extend_from_slice(&[0; 4]);
    }
    let region_table_offset = data_end + tail.len() as u64;
    let fields = FileFields {
        layout,
        region_table_offset,
        data_end,
        file_len: region_table_offset + table.len() as u64,
        region_table_crc: crate::format::checksum::crc32c(&table),
    };
    tail.extend_from_slice(&table);
    let mut block = vec![0u8; HEADER_BLOCK_LEN as usize];
    block[..HEADER_FIELDS_LEN].copy_from_slice(&encode_header_fields(
        &FILE_MAGIC,
        header,
        regions.len() as u32,
        &fields,
    ));
    let crc = crate::format::checksum::crc32c(&block[..HEADER_CRC_AT]);
    block[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    (tail, block)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| Error::read(format!("reading {what}"), e))
}

fn check_crc(what: impl Into<String>, stored: u32, bytes: &[u8]) -> Result<()> {
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

/// Reads and validates everything of a snapshot file except the data extents' contents:
/// header, region table, indexes, and that extents tile the data area exactly (packed layout)
/// or sit at their guest offsets (guest-offset layout).
pub(crate) fn parse(file: &File) -> Result<(Header, Vec<Region>, FileLayout)> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat snapshot file", e))?
        .len();
    let mut block = vec![0u8; HEADER_BLOCK_LEN as usize];
    if len < HEADER_BLOCK_LEN {
        // Still report a foreign file as such rather than as truncated.
        let n = usize::try_from(len).unwrap_or(0).min(8);
        read_exact_at(file, &mut block[..n], 0, "header")?;
        if n == 8 && block[..8] != FILE_MAGIC {
            return Err(Error::BadMagic { encoding: "file" });
        }
        return Err(Error::Truncated(format!(
            "file is {len} bytes, header needs 4096"
        )));
    }
    read_exact_at(file, &mut block, 0, "header")?;
    if block[..8] != FILE_MAGIC {
        return Err(Error::BadMagic { encoding: "file" });
    }
    check_crc(
        "header",
        le_u32(&block[HEADER_CRC_AT..]),
        &block[..HEADER_CRC_AT],
    )?;
    let mut fields = [0u8; HEADER_FIELDS_LEN];
    fields.copy_from_slice(&block[..HEADER_FIELDS_LEN]);
    let (header, region_count, ff) = decode_header_fields(&FILE_MAGIC, "file", &fields)?;
    if block[HEADER_FIELDS_LEN..HEADER_CRC_AT]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(Error::Inconsistent("header padding is not zero".into()));
    }
    if ff.file_len != len {
        return if len < ff.file_len {
            Err(Error::Truncated(format!(
                "file is {len} bytes, header says {}",
                ff.file_len
            )))
        } else {
            Err(Error::Inconsistent(format!(
                "file is {len} bytes, header says {}",
                ff.file_len
            )))
        };
    }
    let table_len = u64::from(region_count) * REGION_ENTRY_LEN;
    if ff.data_end < HEADER_BLOCK_LEN
        || ff.data_end % PAGE_SIZE != 0
        || ff.region_table_offset < ff.data_end
        || ff.region_table_offset.checked_add(table_len) != Some(len)
    {
        return Err(Error::Inconsistent(format!(
            "data end {:#x}, region table at {:#x} with {region_count} entries, file length {len:#x}",
            ff.data_end, ff.region_table_offset
        )));
    }
    let mut table = vec![0u8; table_len as usize];
    read_exact_at(file, &mut table, ff.region_table_offset, "region table")?;
    check_crc("region table", ff.region_table_crc, &table)?;

    let mut digest = Digest::new();
    let mut layout = Vec::with_capacity(region_count as usize);
    let mut regions = Vec::with_capacity(region_count as usize);
    let mut index_cursor = ff.data_end;
    let mut data_cursor = HEADER_BLOCK_LEN;
    for (i, entry) in table.chunks_exact(REGION_ENTRY_LEN as usize).enumerate() {
        let guest_addr = le_u64(&entry[0..8]);
        let size = le_u64(&entry[8..16]);
        let index_offset = le_u64(&entry[16..24]);
        let run_count = le_u64(&entry[24..32]);
        let index_crc = le_u32(&entry[32..36]);
        if le_u32(&entry[36..40]) != 0 {
            return Err(Error::Inconsistent(format!(
                "region {i}: reserved field not zero"
            )));
        }
        layout.push((guest_addr, size));
        check_layout(&layout)?;
        let index_len = run_count
            .checked_mul(INDEX_ENTRY_LEN)
            .filter(|l| index_offset == index_cursor && index_cursor + l <= ff.region_table_offset)
            .ok_or_else(|| {
                Error::Inconsistent(format!(
                    "region {i}: index at {index_offset:#x} with {run_count} runs is out of place"
                ))
            })?;
        index_cursor += index_len;
        let mut index = vec![0u8; index_len as usize];
        read_exact_at(file, &mut index, index_offset, "index")?;
        check_crc(format!("index of region {i}"), index_crc, &index)?;
        digest.region(guest_addr, size);
        // Guest-offset layout: this region's pages start where the previous region's end
        // (`data_cursor` is then the region's base, and moves past the whole region).
        let region_base = (ff.layout == FileLayout::GuestOffset).then_some(data_cursor);
        let runs = parse_index(
            i,
            &index,
            size / PAGE_SIZE,
            &header,
            region_base,
            &mut data_cursor,
            &mut digest,
        )?;
        if region_base.is_some() {
            data_cursor = data_cursor
                .checked_add(size)
                .ok_or_else(|| Error::Inconsistent(format!("region {i}: data area overflows")))?;
        }
        regions.push(Region {
            guest_addr,
            size,
            runs,
        });
    }
    if index_cursor != ff.region_table_offset {
        return Err(Error::Inconsistent(
            "gap between indexes and region table".into(),
        ));
    }
    if data_cursor != ff.data_end {
        return Err(Error::Inconsistent(format!(
            "extents end at {data_cursor:#x}, data area ends at {:#x}",
            ff.data_end
        )));
    }
    if digest.value() != header.digest {
        return Err(Error::BadChecksum {
            what: "content digest".into(),
            stored: header.digest,
            computed: digest.value(),
        });
    }
    Ok((header, regions, ff.layout))
}

fn parse_index(
    region: usize,
    index: &[u8],
    region_pages: u64,
    header: &Header,
    region_base: Option<u64>,
    data_cursor: &mut u64,
    digest: &mut Digest,
) -> Result<Vec<Run>> {
    let bad = |msg: String| Error::Inconsistent(format!("region {region}: {msg}"));
    let mut runs = Vec::with_capacity(index.len() / INDEX_ENTRY_LEN as usize);
    let mut page = 0u64;
    for e in index.chunks_exact(INDEX_ENTRY_LEN as usize) {
        let page_type = PageType::from_u8(e[0])?;
        if e[1..4] != [0; 3] {
            return Err(bad("reserved index bytes not zero".into()));
        }
        let crc = le_u32(&e[4..8]);
        let pages = le_u64(&e[8..16]);
        let offset = le_u64(&e[16..24]);
        if pages == 0 || pages > region_pages - page {
            return Err(bad(format!(
                "run of {pages} pages at page {page} overflows"
            )));
        }
        if page_type == PageType::SameAsParent && header.parent.is_none() {
            return Err(bad(
                "same-as-parent page in a snapshot without parent".into()
            ));
        }
        let extent = if page_type.has_data() {
            // Packed: right after the previous extent. Guest offset: at the page's own place
            // (saturating: a region whose end overflows is rejected by the caller right after).
            let expected = match region_base {
                Some(base) => base.saturating_add(page * PAGE_SIZE),
                None => *data_cursor,
            };
            if pages > MAX_DATA_RUN_PAGES || offset != expected {
                return Err(bad(format!(
                    "data run of {pages} pages at {offset:#x}, expected at most \
                     {MAX_DATA_RUN_PAGES} pages at {expected:#x}"
                )));
            }
            if region_base.is_none() {
                *data_cursor += pages * PAGE_SIZE;
            }
            Some(Extent {
                offset,
                len: pages * PAGE_SIZE,
                crc,
            })
        } else {
            if crc != 0 || offset != 0 {
                return Err(bad("checksum or offset set on a run without data".into()));
            }
            None
        };
        digest.run(page_type, pages, crc);
        runs.push(Run {
            page_type,
            first_page: page,
            pages,
            extent,
        });
        page += pages;
    }
    if page != region_pages {
        return Err(bad(format!("runs cover {page} of {region_pages} pages")));
    }
    Ok(runs)
}
