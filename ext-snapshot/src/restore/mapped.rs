//! Mapped restore: guest memory whose data pages are the snapshot file, copy-on-write.
//!
//! Each region starts as a fresh anonymous mapping created and owned by `vm-memory`
//! (`MmapRegion::new`). The data extents of the snapshot file are then mapped over it with
//! `MAP_PRIVATE | MAP_FIXED`: reading a data page reads the page cache of the snapshot, the
//! first write gives the guest a private copy, and the file is never modified. Pages without
//! data (never populated, invalid, zero) stay anonymous and untouched, so the host allocates
//! nothing for them until the guest writes them. Setup costs one `mmap` per contiguous extent
//! and reads no data, so it takes milliseconds whatever the snapshot holds.
//!
//! Why not `MmapRegion::build_raw` over a reservation of our own: `vm-memory` would then not
//! own the mapping, and any clone of the `GuestMemoryMmap` outliving our owner would dangle.
//! Mapping over a region `vm-memory` owns keeps ownership in one place: when the last clone
//! drops, `munmap` of the region removes the file mappings with it.
//!
//! Guest-offset layout (`FileLayout::GuestOffset`): each region is one `MAP_PRIVATE` mapping
//! of its piece of the file, so setup is one `mmap` per region whatever the content. Pages
//! without data are then holes of the file rather than anonymous memory: they read as zeros
//! through the page cache (a read may make the filesystem allocate a zero-filled page-cache
//! page, shared and reclaimable, not guest-private memory), a write copies them into private
//! anonymous memory like any other page, and `MADV_DONTNEED` makes them read as zeros again.
//! What the packed layout leaves anonymous is thus backed by holes here; the guest sees the
//! same bytes.
//!
//! Checksums: the header, region table and indexes are always validated before any mapping
//! is made. Data extents are verified up front only with [`MappedOptions::verify_data`],
//! which reads every data byte once (the page cache then serves the guest's reads).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};
use crate::format::{guest_offset_bases, FileLayout, Region, PAGE_SIZE};
use crate::page_type::PageType;
use crate::reader::SnapshotFile;

/// Extents shorter than this many pages are copied rather than mapped: a mapping costs a few
/// microseconds and a VMA, copying 64 KiB costs about as much.
pub const MIN_MAPPED_PAGES: u64 = 16;

/// Most file mappings one restore makes (each splits the anonymous region, so it costs up to
/// two VMAs); the shortest spans beyond it are copied, so a fragmented snapshot cannot exhaust
/// `vm.max_map_count` (65530 by default) for the whole process.
pub const MAX_MAPPINGS: usize = 16384;

/// Options of [`restore_mapped`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MappedOptions {
    /// Verify the checksum of every data extent before mapping (reads all data once).
    pub verify_data: bool,
}

/// What [`restore_mapped`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappedReport {
    /// Number of `MAP_FIXED` file mappings made.
    pub mappings: u64,
    /// Bytes of guest memory backed by the snapshot file.
    pub mapped_bytes: u64,
    /// Bytes of short extents copied into anonymous memory instead.
    pub copied_bytes: u64,
}

/// A contiguous piece of a region backed by a contiguous piece of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    region_offset: u64,
    file_offset: u64,
    len: u64,
}

/// Coalesces a region's data runs into spans: adjacent runs whose extents are adjacent in the
/// file become one span (the writer lays extents out in page order, so most do).
fn spans(region: &Region) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for run in &region.runs {
        let Some(extent) = run.extent else { continue };
        let region_offset = run.first_page * PAGE_SIZE;
        match spans.last_mut() {
            Some(last)
                if last.region_offset + last.len == region_offset
                    && last.file_offset + last.len == extent.offset =>
            {
                last.len += extent.len;
            }
            _ => spans.push(Span {
                region_offset,
                file_offset: extent.offset,
                len: extent.len,
            }),
        }
    }
    spans
}

