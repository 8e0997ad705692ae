//! The logical snapshot model and its two encodings (`FORMAT.md` is the specification).
//!
//! A snapshot is a header (identity, parent reference) plus, for every guest memory region, a
//! list of runs: consecutive pages of one [`PageType`], with data for `Data` runs. The
//! [`file`](mod@file) encoding stores runs in an index and data in page-aligned extents; the [`stream`]
//! encoding sends the same runs as sequential records.

pub mod checksum;
pub mod file;
pub mod stream;

use crate::error::{Error, Result};
use crate::page_type::PageType;

/// Guest page size of format version 1.
pub const PAGE_SIZE: u64 = 4096;
/// The format version this build writes and the only one it reads.
pub const VERSION: u32 = 1;
/// Most pages in one `Data` run: bounds extent size, per-extent checksum granularity and the
/// buffer a stream reader needs (4 MiB).
pub const MAX_DATA_RUN_PAGES: u64 = 1024;
/// Header flag: the snapshot is a diff against the parent named in the header.
pub const FLAG_HAS_PARENT: u32 = 1;
/// Header flag (file encoding only): the data of every page sits at its guest offset
/// ([`FileLayout::GuestOffset`]).
pub const FLAG_GUEST_OFFSET_LAYOUT: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_HAS_PARENT | FLAG_GUEST_OFFSET_LAYOUT;

/// Where a snapshot file keeps the bytes of its data pages (see `FORMAT.md`, "Layouts").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileLayout {
    /// Extents back to back after the header: the file's length is about the data bytes, and a
    /// mapped restore needs one mapping per (coalesced) extent. The default.
    #[default]
    Packed,
    /// Region `i` occupies `[data_base(i), data_base(i) + size)` of the file, where
    /// `data_base(0) = 4096` and each region follows the previous one; a data page sits at
    /// `data_base + page_index * 4096` and every other page is a hole. Allocated bytes are
    /// still about the data bytes (the apparent length is the guest memory size), and a mapped
    /// restore needs one mapping per region. Header flag [`FLAG_GUEST_OFFSET_LAYOUT`].
    GuestOffset,
}

/// The file offset at which each region's pages start in the [`FileLayout::GuestOffset`]
/// layout, and the end of the data area. `None` if the sizes overflow a `u64`.
pub(crate) fn guest_offset_bases(sizes: impl IntoIterator<Item = u64>) -> Option<(Vec<u64>, u64)> {
    let mut bases = Vec::new();
    let mut cursor = file::HEADER_BLOCK_LEN;
    for size in sizes {
        bases.push(cursor);
        cursor = cursor.checked_add(size)?;
    }
    Some((bases, cursor))
}

/// Size of the header fields shared by both encodings (before padding and checksum).
pub(crate) const HEADER_FIELDS_LEN: usize = 96;

/// A random 128-bit snapshot identity; diffs name their parent by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A fresh random identity from the kernel's random source.
    pub fn random() -> Result<Self> {
        let mut bytes = [0u8; 16];
        // SAFETY: the buffer is valid for writes of its full length for the whole call.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != 16 {
            return Err(Error::io(
                "getrandom for snapshot id",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(SnapshotId(bytes))
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// How a diff names its parent: the parent's identity and content digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParentRef {
    /// The parent's [`SnapshotId`].
    pub id: SnapshotId,
    /// The parent's content digest (see [`Header::digest`]).
    pub digest: u32,
}

/// The identity part of a snapshot header, common to both encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (always [`VERSION`] once validated).
    pub version: u32,
    /// Guest page size (always [`PAGE_SIZE`] in version 1).
    pub page_size: u32,
    /// This snapshot's identity.
    pub id: SnapshotId,
    /// The parent of a diff snapshot; `None` for a standalone one.
    pub parent: Option<ParentRef>,
    /// crc32c over the logical content (regions, run types and counts, data checksums); the
    /// same for the file and stream encodings of one snapshot. Children record it.
    pub digest: u32,
}

impl Header {
    /// What a diff written against this snapshot records as its parent.
    pub fn as_parent(&self) -> ParentRef {
        ParentRef {
            id: self.id,
            digest: self.digest,
        }
    }
}

/// Where a data run's bytes are in a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// File offset, a multiple of [`PAGE_SIZE`].
    pub offset: u64,
    /// Length in bytes (pages × [`PAGE_SIZE`]).
    pub len: u64,
    /// crc32c of the extent's bytes.
    pub crc: u32,
}

