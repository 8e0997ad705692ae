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

/// A growable set of absolute guest frame numbers (gfn = guest physical address / 4096), as
/// balloons keep the pages they hold: bit `gfn % 64` of word `gfn / 64`, with a count. It is a
/// [`PageSet`] itself; [`gfn_words`](Self::gfn_words) and
/// [`region_bitmaps`](Self::region_bitmaps) give the shapes [`GfnBitmap`] and
/// [`RegionBitmaps`] take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GfnSet {
    words: Vec<u64>,
    count: u64,
}

impl GfnSet {
    /// The empty set.
    pub const fn new() -> Self {
        GfnSet {
            words: Vec::new(),
            count: 0,
        }
    }

    /// Adds `gfn`; returns whether it was new.
    pub fn insert(&mut self, gfn: u64) -> bool {
        let Some(word) = usize::try_from(gfn / 64).ok() else {
            return false;
        };
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << (gfn % 64);
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.count += u64::from(new);
        new
    }

    /// Adds the `count` frames from `first`.
    pub fn insert_range(&mut self, first: u64, count: u64) {
        for gfn in first..first.saturating_add(count) {
            self.insert(gfn);
        }
    }

    /// Removes `gfn`; returns whether it was there.
    pub fn remove(&mut self, gfn: u64) -> bool {
        let present = self.contains(gfn);
        if present {
            if let Some(word) = usize::try_from(gfn / 64)
                .ok()
                .and_then(|w| self.words.get_mut(w))
            {
                *word &= !(1u64 << (gfn % 64));
                self.count -= 1;
            }
        }
        present
    }

    /// Whether `gfn` is in the set.
    pub fn contains(&self, gfn: u64) -> bool {
        usize::try_from(gfn / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|word| word & (1u64 << (gfn % 64)) != 0)
    }

    /// Number of frames in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bitmap over absolute gfns, starting at gfn 0; frames past its end are not in the
    /// set. This is the input of [`GfnBitmap::new`].
    pub fn gfn_words(&self) -> &[u64] {
        &self.words
    }

    /// The set as `(first gfn, frames)` runs in ascending order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, &word) in (0u64..).zip(&self.words) {
            let mut rest = word;
            while rest != 0 {
                let start = u64::from(rest.trailing_zeros());
                // Ones from `start` up: count them by the zeros of the inverted, shifted word.
                let length = u64::from((!(rest >> start)).trailing_zeros());
                let gfn = index * 64 + start;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == gfn => *count += length,
                    _ => runs.push((gfn, length)),
                }
                rest = if start + length >= 64 {
                    0
                } else {
                    rest & !(((1u64 << length) - 1) << start)
                };
            }
        }
        runs
    }

    /// The union of this set and `other`.
    pub fn union(&self, other: &GfnSet) -> GfnSet {
        let mut out = self.clone();
        if out.words.len() < other.words.len() {
            out.words.resize(other.words.len(), 0);
        }
        for (word, bits) in out.words.iter_mut().zip(&other.words) {
            *word |= bits;
        }
        out.count = out.words.iter().map(|w| u64::from(w.count_ones())).sum();
        out
    }

    /// One bitmap per region of `mem`, in `mem.iter()` order, bit `i` for page `i` of the
    /// region: the input of [`RegionBitmaps::new`] (pass
    /// `bitmaps.iter().map(Vec::as_slice).collect()`). Each bitmap covers the whole region.
    pub fn region_bitmaps<M: GuestMemory>(&self, mem: &M) -> Vec<Vec<u64>> {
        mem.iter()
            .map(|region| {
                let first_gfn = region.start_addr().0 / PAGE_SIZE;
                let pages = region.len() / PAGE_SIZE;
                let mut words = vec![0u64; pages.div_ceil(64) as usize];
                for page in 0..pages {
                    if self.contains(first_gfn + page) {
                        words[(page / 64) as usize] |= 1 << (page % 64);
                    }
                }
                words
            })
            .collect()
    }
}

