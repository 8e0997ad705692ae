//! The invalid-page map: guest frames the guest handed to the balloon (inflated and not yet
//! deflated). Their content is meaningless, so a snapshot writer types them `Invalid` and
//! stores no data for them.
//!
//! The map is kept over absolute guest frame numbers (gfn = guest physical address / 4096), so
//! it survives a frontend reconnect that sends a new memory table. It is handed out in the two
//! shapes `ext-snapshot`'s writer takes as its invalid-page set: the words of a gfn bitmap
//! (`ext_snapshot::GfnBitmap::new(map.gfn_words())`) or one bitmap per region of the current
//! memory table (`ext_snapshot::RegionBitmaps`, from [`InvalidPages::region_bitmaps`]).
//!
//! Ranges the guest *reports* free are not recorded here: they are punched, so they read as
//! holes and type themselves as never-populated.

use vm_memory::{Address, GuestMemory, GuestMemoryRegion};

use crate::memory::PAGE_SHIFT;

/// A set of guest frame numbers, stored as a bitmap: bit `gfn % 64` of word `gfn / 64`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvalidPages {
    words: Vec<u64>,
    count: u64,
}

impl InvalidPages {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
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

    /// Whether `gfn` is in the map.
    pub fn contains(&self, gfn: u64) -> bool {
        usize::try_from(gfn / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|word| word & (1u64 << (gfn % 64)) != 0)
    }

    /// Number of frames in the map.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bitmap over absolute gfns, starting at gfn 0; frames past its end are not in the
    /// map. This is the input of `ext_snapshot::GfnBitmap::new`.
    pub fn gfn_words(&self) -> &[u64] {
        &self.words
    }

    /// One bitmap per region of `mem`, in `mem.iter()` order, bit `i` for page `i` of the
    /// region: the input of `ext_snapshot::RegionBitmaps::new` (pass
    /// `bitmaps.iter().map(Vec::as_slice).collect()`). Each bitmap covers the whole region.
    pub fn region_bitmaps<M: GuestMemory>(&self, mem: &M) -> Vec<Vec<u64>> {
        mem.iter()
            .map(|region| {
                let first_gfn = region.start_addr().raw_value() >> PAGE_SHIFT;
                let pages = region.len() >> PAGE_SHIFT;
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

#[cfg(test)]
mod tests {
    use ext_snapshot::{GfnBitmap, PageSet, RegionBitmaps};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn insert_remove_count() {
        let mut map = InvalidPages::new();
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
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 16 << 12),
            (GuestAddress(1 << 20), 100 << 12),
        ])
        .unwrap();
        let mut map = InvalidPages::new();
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
}