impl Extent {
    /// `Ok` if `computed`, the crc32c of the bytes read for this extent, is the stored one;
    /// `Err(BadChecksum)` naming the extent otherwise.
    pub(crate) fn check_crc(&self, computed: u32) -> crate::error::Result<()> {
        if computed == self.crc {
            return Ok(());
        }
        Err(crate::error::Error::BadChecksum {
            what: format!("data extent at {:#x}", self.offset),
            stored: self.crc,
            computed,
        })
    }
}

/// Consecutive pages of one type inside a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The type of every page of the run.
    pub page_type: PageType,
    /// Index of the first page, counted from the start of the region.
    pub first_page: u64,
    /// Number of pages (at least 1; at most [`MAX_DATA_RUN_PAGES`] for `Data`).
    pub pages: u64,
    /// For `Data` runs of a file snapshot: where the bytes are. `None` otherwise.
    pub extent: Option<Extent>,
}

/// One guest memory region of a snapshot and the runs that cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
    /// Runs in page order, covering the region exactly.
    pub runs: Vec<Run>,
}

impl Region {
    /// Number of pages of the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Counts pages per type over a region list.
pub(crate) fn count_pages(regions: &[Region]) -> [u64; 5] {
    let mut counts = [0u64; 5];
    for run in regions.iter().flat_map(|r| &r.runs) {
        counts[run.page_type as usize] += run.pages;
    }
    counts
}

/// Checks a region layout: page aligned, non-empty, sorted, non-overlapping, no overflow.
pub(crate) fn check_layout(layout: &[(u64, u64)]) -> Result<()> {
    let mut end_of_previous = 0u64;
    for (i, &(addr, size)) in layout.iter().enumerate() {
        if size == 0 || size % PAGE_SIZE != 0 || addr % PAGE_SIZE != 0 {
            return Err(Error::Inconsistent(format!(
                "region {i} ({addr:#x}, {size:#x}) is empty or not page aligned"
            )));
        }
        let end = addr
            .checked_add(size)
            .ok_or_else(|| Error::Inconsistent(format!("region {i} wraps the address space")))?;
        if i > 0 && addr < end_of_previous {
            return Err(Error::Inconsistent(format!(
                "region {i} at {addr:#x} overlaps or precedes region {}",
                i - 1
            )));
        }
        end_of_previous = end;
    }
    Ok(())
}

/// Incremental computation of the content digest (see `FORMAT.md`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Digest(u32);

impl Digest {
    pub(crate) fn new() -> Self {
        Digest(0)
    }

    pub(crate) fn region(&mut self, guest_addr: u64, size: u64) {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&guest_addr.to_le_bytes());
        bytes[8..].copy_from_slice(&size.to_le_bytes());
        self.0 = crate::format::checksum::crc32c_append(self.0, &bytes);
    }

    pub(crate) fn run(&mut self, page_type: PageType, pages: u64, data_crc: u32) {
        let mut bytes = [0u8; 13];
        bytes[0] = page_type.as_u8();
        bytes[1..9].copy_from_slice(&pages.to_le_bytes());
        bytes[9..].copy_from_slice(&data_crc.to_le_bytes());
        self.0 = crate::format::checksum::crc32c_append(self.0, &bytes);
    }

    pub(crate) fn value(self) -> u32 {
        self.0
    }
}

/// Encoding-specific header fields; zero in the stream encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FileFields {
    pub layout: FileLayout,
    pub region_table_offset: u64,
    pub data_end: u64,
    pub file_len: u64,
    pub region_table_crc: u32,
}