/// Restores the snapshot file at `path` into new guest memory backed copy-on-write by the file.
///
/// The regions carry a fresh dirty bitmap of type `B` (`()` for none, `AtomicBitmap` for a VMM
/// that tracks its own writes): restoring marks nothing, so it starts clean and counts from
/// the snapshot.
///
/// Fails, before creating any guest memory, when the snapshot is invalid or is a diff
/// ([`Error::NeedsParent`]: merge the chain first).
pub fn restore_mapped<B: NewBitmap>(
    path: &Path,
    options: MappedOptions,
) -> Result<(GuestMemoryMmap<B>, MappedReport)> {
    let snapshot = SnapshotFile::open(path)?;
    if snapshot.is_diff() {
        return Err(Error::NeedsParent);
    }
    if options.verify_data {
        snapshot.verify_data()?;
    }
    let file = snapshot.file();
    let guest_offset = snapshot.file_layout() == FileLayout::GuestOffset;
    let bases = if guest_offset {
        guest_offset_bases(snapshot.regions().iter().map(|r| r.size))
            .ok_or_else(|| Error::Inconsistent("data area overflows".into()))?
            .0
    } else {
        Vec::new()
    };
    let mut report = MappedReport::default();
    let mut guest_regions = Vec::with_capacity(snapshot.regions().len());
    let mut budget_used = 0usize;
    for region in snapshot.regions() {
        if region
            .runs
            .iter()
            .any(|r| r.page_type == PageType::SameAsParent)
        {
            return Err(Error::NeedsParent);
        }
        let size = usize::try_from(region.size)
            .map_err(|_| Error::UnsupportedMemory(format!("region of {:#x} bytes", region.size)))?;
        let mapping =
            MmapRegion::<B>::new(size).map_err(|e| Error::UnsupportedMemory(e.to_string()))?;
        if guest_offset {
            // The whole region is one piece of the file: data pages at their offsets, holes
            // (read as zeros) everywhere else. One mapping, whatever the content.
            let span = Span {
                region_offset: 0,
                file_offset: bases[guest_regions.len()],
                len: region.size,
            };
            map_span(file, &mapping, span)?;
            report.mappings += 1;
            report.mapped_bytes += span.len;
            let guest_region = GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
                .ok_or_else(|| {
                    Error::UnsupportedMemory(format!(
                        "region at {:#x} overflows the guest address space",
                        region.guest_addr
                    ))
                })?;
            guest_regions.push(guest_region);
            continue;
        }
        let region_spans = spans(region);
        let threshold = mapping_threshold(&region_spans, MAX_MAPPINGS - budget_used);
        for span in region_spans {
            if span.len >= threshold && budget_used < MAX_MAPPINGS {
                budget_used += 1;
                map_span(file, &mapping, span)?;
                report.mappings += 1;
                report.mapped_bytes += span.len;
            } else {
                copy_span(file, &mapping, span)?;
                report.copied_bytes += span.len;
            }
        }
        let guest_region = GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
            .ok_or_else(|| {
                Error::UnsupportedMemory(format!(
                    "region at {:#x} overflows the guest address space",
                    region.guest_addr
                ))
            })?;
        guest_regions.push(guest_region);
    }
    let memory = GuestMemoryMmap::from_regions(guest_regions)
        .map_err(|e| Error::UnsupportedMemory(e.to_string()))?;
    Ok((memory, report))
}

/// The shortest span length that gets mapped: at least `MIN_MAPPED_PAGES`, raised so that at
/// most `budget` spans qualify (ties at the threshold may still exceed it; the caller stops
/// mapping when the budget is spent).
fn mapping_threshold(spans: &[Span], budget: usize) -> u64 {
    let minimum = MIN_MAPPED_PAGES * PAGE_SIZE;
    let mut lengths: Vec<u64> = spans
        .iter()
        .map(|s| s.len)
        .filter(|&l| l >= minimum)
        .collect();
    if lengths.len() <= budget {
        return minimum;
    }
    if budget == 0 {
        return u64::MAX;
    }
    let (_, nth, _) = lengths.select_nth_unstable_by(budget - 1, |a, b| b.cmp(a));
    (*nth).max(minimum)
}

