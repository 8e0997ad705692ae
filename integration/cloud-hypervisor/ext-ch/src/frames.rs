//! Sets of guest frames, as the snapshot writer takes the pages to type `Invalid`.

use ext_snapshot::PageSet;

/// A set of guest frame numbers (guest physical address / 4096), one bit each, grown on
/// demand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameSet {
    words: Vec<u64>,
}

impl FrameSet {
    /// The empty set.
    pub const fn new() -> Self {
        FrameSet { words: Vec::new() }
    }

    /// Adds frame `gfn`.
    pub fn insert(&mut self, gfn: u64) {
        let word = (gfn / 64) as usize;
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (gfn % 64);
    }

    /// Adds the `count` frames from `first`.
    pub fn insert_range(&mut self, first: u64, count: u64) {
        for gfn in first..first.saturating_add(count) {
            self.insert(gfn);
        }
    }

    /// Removes frame `gfn` (nothing if absent).
    pub fn remove(&mut self, gfn: u64) {
        if let Some(word) = self.words.get_mut((gfn / 64) as usize) {
            *word &= !(1 << (gfn % 64));
        }
    }

    /// Whether frame `gfn` is in the set.
    pub fn contains_frame(&self, gfn: u64) -> bool {
        self.words
            .get((gfn / 64) as usize)
            .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }

    /// Number of frames in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The set as `(first frame, frames)` ranges in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &bits) in self.words.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let gfn = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match out.last_mut() {
                    Some((first, count)) if *first + *count == gfn => *count += 1,
                    _ => out.push((gfn, 1)),
                }
            }
        }
        out
    }

    /// The union of this set and `other`.
    pub fn with(&self, other: &FrameSet) -> FrameSet {
        let (mut long, short) = if self.words.len() >= other.words.len() {
            (self.clone(), other)
        } else {
            (other.clone(), self)
        };
        for (word, bits) in long.words.iter_mut().zip(&short.words) {
            *word |= bits;
        }
        long
    }
}

impl PageSet for FrameSet {
    fn contains(&self, _region: usize, _page: u64, gfn: u64) -> bool {
        self.contains_frame(gfn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_ranges_and_union() {
        let mut a = FrameSet::new();
        a.insert_range(5, 3);
        a.insert(64);
        a.insert(65);
        a.remove(6);
        a.remove(1 << 20); // absent, past the end
        assert_eq!(a.ranges(), vec![(5, 1), (7, 1), (64, 2)]);
        assert_eq!(a.count(), 4);
        let mut b = FrameSet::new();
        b.insert(1000);
        b.insert(6);
        let both = a.with(&b);
        assert_eq!(both.ranges(), vec![(5, 3), (64, 2), (1000, 1)]);
        assert_eq!(b.with(&a), both);
        assert!(both.contains(0, 0, 1000) && !both.contains(0, 0, 999));
    }
}
