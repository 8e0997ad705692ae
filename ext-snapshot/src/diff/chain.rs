//! Validating a chain of snapshots and resolving it page range by page range.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{Region, PAGE_SIZE};
use crate::page_type::PageType;
use crate::reader::SnapshotFile;
use crate::restore::segment::{base_segments, push_segment, Segment};

/// A base snapshot followed by zero or more diffs, validated as a chain.
#[derive(Debug)]
pub struct SnapshotChain {
    layers: Vec<SnapshotFile>,
}

impl SnapshotChain {
    /// Opens and validates the snapshots at `paths`, oldest first. See
    /// [`from_files`](Self::from_files) for what is checked.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let layers = paths
            .iter()
            .map(|p| SnapshotFile::open(p.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Self::from_files(layers)
    }

    /// Builds a chain from open snapshots, oldest first. `Ok` means every diff names the
    /// previous snapshot (id and content digest) and all have the same region layout;
    /// `Err(BrokenChain)` or `Err(RegionMismatch)` otherwise. The first snapshot may itself be
    /// a diff: the chain then resolves to a diff against that snapshot's parent.
    pub fn from_files(layers: Vec<SnapshotFile>) -> Result<Self> {
        let Some(first) = layers.first() else {
            return Err(Error::BrokenChain("empty chain".into()));
        };
        let layout = first.layout();
        for (i, pair) in layers.windows(2).enumerate() {
            let (parent, child) = (&pair[0], &pair[1]);
            match child.header().parent {
                Some(p) if p == parent.header().as_parent() => {}
                Some(p) => {
                    return Err(Error::BrokenChain(format!(
                        "{} names parent {} (digest {:#010x}), previous is {} (digest {:#010x})",
                        child.path().display(),
                        p.id,
                        p.digest,
                        parent.header().id,
                        parent.header().digest
                    )))
                }
                None => {
                    return Err(Error::BrokenChain(format!(
                        "layer {} ({}) is not a diff",
                        i + 1,
                        child.path().display()
                    )))
                }
            }
            if child.layout() != layout {
                return Err(Error::RegionMismatch(format!(
                    "{} has a different region layout than its parent",
                    child.path().display()
                )));
            }
        }
        Ok(SnapshotChain { layers })
    }

    /// The snapshots, oldest first.
    pub fn layers(&self) -> &[SnapshotFile] {
        &self.layers
    }

    /// Region layout shared by all layers.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.layers[0].layout()
    }

    /// Checks the data checksums of every layer (see [`SnapshotFile::verify_data`]).
    pub fn verify_data(&self) -> Result<()> {
        self.layers.iter().try_for_each(SnapshotFile::verify_data)
    }

    /// The resolved segments of every region: for each page, the type and data of the newest
    /// layer that does not say `SameAsParent`. Adjacent segments of one type (and, for data,
    /// contiguous bytes of one layer) are merged.
    pub fn resolve(&self) -> Vec<Vec<Segment>> {
        let mut resolved: Vec<Vec<Segment>> =
            self.layers[0].regions().iter().map(base_segments).collect();
        for (layer, snapshot) in self.layers.iter().enumerate().skip(1) {
            for (segments, region) in resolved.iter_mut().zip(snapshot.regions()) {
                *segments = overlay(segments, region, layer);
            }
        }
        resolved
    }
}

/// Lays the runs of `diff` (layer `layer`) over `below`; both cover the same region.
fn overlay(below: &[Segment], diff: &Region, layer: usize) -> Vec<Segment> {
    let mut out = Vec::with_capacity(below.len() + diff.runs.len());
    let (mut i, mut j) = (0usize, 0usize);
    let (mut off_i, mut off_j) = (0u64, 0u64);
    while i < below.len() && j < diff.runs.len() {
        let seg = &below[i];
        let run = &diff.runs[j];
        let n = (seg.pages - off_i).min(run.pages - off_j);
        let piece = if run.page_type == PageType::SameAsParent {
            Segment {
                page_type: seg.page_type,
                first_page: seg.first_page + off_i,
                pages: n,
                source: seg.source.map(|(l, o)| (l, o + off_i * PAGE_SIZE)),
            }
        } else {
            Segment {
                page_type: run.page_type,
                first_page: run.first_page + off_j,
                pages: n,
                source: run.extent.map(|e| (layer, e.offset + off_j * PAGE_SIZE)),
            }
        };
        push_segment(&mut out, piece);
        off_i += n;
        off_j += n;
        if off_i == seg.pages {
            i += 1;
            off_i = 0;
        }
        if off_j == run.pages {
            j += 1;
            off_j = 0;
        }
    }
    out
}