/// Encodes the 96 header field bytes.
pub(crate) fn encode_header_fields(
    magic: &[u8; 8],
    header: &Header,
    region_count: u32,
    file: &FileFields,
) -> [u8; HEADER_FIELDS_LEN] {
    let mut b = [0u8; HEADER_FIELDS_LEN];
    b[0..8].copy_from_slice(magic);
    b[8..12].copy_from_slice(&header.version.to_le_bytes());
    b[12..16].copy_from_slice(&header.page_size.to_le_bytes());
    let mut flags = if header.parent.is_some() {
        FLAG_HAS_PARENT
    } else {
        0
    };
    if file.layout == FileLayout::GuestOffset {
        flags |= FLAG_GUEST_OFFSET_LAYOUT;
    }
    b[16..20].copy_from_slice(&flags.to_le_bytes());
    b[20..24].copy_from_slice(&region_count.to_le_bytes());
    b[24..40].copy_from_slice(&header.id.0);
    if let Some(parent) = header.parent {
        b[40..56].copy_from_slice(&parent.id.0);
        b[56..60].copy_from_slice(&parent.digest.to_le_bytes());
    }
    b[60..64].copy_from_slice(&header.digest.to_le_bytes());
    b[64..72].copy_from_slice(&file.region_table_offset.to_le_bytes());
    b[72..80].copy_from_slice(&file.data_end.to_le_bytes());
    b[80..88].copy_from_slice(&file.file_len.to_le_bytes());
    b[88..92].copy_from_slice(&file.region_table_crc.to_le_bytes());
    b
}

/// Decodes and checks the header fields (the caller has verified their checksum).
/// Returns the header, the region count and the file-specific fields.
pub(crate) fn decode_header_fields(
    magic: &[u8; 8],
    encoding: &'static str,
    b: &[u8; HEADER_FIELDS_LEN],
) -> Result<(Header, u32, FileFields)> {
    if &b[0..8] != magic {
        return Err(Error::BadMagic { encoding });
    }
    let version = le_u32(&b[8..12]);
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    let page_size = le_u32(&b[12..16]);
    if u64::from(page_size) != PAGE_SIZE {
        return Err(Error::UnsupportedPageSize(page_size));
    }
    let flags = le_u32(&b[16..20]);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(Error::UnknownFlags(flags));
    }
    let layout = if flags & FLAG_GUEST_OFFSET_LAYOUT != 0 {
        if magic != &file::FILE_MAGIC {
            return Err(Error::Inconsistent(
                "a stream has no file layout, yet the guest-offset layout flag is set".into(),
            ));
        }
        FileLayout::GuestOffset
    } else {
        FileLayout::Packed
    };
    let region_count = le_u32(&b[20..24]);
    let id = SnapshotId(to_array(&b[24..40]));
    let parent_id = SnapshotId(to_array(&b[40..56]));
    let parent_digest = le_u32(&b[56..60]);
    let parent = if flags & FLAG_HAS_PARENT != 0 {
        Some(ParentRef {
            id: parent_id,
            digest: parent_digest,
        })
    } else {
        if parent_id != SnapshotId::default() || parent_digest != 0 {
            return Err(Error::Inconsistent(
                "parent fields set without the parent flag".into(),
            ));
        }
        None
    };
    if le_u32(&b[92..96]) != 0 {
        return Err(Error::Inconsistent(
            "reserved header field is not zero".into(),
        ));
    }
    let header = Header {
        version,
        page_size,
        id,
        parent,
        digest: le_u32(&b[60..64]),
    };
    let file = FileFields {
        layout,
        region_table_offset: le_u64(&b[64..72]),
        data_end: le_u64(&b[72..80]),
        file_len: le_u64(&b[80..88]),
        region_table_crc: le_u32(&b[88..92]),
    };
    Ok((header, region_count, file))
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(to_array(b))
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(to_array(b))
}

/// Copies a slice of exactly `N` bytes into an array; callers slice with constant bounds.
pub(crate) fn to_array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}
