//! Segments: the page ranges a restore writes, each with its final type and where its bytes
//! are. A single snapshot gives them directly from its runs; a diff chain (the `diff` module,
//! which sits above this one) resolves its layers into them. Restores take segments, so they need not know about chains.

use crate::format::{Region, PAGE_SIZE};
use crate::page_type::PageType;
use crate::reader::SnapshotFile;

/// A page range of a resolved chain: its final type and, for data, where the bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Final type of the pages (`SameAsParent` only if the chain's base is itself a diff).
    pub page_type: PageType,
    /// First page, counted from the start of the region.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// For data: index of the layer in the chain and file offset of the first page's bytes.
    pub source: Option<(usize, u64)>,
}

pub(crate) fn base_segments(region: &Region) -> Vec<Segment> {
    let mut out = Vec::with_capacity(region.runs.len());
    for run in &region.runs {
        push_segment(
            &mut out,
            Segment {
                page_type: run.page_type,
                first_page: run.first_page,
                pages: run.pages,
                source: run.extent.map(|e| (0, e.offset)),
            },
        );
    }
    out
}

/// Appends `s`, merging it into the last segment when they continue each other.
pub(crate) fn push_segment(out: &mut Vec<Segment>, s: Segment) {
    if let Some(last) = out.last_mut() {
        let continues = last.page_type == s.page_type
            && match (last.source, s.source) {
                (None, None) => true,
                (Some((l1, o1)), Some((l2, o2))) => l1 == l2 && o1 + last.pages * PAGE_SIZE == o2,
                _ => false,
            };
        if continues {
            last.pages += s.pages;
            return;
        }
    }
    out.push(s);
}

/// The segments of a single snapshot, region by region (a chain of one).
pub(crate) fn single_segments(snapshot: &SnapshotFile) -> Vec<Vec<Segment>> {
    snapshot.regions().iter().map(base_segments).collect()
}
