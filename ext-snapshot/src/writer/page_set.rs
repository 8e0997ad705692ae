//! Sets of guest pages handed in by the caller: invalid pages and dirty pages.

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryRegion, GuestRegionMmap};

use crate::format::PAGE_SIZE;

/// A set of guest pages, asked about one page at a time while typing pages.
pub trait PageSet: Sync {
    /// Whether the page is in the set. `region` is the index of the region in
    /// `GuestMemory::iter()` order, `page` the page index inside that region and `gfn` the
    /// absolute guest frame number (guest physical address / 4096); implementations use
    /// whichever suits their layout.
    fn contains(&self, region: usize, page: u64, gfn: u64) -> bool;
}

/// A bitmap over absolute guest frame numbers: bit `gfn % 64` of word `gfn / 64`. Pages past
/// the end of the bitmap are not in the set. This is how a balloon or free-page-reporting
/// device naturally records invalid pages.
#[derive(Debug, Clone, Copy)]
pub struct GfnBitmap<'a> {
    words: &'a [u64],
}

impl<'a> GfnBitmap<'a> {
    /// Wraps a bitmap of `words.len() * 64` guest frames starting at gfn 0.
    pub fn new(words: &'a [u64]) -> Self {
        GfnBitmap { words }
    }
}

impl PageSet for GfnBitmap<'_> {
    fn contains(&self, _region: usize, _page: u64, gfn: u64) -> bool {
        bit(self.words, gfn)
    }
}

/// One bitmap per region, bit `i` for page `i` of that region: the layout of KVM's dirty log
/// (`KVM_GET_DIRTY_LOG` per memory slot), so the log can be passed without conversion.
/// A region without a bitmap, or pages past a bitmap's end, are not in the set.
#[derive(Debug, Clone)]
pub struct RegionBitmaps<'a> {
    regions: Vec<&'a [u64]>,
}

impl<'a> RegionBitmaps<'a> {
    /// One bitmap per region, in region order.
    pub fn new(regions: Vec<&'a [u64]>) -> Self {
        RegionBitmaps { regions }
    }
}

impl PageSet for RegionBitmaps<'_> {
    fn contains(&self, region: usize, page: u64, _gfn: u64) -> bool {
        self.regions
            .get(region)
            .is_some_and(|words| bit(words, page))
    }
}

/// The dirty bitmaps vm-memory keeps for each region (for example `AtomicBitmap`, filled by
/// device emulation and by whoever merges KVM's dirty log into it).
#[derive(Debug)]
pub struct MemoryDirtyBitmap<'m, B: Bitmap> {
    regions: Vec<&'m GuestRegionMmap<B>>,
}

impl<'m, B: Bitmap> MemoryDirtyBitmap<'m, B> {
    /// Reads the bitmaps of `mem`'s regions.
    pub fn new<M: GuestMemory<R = GuestRegionMmap<B>>>(mem: &'m M) -> Self {
        MemoryDirtyBitmap {
            regions: mem.iter().collect(),
        }
    }
}

impl<B: Bitmap + Sync> PageSet for MemoryDirtyBitmap<'_, B> {
    fn contains(&self, region: usize, page: u64, _gfn: u64) -> bool {
        self.regions.get(region).is_some_and(|r| {
            usize::try_from(page * PAGE_SIZE).is_ok_and(|offset| r.bitmap().dirty_at(offset))
        })
    }
}

fn bit(words: &[u64], index: u64) -> bool {
    usize::try_from(index / 64)
        .ok()
        .and_then(|w| words.get(w))
        .is_some_and(|word| word & (1 << (index % 64)) != 0)
}