fn map_span<B: Bitmap>(file: &File, mapping: &MmapRegion<B>, span: Span) -> Result<()> {
    let offset = libc::off_t::try_from(span.file_offset)
        .map_err(|_| Error::Inconsistent(format!("extent offset {:#x}", span.file_offset)))?;
    // `spans` only yields ranges inside the region (the parser checked every run lies within
    // it), so the target is inside the mapping `vm-memory` owns.
    debug_assert!(span.region_offset + span.len <= mapping.size() as u64);
    // SAFETY: the target range [as_ptr + region_offset, +len) lies inside `mapping`, an
    // anonymous private mapping owned by `mapping` that nothing else references yet (the region
    // is not handed out before this function returns), so replacing its pages with MAP_FIXED
    // cannot pull memory from under a live reference. The file offset is page aligned (the
    // parser checks extent offsets) and `file` is a valid open descriptor.
    let address = unsafe {
        libc::mmap(
            mapping.as_ptr().add(span.region_offset as usize).cast(),
            span.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(Error::io(
            format!("mapping extent at {:#x}", span.file_offset),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn copy_span<B: Bitmap>(file: &File, mapping: &MmapRegion<B>, span: Span) -> Result<()> {
    // SAFETY: the range is inside `mapping` (see `map_span`) and nothing else holds a
    // reference into the fresh mapping, so a unique mutable slice over it is sound for the
    // duration of the read.
    let target = unsafe {
        std::slice::from_raw_parts_mut(
            mapping.as_ptr().add(span.region_offset as usize),
            span.len as usize,
        )
    };
    file.read_exact_at(target, span.file_offset)
        .map_err(|e| Error::read(format!("reading extent at {:#x}", span.file_offset), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Extent, Run};

    fn run(page_type: PageType, first_page: u64, pages: u64, offset: Option<u64>) -> Run {
        Run {
            page_type,
            first_page,
            pages,
            extent: offset.map(|offset| Extent {
                offset,
                len: pages * PAGE_SIZE,
                crc: 0,
            }),
        }
    }

    #[test]
    fn mapping_threshold_keeps_the_longest_spans_within_budget() {
        let span = |pages: u64| Span {
            region_offset: 0,
            file_offset: 0,
            len: pages * PAGE_SIZE,
        };
        let spans = [span(1), span(16), span(40), span(100), span(20)];
        assert_eq!(mapping_threshold(&spans, 10), MIN_MAPPED_PAGES * PAGE_SIZE);
        assert_eq!(mapping_threshold(&spans, 2), 40 * PAGE_SIZE);
        assert_eq!(mapping_threshold(&spans, 0), u64::MAX);
    }

    #[test]
    fn adjacent_extents_coalesce_and_gaps_split() {
        let region = Region {
            guest_addr: 0,
            size: 16 * PAGE_SIZE,
            runs: vec![
                run(PageType::Data, 0, 2, Some(4096)),
                run(PageType::Data, 2, 3, Some(4096 + 2 * PAGE_SIZE)),
                run(PageType::Zero, 5, 1, None),
                run(PageType::Data, 6, 10, Some(4096 + 5 * PAGE_SIZE)),
            ],
        };
        assert_eq!(
            spans(&region),
            vec![
                Span {
                    region_offset: 0,
                    file_offset: 4096,
                    len: 5 * PAGE_SIZE
                },
                Span {
                    region_offset: 6 * PAGE_SIZE,
                    file_offset: 4096 + 5 * PAGE_SIZE,
                    len: 10 * PAGE_SIZE
                },
            ]
        );
    }
}
