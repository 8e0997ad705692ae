//! The stream encoding: sequential records, no seeking (see `FORMAT.md`).
//!
//! `[header: 96 bytes + crc][region table: 16 bytes per region + crc][run records...][end]`.
//! Each run record carries its own checksum so a reader can act on a record as soon as it is
//! verified; the end record carries the record count and the content digest, which commit to
//! the whole snapshot.

use super::{encode_header_fields, FileFields, Header, HEADER_FIELDS_LEN};
use crate::page_type::PageType;

/// Magic of the stream encoding.
pub const STREAM_MAGIC: [u8; 8] = *b"EXTSNAPS";
/// Length of a record header (tag, 7 reserved bytes, page count).
pub const RECORD_HEADER_LEN: usize = 16;
/// Tag of the end record.
pub const END_TAG: u8 = 0xff;
/// Length of one region table entry in the stream.
pub const STREAM_REGION_ENTRY_LEN: usize = 16;

/// The stream header: fields then their crc32c.
pub(crate) fn encode_header(header: &Header, region_count: u32) -> Vec<u8> {
    let fields = encode_header_fields(
        &STREAM_MAGIC,
        &Header {
            digest: 0,
            ..*header
        },
        region_count,
        &FileFields::default(),
    );
    let mut out = Vec::with_capacity(HEADER_FIELDS_LEN + 4);
    out.extend_from_slice(&fields);
    out.extend_from_slice(&crate::format::checksum::crc32c(&fields).to_le_bytes());
    out
}

/// The region table: `(guest address, size)` per region then the crc32c of the entries.
pub(crate) fn encode_region_table(layout: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(layout.len() * STREAM_REGION_ENTRY_LEN + 4);
    for &(addr, size) in layout {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
    }
    let crc = crate::format::checksum::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A record header: tag, seven zero bytes, a count.
pub(crate) fn record_header(tag: u8, count: u64) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0] = tag;
    h[8..].copy_from_slice(&count.to_le_bytes());
    h
}

/// The trailer of a run record without data: crc32c of its header.
pub(crate) fn plain_trailer(header: &[u8; RECORD_HEADER_LEN]) -> [u8; 4] {
    crate::format::checksum::crc32c(header).to_le_bytes()
}

/// The trailer of a data record (or of the end record, whose "data checksum" is the digest):
/// the value, then crc32c over the header and the value.
pub(crate) fn value_trailer(header: &[u8; RECORD_HEADER_LEN], value: u32) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[..4].copy_from_slice(&value.to_le_bytes());
    let crc =
        crate::format::checksum::crc32c_append(crate::format::checksum::crc32c(header), &t[..4]);
    t[4..].copy_from_slice(&crc.to_le_bytes());
    t
}

/// The record header of a run.
pub(crate) fn run_header(page_type: PageType, pages: u64) -> [u8; RECORD_HEADER_LEN] {
    record_header(page_type.as_u8(), pages)
}