impl PageSet for GfnSet {
    fn contains(&self, _region: usize, _page: u64, gfn: u64) -> bool {
        GfnSet::contains(self, gfn)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_count() {
        let mut map = GfnSet::new();
        assert!(map.insert(3));
        assert!(!map.insert(3));
        assert!(map.insert(200));
        assert_eq!(map.len(), 2);
        assert!(map.contains(200) && !map.contains(201) && !map.contains(1 << 40));
        assert!(map.remove(3));
        assert!(!map.remove(3));
        assert!(!map.remove(1 << 40));
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn shapes_match_ext_snapshot_page_sets() {
        // Region 0 at gpa 0 (16 pages), region 1 at gpa 1 MiB (gfn 256, 100 pages).
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
            (vm_memory::GuestAddress(0), 16 << 12),
            (vm_memory::GuestAddress(1 << 20), 100 << 12),
        ])
        .unwrap();
        let mut map = GfnSet::new();
        for gfn in [1, 15, 256, 256 + 70, 256 + 99] {
            map.insert(gfn);
        }
        let by_gfn = GfnBitmap::new(map.gfn_words());
        let bitmaps = map.region_bitmaps(&mem);
        let by_region = RegionBitmaps::new(bitmaps.iter().map(Vec::as_slice).collect());
        for (region, first_gfn, pages) in [(0usize, 0u64, 16u64), (1, 256, 100)] {
            for page in 0..pages {
                let gfn = first_gfn + page;
                assert_eq!(by_gfn.contains(region, page, gfn), map.contains(gfn));
                assert_eq!(by_region.contains(region, page, gfn), map.contains(gfn));
            }
        }
        assert_eq!(bitmaps[1].len(), 2);
    }

    #[test]
    fn insert_range_and_union() {
        let mut a = GfnSet::new();
        a.insert_range(5, 3);
        a.insert(64);
        a.insert(65);
        a.remove(6);
        assert_eq!(a.ranges(), vec![(5, 1), (7, 1), (64, 2)]);
        assert_eq!(a.len(), 4);
        let mut b = GfnSet::new();
        b.insert(1000);
        b.insert(6);
        let both = a.union(&b);
        assert_eq!(both.ranges(), vec![(5, 3), (64, 2), (1000, 1)]);
        assert_eq!(both.len(), 6);
        assert_eq!(b.union(&a), both);
    }

    /// A set holding exactly the bits of `words`.
    fn from_words(words: &[u64]) -> GfnSet {
        let mut set = GfnSet::new();
        for gfn in 0..words.len() as u64 * 64 {
            if words[(gfn / 64) as usize] >> (gfn % 64) & 1 == 1 {
                set.insert(gfn);
            }
        }
        set
    }

    #[test]
    fn runs_of_a_gfn_bitmap() {
        let runs = |words: &[u64]| from_words(words).ranges();
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[0, 0]), vec![]);
        assert_eq!(runs(&[0b1011]), vec![(0, 2), (3, 1)]);
        // A run across words, a full word, and the top bit alone.
        assert_eq!(runs(&[1 << 63, u64::MAX, 1]), vec![(63, 66)]);
        assert_eq!(runs(&[0, 1 << 63]), vec![(127, 1)]);
        // Against a bit-by-bit reading of a pseudo-random map.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let words: Vec<u64> = (0..40)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                [state, state & (state >> 1), u64::MAX, 0][i % 4]
            })
            .collect();
        let expected: Vec<u64> = (0..words.len() as u64 * 64)
            .filter(|g| words[(g / 64) as usize] >> (g % 64) & 1 == 1)
            .collect();
        let expanded: Vec<u64> = from_words(&words)
            .ranges()
            .iter()
            .flat_map(|&(gfn, count)| gfn..gfn + count)
            .collect();
        assert_eq!(expanded, expected);
        let adjacent = from_words(&words)
            .ranges()
            .windows(2)
            .any(|w| w[0].0 + w[0].1 >= w[1].0);
        assert!(!adjacent, "runs are merged and ascending");
    }
}
