//! Merging a chain into one snapshot, and the chain's restore entry points.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestRegionMmap};

use super::chain::SnapshotChain;
use crate::error::{Error, Result};
use crate::format::count_pages;
use crate::format::{Header, Region, SnapshotId, PAGE_SIZE, VERSION};
use crate::reader::SnapshotFile;
use crate::restore::{EagerOptions, RawLayout, RestoreReport, Segment};
use crate::writer::{DataSource, SnapshotReport, WriteOptions};

/// Reads resolved data page ranges out of the chain's layers.
struct ChainSource<'c> {
    layers: &'c [SnapshotFile],
    segments: &'c [Vec<Segment>],
}

impl DataSource for ChainSource<'_> {
    fn with_data(
        &self,
        region: usize,
        first_page: u64,
        pages: u64,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        scratch.resize((pages * PAGE_SIZE) as usize, 0);
        let segs = &self.segments[region];
        let mut i = segs.partition_point(|s| s.first_page + s.pages <= first_page);
        let mut page = first_page;
        while page < first_page + pages {
            let s = segs
                .get(i)
                .filter(|s| s.first_page <= page)
                .ok_or_else(|| Error::Inconsistent("merge source lost its segment".into()))?;
            let Some((layer, offset)) = s.source else {
                return Err(Error::Inconsistent(
                    "data run without data in the chain".into(),
                ));
            };
            let n = (s.first_page + s.pages - page).min(first_page + pages - page);
            let into = (page - first_page) * PAGE_SIZE;
            let bytes = &mut scratch[into as usize..(into + n * PAGE_SIZE) as usize];
            self.layers[layer]
                .file()
                .read_exact_at(bytes, offset + (page - s.first_page) * PAGE_SIZE)
                .map_err(|e| Error::read("reading chain data", e))?;
            page += n;
            i += 1;
        }
        f(scratch)
    }
}

/// Restores a chain (base and diffs) into `mem`, page by page from the newest layer that has
/// the page. Same guarantees as [`restore_eager`](crate::restore_eager); every layer is
/// verified before the first write.
pub fn restore_chain_eager<M, B>(
    chain: &SnapshotChain,
    mem: &M,
    options: EagerOptions,
) -> Result<RestoreReport>
where
    M: GuestMemory<R = GuestRegionMmap<B>>,
    B: Bitmap + Sync,
{
    let layers: Vec<&SnapshotFile> = chain.layers().iter().collect();
    crate::restore::restore_segments(&layers, &chain.resolve(), mem, options)
}

impl SnapshotChain {
    /// Merges the chain into one snapshot file at `out`: the resolved type of every page and
    /// the data of the newest layer that has it. The result is standalone when the chain's
    /// base is, otherwise a diff against the base's parent. Every layer's data is verified
    /// first. `Ok` reports the new snapshot (its `scan_seconds` is the resolve time).
    pub fn merge(&self, out: &Path, options: WriteOptions) -> Result<SnapshotReport> {
        let start = Instant::now();
        self.verify_data()?;
        let segments = self.resolve();
        let mut regions: Vec<Region> = self.layers()[0]
            .regions()
            .iter()
            .zip(&segments)
            .map(|(r, segs)| {
                let mut runs = Vec::new();
                for s in segs {
                    crate::writer::push_run(&mut runs, s.page_type, s.pages);
                }
                Region {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    runs,
                }
            })
            .collect();
        regions.shrink_to_fit();
        let header = Header {
            version: VERSION,
            page_size: PAGE_SIZE as u32,
            id: SnapshotId::random()?,
            parent: self.layers()[0].header().parent,
            digest: 0,
        };
        let counts = count_pages(&regions);
        let scan_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let source = ChainSource {
            layers: self.layers(),
            segments: &segments,
        };
        let (header, len) = crate::writer::write_file_from(out, header, regions, &source, options)?;
        Ok(SnapshotReport {
            id: header.id,
            digest: header.digest,
            pages_by_type: counts,
            output_bytes: len,
            scan_seconds,
            write_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Eager restore of the whole chain; see [`restore_chain_eager`].
    pub fn restore_eager<M, B>(&self, mem: &M, options: EagerOptions) -> Result<RestoreReport>
    where
        M: GuestMemory<R = GuestRegionMmap<B>>,
        B: Bitmap + Sync,
    {
        restore_chain_eager(self, mem, options)
    }

    /// Writes the chain's memory as a sparse raw file; see [`crate::restore_to_raw_file`].
    pub fn restore_to_raw_file(&self, out: &File, layout: RawLayout) -> Result<RestoreReport> {
        let layers: Vec<&SnapshotFile> = self.layers().iter().collect();
        crate::restore::raw_from_segments(&layers, &self.resolve(), out, layout)
    }
}
